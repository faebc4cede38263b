//! `impmesh`: parses arguments, loads the configuration, installs logging, and runs a
//! node or an admin command.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use impmesh::config::Config;
use impmesh::node::Node;

mod trim;

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
    /// Manages accounts (through the running node, or on the store when it is stopped).
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
    /// The intercluster application user that peer clusters authenticate as.
    #[command(subcommand, name = "axl-user")]
    AxlUser(AxlUserCommand),
    /// Admin accounts of the admin API (besides the local token file).
    #[command(subcommand)]
    Admin(AdminCommand),
    /// The running node's status.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Intercluster peers, through the running node's sync agent.
    #[command(subcommand)]
    Peer(PeerCommand),
    /// The System Troubleshooter: each check with pass/fail and what it found.
    Troubleshoot {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum PeerCommand {
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

#[derive(Subcommand)]
enum AxlUserCommand {
    /// Creates the user or changes its password (asked for, or read from stdin).
    Set {
        name: String,
        #[arg(long)]
        password_stdin: bool,
    },
    /// Lists the users.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Deletes a user.
    Del { name: String },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Creates an admin account or changes its password.
    Add {
        name: String,
        #[arg(long)]
        password_stdin: bool,
    },
    /// Deletes an admin account.
    Del { name: String },
    /// Lists admin accounts.
    List,
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
    if let Command::Serve = command {
        return serve(config).await;
    }
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    // A running node is driven through its admin API; a stopped one directly.
    let mut api = impmesh::remote::connect(&config).await?;
    match command {
        Command::Serve => unreachable!("handled above"),
        Command::User(cmd) => user(cmd, &config, api.as_mut()).await,
        Command::Cert(cmd) => cert(cmd, &config, api.as_mut()).await,
        Command::Trust(cmd) => trust(cmd, &config, api.as_mut()).await,
        Command::Alarms { json, history } => alarms(&config, api.as_mut(), json, history).await,
        Command::AxlUser(cmd) => axl_user(cmd, &config, api.as_mut()).await,
        Command::Admin(cmd) => admin(cmd, &config).await,
        Command::Troubleshoot { json } => {
            let Some(api) = api.as_mut() else {
                anyhow::bail!(
                    "the node is not running (nothing answers on {})",
                    config.listen.admin
                );
            };
            let checks = call(api, Method::GET, "/troubleshoot", None).await?;
            let list = checks.as_array().cloned().unwrap_or_default();
            if json {
                print_json(&checks);
            } else {
                for c in &list {
                    let mark = if c["ok"] == true { "pass" } else { "FAIL" };
                    println!(
                        "{mark}  {}: {}",
                        c["name"].as_str().unwrap_or(""),
                        c["detail"].as_str().unwrap_or("")
                    );
                }
            }
            // Like a health check: non-zero when something needs attention.
            if list.iter().any(|c| c["ok"] != true) {
                std::process::exit(3);
            }
            Ok(())
        }
        Command::Peer(cmd) => {
            let Some(api) = api.as_mut() else {
                anyhow::bail!(
                    "the node is not running (nothing answers on {}); peers are managed by its sync agent",
                    config.listen.admin
                );
            };
            peer(cmd, api).await
        }
        Command::Status { json } => {
            let Some(api) = api.as_mut() else {
                anyhow::bail!(
                    "the node is not running (nothing answers on {})",
                    config.listen.admin
                );
            };
            let status = call(api, Method::GET, "/status", None).await?;
            if json {
                println!("{status}");
            } else {
                println!(
                    "node:        {} (cluster {}, domain {})",
                    status["node"].as_str().unwrap_or(""),
                    status["cluster"].as_str().unwrap_or(""),
                    status["domain"].as_str().unwrap_or("")
                );
                println!("version:     {}", status["version"].as_str().unwrap_or(""));
                println!("uptime:      {} s", status["uptime_secs"]);
                println!("sessions:    {}", status["sessions"]);
                println!(
                    "store:       {}, USN {}",
                    status["store"].as_str().unwrap_or(""),
                    status["usn"]
                );
                println!(
                    "certificate: {}",
                    status["certificate"]["sha256"].as_str().unwrap_or("")
                );
                println!("listeners:   {}", status["listeners"]);
            }
            Ok(())
        }
    }
}

use impmesh::remote::call;
use impmesh_axl::client::{AxlClient, Method};

/// Runs `local` on a store opened for the command, and closes the store after.
async fn with_store<T>(
    config: &Config,
    local: impl AsyncFnOnce(&impmesh_store::Store) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let store = impmesh::node::open_store(config).await?;
    let result = local(&store).await;
    store.close().await;
    result
}

/// A Unix time from a JSON answer as RFC 3339 UTC, or "-".
fn when(value: &serde_json::Value) -> String {
    value
        .as_i64()
        .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "-".into())
}

fn print_json(value: &serde_json::Value) {
    println!("{value}");
}

async fn alarms(
    config: &Config,
    api: Option<&mut AxlClient>,
    json: bool,
    history: bool,
) -> anyhow::Result<()> {
    let list = match api {
        Some(api) => {
            let path = if history {
                "/alarms/history"
            } else {
                "/alarms"
            };
            call(api, Method::GET, path, None).await?
        }
        None => {
            with_store(config, async |store| {
                Ok(if history {
                    serde_json::to_value(store.alarm_history(200).await?)?
                } else {
                    serde_json::to_value(store.active_alarms().await?)?
                })
            })
            .await?
        }
    };
    if json {
        print_json(&list);
        return Ok(());
    }
    let items = list.as_array().cloned().unwrap_or_default();
    if items.is_empty() && !history {
        println!("no active alarms");
    }
    for a in items {
        let text = |k: &str| a[k].as_str().unwrap_or("").to_owned();
        if history {
            let what = if a["raised"].as_bool() == Some(true) {
                "raised "
            } else {
                "cleared"
            };
            println!(
                "{}  {what}  {:8}  {}  {}  {}",
                when(&a["at"]),
                text("severity"),
                text("name"),
                text("subject"),
                text("message")
            );
        } else {
            println!(
                "{:8}  {}  {}  {}  (since {})",
                text("severity"),
                text("name"),
                text("subject"),
                text("message"),
                when(&a["since"])
            );
        }
    }
    Ok(())
}

async fn trust(
    cmd: TrustCommand,
    config: &Config,
    api: Option<&mut AxlClient>,
) -> anyhow::Result<()> {
    match cmd {
        TrustCommand::List { json } => {
            let entries = match api {
                Some(api) => call(api, Method::GET, "/trust", None).await?,
                None => {
                    with_store(config, async |store| {
                        Ok(serde_json::to_value(store.trust_entries().await?)?)
                    })
                    .await?
                }
            };
            if json {
                print_json(&entries);
                return Ok(());
            }
            for e in entries.as_array().cloned().unwrap_or_default() {
                let text = |k: &str| e[k].as_str().unwrap_or("").to_owned();
                let peer = e["peer"]
                    .as_str()
                    .map(|p| format!(" peer={p}"))
                    .unwrap_or_default();
                println!(
                    "{}  {:6}  {}  source={}{peer}",
                    text("fingerprint"),
                    text("kind"),
                    text("subject"),
                    text("source")
                );
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
            let added = match api {
                Some(api) => {
                    let body = serde_json::json!({
                        "pem": String::from_utf8_lossy(&pem), "kind": kind.as_str(), "peer": peer,
                    });
                    call(api, Method::POST, "/trust", Some(body)).await?
                }
                None => {
                    with_store(config, async |store| {
                        let added =
                            impmesh_axl::trust::add(store, &pem, kind, peer.as_deref(), "imported")
                                .await?;
                        Ok(serde_json::to_value(added)?)
                    })
                    .await?
                }
            };
            let added = added.as_array().cloned().unwrap_or_default();
            if added.is_empty() {
                println!("already trusted");
            }
            for e in added {
                println!(
                    "trusted {} ({})",
                    e["fingerprint"].as_str().unwrap_or(""),
                    e["subject"].as_str().unwrap_or("")
                );
            }
            Ok(())
        }
        TrustCommand::Remove { fingerprint } => {
            let fp = fingerprint.to_ascii_uppercase();
            match api {
                Some(api) => {
                    call(api, Method::DELETE, &format!("/trust/{fp}"), None).await?;
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

async fn cert(
    cmd: CertCommand,
    config: &Config,
    api: Option<&mut AxlClient>,
) -> anyhow::Result<()> {
    match cmd {
        CertCommand::Show { json } => {
            let infos = match api {
                Some(api) => call(api, Method::GET, "/certificates", None).await?,
                None => {
                    let identity = impmesh::node::identity(config)?;
                    let infos = identity
                        .chain
                        .iter()
                        .map(impmesh_certs::describe)
                        .collect::<Result<Vec<_>, _>>()?;
                    serde_json::to_value(infos)?
                }
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&infos)?);
                return Ok(());
            }
            for (i, info) in infos
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .enumerate()
            {
                let text = |k: &str| info[k].as_str().unwrap_or("").to_owned();
                let role = if i == 0 { "node certificate" } else { "chain" };
                let sans: Vec<String> = info["sans"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|s| s.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                println!("{role}:");
                println!("  subject:     {}", text("subject"));
                let self_signed = if info["self_signed"].as_bool() == Some(true) {
                    " (self-signed)"
                } else {
                    ""
                };
                println!("  issuer:      {}{self_signed}", text("issuer"));
                println!("  SANs:        {}", sans.join(", "));
                println!("  valid from:  {}", text("not_before"));
                println!("  valid until: {}", text("not_after"));
                println!("  SHA-256:     {}", text("sha256"));
            }
            Ok(())
        }
        CertCommand::Reload => {
            let Some(api) = api else {
                anyhow::bail!("the node is not running; it reads its certificates when it starts");
            };
            let r = call(api, Method::POST, "/certificates/reload", None).await?;
            println!(
                "reloaded; node certificate SHA-256 {}",
                r["fingerprint"].as_str().unwrap_or("")
            );
            Ok(())
        }
        CertCommand::EndOverlap => {
            let Some(api) = api else {
                anyhow::bail!("the node is not running: there is no rotation to end");
            };
            let r = call(api, Method::POST, "/certificates/end-overlap", None).await?;
            if r["ended"] == true {
                println!("the new certificate is now served to peers too");
            } else {
                println!("no certificate rotation is under way");
            }
            Ok(())
        }
        CertCommand::Regenerate => {
            let (fp, running) = match api {
                Some(api) => {
                    let r = call(api, Method::POST, "/certificates/regenerate", None).await?;
                    (r["fingerprint"].as_str().unwrap_or("").to_owned(), true)
                }
                None => (impmesh::node::regenerate_certificate(config)?, false),
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
            let body = match (&cert, &p12) {
                (_, Some(p12)) => {
                    let archive = read(p12)?;
                    let password =
                        impmesh::users::read_secret(password_stdin, "PKCS#12 password: ")?;
                    use base64::Engine as _;
                    serde_json::json!({
                        "p12": base64::engine::general_purpose::STANDARD.encode(archive),
                        "password": password,
                    })
                }
                (Some(cert), None) => serde_json::json!({
                    "cert": text(cert)?,
                    "key": key.as_ref().map(text).transpose()?,
                    "chain": chain.as_ref().map(text).transpose()?,
                }),
                (None, None) => anyhow::bail!("give --cert FILE or --p12 FILE"),
            };
            let (fp, running) = match api {
                Some(api) => {
                    let r = call(api, Method::POST, "/certificates/import", Some(body)).await?;
                    (r["fingerprint"].as_str().unwrap_or("").to_owned(), true)
                }
                None => {
                    let fp = if let Some(archive) = body["p12"].as_str() {
                        use base64::Engine as _;
                        let archive = base64::engine::general_purpose::STANDARD.decode(archive)?;
                        impmesh::node::import_pkcs12(
                            config,
                            &archive,
                            body["password"].as_str().unwrap_or(""),
                        )?
                    } else {
                        impmesh::node::import_certificate(
                            config,
                            body["cert"].as_str().unwrap_or("").as_bytes(),
                            body["key"].as_str().map(str::as_bytes),
                            body["chain"].as_str().map(str::as_bytes),
                        )?
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
                    let r = call(
                        api,
                        Method::POST,
                        "/certificates/csr",
                        Some(serde_json::json!({"cn": cn, "sans": san})),
                    )
                    .await?;
                    r["pem"].as_str().unwrap_or("").to_owned()
                }
                None => impmesh::node::identity(config)?.csr(&cn, &san)?,
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

async fn axl_user(
    cmd: AxlUserCommand,
    config: &Config,
    api: Option<&mut AxlClient>,
) -> anyhow::Result<()> {
    match cmd {
        AxlUserCommand::Set {
            name,
            password_stdin,
        } => {
            let password = impmesh::users::read_password(password_stdin)?;
            match api {
                Some(api) => {
                    call(
                        api,
                        Method::PUT,
                        &format!("/axl-users/{name}"),
                        Some(serde_json::json!({"password": password})),
                    )
                    .await?;
                }
                None => {
                    with_store(config, async |store| {
                        Ok(impmesh_axl::set_axl_user(store, &name, &password).await?)
                    })
                    .await?
                }
            }
            println!(
                "AXL user {name} set; peers authenticate as it on https://{}/axl/",
                config.listen.https
            );
            Ok(())
        }
        AxlUserCommand::List { json } => {
            let list = match api {
                Some(api) => call(api, Method::GET, "/axl-users", None).await?,
                None => with_store(config, async |store| {
                    let users = store.axl_users().await?;
                    Ok(serde_json::Value::Array(users.iter().map(|u| serde_json::json!({
                        "username": u.username, "created_at": u.created_at, "updated_at": u.updated_at,
                    })).collect()))
                })
                .await?,
            };
            if json {
                print_json(&list);
            } else {
                for u in list.as_array().cloned().unwrap_or_default() {
                    println!("{}", u["username"].as_str().unwrap_or(""));
                }
            }
            Ok(())
        }
        AxlUserCommand::Del { name } => {
            match api {
                Some(api) => {
                    call(api, Method::DELETE, &format!("/axl-users/{name}"), None).await?;
                }
                None => {
                    if !with_store(config, async |store| {
                        Ok(store.delete_axl_user(&name).await?)
                    })
                    .await?
                    {
                        anyhow::bail!("no AXL user {name}");
                    }
                }
            }
            println!("deleted AXL user {name}");
            Ok(())
        }
    }
}

async fn peer(cmd: PeerCommand, api: &mut AxlClient) -> anyhow::Result<()> {
    match cmd {
        PeerCommand::Add {
            address,
            user,
            password_stdin,
        } => {
            let password = impmesh::users::read_secret(password_stdin, "Peer's AXL password: ")?;
            let body = serde_json::json!({"address": address, "user": user, "password": password});
            let r = call(api, Method::POST, "/peers", Some(body)).await?;
            let cluster = r["cluster"].as_str().unwrap_or("");
            println!(
                "peered with {cluster} at {}; certificates exchanged and pinned both ways",
                r["address"].as_str().unwrap_or("")
            );
            println!(
                "{cluster} lists this cluster as pending until its admin runs `impmesh peer accept` there"
            );
        }
        PeerCommand::Accept { cluster } => {
            call(
                api,
                Method::POST,
                &format!("/peers/{}/accept", path_segment(&cluster)),
                None,
            )
            .await?;
            println!("accepted {cluster}; syncing its users");
        }
        PeerCommand::Del { cluster } => {
            call(
                api,
                Method::DELETE,
                &format!("/peers/{}", path_segment(&cluster)),
                None,
            )
            .await?;
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
                serde_json::json!({"with_certificates": true, "user": user, "password": password})
            } else {
                serde_json::json!({})
            };
            call(
                api,
                Method::POST,
                &format!("/peers/{}/sync", path_segment(&cluster)),
                Some(body),
            )
            .await?;
            println!(
                "full sync of {cluster} started; `impmesh peer status {cluster}` shows its progress"
            );
        }
        PeerCommand::List { json } => {
            let peers = call(api, Method::GET, "/peers", None).await?;
            if json {
                print_json(&peers);
                return Ok(());
            }
            let list = peers.as_array().cloned().unwrap_or_default();
            if list.is_empty() {
                println!("no peers");
            }
            for p in list {
                println!(
                    "{}  {:7}  {:10}  {} users  {}",
                    p["cluster"].as_str().unwrap_or(""),
                    p["state"].as_str().unwrap_or(""),
                    p["live"]["state"].as_str().unwrap_or(""),
                    p["associated_users"],
                    p["address"].as_str().unwrap_or(""),
                );
            }
        }
        PeerCommand::Status { cluster, json } => {
            let peers = call(api, Method::GET, "/peers", None).await?;
            let list: Vec<serde_json::Value> = peers
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter(|p| cluster.as_deref().is_none_or(|c| p["cluster"] == c))
                .collect();
            if let Some(c) = &cluster
                && list.is_empty()
            {
                anyhow::bail!("no peer {c}");
            }
            if json {
                print_json(&serde_json::Value::Array(list));
                return Ok(());
            }
            for p in list {
                let s = |v: &serde_json::Value| match v {
                    serde_json::Value::Null => "-".to_owned(),
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                println!("peer {}", s(&p["cluster"]));
                println!("  address:          {}", s(&p["address"]));
                println!(
                    "  state:            {} ({})",
                    s(&p["state"]),
                    if p["added_here"] == true {
                        "added here"
                    } else {
                        "added by the peer"
                    }
                );
                println!(
                    "  sync:             {}{}",
                    s(&p["live"]["state"]),
                    p["live"]["reason"]
                        .as_str()
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default()
                );
                println!(
                    "  associated users: {} (the peer has {})",
                    s(&p["associated_users"]),
                    s(&p["live"]["peer_users"])
                );
                println!(
                    "  applied USN:      {} (the peer is at {})",
                    s(&p["sync"]["applied_usn"]),
                    s(&p["live"]["peer_usn"])
                );
                println!(
                    "  last full sync:   at {}, USN {}, {} ms, {} users",
                    when(&p["sync"]["last_full_at"]),
                    s(&p["sync"]["last_full_usn"]),
                    s(&p["sync"]["last_full_ms"]),
                    s(&p["sync"]["last_full_users"])
                );
                println!(
                    "  last incremental: at {}, USN {}, {} ms, {} changes",
                    when(&p["sync"]["last_incr_at"]),
                    s(&p["sync"]["last_incr_usn"]),
                    s(&p["sync"]["last_incr_ms"]),
                    s(&p["sync"]["last_incr_changes"])
                );
                println!(
                    "  certificates:     {}{}",
                    s(&p["live"]["certificate_status"]),
                    p["live"]["certificate_reason"]
                        .as_str()
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default()
                );
                println!("  pinned:           {}", s(&p["pinned"]));
                println!(
                    "  failures:         {} in a row, {} stall restarts, {} directory entries refused",
                    s(&p["live"]["consecutive_failures"]),
                    s(&p["stall_restarts"]),
                    s(&p["live"]["refused_entries"])
                );
                println!(
                    "  clock skew:       {}",
                    p["live"]["clock_skew_secs"]
                        .as_i64()
                        .map(|k| format!("{k:+} s"))
                        .unwrap_or_else(|| "-".into())
                );
                let failing: Vec<String> = p["live"]["dns"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|n| n["ok"] == false)
                    .map(|n| {
                        format!(
                            "{} ({}; using {})",
                            s(&n["name"]),
                            s(&n["error"]),
                            s(&n["addresses"])
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
                let missing = p["live"]["missing_features"]
                    .as_array()
                    .map(|m| m.iter().map(&s).collect::<Vec<_>>().join(", "))
                    .unwrap_or_default();
                println!(
                    "  protocol:         {}, features {}{}",
                    s(&p["live"]["peer_protocol"]),
                    s(&p["live"]["peer_features"]),
                    if missing.is_empty() {
                        String::new()
                    } else {
                        format!(" (missing, not used with it: {missing})")
                    }
                );
                let links = p["links"].as_array().cloned().unwrap_or_default();
                if links.is_empty() {
                    println!("  router links:     none yet (opened when a stanza goes there)");
                }
                for l in links {
                    println!(
                        "  router link {:<3}  {} {} since {}, {} stanzas, {} queued ({} in the outbox, {} bytes), {} in flight{}",
                        s(&l["direction"]),
                        s(&l["node"]),
                        if l["up"] == true { "up" } else { "down" },
                        when(&l["since"]),
                        s(&l["stanzas"]),
                        s(&l["queued"]),
                        s(&l["outbox_rows"]),
                        s(&l["outbox_bytes"]),
                        s(&l["in_flight"]),
                        l["last_error"]
                            .as_str()
                            .map(|r| format!(" ({r})"))
                            .unwrap_or_default()
                    );
                }
            }
        }
    }
    Ok(())
}

async fn admin(cmd: AdminCommand, config: &Config) -> anyhow::Result<()> {
    with_store(config, async |store| match cmd {
        AdminCommand::Add {
            name,
            password_stdin,
        } => {
            if name.is_empty() || name.contains([':', ' ']) {
                anyhow::bail!("bad admin name {name:?}: no ':' or spaces");
            }
            let password = impmesh::users::read_password(password_stdin)?;
            if password.len() < 8 {
                anyhow::bail!("admin passwords need at least 8 characters");
            }
            store.set_admin_user(&name, &password).await?;
            println!("admin {name} set");
            Ok(())
        }
        AdminCommand::Del { name } => {
            if !store.delete_admin_user(&name).await? {
                anyhow::bail!("no admin {name}");
            }
            println!("deleted admin {name}");
            Ok(())
        }
        AdminCommand::List => {
            for name in store.admin_users().await? {
                println!("{name}");
            }
            Ok(())
        }
    })
    .await
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let node = Node::start(&config).await?;
    let trimming = tokio_util::sync::CancellationToken::new();
    let trimmer = trim::spawn(trimming.clone());
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

async fn user(
    cmd: UserCommand,
    config: &Config,
    api: Option<&mut AxlClient>,
) -> anyhow::Result<()> {
    let domain = &config.domain;
    match cmd {
        UserCommand::Add {
            name,
            password_stdin,
        } => {
            let password = impmesh::users::read_password(password_stdin)?;
            let user = match api {
                Some(api) => {
                    let r = call(
                        api,
                        Method::POST,
                        "/users",
                        Some(serde_json::json!({"name": name, "password": password})),
                    )
                    .await?;
                    r["username"].as_str().unwrap_or("").to_owned()
                }
                None => {
                    with_store(config, async |store| {
                        Ok(impmesh::users::add(store, config, &name, &password).await?)
                    })
                    .await?
                }
            };
            println!("created {user}@{domain}");
        }
        UserCommand::Del { name } => {
            let user = match api {
                Some(api) => {
                    let r = call(
                        api,
                        Method::DELETE,
                        &format!("/users/{}", path_segment(&name)),
                        None,
                    )
                    .await?;
                    r["username"].as_str().unwrap_or("").to_owned()
                }
                None => {
                    with_store(config, async |store| {
                        Ok(impmesh::users::delete(store, config, &name).await?)
                    })
                    .await?
                }
            };
            println!("deleted {user}@{domain}");
        }
        UserCommand::Passwd {
            name,
            password_stdin,
        } => {
            let password = impmesh::users::read_password(password_stdin)?;
            let user = match api {
                Some(api) => {
                    let r = call(
                        api,
                        Method::PUT,
                        &format!("/users/{}/password", path_segment(&name)),
                        Some(serde_json::json!({"password": password})),
                    )
                    .await?;
                    r["username"].as_str().unwrap_or("").to_owned()
                }
                None => {
                    with_store(config, async |store| {
                        Ok(impmesh::users::passwd(store, config, &name, &password).await?)
                    })
                    .await?
                }
            };
            println!("changed the password of {user}@{domain}");
        }
        UserCommand::List { json } => {
            let users = match api {
                Some(api) => call(api, Method::GET, "/users", None).await?,
                None => {
                    with_store(config, async |store| {
                        let users = store.list_users().await?;
                        Ok(serde_json::Value::Array(
                            users
                                .iter()
                                .map(|u| {
                                    serde_json::json!({
                                        "username": u.username,
                                        "jid": format!("{}@{domain}", u.username),
                                        "home_cluster": u.home_cluster,
                                        "home_node": u.home_node,
                                        "created_at": u.created_at,
                                        "usn": u.usn,
                                    })
                                })
                                .collect(),
                        ))
                    })
                    .await?
                }
            };
            if json {
                print_json(&users);
            } else {
                for u in users.as_array().cloned().unwrap_or_default() {
                    println!("{}", u["jid"].as_str().unwrap_or(""));
                }
            }
        }
    }
    Ok(())
}

/// Percent-encodes a name for one URL path segment.
fn path_segment(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
