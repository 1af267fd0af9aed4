//! Pull-through: what a registry request for an upstream's repository needs before the
//! registry's own handlers serve it from the store and the fleet.
//!
//! - A tag whose record is fresh (younger than the upstream's freshness) and vouched for is
//!   served as the record says, without asking the upstream. Otherwise the upstream is asked,
//!   within its time-out: its answer is stored, and a new record signed by this node names it,
//!   so that the rest of the fleet fetches the same content. When the upstream is down,
//!   rate-limited or failing, the fleet's record serves, however old (offline first), unless
//!   neither this node nor the fleet's policy vouches for it and the upstream told this node
//!   otherwise before (then that answer serves); a tag the fleet never resolved fails with a
//!   `503` that says so.
//! - A record is vouched for when this node signed it, or when the fleet's policy lists the
//!   repository's publishers (then only they can sign one that counts: an operator names the
//!   nodes that mirror). Any other member's fresh record is checked with the upstream once
//!   (the manifest, not the blobs) before it is served: a member's key can sign records for
//!   any public repository, and a stolen one must not make the fleet serve its own image as
//!   `docker.io/library/nginx:latest`. The upstream's answer wins: one that differs is stored
//!   and signed anew, which supersedes the other record in the whole fleet. A record the
//!   upstream confirmed is served until it is no longer fresh without asking again.
//! - A manifest or blob by digest that the fleet holds is served from the fleet; only content
//!   nobody has is fetched from the upstream, checked against its digest as it streams to disk.
//! - Concurrent requests for one blob share one upstream fetch, and so does the fleet: the peer
//!   first in the blob's rendezvous order fetches it, into a growing download whose chunk
//!   hashes it learns from the bytes, and the others fetch its chunks from it and from each
//!   other as they arrive (`ChunkHashes`, see the store's `partial` module), so the fleet holds
//!   the blob about when that peer does. Those hashes are the fetching peer's word only: every
//!   node checks the whole blob against its digest before it keeps or serves it, and a peer
//!   that keeps a blob that fails it is banned. A blob without a `Content-Length` goes to a
//!   file, and the fleet fetches it once it is whole.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::PeerId;
use shoal_protocol::message::{MirrorState, SyncRequest, SyncResponse};
use shoal_protocol::{Digest, Reference, RepoName, Tag, TagTarget};
use tokio::sync::{Semaphore, watch};

use super::route::{Routed, Routes};
use super::upstream::{Upstream, UpstreamError};
use crate::fetch::Fetcher;
use crate::manifest::{self, ManifestError, ManifestInfo};
use crate::net::{MirrorAsk, Network};
use crate::store::{Batch, Store, StoreError};
use crate::tags::{PublishError, Tags};

/// Why a pull through the mirror cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    /// The upstream says there is no such manifest or blob.
    #[error("the upstream has no such content")]
    Unknown,
    /// Only the upstream could supply it, and it did not; the text says why, for the client.
    #[error("{0}")]
    Unavailable(String),
    /// The upstream's manifest is not one the registry can store.
    #[error("the upstream's manifest")]
    Manifest(#[from] ManifestError),
    /// Signing the record of a resolved tag failed.
    #[error("signing a mirror's tag record")]
    Publish(#[from] PublishError),
    /// The local store failed.
    #[error("store")]
    Store(#[from] StoreError),
}

/// Upstream blob fetches a node runs at once; more wait for a turn.
const MAX_UPSTREAM_FETCHES: usize = 8;
/// Peers' mirror requests waiting to be answered; past it a peer is told `Unsupported` and
/// fetches from the upstream itself.
const PEER_ASKS_CAPACITY: usize = 64;
/// How long a failed upstream fetch is remembered (and not started again for a peer).
const FAILURE_MEMORY: Duration = Duration::from_secs(30);
/// How often a node asks the peer fetching a blob from the upstream how far it has come, until
/// the chunks start to arrive there.
const PEER_POLL: Duration = Duration::from_millis(200);
/// How long a peer's upstream fetch may go without progress before the node fetches the blob
/// from the upstream itself.
const PEER_STALL: Duration = Duration::from_secs(15);
/// How long a peer that says it holds a blob may show none of its chunk hashes before it is
/// not followed.
const DONE_WITHOUT_HASHES: Duration = Duration::from_secs(1);
/// Chunks of a blob from an upstream that may wait to be written while more arrive.
const WRITE_AHEAD_CHUNKS: usize = 4;
/// How many peers, in the blob's rendezvous order, are asked before this node fetches itself.
const PEERS_ASKED: usize = 3;
/// Most records the upstream confirmed that a node remembers; past it, those no longer fresh
/// are forgotten, and if none is, all are (each is checked again at its next pull).
const MAX_CONFIRMED: usize = 16_384;

/// How a node follows a peer's fetch of a blob from the upstream.
#[derive(Debug, Clone, Copy)]
enum Follow {
    /// Chunk by chunk as they reach it, learning their hashes from it; the blob's size.
    Growing(u64),
}

/// How one upstream blob fetch stands.
#[derive(Debug, Clone)]
enum BlobFetch {
    /// Bytes received so far.
    Running(u64),
    /// Stored and verified.
    Done,
    /// It failed; the text is for the client.
    Failed(String),
}

/// How a tag resolution ended, for the requests that waited for it.
#[derive(Debug, Clone)]
enum Resolved {
    /// The tag is servable, as this manifest (`None`: as its current record says).
    Done(Option<Digest>),
    /// The upstream has no such tag.
    Unknown,
    /// Only the upstream could resolve it, and it did not; the text is for the client.
    Unavailable(String),
    /// It failed on the resolving node's side: each waiter tries itself.
    Retry,
}

/// Tags being resolved now, each with the outcome for the requests that wait for it.
type Resolving = Mutex<HashMap<(RepoName, Tag), watch::Receiver<Option<Resolved>>>>;

/// Removes a tag's entry from the resolutions under way when its leader ends.
struct Leading<'a> {
    map: &'a Resolving,
    key: (RepoName, Tag),
}

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.key);
    }
}

