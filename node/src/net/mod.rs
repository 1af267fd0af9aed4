//! The libp2p side of a node.
//!
//! One [`EventLoop`] task owns the `Swarm`; everything else talks to it through a [`Network`]
//! handle (cheap to clone) over a bounded command channel, or opens chunk streams directly with
//! the `libp2p-stream` control the handle carries.
//!
//! Behaviours: identify and ping; Kademlia (`/shoal/kad/1`) for provider records, one per blob a
//! node holds; gossipsub on `shoal/tags/1` for signed tag records; mDNS for peers on the LAN;
//! request-response `/shoal/sync/2` for anti-entropy and `BlobIndex` look-ups; raw streams
//! `/shoal/chunk/1` for blob bytes. Transports: QUIC; TCP with yamux over libp2p's TLS handshake
//! asking for AES-GCM first ([`tls`]), or noise for a peer that offers only that; and the
//! in-memory transport with the same TLS (used by in-process tests).
//!
//! Anti-entropy: when two nodes connect, each asks the other for a summary of its current
//! records and, when the summaries differ, pages through the other's records and ingests them,
//! so a node that was offline catches up without waiting for new gossip. The same exchange runs
//! with a random connected peer every [`NetConfig::sync_interval`], so a record that gossip lost
//! while nodes stayed connected still arrives.

pub mod chunk;
pub mod links;
pub mod sync;
pub mod tls;
pub mod upload_log;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use libp2p::core::transport::ListenerId;
use libp2p::core::transport::MemoryTransport;
use libp2p::core::upgrade::Version;
use libp2p::kad::{self, store::MemoryStore};
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, Transport, gossipsub, identify, mdns, noise, ping,
    tcp, yamux,
};
use serde::Serialize;
use shoal_protocol::message::{
    Gossip, HAVE_WAIT_MAX, HaveChunks, MAX_GOSSIP_BYTES, MAX_SYNC_RECORDS, SYNC_PROTOCOL,
    SyncRequest, SyncResponse, TAGS_TOPIC,
};
use shoal_protocol::{Digest, SignedTagRecord, codec};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::store::{Store, StoreError};
use crate::tags::{Ingest, Tags};
use upload_log::{BlobLog, UploadLog};

/// Capacity of the command channel into the event loop.
const COMMAND_CAPACITY: usize = 256;
/// Most inbound requests and gossip messages processed at once; past that, gossip is dropped
/// (anti-entropy repairs it) and sync requests are answered with an error.
const MAX_INBOUND_WORK: usize = 64;
/// Most `HaveWait` long polls parked at once (a few per downloading peer and blob). Past that a
/// long poll is answered at once, like a plain `Have`.
const MAX_HAVE_WAITS: usize = 1024;
/// Most anti-entropy exchanges at once.
const MAX_CONCURRENT_SYNCS: usize = 8;
/// Timeout of one sync request.
const SYNC_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a provider look-up may take.
const PROVIDER_LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Most DHT keys with provider records one node keeps, its own and others' (each key holds at
/// most 20 providers, a few hundred bytes apiece).
const MAX_DHT_PROVIDER_KEYS: usize = 1 << 16;
/// How much a peer may send on one QUIC stream ahead of what this node has read, and on one
/// connection over all its streams. A sender keeps everything it wrote until it is
/// acknowledged, up to the receiver's window, so the windows bound each connection's send
/// buffer too: libp2p's defaults (10 MB and 15 MB) let a seeder with 16 peers on a slow link
/// hold well over 100 MB of chunk bytes in QUIC buffers. 4 MiB a connection still covers the
/// bandwidth-delay product of 10 Gbit/s at 3 ms or 100 Mbit/s at 300 ms.
const QUIC_STREAM_WINDOW: u32 = 2 << 20;
const QUIC_CONNECTION_WINDOW: u32 = 4 << 20;
/// How long a QUIC connection that TCP replaces stays open. Closed at once, it loses what
/// gossipsub had queued on it, such as the subscriptions exchanged on a new connection (a peer
/// that missed them never forwards this node a record).
const QUIC_CLOSE_GRACE: Duration = Duration::from_secs(2);

