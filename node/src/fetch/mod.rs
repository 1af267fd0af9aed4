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
use crate::net::{NetError, Network};
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

type Outcome = Option<Result<(), FetchError>>;

/// Fetches blobs and manifests from peers (cheap to clone).
#[derive(Clone)]
pub struct Fetcher {
    store: Store,
    network: Network,
    inflight: Arc<Mutex<HashMap<Digest, watch::Receiver<Outcome>>>>,
}

/// Why one peer failed to supply content.
enum PeerFailure {
    /// It does not have it (or is busy, or went away): try the next.
    Missing,
    /// It sent bad data: disconnect it.
    Bad(String),
}

impl From<NetError> for PeerFailure {
    fn from(e: NetError) -> Self {
        match e {
            NetError::Protocol(why) => PeerFailure::Bad(why),
            _ => PeerFailure::Missing,
        }
    }
}

impl Fetcher {
    /// A fetcher that stores into `store` and asks peers through `network`.
    pub fn new(store: Store, network: Network) -> Fetcher {
        Fetcher {
            store,
            network,
            inflight: Arc::default(),
        }
    }

    /// Runs `work` once per digest however many callers ask at the same time.
    async fn once<F>(&self, digest: &Digest, work: F) -> Result<(), FetchError>
    where
        F: std::future::Future<Output = Result<(), FetchError>> + Send + 'static,
    {
        let (mut rx, leader) = {
            let mut map = self
                .inflight
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match map.get(digest) {
                Some(rx) => (rx.clone(), None),
                None => {
                    let (tx, rx) = watch::channel(None);
                    map.insert(digest.clone(), rx.clone());
                    (rx, Some(tx))
                }
            }
        };
        if let Some(tx) = leader {
            // The fetch runs in its own task so that a client hanging up does not cancel it for
            // the others waiting on it.
            let inflight = self.inflight.clone();
            let d = digest.clone();
            tokio::spawn(async move {
                let result = work.await;
                inflight
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .remove(&d);
                let _ = tx.send(Some(result));
            });
        }
        loop {
            if let Some(result) = rx.borrow_and_update().clone() {
                return result;
            }
            if rx.changed().await.is_err() {
                return Err(FetchError::Unavailable(digest.clone()));
            }
        }
    }

    /// Candidate peers for a digest: DHT providers first, then every connected peer (a peer that
    /// lacks it says so at once).
    async fn candidates(&self, digest: &Digest) -> Vec<PeerId> {
        let mut providers = self
            .network
            .find_providers(digest.clone())
            .await
            .unwrap_or_default();
        providers.shuffle(&mut rand::rng());
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
        for peer in self.candidates(&blob.digest).await {
            match self.blob_from(peer, blob).await {
                Ok(()) => {
                    let _ = self.network.provide(blob.digest.clone()).await;
                    tracing::info!(digest = %blob.digest, %peer, "fetched blob");
                    return Ok(());
                }
                Err(PeerFailure::Missing) => {}
                Err(PeerFailure::Bad(why)) => {
                    tracing::warn!(%peer, digest = %blob.digest, why, "peer sent bad data; disconnecting it");
                    let _ = self.network.disconnect(peer).await;
                }
            }
        }
        Err(FetchError::Unavailable(blob.digest.clone()))
    }

    async fn blob_from(&self, peer: PeerId, blob: &BlobRef) -> Result<(), PeerFailure> {
        let response = self
            .network
            .sync(
                peer,
                SyncRequest::BlobIndex {
                    digest: blob.digest.clone(),
                },
            )
            .await?;
        let index: BlobIndex = match response {
            SyncResponse::BlobIndex(Some(i)) => i,
            SyncResponse::BlobIndex(None) | SyncResponse::Error(_) => {
                return Err(PeerFailure::Missing);
            }
            _ => return Err(PeerFailure::Bad("unexpected answer to BlobIndex".into())),
        };
        if index.id() != blob.index || index.digest() != &blob.digest || index.size() != blob.size {
            return Err(PeerFailure::Bad(
                "BlobIndex does not match the signed record".into(),
            ));
        }
        let mut client = ChunkClient::open(&mut self.network.control(), peer).await?;
        let mut writer = self
            .store
            .blob_writer(blob.digest.algorithm())
            .await
            .map_err(|_| PeerFailure::Missing)?;
        let mut buf = Vec::new();
        for i in 0..index.chunk_count() {
            let Some(range) = index.chunk_range(i) else {
                return Err(PeerFailure::Bad("chunk out of range".into()));
            };
            if !client
                .fetch(&blob.digest, range.start, range.end - range.start, &mut buf)
                .await?
            {
                return Err(PeerFailure::Missing);
            }
            if !index.verify_chunk(i, &buf) {
                return Err(PeerFailure::Bad(format!("chunk {i} fails its BLAKE3 hash")));
            }
            writer.write(&buf).await.map_err(|_| PeerFailure::Missing)?;
        }
        match writer.finish(&blob.digest).await {
            Ok(_) => Ok(()),
            Err(StoreError::DigestMismatch { .. }) => {
                Err(PeerFailure::Bad("blob fails its digest".into()))
            }
            Err(_) => Err(PeerFailure::Missing),
        }
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
            let mut writer = self.store.blob_writer(digest.algorithm()).await?;
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
