//! Seeders' serve reports, and how long a chunk every holder already gave away waits for the
//! copy to reach another peer (see *Seeders* in the [module documentation](super)).
//!
//! A report ([`Plan::on_peer_serves`]) replaces what the peer claims and, the first time a chunk
//! is claimed, records when. The wait is bounded ([`Plan::patience`]): a chunk sent waits a few
//! typical request times, one still being sent [`SENDING_PATIENCE`] times that, never more than
//! the request timeout; [`Plan::copy_deadline`] wakes the driver when a wait ends, so a copy that
//! never reaches this node's peers is fetched all the same.

use std::fmt::Debug;
use std::hash::Hash;
use std::time::Duration;

use super::{Bitfield, Plan};

/// How many patience periods a chunk a holder is still sending waits before it is asked of a
/// holder anyway: the transfer under way is likely to finish before then.
const SENDING_PATIENCE: u32 = 8;

impl<P: Clone + Eq + Hash + Ord + Debug> Plan<P> {
    /// A peer's report of what it is sending and has sent: replaces its previous claims, which
    /// count only while it holds the chunk. The first claim of each chunk starts its wait.
    pub(super) fn on_peer_serves(
        &mut self,
        peer: P,
        sending: Bitfield,
        sent: Bitfield,
        now: Duration,
    ) {
        let n = self.chunk_count;
        if self.entry(peer.clone()).banned {
            return;
        }
        if !self.counts.claims_counted() {
            self.counts.count_claims(n);
            self.sent_seen = vec![None; n as usize];
            self.sending_seen = vec![None; n as usize];
        }
        let mut claimed = Bitfield::new(n);
        for (bits, seen) in [
            (&sending, &mut self.sending_seen),
            (&sent, &mut self.sent_seen),
        ] {
            if bits.len() != n {
                continue;
            }
            for chunk in bits.iter_ones() {
                claimed.set(chunk);
                if let Some(first @ None) = seen.get_mut(chunk as usize) {
                    *first = Some(now);
                }
            }
        }
        self.withdraw(&peer);
        self.entry(peer.clone()).claimed = claimed;
        self.contribute(&peer);
    }

    /// How long a chunk every holder already gave away waits for a copy elsewhere: three
    /// typical request times (the moving average; before any request completed, the age of the
    /// oldest one outstanding), at least
    /// [`PlanConfig::serve_patience`](super::PlanConfig::serve_patience) and at most half the
    /// request timeout. The cap keeps the wait finite when requests stall: a patience that grew
    /// with the age of a stuck request would never run out.
    pub(super) fn patience(&self, now: Duration) -> Duration {
        let typical = self.chunk_time.unwrap_or_else(|| {
            self.peers
                .values()
                .flat_map(|peer| peer.in_flight.values())
                .map(|&issued| now.saturating_sub(issued))
                .max()
                .unwrap_or(Duration::ZERO)
        });
        self.bound_patience(typical.saturating_mul(3))
    }

    /// How long a chunk a holder is sending waits: [`SENDING_PATIENCE`] times `patience`, at
    /// most the request timeout.
    fn sending_patience(&self, patience: Duration) -> Duration {
        patience
            .saturating_mul(SENDING_PATIENCE)
            .min(self.config.request_timeout.max(patience))
    }

    /// `patience` within [`PlanConfig::serve_patience`](super::PlanConfig::serve_patience) and
    /// half the request timeout.
    fn bound_patience(&self, patience: Duration) -> Duration {
        let floor = self.config.serve_patience;
        patience.min(self.config.request_timeout / 2).max(floor)
    }

    /// Whether `chunk` should not be requested yet because every usable holder says it has sent
    /// it, or is sending it, to another peer: that peer will serve it soon, so asking a holder
    /// again would spend its uplink (a seeder's, usually the fleet's bottleneck) on a duplicate.
    /// The wait ends `patience` after a holder first said it had sent the chunk, or
    /// [`SENDING_PATIENCE`] times that after a holder first said it was sending it, so a copy
    /// that never reaches this node's peers is fetched all the same.
    ///
    /// A holder that still has chunks this node misses and that it has given to no one (the
    /// publisher of a rollout, until every chunk has left it once) is not asked for a chunk it
    /// gave away however long the wait: its uplink carries what nobody else has, and this node
    /// has those chunks to ask of it meanwhile, so the wait never stalls the download.
    /// `fresh_seeders` are those holders ([`Plan::fresh_seeders`]).
    pub(super) fn waits_for_copy(
        &self,
        chunk: u32,
        now: Duration,
        patience: Duration,
        fresh_seeders: &[usize],
    ) -> bool {
        let i = chunk as usize;
        let Some(claimed) = self.counts.claimed(chunk) else {
            return false;
        };
        if claimed == 0 || claimed < self.counts.holders(chunk) {
            return false;
        }
        if fresh_seeders.iter().any(|&peer| {
            let state = self.peers.state(peer);
            state.have.get(chunk) && state.claimed.get(chunk)
        }) {
            return true;
        }
        let over = |seen: &[Option<Duration>], wait: Duration| {
            seen.get(i)
                .copied()
                .flatten()
                .is_some_and(|t| now >= t.saturating_add(wait))
        };
        !(over(&self.sent_seen, patience)
            || over(&self.sending_seen, self.sending_patience(patience)))
    }

    /// The usable peers, by index, that gave some chunk away and still hold a chunk this node
    /// misses that they have not given away: their uplink is kept for those (see
    /// [`Plan::waits_for_copy`]). Empty, and nothing computed, until some peer reported.
    pub(super) fn fresh_seeders(&self) -> Vec<usize> {
        let mut out = Vec::new();
        if !self.counts.claims_counted() {
            return out;
        }
        let max_strikes = self.config.max_strikes;
        for (index, state) in self.peers.values().enumerate() {
            if state.claimed.count_ones() == 0 || !state.usable(max_strikes) {
                continue;
            }
            let mut spent = state.claimed.clone();
            spent.union_with(&self.held);
            if state.have.has_any_not_in(&spent) {
                out.push(index);
            }
        }
        out
    }

    /// The earliest moment after the latest call a chunk waiting for a copy may stop waiting (a
    /// lower bound: the patience only grows with time). Chunks whose wait is over already need
    /// no deadline: they are requested as soon as a slot frees, which is an event.
    pub(super) fn copy_deadline(&self) -> Option<Duration> {
        if !self.counts.claims_counted() {
            return None;
        }
        let patience =
            self.bound_patience(self.chunk_time.unwrap_or(Duration::ZERO).saturating_mul(3));
        self.held
            .iter_zeros()
            .filter(|chunk| {
                !self.requested(*chunk)
                    && self.counts.holders(*chunk) > 0
                    && self.counts.claimed(*chunk) == Some(self.counts.holders(*chunk))
            })
            .filter_map(|chunk| {
                let i = chunk as usize;
                let sent = self.sent_seen.get(i).copied().flatten();
                let sending = self.sending_seen.get(i).copied().flatten();
                let a = sent.map(|t| t.saturating_add(patience));
                let b = sending.map(|t| t.saturating_add(self.sending_patience(patience)));
                a.into_iter().chain(b).min()
            })
            .filter(|&at| at > self.clock)
            .min()
    }
}
