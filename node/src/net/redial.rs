//! Which peers to dial again, and when: a fleet heals by itself.
//!
//! A node keeps two kinds of targets. Configured ones (`--peer`, the fleet's bootstrap
//! addresses) are dialled while the node is not connected to them, whether their peer is not up
//! yet or went away. Remembered ones (the [`peer_store`](super::peer_store) of the last run) are
//! dialled at start and then only while the node has no peer at all: once it is in the fleet,
//! the DHT and gossip find the rest. After each attempt a target waits its backoff, which starts
//! at the minimum, doubles up to the maximum, is jittered so that a fleet restarted at once does
//! not dial in lockstep, and starts over once the target is connected.
//!
//! Sans-IO: the event loop tells it what happened and asks it what to dial.

use std::time::{Duration, Instant};

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use rand::Rng;

/// The first wait before dialling a target again.
pub const REDIAL_MIN: Duration = Duration::from_secs(1);
/// The longest wait.
pub const REDIAL_MAX: Duration = Duration::from_secs(60);
/// Most targets (configured ones, then remembered ones).
const MAX_TARGETS: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Configured,
    Remembered,
}

#[derive(Debug)]
struct Target {
    /// The address, without a `/p2p` suffix.
    addr: Multiaddr,
    /// The peer there, once known (from the address, or from a connection).
    peer: Option<PeerId>,
    kind: Kind,
    backoff: Duration,
    next: Instant,
}

/// The dial targets and their backoffs.
#[derive(Debug)]
pub struct Redial {
    targets: Vec<Target>,
    min: Duration,
    max: Duration,
}

/// An address without its trailing `/p2p/<peer>`, and that peer.
fn split(addr: &Multiaddr) -> (Multiaddr, Option<PeerId>) {
    let mut addr = addr.clone();
    let peer = match addr.iter().last() {
        Some(Protocol::P2p(peer)) => {
            addr.pop();
            Some(peer)
        }
        _ => None,
    };
    (addr, peer)
}

impl Redial {
    /// No targets yet; backoffs from `min` doubling to `max`.
    pub fn new(min: Duration, max: Duration) -> Redial {
        let min = min.max(Duration::from_millis(10));
        Redial {
            targets: Vec::new(),
            min,
            max: max.max(min),
        }
    }

    /// The shortest backoff (the event loop looks this often).
    pub fn min(&self) -> Duration {
        self.min
    }

    /// Adds a configured address (it may end in `/p2p/<peer>`), due at once.
    pub fn configured(&mut self, addr: &Multiaddr, now: Instant) {
        let (addr, peer) = split(addr);
        self.add(addr, peer, Kind::Configured, now);
    }

    /// Adds a remembered peer's address, due at once.
    pub fn remembered(&mut self, peer: PeerId, addr: &Multiaddr, now: Instant) {
        let (addr, _) = split(addr);
        self.add(addr, Some(peer), Kind::Remembered, now);
    }

    fn add(&mut self, addr: Multiaddr, peer: Option<PeerId>, kind: Kind, now: Instant) {
        if self.targets.len() >= MAX_TARGETS || self.targets.iter().any(|t| t.addr == addr) {
            return;
        }
        self.targets.push(Target {
            addr,
            peer,
            kind,
            backoff: self.min,
            next: now,
        });
    }

    /// Whether there is any target at all.
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    /// A connection to `peer` at `remote` was established: a target at that address learns its
    /// peer, and every target of that peer starts its backoff over.
    pub fn connected(&mut self, peer: PeerId, remote: &Multiaddr, now: Instant) {
        let (remote, _) = split(remote);
        for t in &mut self.targets {
            if t.peer.is_none() && t.addr == remote {
                t.peer = Some(peer);
            }
            if t.peer == Some(peer) {
                t.backoff = self.min;
                t.next = now;
            }
        }
    }

