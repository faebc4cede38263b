//! Personal eventing (XEP-0163 over XEP-0060), without I/O: what a `<pubsub/>` request
//! asks, a node's configuration and the forms that set it (publish-options §7.1.5,
//! node configuration §8.2), who may see a node, and the notifications' XML. The
//! router's `pep` module does the store calls and the sending.

use minidom::Element;

use crate::error::StanzaErrorCondition;
use crate::xml::{escape, ns};

/// Who may retrieve a node's items and be notified of them, besides its owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone may retrieve; notifications go to contacts subscribed to the owner.
    Open,
    /// Contacts subscribed to the owner's presence (XEP-0163's default).
    Presence,
    /// The owner only (nobody else is ever added to the list).
    Whitelist,
}

impl Access {
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Open => "open",
            Access::Presence => "presence",
            Access::Whitelist => "whitelist",
        }
    }

    pub fn parse(s: &str) -> Option<Access> {
        match s {
            "open" => Some(Access::Open),
            "presence" => Some(Access::Presence),
            "whitelist" => Some(Access::Whitelist),
            _ => None,
        }
    }
}

/// When the last item goes to a contact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendLast {
    Never,
    OnSub,
    /// Also each time the contact comes online (XEP-0163's default).
    OnSubAndPresence,
}

impl SendLast {
    pub fn as_str(self) -> &'static str {
        match self {
            SendLast::Never => "never",
            SendLast::OnSub => "on_sub",
            SendLast::OnSubAndPresence => "on_sub_and_presence",
        }
    }

    pub fn parse(s: &str) -> Option<SendLast> {
        match s {
            "never" => Some(SendLast::Never),
            "on_sub" => Some(SendLast::OnSub),
            "on_sub_and_presence" => Some(SendLast::OnSubAndPresence),
            _ => None,
        }
    }
}

/// A node's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeConfig {
    pub access: Access,
    pub persist_items: bool,
    pub max_items: u32,
    pub send_last: SendLast,
    pub notify_retract: bool,
}

impl Default for NodeConfig {
    /// XEP-0163's defaults: presence access, the last item kept and sent.
    fn default() -> Self {
        NodeConfig {
            access: Access::Presence,
            persist_items: true,
            max_items: 1,
            send_last: SendLast::OnSubAndPresence,
            notify_retract: true,
        }
    }
}

/// One field of a publish-options or configuration form this service understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setting {
    Access(Access),
    PersistItems(bool),
    MaxItems(u32),
    SendLast(SendLast),
    NotifyRetract(bool),
    /// A field whose only supported value is the one given (notifications and
    /// payloads are always delivered, only the owner publishes).
    Fixed,
}

/// A form field this service cannot honour, for the error's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported(pub String);

fn boolean(v: &str) -> Option<bool> {
    match v {
        "1" | "true" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    }
}

/// The settings of a `jabber:x:data` form (publish-options or node configuration);
/// `max_items` above `limit` (or `max`) means `limit`.
pub fn settings(form: &Element, limit: u32) -> Result<Vec<Setting>, Unsupported> {
    let mut out = vec![];
    for field in form.children().filter(|f| f.is("field", ns::DATA_FORMS)) {
        let var = field.attr("var").unwrap_or_default();
        let value = field
            .get_child("value", ns::DATA_FORMS)
            .map(|v| v.text())
            .unwrap_or_default();
        let v = value.trim();
        let bad = || Unsupported(format!("{var} = {v}"));
        let setting = match var {
            "FORM_TYPE" => continue,
            "pubsub#access_model" => Setting::Access(Access::parse(v).ok_or_else(bad)?),
            "pubsub#persist_items" => Setting::PersistItems(boolean(v).ok_or_else(bad)?),
            "pubsub#max_items" if v == "max" => Setting::MaxItems(limit),
            "pubsub#max_items" => match v.parse::<u32>() {
                Ok(n) if n >= 1 => Setting::MaxItems(n.min(limit)),
                _ => return Err(bad()),
            },
            "pubsub#send_last_published_item" => {
                Setting::SendLast(SendLast::parse(v).ok_or_else(bad)?)
            }
            "pubsub#notify_retract" => Setting::NotifyRetract(boolean(v).ok_or_else(bad)?),
            "pubsub#deliver_notifications" | "pubsub#deliver_payloads" | "pubsub#notify_delete"
                if boolean(v) == Some(true) =>
            {
                Setting::Fixed
            }
            "pubsub#publish_model" if v == "publishers" => Setting::Fixed,
            _ => return Err(bad()),
        };
        out.push(setting);
    }
    Ok(out)
}

