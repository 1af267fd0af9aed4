//! A running node: the store, the network, the fetcher and the registry API, started together
//! and stopped in stages.
//!
//! Every task a node runs belongs to one of three stages, each with its own cancellation token
//! and task tracker. [`Node::shutdown`] stops them in order, each bounded by the grace period:
//! 1. the HTTP server stops accepting and lets the requests in flight finish (an upload cut off
//!    keeps the chunks it had acknowledged and can be resumed after a restart);
//! 2. fetches are cancelled (a partial download stays on disk, to be resumed);
//! 3. the swarm stops, with the chunk server and every task the event loop started;
//! 4. the audit trail writes what is queued and its writer thread ends;
//!
//! and then the store is closed: it waits for the writes in flight, refuses every later one,
//! makes the chunks of partial downloads durable and flushes the index, so nothing is written
//! to the data directory after `shutdown` returns. A node dropped without `shutdown` cancels
//! every stage at once (its tasks end soon after) but does not wait for them.

use std::net::SocketAddr;
use std::time::Duration;

use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

use crate::auth::audit::Audit;
use crate::auth::trust::{self, TrustError};
use crate::auth::users::Users;
use crate::auth::{Auth, AuthConfig, AuthError, FleetConfig, ingest};
use crate::config::Config;
use crate::fetch::Fetcher;
use crate::identity::{Identity, IdentityError};
use crate::net::{NetError, Network};
use crate::registry::{Fleet, Registry, server};
use crate::store::{Store, StoreError};
use crate::tags::Tags;

