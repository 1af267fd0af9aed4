//! The `/shoal/sync/2` conversation: answering a peer's requests from the store, and
//! anti-entropy, which pages through a peer's records to catch up on what gossip missed.
//!
//! Answers are built here from the store's own values (records in order, held chunks, blob
//! indexes): the wire shapes (`SyncResponse`, `HaveChunks`, pages that fit one frame) belong to
//! the network, not to the store.
//!
//! Anti-entropy: each side first compares a summary (count and hash of the current records);
//! when they differ, it pages through the peer's records in (repository, tag) order and ingests
//! each through the tag state, which keeps only verified, trusted, newer records. In a fleet the
//! same runs first over the fleet's items (policies and member proofs), so that a node that was
//! offline learns the rules before the records they decide on.
//!
//! A peer cannot keep an exchange going ([`Progress`]): each page's cursor must come strictly
//! after the one before, the peer may send no more items than its own summary counted (plus
//! [`SYNC_SLACK_ITEMS`] written meanwhile, and at most [`MAX_SYNC_ITEMS`]) nor more than
//! [`MAX_SYNC_BYTES`] of them, and the whole exchange ends after [`MAX_SYNC_TIME`]. A peer that
//! breaks a rule ([`EntropyError::Violation`]) is scored down and disconnected by the event
//! loop, which logs it at most once per peer per [`WARN_INTERVAL`] ([`Warnings`]).
//!
//! A peer is answered only about what it may read ([`Auth::peer_may_read`]): the records,
//! summary, blob indexes and haves of a private repository's content go only to peers with a
//! grant for it; to others the repository does not exist.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use shoal_protocol::fleet::FleetItem;
use shoal_protocol::message::{
    ChunkHashes, HAVE_WAIT_MAX, HaveChunks, MAX_CHUNK_HASHES, MAX_SYNC_FLEET_ITEMS,
    MAX_SYNC_RECORDS, RecordsPage, SummaryHasher, SyncRequest, SyncResponse,
};
use shoal_protocol::{Bitfield, Digest, PublisherKey, RepoName, SignedTagRecord, Tag, codec};
use tokio::sync::mpsc;

use super::NetError;
use super::handle::{Command, sync_request};
use super::serve_log::{BlobLog, ServeLog};
use crate::auth::{Auth, ingest};
use crate::store::Store;
use crate::tags::{Ingest, Tags};

/// Who is asking, and so which records and blobs may be shown: all of them (this node itself, or no private repository),
/// or those of repositories the peer with this key may read.
#[derive(Clone)]
pub enum Reader {
    All,
    Peer(Auth, PublisherKey),
    /// A peer whose id is not a Shoal node's key: it reads nothing private.
    Stranger(Auth),
}

impl Reader {
    /// The reader for requests from `peer`.
    pub fn of(auth: &Auth, peer: &PeerId) -> Reader {
        if !auth.has_private_repos() {
            return Reader::All;
        }
        match super::publisher_of(peer) {
            Some(key) => Reader::Peer(auth.clone(), key),
            None => Reader::Stranger(auth.clone()),
        }
    }

    /// Whether the reader may read `repo`.
    pub fn may_read_repo(&self, repo: &shoal_protocol::RepoName) -> bool {
        match self {
            Reader::All => true,
            Reader::Peer(auth, key) => auth.peer_may_read(key, repo),
            Reader::Stranger(auth) => {
                auth.settings(repo).visibility == shoal_protocol::fleet::Visibility::Public
            }
        }
    }

    fn may_read(&self, record: &SignedTagRecord) -> bool {
        matches!(self, Reader::All)
            || record
                .verify()
                .is_ok_and(|v| self.may_read_repo(&v.record().repo))
    }

    /// Whether the reader may have the blob `digest`: some repository it may read holds it,
    /// linked or as a manifest, or a download in progress of it is for such a repository. A
    /// record merely naming the blob does not count: a member who may publish to a public
    /// repository could otherwise sign a record there naming a private blob's digest and so
    /// read the blob from every node that holds it.
    pub async fn may_have(&self, store: &Store, digest: &Digest) -> Result<bool, NetError> {
        if matches!(self, Reader::All) {
            return Ok(true);
        }
        if let Some(partial) = store.partial_in_progress(digest)
            && partial.repos().iter().any(|r| self.may_read_repo(r))
        {
            return Ok(true);
        }
        let (d, reader) = (digest.clone(), self.clone());
        let held = store
            .read(move |i| {
                for repo in i.repos_of_blob(&d)? {
                    if reader.may_read_repo(&repo)
                        && (i.is_linked(&repo, &d)? || i.manifest(&repo, &d)?.is_some())
                    {
                        return Ok(true);
                    }
                }
                Ok(false)
            })
            .await?;
        Ok(held)
    }
}

