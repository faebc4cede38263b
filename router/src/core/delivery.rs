//! Which of an account's resources get a message: RFC 6121 §8.5, without I/O.
//!
//! The caller has already found that the account's sessions are on this node (see
//! [`super::route`]); this decides among them by the message's type, the resource in
//! its `to`, and each session's presence and priority. The rules:
//!
//! | to | type | a resource matches / some are available | nobody to take it |
//! |---|---|---|---|
//! | full JID, resource online | any | that session, whatever its presence (§8.5.3.1) | — |
//! | bare JID, or a resource not online | `normal`, `chat` | the available resources with the highest non-negative priority (§8.5.2.1.1) | offline storage (§8.5.2.2.1) |
//! | | `headline` | every available resource with a non-negative priority | ignored |
//! | | `groupchat` | `service-unavailable` (§8.5.2.1.1, §8.5.3.2.1) | `service-unavailable` |
//! | | `error` | ignored | ignored |
//!
//! A type this server does not know is `normal` (RFC 6121 §5.2.2). Chat messages
//! delivered to some resources are copied to the others by carbons (XEP-0280 §5); the
//! decision says when.

use crate::error::StanzaErrorCondition;

/// A message's `type` (RFC 6121 §5.2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    Normal,
    Chat,
    Groupchat,
    Headline,
    Error,
}

impl MessageType {
    /// The `type` attribute; absent or unknown is `normal`.
    pub fn parse(ty: Option<&str>) -> MessageType {
        match ty {
            Some("chat") => MessageType::Chat,
            Some("groupchat") => MessageType::Groupchat,
            Some("headline") => MessageType::Headline,
            Some("error") => MessageType::Error,
            _ => MessageType::Normal,
        }
    }
}

/// One session of the recipient, as delivery needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resource<'a> {
    pub id: u64,
    pub resource: &'a str,
    /// The session has sent available presence (and not unavailable since).
    pub available: bool,
    pub priority: i8,
}

/// What happens to the message.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Delivery {
    /// To these sessions; `carbons`: the recipient's other resources get a copy.
    Sessions { ids: Vec<u64>, carbons: bool },
    /// Kept in offline storage for the account's next login.
    Offline,
    /// Dropped without an answer, as the RFC says for this type.
    Ignore,
    /// Refused: the sender gets this error.
    Bounce(StanzaErrorCondition),
}

