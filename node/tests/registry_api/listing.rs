//! Listings: the tag list and the catalog, sorted and paginated with `Link` headers.

use axum::http::StatusCode;
use serde_json::json;

use crate::harness::*;
use crate::push::*;

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

#[tokio::test(flavor = "multi_thread")]
async fn tags_list_is_sorted_and_paginated() {
    let h = Harness::new().await;
    let img = push_image(&h, "r", None, 45).await;
    let pushed = ["v1.2", "latest", "B", "a", "v1.10", "_x", "0"];
    for t in pushed {
        tag_image(&h, "r", t, &img).await;
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
