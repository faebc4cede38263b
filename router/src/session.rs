//! An established client session (after bind): one task that owns the connection,
//! races reads against its queue and timers, and applies XEP-0198 stream management.
//!
//! When a stream-managed connection drops, the session hibernates for the resume window:
//! it stays registered and keeps queued stanzas as unacknowledged. A new connection that
//! resumes (`c2s.rs`) hands its transport to this task, which retransmits everything the
//! client has not acknowledged. When the window passes, or without stream management,
//! every message the client did not acknowledge is routed again: to another resource of
//! the user, or to offline storage. Nothing is dropped silently.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;

use jid::{FullJid, Jid};
use minidom::Element;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use crate::Server;
use crate::conn::{Conn, ReadError};
use crate::context::{Context, Handled};
use crate::core::csi::{self, Held, Offer};
use crate::core::envelope::{Envelope, Malformed, Type};
use crate::core::sm::{StreamManagement, Violation};
use crate::error::{StanzaErrorCondition, StreamErrorCondition};
use crate::hub::{Control, Next, ResumeRequest, SessionHandle, lock};
use crate::names::random_id;
use crate::stanza::{self, Kind};
use crate::xml::{Frame, ns};

/// A bound session, ready to run.
pub struct Bound {
    pub conn: Conn,
    pub handle: Arc<SessionHandle>,
    /// What Bind 2 (XEP-0386) enabled with the resource.
    pub inline: Inline,
}

/// Session features enabled inline by Bind 2 before the session starts.
#[derive(Debug, Default)]
pub struct Inline {
    /// XEP-0198 enabled: its id and whether it may be resumed (the id is registered
    /// with the hub already).
    pub sm: Option<(String, bool)>,
    /// XEP-0352: the session starts inactive.
    pub inactive: bool,
}

/// A session that read nothing for this long lets its stream's parser go (about
/// 1.5 KiB of an idle session's memory, docs/benchmarks.md); the next input rebuilds
/// it in about 2 µs.
const REST_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

/// Stanzas drained from the queue per wake-up before writing them in one flush.
/// Bounds the time one busy session holds its task (STYLE 5).
const WRITE_BATCH: usize = 64;

/// Offline messages read from the store per page (XEP-0160): pages follow each other
/// as the client acknowledges them, so a user with a full offline store logs in with
/// at most this many extra stanzas in memory.
const OFFLINE_PAGE: usize = 100;

