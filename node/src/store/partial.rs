//! Partial blobs: downloads in progress, chunk by chunk, from many peers at once.
//!
//! A partial blob lives in `partial/<alg>/<hex>/`: `index` (its `BlobIndex`, from a signed
//! record), `data` (preallocated to the blob's size) and `chunks` (one bit per chunk held). A
//! chunk is written at its offset and held at once in memory (servable to peers, readable by a
//! streaming client: the bytes are in the page cache). The `chunks` file is written only after
//! an fsync of the data, with the bits taken before that fsync, so a persisted bit never claims
//! bytes that a crash could lose. The fsync is batched, once per [`FSYNC_EVERY_BYTES`] or
//! [`FSYNC_INTERVAL`]: one fsync per chunk capped a download at the disk's synchronous
//! write rate; a crash costs at most a batch of re-downloaded chunks. On
//! resume every claimed chunk is checked against its BLAKE3 hash once more.
//!
//! The blob's sha256 is computed in order as the contiguous prefix of held chunks grows (the
//! same prefix a streaming HTTP client is sent), so completing a download costs no extra pass
//! over the network and only page-cache reads for chunks that arrived out of order. A complete
//! partial becomes a blob by rename only if that digest matches.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use shoal_protocol::{Algorithm, Bitfield, BlobIndex, Digest, DigestHasher, codec};
use tokio::sync::watch;

use super::gate::Gate;
use super::{Layout, Store, StoreError, sync_dir};

/// How far a partial blob has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    /// Chunks held.
    pub held: u32,
    /// Chunks held from the start without a gap (the verified, in-order prefix).
    pub contiguous: u32,
    /// Whether the blob is complete and verified (it may already be a blob).
    pub complete: bool,
}

/// Bytes written after which the data is fsynced and the `chunks` file rewritten.
pub const FSYNC_EVERY_BYTES: u64 = 64 << 20;
/// Time after which written chunks are made durable with the next chunk, however few.
pub const FSYNC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

struct State {
    held: Bitfield,
    hasher: DigestHasher,
    hashed: u32,
    /// Bytes written since the last fsync.
    unsynced: u64,
    /// When the last fsync was.
    synced_at: std::time::Instant,
}

/// A blob being downloaded (shared by the downloader, the chunk server and streaming readers).
pub struct Partial {
    index: BlobIndex,
    dir: PathBuf,
    file: File,
    /// Taken around each chunk's write: writes to one file serialise on its inode lock in the
    /// kernel anyway, and there the waiting writers spin (a profile of a download showed 4% of
    /// the node's CPU in `rwsem_spin_on_owner`); here they sleep.
    writer: Mutex<()>,
    state: Mutex<State>,
    progress: watch::Sender<Progress>,
    /// The store's write gate.
    gate: Arc<Gate>,
    /// The repositories the download is for: a peer may have its chunks only if it may read
    /// one of them.
    repos: Mutex<Vec<shoal_protocol::RepoName>>,
}

impl Drop for Partial {
    /// Makes the chunks written since the last batch durable, so that a download dropped while
    /// the store stays open resumes with every chunk it held. A closing store does the same for
    /// the partials it holds ([`Store::close`]); after a crash the batch is re-downloaded.
    fn drop(&mut self) {
        if let Some(_open) = self.gate.try_enter() {
            self.persist_held();
        }
    }
}

impl std::fmt::Debug for Partial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Partial({})", self.index.digest())
    }
}

fn dir_of(layout: &Layout, digest: &Digest) -> PathBuf {
    layout
        .root()
        .join("partial")
        .join(digest.algorithm().as_str())
        .join(digest.hex())
}

