//! Online garbage collection: mark what is live, sweep the blob files nothing needs, while
//! pushes and pulls go on.
//!
//! **Mark.** Live are the manifests the current tag records name and the blobs those records
//! name; every manifest younger than the grace period (pushed by digest, or on its way to being
//! tagged); and, from those, everything they reach: an image's config and layers, an index's
//! child manifests, and the referrers (signatures, SBOMs) of any live manifest. Blob files
//! younger than the grace period are kept whatever names them (an upload whose manifest has not
//! come yet). Upload sessions and downloads in progress live in their own directories and are
//! never swept.
//!
//! **Sweep.** Each dead blob file is swept in two steps: the index entries that name it (links,
//! manifest entries) are removed through the journal, then the file is deleted. A crash between
//! the two leaves an orphan file, which the next collection removes; never an entry naming a
//! missing file.
//!
//! **Races.** A blob just installed is kept until a commit links it (or for a minute), whatever
//! the grace period: an upload's last two steps install the blob and then link it. Every commit
//! and every install holds the store's collection guard shared; a collection holds it exclusively
//! only to start (so that every commit before it is applied, and every one after it noted). A
//! commit or install during a collection notes the blobs it names as *touched*, and the sweep
//! skips them; a commit that needs a blob already swept is refused with [`StoreError::BlobGone`]
//! (its request fails cleanly and the client pushes the blob again); installing the blob anew
//! makes it welcome again once the batch's removals are written (until then a commit that
//! needs it is refused too, so that its link can never be written before them and be undone),
//! and a file is deleted only if no install has. The sweep decides each small batch under the
//! state's mutex, the same one a commit's admission and an install take, so each commit is
//! decided either before a batch (its blobs are touched and kept) or after it (a swept blob it
//! needs is refused): the sweep never makes a push wait for its journal write other than by
//! sharing the journal's group commit.
//! Installing a blob that is already there, and linking one, refreshes its file's time, so the
//! grace period protects it from the next collections too. So a blob uploaded or linked after
//! the mark survives, and nothing acknowledged names a missing file.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, SystemTime};

use shoal_protocol::{Algorithm, Digest, RepoName, Tag};

use super::change::{Batch, Change};
use super::index::Index;
use super::{Layout, Store, StoreError};

/// Blobs swept per journal write: small, so that a push's commit grouped with one waits little.
const SWEEP_BATCH: usize = 64;
/// Longest rest between two sweep batches (see [`run`]).
const SWEEP_REST_MAX: Duration = Duration::from_millis(200);
/// Most blobs a collection notes as touched; at that many it stops sweeping (a store that
/// busy is collected next time).
const MAX_TOUCHED: usize = 1 << 20;
/// How long a download that nothing continues is kept (its directory untouched that long, and no
/// download of it in progress) before a collection removes it, unless the config's `[gc]`
/// table says otherwise ([`GcOptions::abandoned_after`]).
pub const ABANDONED_DOWNLOAD_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long a blob just installed is kept, whatever the grace period, until a commit links it
/// or adds it as a manifest (an upload's last step installs the blob, the next links it).
const INSTALL_HOLD: Duration = Duration::from_secs(60);

/// How a collection runs.
#[derive(Debug, Clone, Copy)]
pub struct GcOptions {
    /// Blob files and manifests younger than this are live.
    pub grace: Duration,
    /// List what would go; change nothing.
    pub dry_run: bool,
    /// A partial download untouched this long, and not in progress, is removed
    /// ([`ABANDONED_DOWNLOAD_TTL`] unless configured).
    pub abandoned_after: Duration,
}

impl GcOptions {
    /// A collection that keeps what is younger than `grace`, with the default time for
    /// abandoned downloads.
    pub const fn new(grace: Duration) -> GcOptions {
        GcOptions {
            grace,
            dry_run: false,
            abandoned_after: ABANDONED_DOWNLOAD_TTL,
        }
    }

    /// The same collection, listing what would go and changing nothing.
    pub const fn dry(self) -> GcOptions {
        GcOptions {
            dry_run: true,
            ..self
        }
    }
}

