//! Node settings: embedded defaults, overridden by a TOML config file, overridden by `SHOAL_*`
//! environment variables and command-line flags (clap reads both).
//!
//! ```toml
//! # ~/.config/shoal/config.toml
//! data_dir = "/var/lib/shoal"
//! listen = "127.0.0.1:5000"
//! p2p_listen = ["/ip4/0.0.0.0/udp/4001/quic-v1", "/ip4/0.0.0.0/tcp/4001"]
//! peers = ["/ip4/198.18.1.2/udp/4001/quic-v1"]
//! mdns = true
//! trust = ["ed25519:3b6a27bc…=team/*"]
//! subscribe = ["prod/*"]        # prefetch every new tag of these repositories
//! subscribe_rate = "50MiB/s"    # at most this, on average (also for peers' prefetch asks)
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use libp2p::Multiaddr;
use serde::Deserialize;

use crate::auth::LocalClients;
use crate::auth::trust::TrustRule;
use crate::net::NetConfig;

/// Where the registry API listens unless told otherwise: the port docker users expect.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:5000";

/// A node's resolved settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The data directory (blobs, journal, index, uploads).
    pub data_dir: PathBuf,
    /// Address of the registry HTTP API.
    pub listen: SocketAddr,
    /// Peer-to-peer settings.
    pub net: NetConfig,
    /// Publishers trusted for repositories, besides this node.
    pub trust: Vec<TrustRule>,
    /// How long each stage of a shutdown may take (requests in flight, fetches, the swarm).
    pub shutdown_grace: std::time::Duration,
    /// Who may use the node, and how clients reach it.
    pub access: AccessConfig,
    /// What HTTP clients may hold: connections, requests, time, upload sessions.
    pub http: HttpLimits,
    /// Garbage collection on a schedule.
    pub gc: GcSchedule,
    /// The disk quota and the pin rules (`max_disk`, `[[pin]]`).
    pub quota: crate::quota::QuotaConfig,
    /// Preheat: subscriptions and the rate limit of prefetching (`subscribe`, `subscribe_rate`).
    pub prefetch: crate::prefetch::PrefetchConfig,
    /// The upstream registries this node mirrors.
    pub mirror: MirrorConfig,
}

/// The registries a node mirrors (`[[upstream]]` and `default_upstream`). Their credentials
/// stay in this node's configuration: never gossiped, logged or sent to a peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MirrorConfig {
    /// The upstreams, in the configuration's order.
    pub upstreams: Vec<crate::mirror::upstream::UpstreamConfig>,
    /// The upstream of pulls that name none.
    pub default: Option<String>,
}

impl MirrorConfig {
    /// The routes these upstreams make (checked when the settings are resolved).
    pub fn routes(
        &self,
    ) -> Result<crate::mirror::route::Routes, crate::mirror::route::RoutesError> {
        crate::mirror::route::Routes::new(
            self.upstreams.iter().map(|u| u.name.as_str()),
            self.default.as_deref(),
        )
    }
}

/// When the node collects garbage by itself (the config file's `[gc]` table); off unless an
/// interval is set. `shoal gc` runs one collection at any time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcSchedule {
    /// Time between collections; `None`: only when asked.
    pub interval: Option<std::time::Duration>,
    /// Blobs and manifests younger than this are kept.
    pub grace: std::time::Duration,
    /// A partial download that nothing has continued for this long, and that no download in
    /// progress holds, is removed by the next collection.
    pub abandoned_downloads: std::time::Duration,
}

impl GcSchedule {
    /// A collection keeping what is younger than `grace`, as this schedule removes abandoned
    /// downloads.
    pub fn options(&self, grace: std::time::Duration, dry_run: bool) -> crate::store::GcOptions {
        crate::store::GcOptions {
            grace,
            dry_run,
            abandoned_after: self.abandoned_downloads,
        }
    }
}

impl Default for GcSchedule {
    fn default() -> Self {
        GcSchedule {
            interval: None,
            grace: std::time::Duration::from_secs(3600),
            abandoned_downloads: crate::store::gc::ABANDONED_DOWNLOAD_TTL,
        }
    }
}

/// The config file's `[gc]` table (see [`GcSchedule`]).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GcFileConfig {
    /// See [`GcSchedule::interval`], in seconds.
    pub interval_secs: Option<u64>,
    /// See [`GcSchedule::grace`], in seconds.
    pub grace_secs: Option<u64>,
    /// See [`GcSchedule::abandoned_downloads`], in seconds.
    pub abandoned_download_secs: Option<u64>,
}

