//! Avatars both ways (XEP-0398) without I/O: a PEP avatar (XEP-0084) as a vCard-temp
//! PHOTO, a vCard PHOTO as PEP items, and the avatar's hash in presence (XEP-0153).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use minidom::Element;
use sha1::Digest as _;

use crate::xml::{escape, ns};

pub const DATA: &str = "urn:xmpp:avatar:data";
pub const METADATA: &str = "urn:xmpp:avatar:metadata";
pub const VCARD_UPDATE: &str = "vcard-temp:x:update";
/// The account's disco#info feature (XEP-0398 §5).
pub const CONVERSION: &str = "urn:xmpp:pep-vcard-conversion:0";

/// What an avatar metadata item says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Metadata {
    /// The avatar whose data item has this id (its SHA-1, hex), of this type.
    Avatar { id: String, media_type: String },
    /// `<metadata/>` without `<info/>`: the avatar is off (XEP-0084 §4.2).
    Disabled,
}

/// Reads a metadata payload; `None` when it is not one or names no usable avatar (an
/// `<info/>` with a URL only points elsewhere).
pub fn metadata(payload: &Element) -> Option<Metadata> {
    if !payload.is("metadata", METADATA) {
        return None;
    }
    let infos: Vec<&Element> = payload
        .children()
        .filter(|c| c.is("info", METADATA))
        .collect();
    let Some(first) = infos.first() else {
        return Some(Metadata::Disabled);
    };
    // The PNG is the one every client can show (XEP-0084 §4.2.1); else the first
    // that is kept here (no url).
    let info = infos
        .iter()
        .find(|i| i.attr("type") == Some("image/png") && i.attr("url").is_none())
        .or_else(|| first.attr("url").is_none().then_some(first))?;
    Some(Metadata::Avatar {
        id: info.attr("id")?.to_owned(),
        media_type: info.attr("type").unwrap_or("image/png").to_owned(),
    })
}

/// The base64 of a data payload, checked: it decodes and its SHA-1 is `id` (hex,
/// either case).
pub fn data(payload: &Element, id: &str) -> Option<String> {
    if !payload.is("data", DATA) {
        return None;
    }
    let text: String = payload.text().split_whitespace().collect();
    let bytes = B64.decode(text.as_bytes()).ok()?;
    sha1_hex(&bytes).eq_ignore_ascii_case(id).then_some(text)
}

pub fn sha1_hex(bytes: &[u8]) -> String {
    crate::names::hex(&sha1::Sha1::digest(bytes))
}

/// The SHA-1 (hex) of a PHOTO's image, from its base64; `None` when that does not
/// decode.
pub fn photo_hash(binval: &str) -> Option<String> {
    Some(sha1_hex(&B64.decode(binval.as_bytes()).ok()?))
}

/// `vcard` (a stored vCard-temp, or none) with its PHOTO replaced by `photo` (type,
/// base64) or removed; `None` when nothing changes.
pub fn vcard_with_photo(vcard: Option<&str>, photo: Option<(&str, &str)>) -> Option<String> {
    let mut card: Element = match vcard {
        None => Element::builder("vCard", ns::VCARD).build(),
        // A stored vCard that does not parse is left as it is.
        Some(v) => match v.parse::<Element>() {
            Ok(card) if card.is("vCard", ns::VCARD) => card,
            _ => return None,
        },
    };
    let current = photo_of(&card);
    if current.as_ref().map(|(t, b)| (t.as_str(), b.as_str())) == photo {
        return None;
    }
    while card.remove_child("PHOTO", ns::VCARD).is_some() {}
    if let Some((media_type, binval)) = photo {
        let xml = format!(
            "<PHOTO xmlns='{}'><TYPE>{}</TYPE><BINVAL>{}</BINVAL></PHOTO>",
            ns::VCARD,
            escape(media_type),
            escape(binval)
        );
        card.append_child(xml.parse().ok()?);
    }
    Some(String::from(&card))
}

/// The PHOTO of a vCard as (type, base64 without whitespace), when it holds one.
pub fn photo_of(card: &Element) -> Option<(String, String)> {
    let photo = card.get_child("PHOTO", ns::VCARD)?;
    let binval: String = photo
        .get_child("BINVAL", ns::VCARD)?
        .text()
        .split_whitespace()
        .collect();
    if binval.is_empty() {
        return None;
    }
    let media_type = photo
        .get_child("TYPE", ns::VCARD)
        .map(|t| t.text().trim().to_owned())
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| "image/png".to_owned());
    Some((media_type, binval))
}

/// A PHOTO as the XEP-0084 data and metadata payloads with the item id (SHA-1 of the
/// image); `None` when its base64 does not decode.
pub fn pep_of_photo(media_type: &str, binval: &str) -> Option<(String, String, String)> {
    let bytes = B64.decode(binval.as_bytes()).ok()?;
    let id = sha1_hex(&bytes);
    let data = format!("<data xmlns='{DATA}'>{binval}</data>");
    let metadata = format!(
        "<metadata xmlns='{METADATA}'><info id='{id}' bytes='{}' type='{}'/></metadata>",
        bytes.len(),
        escape(media_type)
    );
    Some((id, data, metadata))
}

