//! Upload endpoints under `/v2/<name>/blobs/uploads/`: start (monolithic, cross-repository
//! mount or session), chunked `PATCH`, finishing `PUT`, status `GET` and cancelling `DELETE`.

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use futures_util::StreamExt;
use shoal_protocol::{Digest, RepoName};

use super::error::RegistryError;
use super::{Registry, Result, empty, param};
use crate::store::Event;

fn parse_digest(s: &str) -> Result<Digest> {
    s.parse()
        .map_err(|e| RegistryError::DigestInvalid(format!("{e}")))
}

fn session_headers(name: &RepoName, id: &str, offset: u64) -> [(&'static str, String); 3] {
    [
        ("location", format!("/v2/{name}/blobs/uploads/{id}")),
        ("range", format!("0-{}", offset.saturating_sub(1))),
        ("docker-upload-uuid", id.to_owned()),
    ]
}

fn created(name: &RepoName, digest: &Digest) -> Result<Response> {
    empty(
        StatusCode::CREATED,
        &[
            ("location", format!("/v2/{name}/blobs/{digest}")),
            ("docker-content-digest", digest.to_string()),
        ],
    )
}

/// Links an existing blob from `from` (or, without `from`, any blob this node holds) into
/// `name`. Returns whether it did.
async fn mount(
    r: &Registry,
    name: &RepoName,
    digest: &Digest,
    from: Option<RepoName>,
) -> Result<bool> {
    if r.store.blob_size(digest).await?.is_none() {
        return Ok(false);
    }
    if let Some(from) = from {
        if !super::blobs::visible(r, &from, digest).await? {
            return Ok(false);
        }
    }
    r.store
        .commit(vec![Event::Link {
            repo: name.clone(),
            digest: digest.clone(),
        }])
        .await?;
    Ok(true)
}

/// POST /v2/<name>/blobs/uploads/
pub(super) async fn start(
    r: &Registry,
    name: &RepoName,
    q: &[(String, String)],
    headers: &HeaderMap,
    body: Body,
) -> Result<Response> {
    if let Some(m) = param(q, "mount") {
        let digest = parse_digest(m)?;
        let from = match param(q, "from") {
            Some(f) => Some(
                f.parse::<RepoName>()
                    .map_err(|_| RegistryError::NameInvalid)?,
            ),
            None => None,
        };
        if mount(r, name, &digest, from).await? {
            return created(name, &digest);
        }
        // Not mountable: fall back to a new session, as the spec asks.
    } else if let Some(d) = param(q, "digest") {
        let digest = parse_digest(d)?;
        // The body's length, if given, is the blob's size: it is then indexed as it arrives.
        let size = headers
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let mut writer = r.store.blob_writer(digest.algorithm(), size).await?;
        let mut stream = body.into_data_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                RegistryError::BlobUploadInvalid(format!("request body failed: {e}"))
            })?;
            writer.write(&chunk).await?;
        }
        writer.finish(&digest).await?;
        r.store
            .commit(vec![Event::Link {
                repo: name.clone(),
                digest: digest.clone(),
            }])
            .await?;
        r.announce(&digest).await;
        return created(name, &digest);
    }
    let id = r.store.create_upload(name).await?;
    empty(StatusCode::ACCEPTED, &session_headers(name, &id, 0))
}

/// Parses `Content-Range: <start>-<end>` (also accepting a `bytes ` or `bytes=` prefix).
fn content_range(headers: &HeaderMap) -> Result<Option<(u64, u64)>> {
    let Some(v) = headers.get("content-range") else {
        return Ok(None);
    };
    let bad = || RegistryError::BlobUploadInvalid("malformed Content-Range".into());
    let s = v.to_str().map_err(|_| bad())?.trim();
    let s = s
        .strip_prefix("bytes")
        .map(|s| s.trim_start_matches([' ', '=']))
        .unwrap_or(s);
    let s = s.split('/').next().unwrap_or(s);
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let (start, end) = (
        a.trim().parse::<u64>().map_err(|_| bad())?,
        b.trim().parse::<u64>().map_err(|_| bad())?,
    );
    if end < start {
        return Err(RegistryError::RangeNotSatisfiable {
            header: ("range", format!("{start}-{end}")),
        });
    }
    Ok(Some((start, end - start + 1)))
}

/// PATCH /v2/<name>/blobs/uploads/<id>
pub(super) async fn patch(
    r: &Registry,
    name: &RepoName,
    id: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response> {
    let range = content_range(headers)?;
    let session = r.store.upload(name, id).await?;
    let mut upload = session.lock().await;
    let offset = upload
        .append(
            body.into_data_stream(),
            range.map(|(s, _)| s),
            range.map(|(_, l)| l),
        )
        .await?;
    empty(StatusCode::ACCEPTED, &session_headers(name, id, offset))
}

/// PUT /v2/<name>/blobs/uploads/<id>?digest=<digest>
pub(super) async fn put(
    r: &Registry,
    name: &RepoName,
    id: &str,
    q: &[(String, String)],
    headers: &HeaderMap,
    body: Body,
) -> Result<Response> {
    let digest =
        parse_digest(param(q, "digest").ok_or_else(|| {
            RegistryError::DigestInvalid("the digest parameter is required".into())
        })?)?;
    let range = content_range(headers)?;
    r.store
        .finish_upload(name, id, &digest, body.into_data_stream(), range)
        .await?;
    r.announce(&digest).await;
    created(name, &digest)
}

/// GET /v2/<name>/blobs/uploads/<id>
pub(super) async fn status(r: &Registry, name: &RepoName, id: &str) -> Result<Response> {
    let session = r.store.upload(name, id).await?;
    let offset = session.lock().await.offset();
    empty(StatusCode::NO_CONTENT, &session_headers(name, id, offset))
}

/// DELETE /v2/<name>/blobs/uploads/<id>
pub(super) async fn cancel(r: &Registry, name: &RepoName, id: &str) -> Result<Response> {
    r.store.cancel_upload(name, id).await?;
    empty(StatusCode::NO_CONTENT, &[])
}