/// The answer to a peer's sync request (`Hello`, `Push` and `Prefetch` are the event loop's).
pub(super) async fn answer(
    store: &Store,
    log: &ServeLog,
    reader: &Reader,
    request: SyncRequest,
) -> Result<SyncResponse, NetError> {
    Ok(match request {
        SyncRequest::Summary => summary(store, reader.clone()).await?,
        SyncRequest::Records { after, limit } => {
            let reader = reader.clone();
            store
                .read(move |i| {
                    let mut page = RecordsPage::new(limit);
                    let after = after.as_ref().map(|(r, t)| (r, t));
                    let stopped = i.visit_records(after, |record| {
                        if !reader.may_read(&record) || page.push(record) {
                            ControlFlow::Continue(())
                        } else {
                            ControlFlow::Break(())
                        }
                    })?;
                    Ok(page.finish(stopped.is_break()))
                })
                .await?
        }
        SyncRequest::Have { digest } | SyncRequest::HaveWait { digest, .. }
            if !reader.may_have(store, &digest).await? =>
        {
            SyncResponse::Have(None)
        }
        SyncRequest::BlobIndex { digest } if !reader.may_have(store, &digest).await? => {
            SyncResponse::BlobIndex(None)
        }
        SyncRequest::ChunkHashes { digest, .. } if !reader.may_have(store, &digest).await? => {
            SyncResponse::ChunkHashes(None)
        }
        SyncRequest::ChunkHashes { digest, from } => {
            SyncResponse::ChunkHashes(chunk_hashes(store, &digest, from).await?)
        }
        SyncRequest::Have { digest } => SyncResponse::Have(have(store, log, &digest).await?),
        SyncRequest::HaveWait {
            digest,
            held,
            serves,
        } => SyncResponse::Have(have_wait(store, log, &digest, held, serves).await?),
        SyncRequest::BlobIndex { digest } => {
            SyncResponse::BlobIndex(store.blob_index(&digest).await?)
        }
        SyncRequest::FleetSummary => fleet_summary(store).await?,
        SyncRequest::Fleet { after, limit } => {
            let limit = usize::try_from(limit)
                .unwrap_or(MAX_SYNC_FLEET_ITEMS)
                .clamp(1, MAX_SYNC_FLEET_ITEMS);
            store
                .read(move |i| {
                    let mut items = Vec::new();
                    let mut bytes = 0usize;
                    let stopped = i.visit_fleet(after.as_deref(), |item| {
                        bytes = bytes.saturating_add(
                            codec::encode(&item).map_or(usize::MAX / 2, |b| b.len()),
                        );
                        if items.len() >= limit || bytes > codec::MAX_FRAME_BYTES / 2 {
                            return ControlFlow::Break(());
                        }
                        items.push(item);
                        ControlFlow::Continue(())
                    })?;
                    Ok(SyncResponse::Fleet {
                        items,
                        more: stopped.is_break(),
                    })
                })
                .await?
        }
        // This node's own clock: the asker weighs it against its own (see `crate::clock`).
        SyncRequest::Clock => SyncResponse::Clock(crate::clock::own_now_ms()),
        SyncRequest::Hello(_)
        | SyncRequest::Push(_)
        | SyncRequest::Prefetch { .. }
        | SyncRequest::Mirror { .. } => SyncResponse::Error("not answered here".into()),
    })
}

/// The summary of the current records `reader` may see: two nodes with the same summary hold the
/// same records.
async fn summary(store: &Store, reader: Reader) -> Result<SyncResponse, NetError> {
    Ok(store
        .read(move |i| {
            let mut hasher = SummaryHasher::new();
            // Every record: the visit never stops early.
            let _every = i.visit_records(None, |record| {
                if reader.may_read(&record) {
                    hasher.add(&record);
                }
                ControlFlow::Continue(())
            })?;
            Ok(hasher.finish())
        })
        .await?)
}