/// `presence` with its XEP-0153 element saying `hash` (`""`: no avatar).
pub fn with_photo_hash(mut presence: Element, hash: &str) -> Element {
    while presence.remove_child("x", VCARD_UPDATE).is_some() {}
    let x = if hash.is_empty() {
        format!("<x xmlns='{VCARD_UPDATE}'><photo/></x>")
    } else {
        format!("<x xmlns='{VCARD_UPDATE}'><photo>{hash}</photo></x>")
    };
    if let Ok(x) = x.parse() {
        presence.append_child(x);
    }
    presence
}

#[cfg(test)]
mod tests {
    use super::*;

    fn el(xml: &str) -> Element {
        xml.parse().unwrap()
    }

    const PNG: &[u8] = b"\x89PNG not really";

    #[test]
    fn metadata_names_the_png_or_says_disabled() {
        let m = el("<metadata xmlns='urn:xmpp:avatar:metadata'>\
            <info id='AB12' type='image/webp' bytes='1'/>\
            <info id='cd34' type='image/png' bytes='2'/></metadata>");
        assert_eq!(
            metadata(&m),
            Some(Metadata::Avatar {
                id: "cd34".into(),
                media_type: "image/png".into()
            })
        );
        assert_eq!(
            metadata(&el("<metadata xmlns='urn:xmpp:avatar:metadata'/>")),
            Some(Metadata::Disabled)
        );
        let elsewhere = el(
            "<metadata xmlns='urn:xmpp:avatar:metadata'><info id='a' type='image/png' bytes='1' url='https://x/a.png'/></metadata>",
        );
        assert_eq!(metadata(&elsewhere), None);
        assert_eq!(metadata(&el("<data xmlns='urn:xmpp:avatar:data'/>")), None);
    }

    #[test]
    fn data_is_checked_against_its_id() {
        let b64 = B64.encode(PNG);
        let id = sha1_hex(PNG);
        let payload = el(&format!("<data xmlns='urn:xmpp:avatar:data'>{b64}</data>"));
        assert_eq!(data(&payload, &id), Some(b64.clone()));
        assert_eq!(data(&payload, "0000"), None);
        assert_eq!(data(&payload, &id.to_uppercase()), Some(b64.clone()));
        assert_eq!(
            vcard_with_photo(Some("<not-xml"), Some(("image/png", "AA=="))),
            None
        );
        let garbage = el("<data xmlns='urn:xmpp:avatar:data'>!!!</data>");
        assert_eq!(data(&garbage, &id), None);
    }

    #[test]
    fn a_photo_goes_into_a_vcard_and_back_into_pep() {
        let b64 = B64.encode(PNG);
        let card = "<vCard xmlns='vcard-temp'><FN>Alice</FN><PHOTO><TYPE>image/gif</TYPE><BINVAL>R0lG</BINVAL></PHOTO></vCard>";
        let new = vcard_with_photo(Some(card), Some(("image/png", &b64))).unwrap();
        let parsed: Element = new.parse().unwrap();
        assert_eq!(photo_of(&parsed), Some(("image/png".into(), b64.clone())));
        assert!(new.contains("<FN>Alice</FN>"), "{new}");
        assert_eq!(new.matches("<PHOTO").count(), 1);
        // The same photo again: nothing to write.
        assert_eq!(
            vcard_with_photo(Some(&new), Some(("image/png", &b64))),
            None
        );
        // Removed, and a card made when there was none.
        let without = vcard_with_photo(Some(&new), None).unwrap();
        assert!(!without.contains("PHOTO") && without.contains("Alice"));
        assert!(vcard_with_photo(None, Some(("image/png", &b64))).is_some());
        let (id, data_xml, meta_xml) = pep_of_photo("image/png", &b64).unwrap();
        assert_eq!(id, sha1_hex(PNG));
        assert_eq!(data(&el(&data_xml), &id), Some(b64));
        assert_eq!(
            metadata(&el(&meta_xml)),
            Some(Metadata::Avatar {
                id,
                media_type: "image/png".into()
            })
        );
        assert_eq!(pep_of_photo("image/png", "!!"), None);
    }

    #[test]
    fn presence_carries_the_servers_hash_only() {
        let p = el(
            "<presence xmlns='jabber:client'><show>away</show><x xmlns='vcard-temp:x:update'><photo>old</photo></x></presence>",
        );
        let out = String::from(&with_photo_hash(p.clone(), "abc"));
        assert!(
            out.contains("<photo>abc</photo>") && !out.contains("old"),
            "{out}"
        );
        assert!(out.contains("<show>away</show>"));
        let none = String::from(&with_photo_hash(p, ""));
        assert!(none.contains("<photo/>"), "{none}");
    }
}
