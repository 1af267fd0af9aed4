//! Blobs: monolithic uploads, GET and HEAD with ranges, deletes, digest validation, and a blob
//! being visible only in the repositories it was pushed or mounted to.

use axum::body::Body;
use axum::http::{Method, StatusCode};

use crate::harness::*;

#[tokio::test(flavor = "multi_thread")]
async fn monolithic_post_stores_the_blob_and_get_serves_it() {
    let h = Harness::new().await;
    let data = bytes(1, 5000);
    let d = sha256(&data);
    let r = h
        .request(
            Method::POST,
            &format!("/v2/team/app/blobs/uploads/?digest={d}"),
            &[
                ("content-type", "application/octet-stream"),
                ("content-length", "5000"),
            ],
            data.clone(),
        )
        .await;
    r.expect(StatusCode::CREATED);
    let location = r.must_header("location").to_owned();
    assert_eq!(location, format!("/v2/team/app/blobs/{d}"));
    assert_eq!(r.header("docker-content-digest"), Some(d.as_str()));

    let g = h.get(&location).await;
    g.expect(StatusCode::OK);
    assert_eq!(g.body, data);
    assert_eq!(g.header("content-length"), Some("5000"));
    assert_eq!(g.header("docker-content-digest"), Some(d.as_str()));
    assert_eq!(g.header("etag"), Some(format!("\"{d}\"").as_str()));
    assert_eq!(g.header("accept-ranges"), Some("bytes"));

    let hd = h.head(&location).await;
    hd.expect(StatusCode::OK);
    assert!(hd.body.is_empty(), "HEAD has a body");
    assert_eq!(hd.header("content-length"), Some("5000"));
    assert_eq!(hd.header("docker-content-digest"), Some(d.as_str()));
}

