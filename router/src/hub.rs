//! The session registry: who is connected, with which resources, and the queues that
//! reach them. Plain shared state behind short `std` locks (never held across `.await`);
//! routing decisions live in `deliver.rs` and `presence.rs`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::mpsc;
use xmpp_parsers::jid::FullJid;

use crate::conn::Conn;

/// What a session task receives from the rest of the node.
#[derive(Debug)]
pub enum Outbound {
    /// A serialized stanza to write to the client.
    Stanza(Arc<str>),
    /// Another session took this resource (RFC 6120 §7.7.2.2): close with `conflict`.
    Replaced,
    /// The account was deleted: close with `not-authorized`.
    AccountRemoved,
    /// A new connection resumes this session (XEP-0198 §5).
    Resume(Box<ResumeRequest>),
}

/// A connection that asks to take over a (usually hibernated) session.
#[derive(Debug)]
pub struct ResumeRequest {
    pub conn: Conn,
    /// The client's `h`: stanzas it has received.
    pub h: u32,
    pub username: String,
}

/// Presence-related state of a session that other tasks read when routing.
#[derive(Debug, Default, Clone)]
pub struct PresenceState {
    /// Sent initial presence and not yet unavailable (RFC 6121 "available resource").
    pub available: bool,
    pub priority: i8,
    /// The last available presence broadcast, to answer probes.
    pub last: Option<Arc<str>>,
    /// Requested the roster (RFC 6121 "interested resource").
    pub interested: bool,
    /// Message carbons enabled (XEP-0280).
    pub carbons: bool,
}

/// The handle other tasks hold on a session.
#[derive(Debug)]
pub struct SessionHandle {
    pub id: u64,
    pub jid: FullJid,
    pub tx: mpsc::Sender<Outbound>,
    pub state: Mutex<PresenceState>,
    /// Set when the queue overflowed; the session closes itself.
    pub overloaded: AtomicBool,
}

impl SessionHandle {
    /// A copy of the presence state.
    pub fn presence(&self) -> PresenceState {
        lock(&self.state).clone()
    }

