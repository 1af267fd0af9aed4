//! Which chunks of each whole blob this node is sending and has sent to peers, for the
//! [`ServeReport`] in its `Have` answers.
//!
//! A downloader that knows a seeder already sent a chunk to someone waits a little for that copy
//! to reach another peer instead of asking the seeder again (see *Seeders* in
//! [`plan`](crate::fetch::plan)), so that a rollout costs the seeder's uplink about one copy of
//! the blob. Only whole-chunk transfers of stored blobs are logged: a range that is not one chunk
//! (a client's `Range` read relayed by a peer) says nothing about which chunk the asker lacks.
//!
//! The log lives in memory only: after a restart a seeder reports nothing sent, and downloaders
//! simply ask it as they would have without a report. It holds at most [`MAX_LOGGED_BLOBS`]
//! blobs; the least recently served one is forgotten first.
//!
//! The bookkeeping of one blob, [`ChunkSends`], is plain data with no lock and no I/O: the
//! fleet simulator (`shoal-simulations`) keeps its seeders' logs with it, so the one-copy rule
//! it models is the node's own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use shoal_protocol::message::ServeReport;
use shoal_protocol::{Bitfield, Digest};
use tokio::sync::watch;

use crate::store::{Store, StoreError};

/// Most blobs whose serves are logged at once.
pub const MAX_LOGGED_BLOBS: usize = 256;

/// The upload logs of the blobs this node serves.
#[derive(Debug, Default)]
pub struct ServeLog {
    blobs: Mutex<Blobs>,
}

#[derive(Debug, Default)]
struct Blobs {
    map: HashMap<Digest, Arc<BlobLog>>,
    /// Bumped on every use, to find the least recently used blob.
    clock: u64,
}

/// The log of one blob.
#[derive(Debug)]
pub struct BlobLog {
    chunk_size: u64,
    chunk_count: u32,
    size: u64,
    state: Mutex<State>,
    version: watch::Sender<u64>,
}

#[derive(Debug)]
struct State {
    sends: ChunkSends,
    last_used: u64,
}

impl ServeLog {
    /// The log of `digest` (a blob of `size` bytes cut in `chunk_size` chunks), created if new.
    pub fn blob(&self, digest: &Digest, size: u64, chunk_size: u64) -> Arc<BlobLog> {
        let mut blobs = lock(&self.blobs);
        blobs.clock += 1;
        let now = blobs.clock;
        if let Some(log) = blobs.map.get(digest) {
            let log = log.clone();
            lock(&log.state).last_used = now;
            return log;
        }
        if blobs.map.len() >= MAX_LOGGED_BLOBS {
            let oldest = blobs
                .map
                .iter()
                .min_by_key(|(_, log)| lock(&log.state).last_used)
                .map(|(d, _)| d.clone());
            if let Some(oldest) = oldest {
                blobs.map.remove(&oldest);
            }
        }
        let chunk_size = chunk_size.max(1);
        let chunk_count = u32::try_from(size.div_ceil(chunk_size)).unwrap_or(u32::MAX);
        let log = Arc::new(BlobLog {
            chunk_size,
            chunk_count,
            size,
            state: Mutex::new(State {
                sends: ChunkSends::new(chunk_count),
                last_used: now,
            }),
            version: watch::Sender::new(0),
        });
        blobs.map.insert(digest.clone(), log.clone());
        log
    }

    /// The log of `digest`, a blob of `size` bytes this node stores whole: the one there is, or
    /// a new one cut as the blob's `BlobIndex` says (read only then). `None` without an index.
    pub async fn for_stored(
        &self,
        store: &Store,
        digest: &Digest,
        size: u64,
    ) -> Result<Option<Arc<BlobLog>>, StoreError> {
        if let Some(log) = self.get(digest) {
            return Ok(Some(log));
        }
        Ok(store
            .blob_index(digest)
            .await?
            .map(|index| self.blob(digest, size, index.chunk_size().into())))
    }

    /// The log of a download this node fetches from an upstream (it seeds the fleet), `None`
    /// for any other download.
    pub fn for_upstream_fetch(
        &self,
        partial: &crate::store::partial::Partial,
    ) -> Option<Arc<BlobLog>> {
        partial.is_upstream_fetch().then(|| {
            let index = partial.index();
            self.blob(index.digest(), index.size(), index.chunk_size().into())
        })
    }

    /// The log of `digest` if there is one.
    pub fn get(&self, digest: &Digest) -> Option<Arc<BlobLog>> {
        let mut blobs = lock(&self.blobs);
        blobs.clock += 1;
        let now = blobs.clock;
        let log = blobs.map.get(digest).cloned()?;
        lock(&log.state).last_used = now;
        Some(log)
    }
}

