//! What the router does with what router links bring: stanzas from users homed on
//! other clusters, handled as if a local user had sent them (never forwarded again),
//! and the presence of a remote node's users when its link goes down or comes back.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use jid::Jid;
use minidom::Element;

use crate::Server;
use crate::core::envelope::{IqType, PresenceType, Type};
use crate::error::StanzaErrorCondition;
use crate::hub::lock;
use crate::link::{LinkRouter, LinkSender, Pending};
use crate::stanza;
use crate::xml::escape;

/// The presence of remote users as this node passed it on, per remote node.
#[derive(Debug, Default)]
pub(crate) struct RemotePresence {
    /// Available presence delivered here from each remote node: sender's full JID →
    /// the local users who got it. When the node's link drops, they get unavailable.
    seen: Mutex<HashMap<String, HashMap<String, HashSet<String>>>>,
    /// (contact's bare JID, local user) pairs made unavailable by a lost link, per
    /// remote node: probed again when the node's link is back.
    lost: Mutex<HashMap<String, HashSet<(String, String)>>>,
}

impl LinkRouter for Server {
    fn bounce(&self, stanza: &Element, condition: StanzaErrorCondition, text: Option<&str>) {
        Server::bounce(self, stanza, condition, text);
    }

    fn received<'a>(
        &'a self,
        cluster: &'a str,
        node: &'a str,
        sender: LinkSender,
        ty: Type,
        to: Jid,
        stanza: Element,
    ) -> Pending<'a> {
        Box::pin(async move {
            if sender == LinkSender::Room {
                self.room_stanza_from_link(ty, &to, stanza).await;
                return;
            }
            if self.is_muc(&to) {
                self.muc_from_link(cluster, node, ty, &to, stanza).await;
                return;
            }
            match ty {
                Type::Message(_) => {
                    let mut stanza = stanza;
                    // Only the recipient's home stamps its archive id (XEP-0359 §5).
                    crate::core::archive::strip_stanza_ids(&mut stanza, to.to_bare().as_str());
                    if let Err(b) = self.deliver_local_message(stanza, &to).await {
                        self.bounce(&b.stanza, b.condition, b.text);
                    }
                }
                Type::Iq(ty) => self.iq_from_link(stanza, ty, &to).await,
                Type::Presence(ty) => self.presence_from_link(node, stanza, ty, &to).await,
            }
        })
    }

    fn node_lost(&self, node: &str) {
        self.remote_node_lost(node);
        self.muc_node_lost(node);
    }

    fn node_back<'a>(&'a self, node: &'a str) -> Pending<'a> {
        Box::pin(self.remote_node_back(node))
    }
}

impl Server {
    /// An IQ from a remote user: to a full JID it goes to that session; requests to a
    /// bare JID are answered for the account where this node can.
    async fn iq_from_link(&self, iq: Element, ty: IqType, to: &Jid) {
        let is_request = ty.is_request();
        let user = to.node().map(|n| n.to_string()).unwrap_or_default();
        let sender = iq
            .attr("from")
            .and_then(stanza::parse_jid)
            .map(|j| j.to_bare());
        let blocked = match &sender {
            Some(s) => self.is_blocked_by(&user, s).await,
            None => true,
        };
        if let Some(resource) = to.resource() {
            let target = self
                .hub
                .session(&user, resource.as_str())
                .filter(|_| !blocked);
            let from = crate::deliver::sender_of(&iq);
            let delivered = target.is_some_and(|t| t.send(String::from(&iq).into(), from).is_ok());
            if !delivered && is_request {
                let condition = match self.hub.session(&user, resource.as_str()) {
                    Some(_) if !blocked => StanzaErrorCondition::ResourceConstraint,
                    _ => StanzaErrorCondition::ServiceUnavailable,
                };
                self.bounce(&iq, condition, None);
            }
            return;
        }
        if !is_request {
            if !self.caps_answer(&iq) {
                self.push_answer(&iq);
            }
            return;
        }
        let exists = self.store.user_exists(&user).await.unwrap_or(false);
        if !exists || blocked {
            self.bounce(&iq, StanzaErrorCondition::ServiceUnavailable, None);
            return;
        }
        let Some(requester) = iq.attr("from").and_then(stanza::parse_jid) else {
            return;
        };
        match self.account_query(&iq, &user, &requester).await {
            Ok(payload) => {
                let reply = format!(
                    "<iq xmlns='jabber:client' type='result' id='{}' from='{}' to='{}'>{}</iq>",
                    escape(iq.attr("id").unwrap_or_default()),
                    escape(iq.attr("to").unwrap_or_default()),
                    escape(iq.attr("from").unwrap_or_default()),
                    payload.unwrap_or_default()
                );
                if let Some(reply) = stanza::parse_own(&reply) {
                    self.send_to_jid(&reply);
                }
            }
            Err(refusal) => {
                let app = refusal.app_element();
                if let Some(reply) = crate::error::error_reply_with(
                    &iq,
                    refusal.condition,
                    refusal.text.as_deref(),
                    app,
                ) {
                    self.send_to_jid(&reply);
                }
            }
        }
    }

