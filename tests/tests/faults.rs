//! The fault-injection suite: a fleet of real `shoal` processes, each in its own network
//! namespace behind a private switch (`shoal_tests::netns`), under the faults a fleet meets in
//! the field:
//!
//! - nodes SIGKILLed in the middle of a rollout (the others finish; the killed ones finish
//!   after a restart);
//! - the fleet partitioned in two and healed, with pushes on both sides meanwhile (each side
//!   keeps serving what it holds; after the heal every tag converges, last writer wins);
//! - a node's disk filled during pushes (the push fails with a server error and a spec error
//!   body, or the connection is closed under a large body; nothing acknowledged is lost, the
//!   node keeps serving, and once there is space again pushes work, with or without a restart);
//! - a node's wall clock three hours ahead (libfaketime): honest nodes converge, and its
//!   records, from the future, do not freeze a tag for them;
//! - half the fleet killed at once and restarted (all come back, reconnect and serve).
//!
//! Every scenario ends the same way ([`LabFleet::finish`]): every acknowledged image whole on
//! every node that should have it, no node down, every node stopped cleanly by SIGTERM and
//! `shoal fsck` clean on every store.
//!
//! The bugs these faults uncovered (a long partition that nothing redialled after, nodes with
//! skewed clocks disagreeing with the fleet, an index that stayed failed after the disk had been
//! full until a restart) are fixed, and the tests that found them run with the others.
//!
//! The README test command runs the scenarios scaled down (a few nodes, images of a few MiB);
//! `tests/scripts/faults.sh --full` runs them at full size (`SHOAL_FAULTS_FULL=1`: more nodes,
//! bigger images, more rounds) and `--bugs` adds the ignored tests. They need root and
//! iproute2 (namespaces, veth pairs, tmpfs) and the clock scenarios need libfaketime; without
//! them each prints `SKIP: <test>: <what is missing>`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use rand::Rng;
use rand::rngs::StdRng;
use shoal_tests::disk::SmallDisk;
use shoal_tests::http::{Body, OCI_MANIFEST};
use shoal_tests::lab_fleet::{LabFleet, NodeSpec, TestImage, layer_size};
use shoal_tests::{Tool, require, seeded_rng, wait_until};

/// How long a pushed tag may take to reach every node. Gossip takes a second; but a record
/// published before the gossip mesh has formed (the first second or so after a node starts)
/// reaches the others only by anti-entropy, which runs every minute
/// (`shoal_node::net::RECORD_SYNC_INTERVAL`): hence well over a minute.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(150);
/// How long a fleet may take to heal and agree after a partition ends.
const HEAL_TIMEOUT: Duration = Duration::from_secs(120);
/// A short outage: TCP connections across the cut survive it (their retransmission backoff
/// stays a few seconds), so the fleet heals on the connections it has. Longer outages need a
/// node to notice lost peers and redial them: see the test of [`Outage::UntilPeersAreGone`].
const SHORT_OUTAGE: Duration = Duration::from_secs(5);
/// How long nodes may take to notice that the peers across a partition are gone.
const CUT_TIMEOUT: Duration = Duration::from_secs(90);
/// How long restarted nodes may take to be connected to every other node again.
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(60);

/// The size of the scenarios: scaled down for the README test command, full size for
/// `tests/scripts/faults.sh --full`.
#[derive(Debug, Clone, Copy)]
struct Scale {
    /// Nodes in each fleet.
    nodes: usize,
    /// Layers per image, and the size of each.
    layers: usize,
    layer_mib: f64,
    /// Rounds of the kill scenario.
    rounds: usize,
}

impl Scale {
    fn from_env() -> Self {
        if std::env::var_os("SHOAL_FAULTS_FULL").is_some_and(|v| v != "0") {
            Self {
                nodes: 8,
                layers: 3,
                layer_mib: 24.0,
                rounds: 3,
            }
        } else {
            Self {
                nodes: 4,
                layers: 2,
                layer_mib: 2.0,
                rounds: 2,
            }
        }
    }

    fn image(&self, rng: &mut StdRng) -> TestImage {
        let sizes: Vec<usize> = (0..self.layers)
            .map(|_| layer_size(rng, self.layer_mib))
            .collect();
        TestImage::random(rng, &sizes)
    }
}

