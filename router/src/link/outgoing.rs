//! The sending side of router links: one task per remote node keeps its link open
//! (reconnecting with backoff), resends what the other side did not acknowledge,
//! streams the durable outbox under the ack window, then the queue; while the link is
//! down, messages wait in the outbox until their time to live runs out and are then
//! bounced, IQ requests are answered at once, the latest presence is held.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use backon::BackoffBuilder as _;
use impmesh_certs::{PeerVerifier, TrustAnchors};
use minidom::Element;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::wire::{
    FrameReader, ack_count, announced, header, waits_its_turn, write_batch, write_within,
};
use super::{BATCH, KEEPALIVE, LinkCounters, LinkError, Links};
use crate::error::StanzaErrorCondition;
use crate::hub::lock;
use crate::stanza::{self, Kind};
use crate::xml::Frame;

/// Presence stanzas held per link while it is down, at most (the latest per sender,
/// recipient and kind; more are dropped and probed again when the link is back).
const MAX_HELD_PRESENCE: usize = 8192;
/// What takes the place of a stanza in flight that was bounced while the link was
/// down (its time to live ran out): it keeps the stanza's number until the link is
/// back, when [`Outgoing::compact`] drops it and renumbers what follows. Never sent.
const SKIP: &str = "<skip xmlns='urn:impmesh:link:1'/>";

/// A stanza sent over a link and not acknowledged yet.
struct Pending {
    /// Its number in the link task's epoch (1, 2, …).
    seq: u64,
    xml: Arc<str>,
    /// Its row when it came from the outbox (taken when it is bounced meanwhile).
    outbox_id: Option<i64>,
    /// When it was queued (unix seconds), for the time to live.
    queued_at: i64,
}

/// The sending side of the link to one node.
struct Outgoing {
    node: String,
    cluster: String,
    /// Names this task's numbering of stanzas; the receiver counts per epoch.
    epoch: String,
    next_seq: u64,
    /// The highest outbox row id ever sent by this task: rows up to it are either in
    /// `unacked` (resent from there after a reconnect) or delivered and deleted, so
    /// the outbox is read after it and no row goes out twice.
    outbox_cursor: i64,
    unacked: VecDeque<Pending>,
    /// Presence that could not go while the link was down: the latest per (from, to,
    /// probe or not), sent first when it is back (so a first link that took a few
    /// attempts, or a short outage, loses no presence).
    presence: HashMap<(String, String, bool), Arc<str>>,
}

impl Outgoing {
    fn push(&mut self, xml: Arc<str>, outbox_id: Option<i64>, queued_at: i64) {
        if let Some(id) = outbox_id {
            self.outbox_cursor = self.outbox_cursor.max(id);
        }
        self.unacked.push_back(Pending {
            seq: self.next_seq,
            xml,
            outbox_id,
            queued_at,
        });
        self.next_seq += 1;
    }

    /// Takes out of the stanzas in flight those queued before `before`, wherever they
    /// are in the window, leaving [`SKIP`] in their place until the other side says
    /// how many it handled: returns them, their outbox rows and those rows' bytes.
    fn expire_in_flight(&mut self, before: i64) -> (Vec<Arc<str>>, Vec<i64>, u64) {
        let mut ids = vec![];
        let mut bytes = 0u64;
        let mut expired = vec![];
        for p in self.unacked.iter_mut() {
            if p.queued_at < before && &*p.xml != SKIP {
                if let Some(id) = p.outbox_id.take() {
                    ids.push(id);
                    bytes += p.xml.len() as u64;
                }
                expired.push(std::mem::replace(&mut p.xml, Arc::from(SKIP)));
            }
        }
        (expired, ids, bytes)
    }

    /// Once the other side said it handled the first `h` stanzas of this epoch (and
    /// those are gone from `unacked`): what remains was not handled, so the places
    /// kept by bounced stanzas are dropped and the rest numbered on from `h + 1`, the
    /// order in which the receiver counts them. Nothing bounced goes on the wire.
    fn compact(&mut self, h: u64) {
        self.unacked.retain(|p| &*p.xml != SKIP);
        let mut seq = h;
        for p in self.unacked.iter_mut() {
            seq += 1;
            p.seq = seq;
        }
        self.next_seq = seq + 1;
    }
}

pub(super) struct Outlink {
    pub(super) cluster: String,
    pub(super) tx: mpsc::Sender<Arc<str>>,
    pub(super) counters: Arc<LinkCounters>,
    /// Cancelled when the peer is removed: the task bounces what waits and ends.
    pub(super) forgotten: tokio_util::sync::CancellationToken,
}

