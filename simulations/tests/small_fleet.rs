//! Small fleets run end to end through the real plan: conservation of bytes, determinism, churn,
//! and sites. Kept small (tens of nodes, a few dozen chunks) so they run in seconds in a debug
//! build; the large scenarios live in `simulations/scenarios/`.

use shoal_simulations::fleet::{self, RunResult};
use shoal_simulations::scenario::Scenario;

/// 50 pullers, 32 chunks of 1 MiB, 1 Gbit/s NICs.
const SMALL: &str = r#"
    name = "small"
    mode = "swarm"
    seed = 7
    image_bytes = 33554000
    chunk_bytes = 1048576
    nodes = [50]
    nic_mbit = 1000
    latency_ms = 0.1
"#;

fn run(text: &str, seed: u64) -> (Scenario, RunResult) {
    let scenario = Scenario::parse(text).expect("scenario");
    let pullers = scenario.nodes[0];
    let result = fleet::run(&scenario, pullers, seed);
    (scenario, result)
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 * a.abs().max(b.abs()).max(1.0)
}

/// Every byte received was sent, on every kind of link, and the books add up.
fn assert_conservation(scenario: &Scenario, r: &RunResult) {
    let sent: f64 = r.node_bytes.iter().map(|b| b.0).sum();
    let received: f64 = r.node_bytes.iter().map(|b| b.1).sum();
    assert!(close(sent, received), "sent {sent} received {received}");
    // Each flow crosses exactly one NIC uplink and one NIC downlink.
    assert!(
        close(r.nic_bytes.0, sent),
        "uplinks {} vs {sent}",
        r.nic_bytes.0
    );
    assert!(
        close(r.nic_bytes.1, received),
        "downlinks {}",
        r.nic_bytes.1
    );
    // What leaves a site over the WAN enters another one.
    assert!(
        close(r.wan_total_bytes.0, r.wan_total_bytes.1),
        "{:?}",
        r.wan_total_bytes
    );
    // Every puller received the image, plus what it threw away, and nothing else.
    let image = scenario.image_bytes as f64;
    let useful = image * f64::from(r.nodes);
    assert!(
        close(received, useful + r.wasted_bytes),
        "received {received}, useful {useful}, wasted {}",
        r.wasted_bytes
    );
    // The publisher received nothing.
    assert_eq!(r.node_bytes[0].1, 0.0);
}

#[test]
fn a_small_swarm_completes_conserves_bytes_and_holds_the_image() {
    let (scenario, r) = run(SMALL, 7);
    assert_eq!(
        r.completed(),
        50,
        "every puller completes: {:?}",
        r.completion_secs
    );
    assert!(
        r.holds_image.iter().all(|&h| h),
        "every node holds each chunk once"
    );
    assert_conservation(&scenario, &r);
    // The swarm works as one: the publisher sends far fewer than 50 copies, and the slowest
    // puller within ten times one download alone (0.27 s at 1 Gbit/s): loose bounds that only
    // catch a broken model; the scenarios measure the real numbers.
    let copies = r.publisher_egress() / scenario.image_bytes as f64;
    assert!(copies < 10.0, "publisher sent {copies} copies");
    let slowest = r.quantile(1.0).unwrap();
    assert!(
        slowest < 10.0 * scenario.ideal_secs(),
        "slowest {slowest} s"
    );
    assert!(
        slowest >= scenario.ideal_secs(),
        "faster than the NIC: {slowest}"
    );
}

#[test]
fn the_same_seed_gives_the_same_run_and_another_seed_another() {
    let (_, a) = run(SMALL, 7);
    let (_, b) = run(SMALL, 7);
    let (_, c) = run(SMALL, 8);
    let strip = |mut r: RunResult| {
        r.wall_secs = 0.0;
        r
    };
    let (a, b, c) = (strip(a), strip(b), strip(c));
    assert_eq!(a, b, "same seed, same result, bit for bit");
    assert_ne!(a.completion_secs, c.completion_secs, "the seed matters");
    assert_eq!(c.completed(), 50);
}

