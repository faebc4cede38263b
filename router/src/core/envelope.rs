//! The stanza envelope: what routing needs of a stanza (kind, type, from, to), parsed
//! once where the stanza enters (a client's stream, a router link) into typed values.
//! Handlers match on these instead of reading and comparing attribute strings again.

use jid::Jid;
use minidom::Element;

use super::delivery::MessageType;
use super::subscription;
pub use crate::stanza::Kind;

/// A presence's `type` (RFC 6121 §4.7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceType {
    /// No `type`: available.
    Available,
    Unavailable,
    /// `subscribe`, `subscribed`, `unsubscribe`, `unsubscribed` (RFC 6121 §3).
    Subscription(subscription::Kind),
    Probe,
    Error,
}

/// An IQ's `type` (RFC 6120 §8.2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IqType {
    Get,
    Set,
    Result,
    Error,
}

impl IqType {
    /// A request, which must be answered.
    pub fn is_request(self) -> bool {
        matches!(self, IqType::Get | IqType::Set)
    }
}

/// A stanza's `type`, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    Message(MessageType),
    Presence(PresenceType),
    Iq(IqType),
}

/// Why a stanza's envelope could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// Not a `jabber:client` message, presence or IQ.
    NotAStanza,
    /// A presence or IQ type RFC 6120/6121 do not define (`bad-request`).
    Type,
    /// `to` is not a JID (`jid-malformed`).
    To,
    /// `from` is not a JID.
    From,
}

/// What routing needs of a stanza.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub kind: Kind,
    pub ty: Type,
    pub from: Option<Jid>,
    pub to: Option<Jid>,
}

impl Envelope {
    /// Reads the envelope of `element`.
    pub fn parse(element: &Element) -> Result<Envelope, Malformed> {
        let kind = Kind::of(element).ok_or(Malformed::NotAStanza)?;
        let ty = element.attr("type");
        let ty = match kind {
            Kind::Message => Type::Message(MessageType::parse(ty)),
            Kind::Presence => Type::Presence(match ty {
                None => PresenceType::Available,
                Some("unavailable") => PresenceType::Unavailable,
                Some("probe") => PresenceType::Probe,
                Some("error") => PresenceType::Error,
                Some(other) => PresenceType::Subscription(
                    subscription::Kind::parse(other).ok_or(Malformed::Type)?,
                ),
            }),
            Kind::Iq => Type::Iq(match ty {
                Some("get") => IqType::Get,
                Some("set") => IqType::Set,
                Some("result") => IqType::Result,
                Some("error") => IqType::Error,
                _ => return Err(Malformed::Type),
            }),
        };
        let jid = |name, malformed| match element.attr(name) {
            None => Ok(None),
            Some(s) => Jid::new(s).map(Some).map_err(|_| malformed),
        };
        Ok(Envelope {
            kind,
            ty,
            to: jid("to", Malformed::To)?,
            from: jid("from", Malformed::From)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(xml: &str) -> Result<Envelope, Malformed> {
        let element: Element = xml.parse().unwrap();
        Envelope::parse(&element)
    }

    const C: &str = "xmlns='jabber:client'";

    #[test]
    fn every_type_of_every_kind() {
        let cases = [
            ("message", None, Type::Message(MessageType::Normal)),
            ("message", Some("chat"), Type::Message(MessageType::Chat)),
            ("message", Some("bogus"), Type::Message(MessageType::Normal)),
            ("presence", None, Type::Presence(PresenceType::Available)),
            (
                "presence",
                Some("unavailable"),
                Type::Presence(PresenceType::Unavailable),
            ),
            (
                "presence",
                Some("probe"),
                Type::Presence(PresenceType::Probe),
            ),
            (
                "presence",
                Some("error"),
                Type::Presence(PresenceType::Error),
            ),
            (
                "presence",
                Some("subscribed"),
                Type::Presence(PresenceType::Subscription(subscription::Kind::Subscribed)),
            ),
            ("iq", Some("get"), Type::Iq(IqType::Get)),
            ("iq", Some("set"), Type::Iq(IqType::Set)),
            ("iq", Some("result"), Type::Iq(IqType::Result)),
            ("iq", Some("error"), Type::Iq(IqType::Error)),
        ];
        for (name, ty, want) in cases {
            let attr = ty.map(|t| format!(" type='{t}'")).unwrap_or_default();
            let env = parse(&format!("<{name} {C}{attr}/>")).unwrap();
            assert_eq!(env.ty, want, "{name} {ty:?}");
        }
    }

    #[test]
    fn undefined_types_and_bad_jids_are_refused() {
        assert_eq!(parse(&format!("<iq {C}/>")), Err(Malformed::Type));
        assert_eq!(
            parse(&format!("<iq {C} type='push'/>")),
            Err(Malformed::Type)
        );
        assert_eq!(
            parse(&format!("<presence {C} type='available'/>")),
            Err(Malformed::Type)
        );
        assert_eq!(
            parse(&format!("<message {C} to='a@b@c'/>")),
            Err(Malformed::To)
        );
        assert_eq!(
            parse(&format!("<message {C} from='@x'/>")),
            Err(Malformed::From)
        );
        assert_eq!(
            parse("<message xmlns='jabber:server'/>"),
            Err(Malformed::NotAStanza)
        );
        assert_eq!(parse(&format!("<foo {C}/>")), Err(Malformed::NotAStanza));
    }

    #[test]
    fn jids_are_typed() {
        let env = parse(&format!(
            "<message {C} from='alice@example.org/phone' to='Bob@Example.org'/>"
        ))
        .unwrap();
        assert_eq!(env.kind, Kind::Message);
        assert_eq!(
            env.from
                .unwrap()
                .resource()
                .map(|r| r.to_string())
                .as_deref(),
            Some("phone")
        );
        // Normalised on the way in (RFC 7622): one comparison for every path.
        assert_eq!(env.to.unwrap().to_string(), "bob@example.org");
    }
}
