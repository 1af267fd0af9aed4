//! The index handle: every read and write goes to the sled database open now, and a write that
//! fails on the disk leaves the handle *failed* until the database is opened again.
//!
//! Why: after one failed write sled keeps the error and refuses every later write for as long
//! as the database stays open, so a disk that filled up once would fail every push until the
//! node restarts. What happens instead:
//! - the write that failed answers its error, and every write after it is refused with the same
//!   error without reaching sled (a full disk: `507 Insufficient Storage`); reads go on from the
//!   database as it is, so the node keeps serving what it holds;
//! - the hook set by [`Index::on_failure`] (the journal thread's nudge) is called then, at every
//!   refused write, and every second while the disk has room (a watch thread that ends with the
//!   failure); the journal thread, before its next batch or when nudged, calls
//!   [`Index::recover`]: once the disk has room again ([`REOPEN_MIN_FREE_BYTES`]) it drops the failed database, opens it
//!   again and replays what the journal holds past the index's applied offset, as a start does.
//!   All of that happens under the handle's lock: a reader sees the index as it was before the
//!   failure or as it is after the recovery, never a state between, and a write that arrives
//!   meanwhile waits for the outcome;
//! - what sled had not written when it failed is lost from the database, as in a crash: the
//!   journal-derived trees come back with the replay, the upload sessions are carried over from
//!   the failed database's memory, and a lost `BlobIndex` is computed again when it is asked for.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};
use std::time::{Duration, Instant};

use shoal_protocol::fleet::FleetItem;
use shoal_protocol::{
    BlobIndex, BlobRef, Digest, RepoName, SignedTagRecord, Tag, VerifiedTagRecord,
};

use super::{KeyValue, Referrer, ReferrersPage, Trees};
use crate::manifest::ManifestInfo;
use crate::store::StoreError;
use crate::store::change::{Change, OrderKey};
use crate::store::upload::UploadMeta;

/// The free space the index's file system needs before a failed index is opened again: enough
/// for sled's next log segments and the replay, so that the reopened database does not fail
/// again at once.
pub const REOPEN_MIN_FREE_BYTES: u64 = 8 << 20;
/// The least time between two attempts to open a failed index again.
const REOPEN_RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// How long a reopen waits for the reads and writes in flight on the failed database to end,
/// and then for sled to let go of the database's lock.
const REOPEN_WAIT: Duration = Duration::from_secs(5);
/// How often a reopen looks again while it waits.
const REOPEN_POLL: Duration = Duration::from_millis(5);

/// Handle to the index (cheap to clone; every clone sees the same database, and the same
/// database opened again after a failure).
#[derive(Clone)]
pub struct Index {
    shared: Arc<Shared>,
}

struct Shared {
    /// Where the database lives; `None` for a temporary one, which is never opened again.
    dir: Option<PathBuf>,
    state: RwLock<State>,
    /// Called when the index fails, and when a write is refused because it has.
    on_failure: OnceLock<Box<dyn Fn() + Send + Sync>>,
}

struct State {
    /// The open database; `None` only after an attempt to open it again failed.
    trees: Option<Arc<Trees>>,
    /// Counts the databases opened, so that a write that failed on a database already replaced
    /// does not fail the new one.
    epoch: u64,
    /// The error of the write that failed the database, until it is opened again.
    failed: Option<sled::Error>,
    /// When the last attempt to open it again started.
    last_reopen: Option<Instant>,
    /// The upload sessions of a failed database, taken from its memory before it was dropped,
    /// until a database open again holds them.
    uploads: Option<Vec<KeyValue>>,
}

impl State {
    fn open(trees: Arc<Trees>) -> State {
        State {
            trees: Some(trees),
            epoch: 0,
            failed: None,
            last_reopen: None,
            uploads: None,
        }
    }

    /// Why no database is open.
    fn unavailable(&self) -> StoreError {
        match &self.failed {
            Some(e) => StoreError::Index(e.clone()),
            None => StoreError::Invariant("the index has no database open and no failure"),
        }
    }
}

impl Index {
    /// Opens (or creates) the index in `dir`.
    pub fn open(dir: &Path) -> Result<Index, StoreError> {
        Ok(Index::with(
            Some(dir.to_owned()),
            Arc::new(Trees::open(dir)?),
        ))
    }

    /// A throwaway in-memory index, used by `fsck` to rebuild and compare.
    pub fn temporary() -> Result<Index, StoreError> {
        Ok(Index::with(None, Arc::new(Trees::temporary()?)))
    }

