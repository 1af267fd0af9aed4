//! Preheat: fetching images into this node before anyone pulls them, so that a rollout finds
//! them local.
//!
//! Three ways in:
//! - **subscriptions** (`subscribe = ["prod/*", "team/app"]` in the config): every tag record of
//!   a matching repository that arrives from a peer (gossip, anti-entropy, a private push) and
//!   becomes current here is queued. A record pushed on this node needs nothing: its content is
//!   already here.
//! - **peers' asks** (`shoal prefetch --node`, [`SyncRequest::Prefetch`](shoal_protocol::message::SyncRequest::Prefetch)): the network checks that
//!   the asking member may read the repository before it hands the ask over; it is then queued
//!   like a subscription, at most [`MAX_QUEUED_PER_PEER`] per peer.
//! - **`shoal prefetch`** on this node: the admin API calls [`fetch_image`] at once, without the
//!   queue or the rate limit (the operator asked for it now), and streams its progress.
//!
//! The queue holds at most [`MAX_QUEUED`] images, keyed by (repository, tag or digest): a tag
//! queued twice is one entry, and it is resolved to its current record only when its turn comes,
//! so a tag moved while queued is fetched at its newest record only. A fetch under way stops at
//! the next blob if its tag moves on (the newer record is queued behind it). Past the bound an
//! image is dropped and logged; a subscription catches up with the tag's next record.
//!
//! One worker fetches one blob at a time through the [`Fetcher`] (so a client that pulls the
//! same blob meanwhile shares the download) and paces the start of each fetch by the size of the
//! one before ([`Pace`]): on average at most `subscribe_rate` bytes per second, whoever filled
//! the queue. A fetch that fails (no peer has it, or the peers refuse this node because it may
//! not read the repository) is logged once and not retried: the next record of the tag, or a
//! client's pull, tries again.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::PeerId;
use serde::Deserialize;
use shoal_protocol::fleet::RepoPattern;
use shoal_protocol::message::PrefetchAnswer;
use shoal_protocol::{BlobRef, Digest, Reference, RepoName, Tag};
use tokio::sync::{Notify, broadcast};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::fetch::{DownloadState, FetchError, Fetcher};
use crate::net::{Network, PrefetchAsk};
use crate::store::{Store, StoreError};
use crate::tags::Tags;

/// The rate limit unless the config sets `subscribe_rate`.
pub const DEFAULT_RATE_BYTES_PER_SEC: u64 = 50 << 20;
/// Images waiting to be fetched, from subscriptions and peers' asks together.
pub const MAX_QUEUED: usize = 256;
/// Images one peer's asks may hold in the queue at once.
pub const MAX_QUEUED_PER_PEER: usize = 8;
/// Peers' asks waiting to be queued (the network answers `Busy` past it).
const ASK_INBOX: usize = 64;
/// How often a fetch in progress reports its bytes.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// The most tags looked through to find the record that names a manifest digest.
const MAX_TAGS_SCANNED: usize = 10_000;
/// The longest pause [`Pace`] puts after one blob, whatever its size and the rate.
const MAX_PAUSE: Duration = Duration::from_secs(24 * 3600);

/// Preheat settings (the config's `subscribe` and `subscribe_rate`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefetchConfig {
    /// Repositories whose new tags are fetched as their records arrive.
    pub subscribe: Vec<RepoPattern>,
    /// What subscriptions and peers' asks fetch, at most, on average.
    pub rate: Rate,
}

impl Default for PrefetchConfig {
    fn default() -> Self {
        PrefetchConfig {
            subscribe: Vec::new(),
            rate: Rate(DEFAULT_RATE_BYTES_PER_SEC),
        }
    }
}

/// A rate in bytes per second, more than zero: a number of bytes, or a size with a unit and an
/// optional `/s` (`"50MiB/s"`, `"10MB"`), as `max_disk` reads sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RateText")]
pub struct Rate(u64);

impl Rate {
    /// Bytes per second.
    pub fn bytes_per_sec(self) -> u64 {
        self.0
    }
}

