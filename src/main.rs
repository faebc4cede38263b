//! `impmesh`: parses arguments, loads the configuration, installs logging, and runs a
//! node or an admin command.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use impmesh::config::Config;

use cli::admin::AdminCommand;
use cli::axl_user::AxlUserCommand;
use cli::cert::CertCommand;
use cli::peer::PeerCommand;
use cli::room::RoomCommand;
use cli::trust::TrustCommand;
use cli::user::UserCommand;

mod cli;
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
    /// Chat rooms (XEP-0045) of the running node.
    #[command(subcommand)]
    Room(RoomCommand),
    /// The System Troubleshooter: each check with pass/fail and what it found.
    Troubleshoot {
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    // Before the runtime and the sessions allocate (src/trim.rs says why).
    let huge_pages_off = trim::disable_huge_pages();
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref(), cli.data_dir.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("impmesh: {e}");
            return ExitCode::from(2);
        }
    };
    install_tracing(&config, matches!(cli.command, Command::Serve));
    if let Some(Err(e)) = huge_pages_off {
        tracing::warn!(
            error = %e,
            "cannot turn transparent huge pages off: memory freed when sessions end may stay resident"
        );
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_park(trim::on_park)
        .build()
    {
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
        return cli::serve::run(config).await;
    }
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    // A running node is driven through its admin API; a stopped one directly.
    let mut api = impmesh::remote::connect(&config).await?;
    let api = api.as_mut();
    match command {
        Command::Serve => unreachable!("handled above"),
        Command::User(cmd) => cli::user::run(cmd, &config, api).await,
        Command::Cert(cmd) => cli::cert::run(cmd, &config, api).await,
        Command::Trust(cmd) => cli::trust::run(cmd, &config, api).await,
        Command::Alarms { json, history } => cli::alarms::run(&config, api, json, history).await,
        Command::AxlUser(cmd) => cli::axl_user::run(cmd, &config, api).await,
        Command::Admin(cmd) => cli::admin::run(cmd, &config).await,
        Command::Status { json } => cli::node::status(&config, api, json).await,
        Command::Room(cmd) => cli::room::run(cmd, &config, api).await,
        Command::Troubleshoot { json } => cli::node::troubleshoot(&config, api, json).await,
        Command::Peer(cmd) => {
            let why = "; peers are managed by its sync agent";
            cli::peer::run(cmd, cli::running(api, &config, why)?).await
        }
    }
}