/// The summary of the fleet's items: count and hash of their ids, in cursor order.
async fn fleet_summary(store: &Store) -> Result<SyncResponse, NetError> {
    Ok(store
        .read(|i| {
            let mut hasher = blake3::Hasher::new_derive_key("shoal fleet summary v1");
            let mut count = 0u64;
            let _every = i.visit_fleet(None, |item| {
                hasher.update(&item.id());
                count += 1;
                ControlFlow::Continue(())
            })?;
            Ok(SyncResponse::Summary {
                records: count,
                hash: *hasher.finalize().as_bytes(),
            })
        })
        .await?)
}

/// Which chunks of a blob this node holds: all of a stored blob, some of a download.
/// A stored blob's answer carries its serve report.
async fn have(
    store: &Store,
    log: &ServeLog,
    digest: &Digest,
) -> Result<Option<HaveChunks>, NetError> {
    // A download in progress first: it is in memory, where a stored blob's size is a file's
    // metadata read on the blocking pool, a thread hop per answer that a swarm's many long
    // polls to downloading nodes would pay for nothing. A download is forgotten only after its
    // blob is installed, so one of the two is always found; and one whose blob is stored (by
    // it or otherwise) is not live, so it never hides the stored blob.
    let of_download = |p: Arc<crate::store::partial::Partial>| HaveChunks {
        serves: log.for_upstream_fetch(&p).map(|log| log.report()),
        ..HaveChunks::from(&p.held())
    };
    if let Some(p) = store.live_partial(digest) {
        return Ok(Some(of_download(p)));
    }
    let Some(blob) = stored_blob_log(store, log, digest).await? else {
        // Not stored, or stored and not indexed yet (a download being finished): the
        // download, if there is one, still answers.
        return Ok(store.partial_in_progress(digest).map(of_download));
    };
    let all = Bitfield::full(blob.chunk_count());
    Ok(Some(HaveChunks {
        serves: Some(blob.report()),
        ..HaveChunks::from(&all)
    }))
}

/// The hashes this node knows of the chunks of `digest` from `from` on: those of a stored
/// blob's index, or those a download (growing or not) knows so far.
async fn chunk_hashes(
    store: &Store,
    digest: &Digest,
    from: u32,
) -> Result<Option<ChunkHashes>, NetError> {
    let (size, chunk_size, hashes) = if let Some(index) = store.blob_index(digest).await? {
        let hashes = index
            .chunks()
            .iter()
            .skip(from as usize)
            .take(MAX_CHUNK_HASHES);
        (index.size(), index.chunk_size(), hashes.copied().collect())
    } else if let Some(p) = store.partial_in_progress(digest) {
        let hashes = p.known_hashes(from, MAX_CHUNK_HASHES);
        (p.index().size(), p.index().chunk_size(), hashes)
    } else {
        return Ok(None);
    };
    let count = size.div_ceil(u64::from(chunk_size.max(1)));
    let hashes = ChunkHashes {
        size,
        chunk_size,
        from: u32::try_from(count).unwrap_or(u32::MAX).min(from),
        hashes,
    };
    // A blob indexed with another chunk size (by an older rule) has no hashes to offer here.
    Ok(hashes.validate().is_ok().then_some(hashes))
}

/// The upload log of a blob this node stores whole, `None` if it does not.
async fn stored_blob_log(
    store: &Store,
    log: &ServeLog,
    digest: &Digest,
) -> Result<Option<Arc<BlobLog>>, NetError> {
    let Some(size) = store.blob_size(digest).await? else {
        return Ok(None);
    };
    Ok(log.for_stored(store, digest, size).await?)
}

