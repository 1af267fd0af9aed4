//! Compaction of the records log: a snapshot of the current state plus the tail.
//!
//! The journal keeps every change ever made: every tag record received, superseded or not,
//! every link and unlink. A start replays only what the index has not seen, but `fsck`, a
//! rebuild of the index and the re-derivation of a tag read it all. Compaction replaces the
//! journal by the changes that rebuild the index as it is (one [`Kept`] line per entry of the
//! journal-derived trees, between a header and an end marker; stale `blob_repos.v1` entries,
//! which grow with the history and change no answer, are left out and `fsck` compares without
//! them) followed by the changes written since (the tail).
//!
//! How, and why it is safe:
//! 1. The journal thread notes the journal's length `upto` and starts a compaction thread; pushes
//!    go on. That thread replays the journal up to `upto` into a scratch index (from the
//!    journal, the truth, not from the live index, so a damaged index never becomes the truth),
//!    and writes its snapshot to `tmp/` and fsyncs it. Only reads of the journal so far, which
//!    is append-only: nothing here blocks a commit.
//! 2. The journal thread, between two batches, appends the tail (bytes `upto..` of the journal)
//!    to the snapshot, fsyncs it, renames it over `journal.v1.log` and fsyncs the directory.
//!    Commits wait for this switch only: a copy of what was written during step 1, and two
//!    fsyncs (a few milliseconds: `switch_ms` in the [`CompactReport`]; the `compaction_bench`
//!    test measures it on a journal of a million records).
//! 3. It moves the index's applied offset into the new generation (see [`super::journal`]) and
//!    flushes the index.
//!
//! A crash before the rename leaves the old journal in force (the snapshot in `tmp/` is cleared
//! at the next start); after it, the new one, which holds everything the old one did. A crash
//! between the rename and step 3 leaves an index applied to the old generation: the next start
//! sees the generations differ and rebuilds the index from the new journal (a replay of the
//! snapshot and the tail: the cheap thing compaction is for).
//!
//! What is not kept: records that no longer are a tag's current record. The index never
//! needs them; the re-derivation of a tag whose current record stopped counting (its publisher
//! lost trust) falls back among the records the journal still holds, which after a compaction
//! are the current records at the time and the records received since.

use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::StoreError;
use super::change::{Change, Kept};
use super::gate::Gate;
use super::index::Index;
use super::journal;

/// A journal shorter than this is never compacted by itself.
pub const AUTO_COMPACT_MIN_BYTES: u64 = 64 << 20;
/// A journal is compacted by itself once it is this many times as long as its last snapshot.
pub const AUTO_COMPACT_GROWTH: u64 = 2;
/// How many changes the scratch replay applies between two checks that the store is still open.
const CLOSE_CHECK_EVERY: u64 = 4096;

/// When the journal thread compacts the journal by itself.
#[derive(Debug, Clone)]
pub struct AutoCompact {
    /// Never below this many bytes.
    pub min_bytes: u64,
    /// Only once the journal is this many times as long as its snapshot.
    pub growth: u64,
    /// Test only: stop a compaction at this step, as a crash would.
    #[cfg(test)]
    pub crash_at: Option<Step>,
}

impl Default for AutoCompact {
    fn default() -> AutoCompact {
        AutoCompact {
            min_bytes: AUTO_COMPACT_MIN_BYTES,
            growth: AUTO_COMPACT_GROWTH,
            #[cfg(test)]
            crash_at: None,
        }
    }
}

impl AutoCompact {
    /// Never by itself (`shoal compact` still compacts).
    pub fn never() -> AutoCompact {
        AutoCompact {
            min_bytes: u64::MAX,
            ..AutoCompact::default()
        }
    }

    /// Whether a journal of `journal_bytes` whose snapshot is `snapshot_bytes` is due.
    pub fn is_due(&self, journal_bytes: u64, snapshot_bytes: u64) -> bool {
        journal_bytes >= self.min_bytes
            && journal_bytes > snapshot_bytes.saturating_mul(self.growth)
    }

    /// Test only: fails at `step` if the test asked for a crash there.
    pub(super) fn crash_point(&self, step: Step) -> Result<(), StoreError> {
        #[cfg(test)]
        if self.crash_at == Some(step) {
            return Err(StoreError::Invariant("simulated crash"));
        }
        let _ = step;
        Ok(())
    }
}