/// What of the node a [`Mirror`] works with.
pub struct NodeParts {
    /// Where fetched content is kept.
    pub store: Store,
    /// Signs the records of resolved tags.
    pub tags: Tags,
    /// Announces fetched content and asks peers (none: a node alone).
    pub network: Option<Network>,
    /// Fetches the fleet's copies of blobs a peer fetched from an upstream.
    pub fetcher: Option<Fetcher>,
    /// Where the mirror's tasks run.
    pub tasks: tokio_util::task::TaskTracker,
    /// Stops them.
    pub cancel: tokio_util::sync::CancellationToken,
}

/// The node's mirror of upstream registries (cheap to clone).
#[derive(Clone)]
pub struct Mirror {
    inner: Arc<Inner>,
}

struct Inner {
    routes: Routes,
    upstreams: Vec<Upstream>,
    store: Store,
    tags: Tags,
    network: Option<Network>,
    /// Fetches the fleet's copies (of blobs a peer fetched from the upstream).
    fetcher: Option<Fetcher>,
    /// Upstream blob fetches under way, by digest.
    blobs: Mutex<HashMap<Digest, watch::Receiver<BlobFetch>>>,
    /// Upstream blob fetches that failed lately, and why: a peer asking again in that time is
    /// told so instead of starting the fetch again.
    failed: Mutex<HashMap<Digest, (std::time::Instant, String)>>,
    /// Tags being resolved now, with the outcome for requests that wait for it.
    resolving: Resolving,
    /// The upstream's last answer for each tag it resolved for this node (at most
    /// [`MAX_CONFIRMED`]), served when it is down in place of a record nobody checked.
    answers: Mutex<HashMap<(RepoName, Tag), Digest>>,
    /// Other members' records (by id) that the upstream confirmed, with the time each stops
    /// being fresh (milliseconds, the fleet's clock).
    confirmed: Mutex<HashMap<[u8; 32], u64>>,
    permits: Semaphore,
    tasks: tokio_util::task::TaskTracker,
    cancel: tokio_util::sync::CancellationToken,
}

impl std::fmt::Debug for Mirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mirror")
            .field("routes", &self.inner.routes)
            .finish_non_exhaustive()
    }
}

impl Mirror {
    /// A mirror of `upstreams` (in the order `routes` names them), working with `node`'s
    /// store, tags, network and fetcher; its fetches run on `node.tasks` and stop at
    /// `node.cancel`.
    pub fn new(routes: Routes, upstreams: Vec<Upstream>, node: NodeParts) -> Mirror {
        let NodeParts {
            store,
            tags,
            network,
            fetcher,
            tasks,
            cancel,
        } = node;
        let mirror = Mirror {
            inner: Arc::new(Inner {
                routes,
                upstreams,
                store,
                tags,
                network,
                fetcher,
                blobs: Mutex::default(),
                failed: Mutex::default(),
                confirmed: Mutex::default(),
                resolving: Mutex::default(),
                answers: Mutex::default(),
                permits: Semaphore::new(MAX_UPSTREAM_FETCHES),
                tasks,
                cancel,
            }),
        };
        if let Some(network) = &mirror.inner.network {
            let (asks, inbox) = tokio::sync::mpsc::channel(PEER_ASKS_CAPACITY);
            network.serve_mirror(asks);
            mirror.inner.tasks.spawn(mirror.clone().serve_peers(inbox));
        }
        mirror
    }

    /// Answers peers' requests to fetch a blob from an upstream for the fleet, until the node
    /// stops.
    async fn serve_peers(self, mut inbox: tokio::sync::mpsc::Receiver<MirrorAsk>) {
        loop {
            let ask = tokio::select! {
                () = self.inner.cancel.cancelled() => return,
                ask = inbox.recv() => match ask {
                    Some(ask) => ask,
                    None => return,
                },
            };
            let state = self.answer(&ask).await;
            let _ = ask.reply.send(state);
        }
    }

