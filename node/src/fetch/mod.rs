//! Getting content the node lacks from the peers that have it.
//!
//! A blob named by a trusted tag record comes with the id of its `BlobIndex`. The fetcher asks a
//! provider for that `BlobIndex`, checks its id against the record, then requests the blob chunk
//! by chunk and checks each chunk's BLAKE3 hash before it writes a byte; the store checks the
//! whole blob's sha256 before it becomes a blob. A peer that sends a bad index or a bad chunk is
//! disconnected and the next provider is tried. Manifests are small and are checked against their
//! digest. Concurrent requests for the same content share one fetch.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::PeerId;
use rand::seq::SliceRandom;
use shoal_protocol::message::{SyncRequest, SyncResponse};
use shoal_protocol::{BlobIndex, BlobRef, Digest, RepoName};
use tokio::sync::watch;

use crate::manifest::{self, MAX_MANIFEST_BYTES, ManifestError};
use crate::net::chunk::ChunkClient;

pub mod candidates;
pub mod plan;
pub mod swarm;
use crate::net::Network;
use crate::store::partial::Partial;
use crate::store::{Store, StoreError};

/// The waits before each new round of asking the fleet for a manifest, or a blob's index, that a
/// record names, after a round in which no candidate supplied it: about 3.5 s in all before the
/// client hears it is unknown. Right after a record arrives, connections to the rest of the
/// fleet may still be coming up and the holders may be busy: the swarm benchmark's sweep met
/// both (a manifest and a layer answered 404 within a second of the pull's start).
const SUPPLIER_RETRIES: [Duration; 3] = [
    Duration::from_millis(250),
    Duration::from_millis(750),
    Duration::from_millis(2500),
];

/// Why content could not be fetched.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    /// No peer could supply it.
    #[error("no peer could supply {0}")]
    Unavailable(Digest),
    /// The local store failed.
    #[error("store")]
    Store(#[from] StoreError),
    /// The fetched manifest is not one the registry can store.
    #[error("fetched manifest is invalid")]
    Invalid(#[from] ManifestError),
    /// The node is shutting down; a blob's partial download stays on disk to be resumed.
    #[error("cancelled: the node is shutting down")]
    Cancelled,
}

/// What one fetch is for: concurrent requests for the same key share one fetch.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum FetchKey {
    /// A blob's bytes (whichever repository asked; each is linked by its own caller).
    Blob(Digest),
    /// A manifest in a repository: the same manifest in two repositories is indexed twice.
    Manifest(RepoName, Digest),
}

/// Where a fetch stands.
#[derive(Debug, Clone)]
pub enum DownloadState {
    /// Looking for peers that hold it, and for the blob's index.
    Locating,
    /// A blob's chunks are arriving into this partial blob; every chunk it holds is verified
    /// and can be read as soon as it lands.
    Streaming(Arc<Partial>),
    /// The content is stored (and, for a blob, linked into the repository that asked).
    Done,
    /// It failed.
    Failed(FetchError),
}

impl DownloadState {
    /// Whether the fetch is over, one way or the other.
    pub fn is_finished(&self) -> bool {
        matches!(self, DownloadState::Done | DownloadState::Failed(_))
    }
}

/// A handle on a fetch started or joined through the [`Fetcher`]: a watch of its
/// [`DownloadState`]. Dropping the handle does not stop the fetch (others may be waiting on
/// it); the node's shutdown does.
#[derive(Debug, Clone)]
pub struct Download {
    state: watch::Receiver<DownloadState>,
}

impl Download {
    /// The state now.
    pub fn state(&self) -> DownloadState {
        self.state.borrow().clone()
    }

    /// Waits until the state changes from what was last seen (through this method or
    /// [`Download::state`]'s siblings). Returns `false` if the fetch is gone without a final
    /// state, which only happens when its task is aborted at shutdown.
    pub async fn changed(&mut self) -> bool {
        self.state.changed().await.is_ok()
    }

    /// Waits until there are bytes to read or there never will be: `Streaming`, `Done` or
    /// `Failed`, never `Locating`.
    pub async fn started(&mut self) -> DownloadState {
        let state = self
            .state
            .wait_for(|s| !matches!(s, DownloadState::Locating))
            .await
            .map(|s| s.clone());
        state.unwrap_or(DownloadState::Failed(FetchError::Cancelled))
    }

