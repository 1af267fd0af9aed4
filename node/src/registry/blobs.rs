//! Blob endpoints: `GET`, `HEAD` and `DELETE /v2/<name>/blobs/<digest>`.

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use shoal_protocol::{Digest, RepoName};
use std::sync::Arc;

use crate::fetch::{Download, DownloadState};
use crate::store::partial::Partial;
use crate::store::{Buffers, Held};

use super::error::RegistryError;
use super::{Registry, Result, empty};

/// Most bytes read from a blob per piece of a response body (and per trip to the blocking pool).
const SERVE_PIECE_BYTES: usize = 1 << 20;
/// Idle buffers one response body keeps for its next pieces: a piece handed to hyper comes back
/// to its body's pool when hyper drops it, so a body of any length costs a few allocations, not
/// one zeroed buffer per piece. Hyper holds a piece until the socket took it, so two or three are
/// in use at a time.
const BODY_BUFFERS: usize = 4;

/// A single byte range, inclusive, resolved against a blob's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ByteRange {
    pub start: u64,
    pub end: u64,
}

/// Parses a `Range` header against a blob of `size` bytes.
///
/// `Ok(None)` means serve the whole blob: no header, a header this server ignores (several
/// ranges or another unit, which RFC 9110 allows a server to ignore) or a malformed one.
/// `Err(())` means the range cannot be satisfied (416).
pub(crate) fn parse_range(value: &str, size: u64) -> std::result::Result<Option<ByteRange>, ()> {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return Ok(None);
    };
    let (a, b) = (a.trim(), b.trim());
    let range = match (a.is_empty(), b.is_empty()) {
        (true, true) => return Ok(None),
        // bytes=-N: the last N bytes.
        (true, false) => {
            let Ok(n) = b.parse::<u64>() else {
                return Ok(None);
            };
            if n == 0 || size == 0 {
                return Err(());
            }
            ByteRange {
                start: size.saturating_sub(n),
                end: size - 1,
            }
        }
        (false, _) => {
            let Ok(start) = a.parse::<u64>() else {
                return Ok(None);
            };
            let end = if b.is_empty() {
                u64::MAX
            } else {
                match b.parse::<u64>() {
                    Ok(e) if e >= start => e,
                    // A last position before the first cannot be satisfied (conformance
                    // suites expect 416 here rather than the whole blob).
                    Ok(_) => return Err(()),
                    Err(_) => return Ok(None),
                }
            };
            if start >= size {
                return Err(());
            }
            ByteRange {
                start,
                end: end.min(size - 1),
            }
        }
    };
    Ok(Some(range))
}

/// Whether the repository may serve the blob: it links it, or it is one of its manifests.
pub(super) async fn visible(r: &Registry, name: &RepoName, digest: &Digest) -> Result<bool> {
    let (n, d) = (name.clone(), digest.clone());
    Ok(r.store
        .read(move |i| Ok(i.is_linked(&n, &d)? || i.manifest(&n, &d)?.is_some()))
        .await?)
}

/// Where a blob's bytes come from.
enum Source {
    /// A complete blob file.
    File(Arc<std::fs::File>, u64),
    /// A download in progress, streamed as its chunks arrive.
    Partial(Arc<Partial>, Download),
}

/// Finds the blob for `name`: on disk, or (if a trusted record of the repository names it)
/// from the fleet, as soon as the download has started.
async fn source(r: &Registry, name: &RepoName, digest: &Digest) -> Result<Source> {
    if visible(r, name, digest).await? {
        if let Some((file, size)) = r.store.open_blob(digest).await? {
            return Ok(Source::File(file, size));
        }
    }
    let Some(fleet) = &r.fleet else {
        return Err(RegistryError::BlobUnknown);
    };
    let (n, d) = (name.clone(), digest.clone());
    let Some(blob) = r.store.read(move |i| i.record_blob(&n, &d)).await? else {
        return Err(RegistryError::BlobUnknown);
    };
    let mut download = fleet.fetcher.download(name, &blob);
    match download.started().await {
        DownloadState::Streaming(p) => Ok(Source::Partial(p, download)),
        DownloadState::Done | DownloadState::Locating => match r.store.open_blob(digest).await? {
            Some((file, size)) => Ok(Source::File(file, size)),
            None => Err(RegistryError::BlobUnknown),
        },
        DownloadState::Failed(e) => Err(RegistryError::from_fetch(e, RegistryError::BlobUnknown)),
    }
}

