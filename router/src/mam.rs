//! Message archives (XEP-0313) on each account's home node: both sides of a chat are
//! archived where each party is homed (the sender's node when it sends, the
//! recipient's when it delivers, on another cluster too), each with its own
//! `<stanza-id/>` (XEP-0359). Writes leave the delivery path: rows go through a
//! bounded queue to one writer task that stores whatever has gathered in one
//! transaction. A query first waits for the rows queued before it, so a client sees
//! what it just sent. Expiry runs hourly. Decisions live in `core::archive`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use impmesh_store::{ArchiveFilter, ArchivePage, ArchiveRow, Store};
use jid::Jid;
use minidom::Element;
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Server;
use crate::context::Context;
use crate::core::archive::{self, Page, Prefs};
use crate::core::pubsub::Refusal;
use crate::error::StanzaErrorCondition;
use crate::hub::lock;
use crate::pep::store_failed;
use crate::stanza;
use crate::time::now_micros;
use crate::xml::ns;

/// Rows waiting for the writer, at most: a sender waits for room beyond (the store
/// sets the pace, memory does not grow).
const QUEUE: usize = 16_384;
/// Rows stored in one transaction, at most, and how long the writer gathers rows
/// before it stores them. Large batches are what make archiving cheap: the store
/// keeps each account's rows of a batch as one block, one row and one index entry
/// (at 1,000 msgs/s over 1,000 accounts, a 5 s window puts ten messages in a block;
/// docs/benchmarks.md). A query, or the metadata request, stores what waits first; a
/// crash loses at most this window of history (the messages themselves were
/// delivered or stored offline).
const BATCH: usize = 16_384;
const WINDOW: Duration = Duration::from_secs(5);
/// After shutdown is asked, rows still arriving (deliveries in flight) are taken
/// until none came for this long.
const SHUTDOWN_QUIET: Duration = Duration::from_millis(200);
/// Accounts whose preferences are kept in memory.
const PREFS_CACHE: usize = 100_000;
/// Bytes of results one query sends, at most (a page ends early beyond; the client
/// asks for the next).
const MAX_RESULT_BYTES: usize = 2 * 1024 * 1024;
/// Blocks of messages one expiry statement deletes (up to 64 messages each: the
/// store's write lock is held for at most about 16,000 messages).
const EXPIRY_BLOCKS: usize = 256;
/// Zones (of the index of histories by contact) one expiry statement deletes.
const EXPIRY_ZONES: usize = 10_000;
const EXPIRY_PERIOD: Duration = Duration::from_secs(3600);

/// What the features of the archive are, for disco#info.
pub const MAM_FEATURES: &[&str] = &[ns::MAM, ns::MAM_EXTENDED, ns::SID];

/// Rows archived and not yet stored, and the flushes that wait for them. Deliveries
/// add to it under a lock without waking anyone: the writer wakes once per window
/// (or full batch, or flush), not once per row (a wake-up per row cost more than
/// storing the row, docs/benchmarks.md).
#[derive(Default)]
struct Pending {
    rows: Vec<ArchiveRow>,
    flushed: Vec<oneshot::Sender<()>>,
    /// The writer has stopped: rows are no longer taken.
    closed: bool,
}

#[derive(Default)]
struct Shared {
    pending: Mutex<Pending>,
    /// Wakes the writer early: a full batch or a flush.
    wake: Notify,
    /// Wakes deliveries waiting for room.
    room: Notify,
}

impl Shared {
    /// Everything that waits, leaving room for more in `spare` (the writer's last
    /// batch, emptied: its memory is used again rather than grown anew each time).
    fn take(&self, spare: Vec<ArchiveRow>) -> (Vec<ArchiveRow>, Vec<oneshot::Sender<()>>) {
        let mut pending = lock(&self.pending);
        let taken = (
            std::mem::replace(&mut pending.rows, spare),
            std::mem::take(&mut pending.flushed),
        );
        drop(pending);
        self.room.notify_waiters();
        taken
    }

    /// Whether the writer should store now rather than wait for the window.
    fn due(&self) -> bool {
        let pending = lock(&self.pending);
        pending.rows.len() >= BATCH || !pending.flushed.is_empty()
    }
}

/// The archive's queue and the preferences in memory.
pub(crate) struct Archive {
    shared: Arc<Shared>,
    prefs: Mutex<HashMap<String, Arc<Prefs>>>,
}

impl std::fmt::Debug for Archive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Archive").finish_non_exhaustive()
    }
}

