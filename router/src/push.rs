//! Push notifications (XEP-0357): a client registers an app server (`enable`, kept
//! in the store until `disable`); while that client's session is hibernated (XEP-0198,
//! waiting for resumption) each message worth it sends a summary to the app server,
//! and while the account has no session at all, each message stored offline does, to
//! every app server of the account. Summaries go out as the account's bare JID to
//! app servers of this domain, here or over the router links to their home cluster;
//! an app server that answers with an error is disabled. What is worth a push and
//! what a summary says is in `core::push`.

use std::collections::HashMap;
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
/// Notifications per account per [`THROTTLE_WINDOW`]; beyond, messages wait for the
/// next notification's count.
const THROTTLE: u32 = 60;
const THROTTLE_WINDOW: Duration = Duration::from_secs(60);
/// Accounts the throttle tracks at once.
const THROTTLE_KEYS: usize = 100_000;
/// Publishes waiting for the app server's answer, at most; and how long one waits.
const PENDING: usize = 4096;
const PENDING_TTL: Duration = Duration::from_secs(60);

/// The node's push state: what answers it waits for, and the throttle.
pub(crate) struct Push {
    pending: Mutex<HashMap<String, Pending>>,
    throttle: impmesh_limits::Throttle<String>,
}

struct Pending {
    owner: String,
    jid: String,
    node: String,
    at: Instant,
}

impl Default for Push {
    fn default() -> Self {
        Push {
            pending: Mutex::new(HashMap::new()),
            throttle: impmesh_limits::Throttle::new(THROTTLE, THROTTLE_WINDOW, THROTTLE_KEYS),
        }
    }
}

/// The features of the account's disco#info (XEP-0357 §4).
pub const PUSH_FEATURES: &[&str] = &[crate::xml::ns::PUSH];

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
            let mut state = lock(&self.handle.state);
            if state.push.as_ref().is_some_and(|p| {
                p.jid == disable.jid && disable.node.as_ref().is_none_or(|n| *n == p.node)
            }) {
                state.push = None;
            }
            drop(state);
            return self.reply_empty(iq);
        }
        let enable = match push::parse_enable(payload) {
            Ok(e) => e,
            Err(text) => return self.reply_error(iq, StanzaErrorCondition::BadRequest, Some(text)),
        };
        // Without server-to-server federation only this domain's JIDs are reached.
        let app = Jid::new(&enable.jid).ok();
        if app
            .as_ref()
            .is_none_or(|a| a.domain().as_str() != server.config.domain || a.node().is_none())
        {
            return self.reply_error(
                iq,
                StanzaErrorCondition::RemoteServerNotFound,
                Some("push reaches app servers at accounts of this domain only"),
            );
        }
        let registration = PushRegistration {
            jid: enable.jid,
            node: enable.node,
            options: enable.options,
            include_body: enable.include_body,
        };
        match server
            .store
            .push_enable(&user, &registration, MAX_REGISTRATIONS)
            .await
        {
            Ok(true) => {
                lock(&self.handle.state).push = Some(Arc::new(registration));
                self.reply_empty(iq);
            }
            Ok(false) => self.reply_error(
                iq,
                StanzaErrorCondition::ResourceConstraint,
                Some("this account has as many app servers as it may"),
            ),
            Err(_) => self.reply_error(iq, StanzaErrorCondition::InternalServerError, None),
        }
    }

    fn reply_empty(&mut self, iq: &Element) {
        let xml = format!(
            "<iq type='result' id='{}' to='{}'/>",
            crate::xml::escape(iq.attr("id").unwrap_or_default()),
            crate::xml::escape(&self.jid().to_string())
        );
        self.push_out(xml.into());
    }
}

impl Server {
    /// A message for `owner` was stored offline: every app server of the account
    /// hears of it.
    pub(crate) async fn push_offline(&self, owner: &str, message: &Element) {
        if !push::worth_a_push(message) {
            return;
        }
        let registrations = match self.store.push_registrations(owner).await {
            Ok(r) if !r.is_empty() => r,
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read push registrations; no notification sent");
                return;
            }
        };
        let count = self
            .store
            .offline_count(owner)
            .await
            .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
            .unwrap_or(1)
            .max(1);
        if !self.push.throttle.attempt(&owner.to_owned()) {
            return;
        }
        for r in &registrations {
            let summary = push::summary(message, count, r.include_body);
            self.push_publish(owner, r, &summary);
        }
    }

    /// A message reached a hibernated session of `owner` that registered `target`:
    /// the `count`th since it hibernated.
    pub(crate) fn push_hibernated(
        &self,
        owner: &str,
        target: &PushRegistration,
        message: &Element,
        count: u32,
    ) {
        if !self.push.throttle.attempt(&owner.to_owned()) {
            return;
        }
        let summary = push::summary(message, count, target.include_body);
        self.push_publish(owner, target, &summary);
    }

    /// Sends one notification, and remembers it to hear the app server's answer.
    fn push_publish(&self, owner: &str, r: &PushRegistration, summary: &Summary) {
        let id = format!("push-{}", crate::names::random_id());
        let from = format!("{owner}@{}", self.config.domain);
        let xml = push::publish_xml(&id, &from, &r.jid, &r.node, &r.options, summary);
        let Ok(iq) = xml.parse::<Element>() else {
            return;
        };
        {
            let mut pending = lock(&self.push.pending);
            let now = Instant::now();
            if pending.len() >= PENDING {
                pending.retain(|_, p| now.duration_since(p.at) < PENDING_TTL);
            }
            if pending.len() < PENDING {
                pending.insert(
                    id,
                    Pending {
                        owner: owner.to_owned(),
                        jid: r.jid.clone(),
                        node: r.node.clone(),
                        at: now,
                    },
                );
            }
        }
        self.stats.push_sent();
        self.send_to_jid(&iq);
    }

    /// An IQ answer that may be an app server's to a notification: an error disables
    /// that registration (XEP-0357 §8). True when it was one.
    pub(crate) fn push_answer(&self, iq: &Element) -> bool {
        let Some(id) = iq.attr("id").filter(|id| id.starts_with("push-")) else {
            return false;
        };
        let Some(pending) = lock(&self.push.pending).remove(id) else {
            return false;
        };
        let from = iq.attr("from").and_then(stanza::parse_jid);
        if from.is_none_or(|f| f.to_string() != pending.jid) {
            // Not from the app server it went to: not its answer.
            lock(&self.push.pending).insert(id.to_owned(), pending);
            return false;
        }
        if iq.attr("type") == Some("error") {
            for s in self.hub.sessions(&pending.owner) {
                let mut state = lock(&s.state);
                if state
                    .push
                    .as_ref()
                    .is_some_and(|p| p.jid == pending.jid && p.node == pending.node)
                {
                    state.push = None;
                }
            }
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
