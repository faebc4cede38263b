//! The intercluster sync agent: one task per peer cluster pulls the peer's user
//! directory over the AXL-like API (a full listing first, then the changes since the
//! last USN applied) on a period and whenever the peer says it changed, and tells the
//! peers when this cluster changed. Peers are added with a channel-bound first contact
//! that exchanges and pins certificates both ways (see `impmesh_axl::client`).
//!
//! Every page is applied in one transaction together with the position it reached, so a
//! crash or a cut connection leaves the previous consistent state and the next attempt
//! resumes from the last applied USN. Failures are retried per peer with jittered
//! exponential backoff (backon), never holding up the other peers.

#![forbid(unsafe_code)]

pub mod dns;
mod watchdog;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::BackoffBuilder as _;
use impmesh_axl::client::{AxlClient, ClientError, OurSide, ServerTrust};
use impmesh_axl::soap::{ClusterInfo, Cursor, NodeCertificate, Request, Response, UserEntry};
use impmesh_certs::PeerVerifier;
use impmesh_store::{DirectoryEntry, PeerRecord, PeerState, Store, TrustKind};
use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The agent's settings (`[sync]` in the configuration).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Time between two periodic pulls of a peer.
    pub period: Duration,
    /// A periodic sync that has not completed for this long is stalled.
    pub stall_threshold: Duration,
    /// Restart what stalled, in-process.
    pub auto_recovery: bool,
    /// Users per `listUsers` page.
    pub page_size: u32,
    /// How often every DNS name of a peer (address, certificate SANs) is resolved again.
    pub dns_check_interval: Duration,
    /// The shortest time between two digest comparisons with a peer (anti-entropy);
    /// zero compares after every sync that found nothing new.
    pub anti_entropy_interval: Duration,
    /// Peers at most (a mesh is up to 30 clusters).
    pub max_peers: usize,
    /// The optional intercluster features this node announces and uses.
    pub features: Vec<String>,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            period: Duration::from_secs(60),
            stall_threshold: Duration::from_secs(7200),
            auto_recovery: true,
            page_size: 2000,
            dns_check_interval: Duration::from_secs(300),
            anti_entropy_interval: Duration::from_secs(600),
            max_peers: 29,
            features: impmesh_axl::features::announced(&[]),
        }
    }
}

/// This cluster, as the agent presents it to peers.
#[derive(Debug, Clone)]
pub struct Ours {
    pub cluster: String,
    /// The XMPP domain the mesh serves (a peer must serve the same).
    pub domain: String,
    /// host:port where peers reach this node's AXL endpoint.
    pub address: String,
    /// The TLS server name peers should ask for.
    pub server_name: String,
}

/// What a peer task last saw, for `peer status`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LiveStatus {
    /// connecting, syncing, in-sync, failed, pending
    pub state: String,
    /// Why it failed, when it did.
    pub reason: Option<String>,
    pub last_attempt_at: Option<i64>,
    pub last_success_at: Option<i64>,
    pub consecutive_failures: u32,
    /// in-sync, out-of-sync, failed (or unknown before the first contact)
    pub certificate_status: String,
    pub certificate_reason: Option<String>,
    /// The node fingerprints the peer announced last.
    pub peer_fingerprints: Vec<String>,
    /// The peer's USN when last asked.
    pub peer_usn: Option<i64>,
    /// How many users the peer has, by its last listing.
    pub peer_users: Option<i64>,
    /// The peer's clock minus ours, seconds (from its last answer's `Date`).
    pub clock_skew_secs: Option<i64>,
    /// The intercluster protocol version the peer speaks, and its optional features.
    pub peer_protocol: Option<u32>,
    pub peer_features: Vec<String>,
    /// Features this node uses that the peer does not announce (not used with it).
    pub missing_features: Vec<String>,
    /// Every DNS name of the peer (its address, its certificates' SANs): resolved now,
    /// or failing (with the last good addresses still in use).
    pub dns: Vec<dns::NameStatus>,
    /// Directory entries of the peer refused since the task started: a user homed
    /// elsewhere than the peer or its nodes, or an invalid name (see the log).
    pub refused_entries: u64,
    /// The peer's USN applied to our directory, and the peer's users in it, after the
    /// last sync (for `/metrics`: kept here, not read from the store per scrape).
    pub applied_usn: Option<i64>,
    pub users_here: Option<i64>,
}

/// One check of the troubleshooter.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    /// What was found (the reason when not ok).
    pub detail: String,
}

/// The shortest time between two duplicate checks.
pub const DUPLICATE_CHECK_SPACING: Duration = Duration::from_secs(1);

/// What a duplicate check must look at.
#[derive(Debug, Clone)]
pub enum DuplicateScope {
    /// The whole directory.
    All,
    /// The users of this peer's slice (after a full sync of it).
    Peer(String),
    /// These user names (after changes to them, here or at a peer).
    Users(Vec<String>),
}

/// The scopes asked for since the last check, merged.
#[derive(Debug, Default)]
struct PendingDuplicateCheck {
    all: bool,
    peers: std::collections::BTreeSet<String>,
    names: std::collections::BTreeSet<String>,
}

/// Clock skew beyond which the troubleshooter complains, seconds.
pub const MAX_CLOCK_SKEW: i64 = 60;

/// Everything `peer status` shows about one peer.
#[derive(Debug, Clone, Serialize)]
pub struct PeerStatus {
    pub cluster: String,
    pub address: String,
    pub state: PeerState,
    pub added_here: bool,
    pub added_at: i64,
    pub accepted_at: Option<i64>,
    /// Users of the peer in our directory.
    pub associated_users: i64,
    pub sync: impmesh_store::PeerSync,
    pub live: LiveStatus,
    /// Pinned certificates of the peer.
    pub pinned: Vec<String>,
    /// Times the stall watchdog restarted this peer's sync.
    pub stall_restarts: u32,
}

/// Why an admin action on peers failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("no peer {0}")]
    UnknownPeer(String),
    #[error("{0}")]
    Invalid(String),
    #[error("the first contact with {addr} failed: {source}")]
    Contact { addr: String, source: ClientError },
    #[error(transparent)]
    Store(#[from] impmesh_store::StoreError),
}

struct PeerHandle {
    nudge: Arc<Notify>,
    cancel: CancellationToken,
    status: Arc<Mutex<LiveStatus>>,
    progress: Arc<Mutex<Progress>>,
}

/// What the stall watchdog reads from a peer task.
#[derive(Debug)]
struct Progress {
    /// When the last sync completed (or the task started).
    last_completed: tokio::time::Instant,
    /// When an attempt last started or ended (or the task started): a task that is
    /// failing is active, a hung one is not.
    last_activity: tokio::time::Instant,
    /// Whether the stall alarm is raised for this peer.
    alarmed: bool,
    /// When the peer's DNS names were last resolved.
    last_dns_check: Option<Instant>,
    /// When our copy of the peer's users was last known equal to the peer's directory:
    /// a full sync, or a digest comparison.
    last_compared: Option<Instant>,
    /// The last comparison found our copy different (a resync is under way; the next
    /// sync compares again, to clear the alarm).
    mismatched: bool,
}

/// The running agent of one node.
pub struct Agent {
    store: Store,
    settings: Settings,
    ours: Ours,
    peers: Mutex<HashMap<String, PeerHandle>>,
    /// Name resolution with the last good answers.
    dns: dns::Dns,
    /// The node's certificate and key, presented to peers as the TLS client
    /// certificate (it proves which certificate a peer may pin for us).
    identity: std::sync::RwLock<Option<impmesh_certs::NodeIdentity>>,
    /// One page applied at a time per node: many peers syncing at once then queue here
    /// instead of on the store's write lock (SQLite has one writer).
    apply_lock: tokio::sync::Mutex<()>,
    /// Wakes the duplicate checker (see [`Agent::request_duplicate_check`]).
    duplicates: Notify,
    /// What the next duplicate check looks at.
    duplicate_scope: Mutex<PendingDuplicateCheck>,
    /// Failed sync attempts in a row per peer (kept across task restarts).
    failures: Mutex<HashMap<String, u32>>,
    /// The stall watchdog's decisions and memory (see [`watchdog`]).
    watchdog: Mutex<watchdog::Watchdog>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Agent {
    /// Starts the agent: one task per active peer of the store.
    pub async fn start(
        store: Store,
        settings: Settings,
        ours: Ours,
    ) -> Result<Arc<Agent>, AgentError> {
        let agent = Arc::new(Agent {
            store: store.clone(),
            settings,
            ours,
            peers: Mutex::new(HashMap::new()),
            dns: dns::Dns::new(store.clone(), system_dns()),
            identity: std::sync::RwLock::new(None),
            apply_lock: tokio::sync::Mutex::new(()),
            duplicates: Notify::new(),
            duplicate_scope: Mutex::new(PendingDuplicateCheck::default()),
            failures: Mutex::new(HashMap::new()),
            watchdog: Mutex::new(watchdog::Watchdog::default()),
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
        });
        for peer in agent.store.peers().await? {
            if peer.state == PeerState::Active {
                agent.spawn_peer(&peer.cluster, false);
            }
        }
        let watchdog = agent.clone();
        agent
            .tracker
            .spawn(async move { watchdog.watch_stalls().await });
        let checker = agent.clone();
        agent
            .tracker
            .spawn(async move { checker.check_duplicates_when_asked().await });
        agent.request_duplicate_check(DuplicateScope::All);
        Ok(agent)
    }

    /// The stall watchdog: every tick, [`watchdog::Watchdog`] decides from each peer
    /// task's progress which peers get the stall alarm and whose task is restarted (see
    /// the module for the rules); this loop carries it out.
    async fn watch_stalls(self: Arc<Self>) {
        let threshold = self.settings.stall_threshold;
        let tick = (threshold / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(tick) => {}
            }
            let views: Vec<watchdog::PeerView> = lock(&self.peers)
                .iter()
                .map(|(cluster, h)| {
                    let p = lock(&h.progress);
                    watchdog::PeerView {
                        cluster: cluster.clone(),
                        last_completed: p.last_completed,
                        last_activity: p.last_activity,
                        alarmed: p.alarmed,
                    }
                })
                .collect();
            let actions = lock(&self.watchdog).tick(
                tokio::time::Instant::now(),
                &views,
                threshold,
                self.settings.auto_recovery,
            );
            for action in actions {
                match action {
                    watchdog::Action::Alarm { cluster, idle } => {
                        let reason = lock(&self.peers)
                            .get(&cluster)
                            .and_then(|h| lock(&h.status).reason.clone());
                        let message = format!(
                            "no sync with {cluster} completed for {} s{}",
                            idle.as_secs(),
                            reason.map(|r| format!(": {r}")).unwrap_or_default()
                        );
                        if let Err(e) = self
                            .store
                            .raise_alarm(
                                impmesh_store::alarms::PEER_SYNC_STALLED,
                                &cluster,
                                &message,
                            )
                            .await
                        {
                            tracing::error!(error = %e, "cannot raise the stall alarm");
                        }
                        if let Some(h) = lock(&self.peers).get(&cluster) {
                            lock(&h.progress).alarmed = true;
                        }
                    }
                    watchdog::Action::RestartPeer(cluster) => {
                        tracing::warn!(peer = %cluster, "the peer's sync stalled: restarting its task (only)");
                        self.restart_peer(&cluster);
                    }
                    watchdog::Action::RestartAll => {
                        tracing::warn!(
                            "a peer's task hung again after its own restart: restarting the whole sync agent"
                        );
                        let all: Vec<String> = lock(&self.peers).keys().cloned().collect();
                        for c in all {
                            self.restart_peer(&c);
                        }
                    }
                }
            }
        }
    }

