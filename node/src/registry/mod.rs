//! The registry HTTP API: OCI distribution spec v1.1 and the Docker Registry v2 behaviour that
//! docker relies on, on axum.
//!
//! Every `/v2/...` request goes to one dispatcher: [`path::Route`] parses the URL once, the
//! dispatcher picks the handler by route and method, and [`error::RegistryError`] is the only
//! way a failure becomes a response. Handlers stream blob bodies in both directions; only
//! manifests (at most 4 MiB) are ever held in memory whole.

pub mod access;
pub mod admin;
mod blobs;
pub mod error;
mod listing;
mod manifests;
pub mod path;
pub mod server;
mod uploads;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, Uri, header};
use axum::response::{IntoResponse, Response};

use crate::auth::audit::{Audit, Entry, Event};
use crate::auth::{Auth, Caller};
use crate::fetch::Fetcher;
use crate::net::Network;
use crate::store::Store;
use crate::tags::Tags;
use error::RegistryError;
use path::Route;
use shoal_protocol::{Digest, RepoName, SigningKey};

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
    audit: Audit,
    failures: std::sync::Arc<access::Failures>,
    /// Whether clients reach this registry over HTTPS (for the token endpoint's realm).
    https: bool,
    /// The data directory, for the admin API's changes to fleet, trust and users files.
    data_dir: Option<std::path::PathBuf>,
    /// Limits on clients (the upload session ones are enforced by the handlers).
    limits: std::sync::Arc<crate::config::HttpLimits>,
    /// When abandoned upload sessions were last looked for, in seconds since the Unix epoch.
    uploads_swept: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// The node's disk quota and pin rules, for the admin API.
    quota: Option<crate::quota::Quota>,
    /// How the admin API's collections treat abandoned downloads (the config's `[gc]` table).
    gc: std::sync::Arc<crate::config::GcSchedule>,
    /// The upstream registries this node mirrors, if any.
    mirror: Option<crate::mirror::pull::Mirror>,
}

/// The result type of handlers.
type Result<T, E = RegistryError> = std::result::Result<T, E>;

impl Registry {
    /// A registry serving `store` alone, open to local clients, signing its tag records with a
    /// throwaway key.
    pub fn new(store: Store) -> Registry {
        let key = SigningKey::from_seed(rand::random());
        let tags = Tags::new(store.clone(), key.clone(), Auth::open(key));
        Registry::with_fleet(store, tags, None)
    }

    /// A registry serving `store`, with tag state `tags` (and its access rules), reaching
    /// `fleet` if any.
    pub fn with_fleet(store: Store, tags: Tags, fleet: Option<Fleet>) -> Registry {
        Registry {
            store,
            tags,
            fleet,
            audit: Audit::default(),
            failures: std::sync::Arc::default(),
            https: false,
            data_dir: None,
            limits: std::sync::Arc::default(),
            uploads_swept: std::sync::Arc::default(),
            quota: None,
            gc: std::sync::Arc::default(),
            mirror: None,
        }
    }

    /// Collects garbage, when the admin API asks, as `schedule` says.
    pub fn with_gc(mut self, schedule: crate::config::GcSchedule) -> Registry {
        self.gc = std::sync::Arc::new(schedule);
        self
    }

    /// Answers the admin API's quota questions from `quota`.
    pub fn with_quota(mut self, quota: crate::quota::Quota) -> Registry {
        self.quota = Some(quota);
        self
    }

    /// Holds clients to `limits`.
    pub fn with_limits(mut self, limits: crate::config::HttpLimits) -> Registry {
        self.limits = std::sync::Arc::new(limits);
        self
    }

    /// Pulls what the fleet lacks of upstream registries' repositories through `mirror`.
    pub fn with_mirror(mut self, mirror: crate::mirror::pull::Mirror) -> Registry {
        self.mirror = Some(mirror);
        self
    }

    /// Writes an audit trail.
    pub fn with_audit(mut self, audit: Audit) -> Registry {
        self.audit = audit;
        self
    }

    /// Lets the admin API change the node's files in `data_dir`.
    pub fn with_data_dir(mut self, data_dir: std::path::PathBuf) -> Registry {
        self.data_dir = Some(data_dir);
        self
    }

