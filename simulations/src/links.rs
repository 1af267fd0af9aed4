//! Links, flows, and how flows share link capacity.
//!
//! A link is anything with a capacity in bytes per second that transfers cross: a node's
//! NIC in one direction, a site's WAN link in one direction, the shared CPU of a benchmark host.
//! A flow is one transfer (one chunk, one layer) of a known size over a fixed list of links. At
//! every instant each flow has a rate; the rates of the flows on a link never add up to more than
//! its capacity; a flow's bytes advance at its rate; the [`Network`] says when a flow will end so
//! the event queue can hold a completion event.
//!
//! # The sharing rule and its approximation
//!
//! The target is max-min fairness, the allocation TCP flows converge to on a shared bottleneck:
//! no flow can get more without taking from a flow that has less. Computing it exactly means
//! progressive filling over every flow that is connected to a changed one through shared links,
//! and in a swarm that is the whole fleet: 10,000 nodes with 16 chunks in flight each is 160,000
//! flows, and 2.6 million chunk transfers each start and end one. [`Sharing::Exact`] does exactly
//! that (used by the tests and for small runs); [`Sharing::Local`], the default, does this:
//!
//! - Every link keeps the *level* of its last fill: the rate its fair share gives a flow that is
//!   limited by nothing else.
//! - When a flow starts or ends, only its own links are *filled* again. Filling a link is exact
//!   water-filling of that one link: each flow on it gets `min(cap, level)`, where the level is
//!   chosen to use the whole capacity, and a flow's cap is what its other links can give it: the
//!   larger of their spare capacity (plus what the flow already has) and their level (what they
//!   would give it after reshuffling).
//! - A fill that raises a flow may overfill one of the flow's other links; that link is then
//!   filled too (mandatory, so no link is ever left above capacity). A fill that lowers flows
//!   frees capacity on their other links; a link that gained more than [`Tolerances::propagate`]
//!   of its capacity this way is filled too (optional: it only improves utilisation).
//! - Raises smaller than [`Tolerances::raise`] are skipped (the flow keeps its slightly lower
//!   rate), which stops endless ripples of tiny changes. After [`Tolerances::fills_per_change`]
//!   fills for one change, the remaining fills may only lower rates, which always terminates.
//!
//! So the rates are always feasible (never above any capacity), they are exact for one shared
//! bottleneck and for flows whose bottleneck is the link that changed, and they lag the exact
//! allocation where a change would ripple across many links (utilisation then stays a little
//! below the optimum, never above). The tests compare both rules on random small networks; the
//! simulation README gives the measured difference on whole rollouts.
//!
//! A flow's completion time is computed from its current rate and kept in an indexed heap of
//! flows (one entry per flow, moved in place). When a rate drops the entry is simply left early:
//! [`Network::pop_done`] finds the flow not done yet and moves it to its new time. When a rate
//! rises, the entry moves earlier at the next [`Network::settle`]. So a flow costs a few heap moves,
//! never a pile of superseded events.

use std::collections::VecDeque;

use crate::engine::{Nanos, secs_from_nanos};

/// Index of a link in its [`Network`].
pub type LinkId = u32;
/// Index of a flow in its [`Network`] (reused after the flow ends).
pub type FlowId = u32;

/// Most links one flow crosses: sender NIC, sender site WAN, receiver site WAN, receiver NIC,
/// the shared host.
pub const MAX_LINKS_PER_FLOW: usize = 5;

/// How rates are recomputed when a flow starts or ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sharing {
    /// Local water-filling around the change (see the module documentation). Fast.
    #[default]
    Local,
    /// Exact max-min fairness over all flows after every change. Slow on large fleets.
    Exact,
}

/// The knobs of [`Sharing::Local`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerances {
    /// A raise smaller than this fraction of the flow's rate is skipped.
    pub raise: f64,
    /// A link whose flows lost more than this fraction of its capacity elsewhere is refilled.
    pub propagate: f64,
    /// Fills allowed per changed link before fills may only lower rates.
    pub fills_per_change: usize,
}

impl Default for Tolerances {
    fn default() -> Self {
        Tolerances {
            raise: 0.01,
            propagate: 0.02,
            fills_per_change: 16,
        }
    }
}

