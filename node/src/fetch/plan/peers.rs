//! The peers a plan has heard of, and what it knows of each: what it holds and is asked for, how
//! fast it delivers, and whether it may be asked at all.
//!
//! [`Peers`] keeps every peer ever heard of in key order, and never forgets one: a peer that went
//! keeps its strikes and its ban, so a reconnect starts a new session with no strikes but cannot
//! lift a ban. [`PeerState`] is one peer's session and record, [`InFlight`] its outstanding
//! requests. Here are the rates and limits of *Pipelining* ([`PeerState::limit`],
//! [`Plan::base_limit`], [`Plan::median_rate`]) and the bookkeeping of *Timeouts and strikes*,
//! *Busy* and *Bans* ([`Plan::strike`], [`Plan::on_chunk_busy`], [`Plan::ban`]) from the
//! [module documentation](super). Rates and limits are integers, so a run replays the same on
//! every platform.

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::hash::Hash;
use std::time::Duration;

use super::sites::stable_hash;
use super::{Action, Bitfield, GOLDEN_GAMMA, PEER_SALT, Plan, mix};

/// The highest multiple of
/// [`PlanConfig::max_in_flight_per_peer`](super::PlanConfig::max_in_flight_per_peer) a fast peer
/// may be given.
const MAX_SPEEDUP: u128 = 4;

/// The rate assumed for a peer with no measurement when no peer has one yet (1 MiB/s). Only its
/// order relative to measured rates matters: it is above the floor given to peers measured at zero.
const NOMINAL_RATE_BYTES_PER_SEC: u64 = 1 << 20;

/// How long a peer that answered "busy" is left alone before any request completed, doubled for
/// each such answer in a row up to [`BUSY_REST_MAX`]. A busy server frees a slot within about one
/// request time, so a fixed quarter second left a 10 Gbit/s seeder idle for many chunk times.
pub(super) const BUSY_REST: Duration = Duration::from_millis(250);

/// The shortest first rest after "busy": once requests complete, the first rest is one typical
/// request time within `[BUSY_REST_MIN, BUSY_REST]`.
pub(super) const BUSY_REST_MIN: Duration = Duration::from_millis(10);

/// The longest rest after "busy" answers.
pub(super) const BUSY_REST_MAX: Duration = Duration::from_secs(4);

/// What the plan knows about one peer, from [`Plan::peer_stats`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStats {
    /// Verified bytes received from it, late and duplicate deliveries included.
    pub bytes_delivered: u64,
    /// Verified chunks received from it, late and duplicate deliveries included.
    pub chunks_delivered: u64,
    /// Consecutive timeouts and failures since its last verified delivery or reconnect.
    pub strikes: u32,
    /// Whether it sent bad data (it is then never used again).
    pub banned: bool,
    /// Whether it is connected (it said what it has, and has not gone since).
    pub connected: bool,
    /// Whether requests may be sent to it: connected, not banned and not struck out.
    pub usable: bool,
    /// Its requests outstanding.
    pub in_flight: usize,
    /// How many requests it may have outstanding now (0 if it is not usable).
    pub in_flight_limit: usize,
    /// Its measured rate: verified bytes per second of the time it had requests outstanding.
    /// `None` until one of its requests has ended.
    pub rate_bytes_per_sec: Option<u64>,
    /// Whether it is in another site ([`Event::PeerRemote`](super::Event::PeerRemote)).
    pub remote: bool,
}