impl BlobLog {
    /// Logs the start of a transfer of `length` bytes at `offset`, if that is exactly one chunk
    /// and no other transfer of that chunk is under way (then it is declined: one copy of a
    /// chunk at a time leaves a seeder). The transfer counts as sending until the guard is
    /// dropped, and as sent if [`Sending::finish`] was called first.
    ///
    /// Why decline: every downloader that asks a seeder for a chunk it is sending already
    /// would take a share of the same uplink for a copy the fleet is about to have; the
    /// seeder's uplink is best spent on chunks nobody is getting from it, and the requester,
    /// told "busy", asks for another chunk or another holder. The refusal ends with the
    /// transfer, so no chunk is ever refused for good.
    pub fn start(self: &Arc<Self>, offset: u64, length: u64) -> Start {
        let Some(chunk) = self.whole_chunk(offset, length) else {
            return Start::Unlogged;
        };
        {
            let mut state = lock(&self.state);
            match state.sends.start(chunk) {
                SendStart::Started { .. } => self.publish(&state.sends),
                SendStart::Declined => return Start::Declined,
                SendStart::OutOfRange => return Start::Unlogged,
            }
        }
        Start::Logged(Sending {
            log: self.clone(),
            chunk,
            finished: false,
        })
    }

    /// The chunk that `length` bytes at `offset` are exactly, if they are one.
    fn whole_chunk(&self, offset: u64, length: u64) -> Option<u32> {
        if offset % self.chunk_size != 0 {
            return None;
        }
        let chunk = u32::try_from(offset / self.chunk_size).ok()?;
        let expected = self.chunk_size.min(self.size.saturating_sub(offset));
        (chunk < self.chunk_count && length == expected).then_some(chunk)
    }

    /// The blob's chunk count.
    pub fn chunk_count(&self) -> u32 {
        self.chunk_count
    }

    /// The current report.
    pub fn report(&self) -> ServeReport {
        let state = lock(&self.state);
        ServeReport {
            version: state.sends.version(),
            sending: state.sends.sending().to_bytes(),
            sent: state.sends.sent().to_bytes(),
        }
    }

    /// The report's version, to wait on for a change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Tells the waiting long polls the report's new version. Called with the state locked, so
    /// that two changes at once cannot publish their versions in the wrong order.
    fn publish(&self, sends: &ChunkSends) {
        self.version.send_replace(sends.version());
    }
}

/// Another transfer of the chunk leaves this node right now ([`begin`]): answer "busy".
#[derive(Debug)]
pub struct Declined;

/// Starts logging a transfer of `length` bytes at `offset` in `log`, if there is one: the
/// guard of a logged send, if it is one.
pub fn begin(
    log: Option<Arc<BlobLog>>,
    offset: u64,
    length: u64,
) -> Result<Option<Sending>, Declined> {
    match log.map(|log| log.start(offset, length)) {
        Some(Start::Declined) => Err(Declined),
        Some(Start::Logged(sending)) => Ok(Some(sending)),
        Some(Start::Unlogged) | None => Ok(None),
    }
}

/// What [`BlobLog::start`] made of a request.
#[derive(Debug)]
pub enum Start {
    /// One whole chunk, logged as sending until the guard is dropped.
    Logged(Sending),
    /// Not exactly one chunk (a range a resumed or streamed read asks for): served, not logged.
    Unlogged,
    /// The chunk is on its way to another peer already: answer "busy".
    Declined,
}

#[cfg(test)]
impl Start {
    fn logged(self) -> Option<Sending> {
        match self {
            Start::Logged(s) => Some(s),
            _ => None,
        }
    }
}

/// A transfer under way; see [`BlobLog::start`].
#[derive(Debug)]
pub struct Sending {
    log: Arc<BlobLog>,
    chunk: u32,
    finished: bool,
}

impl Sending {
    /// The whole chunk was written to the peer.
    pub fn finish(mut self) {
        self.finished = true;
    }
}

impl Drop for Sending {
    fn drop(&mut self) {
        let mut state = lock(&self.log.state);
        state.sends.end(self.chunk, self.finished);
        self.log.publish(&state.sends);
    }
}

/// What a downloader's plan makes of one chunk of a seeder's serve report, and all it acts on:
/// a chunk sent in full once counts as given away whether or not it is being sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Claim {
    /// Neither being sent nor sent.
    Unclaimed,
    /// On its way to a peer, and never sent in full.
    Sending,
    /// Sent in full at least once.
    Sent,
}

impl Claim {
    /// The claim on `chunk` of a report with these bitfields.
    pub fn of(sending: &Bitfield, sent: &Bitfield, chunk: u32) -> Claim {
        Claim::from_flags(sending.get(chunk), sent.get(chunk))
    }

