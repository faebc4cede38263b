//! The session registry: who is connected, with which resources, and the queues that
//! reach them. Plain shared state behind short `std` locks (never held across `.await`);
//! routing decisions live in `deliver.rs` and `presence.rs`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::BuildHasher as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use impmesh_store::RosterItem;
use jid::FullJid;

use crate::config::QUEUE_SHARE;
use crate::conn::Conn;

/// What a session task is told besides stanzas: in slots of their own
/// ([`ControlBox`]), so that a session whose stanza queue it does not take from (a
/// full XEP-0198 window, a hibernated session) still hears it.
#[derive(Debug)]
pub enum Control {
    /// Another session took this resource (RFC 6120 §7.7.2.2): close with `conflict`.
    Replaced,
    /// The account was deleted: close with `not-authorized`.
    AccountRemoved,
    /// A new connection resumes this session (XEP-0198 §5).
    Resume(Box<ResumeRequest>),
}

/// Control messages waiting for a session, at most.
const CONTROL_SLOTS: usize = 4;

/// A session's control inbox: a few slots beside its stanza queue, inline in its
/// handle. Control messages are rare (each ends or restarts the session), so a lock
/// costs less than a channel of their own (about 0.5 KiB per idle session,
/// docs/benchmarks.md); the handle's one wake-up serves both. Once the session has
/// ended the inbox is closed and refuses what comes.
#[derive(Debug, Default)]
pub struct ControlBox {
    state: Mutex<ControlState>,
}

#[derive(Debug, Default)]
struct ControlState {
    pending: VecDeque<Control>,
    closed: bool,
}

impl ControlBox {
    /// Leaves `control`; given back when the inbox is closed or already has
    /// `CONTROL_SLOTS` (4) waiting.
    fn push(&self, control: Control) -> Result<(), Control> {
        let mut state = lock(&self.state);
        if state.closed || state.pending.len() >= CONTROL_SLOTS {
            return Err(control);
        }
        state.pending.push_back(control);
        Ok(())
    }

    fn pop(&self) -> Option<Control> {
        lock(&self.state).pending.pop_front()
    }

    /// Closes the inbox (the session ends) and returns what was still waiting.
    pub fn close(&self) -> Vec<Control> {
        let mut state = lock(&self.state);
        state.closed = true;
        state.pending.drain(..).collect()
    }
}

/// What a waiting session is woken for.
#[derive(Debug)]
pub enum Next {
    Control(Control),
    Stanza(Arc<str>),
}

/// A stanza in a session's queue, with the sender it is counted against.
#[derive(Debug)]
struct Queued {
    xml: Arc<str>,
    /// A hash of the sender's bare JID (0: the server itself).
    sender: u64,
}

/// One session's stanza queue, inline in its handle (STYLE 5: bounded by
/// `session_queue` stanzas and `session_queue_bytes` bytes; one sender may use a
/// [`QUEUE_SHARE`] of each, so a flood is bounced to its sender and never ends the
/// recipient's session). An emptied queue gives its storage back: an idle session
/// holds none (a channel cost 1.3 KiB per idle session, docs/benchmarks.md).
#[derive(Debug, Default)]
struct Queue {
    items: VecDeque<Queued>,
    bytes: usize,
    /// Sender hash → (stanzas, bytes); entries leave when they reach zero.
    by_sender: HashMap<u64, (usize, usize)>,
    /// The session has ended: nothing more is queued.
    closed: bool,
}

impl Queue {
    fn pop(&mut self) -> Option<Queued> {
        let queued = self.items.pop_front()?;
        let len = queued.xml.len();
        self.bytes = self.bytes.saturating_sub(len);
        if let Some(entry) = self.by_sender.get_mut(&queued.sender) {
            entry.0 = entry.0.saturating_sub(1);
            entry.1 = entry.1.saturating_sub(len);
            if entry.0 == 0 {
                self.by_sender.remove(&queued.sender);
            }
        }
        if self.items.is_empty() {
            self.items = VecDeque::new();
            self.by_sender = HashMap::new();
            self.bytes = 0;
        }
        Some(queued)
    }
}

/// Why a stanza was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refused {
    /// The session is gone.
    Gone,
    /// The queue, or this sender's share of it, is full.
    Full,
}

/// A connection that asks to take over a (usually hibernated) session.
#[derive(Debug)]
pub struct ResumeRequest {
    pub conn: Conn,
    /// The client's `h`: stanzas it has received.
    pub h: u32,
    pub username: String,
    /// Asked inline in SASL2 (XEP-0388): the session answers inside `<success/>`.
    pub sasl2: Option<Sasl2Resume>,
}