/// Streams `[start, start + len)` of a download in progress, each chunk as soon as it is held
/// (and so verified). Ends with an error if the download fails.
fn stream_partial(
    partial: Arc<Partial>,
    download: Download,
    start: u64,
    len: u64,
) -> impl futures_util::Stream<Item = std::result::Result<bytes::Bytes, std::io::Error>> {
    let end = start + len;
    let progress = partial.progress();
    let pool = Buffers::new(BODY_BUFFERS);
    futures_util::stream::unfold(
        (partial, download, progress, start),
        move |(partial, mut download, mut progress, pos)| {
            let pool = pool.clone();
            async move {
                if pos >= end {
                    return None;
                }
                let chunk_size = u64::from(partial.index().chunk_size());
                let chunk = (pos / chunk_size) as u32;
                loop {
                    if partial.has(chunk) {
                        break;
                    }
                    if let DownloadState::Failed(e) = download.state() {
                        let err = std::io::Error::other(e);
                        return Some((Err(err), (partial, download, progress, end)));
                    }
                    tokio::select! {
                        r = progress.changed() => { if r.is_err() { return None; } }
                        alive = download.changed() => { if !alive && !partial.has(chunk) { return None; } }
                    }
                }
                let upto = ((u64::from(chunk) + 1) * chunk_size)
                    .min(end)
                    .min(pos.saturating_add(SERVE_PIECE_BYTES as u64));
                let held = Held::Partial(partial.clone());
                match read_piece(held, pos, upto - pos, &pool).await {
                    Ok(piece) => Some((Ok(piece), (partial, download, progress, upto))),
                    Err(e) => Some((Err(e), (partial, download, progress, end))),
                }
            }
        },
    )
}

/// Streams `[start, start + len)` of a complete blob file.
fn stream_file(
    file: Arc<std::fs::File>,
    start: u64,
    len: u64,
) -> impl futures_util::Stream<Item = std::result::Result<bytes::Bytes, std::io::Error>> {
    let end = start.saturating_add(len);
    let pool = Buffers::new(BODY_BUFFERS);
    futures_util::stream::unfold(start, move |pos| {
        let (file, pool) = (file.clone(), pool.clone());
        async move {
            if pos >= end {
                return None;
            }
            let upto = end.min(pos.saturating_add(SERVE_PIECE_BYTES as u64));
            match read_piece(Held::Blob(file), pos, upto - pos, &pool).await {
                Ok(piece) => Some((Ok(piece), upto)),
                Err(e) => Some((Err(e), end)),
            }
        }
    })
}

/// Reads `len` bytes of `held` at `pos` on the blocking pool, into a buffer of the body's pool.
async fn read_piece(
    held: Held,
    pos: u64,
    len: u64,
    pool: &Buffers,
) -> std::result::Result<bytes::Bytes, std::io::Error> {
    let n = usize::try_from(len).map_err(std::io::Error::other)?;
    let mut buf = pool.take();
    let read = tokio::task::spawn_blocking(move || {
        // A buffer back from an earlier piece of the same size is overwritten, not zeroed.
        buf.resize(n, 0);
        held.read_at(pos, &mut buf).map(|()| buf)
    })
    .await;
    match read {
        Ok(Ok(buf)) => Ok(bytes::Bytes::from_owner(Piece {
            buf,
            pool: pool.clone(),
        })),
        Ok(Err(e)) => {
            tracing::warn!(
                error = &e as &dyn std::error::Error,
                "reading a blob for a response body"
            );
            Err(std::io::Error::other("reading a blob"))
        }
        Err(e) => Err(std::io::Error::other(e)),
    }
}

/// One piece of a body, owned by the `Bytes` hyper sends.
struct Piece {
    buf: Vec<u8>,
    pool: Buffers,
}

