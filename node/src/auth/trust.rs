//! Per-node trust rules: which publisher keys this node trusts for which repositories, besides
//! its own key and (in a fleet) the fleet's members ([`Auth::may_publish`](super::Auth::may_publish)
//! decides with them).
//!
//! A rule is `KEY=PATTERN`: `*` matches every repository, `team/*` every repository under
//! `team/` at any depth, anything else exactly one repository. Rules come from `--trust` flags,
//! the config file, and `trust.toml` in the data directory, which `shoal trust add/rm` edits; a
//! running node reloads that file when `shoal trust` tells it to.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use shoal_protocol::{PublisherKey, RepoName};

/// File in the data directory holding rules added with `shoal trust add`.
pub const TRUST_FILE: &str = "trust.toml";

/// One trust rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TrustRule {
    /// The publisher.
    pub key: PublisherKey,
    /// Which repositories.
    pub pattern: String,
}

/// Why a rule is not valid.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// Not `KEY=PATTERN`.
    #[error("trust rule {0:?} is not KEY=PATTERN (for example ed25519:ab..=team/*)")]
    Malformed(String),
    /// The pattern is not `*`, `prefix/*` or a repository name.
    #[error("trust pattern {0:?} is not '*', 'name/*' or a repository name")]
    Pattern(String),
    /// Reading or writing the trust file failed.
    #[error("trust file {path}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn valid_pattern(p: &str) -> bool {
    p == "*"
        || p.strip_suffix("/*")
            .map_or_else(|| RepoName::is_valid(p), RepoName::is_valid)
}

impl TrustRule {
    /// Whether the rule covers `repo`.
    pub fn matches(&self, repo: &RepoName) -> bool {
        let r = repo.as_str();
        match self.pattern.strip_suffix("/*") {
            _ if self.pattern == "*" => true,
            Some(prefix) => r
                .strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with('/')),
            None => r == self.pattern,
        }
    }
}

impl FromStr for TrustRule {
    type Err = TrustError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (key, pattern) = s
            .split_once('=')
            .ok_or_else(|| TrustError::Malformed(s.into()))?;
        let key = key
            .trim()
            .parse()
            .map_err(|_| TrustError::Malformed(s.into()))?;
        let pattern = pattern.trim();
        if !valid_pattern(pattern) {
            return Err(TrustError::Pattern(pattern.into()));
        }
        Ok(TrustRule {
            key,
            pattern: pattern.to_owned(),
        })
    }
}

impl TryFrom<String> for TrustRule {
    type Error = TrustError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<TrustRule> for String {
    fn from(r: TrustRule) -> String {
        r.to_string()
    }
}

impl std::fmt::Display for TrustRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}={}", self.key, self.pattern)
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct TrustFile {
    #[serde(default)]
    trust: Vec<TrustRule>,
}

/// Rules stored in the data directory.
pub fn read_file(data_dir: &Path) -> Result<Vec<TrustRule>, TrustError> {
    let path = data_dir.join(TRUST_FILE);
    let err = |e: Box<dyn std::error::Error + Send + Sync>| TrustError::File {
        path: path.clone(),
        source: e,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(toml::from_str::<TrustFile>(&text)
            .map_err(|e| err(e.into()))?
            .trust),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(err(e.into())),
    }
}

/// Replaces the rules stored in the data directory (atomically).
pub fn write_file(data_dir: &Path, rules: &[TrustRule]) -> Result<(), TrustError> {
    let path = data_dir.join(TRUST_FILE);
    let err = |e: Box<dyn std::error::Error + Send + Sync>| TrustError::File {
        path: path.clone(),
        source: e,
    };
    let text = toml::to_string(&TrustFile {
        trust: rules.to_vec(),
    })
    .map_err(|e| err(e.into()))?;
    std::fs::create_dir_all(data_dir).map_err(|e| err(e.into()))?;
    let tmp = data_dir.join(format!("{TRUST_FILE}.tmp"));
    std::fs::write(&tmp, text).map_err(|e| err(e.into()))?;
    std::fs::rename(&tmp, &path).map_err(|e| err(e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_protocol::SigningKey;

    #[test]
    fn patterns() {
        let other = SigningKey::from_seed([2; 32]).public();
        let third = SigningKey::from_seed([3; 32]).public();
        let rule: TrustRule = format!("{other}=team/*").parse().unwrap();
        let repo = |s: &str| s.parse::<RepoName>().unwrap();
        assert!(rule.matches(&repo("team/app")));
        assert!(rule.matches(&repo("team/a/b")));
        assert!(!rule.matches(&repo("team")));
        assert!(!rule.matches(&repo("teamx/app")));
        assert_eq!(rule.to_string().parse::<TrustRule>().unwrap(), rule);
        assert!(format!("{other}=Bad/*").parse::<TrustRule>().is_err());
        assert!("nokey=*".parse::<TrustRule>().is_err());
        let star: TrustRule = format!("{third}=*").parse().unwrap();
        assert!(star.matches(&repo("any/thing")));
    }

    #[test]
    fn file_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::from_seed([2; 32]).public();
        let rules = vec![format!("{key}=team/*").parse().unwrap()];
        write_file(dir.path(), &rules).unwrap();
        assert_eq!(read_file(dir.path()).unwrap(), rules);
    }
}
