//! Retention policies applied by a fleet, with real `shoal` processes: an admin sets an ECR
//! lifecycle policy for `team/*` ("keep the last 2 images tagged prod, and one untagged"); every
//! node's garbage collection expires the same tags from the same records and sweeps what only
//! they needed, while the images kept pull byte-identical and a repository the pattern does not
//! cover keeps everything.
//!
//! Hostile cases: a member without the admin key cannot set a policy; an invalid or oversized
//! policy is refused by the admin API (400, nothing stored); the expired records offered again
//! by anti-entropy (a node that had not collected yet) do not bring the tags back; a newer push
//! of an expired tag works.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use rand::RngCore;
use shoal_tests::http::{Body, OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST};
use shoal_tests::{ShoalProcess, seeded_rng, sha256_digest, wait_until};

const QUIC_ONLY: [&str; 3] = ["--no-mdns", "--p2p-listen", "/ip4/127.0.0.1/udp/0/quic-v1"];

const KEEP_TWO_PROD: &str = r#"{"rules": [
  {"rulePriority": 1, "description": "keep the last 2 prod images",
   "selection": {"tagStatus": "tagged", "tagPrefixList": ["prod"],
                 "countType": "imageCountMoreThan", "countNumber": 2},
   "action": {"type": "expire"}},
  {"rulePriority": 2, "description": "keep one untagged",
   "selection": {"tagStatus": "untagged", "countType": "imageCountMoreThan", "countNumber": 1},
   "action": {"type": "expire"}}
]}"#;

fn args(extra: &[&str]) -> Vec<String> {
    QUIC_ONLY
        .iter()
        .chain(extra)
        .map(|s| (*s).to_owned())
        .collect()
}

/// An image pushed: its manifest and each blob with its bytes (config, unique layer, shared).
struct Image {
    manifest: Vec<u8>,
    blobs: Vec<(String, Vec<u8>)>,
}

impl Image {
    fn digest(&self) -> String {
        sha256_digest(&self.manifest)
    }
}

/// Pushes an image of a unique layer and `shared` to `repo` on `node`, tagged `tag` (or by
/// digest, untagged, with `None`).
fn push(
    node: &ShoalProcess,
    repo: &str,
    tag: Option<&str>,
    shared: &[u8],
    rng: &mut impl RngCore,
) -> Result<Image> {
    let client = node.client();
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","nonce":{}}}"#,
        rng.next_u64()
    )
    .into_bytes();
    let mut layer = vec![0u8; 32 * 1024];
    rng.fill_bytes(&mut layer);
    let c = client.push_blob(repo, &config)?;
    let l = client.push_blob(repo, &layer)?;
    let s = client.push_blob(repo, shared)?;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": c, "size": config.len()},
        "layers": [
            {"mediaType": OCI_LAYER_GZIP, "digest": l, "size": layer.len()},
            {"mediaType": OCI_LAYER_GZIP, "digest": s, "size": shared.len()},
        ],
    }))?;
    let reference = tag.map_or_else(|| sha256_digest(&manifest), str::to_owned);
    let r = client.put_manifest(repo, &reference, OCI_MANIFEST, &manifest)?;
    ensure!(
        r.status == 201,
        "pushing {repo}:{reference}: {}",
        r.describe()
    );
    // Record times are in milliseconds: one push after the other.
    std::thread::sleep(Duration::from_millis(5));
    Ok(Image {
        manifest,
        blobs: vec![(c, config), (l, layer), (s, shared.to_vec())],
    })
}

/// The image pulls byte-identical from `node` under `reference`.
fn pulls(node: &ShoalProcess, repo: &str, reference: &str, image: &Image) -> Result<()> {
    let client = node.client();
    let m = client.get_manifest(repo, reference)?;
    ensure!(m.status == 200, "{repo}:{reference}: {}", m.describe());
    ensure!(
        m.body == image.manifest,
        "{repo}:{reference} names another manifest"
    );
    for (digest, bytes) in &image.blobs {
        let b = client.get_blob(repo, digest)?;
        ensure!(b.status == 200, "{repo} blob {digest}: {}", b.describe());
        ensure!(&b.body == bytes, "{repo} blob {digest} differs");
    }
    Ok(())
}

fn manifest_unknown(node: &ShoalProcess, repo: &str, tag: &str) -> Result<()> {
    let r = node.client().get_manifest(repo, tag)?;
    ensure!(
        r.status == 404 && String::from_utf8_lossy(&r.body).contains("MANIFEST_UNKNOWN"),
        "{repo}:{tag} should be gone: {}",
        r.describe()
    );
    Ok(())
}