    /// Replaces a peer's task with a fresh one, keeping whether the alarm is raised.
    fn restart_peer(self: &Arc<Self>, cluster: &str) {
        let alarmed = match lock(&self.peers).remove(cluster) {
            Some(handle) => {
                handle.cancel.cancel();
                lock(&handle.progress).alarmed
            }
            None => return,
        };
        self.spawn_peer(cluster, alarmed);
    }

    /// Stops every peer task.
    pub async fn shutdown(&self) {
        self.stop();
        self.stopped().await;
    }

    /// Begins stopping: peer tasks end at their next await.
    pub fn stop(&self) {
        self.shutdown.cancel();
        self.tracker.close();
    }

    /// Resolves once every task of the agent has ended (after [`Self::stop`]).
    pub async fn stopped(&self) {
        self.tracker.wait().await;
    }

    /// Starts the task of `cluster` unless it runs.
    fn spawn_peer(self: &Arc<Self>, cluster: &str, alarmed: bool) {
        let mut peers = lock(&self.peers);
        if peers.contains_key(cluster) {
            return;
        }
        let handle = PeerHandle {
            nudge: Arc::new(Notify::new()),
            cancel: self.shutdown.child_token(),
            status: Arc::new(Mutex::new(LiveStatus {
                state: "connecting".into(),
                certificate_status: "unknown".into(),
                ..LiveStatus::default()
            })),
            progress: Arc::new(Mutex::new(Progress {
                last_completed: tokio::time::Instant::now(),
                last_activity: tokio::time::Instant::now(),
                alarmed,
                last_dns_check: None,
                last_compared: None,
                mismatched: false,
            })),
        };
        let task = PeerTask {
            agent: self.clone(),
            cluster: cluster.to_owned(),
            nudge: handle.nudge.clone(),
            cancel: handle.cancel.clone(),
            status: handle.status.clone(),
            progress: handle.progress.clone(),
            alarms: Arc::new(Mutex::new(HashMap::new())),
        };
        // Sync at once.
        handle.nudge.notify_one();
        peers.insert(cluster.to_owned(), handle);
        self.tracker.spawn(task.run());
    }

    fn stop_peer(&self, cluster: &str) {
        if let Some(handle) = lock(&self.peers).remove(cluster) {
            handle.cancel.cancel();
        }
    }

    /// Presents `identity` to peers from now on (at start, and after the node's
    /// certificate changed).
    pub fn set_identity(&self, identity: impmesh_certs::NodeIdentity) {
        *self.identity.write().unwrap_or_else(|e| e.into_inner()) = Some(identity);
    }