/// The file operations of a compaction, for tests that stop after each (as a crash would).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The snapshot is written to `tmp/`, not yet fsynced.
    SnapshotWritten,
    /// The tail is appended to the snapshot and fsynced.
    TailCopied,
    /// The snapshot is renamed over the journal, the directory not yet fsynced.
    Renamed,
    /// The directory is fsynced; the index still has its offset in the old generation.
    DirSynced,
}

/// What a compaction did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompactReport {
    /// The journal's new generation.
    pub generation: u16,
    /// Bytes of the journal compacted (the rest was the tail).
    pub journal_bytes_before: u64,
    /// Bytes of the journal after the switch (snapshot and tail).
    pub journal_bytes_after: u64,
    /// Bytes of the snapshot.
    pub snapshot_bytes: u64,
    /// Bytes written during the compaction, copied after the snapshot.
    pub tail_bytes: u64,
    /// Changes replayed to take the snapshot.
    pub changes_replayed: u64,
    /// Lines of the snapshot.
    pub snapshot_lines: u64,
    /// Corrupt lines of the old journal (already skipped by the index; now gone).
    pub corrupt_lines: u64,
    /// Milliseconds spent taking the snapshot (commits went on).
    pub prepare_ms: u64,
    /// Milliseconds commits waited for the switch.
    pub switch_ms: u64,
}

/// What a compaction thread is asked to do.
pub(super) struct Job {
    pub path: PathBuf,
    pub tmp_dir: PathBuf,
    /// Snapshot the journal up to this byte (a line boundary).
    pub upto: u64,
    /// The generation of the new journal.
    pub generation: u16,
    pub gate: Arc<Gate>,
    /// Test only: where to stop.
    pub crash: AutoCompact,
}

/// A snapshot written and fsynced in `tmp/`, ready for the switch.
pub(super) struct Prepared {
    pub tmp: PathBuf,
    /// The snapshot, open for appending the tail.
    pub file: std::fs::File,
    pub upto: u64,
    pub generation: u16,
    pub snapshot_bytes: u64,
    pub report: CompactReport,
}

