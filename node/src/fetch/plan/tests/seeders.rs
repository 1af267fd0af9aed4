//! Busy peers and seeders: a "busy" answer rests a peer without a strike, and a chunk a holder
//! already gave away waits for the copy.

use std::collections::BTreeSet;

use crate::fetch::plan::peers::{BUSY_REST, BUSY_REST_MAX, BUSY_REST_MIN};

use super::*;

#[test]
fn busy_is_not_a_strike_and_rests_the_peer() {
    let config = PlanConfig {
        max_in_flight_per_peer: 1,
        ..config()
    };
    let mut plan = Plan::new(4, Bitfield::new(4), config);
    has(&mut plan, 1, Bitfield::full(4));
    let mut now = T0;
    let mut rests = Vec::new();
    for _ in 0..6 {
        let reqs = requests(&plan.next_actions(now));
        assert_eq!(reqs.len(), 1, "{now:?}: {reqs:?}");
        let (peer, chunk) = reqs[0];
        plan.handle(Event::ChunkBusy { peer, chunk }, now);
        assert!(requests(&plan.next_actions(now)).is_empty(), "resting");
        let stats = plan.peer_stats(&1).unwrap();
        assert_eq!(stats.strikes, 0);
        assert!(stats.usable);
        let until = plan.next_deadline().expect("the rest's end is a deadline");
        rests.push(until - now);
        now = until;
    }
    assert_eq!(rests[0], BUSY_REST);
    assert_eq!(rests[1], BUSY_REST * 2);
    assert_eq!(*rests.last().unwrap(), BUSY_REST_MAX);
    // A delivery ends the series.
    let reqs = requests(&plan.next_actions(now));
    done(&mut plan, reqs[0].0, reqs[0].1, now);
    let reqs = requests(&plan.next_actions(now));
    plan.handle(
        Event::ChunkBusy {
            peer: reqs[0].0,
            chunk: reqs[0].1,
        },
        now,
    );
    // The series starts over, from one typical request time (this one took no time at all).
    assert_eq!(plan.next_deadline(), Some(now + BUSY_REST_MIN));
    assert!(!plan.is_stalled());
}

fn serves(plan: &mut Plan<u32>, peer: u32, sending: Bitfield, sent: Bitfield, now: Duration) {
    plan.handle(
        Event::PeerServes {
            peer,
            sending,
            sent,
        },
        now,
    );
}

#[test]
fn a_chunk_the_seeder_already_gave_away_waits_for_the_copy() {
    let mut plan = Plan::new(6, Bitfield::new(6), config());
    has(&mut plan, 1, Bitfield::full(6));
    // The seeder is sending chunk 0 to someone and has sent chunk 1.
    serves(&mut plan, 1, bits(6, [0]), bits(6, [1]), T0);
    let reqs = requests(&plan.next_actions(T0));
    let mut chunks: Vec<u32> = reqs.iter().map(|(_, c)| *c).collect();
    chunks.sort();
    assert_eq!(chunks, vec![2, 3, 4, 5], "never-sent chunks first");
    for (peer, chunk) in reqs {
        done(&mut plan, peer, chunk, ms(100));
    }
    // Before the patience is over, the copy of chunk 1 shows up at peer 2: asked there.
    plan.handle(Event::PeerHasChunk { peer: 2, chunk: 1 }, ms(150));
    assert_eq!(requests(&plan.next_actions(ms(150))), vec![(2, 1)]);
    done(&mut plan, 2, 1, ms(250));
    // Chunk 0 waits while it is being sent, then is asked of the seeder anyway: the patience
    // is three typical request times (about 100 ms here), at least 250 ms, and a chunk still
    // being sent waits eight times that.
    assert!(requests(&plan.next_actions(ms(1_000))).is_empty());
    assert!(!plan.is_stalled());
    let deadline = plan.next_deadline().expect("the end of the wait");
    assert!((ms(2_000)..=ms(2_500)).contains(&deadline), "{deadline:?}");
    assert!(requests(&plan.next_actions(deadline - ms(1))).is_empty());
    let reqs = requests(&plan.next_actions(deadline));
    assert_eq!(reqs, vec![(1, 0)], "the wait is over");
}

#[test]
fn downloaders_that_know_each_other_ask_a_seeder_for_different_chunks() {
    // Peer 0 seeds; downloaders 1, 2 and 3 start together and know each other.
    let first = |me: u32| {
        let mut plan = Plan::new(24, Bitfield::new(24), config()).with_self(&me);
        has(&mut plan, 0, Bitfield::full(24));
        for other in [1, 2, 3].into_iter().filter(|&p| p != me) {
            has(&mut plan, other, Bitfield::new(24));
        }
        let reqs = requests(&plan.next_actions(T0));
        assert_eq!(reqs.len(), 4, "{reqs:?}");
        reqs.into_iter().map(|(_, c)| c).collect::<BTreeSet<u32>>()
    };
    let (a, b, c) = (first(1), first(2), first(3));
    assert!(
        a.is_disjoint(&b) && a.is_disjoint(&c) && b.is_disjoint(&c),
        "{a:?} {b:?} {c:?}"
    );
}

#[test]
fn an_endgame_duplicate_never_goes_to_a_holder_that_gave_the_chunk_away() {
    let mut plan = Plan::new(1, Bitfield::new(1), config());
    has(&mut plan, 1, Bitfield::full(1));
    has(&mut plan, 2, Bitfield::full(1));
    serves(&mut plan, 1, bits(1, [0]), Bitfield::new(1), T0);
    assert_eq!(requests(&plan.next_actions(T0)), vec![(2, 0)]);
    assert!(
        requests(&plan.next_actions(ms(1))).is_empty(),
        "no duplicate at peer 1"
    );
}