/// Why a session ended.
#[derive(Debug)]
enum End {
    /// The client closed its stream.
    ClientClosed,
    /// The connection broke and the session cannot be resumed (or the window passed).
    Lost,
    /// Close the stream with this error.
    Error(StreamErrorCondition, &'static str),
    /// The node shuts down.
    Shutdown,
}

/// Offline delivery in progress (XEP-0160): the stored messages go out a page at a
/// time, and leave the store only once the client has them.
#[derive(Debug)]
struct OfflinePump {
    /// The last row handed to the client.
    after: i64,
    /// Every stored message has been handed over.
    done: bool,
    /// Without stream management: the rows of the last page, and the id of the ping
    /// sent after them. The client's answer comes after the page on the same stream,
    /// so it proves the page arrived (RFC 6120 §10.1: in-order processing).
    awaiting: Vec<i64>,
    ping: Option<String>,
}

/// A session task's state.
pub(crate) struct Session {
    pub(crate) server: Arc<Server>,
    pub(crate) handle: Arc<SessionHandle>,
    conn: Option<Conn>,
    sm: Option<StreamManagement>,
    /// Targets of directed presence (RFC 6121 §4.6), told when the session goes away.
    pub(crate) directed: HashSet<Jid>,
    /// Stanzas to write at the end of this wake-up.
    out: String,
    last_read: Instant,
    ping_sent: bool,
    hibernated_until: Option<Instant>,
    /// Boxed: only a session with stored messages to deliver has one, and it would
    /// otherwise sit in every idle session's future.
    offline: Option<Box<OfflinePump>>,
    /// XEP-0352: present while the client says it is inactive, with what waits for it.
    inactive: Option<Box<Held>>,
    /// Messages that reached the session while it hibernated (XEP-0357's count).
    pushed: u32,
    /// The connection's place among the node's connections, held while it lives.
    _admitted: OwnedSemaphorePermit,
}

/// A bound session's whole life, as one future that holds the session and nothing
/// else, to run as a task of its own. (Not an async fn: one keeps its arguments for
/// its whole life, so taking `Bound` would store it beside the session it becomes,
/// 1.3 KB per session for nothing.)
///
/// `admitted` is the connection's place among the node's connections, given back when
/// the session ends.
pub fn start(
    server: Arc<Server>,
    bound: Bound,
    admitted: OwnedSemaphorePermit,
) -> impl Future<Output = ()> + Send {
    use tracing::Instrument as _;
    let span = tracing::info_span!("session", jid = %bound.handle.jid, peer = %bound.conn.peer);
    let Bound {
        conn,
        handle,
        inline,
    } = bound;
    let session = Session {
        server,
        handle,
        conn: Some(conn),
        sm: inline
            .sm
            .map(|(id, resumable)| StreamManagement::new(id, resumable)),
        directed: HashSet::new(),
        out: String::new(),
        last_read: Instant::now(),
        ping_sent: false,
        hibernated_until: None,
        offline: None,
        inactive: inline.inactive.then(Default::default),
        pushed: 0,
        _admitted: admitted,
    };
    session.run().instrument(span)
}

impl Session {
    /// Not an `async fn`: one moves its arguments into locals and keeps both, which for
    /// a 1.6 KB session doubled it. An `async move` block stores what it captures once.
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn would store the session twice (see above)"
    )]
    fn run(mut self) -> impl Future<Output = ()> + Send {
        async move {
            tracing::info!(jid = %self.handle.jid, "session started");
            let end = self.run_loop().await;
            Box::pin(self.finish(end)).await;
        }
    }

    pub(crate) fn jid(&self) -> &FullJid {
        &self.handle.jid
    }

    /// The localpart of the session's user.
    pub(crate) fn user(&self) -> String {
        self.handle.user()
    }

    async fn run_loop(&mut self) -> End {
        // Borrowed, not cloned: the clone lived in every idle session's future.
        let server = self.server.clone();
        let limits = &server.config.limits;
        let window = limits.sm_window();
        loop {
            let ping_at = self.last_read
                + if self.ping_sent {
                    limits.ping_interval + limits.ping_timeout
                } else {
                    limits.ping_interval
                };
            let hibernated_until = self.hibernated_until;
            let connected = self.conn.is_some();
            // A full XEP-0198 window is flow control: nothing more is taken from the
            // queue until the client acknowledges; senders meanwhile find the queue
            // full and get their stanzas back.
            let can_take = self.sm.as_ref().is_none_or(|sm| !sm.is_full(window));
            let stalled_at = self
                .sm
                .as_ref()
                .and_then(|sm| sm.stalled_at(window, limits.ping_timeout));
            let rest_at = self
                .conn
                .as_ref()
                .and_then(|conn| conn.rest_at(self.last_read, REST_AFTER));
            let paused_until = self.conn.as_ref().and_then(|conn| conn.paused_until);
            let due = next_due(
                connected,
                ping_at,
                stalled_at,
                hibernated_until,
                [
                    rest_at.map(|at| (at, Due::Rest)),
                    paused_until.map(|at| (at, Due::Unpause)),
                ],
            );
            let step = tokio::select! {
                _ = self.server.shutdown.cancelled() => Err(End::Shutdown),
                next = self.handle.next(can_take) => match next {
                    Next::Control(control) => self.on_control(control).await,
                    Next::Stanza(xml) => {
                        self.on_queued(xml);
                        Ok(())
                    }
                },
                read = read_conn(&mut self.conn) => self.on_read(read).await,
                // One timer for every deadline: each select branch's future lives
                // in every idle session's memory, disabled or not.
                _ = sleep_until_opt(due.map(|(at, _)| at)) => match due.map(|(_, what)| what) {
                    Some(Due::Ping) if self.ping_sent => {
                        Err(End::Error(StreamErrorCondition::ConnectionTimeout, "no answer to ping"))
                    }
                    Some(Due::Ping) => {
                        self.ping_sent = true;
                        self.push_ping(&format!("ping-{}", self.handle.id));
                        Ok(())
                    }
                    Some(Due::Stalled) => self.stalled(),
                    Some(Due::Unpause) => {
                        if let Some(conn) = self.conn.as_mut() {
                            conn.paused_until = None;
                        }
                        Ok(())
                    }
                    Some(Due::Rest) => {
                        if let Some(conn) = self.conn.as_mut() {
                            conn.rest();
                        }
                        Ok(())
                    }
                    Some(Due::Hibernated) => Err(End::Lost),
                    None => Ok(()),
                },
            };
            if let Err(end) = step {
                return end;
            }
            if let Err(end) = self.pump_offline().await {
                return end;
            }
            if let Err(end) = self.flush().await {
                return end;
            }
        }
    }

    /// A server ping (XEP-0199) to the client.
    fn push_ping(&mut self, id: &str) {
        let ping = format!(
            "<iq type='get' id='{id}' to='{}' from='{}'><ping xmlns='{}'/></iq>",
            crate::xml::escape(&self.jid().to_string()),
            crate::xml::escape(&self.server.config.domain),
            ns::PING
        );
        self.push_out(ping.into());
    }

    /// The window stayed full and the client left our `<r/>` unanswered for the ping
    /// timeout: it does not read. A resumable session hibernates (the connection may
    /// be black-holed); any other ends.
    fn stalled(&mut self) -> Result<(), End> {
        tracing::info!(jid = %self.handle.jid, "the client acknowledges nothing; dropping its connection");
        self.conn = None;
        match &self.sm {
            Some(sm) if sm.resumable() => self.connection_lost(),
            _ => Err(End::Lost),
        }
    }

    /// Handles what one read brought.
    async fn on_read(&mut self, read: Result<(), ReadError>) -> Result<(), End> {
        match read {
            Ok(()) => {
                self.last_read = Instant::now();
                self.ping_sent = false;
                while let Some(frame) = self.conn.as_mut().and_then(Conn::pop_frame) {
                    // Boxed: stanza handling (store queries and all) is a deep state
                    // machine that would otherwise be inlined into every idle session's
                    // task. On the heap it exists only while a stanza is handled.
                    Box::pin(self.on_frame(frame)).await?;
                }
                if let Some(conn) = self.conn.as_mut() {
                    conn.idle();
                }
                Ok(())
            }
            Err(ReadError::Closed) => self.connection_lost(),
            Err(ReadError::Stream(c)) => Err(End::Error(c, "the stream broke the XML rules")),
        }
    }

    /// The transport failed: hibernate if the client can resume, end otherwise.
    fn connection_lost(&mut self) -> Result<(), End> {
        self.conn = None;
        match &self.sm {
            Some(sm) if sm.resumable() => {
                tracing::info!(jid = %self.handle.jid, "connection lost; waiting for resumption");
                // Messages the client may never have read tell its app server now,
                // in one notification (XEP-0357).
                let waiting: Vec<Element> =
                    sm.unacked().filter_map(|s| self.worth_waking(s)).collect();
                self.out.clear();
                self.hibernated_until =
                    Some(Instant::now() + self.server.config.limits.resume_timeout);
                if let Some(last) = waiting.last() {
                    self.pushed = u32::try_from(waiting.len()).unwrap_or(u32::MAX);
                    self.push_hibernated(last);
                }
                Ok(())
            }
            _ => Err(End::Lost),
        }
    }

    async fn on_frame(&mut self, frame: Frame) -> Result<(), End> {
        let element = match frame {
            Frame::Element(e) => e,
            Frame::Footer => return Err(End::ClientClosed),
            Frame::Header(_) => {
                return Err(End::Error(
                    StreamErrorCondition::BadFormat,
                    "unexpected stream header",
                ));
            }
        };
        if element.ns() == ns::SM {
            return self.on_sm(&element).await;
        }
        if element.ns() == csi::NS {
            match element.name() {
                "inactive" => {
                    self.inactive.get_or_insert_default();
                }
                "active" => self.become_active(),
                _ => {}
            }
            return Ok(());
        }
        let Some(kind) = Kind::of(&element) else {
            return Err(End::Error(
                StreamErrorCondition::UnsupportedStanzaType,
                "only message, presence and iq are allowed here",
            ));
        };
        if let Some(sm) = &mut self.sm {
            sm.on_inbound();
        }
        if kind == Kind::Iq && self.is_offline_ping_answer(&element) {
            return self.offline_page_received().await;
        }
        self.on_stanza(kind, element).await
    }

    /// RFC 6120 §8.1.2.1: the server stamps `from` with the full JID; a client claiming
    /// another JID breaks the stream.
    async fn on_stanza(&mut self, kind: Kind, mut element: Element) -> Result<(), End> {
        self.server.stats.stanza_in(kind);
        if let Some(from) = element.attr("from") {
            let own = self.jid();
            let ok = Jid::new(from).is_ok_and(|j| {
                j.to_bare() == own.to_bare()
                    && j.resource()
                        .is_none_or(|r| r.as_str() == own.resource().as_str())
            });
            if !ok {
                return Err(End::Error(
                    StreamErrorCondition::InvalidFrom,
                    "from does not match the authenticated JID",
                ));
            }
        }
        stanza::set_attr(&mut element, "from", &self.jid().to_string());
        // The envelope is read once, here; the handlers get typed values.
        let env = match Envelope::parse(&element) {
            Ok(env) => env,
            Err(Malformed::To) => {
                self.reply_error(&element, StanzaErrorCondition::JidMalformed, None);
                return Ok(());
            }
            Err(_) => {
                self.reply_error(&element, StanzaErrorCondition::BadRequest, None);
                return Ok(());
            }
        };
        // The handler gets a narrow context (context.rs), not this task.
        let mut cx = Context::new(&self.server, &self.handle, &mut self.directed);
        match env.ty {
            Type::Message(_) => cx.on_message(element, env.to).await,
            Type::Presence(ty) => cx.on_presence(element, ty, env.to).await,
            Type::Iq(ty) => cx.on_iq(element, ty, env.to).await,
        }
        let handled = cx.finish();
        self.handled(handled);
        Ok(())
    }

    /// Writes what a handler produced, counted by stream management.
    fn handled(&mut self, handled: Handled) {
        if handled.offline_due {
            self.start_offline();
        }
        for stanza in handled.out {
            self.push_out(stanza);
        }
    }

    async fn on_sm(&mut self, element: &Element) -> Result<(), End> {
        match element.name() {
            "enable" => {
                if self.sm.is_some() {
                    self.push_raw(&sm_failed("unexpected-request"));
                    return Ok(());
                }
                let resumable = matches!(element.attr("resume"), Some("true" | "1"));
                let id = random_id();
                if resumable {
                    self.server.hub.add_resumable(&id, self.handle.clone());
                }
                let max = self.server.config.limits.resume_timeout.as_secs();
                self.push_raw(&sm_enabled(&id, resumable, max));
                self.sm = Some(StreamManagement::new(id, resumable));
                Ok(())
            }
            "r" => {
                if let Some(sm) = &self.sm {
                    let a = format!("<a xmlns='{}' h='{}'/>", ns::SM, sm.h());
                    self.push_raw(&a);
                }
                Ok(())
            }
            "a" => {
                let h = element.attr("h").and_then(|h| h.parse::<u32>().ok());
                let (Some(sm), Some(h)) = (&mut self.sm, h) else {
                    return Ok(());
                };
                match sm.on_ack(h) {
                    Ok(rows) => {
                        self.offline_acknowledged(&rows).await;
                        Ok(())
                    }
                    // XEP-0198 §4: acknowledging more than was sent.
                    Err(Violation::AckedUnsent { .. }) => Err(End::Error(
                        StreamErrorCondition::UndefinedCondition,
                        "acknowledged stanzas that were never sent",
                    )),
                }
            }
            _ => Ok(()),
        }
    }

    /// Stanzas from the queue: this one and what else waits, up to a batch and while
    /// the XEP-0198 window has room.
    fn on_queued(&mut self, first: Arc<str>) {
        let window = self.server.config.limits.sm_window();
        self.deliver(first);
        for _ in 1..WRITE_BATCH {
            if self.sm.as_ref().is_some_and(|sm| sm.is_full(window)) {
                break;
            }
            let Some(xml) = self.handle.take() else { break };
            self.deliver(xml);
        }
    }

    /// A stanza from someone else for the client: now, or later if the client is
    /// inactive and it can wait (XEP-0352, `core::csi`).
    fn deliver(&mut self, stanza: Arc<str>) {
        if self.conn.is_none() && self.hibernated_until.is_some() {
            self.push_while_hibernated(&stanza);
        }
        let Some(held) = self.inactive.as_mut() else {
            self.push_out(stanza);
            return;
        };
        if let Offer::Send(now) = held.offer(stanza) {
            for stanza in now {
                self.push_out(stanza);
            }
        }
    }

    /// A stanza reached the session while it hibernates: a message worth it tells the
    /// app server the client registered (XEP-0357), if any.
    fn push_while_hibernated(&mut self, stanza: &str) {
        if let Some(message) = self.worth_waking(stanza) {
            self.pushed = self.pushed.saturating_add(1);
            self.push_hibernated(&message);
        }
    }

    /// A stanza for the client as a message worth waking it for (XEP-0357), unless it
    /// is a room reflecting the user's own message (sent from another of its sessions
    /// under the same nick).
    fn worth_waking(&self, stanza: &str) -> Option<Element> {
        let message = push_worthy(stanza)?;
        if message.attr("type") == Some("groupchat")
            && let Some(Ok(from)) = message.attr("from").map(FullJid::new)
            && self
                .server
                .muc_nick_of(&self.handle.jid, &from.to_bare())
                .is_some_and(|nick| nick == from.resource().as_str())
        {
            return None;
        }
        Some(message)
    }

    /// Tells the app server this session registered, if any, of `message`, the
    /// `pushed`th since the session hibernated.
    fn push_hibernated(&self, message: &Element) {
        let Some(target) = lock(&self.handle.state).push.clone() else {
            return;
        };
        self.server
            .push_publish(&self.user(), &target, message, self.pushed);
    }

    /// The client is active (it said so, or resumed on a new stream): what waited
    /// goes out.
    fn become_active(&mut self) {
        if let Some(mut held) = self.inactive.take() {
            for stanza in held.take() {
                self.push_out(stanza);
            }
        }
    }

    async fn on_control(&mut self, control: Control) -> Result<(), End> {
        match control {
            Control::Replaced => Err(End::Error(
                StreamErrorCondition::Conflict,
                "another session bound this resource",
            )),
            Control::AccountRemoved => Err(End::Error(
                StreamErrorCondition::NotAuthorized,
                "the account was deleted",
            )),
            Control::Resume(request) => Box::pin(self.resume(*request)).await,
        }
    }

    /// XEP-0198 §5: takes over the new connection and retransmits what is unacked.
    async fn resume(&mut self, request: ResumeRequest) -> Result<(), End> {
        let Some(sm) = self.sm.as_mut().filter(|sm| sm.resumable()) else {
            request.refuse("item-not-found").await;
            return Ok(());
        };
        let (rows, again) = match sm.resume(request.h) {
            Ok(resumed) => resumed,
            Err(Violation::AckedUnsent { .. }) => {
                request.refuse("undefined-condition").await;
                return Ok(());
            }
        };
        let ResumeRequest { conn, sasl2, .. } = request;
        let resumed = format!(
            "<resumed xmlns='{}' previd='{}' h='{}'/>",
            ns::SM,
            sm.id(),
            sm.h()
        );
        // Over SASL2 the `<resumed/>` goes inside the success (`back` is dropped: the
        // negotiation learns the connection was taken).
        let mut out = match &sasl2 {
            None => resumed,
            Some(s) => s.completion.bound(&self.handle.jid.to_string(), &resumed),
        };
        for stanza in &again {
            out.push_str(stanza);
        }
        tracing::info!(jid = %self.handle.jid, resent = again.len(), "session resumed");
        self.conn = Some(conn);
        self.hibernated_until = None;
        self.pushed = 0;
        self.last_read = Instant::now();
        self.ping_sent = false;
        self.out = out;
        // A new stream starts active (XEP-0352 §4): what waited goes out after the
        // retransmitted stanzas.
        self.become_active();
        self.offline_acknowledged(&rows).await;
        Ok(())
    }

    /// Starts handing over stored offline messages (at initial presence).
    pub(crate) fn start_offline(&mut self) {
        if self.offline.is_none() {
            self.offline = Some(Box::new(OfflinePump {
                after: i64::MIN,
                done: false,
                awaiting: vec![],
                ping: None,
            }));
        }
    }

    /// Hands the client the next page of offline messages if the XEP-0198 window has
    /// room for it (without stream management: once the previous page is confirmed).
    async fn pump_offline(&mut self) -> Result<(), End> {
        let window = self.server.config.limits.sm_window();
        let Some(pump) = &self.offline else {
            return Ok(());
        };
        if pump.done || self.conn.is_none() {
            return Ok(());
        }
        let room = match &self.sm {
            Some(sm) => sm.offline_room(window),
            None if pump.ping.is_none() => usize::MAX,
            None => 0,
        };
        let limit = room.min(OFFLINE_PAGE);
        if limit == 0 {
            return Ok(());
        }
        let user = self.user();
        let page = match self
            .server
            .store
            .offline_page(&user, pump.after, limit)
            .await
        {
            Ok(page) => page,
            Err(e) => {
                // They stay stored and go out at the next login.
                tracing::error!(error = %e, "cannot read offline messages");
                if let Some(pump) = &mut self.offline {
                    pump.done = true;
                }
                return Ok(());
            }
        };
        let short = page.len() < limit;
        let mut rows = Vec::with_capacity(page.len());
        for message in page {
            rows.push(message.id);
            self.push_offline(message.stanza.into(), message.id);
        }
        let ping =
            (self.sm.is_none() && !rows.is_empty()).then(|| format!("offline-{}", random_id()));
        if let Some(id) = &ping {
            self.push_ping(id);
        }
        if let Some(pump) = &mut self.offline {
            pump.done = short;
            if let Some(last) = rows.last() {
                pump.after = *last;
            }
            if ping.is_some() {
                pump.awaiting = rows;
                pump.ping = ping;
            }
        }
        Ok(())
    }

    /// Whether an IQ from the client answers the ping that followed a page of offline
    /// messages (without stream management).
    fn is_offline_ping_answer(&self, iq: &Element) -> bool {
        let Some(ping) = self.offline.as_ref().and_then(|p| p.ping.as_deref()) else {
            return false;
        };
        matches!(iq.attr("type"), Some("result" | "error"))
            && iq.attr("id") == Some(ping)
            && iq
                .attr("to")
                .is_none_or(|to| to.eq_ignore_ascii_case(&self.server.config.domain))
    }

    /// The client has the last page (it answered the ping after it).
    async fn offline_page_received(&mut self) -> Result<(), End> {
        let rows = match &mut self.offline {
            Some(pump) => {
                pump.ping = None;
                std::mem::take(&mut pump.awaiting)
            }
            None => return Ok(()),
        };
        self.offline_acknowledged(&rows).await;
        Ok(())
    }

    /// Offline rows the client acknowledged leave the store.
    async fn offline_acknowledged(&mut self, rows: &[i64]) {
        if rows.is_empty() {
            return;
        }
        if let Err(e) = self.server.store.delete_offline(&self.user(), rows).await {
            // Kept: delivered again at the next login rather than lost.
            tracing::error!(error = %e, "cannot remove delivered offline messages");
        }
    }

    /// Queues a stored offline message for the client.
    fn push_offline(&mut self, stanza: Arc<str>, row: i64) {
        if let Some(sm) = &mut self.sm {
            sm.on_outbound(stanza.clone(), Some(row));
        }
        self.write_out(&stanza);
    }

    /// Queues a stanza for the client, counting it for stream management.
    pub(crate) fn push_out(&mut self, stanza: Arc<str>) {
        if let Some(sm) = &mut self.sm {
            sm.on_outbound(stanza.clone(), None);
        }
        self.write_out(&stanza);
    }

    fn write_out(&mut self, stanza: &str) {
        if self.conn.is_some() {
            self.server.stats.stanza_out(stanza);
            self.out.push_str(stanza);
        }
    }

    /// Queues a non-stanza element (not counted by stream management).
    fn push_raw(&mut self, xml: &str) {
        if self.conn.is_some() {
            self.out.push_str(xml);
        }
    }

    /// Writes what this wake-up produced in one go, asking for an acknowledgement when
    /// something new went out or the window is full. The write has a deadline
    /// (`write_timeout`, in `Conn::send`) and gives way to shutdown.
    async fn flush(&mut self) -> Result<(), End> {
        let window = self.server.config.limits.sm_window();
        if let Some(sm) = &mut self.sm
            && self.conn.is_some()
            && (!self.out.is_empty() || sm.is_full(window))
            && sm.request_ack(Instant::now())
        {
            self.out.push_str(&format!("<r xmlns='{}'/>", ns::SM));
        }
        if self.out.is_empty() {
            return Ok(());
        }
        let Some(conn) = self.conn.as_mut() else {
            self.out.clear();
            return Ok(());
        };
        let written = tokio::select! {
            result = conn.send(&self.out) => Some(result),
            _ = self.server.shutdown.cancelled() => None,
        };
        // Written: give the buffer back rather than keep its peak size per session.
        self.out = String::new();
        match written {
            Some(Ok(())) => Ok(()),
            Some(Err(_)) => self.connection_lost(),
            None => {
                // Half a write: the stream cannot be closed cleanly any more.
                self.conn = None;
                Err(End::Shutdown)
            }
        }
    }

    /// Sends an error reply to a stanza this session sent.
    pub(crate) fn reply_error(
        &mut self,
        stanza: &Element,
        condition: StanzaErrorCondition,
        text: Option<&str>,
    ) {
        if let Some(reply) = crate::context::error_to(self.jid(), stanza, condition, text) {
            self.push_out(reply);
        }
    }

    /// Ends the session: presence, re-routing of what the client never got, close.
    async fn finish(mut self, end: End) {
        let server = self.server.clone();
        server.hub.unregister(&self.handle);
        if let Some(sm) = &self.sm {
            server.hub.remove_resumable(sm.id());
        }
        tracing::info!(jid = %self.handle.jid, reason = ?end, "session ended");
        if self.handle.presence().available {
            // The connection is gone: what the handler leaves for the client is moot.
            let mut cx = Context::new(&self.server, &self.handle, &mut self.directed);
            cx.go_unavailable(None).await;
        } else {
            // Rooms entered without initial presence are left all the same.
            server.muc_leave_all(&self.handle.jid, std::mem::take(&mut self.directed));
        }
        // What the client did not acknowledge, and what is still queued, goes
        // elsewhere. Offline messages it did not acknowledge are still stored.
        let mut undelivered: Vec<Arc<str>> = self
            .sm
            .take()
            .map(|sm| {
                sm.into_unacked()
                    .into_iter()
                    .filter(|u| u.offline.is_none())
                    .map(|u| u.stanza)
                    .collect()
            })
            .unwrap_or_default();
        // Without stream management, a page the client took and then closed its stream
        // cleanly after counts as received.
        if matches!(end, End::ClientClosed)
            && let Some(pump) = self.offline.take()
        {
            self.offline_acknowledged(&pump.awaiting).await;
        }
        undelivered.extend(self.handle.close());
        for control in self.handle.control.close() {
            if let Control::Resume(req) = control {
                req.refuse("item-not-found").await;
            }
        }
        for stanza in undelivered {
            server.reroute_undelivered(&self.handle.jid, &stanza).await;
        }
        if let Some(conn) = self.conn.take() {
            let close_timeout = server.config.limits.close_timeout;
            let error = match end {
                End::Error(c, text) => Some((c, Some(text))),
                End::Shutdown => Some((
                    StreamErrorCondition::SystemShutdown,
                    Some("the server is shutting down"),
                )),
                End::ClientClosed | End::Lost => None,
            };
            conn.close(error, close_timeout).await;
        }
    }
}

