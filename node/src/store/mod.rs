//! The store: the only owner of the data directory.
//!
//! Layout of a data directory:
//!
//! ```text
//! blobs/<alg>/<2 hex>/<hex>   complete, verified blobs (layers, configs and manifests alike)
//! tmp/                        blobs being written; anything here at start-up is garbage
//! uploads/<id>/{repo,data}    resumable upload sessions (the registry's POST/PATCH/PUT)
//! partial/<alg>/<hex>/        downloads from peers in progress, resumable (see `partial`)
//! journal.v1.log              the records log: what each repository links, tags and indexes
//!                             (once compacted: a snapshot of that state, then what came since)
//! index/                      sled: the index, rebuilt from the above by `shoal fsck --repair`
//! ```
//!
//! Guarantees:
//! - A file under `blobs/` is always complete and its content matches its name: blobs are
//!   streamed to `tmp/`, hashed while written, fsynced, and renamed into place only when the
//!   digest matches.
//! - A change is acknowledged only after its journal record is fsynced; the index is a cache of
//!   the journal and of `uploads/`, so losing it loses nothing.
//! - A disk that fills up fails writes, not the node: once sled has failed a write the index
//!   refuses writes (`507` on a full disk) and keeps serving reads, and it is opened again and
//!   caught up with the journal as soon as the disk has room, without a restart (see [`index`]).
//! - Never a whole blob in memory: writes go through a [`sink::Sink`] with two 1 MiB buffers.

pub mod change;
pub mod compact;
#[cfg(test)]
mod disk_full_tests;
pub mod evict;
mod fsck;
pub mod gate;
pub mod gc;
pub mod index;
pub mod journal;
pub mod partial;
pub mod pins;
pub mod sink;
pub mod upload;
pub mod usage;

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use shoal_protocol::{Algorithm, BlobIndex, BlobIndexer, Digest, RepoName, chunk_size_for};

pub use change::{Batch, Change};
pub use compact::CompactReport;
pub use fsck::{FsckReport, fsck};
pub use gc::{GcOptions, GcReport};
pub use index::Index;
pub use journal::Journal;
pub use upload::{Upload, UploadMeta};
pub use usage::{RepoUsage, Usage};

use sink::{Hashing, Sink};

/// One step of a tag's history in the journal (see [`Store::tag_history`]).
#[derive(Debug, Clone)]
pub enum TagEvent {
    /// A record accepted, and whether the tag was immutable then.
    Record {
        /// The record, as signed.
        record: shoal_protocol::SignedTagRecord,
        /// Whether the tag was immutable when it was accepted.
        immutable: bool,
    },
    /// No record at or before `at` names anything again: a retention policy expired the tag's
    /// record of that order key, or a compacted journal kept the tag's latest delete.
    DeletedAt {
        /// Repository.
        repo: RepoName,
        /// Tag.
        tag: shoal_protocol::Tag,
        /// The order key.
        at: change::OrderKey,
    },
}

/// Reusable buffers for blob bytes, shared by clones: a buffer given back is taken again
/// instead of allocating and zeroing a fresh one (zeroing fresh chunk buffers showed in the
/// profile of a rollout: `tests/bench/RESULTS.md`). Keeps at most `keep` idle ones; a buffer given
/// back past that is freed.
#[derive(Debug, Clone)]
pub struct Buffers {
    idle: Arc<Mutex<Vec<Vec<u8>>>>,
    keep: usize,
}

