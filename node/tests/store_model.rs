//! Model test of the store: random sequences of operations against the real [`Store`] in a temp
//! dir and against a plain in-memory model (`BTreeMap`s), with restarts in between.
//!
//! Operations: blobs written through a `BlobWriter` (sha256 or sha512, in pieces, some contents
//! alike, some finished under the wrong digest, some abandoned), journal changes committed alone
//! or in batches (link, unlink, manifest, manifest delete, signed tag records out of order),
//! upload sessions (start, append with right and wrong offsets and lengths, finish with the
//! right or a wrong digest, cancel, probes with the wrong repository), compactions, garbage
//! collections (which must keep everything a current tag record needs), and restarts: clean, and
//! crash-like, where the index is lost or rolled back to an earlier copy and the debris of a crash
//! is left behind (a torn journal line, a temp file, a half-made upload directory).
//!
//! After every operation the store's answers (blob sizes, repositories, links, manifests,
//! referrers, tags and their records, upload sessions and offsets, an empty `tmp/`) must equal the
//! model's; after every restart, blob bytes and `BlobIndex`es too, and `fsck` must find nothing
//! wrong. A failing case is shrunk and its seed kept in `proptest-regressions/store_model.txt`,
//! which proptest replays first on the next run. `PROPTEST_CASES` runs more cases.
//!
//! One behaviour is modelled as the store has it today rather than as `upload.rs` promises: a
//! session that refused a request's bytes (a wrong digest on the final `PUT`, a wrong declared
//! length) stays at its previous offset only until a restart, after which the bytes left in its
//! data file count (see [`Model::restarted`]).

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use shoal_node::manifest::ManifestInfo;
use shoal_node::store::{Batch, Change, GcOptions, Index, Store, StoreError, fsck};
use shoal_protocol::{
    Algorithm, BlobIndex, BlobIndexId, BlobIndexer, BlobRef, Digest, DigestHasher, RepoName,
    SignedTagRecord, SigningKey, Tag, TagRecord, TagTarget, chunk_size_for,
};

/// Cases per run unless `PROPTEST_CASES` says otherwise; with [`MAX_STEPS`], 8 to 14 s in a
/// debug build on the 2-core test machine.
const CASES: u32 = 48;
/// Most operations in one case.
const MAX_STEPS: usize = 40;
/// How long a failure may be shrunk, in milliseconds.
const MAX_SHRINK_MS: u32 = 180_000;
/// How long a restart may wait for the previous store's journal thread to let go of the index.
const REOPEN_TIMEOUT: Duration = Duration::from_secs(20);
/// Where failing seeds are kept (proptest's default looks for a `lib.rs` above the test file and
/// would put them beside it).
const REGRESSIONS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/proptest-regressions/store_model.txt"
);

const REPOS: [&str; 3] = ["team/app", "team/db", "lib"];
const TAGS: [&str; 3] = ["1.0", "latest", "v2"];
const MEDIA_TYPES: [&str; 2] = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
];
/// Number of random small contents; one large one (over the sink's 1 MiB buffer) comes after.
const SMALL_CONTENTS: usize = 5;

fn repo(i: usize) -> RepoName {
    REPOS[i % REPOS.len()].parse().expect("valid repo")
}

fn tag(i: usize) -> Tag {
    TAGS[i % TAGS.len()].parse().expect("valid tag")
}

fn digest_of(algorithm: Algorithm, bytes: &[u8]) -> Digest {
    let mut h = DigestHasher::new(algorithm);
    h.update(bytes);
    h.finish()
}

fn publisher(i: usize) -> SigningKey {
    SigningKey::from_seed([i as u8 % 2 + 1; 32])
}

// ---------------------------------------------------------------------------------------------
// Operations

/// How a `BlobWriter` ends.
#[derive(Debug, Clone, Copy)]
enum WriteEnd {
    /// `finish` with the bytes' digest: the blob is stored.
    Finish,
    /// `finish` with the digest of other bytes: nothing is stored.
    WrongDigest,
    /// Dropped before `finish`: nothing is stored, no temp file stays.
    Abandon,
}

/// What `blob_writer` is told of the size.
#[derive(Debug, Clone, Copy)]
enum Declared {
    Exact,
    Unknown,
    /// A size of another chunk-size class: the `BlobIndex` must still match the bytes.
    Wrong,
}

/// The `start` of an upload chunk (`Content-Range`).
#[derive(Debug, Clone, Copy)]
enum Start {
    None,
    Right,
    /// Past the session's offset: refused, nothing changes.
    Wrong,
}

/// One journal event. Indices pick from the pools or, for `stored`, from the blobs the model
/// holds (only a stored blob is linked or named as a manifest, as the registry does).
#[derive(Debug, Clone)]
enum ChangeOp {
    Link {
        repo: usize,
        stored: usize,
    },
    Unlink {
        repo: usize,
        stored: usize,
    },
    Manifest {
        repo: usize,
        stored: usize,
        subject: Option<usize>,
        media: usize,
    },
    DeleteManifest {
        repo: usize,
        stored: usize,
    },
    Record {
        repo: usize,
        tag: usize,
        publisher: usize,
        timestamp_ms: u64,
        sequence: u64,
        /// `None` is a tombstone; otherwise a pool content names the manifest.
        target: Option<usize>,
    },
}

/// How a restart happens. Every restart closes the store, waits for its journal thread to end and
/// runs `fsck`, which must be clean.
#[derive(Debug, Clone, Copy)]
enum Restart {
    /// Reopen as is.
    Clean,
    /// The index is gone: rebuilt from the journal, the blob files and `uploads/`.
    LoseIndex,
    /// The index is the copy kept at an earlier restart, as if sled had lost its latest writes:
    /// the journal tail it has not applied is replayed.
    StaleIndex,
}