    /// Queues a stanza; false when the session is gone or its queue is full.
    pub fn send(&self, stanza: Arc<str>) -> bool {
        match self.tx.try_send(Outbound::Stanza(stanza)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.overloaded.store(true, Ordering::Relaxed);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

/// Locks a mutex, recovering from a poisoned lock (the data is plain state that stays
/// consistent: every writer sets whole fields).
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The user already has as many sessions as allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooManySessions;

/// What the node keeps in memory for a user with at least one session.
#[derive(Debug, Default)]
struct UserEntry {
    sessions: Vec<Arc<SessionHandle>>,
    /// The user's block list (XEP-0191), so routing never asks the store per stanza.
    /// Loaded at bind and updated by block/unblock on this node.
    blocked: Arc<HashSet<String>>,
}

/// Every session of the node.
#[derive(Debug, Default)]
pub struct Hub {
    users: RwLock<HashMap<String, UserEntry>>,
    /// XEP-0198 stream ids of resumable sessions → the session's queue.
    resumable: Mutex<HashMap<String, (String, mpsc::Sender<Outbound>)>>,
    next_id: AtomicU64,
}

impl Hub {
    pub fn next_session_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Registers a session; returns the session it replaces (same full JID), if any.
    /// Fails when the user already has `max` sessions. `blocked` is the user's block
    /// list as read from the store, used when this is the user's first session.
    pub fn register(
        &self,
        handle: Arc<SessionHandle>,
        max: usize,
        blocked: HashSet<String>,
    ) -> Result<Option<Arc<SessionHandle>>, TooManySessions> {
        let mut users = self.users.write().unwrap_or_else(|e| e.into_inner());
        let user = handle.jid.node().map(|n| n.to_string()).unwrap_or_default();
        let entry = users.entry(user).or_insert_with(|| UserEntry {
            sessions: Vec::new(),
            blocked: Arc::new(blocked),
        });
        let sessions = &mut entry.sessions;
        let replaced = sessions
            .iter()
            .position(|s| s.jid == handle.jid)
            .map(|i| sessions.swap_remove(i));
        if replaced.is_none() && sessions.len() >= max {
            return Err(TooManySessions);
        }
        sessions.push(handle);
        Ok(replaced)
    }

    /// Removes a session (by id, so a replaced session cannot remove its successor).
    pub fn unregister(&self, handle: &SessionHandle) {
        let mut users = self.users.write().unwrap_or_else(|e| e.into_inner());
        let user = handle.jid.node().map(|n| n.to_string()).unwrap_or_default();
        if let Some(entry) = users.get_mut(&user) {
            entry.sessions.retain(|s| s.id != handle.id);
            if entry.sessions.is_empty() {
                users.remove(&user);
            }
        }
    }

    /// The sessions of a user (any state).
    pub fn sessions(&self, user: &str) -> Vec<Arc<SessionHandle>> {
        let users = self.users.read().unwrap_or_else(|e| e.into_inner());
        users
            .get(user)
            .map(|e| e.sessions.clone())
            .unwrap_or_default()
    }

    /// One session by resource.
    pub fn session(&self, user: &str, resource: &str) -> Option<Arc<SessionHandle>> {
        let users = self.users.read().unwrap_or_else(|e| e.into_inner());
        users
            .get(user)?
            .sessions
            .iter()
            .find(|s| s.jid.resource().as_str() == resource)
            .cloned()
    }

    /// The cached block list of a user with a session here; `None` when offline.
    pub fn blocklist(&self, user: &str) -> Option<Arc<HashSet<String>>> {
        let users = self.users.read().unwrap_or_else(|e| e.into_inner());
        users.get(user).map(|e| e.blocked.clone())
    }

    /// Replaces the cached block list of an online user (after block/unblock).
    pub fn set_blocklist(&self, user: &str, blocked: HashSet<String>) {
        let mut users = self.users.write().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = users.get_mut(user) {
            entry.blocked = Arc::new(blocked);
        }
    }

    /// Number of sessions on the node.
    /// Closes every session of `user` (its account was deleted); returns how many.
    pub fn disconnect_user(&self, user: &str) -> usize {
        let sessions = self.sessions(user);
        for s in &sessions {
            let _ = s.tx.try_send(Outbound::AccountRemoved);
        }
        sessions.len()
    }

    pub fn session_count(&self) -> usize {
        let users = self.users.read().unwrap_or_else(|e| e.into_inner());
        users.values().map(|e| e.sessions.len()).sum()
    }

    /// Every session (for shutdown).
    pub fn all_sessions(&self) -> Vec<Arc<SessionHandle>> {
        let users = self.users.read().unwrap_or_else(|e| e.into_inner());
        users
            .values()
            .flat_map(|e| e.sessions.iter())
            .cloned()
            .collect()
    }

    pub fn add_resumable(&self, id: &str, user: &str, tx: mpsc::Sender<Outbound>) {
        lock(&self.resumable).insert(id.to_owned(), (user.to_owned(), tx));
    }

    pub fn remove_resumable(&self, id: &str) {
        lock(&self.resumable).remove(id);
    }

    /// The queue of a resumable session owned by `user`.
    pub fn resumable(&self, id: &str, user: &str) -> Option<mpsc::Sender<Outbound>> {
        let map = lock(&self.resumable);
        let (owner, tx) = map.get(id)?;
        (owner == user).then(|| tx.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle(
        hub: &Hub,
        jid: &str,
        queue: usize,
    ) -> (Arc<SessionHandle>, mpsc::Receiver<Outbound>) {
        let (tx, rx) = mpsc::channel(queue);
        let h = Arc::new(SessionHandle {
            id: hub.next_session_id(),
            jid: FullJid::new(jid).unwrap(),
            tx,
            state: Mutex::new(PresenceState::default()),
            overloaded: AtomicBool::new(false),
        });
        (h, rx)
    }

    #[test]
    fn same_resource_replaces_and_the_session_cap_holds() {
        let hub = Hub::default();
        let (a, _ra) = handle(&hub, "u@d/one", 4);
        let (b, _rb) = handle(&hub, "u@d/one", 4);
        let (c, _rc) = handle(&hub, "u@d/two", 4);
        assert!(
            hub.register(a.clone(), 2, HashSet::new())
                .unwrap()
                .is_none()
        );
        let replaced = hub.register(b.clone(), 2, HashSet::new()).unwrap().unwrap();
        assert_eq!(replaced.id, a.id);
        assert!(hub.register(c, 2, HashSet::new()).unwrap().is_none());
        let (d, _rd) = handle(&hub, "u@d/three", 4);
        assert!(matches!(
            hub.register(d, 2, HashSet::new()),
            Err(TooManySessions)
        ));
        // The replaced session's late unregister does not remove its successor.
        hub.unregister(&a);
        assert_eq!(hub.session("u", "one").unwrap().id, b.id);
        assert_eq!(hub.session_count(), 2);
    }

    #[test]
    fn a_full_queue_refuses_and_flags_the_session() {
        let hub = Hub::default();
        let (a, _rx) = handle(&hub, "u@d/r", 1);
        assert!(a.send("<message/>".into()));
        assert!(!a.send("<message/>".into()));
        assert!(a.overloaded.load(Ordering::Relaxed));
    }
}
