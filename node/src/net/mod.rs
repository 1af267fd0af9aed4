//! The libp2p side of a node.
//!
//! One event loop task owns the `Swarm`; everything else talks to it through a [`Network`]
//! handle (cheap to clone) over a bounded command channel, or opens chunk streams directly with
//! the `libp2p-stream` control the handle carries.
//!
//! - `handle`: the [`Network`] handle and the commands it sends.
//! - `event_loop`: the task that owns the swarm, and the tasks it starts.
//! - `behaviour`: the transports and behaviours, and how the node starts listening.
//! - `sync`: `/shoal/sync/3`, answering peers from the store, and anti-entropy.
//! - [`framing`]: length-prefixed frames and the request-response codec.
//! - [`chunk`]: `/shoal/chunk/1`, raw blob bytes between peers.
//! - [`conduct`]: strikes against misbehaving peers, and the bans they lead to.
//! - [`provider_store`]: the DHT's record store, with a share of it for each peer.
//! - [`peer_store`]: the peers of the last run, kept on disk and dialled at start.
//! - [`redial`]: which peers to dial again, and when (backoff).
//! - [`links`]: which connection to a peer carries its traffic (TCP when it has it).
//! - [`serve_log`]: which chunks of each whole blob this node is sending and has sent.
//! - [`tls`]: libp2p's TLS handshake, asking for AES-GCM first.
//!
//! Behaviours: identify and ping; Kademlia (`/shoal/kad/1`) for provider records, one per blob a
//! node holds; gossipsub on `shoal/tags/2` for signed tag records and fleet policies; mDNS for
//! peers on the LAN; request-response `/shoal/sync/3` for the membership handshake,
//! anti-entropy and `BlobIndex` look-ups; raw streams `/shoal/chunk/1` for blob bytes. Two more
//! guard the door: a block list (peers banned by [`conduct`]) and connection limits.
//!
//! Anti-entropy: when two nodes connect, each asks the other for a summary of its current
//! records and, when the summaries differ, pages through the other's records and ingests them,
//! so a node that was offline catches up without waiting for new gossip. The same exchange runs
//! with a random connected peer every [`NetConfig::sync_interval`], so a record that gossip lost
//! while nodes stayed connected still arrives.

mod behaviour;
pub mod chunk;
pub mod conduct;
mod event_loop;
pub mod framing;
mod handle;
pub mod links;
pub mod peer_store;
pub mod provider_store;
pub mod redial;
pub mod serve_log;
mod sync;
pub mod tls;

use std::time::Duration;

use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};

use crate::store::StoreError;
pub use handle::{MirrorAsk, Network, PrefetchAsk};

