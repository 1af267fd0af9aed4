//! A client for one upstream OCI/Docker registry (Docker Hub, GHCR, a company's Harbor), the
//! source a node pulls through when the fleet cannot serve an image.
//!
//! [`Upstream`] is a cheap-to-clone handle, one per `[[upstream]]` table. It fetches manifests
//! (bounded to [`MAX_MANIFEST_BYTES`], verified against the digest asked for and the digest the
//! registry announces) and streams blobs (never buffered whole: the caller hashes and writes the
//! chunks as they arrive, and must check the blob's digest itself).
//!
//! Auth follows the distribution spec: every request is sent anonymously first (or with the
//! bearer token of a `token_file`, or with a token cached for the repository); a `401` with a
//! `Bearer` challenge makes it fetch a token for `repository:<repo>:pull` from the challenge's
//! realm, with Basic credentials if configured, cache it until it expires and retry once; a
//! `Basic` challenge makes it send the credentials, and from then on with every request.
//! Credentials go only to the upstream's host and to a token realm at least as private
//! (`https` when the upstream is); redirects to another host (blob storage) lose the
//! `Authorization` header. No error, log line or `Debug` output holds a credential.
//!
//! Failures say whether they are an outage ([`UpstreamError::is_outage`]): an unreachable,
//! rate-limiting or failing upstream, for which the node serves what the fleet already resolved.
//! An upstream that does not answer within `timeout_ms` (connecting, or waiting for response
//! headers) is unreachable; a body that stalls for [`BODY_STALL_TIMEOUT`] fails the read.

mod auth;
mod config;
mod credentials;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt as _;
use futures::stream::BoxStream;
use reqwest::StatusCode;
use reqwest::header::{
    ACCEPT, CONTENT_LENGTH, CONTENT_TYPE, HeaderMap, RETRY_AFTER, WWW_AUTHENTICATE,
};
use serde::Deserialize;
use shoal_protocol::{Digest, NameError, Reference, RepoName};

use auth::{Challenge, TokenCache};
pub use config::{
    ConfigError, DEFAULT_FRESHNESS_SECS, DEFAULT_TIMEOUT_MS, MAX_TIMEOUT_MS, Secret, UpstreamConfig,
};
use credentials::Login;
pub use credentials::{CredentialError, HELPER_TIMEOUT};

/// The largest manifest accepted from an upstream: the registry's own limit.
pub use crate::manifest::MAX_MANIFEST_BYTES;
/// A body read that receives nothing for this long fails.
pub const BODY_STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Redirects followed for one request (a blob is usually redirected once, to storage).
pub const MAX_REDIRECTS: usize = 5;
pub use crate::manifest::{DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST};
/// The manifest media types asked for and accepted, most wanted first (the registry stores
/// the same four).
pub const MANIFEST_MEDIA_TYPES: [&str; 4] = [
    OCI_INDEX,
    OCI_MANIFEST,
    DOCKER_MANIFEST_LIST,
    DOCKER_MANIFEST,
];

/// The largest error body read to find a registry error code in it.
const MAX_ERROR_BODY_BYTES: usize = 16 * 1024;
/// The largest token service answer read.
const MAX_TOKEN_BODY_BYTES: usize = 64 * 1024;
/// How long credentials from a docker config (or its helper) are used before it is read again.
const DOCKER_LOGIN_REUSE: Duration = Duration::from_secs(300);
/// The longest `Retry-After` passed on.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// A manifest fetched from an upstream, its digest checked.
#[derive(Clone, PartialEq, Eq)]
pub struct UpstreamManifest {
    /// The digest of `bytes`: of the algorithm of the digest asked for, else sha256.
    pub digest: Digest,
    /// One of [`MANIFEST_MEDIA_TYPES`].
    pub media_type: String,
    /// The manifest exactly as the upstream sent it.
    pub bytes: Vec<u8>,
}

