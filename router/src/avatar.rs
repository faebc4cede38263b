//! Avatars kept in step (XEP-0398): a PEP avatar (XEP-0084) the owner publishes
//! becomes the PHOTO of their vCard-temp, a vCard PHOTO they set becomes their PEP
//! avatar, and their available presence carries the avatar's hash (XEP-0153), so
//! clients of either kind see the same picture. The conversions are in `core::avatar`.

use std::collections::HashMap;
use std::sync::Mutex;

use jid::Jid;
use minidom::Element;

use crate::Server;
use crate::core::avatar::{self, Metadata};
use crate::hub::lock;
use crate::stanza;
use crate::xml::ns;

/// Accounts whose avatar hash is kept in memory, at most (the map starts over
/// beyond).
const HASHES: usize = 100_000;
/// Bytes of a vCard the conversion writes, at most (an avatar's base64 fits: PEP
/// items hold 128 KiB by default).
const MAX_CONVERTED_VCARD: usize = 256 * 1024;

/// The avatar hash of each account seen lately: `Some("")` for an avatar turned off,
/// `None` for an account with no PEP avatar.
#[derive(Default)]
pub(crate) struct Hashes(Mutex<HashMap<String, Option<String>>>);

impl Server {
    /// `owner`'s available presence with the hash of their avatar (XEP-0153), when
    /// they have a PEP avatar; as sent otherwise.
    pub(crate) async fn with_avatar_hash(&self, owner: &str, presence: Element) -> Element {
        let cached = lock(&self.avatars.0).get(owner).cloned();
        let hash = match cached {
            Some(hash) => hash,
            None => {
                let hash = match self.store.pep_items(owner, avatar::METADATA, 1).await {
                    Ok(items) => items
                        .first()
                        .and_then(|i| i.payload.parse::<Element>().ok())
                        .and_then(|m| avatar::metadata(&m))
                        .map(|m| match m {
                            Metadata::Avatar { id, .. } => id,
                            Metadata::Disabled => String::new(),
                        }),
                    // Not known now: the presence goes as the client sent it.
                    Err(_) => return presence,
                };
                self.remember_avatar(owner, hash.clone());
                hash
            }
        };
        match hash {
            Some(hash) => avatar::with_photo_hash(presence, &hash),
            None => presence,
        }
    }

    fn remember_avatar(&self, owner: &str, hash: Option<String>) {
        let mut hashes = lock(&self.avatars.0);
        if hashes.len() >= HASHES {
            hashes.clear();
        }
        hashes.insert(owner.to_owned(), hash);
    }

    /// The owner published `payload` to PEP node `node`: a new avatar's metadata
    /// makes it their vCard's PHOTO (XEP-0398 §3), and the hash their presence
    /// carries from now on.
    pub(crate) async fn avatar_published(&self, owner: &str, node: &str, payload: &str) {
        if node != avatar::METADATA {
            return;
        }
        let Some(meta) = payload
            .parse::<Element>()
            .ok()
            .and_then(|m| avatar::metadata(&m))
        else {
            return;
        };
        let photo = match &meta {
            Metadata::Avatar { id, media_type } => {
                let data = match self
                    .store
                    .pep_items_by_id(owner, avatar::DATA, std::slice::from_ref(id))
                    .await
                {
                    Ok(items) => items
                        .first()
                        .and_then(|i| i.payload.parse::<Element>().ok())
                        .and_then(|d| avatar::data(&d, id)),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read an avatar's data; the vCard keeps its photo");
                        return;
                    }
                };
                self.remember_avatar(owner, Some(id.clone()));
                // The data is published first (XEP-0084 §4.1); without it the vCard
                // cannot follow.
                let Some(data) = data else { return };
                Some((media_type.clone(), data))
            }
            Metadata::Disabled => {
                self.remember_avatar(owner, Some(String::new()));
                None
            }
        };
        let current = match self.store.vcard(owner).await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read a vCard; its photo does not follow the avatar");
                return;
            }
        };
        let photo = photo.as_ref().map(|(t, b)| (t.as_str(), b.as_str()));
        let Some(card) = avatar::vcard_with_photo(current.as_deref(), photo) else {
            return;
        };
        if card.len() > MAX_CONVERTED_VCARD {
            tracing::info!(
                owner,
                bytes = card.len(),
                "an avatar too large for the vCard; the vCard keeps its photo"
            );
            return;
        }
        if let Err(e) = self.store.set_vcard(owner, &card).await {
            tracing::warn!(error = %e, "cannot store a vCard; its photo does not follow the avatar");
        }
    }

    /// The owner set `vcard`: its PHOTO becomes their PEP avatar (XEP-0398 §4), data
    /// then metadata, notified as any publication.
    pub(crate) async fn avatar_from_vcard(&self, owner: &str, vcard: &Element) {
        let Some((media_type, binval)) = avatar::photo_of(vcard) else {
            return;
        };
        let Some((id, data, metadata)) = avatar::pep_of_photo(&media_type, &binval) else {
            return;
        };
        match self.store.pep_items(owner, avatar::METADATA, 1).await {
            Ok(items) if items.first().is_some_and(|i| i.id == id) => return,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the PEP avatar; it does not follow the vCard");
                return;
            }
        }
        let Some(requester) = stanza::bare(owner, &self.config.domain).map(Jid::from) else {
            return;
        };
        for (node, payload) in [(avatar::DATA, data), (avatar::METADATA, metadata)] {
            let xml = format!(
                "<iq xmlns='{}' type='set' id='vcard-avatar'><pubsub xmlns='{}'><publish node='{node}'><item id='{id}'>{payload}</item></publish></pubsub></iq>",
                ns::CLIENT,
                ns::PUBSUB
            );
            let Ok(iq) = xml.parse::<Element>() else {
                return;
            };
            if let Err(refusal) = self.pep_request(&requester, owner, &iq).await {
                tracing::info!(
                    owner,
                    ?refusal,
                    "the vCard's photo could not become the PEP avatar"
                );
                return;
            }
        }
    }
}
