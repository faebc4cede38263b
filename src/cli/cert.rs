//! `impmesh cert`: the node's certificate.

use std::path::PathBuf;

use base64::Engine as _;
use clap::Subcommand;
use impmesh::config::Config;
use impmesh_axl::api::{self, CertInfo};
use impmesh_axl::client::{AxlClient, Method};

use super::{call, send};

#[derive(Subcommand)]
pub enum CertCommand {
    /// Shows subject, SANs, issuer, validity and SHA-256 fingerprint of each certificate.
    Show {
        #[arg(long)]
        json: bool,
    },
    /// Writes a PKCS#10 signing request for the node's key, for a CA to sign.
    Csr {
        /// The subject's common name.
        #[arg(long)]
        cn: String,
        /// Subject alternative names: host names or IP addresses, comma-separated.
        #[arg(long, value_delimiter = ',')]
        san: Vec<String>,
        /// Write to this file instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Replaces the node's key and self-signed certificate with new ones (same names);
    /// a running node uses them at once.
    Regenerate,
    /// Makes the running node read its certificate files again (after a renewal done
    /// outside impmesh, e.g. of `[tls] client_certificate`); like SIGHUP.
    Reload,
    /// Ends the overlap of a certificate rotation at once: the new node certificate is
    /// served to peers now, whether they pinned it or not (for a compromised old key).
    EndOverlap,
    /// Installs a CA-signed certificate (PEM, or a PKCS#12 archive) after checking that
    /// it fits this node; a running node uses it at once.
    Import {
        /// The certificate, optionally followed by its chain.
        #[arg(long, required_unless_present = "p12", conflicts_with = "p12")]
        cert: Option<PathBuf>,
        /// Its private key; without it the node keeps its key (the CSR flow).
        #[arg(long)]
        key: Option<PathBuf>,
        /// Intermediate certificates.
        #[arg(long)]
        chain: Option<PathBuf>,
        /// A PKCS#12 archive (.p12/.pfx) holding the key and its chain; its password is
        /// asked for.
        #[arg(long, conflicts_with_all = ["key", "chain"])]
        p12: Option<PathBuf>,
        /// Read the PKCS#12 password from the first line of standard input.
        #[arg(long, requires = "p12")]
        password_stdin: bool,
    },
}

pub async fn run(
    cmd: CertCommand,
    config: &Config,
    api: Option<&mut AxlClient>,
) -> anyhow::Result<()> {
    match cmd {
        CertCommand::Show { json } => {
            let infos: Vec<CertInfo> = match api {
                Some(api) => call(api, Method::GET, "/certificates").await?,
                None => impmesh::files::identity(config)?
                    .chain
                    .iter()
                    .map(impmesh_certs::describe)
                    .collect::<Result<Vec<_>, _>>()?,
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&infos)?);
                return Ok(());
            }
            for (i, info) in infos.iter().enumerate() {
                let role = if i == 0 { "node certificate" } else { "chain" };
                let self_signed = if info.self_signed {
                    " (self-signed)"
                } else {
                    ""
                };
                println!("{role}:");
                println!("  subject:     {}", info.subject);
                println!("  issuer:      {}{self_signed}", info.issuer);
                println!("  SANs:        {}", info.sans.join(", "));
                println!("  valid from:  {}", info.not_before);
                println!("  valid until: {}", info.not_after);
                println!("  SHA-256:     {}", info.sha256);
            }
            Ok(())
        }
        CertCommand::Reload => {
            let Some(api) = api else {
                anyhow::bail!("the node is not running; it reads its certificates when it starts");
            };
            let r: api::Fingerprint = call(api, Method::POST, "/certificates/reload").await?;
            println!("reloaded; node certificate SHA-256 {}", r.fingerprint);
            Ok(())
        }
        CertCommand::EndOverlap => {
            let Some(api) = api else {
                anyhow::bail!("the node is not running: there is no rotation to end");
            };
            let r: api::OverlapEnded = call(api, Method::POST, "/certificates/end-overlap").await?;
            if r.ended {
                println!("the new certificate is now served to peers too");
            } else {
                println!("no certificate rotation is under way");
            }
            Ok(())
        }
        CertCommand::Regenerate => {
            let (fp, running) = match api {
                Some(api) => {
                    let r: api::Fingerprint =
                        call(api, Method::POST, "/certificates/regenerate").await?;
                    (r.fingerprint, true)
                }
                None => (impmesh::files::regenerate_certificate(config)?, false),
            };
            println!("generated a new self-signed certificate; SHA-256 {fp}");
            if running {
                println!("the running node uses it for new connections");
            }
            Ok(())
        }
        CertCommand::Import {
            cert,
            key,
            chain,
            p12,
            password_stdin,
        } => {
            let read = |p: &PathBuf| {
                std::fs::read(p).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))
            };
            let text = |p: &PathBuf| read(p).map(|b| String::from_utf8_lossy(&b).into_owned());
            let (body, archive) = match (&cert, &p12) {
                (_, Some(p12)) => {
                    let archive = read(p12)?;
                    let password =
                        impmesh::users::read_secret(password_stdin, "PKCS#12 password: ")?;
                    let body = api::ImportCertificate {
                        p12: Some(base64::engine::general_purpose::STANDARD.encode(&archive)),
                        password: Some(password),
                        ..Default::default()
                    };
                    (body, Some(archive))
                }
                (Some(cert), None) => {
                    let body = api::ImportCertificate {
                        cert: Some(text(cert)?),
                        key: key.as_ref().map(text).transpose()?,
                        chain: chain.as_ref().map(text).transpose()?,
                        ..Default::default()
                    };
                    (body, None)
                }
                (None, None) => anyhow::bail!("give --cert FILE or --p12 FILE"),
            };
            let (fp, running) = match api {
                Some(api) => {
                    let r: api::Fingerprint =
                        send(api, Method::POST, "/certificates/import", &body).await?;
                    (r.fingerprint, true)
                }
                None => {
                    let fp = match archive {
                        Some(archive) => impmesh::files::import_pkcs12(
                            config,
                            &archive,
                            body.password.as_deref().unwrap_or(""),
                        )?,
                        None => impmesh::files::import_certificate(
                            config,
                            body.cert.as_deref().unwrap_or("").as_bytes(),
                            body.key.as_deref().map(str::as_bytes),
                            body.chain.as_deref().map(str::as_bytes),
                        )?,
                    };
                    (fp, false)
                }
            };
            println!("installed; SHA-256 {fp}");
            if running {
                println!("the running node uses it for new connections");
            }
            Ok(())
        }
        CertCommand::Csr { cn, san, out } => {
            let pem = match api {
                Some(api) => {
                    let body = api::CsrRequest { cn, sans: san };
                    let r: api::Pem = send(api, Method::POST, "/certificates/csr", &body).await?;
                    r.pem
                }
                None => impmesh::files::identity(config)?.csr(&cn, &san)?,
            };
            match out {
                Some(path) => {
                    std::fs::write(&path, &pem)
                        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
                    println!("wrote {}", path.display());
                }
                None => print!("{pem}"),
            }
            Ok(())
        }
    }
}