impl NodeConfig {
    pub fn apply(&mut self, settings: &[Setting]) {
        for s in settings {
            match *s {
                Setting::Access(a) => self.access = a,
                Setting::PersistItems(p) => self.persist_items = p,
                Setting::MaxItems(n) => self.max_items = n,
                Setting::SendLast(s) => self.send_last = s,
                Setting::NotifyRetract(n) => self.notify_retract = n,
                Setting::Fixed => {}
            }
        }
    }

    /// Whether the node already is as the publish-options ask (XEP-0060 §7.1.5).
    pub fn satisfies(&self, settings: &[Setting]) -> bool {
        let mut wanted = *self;
        wanted.apply(settings);
        wanted == *self
    }

    /// The node's configuration form (XEP-0060 §8.2), for the owner.
    pub fn form(&self, form_type: &str) -> String {
        let list = |var: &str, value: &str, options: &[&str]| {
            let opts: String = options
                .iter()
                .map(|o| format!("<option><value>{o}</value></option>"))
                .collect();
            format!("<field var='{var}' type='list-single'><value>{value}</value>{opts}</field>")
        };
        let boolean = |var: &str, value: bool| {
            format!(
                "<field var='{var}' type='boolean'><value>{}</value></field>",
                u8::from(value)
            )
        };
        format!(
            "<x xmlns='{}' type='{form_type}'><field var='FORM_TYPE' type='hidden'><value>{}</value></field>{}{}<field var='pubsub#max_items' type='text-single'><value>{}</value></field>{}{}</x>",
            ns::DATA_FORMS,
            ns::PUBSUB_NODE_CONFIG,
            list(
                "pubsub#access_model",
                self.access.as_str(),
                &["open", "presence", "whitelist"]
            ),
            boolean("pubsub#persist_items", self.persist_items),
            self.max_items,
            list(
                "pubsub#send_last_published_item",
                self.send_last.as_str(),
                &["never", "on_sub", "on_sub_and_presence"]
            ),
            boolean("pubsub#notify_retract", self.notify_retract),
        )
    }
}

/// Whether an entity may retrieve a node's items and get its notifications: the
/// owner always; others as the access model says, `subscribed` being whether the
/// owner's roster has them with a `from` or `both` subscription.
pub fn may_see(access: Access, is_owner: bool, subscribed: bool) -> Result<(), Refusal> {
    match access {
        _ if is_owner => Ok(()),
        Access::Open => Ok(()),
        Access::Presence if subscribed => Ok(()),
        Access::Presence => Err(Refusal::new(
            StanzaErrorCondition::NotAuthorized,
            "presence-subscription-required",
        )),
        Access::Whitelist => Err(Refusal::new(
            StanzaErrorCondition::NotAllowed,
            "closed-node",
        )),
    }
}

/// An error answer: the stanza condition, XEP-0060's application condition (in
/// `pubsub#errors`, with the `feature` of `<unsupported/>`), and a text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub condition: StanzaErrorCondition,
    pub app: Option<&'static str>,
    pub feature: Option<&'static str>,
    pub text: Option<String>,
}

impl Refusal {
    pub fn new(condition: StanzaErrorCondition, app: &'static str) -> Refusal {
        Refusal {
            condition,
            app: Some(app),
            feature: None,
            text: None,
        }
    }

    /// `feature-not-implemented` with `<unsupported feature='…'/>` (XEP-0060 §7.1.3.*).
    pub fn unsupported(feature: &'static str) -> Refusal {
        Refusal {
            condition: StanzaErrorCondition::FeatureNotImplemented,
            app: Some("unsupported"),
            feature: Some(feature),
            text: None,
        }
    }

    pub fn with_text(mut self, text: impl Into<String>) -> Refusal {
        self.text = Some(text.into());
        self
    }

    /// The application-specific condition element, if any.
    pub fn app_element(&self) -> Option<Element> {
        let name = self.app?;
        let mut e = Element::bare(name, ns::PUBSUB_ERRORS);
        if let Some(feature) = self.feature {
            crate::stanza::set_attr(&mut e, "feature", feature);
        }
        Some(e)
    }
}

impl From<StanzaErrorCondition> for Refusal {
    fn from(condition: StanzaErrorCondition) -> Refusal {
        Refusal {
            condition,
            app: None,
            feature: None,
            text: None,
        }
    }
}

