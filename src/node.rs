//! Wiring of one node: data directory, store, identity, router and listeners.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use impmesh_certs::NodeIdentity;
use impmesh_router::Server;
use impmesh_store::Store;

use crate::config::Config;

/// Time sessions get to close their streams on shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A running node.
pub struct Node {
    pub server: Arc<Server>,
    pub identity: NodeIdentity,
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

/// The node's identity: loaded from `DATA_DIR/certs`, or generated at first use with
/// the domain, the node name and the cluster name as SANs.
pub fn identity(config: &Config) -> anyhow::Result<NodeIdentity> {
    let mut names = vec![config.domain.clone()];
    for name in [config.node_name(), config.cluster_name()] {
        if !names.contains(&name) {
            names.push(name);
        }
    }
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
        Ok(Node {
            server,
            identity,
            c2s,
            c2s_direct_tls,
        })
    }

    /// Loads the certificate from the data directory again and uses it for every new TLS
    /// handshake; connections already up keep theirs. Returns the new fingerprint.
    pub fn reload_certificates(&mut self, config: &Config) -> anyhow::Result<String> {
        let identity = identity(config)?;
        self.server.set_tls(
            identity.server_config(&[])?,
            identity.server_config(&[b"xmpp-client"])?,
        );
        self.identity = identity;
        Ok(self.identity.fingerprint())
    }

    /// Closes every stream (with `system-shutdown`) and the store.
    pub async fn shutdown(self) {
        self.server.shutdown(SHUTDOWN_GRACE).await;
        self.server.store.close().await;
    }
}