#[tokio::test(flavor = "multi_thread")]
async fn empty_blob_round_trips() {
    let h = Harness::new().await;
    let d = h.push_blob("r", b"").await;
    assert_eq!(d, sha256(b""));
    let g = h.get(&format!("/v2/r/blobs/{d}")).await;
    g.expect(StatusCode::OK);
    assert!(g.body.is_empty());
    assert_eq!(g.header("content-length"), Some("0"));
    // No byte of an empty blob can be served.
    let r = h
        .get_with(&format!("/v2/r/blobs/{d}"), &[("range", "bytes=0-")])
        .await;
    r.expect(StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(r.header("content-range"), Some("bytes */0"));
}

#[tokio::test(flavor = "multi_thread")]
async fn blob_range_requests_are_served_as_206() {
    let h = Harness::new().await;
    let data = bytes(2, 2048);
    let d = h.push_blob("r", &data).await;
    let uri = format!("/v2/r/blobs/{d}");
    let cases: [(&str, usize, usize); 6] = [
        ("bytes=500-1499", 500, 1499),
        ("bytes=500-", 500, 2047),
        ("bytes=-500", 1548, 2047),
        ("bytes=2000-5000", 2000, 2047),
        ("bytes=0-0", 0, 0),
        ("bytes=-5000", 0, 2047),
    ];
    for (range, start, end) in cases {
        let r = h.get_with(&uri, &[("range", range)]).await;
        r.expect(StatusCode::PARTIAL_CONTENT);
        assert_eq!(
            r.header("content-range"),
            Some(format!("bytes {start}-{end}/2048").as_str()),
            "{range}"
        );
        let len = end - start + 1;
        assert_eq!(
            r.header("content-length"),
            Some(len.to_string().as_str()),
            "{range}"
        );
        assert_eq!(r.body, data[start..=end], "{range}");
        assert_eq!(r.header("docker-content-digest"), Some(d.as_str()));

        let hd = h
            .request(Method::HEAD, &uri, &[("range", range)], Body::empty())
            .await;
        hd.expect(StatusCode::PARTIAL_CONTENT);
        assert!(hd.body.is_empty());
        assert_eq!(hd.header("content-length"), Some(len.to_string().as_str()));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bodies_longer_than_one_piece_come_whole_from_recycled_buffers() {
    // A body is read a piece (1 MiB) at a time into buffers that hyper hands back when it has
    // sent them; a piece served from a recycled buffer must hold its own bytes, not a longer
    // earlier piece's tail or zeros.
    let h = Harness::new().await;
    let data = bytes(7, (3 << 20) + 12_345);
    let d = h.push_blob("r", &data).await;
    let uri = format!("/v2/r/blobs/{d}");
    let whole = h.get(&uri).await;
    whole.expect(StatusCode::OK);
    assert!(whole.body == data, "whole body differs");
    for (start, end) in [
        (1, (2 << 20) + 7),
        ((1 << 20) - 1, (1 << 20) + 1),
        (3 << 20, data.len() - 1),
    ] {
        let r = h
            .get_with(&uri, &[("range", &format!("bytes={start}-{end}"))])
            .await;
        r.expect(StatusCode::PARTIAL_CONTENT);
        assert!(r.body == data[start..=end], "bytes {start}-{end} differ");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn blob_range_past_the_end_is_416_with_the_size() {
    let h = Harness::new().await;
    let data = bytes(3, 2048);
    let d = h.push_blob("r", &data).await;
    let uri = format!("/v2/r/blobs/{d}");
    for range in [
        "bytes=2048-",
        "bytes=5000-10000",
        "bytes=2048-2050",
        "bytes=-0",
    ] {
        let r = h.get_with(&uri, &[("range", range)]).await;
        r.expect(StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(r.header("content-range"), Some("bytes */2048"), "{range}");
    }
}

/// The OCI conformance suite ("range requests" / "range 500-0") requires a 416 for a range whose
/// last position is before its first; answering 200 with the whole blob fails it.
#[tokio::test(flavor = "multi_thread")]
async fn blob_range_with_last_before_first_is_416() {
    let h = Harness::new().await;
    let d = h.push_blob("r", &bytes(4, 2048)).await;
    let r = h
        .get_with(&format!("/v2/r/blobs/{d}"), &[("range", "bytes=500-0")])
        .await;
    r.expect(StatusCode::RANGE_NOT_SATISFIABLE);
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_blob_then_it_is_unknown() {
    let h = Harness::new().await;
    let d = h.push_blob("r", b"to be deleted").await;
    let uri = format!("/v2/r/blobs/{d}");
    h.get(&uri).await.expect(StatusCode::OK);
    h.delete(&uri).await.expect(StatusCode::ACCEPTED);
    h.get(&uri)
        .await
        .expect_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN");
    h.head(&uri).await.expect(StatusCode::NOT_FOUND);
    h.delete(&uri)
        .await
        .expect_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN");
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_blob_is_404_blob_unknown() {
    let h = Harness::new().await;
    h.push_blob("r", b"something").await;
    let d = sha256(b"never pushed");
    for uri in [format!("/v2/r/blobs/{d}"), format!("/v2/unknown/blobs/{d}")] {
        h.get(&uri)
            .await
            .expect_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN");
        let hd = h.head(&uri).await;
        hd.expect(StatusCode::NOT_FOUND);
        h.delete(&uri)
            .await
            .expect_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_blob_is_visible_only_in_its_repository() {
    let h = Harness::new().await;
    let d = h.push_blob("a", b"private to a").await;
    h.get(&format!("/v2/a/blobs/{d}"))
        .await
        .expect(StatusCode::OK);
    h.push_blob("b", b"b exists").await;
    h.get(&format!("/v2/b/blobs/{d}"))
        .await
        .expect_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN");
    h.head(&format!("/v2/b/blobs/{d}"))
        .await
        .expect(StatusCode::NOT_FOUND);
    // Deleting it from b (where it is not) does not delete it from a.
    h.delete(&format!("/v2/b/blobs/{d}"))
        .await
        .expect_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN");
    h.get(&format!("/v2/a/blobs/{d}"))
        .await
        .expect(StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn monolithic_post_with_a_wrong_digest_stores_nothing() {
    let h = Harness::new().await;
    h.push_blob("other", b"an unrelated blob").await;
    let before = files_under(&h.path().join("blobs"));
    assert_eq!(before.len(), 1);
    let data = bytes(5, 4096);
    let claimed = sha256(b"something else");
    let r = h.upload_monolithic("r", &claimed, &data).await;
    r.expect_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID");
    assert_eq!(files_under(&h.path().join("blobs")), before);
    assert!(files_under(&h.path().join("tmp")).is_empty());
    for d in [claimed, sha256(&data)] {
        h.get(&format!("/v2/r/blobs/{d}"))
            .await
            .expect_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN");
    }
    // The repository was not created either.
    assert_eq!(catalog(&h).await, ["other"]);
    h.get("/v2/r/tags/list")
        .await
        .expect_error(StatusCode::NOT_FOUND, "NAME_UNKNOWN");
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_digests_are_400_digest_invalid() {
    let h = Harness::new().await;
    let good = sha256(b"x");
    let bad = [
        "sha256:zz".to_owned(),
        "sha256".to_owned(),
        "nocolon".to_owned(),
        format!("sha256:{}", "A".repeat(64)),
        format!("sha256:{}", "a".repeat(63)),
        "md5:d41d8cd98f00b204e9800998ecf8427e".to_owned(),
        format!("sha384:{}", "a".repeat(96)),
    ];
    for d in &bad {
        h.upload_monolithic("r", &q(d), b"x")
            .await
            .expect_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID");
        h.get(&format!("/v2/r/blobs/{d}"))
            .await
            .expect_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID");
        h.mount_blob("r", &q(d), Some("other"))
            .await
            .expect_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID");
        let loc = h.start_upload("r").await;
        h.put_upload(&loc, &q(d), b"x")
            .await
            .expect_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID");
    }
    assert!(files_under(&h.path().join("blobs")).is_empty());
    h.get(&format!("/v2/r/blobs/{good}"))
        .await
        .expect_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN");
}

#[tokio::test(flavor = "multi_thread")]
async fn sha512_blobs_upload_monolithically_and_in_chunks() {
    let h = Harness::new().await;
    let data = bytes(6, 3000);
    let d = sha512(&data);
    let r = h.upload_monolithic("r", &d, &data).await;
    r.expect(StatusCode::CREATED);
    assert_eq!(r.header("docker-content-digest"), Some(d.as_str()));
    assert_eq!(
        r.header("location"),
        Some(format!("/v2/r/blobs/{d}").as_str())
    );
    let g = h.get(&format!("/v2/r/blobs/{d}")).await;
    g.expect(StatusCode::OK);
    assert_eq!(g.body, data);
    assert_eq!(g.header("docker-content-digest"), Some(d.as_str()));
    // The sha256 name of the same bytes is a different blob, never pushed.
    h.get(&format!("/v2/r/blobs/{}", sha256(&data)))
        .await
        .expect_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN");

    let data2 = bytes(7, 3000);
    let d2 = sha512(&data2);
    let r = h
        .upload_in_chunks("r", &d2, &[&data2[..1000]], &data2[1000..])
        .await;
    r.expect(StatusCode::CREATED);
    assert_eq!(r.header("docker-content-digest"), Some(d2.as_str()));
    let g = h.get(&format!("/v2/r/blobs/{d2}")).await;
    g.expect(StatusCode::OK);
    assert_eq!(g.body, data2);
}
