//! A small discrete-event run of one plan against peers that serve at different speeds, stay
//! silent or lie: it completes, and replays exactly.

use std::collections::BTreeMap;

use super::*;

#[derive(Clone, Copy, Debug)]
enum Behaviour {
    Serves { per_chunk: Duration },
    Silent,
    Lies { per_chunk: Duration },
}

struct SimRun {
    log: Vec<(Duration, Action<u32>)>,
    plan: Plan<u32>,
    finished: Duration,
}

/// A discrete-event run: every peer has the whole blob and serves requests one after another
/// at its own speed (a cancelled request is still served: its late copy must be harmless).
fn simulate(chunks: u32, peers: &[Behaviour], config: PlanConfig) -> SimRun {
    let per_peer_cap = config.max_in_flight_per_peer * 4;
    let total_cap = config.max_in_flight;
    let mut plan = Plan::new(chunks, Bitfield::new(chunks), config);
    for peer in 0..peers.len() as u32 {
        has(&mut plan, peer, Bitfield::full(chunks));
    }
    let mut now = T0;
    let mut free_at = vec![T0; peers.len()];
    let mut deliveries: BTreeMap<(Duration, u64), (u32, u32)> = BTreeMap::new();
    let mut seq = 0u64;
    let mut log = Vec::new();
    for _ in 0..100_000 {
        for action in plan.next_actions(now) {
            log.push((now, action.clone()));
            match action {
                Action::Request { peer, chunk } => match peers[peer as usize] {
                    Behaviour::Serves { per_chunk } | Behaviour::Lies { per_chunk } => {
                        let end = free_at[peer as usize].max(now) + per_chunk;
                        free_at[peer as usize] = end;
                        deliveries.insert((end, seq), (peer, chunk));
                        seq += 1;
                    }
                    Behaviour::Silent => {}
                },
                Action::Cancel { .. } => {}
                Action::Ban { peer } => deliveries.retain(|_, (p, _)| *p != peer),
            }
        }
        assert!(plan.in_flight() <= total_cap);
        for peer in 0..peers.len() as u32 {
            assert!(plan.peer_stats(&peer).unwrap().in_flight <= per_peer_cap);
        }
        if plan.is_complete() || plan.is_stalled() {
            break;
        }
        let next_delivery = deliveries.keys().next().map(|(t, _)| *t);
        now = match (next_delivery, plan.next_deadline()) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b).expect("something is pending"),
        };
        while let Some(entry) = deliveries.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let (peer, chunk) = entry.remove();
            let event = match peers[peer as usize] {
                Behaviour::Lies { .. } => Event::ChunkBad { peer, chunk },
                _ => Event::ChunkDone {
                    peer,
                    chunk,
                    bytes: CHUNK,
                },
            };
            plan.handle(event, now);
        }
    }
    SimRun {
        log,
        plan,
        finished: now,
    }
}

fn mixed_fleet() -> Vec<Behaviour> {
    vec![
        Behaviour::Serves { per_chunk: ms(50) },
        Behaviour::Serves { per_chunk: ms(200) },
        Behaviour::Serves { per_chunk: secs(1) },
        Behaviour::Silent,
        Behaviour::Lies { per_chunk: ms(100) },
    ]
}

#[test]
fn mini_simulation_completes_despite_slow_silent_and_lying_peers() {
    let run = simulate(64, &mixed_fleet(), config());
    let plan = &run.plan;
    assert!(plan.is_complete(), "stalled at {:?}", run.finished);
    assert_eq!(plan.in_flight(), 0);
    let stats = |p: u32| plan.peer_stats(&p).unwrap();
    assert!(stats(4).banned);
    let bans = run
        .log
        .iter()
        .filter(|(_, a)| matches!(a, Action::Ban { .. }))
        .count();
    assert_eq!(bans, 1);
    assert_eq!(stats(3).bytes_delivered, 0);
    assert!(stats(0).bytes_delivered > stats(1).bytes_delivered);
    assert!(stats(1).bytes_delivered > stats(2).bytes_delivered);
    // The silent peer's chunks are rescued by endgame, not left to time out at 20 s.
    assert!(run.finished < secs(20), "finished at {:?}", run.finished);
    // Ideal: 64 chunks at 20 + 5 + 1 chunks/s is about 2.5 s.
    assert!(run.finished < secs(5), "finished at {:?}", run.finished);
}

#[test]
fn mini_simulation_with_only_a_silent_peer_left_strikes_it_out() {
    let peers = [Behaviour::Silent, Behaviour::Lies { per_chunk: ms(10) }];
    let run = simulate(8, &peers, config());
    assert!(run.plan.is_stalled());
    let silent = run.plan.peer_stats(&0).unwrap();
    assert_eq!(silent.strikes, 3);
    assert!(!silent.usable);
    assert_eq!(run.finished, secs(60));
}

#[test]
fn same_seed_same_events_same_actions() {
    let a = simulate(64, &mixed_fleet(), config());
    let b = simulate(64, &mixed_fleet(), config());
    assert_eq!(a.log, b.log);
    assert_eq!(a.finished, b.finished);
    let c = simulate(
        64,
        &mixed_fleet(),
        PlanConfig {
            seed: 8,
            ..config()
        },
    );
    assert_ne!(a.log, c.log, "the seed breaks ties differently");
    assert!(c.plan.is_complete());
}
