//! How many requests go to each peer: the caps, the pipeline spread over peers, and more for
//! faster ones.

use super::*;

#[test]
fn caps_per_peer_and_in_total_hold() {
    let capped = PlanConfig {
        max_in_flight_per_peer: 2,
        max_in_flight: 5,
        ..config()
    };
    let mut plan = Plan::new(100, Bitfield::new(100), capped);
    for peer in 1..=3 {
        has(&mut plan, peer, Bitfield::full(100));
    }
    let reqs = requests(&plan.next_actions(T0));
    assert_eq!(reqs.len(), 5);
    assert_eq!(plan.in_flight(), 5);
    for peer in 1..=3 {
        assert!(count_for(&reqs, peer) <= 2, "{reqs:?}");
        assert!(plan.peer_stats(&peer).unwrap().in_flight <= 2);
    }
    assert!(plan.next_actions(ms(1)).is_empty(), "full: nothing more");
    let (peer, chunk) = reqs[0];
    done(&mut plan, peer, chunk, secs(1));
    assert_eq!(requests(&plan.next_actions(secs(1))).len(), 1);
    assert_eq!(plan.in_flight(), 5);

    // With room in total, the per-peer cap is what binds: 3 peers x 2.
    let config = PlanConfig {
        max_in_flight_per_peer: 2,
        ..config()
    };
    let mut plan = Plan::new(100, Bitfield::new(100), config);
    for peer in 1..=3 {
        has(&mut plan, peer, Bitfield::full(100));
    }
    let reqs = requests(&plan.next_actions(T0));
    assert_eq!(reqs.len(), 6);
    for peer in 1..=3 {
        assert_eq!(count_for(&reqs, peer), 2);
    }
}

#[test]
fn the_pipeline_is_spread_one_request_per_peer_when_there_are_many() {
    // The default: 4 requests kept outstanding in all before any peer gets a second one.
    let config = PlanConfig {
        seed: 7,
        ..PlanConfig::default()
    };
    let per_peer = |peers: u32| {
        let mut plan = Plan::new(100, Bitfield::new(100), config.clone());
        for peer in 1..=peers {
            has(&mut plan, peer, Bitfield::full(100));
        }
        let reqs = requests(&plan.next_actions(T0));
        let counts: Vec<usize> = (1..=peers).map(|p| count_for(&reqs, p)).collect();
        for p in 1..=peers {
            assert_eq!(
                plan.peer_stats(&p).unwrap().in_flight_limit,
                counts[p as usize - 1]
            );
        }
        counts
    };
    // A lone source is asked for four chunks at once, so it never idles between them.
    assert_eq!(per_peer(1), vec![4]);
    assert_eq!(per_peer(2), vec![2, 2]);
    assert_eq!(per_peer(3), vec![2, 2, 2]);
    // Many sources: one each, so each chunk comes whole at a peer's full share and is passed
    // on sooner, instead of several crawling in at once.
    assert_eq!(per_peer(8), vec![1; 8]);

    // Peers that leave give the others their share back.
    let mut plan = Plan::new(100, Bitfield::new(100), config.clone());
    for peer in 1..=8 {
        has(&mut plan, peer, Bitfield::full(100));
    }
    assert_eq!(requests(&plan.next_actions(T0)).len(), 8);
    for peer in 2..=8 {
        plan.handle(Event::PeerGone { peer }, ms(1));
    }
    let reqs = requests(&plan.next_actions(ms(1)));
    assert_eq!(count_for(&reqs, 1), 3, "{reqs:?}");
    assert_eq!(plan.peer_stats(&1).unwrap().in_flight, 4);

    // Never more than the per-peer cap, whatever the pipeline.
    let capped = PlanConfig {
        max_in_flight_per_peer: 2,
        pipeline: 10,
        ..config
    };
    let mut plan = Plan::new(100, Bitfield::new(100), capped);
    has(&mut plan, 1, Bitfield::full(100));
    assert_eq!(requests(&plan.next_actions(T0)).len(), 2);
}

#[test]
fn a_faster_peer_gets_more_requests() {
    let mut plan = Plan::new(200, Bitfield::new(200), config());
    has(&mut plan, 1, Bitfield::full(200));
    has(&mut plan, 2, Bitfield::full(200));
    let reqs = requests(&plan.next_actions(T0));
    assert_eq!(count_for(&reqs, 1), 4);
    assert_eq!(count_for(&reqs, 2), 4);
    // In the first second peer 1 delivers four chunks, peer 2 one.
    for &(peer, chunk) in reqs.iter().filter(|(p, _)| *p == 1) {
        done(&mut plan, peer, chunk, secs(1));
    }
    let slow = reqs.iter().find(|(p, _)| *p == 2).unwrap().1;
    done(&mut plan, 2, slow, secs(1));

    let fast = plan.peer_stats(&1).unwrap();
    let slow = plan.peer_stats(&2).unwrap();
    assert_eq!(fast.rate_bytes_per_sec, Some(4 * CHUNK));
    assert_eq!(slow.rate_bytes_per_sec, Some(CHUNK));
    assert_eq!(fast.in_flight_limit, 16, "4 x the median, at the clamp");
    assert_eq!(slow.in_flight_limit, 4);

    let reqs = requests(&plan.next_actions(secs(1)));
    assert_eq!(count_for(&reqs, 1), 16);
    assert_eq!(count_for(&reqs, 2), 1);
    assert_eq!(plan.peer_stats(&1).unwrap().in_flight, 16);
    assert_eq!(plan.peer_stats(&2).unwrap().in_flight, 4);
}
