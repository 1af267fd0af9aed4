//! The disk quota's parts on in-process nodes: how a node classifies what it holds (published
//! here, pinned, cached from the fleet), what an eviction removes and keeps (the tag still
//! resolves and the image pulls again from the fleet), and the pins admin API's answers to bad
//! requests.

mod testnet;

use shoal_node::store::evict::{Class, PinRule};
use shoal_protocol::Digest;
use testnet::{TestNet, http, image};

fn error_code(r: &testnet::Response) -> String {
    serde_json::from_slice::<serde_json::Value>(&r.body)
        .ok()
        .and_then(|v| v["errors"][0]["code"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

async fn post(n: &testnet::TestNode, path: &str, body: &str) -> testnet::Response {
    http(
        n.http_addr(),
        "POST",
        path,
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    )
    .await
}

/// A node classifies pushed content as published, fetched content as cached (pinned when a
/// rule covers it); evicting the cached content removes the blob files and links but not the
/// records, so the tags still resolve and the next pull fetches the bytes again, identical.
#[tokio::test(flavor = "multi_thread")]
async fn evicted_cached_content_is_fetched_again_and_published_content_is_never_a_candidate() {
    let net = TestNet::start(2).await;
    net.wait_connected(1).await;
    let (a, b) = (&net.nodes[0], &net.nodes[1]);
    let prod = image(1, &[300_000, 200_000]);
    let other = image(2, &[250_000]);
    a.push("prod/app", "1", &prod).await;
    a.push("cache/x", "1", &other).await;
    for (repo, img) in [("prod/app", &prod), ("cache/x", &other)] {
        testnet::wait_until(std::time::Duration::from_secs(30), "the record", || async {
            b.has_record(repo, "1").await.then_some(())
        })
        .await;
        b.pull_and_check(repo, "1", img).await;
    }
    let store = b.node().store();
    testnet::wait_until(
        std::time::Duration::from_secs(10),
        "the blobs stored",
        || async {
            prod.blobs
                .iter()
                .chain(&other.blobs)
                .all(|blob| store.layout().blob(&Digest::sha256(blob)).exists())
                .then_some(())
        },
    )
    .await;
    let own_a = a.identity.publisher();
    let own_b = b.identity.publisher();
    let rules = vec![PinRule {
        pattern: "prod/*".parse().unwrap(),
        copies: 2,
    }];
    let on_a = a
        .node()
        .store()
        .quota_entries(own_a, rules.clone())
        .await
        .unwrap();
    assert!(!on_a.is_empty());
    assert!(
        on_a.iter().all(|e| e.class == Class::Published),
        "everything on the publisher is published: {on_a:?}"
    );
    let on_b = b
        .node()
        .store()
        .quota_entries(own_b, rules.clone())
        .await
        .unwrap();
    let class_of = |blob: &[u8]| {
        let d = Digest::sha256(blob);
        on_b.iter()
            .find(|e| e.digest == d)
            .map(|e| e.class)
            .expect("blob held")
    };
    for blob in &prod.blobs {
        assert_eq!(class_of(blob), Class::Pinned(2));
    }
    for blob in &other.blobs {
        assert_eq!(class_of(blob), Class::Cached);
    }
    assert!(
        on_b.iter()
            .any(|e| e.digest == other.digest && e.class == Class::Cached)
    );

    // Regression: once a pinned manifest is evicted, the index no longer says what it reaches;
    // its config and layers must stay pinned (the record names them), not turn cached (the
    // three-node test saw a node evict them as cached and leave one copy in the fleet).
    let m = (prod.digest.clone(), prod.manifest.len() as u64);
    store.evict(vec![m]).await.unwrap();
    assert!(!store.layout().blob(&prod.digest).exists());
    let after = store.quota_entries(own_b, rules.clone()).await.unwrap();
    for blob in &prod.blobs {
        let d = Digest::sha256(blob);
        let e = after.iter().find(|e| e.digest == d).expect("blob held");
        assert_eq!(e.class, Class::Pinned(2), "{d}");
    }

    // Evict every cached blob on B (what the quota would pick first).
    let victims: Vec<(Digest, u64)> = on_b
        .iter()
        .filter(|e| e.class == Class::Cached)
        .map(|e| (e.digest.clone(), e.size))
        .collect();
    // A blob still open for a response just served is skipped, and taken by a later round.
    testnet::wait_until(
        std::time::Duration::from_secs(10),
        "every cached blob evicted",
        || async {
            let left: Vec<(Digest, u64)> = victims
                .iter()
                .filter(|(d, _)| store.layout().blob(d).exists())
                .cloned()
                .collect();
            if left.is_empty() {
                return Some(());
            }
            let report = store.evict(left.clone()).await.unwrap();
            assert_eq!(
                report.evicted.len() as u64 + report.kept,
                left.len() as u64,
                "{report:?}"
            );
            None
        },
    )
    .await;
    for (d, _) in &victims {
        assert!(!b.node().store().layout().blob(d).exists(), "{d} evicted");
    }
    for blob in &prod.blobs {
        assert!(
            b.node()
                .store()
                .layout()
                .blob(&Digest::sha256(blob))
                .exists(),
            "pinned content stays"
        );
    }
    // The record stays: the tag resolves, and the image comes back from A, byte for byte.
    assert!(b.has_record("cache/x", "1").await);
    b.pull_and_check("cache/x", "1", &other).await;
    // The bytes were streamed while they arrived; the files land as the downloads finish.
    testnet::wait_until(
        std::time::Duration::from_secs(10),
        "the blobs stored again",
        || async {
            other
                .blobs
                .iter()
                .all(|blob| store.layout().blob(&Digest::sha256(blob)).exists())
                .then_some(())
        },
    )
    .await;
}

/// A pin of a malformed image, of one the node does not know, or with absurd copies, is
/// refused with a clear error and pins nothing; a real one is listed and removed.
#[tokio::test(flavor = "multi_thread")]
async fn pins_of_malformed_or_unknown_images_are_refused_with_a_clear_error() {
    let net = TestNet::start(1).await;
    let n = &net.nodes[0];
    n.push("prod/app", "1", &image(3, &[1000])).await;
    let long = format!(r#"{{"image": "{}:1"}}"#, "a/".repeat(50_000));
    let bad: [(&str, u16, &str); 9] = [
        ("not json", 400, "UNSUPPORTED"),
        (r#"{"copies": 2}"#, 400, "UNSUPPORTED"),
        (r#"{"image": "prod/app"}"#, 400, "UNSUPPORTED"),
        (r#"{"image": "Prod/App:1"}"#, 400, "UNSUPPORTED"),
        (r#"{"image": "prod/app@sha256:12"}"#, 400, "UNSUPPORTED"),
        (&long, 400, "UNSUPPORTED"),
        (
            r#"{"image": "prod/app:1", "copies": 0}"#,
            400,
            "UNSUPPORTED",
        ),
        (
            r#"{"image": "prod/app:1", "copies": 100000}"#,
            400,
            "UNSUPPORTED",
        ),
        (
            r#"{"image": "prod/app:2", "copies": 2}"#,
            404,
            "MANIFEST_UNKNOWN",
        ),
    ];
    for (body, status, code) in bad {
        let r = post(n, "/_shoal/v1/pins", body).await;
        assert_eq!(r.status, status, "{body:.80}");
        assert_eq!(error_code(&r), code, "{body:.80}");
        assert!(r.body.len() < 1024, "the answer does not echo a long input");
    }
    assert!(n.node().store().pins().await.unwrap().is_empty());
    let r = post(n, "/_shoal/v1/unpin", r#"{"image": "prod/app:1"}"#).await;
    assert_eq!(r.status, 404);

    let r = post(
        n,
        "/_shoal/v1/pins",
        r#"{"image": "prod/app:1", "copies": 2}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let listed = n.get("/_shoal/v1/pins").await;
    let v: serde_json::Value = serde_json::from_slice(&listed.body).unwrap();
    assert_eq!(v["pins"][0]["repo"], "prod/app");
    assert_eq!(v["pins"][0]["reference"], "1");
    assert_eq!(v["pins"][0]["copies"], 2);
    let r = post(n, "/_shoal/v1/unpin", r#"{"image": "prod/app:1"}"#).await;
    assert_eq!(r.status, 200);
    assert!(n.node().store().pins().await.unwrap().is_empty());
}
