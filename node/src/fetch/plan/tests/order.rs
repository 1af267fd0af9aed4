//! The order chunks are asked in: rarest first, blocks in index order, the priority window,
//! and never a chunk already held.

use std::collections::BTreeSet;

use super::*;

/// The order a plan asks for 64 chunks, one request at a time, from peer 1 holding all of
/// them and peer 2 holding `0..48`.
fn request_order(config: PlanConfig) -> Vec<u32> {
    let config = PlanConfig {
        max_in_flight: 1,
        ..config
    };
    let mut plan = Plan::new(64, Bitfield::new(64), config);
    has(&mut plan, 1, Bitfield::full(64));
    has(&mut plan, 2, bits(64, 0..48));
    let order = one_request_at_a_time(&mut plan);
    assert!(plan.is_complete());
    order
}

/// Drives `plan` to the end one request at a time (each answered at once by its peer), and
/// returns the chunks in the order they were asked for.
fn one_request_at_a_time(plan: &mut Plan<u32>) -> Vec<u32> {
    let mut order = Vec::new();
    for step in 0..u64::from(plan.chunk_count()) {
        let reqs = requests(&plan.next_actions(secs(step)));
        assert_eq!(reqs.len(), 1, "step {step}: {reqs:?}");
        let (peer, chunk) = reqs[0];
        order.push(chunk);
        done(plan, peer, chunk, secs(step));
    }
    order
}

#[test]
fn equally_rare_chunks_go_block_by_block_in_index_order() {
    let order = request_order(config());
    // Rarity first: 48..64 only peer 1 has.
    assert!(
        order[..16].iter().all(|c| (48..64).contains(c)),
        "{order:?}"
    );
    // Then the equally rare rest a block of 16 at a time, blocks in index order...
    for (k, block) in order[16..].chunks(16).enumerate() {
        let range = (16 * k as u32)..(16 * k as u32 + 16);
        assert!(block.iter().all(|c| range.contains(c)), "{order:?}");
    }
    // ...shuffled within a block by the seed, differently on another node.
    let sorted: Vec<u32> = (0..16).collect();
    assert_ne!(order[16..32], sorted[..]);
    let other = request_order(PlanConfig {
        seed: 8,
        ..config()
    });
    assert_ne!(order[16..32], other[16..32]);
    // One block for the whole blob: the seeded order alone, all over the blob.
    let unblocked = request_order(PlanConfig {
        block_chunks: u32::MAX,
        ..config()
    });
    assert!(unblocked[..16].iter().all(|c| (48..64).contains(c)));
    assert!(unblocked[16..32].iter().any(|c| *c >= 16), "{unblocked:?}");
}

#[test]
fn rarest_chunks_are_requested_first() {
    let config = PlanConfig {
        max_in_flight: 1,
        ..config()
    };
    let mut plan = Plan::new(12, Bitfield::new(12), config);
    // Chunks 8..12 only peer 1 has; 4..8 two peers; 0..4 all three.
    has(&mut plan, 1, Bitfield::full(12));
    has(&mut plan, 2, bits(12, 0..8));
    has(&mut plan, 3, bits(12, 0..4));
    let order = one_request_at_a_time(&mut plan);
    assert!(order[..4].iter().all(|c| (8..12).contains(c)), "{order:?}");
    assert!(order[4..8].iter().all(|c| (4..8).contains(c)), "{order:?}");
    assert!(order[8..].iter().all(|c| (0..4).contains(c)), "{order:?}");
    assert!(plan.is_complete());
    assert!(!plan.is_stalled());
}

#[test]
fn a_chunk_only_one_peer_has_goes_before_common_ones() {
    let config = PlanConfig {
        max_in_flight: 2,
        ..config()
    };
    let mut plan = Plan::new(50, Bitfield::new(50), config);
    has(&mut plan, 1, Bitfield::full(50));
    has(&mut plan, 2, bits(50, (0..50).filter(|&c| c != 37)));
    let reqs = requests(&plan.next_actions(T0));
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0], (1, 37));
    assert_eq!(reqs[1].0, 2, "the other peer takes a common chunk");
}

#[test]
fn resumed_chunks_are_never_requested() {
    let held = bits(10, [0, 2, 4, 6, 8]);
    let mut plan = Plan::new(10, held, config());
    assert_eq!(plan.missing(), 5);
    has(&mut plan, 1, Bitfield::full(10));
    has(&mut plan, 2, Bitfield::full(10));
    let mut now = T0;
    let mut asked = BTreeSet::new();
    while !plan.is_complete() {
        let reqs = requests(&plan.next_actions(now));
        for &(peer, chunk) in &reqs {
            assert_eq!(chunk % 2, 1, "asked for held chunk {chunk}");
            asked.insert(chunk);
            done(&mut plan, peer, chunk, now + ms(10));
        }
        now += secs(1);
    }
    assert_eq!(asked, [1, 3, 5, 7, 9].into_iter().collect());

    let mut plan = Plan::new(10, Bitfield::full(10), config());
    has(&mut plan, 1, Bitfield::full(10));
    assert!(plan.is_complete());
    assert!(!plan.is_stalled());
    assert!(plan.next_actions(T0).is_empty());
    // A `held` of the wrong length is cut to the blob.
    let plan: Plan<u32> = Plan::new(3, Bitfield::full(10), config());
    assert!(plan.is_complete());
    assert_eq!(plan.held().len(), 3);
}

#[test]
fn the_priority_window_goes_before_rarity() {
    let config = PlanConfig {
        max_in_flight: 1,
        ..config()
    };
    let mut plan = Plan::new(10, Bitfield::new(10), config);
    has(&mut plan, 1, Bitfield::full(10));
    has(&mut plan, 2, bits(10, 0..5));
    plan.set_priority_window(1, 3);
    let mut order = Vec::new();
    let mut now = T0;
    for _ in 0..5 {
        let reqs = requests(&plan.next_actions(now));
        let (peer, chunk) = reqs[0];
        order.push(chunk);
        done(&mut plan, peer, chunk, now);
        now += secs(1);
    }
    assert_eq!(&order[..3], &[1, 2, 3]);
    assert!(order[3..].iter().all(|c| (5..10).contains(c)), "{order:?}");
    // The reader moved back to the start: chunk 0 is next, though it is the most common.
    plan.set_priority_window(0, 1);
    assert_eq!(requests(&plan.next_actions(now))[0].1, 0);
    // An empty window, or one past the end, is none.
    plan.set_priority_window(0, 0);
    plan.set_priority_window(u32::MAX, u32::MAX);
}
