//! Garbage collection of the real `shoal` binary: `shoal gc` through a running node and on a
//! stopped one's directory, and SIGKILL in the middle of a collection.
//!
//! Each round makes garbage (images pushed and deleted, blobs nothing names), starts
//! `shoal gc --grace 0s` against the running node and SIGKILLs the node: every other round a
//! random few milliseconds later (anywhere, from before the mark to after the sweep), the
//! others a random few milliseconds after the first garbage blob left the disk, in the middle
//! of the sweep. The garbage files left on disk say where the kill landed, and at least one
//! kill must have cut a sweep short (some garbage gone, some left). After every kill
//! `shoal fsck` must pass on the directory as the kill left it, and after a restart every image
//! still tagged must pull byte-identical; a collection left to finish frees every garbage blob
//! the cut ones left. `SHOAL_TEST_SEED` replays a run.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use rand::{Rng, RngCore};
use shoal_tests::http::{OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST};
use shoal_tests::{ShoalProcess, seeded_rng, sha256_digest};

/// Rounds of garbage-then-kill.
const ROUNDS: usize = 8;
/// Deleted images and loose blobs made garbage per round.
const GARBAGE_PER_ROUND: usize = 60;

/// An image kept tagged: its tag and every blob with its bytes.
struct Kept {
    tag: String,
    manifest: Vec<u8>,
    blobs: Vec<(String, Vec<u8>)>,
}

/// Pushes an image of one layer (shared from `layers` when given) under `tag`.
fn push(shoal: &ShoalProcess, tag: &str, layer: Vec<u8>, rng: &mut impl RngCore) -> Result<Kept> {
    let client = shoal.client();
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","nonce":{}}}"#,
        rng.next_u64()
    )
    .into_bytes();
    let c = client.push_blob("gc/app", &config)?;
    let l = client.push_blob("gc/app", &layer)?;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": c, "size": config.len()},
        "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": l, "size": layer.len()}],
    }))?;
    let r = client.put_manifest("gc/app", tag, OCI_MANIFEST, &manifest)?;
    ensure!(r.status == 201, "pushing {tag}: {}", r.describe());
    Ok(Kept {
        tag: tag.to_owned(),
        manifest,
        blobs: vec![(c, config), (l, layer)],
    })
}

fn check(shoal: &ShoalProcess, kept: &[Kept], when: &str) -> Result<()> {
    let client = shoal.client();
    for k in kept {
        let m = client.get_manifest("gc/app", &k.tag)?;
        ensure!(m.status == 200, "{when}: tag {}: {}", k.tag, m.describe());
        ensure!(
            m.body == k.manifest,
            "{when}: tag {} names another manifest",
            k.tag
        );
        for (digest, bytes) in &k.blobs {
            let b = client.get_blob("gc/app", digest)?;
            ensure!(b.status == 200, "{when}: blob {digest}: {}", b.describe());
            ensure!(&b.body == bytes, "{when}: blob {digest} differs");
        }
    }
    Ok(())
}

fn fsck_clean(shoal: &ShoalProcess, when: &str) -> Result<()> {
    let out = shoal.fsck()?;
    ensure!(out.success(), "shoal fsck {when}:\n{}", out.describe());
    Ok(())
}

/// Where the running node keeps the blob `digest` (`sha256:<hex>`).
fn blob_path(shoal: &ShoalProcess, digest: &str) -> std::path::PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    shoal
        .data_dir()
        .join("blobs/sha256")
        .join(&hex[..2])
        .join(hex)
}

/// How many of `garbage` are still on disk.
fn present(shoal: &ShoalProcess, garbage: &[String]) -> usize {
    garbage
        .iter()
        .filter(|d| blob_path(shoal, d).exists())
        .count()
}