    fn identity(&self) -> Result<impmesh_certs::NodeIdentity, AgentError> {
        self.identity
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| AgentError::Invalid("the node has no certificate yet".into()))
    }

    /// Announces this node's new certificate to `cluster` over the channel it already
    /// trusts (its pinned certificate, the credential it issued to us), presenting the
    /// new certificate as the TLS client certificate so that the peer can pin it
    /// (make-before-break: the peer keeps the old pin). The peering's credentials are
    /// renewed on the way. Ok means the peer pinned it.
    pub async fn announce_certificate(
        &self,
        cluster: &str,
        new: &impmesh_certs::NodeIdentity,
    ) -> Result<(), AgentError> {
        let Some(peer) = self.store.peer(cluster).await? else {
            return Err(AgentError::UnknownPeer(cluster.to_owned()));
        };
        let token = peer
            .our_token
            .clone()
            .ok_or_else(|| AgentError::Invalid(format!("no credential for {cluster}")))?;
        let contact = |source| AgentError::Contact {
            addr: peer.address.clone(),
            source,
        };
        let anchors = self.store.trust_anchors(Some(cluster)).await?;
        let verifier =
            PeerVerifier::new(&anchors).map_err(|e| AgentError::Invalid(e.to_string()))?;
        let mut client = self
            .connect_to_as(
                &peer.address,
                &peer.server_name,
                ServerTrust::Verified(verifier),
                Some(new),
            )
            .await
            .map_err(contact)?;
        client
            .use_peer_token(&self.ours.cluster, &token)
            .map_err(contact)?;
        let (chain, _) = new.client_auth();
        let leaf = chain
            .first()
            .ok_or_else(|| AgentError::Invalid("the new certificate has no chain".into()))?;
        let issued = impmesh_axl::auth::random_token();
        let request = Request::ExchangeCertificates {
            cluster: self.ours.cluster.clone(),
            address: self.ours.address.clone(),
            server_name: self.ours.server_name.clone(),
            token: issued.clone(),
            certificates: vec![NodeCertificate {
                node: self.ours.server_name.clone(),
                fingerprint: new.fingerprint(),
                pem: impmesh_certs::pem_encode("CERTIFICATE", leaf.as_ref()),
            }],
        };
        let Response::Exchanged { token, .. } = client.call(&request).await.map_err(contact)?
        else {
            return Err(AgentError::Invalid(
                "exchangeCertificates answered with something else".into(),
            ));
        };
        self.store
            .upsert_peer(&PeerRecord {
                our_token: Some(token),
                their_token_hash: Some(impmesh_axl::auth::token_hash(&issued)),
                ..peer
            })
            .await?;
        tracing::info!(peer = %cluster, sha256 = %new.fingerprint(), "the peer pinned our new certificate");
        Ok(())
    }

    /// The addresses of `host` as the agent resolves peers' names: DNS, or during an
    /// outage the last good answer (what router links use too).
    pub async fn resolve_host(&self, host: &str) -> Vec<std::net::IpAddr> {
        self.dns
            .resolve(host)
            .await
            .addresses
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect()
    }

    /// Uses another name resolver from now on (tests, embedding).
    pub fn set_resolver(&self, resolver: Arc<dyn dns::NameResolver>) {
        self.dns.set_resolver(resolver);
    }

    /// Connects to `address` (host:port): the host resolved through [`dns::Dns`] (the
    /// last good answer during a DNS outage), each address tried in turn.
    async fn connect_to(
        &self,
        address: &str,
        server_name: &str,
        trust: ServerTrust,
    ) -> Result<AxlClient, ClientError> {
        self.connect_to_as(address, server_name, trust, None).await
    }

    /// [`Agent::connect_to`] presenting `identity` as the TLS client certificate.
    async fn connect_to_as(
        &self,
        address: &str,
        server_name: &str,
        trust: ServerTrust,
        identity: Option<&impmesh_certs::NodeIdentity>,
    ) -> Result<AxlClient, ClientError> {
        let Some((host, port)) = split_host_port(address) else {
            return Err(ClientError::Protocol(format!(
                "{address:?} is not host:port"
            )));
        };
        let name = self.dns.resolve(host).await;
        if name.addresses.is_empty() {
            return Err(ClientError::Protocol(format!(
                "cannot resolve {host}: {}",
                name.error.unwrap_or_default()
            )));
        }
        if let Some(e) = &name.error {
            tracing::info!(%host, error = %e, addresses = ?name.addresses, "DNS failed; using the last good addresses");
        }
        let mut last = None;
        for ip in &name.addresses {
            let target = match ip.parse::<std::net::IpAddr>() {
                Ok(ip) => std::net::SocketAddr::new(ip, port).to_string(),
                Err(_) => continue,
            };
            match AxlClient::connect_as(&target, server_name, trust.clone(), identity).await {
                Ok(c) => return Ok(c),
                Err(e @ ClientError::Connect(..)) | Err(e @ ClientError::Timeout(_)) => {
                    last = Some(e)
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| ClientError::Protocol(format!("no usable address for {host}"))))
    }

    /// Resolves every DNS name of a peer: its address's host and the SANs of its
    /// pinned certificates.
    async fn resolve_peer_names(&self, cluster: &str, address: &str) -> Vec<dns::NameStatus> {
        let mut names: Vec<String> = vec![];
        if let Some((host, _)) = split_host_port(address)
            && host.parse::<std::net::IpAddr>().is_err()
        {
            names.push(host.to_owned());
        }
        if let Ok(entries) = self.store.trust_entries().await {
            for entry in entries
                .iter()
                .filter(|e| e.kind == TrustKind::Pinned && e.peer.as_deref() == Some(cluster))
            {
                let pem = entry.pem.as_bytes();
                let der = rustls_pki_types::pem::PemObject::from_pem_slice(pem);
                let Ok(der): Result<rustls_pki_types::CertificateDer<'static>, _> = der else {
                    continue;
                };
                if let Ok(info) = impmesh_certs::describe(&der) {
                    for san in info.sans.iter().filter_map(|s| s.strip_prefix("DNS:")) {
                        if impmesh_certs::is_dns_name(san)
                            && !san.starts_with("*.")
                            && !names.iter().any(|n| n == san)
                        {
                            names.push(san.to_owned());
                        }
                    }
                }
            }
        }
        let mut out = vec![];
        for name in names {
            out.push(self.dns.resolve(&name).await);
        }
        out
    }

    /// Asks the task of `cluster` to pull now (a `notifyChange` from it).
    pub fn nudge(&self, cluster: &str) {
        if let Some(handle) = lock(&self.peers).get(cluster) {
            handle.nudge.notify_one();
        }
    }

    /// `peer add`: the channel-bound first contact with the AXL endpoint at `address`
    /// (host or host:port, default port 8443) as `user`, then syncing from it. The peer
    /// records us as a pending peer until its admin accepts.
    pub async fn add_peer(
        self: &Arc<Self>,
        address: &str,
        user: &str,
        password: &str,
    ) -> Result<PeerRecord, AgentError> {
        let (addr, server_name) = normalize_address(address)?;
        let peers = self.store.peers().await?;
        if peers.len() >= self.settings.max_peers && !peers.iter().any(|p| p.address == addr) {
            return Err(AgentError::Invalid(format!(
                "this cluster already has {} peers, the most it takes ([sync] max_peers; a mesh is at most 30 clusters)",
                peers.len()
            )));
        }
        let peering = self
            .first_contact(&addr, &server_name, user, password, None)
            .await?;
        let cluster = peering.0.cluster.clone();
        let now = impmesh_store::now_unix();
        let record = PeerRecord {
            cluster: cluster.clone(),
            address: addr,
            server_name,
            state: PeerState::Active,
            added_here: true,
            our_token: Some(peering.1),
            their_token_hash: Some(peering.2),
            added_at: now,
            accepted_at: Some(now),
        };
        self.store.upsert_peer(&record).await?;
        // An earlier pending record keeps its origin; make it active.
        self.store.accept_peer(&cluster).await?;
        self.clear_alarm(
            impmesh_store::alarms::PEER_PENDING,
            &cluster,
            "added here too",
        )
        .await;
        self.spawn_peer(&cluster, false);
        tracing::info!(peer = %cluster, address = %record.address, "peer added");
        Ok(self.store.peer(&cluster).await?.unwrap_or(record))
    }

    /// Runs the first contact (as the existing peering when `peer_token` is given);
    /// returns the peer's cluster info, the token to call it with, the hash of the
    /// token we issued to it, and the certificates the peer listed.
    async fn first_contact(
        &self,
        addr: &str,
        server_name: &str,
        user: &str,
        password: &str,
        peer_token: Option<&str>,
    ) -> Result<(ClusterInfo, String, String, Vec<NodeCertificate>), AgentError> {
        let issued = impmesh_axl::auth::random_token();
        let identity = self.identity()?;
        let ours = OurSide {
            domain: self.ours.domain.clone(),
            cluster: self.ours.cluster.clone(),
            address: self.ours.address.clone(),
            server_name: self.ours.server_name.clone(),
            token: issued.clone(),
            certificates: self.our_certificates().await?,
        };
        let contact = |source| AgentError::Contact {
            addr: addr.to_owned(),
            source,
        };
        let (host, port) = split_host_port(addr)
            .ok_or_else(|| AgentError::Invalid(format!("{addr:?} is not host:port")))?;
        let resolved = self.dns.resolve(host).await;
        let target = resolved
            .addresses
            .first()
            .and_then(|ip| ip.parse::<std::net::IpAddr>().ok())
            .map(|ip| std::net::SocketAddr::new(ip, port).to_string())
            .ok_or_else(|| {
                AgentError::Invalid(format!(
                    "cannot resolve {host}: {}",
                    resolved.error.clone().unwrap_or_default()
                ))
            })?;
        let def = impmesh_store::alarms::CERT_EXCHANGE_FAILED;
        let peering = match impmesh_axl::client::exchange_certificates(
            &self.store,
            &target,
            server_name,
            (user, password),
            ours,
            &identity,
            peer_token,
        )
        .await
        {
            Ok(p) => p,
            Err(e) => {
                let message = format!("with {addr} as {user}: {e}");
                self.set_alarm(def, addr, Some(&message)).await;
                return Err(contact(e));
            }
        };
        self.clear_alarm(def, addr, "an exchange succeeded").await;
        Ok((
            peering.info,
            peering.token,
            impmesh_axl::auth::token_hash(&issued),
            peering.certificates,
        ))
    }

    /// Asks for a duplicate check of `scope` soon. Checks run one at a time, at most
    /// one per [`DUPLICATE_CHECK_SPACING`]; requests made meanwhile fold into the next
    /// one. A check looks only at what the scope could have changed (one peer's slice,
    /// a few names) plus the duplicates already alarmed, so a cold start's 29 full
    /// syncs cost 29 probes of 15,000 names, not 29 scans of the whole directory.
    pub fn request_duplicate_check(&self, scope: DuplicateScope) {
        {
            let mut pending = lock(&self.duplicate_scope);
            match scope {
                DuplicateScope::All => pending.all = true,
                DuplicateScope::Peer(p) => {
                    pending.peers.insert(p);
                }
                DuplicateScope::Users(names) => pending.names.extend(names),
            }
        }
        self.duplicates.notify_one();
    }

    async fn check_duplicates_when_asked(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = self.duplicates.notified() => {}
            }
            let pending = std::mem::take(&mut *lock(&self.duplicate_scope));
            if pending.all {
                self.check_duplicates().await;
            } else {
                self.check_duplicates_among(pending).await;
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(DUPLICATE_CHECK_SPACING) => {}
            }
        }
    }

    /// Raises `InterClusterDuplicateUser` for every user homed in more than one cluster
    /// and clears it for those fixed, over the whole directory. Runs at start, after a
    /// peer is removed, and when asked with [`DuplicateScope::All`].
    pub async fn check_duplicates(&self) {
        match self.store.duplicate_users().await {
            Ok(dups) => self.alarm_duplicates(&dups, None).await,
            Err(e) => tracing::error!(error = %e, "cannot check for duplicate users"),
        }
    }

    /// The scoped check: the users of the peers whose slice was replaced that someone
    /// else claims too, the names that changed, and the duplicates already alarmed.
    async fn check_duplicates_among(&self, pending: PendingDuplicateCheck) {
        let mut names = pending.names;
        for peer in &pending.peers {
            match self.store.claimed_elsewhere(peer).await {
                Ok(claimed) => names.extend(claimed),
                Err(e) => {
                    tracing::error!(error = %e, "cannot check for duplicate users");
                    return;
                }
            }
        }
        let def = impmesh_store::alarms::DUPLICATE_USER;
        match self.store.active_alarms().await {
            Ok(active) => names.extend(
                active
                    .into_iter()
                    .filter(|a| a.name == def.name)
                    .map(|a| a.subject),
            ),
            Err(e) => {
                tracing::error!(error = %e, "cannot check for duplicate users");
                return;
            }
        }
        let names: Vec<String> = names.into_iter().collect();
        match self.store.duplicates_among(&names).await {
            Ok(dups) => self.alarm_duplicates(&dups, Some(&names)).await,
            Err(e) => tracing::error!(error = %e, "cannot check for duplicate users"),
        }
    }

    /// Raises the alarm for `dups` and clears it for every alarmed user not among them
    /// (of those `checked`, or of all when the whole directory was checked).
    async fn alarm_duplicates(
        &self,
        dups: &[(String, Vec<(String, String)>)],
        checked: Option<&[String]>,
    ) {
        let def = impmesh_store::alarms::DUPLICATE_USER;
        let active = match self.store.active_alarms().await {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(error = %e, "cannot check for duplicate users");
                return;
            }
        };
        for (user, homes) in dups {
            let list: Vec<String> = homes.iter().map(|(c, n)| format!("{c} ({n})")).collect();
            let message = format!(
                "{user} is homed in {}; routed to {} (the first cluster name) until fixed",
                list.join(" and "),
                homes[0].0
            );
            self.set_alarm(def, user, Some(&message)).await;
        }
        for alarm in active.iter().filter(|a| a.name == def.name) {
            let in_scope = checked.is_none_or(|names| names.contains(&alarm.subject));
            if in_scope && !dups.iter().any(|(u, _)| *u == alarm.subject) {
                self.clear_alarm(def, &alarm.subject, "no longer homed twice")
                    .await;
            }
        }
    }

    /// The System Troubleshooter: every check with pass/fail and what it found.
    pub async fn troubleshoot(&self) -> Result<Vec<Check>, AgentError> {
        fn check(name: &'static str, problems: Vec<String>, fine: String) -> Check {
            Check {
                name,
                ok: problems.is_empty(),
                detail: if problems.is_empty() {
                    fine
                } else {
                    problems.into_iter().take(20).collect::<Vec<_>>().join("; ")
                },
            }
        }
        let mut checks = vec![];
        let dups = self.store.duplicate_users().await?;
        checks.push(check(
            "no user is homed in two clusters",
            dups.iter()
                .map(|(u, homes)| {
                    let list: Vec<&str> = homes.iter().map(|h| h.0.as_str()).collect();
                    format!("{u}: {}", list.join(", "))
                })
                .collect(),
            "none".into(),
        ));
        let nodes: Vec<String> = self
            .store
            .cluster_nodes(&self.ours.cluster)
            .await?
            .into_iter()
            .map(|n| n.name)
            .collect();
        checks.push(check(
            "every local user has a valid home node",
            self.store
                .list_users()
                .await?
                .into_iter()
                .filter(|u| u.home_cluster != self.ours.cluster || !nodes.contains(&u.home_node))
                .map(|u| {
                    format!(
                        "{}: no node {} in {}",
                        u.username, u.home_node, u.home_cluster
                    )
                })
                .collect(),
            format!(
                "all on nodes of {} ({})",
                self.ours.cluster,
                nodes.join(", ")
            ),
        ));
        let status = self.status().await?;
        checks.push(check(
            "no peer is configured on one side only",
            status
                .iter()
                .filter(|p| p.state == PeerState::Pending)
                .map(|p| {
                    format!(
                        "{} added us and is not accepted here (impmesh peer accept)",
                        p.cluster
                    )
                })
                .collect(),
            "none".into(),
        ));
        let active: Vec<&PeerStatus> = status
            .iter()
            .filter(|p| p.state == PeerState::Active)
            .collect();
        let reason =
            |r: &Option<String>| r.as_deref().map(|r| format!(" ({r})")).unwrap_or_default();
        checks.push(check(
            "every peer is in sync",
            active
                .iter()
                .filter(|p| {
                    p.live.state != "in-sync"
                        || p.live.peer_users.is_some_and(|n| n != p.associated_users)
                })
                .map(|p| format!("{}: {}{}", p.cluster, p.live.state, reason(&p.live.reason)))
                .collect(),
            format!("{} peer(s) in sync", active.len()),
        ));
        checks.push(check(
            "peer certificates match the pinned ones",
            active
                .iter()
                .filter(|p| p.live.certificate_status != "in-sync")
                .map(|p| {
                    format!(
                        "{}: {}{}",
                        p.cluster,
                        p.live.certificate_status,
                        reason(&p.live.certificate_reason)
                    )
                })
                .collect(),
            "all in sync".into(),
        ));
        checks.push(check(
            "every DNS name of every peer resolves",
            active
                .iter()
                .flat_map(|p| {
                    p.live.dns.iter().filter(|n| !n.ok).map(|n| {
                        format!(
                            "{}: {} does not resolve ({}){}",
                            p.cluster,
                            n.name,
                            n.error.as_deref().unwrap_or("no answer"),
                            if n.addresses.is_empty() {
                                String::new()
                            } else {
                                format!("; still using {}", n.addresses.join(", "))
                            }
                        )
                    })
                })
                .collect(),
            "all resolve".into(),
        ));
        checks.push(check(
            "peer clocks within 60 s of ours",
            active
                .iter()
                .filter_map(|p| {
                    p.live
                        .clock_skew_secs
                        .filter(|s| s.abs() > MAX_CLOCK_SKEW)
                        .map(|s| format!("{}: {s:+} s", p.cluster))
                })
                .collect(),
            "all within 60 s".into(),
        ));
        checks.push(check(
            "this node's certificates are valid for more than 30 days",
            self.store
                .active_alarms()
                .await?
                .into_iter()
                .filter(|a| a.name.starts_with("NodeCertificate"))
                .map(|a| format!("{}: {}", a.name, a.message))
                .collect(),
            "yes".into(),
        ));
        Ok(checks)
    }

    /// Clears an alarm, logging a store failure instead of failing the caller.
    pub(crate) async fn clear_alarm(
        &self,
        def: &impmesh_store::alarms::AlarmDef,
        subject: &str,
        why: &str,
    ) {
        if let Err(e) = self.store.clear_alarm(def, subject, why).await {
            tracing::error!(alarm = def.name, error = %e, "cannot clear an alarm");
        }
    }

    /// Raises or clears an alarm, logging a store failure instead of failing the caller.
    async fn set_alarm(
        &self,
        def: &impmesh_store::alarms::AlarmDef,
        subject: &str,
        on: Option<&str>,
    ) {
        let result = match on {
            Some(message) => self.store.raise_alarm(def, subject, message).await,
            None => {
                self.store
                    .clear_alarm(def, subject, "no longer applies")
                    .await
            }
        };
        if let Err(e) = result {
            tracing::error!(alarm = def.name, error = %e, "cannot update an alarm");
        }
    }

    /// This cluster's node certificates, as published in the store.
    async fn our_certificates(&self) -> Result<Vec<NodeCertificate>, AgentError> {
        Ok(self
            .store
            .cluster_nodes(&self.ours.cluster)
            .await?
            .into_iter()
            .filter(|n| !n.cert_pem.is_empty())
            .map(|n| NodeCertificate {
                node: n.name,
                fingerprint: n.fingerprint,
                pem: n.cert_pem,
            })
            .collect())
    }

    /// `peer accept`: starts syncing from a peer that added us.
    pub async fn accept_peer(self: &Arc<Self>, cluster: &str) -> Result<(), AgentError> {
        if !self.store.accept_peer(cluster).await? {
            return Err(AgentError::UnknownPeer(cluster.to_owned()));
        }
        self.clear_alarm(impmesh_store::alarms::PEER_PENDING, cluster, "accepted")
            .await;
        self.spawn_peer(cluster, false);
        tracing::info!(peer = %cluster, "peer accepted");
        Ok(())
    }

    /// `peer del`: stops syncing and removes the peer, its users and its pinned
    /// certificates at once.
    ///
    /// A peer that announces `peer-removal` is told first (with its own credential,
    /// so that it shows us as removed at once); one that does not (an older release,
    /// or the feature turned off there) finds out at its next sync, as an
    /// authentication alarm. Returns whether the peer was told.
    pub async fn delete_peer(&self, cluster: &str) -> Result<bool, AgentError> {
        let Some(peer) = self.store.peer(cluster).await? else {
            return Err(AgentError::UnknownPeer(cluster.to_owned()));
        };
        let speaks_removal = lock(&self.peers).get(cluster).is_some_and(|h| {
            lock(&h.status)
                .peer_features
                .iter()
                .any(|f| f == impmesh_axl::features::PEER_REMOVAL)
        }) && self
            .settings
            .features
            .iter()
            .any(|f| f == impmesh_axl::features::PEER_REMOVAL);
        let told = if speaks_removal && peer.state != PeerState::Removed {
            let call = async {
                let mut client = self.connect(cluster).await?;
                client
                    .call(&Request::RemovePeer {
                        cluster: self.ours.cluster.clone(),
                    })
                    .await
                    .map_err(SyncError::Client)
            };
            match tokio::time::timeout(Duration::from_secs(10), call).await {
                Ok(Ok(_)) => true,
                Ok(Err(e)) => {
                    tracing::warn!(peer = %cluster, error = %e, "could not tell the peer it was removed; it finds out at its next sync");
                    false
                }
                Err(_) => {
                    tracing::warn!(peer = %cluster, "the peer did not answer removePeer in time; it finds out at its next sync");
                    false
                }
            }
        } else {
            false
        };
        self.stop_peer(cluster);
        lock(&self.watchdog).forget(cluster);
        if !self.store.delete_peer(cluster).await? {
            return Err(AgentError::UnknownPeer(cluster.to_owned()));
        }
        for def in [
            impmesh_store::alarms::PEER_PENDING,
            impmesh_store::alarms::PEER_CERT_OUT_OF_SYNC,
            impmesh_store::alarms::PEER_SYNC_STALLED,
            impmesh_store::alarms::PEER_UNREACHABLE,
            impmesh_store::alarms::PEER_AUTH_FAILED,
            impmesh_store::alarms::PEER_DNS_FAILURE,
            impmesh_store::alarms::PEER_CLOCK_SKEW,
            impmesh_store::alarms::DIRECTORY_MISMATCH,
        ] {
            self.clear_alarm(def, cluster, "the peer was removed").await;
        }
        self.clear_alarm(
            impmesh_store::alarms::PEER_REMOVED_US,
            cluster,
            "removed here too",
        )
        .await;
        self.request_duplicate_check(DuplicateScope::All);
        tracing::info!(peer = %cluster, told, "peer deleted");
        Ok(told)
    }

    /// A peer told us (authenticated as itself) that it removed this cluster: its
    /// sync stops, its users leave the directory, it shows as `removed`, and
    /// `InterClusterPeerRemoved` says what to do.
    pub async fn peer_removed_us(&self, cluster: &str) -> Result<(), AgentError> {
        self.stop_peer(cluster);
        lock(&self.watchdog).forget(cluster);
        if !self.store.mark_peer_removed(cluster).await? {
            return Err(AgentError::UnknownPeer(cluster.to_owned()));
        }
        for def in [
            impmesh_store::alarms::PEER_PENDING,
            impmesh_store::alarms::PEER_SYNC_STALLED,
            impmesh_store::alarms::PEER_UNREACHABLE,
            impmesh_store::alarms::PEER_AUTH_FAILED,
        ] {
            self.clear_alarm(def, cluster, "the peer removed this cluster")
                .await;
        }
        let message = format!(
            "{cluster} removed this cluster as a peer: its users are no longer reachable from \
             here; remove it here too with `impmesh peer del {cluster}`, or peer again \
             (`impmesh peer add` on either side)"
        );
        self.set_alarm(
            impmesh_store::alarms::PEER_REMOVED_US,
            cluster,
            Some(&message),
        )
        .await;
        self.request_duplicate_check(DuplicateScope::All);
        Ok(())
    }

    /// `peer sync`: a full resync at once; with `credential`, the certificates are
    /// exchanged again first through a new channel-bound first contact (the repair for
    /// a peer that changed its certificate).
    pub async fn force_sync(
        self: &Arc<Self>,
        cluster: &str,
        credential: Option<(&str, &str)>,
    ) -> Result<(), AgentError> {
        let Some(peer) = self.store.peer(cluster).await? else {
            return Err(AgentError::UnknownPeer(cluster.to_owned()));
        };
        if let Some((user, password)) = credential {
            // Make-before-break: the old pins stay until the exchange pinned what the
            // peer presents now; a failed exchange changes nothing.
            let (info, token, hash, listed) = self
                .first_contact(
                    &peer.address,
                    &peer.server_name,
                    user,
                    password,
                    peer.our_token.as_deref(),
                )
                .await?;
            if info.cluster != cluster {
                return Err(AgentError::Invalid(format!(
                    "{} now answers as cluster {}, not {cluster}",
                    peer.address, info.cluster
                )));
            }
            self.stop_peer(cluster);
            self.store
                .upsert_peer(&PeerRecord {
                    our_token: Some(token),
                    their_token_hash: Some(hash),
                    ..peer.clone()
                })
                .await?;
            // Then the pins of certificates the peer no longer lists go.
            for entry in self.store.trust_entries().await? {
                if entry.kind == TrustKind::Pinned
                    && entry.peer.as_deref() == Some(cluster)
                    && !listed
                        .iter()
                        .any(|c| c.fingerprint.eq_ignore_ascii_case(&entry.fingerprint))
                {
                    self.store.remove_trust(&entry.fingerprint).await?;
                }
            }
        }
        self.store.restart_full_sync(cluster).await?;
        if peer.state == PeerState::Active {
            self.spawn_peer(cluster, false);
            self.nudge(cluster);
        }
        Ok(())
    }

    /// Tells every peer that this cluster changed (after a local user change), so it
    /// pulls at once instead of at its next period. Pending peers too: they added us
    /// and pull from us, whether or not we accepted them.
    pub fn notify_peers(self: &Arc<Self>, usn: i64) {
        let agent = self.clone();
        self.tracker.spawn(async move {
            let peers = match agent.store.peers().await {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = %e, "cannot list peers to notify");
                    return;
                }
            };
            for peer in peers {
                agent.notify_peer(peer.cluster, usn);
            }
        });
    }

    fn notify_peer(self: &Arc<Self>, cluster: String, usn: i64) {
        let agent = self.clone();
        self.tracker.spawn(async move {
            let result = tokio::time::timeout(Duration::from_secs(10), async {
                let mut client = agent.connect(&cluster).await?;
                client
                    .call(&Request::NotifyChange {
                        cluster: agent.ours.cluster.clone(),
                        usn,
                    })
                    .await
                    .map_err(SyncError::Client)
            })
            .await;
            match result {
                Ok(Ok(_)) => tracing::debug!(peer = %cluster, usn, "peer notified"),
                Ok(Err(e)) => {
                    tracing::info!(peer = %cluster, error = %e, "cannot notify peer; it pulls at its next period")
                }
                Err(_) => tracing::info!(peer = %cluster, "notifying the peer timed out"),
            }
        });
    }

    /// A verified, authenticated connection to a peer.
    async fn connect(&self, cluster: &str) -> Result<AxlClient, SyncError> {
        let peer = self
            .store
            .peer(cluster)
            .await?
            .ok_or_else(|| SyncError::Gone(cluster.to_owned()))?;
        let token = peer
            .our_token
            .clone()
            .ok_or_else(|| SyncError::Other("no credential for this peer".into()))?;
        let anchors = impmesh_axl::trust::anchors_for(&self.store, cluster)
            .await
            .map_err(|e| SyncError::Other(format!("{e:#}")))?;
        if anchors.pinned.is_empty() && anchors.cas.is_empty() {
            return Err(SyncError::Certificate(
                "no certificate of this peer is trusted".into(),
            ));
        }
        let verifier = PeerVerifier::new(&anchors).map_err(|e| SyncError::Other(e.to_string()))?;
        let mut client = match self
            .connect_to(
                &peer.address,
                &peer.server_name,
                ServerTrust::Verified(verifier),
            )
            .await
        {
            Ok(c) => c,
            Err(ClientError::Tls(_, e)) => {
                return Err(SyncError::Certificate(format!(
                    "the peer's certificate does not verify against the pinned ones ({e}); \
                     if it replaced its certificate, run `impmesh peer sync {cluster} --with-certificates`"
                )));
            }
            Err(e) => return Err(SyncError::Client(e)),
        };
        client.use_peer_token(&self.ours.cluster, &token)?;
        Ok(client)
    }

    /// The mesh in the Prometheus text format, from what the peer tasks keep in
    /// memory (no store query per scrape): per peer its sync state, USN lag, seconds
    /// since the last good sync, users, failures, stall restarts, certificate status,
    /// and the DNS state of each of its names.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        let now = impmesh_store::now_unix();
        let peers: Vec<(String, LiveStatus, u32)> = {
            let handles = lock(&self.peers);
            let dog = lock(&self.watchdog);
            handles
                .iter()
                .map(|(c, h)| (c.clone(), lock(&h.status).clone(), dog.restarts(c)))
                .collect()
        };
        /// One family: its samples for a peer, as (extra labels, value).
        type Samples = fn(&LiveStatus, u32, i64) -> Vec<(String, i64)>;
        let families: [(&str, &str, &str, Samples); 9] = [
            (
                "impmesh_peer_sync_state",
                "gauge",
                "The sync task's state per peer (1 for the current state).",
                |s, _, _| vec![(format!(",state=\"{}\"", s.state), 1)],
            ),
            (
                "impmesh_peer_usn_lag",
                "gauge",
                "The peer's last USN minus the one applied here (0: in step).",
                |s, _, _| match (s.peer_usn, s.applied_usn) {
                    (Some(theirs), Some(ours)) => vec![(String::new(), (theirs - ours).max(0))],
                    _ => vec![],
                },
            ),
            (
                "impmesh_peer_last_sync_age_seconds",
                "gauge",
                "Seconds since the last sync with the peer completed.",
                |s, _, now| {
                    s.last_success_at
                        .map(|t| (String::new(), (now - t).max(0)))
                        .into_iter()
                        .collect()
                },
            ),
            (
                "impmesh_peer_users",
                "gauge",
                "The peer's users in this directory.",
                |s, _, _| {
                    s.users_here
                        .map(|n| (String::new(), n))
                        .into_iter()
                        .collect()
                },
            ),
            (
                "impmesh_peer_consecutive_failures",
                "gauge",
                "Failed sync attempts in a row with the peer.",
                |s, _, _| vec![(String::new(), i64::from(s.consecutive_failures))],
            ),
            (
                "impmesh_peer_stall_restarts_total",
                "counter",
                "Times the stall watchdog restarted the peer's sync.",
                |_, restarts, _| vec![(String::new(), i64::from(restarts))],
            ),
            (
                "impmesh_peer_certificates_in_sync",
                "gauge",
                "Whether the peer's announced certificates are all pinned here (1) or not (0).",
                |s, _, _| match s.certificate_status.as_str() {
                    "unknown" => vec![],
                    status => vec![(String::new(), i64::from(status == "in-sync"))],
                },
            ),
            (
                "impmesh_peer_refused_entries_total",
                "counter",
                "Directory entries of the peer refused (homed elsewhere, invalid names).",
                |s, _, _| vec![(String::new(), s.refused_entries as i64)],
            ),
            (
                "impmesh_peer_dns_ok",
                "gauge",
                "Whether each DNS name of the peer resolves now (0: the last good addresses are in use).",
                |s, _, _| {
                    s.dns
                        .iter()
                        .map(|n| (format!(",name=\"{}\"", n.name), i64::from(n.ok)))
                        .collect()
                },
            ),
        ];
        // Each family whole (HELP, TYPE, then every peer's samples), as the text
        // format requires.
        for (name, kind, help, samples) in families {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (cluster, s, restarts) in &peers {
                for (labels, value) in samples(s, *restarts, now) {
                    let _ = writeln!(out, "{name}{{peer=\"{cluster}\"{labels}}} {value}");
                }
            }
        }
    }

    /// The status of every peer.
    pub async fn status(&self) -> Result<Vec<PeerStatus>, AgentError> {
        let trust = self.store.trust_entries().await?;
        let mut out = vec![];
        for peer in self.store.peers().await? {
            let live = lock(&self.peers)
                .get(&peer.cluster)
                .map(|h| lock(&h.status).clone())
                .unwrap_or_else(|| LiveStatus {
                    state: match peer.state {
                        PeerState::Pending => "pending".into(),
                        PeerState::Active => "stopped".into(),
                        PeerState::Removed => "removed".into(),
                    },
                    certificate_status: "unknown".into(),
                    ..LiveStatus::default()
                });
            let stall_restarts = lock(&self.watchdog).restarts(&peer.cluster);
            out.push(PeerStatus {
                stall_restarts,
                associated_users: self.store.remote_user_count(&peer.cluster).await?,
                sync: self.store.peer_sync(&peer.cluster).await?,
                pinned: trust
                    .iter()
                    .filter(|t| {
                        t.kind == TrustKind::Pinned && t.peer.as_deref() == Some(&peer.cluster)
                    })
                    .map(|t| t.fingerprint.clone())
                    .collect(),
                cluster: peer.cluster,
                address: peer.address,
                state: peer.state,
                added_here: peer.added_here,
                added_at: peer.added_at,
                accepted_at: peer.accepted_at,
                live,
            });
        }
        Ok(out)
    }
}

