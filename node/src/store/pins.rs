//! Pins: images this node is asked to keep, and how many copies the fleet should keep of them.
//!
//! A pin names an image by `REPO:TAG` or `REPO@DIGEST` and a number of copies K. Pinned
//! content is never evicted by the disk quota while, as far as the node can see, fewer than K
//! copies would remain in the fleet (see `crate::quota`), and a pin by digest is a root of
//! garbage collection (a pin by tag names what the tag's record names, which is a root anyway).
//!
//! Pins made with `shoal pin` are kept in `pins.v1.json` in the data directory: a small JSON
//! file written whole to a temporary file, fsynced and renamed into place, so a crash leaves the
//! old list or the new one. It is the only copy (the index holds no pins), so nothing needs
//! rebuilding.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use shoal_protocol::{Digest, Reference, RepoName};

use super::{Store, StoreError};

/// The file that holds the pins, in the data directory.
pub const PINS_FILE: &str = "pins.v1.json";
/// The most pins a node keeps (the file is read whole, at every eviction round and collection).
pub const MAX_PINS: usize = 4096;
/// The most copies a pin may ask for.
pub const MAX_COPIES: u32 = 64;

/// One pin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    /// The repository.
    pub repo: RepoName,
    /// The tag or digest pinned.
    pub reference: Reference,
    /// Copies the fleet should keep (this node's included), at least 1.
    pub copies: u32,
}

impl std::fmt::Display for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.reference {
            Reference::Tag(t) => write!(f, "{}:{t}", self.repo),
            Reference::Digest(d) => write!(f, "{}@{d}", self.repo),
        }
    }
}

/// Why a pin is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PinError {
    /// The text is not `REPO:TAG` or `REPO@DIGEST`.
    #[error("{0:?} is not REPO:TAG or REPO@DIGEST")]
    Malformed(String),
    /// The copies are 0 or more than [`MAX_COPIES`].
    #[error("copies must be 1 to {MAX_COPIES}")]
    Copies,
}

/// Parses `REPO:TAG` or `REPO@DIGEST` (a repository name holds `/` and may hold `:` only in a
/// registry host, which Shoal's names never carry).
pub fn parse_image(text: &str) -> Result<(RepoName, Reference), PinError> {
    let bad = || PinError::Malformed(text.chars().take(300).collect());
    let (repo, reference) = match text.split_once('@') {
        Some((repo, digest)) => (repo, digest),
        None => text.rsplit_once(':').ok_or_else(bad)?,
    };
    let repo: RepoName = repo.parse().map_err(|_| bad())?;
    let reference: Reference = reference.parse().map_err(|_| bad())?;
    if text.contains('@') && !matches!(reference, Reference::Digest(_)) {
        return Err(bad());
    }
    Ok((repo, reference))
}

/// The file's contents.
#[derive(Debug, Default, Serialize, Deserialize)]
struct PinsFile {
    pins: Vec<Pin>,
}

