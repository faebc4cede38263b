//! `impmesh peer`: intercluster peers, through the running node's sync agent.

use clap::Subcommand;
use impmesh_axl::api::{self, Peer};
use impmesh_axl::client::{AxlClient, Method};

use super::{call, path_segment, print_json, send, when};

#[derive(Subcommand)]
pub enum PeerCommand {
    /// Peers with the cluster whose AXL endpoint is ADDRESS (host or IP, optional
    /// :port, default 8443), authenticating as its intercluster application user.
    Add {
        address: String,
        #[arg(long)]
        user: String,
        /// Read the peer's AXL password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Accepts a peer that added this cluster (and starts syncing from it).
    Accept { cluster: String },
    /// Lists peers: state, address, users in sync.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Everything about one peer, or all.
    Status {
        cluster: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Force Sync: a full resync now; --with-certificates exchanges certificates again
    /// first (the repair for a peer that replaced its certificate).
    Sync {
        cluster: String,
        #[arg(long, requires = "user")]
        with_certificates: bool,
        /// The peer's AXL user, for --with-certificates.
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        password_stdin: bool,
    },
    /// Removes a peer with its users and pinned certificates.
    Del { cluster: String },
}

pub async fn run(cmd: PeerCommand, api: &mut AxlClient) -> anyhow::Result<()> {
    match cmd {
        PeerCommand::Add {
            address,
            user,
            password_stdin,
        } => {
            let password = impmesh::users::read_secret(password_stdin, "Peer's AXL password: ")?;
            let body = api::NewPeer {
                address,
                user,
                password,
            };
            let r: api::PeerAdded = send(api, Method::POST, "/peers", &body).await?;
            println!(
                "peered with {} at {}; certificates exchanged and pinned both ways",
                r.cluster, r.address
            );
            println!(
                "{} lists this cluster as pending until its admin runs `impmesh peer accept` there",
                r.cluster
            );
        }
        PeerCommand::Accept { cluster } => {
            let path = format!("/peers/{}/accept", path_segment(&cluster));
            let _: api::PeerAction = call(api, Method::POST, &path).await?;
            println!("accepted {cluster}; syncing its users");
        }
        PeerCommand::Del { cluster } => {
            let path = format!("/peers/{}", path_segment(&cluster));
            let _: api::PeerAction = call(api, Method::DELETE, &path).await?;
            println!("removed {cluster}, its users and its pinned certificates");
        }
        PeerCommand::Sync {
            cluster,
            with_certificates,
            user,
            password_stdin,
        } => {
            let body = if with_certificates {
                let password =
                    impmesh::users::read_secret(password_stdin, "Peer's AXL password: ")?;
                api::ForceSync {
                    with_certificates: true,
                    user,
                    password: Some(password),
                }
            } else {
                api::ForceSync::default()
            };
            let path = format!("/peers/{}/sync", path_segment(&cluster));
            let _: api::PeerAction = send(api, Method::POST, &path, &body).await?;
            println!(
                "full sync of {cluster} started; `impmesh peer status {cluster}` shows its progress"
            );
        }
        PeerCommand::List { json } => {
            let peers: Vec<Peer> = call(api, Method::GET, "/peers").await?;
            if json {
                return print_json(&peers);
            }
            if peers.is_empty() {
                println!("no peers");
            }
            for p in peers {
                let p = p.status;
                println!(
                    "{}  {:7}  {:10}  {} users  {}",
                    p.cluster,
                    p.state.as_str(),
                    p.live.state.as_str(),
                    p.associated_users,
                    p.address,
                );
            }
        }
        PeerCommand::Status { cluster, json } => {
            let mut peers: Vec<Peer> = call(api, Method::GET, "/peers").await?;
            peers.retain(|p| cluster.as_deref().is_none_or(|c| p.status.cluster == c));
            if let Some(c) = &cluster
                && peers.is_empty()
            {
                anyhow::bail!("no peer {c}");
            }
            if json {
                return print_json(&peers);
            }
            for p in &peers {
                print_status(p);
            }
        }
    }
    Ok(())
}

/// `peer status` for one peer, for people.
fn print_status(peer: &Peer) {
    fn or_dash<T: ToString>(v: Option<T>) -> String {
        v.map_or_else(|| "-".to_owned(), |v| v.to_string())
    }
    let because = |r: &Option<String>| r.as_deref().map(|r| format!(": {r}")).unwrap_or_default();
    let p = &peer.status;
    let (live, sync) = (&p.live, &p.sync);
    println!("peer {}", p.cluster);
    println!("  address:          {}", p.address);
    println!(
        "  state:            {} ({})",
        p.state.as_str(),
        if p.added_here {
            "added here"
        } else {
            "added by the peer"
        }
    );
    println!(
        "  sync:             {}{}",
        live.state.as_str(),
        because(&live.reason)
    );
    println!(
        "  associated users: {} (the peer has {})",
        p.associated_users,
        or_dash(live.peer_users)
    );
    println!(
        "  applied USN:      {} (the peer is at {})",
        sync.applied_usn,
        or_dash(live.peer_usn)
    );
    println!(
        "  last full sync:   at {}, USN {}, {} ms, {} users",
        when(sync.last_full_at),
        or_dash(sync.last_full_usn),
        or_dash(sync.last_full_ms),
        or_dash(sync.last_full_users)
    );
    println!(
        "  last incremental: at {}, USN {}, {} ms, {} changes",
        when(sync.last_incr_at),
        or_dash(sync.last_incr_usn),
        or_dash(sync.last_incr_ms),
        or_dash(sync.last_incr_changes)
    );
    println!(
        "  certificates:     {}{}",
        live.certificate_status.as_str(),
        because(&live.certificate_reason)
    );
    println!("  pinned:           {}", p.pinned.join(", "));
    println!(
        "  failures:         {} in a row, {} stall restarts, {} directory entries refused",
        live.consecutive_failures, p.stall_restarts, live.refused_entries
    );
    println!(
        "  clock skew:       {}",
        live.clock_skew_secs
            .map(|k| format!("{k:+} s"))
            .unwrap_or_else(|| "-".into())
    );
    let failing: Vec<String> = live
        .dns
        .iter()
        .filter(|n| !n.ok)
        .map(|n| {
            format!(
                "{} ({}; using {})",
                n.name,
                n.error.as_deref().unwrap_or("-"),
                n.addresses.join(", ")
            )
        })
        .collect();
    println!(
        "  DNS:              {}",
        if failing.is_empty() {
            "every name resolves".to_owned()
        } else {
            format!("failing: {}", failing.join(", "))
        }
    );
    println!(
        "  protocol:         {}, features {}{}",
        or_dash(live.peer_protocol),
        live.peer_features.join(", "),
        if live.missing_features.is_empty() {
            String::new()
        } else {
            format!(
                " (missing, not used with it: {})",
                live.missing_features.join(", ")
            )
        }
    );
    if peer.links.is_empty() {
        println!("  router links:     none yet (opened when a stanza goes there)");
    }
    for l in &peer.links {
        let direction = l.direction.as_str();
        println!(
            "  router link {direction:<3}  {} {} since {}, {} stanzas, {} queued ({} in the outbox, {} bytes), {} in flight{}",
            l.node,
            if l.up { "up" } else { "down" },
            when(Some(l.since)),
            l.stanzas,
            l.queued,
            l.outbox_rows,
            l.outbox_bytes,
            l.in_flight,
            l.last_error
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        );
    }
}
