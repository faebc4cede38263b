//! Personal eventing (XEP-0163) on each account's home node: requests, notifications
//! and the entity capabilities (XEP-0115) that say who wants them.
//!
//! Who is notified: the owner's resources and the contacts subscribed to the owner's
//! presence, each full JID whose capabilities list `NODE+notify`, as the access model
//! allows. This node learns those full JIDs from the presence that reaches the owner's
//! account (from this cluster's sessions and over router links), whether or not the
//! owner is online; their capabilities are asked once per hash (disco#info from the
//! owner's bare JID), verified and cached. A full JID first seen (or with new
//! capabilities) gets the last item of each node it wants. The decisions are in
//! `core::pubsub` and `core::caps`; here are the store calls and the sending.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use impmesh_store::{PepItem, PepNode, Published};
use jid::{BareJid, Jid};
use minidom::Element;
use tokio::time::Instant;

use crate::Server;
use crate::core::caps::{self, Caps};
use crate::core::pubsub::{
    self, Access, NodeConfig, Refusal, Request, SendLast, event_message, items_xml, may_see,
};
use crate::error::StanzaErrorCondition;
use crate::hub::lock;
use crate::stanza;
use crate::xml::{escape, ns};

/// Capability hashes whose notification interests are kept; a hash no full JID uses
/// any more makes room for a new one.
const CAPS_CACHE: usize = 4096;
/// `+notify` nodes kept per hash, and bytes of one node name.
const CAPS_NODES: usize = 256;
const CAPS_NODE_BYTES: usize = 1024;
/// disco#info queries for capabilities waiting for their answer, at most; per asked
/// account; and how long one may wait.
const CAPS_PENDING: usize = 1024;
const CAPS_PENDING_PER_ACCOUNT: usize = 4;
const CAPS_TIMEOUT: Duration = Duration::from_secs(60);
/// Full JIDs whose presence one account receives that are remembered for its
/// notifications (a full roster's contacts, each with a few resources).
const INTEREST_PER_OWNER: usize = 10_000;

/// The features an account's disco#info lists for its PEP service.
pub const PEP_FEATURES: &[&str] = &[
    "http://jabber.org/protocol/pubsub",
    "http://jabber.org/protocol/pubsub#access-open",
    "http://jabber.org/protocol/pubsub#access-presence",
    "http://jabber.org/protocol/pubsub#access-whitelist",
    "http://jabber.org/protocol/pubsub#auto-create",
    "http://jabber.org/protocol/pubsub#config-node",
    "http://jabber.org/protocol/pubsub#create-nodes",
    "http://jabber.org/protocol/pubsub#delete-nodes",
    "http://jabber.org/protocol/pubsub#filtered-notifications",
    "http://jabber.org/protocol/pubsub#item-ids",
    "http://jabber.org/protocol/pubsub#last-published",
    "http://jabber.org/protocol/pubsub#multi-items",
    "http://jabber.org/protocol/pubsub#persistent-items",
    "http://jabber.org/protocol/pubsub#presence-notifications",
    "http://jabber.org/protocol/pubsub#publish",
    "http://jabber.org/protocol/pubsub#publish-options",
    "http://jabber.org/protocol/pubsub#purge-nodes",
    "http://jabber.org/protocol/pubsub#retract-items",
    "http://jabber.org/protocol/pubsub#retrieve-items",
];

/// A capabilities query waiting for its answer.
struct Asked {
    /// The full JID asked: only its answer counts.
    jid: String,
    ver: String,
    since: Instant,
}

/// Per account: the full JIDs whose available presence it receives, with their
/// capabilities hash; and how many of those use each hash.
#[derive(Default)]
struct Interest {
    by_owner: HashMap<String, HashMap<String, String>>,
    uses: HashMap<String, usize>,
}

impl Interest {
    /// Records `jid`'s hash for `owner`; false when it was already so, or the owner
    /// has no room.
    fn insert(&mut self, owner: &str, jid: &str, ver: &str) -> bool {
        let watchers = self.by_owner.entry(owner.to_owned()).or_default();
        match watchers.get(jid) {
            Some(v) if v == ver => return false,
            None if watchers.len() >= INTEREST_PER_OWNER => return false,
            _ => {}
        }
        if let Some(old) = watchers.insert(jid.to_owned(), ver.to_owned()) {
            release(&mut self.uses, &old);
        }
        *self.uses.entry(ver.to_owned()).or_default() += 1;
        true
    }

