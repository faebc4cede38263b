//! `impmesh`: parses arguments, loads the configuration, installs logging, and runs a
//! node or an admin command.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use impmesh::config::Config;
use impmesh::node::Node;

#[derive(Parser)]
#[command(
    name = "impmesh",
    version,
    about = "A mesh of XMPP clusters serving one domain"
)]
struct Cli {
    /// Configuration file (TOML); every key is optional.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Data directory (store, certificates); overrides the file. Default ./impmesh-data.
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the node until SIGTERM or ctrl-c.
    Serve,
    /// Manages accounts (works whether or not the server runs).
    #[command(subcommand)]
    User(UserCommand),
    /// The node's certificate.
    #[command(subcommand)]
    Cert(CertCommand),
    /// The trust store: CA certificates and pinned peer certificates.
    #[command(subcommand)]
    Trust(TrustCommand),
    /// Active alarms (ops/alarms.md lists them all).
    Alarms {
        #[arg(long)]
        json: bool,
        /// The latest raises and clears instead.
        #[arg(long)]
        history: bool,
    },
}

#[derive(Subcommand)]
enum TrustCommand {
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

#[derive(Subcommand)]
enum CertCommand {
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
    /// Replaces the node's key and self-signed certificate with new ones (same names).
    /// A running node uses them after SIGHUP.
    Regenerate,
    /// Installs a CA-signed certificate (PEM, or a PKCS#12 archive) after checking that
    /// it fits this node. A running node uses it after SIGHUP.
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

#[derive(Subcommand)]
enum UserCommand {
    /// Creates an account.
    Add {
        name: String,
        /// Read the password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Deletes an account and everything stored for it.
    Del { name: String },
    /// Changes a password.
    Passwd {
        name: String,
        #[arg(long)]
        password_stdin: bool,
    },
    /// Lists accounts.
    List {
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref(), cli.data_dir.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("impmesh: {e}");
            return ExitCode::from(2);
        }
    };
    install_tracing(&config, matches!(cli.command, Command::Serve));
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("impmesh: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("impmesh: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn install_tracing(config: &Config, serving: bool) {
    use tracing_subscriber::EnvFilter;
    // Admin commands stay quiet unless asked: their output is for people and scripts.
    let default = if serving {
        config.log.level.as_str()
    } else {
        "warn"
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    // Colours only on a terminal: a log file or journal gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    if config.log.format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn run(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Serve => serve(config).await,
        Command::User(cmd) => user(cmd, config).await,
        Command::Cert(cmd) => cert(cmd, &config),
        Command::Trust(cmd) => trust(cmd, &config).await,
        Command::Alarms { json, history } => alarms(&config, json, history).await,
    }
}

async fn alarms(config: &Config, json: bool, history: bool) -> anyhow::Result<()> {
    let store = impmesh::node::open_store(config).await?;
    let result = async {
        if history {
            let events = store.alarm_history(200).await?;
            if json {
                let list: Vec<_> = events
                    .iter()
                    .map(|e| {
                        serde_json::json!({"name": e.name, "subject": e.subject, "severity": e.severity,
                            "event": if e.raised { "raised" } else { "cleared" }, "message": e.message, "at": e.at})
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(list));
            } else {
                for e in events {
                    let what = if e.raised { "raised " } else { "cleared" };
                    println!("{}  {what}  {:8}  {}  {}  {}", e.at, e.severity, e.name, e.subject, e.message);
                }
            }
            return Ok(());
        }
        let active = store.active_alarms().await?;
        if json {
            let list: Vec<_> = active
                .iter()
                .map(|a| {
                    serde_json::json!({"name": a.name, "subject": a.subject, "severity": a.severity,
                        "message": a.message, "since": a.since})
                })
                .collect();
            println!("{}", serde_json::Value::Array(list));
        } else if active.is_empty() {
            println!("no active alarms");
        } else {
            for a in active {
                println!("{:8}  {}  {}  {}  (since {})", a.severity, a.name, a.subject, a.message, a.since);
            }
        }
        Ok(())
    }
    .await;
    store.close().await;
    result
}

async fn trust(cmd: TrustCommand, config: &Config) -> anyhow::Result<()> {
    let store = impmesh::node::open_store(config).await?;
    let result = async {
        match cmd {
            TrustCommand::List { json } => {
                let entries = store.trust_entries().await?;
                if json {
                    let list: Vec<_> = entries
                        .iter()
                        .map(|e| {
                            serde_json::json!({
                                "fingerprint": e.fingerprint, "kind": e.kind.as_str(),
                                "subject": e.subject, "source": e.source, "peer": e.peer,
                                "added_at": e.added_at,
                            })
                        })
                        .collect();
                    println!("{}", serde_json::Value::Array(list));
                } else {
                    for e in entries {
                        println!(
                            "{}  {:6}  {}  source={}{}",
                            e.fingerprint,
                            e.kind.as_str(),
                            e.subject,
                            e.source,
                            e.peer.map(|p| format!(" peer={p}")).unwrap_or_default()
                        );
                    }
                }
                Ok(())
            }
            TrustCommand::Add { ca, pin, peer } => {
                let (path, kind) = match (ca, pin) {
                    (Some(p), None) => (p, impmesh_store::TrustKind::Ca),
                    (None, Some(p)) => (p, impmesh_store::TrustKind::Pinned),
                    _ => anyhow::bail!("give --ca FILE or --pin FILE --peer NAME"),
                };
                let pem = std::fs::read(&path)
                    .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
                let added = impmesh::trust::add(&store, &pem, kind, peer.as_deref()).await?;
                if added.is_empty() {
                    println!("already trusted");
                }
                for e in added {
                    println!("trusted {} ({})", e.fingerprint, e.subject);
                }
                Ok(())
            }
            TrustCommand::Remove { fingerprint } => {
                if !store
                    .remove_trust(&fingerprint.to_ascii_uppercase())
                    .await?
                {
                    anyhow::bail!("no trusted certificate with fingerprint {fingerprint}");
                }
                println!("removed {fingerprint}");
                Ok(())
            }
        }
    }
    .await;
    store.close().await;
    result
}

fn cert(cmd: CertCommand, config: &Config) -> anyhow::Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let identity = impmesh::node::identity(config)?;
    match cmd {
        CertCommand::Show { json } => {
            let infos = identity
                .chain
                .iter()
                .map(impmesh_certs::describe)
                .collect::<Result<Vec<_>, _>>()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&infos)?);
                return Ok(());
            }
            for (i, info) in infos.iter().enumerate() {
                let role = if i == 0 { "node certificate" } else { "chain" };
                println!("{role}:");
                println!("  subject:     {}", info.subject);
                println!(
                    "  issuer:      {}{}",
                    info.issuer,
                    if info.self_signed {
                        " (self-signed)"
                    } else {
                        ""
                    }
                );
                println!("  SANs:        {}", info.sans.join(", "));
                println!("  valid from:  {}", info.not_before);
                println!("  valid until: {}", info.not_after);
                println!("  SHA-256:     {}", info.sha256);
            }
            Ok(())
        }
        CertCommand::Regenerate => {
            let fp = impmesh::node::regenerate_certificate(config)?;
            println!("generated a new self-signed certificate; SHA-256 {fp}");
            println!("a running node uses it after SIGHUP (kill -HUP <pid>)");
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
            let fp = match (cert, p12) {
                (_, Some(p12)) => {
                    let archive = read(&p12)?;
                    let password =
                        impmesh::users::read_secret(password_stdin, "PKCS#12 password: ")?;
                    impmesh::node::import_pkcs12(config, &archive, &password)?
                }
                (Some(cert), None) => {
                    let cert = read(&cert)?;
                    let key = key.as_ref().map(read).transpose()?;
                    let chain = chain.as_ref().map(read).transpose()?;
                    impmesh::node::import_certificate(
                        config,
                        &cert,
                        key.as_deref(),
                        chain.as_deref(),
                    )?
                }
                (None, None) => anyhow::bail!("give --cert FILE or --p12 FILE"),
            };
            println!("installed; SHA-256 {fp}");
            println!("a running node uses it after SIGHUP (kill -HUP <pid>)");
            Ok(())
        }
        CertCommand::Csr { cn, san, out } => {
            let pem = identity.csr(&cn, &san)?;
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

async fn serve(config: Config) -> anyhow::Result<()> {
    let node = Node::start(&config).await?;
    for addr in &node.c2s {
        println!("impmesh: listening for XMPP clients on {addr} (STARTTLS)");
    }
    for addr in &node.c2s_direct_tls {
        println!("impmesh: listening for XMPP clients on {addr} (direct TLS)");
    }
    println!(
        "impmesh: serving domain {} from {} (certificate SHA-256 {})",
        config.domain,
        config.data_dir.display(),
        node.identity.fingerprint()
    );
    let mut node = node;
    while let Signal::Reload = wait_for_signal().await {
        match node.reload_certificates(&config).await {
            Ok(fp) => tracing::info!(sha256 = %fp, "certificate reloaded"),
            Err(e) => tracing::error!(error = %e, "certificate reload failed; keeping the old one"),
        }
    }
    tracing::info!("shutting down");
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

async fn user(cmd: UserCommand, config: Config) -> anyhow::Result<()> {
    let store = impmesh::node::open_store(&config).await?;
    let result = match cmd {
        UserCommand::Add {
            name,
            password_stdin,
        } => {
            let password = impmesh::users::read_password(password_stdin)?;
            let user = impmesh::users::add(&store, &config, &name, &password).await?;
            println!("created {user}@{}", config.domain);
            Ok(())
        }
        UserCommand::Del { name } => {
            let user = impmesh::users::delete(&store, &config, &name).await?;
            println!("deleted {user}@{}", config.domain);
            Ok(())
        }
        UserCommand::Passwd {
            name,
            password_stdin,
        } => {
            let password = impmesh::users::read_password(password_stdin)?;
            let user = impmesh::users::passwd(&store, &config, &name, &password).await?;
            println!("changed the password of {user}@{}", config.domain);
            Ok(())
        }
        UserCommand::List { json } => {
            let users = store.list_users().await?;
            if json {
                let list: Vec<_> = users
                    .iter()
                    .map(|u| {
                        serde_json::json!({
                            "username": u.username,
                            "jid": format!("{}@{}", u.username, config.domain),
                            "home_cluster": u.home_cluster,
                            "home_node": u.home_node,
                            "created_at": u.created_at,
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(list));
            } else {
                for u in users {
                    println!("{}@{}", u.username, config.domain);
                }
            }
            Ok(())
        }
    };
    store.close().await;
    result
}