impl Links {
    /// Connects to `host:port`, the link's packets marked with the signalling class.
    async fn connect_host(&self, host: &str, port: u16) -> std::io::Result<TcpStream> {
        let stream = self.connect_any(host, port).await?;
        if let Err(e) = impmesh_limits::set_dscp(&stream, self.config.dscp) {
            tracing::debug!(error = %e, "cannot set the DSCP class of a router link");
        }
        Ok(stream)
    }

    /// Connects to `host:port` (every address the host resolves to, in turn).
    async fn connect_any(&self, host: &str, port: u16) -> std::io::Result<TcpStream> {
        if let Ok(ip) = host.trim_matches(['[', ']']).parse::<std::net::IpAddr>() {
            return TcpStream::connect((ip, port)).await;
        }
        let resolver = self
            .resolver
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some(resolver) = resolver else {
            return TcpStream::connect((host, port)).await;
        };
        let addresses = resolver.resolve(host).await;
        let mut last = std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{host} does not resolve (and no address was ever known)"),
        );
        for ip in addresses {
            match TcpStream::connect((ip, port)).await {
                Ok(s) => return Ok(s),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// The queue of the link to `node`, starting the task that keeps it when there is
    /// none yet.
    fn outlink(&self, cluster: &str, node: &str) -> mpsc::Sender<Arc<str>> {
        let mut outbound = lock(&self.outbound);
        let link = outbound.entry(node.to_owned()).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(self.config.limits.link_queue.max(1));
            let counters = Arc::new(LinkCounters::default());
            let forgotten = tokio_util::sync::CancellationToken::new();
            if let Some(links) = self.me.upgrade() {
                let (node, cluster, c, f) = (
                    node.to_owned(),
                    cluster.to_owned(),
                    counters.clone(),
                    forgotten.clone(),
                );
                self.tasks
                    .spawn(async move { links.run_outlink(node, cluster, rx, c, f).await });
            }
            Outlink {
                cluster: cluster.to_owned(),
                tx,
                counters,
                forgotten,
            }
        });
        link.tx.clone()
    }

