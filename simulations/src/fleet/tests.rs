//! The fleet model's parts that can be checked alone: the stream pool and the result's
//! quantiles. Whole runs are checked in `tests/small_fleet.rs`.

use super::RunResult;
use super::transfers::{pool_release, pool_take};

#[test]
fn a_stream_is_reused_when_idle_and_opened_when_all_are_busy() {
    let mut pool = Vec::new();
    assert!(
        pool_take(&mut pool, 3, 0),
        "the first request opens a stream"
    );
    assert!(
        pool_take(&mut pool, 3, 0),
        "the second, while the first is busy, too"
    );
    pool_release(&mut pool, 3, false);
    assert!(
        !pool_take(&mut pool, 3, 0),
        "a finished request left its stream idle"
    );
    pool_release(&mut pool, 3, true);
    pool_release(&mut pool, 3, true);
    assert!(
        pool_take(&mut pool, 3, 0),
        "cancelled requests closed their streams"
    );
    assert!(pool_take(&mut pool, 4, 0), "streams are per peer");
    assert_eq!((pool[0].open, pool[0].busy), (1, 1));
}

#[test]
fn streams_to_an_earlier_session_of_a_peer_are_gone() {
    let mut pool = Vec::new();
    assert!(pool_take(&mut pool, 3, 0));
    pool_release(&mut pool, 3, false);
    // The peer left and came back: its idle stream did not survive.
    assert!(pool_take(&mut pool, 3, 1));
    assert_eq!(pool.len(), 1);
    assert_eq!((pool[0].session, pool[0].open, pool[0].busy), (1, 1, 1));
}

#[test]
fn quantiles_use_nearest_rank_over_completed_pullers() {
    let r = RunResult {
        nodes: 5,
        sites: 1,
        image_bytes: 1,
        seed: 0,
        completion_secs: vec![Some(3.0), Some(1.0), None, Some(2.0), Some(4.0)],
        node_bytes: Vec::new(),
        holds_image: Vec::new(),
        wan_bytes: Vec::new(),
        nic_bytes: (0.0, 0.0),
        wan_total_bytes: (0.0, 0.0),
        wasted_bytes: 0.0,
        refused: 0,
        declined: 0,
        stalls: 0,
        departures: 0,
        cancels: 0,
        timeouts: 0,
        duplicate_bytes: 0.0,
        loser_bytes: 0.0,
        thinks: (0, 0),
        reports: 0,
        end_secs: 0.0,
        events: 0,
        wall_secs: 0.0,
        fills: 0,
        timelines: Vec::new(),
        all_out_secs: None,
        publisher_last_secs: 0.0,
    };
    assert_eq!(r.completed(), 4);
    assert_eq!(r.quantile(0.5), Some(2.0));
    assert_eq!(r.quantile(0.99), Some(4.0));
    assert_eq!(r.quantile(1.0), Some(4.0));
    assert_eq!(r.publisher_egress(), 0.0);
}