impl Partial {
    /// Opens the partial blob for `index`, resuming what a previous run left. Blocking.
    fn open(layout: &Layout, index: BlobIndex, gate: Arc<Gate>) -> Result<Partial, StoreError> {
        let open = gate.enter()?;
        let dir = dir_of(layout, index.digest());
        let count = index.chunk_count();
        let resumable = fs::read(dir.join("index"))
            .ok()
            .and_then(|b| codec::decode::<BlobIndex>(&b).ok())
            .is_some_and(|old| old == index);
        let (file, mut bits) = if resumable {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(dir.join("data"))?;
            let bits = fs::read(dir.join("chunks")).unwrap_or_default();
            (
                file,
                Bitfield::from_bytes(&bits, count).unwrap_or_else(|| Bitfield::new(count)),
            )
        } else {
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir)?;
            fs::write(
                dir.join("index"),
                codec::encode(&index).map_err(StoreError::encode("a blob index"))?,
            )?;
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(dir.join("data"))?;
            file.set_len(index.size())?;
            let bits = Bitfield::new(count);
            fs::write(dir.join("chunks"), bits.to_bytes())?;
            sync_dir(&dir)?;
            (file, bits)
        };
        // Trust no claimed chunk from before a restart without checking it.
        let mut buf = Vec::new();
        let claimed: Vec<u32> = bits.iter_ones().collect();
        for i in claimed {
            let ok = read_range(&file, &index, i, &mut buf).is_ok() && index.verify_chunk(i, &buf);
            if !ok {
                bits.clear(i);
            }
        }
        let held = bits.count_ones();
        let state = State {
            held: bits,
            hasher: DigestHasher::new(index.digest().algorithm()),
            hashed: 0,
            unsynced: 0,
            synced_at: std::time::Instant::now(),
        };
        let (progress, _) = watch::channel(Progress::default());
        drop(open);
        let partial = Partial {
            index,
            dir,
            file,
            writer: Mutex::new(()),
            state: Mutex::new(state),
            progress,
            gate,
            repos: Mutex::new(Vec::new()),
        };
        if held > 0 {
            tracing::info!(digest = %partial.index.digest(), held, count, "resuming a partial download");
        }
        partial.advance_hash(None)?;
        Ok(partial)
    }

    /// Notes that the download is (also) for `repo`.
    pub fn for_repo(&self, repo: &shoal_protocol::RepoName) {
        let mut repos = self
            .repos
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !repos.contains(repo) {
            repos.push(repo.clone());
        }
    }

    /// The repositories the download is for.
    pub fn repos(&self) -> Vec<shoal_protocol::RepoName> {
        self.repos
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The blob's index.
    pub fn index(&self) -> &BlobIndex {
        &self.index
    }

    /// Which chunks are held.
    pub fn held(&self) -> Bitfield {
        self.lock().held.clone()
    }

    /// Whether chunk `i` is held.
    pub fn has(&self, i: u32) -> bool {
        self.lock().held.get(i)
    }

    /// Follows the download's progress.
    pub fn progress(&self) -> watch::Receiver<Progress> {
        self.progress.subscribe()
    }

    /// Checks chunk `i` against its hash in the index, then writes it, durably within a batch,
    /// and marks it held. A chunk that fails its hash is [`StoreError::ChunkRejected`] and
    /// writes nothing. Blocking.
    pub fn write_chunk(&self, i: u32, bytes: &[u8]) -> Result<(), StoreError> {
        if self.has(i) {
            return Ok(());
        }
        if !self.index.verify_chunk(i, bytes) {
            return Err(StoreError::ChunkRejected { chunk: i });
        }
        let range = self
            .index
            .chunk_range(i)
            .ok_or(StoreError::Invariant("a chunk that verified has no range"))?;
        let _open = self.gate.enter()?;
        {
            let _writing = self
                .writer
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            self.file.write_all_at(bytes, range.start)?;
        }
        let persist = {
            let mut state = self.lock();
            state.held.set(i);
            state.unsynced += bytes.len() as u64;
            let due =
                state.unsynced >= FSYNC_EVERY_BYTES || state.synced_at.elapsed() >= FSYNC_INTERVAL;
            due.then(|| {
                state.unsynced = 0;
                state.synced_at = std::time::Instant::now();
                // Taken before the fsync: only chunks written before it are claimed.
                state.held.to_bytes()
            })
        };
        if let Some(bits) = persist {
            self.file.sync_data()?;
            // Losing this write only costs a re-download of the chunks.
            fs::write(self.dir.join("chunks"), bits)?;
        }
        self.advance_hash(Some((i, bytes)))
    }

    /// Makes the chunks written since the last batch durable: fsyncs the data, then records
    /// them in `chunks`. Blocking; the caller holds the store's gate (open, or closing).
    pub(super) fn persist_held(&self) {
        let bits = {
            let mut state = self.lock();
            if state.unsynced == 0 || self.dir.join("chunks").metadata().is_err() {
                // Nothing new, or the partial was finished or removed.
                return;
            }
            state.unsynced = 0;
            state.held.to_bytes()
        };
        if let Err(e) = self
            .file
            .sync_data()
            .and_then(|()| fs::write(self.dir.join("chunks"), bits))
        {
            tracing::warn!(digest = %self.index.digest(), error = &e as &dyn std::error::Error, "saving a partial download's chunk list");
        }
    }

    /// Hashes the contiguous prefix as far as it goes and publishes progress.
    fn advance_hash(&self, just_written: Option<(u32, &[u8])>) -> Result<(), StoreError> {
        let mut state = self.lock();
        let mut buf = Vec::new();
        while state.hashed < self.index.chunk_count() && state.held.get(state.hashed) {
            let i = state.hashed;
            match just_written {
                Some((j, bytes)) if j == i => state.hasher.update(bytes),
                _ => {
                    read_range(&self.file, &self.index, i, &mut buf)?;
                    state.hasher.update(&buf);
                }
            }
            state.hashed += 1;
        }
        let progress = Progress {
            held: state.held.count_ones(),
            contiguous: state.hashed,
            complete: state.hashed == self.index.chunk_count(),
        };
        self.progress.send_replace(progress);
        Ok(())
    }

    /// Whether every chunk that `[offset, offset + len)` touches is held (and `len > 0`).
    pub fn covers(&self, offset: u64, len: u64) -> bool {
        let Some(end) = offset
            .checked_add(len)
            .filter(|e| *e <= self.index.size() && len > 0)
        else {
            return false;
        };
        let chunk = u64::from(self.index.chunk_size());
        let (first, last) = ((offset / chunk) as u32, ((end - 1) / chunk) as u32);
        let state = self.lock();
        (first..=last).all(|i| state.held.get(i))
    }

    /// Reads into `buf` the bytes `[offset, offset + buf.len())`, which the caller knows are
    /// held (below the contiguous prefix). Blocking.
    pub fn read_held(&self, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        self.file.read_exact_at(buf, offset)?;
        Ok(())
    }

    /// Whether every chunk is held and hashed.
    pub fn is_complete(&self) -> bool {
        self.progress.borrow().complete
    }

    fn digest_if_complete(&self) -> Option<Digest> {
        let state = self.lock();
        (state.hashed == self.index.chunk_count()).then(|| state.hasher.clone().finish())
    }
}

