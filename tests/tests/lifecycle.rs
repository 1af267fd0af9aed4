//! The `shoal` binary's process contract, from outside: signals, exit codes, `shoal fsck`.
//!
//! - SIGTERM and SIGINT stop `shoal node` with exit status 0, and what was pushed is served
//!   after the next start;
//! - `shoal fsck` exits 0 on a consistent store and 1, naming the blob, when a blob file is
//!   corrupt; `--repair` moves it aside, after which the node answers 404 for it and never
//!   serves the corrupt bytes;
//! - a second node on the data dir of a running one does not start (two writers would
//!   corrupt the store), and the first one keeps serving.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use rand::RngCore;
use shoal_tests::http::{OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST};
use shoal_tests::{ShoalProcess, seeded_rng, sha256_digest, wait_until};

/// Pushes a random blob and an image manifest naming it (tag `v1`) into `repo`.
fn push_image(shoal: &ShoalProcess, repo: &str, seed_bytes: &mut dyn RngCore) -> Result<Vec<u8>> {
    let client = shoal.client();
    let mut layer = vec![0u8; 300_000];
    seed_bytes.fill_bytes(&mut layer);
    let layer_digest = client.push_blob(repo, &layer)?;
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_digest = client.push_blob_chunked(repo, config, 17)?;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": layer_digest, "size": layer.len()}],
    }))?;
    let resp = client.put_manifest(repo, "v1", OCI_MANIFEST, &manifest)?;
    ensure!(resp.status == 201, "PUT manifest:\n{}", resp.describe());
    Ok(layer)
}

/// `<data>/blobs/sha256/<2 hex>/<hex>`, the layout DESIGN.md gives the store.
fn blob_file(shoal: &ShoalProcess, digest: &str) -> PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    shoal
        .data_dir()
        .join("blobs")
        .join("sha256")
        .join(&hex[..2])
        .join(hex)
}

#[test]
fn sigterm_and_sigint_stop_the_node_with_exit_0() -> Result<()> {
    let (mut rng, seed) = seeded_rng("sigterm_and_sigint_stop_the_node_with_exit_0");
    let mut shoal = ShoalProcess::start()?;
    let layer = push_image(&shoal, "life/signals", &mut rng)?;
    let digest = sha256_digest(&layer);

    for signal in ["TERM", "INT"] {
        let status = shoal.stop_with_signal(signal)?;
        ensure!(
            status.success(),
            "SIG{signal}: shoal exited with {status} (seed {seed}); log:\n{}",
            shoal.log_tail(40)
        );
        let fsck = shoal.fsck()?;
        ensure!(
            fsck.success(),
            "fsck after SIG{signal}:\n{}",
            fsck.describe()
        );
        shoal.restart()?;
        let resp = shoal.client().get_blob("life/signals", &digest)?;
        ensure!(
            resp.status == 200 && resp.body == layer,
            "after SIG{signal} and a restart the blob is not served:\n{}",
            resp.describe()
        );
        let resp = shoal.client().get_manifest("life/signals", "v1")?;
        ensure!(
            resp.status == 200,
            "after SIG{signal}, tag v1:\n{}",
            resp.describe()
        );
    }
    Ok(())
}

#[test]
fn fsck_exit_status_reports_a_corrupt_blob_and_repair_quarantines_it() -> Result<()> {
    let (mut rng, seed) = seeded_rng("fsck_exit_status_reports_a_corrupt_blob");
    let mut shoal = ShoalProcess::start()?;
    let layer = push_image(&shoal, "life/fsck", &mut rng)?;
    let digest = sha256_digest(&layer);
    let status = shoal.terminate()?;
    ensure!(status.success(), "SIGTERM: exit {status}");

    let clean = shoal.fsck()?;
    ensure!(
        clean.status.code() == Some(0),
        "fsck of a clean store:\n{}",
        clean.describe()
    );

    let path = blob_file(&shoal, &digest);
    let mut bytes = std::fs::read(&path).with_context(|| {
        format!(
            "the blob is not at {} (store layout changed?)",
            path.display()
        )
    })?;
    bytes[1234] ^= 0x5a;
    std::fs::write(&path, &bytes)?;

    let dirty = shoal.fsck()?;
    ensure!(
        dirty.status.code() == Some(1),
        "fsck of a store with a corrupt blob must exit 1 (seed {seed}):\n{}",
        dirty.describe()
    );
    let hex = digest.trim_start_matches("sha256:");
    ensure!(
        dirty.stdout.contains(hex) || dirty.stderr.contains(hex),
        "fsck does not name the corrupt blob {digest}:\n{}",
        dirty.describe()
    );

    let repair = shoal.fsck_repair()?;
    ensure!(
        !path.exists(),
        "fsck --repair left the corrupt blob in place:\n{}",
        repair.describe()
    );

    shoal.restart()?;
    let resp = shoal.client().get_blob("life/fsck", &digest)?;
    ensure!(
        resp.status == 404,
        "a quarantined blob must be unknown, not served:\n{}",
        resp.describe()
    );
    Ok(())
}

#[test]
fn a_second_node_on_a_running_nodes_data_dir_does_not_start() -> Result<()> {
    let (mut rng, _seed) = seeded_rng("a_second_node_on_a_running_nodes_data_dir_does_not_start");
    let mut first = ShoalProcess::start()?;
    let layer = push_image(&first, "life/twice", &mut rng)?;
    let data = first.data_dir().to_owned();

    match ShoalProcess::start_on(&data) {
        Ok(mut second) => {
            second.kill_hard();
            anyhow::bail!(
                "a second node started on {} while the first one runs; its log:\n{}",
                data.display(),
                second.log_tail(20)
            );
        }
        Err(e) => eprintln!("second node refused as expected: {e:#}"),
    }

    ensure!(
        first.is_running(),
        "the first node died when a second one tried its data dir"
    );
    let client = first.client();
    let mut ok = false;
    wait_until(Duration::from_secs(10), "the first node to serve", || {
        ok = client
            .get_blob("life/twice", &sha256_digest(&layer))
            .is_ok_and(|r| r.status == 200 && r.body == layer);
        ok
    })?;
    Ok(())
}
