//! The base endpoint and what routing does for every endpoint: the API version header,
//! repository name validation, 405 with `Allow` for a wrong method, 404 for an unknown path.

use axum::body::Body;
use axum::http::{Method, StatusCode};

use crate::harness::*;
use crate::push::*;

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
    h.mount_blob("a", &d, Some("UP"))
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