impl Buffers {
    /// An empty pool that keeps up to `keep` idle buffers.
    pub fn new(keep: usize) -> Buffers {
        Buffers {
            idle: Arc::default(),
            keep,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Vec<u8>>> {
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// An idle buffer (of whatever length it was given back with), or an empty one.
    pub fn take(&self) -> Vec<u8> {
        self.lock().pop().unwrap_or_default()
    }

    /// Gives `buf` back for a later [`Buffers::take`].
    pub fn give(&self, buf: Vec<u8>) {
        let mut idle = self.lock();
        if idle.len() < self.keep {
            idle.push(buf);
        }
    }
}

/// Bytes of a blob this node holds, complete or not, for positioned reads from any number of
/// readers at once (the chunk server, streaming HTTP bodies).
#[derive(Debug, Clone)]
pub enum Held {
    /// A complete, verified blob file ([`Store::open_blob`]).
    Blob(Arc<File>),
    /// A download in progress: only the chunks it holds may be read.
    Partial(Arc<partial::Partial>),
}

impl Held {
    /// Fills `buf` with the bytes at `offset`. Blocking. The caller makes sure they are there:
    /// within the blob's size, and for a partial, in chunks it holds ([`partial::Partial::covers`]).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        match self {
            Held::Blob(file) => Ok(std::os::unix::fs::FileExt::read_exact_at(
                file.as_ref(),
                buf,
                offset,
            )?),
            Held::Partial(p) => p.read_held(offset, buf),
        }
    }
}

/// Why a store operation failed. Clone, so that one outcome can answer every caller that
/// waits on it (a journal batch, a shared download); causes are kept behind an `Arc`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// Disk I/O failed.
    #[error("disk I/O")]
    Io(#[from] Arc<std::io::Error>),
    /// The sled index failed, or refuses writes because it failed earlier and the disk has no
    /// room yet to open it again (the error is the one it failed with).
    #[error("the index")]
    Index(#[from] sled::Error),
    /// Something on disk is not what the store wrote; the text says what.
    #[error("corrupt store: {0}")]
    Corrupt(String),
    /// A value the store wrote (index entry, journal line, partial's index) does not decode.
    #[error("corrupt store: {what} does not decode")]
    Decode {
        /// Which value.
        what: &'static str,
        /// Why.
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
    /// A value could not be encoded for the index or the journal.
    #[error("encoding {what}")]
    Encode {
        /// Which value.
        what: &'static str,
        /// Why.
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
    /// A chunk received for a download does not match its hash in the signed `BlobIndex`: the
    /// peer that sent it is at fault, not this node's disk. Nothing was written.
    #[error("chunk {chunk} does not match its hash")]
    ChunkRejected {
        /// The chunk.
        chunk: u32,
    },
    /// A task on the blocking pool failed (it panicked, or was cancelled at shutdown).
    #[error("a task on the blocking pool failed")]
    Task(#[source] Arc<tokio::task::JoinError>),
    /// Code that holds the store's state broke one of its own rules.
    #[error("internal invariant broken: {0}")]
    Invariant(&'static str),
    /// The store is closed (the node is shutting down).
    #[error("the store is closed")]
    Closed,
    /// The bytes do not hash to the digest they were sent under.
    #[error("digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        /// What the client said.
        expected: Digest,
        /// What the bytes hash to.
        actual: Digest,
    },
    /// No such upload session in this repository.
    #[error("upload session unknown")]
    UploadUnknown,
    /// An upload chunk does not start where the session ends.
    #[error("chunk starts at {got}, upload is at {offset}")]
    UploadOffset {
        /// Bytes the session holds.
        offset: u64,
        /// Where the chunk said it starts.
        got: u64,
    },
    /// A chunk's length does not match its declared range.
    #[error("chunk is {got} bytes, its range says {declared}")]
    ChunkLength {
        /// From `Content-Range`.
        declared: u64,
        /// Received.
        got: u64,
    },
    /// The other side's byte stream failed before it ended (a client hung up).
    #[error("the client's byte stream failed")]
    Stream(#[source] Arc<dyn std::error::Error + Send + Sync>),
    /// A change needs a blob that garbage collection has just swept; pushing the blob again
    /// brings it back.
    #[error("blob {0} was garbage-collected")]
    BlobGone(Digest),
    /// The store is doing something that runs one at a time; the text says what.
    #[error("busy: {0}")]
    Busy(&'static str),
}

impl StoreError {
    /// Whether the disk ran out of space (or quota): nothing of the write was kept, and the
    /// same request may succeed once there is room.
    pub fn is_disk_full(&self) -> bool {
        let io_full = |e: &std::io::Error| {
            e.kind() == std::io::ErrorKind::StorageFull
                || matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
        };
        match self {
            StoreError::Io(e) => io_full(e),
            StoreError::Index(sled::Error::Io(e)) => io_full(e),
            _ => false,
        }
    }

    /// For `map_err`: a stored value of kind `what` that does not decode.
    pub(crate) fn decode<E: std::error::Error + Send + Sync + 'static>(
        what: &'static str,
    ) -> impl FnOnce(E) -> StoreError {
        move |e| StoreError::Decode {
            what,
            source: Arc::new(e),
        }
    }

    /// For `map_err`: a value of kind `what` that does not encode.
    pub(crate) fn encode<E: std::error::Error + Send + Sync + 'static>(
        what: &'static str,
    ) -> impl FnOnce(E) -> StoreError {
        move |e| StoreError::Encode {
            what,
            source: Arc::new(e),
        }
    }
}

impl From<std::io::Error> for StoreError {
    fn from(e: std::io::Error) -> Self {
        StoreError::Io(Arc::new(e))
    }
}

impl From<tokio::task::JoinError> for StoreError {
    fn from(e: tokio::task::JoinError) -> Self {
        StoreError::Task(Arc::new(e))
    }
}

/// Paths inside a data directory.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    /// The layout rooted at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Layout {
        Layout { root: root.into() }
    }

    /// The data directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blob `digest` lives.
    pub fn blob(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.root
            .join("blobs")
            .join(digest.algorithm().as_str())
            .join(hex.get(..2).unwrap_or("00"))
            .join(hex)
    }

    /// Directory of all blobs.
    pub fn blobs(&self) -> PathBuf {
        self.root.join("blobs")
    }

    /// Scratch directory for blobs being written.
    pub fn tmp(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Directory of upload sessions.
    pub fn uploads(&self) -> PathBuf {
        self.root.join("uploads")
    }

    /// The records log.
    pub fn journal(&self) -> PathBuf {
        self.root.join("journal.v1.log")
    }

    /// The sled index.
    pub fn index(&self) -> PathBuf {
        self.root.join("index")
    }
}

struct Inner {
    layout: Layout,
    /// Every write to the data directory passes it; [`Store::close`] shuts it.
    gate: Arc<gate::Gate>,
    index: Index,
    journal: Journal,
    uploads: Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<Upload>>>>,
    partials: Mutex<std::collections::HashMap<Digest, Arc<partial::Partial>>>,
    /// Keeps garbage collection and writes out of each other's way.
    gc: gc::Guard,
    /// When blobs were last used and which are being read, for the disk quota.
    uses: evict::Uses,
    /// Serializes changes to the pins file.
    pins: pins::PinsLock,
}

/// Handle to a node's store (cheap to clone).
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

/// Reads `file` front to back in blocks of [`sink::SINK_BUFFER_BYTES`], handing each to `f`;
/// returns the bytes read. Blocking. Used wherever a stored file is hashed again (after a
/// restart, by `fsck`, for a `BlobIndex` not recorded at write time).
pub(crate) fn scan_file(mut file: File, mut f: impl FnMut(&[u8])) -> std::io::Result<u64> {
    let mut buf = vec![0u8; sink::SINK_BUFFER_BYTES];
    let mut total = 0u64;
    loop {
        let n = std::io::Read::read(&mut file, &mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
        f(buf.get(..n).unwrap_or_default());
    }
}

/// fsyncs a directory so that a rename or create inside it survives a crash.
pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Store {
    /// Opens the data directory at `root`, creating it if needed. Blocking: call it from a
    /// blocking context. Replays the journal into the index and reconciles upload sessions.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        Store::open_with(root, compact::AutoCompact::default())
    }

    /// [`Store::open`], compacting the journal by itself as `auto` says.
    pub(crate) fn open_with(root: &Path, auto: compact::AutoCompact) -> Result<Store, StoreError> {
        let layout = Layout::new(root);
        for dir in [layout.blobs(), layout.tmp(), layout.uploads()] {
            fs::create_dir_all(&dir)?;
        }
        // Nothing in tmp/ was ever acknowledged.
        for entry in fs::read_dir(layout.tmp())? {
            let path = entry?.path();
            if let Err(e) = fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = &e as &dyn std::error::Error, "removing a stale temp file");
            }
        }
        let index = Index::open(&layout.index())?;
        let gate = Arc::new(gate::Gate::new());
        // The journal thread lives until the last handle to the store is dropped, then flushes
        // the index and ends. Its writes pass the gate like every other.
        let (journal, _thread) = Journal::open(
            &layout.journal(),
            &layout.tmp(),
            index.clone(),
            gate.clone(),
            auto,
        )?;
        upload::reconcile(&layout, &index)?;
        let uses = evict::Uses::load(layout.root());
        Ok(Store {
            inner: Arc::new(Inner {
                layout,
                gate,
                index,
                journal,
                uploads: Mutex::new(Default::default()),
                partials: Mutex::new(Default::default()),
                gc: gc::Guard::default(),
                uses,
                pins: pins::PinsLock::default(),
            }),
        })
    }

    /// Paths of the data directory.
    pub fn layout(&self) -> &Layout {
        &self.inner.layout
    }

    /// Runs a read of the index on the blocking pool.
    pub async fn read<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Index) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let index = self.inner.index.clone();
        tokio::task::spawn_blocking(move || f(&index)).await?
    }

