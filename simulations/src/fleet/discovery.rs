//! Start and discovery: a puller starts, announces itself and looks providers up; every
//! `CANDIDATE_REFRESH` it drops the candidates that never answered and looks up again. Owns
//! the choice of candidates, in the node's order ([`candidates::order`]), and the start of a
//! download's plan.

use shoal_node::fetch::candidates;
use shoal_node::fetch::plan::{Bitfield, Plan};
use shoal_node::fetch::swarm::{CANDIDATE_REFRESH, MAX_CANDIDATES, plan_config};

use super::{CandState, Candidate, Download, Ev, Sim};
use crate::engine::nanos;
use crate::rng::mix;
use crate::scenario::Mode;

impl Sim<'_> {
    pub(super) fn on_start(&mut self, node: u32) {
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
    pub(super) fn begin_download(&mut self, node: u32) {
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

    fn node_seed(&self, node: u32, epoch: u32) -> u64 {
        mix(self.seed ^ mix(u64::from(node) << 32 | u64::from(epoch)))
    }

    pub(super) fn on_lookup(&mut self, node: u32, epoch: u32) {
        let now = self.q.now();
        let n = &self.nodes[node as usize];
        if n.epoch != epoch || !n.online || n.completed.is_some() {
            return;
        }
        self.nodes[node as usize].looked_up.get_or_insert(now);
        let n = &self.nodes[node as usize];
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
    ///
    /// The order is the node's own ([`candidates::order`]); what differs is what is found. The
    /// lookup gives every announced node, or when there are many a uniform sample just large
    /// enough to fill the free places. With `local_first` the node is connected to every node
    /// of its site and knows their sites, and those that announced are the providers of its own
    /// site, all found; so is every seeder. Hence two calls where the node makes one: the own
    /// site's providers and the seeders first, then the providers found and the mesh. Two
    /// orders differ from the node's, each a uniform shuffle either way: a seeder the node also
    /// finds as a provider keeps its place among the shuffled providers, where here the seeders
    /// are shuffled among themselves; and the rest is not sorted by site (a node with a site
    /// puts a connected peer of its own site that has not announced first and one of another
    /// site last, where here the mesh simply follows the providers).
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
        let take = |peers: Vec<u32>, fresh: &mut Vec<u32>| {
            for p in peers {
                if fresh.len() >= room {
                    break;
                }
                if ok(p, fresh) {
                    fresh.push(p);
                }
            }
        };
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
            let nodes = &self.nodes;
            let first = candidates::order(local, seeders, Vec::new(), &node, |&p| {
                Some(nodes[p as usize].site == site)
            });
            take(first, &mut fresh);
        }
        let providers = self.providers.len();
        let found = if providers <= 4 * (room + have.len() + 1) {
            let mut all: Vec<u32> = self.providers.clone();
            self.rng.shuffle(&mut all);
            all
        } else {
            // Uniform sample without building the whole list: rejection of repeats.
            let mut sample = Vec::new();
            let mut tries = 0;
            while fresh.len() + sample.len() < room && tries < 8 * room + 32 {
                tries += 1;
                let p = self.providers[self.rng.below(providers as u64) as usize];
                if ok(p, &fresh) && !sample.contains(&p) {
                    sample.push(p);
                }
            }
            sample
        };
        let mut mesh = self.nodes[node as usize].mesh.clone();
        self.rng.shuffle(&mut mesh);
        take(
            candidates::order(found, Vec::new(), mesh, &node, |_| None),
            &mut fresh,
        );
        fresh
    }

    pub(super) fn on_refresh(&mut self, node: u32, epoch: u32) {
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
}
