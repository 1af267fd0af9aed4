//! Downloads and nodes that go away: a download stalled for `STALL_LIMIT` is dropped and
//! retried, and a node that leaves drops its connections, stops its transfers both ways and
//! comes back after a while. Owns nothing; it ends what the other phases started.

use shoal_node::fetch::plan::Event;

use super::{Ev, Sim, feed};
use crate::engine::{Nanos, nanos_from_secs, secs_from_nanos};

impl Sim<'_> {
    /// The download failed (stalled): a new one, from the chunks held, with a new lookup.
    pub(super) fn restart_download(&mut self, node: u32) {
        self.progress.stalls += 1;
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

    pub(super) fn on_leave(&mut self, node: u32) {
        let now = self.q.now();
        if !self.nodes[node as usize].online {
            return;
        }
        self.progress.departures += 1;
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

    pub(super) fn on_return(&mut self, node: u32) {
        let n = &mut self.nodes[node as usize];
        if n.online {
            return;
        }
        n.online = true;
        if n.started.is_some() {
            self.begin_download(node);
        }
    }
}
