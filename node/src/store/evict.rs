//! What the disk quota may evict, and the eviction itself (the decisions are `crate::quota`'s).
//!
//! **Classes.** Every blob file is, from the current tag records, the manifests and the pins:
//! - *published*: reachable from a current record this node signed (a client pushed it here).
//!   Never evicted: the fleet may have no other copy.
//! - *pinned*: reachable from a pinned image (a pin made with `shoal pin`, or a config rule
//!   matching the repository), with the copies asked for. Evicted only as the quota's rule says.
//! - *cached*: reachable from a current record of another publisher only: it came from the
//!   fleet and can come back from it. Evicted least recently used first.
//! - *unreferenced*: nothing names it (an upload whose manifest has not come, garbage): left to
//!   garbage collection, which has a grace period for it.
//!
//! The classes are derived at each round from the index (itself rebuilt from the journal) and
//! the pins file, so nothing here needs a copy of its own.
//!
//! **Last use.** The store notes when each blob was last opened for reading (served to a client
//! or a peer) or installed, in memory; [`Store::save_uses`] writes it to `last-use.v1.json` (at
//! each quota round), and a blob with no note is as old as its file's time. Losing the file
//! only loses precision.
//!
//! **Eviction** is garbage collection's sweep run on the chosen blobs ([`super::gc`]): under
//! the same guard, so a push or fetch that links or installs a blob meanwhile keeps it, and a
//! commit that needs a blob just evicted is refused cleanly. It removes the blob's file, its
//! links ([`super::Change::Evict`], which keeps what records say of the blob, unlike an unlink)
//! and manifest entries, never a tag record: the tag still resolves, and the next pull fetches
//! the content from the fleet again. A blob open for reading (a client or peer being
//! served) is skipped.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::sync::{Arc, Mutex, Weak};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use shoal_protocol::fleet::RepoPattern;
use shoal_protocol::{Digest, PublisherKey, Reference, RepoName};

use super::gc::{GcReport, visit_blob_files};
use super::index::Index;
use super::pins::Pin;
use super::{Store, StoreError};

/// The file that keeps last uses across restarts, in the data directory.
pub const USES_FILE: &str = "last-use.v1.json";
/// The most blobs whose last use is remembered (one entry per blob file; past it, a blob's file
/// time stands for its last use).
const MAX_USES: usize = 1 << 20;
/// The most blobs watched while open: past it, the dead entries are dropped first.
const MAX_OPEN: usize = 1 << 16;

/// When blobs were last used, and which are open for reading now.
#[derive(Debug, Default)]
pub(super) struct Uses {
    /// Seconds since the Unix epoch, by blob.
    last: Mutex<HashMap<Digest, u64>>,
    /// The files handed out by [`Store::open_blob`], while someone holds them.
    open: Mutex<HashMap<Digest, Weak<File>>>,
    /// Woken when a blob is installed.
    installs: tokio::sync::Notify,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Uses {
    /// Loads the last uses saved in `root` (none if absent or unreadable). Blocking.
    pub(super) fn load(root: &std::path::Path) -> Uses {
        let last = std::fs::read(root.join(USES_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice::<HashMap<Digest, u64>>(&b).ok())
            .unwrap_or_default();
        Uses {
            last: Mutex::new(last),
            open: Mutex::default(),
            installs: tokio::sync::Notify::new(),
        }
    }

    /// The blob `digest` was used now.
    pub(super) fn touch(&self, digest: &Digest) {
        let mut last = lock(&self.last);
        if last.len() < MAX_USES || last.contains_key(digest) {
            last.insert(digest.clone(), now_secs());
        }
    }

    /// The blob `digest` was installed: used now, and the quota may look again.
    pub(super) fn installed(&self, digest: &Digest) {
        self.touch(digest);
        self.installs.notify_one();
    }

    /// The blob `digest` was opened as `file`: used now, and in use while `file` lives.
    pub(super) fn opened(&self, digest: &Digest, file: &Arc<File>) {
        self.touch(digest);
        let mut open = lock(&self.open);
        if open.len() >= MAX_OPEN {
            open.retain(|_, f| f.strong_count() > 0);
        }
        if open.len() < MAX_OPEN {
            open.insert(digest.clone(), Arc::downgrade(file));
        }
    }

    /// Whether the blob is open for reading now.
    pub(super) fn in_use(&self, digest: &Digest) -> bool {
        lock(&self.open)
            .get(digest)
            .is_some_and(|f| f.strong_count() > 0)
    }

    fn last(&self, digest: &Digest) -> Option<u64> {
        lock(&self.last).get(digest).copied()
    }

    fn forget(&self, digest: &Digest) {
        lock(&self.last).remove(digest);
    }
}

/// A pin rule of the node's config: every image of the repositories `pattern` covers.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PinRule {
    /// Repositories, `prod/*` or an exact name.
    pub pattern: RepoPattern,
    /// Copies the fleet should keep.
    pub copies: u32,
}

/// What a blob file is to the quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Class {
    /// Pushed here: never evicted.
    Published,
    /// Part of a pinned image, with the most copies any of its pins asks for.
    Pinned(u32),
    /// Came from the fleet.
    Cached,
    /// Nothing names it: garbage collection's.
    Unreferenced,
}