/// `<data>/blobs/sha256/<2 hex>/<hex>`.
fn blob_file(node: &ShoalProcess, digest: &str) -> PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    node.data_dir()
        .join("blobs")
        .join("sha256")
        .join(&hex[..2])
        .join(hex)
}

fn tags(node: &ShoalProcess, repo: &str) -> Vec<String> {
    node.client()
        .get(&format!("/v2/{repo}/tags/list"), &[])
        .ok()
        .and_then(|r| r.json().ok())
        .and_then(|v| {
            v["tags"].as_array().map(|a| {
                a.iter()
                    .filter_map(|t| t.as_str().map(str::to_owned))
                    .collect()
            })
        })
        .unwrap_or_default()
}

fn peers(node: &ShoalProcess) -> usize {
    node.cli(&["peers"])
        .map(|o| o.stdout.lines().filter(|l| l.starts_with("12D3")).count())
        .unwrap_or(0)
}

/// `POST /_shoal/v1/fleet/policy` with a lifecycle policy text, as a client of the admin API.
fn post_lifecycle(node: &ShoalProcess, pattern: &str, policy: &str) -> Result<u16> {
    let body = serde_json::to_vec(&serde_json::json!({
        "body": {"Lifecycle": {"pattern": pattern, "policy": policy}}
    }))?;
    let r = node.client().request(
        "POST",
        "/_shoal/v1/fleet/policy",
        &[("content-type", "application/json")],
        Body::Bytes(&body),
    )?;
    Ok(r.status)
}

