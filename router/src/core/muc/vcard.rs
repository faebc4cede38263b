//! Room avatars (XEP-0486): owners publish a vCard-temp (XEP-0054) at the room's
//! address, anyone reads it, and the room's disco#info names the SHA-1 of each of
//! its photos (`muc#roominfo_avatarhash`) so that clients know when to fetch it.

use jid::FullJid;
use minidom::Element;

use super::form::status_message;
use super::{Affiliation, Out, Refusal, Room};
use crate::core::avatar::sha1_hex;
use crate::error::StanzaErrorCondition;
use crate::stanza;
use crate::xml::ns;

/// Bytes of a room's vCard, at most (as a user's).
pub const MAX_VCARD_BYTES: usize = 64 * 1024;
/// Photos of a room's vCard, at most (the same image in several formats).
const MAX_PHOTOS: usize = 4;

/// The SHA-1s (hex) of the photos of a vCard, in its order; `None` when one is empty
/// or not base64, or there are more than MAX_PHOTOS.
fn photo_hashes(card: &Element) -> Option<Vec<String>> {
    use base64::Engine as _;
    let photos: Vec<&Element> = card
        .children()
        .filter(|c| c.is("PHOTO", ns::VCARD))
        .collect();
    if photos.len() > MAX_PHOTOS {
        return None;
    }
    photos
        .into_iter()
        .filter_map(|p| p.get_child("BINVAL", ns::VCARD))
        .map(|b| {
            let text: String = b.text().split_whitespace().collect();
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(text.as_bytes())
                .ok()
                .filter(|bytes| !bytes.is_empty())?;
            Some(sha1_hex(&bytes))
        })
        .collect()
}

impl Room {
    /// The room's vCard, or an empty one.
    pub fn vcard(&self) -> Element {
        self.vcard
            .as_deref()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| Element::bare("vCard", ns::VCARD))
    }

    /// The room's vCard as kept (none: never set, or emptied).
    pub fn stored_vcard(&self) -> Option<&str> {
        self.vcard.as_deref()
    }

    /// The SHA-1s (hex) of the photos of the room's vCard, in its order (computed
    /// when it is set).
    pub fn avatar_hashes(&self) -> &[String] {
        &self.avatar_hashes
    }

    /// Sets the room's vCard as kept across a restart.
    pub fn restore_vcard(&mut self, vcard: Option<String>) {
        self.avatar_hashes = vcard
            .as_deref()
            .and_then(|v| v.parse::<Element>().ok())
            .and_then(|card| photo_hashes(&card))
            .unwrap_or_default();
        self.vcard = vcard;
    }

    /// An owner sets the room's vCard (an empty one removes it): occupants are told
    /// the configuration changed (status 104) and look again. Only owners may
    /// (`forbidden`); a vCard over MAX_VCARD_BYTES, or a photo that is not base64, is
    /// `not-acceptable`, and so is an empty photo or more than four.
    pub fn set_vcard(&mut self, from: &FullJid, vcard: &Element) -> Result<Vec<Out>, Refusal> {
        if self.affiliation(&from.to_bare()) != Affiliation::Owner {
            return Err(StanzaErrorCondition::Forbidden);
        }
        if !vcard.is("vCard", ns::VCARD) {
            return Err(StanzaErrorCondition::BadRequest);
        }
        let xml = stanza::serialize(vcard);
        if xml.len() > MAX_VCARD_BYTES {
            return Err(StanzaErrorCondition::NotAcceptable);
        }
        let hashes = photo_hashes(vcard).ok_or(StanzaErrorCondition::NotAcceptable)?;
        let new = (vcard.children().next().is_some()).then_some(xml);
        if new == self.vcard {
            return Ok(Vec::new());
        }
        self.vcard = new;
        self.avatar_hashes = hashes;
        Ok(status_message(self, &[104]))
    }

    /// The `muc#roominfo` form of the room's disco#info: its avatar hashes, when it
    /// has an avatar.
    pub fn room_info_form(&self) -> Option<Element> {
        let hashes = self.avatar_hashes();
        if hashes.is_empty() {
            return None;
        }
        let field = |var: &str, kind: &str, values: &[String]| {
            let mut f = Element::bare("field", ns::DATA_FORMS);
            stanza::set_attr(&mut f, "var", var);
            stanza::set_attr(&mut f, "type", kind);
            for v in values {
                f.append_child(
                    Element::builder("value", ns::DATA_FORMS)
                        .append(v.as_str())
                        .build(),
                );
            }
            f
        };
        let mut x = Element::bare("x", ns::DATA_FORMS);
        stanza::set_attr(&mut x, "type", "result");
        x.append_child(field(
            "FORM_TYPE",
            "hidden",
            &["http://jabber.org/protocol/muc#roominfo".to_owned()],
        ));
        x.append_child(field("muc#roominfo_avatarhash", "text-multi", hashes));
        Some(x)
    }
}