impl Prepared {
    /// Removes the snapshot (the store went away before the switch).
    pub fn discard(self, gate: &Gate) {
        if let Some(_open) = gate.try_enter() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Takes the snapshot of the journal up to `job.upto`. Blocking; reads the journal and writes
/// only in `tmp/`.
pub(super) fn prepare(job: &Job) -> Result<Prepared, StoreError> {
    let started = Instant::now();
    let scratch = Index::temporary()?;
    let mut report = CompactReport {
        generation: job.generation,
        journal_bytes_before: job.upto,
        ..CompactReport::default()
    };
    let scan = journal::read_range(&job.path, 0, job.upto, |change, end| {
        report.changes_replayed += 1;
        if report.changes_replayed % CLOSE_CHECK_EVERY == 0 && !job.gate.is_open() {
            return Err(StoreError::Closed);
        }
        scratch.apply(&change, end)
    })?;
    if scan.complete_len != job.upto {
        return Err(StoreError::Invariant(
            "the journal is shorter than the journal thread wrote",
        ));
    }
    report.corrupt_lines = scan.corrupt.len() as u64;
    if !scan.corrupt.is_empty() {
        tracing::error!(
            lines = scan.corrupt.len(),
            "compaction drops journal lines that fail their checksum (the index skipped them too)"
        );
    }
    let tmp = job
        .tmp_dir
        .join(format!("journal.v1.log.compact-{}", job.generation));
    let _open = job.gate.enter()?;
    // A leftover of a compaction that failed to clean up; it was never in force.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
        _ => {}
    }
    // Opened to append: once renamed, this handle is the journal's.
    let file = std::fs::OpenOptions::new()
        .create_new(true)
        .read(true)
        .append(true)
        .open(&tmp)?;
    let written = write_snapshot(&file, &scratch, job.generation, &mut report).and_then(|n| {
        job.crash.crash_point(Step::SnapshotWritten)?;
        file.sync_all()?;
        Ok(n)
    });
    let snapshot_bytes = match written {
        Ok(n) => n,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    report.snapshot_bytes = snapshot_bytes;
    report.prepare_ms = started.elapsed().as_millis() as u64;
    Ok(Prepared {
        tmp,
        file,
        upto: job.upto,
        generation: job.generation,
        snapshot_bytes,
        report,
    })
}

/// Writes the header, the state of `scratch` and the end marker; returns the bytes written.
fn write_snapshot(
    file: &std::fs::File,
    scratch: &Index,
    generation: u16,
    report: &mut CompactReport,
) -> Result<u64, StoreError> {
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut bytes = 0u64;
    let mut line = |change: Change| -> Result<(), StoreError> {
        let encoded = journal::encode(&change)?;
        out.write_all(&encoded)?;
        bytes += encoded.len() as u64;
        report.snapshot_lines += 1;
        Ok(())
    };
    line(Change::Kept {
        entry: Kept::Header { generation },
    })?;
    scratch.snapshot(&mut line)?;
    line(Change::Kept {
        entry: Kept::SnapshotEnd,
    })?;
    out.flush()?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::ManifestInfo;
    use crate::store::{Batch, Store, journal};
    use shoal_protocol::{
        BlobIndexId, BlobRef, Digest, RepoName, SignedTagRecord, SigningKey, TagRecord, TagTarget,
        codec,
    };

    type Trees = Vec<(String, Vec<crate::store::index::KeyValue>)>;

    fn repo(i: usize) -> RepoName {
        format!("team/app{i}").parse().unwrap()
    }

    fn digest(n: u64) -> Digest {
        Digest::sha256(&n.to_be_bytes())
    }

    fn info(subject: Option<Digest>) -> ManifestInfo {
        ManifestInfo {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            size: 2,
            blobs: vec![digest(1)],
            manifests: vec![],
            subject,
            artifact_type: None,
            annotations: None,
        }
    }

    fn record(r: usize, tag: usize, timestamp_ms: u64, target: Option<u64>) -> SignedTagRecord {
        let key = SigningKey::from_seed([7; 32]);
        let record = TagRecord {
            repo: repo(r),
            tag: format!("v{tag}").parse().unwrap(),
            target: target.map(|n| TagTarget {
                manifest: digest(n),
                media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                size: 2,
                blobs: vec![BlobRef {
                    digest: digest(n + 1000),
                    size: 3,
                    index: BlobIndexId::from_bytes([n as u8; 32]),
                }],
            }),
            timestamp_ms,
            sequence: 0,
            publisher: key.public(),
        };
        SignedTagRecord::sign(&record, &key).unwrap()
    }

    /// A history with every kind of change: records superseding each other, tombstones, a
    /// record's blob unlinked, manifests with subjects, deleted manifests.
    fn history(round: u64) -> Vec<Batch> {
        let mut out = Vec::new();
        for t in 0..20u64 {
            let at = round * 100 + t;
            let mut b = Batch::new()
                .link(&repo(t as usize % 3), &digest(at))
                .record(record(t as usize % 3, t as usize % 7, at, Some(at)), false);
            if t % 5 == 0 {
                b = b.record(record(t as usize % 3, t as usize % 7, at + 1, None), false);
            }
            if t % 4 == 0 {
                b = b
                    .manifest(&repo(0), &digest(at), info(Some(digest(round))))
                    .unlink(&repo(t as usize % 3), &digest(at + 1000));
            }
            if t % 6 == 0 {
                b = b
                    .delete_manifest(&repo(0), &digest(at.saturating_sub(4)))
                    .unlink(&repo(1), &digest(at.saturating_sub(1)));
            }
            out.push(b);
        }
        out
    }

    async fn commit_all(store: &Store, batches: Vec<Batch>) {
        for b in batches {
            store.commit(b).await.unwrap();
        }
    }

    async fn trees(store: &Store) -> Trees {
        store.read(|i| i.dump_comparable_trees()).await.unwrap()
    }

    /// Opens the store once the last one let go of the index (its journal thread ends after
    /// the store is dropped).
    async fn reopen(root: &std::path::Path) -> Store {
        for _ in 0..500 {
            let r = root.to_owned();
            match tokio::task::spawn_blocking(move || Store::open(&r))
                .await
                .unwrap()
            {
                Ok(s) => return s,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        }
        panic!("the store did not reopen");
    }

    /// Waits until no journal thread of a dropped store holds the index any more.
    async fn idle(root: &std::path::Path) {
        for _ in 0..500 {
            let dir = root.join("index");
            if tokio::task::spawn_blocking(move || Index::open(&dir).is_ok())
                .await
                .unwrap()
            {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("the index stayed locked");
    }

    fn generation(root: &std::path::Path) -> u16 {
        journal::read(&root.join("journal.v1.log"), 0, |_, _| Ok(()))
            .unwrap()
            .generation
    }

    async fn fsck_clean(root: &std::path::Path) {
        let mut report = None;
        for _ in 0..500 {
            let r = root.to_owned();
            // Fails while the journal thread of a dropped store still holds the index.
            match tokio::task::spawn_blocking(move || crate::store::fsck(&r, false))
                .await
                .unwrap()
            {
                Ok(r) => {
                    report = Some(r);
                    break;
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        }
        let report = report.expect("fsck ran");
        // The tests write no blob files: only the journal's consistency with the index counts.
        let problems: Vec<_> = report
            .problems
            .iter()
            .filter(|p| !p.ends_with("which is not on disk"))
            .collect();
        assert!(problems.is_empty(), "{problems:?}");
        assert!(report.repaired.is_empty());
    }

    #[test]
    fn logical_offsets_carry_the_generation() {
        assert_eq!(journal::logical(0, 1234), 1234);
        assert_eq!(journal::split(journal::logical(7, 99)), (7, 99));
        assert_eq!(journal::split(journal::logical(u16::MAX, 5)), (u16::MAX, 5));
        assert_ne!(journal::logical(1, 0), journal::logical(0, 0));
    }

    #[tokio::test]
    async fn compaction_keeps_the_state_and_a_rebuild_from_it_gives_the_same_index() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for round in 0..5 {
            commit_all(&store, history(round)).await;
        }
        let before = trees(&store).await;
        let old_len = std::fs::metadata(dir.path().join("journal.v1.log"))
            .unwrap()
            .len();
        let report = store.compact().await.unwrap();
        assert_eq!(report.generation, 1);
        assert_eq!(report.journal_bytes_before, old_len);
        assert!(report.journal_bytes_after < old_len, "{report:?}");
        assert_eq!(trees(&store).await, before);
        // The store goes on, in the new generation, and compacts again.
        commit_all(&store, history(9)).await;
        let report = store.compact().await.unwrap();
        assert_eq!(report.generation, 2);
        commit_all(&store, history(10)).await;
        let before = trees(&store).await;
        drop(store);

        // A cold start: the index is gone, and rebuilt from the snapshot and the tail.
        std::fs::remove_dir_all(dir.path().join("index")).ok();
        let store = reopen(dir.path()).await;
        assert_eq!(trees(&store).await, before);
        drop(store);
        let store = reopen(dir.path()).await;
        assert_eq!(trees(&store).await, before);
        drop(store);
        idle(dir.path()).await;
        fsck_clean(dir.path()).await;
        assert_eq!(generation(dir.path()), 2);
    }

    #[tokio::test]
    async fn a_crash_at_each_step_of_a_compaction_leaves_a_store_that_replays_to_the_same_state() {
        for (step, switched) in [
            (Step::SnapshotWritten, false),
            (Step::TailCopied, false),
            (Step::Renamed, true),
            (Step::DirSynced, true),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let auto = AutoCompact {
                crash_at: Some(step),
                ..AutoCompact::never()
            };
            let store = Store::open_with(dir.path(), auto).unwrap();
            for round in 0..3 {
                commit_all(&store, history(round)).await;
            }
            let before = trees(&store).await;
            assert!(store.compact().await.is_err(), "{step:?}");
            drop(store);

            let store = reopen(dir.path()).await;
            assert_eq!(trees(&store).await, before, "{step:?}");
            assert_eq!(generation(dir.path()), u16::from(switched), "{step:?}");
            assert_eq!(
                std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
                0,
                "{step:?}: the snapshot is cleared"
            );
            // It goes on: more changes, another compaction, a cold start.
            commit_all(&store, history(5)).await;
            store.compact().await.unwrap();
            let after = trees(&store).await;
            drop(store);
            std::fs::remove_dir_all(dir.path().join("index")).ok();
            let store = reopen(dir.path()).await;
            assert_eq!(trees(&store).await, after, "{step:?}");
            drop(store);
            idle(dir.path()).await;
            fsck_clean(dir.path()).await;
        }
    }

    #[tokio::test]
    async fn an_index_of_an_earlier_generation_is_rebuilt_not_misread() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        commit_all(&store, history(0)).await;
        drop(store);
        // Keep the index as it is in generation 0...
        let kept = tempfile::tempdir().unwrap();
        fn copy(from: &std::path::Path, to: &std::path::Path) {
            for e in std::fs::read_dir(from).unwrap() {
                let e = e.unwrap();
                if e.file_type().unwrap().is_dir() {
                    std::fs::create_dir_all(to.join(e.file_name())).unwrap();
                    copy(&e.path(), &to.join(e.file_name()));
                } else {
                    std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
                }
            }
        }
        let store = reopen(dir.path()).await;
        drop(store);
        idle(dir.path()).await;
        copy(&dir.path().join("index"), kept.path());
        // ...then compact and write on in generation 1, and bring the old index back.
        let store = reopen(dir.path()).await;
        store.compact().await.unwrap();
        commit_all(&store, history(1)).await;
        let before = trees(&store).await;
        drop(store);
        idle(dir.path()).await;
        let index = dir.path().join("index");
        std::fs::remove_dir_all(&index).unwrap();
        std::fs::create_dir(&index).unwrap();
        copy(kept.path(), &index);
        let store = reopen(dir.path()).await;
        assert_eq!(trees(&store).await, before);
    }

    #[tokio::test]
    async fn the_journal_thread_compacts_by_itself_once_the_journal_outgrows_its_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let auto = AutoCompact {
            min_bytes: 16 << 10,
            growth: 2,
            crash_at: None,
        };
        let store = Store::open_with(dir.path(), auto).unwrap();
        let path = dir.path().join("journal.v1.log");
        let mut written = 0;
        for round in 0..60 {
            let before = std::fs::metadata(&path).map_or(0, |m| m.len());
            commit_all(&store, history(round % 3)).await;
            written += std::fs::metadata(&path)
                .unwrap()
                .len()
                .saturating_sub(before);
        }
        // Three rounds of records supersede each other over and over: the journal stays within
        // twice its snapshot plus what came during the last compaction, not what was written.
        // How much came during it depends on the machine's speed, so the check writes one
        // round at a time and lets each compaction it starts finish, until the journal is back
        // within bounds (at once on an idle machine; a loaded one may need a round or two).
        assert!(generation(dir.path()) >= 2);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let len = std::fs::metadata(&path).unwrap().len();
            if len < 256 << 10 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{len} bytes after a minute, {written} written"
            );
            let at = generation(dir.path());
            commit_all(&store, history(0)).await;
            let waited = std::time::Instant::now();
            while generation(dir.path()) == at && waited.elapsed().as_secs() < 5 {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
        let before = trees(&store).await;
        drop(store);
        std::fs::remove_dir_all(dir.path().join("index")).ok();
        let store = reopen(dir.path()).await;
        assert_eq!(trees(&store).await, before);
    }

    #[test]
    fn a_damaged_snapshot_plants_no_record() {
        let index = Index::temporary().unwrap();
        let good = record(0, 0, 5, Some(1));
        let mut bytes = codec::encode(&good).unwrap();
        if let Some(last) = bytes.last_mut() {
            *last ^= 1;
        }
        let forged: SignedTagRecord = codec::decode(&bytes).unwrap();
        index
            .apply(
                &Change::Kept {
                    entry: Kept::Record { record: forged },
                },
                10,
            )
            .unwrap();
        let tag = "v0".parse().unwrap();
        assert!(index.record(&repo(0), &tag).unwrap().is_none());
        assert!(index.tags_naming(&repo(0), &digest(1)).unwrap().is_empty());
        index
            .apply(
                &Change::Kept {
                    entry: Kept::Record { record: good },
                },
                20,
            )
            .unwrap();
        assert!(index.record(&repo(0), &tag).unwrap().is_some());
    }

    #[tokio::test]
    async fn a_corrupt_snapshot_line_is_skipped_and_reported_by_fsck() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        commit_all(&store, history(0)).await;
        store.compact().await.unwrap();
        drop(store);
        idle(dir.path()).await;
        let path = dir.path().join("journal.v1.log");
        let mut bytes = std::fs::read(&path).unwrap();
        // The third line of the snapshot: flip a byte of its JSON.
        let third = bytes
            .iter()
            .enumerate()
            .filter(|(_, b)| **b == b'\n')
            .nth(1)
            .map(|(i, _)| i + 30)
            .unwrap();
        bytes[third] ^= 0x20;
        std::fs::write(&path, &bytes).unwrap();
        let r = dir.path().to_owned();
        let report = tokio::task::spawn_blocking(move || crate::store::fsck(&r, false))
            .await
            .unwrap()
            .unwrap();
        assert!(
            report
                .problems
                .iter()
                .any(|p| p.contains("fails its checksum")),
            "{:?}",
            report.problems
        );
    }

    /// The measurement behind the numbers in the compaction's report: a journal of a million
    /// records (`SHOAL_BENCH_RECORDS` to change it) over 3,000 tags, each record superseding
    /// the one before on its tag, then `fsck` and a cold start (index deleted, rebuilt) timed
    /// before and after a compaction. Minutes: run it by hand with
    /// `cargo nextest run -p shoal-node --run-ignored only compaction_bench --no-capture`.
    #[tokio::test(flavor = "multi_thread")]
    #[ignore = "minutes; a measurement, not a check"]
    async fn compaction_bench() {
        let records: u64 = std::env::var("SHOAL_BENCH_RECORDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1_000_000);
        const TAGS: u64 = 3000;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.v1.log");
        let started = Instant::now();
        {
            let key = SigningKey::from_seed([7; 32]);
            let mut out = BufWriter::with_capacity(1 << 20, std::fs::File::create(&path).unwrap());
            for n in 0..records {
                let (r, t) = ((n % TAGS) / 100, n % TAGS);
                let record = TagRecord {
                    repo: repo(r as usize),
                    tag: format!("v{t}").parse().unwrap(),
                    target: Some(TagTarget {
                        manifest: digest(n),
                        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                        size: 2,
                        blobs: vec![],
                    }),
                    timestamp_ms: 1 + n,
                    sequence: 0,
                    publisher: key.public(),
                };
                let change = Change::Record {
                    record: SignedTagRecord::sign(&record, &key).unwrap(),
                    immutable: false,
                };
                out.write_all(&journal::encode(&change).unwrap()).unwrap();
            }
            out.flush().unwrap();
        }
        let len = std::fs::metadata(&path).unwrap().len();
        eprintln!(
            "bench: wrote {records} records over {TAGS} tags, {len} bytes, in {:?}",
            started.elapsed()
        );
        let root = dir.path().to_owned();
        let time = |what: &str, f: &dyn Fn()| {
            let t = Instant::now();
            f();
            eprintln!("bench: {what}: {:?}", t.elapsed());
        };
        let cold_start = || {
            let _ = std::fs::remove_dir_all(root.join("index"));
            let store = Store::open(&root).unwrap();
            drop(store);
        };
        let fsck = || {
            for _ in 0..500 {
                match crate::store::fsck(&root, false) {
                    Ok(report) => {
                        assert!(report.is_clean(), "{:?}", report.problems);
                        return;
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
                }
            }
            panic!("fsck never ran");
        };
        tokio::task::block_in_place(|| {
            time("cold start before compaction (index rebuilt)", &cold_start);
            std::thread::sleep(std::time::Duration::from_millis(200));
            time("fsck before compaction", &fsck);
        });
        let store = reopen(&root).await;
        let t = Instant::now();
        let report = store.compact().await.unwrap();
        eprintln!("bench: compaction: {:?}: {report:?}", t.elapsed());
        drop(store);
        idle(&root).await;
        tokio::task::block_in_place(|| {
            time("cold start after compaction (index rebuilt)", &cold_start);
            std::thread::sleep(std::time::Duration::from_millis(200));
            time("fsck after compaction", &fsck);
        });
        eprintln!(
            "bench: journal {len} bytes before, {} after",
            std::fs::metadata(&path).unwrap().len()
        );
    }
}