/// How often Kademlia refreshes its routing table.
const KAD_BOOTSTRAP_INTERVAL: Duration = Duration::from_secs(300);
/// How often a node syncs its records with a random peer (see [`NetConfig::sync_interval`]).
pub const SYNC_INTERVAL: Duration = Duration::from_secs(60);
/// How long `Network::start` waits for its listeners to report their addresses. A QUIC listener
/// binds its socket on the swarm's first poll, so an address asked for at once may be missing.
const LISTEN_READY_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a network operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The event loop is gone (shutdown).
    #[error("the network is shut down")]
    Closed,
    /// The peer did not answer in time.
    #[error("timed out")]
    Timeout,
    /// The peer is busy.
    #[error("peer is busy")]
    Busy,
    /// The peer dropped a stream before answering on it: its queue of new streams was full, or
    /// it closed the stream as idle just as it was reused. Not a fault of the peer.
    #[error("stream dropped before an answer: {0}")]
    Refused(String),
    /// The peer broke the protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// A request failed.
    #[error("request failed: {0}")]
    Request(String),
    /// A stream could not be opened.
    #[error("stream: {0}")]
    Stream(String),
    /// I/O on a stream failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// Encoding or decoding failed.
    #[error("codec: {0}")]
    Codec(#[from] shoal_protocol::CodecError),
    /// The local store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The swarm could not be built or could not listen.
    #[error("setting up libp2p: {0}")]
    Setup(String),
}

/// Network settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// Addresses to listen on.
    pub listen: Vec<Multiaddr>,
    /// Peers to dial at start.
    pub bootstrap: Vec<Multiaddr>,
    /// Whether to find peers on the LAN with mDNS.
    pub mdns: bool,
    /// Cap on the bytes per second this node sends to peers (for metered or slow links).
    pub upload_limit_bytes_per_sec: Option<u64>,
    /// The site this node is in (a label such as a datacenter or shop name), advertised to
    /// peers. Downloads fetch each chunk over the link to another site about once per site.
    /// `None`: the node takes every peer as local.
    pub site: Option<String>,
    /// How often the node compares its records with one connected peer picked at random, and
    /// catches up if they differ. Gossip can lose a record (a peer that was busy, a connection
    /// that closed with it queued); this bounds how long the loss lasts.
    pub sync_interval: Duration,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            listen: vec![
                "/ip4/0.0.0.0/udp/4001/quic-v1"
                    .parse()
                    .unwrap_or_else(|_| Multiaddr::empty()),
                "/ip4/0.0.0.0/tcp/4001"
                    .parse()
                    .unwrap_or_else(|_| Multiaddr::empty()),
            ],
            bootstrap: Vec::new(),
            mdns: true,
            upload_limit_bytes_per_sec: None,
            site: None,
            sync_interval: SYNC_INTERVAL,
        }
    }
}

/// A connected peer, as `shoal peers` shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct PeerInfo {
    /// The peer id.
    pub peer_id: String,
    /// Addresses known for the peer (its entries in the DHT routing table).
    pub addresses: Vec<String>,
    /// Remote addresses of the open connections (TCP is kept when the peer has it).
    #[serde(default)]
    pub connections: Vec<String>,
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    kad: kad::Behaviour<MemoryStore>,
    gossipsub: gossipsub::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
    sync: request_response::Behaviour<sync::SyncCodec>,
    stream: libp2p_stream::Behaviour,
}

/// What a provider record on the DHT says a node holds of a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holding {
    /// Some or all of it: it downloads or holds the blob (the blob's digest is the key).
    Part,
    /// All of it: a seeder (the key is the digest followed by ` whole`), so that a download can
    /// find the few nodes that hold everything among the many that are still downloading.
    Whole,
}

impl Holding {
    fn record_key(self, digest: &Digest) -> kad::RecordKey {
        match self {
            Holding::Part => kad::RecordKey::new(&digest.to_string()),
            Holding::Whole => kad::RecordKey::new(&format!("{digest} whole")),
        }
    }
}