impl Archive {
    /// Starts the writer and the expiry task (when `retention` is set).
    pub(crate) fn start(
        store: Store,
        retention: Option<Duration>,
        shutdown: CancellationToken,
        tasks: &TaskTracker,
    ) -> Archive {
        let shared = Arc::new(Shared::default());
        tasks.spawn(writer(store.clone(), shared.clone(), shutdown.clone()));
        if let Some(retention) = retention {
            tasks.spawn(expiry(store, retention, shutdown));
        }
        Archive {
            shared,
            prefs: Mutex::new(HashMap::new()),
        }
    }
}

/// Closes the archive when the writer ends, also by a panic: deliveries stop adding
/// rows and every flush that waits is answered (a writer gone must not leave queries
/// waiting forever).
struct CloseOnDrop(Arc<Shared>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        let mut pending = lock(&self.0.pending);
        pending.closed = true;
        let rows = std::mem::take(&mut pending.rows);
        pending.flushed.clear();
        drop(pending);
        self.0.room.notify_waiters();
        if !rows.is_empty() {
            tracing::warn!(
                rows = rows.len(),
                "the archive writer stopped with rows not stored"
            );
        }
    }
}

async fn writer(store: Store, shared: Arc<Shared>, shutdown: CancellationToken) {
    let _close = CloseOnDrop(shared.clone());
    let mut spare = Vec::new();
    while !shutdown.is_cancelled() {
        // Gather for WINDOW, unless the batch is full or a query waits for it.
        if !shared.due() {
            tokio::select! {
                () = tokio::time::sleep(WINDOW) => {}
                () = shared.wake.notified() => {}
                () = shutdown.cancelled() => {}
            }
        }
        let (mut rows, mut flushed) = shared.take(spare);
        // A wake-up left for what was just taken would end the next window at once.
        let _ = tokio::time::timeout(Duration::ZERO, shared.wake.notified()).await;
        write(&store, &mut rows, &mut flushed).await;
        spare = rows;
    }
    // Shutting down: what waits, and what deliveries still in flight add, is stored
    // until none came for SHUTDOWN_QUIET; the archive is closed under the same lock
    // that finds it empty, so no row is taken and then dropped.
    loop {
        let (mut rows, mut flushed) = shared.take(Vec::new());
        write(&store, &mut rows, &mut flushed).await;
        tokio::time::sleep(SHUTDOWN_QUIET).await;
        let mut pending = lock(&shared.pending);
        if pending.rows.is_empty() {
            pending.closed = true;
            return;
        }
    }
}

async fn write(store: &Store, rows: &mut Vec<ArchiveRow>, flushed: &mut Vec<oneshot::Sender<()>>) {
    // The store keeps each account's rows of a batch as one block (in the order of
    // their ids).
    if let Err(e) = store.archive_append(rows).await {
        tracing::error!(error = %e, rows = rows.len(), "archiving messages failed; they were delivered but are not in the archive");
    }
    rows.clear();
    for done in flushed.drain(..) {
        let _ = done.send(());
    }
}

async fn expiry(store: Store, retention: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(EXPIRY_PERIOD);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let cutoff = now_micros() - i64::try_from(retention.as_micros()).unwrap_or(i64::MAX);
        let mut total = 0;
        let mut failed = false;
        loop {
            match store.archive_expire(cutoff, EXPIRY_BLOCKS).await {
                Ok(n) => {
                    total += n;
                    if n < EXPIRY_BLOCKS as u64 {
                        break;
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "archive expiry failed; retried next hour");
                    failed = true;
                    break;
                }
            }
        }
        // The zones emptied (the index of histories by contact), once the messages went.
        if !failed {
            loop {
                match store.archive_expire_zones(cutoff, EXPIRY_ZONES).await {
                    Ok(n) if n < EXPIRY_ZONES as u64 => break,
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "expiring the archive's zones failed; retried next hour");
                        break;
                    }
                }
            }
        }
        if total > 0 {
            tracing::info!(
                blocks = total,
                "expired archived messages past the retention (blocks of an account's messages)"
            );
        }
    }
}

/// A new archive id: the time in microseconds, then 64 random bits, in fixed-width
/// hex. Unique and hard to guess (XEP-0359), and increasing with time, so each
/// account's index grows at its end instead of at random places (random ids made
/// every archived row dirty a random page of the index).
pub(crate) fn archive_id() -> String {
    use rand::RngCore as _;
    format!(
        "{:014x}{:016x}",
        now_micros(),
        rand::thread_rng().next_u64()
    )
}

