//! Message moderation (XEP-0425 v0.3, `urn:xmpp:message-moderate:1`): a moderator
//! asks the room to retract an occupant's message, named by the room's stanza id;
//! the room tells every occupant (an XEP-0424 `<retract/>` from the room), stops
//! passing the message on (history), and its archive keeps a tombstone in the
//! message's place.

use jid::FullJid;
use minidom::Element;

use super::{NS_OCCUPANT_ID, Out, Refusal, Room};
use crate::error::StanzaErrorCondition;
use crate::stanza;
use crate::xml::ns;

pub const NS_MODERATE: &str = "urn:xmpp:message-moderate:1";
pub const NS_RETRACT: &str = "urn:xmpp:message-retract:1";
/// XEP-0334's hints: a retraction is kept in archives though it has no body.
const NS_HINTS: &str = "urn:xmpp:hints";
/// Bytes of a moderation's reason, at most.
const MAX_REASON_BYTES: usize = 1024;
/// Bytes of a stanza id a moderator names, at most.
const MAX_ID_BYTES: usize = 256;

/// A moderator's request: the room's stanza id of the message, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moderation {
    pub id: String,
    pub reason: Option<String>,
}

impl Moderation {
    /// Parses `<moderate id='…' xmlns='urn:xmpp:message-moderate:1'><retract
    /// xmlns='urn:xmpp:message-retract:1'/><reason/></moderate>`. A moderation other
    /// than a retraction is `feature-not-implemented`.
    pub fn parse(moderate: &Element) -> Result<Moderation, Refusal> {
        if !moderate.is("moderate", NS_MODERATE) {
            return Err(StanzaErrorCondition::BadRequest);
        }
        let id = moderate
            .attr("id")
            .filter(|id| !id.is_empty() && id.len() <= MAX_ID_BYTES)
            .ok_or(StanzaErrorCondition::BadRequest)?;
        if !moderate.has_child("retract", NS_RETRACT) {
            return Err(StanzaErrorCondition::FeatureNotImplemented);
        }
        let reason = moderate
            .get_child("reason", NS_MODERATE)
            .map(Element::text)
            .filter(|r| !r.is_empty());
        if reason.as_ref().is_some_and(|r| r.len() > MAX_REASON_BYTES) {
            return Err(StanzaErrorCondition::NotAcceptable);
        }
        Ok(Moderation {
            id: id.to_owned(),
            reason,
        })
    }
}

impl Room {
    /// What the room announces when `from` retracts a message: `<retract
    /// id='…'>` naming the moderator by occupant JID and occupant id, with the
    /// reason, from the room (the caller gives it its id, [`announced`]). Only
    /// moderators may (`forbidden`).
    pub fn moderation(&self, from: &FullJid, request: &Moderation) -> Result<Element, Refusal> {
        if !self.is_moderator(from) {
            return Err(StanzaErrorCondition::Forbidden);
        }
        let nick = self.nick_of(from).ok_or(StanzaErrorCondition::Forbidden)?;
        let by = self
            .occupant_jid(nick)
            .ok_or(StanzaErrorCondition::Forbidden)?;
        let mut moderated = Element::builder("moderated", NS_MODERATE)
            .append(self.occupant_id_el(&from.to_bare()))
            .build();
        stanza::set_attr(&mut moderated, "by", &by.to_string());
        let mut retract = Element::builder("retract", NS_RETRACT)
            .append(moderated)
            .build();
        stanza::set_attr(&mut retract, "id", &request.id);
        if let Some(reason) = &request.reason {
            retract.append_child(
                Element::builder("reason", NS_RETRACT)
                    .append(reason.as_str())
                    .build(),
            );
        }
        let mut m = Element::builder("message", ns::CLIENT)
            .append(retract)
            .append(Element::bare("store", NS_HINTS))
            .build();
        stanza::set_attr(&mut m, "from", self.jid.as_str());
        stanza::set_attr(&mut m, "type", "groupchat");
        Ok(m)
    }

