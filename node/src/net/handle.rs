//! [`Network`], the handle every other part of the node holds, and the [`Command`]s it sends to
//! the event loop.
//!
//! The handle is cheap to clone. Everything that needs the swarm goes through the bounded
//! command channel; what the handle can answer alone (the peer id, sites, bytes served) it
//! reads from [`Shared`] state the event loop keeps current; chunk streams are opened directly
//! with the `libp2p-stream` control it carries. When the last handle is dropped the event loop
//! sees its command channel close and stops.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use libp2p::swarm::ConnectionId;
use libp2p::{Multiaddr, PeerId};
use shoal_protocol::fleet::{MemberProof, SignedPolicy, Visibility};
use shoal_protocol::message::{Gossip, SyncRequest, SyncResponse, TAGS_TOPIC};
use shoal_protocol::{Digest, SignedTagRecord, codec};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::behaviour::{self, Holding};
use super::event_loop::EventLoop;
use super::{
    LISTEN_READY_TIMEOUT, NetConfig, NetError, PROVIDER_LOOKUP_TIMEOUT, PeerInfo, SYNC_TIMEOUT,
    chunk, conduct,
};
use crate::auth::Auth;
use crate::store::Store;
use crate::tags::Tags;

/// Capacity of the command channel into the event loop.
const COMMAND_CAPACITY: usize = 256;

