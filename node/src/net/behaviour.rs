//! The swarm a node runs: its transports, its behaviours and their settings, and how it starts
//! listening. Built once by [`Network::start`](super::Network::start); the event loop drives it.
//!
//! Transports: QUIC; TCP with yamux over libp2p's TLS handshake asking for AES-GCM first
//! ([`tls`](super::tls)), or noise for a peer that offers only that; and the in-memory
//! transport with the same TLS (used by in-process tests). Behaviours: identify (which also
//! carries the node's site) and ping; Kademlia (`/shoal/kad/1`) for provider records; gossipsub
//! on `shoal/tags/2`; mDNS; request-response `/shoal/sync/3`; raw streams for chunks; and, first,
//! the block list of banned peers and the connection limits.

use std::collections::HashSet;
use std::time::Duration;

use libp2p::core::transport::{ListenerId, MemoryTransport};
use libp2p::core::upgrade::Version;
use libp2p::kad::{self, store::MemoryStore};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{
    Multiaddr, StreamProtocol, Swarm, Transport, allow_block_list, connection_limits, gossipsub,
    identify, mdns, noise, ping, tcp, yamux,
};
use shoal_protocol::Digest;
use shoal_protocol::message::{MAX_GOSSIP_BYTES, SYNC_PROTOCOL, TAGS_TOPIC};

use super::provider_store::{MAX_PROVIDER_RECORDS_PER_PEER, ProviderStore};
use super::{NetConfig, NetError, PROVIDER_LOOKUP_TIMEOUT, SYNC_TIMEOUT, framing, tls};

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
/// How long a connection with no stream open stays up. Long: a fleet's peers talk in bursts (a
/// rollout, then nothing for hours), and gossip needs the mesh to be there when it happens.
const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(3600);
/// How often each connection is pinged, and how long a ping may take.
pub(super) const PING_INTERVAL: Duration = Duration::from_secs(10);

/// Most connections to one peer: TCP and QUIC, each possibly dialled from both sides at once.
const MAX_CONNECTIONS_PER_PEER: u32 = 4;
/// Most connections in all, and most inbound ones being set up at once (a handshake costs CPU;
/// a flood of them must not starve established peers).
const MAX_CONNECTIONS: u32 = 2048;
const MAX_PENDING_INBOUND: u32 = 128;

/// The behaviours of a node's swarm. The block list and the limits come first, so that a denied
/// connection reaches no other behaviour.
#[derive(NetworkBehaviour)]
pub(super) struct Behaviour {
    pub blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    pub limits: connection_limits::Behaviour,
    pub identify: identify::Behaviour,
    pub ping: ping::Behaviour,
    pub kad: kad::Behaviour<ProviderStore>,
    pub gossipsub: gossipsub::Behaviour,
    pub mdns: Toggle<mdns::tokio::Behaviour>,
    pub sync: request_response::Behaviour<framing::SyncCodec>,
    pub stream: libp2p_stream::Behaviour,
}

/// What a provider record on the DHT says a node holds of a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Holding {
    /// Some or all of it: it downloads or holds the blob (the blob's digest is the key).
    Part,
    /// All of it: a seeder (the key is the digest followed by ` whole`), so that a download can
    /// find the few nodes that hold everything among the many that are still downloading.
    Whole,
}

impl Holding {
    /// The DHT key under which a node announces this holding of `digest`.
    pub fn record_key(self, digest: &Digest) -> kad::RecordKey {
        match self {
            Holding::Part => kad::RecordKey::new(&digest.to_string()),
            Holding::Whole => kad::RecordKey::new(&format!("{digest} whole")),
        }
    }
}

