//! Message routing and delivery (RFC 6121 §8), offline storage (XEP-0160) and message
//! carbons (XEP-0280).

use std::sync::Arc;

use jid::{BareJid, FullJid, Jid};
use minidom::Element;

use impmesh_store::Offline;

use crate::Server;
use crate::context::Context;
use crate::core::archive;
use crate::core::delivery::{self, Delivery, MessageType, Resource};
use crate::error::{StanzaErrorCondition, error_reply};
use crate::hub::SessionHandle;
use crate::stanza::{self, Kind};
use crate::xml::ns;

impl Context<'_> {
    /// A message from this session's client.
    pub(crate) async fn on_message(&mut self, message: Element, to: Option<Jid>) {
        let Some(to) = to else {
            // A message to the server itself: nothing here handles messages.
            self.reply_error(&message, StanzaErrorCondition::ServiceUnavailable, None);
            return;
        };
        if self.server.is_muc(&to) {
            self.on_muc_message(&message, &to).await;
            return;
        }
        if to.node().is_none() {
            if to.domain().as_str() == self.server.config.domain {
                self.reply_error(&message, StanzaErrorCondition::ServiceUnavailable, None);
            } else {
                self.reply_error(
                    &message,
                    StanzaErrorCondition::RemoteServerNotFound,
                    Some("this server does not federate with other domains"),
                );
            }
            return;
        }
        if self.server.is_blocked_by(&self.user(), &to.to_bare()).await {
            // XEP-0191 §3.4: a blocked recipient gets nothing; the sender learns why.
            let blocked = Element::bare("blocked", ns::BLOCKING_ERRORS);
            if let Some(mut reply) = crate::error::error_reply_with(
                &message,
                StanzaErrorCondition::NotAcceptable,
                None,
                Some(blocked),
            ) {
                stanza::set_attr(&mut reply, "to", &self.jid().to_string());
                self.send_self(&reply);
            }
            return;
        }
        let from = self.jid().clone();
        let mut message = message;
        // Only this server stamps stanza-ids for its accounts (XEP-0359 §5).
        archive::strip_stanza_ids(&mut message, from.to_bare().as_str());
        archive::strip_stanza_ids(&mut message, to.to_bare().as_str());
        let sent = self.server.archive_sent(&self.user(), &message, &to).await;
        let (sent_id, xml) = sent.unzip();
        self.server
            .send_carbons_sent(&from, &message, sent_id.as_deref());
        // The sender is this session: its error goes straight to its own output, not
        // through its queue (a flooding sender gets every bounce it caused).
        if let Err(bounce) = self.server.deliver_message_as(message, &to, xml).await {
            self.reply_error(&bounce.stanza, bounce.condition, bounce.text);
        }
    }
}

/// A stanza that could not be delivered, and why: the caller tells its sender.
#[derive(Debug)]
pub(crate) struct Bounce {
    pub stanza: Element,
    pub condition: StanzaErrorCondition,
    pub text: Option<&'static str>,
}

fn bounce(
    stanza: Element,
    condition: StanzaErrorCondition,
    text: Option<&'static str>,
) -> Result<(), Box<Bounce>> {
    Err(Box::new(Bounce {
        stanza,
        condition,
        text,
    }))
}

impl Server {
    /// Delivers a message to a JID of this domain: over a router link when the
    /// recipient is homed on another cluster, else here. What cannot be delivered
    /// comes back for the caller to bounce.
    pub(crate) async fn deliver_message(
        &self,
        message: Element,
        to: &Jid,
    ) -> Result<(), Box<Bounce>> {
        self.deliver_message_as(message, to, None).await
    }

    /// Delivers a message like `deliver_message`; `xml`, when given, is the message
    /// serialized (by the sender's archive), used rather than serializing it again.
    async fn deliver_message_as(
        &self,
        message: Element,
        to: &Jid,
        xml: Option<Arc<str>>,
    ) -> Result<(), Box<Bounce>> {
        if let Some(user) = to.node()
            && to.domain().as_str() == self.config.domain
            && self.route_remote(user.as_str(), &message).await
        {
            return Ok(());
        }
        self.deliver_local_message_as(message, to, xml).await
    }