    fn remove(&mut self, owner: &str, jid: &str) {
        let Some(watchers) = self.by_owner.get_mut(owner) else {
            return;
        };
        if let Some(old) = watchers.remove(jid) {
            release(&mut self.uses, &old);
        }
        if watchers.is_empty() {
            self.by_owner.remove(owner);
        }
    }
}

fn release(uses: &mut HashMap<String, usize>, ver: &str) {
    if let Some(n) = uses.get_mut(ver) {
        *n -= 1;
        if *n == 0 {
            uses.remove(ver);
        }
    }
}

/// What the PEP service keeps in memory.
#[derive(Default)]
pub(crate) struct Pep {
    /// The `+notify` nodes of each verified capabilities hash.
    caps: Mutex<HashMap<String, Arc<[String]>>>,
    /// Queries in flight by IQ id, and the hashes they are for.
    asked: Mutex<(HashMap<String, Asked>, HashMap<String, String>)>,
    interest: Mutex<Interest>,
}

impl std::fmt::Debug for Pep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pep").finish_non_exhaustive()
    }
}

fn config_of(node: &PepNode) -> NodeConfig {
    NodeConfig {
        access: Access::parse(&node.access_model).unwrap_or(Access::Presence),
        persist_items: node.persist_items,
        max_items: node.max_items,
        send_last: SendLast::parse(&node.send_last).unwrap_or(SendLast::OnSubAndPresence),
        notify_retract: node.notify_retract,
    }
}

fn record_of(node: &str, c: &NodeConfig) -> PepNode {
    PepNode {
        node: node.to_owned(),
        access_model: c.access.as_str().to_owned(),
        persist_items: c.persist_items,
        max_items: c.max_items,
        send_last: c.send_last.as_str().to_owned(),
        notify_retract: c.notify_retract,
    }
}

/// A store failure as the client sees it: `internal-server-error`, logged.
pub(crate) fn store_failed<E: std::fmt::Display>(e: E) -> Refusal {
    tracing::error!(error = %e, "a store operation failed");
    StanzaErrorCondition::InternalServerError.into()
}

fn pubsub_result(ns: &str, inner: &str) -> Option<String> {
    Some(format!("<pubsub xmlns='{ns}'>{inner}</pubsub>"))
}

