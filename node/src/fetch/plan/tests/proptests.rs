//! Random events against a plan and an independent model of what it must respect: no request
//! ever breaks the invariants of the module documentation, and the same events give the same
//! actions. Its regression seeds are in `node/proptest-regressions/fetch/plan/tests/proptests.txt`.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;

#[derive(Debug, Clone)]
enum Op {
    Has {
        peer: u32,
        bits: Vec<bool>,
        wrong_len: bool,
    },
    HasChunk {
        peer: u32,
        chunk: u32,
    },
    Gone {
        peer: u32,
    },
    /// Completes the n-th outstanding request (modulo how many there are).
    Done {
        nth: usize,
    },
    /// A delivery from anyone for anything, asked or not.
    DoneAny {
        peer: u32,
        chunk: u32,
    },
    Bad {
        peer: u32,
        chunk: u32,
    },
    /// Fails the n-th outstanding request.
    Failed {
        nth: usize,
    },
    /// The n-th outstanding request is refused as busy.
    Busy {
        nth: usize,
    },
    /// A peer reports its serves.
    Serves {
        peer: u32,
        sending: Vec<bool>,
        sent: Vec<bool>,
    },
    /// Marks a peer as in another site.
    Remote {
        peer: u32,
    },
    FailedAny {
        peer: u32,
        chunk: u32,
    },
    Advance {
        ms: u64,
    },
    Window {
        from: u32,
        len: u32,
    },
    Next,
}

fn op(chunks: u32) -> impl Strategy<Value = Op> {
    let peer = 0u32..5;
    let chunk = 0..chunks + 2;
    prop_oneof![
        2 => (peer.clone(), prop::collection::vec(any::<bool>(), chunks as usize), prop::bool::weighted(0.1))
            .prop_map(|(peer, bits, wrong_len)| Op::Has { peer, bits, wrong_len }),
        2 => (peer.clone(), chunk.clone()).prop_map(|(peer, chunk)| Op::HasChunk { peer, chunk }),
        1 => peer.clone().prop_map(|peer| Op::Gone { peer }),
        4 => any::<usize>().prop_map(|nth| Op::Done { nth }),
        1 => (peer.clone(), chunk.clone()).prop_map(|(peer, chunk)| Op::DoneAny { peer, chunk }),
        1 => (peer.clone(), chunk.clone()).prop_map(|(peer, chunk)| Op::Bad { peer, chunk }),
        2 => any::<usize>().prop_map(|nth| Op::Failed { nth }),
        1 => (peer.clone(), chunk.clone()).prop_map(|(peer, chunk)| Op::FailedAny { peer, chunk }),
        2 => (0u64..8_000).prop_map(|ms| Op::Advance { ms }),
        1 => (0..chunks + 2, 0u32..6).prop_map(|(from, len)| Op::Window { from, len }),
        1 => peer.clone().prop_map(|peer| Op::Remote { peer }),
        1 => any::<usize>().prop_map(|nth| Op::Busy { nth }),
        1 => (
            peer.clone(),
            prop::collection::vec(any::<bool>(), chunks as usize),
            prop::collection::vec(any::<bool>(), chunks as usize),
        )
            .prop_map(|(peer, sending, sent)| Op::Serves { peer, sending, sent }),
        4 => Just(Op::Next),
    ]
}

fn any_config() -> impl Strategy<Value = PlanConfig> {
    (
        0usize..4,
        0usize..12,
        1u64..6,
        0usize..4,
        0u32..4,
        (0usize..3, 0usize..5),
        any::<u64>(),
        (0u64..3_000, 0usize..8, prop_oneof![0u32..6, Just(u32::MAX)]),
    )
        .prop_map(
            |(
                per_peer,
                total,
                timeout,
                duplicates,
                strikes,
                (remote, site),
                seed,
                (patience, pipeline, block),
            )| {
                PlanConfig {
                    max_in_flight_per_peer: per_peer,
                    max_in_flight: total,
                    pipeline,
                    request_timeout: secs(timeout),
                    endgame_duplicates: duplicates,
                    max_strikes: strikes,
                    max_remote_in_flight: remote,
                    site_remote_in_flight: site,
                    serve_patience: ms(patience),
                    block_chunks: block,
                    seed,
                }
            },
        )
}