    /// Says clients reach the registry over HTTPS.
    pub fn with_https(mut self, https: bool) -> Registry {
        self.https = https;
        self
    }

    /// The access rules the registry enforces.
    pub fn auth(&self) -> &Auth {
        self.tags.auth()
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
            .route("/token", axum::routing::get(access::token))
            .route("/_shoal/v1/peers", axum::routing::get(admin::peers))
            .route("/_shoal/v1/status", axum::routing::get(admin::status))
            .route("/_shoal/v1/fleet", axum::routing::get(admin::fleet_status))
            .route(
                "/_shoal/v1/fleet/init",
                axum::routing::post(admin::fleet_init),
            )
            .route(
                "/_shoal/v1/fleet/join",
                axum::routing::post(admin::fleet_join),
            )
            .route(
                "/_shoal/v1/fleet/ticket",
                axum::routing::post(admin::fleet_ticket),
            )
            .route(
                "/_shoal/v1/fleet/policy",
                axum::routing::post(admin::fleet_policy),
            )
            .route(
                "/_shoal/v1/fleet/token",
                axum::routing::post(admin::fleet_token),
            )
            .route("/_shoal/v1/reload", axum::routing::post(admin::reload))
            .route("/_shoal/v1/gc", axum::routing::post(admin::gc))
            .route("/_shoal/v1/compact", axum::routing::post(admin::compact))
            .route("/_shoal/v1/du", axum::routing::get(admin::du))
            .route("/_shoal/v1/lifecycle", axum::routing::get(admin::lifecycle))
            .route(
                "/_shoal/v1/pins",
                axum::routing::get(admin::pins).post(admin::pin),
            )
            .route("/_shoal/v1/unpin", axum::routing::post(admin::unpin))
            .route("/_shoal/v1/quota", axum::routing::post(admin::quota_round))
            .route("/_shoal/v1/prefetch", axum::routing::post(admin::prefetch))
            .route(
                "/_shoal/v1/lifecycle/preview",
                axum::routing::post(admin::lifecycle_preview),
            )
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

/// The client's address; a request without one came from inside the process (an embedding or
/// a test driving the router directly) and counts as loopback.
fn client_of(client: Option<axum::Extension<access::ClientAddr>>) -> Option<std::net::SocketAddr> {
    client.map(|c| c.0.0)
}

async fn dispatch(
    State(registry): State<Registry>,
    client: Option<axum::Extension<access::ClientAddr>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let client = client_of(client);
    let route = Route::parse(&decode_path(uri.path()));
    let q = query(&uri);
    let route = match (route, &registry.mirror) {
        (Ok(route), Some(mirror)) => to_upstream(mirror, route, &method, param(&q, "ns"))
            .await
            .map_err(RegistryError::from),
        (route, _) => route.map_err(|e| RegistryError::from_route(e, &method)),
    };
    let result = match route {
        Ok(route) => {
            let caller = access::caller(&registry, &headers, client).and_then(|caller| {
                let needs = access::needs(&route, &method, &q);
                access::authorize(&registry, &caller, &headers, &needs, client)?;
                Ok(caller)
            });
            match caller {
                Ok(caller) => {
                    let request = Request {
                        caller: &caller,
                        client,
                        method: &method,
                        uri: &uri,
                        headers: &headers,
                    };
                    route_request(&registry, route, &request, body).await
                }
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    };
    result.unwrap_or_else(IntoResponse::into_response)
}

/// The route of a pull, with its repository renamed into an upstream's namespace if the
/// mirror takes it (see [`crate::mirror::route`]); pushes, deletes and other routes as they
/// are. Access is then checked on the name the fleet keeps the content under.
async fn to_upstream(
    mirror: &crate::mirror::pull::Mirror,
    route: Route,
    method: &Method,
    ns: Option<&str>,
) -> Result<Route, crate::store::StoreError> {
    use crate::mirror::route::Routed;
    if !matches!(*method, Method::GET | Method::HEAD) {
        return Ok(route);
    }
    let rename = |name: RepoName, routed: Routed| match routed {
        Routed::Upstream { repo, .. } => repo,
        Routed::Local => name,
    };
    Ok(match route {
        Route::Manifest(name, reference) => {
            let routed = mirror.route(&name, ns).await?;
            Route::Manifest(rename(name, routed), reference)
        }
        Route::Blob(name, digest) => {
            let routed = mirror.route(&name, ns).await?;
            Route::Blob(rename(name, routed), digest)
        }
        Route::Tags(name) => {
            let routed = mirror.route(&name, ns).await?;
            Route::Tags(rename(name, routed))
        }
        Route::Referrers(name, digest) => {
            let routed = mirror.route(&name, ns).await?;
            Route::Referrers(rename(name, routed), digest)
        }
        other => other,
    })
}

/// What the handlers know of a request besides its route and body.
pub(crate) struct Request<'a> {
    /// Who is asking (already allowed what the route needs).
    pub caller: &'a Caller,
    /// The client's address.
    pub client: Option<std::net::SocketAddr>,
    method: &'a Method,
    uri: &'a Uri,
    headers: &'a HeaderMap,
}

impl Request<'_> {
    /// An audit entry of `action` by this request's caller.
    pub fn audit(&self, action: Event, outcome: impl Into<String>) -> Entry {
        Entry::new(self.caller.name(), action, outcome).client(self.client)
    }
}

async fn route_request(
    r: &Registry,
    route: Route,
    request: &Request<'_>,
    body: Body,
) -> Result<Response> {
    let (method, uri, headers) = (request.method, request.uri, request.headers);
    let q = query(uri);
    match (route, method.clone()) {
        (Route::Base, Method::GET | Method::HEAD) if *request.caller == Caller::Anonymous => {
            // Docker, podman and the rest log in only when asked to: an anonymous client is
            // asked, even where it may pull public repositories anonymously.
            Err(RegistryError::Unauthorized {
                challenge: access::challenge(r, headers, &[]),
                message: "authentication required".into(),
            })
        }
        (Route::Base, Method::GET | Method::HEAD) => Ok(base()),
        (Route::Catalog, Method::GET) => listing::catalog(r, request.caller, &q).await,
        (Route::Tags(name), Method::GET) => listing::tags(r, &name, &q).await,
        (Route::Referrers(name, digest), Method::GET) => {
            listing::referrers(r, &name, &digest, &q).await
        }
        (Route::Blob(name, digest), Method::GET | Method::HEAD) => {
            if let Some(m) = &r.mirror {
                m.prepare_blob(&name, &digest)
                    .await
                    .map_err(|e| RegistryError::from_mirror(e, RegistryError::BlobUnknown))?;
            }
            blobs::get(r, &name, &digest, headers, method == Method::GET).await
        }
        (Route::Blob(name, digest), Method::DELETE) => {
            blobs::delete(r, request, &name, &digest).await
        }
        (Route::UploadStart(name), Method::POST) => {
            uploads::start(r, request.caller, &name, &q, headers, body).await
        }
        (Route::Upload(name, id), Method::PATCH) => {
            uploads::patch(r, &name, &id, headers, body).await
        }
        (Route::Upload(name, id), Method::PUT) => {
            uploads::put(r, &name, &id, &q, headers, body).await
        }
        (Route::Upload(name, id), Method::GET) => uploads::status(r, &name, &id).await,
        (Route::Upload(name, id), Method::DELETE) => uploads::cancel(r, &name, &id).await,
        (Route::Manifest(name, reference), Method::GET | Method::HEAD) => {
            let mut reference = reference;
            if let Some(m) = &r.mirror {
                let resolved = m
                    .prepare_manifest(&name, &reference)
                    .await
                    .map_err(|e| RegistryError::from_mirror(e, RegistryError::ManifestUnknown))?;
                // A mirrored tag is served as resolved, not as whatever record came since.
                if let Some(digest) = resolved {
                    reference = shoal_protocol::Reference::Digest(digest);
                }
            }
            manifests::get(r, &name, &reference, headers, method == Method::GET).await
        }
        (Route::Manifest(name, reference), Method::PUT) => {
            manifests::put(r, request, &name, &reference, headers, body).await
        }
        (Route::Manifest(name, reference), Method::DELETE) => {
            manifests::delete(r, request, &name, &reference).await
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
    builder.body(Body::empty()).map_err(RegistryError::Response)
}