/// Like [`have`], but waits (at most [`HAVE_WAIT_MAX`]): for a blob being downloaded, until
/// more than `held` chunks are held or the download ends; for a stored blob, until its upload
/// report's version differs from `serves`.
async fn have_wait(
    store: &Store,
    log: &ServeLog,
    digest: &Digest,
    held: u32,
    serves: u64,
) -> Result<Option<HaveChunks>, NetError> {
    // A download first, as in `have`.
    let partial = store.live_partial(digest);
    if partial.is_none()
        && let Some(blob) = stored_blob_log(store, log, digest).await?
    {
        let mut version = blob.subscribe();
        let _ = tokio::time::timeout(HAVE_WAIT_MAX, version.wait_for(|v| *v != serves)).await;
        // Asked again: the blob may have been deleted while this waited.
        return have(store, log, digest).await;
    }
    if let Some(partial) = partial {
        let mut progress = partial.progress();
        let mut version = log.for_upstream_fetch(&partial).map(|log| log.subscribe());
        // Copied out at once: the borrowed value holds the watch's lock, which the downloader
        // needs to publish its next chunk.
        let more = async {
            progress
                .wait_for(|p| p.held > held || p.complete)
                .await
                .map(|_| ())
        };
        let report = async {
            match &mut version {
                Some(v) => v.wait_for(|v| *v != serves).await.map(|_| ()),
                None => std::future::pending().await,
            }
        };
        let _ = tokio::time::timeout(HAVE_WAIT_MAX, async {
            tokio::select! {
                r = more => r,
                r = report => r,
            }
        })
        .await;
    }
    have(store, log, digest).await
}

/// Items a peer may add to its summary's count during one exchange (written meanwhile).
pub const SYNC_SLACK_ITEMS: u64 = 4096;
/// Most records (or fleet items) one exchange takes from a peer, whatever its summary says.
pub const MAX_SYNC_ITEMS: u64 = 1 << 21;
/// Most bytes of records one exchange takes from a peer.
pub const MAX_SYNC_BYTES: u64 = 1 << 30;
/// Longest one exchange with a peer may last.
pub const MAX_SYNC_TIME: Duration = Duration::from_secs(300);
/// How often a peer's broken exchanges are logged at most (the rest are counted).
pub const WARN_INTERVAL: Duration = Duration::from_secs(60);
/// Most peers whose warnings are tracked.
const MAX_WARNED_PEERS: usize = 1024;

/// Why an exchange with a peer stopped.
#[derive(Debug, thiserror::Error)]
pub(super) enum EntropyError {
    /// The peer broke the exchange's rules: it is to be scored and cut off.
    #[error("the peer broke the sync's rules: {0}")]
    Violation(String),
    /// The exchange failed without the peer's fault being shown (a timeout, a busy answer).
    #[error(transparent)]
    Net(#[from] NetError),
}

impl From<crate::store::StoreError> for EntropyError {
    fn from(e: crate::store::StoreError) -> EntropyError {
        EntropyError::Net(e.into())
    }
}

/// One exchange's progress through a peer's pages, and the rules each page must keep.
#[derive(Debug)]
pub(super) struct Progress<C> {
    after: Option<C>,
    items: u64,
    bytes: u64,
    pages: u64,
    max_items: u64,
    deadline: Instant,
}

impl<C: Ord + Clone + std::fmt::Debug> Progress<C> {
    /// An exchange with a peer whose summary counted `claimed` items, started at `now`.
    pub fn new(claimed: u64, now: Instant) -> Progress<C> {
        Progress {
            after: None,
            items: 0,
            bytes: 0,
            pages: 0,
            max_items: claimed.saturating_add(SYNC_SLACK_ITEMS).min(MAX_SYNC_ITEMS),
            deadline: now + MAX_SYNC_TIME,
        }
    }

    /// The cursor to ask after.
    pub fn after(&self) -> Option<C> {
        self.after.clone()
    }