fn read_range(file: &File, index: &BlobIndex, i: u32, buf: &mut Vec<u8>) -> Result<(), StoreError> {
    let range = index
        .chunk_range(i)
        .ok_or(StoreError::Invariant("a chunk past the end of its index"))?;
    // Overwritten by the read: a reused buffer of the same length is not zeroed first.
    buf.resize(usize::try_from(range.end - range.start).unwrap_or(0), 0);
    file.read_exact_at(buf, range.start)?;
    Ok(())
}

impl Store {
    /// The partial download of the blob `index` describes, resumed or started. One per blob:
    /// every caller gets the same one while it is in progress.
    pub async fn partial(&self, index: BlobIndex) -> Result<Arc<Partial>, StoreError> {
        let digest = index.digest().clone();
        // Twice at most: an expiry ([`Store::expire_downloads`]) that moved an old directory
        // away while it was being opened leaves the download to start afresh, and cannot take
        // the fresh one (its files are new).
        for _ in 0..2 {
            if let Some(p) = self.partials().get(&digest) {
                if p.index == index {
                    return Ok(p.clone());
                }
            }
            let (layout, gate, i) = (
                self.layout().clone(),
                self.inner.gate.clone(),
                index.clone(),
            );
            let p = tokio::task::spawn_blocking(move || Partial::open(&layout, i, gate)).await??;
            let mut map = self.partials();
            if let Some(existing) = map.get(&digest) {
                return Ok(existing.clone());
            }
            // Checked under the map's lock, which an expiry holds while it moves a directory.
            if p.dir.join("index").is_file() {
                return Ok(map.entry(digest).or_insert_with(|| Arc::new(p)).clone());
            }
        }
        Err(StoreError::Busy(
            "a download's directory went away twice while it was opened",
        ))
    }

    /// A download in progress, if there is one (to serve its chunks to peers).
    pub fn partial_in_progress(&self, digest: &Digest) -> Option<Arc<Partial>> {
        self.partials().get(digest).cloned()
    }

