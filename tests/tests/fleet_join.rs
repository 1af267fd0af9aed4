//! The README's fleet example, with real `shoal` processes: `shoal fleet init` on the first node
//! prints a join token; a node started with `--join TOKEN` and a running node told `shoal fleet
//! join TOKEN` become members (the token carries the first node's address); a push to one node
//! pulls through another with no trust rule anywhere. A node of a second fleet, pointed at the
//! first node, is disconnected and learns nothing.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use rand::RngCore;
use shoal_tests::tools::assert_layout_matches;
use shoal_tests::{OciImage, ShoalProcess, Tool, require, run_ok, seeded_rng, wait_until};

const CLIENT_TIMEOUT: Duration = Duration::from_secs(300);
const QUIC_ONLY: [&str; 3] = ["--no-mdns", "--p2p-listen", "/ip4/127.0.0.1/udp/0/quic-v1"];

fn args(extra: &[&str]) -> Vec<String> {
    QUIC_ONLY
        .iter()
        .chain(extra)
        .map(|s| (*s).to_owned())
        .collect()
}

/// A node's peer ids, as `shoal peers` prints them.
fn peers(node: &ShoalProcess) -> Vec<String> {
    node.cli(&["peers"])
        .map(|o| {
            o.stdout
                .lines()
                .filter_map(|l| l.split(' ').next())
                .filter(|id| id.starts_with("12D3"))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

fn peer_id(node: &ShoalProcess) -> Result<String> {
    wait_until(Duration::from_secs(30), "the node's identity line", || {
        node.p2p_identity().is_some()
    })?;
    Ok(node.p2p_identity().context("identity line vanished")?.0)
}

fn skopeo(args: &[&str]) -> Result<()> {
    run_ok(Command::new("skopeo").args(args), CLIENT_TIMEOUT)?;
    Ok(())
}

#[test]
fn the_readme_fleet_example_works_and_another_fleet_is_kept_out() -> Result<()> {
    const TEST: &str = "the_readme_fleet_example_works_and_another_fleet_is_kept_out";
    if !require(TEST, Tool::Skopeo) {
        return Ok(());
    }
    let (mut rng, _seed) = seeded_rng(TEST);
    let work = tempfile::Builder::new().prefix("shoal-join-").tempdir()?;
    let image = OciImage::build(&work.path().join("image"), 4.0, rng.next_u64())?;

    // 1. `shoal fleet init` on the first node.
    let first = ShoalProcess::start_fleet_node(&args(&[]))?;
    let init = first.cli(&["fleet", "init"])?;
    let token = init.stdout.trim().to_owned();
    ensure!(
        token.starts_with("shoaljoin1."),
        "no join token: {}",
        init.describe()
    );
    // 2. `shoal node --join TOKEN` on another: it finds the first node through the token.
    let second = ShoalProcess::start_fleet_node(&args(&["--join", &token]))?;
    // 3. `shoal fleet join TOKEN` on a node that runs already.
    let third = ShoalProcess::start_fleet_node(&args(&[]))?;
    third.cli(&["fleet", "join", &token])?;
    let ids: Vec<String> = [&first, &second, &third]
        .iter()
        .map(|n| peer_id(n))
        .collect::<Result<_>>()?;
    for (node, name) in [(&second, "second"), (&third, "third")] {
        wait_until(
            Duration::from_secs(60),
            &format!("the {name} node connected to the first"),
            || peers(node).contains(&ids[0]),
        )?;
    }

    // Push to the first, pull through the third: no trust rule anywhere.
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        &image.skopeo_ref(),
        &format!("docker://{}/team/app:1", first.addr()),
    ])?;
    let pulled = work.path().join("pulled");
    let pull = |node: &ShoalProcess, out: &std::path::Path| -> Result<()> {
        skopeo(&[
            "copy",
            "--src-tls-verify=false",
            "--preserve-digests",
            "--dest-oci-accept-uncompressed-layers",
            &format!("docker://{}/team/app:1", node.addr()),
            &format!("oci:{}:pulled", out.display()),
        ])
    };
    wait_until(Duration::from_secs(60), "the tag on the third node", || {
        third
            .client()
            .head(
                "/v2/team/app/manifests/1",
                &[("Accept", "application/vnd.oci.image.manifest.v1+json")],
            )
            .is_ok_and(|r| r.status == 200)
    })?;
    pull(&third, &pulled).with_context(|| third.log_tail(40))?;
    assert_layout_matches(&pulled, "pulled", &image)?;

    // A node of another fleet, pointed at the first node: cut off, it learns nothing.
    let first_addr = first
        .p2p_identity()
        .and_then(|(id, addrs, _)| addrs.first().map(|a| format!("{a}/p2p/{id}")))
        .context("the first node's address")?;
    let stranger = ShoalProcess::start_fleet_node(&args(&["--peer", &first_addr]))?;
    stranger.cli(&["fleet", "init"])?;
    let stranger_id = peer_id(&stranger)?;
    wait_until(
        Duration::from_secs(60),
        "the first node to have dropped the stranger",
        || !peers(&first).contains(&stranger_id) && !peers(&stranger).contains(&ids[0]),
    )?;
    std::thread::sleep(Duration::from_secs(3));
    let r = stranger.client().head(
        "/v2/team/app/manifests/1",
        &[("Accept", "application/vnd.oci.image.manifest.v1+json")],
    )?;
    ensure!(
        r.status == 404,
        "the stranger resolves the tag: {}",
        r.describe()
    );
    ensure!(
        !peers(&first).contains(&stranger_id),
        "the stranger is connected again"
    );
    Ok(())
}

/// `Authorization: Basic` for `user:password`.
fn basic(user: &str, password: &str) -> String {
    use base64::Engine as _;
    let raw = format!("{user}:{password}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

#[test]
fn a_second_admin_named_at_founding_signs_what_every_node_accepts() -> Result<()> {
    // The second admin makes its key on its own node and gives the founder the public half.
    let second_key = std::cell::RefCell::new(String::new());
    let second = ShoalProcess::start_prepared("127.0.0.1:0", &[], |dir| {
        let out = ShoalProcess::cli_on(dir, &["keys", "admin"])?;
        *second_key.borrow_mut() = out.stdout.trim().to_owned();
        Ok(())
    })?;
    let second_key = second_key.into_inner();
    ensure!(second_key.starts_with("ed25519:"), "no key: {second_key:?}");
    // The founder's loopback clients log in like everyone else, so the token is checked.
    let founder = ShoalProcess::start_fleet_node(&args(&["--local-clients", "authenticated"]))?;
    let token = founder
        .cli(&["fleet", "init", "--admin", &second_key])?
        .stdout
        .trim()
        .to_owned();
    second.cli(&["fleet", "join", &token])?;
    let status = founder.cli(&["fleet", "status"])?.stdout;
    ensure!(status.contains(&second_key), "admins: {status}");

    // A token the second admin signs works on the founder's node.
    let minted = second.cli(&[
        "token",
        "create",
        "--principal",
        "ci",
        "--repo",
        "team/*",
        "--actions",
        "pull",
    ])?;
    let access = minted.stdout.trim().to_owned();
    let list = |auth: &str| {
        founder
            .client()
            .get("/v2/team/app/tags/list", &[("Authorization", auth)])
    };
    let answer = list(&basic("ci", &access))?;
    ensure!(
        answer.status == 404 && String::from_utf8_lossy(&answer.body).contains("NAME_UNKNOWN"),
        "the second admin's token was not accepted: {}",
        answer.describe()
    );
    // One from the admin of another fleet is not.
    let stranger = ShoalProcess::start_fleet_node(&args(&[]))?;
    stranger.cli(&["fleet", "init"])?;
    let foreign = stranger.cli(&[
        "token",
        "create",
        "--principal",
        "ci",
        "--repo",
        "team/*",
        "--actions",
        "pull",
    ])?;
    let answer = list(&basic("ci", foreign.stdout.trim()))?;
    ensure!(
        answer.status == 401,
        "a foreign admin's token was accepted: {}",
        answer.describe()
    );

    // A policy the second admin signs reaches the founder.
    second.cli(&["repo", "set", "secret/*", "--private"])?;
    wait_until(
        Duration::from_secs(60),
        "the second admin's policy on the founder",
        || {
            founder
                .cli(&["fleet", "status"])
                .is_ok_and(|o| o.stdout.contains("secret/*"))
        },
    )?;
    Ok(())
}
