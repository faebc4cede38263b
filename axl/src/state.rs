//! The HTTPS service's state, shared by its two surfaces (peers: the AXL API and the
//! certificate exchange; admins: the admin API and metrics): limits, identity,
//! counters, the TLS configuration in use, and what a request knows about its
//! connection. `server` listens and routes; the handlers read this.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::body::Body;
use axum::http::StatusCode;
use bytes::Bytes;
use http_body_util::BodyExt as _;
use impmesh_store::Store;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::NodeControl;
use crate::auth::{AuthLimits, AuthState};

/// Limits of the HTTPS service.
#[derive(Debug, Clone)]
pub struct HttpsLimits {
    /// Largest request body; bigger ones get 413.
    pub body_limit: usize,
    /// Time for the TLS handshake.
    pub handshake_timeout: Duration,
    /// Time to send a request's headers, and then its body.
    pub request_timeout: Duration,
    /// Connections served at once; more are closed at accept.
    pub max_connections: usize,
    /// Connections one address (IPv6: one /64) may hold open; more are closed at
    /// accept, before the TLS handshake (security review M10: 512 slow connections
    /// from one source locked peers and admins out).
    pub max_connections_per_address: u32,
    /// Peers at most (a mesh is up to 30 clusters): a first contact beyond it is
    /// refused.
    pub max_peers: usize,
    pub auth: AuthLimits,
    /// The DSCP class of HTTPS connections (AF31, 26: signalling; 0: unmarked).
    pub dscp: u8,
}

impl Default for HttpsLimits {
    fn default() -> HttpsLimits {
        HttpsLimits {
            body_limit: 1024 * 1024,
            handshake_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_connections: 512,
            max_connections_per_address: 32,
            max_peers: 29,
            auth: AuthLimits::default(),
            dscp: 26,
        }
    }
}

/// What one HTTPS listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Surface {
    /// `[listen] https`: the AXL-like API for peers, health checks.
    Peers,
    /// `[listen] admin`: the admin API and /metrics, health checks (security review
    /// M10: admin surfaces do not belong on the peer-facing listener).
    Admin,
}

/// Who this service speaks for.
#[derive(Debug, Clone)]
pub struct ServiceIdentity {
    pub cluster: String,
    pub domain: String,
    pub node: String,
    pub version: String,
    /// The optional intercluster features this node announces.
    pub features: Vec<String>,
}

/// A peer's `notifyChange`: it changed up to `usn` and asks to be pulled soon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeNotice {
    pub cluster: String,
    pub usn: i64,
    pub from: IpAddr,
}

/// What a request knows about its connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub id: u64,
    pub peer: SocketAddr,
    /// RFC 9266 `tls-exporter` value; `None` below TLS 1.3.
    pub exporter: Option<[u8; 32]>,
    /// The certificate the client presented (a peer node does; admins and browsers
    /// do not). The handshake proved the client holds its key.
    pub client_cert: Option<rustls_pki_types::CertificateDer<'static>>,
}

/// The operation a response answered, for the request log and metrics.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OpName(pub &'static str);

/// Requests served, by operation and status.
#[derive(Debug, Default)]
pub struct ApiStats {
    counts: Mutex<BTreeMap<(&'static str, u16), u64>>,
}

impl ApiStats {
    pub(crate) fn count(&self, op: &'static str, status: u16) {
        *self
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((op, status))
            .or_default() += 1;
    }

    /// A copy of the counters.
    pub fn snapshot(&self) -> Vec<((&'static str, u16), u64)> {
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect()
    }
}

/// The HTTPS service of a node.
pub struct Https<C: NodeControl> {
    pub store: Store,
    pub control: Arc<C>,
    pub identity: ServiceIdentity,
    pub limits: HttpsLimits,
    pub auth: AuthState,
    pub stats: ApiStats,
    /// Listing pages and the digest that many peers ask for at once.
    pub answers: crate::cache::AnswerCache,
    pub(crate) tls: RwLock<Arc<rustls::ServerConfig>>,
    pub(crate) notices: broadcast::Sender<ChangeNotice>,
    /// Clusters that ran `exchangeCertificates` with us.
    pub(crate) peerings: broadcast::Sender<String>,
    /// Callers refused an exchange lately (their alarm).
    pub(crate) refusals: crate::refusals::Refusals,
    pub(crate) next_conn: AtomicU64,
    pub(crate) shutdown: CancellationToken,
    pub(crate) tracker: TaskTracker,
}

impl<C: NodeControl> Https<C> {
    /// A service answering with `tls` (HTTP/1.1 ALPN is added) and accepting
    /// `admin_token` as the local admin credential.
    pub fn new(
        store: Store,
        control: Arc<C>,
        identity: ServiceIdentity,
        limits: HttpsLimits,
        tls: Arc<rustls::ServerConfig>,
        admin_token: String,
    ) -> Arc<Https<C>> {
        let auth = AuthState::new(limits.auth.clone(), admin_token);
        Arc::new(Https {
            store,
            control,
            identity,
            limits,
            auth,
            stats: ApiStats::default(),
            answers: crate::cache::AnswerCache::default(),
            tls: RwLock::new(with_alpn(tls)),
            notices: broadcast::channel(256).0,
            peerings: broadcast::channel(64).0,
            refusals: Default::default(),
            next_conn: AtomicU64::new(1),
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
        })
    }

    /// New TLS handshakes use `tls` from now on.
    pub fn set_tls(&self, tls: Arc<rustls::ServerConfig>) {
        *self.tls.write().unwrap_or_else(|e| e.into_inner()) = with_alpn(tls);
    }

    /// Every `notifyChange` received from now on.
    pub fn subscribe_changes(&self) -> broadcast::Receiver<ChangeNotice> {
        self.notices.subscribe()
    }

    /// The name of every peer cluster that runs `exchangeCertificates` with us from now
    /// on (a new pending peer, or one renewing its credentials).
    pub fn subscribe_peerings(&self) -> broadcast::Receiver<String> {
        self.peerings.subscribe()
    }

    pub(crate) fn shutdown_token(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Stops accepting, lets requests in progress finish (up to 5 s) and returns.
    pub async fn shutdown(&self) {
        self.stop();
        self.stopped().await;
    }

    /// Begins stopping: no new connections; requests in progress get up to 5 s.
    pub fn stop(&self) {
        self.shutdown.cancel();
        self.tracker.close();
    }

    /// Resolves once every connection has ended (after [`Self::stop`]).
    pub async fn stopped(&self) {
        self.tracker.wait().await;
    }

    /// Reads a request body under the size limit and the request timeout.
    pub(crate) async fn read_body(&self, body: Body) -> Result<Bytes, StatusCode> {
        let limited = http_body_util::Limited::new(body, self.limits.body_limit);
        match tokio::time::timeout(self.limits.request_timeout, limited.collect()).await {
            Ok(Ok(collected)) => Ok(collected.to_bytes()),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
                Err(StatusCode::PAYLOAD_TOO_LARGE)
            }
            Ok(Err(_)) => Err(StatusCode::BAD_REQUEST),
            Err(_) => Err(StatusCode::REQUEST_TIMEOUT),
        }
    }
}

pub(crate) fn with_alpn(tls: Arc<rustls::ServerConfig>) -> Arc<rustls::ServerConfig> {
    let mut config = (*tls).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}
