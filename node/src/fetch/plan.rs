//! The download plan for one blob: which chunk to ask which peer for, and when to give up on a
//! request or on a peer.
//!
//! [`Plan`] is sans-IO. It does no I/O, reads no clock, spawns nothing and draws no randomness
//! except from [`PlanConfig::seed`], so the real fetcher and the fleet simulator drive the same
//! code and a simulation replays exactly. The driver feeds [`Event`]s in with [`Plan::handle`]
//! (a peer's bitfield or a new chunk it has, a chunk that arrived and verified, a chunk that was
//! bad, a request that failed, a peer that went away) and takes [`Action`]s out with
//! [`Plan::next_actions`] (request a chunk from a peer, cancel a request, ban a peer). Time is
//! passed in as a [`Duration`] since any origin the driver likes; the plan only compares and
//! subtracts instants. [`Plan::next_deadline`] says when to call `next_actions` again if no event
//! comes first, so that requests that timed out are expired.
//!
//! The plan trusts the driver on one thing: `ChunkDone` means the chunk's BLAKE3 hash was checked
//! and the chunk is stored. What a peer says (bitfields, chunk numbers) is bounds-checked and can
//! neither panic the plan nor make it allocate more than one bitfield per peer.
//!
//! # Policy, and why
//!
//! The ideas are BitTorrent's, as described in Bram Cohen's *Incentives Build Robustness in
//! BitTorrent* (2003) and measured in Legout, Urvoy-Keller and Michiardi's *Rarest First and
//! Choke Algorithms Are Enough* (2006); Kraken and Dragonfly schedule pieces in the same spirit.
//!
//! - **Rarest first.** Among the missing chunks not in flight, the plan asks first for those held
//!   by the fewest usable peers. A chunk few peers hold is the one most likely to vanish (its
//!   holders leave, or get banned), and once this node holds it, the copy it serves is worth the
//!   most to the rest of the fleet; common chunks can be had from anyone later.
//! - **Blocks in order.** Equally rare chunks are taken a block at a time
//!   ([`PlanConfig::block_chunks`], 16 chunks), blocks in index order, and within a block in a
//!   permutation drawn from the seed, so a thousand nodes started together do not all queue for
//!   chunk 0 on the same seeder. What a node holds then stays close to a prefix of the blob, and
//!   both consumers of a download read it in order: the blob's sha256, and a client streaming it.
//!   In the seeded order alone over the whole blob, a node held most of it long before it could
//!   hash or stream much: a client pulling a 537 MB layer from one peer had its first quarter
//!   only at 78% of the pull's time (20 to 28% with blocks), and the last chunk set off a re-read
//!   of much of the blob for the digest and the client at once (up to 4.7 s in the 16-node
//!   benchmark, 2.1 s with blocks).
//! - **Priority window.** A client reading a blob in order (a `docker pull` being streamed) needs
//!   the next chunks, not the rarest ones. [`Plan::set_priority_window`] puts a range of chunks
//!   ahead of rarity, in index order, like a streaming torrent client's playback head, for a
//!   driver to move as its reader advances. There is none by default, and the node's swarm sets
//!   none: blocks in order already keep a download near its prefix, and a window ahead of rarity
//!   would have every node of a rollout ask the seeder for the same chunks at once.
//! - **Which peer.** A chunk goes to the holder with a free slot that is expected to deliver it
//!   soonest: the least `(requests in flight + 1) / measured rate`, a peer with no measurement yet
//!   counting as the median. A peer that already failed or timed out on that chunk is chosen only
//!   if no other holder has room.
//! - **Pipelining, spread over peers, more for faster peers.** A download keeps
//!   [`PlanConfig::pipeline`] requests outstanding before any peer gets a second one: each usable
//!   peer's base is that number divided among them, rounded up, between one and
//!   [`PlanConfig::max_in_flight_per_peer`]. A lone source is asked for several chunks at once, so
//!   its link never idles for a round trip between chunks (BitTorrent keeps several requests
//!   queued per connection for the same reason); with many sources each is asked for one. Several
//!   requests to one peer share its uplink and crawl in together, and a chunk is only passed on
//!   once it is whole, so in a swarm they delay every chunk and its spread through the fleet: the
//!   fleet simulator measured a base of 4 per peer at 1.34 times the ideal for 16 pullers on
//!   100 Mbit/s links and 1.75 for 1,000 on 10 Gbit/s NICs, and one per peer at 1.05 and 1.49.
//!   A peer measured faster than the median gets proportionally more, up to four times as many:
//!   `limit = base * rate / median`, clamped to `[base, 4 * base]`. A peer's rate is the
//!   verified bytes it delivered divided by the time during which it had at least one request
//!   outstanding from us. It is deliberately not bytes over each request's own latency: with `d`
//!   requests queued at a peer that serves them one after another, each waits for the ones before
//!   it, so per-request latency shows `bandwidth / d`, and a peer given more slots would look slower
//!   and lose them again. Busy time is independent of the queue depth. Time spent on requests that
//!   fail or time out counts as busy time with no bytes, so an unreliable peer looks slow. The
//!   median is the lower median of the positive rates of the usable peers. Rates, limits and
//!   comparisons are integers, so runs replay the same on every platform.
//! - **Endgame.** When every missing chunk is in flight (chunks another downloader of this site
//!   fetches over the WAN aside), spare slots go to asking other holders for the chunks already in flight (up to
//!   [`PlanConfig::endgame_duplicates`] requests per chunk, the oldest request first); the first
//!   verified copy wins and the other requests are cancelled. Without it the last chunks of a blob
//!   wait for whichever peer happens to be slowest, which is the tail BitTorrent's endgame mode
//!   removes. It costs at most a few duplicate chunk transfers, only at the tail. It does not
//!   start while some missing chunk is held by no peer or waits for a copy (see *Seeders*): in a
//!   rollout few chunks are available at any moment, and a plan that duplicated whatever was
//!   available would spend the fleet's uplinks on copies nobody needs (the fleet simulator
//!   measured 8 to 10% of all bytes received thrown away that way).
//! - **Caps.** [`Plan::in_flight`] counts requests, duplicates included. It never exceeds
//!   [`PlanConfig::max_in_flight`], and no peer ever has more than its limit.
//! - **Timeouts and strikes.** A request older than [`PlanConfig::request_timeout`] when
//!   `next_actions` is called is cancelled and its chunk re-planned; the peer gets a strike (one
//!   per call however many of its requests expired at once: they are one stall, not several).
//!   [`Event::ChunkFailed`] is a strike too. [`PlanConfig::max_strikes`] strikes in a row make the
//!   peer unusable: its other requests are cancelled and it is asked for nothing more. A verified
//!   delivery clears the count. An unusable peer becomes usable again only by reconnecting
//!   ([`Event::PeerGone`], then a bitfield or a have), which starts a new session with no strikes.
//! - **Busy.** "Busy" ([`Event::ChunkBusy`]) is a normal answer from a popular peer, not a
//!   failure: no strike (three refusals in a millisecond would otherwise strike out a seeder that
//!   may be the only holder of some chunks), the chunk is re-planned at once, and the peer is
//!   asked for nothing new for one typical request time (10 to 250 ms; 250 ms before any
//!   request completed), doubled for each refusal in a row up to 4 s.
//! - **Bans.** A peer that sent a chunk failing verification ([`Event::ChunkBad`]) is banned for
//!   the life of the plan, reconnect or not: one [`Action::Ban`] is emitted, its requests are
//!   forgotten (the driver disconnects it, so no cancel is sent) and their chunks re-planned.
//! - **Departures.** [`Event::PeerGone`] forgets the peer's requests and re-plans their chunks.
//! - **Resume and duplicates.** Chunks held at [`Plan::new`] are never requested. A `ChunkDone` for
//!   a chunk already held (a late endgame loser, a request that timed out but arrived after all) is
//!   counted in the peer's statistics and is otherwise harmless.
//! - **Stalls.** [`Plan::is_stalled`] is true when the blob is incomplete, nothing is in flight and
//!   no usable peer holds a missing chunk: the driver should find more providers or give up. A plan
//!   that has heard of no peer yet is stalled too.
//!
//! - **Sites.** A fleet spread over sites joined by slow or metered WAN links should carry each
//!   chunk over each site's link about once. The driver marks peers in another site with
//!   [`Event::PeerRemote`] and tells the plan its own identity with [`Plan::with_self`]. A chunk
//!   some usable local peer holds is asked only of local peers. Only a few of the site's
//!   downloaders (this node and the usable local peers that said they are fetching the blob) use
//!   the WAN, its *gateways*: the site's [`PlanConfig::site_remote_in_flight`] remote requests
//!   are dealt out one at a time to the downloaders in order of their fixed hash, each taking at
//!   most [`PlanConfig::max_remote_in_flight`]. A chunk only remote peers hold is asked of a
//!   remote peer only by the one gateway *responsible* for it: the one with the least rendezvous
//!   score `mix(hash(peer) ^ chunk)`. Every node computes the same gateways and owners from the
//!   same peer set, so the site fetches each chunk once, a few at a time, and then spreads it
//!   over the LAN; when a gateway leaves or strikes out, the next downloader takes its place.
//!   Without the site-wide budget, twenty nodes behind a 20 Mbit/s link each asked it for two
//!   4 MiB chunks at once, so a chunk took a minute or more and requests timed out, throwing away
//!   what had crossed the link (the fleet simulator's `edge-local-first`, 50 sites of 20 nodes:
//!   7,110 timeouts and 1.34 copies of the image over each WAN link on average; with the budget
//!   of 4, none and 1.00, together with the node's discovery of seeders). Nodes that see
//!   different local peers (one struck another out, or a large site is cut at the candidate
//!   cap) can disagree on the gateways: a chunk can then be fetched twice, or be left to a node
//!   that is no gateway in its own view, so that no one fetches it. A backstop ends that: a
//!   downloader with nothing in flight that stored no chunk for a request timeout takes the
//!   remote-only chunks it owns by the rule without gateways, the least score among all the
//!   site's downloaders it knows, which the least-scored node of the union of all views owns
//!   in its own view (a duplicate at worst, never a chunk no one fetches). The budget is per
//!   download: a node pulling three layers at once may ask the WAN for three times as much.
//!   Endgame duplicates go only to local peers, so a slow WAN is never asked twice for a chunk.
//!   With no remote peer the plan behaves as if there were no sites.
//!
//! - **Seeders.** Downloaders that start together all see the chunks only a seeder holds as
//!   equally rare, and without more information several pick the same one: the fleet simulator
//!   measured the publisher sending each chunk 2 to 2.4 times, and the publisher's uplink is the
//!   bottleneck of a rollout. So a seeder reports which chunks it is sending and has sent
//!   ([`Event::PeerUploads`]). A chunk every usable holder has already given away waits for the
//!   copy to reach some other peer, which is then asked instead; among holders, one that has not
//!   given the chunk away is asked first. The wait is bounded, because the copy may never reach
//!   this node's peers: a chunk sent waits [`PlanConfig::upload_patience`] or three typical
//!   request times, whichever is longer but never more than half the request timeout, and a
//!   chunk still being sent eight times that, never more than the request timeout. This is
//!   BitTorrent's super-seeding (the seeder steers each downloader to pieces nobody has yet) done
//!   from the downloader's side, so the seeder keeps serving whatever it is asked.
//!
//! Invariants, for every [`Action::Request`]: the chunk is not held, the peer is connected, not
//! banned, not struck out, not resting after "busy", said it has the chunk, has no request for it
//! already, and the peer and global caps hold.
//!
//! Not here: choking and upload policy (what this node serves is another module's business),
//! requests for parts of a chunk, and bandwidth shaping.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::hash::Hash;
use std::time::Duration;

/// The highest multiple of [`PlanConfig::max_in_flight_per_peer`] a fast peer may be given.
const MAX_SPEEDUP: u128 = 4;

/// The rate assumed for a peer with no measurement when no peer has one yet (1 MiB/s). Only its
/// order relative to measured rates matters: it is above the floor given to peers measured at zero.
const NOMINAL_RATE_BYTES_PER_SEC: u64 = 1 << 20;

/// How long a peer that answered "busy" is left alone before any request completed, doubled for
/// each such answer in a row up to [`BUSY_REST_MAX`]. A busy server frees a slot within about one
/// request time, so a fixed quarter second left a 10 Gbit/s seeder idle for many chunk times.
const BUSY_REST: Duration = Duration::from_millis(250);
/// The shortest first rest after "busy": once requests complete, the first rest is one typical
/// request time within `[BUSY_REST_MIN, BUSY_REST]`.
const BUSY_REST_MIN: Duration = Duration::from_millis(10);
/// The longest rest after "busy" answers.
const BUSY_REST_MAX: Duration = Duration::from_secs(4);

/// How many patience periods a chunk a holder is still sending waits before it is asked of a
/// holder anyway: the transfer under way is likely to finish before then.
const SENDING_PATIENCE: u32 = 8;

/// The increment of SplitMix64, used to derive independent values from the seed.
const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// Separates the stream of peer tie-breakers from the stream of chunk ranks.
const PEER_SALT: u64 = 0x5045_4552_5341_4c54;

/// SplitMix64's output function: a fixed, well-mixed function of its input. Used instead of a
/// `rand` generator, whose algorithm may change between versions, so a seed replays forever.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

pub use shoal_protocol::Bitfield;

/// How a [`Plan`] schedules. Values of zero for the caps, duplicates or strikes are raised to one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanConfig {
    /// The most requests a peer may have outstanding before its rate is known, and the cap of the
    /// base its rate scales (a peer faster than the median gets up to four times its base); the
    /// base is [`PlanConfig::pipeline`] spread over the usable peers. Default 4.
    pub max_in_flight_per_peer: usize,
    /// Requests outstanding at once for this blob, over all peers, duplicates included. Default 64.
    pub max_in_flight: usize,
    /// How many requests the download keeps outstanding in all before it gives any peer a second
    /// one: each usable peer's base is this divided among them, rounded up, between one and
    /// [`PlanConfig::max_in_flight_per_peer`]. So a lone source is asked for several chunks at once
    /// and never idles for a round trip between them, while a download with many sources asks
    /// each for one (see *Pipelining* in the module documentation). Default 4.
    pub pipeline: usize,
    /// A request older than this is cancelled and its peer gets a strike. It should be well above
    /// the time one chunk takes on a slow link. Default 20 s.
    pub request_timeout: Duration,
    /// In endgame, how many peers a missing chunk may be requested from at once. 1 turns endgame
    /// off. Default 2.
    pub endgame_duplicates: usize,
    /// Consecutive timeouts or failures after which a peer is no longer used. Default 3.
    pub max_strikes: u32,
    /// Requests this node has outstanding at once to peers marked remote
    /// ([`Event::PeerRemote`]). Default 2.
    pub max_remote_in_flight: usize,
    /// Requests outstanding at once to remote peers from this node's whole site: the site's
    /// downloaders share them out (see *Sites* in the module documentation), so a WAN link is
    /// asked for a few chunks at a time however many nodes sit behind it. Default 4.
    pub site_remote_in_flight: usize,
    /// The least time a chunk that every holder has already sent to someone else waits for a
    /// copy to reach another peer before it is asked of a holder anyway (see *Seeders* in the
    /// module documentation). The wait is three typical request times when that is longer.
    /// Default 250 ms.
    pub upload_patience: Duration,
    /// Equally rare chunks are asked for a block of this many at a time, blocks in index order,
    /// in the seeded order within a block (see *Blocks in order* in the module documentation).
    /// `u32::MAX` puts the whole blob in one block: the seeded order alone. Default 16.
    pub block_chunks: u32,
    /// Breaks ties between equally rare chunks and between equally good peers.
    pub seed: u64,
}

