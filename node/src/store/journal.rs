//! The records log: every change to what a repository names, appended and fsynced before it is
//! acknowledged. With the blob files it is the truth; the sled index is rebuilt from it.
//!
//! Format (`journal.v1.log`): one record per line, `<16 hex: first 8 bytes of BLAKE3 of the
//! JSON> <JSON change>\n`. A line without its newline at the end of the file is a write that a
//! crash cut short; it was never acknowledged, and opening the journal truncates it. A complete
//! line whose checksum does not match is corruption: it is skipped and reported by `fsck`.
//!
//! One thread owns the file. Callers queue batches of changes on a bounded channel; the thread
//! writes everything queued, fsyncs once for all of it (group commit), applies it to the index
//! in log order, and only then answers, so the index never runs ahead of the log and concurrent
//! pushes share one fsync.
//!
//! A failed index (a write of sled's failed, as on a full disk: see [`super::index`]) refuses
//! batches before they are written, so a change is never in the log without the index being able
//! to hold it; before each batch, and when the index asks for it, the thread tries to open the
//! index again, which succeeds once the disk has room, and then replays what the index missed.
//!
//! Compaction keeps the log from growing forever (see [`super::compact`]): a snapshot of the
//! state (the changes that rebuild the index) replaces everything before it, and the file starts
//! a new *generation*. Offsets in the index are *logical*: the generation in the top 16 bits,
//! the byte offset in the file below, so an index applied to one generation is never read
//! against another (it is rebuilt from the file instead). A journal that was never compacted is
//! generation 0, whose logical offsets are its byte offsets.
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use super::StoreError;
use super::change::{Change, Kept};
use super::compact::{self, AutoCompact, CompactReport, Prepared};
use super::gate::Gate;
use super::index::Index;

/// Capacity of the queue of batches waiting for the journal thread.
const JOURNAL_QUEUE_CAPACITY: usize = 1024;
/// Most batches written under one fsync.
const GROUP_COMMIT_MAX_BATCHES: usize = 256;
/// Bits of a logical offset that hold the byte offset in the file (256 TiB per generation).
const OFFSET_BITS: u32 = 48;

/// The logical offset of byte `offset` of the journal of generation `generation`.
pub fn logical(generation: u16, offset: u64) -> u64 {
    (u64::from(generation) << OFFSET_BITS) | (offset & ((1 << OFFSET_BITS) - 1))
}

/// The generation and the byte offset of a logical offset.
pub fn split(logical: u64) -> (u16, u64) {
    // The shift leaves 16 bits, so the conversion cannot fail.
    let generation = u16::try_from(logical >> OFFSET_BITS).unwrap_or(u16::MAX);
    (generation, logical & ((1 << OFFSET_BITS) - 1))
}

/// Encodes one change as a journal line.
pub(super) fn encode(change: &Change) -> Result<Vec<u8>, StoreError> {
    let json = serde_json::to_vec(change).map_err(StoreError::encode("a journal line"))?;
    let sum = blake3::hash(&json);
    let mut line = Vec::with_capacity(json.len() + 18);
    line.extend_from_slice(hex::encode(&sum.as_bytes()[..8]).as_bytes());
    line.push(b' ');
    line.extend_from_slice(&json);
    line.push(b'\n');
    Ok(line)
}

/// Decodes one complete line (without its newline).
fn decode(line: &[u8]) -> Option<Change> {
    let (sum, json) = (line.get(..16)?, line.get(17..)?);
    if line.get(16) != Some(&b' ') {
        return None;
    }
    let expect = hex::encode(&blake3::hash(json).as_bytes()[..8]);
    if sum != expect.as_bytes() {
        return None;
    }
    serde_json::from_slice(json).ok()
}

/// The generation of the journal open as `file`: what its header line says, or 0 (a journal
/// never compacted has no header).
fn generation_of(file: &File) -> Result<u16, StoreError> {
    let mut first = Vec::new();
    BufReader::new(file.take(4096)).read_until(b'\n', &mut first)?;
    if first.last() != Some(&b'\n') {
        return Ok(0);
    }
    Ok(match decode(&first[..first.len() - 1]) {
        Some(Change::Kept {
            entry: Kept::Header { generation },
        }) => generation,
        _ => 0,
    })
}

/// What reading a journal found.
#[derive(Debug, Default)]
pub struct Scan {
    /// The journal's generation.
    pub generation: u16,
    /// Length of the file up to the end of its last complete line (bytes, not logical).
    pub complete_len: u64,
    /// Complete lines that did not decode (checksum or JSON), with their byte offsets.
    pub corrupt: Vec<u64>,
    /// Where the snapshot of a compacted journal ends, if the lines read went past it.
    pub snapshot_end: Option<u64>,
}