/// What a collection did (or, dry, would do).
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct GcReport {
    /// Blob files found live by the mark.
    pub live: u64,
    /// Blob files looked at.
    pub blobs: u64,
    /// Dead blob files kept because they are younger than the grace period.
    pub young: u64,
    /// Dead blob files kept because a push or pull touched them during the collection.
    pub touched: u64,
    /// The blobs swept (or that would be), with their sizes.
    pub swept: Vec<(Digest, u64)>,
    /// Bytes freed (or that would be).
    pub bytes_freed: u64,
    /// Abandoned downloads removed (or that would be), see [`GcOptions::abandoned_after`].
    pub abandoned_downloads: u64,
    /// Their bytes.
    pub abandoned_download_bytes: u64,
    /// Milliseconds the mark took.
    pub mark_ms: u64,
    /// Milliseconds the sweep took.
    pub sweep_ms: u64,
    /// Milliseconds the collection held the guard exclusively (asking for it included): the
    /// longest it made a push's commit wait for the guard.
    #[serde(default)]
    pub hold_ms: u64,
    /// Milliseconds of the sweep's longest journal write: the longest a push's commit queued
    /// behind one waits for it.
    #[serde(default)]
    pub longest_write_ms: u64,
    /// Tags the fleet's retention policies expired (or would), see [`crate::lifecycle`].
    #[serde(default)]
    pub expired_tags: u64,
    /// Images they expired (or would): tagged images whose tags went, and untagged manifests
    /// deleted.
    #[serde(default)]
    pub expired_images: u64,
}

/// The store's collection state: held shared by commits and installs, exclusively by a sweep.
#[derive(Debug, Default)]
pub(super) struct Guard {
    lock: tokio::sync::RwLock<()>,
    state: std::sync::Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// A collection is running.
    running: bool,
    /// Blobs named by commits and installs while it runs.
    touched: HashSet<Digest>,
    /// Blobs the last collection swept and nothing has brought back; kept until the next one
    /// starts, so a commit checked before the sweep and made after it is still refused.
    gone: HashSet<Digest>,
    /// Blobs installed and not yet linked, with when (at most [`INSTALL_HOLD`] old).
    installed: HashMap<Digest, std::time::Instant>,
    /// Blobs a sweep has decided on whose removals are not written yet: a commit that needs one
    /// is refused even if it was installed again meanwhile, so that no link of it can be
    /// written before the removals and be undone by them.
    pending: HashSet<Digest>,
}

impl Guard {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Holds the guard shared, for a commit or an install.
    pub(super) async fn shared(&self) -> tokio::sync::RwLockReadGuard<'_, ()> {
        self.lock.read().await
    }

    /// Called with the guard held shared, before `changes` are committed: refuses them if they
    /// name a swept blob as present, and notes what they name while a collection runs.
    pub(super) fn admit(&self, changes: &[Change], requires: &[Digest]) -> Result<(), StoreError> {
        let mut state = self.state();
        let mut needs = changes.iter().flat_map(needed).chain(requires);
        if !state.gone.is_empty() || !state.pending.is_empty() {
            if let Some(d) = needs.find(|d| state.gone.contains(*d) || state.pending.contains(*d)) {
                return Err(StoreError::BlobGone(d.clone()));
            }
        }
        for d in changes.iter().filter_map(needed) {
            state.installed.remove(d);
        }
        if state.running && state.touched.len() < MAX_TOUCHED {
            let named = changes.iter().flat_map(named).chain(requires);
            for d in named {
                state.touched.insert(d.clone());
            }
        }
        Ok(())
    }

    /// Called with the guard held shared, as the blob `digest` is installed: it is welcome
    /// again, and kept by a collection that runs.
    pub(super) fn installing(&self, digest: &Digest) {
        let mut state = self.state();
        state.gone.remove(digest);
        if state.installed.len() < MAX_TOUCHED {
            state
                .installed
                .insert(digest.clone(), std::time::Instant::now());
        }
        if state.running && state.touched.len() < MAX_TOUCHED {
            state.touched.insert(digest.clone());
        }
    }
}

/// Blobs a change needs on disk: what it links, and a manifest it adds. (A manifest's blobs are
/// needed only where it was pushed, which says so with [`Batch::requiring`]: a manifest fetched
/// from the fleet is committed before its blobs arrive.)
fn needed(change: &Change) -> Option<&Digest> {
    match change {
        Change::Link { digest, .. } | Change::Manifest { digest, .. } => Some(digest),
        _ => None,
    }
}