/// What a `<pubsub/>` IQ asks of a PEP service.
#[derive(Debug, PartialEq)]
pub enum Request<'a> {
    Publish {
        node: String,
        /// The item's id, if the publisher chose one.
        id: Option<String>,
        payload: &'a Element,
        options: Option<&'a Element>,
    },
    Retract {
        node: String,
        id: String,
        notify: bool,
    },
    Items {
        node: String,
        ids: Vec<String>,
        max: Option<usize>,
    },
    Create {
        node: String,
        config: Option<&'a Element>,
    },
    Configure {
        node: String,
        form: Option<&'a Element>,
    },
    Delete {
        node: String,
    },
    Purge {
        node: String,
    },
}

fn node_attr(e: &Element) -> Result<String, Refusal> {
    match e.attr("node") {
        Some(n) if !n.is_empty() && n.len() <= 1024 => Ok(n.to_owned()),
        Some(n) if !n.is_empty() => {
            Err(Refusal::from(StanzaErrorCondition::NotAcceptable).with_text("node name too long"))
        }
        _ => Err(Refusal::new(
            StanzaErrorCondition::BadRequest,
            "nodeid-required",
        )),
    }
}

fn item_id(item: &Element) -> Result<Option<String>, Refusal> {
    match item.attr("id") {
        None | Some("") => Ok(None),
        Some(id) if id.len() <= 256 => Ok(Some(id.to_owned())),
        Some(_) => {
            Err(Refusal::from(StanzaErrorCondition::NotAcceptable).with_text("item id too long"))
        }
    }
}

/// Reads a `<pubsub/>` request: `set` for the IQ's type; `pubsub` is the payload in
/// the `pubsub` or `pubsub#owner` namespace.
pub fn parse_request(pubsub: &Element, set: bool) -> Result<Request<'_>, Refusal> {
    let owner_ns = pubsub.ns() == ns::PUBSUB_OWNER;
    let inner_ns = if owner_ns {
        ns::PUBSUB_OWNER
    } else {
        ns::PUBSUB
    };
    let mut children = pubsub.children().filter(|c| c.ns() == inner_ns);
    let Some(verb) = children.next() else {
        return Err(StanzaErrorCondition::BadRequest.into());
    };
    let options = pubsub
        .get_child("publish-options", ns::PUBSUB)
        .and_then(|o| o.get_child("x", ns::DATA_FORMS));
    match (owner_ns, set, verb.name()) {
        (false, true, "publish") => {
            let node = node_attr(verb)?;
            let items: Vec<&Element> = verb
                .children()
                .filter(|c| c.is("item", ns::PUBSUB))
                .collect();
            let [item] = items.as_slice() else {
                return Err(if items.is_empty() {
                    Refusal::new(StanzaErrorCondition::BadRequest, "item-required")
                } else {
                    Refusal::new(StanzaErrorCondition::BadRequest, "invalid-payload")
                });
            };
            let payloads: Vec<&Element> = item.children().collect();
            let [payload] = payloads.as_slice() else {
                return Err(if payloads.is_empty() {
                    Refusal::new(StanzaErrorCondition::BadRequest, "payload-required")
                } else {
                    Refusal::new(StanzaErrorCondition::BadRequest, "invalid-payload")
                });
            };
            Ok(Request::Publish {
                node,
                id: item_id(item)?,
                payload,
                options,
            })
        }
        (false, true, "retract") => {
            let node = node_attr(verb)?;
            let ids: Vec<&Element> = verb
                .children()
                .filter(|c| c.is("item", ns::PUBSUB))
                .collect();
            let [item] = ids.as_slice() else {
                return Err(Refusal::new(
                    StanzaErrorCondition::BadRequest,
                    "item-required",
                ));
            };
            let Some(id) = item_id(item)? else {
                return Err(Refusal::new(
                    StanzaErrorCondition::BadRequest,
                    "item-required",
                ));
            };
            let notify = matches!(verb.attr("notify"), Some("1" | "true"));
            Ok(Request::Retract { node, id, notify })
        }
        (false, false, "items") => {
            let node = node_attr(verb)?;
            let mut ids = vec![];
            for item in verb.children().filter(|c| c.is("item", ns::PUBSUB)) {
                if let Some(id) = item_id(item)? {
                    ids.push(id);
                }
            }
            let max = match verb.attr("max_items") {
                None => None,
                Some(m) => Some(m.parse::<usize>().map_err(|_| {
                    Refusal::from(StanzaErrorCondition::BadRequest)
                        .with_text("max_items is a number")
                })?),
            };
            Ok(Request::Items { node, ids, max })
        }
        (false, true, "create") => Ok(Request::Create {
            // Instant nodes are not supported (XEP-0060 §8.1.2).
            node: node_attr(verb).map_err(|r| match r.app {
                Some("nodeid-required") => {
                    Refusal::new(StanzaErrorCondition::NotAcceptable, "nodeid-required")
                }
                _ => r,
            })?,
            config: pubsub
                .get_child("configure", ns::PUBSUB)
                .and_then(|c| c.get_child("x", ns::DATA_FORMS)),
        }),
        (true, _, "configure") => Ok(Request::Configure {
            node: node_attr(verb)?,
            form: if set {
                Some(verb.get_child("x", ns::DATA_FORMS).ok_or_else(|| {
                    Refusal::from(StanzaErrorCondition::BadRequest)
                        .with_text("a configuration form")
                })?)
            } else {
                None
            },
        }),
        (true, true, "delete") => Ok(Request::Delete {
            node: node_attr(verb)?,
        }),
        (true, true, "purge") => Ok(Request::Purge {
            node: node_attr(verb)?,
        }),
        (false, _, "subscribe" | "unsubscribe" | "options") => {
            Err(Refusal::unsupported("subscribe"))
        }
        (false, _, "subscriptions") => Err(Refusal::unsupported("retrieve-subscriptions")),
        (false, _, "affiliations") | (true, _, "affiliations") => {
            Err(Refusal::unsupported("modify-affiliations"))
        }
        (true, _, "subscriptions") => Err(Refusal::unsupported("manage-subscriptions")),
        (_, _, "default") => Err(Refusal::unsupported("retrieve-default")),
        _ => Err(StanzaErrorCondition::BadRequest.into()),
    }
}

