//! IQ handling (RFC 6120 §8.2.3): routing to full JIDs, and the requests the server
//! answers itself — roster (RFC 6121 §2, XEP-0237), service discovery (XEP-0030), ping
//! (XEP-0199), software version (XEP-0092), vCard-temp (XEP-0054), private XML storage
//! (XEP-0049), blocking (XEP-0191), carbons (XEP-0280), in-band registration
//! (XEP-0077) and the server's contact addresses (XEP-0157, in its disco#info); slots
//! for HTTP file upload (XEP-0363, `upload.rs`); the
//! account's PEP service (XEP-0163, `pep.rs`) and message archive (XEP-0313,
//! `mam.rs`) are reached from here. Anything else gets `service-unavailable`, never
//! silence.

use impmesh_store::RosterItem;
use jid::{BareJid, Jid};
use minidom::Element;

use crate::Server;
use crate::context::Context;
use crate::core::envelope::IqType;
use crate::core::pubsub::Refusal;
use crate::core::subscription::Kind;
use crate::error::{StanzaErrorCondition, error_reply, error_reply_with};
use crate::hub::lock;
use crate::roster::{MAX_ROSTER_ITEMS, roster_item_xml};

use crate::xml::{escape, ns};

/// The features disco#info lists for the server: exactly what is implemented.
pub const SERVER_FEATURES: &[&str] = &[
    ns::DISCO_INFO,
    ns::DISCO_ITEMS,
    ns::PING,
    ns::VERSION,
    ns::VCARD,
    ns::PRIVATE,
    ns::BLOCKING,
    ns::CARBONS,
    ns::ROSTERVER,
    ns::OFFLINE,
    ns::CAPS,
    "urn:xmpp:sm:3",
    "urn:xmpp:sasl-cb:0",
];

impl Server {
    /// Hands out `services` through XEP-0215 from now on (once, when the node's relay
    /// is up, before clients connect: the server's capabilities include it).
    pub fn set_turn_services(&self, services: std::sync::Arc<dyn crate::TurnServices>) {
        let _ = self.turn.set(services);
    }

    /// The server's disco#info `<query/>` (XEP-0030): its identities, features and
    /// forms, with `node` when asked under its capabilities' node (XEP-0115 §6.2).
    pub(crate) fn server_info(&self, node: Option<&str>) -> String {
        let upload = self
            .config
            .upload
            .as_ref()
            .filter(|_| self.upload_url().is_some());
        let node = node
            .map(|n| format!(" node='{}'", escape(n)))
            .unwrap_or_default();
        let mut body = format!(
            "<query xmlns='{}'{node}><identity category='server' type='im' name='impmesh'/>",
            ns::DISCO_INFO
        );
        if upload.is_some() {
            body.push_str(crate::core::upload::DISCO_IDENTITY);
        }
        for f in SERVER_FEATURES {
            body.push_str(&format!("<feature var='{f}'/>"));
        }
        if self.turn.get().is_some() {
            body.push_str(&format!("<feature var='{}'/>", ns::EXTDISCO));
        }
        if let Some(upload) = upload {
            body.push_str(&crate::core::upload::disco_xml(upload.max_file_bytes));
        }
        body.push_str(&contact_form(&self.config.contact_addresses));
        body.push_str("</query>");
        body
    }

    /// The node of the server's entity capabilities: its own `xmpp:` URI (RFC 5122).
    /// impmesh has no web site to name, and clients key what they cache by `ver`.
    pub(crate) fn caps_node(&self) -> String {
        format!("xmpp:{}", self.config.domain)
    }

    /// The `ver` of the server's disco#info (XEP-0115 §5), recomputed only when the
    /// answer changes (HTTP upload starts listening after the client ports); `None`
    /// when the answer cannot be hashed (§5.4: a configured contact address with a
    /// `<`, say), and then the server announces no capabilities.
    pub(crate) fn caps_ver(&self) -> Option<String> {
        let info = self.server_info(None);
        let mut cache = lock(&self.caps);
        if let Some((seen, ver)) = &*cache
            && *seen == info
        {
            return ver.clone();
        }
        let ver = info
            .parse::<Element>()
            .ok()
            .and_then(|e| crate::core::caps::ver(&e));
        *cache = Some((info, ver.clone()));
        ver
    }

