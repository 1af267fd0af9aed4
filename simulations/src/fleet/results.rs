//! What a run produced: the [`RunResult`] it returns, the counters it keeps on the way, and
//! what the debug output (`SHOAL_SIM_DEBUG`) prints. Owns the counters; the phases only add
//! to them.

use shoal_node::fetch::plan::Bitfield;
use shoal_node::fetch::swarm::{
    CANDIDATE_REFRESH, MAX_CANDIDATES, MAX_IN_FLIGHT, MAX_IN_FLIGHT_BYTES, REQUEST_TIMEOUT,
    STALL_LIMIT,
};
use shoal_node::net::chunk::MAX_INBOUND_CHUNK_STREAMS;

use super::{PUBLISHER, Sim};
use crate::engine::{Nanos, secs_from_nanos};

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
    /// Serve reports fed to plans ([`Event::PeerServes`](shoal_node::fetch::plan::Event::PeerServes)).
    pub reports: u64,
    /// Simulated time at which the run ended.
    pub end_secs: f64,
    /// Events processed.
    pub events: u64,
    /// Wall-clock seconds the simulation took.
    pub wall_secs: f64,
    /// Fair-share link fills done.
    pub fills: u64,
    /// Per puller: where its time went, if it completed.
    pub timelines: Vec<Option<Timeline>>,
    /// When every chunk had left the publisher in full at least once (swarm mode).
    pub all_out_secs: Option<f64>,
    /// When the publisher's last transfer ended.
    pub publisher_last_secs: f64,
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

/// How the rollout went.
#[derive(Debug, Default)]
pub(super) struct Progress {
    /// Pullers that completed.
    pub(super) complete: usize,
    /// Downloads that stalled for the stall limit and were retried.
    pub(super) stalls: u64,
    /// Nodes that left (churn).
    pub(super) departures: u64,
    /// Chunks the publisher sent in full at least once, when the last of them first arrived,
    /// and when its last transfer ended.
    pub(super) first_copies: u32,
    pub(super) all_out: Option<Nanos>,
    pub(super) publisher_last: Nanos,
}

/// Where one puller's time went: seconds after it first started, at which each step happened.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timeline {
    /// Its first lookup returned.
    pub lookup: f64,
    /// It first heard what a candidate holds.
    pub first_have: f64,
    /// Its first chunk arrived.
    pub first_chunk: f64,
    /// It held half the chunks.
    pub half: f64,
    /// It held nine tenths of them.
    pub most: f64,
    /// It held them all.
    pub done: f64,
}

impl Timeline {
    /// The steps' names, in order, for reports.
    pub const STEPS: [&'static str; 6] =
        ["lookup", "first have", "first chunk", "half", "90%", "done"];

    /// The steps' times, in the order of [`Timeline::STEPS`].
    pub fn steps(&self) -> [f64; 6] {
        [
            self.lookup,
            self.first_have,
            self.first_chunk,
            self.half,
            self.most,
            self.done,
        ]
    }
}

/// What became of chunk requests.
#[derive(Debug, Default)]
pub(super) struct RequestCounts {
    /// Answered "busy": the server had all its streams busy, or (`declined`) it was sending
    /// that chunk already.
    pub(super) refused: u64,
    /// Of `refused`, those a seeder declined because it was sending that chunk already.
    pub(super) declined: u64,
    /// Cancelled by the plans (endgame losers, timeouts, struck-out peers).
    pub(super) cancels: u64,
    /// Of those, requests that had timed out.
    pub(super) timeouts: u64,
    /// Endgame losers cancelled while more than `max_in_flight` chunks were still missing.
    pub(super) early_losers: u64,
}

/// Bytes received and thrown away.
#[derive(Debug, Default)]
pub(super) struct Waste {
    /// All of them: cancelled, cut or duplicate transfers.
    pub(super) all: f64,
    /// Chunks that arrived complete but were already held.
    pub(super) duplicates: f64,
    /// Transfers cancelled because the chunk came from another peer first (endgame losers).
    pub(super) losers: f64,
}

/// What the plans were given to do.
#[derive(Debug, Default)]
pub(super) struct PlanCalls {
    /// Calls of `Plan::next_actions`.
    pub(super) made: u64,
    /// Calls skipped because they could do nothing.
    pub(super) skipped: u64,
    /// Serve reports fed to plans.
    pub(super) reports: u64,
}

/// The simulation's events, besides those the queue counts.
#[derive(Debug, Default)]
pub(super) struct EventCounts {
    /// Flows that ended (their last byte is an event the queue never held).
    pub(super) flow_ends: u64,
    /// The most events the queue held at once.
    pub(super) max_queue: usize,
    /// Events by kind ([`Ev::kind`](super::Ev::kind)), counted when debugging.
    pub(super) by_kind: [u64; 10],
}

/// What the debug output (`SHOAL_SIM_DEBUG`) reports besides the counts above.
#[derive(Debug)]
pub(super) struct Diagnostics {
    /// When the next trace line is due.
    pub(super) next_trace: Nanos,
    /// Complete serves of each chunk by the publisher.
    pub(super) publisher_serves: Vec<u32>,
    /// Requests to the publisher by kind (see `think`).
    pub(super) publisher_requests: [u64; 7],
    /// The current run of busy answers (node, peer, instant) and its length, and how many runs
    /// had each length (1 to 7, 8 or more).
    pub(super) busy_burst: ((u32, u32, Nanos), u32),
    pub(super) busy_bursts: [u64; 8],
}

impl Diagnostics {
    pub(super) fn new(chunk_count: u32) -> Diagnostics {
        Diagnostics {
            next_trace: 0,
            publisher_serves: vec![0; chunk_count as usize],
            publisher_requests: [0; 7],
            busy_burst: ((0, 0, 0), 0),
            busy_bursts: [0; 8],
        }
    }
}

impl Sim<'_> {
    /// Debug: the state of the rollout, every tenth of a simulated second.
    pub(super) fn trace(&mut self, at: Nanos) {
        self.diag.next_trace = at - at % (crate::engine::SECOND / 10) + crate::engine::SECOND / 10;
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
            .serves
            .as_ref()
            .map_or(0, |u| u.sends.sending().count_ones());
        let sent = p.serves.as_ref().map_or(0, |u| u.sends.sent().count_ones());
        let (mut up, mut down, mut idle_up, mut idle_down) = (0.0, 0.0, 0, 0);
        let cap = crate::scenario::bytes_per_sec(self.scenario.nic_mbit);
        for n in &self.nodes[1..] {
            let u = self.net.link_load(n.up) / cap;
            let d = self.net.link_load(n.down) / cap;
            up += u;
            down += d;
            idle_up += usize::from(u < 0.5);
            idle_down += usize::from(d < 0.5);
        }
        let pullers = (self.nodes.len() - 1) as f64;
        eprintln!(
            "t {:.2}: puller uplinks {:.2} full ({idle_up} under half), downlinks {:.2} ({idle_down} under half), publisher {:.2}",
            secs_from_nanos(at),
            up / pullers,
            down / pullers,
            self.net.link_load(self.nodes[0].up) / cap
        );
        eprintln!(
            "t {:.2}: chunks held {held}, in flight {in_flight}, done {}, publisher streams {} sending {sending} sent {sent} parked {}, idle at publisher {resting}; pooled streams to it {open} ({busy} busy) in {holders} pools",
            secs_from_nanos(at),
            self.progress.complete,
            p.streams_in,
            p.parked.len()
        );
    }

