//! Preheat with real nodes in one process: a subscribed node fetches the content of a new tag
//! without a client asking (only for the repositories it subscribes to, only at a tag's newest
//! record, at its rate limit); `shoal prefetch` and the admin endpoint behind it fetch an image
//! with progress and report errors; and a member that may not read a repository cannot make
//! another node fetch it.

mod testnet;

use std::time::{Duration, Instant};

use shoal_node::config::AccessConfig;
use shoal_node::prefetch::{PrefetchConfig, Rate};
use shoal_node::registry::admin::{PrefetchEvent, RemoteAnswer};
use shoal_protocol::Digest;
use shoal_protocol::fleet::{Grant, PolicyBody, Principal, RepoSettings, Visibility};
use shoal_protocol::message::{PrefetchAnswer, SyncRequest, SyncResponse};
use testnet::admin::{Admin, apply};
use testnet::{Image, TestNet, TestNode, http, image, wait_until};

const WAIT: Duration = Duration::from_secs(30);

fn subscribed(patterns: &[&str], rate: &str) -> PrefetchConfig {
    PrefetchConfig {
        subscribe: patterns.iter().map(|p| p.parse().unwrap()).collect(),
        rate: rate.parse::<Rate>().unwrap(),
    }
}

/// Bytes of `img`'s blobs (config and layers) the node holds as whole blobs.
async fn held(node: &TestNode, img: &Image) -> u64 {
    let mut bytes = 0;
    for b in &img.blobs {
        let size = node.node().store().blob_size(&Digest::sha256(b)).await;
        bytes += size.unwrap().unwrap_or(0);
    }
    bytes
}

fn size(img: &Image) -> u64 {
    img.blobs.iter().map(|b| b.len() as u64).sum()
}

async fn wait_held(node: &TestNode, img: &Image, what: &str) {
    wait_until(WAIT, what, || async {
        (held(node, img).await == size(img)).then_some(())
    })
    .await;
}

async fn wait_record(node: &TestNode, repo: &str, tag: &str) {
    wait_until(WAIT, &format!("the record of {repo}:{tag}"), || async {
        node.has_record(repo, tag).await.then_some(())
    })
    .await;
}