/// A resumption asked inline in SASL2: the success to answer with, and where the
/// connection goes back when the session cannot take it, so the negotiation can put
/// `<failed/>` in the success and bind a new session (XEP-0386).
#[derive(Debug)]
pub struct Sasl2Resume {
    pub completion: crate::core::sasl2::Completion,
    pub back: tokio::sync::oneshot::Sender<(Conn, crate::core::sasl2::Completion)>,
}

impl ResumeRequest {
    /// The session cannot be resumed: XEP-0198's `<failed/>` with `condition`, or over
    /// SASL2 the connection goes back to its negotiation.
    pub async fn refuse(self, condition: &str) {
        match self.sasl2 {
            Some(s) => {
                let _ = s.back.send((self.conn, s.completion));
            }
            None => {
                let mut conn = self.conn;
                let _ = conn.send(&crate::session::sm_failed(condition)).await;
            }
        }
    }
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
    /// The app server this session registered (XEP-0357), told while it hibernates.
    pub push: Option<Arc<impmesh_store::PushRegistration>>,
}

/// The handle other tasks hold on a session.
#[derive(Debug)]
pub struct SessionHandle {
    pub id: u64,
    pub jid: FullJid,
    pub control: ControlBox,
    pub state: Mutex<PresenceState>,
    queue: Mutex<Queue>,
    /// Woken when a stanza is queued or a control message left: one wait in every
    /// idle session's future instead of two.
    wake: tokio::sync::Notify,
    limits: QueueLimits,
}

/// The bounds of one session's queue.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    pub stanzas: usize,
    pub bytes: usize,
}

impl SessionHandle {
    /// A handle with an empty, open queue.
    pub fn new(id: u64, jid: FullJid, limits: QueueLimits) -> SessionHandle {
        SessionHandle {
            id,
            jid,
            control: ControlBox::default(),
            state: Mutex::new(PresenceState::default()),
            queue: Mutex::new(Queue::default()),
            wake: tokio::sync::Notify::new(),
            limits,
        }
    }

    /// The localpart of the session's user.
    pub fn user(&self) -> String {
        self.jid.node().map(|n| n.to_string()).unwrap_or_default()
    }

    /// A copy of the presence state.
    pub fn presence(&self) -> PresenceState {
        lock(&self.state).clone()
    }

    /// Queues a stanza from `from` (a JID, or empty for the server). Refused when the
    /// session is gone or the queue, or this sender's share of it, is full: the
    /// caller bounces it to its sender; the recipient's session goes on.
    pub fn send(&self, xml: Arc<str>, from: &str) -> Result<(), Refused> {
        self.queue_from(xml, from, true)
    }

    /// Queues a stanza a chat room relays to its occupant (from `room@…/nick`), held
    /// to the queue's limits but not to one sender's share: a room speaks for all its
    /// occupants, and entering one sends the newcomer every occupant's presence at
    /// once (`[muc] max_occupants` stays below the queue's length).
    pub fn send_relayed(&self, xml: Arc<str>, from: &str) -> Result<(), Refused> {
        self.queue_from(xml, from, false)
    }

    fn queue_from(&self, xml: Arc<str>, from: &str, shared: bool) -> Result<(), Refused> {
        let sender = sender_hash(from);
        let len = xml.len();
        {
            let mut q = lock(&self.queue);
            if q.closed {
                return Err(Refused::Gone);
            }
            let (mine, mine_bytes) = q.by_sender.get(&sender).copied().unwrap_or_default();
            let share = (self.limits.stanzas / QUEUE_SHARE).max(1);
            let share_bytes = self.limits.bytes / QUEUE_SHARE;
            if q.items.len() >= self.limits.stanzas
                || q.bytes + len > self.limits.bytes
                || (shared && (mine >= share || (mine > 0 && mine_bytes + len > share_bytes)))
            {
                return Err(Refused::Full);
            }
            q.items.push_back(Queued { xml, sender });
            q.bytes += len;
            let entry = q.by_sender.entry(sender).or_default();
            entry.0 += 1;
            entry.1 += len;
        }
        self.wake.notify_one();
        Ok(())
    }

    /// Leaves a control message for the session; given back when the session has
    /// ended or already has `CONTROL_SLOTS` (4) waiting.
    pub fn tell(&self, control: Control) -> Result<(), Control> {
        self.control.push(control)?;
        self.wake.notify_one();
        Ok(())
    }

