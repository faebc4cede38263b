//! The impmesh XMPP router: client listeners, stream negotiation, sessions, routing,
//! presence and the IQ handlers of a node (RFC 6120, RFC 6121 and the XEPs listed in
//! `iq::SERVER_FEATURES`).
//!
//! Layout, top-down: [`Server`] owns the listeners and shared state; `c2s` negotiates a
//! connection into a session; `session` runs it (with XEP-0198); `deliver`, `presence`
//! and `iq` decide what happens to each stanza; `hub` knows every session; `xml`,
//! `conn`, `sasl` and `error` are the building blocks underneath.

#![forbid(unsafe_code)]

pub mod c2s;
pub mod config;
pub mod conn;
pub mod core;
mod deliver;
pub mod error;
pub mod hub;
mod iq;
pub mod link;
mod presence;
pub mod sasl;
mod session;
pub mod stanza;
pub mod stats;
pub mod time;
pub mod xml;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use impmesh_store::Store;
use rand::RngCore as _;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use xmpp_parsers::jid::BareJid;

pub use config::{Limits, RouterConfig};
pub use iq::SERVER_FEATURES;
pub use link::{HostResolver, LinkStatus};

use crate::hub::{Hub, lock};

/// Connections accepted but not yet closed, at most (an admission limit before any
/// handshake work, STYLE 5). Sized for the benchmarks' 10 000 idle sessions with room.
const MAX_CONNECTIONS: usize = 65_536;

