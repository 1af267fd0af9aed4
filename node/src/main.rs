//! The `shoal` command.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use shoal_node::config::{self, Config, FileConfig};
use shoal_node::{Node, store};

/// Shoal: a peer-to-peer container image store with a standard registry API.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct Common {
    /// Data directory [default: $XDG_DATA_HOME/shoal]
    #[arg(long, env = "SHOAL_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,
    /// Config file (TOML) [default: $XDG_CONFIG_HOME/shoal/config.toml, if present]
    #[arg(long, env = "SHOAL_CONFIG", global = true)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node: the store and the registry API.
    Node {
        #[command(flatten)]
        common: Common,
        /// Address of the registry API [default: 127.0.0.1:5000]
        #[arg(long, env = "SHOAL_LISTEN")]
        listen: Option<std::net::SocketAddr>,
    },
    /// Check the data directory: hash every blob, compare the index with the records log.
    Fsck {
        #[command(flatten)]
        common: Common,
        /// Rebuild the index from the records log and quarantine corrupt blobs.
        #[arg(long)]
        repair: bool,
    },
}

fn resolve(common: Common, listen: Option<std::net::SocketAddr>) -> anyhow::Result<Config> {
    let (path, explicit) = match common.config {
        Some(p) => (Some(p), true),
        None => (config::default_config_path(), false),
    };
    let file = match path {
        Some(p) => config::read_file(&p, explicit)?,
        None => FileConfig::default(),
    };
    Ok(Config::resolve(
        FileConfig {
            data_dir: common.data_dir,
            listen,
        },
        file,
    )?)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SHOAL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("shoal: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Node { common, listen } => {
            let config = resolve(common, listen)?;
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(run_node(config))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Fsck { common, repair } => {
            let config = resolve(common, None)?;
            let report = store::fsck(&config.data_dir, repair)?;
            println!(
                "checked {} blobs ({} bytes) and {} records in {}",
                report.blobs_checked,
                report.bytes_checked,
                report.records,
                config.data_dir.display()
            );
            for r in &report.repaired {
                println!("repaired: {r}");
            }
            for p in &report.problems {
                println!("problem: {p}");
            }
            if report.is_clean() {
                println!("clean");
                Ok(ExitCode::SUCCESS)
            } else {
                Ok(ExitCode::FAILURE)
            }
        }
    }
}

async fn run_node(config: Config) -> anyhow::Result<()> {
    let node = Node::start(config).await?;
    println!(
        "shoal ready: registry listening on http://{}",
        node.registry_addr()
    );
    wait_for_signal().await?;
    tracing::info!("shutting down");
    node.shutdown().await;
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT")?,
        _ = term.recv() => {}
    }
    Ok(())
}
