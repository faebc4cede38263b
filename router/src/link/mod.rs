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

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use impmesh_certs::NodeIdentity;
use impmesh_store::{ClusterName, Home, NodeName, RoomHome, Store};
use jid::Jid;
use minidom::Element;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Server;
use crate::config::RouterConfig;
use crate::core::envelope::Type;
use crate::core::route::{self, Destination, Me};
use crate::error::StanzaErrorCondition;
use crate::hub::lock;

mod incoming;
mod outgoing;
mod wire;

use incoming::Inlink;
use outgoing::Outlink;

/// The namespace of a link stream.
pub const LINK_NS: &str = "urn:impmesh:link:1";
/// The intercluster protocol version a link's stream header announces (the same as
/// `getClusterInfo`'s).
pub const LINK_PROTOCOL: u32 = 2;

/// A whitespace keepalive goes out after this much silence.
const KEEPALIVE: Duration = Duration::from_secs(30);
/// Stanzas written with one flush, at most.
const BATCH: usize = 64;
/// Largest stanza accepted from a link: above the client limit, since a stanza may
/// grow on its way (delay stamps, forwarded copies).
pub(crate) const MAX_LINK_STANZA: usize = 1024 * 1024;

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

/// Turns a peer node's host name into addresses: the sync agent's resolver, which
/// falls back on the last good answer during a DNS outage (set by the binary with
/// [`Server::set_host_resolver`]; without one, the system's lookup).
pub trait HostResolver: Send + Sync + 'static {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Vec<std::net::IpAddr>> + Send + 'a>>;
}

/// What links hand to the router: stanzas that cannot go (answered to their senders),
/// stanzas that arrived (checked against who sent them), and remote nodes whose link
/// went down or came back. The router implements it; the links know nothing else of it.
pub(crate) trait LinkRouter: Send + Sync + 'static {
    /// Answers `stanza` with an error to its sender.
    fn bounce(&self, stanza: &Element, condition: StanzaErrorCondition, text: Option<&str>);
    /// A stanza from node `node` of `cluster`, checked: from a user homed there, for an
    /// account of this domain or a room homed here; or from a room homed there, for
    /// an account homed here. Handled as if a local user (or room) had sent it.
    fn received<'a>(
        &'a self,
        cluster: &'a str,
        node: &'a str,
        sender: LinkSender,
        ty: Type,
        to: Jid,
        stanza: Element,
    ) -> Pending<'a>;
    /// The current link from `node` went down.
    fn node_lost(&self, node: &str);
    /// A link from `node` came up.
    fn node_back<'a>(&'a self, node: &'a str) -> Pending<'a>;
}

/// Who sent a stanza over a router link, as checked against the sending cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LinkSender {
    /// A user homed in the sending cluster.
    User,
    /// A chat room homed in the sending cluster (`room@MUC-HOST[/nick]`).
    Room,
}

/// A [`LinkRouter`] step the link waits for.
pub(crate) type Pending<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// The router links of a node: the link to each remote node it sends to (a task
/// per link, with its queue and the durable outbox), the links remote nodes opened to
/// it, and where users live. Owns its I/O and bookkeeping; what arrives and what
/// cannot go is the router's (`LinkRouter`).
pub struct Links {
    config: RouterConfig,
    store: Store,
    router: Weak<dyn LinkRouter>,
    /// These links, for the tasks they spawn.
    me: Weak<Links>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    /// How peer node host names are resolved.
    resolver: RwLock<Option<Arc<dyn HostResolver>>>,
    identity: RwLock<Option<(NodeIdentity, Arc<rustls::ServerConfig>)>>,
    outbound: Mutex<HashMap<String, Outlink>>,
    /// Incoming links by remote node: its cluster, counters and the link's generation
    /// (which link is the current one for that node).
    inbound: Mutex<HashMap<String, Inlink>>,
    /// The generation of the last accepted link.
    next_generation: AtomicU64,
    /// Per sending node: its epoch and how many of that epoch's stanzas were handled.
    received: Mutex<HashMap<String, (String, u64)>>,
    /// Where users live, as the directory said (routing must not wait on SQL for
    /// every stanza).
    homes: Mutex<HomeCache<Home>>,
    /// Where rooms live, likewise.
    room_homes: Mutex<HomeCache<RoomHome>>,
}

/// Directory lookups, valid while the store's directory generation stays the same and
/// for at most [`HOME_TTL`] (other nodes sharing a PostgreSQL store change it too).
struct HomeCache<T> {
    generation: u64,
    entries: HashMap<String, (T, tokio::time::Instant)>,
}

impl<T> Default for HomeCache<T> {
    fn default() -> Self {
        HomeCache {
            generation: 0,
            entries: HashMap::new(),
        }
    }
}