/// What the event loop is asked to do, by handles and by its own tasks.
pub(super) enum Command {
    Publish(Vec<u8>),
    /// Announces each of the keys.
    Provide(Digest, &'static [Holding]),
    FindProviders(Digest, Holding, oneshot::Sender<Vec<PeerId>>),
    Sync(
        PeerId,
        SyncRequest,
        oneshot::Sender<Result<SyncResponse, NetError>>,
    ),
    Respond(
        libp2p::request_response::ResponseChannel<SyncResponse>,
        SyncResponse,
    ),
    Peers(oneshot::Sender<Vec<PeerInfo>>),
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    Dial(Multiaddr),
    Disconnect(PeerId),
    /// Closes a QUIC connection that TCP replaces ([`links`](super::links)).
    CloseQuic(PeerId, ConnectionId),
    /// Sends a private repository's record to every connected peer that may read it.
    PushPrivate(SignedTagRecord),
    /// A peer proved membership (or the node has no fleet): catch up with it.
    Admitted(PeerId),
    /// A peer failed to prove membership: disconnect it and do not dial it for a while.
    Refuse(PeerId),
    /// The offset of a peer's clock from this node's, in milliseconds ([`crate::clock`]).
    ClockOffset(PeerId, i64),
}

/// Sends a sync request to `peer` through the event loop that `commands` reaches and waits for
/// the answer, at most [`SYNC_TIMEOUT`]. Used by handles and by the loop's own tasks.
pub(super) async fn sync_request(
    commands: &mpsc::Sender<Command>,
    peer: PeerId,
    request: SyncRequest,
) -> Result<SyncResponse, NetError> {
    let (tx, rx) = oneshot::channel();
    commands
        .send(Command::Sync(peer, request, tx))
        .await
        .map_err(|_| NetError::Closed)?;
    tokio::time::timeout(SYNC_TIMEOUT, rx)
        .await
        .map_err(|_| NetError::Timeout)?
        .map_err(|_| NetError::Closed)?
}

/// What the handles and the event loop share: what a handle answers without asking the loop.
pub(super) struct Shared {
    pub peer_id: PeerId,
    /// This node's site, if it has one.
    pub site: Option<String>,
    /// The site each connected peer advertised, from identify (written by the event loop).
    pub peer_sites: Mutex<HashMap<PeerId, String>>,
    /// What the chunk server sends to peers, and how fast it may.
    pub serving: Arc<chunk::Serving>,
    /// Who may talk to this node and read what.
    pub auth: Auth,
    /// The store, to see which repositories name a blob.
    pub store: Store,
    /// How each peer has behaved; a banned peer is cut off by the event loop.
    pub conduct: conduct::Conduct,
    /// Where peers' prefetch asks go, once something takes them
    /// ([`Network::take_prefetch_asks`]); until then they are denied.
    pub prefetch: Mutex<Option<mpsc::Sender<PrefetchAsk>>>,
    /// Where peers' [`SyncRequest::Mirror`] requests go, once the node's mirror serves them.
    pub mirror: std::sync::OnceLock<mpsc::Sender<MirrorAsk>>,
}

/// A peer's ask to fetch an image into this node ([`SyncRequest::Prefetch`]), from a peer that
/// may read the repository. The taker answers on `answer`; a dropped sender answers `Busy`.
#[derive(Debug)]
pub struct PrefetchAsk {
    /// Who asked.
    pub peer: PeerId,
    /// The repository.
    pub repo: shoal_protocol::RepoName,
    /// The tag or digest.
    pub reference: shoal_protocol::Reference,
    /// Queued, or why not.
    pub answer: oneshot::Sender<shoal_protocol::message::PrefetchAnswer>,
}

/// A peer's [`SyncRequest::Mirror`]: fetch a blob from an upstream for the fleet, or say how
/// far that has come. The asker may read the repository (checked before it is sent here).
#[derive(Debug)]
pub struct MirrorAsk {
    /// Who asks.
    pub peer: PeerId,
    /// The upstream's name.
    pub upstream: String,
    /// The repository, in the upstream's namespace.
    pub repo: shoal_protocol::RepoName,
    /// The blob.
    pub digest: Digest,
    /// Where the answer goes.
    pub reply: oneshot::Sender<shoal_protocol::message::MirrorState>,
}

impl Shared {
    /// The sites map; a panic elsewhere cannot leave it inconsistent (single inserts and
    /// removes), so a poisoned lock is still used.
    pub fn peer_sites(&self) -> std::sync::MutexGuard<'_, HashMap<PeerId, String>> {
        self.peer_sites
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Handle to the network (cheap to clone).
#[derive(Clone)]
pub struct Network {
    commands: mpsc::Sender<Command>,
    control: libp2p_stream::Control,
    shared: Arc<Shared>,
}

impl Network {
    /// Builds the swarm, starts listening and dialling, and spawns the event loop and the chunk
    /// server on `tasks`. Both stop when `cancel` fires, or when the last handle is dropped.
    /// Returns once every listener has reported its address (at most a few seconds).
    pub async fn start(
        keypair: libp2p::identity::Keypair,
        config: NetConfig,
        store: Store,
        tags: Tags,
        cancel: CancellationToken,
        tasks: &TaskTracker,
    ) -> Result<Network, NetError> {
        let peer_id = keypair.public().to_peer_id();
        let mut swarm = behaviour::build_swarm(keypair, &config)?;
        let listeners = behaviour::listen(&mut swarm, &config)?;
        swarm
            .behaviour_mut()
            .gossipsub
            .subscribe(&libp2p::gossipsub::IdentTopic::new(TAGS_TOPIC))
            .map_err(NetError::setup)?;
        // Bootstrap peers, then the peers of the last run: dialled by the event loop at once,
        // and again with backoff while they cannot be reached.
        let (min, max) = config.redial_backoff;
        let mut redial = super::redial::Redial::new(min, max);
        let now = std::time::Instant::now();
        for addr in &config.bootstrap {
            redial.configured(addr, now);
        }
        let peers_path = super::peer_store::PeerStore::path_in(store.layout().root());
        let path = peers_path.clone();
        let known = tokio::task::spawn_blocking(move || super::peer_store::PeerStore::load(&path))
            .await
            .unwrap_or_default();
        for (peer, addrs) in known.peers() {
            for addr in addrs {
                redial.remembered(*peer, addr, now);
            }
        }
        if !known.peers().is_empty() {
            tracing::info!(
                peers = known.peers().len(),
                "dialling the peers of the last run"
            );
        }
        let control = swarm.behaviour().stream.new_control();
        let shared = Arc::new(Shared {
            peer_id,
            site: config.site.clone(),
            peer_sites: Mutex::default(),
            serving: Arc::new(chunk::Serving::new(config.serve_limit_bytes_per_sec)),
            auth: tags.auth().clone(),
            store: store.clone(),
            conduct: conduct::Conduct::default(),
            prefetch: Mutex::default(),
            mirror: std::sync::OnceLock::new(),
        });
        let (commands, inbox) = mpsc::channel(COMMAND_CAPACITY);
        let (event_loop, ready) = EventLoop::new(
            swarm,
            inbox,
            shared.clone(),
            store.clone(),
            tags,
            listeners,
            super::event_loop::LoopSettings {
                sync_interval: config.sync_interval,
                redial,
                known,
                peers_path,
            },
        );
        tasks.spawn(event_loop.run(cancel.clone()));
        tasks.spawn(chunk::serve(control.clone(), shared.clone(), cancel));
        // Return once every listener has an address, so that `listen_addrs` gives them all.
        if let Some(ready) = ready
            && tokio::time::timeout(LISTEN_READY_TIMEOUT, ready)
                .await
                .is_err()
        {
            tracing::warn!("p2p listeners have not all reported an address yet");
        }
        Ok(Network {
            commands,
            control,
            shared,
        })
    }