/// XEP-0198 `<enabled/>`; `max`: seconds a resumable session waits.
pub(crate) fn sm_enabled(id: &str, resumable: bool, max: u64) -> String {
    let resume = if resumable {
        format!(" resume='true' max='{max}'")
    } else {
        String::new()
    };
    format!("<enabled xmlns='{}' id='{id}'{resume}/>", ns::SM)
}

pub(crate) fn sm_failed(condition: &str) -> String {
    format!(
        "<failed xmlns='{}'><{condition} xmlns='{}'/></failed>",
        ns::SM,
        ns::STANZAS
    )
}

async fn read_conn(conn: &mut Option<Conn>) -> Result<(), ReadError> {
    match conn {
        // The rate limit's pause is the run loop's (one timer, `Due::Unpause`).
        Some(conn) if conn.paused_until.is_none() => conn.read_now().await,
        _ => std::future::pending().await,
    }
}

/// What a session's timer waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Due {
    /// Time to ping the client, or its answer is overdue (`ping_sent`).
    Ping,
    /// The XEP-0198 window stayed full and the client answered no `<r/>`.
    Stalled,
    /// The resumption window of a hibernated session ran out.
    Hibernated,
    /// Nothing was read for [`REST_AFTER`]: the stream's parser may go.
    Rest,
    /// The read rate limit's pause is over: read again.
    Unpause,
}

