//! Endgame: duplicates for the tail, only once every missing chunk is in flight, and the
//! loser's cancel.

use super::*;

#[test]
fn endgame_duplicates_the_tail_and_cancels_the_loser() {
    let mut plan = Plan::new(3, Bitfield::new(3), config());
    has(&mut plan, 1, Bitfield::full(3));
    has(&mut plan, 2, Bitfield::full(3));
    let reqs = requests(&plan.next_actions(T0));
    assert_eq!(reqs.len(), 6, "every chunk from both peers: {reqs:?}");
    for chunk in 0..3 {
        let mut from: Vec<u32> = reqs
            .iter()
            .filter(|(_, c)| *c == chunk)
            .map(|(p, _)| *p)
            .collect();
        from.sort();
        assert_eq!(from, vec![1, 2]);
    }
    done(&mut plan, 2, 0, secs(1));
    assert_eq!(
        plan.next_actions(secs(1)),
        vec![Action::Cancel { peer: 1, chunk: 0 }]
    );
    assert_eq!(plan.in_flight(), 4);
    // The loser's copy arriving anyway changes nothing.
    done(&mut plan, 1, 0, secs(2));
    assert!(plan.next_actions(secs(2)).is_empty());
    assert_eq!(plan.in_flight(), 4);
    assert_eq!(plan.peer_stats(&1).unwrap().bytes_delivered, CHUNK);
    done(&mut plan, 1, 1, secs(3));
    done(&mut plan, 1, 2, secs(3));
    let mut cancels = plan.next_actions(secs(3));
    cancels.sort_by_key(|a| format!("{a:?}"));
    assert_eq!(
        cancels,
        vec![
            Action::Cancel { peer: 2, chunk: 1 },
            Action::Cancel { peer: 2, chunk: 2 }
        ]
    );
    assert!(plan.is_complete());
    assert_eq!(plan.in_flight(), 0);
}

#[test]
fn endgame_waits_for_the_tail_and_can_be_turned_off() {
    let mut plan = Plan::new(100, Bitfield::new(100), config());
    has(&mut plan, 1, Bitfield::full(100));
    has(&mut plan, 2, Bitfield::full(100));
    let reqs = requests(&plan.next_actions(T0));
    let mut chunks: Vec<u32> = reqs.iter().map(|(_, c)| *c).collect();
    chunks.sort();
    chunks.dedup();
    assert_eq!(chunks.len(), reqs.len(), "no duplicates before the tail");

    let config = PlanConfig {
        endgame_duplicates: 1,
        ..config()
    };
    let mut plan = Plan::new(3, Bitfield::new(3), config);
    has(&mut plan, 1, Bitfield::full(3));
    has(&mut plan, 2, Bitfield::full(3));
    assert_eq!(requests(&plan.next_actions(T0)).len(), 3);
}

#[test]
fn endgame_does_not_start_while_some_missing_chunk_is_nowhere() {
    // Mid-rollout: the two peers hold a few chunks, all of them in flight, and slots are
    // free. Duplicating those would spend uplinks on copies nobody needs.
    let mut plan = Plan::new(20, Bitfield::new(20), config());
    has(&mut plan, 1, bits(20, 0..3));
    has(&mut plan, 2, bits(20, 0..3));
    let reqs = requests(&plan.next_actions(T0));
    assert_eq!(reqs.len(), 3, "{reqs:?}");
    assert!(requests(&plan.next_actions(ms(10))).is_empty());
    // Once every missing chunk is in flight, endgame duplicates the tail.
    has(&mut plan, 1, Bitfield::full(20));
    has(&mut plan, 2, Bitfield::full(20));
    let reqs = requests(&plan.next_actions(ms(20)));
    assert_eq!(
        reqs.len(),
        8 - 3,
        "the free slots take new chunks: {reqs:?}"
    );
    assert!(
        requests(&plan.next_actions(ms(30))).is_empty(),
        "12 chunks not in flight"
    );
    let mut plan = Plan::new(4, Bitfield::new(4), config());
    has(&mut plan, 1, Bitfield::full(4));
    has(&mut plan, 2, Bitfield::full(4));
    let reqs = requests(&plan.next_actions(T0));
    assert_eq!(reqs.len(), 8, "4 chunks, each asked of both: {reqs:?}");
}