impl GcFileConfig {
    /// The schedule these keys set. An interval of zero is refused.
    pub fn resolve(&self) -> Result<GcSchedule, ConfigError> {
        let d = GcSchedule::default();
        Ok(GcSchedule {
            interval: match self.interval_secs {
                Some(0) => return Err(ConfigError::Gc("interval_secs")),
                Some(s) => Some(std::time::Duration::from_secs(s)),
                None => d.interval,
            },
            grace: self
                .grace_secs
                .map_or(d.grace, std::time::Duration::from_secs),
            // Zero is refused as for the interval: it is a typo more often than a wish.
            abandoned_downloads: match self.abandoned_download_secs {
                Some(0) => return Err(ConfigError::Gc("abandoned_download_secs")),
                Some(s) => std::time::Duration::from_secs(s),
                None => d.abandoned_downloads,
            },
        })
    }
}

/// Limits on what HTTP clients of the registry may hold, so that no client (careless or
/// hostile) can take the node's connections, file descriptors, memory or disk from the others.
/// The config file's `[http]` table sets them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpLimits {
    /// Open connections in all; past it a new connection is answered `503` and closed. The node
    /// lowers it to fit its file descriptor limit.
    pub max_connections: usize,
    /// Open connections from one client address.
    pub max_connections_per_client: usize,
    /// Requests handled at once; a request past it waits a moment, then gets `503`.
    pub max_requests: usize,
    /// How long a client may take to send a request's headers once it started sending them.
    pub header_read_timeout: std::time::Duration,
    /// How long a request body may stall (no bytes at all) before the request is cut off.
    pub body_read_timeout: std::time::Duration,
    /// How long a client may read nothing of what the node sends (a response it does not
    /// drain) before the connection is cut off.
    pub send_timeout: std::time::Duration,
    /// How long a connection may stay open without a request in flight (before its first
    /// request, or between keep-alive requests).
    pub idle_timeout: std::time::Duration,
    /// An upload session untouched for this long is abandoned: it is removed and answers
    /// `404 BLOB_UPLOAD_UNKNOWN`.
    pub upload_session_ttl: std::time::Duration,
    /// The most bytes one upload session may hold.
    pub max_upload_session_bytes: u64,
    /// The most upload sessions open at once.
    pub max_upload_sessions: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        use std::time::Duration;
        HttpLimits {
            max_connections: 4096,
            max_connections_per_client: 256,
            max_requests: 1024,
            header_read_timeout: Duration::from_secs(20),
            body_read_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(30),
            upload_session_ttl: Duration::from_secs(24 * 3600),
            max_upload_session_bytes: 64 << 30,
            max_upload_sessions: 1024,
        }
    }
}

/// The config file's `[http]` table (see [`HttpLimits`]); every key is optional.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpFileConfig {
    /// See [`HttpLimits::max_connections`].
    pub max_connections: Option<usize>,
    /// See [`HttpLimits::max_connections_per_client`].
    pub max_connections_per_client: Option<usize>,
    /// See [`HttpLimits::max_requests`].
    pub max_requests: Option<usize>,
    /// See [`HttpLimits::header_read_timeout`], in seconds.
    pub header_read_timeout_secs: Option<u64>,
    /// See [`HttpLimits::body_read_timeout`], in seconds.
    pub body_read_timeout_secs: Option<u64>,
    /// See [`HttpLimits::send_timeout`], in seconds.
    pub send_timeout_secs: Option<u64>,
    /// See [`HttpLimits::idle_timeout`], in seconds.
    pub idle_timeout_secs: Option<u64>,
    /// See [`HttpLimits::upload_session_ttl`], in seconds.
    pub upload_session_ttl_secs: Option<u64>,
    /// See [`HttpLimits::max_upload_session_bytes`].
    pub max_upload_session_bytes: Option<u64>,
    /// See [`HttpLimits::max_upload_sessions`].
    pub max_upload_sessions: Option<usize>,
}

