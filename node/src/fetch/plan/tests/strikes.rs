//! Bans, strikes, timeouts and departures: what makes a peer unusable, for how long, and what
//! happens to its requests.

use super::*;

#[test]
fn a_bad_chunk_bans_the_peer_and_goes_elsewhere() {
    let config = PlanConfig {
        endgame_duplicates: 1,
        ..config()
    };
    let mut plan = Plan::new(1, Bitfield::new(1), config);
    has(&mut plan, 1, Bitfield::full(1));
    has(&mut plan, 2, Bitfield::full(1));
    let reqs = requests(&plan.next_actions(T0));
    assert_eq!(reqs.len(), 1);
    let liar = reqs[0].0;
    let honest = 3 - liar;
    plan.handle(
        Event::ChunkBad {
            peer: liar,
            chunk: 0,
        },
        secs(1),
    );
    assert_eq!(
        plan.next_actions(secs(1)),
        vec![
            Action::Ban { peer: liar },
            Action::Request {
                peer: honest,
                chunk: 0
            }
        ]
    );
    // The liar reconnects and advertises again, and sends more bad data: no second ban, and it
    // is never asked again, even when the honest peer fails.
    plan.handle(Event::PeerGone { peer: liar }, secs(2));
    has(&mut plan, liar, Bitfield::full(1));
    plan.handle(
        Event::PeerHasChunk {
            peer: liar,
            chunk: 0,
        },
        secs(2),
    );
    plan.handle(
        Event::ChunkBad {
            peer: liar,
            chunk: 0,
        },
        secs(2),
    );
    plan.handle(
        Event::ChunkFailed {
            peer: honest,
            chunk: 0,
        },
        secs(2),
    );
    assert_eq!(
        plan.next_actions(secs(2)),
        vec![Action::Request {
            peer: honest,
            chunk: 0
        }]
    );
    let stats = plan.peer_stats(&liar).unwrap();
    assert!(stats.banned && !stats.usable);
    assert_eq!(stats.in_flight_limit, 0);
    done(&mut plan, honest, 0, secs(3));
    assert!(plan.is_complete());
}

#[test]
fn stalled_when_the_only_holder_is_banned() {
    let mut plan = Plan::new(2, Bitfield::new(2), config());
    assert!(plan.is_stalled(), "no peer yet");
    has(&mut plan, 1, Bitfield::full(2));
    assert!(!plan.is_stalled());
    assert_eq!(requests(&plan.next_actions(T0)).len(), 2);
    plan.handle(Event::ChunkBad { peer: 1, chunk: 0 }, secs(1));
    assert_eq!(plan.next_actions(secs(1)), vec![Action::Ban { peer: 1 }]);
    assert_eq!(plan.in_flight(), 0);
    assert!(plan.is_stalled());
    assert_eq!(plan.next_deadline(), None);
    // A new provider un-stalls it.
    has(&mut plan, 2, bits(2, [1]));
    assert!(!plan.is_stalled());
    assert_eq!(
        plan.next_actions(secs(2)),
        vec![Action::Request { peer: 2, chunk: 1 }]
    );
}

#[test]
fn a_slow_peer_times_out_gets_a_strike_and_the_chunk_goes_elsewhere() {
    let config = PlanConfig {
        endgame_duplicates: 1,
        ..config()
    };
    let mut plan = Plan::new(1, Bitfield::new(1), config);
    has(&mut plan, 1, Bitfield::full(1));
    has(&mut plan, 2, Bitfield::full(1));
    let reqs = requests(&plan.next_actions(T0));
    let slow = reqs[0].0;
    let other = 3 - slow;
    assert_eq!(plan.next_deadline(), Some(secs(20)));
    assert!(plan.next_actions(secs(19)).is_empty());
    assert_eq!(
        plan.next_actions(secs(20)),
        vec![
            Action::Cancel {
                peer: slow,
                chunk: 0
            },
            Action::Request {
                peer: other,
                chunk: 0
            }
        ]
    );
    let stats = plan.peer_stats(&slow).unwrap();
    assert_eq!(stats.strikes, 1);
    assert!(stats.usable);
    assert_eq!(stats.rate_bytes_per_sec, Some(0));
    assert_eq!(plan.next_deadline(), Some(secs(40)));
    // Its failure reply arriving after the timeout is not a second strike.
    plan.handle(
        Event::ChunkFailed {
            peer: slow,
            chunk: 0,
        },
        secs(21),
    );
    assert_eq!(plan.peer_stats(&slow).unwrap().strikes, 1);
    done(&mut plan, other, 0, secs(22));
    assert!(plan.is_complete());
}

#[test]
fn requests_expiring_together_are_one_strike() {
    let mut plan = Plan::new(10, Bitfield::new(10), config());
    has(&mut plan, 1, Bitfield::full(10));
    assert_eq!(requests(&plan.next_actions(T0)).len(), 4);
    let actions = plan.next_actions(secs(20));
    let cancels = actions
        .iter()
        .filter(|a| matches!(a, Action::Cancel { .. }))
        .count();
    assert_eq!(cancels, 4);
    assert_eq!(plan.peer_stats(&1).unwrap().strikes, 1);
    // Asked again (it is the only holder), for other chunks first.
    let reqs = requests(&actions);
    assert_eq!(reqs.len(), 4);
}

