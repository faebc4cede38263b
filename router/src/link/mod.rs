//! Router links (port 7400): node-to-node streams that carry stanzas between the
//! clusters of the mesh with their original `from` and `to`.
//!
//! A link is one direction: the node that has stanzas for another node opens a TLS
//! connection to it, presenting its node certificate; the accepting node refuses any
//! certificate that is not pinned for a configured, accepted peer, before reading a
//! byte of XML. Then each side sends an XMPP stream header in the `urn:impmesh:link:1`
//! namespace and the opener writes stanzas, each carrying its own `jabber:client`
//! namespace; whitespace keeps the link alive. The receiving node checks that a
//! stanza's `from` is a user homed in the sending cluster (no spoofing of anyone else),
//! then handles it as if a local user had sent it. docs/links.md has the framing.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use backon::BackoffBuilder as _;
use impmesh_certs::{NodeIdentity, PeerVerifier, TrustAnchors};
use impmesh_store::{Home, TrustKind};
use jid::Jid;
use minidom::Element;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::Server;
use crate::core::envelope::{Envelope, IqType, PresenceType, Type};
use crate::core::route::{self, Destination, Me};
use crate::error::StanzaErrorCondition;
use crate::hub::lock;
use crate::stanza::{self, Kind};
use crate::xml::{Frame, escape};

mod wire;
use wire::{
    FrameReader, ack, ack_count, announced, header, waits_its_turn, write_batch, write_within,
};

/// The namespace of a link stream.
pub const LINK_NS: &str = "urn:impmesh:link:1";
/// The intercluster protocol version a link's stream header announces (the same as
/// `getClusterInfo`'s).
pub const LINK_PROTOCOL: u32 = 2;
/// Stanzas waiting for one remote node, at most; more are bounced to their sender.
pub const LINK_QUEUE: usize = 4096;
/// Time allowed to connect, handshake and exchange stream headers.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Router-link connections open at once, at most: 29 peers of up to 16 nodes each,
/// twice over for reconnections, with room.
const MAX_LINK_CONNECTIONS: usize = 1024;

/// A whitespace keepalive goes out after this much silence.
const KEEPALIVE: Duration = Duration::from_secs(30);
/// A link that sends nothing (not even a keepalive) for this long is closed.
const READ_TIMEOUT: Duration = Duration::from_secs(90);
/// Stanzas written with one flush, at most.
const BATCH: usize = 64;
/// Largest stanza accepted from a link: above the client limit, since a stanza may
/// grow on its way (delay stamps, forwarded copies).
const MAX_LINK_STANZA: usize = 1024 * 1024;

/// Counters of one link, as `impmesh peer status` shows them.
#[derive(Debug, Default)]
struct LinkCounters {
    up: AtomicBool,
    /// Unix time of the last change of `up`.
    since: AtomicI64,
    stanzas: AtomicU64,
    /// Messages waiting in the store's outbox (outgoing links), and their bytes.
    stored: AtomicU64,
    stored_bytes: AtomicU64,
    /// Stanzas sent and not acknowledged now, and the most there ever were (the ack
    /// window bounds both).
    in_flight: AtomicU64,
    peak_in_flight: AtomicU64,
    /// Whether InterClusterOutboxFull is raised for this node (so that relief is
    /// one store write, not one per acknowledgement).
    outbox_full: AtomicBool,
    /// Why the last attempt failed, when down.
    last_error: Mutex<Option<String>>,
    /// What the other node's stream header announced: protocol version and features
    /// (1 and none for a node of an older release).
    remote: Mutex<Option<(u32, Vec<String>)>>,
}

impl LinkCounters {
    /// Outbox rows (and bytes) gone: delivered, bounced or expired.
    fn unstore(&self, rows: u64, bytes: u64) {
        let sub = |c: &AtomicU64, n: u64| {
            let _ = c.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(n))
            });
        };
        sub(&self.stored, rows);
        sub(&self.stored_bytes, bytes);
    }

    fn set_in_flight(&self, n: usize) {
        self.in_flight.store(n as u64, Ordering::Relaxed);
        self.peak_in_flight.fetch_max(n as u64, Ordering::Relaxed);
    }

    fn set_up(&self, up: bool) {
        if self.up.swap(up, Ordering::Relaxed) != up || self.since.load(Ordering::Relaxed) == 0 {
            self.since
                .store(impmesh_store::now_unix(), Ordering::Relaxed);
        }
    }
}