/// How long each stage of a shutdown may take: requests in flight, fetches, the swarm.
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
    Trust(#[from] TrustError),
    /// The fleet or users file could not be read or written.
    #[error(transparent)]
    Access(#[from] AuthError),
    /// The join token is not valid.
    #[error("the join token: {0}")]
    Join(String),
    /// The registry would listen beyond loopback with no HTTPS or no credentials.
    #[error(
        "refusing to serve the registry on {0} without HTTPS and credentials: give --tls-cert \
         and --tls-key, and join a fleet (--join) or add users (shoal user add); or pass \
         --insecure to serve it anyway"
    )]
    Unsafe(SocketAddr),
    /// The HTTPS certificate or key could not be loaded.
    #[error("loading the HTTPS certificate and key")]
    Tls(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The audit trail could not be opened.
    #[error("opening the audit trail")]
    Audit(#[source] std::io::Error),
    /// The network could not start.
    #[error("starting the network")]
    Net(#[from] NetError),
    /// The registry address could not be bound.
    #[error("listening on {addr}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The mirror's settings are not valid.
    #[error("mirror settings")]
    Mirror(#[source] crate::mirror::route::RoutesError),
    /// An upstream registry's client could not be made (its TLS settings or credentials).
    #[error("upstream registry")]
    Upstream(#[source] crate::mirror::upstream::UpstreamError),
    /// A start-up task on the blocking pool failed.
    #[error("a start-up task failed")]
    Task(#[from] tokio::task::JoinError),
}

/// One stage of a node's tasks: stopped together, waited for together.
struct Stage {
    name: &'static str,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl Stage {
    fn new(name: &'static str, root: &CancellationToken) -> Stage {
        Stage {
            name,
            cancel: root.child_token(),
            tasks: TaskTracker::new(),
        }
    }

    /// Cancels the stage and waits, at most `grace`, for its tasks to end.
    async fn stop(&self, grace: Duration) {
        self.cancel.cancel();
        self.tasks.close();
        if tokio::time::timeout(grace, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                stage = self.name,
                tasks = self.tasks.len(),
                "tasks still running after the shutdown grace period"
            );
        }
    }
}

/// A running node.
pub struct Node {
    store: Store,
    identity: Identity,
    network: Network,
    tags: Tags,
    registry_addr: SocketAddr,
    https: bool,
    grace: Duration,
    http: Stage,
    fetches: Stage,
    swarm: Stage,
    /// The audit trail, closed (flushed, its writer ended) after the swarm stops.
    audit: Audit,
    /// Cancels every stage if the node is dropped without [`Node::shutdown`].
    _stop_on_drop: DropGuard,
}

impl Node {
    /// Opens the store, starts the network and serves the registry API.
    pub async fn start(config: Config) -> Result<Node, NodeError> {
        let dir = config.data_dir.clone();
        let store = tokio::task::spawn_blocking(move || Store::open(&dir))
            .await?
            .map_err(|source| NodeError::Store {
                dir: config.data_dir.clone(),
                source,
            })?;
        let dir = config.data_dir.clone();
        let identity =
            tokio::task::spawn_blocking(move || Identity::load_or_create(&dir)).await??;
        let mut config = config;
        let auth = open_access(&config, &identity).await?;
        if let Some(fleet) = auth.fleet() {
            for addr in &fleet.bootstrap {
                match addr.parse() {
                    Ok(a) if !config.net.bootstrap.contains(&a) => config.net.bootstrap.push(a),
                    Ok(_) => {}
                    Err(_) => {
                        tracing::warn!(%addr, "ignoring a bootstrap address of the fleet that is not a multiaddress")
                    }
                }
            }
        }
        ingest::load(&auth, &store)
            .await
            .map_err(|source| NodeError::Store {
                dir: config.data_dir.clone(),
                source,
            })?;
        if let Some(proof) = auth.own_proof() {
            // Kept like any member's, so that peers learn it by anti-entropy too.
            ingest::member(&auth, &store, proof, None)
                .await
                .map_err(|source| NodeError::Store {
                    dir: config.data_dir.clone(),
                    source,
                })?;
        }
        // The founder enrols itself, so its membership does not end with its first ticket.
        let enrolment = match auth.own_proof() {
            Some(proof)
                if auth.holds_admin_key()
                    && auth.member(&auth.own_key()).is_none_or(|m| !m.enrolled) =>
            {
                let groups = proof
                    .ticket
                    .verify()
                    .map(|t| t.statement().groups.clone())
                    .unwrap_or_default();
                let node = auth.own_key();
                match auth.sign_policy(shoal_protocol::fleet::PolicyBody::Member { node, groups }) {
                    Some(p) => ingest::policy(&auth, &store, p.clone())
                        .await
                        .map_err(|source| NodeError::Store {
                            dir: config.data_dir.clone(),
                            source,
                        })
                        .map(|_| Some(p))?,
                    None => None,
                }
            }
            _ => None,
        };
        if !config.listen.ip().is_loopback()
            && !config.access.insecure
            && (config.access.tls.is_none() || !auth.has_credentials())
        {
            return Err(NodeError::Unsafe(config.listen));
        }
        let tls = match &config.access.tls {
            Some((cert, key)) => Some(server::tls_config(cert, key).map_err(NodeError::Tls)?),
            None => None,
        };
        let audit = Audit::open(&config.data_dir).map_err(NodeError::Audit)?;
        auth.set_audit(audit.clone());
        let tags = Tags::new(store.clone(), identity.signing_key(), auth.clone());
        // A record that stopped counting while the node was down (a trust rule removed, say)
        // must not stay current.
        tags.rederive().await.map_err(|source| NodeError::Store {
            dir: config.data_dir.clone(),
            source,
        })?;
        let root = CancellationToken::new();
        // From here on, a start that fails (the registry's port taken, say) stops what it
        // started: the guard cancels every stage when it is dropped.
        let stop_on_drop = root.clone().drop_guard();
        let (http, fetches, swarm) = (
            Stage::new("http", &root),
            Stage::new("fetches", &root),
            Stage::new("swarm", &root),
        );
        let network = Network::start(
            identity.keypair(),
            config.net.clone(),
            store.clone(),
            tags.clone(),
            swarm.cancel.clone(),
            &swarm.tasks,
        )
        .await?;
        swarm.tasks.spawn(rederive_on_access_changes(
            tags.clone(),
            swarm.cancel.clone(),
        ));
        announce_all(&store, &network).await;
        if let Some(p) = enrolment {
            let _ = network.publish_policy(&p).await;
        }
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
            fetches.cancel.clone(),
            fetches.tasks.clone(),
        );
        // Under the fetches stage: it stops with the fetches it starts.
        fetches.tasks.spawn(
            crate::prefetch::Prefetcher::new(
                config.prefetch.clone(),
                store.clone(),
                fetcher.clone(),
            )
            .run(tags.clone(), network.clone(), fetches.cancel.clone()),
        );
        let fleet = Fleet {
            network: network.clone(),
            fetcher,
        };
        let quota = crate::quota::Quota::new(
            config.quota.clone(),
            store.clone(),
            Some(network.clone()),
            auth.clone(),
            auth.own_key(),
        );
        let mirror = if config.mirror.upstreams.is_empty() {
            None
        } else {
            let routes = config.mirror.routes().map_err(NodeError::Mirror)?;
            let upstreams = config
                .mirror
                .upstreams
                .iter()
                .cloned()
                .map(crate::mirror::upstream::Upstream::new)
                .collect::<Result<Vec<_>, _>>()
                .map_err(NodeError::Upstream)?;
            Some(crate::mirror::pull::Mirror::new(
                routes,
                upstreams,
                crate::mirror::pull::NodeParts {
                    store: store.clone(),
                    tags: tags.clone(),
                    network: Some(network.clone()),
                    fetcher: Some(fleet.fetcher.clone()),
                    tasks: fetches.tasks.clone(),
                    cancel: fetches.cancel.clone(),
                },
            ))
        };
        let registry = Registry::with_fleet(store.clone(), tags.clone(), Some(fleet))
            .with_quota(quota.clone())
            .with_audit(audit.clone())
            .with_data_dir(config.data_dir.clone())
            .with_limits(config.http.clone())
            .with_gc(config.gc.clone());
        let registry = match mirror {
            Some(m) => registry.with_mirror(m),
            None => registry,
        };
        let https = tls.is_some();
        let router = registry.with_https(https).router();
        http.tasks.spawn(server::serve_admin(
            config.data_dir.join(server::ADMIN_SOCKET),
            router.clone(),
            http.cancel.clone(),
            config.shutdown_grace,
        ));
        http.tasks.spawn(server::serve(
            listener,
            router,
            tls,
            http.cancel.clone(),
            config.shutdown_grace,
            config.http.clone(),
        ));
        if let Some(every) = config.gc.interval {
            http.tasks.spawn(collect_garbage(
                store.clone(),
                auth.clone(),
                every,
                config.gc.options(config.gc.grace, false),
                http.cancel.clone(),
            ));
        }
        http.tasks.spawn(quota.run(http.cancel.clone()));
        http.tasks.spawn(expire_abandoned(
            store.clone(),
            config.http.upload_session_ttl,
            config.gc.abandoned_downloads,
            http.cancel.clone(),
        ));
        tracing::info!(addr = %registry_addr, data_dir = %config.data_dir.display(), "registry listening");
        Ok(Node {
            store,
            identity,
            network,
            tags,
            registry_addr,
            https,
            grace: config.shutdown_grace,
            http,
            fetches,
            swarm,
            audit,
            _stop_on_drop: stop_on_drop,
        })
    }

    /// Where the registry API listens.
    pub fn registry_addr(&self) -> SocketAddr {
        self.registry_addr
    }

    /// `https` or `http`: how clients reach the registry.
    pub fn registry_scheme(&self) -> &'static str {
        if self.https { "https" } else { "http" }
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

    /// Stops the node in stages (see the module doc): HTTP, fetches, the swarm, each for at
    /// most the grace period, then closes the store. Nothing is written to the data directory
    /// after this returns.
    pub async fn shutdown(self) {
        // The server bounds its own drain by the grace period; the extra second covers the
        // aborting of what is left.
        self.http.stop(self.grace + Duration::from_secs(1)).await;
        self.fetches.stop(self.grace).await;
        self.swarm.stop(self.grace).await;
        let audit = self.audit.clone();
        let _ = tokio::task::spawn_blocking(move || audit.close()).await;
        self.store.close().await;
    }
}

/// Applies the fleet's retention policies and collects garbage with `options` every `every`,
/// until `cancel`.
async fn collect_garbage(
    store: Store,
    auth: Auth,
    every: Duration,
    options: crate::store::GcOptions,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        match store.gc_with_retention(options, &auth.retention()).await {
            Ok(r) => tracing::info!(
                expired_tags = r.expired_tags,
                expired_images = r.expired_images,
                blobs = r.swept.len(),
                bytes = r.bytes_freed,
                mark_ms = r.mark_ms,
                sweep_ms = r.sweep_ms,
                "scheduled garbage collection"
            ),
            Err(e) => tracing::warn!(
                error = &e as &dyn std::error::Error,
                "scheduled garbage collection failed"
            ),
        }
    }
}

/// The longest time between two looks for abandoned upload sessions and downloads.
const MAX_EXPIRY_INTERVAL: Duration = Duration::from_secs(300);

/// How often a node looks for abandoned upload sessions and downloads: a quarter of the shorter
/// of their times, between a second and [`MAX_EXPIRY_INTERVAL`], so that neither outlives its
/// time by much (a day's time is looked at every five minutes, which costs a directory
/// listing).
fn expiry_interval(upload_ttl: Duration, download_ttl: Duration) -> Duration {
    (upload_ttl.min(download_ttl) / 4).clamp(Duration::from_secs(1), MAX_EXPIRY_INTERVAL)
}

/// Removes abandoned upload sessions (idle for `upload_ttl`) and downloads (untouched for
/// `download_ttl`, held by no fetch) every [`expiry_interval`], until `cancel`: without it they
/// went only when a client touched the session or started another, or when garbage was
/// collected, which is off by default.
async fn expire_abandoned(
    store: Store,
    upload_ttl: Duration,
    download_ttl: Duration,
    cancel: CancellationToken,
) {
    let every = expiry_interval(upload_ttl, download_ttl);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let expired = tokio::select! {
            () = cancel.cancelled() => return,
            expired = store.expire_abandoned(upload_ttl, download_ttl) => expired,
        };
        match expired {
            Ok(e) if e.uploads > 0 || e.downloads > 0 => tracing::info!(
                uploads = e.uploads,
                downloads = e.downloads,
                download_bytes = e.download_bytes,
                "removed abandoned upload sessions and downloads"
            ),
            Ok(_) => {}
            // The store is closing: the node is stopping.
            Err(StoreError::Closed) => return,
            Err(e) => tracing::warn!(
                error = &e as &dyn std::error::Error,
                "removing abandoned upload sessions and downloads"
            ),
        }
    }
}

/// Re-derives the tags' current records each time the access state changes (a trust rule, a
/// publisher list or a revocation can make a current record stop counting), until `cancel`.
async fn rederive_on_access_changes(tags: Tags, cancel: CancellationToken) {
    let mut changes = tags.auth().changes();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
        if let Err(e) = tags.rederive().await {
            tracing::error!(
                error = &e as &dyn std::error::Error,
                "re-deriving tags after an access change"
            );
        }
    }
}