#[test]
fn a_collection_killed_at_any_point_leaves_every_tagged_image_whole() -> Result<()> {
    let (mut rng, _seed) = seeded_rng("a_collection_killed_at_any_point");
    let mut shoal = ShoalProcess::start()?;
    let shared: Vec<Vec<u8>> = (0..3)
        .map(|_| {
            let mut b = vec![0u8; 64 * 1024];
            rng.fill_bytes(&mut b);
            b
        })
        .collect();
    let mut kept = Vec::new();
    // Every blob only garbage names (the shared layers stay live), across rounds.
    let mut garbage: Vec<String> = Vec::new();
    let mut cut_mid_sweep = 0;
    for round in 0..ROUNDS {
        let client = shoal.client();
        // Kept: one image a round, its layer shared with garbage.
        let layer = shared[round % shared.len()].clone();
        kept.push(push(&shoal, &format!("keep{round}"), layer, &mut rng)?);
        // Garbage: images pushed and deleted (some sharing the kept layers), and loose blobs.
        for n in 0..GARBAGE_PER_ROUND {
            if n % 2 == 0 {
                let shares = n % 4 == 0;
                let layer = if shares {
                    shared[n % shared.len()].clone()
                } else {
                    let mut b = vec![0u8; 8 * 1024];
                    rng.fill_bytes(&mut b);
                    b
                };
                let gone = push(&shoal, "gone", layer, &mut rng)?;
                garbage.push(sha256_digest(&gone.manifest));
                garbage.extend(
                    gone.blobs
                        .iter()
                        .take(if shares { 1 } else { 2 })
                        .map(|(d, _)| d.clone()),
                );
                let r = client.request(
                    "DELETE",
                    "/v2/gc/app/manifests/gone",
                    &[],
                    shoal_tests::http::Body::None,
                )?;
                ensure!(r.status == 202, "deleting: {}", r.describe());
            } else {
                let mut b = vec![0u8; 4 * 1024];
                rng.fill_bytes(&mut b);
                garbage.push(client.push_blob("gc/app", &b)?);
            }
        }
        let before = present(&shoal, &garbage);
        let started = std::time::Instant::now();
        let mut gc = Command::new(shoal_tests::shoal_binary()?)
            .args(["gc", "--grace", "0s", "--data-dir"])
            .arg(shoal.data_dir())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting shoal gc")?;
        if round % 2 == 0 {
            // Anywhere: before the mark, in it, in the sweep or after.
            std::thread::sleep(Duration::from_millis(rng.random_range(0..400)));
        } else {
            // In the sweep: a few milliseconds after its first blob went.
            while present(&shoal, &garbage) == before
                && gc.try_wait()?.is_none()
                && started.elapsed() < Duration::from_secs(20)
            {
                std::thread::sleep(Duration::from_millis(1));
            }
            std::thread::sleep(Duration::from_millis(rng.random_range(0..20)));
        }
        shoal.kill_hard();
        let after = present(&shoal, &garbage);
        let out = gc.wait_with_output()?;
        let mid_sweep = 0 < after && after < before;
        cut_mid_sweep += usize::from(mid_sweep);
        println!(
            "round {round}: killed after {} ms, gc {}; garbage on disk {before} -> {after}{}: {}",
            started.elapsed().as_millis(),
            if out.status.success() {
                "finished"
            } else {
                "was cut"
            },
            if mid_sweep { " (mid-sweep)" } else { "" },
            String::from_utf8_lossy(&out.stdout).trim()
        );
        fsck_clean(&shoal, &format!("after the kill of round {round}"))?;
        shoal.restart()?;
        check(&shoal, &kept, &format!("round {round}"))?;
    }
    ensure!(
        cut_mid_sweep > 0,
        "no kill landed in the middle of a sweep: the test proved nothing about one"
    );
    // A collection left to finish frees what is left, and `--dry-run` first says what it will.
    let dry = shoal.cli(&["gc", "--grace", "0s", "--dry-run"])?;
    ensure!(dry.stdout.contains("would free"), "{}", dry.stdout);
    let done = shoal.cli(&["gc", "--grace", "0s"])?;
    println!("{}", done.stdout.trim());
    let again = shoal.cli(&["gc", "--grace", "0s", "--dry-run"])?;
    ensure!(
        again.stdout.contains("would free 0 bytes in 0 blobs"),
        "garbage left after a whole collection: {}",
        again.stdout
    );
    check(&shoal, &kept, "after the last collection")?;
    let left = present(&shoal, &garbage);
    ensure!(
        left == 0,
        "{left} garbage blobs a killed collection left were not freed by a whole one"
    );
    // On a stopped node's directory, `shoal gc` works the same.
    shoal.terminate()?;
    let offline = shoal.cli(&["gc", "--grace", "0s"])?;
    ensure!(
        offline.stdout.contains("freed 0 bytes"),
        "{}",
        offline.stdout
    );
    fsck_clean(&shoal, "at the end")?;
    shoal.restart()?;
    check(&shoal, &kept, "at the end")?;
    let digest = sha256_digest(&kept[0].manifest);
    ensure!(
        shoal.client().get_manifest("gc/app", &digest)?.status == 200,
        "the kept manifest by digest"
    );
    Ok(())
}

