//! The registry's side of access control: who is asking ([`Caller`]), what the request needs,
//! and the answers the distribution spec and docker expect when it is not allowed.
//!
//! - No credentials, and the request needs more than the caller has: `401 UNAUTHORIZED` with
//!   `WWW-Authenticate: Bearer realm=".../token",service="shoal",scope="repository:NAME:ACTIONS"`,
//!   which sends docker, podman, skopeo, containerd and oras to the token endpoint.
//! - Wrong credentials: `401 UNAUTHORIZED`; from a client address that failed
//!   [`MAX_FAILURES`] times within [`FAILURE_WINDOW`]: `429 TOOMANYREQUESTS` with `Retry-After`.
//! - An authenticated principal without the action: `403 DENIED`. A bearer token that lacks
//!   an action its client never asked for: `403 DENIED` with a `WWW-Authenticate` challenge
//!   saying `error="insufficient_scope"` and the scope needed (RFC 6750), which sends the
//!   client back to the token endpoint.
//!
//! [`token`] is the token endpoint (`GET /token`): it takes Basic credentials (a fleet access
//! token as the password, or a node user's password) and answers a short-lived bearer token for
//! the intersection of the scopes asked for and those allowed. Basic credentials are also
//! accepted on every request, for clients that send them without asking for a token.
//! Every denial and login is written to the audit trail; no secret ever is.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue, Method, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use shoal_protocol::RepoName;
use shoal_protocol::fleet::{Action, Actions};

use super::error::RegistryError;
use super::path::Route;
use super::{Registry, param};
use crate::auth::audit::{Entry, Event};
use crate::auth::{Caller, Credentials, Denied};

/// Failed logins from one client address after which it is slowed down.
pub const MAX_FAILURES: u32 = 10;
/// The window failures are counted in, and how long a client that reached the limit waits.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Most client addresses whose failures are remembered.
const MAX_TRACKED_CLIENTS: usize = 10_000;
/// How long a bearer token from the token endpoint lasts.
pub const BEARER_TTL: Duration = Duration::from_secs(300);
/// Longest `Authorization` header read, in bytes (an access token is a few hundred).
const MAX_AUTHORIZATION_BYTES: usize = 16 * 1024;

/// The client's address, set by the server on every request.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

/// Failed logins by client address.
#[derive(Debug, Default)]
pub struct Failures {
    by_client: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl Failures {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, (u32, Instant)>> {
        self.by_client
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How long `ip` must wait, if it failed too often.
    pub fn blocked(&self, ip: IpAddr) -> Option<Duration> {
        let map = self.lock();
        let (count, since) = map.get(&ip)?;
        let elapsed = since.elapsed();
        (*count >= MAX_FAILURES && elapsed < FAILURE_WINDOW).then(|| FAILURE_WINDOW - elapsed)
    }

    /// Counts a failure of `ip`.
    pub fn record(&self, ip: IpAddr) {
        let mut map = self.lock();
        if map.len() >= MAX_TRACKED_CLIENTS {
            map.retain(|_, (_, since)| since.elapsed() < FAILURE_WINDOW);
        }
        if map.len() >= MAX_TRACKED_CLIENTS {
            // Still full of recent failures: forget the oldest rather than grow.
            if let Some(oldest) = map.iter().min_by_key(|(_, (_, s))| *s).map(|(ip, _)| *ip) {
                map.remove(&oldest);
            }
        }
        let entry = map.entry(ip).or_insert((0, Instant::now()));
        if entry.1.elapsed() >= FAILURE_WINDOW {
            *entry = (0, Instant::now());
        }
        entry.0 = entry.0.saturating_add(1);
    }
}

/// The credentials in the request's `Authorization` header. A header that is there but not
/// understood is wrong credentials, not none.
pub fn credentials(headers: &HeaderMap) -> Result<Credentials, Denied> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(Credentials::None);
    };
    if value.len() > MAX_AUTHORIZATION_BYTES {
        return Err(Denied::BadCredentials);
    }
    let value = value.to_str().map_err(|_| Denied::BadCredentials)?.trim();
    let (scheme, rest) = value.split_once(' ').ok_or(Denied::BadCredentials)?;
    match scheme.to_ascii_lowercase().as_str() {
        "basic" => {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(rest.trim())
                .map_err(|_| Denied::BadCredentials)?;
            let text = String::from_utf8(decoded).map_err(|_| Denied::BadCredentials)?;
            let (user, password) = text.split_once(':').ok_or(Denied::BadCredentials)?;
            Ok(Credentials::Basic {
                user: user.to_owned(),
                password: password.to_owned(),
            })
        }
        "bearer" => Ok(Credentials::Bearer(rest.trim().to_owned())),
        _ => Err(Denied::BadCredentials),
    }
}