/// Reads the journal from byte `from` and hands each good change and the logical offset just
/// past it to `f`.
pub fn read(
    path: &Path,
    from: u64,
    f: impl FnMut(Change, u64) -> Result<(), StoreError>,
) -> Result<Scan, StoreError> {
    read_range(path, from, u64::MAX, f)
}

/// [`read`], stopping at byte `to` (a line boundary).
pub(super) fn read_range(
    path: &Path,
    from: u64,
    to: u64,
    mut f: impl FnMut(Change, u64) -> Result<(), StoreError>,
) -> Result<Scan, StoreError> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Scan::default()),
        Err(e) => return Err(e.into()),
    };
    let generation = generation_of(&file)?;
    file.seek(SeekFrom::Start(from))?;
    let mut reader = BufReader::with_capacity(1 << 20, file.take(to.saturating_sub(from)));
    let mut scan = Scan {
        generation,
        complete_len: from,
        ..Scan::default()
    };
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 || line.last() != Some(&b'\n') {
            break;
        }
        let start = scan.complete_len;
        scan.complete_len += n as u64;
        match decode(&line[..n - 1]) {
            Some(change) => {
                if matches!(
                    change,
                    Change::Kept {
                        entry: Kept::SnapshotEnd
                    }
                ) {
                    scan.snapshot_end = Some(scan.complete_len);
                }
                f(change, logical(generation, scan.complete_len))?
            }
            None => scan.corrupt.push(start),
        }
    }
    Ok(scan)
}

/// Brings `index` up to the journal at `path`, as a start does: applies what it has not seen
/// yet, or, if it was applied to another generation of the journal (a crash came between a
/// compaction's switch and the index's note of it), rebuilds it from the whole file.
pub fn replay(path: &Path, index: &Index) -> Result<Scan, StoreError> {
    let generation = match File::open(path) {
        Ok(file) => generation_of(&file)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e.into()),
    };
    let applied = index.applied_offset()?;
    let (applied_generation, offset) = split(applied);
    let from = if applied == 0 {
        0
    } else if applied_generation == generation {
        offset
    } else {
        tracing::warn!(
            index = applied_generation,
            journal = generation,
            "the index was applied to another generation of the journal; rebuilding it"
        );
        index.clear_journal_state()?;
        0
    };
    read(path, from, |change, end| index.apply(&change, end))
}

/// Where the snapshot of the compacted journal at `path` ends (0 if it has none). Reads the
/// snapshot.
fn snapshot_len(path: &Path, generation: u16) -> Result<u64, StoreError> {
    if generation == 0 {
        return Ok(0);
    }
    // The end marker is always the same line: compared, not decoded.
    let marker = encode(&Change::Kept {
        entry: Kept::SnapshotEnd,
    })?;
    let mut file = BufReader::with_capacity(1 << 20, File::open(path)?);
    let (mut at, mut line) = (0u64, Vec::new());
    loop {
        line.clear();
        let n = file.read_until(b'\n', &mut line)?;
        if n == 0 || line.last() != Some(&b'\n') {
            return Ok(0);
        }
        at += n as u64;
        if line == marker {
            return Ok(at);
        }
    }
}