impl Server {
    /// A `<pubsub/>` request to `owner`'s PEP service from `requester` (anyone for
    /// retrieval, the owner for the rest): the result's payload or the refusal.
    pub(crate) async fn pep_request(
        &self,
        requester: &Jid,
        owner: &str,
        iq: &Element,
    ) -> Result<Option<String>, Refusal> {
        let Some(pubsub) = iq.children().next() else {
            return Err(StanzaErrorCondition::BadRequest.into());
        };
        let set = iq.attr("type") == Some("set");
        let owner_bare = stanza::bare(owner, &self.config.domain)
            .ok_or(Refusal::from(StanzaErrorCondition::ItemNotFound))?;
        let is_owner = requester.to_bare() == owner_bare;
        let request = pubsub::parse_request(pubsub, set)?;
        if !is_owner && !matches!(request, Request::Items { .. }) {
            return Err(StanzaErrorCondition::Forbidden.into());
        }
        let limits = &self.config.limits;
        let store = &self.store;
        match request {
            Request::Publish {
                node,
                id,
                payload,
                options,
            } => {
                let xml = String::from(payload);
                if xml.len() > limits.pep_max_item_bytes {
                    return Err(Refusal::new(
                        StanzaErrorCondition::NotAcceptable,
                        "payload-too-big",
                    )
                    .with_text(format!(
                        "an item holds at most {} bytes",
                        limits.pep_max_item_bytes
                    )));
                }
                let wanted = match options {
                    Some(form) => pubsub::settings(form, limits.pep_max_items).map_err(|u| {
                        Refusal::new(StanzaErrorCondition::Conflict, "precondition-not-met")
                            .with_text(format!("unsupported publish option {}", u.0))
                    })?,
                    None => vec![],
                };
                let config = match store.pep_node(owner, &node).await.map_err(store_failed)? {
                    Some(existing) => {
                        let config = config_of(&existing);
                        if !config.satisfies(&wanted) {
                            return Err(Refusal::new(
                                StanzaErrorCondition::Conflict,
                                "precondition-not-met",
                            )
                            .with_text(
                                "the node's configuration differs from the publish options",
                            ));
                        }
                        config
                    }
                    None => {
                        let mut config = NodeConfig::default();
                        config.apply(&wanted);
                        config
                    }
                };
                let item = PepItem {
                    id: id.unwrap_or_else(crate::names::random_id),
                    payload: xml,
                };
                let quota = impmesh_store::PepQuota {
                    nodes: limits.pep_max_nodes,
                    bytes: limits.pep_max_account_bytes,
                };
                let published = store
                    .pep_publish(owner, &record_of(&node, &config), &item, quota)
                    .await
                    .map_err(store_failed)?;
                match published {
                    Published::Stored => {}
                    Published::NodeLimit => return Err(self.node_limit()),
                    Published::QuotaFull => {
                        return Err(Refusal::from(StanzaErrorCondition::ResourceConstraint)
                            .with_text(format!(
                                "an account's PEP items hold at most {} bytes",
                                limits.pep_max_account_bytes
                            )));
                    }
                }
                let body = items_xml(&node, &[(&item.id, &item.payload)]);
                self.pep_notify(owner, &node, &config, &body).await;
                self.avatar_published(owner, &node, &item.payload).await;
                let done = format!(
                    "<publish node='{}'><item id='{}'/></publish>",
                    escape(&node),
                    escape(&item.id)
                );
                Ok(pubsub_result(ns::PUBSUB, &done))
            }
            Request::Retract { node, id, notify } => {
                let existing = self.existing_node(owner, &node).await?;
                if !store
                    .pep_retract(owner, &node, &id)
                    .await
                    .map_err(store_failed)?
                {
                    return Err(StanzaErrorCondition::ItemNotFound.into());
                }
                let config = config_of(&existing);
                if notify || config.notify_retract {
                    let body = pubsub::retract_xml(&node, &id);
                    self.pep_notify(owner, &node, &config, &body).await;
                }
                Ok(None)
            }
            Request::Items { node, mut ids, max } => {
                // A request names at most as many items as a node keeps.
                ids.truncate(limits.pep_max_items as usize);
                let existing = self.existing_node(owner, &node).await?;
                let config = config_of(&existing);
                let subscribed = self.subscribed_to(owner, &requester.to_bare()).await;
                may_see(config.access, is_owner, subscribed)?;
                let items = if ids.is_empty() {
                    let max = max.unwrap_or(usize::MAX).min(existing.kept() as usize);
                    store.pep_items(owner, &node, max).await
                } else {
                    store.pep_items_by_id(owner, &node, &ids).await
                }
                .map_err(store_failed)?;
                // The newest items that fit in one stanza; older ones by id.
                let mut budget = limits.max_stanza_bytes.saturating_sub(1024);
                let mut kept: Vec<(&str, &str)> = vec![];
                for item in items.iter().rev() {
                    let size = item.payload.len() + item.id.len() + 32;
                    if size > budget {
                        break;
                    }
                    budget -= size;
                    kept.push((&item.id, &item.payload));
                }
                kept.reverse();
                Ok(pubsub_result(ns::PUBSUB, &items_xml(&node, &kept)))
            }
            Request::Create { node, config: form } => {
                let mut config = NodeConfig::default();
                if let Some(form) = form {
                    config.apply(&self.settings_or_refuse(form)?);
                }
                if store
                    .pep_create(owner, &record_of(&node, &config), limits.pep_max_nodes)
                    .await
                    .map_err(store_failed)?
                {
                    return Ok(None);
                }
                if store
                    .pep_node(owner, &node)
                    .await
                    .map_err(store_failed)?
                    .is_some()
                {
                    return Err(StanzaErrorCondition::Conflict.into());
                }
                Err(self.node_limit())
            }
            Request::Configure { node, form } => {
                let existing = self.existing_node(owner, &node).await?;
                let mut config = config_of(&existing);
                let Some(form) = form else {
                    let inner = format!(
                        "<configure node='{}'>{}</configure>",
                        escape(&node),
                        config.form("form")
                    );
                    return Ok(pubsub_result(ns::PUBSUB_OWNER, &inner));
                };
                if form.attr("type") == Some("cancel") {
                    return Ok(None);
                }
                config.apply(&self.settings_or_refuse(form)?);
                store
                    .pep_configure(owner, &record_of(&node, &config))
                    .await
                    .map_err(store_failed)?;
                Ok(None)
            }
            Request::Delete { node } => {
                let existing = self.existing_node(owner, &node).await?;
                store
                    .pep_delete_node(owner, &node)
                    .await
                    .map_err(store_failed)?;
                let body = format!("<delete node='{}'/>", escape(&node));
                self.pep_notify(owner, &node, &config_of(&existing), &body)
                    .await;
                Ok(None)
            }
            Request::Purge { node } => {
                let existing = self.existing_node(owner, &node).await?;
                store.pep_purge(owner, &node).await.map_err(store_failed)?;
                let body = format!("<purge node='{}'/>", escape(&node));
                self.pep_notify(owner, &node, &config_of(&existing), &body)
                    .await;
                Ok(None)
            }
        }
    }

