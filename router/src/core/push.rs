//! Push notifications (XEP-0357) without I/O: what `enable` and `disable` ask, which
//! messages are worth waking a phone for, and the summary published to the app
//! server (XEP-0357 §7's `urn:xmpp:push:summary` form).

use jid::Jid;
use minidom::Element;

use crate::xml::{escape, ns};

/// Bytes of a node name, at most.
const MAX_NODE_BYTES: usize = 256;
/// Bytes of the publish-options form an `enable` may carry, serialized.
const MAX_OPTIONS_BYTES: usize = 4096;
/// Characters of a message body a summary carries, at most.
pub const MAX_BODY_CHARS: usize = 256;
/// The fields of the `enable` form with which a client asks for message bodies and
/// senders in its notifications; not passed on to the app server.
pub const INCLUDE_BODY: &str = "include-body";
pub const INCLUDE_SENDER: &str = "include-sender";

/// An `<enable/>`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enable {
    /// The app server (any JID).
    pub jid: String,
    pub node: String,
    /// The publish-options form to send with every notification (serialized), ''
    /// without one.
    pub options: String,
    /// Whether notifications may carry the last message's body, and its sender.
    pub include_body: bool,
    pub include_sender: bool,
}

/// A `<disable/>`: the app server, and one node of it or all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disable {
    pub jid: String,
    pub node: Option<String>,
}

/// Reads `<enable xmlns='urn:xmpp:push:0' jid= node=>[form]</enable>`.
pub fn parse_enable(enable: &Element) -> Result<Enable, &'static str> {
    let jid = app_jid(enable)?;
    let node = enable
        .attr("node")
        .filter(|n| !n.is_empty() && n.len() <= MAX_NODE_BYTES)
        .ok_or("enable needs a node of at most 256 bytes")?
        .to_owned();
    let (mut include_body, mut include_sender) = (false, false);
    let mut options = String::new();
    if let Some(form) = enable.get_child("x", ns::DATA_FORMS) {
        let yes = |field: &Element| {
            field
                .children()
                .filter(|v| v.is("value", ns::DATA_FORMS))
                .any(|v| matches!(v.text().trim(), "1" | "true"))
        };
        // Publish-options (XEP-0060 §7.1.5) always with their form type; none when
        // nothing is left for the app server.
        let mut kept = Element::builder("x", ns::DATA_FORMS)
            .attr(rxml::xml_ncname!("type").to_owned(), "submit")
            .append(
                Element::builder("field", ns::DATA_FORMS)
                    .attr(rxml::xml_ncname!("var").to_owned(), "FORM_TYPE")
                    .attr(rxml::xml_ncname!("type").to_owned(), "hidden")
                    .append(
                        Element::builder("value", ns::DATA_FORMS)
                            .append(ns::PUBSUB_PUBLISH_OPTIONS)
                            .build(),
                    )
                    .build(),
            )
            .build();
        let mut fields = 0;
        for field in form.children().filter(|f| f.is("field", ns::DATA_FORMS)) {
            match field.attr("var") {
                Some(INCLUDE_BODY) => include_body = yes(field),
                Some(INCLUDE_SENDER) => include_sender = yes(field),
                Some("FORM_TYPE") => {}
                _ => {
                    kept.append_child(field.clone());
                    fields += 1;
                }
            }
        }
        if fields > 0 {
            options = String::from(&kept);
        }
        if options.len() > MAX_OPTIONS_BYTES {
            return Err("the enable form is larger than 4096 bytes");
        }
    }
    Ok(Enable {
        jid,
        node,
        options,
        include_body,
        include_sender,
    })
}

/// Reads `<disable xmlns='urn:xmpp:push:0' jid= [node=]/>`.
pub fn parse_disable(disable: &Element) -> Result<Disable, &'static str> {
    Ok(Disable {
        jid: app_jid(disable)?,
        node: disable
            .attr("node")
            .filter(|n| !n.is_empty())
            .map(str::to_owned),
    })
}

fn app_jid(el: &Element) -> Result<String, &'static str> {
    el.attr("jid")
        .and_then(|j| Jid::new(j).ok())
        .map(|j| j.to_string())
        .ok_or("a valid app server jid is required")
}

/// What a notification says about the messages waiting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub count: u32,
    /// The last message's sender (bare JID), when the registration allows it.
    pub sender: Option<String>,
    /// The last message's body, when the registration allows it.
    pub body: Option<String>,
}

/// XEP-0249's namespace: an invitation to a room sent by a user.
const DIRECT_INVITE: &str = "jabber:x:conference";

