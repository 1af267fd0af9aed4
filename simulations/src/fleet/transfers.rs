//! Requests and transfers: the plan's decisions, chunk requests and the streams they use,
//! refusals, the flows that carry chunks, their ends and cancels, and central mode's layer
//! flows. Owns the request pools (as the node pools its `ChunkClient`s) and the server's idle
//! timeout.

use shoal_node::fetch::plan::{Action, Bitfield, Event};
use shoal_node::fetch::swarm::{REQUEST_TIMEOUT, STALL_LIMIT};
use shoal_node::net::chunk::{IDLE_TIMEOUT, MAX_INBOUND_CHUNK_STREAMS};
use shoal_node::net::serve_log::{Claim, SendStart};

use super::haves::ServeLog;
use super::{CandState, Ev, FlowInfo, PUBLISHER, Request, Sim, Streams, feed};
use crate::engine::{Nanos, duration, nanos};
use crate::links::{FlowId, LinkId};

/// How long the chunk server keeps an idle stream open: the node's own [`IDLE_TIMEOUT`].
const STREAM_IDLE_TIMEOUT: Nanos = IDLE_TIMEOUT.as_nanos() as Nanos;

impl Sim<'_> {
    pub(super) fn think(&mut self, node: u32) {
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
                self.plans.skipped += 1;
                return;
            }
        }
        self.plans.made += 1;
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
                        .is_some_and(|r| r.claim(chunk) != Claim::Unclaimed);
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
            for (a, b) in self.diag.publisher_requests.iter_mut().zip(counts) {
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
                        self.requests.cancels += 1;
                        if now.saturating_sub(req.sent) >= nanos(REQUEST_TIMEOUT) {
                            self.requests.timeouts += 1;
                        }
                        // A loser: the chunk came from another peer first (endgame).
                        let loser = n.held.get(chunk);
                        let in_flight =
                            u32::try_from(d.plan.config().max_in_flight).unwrap_or(u32::MAX);
                        if loser && n.held.count_ones().saturating_add(in_flight) < self.chunk_count
                        {
                            self.requests.early_losers += 1;
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
                self.waste.losers += bytes;
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
            self.progress.complete += 1;
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

    pub(super) fn on_request(&mut self, from: u32, epoch: u32, to: u32, id: u64) {
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
        // A seeder sends one copy of a chunk at a time (`BlobLog::start`, by the same
        // `ChunkSends`): a request for a chunk it is sending already is answered "busy", and the
        // requester drops the stream (a pooled one stops counting at the server; a new one never
        // started to).
        let upload = self.nodes[to as usize]
            .serves
            .as_mut()
            .map(|u| u.sends.start(req.chunk));
        if upload == Some(SendStart::Declined) {
            if !req.new_stream {
                let b = &mut self.nodes[to as usize];
                b.streams_in = b.streams_in.saturating_sub(1);
            }
            self.requests.declined += 1;
            self.refuse(from, to, epoch, id);
            return;
        }
        if req.new_stream {
            self.nodes[to as usize].streams_in += 1;
        }
        let size = self.chunk_len(req.chunk);
        let links = self.path(to, from);
        let flow = self.net.start(now, &links, size as f64);
        // Logged if the sender holds the whole blob; a claim that changed answers the polls.
        let logged = upload.is_some();
        if upload
            == Some(SendStart::Started {
                claim_changed: true,
            })
        {
            self.answer_polls(to, req.chunk);
        }
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
        self.requests.refused += 1;
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

    pub(super) fn on_refused(&mut self, to: u32, epoch: u32, id: u64) {
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
            if self.diag.busy_burst.0 == key {
                self.diag.busy_burst.1 += 1;
            } else {
                let len = std::mem::replace(&mut self.diag.busy_burst, (key, 1)).1;
                if len > 0 {
                    self.diag.busy_bursts[(len as usize).min(8) - 1] += 1;
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

    pub(super) fn start_central(&mut self, node: u32) {
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

    pub(super) fn account(&mut self, from: u32, to: u32, bytes: f64) {
        self.nodes[from as usize].sent += bytes;
        self.nodes[to as usize].received += bytes;
    }

    pub(super) fn on_flow_end(&mut self, flow: FlowId) {
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
            self.serve_ended(info.from, info.chunk, true);
        }
        if info.from == PUBLISHER && info.chunk != u32::MAX {
            self.progress.publisher_last = now;
            if let Some(n) = self.diag.publisher_serves.get_mut(info.chunk as usize) {
                *n += 1;
                if *n == 1 {
                    self.progress.first_copies += 1;
                    if self.progress.first_copies == self.chunk_count {
                        self.progress.all_out = Some(now);
                    }
                }
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
                self.progress.complete += 1;
            }
            return;
        }
        let a = &mut self.nodes[info.to as usize];
        let Some(d) = a.download.as_mut().filter(|_| a.epoch == info.epoch) else {
            self.waste.all += size;
            return;
        };
        let Some(i) = d.requests.iter().position(|r| r.id == info.id) else {
            self.waste.all += size;
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
                a.serves = Some(Box::new(ServeLog::new(self.chunk_count)));
            }
            self.answer_polls(info.to, req.chunk);
        } else {
            self.waste.all += size;
            self.waste.duplicates += size;
        }
        self.mark(info.to);
    }

    /// A transfer of `chunk` that `node` logged ends, `finished` or cut short.
    fn serve_ended(&mut self, node: u32, chunk: u32, finished: bool) {
        let n = &mut self.nodes[node as usize];
        if let Some(log) = n.serves.as_mut() {
            if log.sends.end(chunk, finished) && n.online {
                self.answer_polls(node, chunk);
            }
        }
    }

    /// Stops `node`'s request `req` (cancelled, or its peer or itself gone); returns the bytes
    /// its transfer had moved, now thrown away. The node aborts the request's task, which drops
    /// its stream: the stream closes at both ends.
    pub(super) fn drop_request(&mut self, node: u32, req: &Request) -> f64 {
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
        self.waste.all += bytes;
        if info.logged {
            self.serve_ended(info.from, info.chunk, false);
        }
        bytes
    }

    /// Closes the idle streams of a download that ended (its pool is dropped).
    pub(super) fn close_pool(&mut self, pool: &[Streams]) {
        for s in pool {
            let b = &mut self.nodes[s.peer as usize];
            if b.session == s.session {
                b.streams_in = b
                    .streams_in
                    .saturating_sub(s.open.saturating_sub(s.busy) as usize);
            }
        }
    }

    /// The server closes streams idle for [`STREAM_IDLE_TIMEOUT`]: when no stream of `node`'s
    /// pool to `peer` went idle for that long, its idle streams are closed.
    pub(super) fn on_idle_check(&mut self, node: u32, epoch: u32, peer: u32) {
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
}

/// Takes a stream to `peer` from the pool for a request; returns whether a new one must be
/// opened (none was idle).
pub(super) fn pool_take(pool: &mut Vec<Streams>, peer: u32, session: u32) -> bool {
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
pub(super) fn pool_release(pool: &mut [Streams], peer: u32, closed: bool) {
    if let Some(s) = pool.iter_mut().find(|s| s.peer == peer) {
        s.busy = s.busy.saturating_sub(1);
        if closed {
            s.open = s.open.saturating_sub(1);
        }
    }
}
