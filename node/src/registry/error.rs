//! The one mapping from failures to HTTP responses, in the distribution spec's error format:
//! `{"errors":[{"code":"…","message":"…","detail":…}]}`.
//!
//! Internal failures are logged with their cause and answered with a plain 500 `UNKNOWN` that
//! carries no internal text.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::path::RouteError;
use crate::fetch::FetchError;
use crate::manifest::ManifestError;
use crate::mirror::pull::MirrorError;
use crate::store::StoreError;

/// Everything a registry request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The blob is not in the repository.
    #[error("blob unknown to registry")]
    BlobUnknown,
    /// The upload cannot continue as asked.
    #[error("blob upload invalid: {0}")]
    BlobUploadInvalid(String),
    /// No such upload session.
    #[error("blob upload unknown to registry")]
    BlobUploadUnknown,
    /// A digest is malformed or does not match the content.
    #[error("invalid digest: {0}")]
    DigestInvalid(String),
    /// A manifest references a blob or manifest the repository lacks.
    #[error("blob unknown to registry: {0}")]
    ManifestBlobUnknown(String),
    /// A manifest is malformed.
    #[error("manifest invalid: {0}")]
    ManifestInvalid(String),
    /// No such manifest (or tag) in the repository.
    #[error("manifest unknown")]
    ManifestUnknown,
    /// The repository name breaks the grammar.
    #[error("invalid repository name")]
    NameInvalid,
    /// No such repository.
    #[error("repository name not known to registry")]
    NameUnknown,
    /// A size or length is wrong.
    #[error("provided length did not match content length: {0}")]
    SizeInvalid(String),
    /// The body is larger than the endpoint accepts.
    #[error("payload too large: {0}")]
    TooLarge(String),
    /// The `n` of a paginated listing is not a number.
    #[error("invalid number of results requested: {0}")]
    PaginationInvalid(String),
    /// A tag breaks the grammar.
    #[error("manifest tag did not match URI")]
    TagInvalid,
    /// A chunk does not start where the upload ends, or a range cannot be served.
    #[error("requested range not satisfiable")]
    RangeNotSatisfiable {
        /// Value for the `Range` (upload) or `Content-Range` (blob) header.
        header: (&'static str, String),
    },
    /// The operation or media type is not supported.
    #[error("the operation is unsupported: {0}")]
    Unsupported(String),
    /// The method is not allowed on this endpoint; the value lists the allowed ones.
    #[error("method not allowed")]
    MethodNotAllowed(&'static str),
    /// No endpoint at this path.
    #[error("not found")]
    NotFound,
    /// The request needs credentials, or the ones sent are wrong. The value is the
    /// `WWW-Authenticate` challenge pointing at the token endpoint.
    #[error("{message}")]
    Unauthorized {
        /// The `WWW-Authenticate` header's value.
        challenge: String,
        /// What went wrong (no secret).
        message: String,
    },
    /// The caller is known but may not do this; the text says what is missing.
    #[error("requested access to the resource is denied: {0}")]
    Denied(String),
    /// A bearer token that does not cover the request, for an action its client never asked
    /// for: `403` with a challenge saying `error="insufficient_scope"` and the scope needed
    /// (RFC 6750, section 3.1), so that the client fetches a token that covers it.
    #[error("{message}")]
    InsufficientScope {
        /// The `WWW-Authenticate` header's value.
        challenge: String,
        /// What is missing.
        message: String,
    },
    /// The client failed to log in too often; it may try again after this many seconds.
    #[error("too many failed logins from this address")]
    TooManyRequests {
        /// Seconds until it may try again.
        retry_after_secs: u64,
    },
    /// Too many upload sessions are open (the value is the limit).
    #[error("{0} upload sessions are open, the most this registry keeps; finish or cancel some")]
    TooManyUploads(usize),
    /// A tag that may not move (an immutable tag naming another manifest).
    #[error("{0}")]
    TagImmutable(String),
    /// The node cannot serve this now (it is shutting down, or its network is not running);
    /// the text says what, for the client.
    #[error("service unavailable: {0}")]
    Unavailable(&'static str),
    /// An upstream registry could not supply what only it has; the text says which and why
    /// (never a credential).
    #[error("upstream unavailable: {0}")]
    UpstreamUnavailable(String),
    /// The node's disk is full: nothing of the request was kept.
    #[error("the registry's disk is full; nothing of this request was stored")]
    InsufficientStorage(#[source] StoreError),
    /// Something inside the node failed.
    #[error("internal error")]
    Internal(#[source] StoreError),
    /// A response could not be built (a header value the node made is not valid).
    #[error("building the response")]
    Response(#[source] axum::http::Error),
}

impl RegistryError {
    fn parts(&self) -> (StatusCode, &'static str) {
        use RegistryError as E;
        match self {
            E::BlobUnknown => (StatusCode::NOT_FOUND, "BLOB_UNKNOWN"),
            E::BlobUploadInvalid(_) => (StatusCode::BAD_REQUEST, "BLOB_UPLOAD_INVALID"),
            E::BlobUploadUnknown => (StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN"),
            E::DigestInvalid(_) => (StatusCode::BAD_REQUEST, "DIGEST_INVALID"),
            E::ManifestBlobUnknown(_) => (StatusCode::BAD_REQUEST, "MANIFEST_BLOB_UNKNOWN"),
            E::ManifestInvalid(_) => (StatusCode::BAD_REQUEST, "MANIFEST_INVALID"),
            E::ManifestUnknown => (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN"),
            E::NameInvalid => (StatusCode::BAD_REQUEST, "NAME_INVALID"),
            E::NameUnknown => (StatusCode::NOT_FOUND, "NAME_UNKNOWN"),
            E::SizeInvalid(_) => (StatusCode::BAD_REQUEST, "SIZE_INVALID"),
            E::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "SIZE_INVALID"),
            E::PaginationInvalid(_) => (StatusCode::BAD_REQUEST, "PAGINATION_NUMBER_INVALID"),
            E::TagInvalid => (StatusCode::BAD_REQUEST, "TAG_INVALID"),
            E::RangeNotSatisfiable { .. } => {
                (StatusCode::RANGE_NOT_SATISFIABLE, "BLOB_UPLOAD_INVALID")
            }
            E::Unsupported(_) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "UNSUPPORTED"),
            E::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED"),
            E::NotFound => (StatusCode::NOT_FOUND, "UNSUPPORTED"),
            E::Unavailable(_) | E::UpstreamUnavailable(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE")
            }
            E::Unauthorized { .. } => (StatusCode::UNAUTHORIZED, "UNAUTHORIZED"),
            E::Denied(_) | E::InsufficientScope { .. } => (StatusCode::FORBIDDEN, "DENIED"),
            E::TooManyRequests { .. } | E::TooManyUploads(_) => {
                (StatusCode::TOO_MANY_REQUESTS, "TOOMANYREQUESTS")
            }
            E::TagImmutable(_) => (StatusCode::BAD_REQUEST, "TAG_INVALID"),
            E::InsufficientStorage(_) => (StatusCode::INSUFFICIENT_STORAGE, "UNKNOWN"),
            E::Internal(_) | E::Response(_) => (StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN"),
        }
    }
}

impl IntoResponse for RegistryError {
    fn into_response(self) -> Response {
        let (status, code) = self.parts();
        let message = match &self {
            RegistryError::InsufficientStorage(_) => {
                tracing::error!(
                    error = &self as &dyn std::error::Error,
                    "the disk is full: a registry request was refused"
                );
                self.to_string()
            }
            RegistryError::Internal(_) | RegistryError::Response(_) => {
                tracing::error!(
                    error = &self as &dyn std::error::Error,
                    "internal error while serving a registry request"
                );
                "internal server error".to_owned()
            }
            other => other.to_string(),
        };
        let body =
            serde_json::json!({ "errors": [{ "code": code, "message": message, "detail": null }] });
        let mut response = (status, axum::Json(body)).into_response();
        if let RegistryError::RangeNotSatisfiable {
            header: (name, value),
        } = &self
        {
            if let Ok(v) = HeaderValue::from_str(value) {
                response.headers_mut().insert(*name, v);
            }
        }
        if let RegistryError::MethodNotAllowed(allowed) = &self {
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allowed));
        }
        if let RegistryError::Unauthorized { challenge, .. }
        | RegistryError::InsufficientScope { challenge, .. } = &self
            && let Ok(v) = HeaderValue::from_str(challenge)
        {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        if let RegistryError::TooManyRequests { retry_after_secs } = &self {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
        }
        response
    }
}

impl From<StoreError> for RegistryError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::DigestMismatch { expected, actual } => RegistryError::DigestInvalid(
                format!("expected {expected}, content hashes to {actual}"),
            ),
            StoreError::UploadUnknown => RegistryError::BlobUploadUnknown,
            StoreError::UploadOffset { offset, .. } => RegistryError::RangeNotSatisfiable {
                header: ("range", format!("0-{}", offset.saturating_sub(1))),
            },
            StoreError::ChunkLength { declared, got } => RegistryError::SizeInvalid(format!(
                "chunk is {got} bytes, Content-Range/Length says {declared}"
            )),
            StoreError::Stream(cause) => {
                RegistryError::BlobUploadInvalid(format!("request body failed: {cause}"))
            }
            StoreError::Closed => RegistryError::Unavailable("the node is shutting down"),
            StoreError::BlobGone(d) => RegistryError::ManifestBlobUnknown(format!(
                "blob {d} was garbage-collected; push it again"
            )),
            StoreError::Busy(what) => RegistryError::Unavailable(what),
            e if e.is_disk_full() => RegistryError::InsufficientStorage(e),
            e @ (StoreError::Io(_)
            | StoreError::Index(_)
            | StoreError::Corrupt(_)
            | StoreError::Decode { .. }
            | StoreError::Encode { .. }
            | StoreError::ChunkRejected { .. }
            | StoreError::Task(_)
            | StoreError::Invariant(_)) => RegistryError::Internal(e),
        }
    }
}

impl RegistryError {
    /// The answer to a failed fetch of content that a record names: `not_found` when no peer
    /// supplied it, or what came was not valid (logged with its cause); `503` when the node is
    /// shutting down; the store's own answer (`507` for a full disk, else a logged `500`) when
    /// this node failed to keep it.
    pub fn from_fetch(e: FetchError, not_found: RegistryError) -> Self {
        match e {
            FetchError::Unavailable(_) | FetchError::Invalid(_) => {
                tracing::warn!(
                    error = &e as &dyn std::error::Error,
                    "content named by a record could not be fetched"
                );
                not_found
            }
            FetchError::Cancelled => RegistryError::Unavailable("the node is shutting down"),
            FetchError::Store(e) => e.into(),
        }
    }

    /// The answer to a pull the mirror could not serve: `not_found` when the upstream has no
    /// such content, `503` when only the upstream has it and it did not answer.
    pub fn from_mirror(e: MirrorError, not_found: RegistryError) -> Self {
        match e {
            MirrorError::Unknown => not_found,
            MirrorError::Unavailable(why) => RegistryError::UpstreamUnavailable(why),
            MirrorError::Manifest(e) => e.into(),
            MirrorError::Publish(e) => e.into(),
            MirrorError::Store(e) => e.into(),
        }
    }
}

impl RegistryError {
    /// The answer to a path that is not a route, for a request with this `method`: a manifest
    /// that is not found is a 404 whatever its reference looks like; only a `PUT` of a bad
    /// reference is a 400.
    pub fn from_route(e: RouteError, method: &axum::http::Method) -> Self {
        match e {
            RouteError::NotFound => RegistryError::NotFound,
            RouteError::NameInvalid => RegistryError::NameInvalid,
            RouteError::DigestInvalid => RegistryError::DigestInvalid("malformed digest".into()),
            RouteError::ReferenceInvalid { .. } if method != axum::http::Method::PUT => {
                RegistryError::ManifestUnknown
            }
            RouteError::ReferenceInvalid { digest: false } => RegistryError::TagInvalid,
            RouteError::ReferenceInvalid { digest: true } => {
                RegistryError::DigestInvalid("malformed digest".into())
            }
        }
    }
}

impl From<ManifestError> for RegistryError {
    fn from(e: ManifestError) -> Self {
        match e {
            ManifestError::Invalid(msg) => RegistryError::ManifestInvalid(msg),
            ManifestError::UnsupportedMediaType(t) => RegistryError::ManifestInvalid(format!(
                "manifest media type {t:?} is not supported"
            )),
        }
    }
}

impl From<crate::tags::PublishError> for RegistryError {
    fn from(e: crate::tags::PublishError) -> Self {
        use crate::tags::PublishError as P;
        match e {
            e @ P::Immutable { .. } => RegistryError::TagImmutable(e.to_string()),
            e @ P::NotAPublisher(_) => RegistryError::Denied(e.to_string()),
            P::Lost { .. } => {
                RegistryError::Unavailable("the tag was moved by a concurrent push; push again")
            }
            P::Store(e) => e.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_507_with_a_spec_body_and_other_io_errors_stay_500() {
        for full in [
            std::io::Error::from_raw_os_error(libc::ENOSPC),
            std::io::Error::from_raw_os_error(libc::EDQUOT),
            std::io::Error::from(std::io::ErrorKind::StorageFull),
        ] {
            let e = RegistryError::from(StoreError::from(full));
            assert_eq!(e.parts(), (StatusCode::INSUFFICIENT_STORAGE, "UNKNOWN"));
            assert!(e.to_string().contains("disk is full"));
        }
        let sled_full = sled::Error::Io(std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(
            RegistryError::from(StoreError::from(sled_full)).parts().0,
            StatusCode::INSUFFICIENT_STORAGE
        );
        let other = StoreError::from(std::io::Error::from_raw_os_error(libc::EIO));
        assert_eq!(
            RegistryError::from(other).parts(),
            (StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN")
        );
    }

    #[test]
    fn a_failed_fetch_is_unknown_only_when_no_peer_had_it() {
        let digest = shoal_protocol::Digest::of(shoal_protocol::Algorithm::Sha256, b"x");
        let unknown =
            RegistryError::from_fetch(FetchError::Unavailable(digest), RegistryError::BlobUnknown);
        assert_eq!(unknown.parts(), (StatusCode::NOT_FOUND, "BLOB_UNKNOWN"));
        let shutting_down =
            RegistryError::from_fetch(FetchError::Cancelled, RegistryError::BlobUnknown);
        assert_eq!(
            shutting_down.parts(),
            (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE")
        );
        let full = StoreError::from(std::io::Error::from_raw_os_error(libc::ENOSPC));
        let disk =
            RegistryError::from_fetch(FetchError::Store(full), RegistryError::ManifestUnknown);
        assert_eq!(disk.parts(), (StatusCode::INSUFFICIENT_STORAGE, "UNKNOWN"));
        let broken = StoreError::from(std::io::Error::from_raw_os_error(libc::EIO));
        let internal =
            RegistryError::from_fetch(FetchError::Store(broken), RegistryError::ManifestUnknown);
        assert_eq!(
            internal.parts(),
            (StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN")
        );
    }
}