/// Blobs a change names, which a collection running now keeps: what [`needed`] says, and a
/// manifest's blobs and children. (A record committed during a collection protects nothing: a
/// blob only it names and the sweep takes is fetched from the fleet again when it is pulled.)
fn named(change: &Change) -> impl Iterator<Item = &Digest> {
    let info = match change {
        Change::Manifest { info, .. } => Some(info),
        _ => None,
    };
    needed(change).into_iter().chain(
        info.into_iter()
            .flat_map(|i| i.blobs.iter().chain(i.manifests.iter())),
    )
}

/// Expiries per journal write when retention policies apply.
const EXPIRY_BATCH: usize = 256;

/// What a dry run's mark treats as gone: the tags and untagged manifests retention policies
/// would expire.
#[derive(Debug, Default)]
struct Expiring {
    tags: HashSet<(RepoName, Tag)>,
    manifests: HashSet<(RepoName, Digest)>,
}

impl Store {
    /// Applies the fleet's retention policies, then collects garbage, so what they expire is
    /// swept at once. The policies are evaluated before the mark (see
    /// [`crate::lifecycle::plan`]); each expired tag is journaled as a
    /// [`Change::Expired`], each expired untagged manifest deleted. A dry run expires nothing
    /// and marks as if it had. If cancelled after the expiries are committed, they stand and
    /// the next collection sweeps what they freed.
    pub async fn gc_with_retention(
        &self,
        options: GcOptions,
        retention: &crate::lifecycle::Retention,
    ) -> Result<GcReport, StoreError> {
        let (index, layout, retention) = (
            self.inner.index.clone(),
            self.inner.layout.clone(),
            retention.clone(),
        );
        let now_ms = retention.now_ms();
        let plan = tokio::task::spawn_blocking(move || {
            crate::lifecycle::plan(&index, &layout, &retention, now_ms, options.grace)
        })
        .await??;
        let (expired_tags, expired_images) = (
            plan.records.len() as u64,
            plan.tagged_images + plan.untagged.len() as u64,
        );
        let mut expiring = Expiring::default();
        if options.dry_run {
            expiring.tags = plan.tags();
            expiring.manifests = plan.untagged.into_iter().collect();
        } else {
            let changes = plan
                .records
                .into_iter()
                .map(|record| Change::Expired { record })
                .chain(
                    plan.untagged
                        .into_iter()
                        .map(|(repo, digest)| Change::DeleteManifest { repo, digest }),
                )
                .collect::<Vec<_>>();
            for chunk in changes.chunks(EXPIRY_BATCH) {
                self.commit(chunk.iter().cloned().collect()).await?;
            }
            if expired_images > 0 {
                tracing::info!(
                    tags = expired_tags,
                    images = expired_images,
                    "retention policies expired images"
                );
            }
        }
        let mut report = collect_with(self, options, expiring).await?;
        report.expired_tags = expired_tags;
        report.expired_images = expired_images;
        Ok(report)
    }
}

/// What [`Store::expire_abandoned`] removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Expired {
    /// Upload sessions idle for their time or longer.
    pub uploads: usize,
    /// Downloads nothing continued for their time.
    pub downloads: u64,
    /// Their bytes.
    pub download_bytes: u64,
}

impl Store {
    /// Removes the upload sessions idle for `upload_ttl` or longer (they answer
    /// `404 BLOB_UPLOAD_UNKNOWN` from then on) and the downloads nothing has continued for
    /// `download_ttl`, never one that a fetch, a peer or a client holds. What a collection
    /// does for downloads, without one: a node runs it on its own, so that an idle node's disk
    /// does not keep what its clients gave up. If cancelled, what went stays gone.
    pub async fn expire_abandoned(
        &self,
        upload_ttl: Duration,
        download_ttl: Duration,
    ) -> Result<Expired, StoreError> {
        let uploads = self.expire_upload_sessions(upload_ttl).await?.removed;
        let this = self.clone();
        let (downloads, download_bytes) =
            tokio::task::spawn_blocking(move || this.expire_downloads(download_ttl, false))
                .await??;
        Ok(Expired {
            uploads,
            downloads,
            download_bytes,
        })
    }
}

