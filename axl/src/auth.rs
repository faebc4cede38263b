//! Who may call what: the intercluster application user on `/axl/` (HTTP Basic over a
//! trusted channel, or the channel-bound OPAQUE exchange then a session token bound to
//! the same TLS connection), and admins on `/admin/v1/` (the local token file, or an
//! admin account). Every attempt that presents credentials is counted when it begins
//! (per address, IPv6 per /64, and per account name) and given back when it succeeds,
//! so parallel connections get no extra guesses (security review M6); failures are
//! also delayed.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use impmesh_store::Store;
use rand::RngCore as _;
use subtle::ConstantTimeEq as _;

use crate::pake::{self, PendingLogin, Setup};

/// The HTTP authentication scheme of the channel-bound exchange (RFC 7804 style).
pub const OPAQUE_SCHEME: &str = "Impmesh-OPAQUE-3DH";
/// The HTTP authentication scheme of a peer cluster calling with the credential this
/// cluster issued to it in `exchangeCertificates`.
pub const PEER_SCHEME: &str = "Impmesh-Peer";

/// SHA-256 of a peering credential, hex; what the issuer keeps.
pub fn token_hash(token: &str) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
/// Pending exchanges kept at most (between KE2 and KE3), over all clients.
const MAX_PENDING: usize = 1024;
/// Pending exchanges one address may hold.
const MAX_PENDING_PER_IP: usize = 8;
/// Time a client has to answer KE2.
const PENDING_TTL: Duration = Duration::from_secs(30);
/// Sessions kept at most.
const MAX_SESSIONS: usize = 4096;

/// Tunables of authentication.
/// Why the cluster's OPAQUE setup could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SetupError {
    #[error(transparent)]
    Store(#[from] impmesh_store::StoreError),
    #[error(transparent)]
    Pake(#[from] pake::PakeError),
}

#[derive(Debug, Clone)]
pub struct AuthLimits {
    /// Wait before answering a failed authentication.
    pub failure_delay: Duration,
    /// Failures an address may have within `failure_window` before it is refused (429).
    pub max_failures: u32,
    pub failure_window: Duration,
    /// Lifetime of a session token from the channel-bound exchange.
    pub session_ttl: Duration,
}

impl Default for AuthLimits {
    fn default() -> AuthLimits {
        AuthLimits {
            failure_delay: Duration::from_secs(1),
            max_failures: 10,
            failure_window: Duration::from_secs(60),
            session_ttl: Duration::from_secs(600),
        }
    }
}

struct Pending {
    login: PendingLogin,
    user: String,
    conn_id: u64,
    ip: IpAddr,
    expires: Instant,
}

struct Session {
    user: String,
    conn_id: u64,
    expires: Instant,
}

/// Authentication state of one HTTPS service.
pub struct AuthState {
    pub limits: AuthLimits,
    admin_token: String,
    setup: tokio::sync::OnceCell<Arc<Setup>>,
    pending: Mutex<HashMap<String, Pending>>,
    sessions: Mutex<HashMap<String, Session>>,
    attempts: impmesh_limits::Throttle<IpAddr>,
    account_attempts: impmesh_limits::Throttle<String>,
}

/// Keys each attempt table keeps at most.
const THROTTLE_KEYS: usize = 100_000;
/// An account name may see this many times the per-address attempts.
const ACCOUNT_FACTOR: u32 = 4;

/// The outcome of checking a request's credentials.
pub enum Outcome {
    /// Authenticated as this user (`peer:CLUSTER` for a peer credential); `info` goes
    /// in `Authentication-Info` when set.
    Ok { user: String, info: Option<String> },
    /// No or incomplete credentials: answer 401 with these `WWW-Authenticate` values.
    Challenge(Vec<String>),
    /// Wrong credentials (already delayed and counted): 401 with this reason.
    Denied(String),
    /// Too many failures from this address: 429.
    Throttled,
}

/// Random URL-safe token of 32 bytes.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The auth-params of a credentials or challenge header value (`key="value", key=value`).
pub(crate) fn params(text: &str) -> HashMap<String, String> {
    text.split(',')
        .filter_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            Some((
                k.trim().to_ascii_lowercase(),
                v.trim().trim_matches('"').to_owned(),
            ))
        })
        .collect()
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