    /// Waits until the fetch is over.
    pub async fn finished(&mut self) -> Result<(), FetchError> {
        let state = self
            .state
            .wait_for(DownloadState::is_finished)
            .await
            .map(|s| s.clone());
        match state {
            Ok(DownloadState::Failed(e)) => Err(e),
            Ok(_) => Ok(()),
            Err(_) => Err(FetchError::Cancelled),
        }
    }
}

/// Fetches blobs and manifests from peers (cheap to clone).
#[derive(Clone)]
pub struct Fetcher {
    store: Store,
    network: Network,
    inflight: Arc<Mutex<HashMap<FetchKey, watch::Receiver<DownloadState>>>>,
    bad_peers: Arc<std::sync::atomic::AtomicU64>,
    cancel: tokio_util::sync::CancellationToken,
    tasks: tokio_util::task::TaskTracker,
}

impl Fetcher {
    /// A fetcher that stores into `store` and asks peers through `network`. Its fetches run on
    /// `tasks` and stop when `cancel` fires (a partial download stays on disk to be resumed).
    pub fn new(
        store: Store,
        network: Network,
        cancel: tokio_util::sync::CancellationToken,
        tasks: tokio_util::task::TaskTracker,
    ) -> Fetcher {
        Fetcher {
            store,
            network,
            inflight: Arc::default(),
            bad_peers: Arc::default(),
            cancel,
            tasks,
        }
    }

