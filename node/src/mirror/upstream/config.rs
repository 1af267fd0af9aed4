//! The `[[upstream]]` table: one upstream registry, its credentials and its TLS settings.
//!
//! Everything here is checked once, in [`UpstreamConfig::validate`], so that a running
//! [`Upstream`](super::Upstream) never meets a combination it has to guess about (two kinds of
//! credentials, a certificate check skipped on a plain-HTTP URL, a password in a URL). Secrets
//! are held in [`Secret`], whose `Debug` prints `***`, so a config printed in a log or a panic
//! never shows them; no error message here quotes a URL or a credential.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// Seconds a tag resolved from an upstream is trusted without asking it again, by default.
pub const DEFAULT_FRESHNESS_SECS: u64 = 300;
/// Milliseconds allowed for connecting and for the response headers, by default.
pub const DEFAULT_TIMEOUT_MS: u64 = 3_000;
/// The largest `timeout_ms` accepted: an upstream slower than this is treated as down anyway.
pub const MAX_TIMEOUT_MS: u64 = 120_000;
/// The largest credential or CA file read (a token, a password, a PEM bundle).
pub(crate) const MAX_CREDENTIAL_FILE_BYTES: u64 = 1024 * 1024;

/// A credential: a password or a bearer token. Its `Debug` prints `***` and it has no
/// `Display`, so it reaches a log line or an error message only through [`Secret::expose`].
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a credential.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The credential itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// One `[[upstream]]` table of the node's config.
///
/// ```toml
/// [[upstream]]
/// name = "docker.io"
/// url = "https://registry-1.docker.io"
/// docker_config = "/root/.docker/config.json"
/// freshness_secs = 300
/// ```
///
/// Credentials are at most one of: `username` with `password` or `password_file`;
/// `token_file` (a bearer token sent as is); `docker_config` (a docker `config.json`, whose
/// `auths`, `credHelpers` or `credsStore` entry for `name` is used). Files are read when the
/// [`Upstream`](super::Upstream) is built, except the docker config, which is read (and its
/// credential helper run) when a registry first asks for credentials, and again every few
/// minutes, so that rotated helper tokens are picked up.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// The registry host as clients name it: `docker.io`, `ghcr.io`,
    /// `registry.example.com:5000`.
    pub name: String,
    /// Where its API is: `https://registry-1.docker.io`, or `http://127.0.0.1:5001` (with
    /// `insecure = true`).
    pub url: String,
    /// User name for Basic auth or the token service.
    #[serde(default)]
    pub username: Option<String>,
    /// Password for `username`.
    #[serde(default)]
    pub password: Option<Secret>,
    /// File holding the password for `username` (surrounding whitespace is trimmed); read
    /// again whenever it changes, so a rotated password needs no restart.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// File holding a bearer token, sent as `Authorization: Bearer` on every request; read
    /// again whenever it changes (a rotated token).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// A docker `config.json` to take the credentials for `name` from.
    #[serde(default)]
    pub docker_config: Option<PathBuf>,
    /// Extra PEM root certificates, trusted besides the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Must be `true` for an `http://` URL: the operator says plain HTTP is meant. Not
    /// allowed with `https://` (it does not skip certificate checks; `tls_skip_verify` does).
    #[serde(default)]
    pub insecure: bool,
    /// Accept any server certificate on an `https://` URL. Only for a test registry.
    #[serde(default)]
    pub tls_skip_verify: bool,
    /// How long a tag resolved from this upstream is trusted without asking it again.
    #[serde(default = "default_freshness_secs")]
    pub freshness_secs: u64,
    /// The bound on connecting and on waiting for response headers, so that an unreachable
    /// upstream fails fast. Body reads have their own stall timeout.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_freshness_secs() -> u64 {
    DEFAULT_FRESHNESS_SECS
}

fn default_timeout_ms() -> u64 {
    DEFAULT_TIMEOUT_MS
}

impl UpstreamConfig {
    /// A config for `name` at `url` with no credentials and the defaults.
    pub fn new(name: impl Into<String>, url: impl Into<String>) -> Self {
        UpstreamConfig {
            name: name.into(),
            url: url.into(),
            username: None,
            password: None,
            password_file: None,
            token_file: None,
            docker_config: None,
            ca_file: None,
            insecure: false,
            tls_skip_verify: false,
            freshness_secs: DEFAULT_FRESHNESS_SECS,
            timeout_ms: DEFAULT_TIMEOUT_MS,
        }
    }