/// Root and iproute2, or a SKIP line.
fn lab_available(test: &str) -> bool {
    require(test, Tool::NetAdmin)
}

/// Pulls `image` as `repo:tag` on every node of `nodes` at the same time; the result per node.
fn pull_on(
    fleet: &LabFleet,
    nodes: &[usize],
    image: &TestImage,
    repo: &str,
    tag: &str,
) -> BTreeMap<usize, Result<()>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = nodes
            .iter()
            .map(|&i| {
                let client = fleet.client(i);
                (i, s.spawn(move || image.check_on(&client, repo, tag)))
            })
            .collect();
        handles
            .into_iter()
            .map(|(i, h)| {
                let result = h
                    .join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("pull thread panicked")));
                (i, result)
            })
            .collect()
    })
}

/// Fails with every node's error unless each pull succeeded.
fn all_pulled(results: BTreeMap<usize, Result<()>>, fleet: &LabFleet, what: &str) -> Result<()> {
    let failed: Vec<String> = results
        .into_iter()
        .filter_map(|(i, r)| {
            r.err().map(|e| {
                format!(
                    "node {i}: {e:#}\n--- its log ---\n{}",
                    fleet.log_tail(i, 30)
                )
            })
        })
        .collect();
    ensure!(failed.is_empty(), "{what}:\n{}", failed.join("\n"));
    Ok(())
}

#[test]
fn nodes_killed_mid_rollout_finish_after_restart_and_the_rest_finish_anyway() -> Result<()> {
    const TEST: &str = "nodes_killed_mid_rollout_finish_after_restart_and_the_rest_finish_anyway";
    if !lab_available(TEST) {
        return Ok(());
    }
    let scale = Scale::from_env();
    let (mut rng, _) = seeded_rng(TEST);
    let n = scale.nodes + 1;
    let mut fleet = LabFleet::start("kill", 40, &vec![NodeSpec::default(); n])?;
    let repo = "faults/rollout";
    let mut acknowledged: Vec<(String, TestImage)> = Vec::new();
    let started = Instant::now();
    let mut interrupted = 0;
    for round in 0..scale.rounds {
        let image = scale.image(&mut rng);
        let tag = format!("r{round}");
        image.push(&fleet.client(0), repo, &tag)?;
        acknowledged.push((tag.clone(), image.clone()));
        let pullers: Vec<usize> = (1..n).collect();
        fleet.wait_tag(&pullers, repo, &tag, &image.digest, CONVERGE_TIMEOUT)?;

        // Victims: a third of the pullers (at least one), never all of them.
        let mut victims: Vec<usize> = Vec::new();
        while victims.len() < (pullers.len() / 3).max(1) {
            let v = pullers[rng.random_range(0..pullers.len())];
            if !victims.contains(&v) {
                victims.push(v);
            }
        }
        let survivors: Vec<usize> = pullers
            .iter()
            .copied()
            .filter(|p| !victims.contains(p))
            .collect();
        // The kill lands in the middle of the victims' pulls: once each has a random number of
        // the image's parts (manifest, config, layers), and not all of them.
        let parts = 1 + image.blobs.len();
        let kill_at = rng.random_range(1..parts);
        let progress: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
        eprintln!("round {round}: killing {victims:?} after {kill_at} of {parts} parts");
        let results = std::thread::scope(|s| {
            let handles: Vec<_> = pullers
                .iter()
                .map(|&i| {
                    let (client, done, image) = (fleet.client(i), &progress[i], &image);
                    let tag = &tag;
                    (
                        i,
                        s.spawn(move || image.check_on_counting(&client, repo, tag, done)),
                    )
                })
                .collect();
            let reached = wait_until(CONVERGE_TIMEOUT, "the victims' pulls to get going", || {
                victims
                    .iter()
                    .all(|&v| progress[v].load(Ordering::SeqCst) >= kill_at)
            });
            for &v in &victims {
                if let Some(pid) = fleet.node(v).pid() {
                    // SIGKILL by pid: the pulls borrow the fleet.
                    let _ = std::process::Command::new("kill")
                        .args(["-KILL", &pid.to_string()])
                        .status();
                }
            }
            let results: BTreeMap<usize, Result<()>> = handles
                .into_iter()
                .map(|(i, h)| {
                    let r = h
                        .join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("pull thread panicked")));
                    (i, r)
                })
                .collect();
            match reached {
                Ok(()) => Ok(results),
                Err(e) => {
                    let why: Vec<String> = results
                        .iter()
                        .filter_map(|(i, r)| r.as_ref().err().map(|e| format!("node {i}: {e:#}")))
                        .collect();
                    Err(e.context(why.join("\n")))
                }
            }
        })?;
        let cut_short = victims
            .iter()
            .filter(|&&v| progress[v].load(Ordering::SeqCst) < parts)
            .count();
        eprintln!(
            "round {round}: {cut_short} of {} victims killed before their pull completed",
            victims.len()
        );
        interrupted += cut_short;
        let survivor_results = results
            .into_iter()
            .filter(|(i, _)| survivors.contains(i))
            .collect();
        all_pulled(
            survivor_results,
            &fleet,
            "the pulls on nodes that were not killed",
        )?;
        for &v in &victims {
            fleet
                .node_mut(v)
                .restart()
                .with_context(|| format!("restarting node {v}"))?;
        }
        fleet.wait_connected(RECONNECT_TIMEOUT)?;
        all_pulled(
            pull_on(&fleet, &victims, &image, repo, &tag),
            &fleet,
            "the pulls on restarted nodes",
        )?;
    }
    // Every acknowledged image, whole, on every node.
    let everyone: Vec<usize> = (0..n).collect();
    for (tag, image) in &acknowledged {
        all_pulled(
            pull_on(&fleet, &everyone, image, repo, tag),
            &fleet,
            "a last check of every image",
        )?;
    }
    eprintln!(
        "{TEST}: {} rounds in {:?}, {interrupted} pulls cut short by a kill",
        scale.rounds,
        started.elapsed()
    );
    fleet.finish()
}