    /// Appends a batch of changes to the journal durably and applies them to the index.
    ///
    /// Cancel-safe in the sense that matters: once queued, a batch is written whole or not at all.
    /// A batch that needs a blob garbage collection has just swept fails with
    /// [`StoreError::BlobGone`] and changes nothing.
    pub async fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let (changes, requires) = batch.into_parts();
        let _shared = self.inner.gc.shared().await;
        self.inner.gc.admit(&changes, &requires)?;
        // What is linked now is as good as new to the grace period of the next collection (a
        // blob mounted now may wait a while for the manifest that names it).
        let linked: Vec<PathBuf> = changes
            .iter()
            .filter_map(|c| match c {
                Change::Link { digest, .. } => Some(self.inner.layout.blob(digest)),
                _ => None,
            })
            .collect();
        if !linked.is_empty() {
            tokio::task::spawn_blocking(move || {
                let now = std::time::SystemTime::now();
                for path in linked {
                    // A missing file or a read-only one only costs an earlier collection.
                    if let Ok(f) = File::options().write(true).open(&path) {
                        let _ = f.set_modified(now);
                    }
                }
            })
            .await?;
        }
        self.inner.journal.commit(changes).await
    }

    /// Collects garbage: see [`gc`]. One collection runs at a time; pushes and pulls go on.
    pub async fn gc(&self, options: GcOptions) -> Result<GcReport, StoreError> {
        gc::collect(self, options).await
    }

    /// Compacts the records log: see [`compact`]. One compaction runs at a time (a call while
    /// one runs waits for that one); pushes and pulls go on, and wait only for the switch.
    pub async fn compact(&self) -> Result<CompactReport, StoreError> {
        self.inner.journal.compact().await
    }

    /// `repo` links the blob `digest` (an upload finished, a blob was mounted or fetched).
    pub async fn link(&self, repo: &RepoName, digest: &Digest) -> Result<(), StoreError> {
        self.commit(Batch::new().link(repo, digest)).await
    }

    /// `repo` no longer links the blob `digest` (the file stays for other repositories).
    pub async fn unlink(&self, repo: &RepoName, digest: &Digest) -> Result<(), StoreError> {
        self.commit(Batch::new().unlink(repo, digest)).await
    }

    /// The manifest `digest`, already stored as a blob, is in `repo`.
    pub async fn add_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
        info: crate::manifest::ManifestInfo,
    ) -> Result<(), StoreError> {
        self.commit(Batch::new().manifest(repo, digest, info)).await
    }

    /// Keeps a manifest fetched from elsewhere (its `bytes` already checked against `digest`)
    /// as a blob, unless the store has it, and adds it to `repo`. Returns whether the blob was
    /// written now.
    pub async fn keep_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
        bytes: &[u8],
        info: crate::manifest::ManifestInfo,
    ) -> Result<bool, StoreError> {
        let new = self.blob_size(digest).await?.is_none();
        if new {
            let mut writer = self
                .blob_writer(digest.algorithm(), Some(bytes.len() as u64))
                .await?;
            writer.write(bytes).await?;
            writer.finish(digest).await?;
        }
        self.add_manifest(repo, digest, info).await?;
        Ok(new)
    }

    /// Size of the blob if the store holds it.
    pub async fn blob_size(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        match tokio::fs::metadata(self.inner.layout.blob(digest)).await {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Opens the blob for reading, with its size ([`Held::Blob`]). The file is read with
    /// positioned reads (`FileExt::read_exact_at`) on the blocking pool, by any number of readers
    /// at once.
    pub async fn open_blob(&self, digest: &Digest) -> Result<Option<(Arc<File>, u64)>, StoreError> {
        let path = self.inner.layout.blob(digest);
        let opened = tokio::task::spawn_blocking(move || match File::open(path) {
            Ok(f) => {
                let len = f.metadata()?.len();
                Ok(Some((Arc::new(f), len)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        })
        .await?;
        if let Ok(Some((file, _))) = &opened {
            self.inner.uses.opened(digest, file);
        }
        opened
    }

    /// Reads a whole small blob (a manifest) into memory, at most `limit` bytes.
    pub async fn read_small_blob(
        &self,
        digest: &Digest,
        limit: u64,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.inner.layout.blob(digest);
        tokio::task::spawn_blocking(move || {
            let file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut std::io::Read::take(file, limit + 1), &mut bytes)?;
            if bytes.len() as u64 > limit {
                return Err(StoreError::Corrupt(format!(
                    "blob {} is larger than expected",
                    path.display()
                )));
            }
            Ok(Some(bytes))
        })
        .await?
    }

    /// Starts writing a new blob that will be hashed with `algorithm`, of `size` bytes if that
    /// is known (then it is indexed as it is written).
    pub async fn blob_writer(
        &self,
        algorithm: Algorithm,
        size: Option<u64>,
    ) -> Result<BlobWriter, StoreError> {
        let path = self
            .inner
            .layout
            .tmp()
            .join(uuid::Uuid::new_v4().simple().to_string());
        let (p, gate) = (path.clone(), self.inner.gate.clone());
        let file = tokio::task::spawn_blocking(move || -> Result<File, StoreError> {
            let _open = gate.enter()?;
            Ok(OpenOptions::new().write(true).create_new(true).open(&p)?)
        })
        .await??;
        let hashing = Some(Hashing::new(algorithm, size));
        Ok(BlobWriter {
            store: self.clone(),
            sink: Some(Sink::new(file, hashing, 0, self.inner.gate.clone())),
            tmp: TempFile(Some(path), self.inner.gate.clone()),
        })
    }

    /// Moves a complete, verified, fsynced file into place as the blob `digest`.
    /// If the blob is already there the file is dropped.
    /// A blob installed (or found already there) is safe from a garbage collection running now
    /// and, through its file's time, from the next ones for their grace period.
    pub(crate) async fn install(&self, from: PathBuf, digest: &Digest) -> Result<(), StoreError> {
        let to = self.inner.layout.blob(digest);
        let gate = self.inner.gate.clone();
        let _shared = self.inner.gc.shared().await;
        self.inner.gc.installing(digest);
        self.inner.uses.installed(digest);
        tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
            let _open = gate.enter()?;
            let dir = to
                .parent()
                .ok_or_else(|| StoreError::Corrupt("blob path has no parent".into()))?;
            if to.exists() {
                fs::remove_file(&from)?;
                if let Ok(f) = File::options().write(true).open(&to) {
                    let _ = f.set_modified(std::time::SystemTime::now());
                }
                return Ok(());
            }
            let new_dir = !dir.exists();
            fs::create_dir_all(dir)?;
            fs::rename(&from, &to)?;
            sync_dir(dir)?;
            if new_dir {
                if let Some(parent) = dir.parent() {
                    sync_dir(parent)?;
                }
            }
            Ok(())
        })
        .await??;
        self.partial_stored(digest);
        Ok(())
    }

    /// Records the `BlobIndex` of a blob just stored, of `size` bytes: the one computed while it
    /// was written, or, if there was none (its size was not known before its bytes), one
    /// computed from the file now, so that it is ready before the blob is announced. A failure
    /// only costs a recomputation later, so it is logged, not returned.
    pub(crate) async fn keep_blob_index(
        &self,
        indexer: Option<BlobIndexer>,
        digest: &Digest,
        size: u64,
    ) {
        let result = match indexer.filter(|i| i.chunk_size() == chunk_size_for(size)) {
            Some(indexer) => {
                let (index, gate) = (self.inner.index.clone(), self.inner.gate.clone());
                let digest = digest.clone();
                tokio::task::spawn_blocking(move || record_index(&index, &gate, indexer, digest))
                    .await
                    .map_err(StoreError::from)
                    .and_then(|r| r.map(|_| ()))
            }
            None => self.blob_index(digest).await.map(|_| ()),
        };
        if result.is_err() {
            tracing::warn!("could not record a blob index; it will be recomputed when needed");
        }
    }

    /// The `BlobIndex` of a blob the store holds, computed from the file (and kept) if it was
    /// not recorded when the blob was written. `None` if the blob is not here.
    pub async fn blob_index(&self, digest: &Digest) -> Result<Option<BlobIndex>, StoreError> {
        let (index, gate) = (self.inner.index.clone(), self.inner.gate.clone());
        let path = self.inner.layout.blob(digest);
        let digest = digest.clone();
        tokio::task::spawn_blocking(move || {
            if let Some(bi) = index.blob_index(&digest)? {
                return Ok(Some(bi));
            }
            let file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            let mut indexer = BlobIndexer::new(chunk_size_for(file.metadata()?.len()));
            scan_file(file, |block| indexer.update(block))?;
            record_index(&index, &gate, indexer, digest).map(Some)
        })
        .await?
    }

    /// The history of each of `tags` in the journal, in the order it was written: every record
    /// accepted, and every point before which nothing may name anything again (an expiry, or a
    /// compacted journal's kept delete). Reads the whole journal on the blocking pool: it is for
    /// the rare re-derivation of a tag's current record after trust changed.
    pub async fn tag_history(
        &self,
        tags: std::collections::HashSet<(RepoName, shoal_protocol::Tag)>,
    ) -> Result<Vec<TagEvent>, StoreError> {
        let path = self.inner.layout.journal();
        tokio::task::spawn_blocking(move || {
            let mut found = Vec::new();
            let wanted =
                |r: &shoal_protocol::TagRecord| tags.contains(&(r.repo.clone(), r.tag.clone()));
            journal::read(&path, 0, |change, _| {
                let (record, immutable) = match change {
                    Change::Record { record, immutable } => (record, immutable),
                    // A compacted journal keeps the records that were current then.
                    Change::Kept {
                        entry: change::Kept::Record { record },
                    } => (record, false),
                    Change::Expired { record } => {
                        let event = record.verify().ok().and_then(|v| {
                            let r = v.record();
                            wanted(r).then(|| TagEvent::DeletedAt {
                                repo: r.repo.clone(),
                                tag: r.tag.clone(),
                                at: r.order_key(),
                            })
                        });
                        found.extend(event);
                        return Ok(());
                    }
                    Change::Kept {
                        entry: change::Kept::DeletedAt { repo, tag, at },
                    } => {
                        if tags.contains(&(repo.clone(), tag.clone())) {
                            found.push(TagEvent::DeletedAt { repo, tag, at });
                        }
                        return Ok(());
                    }
                    _ => return Ok(()),
                };
                let event = record
                    .verify()
                    .is_ok_and(|v| wanted(v.record()))
                    .then_some(TagEvent::Record { record, immutable });
                found.extend(event);
                Ok(())
            })?;
            Ok(found)
        })
        .await?
    }

    /// Closes the store, the last step of a clean shutdown: waits for the writes in flight,
    /// refuses every later one (through any handle) with [`StoreError::Closed`], makes the
    /// chunks of downloads in progress durable, and flushes the index. Nothing acknowledged
    /// depends on it, since the journal is the truth, but the next start resumes every chunk
    /// and replays less. Nothing is written to the data directory after it returns.
    pub async fn close(&self) {
        let (gate, index) = (self.inner.gate.clone(), self.inner.index.clone());
        let partials: Vec<_> = self.partials().values().cloned().collect();
        let closed = tokio::task::spawn_blocking(move || {
            let _last_words = gate.close();
            for p in partials {
                p.persist_held();
            }
            if let Err(e) = index.flush() {
                tracing::error!(error = &e as &dyn std::error::Error, "flushing the index");
            }
        })
        .await;
        if let Err(e) = closed {
            tracing::error!(error = &e as &dyn std::error::Error, "closing the store");
        }
    }

    /// Whether [`Store::close`] has run.
    pub fn is_closed(&self) -> bool {
        !self.inner.gate.is_open()
    }
}

/// Finishes `indexer` over the blob `digest` and records the index, unless the store is closed
/// (then the index is only returned: it can be computed again). Blocking.
fn record_index(
    index: &Index,
    gate: &gate::Gate,
    indexer: BlobIndexer,
    digest: Digest,
) -> Result<BlobIndex, StoreError> {
    let bi = indexer
        .finish(digest)
        .map_err(StoreError::encode("a blob index"))?;
    if let Ok(_open) = gate.enter() {
        index.put_blob_index(&bi)?;
    }
    Ok(bi)
}

/// A temp file that is removed when dropped, unless taken; left for the next start to clear if
/// the store is closed by then.
struct TempFile(Option<PathBuf>, Arc<gate::Gate>);

impl TempFile {
    fn take(&mut self) -> Option<PathBuf> {
        self.0.take()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take()
            && let Some(_open) = self.1.try_enter()
        {
            let _ = fs::remove_file(p);
        }
    }
}

/// A blob being written. Dropping it before [`BlobWriter::finish`] removes the temp file.
pub struct BlobWriter {
    store: Store,
    sink: Option<Sink>,
    tmp: TempFile,
}

impl BlobWriter {
    /// Appends bytes.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), StoreError> {
        match self.sink.as_mut() {
            Some(s) => s.write(data).await,
            None => Err(StoreError::Closed),
        }
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.sink.as_ref().map_or(0, Sink::len)
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks the bytes hash to `expected` and makes them the blob. On a mismatch nothing is
    /// stored. Returns the blob's size.
    pub async fn finish(mut self, expected: &Digest) -> Result<u64, StoreError> {
        let sink = self.sink.take().ok_or(StoreError::Closed)?;
        let len = sink.len();
        let (_file, hashing) = sink.finish().await?;
        let hashing =
            hashing.ok_or_else(|| StoreError::Invariant("blob writer lost its hasher"))?;
        let actual = hashing.digest.finish();
        if &actual != expected {
            return Err(StoreError::DigestMismatch {
                expected: expected.clone(),
                actual,
            });
        }
        let tmp = self.tmp.take().ok_or(StoreError::Closed)?;
        if let Err(e) = self.store.install(tmp.clone(), expected).await {
            // Removed when the writer drops, if the store is still open.
            self.tmp.0 = Some(tmp);
            return Err(e);
        }
        self.store
            .keep_blob_index(hashing.index, expected, len)
            .await;
        Ok(len)
    }
}

#[cfg(test)]
impl Store {
    /// Opens the store at `root` from async test code (the open blocks: it runs on the
    /// blocking pool).
    pub(crate) async fn open_in_test(root: &Path) -> Store {
        let root = root.to_owned();
        tokio::task::spawn_blocking(move || Store::open(&root))
            .await
            .unwrap()
            .unwrap()
    }
}