    /// Sends peers' [`SyncRequest::Mirror`] requests to `asks` from now on (the node's mirror
    /// calls this once; later calls change nothing). Without it they are answered
    /// `Unsupported`.
    pub fn serve_mirror(&self, asks: mpsc::Sender<MirrorAsk>) {
        let _ = self.shared.mirror.set(asks);
    }

    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.shared.peer_id
    }

    /// Whether this node was given a site.
    pub fn has_site(&self) -> bool {
        self.shared.site.is_some()
    }

    /// Whether `peer` is in another site: both sites are known and differ.
    pub fn is_remote(&self, peer: &PeerId) -> bool {
        self.same_site(peer) == Some(false)
    }

    /// This node's site, if it has one.
    pub fn site(&self) -> Option<&str> {
        self.shared.site.as_deref()
    }

    /// Whether `peer` is in this node's site: `None` if this node has no site or the peer's is
    /// not known (it is not connected, or advertised none).
    pub fn same_site(&self, peer: &PeerId) -> Option<bool> {
        let mine = self.shared.site.as_ref()?;
        self.shared
            .peer_sites()
            .get(peer)
            .map(|theirs| theirs == mine)
    }

    /// The site `peer` advertised, if it is connected and gave one.
    pub fn peer_site(&self, peer: &PeerId) -> Option<String> {
        self.shared.peer_sites().get(peer).cloned()
    }

    /// From now on, peers' prefetch asks ([`SyncRequest::Prefetch`]) that pass the access check
    /// arrive on the returned receiver, at most `capacity` waiting (past that they are answered
    /// `Busy`). Before the first call, and after the receiver is dropped, they are denied.
    pub fn take_prefetch_asks(&self, capacity: usize) -> mpsc::Receiver<PrefetchAsk> {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        *self
            .shared
            .prefetch
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(tx);
        rx
    }

