//! The scheduling pass: which chunks to ask of which peers now, within every cap.
//!
//! [`Plan::schedule`] runs after the plan has taken in the events and expired the requests that
//! timed out. It goes in phases, each a function named for what it does:
//!
//! 1. [`Plan::find_spare_slots`]: the usable peers that are not resting and have room below their
//!    limit, and how much.
//! 2. [`Plan::collect_fresh`]: the missing chunks not in flight that one of those peers holds and
//!    that do not wait for a copy; and whether any missing chunk is left unrequested (which
//!    holds endgame back).
//! 3. [`Plan::order_head`]: the first fresh chunks in scheduling order, as many as the global cap
//!    allows, without keying or sorting the rest.
//! 4. [`Plan::request_fresh`]: each fresh chunk in that order goes to the holder expected to
//!    deliver it soonest, a local one when a local peer holds it, a remote one only by the gateway
//!    that owns it ([`Plan::request_fresh_chunk`]).
//! 5. [`Plan::request_duplicates`]: endgame, when every chunk that can be requested is in
//!    flight, duplicates of the oldest requests.
//!
//! The vectors a pass fills chunk by chunk are kept between calls, in [`Scratch`], so that a call,
//! which comes with every event, does not allocate them again.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::hash::Hash;
use std::time::Duration;

use super::sites::{WanAccess, stripe_owner};
use super::{Action, Bitfield, GOLDEN_GAMMA, Plan, mix};

/// A chunk's place in the scheduling order (least first); see [`Plan::schedule`].
type ChunkKey = (u64, u32, u64, u64);

/// The scheduling pass's working vectors, kept between calls so that a pass allocates nothing.
#[derive(Debug, Clone, Default)]
pub(super) struct Scratch {
    /// Peers with a free slot, by index in [`Plan::peers`], and how many slots.
    spare: Vec<(usize, usize)>,
    fresh: Vec<u32>,
    order: Vec<(ChunkKey, u32)>,
}

/// What one pass works with: fixed at its start, but for the room left, which every request it
/// makes uses up.
struct Pass<'a, P> {
    now: Duration,
    /// The lower median of the usable peers' rates, to compare peers by.
    median: Option<u64>,
    /// Requests the global cap still allows.
    global: usize,
    /// Peers with a free slot, by index in `self.peers` (no peer is added before the end), with
    /// their number of free slots.
    spare: &'a mut Vec<(usize, usize)>,
    /// The requests made, for the driver.
    out: &'a mut Vec<Action<P>>,
}

impl<P> Pass<'_, P> {
    /// Whether the pass can make no more requests.
    fn full(&self) -> bool {
        self.global == 0 || self.spare.is_empty()
    }
}

impl<P: Clone + Eq + Hash + Ord + Debug> Plan<P> {
    /// Adds to `out` the requests to make now.
    pub(super) fn schedule(&mut self, now: Duration, out: &mut Vec<Action<P>>) {
        let mut scratch = std::mem::take(&mut self.scratch);
        self.schedule_in(now, out, &mut scratch);
        self.scratch = scratch;
    }

    /// The pass itself, with the working vectors taken out of `self`.
    fn schedule_in(&mut self, now: Duration, out: &mut Vec<Action<P>>, scratch: &mut Scratch) {
        if self.missing == 0 {
            return;
        }
        let global = self
            .config
            .max_in_flight
            .saturating_sub(self.total_in_flight);
        if global == 0 {
            return;
        }
        let median = self.median_rate();
        let Scratch {
            spare,
            fresh,
            order,
        } = scratch;
        self.find_spare_slots(median, spare);
        if spare.is_empty() {
            return;
        }
        let wan = self.wan_access(now);
        let mut all_requested = self.collect_fresh(now, spare, &wan, fresh);
        let head = global.min(fresh.len());
        self.order_head(fresh, head, &wan, order);
        let mut pass = Pass {
            now,
            median,
            global,
            spare,
            out,
        };
        all_requested &= self.request_fresh(&mut pass, &wan, fresh, head, order);
        if all_requested {
            self.request_duplicates(&mut pass);
        }
    }