/// hickory with the system configuration; without one, every lookup fails with the
/// reason (known peers keep their last good addresses).
fn system_dns() -> Arc<dyn dns::NameResolver> {
    struct Unavailable(String);
    impl dns::NameResolver for Unavailable {
        fn lookup<'a>(
            &'a self,
            _name: &'a str,
        ) -> std::pin::Pin<
            Box<
                dyn std::future::Future<Output = Result<Vec<std::net::IpAddr>, String>> + Send + 'a,
            >,
        > {
            Box::pin(async move { Err(self.0.clone()) })
        }
    }
    match dns::SystemDns::new() {
        Ok(d) => Arc::new(d),
        Err(e) => {
            tracing::warn!(error = %e, "no DNS configuration; peers are reached by address only");
            Arc::new(Unavailable(format!("no DNS configuration: {e}")))
        }
    }
}

/// Splits `host:port` (or `[v6]:port`).
/// Whether our node may connect to `host`, announced by a peer: a DNS name, or an IP
/// address that is not unspecified, multicast or broadcast; loopback and link-local
/// addresses (and `localhost`) only when the peer's own AXL address is one too
/// (`peer_is_local`: a test mesh on one machine), so a peer cannot point our node at
/// our own loopback services.
pub fn announced_host_ok(host: &str, peer_is_local: bool) -> bool {
    use std::net::IpAddr;
    match host.trim_matches(['[', ']']).parse::<IpAddr>() {
        Ok(ip) => {
            let odd = ip.is_unspecified()
                || ip.is_multicast()
                || matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
            !odd && (!is_local(&ip) || peer_is_local)
        }
        Err(_) => {
            impmesh_certs::is_dns_name(host)
                && (!host.eq_ignore_ascii_case("localhost") || peer_is_local)
        }
    }
}