/// Why a rate is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rate {0:?}: expected bytes per second (`50MiB/s`, `10MB/s`, `1048576`), more than zero")]
pub struct RateError(String);

impl std::str::FromStr for Rate {
    type Err = RateError;

    fn from_str(s: &str) -> Result<Rate, RateError> {
        let t = s.trim();
        let size = t.strip_suffix("/s").unwrap_or(t);
        match size.parse::<crate::quota::MaxDisk>() {
            Ok(crate::quota::MaxDisk::Bytes(b)) => Ok(Rate(b)),
            _ => Err(RateError(s.chars().take(64).collect())),
        }
    }
}

/// A rate as the config file writes it.
#[derive(Deserialize)]
#[serde(untagged)]
enum RateText {
    Bytes(u64),
    Text(String),
}

impl TryFrom<RateText> for Rate {
    type Error = RateError;
    fn try_from(t: RateText) -> Result<Rate, RateError> {
        match t {
            RateText::Bytes(0) => Err(RateError("0".into())),
            RateText::Bytes(b) => Ok(Rate(b)),
            RateText::Text(s) => s.parse(),
        }
    }
}

/// Paces the starts of fetches so that on average at most `rate` bytes per second are
/// fetched: after a fetch of `n` bytes starts, the next may start `n / rate` later. Credit does
/// not pile up while idle, so there is no burst beyond one blob.
#[derive(Debug)]
pub struct Pace {
    rate: u64,
    next: Instant,
}

impl Pace {
    /// A pace of `rate` bytes per second.
    pub fn new(rate: Rate) -> Pace {
        Pace {
            rate: rate.bytes_per_sec().max(1),
            next: Instant::now(),
        }
    }

    /// Waits until the next fetch may start.
    pub async fn ready(&self) {
        tokio::time::sleep_until(self.next).await;
    }

    /// Waits until the next fetch may start, and books `bytes` for it.
    pub async fn take(&mut self, bytes: u64) {
        self.ready().await;
        let pause = Duration::from_secs_f64(bytes as f64 / self.rate as f64).min(MAX_PAUSE);
        self.next = Instant::now() + pause;
    }
}

/// An image as this node's records describe it: its manifest and every blob it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// The repository.
    pub repo: RepoName,
    /// The tag it was asked by, if any (a fetch stops if the tag moves on).
    pub tag: Option<Tag>,
    /// The manifest's digest.
    pub manifest: Digest,
    /// The manifest's size.
    pub size: u64,
    /// The blobs (and, for an index, child manifests) it needs; `None` for a manifest that a
    /// record names only as a child of an index: its blobs are known once it is fetched.
    pub blobs: Option<Vec<BlobRef>>,
}