/// What a request needs: the actions on each repository it touches. `None` for requests that
/// only need an authenticated caller (the base endpoint, the catalog, whose entries are
/// filtered).
pub fn needs(route: &Route, method: &Method, q: &[(String, String)]) -> Vec<(RepoName, Action)> {
    let write = |name: &RepoName, action| vec![(name.clone(), action)];
    match (route, method) {
        (Route::Base | Route::Catalog, _) => Vec::new(),
        (
            Route::Tags(n) | Route::Referrers(n, _) | Route::Blob(n, _) | Route::Manifest(n, _),
            &Method::GET | &Method::HEAD,
        ) => write(n, Action::Pull),
        (Route::Blob(n, _) | Route::Manifest(n, _), &Method::DELETE) => write(n, Action::Delete),
        (Route::UploadStart(n), _) => {
            let mut needs = write(n, Action::Push);
            // A cross-repository mount reads the source: never mount what the caller cannot pull.
            if param(q, "mount").is_some()
                && let Some(from) = param(q, "from").and_then(|f| f.parse::<RepoName>().ok())
            {
                needs.push((from, Action::Pull));
            }
            needs
        }
        (Route::Upload(n, _) | Route::Manifest(n, _), _) => write(n, Action::Push),
        // Other methods on read-only routes are answered 405 by the dispatcher; asking for
        // pull keeps them from telling a stranger anything.
        (Route::Tags(n) | Route::Referrers(n, _) | Route::Blob(n, _), _) => write(n, Action::Pull),
    }
}

/// The `WWW-Authenticate` challenge for a request that needs `needs`, pointing at this node's
/// token endpoint.
pub fn challenge(r: &Registry, headers: &HeaderMap, needs: &[(RepoName, Action)]) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            h.len() <= 255
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        })
        .unwrap_or("localhost");
    let scheme = if r.https { "https" } else { "http" };
    let mut value = format!("Bearer realm=\"{scheme}://{host}/token\",service=\"shoal\"");
    let mut by_repo: Vec<(RepoName, Actions)> = Vec::new();
    for (repo, action) in needs {
        match by_repo.iter_mut().find(|(r, _)| r == repo) {
            Some((_, a)) => *a = a.union(Actions::of(&[*action])),
            None => by_repo.push((repo.clone(), Actions::of(&[*action]))),
        }
    }
    if !by_repo.is_empty() {
        let scopes: Vec<String> = by_repo
            .iter()
            .map(|(repo, actions)| format!("repository:{repo}:{actions}"))
            .collect();
        value.push_str(&format!(",scope=\"{}\"", scopes.join(" ")));
    }
    value
}

/// Who is asking: authenticates the request, or answers it with 401 or 429. A request with no
/// client address came over the admin socket (which only the node's own user can reach) or from
/// inside the process: it is the operator.
pub fn caller(
    r: &Registry,
    headers: &HeaderMap,
    client: Option<SocketAddr>,
) -> Result<Caller, RegistryError> {
    if client.is_none() {
        return Ok(Caller::Local);
    }
    let ip = client.map(|c| c.ip());
    if let Some(wait) = ip.and_then(|ip| r.failures.blocked(ip)) {
        return Err(RegistryError::TooManyRequests {
            retry_after_secs: wait.as_secs().max(1),
        });
    }
    let loopback = client.is_some_and(|c| c.ip().is_loopback());
    let result = credentials(headers).and_then(|c| r.tags.auth().authenticate(c, loopback));
    match result {
        Ok(caller) => Ok(caller),
        Err(denied) => {
            if let Some(ip) = ip {
                r.failures.record(ip);
            }
            r.audit.record(
                Entry::new("anonymous".into(), Event::Denied, denied.to_string()).client(client),
            );
            Err(RegistryError::Unauthorized {
                challenge: challenge(r, headers, &[]),
                message: denied.to_string(),
            })
        }
    }
}

