//! Listing endpoints: `GET /v2/_catalog`, `GET /v2/<name>/tags/list` (both paginated with `n`
//! and `last` and a `Link` header to the next page) and `GET /v2/<name>/referrers/<digest>`.

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use shoal_protocol::{Digest, RepoName};

use super::error::RegistryError;
use super::{Registry, Result, param};
use crate::manifest::OCI_INDEX;

/// Largest page served, whatever `n` asks; a client gets a `Link` to the rest.
const MAX_PAGE_ENTRIES: usize = 10_000;

/// Reads `n` and `last`. `n` is clamped to [`MAX_PAGE_ENTRIES`].
fn page(q: &[(String, String)]) -> Result<(usize, Option<String>)> {
    let n = match param(q, "n") {
        None => MAX_PAGE_ENTRIES,
        Some(v) => v
            .parse::<usize>()
            .map_err(|_| RegistryError::PaginationInvalid(format!("n={v:?} is not a number")))?
            .min(MAX_PAGE_ENTRIES),
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
pub(super) async fn catalog(r: &Registry, q: &[(String, String)]) -> Result<Response> {
    let (n, last) = page(q)?;
    // One more than asked tells whether there is a next page.
    let mut repos = r
        .store
        .read(move |i| i.repos(last.as_deref(), n.saturating_add(1)))
        .await?;
    let more = repos.len() > n;
    repos.truncate(n);
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
    let (n, last) = page(q)?;
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
pub(super) async fn referrers(
    r: &Registry,
    name: &RepoName,
    subject: &Digest,
    q: &[(String, String)],
) -> Result<Response> {
    let (n, s) = (name.clone(), subject.clone());
    let found = r.store.read(move |i| i.referrers(&n, &s)).await?;
    let filter = param(q, "artifactType");
    let manifests: Vec<serde_json::Value> = found
        .into_iter()
        .filter(|(_, info)| filter.is_none_or(|f| info.artifact_type.as_deref() == Some(f)))
        .map(|(digest, info)| {
            let mut d = serde_json::json!({
                "mediaType": info.media_type,
                "digest": digest.to_string(),
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
    let mut response = axum::Json(body).into_response();
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