/// A session's next deadline and what it means: while connected, the ping (or its
/// timeout), an unanswered full window or one of the connection's own deadlines (the
/// stream's rest, the end of a read pause), whichever comes first; while hibernated,
/// the end of the resumption window; `None` when nothing is timed.
fn next_due(
    connected: bool,
    ping_at: Instant,
    stalled_at: Option<Instant>,
    hibernated_until: Option<Instant>,
    conn: [Option<(Instant, Due)>; 2],
) -> Option<(Instant, Due)> {
    if !connected {
        return hibernated_until.map(|at| (at, Due::Hibernated));
    }
    // On a tie the first wins: a stalled window ends the connection before a ping.
    [
        stalled_at.map(|at| (at, Due::Stalled)),
        Some((ping_at, Due::Ping)),
    ]
    .into_iter()
    .chain(conn)
    .flatten()
    .min_by_key(|(at, _)| *at)
}

async fn sleep_until_opt(when: Option<Instant>) {
    match when {
        Some(when) => tokio::time::sleep_until(when).await,
        None => std::future::pending().await,
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Best effort if the task is cancelled before `finish`: never leave a handle,
        // a resumption entry or open control slots (a resume must not be taken by a
        // session that is gone), nor an open queue (senders must hear it is gone). All
        // of it is idempotent after `finish`.
        self.server.hub.unregister(&self.handle);
        if let Some(sm) = &self.sm {
            self.server.hub.remove_resumable(sm.id());
        }
        self.handle.control.close();
        self.handle.close();
    }
}

