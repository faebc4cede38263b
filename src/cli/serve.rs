//! `impmesh serve`: runs the node until SIGTERM or ctrl-c; SIGHUP reloads its
//! certificate.

use impmesh::config::Config;
use impmesh::node::Node;

pub async fn run(config: Config) -> anyhow::Result<()> {
    let node = Node::start(&config).await?;
    let trimming = tokio_util::sync::CancellationToken::new();
    let trimmer = crate::trim::spawn(trimming.clone());
    for addr in &node.c2s {
        println!("impmesh: listening for XMPP clients on {addr} (STARTTLS)");
    }
    for addr in &node.c2s_direct_tls {
        println!("impmesh: listening for XMPP clients on {addr} (direct TLS)");
    }
    println!("impmesh: HTTPS for peers (AXL) on {}", node.https_addr);
    println!(
        "impmesh: HTTPS for admins (admin API, metrics) on {}",
        node.admin_addr
    );
    if let (Some(addr), Some(url)) = (node.client_https_addr, node.server.upload_url()) {
        println!("impmesh: HTTPS for clients (file upload) on {addr}, files at {url}");
    }
    println!(
        "impmesh: serving domain {} from {} (certificate SHA-256 {})",
        config.domain,
        config.data_dir.display(),
        node.identity().fingerprint()
    );
    while let Signal::Reload = wait_for_signal().await {
        match node.reload_certificates().await {
            Ok(fp) => tracing::info!(sha256 = %fp, "certificate reloaded"),
            Err(e) => tracing::error!(error = %e, "certificate reload failed; keeping the old one"),
        }
    }
    tracing::info!("shutting down");
    trimming.cancel();
    let _ = trimmer.await;
    node.shutdown().await;
    Ok(())
}

enum Signal {
    Stop,
    Reload,
}

/// SIGTERM or ctrl-c stop the node; SIGHUP reloads its certificate.
async fn wait_for_signal() -> Signal {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) {
            (Ok(mut term), Ok(mut hup)) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => Signal::Stop,
                    _ = term.recv() => Signal::Stop,
                    _ = hup.recv() => Signal::Reload,
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
                Signal::Stop
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        Signal::Stop
    }
}