/// How long a partition lasts.
#[derive(Debug, Clone, Copy)]
enum Outage {
    /// At least this long.
    AtLeast(Duration),
    /// Until no node lists a peer across the cut any more, as after a long outage.
    UntilPeersAreGone,
}

#[test]
fn a_partitioned_fleet_serves_both_sides_and_converges_after_the_heal() -> Result<()> {
    const TEST: &str = "a_partitioned_fleet_serves_both_sides_and_converges_after_the_heal";
    partition_and_heal(TEST, "part", 41, Outage::AtLeast(SHORT_OUTAGE))
}

#[test]
fn a_fleet_partitioned_until_its_peers_are_gone_reconnects_and_converges_after_the_heal()
-> Result<()> {
    const TEST: &str =
        "a_fleet_partitioned_until_its_peers_are_gone_reconnects_and_converges_after_the_heal";
    partition_and_heal(TEST, "cut", 46, Outage::UntilPeersAreGone)
}

/// Two halves cut apart for `outage`, pushes on both sides meanwhile, then the heal.
fn partition_and_heal(test: &str, label: &str, subnet: u8, outage: Outage) -> Result<()> {
    if !lab_available(test) {
        return Ok(());
    }
    let scale = Scale::from_env();
    let (mut rng, _) = seeded_rng(test);
    let n = scale.nodes;
    let mut fleet = LabFleet::start(label, subnet, &vec![NodeSpec::default(); n])?;
    let repo = "faults/split";
    let everyone: Vec<usize> = (0..n).collect();
    let (left, right): (Vec<usize>, Vec<usize>) = everyone.iter().partition(|&&i| i < n / 2);
    let (l0, r0) = (left[0], right[0]);

    let base = scale.image(&mut rng);
    base.push(&fleet.client(l0), repo, "base")?;
    fleet.wait_tag(&everyone, repo, "base", &base.digest, CONVERGE_TIMEOUT)?;
    all_pulled(
        pull_on(&fleet, &everyone, &base, repo, "base"),
        &fleet,
        "pulling the base image before the partition",
    )?;

    fleet.lab.partition(&left, &right)?;
    let started = Instant::now();
    // One tag per side, and one tag written on both sides: the right side writes it last.
    let (img_l, img_r) = (scale.image(&mut rng), scale.image(&mut rng));
    let (shared_l, shared_r) = (scale.image(&mut rng), scale.image(&mut rng));
    img_l.push(&fleet.client(l0), repo, "left")?;
    img_r.push(&fleet.client(r0), repo, "right")?;
    shared_l.push(&fleet.client(l0), repo, "shared")?;
    // Record timestamps are in milliseconds: make sure the right side's write is later.
    let pushed_left = Instant::now();
    wait_until(Duration::from_secs(1), "a few milliseconds", || {
        pushed_left.elapsed() >= Duration::from_millis(20)
    })?;
    shared_r.push(&fleet.client(r0), repo, "shared")?;

    // Each side serves what it holds and what its side pushed.
    fleet.wait_tag(&left, repo, "left", &img_l.digest, CONVERGE_TIMEOUT)?;
    fleet.wait_tag(&right, repo, "right", &img_r.digest, CONVERGE_TIMEOUT)?;
    all_pulled(
        pull_on(&fleet, &left, &img_l, repo, "left"),
        &fleet,
        "the left side pulling its own push",
    )?;
    all_pulled(
        pull_on(&fleet, &right, &img_r, repo, "right"),
        &fleet,
        "the right side pulling its own push",
    )?;
    all_pulled(
        pull_on(&fleet, &everyone, &base, repo, "base"),
        &fleet,
        "both sides serving the base image",
    )?;
    // The cut is real: neither side saw the other's push.
    for &i in &left {
        ensure!(
            fleet.tag_digest(i, repo, "right").is_none(),
            "node {i} on the left saw the right side's push through the partition"
        );
    }
    for &i in &right {
        ensure!(
            fleet.tag_digest(i, repo, "left").is_none(),
            "node {i} on the right saw the left side's push through the partition"
        );
    }
    match outage {
        Outage::AtLeast(hold) => wait_until(hold * 2, "the end of the outage", || {
            started.elapsed() >= hold
        })?,
        Outage::UntilPeersAreGone => {
            // Held until every node has given up its connections across the cut, as a real outage
            // does; the heal must then bring the fleet back together by itself.
            let sides = [&left, &right];
            wait_until(
                CUT_TIMEOUT,
                "every connection across the partition to drop",
                || {
                    sides.iter().all(|side| {
                        side.iter()
                            .all(|&i| fleet.peers_of(i).iter().all(|p| side.contains(p)))
                    })
                },
            )
            .with_context(|| {
                let peers: Vec<Vec<usize>> = (0..n).map(|i| fleet.peers_of(i)).collect();
                format!(
                    "peers per node: {peers:?}; node {l0} says: {}",
                    fleet.peers_raw(l0)
                )
            })?;
            eprintln!(
                "{test}: connections across the cut gone after {:?}",
                started.elapsed()
            );
        }
    }
    eprintln!("{test}: partitioned for {:?}", started.elapsed());

    fleet.lab.heal()?;
    let healed = Instant::now();
    fleet.wait_tag(&everyone, repo, "left", &img_l.digest, HEAL_TIMEOUT)?;
    fleet.wait_tag(&everyone, repo, "right", &img_r.digest, HEAL_TIMEOUT)?;
    // Last writer wins, with the same answer on every node.
    fleet.wait_tag(&everyone, repo, "shared", &shared_r.digest, HEAL_TIMEOUT)?;
    eprintln!("{test}: converged {:?} after the heal", healed.elapsed());
    for (tag, image) in [("left", &img_l), ("right", &img_r), ("shared", &shared_r)] {
        all_pulled(
            pull_on(&fleet, &everyone, image, repo, tag),
            &fleet,
            "pulling every image after the heal",
        )?;
    }
    fleet.finish()
}