    /// Delivers a message like `deliver_message`, bouncing what cannot be delivered
    /// through the sender's queue.
    pub async fn deliver_or_bounce(&self, message: Element, to: &Jid) {
        if let Err(b) = self.deliver_message(message, to).await {
            self.bounce(&b.stanza, b.condition, b.text);
        }
    }

    /// Delivers a message to a user of this node by RFC 6121 §8.5, with offline storage
    /// and carbons. What cannot be delivered comes back for the caller to bounce.
    pub(crate) async fn deliver_local_message(
        &self,
        message: Element,
        to: &Jid,
    ) -> Result<(), Box<Bounce>> {
        self.deliver_local_message_as(message, to, None).await
    }

    /// `deliver_local_message` with the message serialized already, when `xml` is
    /// given.
    async fn deliver_local_message_as(
        &self,
        mut message: Element,
        to: &Jid,
        xml: Option<Arc<str>>,
    ) -> Result<(), Box<Bounce>> {
        let domain = &self.config.domain;
        let Some(user) = to.node().map(|n| n.to_string()) else {
            return Ok(());
        };
        if to.domain().as_str() != domain {
            return bounce(message, StanzaErrorCondition::RemoteServerNotFound, None);
        }
        let sender = message.attr("from").and_then(stanza::parse_jid);
        if let Some(sender) = &sender
            && self.is_blocked_by(&user, &sender.to_bare()).await
        {
            return bounce(message, StanzaErrorCondition::ServiceUnavailable, None);
        }
        // Stamped before delivery, stored in the archive once delivered or kept.
        let (archived, stamped) = self
            .archive_received(&user, &mut message, xml.as_ref())
            .await
            .unzip();
        let sessions = self.hub.sessions(&user);
        let states: Vec<_> = sessions.iter().map(|s| s.presence()).collect();
        let resources: Vec<Resource<'_>> = sessions
            .iter()
            .zip(&states)
            .map(|(s, p)| Resource {
                id: s.id,
                resource: s.jid.resource().as_str(),
                available: p.available,
                priority: p.priority,
            })
            .collect();
        let ty = MessageType::parse(message.attr("type"));
        match delivery::message(ty, to.resource().map(|r| r.as_str()), &resources) {
            Delivery::Sessions { ids, carbons } => {
                // What archiving serialized already, else the message as it stands.
                let xml = stamped
                    .or(xml)
                    .unwrap_or_else(|| stanza::serialize(&message).into());
                let delivered: Vec<u64> = sessions
                    .iter()
                    .filter(|s| ids.contains(&s.id))
                    .filter(|s| s.send(xml.clone(), sender_of(&message)).is_ok())
                    .map(|s| s.id)
                    .collect();
                if delivered.is_empty() {
                    return bounce(message, StanzaErrorCondition::ResourceConstraint, None);
                }
                if carbons {
                    self.send_carbons_received(&sessions, &delivered, &message);
                }
                if let Some(row) = archived {
                    self.enqueue(row).await;
                }
                Ok(())
            }
            Delivery::Offline => {
                let notify = crate::core::push::worth_a_push(&message).then(|| message.clone());
                self.store_offline(&user, message).await?;
                if let Some(message) = notify {
                    self.push_offline(&user, message);
                }
                if let Some(row) = archived {
                    self.enqueue(row).await;
                }
                Ok(())
            }
            Delivery::Bounce(condition) => bounce(message, condition, None),
            Delivery::Ignore => Ok(()),
        }
    }