impl HttpFileConfig {
    /// The limits these keys set, the defaults for the others. A zero is refused.
    pub fn resolve(&self) -> Result<HttpLimits, ConfigError> {
        use std::time::Duration;
        let d = HttpLimits::default();
        let count = |v: Option<usize>, default: usize, key: &'static str| match v {
            Some(0) => Err(ConfigError::Http(key)),
            Some(v) => Ok(v),
            None => Ok(default),
        };
        let secs = |v: Option<u64>, default: Duration, key: &'static str| match v {
            Some(0) => Err(ConfigError::Http(key)),
            Some(v) => Ok(Duration::from_secs(v)),
            None => Ok(default),
        };
        Ok(HttpLimits {
            max_connections: count(self.max_connections, d.max_connections, "max_connections")?,
            max_connections_per_client: count(
                self.max_connections_per_client,
                d.max_connections_per_client,
                "max_connections_per_client",
            )?,
            max_requests: count(self.max_requests, d.max_requests, "max_requests")?,
            header_read_timeout: secs(
                self.header_read_timeout_secs,
                d.header_read_timeout,
                "header_read_timeout_secs",
            )?,
            body_read_timeout: secs(
                self.body_read_timeout_secs,
                d.body_read_timeout,
                "body_read_timeout_secs",
            )?,
            send_timeout: secs(self.send_timeout_secs, d.send_timeout, "send_timeout_secs")?,
            idle_timeout: secs(self.idle_timeout_secs, d.idle_timeout, "idle_timeout_secs")?,
            upload_session_ttl: secs(
                self.upload_session_ttl_secs,
                d.upload_session_ttl,
                "upload_session_ttl_secs",
            )?,
            max_upload_session_bytes: match self.max_upload_session_bytes {
                Some(0) => return Err(ConfigError::Http("max_upload_session_bytes")),
                Some(v) => v,
                None => d.max_upload_session_bytes,
            },
            max_upload_sessions: count(
                self.max_upload_sessions,
                d.max_upload_sessions,
                "max_upload_sessions",
            )?,
        })
    }
}

/// Access settings: the fleet to join, how clients are treated, HTTPS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessConfig {
    /// A join token (`shoal fleet init` prints one): the node joins that fleet at start and
    /// remembers it in its data directory.
    pub join: Option<String>,
    /// Admin keys this node takes besides its fleet's (`admins`, `--admin`): whose policies,
    /// access tokens and join tickets count here too. A local trust decision, like a trust rule:
    /// other members refuse what these keys sign unless they list them as well.
    pub admins: Vec<shoal_protocol::PublisherKey>,
    /// How loopback clients are treated.
    pub local_clients: LocalClients,
    /// Whether clients without credentials may pull public repositories.
    pub anonymous_pull: bool,
    /// Certificate and key (PEM files) for HTTPS on the registry port.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Allows a non-loopback registry address without HTTPS or credentials.
    pub insecure: bool,
}

/// The config file's contents; every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// See [`Config::data_dir`].
    pub data_dir: Option<PathBuf>,
    /// See [`Config::listen`].
    pub listen: Option<SocketAddr>,
    /// Peer-to-peer listen addresses.
    pub p2p_listen: Option<Vec<Multiaddr>>,
    /// Bootstrap peers.
    pub peers: Option<Vec<Multiaddr>>,
    /// Whether mDNS finds LAN peers.
    pub mdns: Option<bool>,
    /// Trust rules, `KEY=PATTERN`.
    pub trust: Option<Vec<TrustRule>>,
    /// Cap on bytes per second served to peers (`upload_limit_bytes_per_sec`, its older name,
    /// is still read).
    #[serde(alias = "upload_limit_bytes_per_sec")]
    pub serve_limit_bytes_per_sec: Option<u64>,
    /// This node's site label (see [`NetConfig::site`]).
    pub site: Option<String>,
    /// A join token (see [`AccessConfig::join`]).
    pub join: Option<String>,
    /// Admin keys besides the fleet's (see [`AccessConfig::admins`]).
    pub admins: Option<Vec<shoal_protocol::PublisherKey>>,
    /// How loopback clients are treated: `open` (default) or `authenticated`.
    pub local_clients: Option<LocalClients>,
    /// Whether anonymous clients may pull public repositories.
    pub anonymous_pull: Option<bool>,
    /// PEM certificate chain for HTTPS.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for HTTPS.
    pub tls_key: Option<PathBuf>,
    /// Allow a non-loopback listener without HTTPS and credentials.
    pub insecure: Option<bool>,
    /// The `[http]` table: limits on HTTP clients (see [`HttpLimits`]).
    pub http: Option<HttpFileConfig>,
    /// The `[gc]` table: garbage collection on a schedule (see [`GcSchedule`]).
    pub gc: Option<GcFileConfig>,
    /// The disk quota: bytes (`"20GiB"`) or a share of the filesystem (`"80%"`).
    pub max_disk: Option<crate::quota::MaxDisk>,
    /// `[[pin]]` tables: `pattern = "prod/*"`, `copies = 2` (see [`crate::quota`]).
    pub pin: Option<Vec<crate::store::evict::PinRule>>,
    /// Repositories (`prod/*` or exact names) whose new tags are prefetched as their records
    /// arrive (see [`crate::prefetch`]).
    pub subscribe: Option<Vec<shoal_protocol::fleet::RepoPattern>>,
    /// The most bytes per second prefetching fetches on average: a number, or `"50MiB/s"`.
    pub subscribe_rate: Option<crate::prefetch::Rate>,
    /// `[[upstream]]` tables: the registries this node mirrors (see [`crate::mirror`]).
    pub upstream: Option<Vec<crate::mirror::upstream::UpstreamConfig>>,
    /// The upstream of pulls that name none (docker's `registry-mirrors`): one of the
    /// `[[upstream]]` names, usually `docker.io`.
    pub default_upstream: Option<String>,
}

