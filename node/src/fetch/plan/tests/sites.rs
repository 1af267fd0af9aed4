//! Sites: each chunk crosses a site's WAN link about once, through the site's gateways, with a
//! backstop for chunks no gateway fetches.

use std::collections::BTreeSet;

use crate::fetch::plan::sites::stable_hash;

use super::*;

/// The members of `site` but `me`.
fn all_but(site: &[u32], me: u32) -> Vec<u32> {
    site.iter().copied().filter(|&p| p != me).collect()
}

/// The members of `site` in the order of their fixed hashes (the order gateways are chosen in).
fn by_key(site: &[u32]) -> Vec<u32> {
    let mut keyed: Vec<(u64, u32)> = site.iter().map(|&p| (stable_hash(&p), p)).collect();
    keyed.sort_unstable();
    keyed.into_iter().map(|(_, p)| p).collect()
}

/// A plan for node `me` of a site whose other downloaders are `locals` (holding nothing yet),
/// with `remote` in another site holding all `chunks`.
fn site_plan(me: u32, locals: &[u32], remote: u32, chunks: u32, config: PlanConfig) -> Plan<u32> {
    let mut plan = Plan::new(chunks, Bitfield::new(chunks), config).with_self(&me);
    for &peer in locals {
        has(&mut plan, peer, Bitfield::new(chunks));
    }
    plan.handle(Event::PeerRemote { peer: remote }, T0);
    has(&mut plan, remote, Bitfield::full(chunks));
    plan
}

#[test]
fn a_site_fetches_each_remote_chunk_once_between_its_downloaders() {
    let chunks = 64;
    let config = PlanConfig {
        max_remote_in_flight: 64,
        site_remote_in_flight: 256,
        max_in_flight: 64,
        max_in_flight_per_peer: 64,
        ..config()
    };
    let site = [1u32, 2, 3, 4];
    let mut asked = Vec::new();
    for &me in &site {
        let mut plan = site_plan(me, &all_but(&site, me), 9, chunks, config.clone());
        let reqs = requests(&plan.next_actions(T0));
        assert!(reqs.iter().all(|&(peer, _)| peer == 9));
        assert!(!reqs.is_empty(), "node {me} owns some chunks");
        asked.extend(reqs.into_iter().map(|(_, chunk)| chunk));
        plan.assert_consistent();
    }
    asked.sort_unstable();
    assert_eq!(
        asked,
        (0..chunks).collect::<Vec<_>>(),
        "every chunk once, by one node"
    );
}

#[test]
fn a_chunk_a_local_peer_holds_is_never_asked_over_the_wan() {
    let mut plan = site_plan(1, &[2], 9, 8, config());
    has(&mut plan, 2, bits(8, [0, 1, 2, 3, 4, 5, 6, 7]));
    let reqs = requests(&plan.next_actions(T0));
    assert!(!reqs.is_empty());
    assert!(reqs.iter().all(|&(peer, _)| peer == 2), "{reqs:?}");
    assert_eq!(plan.peer_stats(&9).map(|s| s.remote), Some(true));
}

#[test]
fn remote_requests_are_capped_and_never_duplicated_in_endgame() {
    // Alone in its site: it owns every chunk, but asks the WAN for two at a time.
    let mut plan = site_plan(1, &[], 9, 16, config());
    has(&mut plan, 8, Bitfield::new(16));
    plan.handle(Event::PeerRemote { peer: 8 }, T0);
    has(&mut plan, 8, Bitfield::full(16));
    let reqs = requests(&plan.next_actions(T0));
    assert_eq!(reqs.len(), 2, "max_remote_in_flight: {reqs:?}");
    done(&mut plan, reqs[0].0, reqs[0].1, ms(100));
    let more = requests(&plan.next_actions(ms(100)));
    assert_eq!(more.len(), 1);
    // Two remote peers hold every chunk; endgame never asks both for the same one.
    let mut now = ms(100);
    loop {
        let in_flight: Vec<(u32, u32)> = (0..16)
            .flat_map(|c| [(8, c), (9, c)])
            .filter(|(p, c)| {
                plan.peers
                    .get(p)
                    .is_some_and(|s| s.in_flight.contains_key(c))
            })
            .collect();
        let chunks_in_flight: BTreeSet<u32> = in_flight.iter().map(|&(_, c)| c).collect();
        assert_eq!(
            chunks_in_flight.len(),
            in_flight.len(),
            "a duplicate over the WAN"
        );
        assert!(in_flight.len() <= 2);
        let Some(&(peer, chunk)) = in_flight.first() else {
            break;
        };
        now += ms(100);
        done(&mut plan, peer, chunk, now);
        plan.next_actions(now);
    }
    assert!(plan.is_complete());
    plan.assert_consistent();
}