/// Posts a prefetch to the node's admin endpoint and returns its status and events.
async fn prefetch(node: &TestNode, body: serde_json::Value) -> (u16, Vec<PrefetchEvent>) {
    let r = http(
        node.http_addr(),
        "POST",
        "/_shoal/v1/prefetch",
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    )
    .await;
    let events = if r.status == 200 {
        String::from_utf8(r.body)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    } else {
        Vec::new()
    };
    (r.status, events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subscribed_node_fetches_a_new_tag_without_a_client_and_nothing_else() {
    let mut net = TestNet::with_identities(3);
    net.prefetch.insert(1, subscribed(&["prod/*"], "1GiB/s"));
    for _ in 0..3 {
        net.start_next().await;
    }
    net.wait_connected(2).await;
    let (publisher, subscriber, bystander) = (&net.nodes[0], &net.nodes[1], &net.nodes[2]);
    // The repository it does not subscribe to goes first: once the subscribed one is fetched,
    // the other would have been too.
    let other = image(1, &[300_000]);
    publisher.push("team/app", "1", &other).await;
    let wanted = image(2, &[5 << 20, 1000]);
    publisher.push("prod/web", "1", &wanted).await;
    wait_held(
        subscriber,
        &wanted,
        "the subscribed tag's blobs on the subscriber",
    )
    .await;
    assert!(subscriber.has_record("team/app", "1").await);
    assert_eq!(
        held(subscriber, &other).await,
        0,
        "a repository it does not subscribe to was fetched"
    );
    // And it is served locally now: the pull needs no peer.
    subscriber.pull_and_check("prod/web", "1", &wanted).await;
    wait_record(bystander, "prod/web", "1").await;
    assert_eq!(
        held(bystander, &wanted).await,
        0,
        "a node without subscriptions fetched content"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tag_moved_while_queued_is_fetched_only_at_its_newest_record() {
    let mut net = TestNet::with_identities(2);
    net.prefetch.insert(1, subscribed(&["prod/*"], "1MiB/s"));
    for _ in 0..2 {
        net.start_next().await;
    }
    net.wait_connected(1).await;
    let (publisher, subscriber) = (&net.nodes[0], &net.nodes[1]);
    // A first image keeps the subscriber's worker paced for about three seconds.
    let busy = image(3, &[3 << 20]);
    publisher.push("prod/big", "1", &busy).await;
    wait_record(subscriber, "prod/big", "1").await;
    let (old, new) = (image(4, &[200_000]), image(5, &[200_001]));
    publisher.push("prod/app", "1", &old).await;
    publisher.push("prod/app", "1", &new).await;
    wait_held(subscriber, &new, "the newest image of the tag").await;
    assert_eq!(
        subscriber.tag_digest("prod/app", "1").await.as_deref(),
        Some(new.digest.to_string().as_str())
    );
    let old_layer = Digest::sha256(&old.blobs[1]);
    let store = subscriber.node().store();
    assert_eq!(
        store.blob_size(&old_layer).await.unwrap(),
        None,
        "the replaced record's layer was fetched"
    );
    assert!(store.partial_in_progress(&old_layer).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn subscriptions_fetch_at_the_configured_rate() {
    const RATE: u64 = 1 << 20;
    const LAYER: usize = 512 << 10;
    let mut net = TestNet::with_identities(2);
    net.prefetch
        .insert(1, subscribed(&["prod/app"], &RATE.to_string()));
    for _ in 0..2 {
        net.start_next().await;
    }
    net.wait_connected(1).await;
    let (publisher, subscriber) = (&net.nodes[0], &net.nodes[1]);
    let img = image(6, &[LAYER, LAYER, LAYER, LAYER]);
    publisher.push("prod/app", "1", &img).await;
    let t0 = Instant::now();
    // `wait_until`, keeping each sample.
    let mut samples = Vec::new();
    loop {
        let bytes = held(subscriber, &img).await;
        samples.push((t0.elapsed(), bytes));
        if bytes == size(&img) {
            break;
        }
        assert!(
            t0.elapsed() < WAIT,
            "timed out waiting for the image on the subscriber"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = t0.elapsed();
    // Each blob's fetch starts once the one before has had its time at the rate: the last
    // layer starts about 1.5 s after the first (at full speed it would take milliseconds).
    assert!(
        elapsed >= Duration::from_millis(1300),
        "fetched in {elapsed:?}, faster than the rate allows"
    );
    // At no point more than the rate allows so far, plus the blob under way.
    for (at, bytes) in samples {
        let allowed = (at.as_secs_f64() * RATE as f64) as u64 + LAYER as u64 + 4096;
        assert!(bytes <= allowed, "{bytes} bytes held after {at:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_prefetch_endpoint_fetches_an_image_with_progress_and_reports_errors() {
    let mut net = TestNet::with_identities(3);
    net.access.insert(
        2,
        AccessConfig {
            local_clients: shoal_node::auth::LocalClients::Authenticated,
            ..AccessConfig::default()
        },
    );
    // The publisher shares the site, so that the site's node has a holder next to it.
    net.sites.insert(0, "shop-17".into());
    net.sites.insert(2, "shop-17".into());
    for _ in 0..3 {
        net.start_next().await;
    }
    net.wait_connected(2).await;
    let (publisher, node) = (&net.nodes[0], &net.nodes[1]);
    let img = image(7, &[3 << 20, 2000]);
    publisher.push("team/app", "1", &img).await;
    wait_record(node, "team/app", "1").await;

    let (status, events) = prefetch(
        node,
        serde_json::json!({"images": ["team/app:1", "team/app:nope", "not an image"]}),
    )
    .await;
    assert_eq!(status, 200);
    let total = size(&img) + img.manifest.len() as u64;
    let progress: Vec<(u64, u64)> = events
        .iter()
        .filter_map(|e| match e {
            PrefetchEvent::Progress { image, done, total } if image == "team/app:1" => {
                Some((*done, *total))
            }
            _ => None,
        })
        .collect();
    assert!(progress.len() >= 2, "progress: {events:?}");
    assert!(progress.iter().all(|(_, t)| *t == total));
    assert!(
        progress.windows(2).all(|w| w[0].0 <= w[1].0),
        "{progress:?}"
    );
    assert_eq!(progress.last(), Some(&(total, total)));
    assert!(events.contains(&PrefetchEvent::Done {
        image: "team/app:1".into(),
        bytes: total
    }));
    let failed = |name: &str| {
        events.iter().find_map(|e| match e {
            PrefetchEvent::Failed { image, error } if image == name => Some(error.clone()),
            _ => None,
        })
    };
    assert!(
        failed("team/app:nope").is_some_and(|e| e.contains("no record")),
        "{events:?}"
    );
    assert!(failed("not an image").is_some(), "{events:?}");
    assert_eq!(held(node, &img).await, size(&img));

    // The command line: the same through the admin socket, a JSON summary, a failing exit code
    // when an image failed.
    let img2 = image(8, &[100_000]);
    publisher.push("team/app", "2", &img2).await;
    wait_record(node, "team/app", "2").await;
    let config_home = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_shoal"))
        .arg("prefetch")
        .arg("--data-dir")
        .arg(node.dir.path())
        .args(["--json", "team/app:2", "team/app:missing"])
        .env("XDG_CONFIG_HOME", config_home.path())
        .env_remove("SHOAL_CONFIG")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    let summary: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(summary["failed"], 1, "{summary}");
    let results = summary["results"].as_array().unwrap();
    assert!(
        results
            .iter()
            .any(|r| r["event"] == "done" && r["image"] == "team/app:2")
    );
    assert!(
        results
            .iter()
            .any(|r| r["event"] == "failed" && r["image"] == "team/app:missing")
    );
    assert_eq!(held(node, &img2).await, size(&img2));
    // Not on a terminal and without --json: plain lines.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_shoal"))
        .arg("prefetch")
        .arg("--data-dir")
        .arg(node.dir.path())
        .arg("team/app:2")
        .env("XDG_CONFIG_HOME", config_home.path())
        .env_remove("SHOAL_CONFIG")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("team/app:2: fetching ")),
        "{stdout}"
    );
    assert!(
        stdout.lines().any(|l| l.starts_with("team/app:2: done (")),
        "{stdout}"
    );

    // By site: the connected nodes of the site are asked, and fetch it; a site with no
    // connected node is an error.
    let shop = net.nodes[2].node().network().peer_id();
    wait_until(WAIT, "node 1 to know node 2's site", || async {
        (node.node().network().peer_site(&shop).as_deref() == Some("shop-17")).then_some(())
    })
    .await;
    let (status, events) = prefetch(
        node,
        serde_json::json!({"images": ["team/app:2"], "sites": ["shop-17", "nowhere"]}),
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        events.contains(&PrefetchEvent::Remote {
            image: "team/app:2".into(),
            node: shop.to_string(),
            answer: RemoteAnswer::Queued,
        }),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| matches!(e, PrefetchEvent::Failed { error, .. } if error.contains("nowhere"))),
        "{events:?}"
    );
    // The publisher, in the site too, was asked as well; nothing was fetched here.
    assert_eq!(events.len(), 3, "{events:?}");
    wait_held(&net.nodes[2], &img2, "the image on the site's node").await;

    // Only an admin may use it: a node whose loopback clients must authenticate refuses an
    // anonymous one, and fetches nothing.
    let (status, _) = prefetch(&net.nodes[2], serde_json::json!({"images": ["team/app:1"]})).await;
    assert_eq!(status, 401);
    // Malformed or oversized asks are refused whole.
    for bad in [
        serde_json::json!({"images": []}),
        serde_json::json!({"images": vec!["team/app:1"; 65]}),
        serde_json::json!({"images": ["team/app:1"], "nodes": ["not-a-peer-id"]}),
        serde_json::json!({"image": "team/app:1"}),
    ] {
        assert_eq!(prefetch(node, bad.clone()).await.0, 400, "{bad}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_without_read_access_cannot_make_a_node_prefetch() {
    let admin = Admin::new(9);
    let mut net = TestNet::with_identities(3);
    net.trust_each_other = false;
    net.sync_interval = Duration::from_secs(1);
    net.access.insert(0, admin.access(&["app"]));
    net.access.insert(1, admin.access(&["app"]));
    net.access.insert(2, admin.access(&[]));
    for _ in 0..3 {
        net.start_next().await;
    }
    net.wait_connected(2).await;
    let (owner, target, outsider) = (&net.nodes[0], &net.nodes[1], &net.nodes[2]);
    apply(
        owner,
        admin.sign(
            PolicyBody::Repo {
                pattern: "secret/*".parse().unwrap(),
                settings: Some(RepoSettings {
                    visibility: Visibility::Private,
                    ..RepoSettings::default()
                }),
            },
            0,
        ),
    )
    .await;
    apply(
        owner,
        admin.sign(
            PolicyBody::Grant {
                id: "app".parse().unwrap(),
                grant: Some(Grant {
                    principal: Principal::Group("app".parse().unwrap()),
                    repos: "secret/*".parse().unwrap(),
                    // Push too: a private repository's records count only from nodes granted it.
                    actions: "pull,push".parse().unwrap(),
                    expires_ms: None,
                }),
            },
            0,
        ),
    )
    .await;
    let repo: shoal_protocol::RepoName = "secret/app".parse().unwrap();
    let granted = owner.identity.publisher();
    for node in [target, outsider] {
        let repo = repo.clone();
        wait_until(WAIT, "the policies on every member", || async {
            let auth = node.node().tags().auth();
            (auth.settings(&repo).visibility == Visibility::Private
                && auth.peer_may_read(&granted, &repo))
            .then_some(())
        })
        .await;
    }
    let img = image(10, &[400_000]);
    owner.push("secret/app", "1", &img).await;
    wait_record(target, "secret/app", "1").await;

    // The outsider is a member, but has no grant: refused, and nothing is fetched.
    let ask = SyncRequest::Prefetch {
        repo: repo.clone(),
        reference: "1".parse().unwrap(),
    };
    let to_target = target.node().network().peer_id();
    let answer = outsider
        .node()
        .network()
        .sync(to_target, ask.clone())
        .await
        .unwrap();
    assert_eq!(answer, SyncResponse::Prefetch(PrefetchAnswer::Denied));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(held(target, &img).await, 0, "the refused ask was fetched");

    // A member with the grant, through `shoal prefetch --node`: queued, and fetched.
    let (status, events) = prefetch(
        owner,
        serde_json::json!({"images": ["secret/app:1"], "nodes": [to_target.to_string()]}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        events,
        vec![PrefetchEvent::Remote {
            image: "secret/app:1".into(),
            node: to_target.to_string(),
            answer: RemoteAnswer::Queued,
        }]
    );
    wait_held(target, &img, "the asked image on the target").await;
}
