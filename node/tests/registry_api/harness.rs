//! Test harness for driving the registry router in-process: a store in a temp dir, requests sent
//! with `tower::ServiceExt::oneshot`, response helpers, digests and manifest builders, and
//! readers of the catalog, tag and referrer listings.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::BodyExt;
use sha2::Digest as _;
use shoal_node::Store;
use shoal_node::registry::Registry;
use tower::ServiceExt;

/// OCI image manifest media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index media type.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image config media type.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// OCI gzip layer media type.
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// OCI empty descriptor media type.
pub const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
/// Docker schema 2 manifest media type.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list media type.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image config media type.
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// Docker gzip layer media type.
pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// How long to wait for the previous store's sled lock to be released.
pub const REOPEN_TIMEOUT: Duration = Duration::from_secs(20);

/// `sha256:<hex>` of `bytes`.
pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// `sha512:<hex>` of `bytes`.
pub fn sha512(bytes: &[u8]) -> String {
    format!("sha512:{}", hex::encode(sha2::Sha512::digest(bytes)))
}

/// Deterministic pseudo-random bytes (xorshift), so blobs differ without an unseeded RNG.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Every regular file under `dir`, recursively (empty if `dir` does not exist).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("read_dir entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// A response read whole.
pub struct Resp {
    /// Status code.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body bytes.
    pub body: Vec<u8>,
}

impl std::fmt::Debug for Resp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resp")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field("body", &self.body_excerpt())
            .finish()
    }
}

impl Resp {
    /// The header's value as text, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .map(|v| v.to_str().expect("header is not text"))
    }

    /// The header's value, panicking with the response if it is absent.
    pub fn must_header(&self, name: &str) -> &str {
        self.header(name)
            .unwrap_or_else(|| panic!("response has no {name} header: {self:?}"))
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The body for a failure message: text, cut to a few hundred characters.
    pub fn body_excerpt(&self) -> String {
        let text = String::from_utf8_lossy(&self.body);
        match text.char_indices().nth(300) {
            Some((i, _)) => format!("{}… ({} bytes)", &text[..i], self.body.len()),
            None => text.into_owned(),
        }
    }

    /// Asserts the status.
    #[track_caller]
    pub fn expect(&self, status: StatusCode) -> &Self {
        assert_eq!(
            self.status,
            status,
            "unexpected status; headers {:?}, body {:?}",
            self.headers,
            self.body_excerpt()
        );
        self
    }

    /// Asserts the status and that the body is a spec error document whose first error has
    /// `code`. Every entry must have a `code` made of upper-case letters and underscores.
    #[track_caller]
    pub fn expect_error(&self, status: StatusCode, code: &str) -> &Self {
        self.expect(status);
        let body = self.json();
        let errors = body["errors"]
            .as_array()
            .unwrap_or_else(|| panic!("no errors array in {body}"));
        assert!(!errors.is_empty(), "empty errors array in {body}");
        for e in errors {
            let c = e["code"]
                .as_str()
                .unwrap_or_else(|| panic!("error without a code: {body}"));
            assert!(
                !c.is_empty() && c.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'),
                "bad error code {c:?}"
            );
        }
        assert_eq!(errors[0]["code"], code, "error body {body}");
        self
    }
}

/// A registry over a store in a temp dir.
pub struct Harness {
    /// The data directory.
    pub dir: tempfile::TempDir,
    store: Option<Store>,
    app: Option<Router>,
}