/// Timeout of one sync request.
const SYNC_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a provider look-up may take.
const PROVIDER_LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a node syncs its records with a random peer (see [`NetConfig::sync_interval`]).
pub const RECORD_SYNC_INTERVAL: Duration = Duration::from_secs(60);
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
    #[error("stream dropped before an answer")]
    Refused(#[source] std::io::Error),
    /// The peer broke the protocol; the text says how.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// A request this node was about to send breaks the protocol's limits (a bug here, not the
    /// peer's fault).
    #[error("refusing to send an invalid request")]
    BadRequest(#[source] shoal_protocol::message::MessageError),
    /// A sync request failed on its way (the connection closed, the peer does not speak the
    /// protocol, it timed out).
    #[error("sync request failed")]
    Request(#[from] libp2p::request_response::OutboundFailure),
    /// A chunk stream could not be opened.
    #[error("opening a chunk stream")]
    OpenStream(#[from] libp2p_stream::OpenStreamError),
    /// I/O on a stream failed.
    #[error("stream I/O")]
    Io(#[from] std::io::Error),
    /// Encoding or decoding failed.
    #[error("codec")]
    Codec(#[from] shoal_protocol::CodecError),
    /// The local store failed.
    #[error("store")]
    Store(#[from] StoreError),
    /// A task on the blocking pool failed.
    #[error("background task")]
    Task(#[from] tokio::task::JoinError),
    /// The node cannot listen on an address it was given.
    #[error("listening on {addr}")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// Why.
        source: libp2p::TransportError<std::io::Error>,
    },
    /// The swarm could not be built.
    #[error("setting up libp2p")]
    Setup(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl NetError {
    /// A failure to build the swarm.
    fn setup(e: impl std::error::Error + Send + Sync + 'static) -> NetError {
        NetError::Setup(Box::new(e))
    }
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
    /// Cap on the bytes per second this node serves to peers (for metered or slow links).
    pub serve_limit_bytes_per_sec: Option<u64>,
    /// The site this node is in (a label such as a datacenter or shop name), advertised to
    /// peers. Downloads fetch each chunk over the link to another site about once per site.
    /// `None`: the node takes every peer as local.
    pub site: Option<String>,
    /// How often the node compares its records with one connected peer picked at random, and
    /// catches up if they differ. Gossip can lose a record (a peer that was busy, a connection
    /// that closed with it queued); this bounds how long the loss lasts.
    pub sync_interval: Duration,
    /// The first and the longest wait before dialling an unreachable bootstrap peer again (see
    /// [`redial`]).
    pub redial_backoff: (Duration, Duration),
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
            serve_limit_bytes_per_sec: None,
            site: None,
            sync_interval: RECORD_SYNC_INTERVAL,
            redial_backoff: (redial::REDIAL_MIN, redial::REDIAL_MAX),
        }
    }
}

/// A connected peer, as `shoal peers` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerInfo {
    /// The peer id.
    #[serde(with = "peer_id_text")]
    pub peer_id: PeerId,
    /// Addresses known for the peer (its entries in the DHT routing table).
    pub addresses: Vec<String>,
    /// Remote addresses of the open connections (TCP is kept when the peer has it).
    #[serde(default)]
    pub connections: Vec<String>,
}

/// A peer id in its usual text form (`12D3KooW…`) in JSON.
mod peer_id_text {
    use libp2p::PeerId;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(id: &PeerId, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(id)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PeerId, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// The publisher key a peer id stands for: a node's peer id is its ed25519 key, inline.
/// `None` for a peer id of another kind of key (not a Shoal node).
pub fn publisher_of(peer: &PeerId) -> Option<shoal_protocol::PublisherKey> {
    let hash = peer.as_ref();
    if hash.code() != 0 {
        return None;
    }
    let key = libp2p::identity::PublicKey::try_decode_protobuf(hash.digest()).ok()?;
    let ed = key.try_into_ed25519().ok()?;
    shoal_protocol::PublisherKey::from_bytes(ed.to_bytes()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_info_keeps_its_json_form() {
        let peer = PeerId::random();
        let info = PeerInfo {
            peer_id: peer,
            addresses: vec!["/ip4/198.18.1.2/tcp/4001".into()],
            connections: Vec::new(),
        };
        let json = serde_json::to_value(&info).unwrap();
        assert_eq!(json["peer_id"], peer.to_string());
        assert_eq!(serde_json::from_value::<PeerInfo>(json).unwrap(), info);
        let bad = serde_json::json!({ "peer_id": "not a peer", "addresses": [] });
        assert!(serde_json::from_value::<PeerInfo>(bad).is_err());
    }

    #[test]
    fn a_peer_id_is_its_nodes_publisher_key() {
        let identity = crate::identity::Identity::from_seed([4; 32]);
        let peer = identity.keypair().public().to_peer_id();
        assert_eq!(publisher_of(&peer), Some(identity.publisher()));
        assert_eq!(publisher_of(&PeerId::random()), None);
    }

    #[test]
    fn the_default_config_listens_on_quic_and_tcp() {
        let config = NetConfig::default();
        assert_eq!(config.listen.len(), 2);
        assert!(config.listen.iter().all(|a| !a.is_empty()));
        assert_eq!(config.sync_interval, RECORD_SYNC_INTERVAL);
    }
}