#[test]
fn a_holder_that_gave_the_chunk_away_is_asked_last() {
    for seed in 0..16 {
        let mut plan = Plan::new(1, Bitfield::new(1), PlanConfig { seed, ..config() });
        has(&mut plan, 1, Bitfield::full(1));
        has(&mut plan, 2, Bitfield::full(1));
        // Peer 1 already sent the chunk to someone; peer 2 did not.
        serves(&mut plan, 1, Bitfield::new(1), bits(1, [0]), T0);
        // (And no endgame duplicate at peer 1, though the chunk is the last one.)
        assert_eq!(
            requests(&plan.next_actions(T0)),
            vec![(2, 0)],
            "seed {seed}"
        );
    }
}

#[test]
fn a_seeder_is_not_asked_again_for_a_chunk_a_busy_holder_has() {
    // Seeder 1 sent chunk 0 to peer 2, which holds it now but has its one slot taken.
    let config = PlanConfig {
        max_in_flight_per_peer: 1,
        pipeline: 1,
        ..config()
    };
    let mut plan = Plan::new(3, Bitfield::new(3), config);
    has(&mut plan, 1, Bitfield::full(3));
    has(&mut plan, 2, bits(3, [0, 1]));
    serves(&mut plan, 1, Bitfield::new(3), bits(3, [0]), T0);
    // Rarest first: chunk 2 (only the seeder has it) goes to the seeder; peer 2 gets chunk 0
    // or 1.
    let reqs = requests(&plan.next_actions(T0));
    assert!(reqs.contains(&(1, 2)), "{reqs:?}");
    let (_, taken) = *reqs.iter().find(|(p, _)| *p == 2).expect("peer 2 asked");
    done(&mut plan, 1, 2, ms(10));
    // The seeder has a free slot again and the other chunk of peer 2 is missing; peer 2 is
    // still busy. Chunk 0 is not asked of the seeder that gave it away while peer 2, which did
    // not, holds it: its uplink would carry the chunk twice. Chunk 1 only peer 2 holds.
    let reqs = requests(&plan.next_actions(ms(10)));
    assert!(!reqs.contains(&(1, 0)), "{reqs:?}");
    // Long after the patience would have run out, the same: the wait is for peer 2's slot.
    assert!(!requests(&plan.next_actions(secs(5))).contains(&(1, 0)));
    // Peer 2 delivers; it is asked for what is left.
    done(&mut plan, 2, taken, secs(5));
    let left = if taken == 0 { 1 } else { 0 };
    assert_eq!(requests(&plan.next_actions(secs(5))), vec![(2, left)]);
}

#[test]
fn a_chunk_a_seeder_gave_away_waits_while_the_seeder_has_chunks_nobody_has() {
    // Seeder 1 sent chunk 0 to a node this one does not see; it still has chunks 1 to 3 for
    // no one yet. One request at a time.
    let config = PlanConfig {
        max_in_flight_per_peer: 1,
        pipeline: 1,
        ..config()
    };
    let mut plan = Plan::new(4, Bitfield::new(4), config);
    has(&mut plan, 1, Bitfield::full(4));
    serves(&mut plan, 1, Bitfield::new(4), bits(4, [0]), T0);
    let mut now = T0;
    let mut got = Vec::new();
    for _ in 0..3 {
        // However long past the patience, the seeder is asked for a chunk it has not given away.
        now += secs(5);
        let reqs = requests(&plan.next_actions(now));
        assert_eq!(reqs.len(), 1, "{reqs:?}");
        assert_ne!(reqs[0].1, 0, "{now:?}");
        done(&mut plan, 1, reqs[0].1, now);
        got.push(reqs[0].1);
    }
    got.sort();
    assert_eq!(got, vec![1, 2, 3]);
    // Nothing new is left at the seeder: the patience applies, and it is long over.
    assert_eq!(requests(&plan.next_actions(now)), vec![(1, 0)]);
}

#[test]
fn a_seeder_that_stalls_the_chunks_it_keeps_cannot_hold_a_given_away_chunk_forever() {
    // Peer 2 is hostile: it holds everything, says it gave chunk 0 away, and never delivers the
    // chunks it kept (4 to 7). Peer 1 is an honest seeder that gave chunk 0 away too and holds
    // nothing else. Chunk 0 waits while peer 2 keeps chunks for this node; those requests time
    // out, three strikes make peer 2 unusable, and then the wait is the usual one.
    let config = PlanConfig {
        request_timeout: secs(2),
        max_in_flight_per_peer: 1,
        pipeline: 1,
        ..config()
    };
    let mut plan = Plan::new(8, bits(8, [1, 2, 3]), config);
    has(&mut plan, 1, bits(8, [0]));
    has(&mut plan, 2, Bitfield::full(8));
    serves(&mut plan, 1, Bitfield::new(8), bits(8, [0]), T0);
    serves(&mut plan, 2, Bitfield::new(8), bits(8, [0]), T0);
    let mut now = T0;
    let mut asked_for_0 = None;
    for _ in 0..20 {
        now += secs(3);
        for (peer, chunk) in requests(&plan.next_actions(now)) {
            if chunk == 0 {
                asked_for_0 = Some(peer);
            } else {
                assert_eq!(peer, 2, "{chunk}");
            }
        }
        if asked_for_0.is_some() {
            break;
        }
    }
    assert!(
        !plan.peer_stats(&2).unwrap().usable,
        "the stalling seeder struck out"
    );
    assert_eq!(
        asked_for_0,
        Some(1),
        "chunk 0 is asked of the honest seeder at last"
    );
}