#[derive(Debug, Clone)]
enum Op {
    WriteBlob {
        content: usize,
        sha512: bool,
        declared: Declared,
        piece: usize,
        end: WriteEnd,
    },
    Commit(Vec<ChangeOp>),
    StartUpload {
        repo: usize,
    },
    AppendUpload {
        session: usize,
        content: usize,
        start: Start,
        /// Declares a length other than the chunk's: refused after the bytes arrived.
        wrong_len: bool,
    },
    FinishUpload {
        session: usize,
        content: usize,
        start: Start,
        sha512: bool,
        wrong_digest: bool,
    },
    CancelUpload {
        session: usize,
    },
    /// Looks a session up under another repository, and a finished or unknown one.
    ProbeUpload {
        session: usize,
        repo: usize,
    },
    /// Compacts the journal (a snapshot of the state, then the tail): nothing the model says
    /// may change.
    Compact,
    /// Collects garbage with no grace period: nothing a current record needs may go, and what
    /// goes leaves the entries that named it, as the model says a sweep's changes do.
    Gc,
    Restart {
        how: Restart,
        /// Leave a torn journal line, a temp file and a half-made upload directory behind.
        debris: bool,
        /// Keep a copy of the index for a later `StaleIndex`.
        keep_index: bool,
    },
}

/// An index into a list that changes as the case runs (stored blobs, open sessions), taken
/// modulo its length: small, so that a failing case shrinks quickly.
const PICK: std::ops::Range<usize> = 0..16;

fn change_op() -> impl Strategy<Value = ChangeOp> {
    prop_oneof![
        3 => (0..3usize, PICK).prop_map(|(repo, stored)| ChangeOp::Link { repo, stored }),
        1 => (0..3usize, PICK)
            .prop_map(|(repo, stored)| ChangeOp::Unlink { repo, stored }),
        2 => (0..3usize, PICK, prop::option::of(PICK), 0..2usize).prop_map(
            |(repo, stored, subject, media)| ChangeOp::Manifest { repo, stored, subject, media }
        ),
        1 => (0..3usize, PICK)
            .prop_map(|(repo, stored)| ChangeOp::DeleteManifest { repo, stored }),
        2 => (
            0..3usize,
            0..3usize,
            0..2usize,
            0..3u64,
            0..2u64,
            prop::option::weighted(0.8, 0..SMALL_CONTENTS + 1)
        )
            .prop_map(|(repo, tag, publisher, timestamp_ms, sequence, target)| {
                ChangeOp::Record { repo, tag, publisher, timestamp_ms, sequence, target }
            }),
    ]
}

fn start() -> impl Strategy<Value = Start> {
    prop_oneof![2 => Just(Start::None), 2 => Just(Start::Right), 1 => Just(Start::Wrong)]
}

fn op() -> impl Strategy<Value = Op> {
    let content = 0..SMALL_CONTENTS + 1;
    prop_oneof![
        6 => (
            content.clone(),
            prop::bool::weighted(0.2),
            prop_oneof![
                Just(Declared::Exact),
                Just(Declared::Unknown),
                Just(Declared::Wrong)
            ],
            prop::sample::select(vec![1usize, 100, 4096, 1 << 20]),
            prop_oneof![
                6 => Just(WriteEnd::Finish),
                2 => Just(WriteEnd::WrongDigest),
                1 => Just(WriteEnd::Abandon)
            ],
        )
            .prop_map(|(content, sha512, declared, piece, end)| Op::WriteBlob {
                content,
                sha512,
                declared,
                piece,
                end
            }),
        8 => prop::collection::vec(change_op(), 1..4).prop_map(Op::Commit),
        2 => (0..3usize).prop_map(|repo| Op::StartUpload { repo }),
        3 => (PICK, content.clone(), start(), prop::bool::weighted(0.15)).prop_map(
            |(session, content, start, wrong_len)| Op::AppendUpload {
                session,
                content,
                start,
                wrong_len
            }
        ),
        2 => (
            PICK,
            content,
            start(),
            prop::bool::weighted(0.2),
            prop::bool::weighted(0.25)
        )
            .prop_map(|(session, content, start, sha512, wrong_digest)| {
                Op::FinishUpload { session, content, start, sha512, wrong_digest }
            }),
        1 => PICK.prop_map(|session| Op::CancelUpload { session }),
        1 => Just(Op::Compact),
        1 => Just(Op::Gc),
        1 => (PICK, 0..3usize)
            .prop_map(|(session, repo)| Op::ProbeUpload { session, repo }),
        2 => (
            prop_oneof![
                2 => Just(Restart::Clean),
                1 => Just(Restart::LoseIndex),
                1 => Just(Restart::StaleIndex)
            ],
            any::<bool>(),
            any::<bool>()
        )
            .prop_map(|(how, debris, keep_index)| Op::Restart { how, debris, keep_index }),
    ]
}

/// One of the contents blobs and chunks are made of, as a short recipe so that a failing case
/// prints (and shrinks) small.
#[derive(Debug, Clone, Copy)]
enum Content {
    Empty,
    /// The same few bytes in every case: equal contents in one case.
    Same,
    /// `len` bytes from `seed`.
    Random {
        len: usize,
        seed: u64,
    },
}

impl Content {
    fn bytes(self) -> Vec<u8> {
        match self {
            Content::Empty => Vec::new(),
            Content::Same => b"same bytes".to_vec(),
            Content::Random { len, seed } => random_bytes(len, seed),
        }
    }
}