/// A two-node fleet whose node 0 keeps its store on a small tmpfs, with one image pushed to
/// it before the disk fills.
struct FullDisk {
    fleet: LabFleet,
    disk: SmallDisk,
    first: TestImage,
    layer_mib: f64,
}

const DISK_REPO: &str = "faults/disk";

impl FullDisk {
    fn start(label: &str, subnet: u8, rng: &mut StdRng) -> Result<Self> {
        let scale = Scale::from_env();
        let layer_mib = scale.layer_mib.max(4.0);
        // Room for the node's index and a few images, not much more.
        let disk = SmallDisk::mount((layer_mib * 16.0) as u64 + 64)?;
        let specs = [
            NodeSpec {
                data_dir: Some(disk.path().join("data")),
                ..NodeSpec::default()
            },
            NodeSpec::default(),
        ];
        let fleet = LabFleet::start(label, subnet, &specs)?;
        let first = scale.image(rng);
        first.push(&fleet.client(0), DISK_REPO, "first")?;
        Ok(Self {
            fleet,
            disk,
            first,
            layer_mib,
        })
    }

    fn image(&self, rng: &mut StdRng) -> TestImage {
        let size = layer_size(rng, self.layer_mib);
        TestImage::random(rng, &[size])
    }

    /// With the disk full: a monolithic push, a chunked one whose disk fills half way, and a
    /// manifest PUT. Each must be refused: a server error with a spec error body, or (for a
    /// large body the node stops reading) the connection closed under the client. Returns
    /// whether the manifest PUT was acknowledged anyway (then it must hold).
    fn push_while_full(&self, test: &str, rng: &mut StdRng) -> Result<bool> {
        let client = self.fleet.client(0);
        // Half a chunked upload while there is room; the disk fills before the second half.
        let chunked = self.image(rng);
        let (digest, layer) = &chunked.blobs[1];
        let half = layer.len() / 2;
        let location = client.start_upload(DISK_REPO)?;
        let location = client.patch_chunk(&location, 0, Body::Bytes(&layer[..half]))?;
        self.disk.fill("all", None)?;
        let mut answers = Vec::new();
        let range = format!("{half}-{}", layer.len() - 1);
        let resp = client
            .request(
                "PATCH",
                &location,
                &[
                    ("content-type", "application/octet-stream"),
                    ("content-range", &range),
                ],
                Body::Bytes(&layer[half..]),
            )
            .and_then(|resp| {
                if resp.status == 202 {
                    let next = resp.header("location").unwrap_or(&location).to_owned();
                    client.finish_upload(&next, digest)
                } else {
                    Ok(resp)
                }
            });
        answers.push(("a chunked upload filling the disk".to_owned(), resp));
        let big = self.image(rng);
        for (digest, data) in &big.blobs {
            let resp = self
                .fleet
                .client(0)
                .post_blob(DISK_REPO, digest, Body::Bytes(data));
            answers.push((format!("monolithic POST of {} bytes", data.len()), resp));
        }
        for (what, resp) in answers {
            match resp {
                Ok(resp) => {
                    eprintln!("{test}: {what} on a full disk: HTTP {}", resp.status);
                    ensure!(
                        resp.status == 507,
                        "{what} on a full disk was not refused with 507 Insufficient Storage:\n{}",
                        resp.describe()
                    );
                    let body = resp
                        .json()
                        .with_context(|| format!("{what}: no spec error body"))?;
                    ensure!(
                        body["errors"][0]["code"].is_string(),
                        "{what}: the error body is not a spec error body:\n{}",
                        resp.describe()
                    );
                }
                // The node answered before reading the whole body and closed the connection.
                Err(e) => eprintln!("{test}: {what} on a full disk: connection closed ({e:#})"),
            }
        }
        let resp =
            client.put_manifest(DISK_REPO, "while-full", OCI_MANIFEST, &self.first.manifest)?;
        eprintln!("{test}: manifest PUT on a full disk: HTTP {}", resp.status);
        ensure!(
            resp.status == 201 || resp.status == 507,
            "a manifest PUT on a full disk answered:\n{}",
            resp.describe()
        );
        Ok(resp.status == 201)
    }
}

