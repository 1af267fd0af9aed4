//! The one mapping from failures to HTTP responses, in the distribution spec's error format:
//! `{"errors":[{"code":"…","message":"…","detail":…}]}`.
//!
//! Internal failures are logged with their cause and answered with a plain 500 `UNKNOWN` that
//! carries no internal text.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::path::RouteError;
use crate::manifest::ManifestError;
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
    /// Something inside the node failed.
    #[error("internal error")]
    Internal(#[source] StoreError),
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
            E::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN"),
        }
    }
}

impl IntoResponse for RegistryError {
    fn into_response(self) -> Response {
        let (status, code) = self.parts();
        let message = match &self {
            RegistryError::Internal(e) => {
                tracing::error!(error = %e, "internal error while serving a registry request");
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
            StoreError::Stream(msg) => {
                RegistryError::BlobUploadInvalid(format!("request body failed: {msg}"))
            }
            e @ (StoreError::Io(_)
            | StoreError::Index(_)
            | StoreError::Corrupt(_)
            | StoreError::Task(_)
            | StoreError::Closed) => RegistryError::Internal(e),
        }
    }
}

impl From<RouteError> for RegistryError {
    fn from(e: RouteError) -> Self {
        match e {
            RouteError::NotFound => RegistryError::NotFound,
            RouteError::NameInvalid => RegistryError::NameInvalid,
            RouteError::TagInvalid => RegistryError::TagInvalid,
            RouteError::DigestInvalid => RegistryError::DigestInvalid("malformed digest".into()),
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