impl Server {
    /// `owner`'s archiving preferences (the configured default until set).
    async fn archive_prefs(&self, owner: &str) -> Arc<Prefs> {
        if let Some(p) = lock(&self.archive.prefs).get(owner) {
            return p.clone();
        }
        let stored = self.store.archive_prefs(owner).await;
        let prefs = match stored {
            Ok(Some((default, always, never))) => Prefs {
                default: archive::DefaultMode::parse(&default)
                    .unwrap_or(self.config.archive.default),
                always,
                never,
            },
            Ok(None) => Prefs::new(self.config.archive.default),
            Err(e) => {
                // Not cached: the next message asks again.
                tracing::error!(error = %e, "cannot read archiving preferences");
                return Arc::new(Prefs::new(self.config.archive.default));
            }
        };
        let prefs = Arc::new(prefs);
        let mut cache = lock(&self.archive.prefs);
        if cache.len() >= PREFS_CACHE {
            cache.clear();
        }
        cache.insert(owner.to_owned(), prefs.clone());
        prefs
    }

    /// Whether a message `owner` exchanged with `with` goes in `owner`'s archive.
    async fn archives(&self, owner: &str, message: &Element, with: &Jid) -> bool {
        if !self.config.archive.enabled || !archive::archivable(message) {
            return false;
        }
        let prefs = self.archive_prefs(owner).await;
        let with = with.to_bare();
        let in_roster = prefs.default == archive::DefaultMode::Roster
            && matches!(self.roster_of(owner).await, Ok(r) if r.contains_key(with.as_str()));
        prefs.archives(with.as_str(), in_roster)
    }

    fn row(owner: &str, id: String, with: &Jid, outgoing: bool, stanza: Arc<str>) -> ArchiveRow {
        ArchiveRow {
            owner: owner.to_owned(),
            id,
            peer: with.to_bare().to_string(),
            resource: with.resource().map(|r| r.to_string()).unwrap_or_default(),
            ts: now_micros(),
            outgoing,
            stanza,
        }
    }

    /// Archives a message `owner` sent to `to` in the sender's archive. Returns its id
    /// there (for the sender's carbons) and the message serialized, which a delivery
    /// on this node passes on to [`Server::archive_received`] rather than serialize
    /// it again.
    pub(crate) async fn archive_sent(
        &self,
        owner: &str,
        message: &Element,
        to: &Jid,
    ) -> Option<(String, Arc<str>)> {
        if !self.archives(owner, message, to).await {
            return None;
        }
        let id = archive_id();
        let xml: Arc<str> = stanza::serialize(message).into();
        let row = Self::row(owner, id.clone(), to, true, xml.clone());
        self.enqueue(row).await;
        Some((id, xml))
    }

    /// Stamps a message for `owner` (a user of this node) with the id it gets in the
    /// recipient's archive, and returns the row to store once it is delivered or kept
    /// offline with the stamped message serialized for the delivery. `xml`, when
    /// given, is `message` serialized as it comes (by [`Server::archive_sent`]): the
    /// message is then serialized no more. A message already stamped for `owner` was
    /// archived when it first came (a rerouted one): it keeps its id and is not stored
    /// twice. `message` is left as it came unless a row is returned.
    pub(crate) async fn archive_received(
        &self,
        owner: &str,
        message: &mut Element,
        xml: Option<&Arc<str>>,
    ) -> Option<(ArchiveRow, Arc<str>)> {
        let by = stanza::bare(owner, &self.config.domain)?;
        if archive::stanza_id(message, by.as_str()).is_some() {
            return None;
        }
        let from = message.attr("from").and_then(stanza::parse_jid)?;
        // A message to oneself is archived once, as sent.
        if from.to_bare() == by || !self.archives(owner, message, &from).await {
            return None;
        }
        let id = archive_id();
        let xml = xml
            .cloned()
            .unwrap_or_else(|| stanza::serialize(message).into());
        archive::stamp(message, &id, by.as_str());
        let delivered: Arc<str> = match archive::stamp_serialized(&xml, &id, by.as_str()) {
            Some(stamped) => stamped.into(),
            None => stanza::serialize(message).into(),
        };
        Some((Self::row(owner, id, &from, false, xml), delivered))
    }