    fn with(dir: Option<PathBuf>, trees: Arc<Trees>) -> Index {
        Index {
            shared: Arc::new(Shared {
                dir,
                state: RwLock::new(State::open(trees)),
                on_failure: OnceLock::new(),
            }),
        }
    }

    fn state(&self) -> RwLockReadGuard<'_, State> {
        // Every change to the state is a single assignment or a whole reopen whose fields are
        // set last: a panic while holding the lock leaves it usable.
        self.shared
            .state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn state_mut(&self) -> RwLockWriteGuard<'_, State> {
        self.shared
            .state
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs a read on the database open now. Reads go on while the index is failed.
    fn read<R>(&self, f: impl FnOnce(&Trees) -> Result<R, StoreError>) -> Result<R, StoreError> {
        let trees = {
            let state = self.state();
            state.trees.clone().ok_or_else(|| state.unavailable())?
        };
        f(&trees)
    }

    /// Runs a write on the database open now, or refuses it with the failure if the index is
    /// failed. A write that fails on the disk fails the index.
    fn write<R>(&self, f: impl FnOnce(&Trees) -> Result<R, StoreError>) -> Result<R, StoreError> {
        let held = {
            let state = self.state();
            match (&state.failed, &state.trees) {
                (None, Some(trees)) => Ok((trees.clone(), state.epoch)),
                _ => Err(state.unavailable()),
            }
        };
        let (trees, epoch) = match held {
            Ok(held) => held,
            Err(refused) => {
                self.nudge();
                return Err(refused);
            }
        };
        let result = f(&trees);
        // Before failing the index: a reopen waits for every holder of the old database.
        drop(trees);
        if let Err(StoreError::Index(e @ sled::Error::Io(_))) = &result {
            self.fail(epoch, e);
        }
        result
    }

    /// Notes that a write on the database of `epoch` failed with `error`, unless that database
    /// was replaced since, and calls the hook.
    fn fail(&self, epoch: u64, error: &sled::Error) {
        {
            let mut state = self.state_mut();
            if state.epoch != epoch || state.failed.is_some() {
                return;
            }
            tracing::error!(
                error = error as &dyn std::error::Error,
                "an index write failed; index writes are refused until it is opened again"
            );
            state.failed = Some(error.clone());
        }
        if self.shared.dir.is_some() {
            let shared = Arc::downgrade(&self.shared);
            let spawned = std::thread::Builder::new()
                .name("shoal-index-watch".into())
                .spawn(move || watch(&shared));
            if let Err(e) = spawned {
                tracing::warn!(
                    error = &e as &dyn std::error::Error,
                    "cannot watch the disk of the failed index; only a write opens it again"
                );
            }
        }
        self.nudge();
    }

    fn nudge(&self) {
        if let Some(hook) = self.shared.on_failure.get() {
            hook();
        }
    }

    /// Sets what is called when the index fails and whenever a write is refused because it
    /// has (the first hook set stays). It is called on the thread that wrote, which may be an
    /// async one: it must not block.
    pub fn on_failure(&self, hook: impl Fn() + Send + Sync + 'static) {
        let _first = self.shared.on_failure.set(Box::new(hook));
    }

    /// The failure that makes the index refuse writes, if it is failed.
    pub fn failure(&self) -> Option<StoreError> {
        self.state().failed.clone().map(StoreError::Index)
    }

    /// Opens a failed index again, if its disk has room and the last attempt is over a second
    /// old: drops the failed database (waiting for the reads and writes in flight on it), opens
    /// it again, puts back the upload sessions the failed one held, and calls `catch_up` with
    /// the new database before anyone else sees it, to replay what the journal holds past its
    /// applied offset. Blocking. `Ok` if the index is not failed (any more); otherwise the
    /// error that keeps it failed. For the journal thread only, which must not write the index
    /// while `catch_up` runs.
    pub fn recover(
        &self,
        catch_up: impl FnOnce(&Index) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut state = self.state_mut();
        let Some(failure) = state.failed.clone() else {
            return Ok(());
        };
        let Some(dir) = self.shared.dir.clone() else {
            return Err(StoreError::Index(failure));
        };
        if state
            .last_reopen
            .is_some_and(|at| at.elapsed() < REOPEN_RETRY_INTERVAL)
            || !has_room(&dir)
        {
            return Err(StoreError::Index(failure));
        }
        state.last_reopen = Some(Instant::now());
        tracing::info!("the disk has room again; opening the failed index again");
        match reopen(&dir, &mut state, catch_up) {
            Ok(()) => {
                tracing::info!("the index is open again; index writes are accepted");
                Ok(())
            }
            Err(e) => {
                tracing::warn!(
                    error = &e as &dyn std::error::Error,
                    "opening the failed index again failed; it is tried again on a later write"
                );
                Err(e)
            }
        }
    }

