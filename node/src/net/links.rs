//! Which connections to a peer carry its traffic: TCP when the peer has it.
//!
//! A node listens on QUIC and on TCP by default, so two nodes often hold one connection of each
//! kind: each address given with `--peer` is dialled, mDNS reports every address it hears, and
//! a peer id is dialled at all its known addresses at once, where QUIC, with fewer round trips
//! to set up, usually wins. Streams then go over one connection or the other at random
//! (libp2p-stream picks a connection per stream), and over QUIC a byte costs more CPU: libp2p's
//! QUIC does its packet work in user space, a datagram at a time, and offers ChaCha20 first,
//! where TCP has the kernel's segmentation offload and TLS with AES-GCM ([`super::tls`]). On a
//! CPU-bound host a rollout over both transports was measurably slower than over TCP alone
//! (the swarm benchmark, '"TCP kept when a peer listens on both"' in `tests/bench/RESULTS.md`).
//!
//! So a node keeps TCP when it can:
//! - a TCP connection to a peer closes that peer's QUIC connections, and so does a QUIC
//!   connection to a peer already reached over TCP (after a grace period, so that nothing
//!   queued on them is lost, and followed by a sync);
//! - a node that dialled a peer over QUIC, and then hears (identify) that the peer listens on
//!   TCP at the same IP address, dials that TCP address, once.
//!
//! A peer that offers only QUIC keeps its QUIC connection. [`Links`] decides, the event loop
//! acts; it does no I/O.

use std::collections::{HashMap, HashSet};

use libp2p::multiaddr::Protocol;
use libp2p::swarm::ConnectionId;
use libp2p::{Multiaddr, PeerId};

/// A connection's transport, as far as the choice between them goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// QUIC.
    Quic,
    /// TCP (with TLS or noise, and yamux).
    Tcp,
    /// Anything else (the in-memory transport of the tests): left alone.
    Other,
}

impl Kind {
    /// The transport of a connection to or from `addr`.
    pub fn of(addr: &Multiaddr) -> Kind {
        let mut kind = Kind::Other;
        for p in addr {
            match p {
                Protocol::Quic | Protocol::QuicV1 => return Kind::Quic,
                Protocol::Tcp(_) => kind = Kind::Tcp,
                _ => {}
            }
        }
        kind
    }
}

#[derive(Debug)]
struct Link {
    id: ConnectionId,
    kind: Kind,
    dialer: bool,
    remote: Multiaddr,
}

/// The open connections of every peer, and which to close or add.
#[derive(Debug, Default)]
pub struct Links {
    peers: HashMap<PeerId, Vec<Link>>,
    /// Peers already dialled over TCP in place of QUIC (until they disconnect).
    upgraded: HashSet<PeerId>,
}

impl Links {
    /// Records a new connection. Returns the connections of `peer` to close: its QUIC ones when
    /// this one is TCP, or this one when it is QUIC and the peer is reached over TCP already.
    pub fn established(
        &mut self,
        peer: PeerId,
        id: ConnectionId,
        remote: &Multiaddr,
        dialer: bool,
    ) -> Vec<ConnectionId> {
        let kind = Kind::of(remote);
        let has_tcp = self.has_tcp(&peer);
        let links = self.peers.entry(peer).or_default();
        let close = match kind {
            Kind::Tcp => links
                .iter()
                .filter(|l| l.kind == Kind::Quic)
                .map(|l| l.id)
                .collect(),
            Kind::Quic if has_tcp => vec![id],
            _ => Vec::new(),
        };
        links.push(Link {
            id,
            kind,
            dialer,
            remote: remote.clone(),
        });
        close
    }

    /// Forgets a closed connection.
    pub fn closed(&mut self, peer: &PeerId, id: ConnectionId) {
        let Some(links) = self.peers.get_mut(peer) else {
            return;
        };
        links.retain(|l| l.id != id);
        if links.is_empty() {
            self.peers.remove(peer);
            self.upgraded.remove(peer);
        }
    }

    /// The TCP addresses to dial `peer` at, given the addresses it says it listens on: those
    /// at the IP address of a QUIC connection this node dialled to it, when it has no TCP
    /// connection and was not dialled over TCP this way before. Empty otherwise.
    pub fn tcp_to_dial(&mut self, peer: PeerId, listen_addrs: &[Multiaddr]) -> Vec<Multiaddr> {
        if self.upgraded.contains(&peer) || self.has_tcp(&peer) {
            return Vec::new();
        }
        let Some(links) = self.peers.get(&peer) else {
            return Vec::new();
        };
        let ips: Vec<Protocol<'_>> = links
            .iter()
            .filter(|l| l.kind == Kind::Quic && l.dialer)
            .filter_map(|l| l.remote.iter().next())
            .collect();
        let addrs: Vec<Multiaddr> = listen_addrs
            .iter()
            .filter(|a| Kind::of(a) == Kind::Tcp)
            .filter(|a| a.iter().next().is_some_and(|ip| ips.contains(&ip)))
            .cloned()
            .collect();
        if !addrs.is_empty() {
            self.upgraded.insert(peer);
        }
        addrs
    }

