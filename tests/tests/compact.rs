//! Compaction of the records log in the real `shoal` binary: `shoal compact` through a running
//! node while pushes go on, SIGKILL in the middle of one, and on a stopped node's directory.
//!
//! A pusher thread pushes images over and over to a few tags, so that records supersede each
//! other, and notes each acknowledged push. Meanwhile `shoal compact` runs through the node a
//! few times, then once more with a SIGKILL a random few milliseconds after it started. After
//! every kill `shoal fsck` must pass on the directory as the kill left it, and after a restart
//! every acknowledged manifest must pull byte-identical by digest, with its blobs, and every tag
//! must name its last acknowledged manifest (or the one whose push the kill cut short).
//! `SHOAL_TEST_SEED` replays a run.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use shoal_tests::http::{OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST, RegistryClient};
use shoal_tests::{ShoalProcess, seeded_rng, sha256_digest};

/// Rounds of pushes-compactions-kill.
const ROUNDS: usize = 4;
/// Tags the pushes go to (each pushed many times).
const TAGS: usize = 8;
const REPO: &str = "compact/app";

/// An image pushed: its manifest and blobs.
#[derive(Clone)]
struct Image {
    manifest: Vec<u8>,
    blobs: Vec<(String, Vec<u8>)>,
}

/// What the pusher saw: acknowledged images, the last acknowledged per tag, and the push in
/// flight when it stopped.
#[derive(Default)]
struct Pushed {
    images: Vec<Image>,
    tags: BTreeMap<String, Image>,
    in_flight: Option<(String, Image)>,
}

fn image(rng: &mut impl RngCore) -> Image {
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","nonce":{}}}"#,
        rng.next_u64()
    )
    .into_bytes();
    let mut layer = vec![0u8; 2048];
    rng.fill_bytes(&mut layer);
    let c = sha256_digest(&config);
    let l = sha256_digest(&layer);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": c, "size": config.len()},
        "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": l, "size": layer.len()}],
    }))
    .unwrap_or_default();
    Image {
        manifest,
        blobs: vec![(c, config), (l, layer)],
    }
}

fn push(client: &RegistryClient, tag: &str, img: &Image) -> Result<()> {
    for (_, bytes) in &img.blobs {
        client.push_blob(REPO, bytes)?;
    }
    let r = client.put_manifest(REPO, tag, OCI_MANIFEST, &img.manifest)?;
    ensure!(r.status == 201, "pushing {tag}: {}", r.describe());
    Ok(())
}

/// Pushes until `stop` or the first failure (the node was killed).
fn pusher(
    client: RegistryClient,
    seed: u64,
    stop: Arc<AtomicBool>,
    pushed: Arc<Mutex<Pushed>>,
) -> usize {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let tag = format!("t{}", rng.random_range(0..TAGS));
        let img = image(&mut rng);
        lock(&pushed).in_flight = Some((tag.clone(), img.clone()));
        if push(&client, &tag, &img).is_err() {
            return n;
        }
        let mut p = lock(&pushed);
        p.in_flight = None;
        p.images.push(img.clone());
        p.tags.insert(tag, img);
        n += 1;
    }
    n
}

fn lock(p: &Mutex<Pushed>) -> std::sync::MutexGuard<'_, Pushed> {
    p.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn check(shoal: &ShoalProcess, pushed: &Pushed, when: &str) -> Result<()> {
    let client = shoal.client();
    for img in &pushed.images {
        let digest = sha256_digest(&img.manifest);
        let m = client.get_manifest(REPO, &digest)?;
        ensure!(
            m.status == 200,
            "{when}: manifest {digest}: {}",
            m.describe()
        );
        ensure!(m.body == img.manifest, "{when}: manifest {digest} differs");
        for (d, bytes) in &img.blobs {
            let b = client.get_blob(REPO, d)?;
            ensure!(b.status == 200, "{when}: blob {d}: {}", b.describe());
            ensure!(&b.body == bytes, "{when}: blob {d} differs");
        }
    }
    for (tag, img) in &pushed.tags {
        let m = client.get_manifest(REPO, tag)?;
        ensure!(m.status == 200, "{when}: tag {tag}: {}", m.describe());
        let cut_short = pushed
            .in_flight
            .as_ref()
            .is_some_and(|(t, i)| t == tag && i.manifest == m.body);
        ensure!(
            m.body == img.manifest || cut_short,
            "{when}: tag {tag} names neither its last acknowledged manifest nor the one in flight"
        );
    }
    Ok(())
}

fn fsck_clean(shoal: &ShoalProcess, when: &str) -> Result<()> {
    let out = shoal.fsck()?;
    ensure!(out.success(), "shoal fsck {when}:\n{}", out.describe());
    Ok(())
}

#[test]
fn compactions_during_pushes_and_a_kill_in_one_lose_no_acknowledged_push() -> Result<()> {
    let (mut rng, seed) = seeded_rng("compactions_during_pushes");
    let mut shoal = ShoalProcess::start()?;
    let pushed = Arc::new(Mutex::new(Pushed::default()));
    for round in 0..ROUNDS {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (client, stop, pushed) = (shoal.client(), stop.clone(), pushed.clone());
            let seed = seed.wrapping_add(round as u64);
            std::thread::spawn(move || pusher(client, seed, stop, pushed))
        };
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(rng.random_range(50..300)));
            let out = shoal
                .cli(&["compact"])
                .with_context(|| format!("the node's log:\n{}", shoal.log_tail(40)))?;
            ensure!(
                out.stdout.contains("journal generation"),
                "shoal compact: {}",
                out.stdout
            );
            println!("round {round}: {}", out.stdout.trim());
        }
        // A compaction the kill cuts short (or not, depending on the dice).
        let compact = Command::new(shoal_tests::shoal_binary()?)
            .args(["compact", "--data-dir"])
            .arg(shoal.data_dir())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting shoal compact")?;
        std::thread::sleep(Duration::from_millis(rng.random_range(0..60)));
        shoal.kill_hard();
        stop.store(true, Ordering::Relaxed);
        let n = thread
            .join()
            .map_err(|_| anyhow::anyhow!("pusher panicked"))?;
        let out = compact.wait_with_output()?;
        println!(
            "round {round}: {n} pushes; the last compaction {} before the kill",
            if out.status.success() {
                "finished"
            } else {
                "was cut"
            }
        );
        fsck_clean(&shoal, &format!("after the kill of round {round}"))?;
        shoal.restart()?;
        check(&shoal, &lock(&pushed), &format!("round {round}"))?;
        // The push the kill cut short is settled now: if its tag names it, it counts.
        let in_flight = lock(&pushed).in_flight.take();
        if let Some((tag, img)) = in_flight {
            let m = shoal.client().get_manifest(REPO, &tag)?;
            if m.status == 200 && m.body == img.manifest {
                let mut p = lock(&pushed);
                p.images.push(img.clone());
                p.tags.insert(tag, img);
            }
        }
    }
    // On a stopped node's directory, `shoal compact` works the same, and the store after it
    // is whole, index rebuilt from the compacted journal or not.
    shoal.terminate()?;
    let offline = shoal.cli(&["compact"])?;
    ensure!(
        offline.stdout.contains("journal generation"),
        "{}",
        offline.stdout
    );
    fsck_clean(&shoal, "after an offline compaction")?;
    std::fs::remove_dir_all(shoal.data_dir().join("index"))?;
    shoal.restart()?;
    check(&shoal, &lock(&pushed), "after a cold start")?;
    Ok(())
}