    /// Bytes of blobs this node has sent to peers.
    pub fn served_bytes(&self) -> u64 {
        self.shared
            .serving
            .served_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A control for opening chunk streams.
    pub fn control(&self) -> libp2p_stream::Control {
        self.control.clone()
    }

    async fn send(&self, c: Command) -> Result<(), NetError> {
        self.commands.send(c).await.map_err(|_| NetError::Closed)
    }

    /// Spreads a record to the fleet: gossip for a public repository; for a private one, a
    /// direct push to each connected peer that may read it (gossip would reach every member).
    /// Peers that miss it get it by anti-entropy.
    pub async fn publish(&self, record: &SignedTagRecord) -> Result<(), NetError> {
        let private = record.verify().is_ok_and(|v| {
            self.shared.auth.settings(&v.record().repo).visibility == Visibility::Private
        });
        if private {
            return self.send(Command::PushPrivate(record.clone())).await;
        }
        let bytes = codec::encode(&Gossip::Record(record.clone()))?;
        self.send(Command::Publish(bytes)).await
    }

    /// Gossips a fleet policy.
    pub async fn publish_policy(&self, policy: &SignedPolicy) -> Result<(), NetError> {
        let bytes = codec::encode(&Gossip::Policy(policy.clone()))?;
        self.send(Command::Publish(bytes)).await
    }

    /// Gossips a member's proof (this node's own, when it joins).
    pub async fn publish_member(&self, proof: &MemberProof) -> Result<(), NetError> {
        let bytes = codec::encode(&Gossip::Member(proof.clone()))?;
        self.send(Command::Publish(bytes)).await
    }

    /// Whether only private repositories name `digest`: then the DHT, which any member reads
    /// (and whose provider records land at whichever nodes are closest to the key), is not told.
    async fn private_only(&self, digest: &Digest) -> bool {
        if !self.shared.auth.has_private_repos() {
            return false;
        }
        let d = digest.clone();
        let repos = self
            .shared
            .store
            .read(move |i| i.repos_of_blob(&d))
            .await
            .unwrap_or_default();
        !repos.is_empty()
            && repos
                .iter()
                .all(|r| self.shared.auth.settings(r).visibility == Visibility::Private)
    }

    async fn announce(&self, digest: Digest, keys: &'static [Holding]) -> Result<(), NetError> {
        if self.private_only(&digest).await {
            return Ok(());
        }
        self.send(Command::Provide(digest, keys)).await
    }

    /// Announces on the DHT that this node holds the whole blob: it provides it and seeds it.
    pub async fn provide(&self, digest: Digest) -> Result<(), NetError> {
        self.announce(digest, &[Holding::Part, Holding::Whole])
            .await
    }

    /// Announces on the DHT that this node is downloading the blob (and serves what it has).
    pub async fn provide_part(&self, digest: Digest) -> Result<(), NetError> {
        self.announce(digest, &[Holding::Part]).await
    }

    /// Announces on the DHT that a download of the blob finished, after [`Network::provide_part`]
    /// announced it as a provider: only the seeder key is new.
    pub async fn provide_seed(&self, digest: Digest) -> Result<(), NetError> {
        self.announce(digest, &[Holding::Whole]).await
    }

    /// The access state the network enforces.
    pub fn auth(&self) -> &Auth {
        &self.shared.auth
    }

    /// Peers that provide the blob (whole or in part), from the DHT.
    pub async fn find_providers(&self, digest: Digest) -> Result<Vec<PeerId>, NetError> {
        self.find(digest, Holding::Part).await
    }

    /// Peers that announced they hold the whole blob, from the DHT.
    pub async fn find_seeders(&self, digest: Digest) -> Result<Vec<PeerId>, NetError> {
        self.find(digest, Holding::Whole).await
    }

    async fn find(&self, digest: Digest, holding: Holding) -> Result<Vec<PeerId>, NetError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::FindProviders(digest, holding, tx))
            .await?;
        match tokio::time::timeout(PROVIDER_LOOKUP_TIMEOUT, rx).await {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(_)) => Err(NetError::Closed),
            Err(_) => Ok(Vec::new()),
        }
    }

    /// Sends a sync request to a peer.
    pub async fn sync(&self, peer: PeerId, request: SyncRequest) -> Result<SyncResponse, NetError> {
        sync_request(&self.commands, peer, request).await
    }

    /// Connected peers.
    pub async fn peers(&self) -> Result<Vec<PeerInfo>, NetError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Peers(tx)).await?;
        rx.await.map_err(|_| NetError::Closed)
    }

    /// Addresses this node listens on.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, NetError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::ListenAddrs(tx)).await?;
        rx.await.map_err(|_| NetError::Closed)
    }

    /// Dials a peer.
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), NetError> {
        self.send(Command::Dial(addr)).await
    }

    /// Drops every connection to a peer (it may connect again at once).
    pub async fn disconnect(&self, peer: PeerId) -> Result<(), NetError> {
        self.send(Command::Disconnect(peer)).await
    }

    /// Reports that `peer` misbehaved. Its points add up; once they reach a ban the event loop
    /// cuts it off, refuses its connections and does not dial it until the ban ends.
    pub fn report(&self, peer: PeerId, offence: conduct::Offence) -> conduct::Verdict {
        self.shared.conduct.report(peer, offence)
    }

    /// Whether `peer` is banned now.
    pub fn is_banned(&self, peer: &PeerId) -> bool {
        self.shared.conduct.is_banned(peer)
    }
}
