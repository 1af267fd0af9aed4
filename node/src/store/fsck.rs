//! `shoal fsck`: checks a data directory against its own truth, and rebuilds the index.
//!
//! The check hashes every blob file and compares it with its name, replays the journal (its
//! snapshot and tail, if it was compacted) into a scratch index and compares that with the real
//! one, and checks that every blob the index
//! names is on disk. `--repair` moves corrupt blob files to `quarantine/` and rebuilds the index
//! from the journal and the upload directories. It must run while no node uses the directory
//! (sled holds a lock on the index).

use std::fs;
use std::path::Path;

use shoal_protocol::{Digest, DigestHasher};

use super::index::Index;
use super::{Layout, StoreError, journal, upload};

/// What `fsck` found.
#[derive(Debug, Default)]
pub struct FsckReport {
    /// Blob files hashed.
    pub blobs_checked: u64,
    /// Bytes hashed.
    pub bytes_checked: u64,
    /// Journal records replayed.
    pub records: u64,
    /// Problems that remain.
    pub problems: Vec<String>,
    /// What `--repair` fixed.
    pub repaired: Vec<String>,
}

impl FsckReport {
    /// Whether the store is consistent (after repairs, if any were made).
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

fn hash(path: &Path, digest: &Digest) -> Result<(Digest, u64), StoreError> {
    let mut hasher = DigestHasher::new(digest.algorithm());
    let total = super::scan_file(fs::File::open(path)?, |block| hasher.update(block))?;
    Ok((hasher.finish(), total))
}

/// Checks (and with `repair`, fixes) the data directory at `root`. Blocking.
pub fn fsck(root: &Path, repair: bool) -> Result<FsckReport, StoreError> {
    let layout = Layout::new(root);
    if !root.is_dir() {
        return Err(StoreError::Corrupt(format!(
            "{} is not a data directory",
            root.display()
        )));
    }
    let mut report = FsckReport::default();
    check_blobs(&layout, repair, &mut report)?;

    let scratch = Index::temporary()?;
    let scan = journal::read(&layout.journal(), 0, |change, end| {
        report.records += 1;
        scratch.apply(&change, end)
    })?;
    for offset in scan.corrupt {
        report.problems.push(format!(
            "journal record at byte {offset} fails its checksum"
        ));
    }

    // Fails while a node holds the index's lock; `shoal fsck` says so.
    let index = Index::open(&layout.index())?;
    // What a node start does: apply the journal tail the index has not seen (or rebuild it, if
    // it was applied to another generation of the journal).
    journal::replay(&layout.journal(), &index)?;
    // Stale `blob_repos.v1` entries aside: a compaction drops them, and they change nothing.
    let (ours, replayed) = (
        index.dump_comparable_trees()?,
        scratch.dump_comparable_trees()?,
    );
    let differs: Vec<&str> = ours
        .iter()
        .zip(&replayed)
        .filter(|(a, b)| a != b)
        .map(|(a, _)| a.0.as_str())
        .collect();
    if !differs.is_empty() {
        let what = format!("index trees {} differ from the journal", differs.join(", "));
        if repair {
            index.clear_journal_state()?;
            journal::read(&layout.journal(), 0, |change, end| {
                index.apply(&change, end)
            })?;
            report
                .repaired
                .push(format!("{what}: rebuilt from the journal"));
        } else {
            report.problems.push(what);
        }
    }
    if repair {
        upload::reconcile(&layout, &index)?;
    }
    // A current record from beyond the clock skew would pin its tag until that time comes; a
    // node refuses such records, and re-derives the tag at start (see `tags`). Judged in the
    // fleet's time, as the node last knew it (see `crate::clock`).
    let clock = crate::clock::FleetClock::new();
    clock.keep_in(root);
    let latest = clock
        .now_ms()
        .saturating_add(crate::auth::MAX_CLOCK_SKEW.as_millis() as u64);
    let mut ahead = Vec::new();
    let _all = index.visit_records(None, |signed| {
        if let Ok(v) = signed.verify()
            && v.record().timestamp_ms > latest
        {
            let r = v.record();
            ahead.push(format!(
                "{}:{} is named by a record from the future (timestamp {} ms, publisher {}; \
                 this node's clock corrected by {} ms); the next node start falls back to an \
                 earlier record",
                r.repo,
                r.tag,
                r.timestamp_ms,
                r.publisher,
                clock.offset_ms()
            ));
        }
        std::ops::ControlFlow::Continue(())
    })?;
    report.problems.extend(ahead);
    for (repo, digest) in index.referenced_blobs()? {
        if !layout.blob(&digest).is_file() {
            report
                .problems
                .push(format!("{repo} references {digest}, which is not on disk"));
        }
    }
    index.flush()?;
    Ok(report)
}

fn check_blobs(layout: &Layout, repair: bool, report: &mut FsckReport) -> Result<(), StoreError> {
    let blobs = layout.blobs();
    if !blobs.is_dir() {
        return Ok(());
    }
    for alg in fs::read_dir(&blobs)? {
        let alg = alg?;
        for prefix in fs::read_dir(alg.path())? {
            let prefix = prefix?;
            for file in fs::read_dir(prefix.path())? {
                let path = file?.path();
                let name = format!(
                    "{}:{}",
                    alg.file_name().to_string_lossy(),
                    path.file_name()
                        .map(|n| n.to_string_lossy())
                        .unwrap_or_default()
                );
                let problem = match name.parse::<Digest>() {
                    Err(_) => Some(format!("stray file {}", path.display())),
                    Ok(digest) if layout.blob(&digest) != path => {
                        Some(format!("blob {} is in the wrong directory", path.display()))
                    }
                    Ok(digest) => {
                        let (actual, len) = hash(&path, &digest)?;
                        report.blobs_checked += 1;
                        report.bytes_checked += len;
                        (actual != digest).then(|| format!("blob {digest} hashes to {actual}"))
                    }
                };
                if let Some(problem) = problem {
                    if repair {
                        let q = layout.root().join("quarantine");
                        fs::create_dir_all(&q)?;
                        let to = q.join(path.file_name().unwrap_or_default());
                        fs::rename(&path, &to)?;
                        report
                            .repaired
                            .push(format!("{problem}: moved to {}", to.display()));
                    } else {
                        report.problems.push(problem);
                    }
                }
            }
        }
    }
    Ok(())
}
