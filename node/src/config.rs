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
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use libp2p::Multiaddr;
use serde::Deserialize;

use crate::net::NetConfig;
use crate::trust::TrustRule;

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
    /// Cap on bytes per second sent to peers.
    pub upload_limit_bytes_per_sec: Option<u64>,
    /// This node's site label (see [`NetConfig::site`]).
    pub site: Option<String>,
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
    /// The site label is empty, longer than 64 bytes or contains white space.
    #[error("site {0:?}: a site is 1 to 64 bytes without white space")]
    Site(String),
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
            upload_limit_bytes_per_sec: flags
                .upload_limit_bytes_per_sec
                .or(file.upload_limit_bytes_per_sec),
            site: flags.site.or(file.site),
            sync_interval: defaults.sync_interval,
        };
        if let Some(site) = &net.site {
            if site.is_empty() || site.len() > 64 || site.contains(char::is_whitespace) {
                return Err(ConfigError::Site(site.clone()));
            }
        }
        // Trust rules add up: the config file's and the command line's.
        let mut trust = file.trust.unwrap_or_default();
        trust.extend(flags.trust.unwrap_or_default());
        Ok(Config {
            data_dir,
            listen,
            net,
            trust,
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
        let site: FileConfig = toml::from_str("site = \"dc-1\"").unwrap();
        let c = Config::resolve(FileConfig::default(), site).unwrap();
        assert_eq!(c.net.site.as_deref(), Some("dc-1"));
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
