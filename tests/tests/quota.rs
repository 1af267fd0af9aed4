//! Edge quotas that know the fleet, on three real `shoal` processes: each runs with a small
//! `--max-disk` and carries the pin `prod/app:1 --copies 2`.
//!
//! Phase 1: `prod/app:1` is pushed to node 0 and every node publishes images of its own; every
//! node pulls everything, which puts each over its quota. The cached content goes (least
//! recently used first) and each node's usage falls under its quota, while what a node
//! published and the pinned image stay. An evicted image pulls again byte-identical (fetched
//! from the fleet).
//!
//! Phase 2: nodes 1 and 2 publish more, so that only pinned content is left to evict on both
//! at once: each gives up a pinned blob only if two other holders rank above it, so the pinned
//! image keeps at least two copies. A watcher thread counts the copies of every pinned blob in
//! the three data directories every few milliseconds through both phases. At the end `shoal
//! fsck` is clean on every node.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use shoal_tests::http::Body;
use shoal_tests::lab_fleet::TestImage;
use shoal_tests::process::LOOPBACK_P2P_ARGS;
use shoal_tests::{Launch, ShoalProcess, seeded_rng, wait_until};

/// Each node's quota, in bytes.
const MAX_DISK: u64 = 3_300_000;
const WAIT: Duration = Duration::from_secs(60);

fn blob_path(dir: &Path, digest: &str) -> PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    dir.join("blobs/sha256").join(&hex[..2]).join(hex)
}

fn publisher_key(dir: &Path) -> Result<String> {
    let out = ShoalProcess::cli_on(dir, &["keys", "show"])?;
    out.stdout
        .lines()
        .find_map(|l| {
            l.strip_prefix("publisher key:")
                .map(|k| k.trim().to_owned())
        })
        .context("no publisher key in `shoal keys show`")
}

fn p2p_addr(node: &ShoalProcess) -> Result<String> {
    wait_until(Duration::from_secs(30), "the node's p2p identity", || {
        node.p2p_identity().is_some_and(|(_, a, _)| !a.is_empty())
    })?;
    let (peer, addrs, _) = node.p2p_identity().context("identity line vanished")?;
    Ok(format!("{}/p2p/{peer}", addrs[0]))
}

fn quota_of(node: &ShoalProcess) -> Result<serde_json::Value> {
    let du = node.client().get("/_shoal/v1/du?grace_secs=0", &[])?;
    ensure!(du.status == 200, "du: {}", du.describe());
    Ok(du.json()?["quota"].clone())
}

/// Runs a quota round on `node` now.
fn round(node: &ShoalProcess) -> Result<serde_json::Value> {
    let r = node
        .client()
        .request("POST", "/_shoal/v1/quota", &[], Body::None)?;
    ensure!(r.status == 200, "quota round: {}", r.describe());
    r.json()
}

fn copies(dirs: &[PathBuf], digest: &str) -> usize {
    dirs.iter()
        .filter(|d| blob_path(d, digest).exists())
        .count()
}