/// xorshift64: cheap bytes that do not repeat.
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The contents of a case: [`SMALL_CONTENTS`] small ones and, last, one of a little over 1 MiB
/// from `large_seed`, so that a write spans the sink's two buffers.
fn contents(small: &[Content], large_seed: u64) -> Vec<Vec<u8>> {
    let mut all: Vec<Vec<u8>> = small.iter().map(|c| c.bytes()).collect();
    all.push(random_bytes((1 << 20) + 4097, large_seed));
    all
}

fn content() -> impl Strategy<Value = Content> {
    prop_oneof![
        1 => Just(Content::Empty),
        1 => Just(Content::Same),
        4 => (1..3000usize, any::<u64>()).prop_map(|(len, seed)| Content::Random { len, seed }),
    ]
}

// ---------------------------------------------------------------------------------------------
// The model

/// An upload session as the model sees it.
#[derive(Debug, Clone)]
struct Session {
    id: String,
    repo: RepoName,
    /// The acknowledged bytes.
    data: Vec<u8>,
    /// Bytes of the last request that failed after its bytes arrived (a wrong declared length,
    /// a wrong digest at the end). The session stays at `data`; but on disk a prefix of them may
    /// follow `data`, and a store reopened today counts the file's length as the offset (see
    /// [`Model::restarted`]).
    unacknowledged: Option<Vec<u8>>,
}

#[derive(Debug, Default)]
struct Model {
    /// Blob bytes by digest.
    blobs: BTreeMap<Digest, Vec<u8>>,
    /// Every digest an operation mentioned; the store is asked about each.
    seen: BTreeSet<Digest>,
    repos: BTreeSet<RepoName>,
    links: BTreeSet<(RepoName, Digest)>,
    manifests: BTreeMap<(RepoName, Digest), ManifestInfo>,
    /// What a manifest says is fixed by its bytes: the first `ManifestInfo` made for a digest.
    manifest_info: BTreeMap<Digest, ManifestInfo>,
    records: BTreeMap<(RepoName, Tag), TagRecord>,
    record_blobs: BTreeMap<(RepoName, Digest), BlobRef>,
    sessions: Vec<Session>,
    /// Ids of finished and cancelled sessions.
    gone: Vec<(RepoName, String)>,
}

impl Model {
    /// The `i`th stored blob, if any.
    fn stored(&self, i: usize) -> Option<Digest> {
        let n = self.blobs.len();
        (n > 0).then(|| self.blobs.keys().nth(i % n).cloned())?
    }

    fn apply(&mut self, event: &Change) {
        match event {
            Change::Link { repo, digest } => {
                self.repos.insert(repo.clone());
                self.links.insert((repo.clone(), digest.clone()));
            }
            Change::Unlink { repo, digest } => {
                // A blob deleted from a repository is gone from it, records or not.
                self.links.remove(&(repo.clone(), digest.clone()));
                self.record_blobs.remove(&(repo.clone(), digest.clone()));
            }
            Change::Evict { repo, digest } => {
                // Evicted by the disk quota: unlinked, but what records say stays.
                self.links.remove(&(repo.clone(), digest.clone()));
            }
            Change::Manifest { repo, digest, info } => {
                self.repos.insert(repo.clone());
                self.manifests
                    .insert((repo.clone(), digest.clone()), info.clone());
            }
            Change::DeleteManifest { repo, digest } => {
                self.manifests.remove(&(repo.clone(), digest.clone()));
            }
            // The model makes no fleet changes and no expiries, and its records all count; only
            // compaction writes snapshot lines.
            Change::Policy { .. }
            | Change::Member { .. }
            | Change::Rederived { .. }
            | Change::Expired { .. }
            | Change::Kept { .. } => {}
            Change::Record { record, .. } => {
                let verified = record.verify().expect("the test signs its records");
                let rec = verified.record();
                let key = (rec.repo.clone(), rec.tag.clone());
                // Last writer wins by (timestamp, sequence, publisher); an equal key changes nothing.
                if self
                    .records
                    .get(&key)
                    .is_some_and(|cur| rec.order_key() <= cur.order_key())
                {
                    return;
                }
                self.repos.insert(rec.repo.clone());
                for b in rec.target.iter().flat_map(|t| &t.blobs) {
                    self.record_blobs
                        .insert((rec.repo.clone(), b.digest.clone()), b.clone());
                }
                self.records.insert(key, rec.clone());
            }
        }
    }

    /// Every blob a current tag record needs: its manifest and blobs, and, through the manifest
    /// entries of its repository, child manifests, their blobs and referrers, transitively.
    fn live(&self) -> BTreeSet<Digest> {
        let mut live = BTreeSet::new();
        let mut roots: Vec<(RepoName, Digest)> = Vec::new();
        for r in self.records.values() {
            if let Some(t) = &r.target {
                roots.push((r.repo.clone(), t.manifest.clone()));
                live.extend(t.blobs.iter().map(|b| b.digest.clone()));
            }
        }
        let mut seen = BTreeSet::new();
        while let Some(key) = roots.pop() {
            if !seen.insert(key.clone()) {
                continue;
            }
            live.insert(key.1.clone());
            if let Some(info) = self.manifests.get(&key) {
                live.extend(info.blobs.iter().cloned());
                roots.extend(info.manifests.iter().map(|c| (key.0.clone(), c.clone())));
            }
            for ((repo, digest), info) in &self.manifests {
                if *repo == key.0 && info.subject.as_ref() == Some(&key.1) {
                    roots.push((repo.clone(), digest.clone()));
                }
            }
        }
        live
    }

