//! The upstream registry client against a real registry (Debian's `docker-registry`, CNCF
//! Distribution 2.8, started per test on a loopback port) and against small in-test fakes for
//! what a real registry will not do on request: a token service, a redirect to blob storage,
//! rate limits, and lies (wrong bytes, wrong digest headers, oversized manifests).
//!
//! Without `docker-registry` the tests that need it print
//! `SKIP: <test>: docker-registry not found (Debian package docker-registry)` and pass, except in
//! CI (`CI=true`), where tests/scripts/install-deps.sh installs it and its absence fails.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Query, Request};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use base64::Engine as _;
use futures::StreamExt as _;
use shoal_node::mirror::upstream::{
    OCI_MANIFEST, Secret, TransportError, Upstream, UpstreamConfig, UpstreamError,
};
use shoal_protocol::{Digest, DigestHasher};

// ---------------------------------------------------------------------------------------------
// The real registry

/// A `docker-registry` child process with temp storage; killed on drop.
struct Registry {
    child: Option<Child>,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

/// The user and password of the htpasswd registry.
const USER: &str = "puller";
const PASSWORD: &str = "hunter2-registry-password";

fn in_ci() -> bool {
    matches!(
        std::env::var("CI")
            .map(|v| v.to_ascii_lowercase())
            .as_deref(),
        Ok("true" | "1")
    )
}

fn registry_binary(test: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/bin")])
        .map(|dir| dir.join("docker-registry"))
        .find(|p| p.is_file());
    if found.is_none() {
        assert!(
            !in_ci(),
            "{test}: docker-registry not found, but CI must have it (bash tests/scripts/install-deps.sh)"
        );
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "SKIP: {test}: docker-registry not found (Debian package docker-registry)"
        );
    }
    found
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Registry {
    /// Starts a registry, with htpasswd auth for [`USER`]/[`PASSWORD`] if `auth`; `None` (after
    /// the SKIP line) when the binary is missing.
    async fn start(test: &str, auth: bool) -> Option<Registry> {
        let binary = registry_binary(test)?;
        let dir = tempfile::tempdir().unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut config = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: {addr}\n",
            dir.path().join("data").display()
        );
        if auth {
            let line = format!("{USER}:{}\n", bcrypt::hash(PASSWORD, 4).unwrap());
            std::fs::write(dir.path().join("htpasswd"), line).unwrap();
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: shoal-test\n    path: {}\n",
                dir.path().join("htpasswd").display()
            ));
        }
        std::fs::write(dir.path().join("config.yml"), config).unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new(binary)
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut registry = Registry {
            child: Some(child),
            addr,
            dir,
        };
        registry.wait_ready().await;
        Some(registry)
    }

    async fn wait_ready(&mut self) {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = client.get(format!("{}/v2/", self.url())).send().await {
                if r.status() == StatusCode::OK || r.status() == StatusCode::UNAUTHORIZED {
                    return;
                }
            }
            if let Some(child) = &mut self.child {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("docker-registry exited ({status}): {}", self.log());
                }
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry not ready: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A client config for this registry (plain HTTP), without credentials.
    fn config(&self) -> UpstreamConfig {
        let mut c = UpstreamConfig::new(format!("127.0.0.1:{}", self.addr.port()), self.url());
        c.insecure = true;
        c
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An image pushed to the registry: one config, one layer, an OCI manifest.
struct Image {
    manifest: Vec<u8>,
    manifest_digest: Digest,
    layer: Vec<u8>,
    layer_digest: Digest,
}

/// Deterministic bytes that do not compress (a seeded xorshift).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Pushes with plain HTTP calls: POST an upload, PUT each blob, PUT the manifest.
async fn push_image(registry: &Registry, repo: &str, tag: &str, auth: bool) -> Image {
    let client = reqwest::Client::new();
    let base = registry.url();
    let with_auth = |r: reqwest::RequestBuilder| {
        if auth {
            r.basic_auth(USER, Some(PASSWORD))
        } else {
            r
        }
    };
    let push_blob = async |bytes: &[u8]| -> Digest {
        let digest = Digest::sha256(bytes);
        let r = with_auth(client.post(format!("{base}/v2/{repo}/blobs/uploads/")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED, "start upload");
        let location = r.headers()[header::LOCATION].to_str().unwrap().to_owned();
        let mut url = if location.starts_with("http") {
            location
        } else {
            format!("{base}{location}")
        };
        url.push(if url.contains('?') { '&' } else { '?' });
        url.push_str(&format!("digest={digest}"));
        let r = with_auth(client.put(url))
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .body(bytes.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED, "put blob");
        digest
    };
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let layer = noise(700 * 1024, 7);
    let config_digest = push_blob(config).await;
    let layer_digest = push_blob(&layer).await;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest.to_string(), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest.to_string(), "size": layer.len()}],
    }))
    .unwrap();
    let r = with_auth(client.put(format!("{base}/v2/{repo}/manifests/{tag}")))
        .header(header::CONTENT_TYPE, OCI_MANIFEST)
        .body(manifest.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED, "put manifest");
    Image {
        manifest_digest: Digest::sha256(&manifest),
        manifest,
        layer,
        layer_digest,
    }
}