#[test]
fn a_full_disk_fails_the_push_cleanly_loses_nothing_and_recovers() -> Result<()> {
    const TEST: &str = "a_full_disk_fails_the_push_cleanly_loses_nothing_and_recovers";
    if !lab_available(TEST) {
        return Ok(());
    }
    let (mut rng, _) = seeded_rng(TEST);
    let mut setup = FullDisk::start("disk", 42, &mut rng)?;
    let started = Instant::now();
    let tag_acknowledged = setup.push_while_full(TEST, &mut rng)?;
    let (first, repo) = (setup.first.clone(), DISK_REPO);

    // Still up, still serving what it acknowledged, to clients and to its peer.
    setup.fleet.ensure_all_running()?;
    first.check_on(&setup.fleet.client(0), repo, "first")?;
    setup
        .fleet
        .wait_tag(&[1], repo, "first", &first.digest, CONVERGE_TIMEOUT)?;
    first.check_on(&setup.fleet.client(1), repo, "first")?;
    eprintln!(
        "{TEST}: served on a full disk after {:?}",
        started.elapsed()
    );

    // Space is back and the node restarted: pushes succeed, and nothing acknowledged is gone.
    setup.disk.free("all")?;
    setup.fleet.node_mut(0).restart()?;
    setup.fleet.wait_connected(RECONNECT_TIMEOUT)?;
    eprintln!(
        "{TEST}: restarted and reconnected after {:?}",
        started.elapsed()
    );
    first.check_on(&setup.fleet.client(0), repo, "first")?;
    if tag_acknowledged {
        first.check_on(&setup.fleet.client(0), repo, "while-full")?;
    }
    // (Checked on the node itself: a record published within a second or so of a start, before
    // the gossip mesh forms, reaches the peer only by anti-entropy, up to a minute later; the
    // fleet-wide path after a restart is the restart scenario's.)
    let after = setup.image(&mut rng);
    after.push(&setup.fleet.client(0), repo, "after")?;
    after.check_on(&setup.fleet.client(0), repo, "after")?;
    eprintln!("{TEST}: pushed again after {:?}", started.elapsed());
    setup.fleet.finish()
}

