//! In-process HTTP tests of the registry API (OCI distribution spec v1.1): every endpoint and
//! every error, with status codes, spec error bodies and headers, driven through the axum router
//! with `tower::ServiceExt::oneshot` over a store in a temp dir. Restarts reopen the store on the
//! same directory; `fsck` runs once the store is dropped.

mod common;

use std::collections::BTreeMap;

use axum::body::Body;
use axum::http::{Method, StatusCode};
use common::*;
use serde_json::json;

/// Percent-encodes a query value (everything but unreserved characters).
fn q(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The URL of a `Link: <url>; rel="next"` header.
fn next_link(link: &str) -> String {
    assert!(link.ends_with("; rel=\"next\""), "bad Link header {link:?}");
    let url = link
        .strip_prefix('<')
        .and_then(|l| l.split_once('>'))
        .map(|(u, _)| u)
        .unwrap_or_else(|| panic!("bad Link header {link:?}"));
    url.to_owned()
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|s| s.as_str().expect("string").to_owned())
        .collect()
}

async fn catalog(h: &Harness) -> Vec<String> {
    let r = h.get("/v2/_catalog").await;
    r.expect(StatusCode::OK);
    strings(&r.json()["repositories"])
}

async fn tags(h: &Harness, repo: &str) -> Vec<String> {
    let r = h.get(&format!("/v2/{repo}/tags/list")).await;
    r.expect(StatusCode::OK);
    assert_eq!(r.json()["name"], repo);
    strings(&r.json()["tags"])
}

// ---------------------------------------------------------------------------------------------
// Base
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn base_endpoint_answers_200_with_the_api_version_header() {
    let h = Harness::new().await;
    for uri in ["/v2/", "/v2"] {
        let r = h.get(uri).await;
        r.expect(StatusCode::OK);
        assert_eq!(
            r.header("docker-distribution-api-version"),
            Some("registry/2.0")
        );
    }
    let r = h.head("/v2/").await;
    r.expect(StatusCode::OK);
    assert_eq!(
        r.header("docker-distribution-api-version"),
        Some("registry/2.0")
    );
    assert!(r.body.is_empty());
    // Errors carry it too, so clients can tell the API from a random 404.
    let r = h.get("/v2/nope/tags/list").await;
    r.expect_error(StatusCode::NOT_FOUND, "NAME_UNKNOWN");
    assert_eq!(
        r.header("docker-distribution-api-version"),
        Some("registry/2.0")
    );
}

// ---------------------------------------------------------------------------------------------
// Blobs
// ---------------------------------------------------------------------------------------------

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
    let r = h
        .request(
            Method::POST,
            &format!("/v2/r/blobs/uploads/?digest={claimed}"),
            &[("content-type", "application/octet-stream")],
            data.clone(),
        )
        .await;
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
        h.request(
            Method::POST,
            &format!("/v2/r/blobs/uploads/?digest={}", q(d)),
            &[],
            b"x".to_vec(),
        )
        .await
        .expect_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID");
        h.get(&format!("/v2/r/blobs/{d}"))
            .await
            .expect_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID");
        h.request(
            Method::POST,
            &format!("/v2/r/blobs/uploads/?mount={}&from=other", q(d)),
            &[],
            Body::empty(),
        )
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
    let r = h
        .request(
            Method::POST,
            &format!("/v2/r/blobs/uploads/?digest={d}"),
            &[("content-type", "application/octet-stream")],
            data.clone(),
        )
        .await;
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
    let loc = h.start_upload("r").await;
    let p = h.patch(&loc, 0, &data2[..1000]).await;
    p.expect(StatusCode::ACCEPTED);
    let loc = p.must_header("location").to_owned();
    let r = h.put_upload(&loc, &d2, &data2[1000..]).await;
    r.expect(StatusCode::CREATED);
    assert_eq!(r.header("docker-content-digest"), Some(d2.as_str()));
    let g = h.get(&format!("/v2/r/blobs/{d2}")).await;
    g.expect(StatusCode::OK);
    assert_eq!(g.body, data2);
}

