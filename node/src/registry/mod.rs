//! The registry HTTP API: OCI distribution spec v1.1 and the Docker Registry v2 behaviour that
//! docker relies on, on axum.
//!
//! Every `/v2/...` request goes to one dispatcher: [`path::Route`] parses the URL once, the
//! dispatcher picks the handler by route and method, and [`error::RegistryError`] is the only
//! way a failure becomes a response. Handlers stream blob bodies in both directions; only
//! manifests (at most 4 MiB) are ever held in memory whole.

mod admin;
mod blobs;
pub mod error;
mod listing;
mod manifests;
pub mod path;
mod uploads;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, Uri, header};
use axum::response::{IntoResponse, Response};

use crate::fetch::Fetcher;
use crate::net::Network;
use crate::store::Store;
use crate::tags::Tags;
use crate::trust::Trust;
use error::RegistryError;
use path::Route;
use shoal_protocol::{Digest, SigningKey};

/// The fleet a registry can reach: where misses are fetched from and records are gossiped to.
#[derive(Clone)]
pub struct Fleet {
    /// The libp2p network.
    pub network: Network,
    /// Fetches content from peers.
    pub fetcher: Fetcher,
}

/// Shared state of the HTTP handlers (cheap to clone).
#[derive(Clone)]
pub struct Registry {
    store: Store,
    tags: Tags,
    fleet: Option<Fleet>,
}

/// The result type of handlers.
type Result<T, E = RegistryError> = std::result::Result<T, E>;

impl Registry {
    /// A registry serving `store` alone, signing its tag records with a throwaway key.
    pub fn new(store: Store) -> Registry {
        let key = SigningKey::from_seed(rand::random());
        let trust = Trust::new(key.public(), Vec::new());
        let tags = Tags::new(store.clone(), key, trust);
        Registry {
            store,
            tags,
            fleet: None,
        }
    }

    /// A registry serving `store`, with tag state `tags`, reaching `fleet` if any.
    pub fn with_fleet(store: Store, tags: Tags, fleet: Option<Fleet>) -> Registry {
        Registry { store, tags, fleet }
    }

    /// Tells the fleet this node holds a blob (no-op without a fleet).
    async fn announce(&self, digest: &Digest) {
        if let Some(f) = &self.fleet {
            let _ = f.network.provide(digest.clone()).await;
        }
    }

    /// The axum router for the whole API.
    pub fn router(self) -> Router {
        Router::new()
            .route("/v2", axum::routing::any(dispatch))
            .route("/v2/", axum::routing::any(dispatch))
            .route("/v2/{*rest}", axum::routing::any(dispatch))
            .route("/_shoal/v1/peers", axum::routing::get(admin::peers))
            .route("/_shoal/v1/status", axum::routing::get(admin::status))
            .fallback(|| async { RegistryError::NotFound })
            .layer(axum::middleware::map_response(api_version_header))
            .with_state(self)
    }
}

async fn api_version_header(mut response: Response) -> Response {
    response.headers_mut().insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    response
}

/// Decodes the percent-encoded colons some clients send in digests (`sha256%3A…`). Other escapes
/// are left alone: no valid name, tag or digest contains them.
fn decode_path(path: &str) -> std::borrow::Cow<'_, str> {
    if path.contains('%') {
        std::borrow::Cow::Owned(path.replace("%3A", ":").replace("%3a", ":"))
    } else {
        std::borrow::Cow::Borrowed(path)
    }
}

/// Query parameters as (key, value) pairs, in order.
fn query(uri: &Uri) -> Vec<(String, String)> {
    axum::extract::Query::<Vec<(String, String)>>::try_from_uri(uri)
        .map(|q| q.0)
        .unwrap_or_default()
}

fn param<'a>(q: &'a [(String, String)], key: &str) -> Option<&'a str> {
    q.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

async fn dispatch(
    State(registry): State<Registry>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = match Route::parse(&decode_path(uri.path())) {
        Ok(route) => route_request(&registry, route, &method, &uri, &headers, body).await,
        Err(e) => Err(e.into()),
    };
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn route_request(
    r: &Registry,
    route: Route,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response> {
    let q = query(uri);
    match (route, method.clone()) {
        (Route::Base, Method::GET | Method::HEAD) => Ok(base()),
        (Route::Catalog, Method::GET) => listing::catalog(r, &q).await,
        (Route::Tags(name), Method::GET) => listing::tags(r, &name, &q).await,
        (Route::Referrers(name, digest), Method::GET) => {
            listing::referrers(r, &name, &digest, &q).await
        }
        (Route::Blob(name, digest), Method::GET) => {
            blobs::get(r, &name, &digest, headers, true).await
        }
        (Route::Blob(name, digest), Method::HEAD) => {
            blobs::get(r, &name, &digest, headers, false).await
        }
        (Route::Blob(name, digest), Method::DELETE) => blobs::delete(r, &name, &digest).await,
        (Route::UploadStart(name), Method::POST) => {
            uploads::start(r, &name, &q, headers, body).await
        }
        (Route::Upload(name, id), Method::PATCH) => {
            uploads::patch(r, &name, &id, headers, body).await
        }
        (Route::Upload(name, id), Method::PUT) => {
            uploads::put(r, &name, &id, &q, headers, body).await
        }
        (Route::Upload(name, id), Method::GET) => uploads::status(r, &name, &id).await,
        (Route::Upload(name, id), Method::DELETE) => uploads::cancel(r, &name, &id).await,
        (Route::Manifest(name, reference), Method::GET) => {
            manifests::get(r, &name, &reference, headers, true).await
        }
        (Route::Manifest(name, reference), Method::HEAD) => {
            manifests::get(r, &name, &reference, headers, false).await
        }
        (Route::Manifest(name, reference), Method::PUT) => {
            manifests::put(r, &name, &reference, headers, body).await
        }
        (Route::Manifest(name, reference), Method::DELETE) => {
            manifests::delete(r, &name, &reference).await
        }
        (route, _) => Err(RegistryError::MethodNotAllowed(allowed(&route))),
    }
}

/// The methods a route supports, for `Allow`.
fn allowed(route: &Route) -> &'static str {
    match route {
        Route::Base => "GET, HEAD",
        Route::Catalog | Route::Tags(_) | Route::Referrers(..) => "GET",
        Route::Blob(..) => "GET, HEAD, DELETE",
        Route::UploadStart(_) => "POST",
        Route::Upload(..) => "GET, PATCH, PUT, DELETE",
        Route::Manifest(..) => "GET, HEAD, PUT, DELETE",
    }
}

/// GET /v2/
fn base() -> Response {
    let mut response = axum::Json(serde_json::json!({})).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from_static("2"));
    response
}

/// A response builder helper: status plus headers, empty body.
fn empty(status: axum::http::StatusCode, headers: &[(&str, String)]) -> Result<Response> {
    let mut builder = Response::builder().status(status);
    for (k, v) in headers {
        builder = builder.header(*k, v.as_str());
    }
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-length"))
    {
        builder = builder.header(header::CONTENT_LENGTH, "0");
    }
    builder
        .body(Body::empty())
        .map_err(|e| RegistryError::Internal(crate::store::StoreError::Task(e.to_string())))
}