    /// How this node's fetch of a peer's blob stands, starting it if it is not under way.
    async fn answer(&self, ask: &MirrorAsk) -> MirrorState {
        let routes = &self.inner.routes;
        let (Some(i), Some((j, remote))) = (
            routes.by_name(&ask.upstream),
            routes.by_namespace(&ask.repo),
        ) else {
            return MirrorState::Unsupported;
        };
        let Some(upstream) = self.inner.upstreams.get(i).filter(|_| i == j) else {
            return MirrorState::Unsupported;
        };
        match self.inner.store.blob_size(&ask.digest).await {
            Ok(Some(_)) => return MirrorState::Done,
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(
                    error = &e as &dyn std::error::Error,
                    "answering a peer's mirror request"
                );
                return MirrorState::Unsupported;
            }
        }
        if let Some(why) = self.recently_failed(&ask.digest) {
            return MirrorState::Failed(why);
        }
        let fetch = self.fetch_blob(upstream.clone(), &ask.repo, remote, &ask.digest);
        let state = fetch.borrow().clone();
        tracing::debug!(peer = %ask.peer, digest = %ask.digest, "a peer asked for a blob of an upstream");
        match state {
            BlobFetch::Running(received) => MirrorState::Fetching { received },
            BlobFetch::Done => MirrorState::Done,
            BlobFetch::Failed(why) => MirrorState::Failed(why),
        }
    }

    /// Why the upstream fetch of `digest` failed, if it did within [`FAILURE_MEMORY`].
    fn recently_failed(&self, digest: &Digest) -> Option<String> {
        let mut failed = self
            .inner
            .failed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        failed.retain(|_, (at, _)| at.elapsed() < FAILURE_MEMORY);
        failed.get(digest).map(|(_, why)| why.clone())
    }

    /// Where a pull of `name` leads (see [`Routes::route`]); `ns` is the request's `ns`
    /// query parameter.
    pub async fn route(&self, name: &RepoName, ns: Option<&str>) -> Result<Routed, StoreError> {
        let routes = &self.inner.routes;
        if ns.is_some() || routes.by_namespace(name).is_some() {
            return Ok(routes.route(name, ns, || true));
        }
        let n = name.clone();
        let local = self.inner.store.read(move |i| i.repo_exists(&n)).await?;
        Ok(routes.route(name, ns, || local))
    }

    /// The upstream and its path of a repository in an upstream's namespace.
    fn upstream_of<'r>(&self, repo: &'r RepoName) -> Option<(&Upstream, &'r str)> {
        let (i, remote) = self.inner.routes.by_namespace(repo)?;
        Some((self.inner.upstreams.get(i)?, remote))
    }

    /// Makes the manifest `reference` of `repo` servable, if `repo` is an upstream's: a tag
    /// resolved (from a fresh record it can vouch for, or the upstream, or, when the upstream
    /// is down, the upstream's last answer or any record), a digest stored or known to the
    /// fleet. `Some(digest)`: serve that manifest for the tag (the one resolved, whatever
    /// record arrives meanwhile). Other repositories: nothing to do.
    pub async fn prepare_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<Option<Digest>, MirrorError> {
        let Some((upstream, remote)) = self.upstream_of(repo) else {
            return Ok(None);
        };
        match reference {
            Reference::Tag(tag) => self.resolve_tag(upstream, repo, remote, tag).await,
            Reference::Digest(digest) => {
                let (r, d) = (repo.clone(), digest.clone());
                let known = self
                    .inner
                    .store
                    .read(move |i| {
                        Ok(i.manifest(&r, &d)?.is_some() || i.record_blob(&r, &d)?.is_some())
                    })
                    .await?;
                if known {
                    return Ok(None);
                }
                let reference = digest.to_string();
                match upstream.manifest(remote, &reference).await {
                    Ok(m) => {
                        self.keep_manifest(repo, &m.digest, &m.media_type, &m.bytes)
                            .await?;
                        Ok(None)
                    }
                    Err(e) => Err(unavailable(upstream, remote, &reference, &e, false)),
                }
            }
        }
    }

    /// Resolves `repo:tag` (see [`Self::resolve_tag_now`]) once for every request that wants
    /// it at the same time: the first runs, the others take its outcome; if it went away or
    /// failed on this node's side, one of them runs next, and so on.
    async fn resolve_tag(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        remote: &str,
        tag: &Tag,
    ) -> Result<Option<Digest>, MirrorError> {
        let key = (repo.clone(), tag.clone());
        loop {
            let (follow, lead) = {
                let mut resolving = self
                    .inner
                    .resolving
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                match resolving.get(&key) {
                    Some(rx) => (Some(rx.clone()), None),
                    None => {
                        let (tx, rx) = watch::channel(None);
                        resolving.insert(key.clone(), rx);
                        (None, Some(tx))
                    }
                }
            };
            if let Some(mut rx) = follow {
                let outcome = rx
                    .wait_for(Option::is_some)
                    .await
                    .ok()
                    .and_then(|o| o.clone());
                match outcome {
                    Some(Resolved::Done(digest)) => return Ok(digest),
                    Some(Resolved::Unknown) => return Err(MirrorError::Unknown),
                    Some(Resolved::Unavailable(why)) => return Err(MirrorError::Unavailable(why)),
                    // The leader failed here or went away: the next one leads.
                    Some(Resolved::Retry) | None => continue,
                }
            }
            // The entry goes when the leader does, cancelled or not.
            let _leading = Leading {
                map: &self.inner.resolving,
                key: key.clone(),
            };
            let result = self.resolve_tag_now(upstream, repo, remote, tag).await;
            if let Some(tx) = lead {
                let _ = tx.send(Some(match &result {
                    Ok(digest) => Resolved::Done(digest.clone()),
                    Err(MirrorError::Unknown) => Resolved::Unknown,
                    Err(MirrorError::Unavailable(why)) => Resolved::Unavailable(why.clone()),
                    // This node's store failed: perhaps not for the next one to try.
                    Err(MirrorError::Store(_)) => Resolved::Retry,
                    // The same would happen again: the waiters are told.
                    Err(e @ (MirrorError::Manifest(_) | MirrorError::Publish(_))) => {
                        Resolved::Unavailable(format!(
                            "resolving {repo}:{tag} through the mirror failed: {e}"
                        ))
                    }
                }));
            }
            return result;
        }
    }

    /// Resolves `repo:tag`: `Some(digest)` is the manifest to serve for it (one the upstream
    /// gave this node, which it stored: whatever record arrives meanwhile), `None` the tag's
    /// current record as it is.
    async fn resolve_tag_now(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        remote: &str,
        tag: &Tag,
    ) -> Result<Option<Digest>, MirrorError> {
        let (r, t) = (repo.clone(), tag.clone());
        let current = self.inner.store.read(move |i| i.record(&r, &t)).await?;
        let now_ms = self.inner.tags.auth().clock().now_ms();
        let fresh_until = current.as_ref().map(|c| {
            c.record()
                .timestamp_ms
                .saturating_add(upstream.freshness().as_millis() as u64)
        });
        let fresh = fresh_until.is_some_and(|until| now_ms < until);
        let named = current
            .as_ref()
            .and_then(|c| c.record().target.as_ref())
            .map(|t| t.manifest.clone());
        let vouched = current.as_ref().is_some_and(|c| self.vouched(repo, c));
        let confirmed = current.as_ref().and_then(|c| self.confirmed_until(c));
        if fresh && (vouched || confirmed.is_some_and(|until| now_ms < until)) {
            // Served as the record says (its manifest may still be in the fleet only).
            return Ok(None);
        }
        match upstream.manifest(remote, tag.as_str()).await {
            Ok(m) => {
                self.keep_manifest(repo, &m.digest, &m.media_type, &m.bytes)
                    .await?;
                self.answered(repo, tag, &m.digest);
                match (&current, fresh_until) {
                    (Some(c), Some(until)) if fresh && named.as_ref() == Some(&m.digest) => {
                        self.confirm(c, until);
                    }
                    _ => {
                        if let Some(c) = current.as_ref().filter(|_| fresh) {
                            tracing::warn!(
                                upstream = upstream.name(),
                                %repo,
                                %tag,
                                signer = %c.record().publisher,
                                upstream_digest = %m.digest,
                                "a member's fresh record of the tag differs from the upstream: the upstream's answer wins"
                            );
                        }
                        self.publish(repo, tag, &m.digest).await?;
                    }
                }
                Ok(Some(m.digest))
            }
            Err(e) if current.is_some() && !matches!(e, UpstreamError::NotFound) => {
                // Offline first: the fleet's record serves. One this node cannot vouch for,
                // which the upstream never confirmed, gives way to what the upstream last told
                // this node, if it told it anything.
                let checked = vouched || confirmed.is_some();
                let last_answer = match self.last_answer(repo, tag).filter(|_| !checked) {
                    // Only while this node still holds that manifest (a collection may have
                    // taken it once no record named it).
                    Some(d) => {
                        let (r, d2) = (repo.clone(), d.clone());
                        let held = self
                            .inner
                            .store
                            .read(move |i| Ok(i.manifest(&r, &d2)?.is_some()))
                            .await?;
                        held.then_some(d)
                    }
                    None => None,
                };
                tracing::warn!(
                    upstream = upstream.name(),
                    %repo,
                    %tag,
                    checked,
                    error = &e as &dyn std::error::Error,
                    "the upstream did not answer: serving {}",
                    if last_answer.is_some() {
                        "the upstream's last answer"
                    } else {
                        "the fleet's record of the tag"
                    }
                );
                Ok(last_answer)
            }
            Err(e) => Err(unavailable(
                upstream,
                remote,
                tag.as_str(),
                &e,
                current.is_none(),
            )),
        }
    }

    /// Whether `record` of `repo` is served while fresh without asking the upstream: this node
    /// signed it, or the fleet lists the repository's publishers (so its signer is one).
    fn vouched(&self, repo: &RepoName, record: &shoal_protocol::VerifiedTagRecord) -> bool {
        let auth = self.inner.tags.auth();
        record.record().publisher == auth.own_key() || !auth.settings(repo).publishers.is_empty()
    }

    /// Until when `record` is fresh, if the upstream confirmed it.
    fn confirmed_until(&self, record: &shoal_protocol::VerifiedTagRecord) -> Option<u64> {
        let confirmed = self
            .inner
            .confirmed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        confirmed.get(&record.signed().id()).copied()
    }

    /// Remembers the upstream's answer for `repo:tag`, for when it is down.
    fn answered(&self, repo: &RepoName, tag: &Tag, digest: &Digest) {
        let mut answers = self
            .inner
            .answers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if answers.len() >= MAX_CONFIRMED && !answers.contains_key(&(repo.clone(), tag.clone())) {
            answers.clear();
        }
        answers.insert((repo.clone(), tag.clone()), digest.clone());
    }

    /// The upstream's last answer for `repo:tag` to this node, if it gave one.
    fn last_answer(&self, repo: &RepoName, tag: &Tag) -> Option<Digest> {
        let answers = self
            .inner
            .answers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        answers.get(&(repo.clone(), tag.clone())).cloned()
    }

    /// Remembers that the upstream confirmed `record`, fresh until `until_ms`.
    fn confirm(&self, record: &shoal_protocol::VerifiedTagRecord, until_ms: u64) {
        let now_ms = self.inner.tags.auth().clock().now_ms();
        let mut confirmed = self
            .inner
            .confirmed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if confirmed.len() >= MAX_CONFIRMED {
            confirmed.retain(|_, until| now_ms < *until);
            if confirmed.len() >= MAX_CONFIRMED {
                confirmed.clear();
            }
        }
        confirmed.insert(record.signed().id(), until_ms);
    }

    /// Stores a manifest fetched from an upstream (already checked against its digest) in
    /// `repo`, and tells the fleet this node holds it.
    async fn keep_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<(), MirrorError> {
        let info = manifest::parse(bytes, Some(media_type))?;
        self.inner
            .store
            .keep_manifest(repo, digest, bytes, info)
            .await?;
        if let Some(n) = &self.inner.network {
            let _ = n.provide(digest.clone()).await;
        }
        Ok(())
    }

    /// Signs and gossips a record naming `digest` for `repo:tag`, with every blob of it this
    /// node holds (the rest of the fleet fetches those from the fleet; the others it asks the
    /// upstream's mirror for).
    async fn publish(
        &self,
        repo: &RepoName,
        tag: &Tag,
        digest: &Digest,
    ) -> Result<(), MirrorError> {
        let target = self.target(repo, digest).await?;
        let record = self
            .inner
            .tags
            .publish(repo, tag, Some(target), Batch::new())
            .await?;
        if let Some(n) = &self.inner.network {
            if let Err(e) = n.publish(record.signed()).await {
                tracing::warn!(
                    error = &e as &dyn std::error::Error,
                    "could not gossip a mirror's tag record"
                );
            }
        }
        Ok(())
    }

    /// The target of a record for the manifest `digest` of `repo`: the blobs (and, for an
    /// index, the child manifests and their blobs) this node holds so far.
    async fn target(&self, repo: &RepoName, digest: &Digest) -> Result<TagTarget, StoreError> {
        let (r, d) = (repo.clone(), digest.clone());
        let info: ManifestInfo = self
            .inner
            .store
            .read(move |i| i.manifest(&r, &d))
            .await?
            .ok_or_else(|| StoreError::Invariant("a manifest just stored is missing"))?;
        let mut target = self.inner.tags.held_target_for(repo, digest, &info).await?;
        target
            .blobs
            .truncate(shoal_protocol::record::MAX_RECORD_BLOBS);
        Ok(target)
    }

    /// Makes the blob `digest` of `repo` servable, if `repo` is an upstream's and nobody in
    /// the fleet holds it: fetched from the upstream (one fetch for every request that wants
    /// it at the same time), checked against its digest, stored and linked.
    pub async fn prepare_blob(&self, repo: &RepoName, digest: &Digest) -> Result<(), MirrorError> {
        let Some((upstream, remote)) = self.upstream_of(repo) else {
            return Ok(());
        };
        let store = &self.inner.store;
        if store.blob_size(digest).await?.is_some() {
            store.link(repo, digest).await?;
            return Ok(());
        }
        let (r, d) = (repo.clone(), digest.clone());
        if store.read(move |i| i.record_blob(&r, &d)).await?.is_some() {
            // A record names it: the fleet has it, and the registry fetches it from there.
            return Ok(());
        }
        match self.fetch_from_peers(upstream, repo, digest).await {
            Ok(true) => {
                store.link(repo, digest).await?;
                return Ok(());
            }
            Ok(false) => {}
            Err(e) => {
                tracing::info!(%digest, error = &e as &dyn std::error::Error, "the fleet's copy of an upstream's blob could not be fetched; fetching from the upstream")
            }
        }
        let mut fetch = self.fetch_blob(upstream.clone(), repo, remote, digest);
        let state = fetch
            .wait_for(|s| !matches!(s, BlobFetch::Running(_)))
            .await
            .map(|s| s.clone())
            .unwrap_or(BlobFetch::Failed("the node is shutting down".into()));
        match state {
            BlobFetch::Done | BlobFetch::Running(_) => {
                store.link(repo, digest).await?;
                Ok(())
            }
            BlobFetch::Failed(why) => Err(MirrorError::Unavailable(why)),
        }
    }

    /// Gets the blob from the peer that fetches it from the upstream for the fleet, if that is
    /// not this node: the connected peers and this node ranked by a hash of the blob and their
    /// ids (every node ranks them alike, so they all ask the same one), the first few asked in
    /// turn. `Ok(false)`: this node is the one to fetch it (or no peer would).
    async fn fetch_from_peers(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<bool, crate::fetch::FetchError> {
        let (Some(network), Some(fetcher)) = (&self.inner.network, &self.inner.fetcher) else {
            return Ok(false);
        };
        let me = network.peer_id();
        let mut ranked: Vec<PeerId> = network
            .peers()
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|p| p.peer_id)
            .chain(std::iter::once(me))
            .collect();
        ranked.sort_by_cached_key(|p| std::cmp::Reverse(rendezvous(digest, p)));
        ranked.dedup();
        for peer in ranked.into_iter().take(PEERS_ASKED) {
            if peer == me {
                return Ok(false);
            }
            match self
                .wait_for_peer(network, peer, upstream, repo, digest)
                .await
            {
                None => continue,
                Some(Follow::Growing(size)) => {
                    // The chunks come from the peer (and from each other) as they reach it, each
                    // checked against the hash it gives, and the whole blob against its digest
                    // before it is kept.
                    fetcher.growing_blob(repo, digest, size, peer).await?;
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Asks `peer` to fetch the blob from the upstream and waits until it has its first chunk
    /// hashes (or the whole blob); `None` if the peer does not fetch it or makes no progress.
    async fn wait_for_peer(
        &self,
        network: &Network,
        peer: PeerId,
        upstream: &Upstream,
        repo: &RepoName,
        digest: &Digest,
    ) -> Option<Follow> {
        let mut received = 0;
        let mut progress_at = std::time::Instant::now();
        let mut done_since = None;
        loop {
            let request = SyncRequest::Mirror {
                upstream: upstream.name().to_owned(),
                repo: repo.clone(),
                digest: digest.clone(),
            };
            match network.sync(peer, request).await {
                Ok(SyncResponse::Mirror(MirrorState::Done)) => {
                    done_since.get_or_insert_with(std::time::Instant::now);
                }
                Ok(SyncResponse::Mirror(MirrorState::Fetching { received: r })) => {
                    if r > received {
                        (received, progress_at) = (r, std::time::Instant::now());
                    }
                }
                Ok(SyncResponse::Mirror(MirrorState::Failed(why))) => {
                    tracing::info!(%peer, %digest, why, "a peer's fetch from the upstream failed");
                    return None;
                }
                other => {
                    tracing::debug!(%peer, %digest, answer = ?other.map(|_| "no mirror"), "a peer does not fetch this blob from the upstream");
                    return None;
                }
            }
            let request = SyncRequest::ChunkHashes {
                digest: digest.clone(),
                from: 0,
            };
            match network.sync(peer, request).await {
                Ok(SyncResponse::ChunkHashes(Some(h))) => return Some(Follow::Growing(h.size)),
                // A peer that holds the blob but gives no hashes for it (it predates them, or
                // cut the blob otherwise): its index is its word only, and a fetch by an index
                // treats a holder that disagrees as a liar, so it is not followed. Given a
                // moment first: between storing the blob and linking it into the repository, a
                // peer says it is done but shows nothing of it.
                _ if done_since.is_some_and(|t| t.elapsed() > DONE_WITHOUT_HASHES) => return None,
                _ => {}
            }
            if progress_at.elapsed() > PEER_STALL || self.inner.cancel.is_cancelled() {
                return None;
            }
            tokio::time::sleep(PEER_POLL).await;
        }
    }

    /// The upstream fetch of `digest` under way, or a new one.
    fn fetch_blob(
        &self,
        upstream: Upstream,
        repo: &RepoName,
        remote: &str,
        digest: &Digest,
    ) -> watch::Receiver<BlobFetch> {
        let mut fetches = self
            .inner
            .blobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(rx) = fetches.get(digest) {
            return rx.clone();
        }
        let (tx, rx) = watch::channel(BlobFetch::Running(0));
        fetches.insert(digest.clone(), rx.clone());
        drop(fetches);
        let (this, repo, remote, digest) = (
            self.clone(),
            repo.clone(),
            remote.to_owned(),
            digest.clone(),
        );
        self.inner.tasks.spawn(async move {
            let result = tokio::select! {
                () = this.inner.cancel.cancelled() => Err("the node is shutting down".to_owned()),
                r = this.download(&upstream, &repo, &remote, &digest, &tx) => r,
            };
            this.inner
                .blobs
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&digest);
            let done = result.is_ok();
            if let Err(why) = &result {
                this.inner
                    .failed
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(digest.clone(), (std::time::Instant::now(), why.clone()));
            }
            tx.send_replace(match result {
                Ok(()) => BlobFetch::Done,
                Err(why) => BlobFetch::Failed(why),
            });
            if done {
                this.blob_arrived(&repo, &digest).await;
            }
        });
        rx
    }

    /// Streams the blob from the upstream into the store, hashing as it goes.
    async fn download(
        &self,
        upstream: &Upstream,
        repo: &RepoName,
        remote: &str,
        digest: &Digest,
        progress: &watch::Sender<BlobFetch>,
    ) -> Result<(), String> {
        use futures::StreamExt as _;
        let _turn = self
            .inner
            .permits
            .acquire()
            .await
            .map_err(|_| "the node is shutting down".to_owned())?;
        let started = std::time::Instant::now();
        let blob = upstream
            .blob(remote, digest)
            .await
            .map_err(|e| describe(upstream, remote, &digest.to_string(), &e))?;
        let store = &self.inner.store;
        let fail = |e: StoreError| {
            tracing::warn!(%digest, error = &e as &dyn std::error::Error, "storing a blob from an upstream");
            format!("storing {digest} failed on this node")
        };
        let mismatch = |e: StoreError| match e {
            StoreError::DigestMismatch { .. } | StoreError::ChunkRejected { .. } => {
                tracing::warn!(upstream = upstream.name(), %repo, %digest, "the upstream sent a blob that fails its digest");
                format!("{} sent {digest} with other content", upstream.name())
            }
            e => fail(e),
        };
        let content_length = blob.content_length;
        let mut body = blob.stream;
        let received = std::sync::atomic::AtomicU64::new(0);
        let next = |piece: Result<bytes::Bytes, UpstreamError>| {
            let piece = piece.map_err(|e| describe(upstream, remote, &digest.to_string(), &e))?;
            let received = received.fetch_add(piece.len() as u64, Relaxed) + piece.len() as u64;
            // A body longer than announced is not the blob: stop before writing past it.
            if content_length.is_some_and(|n| received > n) {
                return Err(format!(
                    "{} sent more of {digest} than the length it announced",
                    upstream.name()
                ));
            }
            progress.send_replace(BlobFetch::Running(received));
            Ok(piece)
        };
        let growing = match content_length {
            // Only a download of its own: one that a peer's hashes feed, or that a signed index
            // sealed and a fetch drives, is left to that fetch, and this one goes to a file.
            Some(size) => store
                .growing_partial(digest, size)
                .await
                .ok()
                .filter(|p| p.claim(crate::store::partial::Role::Upstream)),
            None => None,
        };
        if let Some(partial) = growing {
            // Chunk by chunk into a growing download, which the fleet fetches from as it grows.
            partial.for_repo(repo);
            if let Some(n) = &self.inner.network {
                let _ = n.provide_part(digest.clone()).await;
            }
            let size = content_length.unwrap_or_default();
            let chunk_size = partial.index().chunk_size() as usize;
            // The chunks go to disk in a task of their own, a few behind the upstream's stream,
            // so that neither the disk nor the hashing holds up the next bytes.
            let (chunks, mut to_write) = tokio::sync::mpsc::channel::<Vec<u8>>(WRITE_AHEAD_CHUNKS);
            let read = async {
                // Owned here: the writer ends when this ends.
                let chunks = chunks;
                let mut chunk = Vec::with_capacity(chunk_size);
                while let Some(piece) = body.next().await {
                    let piece = next(piece)?;
                    let mut rest = &piece[..];
                    while !rest.is_empty() {
                        let take = (chunk_size - chunk.len()).min(rest.len());
                        chunk.extend_from_slice(&rest[..take]);
                        rest = &rest[take..];
                        if chunk.len() == chunk_size {
                            let full =
                                std::mem::replace(&mut chunk, Vec::with_capacity(chunk_size));
                            if chunks.send(full).await.is_err() {
                                return Ok(());
                            }
                        }
                    }
                }
                // A body that ends short is not the blob: its last chunk is not written.
                if received.load(Relaxed) != size {
                    return Err(format!(
                        "{} sent {} bytes of {digest}, not the {size} it announced",
                        upstream.name(),
                        received.load(Relaxed)
                    ));
                }
                if !chunk.is_empty() {
                    let _ = chunks.send(chunk).await;
                }
                Ok(())
            };
            let write = async {
                let mut written = 0u32;
                while let Some(chunk) = to_write.recv().await {
                    let (p, i) = (partial.clone(), written);
                    let done = tokio::task::spawn_blocking(move || p.write_own_chunk(i, &chunk))
                        .await
                        .map_err(StoreError::from)
                        .and_then(|r| r);
                    if let Err(e) = done {
                        // Stops the reader at its next chunk.
                        to_write.close();
                        return Err(mismatch(e));
                    }
                    written += 1;
                }
                Ok(())
            };
            let (read, write) = tokio::join!(read, write);
            // The writer's error first: the reader only stopped because of it.
            let stored = match write.and(read) {
                Ok(()) => store.finish_partial(&partial).await.map_err(mismatch),
                Err(e) => Err(e),
            };
            if let Err(e) = stored {
                // Peers following it see it go and fetch the blob themselves.
                store.abandon_partial(&partial).await;
                return Err(e);
            }
        } else {
            let mut writer = store
                .blob_writer(digest.algorithm(), content_length)
                .await
                .map_err(fail)?;
            while let Some(piece) = body.next().await {
                writer.write(&next(piece)?).await.map_err(fail)?;
            }
            writer.finish(digest).await.map_err(mismatch)?;
        }
        store.link(repo, digest).await.map_err(fail)?;
        tracing::info!(upstream = upstream.name(), %repo, %digest, bytes = received.load(Relaxed), elapsed_ms = started.elapsed().as_millis() as u64, "fetched a blob from the upstream");
        if let Some(n) = &self.inner.network {
            let _ = n.provide(digest.clone()).await;
        }
        Ok(())
    }

    /// A blob of `repo` arrived from the upstream: the records of its tags that name a manifest
    /// needing it, signed by this node, are signed again with it, so that the fleet fetches it
    /// from the fleet.
    async fn blob_arrived(&self, repo: &RepoName, digest: &Digest) {
        let (r, d) = (repo.clone(), digest.clone());
        let own = self.inner.tags.auth().own_key();
        let stale: Result<Vec<(Tag, Digest)>, StoreError> = self
            .inner
            .store
            .read(move |i| {
                let mut out = Vec::new();
                for tag in i.tags(&r, None, usize::MAX)? {
                    let Some(rec) = i.record(&r, &tag)? else {
                        continue;
                    };
                    let record = rec.record();
                    let Some(target) = &record.target else {
                        continue;
                    };
                    if record.publisher != own || target.blobs.iter().any(|b| b.digest == d) {
                        continue;
                    }
                    let Some(info) = i.manifest(&r, &target.manifest)? else {
                        continue;
                    };
                    let mut needs = info.blobs.contains(&d) || info.manifests.contains(&d);
                    for child in &info.manifests {
                        if let Some(ci) = i.manifest(&r, child)? {
                            needs |= ci.blobs.contains(&d);
                        }
                    }
                    if needs {
                        out.push((tag, target.manifest.clone()));
                    }
                }
                Ok(out)
            })
            .await;
        match stale {
            Ok(stale) => {
                for (tag, manifest) in stale {
                    if let Err(e) = self.publish(repo, &tag, &manifest).await {
                        tracing::warn!(%repo, %tag, error = &e as &dyn std::error::Error, "signing a mirror's record again with a new blob");
                    }
                }
            }
            Err(e) => {
                tracing::warn!(%repo, error = &e as &dyn std::error::Error, "looking for records that name a new blob")
            }
        }
    }
}

/// The rank of `peer` for fetching `digest` from an upstream for the fleet (highest first).
fn rendezvous(digest: &Digest, peer: &PeerId) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("shoal mirror rendezvous v1");
    h.update(digest.to_string().as_bytes());
    h.update(&peer.to_bytes());
    *h.finalize().as_bytes()
}

/// What a client is told when an upstream could not supply `reference` of `remote`.
fn describe(upstream: &Upstream, remote: &str, reference: &str, e: &UpstreamError) -> String {
    format!("{}: {remote}:{reference}: {e}", upstream.name())
}

/// The error for content that only the upstream could supply and did not: unknown if the
/// upstream says so, else unavailable, saying whether the fleet ever resolved it.
fn unavailable(
    upstream: &Upstream,
    remote: &str,
    reference: &str,
    e: &UpstreamError,
    never_resolved: bool,
) -> MirrorError {
    if matches!(e, UpstreamError::NotFound) {
        return MirrorError::Unknown;
    }
    tracing::warn!(
        upstream = upstream.name(),
        remote,
        reference,
        error = e as &dyn std::error::Error,
        "an upstream could not supply a manifest"
    );
    let mut why = describe(upstream, remote, reference, e);
    if never_resolved {
        why.push_str("; the fleet has never resolved it, so it cannot be served from the fleet");
    }
    MirrorError::Unavailable(why)
}
