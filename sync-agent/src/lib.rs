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

mod checks;
pub mod dns;
mod duplicates;
mod peering;
mod pull;
mod status;
mod task;
mod troubleshoot;
mod watchdog;

pub use checks::{MAX_PEER_NODES, announced_host_ok};
use duplicates::PendingDuplicateCheck;
pub use duplicates::{DUPLICATE_CHECK_SPACING, DuplicateScope};
pub use impmesh_axl::api::{CertificateStatus, Check, LiveStatus, PeerStatus, SyncState};
pub use pull::is_localpart;
pub use task::NUDGE_SPACING;
pub use troubleshoot::MAX_CLOCK_SKEW;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use impmesh_axl::client::ClientError;
use impmesh_store::{ClusterName, PeerState, Store};
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
    pub cluster: ClusterName,
    /// The XMPP domain the mesh serves (a peer must serve the same).
    pub domain: String,
    /// host:port where peers reach this node's AXL endpoint.
    pub address: String,
    /// The TLS server name peers should ask for.
    pub server_name: String,
}

/// Why an admin action on peers failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("no peer {0}")]
    UnknownPeer(ClusterName),
    #[error("{0:?} is not host[:port]")]
    Address(String),
    #[error(
        "this cluster already has {0} peers, the most it takes ([sync] max_peers; a mesh is at most 30 clusters)"
    )]
    TooManyPeers(usize),
    #[error("{address} now answers as cluster {now}, not {cluster}")]
    ClusterChanged {
        address: String,
        cluster: ClusterName,
        now: ClusterName,
    },
    #[error("no credential for {0}")]
    NoCredential(ClusterName),
    #[error("the node has no certificate yet")]
    NoCertificate,
    #[error("the certificate has no chain")]
    EmptyChain,
    #[error("{0} answered with something else")]
    UnexpectedAnswer(&'static str),
    #[error("cannot check the peer's certificates: {0}")]
    Trust(#[from] impmesh_certs::CertError),
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
    peers: Mutex<HashMap<ClusterName, PeerHandle>>,
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
    failures: Mutex<HashMap<ClusterName, u32>>,
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
            .ok_or(AgentError::NoCertificate)
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
