//! A small blocking client for the OCI distribution API, for tests.
//!
//! It speaks plain HTTP/1.1 to a registry on a loopback port and never turns an HTTP status
//! into an error: tests look at every status themselves. A transport failure (connection
//! refused or reset, timeout) is an `Err`. Every call has a timeout.

use std::io::Read;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use sha2::{Digest as _, Sha256};
use ureq::SendBody;

/// Upper bound on any one request, connect to last byte.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Responses larger than this are refused (the tests' blobs are far smaller).
const MAX_RESPONSE_BYTES: u64 = 1 << 30;

/// Media type of an OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of an OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Media type of an OCI image config.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Media type of a gzipped OCI layer.
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Media type of a Docker schema 2 manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Media type of a Docker manifest list.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// An `Accept` header listing every manifest type a client like docker sends.
pub const ACCEPT_ANY_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json, \
     application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.docker.distribution.manifest.list.v2+json";

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// A request body.
pub enum Body<'a> {
    /// No body at all (GET, HEAD, DELETE).
    None,
    /// A body held in memory; sent with its `Content-Length`.
    Bytes(&'a [u8]),
    /// A streamed body of a known length; sent with that `Content-Length`.
    Reader {
        /// Exact number of bytes `reader` yields.
        len: u64,
        /// Where the bytes come from.
        reader: Box<dyn Read + Send + 'a>,
    },
}

/// A whole response: status, headers and body.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// HTTP status code.
    pub status: u16,
    /// Header names (lower case) and values, in the order received.
    pub headers: Vec<(String, String)>,
    /// The body, read to the end.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Status, headers and the start of the body, for failure messages.
    pub fn describe(&self) -> String {
        let body = String::from_utf8_lossy(&self.body[..self.body.len().min(2000)]).into_owned();
        let headers: Vec<String> = self
            .headers
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        format!("HTTP {}\n{}\n\n{}", self.status, headers.join("\n"), body)
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("response is not JSON:\n{}", self.describe()))
    }
}

/// The registry answered, but not with the status a helper expected.
///
/// Helpers fail with this (inside `anyhow` context) so callers can tell an answer from a
/// transport failure: `err.downcast_ref::<UnexpectedStatus>()`.
#[derive(Debug)]
pub struct UnexpectedStatus {
    /// What was being done.
    pub action: String,
    /// The full response.
    pub response: HttpResponse,
}

impl std::fmt::Display for UnexpectedStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:\n{}", self.action, self.response.describe())
    }
}

impl std::error::Error for UnexpectedStatus {}

fn unexpected(action: String, response: HttpResponse) -> anyhow::Error {
    anyhow::Error::new(UnexpectedStatus { action, response })
}

/// A blocking client for one registry base URL (`http://127.0.0.1:PORT`).
#[derive(Clone)]
pub struct RegistryClient {
    base: String,
    agent: ureq::Agent,
}

impl RegistryClient {
    /// A client for the registry at `addr` (plain HTTP).
    pub fn new(addr: SocketAddr) -> Self {
        Self::with_timeout(addr, REQUEST_TIMEOUT)
    }

