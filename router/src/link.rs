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

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use backon::BackoffBuilder as _;
use impmesh_certs::{NodeIdentity, PeerVerifier, TrustAnchors};
use impmesh_store::TrustKind;
use minidom::Element;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use xmpp_parsers::jid::Jid;

use crate::Server;
use crate::error::StanzaErrorCondition;
use crate::hub::lock;
use crate::stanza::{self, Kind};
use crate::xml::{Frame, Framer, escape};

/// The namespace of a link stream.
pub const LINK_NS: &str = "urn:impmesh:link:1";
/// Stanzas waiting for one remote node, at most; more are bounced to their sender.
pub const LINK_QUEUE: usize = 4096;
/// Time allowed to connect, handshake and exchange stream headers.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A whitespace keepalive goes out after this much silence.
const KEEPALIVE: Duration = Duration::from_secs(30);
/// A link that sends nothing (not even a keepalive) for this long is closed.
const READ_TIMEOUT: Duration = Duration::from_secs(90);
/// Stanzas written with one flush, at most.
const BATCH: usize = 64;
/// Largest stanza accepted from a link (the same as from an authenticated client is
/// too small for forwarded payloads; this leaves room for them).
const MAX_LINK_STANZA: usize = 1024 * 1024;

/// Counters of one link, as `impmesh peer status` shows them.
#[derive(Debug, Default)]
pub struct LinkCounters {
    up: AtomicBool,
    /// Unix time of the last change of `up`.
    since: AtomicI64,
    stanzas: AtomicU64,
    /// Why the last attempt failed, when down.
    last_error: Mutex<Option<String>>,
}