    /// A collection swept `digest`: its file goes, and every repository's link and manifest
    /// entry of it, as the sweep journals them.
    fn swept(&mut self, digest: &Digest) {
        let mut changes = Vec::new();
        for repo in &self.repos {
            let key = (repo.clone(), digest.clone());
            if self.links.contains(&key) {
                changes.push(Change::Unlink {
                    repo: repo.clone(),
                    digest: digest.clone(),
                });
            }
            if self.manifests.contains_key(&key) {
                changes.push(Change::DeleteManifest {
                    repo: repo.clone(),
                    digest: digest.clone(),
                });
            }
        }
        for c in &changes {
            self.apply(c);
        }
        self.blobs.remove(digest);
    }

    /// What a reopened store reports for upload sessions today: the data file's length is the
    /// offset, so a prefix of a failed request's bytes may now count (upload.rs promises the
    /// session stays at its previous offset, which holds until a restart). The model adopts
    /// what is on disk if it is the acknowledged bytes followed by a prefix of those bytes.
    fn restarted(&mut self, offsets: &BTreeMap<String, u64>) {
        for s in &mut self.sessions {
            let offset = offsets[&s.id];
            let extra = offset
                .checked_sub(s.data.len() as u64)
                .unwrap_or_else(|| panic!("session {} lost acknowledged bytes", s.id));
            let pending = s.unacknowledged.take().unwrap_or_default();
            assert!(
                extra <= pending.len() as u64,
                "session {} holds {extra} bytes past its data, more than the failed request's {}",
                s.id,
                pending.len()
            );
            s.data.extend_from_slice(&pending[..extra as usize]);
        }
    }

    /// What the store's index should answer, asked the same questions as [`ask_index`].
    fn view(&self) -> View {
        let mut referrers: BTreeMap<(RepoName, Digest), Vec<Digest>> = BTreeMap::new();
        for ((repo, digest), info) in &self.manifests {
            if let Some(subject) = &info.subject {
                referrers
                    .entry((repo.clone(), subject.clone()))
                    .or_default()
                    .push(digest.clone());
            }
        }
        for list in referrers.values_mut() {
            list.sort();
        }
        let mut tags: BTreeMap<RepoName, Vec<Tag>> = BTreeMap::new();
        let mut tag_targets = BTreeMap::new();
        for ((repo, tag), rec) in &self.records {
            if let Some(target) = &rec.target {
                tags.entry(repo.clone()).or_default().push(tag.clone());
                tag_targets.insert((repo.clone(), tag.clone()), target.manifest.clone());
            }
        }
        View {
            repos: self.repos.iter().cloned().collect(),
            links: self.links.clone(),
            manifests: self.manifests.clone(),
            referrers,
            tags,
            tag_targets,
            records: self.records.clone(),
            record_blobs: self.record_blobs.clone(),
            uploads: self.sessions.iter().map(|s| s.id.clone()).collect(),
        }
    }
}

/// Everything the index answers about the names the test uses.
#[derive(Debug)]
struct View {
    repos: Vec<RepoName>,
    links: BTreeSet<(RepoName, Digest)>,
    manifests: BTreeMap<(RepoName, Digest), ManifestInfo>,
    referrers: BTreeMap<(RepoName, Digest), Vec<Digest>>,
    tags: BTreeMap<RepoName, Vec<Tag>>,
    tag_targets: BTreeMap<(RepoName, Tag), Digest>,
    records: BTreeMap<(RepoName, Tag), TagRecord>,
    record_blobs: BTreeMap<(RepoName, Digest), BlobRef>,
    uploads: BTreeSet<String>,
}

impl View {
    /// Panics with what differs between the store's answers (`self`) and the model's.
    fn assert_same(&self, model: &View) {
        assert_eq!(self.repos, model.repos, "repositories (store, model)");
        same_set("links", &self.links, &model.links);
        same("manifests", &self.manifests, &model.manifests);
        same("referrers", &self.referrers, &model.referrers);
        same("tags", &self.tags, &model.tags);
        same("tag targets", &self.tag_targets, &model.tag_targets);
        same("records", &self.records, &model.records);
        same("record blobs", &self.record_blobs, &model.record_blobs);
        same_set("upload sessions", &self.uploads, &model.uploads);
    }
}

/// Panics with the entries on which the store and the model differ, if any.
fn same<K: Ord + Debug, V: PartialEq + Debug>(
    what: &str,
    store: &BTreeMap<K, V>,
    model: &BTreeMap<K, V>,
) {
    let mut diffs = Vec::new();
    for (k, v) in store {
        match model.get(k) {
            None => diffs.push(format!("  {k:?}: the store has {v:?}, the model nothing")),
            Some(m) if m != v => {
                diffs.push(format!("  {k:?}: the store has {v:?}, the model {m:?}"))
            }
            Some(_) => {}
        }
    }
    for (k, m) in model {
        if !store.contains_key(k) {
            diffs.push(format!("  {k:?}: the store has nothing, the model {m:?}"));
        }
    }
    assert!(diffs.is_empty(), "{what} differ:\n{}", diffs.join("\n"));
}

fn same_set<K: Ord + Debug + Clone>(what: &str, store: &BTreeSet<K>, model: &BTreeSet<K>) {
    let map = |set: &BTreeSet<K>| {
        set.iter()
            .map(|k| (k.clone(), ()))
            .collect::<BTreeMap<_, _>>()
    };
    same(what, &map(store), &map(model));
}