    /// Starts the links of the nodes that have messages waiting in the outbox (at
    /// start: what a restart interrupted is delivered or expires as before).
    pub(super) async fn resume_outbox(&self) {
        match self.store.outbox_nodes().await {
            Ok(nodes) => {
                for (node, cluster, waiting) in nodes {
                    tracing::info!(%node, %cluster, waiting, "messages in the outbox; opening the link");
                    self.outlink(&cluster, &node);
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read the outbox"),
        }
    }

    /// Sends a stanza to a user homed on another cluster over the link to its home
    /// node. Returns false when the stanza was bounced (queue full) instead.
    pub(super) fn forward(&self, cluster: &str, node: &str, stanza: &Element) -> bool {
        let xml: Arc<str> = String::from(stanza).into();
        let sent = self.outlink(cluster, node).try_send(xml).is_ok();
        if !sent {
            tracing::warn!(%node, "link queue full; stanza bounced");
            self.bounce(
                stanza,
                StanzaErrorCondition::RemoteServerTimeout,
                Some("the link to the recipient's cluster is congested"),
            );
        }
        sent
    }

    /// Keeps the link to `node`: connects (retrying with a jittered exponential backoff
    /// capped at 30 s), resends what the other side did not acknowledge, delivers the
    /// outbox in order, then what is queued. While the link is down, messages and
    /// subscription requests go to the outbox (bounced when their time to live runs
    /// out), IQ requests are answered with `remote-server-timeout`, and other presence
    /// is dropped (it is probed again when the link returns).
    async fn run_outlink(
        self: Arc<Self>,
        node: String,
        cluster: String,
        mut rx: mpsc::Receiver<Arc<str>>,
        counters: Arc<LinkCounters>,
        forgotten: tokio_util::sync::CancellationToken,
    ) {
        match self.store.outbox_size(&node).await {
            Ok((rows, bytes)) => {
                counters.stored.store(rows, Ordering::Relaxed);
                counters.stored_bytes.store(bytes, Ordering::Relaxed);
            }
            Err(e) => tracing::error!(error = %e, "cannot read the outbox"),
        }
        let mut out = Outgoing {
            node: node.clone(),
            cluster: cluster.clone(),
            epoch: crate::names::random_id(),
            next_seq: 1,
            outbox_cursor: 0,
            unacked: VecDeque::new(),
            presence: HashMap::new(),
        };
        let removed = tokio::select! {
            biased;
            _ = forgotten.cancelled() => true,
            _ = self.keep_outlink(&node, &cluster, &mut rx, &counters, &mut out) => false,
        };
        // (Removing the link also drops its queue's sender, which ends the loop: the
        // token says which it was.)
        if removed || forgotten.is_cancelled() {
            counters.set_up(false);
            self.drop_all(&mut out, &mut rx, &counters).await;
        }
    }

    /// The peer of this link was removed: everything that waits for its node is
    /// bounced to its sender (in flight, queued, in the outbox), not delivered.
    async fn drop_all(
        &self,
        out: &mut Outgoing,
        rx: &mut mpsc::Receiver<Arc<str>>,
        counters: &LinkCounters,
    ) {
        rx.close();
        let reason = Some("the recipient's cluster is no longer peered with this one");
        let mut waiting: Vec<Arc<str>> = out
            .unacked
            .drain(..)
            .filter(|p| p.outbox_id.is_none() && &*p.xml != SKIP)
            .map(|p| p.xml)
            .collect();
        while let Ok(xml) = rx.try_recv() {
            waiting.push(xml);
        }
        for xml in waiting {
            if let Some(stanza) = stanza::parse_own(&xml) {
                self.bounce(&stanza, StanzaErrorCondition::ServiceUnavailable, reason);
            }
        }
        loop {
            let rows = match self.store.outbox_page(&out.node, 0, 500).await {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the outbox");
                    break;
                }
            };
            if rows.is_empty()
                || !self
                    .bounce_rows(
                        &rows,
                        StanzaErrorCondition::ServiceUnavailable,
                        reason,
                        counters,
                    )
                    .await
            {
                break;
            }
        }
        counters.stored.store(0, Ordering::Relaxed);
        counters.stored_bytes.store(0, Ordering::Relaxed);
        out.presence.clear();
        tracing::info!(node = %out.node, cluster = %out.cluster, "the peer was removed: its link is closed and what waited for it bounced");
    }

    /// [`Links::run_outlink`]'s loop, until shutdown or the link's queue closes.
    async fn keep_outlink(
        &self,
        node: &str,
        cluster: &str,
        rx: &mut mpsc::Receiver<Arc<str>>,
        counters: &LinkCounters,
        out: &mut Outgoing,
    ) {
        let retry = backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(30))
            .with_jitter()
            .without_max_times();
        let mut delays = retry.build();
        loop {
            let opened = tokio::select! {
                _ = self.shutdown.cancelled() => {
                    self.park_all(out, rx).await;
                    return;
                }
                o = tokio::time::timeout(self.config.limits.link_handshake_timeout, self.open_link(node, cluster, &out.epoch, counters)) => o,
            };
            match opened.unwrap_or(Err(LinkError::Timeout)) {
                Ok((mut stream, h, mut reader)) => {
                    delays = retry.build();
                    counters.set_up(true);
                    *lock(&counters.last_error) = None;
                    tracing::info!(%node, %cluster, "router link up");
                    let result = async {
                        self.acked(out, h, counters).await;
                        out.compact(h);
                        self.write_link(&mut stream, &mut reader, rx, out, counters)
                            .await
                    }
                    .await;
                    counters.set_up(false);
                    match result {
                        Ok(()) => {
                            let deadline = self.config.limits.write_timeout;
                            let _ = write_within(&mut stream, b"</stream:stream>", deadline).await;
                            let _ = stream.shutdown().await;
                            self.park_all(out, rx).await;
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(%node, %cluster, error = %e, "router link down");
                            *lock(&counters.last_error) = Some(e.to_string());
                        }
                    }
                }
                Err(e) => {
                    counters.set_up(false);
                    tracing::warn!(%node, %cluster, error = %e, "cannot open a router link");
                    *lock(&counters.last_error) = Some(e.to_string());
                }
            }
            // Down until the next attempt: what comes is parked, what is too old bounced.
            self.expire(out, counters).await;
            let until =
                tokio::time::Instant::now() + delays.next().unwrap_or(Duration::from_secs(30));
            loop {
                tokio::select! {
                    _ = self.shutdown.cancelled() => {
                        self.park_all(out, rx).await;
                        return;
                    }
                    _ = tokio::time::sleep_until(until) => break,
                    next = rx.recv() => {
                        let Some(first) = next else { return };
                        let mut batch = vec![first];
                        while let Ok(more) = rx.try_recv() {
                            batch.push(more);
                        }
                        self.park(out, batch, counters).await;
                    }
                }
            }
        }
    }

