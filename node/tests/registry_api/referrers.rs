//! The referrers API: listing and `artifactType` filtering, referrers pushed before their
//! subject, and the `artifactType` of a descriptor.

use std::collections::BTreeMap;

use axum::http::StatusCode;
use serde_json::json;

use crate::harness::*;
use crate::push::*;

#[tokio::test(flavor = "multi_thread")]
async fn referrers_list_filter_and_deletes() {
    let h = Harness::new().await;
    let subject = push_image(&h, "r", Some("v1"), 41).await;
    let s = desc(OCI_MANIFEST, &subject.digest, subject.manifest.len());
    let empty = h.push_blob("r", b"{}").await;
    let payload = h.push_blob("r", b"payload").await;
    let sbom = push_referrer(
        &h,
        "r",
        json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "artifactType": "application/vnd.example.sbom.v1",
            "config": desc(OCI_EMPTY, &empty, 2),
            "layers": [desc("application/vnd.example.sbom.v1", &payload, 7)],
            "subject": s,
            "annotations": {"org.example.kind": "sbom", "org.opencontainers.image.created": "2024-01-01T00:00:00Z"},
        }),
    )
    .await;
    let sig = push_referrer(
        &h,
        "r",
        json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "artifactType": "application/vnd.example.sig.v1",
            "config": desc(OCI_EMPTY, &empty, 2),
            "layers": [desc("application/vnd.example.sig.v1", &payload, 7)],
            "subject": s,
            "annotations": {"org.example.kind": "signature"},
        }),
    )
    .await;
    // No artifactType: the config media type stands in for it.
    let cfg = h.push_blob("r", b"{\"config\":1}").await;
    let image_ref = push_referrer(
        &h,
        "r",
        json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": desc("application/vnd.example.config.v1+json", &cfg, 12),
            "layers": [],
            "subject": s,
        }),
    )
    .await;
    // Indexes can refer too; without artifactType it must be omitted.
    let index_typed = push_referrer(
        &h,
        "r",
        json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX,
            "artifactType": "application/vnd.example.index.v1",
            "manifests": [desc(OCI_MANIFEST, &sbom.digest, sbom.descriptor["size"].as_u64().expect("size") as usize)],
            "subject": s,
            "annotations": {"org.example.kind": "index"},
        }),
    )
    .await;
    let index_untyped = push_referrer(
        &h,
        "r",
        json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX,
            "manifests": [],
            "subject": s,
        }),
    )
    .await;
    assert!(index_untyped.descriptor.get("artifactType").is_none());
    // Referrers of something else, and of the same subject in another repository.
    let unrelated_subject = sha256(b"another subject");
    push_referrer(
        &h,
        "r",
        json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "artifactType": "application/vnd.example.sbom.v1",
            "config": desc(OCI_EMPTY, &empty, 2),
            "layers": [],
            "subject": desc(OCI_MANIFEST, &unrelated_subject, 10),
        }),
    )
    .await;
    let other_empty = h.push_blob("other", b"{}").await;
    push_referrer(
        &h,
        "other",
        json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "artifactType": "application/vnd.example.sbom.v1",
            "config": desc(OCI_EMPTY, &other_empty, 2),
            "layers": [],
            "subject": s,
        }),
    )
    .await;

    let uri = format!("/v2/r/referrers/{}", subject.digest);
    let r = h.get(&uri).await;
    r.expect(StatusCode::OK);
    assert_eq!(r.header("content-type"), Some(OCI_INDEX));
    assert_eq!(r.header("oci-filters-applied"), None);
    let all: BTreeMap<String, serde_json::Value> =
        [&sbom, &sig, &image_ref, &index_typed, &index_untyped]
            .into_iter()
            .map(|x| (x.digest.clone(), x.descriptor.clone()))
            .collect();
    assert_eq!(referrer_map(&r.json()), all);

    // Filtering by artifactType.
    for (filter, expected) in [
        ("application/vnd.example.sbom.v1", vec![&sbom]),
        ("application/vnd.example.sig.v1", vec![&sig]),
        ("application/vnd.example.config.v1+json", vec![&image_ref]),
        ("application/vnd.example.index.v1", vec![&index_typed]),
        ("application/vnd.example.none", vec![]),
    ] {
        let r = h.get(&format!("{uri}?artifactType={}", q(filter))).await;
        r.expect(StatusCode::OK);
        assert_eq!(r.header("content-type"), Some(OCI_INDEX));
        assert_eq!(r.header("oci-filters-applied"), Some("artifactType"));
        let want: BTreeMap<String, serde_json::Value> = expected
            .into_iter()
            .map(|x| (x.digest.clone(), x.descriptor.clone()))
            .collect();
        assert_eq!(referrer_map(&r.json()), want, "filter {filter}");
    }

    // Deleting a referrer removes it from the list; deleting its tag-less subject does not
    // matter to the others.
    h.delete(&format!("/v2/r/manifests/{}", sig.digest))
        .await
        .expect(StatusCode::ACCEPTED);
    let r = h.get(&uri).await;
    let listed = referrer_map(&r.json());
    assert!(!listed.contains_key(&sig.digest));
    assert_eq!(listed.len(), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn referrers_are_listed_before_their_subject_is_pushed() {
    let h = Harness::new().await;
    let empty = h.push_blob("r", b"{}").await;
    let img = image_blobs(&h, "r", 42, json!({})).await;
    let early = push_referrer(
        &h,
        "r",
        json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "artifactType": "application/vnd.example.sig.v1",
            "config": desc(OCI_EMPTY, &empty, 2),
            "layers": [],
            "subject": desc(OCI_MANIFEST, &img.digest, img.manifest.len()),
        }),
    )
    .await;
    let before = h.get(&format!("/v2/r/referrers/{}", img.digest)).await;
    before.expect(StatusCode::OK);
    assert!(referrer_map(&before.json()).contains_key(&early.digest));
    tag_image(&h, "r", "v1", &img).await;
    let after = h.get(&format!("/v2/r/referrers/{}", img.digest)).await;
    assert_eq!(referrer_map(&after.json()), referrer_map(&before.json()));
}

