//! Wiring of one node: data directory, store, identity, router and listeners.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use impmesh_certs::NodeIdentity;
use impmesh_router::Server;
use impmesh_store::Store;
use impmesh_store::alarms::{self, AlarmDef};

use crate::config::Config;

/// How often a running node re-checks its certificate's expiry.
const CERT_CHECK_INTERVAL: Duration = Duration::from_secs(3600);

/// Time sessions get to close their streams on shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A running node.
pub struct Node {
    pub server: Arc<Server>,
    pub identity: NodeIdentity,
    /// The identity in use, for the periodic expiry check (updated on reload).
    in_use: Arc<std::sync::RwLock<NodeIdentity>>,
    /// Bound STARTTLS listeners (real ports when the config asked for port 0).
    pub c2s: Vec<SocketAddr>,
    /// Bound direct-TLS listeners.
    pub c2s_direct_tls: Vec<SocketAddr>,
}

/// Creates the data directory and opens (and migrates) the store.
pub async fn open_store(config: &Config) -> anyhow::Result<Store> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data directory {}", config.data_dir.display()))?;
    let store = Store::open(&config.store.url, &config.data_dir)
        .await
        .with_context(|| format!("cannot open the store {}", config.store.url))?;
    Ok(store)
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

/// Raises the expiry alarm the node certificate deserves now and clears the others,
/// including those of a certificate it no longer uses.
pub async fn check_certificate(store: &Store, identity: &NodeIdentity) -> anyhow::Result<()> {
    let info = impmesh_certs::describe(&identity.chain[0])?;
    let secs_left = info.not_after_unix - impmesh_store::now_unix();
    let wanted = expiry_alarm(secs_left);
    let family = [
        alarms::CERT_EXPIRING_SOON,
        alarms::CERT_EXPIRING,
        alarms::CERT_EXPIRED,
    ];
    for active in store.active_alarms().await? {
        if let Some(def) = family.iter().find(|d| d.name == active.name)
            && (active.subject != info.sha256 || wanted.is_none_or(|w| w.name != def.name))
        {
            let why = if active.subject == info.sha256 {
                "no longer applies"
            } else {
                "the certificate was replaced"
            };
            store.clear_alarm(def, &active.subject, why).await?;
        }
    }
    if let Some(def) = wanted {
        let message = format!(
            "node certificate {} valid until {}",
            info.subject, info.not_after
        );
        store.raise_alarm(def, &info.sha256, &message).await?;
    }
    Ok(())
}

/// The names a node certificate must cover: the XMPP domain and the node name.
pub fn required_names(config: &Config) -> Vec<String> {
    let mut names = vec![config.domain.clone()];
    if config.node_name() != config.domain {
        names.push(config.node_name());
    }
    names
}

/// Checks and installs a CA-signed certificate (PEM) for this node; the running node
/// uses it after a reload (SIGHUP). Returns the new fingerprint.
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
fn certificate_names(config: &Config) -> Vec<String> {
    let mut names = vec![config.domain.clone()];
    for name in [config.node_name(), config.cluster_name()] {
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
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data directory {}", config.data_dir.display()))?;
    Ok(NodeIdentity::load_or_generate(
        &config.data_dir.join("certs"),
        &names,
    )?)
}

impl Node {
    /// Starts a node: store, certificate (generated at first start), listeners.
    pub async fn start(config: &Config) -> anyhow::Result<Node> {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let store = open_store(config).await?;
        store
            .register_node(&config.node_name(), &config.cluster_name())
            .await?;
        let identity = identity(config)?;
        check_certificate(&store, &identity).await?;
        let server = Server::new(
            config.router_config(),
            store,
            identity.server_config(&[])?,
            identity.server_config(&[b"xmpp-client"])?,
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
        // Re-check the certificate in use every hour until shutdown.
        let in_use = Arc::new(std::sync::RwLock::new(identity.clone()));
        let (check_server, check_identity) = (server.clone(), in_use.clone());
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(CERT_CHECK_INTERVAL);
            ticks.tick().await;
            loop {
                tokio::select! {
                    _ = check_server.shutdown.cancelled() => break,
                    _ = ticks.tick() => {
                        let current = check_identity.read().unwrap_or_else(|e| e.into_inner()).clone();
                        if let Err(e) = check_certificate(&check_server.store, &current).await {
                            tracing::error!(error = %e, "certificate check failed");
                        }
                    }
                }
            }
        });
        Ok(Node {
            server,
            identity,
            in_use,
            c2s,
            c2s_direct_tls,
        })
    }

    /// Loads the certificate from the data directory again and uses it for every new TLS
    /// handshake; connections already up keep theirs. Returns the new fingerprint.
    pub async fn reload_certificates(&mut self, config: &Config) -> anyhow::Result<String> {
        let identity = identity(config)?;
        check_certificate(&self.server.store, &identity).await?;
        self.server.set_tls(
            identity.server_config(&[])?,
            identity.server_config(&[b"xmpp-client"])?,
        );
        *self.in_use.write().unwrap_or_else(|e| e.into_inner()) = identity.clone();
        self.identity = identity;
        Ok(self.identity.fingerprint())
    }

    /// Closes every stream (with `system-shutdown`) and the store.
    pub async fn shutdown(self) {
        self.server.shutdown(SHUTDOWN_GRACE).await;
        self.server.store.close().await;
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