    /// Pages taken so far.
    #[cfg(test)]
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Takes a page of `items` items and `bytes` bytes whose last item's cursor is `last`
    /// (`None` if it cannot be read); it becomes the cursor to ask after.
    pub fn page(
        &mut self,
        last: Option<C>,
        items: usize,
        bytes: u64,
        now: Instant,
    ) -> Result<(), EntropyError> {
        let violation = |why: String| Err(EntropyError::Violation(why));
        let Some(last) = last else {
            return violation("a page ends with an item without a cursor".into());
        };
        if self.after.as_ref().is_some_and(|after| last <= *after) {
            return violation(format!(
                "page {} went back or stood still: {last:?} after {:?}",
                self.pages + 1,
                self.after
            ));
        }
        self.pages += 1;
        self.items = self.items.saturating_add(items as u64);
        self.bytes = self.bytes.saturating_add(bytes);
        if self.items > self.max_items {
            return violation(format!(
                "{} items in {} pages, more than the {} its summary allows",
                self.items, self.pages, self.max_items
            ));
        }
        if self.bytes > MAX_SYNC_BYTES {
            return violation(format!("{} bytes in {} pages", self.bytes, self.pages));
        }
        if now > self.deadline {
            return Err(EntropyError::Net(NetError::Timeout));
        }
        self.after = Some(last);
        Ok(())
    }
}

/// Warnings about peers, at most one line per peer per [`WARN_INTERVAL`]; the lines left out
/// are counted and the count goes with the next line.
#[derive(Debug, Default)]
pub(super) struct Warnings {
    peers: Mutex<HashMap<PeerId, (Instant, u64)>>,
}

impl Warnings {
    /// Whether to log a warning about `peer` now; if so, how many were left out before it.
    pub fn allow(&self, peer: PeerId, now: Instant) -> Option<u64> {
        let mut peers = self
            .peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if peers.len() >= MAX_WARNED_PEERS && !peers.contains_key(&peer) {
            peers.retain(|_, (at, _)| now.saturating_duration_since(*at) < WARN_INTERVAL);
            if peers.len() >= MAX_WARNED_PEERS {
                // Full of peers warned about just now: this one waits its turn.
                return None;
            }
        }
        match peers.get_mut(&peer) {
            Some((at, left_out)) if now.saturating_duration_since(*at) < WARN_INTERVAL => {
                *left_out += 1;
                None
            }
            Some((at, left_out)) => {
                *at = now;
                Some(std::mem::take(left_out))
            }
            None => {
                peers.insert(peer, (now, 0));
                Some(0)
            }
        }
    }
}

/// A record's place in page order: the store's key order, (repository, tag) as bytes.
fn record_cursor(record: &SignedTagRecord) -> Option<(RepoName, Tag)> {
    record
        .verify()
        .ok()
        .map(|v| (v.record().repo.clone(), v.record().tag.clone()))
}

/// Pulls every fleet item and record `peer` holds that this node lacks, asking through the
/// event loop that `commands` reaches. Returns how many were accepted.
pub(super) async fn anti_entropy(
    commands: &mpsc::Sender<Command>,
    store: &Store,
    tags: &Tags,
    peer: PeerId,
) -> Result<u64, EntropyError> {
    let mut accepted = 0;
    if tags.auth().in_fleet() {
        accepted += fleet_entropy(commands, store, tags.auth(), peer).await?;
    }
    let theirs = sync_request(commands, peer, SyncRequest::Summary).await?;
    // The peer summarises what this node may read; this node holds only what it may read.
    let ours = summary(store, Reader::All).await?;
    let claimed = match theirs {
        SyncResponse::Summary { .. } if theirs == ours => return Ok(accepted),
        SyncResponse::Summary { records, .. } => records,
        other => return Err(unexpected("Summary", other)),
    };
    let mut progress = Progress::new(claimed, Instant::now());
    loop {
        let request = SyncRequest::Records {
            after: progress.after(),
            limit: MAX_SYNC_RECORDS as u32,
        };
        let (records, more) = match sync_request(commands, peer, request).await? {
            SyncResponse::Records { records, more } => (records, more),
            other => return Err(unexpected("Records", other)),
        };
        if records.is_empty() {
            break;
        }
        let bytes = records.iter().map(|r| r.payload().len() as u64).sum();
        let last = records.last().and_then(record_cursor);
        progress.page(last, records.len(), bytes, Instant::now())?;
        for record in records {
            if tags.ingest(record).await? == Ingest::Accepted {
                accepted += 1;
            }
        }
        if !more {
            break;
        }
    }
    Ok(accepted)
}

/// The error for an answer of the wrong kind: an error answer (a busy peer) is not the peer's
/// fault; an answer of another kind is.
fn unexpected(request: &str, answer: SyncResponse) -> EntropyError {
    match answer {
        SyncResponse::Error(why) => EntropyError::Net(NetError::Protocol(format!(
            "{request} answered with an error: {why}"
        ))),
        other => EntropyError::Violation(format!("{request} answered with {other:?}")),
    }
}

/// Pulls every fleet item `peer` holds that this node lacks. Returns how many were accepted.
async fn fleet_entropy(
    commands: &mpsc::Sender<Command>,
    store: &Store,
    auth: &Auth,
    peer: PeerId,
) -> Result<u64, EntropyError> {
    let theirs = sync_request(commands, peer, SyncRequest::FleetSummary).await?;
    let ours = fleet_summary(store).await?;
    let claimed = match theirs {
        SyncResponse::Summary { .. } if theirs == ours => return Ok(0),
        SyncResponse::Summary { records, .. } => records,
        other => return Err(unexpected("FleetSummary", other)),
    };
    let (mut progress, mut accepted) = (Progress::<String>::new(claimed, Instant::now()), 0);
    loop {
        let request = SyncRequest::Fleet {
            after: progress.after(),
            limit: MAX_SYNC_FLEET_ITEMS as u32,
        };
        let (items, more) = match sync_request(commands, peer, request).await? {
            SyncResponse::Fleet { items, more } => (items, more),
            other => return Err(unexpected("Fleet", other)),
        };
        let Some(last) = items.last() else { break };
        progress.page(Some(last.cursor()), items.len(), 0, Instant::now())?;
        // Policies sort before members, so a revocation is known before the member it revokes.
        for item in items {
            let outcome = match item {
                FleetItem::Policy(p) => ingest::policy(auth, store, p).await?,
                FleetItem::Member(m) => ingest::member(auth, store, m, None).await?,
            };
            if outcome == ingest::Outcome::Accepted {
                accepted += 1;
            }
        }
        if !more {
            break;
        }
    }
    Ok(accepted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_protocol::{RepoName, SigningKey, Tag, TagRecord};

    fn record(key: &SigningKey, repo: &str, tag: &str) -> shoal_protocol::SignedTagRecord {
        let record = TagRecord {
            repo: repo.parse::<RepoName>().unwrap(),
            tag: tag.parse::<Tag>().unwrap(),
            target: None,
            timestamp_ms: 1,
            sequence: 0,
            publisher: key.public(),
        };
        shoal_protocol::SignedTagRecord::sign(&record, key).unwrap()
    }

    async fn store_with(records: usize) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_owned();
        let store = tokio::task::spawn_blocking(move || Store::open(&path))
            .await
            .unwrap()
            .unwrap();
        let key = SigningKey::from_seed([7; 32]);
        let mut batch = crate::store::Batch::new();
        for n in 0..records {
            batch = batch.record(record(&key, "team/app", &format!("v{n:04}")), false);
        }
        store.commit(batch).await.unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn record_pages_resume_after_their_cursor_and_cover_every_record_once() {
        let (_dir, store) = store_with(25).await;
        let log = ServeLog::default();
        let mut after = None;
        let mut seen = Vec::new();
        loop {
            let request = SyncRequest::Records {
                after: after.clone(),
                limit: 10,
            };
            let SyncResponse::Records { records, more } =
                answer(&store, &log, &Reader::All, request).await.unwrap()
            else {
                panic!("not a records page");
            };
            assert!(records.len() <= 10);
            for r in &records {
                let v = r.verify().unwrap();
                seen.push(v.record().tag.to_string());
                after = Some((v.record().repo.clone(), v.record().tag.clone()));
            }
            if !more {
                break;
            }
        }
        let expected: Vec<String> = (0..25).map(|n| format!("v{n:04}")).collect();
        assert_eq!(seen, expected);
    }

    #[tokio::test]
    async fn the_summary_counts_the_records_and_changes_with_them() {
        let (_dir, store) = store_with(3).await;
        let SyncResponse::Summary { records, hash } = summary(&store, Reader::All).await.unwrap()
        else {
            panic!("not a summary");
        };
        assert_eq!(records, 3);
        let key = SigningKey::from_seed([7; 32]);
        store
            .commit(crate::store::Batch::new().record(record(&key, "team/app", "later"), false))
            .await
            .unwrap();
        let SyncResponse::Summary {
            records: after,
            hash: changed,
        } = summary(&store, Reader::All).await.unwrap()
        else {
            panic!("not a summary");
        };
        assert_eq!(after, 4);
        assert_ne!(hash, changed);
    }

    #[test]
    fn pages_must_advance_strictly() {
        let now = Instant::now();
        let mut p = Progress::<u32>::new(100, now);
        p.page(Some(10), 10, 0, now).unwrap();
        p.page(Some(20), 10, 0, now).unwrap();
        assert_eq!(p.after(), Some(20));
        for (back, why) in [
            (Some(20), "stood still"),
            (Some(15), "went back"),
            (None, "no cursor"),
        ] {
            let e = p.page(back, 1, 0, now).expect_err(why);
            assert!(matches!(e, EntropyError::Violation(_)), "{why}: {e:?}");
        }
        assert_eq!(
            (p.after(), p.pages()),
            (Some(20), 2),
            "a broken page is not taken"
        );
    }

    #[test]
    fn a_peer_may_send_no_more_than_its_summary_counted_and_a_little_slack() {
        let now = Instant::now();
        let mut p = Progress::<u64>::new(10, now);
        let mut cursor = 0;
        let mut taken = 0;
        let stopped = loop {
            cursor += 1;
            match p.page(Some(cursor), 512, 0, now) {
                Ok(()) => taken += 512,
                Err(e) => break e,
            }
        };
        assert!(matches!(stopped, EntropyError::Violation(_)));
        assert!(taken <= 10 + SYNC_SLACK_ITEMS, "{taken} items taken");
        // However large the summary's claim, the exchange stays bounded.
        let mut p = Progress::<u64>::new(u64::MAX, now);
        assert!(p.page(Some(1), 1, 0, now).is_ok());
        assert_eq!(p.max_items, MAX_SYNC_ITEMS);
    }

    #[test]
    fn an_exchange_is_bounded_in_bytes_and_time() {
        let now = Instant::now();
        let mut p = Progress::<u64>::new(1000, now);
        let e = p.page(Some(1), 1, MAX_SYNC_BYTES + 1, now).unwrap_err();
        assert!(matches!(e, EntropyError::Violation(_)));
        let mut p = Progress::<u64>::new(1000, now);
        let e = p.page(Some(1), 1, 0, now + MAX_SYNC_TIME + Duration::from_secs(1));
        assert!(matches!(e, Err(EntropyError::Net(NetError::Timeout))));
    }

    #[test]
    fn warnings_about_a_peer_are_logged_once_an_interval_with_a_count() {
        let warnings = Warnings::default();
        let (a, b) = (PeerId::random(), PeerId::random());
        let now = Instant::now();
        assert_eq!(warnings.allow(a, now), Some(0));
        for _ in 0..1000 {
            assert_eq!(warnings.allow(a, now + Duration::from_secs(1)), None);
        }
        assert_eq!(
            warnings.allow(b, now),
            Some(0),
            "another peer has its own line"
        );
        assert_eq!(warnings.allow(a, now + WARN_INTERVAL), Some(1000));
        assert_eq!(warnings.allow(a, now + WARN_INTERVAL), None);
    }

    #[test]
    fn the_page_order_is_the_store_key_order() {
        // Keys join repository and tag with a 0 byte, which no name contains: comparing the
        // pair compares the keys.
        let key = SigningKey::from_seed([7; 32]);
        let mut cursors: Vec<_> = [("a/b", "z"), ("a/b-c", "a"), ("a", "x"), ("a/b", "a")]
            .iter()
            .map(|(r, t)| record_cursor(&record(&key, r, t)).unwrap())
            .collect();
        let mut keys: Vec<Vec<u8>> = cursors
            .iter()
            .map(|(r, t)| [r.as_str().as_bytes(), &[0], t.as_str().as_bytes()].concat())
            .collect();
        cursors.sort();
        keys.sort();
        let sorted: Vec<Vec<u8>> = cursors
            .iter()
            .map(|(r, t)| [r.as_str().as_bytes(), &[0], t.as_str().as_bytes()].concat())
            .collect();
        assert_eq!(sorted, keys);
    }

    #[tokio::test]
    async fn a_node_without_the_blob_says_so() {
        let (_dir, store) = store_with(0).await;
        let log = ServeLog::default();
        let digest = Digest::sha256(b"absent");
        let answer = answer(&store, &log, &Reader::All, SyncRequest::Have { digest })
            .await
            .unwrap();
        assert_eq!(answer, SyncResponse::Have(None));
    }
}