/// Reads a blob stream to its end, hashing as it goes.
async fn drain(
    mut stream: futures::stream::BoxStream<'static, Result<bytes::Bytes, UpstreamError>>,
) -> (Digest, u64, usize) {
    let mut hasher = DigestHasher::new(shoal_protocol::Algorithm::Sha256);
    let (mut len, mut chunks) = (0u64, 0usize);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        hasher.update(&chunk);
        len += chunk.len() as u64;
        chunks += 1;
    }
    (hasher.finish(), len, chunks)
}

/// An error with its causes, as a log line would show it.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = format!("{e} / {e:?}");
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(&format!(" <- {s} / {s:?}"));
        source = s.source();
    }
    out
}

#[tokio::test]
async fn manifest_by_tag_and_by_digest() {
    let Some(registry) = Registry::start("manifest_by_tag_and_by_digest", false).await else {
        return;
    };
    let image = push_image(&registry, "team/app", "v1", false).await;
    let upstream = Upstream::new(registry.config()).unwrap();

    let by_tag = upstream.manifest("team/app", "v1").await.unwrap();
    assert_eq!(by_tag.digest, image.manifest_digest);
    assert_eq!(by_tag.media_type, OCI_MANIFEST);
    assert_eq!(by_tag.bytes, image.manifest);

    let by_digest = upstream
        .manifest("team/app", &image.manifest_digest.to_string())
        .await
        .unwrap();
    assert_eq!(by_digest, by_tag);
}

#[tokio::test]
async fn blob_streams_in_chunks_that_hash_to_its_digest() {
    let Some(registry) =
        Registry::start("blob_streams_in_chunks_that_hash_to_its_digest", false).await
    else {
        return;
    };
    let image = push_image(&registry, "team/app", "v1", false).await;
    let upstream = Upstream::new(registry.config()).unwrap();
    let blob = upstream
        .blob("team/app", &image.layer_digest)
        .await
        .unwrap();
    assert_eq!(blob.content_length, Some(image.layer.len() as u64));
    let (digest, len, chunks) = drain(blob.stream).await;
    assert_eq!(digest, image.layer_digest);
    assert_eq!(len, image.layer.len() as u64);
    assert!(
        chunks > 1,
        "a 700 KiB blob arrives in more than one chunk, not buffered whole"
    );
}

