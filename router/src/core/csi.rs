//! XEP-0352 client state indication as a decision without I/O: while a client says it
//! is inactive (a phone in a pocket), stanzas that only change what it would show wait
//! instead of waking it — presence updates and chat states, each collapsed to the
//! latest per contact — and everything else goes out at once, after what waited, so
//! the client sees them in the order they happened.
//!
//! What waits:
//! - available and unavailable presence (a contact's status, or another resource's of
//!   the same user, or an occupant's of a chat room). Subscription requests, probes
//!   and errors go out at once, and so does a room's presence about the client's own
//!   seat (XEP-0045 status 110: entered, renamed, kicked, cut off) or the room's end.
//! - messages that carry only chat states (XEP-0085), with at most a thread, processing
//!   hints, stanza ids and occupant ids beside them, also as carbon copies (XEP-0280),
//!   and also in a room (`groupchat`: the latest per occupant).
//!
//! A message with a body (a room's too, as Prosody's `mod_csi_simple` does), a room's
//! subject, a receipt, an IQ, anything not recognised goes out at once,
//! with everything held before it. (Answers to the client's own requests and stored
//! offline messages do not pass through here: they go out at once, as always.) What
//! is held is not counted by stream management (it has not been sent); a session that
//! ends while inactive drops it: it was presence and chat states, which are current
//! only while the session lives.

use std::sync::Arc;

use minidom::Element;

use crate::xml::ns;

/// XEP-0352's namespace.
pub const NS: &str = "urn:xmpp:csi:0";

/// XEP-0085's namespace.
const CHATSTATES: &str = "http://jabber.org/protocol/chatstates";
/// XEP-0359's namespace (origin and stanza ids, which clients add to everything).
const SID: &str = "urn:xmpp:sid:0";
/// XEP-0421's namespace (the occupant id a room adds to what an occupant sends).
const OCCUPANT_ID: &str = crate::core::muc::NS_OCCUPANT_ID;
/// XEP-0045's namespace of what a room tells its occupants.
const MUC_USER: &str = crate::core::muc::NS_USER;

/// Stanzas held at most (distinct contacts with something new); one more flushes them.
pub const MAX_HELD: usize = 256;
/// Bytes held at most (stanzas and their keys); one that would pass it flushes them.
pub const MAX_HELD_BYTES: usize = 256 * 1024;

/// What a stanza is to an inactive client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Class {
    /// Goes out at once, with everything held before it.
    Urgent,
    /// Can wait; a later stanza with the same key replaces it.
    Deferrable(Key),
}

/// What a held stanza stands for: the latest of its kind replaces earlier ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// The presence of this full JID.
    Presence(String),
    /// The chat state of the conversation (from, to) (for carbons, of the copied
    /// message).
    ChatState(String, String),
}

impl Key {
    /// The bytes it holds.
    fn len(&self) -> usize {
        match self {
            Key::Presence(from) => from.len(),
            Key::ChatState(from, to) => from.len() + to.len(),
        }
    }
}

/// Classifies a stanza as serialized for the client (with its `jabber:client`
/// namespace declared, as the router writes them). Unparseable: urgent.
pub fn classify(xml: &str) -> Class {
    // Without parsing, what is sure to be urgent: an IQ, and anything with an element
    // named `body` (a `<` stands unescaped only at a tag, never in text or attributes).
    if xml.starts_with("<iq") || xml.contains("<body") {
        return Class::Urgent;
    }
    match xml.parse::<Element>() {
        Ok(stanza) => classify_element(&stanza),
        Err(_) => Class::Urgent,
    }
}