/// One peer: its current session (what it holds and claims, its requests, its strikes) and its
/// record across sessions (deliveries, rate, ban).
#[derive(Debug, Clone)]
pub(super) struct PeerState {
    /// What it holds; `chunk_count` bits long. Cleared when it goes.
    pub(super) have: Bitfield,
    pub(super) connected: bool,
    pub(super) banned: bool,
    pub(super) strikes: u32,
    /// Chunk requested from it → when.
    pub(super) in_flight: InFlight,
    /// Chunks it failed or timed out on in this session: asked again only as a last resort.
    pub(super) failed: BTreeSet<u32>,
    pub(super) bytes_delivered: u64,
    pub(super) chunks_delivered: u64,
    /// Bytes delivered for requests that were outstanding: the numerator of its rate.
    pub(super) measured_bytes: u64,
    /// Time it had requests outstanding, up to `busy_since`.
    pub(super) busy_total: Duration,
    /// When its current run of outstanding requests began.
    pub(super) busy_since: Option<Duration>,
    /// `measured_bytes` per second of busy time, as of its last request's end.
    pub(super) rate: Option<u64>,
    /// Seeded tie-breaker between otherwise equal peers.
    pub(super) tiebreak: u64,
    /// In another site.
    pub(super) remote: bool,
    /// Its fixed hash, for the rendezvous score that decides which local node fetches a chunk
    /// only remote peers hold.
    pub(super) key: u64,
    /// Chunks it says it is sending or has sent to some peer
    /// ([`Event::PeerServes`](super::Event::PeerServes)); empty until it says.
    pub(super) claimed: Bitfield,
    /// "Busy" answers in a row since its last delivery.
    pub(super) busy: u32,
    /// It is asked for nothing new before this (it answered "busy").
    pub(super) rest_until: Option<Duration>,
}

/// The requests outstanding to one peer, chunk → when issued, in chunk order: a few (the peer's
/// limit), so a sorted vector, which the scheduler scans without chasing tree nodes.
#[derive(Debug, Clone, Default)]
pub(super) struct InFlight(Vec<(u32, Duration)>);

impl InFlight {
    /// Records a request; returns when the one it replaces was issued, if there was one.
    pub(super) fn insert(&mut self, chunk: u32, issued: Duration) -> Option<Duration> {
        match self.0.binary_search_by_key(&chunk, |&(c, _)| c) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, issued)),
            Err(i) => {
                self.0.insert(i, (chunk, issued));
                None
            }
        }
    }

    pub(super) fn remove(&mut self, chunk: &u32) -> Option<Duration> {
        let i = self.0.binary_search_by_key(chunk, |&(c, _)| c).ok()?;
        Some(self.0.remove(i).1)
    }

    pub(super) fn contains_key(&self, chunk: &u32) -> bool {
        self.0.iter().any(|(c, _)| c == chunk)
    }

    pub(super) fn len(&self) -> usize {
        self.0.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&u32, &Duration)> {
        self.0.iter().map(|(c, t)| (c, t))
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &Duration> {
        self.0.iter().map(|(_, t)| t)
    }

    pub(super) fn into_keys(self) -> impl Iterator<Item = u32> {
        self.0.into_iter().map(|(c, _)| c)
    }
}

/// The peers a plan has heard of, in key order: the keys in one vector, so that a lookup is a
/// binary search over a cache line or two rather than a walk down a tree, and their states in
/// another at the same index. A peer is never removed (one that went keeps its strikes and ban),
/// so an index stays valid until the next insertion.
#[derive(Debug, Clone)]
pub(super) struct Peers<P> {
    keys: Vec<P>,
    states: Vec<PeerState>,
}

impl<P: Ord> Peers<P> {
    pub(super) fn new() -> Self {
        Peers {
            keys: Vec::new(),
            states: Vec::new(),
        }
    }

    pub(super) fn index(&self, peer: &P) -> Option<usize> {
        self.keys.binary_search(peer).ok()
    }

    pub(super) fn get(&self, peer: &P) -> Option<&PeerState> {
        self.index(peer).map(|i| &self.states[i])
    }

    pub(super) fn get_mut(&mut self, peer: &P) -> Option<&mut PeerState> {
        self.index(peer).map(|i| &mut self.states[i])
    }

    pub(super) fn contains_key(&self, peer: &P) -> bool {
        self.index(peer).is_some()
    }