#[tokio::test]
async fn unknown_tags_repositories_and_digests_are_not_found() {
    let Some(registry) =
        Registry::start("unknown_tags_repositories_and_digests_are_not_found", false).await
    else {
        return;
    };
    let image = push_image(&registry, "team/app", "v1", false).await;
    let upstream = Upstream::new(registry.config()).unwrap();
    let other = Digest::sha256(b"some other manifest");
    for (repo, reference) in [
        ("team/app", "v2".to_owned()),
        ("team/nothing", "v1".to_owned()),
        ("team/app", other.to_string()),
    ] {
        let e = upstream.manifest(repo, &reference).await.unwrap_err();
        assert!(
            matches!(e, UpstreamError::NotFound),
            "{repo}:{reference}: {e:?}"
        );
        assert!(!e.is_outage());
    }
    let e = upstream.blob("team/app", &other).await.unwrap_err();
    assert!(matches!(e, UpstreamError::NotFound), "{e:?}");
    // A name the client would put into a URL path unchecked.
    let e = upstream.manifest("../../v2/x", "v1").await.unwrap_err();
    assert!(matches!(e, UpstreamError::Name(_)), "{e:?}");
    let e = upstream
        .manifest("team/app", "v1/../../x")
        .await
        .unwrap_err();
    assert!(matches!(e, UpstreamError::Name(_)), "{e:?}");
    drop(image);
}

#[tokio::test]
async fn stopped_registry_is_unreachable_within_the_timeout() {
    let Some(mut registry) =
        Registry::start("stopped_registry_is_unreachable_within_the_timeout", false).await
    else {
        return;
    };
    let image = push_image(&registry, "team/app", "v1", false).await;
    let mut config = registry.config();
    config.timeout_ms = 1_000;
    let upstream = Upstream::new(config).unwrap();
    upstream.manifest("team/app", "v1").await.unwrap();
    registry.stop();
    let started = Instant::now();
    let e = upstream.manifest("team/app", "v1").await.unwrap_err();
    assert!(matches!(e, UpstreamError::Unreachable(_)), "{e:?}");
    assert!(e.is_outage());
    let e = upstream
        .blob("team/app", &image.layer_digest)
        .await
        .unwrap_err();
    assert!(matches!(e, UpstreamError::Unreachable(_)), "{e:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

/// An upstream that accepts connections and never answers fails after `timeout_ms`, not after
/// a TCP or OS timeout.
#[tokio::test]
async fn silent_upstream_fails_after_timeout_ms() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut config = UpstreamConfig::new("silent.test", format!("http://{addr}"));
    config.insecure = true;
    config.timeout_ms = 800;
    let upstream = Upstream::new(config).unwrap();
    let started = Instant::now();
    let e = upstream.manifest("team/app", "v1").await.unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(e, UpstreamError::Unreachable(TransportError::Timeout(_))),
        "{e:?}"
    );
    assert!(e.is_outage());
    assert!(
        took >= Duration::from_millis(700) && took < Duration::from_secs(3),
        "{took:?}"
    );
    drop(listener);
}

#[tokio::test]
async fn a_rotated_password_file_counts_from_the_next_request() {
    let test = "a_rotated_password_file_counts_from_the_next_request";
    let Some(registry) = Registry::start(test, true).await else {
        return;
    };
    let image = push_image(&registry, "team/app", "v1", true).await;
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("password");
    std::fs::write(&password_file, "the-old-password\n").unwrap();
    let mut config = registry.config();
    config.username = Some(USER.into());
    config.password_file = Some(password_file.clone());
    let upstream = Upstream::new(config).unwrap();
    let e = upstream.manifest("team/app", "v1").await.unwrap_err();
    assert!(matches!(e, UpstreamError::Unauthorized { .. }), "{e:?}");

    // Rotated in place, within the same modification time (a copy that kept the old one):
    // the new size tells. No restart needed.
    let before = std::fs::metadata(&password_file)
        .unwrap()
        .modified()
        .unwrap();
    std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&password_file)
        .unwrap()
        .set_modified(before)
        .unwrap();
    assert_ne!(PASSWORD.len(), "the-old-password".len());
    let m = upstream.manifest("team/app", "v1").await.unwrap();
    assert_eq!(m.digest, image.manifest_digest);

    // A file gone mid-rotation leaves the last password in use.
    std::fs::remove_file(&password_file).unwrap();
    let m = upstream.manifest("team/app", "v1").await.unwrap();
    assert_eq!(m.digest, image.manifest_digest);
}