// ---------------------------------------------------------------------------------------------
// Upload sessions
// ---------------------------------------------------------------------------------------------

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
    let loc = h.start_upload("r").await;
    h.patch(&loc, 0, &data[..1000])
        .await
        .expect(StatusCode::ACCEPTED);

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
    let loc = h.start_upload("r").await;
    h.patch(&loc, 0, &data[..1000])
        .await
        .expect(StatusCode::ACCEPTED);
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
    let loc = h.start_upload("r").await;
    h.patch(&loc, 0, &data[..5])
        .await
        .expect(StatusCode::ACCEPTED);
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
    let loc = h.start_upload("r").await;
    h.patch(&loc, 0, &data).await.expect(StatusCode::ACCEPTED);
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
    let loc = h.start_upload("r").await;
    h.patch(&loc, 0, &data[..3000])
        .await
        .expect(StatusCode::ACCEPTED);
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
    let loc = h.start_upload("r").await;
    h.patch(&loc, 0, b"some bytes")
        .await
        .expect(StatusCode::ACCEPTED);
    assert_eq!(files_under(&h.path().join("uploads")).len(), 2); // repo, data
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
    let loc = h.start_upload("a").await;
    h.patch(&loc, 0, &data[..200])
        .await
        .expect(StatusCode::ACCEPTED);
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
    let loc = h.start_upload("r").await;
    h.patch(&loc, 0, &data[..4000])
        .await
        .expect(StatusCode::ACCEPTED);

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
        let r = h
            .request(
                Method::POST,
                &format!("/v2/{target}/blobs/uploads/?mount={mount}&from=src/repo"),
                &[("content-length", "0")],
                Body::empty(),
            )
            .await;
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
        let r = h
            .request(
                Method::POST,
                &format!("/v2/dst/blobs/uploads/?mount={digest}&from={from}"),
                &[("content-length", "0")],
                Body::empty(),
            )
            .await;
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
    let r = h
        .request(
            Method::POST,
            &format!("/v2/dst/blobs/uploads/?mount={d}&from=empty"),
            &[],
            Body::empty(),
        )
        .await;
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
    let r = h
        .request(
            Method::POST,
            &format!("/v2/b/blobs/uploads/?mount={d}"),
            &[],
            Body::empty(),
        )
        .await;
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