enum Command {
    Publish(Vec<u8>),
    /// Announces each of the keys.
    Provide(Digest, &'static [Holding]),
    FindProviders(Digest, Holding, oneshot::Sender<Vec<PeerId>>),
    Sync(
        PeerId,
        SyncRequest,
        oneshot::Sender<Result<SyncResponse, NetError>>,
    ),
    Respond(ResponseChannel<SyncResponse>, SyncResponse),
    Peers(oneshot::Sender<Vec<PeerInfo>>),
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    Dial(Multiaddr),
    Disconnect(PeerId),
    /// Closes a QUIC connection that TCP replaces ([`links`]).
    CloseQuic(PeerId, libp2p::swarm::ConnectionId),
}

/// Handle to the network (cheap to clone).
#[derive(Clone)]
pub struct Network {
    commands: mpsc::Sender<Command>,
    control: libp2p_stream::Control,
    peer_id: PeerId,
    uploads: Arc<chunk::Uploads>,
    site: Option<String>,
    /// The site each connected peer advertised, from identify.
    peer_sites: Arc<std::sync::Mutex<HashMap<PeerId, String>>>,
}

impl Network {
    /// Builds the swarm, starts listening and dialling, and spawns the event loop and the chunk
    /// server on `tasks`. Both stop when `cancel` fires.
    pub async fn start(
        keypair: libp2p::identity::Keypair,
        config: NetConfig,
        store: Store,
        tags: Tags,
        cancel: CancellationToken,
        tasks: &tokio_util::task::TaskTracker,
    ) -> Result<Network, NetError> {
        let peer_id = keypair.public().to_peer_id();
        let mut swarm = build_swarm(keypair, config.mdns, config.site.as_deref())?;
        let defaults = NetConfig::default().listen;
        let mut listeners = HashSet::new();
        for addr in &config.listen {
            // libp2p's TCP listeners set SO_REUSEPORT, so a second node on this machine would
            // silently share the port (and its inbound connections). Probe the default first.
            let addr = &match (defaults.contains(addr), tcp_port_taken(addr)) {
                (true, true) => with_port_zero(addr).unwrap_or_else(|| addr.clone()),
                _ => addr.clone(),
            };
            let listener = match swarm.listen_on(addr.clone()) {
                Ok(id) => id,
                Err(e) => {
                    // The default port may be taken by another node on this machine: then take
                    // any free port rather than fail a zero-config start. A chosen address must
                    // work.
                    let fallback = defaults
                        .contains(addr)
                        .then(|| with_port_zero(addr))
                        .flatten();
                    let Some(fallback) = fallback else {
                        return Err(NetError::Setup(format!("listen on {addr}: {e}")));
                    };
                    tracing::warn!(%addr, error = %e, "default p2p port unavailable; using a free port");
                    swarm
                        .listen_on(fallback)
                        .map_err(|e| NetError::Setup(format!("listen on {addr}: {e}")))?
                }
            };
            listeners.insert(listener);
        }
        swarm
            .behaviour_mut()
            .gossipsub
            .subscribe(&gossipsub::IdentTopic::new(TAGS_TOPIC))
            .map_err(|e| NetError::Setup(e.to_string()))?;
        for addr in &config.bootstrap {
            if let Err(e) = swarm.dial(addr.clone()) {
                tracing::warn!(%addr, error = %e, "cannot dial bootstrap peer");
            }
        }
        let control = swarm.behaviour().stream.new_control();
        let uploads = Arc::new(chunk::Uploads::new(config.upload_limit_bytes_per_sec));
        let (tx, rx) = mpsc::channel(COMMAND_CAPACITY);
        let network = Network {
            commands: tx,
            control: control.clone(),
            peer_id,
            uploads: uploads.clone(),
            site: config.site.clone(),
            peer_sites: Arc::default(),
        };
        let mut event_loop = EventLoop {
            swarm,
            commands: rx,
            pending_syncs: HashMap::new(),
            pending_providers: HashMap::new(),
            network: network.clone(),
            store: store.clone(),
            tags,
            inbound: Arc::new(Semaphore::new(MAX_INBOUND_WORK)),
            have_waits: Arc::new(Semaphore::new(MAX_HAVE_WAITS)),
            syncs: Arc::new(Semaphore::new(MAX_CONCURRENT_SYNCS)),
            links: links::Links::default(),
            starting: None,
            sync_interval: config.sync_interval,
        };
        let ready = (!listeners.is_empty()).then(|| {
            let (tx, rx) = oneshot::channel();
            event_loop.starting = Some((listeners, tx));
            rx
        });
        tasks.spawn(event_loop.run(cancel.clone()));
        tasks.spawn(chunk::serve(control, store, uploads, cancel));
        // Return once every listener has an address, so that `listen_addrs` gives them all.
        if let Some(ready) = ready
            && tokio::time::timeout(LISTEN_READY_TIMEOUT, ready)
                .await
                .is_err()
        {
            tracing::warn!("p2p listeners have not all reported an address yet");
        }
        Ok(network)
    }

    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Whether this node was given a site.
    pub fn has_site(&self) -> bool {
        self.site.is_some()
    }

    /// Whether `peer` is in another site: both sites are known and differ.
    pub fn is_remote(&self, peer: &PeerId) -> bool {
        self.same_site(peer) == Some(false)
    }

    /// Whether `peer` is in this node's site: `None` if this node has no site or the peer's is
    /// not known (it is not connected, or advertised none).
    pub fn same_site(&self, peer: &PeerId) -> Option<bool> {
        let mine = self.site.as_ref()?;
        self.peer_sites
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(peer)
            .map(|theirs| theirs == mine)
    }

