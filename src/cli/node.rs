//! `impmesh status` and `impmesh troubleshoot`: the running node.

use impmesh::config::Config;
use impmesh_axl::api::{Check, NodeStatus};
use impmesh_axl::client::{AxlClient, Method};

use super::{call, print_json, running};

/// `impmesh status`.
pub async fn status(
    config: &Config,
    api: Option<&mut AxlClient>,
    json: bool,
) -> anyhow::Result<()> {
    let api = running(api, config, "")?;
    let status: NodeStatus = call(api, Method::GET, "/status").await?;
    if json {
        return print_json(&status);
    }
    let node = &status.runtime;
    println!(
        "node:        {} (cluster {}, domain {})",
        status.node, status.cluster, status.domain
    );
    println!("version:     {}", status.version);
    println!("uptime:      {} s", node.uptime_secs);
    println!("sessions:    {}", node.sessions);
    println!(
        "store:       {}, USN {}",
        node.store,
        status.usn.map_or_else(|| "-".to_owned(), |u| u.to_string())
    );
    println!("certificate: {}", node.certificate.sha256);
    let l = &node.listeners;
    println!(
        "listeners:   XMPP {} (STARTTLS), {} (direct TLS); HTTPS {} (peers), {} (admin), {} (clients: file upload); links {}; TURN relay {} (TLS {})",
        l.c2s.join(", "),
        l.c2s_direct_tls.join(", "),
        l.https,
        l.admin,
        l.client_https.as_deref().unwrap_or("off"),
        l.links.as_deref().unwrap_or("off"),
        l.turn.as_deref().unwrap_or("off"),
        l.turns.as_deref().unwrap_or("off")
    );
    Ok(())
}

/// `impmesh troubleshoot`: exits with 3 when a check fails (like a health check).
pub async fn troubleshoot(
    config: &Config,
    api: Option<&mut AxlClient>,
    json: bool,
) -> anyhow::Result<()> {
    let api = running(api, config, "")?;
    let checks: Vec<Check> = call(api, Method::GET, "/troubleshoot").await?;
    if json {
        print_json(&checks)?;
    } else {
        for c in &checks {
            let mark = if c.ok { "pass" } else { "FAIL" };
            println!("{mark}  {}: {}", c.name, c.detail);
        }
    }
    if checks.iter().any(|c| !c.ok) {
        std::process::exit(3);
    }
    Ok(())
}