/// How long a node may take to accept pushes again once its disk has room.
const DISK_RECOVERY_TIMEOUT: Duration = Duration::from_secs(15);

/// Tags deleted on the full disk: each a small journal line and a larger index write, so that
/// the index's database (sled) fails on the disk before the journal does, as it does in the
/// field; sled then refuses every write until it is opened again.
const DELETED_WHILE_FULL: usize = 16;

#[test]
fn pushes_succeed_again_once_a_full_disk_has_room_without_a_restart() -> Result<()> {
    const TEST: &str = "pushes_succeed_again_once_a_full_disk_has_room_without_a_restart";
    if !lab_available(TEST) {
        return Ok(());
    }
    let (mut rng, _) = seeded_rng(TEST);
    let setup = FullDisk::start("room", 45, &mut rng)?;
    let client = setup.fleet.client(0);
    let scratch: Vec<String> = (0..DELETED_WHILE_FULL)
        .map(|i| format!("scratch-{i}"))
        .collect();
    for tag in &scratch {
        let resp = client.put_manifest(DISK_REPO, tag, OCI_MANIFEST, &setup.first.manifest)?;
        ensure!(resp.status == 201, "tagging {tag}:\n{}", resp.describe());
    }
    setup.push_while_full(TEST, &mut rng)?;
    // Tags deleted on the full disk: refused as a full disk, or acknowledged and then kept.
    let mut deleted = Vec::new();
    for tag in &scratch {
        let path = format!("/v2/{DISK_REPO}/manifests/{tag}");
        let resp = client.request("DELETE", &path, &[], Body::None)?;
        ensure!(
            resp.status == 202 || resp.status == 507,
            "deleting {tag} on a full disk answered:\n{}",
            resp.describe()
        );
        if resp.status == 202 {
            deleted.push(tag);
        }
    }
    eprintln!(
        "{TEST}: {} of {DELETED_WHILE_FULL} tag deletes acknowledged on the full disk",
        deleted.len()
    );
    // Uploads started on the full disk for a while: the index writes (and fails to).
    let full_since = Instant::now();
    wait_until(
        Duration::from_secs(10),
        "two seconds of uploads on a full disk",
        || {
            let _ = setup.fleet.client(0).start_upload(DISK_REPO);
            full_since.elapsed() >= Duration::from_secs(2)
        },
    )?;
    setup.disk.free("all")?;
    let after = setup.image(&mut rng);
    let mut last = None;
    let recovered = wait_until(
        DISK_RECOVERY_TIMEOUT,
        "a push to succeed once space is back",
        || match after.push(&client, DISK_REPO, "after") {
            Ok(()) => true,
            Err(e) => {
                last = Some(format!("{e:#}"));
                false
            }
        },
    );
    recovered
        .with_context(|| format!("the last push failed with: {}", last.unwrap_or_default()))?;
    for tag in deleted {
        let resp = client.get_manifest(DISK_REPO, tag)?;
        ensure!(
            resp.status == 404,
            "{tag}, whose delete was acknowledged on the full disk, came back:\n{}",
            resp.describe()
        );
    }
    setup
        .fleet
        .wait_tag(&[1], DISK_REPO, "after", &after.digest, CONVERGE_TIMEOUT)?;
    after.check_on(&setup.fleet.client(1), DISK_REPO, "after")?;
    setup.fleet.finish()
}