    /// One of `owner`'s nodes, or `item-not-found`.
    async fn existing_node(&self, owner: &str, node: &str) -> Result<PepNode, Refusal> {
        self.store
            .pep_node(owner, node)
            .await
            .map_err(store_failed)?
            .ok_or_else(|| StanzaErrorCondition::ItemNotFound.into())
    }

    fn node_limit(&self) -> Refusal {
        Refusal::new(StanzaErrorCondition::NotAllowed, "max-nodes-exceeded").with_text(format!(
            "an account has at most {} PEP nodes",
            self.config.limits.pep_max_nodes
        ))
    }

    fn settings_or_refuse(&self, form: &Element) -> Result<Vec<pubsub::Setting>, Refusal> {
        pubsub::settings(form, self.config.limits.pep_max_items).map_err(|u| {
            Refusal::from(StanzaErrorCondition::NotAcceptable)
                .with_text(format!("unsupported node configuration {}", u.0))
        })
    }

    /// Whether `owner`'s roster has `contact` subscribed to the owner's presence.
    async fn subscribed_to(&self, owner: &str, contact: &BareJid) -> bool {
        matches!(
            self.roster_of(owner).await,
            Ok(roster) if roster.get(contact.as_str()).is_some_and(|i| i.subscription.has_from())
        )
    }

    /// disco#info on one of `owner`'s nodes (XEP-0060 §5.4): a leaf, to those who may
    /// see it; `item-not-found` to others, as for a node that does not exist.
    pub(crate) async fn pep_node_info(
        &self,
        requester: &Jid,
        owner: &str,
        node: &str,
    ) -> Result<String, Refusal> {
        let owner_bare = stanza::bare(owner, &self.config.domain)
            .ok_or(Refusal::from(StanzaErrorCondition::ItemNotFound))?;
        let Some(existing) = self
            .store
            .pep_node(owner, node)
            .await
            .map_err(store_failed)?
        else {
            return Err(StanzaErrorCondition::ItemNotFound.into());
        };
        let is_owner = requester.to_bare() == owner_bare;
        let subscribed = self.subscribed_to(owner, &requester.to_bare()).await;
        if may_see(config_of(&existing).access, is_owner, subscribed).is_err() {
            return Err(StanzaErrorCondition::ItemNotFound.into());
        }
        Ok(format!(
            "<query xmlns='{}' node='{}'><identity category='pubsub' type='leaf'/><feature var='{}'/></query>",
            ns::DISCO_INFO,
            escape(node),
            ns::PUBSUB
        ))
    }