/// One blob file, as the quota sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The blob.
    pub digest: Digest,
    /// Its size.
    pub size: u64,
    /// Its class.
    pub class: Class,
    /// When it was last used, in seconds since the Unix epoch (its file's time if unknown).
    pub last_use: u64,
    /// Open for reading now.
    pub in_use: bool,
}

/// What an eviction did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvictReport {
    /// The blobs evicted, with their sizes.
    pub evicted: Vec<(Digest, u64)>,
    /// Bytes freed.
    pub bytes_freed: u64,
    /// Chosen blobs kept because a push, fetch or reader needed them meanwhile.
    pub kept: u64,
}

/// What the manifests of the index reach: (repo, digest) -> (blobs, children), and referrers.
struct Graph {
    manifests: HashMap<(RepoName, Digest), (Vec<Digest>, Vec<Digest>)>,
    referrers: HashMap<(RepoName, Digest), Vec<Digest>>,
}

impl Graph {
    fn load(index: &Index) -> Result<Graph, StoreError> {
        let mut g = Graph {
            manifests: HashMap::new(),
            referrers: HashMap::new(),
        };
        index.visit_manifests(None, |repo, digest, info| {
            if let Some(subject) = &info.subject {
                g.referrers
                    .entry((repo.clone(), subject.clone()))
                    .or_default()
                    .push(digest.clone());
            }
            g.manifests
                .insert((repo, digest), (info.blobs, info.manifests));
        })?;
        Ok(g)
    }

    /// Every blob reachable from `roots`, added to `into`.
    fn reach(&self, mut roots: Vec<(RepoName, Digest)>, into: &mut HashSet<Digest>) {
        let mut seen: HashSet<(RepoName, Digest)> = HashSet::new();
        while let Some((repo, digest)) = roots.pop() {
            if !seen.insert((repo.clone(), digest.clone())) {
                continue;
            }
            into.insert(digest.clone());
            let key = (repo, digest);
            if let Some((blobs, children)) = self.manifests.get(&key) {
                into.extend(blobs.iter().cloned());
                roots.extend(children.iter().map(|c| (key.0.clone(), c.clone())));
            }
            if let Some(refs) = self.referrers.get(&key) {
                roots.extend(refs.iter().map(|r| (key.0.clone(), r.clone())));
            }
        }
    }
}