    /// Fails the index as a write that hit a full disk would, but tells nobody: the next write
    /// is refused, and its nudge is the first.
    #[cfg(test)]
    pub(crate) fn fail_for_test(&self) {
        let full = std::io::Error::from_raw_os_error(libc::ENOSPC);
        self.state_mut().failed = Some(sled::Error::Io(full));
    }

    /// The database open now, for tests that damage it on purpose.
    #[cfg(test)]
    pub(super) fn trees_for_test(&self) -> Arc<Trees> {
        self.state().trees.clone().expect("a database is open")
    }
}

/// The watch of a failed index: every [`REOPEN_RETRY_INTERVAL`], if its disk has room again, calls
/// the hook, so that the index is opened again within about that time even if nothing writes.
/// Ends once the index is open again or dropped (it holds the index only while it looks).
fn watch(shared: &Weak<Shared>) {
    loop {
        std::thread::sleep(REOPEN_RETRY_INTERVAL);
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let index = Index { shared };
        if index.failure().is_none() {
            return;
        }
        if index.shared.dir.as_deref().is_some_and(has_room) {
            index.nudge();
        }
    }
}

/// The reopen itself, under the handle's write lock (see [`Index::recover`]).
fn reopen(
    dir: &Path,
    state: &mut State,
    catch_up: impl FnOnce(&Index) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    if let Some(old) = state.trees.take() {
        if state.uploads.is_none() {
            // Its memory holds every session written before the failure, flushed or not.
            match old.upload_entries() {
                Ok(uploads) => state.uploads = Some(uploads),
                Err(e) => tracing::warn!(
                    error = &e as &dyn std::error::Error,
                    "reading the upload sessions of the failed index; those sled had not \
                     written are forgotten"
                ),
            }
        }
        let held: Weak<Trees> = Arc::downgrade(&old);
        drop(old);
        if !wait_until(|| held.strong_count() == 0) {
            // Still read by someone: keep serving from it, and try again later.
            state.trees = held.upgrade();
            return Err(StoreError::Busy("the failed index is still in use"));
        }
    }
    state.epoch += 1;
    let trees = Arc::new(open_when_released(dir)?);
    // Seen by nobody but `catch_up` until it is complete.
    let staged = Index::with(None, trees.clone());
    let caught_up = (|| {
        if let Some(uploads) = &state.uploads {
            staged.write(|t| t.replace_uploads(uploads))?;
        }
        catch_up(&staged)?;
        staged.flush()
    })();
    // Even behind or failed again, it serves reads better than nothing.
    state.trees = Some(trees);
    caught_up?;
    state.uploads = None;
    state.failed = None;
    Ok(())
}

/// Polls `done` until it holds, for at most [`REOPEN_WAIT`]; whether it held.
fn wait_until(mut done: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    while !done() {
        if started.elapsed() > REOPEN_WAIT {
            return false;
        }
        std::thread::sleep(REOPEN_POLL);
    }
    true
}

/// Opens the database in `dir`, waiting for sled's threads of the dropped one to let go of its
/// lock (sled refuses with an `Other` I/O error while they hold it).
fn open_when_released(dir: &Path) -> Result<Trees, StoreError> {
    let started = Instant::now();
    loop {
        match Trees::open(dir) {
            Err(StoreError::Index(sled::Error::Io(e)))
                if e.kind() == std::io::ErrorKind::Other && started.elapsed() < REOPEN_WAIT =>
            {
                std::thread::sleep(REOPEN_POLL);
            }
            opened => return opened,
        }
    }
}

/// Whether the file system of `dir` has [`REOPEN_MIN_FREE_BYTES`] free for this process. If
/// that cannot be told, the reopen decides.
fn has_room(dir: &Path) -> bool {
    match nix::sys::statvfs::statvfs(dir) {
        Ok(s) => s.blocks_available().saturating_mul(s.fragment_size()) >= REOPEN_MIN_FREE_BYTES,
        Err(_) => true,
    }
}

