//! Upload sessions: chunked PATCHes and the closing PUT, out-of-order and failed chunks,
//! cancelling, sessions across restarts, cross-repository mounts, and the chunk size every upload
//! path gives a blob.

use axum::body::Body;
use axum::http::{Method, StatusCode};

use crate::harness::*;

#[tokio::test(flavor = "multi_thread")]
async fn chunked_upload_with_patch_status_and_closing_put() {
    let h = Harness::new().await;
    let data = bytes(8, 10_000);
    let d = sha256(&data);

    let r = h
        .request(
            Method::POST,
            "/v2/team/app/blobs/uploads/",
            &[("content-length", "0")],
            Body::empty(),
        )
        .await;
    r.expect(StatusCode::ACCEPTED);
    let loc = r.must_header("location").to_owned();
    let uuid = r.must_header("docker-upload-uuid").to_owned();
    assert_eq!(loc, format!("/v2/team/app/blobs/uploads/{uuid}"));
    assert_eq!(r.header("range"), Some("0-0"));

    let p = h.patch(&loc, 0, &data[..4000]).await;
    p.expect(StatusCode::ACCEPTED);
    assert_eq!(p.header("range"), Some("0-3999"));
    assert_eq!(p.header("docker-upload-uuid"), Some(uuid.as_str()));
    let loc = p.must_header("location").to_owned();

    let p = h.patch(&loc, 4000, &data[4000..7000]).await;
    p.expect(StatusCode::ACCEPTED);
    assert_eq!(p.header("range"), Some("0-6999"));
    let loc = p.must_header("location").to_owned();

    let s = h.get(&loc).await;
    s.expect(StatusCode::NO_CONTENT);
    assert_eq!(s.header("range"), Some("0-6999"));
    assert_eq!(s.header("location"), Some(loc.as_str()));
    assert_eq!(s.header("docker-upload-uuid"), Some(uuid.as_str()));
    assert!(s.body.is_empty());

    // Nothing is visible before the closing PUT.
    h.get(&format!("/v2/team/app/blobs/{d}"))
        .await
        .expect_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN");

    let r = h.put_upload(&loc, &d, &data[7000..]).await;
    r.expect(StatusCode::CREATED);
    assert_eq!(
        r.header("location"),
        Some(format!("/v2/team/app/blobs/{d}").as_str())
    );
    assert_eq!(r.header("docker-content-digest"), Some(d.as_str()));
    let g = h.get(r.must_header("location")).await;
    g.expect(StatusCode::OK);
    assert_eq!(g.body, data);

    // The session is over.
    h.get(&loc)
        .await
        .expect_error(StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN");
    h.patch(&loc, 10_000, b"more")
        .await
        .expect_error(StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN");
    assert!(files_under(&h.path().join("uploads")).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn patch_without_content_range_streams_and_put_with_empty_body_closes() {
    let h = Harness::new().await;
    let data = bytes(9, 6000);
    let d = sha256(&data);
    let loc = h.start_upload("r").await;
    let p = h
        .request(Method::PATCH, &loc, &[], data[..2500].to_vec())
        .await;
    p.expect(StatusCode::ACCEPTED);
    assert_eq!(p.header("range"), Some("0-2499"));
    let p = h
        .request(Method::PATCH, &loc, &[], data[2500..].to_vec())
        .await;
    p.expect(StatusCode::ACCEPTED);
    assert_eq!(p.header("range"), Some("0-5999"));
    h.put_upload(&loc, &d, b"")
        .await
        .expect(StatusCode::CREATED);
    assert_eq!(h.get(&format!("/v2/r/blobs/{d}")).await.body, data);
}

#[tokio::test(flavor = "multi_thread")]
async fn post_then_put_uploads_in_one_request() {
    let h = Harness::new().await;
    let data = bytes(10, 777);
    let d = sha256(&data);
    let loc = h.start_upload("r").await;
    let r = h.put_upload(&loc, &d, &data).await;
    r.expect(StatusCode::CREATED);
    assert_eq!(
        r.header("location"),
        Some(format!("/v2/r/blobs/{d}").as_str())
    );
    assert_eq!(h.get(&format!("/v2/r/blobs/{d}")).await.body, data);
}

#[tokio::test(flavor = "multi_thread")]
async fn out_of_order_chunks_are_416_and_the_session_continues() {
    let h = Harness::new().await;
    let data = bytes(11, 3000);
    let d = sha256(&data);
    let loc = h.start_upload_with("r", &data[..1000]).await;

    // Skipping ahead, going back to the start, and overlapping are all out of order.
    for (start, end) in [(2000, 2999), (0, 999), (500, 1499), (1001, 1999)] {
        let r = h.patch(&loc, start, &data[start..=end]).await;
        r.expect(StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(r.header("range"), Some("0-999"), "chunk {start}-{end}");
    }
    // A range whose end is before its start is not satisfiable either.
    let r = h
        .request(
            Method::PATCH,
            &loc,
            &[("content-range", "1000-900")],
            b"x".to_vec(),
        )
        .await;
    r.expect(StatusCode::RANGE_NOT_SATISFIABLE);

    let s = h.get(&loc).await;
    s.expect(StatusCode::NO_CONTENT);
    assert_eq!(s.header("range"), Some("0-999"));

    h.patch(&loc, 1000, &data[1000..])
        .await
        .expect(StatusCode::ACCEPTED);
    h.put_upload(&loc, &d, b"")
        .await
        .expect(StatusCode::CREATED);
    assert_eq!(h.get(&format!("/v2/r/blobs/{d}")).await.body, data);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chunk_shorter_than_its_range_is_refused_and_the_session_survives() {
    let h = Harness::new().await;
    let data = bytes(12, 2000);
    let d = sha256(&data);
    let loc = h.start_upload_with("r", &data[..1000]).await;
    // Content-Range says 1000 bytes, the body has 500.
    let r = h
        .request(
            Method::PATCH,
            &loc,
            &[("content-range", "1000-1999")],
            data[1000..1500].to_vec(),
        )
        .await;
    r.expect_error(StatusCode::BAD_REQUEST, "SIZE_INVALID");
    let s = h.get(&loc).await;
    s.expect(StatusCode::NO_CONTENT);
    assert_eq!(s.header("range"), Some("0-999"));
    h.patch(&loc, 1000, &data[1000..])
        .await
        .expect(StatusCode::ACCEPTED);
    h.put_upload(&loc, &d, b"")
        .await
        .expect(StatusCode::CREATED);
    assert_eq!(h.get(&format!("/v2/r/blobs/{d}")).await.body, data);
}

/// Spec, "Pushing a blob in chunks": "If the final chunk is uploaded out of order, the registry
/// MUST respond with a `416 Requested Range Not Satisfiable` code." The conformance suite sends
/// exactly this (flags `OutOfOrderChunks` + `PutLastChunk`).
#[tokio::test(flavor = "multi_thread")]
async fn out_of_order_final_chunk_in_put_is_416() {
    let h = Harness::new().await;
    let data = b"helloworld";
    let loc = h.start_upload_with("r", &data[..5]).await;
    // The final chunk claims to start at 3, but the session is at 5. Appending it anyway would
    // give exactly `data`, so a registry that ignores Content-Range answers 201.
    let r = h
        .request(
            Method::PUT,
            &format!("{loc}?digest={}", sha256(data)),
            &[
                ("content-type", "application/octet-stream"),
                ("content-range", "3-7"),
                ("content-length", "5"),
            ],
            data[5..].to_vec(),
        )
        .await;
    r.expect(StatusCode::RANGE_NOT_SATISFIABLE);
    let s = h.get(&loc).await;
    s.expect(StatusCode::NO_CONTENT);
    assert_eq!(s.header("range"), Some("0-4"));
}

#[tokio::test(flavor = "multi_thread")]
async fn put_without_a_digest_is_400_and_the_session_survives() {
    let h = Harness::new().await;
    let data = bytes(13, 1500);
    let loc = h.start_upload_with("r", &data).await;
    h.request(Method::PUT, &loc, &[], Body::empty())
        .await
        .expect_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID");
    let s = h.get(&loc).await;
    s.expect(StatusCode::NO_CONTENT);
    assert_eq!(s.header("range"), Some("0-1499"));
    h.put_upload(&loc, &sha256(&data), b"")
        .await
        .expect(StatusCode::CREATED);
}

#[tokio::test(flavor = "multi_thread")]
async fn put_with_a_wrong_digest_stores_nothing_and_rolls_back_the_last_chunk() {
    let h = Harness::new().await;
    let data = bytes(14, 4000);
    let d = sha256(&data);
    let wrong = sha256(b"not the data");
    let loc = h.start_upload_with("r", &data[..3000]).await;
    let before = files_under(&h.path().join("blobs"));

    h.put_upload(&loc, &wrong, &data[3000..])
        .await
        .expect_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID");
    assert_eq!(files_under(&h.path().join("blobs")), before);
    for x in [&wrong, &d] {
        h.get(&format!("/v2/r/blobs/{x}"))
            .await
            .expect_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN");
    }
    // The bytes of the failed PUT are not part of the session.
    let s = h.get(&loc).await;
    s.expect(StatusCode::NO_CONTENT);
    assert_eq!(s.header("range"), Some("0-2999"));
    // A wrong digest with no final chunk fails the same way.
    h.put_upload(&loc, &wrong, b"")
        .await
        .expect_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID");

    h.put_upload(&loc, &d, &data[3000..])
        .await
        .expect(StatusCode::CREATED);
    assert_eq!(h.get(&format!("/v2/r/blobs/{d}")).await.body, data);
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_cancels_an_upload() {
    let h = Harness::new().await;
    let loc = h.start_upload_with("r", b"some bytes").await;
    assert_eq!(files_under(&h.path().join("uploads")).len(), 3); // repo, data, offset
    let r = h
        .request(
            Method::DELETE,
            &loc,
            &[("content-length", "0")],
            Body::empty(),
        )
        .await;
    r.expect(StatusCode::NO_CONTENT);
    assert!(files_under(&h.path().join("uploads")).is_empty());
    h.get(&loc)
        .await
        .expect_error(StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN");
    h.patch(&loc, 10, b"more")
        .await
        .expect_error(StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN");
    h.put_upload(&loc, &sha256(b"some bytes"), b"")
        .await
        .expect_error(StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN");
    h.delete(&loc)
        .await
        .expect_error(StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN");
    h.get(&format!("/v2/r/blobs/{}", sha256(b"some bytes")))
        .await
        .expect_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN");
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_or_invalid_upload_ids_are_404_blob_upload_unknown() {
    let h = Harness::new().await;
    let real = h.start_upload("r").await;
    let uuid = real.rsplit('/').next().expect("uuid").to_owned();
    let ids = [
        "3f2b6f2e-6a3c-4c3e-9b61-0c2b7c6f1d2a".to_owned(),
        "not-a-uuid".to_owned(),
        uuid.to_uppercase(),
        uuid.replace('-', ""),
        "..".to_owned(),
        "%2E%2E".to_owned(),
    ];
    let d = sha256(b"x");
    for id in &ids {
        let loc = format!("/v2/r/blobs/uploads/{id}");
        h.get(&loc)
            .await
            .expect_error(StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN");
        h.patch(&loc, 0, b"x")
            .await
            .expect_error(StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN");
        h.put_upload(&loc, &d, b"x")
            .await
            .expect_error(StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN");
        h.delete(&loc)
            .await
            .expect_error(StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN");
    }
    // The real session was not disturbed.
    h.get(&real).await.expect(StatusCode::NO_CONTENT);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upload_id_is_unknown_in_another_repository() {
    let h = Harness::new().await;
    let data = bytes(15, 1200);
    let d = sha256(&data);
    let loc = h.start_upload_with("a", &data[..200]).await;
    let uuid = loc.rsplit('/').next().expect("uuid");
    let foreign = format!("/v2/b/blobs/uploads/{uuid}");
    h.get(&foreign)
        .await
        .expect_error(StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN");
    h.patch(&foreign, 200, &data[200..400])
        .await
        .expect_error(StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN");
    h.put_upload(&foreign, &d, &data[200..])
        .await
        .expect_error(StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN");
    h.delete(&foreign)
        .await
        .expect_error(StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN");
    h.get(&format!("/v2/b/blobs/{d}"))
        .await
        .expect_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN");
    // Still intact in its own repository.
    let s = h.get(&loc).await;
    s.expect(StatusCode::NO_CONTENT);
    assert_eq!(s.header("range"), Some("0-199"));
    h.put_upload(&loc, &d, &data[200..])
        .await
        .expect(StatusCode::CREATED);
    h.get(&format!("/v2/a/blobs/{d}"))
        .await
        .expect(StatusCode::OK);
    h.get(&format!("/v2/b/blobs/{d}"))
        .await
        .expect_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upload_session_survives_a_restart() {
    let mut h = Harness::new().await;
    let data = bytes(16, 9000);
    let d = sha256(&data);
    let loc = h.start_upload_with("r", &data[..4000]).await;

    h.restart().await;

    let s = h.get(&loc).await;
    s.expect(StatusCode::NO_CONTENT);
    assert_eq!(s.header("range"), Some("0-3999"));
    // Out of order is still detected against the recovered offset.
    h.patch(&loc, 0, &data[..10])
        .await
        .expect(StatusCode::RANGE_NOT_SATISFIABLE);
    let p = h.patch(&loc, 4000, &data[4000..8000]).await;
    p.expect(StatusCode::ACCEPTED);
    assert_eq!(p.header("range"), Some("0-7999"));

    h.restart().await;

    let r = h.put_upload(&loc, &d, &data[8000..]).await;
    r.expect(StatusCode::CREATED);
    let g = h.get(&format!("/v2/r/blobs/{d}")).await;
    g.expect(StatusCode::OK);
    assert_eq!(g.body, data);
}

#[tokio::test(flavor = "multi_thread")]
async fn cross_repository_mount() {
    let h = Harness::new().await;
    let data = bytes(17, 2500);
    let d = h.push_blob("src/repo", &data).await;
    for (target, mount) in [("dst", d.clone()), ("dst2", d.replace(':', "%3A"))] {
        let r = h.mount_blob(target, &mount, Some("src/repo")).await;
        r.expect(StatusCode::CREATED);
        assert_eq!(
            r.header("location"),
            Some(format!("/v2/{target}/blobs/{d}").as_str())
        );
        assert_eq!(r.header("docker-content-digest"), Some(d.as_str()));
        let g = h.get(r.must_header("location")).await;
        g.expect(StatusCode::OK);
        assert_eq!(g.body, data);
    }
    // The mount is a link of its own: deleting the source's keeps the target's.
    h.delete(&format!("/v2/src/repo/blobs/{d}"))
        .await
        .expect(StatusCode::ACCEPTED);
    h.get(&format!("/v2/dst/blobs/{d}"))
        .await
        .expect(StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn mount_falls_back_to_a_session_when_the_blob_is_not_in_from() {
    let h = Harness::new().await;
    let data = bytes(18, 1000);
    let d = h.push_blob("holder", &data).await;
    h.push_blob("empty", b"unrelated").await;
    let absent = sha256(b"nowhere");
    for (digest, from) in [(&d, "empty"), (&d, "nosuchrepo"), (&absent, "holder")] {
        let r = h.mount_blob("dst", digest, Some(from)).await;
        r.expect(StatusCode::ACCEPTED);
        let loc = r.must_header("location").to_owned();
        let uuid = r.must_header("docker-upload-uuid");
        assert_eq!(loc, format!("/v2/dst/blobs/uploads/{uuid}"));
        h.get(&format!("/v2/dst/blobs/{digest}"))
            .await
            .expect_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN");
        // The session it started works.
        h.get(&loc).await.expect(StatusCode::NO_CONTENT);
        h.delete(&loc).await.expect(StatusCode::NO_CONTENT);
    }
    // Falling back and uploading completes the push.
    let r = h.mount_blob("dst", &d, Some("empty")).await;
    r.expect(StatusCode::ACCEPTED);
    h.put_upload(r.must_header("location"), &d, &data)
        .await
        .expect(StatusCode::CREATED);
    assert_eq!(h.get(&format!("/v2/dst/blobs/{d}")).await.body, data);
}

#[tokio::test(flavor = "multi_thread")]
async fn mount_without_from_mounts_a_blob_the_node_holds() {
    let h = Harness::new().await;
    let d = h.push_blob("a", b"anonymous mount").await;
    let r = h.mount_blob("b", &d, None).await;
    r.expect(StatusCode::CREATED);
    assert_eq!(
        r.header("location"),
        Some(format!("/v2/b/blobs/{d}").as_str())
    );
    assert_eq!(
        h.get(&format!("/v2/b/blobs/{d}")).await.body,
        b"anonymous mount"
    );
}

#[tokio::test]
async fn every_upload_path_indexes_a_blob_by_its_size() {
    // A blob's chunk size is a function of its size, so that every node indexes it the same
    // way: whether the size came before the bytes (monolithic POST), came wrong, or came only
    // at the end (a session of PATCHes).
    let h = Harness::new().await;
    let data = bytes(41, 3 * 1024 * 1024 + 5);
    let want = shoal_protocol::chunk_size_for(data.len() as u64);
    let mut digests = vec![h.push_blob("lib/idx", &data[..data.len() - 1]).await];
    let d = sha256(&data);
    h.upload_in_chunks("lib/idx", &d, &[&data[..1 << 20], &data[1 << 20..]], b"")
        .await
        .expect(StatusCode::CREATED);
    digests.push(d);
    for d in digests {
        let digest: shoal_protocol::Digest = d.parse().unwrap();
        let index = h
            .store()
            .blob_index(&digest)
            .await
            .unwrap()
            .expect("an index");
        assert_eq!(index.chunk_size(), want, "{d}");
        assert_eq!(
            index.size(),
            h.store().blob_size(&digest).await.unwrap().unwrap()
        );
    }
}
