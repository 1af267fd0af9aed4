//! Content digests in the OCI `algorithm:hex` form.
//!
//! Shoal accepts the two algorithms the OCI image spec registers, `sha256` (64 lowercase hex
//! digits) and `sha512` (128). Anything else is rejected on parse and on deserialize, so a
//! [`Digest`] that exists names exactly one file name under the blob directory and can never
//! contain a path separator or `..`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::Digest as _;

/// A hash algorithm Shoal accepts in a digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Algorithm {
    /// SHA-256, the canonical algorithm of the OCI specs.
    Sha256,
    /// SHA-512.
    Sha512,
}

impl Algorithm {
    /// The algorithm's name as written before the colon.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    /// Number of hex digits in an encoded digest of this algorithm.
    pub fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        match name {
            "sha256" => Some(Algorithm::Sha256),
            "sha512" => Some(Algorithm::Sha512),
            _ => None,
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a string is not a [`Digest`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    /// No `:` between algorithm and encoded part.
    #[error("digest has no ':' separator")]
    MissingSeparator,
    /// The algorithm is syntactically valid but not one Shoal implements.
    #[error("unsupported digest algorithm {0:?}")]
    UnsupportedAlgorithm(String),
    /// The encoded part is not lowercase hex of the algorithm's length.
    #[error("digest encoding is not {expected} lowercase hex digits")]
    BadEncoding {
        /// The number of hex digits the algorithm needs.
        expected: usize,
    },
}

/// A validated content digest such as `sha256:e3b0c442…`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest {
    algorithm: Algorithm,
    hex: String,
}

impl Digest {
    /// The digest's algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The lowercase hex encoding, without the algorithm prefix.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// Digest of `bytes` with `algorithm`.
    pub fn of(algorithm: Algorithm, bytes: &[u8]) -> Digest {
        let mut hasher = DigestHasher::new(algorithm);
        hasher.update(bytes);
        hasher.finish()
    }

    /// SHA-256 digest of `bytes`.
    pub fn sha256(bytes: &[u8]) -> Digest {
        Digest::of(Algorithm::Sha256, bytes)
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (alg, enc) = s.split_once(':').ok_or(DigestError::MissingSeparator)?;
        let algorithm = Algorithm::from_name(alg).ok_or_else(|| {
            // Keep the reported name short: it is echoed into logs and error bodies.
            DigestError::UnsupportedAlgorithm(alg.chars().take(32).collect())
        })?;
        let expected = algorithm.hex_len();
        let lower_hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
        if enc.len() != expected || !enc.bytes().all(lower_hex) {
            return Err(DigestError::BadEncoding { expected });
        }
        Ok(Digest {
            algorithm,
            hex: enc.to_owned(),
        })
    }
}

impl TryFrom<String> for Digest {
    type Error = DigestError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.to_string()
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm, self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

/// Incremental hasher that produces a [`Digest`] of a chosen algorithm.
#[derive(Clone)]
pub enum DigestHasher {
    /// SHA-256 state.
    Sha256(sha2::Sha256),
    /// SHA-512 state.
    Sha512(sha2::Sha512),
}

impl DigestHasher {
    /// A fresh hasher for `algorithm`.
    pub fn new(algorithm: Algorithm) -> Self {
        match algorithm {
            Algorithm::Sha256 => DigestHasher::Sha256(sha2::Sha256::new()),
            Algorithm::Sha512 => DigestHasher::Sha512(sha2::Sha512::new()),
        }
    }

    /// Feeds more bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            DigestHasher::Sha256(h) => h.update(bytes),
            DigestHasher::Sha512(h) => h.update(bytes),
        }
    }

    /// The digest of everything fed so far.
    pub fn finish(self) -> Digest {
        match self {
            DigestHasher::Sha256(h) => Digest {
                algorithm: Algorithm::Sha256,
                hex: hex::encode(h.finalize()),
            },
            DigestHasher::Sha512(h) => Digest {
                algorithm: Algorithm::Sha512,
                hex: hex::encode(h.finalize()),
            },
        }
    }
}

impl fmt::Debug for DigestHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DigestHasher::Sha256(_) => f.write_str("DigestHasher(sha256)"),
            DigestHasher::Sha512(_) => f.write_str("DigestHasher(sha512)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn empty_sha256() {
        assert_eq!(Digest::sha256(b"").to_string(), EMPTY);
        assert_eq!(EMPTY.parse::<Digest>().unwrap(), Digest::sha256(b""));
    }

    #[test]
    fn sha512_round_trip() {
        let d = Digest::of(Algorithm::Sha512, b"abc");
        assert_eq!(d.hex().len(), 128);
        assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
    }

    #[test]
    fn rejects_bad_forms() {
        for bad in [
            "",
            "sha256",
            "sha256:",
            "md5:d41d8cd98f00b204e9800998ecf8427e",
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            "sha256:../../../../etc/passwd",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b8555",
            ":e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn deserialize_validates() {
        let ok: Digest = serde_json::from_str(&format!("\"{EMPTY}\"")).unwrap();
        assert_eq!(ok.to_string(), EMPTY);
        assert!(serde_json::from_str::<Digest>("\"sha256:zz\"").is_err());
    }

    proptest! {
        #[test]
        fn any_string_parses_or_errs(s in ".{0,200}") {
            if let Ok(d) = s.parse::<Digest>() {
                prop_assert_eq!(d.to_string(), s);
            }
        }

        #[test]
        fn valid_digests_round_trip(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            for alg in [Algorithm::Sha256, Algorithm::Sha512] {
                let d = Digest::of(alg, &bytes);
                prop_assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
            }
        }

        #[test]
        fn parsed_digest_is_path_safe(s in "sha(256|512):[0-9a-f./]{60,130}") {
            if let Ok(d) = s.parse::<Digest>() {
                prop_assert!(d.hex().bytes().all(|b| b.is_ascii_hexdigit()));
            }
        }
    }
}