/// Which way a link carries stanzas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkDirection {
    /// This node sends over it.
    Out,
    /// The remote node sends to this one.
    In,
}

impl LinkDirection {
    /// `out` or `in`, as `/metrics` labels it.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkDirection::Out => "out",
            LinkDirection::In => "in",
        }
    }
}

/// One link as reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkStatus {
    /// The remote node.
    pub node: String,
    /// Its cluster.
    pub cluster: String,
    pub direction: LinkDirection,
    pub up: bool,
    pub since: i64,
    /// Stanzas carried so far.
    pub stanzas: u64,
    /// Stanzas waiting (outgoing links): queued in memory and stored in the outbox.
    pub queued: usize,
    /// Of those, in the durable outbox: rows and bytes.
    pub outbox_rows: u64,
    pub outbox_bytes: u64,
    /// Sent and not acknowledged: now, and the most there ever were (at most the
    /// configured `link_window`).
    pub in_flight: u64,
    pub peak_in_flight: u64,
    /// The other node's protocol version and features, from its stream header.
    pub peer_protocol: Option<u32>,
    pub peer_features: Vec<String>,
    pub last_error: Option<String>,
}

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

struct Outlink {
    cluster: String,
    tx: mpsc::Sender<Arc<str>>,
    counters: Arc<LinkCounters>,
    /// Cancelled when the peer is removed: the task bounces what waits and ends.
    forgotten: tokio_util::sync::CancellationToken,
}

/// Turns a peer node's host name into addresses: the sync agent's resolver, which
/// falls back on the last good answer during a DNS outage (set by the binary with
/// [`Server::set_host_resolver`]; without one, the system's lookup).
pub trait HostResolver: Send + Sync + 'static {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Vec<std::net::IpAddr>> + Send + 'a>>;
}

/// The links of a node.
#[derive(Default)]
pub struct Links {
    /// How peer node host names are resolved.
    resolver: RwLock<Option<Arc<dyn HostResolver>>>,
    identity: RwLock<Option<(NodeIdentity, Arc<rustls::ServerConfig>)>>,
    outbound: Mutex<HashMap<String, Outlink>>,
    /// Incoming links by remote node: its cluster, counters and the link's generation
    /// (which link is the current one for that node).
    inbound: Mutex<HashMap<String, Inlink>>,
    /// The generation of the last accepted link.
    next_generation: AtomicU64,
    /// Available presence delivered here from each remote node: sender's full JID →
    /// the local users who got it. When the node's link drops, they get unavailable.
    seen: Mutex<HashMap<String, HashMap<String, HashSet<String>>>>,
    /// (contact's bare JID, local user) pairs made unavailable by a lost link, per
    /// remote node: probed again when the node's link is back.
    lost: Mutex<HashMap<String, HashSet<(String, String)>>>,
    /// Per sending node: its epoch and how many of that epoch's stanzas were handled.
    received: Mutex<HashMap<String, (String, u64)>>,
    /// Where users live, as the directory said (routing must not wait on SQL for
    /// every stanza).
    homes: Mutex<HomeCache>,
}

/// The current incoming link from one remote node.
struct Inlink {
    cluster: String,
    counters: Arc<LinkCounters>,
    /// Cancelled when the peer is removed: the link closes.
    closed: tokio_util::sync::CancellationToken,
    /// Which accepted link this is: a stale link's late end must not touch a newer
    /// link's state.
    generation: u64,
}

/// Directory lookups, valid while the store's directory generation stays the same and
/// for at most [`HOME_TTL`] (other nodes sharing a PostgreSQL store change it too).
#[derive(Default)]
struct HomeCache {
    generation: u64,
    entries: HashMap<String, (Home, tokio::time::Instant)>,
}

/// How long a cached directory lookup is used.
const HOME_TTL: Duration = Duration::from_secs(2);
/// Cached lookups kept, at most (then the cache starts over).
const HOME_CACHE_ENTRIES: usize = 100_000;

impl std::fmt::Debug for Links {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Links").finish_non_exhaustive()
    }
}