/// Whether `caller` may do all of `needs`; if not, the 401 (anonymous) or 403 (authenticated)
/// to answer, written to the audit trail.
pub fn authorize(
    r: &Registry,
    caller: &Caller,
    headers: &HeaderMap,
    needs: &[(RepoName, Action)],
    client: Option<SocketAddr>,
) -> Result<(), RegistryError> {
    let missing = needs
        .iter()
        .find(|(repo, action)| !r.tags.auth().allowed(caller, repo).contains(*action));
    let Some((repo, action)) = missing else {
        return needs
            .iter()
            .filter(|(_, a)| *a == Action::Push)
            .try_for_each(|(repo, _)| node_may_write(r, caller, repo, Action::Push, client));
    };
    let why = format!("{} may not {} {repo}", caller.name(), action.as_str());
    r.audit.record(
        Entry::new(caller.name(), Event::Denied, why.clone())
            .repository(repo)
            .client(client),
    );
    Err(match caller {
        Caller::Anonymous => RegistryError::Unauthorized {
            challenge: challenge(r, headers, needs),
            message: "authentication required".into(),
        },
        // A bearer token scoped narrower than the request, for an action the client never
        // asked for (oras asks for `pull` first, then pushes): send it back to the token
        // endpoint for a token that covers the request.
        Caller::Bearer(claims) if !claims.refused(repo).contains(*action) => {
            RegistryError::InsufficientScope {
                challenge: format!(
                    "{},error=\"insufficient_scope\"",
                    challenge(r, headers, needs)
                ),
                message: "the token does not cover this request".into(),
            }
        }
        _ => RegistryError::Denied(why),
    })
}

/// Refuses up front a write this node could not publish: in a fleet, the records of a private
/// repository count only from nodes granted what they do (see
/// [`Auth::fleet_accepts`](crate::auth::Auth::fleet_accepts)), so a push through a node
/// without a `push` grant (or a delete without `delete`) would be acknowledged here and ignored
/// by every peer. The client is told why with `403 DENIED`, and the denial is audited.
pub fn node_may_write(
    r: &Registry,
    caller: &Caller,
    repo: &RepoName,
    action: Action,
    client: Option<SocketAddr>,
) -> Result<(), RegistryError> {
    let auth = r.tags.auth();
    let key = auth.own_key();
    if auth.fleet_accepts(&key, repo, action) {
        return Ok(());
    }
    let why = if auth.settings(repo).publishers.is_empty() {
        format!(
            "this node lacks a {a} grant for {repo}: the fleet takes a private repository's \
             tag records only from nodes granted {a} on it; use a node that holds one, or have \
             an admin grant it (shoal grant add NAME --principal node:{key} --repo {repo} \
             --actions {a})",
            a = action.as_str()
        )
    } else {
        format!(
            "this node is not one of the publishers of {repo} (the repository's settings list \
             the keys whose tag records count); use a node that is"
        )
    };
    r.audit.record(
        Entry::new(caller.name(), Event::Denied, why.clone())
            .repository(repo)
            .client(client),
    );
    Err(RegistryError::Denied(why))
}

