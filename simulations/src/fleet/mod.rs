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
//! - **Serve reports.** A node that holds the whole blob (the publisher from the start, a
//!   puller once complete) logs the transfers it starts from then on, as the node's chunk server
//!   does for stored blobs: which chunks it is sending now (a cancelled or cut transfer stops
//!   counting) and which it has sent in full at least once. Its answers carry that report, and a
//!   poll parked at it is also answered when the report changes; the asker feeds
//!   [`Event::PeerServes`] and polls again. The node answers at every transfer start and end;
//!   the model answers only when a chunk's *claim* changes (nothing, being sent, sent: the
//!   node's `Claim`), and only askers missing that chunk, because the plan acts on nothing else
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
//!   (the last call already gave every other free slot what it could take). Serve reports,
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
//!
//! The state (nodes, their downloads, candidates, requests and streams, the event queue) is
//! defined here, with the main loop; each phase adds its steps to the simulation in a file of
//! its own: `discovery` (start, lookups, the choice of candidates), `haves` (answers, long
//! polls and serve reports), `transfers` (the plan's decisions, requests, flows, central
//! mode), `churn` (stalled downloads and nodes that leave and return) and `results` (the
//! counters, the result and the debug output).
//!
//! [`MAX_CANDIDATES`]: shoal_node::fetch::swarm::MAX_CANDIDATES
//! [`CANDIDATE_REFRESH`]: shoal_node::fetch::swarm::CANDIDATE_REFRESH
//! [`STALL_LIMIT`]: shoal_node::fetch::swarm::STALL_LIMIT
//! [`MAX_INBOUND_CHUNK_STREAMS`]: shoal_node::net::chunk::MAX_INBOUND_CHUNK_STREAMS
//! [`Action::Request`]: shoal_node::fetch::plan::Action::Request
//! [`Action::Cancel`]: shoal_node::fetch::plan::Action::Cancel

mod churn;
mod discovery;
mod haves;
mod results;
#[cfg(test)]
mod tests;
mod transfers;

use std::rc::Rc;
use std::time::Instant;

use shoal_node::fetch::plan::{Bitfield, Event, Plan};

use crate::engine::{Nanos, Queue, duration, nanos_from_secs};
use crate::links::{FlowId, LinkId, Network, Sharing};
use crate::rng::Rng;
use crate::scenario::{Mode, PublisherSite, Scenario, SharingMode, bytes_per_sec};
use haves::{Report, ServeLog};
use results::{Diagnostics, EventCounts, PlanCalls, Progress, RequestCounts, Waste};
pub use results::{RunResult, Timeline, node_constants};

/// Node 0 is the publisher; pullers are 1..=N.
const PUBLISHER: u32 = 0;

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
        /// Its serve report, if it holds the whole blob.
        serves: Option<Rc<Report>>,
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
    /// The last serve report it sent (it holds the whole blob). The plan's view agrees with it
    /// on every chunk this node misses.
    report: Option<Rc<Report>>,
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
    /// When its first lookup returned, and when it first heard what a candidate holds.
    looked_up: Option<Nanos>,
    first_have: Option<Nanos>,
    announced: bool,
    held: Bitfield,
    /// Chunks in the order they arrived, with when.
    log: Vec<(u32, Nanos)>,
    completed: Option<Nanos>,
    /// Inline, not boxed: every have answer reads it, and a box is one more dependent load.
    download: Option<Download>,
    /// Chunk streams other nodes hold open to it (at most
    /// [`MAX_INBOUND_CHUNK_STREAMS`](shoal_node::net::chunk::MAX_INBOUND_CHUNK_STREAMS)).
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
    /// Its serves, once it holds the whole blob (swarm mode).
    serves: Option<Box<ServeLog>>,
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
    seed: u64,
    debug: bool,
    progress: Progress,
    requests: RequestCounts,
    waste: Waste,
    plans: PlanCalls,
    events: EventCounts,
    diag: Diagnostics,
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
                looked_up: None,
                first_have: None,
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
                serves: None,
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
            publisher.serves = Some(Box::new(ServeLog::new(chunk_count)));
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
            seed,
            debug: std::env::var_os("SHOAL_SIM_DEBUG").is_some(),
            progress: Progress::default(),
            requests: RequestCounts::default(),
            waste: Waste::default(),
            plans: PlanCalls::default(),
            events: EventCounts::default(),
            diag: Diagnostics::new(chunk_count),
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
            self.events.max_queue = self.events.max_queue.max(self.q.len());
            if self.debug && at >= self.diag.next_trace {
                self.trace(at);
            }
            if next_flow == Some(at) {
                self.q.advance_to(at);
                // A flow found not done yet is moved to its new time; then nothing happens now.
                if let Some((flow, _)) = self.net.pop_done(at) {
                    self.events.flow_ends += 1;
                    self.on_flow_end(flow);
                }
            } else if let Some((_, ev)) = self.q.pop() {
                if self.debug {
                    self.events.by_kind[ev.kind()] += 1;
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
            if self.progress.complete == pullers
                && self.dirty.is_empty()
                && self.net.live_flows() == 0
            {
                break;
            }
        }
        if self.debug {
            self.print_diagnostics();
        }
        // Stop whatever still runs (a time limit), so every byte moved is accounted.
        let now = self.q.now();
        for flow in 0..self.flows.len() {
            if let Some(info) = self.flows[flow].take() {
                let bytes = self.net.stop(now, flow as FlowId);
                self.account(info.from, info.to, bytes);
                self.waste.all += bytes;
            }
        }
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
                serves,
            } => {
                for (to, epoch, slot) in to {
                    self.on_have_answer(to, epoch, from, session, held, slot, serves.as_ref());
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