    /// The `<item/>`s of disco#items on `owner`'s account: the nodes `requester` may see.
    pub(crate) async fn pep_disco_items(&self, requester: &Jid, owner: &str) -> String {
        let Some(owner_bare) = stanza::bare(owner, &self.config.domain) else {
            return String::new();
        };
        let Ok(nodes) = self.store.pep_nodes(owner).await else {
            return String::new();
        };
        let is_owner = requester.to_bare() == owner_bare;
        let subscribed = self.subscribed_to(owner, &requester.to_bare()).await;
        nodes
            .iter()
            .filter(|n| may_see(config_of(n).access, is_owner, subscribed).is_ok())
            .map(|n| {
                format!(
                    "<item jid='{}' node='{}'/>",
                    escape(owner_bare.as_str()),
                    escape(&n.node)
                )
            })
            .collect()
    }

    /// Sends an event of `owner`'s `node` to every full JID that wants it and may see it.
    async fn pep_notify(&self, owner: &str, node: &str, config: &NodeConfig, body: &str) {
        let Some(owner_bare) = stanza::bare(owner, &self.config.domain) else {
            return;
        };
        let watchers: Vec<(String, String)> = lock(&self.pep.interest)
            .by_owner
            .get(owner)
            .map(|m| m.iter().map(|(j, v)| (j.clone(), v.clone())).collect())
            .unwrap_or_default();
        for (jid, ver) in watchers {
            if self.wants(&ver, node) && self.may_notify(owner, &owner_bare, &jid, config).await {
                self.send_event(&owner_bare, &jid, body);
            }
        }
    }

    /// Whether capabilities `ver` ask for `node`'s notifications.
    fn wants(&self, ver: &str, node: &str) -> bool {
        lock(&self.pep.caps)
            .get(ver)
            .is_some_and(|nodes| nodes.iter().any(|n| n == node))
    }

    async fn may_notify(
        &self,
        owner: &str,
        owner_bare: &BareJid,
        jid: &str,
        c: &NodeConfig,
    ) -> bool {
        let Some(bare) = stanza::parse_jid(jid).map(|j| j.to_bare()) else {
            return false;
        };
        let is_owner = bare == *owner_bare;
        // Notifications go to the owner's contacts, whatever the access model.
        let subscribed = self.subscribed_to(owner, &bare).await;
        let access = if c.access == Access::Open {
            Access::Presence
        } else {
            c.access
        };
        if may_see(access, is_owner, subscribed).is_err() {
            return false;
        }
        // Neither side may block the other (a contact homed elsewhere: its home node
        // checks its own list too).
        let contact = bare.node().map(|n| n.to_string()).unwrap_or_default();
        is_owner
            || (!self.is_blocked_by(owner, &bare).await
                && !self.is_blocked_by(&contact, owner_bare).await)
    }

    fn send_event(&self, owner_bare: &BareJid, to: &str, body: &str) {
        let xml = event_message(owner_bare.as_str(), to, &crate::names::random_id(), body);
        if let Some(message) = stanza::parse_own(&xml) {
            self.send_to_jid(&message);
        }
    }

    /// Presence that reached `owner`'s account (from a contact's resource or one of the
    /// owner's own): who wants `owner`'s notifications, and the last items for a newly
    /// seen full JID.
    pub(crate) fn pep_presence(&self, owner: &str, presence: &Element) {
        let Some(from) = presence.attr("from").and_then(stanza::parse_jid) else {
            return;
        };
        if from.resource().is_none() {
            return;
        }
        let jid = from.to_string();
        let caps = match presence.attr("type") {
            None => Caps::of_presence(presence),
            Some("unavailable") => None,
            Some(_) => return,
        };
        let mut interest = lock(&self.pep.interest);
        let Some(caps) = caps else {
            interest.remove(owner, &jid);
            return;
        };
        if !interest.insert(owner, &jid, &caps.ver) {
            return;
        }
        drop(interest);
        let known = lock(&self.pep.caps).get(&caps.ver).cloned();
        match known {
            Some(nodes) => self.spawn_last_items(owner, &jid, nodes),
            None => self.ask_caps(owner, &jid, &caps),
        }
    }