#[tokio::test]
async fn htpasswd_registry_answers_only_with_the_credentials() {
    let test = "htpasswd_registry_answers_only_with_the_credentials";
    let Some(registry) = Registry::start(test, true).await else {
        return;
    };
    let image = push_image(&registry, "team/app", "v1", true).await;

    let anonymous = Upstream::new(registry.config()).unwrap();
    let e = anonymous.manifest("team/app", "v1").await.unwrap_err();
    assert!(matches!(e, UpstreamError::Unauthorized { .. }), "{e:?}");
    assert!(!e.is_outage());

    let mut wrong = registry.config();
    wrong.username = Some(USER.into());
    wrong.password = Some(Secret::new("not-the-password"));
    let e = Upstream::new(wrong)
        .unwrap()
        .manifest("team/app", "v1")
        .await
        .unwrap_err();
    assert!(matches!(e, UpstreamError::Unauthorized { .. }), "{e:?}");

    let mut right = registry.config();
    right.username = Some(USER.into());
    right.password = Some(Secret::new(PASSWORD));
    let upstream = Upstream::new(right).unwrap();
    let m = upstream.manifest("team/app", "v1").await.unwrap();
    assert_eq!(m.digest, image.manifest_digest);
    let blob = upstream
        .blob("team/app", &image.layer_digest)
        .await
        .unwrap();
    assert_eq!(drain(blob.stream).await.0, image.layer_digest);

    // The same credentials from a password file and from a docker config.json.
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("password");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
    let mut from_file = registry.config();
    from_file.username = Some(USER.into());
    from_file.password_file = Some(password_file);
    let m = Upstream::new(from_file)
        .unwrap()
        .manifest("team/app", "v1")
        .await
        .unwrap();
    assert_eq!(m.digest, image.manifest_digest);

    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    let docker_config = dir.path().join("config.json");
    let name = registry.config().name;
    std::fs::write(
        &docker_config,
        format!(r#"{{"auths": {{"{name}": {{"auth": "{auth}"}}}}}}"#),
    )
    .unwrap();
    let mut from_docker = registry.config();
    from_docker.docker_config = Some(docker_config);
    let m = Upstream::new(from_docker)
        .unwrap()
        .manifest("team/app", "v1")
        .await
        .unwrap();
    assert_eq!(m.digest, image.manifest_digest);
}

// ---------------------------------------------------------------------------------------------
// In-test fakes

/// An axum server on a loopback port, stopped on drop.
struct Fake {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(make: impl FnOnce(SocketAddr) -> Router) -> Fake {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = make(addr);
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    Fake { addr, task }
}

fn fake_config(fake: &Fake) -> UpstreamConfig {
    let mut c = UpstreamConfig::new("fake.test", format!("http://{}", fake.addr));
    c.insecure = true;
    c
}

const FAKE_MANIFEST: &[u8] = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{},"layers":[]}"#;
const TOKEN_USER: &str = "bob";
const TOKEN_PASSWORD: &str = "hunter2-token-password";
const ISSUED_TOKEN: &str = "issued-token-hunter2";

#[derive(Default)]
struct TokenFlow {
    token_requests: AtomicUsize,
    manifest_requests: AtomicUsize,
    /// What the token endpoint found wrong, if anything.
    complaints: Mutex<Vec<String>>,
}

/// A registry whose manifests need a bearer token from its `/token` endpoint, which needs
/// Basic credentials and the pull scope of the repository.
async fn token_registry(flow: Arc<TokenFlow>) -> Fake {
    serve(move |addr| {
        let f1 = flow.clone();
        let f2 = flow.clone();
        Router::new()
            .route(
                "/v2/{*rest}",
                get(move |headers: HeaderMap| async move {
                    f1.manifest_requests.fetch_add(1, Ordering::SeqCst);
                    let bearer = format!("Bearer {ISSUED_TOKEN}");
                    if headers.get(header::AUTHORIZATION).is_some_and(|v| v == bearer.as_str()) {
                        (
                            [(header::CONTENT_TYPE, OCI_MANIFEST)],
                            FAKE_MANIFEST.to_vec(),
                        )
                            .into_response()
                    } else {
                        (
                            StatusCode::UNAUTHORIZED,
                            [(
                                header::WWW_AUTHENTICATE,
                                format!(r#"Bearer realm="http://{addr}/token",service="fake-registry",scope="repository:team/app:pull""#),
                            )],
                            r#"{"errors":[{"code":"UNAUTHORIZED"}]}"#,
                        )
                            .into_response()
                    }
                }),
            )
            .route(
                "/token",
                get(move |headers: HeaderMap, Query(q): Query<HashMap<String, String>>| async move {
                    f2.token_requests.fetch_add(1, Ordering::SeqCst);
                    let basic = format!(
                        "Basic {}",
                        base64::engine::general_purpose::STANDARD
                            .encode(format!("{TOKEN_USER}:{TOKEN_PASSWORD}"))
                    );
                    let mut complaints = Vec::new();
                    if headers.get(header::AUTHORIZATION).is_none_or(|v| v != basic.as_str()) {
                        complaints.push("credentials".to_owned());
                    }
                    if q.get("scope").map(String::as_str) != Some("repository:team/app:pull") {
                        complaints.push(format!("scope {:?}", q.get("scope")));
                    }
                    if q.get("service").map(String::as_str) != Some("fake-registry") {
                        complaints.push(format!("service {:?}", q.get("service")));
                    }
                    if complaints.is_empty() {
                        axum::Json(serde_json::json!({"token": ISSUED_TOKEN, "expires_in": 300}))
                            .into_response()
                    } else {
                        f2.complaints.lock().unwrap().extend(complaints);
                        StatusCode::UNAUTHORIZED.into_response()
                    }
                }),
            )
    })
    .await
}

/// 401 Bearer challenge → token from the realm with Basic credentials and the pull scope →
/// manifest with the token; the second pull reuses the cached token.
#[tokio::test]
async fn bearer_token_is_fetched_once_and_reused() {
    let flow = Arc::new(TokenFlow::default());
    let fake = token_registry(flow.clone()).await;
    let mut config = fake_config(&fake);
    config.username = Some(TOKEN_USER.into());
    config.password = Some(Secret::new(TOKEN_PASSWORD));
    let upstream = Upstream::new(config).unwrap();

    let m = upstream.manifest("team/app", "v1").await.unwrap();
    assert_eq!(m.bytes, FAKE_MANIFEST);
    assert_eq!(m.digest, Digest::sha256(FAKE_MANIFEST));
    let again = upstream.clone().manifest("team/app", "v1").await.unwrap();
    assert_eq!(again, m);

    assert!(
        flow.complaints.lock().unwrap().is_empty(),
        "{:?}",
        flow.complaints.lock().unwrap()
    );
    assert_eq!(
        flow.token_requests.load(Ordering::SeqCst),
        1,
        "one token for two pulls"
    );
    // Anonymous, with the new token, with the cached token.
    assert_eq!(flow.manifest_requests.load(Ordering::SeqCst), 3);

    // Without credentials the token service refuses: that is Unauthorized, not an outage.
    let anonymous = Upstream::new(fake_config(&fake)).unwrap();
    let e = anonymous.manifest("team/app", "v1").await.unwrap_err();
    assert!(
        matches!(e, UpstreamError::Unauthorized { status: 401 }),
        "{e:?}"
    );
}

/// A `token_file`'s token goes to the registry as a bearer token, and not to the storage host
/// a blob is redirected to.
#[tokio::test]
async fn blob_redirect_to_storage_does_not_carry_the_token() {
    let blob = noise(200 * 1024, 3);
    let digest = Digest::sha256(&blob);
    let storage_saw_authorization = Arc::new(Mutex::new(Vec::new()));
    let seen = storage_saw_authorization.clone();
    let body = blob.clone();
    let storage = serve(move |_| {
        Router::new().route(
            "/bucket/blob",
            get(move |headers: HeaderMap| async move {
                seen.lock()
                    .unwrap()
                    .push(headers.get(header::AUTHORIZATION).is_some());
                body.clone()
            }),
        )
    })
    .await;
    let storage_port = storage.addr.port();
    let registry = serve(move |_| {
        Router::new().route(
            "/v2/{*rest}",
            get(move |headers: HeaderMap| async move {
                if headers
                    .get(header::AUTHORIZATION)
                    .is_none_or(|v| v != "Bearer file-token-hunter2")
                {
                    return StatusCode::UNAUTHORIZED.into_response();
                }
                (
                    StatusCode::TEMPORARY_REDIRECT,
                    [(
                        header::LOCATION,
                        format!("http://localhost:{storage_port}/bucket/blob"),
                    )],
                )
                    .into_response()
            }),
        )
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "file-token-hunter2\n").unwrap();
    let mut config = fake_config(&registry);
    config.token_file = Some(token_file);
    let upstream = Upstream::new(config).unwrap();
    let got = upstream.blob("team/app", &digest).await.unwrap();
    assert_eq!(drain(got.stream).await.0, digest);
    assert_eq!(*storage_saw_authorization.lock().unwrap(), vec![false]);
}

/// 429 and 5xx are outages (serve what the fleet has); other statuses are answers.
#[tokio::test]
async fn rate_limits_and_server_errors_are_outages() {
    let fake = serve(|_| {
        Router::new().route(
            "/v2/{*rest}",
            get(|request: Request| async move {
                match request.uri().path().rsplit('/').next() {
                    Some("limited") => {
                        (StatusCode::TOO_MANY_REQUESTS, [(header::RETRY_AFTER, "7")]).into_response()
                    }
                    Some("broken") => StatusCode::SERVICE_UNAVAILABLE.into_response(),
                    Some("bad") => StatusCode::BAD_REQUEST.into_response(),
                    Some("denied") => StatusCode::FORBIDDEN.into_response(),
                    _ => (
                        StatusCode::BAD_REQUEST,
                        r#"{"errors":[{"code":"NAME_UNKNOWN","message":"repository name not known to registry"}]}"#,
                    )
                        .into_response(),
                }
            }),
        )
    })
    .await;
    let upstream = Upstream::new(fake_config(&fake)).unwrap();
    let e = upstream.manifest("r", "limited").await.unwrap_err();
    assert!(
        matches!(e, UpstreamError::RateLimited { retry_after: Some(d) } if d == Duration::from_secs(7)),
        "{e:?}"
    );
    assert!(e.is_outage());
    let e = upstream.manifest("r", "broken").await.unwrap_err();
    assert!(
        matches!(e, UpstreamError::Status(503)) && e.is_outage(),
        "{e:?}"
    );
    let e = upstream.manifest("r", "bad").await.unwrap_err();
    assert!(
        matches!(e, UpstreamError::Status(400)) && !e.is_outage(),
        "{e:?}"
    );
    let e = upstream.manifest("r", "denied").await.unwrap_err();
    assert!(
        matches!(e, UpstreamError::Unauthorized { status: 403 }),
        "{e:?}"
    );
    let e = upstream.manifest("r", "other").await.unwrap_err();
    assert!(matches!(e, UpstreamError::NotFound), "{e:?}");
}

/// An upstream that sends other bytes than the digest asked for, a `Docker-Content-Digest`
/// that disagrees with its bytes, or a manifest past 4 MiB (announced or not) is caught.
#[tokio::test]
async fn lying_upstream_is_caught() {
    let other = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"x":1},"layers":[]}"#;
    let fake = serve(|_| {
        Router::new().route(
            "/v2/{*rest}",
            get(|request: Request| async move {
                let last = request
                    .uri()
                    .path()
                    .rsplit('/')
                    .next()
                    .unwrap_or("")
                    .to_owned();
                let typed = [(header::CONTENT_TYPE, OCI_MANIFEST)];
                match last.as_str() {
                    "wrong-header" => (
                        typed,
                        [("docker-content-digest", Digest::sha256(b"else").to_string())],
                        FAKE_MANIFEST.to_vec(),
                    )
                        .into_response(),
                    "huge" => (typed, vec![b' '; 5 * 1024 * 1024]).into_response(),
                    "huge-unannounced" => {
                        let chunks = futures::stream::iter((0..81).map(|_| {
                            Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b' '; 64 * 1024]))
                        }));
                        (typed, axum::body::Body::from_stream(chunks)).into_response()
                    }
                    // Any digest: the same manifest, whatever was asked.
                    _ => (typed, FAKE_MANIFEST.to_vec()).into_response(),
                }
            }),
        )
    })
    .await;
    let upstream = Upstream::new(fake_config(&fake)).unwrap();
    let asked = Digest::sha256(other);
    let e = upstream
        .manifest("r", &asked.to_string())
        .await
        .unwrap_err();
    assert!(
        matches!(&e, UpstreamError::DigestMismatch { expected, actual } if *expected == asked && *actual == Digest::sha256(FAKE_MANIFEST)),
        "{e:?}"
    );
    assert!(!e.is_outage());
    let e = upstream.manifest("r", "wrong-header").await.unwrap_err();
    assert!(matches!(e, UpstreamError::DigestMismatch { .. }), "{e:?}");
    for tag in ["huge", "huge-unannounced"] {
        let e = upstream.manifest("r", tag).await.unwrap_err();
        assert!(matches!(e, UpstreamError::TooLarge { .. }), "{tag}: {e:?}");
    }
    // The honest case works against the same fake.
    let m = upstream
        .manifest("r", &Digest::sha256(FAKE_MANIFEST).to_string())
        .await
        .unwrap();
    assert_eq!(m.bytes, FAKE_MANIFEST);
}