    /// A client whose every request gives up after `timeout`.
    pub fn with_timeout(addr: SocketAddr, timeout: Duration) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(timeout))
            .timeout_connect(Some(Duration::from_secs(5)))
            .build()
            .new_agent();
        Self {
            base: format!("http://{addr}"),
            agent,
        }
    }

    /// `http://host:port`, no trailing slash.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// Turns a path (`/v2/...`) or a `Location` header value into an absolute URL.
    pub fn url(&self, path_or_url: &str) -> String {
        if path_or_url.starts_with("http://") || path_or_url.starts_with("https://") {
            path_or_url.to_owned()
        } else if path_or_url.starts_with('/') {
            format!("{}{}", self.base, path_or_url)
        } else {
            format!("{}/{}", self.base, path_or_url)
        }
    }

    /// Sends one request and reads the whole response.
    pub fn request(
        &self,
        method: &str,
        path_or_url: &str,
        headers: &[(&str, &str)],
        body: Body<'_>,
    ) -> Result<HttpResponse> {
        let url = self.url(path_or_url);
        let mut builder = ureq::http::Request::builder().method(method).uri(&url);
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        let result = match body {
            Body::None => self.agent.run(builder.body(SendBody::none())?),
            Body::Bytes(bytes) => {
                let len = bytes.len().to_string();
                self.agent
                    .run(builder.header("content-length", len).body(bytes)?)
            }
            Body::Reader { len, mut reader } => self.agent.run(
                builder
                    .header("content-length", len.to_string())
                    .body(SendBody::from_reader(&mut *reader))?,
            ),
        };
        let mut response = result.with_context(|| format!("{method} {url}"))?;
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_ascii_lowercase(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let body = if method == "HEAD" {
            Vec::new()
        } else {
            response
                .body_mut()
                .with_config()
                .limit(MAX_RESPONSE_BYTES)
                .read_to_vec()
                .with_context(|| format!("{method} {url}: reading body"))?
        };
        Ok(HttpResponse {
            status,
            headers,
            body,
        })
    }

    /// `GET path` with optional extra headers.
    pub fn get(&self, path: &str, headers: &[(&str, &str)]) -> Result<HttpResponse> {
        self.request("GET", path, headers, Body::None)
    }

    /// `HEAD path` with optional extra headers.
    pub fn head(&self, path: &str, headers: &[(&str, &str)]) -> Result<HttpResponse> {
        self.request("HEAD", path, headers, Body::None)
    }

    /// `GET /v2/<repo>/blobs/<digest>`.
    pub fn get_blob(&self, repo: &str, digest: &str) -> Result<HttpResponse> {
        self.get(&format!("/v2/{repo}/blobs/{digest}"), &[])
    }

    /// `GET /v2/<repo>/manifests/<reference>` accepting every manifest type.
    pub fn get_manifest(&self, repo: &str, reference: &str) -> Result<HttpResponse> {
        self.get(
            &format!("/v2/{repo}/manifests/{reference}"),
            &[("accept", ACCEPT_ANY_MANIFEST)],
        )
    }

    /// Monolithic upload in one request: `POST /v2/<repo>/blobs/uploads/?digest=<digest>`.
    pub fn post_blob(&self, repo: &str, digest: &str, body: Body<'_>) -> Result<HttpResponse> {
        self.request(
            "POST",
            &format!("/v2/{repo}/blobs/uploads/?digest={digest}"),
            &[("content-type", "application/octet-stream")],
            body,
        )
    }

    /// Pushes `data` with a monolithic POST; fails unless the registry answers 201.
    pub fn push_blob(&self, repo: &str, data: &[u8]) -> Result<String> {
        let digest = sha256_digest(data);
        let resp = self.post_blob(repo, &digest, Body::Bytes(data))?;
        if resp.status != 201 {
            return Err(unexpected(
                format!("monolithic upload of {digest} to {repo}"),
                resp,
            ));
        }
        Ok(digest)
    }

    /// Opens an upload session: `POST /v2/<repo>/blobs/uploads/`; returns the `Location`.
    pub fn start_upload(&self, repo: &str) -> Result<String> {
        let resp = self.request(
            "POST",
            &format!("/v2/{repo}/blobs/uploads/"),
            &[],
            Body::Bytes(&[]),
        )?;
        if resp.status != 202 {
            return Err(unexpected(format!("starting upload to {repo}"), resp));
        }
        resp.header("location")
            .map(str::to_owned)
            .with_context(|| format!("upload session without Location:\n{}", resp.describe()))
    }

    /// Sends one chunk of an upload session with `PATCH`; returns the next `Location`.
    ///
    /// `offset` is where the chunk starts in the blob; it goes in `Content-Range`.
    pub fn patch_chunk(&self, location: &str, offset: u64, chunk: Body<'_>) -> Result<String> {
        let len = match &chunk {
            Body::None => 0,
            Body::Bytes(b) => b.len() as u64,
            Body::Reader { len, .. } => *len,
        };
        let range = format!("{}-{}", offset, (offset + len).saturating_sub(1));
        let resp = self.request(
            "PATCH",
            location,
            &[
                ("content-type", "application/octet-stream"),
                ("content-range", &range),
            ],
            chunk,
        )?;
        if resp.status != 202 {
            return Err(unexpected(format!("PATCH {location} ({range})"), resp));
        }
        resp.header("location")
            .map(str::to_owned)
            .with_context(|| format!("PATCH response without Location:\n{}", resp.describe()))
    }

    /// Closes an upload session: `PUT <location>&digest=<digest>` with an empty body.
    pub fn finish_upload(&self, location: &str, digest: &str) -> Result<HttpResponse> {
        self.finish_upload_with(location, digest, Body::Bytes(&[]))
    }

    /// Closes an upload session with a last chunk (or the whole blob) as the `PUT` body.
    pub fn finish_upload_with(
        &self,
        location: &str,
        digest: &str,
        body: Body<'_>,
    ) -> Result<HttpResponse> {
        let sep = if location.contains('?') { '&' } else { '?' };
        self.request(
            "PUT",
            &format!("{location}{sep}digest={digest}"),
            &[("content-type", "application/octet-stream")],
            body,
        )
    }

    /// Pushes `data` in chunks of `chunk_bytes` (POST, PATCH..., PUT); fails unless 201.
    pub fn push_blob_chunked(&self, repo: &str, data: &[u8], chunk_bytes: usize) -> Result<String> {
        let digest = sha256_digest(data);
        let mut location = self.start_upload(repo)?;
        let mut offset = 0u64;
        for chunk in data.chunks(chunk_bytes.max(1)) {
            location = self.patch_chunk(&location, offset, Body::Bytes(chunk))?;
            offset += chunk.len() as u64;
        }
        let resp = self.finish_upload(&location, &digest)?;
        if resp.status != 201 {
            return Err(unexpected(
                format!("closing chunked upload of {digest}"),
                resp,
            ));
        }
        Ok(digest)
    }

    /// `PUT /v2/<repo>/manifests/<reference>` with `media_type` as `Content-Type`.
    pub fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        manifest: &[u8],
    ) -> Result<HttpResponse> {
        self.request(
            "PUT",
            &format!("/v2/{repo}/manifests/{reference}"),
            &[("content-type", media_type)],
            Body::Bytes(manifest),
        )
    }
}