/// The first 12 characters of a digest, for a message (it may come from a peer: by
/// characters, not bytes, so no input can split a character).
fn short_digest(digest: &str) -> String {
    digest.chars().take(12).collect()
}

/// Loopback or link-local.
fn is_local(ip: &std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => v4.is_loopback() || v4.is_link_local(),
        std::net::IpAddr::V6(v6) => v6.is_loopback() || v6.is_unicast_link_local(),
    }
}

fn split_host_port(address: &str) -> Option<(&str, u16)> {
    let (host, port) = address.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Some((host, port.parse().ok()?))
}

/// `host`, `host:port` or `[v6]:port` → (`host:port`, server name); port 8443 by default.
fn normalize_address(address: &str) -> Result<(String, String), AgentError> {
    let address = address.trim();
    let bad = || AgentError::Invalid(format!("{address:?} is not host[:port]"));
    if address.is_empty() || address.contains(['/', ' ', '@']) {
        return Err(bad());
    }
    if let Ok(sock) = address.parse::<std::net::SocketAddr>() {
        return Ok((sock.to_string(), sock.ip().to_string()));
    }
    if let Ok(ip) = address.parse::<std::net::IpAddr>() {
        let sock = std::net::SocketAddr::new(ip, 8443);
        return Ok((sock.to_string(), ip.to_string()));
    }
    let (host, port) = match address.rsplit_once(':') {
        Some((h, p)) => (h, p.parse::<u16>().map_err(|_| bad())?),
        None => (address, 8443),
    };
    if !impmesh_certs::is_dns_name(host) {
        return Err(bad());
    }
    Ok((format!("{host}:{port}"), host.to_owned()))
}