#[test]
fn a_fleet_retention_policy_expires_the_same_tags_on_every_node() -> Result<()> {
    const TEST: &str = "a_fleet_retention_policy_expires_the_same_tags_on_every_node";
    let (mut rng, seed) = seeded_rng(TEST);
    let mut n1 = ShoalProcess::start_fleet_node(&args(&[]))?;
    let token = n1.cli(&["fleet", "init"])?.stdout.trim().to_owned();
    ensure!(token.starts_with("shoaljoin1."), "no join token");
    let mut n2 = ShoalProcess::start_fleet_node(&args(&["--join", &token]))?;
    wait_until(Duration::from_secs(60), "the nodes to connect", || {
        peers(&n2) >= 1
    })?;

    let mut shared = vec![0u8; 16 * 1024];
    rng.fill_bytes(&mut shared);
    let mut prod = Vec::new();
    for n in 1..=5 {
        prod.push(push(
            &n1,
            "team/app",
            Some(&format!("prod-{n}")),
            &shared,
            &mut rng,
        )?);
    }
    let other: Vec<Image> = (1..=3)
        .map(|n| {
            push(
                &n1,
                "other/app",
                Some(&format!("prod-{n}")),
                &shared,
                &mut rng,
            )
        })
        .collect::<Result<_>>()?;
    let untagged_old = push(&n1, "team/app", None, &shared, &mut rng)?;
    let _untagged_new = push(&n1, "team/app", None, &shared, &mut rng)?;
    wait_until(Duration::from_secs(60), "node 2 to know every tag", || {
        tags(&n2, "team/app").len() == 5 && tags(&n2, "other/app").len() == 3
    })?;
    // Node 2 holds every prod image of team/app too.
    for (n, image) in prod.iter().enumerate() {
        pulls(&n2, "team/app", &format!("prod-{}", n + 1), image)
            .with_context(|| format!("seed {seed}; node 2 log:\n{}", n2.log_tail(30)))?;
    }

    // Hostile: a member without the admin key cannot set a policy.
    let policy_file = n1.data_dir().join("keep-two-prod.json");
    std::fs::write(&policy_file, KEEP_TWO_PROD)?;
    let policy_path = policy_file.display().to_string();
    let refused = n2.cli(&["lifecycle", "set", "team/*", "--policy", &policy_path]);
    let why = format!(
        "{:#}",
        refused.expect_err("a node without the admin key set a policy")
    );
    ensure!(why.contains("admin key"), "{why}");
    // Hostile: invalid and oversized policies are refused by the admin API, and nothing is kept.
    let oversized = KEEP_TWO_PROD.replace("keep the last 2 prod images", &"x".repeat(64 * 1024));
    for bad in [r#"{"rules": []}"#, "not json", oversized.as_str()] {
        let status = post_lifecycle(&n1, "team/*", bad)?;
        ensure!(status == 400, "an invalid policy got {status}");
    }
    let status = n1.cli(&["fleet", "status"])?.stdout;
    ensure!(
        !status.contains("lifecycle/"),
        "an invalid policy was kept: {status}"
    );
    let bad_file = n1.data_dir().join("bad.json");
    std::fs::write(&bad_file, r#"{"rules": []}"#)?;
    let bad = n1.cli(&[
        "lifecycle",
        "set",
        "team/*",
        "--policy",
        &bad_file.display().to_string(),
    ]);
    ensure!(
        format!("{:#}", bad.expect_err("the CLI sent an empty policy")).contains("1 to 50 rules"),
        "the CLI does not say why the policy is refused"
    );

    // The admin sets the policy; node 2 gets it and previews it without being given it.
    let set = n1.cli(&["lifecycle", "set", "team/*", "--policy", &policy_path])?;
    ensure!(set.stdout.contains("lifecycle/team/*"), "{}", set.stdout);
    wait_until(Duration::from_secs(60), "node 2 to hold the policy", || {
        n2.cli(&["lifecycle", "show"])
            .is_ok_and(|o| o.stdout.contains("team/*:"))
    })?;
    let preview = n2.cli(&["lifecycle", "preview", "team/app"])?.stdout;
    for n in 1..=5 {
        let listed = preview.contains(&format!("prod-{n})"));
        ensure!(listed == (n <= 3), "preview on node 2, prod-{n}: {preview}");
    }

    // A dry run says what would go and expires nothing.
    let dry = n1.cli(&["gc", "--grace", "0s", "--dry-run"])?.stdout;
    ensure!(dry.contains("would expire 4 images (3 tags)"), "{dry}");
    pulls(&n1, "team/app", "prod-1", &prod[0])?;

    // Node 1 collects. Node 2 has not yet: it still holds prod-1..3.
    let gc1 = n1.cli(&["gc", "--grace", "0s"])?.stdout;
    println!("node 1: {}", gc1.trim());
    ensure!(gc1.contains("expired 4 images (3 tags)"), "{gc1}");
    for n in 1..=3 {
        manifest_unknown(&n1, "team/app", &format!("prod-{n}"))?;
    }
    // Hostile: node 1 starts again and syncs with node 2, which offers the expired records
    // (and a tag pushed meanwhile, to know the sync happened): the tags stay gone.
    n1.terminate()?;
    let marker = push(&n2, "team/web", Some("marker"), &shared, &mut rng)?;
    n1.restart()?;
    wait_until(
        Duration::from_secs(60),
        "node 1 to sync from node 2",
        || tags(&n1, "team/web").contains(&"marker".to_owned()),
    )?;
    pulls(&n1, "team/web", "marker", &marker)?;
    for n in 1..=3 {
        manifest_unknown(&n1, "team/app", &format!("prod-{n}"))
            .with_context(|| format!("after the sync; log:\n{}", n1.log_tail(30)))?;
    }

    let gc2 = n2.cli(&["gc", "--grace", "0s"])?.stdout;
    println!("node 2: {}", gc2.trim());
    ensure!(gc2.contains("expired 3 images (3 tags)"), "{gc2}");

    for (node, name) in [(&n1, "node 1"), (&n2, "node 2")] {
        for n in 1..=3 {
            manifest_unknown(node, "team/app", &format!("prod-{n}")).context(name)?;
            // The expired images' own blobs are freed; the shared layer stays.
            for (digest, _) in &prod[n - 1].blobs[..2] {
                ensure!(
                    !blob_file(node, digest).exists(),
                    "{name}: {digest} of prod-{n} is still on disk"
                );
            }
            pulls(node, "other/app", &format!("prod-{n}"), &other[n - 1]).context(name)?;
        }
        for n in 4..=5 {
            pulls(node, "team/app", &format!("prod-{n}"), &prod[n - 1]).context(name)?;
        }
        ensure!(
            blob_file(node, &sha256_digest(&shared)).exists(),
            "{name}: shared layer"
        );
    }
    // The untagged manifest the policy expired is gone (with a grace period of 0s the
    // collection would have taken both untagged ones anyway: nothing names them).
    ensure!(
        !blob_file(&n1, &untagged_old.digest()).exists(),
        "the older untagged manifest is still on disk"
    );

    // A newer push of an expired tag works, and reaches the other node.
    let again = push(&n1, "team/app", Some("prod-1"), &shared, &mut rng)?;
    pulls(&n1, "team/app", "prod-1", &again)?;
    wait_until(
        Duration::from_secs(60),
        "node 2 to learn the new prod-1",
        || pulls(&n2, "team/app", "prod-1", &again).is_ok(),
    )?;

    for (node, name) in [(&mut n1, "node 1"), (&mut n2, "node 2")] {
        node.terminate()?;
        let fsck = node.fsck()?;
        ensure!(fsck.success(), "{name}: shoal fsck:\n{}", fsck.describe());
    }
    Ok(())
}