    /// Fills `spare` with the usable peers that are not resting after "busy" and have fewer
    /// requests outstanding than their limit, by index in `self.peers`, with how many more each
    /// may be sent.
    fn find_spare_slots(&self, median: Option<u64>, spare: &mut Vec<(usize, usize)>) {
        let base = self.base_limit();
        let max_strikes = self.config.max_strikes;
        spare.clear();
        spare.extend(
            self.peers
                .values()
                .enumerate()
                .filter(|(_, state)| state.usable(max_strikes) && state.rest_until.is_none())
                .filter_map(|(peer, state)| {
                    let free = state
                        .limit(base, median)
                        .saturating_sub(state.in_flight.len());
                    (free > 0).then_some((peer, free))
                }),
        );
    }

    /// Fills `fresh` with the missing chunks not in flight that a peer with a free slot holds and
    /// that do not wait for a copy, in index order. Returns false if some other missing chunk is
    /// not in flight either (chunks another gateway of the site fetches aside): endgame waits.
    fn collect_fresh(
        &self,
        now: Duration,
        spare: &[(usize, usize)],
        wan: &WanAccess,
        fresh: &mut Vec<u32>,
    ) -> bool {
        // Fresh chunks: missing, not in flight, held by someone usable, and not waiting for a
        // copy a holder already sent elsewhere. Endgame waits until every missing chunk is in
        // flight (or another downloader of this site fetches it), not merely every available one:
        // in a rollout few chunks are available at any moment, and duplicating those would
        // spend uplinks on copies nobody needs.
        //
        // Only chunks some peer with a free slot holds can be assigned now; the others are
        // left out before the sort (in a large fleet they are most of them, and a call comes
        // with every chunk that arrives). A chunk left out here is one `pick_peer` finds no
        // peer for, so it counts against `all_requested` exactly as it would in the loop.
        let mut reachable = Bitfield::new(self.chunk_count);
        for &(peer, _) in spare {
            // The count is kept in the peer's state; the words are elsewhere on the heap.
            let state = self.peers.state(peer);
            if state.have.count_ones() > 0 {
                reachable.union_with(&state.have);
            }
        }
        let mut all_requested = true;
        let patience = self.patience(now);
        let fresh_seeders = self.fresh_seeders();
        fresh.clear();
        for chunk in self.held.iter_zeros() {
            if self.requested(chunk) {
                continue;
            }
            if self.counts.holders(chunk) == 0
                || self.waits_for_copy(chunk, now, patience, &fresh_seeders)
            {
                all_requested = false;
            } else if reachable.get(chunk) {
                fresh.push(chunk);
            } else if all_requested && (self.counts.local_holders(chunk) > 0 || wan.owns(chunk)) {
                all_requested = false;
            }
        }
        all_requested
    }

    /// Fills `order` with the first `head` of `fresh` in scheduling order, with their keys.
    fn order_head(
        &self,
        fresh: &[u32],
        head: usize,
        wan: &WanAccess,
        order: &mut Vec<(ChunkKey, u32)>,
    ) {
        let stripe = wan.stripe();
        // In order of the key, least first (keys are distinct). The loop mostly stops after a
        // few chunks (the slots run out) and there may be hundreds of them, so one pass keeps
        // only the first `global` in order; a chunk whose first two parts of the key (window and
        // availability) already lose to the last of those is passed over without the rest of
        // its key, which in a rollout is most of them (rarest first: few chunks share the
        // least availability; where all tie, as with one seeder, each costs a full key and an
        // insertion into a few). The rest are keyed and sorted only if the loop gets that far.
        order.clear();
        for &chunk in fresh {
            if let Some(&((window, avail, ..), _)) = order.get(head.wrapping_sub(1)) {
                if (self.window_key(chunk), self.counts.holders(chunk)) > (window, avail) {
                    continue;
                }
            }
            let entry = self.chunk_key(chunk, stripe);
            let at = order.partition_point(|e| *e < entry);
            if at < head {
                order.truncate(head - 1);
                order.insert(at, entry);
            }
        }
    }