/// Runs one collection.
pub(super) async fn collect(store: &Store, options: GcOptions) -> Result<GcReport, StoreError> {
    collect_with(store, options, Expiring::default()).await
}

async fn collect_with(
    store: &Store,
    options: GcOptions,
    expiring: Expiring,
) -> Result<GcReport, StoreError> {
    if options.dry_run {
        // Reads only: it leaves the state of the collections that change things alone.
        return run(store, options, expiring).await;
    }
    let sweeping = begin(store).await?;
    let result = run(store, options, expiring).await;
    let held = sweeping.held;
    drop(sweeping);
    result.map(|mut report| {
        report.hold_ms = held.as_millis() as u64;
        report
    })
}

/// A run that sweeps, started by [`begin`]; it ends when dropped, also when the future that
/// held it is cancelled (a client that hung up on `POST /_shoal/v1/gc`), so that the next
/// collection or eviction is not refused as busy for ever.
pub(super) struct Sweeping {
    store: Store,
    /// How long [`begin`] held the guard exclusively, asking for it included.
    pub(super) held: Duration,
}

impl Drop for Sweeping {
    fn drop(&mut self) {
        self.store.inner.gc.state().running = false;
    }
}

/// Starts a run that sweeps (a collection, or an eviction by the disk quota): from now on every
/// commit and install is noted as touched, until the returned [`Sweeping`] is dropped.
pub(super) async fn begin(store: &Store) -> Result<Sweeping, StoreError> {
    let guard = &store.inner.gc;
    let asked = std::time::Instant::now();
    // Exclusive for a moment: every commit before this is applied, every one after it is noted.
    let _all = guard.lock.write().await;
    let mut state = guard.state();
    if state.running {
        return Err(StoreError::Busy(
            "a garbage collection or an eviction is already running",
        ));
    }
    state.running = true;
    state.touched.clear();
    state.gone.clear();
    state.installed.retain(|_, at| at.elapsed() < INSTALL_HOLD);
    Ok(Sweeping {
        store: store.clone(),
        held: asked.elapsed(),
    })
}

async fn run(
    store: &Store,
    options: GcOptions,
    expiring: Expiring,
) -> Result<GcReport, StoreError> {
    let started = std::time::Instant::now();
    let (index, layout) = (store.inner.index.clone(), store.inner.layout.clone());
    let grace = options.grace;
    let (live, mut report, dead) = tokio::task::spawn_blocking(move || {
        let now = SystemTime::now();
        let live = mark(&index, &layout, now, grace, &expiring)?;
        let mut report = GcReport::default();
        let mut dead = Vec::new();
        visit_blob_files(&layout.blobs(), |digest, path| {
            report.blobs += 1;
            if live.contains(&digest) {
                report.live += 1;
                return Ok(());
            }
            let meta = match std::fs::metadata(path) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            if is_young(meta.modified().ok(), now, grace) {
                report.young += 1;
            } else {
                dead.push((digest, meta.len()));
            }
            Ok(())
        })?;
        Ok::<_, StoreError>((live, report, dead))
    })
    .await??;
    drop(live);
    report.mark_ms = started.elapsed().as_millis() as u64;
    let sweep_started = std::time::Instant::now();
    if options.dry_run {
        report.bytes_freed = dead.iter().map(|(_, size)| size).sum();
        report.swept = dead;
    } else {
        let mut last = Duration::ZERO;
        for batch in dead.chunks(SWEEP_BATCH) {
            // The collection is background work: it leaves the disk and the CPU to requests
            // for as long as the last batch took, so it takes at most about half of either.
            tokio::time::sleep(last.min(SWEEP_REST_MAX)).await;
            let started = std::time::Instant::now();
            if !sweep(store, batch, &mut report, false).await? {
                break;
            }
            last = started.elapsed();
        }
    }
    abandoned_downloads(store, options, &mut report).await?;
    report.sweep_ms = sweep_started.elapsed().as_millis() as u64;
    Ok(report)
}

/// Removes the downloads in `partial/` that nothing has continued for
/// [`GcOptions::abandoned_after`] and that no download in progress holds.
async fn abandoned_downloads(
    store: &Store,
    options: GcOptions,
    report: &mut GcReport,
) -> Result<(), StoreError> {
    let (dry_run, ttl) = (options.dry_run, options.abandoned_after);
    let this = store.clone();
    let (count, bytes) =
        tokio::task::spawn_blocking(move || this.expire_downloads(ttl, dry_run)).await??;
    report.abandoned_downloads = count;
    report.abandoned_download_bytes = bytes;
    Ok(())
}