impl Links {
    /// Every link in the Prometheus text format (kept up to date by the link tasks).
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        let links = self.status();
        /// A metric family: name, type, help, and its value for one link.
        type Family = (
            &'static str,
            &'static str,
            &'static str,
            fn(&LinkStatus) -> u64,
        );
        let families: [Family; 6] = [
            (
                "impmesh_link_up",
                "gauge",
                "Whether the router link is up.",
                |l| u64::from(l.up),
            ),
            (
                "impmesh_link_stanzas_total",
                "counter",
                "Stanzas carried by the link.",
                |l| l.stanzas,
            ),
            (
                "impmesh_link_queued",
                "gauge",
                "Stanzas waiting for the remote node (in memory and in the outbox).",
                |l| l.queued as u64,
            ),
            (
                "impmesh_link_outbox_rows",
                "gauge",
                "Messages in the durable outbox for the node.",
                |l| l.outbox_rows,
            ),
            (
                "impmesh_link_outbox_bytes",
                "gauge",
                "Bytes of those messages.",
                |l| l.outbox_bytes,
            ),
            (
                "impmesh_link_in_flight",
                "gauge",
                "Stanzas sent and not acknowledged yet.",
                |l| l.in_flight,
            ),
        ];
        for (name, kind, help, value) in families {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for l in &links {
                let _ = writeln!(
                    out,
                    "{name}{{node=\"{}\",cluster=\"{}\",direction=\"{}\"}} {}",
                    l.node,
                    l.cluster,
                    l.direction.as_str(),
                    value(l)
                );
            }
        }
    }

    /// Whether the link of `generation` is the current incoming link from `node`.
    fn is_current(&self, node: &str, generation: u64) -> bool {
        lock(&self.inbound)
            .get(node)
            .is_some_and(|l| l.generation == generation)
    }

    /// Every link, outgoing then incoming, by node name.
    pub fn status(&self) -> Vec<LinkStatus> {
        let report = |node: &str,
                      cluster: &str,
                      direction: LinkDirection,
                      c: &LinkCounters,
                      queued: usize| {
            // One lock at a time: a guard taken inside the struct literal would live
            // to its end.
            let remote = lock(&c.remote).clone();
            LinkStatus {
                node: node.to_owned(),
                cluster: cluster.to_owned(),
                direction,
                up: c.up.load(Ordering::Relaxed),
                since: c.since.load(Ordering::Relaxed),
                stanzas: c.stanzas.load(Ordering::Relaxed),
                queued,
                outbox_rows: c.stored.load(Ordering::Relaxed),
                outbox_bytes: c.stored_bytes.load(Ordering::Relaxed),
                in_flight: c.in_flight.load(Ordering::Relaxed),
                peak_in_flight: c.peak_in_flight.load(Ordering::Relaxed),
                peer_protocol: remote.as_ref().map(|r| r.0),
                peer_features: remote.map(|r| r.1).unwrap_or_default(),
                last_error: lock(&c.last_error).clone(),
            }
        };
        let mut out: Vec<LinkStatus> = lock(&self.outbound)
            .iter()
            .map(|(node, l)| {
                let queued = LINK_QUEUE - l.tx.capacity()
                    + l.counters.stored.load(Ordering::Relaxed) as usize;
                report(node, &l.cluster, LinkDirection::Out, &l.counters, queued)
            })
            .collect();
        let mut inbound: Vec<LinkStatus> = lock(&self.inbound)
            .iter()
            .map(|(node, l)| report(node, &l.cluster, LinkDirection::In, &l.counters, 0))
            .collect();
        out.sort_by(|a, b| a.node.cmp(&b.node));
        inbound.sort_by(|a, b| a.node.cmp(&b.node));
        out.extend(inbound);
        out
    }
}