    /// Requests the fresh chunks in scheduling order while slots last, `order` holding the first
    /// `head` of them. Returns whether every one was requested or left to another gateway of the
    /// site: only then may endgame start.
    fn request_fresh(
        &mut self,
        pass: &mut Pass<'_, P>,
        wan: &WanAccess,
        fresh: &[u32],
        head: usize,
        order: &mut Vec<(ChunkKey, u32)>,
    ) -> bool {
        let mut all_requested = true;
        for i in 0..fresh.len() {
            if pass.full() {
                return false;
            }
            if i == head {
                // Past the first `global` with slots left: the rest, in order (the first ones
                // are the same).
                let stripe = wan.stripe();
                order.clear();
                order.extend(fresh.iter().map(|&chunk| self.chunk_key(chunk, stripe)));
                order.sort_unstable();
            }
            let Some(&(_, chunk)) = order.get(i) else {
                break;
            };
            all_requested &= self.request_fresh_chunk(chunk, pass, wan);
        }
        all_requested
    }

    /// Requests `chunk` of a local holder if any local peer holds it, else of a remote holder if
    /// this node is the gateway that owns it and has remote requests to spare. Returns false if
    /// it stays unrequested for want of a holder with a slot, which holds endgame back.
    fn request_fresh_chunk(&mut self, chunk: u32, pass: &mut Pass<'_, P>, wan: &WanAccess) -> bool {
        if self.counts.local_holders(chunk) > 0 {
            return self.request_from(chunk, pass, false);
        }
        if !wan.owns(chunk) {
            // Another downloader of this site brings it over the WAN; it is not ours to wait
            // for, so it does not hold endgame back. Unless no one has for a long while.
            if wan.takes_as_backstop(chunk, self.remote_in_flight) {
                self.request_from(chunk, pass, true);
            }
            return true;
        }
        wan.has_room(self.remote_in_flight) && self.request_from(chunk, pass, true)
    }

    /// Requests `chunk` of the best holder with a free slot among the remote or the local peers;
    /// returns whether there was one.
    fn request_from(&mut self, chunk: u32, pass: &mut Pass<'_, P>, remote: bool) -> bool {
        match self.pick_peer(chunk, pass.spare, pass.median, remote, false) {
            Some(peer) => {
                self.assign(peer, chunk, pass);
                true
            }
            None => false,
        }
    }

    /// Endgame: every chunk that can be requested is in flight; duplicate the oldest.
    fn request_duplicates(&mut self, pass: &mut Pass<'_, P>) {
        let duplicates = self.config.endgame_duplicates;
        if duplicates <= 1 || pass.full() {
            return;
        }
        let mut oldest: BTreeMap<u32, Duration> = BTreeMap::new();
        for state in self.peers.values() {
            for (&chunk, &issued) in state.in_flight.iter() {
                oldest
                    .entry(chunk)
                    .and_modify(|t| *t = (*t).min(issued))
                    .or_insert(issued);
            }
        }
        let mut tail: Vec<(u32, usize)> = (0..self.chunk_count)
            .zip(&self.requesters)
            .map(|(chunk, &count)| (chunk, count as usize))
            .filter(|&(_, count)| count > 0 && count < duplicates)
            .collect();
        tail.sort_unstable_by_key(|&(chunk, count)| {
            (
                self.window_key(chunk),
                count,
                oldest.get(&chunk).copied().unwrap_or(Duration::MAX),
                self.rank(chunk),
                chunk,
            )
        });
        for (chunk, mut count) in tail {
            while count < duplicates && !pass.full() {
                // Never a second request over a WAN link.
                let Some(peer) = self.pick_peer(chunk, pass.spare, pass.median, false, true) else {
                    break;
                };
                self.assign(peer, chunk, pass);
                count += 1;
            }
            if pass.full() {
                break;
            }
        }
    }