/// What a fill reads of every other link of each flow on the link it fills: kept apart from
/// the rest of the link, two to a cache line, because a fill visits one per flow.
#[derive(Debug, Clone, Copy)]
#[repr(align(32))]
struct Room {
    /// Bytes per second.
    capacity: f64,
    /// Sum of the rates of its flows.
    used: f64,
    /// The level of its last fill (see the module documentation).
    level: f64,
    /// Capacity its flows gave up since its last fill.
    freed: f64,
}

/// The rest of a link: its flows and the bytes it carried.
#[derive(Debug, Clone, Default)]
struct Link {
    flows: Vec<FlowId>,
    queued: bool,
    /// Bytes of ended flows that crossed it.
    bytes: f64,
}

/// A flow as a fill reads and changes it: one cache line. Where it sits in its links' lists
/// and in the due heap is kept apart (`Network::pos`, `Network::slots`).
#[derive(Debug, Clone)]
#[repr(align(64))]
struct Flow {
    links: [LinkId; MAX_LINKS_PER_FLOW],
    n_links: u8,
    live: bool,
    raised: bool,
    rate: f64,
    /// Bytes transferred up to `updated`.
    done: f64,
    size: f64,
    updated: Nanos,
}

impl Flow {
    fn links(&self) -> &[LinkId] {
        &self.links[..usize::from(self.n_links)]
    }

    fn bytes_at(&self, now: Nanos) -> f64 {
        let dt = secs_from_nanos(now.saturating_sub(self.updated));
        (self.done + self.rate * dt).min(self.size)
    }

    fn advance(&mut self, now: Nanos) {
        self.done = self.bytes_at(now);
        self.updated = now;
    }

    /// When it ends at its current rate.
    fn end_time(&self, now: Nanos) -> Nanos {
        let left = self.size - self.done;
        if left <= self.tolerance() {
            return now;
        }
        if self.rate <= 0.0 {
            return Nanos::MAX;
        }
        let ns = (left / self.rate * 1e9).ceil();
        now.saturating_add(if ns >= u64::MAX as f64 {
            Nanos::MAX
        } else {
            (ns as Nanos).max(1)
        })
    }

    fn tolerance(&self) -> f64 {
        1e-3 + self.size * 1e-9
    }
}

/// Links and the flows crossing them.
#[derive(Debug, Clone, Default)]
pub struct Network {
    rooms: Vec<Room>,
    links: Vec<Link>,
    flows: Vec<Flow>,
    /// Each flow's index in each of its links' `flows`.
    pos: Vec<[u32; MAX_LINKS_PER_FLOW]>,
    /// Each flow's index in `heap` (`u32::MAX` if not in it).
    slots: Vec<u32>,
    free: Vec<FlowId>,
    live_flows: usize,
    sharing: Sharing,
    tolerances: Tolerances,
    work: VecDeque<LinkId>,
    changed_links: usize,
    raised: Vec<FlowId>,
    caps: Vec<f64>,
    scratch: Vec<f64>,
    fills: u64,
    /// Live flows with a finite end time and when each is expected to end, a binary min-heap
    /// by `(due, flow)`. The key is in the entry, so a sift compares without visiting flows.
    heap: Vec<(Nanos, FlowId)>,
}

impl Network {
    /// An empty network that shares capacity by `sharing`.
    pub fn new(sharing: Sharing) -> Network {
        Network {
            sharing,
            ..Network::default()
        }
    }

    /// Replaces the tolerances of [`Sharing::Local`].
    pub fn with_tolerances(mut self, tolerances: Tolerances) -> Network {
        self.tolerances = tolerances;
        self
    }

    /// Adds a link of `capacity` bytes per second.
    pub fn add_link(&mut self, capacity: f64) -> LinkId {
        let capacity = capacity.max(1.0);
        self.rooms.push(Room {
            capacity,
            used: 0.0,
            level: capacity,
            freed: 0.0,
        });
        self.links.push(Link::default());
        LinkId::try_from(self.links.len() - 1).unwrap_or(LinkId::MAX)
    }

    /// Bytes that crossed link `id` in flows that ended (completed or stopped).
    pub fn link_bytes(&self, id: LinkId) -> f64 {
        self.links[id as usize].bytes
    }

    /// The current rate of the flows on link `id`, added up.
    pub fn link_load(&self, id: LinkId) -> f64 {
        self.sum_rates(id as usize)
    }

    fn sum_rates(&self, l: usize) -> f64 {
        self.links[l]
            .flows
            .iter()
            .map(|&f| self.flows[f as usize].rate)
            .sum()
    }