/// Opens the store at `dir`, retrying while the previous store's sled lock is still held.
pub async fn open_store(dir: &Path) -> Store {
    let deadline = Instant::now() + REOPEN_TIMEOUT;
    loop {
        let d = dir.to_path_buf();
        let result = tokio::task::spawn_blocking(move || Store::open(&d))
            .await
            .expect("Store::open panicked");
        match result {
            Ok(store) => return store,
            Err(e) if Instant::now() < deadline => {
                eprintln!("Store::open failed, retrying: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("Store::open kept failing for {REOPEN_TIMEOUT:?}: {e}"),
        }
    }
}

/// Runs a blocking `f` that needs the sled lock (fsck, opening the index) until it succeeds.
pub async fn retry_blocking<T: Send + 'static, E: std::fmt::Display + Send + 'static>(
    what: &str,
    f: impl Fn() -> Result<T, E> + Send + Sync + Clone + 'static,
) -> T {
    let deadline = Instant::now() + REOPEN_TIMEOUT;
    loop {
        let g = f.clone();
        match tokio::task::spawn_blocking(g).await.expect("panicked") {
            Ok(v) => return v,
            Err(e) if Instant::now() < deadline => {
                eprintln!("{what} failed, retrying: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{what} kept failing for {REOPEN_TIMEOUT:?}: {e}"),
        }
    }
}

impl Harness {
    /// A registry on a fresh, empty data directory.
    pub async fn new() -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_store(dir.path()).await;
        let app = Registry::new(store.clone()).router();
        Harness {
            dir,
            store: Some(store),
            app: Some(app),
        }
    }

    /// The store.
    pub fn store(&self) -> &Store {
        self.store.as_ref().expect("the registry is stopped")
    }

    /// The data directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Drops the router and the store (the journal thread then exits and frees the lock).
    pub fn stop(&mut self) {
        self.app = None;
        self.store = None;
    }

    /// Reopens the store on the same directory and builds a new router.
    pub async fn start(&mut self) {
        assert!(self.store.is_none(), "start() while running");
        let store = open_store(self.dir.path()).await;
        self.app = Some(Registry::new(store.clone()).router());
        self.store = Some(store);
    }

    /// Stops and starts again.
    pub async fn restart(&mut self) {
        self.stop();
        self.start().await;
    }

    /// Sends a request and reads the whole response.
    pub async fn send(&self, req: Request<Body>) -> Resp {
        let app = self.app.clone().expect("the registry is stopped");
        let response = app.oneshot(req).await.expect("router is infallible");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("response body").to_bytes();
        Resp {
            status: parts.status,
            headers: parts.headers,
            body: body.to_vec(),
        }
    }

    /// A request with headers and a body.
    pub async fn request(
        &self,
        method: Method,
        uri: &str,
        headers: &[(&str, &str)],
        body: impl Into<Body>,
    ) -> Resp {
        let mut b = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        self.send(b.body(body.into()).expect("request")).await
    }

    /// GET without headers.
    pub async fn get(&self, uri: &str) -> Resp {
        self.request(Method::GET, uri, &[], Body::empty()).await
    }

    /// GET with headers.
    pub async fn get_with(&self, uri: &str, headers: &[(&str, &str)]) -> Resp {
        self.request(Method::GET, uri, headers, Body::empty()).await
    }

    /// HEAD without headers.
    pub async fn head(&self, uri: &str) -> Resp {
        self.request(Method::HEAD, uri, &[], Body::empty()).await
    }

    /// DELETE.
    pub async fn delete(&self, uri: &str) -> Resp {
        self.request(Method::DELETE, uri, &[], Body::empty()).await
    }
}

/// A descriptor JSON value.
pub fn desc(media_type: &str, digest: &str, size: usize) -> serde_json::Value {
    serde_json::json!({ "mediaType": media_type, "digest": digest, "size": size })
}

/// Serializes a manifest in an unusual but valid layout (pretty-printed with a trailing
/// newline), so that a registry that re-serializes instead of storing the exact bytes is caught.
pub fn to_bytes(v: &serde_json::Value) -> Vec<u8> {
    let mut b = serde_json::to_vec_pretty(v).expect("json");
    b.extend_from_slice(b"\n");
    b
}

/// Percent-encodes a query value (everything but unreserved characters).
pub fn q(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The strings of a JSON array.
pub fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|s| s.as_str().expect("string").to_owned())
        .collect()
}

/// The repositories of the whole catalog, asserting 200.
pub async fn catalog(h: &Harness) -> Vec<String> {
    let r = h.get("/v2/_catalog").await;
    r.expect(StatusCode::OK);
    strings(&r.json()["repositories"])
}

/// The tags of `repo`, asserting 200 and the name the list is for.
pub async fn tags(h: &Harness, repo: &str) -> Vec<String> {
    let r = h.get(&format!("/v2/{repo}/tags/list")).await;
    r.expect(StatusCode::OK);
    assert_eq!(r.json()["name"], repo);
    strings(&r.json()["tags"])
}

/// The referrer descriptors as a map from digest to the fields the spec defines.
pub fn referrer_map(index: &serde_json::Value) -> BTreeMap<String, serde_json::Value> {
    assert_eq!(index["schemaVersion"], 2);
    assert_eq!(index["mediaType"], OCI_INDEX);
    index["manifests"]
        .as_array()
        .unwrap_or_else(|| panic!("no manifests array: {index}"))
        .iter()
        .map(|d| {
            let mut m = serde_json::Map::new();
            for k in ["mediaType", "digest", "size", "artifactType", "annotations"] {
                if let Some(v) = d.get(k) {
                    m.insert(k.to_owned(), v.clone());
                }
            }
            (
                d["digest"].as_str().expect("digest").to_owned(),
                serde_json::Value::Object(m),
            )
        })
        .collect()
}
