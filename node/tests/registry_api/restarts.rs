//! The store reopened on the same directory, and fsck run on it while the registry is stopped:
//! nothing pushed is lost, and a corrupt blob or a damaged index is reported and repaired.

use axum::http::StatusCode;
use serde_json::json;

use crate::harness::*;
use crate::push::*;

#[tokio::test(flavor = "multi_thread")]
async fn everything_pushed_is_served_after_a_restart() {
    let mut h = Harness::new().await;
    let img = push_image(&h, "team/app", Some("v1"), 70).await;
    tag_image(&h, "team/app", "gone", &img).await;
    let index = to_bytes(&json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [desc(OCI_MANIFEST, &img.digest, img.manifest.len())],
    }));
    h.put_manifest("team/app", "multi", OCI_INDEX, &index)
        .await
        .expect(StatusCode::CREATED);
    let empty = h.push_blob("team/app", b"{}").await;
    let sig = push_referrer(
        &h,
        "team/app",
        json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "artifactType": "application/vnd.example.sig.v1",
            "config": desc(OCI_EMPTY, &empty, 2), "layers": [],
            "subject": desc(OCI_MANIFEST, &img.digest, img.manifest.len()),
        }),
    )
    .await;
    let lone = h.push_blob("other", b"lone blob").await;
    let deleted = h.push_blob("other", b"deleted blob").await;
    h.delete(&format!("/v2/other/blobs/{deleted}"))
        .await
        .expect(StatusCode::ACCEPTED);
    h.delete("/v2/team/app/manifests/gone")
        .await
        .expect(StatusCode::ACCEPTED);

    h.restart().await;

    for reference in ["v1".to_owned(), img.digest.clone()] {
        let g = h.get(&format!("/v2/team/app/manifests/{reference}")).await;
        g.expect(StatusCode::OK);
        assert_eq!(g.body, img.manifest);
        assert_eq!(g.header("content-type"), Some(OCI_MANIFEST));
    }
    let g = h.get("/v2/team/app/manifests/multi").await;
    assert_eq!(g.body, index);
    assert_eq!(g.header("content-type"), Some(OCI_INDEX));
    for (d, data) in &img.blobs {
        assert_eq!(&h.get(&format!("/v2/team/app/blobs/{d}")).await.body, data);
    }
    assert_eq!(
        h.get(&format!("/v2/other/blobs/{lone}")).await.body,
        b"lone blob"
    );
    h.get(&format!("/v2/other/blobs/{deleted}"))
        .await
        .expect_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN");
    h.get("/v2/team/app/manifests/gone")
        .await
        .expect_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
    assert_eq!(tags(&h, "team/app").await, ["multi", "v1"]);
    assert_eq!(catalog(&h).await, ["other", "team/app"]);
    let r = h
        .get(&format!("/v2/team/app/referrers/{}", img.digest))
        .await;
    assert_eq!(
        referrer_map(&r.json()).into_keys().collect::<Vec<_>>(),
        [sig.digest]
    );
    // And the store still takes writes.
    push_image(&h, "team/app", Some("v2"), 71).await;
    assert_eq!(tags(&h, "team/app").await, ["multi", "v1", "v2"]);
}

async fn fsck(dir: &std::path::Path, repair: bool) -> shoal_node::store::FsckReport {
    let d = dir.to_path_buf();
    retry_blocking("fsck", move || shoal_node::store::fsck(&d, repair)).await
}