/// What the plan must respect, kept independently of it.
#[derive(Default)]
struct Model {
    held: BTreeSet<u32>,
    banned: BTreeSet<u32>,
    bans_seen: BTreeSet<u32>,
    connected: BTreeSet<u32>,
    have: BTreeMap<u32, BTreeSet<u32>>,
    in_flight: BTreeSet<(u32, u32)>,
}

/// Runs `ops` against a plan and the model, checking every action; returns every action.
fn check(
    chunks: u32,
    held: &[bool],
    config: PlanConfig,
    ops: &[Op],
) -> Result<Vec<Action<u32>>, TestCaseError> {
    let held = bits(
        chunks,
        (0..chunks).filter(|&c| held.get(c as usize) == Some(&true)),
    );
    let mut plan = Plan::new(chunks, held.clone(), config);
    if plan.config().seed & 1 == 1 {
        // Half the cases know who they are, so that sites have gateways and owners (node 9
        // is none of the peers 0 to 4).
        plan = plan.with_self(&9);
    }
    let config = plan.config().clone();
    let mut remote_before_marking = false;
    let mut model = Model {
        held: held.iter_ones().collect(),
        ..Model::default()
    };
    let mut now = T0;
    let mut log = Vec::new();
    let ops = ops.iter().chain(std::iter::once(&Op::Next));
    for op in ops {
        plan.assert_consistent();
        match op.clone() {
            Op::Has {
                peer,
                bits: b,
                wrong_len,
            } => {
                let have = if wrong_len {
                    Bitfield::full(chunks + 1)
                } else {
                    bits(chunks, (0..chunks).filter(|&c| b[c as usize]))
                };
                if !model.banned.contains(&peer) {
                    model.connected.insert(peer);
                    let ones = if wrong_len {
                        BTreeSet::new()
                    } else {
                        have.iter_ones().collect()
                    };
                    model.have.insert(peer, ones);
                }
                plan.handle(Event::PeerHas { peer, have }, now);
            }
            Op::HasChunk { peer, chunk } => {
                if !model.banned.contains(&peer) && chunk < chunks {
                    model.connected.insert(peer);
                    model.have.entry(peer).or_default().insert(chunk);
                }
                plan.handle(Event::PeerHasChunk { peer, chunk }, now);
            }
            Op::Gone { peer } => {
                model.connected.remove(&peer);
                model.have.remove(&peer);
                model.in_flight.retain(|(p, _)| *p != peer);
                plan.handle(Event::PeerGone { peer }, now);
            }
            Op::Done { nth } | Op::Failed { nth } | Op::Busy { nth } => {
                if model.in_flight.is_empty() {
                    continue;
                }
                let (peer, chunk) = *model
                    .in_flight
                    .iter()
                    .nth(nth % model.in_flight.len())
                    .unwrap();
                model.in_flight.remove(&(peer, chunk));
                if matches!(op, Op::Done { .. }) {
                    model.held.insert(chunk);
                    plan.handle(
                        Event::ChunkDone {
                            peer,
                            chunk,
                            bytes: CHUNK,
                        },
                        now,
                    );
                } else if matches!(op, Op::Busy { .. }) {
                    let strikes = plan.peer_stats(&peer).map(|s| s.strikes);
                    plan.handle(Event::ChunkBusy { peer, chunk }, now);
                    prop_assert_eq!(plan.peer_stats(&peer).map(|s| s.strikes), strikes);
                } else {
                    plan.handle(Event::ChunkFailed { peer, chunk }, now);
                }
            }
            Op::Serves {
                peer,
                sending,
                sent,
            } => {
                let b = |v: &[bool]| bits(chunks, (0..chunks).filter(|&c| v[c as usize]));
                plan.handle(
                    Event::PeerServes {
                        peer,
                        sending: b(&sending),
                        sent: b(&sent),
                    },
                    now,
                );
            }
            Op::DoneAny { peer, chunk } => {
                if chunk < chunks {
                    model.held.insert(chunk);
                }
                model.in_flight.remove(&(peer, chunk));
                plan.handle(
                    Event::ChunkDone {
                        peer,
                        chunk,
                        bytes: CHUNK,
                    },
                    now,
                );
            }
            Op::Remote { peer } => {
                remote_before_marking |= model.in_flight.iter().any(|(p, _)| *p == peer);
                plan.handle(Event::PeerRemote { peer }, now);
            }
            Op::FailedAny { peer, chunk } => {
                model.in_flight.remove(&(peer, chunk));
                plan.handle(Event::ChunkFailed { peer, chunk }, now);
            }
            Op::Bad { peer, chunk } => {
                model.banned.insert(peer);
                model.connected.remove(&peer);
                model.have.remove(&peer);
                model.in_flight.retain(|(p, _)| *p != peer);
                plan.handle(Event::ChunkBad { peer, chunk }, now);
            }
            Op::Advance { ms: step } => now += ms(step),
            Op::Window { from, len } => plan.set_priority_window(from, len),
            Op::Next => {
                for action in plan.next_actions(now) {
                    match &action {
                        Action::Ban { peer } => {
                            prop_assert!(model.banned.contains(peer));
                            prop_assert!(model.bans_seen.insert(*peer), "banned twice");
                        }
                        Action::Cancel { peer, chunk } => {
                            prop_assert!(
                                model.in_flight.remove(&(*peer, *chunk)),
                                "cancel of nothing: {:?}",
                                action
                            );
                        }
                        Action::Request { peer, chunk } => {
                            prop_assert!(*chunk < chunks);
                            prop_assert!(!model.held.contains(chunk), "held: {:?}", action);
                            prop_assert!(!model.banned.contains(peer), "banned: {:?}", action);
                            prop_assert!(model.connected.contains(peer), "gone: {:?}", action);
                            prop_assert!(
                                model.have.get(peer).is_some_and(|h| h.contains(chunk)),
                                "lacks: {:?}",
                                action
                            );
                            prop_assert!(
                                model.in_flight.insert((*peer, *chunk)),
                                "asked twice: {:?}",
                                action
                            );
                        }
                    }
                    log.push(action);
                }
                prop_assert_eq!(plan.in_flight(), model.in_flight.len());
                prop_assert!(plan.in_flight() <= config.max_in_flight);
                for peer in 0..5 {
                    let outstanding = model.in_flight.iter().filter(|(p, _)| *p == peer).count();
                    let reported = plan.peer_stats(&peer).map_or(0, |s| s.in_flight);
                    prop_assert_eq!(outstanding, reported);
                    prop_assert!(reported <= 4 * config.max_in_flight_per_peer);
                }
                let remote: usize = (0..5)
                    .filter_map(|p| plan.peer_stats(&p))
                    .filter(|s| s.remote)
                    .map(|s| s.in_flight)
                    .sum();
                // Requests sent before a peer was marked remote stay, so only new ones count.
                prop_assert!(
                    remote <= config.max_remote_in_flight || remote_before_marking,
                    "{remote} remote requests"
                );
                prop_assert_eq!(
                    plan.held().iter_ones().collect::<BTreeSet<_>>(),
                    model.held.clone()
                );
                // Liveness: right after `next_actions`, an idle incomplete plan is stalled, or
                // has a deadline to wake at (a busy peer resting, a chunk waiting for a copy),
                // or leaves a chunk to another downloader of its site.
                let idle = !plan.is_complete() && plan.in_flight() == 0;
                if plan.is_stalled() {
                    prop_assert!(idle);
                } else if idle {
                    let sites = (0..5).any(|p| plan.peer_stats(&p).is_some_and(|s| s.remote));
                    prop_assert!(
                        plan.next_deadline().is_some() || sites,
                        "idle, not stalled, nothing to wait for"
                    );
                }
                if let Some(deadline) = plan.next_deadline() {
                    prop_assert!(deadline > now);
                }
            }
        }
    }
    plan.assert_consistent();
    Ok(log)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn random_events_never_break_the_invariants(
        (chunks, held, config, ops) in (1u32..24).prop_flat_map(|chunks| (
            Just(chunks),
            prop::collection::vec(prop::bool::weighted(0.2), chunks as usize),
            any_config(),
            prop::collection::vec(op(chunks), 0..200),
        ))
    ) {
        let first = check(chunks, &held, config.clone(), &ops)?;
        let again = check(chunks, &held, config, &ops)?;
        prop_assert_eq!(first, again, "same seed and events, same actions");
    }
}