/// Sweeps one batch of dead blobs: drops the blobs a push touched meanwhile and marks the rest
/// gone, in one hold of the state's mutex (see the module's *Races*), then commits the removal
/// of the entries that name them (one journal write), then deletes the files, each unless an
/// install brought it back. Needs a run started with [`begin`]. `Ok(false)`: the run noted so
/// many touched blobs that it can no longer tell what commits name ([`MAX_TOUCHED`]); nothing
/// was swept, and the caller stops (the next run sweeps the rest).
pub(super) async fn sweep(
    store: &Store,
    batch: &[(Digest, u64)],
    report: &mut GcReport,
    evicting: bool,
) -> Result<bool, StoreError> {
    let (index, candidates) = (store.inner.index.clone(), batch.to_vec());
    // What names each candidate, read before the exclusive hold: anything named since is touched.
    let named = tokio::task::spawn_blocking(move || {
        candidates
            .into_iter()
            .map(|(d, size)| Ok((removals(&index, &d, evicting)?, d, size)))
            .collect::<Result<Vec<_>, StoreError>>()
    })
    .await??;
    let mut changes = Vec::new();
    let doomed = {
        // A commit admitted before this names its blobs as touched; one admitted after finds
        // them gone. The commits of neither wait for the removals' journal write.
        let mut state = store.inner.gc.state();
        debug_assert!(state.running, "a sweep outside a run started with begin");
        if state.touched.len() >= MAX_TOUCHED {
            report.touched += named.len() as u64;
            return Ok(false);
        }
        let mut doomed = Vec::new();
        for (entries, d, size) in named {
            if state.touched.contains(&d) || state.installed.contains_key(&d) {
                report.touched += 1;
                continue;
            }
            state.gone.insert(d.clone());
            state.pending.insert(d.clone());
            changes.extend(entries);
            doomed.push((d, size));
        }
        doomed
    };
    let written = Pending {
        guard: &store.inner.gc,
        digests: doomed.iter().map(|(d, _)| d).collect(),
    };
    // The entries go first: a crash after this leaves orphan files, never entries naming
    // missing ones. Until they are written the blobs are pending: a commit that needs one is
    // refused, so a link of a blob installed again meanwhile is written after the removals.
    if !changes.is_empty() {
        let started = std::time::Instant::now();
        store.inner.journal.commit(changes).await?;
        report.longest_write_ms = report
            .longest_write_ms
            .max(started.elapsed().as_millis() as u64);
    }
    drop(written);
    if doomed.is_empty() {
        return Ok(true);
    }
    let this = store.clone();
    let freed = tokio::task::spawn_blocking(move || -> Result<_, StoreError> {
        let _open = this.inner.gate.enter()?;
        let mut freed = Vec::new();
        for (digest, size) in doomed {
            {
                // An install of the blob since the hold took it off `gone`: its file stays.
                let state = this.inner.gc.state();
                if !state.gone.contains(&digest) {
                    continue;
                }
                match std::fs::remove_file(this.inner.layout.blob(&digest)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e.into()),
                }
            }
            this.inner.index.remove_blob_index(&digest)?;
            freed.push((digest, size));
        }
        Ok(freed)
    })
    .await??;
    report.bytes_freed += freed.iter().map(|(_, size)| size).sum::<u64>();
    report.swept.extend(freed);
    Ok(true)
}

/// Takes a sweep batch's blobs off [`State::pending`] when its removals are written, failed or
/// were cancelled.
struct Pending<'a> {
    guard: &'a Guard,
    digests: Vec<&'a Digest>,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        let mut state = self.guard.state();
        for d in &self.digests {
            state.pending.remove(*d);
        }
    }
}

/// The index entries that name `digest`: links and manifest entries, in every repository.
/// `evicting` (the disk quota) keeps what records say of the blob, so it is fetched again.
fn removals(index: &Index, digest: &Digest, evicting: bool) -> Result<Vec<Change>, StoreError> {
    let mut batch = Batch::new();
    for repo in index.repos_of_blob(digest)? {
        if index.is_linked(&repo, digest)? {
            batch = if evicting {
                batch.evict(&repo, digest)
            } else {
                batch.unlink(&repo, digest)
            };
        }
        if index.manifest(&repo, digest)?.is_some() {
            batch = batch.delete_manifest(&repo, digest);
        }
    }
    Ok(batch.into_changes())
}