/// An event (XEP-0060 §7.1.2.1) to one recipient, from the owner's bare JID; `body` is
/// what goes inside `<event/>`.
pub fn event_message(owner: &str, to: &str, id: &str, body: &str) -> String {
    format!(
        "<message xmlns='jabber:client' type='headline' from='{}' to='{}' id='{}'><event xmlns='{}'>{body}</event></message>",
        escape(owner),
        escape(to),
        escape(id),
        ns::PUBSUB_EVENT
    )
}

/// `<items/>` of one published item (for an event or a retrieval: the namespace is
/// inherited from the parent).
pub fn items_xml(node: &str, items: &[(&str, &str)]) -> String {
    let mut s = format!("<items node='{}'>", escape(node));
    for (id, payload) in items {
        s.push_str(&format!("<item id='{}'>{payload}</item>", escape(id)));
    }
    s.push_str("</items>");
    s
}

/// `<items/>` announcing a retraction.
pub fn retract_xml(node: &str, id: &str) -> String {
    format!(
        "<items node='{}'><retract id='{}'/></items>",
        escape(node),
        escape(id)
    )
}

/// The nodes a client's capabilities ask notifications for (`NODE+notify`, XEP-0163 §4).
pub fn notify_nodes(features: &[String]) -> impl Iterator<Item = &str> {
    features.iter().filter_map(|f| f.strip_suffix("+notify"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(xml: &str) -> Element {
        xml.parse().unwrap()
    }

    fn form(fields: &[(&str, &str)]) -> Element {
        let mut x = format!(
            "<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'><value>{}</value></field>",
            ns::PUBSUB_PUBLISH_OPTIONS
        );
        for (var, value) in fields {
            x.push_str(&format!(
                "<field var='{var}'><value>{value}</value></field>"
            ));
        }
        x.push_str("</x>");
        parse(&x)
    }

    #[test]
    fn publish_options_create_or_must_match() {
        // OMEMO's device list: open, as many items as allowed.
        let s = settings(
            &form(&[("pubsub#access_model", "open"), ("pubsub#max_items", "max")]),
            256,
        )
        .unwrap();
        let mut config = NodeConfig::default();
        assert!(!config.satisfies(&s));
        config.apply(&s);
        assert_eq!(config.access, Access::Open);
        assert_eq!(config.max_items, 256);
        assert!(config.satisfies(&s));
        // Above the limit means the limit; zero and unknown fields are refused.
        let s = settings(&form(&[("pubsub#max_items", "9999")]), 256).unwrap();
        assert_eq!(s, [Setting::MaxItems(256)]);
        assert!(settings(&form(&[("pubsub#max_items", "0")]), 256).is_err());
        assert!(settings(&form(&[("pubsub#access_model", "roster")]), 256).is_err());
        assert!(settings(&form(&[("pubsub#type", "x")]), 256).is_err());
        // XEP-0402 bookmarks ask for what is always true here too.
        let s = settings(
            &form(&[
                ("pubsub#persist_items", "true"),
                ("pubsub#send_last_published_item", "never"),
                ("pubsub#access_model", "whitelist"),
                ("pubsub#deliver_payloads", "1"),
            ]),
            256,
        )
        .unwrap();
        config.apply(&s);
        assert_eq!(
            (config.access, config.send_last),
            (Access::Whitelist, SendLast::Never)
        );
    }

    #[test]
    fn access_models() {
        assert!(may_see(Access::Whitelist, true, false).is_ok());
        assert!(may_see(Access::Open, false, false).is_ok());
        assert!(may_see(Access::Presence, false, true).is_ok());
        let r = may_see(Access::Presence, false, false).unwrap_err();
        assert_eq!(r.app, Some("presence-subscription-required"));
        let r = may_see(Access::Whitelist, false, true).unwrap_err();
        assert_eq!(r.condition, StanzaErrorCondition::NotAllowed);
    }

    #[test]
    fn requests_are_read_or_refused_with_the_pubsub_condition() {
        let publish = parse(
            "<pubsub xmlns='http://jabber.org/protocol/pubsub'><publish node='urn:xmpp:avatar:metadata'><item id='abc'><metadata xmlns='urn:xmpp:avatar:metadata'/></item></publish></pubsub>",
        );
        match parse_request(&publish, true).unwrap() {
            Request::Publish {
                node,
                id,
                payload,
                options,
            } => {
                assert_eq!(node, "urn:xmpp:avatar:metadata");
                assert_eq!(id.as_deref(), Some("abc"));
                assert_eq!(payload.name(), "metadata");
                assert!(options.is_none());
            }
            other => panic!("{other:?}"),
        }
        let two = parse(
            "<pubsub xmlns='http://jabber.org/protocol/pubsub'><publish node='n'><item><a xmlns='x'/><b xmlns='x'/></item></publish></pubsub>",
        );
        assert_eq!(
            parse_request(&two, true).unwrap_err().app,
            Some("invalid-payload")
        );
        let no_node = parse("<pubsub xmlns='http://jabber.org/protocol/pubsub'><items/></pubsub>");
        assert_eq!(
            parse_request(&no_node, false).unwrap_err().app,
            Some("nodeid-required")
        );
        let subscribe = parse(
            "<pubsub xmlns='http://jabber.org/protocol/pubsub'><subscribe node='n' jid='a@b'/></pubsub>",
        );
        let r = parse_request(&subscribe, true).unwrap_err();
        assert_eq!(r.condition, StanzaErrorCondition::FeatureNotImplemented);
        assert_eq!(r.feature, Some("subscribe"));
        let items = parse(
            "<pubsub xmlns='http://jabber.org/protocol/pubsub'><items node='n' max_items='2'><item id='a'/></items></pubsub>",
        );
        assert_eq!(
            parse_request(&items, false).unwrap(),
            Request::Items {
                node: "n".into(),
                ids: vec!["a".into()],
                max: Some(2)
            }
        );
        let purge = parse(
            "<pubsub xmlns='http://jabber.org/protocol/pubsub#owner'><purge node='n'/></pubsub>",
        );
        assert_eq!(
            parse_request(&purge, true).unwrap(),
            Request::Purge { node: "n".into() }
        );
    }

    #[test]
    fn the_configuration_form_reads_back() {
        let c = NodeConfig {
            access: Access::Open,
            max_items: 7,
            ..NodeConfig::default()
        };
        let form = parse(&c.form("form"));
        let mut back = NodeConfig::default();
        back.apply(&settings(&form, 256).unwrap());
        assert_eq!(back, c);
    }

    #[test]
    fn notify_features() {
        let f = vec![
            "urn:xmpp:avatar:metadata+notify".to_owned(),
            "http://jabber.org/protocol/caps".to_owned(),
        ];
        assert_eq!(
            notify_nodes(&f).collect::<Vec<_>>(),
            ["urn:xmpp:avatar:metadata"]
        );
    }
}