    /// [`Server::pep_presence`] for a presence from another cluster: recorded only
    /// for an account homed here whose roster subscribes it to the sender, neither
    /// blocking the other (a peer cannot fill this node's memory with strangers).
    /// True when recorded.
    pub(crate) async fn pep_presence_from_link(&self, owner: &str, presence: &Element) -> bool {
        if !presence.has_child("c", ns::CAPS) || presence.attr("type").is_some() {
            self.pep_presence(owner, presence);
            return false;
        }
        let Some(sender) = presence
            .attr("from")
            .and_then(stanza::parse_jid)
            .map(|j| j.to_bare())
        else {
            return false;
        };
        let Some(owner_bare) = stanza::bare(owner, &self.config.domain) else {
            return false;
        };
        let subscribed = matches!(
            self.roster_of(owner).await,
            Ok(roster) if roster.get(sender.as_str()).is_some_and(|i| i.subscription.has_to())
        );
        let sender_user = sender.node().map(|n| n.to_string()).unwrap_or_default();
        if !subscribed
            || !self.store.user_exists(owner).await.unwrap_or(false)
            || self.is_blocked_by(owner, &sender).await
            || self.is_blocked_by(&sender_user, &owner_bare).await
        {
            return false;
        }
        self.pep_presence(owner, presence);
        true
    }

    /// [`Server::pep_presence`] for a presence sent by a subscription step, when its
    /// recipient is an account homed here (elsewhere, its home node hears of it).
    pub(crate) async fn pep_presence_if_homed_here(&self, presence: &Element) {
        let Some(owner) = presence
            .attr("to")
            .and_then(stanza::parse_jid)
            .and_then(|j| j.node().map(|n| n.to_string()))
        else {
            return;
        };
        if !self.hub.sessions(&owner).is_empty()
            || self.store.user_exists(&owner).await.unwrap_or(false)
        {
            self.pep_presence(&owner, presence);
        }
    }

    /// Asks `jid` what its capabilities hash stands for (once per hash at a time).
    fn ask_caps(&self, owner: &str, jid: &str, caps: &Caps) {
        let Some(owner_bare) = stanza::bare(owner, &self.config.domain) else {
            return;
        };
        let id = format!("caps-{}", crate::names::random_id());
        {
            let mut guard = lock(&self.pep.asked);
            let (by_id, by_ver) = &mut *guard;
            let now = Instant::now();
            by_id.retain(|_, a| now.duration_since(a.since) < CAPS_TIMEOUT);
            by_ver.retain(|_, id| by_id.contains_key(id));
            // One account's clients cannot hold every slot (unanswered, new hashes).
            let account = stanza::bare_of(jid);
            let of_account = by_id
                .values()
                .filter(|a| stanza::bare_of(&a.jid) == account)
                .count();
            if by_ver.contains_key(&caps.ver)
                || by_id.len() >= CAPS_PENDING
                || of_account >= CAPS_PENDING_PER_ACCOUNT
            {
                return;
            }
            by_ver.insert(caps.ver.clone(), id.clone());
            by_id.insert(
                id.clone(),
                Asked {
                    jid: jid.to_owned(),
                    ver: caps.ver.clone(),
                    since: now,
                },
            );
        }
        let query = format!(
            "<iq xmlns='jabber:client' type='get' id='{}' from='{}' to='{}'><query xmlns='{}' node='{}'/></iq>",
            escape(&id),
            escape(owner_bare.as_str()),
            escape(jid),
            ns::DISCO_INFO,
            escape(&caps.disco_node())
        );
        if let Some(iq) = stanza::parse_own(&query) {
            self.send_to_jid(&iq);
        }
    }

