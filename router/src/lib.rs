//! The impmesh XMPP router: client listeners, stream negotiation, sessions, routing,
//! presence and the IQ handlers of a node (RFC 6120, RFC 6121 and the XEPs listed in
//! `iq::SERVER_FEATURES`).
//!
//! Layout, top-down: [`Server`] owns the listeners and shared state; `c2s` negotiates a
//! connection into a session; `session` runs it (with XEP-0198); `deliver`, `presence`
//! and `iq` decide what happens to each stanza; `hub` knows every session; `xml`,
//! `conn`, `sasl` and `error` are the building blocks underneath.

#![forbid(unsafe_code)]

mod avatar;
pub mod c2s;
pub mod config;
pub mod conn;
mod context;
pub mod core;
mod deliver;
pub mod error;
mod from_link;
pub mod hub;
mod iq;
pub mod link;
mod mam;
mod muc;
pub mod names;
mod pep;
mod presence;
mod push;
mod roster;
pub mod sasl;
mod session;
pub mod stanza;
pub mod stats;
pub mod time;
mod upload;
pub mod xml;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use impmesh_store::Store;
use jid::BareJid;
use rand::RngCore as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{ArchiveSettings, Limits, RouterConfig, UploadSettings};
pub use iq::SERVER_FEATURES;
pub use link::{HostResolver, LinkDirection, LinkStatus};
pub use muc::{MucSettings, RoomAdminError, RoomInfo};

use crate::hub::Hub;

/// Keys each throttle table keeps at most (addresses, accounts): a hard bound on
/// their memory whatever the number of sources.
const THROTTLE_KEYS: usize = 100_000;

/// An account may see this many times the per-address login failures: enough that
/// guesses spread over many addresses are stopped, while its owner is not locked out
/// by a single attacker's address.
const ACCOUNT_LOGIN_FACTOR: u32 = 4;

/// XEP-0077 password changes per account per window (each derives new verifiers).
const PASSWORD_CHANGES: u32 = 3;
const PASSWORD_CHANGE_WINDOW: Duration = Duration::from_secs(60);

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
    /// The STARTTLS configuration with ALPN `http/1.1`, for the client HTTPS
    /// listener (file upload); derived whenever the certificate changes.
    tls_https: RwLock<Arc<rustls::ServerConfig>>,
    /// Login attempts per source address (IPv6 per /64) and per account, reserved
    /// before the credentials are checked and given back on success.
    logins: impmesh_limits::Throttle<IpAddr>,
    account_logins: impmesh_limits::Throttle<String>,
    /// In-band registration attempts per source address, failed ones included.
    registrations: impmesh_limits::Throttle<IpAddr>,
    /// XEP-0077 password changes per account.
    password_changes: impmesh_limits::Throttle<String>,
    /// Key for the made-up salts of unknown users (SCRAM must not reveal which exist):
    /// a cluster secret in the store, the same on every node and across restarts.
    salt_key: tokio::sync::OnceCell<Vec<u8>>,
    /// The key Bind 2 resources are derived with (`core::sasl2::resource`), the same
    /// on every node of the cluster.
    bind_key: tokio::sync::OnceCell<Vec<u8>>,
    /// The server's disco#info and its XEP-0115 `ver`, as last computed.
    caps: std::sync::Mutex<Option<(String, Option<String>)>>,
    /// Router links to and from the nodes of peer clusters.
    links: Arc<link::Links>,
    /// What this node passed on of remote users' presence, per remote node.
    remote_presence: from_link::RemotePresence,
    /// Personal eventing: capabilities and who wants which notifications.
    pep: pep::Pep,
    /// Message archives: the batched writer's queue, preferences.
    archive: mam::Archive,
    /// Chat rooms (XEP-0045) of this node.
    muc: muc::Rooms,
    /// Push notifications: answers awaited, the throttle.
    push: push::Push,
    /// The avatar hash of each account seen lately (XEP-0153).
    avatars: avatar::Hashes,
    /// Striped locks ordering the subscription steps of each roster owner.
    roster_locks: Box<[tokio::sync::Mutex<()>]>,
    /// This server, for the tasks it spawns from `&self` methods.
    me: Weak<Server>,
    pub shutdown: CancellationToken,
    tasks: TaskTracker,
    admission: Arc<tokio::sync::Semaphore>,
    /// Unauthenticated client connections per address (IPv6 per /64).
    preauth: Arc<impmesh_limits::PerAddress>,
    /// Where this node serves uploaded files, once its HTTPS listener is up.
    upload_url: std::sync::OnceLock<String>,
    /// The cluster's media relays for XEP-0215, once the node's relay is up.
    turn: std::sync::OnceLock<Arc<dyn TurnServices>>,
}

