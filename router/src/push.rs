//! Push notifications (XEP-0357): a client registers an app server (`enable`, kept
//! in the store until `disable`); while that client's session is hibernated (XEP-0198,
//! waiting for resumption) each message worth it sends a summary to the app server,
//! and while the account has no available resource, each such message stored offline
//! does, to every app server of the account. Summaries go out as the account's bare
//! JID to app servers at full JIDs of this domain, here or over the router links to
//! their home cluster; an app server that refuses one for good is disabled. What is
//! worth a push and what a summary says is in `core::push`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use impmesh_store::PushRegistration;
use jid::Jid;
use minidom::Element;

use crate::Server;
use crate::context::Context;
use crate::core::push::{self, Summary};
use crate::error::StanzaErrorCondition;
use crate::hub::lock;
use crate::stanza;

/// App servers one account may register.
pub const MAX_REGISTRATIONS: usize = 20;
/// Notifications per account per [`THROTTLE_WINDOW`]; beyond, a message sends none
/// (the next notification's count includes it).
const THROTTLE: u32 = 60;
const THROTTLE_WINDOW: Duration = Duration::from_secs(60);
/// Accounts the throttle tracks at once.
const THROTTLE_KEYS: usize = 100_000;
/// Publishes waiting for the app server's answer, at most (the oldest is forgotten
/// beyond); and how long one waits.
const PENDING: usize = 4096;
const PENDING_TTL: Duration = Duration::from_secs(60);

/// The node's push state: what answers it waits for, and the throttle.
pub(crate) struct Push {
    pending: Mutex<Pending>,
    throttle: impmesh_limits::Throttle<String>,
}

/// Notifications sent and not answered yet, by id, oldest first.
#[derive(Default)]
struct Pending {
    by_id: HashMap<String, Sent>,
    order: VecDeque<(String, Instant)>,
}

struct Sent {
    owner: String,
    jid: String,
    node: String,
}

impl Pending {
    fn insert(&mut self, id: String, sent: Sent, now: Instant) {
        while let Some((oldest, at)) = self.order.front() {
            if self.order.len() < PENDING && now.duration_since(*at) < PENDING_TTL {
                break;
            }
            self.by_id.remove(oldest);
            self.order.pop_front();
        }
        self.order.push_back((id.clone(), now));
        self.by_id.insert(id, sent);
    }
}

impl Default for Push {
    fn default() -> Self {
        Push {
            pending: Mutex::new(Pending::default()),
            throttle: impmesh_limits::Throttle::new(THROTTLE, THROTTLE_WINDOW, THROTTLE_KEYS),
        }
    }
}

/// The features of the account's disco#info (XEP-0357 §4).
pub const PUSH_FEATURES: &[&str] = &[crate::xml::ns::PUSH];

/// Errors with which an app server says a registration is dead (XEP-0357 §8); others
/// (the app server offline, a full queue, a link down) are passing.
fn refuses_for_good(iq: &Element) -> bool {
    let Some(error) = iq.get_child("error", crate::xml::ns::CLIENT) else {
        return false;
    };
    let condition = error
        .children()
        .find(|c| c.ns() == "urn:ietf:params:xml:ns:xmpp-stanzas" && c.name() != "text")
        .map(|c| c.name().to_owned())
        .unwrap_or_default();
    matches!(error.attr("type"), Some("cancel" | "auth"))
        && matches!(
            condition.as_str(),
            "item-not-found"
                | "forbidden"
                | "not-authorized"
                | "not-acceptable"
                | "bad-request"
                | "feature-not-implemented"
                | "registration-required"
        )
}

impl Context<'_> {
    /// `<enable/>` or `<disable/>` from the client.
    pub(crate) async fn push_iq(&mut self, iq: &Element, payload: &Element) {
        let user = self.user();
        let server = self.server.clone();
        if payload.name() == "disable" {
            let disable = match push::parse_disable(payload) {
                Ok(d) => d,
                Err(text) => {
                    return self.reply_error(iq, StanzaErrorCondition::BadRequest, Some(text));
                }
            };
            if server
                .store
                .push_disable(&user, &disable.jid, disable.node.as_deref())
                .await
                .is_err()
            {
                return self.reply_error(iq, StanzaErrorCondition::InternalServerError, None);
            }
            // Every session of the account forgets it, hibernated ones too.
            server.push_replace(
                &user,
                |p| p.jid == disable.jid && disable.node.as_ref().is_none_or(|n| *n == p.node),
                None,
            );
            return self.reply_result(iq, None);
        }
        let enable = match push::parse_enable(payload) {
            Ok(e) => e,
            Err(text) => return self.reply_error(iq, StanzaErrorCondition::BadRequest, Some(text)),
        };
        // Without server-to-server federation only this domain's JIDs are reached,
        // and in it an app server is a client: an account's full JID.
        let Ok(app) = Jid::new(&enable.jid) else {
            return self.reply_error(iq, StanzaErrorCondition::BadRequest, None);
        };
        if app.domain().as_str() != server.config.domain {
            return self.reply_error(
                iq,
                StanzaErrorCondition::RemoteServerNotFound,
                Some("push reaches app servers at accounts of this domain only"),
            );
        }
        if app.node().is_none() || app.resource().is_none() {
            return self.reply_error(
                iq,
                StanzaErrorCondition::NotAcceptable,
                Some("the app server must be a full JID: an account's resource"),
            );
        }
        let registration = PushRegistration {
            jid: enable.jid,
            node: enable.node,
            options: enable.options,
            include_body: enable.include_body,
            include_sender: enable.include_sender,
        };
        match server
            .store
            .push_enable(&user, &registration, MAX_REGISTRATIONS)
            .await
        {
            Ok(true) => {
                // Sessions that registered the same app server and node use the new
                // settings; this one registers it.
                let registration = Arc::new(registration);
                let same = registration.clone();
                server.push_replace(
                    &user,
                    |p| p.jid == same.jid && p.node == same.node,
                    Some(registration.clone()),
                );
                lock(&self.handle.state).push = Some(registration);
                self.reply_result(iq, None);
            }
            Ok(false) => self.reply_error(
                iq,
                StanzaErrorCondition::ResourceConstraint,
                Some("this account has as many app servers as it may"),
            ),
            Err(_) => self.reply_error(iq, StanzaErrorCondition::InternalServerError, None),
        }
    }
}