/// Why settings could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("reading config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The config file is not valid.
    #[error("parsing config file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: toml::de::Error,
    },
    /// No data directory could be chosen.
    #[error("no data directory: pass --data-dir or set SHOAL_DATA_DIR")]
    NoDataDir,
    /// The `[[upstream]]` tables or `default_upstream` are not valid.
    #[error("mirror settings")]
    Mirror(#[source] crate::mirror::route::RoutesError),
    /// The site label is empty, longer than 64 bytes or contains white space.
    #[error("site {0:?}: a site is 1 to 64 bytes without white space")]
    Site(String),
    /// Only one of the TLS certificate and key was given.
    #[error("HTTPS needs both --tls-cert and --tls-key")]
    Tls,
    /// A limit in the `[http]` table is zero.
    #[error("http.{0} must be more than zero")]
    Http(&'static str),
    /// A setting in the `[gc]` table is zero.
    #[error("gc.{0} must be more than zero")]
    Gc(&'static str),
    /// A `[[pin]]` asks for no copies or too many.
    #[error("pin {0}: copies must be 1 to {max}", max = crate::store::pins::MAX_COPIES)]
    PinCopies(String),
}

/// The default config file, `$XDG_CONFIG_HOME/shoal/config.toml`.
pub fn default_config_path() -> Option<PathBuf> {
    dirs::config_dir().map(|d| d.join("shoal").join("config.toml"))
}

/// The default data directory, `$XDG_DATA_HOME/shoal`.
pub fn default_data_dir() -> Option<PathBuf> {
    dirs::data_dir().map(|d| d.join("shoal"))
}

/// Reads a config file. A missing file is an error only when it was named explicitly.
pub fn read_file(path: &Path, explicit: bool) -> Result<FileConfig, ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.into(),
            source,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
            Ok(FileConfig::default())
        }
        Err(source) => Err(ConfigError::Read {
            path: path.into(),
            source,
        }),
    }
}