/// Whether a message should wake the client (XEP-0357 leaves the choice to the
/// server): one with a body, an end-to-end encrypted one (OMEMO puts no body in some
/// clients' messages), an invitation to a room (XEP-0249 or XEP-0045's mediated one),
/// also from a room the client is in (`groupchat`: its session would get every
/// message, as Prosody's `mod_cloud_notify` has it). Not an error, a headline, or a
/// room's subject (the last stanza of entering, or a change of topic).
pub fn worth_a_push(message: &Element) -> bool {
    if !message.is("message", ns::CLIENT) {
        return false;
    }
    match message.attr("type") {
        Some("error" | "headline") => return false,
        Some("groupchat") if message.get_child("subject", ns::CLIENT).is_some() => return false,
        _ => {}
    }
    message.get_child("body", ns::CLIENT).is_some()
        || message.get_child("encrypted", ns::OMEMO).is_some()
        || message.get_child("x", DIRECT_INVITE).is_some()
        || message
            .get_child("x", crate::core::muc::NS_USER)
            .is_some_and(|x| x.get_child("invite", crate::core::muc::NS_USER).is_some())
}

/// The summary of `message`, the `count`th waiting.
pub fn summary(message: &Element, count: u32, include_sender: bool, include_body: bool) -> Summary {
    let sender = message
        .attr("from")
        .and_then(|f| Jid::new(f).ok())
        .map(|j| j.to_bare().to_string())
        .filter(|_| include_sender);
    let body = include_body
        .then(|| message.get_child("body", ns::CLIENT).map(|b| b.text()))
        .flatten()
        .map(|b| b.chars().take(MAX_BODY_CHARS).collect());
    Summary {
        count,
        sender,
        body,
    }
}