/// Whether a file modified at `modified` is younger than `grace` at `now` (a file with no or a
/// future time is young: never sweep what cannot be dated).
pub(super) fn is_young(modified: Option<SystemTime>, now: SystemTime, grace: Duration) -> bool {
    match modified {
        Some(m) => match now.duration_since(m) {
            Ok(age) => age < grace,
            Err(_) => true,
        },
        None => true,
    }
}

/// Every blob the index says is live at `now`, but for what `expiring` says is gone.
fn mark(
    index: &Index,
    layout: &Layout,
    now: SystemTime,
    grace: Duration,
    expiring: &Expiring,
) -> Result<HashSet<Digest>, StoreError> {
    // Manifest entries by (repo, digest), and referrers by (repo, subject).
    let mut manifests: HashMap<(RepoName, Digest), (Vec<Digest>, Vec<Digest>)> = HashMap::new();
    let mut referrers: HashMap<(RepoName, Digest), Vec<Digest>> = HashMap::new();
    let mut roots: Vec<(RepoName, Digest)> = Vec::new();
    index.visit_manifests(None, |repo, digest, info| {
        if let Some(subject) = &info.subject {
            referrers
                .entry((repo.clone(), subject.clone()))
                .or_default()
                .push(digest.clone());
        }
        let modified = std::fs::metadata(layout.blob(&digest))
            .and_then(|m| m.modified())
            .ok();
        let key = (repo, digest);
        if is_young(modified, now, grace) && !expiring.manifests.contains(&key) {
            roots.push(key.clone());
        }
        let (repo, digest) = key;
        manifests.insert((repo, digest), (info.blobs, info.manifests));
    })?;
    // Pins are roots too (a pin by digest keeps an untagged manifest).
    roots.extend(super::pins::roots(layout.root(), index)?);
    let mut live: HashSet<Digest> = HashSet::new();
    let _all = index.visit_records(None, |signed| {
        // Records are verified before they are stored.
        if let Ok(verified) = signed.verify() {
            let record = verified.record();
            let expired = || {
                !expiring.tags.is_empty()
                    && expiring
                        .tags
                        .contains(&(record.repo.clone(), record.tag.clone()))
            };
            if let Some(target) = &record.target
                && !expired()
            {
                roots.push((record.repo.clone(), target.manifest.clone()));
                live.extend(target.blobs.iter().map(|b| b.digest.clone()));
            }
        }
        std::ops::ControlFlow::Continue(())
    })?;
    let mut seen: HashSet<(RepoName, Digest)> = HashSet::new();
    while let Some((repo, digest)) = roots.pop() {
        if !seen.insert((repo.clone(), digest.clone())) {
            continue;
        }
        live.insert(digest.clone());
        let key = (repo, digest);
        if let Some((blobs, children)) = manifests.get(&key) {
            live.extend(blobs.iter().cloned());
            roots.extend(children.iter().map(|c| (key.0.clone(), c.clone())));
        }
        if let Some(refs) = referrers.get(&key) {
            roots.extend(refs.iter().map(|r| (key.0.clone(), r.clone())));
        }
    }
    Ok(live)
}