#[tokio::test(flavor = "multi_thread")]
async fn referrers_of_an_unknown_subject_are_an_empty_index() {
    let h = Harness::new().await;
    push_image(&h, "r", Some("v1"), 43).await;
    let d = sha256(b"nothing refers to this");
    for uri in [
        format!("/v2/r/referrers/{d}"),
        format!("/v2/nosuchrepo/referrers/{d}"),
        format!("/v2/r/referrers/{d}?artifactType=application%2Fx"),
    ] {
        let r = h.get(&uri).await;
        r.expect(StatusCode::OK);
        assert_eq!(r.header("content-type"), Some(OCI_INDEX));
        let body = r.json();
        assert_eq!(body["schemaVersion"], 2);
        assert_eq!(body["mediaType"], OCI_INDEX);
        assert_eq!(body["manifests"], json!([]));
    }
    // An invalid digest is a bad request.
    h.get("/v2/r/referrers/sha256:nothex")
        .await
        .expect_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID");
}

/// Spec, "Listing Referrers": "If the `artifactType` is empty or missing in the image manifest,
/// the value of `artifactType` MUST be set to the config descriptor `mediaType` value." The node
/// drops it when that media type is the OCI empty descriptor's.
#[tokio::test(flavor = "multi_thread")]
async fn referrer_without_artifact_type_reports_its_config_media_type() {
    let h = Harness::new().await;
    let subject = push_image(&h, "r", Some("v1"), 44).await;
    let empty = h.push_blob("r", b"{}").await;
    let referrer = push_referrer(
        &h,
        "r",
        json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": desc(OCI_EMPTY, &empty, 2),
            "layers": [],
            "subject": desc(OCI_MANIFEST, &subject.digest, subject.manifest.len()),
        }),
    )
    .await;
    assert_eq!(referrer.descriptor["artifactType"], OCI_EMPTY);
    let r = h.get(&format!("/v2/r/referrers/{}", subject.digest)).await;
    r.expect(StatusCode::OK);
    let listed = referrer_map(&r.json());
    assert_eq!(listed.get(&referrer.digest), Some(&referrer.descriptor));
}