// ---------------------------------------------------------------------------------------------
// Manifests
// ---------------------------------------------------------------------------------------------

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
    h.put_manifest("r", "large", OCI_MANIFEST, &img.manifest)
        .await
        .expect(StatusCode::CREATED);
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
    h.put_manifest("r", "stable", OCI_MANIFEST, &img.manifest)
        .await
        .expect(StatusCode::CREATED);
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
    h.put_manifest("r", "latest", OCI_MANIFEST, &img.manifest)
        .await
        .expect(StatusCode::CREATED);
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
async fn invalid_tags_are_400_tag_invalid() {
    let h = Harness::new().await;
    let img = push_image(&h, "r", Some("ok"), 40).await;
    let long = "a".repeat(129);
    for tag in ["-bad", ".bad", "bad+tag", "bad!", long.as_str()] {
        let uri = format!("/v2/r/manifests/{tag}");
        h.get(&uri)
            .await
            .expect_error(StatusCode::BAD_REQUEST, "TAG_INVALID");
        h.put_manifest("r", tag, OCI_MANIFEST, &img.manifest)
            .await
            .expect_error(StatusCode::BAD_REQUEST, "TAG_INVALID");
        h.delete(&uri)
            .await
            .expect_error(StatusCode::BAD_REQUEST, "TAG_INVALID");
    }
    // The edges of the grammar are valid.
    let max = "A".repeat(128);
    for tag in ["_x", "A-b.c_D", "0", max.as_str()] {
        h.put_manifest("r", tag, OCI_MANIFEST, &img.manifest)
            .await
            .expect(StatusCode::CREATED);
    }
    assert_eq!(tags(&h, "r").await.len(), 5);
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_names_are_400_name_invalid() {
    let h = Harness::new().await;
    let d = sha256(b"x");
    let long = "a".repeat(256);
    let names = [
        "UPPER",
        "a/../b",
        "a/./b",
        "..",
        "a//b",
        "-a",
        "a-",
        "a_",
        "a___b",
        "a/B",
        "a:b",
        long.as_str(),
    ];
    for name in names {
        for (method, uri) in [
            (Method::GET, format!("/v2/{name}/tags/list")),
            (Method::GET, format!("/v2/{name}/manifests/latest")),
            (Method::PUT, format!("/v2/{name}/manifests/latest")),
            (Method::GET, format!("/v2/{name}/blobs/{d}")),
            (Method::POST, format!("/v2/{name}/blobs/uploads/")),
            (Method::GET, format!("/v2/{name}/referrers/{d}")),
        ] {
            let r = h.request(method.clone(), &uri, &[], Body::empty()).await;
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{method} {uri}: {r:?}");
            r.expect_error(StatusCode::BAD_REQUEST, "NAME_INVALID");
        }
    }
    // A malformed `from` for a mount.
    h.request(
        Method::POST,
        &format!("/v2/a/blobs/uploads/?mount={d}&from=UP"),
        &[],
        Body::empty(),
    )
    .await
    .expect_error(StatusCode::BAD_REQUEST, "NAME_INVALID");
    // The edges of the grammar are valid names (unknown here, so 404 rather than 400).
    let max = "a".repeat(255);
    for name in ["a__b", "a---b", "a.b/c_d/e-f", "0", max.as_str()] {
        h.get(&format!("/v2/{name}/tags/list"))
            .await
            .expect_error(StatusCode::NOT_FOUND, "NAME_UNKNOWN");
    }
}

// ---------------------------------------------------------------------------------------------
// Referrers
// ---------------------------------------------------------------------------------------------

/// The referrer descriptors as a map from digest to the fields the spec defines.
fn referrer_map(index: &serde_json::Value) -> BTreeMap<String, serde_json::Value> {
    assert_eq!(index["schemaVersion"], 2);
    assert_eq!(index["mediaType"], OCI_INDEX);
    index["manifests"]
        .as_array()
        .unwrap_or_else(|| panic!("no manifests array: {index}"))
        .iter()
        .map(|d| {
            let mut m = serde_json::Map::new();
            for k in ["mediaType", "digest", "size", "artifactType", "annotations"] {
                if let Some(v) = d.get(k) {
                    m.insert(k.to_owned(), v.clone());
                }
            }
            (
                d["digest"].as_str().expect("digest").to_owned(),
                serde_json::Value::Object(m),
            )
        })
        .collect()
}

struct Referrer {
    digest: String,
    descriptor: serde_json::Value,
}

async fn push_referrer(h: &Harness, repo: &str, body: serde_json::Value) -> Referrer {
    let bytes = to_bytes(&body);
    let media_type = body["mediaType"].as_str().expect("mediaType").to_owned();
    let digest = sha256(&bytes);
    let r = h.put_manifest(repo, &digest, &media_type, &bytes).await;
    r.expect(StatusCode::CREATED);
    let mut descriptor = json!({"mediaType": media_type, "digest": digest, "size": bytes.len()});
    let artifact_type = body
        .get("artifactType")
        .cloned()
        .or_else(|| body.get("config").map(|c| c["mediaType"].clone()));
    if let Some(t) = artifact_type {
        descriptor["artifactType"] = t;
    }
    if let Some(a) = body.get("annotations") {
        descriptor["annotations"] = a.clone();
    }
    Referrer { digest, descriptor }
}

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
    h.put_manifest("r", "v1", OCI_MANIFEST, &img.manifest)
        .await
        .expect(StatusCode::CREATED);
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

// ---------------------------------------------------------------------------------------------
// Listing: tags and catalog
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn tags_list_is_sorted_and_paginated() {
    let h = Harness::new().await;
    let img = push_image(&h, "r", None, 45).await;
    let pushed = ["v1.2", "latest", "B", "a", "v1.10", "_x", "0"];
    for t in pushed {
        h.put_manifest("r", t, OCI_MANIFEST, &img.manifest)
            .await
            .expect(StatusCode::CREATED);
    }
    let mut sorted: Vec<String> = pushed.iter().map(|s| s.to_string()).collect();
    sorted.sort(); // byte order: Go's sort.Strings ("ASCIIbetical")
    let r = h.get("/v2/r/tags/list").await;
    r.expect(StatusCode::OK);
    assert_eq!(r.header("link"), None);
    assert_eq!(r.json(), json!({"name": "r", "tags": sorted}));

    // n=3: pages of three, with a Link to the next page while more remain.
    let r = h.get("/v2/r/tags/list?n=3").await;
    r.expect(StatusCode::OK);
    assert_eq!(strings(&r.json()["tags"]), sorted[..3]);
    assert_eq!(
        r.header("link"),
        Some(format!("</v2/r/tags/list?n=3&last={}>; rel=\"next\"", sorted[2]).as_str())
    );
    let mut collected = Vec::new();
    let mut url = "/v2/r/tags/list?n=3".to_owned();
    let mut pages = 0;
    loop {
        let r = h.get(&url).await;
        r.expect(StatusCode::OK);
        let page = strings(&r.json()["tags"]);
        assert!(page.len() <= 3);
        collected.extend(page);
        pages += 1;
        match r.header("link") {
            Some(link) => url = next_link(link),
            None => break,
        }
        assert!(pages < 10, "pagination does not end");
    }
    assert_eq!(collected, sorted);
    assert_eq!(pages, 3);

    // n equal to the count, or more: everything, no Link.
    for n in [7, 8, 100_000] {
        let r = h.get(&format!("/v2/r/tags/list?n={n}")).await;
        assert_eq!(strings(&r.json()["tags"]), sorted, "n={n}");
        assert_eq!(r.header("link"), None, "n={n}");
    }
    // n=0: an empty list and no Link (spec MUST).
    let r = h.get("/v2/r/tags/list?n=0").await;
    r.expect(StatusCode::OK);
    assert_eq!(r.json()["tags"], json!([]));
    assert_eq!(r.header("link"), None);
    // last alone: everything after it.
    let r = h.get("/v2/r/tags/list?last=a").await;
    assert_eq!(strings(&r.json()["tags"]), ["latest", "v1.10", "v1.2"]);
    assert_eq!(r.header("link"), None);
    let r = h.get("/v2/r/tags/list?n=1&last=latest").await;
    assert_eq!(strings(&r.json()["tags"]), ["v1.10"]);
    assert_eq!(
        r.header("link"),
        Some("</v2/r/tags/list?n=1&last=v1.10>; rel=\"next\"")
    );
    let r = h.get("/v2/r/tags/list?last=v1.2").await;
    assert_eq!(r.json()["tags"], json!([]));
    assert_eq!(r.header("link"), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn tags_list_of_unknown_and_untagged_repositories() {
    let h = Harness::new().await;
    h.get("/v2/nosuchrepo/tags/list")
        .await
        .expect_error(StatusCode::NOT_FOUND, "NAME_UNKNOWN");
    h.get("/v2/nosuchrepo/tags/list?n=1")
        .await
        .expect_error(StatusCode::NOT_FOUND, "NAME_UNKNOWN");
    // A repository with blobs and no tags exists and has no tags.
    h.push_blob("blobsonly", b"x").await;
    let r = h.get("/v2/blobsonly/tags/list").await;
    r.expect(StatusCode::OK);
    assert_eq!(r.json(), json!({"name": "blobsonly", "tags": []}));
    // Tags are per repository, even when one name prefixes another.
    push_image(&h, "a", Some("x"), 46).await;
    push_image(&h, "a/b", Some("y"), 47).await;
    push_image(&h, "ab", Some("z"), 48).await;
    assert_eq!(tags(&h, "a").await, ["x"]);
    assert_eq!(tags(&h, "a/b").await, ["y"]);
    assert_eq!(tags(&h, "ab").await, ["z"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn catalog_is_sorted_and_paginated() {
    let h = Harness::new().await;
    assert!(catalog(&h).await.is_empty());
    let repos = ["z0", "b", "a/x", "c/d/e", "a", "a-b"];
    for (i, repo) in repos.iter().enumerate() {
        if i % 2 == 0 {
            h.push_blob(repo, repo.as_bytes()).await;
        } else {
            push_image(&h, repo, Some("t"), 50 + i as u64).await;
        }
    }
    let mut sorted: Vec<String> = repos.iter().map(|s| s.to_string()).collect();
    sorted.sort();
    let r = h.get("/v2/_catalog").await;
    r.expect(StatusCode::OK);
    assert_eq!(r.header("link"), None);
    assert_eq!(strings(&r.json()["repositories"]), sorted);

    let r = h.get("/v2/_catalog?n=2").await;
    assert_eq!(strings(&r.json()["repositories"]), sorted[..2]);
    assert_eq!(
        r.header("link"),
        Some(format!("</v2/_catalog?n=2&last={}>; rel=\"next\"", sorted[1]).as_str())
    );
    let mut collected = Vec::new();
    let mut url = "/v2/_catalog?n=2".to_owned();
    let mut pages = 0;
    loop {
        let r = h.get(&url).await;
        r.expect(StatusCode::OK);
        collected.extend(strings(&r.json()["repositories"]));
        pages += 1;
        match r.header("link") {
            Some(link) => url = next_link(link),
            None => break,
        }
        assert!(pages < 10, "pagination does not end");
    }
    assert_eq!(collected, sorted);
    assert_eq!(pages, 3);
    // A `last` containing a slash, escaped in the link and unescaped when followed.
    let r = h.get("/v2/_catalog?n=1&last=a-b").await;
    assert_eq!(strings(&r.json()["repositories"]), ["a/x"]);
    let next = next_link(r.must_header("link"));
    assert_eq!(next, "/v2/_catalog?n=1&last=a%2Fx");
    let r = h.get(&next).await;
    assert_eq!(strings(&r.json()["repositories"]), ["b"]);

    let r = h.get("/v2/_catalog?n=0").await;
    r.expect(StatusCode::OK);
    assert_eq!(r.json()["repositories"], json!([]));
    assert_eq!(r.header("link"), None);
    let r = h.get("/v2/_catalog?n=6").await;
    assert_eq!(strings(&r.json()["repositories"]), sorted);
    assert_eq!(r.header("link"), None);
}

// ---------------------------------------------------------------------------------------------
// Routing
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn wrong_methods_are_405() {
    let h = Harness::new().await;
    let img = push_image(&h, "r", Some("v1"), 60).await;
    let loc = h.start_upload("r").await;
    let d = &img.layers[0];
    let cases = [
        (Method::POST, "/v2/".to_owned()),
        (Method::PUT, "/v2/".to_owned()),
        (Method::DELETE, "/v2/".to_owned()),
        (Method::POST, "/v2/_catalog".to_owned()),
        (Method::DELETE, "/v2/_catalog".to_owned()),
        (Method::PUT, "/v2/r/tags/list".to_owned()),
        (Method::DELETE, "/v2/r/tags/list".to_owned()),
        (Method::POST, "/v2/r/manifests/v1".to_owned()),
        (Method::PATCH, "/v2/r/manifests/v1".to_owned()),
        (Method::PUT, format!("/v2/r/blobs/{d}")),
        (Method::POST, format!("/v2/r/blobs/{d}")),
        (Method::PATCH, format!("/v2/r/blobs/{d}")),
        (Method::GET, "/v2/r/blobs/uploads/".to_owned()),
        (Method::PUT, "/v2/r/blobs/uploads/".to_owned()),
        (Method::PATCH, "/v2/r/blobs/uploads/".to_owned()),
        (Method::DELETE, "/v2/r/blobs/uploads/".to_owned()),
        (Method::POST, loc.clone()),
        (Method::HEAD, loc.clone()),
        (Method::POST, format!("/v2/r/referrers/{}", img.digest)),
        (Method::DELETE, format!("/v2/r/referrers/{}", img.digest)),
    ];
    for (method, uri) in cases {
        let r = h.request(method.clone(), &uri, &[], Body::empty()).await;
        assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{method} {uri}");
    }
    // Nothing was changed by the refused requests.
    h.get(&format!("/v2/r/blobs/{d}"))
        .await
        .expect(StatusCode::OK);
    h.get("/v2/r/manifests/v1").await.expect(StatusCode::OK);
    h.get(&loc).await.expect(StatusCode::NO_CONTENT);
}

/// RFC 9110 §15.5.6: "The origin server MUST generate an Allow header field in a 405 response
/// containing a list of the target resource's currently supported methods." The distribution
/// spec defers to RFC 9110 where it says nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_405_lists_the_methods_of_the_resource() {
    let h = Harness::new().await;
    push_image(&h, "r", Some("v1"), 61).await;
    for (method, uri, allowed) in [
        (
            Method::POST,
            "/v2/r/manifests/v1",
            vec!["GET", "HEAD", "PUT", "DELETE"],
        ),
        (Method::PUT, "/v2/r/tags/list", vec!["GET"]),
        (Method::DELETE, "/v2/_catalog", vec!["GET"]),
    ] {
        let r = h.request(method.clone(), uri, &[], Body::empty()).await;
        r.expect(StatusCode::METHOD_NOT_ALLOWED);
        let allow: Vec<String> = r
            .must_header("allow")
            .split(',')
            .map(|m| m.trim().to_owned())
            .collect();
        assert!(
            !allow.contains(&method.to_string()),
            "{method} {uri}: {allow:?}"
        );
        for m in &allowed {
            assert!(allow.iter().any(|a| a == m), "{method} {uri}: {allow:?}");
        }
        assert_eq!(allow.len(), allowed.len(), "{method} {uri}: {allow:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_paths_are_404() {
    let h = Harness::new().await;
    push_image(&h, "r", Some("v1"), 62).await;
    for uri in [
        "/",
        "/v1/",
        "/v3/r/tags/list",
        "/v2x",
        "/v2/r",
        "/v2/r/",
        "/v2/r/unknown",
        "/v2/r/tags",
        "/v2/r/tags/other",
        "/v2/r/manifests",
        "/v2/tags/list",
        "/v2/_catalog/x",
        "/favicon.ico",
    ] {
        let r = h.get(uri).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{uri}: {r:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Restart and fsck
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn everything_pushed_is_served_after_a_restart() {
    let mut h = Harness::new().await;
    let img = push_image(&h, "team/app", Some("v1"), 70).await;
    h.put_manifest("team/app", "gone", OCI_MANIFEST, &img.manifest)
        .await
        .expect(StatusCode::CREATED);
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
    h.put_manifest("r", "v2", OCI_MANIFEST, &img.manifest)
        .await
        .expect(StatusCode::CREATED);
    h.delete("/v2/r/manifests/v2")
        .await
        .expect(StatusCode::ACCEPTED);
    let d512 = sha512(b"sha512 blob");
    h.request(
        Method::POST,
        &format!("/v2/r/blobs/uploads/?digest={d512}"),
        &[],
        b"sha512 blob".to_vec(),
    )
    .await
    .expect(StatusCode::CREATED);
    let loc = h.start_upload("r").await;
    h.patch(&loc, 0, b"in progress")
        .await
        .expect(StatusCode::ACCEPTED);
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
    let loc = h.start_upload("r").await;
    h.patch(&loc, 0, b"12345")
        .await
        .expect(StatusCode::ACCEPTED);
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
    use shoal_node::store::{Event, Index};
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
        let event = Event::Unlink {
            repo: "r".parse().expect("repo"),
            digest: unlinked.parse().expect("digest"),
        };
        index.apply(&event, end)?;
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

// ---------------------------------------------------------------------------------------------
// Property: garbage manifests
// ---------------------------------------------------------------------------------------------

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

#[tokio::test]
async fn every_upload_path_indexes_a_blob_by_its_size() {
    // A blob's chunk size is a function of its size, so that every node indexes it the same
    // way: whether the size came before the bytes (monolithic POST), came wrong, or came only
    // at the end (a session of PATCHes).
    let h = Harness::new().await;
    let data = bytes(41, 3 * 1024 * 1024 + 5);
    let want = shoal_protocol::chunk_size_for(data.len() as u64);
    let mut digests = vec![h.push_blob("lib/idx", &data[..data.len() - 1]).await];
    let loc = h.start_upload("lib/idx").await;
    h.patch(&loc, 0, &data[..1 << 20])
        .await
        .expect(StatusCode::ACCEPTED);
    h.patch(&loc, 1 << 20, &data[1 << 20..])
        .await
        .expect(StatusCode::ACCEPTED);
    let d = sha256(&data);
    h.put_upload(&loc, &d, b"")
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
