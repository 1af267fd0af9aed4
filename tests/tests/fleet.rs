//! Three real `shoal` processes on loopback, over QUIC: an image pushed with skopeo to node 1
//! is pulled byte-identical from node 3, which learned the tag by gossip and fetched the bytes
//! from its peers; with node 1 killed, node 3 still serves it; with a docker daemon present,
//! `docker pull` and `docker run` through node 3 work too.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use rand::RngCore;
use shoal_tests::tools::assert_layout_matches;
use shoal_tests::{OciImage, ShoalProcess, Tool, require, run_ok, seeded_rng, wait_until};

const CLIENT_TIMEOUT: Duration = Duration::from_secs(300);
const QUIC_ONLY: [&str; 3] = ["--no-mdns", "--p2p-listen", "/ip4/127.0.0.1/udp/0/quic-v1"];

fn args(extra: &[String]) -> Vec<String> {
    QUIC_ONLY
        .iter()
        .map(|s| (*s).to_owned())
        .chain(extra.iter().cloned())
        .collect()
}

/// A node's `/p2p` address and publisher key, once it has printed them.
fn identity(node: &ShoalProcess) -> Result<(String, String)> {
    wait_until(
        Duration::from_secs(30),
        "the node's p2p identity line",
        || node.p2p_identity().is_some_and(|(_, a, _)| !a.is_empty()),
    )?;
    let (peer, addrs, key) = node.p2p_identity().context("identity line vanished")?;
    Ok((format!("{}/p2p/{peer}", addrs[0]), key))
}

fn peers(node: &ShoalProcess) -> usize {
    node.client()
        .get("/_shoal/v1/peers", &[])
        .ok()
        .and_then(|r| r.json().ok())
        .and_then(|v| v["peers"].as_array().map(Vec::len))
        .unwrap_or(0)
}

fn pull(node: &ShoalProcess, reference: &str, out: &Path) -> Result<()> {
    run_ok(
        Command::new("skopeo").args([
            "copy",
            "--src-tls-verify=false",
            "--preserve-digests",
            "--dest-oci-accept-uncompressed-layers",
            &format!("docker://{}/{reference}", node.addr()),
            &format!("oci:{}:pulled", out.display()),
        ]),
        CLIENT_TIMEOUT,
    )
    .with_context(|| format!("skopeo pull from a node; its log:\n{}", node.log_tail(40)))?;
    Ok(())
}

#[test]
fn three_nodes_push_on_one_pull_on_another_survive_losing_the_publisher() -> Result<()> {
    const TEST: &str = "three_nodes_push_on_one_pull_on_another_survive_losing_the_publisher";
    if !require(TEST, Tool::Skopeo) {
        return Ok(());
    }
    let (mut rng, _seed) = seeded_rng(TEST);
    let work = tempfile::Builder::new().prefix("shoal-fleet-").tempdir()?;
    let image = OciImage::build(&work.path().join("image"), 24.0, rng.next_u64())?;

    let mut n1 = ShoalProcess::start_fleet_node(&args(&[]))?;
    let (addr1, key1) = identity(&n1)?;
    let trust = format!("{key1}=team/*");
    let n2 = ShoalProcess::start_fleet_node(&args(&[
        "--peer".into(),
        addr1.clone(),
        "--trust".into(),
        trust.clone(),
    ]))?;
    let (addr2, _) = identity(&n2)?;
    let n3 = ShoalProcess::start_fleet_node(&args(&[
        "--peer".into(),
        addr1,
        "--peer".into(),
        addr2,
        "--trust".into(),
        trust,
    ]))?;
    wait_until(
        Duration::from_secs(30),
        "node 3 to reach both peers",
        || peers(&n3) >= 2,
    )?;

    run_ok(
        Command::new("skopeo").args([
            "copy",
            "--dest-tls-verify=false",
            &image.skopeo_ref(),
            &format!("docker://{}/team/app:1", n1.addr()),
        ]),
        CLIENT_TIMEOUT,
    )
    .context("skopeo push to node 1")?;

    // Node 3 learns the tag from gossip; nothing was pushed to it.
    wait_until(Duration::from_secs(30), "node 3 to list team/app:1", || {
        let tags = n3
            .client()
            .get("/v2/team/app/tags/list", &[])
            .ok()
            .and_then(|r| r.json().ok());
        tags.is_some_and(|t| {
            t["tags"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x == "1"))
        })
    })?;
    let out = work.path().join("from-node-3");
    pull(&n3, "team/app:1", &out)?;
    assert_layout_matches(&out, "pulled", &image)?;

    // The publisher goes away; node 3 holds the image and serves it alone.
    n1.kill_hard();
    let again = work.path().join("after-node-1-died");
    pull(&n3, "team/app:1", &again)?;
    assert_layout_matches(&again, "pulled", &image)?;

    if !require(TEST, Tool::DockerDaemon) {
        return Ok(());
    }
    let tag = format!("localhost:{}/team/app:1", n3.addr().port());
    let docker = |args: &[&str]| {
        let mut c = Command::new("docker");
        c.args(args);
        c
    };
    let _ = shoal_tests::run(
        &mut docker(&["rmi", "--force", &tag]),
        Duration::from_secs(60),
    );
    let result = (|| -> Result<()> {
        run_ok(&mut docker(&["pull", &tag]), CLIENT_TIMEOUT)
            .context("docker pull through node 3")?;
        let ran = run_ok(&mut docker(&["run", "--rm", &tag]), CLIENT_TIMEOUT)?;
        ensure!(
            ran.stdout.trim() == "hello from shoal",
            "docker run printed {:?}",
            ran.stdout
        );
        Ok(())
    })();
    let _ = shoal_tests::run(
        &mut docker(&["rmi", "--force", &tag]),
        Duration::from_secs(60),
    );
    result
}