impl Default for PlanConfig {
    fn default() -> Self {
        PlanConfig {
            max_in_flight_per_peer: 4,
            max_in_flight: 64,
            pipeline: 4,
            request_timeout: Duration::from_secs(20),
            endgame_duplicates: 2,
            max_strikes: 3,
            max_remote_in_flight: 2,
            site_remote_in_flight: 4,
            upload_patience: Duration::from_millis(250),
            block_chunks: 16,
            seed: 0,
        }
    }
}

/// Something that happened, fed to [`Plan::handle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<P> {
    /// A peer's whole bitfield, on connect or refreshed. A bitfield of another length than the
    /// blob's chunk count is taken as "has nothing".
    PeerHas {
        /// The peer.
        peer: P,
        /// The chunks it holds.
        have: Bitfield,
    },
    /// A peer now holds one more chunk.
    PeerHasChunk {
        /// The peer.
        peer: P,
        /// The chunk.
        chunk: u32,
    },
    /// A peer disconnected or stopped serving this blob.
    PeerGone {
        /// The peer.
        peer: P,
    },
    /// A chunk arrived from a peer, its BLAKE3 hash verified, and it is stored.
    ChunkDone {
        /// The peer that sent it.
        peer: P,
        /// The chunk.
        chunk: u32,
        /// Its length, for the peer's measured rate.
        bytes: u64,
    },
    /// A chunk arrived from a peer and failed verification: the peer is banned.
    ChunkBad {
        /// The peer that sent it.
        peer: P,
        /// The chunk.
        chunk: u32,
    },
    /// A request failed (transport error, not found): the peer gets a strike.
    ChunkFailed {
        /// The peer asked.
        peer: P,
        /// The chunk.
        chunk: u32,
    },
    /// The peer is in another site, across a slow or metered link. A peer stays remote.
    PeerRemote {
        /// The peer.
        peer: P,
    },
    /// What a peer says it has uploaded of the blob (a seeder reports it): replaces its previous
    /// report. A bitfield of another length than the blob's chunk count is taken as empty.
    PeerUploads {
        /// The peer.
        peer: P,
        /// Chunks it is sending to some peer now.
        sending: Bitfield,
        /// Chunks it has finished sending to some peer at least once.
        sent: Bitfield,
    },
    /// A request was refused because the peer is at capacity. Not a strike: the chunk is
    /// re-planned and the peer is asked for nothing new for a while, longer after each refusal
    /// in a row.
    ChunkBusy {
        /// The peer asked.
        peer: P,
        /// The chunk.
        chunk: u32,
    },
}

/// Something the driver should do, returned by [`Plan::next_actions`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action<P> {
    /// Ask `peer` for `chunk`.
    Request {
        /// The peer to ask.
        peer: P,
        /// The chunk.
        chunk: u32,
    },
    /// Abandon the request for `chunk` to `peer`: another peer delivered it first, the request
    /// timed out, or the peer struck out. A delivery that still arrives is harmless.
    Cancel {
        /// The peer asked.
        peer: P,
        /// The chunk.
        chunk: u32,
    },
    /// `peer` sent bad data: disconnect it. The plan never uses it again. Emitted once per peer.
    Ban {
        /// The peer.
        peer: P,
    },
}

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
    /// Whether it is in another site ([`Event::PeerRemote`]).
    pub remote: bool,
}

#[derive(Debug, Clone)]
struct PeerState {
    /// What it holds; `chunk_count` bits long. Cleared when it goes.
    have: Bitfield,
    connected: bool,
    banned: bool,
    strikes: u32,
    /// Chunk requested from it → when.
    in_flight: InFlight,
    /// Chunks it failed or timed out on in this session: asked again only as a last resort.
    failed: BTreeSet<u32>,
    bytes_delivered: u64,
    chunks_delivered: u64,
    /// Bytes delivered for requests that were outstanding: the numerator of its rate.
    measured_bytes: u64,
    /// Time it had requests outstanding, up to `busy_since`.
    busy_total: Duration,
    /// When its current run of outstanding requests began.
    busy_since: Option<Duration>,
    /// `measured_bytes` per second of busy time, as of its last request's end.
    rate: Option<u64>,
    /// Seeded tie-breaker between otherwise equal peers.
    tiebreak: u64,
    /// In another site.
    remote: bool,
    /// Its fixed hash, for the rendezvous score that decides which local node fetches a chunk
    /// only remote peers hold.
    key: u64,
    /// Chunks it says it is sending or has sent to some peer ([`Event::PeerUploads`]); empty
    /// until it says.
    claimed: Bitfield,
    /// "Busy" answers in a row since its last delivery.
    busy: u32,
    /// It is asked for nothing new before this (it answered "busy").
    rest_until: Option<Duration>,
}

/// The requests outstanding to one peer, chunk → when issued, in chunk order: a few (the peer's
/// limit), so a sorted vector, which the scheduler scans without chasing tree nodes.
#[derive(Debug, Clone, Default)]
struct InFlight(Vec<(u32, Duration)>);

impl InFlight {
    /// Records a request; returns when the one it replaces was issued, if there was one.
    fn insert(&mut self, chunk: u32, issued: Duration) -> Option<Duration> {
        match self.0.binary_search_by_key(&chunk, |&(c, _)| c) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, issued)),
            Err(i) => {
                self.0.insert(i, (chunk, issued));
                None
            }
        }
    }

    fn remove(&mut self, chunk: &u32) -> Option<Duration> {
        let i = self.0.binary_search_by_key(chunk, |&(c, _)| c).ok()?;
        Some(self.0.remove(i).1)
    }

    fn contains_key(&self, chunk: &u32) -> bool {
        self.0.iter().any(|(c, _)| c == chunk)
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn iter(&self) -> impl Iterator<Item = (&u32, &Duration)> {
        self.0.iter().map(|(c, t)| (c, t))
    }

    fn values(&self) -> impl Iterator<Item = &Duration> {
        self.0.iter().map(|(_, t)| t)
    }

    fn into_keys(self) -> impl Iterator<Item = u32> {
        self.0.into_iter().map(|(c, _)| c)
    }
}

/// The peers a plan has heard of, in key order: the keys in one vector, so that a lookup is a
/// binary search over a cache line or two rather than a walk down a tree, and their states in
/// another at the same index. A peer is never removed (one that went keeps its strikes and ban),
/// so an index stays valid until the next insertion.
#[derive(Debug, Clone)]
struct Peers<P> {
    keys: Vec<P>,
    states: Vec<PeerState>,
}

impl<P: Ord> Peers<P> {
    fn new() -> Self {
        Peers {
            keys: Vec::new(),
            states: Vec::new(),
        }
    }

    fn index(&self, peer: &P) -> Option<usize> {
        self.keys.binary_search(peer).ok()
    }

    fn get(&self, peer: &P) -> Option<&PeerState> {
        self.index(peer).map(|i| &self.states[i])
    }

    fn get_mut(&mut self, peer: &P) -> Option<&mut PeerState> {
        self.index(peer).map(|i| &mut self.states[i])
    }

    fn contains_key(&self, peer: &P) -> bool {
        self.index(peer).is_some()
    }

    /// The peer's state, inserted from `new` if it is not there yet.
    fn get_or_insert_with(&mut self, peer: P, new: impl FnOnce() -> PeerState) -> &mut PeerState {
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

    fn values(&self) -> std::slice::Iter<'_, PeerState> {
        self.states.iter()
    }

    fn values_mut(&mut self) -> std::slice::IterMut<'_, PeerState> {
        self.states.iter_mut()
    }

    fn iter(&self) -> impl Iterator<Item = (&P, &PeerState)> {
        self.keys.iter().zip(&self.states)
    }
}