    /// How long a tag resolved from this upstream is trusted.
    pub fn freshness(&self) -> Duration {
        Duration::from_secs(self.freshness_secs)
    }

    /// The connect and response-header bound.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// Checks the table and returns the parsed URL.
    pub fn validate(&self) -> Result<url::Url, ConfigError> {
        if !is_registry_host(&self.name) {
            return Err(ConfigError::Name {
                name: self.name.chars().take(64).collect(),
            });
        }
        let rule = |reason: &'static str| ConfigError::Rule {
            name: self.name.clone(),
            reason,
        };
        // The URL is not quoted in any error: it may hold a password (`https://u:p@host`).
        let url = url::Url::parse(&self.url).map_err(|source| ConfigError::Url {
            name: self.name.clone(),
            source,
        })?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err(rule(
                "url must not hold credentials; use username and password",
            ));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(rule("url must not have a query or a fragment"));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(rule("url has no host"));
        }
        match url.scheme() {
            "https" => {
                if self.insecure {
                    return Err(rule(
                        "insecure = true is for http:// urls; to skip certificate checks on https set tls_skip_verify = true",
                    ));
                }
            }
            "http" => {
                if !self.insecure {
                    return Err(rule("an http:// url needs insecure = true"));
                }
                if self.tls_skip_verify {
                    return Err(rule("tls_skip_verify applies to https:// urls only"));
                }
            }
            _ => return Err(rule("url scheme must be https or http")),
        }
        if self.timeout_ms == 0 || self.timeout_ms > MAX_TIMEOUT_MS {
            return Err(rule("timeout_ms must be between 1 and 120000"));
        }
        if self.freshness_secs > u64::from(u32::MAX) {
            return Err(rule("freshness_secs is too large"));
        }
        let kinds = [
            self.username.is_some() || self.password.is_some() || self.password_file.is_some(),
            self.token_file.is_some(),
            self.docker_config.is_some(),
        ];
        if kinds.iter().filter(|k| **k).count() > 1 {
            return Err(rule(
                "give one kind of credentials: username with password or password_file, token_file, or docker_config",
            ));
        }
        match (&self.username, &self.password, &self.password_file) {
            (None, None, None) | (Some(_), Some(_), None) | (Some(_), None, Some(_)) => {}
            (None, _, _) => return Err(rule("password or password_file needs a username")),
            (Some(_), None, None) => return Err(rule("username needs password or password_file")),
            (Some(_), Some(_), Some(_)) => {
                return Err(rule("give password or password_file, not both"));
            }
        }
        let bad_user =
            |u: &String| u.is_empty() || u.contains(':') || u.chars().any(char::is_control);
        if self.username.as_ref().is_some_and(bad_user) {
            return Err(rule(
                "username must be non-empty, without ':' or control characters",
            ));
        }
        Ok(url)
    }
}

/// Whether `s` is a registry host as image references spell it: a DNS name or IPv4 address,
/// lowercase, with an optional `:port`.
pub(crate) fn is_registry_host(s: &str) -> bool {
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    };
    let good_port = |p: &str| {
        !p.is_empty()
            && p.bytes().all(|b| b.is_ascii_digit())
            && p.parse::<u16>().is_ok_and(|p| p != 0)
    };
    if !port.is_none_or(good_port) {
        return false;
    }
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