#[test]
fn a_pinned_image_keeps_two_copies_while_every_node_evicts_under_quota_pressure() -> Result<()> {
    const TEST: &str =
        "a_pinned_image_keeps_two_copies_while_every_node_evicts_under_quota_pressure";
    let (mut rng, _seed) = seeded_rng(TEST);
    let work = tempfile::Builder::new().prefix("shoal-quota-").tempdir()?;
    let dirs: Vec<PathBuf> = (0..3).map(|i| work.path().join(format!("n{i}"))).collect();
    let mut keys = Vec::new();
    for d in &dirs {
        std::fs::create_dir_all(d)?;
        keys.push(publisher_key(d)?);
    }
    let mut nodes: Vec<ShoalProcess> = Vec::new();
    for dir in &dirs {
        let mut args: Vec<String> = LOOPBACK_P2P_ARGS.iter().map(|s| (*s).to_owned()).collect();
        args.extend(["--max-disk".to_owned(), MAX_DISK.to_string()]);
        for k in &keys {
            args.extend(["--trust".to_owned(), format!("{k}=*")]);
        }
        for n in &nodes {
            args.extend(["--peer".to_owned(), p2p_addr(n)?]);
        }
        nodes.push(ShoalProcess::start_launched(Launch {
            listen: "127.0.0.1:0".to_owned(),
            args,
            data_dir: Some(dir.clone()),
            ..Launch::default()
        })?);
    }
    let peers = |n: &ShoalProcess| {
        n.client()
            .get("/_shoal/v1/peers", &[])
            .ok()
            .and_then(|r| r.json().ok())
            .and_then(|v| v["peers"].as_array().map(Vec::len))
            .unwrap_or(0)
    };
    wait_until(WAIT, "every node to reach the other two", || {
        nodes.iter().all(|n| peers(n) >= 2)
    })?;
    let wait_tag = |n: &ShoalProcess, repo: &str, tag: &str| {
        wait_until(WAIT, &format!("{repo}:{tag} to arrive"), || {
            n.client()
                .get_manifest(repo, tag)
                .is_ok_and(|r| r.status == 200)
        })
    };

    // The pinned image, published on node 0, pinned on every node before anyone pulls it.
    let prod = TestImage::random(&mut rng, &[600_000, 500_000]);
    prod.push(&nodes[0].client(), "prod/app", "1")?;
    for n in &nodes {
        wait_until(WAIT, "prod/app:1's record", || {
            n.client()
                .get("/v2/prod/app/tags/list", &[])
                .ok()
                .and_then(|r| r.json().ok())
                .is_some_and(|t| {
                    t["tags"]
                        .as_array()
                        .is_some_and(|a| a.iter().any(|x| x == "1"))
                })
        })?;
        let out = n.cli(&["pin", "prod/app:1", "--copies", "2"])?;
        ensure!(out.stdout.contains("pinned prod/app:1"), "{}", out.stdout);
        let out = n.cli(&["pins"])?;
        ensure!(
            out.stdout.contains("prod/app:1  copies=2"),
            "{}",
            out.stdout
        );
    }
    for n in &nodes[1..] {
        prod.check_on(&n.client(), "prod/app", "1")?;
    }
    let mut pinned: Vec<String> = prod.blobs.iter().map(|(d, _)| d.clone()).collect();
    pinned.push(prod.digest.clone());
    wait_until(WAIT, "every node to hold the pinned image", || {
        pinned.iter().all(|d| copies(&dirs, d) == 3)
    })?;

    // Count the pinned copies from now on, all the time.
    let stop = Arc::new(AtomicBool::new(false));
    let fewest = Arc::new(AtomicUsize::new(3));
    let watcher = {
        let (stop, fewest, dirs, pinned) =
            (stop.clone(), fewest.clone(), dirs.clone(), pinned.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                for d in &pinned {
                    fewest.fetch_min(copies(&dirs, d), Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };

    // Phase 1: every node publishes images, every node pulls all of them.
    let publishes: [(usize, &str); 5] = [
        (0, "site0/a"),
        (1, "site1/a"),
        (1, "site1/b"),
        (2, "site2/a"),
        (2, "site2/b"),
    ];
    let mut images = Vec::new();
    for (i, repo) in publishes {
        let img = TestImage::random(&mut rng, &[700_000]);
        img.push(&nodes[i].client(), repo, "1")?;
        images.push((i, repo, img));
    }
    for n in &nodes {
        for (_, repo, img) in &images {
            wait_tag(n, repo, "1")?;
            img.check_on(&n.client(), repo, "1")
                .with_context(|| format!("pulling {repo}"))?;
        }
    }
    for (i, n) in nodes.iter().enumerate() {
        round(n)?;
        let q = quota_of(n)?;
        let used = q["used_bytes"].as_u64().unwrap_or(u64::MAX);
        ensure!(
            q["max_disk_bytes"].as_u64() == Some(MAX_DISK),
            "node {i}: {q}"
        );
        ensure!(used <= MAX_DISK, "node {i} is still over its quota: {q}");
        ensure!(
            q["evicted_bytes"].as_u64().unwrap_or(0) > 0,
            "node {i} evicted nothing: {q}"
        );
        ensure!(
            q["pinned_bytes"].as_u64().unwrap_or(0) > 0 || i == 0,
            "node {i}: {q}"
        );
        eprintln!("node {i} after phase 1: {q}");
    }
    let du = nodes[1].cli(&["du"])?;
    ensure!(du.stdout.contains("quota: "), "{}", du.stdout);
    // Node 1 pulled site0/a from node 0 and evicted it (all its cached content had to go):
    // the tag still resolves and the image comes back from the fleet, byte-identical.
    let (_, repo, site0) = &images[0];
    ensure!(
        site0
            .blobs
            .iter()
            .any(|(d, _)| !blob_path(&dirs[1], d).exists()),
        "node 1 still holds all of {repo}"
    );
    site0
        .check_on(&nodes[1].client(), repo, "1")
        .context("pulling an evicted image again")?;

    // Phase 2: nodes 1 and 2 publish more, so only pinned content is left to evict there.
    let mut more = Vec::new();
    for (i, repo) in [
        (1, "site1/c"),
        (1, "site1/d"),
        (2, "site2/c"),
        (2, "site2/d"),
    ] {
        let img = TestImage::random(&mut rng, &[800_000]);
        img.push(&nodes[i].client(), repo, "1")?;
        more.push((i, repo, img));
    }
    // Both nodes evict at once.
    std::thread::scope(|s| {
        for n in &nodes[1..] {
            s.spawn(|| round(n));
        }
    });
    std::thread::sleep(Duration::from_secs(3));
    for n in &nodes {
        round(n)?;
    }
    stop.store(true, Ordering::SeqCst);
    watcher
        .join()
        .map_err(|_| anyhow::anyhow!("the watcher panicked"))?;
    let fewest = fewest.load(Ordering::SeqCst);
    let held: Vec<usize> = pinned.iter().map(|d| copies(&dirs, d)).collect();
    eprintln!("pinned blobs' copies at the end: {held:?}; fewest seen: {fewest}");
    if fewest < 2 {
        for (i, n) in nodes.iter().enumerate() {
            let held: Vec<bool> = pinned
                .iter()
                .map(|d| blob_path(&dirs[i], d).exists())
                .collect();
            eprintln!("node {i} holds {held:?} of {pinned:?}; its pinned evictions:");
            for l in n
                .log_tail(5000)
                .lines()
                .filter(|l| l.contains("pinned") || l.contains("evict"))
            {
                eprintln!("  {l}");
            }
        }
        anyhow::bail!("a pinned blob fell to {fewest} copies");
    }

    // What a node published is all still there.
    for (i, repo, img) in images.iter().chain(&more) {
        for (d, _) in &img.blobs {
            ensure!(
                blob_path(&dirs[*i], d).exists(),
                "node {i} lost {d} of {repo}, which it published"
            );
        }
        ensure!(blob_path(&dirs[*i], &img.digest).exists());
    }
    for d in &pinned {
        ensure!(
            blob_path(&dirs[0], d).exists(),
            "node 0 lost {d}, which it published"
        );
    }
    // The pinned image still pulls from every node.
    for n in &nodes {
        prod.check_on(&n.client(), "prod/app", "1")?;
    }
    for (i, n) in nodes.iter_mut().enumerate() {
        n.terminate()?;
        let out = n.fsck()?;
        ensure!(out.success(), "shoal fsck on node {i}:\n{}", out.describe());
    }
    Ok(())
}