/// Reads the pins in the data directory `root` (none if there is no file). Blocking.
pub fn read(root: &Path) -> Result<Vec<Pin>, StoreError> {
    let path = root.join(PINS_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let file: PinsFile = serde_json::from_slice(&bytes).map_err(StoreError::decode("pins"))?;
    Ok(file.pins)
}

fn write(root: &Path, pins: &[Pin]) -> Result<(), StoreError> {
    let bytes = serde_json::to_vec_pretty(&PinsFile {
        pins: pins.to_vec(),
    })
    .map_err(StoreError::encode("pins"))?;
    let tmp: PathBuf = root.join("tmp").join(format!("{PINS_FILE}.new"));
    {
        let mut f = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut f, &bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, root.join(PINS_FILE))?;
    super::sync_dir(root)?;
    Ok(())
}

/// The GC roots the pins add: each pinned digest, and the manifest each pinned tag names now.
pub(super) fn roots(
    root: &Path,
    index: &super::Index,
) -> Result<Vec<(RepoName, Digest)>, StoreError> {
    let mut roots = Vec::new();
    for pin in read(root)? {
        match &pin.reference {
            Reference::Digest(d) => roots.push((pin.repo, d.clone())),
            Reference::Tag(t) => {
                if let Some(d) = index.tag(&pin.repo, t)? {
                    roots.push((pin.repo, d));
                }
            }
        }
    }
    Ok(roots)
}

/// Serializes changes to the pins file.
#[derive(Debug, Default)]
pub(super) struct PinsLock(tokio::sync::Mutex<()>);

impl Store {
    /// The pins made with `shoal pin`.
    pub async fn pins(&self) -> Result<Vec<Pin>, StoreError> {
        let root = self.inner.layout.root().to_owned();
        tokio::task::spawn_blocking(move || read(&root)).await?
    }

    /// Pins `pin.repo` at `pin.reference` (replacing a pin of the same image); the image must
    /// be known here (its tag has a record, or the manifest is stored). Returns `false` if it
    /// is not.
    pub async fn pin(&self, pin: Pin) -> Result<bool, StoreError> {
        let _one = self.inner.pins.0.lock().await;
        let (root, index, gate) = (
            self.inner.layout.root().to_owned(),
            self.inner.index.clone(),
            self.inner.gate.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let known = match &pin.reference {
                Reference::Tag(t) => index.tag(&pin.repo, t)?.is_some(),
                Reference::Digest(d) => index.manifest(&pin.repo, d)?.is_some(),
            };
            if !known {
                return Ok(false);
            }
            let mut pins = read(&root)?;
            pins.retain(|p| !(p.repo == pin.repo && p.reference == pin.reference));
            if pins.len() >= MAX_PINS {
                return Err(StoreError::Busy("this node holds as many pins as it may"));
            }
            pins.push(pin);
            let _open = gate.enter()?;
            write(&root, &pins)?;
            Ok(true)
        })
        .await?
    }

    /// Removes the pin of `repo` at `reference`; `false` if there was none.
    pub async fn unpin(&self, repo: RepoName, reference: Reference) -> Result<bool, StoreError> {
        let _one = self.inner.pins.0.lock().await;
        let (root, gate) = (self.inner.layout.root().to_owned(), self.inner.gate.clone());
        tokio::task::spawn_blocking(move || {
            let mut pins = read(&root)?;
            let before = pins.len();
            pins.retain(|p| !(p.repo == repo && p.reference == reference));
            if pins.len() == before {
                return Ok(false);
            }
            let _open = gate.enter()?;
            write(&root, &pins)?;
            Ok(true)
        })
        .await?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_parse_by_tag_or_digest_and_malformed_ones_are_refused() {
        let (repo, r) = parse_image("prod/app:1").unwrap();
        assert_eq!(repo.as_str(), "prod/app");
        assert_eq!(r.to_string(), "1");
        let d = format!("sha256:{}", "a".repeat(64));
        let (_, r) = parse_image(&format!("prod/app@{d}")).unwrap();
        assert!(matches!(r, Reference::Digest(_)));
        for bad in [
            "",
            "prod/app",
            "Prod/App:1",
            "prod/app:",
            ":1",
            "prod/app@1",
            "prod/app@sha256:zz",
            "../x:1",
            "prod/app:bad tag",
        ] {
            assert!(parse_image(bad).is_err(), "{bad:?}");
        }
        let long = "a".repeat(100_000);
        assert!(matches!(parse_image(&long), Err(PinError::Malformed(m)) if m.len() <= 300));
    }

    #[tokio::test]
    async fn pins_are_kept_in_their_file_and_an_unknown_image_is_not_pinned() {
        let dir = tempfile::tempdir().unwrap();
        let store = tokio::task::spawn_blocking({
            let p = dir.path().to_owned();
            move || Store::open(&p)
        })
        .await
        .unwrap()
        .unwrap();
        let (repo, reference) = parse_image("prod/app:1").unwrap();
        let pin = Pin {
            repo: repo.clone(),
            reference: reference.clone(),
            copies: 2,
        };
        assert!(!store.pin(pin.clone()).await.unwrap(), "no such tag here");
        assert!(store.pins().await.unwrap().is_empty());
        // A stored manifest can be pinned by digest.
        let bytes = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;
        let digest = Digest::of(shoal_protocol::Algorithm::Sha256, bytes);
        let mut w = store
            .blob_writer(digest.algorithm(), Some(bytes.len() as u64))
            .await
            .unwrap();
        w.write(bytes).await.unwrap();
        w.finish(&digest).await.unwrap();
        let info = crate::manifest::parse(bytes, None).unwrap();
        store.add_manifest(&repo, &digest, info).await.unwrap();
        let by_digest = Pin {
            repo: repo.clone(),
            reference: Reference::Digest(digest.clone()),
            copies: 3,
        };
        assert!(store.pin(by_digest.clone()).await.unwrap());
        // The file is the pin's only copy.
        assert_eq!(read(dir.path()).unwrap(), vec![by_digest.clone()]);
        assert_eq!(store.pins().await.unwrap(), vec![by_digest.clone()]);
        assert!(
            store
                .unpin(repo.clone(), Reference::Digest(digest))
                .await
                .unwrap()
        );
        assert!(!store.unpin(repo, reference).await.unwrap());
        assert!(store.pins().await.unwrap().is_empty());
    }
}