    /// Bytes of blobs this node has sent to peers.
    pub fn served_bytes(&self) -> u64 {
        self.uploads
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

    /// Gossips a record to the fleet. Peers that miss it get it by anti-entropy.
    pub async fn publish(&self, record: &SignedTagRecord) -> Result<(), NetError> {
        let bytes = codec::encode(&Gossip::Record(record.clone()))?;
        self.send(Command::Publish(bytes)).await
    }

    /// Announces on the DHT that this node holds the whole blob: it provides it and seeds it.
    pub async fn provide(&self, digest: Digest) -> Result<(), NetError> {
        self.send(Command::Provide(digest, &[Holding::Part, Holding::Whole]))
            .await
    }

    /// Announces on the DHT that this node is downloading the blob (and serves what it has).
    pub async fn provide_part(&self, digest: Digest) -> Result<(), NetError> {
        self.send(Command::Provide(digest, &[Holding::Part])).await
    }

    /// Announces on the DHT that a download of the blob finished, after [`Network::provide_part`]
    /// announced it as a provider: only the seeder key is new.
    pub async fn provide_seed(&self, digest: Digest) -> Result<(), NetError> {
        self.send(Command::Provide(digest, &[Holding::Whole])).await
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
        let (tx, rx) = oneshot::channel();
        self.send(Command::Sync(peer, request, tx)).await?;
        tokio::time::timeout(SYNC_TIMEOUT, rx)
            .await
            .map_err(|_| NetError::Timeout)?
            .map_err(|_| NetError::Closed)?
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

    /// Drops every connection to a peer that misbehaved.
    pub async fn disconnect(&self, peer: PeerId) -> Result<(), NetError> {
        self.send(Command::Disconnect(peer)).await
    }
}

/// Whether `addr` is a TCP address whose port another socket already holds.
fn tcp_port_taken(addr: &Multiaddr) -> bool {
    use libp2p::multiaddr::Protocol;
    let mut ip = None;
    let mut port = None;
    for p in addr.iter() {
        match p {
            Protocol::Ip4(a) => ip = Some(std::net::IpAddr::V4(a)),
            Protocol::Ip6(a) => ip = Some(std::net::IpAddr::V6(a)),
            Protocol::Tcp(p) if p != 0 => port = Some(p),
            _ => {}
        }
    }
    match (ip, port) {
        (Some(ip), Some(port)) => std::net::TcpListener::bind((ip, port)).is_err(),
        _ => false,
    }
}

/// The same address with its TCP or UDP port set to 0.
fn with_port_zero(addr: &Multiaddr) -> Option<Multiaddr> {
    use libp2p::multiaddr::Protocol;
    let mut changed = false;
    let out = addr
        .iter()
        .map(|p| match p {
            Protocol::Tcp(_) => {
                changed = true;
                Protocol::Tcp(0)
            }
            Protocol::Udp(_) => {
                changed = true;
                Protocol::Udp(0)
            }
            other => other,
        })
        .collect();
    changed.then_some(out)
}

fn build_swarm(
    keypair: libp2p::identity::Keypair,
    with_mdns: bool,
    site: Option<&str>,
) -> Result<Swarm<Behaviour>, NetError> {
    let setup = |e: &dyn std::fmt::Display| NetError::Setup(e.to_string());
    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            (tls::Config::new, noise::Config::new),
            yamux::Config::default,
        )
        .map_err(|e| setup(&e))?
        .with_quic_config(|mut c| {
            c.max_stream_data = QUIC_STREAM_WINDOW;
            c.max_connection_data = QUIC_CONNECTION_WINDOW;
            c
        })
        .with_other_transport(|key| {
            Ok(MemoryTransport::default()
                .upgrade(Version::V1)
                .authenticate(tls::Config::new(key)?)
                .multiplex(yamux::Config::default()))
        })
        .map_err(|e| setup(&e))?
        .with_behaviour(
            |key| -> Result<Behaviour, Box<dyn std::error::Error + Send + Sync>> {
                let peer_id = key.public().to_peer_id();
                let gossip_config = gossipsub::ConfigBuilder::default()
                    .max_transmit_size(MAX_GOSSIP_BYTES)
                    .validation_mode(gossipsub::ValidationMode::Strict)
                    .validate_messages()
                    .message_id_fn(|m: &gossipsub::Message| {
                        gossipsub::MessageId::from(blake3::hash(&m.data).to_hex().to_string())
                    })
                    .build()?;
                let gossipsub = gossipsub::Behaviour::new(
                    gossipsub::MessageAuthenticity::Signed(key.clone()),
                    gossip_config,
                )?;
                let mut kad_config = kad::Config::new(StreamProtocol::new("/shoal/kad/1"));
                kad_config.set_query_timeout(PROVIDER_LOOKUP_TIMEOUT);
                // The store's default of 1024 keys counts the provider records a node keeps for
                // others as well as its own: a registry of a few hundred images holds more blobs
                // than that, and every whole blob takes two keys (holder and seeder).
                let store = MemoryStore::with_config(
                    peer_id,
                    kad::store::MemoryStoreConfig {
                        max_provided_keys: MAX_DHT_PROVIDER_KEYS,
                        ..Default::default()
                    },
                );
                let mut kad = kad::Behaviour::with_config(peer_id, store, kad_config);
                kad.set_mode(Some(kad::Mode::Server));
                let mdns = if with_mdns {
                    Some(mdns::tokio::Behaviour::new(
                        mdns::Config::default(),
                        peer_id,
                    )?)
                } else {
                    None
                };
                Ok(Behaviour {
                    identify: identify::Behaviour::new(
                        identify::Config::new("/shoal/id/1".into(), key.public())
                            .with_agent_version(agent_version(site)),
                    ),
                    ping: ping::Behaviour::default(),
                    kad,
                    gossipsub,
                    mdns: Toggle::from(mdns),
                    sync: request_response::Behaviour::with_codec(
                        sync::SyncCodec,
                        [(StreamProtocol::new(SYNC_PROTOCOL), ProtocolSupport::Full)],
                        request_response::Config::default().with_request_timeout(SYNC_TIMEOUT),
                    ),
                    stream: libp2p_stream::Behaviour::new(),
                })
            },
        )
        .map_err(|e| setup(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(3600)))
        .build();
    Ok(swarm)
}

/// The task that owns the swarm.
pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    pending_syncs: HashMap<OutboundRequestId, oneshot::Sender<Result<SyncResponse, NetError>>>,
    pending_providers: HashMap<kad::QueryId, (HashSet<PeerId>, oneshot::Sender<Vec<PeerId>>)>,
    network: Network,
    store: Store,
    tags: Tags,
    inbound: Arc<Semaphore>,
    have_waits: Arc<Semaphore>,
    syncs: Arc<Semaphore>,
    links: links::Links,
    /// While starting: the listeners yet to report an address, and whom to tell when none is.
    starting: Option<(HashSet<ListenerId>, oneshot::Sender<()>)>,
    sync_interval: Duration,
}

impl EventLoop {
    async fn run(mut self, cancel: CancellationToken) {
        let mut bootstrap = tokio::time::interval(KAD_BOOTSTRAP_INTERVAL);
        let every = self.sync_interval.max(Duration::from_millis(100));
        let mut sync = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        sync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = self.commands.recv() => match command {
                    Some(c) => self.on_command(c),
                    None => break,
                },
                _ = bootstrap.tick() => {
                    // Fails only when the routing table is empty, which is fine.
                    let _ = self.swarm.behaviour_mut().kad.bootstrap();
                }
                _ = sync.tick() => self.sync_with_a_random_peer(),
            }
        }
        tracing::debug!("network event loop stopped");
    }

    fn on_command(&mut self, command: Command) {
        let b = self.swarm.behaviour_mut();
        match command {
            Command::Publish(bytes) => {
                if let Err(e) = b
                    .gossipsub
                    .publish(gossipsub::IdentTopic::new(TAGS_TOPIC), bytes)
                {
                    // No subscribed peer yet, or a duplicate: anti-entropy delivers it later.
                    tracing::debug!(error = %e, "gossip publish");
                }
            }
            Command::Provide(digest, keys) => {
                for key in keys {
                    if let Err(e) = b.kad.start_providing(key.record_key(&digest)) {
                        tracing::warn!(error = %e, %digest, "cannot announce a blob on the DHT");
                    }
                }
            }
            Command::FindProviders(digest, holding, reply) => {
                let id = b.kad.get_providers(holding.record_key(&digest));
                self.pending_providers.insert(id, (HashSet::new(), reply));
            }
            Command::Sync(peer, request, reply) => {
                let id = b.sync.send_request(&peer, request);
                self.pending_syncs.insert(id, reply);
            }
            Command::Respond(channel, response) => {
                // Fails when the requester went away; nothing to do then.
                let _ = b.sync.send_response(channel, response);
            }
            Command::Peers(reply) => {
                let mut peers: HashMap<PeerId, Vec<String>> = HashMap::new();
                for peer in self.swarm.connected_peers() {
                    peers.entry(*peer).or_default();
                }
                let _ = reply.send(
                    peers
                        .into_keys()
                        .map(|p| PeerInfo {
                            peer_id: p.to_string(),
                            addresses: self.addresses_of(&p),
                            connections: self.links.connections(&p),
                        })
                        .collect(),
                );
            }
            Command::ListenAddrs(reply) => {
                let _ = reply.send(self.swarm.listeners().cloned().collect());
            }
            Command::Dial(addr) => {
                if let Err(e) = self.swarm.dial(addr.clone()) {
                    tracing::warn!(%addr, error = %e, "dial failed");
                }
            }
            Command::Disconnect(peer) => {
                let _ = self.swarm.disconnect_peer_id(peer);
            }
            Command::CloseQuic(peer, id) => {
                // The TCP connection may have gone in the meantime: then QUIC stays.
                if self.links.has_tcp(&peer) && self.swarm.close_connection(id) {
                    tracing::debug!(%peer, "closed a QUIC connection: TCP is kept");
                    // A record gossiped over the closed connection as it closed is lost; a
                    // sync catches up on it.
                    self.spawn_anti_entropy(peer);
                }
            }
        }
    }

    fn addresses_of(&mut self, peer: &PeerId) -> Vec<String> {
        self.swarm
            .behaviour_mut()
            .kad
            .kbuckets()
            .flat_map(|b| {
                b.iter()
                    .filter(|e| e.node.key.preimage() == peer)
                    .flat_map(|e| e.node.value.iter().map(ToString::to_string))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr {
                address,
                listener_id,
            } => {
                tracing::info!(%address, "p2p listening");
                self.listener_settled(listener_id);
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => {
                tracing::warn!(?reason, "p2p listener closed");
                self.listener_settled(listener_id);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                let addr = endpoint.get_remote_address().clone();
                tracing::info!(peer = %peer_id, %addr, "peer connected");
                let close =
                    self.links
                        .established(peer_id, connection_id, &addr, endpoint.is_dialer());
                if endpoint.is_dialer() {
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                }
                for id in close {
                    let network = self.network.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(QUIC_CLOSE_GRACE).await;
                        let _ = network.send(Command::CloseQuic(peer_id, id)).await;
                    });
                }
                if num_established.get() == 1 {
                    self.spawn_anti_entropy(peer_id);
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } => {
                self.links.closed(&peer_id, connection_id);
                if num_established > 0 {
                    return;
                }
                tracing::info!(peer = %peer_id, "peer disconnected");
                self.network
                    .peer_sites
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .remove(&peer_id);
            }
            SwarmEvent::Behaviour(event) => self.on_behaviour_event(event),
            _ => {}
        }
    }

    fn on_behaviour_event(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                if let Some(site) = site_of(&info.agent_version) {
                    self.network
                        .peer_sites
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .insert(peer_id, site.to_owned());
                }
                let tcp = self.links.tcp_to_dial(peer_id, &info.listen_addrs);
                if !tcp.is_empty() {
                    tracing::debug!(peer = %peer_id, addrs = ?tcp, "dialling over TCP, not QUIC");
                    let opts = DialOpts::peer_id(peer_id)
                        .condition(PeerCondition::NotDialing)
                        .addresses(tcp)
                        .build();
                    if let Err(e) = self.swarm.dial(opts) {
                        tracing::debug!(peer = %peer_id, error = %e, "dialling over TCP");
                    }
                }
                for addr in info.listen_addrs {
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                for (peer, addr) in found {
                    if !self.swarm.is_connected(&peer) {
                        self.swarm
                            .behaviour_mut()
                            .kad
                            .add_address(&peer, addr.clone());
                        if let Err(e) = self.swarm.dial(addr) {
                            tracing::debug!(%peer, error = %e, "dialing an mDNS peer");
                        }
                    }
                }
            }
            BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            }) => {
                self.on_gossip(propagation_source, message_id, message.data);
            }
            BehaviourEvent::Sync(request_response::Event::Message { peer, message, .. }) => {
                match message {
                    request_response::Message::Request {
                        request, channel, ..
                    } => self.on_sync_request(peer, request, channel),
                    request_response::Message::Response {
                        request_id,
                        response,
                    } => {
                        if let Some(reply) = self.pending_syncs.remove(&request_id) {
                            let _ = reply.send(Ok(response));
                        }
                    }
                }
            }
            BehaviourEvent::Sync(request_response::Event::OutboundFailure {
                request_id,
                error,
                ..
            }) => {
                if let Some(reply) = self.pending_syncs.remove(&request_id) {
                    let _ = reply.send(Err(NetError::Request(error.to_string())));
                }
            }
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                id,
                result: kad::QueryResult::GetProviders(result),
                step,
                ..
            }) => {
                {
                    if let Some((found, _)) = self.pending_providers.get_mut(&id) {
                        if let Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) = result {
                            found.extend(providers);
                        }
                    }
                    if step.last {
                        if let Some((found, reply)) = self.pending_providers.remove(&id) {
                            let _ = reply.send(found.into_iter().collect());
                        }
                    } else if self
                        .pending_providers
                        .get(&id)
                        .is_some_and(|(f, _)| !f.is_empty())
                    {
                        // The first providers are enough to start; finish the query early.
                        if let Some(mut q) = self.swarm.behaviour_mut().kad.query_mut(&id) {
                            q.finish();
                        }
                    }
                }
            }
            _ => {}
        }
    }

    fn on_gossip(&mut self, source: PeerId, id: gossipsub::MessageId, data: Vec<u8>) {
        let decoded: Result<Gossip, _> = codec::decode(&data);
        let Ok(Gossip::Record(record)) = decoded else {
            tracing::warn!(peer = %source, "rejected a malformed gossip message");
            self.tags
                .stats()
                .invalid
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.report(&id, &source, gossipsub::MessageAcceptance::Reject);
            return;
        };
        // A record that verifies is forwarded even if this node does not trust its publisher:
        // others may. A bad signature is rejected, which scores the sender down.
        let acceptance = if record.verify().is_ok() {
            gossipsub::MessageAcceptance::Accept
        } else {
            gossipsub::MessageAcceptance::Reject
        };
        self.report(&id, &source, acceptance);
        let Ok(permit) = self.inbound.clone().try_acquire_owned() else {
            tracing::warn!(
                "dropping a gossiped record: too much inbound work (anti-entropy will repair)"
            );
            return;
        };
        let tags = self.tags.clone();
        tokio::spawn(async move {
            if let Err(e) = tags.ingest(record).await {
                tracing::error!(error = %e, "storing a gossiped record");
            }
            drop(permit);
        });
    }

    fn report(
        &mut self,
        id: &gossipsub::MessageId,
        source: &PeerId,
        acceptance: gossipsub::MessageAcceptance,
    ) {
        let _ = self
            .swarm
            .behaviour_mut()
            .gossipsub
            .report_message_validation_result(id, source, acceptance);
    }

    fn on_sync_request(
        &mut self,
        peer: PeerId,
        request: SyncRequest,
        channel: ResponseChannel<SyncResponse>,
    ) {
        // A long poll mostly waits: it takes a permit of its own kind. Past MAX_HAVE_WAITS it is
        // answered at once, like a plain `Have`.
        let parked = match &request {
            SyncRequest::HaveWait { .. } => self.have_waits.clone().try_acquire_owned().ok(),
            _ => None,
        };
        let (request, permit) = match parked {
            Some(permit) => (request, Ok(permit)),
            None => {
                let request = match request {
                    SyncRequest::HaveWait { digest, .. } => SyncRequest::Have { digest },
                    other => other,
                };
                (request, self.inbound.clone().try_acquire_owned())
            }
        };
        let Ok(permit) = permit else {
            let _ = self
                .swarm
                .behaviour_mut()
                .sync
                .send_response(channel, SyncResponse::Error("busy".into()));
            return;
        };
        let (store, network) = (self.store.clone(), self.network.clone());
        tokio::spawn(async move {
            let log = &network.uploads.log;
            let response = answer(&store, log, request).await.unwrap_or_else(|e| {
                tracing::warn!(%peer, error = %e, "answering a sync request");
                SyncResponse::Error("internal error".into())
            });
            let _ = network.send(Command::Respond(channel, response)).await;
            drop(permit);
        });
    }

    /// Marks a listener as having an address (or as gone); the start waits for all of them.
    fn listener_settled(&mut self, listener: ListenerId) {
        let Some((waiting, _)) = &mut self.starting else {
            return;
        };
        waiting.remove(&listener);
        if waiting.is_empty()
            && let Some((_, ready)) = self.starting.take()
        {
            let _ = ready.send(());
        }
    }

    /// The periodic sync: one peer at random, skipped while syncs already fill their permits
    /// (a slow peer must not pile them up).
    fn sync_with_a_random_peer(&self) {
        use rand::seq::IteratorRandom;
        if self.syncs.available_permits() == 0 {
            return;
        }
        if let Some(peer) = self.swarm.connected_peers().choose(&mut rand::rng()) {
            self.spawn_anti_entropy(*peer);
        }
    }

    fn spawn_anti_entropy(&self, peer: PeerId) {
        let (network, store, tags, syncs) = (
            self.network.clone(),
            self.store.clone(),
            self.tags.clone(),
            self.syncs.clone(),
        );
        tokio::spawn(async move {
            let Ok(_permit) = syncs.acquire_owned().await else {
                return;
            };
            match anti_entropy(&network, &store, &tags, peer).await {
                Ok(n) if n > 0 => tracing::info!(%peer, accepted = n, "caught up with a peer"),
                Ok(_) => {}
                Err(e) => tracing::debug!(%peer, error = %e, "anti-entropy"),
            }
        });
    }
}

