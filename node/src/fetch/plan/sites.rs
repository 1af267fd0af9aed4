//! Sites: which of a site's downloaders fetch what over its WAN link, so that each chunk crosses
//! it about once (see *Sites* in the [module documentation](super)).
//!
//! [`SiteView`] is the site as this node sees it: the site's downloaders by fixed hash, from
//! which come the gateways that share the site's budget of remote requests, this node's share of
//! it, the gateway that owns each chunk only remote peers hold (rendezvous hashing: the least
//! score `mix(hash(node) ^ chunk)`), the owner by the backstop's rule, and this node's stripe.
//! Every node derives them from its peer set by the same pure functions, with [`stable_hash`]
//! rather than `std`'s hasher, so nodes that see the same peers agree without a word exchanged;
//! the backstop ([`Plan::backstop_due`]) covers nodes whose views differ.

use std::fmt::Debug;
use std::hash::Hash;
use std::time::Duration;

use super::{GOLDEN_GAMMA, PEER_SALT, Plan, mix};

/// A site's downloaders as one node sees them ([`Plan::site`]): their fixed hashes, the
/// `site_remote_in_flight` least of them first (in no order), this node's among them, and its
/// position in ascending order.
pub(super) struct SiteView {
    keys: Vec<u64>,
    me: u64,
    rank: usize,
    /// The site's budget of remote requests
    /// ([`PlanConfig::site_remote_in_flight`](super::PlanConfig::site_remote_in_flight)): as many
    /// of the least keys are put first, the gateways.
    budget: usize,
}

impl SiteView {
    /// This node's stripe: its position `i` among the `m` downloaders. Among equally rare
    /// chunks, each node asks first for those of its own stripe, then its neighbours':
    /// downloaders that start together and know each other ask a seeder for different chunks
    /// from the first request on, before any serve report can tell them apart.
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
    pub(super) fn share(&self, per_node: usize) -> usize {
        let m = self.keys.len().max(1);
        (self.budget / m + usize::from(self.rank < self.budget % m)).min(per_node)
    }

    /// Whether this node is the gateway that fetches `chunk` from remote peers: the least
    /// rendezvous score among the gateways.
    pub(super) fn owns(&self, chunk: u32) -> bool {
        least_scored(self.gateways(), chunk) == Some(self.me)
    }

    /// Whether this node takes `chunk`, which only remote peers hold, when no gateway brought it
    /// into the site ([`Plan::backstop_due`]): the least rendezvous score among all the
    /// downloaders. Views of the site that differ can leave a chunk to a gateway that is none
    /// in its own view, so that no node fetches it; this rule cannot: the least-scored
    /// downloader of the union of the views owns the chunk in its own view.
    pub(super) fn owns_as_backstop(&self, chunk: u32) -> bool {
        least_scored(&self.keys, chunk) == Some(self.me)
    }
}

/// What this node may ask of remote peers in one scheduling pass, decided at its start from
/// its view of the site ([`Plan::wan_access`]).
pub(super) struct WanAccess {
    /// `None` without [`Plan::with_self`]: this node is then its site's only gateway.
    site: Option<SiteView>,
    /// This node's own cap on remote requests
    /// ([`PlanConfig::max_remote_in_flight`](super::PlanConfig::max_remote_in_flight)).
    per_node: usize,
    /// Its share of the site's budget, at most `per_node`.
    share: usize,
    /// Whether the backstop is due ([`Plan::backstop_due`]).
    backstop: bool,
}

impl WanAccess {
    /// Whether this node is the gateway that fetches `chunk`, when only remote peers hold it.
    pub(super) fn owns(&self, chunk: u32) -> bool {
        self.site.as_ref().is_none_or(|s| s.owns(chunk))
    }

    /// Whether this node takes `chunk`, which only remote peers hold and another gateway owns,
    /// with `remote_in_flight` remote requests outstanding: only once the backstop is due, and
    /// within its own cap.
    pub(super) fn takes_as_backstop(&self, chunk: u32, remote_in_flight: usize) -> bool {
        self.backstop
            && remote_in_flight < self.per_node
            && self.site.as_ref().is_none_or(|s| s.owns_as_backstop(chunk))
    }

    /// Whether this node may send another remote request, with `remote_in_flight` outstanding.
    pub(super) fn has_room(&self, remote_in_flight: usize) -> bool {
        remote_in_flight < self.share
    }

    /// This node's stripe ([`SiteView::stripe`]), if it knows its site.
    pub(super) fn stripe(&self) -> Option<(u64, u64)> {
        self.site.as_ref().map(SiteView::stripe)
    }
}

impl<P: Clone + Eq + Hash + Ord + Debug> Plan<P> {
    /// What this node may ask over the WAN in a scheduling pass at `now`.
    pub(super) fn wan_access(&self, now: Duration) -> WanAccess {
        // With no site view (no `with_self`), this node is its site's only gateway.
        let site = self.site();
        let per_node = self.config.max_remote_in_flight;
        let share = site.as_ref().map_or(per_node, |s| s.share(per_node));
        WanAccess {
            site,
            per_node,
            share,
            backstop: self.backstop_due(now),
        }
    }

    /// The site's downloaders as this node sees them: itself and its usable local peers not
    /// holding the whole blob. The stripe, the gateways and the owners of remote-only chunks are
    /// all derived from it. `None` without [`Plan::with_self`].
    pub(super) fn site(&self) -> Option<SiteView> {
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
    pub(super) fn backstop_deadline(&self) -> Option<Duration> {
        if self.missing == 0 || self.me.is_none() || !self.peers.values().any(|s| s.remote) {
            return None;
        }
        self.backstop_at().filter(|&at| at > self.clock)
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
pub(super) fn stripe_owner(chunk: u32, m: u64) -> u64 {
    mix(u64::from(chunk).wrapping_mul(GOLDEN_GAMMA) ^ PEER_SALT) % m.max(1)
}

/// A hash of `value` that is the same on every node and every run (FNV-1a over what its `Hash`
/// implementation writes), so that nodes agree on rendezvous scores. `std`'s default hasher is
/// not promised to stay the same between Rust releases.
pub(super) fn stable_hash<T: Hash + ?Sized>(value: &T) -> u64 {
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