    /// Handles stanzas that cannot go now: messages and subscription requests to the
    /// outbox, IQ requests answered with an error, the latest presence and probes kept
    /// in memory for when the link is back, the rest dropped.
    async fn park(&self, out: &mut Outgoing, stanzas: Vec<Arc<str>>, counters: &LinkCounters) {
        let mut keep: Vec<(String, i64)> = vec![];
        for xml in stanzas {
            let Some(stanza) = stanza::parse_own(&xml) else {
                continue;
            };
            match Kind::of(&stanza) {
                Some(Kind::Message) => keep.push((xml.to_string(), 0)),
                Some(Kind::Presence)
                    if matches!(
                        stanza.attr("type"),
                        Some("subscribe" | "subscribed" | "unsubscribe" | "unsubscribed")
                    ) =>
                {
                    keep.push((xml.to_string(), 0));
                }
                Some(Kind::Iq) if matches!(stanza.attr("type"), Some("get" | "set")) => {
                    self.bounce(
                        &stanza,
                        StanzaErrorCondition::RemoteServerTimeout,
                        Some("the recipient's cluster cannot be reached now"),
                    );
                }
                Some(Kind::Presence)
                    if matches!(stanza.attr("type"), None | Some("unavailable" | "probe"))
                        && out.presence.len() < MAX_HELD_PRESENCE =>
                {
                    let key = (
                        stanza.attr("from").unwrap_or_default().to_owned(),
                        stanza.attr("to").unwrap_or_default().to_owned(),
                        stanza.attr("type") == Some("probe"),
                    );
                    out.presence.insert(key, xml);
                }
                _ => {}
            }
        }
        if keep.is_empty() {
            return;
        }
        // The per-node caps: what does not fit is bounced, and the alarm says so.
        let limits = &self.config.limits;
        let (mut rows, mut bytes) = (
            counters.stored.load(Ordering::Relaxed),
            counters.stored_bytes.load(Ordering::Relaxed),
        );
        let mut fits = 0;
        for (xml, _) in &keep {
            if rows + 1 > limits.outbox_max_rows
                || bytes + xml.len() as u64 > limits.outbox_max_bytes
            {
                break;
            }
            rows += 1;
            bytes += xml.len() as u64;
            fits += 1;
        }
        let over = keep.split_off(fits);
        if !over.is_empty() {
            tracing::warn!(node = %out.node, bounced = over.len(), "the outbox for the node is full; messages bounced");
            let message = format!(
                "{} messages ({} bytes) wait for {} of {}; new ones are bounced",
                counters.stored.load(Ordering::Relaxed),
                counters.stored_bytes.load(Ordering::Relaxed),
                out.node,
                out.cluster
            );
            if !counters.outbox_full.swap(true, Ordering::Relaxed)
                && let Err(e) = self
                    .store
                    .raise_alarm(impmesh_store::alarms::OUTBOX_FULL, &out.node, &message)
                    .await
            {
                tracing::error!(error = %e, "cannot raise an alarm");
            }
            for (xml, _) in over {
                if let Some(stanza) = stanza::parse_own(&xml) {
                    self.bounce(
                        &stanza,
                        StanzaErrorCondition::ResourceConstraint,
                        Some("too many messages wait for the recipient's cluster; try again later"),
                    );
                }
            }
        }
        if keep.is_empty() {
            return;
        }
        let n = keep.len() as u64;
        let size: u64 = keep.iter().map(|(x, _)| x.len() as u64).sum();
        match self.store.outbox_push(&out.node, &out.cluster, &keep).await {
            Ok(()) => {
                counters.stored.fetch_add(n, Ordering::Relaxed);
                counters.stored_bytes.fetch_add(size, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::error!(error = %e, node = %out.node, "cannot keep messages in the outbox; bounced");
                for (xml, _) in keep {
                    if let Some(stanza) = stanza::parse_own(&xml) {
                        self.bounce(&stanza, StanzaErrorCondition::InternalServerError, None);
                    }
                }
            }
        }
    }

    /// Clears the outbox-full alarm of `node` once its outbox is below half the caps.
    async fn outbox_relieved(&self, node: &str, counters: &LinkCounters) {
        let limits = &self.config.limits;
        if counters.outbox_full.load(Ordering::Relaxed)
            && counters.stored.load(Ordering::Relaxed) * 2 <= limits.outbox_max_rows
            && counters.stored_bytes.load(Ordering::Relaxed) * 2 <= limits.outbox_max_bytes
        {
            counters.outbox_full.store(false, Ordering::Relaxed);
            let _ = self
                .store
                .clear_alarm(
                    impmesh_store::alarms::OUTBOX_FULL,
                    node,
                    "the outbox is below half its caps",
                )
                .await;
        }
    }

    /// At shutdown: what was sent but not acknowledged, and what is queued, goes to the
    /// outbox, so a restart delivers it.
    async fn park_all(&self, out: &mut Outgoing, rx: &mut mpsc::Receiver<Arc<str>>) {
        let mut rest: Vec<Arc<str>> = out
            .unacked
            .drain(..)
            .filter(|p| p.outbox_id.is_none())
            .map(|p| p.xml)
            .collect();
        while let Ok(xml) = rx.try_recv() {
            rest.push(xml);
        }
        let counters = LinkCounters::default();
        self.park(out, rest, &counters).await;
        out.presence.clear();
    }

    /// Bounces what waited longer than the outbox time to live, in memory and stored.
    async fn expire(&self, out: &mut Outgoing, counters: &LinkCounters) {
        let ttl = self.config.limits.outbox_ttl;
        let now = impmesh_store::now_unix();
        let before = now - ttl.as_secs() as i64;
        let reason = Some("the recipient's cluster could not be reached in time");
        // Sent but never acknowledged, and too old: bounced now, their rows (if they
        // came from the outbox) removed first so that the sweep below does not bounce
        // them a second time; their places are dropped when the link is back
        // (`Outgoing::compact`), so they are never sent.
        let (expired, ids, bytes) = out.expire_in_flight(before);
        if !ids.is_empty() {
            if let Err(e) = self.store.outbox_delete(&ids).await {
                tracing::error!(error = %e, "cannot remove expired outbox messages");
            }
            counters.unstore(ids.len() as u64, bytes);
        }
        for xml in expired {
            if let Some(stanza) = stanza::parse_own(&xml) {
                self.bounce(&stanza, StanzaErrorCondition::RemoteServerTimeout, reason);
            }
        }
        loop {
            let rows = match self.store.outbox_expired(&out.node, before, 500).await {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the outbox");
                    return;
                }
            };
            if rows.is_empty()
                || !self
                    .bounce_rows(
                        &rows,
                        StanzaErrorCondition::RemoteServerTimeout,
                        reason,
                        counters,
                    )
                    .await
            {
                break;
            }
        }
        self.outbox_relieved(&out.node, counters).await;
    }