/// The decision for a message of type `ty` to `user[/resource]`, among `sessions`.
pub fn message(ty: MessageType, resource: Option<&str>, sessions: &[Resource<'_>]) -> Delivery {
    let carbons = ty == MessageType::Chat;
    // §8.5.3.1: a full JID whose resource is online gets it, whatever its presence.
    if let Some(resource) = resource
        && let Some(s) = sessions.iter().find(|s| s.resource == resource)
    {
        return Delivery::Sessions {
            ids: vec![s.id],
            carbons,
        };
    }
    // A headline for a resource that is gone is dropped (RFC 6121 §8.5.3.2.1 allows it,
    // and ejabberd does so): a notification meant for one client's interests must not
    // reach the others.
    if resource.is_some() && ty == MessageType::Headline {
        return Delivery::Ignore;
    }
    // Bare JID, or a resource that is not online (§8.5.3.2.1: treated as bare for
    // normal and chat).
    let available = || sessions.iter().filter(|s| s.available && s.priority >= 0);
    let ids: Vec<u64> = match ty {
        MessageType::Groupchat => {
            return Delivery::Bounce(StanzaErrorCondition::ServiceUnavailable);
        }
        MessageType::Error => return Delivery::Ignore,
        MessageType::Headline => available().map(|s| s.id).collect(),
        MessageType::Normal | MessageType::Chat => {
            let top = available().map(|s| s.priority).max();
            available()
                .filter(|s| Some(s.priority) == top)
                .map(|s| s.id)
                .collect()
        }
    };
    if !ids.is_empty() {
        return Delivery::Sessions { ids, carbons };
    }
    // §8.5.2.2: nobody available.
    match ty {
        MessageType::Normal | MessageType::Chat => Delivery::Offline,
        _ => Delivery::Ignore,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(id: u64, resource: &str, available: bool, priority: i8) -> Resource<'_> {
        Resource {
            id,
            resource,
            available,
            priority,
        }
    }

    fn to(ids: &[u64], carbons: bool) -> Delivery {
        Delivery::Sessions {
            ids: ids.to_vec(),
            carbons,
        }
    }

    use MessageType::*;

    #[test]
    fn types_parse_with_the_rfc_default() {
        assert_eq!(MessageType::parse(None), Normal);
        assert_eq!(MessageType::parse(Some("bogus")), Normal);
        assert_eq!(MessageType::parse(Some("chat")), Chat);
        assert_eq!(MessageType::parse(Some("groupchat")), Groupchat);
        assert_eq!(MessageType::parse(Some("headline")), Headline);
        assert_eq!(MessageType::parse(Some("error")), Error);
    }

    #[test]
    fn bare_jid_goes_to_the_highest_non_negative_priority() {
        let s = [
            r(1, "phone", true, 5),
            r(2, "laptop", true, 10),
            r(3, "desk", true, 10),
            r(4, "bot", true, -1),
            r(5, "idle", false, 50),
        ];
        assert_eq!(message(Chat, None, &s), to(&[2, 3], true));
        assert_eq!(message(Normal, None, &s), to(&[2, 3], false));
        // Headlines go to every available non-negative resource.
        assert_eq!(message(Headline, None, &s), to(&[1, 2, 3], false));
        assert_eq!(
            message(Groupchat, None, &s),
            Delivery::Bounce(StanzaErrorCondition::ServiceUnavailable)
        );
        assert_eq!(message(Error, None, &s), Delivery::Ignore);
    }

    #[test]
    fn a_full_jid_online_gets_it_whatever_its_presence() {
        let s = [
            r(1, "phone", true, 5),
            r(2, "bot", true, -1),
            r(3, "new", false, 0),
        ];
        for ty in [Normal, Chat, Groupchat, Headline, Error] {
            assert_eq!(message(ty, Some("bot"), &s), to(&[2], ty == Chat), "{ty:?}");
            assert_eq!(message(ty, Some("new"), &s), to(&[3], ty == Chat), "{ty:?}");
        }
    }

    #[test]
    fn an_unknown_resource_is_treated_as_the_bare_jid() {
        let s = [r(1, "phone", true, 5)];
        assert_eq!(message(Chat, Some("gone"), &s), to(&[1], true));
        // Except a headline: it was meant for that resource only.
        assert_eq!(message(Headline, Some("gone"), &s), Delivery::Ignore);
        assert_eq!(
            message(Groupchat, Some("gone"), &s),
            Delivery::Bounce(StanzaErrorCondition::ServiceUnavailable)
        );
        assert_eq!(message(Error, Some("gone"), &s), Delivery::Ignore);
    }

    #[test]
    fn nobody_available_stores_chat_and_normal_and_drops_the_rest() {
        // Only negative priorities or unavailable sessions count as nobody (§8.5.2.2).
        for s in [
            vec![],
            vec![r(1, "bot", true, -5)],
            vec![r(2, "new", false, 10)],
        ] {
            assert_eq!(message(Chat, None, &s), Delivery::Offline);
            assert_eq!(message(Normal, Some("gone"), &s), Delivery::Offline);
            assert_eq!(message(Headline, None, &s), Delivery::Ignore);
            assert_eq!(message(Error, None, &s), Delivery::Ignore);
            assert_eq!(
                message(Groupchat, None, &s),
                Delivery::Bounce(StanzaErrorCondition::ServiceUnavailable)
            );
        }
    }
}