    fn from_flags(sending: bool, sent: bool) -> Claim {
        match (sending, sent) {
            (_, true) => Claim::Sent,
            (true, false) => Claim::Sending,
            (false, false) => Claim::Unclaimed,
        }
    }
}

/// What [`ChunkSends::start`] made of a transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendStart {
    /// Counted as sending until [`ChunkSends::end`]; `claim_changed` if the chunk's [`Claim`]
    /// changed (it had not been sent in full before).
    Started {
        /// Whether the chunk's [`Claim`] changed.
        claim_changed: bool,
    },
    /// The chunk is on its way to another peer already: one copy at a time (see
    /// [`BlobLog::start`]).
    Declined,
    /// The blob has no such chunk.
    OutOfRange,
}

/// One blob's serves from a seeder: which chunks are on their way to a peer, which were sent
/// in full at least once, and the counters that say when the report changed. Plain data: the
/// caller locks it ([`BlobLog`]) or owns it (the simulator).
#[derive(Debug, Clone)]
pub struct ChunkSends {
    /// Chunk → whether a transfer of it is under way (one at a time).
    sending: Vec<bool>,
    sent: Bitfield,
    /// Bumped at every start and end of a transfer: the report's version.
    version: u64,
    /// Bumped when a chunk's [`Claim`] changes: the only changes a downloader's plan acts on.
    visible: u64,
}

impl ChunkSends {
    /// Nothing sent yet of a blob of `chunk_count` chunks.
    pub fn new(chunk_count: u32) -> ChunkSends {
        ChunkSends {
            sending: vec![false; chunk_count as usize],
            sent: Bitfield::new(chunk_count),
            version: 0,
            visible: 0,
        }
    }

    /// A transfer of `chunk` is to start: counted as sending, unless another one is under way
    /// (then declined, and nothing changes).
    pub fn start(&mut self, chunk: u32) -> SendStart {
        let before = self.claim(chunk);
        let Some(sending) = self.sending.get_mut(chunk as usize) else {
            return SendStart::OutOfRange;
        };
        if *sending {
            return SendStart::Declined;
        }
        *sending = true;
        SendStart::Started {
            claim_changed: self.changed(chunk, before),
        }
    }

    /// A transfer of `chunk` ends, `finished` (the whole chunk was written) or cut short.
    /// Returns whether the chunk's [`Claim`] changed.
    pub fn end(&mut self, chunk: u32, finished: bool) -> bool {
        let before = self.claim(chunk);
        let Some(sending) = self.sending.get_mut(chunk as usize) else {
            return false;
        };
        *sending = false;
        if finished {
            self.sent.set(chunk);
        }
        self.changed(chunk, before)
    }

    /// Bumps the version, and the visible count if `chunk`'s claim is no longer `before`.
    fn changed(&mut self, chunk: u32, before: Claim) -> bool {
        self.version = self.version.wrapping_add(1).max(1);
        let changed = self.claim(chunk) != before;
        self.visible = self.visible.wrapping_add(u64::from(changed));
        changed
    }

    /// The claim a report taken now makes on `chunk`.
    pub fn claim(&self, chunk: u32) -> Claim {
        Claim::from_flags(self.is_sending(chunk), self.sent.get(chunk))
    }

    /// Whether a transfer of `chunk` is under way.
    pub fn is_sending(&self, chunk: u32) -> bool {
        self.sending.get(chunk as usize).is_some_and(|s| *s)
    }

    /// The chunks on their way to a peer, as a report carries them.
    pub fn sending(&self) -> Bitfield {
        let mut sending = Bitfield::new(self.sent.len());
        for (chunk, _) in self.sending.iter().enumerate().filter(|(_, s)| **s) {
            sending.set(chunk as u32);
        }
        sending
    }

    /// The chunks sent in full at least once.
    pub fn sent(&self) -> &Bitfield {
        &self.sent
    }

    /// The report's version: 0 before the first transfer, then changed (never back to 0) at
    /// every start and end of one.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// How many times a chunk's [`Claim`] changed: a report whose count is the same as an
    /// earlier one's changes nothing a downloader's plan acts on.
    pub fn visible(&self) -> u64 {
        self.visible
    }
}