/// Classifies every blob file. Blocking.
fn classify(
    index: &Index,
    layout: &super::Layout,
    uses: &Uses,
    own: &PublisherKey,
    rules: &[PinRule],
) -> Result<Vec<Entry>, StoreError> {
    let graph = Graph::load(index)?;
    let pins = super::pins::read(layout.root())?;
    let (mut published, mut referenced) = (HashSet::new(), HashSet::new());
    let mut own_roots = Vec::new();
    let mut all_roots = Vec::new();
    // Pinned roots, each with its copies and the blobs its record names (which stay pinned
    // when the manifest itself was evicted and the index no longer says what it reaches).
    let mut pinned_roots: Vec<((RepoName, Digest), u32, Vec<Digest>)> = Vec::new();
    let _all = index.visit_records(None, |signed| {
        let Ok(verified) = signed.verify() else {
            return std::ops::ControlFlow::Continue(());
        };
        let record = verified.record();
        let Some(target) = &record.target else {
            return std::ops::ControlFlow::Continue(());
        };
        let root = (record.repo.clone(), target.manifest.clone());
        let blobs: Vec<Digest> = target.blobs.iter().map(|b| b.digest.clone()).collect();
        if record.publisher == *own {
            own_roots.push(root.clone());
            published.extend(blobs.iter().cloned());
        }
        referenced.extend(blobs.iter().cloned());
        let copies = copies_for(&pins, rules, &record.repo, &record.tag, &target.manifest);
        if let Some(k) = copies {
            pinned_roots.push((root.clone(), k, blobs));
        }
        all_roots.push(root);
        std::ops::ControlFlow::Continue(())
    })?;
    // Pins by digest name manifests no record may name.
    for pin in &pins {
        if let Reference::Digest(d) = &pin.reference {
            pinned_roots.push(((pin.repo.clone(), d.clone()), pin.copies, Vec::new()));
        }
    }
    graph.reach(own_roots, &mut published);
    graph.reach(all_roots, &mut referenced);
    let mut pinned: HashMap<Digest, u32> = HashMap::new();
    for (root, k, named) in pinned_roots {
        let mut reached: HashSet<Digest> = named.into_iter().collect();
        graph.reach(vec![root], &mut reached);
        for d in reached {
            let e = pinned.entry(d).or_insert(k);
            *e = (*e).max(k);
        }
    }
    let mut entries = Vec::new();
    visit_blob_files(&layout.blobs(), |digest, path| {
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let class = if published.contains(&digest) {
            Class::Published
        } else if let Some(k) = pinned.get(&digest) {
            Class::Pinned(*k)
        } else if referenced.contains(&digest) {
            Class::Cached
        } else {
            Class::Unreferenced
        };
        let file_time = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        entries.push(Entry {
            last_use: uses.last(&digest).unwrap_or(file_time),
            in_use: uses.in_use(&digest),
            size: meta.len(),
            class,
            digest,
        });
        Ok(())
    })?;
    Ok(entries)
}

/// The copies a pin asks of the image `repo:tag` (naming `manifest`), the most if several do.
fn copies_for(
    pins: &[Pin],
    rules: &[PinRule],
    repo: &RepoName,
    tag: &shoal_protocol::Tag,
    manifest: &Digest,
) -> Option<u32> {
    let by_pin = pins
        .iter()
        .filter(|p| &p.repo == repo)
        .filter(|p| match &p.reference {
            Reference::Tag(t) => t == tag,
            Reference::Digest(d) => d == manifest,
        });
    let by_rule = rules.iter().filter(|r| r.pattern.matches(repo));
    by_pin
        .map(|p| p.copies)
        .chain(by_rule.map(|r| r.copies))
        .max()
}