/// Why an image could not be prefetched.
#[derive(Debug, thiserror::Error)]
pub enum PrefetchError {
    /// No current record of this node names it.
    #[error("no record of this node names {repo}:{reference}")]
    Unknown {
        /// The repository.
        repo: RepoName,
        /// The tag or digest.
        reference: Reference,
    },
    /// Its content could not be fetched.
    #[error("fetching {0}")]
    Fetch(#[source] FetchError),
    /// The local store failed.
    #[error("store")]
    Store(#[from] StoreError),
}

impl From<FetchError> for PrefetchError {
    fn from(e: FetchError) -> Self {
        PrefetchError::Fetch(e)
    }
}

/// What `reference` of `repo` is, as this node's current records say (`None` if none names it).
pub async fn resolve(
    store: &Store,
    repo: &RepoName,
    reference: &Reference,
) -> Result<Option<Image>, StoreError> {
    let (repo, reference) = (repo.clone(), reference.clone());
    store
        .read(move |i| {
            let of = |tag: Option<Tag>, target: &shoal_protocol::TagTarget| Image {
                repo: repo.clone(),
                tag,
                manifest: target.manifest.clone(),
                size: target.size,
                blobs: Some(target.blobs.clone()),
            };
            match &reference {
                Reference::Tag(t) => Ok(i
                    .record(&repo, t)?
                    .and_then(|r| r.record().target.as_ref().map(|x| of(Some(t.clone()), x)))),
                Reference::Digest(d) => {
                    for t in i.tags(&repo, None, MAX_TAGS_SCANNED)? {
                        if let Some(r) = i.record(&repo, &t)?
                            && let Some(x) = &r.record().target
                            && x.manifest == *d
                        {
                            return Ok(Some(of(None, x)));
                        }
                    }
                    Ok(i.record_blob(&repo, d)?.map(|b| Image {
                        repo: repo.clone(),
                        tag: None,
                        manifest: d.clone(),
                        size: b.size,
                        blobs: None,
                    }))
                }
            }
        })
        .await
}

/// Bytes of an image fetched so far, and in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Bytes {
    /// Held now (fetched, or here before).
    pub done: u64,
    /// The manifest and every blob.
    pub total: u64,
}

/// Makes `image` present in this node: its manifest, then each blob in turn, through `fetcher`
/// (content already here is only linked). With a `pace`, each fetch waits its turn; `report`
/// hears the bytes held after each step and every `PROGRESS_EVERY` during a blob. Stops
/// early, with `Ok(false)`, if the image was asked by tag and the tag moved on.
///
/// Cancelled, it leaves the blob under way to its fetch, which goes on for whoever else waits
/// on it (or stays resumable on disk at shutdown).
pub async fn fetch_image(
    fetcher: &Fetcher,
    store: &Store,
    image: &Image,
    mut pace: Option<&mut Pace>,
    mut report: impl FnMut(Bytes) + Send,
) -> Result<bool, PrefetchError> {
    let repo = &image.repo;
    let sum = |blobs: &[BlobRef]| blobs.iter().fold(0u64, |a, b| a.saturating_add(b.size));
    let mut bytes = Bytes {
        done: 0,
        total: image
            .size
            .saturating_add(image.blobs.as_deref().map_or(0, sum)),
    };
    report(bytes);
    if !has_manifest(store, repo, &image.manifest).await? {
        if let Some(p) = pace.as_deref_mut() {
            p.take(image.size).await;
        }
        fetcher.manifest(repo, &image.manifest, image.size).await?;
    }
    bytes.done = image.size;
    report(bytes);
    let (r, d) = (repo.clone(), image.manifest.clone());
    let info = store
        .read(move |i| i.manifest(&r, &d))
        .await?
        .ok_or_else(|| FetchError::Unavailable(image.manifest.clone()))?;
    let blobs = match &image.blobs {
        Some(b) => b.clone(),
        None => {
            // A child of an index: what it names, as the index's record describes it.
            let (r, wanted) = (repo.clone(), info.blobs.clone());
            let blobs: Vec<BlobRef> = store
                .read(move |i| {
                    wanted
                        .iter()
                        .filter_map(|d| i.record_blob(&r, d).transpose())
                        .collect()
                })
                .await?;
            bytes.total = bytes.total.saturating_add(sum(&blobs));
            blobs
        }
    };
    for blob in &blobs {
        if !still_current(store, image).await? {
            return Ok(false);
        }
        if info.manifests.contains(&blob.digest) {
            // A child manifest of an index: fetched as a manifest, so that it is indexed.
            if !has_manifest(store, repo, &blob.digest).await? {
                if let Some(p) = pace.as_deref_mut() {
                    p.take(blob.size).await;
                }
                fetcher.manifest(repo, &blob.digest, blob.size).await?;
            }
        } else if store.blob_size(&blob.digest).await?.is_some() {
            // Here already (another repository's, say): linked, not fetched, not paced.
            fetcher.blob(repo, blob).await?;
        } else {
            if let Some(p) = pace.as_deref_mut() {
                p.take(blob.size).await;
                if !still_current(store, image).await? {
                    return Ok(false);
                }
            }
            let base = bytes.done;
            follow(fetcher, repo, blob, |held| {
                report(Bytes {
                    done: base.saturating_add(held),
                    total: bytes.total,
                });
            })
            .await?;
        }
        bytes.done = bytes.done.saturating_add(blob.size);
        report(bytes);
    }
    Ok(true)
}

/// Fetches one blob (or joins its fetch), reporting the bytes of it held as they arrive.
async fn follow(
    fetcher: &Fetcher,
    repo: &RepoName,
    blob: &BlobRef,
    mut report: impl FnMut(u64),
) -> Result<(), FetchError> {
    let mut download = fetcher.download(repo, blob);
    loop {
        match download.state() {
            DownloadState::Done => return Ok(()),
            DownloadState::Failed(e) => return Err(e),
            DownloadState::Locating => {}
            DownloadState::Streaming(partial) => {
                let index = partial.index();
                let held = u64::from(partial.progress().borrow().held)
                    .saturating_mul(u64::from(index.chunk_size()))
                    .min(index.size());
                report(held);
            }
        }
        tokio::select! {
            alive = download.changed() => if !alive {
                return Err(FetchError::Cancelled);
            },
            () = tokio::time::sleep(PROGRESS_EVERY) => {}
        }
    }
}

/// Whether `repo` holds the manifest `digest` (indexed, and so stored).
async fn has_manifest(store: &Store, repo: &RepoName, digest: &Digest) -> Result<bool, StoreError> {
    let (r, d) = (repo.clone(), digest.clone());
    store.read(move |i| Ok(i.manifest(&r, &d)?.is_some())).await
}

/// Whether an image asked by tag is still what its tag names (one asked by digest always is).
async fn still_current(store: &Store, image: &Image) -> Result<bool, StoreError> {
    let Some(tag) = image.tag.clone() else {
        return Ok(true);
    };
    let repo = image.repo.clone();
    let now = store.read(move |i| i.record(&repo, &tag)).await?;
    Ok(now
        .as_ref()
        .and_then(|r| r.record().target.as_ref())
        .is_some_and(|t| t.manifest == image.manifest))
}

/// Who put an image in the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Subscription,
    Peer(PeerId),
}

