//! Haves and serve reports: what a node tells the peers that took it as a candidate. Owns the
//! answers to `Have` requests and long polls, the polls parked at a node until it changes, and
//! a seeder's upload log (the node's own `ChunkSends`) with the report its answers carry.

use std::rc::Rc;

use shoal_node::fetch::plan::{Bitfield, Event};
use shoal_node::net::serve_log::{ChunkSends, Claim};

use super::{CandState, Candidate, Ev, Parked, Sim, feed, two};

/// A seeder's serve report, as its `Have` answers carry it (`ServeReport` in the protocol).
#[derive(Debug)]
pub(super) struct Report {
    /// [`ChunkSends::version`] when it was taken.
    version: u64,
    /// [`ChunkSends::visible`] when it was taken.
    visible: u64,
    /// Chunks being sent to some peer.
    sending: Bitfield,
    /// Chunks sent in full at least once.
    sent: Bitfield,
}

impl Report {
    /// What a plan makes of `chunk` in this report: its decisions depend on nothing else (a
    /// chunk already sent counts as given away whether or not it is being sent again, and the
    /// first time a chunk was reported sent comes before any later "sending").
    pub(super) fn claim(&self, chunk: u32) -> Claim {
        Claim::of(&self.sending, &self.sent, chunk)
    }
}

/// The serves of a node that holds the whole blob, as the node's chunk server logs them: only
/// transfers that started once it held the whole blob (a download in progress serves from its
/// partial file and logs nothing). The bookkeeping is the node's own [`ChunkSends`] (which
/// bumps its version at every transfer start and end, and its visible count when a chunk's
/// [`Claim`] changes: the only changes a plan can act on).
#[derive(Debug)]
pub(super) struct ServeLog {
    pub(super) sends: ChunkSends,
    /// The report as of the version of `sends`, shared by the answers that carry it.
    report: Option<Rc<Report>>,
}

impl ServeLog {
    pub(super) fn new(chunk_count: u32) -> ServeLog {
        ServeLog {
            sends: ChunkSends::new(chunk_count),
            report: None,
        }
    }

    /// The current report.
    fn report(&mut self) -> Rc<Report> {
        let version = self.sends.version();
        if let Some(r) = self.report.as_ref().filter(|r| r.version == version) {
            return r.clone();
        }
        let r = Rc::new(Report {
            version,
            visible: self.sends.visible(),
            sending: self.sends.sending(),
            sent: self.sends.sent().clone(),
        });
        self.report = Some(r.clone());
        r
    }
}

impl Sim<'_> {
    pub(super) fn on_have_ask(&mut self, from: u32, epoch: u32, to: u32, slot: u32) {
        let b = &self.nodes[to as usize];
        // A node answers if it holds or downloads the blob; an offline one cannot answer.
        if !b.online || b.started.is_none() {
            return;
        }
        self.answer(to, from, epoch, slot);
    }

    /// `node` answers `asker`'s `Have` or long poll now, with what it holds and, if it holds the
    /// whole blob, its serve report.
    fn answer(&mut self, node: u32, asker: u32, epoch: u32, slot: u32) {
        let lat = self.latency(node, asker);
        let b = &mut self.nodes[node as usize];
        let serves = b.serves.as_mut().map(|u| u.report());
        let (session, held) = (b.session, b.log.len() as u32);
        self.q.push_after(
            lat,
            Ev::Answers {
                to: vec![(asker, epoch, slot)],
                from: node,
                session,
                held,
                serves,
            },
        );
    }

    /// A long poll reaches `node` after it changed: answered at once.
    pub(super) fn on_poll_arrives(
        &mut self,
        node: u32,
        session: u32,
        asker: u32,
        epoch: u32,
        slot: u32,
    ) {
        let (b, a) = (&self.nodes[node as usize], &self.nodes[asker as usize]);
        if !b.online || b.session != session {
            return;
        }
        if a.epoch != epoch || !a.online || a.completed.is_some() {
            return;
        }
        self.answer(node, asker, epoch, slot);
    }

    /// An answer from `from`: it held the first `k` chunks of its log, and `serves` is its
    /// serve report if it holds the whole blob.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_have_answer(
        &mut self,
        to: u32,
        epoch: u32,
        from: u32,
        session: u32,
        k: u32,
        slot: u32,
        serves: Option<&Rc<Report>>,
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
                a.first_have.get_or_insert(now);
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
        // The serve report, fed when it changes the claim on a chunk this node misses (the
        // plan's view of the others does not matter: they are never missing again).
        if let Some(r) = serves.filter(|_| self.scenario.discovery.serve_reports) {
            let cand = &mut d.candidates[ci];
            if cand
                .report
                .as_ref()
                .is_none_or(|old| old.version < r.version)
            {
                let changed = match &cand.report {
                    None => r.sending.has_any_not_in(&a.held) || r.sent.has_any_not_in(&a.held),
                    Some(old) => a.held.iter_zeros().any(|c| old.claim(c) != r.claim(c)),
                };
                cand.report = Some(r.clone());
                if changed {
                    for c in r.sending.iter_ones().chain(r.sent.iter_ones()) {
                        d.claimed_any.set(c);
                    }
                    feed(
                        d,
                        Event::PeerServes {
                            peer: from,
                            sending: r.sending.clone(),
                            sent: r.sent.clone(),
                        },
                        now,
                    );
                    self.plans.reports += 1;
                    full = true;
                }
            }
        }
        // Poll again at once. It is answered on arrival if the peer changed since this answer
        // (a chunk stored, or a claim in its report); otherwise it stays parked there.
        let lat = self.latency(to, from);
        let b = &mut self.nodes[from as usize];
        let changed = b.log.len() as u32 > k
            || match (&b.serves, serves) {
                (Some(log), Some(r)) => log.sends.visible() != r.visible,
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

    /// `node` changed in a way that concerns `chunk`: it stored the chunk, or its report's
    /// claim on the chunk changed. Answers the long polls parked on it: those that arrived
    /// together (one event per latency class), those still travelling when they arrive, with
    /// what the node holds and reports then. A poll whose asker holds `chunk` stays parked: the
    /// answer would change none of its plan's decisions (they are about missing chunks), and
    /// the next answer carries this change too. Only when the next change comes sooner than a
    /// re-poll would have arrived does it reach the asker earlier than with the real protocol
    /// (by at most two one-way latencies).
    pub(super) fn answer_polls(&mut self, node: u32, chunk: u32) {
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
        let serves = n.serves.as_mut().map(|u| u.report());
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
                        serves: serves.clone(),
                    },
                );
            }
        }
    }
}