    /// An IQ answer addressed to an account of this node: true when it answered one
    /// of the capabilities queries (then it goes no further).
    pub(crate) fn caps_answer(&self, iq: &Element) -> bool {
        let Some(id) = iq.attr("id").filter(|id| id.starts_with("caps-")) else {
            return false;
        };
        let asked = {
            let mut guard = lock(&self.pep.asked);
            let (by_id, by_ver) = &mut *guard;
            match by_id.get(id) {
                Some(a) if iq.attr("from") == Some(a.jid.as_str()) => {
                    let a = by_id.remove(id);
                    if let Some(a) = &a {
                        by_ver.remove(&a.ver);
                    }
                    a
                }
                _ => None,
            }
        };
        let Some(asked) = asked else {
            return false;
        };
        let features = iq
            .get_child("query", ns::DISCO_INFO)
            .filter(|_| iq.attr("type") == Some("result"))
            .and_then(|q| caps::verified_features(q, &asked.ver));
        let Some(features) = features else {
            tracing::debug!(jid = %asked.jid, ver = %asked.ver, "capabilities not verified");
            // Another full JID that claims the same hash is asked instead.
            let other = lock(&self.pep.interest)
                .by_owner
                .iter()
                .find_map(|(owner, m)| {
                    m.iter()
                        .find(|(j, v)| **v == asked.ver && **j != asked.jid)
                        .map(|(j, v)| (owner.clone(), j.clone(), v.clone()))
                });
            if let Some((owner, jid, ver)) = other
                && let Some(node) = iq
                    .get_child("query", ns::DISCO_INFO)
                    .and_then(|q| q.attr("node"))
                    .and_then(|n| n.rsplit_once('#'))
                    .map(|(n, _)| n.to_owned())
            {
                self.ask_caps(&owner, &jid, &Caps { node, ver });
            }
            return true;
        };
        let nodes: Arc<[String]> = pubsub::notify_nodes(&features)
            .filter(|n| n.len() <= CAPS_NODE_BYTES)
            .take(CAPS_NODES)
            .map(String::from)
            .collect();
        {
            let interest = lock(&self.pep.interest);
            let mut cache = lock(&self.pep.caps);
            if cache.len() >= CAPS_CACHE {
                // Room is made from hashes nobody uses now; when all are in use, this
                // one is not kept (its users get no notifications: logged).
                let unused = cache
                    .keys()
                    .find(|v| !interest.uses.contains_key(*v))
                    .cloned();
                match unused {
                    Some(old) => {
                        cache.remove(&old);
                    }
                    None => {
                        tracing::warn!(ver = %asked.ver, "the capabilities cache is full of hashes in use; not kept");
                        return true;
                    }
                }
            }
            cache.insert(asked.ver.clone(), nodes.clone());
        }
        // Every full JID seen with this hash meanwhile gets its last items now.
        let waiting: Vec<(String, String)> = lock(&self.pep.interest)
            .by_owner
            .iter()
            .flat_map(|(owner, m)| {
                m.iter()
                    .filter(|(_, v)| **v == asked.ver)
                    .map(|(j, _)| (owner.clone(), j.clone()))
            })
            .collect();
        for (owner, jid) in waiting {
            self.spawn_last_items(&owner, &jid, nodes.clone());
        }
        true
    }

    /// Sends `jid` the last items it wants (`nodes`: its `+notify` interests).
    fn spawn_last_items(&self, owner: &str, jid: &str, nodes: Arc<[String]>) {
        if nodes.is_empty() {
            return;
        }
        let Some(server) = self.me.upgrade() else {
            return;
        };
        let (owner, jid) = (owner.to_owned(), jid.to_owned());
        self.tasks.spawn(async move {
            server.last_items(&owner, &jid, &nodes).await;
        });
    }

    /// The last item of each of `owner`'s nodes that `jid` wants (`wanted`) and may see.
    async fn last_items(&self, owner: &str, jid: &str, wanted: &[String]) {
        let Some(owner_bare) = stanza::bare(owner, &self.config.domain) else {
            return;
        };
        let Ok(nodes) = self.store.pep_nodes(owner).await else {
            return;
        };
        for node in nodes {
            let config = config_of(&node);
            if config.send_last != SendLast::OnSubAndPresence
                || !wanted.contains(&node.node)
                || !self.may_notify(owner, &owner_bare, jid, &config).await
            {
                continue;
            }
            if let Ok(items) = self.store.pep_items(owner, &node.node, 1).await
                && let Some(last) = items.last()
            {
                let body = items_xml(&node.node, &[(&last.id, &last.payload)]);
                self.send_event(&owner_bare, jid, &body);
            }
        }
    }
}