/// An image to fetch, by name: resolved when its turn comes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    repo: RepoName,
    reference: Reference,
}

/// What became of an offer to the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Offer {
    Queued,
    /// It was queued already; it stays where it is and is resolved when its turn comes.
    Already,
    /// The queue is full.
    Full,
    /// The asking peer holds its share of the queue.
    PeerFull,
}

/// The pending images, in order, each once (sans-IO).
#[derive(Debug, Default)]
struct Queue {
    order: VecDeque<Key>,
    origin: HashMap<Key, Origin>,
}

impl Queue {
    fn offer(&mut self, key: Key, origin: Origin) -> Offer {
        if self.origin.contains_key(&key) {
            return Offer::Already;
        }
        if self.order.len() >= MAX_QUEUED {
            return Offer::Full;
        }
        if let Origin::Peer(p) = origin
            && self
                .origin
                .values()
                .filter(|o| **o == Origin::Peer(p))
                .count()
                >= MAX_QUEUED_PER_PEER
        {
            return Offer::PeerFull;
        }
        self.origin.insert(key.clone(), origin);
        self.order.push_back(key);
        Offer::Queued
    }

    fn pop(&mut self) -> Option<Key> {
        let key = self.order.pop_front()?;
        self.origin.remove(&key);
        Some(key)
    }
}

/// The subscription and peers'-asks worker (see the module doc).
pub struct Prefetcher {
    config: PrefetchConfig,
    store: Store,
    fetcher: Fetcher,
    queue: Arc<Mutex<Queue>>,
    wake: Arc<Notify>,
}

impl Prefetcher {
    /// A prefetcher with `config`, fetching into `store` through `fetcher`.
    pub fn new(config: PrefetchConfig, store: Store, fetcher: Fetcher) -> Prefetcher {
        Prefetcher {
            config,
            store,
            fetcher,
            queue: Arc::default(),
            wake: Arc::default(),
        }
    }