    /// Whether `peer` has an open TCP connection.
    pub fn has_tcp(&self, peer: &PeerId) -> bool {
        self.peers
            .get(peer)
            .is_some_and(|links| links.iter().any(|l| l.kind == Kind::Tcp))
    }

    /// The remote addresses of `peer`'s open connections.
    pub fn connections(&self, peer: &PeerId) -> Vec<String> {
        self.peers
            .get(peer)
            .map(|links| links.iter().map(|l| l.remote.to_string()).collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Multiaddr {
        s.parse().expect("multiaddr")
    }

    const QUIC: &str = "/ip4/198.18.1.2/udp/4001/quic-v1";
    const TCP: &str = "/ip4/198.18.1.2/tcp/4001";

    #[test]
    fn kinds() {
        assert_eq!(Kind::of(&addr(QUIC)), Kind::Quic);
        assert_eq!(Kind::of(&addr(TCP)), Kind::Tcp);
        assert_eq!(Kind::of(&addr("/memory/7")), Kind::Other);
    }

    #[test]
    fn tcp_closes_the_quic_connections_of_its_peer_only() {
        let mut links = Links::default();
        let (p, q) = (PeerId::random(), PeerId::random());
        let (a, b, c, d) = (
            ConnectionId::new_unchecked(1),
            ConnectionId::new_unchecked(2),
            ConnectionId::new_unchecked(3),
            ConnectionId::new_unchecked(4),
        );
        assert!(links.established(p, a, &addr(QUIC), true).is_empty());
        assert!(links.established(q, b, &addr(QUIC), true).is_empty());
        assert_eq!(links.established(p, c, &addr(TCP), false), vec![a]);
        // A QUIC connection to a peer reached over TCP is closed on arrival.
        assert_eq!(links.established(p, d, &addr(QUIC), false), vec![d]);
        links.closed(&p, a);
        links.closed(&p, d);
        assert_eq!(links.connections(&p), vec![TCP.to_owned()]);
        assert_eq!(links.connections(&q), vec![QUIC.to_owned()]);
        assert!(links.has_tcp(&p) && !links.has_tcp(&q));
        // The TCP connection gone, a QUIC one due to be closed for it is kept.
        links.established(p, a, &addr(QUIC), true);
        links.closed(&p, c);
        assert!(!links.has_tcp(&p));
    }

    #[test]
    fn a_peer_dialled_over_quic_is_dialled_over_tcp_at_the_same_ip_once() {
        let mut links = Links::default();
        let p = PeerId::random();
        let id = ConnectionId::new_unchecked(1);
        links.established(p, id, &addr(QUIC), true);
        let listen = [
            addr(QUIC),
            addr("/ip4/127.0.0.1/tcp/4001"),
            addr(TCP),
            addr("/ip4/198.18.9.9/tcp/4001"),
        ];
        assert_eq!(links.tcp_to_dial(p, &listen), vec![addr(TCP)]);
        // Identify repeats itself; the dial is not.
        assert!(links.tcp_to_dial(p, &listen).is_empty());
        // After a disconnection, a new QUIC connection may be upgraded again.
        links.closed(&p, id);
        links.established(p, id, &addr(QUIC), true);
        assert_eq!(links.tcp_to_dial(p, &listen), vec![addr(TCP)]);
    }

    #[test]
    fn no_tcp_dial_when_not_needed_or_not_ours_to_make() {
        let mut links = Links::default();
        let listen = [addr(QUIC), addr(TCP)];
        // Unknown peer.
        assert!(links.tcp_to_dial(PeerId::random(), &listen).is_empty());
        // The peer dialled us: it upgrades, we do not (we may not reach it).
        let p = PeerId::random();
        links.established(p, ConnectionId::new_unchecked(1), &addr(QUIC), false);
        assert!(links.tcp_to_dial(p, &listen).is_empty());
        // Reached over TCP already.
        let q = PeerId::random();
        links.established(q, ConnectionId::new_unchecked(2), &addr(QUIC), true);
        links.established(q, ConnectionId::new_unchecked(3), &addr(TCP), false);
        assert!(links.tcp_to_dial(q, &listen).is_empty());
        // A peer that listens only on QUIC keeps QUIC.
        let r = PeerId::random();
        links.established(r, ConnectionId::new_unchecked(4), &addr(QUIC), true);
        assert!(links.tcp_to_dial(r, &[addr(QUIC)]).is_empty());
    }
}
