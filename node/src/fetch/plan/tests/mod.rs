//! The plan's tests, one file per area of the policy, and the helpers they share: a default
//! configuration with a fixed seed, events in one call, and [`Plan::assert_consistent`], which
//! checks the incremental bookkeeping against a recount.

use super::*;

mod bitfield;
mod endgame;
mod order;
mod pipeline;
mod proptests;
mod seeders;
mod simulation;
mod sites;
mod strikes;

const CHUNK: u64 = 4 << 20;
const T0: Duration = Duration::ZERO;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn ms(m: u64) -> Duration {
    Duration::from_millis(m)
}

/// The default configuration with a fixed seed, and every peer's base at
/// `max_in_flight_per_peer` however many peers there are (most tests count requests per peer;
/// the pipeline's spreading has tests of its own).
fn config() -> PlanConfig {
    PlanConfig {
        seed: 7,
        pipeline: usize::MAX,
        ..PlanConfig::default()
    }
}

fn bits(len: u32, ones: impl IntoIterator<Item = u32>) -> Bitfield {
    let mut b = Bitfield::new(len);
    for i in ones {
        b.set(i);
    }
    b
}

fn requests(actions: &[Action<u32>]) -> Vec<(u32, u32)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Request { peer, chunk } => Some((*peer, *chunk)),
            _ => None,
        })
        .collect()
}

fn has(plan: &mut Plan<u32>, peer: u32, have: Bitfield) {
    plan.handle(Event::PeerHas { peer, have }, T0);
}

fn done(plan: &mut Plan<u32>, peer: u32, chunk: u32, now: Duration) {
    plan.handle(
        Event::ChunkDone {
            peer,
            chunk,
            bytes: CHUNK,
        },
        now,
    );
}

fn count_for(reqs: &[(u32, u32)], peer: u32) -> usize {
    reqs.iter().filter(|(p, _)| *p == peer).count()
}

impl<P: Clone + Eq + Hash + Ord + Debug> Plan<P> {
    /// Recomputes the incremental bookkeeping from scratch and compares.
    fn assert_consistent(&self) {
        let max_strikes = self.config.max_strikes;
        let mut avail = vec![0u32; self.chunk_count as usize];
        let mut requesters = vec![0u32; self.chunk_count as usize];
        for state in self.peers.values() {
            if state.usable(max_strikes) {
                for c in state.have.iter_ones() {
                    avail[c as usize] += 1;
                }
            } else {
                assert!(state.in_flight.is_empty(), "unusable peer with requests");
            }
            assert_eq!(state.busy_since.is_some(), !state.in_flight.is_empty());
            for (&c, _) in state.in_flight.iter() {
                assert!(!self.held.get(c), "request for held chunk {c}");
                requesters[c as usize] += 1;
            }
        }
        let (counted, counted_local, counted_claimed, counted_claimed_local) =
            self.counts.by_chunk();
        assert_eq!(avail, counted);
        let mut avail_local = vec![0u32; self.chunk_count as usize];
        let mut remote_in_flight = 0;
        for state in self.peers.values() {
            if state.remote {
                remote_in_flight += state.in_flight.len();
            } else if state.usable(max_strikes) {
                for c in state.have.iter_ones() {
                    avail_local[c as usize] += 1;
                }
            }
        }
        assert_eq!(avail_local, counted_local);
        if self.counts.claims_counted() {
            let mut claimed = vec![0u32; self.chunk_count as usize];
            let mut claimed_local = vec![0u32; self.chunk_count as usize];
            for state in self.peers.values() {
                if state.usable(max_strikes) {
                    for c in state.have.iter_ones() {
                        claimed[c as usize] += u32::from(state.claimed.get(c));
                        claimed_local[c as usize] +=
                            u32::from(state.claimed.get(c) && !state.remote);
                    }
                }
            }
            assert_eq!(claimed_local, counted_claimed_local);
            assert_eq!(claimed, counted_claimed);
        }
        assert_eq!(remote_in_flight, self.remote_in_flight);
        assert_eq!(requesters, self.requesters);
        assert_eq!(
            requesters.iter().map(|&n| n as usize).sum::<usize>(),
            self.total_in_flight
        );
        assert_eq!(self.missing, self.chunk_count - self.held.count_ones());
    }
}