/// Hands every file under `blobs/<alg>/<2 hex>/<hex>` whose name is a digest to `f`, until it
/// fails.
pub(super) fn visit_blob_files(
    root: &Path,
    mut f: impl FnMut(Digest, &Path) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    for alg in [Algorithm::Sha256, Algorithm::Sha512] {
        let dir = root.join(alg.as_str());
        let Ok(shards) = std::fs::read_dir(&dir) else {
            continue;
        };
        for shard in shards {
            let shard = shard?.path();
            if !shard.is_dir() {
                continue;
            }
            for file in std::fs::read_dir(&shard)? {
                let path = file?.path();
                let Some(hex) = path.file_name().and_then(|n| n.to_str()) else {
                    continue;
                };
                if let Ok(digest) = format!("{}:{hex}", alg.as_str()).parse::<Digest>() {
                    f(digest, &path)?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stores a blob of eight bytes made of `n`, and returns its digest.
    async fn put(store: &Store, n: u64) -> Digest {
        let digest = Digest::sha256(&n.to_be_bytes());
        let mut writer = store.blob_writer(Algorithm::Sha256, Some(8)).await.unwrap();
        writer.write(&n.to_be_bytes()).await.unwrap();
        writer.finish(&digest).await.unwrap();
        digest
    }

    #[tokio::test]
    async fn a_commit_before_a_sweep_batch_keeps_its_blob_and_one_after_it_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_in_test(dir.path()).await;
        let (r, other): (RepoName, RepoName) = ("r".parse().unwrap(), "o".parse().unwrap());
        let (kept, swept) = (put(&store, 1).await, put(&store, 2).await);
        store
            .commit(Batch::new().link(&r, &kept).link(&r, &swept))
            .await
            .unwrap();
        let sweeping = begin(&store).await.unwrap();
        // Decided before the batch: the sweep finds the blob touched.
        store
            .commit(Batch::new().link(&other, &kept))
            .await
            .unwrap();
        let mut report = GcReport::default();
        let batch = [(kept.clone(), 8), (swept.clone(), 8)];
        assert!(sweep(&store, &batch, &mut report, false).await.unwrap());
        drop(sweeping);
        assert_eq!(report.touched, 1);
        assert_eq!(report.swept, vec![(swept.clone(), 8)]);
        assert!(store.layout().blob(&kept).exists());
        assert!(!store.layout().blob(&swept).exists());
        // Decided after it: refused, and nothing names the missing file.
        let refused = store.commit(Batch::new().link(&other, &swept)).await;
        assert!(
            matches!(refused, Err(StoreError::BlobGone(ref d)) if *d == swept),
            "{refused:?}"
        );
        let (o, s) = (other.clone(), swept.clone());
        let linked = store.read(move |i| i.is_linked(&o, &s)).await.unwrap();
        assert!(!linked);
        store.close().await;
    }

    #[tokio::test]
    async fn a_blob_installed_again_links_only_after_the_sweeps_removals_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_in_test(dir.path()).await;
        let r: RepoName = "r".parse().unwrap();
        let blob = put(&store, 3).await;
        // A sweep decided on the blob and has not written its removals yet.
        store.inner.gc.state().pending.insert(blob.clone());
        // Uploaded again meanwhile: welcome, but its link waits for the removals.
        put(&store, 3).await;
        let refused = store.commit(Batch::new().link(&r, &blob)).await;
        assert!(
            matches!(refused, Err(StoreError::BlobGone(_))),
            "{refused:?}"
        );
        store.inner.gc.state().pending.clear();
        store.commit(Batch::new().link(&r, &blob)).await.unwrap();
        store.close().await;
    }

    #[tokio::test]
    async fn a_run_ends_when_it_is_dropped_even_cancelled() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_in_test(dir.path()).await;
        let sweeping = begin(&store).await.unwrap();
        assert!(matches!(begin(&store).await, Err(StoreError::Busy(_))));
        drop(sweeping);
        // A run whose task is cancelled part-way (a client that hung up on a collection).
        let s = store.clone();
        let task = tokio::spawn(async move {
            let _run = begin(&s).await.unwrap();
            std::future::pending::<()>().await
        });
        while !store.inner.gc.state().running {
            tokio::task::yield_now().await;
        }
        assert!(matches!(begin(&store).await, Err(StoreError::Busy(_))));
        task.abort();
        assert!(task.await.unwrap_err().is_cancelled());
        let again = begin(&store).await;
        assert!(again.is_ok(), "a cancelled run left the store busy");
        drop(again);
        store.close().await;
    }

    #[test]
    fn a_file_is_young_within_the_grace_period_or_when_it_cannot_be_dated() {
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        assert!(is_young(Some(now), now, hour));
        assert!(is_young(Some(now - hour / 2), now, hour));
        assert!(!is_young(Some(now - hour * 2), now, hour));
        assert!(is_young(Some(now + hour), now, hour));
        assert!(is_young(None, now, hour));
        assert!(!is_young(
            Some(now - Duration::from_secs(1)),
            now,
            Duration::ZERO
        ));
    }
}
