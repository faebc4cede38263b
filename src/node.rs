//! Wiring of one node: data directory, store, identity, router and listeners.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use impmesh_axl::{Https, ServiceIdentity, Surface};
use impmesh_certs::NodeIdentity;
use impmesh_router::Server;
use impmesh_sync_agent::{Agent, Ours};
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::control::Control;
use crate::files;

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
    /// The bound client HTTPS listener (file upload), if uploads are on.
    pub client_https_addr: Option<SocketAddr>,
    /// The TURN relay (its UDP and TCP port), if one is configured.
    pub relay: Option<impmesh_media::relay::RelayHandle>,
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

/// File descriptors the node would like beside its client connections
/// (`limits.max_connections`): the links and HTTPS connections, the store, slack.
const OTHER_FILES: u64 = 4_464;

/// Raises the soft limit on open files to the hard one (the default soft limit of
/// 1,024 would stop the node long before its connection limits) and says what the
/// ceiling is when it is below what the node may need (security review H3, M10).
fn raise_file_limit(wanted: u64) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let (soft, hard) = (limit.current, limit.maximum);
    let target = hard.unwrap_or(wanted.max(soft.unwrap_or(0)));
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
        Some(n) if n < wanted => tracing::warn!(
            open_files = n,
            wanted,
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
                // A room of this cluster: peers learn of it; user names are not
                // affected.
                Ok(AccountChange::Room(_)) => {
                    if let Ok(usn) = server.store.current_usn().await {
                        agent.notify_peers(usn);
                    }
                    continue;
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

impl Node {
    /// Starts a node: store, certificate (generated at first start), listeners.
    pub async fn start(config: &Config) -> anyhow::Result<Node> {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        raise_file_limit(config.limits.max_connections as u64 + OTHER_FILES);
        let store = files::open_store(config).await?;
        // From the start, so that no account change made while the node comes up is
        // missed (the channel buffers them).
        let account_changes = store.account_changes();
        store
            .register_node(&config.node_name(), &config.cluster_name())
            .await?;
        let identity = files::identity(config)?;
        let client = files::client_identity(config)?;
        let in_use: Vec<&NodeIdentity> =
            std::iter::once(&identity).chain(client.as_ref()).collect();
        files::check_certificates(&store, &in_use).await?;
        let for_clients = client.as_ref().unwrap_or(&identity);
        let mut router_config = config.router_config();
        if let Some(upload) = router_config.upload.as_mut() {
            upload.default_host = default_upload_host(config, for_clients);
        }
        let server = Server::new(
            router_config,
            store.clone(),
            for_clients.server_config(&[])?,
            for_clients.server_config(&[b"xmpp-client"])?,
        );
        let rooms = server
            .restore_rooms()
            .await
            .context("cannot read the chat rooms from the store")?;
        if rooms > 0 {
            tracing::info!(rooms, "restored the persistent chat rooms");
        }
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
        let client_https_addr = if config.upload.enabled {
            if let Some(url) = &config.upload.public_url {
                let host = crate::config::upload_url_host(url).unwrap_or_default();
                impmesh_certs::check_identity(for_clients, &[host.to_owned()]).with_context(
                    || {
                        format!(
                            "upload.public_url {url}: the client certificate does not cover {host}"
                        )
                    },
                )?;
            }
            let addr = config.listen.client_https;
            Some(
                server
                    .listen_upload(addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr} (client_https)"))?,
            )
        } else {
            None
        };
        // The relay's tasks stop with the node's own (below).
        let tasks = TaskTracker::new();
        let relay = match config.relay_listeners() {
            Some(listen) => Some(
                crate::media::start(
                    config,
                    listen,
                    &store,
                    &server,
                    server.shutdown.clone(),
                    &tasks,
                )
                .await?,
            ),
            None => {
                // No relay: nothing left raised by an earlier run stays on.
                crate::media::clear_alarms(&store, &config.node_name()).await;
                None
            }
        };
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
            files::admin_token(config)?,
        );
        let https_addr = https
            .listen(config.listen.https, Surface::Peers)
            .await
            .with_context(|| format!("cannot listen on {} (https)", config.listen.https))?;
        let admin_addr = https
            .listen(config.listen.admin, Surface::Admin)
            .await
            .with_context(|| format!("cannot listen on {} (admin)", config.listen.admin))?;
        control.attach(
            &https,
            crate::control::Bound {
                c2s: c2s.clone(),
                c2s_direct_tls: c2s_direct_tls.clone(),
                https: https_addr,
                admin: admin_addr,
                client_https: client_https_addr,
                relay: relay.clone(),
            },
        );
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
                cluster: config.cluster_name().into(),
                domain: config.domain.clone(),
                address: host_port(&config.advertised_host(), https_addr.port()),
                server_name: config.node_name(),
            },
        )
        .await?;
        agent.set_identity(identity.clone());
        server.set_host_resolver(Arc::new(AgentDns(Arc::downgrade(&agent))));
        control.set_agent(agent.clone());
        // The node's own tasks (the relay's among them): tracked, so shutdown waits for
        // them (within the grace).
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
        // Every hour until shutdown: re-check the certificate in use, prune old tombstones
        // and expired FAST tokens.
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
                        if let Err(e) = files::check_certificates(&check_server.store, &in_use).await {
                            tracing::error!(error = %e, "certificate check failed");
                        }
                        let before = impmesh_store::now_unix() - TOMBSTONE_RETENTION.as_secs() as i64;
                        match check_server.store.prune_tombstones(before).await {
                            Ok(0) => {}
                            Ok(n) => tracing::info!(pruned = n, "pruned old directory tombstones"),
                            Err(e) => tracing::error!(error = %e, "tombstone pruning failed"),
                        }
                        match check_server.store.fast_expire(impmesh_store::now_unix()).await {
                            Ok(0) => {}
                            Ok(n) => tracing::info!(tokens = n, "removed expired FAST tokens"),
                            Err(e) => tracing::error!(error = %e, "FAST token expiry failed"),
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
            client_https_addr,
            relay,
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

/// The host of this node's upload URLs when `[upload] public_url` names none: the
/// node's own address (`[node] host`, else its name) when the client certificate
/// covers it, so that every node of a cluster has URLs of its own; else the domain.
fn default_upload_host(config: &Config, for_clients: &NodeIdentity) -> String {
    let own = config
        .node
        .host
        .clone()
        .unwrap_or_else(|| config.node_name());
    let covered = own != config.domain
        && crate::config::upload_url_host(&format!("https://{own}")).is_some()
        && impmesh_certs::check_identity(for_clients, std::slice::from_ref(&own)).is_ok();
    if covered { own } else { config.domain.clone() }
}