#[test]
fn a_node_with_a_skewed_clock_does_not_freeze_tags_and_the_fleet_converges() -> Result<()> {
    const TEST: &str = "a_node_with_a_skewed_clock_does_not_freeze_tags_and_the_fleet_converges";
    if !lab_available(TEST) || !require(TEST, Tool::Faketime) {
        return Ok(());
    }
    let scale = Scale::from_env();
    let (mut rng, _) = seeded_rng(TEST);
    // Nodes 0 and 1 keep time; node 2 runs three hours ahead.
    const AHEAD: usize = 2;
    let mut specs = vec![NodeSpec::default(); scale.nodes.max(3)];
    specs[AHEAD].clock_offset = Some("+3h".to_owned());
    let fleet = LabFleet::start("skew", 43, &specs)?;
    let repo = "faults/clock";
    let everyone: Vec<usize> = (0..specs.len()).collect();
    let honest: Vec<usize> = everyone.iter().copied().filter(|&i| i != AHEAD).collect();

    // A push on an honest node reaches every node, the skewed one included.
    let one = scale.image(&mut rng);
    one.push(&fleet.client(0), repo, "one")?;
    fleet.wait_tag(&everyone, repo, "one", &one.digest, CONVERGE_TIMEOUT)?;
    all_pulled(
        pull_on(&fleet, &everyone, &one, repo, "one"),
        &fleet,
        "pulling an honest push",
    )?;

    // The node from the future writes a tag, then an honest node writes it again: the honest
    // write must take effect (a record three hours ahead must not pin the tag).
    let future = scale.image(&mut rng);
    future.push(&fleet.client(AHEAD), repo, "moving")?;
    let now = scale.image(&mut rng);
    now.push(&fleet.client(0), repo, "moving")?;
    fleet.wait_tag(&honest, repo, "moving", &now.digest, CONVERGE_TIMEOUT)?;
    all_pulled(
        pull_on(&fleet, &honest, &now, repo, "moving"),
        &fleet,
        "pulling the honest write of a tag the skewed node wrote first",
    )?;
    // And the honest nodes keep agreeing on it (the future record did not win later).
    let more = scale.image(&mut rng);
    more.push(&fleet.client(1), repo, "moving")?;
    fleet.wait_tag(&honest, repo, "moving", &more.digest, CONVERGE_TIMEOUT)?;

    // A push on the skewed node of a tag nobody else writes is still an image of the fleet's.
    let own = scale.image(&mut rng);
    own.push(&fleet.client(AHEAD), repo, "from-the-future")?;
    own.check_on(&fleet.client(AHEAD), repo, "from-the-future")?;
    fleet.finish()
}

#[test]
fn nodes_with_skewed_clocks_agree_with_the_fleet() -> Result<()> {
    const TEST: &str = "nodes_with_skewed_clocks_agree_with_the_fleet";
    if !lab_available(TEST) || !require(TEST, Tool::Faketime) {
        return Ok(());
    }
    let scale = Scale::from_env();
    let (mut rng, _) = seeded_rng(TEST);
    // Nodes 0 and 1 keep time; node 2 runs three hours ahead, node 3 three hours behind.
    const AHEAD: usize = 2;
    const BEHIND: usize = 3;
    let mut specs = vec![NodeSpec::default(); scale.nodes.max(4)];
    specs[AHEAD].clock_offset = Some("+3h".to_owned());
    specs[BEHIND].clock_offset = Some("-3h".to_owned());
    let fleet = LabFleet::start("skew2", 47, &specs)?;
    let repo = "faults/clock";
    let everyone: Vec<usize> = (0..specs.len()).collect();

    // An honest push reaches every node, the one behind included.
    let one = scale.image(&mut rng);
    one.push(&fleet.client(0), repo, "one")?;
    fleet.wait_tag(&everyone, repo, "one", &one.digest, CONVERGE_TIMEOUT)?;

    // After the node ahead wrote a tag, a later honest write is the fleet's answer everywhere,
    // on the node ahead too.
    let future = scale.image(&mut rng);
    future.push(&fleet.client(AHEAD), repo, "moving")?;
    let now = scale.image(&mut rng);
    now.push(&fleet.client(0), repo, "moving")?;
    fleet.wait_tag(&everyone, repo, "moving", &now.digest, CONVERGE_TIMEOUT)?;

    // A push acknowledged by a skewed node is an image of the fleet's, not of that node alone.
    for (node, tag) in [(AHEAD, "from-ahead"), (BEHIND, "from-behind")] {
        let image = scale.image(&mut rng);
        image.push(&fleet.client(node), repo, tag)?;
        fleet.wait_tag(&everyone, repo, tag, &image.digest, CONVERGE_TIMEOUT)?;
    }
    fleet.finish()
}