fn classify_element(stanza: &Element) -> Class {
    if stanza.ns() != ns::CLIENT {
        return Class::Urgent;
    }
    let from = || stanza.attr("from").unwrap_or_default().to_owned();
    match stanza.name() {
        "presence" => match stanza.attr("type") {
            None | Some("unavailable") if !own_seat(stanza) => {
                Class::Deferrable(Key::Presence(from()))
            }
            _ => Class::Urgent,
        },
        "message" => {
            if let Some(copied) = carbon_copy(stanza) {
                return match chat_state_only(copied) {
                    true => Class::Deferrable(conversation(copied)),
                    false => Class::Urgent,
                };
            }
            match chat_state_only(stanza) {
                true => Class::Deferrable(conversation(stanza)),
                false => Class::Urgent,
            }
        }
        _ => Class::Urgent,
    }
}

fn conversation(message: &Element) -> Key {
    Key::ChatState(
        message.attr("from").unwrap_or_default().to_owned(),
        message.attr("to").unwrap_or_default().to_owned(),
    )
}

/// The message a carbon copy carries (`<sent/>` or `<received/>` as the only child).
fn carbon_copy(message: &Element) -> Option<&Element> {
    let mut children = message.children();
    let wrapper = children.next()?;
    if children.next().is_some()
        || wrapper.ns() != ns::CARBONS
        || !matches!(wrapper.name(), "sent" | "received")
    {
        return None;
    }
    let forwarded = wrapper.get_child("forwarded", ns::FORWARD)?;
    forwarded.get_child("message", ns::CLIENT)
}

/// A room's presence about the client's own seat (XEP-0045 status code 110), or
/// the room's end (`<destroy/>`, sent without 110).
fn own_seat(presence: &Element) -> bool {
    presence.get_child("x", MUC_USER).is_some_and(|x| {
        x.children().any(|c| {
            c.is("destroy", MUC_USER) || (c.is("status", MUC_USER) && c.attr("code") == Some("110"))
        })
    })
}

/// A chat state and nothing that matters beside it (in a room too).
fn chat_state_only(message: &Element) -> bool {
    if message.attr("type") == Some("error") {
        return false;
    }
    let mut states = 0;
    for child in message.children() {
        match (child.ns().as_str(), child.name()) {
            (CHATSTATES, _) => states += 1,
            (ns::CLIENT, "thread") | (ns::HINTS, _) | (SID, _) | (OCCUPANT_ID, _) => {}
            _ => return false,
        }
    }
    states > 0
}

/// The stanzas an inactive client has not been sent yet, oldest first.
#[derive(Debug, Default)]
pub struct Held {
    stanzas: Vec<(Key, Arc<str>)>,
    bytes: usize,
}

/// What to write now.
#[derive(Debug, PartialEq, Eq)]
pub enum Offer {
    /// Nothing: the stanza waits.
    Held,
    /// These, in this order (what waited, then the stanza).
    Send(Vec<Arc<str>>),
}

impl Held {
    /// A stanza for the inactive client.
    pub fn offer(&mut self, stanza: Arc<str>) -> Offer {
        match classify(&stanza) {
            Class::Deferrable(key) => {
                if let Some(at) = self.stanzas.iter().position(|(k, _)| *k == key) {
                    // The latest only, where it came: after what came in between.
                    let (old_key, old) = self.stanzas.remove(at);
                    self.bytes -= old_key.len() + old.len();
                }
                let cost = key.len() + stanza.len();
                if self.stanzas.len() == MAX_HELD || self.bytes + cost > MAX_HELD_BYTES {
                    let mut out = self.take();
                    out.push(stanza);
                    return Offer::Send(out);
                }
                self.bytes += cost;
                self.stanzas.push((key, stanza));
                Offer::Held
            }
            Class::Urgent => {
                let mut out = self.take();
                out.push(stanza);
                Offer::Send(out)
            }
        }
    }

    /// Everything held, oldest first (the client became active, or must see it now).
    pub fn take(&mut self) -> Vec<Arc<str>> {
        self.bytes = 0;
        std::mem::take(&mut self.stanzas)
            .into_iter()
            .map(|(_, s)| s)
            .collect()
    }

    pub fn len(&self) -> usize {
        self.stanzas.len()
    }

