//! Wiring of one node: data directory, store, identity, router and listeners.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use impmesh_axl::{Https, ServiceIdentity, Surface};
use impmesh_certs::NodeIdentity;
use impmesh_router::Server;
use impmesh_store::Store;
use impmesh_store::alarms::{self, AlarmDef};
use impmesh_sync_agent::{Agent, Ours};
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::control::Control;

/// How often a running node re-checks its certificate's expiry and prunes tombstones.
const HOURLY: Duration = Duration::from_secs(3600);

/// How long deleted users' tombstones are kept for peers that sync incrementally; a
/// peer further behind does a full sync.
const TOMBSTONE_RETENTION: Duration = Duration::from_secs(30 * 86_400);

/// Time sessions get to close their streams on shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Time the store has to close its connections after the grace period.
const STORE_CLOSE: Duration = Duration::from_secs(5);

/// A running node.
pub struct Node {
    pub server: Arc<Server>,
    /// The node as the HTTPS service sees it; owns the identity in use.
    pub control: Arc<Control>,
    pub https: Arc<Https<Control>>,
    /// Bound STARTTLS listeners (real ports when the config asked for port 0).
    pub c2s: Vec<SocketAddr>,
    /// Bound direct-TLS listeners.
    pub c2s_direct_tls: Vec<SocketAddr>,
    /// The bound HTTPS listener.
    pub https_addr: SocketAddr,
    /// The bound admin listener (admin API, /metrics).
    pub admin_addr: SocketAddr,
    /// The bound router-link listener, if any.
    pub links_addr: Option<SocketAddr>,
    /// The intercluster sync agent.
    pub agent: Arc<Agent>,
    /// The node's own background tasks (account changes, notices, hourly checks).
    tasks: TaskTracker,
}

/// `host:port`, bracketing an IPv6 address.
fn host_port(host: &str, port: u16) -> String {
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => SocketAddr::new(ip, port).to_string(),
        Err(_) => format!("{host}:{port}"),
    }
}