/// Why one sync attempt failed.
#[derive(Debug, thiserror::Error)]
enum SyncError {
    #[error("{0}")]
    Certificate(String),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Store(#[from] impmesh_store::StoreError),
    #[error("the peer {0} was removed")]
    Gone(String),
    #[error("{0}")]
    Other(String),
}

struct PeerTask {
    agent: Arc<Agent>,
    cluster: String,
    nudge: Arc<Notify>,
    cancel: CancellationToken,
    status: Arc<Mutex<LiveStatus>>,
    progress: Arc<Mutex<Progress>>,
    /// Which per-peer alarms this task knows to be raised (absent: unknown, so the
    /// first report always reaches the store).
    alarms: Arc<Mutex<HashMap<&'static str, bool>>>,
}

impl PeerTask {
    /// Raises (`Some(message)`) or clears (`None`) a per-peer alarm, touching the store
    /// only when the state changes.
    async fn flag(&self, def: &'static impmesh_store::alarms::AlarmDef, on: Option<&str>) {
        flag(&self.agent, &self.alarms, &self.cluster, def, on).await;
    }
}

async fn flag(
    agent: &Agent,
    known: &Mutex<HashMap<&'static str, bool>>,
    cluster: &str,
    def: &'static impmesh_store::alarms::AlarmDef,
    on: Option<&str>,
) {
    if lock(known).get(def.name) == Some(&on.is_some()) {
        return;
    }
    agent.set_alarm(def, cluster, on).await;
    lock(known).insert(def.name, on.is_some());
}

/// The shortest time between two syncs of one peer started by nudges.
pub const NUDGE_SPACING: Duration = Duration::from_millis(500);

/// How long a nudge waits so that syncs started by nudges are [`NUDGE_SPACING`] apart.
fn nudge_wait(last_start: Option<tokio::time::Instant>, now: tokio::time::Instant) -> Duration {
    last_start.map_or(Duration::ZERO, |t| {
        NUDGE_SPACING.saturating_sub(now.saturating_duration_since(t))
    })
}

/// Nodes a peer may announce, at most (a cluster has 1 to 6 nodes; room to grow).
pub const MAX_PEER_NODES: usize = 16;

/// Whether `name` is a user name as a cluster stores it: an RFC 7622 localpart,
/// already normalised (nodeprep), at most 1023 bytes.
pub fn is_localpart(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 1023
        && jid::NodePart::new(name).is_ok_and(|n| n.as_str() == name)
}

/// A peer's directory entry as we keep it, or why it is refused: a peer speaks only
/// for its own users, homed on its own announced nodes, with valid names. A
/// tombstone only ever removes the peer's own entry, so only its name is checked.
fn entry(peer: &str, nodes: &[String], u: UserEntry) -> Result<DirectoryEntry, String> {
    if !is_localpart(&u.name) {
        return Err(format!("{:?} is not a valid user name", u.name));
    }
    if !u.deleted {
        if !u.home_cluster.eq_ignore_ascii_case(peer) {
            return Err(format!(
                "{} is said to be homed in {:?}, not in the peer that lists it",
                u.name, u.home_cluster
            ));
        }
        if !nodes.iter().any(|n| n.eq_ignore_ascii_case(&u.home_node)) {
            return Err(format!(
                "{} is said to be homed on {:?}, which is not one of the peer's nodes",
                u.name, u.home_node
            ));
        }
    }
    Ok(DirectoryEntry {
        username: u.name,
        home_cluster: peer.to_owned(),
        home_node: u.home_node.to_ascii_lowercase(),
        usn: u.usn,
        deleted: u.deleted,
    })
}

/// The entries of a page that may be applied; the refused ones are logged (first few
/// reasons) and counted in the peer's status.
fn checked_entries(
    peer: &str,
    nodes: &[String],
    users: Vec<UserEntry>,
    status: &Mutex<LiveStatus>,
) -> Vec<DirectoryEntry> {
    let mut refused = 0u64;
    let mut out = Vec::with_capacity(users.len());
    for u in users {
        match entry(peer, nodes, u) {
            Ok(e) => out.push(e),
            Err(why) => {
                if refused < 5 {
                    tracing::warn!(%peer, %why, "directory entry refused");
                }
                refused += 1;
            }
        }
    }
    if refused > 0 {
        tracing::warn!(%peer, refused, "directory entries refused in one page");
        lock(status).refused_entries += refused;
    }
    out
}

impl PeerTask {
    async fn run(self) {
        let period = self.agent.settings.period;
        let new_backoff = || {
            backon::ExponentialBuilder::new()
                .with_jitter()
                .with_min_delay(Duration::from_millis(500))
                .with_max_delay(period.max(Duration::from_secs(1)))
                .without_max_times()
                .build()
        };
        let mut backoff = new_backoff();
        let mut delay = period;
        let mut last_start: Option<tokio::time::Instant> = None;
        loop {
            let nudged = tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = self.nudge.notified() => true,
                _ = tokio::time::sleep(delay) => false,
            };
            // Nudges (a peer's notifyChange, our own changes) start a sync at most every
            // NUDGE_SPACING: a peer that calls notifyChange in a loop gets a pull twice a
            // second, not one per call. Nudges meanwhile fold into the one waiting.
            if nudged {
                let wait = nudge_wait(last_start, tokio::time::Instant::now());
                tokio::select! {
                    _ = self.cancel.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            last_start = Some(tokio::time::Instant::now());
            lock(&self.progress).last_activity = tokio::time::Instant::now();
            let now = impmesh_store::now_unix();
            {
                let mut s = lock(&self.status);
                s.last_attempt_at = Some(now);
                // A routine pull of a peer that is in sync leaves it shown in sync;
                // "syncing" is the first sync, or the one after a failure.
                if s.state != "in-sync" {
                    s.state = "syncing".into();
                }
            }
            let result = tokio::select! {
                _ = self.cancel.cancelled() => return,
                r = self.sync_once() => r,
            };
            lock(&self.progress).last_activity = tokio::time::Instant::now();
            match result {
                Ok(()) => {
                    use impmesh_store::alarms::{PEER_AUTH_FAILED, PEER_UNREACHABLE};
                    self.flag(PEER_UNREACHABLE, None).await;
                    self.flag(PEER_AUTH_FAILED, None).await;
                    let was_alarmed = {
                        let mut p = lock(&self.progress);
                        p.last_completed = tokio::time::Instant::now();
                        std::mem::replace(&mut p.alarmed, false)
                    };
                    if was_alarmed
                        && let Err(e) = self
                            .agent
                            .store
                            .clear_alarm(
                                impmesh_store::alarms::PEER_SYNC_STALLED,
                                &self.cluster,
                                "a sync completed",
                            )
                            .await
                    {
                        tracing::error!(error = %e, "cannot clear the stall alarm");
                    }
                    lock(&self.agent.failures).remove(&self.cluster);
                    let applied = self.agent.store.peer_sync(&self.cluster).await.ok();
                    let users = self.agent.store.remote_user_count(&self.cluster).await.ok();
                    let mut s = lock(&self.status);
                    s.applied_usn = applied.map(|p| p.applied_usn);
                    s.users_here = users;
                    s.state = "in-sync".into();
                    s.reason = None;
                    s.last_success_at = Some(impmesh_store::now_unix());
                    s.consecutive_failures = 0;
                    backoff = new_backoff();
                    delay = period;
                }
                Err(SyncError::Gone(_)) => return,
                Err(e) => {
                    let failures = {
                        let mut all = lock(&self.agent.failures);
                        let n = all.entry(self.cluster.clone()).or_insert(0);
                        *n += 1;
                        *n
                    };
                    let certificate_failed = {
                        let mut s = lock(&self.status);
                        s.state = "failed".into();
                        s.reason = Some(e.to_string());
                        s.consecutive_failures = failures;
                        match &e {
                            SyncError::Certificate(why) => {
                                let newly = s.certificate_status != "failed";
                                s.certificate_status = "failed".into();
                                s.certificate_reason = Some(why.clone());
                                newly.then(|| why.clone())
                            }
                            _ => None,
                        }
                    };
                    delay = backoff.next().unwrap_or(period);
                    match &e {
                        SyncError::Client(
                            ClientError::Connect(..)
                            | ClientError::Timeout(_)
                            | ClientError::Http(_),
                        ) if failures >= 3 => {
                            let why = format!("{failures} attempts in a row failed; last: {e}");
                            self.flag(impmesh_store::alarms::PEER_UNREACHABLE, Some(&why))
                                .await;
                        }
                        SyncError::Client(ClientError::Status { status, .. })
                            if status.as_u16() == 401 =>
                        {
                            self.flag(
                                impmesh_store::alarms::PEER_AUTH_FAILED,
                                Some(&e.to_string()),
                            )
                            .await;
                        }
                        _ => {}
                    }
                    if let Some(why) = certificate_failed {
                        self.agent
                            .set_alarm(
                                impmesh_store::alarms::PEER_CERT_OUT_OF_SYNC,
                                &self.cluster,
                                Some(&why),
                            )
                            .await;
                    }
                    tracing::warn!(peer = %self.cluster, error = %e, retry_in = ?delay, "sync failed");
                }
            }
        }
    }

    async fn sync_once(&self) -> Result<(), SyncError> {
        let store = &self.agent.store;
        let peer = store
            .peer(&self.cluster)
            .await?
            .ok_or_else(|| SyncError::Gone(self.cluster.clone()))?;
        if peer.state != PeerState::Active {
            lock(&self.status).state = "pending".into();
            return Ok(());
        }
        let mut client = self.agent.connect(&self.cluster).await?;
        let Response::ClusterInfo(info) = client.call(&Request::GetClusterInfo).await? else {
            return Err(SyncError::Other(
                "getClusterInfo answered with something else".into(),
            ));
        };
        let skew = client.clock_skew();
        lock(&self.status).clock_skew_secs = skew;
        let skewed = skew
            .filter(|s| s.abs() > MAX_CLOCK_SKEW)
            .map(|s| format!("the peer's clock is {s:+} s from this node's"));
        self.flag(impmesh_store::alarms::PEER_CLOCK_SKEW, skewed.as_deref())
            .await;
        if !info.domain.eq_ignore_ascii_case(&self.agent.ours.domain) {
            return Err(SyncError::Other(format!(
                "the peer serves the XMPP domain {}, this cluster {}: a mesh serves one domain",
                info.domain, self.agent.ours.domain
            )));
        }
        let missing: Vec<String> = self
            .agent
            .settings
            .features
            .iter()
            .filter(|f| !info.features.contains(f))
            .cloned()
            .collect();
        {
            let mut s = lock(&self.status);
            if s.missing_features != missing && !missing.is_empty() {
                tracing::info!(peer = %self.cluster, protocol = info.protocol, missing = ?missing, "the peer does not announce some features; they are not used with it");
            }
            s.peer_protocol = Some(info.protocol);
            s.peer_features = info.features.clone();
            s.missing_features = missing;
        }
        self.check_dns(&peer.address);
        self.check_certificates(&info).await?;
        let nodes = self.remember_nodes(&info, &peer.address).await?;
        let sync = store.peer_sync(&self.cluster).await?;
        let full = sync.full_snapshot_usn.is_some() || sync.applied_usn == 0;
        // A full sync leaves our copy equal to the listing; a sync that found nothing
        // new is the moment to check that it still is (anti-entropy), at most every
        // anti_entropy_interval.
        let quiet = if full {
            self.full_sync(&mut client, &nodes, sync).await?;
            false
        } else {
            match self
                .incremental(&mut client, &nodes, sync.applied_usn)
                .await
            {
                Err(SyncError::Client(ClientError::Fault(f))) if f.code == "usnTooOld" => {
                    tracing::info!(peer = %self.cluster, "changes no longer kept by the peer; full sync");
                    self.full_sync(&mut client, &nodes, store.peer_sync(&self.cluster).await?)
                        .await?;
                    false
                }
                other => other? == 0,
            }
        };
        let (due, mismatched) = {
            let p = lock(&self.progress);
            let due = p
                .last_compared
                .is_none_or(|t| t.elapsed() >= self.agent.settings.anti_entropy_interval);
            (due, p.mismatched)
        };
        // After a mismatch, the resync is checked at once (and the alarm cleared).
        if (quiet && due) || mismatched {
            self.anti_entropy(&mut client).await?;
        }
        Ok(())
    }

    /// Compares the digest of the peer's users in our directory with the peer's own,
    /// when both are at the same USN. A difference (a lost write, a bug) raises
    /// InterClusterDirectoryMismatch and resyncs this peer's slice in full at once; the
    /// alarm clears when the digests match again.
    async fn anti_entropy(&self, client: &mut AxlClient) -> Result<(), SyncError> {
        let store = &self.agent.store;
        let Response::Digest { usn, count, sha256 } =
            client.call(&Request::GetDirectoryDigest).await?
        else {
            return Err(SyncError::Other(
                "getDirectoryDigest answered with something else".into(),
            ));
        };
        let ours = store.peer_digest(&self.cluster).await?;
        if usn != ours.usn {
            // Changes in flight: compare at the next quiet sync.
            return Ok(());
        }
        let def = impmesh_store::alarms::DIRECTORY_MISMATCH;
        let equal = count == ours.count && sha256 == ours.sha256;
        {
            let mut p = lock(&self.progress);
            p.last_compared = Some(Instant::now());
            p.mismatched = !equal;
        }
        if equal {
            self.agent
                .clear_alarm(def, &self.cluster, "the digests match")
                .await;
            return Ok(());
        }
        let message = format!(
            "at USN {usn} the peer has {count} users (digest {}…), this directory {} ({}…); resyncing in full",
            short_digest(&sha256),
            ours.count,
            short_digest(&ours.sha256)
        );
        tracing::warn!(peer = %self.cluster, %message, "directory mismatch");
        self.agent
            .set_alarm(def, &self.cluster, Some(&message))
            .await;
        store.restart_full_sync(&self.cluster).await?;
        self.nudge.notify_one();
        Ok(())
    }

    /// Resolves every DNS name of the peer in the background (a slow or failing DNS
    /// never holds up a sync), at most every `dns_check_interval`.
    fn check_dns(&self, address: &str) {
        {
            let mut p = lock(&self.progress);
            if p.last_dns_check
                .is_some_and(|t| t.elapsed() < self.agent.settings.dns_check_interval)
            {
                return;
            }
            p.last_dns_check = Some(Instant::now());
        }
        let (agent, cluster, address, status, alarms) = (
            self.agent.clone(),
            self.cluster.clone(),
            address.to_owned(),
            self.status.clone(),
            self.alarms.clone(),
        );
        self.agent.tracker.spawn(async move {
            let names = agent.resolve_peer_names(&cluster, &address).await;
            let failed: Vec<String> = names
                .iter()
                .filter(|n| !n.ok)
                .map(|n| format!("{} ({})", n.name, n.error.as_deref().unwrap_or("no answer")))
                .collect();
            for f in &failed {
                tracing::warn!(peer = %cluster, name = %f, "a DNS name of the peer does not resolve");
            }
            lock(&status).dns = names;
            let message = (!failed.is_empty()).then(|| format!("does not resolve: {}", failed.join(", ")));
            flag(
                &agent,
                &alarms,
                &cluster,
                impmesh_store::alarms::PEER_DNS_FAILURE,
                message.as_deref(),
            )
            .await;
        });
    }

    /// Compares the fingerprints the peer announces with the pinned ones.
    /// Keeps where the peer's nodes are (router links, client redirects); writes only
    /// when the announcement changed. A peer announces at most [`MAX_PEER_NODES`]
    /// nodes, each with a host name or address as checked as the peer's own address
    /// (see [`announced_host_ok`]); a node name that another peer (or this cluster)
    /// owns stays with its owner. Returns the names of the peer's nodes as kept.
    async fn remember_nodes(
        &self,
        info: &ClusterInfo,
        peer_address: &str,
    ) -> Result<Vec<String>, SyncError> {
        let store = &self.agent.store;
        let ours = store.cluster_nodes(&self.agent.ours.cluster).await?;
        // Where the admin's address for the peer leads (the DNS cache answers).
        let peer_is_local = match split_host_port(peer_address) {
            Some((host, _)) => match host.parse::<std::net::IpAddr>() {
                Ok(ip) => is_local(&ip),
                Err(_) => self
                    .agent
                    .dns
                    .resolve(host)
                    .await
                    .addresses
                    .iter()
                    .filter_map(|a| a.parse::<std::net::IpAddr>().ok())
                    .any(|ip| is_local(&ip)),
            },
            None => false,
        };
        let mut announced: Vec<impmesh_store::PeerNode> = vec![];
        for n in &info.nodes {
            let name = n.name.to_ascii_lowercase();
            let why = if announced.len() >= MAX_PEER_NODES {
                Some(format!("more than {MAX_PEER_NODES} nodes"))
            } else if !impmesh_certs::is_dns_name(&name) {
                Some("not a DNS name".to_owned())
            } else if announced.iter().any(|a| a.name == name) {
                Some("announced twice".to_owned())
            } else if ours.iter().any(|o| o.name.eq_ignore_ascii_case(&name))
                || name.eq_ignore_ascii_case(&self.agent.ours.cluster)
            {
                Some("a node of this cluster".to_owned())
            } else if let Some(other) = store
                .peer_node(&name)
                .await?
                .filter(|o| o.peer != self.cluster)
            {
                Some(format!("a node of {}", other.peer))
            } else if !announced_host_ok(&n.host, peer_is_local) {
                Some(format!("host {:?} is not allowed", n.host))
            } else {
                None
            };
            if let Some(why) = why {
                tracing::warn!(peer = %self.cluster, node = %n.name, %why, "announced node refused");
                continue;
            }
            announced.push(impmesh_store::PeerNode {
                name,
                peer: self.cluster.clone(),
                host: n.host.clone(),
                c2s_port: n.c2s_port,
                c2s_tls_port: n.c2s_tls_port,
                link_port: n.link_port,
                fingerprint: n.fingerprint.clone(),
                updated_at: 0,
            });
        }
        let mut known = store.peer_nodes(&self.cluster).await?;
        known.iter_mut().for_each(|n| n.updated_at = 0);
        announced.sort_by(|a, b| a.name.cmp(&b.name));
        if known != announced {
            store.set_peer_nodes(&self.cluster, &announced).await?;
        }
        Ok(announced.into_iter().map(|n| n.name).collect())
    }

    async fn check_certificates(&self, info: &ClusterInfo) -> Result<(), SyncError> {
        let entries: Vec<impmesh_store::TrustEntry> = self
            .agent
            .store
            .trust_entries()
            .await?
            .into_iter()
            .filter(|t| t.kind == TrustKind::Pinned && t.peer.as_deref() == Some(&self.cluster))
            .collect();
        let pinned: Vec<String> = entries.iter().map(|t| t.fingerprint.clone()).collect();
        let announced: Vec<String> = info.nodes.iter().map(|n| n.fingerprint.clone()).collect();
        let missing: Vec<&String> = announced.iter().filter(|f| !pinned.contains(f)).collect();
        // Make-before-break, second half: once every certificate the peer announces is
        // pinned, the pins of certificates it no longer announces and that are older
        // than those it does (rotated away) are dropped. A pin newer than what it
        // announces is a rotation under way (announced to us, not in use yet): kept.
        if missing.is_empty() && !announced.is_empty() {
            let oldest_in_use = entries
                .iter()
                .filter(|t| announced.contains(&t.fingerprint))
                .map(|t| t.added_at)
                .min()
                .unwrap_or(0);
            for old in entries
                .iter()
                .filter(|t| !announced.contains(&t.fingerprint) && t.added_at < oldest_in_use)
            {
                self.agent.store.remove_trust(&old.fingerprint).await?;
                tracing::info!(peer = %self.cluster, sha256 = %old.fingerprint, "dropped the pin of a certificate the peer no longer uses");
            }
        }
        let reason = (!missing.is_empty()).then(|| {
            format!(
                "the peer announces certificates that are not pinned here: {}; run \
                 `impmesh peer sync {} --with-certificates` to exchange them again",
                missing
                    .iter()
                    .map(|f| f.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                self.cluster
            )
        });
        let changed = {
            let mut s = lock(&self.status);
            s.peer_fingerprints = announced.clone();
            s.peer_usn = Some(info.usn);
            let status = if reason.is_some() {
                "out-of-sync"
            } else {
                "in-sync"
            };
            let changed = s.certificate_status != status;
            s.certificate_status = status.into();
            s.certificate_reason = reason.clone();
            changed
        };
        if changed {
            self.agent
                .set_alarm(
                    impmesh_store::alarms::PEER_CERT_OUT_OF_SYNC,
                    &self.cluster,
                    reason.as_deref(),
                )
                .await;
        }
        Ok(())
    }

    async fn full_sync(
        &self,
        client: &mut AxlClient,
        nodes: &[String],
        sync: impmesh_store::PeerSync,
    ) -> Result<(), SyncError> {
        let store = &self.agent.store;
        let started = Instant::now();
        let page_size = self.agent.settings.page_size;
        // Resume a listing in progress, or start one.
        let (mut generation, mut cursor) = match (sync.full_snapshot_usn, sync.full_after_usn) {
            (Some(snapshot_usn), Some(after_usn)) if after_usn > 0 => (
                sync.full_gen,
                Some(Cursor {
                    snapshot_usn,
                    after_usn,
                }),
            ),
            _ => (0, None),
        };
        loop {
            let request = Request::ListUsers {
                since_usn: 0,
                cursor,
                page_size,
            };
            let Response::Users(page) = client.call(&request).await? else {
                return Err(SyncError::Other(
                    "listUsers answered with something else".into(),
                ));
            };
            if generation == 0 {
                generation = store
                    .begin_full_sync(&self.cluster, page.snapshot_usn)
                    .await?;
            }
            let after = page.users.last().map(|u| u.usn).unwrap_or(0);
            let entries = checked_entries(&self.cluster, nodes, page.users, &self.status);
            {
                let _writer = self.agent.apply_lock.lock().await;
                store
                    .apply_full_page(&self.cluster, generation, &entries, after)
                    .await?;
            }
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => {
                    let ms = started.elapsed().as_millis() as i64;
                    let users = store
                        .finish_full_sync(&self.cluster, generation, page.snapshot_usn, ms)
                        .await?;
                    lock(&self.status).peer_users = Some(users);
                    lock(&self.progress).last_compared = Some(Instant::now());
                    tracing::info!(peer = %self.cluster, users, usn = page.snapshot_usn, ms, "full sync done");
                    self.agent
                        .request_duplicate_check(DuplicateScope::Peer(self.cluster.clone()));
                    return Ok(());
                }
            }
        }
    }

    /// Pulls the changes since `since`; returns how many there were.
    async fn incremental(
        &self,
        client: &mut AxlClient,
        nodes: &[String],
        since: i64,
    ) -> Result<i64, SyncError> {
        let store = &self.agent.store;
        let started = Instant::now();
        let mut cursor = None;
        let mut changes = 0i64;
        let mut changed = vec![];
        loop {
            let request = Request::ListUsers {
                since_usn: since,
                cursor,
                page_size: self.agent.settings.page_size,
            };
            let Response::Users(page) = client.call(&request).await? else {
                return Err(SyncError::Other(
                    "listUsers answered with something else".into(),
                ));
            };
            changes += page.users.len() as i64;
            let last = page.users.last().map(|u| u.usn);
            let entries = checked_entries(&self.cluster, nodes, page.users, &self.status);
            changed.extend(entries.iter().map(|e| e.username.clone()));
            let applied_to = match page.next_cursor {
                Some(_) => last.unwrap_or(since),
                None => page.snapshot_usn,
            };
            {
                let _writer = self.agent.apply_lock.lock().await;
                store
                    .apply_changes(&self.cluster, &entries, applied_to)
                    .await?;
            }
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => {
                    let ms = started.elapsed().as_millis() as i64;
                    store
                        .finish_incremental(&self.cluster, page.snapshot_usn, ms, changes)
                        .await?;
                    if changes > 0 {
                        tracing::info!(peer = %self.cluster, changes, usn = page.snapshot_usn, ms, "changes applied");
                        self.agent
                            .request_duplicate_check(DuplicateScope::Users(changed));
                    }
                    return Ok(changes);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, cluster: &str, node: &str, deleted: bool) -> UserEntry {
        UserEntry {
            name: name.into(),
            home_cluster: cluster.into(),
            home_node: node.into(),
            usn: 1,
            deleted,
        }
    }

    /// A peer speaks only for its own users on its own nodes, with valid names.
    #[test]
    fn a_peers_entries_are_checked_against_who_the_peer_is() {
        let nodes = ["n1.b.example".to_owned(), "n2.b.example".to_owned()];
        let ok = entry(
            "b.example",
            &nodes,
            user("bea", "b.example", "N2.b.example", false),
        )
        .unwrap();
        assert_eq!(
            (ok.home_cluster.as_str(), ok.home_node.as_str()),
            ("b.example", "n2.b.example")
        );
        for (bad, why) in [
            (
                user("bea", "a.example", "n1.b.example", false),
                "another cluster",
            ),
            (user("bea", "0", "n1.b.example", false), "a made-up cluster"),
            (
                user("bea", "b.example", "n9.b.example", false),
                "an unannounced node",
            ),
            (
                user("Bea", "b.example", "n1.b.example", false),
                "not normalised",
            ),
            (
                user("a@b", "b.example", "n1.b.example", false),
                "not a localpart",
            ),
            (user("", "b.example", "n1.b.example", false), "empty"),
            (
                user("a b\u{0}", "b.example", "n1.b.example", true),
                "bad tombstone",
            ),
        ] {
            assert!(entry("b.example", &nodes, bad).is_err(), "{why}");
        }
        // A tombstone removes only the peer's own entry: its home is not checked.
        assert!(entry("b.example", &nodes, user("gone", "", "", true)).is_ok());
        assert!(is_localpart("ünïcode"));
        assert!(!is_localpart(&"x".repeat(1024)));
    }

    #[test]
    fn announced_hosts_are_checked_like_the_peers_address() {
        assert!(announced_host_ok("node1.b.example.com", false));
        assert!(announced_host_ok("192.0.2.10", false));
        assert!(announced_host_ok("2001:db8::1", false));
        for bad in [
            "127.0.0.1",
            "::1",
            "169.254.1.1",
            "localhost",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "not a host",
            "",
        ] {
            assert!(!announced_host_ok(bad, false), "{bad}");
        }
        // A mesh on one machine (the peer's own address is loopback).
        assert!(announced_host_ok("127.0.0.1", true));
        assert!(announced_host_ok("localhost", true));
        assert!(!announced_host_ok("0.0.0.0", true));
    }

    #[tokio::test(start_paused = true)]
    async fn nudges_start_syncs_at_most_every_spacing() {
        let t0 = tokio::time::Instant::now();
        assert_eq!(nudge_wait(None, t0), Duration::ZERO);
        tokio::time::advance(Duration::from_millis(100)).await;
        let now = tokio::time::Instant::now();
        assert_eq!(
            nudge_wait(Some(t0), now),
            NUDGE_SPACING - Duration::from_millis(100)
        );
        tokio::time::advance(NUDGE_SPACING).await;
        assert_eq!(
            nudge_wait(Some(t0), tokio::time::Instant::now()),
            Duration::ZERO
        );
    }

    /// A digest from a peer is text it chose: never sliced by bytes (L1).
    #[test]
    fn a_peers_digest_is_shortened_by_characters() {
        assert_eq!(short_digest("ééééééééééééééé"), "éééééééééééé");
        assert_eq!(short_digest("abc"), "abc");
    }

    #[test]
    fn addresses_are_normalized() {
        assert_eq!(
            normalize_address("node1.b.example.com").unwrap(),
            (
                "node1.b.example.com:8443".into(),
                "node1.b.example.com".into()
            )
        );
        assert_eq!(
            normalize_address("10.0.0.2:9443").unwrap(),
            ("10.0.0.2:9443".into(), "10.0.0.2".into())
        );
        assert_eq!(
            normalize_address("::1").unwrap(),
            ("[::1]:8443".into(), "::1".into())
        );
        assert!(normalize_address("http://x").is_err());
        assert!(normalize_address("bad name:1").is_err());
        assert!(normalize_address("x:99999").is_err());
    }
}
