//! The node's identity: one ed25519 key, kept in `node.key` in the data directory (mode 0600),
//! created on first start. The same key is the libp2p peer identity and the publisher key that
//! signs tag records, so a peer id and a publisher are the same thing in logs and trust lists.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use shoal_protocol::{PublisherKey, SigningKey};

/// File name of the key inside the data directory.
pub const KEY_FILE: &str = "node.key";

/// Why the key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Reading or writing the key file failed.
    #[error("key file {path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The key file does not hold a key.
    #[error("key file {0} is not a 32-byte ed25519 seed")]
    Malformed(std::path::PathBuf),
}

/// Writes a secret (a key's seed) to `path` atomically, readable by its owner only (mode
/// 0600), and makes it durable. Blocking.
pub fn write_secret(path: &Path, secret: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| std::io::Error::other("a secret's path has no directory"))?;
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("a secret's path has no file name"))?;
    let tmp = dir.join(format!("{}.tmp", name.to_string_lossy()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(secret).and_then(|()| f.sync_all())?;
    std::fs::rename(&tmp, path)?;
    crate::store::sync_dir(dir)
}

/// Reads a 32-byte secret (a key's seed) written by [`write_secret`]; `None` if there is none.
/// Blocking.
pub fn read_secret(path: &Path) -> std::io::Result<Option<[u8; 32]>> {
    match std::fs::read(path) {
        Ok(bytes) => bytes.as_slice().try_into().map(Some).map_err(|_| {
            std::io::Error::other(format!("{} is not a 32-byte seed", path.display()))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// A node's key.
#[derive(Clone)]
pub struct Identity {
    seed: [u8; 32],
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({})", self.publisher())
    }
}

impl Identity {
    /// Loads the key from `data_dir`, creating it (mode 0600) if there is none. Blocking.
    pub fn load_or_create(data_dir: &Path) -> Result<Identity, IdentityError> {
        let path = data_dir.join(KEY_FILE);
        let io = |source| IdentityError::Io {
            path: path.clone(),
            source,
        };
        match std::fs::read(&path) {
            Ok(bytes) => {
                let seed: [u8; 32] = bytes
                    .as_slice()
                    .try_into()
                    .map_err(|_| IdentityError::Malformed(path.clone()))?;
                Ok(Identity { seed })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(data_dir).map_err(io)?;
                let seed: [u8; 32] = rand::random();
                write_secret(&path, &seed).map_err(io)?;
                Ok(Identity { seed })
            }
            Err(e) => Err(io(e)),
        }
    }

    /// An identity from a seed (tests).
    pub fn from_seed(seed: [u8; 32]) -> Identity {
        Identity { seed }
    }

    /// The key that signs tag records.
    pub fn signing_key(&self) -> SigningKey {
        SigningKey::from_seed(self.seed)
    }

    /// The public half of [`Identity::signing_key`].
    pub fn publisher(&self) -> PublisherKey {
        self.signing_key().public()
    }

    /// The libp2p keypair.
    pub fn keypair(&self) -> libp2p::identity::Keypair {
        let mut seed = self.seed;
        // A 32-byte seed is always a valid ed25519 secret key.
        match libp2p::identity::Keypair::ed25519_from_bytes(&mut seed) {
            Ok(k) => k,
            Err(_) => unreachable_keypair(),
        }
    }

    /// The libp2p peer id.
    pub fn peer_id(&self) -> libp2p::PeerId {
        self.keypair().public().to_peer_id()
    }
}

#[cold]
fn unreachable_keypair() -> libp2p::identity::Keypair {
    // ed25519_from_bytes only fails on a wrong length, and the seed is 32 bytes by type.
    libp2p::identity::Keypair::generate_ed25519()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn created_once_with_private_mode() {
        let dir = tempfile::tempdir().unwrap();
        let a = Identity::load_or_create(dir.path()).unwrap();
        let b = Identity::load_or_create(dir.path()).unwrap();
        assert_eq!(a.publisher(), b.publisher());
        assert_eq!(a.peer_id(), b.peer_id());
        let mode = std::fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(dir.path().join(KEY_FILE), b"short").unwrap();
        assert!(Identity::load_or_create(dir.path()).is_err());
    }
}