fn unb64(text: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD.decode(text).ok()
}

/// Splits `Basic` credentials into user and password.
fn basic(value: &str) -> Option<(String, String)> {
    let decoded = unb64(value.trim())?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

impl AuthState {
    pub fn new(limits: AuthLimits, admin_token: String) -> AuthState {
        AuthState {
            setup: tokio::sync::OnceCell::new(),
            pending: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            attempts: impmesh_limits::Throttle::new(
                limits.max_failures,
                limits.failure_window,
                THROTTLE_KEYS,
            ),
            account_attempts: impmesh_limits::Throttle::new(
                limits.max_failures.saturating_mul(ACCOUNT_FACTOR),
                limits.failure_window,
                THROTTLE_KEYS,
            ),
            limits,
            admin_token,
        }
    }

    /// The cluster's OPAQUE setup, created in the store the first time any node needs it.
    pub async fn setup(&self, store: &Store) -> Result<Arc<Setup>, SetupError> {
        let setup = self
            .setup
            .get_or_try_init(|| async {
                let bytes = store
                    .cluster_secret(pake::SETUP_SECRET, pake::new_server_setup)
                    .await?;
                Ok::<_, SetupError>(Arc::new(Setup::load(&bytes)?))
            })
            .await?;
        Ok(setup.clone())
    }

    /// Whether `ip` has used up its attempts.
    pub fn throttled(&self, ip: IpAddr) -> bool {
        self.attempts.is_blocked(&impmesh_limits::address_key(ip))
    }

    /// Counts an attempt by `ip` (and `account`, when the credentials name one) before
    /// anything is verified; false when either has used up its attempts.
    fn reserve(&self, ip: IpAddr, account: Option<&str>) -> bool {
        let key = impmesh_limits::address_key(ip);
        if !self.attempts.attempt(&key) {
            return false;
        }
        if let Some(account) = account
            && !self.account_attempts.attempt(&account.to_owned())
        {
            self.attempts.refund(&key);
            return false;
        }
        true
    }

    /// The reserved attempt succeeded: it does not count.
    fn release(&self, ip: IpAddr, account: Option<&str>) {
        self.attempts.refund(&impmesh_limits::address_key(ip));
        if let Some(account) = account {
            self.account_attempts.refund(&account.to_owned());
        }
    }

    /// A failed attempt (already counted): waits the failure delay.
    pub async fn fail(&self, ip: IpAddr, why: &str) -> Outcome {
        tracing::warn!(%ip, reason = why, "authentication failed");
        tokio::time::sleep(self.limits.failure_delay).await;
        Outcome::Denied(why.to_owned())
    }

    /// Authenticates an admin: `Bearer` with the node's admin token, or `Basic` with an
    /// admin account.
    pub async fn admin(&self, store: &Store, ip: IpAddr, authorization: Option<&str>) -> Outcome {
        if self.throttled(ip) {
            return Outcome::Throttled;
        }
        let Some(value) = authorization else {
            return Outcome::Challenge(vec![
                "Bearer realm=\"impmesh-admin\"".into(),
                "Basic realm=\"impmesh-admin\"".into(),
            ]);
        };
        let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
        let basic_user = scheme
            .eq_ignore_ascii_case("basic")
            .then(|| basic(rest))
            .flatten();
        let account = basic_user.as_ref().map(|(u, _)| u.as_str());
        if !self.reserve(ip, account) {
            return Outcome::Throttled;
        }
        if scheme.eq_ignore_ascii_case("bearer") {
            let ok: bool = rest
                .trim()
                .as_bytes()
                .ct_eq(self.admin_token.as_bytes())
                .into();
            if ok {
                self.release(ip, None);
                return Outcome::Ok {
                    user: "local-admin-token".into(),
                    info: None,
                };
            }
            return self.fail(ip, "wrong admin token").await;
        }
        if let Some((user, password)) = basic_user {
            // PBKDF2 on a blocking thread, bounded with every other derivation.
            if let Ok(Some(verifier)) = store.admin_user(&user).await
                && store.check_password(Some(verifier), &password).await
            {
                self.release(ip, Some(&user));
                return Outcome::Ok { user, info: None };
            }
            return self.fail(ip, "wrong admin user or password").await;
        }
        self.fail(ip, "unsupported authorization scheme").await
    }

    /// Authenticates the intercluster application user on connection `conn_id`, whose
    /// TLS exporter value is `exporter` (None below TLS 1.3).
    pub async fn axl(
        &self,
        store: &Store,
        ip: IpAddr,
        conn_id: u64,
        exporter: Option<&[u8]>,
        authorization: Option<&str>,
    ) -> Outcome {
        if self.throttled(ip) {
            return Outcome::Throttled;
        }
        let Some(value) = authorization else {
            return Outcome::Challenge(vec![
                format!("{OPAQUE_SCHEME} realm=\"axl\""),
                "Basic realm=\"axl\"".into(),
            ]);
        };
        let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
        let opaque = scheme
            .eq_ignore_ascii_case(OPAQUE_SCHEME)
            .then(|| params(rest));
        // The second OPAQUE message finishes an attempt counted at the first.
        let finishing = opaque.as_ref().is_some_and(|p| p.contains_key("sid"));
        let basic_user = scheme
            .eq_ignore_ascii_case("basic")
            .then(|| basic(rest))
            .flatten();
        let account = basic_user.as_ref().map(|(u, _)| u.as_str());
        if !finishing && !self.reserve(ip, account) {
            return Outcome::Throttled;
        }
        if scheme.eq_ignore_ascii_case("basic") {
            let Some((user, password)) = basic_user else {
                return self.fail(ip, "malformed Basic credentials").await;
            };
            if let Ok(Some(axl)) = store.axl_user(&user).await
                && store
                    .check_password(Some(axl.scram_sha256), &password)
                    .await
            {
                self.release(ip, Some(&user));
                return Outcome::Ok { user, info: None };
            }
            return self.fail(ip, "wrong AXL user or password").await;
        }
        if scheme.eq_ignore_ascii_case("bearer") {
            let token = rest.trim();
            if let Some(user) = self.session_user(token, conn_id) {
                self.release(ip, None);
                return Outcome::Ok { user, info: None };
            }
            return self
                .fail(ip, "unknown, expired or foreign session token")
                .await;
        }
        if scheme.eq_ignore_ascii_case(PEER_SCHEME) {
            let p = params(rest);
            let (Some(cluster), Some(token)) = (p.get("cluster"), p.get("token")) else {
                return self.fail(ip, "malformed peer credentials").await;
            };
            if let Ok(Some(peer)) = store.peer(cluster).await
                && let Some(hash) = peer.their_token_hash
                && bool::from(hash.as_bytes().ct_eq(token_hash(token).as_bytes()))
            {
                self.release(ip, None);
                return Outcome::Ok {
                    user: format!("peer:{cluster}"),
                    info: None,
                };
            }
            return self.fail(ip, "unknown peer or wrong peer credential").await;
        }
        if let Some(p) = opaque {
            let Some(exporter) = exporter else {
                return self
                    .fail(ip, "the channel-bound exchange needs TLS 1.3")
                    .await;
            };
            return match (
                p.get("sid"),
                p.get("user"),
                p.get("data").and_then(|d| unb64(d)),
            ) {
                (None, Some(user), Some(ke1)) => {
                    self.opaque_start(store, ip, conn_id, exporter, user, &ke1)
                        .await
                }
                (Some(sid), None, Some(ke3)) => self.opaque_finish(ip, conn_id, sid, &ke3).await,
                _ => self.fail(ip, "malformed OPAQUE credentials").await,
            };
        }
        self.fail(ip, "unsupported authorization scheme").await
    }

    /// The user of a live session token issued on connection `conn_id`.
    fn session_user(&self, token: &str, conn_id: u64) -> Option<String> {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        match sessions.get(token) {
            Some(s) if s.expires > Instant::now() && s.conn_id == conn_id => Some(s.user.clone()),
            Some(s) if s.expires <= Instant::now() => {
                sessions.remove(token);
                None
            }
            _ => None,
        }
    }

    async fn opaque_start(
        &self,
        store: &Store,
        ip: IpAddr,
        conn_id: u64,
        exporter: &[u8],
        user: &str,
        ke1: &[u8],
    ) -> Outcome {
        let user = String::from_utf8(unb64(user).unwrap_or_default()).unwrap_or_default();
        let setup = match self.setup(store).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot load the OPAQUE setup");
                return Outcome::Denied("the server cannot authenticate now".into());
            }
        };
        let record = store
            .axl_user(&user)
            .await
            .ok()
            .flatten()
            .map(|u| u.opaque_record);
        let (login, ke2) = match setup.server_start(record.as_deref(), &user, ke1, exporter) {
            Ok(r) => r,
            Err(e) => return self.fail(ip, &e.to_string()).await,
        };
        let sid = random_token();
        {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            pending.retain(|_, p| p.expires > now);
            let key = impmesh_limits::address_key(ip);
            let mine = pending
                .values()
                .filter(|p| impmesh_limits::address_key(p.ip) == key)
                .count();
            if pending.len() >= MAX_PENDING || mine >= MAX_PENDING_PER_IP {
                return Outcome::Throttled;
            }
            pending.insert(
                sid.clone(),
                Pending {
                    login,
                    user,
                    conn_id,
                    ip,
                    expires: now + PENDING_TTL,
                },
            );
        }
        Outcome::Challenge(vec![format!(
            "{OPAQUE_SCHEME} sid=\"{sid}\", data=\"{}\"",
            b64(&ke2)
        )])
    }

    async fn opaque_finish(&self, ip: IpAddr, conn_id: u64, sid: &str, ke3: &[u8]) -> Outcome {
        let pending = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(sid);
        let Some(p) = pending.filter(|p| p.expires > Instant::now()) else {
            return self.fail(ip, "unknown or expired OPAQUE exchange").await;
        };
        if p.conn_id != conn_id {
            return self
                .fail(
                    ip,
                    "the OPAQUE exchange must finish on the connection it began on",
                )
                .await;
        }
        if let Err(e) = p.login.finish(ke3) {
            return self.fail(ip, &e.to_string()).await;
        }
        let token = random_token();
        {
            let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            if sessions.len() >= MAX_SESSIONS {
                sessions.retain(|_, s| s.expires > now);
            }
            sessions.insert(
                token.clone(),
                Session {
                    user: p.user.clone(),
                    conn_id,
                    expires: now + self.limits.session_ttl,
                },
            );
        }
        tracing::info!(%ip, user = %p.user, "channel-bound OPAQUE authentication succeeded");
        // The attempt counted when KE2 was issued (a client can test a guess from KE2
        // alone, security review M7) is given back only now.
        self.release(p.ip, None);
        Outcome::Ok {
            user: p.user,
            info: Some(format!("sid=\"{sid}\", token=\"{token}\"")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_params_and_basic_are_parsed() {
        let p = params(" sid=\"abc\", data=\"x/y+=\" ,user=bob");
        assert_eq!(p["sid"], "abc");
        assert_eq!(p["data"], "x/y+=");
        assert_eq!(p["user"], "bob");
        assert_eq!(
            basic(&b64(b"icsync:pa:ss")),
            Some(("icsync".into(), "pa:ss".into()))
        );
        assert_eq!(basic("%%%"), None);
    }
}