impl PeerState {
    fn new(chunk_count: u32, tiebreak: u64, key: u64) -> Self {
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

    fn usable(&self, max_strikes: u32) -> bool {
        self.connected && !self.banned && self.strikes < max_strikes
    }

    fn update_rate(&mut self, now: Duration) {
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

    fn end_busy(&mut self, now: Duration) {
        if let Some(since) = self.busy_since.take() {
            self.busy_total += now.saturating_sub(since);
        }
        self.update_rate(now);
    }

    /// The rate used to compare it with other peers: its measurement, the median for a peer not
    /// measured yet, and 1 byte/s for a peer measured at zero (slowest, but still usable).
    fn effective_rate(&self, median: Option<u64>) -> u64 {
        match self.rate {
            Some(rate) => rate.max(1),
            None => median.unwrap_or(NOMINAL_RATE_BYTES_PER_SEC).max(1),
        }
    }

    /// How many requests it may have outstanding: the base, scaled by its rate over the median.
    fn limit(&self, base: usize, median: Option<u64>) -> usize {
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

/// The download plan for one blob of `chunk_count` chunks from many peers. See the module
/// documentation for the policy.
///
/// `P` is the peer's identity (a libp2p `PeerId` in the node, a small integer in simulations).
/// Peers are kept ordered by `P`, so iteration, and therefore every decision, is deterministic.
#[derive(Debug, Clone)]
pub struct Plan<P> {
    config: PlanConfig,
    chunk_count: u32,
    held: Bitfield,
    /// Chunks not held.
    missing: u32,
    /// Chunk → how many usable peers hold it.
    avail: Vec<u32>,
    /// Chunk → how many usable local (not remote) peers hold it.
    avail_local: Vec<u32>,
    /// Chunk → how many usable holders say they sent it or are sending it. Empty until a peer
    /// reports its uploads, like the two below.
    avail_claimed: Vec<u32>,
    /// Chunk → when a peer first said it had sent it.
    sent_seen: Vec<Option<Duration>>,
    /// Chunk → when a peer first said it was sending it.
    sending_seen: Vec<Option<Duration>>,
    /// Moving average of this node's request times, from request to verified delivery.
    chunk_time: Option<Duration>,
    /// The latest `now` the driver passed in.
    clock: Duration,
    /// This node's key for the rendezvous score, if the driver said who it is.
    me: Option<u64>,
    /// Requests outstanding to remote peers.
    remote_in_flight: usize,
    /// How many requests are outstanding for each chunk (indexed by chunk: the scheduler asks
    /// for every missing chunk on every call, so a lookup must cost no tree walk).
    requesters: Vec<u32>,
    /// Requests outstanding, over all peers.
    total_in_flight: usize,
    peers: Peers<P>,
    peers_seen: u64,
    /// `[from, end)`, requested before everything else, in order.
    window: Option<(u32, u32)>,
    /// Cancels and bans decided while handling events, returned by the next `next_actions`.
    pending: Vec<Action<P>>,
    /// When this node last stored a chunk (or first planned): the start of the wait after which
    /// a chunk no gateway fetches is taken anyway (see [`Plan::backstop_due`]).
    progress_at: Option<Duration>,
    /// Lower bounds that let [`Plan::expire`] skip its scans.
    floors: Floors,
    /// The scheduling pass's working vectors, kept between calls so that a pass allocates
    /// nothing.
    scratch: Scratch,
}

/// No outstanding request was issued before `issued`, and no peer's rest ends before `rest`
/// (`Duration::MAX`: none). Lowered when a request is issued or a rest begins, raised only when
/// [`Plan::expire`] scans; so they stay lower bounds whatever ends in between.
#[derive(Debug, Clone)]
struct Floors {
    issued: Duration,
    rest: Duration,
}

impl Default for Floors {
    fn default() -> Self {
        Floors {
            issued: Duration::MAX,
            rest: Duration::MAX,
        }
    }
}

/// A chunk's place in the scheduling order (least first); see [`Plan::schedule`].
type ChunkKey = (u64, u32, u64, u64);

#[derive(Debug, Clone, Default)]
struct Scratch {
    /// Peers with a free slot, by index in [`Plan::peers`], and how many slots.
    spare: Vec<(usize, usize)>,
    fresh: Vec<u32>,
    order: Vec<(ChunkKey, u32)>,
}

impl<P: Clone + Eq + Hash + Ord + Debug> Plan<P> {
    /// A plan for a blob of `chunk_count` chunks, of which `held` are already on disk (resuming a
    /// partial download; a `held` of another length is cut or padded with missing chunks).
    pub fn new(chunk_count: u32, held: Bitfield, config: PlanConfig) -> Self {
        let held = if held.len() == chunk_count {
            held
        } else {
            held.resized(chunk_count)
        };
        let config = PlanConfig {
            max_in_flight_per_peer: config.max_in_flight_per_peer.max(1),
            max_in_flight: config.max_in_flight.max(1),
            pipeline: config.pipeline.max(1),
            endgame_duplicates: config.endgame_duplicates.max(1),
            max_strikes: config.max_strikes.max(1),
            max_remote_in_flight: config.max_remote_in_flight.max(1),
            site_remote_in_flight: config.site_remote_in_flight.max(1),
            block_chunks: config.block_chunks.max(1),
            ..config
        };
        Plan {
            missing: chunk_count.saturating_sub(held.count_ones()),
            avail: vec![0; chunk_count as usize],
            avail_local: vec![0; chunk_count as usize],
            avail_claimed: Vec::new(),
            sent_seen: Vec::new(),
            sending_seen: Vec::new(),
            chunk_time: None,
            clock: Duration::ZERO,
            me: None,
            remote_in_flight: 0,
            chunk_count,
            held,
            config,
            requesters: vec![0; chunk_count as usize],
            total_in_flight: 0,
            peers: Peers::new(),
            peers_seen: 0,
            window: None,
            pending: Vec::new(),
            progress_at: None,
            floors: Floors::default(),
            scratch: Scratch::default(),
        }
    }

    /// Tells the plan which peer it runs for, so that it can take its share of the chunks only
    /// remote peers hold (see *Sites* in the module documentation). Without it, this node fetches
    /// any such chunk itself.
    pub fn with_self(mut self, me: &P) -> Self {
        self.me = Some(stable_hash(me));
        self
    }

    /// The configuration in use (after zeros were raised to one).
    pub fn config(&self) -> &PlanConfig {
        &self.config
    }

    /// The number of chunks in the blob.
    pub fn chunk_count(&self) -> u32 {
        self.chunk_count
    }

    /// The chunks held (verified and stored).
    pub fn held(&self) -> &Bitfield {
        &self.held
    }

    /// The number of chunks not held yet.
    pub fn missing(&self) -> u32 {
        self.missing
    }

    /// Whether every chunk is held.
    pub fn is_complete(&self) -> bool {
        self.missing == 0
    }

    /// Requests outstanding, over all peers, endgame duplicates included.
    pub fn in_flight(&self) -> usize {
        self.total_in_flight
    }

    /// Requests chunks `[from, from + len)` before any other, in index order, so a client reading
    /// the blob sequentially is not starved by rarest-first order. Replaces the previous window;
    /// `len == 0` removes it.
    pub fn set_priority_window(&mut self, from: u32, len: u32) {
        self.window = (len > 0 && from < self.chunk_count)
            .then(|| (from, from.saturating_add(len).min(self.chunk_count)));
    }

    /// Applies one event. Cancels and bans it calls for are returned by the next
    /// [`Plan::next_actions`].
    pub fn handle(&mut self, event: Event<P>, now: Duration) {
        self.clock = self.clock.max(now);
        match event {
            Event::PeerHas { peer, have } => self.on_peer_has(peer, have),
            Event::PeerHasChunk { peer, chunk } => self.on_peer_has_chunk(peer, chunk),
            Event::PeerGone { peer } => self.on_peer_gone(&peer, now),
            Event::ChunkDone { peer, chunk, bytes } => self.on_chunk_done(&peer, chunk, bytes, now),
            Event::ChunkBad { peer, chunk: _ } => self.ban(peer, now),
            Event::ChunkFailed { peer, chunk } => self.on_chunk_failed(&peer, chunk, now),
            Event::PeerRemote { peer } => self.on_peer_remote(peer),
            Event::PeerUploads {
                peer,
                sending,
                sent,
            } => self.on_peer_uploads(peer, sending, sent, now),
            Event::ChunkBusy { peer, chunk } => self.on_chunk_busy(&peer, chunk, now),
        }
    }

    /// Expires the requests that timed out by `now`, then returns what to do: first the cancels
    /// and bans decided since the last call, then the new requests. A cancel decided for a request
    /// that ended before this call (its chunk arrived or failed, its peer went) is not returned.
    /// Call it after every batch of events and at [`Plan::next_deadline`].
    pub fn next_actions(&mut self, now: Duration) -> Vec<Action<P>> {
        self.clock = self.clock.max(now);
        self.progress_at.get_or_insert(now);
        self.expire(now);
        let mut out = std::mem::take(&mut self.pending);
        self.schedule(now, &mut out);
        out
    }

    /// Whether the download cannot progress: not complete, nothing in flight, and no usable peer
    /// holds a missing chunk.
    pub fn is_stalled(&self) -> bool {
        !self.is_complete()
            && self.total_in_flight == 0
            && !self.peers.values().any(|peer| {
                peer.usable(self.config.max_strikes) && peer.have.has_any_not_in(&self.held)
            })
    }

    /// When to call [`Plan::next_actions`] at the latest if no event comes first: when the
    /// oldest outstanding request times out, a busy peer's rest ends, or a chunk stops waiting
    /// for a copy from another peer. `None` if nothing is pending.
    pub fn next_deadline(&self) -> Option<Duration> {
        let timeouts = self
            .peers
            .values()
            .flat_map(|peer| peer.in_flight.values())
            .filter_map(|&issued| issued.checked_add(self.config.request_timeout));
        let rests = self.peers.values().filter_map(|peer| peer.rest_until);
        timeouts
            .chain(rests)
            .chain(self.copy_deadline())
            .chain(self.backstop_deadline())
            .min()
    }

    /// Whether `peer` is usable and has fewer requests outstanding than its limit (the
    /// `usable` and `in_flight < in_flight_limit` of [`Plan::peer_stats`]). Every limit is at
    /// least one and at least the base, so a peer with nothing outstanding needs neither worked
    /// out (the base counts the usable peers), and one below the base needs no median rate.
    pub fn has_free_slot(&self, peer: &P) -> bool {
        let Some(state) = self.peers.get(peer) else {
            return false;
        };
        if !state.usable(self.config.max_strikes) {
            return false;
        }
        let n = state.in_flight.len();
        if n == 0 {
            return true;
        }
        let base = self.base_limit();
        n < base || n < state.limit(base, self.median_rate())
    }

    /// What the plan knows about `peer`, if it has heard of it.
    pub fn peer_stats(&self, peer: &P) -> Option<PeerStats> {
        let state = self.peers.get(peer)?;
        let usable = state.usable(self.config.max_strikes);
        Some(PeerStats {
            bytes_delivered: state.bytes_delivered,
            chunks_delivered: state.chunks_delivered,
            strikes: state.strikes,
            banned: state.banned,
            connected: state.connected,
            usable,
            in_flight: state.in_flight.len(),
            in_flight_limit: if usable {
                state.limit(self.base_limit(), self.median_rate())
            } else {
                0
            },
            rate_bytes_per_sec: state.rate,
            remote: state.remote,
        })
    }

    // ---- events ----

    fn entry(&mut self, peer: P) -> &mut PeerState {
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

    /// Removes the peer's chunks from the availability counts, if it counts (it is usable).
    /// Called before any change to its bitfield or usability, with `contribute` after it.
    fn withdraw(&mut self, peer: &P) {
        let Some(state) = self.peers.get(peer) else {
            return;
        };
        if state.usable(self.config.max_strikes) {
            for chunk in state.have.iter_ones() {
                if let Some(count) = self.avail.get_mut(chunk as usize) {
                    *count = count.saturating_sub(1);
                }
                if let Some(count) = self.avail_local.get_mut(chunk as usize) {
                    *count = count.saturating_sub(u32::from(!state.remote));
                }
                if let Some(count) = self.avail_claimed.get_mut(chunk as usize) {
                    *count = count.saturating_sub(u32::from(state.claimed.get(chunk)));
                }
            }
        }
    }

    /// Adds the peer's chunks to the availability counts, if it counts.
    fn contribute(&mut self, peer: &P) {
        let Some(state) = self.peers.get(peer) else {
            return;
        };
        if state.usable(self.config.max_strikes) {
            for chunk in state.have.iter_ones() {
                if let Some(count) = self.avail.get_mut(chunk as usize) {
                    *count = count.saturating_add(1);
                }
                if let Some(count) = self.avail_local.get_mut(chunk as usize) {
                    *count = count.saturating_add(u32::from(!state.remote));
                }
                if let Some(count) = self.avail_claimed.get_mut(chunk as usize) {
                    *count = count.saturating_add(u32::from(state.claimed.get(chunk)));
                }
            }
        }
    }

    fn on_peer_has(&mut self, peer: P, have: Bitfield) {
        let have = if have.len() == self.chunk_count {
            have
        } else {
            Bitfield::new(self.chunk_count)
        };
        if self.entry(peer.clone()).banned {
            return;
        }
        self.withdraw(&peer);
        let state = self.entry(peer.clone());
        if !state.connected {
            reconnect(state);
        }
        state.have = have;
        self.contribute(&peer);
    }

    fn on_peer_has_chunk(&mut self, peer: P, chunk: u32) {
        if chunk >= self.chunk_count {
            return;
        }
        let max_strikes = self.config.max_strikes;
        let state = self.entry(peer.clone());
        if state.banned {
            return;
        }
        if !state.connected {
            // A have from a peer that had gone: a new session (its bitfield was cleared).
            reconnect(state);
            state.have.set(chunk);
            self.contribute(&peer);
            return;
        }
        let counts = state.have.set(chunk) && state.usable(max_strikes);
        let local = !state.remote;
        let claimed = state.claimed.get(chunk);
        if let Some(count) = self.avail.get_mut(chunk as usize).filter(|_| counts) {
            *count = count.saturating_add(1);
        }
        if let Some(count) = self.avail_local.get_mut(chunk as usize) {
            *count = count.saturating_add(u32::from(counts && local));
        }
        if let Some(count) = self.avail_claimed.get_mut(chunk as usize) {
            *count = count.saturating_add(u32::from(counts && claimed));
        }
    }

    fn on_peer_uploads(&mut self, peer: P, sending: Bitfield, sent: Bitfield, now: Duration) {
        let n = self.chunk_count;
        if self.entry(peer.clone()).banned {
            return;
        }
        if self.avail_claimed.is_empty() {
            self.avail_claimed = vec![0; n as usize];
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

    fn on_chunk_busy(&mut self, peer: &P, chunk: u32, now: Duration) {
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

    fn on_peer_remote(&mut self, peer: P) {
        if self.entry(peer.clone()).remote {
            return;
        }
        self.withdraw(&peer);
        let state = self.entry(peer.clone());
        state.remote = true;
        // Requests already sent stay; they count against the remote cap from now on.
        let n = state.in_flight.len();
        self.remote_in_flight += n;
        self.contribute(&peer);
    }

    fn on_peer_gone(&mut self, peer: &P, now: Duration) {
        if !self.peers.contains_key(peer) {
            return;
        }
        self.withdraw(peer);
        self.drop_requests(peer, now, false);
        self.forget_pending_cancel(peer, None);
        if let Some(state) = self.peers.get_mut(peer) {
            state.connected = false;
            state.have = Bitfield::new(self.chunk_count);
            state.claimed = Bitfield::new(0);
            state.rest_until = None;
        }
    }

    fn on_chunk_done(&mut self, peer: &P, chunk: u32, bytes: u64, now: Duration) {
        if chunk >= self.chunk_count {
            return;
        }
        self.forget_pending_cancel(peer, Some(chunk));
        self.progress_at = Some(now);
        if let Some(state) = self.peers.get_mut(peer) {
            state.bytes_delivered = state.bytes_delivered.saturating_add(bytes);
            state.chunks_delivered = state.chunks_delivered.saturating_add(1);
            if state.in_flight.contains_key(&chunk) {
                // Only a peer that is usable has requests outstanding, so clearing its strikes
                // cannot revive a peer that struck out.
                state.measured_bytes = state.measured_bytes.saturating_add(bytes);
                state.strikes = 0;
                state.busy = 0;
                state.failed.remove(&chunk);
                if let Some(issued) = self.remove_request(peer, chunk, now) {
                    let took = now.saturating_sub(issued);
                    // An average over about the last eight requests.
                    self.chunk_time = Some(match self.chunk_time {
                        Some(avg) if took >= avg => avg + (took - avg) / 8,
                        Some(avg) => avg - (avg - took) / 8,
                        None => took,
                    });
                }
            }
        }
        if self.held.set(chunk) {
            self.missing = self.missing.saturating_sub(1);
        }
        if self.requested(chunk) {
            let losers: Vec<P> = self
                .peers
                .iter()
                .filter(|(_, state)| state.in_flight.contains_key(&chunk))
                .map(|(p, _)| p.clone())
                .collect();
            for loser in losers {
                self.remove_request(&loser, chunk, now);
                self.pending.push(Action::Cancel { peer: loser, chunk });
            }
        }
    }

    fn on_chunk_failed(&mut self, peer: &P, chunk: u32, now: Duration) {
        self.forget_pending_cancel(peer, Some(chunk));
        // A failure for a request no longer outstanding (cancelled, timed out) was already dealt
        // with: no second strike.
        if self.remove_request(peer, chunk, now).is_none() {
            return;
        }
        if let Some(state) = self.peers.get_mut(peer) {
            state.failed.insert(chunk);
        }
        self.strike(peer, now);
    }

    fn ban(&mut self, peer: P, now: Duration) {
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

    fn strike(&mut self, peer: &P, now: Duration) {
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

    // ---- requests ----

    fn add_request(&mut self, peer: &P, chunk: u32, now: Duration) {
        let Some(state) = self.peers.get_mut(peer) else {
            return;
        };
        if state.in_flight.is_empty() {
            state.busy_since = Some(now);
        }
        self.floors.issued = self.floors.issued.min(now);
        if state.in_flight.insert(chunk, now).is_none() {
            if let Some(count) = self.requesters.get_mut(chunk as usize) {
                *count += 1;
            }
            self.total_in_flight += 1;
            self.remote_in_flight += usize::from(state.remote);
        }
    }

    /// Forgets one outstanding request; returns when it was issued, if it was outstanding.
    fn remove_request(&mut self, peer: &P, chunk: u32, now: Duration) -> Option<Duration> {
        let state = self.peers.get_mut(peer)?;
        let issued = state.in_flight.remove(&chunk)?;
        if state.in_flight.is_empty() {
            state.end_busy(now);
        } else {
            state.update_rate(now);
        }
        let remote = state.remote;
        self.release(chunk, remote);
        Some(issued)
    }

    /// Forgets all the peer's outstanding requests, cancelling them if `cancel`.
    fn drop_requests(&mut self, peer: &P, now: Duration, cancel: bool) {
        let Some(state) = self.peers.get_mut(peer) else {
            return;
        };
        let chunks = std::mem::take(&mut state.in_flight);
        state.end_busy(now);
        let remote = state.remote;
        for chunk in chunks.into_keys() {
            self.release(chunk, remote);
            if cancel {
                self.pending.push(Action::Cancel {
                    peer: peer.clone(),
                    chunk,
                });
            }
        }
    }

    /// Drops the cancels not yet returned for requests to `peer` (for `chunk`, or all) that ended
    /// meanwhile: the driver has nothing left to cancel.
    fn forget_pending_cancel(&mut self, peer: &P, chunk: Option<u32>) {
        self.pending.retain(|action| match action {
            Action::Cancel { peer: p, chunk: c } => p != peer || chunk.is_some_and(|x| x != *c),
            _ => true,
        });
    }

    fn release(&mut self, chunk: u32, remote: bool) {
        if remote {
            self.remote_in_flight = self.remote_in_flight.saturating_sub(1);
        }
        if let Some(count) = self.requesters.get_mut(chunk as usize) {
            *count = count.saturating_sub(1);
        }
        self.total_in_flight = self.total_in_flight.saturating_sub(1);
    }

    fn expire(&mut self, now: Duration) {
        // Both scans visit every peer; the floors (lower bounds) skip them when nothing can be
        // due, which is nearly always.
        if self.floors.rest <= now {
            let mut next = Duration::MAX;
            for state in self.peers.values_mut() {
                match state.rest_until {
                    Some(until) if now >= until => state.rest_until = None,
                    Some(until) => next = next.min(until),
                    None => {}
                }
            }
            self.floors.rest = next;
        }
        let timeout = self.config.request_timeout;
        if self
            .floors
            .issued
            .checked_add(timeout)
            .is_none_or(|deadline| now < deadline)
        {
            return;
        }
        let expired: Vec<(P, Vec<u32>)> = self
            .peers
            .iter()
            .filter_map(|(peer, state)| {
                let chunks: Vec<u32> = state
                    .in_flight
                    .iter()
                    .filter(|&(_, &issued)| {
                        issued
                            .checked_add(timeout)
                            .is_some_and(|deadline| now >= deadline)
                    })
                    .map(|(&chunk, _)| chunk)
                    .collect();
                (!chunks.is_empty()).then(|| (peer.clone(), chunks))
            })
            .collect();
        for (peer, chunks) in expired {
            for chunk in chunks {
                if self.remove_request(&peer, chunk, now).is_some() {
                    if let Some(state) = self.peers.get_mut(&peer) {
                        state.failed.insert(chunk);
                    }
                    self.pending.push(Action::Cancel {
                        peer: peer.clone(),
                        chunk,
                    });
                }
            }
            self.strike(&peer, now);
        }
        self.floors.issued = self
            .peers
            .values()
            .flat_map(|state| state.in_flight.values())
            .copied()
            .min()
            .unwrap_or(Duration::MAX);
    }

    // ---- scheduling ----

    /// The base number of requests each usable peer may have outstanding before rates scale it:
    /// [`PlanConfig::pipeline`] divided among the usable peers, rounded up, between one and
    /// [`PlanConfig::max_in_flight_per_peer`].
    fn base_limit(&self) -> usize {
        let cap = self.config.max_in_flight_per_peer;
        let usable = self
            .peers
            .values()
            .filter(|peer| peer.usable(self.config.max_strikes))
            .count();
        self.config.pipeline.div_ceil(usable.max(1)).clamp(1, cap)
    }

    /// The lower median of the positive measured rates of usable peers.
    fn median_rate(&self) -> Option<u64> {
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

    /// The seeded position of a chunk among equally rare ones: its block first (see
    /// [`PlanConfig::block_chunks`]), then the seeded permutation. Two chunks of a block may
    /// share a rank; the chunk index, last in every key, tells them apart.
    fn rank(&self, chunk: u32) -> u64 {
        let block = u64::from(chunk / self.config.block_chunks);
        let shuffled = mix(self
            .config
            .seed
            .wrapping_add(GOLDEN_GAMMA.wrapping_mul(u64::from(chunk) + 1)));
        (block << 32) | (shuffled >> 32)
    }

    /// The order fresh chunks are asked in, least first: the priority window, then rarest, then
    /// this node's stripe of the site, then the seeded rank; with the chunk, which the rank
    /// already tells apart.
    fn chunk_key(&self, chunk: u32, stripe: Option<(u64, u64)>) -> (ChunkKey, u32) {
        let key = (
            self.window_key(chunk),
            self.avail(chunk),
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

    fn avail(&self, chunk: u32) -> u32 {
        self.avail.get(chunk as usize).copied().unwrap_or(0)
    }

    /// Whether a request for `chunk` is outstanding.
    fn requested(&self, chunk: u32) -> bool {
        self.requesters.get(chunk as usize).is_some_and(|&n| n > 0)
    }

    fn avail_local(&self, chunk: u32) -> u32 {
        self.avail_local.get(chunk as usize).copied().unwrap_or(0)
    }

    /// The site's downloaders as this node sees them: itself and its usable local peers not
    /// holding the whole blob. The stripe, the gateways and the owners of remote-only chunks are
    /// all derived from it. `None` without [`Plan::with_self`].
    fn site(&self) -> Option<SiteView> {
        let me = self.me?;
        let max_strikes = self.config.max_strikes;
        let mut keys: Vec<u64> = self
            .peers
            .values()
            .filter(|s| s.usable(max_strikes) && !s.remote && !s.have.is_full() && s.key != me)
            .map(|s| s.key)
            .chain([me])
            .collect();
        // Only the gateways need telling apart from the rest, as a set, and the rank is a count:
        // no sort (this runs at every scheduling pass).
        let budget = self.config.site_remote_in_flight;
        if budget < keys.len() {
            keys.select_nth_unstable(budget);
        }
        let rank = keys.iter().filter(|&&k| k < me).count();
        Some(SiteView {
            keys,
            me,
            rank,
            budget,
        })
    }

    /// Whether this node has waited long enough for the site's gateways: nothing in flight and
    /// no chunk stored for a request timeout. Then it takes the chunks only remote peers hold
    /// that it owns as a backstop ([`SiteView::owns_as_backstop`]), as many as its own cap
    /// allows. In a site that progresses, every downloader stores a chunk every few seconds.
    fn backstop_due(&self, now: Duration) -> bool {
        self.backstop_at().is_some_and(|at| now >= at)
    }

    /// When the backstop is due while nothing is in flight: a request timeout after the last
    /// progress.
    fn backstop_at(&self) -> Option<Duration> {
        let t = self.progress_at.filter(|_| self.total_in_flight == 0)?;
        Some(t.saturating_add(self.config.request_timeout))
    }

    /// When [`Plan::backstop_due`] becomes true, if that is still ahead and could matter.
    fn backstop_deadline(&self) -> Option<Duration> {
        if self.missing == 0 || self.me.is_none() || !self.peers.values().any(|s| s.remote) {
            return None;
        }
        self.backstop_at().filter(|&at| at > self.clock)
    }

    /// How long a chunk every holder already gave away waits for a copy elsewhere: three
    /// typical request times (the moving average; before any request completed, the age of the
    /// oldest one outstanding), at least [`PlanConfig::upload_patience`] and at most half the
    /// request timeout. The cap keeps the wait finite when requests stall: a patience that grew
    /// with the age of a stuck request would never run out.
    fn patience(&self, now: Duration) -> Duration {
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

    /// `patience` within [`PlanConfig::upload_patience`] and half the request timeout.
    fn bound_patience(&self, patience: Duration) -> Duration {
        let floor = self.config.upload_patience;
        patience.min(self.config.request_timeout / 2).max(floor)
    }

    /// Whether `chunk` should not be requested yet because every usable holder says it has sent
    /// it, or is sending it, to another peer: that peer will serve it soon, so asking a holder
    /// again would spend its uplink (a seeder's, usually the fleet's bottleneck) on a duplicate.
    /// The wait ends `patience` after a holder first said it had sent the chunk, or
    /// [`SENDING_PATIENCE`] times that after a holder first said it was sending it, so a copy
    /// that never reaches this node's peers is fetched all the same.
    fn waits_for_copy(&self, chunk: u32, now: Duration, patience: Duration) -> bool {
        let i = chunk as usize;
        let Some(&claimed) = self.avail_claimed.get(i) else {
            return false;
        };
        if claimed == 0 || claimed < self.avail(chunk) {
            return false;
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

    /// The earliest moment after the latest call a chunk waiting for a copy may stop waiting (a
    /// lower bound: the patience only grows with time). Chunks whose wait is over already need
    /// no deadline: they are requested as soon as a slot frees, which is an event.
    fn copy_deadline(&self) -> Option<Duration> {
        if self.avail_claimed.is_empty() {
            return None;
        }
        let patience =
            self.bound_patience(self.chunk_time.unwrap_or(Duration::ZERO).saturating_mul(3));
        self.held
            .iter_zeros()
            .filter(|chunk| {
                !self.requested(*chunk)
                    && self.avail(*chunk) > 0
                    && self.avail_claimed.get(*chunk as usize) == Some(&self.avail(*chunk))
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
        spare
            .iter()
            .filter_map(|&(peer, _)| {
                let state = &self.peers.states[peer];
                // An endgame duplicate never goes to a holder that is sending the chunk already
                // (maybe to this node) or sent it: a seeder's uplink is too dear for a spare copy.
                if state.remote != remote
                    || !state.have.get(chunk)
                    || state.in_flight.contains_key(&chunk)
                    || (endgame && state.claimed.get(chunk))
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

    fn schedule(&mut self, now: Duration, out: &mut Vec<Action<P>>) {
        let mut scratch = std::mem::take(&mut self.scratch);
        self.schedule_in(now, out, &mut scratch);
        self.scratch = scratch;
    }

    fn schedule_in(&mut self, now: Duration, out: &mut Vec<Action<P>>, scratch: &mut Scratch) {
        if self.missing == 0 {
            return;
        }
        let mut global = self
            .config
            .max_in_flight
            .saturating_sub(self.total_in_flight);
        if global == 0 {
            return;
        }
        let median = self.median_rate();
        let base = self.base_limit();
        let max_strikes = self.config.max_strikes;
        // Peers with a free slot, by index in `self.peers` (no peer is added before the end),
        // with their number of free slots.
        let spare = &mut scratch.spare;
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
        if spare.is_empty() {
            return;
        }

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
        for &(peer, _) in spare.iter() {
            // The count is kept in the peer's state; the words are elsewhere on the heap.
            let state = &self.peers.states[peer];
            if state.have.count_ones() > 0 {
                reachable.union_with(&state.have);
            }
        }
        let mut all_requested = true;
        // With no site view (no `with_self`), this node is its site's only gateway.
        let site = self.site();
        let per_node = self.config.max_remote_in_flight;
        let remote_share = site.as_ref().map_or(per_node, |s| s.share(per_node));
        let owns = |chunk| site.as_ref().is_none_or(|s| s.owns(chunk));
        let backstop = self.backstop_due(now);
        let patience = self.patience(now);
        let fresh = &mut scratch.fresh;
        fresh.clear();
        for chunk in self.held.iter_zeros() {
            if self.requested(chunk) {
                continue;
            }
            if self.avail(chunk) == 0 || self.waits_for_copy(chunk, now, patience) {
                all_requested = false;
            } else if reachable.get(chunk) {
                fresh.push(chunk);
            } else if all_requested && (self.avail_local(chunk) > 0 || owns(chunk)) {
                all_requested = false;
            }
        }
        let stripe = site.as_ref().map(SiteView::stripe);
        // In order of the key, least first (keys are distinct). The loop mostly stops after a
        // few chunks (the slots run out) and there may be hundreds of them, so one pass keeps
        // only the first `global` in order; a chunk whose first two parts of the key (window and
        // availability) already lose to the last of those is passed over without the rest of
        // its key, which in a rollout is most of them (rarest first: few chunks share the
        // least availability; where all tie, as with one seeder, each costs a full key and an
        // insertion into a few). The rest are keyed and sorted only if the loop gets that far.
        let keyed = &mut scratch.order;
        keyed.clear();
        let head = global.min(fresh.len());
        for &chunk in fresh.iter() {
            if let Some(&((window, avail, ..), _)) = keyed.get(head.wrapping_sub(1)) {
                if (self.window_key(chunk), self.avail(chunk)) > (window, avail) {
                    continue;
                }
            }
            let entry = self.chunk_key(chunk, stripe);
            let at = keyed.partition_point(|e| *e < entry);
            if at < head {
                keyed.truncate(head - 1);
                keyed.insert(at, entry);
            }
        }
        for i in 0..fresh.len() {
            if global == 0 || spare.is_empty() {
                all_requested = false;
                break;
            }
            if i == head {
                // Past the first `global` with slots left: the rest, in order (the first ones
                // are the same).
                keyed.clear();
                keyed.extend(fresh.iter().map(|&chunk| self.chunk_key(chunk, stripe)));
                keyed.sort_unstable();
            }
            let Some(&(_, chunk)) = keyed.get(i) else {
                break;
            };
            let peer = if self.avail_local(chunk) > 0 {
                self.pick_peer(chunk, spare, median, false, false)
            } else if !owns(chunk) {
                // Another downloader of this site brings it over the WAN; it is not ours to wait
                // for, so it does not hold endgame back. Unless no one has for a long while.
                if backstop
                    && self.remote_in_flight < per_node
                    && site.as_ref().is_none_or(|s| s.owns_as_backstop(chunk))
                {
                    if let Some(peer) = self.pick_peer(chunk, spare, median, true, false) {
                        self.assign(peer, chunk, now, spare, &mut global, out);
                    }
                }
                continue;
            } else if self.remote_in_flight < remote_share {
                self.pick_peer(chunk, spare, median, true, false)
            } else {
                None
            };
            match peer {
                Some(peer) => self.assign(peer, chunk, now, spare, &mut global, out),
                None => all_requested = false,
            }
        }

        // Endgame: every chunk that can be requested is in flight; duplicate the oldest.
        let duplicates = self.config.endgame_duplicates;
        if !all_requested || duplicates <= 1 || global == 0 || spare.is_empty() {
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
            while count < duplicates && global > 0 && !spare.is_empty() {
                // Never a second request over a WAN link.
                let Some(peer) = self.pick_peer(chunk, spare, median, false, true) else {
                    break;
                };
                self.assign(peer, chunk, now, spare, &mut global, out);
                count += 1;
            }
            if global == 0 || spare.is_empty() {
                break;
            }
        }
    }

    /// Requests `chunk` from the peer at index `peer` of `self.peers`, one of `spare`.
    fn assign(
        &mut self,
        peer: usize,
        chunk: u32,
        now: Duration,
        spare: &mut Vec<(usize, usize)>,
        global: &mut usize,
        out: &mut Vec<Action<P>>,
    ) {
        let peer_id = self.peers.keys[peer].clone();
        self.add_request(&peer_id, chunk, now);
        *global = global.saturating_sub(1);
        if let Some(i) = spare.iter().position(|&(p, _)| p == peer) {
            spare[i].1 = spare[i].1.saturating_sub(1);
            if spare[i].1 == 0 {
                spare.remove(i);
            }
        }
        out.push(Action::Request {
            peer: peer_id,
            chunk,
        });
    }
}

/// A site's downloaders as one node sees them ([`Plan::site`]): their fixed hashes, the
/// `site_remote_in_flight` least of them first (in no order), this node's among them, and its
/// position in ascending order.
struct SiteView {
    keys: Vec<u64>,
    me: u64,
    rank: usize,
    /// The site's budget of remote requests ([`PlanConfig::site_remote_in_flight`]): as many
    /// of the least keys are put first, the gateways.
    budget: usize,
}

impl SiteView {
    /// This node's stripe: its position `i` among the `m` downloaders. Among equally rare
    /// chunks, each node asks first for those of its own stripe, then its neighbours':
    /// downloaders that start together and know each other ask a seeder for different chunks
    /// from the first request on, before any upload report can tell them apart.
    fn stripe(&self) -> (u64, u64) {
        (self.rank as u64, self.keys.len() as u64)
    }

    /// The site's gateways: the downloaders the site's `budget` of remote requests is dealt out
    /// to, one at a time from the least key; as a set, in no order.
    fn gateways(&self) -> &[u64] {
        &self.keys[..self.budget.min(self.keys.len())]
    }

    /// How many remote requests this node may have outstanding: its turns in dealing out
    /// the site's budget, at most `per_node`.
    fn share(&self, per_node: usize) -> usize {
        let m = self.keys.len().max(1);
        (self.budget / m + usize::from(self.rank < self.budget % m)).min(per_node)
    }

    /// Whether this node is the gateway that fetches `chunk` from remote peers: the least
    /// rendezvous score among the gateways.
    fn owns(&self, chunk: u32) -> bool {
        least_scored(self.gateways(), chunk) == Some(self.me)
    }

    /// Whether this node takes `chunk`, which only remote peers hold, when no gateway brought it
    /// into the site ([`Plan::backstop_due`]): the least rendezvous score among all the
    /// downloaders. Views of the site that differ can leave a chunk to a gateway that is none
    /// in its own view, so that no node fetches it; this rule cannot: the least-scored
    /// downloader of the union of the views owns the chunk in its own view.
    fn owns_as_backstop(&self, chunk: u32) -> bool {
        least_scored(&self.keys, chunk) == Some(self.me)
    }
}

/// The key with the least rendezvous score `mix(key ^ chunk)` for `chunk` (the least key among
/// equal scores).
fn least_scored(keys: &[u64], chunk: u32) -> Option<u64> {
    keys.iter().copied().min_by_key(|&key| {
        (
            mix(key ^ GOLDEN_GAMMA.wrapping_mul(u64::from(chunk) + 1)),
            key,
        )
    })
}

/// The stripe (of `m`) that asks for `chunk` first; see [`SiteView::stripe`].
fn stripe_owner(chunk: u32, m: u64) -> u64 {
    mix(u64::from(chunk).wrapping_mul(GOLDEN_GAMMA) ^ PEER_SALT) % m.max(1)
}

/// A hash of `value` that is the same on every node and every run (FNV-1a over what its `Hash`
/// implementation writes), so that nodes agree on rendezvous scores. `std`'s default hasher is
/// not promised to stay the same between Rust releases.
fn stable_hash<T: Hash + ?Sized>(value: &T) -> u64 {
    struct Fnv(u64);
    impl std::hash::Hasher for Fnv {
        fn finish(&self) -> u64 {
            mix(self.0)
        }
        fn write(&mut self, bytes: &[u8]) {
            for &b in bytes {
                self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
    }
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    value.hash(&mut h);
    std::hash::Hasher::finish(&h)
}

/// A peer that had gone is back: a new session with no strikes.
fn reconnect(state: &mut PeerState) {
    state.connected = true;
    state.strikes = 0;
    state.failed.clear();
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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

    #[test]
    fn bitfield_wire_form_round_trips_and_rejects_spare_bits() {
        let b = bits(10, [0, 3, 9]);
        assert_eq!(b.to_bytes(), vec![0b1001_0000, 0b0100_0000]);
        assert_eq!(Bitfield::from_bytes(&b.to_bytes(), 10), Some(b.clone()));
        assert_eq!(b.iter_ones().collect::<Vec<_>>(), vec![0, 3, 9]);
        assert_eq!(b.iter_zeros().count(), 7);
        assert_eq!(b.count_ones(), 3);
        assert!(!b.is_full());
        // A spare bit set, or the wrong number of bytes, is not a bitfield of 10 chunks.
        assert_eq!(Bitfield::from_bytes(&[0, 0b0010_0000], 10), None);
        assert_eq!(Bitfield::from_bytes(&[0], 10), None);
        assert_eq!(Bitfield::from_bytes(&[0, 0, 0], 10), None);
        // Out of range is ignored, never a panic.
        let mut b = b;
        assert!(!b.set(10));
        assert!(!b.get(u32::MAX));
        assert!(!b.clear(1_000));
        assert!(b.clear(3));
        assert!(!b.get(3));
        let full = Bitfield::full(70);
        assert!(full.is_full());
        assert_eq!(full.count_ones(), 70);
        assert_eq!(full.iter_zeros().count(), 0);
        assert_eq!(Bitfield::from_bytes(&full.to_bytes(), 70), Some(full));
        assert!(Bitfield::new(0).is_full());
        assert_eq!(Bitfield::from_bytes(&[], 0), Some(Bitfield::new(0)));
    }

    proptest! {
        #[test]
        fn bitfield_from_any_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..20), len in 0u32..160) {
            if let Some(b) = Bitfield::from_bytes(&bytes, len) {
                prop_assert_eq!(b.to_bytes(), bytes);
                prop_assert!(b.count_ones() <= len);
            }
        }
    }

    /// The order a plan asks for 64 chunks, one request at a time, from peer 1 holding all of
    /// them and peer 2 holding `0..48`.
    fn request_order(config: PlanConfig) -> Vec<u32> {
        let config = PlanConfig {
            max_in_flight: 1,
            ..config
        };
        let mut plan = Plan::new(64, Bitfield::new(64), config);
        has(&mut plan, 1, Bitfield::full(64));
        has(&mut plan, 2, bits(64, 0..48));
        let order = one_request_at_a_time(&mut plan);
        assert!(plan.is_complete());
        order
    }

    /// Drives `plan` to the end one request at a time (each answered at once by its peer), and
    /// returns the chunks in the order they were asked for.
    fn one_request_at_a_time(plan: &mut Plan<u32>) -> Vec<u32> {
        let mut order = Vec::new();
        for step in 0..u64::from(plan.chunk_count()) {
            let reqs = requests(&plan.next_actions(secs(step)));
            assert_eq!(reqs.len(), 1, "step {step}: {reqs:?}");
            let (peer, chunk) = reqs[0];
            order.push(chunk);
            done(plan, peer, chunk, secs(step));
        }
        order
    }

    #[test]
    fn equally_rare_chunks_go_block_by_block_in_index_order() {
        let order = request_order(config());
        // Rarity first: 48..64 only peer 1 has.
        assert!(
            order[..16].iter().all(|c| (48..64).contains(c)),
            "{order:?}"
        );
        // Then the equally rare rest a block of 16 at a time, blocks in index order...
        for (k, block) in order[16..].chunks(16).enumerate() {
            let range = (16 * k as u32)..(16 * k as u32 + 16);
            assert!(block.iter().all(|c| range.contains(c)), "{order:?}");
        }
        // ...shuffled within a block by the seed, differently on another node.
        let sorted: Vec<u32> = (0..16).collect();
        assert_ne!(order[16..32], sorted[..]);
        let other = request_order(PlanConfig {
            seed: 8,
            ..config()
        });
        assert_ne!(order[16..32], other[16..32]);
        // One block for the whole blob: the seeded order alone, all over the blob.
        let unblocked = request_order(PlanConfig {
            block_chunks: u32::MAX,
            ..config()
        });
        assert!(unblocked[..16].iter().all(|c| (48..64).contains(c)));
        assert!(unblocked[16..32].iter().any(|c| *c >= 16), "{unblocked:?}");
    }

    #[test]
    fn rarest_chunks_are_requested_first() {
        let config = PlanConfig {
            max_in_flight: 1,
            ..config()
        };
        let mut plan = Plan::new(12, Bitfield::new(12), config);
        // Chunks 8..12 only peer 1 has; 4..8 two peers; 0..4 all three.
        has(&mut plan, 1, Bitfield::full(12));
        has(&mut plan, 2, bits(12, 0..8));
        has(&mut plan, 3, bits(12, 0..4));
        let order = one_request_at_a_time(&mut plan);
        assert!(order[..4].iter().all(|c| (8..12).contains(c)), "{order:?}");
        assert!(order[4..8].iter().all(|c| (4..8).contains(c)), "{order:?}");
        assert!(order[8..].iter().all(|c| (0..4).contains(c)), "{order:?}");
        assert!(plan.is_complete());
        assert!(!plan.is_stalled());
    }

    #[test]
    fn a_chunk_only_one_peer_has_goes_before_common_ones() {
        let config = PlanConfig {
            max_in_flight: 2,
            ..config()
        };
        let mut plan = Plan::new(50, Bitfield::new(50), config);
        has(&mut plan, 1, Bitfield::full(50));
        has(&mut plan, 2, bits(50, (0..50).filter(|&c| c != 37)));
        let reqs = requests(&plan.next_actions(T0));
        assert_eq!(reqs.len(), 2);
        assert_eq!(reqs[0], (1, 37));
        assert_eq!(reqs[1].0, 2, "the other peer takes a common chunk");
    }

    #[test]
    fn caps_per_peer_and_in_total_hold() {
        let capped = PlanConfig {
            max_in_flight_per_peer: 2,
            max_in_flight: 5,
            ..config()
        };
        let mut plan = Plan::new(100, Bitfield::new(100), capped);
        for peer in 1..=3 {
            has(&mut plan, peer, Bitfield::full(100));
        }
        let reqs = requests(&plan.next_actions(T0));
        assert_eq!(reqs.len(), 5);
        assert_eq!(plan.in_flight(), 5);
        for peer in 1..=3 {
            assert!(count_for(&reqs, peer) <= 2, "{reqs:?}");
            assert!(plan.peer_stats(&peer).unwrap().in_flight <= 2);
        }
        assert!(plan.next_actions(ms(1)).is_empty(), "full: nothing more");
        let (peer, chunk) = reqs[0];
        done(&mut plan, peer, chunk, secs(1));
        assert_eq!(requests(&plan.next_actions(secs(1))).len(), 1);
        assert_eq!(plan.in_flight(), 5);

        // With room in total, the per-peer cap is what binds: 3 peers x 2.
        let config = PlanConfig {
            max_in_flight_per_peer: 2,
            ..config()
        };
        let mut plan = Plan::new(100, Bitfield::new(100), config);
        for peer in 1..=3 {
            has(&mut plan, peer, Bitfield::full(100));
        }
        let reqs = requests(&plan.next_actions(T0));
        assert_eq!(reqs.len(), 6);
        for peer in 1..=3 {
            assert_eq!(count_for(&reqs, peer), 2);
        }
    }

    #[test]
    fn the_pipeline_is_spread_one_request_per_peer_when_there_are_many() {
        // The default: 4 requests kept outstanding in all before any peer gets a second one.
        let config = PlanConfig {
            seed: 7,
            ..PlanConfig::default()
        };
        let per_peer = |peers: u32| {
            let mut plan = Plan::new(100, Bitfield::new(100), config.clone());
            for peer in 1..=peers {
                has(&mut plan, peer, Bitfield::full(100));
            }
            let reqs = requests(&plan.next_actions(T0));
            let counts: Vec<usize> = (1..=peers).map(|p| count_for(&reqs, p)).collect();
            for p in 1..=peers {
                assert_eq!(
                    plan.peer_stats(&p).unwrap().in_flight_limit,
                    counts[p as usize - 1]
                );
            }
            counts
        };
        // A lone source is asked for four chunks at once, so it never idles between them.
        assert_eq!(per_peer(1), vec![4]);
        assert_eq!(per_peer(2), vec![2, 2]);
        assert_eq!(per_peer(3), vec![2, 2, 2]);
        // Many sources: one each, so each chunk comes whole at a peer's full share and is passed
        // on sooner, instead of several crawling in at once.
        assert_eq!(per_peer(8), vec![1; 8]);

        // Peers that leave give the others their share back.
        let mut plan = Plan::new(100, Bitfield::new(100), config.clone());
        for peer in 1..=8 {
            has(&mut plan, peer, Bitfield::full(100));
        }
        assert_eq!(requests(&plan.next_actions(T0)).len(), 8);
        for peer in 2..=8 {
            plan.handle(Event::PeerGone { peer }, ms(1));
        }
        let reqs = requests(&plan.next_actions(ms(1)));
        assert_eq!(count_for(&reqs, 1), 3, "{reqs:?}");
        assert_eq!(plan.peer_stats(&1).unwrap().in_flight, 4);

        // Never more than the per-peer cap, whatever the pipeline.
        let capped = PlanConfig {
            max_in_flight_per_peer: 2,
            pipeline: 10,
            ..config
        };
        let mut plan = Plan::new(100, Bitfield::new(100), capped);
        has(&mut plan, 1, Bitfield::full(100));
        assert_eq!(requests(&plan.next_actions(T0)).len(), 2);
    }

    #[test]
    fn a_faster_peer_gets_more_requests() {
        let mut plan = Plan::new(200, Bitfield::new(200), config());
        has(&mut plan, 1, Bitfield::full(200));
        has(&mut plan, 2, Bitfield::full(200));
        let reqs = requests(&plan.next_actions(T0));
        assert_eq!(count_for(&reqs, 1), 4);
        assert_eq!(count_for(&reqs, 2), 4);
        // In the first second peer 1 delivers four chunks, peer 2 one.
        for &(peer, chunk) in reqs.iter().filter(|(p, _)| *p == 1) {
            done(&mut plan, peer, chunk, secs(1));
        }
        let slow = reqs.iter().find(|(p, _)| *p == 2).unwrap().1;
        done(&mut plan, 2, slow, secs(1));

        let fast = plan.peer_stats(&1).unwrap();
        let slow = plan.peer_stats(&2).unwrap();
        assert_eq!(fast.rate_bytes_per_sec, Some(4 * CHUNK));
        assert_eq!(slow.rate_bytes_per_sec, Some(CHUNK));
        assert_eq!(fast.in_flight_limit, 16, "4 x the median, at the clamp");
        assert_eq!(slow.in_flight_limit, 4);

        let reqs = requests(&plan.next_actions(secs(1)));
        assert_eq!(count_for(&reqs, 1), 16);
        assert_eq!(count_for(&reqs, 2), 1);
        assert_eq!(plan.peer_stats(&1).unwrap().in_flight, 16);
        assert_eq!(plan.peer_stats(&2).unwrap().in_flight, 4);
    }

    #[test]
    fn endgame_duplicates_the_tail_and_cancels_the_loser() {
        let mut plan = Plan::new(3, Bitfield::new(3), config());
        has(&mut plan, 1, Bitfield::full(3));
        has(&mut plan, 2, Bitfield::full(3));
        let reqs = requests(&plan.next_actions(T0));
        assert_eq!(reqs.len(), 6, "every chunk from both peers: {reqs:?}");
        for chunk in 0..3 {
            let mut from: Vec<u32> = reqs
                .iter()
                .filter(|(_, c)| *c == chunk)
                .map(|(p, _)| *p)
                .collect();
            from.sort();
            assert_eq!(from, vec![1, 2]);
        }
        done(&mut plan, 2, 0, secs(1));
        assert_eq!(
            plan.next_actions(secs(1)),
            vec![Action::Cancel { peer: 1, chunk: 0 }]
        );
        assert_eq!(plan.in_flight(), 4);
        // The loser's copy arriving anyway changes nothing.
        done(&mut plan, 1, 0, secs(2));
        assert!(plan.next_actions(secs(2)).is_empty());
        assert_eq!(plan.in_flight(), 4);
        assert_eq!(plan.peer_stats(&1).unwrap().bytes_delivered, CHUNK);
        done(&mut plan, 1, 1, secs(3));
        done(&mut plan, 1, 2, secs(3));
        let mut cancels = plan.next_actions(secs(3));
        cancels.sort_by_key(|a| format!("{a:?}"));
        assert_eq!(
            cancels,
            vec![
                Action::Cancel { peer: 2, chunk: 1 },
                Action::Cancel { peer: 2, chunk: 2 }
            ]
        );
        assert!(plan.is_complete());
        assert_eq!(plan.in_flight(), 0);
    }

    #[test]
    fn endgame_waits_for_the_tail_and_can_be_turned_off() {
        let mut plan = Plan::new(100, Bitfield::new(100), config());
        has(&mut plan, 1, Bitfield::full(100));
        has(&mut plan, 2, Bitfield::full(100));
        let reqs = requests(&plan.next_actions(T0));
        let mut chunks: Vec<u32> = reqs.iter().map(|(_, c)| *c).collect();
        chunks.sort();
        chunks.dedup();
        assert_eq!(chunks.len(), reqs.len(), "no duplicates before the tail");

        let config = PlanConfig {
            endgame_duplicates: 1,
            ..config()
        };
        let mut plan = Plan::new(3, Bitfield::new(3), config);
        has(&mut plan, 1, Bitfield::full(3));
        has(&mut plan, 2, Bitfield::full(3));
        assert_eq!(requests(&plan.next_actions(T0)).len(), 3);
    }

    #[test]
    fn endgame_does_not_start_while_some_missing_chunk_is_nowhere() {
        // Mid-rollout: the two peers hold a few chunks, all of them in flight, and slots are
        // free. Duplicating those would spend uplinks on copies nobody needs.
        let mut plan = Plan::new(20, Bitfield::new(20), config());
        has(&mut plan, 1, bits(20, 0..3));
        has(&mut plan, 2, bits(20, 0..3));
        let reqs = requests(&plan.next_actions(T0));
        assert_eq!(reqs.len(), 3, "{reqs:?}");
        assert!(requests(&plan.next_actions(ms(10))).is_empty());
        // Once every missing chunk is in flight, endgame duplicates the tail.
        has(&mut plan, 1, Bitfield::full(20));
        has(&mut plan, 2, Bitfield::full(20));
        let reqs = requests(&plan.next_actions(ms(20)));
        assert_eq!(
            reqs.len(),
            8 - 3,
            "the free slots take new chunks: {reqs:?}"
        );
        assert!(
            requests(&plan.next_actions(ms(30))).is_empty(),
            "12 chunks not in flight"
        );
        let mut plan = Plan::new(4, Bitfield::new(4), config());
        has(&mut plan, 1, Bitfield::full(4));
        has(&mut plan, 2, Bitfield::full(4));
        let reqs = requests(&plan.next_actions(T0));
        assert_eq!(reqs.len(), 8, "4 chunks, each asked of both: {reqs:?}");
    }

    #[test]
    fn busy_is_not_a_strike_and_rests_the_peer() {
        let config = PlanConfig {
            max_in_flight_per_peer: 1,
            ..config()
        };
        let mut plan = Plan::new(4, Bitfield::new(4), config);
        has(&mut plan, 1, Bitfield::full(4));
        let mut now = T0;
        let mut rests = Vec::new();
        for _ in 0..6 {
            let reqs = requests(&plan.next_actions(now));
            assert_eq!(reqs.len(), 1, "{now:?}: {reqs:?}");
            let (peer, chunk) = reqs[0];
            plan.handle(Event::ChunkBusy { peer, chunk }, now);
            assert!(requests(&plan.next_actions(now)).is_empty(), "resting");
            let stats = plan.peer_stats(&1).unwrap();
            assert_eq!(stats.strikes, 0);
            assert!(stats.usable);
            let until = plan.next_deadline().expect("the rest's end is a deadline");
            rests.push(until - now);
            now = until;
        }
        assert_eq!(rests[0], BUSY_REST);
        assert_eq!(rests[1], BUSY_REST * 2);
        assert_eq!(*rests.last().unwrap(), BUSY_REST_MAX);
        // A delivery ends the series.
        let reqs = requests(&plan.next_actions(now));
        done(&mut plan, reqs[0].0, reqs[0].1, now);
        let reqs = requests(&plan.next_actions(now));
        plan.handle(
            Event::ChunkBusy {
                peer: reqs[0].0,
                chunk: reqs[0].1,
            },
            now,
        );
        // The series starts over, from one typical request time (this one took no time at all).
        assert_eq!(plan.next_deadline(), Some(now + BUSY_REST_MIN));
        assert!(!plan.is_stalled());
    }

    fn uploads(plan: &mut Plan<u32>, peer: u32, sending: Bitfield, sent: Bitfield, now: Duration) {
        plan.handle(
            Event::PeerUploads {
                peer,
                sending,
                sent,
            },
            now,
        );
    }

    #[test]
    fn a_chunk_the_seeder_already_gave_away_waits_for_the_copy() {
        let mut plan = Plan::new(6, Bitfield::new(6), config());
        has(&mut plan, 1, Bitfield::full(6));
        // The seeder is sending chunk 0 to someone and has sent chunk 1.
        uploads(&mut plan, 1, bits(6, [0]), bits(6, [1]), T0);
        let reqs = requests(&plan.next_actions(T0));
        let mut chunks: Vec<u32> = reqs.iter().map(|(_, c)| *c).collect();
        chunks.sort();
        assert_eq!(chunks, vec![2, 3, 4, 5], "never-sent chunks first");
        for (peer, chunk) in reqs {
            done(&mut plan, peer, chunk, ms(100));
        }
        // Before the patience is over, the copy of chunk 1 shows up at peer 2: asked there.
        plan.handle(Event::PeerHasChunk { peer: 2, chunk: 1 }, ms(150));
        assert_eq!(requests(&plan.next_actions(ms(150))), vec![(2, 1)]);
        done(&mut plan, 2, 1, ms(250));
        // Chunk 0 waits while it is being sent, then is asked of the seeder anyway: the patience
        // is three typical request times (about 100 ms here), at least 250 ms, and a chunk still
        // being sent waits eight times that.
        assert!(requests(&plan.next_actions(ms(1_000))).is_empty());
        assert!(!plan.is_stalled());
        let deadline = plan.next_deadline().expect("the end of the wait");
        assert!((ms(2_000)..=ms(2_500)).contains(&deadline), "{deadline:?}");
        assert!(requests(&plan.next_actions(deadline - ms(1))).is_empty());
        let reqs = requests(&plan.next_actions(deadline));
        assert_eq!(reqs, vec![(1, 0)], "the wait is over");
    }

    #[test]
    fn downloaders_that_know_each_other_ask_a_seeder_for_different_chunks() {
        // Peer 0 seeds; downloaders 1, 2 and 3 start together and know each other.
        let first = |me: u32| {
            let mut plan = Plan::new(24, Bitfield::new(24), config()).with_self(&me);
            has(&mut plan, 0, Bitfield::full(24));
            for other in [1, 2, 3].into_iter().filter(|&p| p != me) {
                has(&mut plan, other, Bitfield::new(24));
            }
            let reqs = requests(&plan.next_actions(T0));
            assert_eq!(reqs.len(), 4, "{reqs:?}");
            reqs.into_iter().map(|(_, c)| c).collect::<BTreeSet<u32>>()
        };
        let (a, b, c) = (first(1), first(2), first(3));
        assert!(
            a.is_disjoint(&b) && a.is_disjoint(&c) && b.is_disjoint(&c),
            "{a:?} {b:?} {c:?}"
        );
    }

    #[test]
    fn an_endgame_duplicate_never_goes_to_a_holder_that_gave_the_chunk_away() {
        let mut plan = Plan::new(1, Bitfield::new(1), config());
        has(&mut plan, 1, Bitfield::full(1));
        has(&mut plan, 2, Bitfield::full(1));
        uploads(&mut plan, 1, bits(1, [0]), Bitfield::new(1), T0);
        assert_eq!(requests(&plan.next_actions(T0)), vec![(2, 0)]);
        assert!(
            requests(&plan.next_actions(ms(1))).is_empty(),
            "no duplicate at peer 1"
        );
    }

    #[test]
    fn a_holder_that_gave_the_chunk_away_is_asked_last() {
        for seed in 0..16 {
            let mut plan = Plan::new(1, Bitfield::new(1), PlanConfig { seed, ..config() });
            has(&mut plan, 1, Bitfield::full(1));
            has(&mut plan, 2, Bitfield::full(1));
            // Peer 1 already sent the chunk to someone; peer 2 did not.
            uploads(&mut plan, 1, Bitfield::new(1), bits(1, [0]), T0);
            // (And no endgame duplicate at peer 1, though the chunk is the last one.)
            assert_eq!(
                requests(&plan.next_actions(T0)),
                vec![(2, 0)],
                "seed {seed}"
            );
        }
    }

    #[test]
    fn a_bad_chunk_bans_the_peer_and_goes_elsewhere() {
        let config = PlanConfig {
            endgame_duplicates: 1,
            ..config()
        };
        let mut plan = Plan::new(1, Bitfield::new(1), config);
        has(&mut plan, 1, Bitfield::full(1));
        has(&mut plan, 2, Bitfield::full(1));
        let reqs = requests(&plan.next_actions(T0));
        assert_eq!(reqs.len(), 1);
        let liar = reqs[0].0;
        let honest = 3 - liar;
        plan.handle(
            Event::ChunkBad {
                peer: liar,
                chunk: 0,
            },
            secs(1),
        );
        assert_eq!(
            plan.next_actions(secs(1)),
            vec![
                Action::Ban { peer: liar },
                Action::Request {
                    peer: honest,
                    chunk: 0
                }
            ]
        );
        // The liar reconnects and advertises again, and sends more bad data: no second ban, and it
        // is never asked again, even when the honest peer fails.
        plan.handle(Event::PeerGone { peer: liar }, secs(2));
        has(&mut plan, liar, Bitfield::full(1));
        plan.handle(
            Event::PeerHasChunk {
                peer: liar,
                chunk: 0,
            },
            secs(2),
        );
        plan.handle(
            Event::ChunkBad {
                peer: liar,
                chunk: 0,
            },
            secs(2),
        );
        plan.handle(
            Event::ChunkFailed {
                peer: honest,
                chunk: 0,
            },
            secs(2),
        );
        assert_eq!(
            plan.next_actions(secs(2)),
            vec![Action::Request {
                peer: honest,
                chunk: 0
            }]
        );
        let stats = plan.peer_stats(&liar).unwrap();
        assert!(stats.banned && !stats.usable);
        assert_eq!(stats.in_flight_limit, 0);
        done(&mut plan, honest, 0, secs(3));
        assert!(plan.is_complete());
    }

    #[test]
    fn stalled_when_the_only_holder_is_banned() {
        let mut plan = Plan::new(2, Bitfield::new(2), config());
        assert!(plan.is_stalled(), "no peer yet");
        has(&mut plan, 1, Bitfield::full(2));
        assert!(!plan.is_stalled());
        assert_eq!(requests(&plan.next_actions(T0)).len(), 2);
        plan.handle(Event::ChunkBad { peer: 1, chunk: 0 }, secs(1));
        assert_eq!(plan.next_actions(secs(1)), vec![Action::Ban { peer: 1 }]);
        assert_eq!(plan.in_flight(), 0);
        assert!(plan.is_stalled());
        assert_eq!(plan.next_deadline(), None);
        // A new provider un-stalls it.
        has(&mut plan, 2, bits(2, [1]));
        assert!(!plan.is_stalled());
        assert_eq!(
            plan.next_actions(secs(2)),
            vec![Action::Request { peer: 2, chunk: 1 }]
        );
    }

    #[test]
    fn a_slow_peer_times_out_gets_a_strike_and_the_chunk_goes_elsewhere() {
        let config = PlanConfig {
            endgame_duplicates: 1,
            ..config()
        };
        let mut plan = Plan::new(1, Bitfield::new(1), config);
        has(&mut plan, 1, Bitfield::full(1));
        has(&mut plan, 2, Bitfield::full(1));
        let reqs = requests(&plan.next_actions(T0));
        let slow = reqs[0].0;
        let other = 3 - slow;
        assert_eq!(plan.next_deadline(), Some(secs(20)));
        assert!(plan.next_actions(secs(19)).is_empty());
        assert_eq!(
            plan.next_actions(secs(20)),
            vec![
                Action::Cancel {
                    peer: slow,
                    chunk: 0
                },
                Action::Request {
                    peer: other,
                    chunk: 0
                }
            ]
        );
        let stats = plan.peer_stats(&slow).unwrap();
        assert_eq!(stats.strikes, 1);
        assert!(stats.usable);
        assert_eq!(stats.rate_bytes_per_sec, Some(0));
        assert_eq!(plan.next_deadline(), Some(secs(40)));
        // Its failure reply arriving after the timeout is not a second strike.
        plan.handle(
            Event::ChunkFailed {
                peer: slow,
                chunk: 0,
            },
            secs(21),
        );
        assert_eq!(plan.peer_stats(&slow).unwrap().strikes, 1);
        done(&mut plan, other, 0, secs(22));
        assert!(plan.is_complete());
    }

    #[test]
    fn requests_expiring_together_are_one_strike() {
        let mut plan = Plan::new(10, Bitfield::new(10), config());
        has(&mut plan, 1, Bitfield::full(10));
        assert_eq!(requests(&plan.next_actions(T0)).len(), 4);
        let actions = plan.next_actions(secs(20));
        let cancels = actions
            .iter()
            .filter(|a| matches!(a, Action::Cancel { .. }))
            .count();
        assert_eq!(cancels, 4);
        assert_eq!(plan.peer_stats(&1).unwrap().strikes, 1);
        // Asked again (it is the only holder), for other chunks first.
        let reqs = requests(&actions);
        assert_eq!(reqs.len(), 4);
    }

    #[test]
    fn strikes_in_a_row_make_a_peer_unusable_until_it_reconnects() {
        let config = PlanConfig {
            max_in_flight_per_peer: 2,
            ..config()
        };
        let mut plan = Plan::new(10, Bitfield::new(10), config);
        has(&mut plan, 1, Bitfield::full(10));
        let mut reqs = requests(&plan.next_actions(T0));
        // A success between failures clears the count.
        let (_, c) = reqs.remove(0);
        plan.handle(Event::ChunkFailed { peer: 1, chunk: c }, secs(1));
        assert_eq!(plan.peer_stats(&1).unwrap().strikes, 1);
        let (_, c) = reqs.remove(0);
        done(&mut plan, 1, c, secs(1));
        assert_eq!(plan.peer_stats(&1).unwrap().strikes, 0);
        // Three in a row.
        for strike in 1..=3 {
            let reqs = requests(&plan.next_actions(secs(strike)));
            assert!(!reqs.is_empty());
            let in_flight: Vec<u32> = (0..10)
                .filter(|&c| {
                    plan.peers
                        .get(&1)
                        .is_some_and(|s| s.in_flight.contains_key(&c))
                })
                .collect();
            plan.handle(
                Event::ChunkFailed {
                    peer: 1,
                    chunk: in_flight[0],
                },
                secs(strike),
            );
        }
        let stats = plan.peer_stats(&1).unwrap();
        assert_eq!(stats.strikes, 3);
        assert!(!stats.usable && !stats.banned && stats.connected);
        // Its other request is cancelled; nothing more is asked of it.
        let actions = plan.next_actions(secs(4));
        assert!(
            actions
                .iter()
                .all(|a| matches!(a, Action::Cancel { peer: 1, .. }))
        );
        assert_eq!(actions.len(), 1);
        assert_eq!(plan.in_flight(), 0);
        assert!(plan.is_stalled());
        // A refreshed bitfield without reconnecting does not revive it; a reconnect does.
        has(&mut plan, 1, Bitfield::full(10));
        assert!(plan.next_actions(secs(5)).is_empty());
        plan.handle(Event::PeerGone { peer: 1 }, secs(6));
        has(&mut plan, 1, Bitfield::full(10));
        assert_eq!(plan.peer_stats(&1).unwrap().strikes, 0);
        assert_eq!(requests(&plan.next_actions(secs(6))).len(), 2);
    }

    #[test]
    fn a_cancel_not_yet_returned_is_dropped_when_its_request_ends() {
        // Found by the proptest: the driver must not be told to cancel a request it has just
        // seen complete.
        let config = PlanConfig {
            max_in_flight_per_peer: 2,
            max_strikes: 1,
            ..config()
        };
        let mut plan = Plan::new(2, Bitfield::new(2), config);
        has(&mut plan, 1, Bitfield::full(2));
        assert_eq!(requests(&plan.next_actions(T0)).len(), 2);
        // The failure strikes the peer out, which cancels its other request...
        plan.handle(Event::ChunkFailed { peer: 1, chunk: 0 }, secs(1));
        // ...but that request completes before the driver asks for actions.
        done(&mut plan, 1, 1, secs(1));
        assert!(plan.next_actions(secs(1)).is_empty());
        assert!(plan.held().get(1));
        assert!(plan.is_stalled());
    }

    #[test]
    fn a_departed_peers_chunks_are_replanned() {
        let config = PlanConfig {
            max_in_flight_per_peer: 1,
            endgame_duplicates: 1,
            ..config()
        };
        let mut plan = Plan::new(4, Bitfield::new(4), config);
        has(&mut plan, 1, Bitfield::full(4));
        has(&mut plan, 2, Bitfield::full(4));
        let reqs = requests(&plan.next_actions(T0));
        assert_eq!(reqs.len(), 2);
        let lost = reqs.iter().find(|(p, _)| *p == 1).unwrap().1;
        plan.handle(Event::PeerGone { peer: 1 }, secs(1));
        assert!(
            plan.next_actions(secs(1)).is_empty(),
            "no cancel to a peer that is gone"
        );
        assert_eq!(plan.in_flight(), 1);
        assert!(!plan.peer_stats(&1).unwrap().connected);
        let mut asked = vec![];
        let mut now = secs(1);
        let mut outstanding = reqs.iter().find(|(p, _)| *p == 2).unwrap().1;
        while !plan.is_complete() {
            now += secs(1);
            done(&mut plan, 2, outstanding, now);
            let reqs = requests(&plan.next_actions(now));
            assert!(reqs.iter().all(|(p, _)| *p == 2), "{reqs:?}");
            if let Some(&(_, c)) = reqs.first() {
                asked.push(c);
                outstanding = c;
            }
        }
        assert!(asked.contains(&lost));
    }

    #[test]
    fn resumed_chunks_are_never_requested() {
        let held = bits(10, [0, 2, 4, 6, 8]);
        let mut plan = Plan::new(10, held, config());
        assert_eq!(plan.missing(), 5);
        has(&mut plan, 1, Bitfield::full(10));
        has(&mut plan, 2, Bitfield::full(10));
        let mut now = T0;
        let mut asked = BTreeSet::new();
        while !plan.is_complete() {
            let reqs = requests(&plan.next_actions(now));
            for &(peer, chunk) in &reqs {
                assert_eq!(chunk % 2, 1, "asked for held chunk {chunk}");
                asked.insert(chunk);
                done(&mut plan, peer, chunk, now + ms(10));
            }
            now += secs(1);
        }
        assert_eq!(asked, [1, 3, 5, 7, 9].into_iter().collect());

        let mut plan = Plan::new(10, Bitfield::full(10), config());
        has(&mut plan, 1, Bitfield::full(10));
        assert!(plan.is_complete());
        assert!(!plan.is_stalled());
        assert!(plan.next_actions(T0).is_empty());
        // A `held` of the wrong length is cut to the blob.
        let plan: Plan<u32> = Plan::new(3, Bitfield::full(10), config());
        assert!(plan.is_complete());
        assert_eq!(plan.held().len(), 3);
    }

    #[test]
    fn the_priority_window_goes_before_rarity() {
        let config = PlanConfig {
            max_in_flight: 1,
            ..config()
        };
        let mut plan = Plan::new(10, Bitfield::new(10), config);
        has(&mut plan, 1, Bitfield::full(10));
        has(&mut plan, 2, bits(10, 0..5));
        plan.set_priority_window(1, 3);
        let mut order = Vec::new();
        let mut now = T0;
        for _ in 0..5 {
            let reqs = requests(&plan.next_actions(now));
            let (peer, chunk) = reqs[0];
            order.push(chunk);
            done(&mut plan, peer, chunk, now);
            now += secs(1);
        }
        assert_eq!(&order[..3], &[1, 2, 3]);
        assert!(order[3..].iter().all(|c| (5..10).contains(c)), "{order:?}");
        // The reader moved back to the start: chunk 0 is next, though it is the most common.
        plan.set_priority_window(0, 1);
        assert_eq!(requests(&plan.next_actions(now))[0].1, 0);
        // An empty window, or one past the end, is none.
        plan.set_priority_window(0, 0);
        plan.set_priority_window(u32::MAX, u32::MAX);
    }

    #[derive(Clone, Copy, Debug)]
    enum Behaviour {
        Serves { per_chunk: Duration },
        Silent,
        Lies { per_chunk: Duration },
    }

    struct SimRun {
        log: Vec<(Duration, Action<u32>)>,
        plan: Plan<u32>,
        finished: Duration,
    }

    /// A discrete-event run: every peer has the whole blob and serves requests one after another
    /// at its own speed (a cancelled request is still served: its late copy must be harmless).
    fn simulate(chunks: u32, peers: &[Behaviour], config: PlanConfig) -> SimRun {
        let per_peer_cap = config.max_in_flight_per_peer * 4;
        let total_cap = config.max_in_flight;
        let mut plan = Plan::new(chunks, Bitfield::new(chunks), config);
        for peer in 0..peers.len() as u32 {
            has(&mut plan, peer, Bitfield::full(chunks));
        }
        let mut now = T0;
        let mut free_at = vec![T0; peers.len()];
        let mut deliveries: BTreeMap<(Duration, u64), (u32, u32)> = BTreeMap::new();
        let mut seq = 0u64;
        let mut log = Vec::new();
        for _ in 0..100_000 {
            for action in plan.next_actions(now) {
                log.push((now, action.clone()));
                match action {
                    Action::Request { peer, chunk } => match peers[peer as usize] {
                        Behaviour::Serves { per_chunk } | Behaviour::Lies { per_chunk } => {
                            let end = free_at[peer as usize].max(now) + per_chunk;
                            free_at[peer as usize] = end;
                            deliveries.insert((end, seq), (peer, chunk));
                            seq += 1;
                        }
                        Behaviour::Silent => {}
                    },
                    Action::Cancel { .. } => {}
                    Action::Ban { peer } => deliveries.retain(|_, (p, _)| *p != peer),
                }
            }
            assert!(plan.in_flight() <= total_cap);
            for peer in 0..peers.len() as u32 {
                assert!(plan.peer_stats(&peer).unwrap().in_flight <= per_peer_cap);
            }
            if plan.is_complete() || plan.is_stalled() {
                break;
            }
            let next_delivery = deliveries.keys().next().map(|(t, _)| *t);
            now = match (next_delivery, plan.next_deadline()) {
                (Some(a), Some(b)) => a.min(b),
                (a, b) => a.or(b).expect("something is pending"),
            };
            while let Some(entry) = deliveries.first_entry() {
                if entry.key().0 > now {
                    break;
                }
                let (peer, chunk) = entry.remove();
                let event = match peers[peer as usize] {
                    Behaviour::Lies { .. } => Event::ChunkBad { peer, chunk },
                    _ => Event::ChunkDone {
                        peer,
                        chunk,
                        bytes: CHUNK,
                    },
                };
                plan.handle(event, now);
            }
        }
        SimRun {
            log,
            plan,
            finished: now,
        }
    }

    fn mixed_fleet() -> Vec<Behaviour> {
        vec![
            Behaviour::Serves { per_chunk: ms(50) },
            Behaviour::Serves { per_chunk: ms(200) },
            Behaviour::Serves { per_chunk: secs(1) },
            Behaviour::Silent,
            Behaviour::Lies { per_chunk: ms(100) },
        ]
    }

    #[test]
    fn mini_simulation_completes_despite_slow_silent_and_lying_peers() {
        let run = simulate(64, &mixed_fleet(), config());
        let plan = &run.plan;
        assert!(plan.is_complete(), "stalled at {:?}", run.finished);
        assert_eq!(plan.in_flight(), 0);
        let stats = |p: u32| plan.peer_stats(&p).unwrap();
        assert!(stats(4).banned);
        let bans = run
            .log
            .iter()
            .filter(|(_, a)| matches!(a, Action::Ban { .. }))
            .count();
        assert_eq!(bans, 1);
        assert_eq!(stats(3).bytes_delivered, 0);
        assert!(stats(0).bytes_delivered > stats(1).bytes_delivered);
        assert!(stats(1).bytes_delivered > stats(2).bytes_delivered);
        // The silent peer's chunks are rescued by endgame, not left to time out at 20 s.
        assert!(run.finished < secs(20), "finished at {:?}", run.finished);
        // Ideal: 64 chunks at 20 + 5 + 1 chunks/s is about 2.5 s.
        assert!(run.finished < secs(5), "finished at {:?}", run.finished);
    }

    #[test]
    fn mini_simulation_with_only_a_silent_peer_left_strikes_it_out() {
        let peers = [Behaviour::Silent, Behaviour::Lies { per_chunk: ms(10) }];
        let run = simulate(8, &peers, config());
        assert!(run.plan.is_stalled());
        let silent = run.plan.peer_stats(&0).unwrap();
        assert_eq!(silent.strikes, 3);
        assert!(!silent.usable);
        assert_eq!(run.finished, secs(60));
    }

    #[test]
    fn same_seed_same_events_same_actions() {
        let a = simulate(64, &mixed_fleet(), config());
        let b = simulate(64, &mixed_fleet(), config());
        assert_eq!(a.log, b.log);
        assert_eq!(a.finished, b.finished);
        let c = simulate(
            64,
            &mixed_fleet(),
            PlanConfig {
                seed: 8,
                ..config()
            },
        );
        assert_ne!(a.log, c.log, "the seed breaks ties differently");
        assert!(c.plan.is_complete());
    }

    /// The members of `site` but `me`.
    fn all_but(site: &[u32], me: u32) -> Vec<u32> {
        site.iter().copied().filter(|&p| p != me).collect()
    }

    /// The members of `site` in the order of their fixed hashes (the order gateways are chosen in).
    fn by_key(site: &[u32]) -> Vec<u32> {
        let mut keyed: Vec<(u64, u32)> = site.iter().map(|&p| (stable_hash(&p), p)).collect();
        keyed.sort_unstable();
        keyed.into_iter().map(|(_, p)| p).collect()
    }

    /// A plan for node `me` of a site whose other downloaders are `locals` (holding nothing yet),
    /// with `remote` in another site holding all `chunks`.
    fn site_plan(
        me: u32,
        locals: &[u32],
        remote: u32,
        chunks: u32,
        config: PlanConfig,
    ) -> Plan<u32> {
        let mut plan = Plan::new(chunks, Bitfield::new(chunks), config).with_self(&me);
        for &peer in locals {
            has(&mut plan, peer, Bitfield::new(chunks));
        }
        plan.handle(Event::PeerRemote { peer: remote }, T0);
        has(&mut plan, remote, Bitfield::full(chunks));
        plan
    }

    #[test]
    fn a_site_fetches_each_remote_chunk_once_between_its_downloaders() {
        let chunks = 64;
        let config = PlanConfig {
            max_remote_in_flight: 64,
            site_remote_in_flight: 256,
            max_in_flight: 64,
            max_in_flight_per_peer: 64,
            ..config()
        };
        let site = [1u32, 2, 3, 4];
        let mut asked = Vec::new();
        for &me in &site {
            let mut plan = site_plan(me, &all_but(&site, me), 9, chunks, config.clone());
            let reqs = requests(&plan.next_actions(T0));
            assert!(reqs.iter().all(|&(peer, _)| peer == 9));
            assert!(!reqs.is_empty(), "node {me} owns some chunks");
            asked.extend(reqs.into_iter().map(|(_, chunk)| chunk));
            plan.assert_consistent();
        }
        asked.sort_unstable();
        assert_eq!(
            asked,
            (0..chunks).collect::<Vec<_>>(),
            "every chunk once, by one node"
        );
    }

    #[test]
    fn a_chunk_a_local_peer_holds_is_never_asked_over_the_wan() {
        let mut plan = site_plan(1, &[2], 9, 8, config());
        has(&mut plan, 2, bits(8, [0, 1, 2, 3, 4, 5, 6, 7]));
        let reqs = requests(&plan.next_actions(T0));
        assert!(!reqs.is_empty());
        assert!(reqs.iter().all(|&(peer, _)| peer == 2), "{reqs:?}");
        assert_eq!(plan.peer_stats(&9).map(|s| s.remote), Some(true));
    }

    #[test]
    fn remote_requests_are_capped_and_never_duplicated_in_endgame() {
        // Alone in its site: it owns every chunk, but asks the WAN for two at a time.
        let mut plan = site_plan(1, &[], 9, 16, config());
        has(&mut plan, 8, Bitfield::new(16));
        plan.handle(Event::PeerRemote { peer: 8 }, T0);
        has(&mut plan, 8, Bitfield::full(16));
        let reqs = requests(&plan.next_actions(T0));
        assert_eq!(reqs.len(), 2, "max_remote_in_flight: {reqs:?}");
        done(&mut plan, reqs[0].0, reqs[0].1, ms(100));
        let more = requests(&plan.next_actions(ms(100)));
        assert_eq!(more.len(), 1);
        // Two remote peers hold every chunk; endgame never asks both for the same one.
        let mut now = ms(100);
        loop {
            let in_flight: Vec<(u32, u32)> = (0..16)
                .flat_map(|c| [(8, c), (9, c)])
                .filter(|(p, c)| {
                    plan.peers
                        .get(p)
                        .is_some_and(|s| s.in_flight.contains_key(c))
                })
                .collect();
            let chunks_in_flight: BTreeSet<u32> = in_flight.iter().map(|&(_, c)| c).collect();
            assert_eq!(
                chunks_in_flight.len(),
                in_flight.len(),
                "a duplicate over the WAN"
            );
            assert!(in_flight.len() <= 2);
            let Some(&(peer, chunk)) = in_flight.first() else {
                break;
            };
            now += ms(100);
            done(&mut plan, peer, chunk, now);
            plan.next_actions(now);
        }
        assert!(plan.is_complete());
        plan.assert_consistent();
    }

    #[test]
    fn a_large_site_asks_the_wan_for_a_few_chunks_at_a_time_through_its_gateways() {
        // Ten downloaders behind one WAN link, the default budget of four remote requests for
        // the site: the four with the least keys each ask for one chunk, and no two for the same.
        let chunks = 64;
        let site: Vec<u32> = (1..=10).collect();
        let keyed = by_key(&site);
        let gateways = &keyed[..4];
        let mut asked = Vec::new();
        for &me in &site {
            let mut plan = site_plan(me, &all_but(&site, me), 99, chunks, config());
            let reqs = requests(&plan.next_actions(T0));
            if gateways.contains(&me) {
                assert_eq!(reqs.len(), 1, "gateway {me} asked the WAN for {reqs:?}");
            } else {
                assert!(
                    reqs.is_empty(),
                    "node {me} is no gateway but asked {reqs:?}"
                );
            }
            asked.extend(reqs.into_iter().map(|(_, chunk)| chunk));
            plan.assert_consistent();
        }
        let distinct: BTreeSet<u32> = asked.iter().copied().collect();
        assert_eq!(
            distinct.len(),
            asked.len(),
            "a chunk asked twice: {asked:?}"
        );
        assert_eq!(asked.len(), 4);

        // A gateway leaves: the fifth downloader takes its place and its chunks.
        let fifth = keyed[4];
        let mut plan = site_plan(fifth, &all_but(&site, fifth), 99, chunks, config());
        assert!(requests(&plan.next_actions(T0)).is_empty());
        plan.handle(Event::PeerGone { peer: gateways[0] }, ms(10));
        let reqs = requests(&plan.next_actions(ms(10)));
        assert_eq!(
            reqs.len(),
            1,
            "the new gateway asks for one chunk: {reqs:?}"
        );
        assert_eq!(reqs[0].0, 99);
        // With fewer downloaders than the budget, each takes more, up to
        // `max_remote_in_flight` (2).
        let mut plan = site_plan(1, &[2], 99, chunks, config());
        let reqs = requests(&plan.next_actions(T0));
        assert_eq!(reqs.len(), 2, "two of the site's four: {reqs:?}");
        plan.assert_consistent();
    }

    #[test]
    fn a_chunk_no_gateway_fetches_is_taken_after_a_request_timeout() {
        // Six downloaders in a site; one of them does not see the one with the least key (it
        // struck it out, say), so its gateways differ from the others' and some chunk can be
        // left to a node that is no gateway in its own view. Find such a chunk.
        let chunks = 64;
        let site: Vec<u32> = (1..=6).collect();
        let keyed = by_key(&site);
        let least = keyed[0];
        let mut found = None;
        for &blind in &keyed[1..] {
            let plans: Vec<(u32, Plan<u32>)> = site
                .iter()
                .map(|&me| {
                    let others: Vec<u32> = site
                        .iter()
                        .copied()
                        .filter(|&p| p != me && !(me == blind && p == least))
                        .collect();
                    (me, site_plan(me, &others, 99, chunks, config()))
                })
                .collect();
            let orphan = (0..chunks).find(|&c| {
                plans.iter().all(|(_, plan)| {
                    let site = plan.site().expect("with_self");
                    site.share(plan.config().max_remote_in_flight) == 0 || !site.owns(c)
                })
            });
            if let Some(c) = orphan {
                found = Some((c, plans));
                break;
            }
        }
        let (orphan, plans) = found.expect("some view leaves a chunk to no gateway");
        // Exactly one node owns it as a backstop, and it is no gateway: it has nothing in flight.
        let mut owners: Vec<(u32, Plan<u32>)> = plans
            .into_iter()
            .filter(|(_, plan)| plan.site().is_some_and(|s| s.owns_as_backstop(orphan)))
            .collect();
        assert_eq!(owners.len(), 1, "one backstop owner of chunk {orphan}");
        let (me, mut plan) = owners.remove(0);
        assert!(
            requests(&plan.next_actions(T0)).is_empty(),
            "node {me} is no gateway"
        );
        let timeout = plan.config().request_timeout;
        let mut now = T0;
        for _ in 0..chunks {
            assert_eq!(
                plan.next_deadline(),
                Some(now + timeout),
                "it waits a request timeout"
            );
            assert!(requests(&plan.next_actions(now + timeout - ms(1))).is_empty());
            now += timeout;
            let reqs = requests(&plan.next_actions(now));
            assert!(!reqs.is_empty() && reqs.len() <= 2, "{reqs:?}");
            assert!(
                reqs.iter()
                    .all(|&(p, c)| p == 99 && plan.site().is_some_and(|s| s.owns_as_backstop(c)))
            );
            if reqs.iter().any(|&(_, c)| c == orphan) {
                plan.assert_consistent();
                return;
            }
            for (p, c) in reqs {
                done(&mut plan, p, c, now);
            }
        }
        panic!("chunk {orphan} never asked for");
    }

    #[test]
    fn when_the_owner_of_a_chunk_leaves_another_local_node_takes_it() {
        let chunks = 32;
        let config = PlanConfig {
            max_remote_in_flight: 64,
            site_remote_in_flight: 128,
            max_in_flight: 64,
            max_in_flight_per_peer: 64,
            ..config()
        };
        let mut plan = site_plan(1, &[2], 9, chunks, config);
        let mine = requests(&plan.next_actions(T0)).len();
        assert!(
            mine > 0 && mine < chunks as usize,
            "shared with node 2: {mine}"
        );
        plan.handle(Event::PeerGone { peer: 2 }, ms(10));
        let rest = requests(&plan.next_actions(ms(10)));
        assert_eq!(
            mine + rest.len(),
            chunks as usize,
            "node 2's share is now ours"
        );
        plan.assert_consistent();
    }

    #[derive(Debug, Clone)]
    enum Op {
        Has {
            peer: u32,
            bits: Vec<bool>,
            wrong_len: bool,
        },
        HasChunk {
            peer: u32,
            chunk: u32,
        },
        Gone {
            peer: u32,
        },
        /// Completes the n-th outstanding request (modulo how many there are).
        Done {
            nth: usize,
        },
        /// A delivery from anyone for anything, asked or not.
        DoneAny {
            peer: u32,
            chunk: u32,
        },
        Bad {
            peer: u32,
            chunk: u32,
        },
        /// Fails the n-th outstanding request.
        Failed {
            nth: usize,
        },
        /// The n-th outstanding request is refused as busy.
        Busy {
            nth: usize,
        },
        /// A peer reports its uploads.
        Uploads {
            peer: u32,
            sending: Vec<bool>,
            sent: Vec<bool>,
        },
        /// Marks a peer as in another site.
        Remote {
            peer: u32,
        },
        FailedAny {
            peer: u32,
            chunk: u32,
        },
        Advance {
            ms: u64,
        },
        Window {
            from: u32,
            len: u32,
        },
        Next,
    }

    fn op(chunks: u32) -> impl Strategy<Value = Op> {
        let peer = 0u32..5;
        let chunk = 0..chunks + 2;
        prop_oneof![
            2 => (peer.clone(), prop::collection::vec(any::<bool>(), chunks as usize), prop::bool::weighted(0.1))
                .prop_map(|(peer, bits, wrong_len)| Op::Has { peer, bits, wrong_len }),
            2 => (peer.clone(), chunk.clone()).prop_map(|(peer, chunk)| Op::HasChunk { peer, chunk }),
            1 => peer.clone().prop_map(|peer| Op::Gone { peer }),
            4 => any::<usize>().prop_map(|nth| Op::Done { nth }),
            1 => (peer.clone(), chunk.clone()).prop_map(|(peer, chunk)| Op::DoneAny { peer, chunk }),
            1 => (peer.clone(), chunk.clone()).prop_map(|(peer, chunk)| Op::Bad { peer, chunk }),
            2 => any::<usize>().prop_map(|nth| Op::Failed { nth }),
            1 => (peer.clone(), chunk.clone()).prop_map(|(peer, chunk)| Op::FailedAny { peer, chunk }),
            2 => (0u64..8_000).prop_map(|ms| Op::Advance { ms }),
            1 => (0..chunks + 2, 0u32..6).prop_map(|(from, len)| Op::Window { from, len }),
            1 => peer.clone().prop_map(|peer| Op::Remote { peer }),
            1 => any::<usize>().prop_map(|nth| Op::Busy { nth }),
            1 => (
                peer.clone(),
                prop::collection::vec(any::<bool>(), chunks as usize),
                prop::collection::vec(any::<bool>(), chunks as usize),
            )
                .prop_map(|(peer, sending, sent)| Op::Uploads { peer, sending, sent }),
            4 => Just(Op::Next),
        ]
    }

    fn any_config() -> impl Strategy<Value = PlanConfig> {
        (
            0usize..4,
            0usize..12,
            1u64..6,
            0usize..4,
            0u32..4,
            (0usize..3, 0usize..5),
            any::<u64>(),
            (0u64..3_000, 0usize..8, prop_oneof![0u32..6, Just(u32::MAX)]),
        )
            .prop_map(
                |(
                    per_peer,
                    total,
                    timeout,
                    duplicates,
                    strikes,
                    (remote, site),
                    seed,
                    (patience, pipeline, block),
                )| {
                    PlanConfig {
                        max_in_flight_per_peer: per_peer,
                        max_in_flight: total,
                        pipeline,
                        request_timeout: secs(timeout),
                        endgame_duplicates: duplicates,
                        max_strikes: strikes,
                        max_remote_in_flight: remote,
                        site_remote_in_flight: site,
                        upload_patience: ms(patience),
                        block_chunks: block,
                        seed,
                    }
                },
            )
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
            assert_eq!(avail, self.avail);
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
            assert_eq!(avail_local, self.avail_local);
            if !self.avail_claimed.is_empty() {
                let mut claimed = vec![0u32; self.chunk_count as usize];
                for state in self.peers.values() {
                    if state.usable(max_strikes) {
                        for c in state.have.iter_ones() {
                            claimed[c as usize] += u32::from(state.claimed.get(c));
                        }
                    }
                }
                assert_eq!(claimed, self.avail_claimed);
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

    /// What the plan must respect, kept independently of it.
    #[derive(Default)]
    struct Model {
        held: BTreeSet<u32>,
        banned: BTreeSet<u32>,
        bans_seen: BTreeSet<u32>,
        connected: BTreeSet<u32>,
        have: BTreeMap<u32, BTreeSet<u32>>,
        in_flight: BTreeSet<(u32, u32)>,
    }

    /// Runs `ops` against a plan and the model, checking every action; returns every action.
    fn check(
        chunks: u32,
        held: &[bool],
        config: PlanConfig,
        ops: &[Op],
    ) -> Result<Vec<Action<u32>>, TestCaseError> {
        let held = bits(
            chunks,
            (0..chunks).filter(|&c| held.get(c as usize) == Some(&true)),
        );
        let mut plan = Plan::new(chunks, held.clone(), config);
        if plan.config().seed & 1 == 1 {
            // Half the cases know who they are, so that sites have gateways and owners (node 9
            // is none of the peers 0 to 4).
            plan = plan.with_self(&9);
        }
        let config = plan.config().clone();
        let mut remote_before_marking = false;
        let mut model = Model {
            held: held.iter_ones().collect(),
            ..Model::default()
        };
        let mut now = T0;
        let mut log = Vec::new();
        let ops = ops.iter().chain(std::iter::once(&Op::Next));
        for op in ops {
            plan.assert_consistent();
            match op.clone() {
                Op::Has {
                    peer,
                    bits: b,
                    wrong_len,
                } => {
                    let have = if wrong_len {
                        Bitfield::full(chunks + 1)
                    } else {
                        bits(chunks, (0..chunks).filter(|&c| b[c as usize]))
                    };
                    if !model.banned.contains(&peer) {
                        model.connected.insert(peer);
                        let ones = if wrong_len {
                            BTreeSet::new()
                        } else {
                            have.iter_ones().collect()
                        };
                        model.have.insert(peer, ones);
                    }
                    plan.handle(Event::PeerHas { peer, have }, now);
                }
                Op::HasChunk { peer, chunk } => {
                    if !model.banned.contains(&peer) && chunk < chunks {
                        model.connected.insert(peer);
                        model.have.entry(peer).or_default().insert(chunk);
                    }
                    plan.handle(Event::PeerHasChunk { peer, chunk }, now);
                }
                Op::Gone { peer } => {
                    model.connected.remove(&peer);
                    model.have.remove(&peer);
                    model.in_flight.retain(|(p, _)| *p != peer);
                    plan.handle(Event::PeerGone { peer }, now);
                }
                Op::Done { nth } | Op::Failed { nth } | Op::Busy { nth } => {
                    if model.in_flight.is_empty() {
                        continue;
                    }
                    let (peer, chunk) = *model
                        .in_flight
                        .iter()
                        .nth(nth % model.in_flight.len())
                        .unwrap();
                    model.in_flight.remove(&(peer, chunk));
                    if matches!(op, Op::Done { .. }) {
                        model.held.insert(chunk);
                        plan.handle(
                            Event::ChunkDone {
                                peer,
                                chunk,
                                bytes: CHUNK,
                            },
                            now,
                        );
                    } else if matches!(op, Op::Busy { .. }) {
                        let strikes = plan.peer_stats(&peer).map(|s| s.strikes);
                        plan.handle(Event::ChunkBusy { peer, chunk }, now);
                        prop_assert_eq!(plan.peer_stats(&peer).map(|s| s.strikes), strikes);
                    } else {
                        plan.handle(Event::ChunkFailed { peer, chunk }, now);
                    }
                }
                Op::Uploads {
                    peer,
                    sending,
                    sent,
                } => {
                    let b = |v: &[bool]| bits(chunks, (0..chunks).filter(|&c| v[c as usize]));
                    plan.handle(
                        Event::PeerUploads {
                            peer,
                            sending: b(&sending),
                            sent: b(&sent),
                        },
                        now,
                    );
                }
                Op::DoneAny { peer, chunk } => {
                    if chunk < chunks {
                        model.held.insert(chunk);
                    }
                    model.in_flight.remove(&(peer, chunk));
                    plan.handle(
                        Event::ChunkDone {
                            peer,
                            chunk,
                            bytes: CHUNK,
                        },
                        now,
                    );
                }
                Op::Remote { peer } => {
                    remote_before_marking |= model.in_flight.iter().any(|(p, _)| *p == peer);
                    plan.handle(Event::PeerRemote { peer }, now);
                }
                Op::FailedAny { peer, chunk } => {
                    model.in_flight.remove(&(peer, chunk));
                    plan.handle(Event::ChunkFailed { peer, chunk }, now);
                }
                Op::Bad { peer, chunk } => {
                    model.banned.insert(peer);
                    model.connected.remove(&peer);
                    model.have.remove(&peer);
                    model.in_flight.retain(|(p, _)| *p != peer);
                    plan.handle(Event::ChunkBad { peer, chunk }, now);
                }
                Op::Advance { ms: step } => now += ms(step),
                Op::Window { from, len } => plan.set_priority_window(from, len),
                Op::Next => {
                    for action in plan.next_actions(now) {
                        match &action {
                            Action::Ban { peer } => {
                                prop_assert!(model.banned.contains(peer));
                                prop_assert!(model.bans_seen.insert(*peer), "banned twice");
                            }
                            Action::Cancel { peer, chunk } => {
                                prop_assert!(
                                    model.in_flight.remove(&(*peer, *chunk)),
                                    "cancel of nothing: {:?}",
                                    action
                                );
                            }
                            Action::Request { peer, chunk } => {
                                prop_assert!(*chunk < chunks);
                                prop_assert!(!model.held.contains(chunk), "held: {:?}", action);
                                prop_assert!(!model.banned.contains(peer), "banned: {:?}", action);
                                prop_assert!(model.connected.contains(peer), "gone: {:?}", action);
                                prop_assert!(
                                    model.have.get(peer).is_some_and(|h| h.contains(chunk)),
                                    "lacks: {:?}",
                                    action
                                );
                                prop_assert!(
                                    model.in_flight.insert((*peer, *chunk)),
                                    "asked twice: {:?}",
                                    action
                                );
                            }
                        }
                        log.push(action);
                    }
                    prop_assert_eq!(plan.in_flight(), model.in_flight.len());
                    prop_assert!(plan.in_flight() <= config.max_in_flight);
                    for peer in 0..5 {
                        let outstanding =
                            model.in_flight.iter().filter(|(p, _)| *p == peer).count();
                        let reported = plan.peer_stats(&peer).map_or(0, |s| s.in_flight);
                        prop_assert_eq!(outstanding, reported);
                        prop_assert!(reported <= 4 * config.max_in_flight_per_peer);
                    }
                    let remote: usize = (0..5)
                        .filter_map(|p| plan.peer_stats(&p))
                        .filter(|s| s.remote)
                        .map(|s| s.in_flight)
                        .sum();
                    // Requests sent before a peer was marked remote stay, so only new ones count.
                    prop_assert!(
                        remote <= config.max_remote_in_flight || remote_before_marking,
                        "{remote} remote requests"
                    );
                    prop_assert_eq!(
                        plan.held().iter_ones().collect::<BTreeSet<_>>(),
                        model.held.clone()
                    );
                    // Liveness: right after `next_actions`, an idle incomplete plan is stalled, or
                    // has a deadline to wake at (a busy peer resting, a chunk waiting for a copy),
                    // or leaves a chunk to another downloader of its site.
                    let idle = !plan.is_complete() && plan.in_flight() == 0;
                    if plan.is_stalled() {
                        prop_assert!(idle);
                    } else if idle {
                        let sites = (0..5).any(|p| plan.peer_stats(&p).is_some_and(|s| s.remote));
                        prop_assert!(
                            plan.next_deadline().is_some() || sites,
                            "idle, not stalled, nothing to wait for"
                        );
                    }
                    if let Some(deadline) = plan.next_deadline() {
                        prop_assert!(deadline > now);
                    }
                }
            }
        }
        plan.assert_consistent();
        Ok(log)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn random_events_never_break_the_invariants(
            (chunks, held, config, ops) in (1u32..24).prop_flat_map(|chunks| (
                Just(chunks),
                prop::collection::vec(prop::bool::weighted(0.2), chunks as usize),
                any_config(),
                prop::collection::vec(op(chunks), 0..200),
            ))
        ) {
            let first = check(chunks, &held, config.clone(), &ops)?;
            let again = check(chunks, &held, config, &ops)?;
            prop_assert_eq!(first, again, "same seed and events, same actions");
        }
    }
}