/// The admin token file in the data directory (like ejabberdctl's cookie): whoever can
/// read it administers the node through the admin API.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// Reads the admin token, creating it (mode 0600) at first use.
pub fn admin_token(config: &Config) -> anyhow::Result<String> {
    let path = config.data_dir.join(ADMIN_TOKEN_FILE);
    refuse_readable_secret(&path)?;
    match std::fs::read_to_string(&path) {
        Ok(token) if !token.trim().is_empty() => return Ok(token.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
    }
    create_data_dir(&config.data_dir)?;
    let token = impmesh_axl::auth::random_token();
    let tmp = path.with_extension("token.tmp");
    // A leftover temporary file keeps its mode when reopened: start afresh.
    let _ = std::fs::remove_file(&tmp);
    {
        use std::io::Write as _;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options
            .open(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        file.write_all(token.as_bytes())?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(token)
}

/// File descriptors the node would like: every client connection the router admits
/// (65,536), the links and HTTPS connections, the store and some slack.
const WANTED_FILES: u64 = 70_000;

/// Raises the soft limit on open files to the hard one (the default soft limit of
/// 1,024 would stop the node long before its connection limits) and says what the
/// ceiling is when it is below what the node may need (security review H3, M10).
fn raise_file_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let (soft, hard) = (limit.current, limit.maximum);
    let target = hard.unwrap_or(WANTED_FILES.max(soft.unwrap_or(0)));
    let raised = if soft.is_some_and(|s| s < target) {
        let new = rustix::process::Rlimit {
            current: Some(target),
            maximum: hard,
        };
        setrlimit(Resource::Nofile, new).is_ok()
    } else {
        false
    };
    let now = getrlimit(Resource::Nofile).current;
    match now {
        Some(n) if n < WANTED_FILES => tracing::warn!(
            open_files = n,
            wanted = WANTED_FILES,
            "the open-file limit is below what the node's connection limits allow; raise the hard limit (LimitNOFILE= in systemd, ulimit -Hn) or expect accept errors under load"
        ),
        _ => tracing::info!(open_files = ?now, raised, "open-file limit"),
    }
}

/// The one place local account changes take effect beyond the store, however they were
/// made (admin API, CLI through the API, in-band registration or cancellation): peers
/// are told at once and asked to re-check duplicates, and a removed account's sessions
/// are closed (security review M12: in-band cancellation left them running).
fn spawn_account_listener(
    tasks: &TaskTracker,
    mut changes: tokio::sync::broadcast::Receiver<impmesh_store::AccountChange>,
    server: Arc<Server>,
    agent: Arc<Agent>,
) {
    use impmesh_store::AccountChange;
    use impmesh_sync_agent::DuplicateScope;
    tasks.spawn(async move {
        loop {
            let change = tokio::select! {
                _ = server.shutdown.cancelled() => break,
                change = changes.recv() => change,
            };
            let scope = match change {
                Ok(AccountChange::Added(user)) => DuplicateScope::Users(vec![user]),
                Ok(AccountChange::Removed(user)) => {
                    let closed = server.hub.disconnect_user(&user);
                    if closed > 0 {
                        tracing::info!(%user, sessions = closed, "closed the sessions of a removed account");
                    }
                    DuplicateScope::Users(vec![user])
                }
                Ok(_) => DuplicateScope::All,
                // Missed some: whatever they were, peers learn by the next USN.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => DuplicateScope::All,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            };
            if let Ok(usn) = server.store.current_usn().await {
                agent.notify_peers(usn);
            }
            agent.request_duplicate_check(scope);
        }
    });
}

/// Creates the data directory (0700), checks that no secret in it can be read by
/// others, and opens (and migrates) the store, an SQLite file created 0600 (security
/// review M13, L9: it holds peer tokens, the OPAQUE server key and verifiers).
pub async fn open_store(config: &Config) -> anyhow::Result<Store> {
    create_data_dir(&config.data_dir)?;
    refuse_readable_secret(&config.data_dir.join(ADMIN_TOKEN_FILE))?;
    refuse_readable_secret(&config.data_dir.join("certs").join(impmesh_certs::KEY_FILE))?;
    if let Some(path) = sqlite_file(config) {
        make_private(&path)?;
    }
    let store = Store::open(&config.store.url, &config.data_dir)
        .await
        .with_context(|| format!("cannot open the store {}", config.store.url))?;
    store.set_scram_iterations(config.limits.scram_iterations);
    Ok(store)
}

/// Creates the data directory readable by its owner only (an existing one is left as
/// the admin made it).
pub fn create_data_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
        .create(dir)
        .with_context(|| format!("cannot create data directory {}", dir.display()))
}

/// Fails when a secret file exists and others than its owner may read or write it.
fn refuse_readable_secret(path: &std::path::Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    if let Ok(meta) = std::fs::metadata(path) {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            anyhow::bail!(
                "{} is a secret but has mode {mode:03o}: other users can read it. Run `chmod 600 {}` (and consider it leaked: regenerate it if others had access)",
                path.display(),
                path.display()
            );
        }
    }
    Ok(())
}

/// The SQLite database file of the configuration, if the store is one.
fn sqlite_file(config: &Config) -> Option<std::path::PathBuf> {
    let url = &config.store.url;
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or_default();
    (path != ":memory:" && !path.is_empty()).then(|| config.data_dir.join(path))
}

/// Creates the database file 0600 before SQLite does (SQLite then gives its `-wal`
/// and `-shm` files the same mode), and tightens one an older version made readable.
fn make_private(path: &std::path::Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        for suffix in ["", "-wal", "-shm"] {
            let file = std::path::PathBuf::from(format!("{}{suffix}", path.display()));
            if let Ok(meta) = std::fs::metadata(&file)
                && meta.permissions().mode() & 0o077 != 0
            {
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))
                    .with_context(|| format!("cannot restrict {}", file.display()))?;
                tracing::warn!(file = %file.display(), "the store was readable by other users; now 0600");
            }
        }
    }
    Ok(())
}

/// The expiry alarm a certificate deserves `secs_left` seconds before it expires.
pub fn expiry_alarm(secs_left: i64) -> Option<&'static AlarmDef> {
    const DAY: i64 = 86_400;
    match secs_left {
        s if s <= 0 => Some(alarms::CERT_EXPIRED),
        s if s <= 7 * DAY => Some(alarms::CERT_EXPIRING),
        s if s <= 30 * DAY => Some(alarms::CERT_EXPIRING_SOON),
        _ => None,
    }
}