    pub(super) fn result(&self, pullers: u32, wall_secs: f64) -> RunResult {
        let completion_secs = self.nodes[1..]
            .iter()
            .map(|n| match (n.started, n.completed) {
                (Some(s), Some(c)) => Some(secs_from_nanos(c.saturating_sub(s))),
                _ => None,
            })
            .collect();
        let timelines = self.nodes[1..].iter().map(|n| self.timeline(n)).collect();
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
            wasted_bytes: self.waste.all,
            refused: self.requests.refused,
            declined: self.requests.declined,
            stalls: self.progress.stalls,
            departures: self.progress.departures,
            cancels: self.requests.cancels,
            timeouts: self.requests.timeouts,
            duplicate_bytes: self.waste.duplicates,
            loser_bytes: self.waste.losers,
            thinks: (self.plans.made, self.plans.skipped),
            reports: self.plans.reports,
            end_secs: secs_from_nanos(self.q.now()),
            events: self.q.popped() + self.events.flow_ends,
            wall_secs,
            fills: self.net.fills(),
            timelines,
            all_out_secs: self.progress.all_out.map(secs_from_nanos),
            publisher_last_secs: secs_from_nanos(self.progress.publisher_last),
        }
    }

    /// Where `n`'s time went, if it completed: its chunk log holds when each chunk arrived.
    fn timeline(&self, n: &super::Node) -> Option<Timeline> {
        let start = n.started?;
        let done = n.completed?;
        let since = |t: Nanos| secs_from_nanos(t.saturating_sub(start));
        let count = n.log.len();
        // The time the log reached `k` chunks (central mode logs every chunk at the end).
        let at = |k: usize| n.log.get(k.clamp(1, count.max(1)) - 1).map(|&(_, t)| t);
        Some(Timeline {
            lookup: since(n.looked_up.unwrap_or(start)),
            first_have: since(n.first_have.unwrap_or(start)),
            first_chunk: since(at(1).unwrap_or(done)),
            half: since(at(count.div_ceil(2)).unwrap_or(done)),
            most: since(at((count * 9).div_ceil(10)).unwrap_or(done)),
            done: since(done),
        })
    }

    /// Debug: what the run did, besides its result.
    pub(super) fn print_diagnostics(&self) {
        let ups = &self.diag.publisher_serves;
        let whole: u32 = ups.iter().sum();
        eprintln!(
            "publisher: complete chunk serves {} ({:.2} per chunk, most {}, least {})",
            whole,
            f64::from(whole) / ups.len().max(1) as f64,
            ups.iter().max().unwrap_or(&0),
            ups.iter().min().unwrap_or(&0)
        );
        eprintln!(
            "requests to the publisher (unclaimed: no other holder, holders all full, a holder free; claimed: same; endgame duplicates): {:?}",
            self.diag.publisher_requests
        );
        eprintln!(
            "busy answers from one peer at one instant, runs of 1..7 and 8+: {:?}",
            self.diag.busy_bursts
        );
        eprintln!(
            "endgame losers cancelled with more than max_in_flight chunks still missing: {}",
            self.requests.early_losers
        );
        eprintln!(
            "events by kind (start lookup refresh ask answer request refused wake leave return): {:?}; {} flow ends; max queue {}",
            self.events.by_kind, self.events.flow_ends, self.events.max_queue
        );
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
