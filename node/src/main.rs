//! The `shoal` command.
//!
//! `shoal node` runs a node. Most other commands talk to the running node through its admin
//! socket (`admin.sock` in the data directory, reachable by the node's own user only); those
//! that edit files (`trust`, `user`) then ask the node to read them again, and `fsck`, `keys`
//! and `audit` read the data directory directly.

mod admin_client;
mod offline;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use shoal_node::auth::audit;
use shoal_node::auth::trust::{self, TrustRule};
use shoal_node::auth::users::{User, Users, hash_password};
use shoal_node::auth::{LocalClients, now_ms};
use shoal_node::config::{self, Config, FileConfig};
use shoal_node::identity::Identity;
use shoal_node::registry::admin;
use shoal_node::{Node, store};
use shoal_protocol::fleet::{
    Actions, Grant, Name, PolicyBody, Principal, RepoPattern, RepoSettings, Revoked, TagMutability,
    TagPattern, Visibility,
};
use shoal_protocol::lifecycle::LifecyclePolicy;

use admin_client::AdminClient;

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
        /// Cap on bytes per second served to peers (for metered or slow links)
        #[arg(
            long,
            env = "SHOAL_SERVE_LIMIT",
            visible_alias = "upload-limit-bytes-per-sec"
        )]
        serve_limit_bytes_per_sec: Option<u64>,
        /// This node's site (e.g. a datacenter or shop); chunks cross to other sites about once
        #[arg(long, env = "SHOAL_SITE")]
        site: Option<String>,
        /// Join the fleet of this join token (`shoal fleet init` prints one); remembered
        #[arg(long, env = "SHOAL_JOIN")]
        join: Option<String>,
        /// Also take policies, tokens and tickets signed by this admin key, besides the fleet's
        /// (repeatable; `shoal keys` prints one): a decision of this node only
        #[arg(long = "admin", env = "SHOAL_ADMINS", value_delimiter = ',')]
        admins: Vec<shoal_protocol::PublisherKey>,
        /// How loopback clients are treated: open (trusted, the default) or authenticated
        #[arg(long, env = "SHOAL_LOCAL_CLIENTS", value_parser = parse_local_clients)]
        local_clients: Option<LocalClients>,
        /// Let clients without credentials pull public repositories
        #[arg(long, env = "SHOAL_ANONYMOUS_PULL")]
        anonymous_pull: bool,
        /// PEM certificate chain: serve the registry over HTTPS
        #[arg(long, env = "SHOAL_TLS_CERT", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// PEM private key for --tls-cert
        #[arg(long, env = "SHOAL_TLS_KEY", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Serve a non-loopback address without HTTPS or credentials
        #[arg(long, env = "SHOAL_INSECURE")]
        insecure: bool,
        /// Disk quota: bytes (`20GiB`) or a share of the filesystem (`80%`); over it, cached
        /// content that came from the fleet is evicted, least recently used first
        #[arg(long, env = "SHOAL_MAX_DISK")]
        max_disk: Option<shoal_node::quota::MaxDisk>,
    },
    /// Show this node's keys.
    Keys {
        #[command(flatten)]
        common: Common,
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Manage which publishers this node trusts for which repositories, besides its fleet.
    Trust {
        #[command(flatten)]
        common: Common,
        #[command(subcommand)]
        command: TrustCommand,
    },
    /// Collect garbage: apply the fleet's retention policies, then remove the blobs no tag, live
    /// manifest or recent push needs. Runs inside the node if one runs on the data directory
    /// (pushes and pulls go on), else on the directory itself.
    Gc {
        #[command(flatten)]
        common: Common,
        /// List what would go and how many bytes; remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Keep blobs and manifests younger than this (`90s`, `15m`, `12h`, `7d`).
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        grace: Duration,
    },
    /// Compact the records log: a snapshot of the current state replaces its history. Runs
    /// inside the node if one runs on the data directory (pushes and pulls go on), else on the
    /// directory itself.
    Compact {
        #[command(flatten)]
        common: Common,
    },
    /// Where the disk goes: bytes by repository (unique to it or shared), upload sessions,
    /// downloads in progress, and what garbage collection would free.
    Du {
        #[command(flatten)]
        common: Common,
        /// Count as reclaimable what is older than this (`90s`, `15m`, `12h`, `7d`).
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        grace: Duration,
    },
    /// Pin an image (`REPO:TAG` or `REPO@DIGEST`): the disk quota never evicts it while fewer
    /// than the given copies would remain in the fleet, and garbage collection keeps it.
    Pin {
        #[command(flatten)]
        common: Common,
        /// The image.
        image: String,
        /// Copies the fleet should keep, this node's included.
        #[arg(long, default_value_t = 1)]
        copies: u32,
    },
    /// Remove a pin made with `shoal pin`.
    Unpin {
        #[command(flatten)]
        common: Common,
        /// The image, as it was pinned.
        image: String,
    },
    /// List the pins (`shoal pin`) and the config's `[[pin]]` rules.
    Pins {
        #[command(flatten)]
        common: Common,
    },
    /// Retention policies (Amazon ECR's lifecycle-policy JSON).
    Lifecycle {
        #[command(flatten)]
        common: Common,
        #[command(subcommand)]
        command: LifecycleCommand,
    },
    /// Show the running node: its peer id and addresses, the tag records it received, and
    /// where its disk stands (store, filesystem, quota).
    Status {
        #[command(flatten)]
        common: Common,
        /// Print the answer as JSON
        #[arg(long)]
        json: bool,
    },
    /// Fetch images the fleet has records for (`REPO:TAG`, `REPO@DIGEST`) into the running
    /// node before anyone pulls them, with progress; or ask other nodes to (`--node`, `--site`),
    /// which fetch them in turn at their own rate limit (`subscribe_rate`).
    Prefetch {
        #[command(flatten)]
        common: Common,
        /// The images.
        #[arg(required = true)]
        images: Vec<String>,
        /// Ask this node (its peer id, as `shoal peers` shows) instead (repeatable).
        #[arg(long = "node")]
        nodes: Vec<String>,
        /// Ask the connected nodes of this site instead (repeatable).
        #[arg(long = "site")]
        sites: Vec<String>,
        /// With --node or --site, fetch the images into this node too.
        #[arg(long)]
        local: bool,
        /// Print a JSON summary at the end instead of progress.
        #[arg(long)]
        json: bool,
    },
    /// List the peers the running node is connected to.
    Peers {
        #[command(flatten)]
        common: Common,
    },
    /// Check the data directory: hash every blob, compare the index with the records log.
    Fsck {
        #[command(flatten)]
        common: Common,
        /// Rebuild the index from the records log and quarantine corrupt blobs.
        #[arg(long)]
        repair: bool,
    },
    /// Found, join or look at a fleet.
    Fleet {
        #[command(flatten)]
        common: Common,
        #[command(subcommand)]
        command: FleetCommand,
    },
    /// Set a repository pattern's settings for the whole fleet (needs the admin key).
    Repo {
        #[command(flatten)]
        common: Common,
        #[command(subcommand)]
        command: RepoCommand,
    },
    /// Grant a principal actions on repositories, fleet-wide (needs the admin key).
    Grant {
        #[command(flatten)]
        common: Common,
        #[command(subcommand)]
        command: GrantCommand,
    },
    /// Revoke an access token, a join ticket or a node, fleet-wide (needs the admin key).
    Revoke {
        #[command(flatten)]
        common: Common,
        #[command(subcommand)]
        what: RevokeCommand,
    },
    /// Make client credentials (needs the admin key).
    Token {
        #[command(flatten)]
        common: Common,
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Manage this node's own users (passwords, for people).
    User {
        #[command(flatten)]
        common: Common,
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Point containerd or docker at this node as the mirror of its upstream registries.
    Mirror {
        #[command(flatten)]
        common: Common,
        #[command(subcommand)]
        command: MirrorCommand,
    },
    /// Print the audit trail: pushes, tag moves, deletes, policy changes, denied requests.
    Audit {
        #[command(flatten)]
        common: Common,
        /// One JSON object per line, as stored
        #[arg(long)]
        json: bool,
        /// Only the last N entries
        #[arg(long)]
        last: Option<usize>,
    },
}

#[derive(Subcommand)]
enum MirrorCommand {
    /// A hosts.toml for every `[[upstream]]` (and `_default`) pointing at the node, and the
    /// config.toml lines (containerd 1.x and 2.x) that make containerd read them.
    Containerd {
        #[command(flatten)]
        target: MirrorTarget,
        /// Print the hosts.toml files and the config.toml lines
        #[arg(long)]
        print: bool,
        /// Write the hosts.toml files under DIR (DIR/REGISTRY/hosts.toml): containerd's
        /// config_path, e.g. /etc/containerd/certs.d
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Let containerd accept any certificate from an HTTPS node (instead of trusting the
        /// node's own certificate)
        #[arg(long)]
        skip_verify: bool,
    },
    /// The daemon.json lines that make the node docker's mirror of Docker Hub.
    Docker {
        #[command(flatten)]
        target: MirrorTarget,
        /// Print the daemon.json lines (and, on stderr, what else docker needs)
        #[arg(long)]
        print: bool,
    },
}

#[derive(clap::Args)]
struct MirrorTarget {
    /// The node's registry URL as clients on this host reach it [default: from the node's
    /// listen address and TLS settings]
    #[arg(long)]
    node: Option<String>,
    /// Address of the node's registry API, as given to `shoal node --listen`
    #[arg(long, env = "SHOAL_LISTEN")]
    listen: Option<std::net::SocketAddr>,
}

#[derive(Subcommand)]
enum LifecycleCommand {
    /// Show which images of REPO a policy would expire on this node, and why. Changes nothing.
    Preview {
        /// The repository.
        repo: shoal_protocol::RepoName,
        /// The policy file, in ECR's lifecycle-policy JSON (`{"rules": [...]}`); default: the
        /// fleet's policy for REPO
        #[arg(long)]
        policy: Option<PathBuf>,
    },
    /// Set the retention policy of the repositories PATTERN covers, fleet-wide (needs the admin
    /// key). Every node applies it when it collects garbage.
    Set {
        /// Repository pattern ('*', 'team/*' or a name)
        pattern: RepoPattern,
        /// The policy file, in ECR's lifecycle-policy JSON (`{"rules": [...]}`)
        #[arg(long)]
        policy: PathBuf,
    },
    /// Withdraw the retention policy of PATTERN, fleet-wide (needs the admin key).
    Unset {
        /// Repository pattern
        pattern: RepoPattern,
    },
    /// List the fleet's retention policies in force on the running node.
    Show,
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Print the peer id and the publisher key (created on first use).
    Show,
    /// Make a fleet admin key on this node (or show the one it has) and print its public key,
    /// for `shoal fleet init --admin KEY` on the founding node. A running node takes it up when
    /// it restarts.
    Admin,
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

#[derive(Subcommand)]
enum FleetCommand {
    /// Found a fleet with the running node as its admin, and print a join token for others.
    Init {
        #[command(flatten)]
        ticket: TicketArgs,
        /// Another admin of the fleet, as `shoal keys admin` printed it on the node that holds
        /// it (repeatable). Fixed when the fleet is founded.
        #[arg(long = "admin")]
        admins: Vec<String>,
    },
    /// Print another join token (on the node that holds the admin key).
    Token {
        #[command(flatten)]
        ticket: TicketArgs,
    },
    /// Make the running node join the fleet of TOKEN.
    Join {
        /// The join token
        token: String,
    },
    /// Show the running node's fleet, admins and policies.
    Status,
}

#[derive(clap::Args)]
struct TicketArgs {
    /// How long the token may be used to join (e.g. 24h, 7d)
    #[arg(long, value_parser = parse_duration)]
    ttl: Option<Duration>,
    /// A group the nodes that join with it belong to (repeatable)
    #[arg(long = "group")]
    groups: Vec<String>,
}

#[derive(Subcommand)]
enum RepoCommand {
    /// Set the settings of the repositories PATTERN covers.
    Set {
        /// Repository pattern ('*', 'team/*' or a name)
        pattern: RepoPattern,
        /// Only nodes and clients with a grant see them
        #[arg(long, conflicts_with = "public")]
        private: bool,
        /// Every member node and authenticated client sees them (the default)
        #[arg(long)]
        public: bool,
        /// A tag, once it names a manifest, names it until deleted
        #[arg(long)]
        immutable: bool,
        /// A tag pattern left mutable under --immutable (repeatable; 'latest', 'dev-*')
        #[arg(long = "except", requires = "immutable")]
        except: Vec<TagPattern>,
        /// The only keys that may sign tags there (repeatable; default any member)
        #[arg(long = "publisher")]
        publishers: Vec<shoal_protocol::PublisherKey>,
    },
    /// Withdraw the settings of PATTERN.
    Unset {
        /// Repository pattern
        pattern: RepoPattern,
    },
}

#[derive(Subcommand)]
enum GrantCommand {
    /// Grant (or replace the grant named NAME).
    Add {
        /// The grant's name
        name: Name,
        /// Who: user:NAME, group:NAME or node:ed25519:KEY
        #[arg(long)]
        principal: Principal,
        /// Which repositories ('*', 'team/*' or a name)
        #[arg(long = "repo")]
        repos: RepoPattern,
        /// What: pull,push,delete,admin
        #[arg(long)]
        actions: Actions,
        /// For how long (e.g. 30d); until withdrawn if not given
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
    },
    /// Withdraw the grant named NAME.
    Rm {
        /// The grant's name
        name: Name,
    },
}

#[derive(Subcommand)]
enum RevokeCommand {
    /// An access token, by the id `shoal token create` printed.
    Token {
        /// Token id
        id: shoal_protocol::fleet::ObjectId,
    },
    /// A join ticket, by id: nodes that joined with it are members no more.
    Ticket {
        /// Ticket id
        id: shoal_protocol::fleet::ObjectId,
    },
    /// A node, by key: it is a member no more and its tag records stop counting.
    Node {
        /// The node's publisher key
        key: shoal_protocol::PublisherKey,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print an access token every node of the fleet accepts (as a `docker login` password).
    Create {
        /// Who it is for (for the audit trail)
        #[arg(long)]
        principal: String,
        /// Repository pattern it covers
        #[arg(long = "repo")]
        repo: String,
        /// Actions it allows there: pull,push,delete
        #[arg(long)]
        actions: String,
        /// How long it lasts (e.g. 12h)
        #[arg(long, value_parser = parse_duration, default_value = "12h")]
        ttl: Duration,
    },
}

#[derive(Subcommand)]
enum UserCommand {
    /// Add (or replace) a user; reads the password from standard input.
    Add {
        /// Login name
        name: Name,
        /// Repositories the user may act on, on this node
        #[arg(long = "repo", default_value = "*")]
        repos: RepoPattern,
        /// What the user may do there (pull,push,delete,admin)
        #[arg(long, default_value = "pull")]
        actions: Actions,
    },
    /// Remove a user.
    Rm {
        /// Login name
        name: Name,
    },
    /// List users.
    List,
}

fn parse_local_clients(s: &str) -> Result<LocalClients, String> {
    match s {
        "open" => Ok(LocalClients::Open),
        "authenticated" => Ok(LocalClients::Authenticated),
        _ => Err("open or authenticated".into()),
    }
}

/// `90s`, `15m`, `12h`, `7d` (a bare number is seconds).
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 12h)"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86_400),
        _ => return Err(format!("{s:?}: the unit is s, m, h or d")),
    };
    Ok(Duration::from_secs(secs))
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

/// Prints a collection's report (`dry_run`: what it would do).
fn print_gc(report: &store::GcReport, dry_run: bool) {
    if report.expired_images > 0 || report.expired_tags > 0 {
        println!(
            "retention policies {} {} images ({} tags)",
            if dry_run { "would expire" } else { "expired" },
            report.expired_images,
            report.expired_tags
        );
    }
    if dry_run {
        for (digest, size) in &report.swept {
            println!("would remove {digest} ({size} bytes)");
        }
    }
    println!(
        "{} {} bytes in {} blobs; {} of {} blobs live, {} kept as younger than the grace period, {} touched meanwhile (mark {} ms, sweep {} ms)",
        if dry_run { "would free" } else { "freed" },
        report.bytes_freed,
        report.swept.len(),
        report.live,
        report.blobs,
        report.young,
        report.touched,
        report.mark_ms,
        report.sweep_ms
    );
    if report.abandoned_downloads > 0 {
        println!(
            "{} {} abandoned downloads ({} bytes)",
            if dry_run { "would remove" } else { "removed" },
            report.abandoned_downloads,
            report.abandoned_download_bytes
        );
    }
}

/// Runs a store operation through the node running on the data directory (`online`, over its
/// admin socket), or, when none runs there, on the directory itself (`offline`).
fn node_or_store<T, Fut>(
    config: &Config,
    online: impl FnOnce(&AdminClient) -> anyhow::Result<T>,
    offline: impl FnOnce(store::Store) -> Fut,
) -> anyhow::Result<T>
where
    Fut: std::future::Future<Output = Result<T, store::StoreError>>,
{
    let admin = AdminClient::new(&config.data_dir);
    if admin.exists() {
        return online(&admin);
    }
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        let dir = config.data_dir.clone();
        let store = tokio::task::spawn_blocking(move || store::Store::open(&dir)).await??;
        let result = offline(store.clone()).await;
        store.close().await;
        Ok(result?)
    })
}

fn print_status(s: &admin::Status) {
    println!("peer id: {}", s.peer_id.as_deref().unwrap_or("none"));
    println!("p2p listen: {}", s.p2p_listen.join(" "));
    println!(
        "tag records: {} accepted, {} stale, {} untrusted, {} invalid",
        s.records.accepted, s.records.stale, s.records.untrusted, s.records.invalid
    );
    println!(
        "served to peers: {} bytes; bad peers cut off: {}",
        s.served_bytes, s.bad_peers
    );
    let Some(d) = &s.disk else {
        return;
    };
    let known = |b: Option<u64>| b.map_or_else(|| "unknown".to_owned(), |b| b.to_string());
    println!(
        "disk: the store uses {} bytes; filesystem {} bytes free of {}",
        d.used_bytes,
        known(d.fs_free_bytes),
        known(d.fs_total_bytes)
    );
    match d.max_disk_bytes {
        Some(max) => println!("quota: {max} bytes"),
        None => println!("quota: none"),
    }
    if let (Some(p), Some(n), Some(c)) = (d.published_bytes, d.pinned_bytes, d.cached_bytes) {
        println!("published {p} bytes, pinned {n} bytes, cached {c} bytes");
    }
}

fn admin_of(common: Common) -> anyhow::Result<AdminClient> {
    let config = resolve(common, FileConfig::default())?;
    Ok(AdminClient::new(&config.data_dir))
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
            serve_limit_bytes_per_sec,
            site,
            join,
            admins,
            local_clients,
            anonymous_pull,
            tls_cert,
            tls_key,
            insecure,
            max_disk,
        } => {
            let flags = FileConfig {
                data_dir: None,
                listen,
                p2p_listen: (!p2p_listen.is_empty()).then_some(p2p_listen),
                peers: (!peers.is_empty()).then_some(peers),
                mdns: no_mdns.then_some(false),
                trust: Some(trust),
                serve_limit_bytes_per_sec,
                site,
                join,
                admins: (!admins.is_empty()).then_some(admins),
                local_clients,
                anonymous_pull: anonymous_pull.then_some(true),
                tls_cert,
                tls_key,
                insecure: insecure.then_some(true),
                http: None,
                gc: None,
                max_disk,
                pin: None,
                subscribe: None,
                subscribe_rate: None,
                upstream: None,
                default_upstream: None,
            };
            let config = resolve(common, flags)?;
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(run_node(config))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Gc {
            common,
            dry_run,
            grace,
        } => {
            let config = resolve(common, FileConfig::default())?;
            let fleet = shoal_node::auth::FleetConfig::read(&config.data_dir)?;
            let clock = shoal_node::clock::FleetClock::stored(&config.data_dir);
            let gc = config.gc.clone();
            let report: store::GcReport = node_or_store(
                &config,
                |admin| {
                    let ask = admin::GcRequest {
                        dry_run,
                        grace_secs: grace.as_secs(),
                    };
                    admin.post("/_shoal/v1/gc", &ask)
                },
                |store| async move {
                    let retention = store
                        .read(move |i| shoal_node::lifecycle::stored_retention(i, fleet.as_ref()))
                        .await?
                        .with_clock(clock);
                    store
                        .gc_with_retention(gc.options(grace, dry_run), &retention)
                        .await
                },
            )?;
            print_gc(&report, dry_run);
            Ok(ExitCode::SUCCESS)
        }
        Command::Compact { common } => {
            let config = resolve(common, FileConfig::default())?;
            let report: store::CompactReport = node_or_store(
                &config,
                |admin| admin.post("/_shoal/v1/compact", &serde_json::json!({})),
                |store| async move { store.compact().await },
            )?;
            println!(
                "journal generation {}: {} bytes -> {} bytes (snapshot {} bytes of {} lines, \
                 tail {} bytes); {} changes replayed in {} ms, pushes waited {} ms",
                report.generation,
                report.journal_bytes_before + report.tail_bytes,
                report.journal_bytes_after,
                report.snapshot_bytes,
                report.snapshot_lines,
                report.tail_bytes,
                report.changes_replayed,
                report.prepare_ms,
                report.switch_ms
            );
            if report.corrupt_lines > 0 {
                println!(
                    "dropped {} journal lines that failed their checksum",
                    report.corrupt_lines
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Du { common, grace } => {
            let config = resolve(common, FileConfig::default())?;
            let fleet = shoal_node::auth::FleetConfig::read(&config.data_dir)?;
            let clock = shoal_node::clock::FleetClock::stored(&config.data_dir);
            let usage: store::Usage = node_or_store(
                &config,
                |admin| admin.get(&format!("/_shoal/v1/du?grace_secs={}", grace.as_secs())),
                |store| async move {
                    let retention = store
                        .read(move |i| shoal_node::lifecycle::stored_retention(i, fleet.as_ref()))
                        .await?
                        .with_clock(clock);
                    store.usage(grace, &retention).await
                },
            )?;
            println!(
                "{:>14} {:>14} {:>14} {:>8}  repository",
                "bytes", "unique", "shared", "blobs"
            );
            for r in &usage.repos {
                println!(
                    "{:>14} {:>14} {:>14} {:>8}  {}",
                    r.bytes, r.unique_bytes, r.shared_bytes, r.blobs, r.repo
                );
            }
            println!(
                "{} bytes in {} blob files ({} in no repository); uploads {} bytes, downloads in progress {} bytes; reclaimable by gc: {} bytes",
                usage.bytes,
                usage.blobs,
                usage.unheld_bytes,
                usage.uploads_bytes,
                usage.partial_bytes,
                usage.reclaimable_bytes
            );
            if let Some(q) = &usage.quota {
                match q.max_disk_bytes {
                    Some(max) => println!("quota: {} of {max} bytes used", q.used_bytes),
                    None => println!("quota: none ({} bytes used)", q.used_bytes),
                }
                println!(
                    "published {} bytes, pinned {} bytes, cached {} bytes, unreferenced {} bytes; evicted since start: {} blobs, {} bytes",
                    q.published_bytes,
                    q.pinned_bytes,
                    q.cached_bytes,
                    q.unreferenced_bytes,
                    q.evicted_blobs,
                    q.evicted_bytes
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Pin {
            common,
            image,
            copies,
        } => {
            let config = resolve(common, FileConfig::default())?;
            let (repo, reference) = store::pins::parse_image(&image)?;
            if copies == 0 || copies > store::pins::MAX_COPIES {
                anyhow::bail!(store::pins::PinError::Copies);
            }
            let ask = admin::PinRequest {
                image: image.clone(),
                copies: Some(copies),
            };
            let pin = store::pins::Pin {
                repo,
                reference,
                copies,
            };
            let pinned: Option<store::pins::Pin> = node_or_store(
                &config,
                |admin| admin.post("/_shoal/v1/pins", &ask).map(Some),
                |store| async move { Ok(store.pin(pin.clone()).await?.then_some(pin)) },
            )?;
            match pinned {
                Some(p) => println!("pinned {p} ({} copies)", p.copies),
                None => anyhow::bail!("{image}: no such image on this node"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Unpin { common, image } => {
            let config = resolve(common, FileConfig::default())?;
            let (repo, reference) = store::pins::parse_image(&image)?;
            let ask = admin::PinRequest {
                image: image.clone(),
                copies: None,
            };
            let removed = node_or_store(
                &config,
                |admin| {
                    admin
                        .post::<_, serde_json::Value>("/_shoal/v1/unpin", &ask)
                        .map(|_| true)
                },
                |store| async move { store.unpin(repo, reference).await },
            )?;
            if !removed {
                anyhow::bail!("{image} is not pinned");
            }
            println!("unpinned {image}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Pins { common } => {
            let config = resolve(common, FileConfig::default())?;
            let rules = config.quota.pins.clone();
            let list: admin::PinList = node_or_store(
                &config,
                |admin| admin.get("/_shoal/v1/pins"),
                |store| async move {
                    Ok(admin::PinList {
                        pins: store.pins().await?,
                        rules,
                    })
                },
            )?;
            for p in &list.pins {
                println!("{p}  copies={}", p.copies);
            }
            for r in &list.rules {
                println!("{:?} (config rule)  copies={}", r.pattern, r.copies);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Lifecycle { common, command } => lifecycle(common, command),
        Command::Fsck { common, repair } => {
            let config = resolve(common, FileConfig::default())?;
            let report = match store::fsck(&config.data_dir, repair) {
                Ok(r) => r,
                Err(e) => {
                    // Not a verdict on the store: it could not be checked at all.
                    eprintln!(
                        "shoal fsck: could not check {} (is a node running on it?): {:#}",
                        config.data_dir.display(),
                        anyhow::Error::from(e)
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
        Command::Keys {
            common,
            command: KeysCommand::Admin,
        } => {
            let config = resolve(common, FileConfig::default())?;
            offline::admin_key(&config.data_dir)
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
                    return Ok(ExitCode::SUCCESS);
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
            reload(&config)
        }
        Command::Status { common, json } => {
            let status: admin::Status = admin_of(common)?.get("/_shoal/v1/status")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_status(&status);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Prefetch {
            common,
            images,
            nodes,
            sites,
            local,
            json,
        } => {
            let ask = admin::PrefetchRequest {
                images,
                nodes,
                sites,
                local,
            };
            prefetch(&admin_of(common)?, &ask, json)
        }
        Command::Peers { common } => {
            let answer: admin::Peers = admin_of(common)?.get("/_shoal/v1/peers")?;
            if answer.peers.is_empty() {
                println!("no peers connected");
            }
            for p in answer.peers {
                println!(
                    "{} connected over {}; known at {}",
                    p.peer_id,
                    p.connections.join(" "),
                    p.addresses.join(" ")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Fleet { common, command } => {
            let config = resolve(common, FileConfig::default())?;
            let client = AdminClient::new(&config.data_dir);
            match command {
                // With no node running, a fleet is founded on the data directory itself; the node
                // takes it when it starts.
                FleetCommand::Init { ticket, admins } if !client.exists() => {
                    offline::fleet_init(&config.data_dir, ticket.ttl, ticket.groups, &admins)
                }
                command => fleet(client, command),
            }
        }
        Command::Repo { common, command } => {
            let body = match command {
                RepoCommand::Set {
                    pattern,
                    private,
                    public: _,
                    immutable,
                    except,
                    publishers,
                } => PolicyBody::Repo {
                    pattern,
                    settings: Some(RepoSettings {
                        visibility: if private {
                            Visibility::Private
                        } else {
                            Visibility::Public
                        },
                        tags: if immutable {
                            TagMutability::Immutable(except)
                        } else {
                            TagMutability::Mutable
                        },
                        publishers,
                    }),
                },
                RepoCommand::Unset { pattern } => PolicyBody::Repo {
                    pattern,
                    settings: None,
                },
            };
            policy(admin_of(common)?, body)
        }
        Command::Grant { common, command } => {
            let body = match command {
                GrantCommand::Add {
                    name,
                    principal,
                    repos,
                    actions,
                    ttl,
                } => PolicyBody::Grant {
                    id: name,
                    grant: Some(Grant {
                        principal,
                        repos,
                        actions,
                        expires_ms: ttl.map(|t| {
                            now_ms()
                                .saturating_add(u64::try_from(t.as_millis()).unwrap_or(u64::MAX))
                        }),
                    }),
                },
                GrantCommand::Rm { name } => PolicyBody::Grant {
                    id: name,
                    grant: None,
                },
            };
            policy(admin_of(common)?, body)
        }
        Command::Revoke { common, what } => {
            let revoked = match what {
                RevokeCommand::Token { id } => Revoked::Token(id),
                RevokeCommand::Ticket { id } => Revoked::Ticket(id),
                RevokeCommand::Node { key } => Revoked::Node(key),
            };
            policy(admin_of(common)?, PolicyBody::Revoke(revoked))
        }
        Command::Token {
            common,
            command:
                TokenCommand::Create {
                    principal,
                    repo,
                    actions,
                    ttl,
                },
        } => {
            let config = resolve(common, FileConfig::default())?;
            let client = AdminClient::new(&config.data_dir);
            let request = admin::TokenRequest {
                principal,
                scopes: vec![(repo, actions)],
                ttl_secs: ttl.as_secs(),
            };
            // The admin key signs offline as well: a token needs no running node.
            let answer: admin::TokenAnswer = if client.exists() {
                client.post("/_shoal/v1/fleet/token", &request)?
            } else {
                offline::token(&config.data_dir, &request)?
            };
            eprintln!(
                "token {} (revoke with: shoal revoke token {})",
                answer.id, answer.id
            );
            println!("{}", answer.token);
            Ok(ExitCode::SUCCESS)
        }
        Command::User { common, command } => {
            let config = resolve(common, FileConfig::default())?;
            let users = Users::read(&config.data_dir)?;
            match command {
                UserCommand::Add {
                    name,
                    repos,
                    actions,
                } => {
                    let mut password = String::new();
                    std::io::stdin()
                        .read_line(&mut password)
                        .context("reading the password from standard input")?;
                    let password = password.trim_end_matches(['\n', '\r']);
                    anyhow::ensure!(!password.is_empty(), "the password is empty");
                    let hash = hash_password(password)
                        .map_err(|e| anyhow::anyhow!("hashing the password: {e}"))?;
                    users
                        .with(User {
                            name: name.clone(),
                            hash,
                            repos,
                            actions,
                        })
                        .write(&config.data_dir)?;
                    println!("user {name} saved");
                }
                UserCommand::Rm { name } => {
                    users.without(&name).write(&config.data_dir)?;
                    println!("user {name} removed");
                }
                UserCommand::List => {
                    for u in users.list() {
                        println!("{} {} {}", u.name, u.repos, u.actions);
                    }
                    return Ok(ExitCode::SUCCESS);
                }
            }
            reload(&config)
        }
        Command::Mirror { common, command } => mirror(common, command),
        Command::Audit { common, json, last } => {
            let config = resolve(common, FileConfig::default())?;
            let entries = audit::read(&config.data_dir).with_context(|| {
                format!("reading the audit trail in {}", config.data_dir.display())
            })?;
            let skip = last.map_or(0, |n| entries.len().saturating_sub(n));
            for e in entries.into_iter().skip(skip) {
                if json {
                    println!("{}", serde_json::to_string(&e)?);
                } else {
                    println!(
                        "{} {} {:?} {} {} {}{}",
                        e.time_ms,
                        e.principal,
                        e.action,
                        e.repository.as_deref().unwrap_or("-"),
                        e.reference.as_deref().unwrap_or("-"),
                        e.outcome,
                        e.client.map(|c| format!(" from {c}")).unwrap_or_default()
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Reads a lifecycle policy file, saying why it is not one.
fn read_policy(path: &std::path::Path) -> anyhow::Result<(String, LifecyclePolicy)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let policy = LifecyclePolicy::from_json(&text)
        .with_context(|| format!("{} is not a lifecycle policy", path.display()))?;
    Ok((text, policy))
}

fn lifecycle(common: Common, command: LifecycleCommand) -> anyhow::Result<ExitCode> {
    let (repo, policy) = match command {
        LifecycleCommand::Set { pattern, policy } => {
            let (text, _) = read_policy(&policy)?;
            let body = PolicyBody::Lifecycle {
                pattern,
                policy: Some(text),
            };
            return self::policy(admin_of(common)?, body);
        }
        LifecycleCommand::Unset { pattern } => {
            let body = PolicyBody::Lifecycle {
                pattern,
                policy: None,
            };
            return self::policy(admin_of(common)?, body);
        }
        LifecycleCommand::Show => {
            let entries: Vec<admin::LifecycleEntry> =
                admin_of(common)?.get("/_shoal/v1/lifecycle")?;
            if entries.is_empty() {
                println!("no retention policy is in force");
            }
            for e in entries {
                println!("{}: {}", e.pattern, serde_json::to_string(&e.policy)?);
            }
            return Ok(ExitCode::SUCCESS);
        }
        LifecycleCommand::Preview { repo, policy } => (
            repo,
            policy.map(|p| read_policy(&p)).transpose()?.map(|(_, p)| p),
        ),
    };
    let config = resolve(common, FileConfig::default())?;
    let fleet = shoal_node::auth::FleetConfig::read(&config.data_dir)?;
    let now_ms = shoal_node::clock::FleetClock::stored(&config.data_dir).now_ms();
    // `None`: no policy was given and none of the fleet's covers the repository.
    let expired: Option<Vec<shoal_node::lifecycle::Expired>> = node_or_store(
        &config,
        |admin| {
            let ask = admin::PreviewRequest {
                repo: repo.clone(),
                policy: policy.clone(),
            };
            admin.post("/_shoal/v1/lifecycle/preview", &ask).map(Some)
        },
        |store| {
            let (layout, r, policy) = (store.layout().clone(), repo.clone(), policy.clone());
            async move {
                store
                    .read(move |i| {
                        let policy = match policy {
                            Some(p) => p,
                            None => {
                                let retention =
                                    shoal_node::lifecycle::stored_retention(i, fleet.as_ref())?;
                                match retention.for_repo(&r) {
                                    Some((_, p)) => p.clone(),
                                    None => return Ok(None),
                                }
                            }
                        };
                        shoal_node::lifecycle::preview(i, &layout, &r, &policy, now_ms).map(Some)
                    })
                    .await
            }
        },
    )?;
    let Some(expired) = expired else {
        anyhow::bail!("no retention policy of the fleet covers {repo}; give one with --policy");
    };
    if expired.is_empty() {
        println!("the policy expires no image of {repo}");
    }
    for e in &expired {
        let tags = if e.tags.is_empty() {
            "untagged".to_owned()
        } else {
            e.tags.join(", ")
        };
        println!(
            "{} ({tags}): rule {}{}: {}",
            e.digest,
            e.rule,
            e.description
                .as_deref()
                .map(|d| format!(" ({d})"))
                .unwrap_or_default(),
            e.reason
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `shoal mirror`: prints (or writes) what containerd and docker need to pull through the node
/// the config describes.
fn mirror(common: Common, command: MirrorCommand) -> anyhow::Result<ExitCode> {
    use shoal_node::mirror::recipes::{self, NodeEndpoint};
    let target = match &command {
        MirrorCommand::Containerd { target, .. } | MirrorCommand::Docker { target, .. } => target,
    };
    let config = resolve(
        common,
        FileConfig {
            listen: target.listen,
            ..FileConfig::default()
        },
    )?;
    let node = match &target.node {
        Some(url) => NodeEndpoint::parse(url)?,
        None => NodeEndpoint::of(&config)?,
    };
    if config.access.local_clients == LocalClients::Authenticated {
        eprintln!(
            "note: the node asks loopback clients for credentials (local_clients = \"authenticated\"); \
             containerd and docker mirror requests carry none"
        );
    }
    match command {
        MirrorCommand::Containerd {
            print,
            dir,
            skip_verify,
            ..
        } => {
            anyhow::ensure!(
                print || dir.is_some(),
                "nothing to do: --print shows the files, --dir DIR writes them"
            );
            let mut node = node;
            node.skip_verify = skip_verify;
            let files = recipes::containerd_hosts(&config.mirror, &node)?;
            if config.mirror.upstreams.is_empty() {
                eprintln!("note: the node's config has no [[upstream]]; only _default is written");
            }
            let hosts_dir = match &dir {
                Some(d) => {
                    std::path::absolute(d).with_context(|| format!("resolving {}", d.display()))?
                }
                None => PathBuf::from(recipes::DEFAULT_HOSTS_DIR),
            };
            if let Some(d) = &dir {
                for path in recipes::write_hosts(d, &files)? {
                    eprintln!("wrote {}", path.display());
                }
            }
            if print {
                for f in &files {
                    println!("# {}/{}/hosts.toml", hosts_dir.display(), f.namespace);
                    println!("{}", f.text);
                }
                println!("{}", recipes::containerd_config(&hosts_dir));
            }
        }
        MirrorCommand::Docker { print, .. } => {
            anyhow::ensure!(print, "nothing to do: --print shows the daemon.json lines");
            println!("{}", recipes::docker_daemon_json(&node));
            for note in recipes::docker_notes(&config.mirror, &node) {
                eprintln!("note: {note}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Tells the running node (if any) to read its trust rules and users again.
fn reload(config: &Config) -> anyhow::Result<ExitCode> {
    let client = AdminClient::new(&config.data_dir);
    if !client.exists() {
        println!(
            "no node is running on {}; it reads the change when it starts",
            config.data_dir.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    client.post_empty("/_shoal/v1/reload")?;
    println!("the running node took the change");
    Ok(ExitCode::SUCCESS)
}

fn policy(client: AdminClient, body: PolicyBody) -> anyhow::Result<ExitCode> {
    let answer: serde_json::Value =
        client.post("/_shoal/v1/fleet/policy", &admin::PolicyRequest { body })?;
    println!(
        "policy {} signed and sent to the fleet",
        answer["key"].as_str().unwrap_or("?")
    );
    Ok(ExitCode::SUCCESS)
}

fn fleet(client: AdminClient, command: FleetCommand) -> anyhow::Result<ExitCode> {
    let ticket = |t: TicketArgs| admin::TicketRequest {
        ttl_secs: t.ttl.map(|d| d.as_secs()),
        groups: t.groups,
    };
    match command {
        FleetCommand::Init { ticket: t, admins } => {
            let request = admin::InitRequest {
                ticket: ticket(t),
                admins,
            };
            let answer: admin::JoinTokenAnswer = client.post("/_shoal/v1/fleet/init", &request)?;
            eprintln!("founded {}; this node holds its admin key", answer.fleet);
            eprintln!(
                "on every other node: shoal fleet join <token>   (or shoal node --join <token>)"
            );
            println!("{}", answer.token);
        }
        FleetCommand::Token { ticket: t } => {
            let answer: admin::JoinTokenAnswer =
                client.post("/_shoal/v1/fleet/ticket", &ticket(t))?;
            println!("{}", answer.token);
        }
        FleetCommand::Join { token } => {
            client.post_empty_json("/_shoal/v1/fleet/join", &admin::JoinRequest { token })?;
            println!("joined");
        }
        FleetCommand::Status => {
            let s: admin::FleetStatus = client.get("/_shoal/v1/fleet")?;
            match &s.fleet {
                None => println!("not in a fleet"),
                Some(id) => {
                    println!("fleet:    {id}");
                    println!("admins:   {}", s.admins.join(" "));
                    println!("member:   {}", s.member);
                    println!("admin key here: {}", s.holds_admin_key);
                    for p in &s.policies {
                        println!("policy:   {p}");
                    }
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `shoal prefetch`: streams the node's progress events; a bar per image on a terminal, plain
/// lines otherwise, a JSON summary with `--json`. Fails if any image (or any node asked) did.
fn prefetch(
    client: &AdminClient,
    ask: &admin::PrefetchRequest,
    json: bool,
) -> anyhow::Result<ExitCode> {
    use admin::{PrefetchEvent, RemoteAnswer};
    use std::io::{IsTerminal, Write};
    let tty = !json && std::io::stdout().is_terminal();
    let mut results = Vec::new();
    let mut failed = 0usize;
    let mut started = std::collections::HashSet::new();
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    client.post_streaming("/_shoal/v1/prefetch", ask, |event: PrefetchEvent| {
        match &event {
            PrefetchEvent::Progress { image, done, total } => {
                if tty {
                    let width = 30;
                    let filled = if *total == 0 {
                        width
                    } else {
                        (u128::from(*done) * width as u128 / u128::from(*total)) as usize
                    };
                    print!(
                        "\r{image} [{}{}] {:.1}/{:.1} MiB",
                        "#".repeat(filled.min(width)),
                        ".".repeat(width - filled.min(width)),
                        mib(*done),
                        mib(*total)
                    );
                    let _ = std::io::stdout().flush();
                } else if !json && started.insert(image.clone()) {
                    println!("{image}: fetching {total} bytes");
                }
            }
            PrefetchEvent::Done { image, bytes } => {
                if tty {
                    println!();
                }
                if !json {
                    println!("{image}: done ({bytes} bytes)");
                }
            }
            PrefetchEvent::Failed { image, error } => {
                failed += 1;
                if tty && started.contains(image) {
                    println!();
                }
                if !json {
                    println!("{image}: failed: {error}");
                }
            }
            PrefetchEvent::Remote {
                image,
                node,
                answer,
            } => {
                if *answer != RemoteAnswer::Queued {
                    failed += 1;
                }
                if !json {
                    let said = match answer {
                        RemoteAnswer::Queued => "queued it",
                        RemoteAnswer::Denied => "refused it (no read access, or it takes no asks)",
                        RemoteAnswer::Busy => "is busy (its queue is full); ask again later",
                        RemoteAnswer::Unreachable => "could not be asked (not connected?)",
                    };
                    println!("{image}: node {node} {said}");
                }
            }
        }
        if !matches!(event, PrefetchEvent::Progress { .. }) {
            results.push(event);
        }
    })?;
    if json {
        println!(
            "{}",
            serde_json::json!({ "results": results, "failed": failed })
        );
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
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
        "shoal ready: registry listening on {}://{}",
        node.registry_scheme(),
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