/// Builds the swarm for `keypair` with the settings of `config`.
pub(super) fn build_swarm(
    keypair: libp2p::identity::Keypair,
    config: &NetConfig,
) -> Result<Swarm<Behaviour>, NetError> {
    let with_mdns = config.mdns;
    let agent = agent_version(config.site.as_deref());
    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            (tls::Config::new, noise::Config::new),
            yamux::Config::default,
        )
        .map_err(NetError::setup)?
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
        .map_err(NetError::setup)?
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
                let mut gossipsub = gossipsub::Behaviour::new(
                    gossipsub::MessageAuthenticity::Signed(key.clone()),
                    gossip_config,
                )?;
                let (params, thresholds) = gossip_scoring();
                gossipsub.with_peer_score(params, thresholds)?;
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
                let store = ProviderStore::new(peer_id, store, MAX_PROVIDER_RECORDS_PER_PEER);
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
                let limits = connection_limits::ConnectionLimits::default()
                    .with_max_established_per_peer(Some(MAX_CONNECTIONS_PER_PEER))
                    .with_max_established(Some(MAX_CONNECTIONS))
                    .with_max_pending_incoming(Some(MAX_PENDING_INBOUND));
                Ok(Behaviour {
                    blocked: allow_block_list::Behaviour::default(),
                    limits: connection_limits::Behaviour::new(limits),
                    identify: identify::Behaviour::new(
                        identify::Config::new("/shoal/id/1".into(), key.public())
                            .with_agent_version(agent),
                    ),
                    ping: ping::Behaviour::new(
                        ping::Config::new()
                            .with_interval(PING_INTERVAL)
                            .with_timeout(PING_INTERVAL),
                    ),
                    kad,
                    gossipsub,
                    mdns: Toggle::from(mdns),
                    sync: request_response::Behaviour::with_codec(
                        framing::SyncCodec,
                        [(StreamProtocol::new(SYNC_PROTOCOL), ProtocolSupport::Full)],
                        request_response::Config::default().with_request_timeout(SYNC_TIMEOUT),
                    ),
                    stream: libp2p_stream::Behaviour::new(),
                })
            },
        )
        .map_err(NetError::setup)?
        .with_swarm_config(|c| c.with_idle_connection_timeout(IDLE_CONNECTION_TIMEOUT))
        .build();
    Ok(swarm)
}

/// Gossipsub's peer scoring for the tags topic. Tag gossip is sparse (a record per push), so
/// nothing is asked of a peer's delivery rate: a quiet honest peer keeps a score near zero.
/// What counts is invalid messages: every message this node rejects after validation (a bad
/// signature, a malformed message) costs its forwarder `INVALID_MESSAGE_WEIGHT` times the square
/// of its recent count, which fades by a factor of `INVALID_MESSAGE_DECAY` a second. One takes a
/// peer below the gossip threshold (no gossip is exchanged with it), a few below the publish and
/// graylist thresholds (nothing is sent to it, and what it sends is dropped unread). Peers
/// behind one address are not penalised: a fleet's nodes often share a NAT or a host.
/// The application score of a peer that has not proved membership of the node's fleet yet:
/// with the default weight of 10 its score is far below [`gossip_scoring`]'s graylist (-80), so
/// gossipsub neither sends to it nor listens to it.
pub(super) const NOT_YET_ADMITTED_SCORE: f64 = -1_000.0;

fn gossip_scoring() -> (gossipsub::PeerScoreParams, gossipsub::PeerScoreThresholds) {
    const INVALID_MESSAGE_WEIGHT: f64 = -20.0;
    const INVALID_MESSAGE_DECAY: f64 = 0.99;
    let topic = gossipsub::TopicScoreParams {
        topic_weight: 1.0,
        time_in_mesh_weight: 0.01,
        time_in_mesh_quantum: Duration::from_secs(1),
        time_in_mesh_cap: 3600.0,
        first_message_deliveries_weight: 1.0,
        first_message_deliveries_decay: 0.9,
        first_message_deliveries_cap: 20.0,
        mesh_message_deliveries_weight: 0.0,
        mesh_failure_penalty_weight: 0.0,
        invalid_message_deliveries_weight: INVALID_MESSAGE_WEIGHT,
        invalid_message_deliveries_decay: INVALID_MESSAGE_DECAY,
        ..Default::default()
    };
    let mut params = gossipsub::PeerScoreParams {
        ip_colocation_factor_weight: 0.0,
        ..Default::default()
    };
    params
        .topics
        .insert(gossipsub::IdentTopic::new(TAGS_TOPIC).hash(), topic);
    let thresholds = gossipsub::PeerScoreThresholds {
        gossip_threshold: -10.0,
        publish_threshold: -50.0,
        graylist_threshold: -80.0,
        accept_px_threshold: 10.0,
        opportunistic_graft_threshold: 20.0,
    };
    (params, thresholds)
}