    /// The `<c/>` stream feature announcing the server's capabilities (XEP-0115 §6.3),
    /// or nothing.
    pub(crate) fn caps_feature(&self) -> String {
        match self.caps_ver() {
            Some(ver) => format!(
                "<c xmlns='{}' hash='sha-1' node='{}' ver='{ver}'/>",
                ns::CAPS,
                escape(&self.caps_node()),
            ),
            None => String::new(),
        }
    }
}

/// XEP-0157's form of contact addresses, for the server's disco#info; empty when none
/// are configured.
fn contact_form(addresses: &[(String, Vec<String>)]) -> String {
    if addresses.is_empty() {
        return String::new();
    }
    let mut form = format!(
        "<x xmlns='jabber:x:data' type='result'><field var='FORM_TYPE' type='hidden'><value>{}</value></field>",
        ns::SERVERINFO
    );
    for (var, uris) in addresses {
        form.push_str(&format!("<field var='{}'>", escape(var)));
        for uri in uris {
            form.push_str(&format!("<value>{}</value>", escape(uri)));
        }
        form.push_str("</field>");
    }
    form.push_str("</x>");
    form
}

/// Namespaces a user may keep in private XML storage (XEP-0049).
const MAX_PRIVATE_ITEMS: usize = 100;
/// JIDs a user may block (XEP-0191).
const MAX_BLOCKED: usize = 1000;
/// Largest vCard or private XML document kept, in bytes of XML.
pub(crate) const MAX_DOCUMENT_BYTES: usize = 64 * 1024;

