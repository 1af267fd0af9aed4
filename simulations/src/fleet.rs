//! The fleet model: nodes, sites, discovery, haves, chunk requests and transfers, churn, all
//! driven by the node's own [`Plan`].
//!
//! One [`run`] simulates one rollout: a publisher holds the image at time zero and every puller
//! fetches it, the way `node/src/fetch/swarm.rs` does, or (in central mode) from the publisher
//! alone. The model, step by step (constants come from the node crate, so they stay in step):
//!
//! - **Start and discovery.** A puller announces itself as a provider when it starts and looks up
//!   providers; the lookup completes after [`Scenario::lookup_delay`] and returns the nodes that
//!   announced before that, the publisher included. Candidates are those providers, shuffled, then
//!   the node's connected peers (`mesh_degree` random nodes of the fleet), shuffled, at most
//!   [`MAX_CANDIDATES`] in all, as `Fetcher::candidates` orders them; with `local_first` (a
//!   node started with `--site`), the nodes of its own site come first, then the seeders (the
//!   publisher, and pullers once complete, which the node looks up on the DHT; here every
//!   seeder is found at once), then the rest.
//!   Every [`CANDIDATE_REFRESH`]
//!   it drops candidates that never answered and looks up again to fill the free places.
//! - **Haves.** It asks each candidate what it holds (one round trip). A candidate that holds or
//!   downloads the blob answers with its bitfield: [`Event::PeerRemote`] first if it is in another
//!   site, then [`Event::PeerHas`]. Then the asker keeps one long-poll parked at each candidate:
//!   the candidate answers as soon as it holds a chunk the asker has not been told of, and the
//!   asker polls again at once. An update costs one one-way latency, and chunks that arrive
//!   while a poll travels are batched into the next answer. New chunks are fed as
//!   [`Event::PeerHasChunk`] (the same as a whole bitfield: chunks are never lost), and only
//!   chunks the asker misses: a poll stays parked while the candidate only gets chunks the asker
//!   holds. The ten-second empty answer of a long-poll changes nothing and is not simulated.
//! - **Upload reports.** A node that holds the whole blob (the publisher from the start, a
//!   puller once complete) logs the transfers it starts from then on, as the node's chunk server
//!   does for stored blobs: which chunks it is sending now (a cancelled or cut transfer stops
//!   counting) and which it has sent in full at least once. Its answers carry that report, and a
//!   poll parked at it is also answered when the report changes; the asker feeds
//!   [`Event::PeerUploads`] and polls again. The node answers at every transfer start and end;
//!   the model answers only when a chunk's *claim* changes (nothing, being sent, sent: see
//!   `claim`), and only askers missing that chunk, because the plan acts on nothing else
//!   (a chunk sent once stays "given away" however often it is sent again, and only missing
//!   chunks matter). That keeps it cheap: a seeder's claims change at most a few times per
//!   chunk, so a busy seeder is not polled at the rate of its transfers. A report is fed only
//!   when it changes the claim on a chunk the asker misses.
//! - **Requests.** Each [`Action::Request`] travels one one-way latency to the peer. Chunk
//!   streams are pooled as the node pools its `ChunkClient`s: a download keeps the streams it
//!   opened to a peer and reuses an idle one; a request that finds none idle opens a new one,
//!   which the peer refuses when [`MAX_INBOUND_CHUNK_STREAMS`] streams are already open to it:
//!   it answers "busy", and the requester feeds [`Event::ChunkBusy`] one round trip after asking
//!   (not a strike; the plan rests the peer). A stream closes when its request is cancelled or
//!   fails, when its download ends, and when the server's idle timeout (one second) closes it
//!   (per peer: a download's idle streams to a peer close once none went idle for that long). An
//!   accepted request is a flow of the chunk's bytes from server to requester over the sender's
//!   NIC, the sender's and receiver's site WAN links if they differ, the receiver's NIC, and the
//!   shared host if there is one. Its last byte gives [`Event::ChunkDone`]; the requester holds
//!   the chunk from then on and answers the long-polls parked on it. [`Action::Cancel`] stops the
//!   flow (its bytes count as sent, received and discarded). A request the plan expires is
//!   cancelled the same way.
//! - **The plan** is driven as the node drives it: [`Plan::next_actions`] after every batch of
//!   events for a node (all events of one instant), and again at [`Plan::next_deadline`] (request
//!   timeouts, the end of a rest after "busy", the end of a chunk's wait for a copy). A call
//!   that provably returns nothing is skipped: when only haves arrived, none of them for a chunk
//!   some candidate's report claimed (a new holder of such a chunk may end its wait, freeing it
//!   for any peer), and neither the download nor any peer they came from has a free request slot
//!   (the last call already gave every other free slot what it could take). Upload reports,
//!   "busy" answers and every other event always lead to a call. A download stalled for
//!   [`STALL_LIMIT`] fails like the node's
//!   and is retried at once with a new lookup and a new plan that resumes from the chunks held
//!   (a client retrying its pull).
//! - **Ties.** Everything that happens at one simulated instant happens in the order it was
//!   scheduled, and nodes decide in the order they got their first event of the instant. Another
//!   order would be as valid and gives slightly different runs: compare seeds, not digits.
//! - **Churn.** A leaving node's connections drop: every node that has it as a candidate gets
//!   [`Event::PeerGone`] at once, and its transfers in both directions stop. It keeps the chunks
//!   it holds; when it comes back it announces again and starts a new download (if incomplete)
//!   from them; others find it again through their lookups.
//! - **Central.** Every puller downloads the image from the publisher as `central_streams` equal
//!   layers at once, with no limit on the publisher's streams (a registry).
//!
//! Not modelled: the node's back-off when it asks a peer that does not download the blob yet
//! (here such a candidate is dropped at the next refresh and found again by a lookup), choking (a node serves whoever asks, up to the stream limit, as the node does),
//! bad peers and bans, the priority window (no client reads while downloading), partial-chunk
//! requests, the blob index fetch, and everything in [`crate`]'s list of omissions.

use std::rc::Rc;
use std::time::Instant;

use shoal_node::fetch::plan::{Action, Bitfield, Event, Plan};
use shoal_node::fetch::swarm::{
    CANDIDATE_REFRESH, MAX_CANDIDATES, MAX_IN_FLIGHT, MAX_IN_FLIGHT_BYTES, REQUEST_TIMEOUT,
    STALL_LIMIT, plan_config,
};
use shoal_node::net::chunk::{IDLE_TIMEOUT, MAX_INBOUND_CHUNK_STREAMS};

use crate::engine::{Nanos, Queue, duration, nanos, nanos_from_secs, secs_from_nanos};
use crate::links::{FlowId, LinkId, Network, Sharing};
use crate::rng::{Rng, mix};
use crate::scenario::{Mode, PublisherSite, Scenario, SharingMode, bytes_per_sec};

/// Node 0 is the publisher; pullers are 1..=N.
const PUBLISHER: u32 = 0;

/// What one run produced.
#[derive(Debug, Clone, PartialEq)]
pub struct RunResult {
    /// Pullers.
    pub nodes: u32,
    /// Sites of pullers.
    pub sites: u32,
    /// The image size.
    pub image_bytes: u64,
    /// The seed.
    pub seed: u64,
    /// Per puller (index 0 is puller 1): its completion time in seconds after it first started,
    /// `None` if it did not complete.
    pub completion_secs: Vec<Option<f64>>,
    /// Per node (index 0 is the publisher): bytes sent, bytes received.
    pub node_bytes: Vec<(f64, f64)>,
    /// Per node: whether it ended holding every chunk exactly once in its log.
    pub holds_image: Vec<bool>,
    /// Per site of pullers: bytes in over its WAN link, bytes out.
    pub wan_bytes: Vec<(f64, f64)>,
    /// Bytes over every NIC uplink and every NIC downlink, added up.
    pub nic_bytes: (f64, f64),
    /// Bytes over the WAN links: up, down (every site, the publisher's own site included).
    pub wan_total_bytes: (f64, f64),
    /// Bytes received and thrown away: cancelled or duplicate transfers.
    pub wasted_bytes: f64,
    /// Requests answered "busy": the server had all its streams busy, or (`declined`) it was
    /// sending that chunk already.
    pub refused: u64,
    /// Of `refused`, those a seeder declined because it was sending that chunk already.
    pub declined: u64,
    /// Downloads that stalled for the stall limit and were retried.
    pub stalls: u64,
    /// Nodes that left (churn).
    pub departures: u64,
    /// Requests the plans cancelled (endgame losers, timeouts, struck-out peers).
    pub cancels: u64,
    /// Of those, requests that had timed out.
    pub timeouts: u64,
    /// Bytes of chunks that arrived complete but were already held.
    pub duplicate_bytes: f64,
    /// Bytes of transfers cancelled because the chunk came from another peer first (endgame
    /// losers).
    pub loser_bytes: f64,
    /// Calls of `Plan::next_actions`, and calls skipped because they could do nothing.
    pub thinks: (u64, u64),
    /// Upload reports fed to plans ([`Event::PeerUploads`]).
    pub reports: u64,
    /// Simulated time at which the run ended.
    pub end_secs: f64,
    /// Events processed.
    pub events: u64,
    /// Wall-clock seconds the simulation took.
    pub wall_secs: f64,
    /// Fair-share link fills done.
    pub fills: u64,
}

impl RunResult {
    /// Bytes the publisher sent.
    pub fn publisher_egress(&self) -> f64 {
        self.node_bytes.first().map_or(0.0, |b| b.0)
    }