#[test]
fn half_the_fleet_restarted_at_once_comes_back_reconnects_and_serves() -> Result<()> {
    const TEST: &str = "half_the_fleet_restarted_at_once_comes_back_reconnects_and_serves";
    if !lab_available(TEST) {
        return Ok(());
    }
    let scale = Scale::from_env();
    let (mut rng, _) = seeded_rng(TEST);
    let n = scale.nodes;
    let mut fleet = LabFleet::start("half", 44, &vec![NodeSpec::default(); n])?;
    let repo = "faults/restart";
    let everyone: Vec<usize> = (0..n).collect();
    let (restarted, stayed): (Vec<usize>, Vec<usize>) = everyone.iter().partition(|&&i| i % 2 == 0);

    let before = scale.image(&mut rng);
    before.push(&fleet.client(0), repo, "before")?;
    fleet.wait_tag(&everyone, repo, "before", &before.digest, CONVERGE_TIMEOUT)?;
    all_pulled(
        pull_on(&fleet, &everyone, &before, repo, "before"),
        &fleet,
        "pulling before the restart",
    )?;

    // SIGKILL half the fleet at once, then start them all again at once.
    for &i in &restarted {
        fleet.node_mut(i).kill_hard();
    }
    let started = Instant::now();
    let results: Vec<(usize, Result<()>)> = std::thread::scope(|s| {
        let mut nodes: Vec<(usize, &mut shoal_tests::ShoalProcess)> = Vec::new();
        for (i, node) in (0..n).zip(fleet.nodes_mut()) {
            if restarted.contains(&i) {
                nodes.push((i, node));
            }
        }
        let handles: Vec<_> = nodes
            .into_iter()
            .map(|(i, node)| (i, s.spawn(move || node.restart())))
            .collect();
        handles
            .into_iter()
            .map(|(i, h)| {
                (
                    i,
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("restart thread panicked"))),
                )
            })
            .collect()
    });
    for (i, result) in results {
        result.with_context(|| format!("restarting node {i}"))?;
    }
    fleet.wait_connected(RECONNECT_TIMEOUT)?;
    eprintln!(
        "{TEST}: {} nodes back and connected in {:?}",
        restarted.len(),
        started.elapsed()
    );
    all_pulled(
        pull_on(&fleet, &everyone, &before, repo, "before"),
        &fleet,
        "serving after the restart",
    )?;
    // Pushes on either half reach the whole fleet.
    let on_restarted = scale.image(&mut rng);
    on_restarted.push(&fleet.client(restarted[0]), repo, "after-a")?;
    let on_stayed = scale.image(&mut rng);
    on_stayed.push(&fleet.client(stayed[0]), repo, "after-b")?;
    fleet.wait_tag(
        &everyone,
        repo,
        "after-a",
        &on_restarted.digest,
        CONVERGE_TIMEOUT,
    )?;
    fleet.wait_tag(
        &everyone,
        repo,
        "after-b",
        &on_stayed.digest,
        CONVERGE_TIMEOUT,
    )?;
    all_pulled(
        pull_on(&fleet, &everyone, &on_restarted, repo, "after-a"),
        &fleet,
        "pulling a push made on a restarted node",
    )?;
    all_pulled(
        pull_on(&fleet, &everyone, &on_stayed, repo, "after-b"),
        &fleet,
        "pulling a push made on a node that stayed up",
    )?;
    fleet.finish()
}