// ---------------------------------------------------------------------------------------------
// Secrets

/// Everything the tracing subscriber writes, for checking that no secret is logged.
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn assert_no_secret(text: &str, secrets: &[&str]) {
    for secret in secrets {
        assert!(!text.contains(secret), "{secret:?} shows in: {text}");
    }
}

/// No password, token or `user:password` base64 shows in a config's or client's `Debug`, in
/// an error with its causes, or in the node's logs at TRACE, whatever fails.
#[tokio::test]
async fn credentials_never_show_in_debug_errors_or_logs() {
    let logs = LogBuffer::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _default = tracing::subscriber::set_default(subscriber);

    let wrong_password = "hunter2-wrong-password";
    let b64 = |user: &str, pass: &str| {
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    };
    let secrets = [
        wrong_password.to_owned(),
        TOKEN_PASSWORD.to_owned(),
        ISSUED_TOKEN.to_owned(),
        b64(TOKEN_USER, TOKEN_PASSWORD),
        b64(TOKEN_USER, wrong_password),
        "hunter2".to_owned(),
    ];
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();

    let flow = Arc::new(TokenFlow::default());
    let fake = token_registry(flow.clone()).await;
    let mut seen = String::new();

    // Right credentials: success, with a token fetched and used.
    let mut right = fake_config(&fake);
    right.username = Some(TOKEN_USER.into());
    right.password = Some(Secret::new(TOKEN_PASSWORD));
    seen.push_str(&format!("{right:?} {right:#?}"));
    let upstream = Upstream::new(right.clone()).unwrap();
    seen.push_str(&format!("{upstream:?}"));
    let m = upstream.manifest("team/app", "v1").await.unwrap();
    seen.push_str(&format!("{m:?}"));

    // Wrong credentials: refused at the token service.
    let mut wrong = right.clone();
    wrong.password = Some(Secret::new(wrong_password));
    let e = Upstream::new(wrong.clone())
        .unwrap()
        .manifest("team/app", "v1")
        .await
        .unwrap_err();
    assert!(matches!(e, UpstreamError::Unauthorized { .. }), "{e:?}");
    seen.push_str(&chain(&e));

    // Unreachable, with credentials configured.
    let mut gone = wrong.clone();
    gone.url = format!("http://127.0.0.1:{}", free_port());
    let e = Upstream::new(gone)
        .unwrap()
        .manifest("team/app", "v1")
        .await
        .unwrap_err();
    assert!(matches!(e, UpstreamError::Unreachable(_)), "{e:?}");
    seen.push_str(&chain(&e));

    // Config errors: a bad password file, credentials in the URL.
    let mut bad_file = right.clone();
    bad_file.password = None;
    bad_file.password_file = Some(Path::new("/nonexistent/hunter2-dir/password").to_owned());
    let e = Upstream::new(bad_file).unwrap_err();
    seen.push_str(&chain(&e).replace("/nonexistent/hunter2-dir/password", "<path>"));
    let mut in_url = right.clone();
    in_url.url = format!("http://{TOKEN_USER}:{TOKEN_PASSWORD}@{}", fake.addr);
    let e = Upstream::new(in_url).unwrap_err();
    seen.push_str(&chain(&e));

    let logged = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        logged.contains("fetching a registry token"),
        "the subscriber captured the client's logs: {logged}"
    );
    assert_no_secret(&seen, &secrets);
    assert_no_secret(&logged, &secrets);
}