    /// Number of links.
    pub fn link_count(&self) -> usize {
        self.links.len()
    }

    /// Flows currently running.
    pub fn live_flows(&self) -> usize {
        self.live_flows
    }

    /// Link fills done so far (a measure of the work sharing took).
    pub fn fills(&self) -> u64 {
        self.fills
    }

    /// The current rate of `flow` in bytes per second.
    pub fn rate(&self, flow: FlowId) -> f64 {
        self.flows[flow as usize].rate
    }

    /// Starts a flow of `size` bytes over `links` at `now`. It gets its rate at the next
    /// [`Network::settle`], which must come before the clock moves on.
    pub fn start(&mut self, now: Nanos, links: &[LinkId], size: f64) -> FlowId {
        let mut ids = [0; MAX_LINKS_PER_FLOW];
        let n = links.len().min(MAX_LINKS_PER_FLOW);
        ids[..n].copy_from_slice(&links[..n]);
        let flow = Flow {
            links: ids,
            n_links: n as u8,
            live: true,
            raised: false,
            rate: 0.0,
            done: 0.0,
            size: size.max(0.0),
            updated: now,
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.flows[id as usize] = flow;
                id
            }
            None => {
                self.flows.push(flow);
                self.pos.push([0; MAX_LINKS_PER_FLOW]);
                self.slots.push(u32::MAX);
                FlowId::try_from(self.flows.len() - 1).unwrap_or(FlowId::MAX)
            }
        };
        for (i, &link) in ids[..n].iter().enumerate() {
            let l = link as usize;
            self.pos[id as usize][i] = self.links[l].flows.len() as u32;
            self.links[l].flows.push(id);
            self.enqueue(link);
            self.changed_links += 1;
        }
        self.live_flows += 1;
        id
    }

    /// Stops `flow` at `now` (it completed or was cancelled); returns the bytes it transferred,
    /// which are added to every link it crossed. Capacity is shared out again at the next settle.
    pub fn stop(&mut self, now: Nanos, flow: FlowId) -> f64 {
        let Some(f) = self.flows.get_mut(flow as usize).filter(|f| f.live) else {
            return 0.0;
        };
        f.advance(now);
        f.live = false;
        let (links, n, rate, bytes) = (f.links, usize::from(f.n_links), f.rate, f.done);
        self.heap_remove(flow);
        let pos = self.pos[flow as usize];
        for i in 0..n {
            let l = links[i] as usize;
            let link = &mut self.links[l];
            link.bytes += bytes;
            let at = pos[i] as usize;
            link.flows.swap_remove(at);
            let empty = link.flows.is_empty();
            if let Some(&moved) = link.flows.get(at) {
                let m = &self.flows[moved as usize];
                if let Some(k) = m.links().iter().position(|&x| x as usize == l) {
                    self.pos[moved as usize][k] = at as u32;
                }
            }
            let room = &mut self.rooms[l];
            room.used = if empty { 0.0 } else { room.used - rate };
            self.enqueue(links[i]);
            self.changed_links += 1;
        }
        self.free.push(flow);
        self.live_flows -= 1;
        bytes
    }

    /// Bytes `flow` has transferred by `now`.
    pub fn bytes(&self, now: Nanos, flow: FlowId) -> f64 {
        self.flows[flow as usize].bytes_at(now)
    }

    /// When the next flow is expected to end, if any flow can.
    pub fn next_due(&self) -> Option<Nanos> {
        self.heap.first().map(|&(due, _)| due)
    }

    /// When `flow` is expected to end (`Nanos::MAX` if it is not in the heap).
    fn due(&self, flow: FlowId) -> Nanos {
        match self.slots[flow as usize] {
            u32::MAX => Nanos::MAX,
            slot => self.heap[slot as usize].0,
        }
    }

    /// The next flow that has ended by `now`, stopped and removed (with the bytes it moved);
    /// `None` when no flow is due by `now`. Flows due but not done (their rate dropped since
    /// their time was computed) are moved to their new time on the way.
    pub fn pop_done(&mut self, now: Nanos) -> Option<(FlowId, f64)> {
        while let Some(&(due, flow)) = self.heap.first() {
            if due > now {
                return None;
            }
            let f = &mut self.flows[flow as usize];
            f.advance(now);
            if f.size - f.done <= f.tolerance() {
                f.done = f.size;
                let bytes = self.stop(now, flow);
                return Some((flow, bytes));
            }
            let due = f.end_time(now);
            self.reschedule(flow, due);
        }
        None
    }

    /// Sets `flow`'s end time and moves it in the heap (out of it at `Nanos::MAX`).
    fn reschedule(&mut self, flow: FlowId, due: Nanos) {
        if due == Nanos::MAX {
            self.heap_remove(flow);
            return;
        }
        let slot = self.slots[flow as usize];
        if slot == u32::MAX {
            self.heap.push((due, flow));
            let at = self.heap.len() - 1;
            self.slots[flow as usize] = at as u32;
            self.sift_up(at);
        } else {
            self.heap[slot as usize].0 = due;
            let at = self.sift_up(slot as usize);
            self.sift_down(at);
        }
    }

    fn heap_swap(&mut self, i: usize, j: usize) {
        self.heap.swap(i, j);
        let (a, b) = (self.heap[i].1, self.heap[j].1);
        self.slots[a as usize] = i as u32;
        self.slots[b as usize] = j as u32;
    }

    fn sift_up(&mut self, mut i: usize) -> usize {
        while i > 0 {
            let parent = (i - 1) / 2;
            if self.heap[i] < self.heap[parent] {
                self.heap_swap(i, parent);
                i = parent;
            } else {
                break;
            }
        }
        i
    }

    fn sift_down(&mut self, mut i: usize) {
        let n = self.heap.len();
        loop {
            let (l, r) = (2 * i + 1, 2 * i + 2);
            let mut least = i;
            if l < n && self.heap[l] < self.heap[least] {
                least = l;
            }
            if r < n && self.heap[r] < self.heap[least] {
                least = r;
            }
            if least == i {
                return;
            }
            self.heap_swap(i, least);
            i = least;
        }
    }

    fn heap_remove(&mut self, flow: FlowId) {
        let slot = self.slots[flow as usize];
        if slot == u32::MAX {
            return;
        }
        let i = slot as usize;
        let last = self.heap.len() - 1;
        if i != last {
            self.heap_swap(i, last);
        }
        self.heap.pop();
        self.slots[flow as usize] = u32::MAX;
        if i < self.heap.len() {
            let at = self.sift_up(i);
            self.sift_down(at);
        }
    }

    fn enqueue(&mut self, l: LinkId) {
        let link = &mut self.links[l as usize];
        if !link.queued {
            link.queued = true;
            self.work.push_back(l);
        }
    }

    /// Shares capacity out again after the starts and stops since the last call, and moves the
    /// flows whose rate rose to their earlier end time. Call it before the clock moves on.
    pub fn settle(&mut self, now: Nanos) {
        if self.work.is_empty() {
            return;
        }
        match self.sharing {
            Sharing::Exact => {
                while let Some(l) = self.work.pop_front() {
                    self.links[l as usize].queued = false;
                }
                self.fill_exact(now);
            }
            Sharing::Local => self.fill_local(now),
        }
        self.changed_links = 0;
        for flow in std::mem::take(&mut self.raised) {
            let f = &mut self.flows[flow as usize];
            f.raised = false;
            if !f.live {
                continue;
            }
            let at = f.end_time(now);
            if at < self.due(flow) {
                self.reschedule(flow, at);
            }
        }
    }

    /// Sets `flow`'s rate at `now`, keeping every link's `used` in step.
    fn set_rate(&mut self, now: Nanos, flow: FlowId, rate: f64, filling: Option<LinkId>) {
        let f = &mut self.flows[flow as usize];
        f.advance(now);
        let delta = rate - f.rate;
        f.rate = rate;
        if delta > 0.0 && !f.raised {
            f.raised = true;
            self.raised.push(flow);
        }
        let (links, n) = (f.links, usize::from(f.n_links));
        for &l in &links[..n] {
            let room = &mut self.rooms[l as usize];
            room.used += delta;
            if Some(l) == filling {
                continue;
            }
            if room.used > room.capacity * (1.0 + 1e-12) {
                self.enqueue(l);
            } else if delta < 0.0 {
                room.freed -= delta;
                if room.freed > self.tolerances.propagate * room.capacity {
                    self.enqueue(l);
                }
            }
        }
    }

    fn fill_local(&mut self, now: Nanos) {
        let budget = self
            .changed_links
            .max(1)
            .saturating_mul(self.tolerances.fills_per_change);
        let mut done = 0usize;
        while let Some(l) = self.work.pop_front() {
            self.links[l as usize].queued = false;
            done += 1;
            self.fill_link(now, l, done <= budget);
        }
    }

    /// Water-fills link `l` (see the module documentation). With `raise` false it only lowers.
    fn fill_link(&mut self, now: Nanos, l: LinkId, raise: bool) {
        self.fills += 1;
        let li = l as usize;
        if self.links[li].flows.is_empty() {
            let room = &mut self.rooms[li];
            room.used = 0.0;
            room.level = room.capacity;
            room.freed = 0.0;
            return;
        }
        let capacity = self.rooms[li].capacity;
        let mut caps = std::mem::take(&mut self.caps);
        caps.clear();
        for &flow in &self.links[li].flows {
            let f = &self.flows[flow as usize];
            let mut cap = f64::INFINITY;
            for &m in f.links() {
                if m == l {
                    continue;
                }
                let other = &self.rooms[m as usize];
                let room = (other.capacity - other.used + f.rate).max(0.0);
                let offer = if raise { room.max(other.level) } else { room };
                cap = cap.min(offer);
            }
            if !raise {
                cap = cap.min(f.rate);
            }
            caps.push(cap);
        }
        let level = water_level(capacity, &caps, &mut self.scratch);
        let tol = self.tolerances.raise;
        for (i, &cap) in caps.iter().enumerate() {
            let flow = self.links[li].flows[i];
            let old = self.flows[flow as usize].rate;
            let new = cap.min(level);
            if new < old || (raise && new > old * (1.0 + tol) + 1e-9) {
                self.set_rate(now, flow, new, Some(l));
            }
        }
        let used = self.sum_rates(li);
        let room = &mut self.rooms[li];
        room.used = used;
        room.level = if level.is_finite() {
            level
        } else {
            caps.iter().copied().fold(0.0, f64::max).max(room.capacity)
        };
        room.freed = 0.0;
        self.caps = caps;
    }

    /// Exact max-min over every live flow (progressive filling).
    fn fill_exact(&mut self, now: Nanos) {
        let live: Vec<FlowId> = (0..self.flows.len() as FlowId)
            .filter(|&f| self.flows[f as usize].live)
            .collect();
        let paths: Vec<Vec<usize>> = live
            .iter()
            .map(|&f| {
                self.flows[f as usize]
                    .links()
                    .iter()
                    .map(|&l| l as usize)
                    .collect()
            })
            .collect();
        let capacities: Vec<f64> = self.rooms.iter().map(|r| r.capacity).collect();
        let rates = max_min_rates(&capacities, &paths);
        for (&flow, &rate) in live.iter().zip(&rates) {
            if rate != self.flows[flow as usize].rate {
                self.set_rate(now, flow, rate, None);
            }
        }
        while let Some(l) = self.work.pop_front() {
            self.links[l as usize].queued = false;
        }
        for l in 0..self.links.len() {
            let used = self.sum_rates(l);
            let top = self.links[l]
                .flows
                .iter()
                .map(|&f| self.flows[f as usize].rate)
                .fold(0.0, f64::max);
            let room = &mut self.rooms[l];
            room.used = used;
            room.freed = 0.0;
            room.level = room.capacity.max(top);
        }
    }
}

