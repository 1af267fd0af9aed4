//! Manifests: pushing and pulling images, indexes and artifacts, the references they must
//! satisfy, validation and the size limit, Accept negotiation, deletes, tag validation, and
//! random manifest bytes.

use std::collections::BTreeMap;

use axum::body::Body;
use axum::http::{Method, StatusCode};
use serde_json::json;

use crate::harness::*;
use crate::push::*;

#[tokio::test(flavor = "multi_thread")]
async fn push_and_pull_an_oci_image_manifest() {
    let h = Harness::new().await;
    let img = image_blobs(&h, "team/app", 20, json!({})).await;
    let r = h
        .put_manifest("team/app", "v1", OCI_MANIFEST, &img.manifest)
        .await;
    r.expect(StatusCode::CREATED);
    assert_eq!(
        r.header("location"),
        Some(format!("/v2/team/app/manifests/{}", img.digest).as_str())
    );
    assert_eq!(r.header("docker-content-digest"), Some(img.digest.as_str()));
    assert_eq!(r.header("oci-subject"), None);

    let len = img.manifest.len().to_string();
    for uri in [
        "/v2/team/app/manifests/v1".to_owned(),
        format!("/v2/team/app/manifests/{}", img.digest),
        r.must_header("location").to_owned(),
    ] {
        let g = h.get(&uri).await;
        g.expect(StatusCode::OK);
        assert_eq!(g.body, img.manifest, "{uri}");
        assert_eq!(g.header("content-type"), Some(OCI_MANIFEST));
        assert_eq!(g.header("content-length"), Some(len.as_str()));
        assert_eq!(g.header("docker-content-digest"), Some(img.digest.as_str()));
        assert_eq!(
            g.header("etag"),
            Some(format!("\"{}\"", img.digest).as_str())
        );

        let hd = h.head(&uri).await;
        hd.expect(StatusCode::OK);
        assert!(hd.body.is_empty());
        assert_eq!(hd.header("content-type"), Some(OCI_MANIFEST));
        assert_eq!(hd.header("content-length"), Some(len.as_str()));
        assert_eq!(
            hd.header("docker-content-digest"),
            Some(img.digest.as_str())
        );
    }
    // The conformance suite pulls with both OCI types in separate Accept headers.
    let g = h
        .get_with(
            "/v2/team/app/manifests/v1",
            &[("accept", OCI_INDEX), ("accept", OCI_MANIFEST)],
        )
        .await;
    g.expect(StatusCode::OK);
    assert_eq!(g.body, img.manifest);
    // The manifest is also a blob of the repository.
    let b = h.get(&format!("/v2/team/app/blobs/{}", img.digest)).await;
    b.expect(StatusCode::OK);
    assert_eq!(b.body, img.manifest);
    assert_eq!(tags(&h, "team/app").await, ["v1"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn retagging_moves_the_tag() {
    let h = Harness::new().await;
    let a = push_image(&h, "r", Some("latest"), 21).await;
    let b = push_image(&h, "r", Some("latest"), 22).await;
    assert_ne!(a.digest, b.digest);
    let g = h.get("/v2/r/manifests/latest").await;
    g.expect(StatusCode::OK);
    assert_eq!(g.body, b.manifest);
    // The old manifest is still there by digest.
    let g = h.get(&format!("/v2/r/manifests/{}", a.digest)).await;
    g.expect(StatusCode::OK);
    assert_eq!(g.body, a.manifest);
}

#[tokio::test(flavor = "multi_thread")]
async fn push_docker_schema2_manifest_and_manifest_list() {
    let h = Harness::new().await;
    let config = br#"{"architecture":"arm64","os":"linux"}"#;
    let layer = bytes(23, 2222);
    let c = h.push_blob("d", config).await;
    let l = h.push_blob("d", &layer).await;
    let manifest = to_bytes(&json!({
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": desc(DOCKER_CONFIG, &c, config.len()),
        "layers": [desc(DOCKER_LAYER, &l, layer.len())],
    }));
    let md = sha256(&manifest);
    let r = h.put_manifest("d", "arm", DOCKER_MANIFEST, &manifest).await;
    r.expect(StatusCode::CREATED);
    assert_eq!(r.header("docker-content-digest"), Some(md.as_str()));
    let g = h.get("/v2/d/manifests/arm").await;
    g.expect(StatusCode::OK);
    assert_eq!(g.header("content-type"), Some(DOCKER_MANIFEST));
    assert_eq!(g.body, manifest);

    let oci = push_image(&h, "d", None, 24).await;
    let mut child = desc(DOCKER_MANIFEST, &md, manifest.len());
    child["platform"] = json!({"architecture": "arm64", "os": "linux"});
    let mut child2 = desc(OCI_MANIFEST, &oci.digest, oci.manifest.len());
    child2["platform"] = json!({"architecture": "amd64", "os": "linux"});
    let list = to_bytes(&json!({
        "schemaVersion": 2,
        "mediaType": DOCKER_LIST,
        "manifests": [child, child2],
    }));
    let ld = sha256(&list);
    let r = h.put_manifest("d", "multi", DOCKER_LIST, &list).await;
    r.expect(StatusCode::CREATED);
    assert_eq!(r.header("docker-content-digest"), Some(ld.as_str()));
    for uri in [
        "/v2/d/manifests/multi".to_owned(),
        format!("/v2/d/manifests/{ld}"),
    ] {
        let g = h.get(&uri).await;
        g.expect(StatusCode::OK);
        assert_eq!(g.header("content-type"), Some(DOCKER_LIST));
        assert_eq!(g.body, list);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn push_an_oci_index_whose_children_exist() {
    let h = Harness::new().await;
    let a = push_image(&h, "r", None, 25).await;
    let b = push_image(&h, "r", None, 26).await;
    let index = to_bytes(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            desc(OCI_MANIFEST, &a.digest, a.manifest.len()),
            desc(OCI_MANIFEST, &b.digest, b.manifest.len()),
        ],
        "annotations": {"org.example": "index"},
    }));
    let d = sha256(&index);
    let r = h.put_manifest("r", "multi", OCI_INDEX, &index).await;
    r.expect(StatusCode::CREATED);
    assert_eq!(r.header("docker-content-digest"), Some(d.as_str()));
    let g = h.get("/v2/r/manifests/multi").await;
    g.expect(StatusCode::OK);
    assert_eq!(g.header("content-type"), Some(OCI_INDEX));
    assert_eq!(g.body, index);

    // An index of indexes and an empty index are fine too.
    let nested = to_bytes(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [desc(OCI_INDEX, &d, index.len())],
    }));
    h.put_manifest("r", "nested", OCI_INDEX, &nested)
        .await
        .expect(StatusCode::CREATED);
    let empty = to_bytes(&json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}));
    h.put_manifest("r", "empty", OCI_INDEX, &empty)
        .await
        .expect(StatusCode::CREATED);
    assert_eq!(tags(&h, "r").await, ["empty", "multi", "nested"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_index_with_a_missing_child_is_400_manifest_blob_unknown() {
    let h = Harness::new().await;
    let a = push_image(&h, "r", None, 27).await;
    let elsewhere = push_image(&h, "other", None, 28).await;
    let missing = sha256(b"no such manifest");
    for (i, child) in [
        desc(OCI_MANIFEST, &missing, 100),
        desc(OCI_MANIFEST, &elsewhere.digest, elsewhere.manifest.len()),
        // A blob of the repository is not a manifest.
        desc(OCI_MANIFEST, &a.config, 10),
    ]
    .into_iter()
    .enumerate()
    {
        let present = desc(OCI_MANIFEST, &a.digest, a.manifest.len());
        for (media_type, children) in [
            (OCI_INDEX, json!([present, child])),
            (DOCKER_LIST, json!([child, present])),
            (OCI_INDEX, json!([child])),
        ] {
            let index = to_bytes(&json!({
                "schemaVersion": 2,
                "mediaType": media_type,
                "manifests": children,
            }));
            h.put_manifest("r", "idx", media_type, &index)
                .await
                .expect_error(StatusCode::BAD_REQUEST, "MANIFEST_BLOB_UNKNOWN");
            h.get(&format!("/v2/r/manifests/{}", sha256(&index)))
                .await
                .expect_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
            h.get("/v2/r/manifests/idx")
                .await
                .expect_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
            assert!(tags(&h, "r").await.is_empty(), "case {i}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_manifest_referencing_a_missing_blob_is_400_manifest_blob_unknown() {
    let h = Harness::new().await;
    let img = image_blobs(&h, "r", 29, json!({})).await;
    let in_other_repo = h.push_blob("other", b"layer only in other").await;
    let missing = sha256(b"missing layer");
    let deleted = h.push_blob("r", b"deleted layer").await;
    h.delete(&format!("/v2/r/blobs/{deleted}"))
        .await
        .expect(StatusCode::ACCEPTED);
    let config = &img.blobs[0];
    for (what, config_digest, layer_digest) in [
        ("missing layer", config.0.clone(), missing.clone()),
        (
            "layer of another repository",
            config.0.clone(),
            in_other_repo,
        ),
        ("deleted layer", config.0.clone(), deleted),
        ("missing config", missing.clone(), img.layers[0].clone()),
    ] {
        let m = to_bytes(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": desc(OCI_CONFIG, &config_digest, config.1.len()),
            "layers": [desc(OCI_LAYER, &layer_digest, 10)],
        }));
        h.put_manifest("r", "bad", OCI_MANIFEST, &m)
            .await
            .expect_error(StatusCode::BAD_REQUEST, "MANIFEST_BLOB_UNKNOWN");
        h.get("/v2/r/manifests/bad")
            .await
            .expect_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
        h.get(&format!("/v2/r/manifests/{}", sha256(&m)))
            .await
            .expect_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
        assert!(tags(&h, "r").await.is_empty(), "{what}");
    }
    // Non-distributable layers (with urls) are not required to be pushed.
    let m = to_bytes(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": desc(OCI_CONFIG, &config.0, config.1.len()),
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
            "digest": missing, "size": 10, "urls": ["https://example.invalid/layer"],
        }],
    }));
    h.put_manifest("r", "foreign", OCI_MANIFEST, &m)
        .await
        .expect(StatusCode::CREATED);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_artifact_manifest_with_a_subject_answers_oci_subject() {
    let h = Harness::new().await;
    let subject = push_image(&h, "r", Some("v1"), 30).await;
    let empty = h.push_blob("r", b"{}").await;
    let sbom = h.push_blob("r", b"{\"sbom\":true}").await;
    let artifact = to_bytes(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example.sbom.v1",
        "config": desc(OCI_EMPTY, &empty, 2),
        "layers": [desc("application/vnd.example.sbom.v1", &sbom, 13)],
        "subject": desc(OCI_MANIFEST, &subject.digest, subject.manifest.len()),
        "annotations": {"org.example.kind": "sbom"},
    }));
    let d = sha256(&artifact);
    let r = h.put_manifest("r", &d, OCI_MANIFEST, &artifact).await;
    r.expect(StatusCode::CREATED);
    assert_eq!(r.header("oci-subject"), Some(subject.digest.as_str()));
    assert_eq!(r.header("docker-content-digest"), Some(d.as_str()));
    let g = h.get(&format!("/v2/r/manifests/{d}")).await;
    g.expect(StatusCode::OK);
    assert_eq!(g.body, artifact);

    // A subject that does not exist (yet) must be accepted.
    let ghost = sha256(b"subject pushed later");
    let early = to_bytes(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example.sig.v1",
        "config": desc(OCI_EMPTY, &empty, 2),
        "layers": [],
        "subject": desc(OCI_MANIFEST, &ghost, 123),
    }));
    let r = h.put_manifest("r", "early", OCI_MANIFEST, &early).await;
    r.expect(StatusCode::CREATED);
    assert_eq!(r.header("oci-subject"), Some(ghost.as_str()));
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_manifests_are_400_manifest_invalid() {
    let h = Harness::new().await;
    let img = image_blobs(&h, "r", 31, json!({})).await;
    let c = &img.blobs[0];
    let good: serde_json::Value = serde_json::from_slice(&img.manifest).expect("json");
    let mut no_config = good.clone();
    no_config.as_object_mut().expect("object").remove("config");
    let mut negative = good.clone();
    negative["layers"][0]["size"] = json!(-1);
    let mut bad_digest = good.clone();
    bad_digest["layers"][0]["digest"] = json!("sha256:nothex");
    let mut v1 = good.clone();
    v1["schemaVersion"] = json!(1);
    let mut no_version = good.clone();
    no_version
        .as_object_mut()
        .expect("object")
        .remove("schemaVersion");
    let mut with_manifests = good.clone();
    with_manifests["manifests"] = json!([]);
    let index_with_config = json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [],
        "config": desc(OCI_CONFIG, &c.0, c.1.len()),
    });
    let cases: Vec<(&str, &str, Vec<u8>)> = vec![
        ("not json", OCI_MANIFEST, b"not json".to_vec()),
        ("empty body", OCI_MANIFEST, Vec::new()),
        ("empty object", OCI_MANIFEST, b"{}".to_vec()),
        ("json array", OCI_MANIFEST, b"[]".to_vec()),
        (
            "truncated",
            OCI_MANIFEST,
            img.manifest[..img.manifest.len() / 2].to_vec(),
        ),
        ("no config", OCI_MANIFEST, to_bytes(&no_config)),
        ("negative size", OCI_MANIFEST, to_bytes(&negative)),
        ("bad digest", OCI_MANIFEST, to_bytes(&bad_digest)),
        ("schema 1", OCI_MANIFEST, to_bytes(&v1)),
        ("no schemaVersion", OCI_MANIFEST, to_bytes(&no_version)),
        (
            "manifest with manifests",
            OCI_MANIFEST,
            to_bytes(&with_manifests),
        ),
        ("index with config", OCI_INDEX, to_bytes(&index_with_config)),
        ("content type mismatch", OCI_INDEX, img.manifest.clone()),
        (
            "unknown media type",
            "application/x-unknown",
            img.manifest.clone(),
        ),
    ];
    for (what, content_type, body) in cases {
        let r = h.put_manifest("r", "t", content_type, &body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{what}: {r:?}");
        r.expect_error(StatusCode::BAD_REQUEST, "MANIFEST_INVALID");
    }
    h.get("/v2/r/manifests/t")
        .await
        .expect_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
    // A Content-Type with parameters, or none at all, is fine for a valid manifest.
    h.put_manifest(
        "r",
        "a",
        &format!("{OCI_MANIFEST}; charset=utf-8"),
        &img.manifest,
    )
    .await
    .expect(StatusCode::CREATED);
    h.put_manifest("r", "b", "", &img.manifest)
        .await
        .expect(StatusCode::CREATED);
    let g = h.get("/v2/r/manifests/b").await;
    assert_eq!(g.header("content-type"), Some(OCI_MANIFEST));
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_manifests_do_not_create_the_repository() {
    let h = Harness::new().await;
    h.put_manifest("fresh", "t", OCI_MANIFEST, b"not json")
        .await
        .expect_error(StatusCode::BAD_REQUEST, "MANIFEST_INVALID");
    h.get("/v2/fresh/tags/list")
        .await
        .expect_error(StatusCode::NOT_FOUND, "NAME_UNKNOWN");
    assert!(catalog(&h).await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn put_manifest_by_digest() {
    let h = Harness::new().await;
    let img = image_blobs(&h, "r", 32, json!({})).await;

    let r = h
        .put_manifest("r", &img.digest, OCI_MANIFEST, &img.manifest)
        .await;
    r.expect(StatusCode::CREATED);
    assert_eq!(r.header("docker-content-digest"), Some(img.digest.as_str()));
    assert_eq!(
        r.header("location"),
        Some(format!("/v2/r/manifests/{}", img.digest).as_str())
    );
    assert!(
        tags(&h, "r").await.is_empty(),
        "a push by digest makes no tag"
    );
    assert_eq!(
        h.get(&format!("/v2/r/manifests/{}", img.digest)).await.body,
        img.manifest
    );

    // sha512: the registry hashes with the algorithm it was given.
    let d512 = sha512(&img.manifest);
    let r = h
        .put_manifest("r", &d512, OCI_MANIFEST, &img.manifest)
        .await;
    r.expect(StatusCode::CREATED);
    assert_eq!(r.header("docker-content-digest"), Some(d512.as_str()));
    let g = h.get(&format!("/v2/r/manifests/{d512}")).await;
    g.expect(StatusCode::OK);
    assert_eq!(g.body, img.manifest);
    assert_eq!(g.header("docker-content-digest"), Some(d512.as_str()));

    // A digest that is not the body's.
    let other = image_blobs(&h, "r", 33, json!({})).await;
    let r = h
        .put_manifest("r", &img.digest, OCI_MANIFEST, &other.manifest)
        .await;
    r.expect_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID");
    h.get(&format!("/v2/r/manifests/{}", other.digest))
        .await
        .expect_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
    // The manifest already stored under that digest is untouched.
    assert_eq!(
        h.get(&format!("/v2/r/manifests/{}", img.digest)).await.body,
        img.manifest
    );

    // A malformed digest (the conformance suite's "sha256:baddigeststring").
    h.put_manifest("r", "sha256:baddigeststring", OCI_MANIFEST, &other.manifest)
        .await
        .expect_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID");
    let g = h.get("/v2/r/manifests/sha256:baddigeststring").await;
    assert!(
        g.status == StatusCode::BAD_REQUEST || g.status == StatusCode::NOT_FOUND,
        "{g:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_manifest_over_4_mib_is_413_and_one_just_under_is_stored() {
    let h = Harness::new().await;
    const LIMIT: usize = 4 * 1024 * 1024;
    // Like the conformance suite's "large-manifest": 390 annotations of 10 000 bytes.
    let annotations: BTreeMap<String, String> = (0..390)
        .map(|i| (format!("large-annotation-{i}"), "A".repeat(10_000)))
        .collect();
    let img = image_blobs(&h, "r", 34, json!({ "annotations": annotations })).await;
    assert!(img.manifest.len() > 3_900_000 && img.manifest.len() < LIMIT);
    tag_image(&h, "r", "large", &img).await;
    let g = h.get("/v2/r/manifests/large").await;
    g.expect(StatusCode::OK);
    assert_eq!(g.body, img.manifest);

    let mut annotations = annotations;
    annotations.insert("more".into(), "B".repeat(400_000));
    let too_big = image_blobs(&h, "r", 34, json!({ "annotations": annotations })).await;
    assert!(too_big.manifest.len() > LIMIT);
    let r = h
        .put_manifest("r", "huge", OCI_MANIFEST, &too_big.manifest)
        .await;
    r.expect(StatusCode::PAYLOAD_TOO_LARGE);
    assert!(r.json()["errors"][0]["code"].is_string(), "{r:?}");
    h.get("/v2/r/manifests/huge")
        .await
        .expect_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
    // One byte over the limit, even without valid JSON.
    let r = h
        .put_manifest("r", "huge", OCI_MANIFEST, &vec![b' '; LIMIT + 1])
        .await;
    r.expect(StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test(flavor = "multi_thread")]
async fn accept_negotiation() {
    let h = Harness::new().await;
    let img = push_image(&h, "r", Some("img"), 35).await;
    let index = to_bytes(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [desc(OCI_MANIFEST, &img.digest, img.manifest.len())],
    }));
    h.put_manifest("r", "idx", OCI_INDEX, &index)
        .await
        .expect(StatusCode::CREATED);
    let idx_digest = sha256(&index);
    let both = format!("{DOCKER_MANIFEST}, {OCI_MANIFEST}");

    for uri in [
        "/v2/r/manifests/idx".to_owned(),
        format!("/v2/r/manifests/{idx_digest}"),
    ] {
        // Only the image manifest type: the index is not served.
        h.get_with(&uri, &[("accept", OCI_MANIFEST)])
            .await
            .expect_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
        h.request(
            Method::HEAD,
            &uri,
            &[("accept", OCI_MANIFEST)],
            Body::empty(),
        )
        .await
        .expect(StatusCode::NOT_FOUND);
        h.get_with(&uri, &[("accept", both.as_str())])
            .await
            .expect_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
        // Accepting it, in any of the usual spellings, or not negotiating at all.
        for accept in [
            vec![OCI_INDEX],
            vec![OCI_MANIFEST, OCI_INDEX],
            vec![
                "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json;q=0.9",
            ],
            vec!["*/*"],
            vec![OCI_MANIFEST, "*/*"],
            vec!["application/json"],
            vec![],
        ] {
            let headers: Vec<(&str, &str)> = accept.iter().map(|a| ("accept", *a)).collect();
            let g = h.get_with(&uri, &headers).await;
            assert_eq!(g.status, StatusCode::OK, "Accept {accept:?}");
            assert_eq!(g.body, index);
            assert_eq!(g.header("content-type"), Some(OCI_INDEX));
        }
    }
    // The image manifest is served to a client that accepts it among others.
    let g = h
        .get_with("/v2/r/manifests/img", &[("accept", both.as_str())])
        .await;
    g.expect(StatusCode::OK);
    assert_eq!(g.body, img.manifest);
    h.get_with("/v2/r/manifests/img", &[("accept", DOCKER_MANIFEST)])
        .await
        .expect_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_by_tag_removes_only_the_tag() {
    let h = Harness::new().await;
    let img = push_image(&h, "r", Some("v1"), 36).await;
    tag_image(&h, "r", "stable", &img).await;
    let r = h.delete("/v2/r/manifests/v1").await;
    r.expect(StatusCode::ACCEPTED);
    h.get("/v2/r/manifests/v1")
        .await
        .expect_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
    h.head("/v2/r/manifests/v1")
        .await
        .expect(StatusCode::NOT_FOUND);
    let g = h.get(&format!("/v2/r/manifests/{}", img.digest)).await;
    g.expect(StatusCode::OK);
    assert_eq!(g.body, img.manifest);
    assert_eq!(h.get("/v2/r/manifests/stable").await.body, img.manifest);
    assert_eq!(tags(&h, "r").await, ["stable"]);
    h.delete("/v2/r/manifests/v1")
        .await
        .expect_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_by_digest_removes_the_manifest_and_its_tags() {
    let h = Harness::new().await;
    let img = push_image(&h, "r", Some("v1"), 37).await;
    tag_image(&h, "r", "latest", &img).await;
    let keep = push_image(&h, "r", Some("keep"), 38).await;
    // The same manifest in another repository is another manifest.
    let other = push_image(&h, "other", Some("v1"), 37).await;
    assert_eq!(other.digest, img.digest);

    let uri = format!("/v2/r/manifests/{}", img.digest);
    h.delete(&uri).await.expect(StatusCode::ACCEPTED);
    h.get(&uri)
        .await
        .expect_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
    h.head(&uri).await.expect(StatusCode::NOT_FOUND);
    for tag in ["v1", "latest"] {
        h.get(&format!("/v2/r/manifests/{tag}"))
            .await
            .expect_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
    }
    assert_eq!(tags(&h, "r").await, ["keep"]);
    assert_eq!(h.get("/v2/r/manifests/keep").await.body, keep.manifest);
    assert_eq!(h.get("/v2/other/manifests/v1").await.body, other.manifest);
    h.delete(&uri)
        .await
        .expect_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_manifests_are_404_manifest_unknown() {
    let h = Harness::new().await;
    push_image(&h, "r", Some("v1"), 39).await;
    let d = sha256(b"no such manifest");
    for uri in [
        "/v2/r/manifests/v2".to_owned(),
        "/v2/nosuchrepo/manifests/v1".to_owned(),
        format!("/v2/r/manifests/{d}"),
        format!("/v2/r/manifests/{}", sha512(b"x")),
    ] {
        h.get(&uri)
            .await
            .expect_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
        h.head(&uri).await.expect(StatusCode::NOT_FOUND);
        h.delete(&uri)
            .await
            .expect_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_tags_are_400_tag_invalid_on_put_and_unknown_otherwise() {
    let h = Harness::new().await;
    let img = push_image(&h, "r", Some("ok"), 40).await;
    let long = "a".repeat(129);
    for tag in ["-bad", ".bad", "bad+tag", "bad!", long.as_str()] {
        let uri = format!("/v2/r/manifests/{tag}");
        // The spec: a manifest that is not found is a 404, whatever its reference.
        h.get(&uri)
            .await
            .expect_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
        h.head(&uri).await.expect(StatusCode::NOT_FOUND);
        h.put_manifest("r", tag, OCI_MANIFEST, &img.manifest)
            .await
            .expect_error(StatusCode::BAD_REQUEST, "TAG_INVALID");
        h.delete(&uri)
            .await
            .expect_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
    }
    // The edges of the grammar are valid.
    let max = "A".repeat(128);
    for tag in ["_x", "A-b.c_D", "0", max.as_str()] {
        tag_image(&h, "r", tag, &img).await;
    }
    assert_eq!(tags(&h, "r").await.len(), 5);
}

#[test]
fn random_manifest_bytes_never_5xx_nor_change_the_catalog() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

    let seed: u64 = std::env::var("SHOAL_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (h, catalog_before, bases) = rt.block_on(async {
        let h = Harness::new().await;
        push_image(&h, "existing", Some("v1"), 80).await;
        let before = h.get("/v2/_catalog").await;
        before.expect(StatusCode::OK);
        // Valid-looking manifests whose references do not exist anywhere.
        let missing = |s: &[u8]| sha256(s);
        let image = to_bytes(&json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": desc(OCI_CONFIG, &missing(b"c"), 10),
            "layers": [desc(OCI_LAYER, &missing(b"l"), 10)],
            "subject": desc(OCI_MANIFEST, &missing(b"s"), 10),
        }));
        let index = to_bytes(&json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX,
            "manifests": [desc(OCI_MANIFEST, &missing(b"m"), 10)],
        }));
        (h, before.body, vec![image, index])
    });

    let content_types = prop_oneof![
        Just(""),
        Just(OCI_MANIFEST),
        Just(OCI_INDEX),
        Just(DOCKER_MANIFEST),
        Just(DOCKER_LIST),
        Just("application/json"),
    ];
    let base = prop::sample::select(bases);
    let body = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..2048),
        (base.clone(), any::<prop::sample::Index>(), 1u8..=255).prop_map(|(mut b, i, x)| {
            let i = i.index(b.len());
            b[i] ^= x;
            b
        }),
        (base, any::<prop::sample::Index>()).prop_map(|(b, i)| b[..i.index(b.len())].to_vec()),
    ];
    let by_digest = any::<bool>();

    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let mut runner = TestRunner::new_with_rng(
        Config {
            cases: 32,
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes),
    );
    let result = runner.run(
        &(body, content_types, by_digest),
        |(body, content_type, by_digest)| {
            rt.block_on(async {
                let reference = if by_digest {
                    sha256(&body)
                } else {
                    "fuzz".to_owned()
                };
                let r = h
                    .put_manifest("fuzz/target", &reference, content_type, &body)
                    .await;
                prop_assert!(
                    r.status.is_client_error(),
                    "status {} for {} bytes: {:?}",
                    r.status,
                    body.len(),
                    String::from_utf8_lossy(&r.body)
                );
                let after = h.get("/v2/_catalog").await;
                prop_assert_eq!(after.status, StatusCode::OK);
                prop_assert_eq!(&after.body, &catalog_before);
                Ok(())
            })
        },
    );
    if let Err(e) = result {
        panic!("{e} (reproduce with SHOAL_TEST_SEED={seed})");
    }
}