/// The media relays a user is given through XEP-0215 (`urn:xmpp:extdisco:2`), each
/// TURN relay with a short-lived credential for that user. The node implements it
/// over its relay and the cluster's TURN secret.
pub trait TurnServices: Send + Sync + 'static {
    fn services(&self, user: &str) -> Vec<core::extdisco::Service>;
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
        let preauth_per_address = config.limits.preauth_connections_per_address;
        let logins = impmesh_limits::Throttle::new(
            config.limits.login_failures,
            config.limits.login_failure_window,
            THROTTLE_KEYS,
        );
        let account_logins = impmesh_limits::Throttle::new(
            config
                .limits
                .login_failures
                .saturating_mul(ACCOUNT_LOGIN_FACTOR),
            config.limits.login_failure_window,
            THROTTLE_KEYS,
        );
        let registrations =
            impmesh_limits::Throttle::new(1, config.registration_interval, THROTTLE_KEYS);
        let password_changes =
            impmesh_limits::Throttle::new(PASSWORD_CHANGES, PASSWORD_CHANGE_WINDOW, THROTTLE_KEYS);
        let max_connections = config.limits.max_connections;
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        Arc::new_cyclic(|me: &Weak<Server>| Server {
            links: link::Links::new(
                config.clone(),
                store.clone(),
                me.clone(),
                shutdown.clone(),
                tasks.clone(),
            ),
            remote_presence: from_link::RemotePresence::default(),
            pep: pep::Pep::default(),
            push: push::Push::default(),
            avatars: avatar::Hashes::default(),
            muc: muc::Rooms::default(),
            archive: mam::Archive::start(
                store.clone(),
                config.archive.retention,
                shutdown.clone(),
                &tasks,
            ),
            config,
            store,
            hub: Hub::default(),
            stats: stats::Stats::default(),
            tls_https: RwLock::new(for_https(&tls_starttls)),
            tls_starttls: RwLock::new(tls_starttls),
            tls_direct: RwLock::new(tls_direct),
            logins,
            account_logins,
            registrations,
            password_changes,
            salt_key: tokio::sync::OnceCell::new(),
            bind_key: tokio::sync::OnceCell::new(),
            caps: std::sync::Mutex::new(None),
            roster_locks: (0..64).map(|_| tokio::sync::Mutex::new(())).collect(),
            me: me.clone(),
            shutdown,
            tasks,
            admission: Arc::new(tokio::sync::Semaphore::new(max_connections)),
            preauth: impmesh_limits::PerAddress::new(preauth_per_address),
            upload_url: std::sync::OnceLock::new(),
            turn: std::sync::OnceLock::new(),
        })
    }

    /// Replaces the TLS configurations; new handshakes use them at once.
    pub fn set_tls(&self, starttls: Arc<rustls::ServerConfig>, direct: Arc<rustls::ServerConfig>) {
        *self.tls_https.write().unwrap_or_else(|e| e.into_inner()) = for_https(&starttls);
        *self.tls_starttls.write().unwrap_or_else(|e| e.into_inner()) = starttls;
        *self.tls_direct.write().unwrap_or_else(|e| e.into_inner()) = direct;
    }

    /// The client certificate's TLS configuration without ALPN (STARTTLS's), for other
    /// client-facing services of the node (the TURN relay's TLS port); a reload
    /// reaches it at the next handshake.
    pub fn client_tls(&self) -> Arc<rustls::ServerConfig> {
        self.tls_config(false)
    }

    /// The TLS configuration of the client HTTPS listener.
    pub(crate) fn tls_https(&self) -> Arc<rustls::ServerConfig> {
        self.tls_https
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
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
        if let Err(e) = impmesh_limits::set_dscp(&listener, self.config.dscp) {
            tracing::debug!(error = %e, "cannot set the DSCP class of a listener");
        }
        let local = listener.local_addr()?;
        tracing::info!(addr = %local, direct_tls, "listening for clients");
        let server = self.clone();
        self.tasks.spawn(async move {
            while let Some((permit, tcp, peer)) =
                admit(&server.shutdown, &listener, &server.admission, "clients").await
            {
                // Closed at once, before any TLS or parsing work, when its address
                // already has its share of unauthenticated streams.
                let Some(slot) = server.preauth.acquire(peer.ip()) else {
                    server.stats.refused_preauth();
                    continue;
                };
                let server2 = server.clone();
                server
                    .tasks
                    .spawn(c2s::handle(server2, tcp, peer, direct_tls, slot, permit));
            }
        });
        Ok(local)
    }

    /// Unauthenticated client connections open from `ip`'s address key (IPv6: its
    /// /64), as the per-address cap counts them.
    pub fn unauthenticated_connections(&self, ip: std::net::IpAddr) -> u32 {
        self.preauth.open(ip)
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
    /// Online users' lists come from memory; only offline owners cost a query. A list
    /// that cannot be read counts as blocking.
    pub async fn is_blocked_by(&self, owner: &str, jid: &BareJid) -> bool {
        if owner.is_empty() {
            return false;
        }
        let matches =
            |b: &String| b.as_str() == jid.as_str() || b.as_str() == jid.domain().as_str();
        if let Some(list) = self.hub.blocklist(owner) {
            return list.iter().any(matches);
        }
        // Fail closed (security review L2): a list that cannot be read, even on a second
        // try, blocks; the sender gets the error a block gives, nothing is delivered
        // against the owner's wishes.
        for attempt in 0..2 {
            match self.store.blocklist(owner).await {
                Ok(list) => return list.iter().any(matches),
                Err(e) if attempt == 0 => {
                    tracing::warn!(error = %e, "cannot read a block list; trying again");
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot read a block list; treating as blocked");
                }
            }
        }
        true
    }

    /// Reserves a login attempt for `ip` and `user` before their credentials are
    /// checked: false when either has used up its attempts (parallel connections get
    /// no extra guesses, security review M6). A success gives the attempt back.
    pub(crate) fn reserve_login(&self, ip: IpAddr, user: &str) -> bool {
        let key = impmesh_limits::address_key(ip);
        if !self.logins.attempt(&key) {
            return false;
        }
        if !self.account_logins.attempt(&user.to_owned()) {
            self.logins.refund(&key);
            return false;
        }
        true
    }

    /// Gives a reserved attempt back: it succeeded, or the server failed to check it;
    /// neither counts against anyone.
    pub(crate) fn release_login(&self, ip: IpAddr, user: &str) {
        self.logins.refund(&impmesh_limits::address_key(ip));
        self.account_logins.refund(&user.to_owned());
    }

    /// Whether logins from `ip` are refused for now (checked before any work).
    pub fn login_blocked(&self, ip: IpAddr) -> bool {
        self.logins.is_blocked(&impmesh_limits::address_key(ip))
    }

    /// Counts an in-band registration attempt from `ip` (XEP-0077 abuse control, like
    /// Prosody's `min_seconds_between_registrations`, failed attempts included); false
    /// when the address must wait.
    pub(crate) fn registration_attempt(&self, ip: IpAddr) -> bool {
        self.registrations.attempt(&impmesh_limits::address_key(ip))
    }

    /// Counts a password change by `user`; false when it made too many lately.
    pub(crate) fn password_change_attempt(&self, user: &str) -> bool {
        self.password_changes.attempt(&user.to_owned())
    }

    /// A stable made-up salt for a (normalised) user name that does not exist.
    pub(crate) async fn fake_salt(
        &self,
        username: &str,
    ) -> Result<Vec<u8>, impmesh_store::StoreError> {
        let key = self.cluster_key(&self.salt_key, "scram-fake-salt").await?;
        let mut salt = impmesh_store::scram::ScramHash::Sha256.hmac(key, username.as_bytes());
        salt.truncate(16);
        Ok(salt)
    }

    /// The cluster's key for Bind 2 resources.
    pub(crate) async fn bind_key(&self) -> Result<&[u8], impmesh_store::StoreError> {
        self.cluster_key(&self.bind_key, "bind2-resource").await
    }

    /// A random key the whole cluster shares under `name` (kept in the store, made
    /// by the first node that needs it), read once into `cell`.
    async fn cluster_key<'a>(
        &self,
        cell: &'a tokio::sync::OnceCell<Vec<u8>>,
        name: &str,
    ) -> Result<&'a [u8], impmesh_store::StoreError> {
        let key = cell
            .get_or_try_init(|| {
                self.store.cluster_secret(name, || {
                    let mut key = vec![0u8; 32];
                    rand::thread_rng().fill_bytes(&mut key);
                    key
                })
            })
            .await?;
        Ok(key)
    }

    /// Sessions on this node now.
    pub fn session_count(&self) -> usize {
        self.hub.session_count()
    }
}

