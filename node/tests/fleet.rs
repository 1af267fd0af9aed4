//! Many nodes in one process over libp2p's memory transport: records gossip and converge, late
//! nodes catch up, untrusted, forged and replayed records change nothing, and content is fetched
//! from peers with bad providers detected.

mod testnet;

use std::sync::atomic::Ordering;
use std::time::Duration;

use shoal_protocol::{SignedTagRecord, SigningKey, TagRecord, TagTarget, codec};
use testnet::{TestNet, http, image, wait_until};

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn push_on_one_node_pull_byte_identical_on_another() {
    let net = TestNet::start(3).await;
    net.wait_connected(2).await;
    // Two layers span several 4 MiB chunks.
    let img = image(1, &[9 * 1024 * 1024 + 17, 1000]);
    net.nodes[0].push("team/app", "1", &img).await;
    let c = &net.nodes[2];
    wait_until(WAIT, "the record to reach node C", || async {
        c.has_record("team/app", "1").await.then_some(())
    })
    .await;
    c.pull_and_check("team/app", "1", &img).await;
    let tags = c.get("/v2/team/app/tags/list").await;
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&tags.body).unwrap()["tags"],
        serde_json::json!(["1"])
    );
    let catalog = net.nodes[1].get("/v2/_catalog").await;
    assert!(String::from_utf8_lossy(&catalog.body).contains("team/app"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_started_after_the_push_catches_up_by_anti_entropy() {
    let mut net = TestNet::with_identities(3);
    net.start_next().await;
    net.start_next().await;
    net.wait_connected(1).await;
    let img = image(2, &[5000]);
    net.nodes[0].push("team/late", "v1", &img).await;
    // The third node starts after the push: no gossip will ever carry the record to it.
    net.start_next().await;
    let late = &net.nodes[2];
    wait_until(WAIT, "the late node to catch up", || async {
        late.has_record("team/late", "v1").await.then_some(())
    })
    .await;
    late.pull_and_check("team/late", "v1", &img).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_pushes_of_one_tag_converge_to_one_winner() {
    let net = TestNet::start(4).await;
    net.wait_connected(3).await;
    let (a, b) = (image(3, &[100]), image(4, &[200]));
    tokio::join!(
        net.nodes[0].push("team/race", "latest", &a),
        net.nodes[1].push("team/race", "latest", &b)
    );
    let want = [a.digest.to_string(), b.digest.to_string()];
    let winner = wait_until(WAIT, "all nodes to agree", || async {
        let mut seen = Vec::new();
        for n in &net.nodes {
            seen.push(n.tag_digest("team/race", "latest").await?);
        }
        (seen.iter().all(|d| d == &seen[0])).then(|| seen[0].clone())
    })
    .await;
    assert!(want.contains(&winner), "winner {winner} is neither push");
    // And it stays agreed (nothing flips later).
    tokio::time::sleep(Duration::from_millis(500)).await;
    for n in &net.nodes {
        assert_eq!(
            n.tag_digest("team/race", "latest").await.as_deref(),
            Some(winner.as_str())
        );
    }
}

fn record(
    key: &SigningKey,
    repo: &str,
    tag: &str,
    target: Option<TagTarget>,
    ts: u64,
) -> SignedTagRecord {
    let r = TagRecord {
        repo: repo.parse().unwrap(),
        tag: tag.parse().unwrap(),
        target,
        timestamp_ms: ts,
        sequence: 0,
        publisher: key.public(),
    };
    SignedTagRecord::sign(&r, key).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn untrusted_forged_and_replayed_records_change_nothing() {
    let net = TestNet::start(2).await;
    net.wait_connected(1).await;
    let (a, b) = (&net.nodes[0], &net.nodes[1]);
    let img = image(5, &[300]);
    a.push("team/safe", "1", &img).await;
    wait_until(WAIT, "the record to reach B", || async {
        b.tag_digest("team/safe", "1").await
    })
    .await;
    let before = b.tag_digest("team/safe", "1").await;
    let stats = b.node().tags().stats();
    let (untrusted0, invalid0, stale0) = (
        stats.untrusted.load(Ordering::Relaxed),
        stats.invalid.load(Ordering::Relaxed),
        stats.stale.load(Ordering::Relaxed),
    );
    let far_future = u64::MAX / 2;

    // 1. A record from a key nobody trusts, claiming the tag with a newer timestamp.
    let stranger = SigningKey::from_seed([99; 32]);
    let tombstone = record(&stranger, "team/safe", "1", None, far_future);
    a.node().network().publish(&tombstone).await.unwrap();

    // 2. A forged record: A's own key named as publisher, but signed by the stranger.
    let a_key = a.identity.signing_key();
    let genuine = record(&a_key, "team/safe", "1", None, far_future);
    let mut bytes = codec::encode(&genuine).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55; // the signature is the last field
    let forged: SignedTagRecord = codec::decode(&bytes).unwrap();
    assert!(forged.verify().is_err());
    a.node().network().publish(&forged).await.unwrap();

    // 3. A replay of an old, genuine record: A tagged "1" long ago (timestamp 1).
    let old = record(&a_key, "team/safe", "1", None, 1);
    a.node().network().publish(&old).await.unwrap();

    wait_until(WAIT, "B to see and reject all three", || async {
        let s = b.node().tags().stats();
        (s.untrusted.load(Ordering::Relaxed) > untrusted0
            && s.invalid.load(Ordering::Relaxed) > invalid0
            && s.stale.load(Ordering::Relaxed) > stale0)
            .then_some(())
    })
    .await;
    assert_eq!(
        b.tag_digest("team/safe", "1").await,
        before,
        "the tag changed"
    );
    b.pull_and_check("team/safe", "1", &img).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_provider_serving_corrupt_bytes_is_detected_and_another_is_used() {
    let net = TestNet::start(3).await;
    net.wait_connected(2).await;
    let (a, b, c) = (&net.nodes[0], &net.nodes[1], &net.nodes[2]);
    let img = image(6, &[6 * 1024 * 1024]);
    a.push("team/bad", "1", &img).await;
    wait_until(WAIT, "B to have the record", || async {
        b.has_record("team/bad", "1").await.then_some(())
    })
    .await;
    b.pull_and_check("team/bad", "1", &img).await;
    // Corrupt A's copy of the big layer in place (same length, so only hashes can tell).
    let layer = shoal_protocol::Digest::sha256(&img.blobs[1]);
    let path = shoal_node::store::Layout::new(a.dir.path()).blob(&layer);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[5 * 1024 * 1024] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();

    wait_until(WAIT, "C to have the record", || async {
        c.has_record("team/bad", "1").await.then_some(())
    })
    .await;
    // Whichever provider C tries first, it ends with the right bytes.
    c.pull_and_check("team/bad", "1", &img).await;
}

/// A blob that only a corrupt peer holds is never stored or served whole, and the peer that sent
/// the bad chunk is banned. (A node that saw corrupt bytes from a peer bans it, so this runs on
/// its own pair: after the test above, C may already have banned A.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blob_only_a_corrupt_peer_holds_is_never_stored() {
    let net = TestNet::start(2).await;
    net.wait_connected(1).await;
    let (a, b) = (&net.nodes[0], &net.nodes[1]);
    let img = image(7, &[5 * 1024 * 1024]);
    a.push("team/bad", "2", &img).await;
    wait_until(WAIT, "B to have the record", || async {
        b.has_record("team/bad", "2").await.then_some(())
    })
    .await;
    let layer = shoal_protocol::Digest::sha256(&img.blobs[1]);
    let path = shoal_node::store::Layout::new(a.dir.path()).blob(&layer);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();

    let r = b.get(&format!("/v2/team/bad/blobs/{layer}")).await;
    // A download is streamed as it goes, so the answer may already be a 200 when the bad chunk
    // arrives; then the body stops short. Either way no unverified byte reaches the client.
    let good = &img.blobs[1];
    assert!(
        r.status == 404
            || (r.status == 200 && r.body.len() < good.len() && good.starts_with(&r.body)),
        "a blob only a corrupt peer holds was served: status {}, {} bytes",
        r.status,
        r.body.len()
    );
    assert!(
        !shoal_node::store::Layout::new(b.dir.path())
            .blob(&layer)
            .exists(),
        "corrupt bytes were stored"
    );
    let liar = a.node().network().peer_id();
    assert!(
        b.node().network().is_banned(&liar),
        "the peer that sent a corrupt chunk was not banned"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_record_gossip_never_carried_arrives_by_the_periodic_sync() {
    let mut net = TestNet::with_identities(2);
    net.sync_interval = Duration::from_secs(1);
    net.start_next().await;
    net.start_next().await;
    net.wait_connected(1).await;
    // Let the sync on connect finish, so only the periodic one can carry what follows.
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Committed on node 0 and never gossiped, as a record that gossip lost would be.
    let (repo, tag) = ("team/quiet".parse().unwrap(), "v1".parse().unwrap());
    net.nodes[0]
        .node()
        .tags()
        .publish(&repo, &tag, None, shoal_node::store::Batch::new())
        .await
        .expect("publish");
    assert!(net.nodes[0].has_record("team/quiet", "v1").await);
    wait_until(
        WAIT,
        "the record to reach node 1 by a periodic sync",
        || async {
            net.nodes[1]
                .has_record("team/quiet", "v1")
                .await
                .then_some(())
        },
    )
    .await;
}

/// The spec's delete: after `DELETE /v2/<name>/blobs/<digest>` answers 202, that repository
/// answers 404 for the blob, on the node that was pushed to and on one that pulled it through
/// the fleet, although the tag's record still names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deleted_layer_of_a_tagged_image_is_not_served() {
    let net = TestNet::start(2).await;
    net.wait_connected(1).await;
    let (a, b) = (&net.nodes[0], &net.nodes[1]);
    let img = image(8, &[300 * 1024]);
    a.push("team/del", "1", &img).await;
    wait_until(WAIT, "B to have the record", || async {
        b.has_record("team/del", "1").await.then_some(())
    })
    .await;
    b.pull_and_check("team/del", "1", &img).await;
    let layer = shoal_protocol::Digest::sha256(&img.blobs[1]);
    let path = format!("/v2/team/del/blobs/{layer}");
    for node in [a, b] {
        let r = http(node.http_addr(), "DELETE", &path, &[], b"").await;
        assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
        for method in ["GET", "HEAD"] {
            let r = http(node.http_addr(), method, &path, &[], b"").await;
            assert_eq!(r.status, 404, "{method} after the delete");
            if method == "GET" {
                assert!(
                    String::from_utf8_lossy(&r.body).contains("BLOB_UNKNOWN"),
                    "{}",
                    String::from_utf8_lossy(&r.body)
                );
            }
        }
        let r = http(node.http_addr(), "DELETE", &path, &[], b"").await;
        assert_eq!(r.status, 404, "a second delete");
    }
    // The manifest and the other blobs are untouched.
    let r = a.get("/v2/team/del/manifests/1").await;
    assert_eq!(r.status, 200);
}

/// A node with `[gc] interval_secs` set collects by itself: a deleted image's blobs go, what is
/// tagged stays, here and on the node that pulled it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_collects_garbage_on_its_schedule() {
    let mut net = TestNet::with_identities(2);
    net.gc = shoal_node::config::GcSchedule {
        interval: Some(Duration::from_millis(300)),
        grace: Duration::ZERO,
        ..Default::default()
    };
    net.start_next().await;
    net.start_next().await;
    net.wait_connected(1).await;
    let (a, b) = (&net.nodes[0], &net.nodes[1]);
    let (kept, gone) = (image(9, &[200 * 1024]), image(10, &[200 * 1024]));
    a.push("team/gc", "kept", &kept).await;
    a.push("team/gc", "gone", &gone).await;
    wait_until(WAIT, "B to have the records", || async {
        (b.has_record("team/gc", "kept").await && b.has_record("team/gc", "gone").await)
            .then_some(())
    })
    .await;
    b.pull_and_check("team/gc", "gone", &gone).await;
    b.pull_and_check("team/gc", "kept", &kept).await;
    let r = http(
        a.http_addr(),
        "DELETE",
        "/v2/team/gc/manifests/gone",
        &[],
        b"",
    )
    .await;
    assert_eq!(r.status, 202);
    let layer = shoal_protocol::Digest::sha256(&gone.blobs[1]);
    for node in [a, b] {
        let path = shoal_node::store::Layout::new(node.dir.path()).blob(&layer);
        wait_until(
            WAIT,
            "the deleted image's layer to be collected",
            || async { (!path.exists()).then_some(()) },
        )
        .await;
    }
    a.pull_and_check("team/gc", "kept", &kept).await;
    b.pull_and_check("team/gc", "kept", &kept).await;
}
