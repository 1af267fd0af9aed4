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
use crate::registry::Registry;
use crate::store::{Store, StoreError};

/// How long in-flight requests may run after shutdown starts.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The store could not be opened.
    #[error("opening the store in {dir}: {source}")]
    Store {
        /// The data directory.
        dir: std::path::PathBuf,
        /// The cause.
        source: StoreError,
    },
    /// The registry address could not be bound.
    #[error("listening on {addr}: {source}")]
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
        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();
        let router = Registry::new(store.clone()).router();
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
            registry_addr,
            cancel,
            tasks,
        })
    }

    /// Where the registry API listens.
    pub fn registry_addr(&self) -> SocketAddr {
        self.registry_addr
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