/// Why a link could not be opened.
#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error(transparent)]
    Store(#[from] impmesh_store::StoreError),
    #[error("cannot verify peer certificates: {0}")]
    Trust(#[from] impmesh_certs::CertError),
    #[error("this node has no certificate for links")]
    NoIdentity,
    #[error("{node} is not a known node of {cluster}")]
    UnknownNode { node: String, cluster: String },
    #[error("{0} does not accept router links")]
    NoLinks(String),
    #[error("{0} is not a valid server name")]
    ServerName(String),
    #[error("{0} was removed")]
    Removed(String),
    #[error("no acknowledgement for {} s with {in_flight} stanzas in flight", .waited.as_secs())]
    NoAck {
        waited: std::time::Duration,
        in_flight: usize,
    },
    #[error("a newer link from {0} replaced this one")]
    Replaced(String),
    #[error("no client certificate")]
    NoClientCertificate,
    #[error("certificate {0} is not pinned for any peer")]
    NotPinned(String),
    #[error("{0} is not an accepted peer")]
    NotAccepted(String),
    #[error("{cluster} opened a link as {node:?}, which is not one of its nodes")]
    NotItsNode { cluster: String, node: String },
    #[error("a node of {cluster} presented its pinned certificate {fingerprint}: {error:?}")]
    Expired {
        cluster: String,
        fingerprint: String,
        error: rustls::CertificateError,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("timed out")]
    Timeout,
    #[error("the stream was refused: {0:?}")]
    Stream(crate::error::StreamErrorCondition),
    #[error("the remote node closed the link")]
    Closed,
}

impl Server {
    /// Resolves peer nodes' host names with `resolver` from now on.
    pub fn set_host_resolver(&self, resolver: Arc<dyn HostResolver>) {
        *self
            .links
            .resolver
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Some(resolver);
    }

    /// Connects to `host:port` (every address the host resolves to, in turn).
    async fn connect_host(&self, host: &str, port: u16) -> std::io::Result<TcpStream> {
        if let Ok(ip) = host.trim_matches(['[', ']']).parse::<std::net::IpAddr>() {
            return TcpStream::connect((ip, port)).await;
        }
        let resolver = self
            .links
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

    /// Sets the certificate links are opened and accepted with (at start and after a
    /// certificate change; new links use it at once).
    pub fn set_link_identity(
        &self,
        identity: NodeIdentity,
    ) -> Result<(), impmesh_certs::CertError> {
        let config = identity.link_server_config()?;
        *self
            .links
            .identity
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Some((identity, config));
        Ok(())
    }

    /// The node's links and their state.
    pub fn link_status(&self) -> Vec<LinkStatus> {
        self.links.status()
    }

    /// The node's links in the Prometheus text format.
    pub fn render_link_metrics(&self, out: &mut String) {
        self.links.render_metrics(out);
    }

    /// Where a user of the domain is homed when that is another cluster: (cluster,
    /// node). `None` for local, unknown and quarantined users.
    pub(crate) async fn remote_home(&self, user: &str) -> Option<(String, String)> {
        match self.home_of(user).await {
            Ok(Home::Remote { cluster, node }) if cluster != self.config.cluster_name => {
                Some((cluster, node))
            }
            Ok(_) => None,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the directory while routing");
                None
            }
        }
    }

    /// Where `user` lives by the directory, through the lookup cache.
    pub(crate) async fn home_of(&self, user: &str) -> impmesh_store::Result<Home> {
        let generation = self.store.directory_generation();
        {
            let mut cache = lock(&self.links.homes);
            if cache.generation != generation {
                cache.entries.clear();
                cache.generation = generation;
            }
            if let Some((home, at)) = cache.entries.get(user)
                && at.elapsed() < HOME_TTL
            {
                return Ok(home.clone());
            }
        }
        let home = self.store.home_of(user).await?;
        let mut cache = lock(&self.links.homes);
        if cache.generation == generation {
            if cache.entries.len() >= HOME_CACHE_ENTRIES {
                cache.entries.clear();
            }
            cache
                .entries
                .insert(user.to_owned(), (home.clone(), tokio::time::Instant::now()));
        }
        Ok(home)
    }

    /// The client address (`host:port`) of the node of another cluster that homes
    /// `user`, for `see-other-host`; `None` for local and unknown users, or when the
    /// home node's address is not known.
    pub(crate) async fn client_address_of_home(&self, user: &str) -> Option<String> {
        let (_, node) = self.remote_home(user).await?;
        let node = self.store.peer_node(&node).await.ok().flatten()?;
        let port = match node.c2s_port {
            0 => node.c2s_tls_port,
            p => p,
        };
        if port == 0 {
            return None;
        }
        Some(if node.host.contains(':') {
            format!("[{}]:{port}", node.host)
        } else {
            format!("{}:{port}", node.host)
        })
    }

    /// The queue of the link to `node`, starting the task that keeps it when there is
    /// none yet.
    fn outlink(&self, cluster: &str, node: &str) -> mpsc::Sender<Arc<str>> {
        let mut outbound = lock(&self.links.outbound);
        let link = outbound.entry(node.to_owned()).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(LINK_QUEUE);
            let counters = Arc::new(LinkCounters::default());
            let forgotten = tokio_util::sync::CancellationToken::new();
            if let Some(server) = self.me.upgrade() {
                let (node, cluster, c, f) = (
                    node.to_owned(),
                    cluster.to_owned(),
                    counters.clone(),
                    forgotten.clone(),
                );
                self.tasks
                    .spawn(async move { server.run_outlink(node, cluster, rx, c, f).await });
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
    pub async fn resume_outbox(&self) {
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
    pub(crate) fn forward(&self, cluster: &str, node: &str, stanza: &Element) -> bool {
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

    /// Where a stanza for `user` (an account of the served domain) goes: the one
    /// routing decision (`core::route`) over what this node knows now.
    pub(crate) async fn destination(&self, user: &str) -> Destination {
        let me = Me {
            cluster: &self.config.cluster_name,
            node: &self.config.node_name,
        };
        let domain = &self.config.domain;
        if self.hub.has_sessions(user) {
            return route::destination(user, domain, true, Err(()), me);
        }
        let home = self.home_of(user).await;
        if let Err(e) = &home {
            tracing::error!(error = %e, "cannot read the directory while routing");
        }
        route::destination(user, domain, false, home.as_ref().map_err(|_| ()), me)
    }

    /// Sends a stanza on when [`Self::destination`] says it goes to another cluster,
    /// or bounces it when it is refused; returns whether it did either (the caller
    /// delivers it here otherwise: to the sessions, offline storage, or another node
    /// of this cluster, which shares the store until multi-node clusters come).
    pub(crate) async fn route_remote(&self, user: &str, stanza: &Element) -> bool {
        match self.destination(user).await {
            Destination::Peer { cluster, node } if cluster != self.config.cluster_name => {
                self.forward(&cluster, &node, stanza);
                true
            }
            Destination::Refuse { condition, text } => {
                self.bounce(stanza, condition, Some(&text));
                true
            }
            _ => false,
        }
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

    /// Closes every link to and from `cluster`'s nodes and bounces what waits for
    /// them (`peer del` here, or the peer told us it removed this cluster).
    pub fn forget_peer(&self, cluster: &str) {
        tracing::info!(%cluster, "closing the removed peer's links");
        let mut outbound = lock(&self.links.outbound);
        outbound.retain(|_, l| {
            let keep = l.cluster != cluster;
            if !keep {
                l.forgotten.cancel();
            }
            keep
        });
        drop(outbound);
        let mut gone = vec![];
        lock(&self.links.inbound).retain(|node, l| {
            let keep = l.cluster != cluster;
            if !keep {
                l.closed.cancel();
                gone.push(node.clone());
            }
            keep
        });
        // Their users' presence ends here (the links' own teardown no longer does it:
        // they are not current any more).
        for node in gone {
            self.remote_node_lost(&node);
        }
    }

    /// [`Server::run_outlink`]'s loop, until shutdown or the link's queue closes.
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
                o = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.open_link(node, cluster, &out.epoch, counters)) => o,
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
            let identity = self
                .links
                .identity
                .read()
                .unwrap_or_else(|e| e.into_inner());
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

    /// Accepts router links on `addr` until shutdown; returns the bound address.
    pub async fn listen_links(self: &Arc<Self>, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        tracing::info!(addr = %local, "listening for router links");
        let server = self.clone();
        // An admission limit before any TLS work, and a few handshakes per address at
        // a time (security review M10: unlimited concurrent handshakes shared the
        // process's file descriptors with the client ports).
        let admission = Arc::new(tokio::sync::Semaphore::new(MAX_LINK_CONNECTIONS));
        let handshakes =
            impmesh_limits::PerAddress::new(self.config.limits.link_handshakes_per_address);
        self.tasks.spawn(async move {
            while let Some((permit, tcp, peer)) = server.admit(&listener, &admission, "links").await
            {
                let Some(slot) = handshakes.acquire(peer.ip()) else {
                    tracing::debug!(%peer, "too many link handshakes from one address");
                    continue;
                };
                let server2 = server.clone();
                server.tasks.spawn(async move {
                    if let Err(e) = server2.serve_inlink(tcp, slot).await {
                        tracing::warn!(%peer, error = %e, "router link refused or closed");
                    }
                    drop(permit);
                });
            }
        });
        Ok(local)
    }

    /// One incoming link: mutual TLS, the certificate checked against the pinned
    /// certificates of accepted peers, headers, then stanzas until it closes.
    async fn serve_inlink(
        self: Arc<Self>,
        tcp: TcpStream,
        handshake_slot: impmesh_limits::AddressSlot,
    ) -> Result<(), LinkError> {
        let config = self
            .links
            .identity
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|(_, c)| c.clone())
            .ok_or(LinkError::NoIdentity)?;
        let _ = tcp.set_nodelay(true);
        let handshake = async {
            let mut tls = tokio_rustls::TlsAcceptor::from(config).accept(tcp).await?;
            let cluster = self.link_peer(&tls).await?;
            let mut reader = FrameReader::new();
            let Frame::Header(opened) = reader.next(&mut tls).await? else {
                return Err(LinkError::Closed);
            };
            let remote = announced(&opened);
            let from = opened.from.unwrap_or_default();
            let epoch = opened.id.unwrap_or_default();
            // The node named in the header must be one of the authenticated peer's:
            // counters and presence bookkeeping are kept per node.
            match self.store.peer_node(&from).await {
                Ok(Some(n)) if n.peer == cluster => {}
                Ok(_) => {
                    return Err(LinkError::NotItsNode {
                        cluster,
                        node: from,
                    });
                }
                Err(e) => return Err(e.into()),
            }
            // Stanzas of this epoch already handled: the sender resends only the rest.
            let h = {
                let mut received = lock(&self.links.received);
                let entry = received
                    .entry(from.clone())
                    .or_insert_with(|| (epoch.clone(), 0));
                if entry.0 != epoch {
                    *entry = (epoch.clone(), 0);
                }
                entry.1
            };
            let mut answer = header(
                &self.config.node_name,
                &from,
                &epoch,
                &self.config.link_features,
            );
            answer.push_str(&ack(h));
            tls.write_all(answer.as_bytes()).await?;
            tls.flush().await?;
            Ok::<_, LinkError>((tls, reader, cluster, from, epoch, remote))
        };
        let (mut tls, mut reader, cluster, node, epoch, remote) =
            tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
                .await
                .map_err(|_| LinkError::Timeout)??;
        drop(handshake_slot);
        let counters = Arc::new(LinkCounters::default());
        counters.set_up(true);
        *lock(&counters.remote) = Some(remote);
        let generation = self.links.next_generation.fetch_add(1, Ordering::Relaxed) + 1;
        let closed = tokio_util::sync::CancellationToken::new();
        lock(&self.links.inbound).insert(
            node.clone(),
            Inlink {
                cluster: cluster.clone(),
                counters: counters.clone(),
                closed: closed.clone(),
                generation,
            },
        );
        tracing::info!(%node, %cluster, generation, "router link accepted");
        self.remote_node_back(&node).await;
        let result = tokio::select! {
            _ = closed.cancelled() => Err(LinkError::Removed(cluster.to_owned())),
            r = self.read_inlink(
                &mut tls,
                &mut reader,
                &cluster,
                &node,
                &epoch,
                generation,
                &counters,
            ) => r,
        };
        counters.set_up(false);
        // Only the current link's end means the node is gone: a stale link that a
        // newer one replaced leaves the newer link's presence alone.
        if self.links.is_current(&node, generation) {
            self.remote_node_lost(&node);
        }
        let deadline = self.config.limits.write_timeout;
        let _ = write_within(&mut tls, b"</stream:stream>", deadline).await;
        let _ = tls.shutdown().await;
        result
    }

    /// The accepted peer cluster a link's client certificate is pinned for.
    async fn link_peer<IO>(
        &self,
        tls: &tokio_rustls::server::TlsStream<IO>,
    ) -> Result<String, LinkError> {
        let cert = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or(LinkError::NoClientCertificate)?;
        let fingerprint = impmesh_certs::fingerprint(cert);
        let entries = self.store.trust_entries().await?;
        let cluster = entries
            .into_iter()
            .find(|e| e.kind == TrustKind::Pinned && e.fingerprint == fingerprint)
            .and_then(|e| e.peer)
            .ok_or_else(|| LinkError::NotPinned(fingerprint.clone()))?;
        match self.store.peer(&cluster).await {
            Ok(Some(p)) if p.state == impmesh_store::PeerState::Active => {}
            Ok(_) => return Err(LinkError::NotAccepted(cluster)),
            Err(e) => return Err(e.into()),
        }
        // A pin replaces the chain checks, not the dates.
        let alarm = impmesh_store::alarms::PEER_CERT_EXPIRED;
        if let Err(error) = impmesh_certs::within_validity(cert, impmesh_store::now_unix()) {
            let refused = LinkError::Expired {
                cluster: cluster.clone(),
                fingerprint,
                error,
            };
            if let Err(e) = self
                .store
                .raise_alarm(alarm, &cluster, &refused.to_string())
                .await
            {
                tracing::error!(error = %e, "cannot raise an alarm");
            }
            return Err(refused);
        }
        let _ = self
            .store
            .clear_alarm(alarm, &cluster, "a node connected with a valid certificate")
            .await;
        Ok(cluster)
    }

    #[allow(clippy::too_many_arguments)]
    async fn read_inlink<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
        reader: &mut FrameReader,
        cluster: &str,
        node: &str,
        epoch: &str,
        generation: u64,
        counters: &LinkCounters,
    ) -> Result<(), LinkError> {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            if !self.links.is_current(node, generation) {
                // A newer link from the same node took over: this one is stale and
                // must not add to the count the new one acknowledges with.
                return Err(LinkError::Replaced(node.to_owned()));
            }
            let mut handled = 0u64;
            let mut failed = None;
            while let Some(frame) = reader.queue.pop_front() {
                match frame {
                    Frame::Element(el) => {
                        counters.stanzas.fetch_add(1, Ordering::Relaxed);
                        if let Err(e) = self.on_link_stanza(cluster, node, el).await {
                            failed = Some(e);
                            break;
                        }
                        handled += 1;
                    }
                    Frame::Footer => return Ok(()),
                    Frame::Header(_) => return Err(LinkError::Closed),
                }
            }
            if handled > 0 {
                // Count and acknowledge what was handled: a new link of the same epoch
                // resumes after it (each stanza handled once).
                let h = {
                    let mut received = lock(&self.links.received);
                    let entry = received
                        .entry(node.to_owned())
                        .or_insert_with(|| (epoch.to_owned(), 0));
                    if entry.0 != epoch {
                        *entry = (epoch.to_owned(), 0);
                    }
                    entry.1 += handled;
                    entry.1
                };
                write_within(stream, ack(h).as_bytes(), self.config.limits.write_timeout).await?;
            }
            if let Some(e) = failed {
                tracing::error!(%node, error = %e, "closing the link unacknowledged: the sender sends again");
                return Err(e);
            }
            let n = tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(()),
                r = tokio::time::timeout(READ_TIMEOUT, stream.read(&mut buf)) => {
                    r.map_err(|_| LinkError::Timeout)??
                }
            };
            if n == 0 {
                return Err(LinkError::Closed);
            }
            reader.feed(&buf[..n])?;
        }
    }

    /// A stanza that arrived over a link from `cluster`: checked, then handled as if a
    /// local user had sent it, never forwarded again.
    ///
    /// Fails only when the sender cannot be checked (the store): the stanza is then
    /// not handled, and the link must close unacknowledged.
    async fn on_link_stanza(
        &self,
        cluster: &str,
        node: &str,
        stanza: Element,
    ) -> Result<(), LinkError> {
        // The envelope is read once, here; what follows gets typed values.
        let env = match Envelope::parse(&stanza) {
            Ok(env) => env,
            Err(e) => {
                tracing::warn!(%cluster, name = stanza.name(), error = ?e, "a malformed stanza on a router link; dropped");
                return Ok(());
            }
        };
        let domain = self.config.domain.as_str();
        // The sender must be homed in the sending cluster, by the same rule as routing:
        // a local account or a quarantined name is nobody's to speak for.
        let sender_ok = match &env.from {
            Some(j) if j.domain().as_str() == domain => match j.node() {
                Some(user) => match self.home_of(user.as_str()).await {
                    Ok(Home::Remote { cluster: home, .. }) => home == cluster,
                    Ok(_) => false,
                    // Not "no": the stanza is neither handled nor acknowledged, and
                    // the link closes so that the sender sends it again.
                    Err(e) => return Err(e.into()),
                },
                None => false,
            },
            _ => false,
        };
        if !sender_ok {
            tracing::warn!(%cluster, from = ?stanza.attr("from"), "a stanza whose sender is not homed in the sending cluster; dropped");
            return Ok(());
        }
        let Some(to) = env.to else {
            return Ok(());
        };
        if to.domain().as_str() != domain || to.node().is_none() {
            self.bounce(&stanza, StanzaErrorCondition::ServiceUnavailable, None);
            return Ok(());
        }
        match env.ty {
            Type::Message(_) => {
                if let Err(b) = self.deliver_local_message(stanza, &to).await {
                    self.bounce(&b.stanza, b.condition, b.text);
                }
            }
            Type::Iq(ty) => self.iq_from_link(stanza, ty, &to).await,
            Type::Presence(ty) => self.presence_from_link(node, stanza, ty, &to).await,
        }
        Ok(())
    }

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
            return;
        }
        let exists = self.store.user_exists(&user).await.unwrap_or(false);
        if !exists || blocked {
            self.bounce(&iq, StanzaErrorCondition::ServiceUnavailable, None);
            return;
        }
        match self.account_query(&iq, &user).await {
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
            Err(condition) => self.bounce(&iq, condition, None),
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
                let mut seen = lock(&self.links.seen);
                let by_sender = seen.entry(node.to_owned()).or_default();
                let sender = from.to_string();
                if ty == PresenceType::Available && delivered {
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
    fn remote_node_lost(&self, node: &str) {
        let Some(senders) = lock(&self.links.seen).remove(node) else {
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
                    self.to_available_resources(&user, &p);
                }
                lost.push((from.to_bare().to_string(), user));
            }
        }
        tracing::info!(%node, contacts = lost.len(), "router link lost; its users' presence marked unavailable");
        lock(&self.links.lost)
            .entry(node.to_owned())
            .or_default()
            .extend(lost);
    }

    /// The link from `node` is back: the presence lost with it is probed again.
    async fn remote_node_back(&self, node: &str) {
        let Some(pairs) = lock(&self.links.lost).remove(node) else {
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

    /// Fuzzing on stable (STYLE 12): mutated link streams (a header with features,
    /// acknowledgements, stanzas of each kind), fed in random chunks, never panic the
    /// frame reader or what reads the frames (the header's announcement, ack counts,
    /// the stanza kind and its JIDs); and the unmutated stream gives the same frames
    /// however it is cut. The seed is printed on failure, to keep a crash as a case.
    #[test]
    fn mutated_link_frames_never_panic() {
        use impmesh_testkit::mutate;
        use rand::{Rng as _, SeedableRng as _};
        let seed: u64 = rand::random();
        eprintln!("seed {seed}");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let features = vec!["outbox-v2".to_owned(), "x".repeat(40)];
        let stream = format!(
            "{}{}<message xmlns='jabber:client' from='a@d/r' to='b@d' type='chat'><body>hi</body></message>\
             <presence xmlns='jabber:client' from='a@d' to='b@d' type='subscribe'/>\
             <iq xmlns='jabber:client' from='a@d/r' to='b@d' type='get' id='1'><ping xmlns='urn:xmpp:ping'/></iq>\
             {}</stream:stream>",
            header("n1.c1", "n2.c2", "epoch-1", &features),
            ack(7),
            ack(u64::MAX),
        );
        let read_all = |input: &[u8], rng: &mut rand::rngs::StdRng| {
            let mut reader = FrameReader::new();
            let mut rest = input;
            let mut frames = vec![];
            while !rest.is_empty() {
                let n = rng.gen_range(1..=rest.len().min(96));
                let (chunk, tail) = rest.split_at(n);
                rest = tail;
                if reader.feed(chunk).is_err() {
                    break;
                }
                frames.extend(reader.queue.drain(..));
            }
            for frame in &frames {
                match frame {
                    Frame::Header(h) => {
                        let (_, announced) = announced(h);
                        assert!(announced.len() <= 64, "seed {seed}");
                    }
                    Frame::Element(e) => {
                        let _ = ack_count(e);
                        let _ = Kind::of(e);
                        let _ = e.attr("from").and_then(stanza::parse_jid);
                        let _ = e.attr("to").and_then(stanza::parse_jid);
                        let _ = waits_its_turn(&String::from(e));
                    }
                    Frame::Footer => {}
                }
            }
            frames
        };
        let whole = read_all(stream.as_bytes(), &mut rng);
        assert_eq!(whole.len(), 7, "header, two acks, three stanzas, footer");
        assert!(matches!(&whole[0], Frame::Header(h) if announced(h).1 == features));
        let counts: Vec<_> = whole
            .iter()
            .filter_map(|f| match f {
                Frame::Element(e) => ack_count(e),
                _ => None,
            })
            .collect();
        assert_eq!(counts, [7, u64::MAX]);
        for round in 0..10_000 {
            let input = if round % 10 == 0 {
                stream.as_bytes().to_vec()
            } else {
                mutate(stream.as_bytes(), &mut rng)
            };
            let frames = read_all(&input, &mut rng);
            if round % 10 == 0 {
                assert_eq!(frames.len(), whole.len(), "seed {seed}");
            }
        }
    }
}