impl Trees {
    /// Every upload session entry.
    fn upload_entries(&self) -> Result<Vec<KeyValue>, StoreError> {
        self.uploads
            .iter()
            .map(|e| {
                e.map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .map_err(StoreError::from)
            })
            .collect()
    }

    /// Makes the upload session entries exactly `entries`.
    fn replace_uploads(&self, entries: &[KeyValue]) -> Result<(), StoreError> {
        self.uploads.clear()?;
        for (k, v) in entries {
            self.uploads.insert(k.as_slice(), v.as_slice())?;
        }
        Ok(())
    }
}

/// The index's reads and writes, each on the database open now (see `Trees` for what they
/// do, and the module doc for writes on a failed index).
impl Index {
    /// Drops everything derived from the journal, so that it can be replayed from the start.
    pub fn clear_journal_state(&self) -> Result<(), StoreError> {
        self.write(Trees::clear_journal_state)
    }

    /// Writes the index to disk.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.write(Trees::flush)
    }

    /// Journal offset up to which changes are applied.
    pub fn applied_offset(&self) -> Result<u64, StoreError> {
        self.read(Trees::applied_offset)
    }

    /// Applies one journal change that ends at journal offset `end` (see `Trees::apply`).
    pub fn apply(&self, change: &Change, end: u64) -> Result<(), StoreError> {
        self.write(|t| t.apply(change, end))
    }

    /// Applies journal changes in their order, all or none (see `Trees::apply_all`).
    pub fn apply_all(&self, changes: &[(&Change, u64)]) -> Result<(), StoreError> {
        self.write(|t| t.apply_all(changes))
    }

    /// Records that the index holds the journal up to `offset`.
    pub fn set_applied_offset(&self, offset: u64) -> Result<(), StoreError> {
        self.write(|t| t.set_applied_offset(offset))
    }

    /// Hands `f` the journal-derived state as the changes that rebuild it (see
    /// `Trees::snapshot`).
    pub fn snapshot(
        &self,
        f: impl FnMut(Change) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.read(|t| t.snapshot(f))
    }

    /// The latest tombstone's order key of a tag, if it was ever deleted.
    pub fn deleted_at(&self, repo: &RepoName, tag: &Tag) -> Result<Option<OrderKey>, StoreError> {
        self.read(|t| t.deleted_at(repo, tag))
    }

    /// Every repository that links `digest`, holds it as a manifest, or whose current records
    /// name it.
    pub fn repos_of_blob(&self, digest: &Digest) -> Result<Vec<RepoName>, StoreError> {
        self.read(|t| t.repos_of_blob(digest))
    }

    /// Hands the fleet items to `f`, after `after`, until `f` breaks.
    pub fn visit_fleet(
        &self,
        after: Option<&str>,
        f: impl FnMut(FleetItem) -> std::ops::ControlFlow<()>,
    ) -> Result<std::ops::ControlFlow<()>, StoreError> {
        self.read(|t| t.visit_fleet(after, f))
    }

    /// The current record of a tag (a tombstone if the tag was deleted).
    pub fn record(
        &self,
        repo: &RepoName,
        tag: &Tag,
    ) -> Result<Option<VerifiedTagRecord>, StoreError> {
        self.read(|t| t.record(repo, tag))
    }

    /// Hands the current records of `repo` (tombstones included) to `f`, in tag order.
    pub fn visit_repo_records(
        &self,
        repo: &RepoName,
        f: impl FnMut(SignedTagRecord),
    ) -> Result<(), StoreError> {
        self.read(|t| t.visit_repo_records(repo, f))
    }

    /// Hands the current records to `f` in (repo, tag) order, after `after`, until `f` breaks.
    pub fn visit_records(
        &self,
        after: Option<(&RepoName, &Tag)>,
        f: impl FnMut(SignedTagRecord) -> std::ops::ControlFlow<()>,
    ) -> Result<std::ops::ControlFlow<()>, StoreError> {
        self.read(|t| t.visit_records(after, f))
    }

    /// What a current record of `repo` says about the blob, if any record names it.
    pub fn record_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<BlobRef>, StoreError> {
        self.read(|t| t.record_blob(repo, digest))
    }

    /// The recorded `BlobIndex` of a blob.
    pub fn blob_index(&self, digest: &Digest) -> Result<Option<BlobIndex>, StoreError> {
        self.read(|t| t.blob_index(digest))
    }

    /// Records a blob's `BlobIndex`.
    pub fn put_blob_index(&self, index: &BlobIndex) -> Result<(), StoreError> {
        self.write(|t| t.put_blob_index(index))
    }

    /// Forgets the `BlobIndex` of a blob no longer stored.
    pub fn remove_blob_index(&self, digest: &Digest) -> Result<(), StoreError> {
        self.write(|t| t.remove_blob_index(digest))
    }

    /// Hands every manifest entry of `repo` (of every repository if `None`) to `f`.
    pub fn visit_manifests(
        &self,
        repo: Option<&RepoName>,
        f: impl FnMut(RepoName, Digest, ManifestInfo),
    ) -> Result<(), StoreError> {
        self.read(|t| t.visit_manifests(repo, f))
    }

    /// Tags of `repo` that currently name `digest`.
    pub fn tags_naming(&self, repo: &RepoName, digest: &Digest) -> Result<Vec<Tag>, StoreError> {
        self.read(|t| t.tags_naming(repo, digest))
    }

    /// Whether the repository exists (anything was ever pushed to it).
    pub fn repo_exists(&self, repo: &RepoName) -> Result<bool, StoreError> {
        self.read(|t| t.repo_exists(repo))
    }

    /// Repositories in order, after `last`, at most `n`.
    pub fn repos(&self, last: Option<&str>, n: usize) -> Result<Vec<RepoName>, StoreError> {
        self.read(|t| t.repos(last, n))
    }

    /// Whether the repository links the blob.
    pub fn is_linked(&self, repo: &RepoName, digest: &Digest) -> Result<bool, StoreError> {
        self.read(|t| t.is_linked(repo, digest))
    }

    /// The manifest `digest` in `repo`, if it is there.
    pub fn manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<ManifestInfo>, StoreError> {
        self.read(|t| t.manifest(repo, digest))
    }

    /// What the tag names.
    pub fn tag(&self, repo: &RepoName, tag: &Tag) -> Result<Option<Digest>, StoreError> {
        self.read(|t| t.tag(repo, tag))
    }

    /// Tags of the repository in order, after `last`, at most `n`.
    pub fn tags(
        &self,
        repo: &RepoName,
        last: Option<&str>,
        n: usize,
    ) -> Result<Vec<Tag>, StoreError> {
        self.read(|t| t.tags(repo, last, n))
    }

    /// One page of the referrers of `subject` in `repo` (see `Trees::referrers_page`).
    pub fn referrers_page(
        &self,
        repo: &RepoName,
        subject: &Digest,
        page: &ReferrersPage<'_>,
    ) -> Result<(Vec<Referrer>, bool), StoreError> {
        self.read(|t| t.referrers_page(repo, subject, page))
    }

    /// Manifests in `repo` whose subject is `subject`, all at once.
    pub fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
    ) -> Result<Vec<(Digest, ManifestInfo)>, StoreError> {
        self.read(|t| t.referrers(repo, subject))
    }

    /// Records an upload session.
    pub fn put_upload(&self, id: &str, meta: &UploadMeta) -> Result<(), StoreError> {
        self.write(|t| t.put_upload(id, meta))
    }

    /// An upload session.
    pub fn upload(&self, id: &str) -> Result<Option<UploadMeta>, StoreError> {
        self.read(|t| t.upload(id))
    }

    /// Forgets an upload session.
    pub fn remove_upload(&self, id: &str) -> Result<(), StoreError> {
        self.write(|t| t.remove_upload(id))
    }

    /// Ids of every upload session.
    pub fn upload_ids(&self) -> Result<Vec<String>, StoreError> {
        self.read(Trees::upload_ids)
    }

    /// The journal-derived trees without the stale entries of `blob_repos.v1` (see
    /// `Trees::dump_comparable_trees`).
    pub fn dump_comparable_trees(&self) -> Result<Vec<(String, Vec<KeyValue>)>, StoreError> {
        self.read(Trees::dump_comparable_trees)
    }

    /// Every (key, value) of each journal-derived tree, by tree name.
    pub fn dump_journal_trees(&self) -> Result<Vec<(String, Vec<KeyValue>)>, StoreError> {
        self.read(Trees::dump_journal_trees)
    }

    /// Every blob any repository links or names as a manifest, with the repository.
    pub fn referenced_blobs(&self) -> Result<Vec<(RepoName, Digest)>, StoreError> {
        self.read(Trees::referenced_blobs)
    }
}