#[test]
fn a_large_site_asks_the_wan_for_a_few_chunks_at_a_time_through_its_gateways() {
    // Ten downloaders behind one WAN link, the default budget of four remote requests for
    // the site: the four with the least keys each ask for one chunk, and no two for the same.
    let chunks = 64;
    let site: Vec<u32> = (1..=10).collect();
    let keyed = by_key(&site);
    let gateways = &keyed[..4];
    let mut asked = Vec::new();
    for &me in &site {
        let mut plan = site_plan(me, &all_but(&site, me), 99, chunks, config());
        let reqs = requests(&plan.next_actions(T0));
        if gateways.contains(&me) {
            assert_eq!(reqs.len(), 1, "gateway {me} asked the WAN for {reqs:?}");
        } else {
            assert!(
                reqs.is_empty(),
                "node {me} is no gateway but asked {reqs:?}"
            );
        }
        asked.extend(reqs.into_iter().map(|(_, chunk)| chunk));
        plan.assert_consistent();
    }
    let distinct: BTreeSet<u32> = asked.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        asked.len(),
        "a chunk asked twice: {asked:?}"
    );
    assert_eq!(asked.len(), 4);

    // A gateway leaves: the fifth downloader takes its place and its chunks.
    let fifth = keyed[4];
    let mut plan = site_plan(fifth, &all_but(&site, fifth), 99, chunks, config());
    assert!(requests(&plan.next_actions(T0)).is_empty());
    plan.handle(Event::PeerGone { peer: gateways[0] }, ms(10));
    let reqs = requests(&plan.next_actions(ms(10)));
    assert_eq!(
        reqs.len(),
        1,
        "the new gateway asks for one chunk: {reqs:?}"
    );
    assert_eq!(reqs[0].0, 99);
    // With fewer downloaders than the budget, each takes more, up to
    // `max_remote_in_flight` (2).
    let mut plan = site_plan(1, &[2], 99, chunks, config());
    let reqs = requests(&plan.next_actions(T0));
    assert_eq!(reqs.len(), 2, "two of the site's four: {reqs:?}");
    plan.assert_consistent();
}

#[test]
fn a_chunk_no_gateway_fetches_is_taken_after_a_request_timeout() {
    // Six downloaders in a site; one of them does not see the one with the least key (it
    // struck it out, say), so its gateways differ from the others' and some chunk can be
    // left to a node that is no gateway in its own view. Find such a chunk.
    let chunks = 64;
    let site: Vec<u32> = (1..=6).collect();
    let keyed = by_key(&site);
    let least = keyed[0];
    let mut found = None;
    for &blind in &keyed[1..] {
        let plans: Vec<(u32, Plan<u32>)> = site
            .iter()
            .map(|&me| {
                let others: Vec<u32> = site
                    .iter()
                    .copied()
                    .filter(|&p| p != me && !(me == blind && p == least))
                    .collect();
                (me, site_plan(me, &others, 99, chunks, config()))
            })
            .collect();
        let orphan = (0..chunks).find(|&c| {
            plans.iter().all(|(_, plan)| {
                let site = plan.site().expect("with_self");
                site.share(plan.config().max_remote_in_flight) == 0 || !site.owns(c)
            })
        });
        if let Some(c) = orphan {
            found = Some((c, plans));
            break;
        }
    }
    let (orphan, plans) = found.expect("some view leaves a chunk to no gateway");
    // Exactly one node owns it as a backstop, and it is no gateway: it has nothing in flight.
    let mut owners: Vec<(u32, Plan<u32>)> = plans
        .into_iter()
        .filter(|(_, plan)| plan.site().is_some_and(|s| s.owns_as_backstop(orphan)))
        .collect();
    assert_eq!(owners.len(), 1, "one backstop owner of chunk {orphan}");
    let (me, mut plan) = owners.remove(0);
    assert!(
        requests(&plan.next_actions(T0)).is_empty(),
        "node {me} is no gateway"
    );
    let timeout = plan.config().request_timeout;
    let mut now = T0;
    for _ in 0..chunks {
        assert_eq!(
            plan.next_deadline(),
            Some(now + timeout),
            "it waits a request timeout"
        );
        assert!(requests(&plan.next_actions(now + timeout - ms(1))).is_empty());
        now += timeout;
        let reqs = requests(&plan.next_actions(now));
        assert!(!reqs.is_empty() && reqs.len() <= 2, "{reqs:?}");
        assert!(
            reqs.iter()
                .all(|&(p, c)| p == 99 && plan.site().is_some_and(|s| s.owns_as_backstop(c)))
        );
        if reqs.iter().any(|&(_, c)| c == orphan) {
            plan.assert_consistent();
            return;
        }
        for (p, c) in reqs {
            done(&mut plan, p, c, now);
        }
    }
    panic!("chunk {orphan} never asked for");
}

#[test]
fn when_the_owner_of_a_chunk_leaves_another_local_node_takes_it() {
    let chunks = 32;
    let config = PlanConfig {
        max_remote_in_flight: 64,
        site_remote_in_flight: 128,
        max_in_flight: 64,
        max_in_flight_per_peer: 64,
        ..config()
    };
    let mut plan = site_plan(1, &[2], 9, chunks, config);
    let mine = requests(&plan.next_actions(T0)).len();
    assert!(
        mine > 0 && mine < chunks as usize,
        "shared with node 2: {mine}"
    );
    plan.handle(Event::PeerGone { peer: 2 }, ms(10));
    let rest = requests(&plan.next_actions(ms(10)));
    assert_eq!(
        mine + rest.len(),
        chunks as usize,
        "node 2's share is now ours"
    );
    plan.assert_consistent();
}