#[test]
fn lifecycle_preview_names_what_a_policy_expires_and_why() -> Result<()> {
    let (mut rng, _seed) = seeded_rng("lifecycle_preview");
    let mut shoal = ShoalProcess::start()?;
    let mut pushed = Vec::new();
    for tag in ["prod-1", "prod-2", "prod-3", "dev-1"] {
        let mut layer = vec![0u8; 4096];
        rng.fill_bytes(&mut layer);
        pushed.push(push(&shoal, tag, layer, &mut rng)?);
        // Record times are in milliseconds: one push after the other.
        std::thread::sleep(Duration::from_millis(5));
    }
    let policy = shoal.data_dir().join("policy.json");
    std::fs::write(
        &policy,
        r#"{"rules": [{"rulePriority": 1, "description": "keep the last 2 prod",
            "selection": {"tagStatus": "tagged", "tagPatternList": ["prod-*"],
                          "countType": "imageCountMoreThan", "countNumber": 2},
            "action": {"type": "expire"}}]}"#,
    )?;
    let policy = policy.display().to_string();
    let expect = |out: &str| -> Result<()> {
        let oldest = sha256_digest(&pushed[0].manifest);
        ensure!(
            out.contains(&oldest)
                && out.contains("prod-1")
                && out.contains("rule 1 (keep the last 2 prod)"),
            "the oldest prod image is not listed: {out}"
        );
        ensure!(out.lines().count() == 1, "only prod-1 expires: {out}");
        Ok(())
    };
    // Through the running node, then on its directory: the same answer, and nothing changed.
    let online = shoal.cli(&["lifecycle", "preview", "gc/app", "--policy", &policy])?;
    expect(&online.stdout)?;
    let du = shoal.cli(&["du"])?;
    ensure!(
        du.stdout.contains("gc/app") && du.stdout.contains("reclaimable by gc: 0 bytes"),
        "shoal du: {}",
        du.stdout
    );
    shoal.terminate()?;
    let offline = shoal.cli(&["lifecycle", "preview", "gc/app", "--policy", &policy])?;
    expect(&offline.stdout)?;
    shoal.restart()?;
    check(&shoal, &pushed, "after the previews")?;
    // A policy ECR would refuse is refused, saying why.
    std::fs::write(shoal.data_dir().join("bad.json"), r#"{"rules": []}"#)?;
    let bad = shoal.data_dir().join("bad.json").display().to_string();
    let refused = shoal.cli(&["lifecycle", "preview", "gc/app", "--policy", &bad]);
    let message = format!("{:#}", refused.expect_err("an empty policy was accepted"));
    ensure!(message.contains("1 to 50 rules"), "{message}");
    Ok(())
}

#[test]
fn status_prints_where_the_disk_stands() -> Result<()> {
    let (mut rng, _seed) = seeded_rng("status_prints_where_the_disk_stands");
    let shoal = ShoalProcess::start_prepared(
        "127.0.0.1:0",
        &["--max-disk".to_owned(), "1GiB".to_owned()],
        |_| Ok(()),
    )?;
    let mut layer = vec![0u8; 200 * 1024];
    rng.fill_bytes(&mut layer);
    let kept = push(&shoal, "1", layer, &mut rng)?;
    let pushed: usize = kept.blobs.iter().map(|(_, b)| b.len()).sum();

    let json = shoal.cli(&["status", "--json"])?;
    let status: serde_json::Value = serde_json::from_str(&json.stdout)?;
    let disk = &status["disk"];
    let figure = |name: &str| {
        disk[name]
            .as_u64()
            .with_context(|| format!("no {name} in {status}"))
    };
    ensure!(figure("used_bytes")? >= pushed as u64, "{status}");
    ensure!(figure("published_bytes")? >= pushed as u64, "{status}");
    ensure!(figure("cached_bytes")? == 0, "{status}");
    ensure!(figure("max_disk_bytes")? == 1 << 30, "{status}");
    ensure!(
        0 < figure("fs_free_bytes")? && figure("fs_free_bytes")? <= figure("fs_total_bytes")?,
        "{status}"
    );

    let human = shoal.cli(&["status"])?;
    let text = &human.stdout;
    ensure!(
        text.contains("disk: the store uses")
            && text.contains("quota: 1073741824 bytes")
            && text.contains(&format!("published {} bytes", figure("published_bytes")?)),
        "shoal status:\n{text}"
    );
    Ok(())
}
