//! The order in which a download tries the peers that may hold a blob.
//!
//! A download keeps only its first `MAX_CANDIDATES` peers (see [`swarm`](super::swarm)), so
//! which peers come first decides which ones it ever asks. The rule is kept here, apart from the
//! lookups that feed it, so that the fleet simulator (`shoal-simulations`) orders its modelled
//! peers by the same code as [`Fetcher`](super::Fetcher) does. The callers look the peers up and
//! shuffle each list with their own generator (the node with `rand::rng()`, the simulator with
//! its seeded one, so that a simulation replays from its seed); this module only merges and
//! sorts. It owns no state.

use std::collections::HashSet;
use std::hash::Hash;

/// Where a peer goes in the candidate order, first to last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Group {
    /// Known to be in this node's site.
    SameSite,
    /// Holds the whole blob (a seeder), and is not known to be in this node's site.
    Seeder,
    /// Its site is not known: it is not connected, advertised none, or this node has none.
    UnknownSite,
    /// Known to be in another site.
    OtherSite,
}

impl Group {
    /// The group of a peer that is (`Some(true)`), is not (`Some(false)`) or may be (`None`)
    /// in this node's site, and is or is not a seeder.
    pub fn of(same_site: Option<bool>, seeder: bool) -> Group {
        match same_site {
            Some(true) => Group::SameSite,
            _ if seeder => Group::Seeder,
            None => Group::UnknownSite,
            Some(false) => Group::OtherSite,
        }
    }
}

/// The candidates for a blob, best first, from the lists the caller found and shuffled: every
/// provider in the order given (repeats and all), then every seeder not listed yet, then every
/// connected peer not listed yet, less `me`; then sorted by [`Group`], with `same_site` telling
/// whether a peer is in this node's site (`None`: not known).
pub fn order<P: Copy + Eq + Hash>(
    providers: Vec<P>,
    seeders: Vec<P>,
    connected: Vec<P>,
    me: &P,
    same_site: impl Fn(&P) -> Option<bool>,
) -> Vec<P> {
    let is_seeder: HashSet<P> = seeders.iter().copied().collect();
    let mut listed: HashSet<P> = providers.iter().copied().collect();
    let mut peers = providers;
    for p in seeders.into_iter().chain(connected) {
        if listed.insert(p) {
            peers.push(p);
        }
    }
    peers.retain(|p| p != me);
    // Peers known to be in this node's site first, those in another site last: a download
    // keeps only the first `MAX_CANDIDATES`, and a site whose nodes do not know each other
    // fetches every chunk over its WAN link once per node instead of once per site. (The
    // sort is stable, so each group stays shuffled.)
    peers.sort_by_cached_key(|p| Group::of(same_site(p), is_seeder.contains(p)));
    peers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_site_providers_come_first_then_connected_peers() {
        // A node without a site looks no seeders up.
        let providers = vec![5, 3, 5];
        let connected = vec![1, 9, 3, 0];
        let order = order(providers, vec![], connected, &1, |_| None);
        // A provider found twice stays twice, as the lookup gave it; the others come once.
        assert_eq!(order, vec![5, 3, 5, 9, 0]);
    }

    #[test]
    fn seeders_go_before_peers_whose_site_is_not_known() {
        // 7 is a provider too: it keeps its place among the providers, ahead of seeder 4.
        let order = order(vec![3, 7], vec![4, 7], vec![6, 4], &0, |_| None);
        assert_eq!(order, vec![7, 4, 3, 6]);
    }

    #[test]
    fn with_a_site_the_own_site_goes_first_then_seeders_then_unknown_then_other_sites() {
        // Site known for 10..20 (own) and 20..30 (another); seeders are 20 and 4.
        let same_site = |p: &u32| match p {
            10..20 => Some(true),
            20..30 => Some(false),
            _ => None,
        };
        let providers = vec![21, 3, 11, 20, 2];
        let seeders = vec![4, 20, 12];
        let connected = vec![22, 13, 0, 5];
        let order = order(providers, seeders, connected, &0, same_site);
        assert_eq!(
            order,
            vec![11, 12, 13, 20, 4, 3, 2, 5, 21, 22],
            "each group keeps the order the lists gave it"
        );
    }

    #[test]
    fn groups_rank_the_own_site_over_seeders_and_seeders_over_sites_not_known() {
        assert_eq!(Group::of(Some(true), true), Group::SameSite);
        assert_eq!(Group::of(Some(false), true), Group::Seeder);
        assert_eq!(Group::of(None, true), Group::Seeder);
        assert_eq!(Group::of(None, false), Group::UnknownSite);
        assert_eq!(Group::of(Some(false), false), Group::OtherSite);
        assert!(Group::SameSite < Group::Seeder);
        assert!(Group::Seeder < Group::UnknownSite);
        assert!(Group::UnknownSite < Group::OtherSite);
    }

    #[test]
    fn nothing_found_gives_no_candidates_and_self_is_never_one() {
        assert!(order(Vec::<u32>::new(), vec![], vec![], &1, |_| None).is_empty());
        assert!(order(vec![1], vec![1], vec![1], &1, |_| Some(true)).is_empty());
    }
}