    /// Runs `work` once per key however many callers ask at the same time, in its own task (a
    /// client hanging up does not cancel it for the others), and returns a handle on it. `work`
    /// may report progress on the sender it is given; its result becomes the final state.
    fn start<F, Fut>(&self, key: FetchKey, work: F) -> Download
    where
        F: FnOnce(watch::Sender<DownloadState>) -> Fut,
        Fut: std::future::Future<Output = Result<(), FetchError>> + Send + 'static,
    {
        let mut map = self
            .inflight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(rx) = map.get(&key) {
            return Download { state: rx.clone() };
        }
        let (tx, rx) = watch::channel(DownloadState::Locating);
        map.insert(key.clone(), rx.clone());
        let work = work(tx.clone());
        let inflight = self.inflight.clone();
        let cancel = self.cancel.clone();
        self.tasks.spawn(async move {
            // Cancelled, the work future is dropped, and with it every task it owns.
            let result = tokio::select! {
                () = cancel.cancelled() => Err(FetchError::Cancelled),
                r = work => r,
            };
            inflight
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&key);
            tx.send_replace(match result {
                Ok(()) => DownloadState::Done,
                Err(e) => DownloadState::Failed(e),
            });
        });
        Download { state: rx }
    }

    /// Candidate peers for a digest: DHT providers first, then every connected peer (a peer that
    /// lacks it says so at once); with a site, the peers of this site first, then the seeders,
    /// then the rest.
    async fn candidates(&self, digest: &Digest) -> Vec<PeerId> {
        // With a site, the nodes that hold the whole blob (seeders) come right after this site's
        // own peers: only a few downloaders of a site use its WAN link (the plan's gateways),
        // and among a thousand providers, most still downloading, a random few would seldom
        // include the publisher, whose link is the fleet's fattest at the start of a rollout
        // (the fleet simulator's `edge-local-first` scenario, with the plan's gateways, is
        // several times slower without seeders first: `simulations/README.md`). Without a site, nothing changes: in a
        // datacenter every node asking the publisher first would only queue at it.
        let seeders = async {
            if self.network.has_site() {
                self.network.find_seeders(digest.clone()).await.ok()
            } else {
                None
            }
        };
        let (providers, seeders) =
            futures::join!(self.network.find_providers(digest.clone()), seeders);
        let mut providers = providers.unwrap_or_default();
        let mut seeders = seeders.unwrap_or_default();
        providers.shuffle(&mut rand::rng());
        seeders.shuffle(&mut rand::rng());
        let mut connected: Vec<PeerId> = self
            .network
            .peers()
            .await
            .unwrap_or_default()
            .iter()
            .map(|p| p.peer_id)
            .collect();
        connected.shuffle(&mut rand::rng());
        candidates::order(
            providers,
            seeders,
            connected,
            &self.network.peer_id(),
            |p| self.network.same_site(p),
        )
    }

    /// Makes the blob `blob` of `repo` present in the store, fetching it if needed, and links it.
    pub async fn blob(&self, repo: &RepoName, blob: &BlobRef) -> Result<(), FetchError> {
        let (mut download, joined) = self.join_or_start(repo, blob);
        download.finished().await?;
        if joined {
            self.store.link(repo, &blob.digest).await?;
        }
        Ok(())
    }

    /// Starts fetching a blob (or joins the fetch under way) without waiting for it; the
    /// repository is linked when it completes. The handle says when its bytes start to arrive.
    pub fn download(&self, repo: &RepoName, blob: &BlobRef) -> Download {
        let (download, joined) = self.join_or_start(repo, blob);
        if joined {
            // The fetch under way links the repository it was started for; this one is linked
            // once the bytes are here, whether or not the caller still waits.
            let (this, repo, digest) = (self.clone(), repo.clone(), blob.digest.clone());
            let mut joined = download.clone();
            self.tasks.spawn(async move {
                if joined.finished().await.is_ok() {
                    if let Err(e) = this.store.link(&repo, &digest).await {
                        tracing::warn!(error = &e as &dyn std::error::Error, %digest, %repo, "linking a fetched blob");
                    }
                }
            });
        }
        download
    }

    /// The fetch of `blob` under way, or a new one that links it into `repo` when it completes;
    /// and whether it was joined (started earlier, for whichever repository asked first).
    fn join_or_start(&self, repo: &RepoName, blob: &BlobRef) -> (Download, bool) {
        let this = self.clone();
        let (repo, blob) = (repo.clone(), blob.clone());
        let mut started = false;
        let download = self.start(FetchKey::Blob(blob.digest.clone()), |state| {
            started = true;
            async move {
                this.fetch_blob(&repo, &blob, &state).await?;
                this.store.link(&repo, &blob.digest).await?;
                Ok(())
            }
        });
        (download, !started)
    }

    async fn fetch_blob(
        &self,
        repo: &RepoName,
        blob: &BlobRef,
        state: &watch::Sender<DownloadState>,
    ) -> Result<(), FetchError> {
        if self.store.blob_size(&blob.digest).await?.is_some() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let (index, candidates, lookup) = until_supplied(|| async move {
            let candidates = self.candidates(&blob.digest).await;
            let lookup = started.elapsed();
            Ok((
                self.blob_index(blob, &candidates).await?,
                candidates,
                lookup,
            ))
        })
        .await?;
        let indexed = started.elapsed();
        let partial = self.store.partial(index).await?;
        partial.for_repo(repo);
        state.send_replace(DownloadState::Streaming(partial.clone()));
        // Announce at once: peers that come later take the chunks this node already holds.
        let _ = self.network.provide_part(blob.digest.clone()).await;
        let this = self.clone();
        let digest = blob.digest.clone();
        let refresh = move || -> futures::future::BoxFuture<'static, Vec<PeerId>> {
            let (this, digest) = (this.clone(), digest.clone());
            Box::pin(async move { this.candidates(&digest).await })
        };
        match swarm::download(
            &self.store,
            &self.network,
            blob,
            partial,
            swarm::Sources {
                candidates,
                refresh,
                hashes_from: None,
            },
            &self.bad_peers,
        )
        .await
        {
            Ok(timing) => {
                // Where the time went, from the fetch's start: the candidates found, the index
                // from one of them, the first and last chunk written, the digest checked.
                let ms = |d: std::time::Duration| d.as_millis() as u64;
                let since = |t: std::time::Instant| ms(t.duration_since(started));
                tracing::info!(
                    digest = %blob.digest,
                    size = blob.size,
                    lookup_ms = ms(lookup),
                    index_ms = ms(indexed),
                    first_chunk_ms = timing.first_chunk.map(since),
                    last_chunk_ms = since(timing.last_chunk),
                    elapsed_ms = ms(started.elapsed()),
                    "fetched blob"
                );
                // Now a seeder: other sites' downloads look for those first.
                let _ = self.network.provide_seed(blob.digest.clone()).await;
                Ok(())
            }
            Err(swarm::SwarmError::Stalled) => {
                tracing::warn!(digest = %blob.digest, elapsed_ms = started.elapsed().as_millis() as u64, "download stalled: no peer supplied the missing chunks; it stays resumable");
                Err(FetchError::Unavailable(blob.digest.clone()))
            }
            Err(swarm::SwarmError::Store(e)) => Err(e.into()),
            Err(swarm::SwarmError::Hashes(_)) => Err(FetchError::Unavailable(blob.digest.clone())),
        }
    }

    /// Makes the blob `digest` (`size` bytes) of `repo` present in the store, fetched as
    /// `source` fetches it from an upstream: each chunk as soon as it reaches `source`, from it
    /// or from any peer that already has it, checked against the hash `source` gives for it;
    /// the whole blob is checked against `digest` before it is kept. A `source` whose hashes
    /// or bytes fail that is reported, and the download discarded. Concurrent requests for the
    /// blob share one fetch, as with [`Fetcher::blob`].
    pub async fn growing_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
        source: PeerId,
    ) -> Result<(), FetchError> {
        let this = self.clone();
        let (r, d) = (repo.clone(), digest.clone());
        let mut started = false;
        let mut download = self.start(FetchKey::Blob(digest.clone()), |_| {
            started = true;
            async move {
                this.fetch_growing(&r, &d, size, source).await?;
                this.store.link(&r, &d).await?;
                Ok(())
            }
        });
        download.finished().await?;
        if !started {
            self.store.link(repo, digest).await?;
        }
        Ok(())
    }

    async fn fetch_growing(
        &self,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
        source: PeerId,
    ) -> Result<(), FetchError> {
        if self.store.blob_size(digest).await?.is_some() {
            return Ok(());
        }
        let partial = self.store.growing_partial(digest, size).await?;
        if !partial.claim(crate::store::partial::Role::Follower) {
            // This node fetches the blob from the upstream itself.
            return Err(FetchError::Unavailable(digest.clone()));
        }
        partial.for_repo(repo);
        // Not `Streaming`: a client joining this fetch gets the blob only once it passed its
        // digest, for nothing signed vouches for the chunks' hashes.
        let _ = self.network.provide_part(digest.clone()).await;
        let mut candidates = vec![source];
        candidates.extend(self.candidates(digest).await);
        let this = self.clone();
        let d = digest.clone();
        let refresh = move || -> futures::future::BoxFuture<'static, Vec<PeerId>> {
            let (this, d) = (this.clone(), d.clone());
            Box::pin(async move { this.candidates(&d).await })
        };
        let blob = BlobRef {
            digest: digest.clone(),
            size,
            index: partial.index().id(),
        };
        let started = std::time::Instant::now();
        let result = swarm::download(
            &self.store,
            &self.network,
            &blob,
            partial.clone(),
            swarm::Sources {
                candidates,
                refresh,
                hashes_from: Some(source),
            },
            &self.bad_peers,
        )
        .await;
        if let Ok(timing) = result {
            tracing::info!(%digest, size, %source, last_chunk_ms = timing.last_chunk.duration_since(started).as_millis() as u64, elapsed_ms = started.elapsed().as_millis() as u64, "fetched a blob as a peer fetched it from an upstream");
            let _ = self.network.provide_seed(digest.clone()).await;
            return Ok(());
        }
        // The hashes learned from `source` may be what failed: none of it is kept.
        self.store.abandon_partial(&partial).await;
        let liar = match &result {
            Err(swarm::SwarmError::Hashes(_)) => true,
            // The whole fails its digest. The upstream may have sent other bytes, which the
            // source finds out too and drops; a source that keeps such a blob lied.
            Err(swarm::SwarmError::Store(StoreError::DigestMismatch { .. })) => {
                self.keeps_whole(source, digest).await
            }
            _ => false,
        };
        if liar {
            tracing::warn!(%source, %digest, "the chunk hashes of a peer fetching a blob from an upstream are not the blob's; reported");
            self.bad_peers
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.network
                .report(source, crate::net::conduct::Offence::BadContent);
        }
        match result {
            Err(swarm::SwarmError::Store(StoreError::DigestMismatch { .. }))
            | Err(swarm::SwarmError::Hashes(_)) => Err(FetchError::Unavailable(digest.clone())),
            Err(swarm::SwarmError::Store(e)) => Err(e.into()),
            Err(swarm::SwarmError::Stalled) | Ok(_) => Err(FetchError::Unavailable(digest.clone())),
        }
    }

    /// Whether `peer` keeps the blob `digest` whole: it says so twice, half a second or more
    /// apart (an honest peer whose copy is complete but fails the digest check drops it within
    /// that), asked a few times over about two seconds.
    async fn keeps_whole(&self, peer: PeerId, digest: &Digest) -> bool {
        let mut whole = 0;
        for _ in 0..5 {
            let ask = SyncRequest::Have {
                digest: digest.clone(),
            };
            match self.network.sync(peer, ask).await {
                Ok(SyncResponse::Have(Some(have))) => {
                    if have.bitfield().is_some_and(|b| b.is_full()) {
                        whole += 1;
                        if whole >= 2 {
                            return true;
                        }
                    }
                }
                _ => return false,
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        false
    }

    /// The blob's `BlobIndex` from the first candidate whose copy matches the signed record.
    async fn blob_index(
        &self,
        blob: &BlobRef,
        candidates: &[PeerId],
    ) -> Result<BlobIndex, FetchError> {
        for &peer in candidates {
            let request = SyncRequest::BlobIndex {
                digest: blob.digest.clone(),
            };
            // A peer without the index, or unreachable, is simply skipped.
            let answer = self.network.sync(peer, request).await;
            if let Ok(SyncResponse::BlobIndex(Some(index))) = answer {
                if index.id() == blob.index
                    && index.digest() == &blob.digest
                    && index.size() == blob.size
                {
                    return Ok(index);
                }
                tracing::warn!(%peer, digest = %blob.digest, "peer sent a BlobIndex that does not match the signed record; banned");
                self.bad_peers
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.network
                    .report(peer, crate::net::conduct::Offence::BadContent);
            } else {
                tracing::debug!(%peer, digest = %blob.digest, answer = ?answer.map(|_| "no index"), "a peer did not supply a blob's index");
            }
        }
        Err(FetchError::Unavailable(blob.digest.clone()))
    }

    /// Peers that sent bad data so far.
    pub fn bad_peers(&self) -> u64 {
        self.bad_peers.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Makes the manifest `digest` (of `size` bytes, as a record says) present in `repo`.
    pub async fn manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
    ) -> Result<(), FetchError> {
        let this = self.clone();
        let (r, d) = (repo.clone(), digest.clone());
        let key = FetchKey::Manifest(repo.clone(), digest.clone());
        self.start(key, move |_| async move {
            this.fetch_manifest(&r, &d, size).await
        })
        .finished()
        .await
    }

    async fn fetch_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
    ) -> Result<(), FetchError> {
        if size > MAX_MANIFEST_BYTES as u64 {
            return Err(FetchError::Invalid(ManifestError::Invalid(format!(
                "a record says it is {size} bytes, more than {MAX_MANIFEST_BYTES}"
            ))));
        }
        let bytes = match self.store.read_small_blob(digest, size).await? {
            Some(b) => b,
            None => self.manifest_bytes(digest, size).await?,
        };
        let info = manifest::parse(&bytes, None)?;
        if self.store.keep_manifest(repo, digest, &bytes, info).await? {
            let _ = self.network.provide(digest.clone()).await;
        }
        Ok(())
    }

    /// The manifest's bytes from the first candidate that has them, in rounds
    /// ([`until_supplied`]): a record names the manifest, so the fleet holds it.
    async fn manifest_bytes(&self, digest: &Digest, size: u64) -> Result<Vec<u8>, FetchError> {
        until_supplied(|| self.manifest_round(digest, size)).await
    }

    /// One round of asking every candidate for the manifest's bytes.
    async fn manifest_round(&self, digest: &Digest, size: u64) -> Result<Vec<u8>, FetchError> {
        let mut buf = Vec::new();
        for peer in self.candidates(digest).await {
            let attempt = async {
                let mut client = ChunkClient::open(&mut self.network.control(), peer).await?;
                client.fetch(digest, 0, size, &mut buf).await
            };
            match attempt.await {
                Ok(true) if Digest::of(digest.algorithm(), &buf) == *digest => {
                    tracing::info!(%digest, %peer, "fetched manifest");
                    return Ok(buf);
                }
                Ok(true) => {
                    tracing::warn!(%peer, %digest, "peer sent a manifest that fails its digest; banned");
                    self.network
                        .report(peer, crate::net::conduct::Offence::BadContent);
                }
                Ok(false) => tracing::debug!(%peer, %digest, "peer does not have the manifest"),
                Err(e) => {
                    tracing::debug!(%peer, %digest, error = &e as &dyn std::error::Error, "asking a peer for a manifest");
                }
            }
        }
        Err(FetchError::Unavailable(digest.clone()))
    }
}

/// Runs `round` (one pass over the candidates for something a record names) until it supplies
/// it: a round that ends [`FetchError::Unavailable`] is run again after each of
/// [`SUPPLIER_RETRIES`], and the last round's answer is the answer.
async fn until_supplied<T, F, Fut>(mut round: F) -> Result<T, FetchError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, FetchError>>,
{
    let mut answer = round().await;
    for wait in SUPPLIER_RETRIES {
        if !matches!(answer, Err(FetchError::Unavailable(_))) {
            break;
        }
        tokio::time::sleep(wait).await;
        answer = round().await;
    }
    answer
}