/// Starts a listener on each of `config.listen`. A default address whose port is taken (another
/// node on this machine) falls back to a free port, so a zero-config start does not fail; an
/// address the operator chose must work. Returns the listeners, which report their addresses
/// as swarm events.
pub(super) fn listen(
    swarm: &mut Swarm<Behaviour>,
    config: &NetConfig,
) -> Result<HashSet<ListenerId>, NetError> {
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
                let fallback = defaults
                    .contains(addr)
                    .then(|| with_port_zero(addr))
                    .flatten();
                let Some(fallback) = fallback else {
                    return Err(NetError::Listen {
                        addr: addr.clone(),
                        source: e,
                    });
                };
                tracing::warn!(%addr, error = &e as &dyn std::error::Error, "default p2p port unavailable; using a free port");
                swarm
                    .listen_on(fallback)
                    .map_err(|source| NetError::Listen {
                        addr: addr.clone(),
                        source,
                    })?
            }
        };
        listeners.insert(listener);
    }
    Ok(listeners)
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

/// What this node says it is in identify: `shoal/<version>`, then ` site=<label>` if it has one.
fn agent_version(site: Option<&str>) -> String {
    let version = env!("CARGO_PKG_VERSION");
    match site {
        Some(site) => format!("shoal/{version} site={site}"),
        None => format!("shoal/{version}"),
    }
}

/// The site label in a peer's identify agent version, if any (at most 64 bytes, no spaces).
pub(super) fn site_of(agent_version: &str) -> Option<&str> {
    agent_version
        .strip_prefix("shoal/")?
        .split(' ')
        .find_map(|part| part.strip_prefix("site="))
        .filter(|site| !site.is_empty() && site.len() <= 64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_site_survives_the_trip_through_identify() {
        assert_eq!(site_of(&agent_version(Some("shop-17"))), Some("shop-17"));
        assert_eq!(site_of(&agent_version(None)), None);
    }

    #[test]
    fn site_labels_from_peers_are_bounded_and_only_from_shoal_nodes() {
        assert_eq!(site_of("shoal/0.1.0 site="), None);
        assert_eq!(site_of("rust-libp2p/0.57 site=a"), None);
        assert_eq!(
            site_of(&format!("shoal/0.1.0 site={}", "x".repeat(65))),
            None
        );
        let longest = "x".repeat(64);
        assert_eq!(
            site_of(&format!("shoal/0.1.0 other site={longest} more")),
            Some(longest.as_str())
        );
    }

    #[test]
    fn port_zero_replaces_tcp_and_udp_ports_only() {
        let tcp: Multiaddr = "/ip4/127.0.0.1/tcp/4001".parse().unwrap();
        let quic: Multiaddr = "/ip4/127.0.0.1/udp/4001/quic-v1".parse().unwrap();
        let memory: Multiaddr = "/memory/7".parse().unwrap();
        assert_eq!(
            with_port_zero(&tcp),
            Some("/ip4/127.0.0.1/tcp/0".parse().unwrap())
        );
        assert_eq!(
            with_port_zero(&quic),
            Some("/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap())
        );
        assert_eq!(with_port_zero(&memory), None);
    }

    #[test]
    fn a_held_tcp_port_is_seen_as_taken() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let addr: Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap();
        assert!(tcp_port_taken(&addr));
        drop(held);
        assert!(!tcp_port_taken(&addr));
        // Port 0 and non-TCP addresses are never "taken".
        assert!(!tcp_port_taken(&"/ip4/127.0.0.1/tcp/0".parse().unwrap()));
        assert!(!tcp_port_taken(
            &"/ip4/127.0.0.1/udp/1/quic-v1".parse().unwrap()
        ));
    }

    #[test]
    fn a_seeder_announces_under_a_key_of_its_own() {
        let d = Digest::sha256(b"x");
        assert_ne!(Holding::Part.record_key(&d), Holding::Whole.record_key(&d));
        assert_eq!(
            Holding::Part.record_key(&d).as_ref(),
            d.to_string().as_bytes()
        );
    }
}