    /// The other side has handled the first `h` stanzas of this epoch: forget them
    /// (and their outbox rows).
    async fn acked(&self, out: &mut Outgoing, h: u64, counters: &LinkCounters) {
        let mut ids = vec![];
        let mut bytes = 0u64;
        let mut n = 0;
        while out.unacked.front().is_some_and(|p| p.seq <= h) {
            if let Some(p) = out.unacked.pop_front() {
                n += 1;
                if let Some(id) = p.outbox_id {
                    ids.push(id);
                    bytes += p.xml.len() as u64;
                }
            }
        }
        counters.stanzas.fetch_add(n, Ordering::Relaxed);
        counters.set_in_flight(out.unacked.len());
        if !ids.is_empty() {
            match self.store.outbox_delete(&ids).await {
                Ok(()) => {
                    counters.unstore(ids.len() as u64, bytes);
                    self.outbox_relieved(&out.node, counters).await;
                }
                Err(e) => tracing::error!(error = %e, "cannot remove delivered outbox messages"),
            }
        }
    }

    /// Connects to `node` of `cluster`, verifies it against the certificates pinned for
    /// the cluster (or the trusted CAs), presents ours, and exchanges stream headers;
    /// returns the link and how many stanzas of this epoch the other side has handled.
    async fn open_link(
        &self,
        node: &str,
        cluster: &str,
        epoch: &str,
        counters: &LinkCounters,
    ) -> Result<(tokio_rustls::client::TlsStream<TcpStream>, u64, FrameReader), LinkError> {
        let target = self
            .store
            .peer_node(node)
            .await?
            .filter(|n| n.peer == cluster)
            .ok_or_else(|| LinkError::UnknownNode {
                node: node.to_owned(),
                cluster: cluster.to_owned(),
            })?;
        if target.link_port == 0 {
            return Err(LinkError::NoLinks(node.to_owned()));
        }
        let anchors = self.trust_for(cluster).await?;
        let verifier = PeerVerifier::new(&anchors)?;
        let config = {
            let identity = self.identity.read().unwrap_or_else(|e| e.into_inner());
            let (identity, _) = identity.as_ref().ok_or(LinkError::NoIdentity)?;
            identity.link_client_config(verifier)?
        };
        let tcp = self.connect_host(&target.host, target.link_port).await?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from(node.to_owned())
            .map_err(|_| LinkError::ServerName(node.to_owned()))?;
        let mut tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await?;
        tls.write_all(
            header(
                &self.config.node_name,
                node,
                epoch,
                &self.config.link_features,
            )
            .as_bytes(),
        )
        .await?;
        tls.flush().await?;
        let mut reader = FrameReader::new();
        let Frame::Header(answer) = reader.next(&mut tls).await? else {
            return Err(LinkError::Closed);
        };
        *lock(&counters.remote) = Some(announced(&answer));
        match reader.next(&mut tls).await? {
            Frame::Element(a) => match ack_count(&a) {
                Some(h) => Ok((tls, h, reader)),
                None => Err(LinkError::Closed),
            },
            _ => Err(LinkError::Closed),
        }
    }