struct Queued {
    changes: Vec<Change>,
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// Who is waiting for a compaction (nobody for an automatic one).
type CompactWaiter = Option<oneshot::Sender<Result<CompactReport, StoreError>>>;

/// What the journal thread is asked.
enum Command {
    /// Write a batch.
    Commit(Queued),
    /// Compact now.
    Compact(oneshot::Sender<Result<CompactReport, StoreError>>),
    /// A compaction's snapshot is ready (or failed): switch to it.
    Switch(Result<Prepared, StoreError>),
    /// The index failed, or refused a write because it has: try to open it again.
    Recover,
}

/// Handle to the journal thread.
#[derive(Clone)]
pub struct Journal {
    queue: mpsc::Sender<Command>,
}

impl Journal {
    /// Opens the journal at `path`, truncates a torn last line, replays what the index has not
    /// applied yet, and starts the writer thread. Compactions write their snapshot in
    /// `tmp_dir` (on the same file system, cleared at start) and run by themselves as `auto`
    /// says.
    pub fn open(
        path: &Path,
        tmp_dir: &Path,
        index: Index,
        gate: Arc<Gate>,
        auto: AutoCompact,
    ) -> Result<(Journal, std::thread::JoinHandle<()>), StoreError> {
        let applied = index.applied_offset()?;
        let scan = replay(path, &index)?;
        for offset in &scan.corrupt {
            tracing::error!(
                offset,
                "journal record failed its checksum; skipped (run shoal fsck)"
            );
        }
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)?;
        let len = file.metadata()?.len();
        let (applied_generation, applied_at) = split(applied);
        let end = if applied_generation == scan.generation {
            scan.complete_len.max(applied_at)
        } else {
            scan.complete_len
        };
        if len > end {
            tracing::warn!(
                torn_bytes = len - end,
                "truncating an unacknowledged torn journal write"
            );
            file.set_len(end)?;
            file.sync_all()?;
        }
        file.seek(SeekFrom::End(0))?;
        let snapshot_bytes = snapshot_len(path, scan.generation)?;
        let (queue, inbox) = mpsc::channel(JOURNAL_QUEUE_CAPACITY);
        // One nudge queued at a time, however many writes the failed index refuses.
        let recover_queued = Arc::new(AtomicBool::new(false));
        index.on_failure({
            let (queue, queued) = (queue.downgrade(), recover_queued.clone());
            move || {
                if !queued.swap(true, Ordering::AcqRel)
                    && queue
                        .upgrade()
                        .is_none_or(|q| q.try_send(Command::Recover).is_err())
                {
                    queued.store(false, Ordering::Release);
                }
            }
        });
        let writer = Writer {
            path: path.to_owned(),
            tmp_dir: tmp_dir.to_owned(),
            file,
            generation: scan.generation,
            offset: end,
            snapshot_bytes,
            auto,
            retry_after: 0,
            compacting: None,
            index,
            gate,
            myself: queue.downgrade(),
            recover_queued,
        };
        let thread = std::thread::Builder::new()
            .name("shoal-journal".into())
            .spawn(move || writer.run(inbox))?;
        Ok((Journal { queue }, thread))
    }

    /// Appends `changes` durably and applies them to the index.
    ///
    /// When this returns `Ok` the changes are on disk. If the future is cancelled after the batch
    /// was queued, the batch is still written: cancellation never tears a batch.
    pub async fn commit(&self, changes: Vec<Change>) -> Result<(), StoreError> {
        let (done, wait) = oneshot::channel();
        self.queue
            .send(Command::Commit(Queued { changes, done }))
            .await
            .map_err(|_| StoreError::Closed)?;
        wait.await.map_err(|_| StoreError::Closed)?
    }

    /// Compacts the journal now (see [`super::compact`]), or waits for the compaction under
    /// way. Commits go on meanwhile, except during the switch. Cancelling the future does not
    /// stop the compaction.
    pub async fn compact(&self) -> Result<CompactReport, StoreError> {
        let (done, wait) = oneshot::channel();
        self.queue
            .send(Command::Compact(done))
            .await
            .map_err(|_| StoreError::Closed)?;
        wait.await.map_err(|_| StoreError::Closed)?
    }
}

/// The journal thread's state.
struct Writer {
    path: PathBuf,
    tmp_dir: PathBuf,
    /// The journal, open for appending.
    file: File,
    generation: u16,
    /// Bytes of the journal (all complete lines).
    offset: u64,
    /// Bytes of its snapshot (0 if it was never compacted).
    snapshot_bytes: u64,
    auto: AutoCompact,
    /// After a failed automatic compaction, the next waits until the journal is this long.
    retry_after: u64,
    /// The waiters of the compaction under way, if one is.
    compacting: Option<Vec<CompactWaiter>>,
    index: Index,
    gate: Arc<Gate>,
    /// For compactions to hand their snapshot back, without keeping the thread alive.
    myself: mpsc::WeakSender<Command>,
    /// Whether a [`Command::Recover`] is queued.
    recover_queued: Arc<AtomicBool>,
}

