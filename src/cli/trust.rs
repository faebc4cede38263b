//! `impmesh trust`: CA certificates and pinned peer certificates.

use std::path::PathBuf;

use clap::Subcommand;
use impmesh::config::Config;
use impmesh_axl::api::{self, TrustEntry, TrustKind};
use impmesh_axl::client::{AxlClient, Method};

use super::{call, print_json, send, with_store};

#[derive(Subcommand)]
pub enum TrustCommand {
    /// Lists trusted certificates with fingerprint, kind, source, peer and date.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Trusts the certificates of a PEM file: as CAs, or pinned for a peer.
    Add {
        /// CA certificates (PEM).
        #[arg(long, conflicts_with = "pin", required_unless_present = "pin")]
        ca: Option<PathBuf>,
        /// A peer's own certificate(s), trusted exactly as they are (PEM).
        #[arg(long, requires = "peer")]
        pin: Option<PathBuf>,
        /// The peer a pinned certificate belongs to.
        #[arg(long)]
        peer: Option<String>,
    },
    /// Stops trusting a certificate.
    Remove { fingerprint: String },
}

pub async fn run(
    cmd: TrustCommand,
    config: &Config,
    api: Option<&mut AxlClient>,
) -> anyhow::Result<()> {
    match cmd {
        TrustCommand::List { json } => {
            let entries: Vec<TrustEntry> = match api {
                Some(api) => call(api, Method::GET, "/trust").await?,
                None => with_store(config, async |store| Ok(store.trust_entries().await?)).await?,
            };
            if json {
                return print_json(&entries);
            }
            for e in entries {
                let peer = e.peer.map(|p| format!(" peer={p}")).unwrap_or_default();
                println!(
                    "{}  {:6}  {}  source={}{peer}",
                    e.fingerprint,
                    e.kind.as_str(),
                    e.subject,
                    e.source
                );
            }
            Ok(())
        }
        TrustCommand::Add { ca, pin, peer } => {
            let (path, kind) = match (ca, pin) {
                (Some(p), None) => (p, TrustKind::Ca),
                (None, Some(p)) => (p, TrustKind::Pinned),
                _ => anyhow::bail!("give --ca FILE or --pin FILE --peer NAME"),
            };
            let pem = std::fs::read(&path)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
            let added: Vec<TrustEntry> = match api {
                Some(api) => {
                    let body = api::AddTrust {
                        pem: String::from_utf8_lossy(&pem).into_owned(),
                        kind,
                        peer,
                    };
                    send(api, Method::POST, "/trust", &body).await?
                }
                None => {
                    with_store(config, async |store| {
                        Ok(
                            impmesh_axl::trust::add(store, &pem, kind, peer.as_deref(), "imported")
                                .await?,
                        )
                    })
                    .await?
                }
            };
            if added.is_empty() {
                println!("already trusted");
            }
            for e in added {
                println!("trusted {} ({})", e.fingerprint, e.subject);
            }
            Ok(())
        }
        TrustCommand::Remove { fingerprint } => {
            let fp = fingerprint.to_ascii_uppercase();
            match api {
                Some(api) => {
                    let _: api::TrustRemoved =
                        call(api, Method::DELETE, &format!("/trust/{fp}")).await?;
                }
                None => {
                    let removed =
                        with_store(config, async |store| Ok(store.remove_trust(&fp).await?))
                            .await?;
                    if !removed {
                        anyhow::bail!("no trusted certificate with fingerprint {fingerprint}");
                    }
                }
            }
            println!("removed {fingerprint}");
            Ok(())
        }
    }
}
