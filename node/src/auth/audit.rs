//! The audit trail: every push, tag move, delete, policy change and denied request, one JSON
//! object per line in `audit.log` in the data directory, for `shoal audit` to read.
//!
//! Entries are queued on a bounded channel and written by one thread, so a request never waits
//! for the disk; when the queue is full an entry is dropped and counted (the next written entry
//! says how many were lost), because a flood of denied requests must not slow the node down.
//! No entry ever holds a secret: principals are names and token ids, never passwords or tokens.

use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// File in the data directory holding the audit trail.
pub const AUDIT_FILE: &str = "audit.log";
/// Entries waiting for the writer.
const QUEUE_CAPACITY: usize = 4096;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// A manifest was pushed (by digest, or under a tag).
    Push,
    /// A tag was pointed at a manifest.
    TagMove,
    /// A manifest, tag or blob was deleted.
    Delete,
    /// A fleet policy was signed here or accepted from a peer.
    PolicyChange,
    /// A request was refused: bad credentials, or a principal without the action.
    Denied,
    /// A client logged in at the token endpoint.
    Login,
}

/// One line of the audit trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// When, milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// Who: `local`, `anonymous`, `user:NAME`, `token:PRINCIPAL:ID`, `admin:KEY`, `peer:ID`.
    pub principal: String,
    /// What.
    pub action: Event,
    /// Where, if a repository is concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    /// Which tag or digest (or policy key), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// `ok`, or why not.
    pub outcome: String,
    /// The client's address, for requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// Entries dropped before this one because the queue was full.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dropped_before: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What the writer thread is sent.
#[derive(Debug)]
enum Msg {
    Entry(Entry),
    /// Write what is queued, flush, answer, and end.
    Close(std::sync::mpsc::SyncSender<()>),
}

/// The audit trail's writer (cheap to clone). Without a data directory it records nothing.
#[derive(Debug, Clone, Default)]
pub struct Audit {
    queue: Option<std::sync::mpsc::SyncSender<Msg>>,
    dropped: Arc<AtomicU64>,
    closed: Arc<std::sync::atomic::AtomicBool>,
}

impl Audit {
    /// A trail appended to `data_dir/audit.log` by a thread of its own, which ends when the
    /// last handle is dropped (after writing what was queued).
    pub fn open(data_dir: &Path) -> std::io::Result<Audit> {
        let path = data_dir.join(AUDIT_FILE);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        let (queue, inbox) = std::sync::mpsc::sync_channel::<Msg>(QUEUE_CAPACITY);
        std::thread::Builder::new()
            .name("shoal-audit".into())
            .spawn(move || write_entries(file, &path, inbox))?;
        Ok(Audit {
            queue: Some(queue),
            dropped: Arc::default(),
            closed: Arc::default(),
        })
    }

    /// Records an entry (its time is set here). Never blocks. Once the trail is closed,
    /// nothing more is recorded.
    pub fn record(&self, mut entry: Entry) {
        let Some(queue) = &self.queue else { return };
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        entry.time_ms = super::now_ms();
        entry.dropped_before = self.dropped.swap(0, Ordering::Relaxed);
        let dropped = entry.dropped_before;
        if queue.try_send(Msg::Entry(entry)).is_err() {
            self.dropped
                .fetch_add(dropped.saturating_add(1), Ordering::Relaxed);
        }
    }

    /// Stops the trail for every handle: what is queued is written and flushed, the writer
    /// thread ends, and nothing is appended to the file after this returns (the node's
    /// shutdown calls it before it closes the store). Blocking: waits for the writer.
    pub fn close(&self) {
        let Some(queue) = &self.queue else { return };
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let (done, flushed) = std::sync::mpsc::sync_channel(1);
        // The writer drains the queue, so this waits at most for the entries ahead of it; an
        // error means the writer is already gone.
        if queue.send(Msg::Close(done)).is_ok() {
            let _ = flushed.recv();
        }
    }
}

fn write_entries(file: std::fs::File, path: &Path, inbox: std::sync::mpsc::Receiver<Msg>) {
    let mut out = std::io::BufWriter::new(file);
    let mut next = inbox.recv().ok();
    while let Some(first) = next.take() {
        let mut closing = None;
        let mut result = Ok(());
        let mut msg = Some(first);
        // Whatever else is queued goes out with the first, then one flush.
        while let Some(m) = msg {
            match m {
                Msg::Entry(e) => {
                    result = result.and_then(|()| {
                        serde_json::to_writer(&mut out, &e)?;
                        out.write_all(b"\n")
                    });
                }
                Msg::Close(done) => closing = Some(done),
            }
            msg = inbox.try_recv().ok();
        }
        if let Err(e) = result.and_then(|()| out.flush()) {
            tracing::warn!(path = %path.display(), error = &e as &dyn std::error::Error, "writing the audit trail");
        }
        if let Some(done) = closing {
            let _ = done.send(());
            return;
        }
        next = inbox.recv().ok();
    }
}

/// Reads the audit trail of `data_dir`: every entry that parses, in order. Blocking.
pub fn read(data_dir: &Path) -> std::io::Result<Vec<Entry>> {
    let text = match std::fs::read_to_string(data_dir.join(AUDIT_FILE)) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

impl Entry {
    /// An entry of `action` by `principal` that went `outcome`.
    pub fn new(principal: String, action: Event, outcome: impl Into<String>) -> Entry {
        Entry {
            time_ms: 0,
            principal,
            action,
            repository: None,
            reference: None,
            outcome: outcome.into(),
            client: None,
            dropped_before: 0,
        }
    }

    /// The repository concerned.
    pub fn repository(mut self, repo: impl ToString) -> Entry {
        self.repository = Some(repo.to_string());
        self
    }

    /// The tag, digest or key concerned.
    pub fn reference(mut self, reference: impl ToString) -> Entry {
        self.reference = Some(reference.to_string());
        self
    }

    /// The client's address.
    pub fn client(mut self, client: Option<std::net::SocketAddr>) -> Entry {
        self.client = client.map(|c| c.to_string());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_written_in_order_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let audit = Audit::open(dir.path()).unwrap();
        audit.record(
            Entry::new("user:ana".into(), Event::Push, "ok")
                .repository("team/app")
                .reference("1.0"),
        );
        audit.record(Entry::new(
            "anonymous".into(),
            Event::Denied,
            "no pull on team/app",
        ));
        drop(audit);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let entries = loop {
            let entries = read(dir.path()).unwrap();
            if entries.len() == 2 || std::time::Instant::now() > deadline {
                break entries;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].action, Event::Push);
        assert_eq!(entries[0].reference.as_deref(), Some("1.0"));
        assert_eq!(entries[1].action, Event::Denied);
        assert!(entries[1].time_ms >= entries[0].time_ms);
    }

    #[test]
    fn a_closed_trail_has_written_everything_queued_and_takes_no_more() {
        let dir = tempfile::tempdir().unwrap();
        let audit = Audit::open(dir.path()).unwrap();
        let other_handle = audit.clone();
        for i in 0..100 {
            audit.record(Entry::new("local".into(), Event::Push, "ok").reference(i));
        }
        audit.close();
        // Written and flushed by the time close returns: no waiting.
        assert_eq!(read(dir.path()).unwrap().len(), 100);
        other_handle.record(Entry::new("local".into(), Event::Delete, "ok"));
        audit.close();
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert_eq!(
            read(dir.path()).unwrap().len(),
            100,
            "an entry after close was written"
        );
    }
}