    /// The peer's state, inserted from `new` if it is not there yet.
    pub(super) fn get_or_insert_with(
        &mut self,
        peer: P,
        new: impl FnOnce() -> PeerState,
    ) -> &mut PeerState {
        let i = match self.keys.binary_search(&peer) {
            Ok(i) => i,
            Err(i) => {
                self.keys.insert(i, peer);
                self.states.insert(i, new());
                i
            }
        };
        &mut self.states[i]
    }

    /// The state of the peer at `index` (from [`Peers::index`], or a position in
    /// [`Peers::values`]).
    pub(super) fn state(&self, index: usize) -> &PeerState {
        &self.states[index]
    }

    /// The peer at `index`.
    pub(super) fn key(&self, index: usize) -> &P {
        &self.keys[index]
    }

    pub(super) fn values(&self) -> std::slice::Iter<'_, PeerState> {
        self.states.iter()
    }

    pub(super) fn values_mut(&mut self) -> std::slice::IterMut<'_, PeerState> {
        self.states.iter_mut()
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&P, &PeerState)> {
        self.keys.iter().zip(&self.states)
    }
}

impl PeerState {
    pub(super) fn new(chunk_count: u32, tiebreak: u64, key: u64) -> Self {
        PeerState {
            have: Bitfield::new(chunk_count),
            connected: true,
            banned: false,
            strikes: 0,
            in_flight: InFlight::default(),
            failed: BTreeSet::new(),
            bytes_delivered: 0,
            chunks_delivered: 0,
            measured_bytes: 0,
            busy_total: Duration::ZERO,
            busy_since: None,
            rate: None,
            tiebreak,
            remote: false,
            key,
            claimed: Bitfield::new(0),
            busy: 0,
            rest_until: None,
        }
    }

    /// A peer that had gone is back: a new session with no strikes.
    pub(super) fn reconnect(&mut self) {
        self.connected = true;
        self.strikes = 0;
        self.failed.clear();
    }

    pub(super) fn usable(&self, max_strikes: u32) -> bool {
        self.connected && !self.banned && self.strikes < max_strikes
    }

    pub(super) fn update_rate(&mut self, now: Duration) {
        let busy = self.busy_total
            + self
                .busy_since
                .map_or(Duration::ZERO, |since| now.saturating_sub(since));
        if let Some(rate) =
            (u128::from(self.measured_bytes) * 1_000_000_000).checked_div(busy.as_nanos())
        {
            self.rate = Some(u64::try_from(rate).unwrap_or(u64::MAX));
        }
    }

    pub(super) fn end_busy(&mut self, now: Duration) {
        if let Some(since) = self.busy_since.take() {
            self.busy_total += now.saturating_sub(since);
        }
        self.update_rate(now);
    }

    /// The rate used to compare it with other peers: its measurement, the median for a peer not
    /// measured yet, and 1 byte/s for a peer measured at zero (slowest, but still usable).
    pub(super) fn effective_rate(&self, median: Option<u64>) -> u64 {
        match self.rate {
            Some(rate) => rate.max(1),
            None => median.unwrap_or(NOMINAL_RATE_BYTES_PER_SEC).max(1),
        }
    }

    /// How many requests it may have outstanding: the base, scaled by its rate over the median.
    pub(super) fn limit(&self, base: usize, median: Option<u64>) -> usize {
        match (self.rate, median) {
            (Some(rate), Some(median)) if rate > 0 && median > 0 => {
                let base = base as u128;
                let scaled =
                    (base * u128::from(rate) / u128::from(median)).clamp(base, base * MAX_SPEEDUP);
                usize::try_from(scaled).unwrap_or(usize::MAX)
            }
            _ => base,
        }
    }
}

