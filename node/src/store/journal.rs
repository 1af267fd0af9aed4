//! The records log: every change to what a repository names, appended and fsynced before it is
//! acknowledged. With the blob files it is the truth; the sled index is rebuilt from it.
//!
//! Format (`journal.v1.log`): one record per line, `<16 hex: first 8 bytes of BLAKE3 of the
//! JSON> <JSON event>\n`. A line without its newline at the end of the file is a write that a
//! crash cut short; it was never acknowledged, and opening the journal truncates it. A complete
//! line whose checksum does not match is corruption: it is skipped and reported by `fsck`.
//!
//! One thread owns the file. Callers queue batches of events on a bounded channel; the thread
//! writes everything queued, fsyncs once for all of it (group commit), applies it to the index
//! in log order, and only then answers, so the index never runs ahead of the log and concurrent
//! pushes share one fsync.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};
use shoal_protocol::{Digest, RepoName, SignedTagRecord};
use tokio::sync::{mpsc, oneshot};

use super::StoreError;
use super::index::Index;
use crate::manifest::ManifestInfo;

/// Capacity of the queue of batches waiting for the journal thread.
const JOURNAL_QUEUE_CAPACITY: usize = 1024;
/// Most batches written under one fsync.
const GROUP_COMMIT_MAX_BATCHES: usize = 256;

/// One change to the repository state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Event {
    /// The repository links a blob (an upload finished or a blob was mounted).
    Link {
        /// Repository.
        repo: RepoName,
        /// Blob.
        digest: Digest,
    },
    /// The blob was deleted from the repository (the file stays for other repositories).
    Unlink {
        /// Repository.
        repo: RepoName,
        /// Blob.
        digest: Digest,
    },
    /// A manifest was pushed to the repository; its bytes are the blob `digest`.
    Manifest {
        /// Repository.
        repo: RepoName,
        /// Manifest digest.
        digest: Digest,
        /// What the index keeps about it.
        info: ManifestInfo,
    },
    /// The manifest and every tag naming it were deleted from the repository.
    DeleteManifest {
        /// Repository.
        repo: RepoName,
        /// Manifest digest.
        digest: Digest,
    },
    /// A verified, trusted tag record (or tombstone). It becomes the tag's current record if
    /// it is newer than the one held, by (timestamp, sequence, publisher).
    Record {
        /// The record, as signed.
        #[serde(with = "record_hex")]
        record: SignedTagRecord,
    },
}

/// Signed records are kept in the journal in their exact signed encoding, hex-encoded, so the
/// signature still verifies when the journal is replayed.
mod record_hex {
    use serde::{Deserialize, Deserializer, Serializer};
    use shoal_protocol::{SignedTagRecord, codec};

    pub fn serialize<S: Serializer>(r: &SignedTagRecord, s: S) -> Result<S::Ok, S::Error> {
        let bytes = codec::encode(r).map_err(serde::ser::Error::custom)?;
        s.serialize_str(&hex::encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SignedTagRecord, D::Error> {
        let text = String::deserialize(d)?;
        let bytes = hex::decode(text).map_err(serde::de::Error::custom)?;
        codec::decode(&bytes).map_err(serde::de::Error::custom)
    }
}

/// Encodes one event as a journal line.
fn encode(event: &Event) -> Result<Vec<u8>, StoreError> {
    let json = serde_json::to_vec(event).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let sum = blake3::hash(&json);
    let mut line = Vec::with_capacity(json.len() + 18);
    line.extend_from_slice(hex::encode(&sum.as_bytes()[..8]).as_bytes());
    line.push(b' ');
    line.extend_from_slice(&json);
    line.push(b'\n');
    Ok(line)
}

/// Decodes one complete line (without its newline).
fn decode(line: &[u8]) -> Option<Event> {
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

/// What reading a journal found.
#[derive(Debug, Default)]
pub struct Scan {
    /// Length of the file up to the end of its last complete line.
    pub complete_len: u64,
    /// Complete lines that did not decode (checksum or JSON), with their byte offsets.
    pub corrupt: Vec<u64>,
}

/// Reads the journal from `from` and hands each good event and the offset just past it to `f`.
pub fn read(
    path: &Path,
    from: u64,
    mut f: impl FnMut(Event, u64) -> Result<(), StoreError>,
) -> Result<Scan, StoreError> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Scan::default()),
        Err(e) => return Err(e.into()),
    };
    let mut reader = BufReader::with_capacity(1 << 20, file);
    reader.seek(SeekFrom::Start(from))?;
    let mut scan = Scan {
        complete_len: from,
        corrupt: Vec::new(),
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
            Some(event) => f(event, scan.complete_len)?,
            None => scan.corrupt.push(start),
        }
    }
    Ok(scan)
}