/// `config` with ALPN `http/1.1` (the client HTTPS listener).
fn for_https(config: &Arc<rustls::ServerConfig>) -> Arc<rustls::ServerConfig> {
    let mut https = (**config).clone();
    https.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(https)
}

/// Waits for a connection on `listener`, then for an admission permit; `None` once
/// `shutdown` is cancelled. An accept error (EMFILE and friends) backs off instead of
/// spinning. Every listener of the node (clients, router links) admits through here.
///
/// The permit is taken after the accept: a listener waiting for connections holds
/// none, so several listeners sharing a limit (STARTTLS and direct TLS) together admit
/// exactly the limit. While none is free, a listener holds at most the one connection
/// it accepted (no handshake work yet) and accepts no more: the kernel's backlog holds
/// the rest.
pub(crate) async fn admit(
    shutdown: &CancellationToken,
    listener: &TcpListener,
    admission: &Arc<tokio::sync::Semaphore>,
    what: &'static str,
) -> Option<(
    tokio::sync::OwnedSemaphorePermit,
    tokio::net::TcpStream,
    SocketAddr,
)> {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return None,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((tcp, peer)) => {
                let permit = tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    p = admission.clone().acquire_owned() => p.ok()?,
                };
                return Some((permit, tcp, peer));
            }
            Err(e) => {
                tracing::warn!(error = %e, listener = what, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