/// A stanza for the client, as a message worth waking it for (XEP-0357), if it is one.
fn push_worthy(stanza: &str) -> Option<Element> {
    if !stanza.starts_with("<message") {
        return None;
    }
    let message = stanza.parse::<Element>().ok()?;
    crate::core::push::worth_a_push(&message).then_some(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::Transport;

    #[test]
    fn one_timer_serves_every_deadline() {
        let now = Instant::now();
        let s = std::time::Duration::from_secs;
        assert_eq!(
            next_due(true, now + s(60), None, None, [None, None]),
            Some((now + s(60), Due::Ping))
        );
        // A full window left unanswered ends the connection before the next ping.
        assert_eq!(
            next_due(true, now + s(60), Some(now + s(10)), None, [None, None]),
            Some((now + s(10), Due::Stalled))
        );
        assert_eq!(
            next_due(true, now + s(60), Some(now + s(60)), None, [None, None]),
            Some((now + s(60), Due::Stalled))
        );
        assert_eq!(
            next_due(true, now + s(60), Some(now + s(90)), None, [None, None]),
            Some((now + s(60), Due::Ping))
        );
        // The stream rests first, then the ping is still due.
        assert_eq!(
            next_due(
                true,
                now + s(60),
                None,
                None,
                [Some((now + s(2), Due::Rest)), None]
            ),
            Some((now + s(2), Due::Rest))
        );
        // A read paused by the rate limit resumes on the same timer.
        assert_eq!(
            next_due(
                true,
                now + s(60),
                None,
                None,
                [
                    Some((now + s(2), Due::Rest)),
                    Some((now + s(1), Due::Unpause))
                ]
            ),
            Some((now + s(1), Due::Unpause))
        );
        // Hibernated: only the resumption window counts.
        assert_eq!(
            next_due(
                false,
                now + s(60),
                Some(now + s(10)),
                Some(now + s(300)),
                [Some((now, Due::Rest)), None]
            ),
            Some((now + s(300), Due::Hibernated))
        );
        assert_eq!(next_due(false, now + s(60), None, None, [None, None]), None);
    }

    /// What an idle session costs starts with its task (docs/benchmarks.md, "Where
    /// the memory per session goes"): the session future holds the session once (an
    /// async fn taking it held it twice: 6.7 KB instead of 2.4 KB in release) and
    /// keeps within its budget (1,088 bytes in release, 1,096 in debug, before client
    /// state indication added one pointer (`Session::inactive`); at about
    /// 1,300, before the queue and the control slots shared one wake-up, its task
    /// cell took mimalloc's 1,536-byte class instead of 1,280), and it runs as a task
    /// of its own, the connection's negotiation task gone.
    const SESSION_FUTURE_BUDGET: usize = 1_120;

    #[tokio::test]
    async fn an_idle_session_is_stored_once() {
        let dir = tempfile::tempdir().unwrap();
        let server = crate::context::testing::server(dir.path(), |_| {}, &["a"]).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let peer = tcp.local_addr().unwrap();
        let conn = Conn::new(Transport::Plain(tcp), peer, &server.config.limits);
        let handle = crate::context::testing::session(&server, "a", "r");
        let admitted = Arc::new(tokio::sync::Semaphore::new(1))
            .acquire_owned()
            .await
            .unwrap();
        let session = start(
            server.clone(),
            Bound {
                conn,
                handle,
                inline: Inline::default(),
            },
            admitted,
        );
        let session_bytes = std::mem::size_of_val(&session);
        assert!(
            session_bytes <= SESSION_FUTURE_BUDGET,
            "the session future is {session_bytes} bytes for a {}-byte session",
            std::mem::size_of::<Session>()
        );
    }
}