// ---------------------------------------------------------------------------------------------
// TLS

/// An HTTPS fake with a self-signed certificate for `localhost`; returns it and the PEM.
async fn serve_tls(router: Router) -> (Fake, String) {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let rcgen::CertifiedKey { cert, key_pair } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pair.serialize_der())),
        )
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let router = router.clone();
            connections.spawn(async move {
                // A client that refuses the certificate ends the handshake: not an error here.
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper_util::service::TowerToHyperService::new(router);
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await;
            });
        }
    });
    (Fake { addr, task }, cert.pem())
}

/// An https upstream with a certificate no system root signed is refused, unless its CA is
/// given in `ca_file` or the operator set `tls_skip_verify`.
#[tokio::test]
async fn https_upstream_needs_a_trusted_certificate() {
    let router = Router::new().route(
        "/v2/{*rest}",
        get(|| async {
            (
                [(header::CONTENT_TYPE, OCI_MANIFEST)],
                FAKE_MANIFEST.to_vec(),
            )
        }),
    );
    let (fake, pem) = serve_tls(router).await;
    let config = UpstreamConfig::new(
        "localhost",
        format!("https://localhost:{}", fake.addr.port()),
    );

    let e = Upstream::new(config.clone())
        .unwrap()
        .manifest("team/app", "v1")
        .await
        .unwrap_err();
    assert!(matches!(e, UpstreamError::Unreachable(_)), "{e:?}");

    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, pem).unwrap();
    let mut with_ca = config.clone();
    with_ca.ca_file = Some(ca);
    let m = Upstream::new(with_ca)
        .unwrap()
        .manifest("team/app", "v1")
        .await
        .unwrap();
    assert_eq!(m.bytes, FAKE_MANIFEST);

    let mut skip = config.clone();
    skip.tls_skip_verify = true;
    let m = Upstream::new(skip)
        .unwrap()
        .manifest("team/app", "v1")
        .await
        .unwrap();
    assert_eq!(m.bytes, FAKE_MANIFEST);

    // A file without a certificate is a config error, not a silently ignored setting.
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    let mut bad = config;
    bad.ca_file = Some(not_pem);
    assert!(matches!(Upstream::new(bad), Err(UpstreamError::Config(_))));
}