impl Context<'_> {
    /// XEP-0215 `<services/>` and `<credentials/>` to the domain: this cluster's
    /// relays, with credentials for this user; service-unavailable without a relay.
    fn external_services(&mut self, iq: &Element, request: &Element) {
        let Some(turn) = self.server.turn.get().cloned() else {
            self.reply_error(iq, StanzaErrorCondition::ServiceUnavailable, None);
            return;
        };
        let all = turn.services(&self.user());
        use crate::core::extdisco;
        if request.name() == "services" {
            let body = extdisco::services(&all, request.attr("type"));
            self.reply_result(iq, Some(body));
            return;
        }
        let asked = request.get_child("service", ns::EXTDISCO);
        let answer = asked.and_then(|s| {
            let port = match s.attr("port") {
                None => None,
                Some(p) => Some(p.parse::<u16>().ok()?),
            };
            extdisco::credentials(&all, s.attr("host")?, s.attr("type")?, port)
        });
        match (asked, answer) {
            (None, _) => self.reply_error(iq, StanzaErrorCondition::BadRequest, None),
            (Some(_), None) => self.reply_error(iq, StanzaErrorCondition::ItemNotFound, None),
            (Some(_), Some(body)) => self.reply_result(iq, Some(body)),
        }
    }

    /// An IQ from this session's client.
    pub(crate) async fn on_iq(&mut self, iq: Element, ty: IqType, to: Option<Jid>) {
        let is_request = ty.is_request();
        if is_request && (iq.attr("id").is_none() || iq.children().count() != 1) {
            // RFC 6120 §8.2.3: a request has an id and exactly one payload.
            self.reply_error(&iq, StanzaErrorCondition::BadRequest, None);
            return;
        }
        let domain = self.server.config.domain.clone();
        let own_bare = self.jid().to_bare();
        match &to {
            Some(to) if self.server.is_muc(to) => self.on_muc_iq(&iq, to).await,
            // To a full JID: route to that session.
            Some(to) if to.resource().is_some() => {
                if to.domain().as_str() != domain {
                    self.reply_error(&iq, StanzaErrorCondition::RemoteServerNotFound, None);
                    return;
                }
                self.route_iq(iq, to).await;
            }
            _ if !is_request => self.server.iq_answer(&iq, to.as_ref()).await,
            None => self.handle_account_iq(iq).await,
            Some(to) if to.to_bare() == own_bare => self.handle_account_iq(iq).await,
            Some(to) if to.node().is_none() && to.domain().as_str() == domain => {
                self.handle_server_iq(iq).await;
            }
            Some(to) if to.domain().as_str() != domain => {
                self.reply_error(&iq, StanzaErrorCondition::RemoteServerNotFound, None);
            }
            Some(to) => self.handle_other_account_iq(iq, to.to_bare()).await,
        }
    }

    /// An IQ to another user's full JID.
    async fn route_iq(&mut self, iq: Element, to: &Jid) {
        let server = self.server.clone();
        let Some(user) = to.node().map(|n| n.to_string()) else {
            return;
        };
        let resource = to.resource().map(|r| r.to_string()).unwrap_or_default();
        if server.route_remote(&user, &iq).await {
            return;
        }
        let blocked = server.is_blocked_by(&user, &self.jid().to_bare()).await;
        match server.hub.session(&user, &resource) {
            Some(target) if !blocked => {
                let from = crate::deliver::sender_of(&iq);
                if target.send(String::from(&iq).into(), from).is_err() {
                    self.reply_error(&iq, StanzaErrorCondition::ResourceConstraint, None);
                }
            }
            _ => {
                if matches!(iq.attr("type"), Some("get" | "set")) {
                    self.reply_error(&iq, StanzaErrorCondition::ServiceUnavailable, None);
                }
            }
        }
    }

    pub(crate) fn reply_result(&mut self, iq: &Element, payload: Option<String>) {
        self.reply_iq(iq, "result", payload);
    }

    /// An answer of type `ty` to the client's `iq`, from where it was sent.
    pub(crate) fn reply_iq(&mut self, iq: &Element, ty: &str, payload: Option<String>) {
        let xml = format!(
            "<iq type='{ty}' id='{}' to='{}'{}>{}</iq>",
            escape(iq.attr("id").unwrap_or_default()),
            escape(&self.jid().to_string()),
            iq.attr("to")
                .map(|t| format!(" from='{}'", escape(t)))
                .unwrap_or_default(),
            payload.unwrap_or_default()
        );
        self.push_out(xml.into());
    }

    /// Requests the server answers on behalf of the user's own account.
    async fn handle_account_iq(&mut self, iq: Element) {
        let Some(payload) = iq.children().next().cloned() else {
            return;
        };
        let set = iq.attr("type") == Some("set");
        let user = self.user();
        let server = self.server.clone();
        match (payload.name(), payload.ns().as_str()) {
            ("query", ns::ROSTER) => self.roster_iq(&iq, &payload, set).await,
            ("vCard", ns::VCARD) if set => {
                let xml = String::from(&payload);
                if xml.len() > MAX_DOCUMENT_BYTES {
                    self.reply_error(
                        &iq,
                        StanzaErrorCondition::NotAcceptable,
                        Some("vCard too large"),
                    );
                    return;
                }
                let stored = {
                    // Ordered with the avatar's conversion into the vCard.
                    let _ordered = server.roster_lock(&user).lock().await;
                    server.store_vcard(&user, &xml).await.is_ok()
                };
                if stored {
                    self.reply_result(&iq, None);
                    server.avatar_from_vcard(&user, &payload).await;
                } else {
                    self.reply_error(&iq, StanzaErrorCondition::InternalServerError, None);
                }
            }
            ("vCard", ns::VCARD) => self.vcard_get(&iq, &user).await,
            ("query", ns::PRIVATE) => self.private_iq(&iq, &payload, set).await,
            ("blocklist", ns::BLOCKING) if !set => {
                let Ok(items) = server.store.blocklist(&user).await else {
                    // An empty list would tell the client nothing is blocked.
                    self.reply_error(&iq, StanzaErrorCondition::InternalServerError, None);
                    return;
                };
                let body: String = items
                    .iter()
                    .map(|j| format!("<item jid='{}'/>", escape(j)))
                    .collect();
                lock(&self.handle.state).interested = true;
                self.reply_result(
                    &iq,
                    Some(format!(
                        "<blocklist xmlns='{}'>{body}</blocklist>",
                        ns::BLOCKING
                    )),
                );
            }
            ("block" | "unblock", ns::BLOCKING) if set => self.blocking_set(&iq, &payload).await,
            ("enable" | "disable", ns::CARBONS) if set => {
                lock(&self.handle.state).carbons = payload.name() == "enable";
                self.reply_result(&iq, None);
            }
            ("ping", ns::PING) if !set => self.reply_result(&iq, None),
            // RFC 3921 session establishment, obsolete but still sent by old clients.
            ("session", ns::SESSION) if set => self.reply_result(&iq, None),
            ("pubsub", ns::PUBSUB | ns::PUBSUB_OWNER) => {
                let requester = Jid::from(self.jid().clone());
                match server.pep_request(&requester, &user, &iq).await {
                    Ok(body) => self.reply_result(&iq, body),
                    Err(refusal) => self.refuse(&iq, &refusal),
                }
            }
            ("query" | "prefs" | "metadata", ns::MAM) => match self.mam_iq(&payload, set).await {
                Ok(body) => self.reply_result(&iq, body),
                Err(refusal) => self.refuse(&iq, &refusal),
            },
            ("query", ns::DISCO_INFO | ns::DISCO_ITEMS) if !set => {
                let requester = Jid::from(self.jid().clone());
                match server.account_query(&iq, &user, &requester).await {
                    Ok(body) => self.reply_result(&iq, body),
                    Err(refusal) => self.refuse(&iq, &refusal),
                }
            }
            ("query", ns::REGISTER) => self.register_authenticated(&iq, &payload, set).await,
            ("enable" | "disable", ns::PUSH) if set => self.push_iq(&iq, &payload).await,
            _ => self.reply_error(&iq, StanzaErrorCondition::ServiceUnavailable, None),
        }
    }

    /// Requests to the server itself (`to` = the domain).
    async fn handle_server_iq(&mut self, iq: Element) {
        let Some(payload) = iq.children().next().cloned() else {
            return;
        };
        let set = iq.attr("type") == Some("set");
        match (payload.name(), payload.ns().as_str()) {
            ("ping", ns::PING) if !set => self.reply_result(&iq, None),
            ("session", ns::SESSION) if set => self.reply_result(&iq, None),
            ("query", ns::DISCO_INFO) if !set => {
                // A node: only the one the server's capabilities name (XEP-0115 §6.2).
                if let Some(node) = payload.attr("node") {
                    let caps = self
                        .server
                        .caps_ver()
                        .map(|ver| format!("{}#{ver}", self.server.caps_node()));
                    if caps.as_deref() != Some(node) {
                        self.reply_error(&iq, StanzaErrorCondition::ItemNotFound, None);
                        return;
                    }
                }
                let body = self.server.server_info(payload.attr("node"));
                self.reply_result(&iq, Some(body));
            }
            ("query", ns::DISCO_ITEMS) if !set => {
                // The services of the domain: the chat service when on.
                let items = self
                    .server
                    .config
                    .muc
                    .as_ref()
                    .map(|m| format!("<item jid='{}' name='Chatrooms'/>", escape(&m.host)))
                    .unwrap_or_default();
                self.reply_result(
                    &iq,
                    Some(format!(
                        "<query xmlns='{}'>{items}</query>",
                        ns::DISCO_ITEMS
                    )),
                );
            }
            ("query", ns::VERSION) if !set => {
                let body = format!(
                    "<query xmlns='{}'><name>impmesh</name><version>{}</version></query>",
                    ns::VERSION,
                    env!("CARGO_PKG_VERSION")
                );
                self.reply_result(&iq, Some(body));
            }
            ("enable" | "disable", ns::CARBONS) if set => {
                lock(&self.handle.state).carbons = payload.name() == "enable";
                self.reply_result(&iq, None);
            }
            ("query", ns::REGISTER) => self.register_authenticated(&iq, &payload, set).await,
            ("request", ns::HTTP_UPLOAD) if !set => self.upload_slot(&iq, &payload).await,
            ("services" | "credentials", ns::EXTDISCO) if !set => {
                self.external_services(&iq, &payload)
            }
            _ => self.reply_error(&iq, StanzaErrorCondition::ServiceUnavailable, None),
        }
    }

    /// Requests to another user's bare JID, answered by the server for that account.
    async fn handle_other_account_iq(&mut self, iq: Element, to: BareJid) {
        if iq.children().next().is_none() {
            return;
        }
        let user = to.node().map(|n| n.to_string()).unwrap_or_default();
        let server = self.server.clone();
        if server.route_remote(&user, &iq).await {
            return;
        }
        let exists = server.store.user_exists(&user).await.unwrap_or(false);
        let blocked = server.is_blocked_by(&user, &self.jid().to_bare()).await;
        if !exists || blocked {
            self.reply_error(&iq, StanzaErrorCondition::ServiceUnavailable, None);
            return;
        }
        let requester = Jid::from(self.jid().clone());
        match server.account_query(&iq, &user, &requester).await {
            Ok(body) => self.reply_result(&iq, body),
            Err(refusal) => self.refuse(&iq, &refusal),
        }
    }

    /// An error answer with XEP-0060's application condition, if it has one.
    pub(crate) fn refuse(&mut self, iq: &Element, refusal: &Refusal) {
        let reply = error_reply_with(
            iq,
            refusal.condition,
            refusal.text.as_deref(),
            refusal.app_element(),
        );
        if let Some(mut reply) = reply {
            crate::stanza::set_attr(&mut reply, "to", &self.jid().to_string());
            self.send_self(&reply);
        }
    }

    async fn vcard_get(&mut self, iq: &Element, user: &str) {
        match self.server.vcard(user).await {
            Ok(xml) => self.reply_result(iq, Some(xml)),
            Err(condition) => self.reply_error(iq, condition, None),
        }
    }

    /// Roster get and set (RFC 6121 §2.2–§2.5) with versioning (XEP-0237).
    async fn roster_iq(&mut self, iq: &Element, query: &Element, set: bool) {
        let user = self.user();
        let server = self.server.clone();
        if !set {
            lock(&self.handle.state).interested = true;
            let Ok((version, items)) = server.store.roster(&user).await else {
                self.reply_error(iq, StanzaErrorCondition::InternalServerError, None);
                return;
            };
            // The client's version is current: an empty result, changes come as pushes.
            if query.attr("ver") == Some(version.to_string().as_str()) {
                self.reply_result(iq, None);
                return;
            }
            let body: String = items.iter().map(|i| roster_item_xml(i, false)).collect();
            self.reply_result(
                iq,
                Some(format!(
                    "<query xmlns='{}' ver='{version}'>{body}</query>",
                    ns::ROSTER
                )),
            );
            return;
        }
        // §2.3.3: a set carries exactly one item.
        let items: Vec<&Element> = query
            .children()
            .filter(|c| c.is("item", ns::ROSTER))
            .collect();
        let [item] = items.as_slice() else {
            self.reply_error(
                iq,
                StanzaErrorCondition::BadRequest,
                Some("one item per roster set"),
            );
            return;
        };
        let Some(contact) = item.attr("jid").and_then(|j| BareJid::new(j).ok()) else {
            self.reply_error(
                iq,
                StanzaErrorCondition::BadRequest,
                Some("the item needs a valid bare JID"),
            );
            return;
        };
        let contact_s = contact.to_string();
        let Ok(existing) = server.store.roster_item(&user, &contact_s).await else {
            self.reply_error(iq, StanzaErrorCondition::InternalServerError, None);
            return;
        };
        if item.attr("subscription") == Some("remove") {
            let Some(existing) = existing else {
                self.reply_error(iq, StanzaErrorCondition::ItemNotFound, None);
                return;
            };
            // §2.5.2: cancel both directions before removing.
            if existing.subscription.has_to() || existing.ask {
                let p = subscription_presence(&contact_s, "unsubscribe");
                server
                    .outbound_subscription(&user, Kind::Unsubscribe, contact.clone(), p)
                    .await;
            }
            if existing.subscription.has_from()
                || server
                    .store
                    .has_subscription_request(&user, &contact_s)
                    .await
                    .unwrap_or(false)
            {
                let p = subscription_presence(&contact_s, "unsubscribed");
                server
                    .outbound_subscription(&user, Kind::Unsubscribed, contact.clone(), p)
                    .await;
            }
            match server.store.remove_roster_item(&user, &contact_s).await {
                Ok(Some(version)) => {
                    server.hub.roster_changed(&user, &existing, true);
                    self.reply_result(iq, None);
                    server.push_roster(&user, &existing, true, version);
                }
                Ok(None) => self.reply_result(iq, None),
                Err(_) => self.reply_error(iq, StanzaErrorCondition::InternalServerError, None),
            }
            return;
        }
        let mut groups: Vec<String> = item
            .children()
            .filter(|c| c.is("group", ns::ROSTER))
            .map(|g| g.text())
            .collect();
        let count = groups.len();
        groups.sort();
        groups.dedup();
        if groups.len() != count || groups.iter().any(|g| g.is_empty() || g.len() > 1023) {
            self.reply_error(
                iq,
                StanzaErrorCondition::BadRequest,
                Some("duplicate or empty group"),
            );
            return;
        }
        if existing.is_none()
            && server.store.roster_len(&user).await.unwrap_or(0) >= MAX_ROSTER_ITEMS
        {
            self.reply_error(
                iq,
                StanzaErrorCondition::NotAllowed,
                Some("the roster is full"),
            );
            return;
        }
        // The client sets name and groups; subscription state is the server's (§2.1.2.5).
        // Read again and written under the owner's roster lock, so a subscription step
        // running meanwhile (an approval arriving over a link) is not written over.
        let name = item
            .attr("name")
            .filter(|n| !n.is_empty())
            .map(String::from);
        self.reply_result(iq, None);
        let _owner = server.roster_lock(&user).lock().await;
        let current = server
            .store
            .roster_item(&user, &contact_s)
            .await
            .ok()
            .flatten();
        let mut updated = current.unwrap_or_else(|| RosterItem {
            contact: contact_s,
            ..Default::default()
        });
        updated.name = name;
        updated.groups = groups;
        server.save_and_push(&user, &updated).await;
    }

    async fn private_iq(&mut self, iq: &Element, query: &Element, set: bool) {
        let user = self.user();
        let children: Vec<&Element> = query.children().collect();
        if children.is_empty() {
            self.reply_error(iq, StanzaErrorCondition::BadRequest, None);
            return;
        }
        // XEP-0049 §3: jabber:* namespaces are reserved.
        if children.iter().any(|c| c.ns().starts_with("jabber:")) {
            self.reply_error(iq, StanzaErrorCondition::NotAcceptable, None);
            return;
        }
        if set {
            let items: Vec<(String, String)> = children
                .iter()
                .map(|c| (c.ns(), String::from(*c)))
                .collect();
            if items.iter().any(|(_, x)| x.len() > MAX_DOCUMENT_BYTES) {
                self.reply_error(iq, StanzaErrorCondition::NotAcceptable, None);
                return;
            }
            let stored = self
                .server
                .store
                .set_private_xml(&user, &items, MAX_PRIVATE_ITEMS)
                .await;
            match stored {
                Ok(true) => self.reply_result(iq, None),
                Ok(false) => self.reply_error(
                    iq,
                    StanzaErrorCondition::ResourceConstraint,
                    Some("private storage holds at most 100 namespaces per user"),
                ),
                Err(_) => self.reply_error(iq, StanzaErrorCondition::InternalServerError, None),
            }
            return;
        }
        let child = children[0];
        let stored = match self.server.store.private_xml(&user, &child.ns()).await {
            Ok(s) => s,
            Err(_) => {
                self.reply_error(iq, StanzaErrorCondition::InternalServerError, None);
                return;
            }
        };
        let inner = stored.unwrap_or_else(|| String::from(child));
        self.reply_result(
            iq,
            Some(format!("<query xmlns='{}'>{inner}</query>", ns::PRIVATE)),
        );
    }

    /// XEP-0191 block and unblock, with pushes to the user's other resources.
    async fn blocking_set(&mut self, iq: &Element, payload: &Element) {
        let user = self.user();
        let server = self.server.clone();
        let mut jids = vec![];
        for item in payload.children().filter(|c| c.is("item", ns::BLOCKING)) {
            match item.attr("jid").and_then(|j| Jid::new(j).ok()) {
                Some(j) => jids.push(j.to_string()),
                None => {
                    self.reply_error(iq, StanzaErrorCondition::JidMalformed, None);
                    return;
                }
            }
        }
        let block = payload.name() == "block";
        if block && jids.is_empty() {
            self.reply_error(iq, StanzaErrorCondition::BadRequest, None);
            return;
        }
        let result = if block {
            server.store.block(&user, &jids, MAX_BLOCKED).await
        } else {
            server.store.unblock(&user, &jids).await.map(|()| true)
        };
        match result {
            Ok(true) => {}
            Ok(false) => {
                self.reply_error(
                    iq,
                    StanzaErrorCondition::ResourceConstraint,
                    Some("a block list holds at most 1000 JIDs"),
                );
                return;
            }
            Err(_) => {
                self.reply_error(iq, StanzaErrorCondition::InternalServerError, None);
                return;
            }
        }
        if let Ok(list) = server.store.blocklist(&user).await {
            server.hub.set_blocklist(&user, list.into_iter().collect());
        }
        self.reply_result(iq, None);
        let body: String = jids
            .iter()
            .map(|j| format!("<item jid='{}'/>", escape(j)))
            .collect();
        for s in server.hub.sessions(&user) {
            if s.presence().interested {
                let push = format!(
                    "<iq type='set' id='block{}' to='{}'><{} xmlns='{}'>{body}</{}></iq>",
                    crate::names::random_id(),
                    escape(&s.jid.to_string()),
                    payload.name(),
                    ns::BLOCKING,
                    payload.name()
                );
                let _ = s.send(push.into(), "");
            }
        }
    }

    /// XEP-0077 for a logged-in user: change the password, or cancel the account.
    async fn register_authenticated(&mut self, iq: &Element, query: &Element, set: bool) {
        let user = self.user();
        if !set {
            let body = format!(
                "<query xmlns='{}'><registered/><username>{}</username></query>",
                ns::REGISTER,
                escape(&user)
            );
            self.reply_result(iq, Some(body));
            return;
        }
        let server = self.server.clone();
        if query.has_child("remove", ns::REGISTER) {
            if server.store.delete_user(&user).await.is_ok() {
                self.reply_result(iq, None);
                tracing::info!(%user, "account cancelled by its owner");
            } else {
                self.reply_error(iq, StanzaErrorCondition::InternalServerError, None);
            }
            return;
        }
        let username = query.get_child("username", ns::REGISTER).map(|u| u.text());
        let password = query.get_child("password", ns::REGISTER).map(|p| p.text());
        match (username, password) {
            (Some(u), Some(p)) if u == user && !p.is_empty() => {
                if !server.password_change_attempt(&user) {
                    self.reply_error(
                        iq,
                        StanzaErrorCondition::ResourceConstraint,
                        Some("too many password changes; try again in a minute"),
                    );
                    return;
                }
                match server.store.set_password(&user, &p).await {
                    Ok(()) => self.reply_result(iq, None),
                    Err(_) => self.reply_error(iq, StanzaErrorCondition::NotAcceptable, None),
                }
            }
            _ => self.reply_error(iq, StanzaErrorCondition::BadRequest, None),
        }
    }
}