/// Announces every blob the node holds on the DHT, so peers find it after a restart.
async fn announce_all(store: &Store, network: &Network) {
    let blobs = match store.read(|i| i.referenced_blobs()).await {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(
                error = &e as &dyn std::error::Error,
                "listing blobs to announce"
            );
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

/// The node's access state: its fleet (joined now with a token, or remembered), trust rules,
/// users and client settings.
async fn open_access(config: &Config, identity: &Identity) -> Result<Auth, NodeError> {
    let dir = config.data_dir.clone();
    let join = config.access.join.clone();
    let (fleet, users, rules, admin) = tokio::task::spawn_blocking(move || {
        let fleet = match join {
            Some(text) => {
                let token = shoal_protocol::fleet::JoinToken::from_text(&text)
                    .map_err(|e| NodeError::Join(e.to_string()))?;
                let fleet =
                    FleetConfig::from_token(&token).map_err(|e| NodeError::Join(e.to_string()))?;
                fleet.write(&dir)?;
                Some(fleet)
            }
            None => FleetConfig::read(&dir)?,
        };
        let users = Users::read(&dir)?;
        let rules = trust::read_file(&dir)?;
        let admin = crate::identity::read_secret(&dir.join(crate::auth::ADMIN_KEY_FILE))
            .map_err(|e| AuthError::File(dir.join(crate::auth::ADMIN_KEY_FILE), Box::new(e)))?;
        Ok::<_, NodeError>((fleet, users, rules, admin))
    })
    .await??;
    if let Some(f) = &fleet {
        tracing::info!(fleet = %f.id, admins = f.admins.len(), member = f.ticket.is_some(), "in a fleet");
    }
    let auth = Auth::new(
        identity.signing_key(),
        AuthConfig {
            fleet,
            trust: rules,
            local_clients: config.access.local_clients,
            anonymous_pull: config.access.anonymous_pull,
            users,
            admins: config.access.admins.clone(),
            insecure: config.access.insecure,
        },
    );
    auth.add_configured_trust_rules(config.trust.clone());
    if let Some(seed) = admin {
        auth.set_admin_key(shoal_protocol::SigningKey::from_seed(seed));
    }
    // The fleet's time as this node last knew it, until its peers say (a few bytes to read).
    auth.clock().keep_in(&config.data_dir);
    Ok(auth)
}
