//! Which publisher keys are trusted for which repositories.
//!
//! A rule is `KEY=PATTERN`: `*` matches every repository, `team/*` every repository under
//! `team/` at any depth, anything else exactly one repository. The node's own key is trusted
//! for everything. Rules come from `--trust` flags, the config file, and `trust.toml` in the data
//! directory, which `shoal trust add/rm` edits.

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
    #[error("trust file {path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
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

/// The trust policy of a node.
#[derive(Debug, Clone)]
pub struct Trust {
    own: PublisherKey,
    rules: Vec<TrustRule>,
}

impl Trust {
    /// A policy trusting `own` for everything plus `rules`.
    pub fn new(own: PublisherKey, rules: Vec<TrustRule>) -> Trust {
        Trust { own, rules }
    }

    /// Whether records from `key` are accepted for `repo`.
    pub fn allows(&self, key: &PublisherKey, repo: &RepoName) -> bool {
        *key == self.own || self.rules.iter().any(|r| &r.key == key && r.matches(repo))
    }

    /// The configured rules (without the implicit own-key rule).
    pub fn rules(&self) -> &[TrustRule] {
        &self.rules
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
    let err = |message: String| TrustError::File {
        path: path.clone(),
        message,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(toml::from_str::<TrustFile>(&text)
            .map_err(|e| err(e.to_string()))?
            .trust),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(err(e.to_string())),
    }
}

/// Replaces the rules stored in the data directory (atomically).
pub fn write_file(data_dir: &Path, rules: &[TrustRule]) -> Result<(), TrustError> {
    let path = data_dir.join(TRUST_FILE);
    let err = |message: String| TrustError::File {
        path: path.clone(),
        message,
    };
    let text = toml::to_string(&TrustFile {
        trust: rules.to_vec(),
    })
    .map_err(|e| err(e.to_string()))?;
    std::fs::create_dir_all(data_dir).map_err(|e| err(e.to_string()))?;
    let tmp = data_dir.join(format!("{TRUST_FILE}.tmp"));
    std::fs::write(&tmp, text).map_err(|e| err(e.to_string()))?;
    std::fs::rename(&tmp, &path).map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_protocol::SigningKey;

    #[test]
    fn patterns() {
        let own = SigningKey::from_seed([1; 32]).public();
        let other = SigningKey::from_seed([2; 32]).public();
        let third = SigningKey::from_seed([3; 32]).public();
        let rule: TrustRule = format!("{other}=team/*").parse().unwrap();
        let trust = Trust::new(own, vec![rule.clone()]);
        let repo = |s: &str| s.parse::<RepoName>().unwrap();
        assert!(trust.allows(&own, &repo("x")));
        assert!(trust.allows(&other, &repo("team/app")));
        assert!(trust.allows(&other, &repo("team/a/b")));
        assert!(!trust.allows(&other, &repo("team")));
        assert!(!trust.allows(&other, &repo("teamx/app")));
        assert!(!trust.allows(&third, &repo("team/app")));
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