#[test]
fn with_churn_every_node_still_completes() {
    let text = format!(
        "{SMALL}\n[churn]\nfraction = 0.2\nleave_secs = [0.05, 0.3]\naway_secs = [0.2, 1.0]\n"
    );
    let (scenario, r) = run(&text, 3);
    assert_eq!(r.completed(), 50, "{:?}", r.completion_secs);
    assert!(r.holds_image.iter().all(|&h| h));
    assert_conservation(&scenario, &r);
    assert_eq!(r.departures, 10, "a fifth of the pullers left");
    // Their transfers in flight were cut: bytes were thrown away.
    assert!(r.wasted_bytes > 0.0);
}

#[test]
fn two_sites_carry_about_one_copy_over_each_wan_link() {
    // Two sites of 10 nodes behind 50 Mbit/s WAN links; the publisher in a third site.
    let text = r#"
        name = "sites"
        mode = "swarm"
        seed = 5
        image_bytes = 16777216
        chunk_bytes = 1048576
        nodes = [20]
        sites = 2
        nic_mbit = 1000
        latency_ms = 0.1

        [wan]
        up_mbit = 50
        down_mbit = 50
        latency_ms = 5

        [publisher]
        site = "own"
        wan_mbit = 1000
    "#;
    let (scenario, r) = run(text, 5);
    assert_eq!(r.completed(), 20);
    assert_conservation(&scenario, &r);
    assert_wan_copies_within(&scenario, &r, 1.0..=1.2);
}

/// Every site of pullers took in a number of copies of the image within `range` over its WAN.
fn assert_wan_copies_within(
    scenario: &Scenario,
    r: &RunResult,
    range: std::ops::RangeInclusive<f64>,
) {
    let image = scenario.image_bytes as f64;
    for (site, &(inbound, _)) in r.wan_bytes.iter().enumerate() {
        let copies = inbound / image;
        assert!(
            range.contains(&copies),
            "site {site}: {copies} copies came in over its WAN link"
        );
    }
}

#[test]
fn nodes_that_know_their_site_reach_the_publisher_through_few_gateways() {
    // Eight sites of 12 nodes behind 20 Mbit/s links, the publisher in a ninth with a fat link,
    // and room for few candidates: without the seeders among them a site seldom reaches the
    // publisher, and with every node of a site asking over the WAN requests time out.
    let text = r#"
        name = "edge-small"
        mode = "swarm"
        seed = 3
        image_bytes = 16777216
        chunk_bytes = 1048576
        nodes = [96]
        sites = 8
        nic_mbit = 1000
        latency_ms = 0.1

        [wan]
        up_mbit = 20
        down_mbit = 20
        latency_ms = 10

        [publisher]
        site = "own"
        wan_mbit = 1000

        [discovery]
        local_first = true
        max_candidates = 14
    "#;
    let (scenario, r) = run(text, 3);
    assert_eq!(r.completed(), 96);
    assert_conservation(&scenario, &r);
    assert_wan_copies_within(&scenario, &r, 1.0..=1.05);
    let (ideal, max) = (scenario.ideal_secs(), r.quantile(1.0).unwrap());
    assert!(
        max < 2.0 * ideal,
        "the last node took {max} s, ideal {ideal} s"
    );
    assert_eq!(r.stalls, 0);
}

#[test]
fn central_sends_one_copy_per_puller_from_the_publisher() {
    let text = SMALL.replace("mode = \"swarm\"", "mode = \"central\"");
    let (scenario, r) = run(&text, 1);
    assert_eq!(r.completed(), 50);
    assert_conservation(&scenario, &r);
    let copies = r.publisher_egress() / scenario.image_bytes as f64;
    assert!(close(copies, 50.0), "{copies}");
    // 50 copies through one 1 Gbit/s uplink, fair-shared: everyone ends together, at 50 x ideal.
    let ideal = scenario.ideal_secs();
    let (p50, max) = (r.quantile(0.5).unwrap(), r.quantile(1.0).unwrap());
    assert!(close(p50, max) || (max - p50) < 1e-3, "{p50} {max}");
    assert!(
        (max / (50.0 * ideal) - 1.0).abs() < 0.01,
        "{max} vs {}",
        50.0 * ideal
    );
}