struct Batch {
    events: Vec<Event>,
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// Handle to the journal thread.
#[derive(Clone)]
pub struct Journal {
    queue: mpsc::Sender<Batch>,
}

impl Journal {
    /// Opens the journal at `path`, truncates a torn last line, replays what the index has not
    /// applied yet, and starts the writer thread.
    pub fn open(
        path: &Path,
        index: Index,
    ) -> Result<(Journal, std::thread::JoinHandle<()>), StoreError> {
        let applied = index.applied_offset()?;
        let scan = read(path, applied, |event, end| index.apply(&event, end))?;
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
        let end = scan.complete_len.max(applied);
        if len > end {
            tracing::warn!(
                torn_bytes = len - end,
                "truncating an unacknowledged torn journal write"
            );
            file.set_len(end)?;
            file.sync_all()?;
        }
        file.seek(SeekFrom::End(0))?;
        let (queue, inbox) = mpsc::channel(JOURNAL_QUEUE_CAPACITY);
        let thread = std::thread::Builder::new()
            .name("shoal-journal".into())
            .spawn(move || run(file, end, index, inbox))?;
        Ok((Journal { queue }, thread))
    }

    /// Appends `events` durably and applies them to the index.
    ///
    /// When this returns `Ok` the events are on disk. If the future is cancelled after the batch
    /// was queued, the batch is still written: cancellation never tears a batch.
    pub async fn commit(&self, events: Vec<Event>) -> Result<(), StoreError> {
        let (done, wait) = oneshot::channel();
        self.queue
            .send(Batch { events, done })
            .await
            .map_err(|_| StoreError::Closed)?;
        wait.await.map_err(|_| StoreError::Closed)?
    }
}

fn run(mut file: File, mut offset: u64, index: Index, mut inbox: mpsc::Receiver<Batch>) {
    let mut batches = Vec::new();
    while let Some(first) = inbox.blocking_recv() {
        batches.push(first);
        while batches.len() < GROUP_COMMIT_MAX_BATCHES {
            match inbox.try_recv() {
                Ok(b) => batches.push(b),
                Err(_) => break,
            }
        }
        let result = write_and_apply(&mut file, &mut offset, &index, &batches);
        for batch in batches.drain(..) {
            // A caller that went away does not need its answer; its events are written.
            let _ = batch.done.send(result.clone());
        }
    }
    if let Err(e) = index.flush() {
        tracing::error!(error = %e, "flushing the index at shutdown");
    }
}

fn write_and_apply(
    file: &mut File,
    offset: &mut u64,
    index: &Index,
    batches: &[Batch],
) -> Result<(), StoreError> {
    let mut buf = Vec::new();
    let mut ends = Vec::new();
    for event in batches.iter().flat_map(|b| &b.events) {
        buf.extend_from_slice(&encode(event)?);
        ends.push(*offset + buf.len() as u64);
    }
    if let Err(e) = file.write_all(&buf).and_then(|()| file.sync_data()) {
        // Leave no half-written line behind for the next batch to append to.
        let _ = file.set_len(*offset);
        return Err(e.into());
    }
    *offset += buf.len() as u64;
    for (event, end) in batches.iter().flat_map(|b| &b.events).zip(ends) {
        index.apply(event, end)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: u8) -> Event {
        Event::Link {
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