impl std::fmt::Debug for UpstreamManifest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamManifest")
            .field("digest", &self.digest)
            .field("media_type", &self.media_type)
            .field("len", &self.bytes.len())
            .finish()
    }
}

/// A blob being received from an upstream. Nothing is verified yet: the caller hashes the
/// chunks as they arrive and drops the result if the digest differs.
pub struct UpstreamBlob {
    /// The length the upstream announced, if it did (a claim, not a fact).
    pub content_length: Option<u64>,
    /// The blob's bytes in arrival order. An error ends it; dropping it closes the connection.
    pub stream: BoxStream<'static, Result<Bytes, UpstreamError>>,
}

impl std::fmt::Debug for UpstreamBlob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBlob")
            .field("content_length", &self.content_length)
            .finish_non_exhaustive()
    }
}

/// Why talking to an upstream failed. No variant holds a credential.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The `[[upstream]]` table cannot be used.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The docker config or its credential helper gave no usable credentials.
    #[error("upstream credentials are unavailable")]
    Credentials(#[from] CredentialError),
    /// The repository name or reference asked for is not valid.
    #[error("not a valid repository name or reference")]
    Name(#[from] NameError),
    /// Connecting failed, DNS failed, or no response (or body data) came in time.
    #[error("upstream is unreachable")]
    Unreachable(#[source] TransportError),
    /// `429 Too Many Requests`.
    #[error("upstream is rate limiting (retry after {retry_after:?})")]
    RateLimited {
        /// What `Retry-After` said, in seconds form.
        retry_after: Option<Duration>,
    },
    /// `404`, or a `MANIFEST_UNKNOWN`, `BLOB_UNKNOWN` or `NAME_UNKNOWN` error.
    #[error("upstream does not have it")]
    NotFound,
    /// `401` or `403` with whatever credentials this node has (or none).
    #[error("upstream refused access (HTTP {status})")]
    Unauthorized {
        /// 401 or 403.
        status: u16,
    },
    /// Any other unsuccessful status.
    #[error("upstream answered HTTP {0}")]
    Status(u16),
    /// A manifest or an answer larger than its limit.
    #[error("upstream sent more than {limit_bytes} bytes")]
    TooLarge {
        /// The limit.
        limit_bytes: usize,
    },
    /// The content does not hash to the digest asked for or announced.
    #[error("upstream content has digest {actual}, expected {expected}")]
    DigestMismatch {
        /// The digest asked for or announced.
        expected: Digest,
        /// The digest of what came.
        actual: Digest,
    },
    /// A header or body that is not what the protocol says.
    #[error("upstream sent an invalid {what}")]
    Invalid {
        /// What was invalid.
        what: &'static str,
        /// The parser's complaint, where it cannot quote a secret.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

impl UpstreamError {
    /// Whether the upstream is down or refusing service for now (unreachable, rate limiting,
    /// a 5xx), rather than answering: the node should then serve what the fleet already
    /// resolved.
    pub fn is_outage(&self) -> bool {
        match self {
            UpstreamError::Unreachable(_) | UpstreamError::RateLimited { .. } => true,
            UpstreamError::Status(status) => *status >= 500,
            UpstreamError::Config(_)
            | UpstreamError::Credentials(_)
            | UpstreamError::Name(_)
            | UpstreamError::NotFound
            | UpstreamError::Unauthorized { .. }
            | UpstreamError::TooLarge { .. }
            | UpstreamError::DigestMismatch { .. }
            | UpstreamError::Invalid { .. } => false,
        }
    }

    fn invalid(what: &'static str) -> Self {
        UpstreamError::Invalid { what, source: None }
    }
}

/// How the connection to an upstream failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Connecting, TLS, DNS or sending failed.
    #[error("request failed")]
    Request(#[source] reqwest::Error),
    /// No response headers within the upstream's `timeout_ms`.
    #[error("no response within {0:?}")]
    Timeout(Duration),
    /// Reading the body failed or stalled.
    #[error("reading the response body failed")]
    Body(#[source] reqwest::Error),
}

/// A handle on one upstream registry. Cheap to clone; clones share the connection pool and the
/// token cache.
#[derive(Clone)]
pub struct Upstream {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    url: url::Url,
    /// `url` without a trailing slash, to which `/v2/…` is appended.
    base: String,
    client: reqwest::Client,
    credentials: Credentials,
    freshness: Duration,
    timeout: Duration,
    state: Mutex<AuthState>,
    /// One token fetch at a time, so that many pulls of one repository fetch one token.
    token_fetch: tokio::sync::Mutex<()>,
}

enum Credentials {
    Anonymous,
    Login(Login),
    /// A username with a `password_file`'s password.
    PasswordFile {
        username: String,
        file: SecretFile,
    },
    /// A `token_file`'s token, sent with every request.
    Bearer(SecretFile),
    DockerConfig(PathBuf),
}

/// A secret kept in a file: read when the upstream is set up (a missing or empty file is a
/// configuration error), and again whenever the file looks changed (its modification time,
/// size or inode), and at least every [`SECRET_FILE_REREAD`] (a rewrite that kept all three),
/// so that a rotated password or token counts without a restart. A changed file that cannot
/// be read (mid-rotation, say) leaves the last secret in use.
struct SecretFile {
    upstream: String,
    path: PathBuf,
    /// The secret, what the file looked like when it was read, and when.
    read: Mutex<(Option<FileStamp>, Secret, Instant)>,
}

/// The longest a secret file's content is used without reading it again.
const SECRET_FILE_REREAD: Duration = Duration::from_secs(60);

/// What a file looks like from its metadata: modification time, size and inode.
type FileStamp = (Option<std::time::SystemTime>, u64, u64);

fn stamp(meta: &std::fs::Metadata) -> FileStamp {
    use std::os::unix::fs::MetadataExt as _;
    (meta.modified().ok(), meta.len(), meta.ino())
}

impl SecretFile {
    fn open(upstream: &str, path: &Path) -> Result<SecretFile, ConfigError> {
        let seen = std::fs::metadata(path).ok().map(|m| stamp(&m));
        let secret = Secret::new(read_secret_file(upstream, path)?);
        Ok(SecretFile {
            upstream: upstream.to_owned(),
            path: path.to_owned(),
            read: Mutex::new((seen, secret, Instant::now())),
        })
    }

    fn last(&self) -> std::sync::MutexGuard<'_, (Option<FileStamp>, Secret, Instant)> {
        self.read.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The secret as the file holds it now.
    async fn current(&self) -> Secret {
        let seen = tokio::fs::metadata(&self.path)
            .await
            .ok()
            .map(|m| stamp(&m));
        {
            let last = self.last();
            let unchanged = seen.is_none() || seen == last.0;
            if unchanged && last.2.elapsed() < SECRET_FILE_REREAD {
                return last.1.clone();
            }
        }
        let (upstream, path) = (self.upstream.clone(), self.path.clone());
        match tokio::task::spawn_blocking(move || read_secret_file(&upstream, &path)).await {
            Ok(Ok(secret)) => {
                let secret = Secret::new(secret);
                *self.last() = (seen, secret.clone(), Instant::now());
                secret
            }
            Ok(Err(e)) => {
                tracing::warn!(
                    upstream = %self.upstream,
                    error = &e as &dyn std::error::Error,
                    "a secret file could not be read again: the last secret stays in use"
                );
                // Tried again when the file changes, or in a minute.
                let mut last = self.last();
                last.2 = Instant::now();
                last.1.clone()
            }
            Err(_) => self.last().1.clone(),
        }
    }
}

#[derive(Default)]
struct AuthState {
    tokens: TokenCache,
    /// The upstream asked for Basic credentials: send them with every request.
    basic: bool,
    /// Credentials read from the docker config, and when.
    docker_login: Option<(Instant, Option<Login>)>,
}

/// What a request carries.
#[derive(Clone)]
enum Authorization {
    Bearer(Secret),
    Basic { username: String, password: Secret },
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.inner.name)
            .field("url", &self.inner.base)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// Checks `config`, reads its credential and CA files and builds the HTTP client. The
    /// docker config, if any, is read later, when the upstream first asks for credentials.
    pub fn new(config: UpstreamConfig) -> Result<Upstream, UpstreamError> {
        let url = config.validate()?;
        let name = config.name.clone();
        let timeout = config.timeout();
        let credentials = match (&config.username, &config.password, &config.password_file) {
            (Some(username), Some(password), _) => Credentials::Login(Login::Basic {
                username: username.clone(),
                password: password.clone(),
            }),
            (Some(username), None, Some(path)) => Credentials::PasswordFile {
                username: username.clone(),
                file: SecretFile::open(&name, path)?,
            },
            _ => match (&config.token_file, &config.docker_config) {
                (Some(path), _) => Credentials::Bearer(SecretFile::open(&name, path)?),
                (None, Some(path)) => Credentials::DockerConfig(path.clone()),
                (None, None) => Credentials::Anonymous,
            },
        };
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("shoal/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(timeout)
            .read_timeout(BODY_STALL_TIMEOUT)
            .redirect(reqwest::redirect::Policy::limited(MAX_REDIRECTS))
            .referer(false)
            .tls_danger_accept_invalid_certs(config.tls_skip_verify);
        if let Some(path) = &config.ca_file {
            let pem = read_file(&name, path)?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|source| {
                ConfigError::CaFile {
                    name: name.clone(),
                    path: path.clone(),
                    source: Some(source),
                }
            })?;
            if certs.is_empty() {
                return Err(ConfigError::CaFile {
                    name,
                    path: path.clone(),
                    source: None,
                }
                .into());
            }
            builder = builder.tls_certs_merge(certs);
        }
        let client = builder.build().map_err(|source| ConfigError::Client {
            name: name.clone(),
            source,
        })?;
        Ok(Upstream {
            inner: Arc::new(Inner {
                base: url.as_str().trim_end_matches('/').to_owned(),
                url,
                name,
                client,
                credentials,
                freshness: config.freshness(),
                timeout,
                state: Mutex::new(AuthState::default()),
                token_fetch: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// The registry host clients name it by (`docker.io`).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Where its API is.
    pub fn url(&self) -> &url::Url {
        &self.inner.url
    }

    /// How long a tag resolved from it is trusted without asking again.
    pub fn freshness(&self) -> Duration {
        self.inner.freshness
    }

    /// The bound on connecting and on waiting for response headers.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// `GET /v2/<repo>/manifests/<reference>`: the manifest a tag or digest names.
    ///
    /// `repo` is the name on the upstream as is (Docker Hub's official images are
    /// `library/<name>`). The digest is computed from the bytes; when `reference` is a digest,
    /// other bytes are [`UpstreamError::DigestMismatch`], and so is a `Docker-Content-Digest`
    /// header that disagrees with them. Cancel-safe: dropping the future drops the request.
    pub async fn manifest(
        &self,
        repo: &str,
        reference: &str,
    ) -> Result<UpstreamManifest, UpstreamError> {
        let repo: RepoName = repo.parse()?;
        let reference: Reference = reference.parse()?;
        let url = format!("{}/v2/{repo}/manifests/{reference}", self.inner.base);
        let accept = MANIFEST_MEDIA_TYPES.join(", ");
        let response = self.get(&url, &repo, Some(&accept)).await?;
        let headers = response.headers().clone();
        let bytes = read_capped(response, MAX_MANIFEST_BYTES).await?;
        let digest = match &reference {
            Reference::Digest(wanted) => {
                let actual = Digest::of(wanted.algorithm(), &bytes);
                if &actual != wanted {
                    return Err(UpstreamError::DigestMismatch {
                        expected: wanted.clone(),
                        actual,
                    });
                }
                actual
            }
            Reference::Tag(_) => Digest::sha256(&bytes),
        };
        if let Some(announced) = headers.get("docker-content-digest") {
            let announced: Digest = announced
                .to_str()
                .map_err(|e| invalid_with("Docker-Content-Digest header", e))?
                .trim()
                .parse()
                .map_err(|e| invalid_with("Docker-Content-Digest header", e))?;
            let actual = Digest::of(announced.algorithm(), &bytes);
            if actual != announced {
                return Err(UpstreamError::DigestMismatch {
                    expected: announced,
                    actual,
                });
            }
        }
        let media_type = manifest_media_type(&headers, &bytes)?;
        Ok(UpstreamManifest {
            digest,
            media_type,
            bytes,
        })
    }

    /// `GET /v2/<repo>/blobs/<digest>`, following redirects: the blob as a stream of chunks.
    ///
    /// The bytes are not verified here; the caller hashes them as they arrive, and stops at the
    /// size the manifest declares (a hostile upstream may send without end). The returned
    /// stream owns the connection: dropping it (or this future) ends the download.
    pub async fn blob(&self, repo: &str, digest: &Digest) -> Result<UpstreamBlob, UpstreamError> {
        let repo: RepoName = repo.parse()?;
        let url = format!("{}/v2/{repo}/blobs/{digest}", self.inner.base);
        let response = self.get(&url, &repo, None).await?;
        let content_length = announced_length(response.headers());
        let stream = response
            .bytes_stream()
            .map(|chunk| chunk.map_err(|e| UpstreamError::Unreachable(TransportError::Body(e))))
            .boxed();
        Ok(UpstreamBlob {
            content_length,
            stream,
        })
    }

    /// A successful response to `GET url`, doing the auth handshake for `repo` on the way.
    async fn get(
        &self,
        url: &str,
        repo: &RepoName,
        accept: Option<&str>,
    ) -> Result<reqwest::Response, UpstreamError> {
        let scope = format!("repository:{repo}:pull");
        let first = self.auth_before_challenge(&scope).await?;
        let response = self.send(self.request(url, accept, first.as_ref())).await?;
        if response.status() != StatusCode::UNAUTHORIZED {
            return check_status(response).await;
        }
        let challenge = response
            .headers()
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(auth::parse_challenge);
        let retry = match (&first, challenge) {
            // A token from a file or Basic credentials already sent were refused: nothing
            // else to try.
            (Some(Authorization::Basic { .. }), _) => None,
            (Some(Authorization::Bearer(_)), _)
                if matches!(self.inner.credentials, Credentials::Bearer(_)) =>
            {
                None
            }
            (_, Some(Challenge::Bearer { realm, service })) => {
                if first.is_some() {
                    self.lock_state().tokens.remove(&scope);
                }
                let token = self.fetch_token(&realm, service.as_deref(), &scope).await?;
                Some(Authorization::Bearer(token))
            }
            (_, Some(Challenge::Basic)) => match self.login().await? {
                Some(Login::Basic { username, password }) => {
                    self.lock_state().basic = true;
                    Some(Authorization::Basic { username, password })
                }
                Some(Login::IdentityToken(_)) | None => None,
            },
            (_, None) => None,
        };
        let Some(retry) = retry else {
            return Err(UpstreamError::Unauthorized { status: 401 });
        };
        let response = self.send(self.request(url, accept, Some(&retry))).await?;
        check_status(response).await
    }

    /// What to send before any challenge: a `token_file`'s token, a cached token for `scope`,
    /// or Basic credentials once the upstream has asked for them.
    async fn auth_before_challenge(
        &self,
        scope: &str,
    ) -> Result<Option<Authorization>, UpstreamError> {
        if let Credentials::Bearer(file) = &self.inner.credentials {
            return Ok(Some(Authorization::Bearer(file.current().await)));
        }
        let (cached, basic) = {
            let state = self.lock_state();
            (state.tokens.get(scope, Instant::now()), state.basic)
        };
        if let Some(token) = cached {
            return Ok(Some(Authorization::Bearer(token)));
        }
        if !basic {
            return Ok(None);
        }
        match self.login().await? {
            Some(Login::Basic { username, password }) => {
                Ok(Some(Authorization::Basic { username, password }))
            }
            Some(Login::IdentityToken(_)) | None => Ok(None),
        }
    }

    fn request(
        &self,
        url: &str,
        accept: Option<&str>,
        authorization: Option<&Authorization>,
    ) -> reqwest::RequestBuilder {
        let mut request = self.inner.client.get(url);
        if let Some(accept) = accept {
            request = request.header(ACCEPT, accept);
        }
        match authorization {
            Some(Authorization::Bearer(token)) => request.bearer_auth(token.expose()),
            Some(Authorization::Basic { username, password }) => {
                request.basic_auth(username, Some(password.expose()))
            }
            None => request,
        }
    }

    /// Sends, bounding the wait for the response headers by the upstream's timeout.
    async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, UpstreamError> {
        match tokio::time::timeout(self.inner.timeout, request.send()).await {
            Err(_) => Err(UpstreamError::Unreachable(TransportError::Timeout(
                self.inner.timeout,
            ))),
            Ok(Err(e)) if e.is_redirect() => Err(invalid_with("redirect", e)),
            Ok(Err(e)) => Err(UpstreamError::Unreachable(TransportError::Request(e))),
            Ok(Ok(response)) => Ok(response),
        }
    }

    /// A token for `scope` from the token service at `realm`: the cached one if another
    /// request fetched it meanwhile, else a new one, cached until it expires.
    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<Secret, UpstreamError> {
        let _one_at_a_time = self.inner.token_fetch.lock().await;
        if let Some(token) = self.lock_state().tokens.get(scope, Instant::now()) {
            return Ok(token);
        }
        let realm_url =
            url::Url::parse(realm).map_err(|e| invalid_with("token realm in the challenge", e))?;
        if !auth::realm_allowed(&self.inner.url, &realm_url) {
            return Err(UpstreamError::invalid(
                "token realm in the challenge (plain http for an https upstream, or credentials in it)",
            ));
        }
        let login = self.login().await?;
        tracing::debug!(upstream = %self.inner.name, realm = realm_url.host_str().unwrap_or(""), scope, "fetching a registry token");
        let mut params = vec![("scope", scope)];
        if let Some(service) = service {
            params.push(("service", service));
        }
        let request = match &login {
            Some(Login::IdentityToken(refresh)) => {
                params.extend([
                    ("grant_type", "refresh_token"),
                    ("client_id", "shoal"),
                    ("refresh_token", refresh.expose()),
                ]);
                self.inner.client.post(realm_url).form(&params)
            }
            Some(Login::Basic { username, password }) => self
                .inner
                .client
                .get(realm_url)
                .query(&params)
                .basic_auth(username, Some(password.expose())),
            None => self.inner.client.get(realm_url).query(&params),
        };
        let response = check_status(self.send(request).await?).await?;
        let body = read_capped(response, MAX_TOKEN_BODY_BYTES).await?;
        // No parser message: it could quote the token.
        let answer: auth::TokenAnswer = serde_json::from_slice(&body)
            .map_err(|_| UpstreamError::invalid("token service answer"))?;
        let (token, lifetime) = answer
            .into_token()
            .ok_or_else(|| UpstreamError::invalid("token service answer (no token)"))?;
        self.lock_state()
            .tokens
            .insert(scope, token.clone(), lifetime, Instant::now());
        Ok(token)
    }

    /// The configured credentials, or those of the docker config (read again every few
    /// minutes).
    async fn login(&self) -> Result<Option<Login>, UpstreamError> {
        let path = match &self.inner.credentials {
            Credentials::Anonymous | Credentials::Bearer(_) => return Ok(None),
            Credentials::Login(login) => return Ok(Some(login.clone())),
            Credentials::PasswordFile { username, file } => {
                return Ok(Some(Login::Basic {
                    username: username.clone(),
                    password: file.current().await,
                }));
            }
            Credentials::DockerConfig(path) => path,
        };
        let reused = match &self.lock_state().docker_login {
            Some((at, login)) if at.elapsed() < DOCKER_LOGIN_REUSE => Some(login.clone()),
            _ => None,
        };
        if let Some(login) = reused {
            return Ok(login);
        }
        let login = credentials::from_docker_config(path, &self.inner.name).await?;
        self.lock_state().docker_login = Some((Instant::now(), login.clone()));
        Ok(login)
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, AuthState> {
        // The state is a cache: a panic in another holder leaves nothing half-done that
        // matters.
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// The response if it is a success, else the error its status (and registry error code) means.
async fn check_status(response: reqwest::Response) -> Result<reqwest::Response, UpstreamError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    match status {
        StatusCode::TOO_MANY_REQUESTS => {
            return Err(UpstreamError::RateLimited {
                retry_after: retry_after(response.headers()),
            });
        }
        StatusCode::NOT_FOUND => return Err(UpstreamError::NotFound),
        _ => {}
    }
    let code = status.as_u16();
    // The registry's error code decides between "unknown" and other failures; an unreadable
    // body just leaves the status.
    let unknown = read_capped(response, MAX_ERROR_BODY_BYTES)
        .await
        .is_ok_and(|body| names_unknown(&body));
    if unknown {
        return Err(UpstreamError::NotFound);
    }
    match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            Err(UpstreamError::Unauthorized { status: code })
        }
        _ => Err(UpstreamError::Status(code)),
    }
}

/// Whether an error body carries `MANIFEST_UNKNOWN`, `BLOB_UNKNOWN` or `NAME_UNKNOWN`.
fn names_unknown(body: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Errors {
        #[serde(default)]
        errors: Vec<ErrorEntry>,
    }
    #[derive(Deserialize)]
    struct ErrorEntry {
        #[serde(default)]
        code: String,
    }
    serde_json::from_slice::<Errors>(body).is_ok_and(|e| {
        e.errors.iter().any(|e| {
            matches!(
                e.code.as_str(),
                "MANIFEST_UNKNOWN" | "BLOB_UNKNOWN" | "NAME_UNKNOWN"
            )
        })
    })
}

/// `Retry-After` in its seconds form (the date form is rare from registries and is ignored).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let secs: u64 = headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER))
}

/// The body, refused beyond `limit` bytes whatever `Content-Length` says.
async fn read_capped(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, UpstreamError> {
    let too_large = UpstreamError::TooLarge { limit_bytes: limit };
    if announced_length(response.headers()).is_some_and(|len| len > limit as u64) {
        return Err(too_large);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| UpstreamError::Unreachable(TransportError::Body(e)))?
    {
        if body.len() + chunk.len() > limit {
            return Err(too_large);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The `Content-Length` header. (reqwest's `content_length()` asks the body, which its read
/// timeout wraps and hides.)
fn announced_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// The manifest's media type: `Content-Type` if it is a manifest type, else the body's
/// `mediaType`, else what the body's shape says (an OCI index has `manifests`).
fn manifest_media_type(headers: &HeaderMap, bytes: &[u8]) -> Result<String, UpstreamError> {
    let known = |t: &str| MANIFEST_MEDIA_TYPES.iter().find(|k| **k == t).copied();
    let header = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::trim);
    if let Some(t) = header.and_then(known) {
        return Ok(t.to_owned());
    }
    #[derive(Deserialize)]
    struct Shape {
        #[serde(default, rename = "mediaType")]
        media_type: Option<String>,
        #[serde(default, rename = "schemaVersion")]
        schema_version: Option<u64>,
        #[serde(default)]
        manifests: Option<serde_json::Value>,
        #[serde(default)]
        config: Option<serde_json::Value>,
    }
    let shape: Shape =
        serde_json::from_slice(bytes).map_err(|e| invalid_with("manifest JSON", e))?;
    match (shape.media_type.as_deref(), shape.schema_version) {
        (Some(t), _) => known(t).map(str::to_owned).ok_or_else(|| {
            UpstreamError::invalid("manifest media type (not an image manifest or index)")
        }),
        (None, Some(2)) if shape.manifests.is_some() => Ok(OCI_INDEX.to_owned()),
        (None, Some(2)) if shape.config.is_some() => Ok(OCI_MANIFEST.to_owned()),
        _ => Err(UpstreamError::invalid(
            "manifest media type (not an image manifest or index)",
        )),
    }
}

fn invalid_with(
    what: &'static str,
    source: impl std::error::Error + Send + Sync + 'static,
) -> UpstreamError {
    UpstreamError::Invalid {
        what,
        source: Some(Box::new(source)),
    }
}

/// A credential file's content, trimmed.
fn read_secret_file(name: &str, path: &Path) -> Result<String, ConfigError> {
    let bytes = read_file(name, path)?;
    let text = String::from_utf8(bytes).map_err(|_| ConfigError::FileSize {
        name: name.to_owned(),
        path: path.to_owned(),
    })?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(ConfigError::FileSize {
            name: name.to_owned(),
            path: path.to_owned(),
        });
    }
    Ok(secret.to_owned())
}

fn read_file(name: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    use std::io::Read as _;
    let file_err = |source| ConfigError::File {
        name: name.to_owned(),
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(file_err)?;
    let mut bytes = Vec::new();
    file.take(config::MAX_CREDENTIAL_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(file_err)?;
    if bytes.len() as u64 > config::MAX_CREDENTIAL_FILE_BYTES {
        return Err(ConfigError::FileSize {
            name: name.to_owned(),
            path: path.to_owned(),
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outages() {
        assert!(UpstreamError::RateLimited { retry_after: None }.is_outage());
        assert!(UpstreamError::Status(503).is_outage());
        assert!(!UpstreamError::Status(400).is_outage());
        assert!(!UpstreamError::NotFound.is_outage());
        assert!(!UpstreamError::Unauthorized { status: 401 }.is_outage());
    }

    #[test]
    fn unknown_codes() {
        assert!(names_unknown(
            br#"{"errors":[{"code":"NAME_UNKNOWN","message":"x"}]}"#
        ));
        assert!(names_unknown(
            br#"{"errors":[{"code":"DENIED"},{"code":"BLOB_UNKNOWN"}]}"#
        ));
        assert!(!names_unknown(br#"{"errors":[{"code":"DENIED"}]}"#));
        assert!(!names_unknown(b"<html>"));
    }

    #[test]
    fn media_types() {
        let mut h = HeaderMap::new();
        h.insert(
            CONTENT_TYPE,
            format!("{DOCKER_MANIFEST}; charset=utf-8").parse().unwrap(),
        );
        assert_eq!(manifest_media_type(&h, b"{}").unwrap(), DOCKER_MANIFEST);
        let h = HeaderMap::new();
        assert_eq!(
            manifest_media_type(&h, br#"{"schemaVersion":2,"manifests":[]}"#).unwrap(),
            OCI_INDEX
        );
        assert_eq!(
            manifest_media_type(&h, br#"{"schemaVersion":2,"config":{}}"#).unwrap(),
            OCI_MANIFEST
        );
        assert!(manifest_media_type(&h, br#"{"schemaVersion":1,"fsLayers":[]}"#).is_err());
        assert!(
            manifest_media_type(
                &h,
                br#"{"mediaType":"application/vnd.docker.distribution.manifest.v1+prettyjws"}"#
            )
            .is_err()
        );
    }

    #[test]
    fn retry_after_seconds() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        h.insert(
            RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h), None);
    }
}