async fn answer(
    store: &Store,
    log: &UploadLog,
    request: SyncRequest,
) -> Result<SyncResponse, NetError> {
    Ok(match request {
        SyncRequest::Summary => store.read(|i| i.records_summary()).await?,
        SyncRequest::Records { after, limit } => {
            store
                .read(move |i| i.records_page(after.as_ref().map(|(r, t)| (r, t)), limit))
                .await?
        }
        SyncRequest::Have { digest } => SyncResponse::Have(have(store, log, &digest).await?),
        SyncRequest::HaveWait {
            digest,
            held,
            uploads,
        } => SyncResponse::Have(have_wait(store, log, &digest, held, uploads).await?),
        SyncRequest::BlobIndex { digest } => {
            SyncResponse::BlobIndex(store.blob_index(&digest).await?)
        }
    })
}

/// Which chunks of a blob this node holds: all of a stored blob, some of a download.
/// A stored blob's answer carries its upload report.
async fn have(
    store: &Store,
    log: &UploadLog,
    digest: &Digest,
) -> Result<Option<HaveChunks>, NetError> {
    if let Some(log) = stored_blob_log(store, log, digest).await? {
        let all = shoal_protocol::Bitfield::full(log.chunk_count());
        return Ok(Some(HaveChunks {
            uploads: Some(log.report()),
            ..HaveChunks::from(&all)
        }));
    }
    Ok(store.partial_in_progress(digest).map(|p| p.have()))
}