    /// What verifies a node of `cluster`: its pinned certificates and the trusted CAs.
    async fn trust_for(&self, cluster: &str) -> Result<TrustAnchors, LinkError> {
        Ok(self.store.trust_anchors(Some(cluster)).await?)
    }

    /// Writes until shutdown (`Ok`) or the link fails: first what the other side has
    /// not acknowledged, then the outbox, then the queue, in batches; reads the other
    /// side's acknowledgements.
    ///
    /// The outbox is streamed under the ack window (`[limits] link_window`): a page is
    /// read only when there is room in the window, after the highest row this task
    /// ever sent (so a row resent from `unacked` after a flap is not read again).
    /// While the outbox is not drained, messages and subscription stanzas that arrive
    /// are appended to it, so they go out after what waited before them; other
    /// stanzas go out at once.
    async fn write_link<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
        reader: &mut FrameReader,
        rx: &mut mpsc::Receiver<Arc<str>>,
        out: &mut Outgoing,
        counters: &LinkCounters,
    ) -> Result<(), LinkError> {
        let window = self.config.limits.link_window;
        let ttl = self.config.limits.outbox_ttl;
        let mut scratch = [0u8; 512];
        let mut buf = String::new();
        for p in &out.unacked {
            buf.push_str(&p.xml);
        }
        write_batch(stream, &mut buf, self.config.limits.write_timeout).await?;
        // Presence held while the link was down.
        let now = impmesh_store::now_unix();
        for (_, xml) in std::mem::take(&mut out.presence) {
            buf.push_str(&xml);
            out.push(xml, None, now);
        }
        write_batch(stream, &mut buf, self.config.limits.write_timeout).await?;
        counters.set_in_flight(out.unacked.len());
        let ack_timeout = self.config.limits.link_ack_timeout;
        // Since when the oldest stanza in flight waits for its acknowledgement.
        let mut waiting_since = tokio::time::Instant::now();
        let mut draining = true;
        loop {
            if out.unacked.is_empty() {
                waiting_since = tokio::time::Instant::now();
            }
            if draining && out.unacked.len() < window {
                let room = (window - out.unacked.len()).min(BATCH) as i64;
                let rows = self
                    .store
                    .outbox_page(&out.node, out.outbox_cursor, room)
                    .await?;
                if rows.is_empty() {
                    draining = false;
                    continue;
                }
                let before = impmesh_store::now_unix() - ttl.as_secs() as i64;
                let mut expired = vec![];
                for row in rows {
                    out.outbox_cursor = out.outbox_cursor.max(row.id);
                    if row.queued_at < before {
                        expired.push(row);
                        continue;
                    }
                    let xml: Arc<str> = row.stanza.into();
                    buf.push_str(&xml);
                    out.push(xml, Some(row.id), row.queued_at);
                }
                if !expired.is_empty() {
                    self.bounce_rows(
                        &expired,
                        StanzaErrorCondition::RemoteServerTimeout,
                        Some("the recipient's cluster could not be reached in time"),
                        counters,
                    )
                    .await;
                }
                write_batch(stream, &mut buf, self.config.limits.write_timeout).await?;
                counters.set_in_flight(out.unacked.len());
                continue;
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(()),
                next = rx.recv(), if out.unacked.len() < window => {
                    let Some(first) = next else { return Ok(()) };
                    let mut batch = vec![first];
                    while batch.len() < BATCH {
                        match rx.try_recv() {
                            Ok(xml) => batch.push(xml),
                            Err(_) => break,
                        }
                    }
                    let now = impmesh_store::now_unix();
                    let mut later = vec![];
                    for xml in batch {
                        if draining && waits_its_turn(&xml) {
                            later.push(xml);
                        } else {
                            buf.push_str(&xml);
                            out.push(xml, None, now);
                        }
                    }
                    if !later.is_empty() {
                        self.park(out, later, counters).await;
                    }
                    write_batch(stream, &mut buf, self.config.limits.write_timeout).await?;
                    counters.set_in_flight(out.unacked.len());
                }
                _ = tokio::time::sleep(KEEPALIVE) => {
                    write_within(stream, b" ", self.config.limits.write_timeout).await?;
                }
                _ = tokio::time::sleep_until(waiting_since + ack_timeout), if !out.unacked.is_empty() => {
                    return Err(LinkError::NoAck {
                        waited: ack_timeout,
                        in_flight: out.unacked.len(),
                    });
                }
                // The accepting side sends acknowledgements, or closes the stream.
                n = stream.read(&mut scratch) => {
                    let n = n?;
                    if n == 0 {
                        return Err(LinkError::Closed);
                    }
                    reader.feed(&scratch[..n])?;
                    while let Some(frame) = reader.queue.pop_front() {
                        match frame {
                            Frame::Element(a) => {
                                if let Some(h) = ack_count(&a) {
                                    let before = out.unacked.len();
                                    self.acked(out, h, counters).await;
                                    if out.unacked.len() < before {
                                        waiting_since = tokio::time::Instant::now();
                                    }
                                }
                            }
                            Frame::Footer | Frame::Header(_) => return Err(LinkError::Closed),
                        }
                    }
                }
            }
        }
    }

    /// Removes outbox rows and then bounces them to their senders (removed first: a
    /// failed removal bounces nothing, so nothing is bounced twice). False when the
    /// removal failed.
    async fn bounce_rows(
        &self,
        rows: &[impmesh_store::OutboxEntry],
        condition: StanzaErrorCondition,
        reason: Option<&str>,
        counters: &LinkCounters,
    ) -> bool {
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        if let Err(e) = self.store.outbox_delete(&ids).await {
            tracing::error!(error = %e, "cannot remove outbox messages");
            return false;
        }
        counters.unstore(
            ids.len() as u64,
            rows.iter().map(|r| r.stanza.len() as u64).sum(),
        );
        for row in rows {
            if let Some(stanza) = stanza::parse_own(&row.stanza) {
                self.bounce(&stanza, condition, reason);
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outgoing() -> Outgoing {
        Outgoing {
            node: "n".into(),
            cluster: "c".into(),
            epoch: "e".into(),
            next_seq: 1,
            outbox_cursor: 0,
            unacked: VecDeque::new(),
            presence: HashMap::new(),
        }
    }

    /// A stanza whose time ran out while in flight is taken out wherever it is in the
    /// window (not only at its front), and its place keeps its number.
    #[test]
    fn expired_stanzas_in_flight_leave_a_filler_in_place() {
        let mut out = outgoing();
        out.push("<presence/>".into(), None, 100);
        out.push("<message>old row</message>".into(), Some(7), 10);
        out.push("<message>new</message>".into(), None, 100);
        out.push("<message>old</message>".into(), None, 20);
        assert_eq!(out.outbox_cursor, 7);
        let (expired, ids, bytes) = out.expire_in_flight(50);
        assert_eq!(
            expired.iter().map(|x| &**x).collect::<Vec<_>>(),
            ["<message>old row</message>", "<message>old</message>"]
        );
        assert_eq!((ids, bytes), (vec![7], 26));
        let seqs: Vec<(u64, &str)> = out.unacked.iter().map(|p| (p.seq, &*p.xml)).collect();
        assert_eq!(
            seqs,
            [
                (1, "<presence/>"),
                (2, SKIP),
                (3, "<message>new</message>"),
                (4, SKIP)
            ]
        );
        // Twice is once.
        assert!(out.expire_in_flight(50).0.is_empty());
        // The other side handled the first: the rest is renumbered after it, without
        // the bounced ones, which never go on the wire.
        out.unacked.pop_front();
        out.compact(1);
        let seqs: Vec<(u64, &str)> = out.unacked.iter().map(|p| (p.seq, &*p.xml)).collect();
        assert_eq!(seqs, [(2, "<message>new</message>")]);
        out.push("<message>next</message>".into(), None, 100);
        assert_eq!(out.unacked.back().unwrap().seq, 3);
    }

    /// A router that only records what it is asked to bounce.
    #[derive(Default)]
    struct Bounces(std::sync::Mutex<Vec<(String, StanzaErrorCondition)>>);

    impl super::super::LinkRouter for Bounces {
        fn bounce(&self, stanza: &Element, condition: StanzaErrorCondition, _: Option<&str>) {
            let id = stanza.attr("id").unwrap_or_default().to_owned();
            self.0.lock().unwrap().push((id, condition));
        }
        fn received<'a>(
            &'a self,
            _: &'a str,
            _: &'a str,
            _: super::super::LinkSender,
            _: crate::core::envelope::Type,
            _: jid::Jid,
            _: Element,
        ) -> super::super::Pending<'a> {
            Box::pin(async {})
        }
        fn node_lost(&self, _: &str) {}
        fn node_back<'a>(&'a self, _: &'a str) -> super::super::Pending<'a> {
            Box::pin(async {})
        }
    }

    /// The links alone, on a store of their own, with a router that records bounces.
    async fn links(
        dir: &tempfile::TempDir,
        outbox_max_rows: u64,
    ) -> (Arc<Links>, Arc<Bounces>, impmesh_store::Store) {
        let store = impmesh_store::Store::open("sqlite://links.db", dir.path())
            .await
            .unwrap();
        let config = crate::config::RouterConfig {
            domain: "d".into(),
            node_name: "n1.a".into(),
            cluster_name: "a".into(),
            sasl_mechanisms: vec![],
            allow_registration: false,
            registration_interval: Duration::ZERO,
            limits: crate::config::Limits {
                outbox_max_rows,
                ..Default::default()
            },
            link_features: vec![],
            dscp: 0,
            contact_addresses: vec![],
            archive: Default::default(),
            upload: None,
            fast_token_lifetime: None,
            muc: None,
        };
        let router = Arc::new(Bounces::default());
        let weak = Arc::downgrade(&router);
        let links = Links::new(
            config,
            store.clone(),
            weak,
            tokio_util::sync::CancellationToken::new(),
            tokio_util::task::TaskTracker::new(),
        );
        (links, router, store)
    }

    /// While a link is down (no socket anywhere): messages and subscription requests
    /// wait in the outbox up to its cap and the rest is bounced with
    /// `resource-constraint`; IQ requests are answered with `remote-server-timeout` at
    /// once; the latest presence per sender and recipient is held; a result is dropped.
    #[tokio::test]
    async fn while_a_link_is_down_what_waits_is_kept_answered_or_held_by_kind() {
        let dir = tempfile::tempdir().unwrap();
        let (links, router, store) = links(&dir, 2).await;
        let mut out = outgoing();
        let counters = LinkCounters::default();
        let from = "from='u@d/r' to='v@d'";
        let stanzas: Vec<Arc<str>> = [
            format!("<message xmlns='jabber:client' id='m1' {from}><body>1</body></message>"),
            format!("<iq xmlns='jabber:client' type='get' id='q1' {from}><ping xmlns='urn:xmpp:ping'/></iq>"),
            format!("<iq xmlns='jabber:client' type='result' id='r1' {from}/>"),
            format!("<presence xmlns='jabber:client' id='p1' {from}/>"),
            format!("<presence xmlns='jabber:client' type='subscribe' id='s1' {from}/>"),
            format!("<presence xmlns='jabber:client' id='p2' {from}><show>away</show></presence>"),
            format!("<message xmlns='jabber:client' id='m2' {from}><body>2</body></message>"),
        ]
        .into_iter()
        .map(Arc::from)
        .collect();
        links.park(&mut out, stanzas, &counters).await;
        let bounced = router.0.lock().unwrap().clone();
        assert_eq!(
            bounced,
            [
                ("q1".to_owned(), StanzaErrorCondition::RemoteServerTimeout),
                ("m2".to_owned(), StanzaErrorCondition::ResourceConstraint),
            ]
        );
        let kept: Vec<String> = store
            .outbox_page("n", 0, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.stanza)
            .collect();
        assert_eq!(kept.len(), 2);
        assert!(
            kept[0].contains("id='m1'") && kept[1].contains("id='s1'"),
            "{kept:?}"
        );
        assert_eq!(counters.stored.load(Ordering::Relaxed), 2);
        assert!(counters.outbox_full.load(Ordering::Relaxed));
        // One presence per sender and recipient: the latest.
        assert_eq!(out.presence.len(), 1);
        assert!(out.presence.values().all(|p| p.contains("id='p2'")));
    }
}