/// Raises the expiry alarm each certificate in use deserves now and clears the
/// others, including those of certificates no longer in use.
pub async fn check_certificates(store: &Store, in_use: &[&NodeIdentity]) -> anyhow::Result<()> {
    let family = [
        alarms::CERT_EXPIRING_SOON,
        alarms::CERT_EXPIRING,
        alarms::CERT_EXPIRED,
    ];
    let mut wanted = vec![];
    for identity in in_use {
        let info = impmesh_certs::describe(&identity.chain[0])?;
        let secs_left = info.not_after_unix - impmesh_store::now_unix();
        if let Some(def) = expiry_alarm(secs_left) {
            wanted.push((def, info));
        }
    }
    let fingerprints: Vec<String> = in_use.iter().map(|i| i.fingerprint()).collect();
    for active in store.active_alarms().await? {
        let Some(def) = family.iter().find(|d| d.name == active.name) else {
            continue;
        };
        let still = wanted
            .iter()
            .any(|(w, info)| w.name == def.name && info.sha256 == active.subject);
        if !still {
            let why = if fingerprints.contains(&active.subject) {
                "no longer applies"
            } else {
                "the certificate was replaced"
            };
            store.clear_alarm(def, &active.subject, why).await?;
        }
    }
    for (def, info) in wanted {
        let message = format!(
            "certificate {} valid until {}",
            info.subject, info.not_after
        );
        store.raise_alarm(def, &info.sha256, &message).await?;
    }
    Ok(())
}

/// The client-facing certificate of `[tls]`, when one is configured: checked to cover
/// the domain and to be valid now.
pub fn client_identity(config: &Config) -> anyhow::Result<Option<NodeIdentity>> {
    let (Some(cert), Some(key)) = (&config.tls.client_certificate, &config.tls.client_key) else {
        return Ok(None);
    };
    let (cert, key) = (config.data_dir.join(cert), config.data_dir.join(key));
    let identity = NodeIdentity::load(&cert, &key)
        .with_context(|| format!("cannot load the client certificate {}", cert.display()))?;
    impmesh_certs::check_identity(&identity, std::slice::from_ref(&config.domain))
        .with_context(|| format!("the client certificate {} cannot serve", cert.display()))?;
    Ok(Some(identity))
}

/// The names a node certificate must cover: the XMPP domain and the node name.
pub fn required_names(config: &Config) -> Vec<String> {
    let mut names = vec![config.domain.clone()];
    if config.node_name() != config.domain {
        names.push(config.node_name());
    }
    names
}

/// Checks and installs a CA-signed certificate (PEM) for this node; a running node
/// uses it after a reload. Returns the new fingerprint.
pub fn import_certificate(
    config: &Config,
    cert: &[u8],
    key: Option<&[u8]>,
    chain: Option<&[u8]>,
) -> anyhow::Result<String> {
    let current = identity(config)?;
    let new = current.import(
        &config.data_dir.join("certs"),
        cert,
        key,
        chain,
        &required_names(config),
    )?;
    Ok(new.fingerprint())
}

/// Checks and installs a PKCS#12 archive (key and chain) for this node; returns the new
/// fingerprint.
pub fn import_pkcs12(config: &Config, archive: &[u8], password: &str) -> anyhow::Result<String> {
    let current = identity(config)?;
    let new = current.import_pkcs12(
        &config.data_dir.join("certs"),
        archive,
        password,
        &required_names(config),
    )?;
    Ok(new.fingerprint())
}

/// Replaces the node's key and certificate with a new self-signed pair for the same
/// names; returns the new fingerprint.
pub fn regenerate_certificate(config: &Config) -> anyhow::Result<String> {
    let names = certificate_names(config);
    let dir = config.data_dir.join("certs");
    Ok(NodeIdentity::regenerate(&dir, &names)?.fingerprint())
}

/// The SANs of a generated certificate: the domain, the node name, the cluster name.
/// The node name first: it is the certificate's CN, so every node's self-signed
/// certificate has its own subject (two with the same subject confuse the clients that
/// trust both, OpenSSL's chain building among them).
fn certificate_names(config: &Config) -> Vec<String> {
    let mut names = vec![config.node_name()];
    for name in [config.domain.clone(), config.cluster_name()] {
        if !names.contains(&name) {
            names.push(name);
        }
    }
    names
}

