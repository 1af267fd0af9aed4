//! Resumable upload sessions (the registry's `POST`, `PATCH` and `PUT` on `blobs/uploads/`).
//!
//! A session is a directory `uploads/<id>/` holding `repo` (the repository it belongs to),
//! `data` (the bytes received so far) and `offset` (how many of them were acknowledged, 8 bytes
//! big-endian). Every acknowledged chunk is fsynced, then its new offset, before the `202`, so a
//! session survives a restart at the offset its client was last told, whatever part of a chunk
//! in flight reached `data`; the index's `uploads.v1` tree is rebuilt from the directories at
//! start-up. A session without an `offset` file (made by an older version) resumes at the
//! length of `data`. The running SHA-256 is kept in memory only; after a restart, an interrupted chunk or
//! a digest of another algorithm, the file is hashed once more when the upload finishes.
//!
//! A chunk that fails or is cancelled part-way leaves the session at its previous offset: the
//! file is truncated back to the last acknowledged length before the next chunk is appended.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use shoal_protocol::{Algorithm, Digest, DigestHasher, RepoName};

use super::gate::Gate;
use super::sink::{Hashing, Sink};
use super::{Index, Layout, Store, StoreError, sync_dir};

/// What the index keeps about an upload session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadMeta {
    /// The repository the session belongs to.
    pub repo: RepoName,
    /// When it was started, seconds since the Unix epoch.
    pub created_unix: u64,
}

/// What [`Store::expire_upload_sessions`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UploadExpiry {
    /// Sessions removed, idle for the time given or longer.
    pub removed: usize,
    /// Sessions left open.
    pub open: usize,
}

/// One upload session, locked while a chunk is being received.
#[derive(Debug)]
pub struct Upload {
    id: String,
    repo: RepoName,
    dir: PathBuf,
    offset: u64,
    /// SHA-256 and chunk hashes of the first `offset` bytes, while they are known.
    hasher: Option<Hashing>,
    /// Set once the upload finished or was cancelled; later holders see an unknown upload.
    closed: bool,
    /// When a chunk was last received (or the session made, or loaded after a restart), in
    /// seconds since the Unix epoch.
    active_unix: u64,
    /// The store's write gate.
    gate: Arc<Gate>,
}

impl Upload {
    /// The session id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Bytes received and acknowledged.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Seconds since a chunk last arrived (or the session was made or loaded), at `now_unix`.
    pub fn idle_secs(&self, now_unix: u64) -> u64 {
        now_unix.saturating_sub(self.active_unix)
    }

    /// Records `offset` as the acknowledged one, durably. Blocking.
    fn persist_offset(dir: &Path, offset: u64) -> Result<(), StoreError> {
        use std::os::unix::fs::FileExt as _;
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(OFFSET_FILE))?;
        file.write_all_at(&offset.to_be_bytes(), 0)?;
        file.sync_data()?;
        Ok(())
    }

    /// Appends a chunk. `start`, from `Content-Range`, must equal the current offset; `len`, if
    /// declared, must equal the bytes received. Returns the new offset once the chunk is on disk.
    pub async fn append<S, E>(
        &mut self,
        body: S,
        start: Option<u64>,
        len: Option<u64>,
    ) -> Result<u64, StoreError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::error::Error + Send + Sync + 'static,
    {
        if self.closed {
            return Err(StoreError::UploadUnknown);
        }
        if let Some(got) = start {
            if got != self.offset {
                return Err(StoreError::UploadOffset {
                    offset: self.offset,
                    got,
                });
            }
        }
        let (path, gate) = (self.data(), self.gate.clone());
        let offset = self.offset;
        let file = tokio::task::spawn_blocking(move || -> Result<File, StoreError> {
            let _open = gate.enter()?;
            let file = OpenOptions::new().append(true).open(&path)?;
            // Drop bytes of a chunk that never completed.
            if file.metadata()?.len() != offset {
                file.set_len(offset)?;
            }
            Ok(file)
        })
        .await??;
        // Until this chunk is complete the in-memory hash is not trusted (cancellation).
        let mut sink = Sink::new(file, self.hasher.take(), offset, self.gate.clone());
        let mut body = body;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| StoreError::Stream(Arc::new(e)))?;
            sink.write(&chunk).await?;
        }
        let got = sink.len() - offset;
        if let Some(declared) = len {
            if declared != got {
                return Err(StoreError::ChunkLength { declared, got });
            }
        }
        let new_offset = sink.len();
        let (_file, hasher) = sink.finish().await?;
        self.set_offset(new_offset).await?;
        self.hasher = hasher;
        self.active_unix = now_unix();
        Ok(new_offset)
    }

    /// Moves the acknowledged offset (the data up to it is on disk already).
    async fn set_offset(&mut self, offset: u64) -> Result<(), StoreError> {
        let (dir, gate) = (self.dir.clone(), self.gate.clone());
        tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
            let _open = gate.enter()?;
            Upload::persist_offset(&dir, offset)
        })
        .await??;
        self.offset = offset;
        Ok(())
    }
}

