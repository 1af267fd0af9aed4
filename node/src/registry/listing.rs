//! Listing endpoints: `GET /v2/_catalog`, `GET /v2/<name>/tags/list` and
//! `GET /v2/<name>/referrers/<digest>`, all paginated with `n` and `last` and a `Link` header
//! to the next page. A page has a default and a largest size whatever `n` asks, and is read
//! from the index range at its cursor: no listing loads the whole set.

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use shoal_protocol::{Digest, RepoName};

use super::error::RegistryError;
use super::{Registry, Result, param};
use crate::manifest::OCI_INDEX;
use crate::store::index::ReferrersPage;

/// Page size when `n` is not given; a client gets a `Link` to the rest.
const DEFAULT_PAGE_ENTRIES: usize = 1000;
/// Largest page served, whatever `n` asks.
const MAX_PAGE_ENTRIES: usize = 10_000;
/// Repository names read from the index at a time while a catalog page fills with names the
/// caller may see.
const CATALOG_BATCH: usize = 1024;
/// Largest page of referrers, whatever `n` asks (their descriptors are larger).
const MAX_REFERRERS_ENTRIES: usize = 1000;
/// About the most bytes of descriptors in a page of referrers (at least one is served).
const MAX_REFERRERS_BYTES: usize = 1 << 20;

/// Reads `n` and `last`. `n` defaults to [`DEFAULT_PAGE_ENTRIES`] and is clamped to `max`.
fn page(q: &[(String, String)], max: usize) -> Result<(usize, Option<String>)> {
    let n = match param(q, "n") {
        None => DEFAULT_PAGE_ENTRIES.min(max),
        Some(v) => v
            .parse::<usize>()
            .map_err(|_| RegistryError::PaginationInvalid(format!("n={v:?} is not a number")))?
            .min(max),
    };
    Ok((n, param(q, "last").map(str::to_owned)))
}

fn with_link(body: serde_json::Value, next: Option<String>) -> Response {
    let mut response = axum::Json(body).into_response();
    if let Some(link) = next.and_then(|l| HeaderValue::from_str(&l).ok()) {
        response.headers_mut().insert(header::LINK, link);
    }
    response
}

/// Query-string escaping for the `last` value in a `Link` (names and tags need little).
fn escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// GET /v2/_catalog
///
/// Lists only the repositories the caller may pull (a page may then hold fewer than `n`; the
/// `Link` still leads on).
pub(super) async fn catalog(
    r: &Registry,
    caller: &crate::auth::Caller,
    q: &[(String, String)],
) -> Result<Response> {
    let (n, last) = page(q, MAX_PAGE_ENTRIES)?;
    // Names the caller may not pull are skipped, reading on until the page is full: the page
    // and its cursor (the last name shown) name no repository the caller cannot see, however
    // it pages. One visible name past the page tells that there is a next one.
    let auth = r.auth();
    let (mut repos, mut cursor, mut more) = (Vec::new(), last, false);
    'read: loop {
        let after = cursor.clone();
        let batch = r
            .store
            .read(move |i| i.repos(after.as_deref(), CATALOG_BATCH))
            .await?;
        let end = batch.len() < CATALOG_BATCH;
        for repo in batch {
            cursor = Some(repo.as_str().to_owned());
            if !auth
                .allowed(caller, &repo)
                .contains(shoal_protocol::fleet::Action::Pull)
            {
                continue;
            }
            if repos.len() == n {
                more = true;
                break 'read;
            }
            repos.push(repo);
        }
        if end {
            break;
        }
    }
    let next = match repos.last() {
        Some(l) if more => Some(format!(
            "</v2/_catalog?n={n}&last={}>; rel=\"next\"",
            escape(l.as_str())
        )),
        _ => None,
    };
    let names: Vec<&str> = repos.iter().map(RepoName::as_str).collect();
    Ok(with_link(
        serde_json::json!({ "repositories": names }),
        next,
    ))
}

/// GET /v2/<name>/tags/list
pub(super) async fn tags(
    r: &Registry,
    name: &RepoName,
    q: &[(String, String)],
) -> Result<Response> {
    let (n, last) = page(q, MAX_PAGE_ENTRIES)?;
    let repo = name.clone();
    let found = r
        .store
        .read(move |i| {
            if !i.repo_exists(&repo)? {
                return Ok(None);
            }
            i.tags(&repo, last.as_deref(), n.saturating_add(1))
                .map(Some)
        })
        .await?;
    let Some(mut tags) = found else {
        return Err(RegistryError::NameUnknown);
    };
    let more = tags.len() > n;
    tags.truncate(n);
    let next = match tags.last() {
        Some(l) if more => Some(format!(
            "</v2/{name}/tags/list?n={n}&last={}>; rel=\"next\"",
            escape(l.as_str())
        )),
        _ => None,
    };
    let tags: Vec<&str> = tags.iter().map(|t| t.as_str()).collect();
    Ok(with_link(
        serde_json::json!({ "name": name.as_str(), "tags": tags }),
        next,
    ))
}

/// GET /v2/<name>/referrers/<digest>
///
/// Paginated like the other listings (the spec lets a registry page referrers with a `Link`);
/// `last` is the digest the previous page ended with.
pub(super) async fn referrers(
    r: &Registry,
    name: &RepoName,
    subject: &Digest,
    q: &[(String, String)],
) -> Result<Response> {
    let (n, last) = page(q, MAX_REFERRERS_ENTRIES)?;
    let filter = param(q, "artifactType").map(str::to_owned);
    let (repo, s, f) = (name.clone(), subject.clone(), filter.clone());
    let (found, more) = r
        .store
        .read(move |i| {
            i.referrers_page(
                &repo,
                &s,
                &ReferrersPage {
                    after: last.as_deref(),
                    n,
                    max_bytes: MAX_REFERRERS_BYTES,
                    artifact_type: f.as_deref(),
                },
            )
        })
        .await?;
    let next = match found.last() {
        Some(l) if more => {
            let mut link = format!(
                "</v2/{name}/referrers/{subject}?n={n}&last={}",
                escape(&l.digest.to_string())
            );
            if let Some(f) = &filter {
                link.push_str(&format!("&artifactType={}", escape(f)));
            }
            link.push_str(">; rel=\"next\"");
            Some(link)
        }
        _ => None,
    };
    let manifests: Vec<serde_json::Value> = found
        .into_iter()
        .map(|info| {
            let mut d = serde_json::json!({
                "mediaType": info.media_type,
                "digest": info.digest.to_string(),
                "size": info.size,
            });
            if let Some(t) = info.artifact_type {
                d["artifactType"] = t.into();
            }
            if let Some(a) = info.annotations {
                d["annotations"] = serde_json::json!(a);
            }
            d
        })
        .collect();
    let body =
        serde_json::json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests });
    let mut response = with_link(body, next);
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(OCI_INDEX));
    if filter.is_some() {
        response.headers_mut().insert(
            "oci-filters-applied",
            HeaderValue::from_static("artifactType"),
        );
    }
    Ok(response)
}
