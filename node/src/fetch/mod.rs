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

use libp2p::PeerId;
use rand::seq::SliceRandom;
use shoal_protocol::message::{SyncRequest, SyncResponse};
use shoal_protocol::{BlobIndex, BlobRef, Digest, RepoName};
use tokio::sync::watch;

use crate::manifest::{self, MAX_MANIFEST_BYTES};
use crate::net::chunk::ChunkClient;

pub mod plan;
pub mod swarm;
use crate::net::Network;
use crate::store::{Event, Store, StoreError};

/// Why content could not be fetched.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    /// No peer could supply it.
    #[error("no peer could supply {0}")]
    Unavailable(Digest),
    /// The local store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The fetched manifest is not one the registry can store.
    #[error("fetched manifest is invalid: {0}")]
    Invalid(String),
}

/// The outcome of a fetch, `None` while it runs.
pub type Outcome = Option<Result<(), FetchError>>;

/// Fetches blobs and manifests from peers (cheap to clone).
#[derive(Clone)]
pub struct Fetcher {
    store: Store,
    network: Network,
    inflight: Arc<Mutex<HashMap<Digest, watch::Receiver<Outcome>>>>,
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
    /// client hanging up does not cancel it for the others). Returns the outcome to wait on.
    fn start<F>(&self, key: &Digest, work: F) -> watch::Receiver<Outcome>
    where
        F: std::future::Future<Output = Result<(), FetchError>> + Send + 'static,
    {
        let mut map = self
            .inflight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(rx) = map.get(key) {
            return rx.clone();
        }
        let (tx, rx) = watch::channel(None);
        map.insert(key.clone(), rx.clone());
        let inflight = self.inflight.clone();
        let k = key.clone();
        let cancel = self.cancel.clone();
        self.tasks.spawn(async move {
            let result = tokio::select! {
                () = cancel.cancelled() => Err(FetchError::Unavailable(k.clone())),
                r = work => r,
            };
            inflight
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&k);
            let _ = tx.send(Some(result));
        });
        rx
    }

    /// Waits for an outcome from a started fetch.
    pub async fn wait(mut rx: watch::Receiver<Outcome>, key: &Digest) -> Result<(), FetchError> {
        loop {
            if let Some(result) = rx.borrow_and_update().clone() {
                return result;
            }
            if rx.changed().await.is_err() {
                return Err(FetchError::Unavailable(key.clone()));
            }
        }
    }

    async fn once<F>(&self, key: &Digest, work: F) -> Result<(), FetchError>
    where
        F: std::future::Future<Output = Result<(), FetchError>> + Send + 'static,
    {
        Fetcher::wait(self.start(key, work), key).await
    }

    /// Candidate peers for a digest: DHT providers first, then every connected peer (a peer that
    /// lacks it says so at once); with a site, the peers of this site first, then the seeders,
    /// then the rest.
    async fn candidates(&self, digest: &Digest) -> Vec<PeerId> {
        // With a site, the nodes that hold the whole blob (seeders) come right after this site's
        // own peers: only a few downloaders of a site use its WAN link (the plan's gateways),
        // and among a thousand providers, most still downloading, a random few would seldom
        // include the publisher, whose link is the fleet's fattest at the start of a rollout
        // (the fleet simulator's `edge-local-first`, with the plan's gateways: 4.6x the ideal
        // without seeders first, 1.25x with them). Without a site, nothing changes: in a
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
        for p in &seeders {
            if !providers.contains(p) {
                providers.push(*p);
            }
        }
        let seeders: std::collections::HashSet<PeerId> = seeders.into_iter().collect();
        let mut connected: Vec<PeerId> = self
            .network
            .peers()
            .await
            .unwrap_or_default()
            .iter()
            .filter_map(|p| p.peer_id.parse().ok())
            .collect();
        connected.shuffle(&mut rand::rng());
        for p in connected {
            if !providers.contains(&p) {
                providers.push(p);
            }
        }
        providers.retain(|p| *p != self.network.peer_id());
        // Peers known to be in this node's site first, those in another site last: a download
        // keeps only the first `MAX_CANDIDATES`, and a site whose nodes do not know each other
        // fetches every chunk over its WAN link once per node instead of once per site. (The
        // sort is stable, so each group stays shuffled.)
        providers.sort_by_key(|p| match self.network.same_site(p) {
            Some(true) => 0,
            _ if seeders.contains(p) => 1,
            None => 2,
            Some(false) => 3,
        });
        providers
    }

    /// Makes the blob `blob` of `repo` present in the store, fetching it if needed, and links it.
    pub async fn blob(&self, repo: &RepoName, blob: &BlobRef) -> Result<(), FetchError> {
        let this = self.clone();
        let b = blob.clone();
        self.once(&blob.digest, async move { this.fetch_blob(&b).await })
            .await?;
        self.store
            .commit(vec![Event::Link {
                repo: repo.clone(),
                digest: blob.digest.clone(),
            }])
            .await?;
        Ok(())
    }

    async fn fetch_blob(&self, blob: &BlobRef) -> Result<(), FetchError> {
        if self.store.blob_size(&blob.digest).await?.is_some() {
            return Ok(());
        }
        let candidates = self.candidates(&blob.digest).await;
        let index = self.blob_index(blob, &candidates).await?;
        let partial = self.store.partial(index).await?;
        // Announce at once: peers that come later take the chunks this node already holds.
        let _ = self.network.provide_part(blob.digest.clone()).await;
        let this = self.clone();
        let digest = blob.digest.clone();
        let refresh = move || -> futures::future::BoxFuture<'static, Vec<PeerId>> {
            let (this, digest) = (this.clone(), digest.clone());
            Box::pin(async move { this.candidates(&digest).await })
        };
        let started = std::time::Instant::now();
        match swarm::download(
            &self.store,
            &self.network,
            blob,
            partial,
            candidates,
            refresh,
            &self.bad_peers,
        )
        .await
        {
            Ok(()) => {
                tracing::info!(digest = %blob.digest, size = blob.size, elapsed_ms = started.elapsed().as_millis() as u64, "fetched blob");
                // Now a seeder: other sites' downloads look for those first.
                let _ = self.network.provide_seed(blob.digest.clone()).await;
                Ok(())
            }
            Err(swarm::SwarmError::Stalled) => {
                tracing::warn!(digest = %blob.digest, elapsed_ms = started.elapsed().as_millis() as u64, "download stalled: no peer supplied the missing chunks; it stays resumable");
                Err(FetchError::Unavailable(blob.digest.clone()))
            }
            Err(swarm::SwarmError::Store(e)) => Err(e.into()),
        }
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
            if let Ok(SyncResponse::BlobIndex(Some(index))) = self.network.sync(peer, request).await
            {
                if index.id() == blob.index
                    && index.digest() == &blob.digest
                    && index.size() == blob.size
                {
                    return Ok(index);
                }
                tracing::warn!(%peer, digest = %blob.digest, "peer sent a BlobIndex that does not match the signed record; disconnecting it");
                self.bad_peers
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let _ = self.network.disconnect(peer).await;
            }
        }
        Err(FetchError::Unavailable(blob.digest.clone()))
    }

    /// Starts fetching a blob (or joins the fetch under way) without waiting for it; the
    /// repository is linked when it completes. Returns the outcome to wait on.
    pub fn start_blob(&self, repo: &RepoName, blob: &BlobRef) -> watch::Receiver<Outcome> {
        let this = self.clone();
        let (r, b) = (repo.clone(), blob.clone());
        self.start(&blob.digest, async move {
            this.fetch_blob(&b).await?;
            this.store
                .commit(vec![Event::Link {
                    repo: r,
                    digest: b.digest.clone(),
                }])
                .await?;
            Ok(())
        })
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
        // Keyed by repository too: the same manifest in two repositories is indexed twice.
        let key = Digest::sha256(format!("manifest {r} {d}").as_bytes());
        self.once(&key, async move { this.fetch_manifest(&r, &d, size).await })
            .await
    }

    async fn fetch_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
    ) -> Result<(), FetchError> {
        if size > MAX_MANIFEST_BYTES as u64 {
            return Err(FetchError::Invalid("manifest larger than 4 MiB".into()));
        }
        let bytes = match self.store.read_small_blob(digest, size).await? {
            Some(b) => b,
            None => self.manifest_bytes(digest, size).await?,
        };
        let info = manifest::parse(&bytes, None).map_err(|e| FetchError::Invalid(e.to_string()))?;
        if self.store.blob_size(digest).await?.is_none() {
            let mut writer = self
                .store
                .blob_writer(digest.algorithm(), Some(size))
                .await?;
            writer.write(&bytes).await?;
            writer.finish(digest).await?;
            let _ = self.network.provide(digest.clone()).await;
        }
        self.store
            .commit(vec![Event::Manifest {
                repo: repo.clone(),
                digest: digest.clone(),
                info,
            }])
            .await?;
        Ok(())
    }

    async fn manifest_bytes(&self, digest: &Digest, size: u64) -> Result<Vec<u8>, FetchError> {
        let mut buf = Vec::new();
        for peer in self.candidates(digest).await {
            let attempt = async {
                let mut client = ChunkClient::open(&mut self.network.control(), peer).await?;
                client.fetch(digest, 0, size, &mut buf).await
            };
            match attempt.await {
                Ok(true) if Digest::of(digest.algorithm(), &buf) == *digest => {
                    tracing::info!(%digest, %peer, "fetched manifest");
                    return Ok(std::mem::take(&mut buf));
                }
                Ok(true) => {
                    tracing::warn!(%peer, %digest, "peer sent a manifest that fails its digest; disconnecting it");
                    let _ = self.network.disconnect(peer).await;
                }
                Ok(false) | Err(_) => {}
            }
        }
        Err(FetchError::Unavailable(digest.clone()))
    }
}