/// The file in a session's directory holding its acknowledged offset.
const OFFSET_FILE: &str = "offset";

/// The acknowledged offset of the session in `dir` whose `data` is `len` bytes long: the one in
/// its `offset` file, or `len` without one (a session of an older version). Blocking.
fn acknowledged(dir: &Path, len: u64) -> Result<u64, StoreError> {
    match fs::read(dir.join(OFFSET_FILE)) {
        Ok(bytes) => {
            let bytes: [u8; 8] = bytes.as_slice().try_into().map_err(|_| {
                StoreError::Corrupt(format!("{}: offset is not 8 bytes", dir.display()))
            })?;
            // Bytes past the acknowledged offset are a chunk that was in flight; fewer bytes
            // than acknowledged would be a lost write, and the data is what there is.
            Ok(u64::from_be_bytes(bytes).min(len))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(len),
        Err(e) => Err(e.into()),
    }
}

/// Whether the session in `dir` has an offset file of 8 bytes, or none (an older version's).
/// Any other length is a session whose creation a crash cut short between creating its offset
/// file and writing it (later writes replace the 8 bytes in place): its id was never given to a
/// client, so nothing of it was acknowledged. Blocking.
fn offset_intact(dir: &Path) -> bool {
    match fs::metadata(dir.join(OFFSET_FILE)) {
        Ok(m) => m.len() == 8,
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    }
}

/// When a file was last written, in seconds since the Unix epoch.
fn modified_unix(meta: &fs::Metadata) -> Option<u64> {
    meta.modified()
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs())
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Whether `id` is a session id the store could have made (and so is safe as a path).
fn valid_id(id: &str) -> bool {
    uuid::Uuid::try_parse(id).is_ok_and(|u| u.hyphenated().to_string() == id)
}

/// Brings the index's `uploads.v1` in line with the `uploads/` directories. Blocking.
pub(super) fn reconcile(layout: &Layout, index: &Index) -> Result<(), StoreError> {
    let mut on_disk = std::collections::HashSet::new();
    for entry in fs::read_dir(layout.uploads())? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let dir = entry.path();
        let repo = fs::read_to_string(dir.join("repo"))
            .ok()
            .and_then(|r| r.trim().parse::<RepoName>().ok());
        match repo {
            Some(repo) if valid_id(&name) && dir.join("data").is_file() && offset_intact(&dir) => {
                if index.upload(&name)?.is_none() {
                    let created_unix = entry
                        .metadata()
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map_or_else(now_unix, |d| d.as_secs());
                    index.put_upload(&name, &UploadMeta { repo, created_unix })?;
                }
                on_disk.insert(name);
            }
            _ => {
                // A session that finished (its data was moved into blobs/) or was never set up.
                tracing::debug!(dir = %dir.display(), "removing an incomplete upload directory");
                let _ = fs::remove_dir_all(&dir);
            }
        }
    }
    for id in index.upload_ids()? {
        if !on_disk.contains(&id) {
            index.remove_upload(&id)?;
        }
    }
    Ok(())
}

fn hash_file(path: &Path, algorithm: Algorithm) -> Result<Digest, StoreError> {
    let mut hasher = DigestHasher::new(algorithm);
    super::scan_file(File::open(path)?, |block| hasher.update(block))?;
    Ok(hasher.finish())
}

