//! Small helpers on stanzas as `minidom` elements: attributes, kinds and JIDs.

use jid::{BareJid, FullJid, Jid};
use minidom::Element;

/// An element serialized, into a buffer sized for a typical stanza up front (minidom's
/// `String::from` starts empty and grows it several times).
pub fn serialize(element: &Element) -> String {
    let mut out = Vec::with_capacity(512);
    element
        .write_to(&mut out)
        .expect("writing to memory does not fail");
    String::from_utf8(out).expect("minidom writes UTF-8")
}

/// Sets (or replaces) an attribute in no namespace.
pub fn set_attr(element: &mut Element, name: &str, value: &str) {
    // Attribute names used here are literals like "to", "id": valid NCNames.
    if let Ok(name) = rxml::NcName::try_from(name) {
        element.set_attr(rxml::Namespace::none().clone(), name, value);
    }
}

/// Removes an attribute in no namespace.
pub fn remove_attr(element: &mut Element, name: &str) {
    if let Ok(name) = rxml::NcName::try_from(name) {
        element.attrs_mut().remove(rxml::Namespace::none(), &name);
    }
}

/// The three stanza kinds of RFC 6120 §8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Message,
    Presence,
    Iq,
}

impl Kind {
    pub fn of(element: &Element) -> Option<Kind> {
        if element.ns() != crate::xml::ns::CLIENT {
            return None;
        }
        match element.name() {
            "message" => Some(Kind::Message),
            "presence" => Some(Kind::Presence),
            "iq" => Some(Kind::Iq),
            _ => None,
        }
    }
}

/// A `to` attribute that is not a valid JID (RFC 7622).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MalformedJid;

/// Parses the `to` attribute; `Ok(None)` when absent.
pub fn to_jid(element: &Element) -> Result<Option<Jid>, MalformedJid> {
    match element.attr("to") {
        None => Ok(None),
        Some(s) => Jid::new(s).map(Some).map_err(|_| MalformedJid),
    }
}

/// Parses a `from`-like attribute value.
pub fn parse_jid(value: &str) -> Option<Jid> {
    Jid::new(value).ok()
}

/// The type attribute, with RFC 6121's defaults (`normal` for messages, `available`
/// for presence shown as `None`).
pub fn stanza_type(element: &Element) -> &str {
    match element.attr("type") {
        Some(t) => t,
        None if element.name() == "message" => "normal",
        None => "",
    }
}

/// A bare JID for `user@domain` from trusted parts (a stored username and our domain).
pub fn bare(user: &str, domain: &str) -> Option<BareJid> {
    BareJid::new(&format!("{user}@{domain}")).ok()
}

/// A full JID for `user@domain/resource` from trusted parts.
pub fn full(user: &str, domain: &str, resource: &str) -> Option<FullJid> {
    FullJid::new(&format!("{user}@{domain}/{resource}")).ok()
}

/// Parses XML the server wrote itself.
pub fn parse_own(xml: &str) -> Option<Element> {
    xml.parse().ok()
}

/// The bare part of a JID string we stamped ourselves (everything before the first
/// `/`): the key for per-sender quotas, without parsing.
pub fn bare_of(jid: &str) -> &str {
    jid.split('/').next().unwrap_or_default()
}