#[test]
fn serve_reports_bring_the_publishers_egress_near_one_copy() {
    // 50 pullers that all see each other and the publisher (candidates capped above the fleet
    // size), 256 chunks of 1 MiB. The publisher's uplink is the only source at first; every
    // puller asks it for the chunks only it holds. Without serve reports each puller picks its
    // own rarest chunks and the publisher sends 2.0 to 2.4 copies (seeds 1 to 4); with them, a
    // chunk the publisher already gave away waits for the copy to appear at another peer: 1.52
    // to 1.57 copies. One full copy is the least it can send.
    let text = r#"
        name = "all-see-all"
        mode = "swarm"
        seed = 1
        image_bytes = 268435456
        chunk_bytes = 1048576
        nodes = [50]
        nic_mbit = 1000
        latency_ms = 0.1

        [discovery]
        max_candidates = 64
    "#;
    let (scenario, r) = run(text, 1);
    assert_eq!(r.completed(), 50);
    assert!(r.holds_image.iter().all(|&h| h));
    assert_conservation(&scenario, &r);
    assert!(r.reports > 0, "the pullers heard the publisher's reports");
    let copies = r.publisher_egress() / scenario.image_bytes as f64;
    let without = text.replace(
        "max_candidates = 64",
        "max_candidates = 64\nserve_reports = false",
    );
    let (_, r0) = run(&without, 1);
    assert_eq!(r0.completed(), 50);
    assert_eq!(r0.reports, 0);
    let copies_without = r0.publisher_egress() / scenario.image_bytes as f64;
    eprintln!("publisher: {copies:.3} copies with serve reports, {copies_without:.3} without");
    assert!(
        (1.0..=1.05).contains(&copies) && copies < copies_without - 0.1,
        "the publisher sent {copies} copies with reports, {copies_without} without"
    );
}

/// The publisher's egress with default discovery (each puller sees 32 of the 50): about one copy.
#[test]
fn the_publisher_sends_each_chunk_about_once() {
    let text = SMALL.replace("image_bytes = 33554000", "image_bytes = 134217728");
    let (scenario, r) = run(&text, 7);
    assert_eq!(r.completed(), 50);
    assert_conservation(&scenario, &r);
    let copies = r.publisher_egress() / scenario.image_bytes as f64;
    assert!(
        (1.0..=1.05).contains(&copies),
        "the publisher sent {copies} copies"
    );
    // Every chunk left it once before its last byte, and no puller finished before that.
    let all_out = r.all_out_secs.expect("every chunk left the publisher");
    assert!(all_out <= r.publisher_last_secs + 1e-9);
    assert!(r.quantile(0.0).unwrap() >= all_out - 1e-9);
    // The timelines are in order for every puller.
    for t in r.timelines.iter().flatten() {
        assert!(t.steps().windows(2).all(|w| w[0] <= w[1]), "{t:?}");
    }
}

/// The `large-image` scenario (an image large next to the link, the publisher no faster than a
/// puller), scaled down to 50 pullers and 256 chunks: the publisher's uplink is the critical
/// path, and it sends each chunk about once (1.00 to 1.01 copies over seeds 1 to 3).
#[test]
fn a_large_image_on_a_publisher_no_faster_than_a_puller_leaves_it_about_once() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/scenarios/large-image.toml");
    let full = Scenario::load(std::path::Path::new(path)).expect("large-image.toml");
    assert_eq!(full.image_bytes, 8 << 30);
    assert_eq!(full.nodes, vec![1000]);
    assert_eq!(full.nic_mbit, 2500.0);
    assert!(
        full.publisher.nic_mbit.is_none(),
        "the publisher is no faster"
    );
    let text = std::fs::read_to_string(path)
        .unwrap()
        .replace("image_bytes = 8589934592", "image_bytes = 268435456")
        .replace("nodes = [1000]", "nodes = [50]\nchunk_bytes = 1048576");
    let (scenario, r) = run(&text, 1);
    assert_eq!(scenario.chunk_count(), 256);
    assert_eq!(r.completed(), 50);
    assert!(r.holds_image.iter().all(|&h| h));
    assert_conservation(&scenario, &r);
    let copies = r.publisher_egress() / scenario.image_bytes as f64;
    assert!(
        (1.0..=1.05).contains(&copies),
        "the publisher sent {copies} copies"
    );
}
