//! Repository names, tags and references, with the OCI distribution-spec grammar.
//!
//! - A repository name is one or more `/`-separated components, each
//!   `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`, at most [`RepoName::MAX_LEN`] bytes in all. Every
//!   component starts with a letter or digit, so a name can never be `.`, `..` or absolute and is
//!   safe to use in paths and keys.
//! - A tag is `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
//! - A reference is a tag or a digest; a string with a `:` is a digest.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::digest::{Digest, DigestError};

/// Why a string is not a repository name, tag or reference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Not a repository name.
    #[error("invalid repository name")]
    InvalidName,
    /// Not a tag.
    #[error("invalid tag")]
    InvalidTag,
    /// Looked like a digest (it has a `:`) but is not one.
    #[error("invalid digest: {0}")]
    InvalidDigest(#[from] DigestError),
}

/// A validated repository name such as `team/app`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RepoName(String);

impl RepoName {
    /// Longest accepted name, in bytes (the limit CNCF Distribution and docker use).
    pub const MAX_LEN: usize = 255;

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `s` follows the grammar.
    pub fn is_valid(s: &str) -> bool {
        !s.is_empty() && s.len() <= Self::MAX_LEN && s.split('/').all(valid_component)
    }
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn valid_component(c: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = c.as_bytes();
    let mut i = 0;
    loop {
        // A run of one or more alphanumerics.
        let start = i;
        while i < bytes.len() && alnum(bytes[i]) {
            i += 1;
        }
        if i == start {
            return false;
        }
        if i == bytes.len() {
            return true;
        }
        // A separator: '.', '_', '__' or one or more '-'.
        match bytes[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if bytes.get(i) == Some(&b'_') {
                    i += 1;
                }
            }
            b'-' => {
                while bytes.get(i) == Some(&b'-') {
                    i += 1;
                }
            }
            _ => return false,
        }
    }
}

impl FromStr for RepoName {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if RepoName::is_valid(s) {
            Ok(RepoName(s.to_owned()))
        } else {
            Err(NameError::InvalidName)
        }
    }
}

impl TryFrom<String> for RepoName {
    type Error = NameError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        if RepoName::is_valid(&s) {
            Ok(RepoName(s))
        } else {
            Err(NameError::InvalidName)
        }
    }
}

impl From<RepoName> for String {
    fn from(n: RepoName) -> String {
        n.0
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RepoName({})", self.0)
    }
}

/// A validated tag such as `1.4` or `latest`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Tag(String);

impl Tag {
    /// Longest accepted tag, in bytes.
    pub const MAX_LEN: usize = 128;

    /// The tag as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `s` follows the grammar.
    pub fn is_valid(s: &str) -> bool {
        let bytes = s.as_bytes();
        let Some((&first, rest)) = bytes.split_first() else {
            return false;
        };
        let head = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
        let tail = |b: u8| head(b) || b == b'.' || b == b'-';
        bytes.len() <= Self::MAX_LEN && head(first) && rest.iter().all(|&b| tail(b))
    }
}

impl FromStr for Tag {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if Tag::is_valid(s) {
            Ok(Tag(s.to_owned()))
        } else {
            Err(NameError::InvalidTag)
        }
    }
}

impl TryFrom<String> for Tag {
    type Error = NameError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        if Tag::is_valid(&s) {
            Ok(Tag(s))
        } else {
            Err(NameError::InvalidTag)
        }
    }
}

impl From<Tag> for String {
    fn from(t: Tag) -> String {
        t.0
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tag({})", self.0)
    }
}

/// What a manifest URL names: a tag or a digest.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Reference {
    /// A mutable tag.
    Tag(Tag),
    /// An immutable digest.
    Digest(Digest),
}

impl FromStr for Reference {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.contains(':') {
            Ok(Reference::Digest(s.parse()?))
        } else {
            Ok(Reference::Tag(s.parse()?))
        }
    }
}

impl TryFrom<String> for Reference {
    type Error = NameError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Reference> for String {
    fn from(r: Reference) -> String {
        r.to_string()
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names() {
        for ok in [
            "a",
            "library/busybox",
            "team/app",
            "a.b_c__d---e/f0",
            "x/y/z/w",
            "0",
        ] {
            assert!(ok.parse::<RepoName>().is_ok(), "{ok:?} rejected");
        }
        for bad in [
            "", "/a", "a/", "a//b", "A", "..", "a/../b", "a/./b", ".a", "a.", "a___b", "a-",
            "a..b", "a b", "a\\b", "a%2fb",
        ] {
            assert!(bad.parse::<RepoName>().is_err(), "{bad:?} accepted");
        }
        assert!("a".repeat(255).parse::<RepoName>().is_ok());
        assert!("a".repeat(256).parse::<RepoName>().is_err());
    }

    #[test]
    fn tags() {
        for ok in ["latest", "1.4", "_x", "A-b.c_D", &"a".repeat(128)] {
            assert!(ok.parse::<Tag>().is_ok(), "{ok:?} rejected");
        }
        for bad in ["", ".a", "-a", "a:b", "a/b", &"a".repeat(129), "a b", "é"] {
            assert!(bad.parse::<Tag>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn references() {
        assert!(matches!("v1".parse(), Ok(Reference::Tag(_))));
        let d = Digest::sha256(b"x").to_string();
        assert!(matches!(d.parse(), Ok(Reference::Digest(_))));
        assert!("sha256:nothex".parse::<Reference>().is_err());
    }

    #[test]
    fn deserialize_validates() {
        assert!(serde_json::from_str::<RepoName>("\"../etc\"").is_err());
        assert!(serde_json::from_str::<Tag>("\"-x\"").is_err());
        assert!(serde_json::from_str::<RepoName>("\"team/app\"").is_ok());
    }

    proptest! {
        #[test]
        fn valid_names_round_trip(s in "[a-z0-9]{1,8}((\\.|_|__|-{1,3})[a-z0-9]{1,8}){0,3}(/[a-z0-9]{1,8}((\\.|_|__|-{1,3})[a-z0-9]{1,8}){0,3}){0,4}") {
            let n: RepoName = s.parse().unwrap();
            prop_assert_eq!(n.as_str(), s.as_str());
        }

        #[test]
        fn any_name_is_path_safe(s in "[a-z0-9./_-]{0,40}") {
            if let Ok(n) = s.parse::<RepoName>() {
                prop_assert!(n.as_str().split('/').all(|c| c != "." && c != ".." && !c.is_empty()));
            }
        }

        #[test]
        fn valid_tags_round_trip(s in "[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}") {
            let t: Tag = s.parse().unwrap();
            prop_assert_eq!(t.as_str(), s.as_str());
        }

        #[test]
        fn any_reference_parses_or_errs(s in "\\PC{0,150}") {
            if let Ok(r) = s.parse::<Reference>() {
                prop_assert_eq!(r.to_string(), s);
            }
        }
    }
}