#[test]
fn strikes_in_a_row_make_a_peer_unusable_until_it_reconnects() {
    let config = PlanConfig {
        max_in_flight_per_peer: 2,
        ..config()
    };
    let mut plan = Plan::new(10, Bitfield::new(10), config);
    has(&mut plan, 1, Bitfield::full(10));
    let mut reqs = requests(&plan.next_actions(T0));
    // A success between failures clears the count.
    let (_, c) = reqs.remove(0);
    plan.handle(Event::ChunkFailed { peer: 1, chunk: c }, secs(1));
    assert_eq!(plan.peer_stats(&1).unwrap().strikes, 1);
    let (_, c) = reqs.remove(0);
    done(&mut plan, 1, c, secs(1));
    assert_eq!(plan.peer_stats(&1).unwrap().strikes, 0);
    // Three in a row.
    for strike in 1..=3 {
        let reqs = requests(&plan.next_actions(secs(strike)));
        assert!(!reqs.is_empty());
        let in_flight: Vec<u32> = (0..10)
            .filter(|&c| {
                plan.peers
                    .get(&1)
                    .is_some_and(|s| s.in_flight.contains_key(&c))
            })
            .collect();
        plan.handle(
            Event::ChunkFailed {
                peer: 1,
                chunk: in_flight[0],
            },
            secs(strike),
        );
    }
    let stats = plan.peer_stats(&1).unwrap();
    assert_eq!(stats.strikes, 3);
    assert!(!stats.usable && !stats.banned && stats.connected);
    // Its other request is cancelled; nothing more is asked of it.
    let actions = plan.next_actions(secs(4));
    assert!(
        actions
            .iter()
            .all(|a| matches!(a, Action::Cancel { peer: 1, .. }))
    );
    assert_eq!(actions.len(), 1);
    assert_eq!(plan.in_flight(), 0);
    assert!(plan.is_stalled());
    // A refreshed bitfield without reconnecting does not revive it; a reconnect does.
    has(&mut plan, 1, Bitfield::full(10));
    assert!(plan.next_actions(secs(5)).is_empty());
    plan.handle(Event::PeerGone { peer: 1 }, secs(6));
    has(&mut plan, 1, Bitfield::full(10));
    assert_eq!(plan.peer_stats(&1).unwrap().strikes, 0);
    assert_eq!(requests(&plan.next_actions(secs(6))).len(), 2);
}

#[test]
fn a_cancel_not_yet_returned_is_dropped_when_its_request_ends() {
    // Found by the proptest: the driver must not be told to cancel a request it has just
    // seen complete.
    let config = PlanConfig {
        max_in_flight_per_peer: 2,
        max_strikes: 1,
        ..config()
    };
    let mut plan = Plan::new(2, Bitfield::new(2), config);
    has(&mut plan, 1, Bitfield::full(2));
    assert_eq!(requests(&plan.next_actions(T0)).len(), 2);
    // The failure strikes the peer out, which cancels its other request...
    plan.handle(Event::ChunkFailed { peer: 1, chunk: 0 }, secs(1));
    // ...but that request completes before the driver asks for actions.
    done(&mut plan, 1, 1, secs(1));
    assert!(plan.next_actions(secs(1)).is_empty());
    assert!(plan.held().get(1));
    assert!(plan.is_stalled());
}

#[test]
fn a_departed_peers_chunks_are_replanned() {
    let config = PlanConfig {
        max_in_flight_per_peer: 1,
        endgame_duplicates: 1,
        ..config()
    };
    let mut plan = Plan::new(4, Bitfield::new(4), config);
    has(&mut plan, 1, Bitfield::full(4));
    has(&mut plan, 2, Bitfield::full(4));
    let reqs = requests(&plan.next_actions(T0));
    assert_eq!(reqs.len(), 2);
    let lost = reqs.iter().find(|(p, _)| *p == 1).unwrap().1;
    plan.handle(Event::PeerGone { peer: 1 }, secs(1));
    assert!(
        plan.next_actions(secs(1)).is_empty(),
        "no cancel to a peer that is gone"
    );
    assert_eq!(plan.in_flight(), 1);
    assert!(!plan.peer_stats(&1).unwrap().connected);
    let mut asked = vec![];
    let mut now = secs(1);
    let mut outstanding = reqs.iter().find(|(p, _)| *p == 2).unwrap().1;
    while !plan.is_complete() {
        now += secs(1);
        done(&mut plan, 2, outstanding, now);
        let reqs = requests(&plan.next_actions(now));
        assert!(reqs.iter().all(|(p, _)| *p == 2), "{reqs:?}");
        if let Some(&(_, c)) = reqs.first() {
            asked.push(c);
            outstanding = c;
        }
    }
    assert!(asked.contains(&lost));
}