/// The upload log of a blob this node stores whole, `None` if it does not.
async fn stored_blob_log(
    store: &Store,
    log: &UploadLog,
    digest: &Digest,
) -> Result<Option<Arc<BlobLog>>, NetError> {
    let Some(size) = store.blob_size(digest).await? else {
        return Ok(None);
    };
    Ok(log.for_stored(store, digest, size).await?)
}

/// What this node says it is in identify: `shoal/<version>`, then ` site=<label>` if it has one.
fn agent_version(site: Option<&str>) -> String {
    let version = env!("CARGO_PKG_VERSION");
    match site {
        Some(site) => format!("shoal/{version} site={site}"),
        None => format!("shoal/{version}"),
    }
}

/// The site label in a peer's identify agent version, if any (at most 64 bytes, no spaces).
fn site_of(agent_version: &str) -> Option<&str> {
    agent_version
        .strip_prefix("shoal/")?
        .split(' ')
        .find_map(|part| part.strip_prefix("site="))
        .filter(|site| !site.is_empty() && site.len() <= 64)
}

/// Like [`have`], but waits (at most [`HAVE_WAIT_MAX`]): for a blob being downloaded, until
/// more than `held` chunks are held or the download ends; for a stored blob, until its upload
/// report's version differs from `uploads`.
async fn have_wait(
    store: &Store,
    log: &UploadLog,
    digest: &Digest,
    held: u32,
    uploads: u64,
) -> Result<Option<HaveChunks>, NetError> {
    if let Some(blob) = stored_blob_log(store, log, digest).await? {
        let mut version = blob.subscribe();
        let _ = tokio::time::timeout(HAVE_WAIT_MAX, version.wait_for(|v| *v != uploads)).await;
        // Asked again: the blob may have been deleted while this waited.
        return have(store, log, digest).await;
    }
    if let Some(partial) = store.partial_in_progress(digest) {
        let mut progress = partial.progress();
        // Copied out at once: the borrowed value holds the watch's lock, which the downloader
        // needs to publish its next chunk.
        let complete = tokio::time::timeout(
            HAVE_WAIT_MAX,
            progress.wait_for(|p| p.held > held || p.complete),
        )
        .await
        .map(|r| r.map(|p| p.complete));
        if let Ok(Ok(false)) = complete {
            return Ok(Some(partial.have()));
        }
    }
    have(store, log, digest).await
}