impl Store {
    /// Every blob file, classified for the disk quota (see the module doc): `own` is this
    /// node's publisher key, `rules` the config's pin rules.
    pub async fn quota_entries(
        &self,
        own: PublisherKey,
        rules: Vec<PinRule>,
    ) -> Result<Vec<Entry>, StoreError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            classify(
                &this.inner.index,
                &this.inner.layout,
                &this.inner.uses,
                &own,
                &rules,
            )
        })
        .await?
    }

    /// Evicts the blobs `victims` (digest and size), keeping any that a push, fetch or reader
    /// needs meanwhile. Runs as garbage collection's sweep, under its guard: refused with
    /// [`StoreError::Busy`] while a collection runs. Victims chosen before the call may have
    /// been linked since: choose them within [`Store::begin_eviction`] instead.
    pub async fn evict(&self, victims: Vec<(Digest, u64)>) -> Result<EvictReport, StoreError> {
        self.begin_eviction().await?.evict(victims).await
    }

    /// Starts an eviction round: from now on every commit and install is noted, and the blobs
    /// they name are kept by [`Eviction::evict`], so that victims chosen after this call (from
    /// [`Store::quota_entries`], say) cannot take a blob a push links meanwhile. Refused with
    /// [`StoreError::Busy`] while a collection runs; the round ends when dropped.
    pub async fn begin_eviction(&self) -> Result<Eviction, StoreError> {
        Ok(Eviction {
            _sweeping: super::gc::begin(self).await?,
            store: self.clone(),
        })
    }

    async fn evict_now(&self, victims: Vec<(Digest, u64)>) -> Result<EvictReport, StoreError> {
        let mut report = GcReport::default();
        let mut kept = 0;
        let (free, busy): (Vec<_>, Vec<_>) = victims
            .into_iter()
            .partition(|(d, _)| !self.inner.uses.in_use(d));
        kept += busy.len() as u64;
        for batch in free.chunks(64) {
            if !super::gc::sweep(self, batch, &mut report, true).await? {
                break;
            }
        }
        for (d, _) in &report.swept {
            self.inner.uses.forget(d);
        }
        Ok(EvictReport {
            kept: kept + report.touched,
            bytes_freed: report.bytes_freed,
            evicted: report.swept,
        })
    }

    /// Returns once a blob is installed (one that was installed since the last call counts).
    pub async fn installed(&self) {
        self.inner.uses.installs.notified().await;
    }

    /// Writes the last uses to `last-use.v1.json` (whole, renamed into place).
    pub async fn save_uses(&self) -> Result<(), StoreError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let _open = this.inner.gate.enter()?;
            let bytes = serde_json::to_vec(&*lock(&this.inner.uses.last))
                .map_err(StoreError::encode("last uses"))?;
            let root = this.inner.layout.root();
            let tmp = this.inner.layout.tmp().join(format!("{USES_FILE}.new"));
            std::fs::write(&tmp, bytes)?;
            std::fs::rename(&tmp, root.join(USES_FILE))?;
            Ok(())
        })
        .await?
    }
}

/// An eviction round (see [`Store::begin_eviction`]).
pub struct Eviction {
    _sweeping: super::gc::Sweeping,
    store: Store,
}

impl Eviction {
    /// Evicts the blobs `victims` (digest and size), keeping any that a push, fetch or reader
    /// needs, or that a commit or install named since the round began; ends the round.
    pub async fn evict(self, victims: Vec<(Digest, u64)>) -> Result<EvictReport, StoreError> {
        self.store.evict_now(victims).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_open_blob_is_in_use_until_its_last_reader_drops_it() {
        let uses = Uses::default();
        let d = Digest::of(shoal_protocol::Algorithm::Sha256, b"x");
        let dir = tempfile::tempdir().unwrap();
        let f = Arc::new(File::create(dir.path().join("f")).unwrap());
        assert!(!uses.in_use(&d));
        uses.opened(&d, &f);
        let second = f.clone();
        assert!(uses.in_use(&d));
        drop(f);
        assert!(uses.in_use(&d));
        drop(second);
        assert!(!uses.in_use(&d));
        assert!(uses.last(&d).is_some());
        uses.forget(&d);
        assert!(uses.last(&d).is_none());
    }

    #[test]
    fn the_most_copies_any_pin_asks_for_wins() {
        let repo: RepoName = "prod/app".parse().unwrap();
        let tag: shoal_protocol::Tag = "1".parse().unwrap();
        let m = Digest::of(shoal_protocol::Algorithm::Sha256, b"m");
        let pins = vec![Pin {
            repo: repo.clone(),
            reference: Reference::Tag(tag.clone()),
            copies: 2,
        }];
        let rule = |p: &str, copies| PinRule {
            pattern: p.parse().unwrap(),
            copies,
        };
        assert_eq!(copies_for(&pins, &[], &repo, &tag, &m), Some(2));
        assert_eq!(
            copies_for(&pins, &[rule("prod/*", 3)], &repo, &tag, &m),
            Some(3)
        );
        let other: RepoName = "dev/app".parse().unwrap();
        assert_eq!(
            copies_for(&pins, &[rule("prod/*", 3)], &other, &tag, &m),
            None
        );
        let t2: shoal_protocol::Tag = "2".parse().unwrap();
        assert_eq!(copies_for(&pins, &[], &repo, &t2, &m), None);
    }
}
