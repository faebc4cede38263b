//! An established client session (after bind): one task that owns the connection,
//! races reads against its queue and timers, and applies XEP-0198 stream management.
//!
//! When a stream-managed connection drops, the session hibernates for the resume window:
//! it stays registered and keeps queued stanzas as unacknowledged. A new connection that
//! resumes (`c2s.rs`) hands its transport to this task, which retransmits everything the
//! client has not acknowledged. When the window passes, or without stream management,
//! every message the client did not acknowledge is routed again: to another resource of
//! the user, or to offline storage. Nothing is dropped silently.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use minidom::Element;
use tokio::sync::mpsc;
use tokio::time::Instant;
use xmpp_parsers::jid::{FullJid, Jid};

use crate::Server;
use crate::c2s::Bound;
use crate::conn::{Conn, ReadError};
use crate::error::{StanzaErrorCondition, StreamErrorCondition};
use crate::hub::{Outbound, ResumeRequest, SessionHandle};
use crate::stanza::{self, Kind};
use crate::xml::{Frame, ns};

/// Stanzas drained from the queue per wake-up before writing them in one flush.
/// Bounds the time one busy session holds its task (STYLE 5).
const WRITE_BATCH: usize = 64;

/// XEP-0198 state of a session.
#[derive(Debug)]
struct StreamManagement {
    id: String,
    resumable: bool,
    /// Stanzas received from the client (the server's `h`).
    received: u32,
    /// Stanzas sent to the client so far.
    sent: u32,
    /// Sent but not acknowledged: (sequence number, stanza).
    unacked: VecDeque<(u32, Arc<str>)>,
    /// An `<r/>` is outstanding.
    ack_requested: bool,
}

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

/// A session task's state.
pub(crate) struct Session {
    pub(crate) server: Arc<Server>,
    pub(crate) handle: Arc<SessionHandle>,
    rx: mpsc::Receiver<Outbound>,
    conn: Option<Conn>,
    sm: Option<StreamManagement>,
    /// Targets of directed presence (RFC 6121 §4.6), told when the session goes away.
    pub(crate) directed: HashSet<Jid>,
    /// Stanzas to write at the end of this wake-up.
    out: String,
    last_read: Instant,
    ping_sent: bool,
    hibernated_until: Option<Instant>,
}

/// Runs a bound session to its end.
pub async fn run(server: Arc<Server>, bound: Bound) {
    use tracing::Instrument as _;
    let span = tracing::info_span!("session", jid = %bound.handle.jid, peer = %bound.conn.peer);
    run_in_span(server, bound).instrument(span).await;
}

async fn run_in_span(server: Arc<Server>, bound: Bound) {
    let Bound { conn, handle, rx } = bound;
    let mut session = Session {
        server,
        handle,
        rx,
        conn: Some(conn),
        sm: None,
        directed: HashSet::new(),
        out: String::new(),
        last_read: Instant::now(),
        ping_sent: false,
        hibernated_until: None,
    };
    tracing::info!(jid = %session.handle.jid, "session started");
    let end = session.run_loop().await;
    Box::pin(session.finish(end)).await;
}

impl Session {
    pub(crate) fn jid(&self) -> &FullJid {
        &self.handle.jid
    }

    /// The localpart of the session's user.
    pub(crate) fn user(&self) -> String {
        self.handle
            .jid
            .node()
            .map(|n| n.to_string())
            .unwrap_or_default()
    }