impl Writer {
    fn run(mut self, mut inbox: mpsc::Receiver<Command>) {
        let mut batches = Vec::new();
        while let Some(first) = inbox.blocking_recv() {
            let mut other = None;
            match first {
                Command::Commit(b) => batches.push(b),
                command => other = Some(command),
            }
            while other.is_none() && !batches.is_empty() && batches.len() < GROUP_COMMIT_MAX_BATCHES
            {
                match inbox.try_recv() {
                    Ok(Command::Commit(b)) => batches.push(b),
                    Ok(command) => other = Some(command),
                    Err(_) => break,
                }
            }
            if !batches.is_empty() {
                // A closed store writes nothing more: every batch queued after the close is
                // refused.
                let gate = self.gate.clone();
                let result = gate.enter().and_then(|_open| {
                    self.recover()?;
                    self.write_and_apply(&batches)
                });
                for batch in batches.drain(..) {
                    // A caller that went away does not need its answer; its changes are written.
                    let _ = batch.done.send(result.clone());
                }
                if self.compacting.is_none()
                    && self.offset >= self.retry_after
                    && self.auto.is_due(self.offset, self.snapshot_bytes)
                {
                    tracing::info!(
                        journal_bytes = self.offset,
                        snapshot_bytes = self.snapshot_bytes,
                        "compacting the journal"
                    );
                    self.start_compaction(None);
                }
            }
            match other {
                None | Some(Command::Commit(_)) => {}
                Some(Command::Compact(done)) => self.start_compaction(Some(done)),
                Some(Command::Switch(prepared)) => self.finish_compaction(prepared),
                Some(Command::Recover) => {
                    self.recover_queued.store(false, Ordering::Release);
                    let gate = self.gate.clone();
                    // Failing, it is tried again at the next batch or refused write.
                    let _ = gate.enter().and_then(|_open| self.recover());
                }
            }
        }
        if let Some(_open) = self.gate.try_enter()
            && let Err(e) = self.index.flush()
        {
            tracing::error!(
                error = &e as &dyn std::error::Error,
                "flushing the index at shutdown"
            );
        }
    }

    /// Opens the index again if it failed and the disk has room (see [`Index::recover`]), and
    /// replays what it missed: the changes past its applied offset, which are those of the
    /// batches whose apply failed, and those sled had not written when it failed. `Ok` if the
    /// index is (again) able to take writes.
    fn recover(&mut self) -> Result<(), StoreError> {
        let path = self.path.clone();
        self.index
            .recover(|staged| replay(&path, staged).map(|_scan| ()))
    }

    fn write_and_apply(&mut self, batches: &[Queued]) -> Result<(), StoreError> {
        let mut buf = Vec::new();
        let mut ends = Vec::new();
        for change in batches.iter().flat_map(|b| &b.changes) {
            buf.extend_from_slice(&encode(change)?);
            ends.push(self.offset + buf.len() as u64);
        }
        if let Err(e) = self
            .file
            .write_all(&buf)
            .and_then(|()| self.file.sync_data())
        {
            // Leave no half-written line behind for the next batch to append to.
            let _ = self.file.set_len(self.offset);
            return Err(e.into());
        }
        self.offset += buf.len() as u64;
        let applied: Vec<(&Change, u64)> = batches
            .iter()
            .flat_map(|b| &b.changes)
            .zip(ends)
            .map(|(change, end)| (change, logical(self.generation, end)))
            .collect();
        self.index.apply_all(&applied)
    }

    /// Starts a compaction of the journal as it is now on a thread of its own, or joins `done`
    /// to the one under way.
    fn start_compaction(&mut self, done: CompactWaiter) {
        if let Some(waiters) = &mut self.compacting {
            waiters.push(done);
            return;
        }
        let Some(next) = self.generation.checked_add(1) else {
            if let Some(done) = done {
                let _ = done.send(Err(StoreError::Invariant(
                    "the journal ran out of generations",
                )));
            }
            return;
        };
        let job = compact::Job {
            path: self.path.clone(),
            tmp_dir: self.tmp_dir.clone(),
            upto: self.offset,
            generation: next,
            gate: self.gate.clone(),
            crash: self.auto.clone(),
        };
        let myself = self.myself.clone();
        let spawned = std::thread::Builder::new()
            .name("shoal-compact".into())
            .spawn(move || {
                let prepared = compact::prepare(&job);
                let sent = match myself.upgrade() {
                    Some(queue) => queue
                        .blocking_send(Command::Switch(prepared))
                        .map_err(|e| e.0),
                    None => Err(Command::Switch(prepared)),
                };
                // The store is gone: its next start clears the snapshot from tmp/.
                if let Err(Command::Switch(Ok(prepared))) = sent {
                    prepared.discard(&job.gate);
                }
            });
        match spawned {
            Ok(_) => self.compacting = Some(vec![done]),
            Err(e) => {
                if let Some(done) = done {
                    let _ = done.send(Err(e.into()));
                }
            }
        }
    }