fn subscription_presence(to: &str, ty: &str) -> Element {
    Element::builder("presence", ns::CLIENT)
        .attr(rxml::xml_ncname!("to").to_owned(), to)
        .attr(rxml::xml_ncname!("type").to_owned(), ty)
        .build()
}

/// XEP-0077 before authentication (only when registration is enabled): the form, and
/// account creation.
pub(crate) async fn register_unauthenticated(
    server: &Server,
    iq: &Element,
    from: std::net::IpAddr,
) -> String {
    let id = escape(iq.attr("id").unwrap_or_default()).into_owned();
    let error = |c: StanzaErrorCondition, text: &str| {
        error_reply(iq, c, Some(text))
            .map(|e| String::from(&e))
            .unwrap_or_default()
    };
    let Some(query) = iq.get_child("query", ns::REGISTER) else {
        return error(StanzaErrorCondition::BadRequest, "missing query");
    };
    match iq.attr("type") {
        Some("get") => format!(
            "<iq type='result' id='{id}'><query xmlns='{}'><instructions>Choose a user name and password.</instructions><username/><password/></query></iq>",
            ns::REGISTER
        ),
        Some("set") => {
            let username = query.get_child("username", ns::REGISTER).map(|u| u.text());
            let password = query.get_child("password", ns::REGISTER).map(|p| p.text());
            let (Some(username), Some(password)) = (username, password) else {
                return error(
                    StanzaErrorCondition::NotAcceptable,
                    "username and password are required",
                );
            };
            let Some(user) = crate::names::normalize_username(&username, &server.config.domain)
            else {
                return error(
                    StanzaErrorCondition::JidMalformed,
                    "not a valid user name (RFC 7622)",
                );
            };
            if password.is_empty() {
                return error(StanzaErrorCondition::NotAcceptable, "empty password");
            }
            // Counted before the attempt: failed ones (a name taken, say) cost the
            // same store work and may not be repeated at will.
            if !server.registration_attempt(from) {
                return error(
                    StanzaErrorCondition::ResourceConstraint,
                    "too many registrations from this address; try again later",
                );
            }
            let new = impmesh_store::NewUser {
                username: &user,
                password: &password,
                home_cluster: &server.config.cluster_name,
                home_node: &server.config.node_name,
            };
            match server.store.add_user(new).await {
                Ok(()) => {
                    tracing::info!(%user, %from, "account registered in-band");
                    format!("<iq type='result' id='{id}'/>")
                }
                Err(
                    impmesh_store::StoreError::UserExists(_)
                    | impmesh_store::StoreError::HomedAtPeer { .. },
                ) => error(StanzaErrorCondition::Conflict, "that user name is taken"),
                Err(impmesh_store::StoreError::InvalidPassword(_)) => error(
                    StanzaErrorCondition::NotAcceptable,
                    "the password has forbidden characters",
                ),
                Err(_) => error(
                    StanzaErrorCondition::InternalServerError,
                    "the store failed",
                ),
            }
        }
        _ => error(StanzaErrorCondition::BadRequest, "get or set"),
    }
}