/// `GET /token`: trades credentials for a bearer token (the distribution token flow).
pub async fn token(
    axum::extract::State(r): axum::extract::State<Registry>,
    client: Option<axum::Extension<ClientAddr>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> Response {
    let client = client.map(|c| c.0.0);
    let caller = match caller(&r, &headers, client) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    // A login (docker login asks without a scope) needs real credentials.
    if matches!(caller, Caller::Anonymous) && headers.contains_key(header::AUTHORIZATION) {
        return RegistryError::Unauthorized {
            challenge: challenge(&r, &headers, &[]),
            message: "authentication failed".into(),
        }
        .into_response();
    }
    let q = super::query(&uri);
    let asked: Vec<(RepoName, Actions)> = q
        .iter()
        .filter(|(k, _)| k == "scope")
        .flat_map(|(_, v)| v.split(' '))
        .filter_map(parse_scope)
        .take(16)
        .collect();
    let (token, granted) = r.tags.auth().issue_bearer(&caller, &asked, BEARER_TTL);
    if !matches!(caller, Caller::Anonymous | Caller::Local) {
        let scopes: Vec<String> = granted
            .iter()
            .map(|(repo, a)| format!("{repo}:{a}"))
            .collect();
        r.audit.record(
            Entry::new(caller.name(), Event::Login, "ok")
                .reference(scopes.join(" "))
                .client(client),
        );
    }
    let issued_at = httpdate_rfc3339(std::time::SystemTime::now());
    let body = serde_json::json!({
        "token": token,
        "access_token": token,
        "expires_in": BEARER_TTL.as_secs(),
        "issued_at": issued_at,
    });
    let mut response = axum::Json(body).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// `repository:NAME:ACTIONS` (docker's scope grammar); other scopes are ignored.
fn parse_scope(scope: &str) -> Option<(RepoName, Actions)> {
    let rest = scope.strip_prefix("repository:")?;
    let (name, actions) = rest.rsplit_once(':')?;
    let name: RepoName = name.parse().ok()?;
    let actions = actions
        .split(',')
        .filter_map(|a| match a {
            "*" => Some(Actions::ALL),
            other => other.parse::<Actions>().ok(),
        })
        .fold(Actions::NONE, Actions::union);
    (!actions.is_empty()).then_some((name, actions))
}

/// A time as RFC 3339 in UTC (`2026-12-07T01:02:03Z`), as the token spec's `issued_at`.
fn httpdate_rfc3339(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = i64::try_from(days).unwrap_or(0) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{d:02}T{h:02}:{m:02}:{s:02}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_parse_as_docker_writes_them() {
        let (repo, actions) = parse_scope("repository:team/app:pull,push").unwrap();
        assert_eq!(repo.as_str(), "team/app");
        assert_eq!(actions, "pull,push".parse().unwrap());
        assert_eq!(
            parse_scope("repository:team/app:*").unwrap().1,
            Actions::ALL
        );
        assert!(parse_scope("registry:catalog:*").is_none());
        assert!(parse_scope("repository:Bad:pull").is_none());
        assert!(parse_scope("repository:team/app:fly").is_none());
    }

    #[test]
    fn authorization_headers_parse_or_are_wrong() {
        let mut h = HeaderMap::new();
        assert_eq!(credentials(&h), Ok(Credentials::None));
        let basic = base64::engine::general_purpose::STANDARD.encode("ana:pw");
        h.insert(
            header::AUTHORIZATION,
            format!("Basic {basic}").parse().unwrap(),
        );
        assert_eq!(
            credentials(&h),
            Ok(Credentials::Basic {
                user: "ana".into(),
                password: "pw".into()
            })
        );
        h.insert(header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert_eq!(credentials(&h), Ok(Credentials::Bearer("abc".into())));
        for bad in ["Basic !!!", "Digest x", "Basic", "Basic bm9jb2xvbg=="] {
            h.insert(header::AUTHORIZATION, bad.parse().unwrap());
            assert_eq!(credentials(&h), Err(Denied::BadCredentials), "{bad}");
        }
    }

    #[test]
    fn a_client_that_fails_too_often_waits() {
        let f = Failures::default();
        let ip: IpAddr = "198.18.1.9".parse().unwrap();
        for _ in 0..MAX_FAILURES - 1 {
            f.record(ip);
        }
        assert!(f.blocked(ip).is_none());
        f.record(ip);
        assert!(f.blocked(ip).is_some_and(|w| w <= FAILURE_WINDOW));
        assert!(f.blocked("198.18.1.10".parse().unwrap()).is_none());
    }

    #[test]
    fn times_are_rfc3339() {
        let t = std::time::UNIX_EPOCH + Duration::from_secs(1_795_914_123);
        assert_eq!(httpdate_rfc3339(t), "2026-11-29T01:02:03Z");
        assert_eq!(
            httpdate_rfc3339(std::time::UNIX_EPOCH),
            "1970-01-01T00:00:00Z"
        );
    }
}