/// The level `w` at which `sum(min(cap, w))` equals `capacity`, or infinity if the caps add up
/// to less (every flow gets its cap).
fn water_level(capacity: f64, caps: &[f64], open: &mut Vec<f64>) -> f64 {
    let total: f64 = caps.iter().sum();
    if total <= capacity {
        return f64::INFINITY;
    }
    // Repeatedly fix the flows capped below the even share of what is left.
    let mut left = capacity;
    open.clear();
    open.extend_from_slice(caps);
    loop {
        let share = left / open.len() as f64;
        let before = open.len();
        let mut i = 0;
        while i < open.len() {
            if open[i] < share {
                left -= open[i];
                open.swap_remove(i);
            } else {
                i += 1;
            }
        }
        if open.len() == before || open.is_empty() {
            return if open.is_empty() {
                f64::INFINITY
            } else {
                share
            };
        }
    }
}

/// Exact max-min fair rates by progressive filling: `paths[f]` lists the links flow `f` crosses.
/// Flows that cross no link get infinity.
pub fn max_min_rates(capacities: &[f64], paths: &[Vec<usize>]) -> Vec<f64> {
    let mut left: Vec<f64> = capacities.to_vec();
    let mut count = vec![0usize; capacities.len()];
    for path in paths {
        for &l in path {
            count[l] += 1;
        }
    }
    let mut rate = vec![f64::INFINITY; paths.len()];
    let mut fixed = vec![false; paths.len()];
    let mut on_link: Vec<Vec<usize>> = vec![Vec::new(); capacities.len()];
    for (f, path) in paths.iter().enumerate() {
        for &l in path {
            on_link[l].push(f);
        }
        if path.is_empty() {
            fixed[f] = true;
        }
    }
    loop {
        // The most constrained link: least share per unfixed flow.
        let next = (0..capacities.len())
            .filter(|&l| count[l] > 0)
            .map(|l| (left[l].max(0.0) / count[l] as f64, l))
            .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let Some((share, l)) = next else {
            break;
        };
        for &f in &on_link[l] {
            if fixed[f] {
                continue;
            }
            fixed[f] = true;
            rate[f] = share;
            for &m in &paths[f] {
                left[m] -= share;
                count[m] -= 1;
            }
        }
    }
    rate
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::SECOND;
    use crate::rng::Rng;

    const MS: Nanos = 1_000_000;

    fn settle(net: &mut Network) {
        net.settle(0);
    }

    #[test]
    fn two_flows_on_one_link_get_half_each() {
        for sharing in [Sharing::Local, Sharing::Exact] {
            let mut net = Network::new(sharing);
            let l = net.add_link(100.0);
            let a = net.start(0, &[l], 1000.0);
            let b = net.start(0, &[l], 1000.0);
            settle(&mut net);
            assert_eq!((net.rate(a), net.rate(b)), (50.0, 50.0), "{sharing:?}");
            net.stop(0, b);
            settle(&mut net);
            assert_eq!(net.rate(a), 100.0, "{sharing:?}: the survivor takes it all");
        }
    }

    #[test]
    fn a_flow_limited_elsewhere_leaves_the_rest_to_the_other() {
        for sharing in [Sharing::Local, Sharing::Exact] {
            let mut net = Network::new(sharing);
            let shared = net.add_link(100.0);
            let narrow = net.add_link(10.0);
            let wide = net.add_link(1000.0);
            let a = net.start(0, &[narrow, shared], 1000.0);
            let b = net.start(0, &[wide, shared], 1000.0);
            settle(&mut net);
            assert!((net.rate(a) - 10.0).abs() < 1e-9, "{sharing:?}");
            assert!((net.rate(b) - 90.0).abs() < 1e-9, "{sharing:?}");
        }
    }

    #[test]
    fn a_flow_finishes_when_its_bytes_are_through_and_rates_change_midway() {
        let mut net = Network::new(Sharing::Local);
        let l = net.add_link(1000.0);
        let a = net.start(0, &[l], 1000.0);
        net.settle(0);
        assert_eq!(net.next_due(), Some(1000 * MS));
        // At 0.5 s a second flow halves a's rate: a's time is now early.
        let b = net.start(500 * MS, &[l], 10_000.0);
        net.settle(500 * MS);
        assert_eq!(net.rate(a), 500.0);
        assert_eq!(net.next_due(), Some(1000 * MS));
        assert_eq!(
            net.pop_done(1000 * MS),
            None,
            "not done: moved to its new time"
        );
        assert_eq!(net.next_due(), Some(1500 * MS));
        assert_eq!(net.pop_done(1500 * MS), Some((a, 1000.0)));
        assert_eq!(net.link_bytes(l), 1000.0);
        // b then gets the whole link back, and finishes earlier than at half rate: it sent
        // 500 bytes/s for 1 s, then 1000 bytes/s for the remaining 9500 bytes.
        net.settle(1500 * MS);
        assert_eq!(net.next_due(), Some(11_000 * MS));
        assert_eq!(net.pop_done(10_999 * MS), None);
        assert_eq!(net.pop_done(11_000 * MS), Some((b, 10_000.0)));
        assert_eq!(net.next_due(), None);
    }

    #[test]
    fn a_stopped_flow_leaves_the_due_heap_and_its_slot_is_reused() {
        let mut net = Network::new(Sharing::Local);
        let l = net.add_link(10.0);
        let a = net.start(0, &[l], 100.0);
        net.settle(0);
        assert_eq!(net.stop(5 * SECOND, a), 50.0);
        assert_eq!(net.next_due(), None);
        let b = net.start(6 * SECOND, &[l], 100.0);
        assert_eq!(a, b);
        net.settle(6 * SECOND);
        assert_eq!(net.next_due(), Some(16 * SECOND));
        assert_eq!(net.link_bytes(l), 50.0);
    }

    #[test]
    fn the_due_heap_pops_in_time_order_whatever_the_changes() {
        let mut rng = Rng::new(11);
        let mut net = Network::new(Sharing::Local);
        let links: Vec<LinkId> = (0..5).map(|_| net.add_link(1000.0)).collect();
        let mut now = 0;
        let mut live = Vec::new();
        let mut ended = 0;
        for _ in 0..400 {
            if rng.below(3) > 0 || live.is_empty() {
                let l = links[rng.below(5) as usize];
                live.push(net.start(now, &[l], 1.0 + rng.below(5000) as f64));
            } else {
                let i = rng.below(live.len() as u64) as usize;
                net.stop(now, live.swap_remove(i));
            }
            net.settle(now);
            now += rng.below(200) * MS;
            while let Some((f, bytes)) = net.pop_done(now) {
                live.retain(|&x| x != f);
                assert!(bytes > 0.0);
                ended += 1;
                net.settle(now);
            }
            if let Some(due) = net.next_due() {
                assert!(due > now, "a flow due in the past was left behind");
            }
        }
        assert!(ended > 20, "{ended}");
    }

    /// A random network: `links` links, flows over 1 to 4 distinct random links.
    fn random_case(rng: &mut Rng, links: usize, flows: usize) -> (Vec<f64>, Vec<Vec<usize>>) {
        let caps: Vec<f64> = (0..links).map(|_| 10.0 + rng.below(1000) as f64).collect();
        let paths = (0..flows)
            .map(|_| {
                let k = 1 + rng.below(4) as usize;
                let mut p: Vec<usize> = Vec::new();
                while p.len() < k.min(links) {
                    let l = rng.below(links as u64) as usize;
                    if !p.contains(&l) {
                        p.push(l);
                    }
                }
                p
            })
            .collect();
        (caps, paths)
    }

    fn loads(caps: &[f64], paths: &[Vec<usize>], rates: &[f64]) -> Vec<f64> {
        let mut load = vec![0.0; caps.len()];
        for (p, r) in paths.iter().zip(rates) {
            for &l in p {
                load[l] += r;
            }
        }
        load
    }

    #[test]
    fn exact_max_min_is_feasible_and_every_flow_has_a_saturated_bottleneck() {
        let mut rng = Rng::new(7);
        for _ in 0..200 {
            let (caps, paths) = random_case(&mut rng, 6, 12);
            let rates = max_min_rates(&caps, &paths);
            let load = loads(&caps, &paths, &rates);
            for (l, c) in caps.iter().enumerate() {
                assert!(load[l] <= c * (1.0 + 1e-9), "link {l} over capacity");
            }
            // Max-min: each flow crosses a saturated link on which no flow gets more.
            for (f, p) in paths.iter().enumerate() {
                let ok = p.iter().any(|&l| {
                    load[l] >= caps[l] * (1.0 - 1e-9)
                        && paths
                            .iter()
                            .zip(&rates)
                            .filter(|(q, _)| q.contains(&l))
                            .all(|(_, &r)| r <= rates[f] * (1.0 + 1e-9))
                });
                assert!(ok, "flow {f} has no bottleneck");
            }
        }
    }

    /// Builds the network flow by flow (settling after each, like a simulation does), removes
    /// some, and compares the local rule with exact max-min. Returns the worst shortfall of
    /// total throughput relative to exact, and checks feasibility after every settle.
    fn compare(seed: u64, links: usize, flows: usize) -> (f64, f64) {
        let mut rng = Rng::new(seed);
        let (caps, paths) = random_case(&mut rng, links, flows);
        let mut net = Network::new(Sharing::Local);
        for &c in &caps {
            net.add_link(c);
        }
        let mut ids = Vec::new();
        let check_feasible = |net: &Network| {
            for (l, c) in caps.iter().enumerate() {
                let load = net.link_load(l as LinkId);
                assert!(load <= c * (1.0 + 1e-9), "link {l}: {load} > {c}");
            }
        };
        for p in &paths {
            let links: Vec<LinkId> = p.iter().map(|&l| l as LinkId).collect();
            ids.push(net.start(0, &links, 1e12));
            net.settle(0);
            check_feasible(&net);
        }
        // Remove a third, at random.
        let mut kept: Vec<usize> = Vec::new();
        for (i, &id) in ids.iter().enumerate() {
            if rng.below(3) == 0 {
                net.stop(0, id);
                net.settle(0);
                check_feasible(&net);
            } else {
                kept.push(i);
            }
        }
        let kept_paths: Vec<Vec<usize>> = kept.iter().map(|&i| paths[i].clone()).collect();
        let exact = max_min_rates(&caps, &kept_paths);
        let exact_total: f64 = exact.iter().sum();
        let local_total: f64 = kept.iter().map(|&i| net.rate(ids[i])).sum();
        let worst_flow = kept
            .iter()
            .zip(&exact)
            .map(|(&i, &e)| (net.rate(ids[i]) - e).abs() / e)
            .fold(0.0, f64::max);
        ((exact_total - local_total) / exact_total, worst_flow)
    }

    #[test]
    fn local_sharing_stays_feasible_and_close_to_exact() {
        let mut shortfalls = Vec::new();
        let mut flow_errors = Vec::new();
        for seed in 0..300 {
            let (shortfall, flow_error) = compare(seed, 8, 20);
            flow_errors.push(flow_error);
            // Never more throughput than exact allows (it is the optimum of the fair ones)
            // by more than rounding, and never much less.
            assert!(shortfall > -0.05, "seed {seed}: {shortfall}");
            shortfalls.push(shortfall);
        }
        let mean = shortfalls.iter().sum::<f64>() / shortfalls.len() as f64;
        let worst = shortfalls.iter().copied().fold(0.0, f64::max);
        flow_errors.sort_by(f64::total_cmp);
        let median_flow = flow_errors[flow_errors.len() / 2];
        eprintln!(
            "local vs exact: throughput shortfall mean {mean:.4}, worst {worst:.4}; \
             largest per-flow rate error per case: median {median_flow:.3}, worst {:.3}",
            flow_errors[flow_errors.len() - 1]
        );
        assert!(mean < 0.03, "mean throughput shortfall {mean}");
        assert!(worst < 0.25, "worst throughput shortfall {worst}");
    }

    #[test]
    fn the_nic_bipartite_case_matches_exact_max_min() {
        // A swarm in miniature: senders' uplinks and receivers' downlinks.
        let mut rng = Rng::new(3);
        for _ in 0..50 {
            let n = 6;
            let mut net = Network::new(Sharing::Local);
            let caps: Vec<f64> = (0..2 * n).map(|_| 100.0).collect();
            for &c in &caps {
                net.add_link(c);
            }
            let mut paths = Vec::new();
            let mut ids = Vec::new();
            for _ in 0..15 {
                let s = rng.below(n as u64) as usize;
                let mut r = rng.below(n as u64) as usize;
                if r == s {
                    r = (r + 1) % n;
                }
                let p = vec![2 * s, 2 * r + 1];
                ids.push(net.start(0, &[p[0] as LinkId, p[1] as LinkId], 1e12));
                net.settle(0);
                paths.push(p);
            }
            let exact = max_min_rates(&caps, &paths);
            let total_exact: f64 = exact.iter().sum();
            let total_local: f64 = ids.iter().map(|&f| net.rate(f)).sum();
            assert!(
                total_local >= 0.9 * total_exact,
                "{total_local} vs {total_exact}"
            );
        }
    }

    #[test]
    fn many_flows_ending_at_once_on_one_link_stay_cheap_and_exact() {
        let mut net = Network::new(Sharing::Local);
        let registry = net.add_link(1000.0);
        let nics: Vec<LinkId> = (0..300).map(|_| net.add_link(100.0)).collect();
        let flows: Vec<FlowId> = nics
            .iter()
            .map(|&nic| net.start(0, &[registry, nic], 100.0))
            .collect();
        net.settle(0);
        assert_eq!(net.next_due(), Some(30 * SECOND));
        assert!(
            flows
                .iter()
                .all(|&f| (net.rate(f) - 1000.0 / 300.0).abs() < 1e-9)
        );
        for &f in &flows[..200] {
            net.stop(1, f);
        }
        net.settle(1);
        assert!(
            flows[200..]
                .iter()
                .all(|&f| (net.rate(f) - 10.0).abs() < 1e-9)
        );
    }
}