    /// The usable holder of `chunk` in the given reach (remote or local) with a free slot and no
    /// request for it already that should deliver it soonest.
    fn pick_peer(
        &self,
        chunk: u32,
        spare: &[(usize, usize)],
        median: Option<u64>,
        remote: bool,
        endgame: bool,
    ) -> Option<usize> {
        // A holder that gave the chunk away is asked for it only when every holder within the
        // reach did (and the wait for the copy is over): while one has not, that one is asked
        // once it has a free slot, however busy it is now, so that a seeder's uplink carries
        // each chunk once. Only holders within the reach count: a node of a site whose one local
        // holder gave the chunk away must not wait for a remote holder its site rules may never
        // let it ask.
        let unclaimed_holder = self.counts.unclaimed_in_reach(chunk, remote);
        spare
            .iter()
            .filter_map(|&(peer, _)| {
                let state = self.peers.state(peer);
                // An endgame duplicate never goes to a holder that is sending the chunk already
                // (maybe to this node) or sent it: a seeder's uplink is too dear for a spare copy.
                if state.remote != remote
                    || !state.have.get(chunk)
                    || state.in_flight.contains_key(&chunk)
                    || ((endgame || unclaimed_holder) && state.claimed.get(chunk))
                {
                    return None;
                }
                let queued = state.in_flight.len() as u128 + 1;
                let finish = (queued << 64) / u128::from(state.effective_rate(median));
                // A holder that has not given the chunk away yet goes before one that has: the
                // copy the other one made is elsewhere in the fleet already.
                Some((
                    (
                        state.failed.contains(&chunk),
                        state.claimed.get(chunk),
                        finish,
                        state.tiebreak,
                    ),
                    peer,
                ))
            })
            .min()
            .map(|(_, peer)| peer)
    }

    /// The order fresh chunks are asked in, least first: the priority window, then rarest, then
    /// this node's stripe of the site, then the seeded rank; with the chunk, which the rank
    /// already tells apart.
    fn chunk_key(&self, chunk: u32, stripe: Option<(u64, u64)>) -> (ChunkKey, u32) {
        let key = (
            self.window_key(chunk),
            self.counts.holders(chunk),
            stripe.map_or(0, |(i, m)| (stripe_owner(chunk, m) + m - i) % m),
            self.rank(chunk),
        );
        (key, chunk)
    }

    /// Orders chunks in the priority window first, by index; all others after them.
    fn window_key(&self, chunk: u32) -> u64 {
        match self.window {
            Some((from, end)) if (from..end).contains(&chunk) => u64::from(chunk - from),
            _ => u64::MAX,
        }
    }

    /// The seeded position of a chunk among equally rare ones: its block first (see
    /// [`PlanConfig::block_chunks`](super::PlanConfig::block_chunks)), then the seeded
    /// permutation. Two chunks of a block may share a rank; the chunk index, last in every key,
    /// tells them apart.
    fn rank(&self, chunk: u32) -> u64 {
        let block = u64::from(chunk / self.config.block_chunks);
        let shuffled = mix(self
            .config
            .seed
            .wrapping_add(GOLDEN_GAMMA.wrapping_mul(u64::from(chunk) + 1)));
        (block << 32) | (shuffled >> 32)
    }

    /// Requests `chunk` from the peer at index `peer` of `self.peers`, one of `pass.spare`.
    fn assign(&mut self, peer: usize, chunk: u32, pass: &mut Pass<'_, P>) {
        let peer_id = self.peers.key(peer).clone();
        self.add_request(&peer_id, chunk, pass.now);
        pass.global = pass.global.saturating_sub(1);
        let spare = &mut *pass.spare;
        if let Some(i) = spare.iter().position(|&(p, _)| p == peer) {
            spare[i].1 = spare[i].1.saturating_sub(1);
            if spare[i].1 == 0 {
                spare.remove(i);
            }
        }
        pass.out.push(Action::Request {
            peer: peer_id,
            chunk,
        });
    }
}