/// Locks a mutex, going on with the data if a panicking thread poisoned it: every update here
/// leaves the state consistent at each step.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(report_bytes: &[u8], n: u32) -> Vec<u32> {
        Bitfield::from_bytes(report_bytes, n)
            .unwrap()
            .iter_ones()
            .collect()
    }

    #[test]
    fn whole_chunks_are_logged_while_sending_and_once_sent() {
        let log = ServeLog::default();
        let digest = Digest::sha256(b"blob");
        // 10 bytes in chunks of 4: the last chunk has 2 bytes.
        let blob = log.blob(&digest, 10, 4);
        let mut version = blob.subscribe();
        assert_eq!(*version.borrow_and_update(), 0);
        let a = blob.start(4, 4).logged().expect("chunk 1");
        let b = blob.start(8, 2).logged().expect("chunk 2, short");
        for (offset, length, why) in [
            (2, 4, "not chunk-aligned"),
            (0, 10, "more than a chunk"),
            (12, 4, "out of the blob"),
        ] {
            assert!(
                matches!(blob.start(offset, length), Start::Unlogged),
                "{why}"
            );
        }
        assert!(
            matches!(blob.start(4, 4), Start::Declined),
            "chunk 1 is on its way to another peer"
        );
        assert!(version.has_changed().unwrap());
        let report = blob.report();
        assert_eq!(bits(&report.sending, 3), vec![1, 2]);
        assert_eq!(bits(&report.sent, 3), Vec::<u32>::new());
        a.finish();
        drop(b); // cut short: not sent
        let report = blob.report();
        assert_eq!(bits(&report.sending, 3), Vec::<u32>::new());
        assert_eq!(bits(&report.sent, 3), vec![1]);
        assert!(report.version >= 4);
        let again = blob
            .start(4, 4)
            .logged()
            .expect("chunk 1 again, once the first copy is out");
        drop(again);
        assert!(Arc::ptr_eq(&log.get(&digest).unwrap(), &blob));
    }

    #[test]
    fn a_chunk_goes_out_one_copy_at_a_time() {
        let mut sends = ChunkSends::new(3);
        assert_eq!(
            sends.start(1),
            SendStart::Started {
                claim_changed: true
            }
        );
        assert_eq!(sends.start(1), SendStart::Declined, "already on its way");
        assert_eq!(sends.start(3), SendStart::OutOfRange);
        assert!(sends.is_sending(1));
        assert!(sends.end(1, false), "cut short: no longer claimed");
        assert_eq!(
            sends.start(1),
            SendStart::Started {
                claim_changed: true
            },
            "the refusal ends with the transfer"
        );
        assert!(sends.end(1, true));
        assert_eq!(sends.sent().iter_ones().collect::<Vec<_>>(), vec![1]);
        assert_eq!(sends.sending().count_ones(), 0);
    }

    #[test]
    fn every_start_and_end_changes_the_version_and_claim_changes_the_visible_count() {
        let mut sends = ChunkSends::new(2);
        assert_eq!((sends.version(), sends.visible()), (0, 0));
        sends.start(0);
        assert_eq!(sends.claim(0), Claim::Sending);
        assert_eq!((sends.version(), sends.visible()), (1, 1));
        sends.start(0); // declined
        assert_eq!((sends.version(), sends.visible()), (1, 1));
        sends.end(0, true);
        assert_eq!(sends.claim(0), Claim::Sent);
        assert_eq!((sends.version(), sends.visible()), (2, 2));
        // Sent once counts as given away: sending it again changes no claim.
        assert_eq!(
            sends.start(0),
            SendStart::Started {
                claim_changed: false
            }
        );
        assert!(!sends.end(0, true));
        assert_eq!((sends.version(), sends.visible()), (4, 2));
        assert_eq!(sends.claim(1), Claim::Unclaimed);
        assert!(!sends.end(5, true), "no such chunk");
        assert_eq!(sends.version(), 4);
    }

    #[test]
    fn a_report_claims_what_the_log_claimed_when_it_was_taken() {
        let mut sends = ChunkSends::new(3);
        sends.start(0);
        sends.start(1);
        sends.end(1, true);
        sends.start(1);
        let (sending, sent) = (sends.sending(), sends.sent().clone());
        for chunk in 0..3 {
            assert_eq!(Claim::of(&sending, &sent, chunk), sends.claim(chunk));
        }
        assert_eq!(Claim::of(&sending, &sent, 0), Claim::Sending);
        assert_eq!(Claim::of(&sending, &sent, 1), Claim::Sent);
        assert_eq!(Claim::of(&sending, &sent, 2), Claim::Unclaimed);
    }

    #[test]
    fn the_least_recently_served_blob_is_forgotten_first() {
        let log = ServeLog::default();
        let digests: Vec<Digest> = (0..=MAX_LOGGED_BLOBS)
            .map(|i| Digest::sha256(&i.to_be_bytes()))
            .collect();
        for d in &digests[..MAX_LOGGED_BLOBS] {
            log.blob(d, 8, 4);
        }
        log.blob(&digests[0], 8, 4); // used again
        log.blob(&digests[MAX_LOGGED_BLOBS], 8, 4);
        assert!(log.get(&digests[0]).is_some());
        assert!(log.get(&digests[1]).is_none());
        assert!(log.get(&digests[MAX_LOGGED_BLOBS]).is_some());
    }
}