impl<T: Clone> HomeCache<T> {
    /// The answer kept for `name` at `generation`, if still fresh.
    fn get(&mut self, generation: u64, name: &str) -> Option<T> {
        if self.generation != generation {
            self.entries.clear();
            self.generation = generation;
        }
        let (home, at) = self.entries.get(name)?;
        (at.elapsed() < HOME_TTL).then(|| home.clone())
    }

    /// Keeps an answer read at `generation` (unless the directory changed since).
    fn put(&mut self, generation: u64, name: &str, home: &T) {
        if self.generation == generation {
            if self.entries.len() >= HOME_CACHE_ENTRIES {
                self.entries.clear();
            }
            let now = tokio::time::Instant::now();
            self.entries.insert(name.to_owned(), (home.clone(), now));
        }
    }
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
    /// The links of a node whose router is `router`; their tasks stop with `shutdown`
    /// and are tracked by `tasks`.
    pub(crate) fn new(
        config: RouterConfig,
        store: Store,
        router: Weak<dyn LinkRouter>,
        shutdown: CancellationToken,
        tasks: TaskTracker,
    ) -> Arc<Links> {
        Arc::new_cyclic(|me| Links {
            config,
            store,
            router,
            me: me.clone(),
            shutdown,
            tasks,
            resolver: RwLock::default(),
            identity: RwLock::default(),
            outbound: Mutex::default(),
            inbound: Mutex::default(),
            next_generation: AtomicU64::new(0),
            received: Mutex::default(),
            homes: Mutex::default(),
            room_homes: Mutex::default(),
        })
    }

    /// Answers `stanza` with an error to its sender, through the router.
    fn bounce(&self, stanza: &Element, condition: StanzaErrorCondition, text: Option<&str>) {
        if let Some(router) = self.router.upgrade() {
            router.bounce(stanza, condition, text);
        }
    }

    /// Where `user` lives by the directory, through the lookup cache.
    pub(crate) async fn home_of(&self, user: &str) -> impmesh_store::Result<Home> {
        let generation = self.store.directory_generation();
        if let Some(home) = lock(&self.homes).get(generation, user) {
            return Ok(home);
        }
        let home = self.store.home_of(user).await?;
        lock(&self.homes).put(generation, user, &home);
        Ok(home)
    }

    /// Where the room `name` lives by the directory, through the lookup cache.
    pub(crate) async fn room_home(&self, name: &str) -> impmesh_store::Result<RoomHome> {
        let generation = self.store.room_generation();
        if let Some(home) = lock(&self.room_homes).get(generation, name) {
            return Ok(home);
        }
        let home = self.store.room_home(name).await?;
        lock(&self.room_homes).put(generation, name, &home);
        Ok(home)
    }

    /// Closes every link to and from `cluster`'s nodes and bounces what waits for
    /// them; returns the remote nodes whose incoming links closed.
    fn forget_peer(&self, cluster: &str) -> Vec<String> {
        tracing::info!(%cluster, "closing the removed peer's links");
        lock(&self.outbound).retain(|_, l| {
            let keep = l.cluster != cluster;
            if !keep {
                l.forgotten.cancel();
            }
            keep
        });
        let mut gone = vec![];
        lock(&self.inbound).retain(|node, l| {
            let keep = l.cluster != cluster;
            if !keep {
                l.closed.cancel();
                gone.push(node.clone());
            }
            keep
        });
        gone
    }

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
    pub(super) fn is_current(&self, node: &str, generation: u64) -> bool {
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
                let queued = self.config.limits.link_queue - l.tx.capacity()
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
pub(super) enum LinkError {
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
    pub(crate) async fn remote_home(&self, user: &str) -> Option<(ClusterName, NodeName)> {
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

    /// Where `user` lives by the directory, through the links' lookup cache.
    pub(crate) async fn home_of(&self, user: &str) -> impmesh_store::Result<Home> {
        self.links.home_of(user).await
    }

    /// Accepts router links on `addr` until shutdown; returns the bound address.
    pub async fn listen_links(&self, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        self.links.listen(addr).await
    }

    /// Starts the links of the nodes that have messages waiting in the outbox (at
    /// start: what a restart interrupted is delivered or expires as before).
    pub async fn resume_outbox(&self) {
        self.links.resume_outbox().await;
    }

    /// Sends a stanza to a user homed on another cluster over the link to its home
    /// node. Returns false when the stanza was bounced (queue full) instead.
    pub(crate) fn forward(&self, cluster: &str, node: &str, stanza: &Element) -> bool {
        self.links.forward(cluster, node, stanza)
    }

    /// Closes every link to and from `cluster`'s nodes and bounces what waits for
    /// them (`peer del` here, or the peer told us it removed this cluster); the
    /// presence of the users of its nodes ends here.
    pub fn forget_peer(&self, cluster: &str) {
        for node in self.links.forget_peer(cluster) {
            self.remote_node_lost(&node);
        }
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
}