    async fn run_loop(&mut self) -> End {
        let limits = self.server.config.limits.clone();
        loop {
            if self
                .handle
                .overloaded
                .load(std::sync::atomic::Ordering::Relaxed)
            {
                return End::Error(
                    StreamErrorCondition::PolicyViolation,
                    "the client does not read its stanzas fast enough",
                );
            }
            let ping_at = self.last_read
                + if self.ping_sent {
                    limits.ping_interval + limits.ping_timeout
                } else {
                    limits.ping_interval
                };
            let hibernated_until = self.hibernated_until;
            let connected = self.conn.is_some();
            let step = tokio::select! {
                _ = self.server.shutdown.cancelled() => Err(End::Shutdown),
                read = read_conn(&mut self.conn) => self.on_read(read).await,
                msg = self.rx.recv() => self.on_outbound(msg).await,
                _ = tokio::time::sleep_until(ping_at), if connected => {
                    if self.ping_sent {
                        Err(End::Error(StreamErrorCondition::ConnectionTimeout, "no answer to ping"))
                    } else {
                        self.ping_sent = true;
                        let ping = format!(
                            "<iq type='get' id='ping-{}' to='{}' from='{}'><ping xmlns='{}'/></iq>",
                            self.handle.id,
                            crate::xml::escape(&self.jid().to_string()),
                            crate::xml::escape(&self.server.config.domain),
                            ns::PING
                        );
                        self.push_out(ping.into());
                        Ok(())
                    }
                }
                _ = sleep_until_opt(hibernated_until), if !connected => Err(End::Lost),
            };
            if let Err(end) = step {
                return end;
            }
            if let Err(end) = self.flush().await {
                return end;
            }
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
            Some(sm) if sm.resumable => {
                tracing::info!(jid = %self.handle.jid, "connection lost; waiting for resumption");
                self.out.clear();
                self.hibernated_until =
                    Some(Instant::now() + self.server.config.limits.resume_timeout);
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
            return self.on_sm(&element);
        }
        let Some(kind) = Kind::of(&element) else {
            return Err(End::Error(
                StreamErrorCondition::UnsupportedStanzaType,
                "only message, presence and iq are allowed here",
            ));
        };
        if let Some(sm) = &mut self.sm {
            sm.received = sm.received.wrapping_add(1);
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
        let to = match stanza::to_jid(&element) {
            Ok(to) => to,
            Err(stanza::MalformedJid) => {
                self.reply_error(&element, StanzaErrorCondition::JidMalformed, None);
                return Ok(());
            }
        };
        match kind {
            Kind::Message => self.on_message(element, to).await,
            Kind::Presence => self.on_presence(element, to).await,
            Kind::Iq => self.on_iq(element, to).await,
        }
        Ok(())
    }

    fn on_sm(&mut self, element: &Element) -> Result<(), End> {
        match element.name() {
            "enable" => {
                if self.sm.is_some() {
                    self.push_out(sm_failed("unexpected-request").into());
                    return Ok(());
                }
                let resumable = matches!(element.attr("resume"), Some("true" | "1"));
                let id = crate::c2s::random_id();
                if resumable {
                    self.server
                        .hub
                        .add_resumable(&id, &self.user(), self.handle.tx.clone());
                }
                let max = self.server.config.limits.resume_timeout.as_secs();
                let resume = if resumable {
                    format!(" resume='true' max='{max}'")
                } else {
                    String::new()
                };
                self.push_raw(&format!("<enabled xmlns='{}' id='{id}'{resume}/>", ns::SM));
                self.sm = Some(StreamManagement {
                    id,
                    resumable,
                    received: 0,
                    sent: 0,
                    unacked: VecDeque::new(),
                    ack_requested: false,
                });
                Ok(())
            }
            "r" => {
                if let Some(sm) = &self.sm {
                    let a = format!("<a xmlns='{}' h='{}'/>", ns::SM, sm.received);
                    self.push_raw(&a);
                }
                Ok(())
            }
            "a" => {
                let h = element.attr("h").and_then(|h| h.parse::<u32>().ok());
                match (&mut self.sm, h) {
                    (Some(sm), Some(h)) => {
                        if h.wrapping_sub(sm.sent) as i32 > 0 {
                            // XEP-0198 §4: acknowledging more than was sent.
                            return Err(End::Error(
                                StreamErrorCondition::UndefinedCondition,
                                "acknowledged stanzas that were never sent",
                            ));
                        }
                        sm.ack(h);
                        sm.ack_requested = false;
                        Ok(())
                    }
                    _ => Ok(()),
                }
            }
            _ => Ok(()),
        }
    }

    async fn on_outbound(&mut self, msg: Option<Outbound>) -> Result<(), End> {
        let mut next = msg;
        let mut handled = 0;
        // Take from the queue only what this batch will handle: an item taken and not
        // handled would be lost.
        while handled < WRITE_BATCH {
            handled += 1;
            match next.take() {
                Some(Outbound::Stanza(stanza)) => self.push_out(stanza),
                Some(Outbound::Replaced) => {
                    return Err(End::Error(
                        StreamErrorCondition::Conflict,
                        "another session bound this resource",
                    ));
                }
                Some(Outbound::AccountRemoved) => {
                    return Err(End::Error(
                        StreamErrorCondition::NotAuthorized,
                        "the account was deleted",
                    ));
                }
                Some(Outbound::Resume(request)) => Box::pin(self.resume(*request)).await?,
                // We hold a sender in the handle, so the queue never closes.
                None => return Ok(()),
            }
            if handled == WRITE_BATCH {
                break;
            }
            next = self.rx.try_recv().ok();
            if next.is_none() {
                break;
            }
        }
        Ok(())
    }

    /// XEP-0198 §5: takes over the new connection and retransmits what is unacked.
    async fn resume(&mut self, request: ResumeRequest) -> Result<(), End> {
        let ResumeRequest { mut conn, h, .. } = request;
        let Some(sm) = self.sm.as_mut().filter(|sm| sm.resumable) else {
            let _ = conn.send(&sm_failed("item-not-found")).await;
            return Ok(());
        };
        sm.ack(h);
        let mut out = format!(
            "<resumed xmlns='{}' previd='{}' h='{}'/>",
            ns::SM,
            sm.id,
            sm.received
        );
        for (_, stanza) in &sm.unacked {
            out.push_str(stanza);
        }
        tracing::info!(jid = %self.handle.jid, resent = sm.unacked.len(), "session resumed");
        self.conn = Some(conn);
        self.hibernated_until = None;
        self.last_read = Instant::now();
        self.ping_sent = false;
        self.out = out;
        Ok(())
    }

    /// Queues a stanza for the client, counting it for stream management.
    pub(crate) fn push_out(&mut self, stanza: Arc<str>) {
        if let Some(sm) = &mut self.sm {
            sm.sent = sm.sent.wrapping_add(1);
            sm.unacked.push_back((sm.sent, stanza.clone()));
        }
        if self.conn.is_some() {
            self.server.stats.stanza_out(&stanza);
            self.out.push_str(&stanza);
        }
    }

    /// Queues a non-stanza element (not counted by stream management).
    fn push_raw(&mut self, xml: &str) {
        if self.conn.is_some() {
            self.out.push_str(xml);
        }
    }

    /// Writes what this wake-up produced in one go.
    async fn flush(&mut self) -> Result<(), End> {
        let max_unacked = self.server.config.limits.max_unacked;
        if let Some(sm) = &mut self.sm {
            if sm.unacked.len() > max_unacked {
                return Err(End::Error(
                    StreamErrorCondition::PolicyViolation,
                    "too many unacknowledged stanzas",
                ));
            }
            if !sm.unacked.is_empty() && !sm.ack_requested && !self.out.is_empty() {
                sm.ack_requested = true;
                self.out.push_str("<r xmlns='urn:xmpp:sm:3'/>");
            }
        }
        if self.out.is_empty() {
            return Ok(());
        }
        let Some(conn) = self.conn.as_mut() else {
            self.out.clear();
            return Ok(());
        };
        let result = conn.send(&self.out).await;
        // Written: give the buffer back rather than keep its peak size per session.
        self.out = String::new();
        match result {
            Ok(()) => Ok(()),
            Err(_) => self.connection_lost(),
        }
    }

    /// Sends an error reply to a stanza this session sent.
    pub(crate) fn reply_error(
        &mut self,
        stanza: &Element,
        condition: StanzaErrorCondition,
        text: Option<&str>,
    ) {
        if let Some(mut reply) = crate::error::error_reply(stanza, condition, text) {
            stanza::set_attr(&mut reply, "to", &self.jid().to_string());
            self.push_out(String::from(&reply).into());
        }
    }

    /// Sends a stanza to this session's own client.
    pub(crate) fn send_self(&mut self, element: &Element) {
        self.push_out(String::from(element).into());
    }

    /// Ends the session: presence, re-routing of what the client never got, close.
    async fn finish(mut self, end: End) {
        let server = self.server.clone();
        server.hub.unregister(&self.handle);
        if let Some(sm) = &self.sm {
            server.hub.remove_resumable(&sm.id);
        }
        tracing::info!(jid = %self.handle.jid, reason = ?end, "session ended");
        if self.handle.presence().available {
            self.go_unavailable(None).await;
        }
        // What the client did not acknowledge, and what is still queued, goes elsewhere.
        let mut undelivered: Vec<Arc<str>> = self
            .sm
            .take()
            .map(|sm| sm.unacked.into_iter().map(|(_, s)| s).collect())
            .unwrap_or_default();
        self.rx.close();
        while let Ok(msg) = self.rx.try_recv() {
            match msg {
                Outbound::Stanza(s) => undelivered.push(s),
                Outbound::Resume(req) => {
                    let mut conn = req.conn;
                    let _ = conn.send(&sm_failed("item-not-found")).await;
                }
                Outbound::Replaced | Outbound::AccountRemoved => {}
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

impl StreamManagement {
    /// Drops everything up to `h` from the unacked queue.
    fn ack(&mut self, h: u32) {
        while let Some((seq, _)) = self.unacked.front() {
            if h.wrapping_sub(*seq) as i32 >= 0 {
                self.unacked.pop_front();
            } else {
                break;
            }
        }
    }
}

fn sm_failed(condition: &str) -> String {
    format!(
        "<failed xmlns='{}'><{condition} xmlns='{}'/></failed>",
        ns::SM,
        ns::STANZAS
    )
}

async fn read_conn(conn: &mut Option<Conn>) -> Result<(), ReadError> {
    match conn {
        Some(conn) => conn.read_some().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(when: Option<Instant>) {
    match when {
        Some(when) => tokio::time::sleep_until(when).await,
        None => std::future::pending().await,
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Best effort if the task is cancelled before `finish`: never leave a handle.
        self.server.hub.unregister(&self.handle);
    }
}
