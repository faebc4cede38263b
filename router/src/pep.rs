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

/// Capability hashes whose features are kept (each a few hundred bytes).
const CAPS_CACHE: usize = 4096;
/// disco#info queries for capabilities waiting for their answer, at most, and how long
/// one may wait.
const CAPS_PENDING: usize = 1024;
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

/// What the PEP service keeps in memory.
#[derive(Default)]
pub(crate) struct Pep {
    /// Verified features by capabilities hash.
    caps: Mutex<HashMap<String, Arc<[String]>>>,
    /// Queries in flight by IQ id, and the hashes they are for.
    asked: Mutex<(HashMap<String, Asked>, HashMap<String, String>)>,
    /// Per account: the full JIDs whose available presence it receives, with their
    /// capabilities hash.
    interest: Mutex<HashMap<String, HashMap<String, String>>>,
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

fn store_failed<E: std::fmt::Display>(e: E) -> Refusal {
    tracing::error!(error = %e, "PEP store operation failed");
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
                match store
                    .pep_publish(
                        owner,
                        &record_of(&node, &config),
                        &item,
                        limits.pep_max_nodes,
                    )
                    .await
                    .map_err(store_failed)?
                {
                    Published::Stored => {}
                    Published::NodeLimit => return Err(self.node_limit()),
                }
                let body = items_xml(&node, &[(&item.id, &item.payload)]);
                self.pep_notify(owner, &node, &config, &body).await;
                let done = format!(
                    "<publish node='{}'><item id='{}'/></publish>",
                    escape(&node),
                    escape(&item.id)
                );
                Ok(pubsub_result(ns::PUBSUB, &done))
            }
            Request::Retract { node, id, notify } => {
                let Some(existing) = store.pep_node(owner, &node).await.map_err(store_failed)?
                else {
                    return Err(StanzaErrorCondition::ItemNotFound.into());
                };
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
            Request::Items { node, ids, max } => {
                let Some(existing) = store.pep_node(owner, &node).await.map_err(store_failed)?
                else {
                    return Err(StanzaErrorCondition::ItemNotFound.into());
                };
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
                let Some(existing) = store.pep_node(owner, &node).await.map_err(store_failed)?
                else {
                    return Err(StanzaErrorCondition::ItemNotFound.into());
                };
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
                let Some(existing) = store.pep_node(owner, &node).await.map_err(store_failed)?
                else {
                    return Err(StanzaErrorCondition::ItemNotFound.into());
                };
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
                let Some(existing) = store.pep_node(owner, &node).await.map_err(store_failed)?
                else {
                    return Err(StanzaErrorCondition::ItemNotFound.into());
                };
                store.pep_purge(owner, &node).await.map_err(store_failed)?;
                let body = format!("<purge node='{}'/>", escape(&node));
                self.pep_notify(owner, &node, &config_of(&existing), &body)
                    .await;
                Ok(None)
            }
        }
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
            .get(owner)
            .map(|m| m.iter().map(|(j, v)| (j.clone(), v.clone())).collect())
            .unwrap_or_default();
        for (jid, ver) in watchers {
            if self.wants(&ver, node) && self.may_notify(owner, &owner_bare, &jid, config).await {
                self.send_event(&owner_bare, &jid, body);
            }
        }
    }

    /// Whether the features of capabilities `ver` ask for `node`'s notifications.
    fn wants(&self, ver: &str, node: &str) -> bool {
        lock(&self.pep.caps)
            .get(ver)
            .is_some_and(|f| pubsub::notify_nodes(f).any(|n| n == node))
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
        may_see(access, is_owner, subscribed).is_ok()
            && (is_owner || !self.is_blocked_by(owner, &bare).await)
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
            if let Some(m) = interest.get_mut(owner) {
                m.remove(&jid);
                if m.is_empty() {
                    interest.remove(owner);
                }
            }
            return;
        };
        let watchers = interest.entry(owner.to_owned()).or_default();
        if watchers.get(&jid) == Some(&caps.ver) {
            return;
        }
        if watchers.len() >= INTEREST_PER_OWNER && !watchers.contains_key(&jid) {
            return;
        }
        watchers.insert(jid.clone(), caps.ver.clone());
        drop(interest);
        let known = lock(&self.pep.caps).get(&caps.ver).cloned();
        match known {
            Some(features) => self.spawn_last_items(owner, &jid, features),
            None => self.ask_caps(owner, &jid, &caps),
        }
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
            if by_ver.contains_key(&caps.ver) || by_id.len() >= CAPS_PENDING {
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
            return true;
        };
        let features: Arc<[String]> = features.into();
        {
            let mut cache = lock(&self.pep.caps);
            if cache.len() >= CAPS_CACHE
                && let Some(old) = cache.keys().next().cloned()
            {
                cache.remove(&old);
            }
            cache.insert(asked.ver.clone(), features.clone());
        }
        // Every full JID seen with this hash meanwhile gets its last items now.
        let waiting: Vec<(String, String)> = lock(&self.pep.interest)
            .iter()
            .flat_map(|(owner, m)| {
                m.iter()
                    .filter(|(_, v)| **v == asked.ver)
                    .map(|(j, _)| (owner.clone(), j.clone()))
            })
            .collect();
        for (owner, jid) in waiting {
            self.spawn_last_items(&owner, &jid, features.clone());
        }
        true
    }

    fn spawn_last_items(&self, owner: &str, jid: &str, features: Arc<[String]>) {
        if pubsub::notify_nodes(&features).next().is_none() {
            return;
        }
        let Some(server) = self.me.upgrade() else {
            return;
        };
        let (owner, jid) = (owner.to_owned(), jid.to_owned());
        self.tasks.spawn(async move {
            server.last_items(&owner, &jid, &features).await;
        });
    }

    /// The last item of each of `owner`'s nodes that `jid` wants and may see.
    async fn last_items(&self, owner: &str, jid: &str, features: &[String]) {
        let Some(owner_bare) = stanza::bare(owner, &self.config.domain) else {
            return;
        };
        let Ok(nodes) = self.store.pep_nodes(owner).await else {
            return;
        };
        for node in nodes {
            let config = config_of(&node);
            if config.send_last != SendLast::OnSubAndPresence
                || !pubsub::notify_nodes(features).any(|n| n == node.node)
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