    /// XEP-0160: keeps a message for a user with no available resource, stamped with
    /// XEP-0203 delay; bounces it when the user does not exist or the store is full.
    async fn store_offline(&self, user: &str, mut message: Element) -> Result<(), Box<Bounce>> {
        if message.get_child("no-store", ns::HINTS).is_some() {
            // The sender asked not to store it: recipient-unavailable for an account
            // that exists, service-unavailable (as for any unknown user) otherwise.
            let condition = match self.store.user_exists(user).await {
                Ok(true) => StanzaErrorCondition::RecipientUnavailable,
                Ok(false) => StanzaErrorCondition::ServiceUnavailable,
                Err(e) => {
                    tracing::error!(error = %e, "store failed while routing a message");
                    StanzaErrorCondition::InternalServerError
                }
            };
            return bounce(message, condition, None);
        }
        if message.get_child("delay", ns::DELAY).is_none() {
            message.append_child(
                Element::builder("delay", ns::DELAY)
                    .attr(
                        rxml::xml_ncname!("from").to_owned(),
                        self.config.domain.as_str(),
                    )
                    .attr(
                        rxml::xml_ncname!("stamp").to_owned(),
                        crate::time::rfc3339(impmesh_store::now_unix()),
                    )
                    .append("Offline Storage")
                    .build(),
            );
        }
        let xml = String::from(&message);
        let sender = stanza::bare_of(message.attr("from").unwrap_or_default());
        let quota = self.config.limits.offline_quota();
        match self.store.store_offline(user, sender, &xml, quota).await {
            Ok(Offline::Stored) => Ok(()),
            Ok(Offline::NoSuchUser) => {
                bounce(message, StanzaErrorCondition::ServiceUnavailable, None)
            }
            Ok(Offline::SenderShareFull) => bounce(
                message,
                StanzaErrorCondition::ResourceConstraint,
                Some("you have sent this user as many offline messages as one sender may"),
            ),
            Ok(_) => bounce(
                message,
                StanzaErrorCondition::ServiceUnavailable,
                Some("the recipient's offline storage is full"),
            ),
            Err(e) => {
                tracing::error!(error = %e, "storing an offline message failed");
                bounce(message, StanzaErrorCondition::InternalServerError, None)
            }
        }
    }

    /// Sends an error reply for `stanza` to its sender (a local session).
    pub fn bounce(&self, stanza: &Element, condition: StanzaErrorCondition, text: Option<&str>) {
        let Some(reply) = error_reply(stanza, condition, text) else {
            return;
        };
        // A notification that could not be routed is the push service's business,
        // not the account's client's.
        if self.push_answer(&reply) {
            return;
        }
        self.send_to_jid(&reply);
    }

    /// Sends a stanza to the full or bare JID in its `to`: its sessions here, or over
    /// a router link when the user is homed on another cluster.
    pub fn send_to_jid(&self, stanza: &Element) {
        self.send_to_jid_as(stanza, false);
    }

    /// [`Server::send_to_jid`]; a chat room's stanza to its occupant (`relayed`) is
    /// not held to the room's share of the session's queue
    /// ([`SessionHandle::send_relayed`]).
    pub(crate) fn send_to_jid_as(&self, stanza: &Element, relayed: bool) {
        let Some(to) = stanza.attr("to").and_then(stanza::parse_jid) else {
            return;
        };
        if self.is_muc(&to) {
            // A session's unavailable presence to the rooms it is in, as it ends.
            if stanza.name() == "presence"
                && stanza.attr("type") == Some("unavailable")
                && let Some(Ok(from)) = stanza.attr("from").map(FullJid::new)
                && !self.muc_leave_peer(&from, &to, false)
            {
                let _ = self.muc_presence(&from, stanza, &to);
            }
            return;
        }
        let Some(user) = to.node() else { return };
        let sessions = self.hub.sessions(user.as_str());
        if sessions.is_empty() {
            // A room's presence for an occupant of this node whose session has ended
            // (its leaving is under way): ignored, as presence to a full JID without
            // a session is (RFC 6121 §8.5.3.2.1). Asking the directory where the user
            // lives would cost a read per occupant: when a thousand sessions end at
            // once, each leaving is told to the others, half a million reads.
            if relayed && stanza.name() == "presence" {
                return;
            }
            if to.domain().as_str() == self.config.domain
                && let Some(server) = self.me.upgrade()
            {
                let (user, stanza) = (user.to_string(), stanza.clone());
                self.tasks
                    .spawn(async move { server.route_remote(&user, &stanza).await });
            }
            return;
        }
        let xml: Arc<str> = String::from(stanza).into();
        for s in sessions {
            if to
                .resource()
                .is_none_or(|r| r.as_str() == s.jid.resource().as_str())
            {
                // Dropped when the queue is full: errors and presence may be (RFC 6120
                // §8.3.1 and RFC 6121 §4.4); their senders are not to be told.
                let _ = if relayed {
                    s.send_relayed(xml.clone(), sender_of(stanza))
                } else {
                    s.send(xml.clone(), sender_of(stanza))
                };
            }
        }
    }