    /// Follows accepted records of `tags` and the prefetch asks `network` receives, and fetches
    /// what they queue, until `cancel`. Peers' asks are denied again once this returns.
    pub async fn run(self, tags: Tags, network: Network, cancel: CancellationToken) {
        let records = tags.accepted();
        let asks = network.take_prefetch_asks(ASK_INBOX);
        tracing::info!(
            subscribe = ?self.config.subscribe.iter().map(RepoPattern::as_str).collect::<Vec<_>>(),
            rate_bytes_per_sec = self.config.rate.bytes_per_sec(),
            "prefetching subscribed repositories and peers' asks"
        );
        tokio::select! {
            () = cancel.cancelled() => {}
            () = self.intake(records, asks) => {}
            () = self.work() => {}
        }
    }

    /// Queues subscribed records and peers' asks as they come.
    async fn intake(
        &self,
        mut records: broadcast::Receiver<shoal_protocol::VerifiedTagRecord>,
        mut asks: tokio::sync::mpsc::Receiver<PrefetchAsk>,
    ) {
        loop {
            tokio::select! {
                record = records.recv() => match record {
                    Ok(v) => {
                        let r = v.record();
                        if r.target.is_none()
                            || !self.config.subscribe.iter().any(|p| p.matches(&r.repo))
                        {
                            continue;
                        }
                        let key = Key { repo: r.repo.clone(), reference: Reference::Tag(r.tag.clone()) };
                        self.offer(key, Origin::Subscription);
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "records arrived faster than prefetching could note them; the missed ones are not prefetched");
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                ask = asks.recv() => {
                    let Some(ask) = ask else { return };
                    let key = Key { repo: ask.repo, reference: ask.reference };
                    let answer = match self.offer(key, Origin::Peer(ask.peer)) {
                        Offer::Queued | Offer::Already => PrefetchAnswer::Queued,
                        Offer::Full | Offer::PeerFull => PrefetchAnswer::Busy,
                    };
                    let _ = ask.answer.send(answer);
                }
            }
        }
    }

    fn offer(&self, key: Key, origin: Origin) -> Offer {
        let offer = self
            .queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .offer(key.clone(), origin);
        match offer {
            Offer::Queued => {
                tracing::debug!(repo = %key.repo, reference = %key.reference, ?origin, "queued for prefetching");
                self.wake.notify_one();
            }
            Offer::Already => {}
            Offer::Full => {
                tracing::warn!(repo = %key.repo, reference = %key.reference, ?origin, max = MAX_QUEUED, "prefetch queue full; dropped");
            }
            Offer::PeerFull => {
                tracing::info!(repo = %key.repo, reference = %key.reference, ?origin, max = MAX_QUEUED_PER_PEER, "a peer's prefetch asks fill its share of the queue; dropped");
            }
        }
        offer
    }

    /// Fetches the queued images one blob at a time, at the configured pace.
    async fn work(&self) {
        let mut pace = Pace::new(self.config.rate);
        loop {
            // Resolved only once the pace allows a fetch: a tag that moves meanwhile is
            // fetched at its newest record.
            pace.ready().await;
            let next = self
                .queue
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .pop();
            let Some(key) = next else {
                self.wake.notified().await;
                continue;
            };
            self.prefetch(&key, &mut pace).await;
        }
    }

    async fn prefetch(&self, key: &Key, pace: &mut Pace) {
        let (repo, reference) = (&key.repo, &key.reference);
        let image = match resolve(&self.store, repo, reference).await {
            Ok(Some(image)) => image,
            Ok(None) => {
                tracing::debug!(%repo, %reference, "nothing to prefetch: no current record names it");
                return;
            }
            Err(e) => {
                tracing::warn!(error = &e as &dyn std::error::Error, %repo, %reference, "resolving an image to prefetch");
                return;
            }
        };
        let started = std::time::Instant::now();
        let mut total = 0;
        match fetch_image(&self.fetcher, &self.store, &image, Some(pace), |b| {
            total = b.total;
        })
        .await
        {
            Ok(true) => tracing::info!(
                %repo, %reference, manifest = %image.manifest, bytes = total,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "prefetched image"
            ),
            Ok(false) => tracing::info!(%repo, %reference, "stopped prefetching: the tag moved on"),
            // Not retried: a peer that refuses this node (no grant) would refuse it again.
            Err(e) => tracing::warn!(
                error = &e as &dyn std::error::Error, %repo, %reference,
                "prefetching failed; not retried until the tag's next record"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(repo: &str, tag: &str) -> Key {
        Key {
            repo: repo.parse().unwrap(),
            reference: Reference::Tag(tag.parse().unwrap()),
        }
    }

    #[test]
    fn rates_parse_like_sizes() {
        assert_eq!("50MiB/s".parse::<Rate>().unwrap().bytes_per_sec(), 50 << 20);
        assert_eq!("10MB".parse::<Rate>().unwrap().bytes_per_sec(), 10_000_000);
        assert_eq!("1048576".parse::<Rate>().unwrap().bytes_per_sec(), 1 << 20);
        for bad in ["0", "0/s", "80%", "fast", "", "-1", "5 parsecs/s"] {
            assert!(bad.parse::<Rate>().is_err(), "{bad}");
        }
        #[derive(Deserialize)]
        struct T {
            rate: Rate,
        }
        let t: T = toml::from_str("rate = 1000").unwrap();
        assert_eq!(t.rate.bytes_per_sec(), 1000);
        let t: T = toml::from_str("rate = \"2KiB/s\"").unwrap();
        assert_eq!(t.rate.bytes_per_sec(), 2048);
        assert!(toml::from_str::<T>("rate = 0").is_err());
        assert!(toml::from_str::<T>("rate = -5").is_err());
    }

    #[test]
    fn a_tag_is_queued_once_and_the_queue_is_bounded() {
        let mut q = Queue::default();
        assert_eq!(
            q.offer(key("a/b", "1"), Origin::Subscription),
            Offer::Queued
        );
        assert_eq!(
            q.offer(key("a/b", "1"), Origin::Subscription),
            Offer::Already
        );
        for i in 1..MAX_QUEUED {
            assert_eq!(
                q.offer(key("a/b", &format!("t{i}")), Origin::Subscription),
                Offer::Queued
            );
        }
        assert_eq!(q.offer(key("a/c", "1"), Origin::Subscription), Offer::Full);
        assert_eq!(q.pop(), Some(key("a/b", "1")));
        assert_eq!(
            q.offer(key("a/b", "1"), Origin::Subscription),
            Offer::Queued
        );
    }

    #[test]
    fn one_peer_holds_a_bounded_share() {
        let mut q = Queue::default();
        let (hostile, other) = (PeerId::random(), PeerId::random());
        for i in 0..MAX_QUEUED_PER_PEER {
            assert_eq!(
                q.offer(key("a/b", &format!("t{i}")), Origin::Peer(hostile)),
                Offer::Queued
            );
        }
        assert_eq!(
            q.offer(key("a/b", "more"), Origin::Peer(hostile)),
            Offer::PeerFull
        );
        assert_eq!(
            q.offer(key("a/b", "more"), Origin::Peer(other)),
            Offer::Queued
        );
        assert_eq!(
            q.offer(key("a/b", "sub"), Origin::Subscription),
            Offer::Queued
        );
    }

    #[tokio::test]
    async fn pace_spaces_starts_by_the_size_before() {
        let mut pace = Pace::new(Rate(10_000));
        let t0 = Instant::now();
        pace.take(500).await;
        assert!(
            t0.elapsed() < Duration::from_millis(20),
            "the first fetch starts at once"
        );
        pace.take(2000).await;
        assert!(t0.elapsed() >= Duration::from_millis(50));
        pace.take(10).await;
        assert!(t0.elapsed() >= Duration::from_millis(250));
    }
}