    pub(crate) async fn enqueue(&self, row: ArchiveRow) {
        let shared = &self.archive.shared;
        let mut row = Some(row);
        loop {
            let room = shared.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            {
                let mut pending = lock(&shared.pending);
                if pending.closed {
                    tracing::warn!("the archive writer has stopped; a message was not archived");
                    return;
                }
                if pending.rows.len() < QUEUE {
                    pending.rows.extend(row.take());
                    if pending.rows.len() >= BATCH {
                        shared.wake.notify_one();
                    }
                    return;
                }
            }
            // Full: the store sets the pace.
            room.await;
        }
    }

    /// Waits until every row queued so far is stored.
    pub(crate) async fn archive_flush(&self) {
        let shared = &self.archive.shared;
        let (done, wait) = oneshot::channel();
        {
            let mut pending = lock(&shared.pending);
            if pending.closed {
                return;
            }
            pending.flushed.push(done);
        }
        shared.wake.notify_one();
        let _ = wait.await;
    }
}

impl Server {
    /// XEP-0313's `<metadata/>` of `user`'s archive: its first and last messages as
    /// stored now (callers flush the writer first).
    pub(crate) async fn archive_metadata(
        &self,
        user: &str,
    ) -> Result<String, impmesh_store::StoreError> {
        let inner = match self.store.archive_bounds(user).await? {
            Some((first, last)) => format!(
                "<start id='{}' timestamp='{}'/><end id='{}' timestamp='{}'/>",
                crate::xml::escape(&first.id),
                archive::datetime(first.ts),
                crate::xml::escape(&last.id),
                archive::datetime(last.ts)
            ),
            None => String::new(),
        };
        Ok(format!("<metadata xmlns='{}'>{inner}</metadata>", ns::MAM))
    }
}

impl Context<'_> {
    /// XEP-0313 requests to the user's own archive: the form, queries, preferences,
    /// metadata (the extended namespace).
    pub(crate) async fn mam_iq(
        &mut self,
        payload: &Element,
        set: bool,
    ) -> Result<Option<String>, Refusal> {
        let server = self.server.clone();
        if !server.config.archive.enabled {
            return Err(StanzaErrorCondition::ServiceUnavailable.into());
        }
        let user = self.user();
        match (payload.name(), set) {
            ("query", false) => Ok(Some(archive::query_form())),
            ("query", true) => self.mam_query(&user, payload).await,
            ("prefs", false) => Ok(Some(server.archive_prefs(&user).await.to_xml())),
            ("prefs", true) => {
                let prefs = Prefs::parse(payload)?;
                server
                    .store
                    .set_archive_prefs(&user, prefs.default.as_str(), &prefs.always, &prefs.never)
                    .await
                    .map_err(store_failed)?;
                let xml = prefs.to_xml();
                lock(&server.archive.prefs).insert(user, Arc::new(prefs));
                Ok(Some(xml))
            }
            ("metadata", false) => {
                server.archive_flush().await;
                let metadata = server.archive_metadata(&user).await;
                Ok(Some(metadata.map_err(store_failed)?))
            }
            _ => Err(StanzaErrorCondition::BadRequest.into()),
        }
    }

    async fn mam_query(
        &mut self,
        user: &str,
        payload: &Element,
    ) -> Result<Option<String>, Refusal> {
        let server = self.server.clone();
        let to = self.jid().to_string();
        let (results, fin) = server.archive_results(user, &to, None, payload).await?;
        for xml in results {
            self.push_out(xml.into());
        }
        Ok(Some(fin))
    }
}