    /// XEP-0280 §6: copies of a chat message a user sent go to the user's other
    /// carbons-enabled resources.
    /// `archive_id` is the message's id in the sender's archive: the copies carry it
    /// (XEP-0313 §5: a client finds its own message in the archive by it).
    pub(crate) fn send_carbons_sent(
        &self,
        from: &FullJid,
        message: &Element,
        archive_id: Option<&str>,
    ) {
        if !carbon_eligible(message) {
            return;
        }
        let Some(user) = from.node() else { return };
        // Stamped once, for the first session that takes a copy.
        let mut stamped: Option<Element> = None;
        for s in self.hub.sessions(user.as_str()) {
            if s.jid == *from || !s.presence().carbons {
                continue;
            }
            let copy = match archive_id {
                Some(id) => &*stamped.get_or_insert_with(|| {
                    let mut copy = message.clone();
                    archive::stamp(&mut copy, id, from.to_bare().as_str());
                    copy
                }),
                None => message,
            };
            let wrapped = wrap_carbon("sent", &from.to_bare(), &s.jid, copy);
            // A copy: the original went its way.
            let _ = s.send(String::from(&wrapped).into(), sender_of(message));
        }
    }

    /// XEP-0280 §5: copies of a chat message delivered to some resources go to the
    /// recipient's other carbons-enabled resources.
    fn send_carbons_received(
        &self,
        sessions: &[Arc<SessionHandle>],
        delivered: &[u64],
        message: &Element,
    ) {
        if !carbon_eligible(message) {
            return;
        }
        for s in sessions {
            if delivered.contains(&s.id) || !s.presence().carbons {
                continue;
            }
            let wrapped = wrap_carbon("received", &s.jid.to_bare(), &s.jid, message);
            let _ = s.send(String::from(&wrapped).into(), sender_of(message));
        }
    }

    /// Routes a stanza that a session queued but its client never acknowledged: a
    /// message goes to another resource or to offline storage; the rest is dropped as
    /// RFC 6120 allows for presence and answered with an error for IQ requests.
    pub async fn reroute_undelivered(&self, was_for: &FullJid, xml: &str) {
        let Some(stanza) = stanza::parse_own(xml) else {
            return;
        };
        match Kind::of(&stanza) {
            Some(Kind::Message) => {
                // Carbons, archive results and server pings are copies: the
                // original is elsewhere.
                if stanza.has_child("sent", ns::CARBONS)
                    || stanza.has_child("received", ns::CARBONS)
                    || stanza.has_child("result", ns::MAM)
                {
                    return;
                }
                let bare: BareJid = was_for.to_bare();
                self.deliver_or_bounce(stanza, &Jid::from(bare)).await;
            }
            // A request the client never saw gets an error; the server's own pings do not.
            Some(Kind::Iq)
                if matches!(stanza.attr("type"), Some("get" | "set"))
                    && stanza.attr("from") != Some(self.config.domain.as_str()) =>
            {
                self.bounce(&stanza, StanzaErrorCondition::ServiceUnavailable, None);
            }
            _ => {}
        }
    }
}

/// Who a stanza is from, for the per-sender share of a queue.
pub(crate) fn sender_of(stanza: &Element) -> &str {
    stanza.attr("from").unwrap_or_default()
}

/// Whether a message is copied by carbons (XEP-0280 §6.1: chat messages, not marked
/// private and not already a carbon).
fn carbon_eligible(message: &Element) -> bool {
    stanza::stanza_type(message) == "chat"
        && !message.has_child("private", ns::CARBONS)
        && !message.has_child("no-copy", ns::HINTS)
        && !message.has_child("sent", ns::CARBONS)
        && !message.has_child("received", ns::CARBONS)
}

fn wrap_carbon(direction: &str, from: &BareJid, to: &FullJid, message: &Element) -> Element {
    let copy = message.clone();
    Element::builder("message", ns::CLIENT)
        .attr(rxml::xml_ncname!("from").to_owned(), from.to_string())
        .attr(rxml::xml_ncname!("to").to_owned(), to.to_string())
        .attr(rxml::xml_ncname!("type").to_owned(), "chat")
        .append(
            Element::builder(direction, ns::CARBONS)
                .append(
                    Element::builder("forwarded", ns::FORWARD)
                        .append(copy)
                        .build(),
                )
                .build(),
        )
        .build()
}