/// Pulls every record `peer` holds that this node lacks. Returns how many were accepted.
async fn anti_entropy(
    network: &Network,
    store: &Store,
    tags: &Tags,
    peer: PeerId,
) -> Result<u64, NetError> {
    let theirs = network.sync(peer, SyncRequest::Summary).await?;
    let ours = store.read(|i| i.records_summary()).await?;
    match theirs {
        SyncResponse::Summary { .. } if theirs == ours => return Ok(0),
        SyncResponse::Summary { .. } => {}
        other => {
            return Err(NetError::Protocol(format!(
                "unexpected answer to Summary: {other:?}"
            )));
        }
    }
    let mut after = None;
    let mut accepted = 0;
    loop {
        let request = SyncRequest::Records {
            after: after.clone(),
            limit: MAX_SYNC_RECORDS as u32,
        };
        let SyncResponse::Records { records, more } = network.sync(peer, request).await? else {
            return Err(NetError::Protocol("unexpected answer to Records".into()));
        };
        let Some(last) = records.last() else { break };
        // The page cursor comes from the peer's data; a peer that does not advance is cut off.
        let next = last
            .verify()
            .ok()
            .map(|v| (v.record().repo.clone(), v.record().tag.clone()));
        if next.is_none() || next == after {
            return Err(NetError::Protocol("records page did not advance".into()));
        }
        after = next;
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
