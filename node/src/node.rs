//! A running node: the store and the registry API, with an orderly shutdown.
//!
//! Shutdown order: stop accepting HTTP and let in-flight requests finish (for at most
//! [`SHUTDOWN_GRACE`]), then flush the store. An upload cut off by the deadline keeps the chunks
//! it had acknowledged and can be resumed after a restart.

use std::net::SocketAddr;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::fetch::Fetcher;
use crate::identity::{Identity, IdentityError};
use crate::net::{NetError, Network};
use crate::registry::{Fleet, Registry};
use crate::store::{Store, StoreError};
use crate::tags::Tags;
use crate::trust::{self, Trust};

/// How long in-flight requests may run after shutdown starts.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The store could not be opened.
    #[error("opening the store in {dir}")]
    Store {
        /// The data directory.
        dir: std::path::PathBuf,
        /// The cause.
        source: StoreError,
    },
    /// The node key could not be loaded.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The trust file could not be read.
    #[error(transparent)]
    Trust(#[from] trust::TrustError),
    /// The network could not start.
    #[error("starting the network: {0}")]
    Net(#[from] NetError),
    /// The registry address could not be bound.
    #[error("listening on {addr}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
}

/// A running node.
pub struct Node {
    store: Store,
    identity: Identity,
    network: Network,
    tags: Tags,
    registry_addr: SocketAddr,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl Node {
    /// Opens the store and starts serving the registry API.
    pub async fn start(config: Config) -> Result<Node, NodeError> {
        let dir = config.data_dir.clone();
        let store = tokio::task::spawn_blocking(move || Store::open(&dir))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))
            .and_then(|r| r)
            .map_err(|source| NodeError::Store {
                dir: config.data_dir.clone(),
                source,
            })?;
        let dir = config.data_dir.clone();
        let identity = tokio::task::spawn_blocking(move || Identity::load_or_create(&dir))
            .await
            .map_err(|e| NodeError::Store {
                dir: config.data_dir.clone(),
                source: StoreError::Task(e.to_string()),
            })??;
        let mut rules = trust::read_file(&config.data_dir)?;
        rules.extend(config.trust.iter().cloned());
        let tags = Tags::new(
            store.clone(),
            identity.signing_key(),
            Trust::new(identity.publisher(), rules),
        );
        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();
        let network = Network::start(
            identity.keypair(),
            config.net.clone(),
            store.clone(),
            tags.clone(),
            cancel.child_token(),
            &tasks,
        )
        .await?;
        announce_all(&store, &network).await;
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| NodeError::Listen {
                addr: config.listen,
                source,
            })?;
        let registry_addr = listener.local_addr().map_err(|source| NodeError::Listen {
            addr: config.listen,
            source,
        })?;
        let fetcher = Fetcher::new(
            store.clone(),
            network.clone(),
            cancel.child_token(),
            tasks.clone(),
        );
        let fleet = Fleet {
            network: network.clone(),
            fetcher,
        };
        let router = Registry::with_fleet(store.clone(), tags.clone(), Some(fleet)).router();
        let stop = cancel.clone();
        tasks.spawn(async move {
            let serve =
                axum::serve(listener, router).with_graceful_shutdown(stop.cancelled_owned());
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "registry server failed");
            }
        });
        tasks.close();
        tracing::info!(addr = %registry_addr, data_dir = %config.data_dir.display(), "registry listening");
        Ok(Node {
            store,
            identity,
            network,
            tags,
            registry_addr,
            cancel,
            tasks,
        })
    }

    /// Where the registry API listens.
    pub fn registry_addr(&self) -> SocketAddr {
        self.registry_addr
    }

    /// The node's network handle.
    pub fn network(&self) -> &Network {
        &self.network
    }

    /// The node's identity.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The node's tag state.
    pub fn tags(&self) -> &Tags {
        &self.tags
    }

    /// The node's store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Stops the node: no new requests, in-flight ones get [`SHUTDOWN_GRACE`], then the store is
    /// flushed.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("requests still running after the shutdown grace period; dropping them");
        }
        let store = self.store.clone();
        let _ = tokio::task::spawn_blocking(move || store.flush()).await;
    }
}

/// Announces every blob the node holds on the DHT, so peers find it after a restart.
async fn announce_all(store: &Store, network: &Network) {
    let blobs = match store.read(|i| i.referenced_blobs()).await {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "listing blobs to announce");
            return;
        }
    };
    let mut seen = std::collections::HashSet::new();
    for (_, digest) in blobs {
        if seen.insert(digest.clone()) {
            let _ = network.provide(digest).await;
        }
    }
}