impl Server {
    /// What the server answers on behalf of `user`'s account to a query `requester`
    /// sent to the account's bare JID (RFC 6120 §10.3.3): the result's payload (`None`
    /// for an empty result) or the error. The same whether the asker is on this
    /// cluster or came over a router link, and for the owner's own disco queries.
    pub(crate) async fn account_query(
        &self,
        iq: &Element,
        user: &str,
        requester: &Jid,
    ) -> Result<Option<String>, Refusal> {
        let Some(payload) = iq.children().next() else {
            return Err(StanzaErrorCondition::BadRequest.into());
        };
        match (iq.attr("type"), payload.name(), payload.ns().as_str()) {
            (Some("get"), "vCard", ns::VCARD) => Ok(self.vcard(user).await.map(Some)?),
            (Some("get"), "query", ns::DISCO_INFO) => {
                if let Some(node) = payload.attr("node") {
                    return self.pep_node_info(requester, user, node).await.map(Some);
                }
                let mut body = format!(
                    "<query xmlns='{}'><identity category='account' type='registered'/><identity category='pubsub' type='pep'/>",
                    ns::DISCO_INFO
                );
                for f in crate::pep::PEP_FEATURES {
                    body.push_str(&format!("<feature var='{f}'/>"));
                }
                for f in crate::push::PUSH_FEATURES {
                    body.push_str(&format!("<feature var='{f}'/>"));
                }
                body.push_str(&format!(
                    "<feature var='{}'/>",
                    crate::core::avatar::CONVERSION
                ));
                if self.config.archive.enabled {
                    for f in crate::mam::MAM_FEATURES {
                        body.push_str(&format!("<feature var='{f}'/>"));
                    }
                }
                body.push_str("</query>");
                Ok(Some(body))
            }
            (Some("get"), "query", ns::DISCO_ITEMS) => {
                if payload.attr("node").is_some() {
                    return Ok(Some(format!("<query xmlns='{}'/>", ns::DISCO_ITEMS)));
                }
                let items = self.pep_disco_items(requester, user).await;
                Ok(Some(format!(
                    "<query xmlns='{}'>{items}</query>",
                    ns::DISCO_ITEMS
                )))
            }
            (Some("get"), "ping", ns::PING) => Ok(None),
            (_, "pubsub", ns::PUBSUB | ns::PUBSUB_OWNER) => {
                self.pep_request(requester, user, iq).await
            }
            // Only the owner reads an archive.
            (_, _, ns::MAM) => Err(StanzaErrorCondition::Forbidden.into()),
            _ => Err(StanzaErrorCondition::ServiceUnavailable.into()),
        }
    }

    /// An IQ answer (result or error) from a client to `to`: a capabilities query's
    /// answer ends here; one for an account homed on another cluster goes there; the
    /// answers to the server's own pushes and pings end here too.
    async fn iq_answer(&self, iq: &Element, to: Option<&Jid>) {
        if self.caps_answer(iq) || self.push_answer(iq) {
            return;
        }
        if let Some(to) = to
            && to.domain().as_str() == self.config.domain
            && let Some(user) = to.node()
        {
            self.route_remote(user.as_str(), iq).await;
        }
    }

    /// A user's vCard (XEP-0054), empty when none was published.
    async fn vcard(&self, user: &str) -> Result<String, StanzaErrorCondition> {
        match self.store.vcard(user).await {
            Ok(Some(xml)) => Ok(xml),
            Ok(None) => Ok(format!("<vCard xmlns='{}'/>", ns::VCARD)),
            Err(_) => Err(StanzaErrorCondition::InternalServerError),
        }
    }
}