/// The publish (XEP-0357 §7) from `owner` (bare JID) to the app server, with the
/// registration's publish-options.
pub fn publish_xml(
    id: &str,
    owner: &str,
    app: &str,
    node: &str,
    options: &str,
    s: &Summary,
) -> String {
    let mut fields = format!(
        "<field var='FORM_TYPE'><value>urn:xmpp:push:summary</value></field><field var='message-count'><value>{}</value></field>",
        s.count
    );
    if let Some(sender) = &s.sender {
        fields.push_str(&format!(
            "<field var='last-message-sender'><value>{}</value></field>",
            escape(sender)
        ));
    }
    if let Some(body) = &s.body {
        fields.push_str(&format!(
            "<field var='last-message-body'><value>{}</value></field>",
            escape(body)
        ));
    }
    let options = if options.is_empty() {
        String::new()
    } else {
        format!("<publish-options>{options}</publish-options>")
    };
    format!(
        "<iq xmlns='{client}' type='set' id='{}' from='{}' to='{}'><pubsub xmlns='{}'><publish node='{}'><item><notification xmlns='{}'><x xmlns='{}' type='submit'>{fields}</x></notification></item></publish>{options}</pubsub></iq>",
        escape(id),
        escape(owner),
        escape(app),
        ns::PUBSUB,
        escape(node),
        ns::PUSH,
        ns::DATA_FORMS,
        client = ns::CLIENT,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn el(xml: &str) -> Element {
        xml.parse().unwrap()
    }

    #[test]
    fn enable_keeps_the_form_but_the_body_switch() {
        let e = parse_enable(&el(
            "<enable xmlns='urn:xmpp:push:0' jid='push.example.net' node='yxs32uqsflafdk3iuqo'>\
             <x xmlns='jabber:x:data' type='submit'>\
             <field var='FORM_TYPE'><value>http://jabber.org/protocol/pubsub#publish-options</value></field>\
             <field var='secret'><value>eruio234vzxc2kla-91</value></field>\
             <field var='include-body'><value>true</value></field></x></enable>",
        ))
        .unwrap();
        assert_eq!(e.jid, "push.example.net");
        assert_eq!(e.node, "yxs32uqsflafdk3iuqo");
        assert!(e.include_body && !e.include_sender);
        assert!(e.options.contains("eruio234vzxc2kla-91"));
        assert!(e.options.contains("pubsub#publish-options"));
        assert!(!e.options.contains("include-body"));
        // Only the switches: nothing for the app server.
        let switches = parse_enable(&el(
            "<enable xmlns='urn:xmpp:push:0' jid='a@b/c' node='n'><x xmlns='jabber:x:data' type='submit'>\
             <field var='include-sender'><value>1</value></field></x></enable>",
        ))
        .unwrap();
        assert!(switches.include_sender && switches.options.is_empty());
        let plain = parse_enable(&el(
            "<enable xmlns='urn:xmpp:push:0' jid='a@b/c' node='n'/>",
        ))
        .unwrap();
        assert_eq!((plain.options.as_str(), plain.include_body), ("", false));
        for bad in [
            "<enable xmlns='urn:xmpp:push:0' node='n'/>",
            "<enable xmlns='urn:xmpp:push:0' jid='@@' node='n'/>",
            "<enable xmlns='urn:xmpp:push:0' jid='a.b'/>",
            "<enable xmlns='urn:xmpp:push:0' jid='a.b' node=''/>",
        ] {
            assert!(parse_enable(&el(bad)).is_err(), "{bad}");
        }
        let big = format!(
            "<enable xmlns='urn:xmpp:push:0' jid='a.b' node='n'><x xmlns='jabber:x:data' type='submit'><field var='secret'><value>{}</value></field></x></enable>",
            "s".repeat(5000)
        );
        assert!(parse_enable(&el(&big)).is_err());
        let d = parse_disable(&el("<disable xmlns='urn:xmpp:push:0' jid='a.b'/>")).unwrap();
        assert_eq!((d.jid.as_str(), d.node), ("a.b", None));
    }

    #[test]
    fn only_messages_a_person_reads_wake_the_phone() {
        let yes = [
            "<message xmlns='jabber:client' type='chat'><body>hi</body></message>",
            "<message xmlns='jabber:client'><body>hi</body></message>",
            "<message xmlns='jabber:client' type='chat'><encrypted xmlns='eu.siacs.conversations.axolotl'/></message>",
            // A room's message, and invitations to rooms.
            "<message xmlns='jabber:client' from='r@muc.d/a' type='groupchat'><body>hi</body></message>",
            "<message xmlns='jabber:client' from='a@d/1'><x xmlns='jabber:x:conference' jid='r@muc.d'/></message>",
            "<message xmlns='jabber:client' from='r@muc.d'><x xmlns='http://jabber.org/protocol/muc#user'><invite from='a@d'/></x></message>",
        ];
        let no = [
            "<message xmlns='jabber:client' type='chat'><active xmlns='http://jabber.org/protocol/chatstates'/></message>",
            "<message xmlns='jabber:client' from='r@muc.d/a' type='groupchat'><composing xmlns='http://jabber.org/protocol/chatstates'/></message>",
            "<message xmlns='jabber:client' from='r@muc.d' type='groupchat'><subject>topic</subject></message>",
            "<message xmlns='jabber:client' from='r@muc.d/a' type='groupchat'><subject>topic</subject><body>a: set the topic</body></message>",
            "<message xmlns='jabber:client' from='r@muc.d'><x xmlns='http://jabber.org/protocol/muc#user'><status code='104'/></x></message>",
            "<message xmlns='jabber:client' type='error'><body>hi</body></message>",
            "<message xmlns='jabber:client' type='headline'><body>hi</body></message>",
            "<presence xmlns='jabber:client'/>",
        ];
        for m in yes {
            assert!(worth_a_push(&el(m)), "{m}");
        }
        for m in no {
            assert!(!worth_a_push(&el(m)), "{m}");
        }
    }

    #[test]
    fn the_summary_carries_a_body_only_when_allowed() {
        let m = el(
            "<message xmlns='jabber:client' from='carol@example.org/phone' type='chat'><body>secret &amp; plans</body></message>",
        );
        let s = summary(&m, 3, false, false);
        assert_eq!((s.count, s.sender.clone(), s.body.clone()), (3, None, None));
        let with = summary(&m, 3, true, true);
        assert_eq!(with.sender.as_deref(), Some("carol@example.org"));
        assert_eq!(with.body.as_deref(), Some("secret & plans"));
        let xml = publish_xml(
            "p1",
            "alice@example.org",
            "push@example.org/app",
            "n<1",
            "<x xmlns='jabber:x:data' type='submit'/>",
            &with,
        );
        let iq = el(&xml);
        assert_eq!(iq.attr("to"), Some("push@example.org/app"));
        assert_eq!(iq.attr("from"), Some("alice@example.org"));
        let pubsub = iq.get_child("pubsub", ns::PUBSUB).unwrap();
        assert_eq!(
            pubsub
                .get_child("publish", ns::PUBSUB)
                .unwrap()
                .attr("node"),
            Some("n<1")
        );
        assert!(pubsub.get_child("publish-options", ns::PUBSUB).is_some());
        assert!(xml.contains("<value>secret &amp; plans</value>"));
        assert!(xml.contains("<field var='message-count'><value>3</value>"));
        let long = el(&format!(
            "<message xmlns='jabber:client'><body>{}</body></message>",
            "é".repeat(500)
        ));
        assert_eq!(
            summary(&long, 1, false, true).body.unwrap().chars().count(),
            MAX_BODY_CHARS
        );
    }
}