    /// Pullers that completed.
    pub fn completed(&self) -> usize {
        self.completion_secs.iter().flatten().count()
    }

    /// The `q` quantile (0..=1, nearest rank) of the completion times of the pullers that
    /// completed.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let mut times: Vec<f64> = self.completion_secs.iter().flatten().copied().collect();
        if times.is_empty() {
            return None;
        }
        times.sort_by(f64::total_cmp);
        let rank = ((q * times.len() as f64).ceil() as usize).clamp(1, times.len());
        Some(times[rank - 1])
    }
}

#[derive(Debug)]
enum Ev {
    Start(u32),
    /// A lookup of `node`'s download number `epoch` returns.
    LookupDone {
        node: u32,
        epoch: u32,
    },
    Refresh {
        node: u32,
        epoch: u32,
    },
    /// A have request from `from` reaches `to`.
    HaveAsk {
        from: u32,
        epoch: u32,
        to: u32,
        slot: u32,
    },
    /// The same answer from `from` (in its session `session`) reaches every `(node, epoch)` of
    /// `to`: the answer to a `Have`, or long polls answered together.
    Answers {
        /// `(node, epoch, slot)`: the slot is where `from` probably is in the node's candidates
        /// (checked; a hint saves a search).
        to: Vec<(u32, u32, u32)>,
        from: u32,
        session: u32,
        /// How many chunks `from` held when it answered (the first `held` of its log).
        held: u32,
        /// Its upload report, if it holds the whole blob.
        uploads: Option<Rc<Report>>,
    },
    /// A long poll from `asker` reaches `at` (in its session `session`), which changed since
    /// the poll's last answer: it is answered at once.
    PollArrives {
        at: u32,
        session: u32,
        asker: u32,
        epoch: u32,
        slot: u32,
    },
    /// A chunk request reaches its server.
    Request {
        from: u32,
        epoch: u32,
        to: u32,
        id: u64,
    },
    /// The "busy" answer to request `id` (the peer had all its streams open) reaches its
    /// requester.
    Refused {
        to: u32,
        epoch: u32,
        id: u64,
    },
    Wake {
        node: u32,
        epoch: u32,
    },
    Leave(u32),
    Return(u32),
    /// Checks whether `node`'s idle streams to `peer` have been idle for the server's timeout.
    IdleCheck {
        node: u32,
        epoch: u32,
        peer: u32,
    },
}

