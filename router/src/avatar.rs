//! Avatars kept in step (XEP-0398): a PEP avatar (XEP-0084) the owner publishes in
//! an `open` node becomes the PHOTO of their vCard-temp, a vCard they set becomes
//! their PEP avatar (its PHOTO, or none), and their available presence carries the
//! SHA-1 of the vCard's PHOTO (XEP-0153), so clients of either kind see the same
//! picture. The conversions are in `core::avatar`.

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
/// beyond: a cold cache costs one vCard read per account's next presence).
const HASHES: usize = 100_000;

/// The XEP-0153 hash of each account seen lately: the SHA-1 of its vCard PHOTO, `""`
/// for a vCard without one, `None` for an account without a vCard (its presence is
/// left as the client sent it).
#[derive(Default)]
pub(crate) struct Hashes(Mutex<HashMap<String, Option<String>>>);

impl Server {
    /// `owner`'s available presence with the hash of their vCard photo (XEP-0153,
    /// XEP-0398 §4), replacing what the client put there, unless the client says it
    /// has no avatar (an empty `<photo/>`) or the account has no vCard.
    pub(crate) async fn with_avatar_hash(&self, owner: &str, presence: Element) -> Element {
        let says_none = presence
            .get_child("x", avatar::VCARD_UPDATE)
            .and_then(|x| x.get_child("photo", avatar::VCARD_UPDATE))
            .is_some_and(|p| p.text().trim().is_empty());
        if says_none {
            return presence;
        }
        let cached = lock(&self.avatars.0).get(owner).cloned();
        let hash = match cached {
            Some(hash) => hash,
            None => {
                let hash = match self.store.vcard(owner).await {
                    Ok(card) => card.as_deref().map(vcard_hash),
                    // Not known now: the presence goes as the client sent it.
                    Err(_) => return presence,
                };
                // A conversion may have stored a newer hash meanwhile: it wins.
                let mut hashes = lock(&self.avatars.0);
                if hashes.len() >= HASHES {
                    hashes.clear();
                }
                hashes.entry(owner.to_owned()).or_insert(hash).clone()
            }
        };
        match hash {
            Some(hash) => avatar::with_photo_hash(presence, &hash),
            None => presence,
        }
    }

    fn remember_vcard(&self, owner: &str, card: &str) {
        let mut hashes = lock(&self.avatars.0);
        if hashes.len() >= HASHES {
            hashes.clear();
        }
        hashes.insert(owner.to_owned(), Some(vcard_hash(card)));
    }

    /// Stores `card` as `owner`'s vCard and keeps the presence hash in step; the
    /// caller holds the owner's lock.
    pub(crate) async fn store_vcard(
        &self,
        owner: &str,
        card: &str,
    ) -> Result<(), impmesh_store::StoreError> {
        self.store.set_vcard(owner, card).await?;
        self.remember_vcard(owner, card);
        Ok(())
    }

    /// The owner published `payload` to PEP node `node`: avatar metadata naming data
    /// they published in an `open` node makes it their vCard's PHOTO (XEP-0398 §3;
    /// a vCard is public, so a `presence` or `whitelist` avatar stays in PEP); empty
    /// metadata removes the PHOTO.
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
                match self.store.pep_node(owner, avatar::DATA).await {
                    Ok(Some(data_node)) if data_node.access_model == "open" => {}
                    Ok(_) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the avatar's node; the vCard keeps its photo");
                        return;
                    }
                }
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
                // The data is published first (XEP-0084 §4.1); without it, or when
                // it is not the image the metadata names, the vCard cannot follow.
                let Some(data) = data else { return };
                Some((media_type.clone(), data))
            }
            Metadata::Disabled => None,
        };
        let _ordered = self.roster_lock(owner).lock().await;
        let current = match self.store.vcard(owner).await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read a vCard; its photo does not follow the avatar");
                return;
            }
        };
        let photo = photo.as_ref().map(|(t, b)| (t.as_str(), b.as_str()));
        let Some(mut card) = avatar::vcard_with_photo(current.as_deref(), photo) else {
            return;
        };
        if card.len() > crate::iq::MAX_DOCUMENT_BYTES {
            // Too large for a vCard its owner could store again: the vCard goes
            // without a photo rather than keep one that is no longer the avatar.
            tracing::info!(
                owner,
                "an avatar too large for the vCard; the vCard's photo is removed"
            );
            match avatar::vcard_with_photo(current.as_deref(), None) {
                Some(without) => card = without,
                None => return,
            }
        }
        if let Err(e) = self.store_vcard(owner, &card).await {
            tracing::warn!(error = %e, "cannot store a vCard; its photo does not follow the avatar");
        }
    }

    /// The owner set `vcard`: its PHOTO becomes their PEP avatar (XEP-0398 §4), data
    /// then metadata in `open` nodes (a vCard is public), notified as any
    /// publication; a vCard without one turns a PEP avatar off.
    pub(crate) async fn avatar_from_vcard(&self, owner: &str, vcard: &Element) {
        let current = match self.store.pep_items(owner, avatar::METADATA, 1).await {
            Ok(items) => items.into_iter().next(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the PEP avatar; it does not follow the vCard");
                return;
            }
        };
        let current_id = current
            .as_ref()
            .and_then(|i| i.payload.parse::<Element>().ok())
            .and_then(|m| avatar::metadata(&m));
        let publications = match avatar::photo_of(vcard) {
            Some((media_type, binval)) => {
                let Some((id, data, metadata)) = avatar::pep_of_photo(&media_type, &binval) else {
                    return;
                };
                if matches!(&current_id, Some(Metadata::Avatar { id: now, .. }) if *now == id) {
                    return;
                }
                vec![
                    (avatar::DATA, id.clone(), data),
                    (avatar::METADATA, id, metadata),
                ]
            }
            None => {
                if !matches!(current_id, Some(Metadata::Avatar { .. })) {
                    return;
                }
                let off = format!("<metadata xmlns='{}'/>", avatar::METADATA);
                vec![(avatar::METADATA, crate::names::random_id(), off)]
            }
        };
        let Some(requester) = stanza::bare(owner, &self.config.domain).map(Jid::from) else {
            return;
        };
        for (node, id, payload) in publications {
            let options = match self.store.pep_node(owner, node).await {
                Ok(None) => format!(
                    "<publish-options><x xmlns='{}' type='submit'><field var='FORM_TYPE' type='hidden'><value>{}</value></field><field var='pubsub#access_model'><value>open</value></field></x></publish-options>",
                    ns::DATA_FORMS,
                    ns::PUBSUB_PUBLISH_OPTIONS
                ),
                Ok(Some(_)) => String::new(),
                Err(_) => return,
            };
            let xml = format!(
                "<iq xmlns='{}' type='set' id='vcard-avatar'><pubsub xmlns='{}'><publish node='{node}'><item id='{id}'>{payload}</item></publish>{options}</pubsub></iq>",
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

/// The XEP-0153 hash of a stored vCard: its PHOTO's SHA-1, `""` without one.
fn vcard_hash(card: &str) -> String {
    card.parse::<Element>()
        .ok()
        .and_then(|c| avatar::photo_of(&c))
        .and_then(|(_, b64)| avatar::photo_hash(&b64))
        .unwrap_or_default()
}