impl Server {
    /// Replaces (`None`: removes) the registrations matching `which` in every session
    /// of `owner`.
    fn push_replace(
        &self,
        owner: &str,
        which: impl Fn(&PushRegistration) -> bool,
        with: Option<Arc<PushRegistration>>,
    ) {
        for s in self.hub.sessions(owner) {
            let mut state = lock(&s.state);
            if state.push.as_deref().is_some_and(&which) {
                state.push = with.clone();
            }
        }
    }

    /// A message for `owner` was stored offline: every app server of the account
    /// hears of it, from a task of its own (the sender does not wait for it).
    pub(crate) fn push_offline(&self, owner: &str, message: Element) {
        let Some(server) = self.me.upgrade() else {
            return;
        };
        let owner = owner.to_owned();
        self.tasks.spawn(async move {
            let registrations = match server.store.push_registrations(&owner).await {
                Ok(r) if !r.is_empty() => r,
                Ok(_) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read push registrations; no notification sent");
                    return;
                }
            };
            let count = server
                .store
                .offline_count(&owner)
                .await
                .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
                .unwrap_or(1)
                .max(1);
            for r in &registrations {
                server.push_publish(&owner, r, &message, count);
            }
        });
    }

    /// Sends one notification within the account's throttle, and remembers it to hear
    /// the app server's answer: for a message stored offline (`count` waiting), or
    /// for one that reached a hibernated session (the `count`th since it hibernated).
    pub(crate) fn push_publish(
        &self,
        owner: &str,
        r: &PushRegistration,
        message: &Element,
        count: u32,
    ) {
        if !self.push.throttle.attempt(&owner.to_owned()) {
            return;
        }
        let summary: Summary = push::summary(message, count, r.include_sender, r.include_body);
        let id = format!("push-{}", crate::names::random_id());
        let from = format!("{owner}@{}", self.config.domain);
        let xml = push::publish_xml(&id, &from, &r.jid, &r.node, &r.options, &summary);
        let (Ok(iq), Ok(app)) = (xml.parse::<Element>(), Jid::new(&r.jid)) else {
            return;
        };
        lock(&self.push.pending).insert(
            id,
            Sent {
                owner: owner.to_owned(),
                jid: r.jid.clone(),
                node: r.node.clone(),
            },
            Instant::now(),
        );
        self.stats.push_sent();
        let Some(user) = app.node().map(|n| n.to_string()) else {
            return;
        };
        let sessions = self.hub.sessions(&user);
        if sessions.is_empty() {
            // Homed on another cluster, or offline here: routing says which (and
            // bounces to the account, which `push_answer` takes).
            if let Some(server) = self.me.upgrade() {
                self.tasks.spawn(async move {
                    if !server.route_remote(&user, &iq).await {
                        server.stats.push_undelivered();
                        tracing::debug!(app = %app, "push: the app server is not online");
                    }
                });
            }
            return;
        }
        let resource = app.resource().map(|r| r.as_str());
        match sessions
            .iter()
            .find(|s| Some(s.jid.resource().as_str()) == resource)
        {
            Some(s)
                if s.send(String::from(&iq).into(), crate::deliver::sender_of(&iq))
                    .is_ok() => {}
            _ => {
                self.stats.push_undelivered();
                tracing::debug!(app = %app, "push: the app server is not online");
            }
        }
    }

    /// An IQ answer that may be an app server's to a notification, or a bounce of
    /// one: an error that says the registration is dead disables it (XEP-0357 §8).
    /// True when it was one.
    pub(crate) fn push_answer(&self, iq: &Element) -> bool {
        let Some(id) = iq.attr("id").filter(|id| id.starts_with("push-")) else {
            return false;
        };
        let pending = {
            let mut pending = lock(&self.push.pending);
            let from = iq.attr("from").and_then(stanza::parse_jid);
            // Only the app server it went to answers it.
            let matches = pending
                .by_id
                .get(id)
                .is_some_and(|p| from.is_some_and(|f| f.to_string() == p.jid));
            if !matches {
                return false;
            }
            pending.by_id.remove(id)
        };
        let Some(pending) = pending else {
            return false;
        };
        if iq.attr("type") == Some("error") {
            if !refuses_for_good(iq) {
                self.stats.push_undelivered();
                tracing::debug!(app = %pending.jid, "push: a notification was not delivered");
                return true;
            }
            self.push_replace(
                &pending.owner,
                |p| p.jid == pending.jid && p.node == pending.node,
                None,
            );
            tracing::info!(owner = %pending.owner, app = %pending.jid, node = %pending.node, "the app server refused a notification; push disabled for it");
            self.stats.push_refused();
            let store = self.store.clone();
            self.tasks.spawn(async move {
                if let Err(e) = store
                    .push_disable(&pending.owner, &pending.jid, Some(&pending.node))
                    .await
                {
                    tracing::warn!(error = %e, "cannot disable a refused push registration");
                }
            });
        }
        true
    }
}