/// Asks the index about every repository and tag of the pools and every digest in `digests`.
fn ask_index(index: &Index, digests: &[Digest]) -> Result<View, StoreError> {
    let mut view = View {
        repos: index.repos(None, usize::MAX)?,
        links: BTreeSet::new(),
        manifests: BTreeMap::new(),
        referrers: BTreeMap::new(),
        tags: BTreeMap::new(),
        tag_targets: BTreeMap::new(),
        records: BTreeMap::new(),
        record_blobs: BTreeMap::new(),
        uploads: index.upload_ids()?.into_iter().collect(),
    };
    for r in (0..REPOS.len()).map(repo) {
        for d in digests {
            if index.is_linked(&r, d)? {
                view.links.insert((r.clone(), d.clone()));
            }
            if let Some(info) = index.manifest(&r, d)? {
                view.manifests.insert((r.clone(), d.clone()), info);
            }
            let mut referrers: Vec<Digest> = index
                .referrers(&r, d)?
                .into_iter()
                .map(|(d, _)| d)
                .collect();
            if !referrers.is_empty() {
                referrers.sort();
                view.referrers.insert((r.clone(), d.clone()), referrers);
            }
            if let Some(b) = index.record_blob(&r, d)? {
                view.record_blobs.insert((r.clone(), d.clone()), b);
            }
        }
        let tags = index.tags(&r, None, usize::MAX)?;
        if !tags.is_empty() {
            view.tags.insert(r.clone(), tags);
        }
        for t in (0..TAGS.len()).map(tag) {
            if let Some(d) = index.tag(&r, &t)? {
                view.tag_targets.insert((r.clone(), t.clone()), d);
            }
            if let Some(rec) = index.record(&r, &t)? {
                view.records.insert((r.clone(), t), rec.record().clone());
            }
        }
    }
    Ok(view)
}

// ---------------------------------------------------------------------------------------------
// The store under test

struct Subject {
    dir: tempfile::TempDir,
    store: Option<Store>,
    /// A copy of `index/` taken at an earlier restart.
    kept_index: Option<tempfile::TempDir>,
}