impl Ev {
    /// A small number per kind of event, for the debug counts.
    fn kind(&self) -> usize {
        match self {
            Ev::Start(_) => 0,
            Ev::LookupDone { .. } => 1,
            Ev::Refresh { .. } => 2,
            Ev::HaveAsk { .. } => 3,
            Ev::Answers { .. } | Ev::PollArrives { .. } => 4,
            Ev::Request { .. } => 5,
            Ev::Refused { .. } => 6,
            Ev::Wake { .. } => 7,
            Ev::Leave(_) => 8,
            Ev::Return(_) => 9,
            Ev::IdleCheck { .. } => 7,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CandState {
    /// Asked what it holds; no answer yet (or it does not have the blob).
    Asked,
    /// Answered; `told` entries of its chunk log have been fed to the plan.
    Polling { told: u32 },
}

#[derive(Debug, Clone)]
struct Candidate {
    peer: u32,
    /// The peer's session when it became a candidate.
    session: u32,
    state: CandState,
    /// The last upload report it sent (it holds the whole blob). The plan's view agrees with it
    /// on every chunk this node misses.
    report: Option<Rc<Report>>,
}

/// A seeder's upload report, as its `Have` answers carry it (`UploadReport` in the protocol).
#[derive(Debug)]
struct Report {
    /// [`UploadLog::version`] when it was taken.
    version: u32,
    /// [`UploadLog::visible`] when it was taken.
    visible: u32,
    /// Chunks being sent to some peer.
    sending: Bitfield,
    /// Chunks sent in full at least once.
    sent: Bitfield,
}

/// What a plan makes of one chunk of a report: 0 nothing, 1 being sent, 2 sent. Its decisions
/// depend on nothing else (a chunk already sent counts as given away whether or not it is being
/// sent again, and the first time a chunk was reported sent comes before any later "sending").
fn claim(report: &Report, chunk: u32) -> u8 {
    if report.sent.get(chunk) {
        2
    } else {
        u8::from(report.sending.get(chunk))
    }
}

/// The uploads of a node that holds the whole blob, as the node's chunk server logs them: only
/// transfers that started once it held the whole blob (a download in progress serves from its
/// partial file and logs nothing).
#[derive(Debug)]
struct UploadLog {
    /// Chunk → transfers under way.
    sending: Vec<u32>,
    sent: Bitfield,
    /// Bumped when the report changes (the node bumps it at every transfer start and end; a
    /// start or end that leaves both bitfields as they were changes no answer's content).
    version: u32,
    /// Bumped when a chunk's [`claim`] changes: the only changes a plan can act on.
    visible: u32,
    /// The report as of `version`, shared by the answers that carry it.
    report: Option<Rc<Report>>,
}

impl UploadLog {
    fn new(chunk_count: u32) -> UploadLog {
        UploadLog {
            sending: vec![0; chunk_count as usize],
            sent: Bitfield::new(chunk_count),
            version: 0,
            visible: 0,
            report: None,
        }
    }

    /// The current report.
    fn report(&mut self) -> Rc<Report> {
        if let Some(r) = self.report.as_ref().filter(|r| r.version == self.version) {
            return r.clone();
        }
        let mut sending = Bitfield::new(self.sent.len());
        for (chunk, _) in self.sending.iter().enumerate().filter(|(_, n)| **n > 0) {
            sending.set(chunk as u32);
        }
        let r = Rc::new(Report {
            version: self.version,
            visible: self.visible,
            sending,
            sent: self.sent.clone(),
        });
        self.report = Some(r.clone());
        r
    }

    /// A transfer of `chunk` starts; returns whether its claim changed.
    fn start(&mut self, chunk: u32) -> bool {
        let Some(n) = self.sending.get_mut(chunk as usize) else {
            return false;
        };
        *n += 1;
        if *n > 1 {
            return false;
        }
        self.version += 1;
        let visible = !self.sent.get(chunk);
        self.visible += u32::from(visible);
        visible
    }

    /// A transfer of `chunk` ends, `finished` or cut short; returns whether its claim changed.
    fn end(&mut self, chunk: u32, finished: bool) -> bool {
        let Some(n) = self.sending.get_mut(chunk as usize) else {
            return false;
        };
        *n = n.saturating_sub(1);
        let idle = *n == 0;
        let was_sent = self.sent.get(chunk);
        let newly_sent = finished && self.sent.set(chunk);
        if idle || newly_sent {
            self.version += 1;
        }
        let visible = !was_sent && (idle || newly_sent);
        self.visible += u32::from(visible);
        visible
    }
}

#[derive(Debug, Clone)]
struct Request {
    id: u64,
    peer: u32,
    chunk: u32,
    flow: Option<FlowId>,
    sent: Nanos,
    /// It needs a new chunk stream to the peer (none was idle in the pool).
    new_stream: bool,
    /// The peer took it (its stream counts against the peer's limit).
    accepted: bool,
    /// The peer's session when it was sent: a stream to an earlier session is gone.
    session: u32,
}

impl Request {
    /// Whether the stream it uses is counted at the server.
    fn holds_server_stream(&self) -> bool {
        !self.new_stream || self.accepted
    }
}

/// The chunk streams one download holds to one peer, like the node's pool of `ChunkClient`s:
/// a stream stays open between requests and is reused; a request that finds none idle opens one.
#[derive(Debug, Clone)]
struct Streams {
    peer: u32,
    /// The peer's session: streams die with it.
    session: u32,
    open: u32,
    busy: u32,
    /// When a stream last went back idle.
    released: Nanos,
    /// Whether an idle check is queued.
    check_pending: bool,
}

/// How long the chunk server keeps an idle stream open: the node's own [`IDLE_TIMEOUT`].
const STREAM_IDLE_TIMEOUT: Nanos = IDLE_TIMEOUT.as_nanos() as Nanos;

struct Download {
    plan: Plan<u32>,
    candidates: Vec<Candidate>,
    requests: Vec<Request>,
    pool: Vec<Streams>,
    stalled_since: Option<Nanos>,
    /// Chunks some candidate's report claimed (sending or sent) when it was fed to the plan:
    /// a superset of the chunks the plan may hold back waiting for a copy.
    claimed_any: Bitfield,
}

#[derive(Debug, Clone, Copy)]
struct Parked {
    asker: u32,
    epoch: u32,
    /// When the poll reaches this node.
    arrives: Nanos,
    /// Where this node probably is in the asker's candidates.
    slot: u32,
}

struct Node {
    site: u32,
    up: LinkId,
    down: LinkId,
    online: bool,
    /// Incremented when it leaves: messages from an older session are dropped.
    session: u32,
    /// Incremented when its download restarts or it leaves: messages to an older one are dropped.
    epoch: u32,
    started: Option<Nanos>,
    announced: bool,
    held: Bitfield,
    /// Chunks in the order they arrived, with when.
    log: Vec<(u32, Nanos)>,
    completed: Option<Nanos>,
    /// Inline, not boxed: every have answer reads it, and a box is one more dependent load.
    download: Option<Download>,
    /// Chunk streams other nodes hold open to it (at most [`MAX_INBOUND_CHUNK_STREAMS`]).
    streams_in: usize,
    parked: Vec<Parked>,
    /// Nodes that took it as a candidate (may hold stale entries; checked on use).
    watchers: Vec<u32>,
    mesh: Vec<u32>,
    sent: f64,
    received: f64,
    dirty: bool,
    /// Whether the events since its plan last decided were all haves.
    haves_only: bool,
    /// The peers those haves came from.
    news_from: Vec<u32>,
    /// The earliest wake-up queued for its current epoch.
    wake_at: Nanos,
    /// Central mode: layer flows still running.
    layers_left: u32,
    /// Its uploads, once it holds the whole blob (swarm mode).
    uploads: Option<Box<UploadLog>>,
}

#[derive(Debug, Clone, Copy)]
struct FlowInfo {
    from: u32,
    to: u32,
    epoch: u32,
    id: u64,
    chunk: u32,
    size: f64,
    /// The sender logged it as an upload (it held the whole blob when it started).
    logged: bool,
}

struct Sim<'a> {
    scenario: &'a Scenario,
    q: Queue<Ev>,
    net: Network,
    nodes: Vec<Node>,
    /// Per site: WAN up and down links (if there is a WAN).
    wan: Vec<(LinkId, LinkId)>,
    host: Option<LinkId>,
    /// Nodes in the order they announced themselves (provider records outlive departures).
    providers: Vec<u32>,
    /// Nodes that announced they hold the whole blob, in order (the publisher, then pullers as
    /// they complete): a node that knows its site takes them right after its site's peers.
    seeders: Vec<u32>,
    flows: Vec<Option<FlowInfo>>,
    /// Nodes of each site (for the local-first what-if).
    site_members: Vec<Vec<u32>>,
    chunk_count: u32,
    rng: Rng,
    next_request: u64,
    dirty: Vec<u32>,
    wasted: f64,
    refused: u64,
    stalls: u64,
    seed: u64,
    complete_count: usize,
    cancels: u64,
    timeouts: u64,
    duplicate_bytes: f64,
    departures: u64,
    loser_bytes: f64,
    early_losers: u64,
    /// Complete uploads of each chunk by the publisher.
    publisher_uploads: Vec<u32>,
    /// Requests a seeder declined because it was sending that chunk already.
    declined: u64,
    thinks: u64,
    thinks_skipped: u64,
    /// Upload reports fed to plans.
    reports: u64,
    debug: bool,
    kinds: [u64; 10],
    max_queue: usize,
    flow_ends: u64,
    next_trace: Nanos,
    pub_requests: [u64; 7],
    /// Debug: the current run of busy answers (node, peer, instant) and its length, and how
    /// many runs had each length (1 to 7, 8 or more).
    busy_burst: ((u32, u32, Nanos), u32),
    busy_bursts: [u64; 8],
}

/// Runs `scenario` with `pullers` pullers and `seed`.
pub fn run(scenario: &Scenario, pullers: u32, seed: u64) -> RunResult {
    let wall = Instant::now();
    let mut sim = Sim::new(scenario, pullers, seed);
    sim.run();
    sim.result(pullers, wall.elapsed().as_secs_f64())
}

impl<'a> Sim<'a> {
    fn new(scenario: &'a Scenario, pullers: u32, seed: u64) -> Sim<'a> {
        let sharing = match scenario.sharing {
            SharingMode::Local => Sharing::Local,
            SharingMode::Exact => Sharing::Exact,
        };
        let mut net = Network::new(sharing);
        let mut rng = Rng::new(seed);
        let chunk_count = scenario.chunk_count();
        let own_site = scenario.publisher.site == PublisherSite::Own;
        let site_count = scenario.sites + u32::from(own_site);
        let mut wan = Vec::new();
        if scenario.has_wan() {
            if let Some(w) = &scenario.wan {
                for site in 0..site_count {
                    let (up, down) = if own_site && site == scenario.sites {
                        let mbit = scenario.publisher.wan_mbit.unwrap_or(1000.0);
                        (mbit, mbit)
                    } else {
                        (w.up_mbit, w.down_mbit)
                    };
                    wan.push((
                        net.add_link(bytes_per_sec(up)),
                        net.add_link(bytes_per_sec(down)),
                    ));
                }
            }
        }
        let host = scenario
            .host
            .as_ref()
            .map(|h| net.add_link(h.bytes_per_sec()));
        let total = pullers as usize + 1;
        let mut nodes = Vec::with_capacity(total);
        for i in 0..total as u32 {
            let (site, mbit) = if i == PUBLISHER {
                let site = if own_site { scenario.sites } else { 0 };
                (
                    site,
                    scenario.publisher.nic_mbit.unwrap_or(scenario.nic_mbit),
                )
            } else {
                ((i - 1) % scenario.sites, scenario.nic_mbit)
            };
            let up = net.add_link(bytes_per_sec(mbit));
            let down = net.add_link(bytes_per_sec(mbit));
            let degree = (scenario.discovery.mesh_degree as usize).min(total - 1);
            let mut mesh = Vec::with_capacity(degree);
            while mesh.len() < degree {
                let p = rng.below(total as u64) as u32;
                if p != i && !mesh.contains(&p) {
                    mesh.push(p);
                }
            }
            nodes.push(Node {
                site,
                up,
                down,
                online: true,
                session: 0,
                epoch: 0,
                started: None,
                announced: false,
                held: Bitfield::new(chunk_count),
                log: Vec::new(),
                completed: None,
                download: None,
                streams_in: 0,
                parked: Vec::new(),
                watchers: Vec::new(),
                mesh,
                sent: 0.0,
                received: 0.0,
                dirty: false,
                haves_only: false,
                news_from: Vec::new(),
                wake_at: Nanos::MAX,
                layers_left: 0,
                uploads: None,
            });
        }
        let mut site_members = vec![Vec::new(); site_count as usize];
        for (i, n) in nodes.iter().enumerate() {
            if let Some(m) = site_members.get_mut(n.site as usize) {
                m.push(i as u32);
            }
        }
        let publisher = &mut nodes[PUBLISHER as usize];
        publisher.held = Bitfield::full(chunk_count);
        publisher.log = (0..chunk_count).map(|c| (c, 0)).collect();
        publisher.started = Some(0);
        publisher.completed = Some(0);
        publisher.announced = true;
        if scenario.mode == Mode::Swarm {
            publisher.uploads = Some(Box::new(UploadLog::new(chunk_count)));
        }
        let mut sim = Sim {
            scenario,
            q: Queue::new(),
            net,
            nodes,
            wan,
            host,
            providers: vec![PUBLISHER],
            seeders: vec![PUBLISHER],
            flows: Vec::new(),
            site_members,
            chunk_count,
            rng,
            next_request: 0,
            dirty: Vec::new(),
            wasted: 0.0,
            refused: 0,
            declined: 0,
            stalls: 0,
            seed,
            complete_count: 0,
            cancels: 0,
            timeouts: 0,
            duplicate_bytes: 0.0,
            departures: 0,
            loser_bytes: 0.0,
            early_losers: 0,
            publisher_uploads: vec![0; chunk_count as usize],
            thinks: 0,
            thinks_skipped: 0,
            reports: 0,
            debug: std::env::var_os("SHOAL_SIM_DEBUG").is_some(),
            kinds: [0; 10],
            max_queue: 0,
            flow_ends: 0,
            next_trace: 0,
            pub_requests: [0; 7],
            busy_burst: ((0, 0, 0), 0),
            busy_bursts: [0; 8],
        };
        for i in 1..=pullers {
            let at = nanos_from_secs(sim.rng.unit() * scenario.start_spread_secs);
            sim.q.push(at, Ev::Start(i));
        }
        if let Some(churn) = &scenario.churn {
            let leaving = (f64::from(pullers) * churn.fraction).round() as u32;
            let mut order: Vec<u32> = (1..=pullers).collect();
            sim.rng.shuffle(&mut order);
            for &node in order.iter().take(leaving as usize) {
                let at = sim.rng.between(churn.leave_secs[0], churn.leave_secs[1]);
                sim.q.push(nanos_from_secs(at), Ev::Leave(node));
            }
        }
        sim
    }

    fn run(&mut self) {
        let limit = nanos_from_secs(self.scenario.time_limit_secs);
        let pullers = self.nodes.len() - 1;
        loop {
            // The next thing to happen: an event, or a flow's last byte (first on a tie).
            let next_flow = self.net.next_due();
            let next_event = self.q.peek_time();
            let at = match (next_flow, next_event) {
                (Some(f), Some(e)) => f.min(e),
                (Some(t), None) | (None, Some(t)) => t,
                (None, None) => break,
            };
            if at > limit {
                break;
            }
            self.max_queue = self.max_queue.max(self.q.len());
            if self.debug && at >= self.next_trace {
                self.trace(at);
            }
            if next_flow == Some(at) {
                self.q.advance_to(at);
                // A flow found not done yet is moved to its new time; then nothing happens now.
                if let Some((flow, _)) = self.net.pop_done(at) {
                    self.flow_ends += 1;
                    self.on_flow_end(flow);
                }
            } else if let Some((_, ev)) = self.q.pop() {
                if self.debug {
                    self.kinds[ev.kind()] += 1;
                }
                self.handle(ev);
            }
            let next = [self.net.next_due(), self.q.peek_time()]
                .into_iter()
                .flatten()
                .min();
            if next != Some(at) {
                self.flush();
            }
            // Every puller complete and nothing left in flight: the rollout is over (a pending
            // return of a complete node changes nothing).
            if self.complete_count == pullers && self.dirty.is_empty() && self.net.live_flows() == 0
            {
                break;
            }
        }
        if self.debug {
            let ups = &self.publisher_uploads;
            let whole: u32 = ups.iter().sum();
            eprintln!(
                "publisher: complete chunk uploads {} ({:.2} per chunk, most {}, least {})",
                whole,
                f64::from(whole) / ups.len().max(1) as f64,
                ups.iter().max().unwrap_or(&0),
                ups.iter().min().unwrap_or(&0)
            );
            eprintln!(
                "requests to the publisher (unclaimed: no other holder, holders all full, a holder free; claimed: same; endgame duplicates): {:?}",
                self.pub_requests
            );
            eprintln!(
                "busy answers from one peer at one instant, runs of 1..7 and 8+: {:?}",
                self.busy_bursts
            );
            eprintln!(
                "endgame losers cancelled with more than max_in_flight chunks still missing: {}",
                self.early_losers
            );
            eprintln!(
                "events by kind (start lookup refresh ask answer request refused wake leave return): {:?}; {} flow ends; max queue {}",
                self.kinds, self.flow_ends, self.max_queue
            );
        }
        // Stop whatever still runs (a time limit), so every byte moved is accounted.
        let now = self.q.now();
        for flow in 0..self.flows.len() {
            if let Some(info) = self.flows[flow].take() {
                let bytes = self.net.stop(now, flow as FlowId);
                self.account(info.from, info.to, bytes);
                self.wasted += bytes;
            }
        }
    }

    /// Debug: the state of the rollout, every tenth of a simulated second.
    fn trace(&mut self, at: Nanos) {
        self.next_trace = at - at % (crate::engine::SECOND / 10) + crate::engine::SECOND / 10;
        let held: u64 = self
            .nodes
            .iter()
            .map(|n| u64::from(n.held.count_ones()))
            .sum();
        let mut in_flight = 0;
        let mut resting = 0;
        let (mut open, mut busy, mut holders) = (0, 0, 0);
        for n in &self.nodes[1..] {
            if let Some(d) = n.download.as_ref() {
                for s in d.pool.iter().filter(|s| s.peer == PUBLISHER) {
                    open += s.open;
                    busy += s.busy;
                    holders += u32::from(s.open > 0);
                }
                in_flight += d.plan.in_flight();
                resting += usize::from(
                    d.plan
                        .peer_stats(&PUBLISHER)
                        .is_some_and(|s| s.usable && s.in_flight == 0),
                );
            }
        }
        let p = &self.nodes[PUBLISHER as usize];
        let sending = p
            .uploads
            .as_ref()
            .map_or(0, |u| u.sending.iter().filter(|&&n| n > 0).count());
        let sent = p.uploads.as_ref().map_or(0, |u| u.sent.count_ones());
        eprintln!(
            "t {:.2}: chunks held {held}, in flight {in_flight}, done {}, publisher streams {} sending {sending} sent {sent} parked {}, idle at publisher {resting}; pooled streams to it {open} ({busy} busy) in {holders} pools",
            secs_from_nanos(at),
            self.complete_count,
            p.streams_in,
            p.parked.len()
        );
    }

    /// Ends an instant: the plans of the nodes that got events decide, then rates are shared out.
    fn flush(&mut self) {
        let now = self.q.now();
        let mut i = 0;
        while i < self.dirty.len() {
            let node = self.dirty[i];
            self.nodes[node as usize].dirty = false;
            self.think(node);
            i += 1;
        }
        self.dirty.clear();
        self.net.settle(now);
    }

    /// `node`'s plan got events that may call for actions: it decides at the end of the instant.
    fn mark(&mut self, node: u32) {
        let n = &mut self.nodes[node as usize];
        n.haves_only = false;
        if !n.dirty {
            n.dirty = true;
            self.dirty.push(node);
        }
    }

    /// `node`'s plan learnt of new chunks at `peer`, and nothing else.
    fn mark_haves(&mut self, node: u32, peer: u32) {
        let n = &mut self.nodes[node as usize];
        if !n.dirty {
            n.dirty = true;
            n.haves_only = true;
            n.news_from.clear();
            self.dirty.push(node);
        }
        if n.haves_only && !n.news_from.contains(&peer) {
            n.news_from.push(peer);
        }
    }

    fn latency(&self, a: u32, b: u32) -> Nanos {
        self.scenario
            .latency(self.nodes[a as usize].site == self.nodes[b as usize].site)
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Start(node) => self.on_start(node),
            Ev::LookupDone { node, epoch } => self.on_lookup(node, epoch),
            Ev::Refresh { node, epoch } => self.on_refresh(node, epoch),
            Ev::HaveAsk {
                from,
                epoch,
                to,
                slot,
            } => self.on_have_ask(from, epoch, to, slot),
            Ev::Answers {
                to,
                from,
                session,
                held,
                uploads,
            } => {
                for (to, epoch, slot) in to {
                    self.on_have_answer(to, epoch, from, session, held, slot, uploads.as_ref());
                }
            }
            Ev::PollArrives {
                at,
                session,
                asker,
                epoch,
                slot,
            } => self.on_poll_arrives(at, session, asker, epoch, slot),
            Ev::Request {
                from,
                epoch,
                to,
                id,
            } => self.on_request(from, epoch, to, id),
            Ev::Refused { to, epoch, id } => self.on_refused(to, epoch, id),
            Ev::Wake { node, epoch } => {
                let n = &mut self.nodes[node as usize];
                if n.epoch == epoch && n.wake_at == self.q.now() {
                    n.wake_at = Nanos::MAX;
                    self.mark(node);
                }
            }
            Ev::Leave(node) => self.on_leave(node),
            Ev::IdleCheck { node, epoch, peer } => self.on_idle_check(node, epoch, peer),
            Ev::Return(node) => self.on_return(node),
        }
    }

    fn on_start(&mut self, node: u32) {
        let now = self.q.now();
        let n = &mut self.nodes[node as usize];
        if n.started.is_some() || !n.online {
            return;
        }
        n.started = Some(now);
        match self.scenario.mode {
            Mode::Central => self.start_central(node),
            Mode::Swarm => self.begin_download(node),
        }
    }

    /// Announces `node` and starts a lookup for a new download.
    fn begin_download(&mut self, node: u32) {
        let n = &mut self.nodes[node as usize];
        if !n.announced {
            n.announced = true;
            self.providers.push(node);
        }
        let epoch = n.epoch;
        if n.completed.is_some() {
            return;
        }
        let delay = self.scenario.lookup_delay();
        self.q.push_after(delay, Ev::LookupDone { node, epoch });
    }

    fn start_central(&mut self, node: u32) {
        let now = self.q.now();
        let streams = u64::from(self.scenario.central_streams);
        let image = self.scenario.image_bytes;
        self.nodes[node as usize].layers_left = streams as u32;
        for i in 0..streams {
            let size = image / streams + u64::from(i < image % streams);
            let links = self.path(PUBLISHER, node);
            let flow = self.net.start(now, &links, size as f64);
            self.set_flow(
                flow,
                FlowInfo {
                    from: PUBLISHER,
                    to: node,
                    epoch: 0,
                    id: u64::MAX,
                    chunk: u32::MAX,
                    size: size as f64,
                    logged: false,
                },
            );
        }
    }

    fn set_flow(&mut self, flow: FlowId, info: FlowInfo) {
        let i = flow as usize;
        if self.flows.len() <= i {
            self.flows.resize(i + 1, None);
        }
        self.flows[i] = Some(info);
    }

    /// The links a flow from `from` to `to` crosses.
    fn path(&self, from: u32, to: u32) -> Vec<LinkId> {
        let (a, b) = (&self.nodes[from as usize], &self.nodes[to as usize]);
        let mut links = vec![a.up];
        if a.site != b.site {
            if let (Some(&(up, _)), Some(&(_, down))) =
                (self.wan.get(a.site as usize), self.wan.get(b.site as usize))
            {
                links.push(up);
                links.push(down);
            }
        }
        links.push(b.down);
        if let Some(host) = self.host {
            links.push(host);
        }
        links
    }

    fn node_seed(&self, node: u32, epoch: u32) -> u64 {
        mix(self.seed ^ mix(u64::from(node) << 32 | u64::from(epoch)))
    }

    fn on_lookup(&mut self, node: u32, epoch: u32) {
        let now = self.q.now();
        let n = &self.nodes[node as usize];
        if n.epoch != epoch || !n.online || n.completed.is_some() {
            return;
        }
        if n.download.is_none() {
            let plan = Plan::new(
                self.chunk_count,
                n.held.clone(),
                plan_config(
                    self.node_seed(node, epoch),
                    u32::try_from(self.scenario.chunk_bytes).unwrap_or(u32::MAX),
                ),
            )
            .with_self(&node);
            self.nodes[node as usize].download = Some(Download {
                plan,
                candidates: Vec::new(),
                requests: Vec::new(),
                pool: Vec::new(),
                stalled_since: None,
                claimed_any: Bitfield::new(self.chunk_count),
            });
            self.q
                .push(now + nanos(CANDIDATE_REFRESH), Ev::Refresh { node, epoch });
            self.mark(node);
        }
        let fresh = self.sample_candidates(node);
        for peer in fresh {
            let session = self.nodes[peer as usize].session;
            let mut slot = u32::MAX;
            if let Some(d) = self.nodes[node as usize].download.as_mut() {
                slot = d.candidates.len() as u32;
                d.candidates.push(Candidate {
                    peer,
                    session,
                    state: CandState::Asked,
                    report: None,
                });
            }
            self.nodes[peer as usize].watchers.push(node);
            let lat = self.latency(node, peer);
            self.q.push_after(
                lat,
                Ev::HaveAsk {
                    from: node,
                    epoch,
                    to: peer,
                    slot,
                },
            );
        }
    }

    /// New candidates for `node`: providers first, then connected peers, each group shuffled,
    /// up to [`MAX_CANDIDATES`] candidates in all (or the scenario's what-if cap). With
    /// `local_first`, the node's own site and then the seeders go before all of them.
    fn sample_candidates(&mut self, node: u32) -> Vec<u32> {
        let Some(d) = self.nodes[node as usize].download.as_ref() else {
            return Vec::new();
        };
        let have: Vec<u32> = d.candidates.iter().map(|c| c.peer).collect();
        let cap = self
            .scenario
            .discovery
            .max_candidates
            .unwrap_or(MAX_CANDIDATES);
        let room = cap.saturating_sub(have.len());
        let mut fresh: Vec<u32> = Vec::with_capacity(room);
        let ok = |p: u32, fresh: &[u32]| p != node && !have.contains(&p) && !fresh.contains(&p);
        if self.scenario.discovery.local_first {
            let site = self.nodes[node as usize].site;
            let mut local: Vec<u32> = self
                .site_members
                .get(site as usize)
                .map(|m| {
                    m.iter()
                        .copied()
                        .filter(|&p| self.nodes[p as usize].announced)
                        .collect()
                })
                .unwrap_or_default();
            self.rng.shuffle(&mut local);
            // Then the seeders, as the node does with a site (`Fetcher::candidates`).
            let mut seeders = self.seeders.clone();
            self.rng.shuffle(&mut seeders);
            for p in local.into_iter().chain(seeders) {
                if fresh.len() >= room {
                    break;
                }
                if ok(p, &fresh) {
                    fresh.push(p);
                }
            }
        }
        let providers = self.providers.len();
        if providers <= 4 * (room + have.len() + 1) {
            let mut all: Vec<u32> = self.providers.clone();
            self.rng.shuffle(&mut all);
            for p in all {
                if fresh.len() >= room {
                    break;
                }
                if ok(p, &fresh) {
                    fresh.push(p);
                }
            }
        } else {
            // Uniform sample without building the whole list: rejection of repeats.
            let mut tries = 0;
            while fresh.len() < room && tries < 8 * room + 32 {
                tries += 1;
                let p = self.providers[self.rng.below(providers as u64) as usize];
                if ok(p, &fresh) {
                    fresh.push(p);
                }
            }
        }
        let mut mesh = self.nodes[node as usize].mesh.clone();
        self.rng.shuffle(&mut mesh);
        for p in mesh {
            if fresh.len() >= room {
                break;
            }
            if ok(p, &fresh) {
                fresh.push(p);
            }
        }
        fresh
    }

    fn on_refresh(&mut self, node: u32, epoch: u32) {
        let now = self.q.now();
        let n = &mut self.nodes[node as usize];
        if n.epoch != epoch || !n.online {
            return;
        }
        let Some(d) = n.download.as_mut() else {
            return;
        };
        // Candidates that never answered (gone, or not fetching this blob) make room.
        d.candidates.retain(|c| c.state != CandState::Asked);
        let delay = self.scenario.lookup_delay();
        self.q.push(now + delay, Ev::LookupDone { node, epoch });
        self.q
            .push(now + nanos(CANDIDATE_REFRESH), Ev::Refresh { node, epoch });
    }

    fn on_have_ask(&mut self, from: u32, epoch: u32, to: u32, slot: u32) {
        let b = &self.nodes[to as usize];
        // A node answers if it holds or downloads the blob; an offline one cannot answer.
        if !b.online || b.started.is_none() {
            return;
        }
        self.answer(to, from, epoch, slot);
    }

    /// `node` answers `asker`'s `Have` or long poll now, with what it holds and, if it holds the
    /// whole blob, its upload report.
    fn answer(&mut self, node: u32, asker: u32, epoch: u32, slot: u32) {
        let lat = self.latency(node, asker);
        let b = &mut self.nodes[node as usize];
        let uploads = b.uploads.as_mut().map(|u| u.report());
        let (session, held) = (b.session, b.log.len() as u32);
        self.q.push_after(
            lat,
            Ev::Answers {
                to: vec![(asker, epoch, slot)],
                from: node,
                session,
                held,
                uploads,
            },
        );
    }

    /// A long poll reaches `node` after it changed: answered at once.
    fn on_poll_arrives(&mut self, node: u32, session: u32, asker: u32, epoch: u32, slot: u32) {
        let (b, a) = (&self.nodes[node as usize], &self.nodes[asker as usize]);
        if !b.online || b.session != session {
            return;
        }
        if a.epoch != epoch || !a.online || a.completed.is_some() {
            return;
        }
        self.answer(node, asker, epoch, slot);
    }

    /// An answer from `from`: it held the first `k` chunks of its log, and `uploads` is its
    /// upload report if it holds the whole blob.
    #[allow(clippy::too_many_arguments)]
    fn on_have_answer(
        &mut self,
        to: u32,
        epoch: u32,
        from: u32,
        session: u32,
        k: u32,
        slot: u32,
        uploads: Option<&Rc<Report>>,
    ) {
        let now = self.q.now();
        let remote = self.nodes[to as usize].site != self.nodes[from as usize].site;
        let peer_session = self.nodes[from as usize].session;
        let chunk_count = self.chunk_count;
        let (a, b) = two(&mut self.nodes, to as usize, from as usize);
        if a.epoch != epoch || !a.online || peer_session != session {
            return;
        }
        let Some(d) = a.download.as_mut() else {
            return;
        };
        let is_it = |c: &Candidate| c.peer == from && c.session == session;
        let hinted = d
            .candidates
            .get(slot as usize)
            .filter(|c| is_it(c))
            .map(|_| slot as usize);
        let Some(ci) = hinted.or_else(|| d.candidates.iter().position(is_it)) else {
            return;
        };
        // What the plan heard: new chunks at `from` only (`haves`), or something that may free
        // chunks for other peers too (`full`; see `think`).
        let mut haves = false;
        let mut full = false;
        match d.candidates[ci].state {
            CandState::Asked => {
                if remote {
                    feed(d, Event::PeerRemote { peer: from }, now);
                }
                let mut have = Bitfield::new(chunk_count);
                for &(c, _) in &b.log[..k as usize] {
                    have.set(c);
                    full |= !a.held.get(c) && d.claimed_any.get(c);
                }
                feed(d, Event::PeerHas { peer: from, have }, now);
                d.candidates[ci].state = CandState::Polling { told: k };
                haves = true;
            }
            CandState::Polling { told } => {
                // A chunk this node already holds changes none of the plan's decisions (they
                // are all about missing chunks), so only news about missing ones is fed.
                for &(c, _) in b.log.get(told as usize..k as usize).unwrap_or(&[]) {
                    if !a.held.get(c) {
                        haves = true;
                        full |= d.claimed_any.get(c);
                        feed(
                            d,
                            Event::PeerHasChunk {
                                peer: from,
                                chunk: c,
                            },
                            now,
                        );
                    }
                }
                d.candidates[ci].state = CandState::Polling { told: told.max(k) };
            }
        }
        // The upload report, fed when it changes the claim on a chunk this node misses (the
        // plan's view of the others does not matter: they are never missing again).
        if let Some(r) = uploads.filter(|_| self.scenario.discovery.upload_reports) {
            let cand = &mut d.candidates[ci];
            if cand
                .report
                .as_ref()
                .is_none_or(|old| old.version < r.version)
            {
                let changed = match &cand.report {
                    None => r.sending.has_any_not_in(&a.held) || r.sent.has_any_not_in(&a.held),
                    Some(old) => a.held.iter_zeros().any(|c| claim(old, c) != claim(r, c)),
                };
                cand.report = Some(r.clone());
                if changed {
                    for c in r.sending.iter_ones().chain(r.sent.iter_ones()) {
                        d.claimed_any.set(c);
                    }
                    feed(
                        d,
                        Event::PeerUploads {
                            peer: from,
                            sending: r.sending.clone(),
                            sent: r.sent.clone(),
                        },
                        now,
                    );
                    self.reports += 1;
                    full = true;
                }
            }
        }
        // Poll again at once. It is answered on arrival if the peer changed since this answer
        // (a chunk stored, or a claim in its report); otherwise it stays parked there.
        let lat = self.latency(to, from);
        let b = &mut self.nodes[from as usize];
        let changed = b.log.len() as u32 > k
            || match (&b.uploads, uploads) {
                (Some(log), Some(r)) => log.visible != r.visible,
                (Some(_), None) => true,
                (None, _) => false,
            };
        if changed {
            self.q.push(
                now + lat,
                Ev::PollArrives {
                    at: from,
                    session,
                    asker: to,
                    epoch,
                    slot: ci as u32,
                },
            );
        } else {
            b.parked.push(Parked {
                asker: to,
                epoch,
                arrives: now + lat,
                slot: ci as u32,
            });
        }
        if full {
            self.mark(to);
        } else if haves {
            self.mark_haves(to, from);
        }
    }

    fn on_request(&mut self, from: u32, epoch: u32, to: u32, id: u64) {
        let now = self.q.now();
        let a = &self.nodes[from as usize];
        if a.epoch != epoch || !a.online {
            return;
        }
        let Some(req) = a
            .download
            .as_ref()
            .and_then(|d| d.requests.iter().find(|r| r.id == id))
            .cloned()
        else {
            return; // Cancelled while it travelled.
        };
        let b = &self.nodes[to as usize];
        if !b.online {
            return; // The requester was told the peer is gone, and forgot the request.
        }
        if req.new_stream && b.streams_in >= MAX_INBOUND_CHUNK_STREAMS {
            self.refuse(from, to, epoch, id);
            return;
        }
        // A seeder sends one copy of a chunk at a time (`BlobLog::start`): a request for a chunk
        // it is sending already is answered "busy", and the requester drops the stream (a
        // pooled one stops counting at the server; a new one never started to).
        let declined = b
            .uploads
            .as_ref()
            .is_some_and(|u| u.sending.get(req.chunk as usize).is_some_and(|&n| n > 0));
        if declined {
            if !req.new_stream {
                let b = &mut self.nodes[to as usize];
                b.streams_in = b.streams_in.saturating_sub(1);
            }
            self.declined += 1;
            self.refuse(from, to, epoch, id);
            return;
        }
        if req.new_stream {
            self.nodes[to as usize].streams_in += 1;
        }
        let size = self.chunk_len(req.chunk);
        let links = self.path(to, from);
        let flow = self.net.start(now, &links, size as f64);
        let logged = self.upload_started(to, req.chunk);
        self.set_flow(
            flow,
            FlowInfo {
                from: to,
                to: from,
                epoch,
                id,
                chunk: req.chunk,
                size: size as f64,
                logged,
            },
        );
        if let Some(r) = self.nodes[from as usize]
            .download
            .as_mut()
            .and_then(|d| d.requests.iter_mut().find(|r| r.id == id))
        {
            r.flow = Some(flow);
            r.accepted = true;
        }
    }

    /// `to` answers request `id` from `from` with "busy"; the answer travels back.
    fn refuse(&mut self, from: u32, to: u32, epoch: u32, id: u64) {
        self.refused += 1;
        let lat = self.latency(from, to);
        self.q.push_after(
            lat,
            Ev::Refused {
                to: from,
                epoch,
                id,
            },
        );
    }

    fn chunk_len(&self, chunk: u32) -> u64 {
        let start = u64::from(chunk) * self.scenario.chunk_bytes;
        self.scenario
            .chunk_bytes
            .min(self.scenario.image_bytes.saturating_sub(start))
    }

    fn on_refused(&mut self, to: u32, epoch: u32, id: u64) {
        let now = self.q.now();
        let a = &mut self.nodes[to as usize];
        if a.epoch != epoch || !a.online {
            return;
        }
        let Some(d) = a.download.as_mut() else {
            return;
        };
        let Some(i) = d.requests.iter().position(|r| r.id == id) else {
            return;
        };
        let req = d.requests.swap_remove(i);
        // The stream could not be opened: the peer answered "busy" (not a failure).
        pool_release(&mut d.pool, req.peer, true);
        if self.debug {
            // Busy answers to one node from one peer at one instant: a burst.
            let key = (to, req.peer, now);
            if self.busy_burst.0 == key {
                self.busy_burst.1 += 1;
            } else {
                let len = std::mem::replace(&mut self.busy_burst, (key, 1)).1;
                if len > 0 {
                    self.busy_bursts[(len as usize).min(8) - 1] += 1;
                }
            }
        }
        feed(
            d,
            Event::ChunkBusy {
                peer: req.peer,
                chunk: req.chunk,
            },
            now,
        );
        self.mark(to);
    }

    fn account(&mut self, from: u32, to: u32, bytes: f64) {
        self.nodes[from as usize].sent += bytes;
        self.nodes[to as usize].received += bytes;
    }

    fn on_flow_end(&mut self, flow: FlowId) {
        let now = self.q.now();
        if let Some(info) = self.flows.get_mut(flow as usize).and_then(Option::take) {
            self.finish_flow(info, now);
        }
    }

    fn finish_flow(&mut self, info: FlowInfo, now: Nanos) {
        let size = info.size;
        self.account(info.from, info.to, size);
        if info.logged {
            // The sender wrote the whole chunk, whether or not its receiver still wants it.
            self.upload_ended(info.from, info.chunk, true);
        }
        if info.from == PUBLISHER && info.chunk != u32::MAX {
            if let Some(n) = self.publisher_uploads.get_mut(info.chunk as usize) {
                *n += 1;
            }
        }
        if info.chunk == u32::MAX {
            // A central layer.
            let n = &mut self.nodes[info.to as usize];
            n.layers_left = n.layers_left.saturating_sub(1);
            if n.layers_left == 0 {
                n.completed = Some(now);
                n.held = Bitfield::full(self.chunk_count);
                n.log = (0..self.chunk_count).map(|c| (c, now)).collect();
                self.complete_count += 1;
            }
            return;
        }
        let a = &mut self.nodes[info.to as usize];
        let Some(d) = a.download.as_mut().filter(|_| a.epoch == info.epoch) else {
            self.wasted += size;
            return;
        };
        let Some(i) = d.requests.iter().position(|r| r.id == info.id) else {
            self.wasted += size;
            return;
        };
        let req = d.requests.swap_remove(i);
        // The stream goes back to the pool, idle; the server closes it if it stays idle.
        pool_release(&mut d.pool, req.peer, false);
        let mut check = false;
        if let Some(s) = d.pool.iter_mut().find(|s| s.peer == req.peer) {
            s.released = now;
            check = !std::mem::replace(&mut s.check_pending, true);
        }
        if check {
            self.q.push(
                now + STREAM_IDLE_TIMEOUT,
                Ev::IdleCheck {
                    node: info.to,
                    epoch: info.epoch,
                    peer: req.peer,
                },
            );
        }
        feed(
            d,
            Event::ChunkDone {
                peer: req.peer,
                chunk: req.chunk,
                bytes: size as u64,
            },
            now,
        );
        if a.held.set(req.chunk) {
            a.log.push((req.chunk, now));
            if a.held.is_full() {
                // A seeder now: its chunk server logs the transfers it starts from here on.
                a.uploads = Some(Box::new(UploadLog::new(self.chunk_count)));
            }
            self.answer_polls(info.to, req.chunk);
        } else {
            self.wasted += size;
            self.duplicate_bytes += size;
        }
        self.mark(info.to);
    }

    /// `node` changed in a way that concerns `chunk`: it stored the chunk, or its report's
    /// claim on the chunk changed. Answers the long polls parked on it: those that arrived
    /// together (one event per latency class), those still travelling when they arrive, with
    /// what the node holds and reports then. A poll whose asker holds `chunk` stays parked: the
    /// answer would change none of its plan's decisions (they are about missing chunks), and
    /// the next answer carries this change too. Only when the next change comes sooner than a
    /// re-poll would have arrived does it reach the asker earlier than with the real protocol
    /// (by at most two one-way latencies).
    fn answer_polls(&mut self, node: u32, chunk: u32) {
        let now = self.q.now();
        let parked = std::mem::take(&mut self.nodes[node as usize].parked);
        let session = self.nodes[node as usize].session;
        let site = self.nodes[node as usize].site;
        let mut local = Vec::new();
        let mut remote = Vec::new();
        let mut keep = Vec::new();
        for p in parked {
            let asker = &self.nodes[p.asker as usize];
            if asker.epoch != p.epoch || !asker.online || asker.completed.is_some() {
                continue;
            }
            if asker.held.get(chunk) {
                keep.push(p);
                continue;
            }
            if p.arrives > now {
                self.q.push(
                    p.arrives,
                    Ev::PollArrives {
                        at: node,
                        session,
                        asker: p.asker,
                        epoch: p.epoch,
                        slot: p.slot,
                    },
                );
                continue;
            }
            if asker.site == site {
                local.push((p.asker, p.epoch, p.slot));
            } else {
                remote.push((p.asker, p.epoch, p.slot));
            }
        }
        let n = &mut self.nodes[node as usize];
        n.parked = keep;
        if local.is_empty() && remote.is_empty() {
            return;
        }
        let held = n.log.len() as u32;
        let uploads = n.uploads.as_mut().map(|u| u.report());
        for (to, same) in [(local, true), (remote, false)] {
            if !to.is_empty() {
                let lat = self.scenario.latency(same);
                self.q.push(
                    now + lat,
                    Ev::Answers {
                        to,
                        from: node,
                        session,
                        held,
                        uploads: uploads.clone(),
                    },
                );
            }
        }
    }

    /// A transfer of `chunk` from `node` starts; returns whether `node` logs it (it holds the
    /// whole blob).
    fn upload_started(&mut self, node: u32, chunk: u32) -> bool {
        let n = &mut self.nodes[node as usize];
        let Some(log) = n.uploads.as_mut() else {
            return false;
        };
        if log.start(chunk) && n.online {
            self.answer_polls(node, chunk);
        }
        true
    }

    /// A transfer of `chunk` that `node` logged ends, `finished` or cut short.
    fn upload_ended(&mut self, node: u32, chunk: u32, finished: bool) {
        let n = &mut self.nodes[node as usize];
        if let Some(log) = n.uploads.as_mut() {
            if log.end(chunk, finished) && n.online {
                self.answer_polls(node, chunk);
            }
        }
    }

    /// Stops `node`'s request `req` (cancelled, or its peer or itself gone); returns the bytes
    /// its transfer had moved, now thrown away. The node aborts the request's task, which drops
    /// its stream: the stream closes at both ends.
    fn drop_request(&mut self, node: u32, req: &Request) -> f64 {
        let now = self.q.now();
        let b = &mut self.nodes[req.peer as usize];
        if req.holds_server_stream() && b.session == req.session {
            b.streams_in = b.streams_in.saturating_sub(1);
        }
        if let Some(d) = self.nodes[node as usize].download.as_mut() {
            pool_release(&mut d.pool, req.peer, true);
        }
        let Some(flow) = req.flow else {
            return 0.0;
        };
        let Some(info) = self.flows.get_mut(flow as usize).and_then(Option::take) else {
            return 0.0;
        };
        let bytes = self.net.stop(now, flow);
        self.account(info.from, info.to, bytes);
        self.wasted += bytes;
        if info.logged {
            self.upload_ended(info.from, info.chunk, false);
        }
        bytes
    }

    /// Closes the idle streams of a download that ended (its pool is dropped).
    fn close_pool(&mut self, pool: &[Streams]) {
        for s in pool {
            let b = &mut self.nodes[s.peer as usize];
            if b.session == s.session {
                b.streams_in = b
                    .streams_in
                    .saturating_sub(s.open.saturating_sub(s.busy) as usize);
            }
        }
    }

    fn think(&mut self, node: u32) {
        let now = self.q.now();
        let n = &mut self.nodes[node as usize];
        if !n.online || n.completed.is_some() {
            return;
        }
        let epoch = n.epoch;
        let Some(d) = n.download.as_mut() else {
            return;
        };
        // Haves alone can only lead to requests to the peers they came from: the plan's last
        // decision already gave every free slot of the other peers whatever they could take,
        // and their holdings have not changed. The exception is a chunk waiting for a copy
        // (every holder said it gave it away): a new holder ends the wait and the chunk may go
        // to any holder; haves of chunks any report claimed are therefore not `haves_only` (see
        // `on_have_answer`). Expiries, rests and waits have their own wake-up, and cancels come
        // from chunk events. So when the download has no free slot, or none of those peers has
        // one, the call would return nothing: skip it, it is the costly part.
        if n.haves_only {
            let full = d.plan.in_flight() >= d.plan.config().max_in_flight;
            if full || !n.news_from.iter().any(|p| d.plan.has_free_slot(p)) {
                self.thinks_skipped += 1;
                return;
            }
        }
        self.thinks += 1;
        let actions = d.plan.next_actions(duration(now));
        if self.debug {
            let d = self.nodes[node as usize]
                .download
                .as_ref()
                .expect("download");
            let mut counts = [0u64; 7];
            for a in &actions {
                if let Action::Request {
                    peer: PUBLISHER,
                    chunk,
                } = *a
                {
                    let claimed = d
                        .candidates
                        .iter()
                        .find(|c| c.peer == PUBLISHER)
                        .and_then(|c| c.report.as_ref())
                        .is_some_and(|r| claim(r, chunk) > 0);
                    let (mut holders, mut free) = (0, 0);
                    for c in &d.candidates {
                        let told = match c.state {
                            CandState::Polling { told } => told as usize,
                            CandState::Asked => 0,
                        };
                        let log = &self.nodes[c.peer as usize].log;
                        if c.peer != PUBLISHER
                            && log[..told.min(log.len())].iter().any(|&(x, _)| x == chunk)
                        {
                            holders += 1;
                            if let Some(s) = d.plan.peer_stats(&c.peer) {
                                free += usize::from(s.usable && s.in_flight < s.in_flight_limit);
                            }
                        }
                    }
                    let dup = d.requests.iter().any(|r| r.chunk == chunk)
                        || actions.iter().any(|b| {
                            matches!(*b, Action::Request { peer, chunk: c } if c == chunk && peer != PUBLISHER)
                        });
                    let k = if dup {
                        6
                    } else {
                        usize::from(claimed) * 3 + usize::from(holders > 0) + usize::from(free > 0)
                    };
                    counts[k] += 1;
                }
            }
            for (a, b) in self.pub_requests.iter_mut().zip(counts) {
                *a += b;
            }
        }
        // The peers' sessions, for the streams the requests use.
        let sessions: Vec<u32> = actions
            .iter()
            .map(|a| match a {
                Action::Request { peer, .. } => self.nodes[*peer as usize].session,
                _ => 0,
            })
            .collect();
        let n = &mut self.nodes[node as usize];
        let Some(d) = n.download.as_mut() else {
            return;
        };
        let mut requests = Vec::new();
        let mut cancels = Vec::new();
        for (action, &session) in actions.into_iter().zip(&sessions) {
            match action {
                Action::Request { peer, chunk } => {
                    self.next_request += 1;
                    let id = self.next_request;
                    let new_stream = pool_take(&mut d.pool, peer, session);
                    d.requests.push(Request {
                        id,
                        peer,
                        chunk,
                        flow: None,
                        sent: now,
                        new_stream,
                        accepted: false,
                        session,
                    });
                    requests.push((peer, id));
                }
                Action::Cancel { peer, chunk } => {
                    if let Some(i) = d
                        .requests
                        .iter()
                        .position(|r| r.peer == peer && r.chunk == chunk)
                    {
                        let req = d.requests.swap_remove(i);
                        self.cancels += 1;
                        if now.saturating_sub(req.sent) >= nanos(REQUEST_TIMEOUT) {
                            self.timeouts += 1;
                        }
                        // A loser: the chunk came from another peer first (endgame).
                        let loser = n.held.get(chunk);
                        let in_flight =
                            u32::try_from(d.plan.config().max_in_flight).unwrap_or(u32::MAX);
                        if loser && n.held.count_ones().saturating_add(in_flight) < self.chunk_count
                        {
                            self.early_losers += 1;
                        }
                        cancels.push((req, loser));
                    }
                }
                Action::Ban { .. } => {}
            }
        }
        let complete = d.plan.is_complete();
        let stalled = d.plan.is_stalled();
        let deadline = d.plan.next_deadline().map(nanos);
        if complete {
            cancels.extend(d.requests.drain(..).map(|r| (r, true)));
        }
        let stall_since = if stalled {
            Some(*d.stalled_since.get_or_insert(now))
        } else {
            d.stalled_since = None;
            None
        };
        for (req, loser) in &cancels {
            let bytes = self.drop_request(node, req);
            if *loser {
                self.loser_bytes += bytes;
            }
        }
        for (peer, id) in requests {
            let lat = self.latency(node, peer);
            self.q.push_after(
                lat,
                Ev::Request {
                    from: node,
                    epoch,
                    to: peer,
                    id,
                },
            );
        }
        if complete {
            let n = &mut self.nodes[node as usize];
            n.completed = Some(now);
            if let Some(d) = n.download.take() {
                self.close_pool(&d.pool);
            }
            self.complete_count += 1;
            self.seeders.push(node);
            return;
        }
        let limit = nanos(STALL_LIMIT);
        if let Some(since) = stall_since {
            if now.saturating_sub(since) > limit {
                self.restart_download(node);
                return;
            }
        }
        let wake = [deadline, stall_since.map(|s| s + limit + 1)]
            .into_iter()
            .flatten()
            .min();
        if let Some(at) = wake {
            let n = &mut self.nodes[node as usize];
            if at < n.wake_at || n.wake_at <= now {
                n.wake_at = at;
                self.q.push(at, Ev::Wake { node, epoch });
            }
        }
    }

    /// The download failed (stalled): a new one, from the chunks held, with a new lookup.
    fn restart_download(&mut self, node: u32) {
        self.stalls += 1;
        if self.debug {
            if let Some(d) = self.nodes[node as usize].download.as_ref() {
                let peers: Vec<String> = d
                    .candidates
                    .iter()
                    .filter_map(|c| {
                        d.plan.peer_stats(&c.peer).map(|s| {
                            format!(
                                "{}:{}{}",
                                c.peer,
                                s.strikes,
                                if s.usable { "" } else { "x" }
                            )
                        })
                    })
                    .collect();
                eprintln!(
                    "stall: node {node} at {:.1} s, {} missing, peers (id:strikes, x = unusable) {}",
                    secs_from_nanos(self.q.now()),
                    d.plan.missing(),
                    peers.join(" ")
                );
            }
        }
        self.abandon_download(node);
        self.begin_download(node);
    }

    /// Drops `node`'s download and everything it had in flight.
    fn abandon_download(&mut self, node: u32) {
        let n = &mut self.nodes[node as usize];
        n.epoch += 1;
        n.wake_at = Nanos::MAX;
        if let Some(d) = n.download.take() {
            self.close_pool(&d.pool);
            for req in &d.requests {
                self.drop_request(node, req);
            }
        }
    }

    /// The server closes streams idle for [`STREAM_IDLE_TIMEOUT`]: when no stream of `node`'s
    /// pool to `peer` went idle for that long, its idle streams are closed.
    fn on_idle_check(&mut self, node: u32, epoch: u32, peer: u32) {
        let now = self.q.now();
        let n = &mut self.nodes[node as usize];
        if n.epoch != epoch {
            return;
        }
        let Some(s) = n
            .download
            .as_mut()
            .and_then(|d| d.pool.iter_mut().find(|s| s.peer == peer))
        else {
            return;
        };
        let due = s.released + STREAM_IDLE_TIMEOUT;
        if due > now {
            self.q.push(due, Ev::IdleCheck { node, epoch, peer });
            return;
        }
        s.check_pending = false;
        let idle = s.open.saturating_sub(s.busy);
        s.open -= idle;
        let session = s.session;
        let b = &mut self.nodes[peer as usize];
        if b.session == session {
            b.streams_in = b.streams_in.saturating_sub(idle as usize);
        }
    }

    fn on_leave(&mut self, node: u32) {
        let now = self.q.now();
        if !self.nodes[node as usize].online {
            return;
        }
        self.departures += 1;
        self.abandon_download(node);
        let n = &mut self.nodes[node as usize];
        n.online = false;
        n.session += 1;
        n.parked.clear();
        // Every stream to it drops with its connections (the watchers below forget theirs).
        n.streams_in = 0;
        let watchers = std::mem::take(&mut n.watchers);
        for w in watchers {
            let wn = &mut self.nodes[w as usize];
            if !wn.online {
                continue;
            }
            let Some(d) = wn.download.as_mut() else {
                continue;
            };
            let Some(i) = d.candidates.iter().position(|c| c.peer == node) else {
                continue;
            };
            d.candidates.swap_remove(i);
            feed(d, Event::PeerGone { peer: node }, now);
            let mut gone = Vec::new();
            d.requests.retain(|r| {
                let keep = r.peer != node;
                if !keep {
                    gone.push(r.clone());
                }
                keep
            });
            for req in &gone {
                self.drop_request(w, req);
            }
            if let Some(d) = self.nodes[w as usize].download.as_mut() {
                d.pool.retain(|s| s.peer != node);
            }
            self.mark(w);
        }
        if let Some(churn) = &self.scenario.churn {
            let away = self.rng.between(churn.away_secs[0], churn.away_secs[1]);
            self.q.push_after(nanos_from_secs(away), Ev::Return(node));
        }
    }

    fn on_return(&mut self, node: u32) {
        let n = &mut self.nodes[node as usize];
        if n.online {
            return;
        }
        n.online = true;
        if n.started.is_some() {
            self.begin_download(node);
        }
    }

    fn result(&self, pullers: u32, wall_secs: f64) -> RunResult {
        let completion_secs = self.nodes[1..]
            .iter()
            .map(|n| match (n.started, n.completed) {
                (Some(s), Some(c)) => Some(secs_from_nanos(c.saturating_sub(s))),
                _ => None,
            })
            .collect();
        let holds_image = self
            .nodes
            .iter()
            .map(|n| {
                let mut seen = Bitfield::new(self.chunk_count);
                n.held.is_full()
                    && n.log.len() == self.chunk_count as usize
                    && n.log.iter().all(|&(c, _)| seen.set(c))
            })
            .collect();
        let wan_bytes = (0..self.scenario.sites as usize)
            .filter_map(|s| self.wan.get(s))
            .map(|&(up, down)| (self.net.link_bytes(down), self.net.link_bytes(up)))
            .collect();
        let nic_bytes = self.nodes.iter().fold((0.0, 0.0), |(u, d), n| {
            (
                u + self.net.link_bytes(n.up),
                d + self.net.link_bytes(n.down),
            )
        });
        let wan_total_bytes = self.wan.iter().fold((0.0, 0.0), |(u, d), &(up, down)| {
            (u + self.net.link_bytes(up), d + self.net.link_bytes(down))
        });
        RunResult {
            nodes: pullers,
            sites: self.scenario.sites,
            image_bytes: self.scenario.image_bytes,
            seed: self.seed,
            completion_secs,
            node_bytes: self.nodes.iter().map(|n| (n.sent, n.received)).collect(),
            holds_image,
            wan_bytes,
            nic_bytes,
            wan_total_bytes,
            wasted_bytes: self.wasted,
            refused: self.refused,
            declined: self.declined,
            stalls: self.stalls,
            departures: self.departures,
            cancels: self.cancels,
            timeouts: self.timeouts,
            duplicate_bytes: self.duplicate_bytes,
            loser_bytes: self.loser_bytes,
            thinks: (self.thinks, self.thinks_skipped),
            reports: self.reports,
            end_secs: secs_from_nanos(self.q.now()),
            events: self.q.popped() + self.flow_ends,
            wall_secs,
            fills: self.net.fills(),
        }
    }
}

/// Takes a stream to `peer` from the pool for a request; returns whether a new one must be
/// opened (none was idle).
fn pool_take(pool: &mut Vec<Streams>, peer: u32, session: u32) -> bool {
    if let Some(i) = pool
        .iter()
        .position(|s| s.peer == peer && s.session != session)
    {
        // Streams to an earlier session of the peer died with it.
        pool.swap_remove(i);
    }
    match pool.iter_mut().find(|s| s.peer == peer) {
        Some(s) => {
            s.busy += 1;
            if s.open >= s.busy {
                false
            } else {
                s.open += 1;
                true
            }
        }
        None => {
            pool.push(Streams {
                peer,
                session,
                open: 1,
                busy: 1,
                released: 0,
                check_pending: false,
            });
            true
        }
    }
}

/// A request on a stream to `peer` ended: the stream goes back idle, or is gone (`closed`).
fn pool_release(pool: &mut [Streams], peer: u32, closed: bool) {
    if let Some(s) = pool.iter_mut().find(|s| s.peer == peer) {
        s.busy = s.busy.saturating_sub(1);
        if closed {
            s.open = s.open.saturating_sub(1);
        }
    }
}

/// Feeds `event` to the download's plan.
fn feed(d: &mut Download, event: Event<u32>, now: Nanos) {
    d.plan.handle(event, duration(now));
}

/// Two distinct elements of a slice, mutably and immutably.
fn two<T>(items: &mut [T], a: usize, b: usize) -> (&mut T, &T) {
    assert_ne!(a, b, "a node is never its own peer");
    if a < b {
        let (left, right) = items.split_at_mut(b);
        (&mut left[a], &right[0])
    } else {
        let (left, right) = items.split_at_mut(a);
        (&mut right[0], &left[b])
    }
}

/// The node constants the model uses, by name, for reports.
pub fn node_constants() -> Vec<(&'static str, String)> {
    vec![
        ("MAX_CANDIDATES", MAX_CANDIDATES.to_string()),
        ("CANDIDATE_REFRESH", format!("{:?}", CANDIDATE_REFRESH)),
        ("MAX_IN_FLIGHT", MAX_IN_FLIGHT.to_string()),
        ("MAX_IN_FLIGHT_BYTES", MAX_IN_FLIGHT_BYTES.to_string()),
        ("REQUEST_TIMEOUT", format!("{:?}", REQUEST_TIMEOUT)),
        ("STALL_LIMIT", format!("{:?}", STALL_LIMIT)),
        (
            "MAX_INBOUND_CHUNK_STREAMS",
            MAX_INBOUND_CHUNK_STREAMS.to_string(),
        ),
        (
            "chunk size",
            format!(
                "shoal_protocol::chunk_size_for: {} chunks per blob, within {}..={} bytes",
                shoal_protocol::TARGET_CHUNKS,
                shoal_protocol::MIN_AUTO_CHUNK_SIZE_BYTES,
                shoal_protocol::MAX_AUTO_CHUNK_SIZE_BYTES
            ),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_is_reused_when_idle_and_opened_when_all_are_busy() {
        let mut pool = Vec::new();
        assert!(
            pool_take(&mut pool, 3, 0),
            "the first request opens a stream"
        );
        assert!(
            pool_take(&mut pool, 3, 0),
            "the second, while the first is busy, too"
        );
        pool_release(&mut pool, 3, false);
        assert!(
            !pool_take(&mut pool, 3, 0),
            "a finished request left its stream idle"
        );
        pool_release(&mut pool, 3, true);
        pool_release(&mut pool, 3, true);
        assert!(
            pool_take(&mut pool, 3, 0),
            "cancelled requests closed their streams"
        );
        assert!(pool_take(&mut pool, 4, 0), "streams are per peer");
        assert_eq!((pool[0].open, pool[0].busy), (1, 1));
    }

    #[test]
    fn streams_to_an_earlier_session_of_a_peer_are_gone() {
        let mut pool = Vec::new();
        assert!(pool_take(&mut pool, 3, 0));
        pool_release(&mut pool, 3, false);
        // The peer left and came back: its idle stream did not survive.
        assert!(pool_take(&mut pool, 3, 1));
        assert_eq!(pool.len(), 1);
        assert_eq!((pool[0].session, pool[0].open, pool[0].busy), (1, 1, 1));
    }

    #[test]
    fn quantiles_use_nearest_rank_over_completed_pullers() {
        let r = RunResult {
            nodes: 5,
            sites: 1,
            image_bytes: 1,
            seed: 0,
            completion_secs: vec![Some(3.0), Some(1.0), None, Some(2.0), Some(4.0)],
            node_bytes: Vec::new(),
            holds_image: Vec::new(),
            wan_bytes: Vec::new(),
            nic_bytes: (0.0, 0.0),
            wan_total_bytes: (0.0, 0.0),
            wasted_bytes: 0.0,
            refused: 0,
            declined: 0,
            stalls: 0,
            departures: 0,
            cancels: 0,
            timeouts: 0,
            duplicate_bytes: 0.0,
            loser_bytes: 0.0,
            thinks: (0, 0),
            reports: 0,
            end_secs: 0.0,
            events: 0,
            wall_secs: 0.0,
            fills: 0,
        };
        assert_eq!(r.completed(), 4);
        assert_eq!(r.quantile(0.5), Some(2.0));
        assert_eq!(r.quantile(0.99), Some(4.0));
        assert_eq!(r.quantile(1.0), Some(4.0));
        assert_eq!(r.publisher_egress(), 0.0);
    }
}