    /// The addresses to dial now. `connected` says whether a peer is connected, `skip` whether a
    /// peer must not be dialled (banned, refused); `alone` whether the node has no peer.
    pub fn due(
        &mut self,
        now: Instant,
        alone: bool,
        connected: impl Fn(&PeerId) -> bool,
        skip: impl Fn(&PeerId) -> bool,
    ) -> Vec<Multiaddr> {
        let mut rng = rand::rng();
        let mut out = Vec::new();
        for t in &mut self.targets {
            if t.peer.as_ref().is_some_and(&connected) {
                t.backoff = self.min;
                t.next = now;
                continue;
            }
            if now < t.next
                || t.peer.as_ref().is_some_and(&skip)
                || (t.kind == Kind::Remembered && !alone)
            {
                continue;
            }
            out.push(match t.peer {
                Some(peer) => t.addr.clone().with(Protocol::P2p(peer)),
                None => t.addr.clone(),
            });
            let wait = t.backoff.mul_f64(rng.random_range(0.75..=1.25));
            t.next = now + wait;
            t.backoff = t.backoff.saturating_mul(2).min(self.max);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(n: u16) -> Multiaddr {
        format!("/ip4/198.18.0.1/tcp/{n}").parse().unwrap()
    }

    #[test]
    fn an_unreachable_bootstrap_peer_is_dialled_again_with_growing_waits() {
        let t0 = Instant::now();
        let mut redial = Redial::new(Duration::from_secs(1), Duration::from_secs(8));
        redial.configured(&addr(1), t0);
        let never = |_: &PeerId| false;
        let mut attempts = Vec::new();
        for ms in (0..60_000).step_by(100) {
            let now = t0 + Duration::from_millis(ms);
            if !redial.due(now, true, never, never).is_empty() {
                attempts.push(ms);
            }
        }
        // 0, then waits of about 1, 2, 4 and then 8 s (each within a quarter either way).
        assert_eq!(attempts[0], 0);
        let waits: Vec<u64> = attempts.windows(2).map(|w| w[1] - w[0]).collect();
        for (i, wait) in waits.iter().enumerate() {
            let nominal = 1000u64 << i.min(3);
            assert!(
                *wait >= nominal * 3 / 4 && *wait <= nominal * 5 / 4 + 100,
                "wait {i} was {wait} ms, nominal {nominal}"
            );
        }
        assert!(attempts.len() >= 8, "{attempts:?}");
    }

    #[test]
    fn a_connected_target_is_left_alone_and_redialled_as_soon_as_it_goes() {
        let t0 = Instant::now();
        let mut redial = Redial::new(Duration::from_secs(1), Duration::from_secs(60));
        let peer = PeerId::random();
        redial.configured(&addr(1), t0);
        assert_eq!(redial.due(t0, true, |_| false, |_| false), vec![addr(1)]);
        redial.connected(peer, &addr(1), t0);
        let t1 = t0 + Duration::from_secs(30);
        assert!(redial.due(t1, false, |_| true, |_| false).is_empty());
        // It went away: dialled at once, with its peer id.
        let t2 = t1 + Duration::from_millis(1);
        assert_eq!(
            redial.due(t2, true, |_| false, |_| false),
            vec![addr(1).with(Protocol::P2p(peer))]
        );
        // A banned peer is not dialled.
        let t3 = t2 + Duration::from_secs(10);
        assert!(redial.due(t3, true, |_| false, |_| true).is_empty());
    }

    #[test]
    fn remembered_peers_are_dialled_only_while_alone() {
        let t0 = Instant::now();
        let mut redial = Redial::new(Duration::from_secs(1), Duration::from_secs(60));
        let peer = PeerId::random();
        redial.remembered(peer, &addr(2), t0);
        assert!(redial.due(t0, false, |_| false, |_| false).is_empty());
        assert_eq!(redial.due(t0, true, |_| false, |_| false).len(), 1);
        assert!(!redial.is_empty());
    }
}