    pub(super) fn partials(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<Digest, Arc<Partial>>> {
        self.inner
            .partials
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Turns a complete partial into a blob: checks its digest, fsyncs, renames it into place.
    /// A partial whose bytes do not hash to its digest is discarded.
    pub async fn finish_partial(&self, partial: &Arc<Partial>) -> Result<(), StoreError> {
        let digest = partial.index.digest().clone();
        // The last chunk's writer may not have hashed it yet (a duplicate request for it
        // returns as soon as the bit is set): catch the hash up here rather than race it.
        let p = partial.clone();
        tokio::task::spawn_blocking(move || p.advance_hash(None)).await??;
        let actual = partial
            .digest_if_complete()
            .ok_or_else(|| StoreError::Corrupt(format!("partial {digest} is not complete")))?;
        let (p, gate) = (partial.clone(), self.inner.gate.clone());
        if actual != digest {
            self.partials().remove(&digest);
            let _ = tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
                let _open = gate.enter()?;
                Ok(fs::remove_dir_all(&p.dir)?)
            })
            .await;
            return Err(StoreError::DigestMismatch {
                expected: digest,
                actual,
            });
        }
        let g = gate.clone();
        tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
            let _open = g.enter()?;
            Ok(p.file.sync_all()?)
        })
        .await??;
        self.install(partial.dir.join("data"), &digest).await?;
        let index = self.inner.index.clone();
        let (bi, dir) = (partial.index.clone(), partial.dir.clone());
        tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
            let _open = gate.enter()?;
            index.put_blob_index(&bi)?;
            fs::remove_dir_all(&dir)?;
            Ok(())
        })
        .await??;
        self.partials().remove(&digest);
        Ok(())
    }

    /// Removes the downloads that nothing has continued for `ttl`: directories under
    /// `partial/` whose files are all older than that and that no fetch, chunk server or
    /// streaming reader holds (a download the store still remembers but nobody holds, such as
    /// one that stalled, is forgotten with its directory). `dry_run` only counts them. Returns
    /// how many went and their bytes. Blocking.
    ///
    /// Each directory is judged and moved to `partial/expired/` under the lock of the map of
    /// downloads in progress, so a fetch cannot take it up meanwhile ([`Store::partial`]
    /// checks, under the same lock, that what it opened is still there); it is deleted after.
    pub(super) fn expire_downloads(
        &self,
        ttl: std::time::Duration,
        dry_run: bool,
    ) -> Result<(u64, u64), StoreError> {
        let _open = self.inner.gate.enter()?;
        let root = self.layout().root().join("partial");
        let expired = root.join(EXPIRED_DIR);
        if !dry_run {
            // What a crash left between the move and the deletion.
            match fs::remove_dir_all(&expired) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        let now = std::time::SystemTime::now();
        let (mut count, mut bytes) = (0u64, 0u64);
        for alg in [Algorithm::Sha256, Algorithm::Sha512] {
            let Ok(dirs) = fs::read_dir(root.join(alg.as_str())) else {
                continue;
            };
            for dir in dirs.flatten() {
                let path = dir.path();
                let Some(hex) = path.file_name().and_then(|n| n.to_str()) else {
                    continue;
                };
                let Ok(digest) = format!("{}:{hex}", alg.as_str()).parse::<Digest>() else {
                    continue;
                };
                let mut map = self.partials();
                // Held beyond the map: a fetch, a peer being served or a client streaming it.
                if map.get(&digest).is_some_and(|p| Arc::strong_count(p) > 1) {
                    continue;
                }
                // The newest time of its files: a download writes `data` and `chunks` as it goes.
                let (mut newest, mut size) = (None::<std::time::SystemTime>, 0u64);
                for file in fs::read_dir(&path).into_iter().flatten().flatten() {
                    if let Ok(m) = file.metadata() {
                        size += m.len();
                        newest = newest.max(m.modified().ok());
                    }
                }
                if super::gc::is_young(newest, now, ttl) {
                    continue;
                }
                count += 1;
                bytes += size;
                if dry_run {
                    continue;
                }
                fs::create_dir_all(&expired)?;
                let moved = expired.join(format!("{}-{hex}", alg.as_str()));
                fs::rename(&path, &moved)?;
                let forgotten = map.remove(&digest);
                drop(map);
                // Its directory is gone: dropping it writes nothing.
                drop(forgotten);
                tracing::debug!(%digest, size, "removing an abandoned download");
                fs::remove_dir_all(&moved)?;
            }
        }
        Ok((count, bytes))
    }
}

/// Where, under `partial/`, [`Store::expire_downloads`] moves a directory before deleting it.
const EXPIRED_DIR: &str = "expired";