/// Retries the blocking `f` until it succeeds: the journal thread of a dropped store flushes and
/// lets go of the sled lock shortly after the last handle is dropped.
async fn wait_until_ok<T: Send + 'static>(
    what: &str,
    f: impl Fn() -> Result<T, StoreError> + Send + Sync + Clone + 'static,
) -> T {
    let deadline = Instant::now() + REOPEN_TIMEOUT;
    loop {
        match tokio::task::spawn_blocking(f.clone())
            .await
            .expect("blocking task")
        {
            Ok(v) => return v,
            // Any error is retried (the lock's is an I/O error like others); a real one shows
            // when the deadline passes.
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("{what} kept failing for {REOPEN_TIMEOUT:?}: {e}"),
        }
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("dir entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}

fn listing(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

impl Subject {
    async fn open(dir: tempfile::TempDir) -> Subject {
        let path = dir.path().to_path_buf();
        let store = wait_until_ok("Store::open", move || Store::open(&path)).await;
        Subject {
            dir,
            store: Some(store),
            kept_index: None,
        }
    }

    fn store(&self) -> &Store {
        self.store.as_ref().expect("store is open")
    }

    fn path(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// Drops the store and runs `fsck` once its journal thread let go of the index.
    async fn close_and_fsck(&mut self) {
        drop(self.store.take());
        let path = self.path();
        let report = wait_until_ok("fsck", move || fsck(&path, false)).await;
        assert!(
            report.is_clean() && report.repaired.is_empty(),
            "fsck: {report:?}"
        );
    }

    async fn restart(&mut self, how: Restart, debris: bool, keep_index: bool) {
        self.close_and_fsck().await;
        let root = self.path();
        let index = root.join("index");
        // A new copy replaces the kept one, which a `StaleIndex` of this restart still uses.
        let earlier = if keep_index {
            let kept = tempfile::tempdir().expect("tempdir");
            copy_dir(&index, kept.path());
            self.kept_index.replace(kept)
        } else {
            None
        };
        match how {
            Restart::Clean => {}
            Restart::LoseIndex => std::fs::remove_dir_all(&index).expect("rm index"),
            Restart::StaleIndex => {
                if let Some(kept) = earlier.as_ref().or(self.kept_index.as_ref()) {
                    std::fs::remove_dir_all(&index).expect("rm index");
                    copy_dir(kept.path(), &index);
                }
            }
        }
        if debris {
            // A journal write a crash cut short: never acknowledged, truncated at open.
            let line = b"0123456789abcdef {\"op\":\"link\",\"repo\":\"team/app\",\"dig";
            let mut journal = std::fs::OpenOptions::new()
                .append(true)
                .open(root.join("journal.v1.log"))
                .expect("journal");
            std::io::Write::write_all(&mut journal, line).expect("torn write");
            // A blob being written, and an upload session whose `repo` file was never written.
            std::fs::write(root.join("tmp").join("crashed-blob"), b"partial").expect("tmp");
            let half = root
                .join("uploads")
                .join("00000000-0000-4000-8000-000000000000");
            std::fs::create_dir_all(&half).expect("mkdir");
            std::fs::write(half.join("data"), b"partial").expect("data");
        }
        let path = self.path();
        let store = wait_until_ok("Store::open", move || Store::open(&path)).await;
        self.store = Some(store);
    }
}

fn body(bytes: &[u8]) -> futures_util::stream::Iter<std::vec::IntoIter<Result<Bytes, Infallible>>> {
    // Two pieces, so that a chunk arrives as a stream does.
    let mid = bytes.len() / 2;
    futures_util::stream::iter(vec![
        Ok(Bytes::copy_from_slice(&bytes[..mid])),
        Ok(Bytes::copy_from_slice(&bytes[mid..])),
    ])
}

// ---------------------------------------------------------------------------------------------
// Running one case

struct Case {
    contents: Vec<Vec<u8>>,
    model: Model,
    subject: Subject,
    /// Blobs the case's collections swept.
    swept: u64,
}

impl Case {
    fn content(&self, i: usize) -> &[u8] {
        &self.contents[i % self.contents.len()]
    }

    async fn run(&mut self, op: &Op) {
        match op {
            Op::WriteBlob {
                content,
                sha512,
                declared,
                piece,
                end,
            } => {
                self.write_blob(*content, *sha512, *declared, *piece, *end)
                    .await
            }
            Op::Commit(ops) => self.commit(ops).await,
            Op::StartUpload { repo: r } => {
                let r = repo(*r);
                let id = self
                    .subject
                    .store()
                    .create_upload(&r)
                    .await
                    .expect("create");
                self.model.sessions.push(Session {
                    id,
                    repo: r,
                    data: Vec::new(),
                    unacknowledged: None,
                });
            }
            Op::AppendUpload {
                session,
                content,
                start,
                wrong_len,
            } => self.append(*session, *content, *start, *wrong_len).await,
            Op::FinishUpload {
                session,
                content,
                start,
                sha512,
                wrong_digest,
            } => {
                self.finish(*session, *content, *start, *sha512, *wrong_digest)
                    .await
            }
            Op::CancelUpload { session } => {
                let n = self.model.sessions.len();
                if n == 0 {
                    return;
                }
                let s = self.model.sessions.remove(session % n);
                self.subject
                    .store()
                    .cancel_upload(&s.repo, &s.id)
                    .await
                    .expect("cancel");
                self.model.gone.push((s.repo, s.id));
            }
            Op::ProbeUpload { session, repo: r } => self.probe(*session, *r).await,
            Op::Compact => {
                self.subject.store().compact().await.expect("compact");
            }
            Op::Gc => {
                let report = self
                    .subject
                    .store()
                    .gc(GcOptions::new(Duration::ZERO))
                    .await
                    .expect("gc");
                let live = self.model.live();
                for (digest, _) in &report.swept {
                    assert!(
                        !live.contains(digest),
                        "the collection swept {digest}, which a current tag record needs"
                    );
                    assert!(
                        self.model.blobs.contains_key(digest),
                        "the collection swept {digest}, which the store did not hold"
                    );
                    self.model.swept(digest);
                }
                self.swept += report.swept.len() as u64;
            }
            Op::Restart {
                how,
                debris,
                keep_index,
            } => {
                self.subject.restart(*how, *debris, *keep_index).await;
                let mut offsets = BTreeMap::new();
                for s in &self.model.sessions {
                    let u = self.subject.store().upload(&s.repo, &s.id).await;
                    let offset = u.expect("session survives a restart").lock().await.offset();
                    offsets.insert(s.id.clone(), offset);
                }
                self.model.restarted(&offsets);
                self.check_blob_bytes().await;
            }
        }
    }

    async fn write_blob(
        &mut self,
        content: usize,
        sha512: bool,
        declared: Declared,
        piece: usize,
        end: WriteEnd,
    ) {
        let bytes = self.content(content).to_vec();
        let algorithm = if sha512 {
            Algorithm::Sha512
        } else {
            Algorithm::Sha256
        };
        let digest = digest_of(algorithm, &bytes);
        let size = match declared {
            Declared::Exact => Some(bytes.len() as u64),
            Declared::Unknown => None,
            Declared::Wrong => Some(bytes.len() as u64 + (300 << 20)),
        };
        let store = self.subject.store().clone();
        let mut writer = store.blob_writer(algorithm, size).await.expect("writer");
        // At most 64 writes whatever the piece size.
        for part in bytes.chunks(piece.max(bytes.len() / 64).max(1)) {
            writer.write(part).await.expect("write");
        }
        assert_eq!(writer.len(), bytes.len() as u64);
        match end {
            WriteEnd::Finish => {
                let len = writer.finish(&digest).await.expect("finish");
                assert_eq!(len, bytes.len() as u64);
                self.model.blobs.insert(digest.clone(), bytes);
                self.model.seen.insert(digest);
            }
            WriteEnd::WrongDigest => {
                // The digest of another content when there is one, else of other bytes.
                let other = self.content(content + 1).to_vec();
                let mut wrong = digest_of(algorithm, &other);
                if wrong == digest {
                    wrong = digest_of(algorithm, &[bytes.as_slice(), b"x"].concat());
                }
                match writer.finish(&wrong).await {
                    Err(StoreError::DigestMismatch { expected, actual }) => {
                        assert_eq!((expected, actual), (wrong.clone(), digest.clone()));
                    }
                    other => panic!("finish under a wrong digest: {other:?}"),
                }
                self.model.seen.insert(wrong);
                self.model.seen.insert(digest);
            }
            WriteEnd::Abandon => {
                drop(writer);
                self.model.seen.insert(digest);
            }
        }
    }

    fn event(&mut self, op: &ChangeOp) -> Option<Change> {
        Some(match op {
            ChangeOp::Link { repo: r, stored } => Change::Link {
                repo: repo(*r),
                digest: self.model.stored(*stored)?,
            },
            ChangeOp::Unlink { repo: r, stored } => Change::Unlink {
                repo: repo(*r),
                digest: self.model.stored(*stored)?,
            },
            ChangeOp::Manifest {
                repo: r,
                stored,
                subject,
                media,
            } => {
                let digest = self.model.stored(*stored)?;
                let size = self.model.blobs[&digest].len() as u64;
                let subject = subject.and_then(|s| self.model.stored(s));
                let blobs = self.model.blobs.keys().take(2).cloned().collect();
                let info = self
                    .model
                    .manifest_info
                    .entry(digest.clone())
                    .or_insert_with(|| ManifestInfo {
                        media_type: MEDIA_TYPES[*media % MEDIA_TYPES.len()].to_owned(),
                        size,
                        blobs,
                        manifests: Vec::new(),
                        subject,
                        artifact_type: Some("application/example".to_owned()),
                        annotations: Some(BTreeMap::from([("k".to_owned(), "v".to_owned())])),
                    })
                    .clone();
                Change::Manifest {
                    repo: repo(*r),
                    digest,
                    info,
                }
            }
            ChangeOp::DeleteManifest { repo: r, stored } => Change::DeleteManifest {
                repo: repo(*r),
                digest: self.model.stored(*stored)?,
            },
            ChangeOp::Record {
                repo: r,
                tag: t,
                publisher: p,
                timestamp_ms,
                sequence,
                target,
            } => {
                let key = publisher(*p);
                let target = target.map(|c| {
                    let manifest = digest_of(Algorithm::Sha256, self.content(c));
                    let named = digest_of(Algorithm::Sha256, self.content(c + 1));
                    self.model.seen.insert(manifest.clone());
                    self.model.seen.insert(named.clone());
                    TagTarget {
                        manifest,
                        media_type: MEDIA_TYPES[0].to_owned(),
                        size: self.content(c).len() as u64,
                        blobs: vec![BlobRef {
                            digest: named,
                            size: self.content(c + 1).len() as u64,
                            // Differs between records naming the same blob: the newest one's is kept.
                            index: BlobIndexId::from_bytes([*timestamp_ms as u8; 32]),
                        }],
                    }
                });
                let record = TagRecord {
                    repo: repo(*r),
                    tag: tag(*t),
                    target,
                    timestamp_ms: *timestamp_ms,
                    sequence: *sequence,
                    publisher: key.public(),
                };
                Change::Record {
                    record: SignedTagRecord::sign(&record, &key).expect("sign"),
                    immutable: false,
                }
            }
        })
    }

    async fn commit(&mut self, ops: &[ChangeOp]) {
        let events: Vec<Change> = ops.iter().filter_map(|op| self.event(op)).collect();
        if events.is_empty() {
            return;
        }
        self.subject
            .store()
            .commit(events.iter().cloned().collect::<Batch>())
            .await
            .expect("commit");
        for e in &events {
            self.model.apply(e);
        }
    }

    fn session(&self, i: usize) -> Option<usize> {
        let n = self.model.sessions.len();
        (n > 0).then(|| i % n)
    }

    async fn append(&mut self, session: usize, content: usize, start: Start, wrong_len: bool) {
        let Some(i) = self.session(session) else {
            return;
        };
        let bytes = self.content(content).to_vec();
        let s = self.model.sessions[i].clone();
        let offset = s.data.len() as u64;
        let start_arg = match start {
            Start::None => None,
            Start::Right => Some(offset),
            Start::Wrong => Some(offset + 1),
        };
        let len = bytes.len() as u64;
        let len_arg = if wrong_len { Some(len + 1) } else { Some(len) };
        let upload = self.subject.store().upload(&s.repo, &s.id).await;
        let upload = upload.expect("session");
        let result = upload
            .lock()
            .await
            .append(body(&bytes), start_arg, len_arg)
            .await;
        let model = &mut self.model.sessions[i];
        match (start, wrong_len, result) {
            (Start::Wrong, _, Err(StoreError::UploadOffset { offset: o, got })) => {
                assert_eq!((o, got), (offset, offset + 1));
            }
            (Start::None | Start::Right, true, Err(StoreError::ChunkLength { declared, got })) => {
                assert_eq!((declared, got), (len + 1, len));
                model.unacknowledged = Some(bytes);
            }
            (Start::None | Start::Right, false, Ok(new_offset)) => {
                assert_eq!(new_offset, offset + len);
                model.data.extend_from_slice(&bytes);
                model.unacknowledged = None;
            }
            (_, _, other) => panic!("append {start:?} wrong_len={wrong_len}: {other:?}"),
        }
    }

    async fn finish(
        &mut self,
        session: usize,
        content: usize,
        start: Start,
        sha512: bool,
        wrong_digest: bool,
    ) {
        let Some(i) = self.session(session) else {
            return;
        };
        let last = self.content(content).to_vec();
        let s = self.model.sessions[i].clone();
        let offset = s.data.len() as u64;
        let whole = [s.data.as_slice(), last.as_slice()].concat();
        let algorithm = if sha512 {
            Algorithm::Sha512
        } else {
            Algorithm::Sha256
        };
        let right = digest_of(algorithm, &whole);
        let digest = if wrong_digest {
            digest_of(algorithm, &[whole.as_slice(), b"x"].concat())
        } else {
            right.clone()
        };
        self.model.seen.insert(digest.clone());
        self.model.seen.insert(right.clone());
        let range = match start {
            Start::None => None,
            Start::Right => Some((offset, last.len() as u64)),
            Start::Wrong => Some((offset + 1, last.len() as u64)),
        };
        let result = self
            .subject
            .store()
            .finish_upload(&s.repo, &s.id, &digest, body(&last), range)
            .await;
        match (start, wrong_digest, result) {
            (Start::Wrong, _, Err(StoreError::UploadOffset { .. })) => {}
            (_, true, Err(StoreError::DigestMismatch { expected, actual })) => {
                assert_eq!((expected, actual), (digest, right));
                self.model.sessions[i].unacknowledged = Some(last);
            }
            (_, false, Ok(size)) => {
                assert_eq!(size, whole.len() as u64);
                self.model.blobs.insert(digest.clone(), whole);
                self.model.apply(&Change::Link {
                    repo: s.repo.clone(),
                    digest,
                });
                self.model.sessions.remove(i);
                self.model.gone.push((s.repo, s.id));
            }
            (_, _, other) => {
                panic!("finish {start:?} wrong_digest={wrong_digest}: {other:?}")
            }
        }
    }

    async fn probe(&mut self, session: usize, r: usize) {
        let store = self.subject.store().clone();
        if let Some(i) = self.session(session) {
            let s = &self.model.sessions[i];
            let other = repo(r);
            if other != s.repo {
                assert!(unknown(store.upload(&other, &s.id).await), "other repo");
                assert!(
                    unknown(store.cancel_upload(&other, &s.id).await),
                    "cancel from another repo"
                );
            }
        }
        if !self.model.gone.is_empty() {
            let (repo, id) = &self.model.gone[session % self.model.gone.len()];
            assert!(unknown(store.upload(repo, id).await), "gone session {id}");
        }
        let fresh = "9b2f3f1e-0000-4000-8000-000000000001";
        assert!(unknown(store.upload(&repo(r), fresh).await), "unknown id");
        assert!(unknown(store.upload(&repo(r), "../../etc").await), "bad id");
    }

    /// Compares everything the store answers with the model.
    async fn check(&self) {
        let store = self.subject.store();
        let digests: Vec<Digest> = self.model.seen.iter().cloned().collect();
        let asked = digests.clone();
        let view = store
            .read(move |index| ask_index(index, &asked))
            .await
            .expect("read index");
        view.assert_same(&self.model.view());
        for d in &digests {
            let expect = self.model.blobs.get(d).map(|b| b.len() as u64);
            assert_eq!(store.blob_size(d).await.expect("blob_size"), expect, "{d}");
        }
        for s in &self.model.sessions {
            let upload = store.upload(&s.repo, &s.id).await.expect("session");
            assert_eq!(
                upload.lock().await.offset(),
                s.data.len() as u64,
                "{}",
                s.id
            );
        }
        let root = self.subject.path();
        assert_eq!(listing(&root.join("tmp")), BTreeSet::new(), "tmp/");
        let ids: BTreeSet<String> = self.model.sessions.iter().map(|s| s.id.clone()).collect();
        assert_eq!(listing(&root.join("uploads")), ids, "uploads/");
    }

    /// After a restart: every blob's bytes and its `BlobIndex`, recorded or recomputed.
    async fn check_blob_bytes(&self) {
        let store = self.subject.store();
        for (d, bytes) in &self.model.blobs {
            let read = store
                .read_small_blob(d, bytes.len() as u64)
                .await
                .expect("read blob");
            assert!(read.as_deref() == Some(bytes.as_slice()), "bytes of {d}");
            let mut indexer = BlobIndexer::new(chunk_size_for(bytes.len() as u64));
            indexer.update(bytes);
            let expect: BlobIndex = indexer.finish(d.clone()).expect("index");
            let got = store.blob_index(d).await.expect("blob_index");
            assert_eq!(got, Some(expect), "BlobIndex of {d}");
        }
    }
}

fn unknown<T>(result: Result<T, StoreError>) -> bool {
    matches!(result, Err(StoreError::UploadUnknown))
}

/// Runs `ops` against the store and the model; returns how many blobs collections swept.
async fn run_case(contents: Vec<Vec<u8>>, ops: Vec<Op>) -> u64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut case = Case {
        contents,
        model: Model::default(),
        subject: Subject::open(dir).await,
        swept: 0,
    };
    for c in case.contents.clone() {
        case.model.seen.insert(digest_of(Algorithm::Sha256, &c));
    }
    for op in &ops {
        case.run(op).await;
        case.check().await;
    }
    case.subject.close_and_fsck().await;
    case.swept
}

/// The model's collection is not idle: a blob written, linked, unlinked and then collected is
/// swept (and the store and model still agree, across a restart).
#[test]
fn a_collection_sweeps_a_blob_nothing_names() {
    let write = |content| Op::WriteBlob {
        content,
        sha512: false,
        declared: Declared::Exact,
        piece: 1 << 20,
        end: WriteEnd::Finish,
    };
    let ops = vec![
        write(0),
        write(1),
        Op::Commit(vec![
            ChangeOp::Link { repo: 0, stored: 0 },
            ChangeOp::Link { repo: 0, stored: 1 },
        ]),
        Op::Commit(vec![ChangeOp::Unlink { repo: 0, stored: 0 }]),
        Op::Gc,
        Op::Restart {
            how: Restart::Clean,
            debris: false,
            keep_index: false,
        },
        Op::Gc,
    ];
    let contents = contents(
        &[
            Content::Random { len: 100, seed: 1 },
            Content::Random { len: 200, seed: 2 },
        ],
        3,
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // Both go: linking is not naming (no manifest or record names either).
    assert_eq!(runtime.block_on(run_case(contents, ops)), 2);
}

fn config() -> ProptestConfig {
    let mut config = ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(REGRESSIONS))),
        // proptest's default stops after 4 tries per case, too few to drop the operations a
        // failure does not need; a case takes up to a second, so time bounds the shrinking.
        max_shrink_iters: 4096,
        max_shrink_time: MAX_SHRINK_MS,
        ..ProptestConfig::default()
    };
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = CASES;
    }
    config
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn store_matches_the_model_across_restarts(
        small in prop::collection::vec(content(), SMALL_CONTENTS),
        large_seed in any::<u64>(),
        ops in prop::collection::vec(op(), 1..MAX_STEPS),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let _swept = runtime.block_on(run_case(contents(&small, large_seed), ops));
    }
}