#[tokio::test(flavor = "multi_thread")]
async fn fsck_is_clean_after_pushes() {
    let mut h = Harness::new().await;
    let img = push_image(&h, "r", Some("v1"), 72).await;
    tag_image(&h, "r", "v2", &img).await;
    h.delete("/v2/r/manifests/v2")
        .await
        .expect(StatusCode::ACCEPTED);
    let d512 = sha512(b"sha512 blob");
    h.upload_monolithic("r", &d512, b"sha512 blob")
        .await
        .expect(StatusCode::CREATED);
    let loc = h.start_upload_with("r", b"in progress").await;
    h.stop();

    let report = fsck(h.path(), false).await;
    assert!(report.is_clean(), "{:?}", report.problems);
    let files = files_under(&h.path().join("blobs")).len() as u64;
    assert_eq!(files, 4); // config, layer, manifest, sha512 blob
    assert_eq!(report.blobs_checked, files);
    assert!(report.records > 0);
    assert!(report.repaired.is_empty());

    // fsck left the store usable, with the session intact.
    h.start().await;
    let s = h.get(&loc).await;
    s.expect(StatusCode::NO_CONTENT);
    assert_eq!(s.header("range"), Some("0-10"));
    h.get("/v2/r/manifests/v1").await.expect(StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn fsck_reports_a_corrupt_blob() {
    let mut h = Harness::new().await;
    let img = push_image(&h, "r", Some("v1"), 73).await;
    h.stop();
    let layer = &img.layers[0];
    let hexpart = layer.strip_prefix("sha256:").expect("sha256");
    let path = h
        .path()
        .join("blobs/sha256")
        .join(&hexpart[..2])
        .join(hexpart);
    let mut data = std::fs::read(&path).expect("blob file");
    data[100] ^= 0xff;
    std::fs::write(&path, &data).expect("corrupt the blob");

    let report = fsck(h.path(), false).await;
    assert!(!report.is_clean());
    assert!(
        report.problems.iter().any(|p| p.contains(layer.as_str())),
        "{:?}",
        report.problems
    );
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);

    // Repair moves it aside; the repository still names it, so fsck is still not clean.
    let report = fsck(h.path(), true).await;
    assert_eq!(report.repaired.len(), 1, "{:?}", report.repaired);
    assert!(!path.exists());
    assert!(h.path().join("quarantine").join(hexpart).exists());
    assert!(
        report.problems.iter().any(|p| p.contains(layer.as_str())),
        "{:?}",
        report.problems
    );
    // The corrupt bytes are never served.
    h.start().await;
    h.get(&format!("/v2/r/blobs/{layer}"))
        .await
        .expect_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN");
}

#[tokio::test(flavor = "multi_thread")]
async fn fsck_repair_rebuilds_a_deleted_index() {
    let mut h = Harness::new().await;
    let img = push_image(&h, "r", Some("v1"), 74).await;
    let loc = h.start_upload_with("r", b"12345").await;
    h.stop();
    // The sled lock is free once fsck can open the index.
    fsck(h.path(), false).await;
    std::fs::remove_dir_all(h.path().join("index")).expect("remove index");

    let report = fsck(h.path(), true).await;
    assert!(report.is_clean(), "{:?}", report.problems);
    assert!(h.path().join("index").is_dir());
    let report = fsck(h.path(), false).await;
    assert!(report.is_clean(), "{:?}", report.problems);

    h.start().await;
    let g = h.get("/v2/r/manifests/v1").await;
    g.expect(StatusCode::OK);
    assert_eq!(g.body, img.manifest);
    assert_eq!(tags(&h, "r").await, ["v1"]);
    for (d, data) in &img.blobs {
        assert_eq!(&h.get(&format!("/v2/r/blobs/{d}")).await.body, data);
    }
    let s = h.get(&loc).await;
    s.expect(StatusCode::NO_CONTENT);
    assert_eq!(s.header("range"), Some("0-4"));
}

#[tokio::test(flavor = "multi_thread")]
async fn fsck_detects_and_repairs_an_index_that_disagrees_with_the_journal() {
    use shoal_node::store::{Change, Index};
    let mut h = Harness::new().await;
    let img = push_image(&h, "r", Some("v1"), 75).await;
    let (layer, layer_bytes) = img.blobs[1].clone();
    h.stop();

    // Drop a link from the index only, as a damaged index might.
    let index_dir = h.path().join("index");
    let unlinked = layer.clone();
    retry_blocking("tamper with the index", move || {
        let index = Index::open(&index_dir)?;
        let end = index.applied_offset()?;
        let change = Change::Unlink {
            repo: "r".parse().expect("repo"),
            digest: unlinked.parse().expect("digest"),
        };
        index.apply(&change, end)?;
        index.flush()
    })
    .await;

    let report = fsck(h.path(), false).await;
    assert!(!report.is_clean());
    assert!(
        report.problems.iter().any(|p| p.contains("links.v1")),
        "{:?}",
        report.problems
    );
    // Without repair, the node serves what the index says.
    h.start().await;
    h.get(&format!("/v2/r/blobs/{layer}"))
        .await
        .expect_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN");
    h.stop();

    let report = fsck(h.path(), true).await;
    assert!(report.is_clean(), "{:?}", report.problems);
    assert!(!report.repaired.is_empty());
    h.start().await;
    let g = h.get(&format!("/v2/r/blobs/{layer}")).await;
    g.expect(StatusCode::OK);
    assert_eq!(g.body, layer_bytes);
    assert_eq!(h.get("/v2/r/manifests/v1").await.body, img.manifest);
}
