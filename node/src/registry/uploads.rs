//! Upload endpoints under `/v2/<name>/blobs/uploads/`: start (monolithic, cross-repository
//! mount or session), chunked `PATCH`, finishing `PUT`, status `GET` and cancelling `DELETE`.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use shoal_protocol::{Digest, RepoName};

use super::error::RegistryError;
use super::{Registry, Result, empty, param};
use crate::store::StoreError;

/// How often, at most, starting a session looks for abandoned ones to remove (it always does
/// when the session limit is reached).
const SWEEP_INTERVAL_SECS: u64 = 60;

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Why an upload's request body stopped.
#[derive(Debug, thiserror::Error)]
enum BodyError {
    /// The body itself failed (the client went away, or stalled).
    #[error(transparent)]
    Body(axum::Error),
    /// The session would hold more than its limit.
    #[error("an upload session holds at most {0} bytes")]
    TooLarge(u64),
}

/// A request body that fails with [`BodyError::TooLarge`] past `left` bytes.
struct Capped<S> {
    inner: S,
    left: u64,
    cap: u64,
}

impl<S> Stream for Capped<S>
where
    S: Stream<Item = Result<Bytes, axum::Error>> + Unpin,
{
    type Item = Result<Bytes, BodyError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                let n = u64::try_from(chunk.len()).unwrap_or(u64::MAX);
                match this.left.checked_sub(n) {
                    Some(left) => {
                        this.left = left;
                        Poll::Ready(Some(Ok(chunk)))
                    }
                    None => Poll::Ready(Some(Err(BodyError::TooLarge(this.cap)))),
                }
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(BodyError::Body(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The body of a chunk for a session at `offset`, refused up front when its declared length
/// would take the session past its limit, and cut off when its bytes do.
fn capped(
    r: &Registry,
    headers: &HeaderMap,
    offset: u64,
    body: Body,
) -> Result<Capped<axum::body::BodyDataStream>> {
    let cap = r.limits.max_upload_session_bytes;
    let left = cap.saturating_sub(offset);
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > left) {
        return Err(RegistryError::TooLarge(format!(
            "an upload session holds at most {cap} bytes"
        )));
    }
    Ok(Capped {
        inner: body.into_data_stream(),
        left,
        cap,
    })
}

/// The registry's answer to a failed chunk: a session past its limit is `413`.
fn upload_error(e: StoreError) -> RegistryError {
    if let StoreError::Stream(cause) = &e
        && let Some(BodyError::TooLarge(cap)) = cause.downcast_ref::<BodyError>()
    {
        return RegistryError::TooLarge(format!("an upload session holds at most {cap} bytes"));
    }
    e.into()
}

/// The session `id` of `name`, unless it was abandoned (then it is removed, and unknown).
async fn session(
    r: &Registry,
    name: &RepoName,
    id: &str,
) -> Result<std::sync::Arc<tokio::sync::Mutex<crate::store::Upload>>> {
    Ok(r.store
        .live_upload(name, id, r.limits.upload_session_ttl)
        .await?)
}

/// Refuses a new session when the most sessions are open, once abandoned ones are removed.
async fn room_for_a_session(r: &Registry) -> Result<()> {
    let (ttl, max) = (r.limits.upload_session_ttl, r.limits.max_upload_sessions);
    let now = now_unix();
    let last = r.uploads_swept.load(Ordering::Relaxed);
    let due = now.saturating_sub(last) >= SWEEP_INTERVAL_SECS
        && r.uploads_swept
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok();
    let mut open = if due {
        r.store.expire_uploads(ttl).await?
    } else {
        r.store.read(|i| i.upload_ids()).await?.len()
    };
    if open >= max && !due {
        open = r.store.expire_uploads(ttl).await?;
    }
    if open >= max {
        return Err(RegistryError::TooManyUploads(max));
    }
    Ok(())
}

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

/// Links an existing blob from `from` (or, without `from`, from any repository the caller may
/// pull that holds it) into `name`. Returns whether it did. The caller's pull right on `from`
/// was checked with the request; never is a blob lent that the caller could not pull.
async fn mount(
    r: &Registry,
    caller: &crate::auth::Caller,
    name: &RepoName,
    digest: &Digest,
    from: Option<RepoName>,
) -> Result<bool> {
    if r.store.blob_size(digest).await?.is_none() {
        return Ok(false);
    }
    match from {
        Some(from) => {
            if !super::blobs::visible(r, &from, digest).await? {
                return Ok(false);
            }
        }
        None => {
            let d = digest.clone();
            let repos = r.store.read(move |i| i.repos_of_blob(&d)).await?;
            let pullable = repos.iter().any(|repo| {
                r.auth()
                    .allowed(caller, repo)
                    .contains(shoal_protocol::fleet::Action::Pull)
            });
            if !pullable {
                return Ok(false);
            }
        }
    }
    r.store.link(name, digest).await?;
    Ok(true)
}

/// POST /v2/<name>/blobs/uploads/
pub(super) async fn start(
    r: &Registry,
    caller: &crate::auth::Caller,
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
        if mount(r, caller, name, &digest, from).await? {
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
        r.store.link(name, &digest).await?;
        r.announce(&digest).await;
        return created(name, &digest);
    }
    room_for_a_session(r).await?;
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
    // `0-18446744073709551615` is one byte more than a u64 counts.
    let len = (end - start).checked_add(1).ok_or_else(|| {
        RegistryError::BlobUploadInvalid(format!("Content-Range {start}-{end} is too large"))
    })?;
    Ok(Some((start, len)))
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
    let session = session(r, name, id).await?;
    let mut upload = session.lock().await;
    let body = capped(r, headers, upload.offset(), body)?;
    let offset = upload
        .append(body, range.map(|(s, _)| s), range.map(|(_, l)| l))
        .await
        .map_err(upload_error)?;
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
    let offset = session(r, name, id).await?.lock().await.offset();
    let body = capped(r, headers, offset, body)?;
    r.store
        .finish_upload(name, id, &digest, body, range)
        .await
        .map_err(upload_error)?;
    r.announce(&digest).await;
    created(name, &digest)
}

/// GET /v2/<name>/blobs/uploads/<id>
pub(super) async fn status(r: &Registry, name: &RepoName, id: &str) -> Result<Response> {
    let session = session(r, name, id).await?;
    let offset = session.lock().await.offset();
    empty(StatusCode::NO_CONTENT, &session_headers(name, id, offset))
}

/// DELETE /v2/<name>/blobs/uploads/<id>
pub(super) async fn cancel(r: &Registry, name: &RepoName, id: &str) -> Result<Response> {
    session(r, name, id).await?;
    r.store.cancel_upload(name, id).await?;
    empty(StatusCode::NO_CONTENT, &[])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(v: &str) -> Result<Option<(u64, u64)>> {
        let mut h = HeaderMap::new();
        h.insert("content-range", v.parse().unwrap());
        content_range(&h)
    }

    #[test]
    fn content_range_lengths() {
        assert_eq!(range("0-9").unwrap(), Some((0, 10)));
        assert_eq!(range("bytes=5-5").unwrap(), Some((5, 1)));
        assert_eq!(range("bytes 10-19/*").unwrap(), Some((10, 10)));
        assert!(matches!(
            range("9-0"),
            Err(RegistryError::RangeNotSatisfiable { .. })
        ));
        assert!(matches!(
            range("x-1"),
            Err(RegistryError::BlobUploadInvalid(_))
        ));
        // A length one past what a u64 holds is refused, not wrapped to zero.
        assert!(matches!(
            range(&format!("0-{}", u64::MAX)),
            Err(RegistryError::BlobUploadInvalid(_))
        ));
        assert_eq!(
            range(&format!("1-{}", u64::MAX)).unwrap(),
            Some((1, u64::MAX))
        );
    }

    #[tokio::test]
    async fn capped_bodies_stop_at_their_limit() {
        let chunks = vec![
            Ok::<_, axum::Error>(Bytes::from_static(b"abcd")),
            Ok(Bytes::from_static(b"efgh")),
        ];
        let inner = futures_util::stream::iter(chunks);
        let mut fits = Capped {
            inner,
            left: 8,
            cap: 8,
        };
        assert!(fits.next().await.unwrap().is_ok());
        assert!(fits.next().await.unwrap().is_ok());
        assert!(fits.next().await.is_none());
        let chunks = vec![
            Ok::<_, axum::Error>(Bytes::from_static(b"abcd")),
            Ok(Bytes::from_static(b"efgh")),
        ];
        let inner = futures_util::stream::iter(chunks);
        let mut over = Capped {
            inner,
            left: 7,
            cap: 10,
        };
        assert!(over.next().await.unwrap().is_ok());
        assert!(matches!(
            over.next().await.unwrap(),
            Err(BodyError::TooLarge(10))
        ));
    }
}