/// A node's XMPP router.
pub struct Server {
    pub config: RouterConfig,
    pub store: Store,
    pub hub: Hub,
    /// Counters for `/metrics`.
    pub stats: stats::Stats,
    /// TLS for STARTTLS (no ALPN) and for direct TLS (ALPN `xmpp-client`, XEP-0368);
    /// swappable so a new certificate applies to new handshakes without a restart.
    tls_starttls: RwLock<Arc<rustls::ServerConfig>>,
    tls_direct: RwLock<Arc<rustls::ServerConfig>>,
    /// Failed logins per source address: (count, window start).
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
    /// Last in-band registration per source address.
    registrations: Mutex<HashMap<IpAddr, Instant>>,
    /// Key for the made-up salts of unknown users (SCRAM must not reveal which exist).
    salt_key: [u8; 32],
    /// Router links to and from the nodes of peer clusters.
    links: link::Links,
    /// Striped locks ordering the subscription steps of each roster owner.
    roster_locks: Box<[tokio::sync::Mutex<()>]>,
    /// This server, for the tasks it spawns from `&self` methods.
    me: Weak<Server>,
    pub shutdown: CancellationToken,
    tasks: TaskTracker,
    admission: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("domain", &self.config.domain)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Builds a router. `tls_starttls` and `tls_direct` usually come from the node
    /// identity (`impmesh_certs::NodeIdentity::server_config`).
    pub fn new(
        config: RouterConfig,
        store: Store,
        tls_starttls: Arc<rustls::ServerConfig>,
        tls_direct: Arc<rustls::ServerConfig>,
    ) -> Arc<Server> {
        let mut salt_key = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut salt_key);
        Arc::new_cyclic(|me| Server {
            config,
            store,
            hub: Hub::default(),
            stats: stats::Stats::default(),
            tls_starttls: RwLock::new(tls_starttls),
            tls_direct: RwLock::new(tls_direct),
            failures: Mutex::new(HashMap::new()),
            registrations: Mutex::new(HashMap::new()),
            salt_key,
            links: link::Links::default(),
            roster_locks: (0..64).map(|_| tokio::sync::Mutex::new(())).collect(),
            me: me.clone(),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            admission: Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS)),
        })
    }

    /// Replaces the TLS configurations; new handshakes use them at once.
    pub fn set_tls(&self, starttls: Arc<rustls::ServerConfig>, direct: Arc<rustls::ServerConfig>) {
        *self.tls_starttls.write().unwrap_or_else(|e| e.into_inner()) = starttls;
        *self.tls_direct.write().unwrap_or_else(|e| e.into_inner()) = direct;
    }

    pub(crate) fn tls_config(&self, direct: bool) -> Arc<rustls::ServerConfig> {
        let lock = if direct {
            &self.tls_direct
        } else {
            &self.tls_starttls
        };
        lock.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Binds a client listener and serves it until shutdown; returns the bound address.
    /// `direct_tls` selects XEP-0368 direct TLS (port 5223) over STARTTLS (5222).
    pub async fn listen(
        self: &Arc<Self>,
        addr: SocketAddr,
        direct_tls: bool,
    ) -> std::io::Result<SocketAddr> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        tracing::info!(addr = %local, direct_tls, "listening for clients");
        let server = self.clone();
        self.tasks.spawn(async move {
            loop {
                let permit = tokio::select! {
                    _ = server.shutdown.cancelled() => break,
                    p = server.admission.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                };
                let accepted = tokio::select! {
                    _ = server.shutdown.cancelled() => break,
                    a = listener.accept() => a,
                };
                match accepted {
                    Ok((tcp, peer)) => {
                        let server2 = server.clone();
                        server.tasks.spawn(async move {
                            c2s::handle(server2, tcp, peer, direct_tls).await;
                            drop(permit);
                        });
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        Ok(local)
    }

    /// Stops accepting, closes every stream with `system-shutdown` and waits up to
    /// `grace` for the sessions to finish.
    pub async fn shutdown(&self, grace: Duration) {
        self.shutdown.cancel();
        self.tasks.close();
        if tokio::time::timeout(grace, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("some sessions did not close within the grace period");
        }
    }

    /// Whether `owner` (a local user) blocks `jid` (XEP-0191), by bare JID or domain.
    /// Online users' lists come from memory; only offline owners cost a query.
    pub async fn is_blocked_by(&self, owner: &str, jid: &BareJid) -> bool {
        if owner.is_empty() {
            return false;
        }
        let matches =
            |b: &String| b.as_str() == jid.as_str() || b.as_str() == jid.domain().as_str();
        if let Some(list) = self.hub.blocklist(owner) {
            return list.iter().any(matches);
        }
        match self.store.blocklist(owner).await {
            Ok(list) => list.iter().any(matches),
            Err(e) => {
                tracing::error!(error = %e, "cannot read a block list; treating as not blocked");
                false
            }
        }
    }

    /// Counts a login outcome for the per-address throttle. A success does not clear
    /// the count: otherwise one valid account would let an address reset the throttle
    /// between guesses at others. Failures expire with their window.
    pub(crate) fn record_login(&self, ip: IpAddr, ok: bool) {
        if ok {
            return;
        }
        let mut failures = lock(&self.failures);
        let window = self.config.limits.login_failure_window;
        let now = Instant::now();
        let entry = failures.entry(ip).or_insert((0, now));
        if now.duration_since(entry.1) > window {
            *entry = (0, now);
        }
        entry.0 += 1;
        // Bound the table: forget expired windows when it grows.
        if failures.len() > 10_000 {
            failures.retain(|_, (_, start)| now.duration_since(*start) <= window);
        }
    }

    /// Whether logins from `ip` are refused for now.
    pub(crate) fn login_blocked(&self, ip: IpAddr) -> bool {
        let failures = lock(&self.failures);
        failures.get(&ip).is_some_and(|(count, start)| {
            *count >= self.config.limits.login_failures
                && start.elapsed() <= self.config.limits.login_failure_window
        })
    }

    /// Whether `ip` may register an account now (XEP-0077 abuse control, like
    /// Prosody's `min_seconds_between_registrations`).
    pub(crate) fn registration_allowed(&self, ip: IpAddr) -> bool {
        let interval = self.config.registration_interval;
        lock(&self.registrations)
            .get(&ip)
            .is_none_or(|last| last.elapsed() >= interval)
    }

    pub(crate) fn record_registration(&self, ip: IpAddr) {
        let interval = self.config.registration_interval;
        let mut map = lock(&self.registrations);
        // Bound the table: forget addresses whose interval has passed.
        if map.len() > 10_000 {
            map.retain(|_, last| last.elapsed() < interval);
        }
        map.insert(ip, Instant::now());
    }

    /// A stable made-up salt for a user name that does not exist.
    pub(crate) fn fake_salt(&self, username: &str) -> Vec<u8> {
        let mut salt =
            impmesh_store::scram::ScramHash::Sha256.hmac(&self.salt_key, username.as_bytes());
        salt.truncate(16);
        salt
    }

    /// Sessions on this node now.
    pub fn session_count(&self) -> usize {
        self.hub.session_count()
    }
}