    /// Presence from a remote user (sent by `node`): available and unavailable presence
    /// reach the recipient's available resources (a full JID: that resource);
    /// subscription stanzas get the inbound half of RFC 6121 §3 here, the recipient's
    /// home; a probe is answered with the recipient's current presence when the sender
    /// is subscribed to it.
    async fn presence_from_link(&self, node: &str, presence: Element, ty: PresenceType, to: &Jid) {
        let user = to.node().map(|n| n.to_string()).unwrap_or_default();
        let Some(from) = presence.attr("from").and_then(stanza::parse_jid) else {
            return;
        };
        match ty {
            PresenceType::Available | PresenceType::Unavailable => {
                let recorded =
                    to.resource().is_none() && self.pep_presence_from_link(&user, &presence).await;
                let xml: Arc<str> = String::from(&presence).into();
                let mut delivered = false;
                for s in self.hub.sessions(&user) {
                    let wanted = to
                        .resource()
                        .is_none_or(|r| r.as_str() == s.jid.resource().as_str());
                    if wanted && s.presence().available {
                        delivered |= s
                            .send(xml.clone(), crate::deliver::sender_of(&presence))
                            .is_ok();
                    }
                }
                tracing::debug!(%node, from = %from, to = %to, ?ty, delivered, "presence from a link");
                let mut seen = lock(&self.remote_presence.seen);
                let by_sender = seen.entry(node.to_owned()).or_default();
                let sender = from.to_string();
                // Kept also when an offline user's PEP service recorded the sender's
                // capabilities, so a lost link takes the sender out of it too.
                if ty == PresenceType::Available && (delivered || recorded) {
                    by_sender.entry(sender).or_default().insert(user);
                } else if let Some(users) = by_sender.get_mut(&sender) {
                    users.remove(&user);
                    if users.is_empty() {
                        by_sender.remove(&sender);
                    }
                }
            }
            PresenceType::Subscription(kind) => {
                self.inbound_subscription(&to.to_bare(), kind, &from.to_bare(), presence)
                    .await;
            }
            PresenceType::Probe => {
                let from_bare = from.to_bare();
                let subscribed = matches!(
                    self.roster_of(&user).await,
                    Ok(roster) if roster.get(from_bare.as_str()).is_some_and(|i| i.subscription.has_from())
                );
                if !subscribed {
                    return;
                }
                let Some(prober) = from_bare.node().map(|n| n.to_string()) else {
                    return;
                };
                for xml in self.probe(&prober, to.to_bare().as_str()).await {
                    if let Some(answer) = stanza::parse_own(&xml) {
                        self.send_to_jid(&answer);
                    }
                }
            }
            PresenceType::Error => {}
        }
    }

    /// The link from `node` went down: the local users who see presence from its users
    /// get unavailable from each of them (they must not look online forever).
    pub(crate) fn remote_node_lost(&self, node: &str) {
        let Some(senders) = lock(&self.remote_presence.seen).remove(node) else {
            return;
        };
        let mut lost = vec![];
        for (sender, users) in senders {
            let Some(from) = stanza::parse_jid(&sender) else {
                continue;
            };
            for user in users {
                let Some(to) = stanza::bare(&user, &self.config.domain) else {
                    continue;
                };
                let unavailable = format!(
                    "<presence xmlns='jabber:client' type='unavailable' from='{}' to='{}'/>",
                    escape(&sender),
                    escape(to.as_str())
                );
                if let Some(p) = stanza::parse_own(&unavailable) {
                    self.pep_presence(&user, &p);
                    self.to_available_resources(&user, &p);
                }
                lost.push((from.to_bare().to_string(), user));
            }
        }
        tracing::info!(%node, contacts = lost.len(), "router link lost; its users' presence marked unavailable");
        lock(&self.remote_presence.lost)
            .entry(node.to_owned())
            .or_default()
            .extend(lost);
    }

    /// The link from `node` is back: the presence lost with it is probed again.
    async fn remote_node_back(&self, node: &str) {
        let Some(pairs) = lock(&self.remote_presence.lost).remove(node) else {
            return;
        };
        for (contact, user) in pairs {
            if !self
                .hub
                .sessions(&user)
                .iter()
                .any(|s| s.presence().available)
            {
                continue;
            }
            let Some(contact_user) =
                stanza::parse_jid(&contact).and_then(|j| j.node().map(|n| n.to_string()))
            else {
                continue;
            };
            let Some(from) = stanza::bare(&user, &self.config.domain) else {
                continue;
            };
            let probe = format!(
                "<presence xmlns='jabber:client' type='probe' from='{}' to='{}'/>",
                escape(from.as_str()),
                escape(&contact)
            );
            if let Some(p) = stanza::parse_own(&probe) {
                self.route_remote(&contact_user, &p).await;
            }
        }
    }
}