impl Store {
    /// Starts an upload session in `repo` and returns its id.
    pub async fn create_upload(&self, repo: &RepoName) -> Result<String, StoreError> {
        let id = uuid::Uuid::new_v4().hyphenated().to_string();
        let dir = self.layout().uploads().join(&id);
        let meta = UploadMeta {
            repo: repo.clone(),
            created_unix: now_unix(),
        };
        let (index, gate) = (self.inner.index.clone(), self.inner.gate.clone());
        let uploads = self.layout().uploads();
        let id2 = id.clone();
        tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
            let _open = gate.enter()?;
            fs::create_dir(&dir)?;
            File::create(dir.join("data"))?;
            let mut f = File::create(dir.join("repo"))?;
            std::io::Write::write_all(&mut f, meta.repo.as_str().as_bytes())?;
            f.sync_all()?;
            Upload::persist_offset(&dir, 0)?;
            sync_dir(&dir)?;
            sync_dir(&uploads)?;
            index.put_upload(&id2, &meta)
        })
        .await??;
        let upload = Upload {
            id: id.clone(),
            repo: repo.clone(),
            dir: self.layout().uploads().join(&id),
            offset: 0,
            hasher: Some(Hashing::new(Algorithm::Sha256, None)),
            closed: false,
            active_unix: now_unix(),
            gate: self.inner.gate.clone(),
        };
        self.sessions()
            .insert(id.clone(), Arc::new(tokio::sync::Mutex::new(upload)));
        Ok(id)
    }

    fn sessions(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Arc<tokio::sync::Mutex<Upload>>>>
    {
        // A panic while holding this lock cannot leave the map inconsistent (single inserts
        // and removes), so a poisoned lock is still usable.
        self.inner
            .uploads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The session `id` of `repo`, loaded from disk after a restart.
    pub async fn upload(
        &self,
        repo: &RepoName,
        id: &str,
    ) -> Result<Arc<tokio::sync::Mutex<Upload>>, StoreError> {
        if !valid_id(id) {
            return Err(StoreError::UploadUnknown);
        }
        let cached = self.sessions().get(id).cloned();
        if let Some(u) = cached {
            if &u.lock().await.repo != repo {
                return Err(StoreError::UploadUnknown);
            }
            return Ok(u);
        }
        let id2 = id.to_owned();
        let meta = self
            .read(move |i| i.upload(&id2))
            .await?
            .ok_or(StoreError::UploadUnknown)?;
        if &meta.repo != repo {
            return Err(StoreError::UploadUnknown);
        }
        let dir = self.layout().uploads().join(id);
        let d = dir.clone();
        let found = tokio::task::spawn_blocking(move || -> Result<_, StoreError> {
            let data = match fs::metadata(d.join("data")) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            let offset = acknowledged(&d, data.len())?;
            Ok(Some((offset, modified_unix(&data))))
        })
        .await??;
        let Some((offset, modified)) = found else {
            return Err(StoreError::UploadUnknown);
        };
        let upload = Upload {
            id: id.to_owned(),
            repo: repo.clone(),
            dir,
            offset,
            hasher: None,
            closed: false,
            active_unix: modified.unwrap_or(meta.created_unix),
            gate: self.inner.gate.clone(),
        };
        let mut sessions = self.sessions();
        let entry = sessions.entry(id.to_owned());
        Ok(entry
            .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(upload)))
            .clone())
    }

    /// Finishes an upload: appends `last` (the PUT body), checks the digest, makes the blob and
    /// links it into the repository. On a digest mismatch nothing is stored and the session
    /// stays as it was before `last`.
    pub async fn finish_upload<S, E>(
        &self,
        repo: &RepoName,
        id: &str,
        digest: &Digest,
        last: S,
        range: Option<(u64, u64)>,
    ) -> Result<u64, StoreError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::error::Error + Send + Sync + 'static,
    {
        let session = self.upload(repo, id).await?;
        let mut upload = session.lock().await;
        let before = upload.offset;
        upload
            .append(last, range.map(|(s, _)| s), range.map(|(_, l)| l))
            .await?;
        let data = upload.data();
        let (actual, indexer) = match upload.hasher.take() {
            Some(h) if digest.algorithm() == Algorithm::Sha256 => (h.digest.finish(), h.index),
            _ => {
                let (p, alg) = (data.clone(), digest.algorithm());
                let d = tokio::task::spawn_blocking(move || hash_file(&p, alg)).await??;
                (d, None)
            }
        };
        if &actual != digest {
            // Roll the session back to before this request's bytes.
            upload.set_offset(before).await?;
            upload.hasher = None;
            return Err(StoreError::DigestMismatch {
                expected: digest.clone(),
                actual,
            });
        }
        let size = upload.offset;
        self.install(data, digest).await?;
        self.keep_blob_index(indexer, digest, size).await;
        self.link(repo, digest).await?;
        upload.closed = true;
        self.drop_session(&upload).await;
        Ok(size)
    }

    /// Cancels an upload and removes its bytes.
    pub async fn cancel_upload(&self, repo: &RepoName, id: &str) -> Result<(), StoreError> {
        let session = self.upload(repo, id).await?;
        let mut upload = session.lock().await;
        if upload.closed {
            return Err(StoreError::UploadUnknown);
        }
        upload.closed = true;
        self.drop_session(&upload).await;
        Ok(())
    }

    /// The session `id` of `repo`, unless it has been idle for `ttl` or longer: then it is
    /// removed, and unknown like a session that never was.
    pub async fn live_upload(
        &self,
        repo: &RepoName,
        id: &str,
        ttl: std::time::Duration,
    ) -> Result<Arc<tokio::sync::Mutex<Upload>>, StoreError> {
        let session = self.upload(repo, id).await?;
        let mut upload = session.lock().await;
        if upload.closed {
            return Err(StoreError::UploadUnknown);
        }
        if upload.idle_secs(now_unix()) >= ttl.as_secs() {
            tracing::debug!(upload = %upload.id, "removing an abandoned upload session");
            upload.closed = true;
            self.drop_session(&upload).await;
            return Err(StoreError::UploadUnknown);
        }
        drop(upload);
        Ok(session)
    }

    /// Removes every session idle for `ttl` or longer (sessions receiving a chunk are left
    /// alone) and returns how many sessions remain open.
    pub async fn expire_uploads(&self, ttl: std::time::Duration) -> Result<usize, StoreError> {
        Ok(self.expire_upload_sessions(ttl).await?.open)
    }

    /// [`Store::expire_uploads`], saying how many sessions went too. If cancelled, the
    /// sessions removed so far stay removed.
    pub async fn expire_upload_sessions(
        &self,
        ttl: std::time::Duration,
    ) -> Result<UploadExpiry, StoreError> {
        let ids = self.read(|i| i.upload_ids()).await?;
        let mut expiry = UploadExpiry::default();
        for id in ids {
            let meta = {
                let id = id.clone();
                self.read(move |i| i.upload(&id)).await?
            };
            let Some(meta) = meta else { continue };
            let session = match self.upload(&meta.repo, &id).await {
                Ok(s) => s,
                Err(StoreError::UploadUnknown) => continue,
                // One damaged session must not stop every client from starting one.
                Err(e) if !matches!(e, StoreError::Closed) => {
                    tracing::warn!(
                        upload = %id,
                        error = &e as &dyn std::error::Error,
                        "an upload session cannot be read; leaving it"
                    );
                    expiry.open += 1;
                    continue;
                }
                Err(e) => return Err(e),
            };
            // A session someone holds is in use.
            let Ok(mut upload) = session.try_lock() else {
                expiry.open += 1;
                continue;
            };
            if upload.closed {
                continue;
            }
            if upload.idle_secs(now_unix()) >= ttl.as_secs() {
                tracing::debug!(upload = %upload.id, "removing an abandoned upload session");
                upload.closed = true;
                self.drop_session(&upload).await;
                expiry.removed += 1;
            } else {
                expiry.open += 1;
            }
        }
        Ok(expiry)
    }

    async fn drop_session(&self, upload: &Upload) {
        self.sessions().remove(&upload.id);
        let (dir, id, index, gate) = (
            upload.dir.clone(),
            upload.id.clone(),
            self.inner.index.clone(),
            self.inner.gate.clone(),
        );
        let result = tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
            let _open = gate.enter()?;
            index.remove_upload(&id)?;
            fs::remove_dir_all(&dir)?;
            Ok(())
        })
        .await;
        if !matches!(result, Ok(Ok(()))) {
            // Start-up reconciliation removes what is left.
            tracing::warn!(upload = %upload.id, "could not remove a finished upload session");
        }
    }
}