impl<P: Clone + Eq + Hash + Ord + Debug> Plan<P> {
    /// The peer's state, created when it is first heard of. Its tie-breaker is drawn from the
    /// seed in the order peers are heard of, so a run replays.
    pub(super) fn entry(&mut self, peer: P) -> &mut PeerState {
        let chunk_count = self.chunk_count;
        let seed = self.config.seed;
        let seen = &mut self.peers_seen;
        let key = stable_hash(&peer);
        self.peers.get_or_insert_with(peer, || {
            *seen = seen.wrapping_add(1);
            let tiebreak = mix((seed ^ PEER_SALT).wrapping_add(GOLDEN_GAMMA.wrapping_mul(*seen)));
            PeerState::new(chunk_count, tiebreak, key)
        })
    }

    /// A "busy" answer: no strike, the chunk is re-planned, and the peer rests (see *Busy* in the
    /// module documentation).
    pub(super) fn on_chunk_busy(&mut self, peer: &P, chunk: u32, now: Duration) {
        self.forget_pending_cancel(peer, Some(chunk));
        if self.remove_request(peer, chunk, now).is_none() {
            return;
        }
        if let Some(state) = self.peers.get_mut(peer) {
            state.busy = state.busy.saturating_add(1);
            let base = self
                .chunk_time
                .map_or(BUSY_REST, |t| t.clamp(BUSY_REST_MIN, BUSY_REST));
            let rest = base
                .saturating_mul(1 << state.busy.saturating_sub(1).min(8))
                .min(BUSY_REST_MAX);
            state.rest_until = Some(now.saturating_add(rest));
            self.floors.rest = self.floors.rest.min(now.saturating_add(rest));
        }
    }

    /// Bans the peer for the life of the plan, whatever it does later (see *Bans*).
    pub(super) fn ban(&mut self, peer: P, now: Duration) {
        if self.entry(peer.clone()).banned {
            return;
        }
        self.withdraw(&peer);
        // The driver disconnects a banned peer, so its requests are forgotten, not cancelled.
        self.drop_requests(&peer, now, false);
        self.forget_pending_cancel(&peer, None);
        let state = self.entry(peer.clone());
        state.banned = true;
        state.have = Bitfield::new(0);
        state.failed.clear();
        self.pending.push(Action::Ban { peer });
    }

    /// One strike for the peer, if it is usable; the one that strikes it out cancels its requests
    /// (see *Timeouts and strikes*).
    pub(super) fn strike(&mut self, peer: &P, now: Duration) {
        let max_strikes = self.config.max_strikes;
        let Some(state) = self.peers.get(peer) else {
            return;
        };
        if !state.usable(max_strikes) {
            return;
        }
        let strikes_out = state.strikes.saturating_add(1) >= max_strikes;
        if strikes_out {
            self.withdraw(peer);
        }
        if let Some(state) = self.peers.get_mut(peer) {
            state.strikes = state.strikes.saturating_add(1);
        }
        if strikes_out {
            self.drop_requests(peer, now, true);
        }
    }

    /// The base number of requests each usable peer may have outstanding before rates scale it:
    /// [`PlanConfig::pipeline`](super::PlanConfig::pipeline) divided among the usable peers,
    /// rounded up, between one and
    /// [`PlanConfig::max_in_flight_per_peer`](super::PlanConfig::max_in_flight_per_peer).
    pub(super) fn base_limit(&self) -> usize {
        let cap = self.config.max_in_flight_per_peer;
        let usable = self
            .peers
            .values()
            .filter(|peer| peer.usable(self.config.max_strikes))
            .count();
        self.config.pipeline.div_ceil(usable.max(1)).clamp(1, cap)
    }

    /// The lower median of the positive measured rates of usable peers.
    pub(super) fn median_rate(&self) -> Option<u64> {
        let mut rates: Vec<u64> = self
            .peers
            .values()
            .filter(|peer| peer.usable(self.config.max_strikes))
            .filter_map(|peer| peer.rate)
            .filter(|&rate| rate > 0)
            .collect();
        if rates.is_empty() {
            return None;
        }
        let mid = (rates.len() - 1) / 2;
        Some(*rates.select_nth_unstable(mid).1)
    }
}