    pub fn is_empty(&self) -> bool {
        self.stanzas.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stanza as the router writes it: `jabber:client` declared on the root.
    fn xml(s: &str) -> Arc<str> {
        let name = s[1..].split([' ', '/', '>']).next().unwrap();
        format!("<{name} xmlns='jabber:client'{}", &s[1 + name.len()..]).into()
    }

    fn presence(from: &str, show: &str) -> Arc<str> {
        xml(&format!(
            "<presence from='{from}' to='me@d/r'><show>{show}</show></presence>"
        ))
    }

    fn state(from: &str, state: &str) -> Arc<str> {
        xml(&format!(
            "<message from='{from}' to='me@d/r' type='chat'><{state} xmlns='{CHATSTATES}'/></message>"
        ))
    }

    fn body(from: &str) -> Arc<str> {
        xml(&format!(
            "<message from='{from}' to='me@d/r' type='chat'><body>hi</body><active xmlns='{CHATSTATES}'/></message>"
        ))
    }

    #[test]
    fn what_can_wait_and_what_cannot() {
        assert!(matches!(
            classify(&presence("a@d/1", "away")),
            Class::Deferrable(Key::Presence(f)) if f == "a@d/1"
        ));
        assert!(matches!(
            classify(&xml("<presence from='a@d/1' type='unavailable'/>")),
            Class::Deferrable(_)
        ));
        for urgent in [
            "<presence from='a@d' type='subscribe'/>",
            "<presence from='a@d' type='error'/>",
            "<iq from='a@d/1' type='get' id='1'><ping xmlns='urn:xmpp:ping'/></iq>",
            "<message from='a@d/1' type='chat'><received xmlns='urn:xmpp:receipts' id='x'/></message>",
            "<message from='a@d/1' type='error'><composing xmlns='http://jabber.org/protocol/chatstates'/></message>",
            "<message from='a@d/1'/>",
            // A room: a message, its subject, an invitation, the client's own seat.
            "<message from='r@muc.d/a' type='groupchat'><body>hi</body></message>",
            "<message from='r@muc.d' type='groupchat'><subject>s</subject></message>",
            "<message from='r@muc.d'><x xmlns='http://jabber.org/protocol/muc#user'><invite from='a@d'/></x></message>",
            "<presence from='r@muc.d/me'><x xmlns='http://jabber.org/protocol/muc#user'><item affiliation='none' role='participant'/><status code='110'/></x></presence>",
            "<presence from='r@muc.d/me' type='unavailable'><x xmlns='http://jabber.org/protocol/muc#user'><item affiliation='none' role='none'/><status code='307'/><status code='110'/></x></presence>",
            "<presence from='r@muc.d/me' type='unavailable'><x xmlns='http://jabber.org/protocol/muc#user'><item affiliation='none' role='none'/><destroy jid='s@muc.d'/></x></presence>",
        ] {
            assert_eq!(classify(&xml(urgent)), Class::Urgent, "{urgent}");
        }
        assert_eq!(classify(&body("a@d/1")), Class::Urgent);
        assert_eq!(classify("not xml"), Class::Urgent);
        // A chat state with a thread, a hint and an origin id beside it still waits.
        assert!(matches!(
            classify(&xml(&format!(
                "<message from='a@d/1' type='chat'><thread>t</thread><paused xmlns='{CHATSTATES}'/><no-store xmlns='urn:xmpp:hints'/><origin-id xmlns='{SID}' id='x'/></message>"
            ))),
            Class::Deferrable(Key::ChatState(..))
        ));
        // Another occupant of a room, and its chat state, the latest per occupant.
        assert!(matches!(
            classify(&xml("<presence from='r@muc.d/a'><x xmlns='http://jabber.org/protocol/muc#user'><item affiliation='none' role='participant'/></x></presence>")),
            Class::Deferrable(Key::Presence(f)) if f == "r@muc.d/a"
        ));
        assert!(matches!(
            classify(&xml(&format!(
                "<message from='r@muc.d/a' to='me@d/r' type='groupchat'><composing xmlns='{CHATSTATES}'/><occupant-id xmlns='urn:xmpp:occupant-id:0' id='x'/><stanza-id xmlns='{SID}' id='1' by='r@muc.d'/></message>"
            ))),
            Class::Deferrable(Key::ChatState(f, _)) if f == "r@muc.d/a"
        ));
        // An end-to-end encrypted message without a fallback body does not.
        assert_eq!(
            classify(&xml(&format!(
                "<message from='a@d/1' type='chat'><encrypted xmlns='eu.siacs.conversations.axolotl'/><active xmlns='{CHATSTATES}'/></message>"
            ))),
            Class::Urgent
        );
    }

    #[test]
    fn carbon_copies_of_chat_states_wait_per_conversation() {
        let carbon = |to: &str, inner: &str| {
            xml(&format!(
                "<message from='me@d' to='me@d/r'><sent xmlns='urn:xmpp:carbons:2'><forwarded xmlns='urn:xmpp:forward:0'><message xmlns='jabber:client' from='me@d/other' to='{to}' type='chat'>{inner}</message></forwarded></sent></message>"
            ))
        };
        let to_a = classify(&carbon(
            "a@d",
            &format!("<composing xmlns='{CHATSTATES}'/>"),
        ));
        let to_b = classify(&carbon(
            "b@d",
            &format!("<composing xmlns='{CHATSTATES}'/>"),
        ));
        assert!(matches!(to_a, Class::Deferrable(Key::ChatState(_, ref to)) if to == "a@d"));
        assert_ne!(to_a, to_b);
        assert_eq!(
            classify(&carbon("a@d", "<body>hello</body>")),
            Class::Urgent
        );
    }

    #[test]
    fn the_latest_presence_per_contact_waits_and_goes_out_before_a_message() {
        let mut held = Held::default();
        assert_eq!(held.offer(presence("a@d/1", "away")), Offer::Held);
        assert_eq!(held.offer(presence("b@d/1", "dnd")), Offer::Held);
        assert_eq!(held.offer(state("c@d/1", "composing")), Offer::Held);
        let latest_a = presence("a@d/1", "xa");
        assert_eq!(held.offer(latest_a.clone()), Offer::Held);
        assert_eq!(held.offer(state("c@d/1", "paused")), Offer::Held);
        assert_eq!(held.len(), 3);
        let message = body("c@d/1");
        let Offer::Send(out) = held.offer(message.clone()) else {
            panic!("a message with a body goes out at once");
        };
        // b's presence, then a's latest, then c's latest chat state, then the message.
        assert_eq!(
            out,
            [
                presence("b@d/1", "dnd"),
                latest_a,
                state("c@d/1", "paused"),
                message
            ]
        );
        assert!(held.is_empty());
    }

    #[test]
    fn a_full_hold_goes_out_rather_than_grow() {
        let mut held = Held::default();
        for n in 0..MAX_HELD {
            assert_eq!(
                held.offer(presence(&format!("u{n}@d/r"), "away")),
                Offer::Held
            );
        }
        // The same contact again replaces; it does not grow.
        assert_eq!(held.offer(presence("u0@d/r", "xa")), Offer::Held);
        assert_eq!(held.len(), MAX_HELD);
        let Offer::Send(out) = held.offer(presence("new@d/r", "away")) else {
            panic!("one more contact than the hold takes flushes it");
        };
        assert_eq!(out.len(), MAX_HELD + 1);
        assert!(held.is_empty());

        // By bytes: a few large presences flush before the count is reached.
        let big = |n: usize| {
            xml(&format!(
                "<presence from='u{n}@d/r'><status>{}</status></presence>",
                "x".repeat(100 * 1024)
            ))
        };
        assert_eq!(held.offer(big(0)), Offer::Held);
        assert_eq!(held.offer(big(1)), Offer::Held);
        // Replacing one frees its bytes.
        assert_eq!(held.offer(big(1)), Offer::Held);
        let Offer::Send(out) = held.offer(big(2)) else {
            panic!("a hold past its bytes flushes");
        };
        assert_eq!(out.len(), 3);
    }
}
