//! How many usable peers hold each chunk: what rarest first, the local-first rule of sites and the
//! wait for a seeder's copy read at every scheduling pass.
//!
//! [`ChunkCounts`] owns the three per-chunk counts and the only way they change: one holder's
//! weight on one chunk, added or removed ([`ChunkCounts::add_peer`], [`ChunkCounts::remove_peer`]
//! and [`ChunkCounts::add_chunk`] all go through it). Only usable peers count. The plan removes a
//! peer before it changes what the peer holds, where it is, what it says it uploaded or whether it
//! is usable, and adds it back after, so the counts always equal a recount over the peers (the
//! tests' `assert_consistent` checks that after every event). Counts saturate: a peer's input can
//! neither wrap nor panic them.

use super::PeerState;

/// Per chunk: how many usable peers hold it, how many of those are local, and how many of those
/// say they have given it away. Indexed by chunk, because the scheduler asks for every missing
/// chunk on every call and a lookup must cost no tree walk.
#[derive(Debug, Clone)]
pub(super) struct ChunkCounts {
    /// Strikes that make a peer unusable ([`super::PlanConfig::max_strikes`]): an unusable peer
    /// counts for nothing.
    max_strikes: u32,
    /// Chunk → how many usable peers hold it.
    holders: Vec<u32>,
    /// Chunk → how many usable local (not remote) peers hold it.
    local: Vec<u32>,
    /// Chunk → how many usable holders say they sent it or are sending it. Empty until a peer
    /// reports its serves ([`ChunkCounts::count_claims`]).
    claimed: Vec<u32>,
    /// Chunk → how many of those are local: a site's downloader that skips a local holder for
    /// an unclaimed one must find that one within its own reach.
    claimed_local: Vec<u32>,
}

/// Which way a holder's weight moves.
#[derive(Debug, Clone, Copy)]
enum Change {
    Add,
    Remove,
}

impl Change {
    fn apply(self, count: &mut u32, weight: u32) {
        *count = match self {
            Change::Add => count.saturating_add(weight),
            Change::Remove => count.saturating_sub(weight),
        };
    }
}

impl ChunkCounts {
    /// Counts for a blob of `chunk_count` chunks that no peer holds yet, not counting claims.
    pub(super) fn new(chunk_count: u32, max_strikes: u32) -> Self {
        ChunkCounts {
            max_strikes,
            holders: vec![0; chunk_count as usize],
            local: vec![0; chunk_count as usize],
            claimed: Vec::new(),
            claimed_local: Vec::new(),
        }
    }

    /// Whether claims are counted: some peer has reported its serves.
    pub(super) fn claims_counted(&self) -> bool {
        !self.claimed.is_empty()
    }

    /// Starts counting claims, from zero: called on the first serve report, before any peer
    /// claims a chunk.
    pub(super) fn count_claims(&mut self, chunk_count: u32) {
        self.claimed = vec![0; chunk_count as usize];
        self.claimed_local = vec![0; chunk_count as usize];
    }

    /// Adds the chunks `peer` holds, if it is usable.
    pub(super) fn add_peer(&mut self, peer: &PeerState) {
        self.change_peer(peer, Change::Add);
    }

    /// Removes the chunks `peer` holds, if it is usable.
    pub(super) fn remove_peer(&mut self, peer: &PeerState) {
        self.change_peer(peer, Change::Remove);
    }

    /// Adds `chunk`, which `peer` has just said it holds (it was counted without it), if the
    /// peer is usable.
    pub(super) fn add_chunk(&mut self, peer: &PeerState, chunk: u32) {
        if peer.usable(self.max_strikes) {
            self.change(peer, chunk, Change::Add);
        }
    }

    fn change_peer(&mut self, peer: &PeerState, change: Change) {
        if peer.usable(self.max_strikes) {
            for chunk in peer.have.iter_ones() {
                self.change(peer, chunk, change);
            }
        }
    }

    /// The one update: `peer`'s weight on `chunk`, in every count.
    fn change(&mut self, peer: &PeerState, chunk: u32, change: Change) {
        let i = chunk as usize;
        if let Some(count) = self.holders.get_mut(i) {
            change.apply(count, 1);
        }
        if let Some(count) = self.local.get_mut(i) {
            change.apply(count, u32::from(!peer.remote));
        }
        if let Some(count) = self.claimed.get_mut(i) {
            change.apply(count, u32::from(peer.claimed.get(chunk)));
        }
        if let Some(count) = self.claimed_local.get_mut(i) {
            change.apply(count, u32::from(peer.claimed.get(chunk) && !peer.remote));
        }
    }

    /// How many usable peers hold `chunk`.
    pub(super) fn holders(&self, chunk: u32) -> u32 {
        self.holders.get(chunk as usize).copied().unwrap_or(0)
    }

    /// How many usable local peers hold `chunk`.
    pub(super) fn local_holders(&self, chunk: u32) -> u32 {
        self.local.get(chunk as usize).copied().unwrap_or(0)
    }

    /// How many usable holders of `chunk` say they sent it or are sending it; `None` while claims
    /// are not counted.
    pub(super) fn claimed(&self, chunk: u32) -> Option<u32> {
        self.claimed.get(chunk as usize).copied()
    }

    /// Whether some usable holder of `chunk` within the reach (`remote` or local) has not
    /// said it gave the chunk away; `false` while claims are not counted.
    pub(super) fn unclaimed_in_reach(&self, chunk: u32, remote: bool) -> bool {
        let i = chunk as usize;
        let (Some(&claimed), Some(&claimed_local)) =
            (self.claimed.get(i), self.claimed_local.get(i))
        else {
            return false;
        };
        let local = self.local_holders(chunk);
        if remote {
            claimed.saturating_sub(claimed_local) < self.holders(chunk).saturating_sub(local)
        } else {
            claimed_local < local
        }
    }

    /// The counts by chunk (holders, local holders, claimed, claimed by local holders), for the
    /// tests' recount.
    #[cfg(test)]
    pub(super) fn by_chunk(&self) -> (&[u32], &[u32], &[u32], &[u32]) {
        (
            &self.holders,
            &self.local,
            &self.claimed,
            &self.claimed_local,
        )
    }
}