/// The node's identity: loaded from `DATA_DIR/certs`, or generated at first use with
/// the domain, the node name and the cluster name as SANs.
pub fn identity(config: &Config) -> anyhow::Result<NodeIdentity> {
    let names = certificate_names(config);
    create_data_dir(&config.data_dir)?;
    Ok(NodeIdentity::load_or_generate(
        &config.data_dir.join("certs"),
        &names,
    )?)
}

impl Node {
    /// Starts a node: store, certificate (generated at first start), listeners.
    pub async fn start(config: &Config) -> anyhow::Result<Node> {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        raise_file_limit();
        let store = open_store(config).await?;
        // From the start, so that no account change made while the node comes up is
        // missed (the channel buffers them).
        let account_changes = store.account_changes();
        store
            .register_node(&config.node_name(), &config.cluster_name())
            .await?;
        let identity = identity(config)?;
        let client = client_identity(config)?;
        let in_use: Vec<&NodeIdentity> =
            std::iter::once(&identity).chain(client.as_ref()).collect();
        check_certificates(&store, &in_use).await?;
        let for_clients = client.as_ref().unwrap_or(&identity);
        let server = Server::new(
            config.router_config(),
            store.clone(),
            for_clients.server_config(&[])?,
            for_clients.server_config(&[b"xmpp-client"])?,
        );
        let mut c2s = vec![];
        for addr in &config.listen.c2s {
            c2s.push(
                server
                    .listen(*addr, false)
                    .await
                    .with_context(|| format!("cannot listen on {addr} (c2s)"))?,
            );
        }
        let mut c2s_direct_tls = vec![];
        for addr in &config.listen.c2s_direct_tls {
            c2s_direct_tls.push(
                server
                    .listen(*addr, true)
                    .await
                    .with_context(|| format!("cannot listen on {addr} (c2s direct TLS)"))?,
            );
        }
        let control = Control::new(
            config.clone(),
            server.clone(),
            identity.clone(),
            client.clone(),
        );
        let https = Https::new(
            store.clone(),
            control.clone(),
            ServiceIdentity {
                cluster: config.cluster_name(),
                domain: config.domain.clone(),
                node: config.node_name(),
                version: env!("CARGO_PKG_VERSION").into(),
                features: impmesh_axl::features::announced(&config.sync.disable_features),
            },
            config.https_limits(),
            identity.https_server_config()?,
            admin_token(config)?,
        );
        let https_addr = https
            .listen(config.listen.https, Surface::Peers)
            .await
            .with_context(|| format!("cannot listen on {} (https)", config.listen.https))?;
        let admin_addr = https
            .listen(config.listen.admin, Surface::Admin)
            .await
            .with_context(|| format!("cannot listen on {} (admin)", config.listen.admin))?;
        control.attach(&https, c2s.clone(), c2s_direct_tls.clone(), https_addr);
        server.set_link_identity(identity.clone())?;
        let links_addr = match config.listen.links {
            Some(addr) => {
                let bound = server
                    .listen_links(addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr} (router links)"))?;
                control.attach_links(bound);
                // What waited for peers before a restart goes out (or expires) again.
                server.resume_outbox().await;
                Some(bound)
            }
            None => None,
        };
        control.publish().await?;
        let agent = Agent::start(
            store.clone(),
            config.sync_settings(),
            Ours {
                cluster: config.cluster_name(),
                domain: config.domain.clone(),
                address: host_port(&config.advertised_host(), https_addr.port()),
                server_name: config.node_name(),
            },
        )
        .await?;
        agent.set_identity(identity.clone());
        server.set_host_resolver(Arc::new(AgentDns(Arc::downgrade(&agent))));
        control.set_agent(agent.clone());
        // The node's own tasks: tracked, so shutdown waits for them (within the grace).
        let tasks = TaskTracker::new();
        // A peer's notifyChange pulls it at once.
        let (mut notices, notice_agent, notice_stop) = (
            https.subscribe_changes(),
            agent.clone(),
            server.shutdown.clone(),
        );
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = notice_stop.cancelled() => break,
                    notice = notices.recv() => match notice {
                        Ok(n) => notice_agent.nudge(&n.cluster),
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(_) => break,
                    },
                }
            }
        });
        spawn_account_listener(&tasks, account_changes, server.clone(), agent.clone());
        // Every hour until shutdown: re-check the certificate in use, prune old tombstones.
        let (check_server, check_control) = (server.clone(), control.clone());
        tasks.spawn(async move {
            let mut ticks = tokio::time::interval(HOURLY);
            ticks.tick().await;
            loop {
                tokio::select! {
                    _ = check_server.shutdown.cancelled() => break,
                    _ = ticks.tick() => {
                        let (node_id, client_id) = (check_control.identity(), check_control.client_identity());
                        let in_use: Vec<&NodeIdentity> = std::iter::once(&node_id).chain(client_id.as_ref()).collect();
                        if let Err(e) = check_certificates(&check_server.store, &in_use).await {
                            tracing::error!(error = %e, "certificate check failed");
                        }
                        let before = impmesh_store::now_unix() - TOMBSTONE_RETENTION.as_secs() as i64;
                        match check_server.store.prune_tombstones(before).await {
                            Ok(0) => {}
                            Ok(n) => tracing::info!(pruned = n, "pruned old directory tombstones"),
                            Err(e) => tracing::error!(error = %e, "tombstone pruning failed"),
                        }
                    }
                }
            }
        });
        Ok(Node {
            server,
            control,
            https,
            c2s,
            c2s_direct_tls,
            https_addr,
            admin_addr,
            links_addr,
            agent,
            tasks,
        })
    }

    /// The identity in use.
    pub fn identity(&self) -> NodeIdentity {
        self.control.identity()
    }

    /// Loads the certificate from the data directory again and uses it for every new TLS
    /// handshake; connections already up keep theirs. Returns the new fingerprint.
    pub async fn reload_certificates(&self) -> anyhow::Result<String> {
        self.control.reload_certificates().await
    }

    /// Stops the node as one tree under one grace period: every part stops accepting
    /// and winds down at once (streams close with `system-shutdown`, HTTPS requests and
    /// peer syncs end, the node's own tasks stop), all within [`SHUTDOWN_GRACE`]; then
    /// the store closes. Nothing waits without a bound (code review, STYLE 6).
    pub async fn shutdown(self) {
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        self.agent.stop();
        self.https.stop();
        self.server.shutdown.cancel();
        self.tasks.close();
        let all = async {
            tokio::join!(
                self.agent.stopped(),
                self.https.stopped(),
                self.server.shutdown(SHUTDOWN_GRACE),
                self.tasks.wait(),
            )
        };
        if tokio::time::timeout_at(deadline, all).await.is_err() {
            tracing::warn!("some parts of the node did not stop within the grace period");
        }
        // Queries still running (a session rerouting its last stanzas) had their time.
        let close = self.server.store.close();
        if tokio::time::timeout(STORE_CLOSE, close).await.is_err() {
            tracing::warn!("the store did not close in time");
        }
    }
}

/// Router links resolve peer node names through the sync agent's resolver, so a DNS
/// outage does not cut a peer whose addresses are known (the last good answer).
struct AgentDns(std::sync::Weak<Agent>);

impl impmesh_router::HostResolver for AgentDns {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Vec<std::net::IpAddr>> + Send + 'a>>
    {
        Box::pin(async move {
            match self.0.upgrade() {
                Some(agent) => agent.resolve_host(host).await,
                None => vec![],
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_thresholds() {
        let day = 86_400;
        let name = |s| expiry_alarm(s).map(|a| a.name);
        assert_eq!(name(31 * day), None);
        assert_eq!(name(30 * day), Some("NodeCertificateExpiringSoon"));
        assert_eq!(name(8 * day), Some("NodeCertificateExpiringSoon"));
        assert_eq!(name(7 * day), Some("NodeCertificateExpiring"));
        assert_eq!(name(1), Some("NodeCertificateExpiring"));
        assert_eq!(name(0), Some("NodeCertificateExpired"));
        assert_eq!(name(-day), Some("NodeCertificateExpired"));
    }
}