    /// Whether the room's history holds the message it gave the stanza id `id`.
    pub fn remembers(&self, id: &str) -> bool {
        let room = self.jid.as_str();
        self.history
            .iter()
            .any(|k| crate::core::archive::stanza_id(&k.stanza, room) == Some(id))
    }

    /// Takes the message the room gave the stanza id `id` out of its history (it is
    /// no longer passed on); returns it, as the room sent it, if it was there.
    pub fn forget_message(&mut self, id: &str) -> Option<Element> {
        let room = self.jid.as_str();
        let at = self
            .history
            .iter()
            .position(|k| crate::core::archive::stanza_id(&k.stanza, room) == Some(id))?;
        self.history.remove(at).map(|k| k.stanza)
    }

    /// `message`, from the room, to every occupant's sessions.
    pub fn broadcast(&self, message: &Element) -> Vec<Out> {
        self.sessions()
            .map(|to| {
                let mut copy = message.clone();
                stanza::set_attr(&mut copy, "to", &to.to_string());
                Out { to, stanza: copy }
            })
            .collect()
    }
}

/// `moderation` with its id `id`, as a message id and as the room's stanza id.
pub fn announced(moderation: &Element, id: &str, room: &str) -> Element {
    let mut m = moderation.clone();
    stanza::set_attr(&mut m, "id", id);
    crate::core::archive::stamp(&mut m, id, room);
    m
}

/// What takes a retracted message's place in the room's archive: its sender, type,
/// id and author's occupant id, and `<retracted stamp='…'>` with the moderation
/// (who, why) of `announcement` (XEP-0425 §5, XEP-0424's tombstones).
pub fn tombstone(original: &Element, announcement: &Element, stamp: &str) -> Element {
    let mut t = Element::bare("message", ns::CLIENT);
    for attr in ["from", "type", "id"] {
        if let Some(v) = original.attr(attr) {
            stanza::set_attr(&mut t, attr, v);
        }
    }
    if let Some(author) = original.get_child("occupant-id", NS_OCCUPANT_ID) {
        t.append_child(author.clone());
    }
    let mut retracted = Element::bare("retracted", NS_RETRACT);
    stanza::set_attr(&mut retracted, "stamp", stamp);
    if let Some(retract) = announcement.get_child("retract", NS_RETRACT) {
        for c in retract.children() {
            retracted.append_child(c.clone());
        }
    }
    t.append_child(retracted);
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn el(xml: &str) -> Element {
        xml.parse().unwrap()
    }

    #[test]
    fn requests_are_parsed_and_bounded() {
        let ok = el(
            "<moderate xmlns='urn:xmpp:message-moderate:1' id='s1'><retract xmlns='urn:xmpp:message-retract:1'/><reason>spam</reason></moderate>",
        );
        assert_eq!(
            Moderation::parse(&ok),
            Ok(Moderation {
                id: "s1".into(),
                reason: Some("spam".into())
            })
        );
        let cases = [
            (
                "<moderate xmlns='urn:xmpp:message-moderate:1'><retract xmlns='urn:xmpp:message-retract:1'/></moderate>",
                StanzaErrorCondition::BadRequest,
            ),
            (
                "<moderate xmlns='urn:xmpp:message-moderate:1' id='s1'/>",
                StanzaErrorCondition::FeatureNotImplemented,
            ),
            (
                "<moderate xmlns='urn:xmpp:message-moderate:0' id='s1'><retract xmlns='urn:xmpp:message-retract:1'/></moderate>",
                StanzaErrorCondition::BadRequest,
            ),
        ];
        for (xml, condition) in cases {
            assert_eq!(Moderation::parse(&el(xml)), Err(condition), "{xml}");
        }
        let long = format!(
            "<moderate xmlns='urn:xmpp:message-moderate:1' id='s1'><retract xmlns='urn:xmpp:message-retract:1'/><reason>{}</reason></moderate>",
            "x".repeat(MAX_REASON_BYTES + 1)
        );
        assert_eq!(
            Moderation::parse(&el(&long)),
            Err(StanzaErrorCondition::NotAcceptable)
        );
    }
}