impl Server {
    /// A query (`payload`) of `owner`'s archive (an account's, or a room's with
    /// `from` its address) for `to`: the result messages, then the `<fin/>`.
    pub(crate) async fn archive_results(
        &self,
        owner: &str,
        to: &str,
        from: Option<&str>,
        payload: &Element,
    ) -> Result<(Vec<String>, String), Refusal> {
        let q = archive::parse_query(payload, self.config.archive.max_page)
            .map_err(|(c, text)| Refusal::from(c).with_text(text))?;
        let with = q.with.as_deref().and_then(stanza::parse_jid);
        let peer = with.as_ref().map(|j| j.to_bare().to_string());
        let resource = with
            .as_ref()
            .and_then(|j| j.resource().map(|r| r.to_string()));
        let filter = ArchiveFilter {
            peer: peer.as_deref(),
            resource: resource.as_deref(),
            start: q.start,
            end: q.end,
            after_id: q.after_id.as_deref(),
            before_id: q.before_id.as_deref(),
            ids: &q.ids,
        };
        let page = match &q.page {
            Page::Forward { after } => ArchivePage::Forward(after.as_deref()),
            Page::Backward { before } => ArchivePage::Backward(before.as_deref()),
        };
        self.archive_flush().await;
        let results = self
            .store
            .archive_query(owner, &filter, page, q.max)
            .await
            .map_err(store_failed)?
            .ok_or_else(|| {
                Refusal::from(StanzaErrorCondition::ItemNotFound)
                    .with_text("no message in the archive has that id")
            })?;
        let mut messages = results.messages;
        let mut complete = results.complete;
        // A page ends early rather than send more than MAX_RESULT_BYTES at once.
        // Counted from the end the page is taken from (the newest for a backward page).
        let mut bytes = 0;
        let over = |m: &impmesh_store::Archived| {
            bytes += m.stanza.len();
            bytes > MAX_RESULT_BYTES
        };
        let within = match q.page {
            Page::Forward { .. } => messages.iter().position(over),
            Page::Backward { .. } => messages.iter().rev().position(over),
        };
        let keep = within.map_or(messages.len(), |i| i.max(1));
        if keep < messages.len() {
            complete = false;
            match q.page {
                Page::Forward { .. } => messages.truncate(keep),
                Page::Backward { .. } => {
                    messages.drain(..messages.len() - keep);
                }
            }
        }
        let first_last = match (messages.first(), messages.last()) {
            (Some(f), Some(l)) => Some((f.id.clone(), l.id.clone())),
            _ => None,
        };
        let ordered: Box<dyn Iterator<Item = _>> = if q.flip {
            Box::new(messages.iter().rev())
        } else {
            Box::new(messages.iter())
        };
        let results = ordered
            .map(|m| {
                archive::result_message(to, from, q.queryid.as_deref(), &m.id, m.ts, &m.stanza)
            })
            .collect();
        let fin = archive::fin(
            first_last.as_ref().map(|(f, l)| (f.as_str(), l.as_str())),
            complete,
        );
        Ok((results, fin))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A clean stop stores what waits for the writer, and what deliveries still add
    /// while it drains, then closes the archive: later rows are refused, not taken
    /// and dropped. (Real time, as below.)
    #[tokio::test]
    async fn a_clean_stop_stores_what_waits_then_closes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open("sqlite://mam.db", dir.path()).await.unwrap();
        store
            .add_user(impmesh_store::NewUser {
                username: "u",
                password: "pw",
                home_cluster: "c",
                home_node: "n",
            })
            .await
            .unwrap();
        let row = |id: &str| ArchiveRow {
            owner: "u".into(),
            id: id.into(),
            peer: "p@d".into(),
            resource: String::new(),
            ts: now_micros(),
            outgoing: false,
            stanza: "<message/>".into(),
        };
        let shared = Arc::new(Shared::default());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(writer(store.clone(), shared.clone(), shutdown.clone()));
        // Well inside the writer's window: only the stop stores it.
        lock(&shared.pending).rows.push(row("a"));
        shutdown.cancel();
        lock(&shared.pending).rows.push(row("b"));
        task.await.unwrap();
        let (first, last) = store.archive_bounds("u").await.unwrap().unwrap();
        assert_eq!((first.id.as_str(), last.id.as_str()), ("a", "b"));
        assert!(lock(&shared.pending).closed);
    }

    /// The expiry deletes what is older than the retention and keeps the rest; its
    /// first pass runs at start. (Real time: a paused clock times out the store's
    /// connection pool at once.)
    #[tokio::test]
    async fn expiry_keeps_the_retention() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open("sqlite://mam.db", dir.path()).await.unwrap();
        store
            .add_user(impmesh_store::NewUser {
                username: "u",
                password: "pw",
                home_cluster: "c",
                home_node: "n",
            })
            .await
            .unwrap();
        let row = |id: &str, ts: i64| ArchiveRow {
            owner: "u".into(),
            id: id.into(),
            peer: "p@d".into(),
            resource: String::new(),
            ts,
            outgoing: false,
            stanza: "<message/>".into(),
        };
        let day = 86_400_000_000;
        store
            .archive_append(&[row("old", now_micros() - 3 * day), row("new", now_micros())])
            .await
            .unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(expiry(
            store.clone(),
            Duration::from_secs(2 * 86_400),
            shutdown.clone(),
        ));
        let first = || async {
            store
                .archive_bounds("u")
                .await
                .unwrap()
                .map(|(first, _)| first.id)
        };
        for _ in 0..100 {
            if first().await.as_deref() == Some("new") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(first().await.as_deref(), Some("new"));
        shutdown.cancel();
        task.await.unwrap();
    }
}