    /// Switches to a compaction's snapshot, if it is ready, and answers who waits for it.
    fn finish_compaction(&mut self, prepared: Result<Prepared, StoreError>) {
        let started = Instant::now();
        let result = prepared.and_then(|p| {
            let tmp = p.tmp.clone();
            let gate = self.gate.clone();
            let switched = match gate.enter() {
                Ok(_open) => self.switch(p),
                // Closed: the snapshot stays in tmp/ for the next start to clear.
                Err(e) => return Err(e),
            };
            // Before the switch, the old journal stays in force and the snapshot goes (after
            // it, there is nothing left at that path).
            if switched.is_err()
                && let Some(_open) = gate.try_enter()
            {
                let _ = std::fs::remove_file(&tmp);
            }
            switched
        });
        let result = result.map(|mut report| {
            report.switch_ms = started.elapsed().as_millis() as u64;
            report
        });
        match &result {
            Ok(report) => {
                self.retry_after = 0;
                tracing::info!(?report, "journal compacted");
            }
            Err(e) => {
                self.retry_after = self.offset.saturating_add(self.auto.min_bytes);
                tracing::error!(
                    error = e as &dyn std::error::Error,
                    "compacting the journal failed; the journal is as it was"
                );
            }
        }
        for done in self.compacting.take().into_iter().flatten().flatten() {
            let _ = done.send(result.clone());
        }
    }

    /// Appends the tail (what was written since the snapshot was taken) to the snapshot and
    /// makes it the journal. Blocks commits for the time it takes to copy the tail and fsync.
    fn switch(&mut self, p: Prepared) -> Result<CompactReport, StoreError> {
        let Prepared {
            tmp,
            mut file,
            upto,
            generation,
            snapshot_bytes,
            mut report,
        } = p;
        if upto > self.offset {
            return Err(StoreError::Invariant(
                "a compaction's snapshot is ahead of the journal",
            ));
        }
        let mut buf = vec![0u8; super::sink::SINK_BUFFER_BYTES];
        let mut at = upto;
        while at < self.offset {
            let n = usize::try_from(self.offset - at)
                .unwrap_or(usize::MAX)
                .min(buf.len());
            let chunk = buf.get_mut(..n).unwrap_or_default();
            self.file.read_exact_at(chunk, at)?;
            file.write_all(chunk)?;
            at += n as u64;
        }
        file.sync_all()?;
        self.auto.crash_point(compact::Step::TailCopied)?;
        // The switch: before the rename the old journal is in force, after it the new one, and
        // from here on every write goes to the new one, whatever fails next.
        std::fs::rename(&tmp, &self.path)?;
        let tail = self.offset - upto;
        let new_len = snapshot_bytes + tail;
        let old_generation = self.generation;
        self.file = file;
        self.generation = generation;
        self.offset = new_len;
        self.snapshot_bytes = snapshot_bytes;
        self.auto.crash_point(compact::Step::Renamed)?;
        super::sync_dir(self.path.parent().unwrap_or(Path::new(".")))?;
        self.auto.crash_point(compact::Step::DirSynced)?;
        // Where the index is in the new journal: the same changes, moved by the compaction.
        let (applied_generation, applied) = split(self.index.applied_offset()?);
        if applied_generation == old_generation && applied >= upto && applied - upto <= tail {
            self.index
                .set_applied_offset(logical(generation, snapshot_bytes + applied - upto))?;
        } else {
            // The index missed a change of the old journal (an apply failed): rebuild it.
            self.index.clear_journal_state()?;
            read(&self.path, 0, |change, end| self.index.apply(&change, end))?;
        }
        // So that a crash now does not cost a rebuild of the index at the next start.
        self.index.flush()?;
        report.tail_bytes = tail;
        report.journal_bytes_after = new_len;
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_protocol::Digest;

    fn event(n: u8) -> Change {
        Change::Link {
            repo: "a/b".parse().unwrap(),
            digest: Digest::sha256(&[n]),
        }
    }

    #[test]
    fn lines_round_trip_and_detect_corruption() {
        let line = encode(&event(1)).unwrap();
        assert_eq!(decode(&line[..line.len() - 1]), Some(event(1)));
        let mut bad = line.clone();
        bad[20] ^= 1;
        assert_eq!(decode(&bad[..bad.len() - 1]), None);
        assert_eq!(decode(b""), None);
        assert_eq!(decode(b"0123456789abcdef"), None);
    }

    #[test]
    fn torn_tail_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let mut bytes = encode(&event(1)).unwrap();
        bytes.extend_from_slice(&encode(&event(2)).unwrap());
        let full = bytes.len();
        bytes.extend_from_slice(&encode(&event(3)).unwrap()[..10]);
        std::fs::write(&path, &bytes).unwrap();
        let mut seen = Vec::new();
        let scan = read(&path, 0, |e, _| {
            seen.push(e);
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, vec![event(1), event(2)]);
        assert_eq!(scan.complete_len, full as u64);
        assert!(scan.corrupt.is_empty());
    }
}