impl LinkCounters {
    fn set_up(&self, up: bool) {
        if self.up.swap(up, Ordering::Relaxed) != up || self.since.load(Ordering::Relaxed) == 0 {
            self.since
                .store(impmesh_store::now_unix(), Ordering::Relaxed);
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
    /// `out` (we send over it) or `in` (the remote node sends to us).
    pub direction: &'static str,
    pub up: bool,
    pub since: i64,
    /// Stanzas carried so far.
    pub stanzas: u64,
    /// Stanzas waiting (outgoing links).
    pub queued: usize,
    pub last_error: Option<String>,
}

struct Outlink {
    cluster: String,
    tx: mpsc::Sender<Arc<str>>,
    counters: Arc<LinkCounters>,
}

/// The links of a node.
#[derive(Default)]
pub struct Links {
    identity: RwLock<Option<(NodeIdentity, Arc<rustls::ServerConfig>)>>,
    outbound: Mutex<HashMap<String, Outlink>>,
    inbound: Mutex<HashMap<String, (String, Arc<LinkCounters>)>>,
    /// Available presence delivered here from each remote node: sender's full JID →
    /// the local users who got it. When the node's link drops, they get unavailable.
    seen: Mutex<HashMap<String, HashMap<String, HashSet<String>>>>,
    /// (contact's bare JID, local user) pairs made unavailable by a lost link, per
    /// remote node: probed again when the node's link is back.
    lost: Mutex<HashMap<String, HashSet<(String, String)>>>,
}

impl std::fmt::Debug for Links {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Links").finish_non_exhaustive()
    }
}

impl Links {
    /// Every link, outgoing then incoming, by node name.
    pub fn status(&self) -> Vec<LinkStatus> {
        let report = |node: &str,
                      cluster: &str,
                      direction: &'static str,
                      c: &LinkCounters,
                      queued: usize| LinkStatus {
            node: node.to_owned(),
            cluster: cluster.to_owned(),
            direction,
            up: c.up.load(Ordering::Relaxed),
            since: c.since.load(Ordering::Relaxed),
            stanzas: c.stanzas.load(Ordering::Relaxed),
            queued,
            last_error: lock(&c.last_error).clone(),
        };
        let mut out: Vec<LinkStatus> = lock(&self.outbound)
            .iter()
            .map(|(node, l)| {
                let queued = LINK_QUEUE - l.tx.capacity();
                report(node, &l.cluster, "out", &l.counters, queued)
            })
            .collect();
        let mut inbound: Vec<LinkStatus> = lock(&self.inbound)
            .iter()
            .map(|(node, (cluster, c))| report(node, cluster, "in", c, 0))
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
    #[error("{0}")]
    Setup(String),
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

    /// Where a user of the domain is homed when that is another cluster: (cluster,
    /// node). `None` for local and unknown users.
    pub(crate) async fn remote_home(&self, user: &str) -> Option<(String, String)> {
        match self.store.home_of(user).await {
            Ok(Some((cluster, node))) if cluster != self.config.cluster_name => {
                Some((cluster, node))
            }
            Ok(_) => None,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the directory while routing");
                None
            }
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

    /// Sends a stanza to a user homed on another cluster over the link to its home
    /// node. Returns false when the stanza was bounced (queue full) instead.
    pub(crate) fn forward(&self, cluster: &str, node: &str, stanza: &Element) -> bool {
        let xml: Arc<str> = String::from(stanza).into();
        let sent = {
            let mut outbound = lock(&self.links.outbound);
            let link = outbound.entry(node.to_owned()).or_insert_with(|| {
                let (tx, rx) = mpsc::channel(LINK_QUEUE);
                let counters = Arc::new(LinkCounters::default());
                if let Some(server) = self.me.upgrade() {
                    let (node, cluster, c) =
                        (node.to_owned(), cluster.to_owned(), counters.clone());
                    self.tasks
                        .spawn(async move { server.run_outlink(node, cluster, rx, c).await });
                }
                Outlink {
                    cluster: cluster.to_owned(),
                    tx,
                    counters,
                }
            });
            link.tx.try_send(xml).is_ok()
        };
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

    /// Routes a stanza to a remote user if the directory says the user lives on
    /// another cluster; returns whether it did.
    pub(crate) async fn route_remote(&self, user: &str, stanza: &Element) -> bool {
        match self.remote_home(user).await {
            Some((cluster, node)) => {
                self.forward(&cluster, &node, stanza);
                true
            }
            None => false,
        }
    }

    /// Keeps the link to `node` open while stanzas come for it: connects (retrying with
    /// a jittered exponential backoff capped at 30 s), writes what is queued in batches,
    /// keeps the link alive.
    async fn run_outlink(
        self: Arc<Self>,
        node: String,
        cluster: String,
        mut rx: mpsc::Receiver<Arc<str>>,
        counters: Arc<LinkCounters>,
    ) {
        let retry = backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(30))
            .with_jitter()
            .without_max_times();
        let mut delays = retry.build();
        // A batch whose write failed is written again first on the next link.
        let mut unsent: Vec<Arc<str>> = vec![];
        loop {
            let opened = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                o = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.open_link(&node, &cluster)) => o,
            };
            match opened.unwrap_or(Err(LinkError::Timeout)) {
                Ok(mut stream) => {
                    delays = retry.build();
                    counters.set_up(true);
                    *lock(&counters.last_error) = None;
                    tracing::info!(%node, %cluster, "router link up");
                    let result = self
                        .write_link(&mut stream, &mut rx, &mut unsent, &counters)
                        .await;
                    counters.set_up(false);
                    match result {
                        Ok(()) => {
                            let _ = stream.write_all(b"</stream:stream>").await;
                            let _ = stream.shutdown().await;
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
            let delay = delays.next().unwrap_or(Duration::from_secs(30));
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Connects to `node` of `cluster`, verifies it against the certificates pinned for
    /// the cluster (or the trusted CAs), presents ours, and exchanges stream headers.
    async fn open_link(
        &self,
        node: &str,
        cluster: &str,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, LinkError> {
        let setup = |m: String| LinkError::Setup(m);
        let target = self
            .store
            .peer_node(node)
            .await
            .map_err(|e| setup(e.to_string()))?
            .filter(|n| n.peer == cluster)
            .ok_or_else(|| setup(format!("{node} is not a known node of {cluster}")))?;
        if target.link_port == 0 {
            return Err(setup(format!("{node} does not accept router links")));
        }
        let anchors = self.trust_for(cluster).await?;
        let verifier = PeerVerifier::new(&anchors).map_err(|e| setup(e.to_string()))?;
        let config = {
            let identity = self
                .links
                .identity
                .read()
                .unwrap_or_else(|e| e.into_inner());
            let (identity, _) = identity
                .as_ref()
                .ok_or_else(|| setup("no node certificate for links".into()))?;
            identity
                .link_client_config(verifier)
                .map_err(|e| setup(e.to_string()))?
        };
        let tcp = TcpStream::connect((target.host.as_str(), target.link_port)).await?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from(node.to_owned())
            .map_err(|_| setup(format!("{node} is not a valid server name")))?;
        let mut tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await?;
        tls.write_all(header(&self.config.node_name, node).as_bytes())
            .await?;
        tls.flush().await?;
        let mut framer = Framer::new(MAX_LINK_STANZA);
        match read_frame(&mut tls, &mut framer).await? {
            Frame::Header(_) => Ok(tls),
            _ => Err(LinkError::Closed),
        }
    }

    /// What verifies a node of `cluster`: its pinned certificates and the trusted CAs.
    async fn trust_for(&self, cluster: &str) -> Result<TrustAnchors, LinkError> {
        let entries = self
            .store
            .trust_entries()
            .await
            .map_err(|e| LinkError::Setup(e.to_string()))?;
        let mut anchors = TrustAnchors::default();
        for entry in entries {
            match entry.kind {
                TrustKind::Pinned if entry.peer.as_deref() == Some(cluster) => {
                    anchors.pinned.insert(entry.fingerprint);
                }
                TrustKind::Pinned => {}
                _ => {
                    use rustls_pki_types::pem::PemObject as _;
                    if let Ok(der) =
                        rustls_pki_types::CertificateDer::from_pem_slice(entry.pem.as_bytes())
                    {
                        anchors.cas.push(der);
                    }
                }
            }
        }
        Ok(anchors)
    }

    /// Writes queued stanzas until the queue closes (`Ok`) or the link fails.
    async fn write_link<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
        rx: &mut mpsc::Receiver<Arc<str>>,
        unsent: &mut Vec<Arc<str>>,
        counters: &LinkCounters,
    ) -> Result<(), LinkError> {
        let mut framer = Framer::new(MAX_LINK_STANZA);
        let mut scratch = [0u8; 512];
        let mut out = String::new();
        loop {
            if !unsent.is_empty() {
                out.clear();
                for s in unsent.iter() {
                    out.push_str(s);
                }
                stream.write_all(out.as_bytes()).await?;
                stream.flush().await?;
                counters
                    .stanzas
                    .fetch_add(unsent.len() as u64, Ordering::Relaxed);
                unsent.clear();
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(()),
                next = rx.recv() => {
                    let Some(first) = next else { return Ok(()) };
                    unsent.push(first);
                    while unsent.len() < BATCH {
                        match rx.try_recv() {
                            Ok(s) => unsent.push(s),
                            Err(_) => break,
                        }
                    }
                }
                _ = tokio::time::sleep(KEEPALIVE) => {
                    stream.write_all(b" ").await?;
                    stream.flush().await?;
                }
                // The accepting side only ever closes the stream (or reports an error).
                n = stream.read(&mut scratch) => {
                    let n = n?;
                    if n == 0 {
                        return Err(LinkError::Closed);
                    }
                    let mut buf = &scratch[..n];
                    while let Some(frame) = framer.next_frame(&mut buf).map_err(LinkError::Stream)? {
                        if matches!(frame, Frame::Footer) {
                            return Err(LinkError::Closed);
                        }
                    }
                }
            }
        }
    }

    /// Accepts router links on `addr` until shutdown; returns the bound address.
    pub async fn listen_links(self: &Arc<Self>, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        tracing::info!(addr = %local, "listening for router links");
        let server = self.clone();
        self.tasks.spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = server.shutdown.cancelled() => break,
                    a = listener.accept() => a,
                };
                match accepted {
                    Ok((tcp, peer)) => {
                        let server2 = server.clone();
                        server.tasks.spawn(async move {
                            if let Err(e) = server2.serve_inlink(tcp).await {
                                tracing::warn!(%peer, error = %e, "router link refused or closed");
                            }
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed (links)");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        Ok(local)
    }

    /// One incoming link: mutual TLS, the certificate checked against the pinned
    /// certificates of accepted peers, headers, then stanzas until it closes.
    async fn serve_inlink(self: Arc<Self>, tcp: TcpStream) -> Result<(), LinkError> {
        let config = self
            .links
            .identity
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|(_, c)| c.clone())
            .ok_or_else(|| LinkError::Setup("no node certificate for links".into()))?;
        let _ = tcp.set_nodelay(true);
        let handshake = async {
            let mut tls = tokio_rustls::TlsAcceptor::from(config).accept(tcp).await?;
            let cluster = self.link_peer(&tls).await?;
            let mut framer = Framer::new(MAX_LINK_STANZA);
            let Frame::Header(header) = read_frame(&mut tls, &mut framer).await? else {
                return Err(LinkError::Closed);
            };
            let from = header.from.unwrap_or_default();
            tls.write_all(header_reply(&self.config.node_name, &from).as_bytes())
                .await?;
            tls.flush().await?;
            Ok::<_, LinkError>((tls, framer, cluster, from))
        };
        let (mut tls, mut framer, cluster, node) =
            tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
                .await
                .map_err(|_| LinkError::Timeout)??;
        let counters = Arc::new(LinkCounters::default());
        counters.set_up(true);
        lock(&self.links.inbound).insert(node.clone(), (cluster.clone(), counters.clone()));
        tracing::info!(%node, %cluster, "router link accepted");
        self.remote_node_back(&node).await;
        let result = self
            .read_inlink(&mut tls, &mut framer, &cluster, &node, &counters)
            .await;
        counters.set_up(false);
        self.remote_node_lost(&node);
        let _ = tls.write_all(b"</stream:stream>").await;
        let _ = tls.shutdown().await;
        result
    }

    /// The accepted peer cluster a link's client certificate is pinned for.
    async fn link_peer<IO>(
        &self,
        tls: &tokio_rustls::server::TlsStream<IO>,
    ) -> Result<String, LinkError> {
        let refuse = |why: String| LinkError::Setup(why);
        let cert = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or_else(|| refuse("no client certificate".into()))?;
        let fingerprint = impmesh_certs::fingerprint(cert);
        let entries = self
            .store
            .trust_entries()
            .await
            .map_err(|e| refuse(e.to_string()))?;
        let cluster = entries
            .into_iter()
            .find(|e| e.kind == TrustKind::Pinned && e.fingerprint == fingerprint)
            .and_then(|e| e.peer)
            .ok_or_else(|| {
                refuse(format!(
                    "certificate {fingerprint} is not pinned for any peer"
                ))
            })?;
        match self.store.peer(&cluster).await {
            Ok(Some(p)) if p.state == impmesh_store::PeerState::Active => Ok(cluster),
            Ok(_) => Err(refuse(format!("{cluster} is not an accepted peer"))),
            Err(e) => Err(refuse(e.to_string())),
        }
    }

    async fn read_inlink<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
        framer: &mut Framer,
        cluster: &str,
        node: &str,
        counters: &LinkCounters,
    ) -> Result<(), LinkError> {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(()),
                r = tokio::time::timeout(READ_TIMEOUT, stream.read(&mut buf)) => {
                    r.map_err(|_| LinkError::Timeout)??
                }
            };
            if n == 0 {
                return Err(LinkError::Closed);
            }
            let mut chunk = &buf[..n];
            while let Some(frame) = framer.next_frame(&mut chunk).map_err(LinkError::Stream)? {
                match frame {
                    Frame::Element(el) => {
                        counters.stanzas.fetch_add(1, Ordering::Relaxed);
                        self.on_link_stanza(cluster, node, el).await;
                    }
                    Frame::Footer => return Ok(()),
                    Frame::Header(_) => return Err(LinkError::Closed),
                }
            }
        }
    }

    /// A stanza that arrived over a link from `cluster`: checked, then handled as if a
    /// local user had sent it, never forwarded again.
    async fn on_link_stanza(&self, cluster: &str, node: &str, stanza: Element) {
        let Some(kind) = Kind::of(&stanza) else {
            tracing::warn!(%cluster, name = stanza.name(), "not a stanza on a router link; dropped");
            return;
        };
        let domain = self.config.domain.as_str();
        let from = stanza.attr("from").and_then(stanza::parse_jid);
        let sender_ok = match &from {
            Some(j) if j.domain().as_str() == domain => match j.node() {
                Some(user) => matches!(
                    self.store.home_of(user.as_str()).await,
                    Ok(Some((home, _))) if home == cluster
                ),
                None => false,
            },
            _ => false,
        };
        if !sender_ok {
            tracing::warn!(%cluster, from = ?stanza.attr("from"), "a stanza whose sender is not homed in the sending cluster; dropped");
            return;
        }
        let Some(to) = stanza.attr("to").and_then(stanza::parse_jid) else {
            return;
        };
        if to.domain().as_str() != domain || to.node().is_none() {
            self.bounce(&stanza, StanzaErrorCondition::ServiceUnavailable, None);
            return;
        }
        match kind {
            Kind::Message => self.deliver_local_message(stanza, &to).await,
            Kind::Iq => self.iq_from_link(stanza, &to).await,
            Kind::Presence => self.presence_from_link(node, stanza, &to).await,
        }
    }

    /// An IQ from a remote user: to a full JID it goes to that session; requests to a
    /// bare JID are answered for the account where this node can.
    async fn iq_from_link(&self, iq: Element, to: &Jid) {
        let is_request = matches!(iq.attr("type"), Some("get" | "set"));
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
            let delivered = target.is_some_and(|t| t.send(String::from(&iq).into()));
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
        let ping = iq
            .children()
            .next()
            .is_some_and(|p| p.is("ping", crate::xml::ns::PING));
        if exists && !blocked && ping && iq.attr("type") == Some("get") {
            let reply = format!(
                "<iq xmlns='jabber:client' type='result' id='{}' from='{}' to='{}'/>",
                escape(iq.attr("id").unwrap_or_default()),
                escape(iq.attr("to").unwrap_or_default()),
                escape(iq.attr("from").unwrap_or_default()),
            );
            if let Some(reply) = stanza::parse_own(&reply) {
                self.send_to_jid(&reply);
            }
            return;
        }
        // Other account queries across clusters (vCard, disco) come with federation's
        // next step; until then the protocol's own answer.
        self.bounce(&iq, StanzaErrorCondition::ServiceUnavailable, None);
    }

    /// Presence from a remote user (sent by `node`): available and unavailable presence
    /// reach the recipient's available resources (a full JID: that resource);
    /// subscription stanzas get the inbound half of RFC 6121 §3 here, the recipient's
    /// home; a probe is answered with the recipient's current presence when the sender
    /// is subscribed to it.
    async fn presence_from_link(&self, node: &str, presence: Element, to: &Jid) {
        let user = to.node().map(|n| n.to_string()).unwrap_or_default();
        let Some(from) = presence.attr("from").and_then(stanza::parse_jid) else {
            return;
        };
        let ty = stanza::stanza_type(&presence).to_owned();
        match ty.as_str() {
            "" | "unavailable" => {
                let xml: Arc<str> = String::from(&presence).into();
                let mut delivered = false;
                for s in self.hub.sessions(&user) {
                    let wanted = to
                        .resource()
                        .is_none_or(|r| r.as_str() == s.jid.resource().as_str());
                    if wanted && s.presence().available {
                        delivered |= s.send(xml.clone());
                    }
                }
                let mut seen = lock(&self.links.seen);
                let by_sender = seen.entry(node.to_owned()).or_default();
                let sender = from.to_string();
                if ty.is_empty() && delivered {
                    by_sender.entry(sender).or_default().insert(user);
                } else if let Some(users) = by_sender.get_mut(&sender) {
                    users.remove(&user);
                    if users.is_empty() {
                        by_sender.remove(&sender);
                    }
                }
            }
            "subscribe" | "subscribed" | "unsubscribe" | "unsubscribed" => {
                self.inbound_subscription(&to.to_bare(), &ty, &from.to_bare(), presence)
                    .await;
            }
            "probe" => {
                let from_bare = from.to_bare();
                let subscribed = matches!(
                    self.store.roster_item(&user, from_bare.as_str()).await,
                    Ok(Some(item)) if item.subscription.has_from()
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
            _ => {}
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

/// The stream header the opening node sends.
fn header(from: &str, to: &str) -> String {
    format!(
        "<?xml version='1.0'?><stream:stream xmlns='{LINK_NS}' \
         xmlns:stream='http://etherx.jabber.org/streams' version='1.0' from='{}' to='{}'>",
        escape(from),
        escape(to)
    )
}

/// The accepting node's answer.
fn header_reply(from: &str, to: &str) -> String {
    header(from, to)
}

/// Reads until the framer yields a frame.
async fn read_frame<S: AsyncRead + Unpin>(
    stream: &mut S,
    framer: &mut Framer,
) -> Result<Frame, LinkError> {
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(LinkError::Closed);
        }
        let mut chunk = &buf[..n];
        if let Some(frame) = framer.next_frame(&mut chunk).map_err(LinkError::Stream)? {
            // Headers come alone: the other side waits for ours before sending more.
            return Ok(frame);
        }
    }
}