impl Config {
    /// Resolves settings: `flags` (command line or environment) over `file` over defaults.
    pub fn resolve(flags: FileConfig, file: FileConfig) -> Result<Config, ConfigError> {
        let data_dir = flags
            .data_dir
            .or(file.data_dir)
            .or_else(default_data_dir)
            .ok_or(ConfigError::NoDataDir)?;
        let listen = flags.listen.or(file.listen).unwrap_or_else(default_listen);
        let defaults = NetConfig::default();
        let net = NetConfig {
            listen: flags
                .p2p_listen
                .or(file.p2p_listen)
                .unwrap_or(defaults.listen),
            bootstrap: flags.peers.or(file.peers).unwrap_or_default(),
            mdns: flags.mdns.or(file.mdns).unwrap_or(defaults.mdns),
            serve_limit_bytes_per_sec: flags
                .serve_limit_bytes_per_sec
                .or(file.serve_limit_bytes_per_sec),
            site: flags.site.or(file.site),
            sync_interval: defaults.sync_interval,
            redial_backoff: defaults.redial_backoff,
        };
        if let Some(site) = &net.site {
            if site.is_empty() || site.len() > 64 || site.contains(char::is_whitespace) {
                return Err(ConfigError::Site(site.clone()));
            }
        }
        // Trust rules add up: the config file's and the command line's.
        let mut trust = file.trust.unwrap_or_default();
        trust.extend(flags.trust.unwrap_or_default());
        let tls = match (
            flags.tls_cert.or(file.tls_cert),
            flags.tls_key.or(file.tls_key),
        ) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => return Err(ConfigError::Tls),
        };
        // Admin keys add up too.
        let mut admins = file.admins.unwrap_or_default();
        for key in flags.admins.unwrap_or_default() {
            if !admins.contains(&key) {
                admins.push(key);
            }
        }
        let access = AccessConfig {
            join: flags.join.or(file.join),
            admins,
            local_clients: flags
                .local_clients
                .or(file.local_clients)
                .unwrap_or_default(),
            anonymous_pull: flags
                .anonymous_pull
                .or(file.anonymous_pull)
                .unwrap_or(false),
            tls,
            insecure: flags.insecure.or(file.insecure).unwrap_or(false),
        };
        let http = flags.http.or(file.http).unwrap_or_default().resolve()?;
        let gc = flags.gc.or(file.gc).unwrap_or_default().resolve()?;
        // Pin rules add up, like trust rules.
        let mut pins = file.pin.unwrap_or_default();
        pins.extend(flags.pin.unwrap_or_default());
        if let Some(bad) = pins
            .iter()
            .find(|p| p.copies == 0 || p.copies > crate::store::pins::MAX_COPIES)
        {
            return Err(ConfigError::PinCopies(format!("{:?}", bad.pattern)));
        }
        let quota = crate::quota::QuotaConfig {
            max_disk: flags.max_disk.or(file.max_disk),
            pins,
            ..Default::default()
        };
        // Subscriptions add up, like trust rules.
        let mut subscribe = file.subscribe.unwrap_or_default();
        subscribe.extend(flags.subscribe.unwrap_or_default());
        let prefetch = crate::prefetch::PrefetchConfig {
            subscribe,
            rate: flags
                .subscribe_rate
                .or(file.subscribe_rate)
                .unwrap_or(crate::prefetch::PrefetchConfig::default().rate),
        };
        let mirror = MirrorConfig {
            upstreams: flags.upstream.or(file.upstream).unwrap_or_default(),
            default: flags.default_upstream.or(file.default_upstream),
        };
        mirror.routes().map_err(ConfigError::Mirror)?;
        Ok(Config {
            data_dir,
            listen,
            net,
            trust,
            shutdown_grace: crate::node::SHUTDOWN_GRACE,
            access,
            http,
            gc,
            quota,
            prefetch,
            mirror,
        })
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 5000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precedence() {
        let file: FileConfig =
            toml::from_str("data_dir = \"/f\"\nlisten = \"127.0.0.1:7000\"").unwrap();
        let flags = FileConfig {
            data_dir: Some("/c".into()),
            mdns: Some(false),
            ..Default::default()
        };
        let c = Config::resolve(flags, file).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/c"));
        assert_eq!(c.listen, "127.0.0.1:7000".parse().unwrap());
        assert!(!c.net.mdns);
        assert_eq!(c.net.listen, NetConfig::default().listen);
        assert_eq!(
            DEFAULT_LISTEN.parse::<SocketAddr>().unwrap(),
            default_listen()
        );
        assert!(toml::from_str::<FileConfig>("bogus = 1").is_err());
        let key = shoal_protocol::SigningKey::from_seed([3; 32]).public();
        let other = shoal_protocol::SigningKey::from_seed([4; 32]).public();
        let admins: FileConfig = toml::from_str(&format!("admins = [\"{key}\"]")).unwrap();
        let flags = FileConfig {
            admins: Some(vec![other, key]),
            ..Default::default()
        };
        let c = Config::resolve(flags, admins).unwrap();
        assert_eq!(c.access.admins, vec![key, other]);
        assert!(toml::from_str::<FileConfig>("admins = [\"ed25519:00\"]").is_err());
        let site: FileConfig = toml::from_str("site = \"dc-1\"").unwrap();
        let c = Config::resolve(FileConfig::default(), site).unwrap();
        assert_eq!(c.net.site.as_deref(), Some("dc-1"));
        let http: FileConfig =
            toml::from_str("[http]\nmax_connections = 10\nidle_timeout_secs = 5").unwrap();
        let c = Config::resolve(FileConfig::default(), http).unwrap();
        assert_eq!(c.http.max_connections, 10);
        assert_eq!(c.http.idle_timeout, std::time::Duration::from_secs(5));
        assert_eq!(c.http.max_requests, HttpLimits::default().max_requests);
        assert!(toml::from_str::<FileConfig>("[http]\nbogus = 1").is_err());
        let gc: FileConfig = toml::from_str("[gc]\ninterval_secs = 86400").unwrap();
        let c = Config::resolve(FileConfig::default(), gc).unwrap();
        assert_eq!(c.gc.interval, Some(std::time::Duration::from_secs(86400)));
        assert_eq!(c.gc.grace, GcSchedule::default().grace);
        let c = Config::resolve(FileConfig::default(), FileConfig::default()).unwrap();
        assert_eq!(c.gc.interval, None, "no collection unless asked for");
        let day: FileConfig = toml::from_str("[gc]\nabandoned_download_secs = 600").unwrap();
        let c = Config::resolve(FileConfig::default(), day).unwrap();
        assert_eq!(
            c.gc.abandoned_downloads,
            std::time::Duration::from_secs(600)
        );
        let none: FileConfig = toml::from_str("[gc]\nabandoned_download_secs = 0").unwrap();
        assert!(Config::resolve(FileConfig::default(), none).is_err());
        let zero: FileConfig = toml::from_str("[gc]\ninterval_secs = 0").unwrap();
        assert!(Config::resolve(FileConfig::default(), zero).is_err());
        let zero: FileConfig = toml::from_str("[http]\nmax_requests = 0").unwrap();
        assert!(Config::resolve(FileConfig::default(), zero).is_err());
        let quota: FileConfig = toml::from_str(
            "max_disk = \"80%\"\n[[pin]]\npattern = \"prod/*\"\ncopies = 2\n[[pin]]\npattern = \"ops/db\"\ncopies = 3",
        )
        .unwrap();
        let c = Config::resolve(FileConfig::default(), quota).unwrap();
        assert_eq!(c.quota.max_disk, Some(crate::quota::MaxDisk::Percent(80)));
        assert_eq!(c.quota.pins.len(), 2);
        assert_eq!(c.quota.pins[1].copies, 3);
        for bad in [
            "max_disk = \"0\"",
            "max_disk = \"120%\"",
            "max_disk = \"lots\"",
            "[[pin]]\npattern = \"Bad Pattern\"\ncopies = 2",
            "[[pin]]\npattern = \"prod/*\"\ncopies = -1",
        ] {
            assert!(toml::from_str::<FileConfig>(bad).is_err(), "{bad}");
        }
        for bad in [
            "[[pin]]\npattern = \"prod/*\"\ncopies = 0",
            "[[pin]]\npattern = \"prod/*\"\ncopies = 1000",
        ] {
            let file: FileConfig = toml::from_str(bad).unwrap();
            assert!(
                Config::resolve(FileConfig::default(), file).is_err(),
                "{bad}"
            );
        }
        let sub: FileConfig =
            toml::from_str("subscribe = [\"prod/*\", \"team/app\"]\nsubscribe_rate = \"2MiB/s\"")
                .unwrap();
        let c = Config::resolve(FileConfig::default(), sub).unwrap();
        assert_eq!(c.prefetch.subscribe.len(), 2);
        assert!(c.prefetch.subscribe[0].matches(&"prod/web".parse().unwrap()));
        assert_eq!(c.prefetch.rate.bytes_per_sec(), 2 << 20);
        let c = Config::resolve(FileConfig::default(), FileConfig::default()).unwrap();
        assert!(
            c.prefetch.subscribe.is_empty(),
            "no subscriptions unless asked for"
        );
        assert_eq!(
            c.prefetch.rate.bytes_per_sec(),
            crate::prefetch::DEFAULT_RATE_BYTES_PER_SEC
        );
        for bad in [
            "subscribe = [\"Bad Pattern\"]",
            "subscribe_rate = 0",
            "subscribe_rate = \"50%\"",
            "subscribe_rate = \"fast\"",
        ] {
            assert!(toml::from_str::<FileConfig>(bad).is_err(), "{bad}");
        }
        for bad in ["", "two words", &"x".repeat(65)] {
            let flags = FileConfig {
                data_dir: Some("/c".into()),
                site: Some(bad.to_owned()),
                ..Default::default()
            };
            assert!(
                Config::resolve(flags, FileConfig::default()).is_err(),
                "{bad:?}"
            );
        }
    }
}
