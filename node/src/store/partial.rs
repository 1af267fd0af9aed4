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
//!
//! A *growing* partial ([`Store::growing_partial`]) begins without its chunk hashes: a blob
//! fetched from an upstream registry has only its sha256 digest, and the node fetching it learns
//! each chunk's hash as the chunk arrives. The rest of the fleet fetches those chunks from it
//! (and from each other) at once, each checked against the hashes it learned so far from that
//! node ([`Partial::learn`]); a chunk whose hash is not known yet cannot be written. Nothing
//! signed vouches for such hashes, so the digest check at the end is what keeps a lying node's
//! bytes out of the store. A signed index for the same blob, when one turns up, seals the
//! partial: its hashes become the known ones, if they agree with those learned.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use shoal_protocol::{Algorithm, Bitfield, BlobIndex, ChunkHash, Digest, DigestHasher, codec};
use tokio::sync::watch;

use super::gate::Gate;
use super::{Layout, Store, StoreError, sync_dir};

/// Who drives a growing partial download.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    /// This node fetches the blob from an upstream and writes its chunks itself.
    Upstream = 1,
    /// This node follows a peer's fetch, learning the chunk hashes from it.
    Follower = 2,
}

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
    /// For a growing partial, the hashes of chunks `0..n` learned so far (its `index` lists
    /// placeholders); `None`: the index is signed and whole.
    growing: Option<Mutex<Vec<ChunkHash>>>,
    /// Chunks of a blob this node fetches from an upstream sent in full to some peer (see
    /// [`Partial::was_sent`]).
    sent: Mutex<Option<Bitfield>>,
    /// Who drives a growing partial ([`Role`] as a number; 0: nobody yet).
    role: std::sync::atomic::AtomicU8,
    /// How [`Store::finish_partial`] ended, once it has for good: stored, or other bytes than
    /// the digest (expected, actual).
    finished: tokio::sync::Mutex<Option<Result<(), (Digest, Digest)>>>,
    /// Set once the blob is stored, by this download or any other route (a push, a mirror's
    /// plain fetch): from then on the stored blob answers for it ([`Store::live_partial`]).
    stored: std::sync::atomic::AtomicBool,
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
    /// Starts a growing partial blob of `digest`, `size` bytes, afresh (a growing download does
    /// not resume: the hashes it learned are not kept). Blocking.
    fn open_growing(
        layout: &Layout,
        digest: Digest,
        size: u64,
        gate: Arc<Gate>,
    ) -> Result<Partial, StoreError> {
        let chunk_size = shoal_protocol::blob_index::chunk_size_for(size);
        let count = size.div_ceil(u64::from(chunk_size));
        let unknown = ChunkHash::from_bytes([0; 32]);
        let placeholders = vec![unknown; usize::try_from(count).unwrap_or(usize::MAX).min(1 << 20)];
        let index = BlobIndex::new(digest, size, chunk_size, placeholders)
            .map_err(|e| StoreError::Corrupt(format!("a blob no index can hold: {e}")))?;
        let dir = dir_of(layout, index.digest());
        {
            let _open = gate.enter()?;
            let _ = fs::remove_dir_all(&dir);
        }
        let mut partial = Partial::open(layout, index, gate)?;
        partial.growing = Some(Mutex::new(Vec::new()));
        Ok(partial)
    }

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
            growing: None,
            role: std::sync::atomic::AtomicU8::new(0),
            sent: Mutex::new(None),
            finished: tokio::sync::Mutex::new(None),
            stored: std::sync::atomic::AtomicBool::new(false),
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

    /// The blob's index: its digest, size and chunk size; for a growing partial, its chunk
    /// hashes are placeholders (see [`Partial::known_chunks`]).
    pub fn index(&self) -> &BlobIndex {
        &self.index
    }

    fn known(&self) -> Option<std::sync::MutexGuard<'_, Vec<ChunkHash>>> {
        self.growing
            .as_ref()
            .map(|k| k.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Whether this partial began without its chunk hashes (see the module docs).
    pub fn is_growing(&self) -> bool {
        self.growing.is_some()
    }

    /// How many chunks, from the first, have a known hash: all of them unless growing.
    pub fn known_chunks(&self) -> u32 {
        match self.known() {
            Some(known) => u32::try_from(known.len()).unwrap_or(u32::MAX),
            None => self.index.chunk_count(),
        }
    }

    /// The known hashes of chunks `from..`, at most `max` of them.
    pub fn known_hashes(&self, from: u32, max: usize) -> Vec<ChunkHash> {
        let from = from as usize;
        match self.known() {
            Some(known) => known.iter().skip(from).take(max).copied().collect(),
            None => self
                .index
                .chunks()
                .iter()
                .skip(from)
                .take(max)
                .copied()
                .collect(),
        }
    }

    /// Learns the hashes of chunks `from..from + hashes.len()`; returns how many chunks now
    /// have a known hash. Hashes past a gap are ignored (learned when the gap is filled). A
    /// hash that differs from one known before is [`StoreError::ChunkRejected`]: whoever sent
    /// it contradicts what was learned (or signed), and nothing is learned.
    pub fn learn(&self, from: u32, hashes: &[ChunkHash]) -> Result<u32, StoreError> {
        let count = self.index.chunk_count() as usize;
        let Some(mut known) = self.known() else {
            for (i, h) in (from as usize..).zip(hashes) {
                if self.index.chunks().get(i).is_none_or(|k| k != h) {
                    return Err(StoreError::ChunkRejected { chunk: i as u32 });
                }
            }
            return Ok(self.index.chunk_count());
        };
        for (i, h) in (from as usize..).zip(hashes) {
            if i >= count {
                return Err(StoreError::ChunkRejected { chunk: i as u32 });
            }
            if known.get(i).is_some_and(|k| k != h) {
                return Err(StoreError::ChunkRejected { chunk: i as u32 });
            }
        }
        let skip = known.len().saturating_sub(from as usize);
        if (from as usize) <= known.len() {
            known.extend(hashes.iter().skip(skip).copied());
        }
        Ok(u32::try_from(known.len()).unwrap_or(u32::MAX))
    }

    /// Writes chunk `i` of a blob this node fetches itself (from an upstream), in order: its
    /// hash becomes known from its bytes, and then it is written like any chunk. Blocking.
    pub fn write_own_chunk(&self, i: u32, bytes: &[u8]) -> Result<(), StoreError> {
        if self.known_chunks() < i {
            return Err(StoreError::Invariant("an own chunk written out of order"));
        }
        let range = self
            .index
            .chunk_range(i)
            .ok_or(StoreError::Invariant("an own chunk past the blob's end"))?;
        if range.end - range.start != bytes.len() as u64 {
            return Err(StoreError::Invariant("an own chunk of the wrong length"));
        }
        if !self.claim(Role::Upstream) {
            return Err(StoreError::Invariant(
                "own chunks written into a download that follows a peer",
            ));
        }
        self.learn(i, &[ChunkHash::of(bytes)])?;
        if self.has(i) {
            return Ok(());
        }
        // Its hash was just made from these bytes (or agreed with the one known): no second pass.
        self.write_checked(i, range.start, bytes)
    }

    /// Whether this node fetches the blob from an upstream (it is where the blob enters the
    /// fleet: it seeds it).
    pub fn is_upstream_fetch(&self) -> bool {
        self.role.load(std::sync::atomic::Ordering::Relaxed) == Role::Upstream as u8
    }

    /// The chunk that `length` bytes at `offset` are exactly, if they are one.
    fn whole_chunk(&self, offset: u64, length: u64) -> Option<u32> {
        let chunk = u32::try_from(offset / u64::from(self.index.chunk_size())).ok()?;
        let range = self.index.chunk_range(chunk)?;
        (range.start == offset && range.end - range.start == length).then_some(chunk)
    }

    /// Notes that `length` bytes at `offset` went to a peer in full; counted only if they are
    /// one whole chunk. Kept with the download: a new one starts with nothing sent.
    pub fn mark_sent(&self, offset: u64, length: u64) {
        if let Some(chunk) = self.whole_chunk(offset, length) {
            let mut sent = self
                .sent
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            sent.get_or_insert_with(|| Bitfield::new(self.index.chunk_count()))
                .set(chunk);
        }
    }

    /// Whether `length` bytes at `offset` are one whole chunk already sent to a peer in full.
    pub fn was_sent(&self, offset: u64, length: u64) -> bool {
        self.whole_chunk(offset, length).is_some_and(|chunk| {
            self.sent
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .as_ref()
                .is_some_and(|s| s.get(chunk))
        })
    }

    /// Takes the growing partial for `role`, or finds it taken for it already; `false` if it is
    /// taken for the other (or is not growing): an upstream fetch and a follow of a peer never
    /// share one download.
    pub fn claim(&self, role: Role) -> bool {
        use std::sync::atomic::Ordering::AcqRel;
        if !self.is_growing() {
            return false;
        }
        match self.role.compare_exchange(
            0,
            role as u8,
            AcqRel,
            std::sync::atomic::Ordering::Acquire,
        ) {
            Ok(_) => true,
            Err(taken) => taken == role as u8,
        }
    }

    /// The index of the whole blob: the signed one, or, once every hash of a growing partial
    /// is known, the one those hashes make.
    fn whole_index(&self) -> Result<BlobIndex, StoreError> {
        match self.known() {
            None => Ok(self.index.clone()),
            Some(known) => BlobIndex::new(
                self.index.digest().clone(),
                self.index.size(),
                self.index.chunk_size(),
                known.clone(),
            )
            .map_err(|_| StoreError::Invariant("a finished growing download lacks hashes")),
        }
    }

    /// Whether `bytes` are chunk `i`, by its known hash.
    fn verify(&self, i: u32, bytes: &[u8]) -> bool {
        match self.known() {
            None => self.index.verify_chunk(i, bytes),
            Some(known) => known
                .get(i as usize)
                .is_some_and(|h| *h == ChunkHash::of(bytes)),
        }
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
        if !self.verify(i, bytes) {
            return Err(StoreError::ChunkRejected { chunk: i });
        }
        let range = self
            .index
            .chunk_range(i)
            .ok_or(StoreError::Invariant("a chunk that verified has no range"))?;
        self.write_checked(i, range.start, bytes)
    }

    /// Writes chunk `i`, already checked, at `offset`, and marks it held. Blocking.
    fn write_checked(&self, i: u32, offset: u64, bytes: &[u8]) -> Result<(), StoreError> {
        let _open = self.gate.enter()?;
        {
            let _writing = self
                .writer
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            self.file.write_all_at(bytes, offset)?;
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
                // A growing download of the blob: the signed index seals it if the two agree.
                if p.is_growing()
                    && p.index.size() == index.size()
                    && p.index.chunk_size() == index.chunk_size()
                    && p.learn(0, index.chunks()).is_ok()
                {
                    return Ok(p.clone());
                }
                // Another index for the same blob: opening it would take the directory from
                // under the download in progress.
                return Err(StoreError::Busy(
                    "the blob is being downloaded with another index",
                ));
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

    /// A growing download of the blob `digest` of `size` bytes (see the module docs): the one
    /// in progress, or a new one. `Busy` if the blob is being downloaded at another size.
    pub async fn growing_partial(
        &self,
        digest: &Digest,
        size: u64,
    ) -> Result<Arc<Partial>, StoreError> {
        let (store, d) = (self.clone(), digest.clone());
        // Opened under the lock of the downloads in progress: a second caller must not replace
        // the directory of the first's download (nor an expiry move it) meanwhile. Opening is a
        // few small writes and a sparse preallocation.
        tokio::task::spawn_blocking(move || {
            let mut map = store.partials();
            if let Some(p) = map.get(&d) {
                return if p.index.size() == size {
                    Ok(p.clone())
                } else {
                    Err(StoreError::Busy(
                        "the blob is being downloaded at another size",
                    ))
                };
            }
            let p =
                Partial::open_growing(store.layout(), d.clone(), size, store.inner.gate.clone())?;
            Ok(map.entry(d).or_insert_with(|| Arc::new(p)).clone())
        })
        .await?
    }

    /// Forgets the download `partial` and removes its files, if it is still the one in
    /// progress for its blob (readers that hold it keep reading what they hold).
    pub async fn abandon_partial(&self, partial: &Arc<Partial>) {
        let (store, p) = (self.clone(), partial.clone());
        let removed = tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
            let mut map = store.partials();
            if !map
                .get(p.index.digest())
                .is_some_and(|q| Arc::ptr_eq(q, &p))
            {
                return Ok(());
            }
            map.remove(p.index.digest());
            let _open = store.inner.gate.enter()?;
            fs::remove_dir_all(&p.dir)?;
            Ok(())
        })
        .await;
        if let Ok(Err(e)) | Err(e) = removed.map_err(StoreError::from) {
            tracing::warn!(digest = %partial.index.digest(), error = &e as &dyn std::error::Error, "removing an abandoned download");
        }
    }

    /// A download in progress, if there is one (to serve its chunks to peers).
    pub fn partial_in_progress(&self, digest: &Digest) -> Option<Arc<Partial>> {
        self.partials().get(digest).cloned()
    }

    /// The download of `digest` in progress, unless its blob is stored already (the download
    /// may outlive that: a push or another fetch stored it, or it is being finished). Those
    /// who look for a download before a stored blob, to spare the stored blob's file lookup
    /// on the blocking pool, ask this: a stale download never hides a stored blob.
    pub fn live_partial(&self, digest: &Digest) -> Option<Arc<Partial>> {
        self.partial_in_progress(digest)
            .filter(|p| !p.stored.load(std::sync::atomic::Ordering::Acquire))
    }

    /// Marks the download of `digest`, if there is one, as stored (see
    /// [`Store::live_partial`]).
    pub(super) fn partial_stored(&self, digest: &Digest) {
        if let Some(p) = self.partial_in_progress(digest) {
            p.stored.store(true, std::sync::atomic::Ordering::Release);
        }
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
        // Two may finish one download (the node fetching a blob from an upstream, and a fetch
        // of the same blob by a signed index that sealed its download): one does the work, the
        // other waits for it and takes its outcome.
        let mut finished = partial.finished.lock().await;
        match &*finished {
            Some(Ok(())) => return Ok(()),
            Some(Err((expected, actual))) => {
                return Err(StoreError::DigestMismatch {
                    expected: expected.clone(),
                    actual: actual.clone(),
                });
            }
            None => {}
        }
        let outcome = self.finish_partial_once(partial).await;
        // Only what is final is kept: after another error (a full disk, a closing store) the
        // next finisher tries again.
        *finished = match &outcome {
            Ok(()) => Some(Ok(())),
            Err(StoreError::DigestMismatch { expected, actual }) => {
                Some(Err((expected.clone(), actual.clone())))
            }
            Err(_) => None,
        };
        outcome
    }

    async fn finish_partial_once(&self, partial: &Arc<Partial>) -> Result<(), StoreError> {
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
            self.forget_partial(partial);
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
        let bi = partial.whole_index()?;
        let g = gate.clone();
        tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
            let _open = g.enter()?;
            Ok(p.file.sync_all()?)
        })
        .await??;
        self.install(partial.dir.join("data"), &digest).await?;
        let index = self.inner.index.clone();
        let dir = partial.dir.clone();
        tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
            let _open = gate.enter()?;
            index.put_blob_index(&bi)?;
            fs::remove_dir_all(&dir)?;
            Ok(())
        })
        .await??;
        self.forget_partial(partial);
        Ok(())
    }

    /// Removes `partial` from the downloads in progress, if it is still the one for its blob.
    fn forget_partial(&self, partial: &Arc<Partial>) {
        let mut map = self.partials();
        if map
            .get(partial.index.digest())
            .is_some_and(|q| Arc::ptr_eq(q, partial))
        {
            map.remove(partial.index.digest());
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_protocol::blob_index::chunk_size_for;

    /// A blob of `chunks` whole chunks (of the size its size calls for) and a bit, and its index.
    fn blob(chunks: u64) -> (Vec<u8>, BlobIndex) {
        let size = chunks * u64::from(chunk_size_for(chunks << 20)) + 1000;
        let bytes: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        let index = BlobIndex::of(&bytes, chunk_size_for(size)).unwrap();
        (bytes, index)
    }

    fn chunk<'a>(bytes: &'a [u8], index: &BlobIndex, i: u32) -> &'a [u8] {
        let r = index.chunk_range(i).unwrap();
        &bytes[r.start as usize..r.end as usize]
    }

    /// A download whose blob gets stored by another route (a push, a mirror's plain fetch)
    /// while it is still in progress stops answering for the blob: the chunk server and the
    /// `Have` answers, which look for a live download before a stored blob, then find the
    /// stored blob. The download itself goes on and finishes as a duplicate.
    #[tokio::test]
    async fn a_download_whose_blob_is_stored_otherwise_no_longer_answers_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_in_test(dir.path()).await;
        let (bytes, index) = blob(4);
        let digest = index.digest().clone();
        let p = store.partial(index.clone()).await.unwrap();
        p.write_chunk(0, chunk(&bytes, &index, 0)).unwrap();
        assert!(store.live_partial(&digest).is_some());
        let mut writer = store
            .blob_writer(digest.algorithm(), Some(bytes.len() as u64))
            .await
            .unwrap();
        writer.write(&bytes).await.unwrap();
        writer.finish(&digest).await.unwrap();
        assert!(
            store.live_partial(&digest).is_none(),
            "a download with one chunk hides the stored blob"
        );
        assert!(store.partial_in_progress(&digest).is_some());
        for i in 1..index.chunk_count() {
            p.write_chunk(i, chunk(&bytes, &index, i)).unwrap();
        }
        store.finish_partial(&p).await.unwrap();
        assert!(store.partial_in_progress(&digest).is_none());
        assert_eq!(
            store.blob_size(&digest).await.unwrap(),
            Some(bytes.len() as u64)
        );
    }

    #[tokio::test]
    async fn a_growing_download_takes_only_chunks_whose_hash_it_learned_and_ends_as_the_blob() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_in_test(dir.path()).await;
        let (bytes, index) = blob(4);
        let p = store
            .growing_partial(index.digest(), index.size())
            .await
            .unwrap();
        assert!(p.is_growing());
        assert_eq!(p.known_chunks(), 0);
        // Taken to follow a peer: this node's own upstream fetch cannot write into it.
        assert!(p.claim(Role::Follower));
        assert!(!p.claim(Role::Upstream));
        assert!(p.write_own_chunk(0, chunk(&bytes, &index, 0)).is_err());
        // No hash known: even the right bytes are refused.
        assert!(matches!(
            p.write_chunk(0, chunk(&bytes, &index, 0)),
            Err(StoreError::ChunkRejected { chunk: 0 })
        ));
        // Hashes past a gap wait for it; the ones that fit are learned.
        assert_eq!(p.learn(2, &index.chunks()[2..3]).unwrap(), 0);
        assert_eq!(p.learn(0, &index.chunks()[..2]).unwrap(), 2);
        assert_eq!(p.known_hashes(1, 10), index.chunks()[1..2].to_vec());
        // A hash that contradicts one learned is refused, and nothing of it is learned.
        let forged = ChunkHash::of(b"forged");
        assert_eq!(p.learn(1, &index.chunks()[1..3]).unwrap(), 3);
        assert!(p.learn(2, &[forged]).is_err());
        assert_eq!(p.known_chunks(), 3);
        assert!(p.learn(0, &[forged, index.chunks()[1], forged]).is_err());
        assert_eq!(p.known_chunks(), 3);
        // Wrong bytes for a known chunk are refused; the right ones are taken.
        assert!(p.write_chunk(1, chunk(&bytes, &index, 0)).is_err());
        for i in 0..3 {
            p.write_chunk(i, chunk(&bytes, &index, i)).unwrap();
        }
        // Hashes past the blob's last chunk are refused.
        let count = index.chunk_count();
        assert!(p.learn(count, &[forged]).is_err());
        p.learn(3, &index.chunks()[3..]).unwrap();
        for i in 3..count {
            p.write_chunk(i, chunk(&bytes, &index, i)).unwrap();
        }
        store.finish_partial(&p).await.unwrap();
        assert_eq!(
            store.blob_size(index.digest()).await.unwrap(),
            Some(index.size())
        );
        // The index kept is the one every node makes of the blob.
        assert_eq!(store.blob_index(index.digest()).await.unwrap(), Some(index));
    }

    #[tokio::test]
    async fn the_node_fetching_from_an_upstream_learns_each_hash_from_the_bytes_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_in_test(dir.path()).await;
        let (bytes, index) = blob(3);
        let p = store
            .growing_partial(index.digest(), index.size())
            .await
            .unwrap();
        // Out of order is a bug of the caller's, not something to learn from; so is a chunk cut
        // short (an upstream body that ended early), whose hash would be learned wrong.
        assert!(p.write_own_chunk(1, chunk(&bytes, &index, 1)).is_err());
        assert!(
            p.write_own_chunk(0, &chunk(&bytes, &index, 0)[1..])
                .is_err()
        );
        assert_eq!(p.known_chunks(), 0);
        for i in 0..index.chunk_count() {
            p.write_own_chunk(i, chunk(&bytes, &index, i)).unwrap();
            assert_eq!(p.known_chunks(), i + 1);
        }
        // Taken by the upstream fetch: a follow of a peer does not share it.
        assert!(p.is_upstream_fetch());
        assert!(!p.claim(Role::Follower));
        // Asked again for the same blob, the store hands out the same download.
        let again = store
            .growing_partial(index.digest(), index.size())
            .await
            .unwrap();
        assert!(Arc::ptr_eq(&p, &again));
        assert!(
            store
                .growing_partial(index.digest(), index.size() + 1)
                .await
                .is_err()
        );
        // Finished by two (the upstream fetch, and a fetch that sealed it with a signed index):
        // one does it, and the other is told how it went.
        let (a, b) = tokio::join!(store.finish_partial(&p), store.finish_partial(&again));
        a.unwrap();
        b.unwrap();
        assert_eq!(store.blob_index(index.digest()).await.unwrap(), Some(index));
    }

    #[tokio::test]
    async fn a_growing_download_of_other_bytes_than_the_digest_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_in_test(dir.path()).await;
        let (bytes, index) = blob(2);
        let mut other = bytes.clone();
        other[5] ^= 1;
        let p = store
            .growing_partial(index.digest(), index.size())
            .await
            .unwrap();
        // A lying source: hashes of other bytes, which check out chunk by chunk.
        let lie = BlobIndex::of(&other, index.chunk_size()).unwrap();
        p.learn(0, lie.chunks()).unwrap();
        for i in 0..index.chunk_count() {
            p.write_chunk(i, chunk(&other, &index, i)).unwrap();
        }
        assert!(matches!(
            store.finish_partial(&p).await,
            Err(StoreError::DigestMismatch { .. })
        ));
        assert_eq!(store.blob_size(index.digest()).await.unwrap(), None);
        assert!(store.partial_in_progress(index.digest()).is_none());
        assert!(!p.dir.exists());
    }

    #[tokio::test]
    async fn a_signed_index_seals_a_growing_download_that_agrees_with_it_and_no_other() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_in_test(dir.path()).await;
        let (bytes, index) = blob(3);
        let p = store
            .growing_partial(index.digest(), index.size())
            .await
            .unwrap();
        p.write_own_chunk(0, chunk(&bytes, &index, 0)).unwrap();
        // Another index for the blob does not take the download's directory from under it.
        let mut other = bytes.clone();
        *other.last_mut().unwrap() ^= 1;
        let signed = BlobIndex::new(
            index.digest().clone(),
            index.size(),
            index.chunk_size(),
            BlobIndex::of(&other, index.chunk_size())
                .unwrap()
                .chunks()
                .to_vec(),
        )
        .unwrap();
        let mut contradicting = index.chunks().to_vec();
        contradicting[0] = ChunkHash::of(b"x");
        let contradicting = BlobIndex::new(
            index.digest().clone(),
            index.size(),
            index.chunk_size(),
            contradicting,
        )
        .unwrap();
        assert!(store.partial(contradicting).await.is_err());
        assert!(p.has(0) && p.dir.join("data").exists());
        // One that agrees with what is known so far seals it: every hash is known.
        let sealed = store.partial(signed).await.unwrap();
        assert!(Arc::ptr_eq(&p, &sealed));
        assert_eq!(p.known_chunks(), index.chunk_count());
        // The signed hashes are now the ones chunks are checked against.
        let last = index.chunk_count() - 1;
        assert!(p.write_chunk(last, chunk(&bytes, &index, last)).is_err());
        store.abandon_partial(&p).await;
        assert!(store.partial_in_progress(index.digest()).is_none());
        assert!(!p.dir.exists());
    }
}