/// Why an `[[upstream]]` table cannot be used. No variant quotes a URL or a credential.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `name` is not a registry host.
    #[error("upstream name {name:?} is not a registry host (host or host:port, lowercase)")]
    Name {
        /// The name, cut to 64 characters.
        name: String,
    },
    /// `url` does not parse.
    #[error("upstream {name}: url is not a valid URL")]
    Url {
        /// The upstream's name.
        name: String,
        /// Why it does not parse.
        #[source]
        source: url::ParseError,
    },
    /// A rule about combining settings is broken.
    #[error("upstream {name}: {reason}")]
    Rule {
        /// The upstream's name.
        name: String,
        /// Which rule.
        reason: &'static str,
    },
    /// A credential or certificate file cannot be read.
    #[error("upstream {name}: cannot read {}", path.display())]
    File {
        /// The upstream's name.
        name: String,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A credential file is empty or larger than 1 MiB.
    #[error("upstream {name}: {} is empty or too large", path.display())]
    FileSize {
        /// The upstream's name.
        name: String,
        /// The file.
        path: PathBuf,
    },
    /// `ca_file` holds no usable PEM certificate.
    #[error("upstream {name}: {} holds no PEM certificate", path.display())]
    CaFile {
        /// The upstream's name.
        name: String,
        /// The file.
        path: PathBuf,
        /// The parser's complaint, if any.
        #[source]
        source: Option<reqwest::Error>,
    },
    /// The HTTP client cannot be built (TLS set-up).
    #[error("upstream {name}: cannot build the HTTP client")]
    Client {
        /// The upstream's name.
        name: String,
        /// Why.
        #[source]
        source: reqwest::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<UpstreamConfig, toml::de::Error> {
        toml::from_str(toml_text)
    }

    #[test]
    fn registry_hosts() {
        for good in [
            "docker.io",
            "ghcr.io",
            "registry.example.com:5000",
            "127.0.0.1:5001",
            "localhost",
        ] {
            assert!(is_registry_host(good), "{good}");
        }
        for bad in [
            "",
            "Docker.io",
            "https://docker.io",
            "docker.io/library",
            "host:",
            "host:0",
            "host:70000",
            "-a.io",
            "a..io",
            "host:50a",
            "a b",
            "user@host",
        ] {
            assert!(!is_registry_host(bad), "{bad}");
        }
    }

    #[test]
    fn defaults_and_unknown_fields() {
        let c = parse("name = \"docker.io\"\nurl = \"https://registry-1.docker.io\"\n").unwrap();
        assert_eq!(c.freshness_secs, 300);
        assert_eq!(c.timeout_ms, 3000);
        c.validate().unwrap();
        assert!(parse("name = \"a.io\"\nurl = \"https://a.io\"\npasword = \"x\"\n").is_err());
    }

    #[test]
    fn rules() {
        let base = UpstreamConfig::new("a.io", "https://a.io");
        let check = |f: &dyn Fn(&mut UpstreamConfig)| {
            let mut c = base.clone();
            f(&mut c);
            c.validate()
        };
        assert!(check(&|_| {}).is_ok());
        assert!(
            check(&|c| c.url = "http://a.io".into()).is_err(),
            "http needs insecure"
        );
        assert!(
            check(&|c| {
                c.url = "http://a.io".into();
                c.insecure = true;
            })
            .is_ok()
        );
        assert!(check(&|c| c.insecure = true).is_err(), "insecure on https");
        assert!(check(&|c| c.tls_skip_verify = true).is_ok());
        assert!(
            check(&|c| {
                c.url = "http://a.io".into();
                c.insecure = true;
                c.tls_skip_verify = true;
            })
            .is_err()
        );
        assert!(check(&|c| c.url = "ftp://a.io".into()).is_err());
        assert!(check(&|c| c.url = "https://a.io/?x=1".into()).is_err());
        assert!(check(&|c| c.username = Some("u".into())).is_err());
        assert!(check(&|c| c.password = Some(Secret::new("p"))).is_err());
        assert!(
            check(&|c| {
                c.username = Some("u".into());
                c.password = Some(Secret::new("p"));
            })
            .is_ok()
        );
        assert!(
            check(&|c| {
                c.username = Some("u".into());
                c.password = Some(Secret::new("p"));
                c.token_file = Some("/t".into());
            })
            .is_err()
        );
        assert!(
            check(&|c| {
                c.token_file = Some("/t".into());
                c.docker_config = Some("/d".into());
            })
            .is_err()
        );
        assert!(check(&|c| c.timeout_ms = 0).is_err());
        assert!(check(&|c| c.name = "A.io".into()).is_err());
    }

    /// A password written into the URL must not come back in the error that rejects it.
    #[test]
    fn url_with_password_is_refused_without_quoting_it() {
        let mut c = UpstreamConfig::new("a.io", "https://user:hunter2-in-url@a.io");
        let e = c.validate().unwrap_err();
        assert!(!format!("{e} {e:?}").contains("hunter2"), "{e:?}");
        c.url = "https://user:hunter2-in-url@a.io:99999".into();
        let e = c.validate().unwrap_err();
        assert!(!format!("{e} {e:?}").contains("hunter2"), "{e:?}");
    }

    #[test]
    fn secret_debug_is_masked() {
        let mut c = UpstreamConfig::new("a.io", "https://a.io");
        c.username = Some("bob".into());
        c.password = Some(Secret::new("hunter2"));
        let shown = format!("{c:?} {c:#?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("***"));
    }
}