    /// The next queued stanza, if one waits; it no longer counts against the queue.
    pub fn take(&self) -> Option<Arc<str>> {
        lock(&self.queue).pop().map(|q| q.xml)
    }

    /// Waits for the next control message, or the next queued stanza when
    /// `stanzas` (control first). Cancel-safe: a message is taken only by the poll
    /// that returns it.
    pub async fn next(&self, stanzas: bool) -> Next {
        loop {
            if let Some(control) = self.control.pop() {
                return Next::Control(control);
            }
            if stanzas && let Some(xml) = self.take() {
                return Next::Stanza(xml);
            }
            // A send between the checks and this wait left a permit: no lost wake-up.
            self.wake.notified().await;
        }
    }

    /// Closes the queue (the session ends): later sends are refused as gone. Returns
    /// what was still waiting, in order.
    pub fn close(&self) -> Vec<Arc<str>> {
        let mut q = lock(&self.queue);
        q.closed = true;
        let items = std::mem::take(&mut q.items);
        q.by_sender = HashMap::new();
        q.bytes = 0;
        items.into_iter().map(|queued| queued.xml).collect()
    }
}

/// A keyed hash of a sender's bare JID (the server is 0). Keyed per process, so no
/// one can choose a name that shares another sender's share.
fn sender_hash(from: &str) -> u64 {
    static KEYS: std::sync::OnceLock<std::hash::RandomState> = std::sync::OnceLock::new();
    let bare = from.split('/').next().unwrap_or_default();
    if bare.is_empty() {
        return 0;
    }
    KEYS.get_or_init(std::hash::RandomState::new)
        .hash_one(bare)
        .max(1)
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
    /// The user's roster (RFC 6121 §2), so presence broadcasts never ask the store
    /// (DESIGN: the store stays off the hot path). Loaded on first use while the user
    /// has a session, updated by every roster write on this node, dropped with the
    /// last session.
    roster: Option<Arc<HashMap<String, RosterItem>>>,
    /// Bumped by every roster write here, so a roster read from the store while a
    /// write happened is not cached (it may miss the write).
    roster_writes: u64,
}

/// The session table's size below which it is not shrunk.
const MIN_TABLE: usize = 1024;

