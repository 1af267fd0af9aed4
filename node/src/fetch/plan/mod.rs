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
//!   hash or stream much, and the last chunk set off a re-read of much of the blob for the
//!   digest and the client at once ("Blocks in order" in `tests/bench/RESULTS.md`).
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
//!   once it is whole, so in a swarm they delay every chunk and its spread through the fleet (the
//!   fleet simulator and the swarm benchmark both measured it: "One request per peer in a
//!   swarm" in `tests/bench/RESULTS.md`).
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
//!   available would spend the fleet's uplinks on copies nobody needs (the fleet simulator's
//!   thrown-away bytes, `simulations/README.md`).
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
//!   what had crossed the link (the fleet simulator's `edge-local-first` scenario, before and after
//!   the budget: `simulations/README.md`). Nodes that see
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
//!   equally rare, and without more information several pick the same one, so the publisher sends
//!   each chunk several times (the simulator's test `serve_reports_bring_the_publishers_egress_near_one_copy`
//!   measures it), and the publisher's uplink is the bottleneck of a rollout. So a seeder reports which chunks it is sending and has sent
//!   ([`Event::PeerServes`]). A chunk every usable holder has already given away waits for the
//!   copy to reach some other peer, which is then asked instead; among holders, one that has not
//!   given the chunk away is asked first. The wait is bounded, because the copy may never reach
//!   this node's peers: a chunk sent waits [`PlanConfig::serve_patience`] or three typical
//!   request times, whichever is longer but never more than half the request timeout, and a
//!   chunk still being sent eight times that, never more than the request timeout. Two cases
//!   wait longer, because the holder that gave the chunk away is the one whose uplink matters:
//!   while another holder that did not give the chunk away merely has no free slot, the chunk
//!   waits for that holder's slot and is never asked of the one that gave it away; and while a
//!   holder that gave it away still holds chunks this node misses and nobody has (the publisher
//!   of a rollout, until every chunk has left it once), it is asked for those, never for a
//!   second copy, however long the wait (it cannot stall: those chunks are there to request).
//!   In the fleet simulator these took the publisher from 1.16 to 1.00 copies at 1000 nodes and
//!   from 1.31 to 1.04 with an 8 GiB image (`simulations/README.md`). This is BitTorrent's
//!   super-seeding (the seeder steers each downloader to pieces nobody has yet) done from the
//!   downloader's side, so the seeder keeps serving whatever it is asked.
//!
//! Invariants, for every [`Action::Request`]: the chunk is not held, the peer is connected, not
//! banned, not struck out, not resting after "busy", said it has the chunk, has no request for it
//! already, and the peer and global caps hold.
//!
//! Not here: choking and upload policy (what this node serves is another module's business),
//! requests for parts of a chunk, and bandwidth shaping.
//!
//! # Layout
//!
//! This file holds what the driver sees ([`PlanConfig`], [`Event`], [`Action`], [`Plan`]), the
//! handling of events and the bookkeeping of requests. The parts of the policy are child modules
//! that extend [`Plan`]: `peers` (what the plan knows of each peer: rates and limits, strikes,
//! bans, rests after "busy"), `chunk_counts` (how many usable, local and claiming holders each
//! chunk has, kept in step with the peers), `serves` (seeders' reports and the wait for a copy),
//! `sites` (gateways, owners, stripes and the backstop) and `schedule` (the scheduling pass, phase
//! by phase). The tests are in `tests/`, one file per area.

mod chunk_counts;
mod peers;
mod schedule;
mod serves;
mod sites;

use std::fmt::Debug;
use std::hash::Hash;
use std::time::Duration;

use chunk_counts::ChunkCounts;
pub use peers::PeerStats;
use peers::{PeerState, Peers};
use schedule::Scratch;
use sites::stable_hash;

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
    pub serve_patience: Duration,
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
            serve_patience: Duration::from_millis(250),
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
    PeerServes {
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
    /// Chunk → how many usable peers hold it, how many local ones, how many that gave it away.
    counts: ChunkCounts,
    /// Chunk → when a peer first said it had sent it. Empty until a peer reports its serves,
    /// like the one below.
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
            counts: ChunkCounts::new(chunk_count, config.max_strikes),
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
            Event::PeerServes {
                peer,
                sending,
                sent,
            } => self.on_peer_serves(peer, sending, sent, now),
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

    /// Removes the peer's chunks from the availability counts, if it counts (it is usable).
    /// Called before any change to its bitfield or usability, with `contribute` after it.
    fn withdraw(&mut self, peer: &P) {
        if let Some(state) = self.peers.get(peer) {
            self.counts.remove_peer(state);
        }
    }

    /// Adds the peer's chunks to the availability counts, if it counts.
    fn contribute(&mut self, peer: &P) {
        if let Some(state) = self.peers.get(peer) {
            self.counts.add_peer(state);
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
            state.reconnect();
        }
        state.have = have;
        self.contribute(&peer);
    }

    fn on_peer_has_chunk(&mut self, peer: P, chunk: u32) {
        if chunk >= self.chunk_count {
            return;
        }
        let state = self.entry(peer.clone());
        if state.banned {
            return;
        }
        if !state.connected {
            // A have from a peer that had gone: a new session (its bitfield was cleared).
            state.reconnect();
            state.have.set(chunk);
            self.contribute(&peer);
            return;
        }
        if state.have.set(chunk) {
            if let Some(state) = self.peers.get(&peer) {
                self.counts.add_chunk(state, chunk);
            }
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

    // ---- requests ----

    /// Whether a request for `chunk` is outstanding.
    fn requested(&self, chunk: u32) -> bool {
        self.requesters.get(chunk as usize).is_some_and(|&n| n > 0)
    }

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
}

#[cfg(test)]
mod tests;
