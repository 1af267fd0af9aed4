//! The `shoal` command.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use shoal_node::config::{self, Config, FileConfig};
use shoal_node::identity::Identity;
use shoal_node::trust::{self, TrustRule};
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
        /// Peer-to-peer listen address (repeatable)
        /// [default: /ip4/0.0.0.0/udp/4001/quic-v1 and /ip4/0.0.0.0/tcp/4001]
        #[arg(long = "p2p-listen", env = "SHOAL_P2P_LISTEN", value_delimiter = ',')]
        p2p_listen: Vec<libp2p::Multiaddr>,
        /// Bootstrap peer address (repeatable)
        #[arg(long = "peer", env = "SHOAL_PEERS", value_delimiter = ',')]
        peers: Vec<libp2p::Multiaddr>,
        /// Do not look for peers on the LAN with mDNS
        #[arg(long, env = "SHOAL_NO_MDNS")]
        no_mdns: bool,
        /// Trust a publisher key for repositories: KEY=PATTERN, e.g. ed25519:ab..=team/* (repeatable)
        #[arg(long, env = "SHOAL_TRUST", value_delimiter = ',')]
        trust: Vec<TrustRule>,
        /// Cap on bytes per second sent to peers (for metered or slow links)
        #[arg(long, env = "SHOAL_UPLOAD_LIMIT")]
        upload_limit_bytes_per_sec: Option<u64>,
        /// This node's site (e.g. a datacenter or shop); chunks cross to other sites about once
        #[arg(long, env = "SHOAL_SITE")]
        site: Option<String>,
    },
    /// Show this node's keys.
    Keys {
        #[command(flatten)]
        common: Common,
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Manage which publishers are trusted for which repositories (takes effect at next start).
    Trust {
        #[command(flatten)]
        common: Common,
        #[command(subcommand)]
        command: TrustCommand,
    },
    /// List the peers a running node is connected to.
    Peers {
        /// Registry address of the running node
        #[arg(long, env = "SHOAL_LISTEN", default_value = config::DEFAULT_LISTEN)]
        listen: std::net::SocketAddr,
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

#[derive(Subcommand)]
enum KeysCommand {
    /// Print the peer id and the publisher key (created on first use).
    Show,
}

#[derive(Subcommand)]
enum TrustCommand {
    /// Trust KEY for repositories matching PATTERN ('*', 'team/*' or a name).
    Add {
        /// Publisher key, as `shoal keys show` prints it
        key: String,
        /// Repository pattern
        pattern: String,
    },
    /// List trust rules.
    List,
    /// Remove every rule for KEY (or only the one for PATTERN).
    Rm {
        /// Publisher key
        key: String,
        /// Repository pattern
        pattern: Option<String>,
    },
}

fn resolve(common: Common, flags: FileConfig) -> anyhow::Result<Config> {
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
            ..flags
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
        Command::Node {
            common,
            listen,
            p2p_listen,
            peers,
            no_mdns,
            trust,
            upload_limit_bytes_per_sec,
            site,
        } => {
            let flags = FileConfig {
                data_dir: None,
                listen,
                p2p_listen: (!p2p_listen.is_empty()).then_some(p2p_listen),
                peers: (!peers.is_empty()).then_some(peers),
                mdns: no_mdns.then_some(false),
                trust: Some(trust),
                upload_limit_bytes_per_sec,
                site,
            };
            let config = resolve(common, flags)?;
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(run_node(config))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Fsck { common, repair } => {
            let config = resolve(common, FileConfig::default())?;
            let report = match store::fsck(&config.data_dir, repair) {
                Ok(r) => r,
                Err(e) => {
                    // Not a verdict on the store: it could not be checked at all.
                    eprintln!(
                        "shoal fsck: could not check {}: {e}",
                        config.data_dir.display()
                    );
                    return Ok(ExitCode::from(2));
                }
            };
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
        Command::Keys {
            common,
            command: KeysCommand::Show,
        } => {
            let config = resolve(common, FileConfig::default())?;
            let id = Identity::load_or_create(&config.data_dir)?;
            println!("peer id:       {}", id.peer_id());
            println!("publisher key: {}", id.publisher());
            Ok(ExitCode::SUCCESS)
        }
        Command::Trust { common, command } => {
            let config = resolve(common, FileConfig::default())?;
            let mut rules = trust::read_file(&config.data_dir)?;
            match command {
                TrustCommand::Add { key, pattern } => {
                    let rule: TrustRule = format!("{key}={pattern}").parse()?;
                    if !rules.contains(&rule) {
                        rules.push(rule.clone());
                    }
                    trust::write_file(&config.data_dir, &rules)?;
                    println!("trusted {rule}");
                }
                TrustCommand::List => {
                    for rule in &rules {
                        println!("{rule}");
                    }
                }
                TrustCommand::Rm { key, pattern } => {
                    let before = rules.len();
                    rules.retain(|r| {
                        !(r.key.to_string() == key
                            && pattern.as_ref().is_none_or(|p| *p == r.pattern))
                    });
                    trust::write_file(&config.data_dir, &rules)?;
                    println!("removed {} rule(s)", before - rules.len());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Peers { listen } => {
            let body = http_get(listen, "/_shoal/v1/peers")?;
            let v: serde_json::Value =
                serde_json::from_str(&body).context("the node's answer is not JSON")?;
            let peers = v["peers"].as_array().cloned().unwrap_or_default();
            if peers.is_empty() {
                println!("no peers connected");
            }
            let strings = |v: &serde_json::Value| -> Vec<String> {
                v.as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|x| x.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default()
            };
            for p in peers {
                println!(
                    "{} connected over {}; known at {}",
                    p["peer_id"].as_str().unwrap_or("?"),
                    strings(&p["connections"]).join(" "),
                    strings(&p["addresses"]).join(" ")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A minimal HTTP/1.1 GET to the node's own admin API on loopback.
fn http_get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)
        .with_context(|| format!("connecting to the node at {addr}"))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    s.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    anyhow::ensure!(
        head.starts_with("HTTP/1.1 200"),
        "the node answered: {}",
        head.lines().next().unwrap_or("")
    );
    Ok(body.to_owned())
}

async fn run_node(config: Config) -> anyhow::Result<()> {
    let node = Node::start(config).await?;
    // The node starts once each listener has its address, so this lists them all.
    let addrs = node.network().listen_addrs().await.unwrap_or_default();
    let addrs: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    println!(
        "shoal p2p: peer id {} listening on {}",
        node.network().peer_id(),
        addrs.join(" ")
    );
    println!("shoal publisher key: {}", node.identity().publisher());
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