/// Every session of the node.
#[derive(Debug, Default)]
pub struct Hub {
    users: RwLock<HashMap<String, UserEntry>>,
    /// XEP-0198 stream ids of resumable sessions → the session's queue.
    resumable: Mutex<HashMap<String, Arc<SessionHandle>>>,
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
        let user = handle.user();
        let entry = users.entry(user).or_insert_with(|| UserEntry {
            sessions: Vec::new(),
            blocked: Arc::new(blocked),
            roster: None,
            roster_writes: 0,
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
        let user = handle.user();
        let gone = users.get_mut(&user).is_some_and(|entry| {
            entry.sessions.retain(|s| s.id != handle.id);
            entry.sessions.is_empty()
        });
        if gone {
            users.remove(&user);
            // A table keeps its size when what filled it is gone: once mostly empty
            // after a peak, it shrinks, so the memory comes back.
            let len = users.len();
            if users.capacity() > MIN_TABLE && len < users.capacity() / 4 {
                users.shrink_to(len * 2);
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

    /// Whether the user has a session here (without copying the list).
    pub fn has_sessions(&self, user: &str) -> bool {
        let users = self.users.read().unwrap_or_else(|e| e.into_inner());
        users.get(user).is_some_and(|e| !e.sessions.is_empty())
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

    /// The cached roster of a user with a session here, or the write count to pass to
    /// [`Self::cache_roster`] after reading it from the store.
    pub fn roster(&self, user: &str) -> Result<Arc<HashMap<String, RosterItem>>, Option<u64>> {
        let users = self.users.read().unwrap_or_else(|e| e.into_inner());
        match users.get(user) {
            Some(UserEntry {
                roster: Some(roster),
                ..
            }) => Ok(roster.clone()),
            Some(entry) => Err(Some(entry.roster_writes)),
            None => Err(None),
        }
    }

    /// Caches a roster read from the store, if the user still has a session here and
    /// no roster write happened since `writes` was read (`items` might miss it).
    pub fn cache_roster(&self, user: &str, writes: u64, items: Vec<RosterItem>) {
        let mut users = self.users.write().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = users.get_mut(user)
            && entry.roster.is_none()
            && entry.roster_writes == writes
        {
            let map = items.into_iter().map(|i| (i.contact.clone(), i)).collect();
            entry.roster = Some(Arc::new(map));
        }
    }

    /// A roster item was written (or removed) in the store: the cache follows. A write
    /// the cache cannot follow (nothing cached yet) leaves it to be loaded later.
    pub fn roster_changed(&self, user: &str, item: &RosterItem, removed: bool) {
        let mut users = self.users.write().unwrap_or_else(|e| e.into_inner());
        let Some(entry) = users.get_mut(user) else {
            return;
        };
        entry.roster_writes += 1;
        if let Some(roster) = &mut entry.roster {
            let map = Arc::make_mut(roster);
            if removed {
                map.remove(&item.contact);
            } else {
                map.insert(item.contact.clone(), item.clone());
            }
        }
    }

    /// Closes every session of `user` (its account was deleted); returns how many.
    pub fn disconnect_user(&self, user: &str) -> usize {
        let sessions = self.sessions(user);
        for s in &sessions {
            let _ = s.tell(Control::AccountRemoved);
        }
        sessions.len()
    }

    /// Number of sessions on the node.
    pub fn session_count(&self) -> usize {
        let users = self.users.read().unwrap_or_else(|e| e.into_inner());
        users.values().map(|e| e.sessions.len()).sum()
    }

    pub fn add_resumable(&self, id: &str, handle: Arc<SessionHandle>) {
        lock(&self.resumable).insert(id.to_owned(), handle);
    }

    pub fn remove_resumable(&self, id: &str) {
        lock(&self.resumable).remove(id);
    }

    /// A resumable session owned by `user`.
    pub fn resumable(&self, id: &str, user: &str) -> Option<Arc<SessionHandle>> {
        let map = lock(&self.resumable);
        let handle = map.get(id)?;
        (handle.jid.node().map(|n| n.as_str()) == Some(user)).then(|| handle.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Control messages arrive in order, a waiting session is woken, a full inbox and
    /// a closed one give the message back, and closing hands over what was waiting.
    #[tokio::test]
    async fn the_control_inbox_is_bounded_and_closes() {
        let hub = Hub::default();
        let inbox = handle(&hub, "u@d/r", 8);
        let waiting = tokio::spawn({
            let inbox = inbox.clone();
            async move { inbox.next(false).await }
        });
        tokio::task::yield_now().await;
        inbox.tell(Control::Replaced).unwrap();
        assert!(matches!(
            waiting.await.unwrap(),
            Next::Control(Control::Replaced)
        ));
        for _ in 0..CONTROL_SLOTS {
            inbox.tell(Control::AccountRemoved).unwrap();
        }
        assert!(matches!(
            inbox.tell(Control::Replaced),
            Err(Control::Replaced)
        ));
        // Control comes before stanzas.
        inbox.send("<message/>".into(), "a@d").unwrap();
        assert!(matches!(
            inbox.next(true).await,
            Next::Control(Control::AccountRemoved)
        ));
        let left = inbox.control.close();
        assert_eq!(left.len(), CONTROL_SLOTS - 1);
        assert!(matches!(
            inbox.tell(Control::AccountRemoved),
            Err(Control::AccountRemoved)
        ));
        assert!(matches!(inbox.next(true).await, Next::Stanza(_)));
    }

    fn handle(hub: &Hub, jid: &str, queue: usize) -> Arc<SessionHandle> {
        let limits = QueueLimits {
            stanzas: queue,
            bytes: 1 << 20,
        };
        Arc::new(SessionHandle::new(
            hub.next_session_id(),
            FullJid::new(jid).unwrap(),
            limits,
        ))
    }

    #[test]
    fn same_resource_replaces_and_the_session_cap_holds() {
        let hub = Hub::default();
        let a = handle(&hub, "u@d/one", 4);
        let b = handle(&hub, "u@d/one", 4);
        let c = handle(&hub, "u@d/two", 4);
        assert!(
            hub.register(a.clone(), 2, HashSet::new())
                .unwrap()
                .is_none()
        );
        let replaced = hub.register(b.clone(), 2, HashSet::new()).unwrap().unwrap();
        assert_eq!(replaced.id, a.id);
        assert!(hub.register(c, 2, HashSet::new()).unwrap().is_none());
        let d = handle(&hub, "u@d/three", 4);
        assert!(matches!(
            hub.register(d, 2, HashSet::new()),
            Err(TooManySessions)
        ));
        // The replaced session's late unregister does not remove its successor.
        hub.unregister(&a);
        assert_eq!(hub.session("u", "one").unwrap().id, b.id);
        assert_eq!(hub.session_count(), 2);
    }

    /// Memory after sessions end: the session table shrinks back once its users are
    /// gone (it held its peak size for good).
    #[test]
    fn the_session_table_shrinks_after_a_peak() {
        let hub = Hub::default();
        let handles: Vec<_> = (0..5000)
            .map(|i| handle(&hub, &format!("u{i}@d/r"), 4))
            .collect();
        for h in &handles {
            hub.register(h.clone(), 1, HashSet::new()).unwrap();
        }
        let peak = hub.users.read().unwrap().capacity();
        assert!(peak >= 5000);
        for h in &handles {
            hub.unregister(h);
        }
        assert_eq!(hub.session_count(), 0);
        let after = hub.users.read().unwrap().capacity();
        assert!(after <= MIN_TABLE, "capacity {peak} -> {after}");
    }

    /// M4: a sender that floods a session's queue fills only its share; the excess
    /// is refused (and bounced by the caller) while other senders still get in.
    #[test]
    fn a_flooding_sender_fills_only_its_share_of_the_queue() {
        let hub = Hub::default();
        let a = handle(&hub, "u@d/r", 8);
        let m: Arc<str> = "<message/>".into();
        assert_eq!(a.send(m.clone(), "flood@d/x"), Ok(()));
        assert_eq!(
            a.send(m.clone(), "flood@d/y"),
            Ok(()),
            "one share per bare JID"
        );
        assert_eq!(a.send(m.clone(), "flood@d"), Err(Refused::Full));
        for n in 0..2 {
            assert_eq!(a.send(m.clone(), &format!("other{n}@d")), Ok(()));
        }
        assert_eq!(a.send(m.clone(), ""), Ok(()), "the server has a share too");
        // Taking from the queue frees the sender's share.
        assert_eq!(&*a.take().unwrap(), "<message/>");
        assert_eq!(a.send(m.clone(), "flood@d"), Ok(()));
        // The whole queue is bounded too: 8 stanzas.
        for n in 0..3 {
            assert_eq!(a.send(m.clone(), &format!("more{n}@d")), Ok(()));
        }
        assert_eq!(a.send(m.clone(), "last@d"), Err(Refused::Full));
        // A room's relays are held to the whole queue only, not to one share.
        let b = handle(&hub, "v@d/r", 8);
        for _ in 0..8 {
            assert_eq!(b.send_relayed(m.clone(), "room@conference.d/nick"), Ok(()));
        }
        assert_eq!(
            b.send_relayed(m, "room@conference.d/nick"),
            Err(Refused::Full)
        );
    }

    /// A session waiting on its queue wakes for a stanza; once it has taken all, the
    /// queue holds no storage (an idle session's queue costs nothing).
    #[tokio::test]
    async fn a_waiting_session_wakes_and_an_emptied_queue_holds_nothing() {
        let hub = Hub::default();
        let a = handle(&hub, "u@d/r", 8);
        let waiter = tokio::spawn({
            let a = a.clone();
            async move { a.next(true).await }
        });
        tokio::task::yield_now().await;
        assert_eq!(a.send("<message/>".into(), "b@d"), Ok(()));
        assert!(matches!(waiter.await.unwrap(), Next::Stanza(xml) if &*xml == "<message/>"));
        for n in 0..5 {
            assert_eq!(a.send("<presence/>".into(), &format!("c{n}@d")), Ok(()));
        }
        assert!(matches!(a.next(true).await, Next::Stanza(_)));
        while a.take().is_some() {}
        let q = lock(&a.queue);
        assert_eq!(
            (q.items.capacity(), q.by_sender.capacity(), q.bytes),
            (0, 0, 0)
        );
    }

    #[test]
    fn the_queue_is_bounded_in_bytes_and_a_closed_session_refuses() {
        let limits = QueueLimits {
            stanzas: 100,
            bytes: 400,
        };
        let a = SessionHandle::new(1, FullJid::new("u@d/r").unwrap(), limits);
        let big: Arc<str> = "x".repeat(90).into();
        assert_eq!(a.send(big.clone(), "a@d"), Ok(()));
        assert_eq!(
            a.send(big.clone(), "a@d"),
            Err(Refused::Full),
            "a's share is 100 bytes"
        );
        for s in ["b@d", "c@d", "d@d"] {
            assert_eq!(a.send(big.clone(), s), Ok(()));
        }
        assert_eq!(
            a.send(big.clone(), "e@d"),
            Err(Refused::Full),
            "400 bytes in all"
        );
        let left = a.close();
        assert_eq!(left.len(), 4, "what waited is given back");
        assert_eq!(a.send(big, "a@d"), Err(Refused::Gone));
        assert!(a.take().is_none());
    }
}