impl AsRef<[u8]> for Piece {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Piece {
    fn drop(&mut self) {
        self.pool.give(std::mem::take(&mut self.buf));
    }
}

/// GET and HEAD /v2/<name>/blobs/<digest>
pub(super) async fn get(
    r: &Registry,
    name: &RepoName,
    digest: &Digest,
    headers: &HeaderMap,
    with_body: bool,
) -> Result<Response> {
    let source = source(r, name, digest).await?;
    let size = match &source {
        Source::File(_, size) => *size,
        Source::Partial(p, _) => p.index().size(),
    };
    let range = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        None => None,
        Some(v) => parse_range(v, size).map_err(|()| RegistryError::RangeNotSatisfiable {
            header: ("content-range", format!("bytes */{size}")),
        })?,
    };
    let d = digest.to_string();
    let mut builder = Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::ACCEPT_RANGES, "bytes")
        .header("docker-content-digest", d.as_str())
        .header(header::ETAG, format!("\"{d}\""))
        .header(header::CACHE_CONTROL, "max-age=31536000");
    let (start, len) = match range {
        Some(ByteRange { start, end }) => {
            builder = builder
                .status(StatusCode::PARTIAL_CONTENT)
                .header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{size}"));
            (start, end - start + 1)
        }
        None => (0, size),
    };
    builder = builder.header(header::CONTENT_LENGTH, len);
    let body = match source {
        _ if !with_body => Body::empty(),
        Source::File(file, _) => Body::from_stream(stream_file(file, start, len)),
        Source::Partial(p, download) => Body::from_stream(stream_partial(p, download, start, len)),
    };
    builder.body(body).map_err(RegistryError::Response)
}

/// DELETE /v2/<name>/blobs/<digest>
///
/// Removes the blob from the repository: after the `202`, the repository serves it no more,
/// whatever record once named it. The file stays while other repositories link it; garbage
/// collection removes unreferenced files.
pub(super) async fn delete(
    r: &Registry,
    request: &super::Request<'_>,
    name: &RepoName,
    digest: &Digest,
) -> Result<Response> {
    let (n, d) = (name.clone(), digest.clone());
    let held = r
        .store
        .read(move |i| Ok(i.is_linked(&n, &d)? || i.record_blob(&n, &d)?.is_some()))
        .await?;
    if !held {
        return Err(RegistryError::BlobUnknown);
    }
    r.store.unlink(name, digest).await?;
    r.audit.record(
        request
            .audit(crate::auth::audit::Event::Delete, "ok")
            .repository(name)
            .reference(digest),
    );
    empty(
        StatusCode::ACCEPTED,
        &[("docker-content-digest", digest.to_string())],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ranges() {
        let r = |s, z| parse_range(s, z);
        assert_eq!(
            r("bytes=0-9", 100),
            Ok(Some(ByteRange { start: 0, end: 9 }))
        );
        assert_eq!(
            r("bytes=10-", 100),
            Ok(Some(ByteRange { start: 10, end: 99 }))
        );
        assert_eq!(
            r("bytes=-10", 100),
            Ok(Some(ByteRange { start: 90, end: 99 }))
        );
        assert_eq!(
            r("bytes=-1000", 100),
            Ok(Some(ByteRange { start: 0, end: 99 }))
        );
        assert_eq!(
            r("bytes=50-1000", 100),
            Ok(Some(ByteRange { start: 50, end: 99 }))
        );
        assert_eq!(r("bytes=100-", 100), Err(()));
        assert_eq!(r("bytes=-0", 100), Err(()));
        assert_eq!(r("bytes=0-0", 0), Err(()));
        assert_eq!(r("bytes=0-1,5-6", 100), Ok(None));
        assert_eq!(r("items=0-1", 100), Ok(None));
        assert_eq!(r("bytes=9-1", 100), Err(()));
        assert_eq!(r("bytes=x-1", 100), Ok(None));
    }

    proptest! {
        #[test]
        fn any_range_is_within_the_blob(s in "(bytes=)?[0-9-]{0,25}", size in 0u64..10_000) {
            if let Ok(Some(ByteRange { start, end })) = parse_range(&s, size) {
                prop_assert!(start <= end && end < size);
            }
        }

        #[test]
        fn any_text_never_panics(s in "\\PC{0,60}", size in any::<u64>()) {
            let _ = parse_range(&s, size);
        }
    }
}
