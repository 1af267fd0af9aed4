//! The node's own small admin API, beside `/v2/`: `GET /_shoal/v1/peers` (what `shoal peers`
//! prints), `GET /_shoal/v1/status` (identity, listen addresses, record counters; open to
//! anyone, but the disk figures only to an admin), and the fleet: founding one, joining one,
//! join tokens, policies and access tokens signed with the admin key this node holds, and
//! reloading trust rules and users. Only a local client of an open node, or a principal with
//! `admin` on every repository, may use the rest.
//!
//! The answers are the typed structs below, which the server serializes and the CLI
//! deserializes, so the two cannot drift apart. A node whose network is down answers `503`.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use shoal_protocol::fleet::{Actions, FleetId, JoinToken, Name, PolicyBody, RepoPattern, Scope};
use shoal_protocol::{PublisherKey, SigningKey};

use super::Registry;
use super::error::RegistryError;
use crate::auth::audit::{Entry, Event};
use crate::auth::{ADMIN_KEY_FILE, Caller, FleetConfig, ingest};
use crate::net::PeerInfo;

/// `GET /_shoal/v1/peers`: the peers the node is connected to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peers {
    /// One entry per connected peer.
    pub peers: Vec<PeerInfo>,
}

/// `GET /_shoal/v1/status`: who the node is and what it has seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The node's peer id (`None` for a registry without a network).
    pub peer_id: Option<String>,
    /// The addresses its swarm listens on.
    pub p2p_listen: Vec<String>,
    /// Peers that sent bad data (a bad chunk, index or manifest) and were cut off.
    pub bad_peers: u64,
    /// Bytes of blobs served to peers.
    pub served_bytes: u64,
    /// What became of the tag records that arrived.
    pub records: RecordCounts,
    /// Where the disk stands; only for an admin of the node (see `admin_caller`), since
    /// what a node holds and how full it is tells a stranger what to fill it with.
    #[serde(default)]
    pub disk: Option<DiskStatus>,
}

/// Where a node's disk stands, in `GET /_shoal/v1/status` (what `shoal du` breaks down).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DiskStatus {
    /// Bytes the store takes: blob files, upload sessions, downloads in progress.
    pub used_bytes: u64,
    /// Bytes free for the node on the filesystem of its data directory (unknown if it could
    /// not be asked).
    pub fs_free_bytes: Option<u64>,
    /// That filesystem's size.
    pub fs_total_bytes: Option<u64>,
    /// The disk quota (`--max-disk`), in bytes; `None` without one.
    pub max_disk_bytes: Option<u64>,
    /// Blob bytes pushed to this node (known to a running node, which classifies its blobs for
    /// the quota).
    pub published_bytes: Option<u64>,
    /// Blob bytes of pinned images.
    pub pinned_bytes: Option<u64>,
    /// Blob bytes that came from the fleet, which the quota evicts first.
    pub cached_bytes: Option<u64>,
}

/// Counters of incoming tag records, by outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordCounts {
    /// Became a tag's current record.
    pub accepted: u64,
    /// Older than (or equal to) the current one.
    pub stale: u64,
    /// From a publisher not trusted for the repository.
    pub untrusted: u64,
    /// Did not verify or decode.
    pub invalid: u64,
}

/// GET /_shoal/v1/peers
pub(super) async fn peers(State(r): State<Registry>) -> Response {
    let Some(fleet) = &r.fleet else {
        return axum::Json(Peers { peers: Vec::new() }).into_response();
    };
    match fleet.network.peers().await {
        Ok(peers) => axum::Json(Peers { peers }).into_response(),
        Err(e) => {
            tracing::warn!(
                error = &e as &dyn std::error::Error,
                "listing peers for the admin API"
            );
            RegistryError::Unavailable("the node's network is not running").into_response()
        }
    }
}

/// GET /_shoal/v1/status
pub(super) async fn status(
    State(r): State<Registry>,
    headers: axum::http::HeaderMap,
    client: Option<axum::Extension<super::access::ClientAddr>>,
) -> Response {
    let stats = r.tags.stats();
    let bad_peers = r.fleet.as_ref().map_or(0, |f| f.fetcher.bad_peers());
    let (peer_id, p2p_listen) = match &r.fleet {
        Some(f) => match f.network.listen_addrs().await {
            Ok(addrs) => (
                Some(f.network.peer_id().to_string()),
                addrs.iter().map(ToString::to_string).collect(),
            ),
            Err(e) => {
                tracing::warn!(
                    error = &e as &dyn std::error::Error,
                    "reading listen addresses for the admin API"
                );
                return RegistryError::Unavailable("the node's network is not running")
                    .into_response();
            }
        },
        None => (None, Vec::new()),
    };
    // Anyone may see who the node is; only an admin how full it is.
    let disk = if admin_caller(&r, &headers, client).is_ok() {
        match disk_status(&r).await {
            Ok(disk) => Some(disk),
            Err(e) => return e.into_response(),
        }
    } else {
        None
    };
    axum::Json(Status {
        peer_id,
        p2p_listen,
        bad_peers,
        served_bytes: r.fleet.as_ref().map_or(0, |f| f.network.served_bytes()),
        records: RecordCounts {
            accepted: stats.accepted.load(Ordering::Relaxed),
            stale: stats.stale.load(Ordering::Relaxed),
            untrusted: stats.untrusted.load(Ordering::Relaxed),
            invalid: stats.invalid.load(Ordering::Relaxed),
        },
        disk,
    })
    .into_response()
}

/// The disk figures of [`Status`]: the quota's classification where the registry has one (a
/// running node), else the sizes of the store's directories.
async fn disk_status(r: &Registry) -> Result<DiskStatus, RegistryError> {
    let root = r.store.layout().root().to_owned();
    let mut disk = DiskStatus::default();
    match &r.quota {
        Some(q) => {
            let s = q.status().await?;
            disk.used_bytes = s.used_bytes;
            disk.max_disk_bytes = s.max_disk_bytes;
            disk.published_bytes = Some(s.published_bytes);
            disk.pinned_bytes = Some(s.pinned_bytes);
            disk.cached_bytes = Some(s.cached_bytes);
        }
        None => {
            let root = root.clone();
            disk.used_bytes = tokio::task::spawn_blocking(move || {
                ["blobs", "uploads", "partial"]
                    .iter()
                    .map(|d| crate::store::usage::dir_bytes(&root.join(d)))
                    .sum::<u64>()
            })
            .await
            .map_err(|e| RegistryError::from(crate::store::StoreError::from(e)))?;
        }
    }
    match tokio::task::spawn_blocking(move || nix::sys::statvfs::statvfs(&root)).await {
        Ok(Ok(fs)) => {
            disk.fs_free_bytes = fs.blocks_available().checked_mul(fs.fragment_size());
            disk.fs_total_bytes = fs.blocks().checked_mul(fs.fragment_size());
        }
        // The store's figures stand without the filesystem's.
        Ok(Err(e)) => tracing::warn!(
            error = &e as &dyn std::error::Error,
            "asking the filesystem of the data directory for its size"
        ),
        Err(e) => tracing::warn!(
            error = &e as &dyn std::error::Error,
            "asking the filesystem of the data directory for its size"
        ),
    }
    Ok(disk)
}

/// Who is calling the admin API: only a local client of an open node, or a principal with
/// `admin` on every repository.
fn admin_caller(
    r: &Registry,
    headers: &axum::http::HeaderMap,
    client: Option<axum::Extension<super::access::ClientAddr>>,
) -> Result<Caller, RegistryError> {
    let client = super::client_of(client);
    let caller = super::access::caller(r, headers, client)?;
    if r.auth().is_admin(&caller) {
        return Ok(caller);
    }
    Err(match caller {
        Caller::Anonymous => RegistryError::Unauthorized {
            challenge: super::access::challenge(r, headers, &[]),
            message: "the admin API needs an admin".into(),
        },
        _ => RegistryError::Denied("the admin API needs an admin".into()),
    })
}

/// An admin of the node calling its admin API (see [`admin_caller`]): a handler that takes one
/// answers anyone else with `401` or `403` before it runs, and changes nothing.
pub(super) struct Admin(Caller);

impl axum::extract::FromRequestParts<Registry> for Admin {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        r: &Registry,
    ) -> Result<Self, Self::Rejection> {
        let client = parts
            .extensions
            .get::<super::access::ClientAddr>()
            .copied()
            .map(axum::Extension);
        admin_caller(r, &parts.headers, client)
            .map(Admin)
            .map_err(IntoResponse::into_response)
    }
}

/// The state of this node's fleet, for `shoal fleet status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetStatus {
    /// The fleet's id, if the node is in one.
    pub fleet: Option<String>,
    /// Its admin keys.
    pub admins: Vec<String>,
    /// Whether this node holds a ticket of it (is a member, not only an admin tool).
    pub member: bool,
    /// Whether this node holds an admin key of it.
    pub holds_admin_key: bool,
    /// The policies in force, by key.
    pub policies: Vec<String>,
}

/// `POST /_shoal/v1/fleet/init` and `/fleet/ticket`: what a new join token is for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketRequest {
    /// How long the token may be used to join, in seconds (default a day).
    pub ttl_secs: Option<u64>,
    /// Groups of the nodes that join with it.
    #[serde(default)]
    pub groups: Vec<String>,
}

/// What `shoal fleet init` asks for: the first join token's settings, and the fleet's other
/// admins (public keys made by `shoal keys admin` on the nodes that will hold them).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct InitRequest {
    /// The first join token.
    #[serde(flatten)]
    pub ticket: TicketRequest,
    /// More admins besides the founding key, as `ed25519:<hex>`.
    #[serde(default)]
    pub admins: Vec<String>,
}

/// The fleet's admins: the founder's key first, then `others` (parsed, without repeats, at most
/// [`MAX_LIST_ENTRIES`](shoal_protocol::fleet::MAX_LIST_ENTRIES) in all).
pub fn fleet_admins(founder: PublisherKey, others: &[String]) -> Result<Vec<PublisherKey>, String> {
    let mut admins = vec![founder];
    for key in others {
        let key: PublisherKey = key.parse().map_err(|e| format!("admin key {key:?}: {e}"))?;
        if !admins.contains(&key) {
            admins.push(key);
        }
    }
    if admins.len() > shoal_protocol::fleet::MAX_LIST_ENTRIES {
        return Err(format!(
            "{} admins, more than {}",
            admins.len(),
            shoal_protocol::fleet::MAX_LIST_ENTRIES
        ));
    }
    Ok(admins)
}

/// A join token, as `shoal fleet init` and `shoal fleet token` print it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokenAnswer {
    /// The fleet.
    pub fleet: String,
    /// The token, for `shoal node --join` or `shoal fleet join`.
    pub token: String,
    /// Until when it may be used to join, milliseconds since the Unix epoch.
    pub expires_ms: u64,
}

/// `POST /_shoal/v1/fleet/join`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequest {
    /// The join token.
    pub token: String,
}

/// `POST /_shoal/v1/fleet/policy`: a policy for this node to sign with its admin key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRequest {
    /// What the policy says.
    pub body: PolicyBody,
}

/// `POST /_shoal/v1/fleet/token`: an access token to sign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRequest {
    /// Who it is for.
    pub principal: String,
    /// Repository pattern and actions (`team/*`, `pull,push`) of each scope.
    pub scopes: Vec<(String, String)>,
    /// How long it lasts, in seconds.
    pub ttl_secs: u64,
}

/// An access token, as `shoal token create` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenAnswer {
    /// The token (the password for `docker login`).
    pub token: String,
    /// Its id, for `shoal revoke token`.
    pub id: String,
    /// When it expires, milliseconds since the Unix epoch.
    pub expires_ms: u64,
}

/// The default life of a join token.
const DEFAULT_TICKET_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
/// The longest life of an access token or a join token: a year.
const MAX_TTL_SECS: u64 = 366 * 24 * 3600;

/// Why an admin request failed.
enum AdminError {
    /// The request itself is wrong (a bad name, pattern, token).
    BadRequest(String),
    /// The node cannot do it in its state (no admin key, in another fleet already).
    Conflict(String),
    /// Anything a registry request can fail with.
    Registry(RegistryError),
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let (status, code, message) = match self {
            AdminError::BadRequest(m) => (axum::http::StatusCode::BAD_REQUEST, "UNSUPPORTED", m),
            AdminError::Conflict(m) => (axum::http::StatusCode::CONFLICT, "DENIED", m),
            AdminError::Registry(e) => return e.into_response(),
        };
        let body =
            serde_json::json!({ "errors": [{ "code": code, "message": message, "detail": null }] });
        (status, axum::Json(body)).into_response()
    }
}

impl From<RegistryError> for AdminError {
    fn from(e: RegistryError) -> Self {
        AdminError::Registry(e)
    }
}

fn bad_request(message: impl Into<String>) -> AdminError {
    AdminError::BadRequest(message.into())
}

fn conflict(message: impl Into<String>) -> AdminError {
    AdminError::Conflict(message.into())
}

fn groups_of(names: &[String]) -> Result<Vec<Name>, AdminError> {
    names
        .iter()
        .map(|g| g.parse::<Name>().map_err(|e| bad_request(e.to_string())))
        .collect()
}

/// GET /_shoal/v1/fleet
pub(super) async fn fleet_status(State(r): State<Registry>, _admin: Admin) -> Response {
    let auth = r.auth();
    let fleet = auth.fleet();
    axum::Json(FleetStatus {
        fleet: fleet.as_ref().map(|f| f.id.to_string()),
        admins: fleet
            .as_ref()
            .map(|f| f.admins.iter().map(ToString::to_string).collect())
            .unwrap_or_default(),
        member: fleet.as_ref().is_some_and(|f| f.ticket.is_some()),
        holds_admin_key: auth.holds_admin_key(),
        policies: auth
            .policies()
            .iter()
            .map(|p| p.statement().key().to_string())
            .collect(),
    })
    .into_response()
}

/// A join token for this node's fleet, with this node's addresses to bootstrap from.
async fn join_token(r: &Registry, request: &TicketRequest) -> Result<JoinTokenAnswer, AdminError> {
    let auth = r.auth();
    let groups = groups_of(&request.groups)?;
    let ttl = request.ttl_secs.map_or(DEFAULT_TICKET_TTL, |s| {
        std::time::Duration::from_secs(s.min(MAX_TTL_SECS))
    });
    let (Some(fleet), Some(ticket)) = (auth.fleet(), auth.issue_ticket(groups, ttl)) else {
        return Err(conflict("this node holds no admin key of a fleet"));
    };
    let mut bootstrap = Vec::new();
    if let Some(f) = &r.fleet
        && let Ok(addrs) = f.network.listen_addrs().await
    {
        let me = f.network.peer_id();
        bootstrap = addrs
            .into_iter()
            .filter(|a| {
                !a.iter()
                    .any(|p| matches!(p, libp2p::multiaddr::Protocol::Memory(_)))
            })
            .map(|a| a.with(libp2p::multiaddr::Protocol::P2p(me)).to_string())
            .take(shoal_protocol::fleet::MAX_LIST_ENTRIES)
            .collect();
    }
    let expires_ms = ticket.verify().map_or(0, |t| t.statement().expires_ms);
    let token = JoinToken {
        fleet: fleet.id,
        admins: fleet.admins.clone(),
        bootstrap,
        ticket,
    };
    Ok(JoinTokenAnswer {
        fleet: fleet.id.to_string(),
        token: token.to_text(),
        expires_ms,
    })
}

/// Joins `fleet` at run time: remembers it, takes its rules, shows the fleet this node's proof.
async fn join_now(r: &Registry, fleet: FleetConfig) -> Result<(), AdminError> {
    let Some(dir) = r.data_dir.clone() else {
        return Err(conflict("this registry has no data directory"));
    };
    let f = fleet.clone();
    let written = tokio::task::spawn_blocking(move || f.write(&dir)).await;
    if let Some(e) = write_failure(written) {
        tracing::error!(
            error = &*e as &dyn std::error::Error,
            "writing the fleet file"
        );
        return Err(RegistryError::Unavailable("could not write the fleet file").into());
    }
    let auth = r.auth();
    auth.join(fleet.clone());
    if let Err(e) = ingest::load(auth, &r.store).await {
        return Err(RegistryError::from(e).into());
    }
    if let Some(proof) = auth.own_proof() {
        if let Err(e) = ingest::member(auth, &r.store, proof.clone(), None).await {
            return Err(RegistryError::from(e).into());
        }
        if let Some(f) = &r.fleet {
            let _ = f.network.publish_member(&proof).await;
            for addr in fleet.bootstrap.iter().filter_map(|a| a.parse().ok()) {
                let _ = f.network.dial(addr).await;
            }
        }
    }
    Ok(())
}

/// POST /_shoal/v1/fleet/init: founds a fleet with this node as its admin and first member, and
/// answers a join token for the others.
pub(super) async fn fleet_init(
    State(r): State<Registry>,
    _admin: Admin,
    axum::Json(request): axum::Json<InitRequest>,
) -> Response {
    let auth = r.auth();
    if auth.in_fleet() {
        return conflict("this node is in a fleet already").into_response();
    }
    let Some(dir) = r.data_dir.clone() else {
        return conflict("this registry has no data directory").into_response();
    };
    let admin = SigningKey::from_seed(rand::random());
    let admins = match fleet_admins(admin.public(), &request.admins) {
        Ok(admins) => admins,
        Err(why) => return bad_request(why).into_response(),
    };
    let seed = admin.seed();
    let saved = tokio::task::spawn_blocking(move || {
        crate::identity::write_secret(&dir.join(ADMIN_KEY_FILE), &seed)
    })
    .await;
    if let Some(e) = write_failure(saved) {
        tracing::error!(
            error = &*e as &dyn std::error::Error,
            "writing the admin key"
        );
        return RegistryError::Unavailable("could not write the admin key").into_response();
    }
    let id = FleetId::founded_by(&admin.public());
    auth.set_admin_key(admin.clone());
    // The founder's own ticket: it enrols itself at once, so the ticket's expiry never matters.
    auth.join(FleetConfig {
        id,
        admins: admins.clone(),
        ticket: None,
        bootstrap: Vec::new(),
    });
    let Some(own) = auth.issue_ticket(Vec::new(), DEFAULT_TICKET_TTL) else {
        return RegistryError::Unavailable("could not sign a ticket").into_response();
    };
    let fleet = FleetConfig {
        id,
        admins,
        ticket: Some(own),
        bootstrap: Vec::new(),
    };
    if let Err(e) = join_now(&r, fleet).await {
        return e.into_response();
    }
    enrol(&r, auth.own_key(), Vec::new()).await;
    r.audit.record(
        Entry::new("local".into(), Event::PolicyChange, "ok").reference(format!("fleet init {id}")),
    );
    match join_token(&r, &request.ticket).await {
        Ok(answer) => axum::Json(answer).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Signs and spreads a `Member` policy for `node` (this node holds an admin key).
pub(crate) async fn enrol(r: &Registry, node: PublisherKey, groups: Vec<Name>) {
    let auth = r.auth();
    let Some(policy) = auth.sign_policy(PolicyBody::Member { node, groups }) else {
        return;
    };
    if let Ok(ingest::Outcome::Accepted) = ingest::policy(auth, &r.store, policy.clone()).await
        && let Some(f) = &r.fleet
    {
        let _ = f.network.publish_policy(&policy).await;
    }
}

/// POST /_shoal/v1/fleet/ticket: a new join token (this node holds an admin key).
pub(super) async fn fleet_ticket(
    State(r): State<Registry>,
    _admin: Admin,
    axum::Json(request): axum::Json<TicketRequest>,
) -> Response {
    match join_token(&r, &request).await {
        Ok(answer) => axum::Json(answer).into_response(),
        Err(e) => e.into_response(),
    }
}

/// POST /_shoal/v1/fleet/join: joins the fleet of a join token, at run time.
pub(super) async fn fleet_join(
    State(r): State<Registry>,
    _admin: Admin,
    axum::Json(request): axum::Json<JoinRequest>,
) -> Response {
    let token = match JoinToken::from_text(&request.token) {
        Ok(t) => t,
        Err(e) => return bad_request(format!("the join token: {e}")).into_response(),
    };
    let fleet = match FleetConfig::from_token(&token) {
        Ok(f) => f,
        Err(e) => return bad_request(format!("the join token: {e}")).into_response(),
    };
    if r.auth().fleet().is_some_and(|f| f.id != fleet.id) {
        return conflict("this node is in another fleet").into_response();
    }
    if let Err(e) = join_now(&r, fleet).await {
        return e.into_response();
    }
    r.audit.record(
        Entry::new("local".into(), Event::PolicyChange, "ok")
            .reference(format!("fleet join {}", token.fleet)),
    );
    axum::http::StatusCode::NO_CONTENT.into_response()
}

/// POST /_shoal/v1/fleet/policy: signs a policy with this node's admin key and spreads it.
pub(super) async fn fleet_policy(
    State(r): State<Registry>,
    Admin(caller): Admin,
    axum::Json(request): axum::Json<PolicyRequest>,
) -> Response {
    // Refused before signing, saying why (an invalid lifecycle policy, a list too long).
    if let Err(why) = request.body.validate() {
        return bad_request(why.to_string()).into_response();
    }
    let auth = r.auth();
    let Some(policy) = auth.sign_policy(request.body) else {
        return conflict("this node holds no admin key of a fleet").into_response();
    };
    let key = policy
        .verify()
        .map(|v| v.statement().key().to_string())
        .unwrap_or_default();
    match ingest::policy(auth, &r.store, policy.clone()).await {
        Ok(ingest::Outcome::Accepted) => {}
        Ok(ingest::Outcome::Stale) => {
            return conflict("a newer policy for this key is in force").into_response();
        }
        Ok(ingest::Outcome::Refused(why)) => return bad_request(why.to_string()).into_response(),
        Err(e) => return RegistryError::from(e).into_response(),
    }
    if let Some(f) = &r.fleet {
        let _ = f.network.publish_policy(&policy).await;
    }
    r.audit
        .record(Entry::new(caller.name(), Event::PolicyChange, "ok").reference(&key));
    axum::Json(serde_json::json!({ "key": key })).into_response()
}

/// POST /_shoal/v1/fleet/token: signs an access token with this node's admin key.
pub(super) async fn fleet_token(
    State(r): State<Registry>,
    Admin(caller): Admin,
    axum::Json(request): axum::Json<TokenRequest>,
) -> Response {
    let principal: Name = match request.principal.parse() {
        Ok(p) => p,
        Err(e) => return bad_request(e.to_string()).into_response(),
    };
    let mut scopes = Vec::new();
    for (repos, actions) in &request.scopes {
        match (repos.parse::<RepoPattern>(), actions.parse::<Actions>()) {
            (Ok(repos), Ok(actions)) => scopes.push(Scope { repos, actions }),
            (Err(e), _) | (_, Err(e)) => return bad_request(e.to_string()).into_response(),
        }
    }
    let ttl = std::time::Duration::from_secs(request.ttl_secs.clamp(1, MAX_TTL_SECS));
    let Some(token) = r.auth().issue_token(principal, scopes, ttl) else {
        return conflict("this node holds no admin key of a fleet").into_response();
    };
    let Ok(verified) = token.verify() else {
        return RegistryError::Unavailable("could not sign a token").into_response();
    };
    let t = verified.statement();
    r.audit.record(
        Entry::new(caller.name(), Event::PolicyChange, "ok")
            .reference(format!("token {} for {}", t.id, t.principal)),
    );
    axum::Json(TokenAnswer {
        token: token.to_text(),
        id: t.id.to_string(),
        expires_ms: t.expires_ms,
    })
    .into_response()
}

/// POST /_shoal/v1/reload: reads the trust rules and the users again (after `shoal trust` or
/// `shoal user` changed their files).
pub(super) async fn reload(State(r): State<Registry>, _admin: Admin) -> Response {
    let Some(dir) = r.data_dir.clone() else {
        return conflict("this registry has no data directory").into_response();
    };
    let read = tokio::task::spawn_blocking(move || {
        let rules = crate::auth::trust::read_file(&dir).map_err(ReloadError::Trust)?;
        let users = crate::auth::users::Users::read(&dir).map_err(ReloadError::Users)?;
        Ok::<_, ReloadError>((rules, users))
    })
    .await;
    match read {
        Ok(Ok((rules, users))) => {
            r.auth().set_trust_rules(rules);
            r.auth().set_users(users);
            axum::http::StatusCode::NO_CONTENT.into_response()
        }
        Ok(Err(e)) => {
            tracing::warn!(
                error = &e as &dyn std::error::Error,
                "reloading the trust rules and users"
            );
            // The admin who edited the files is told what is wrong with them.
            bad_request(with_causes(&e)).into_response()
        }
        Err(e) => {
            tracing::error!(
                error = &e as &dyn std::error::Error,
                "reloading the trust rules and users"
            );
            RegistryError::Unavailable("reading the files failed").into_response()
        }
    }
}

/// Why `reload` could not read the files.
#[derive(Debug, thiserror::Error)]
enum ReloadError {
    /// The trust rules.
    #[error("reading the trust rules")]
    Trust(#[source] crate::auth::trust::TrustError),
    /// The users file.
    #[error("reading the users")]
    Users(#[source] crate::auth::AuthError),
}

/// `e` and its causes, `: `-separated, for an answer to an admin.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// What `POST /_shoal/v1/lifecycle/preview` is asked.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PreviewRequest {
    /// The repository.
    pub repo: shoal_protocol::RepoName,
    /// The policy, in ECR's lifecycle-policy JSON; none: the fleet's policy for the repository.
    #[serde(default)]
    pub policy: Option<shoal_protocol::lifecycle::LifecyclePolicy>,
}

/// One retention policy in force, as `GET /_shoal/v1/lifecycle` lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LifecycleEntry {
    /// The repositories it covers.
    pub pattern: shoal_protocol::fleet::RepoPattern,
    /// The policy.
    pub policy: shoal_protocol::lifecycle::LifecyclePolicy,
}

/// GET /_shoal/v1/lifecycle: the fleet's retention policies in force on this node, most
/// specific pattern first.
pub(super) async fn lifecycle(State(r): State<Registry>, _admin: Admin) -> Response {
    let entries: Vec<LifecycleEntry> = r
        .auth()
        .retention()
        .iter()
        .map(|(pattern, policy)| LifecycleEntry {
            pattern: pattern.clone(),
            policy: policy.clone(),
        })
        .collect();
    axum::Json(entries).into_response()
}

/// POST /_shoal/v1/lifecycle/preview: the images of a repository that a policy (given, or the
/// fleet's for the repository) would expire, and why. Changes nothing.
pub(super) async fn lifecycle_preview(
    State(r): State<Registry>,
    _admin: Admin,
    body: axum::body::Bytes,
) -> Response {
    let ask = match serde_json::from_slice::<PreviewRequest>(&body) {
        Ok(ask) => ask,
        Err(e) => return bad_request(format!("not a preview request: {e}")).into_response(),
    };
    let policy = match ask.policy {
        Some(p) => p,
        None => match r.auth().retention().for_repo(&ask.repo) {
            Some((_, p)) => p.clone(),
            None => {
                return bad_request(format!(
                    "no retention policy of the fleet covers {}",
                    ask.repo
                ))
                .into_response();
            }
        },
    };
    let layout = r.store.layout().clone();
    let now_ms = r.auth().clock().now_ms();
    match r
        .store
        .read(move |i| crate::lifecycle::preview(i, &layout, &ask.repo, &policy, now_ms))
        .await
    {
        Ok(expired) => axum::Json(expired).into_response(),
        Err(e) => RegistryError::from(e).into_response(),
    }
}

/// GET /_shoal/v1/du?grace_secs=N: where the node's disk goes, by repository, and what a
/// collection with that grace period (default an hour) would free.
pub(super) async fn du(State(r): State<Registry>, _admin: Admin, uri: axum::http::Uri) -> Response {
    let grace_secs = uri
        .query()
        .and_then(|q| q.strip_prefix("grace_secs="))
        .and_then(|s| s.parse().ok())
        .unwrap_or(3600);
    let mut usage = match r
        .store
        .usage(
            std::time::Duration::from_secs(grace_secs),
            &r.auth().retention(),
        )
        .await
    {
        Ok(usage) => usage,
        Err(e) => return RegistryError::from(e).into_response(),
    };
    if let Some(q) = &r.quota {
        match q.status().await {
            Ok(status) => usage.quota = Some(status),
            Err(e) => return RegistryError::from(e).into_response(),
        }
    }
    axum::Json(usage).into_response()
}

/// `GET /_shoal/v1/pins`: the pins made with `shoal pin`, and the config's pin rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinList {
    /// Pins of this node's data directory.
    pub pins: Vec<crate::store::pins::Pin>,
    /// `[[pin]]` rules of its config.
    pub rules: Vec<crate::store::evict::PinRule>,
}

/// What `POST /_shoal/v1/pins` and `POST /_shoal/v1/unpin` are asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinRequest {
    /// `REPO:TAG` or `REPO@DIGEST`.
    pub image: String,
    /// Copies the fleet should keep (pins only; default 1).
    #[serde(default)]
    pub copies: Option<u32>,
}

/// GET /_shoal/v1/pins
pub(super) async fn pins(State(r): State<Registry>, _admin: Admin) -> Response {
    let rules = r
        .quota
        .as_ref()
        .map(|q| q.config().pins.clone())
        .unwrap_or_default();
    match r.store.pins().await {
        Ok(pins) => axum::Json(PinList { pins, rules }).into_response(),
        Err(e) => RegistryError::from(e).into_response(),
    }
}

fn pin_request(
    body: &[u8],
) -> Result<
    (
        PinRequest,
        shoal_protocol::RepoName,
        shoal_protocol::Reference,
    ),
    AdminError,
> {
    let ask = serde_json::from_slice::<PinRequest>(body)
        .map_err(|_| bad_request("expected {\"image\": \"REPO:TAG\", \"copies\": K}"))?;
    let (repo, reference) =
        crate::store::pins::parse_image(&ask.image).map_err(|e| bad_request(e.to_string()))?;
    Ok((ask, repo, reference))
}

/// POST /_shoal/v1/pins: pins an image this node knows (its tag has a record, or its manifest
/// is stored), with the copies the fleet should keep.
pub(super) async fn pin(
    State(r): State<Registry>,
    Admin(caller): Admin,
    body: axum::body::Bytes,
) -> Response {
    let (ask, repo, reference) = match pin_request(&body) {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    let copies = ask.copies.unwrap_or(1);
    if copies == 0 || copies > crate::store::pins::MAX_COPIES {
        return bad_request(crate::store::pins::PinError::Copies.to_string()).into_response();
    }
    let pin = crate::store::pins::Pin {
        repo,
        reference,
        copies,
    };
    match r.store.pin(pin.clone()).await {
        Ok(true) => {
            tracing::info!(pin = %pin, copies, caller = ?caller, "pinned");
            axum::Json(pin).into_response()
        }
        Ok(false) => RegistryError::ManifestUnknown.into_response(),
        Err(e) => RegistryError::from(e).into_response(),
    }
}

/// POST /_shoal/v1/unpin: removes a pin (404 if there is none).
pub(super) async fn unpin(
    State(r): State<Registry>,
    _admin: Admin,
    body: axum::body::Bytes,
) -> Response {
    let (_, repo, reference) = match pin_request(&body) {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    match r.store.unpin(repo, reference).await {
        Ok(true) => axum::Json(serde_json::json!({})).into_response(),
        Ok(false) => RegistryError::ManifestUnknown.into_response(),
        Err(e) => RegistryError::from(e).into_response(),
    }
}

/// POST /_shoal/v1/quota: runs a quota round now and says what it evicted.
pub(super) async fn quota_round(State(r): State<Registry>, _admin: Admin) -> Response {
    let Some(q) = &r.quota else {
        return axum::Json(crate::store::evict::EvictReport::default()).into_response();
    };
    match q.round().await {
        Ok(report) => axum::Json(report).into_response(),
        Err(e) => RegistryError::from(e).into_response(),
    }
}

/// What `POST /_shoal/v1/gc` is asked.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct GcRequest {
    /// List what would go; change nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// Blob files and manifests younger than this many seconds are kept.
    pub grace_secs: u64,
}

/// POST /_shoal/v1/gc: applies the fleet's retention policies and collects garbage now, while
/// the node serves, and says what went (dry: what would).
pub(super) async fn gc(
    State(r): State<Registry>,
    _admin: Admin,
    body: axum::body::Bytes,
) -> Response {
    let Ok(ask) = serde_json::from_slice::<GcRequest>(&body) else {
        return bad_request("expected {\"dry_run\": bool, \"grace_secs\": seconds}")
            .into_response();
    };
    let options =
        r.gc.options(std::time::Duration::from_secs(ask.grace_secs), ask.dry_run);
    match r
        .store
        .gc_with_retention(options, &r.auth().retention())
        .await
    {
        Ok(report) => {
            tracing::info!(
                dry_run = ask.dry_run,
                expired_tags = report.expired_tags,
                expired_images = report.expired_images,
                blobs = report.swept.len(),
                bytes = report.bytes_freed,
                "garbage collection"
            );
            axum::Json(report).into_response()
        }
        Err(e) => RegistryError::from(e).into_response(),
    }
}

/// POST /_shoal/v1/compact: compacts the records log now, while the node serves (pushes wait
/// only for the switch), and says what it did. A request while a compaction runs waits for
/// that one.
pub(super) async fn compact(
    State(r): State<Registry>,
    _admin: Admin,
    // Read (and ignored) so that the connection is not reset under a body it did not read.
    _body: axum::body::Bytes,
) -> Response {
    match r.store.compact().await {
        Ok(report) => axum::Json(report).into_response(),
        Err(e) => RegistryError::from(e).into_response(),
    }
}

/// The most images, nodes and sites one `POST /_shoal/v1/prefetch` may name.
pub const MAX_PREFETCH_IMAGES: usize = 64;
/// See [`MAX_PREFETCH_IMAGES`].
pub const MAX_PREFETCH_NODES: usize = 256;
/// See [`MAX_PREFETCH_IMAGES`].
pub const MAX_PREFETCH_SITES: usize = 16;

/// What `POST /_shoal/v1/prefetch` is asked (`shoal prefetch`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PrefetchRequest {
    /// The images, `REPO:TAG` or `REPO@DIGEST`.
    pub images: Vec<String>,
    /// Peer ids of fleet nodes to ask to fetch them (each queues them at its own rate limit).
    #[serde(default)]
    pub nodes: Vec<String>,
    /// Sites whose connected nodes to ask, as for `nodes`.
    #[serde(default)]
    pub sites: Vec<String>,
    /// Fetch them into this node too; it is the default when no node or site is named.
    #[serde(default)]
    pub local: bool,
}

/// What a node asked to prefetch said.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RemoteAnswer {
    /// It queued the image.
    Queued,
    /// It refused: this node may not read the repository, or the peer takes no asks.
    Denied,
    /// Its queue, or this node's share of it, is full.
    Busy,
    /// It could not be asked (not connected, or it did not answer).
    Unreachable,
}

/// One line of the answer to `POST /_shoal/v1/prefetch`: newline-delimited JSON, streamed as
/// the work goes on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum PrefetchEvent {
    /// Bytes of an image this node holds so far.
    Progress {
        /// The image as asked.
        image: String,
        /// Bytes held.
        done: u64,
        /// Bytes in all (grows once a child manifest of an index says what it needs).
        total: u64,
    },
    /// The image is on this node.
    Done {
        /// The image as asked.
        image: String,
        /// Its bytes.
        bytes: u64,
    },
    /// The image could not be fetched (into this node, or asked of the named ones).
    Failed {
        /// The image as asked.
        image: String,
        /// Why.
        error: String,
    },
    /// What a node asked to prefetch it answered.
    Remote {
        /// The image as asked.
        image: String,
        /// The node's peer id.
        node: String,
        /// Its answer.
        answer: RemoteAnswer,
    },
}

/// POST /_shoal/v1/prefetch: fetches images the fleet has records for into this node and/or
/// asks other nodes to, streaming [`PrefetchEvent`] lines. The request is checked whole before
/// anything starts; a client that hangs up stops the work (a blob under way still completes,
/// for whoever else waits on it).
pub(super) async fn prefetch(
    State(r): State<Registry>,
    Admin(caller): Admin,
    body: axum::body::Bytes,
) -> Response {
    let Ok(ask) = serde_json::from_slice::<PrefetchRequest>(&body) else {
        return bad_request(
            "expected {\"images\": [\"REPO:TAG\"|\"REPO@DIGEST\"], \"nodes\": [PEER_ID], \"sites\": [SITE], \"local\": bool}",
        )
        .into_response();
    };
    if ask.images.is_empty()
        || ask.images.len() > MAX_PREFETCH_IMAGES
        || ask.nodes.len() > MAX_PREFETCH_NODES
        || ask.sites.len() > MAX_PREFETCH_SITES
    {
        return bad_request(format!(
            "name 1 to {MAX_PREFETCH_IMAGES} images, at most {MAX_PREFETCH_NODES} nodes and {MAX_PREFETCH_SITES} sites"
        ))
        .into_response();
    }
    let mut nodes = Vec::new();
    for n in &ask.nodes {
        match n.parse::<libp2p::PeerId>() {
            Ok(p) => nodes.push(p),
            Err(_) => {
                return bad_request(format!("{:?} is not a peer id", truncate(n))).into_response();
            }
        }
    }
    let Some(fleet) = r.fleet.clone() else {
        return RegistryError::Unavailable("the node has no network").into_response();
    };
    tracing::info!(images = ?ask.images, nodes = ?ask.nodes, sites = ?ask.sites, caller = ?caller, "prefetch asked");
    let (tx, rx) = tokio::sync::mpsc::channel::<PrefetchEvent>(64);
    let local = ask.local || (ask.nodes.is_empty() && ask.sites.is_empty());
    let work = run_prefetch(r, fleet, ask, nodes, local, tx);
    // The work is polled by the response body: it ends when the client goes.
    let work = futures::StreamExt::filter_map(futures::stream::once(work), |()| async {
        None::<PrefetchEvent>
    });
    let events =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) });
    let lines = futures::StreamExt::map(futures::stream::select(work, events), |e| {
        let mut line = serde_json::to_vec(&e).unwrap_or_default();
        line.push(b'\n');
        Ok::<_, std::convert::Infallible>(line)
    });
    (
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(lines),
    )
        .into_response()
}

/// At most 100 characters of `s`, for echoing a bad input.
fn truncate(s: &str) -> String {
    s.chars().take(100).collect()
}

/// The work of [`prefetch`]: the remote asks first (they are quick), then each image here.
async fn run_prefetch(
    r: Registry,
    fleet: super::Fleet,
    ask: PrefetchRequest,
    mut nodes: Vec<libp2p::PeerId>,
    local: bool,
    tx: tokio::sync::mpsc::Sender<PrefetchEvent>,
) {
    use shoal_protocol::message::{PrefetchAnswer, SyncRequest, SyncResponse};
    let images: Vec<_> = ask
        .images
        .iter()
        .map(|i| (i.clone(), crate::store::pins::parse_image(i)))
        .collect();
    for (image, parsed) in &images {
        if let Err(e) = parsed {
            let error = e.to_string();
            let _ = tx
                .send(PrefetchEvent::Failed {
                    image: image.clone(),
                    error,
                })
                .await;
        }
    }
    if !ask.sites.is_empty() {
        let peers = fleet.network.peers().await.unwrap_or_default();
        for site in &ask.sites {
            let before = nodes.len();
            for p in &peers {
                if fleet.network.peer_site(&p.peer_id).as_deref() == Some(site.as_str())
                    && !nodes.contains(&p.peer_id)
                {
                    nodes.push(p.peer_id);
                }
            }
            if nodes.len() == before {
                for (image, _) in images.iter().filter(|(_, p)| p.is_ok()) {
                    let error = format!("no connected node in site {:?}", truncate(site));
                    let _ = tx
                        .send(PrefetchEvent::Failed {
                            image: image.clone(),
                            error,
                        })
                        .await;
                }
            }
        }
    }
    for (image, parsed) in &images {
        let Ok((repo, reference)) = parsed else {
            continue;
        };
        for node in &nodes {
            let request = SyncRequest::Prefetch {
                repo: repo.clone(),
                reference: reference.clone(),
            };
            let answer = match fleet.network.sync(*node, request).await {
                Ok(SyncResponse::Prefetch(PrefetchAnswer::Queued)) => RemoteAnswer::Queued,
                Ok(SyncResponse::Prefetch(PrefetchAnswer::Busy)) => RemoteAnswer::Busy,
                Ok(SyncResponse::Prefetch(PrefetchAnswer::Denied) | SyncResponse::Error(_)) => {
                    RemoteAnswer::Denied
                }
                Ok(_) | Err(_) => RemoteAnswer::Unreachable,
            };
            let event = PrefetchEvent::Remote {
                image: image.clone(),
                node: node.to_string(),
                answer,
            };
            let _ = tx.send(event).await;
        }
    }
    if !local {
        return;
    }
    for (image, parsed) in &images {
        let Ok((repo, reference)) = parsed else {
            continue;
        };
        let event = match prefetch_here(&r, &fleet, repo, reference, image, &tx).await {
            Ok(bytes) => PrefetchEvent::Done {
                image: image.clone(),
                bytes,
            },
            Err(e) => {
                tracing::warn!(error = &e as &dyn std::error::Error, %image, "prefetch failed");
                let error = match &e {
                    crate::prefetch::PrefetchError::Store(_) => {
                        "the node's store failed (see its log)".to_owned()
                    }
                    crate::prefetch::PrefetchError::Fetch(cause) => format!("{e}: {cause}"),
                    crate::prefetch::PrefetchError::Unknown { .. } => e.to_string(),
                };
                PrefetchEvent::Failed {
                    image: image.clone(),
                    error,
                }
            }
        };
        let _ = tx.send(event).await;
    }
}

/// Fetches one image into this node, at full speed, reporting its progress on `tx` (dropped
/// when the client reads too slowly: the next one says as much).
async fn prefetch_here(
    r: &Registry,
    fleet: &super::Fleet,
    repo: &shoal_protocol::RepoName,
    reference: &shoal_protocol::Reference,
    image: &str,
    tx: &tokio::sync::mpsc::Sender<PrefetchEvent>,
) -> Result<u64, crate::prefetch::PrefetchError> {
    let found = crate::prefetch::resolve(&r.store, repo, reference)
        .await?
        .ok_or_else(|| crate::prefetch::PrefetchError::Unknown {
            repo: repo.clone(),
            reference: reference.clone(),
        })?;
    // By the name asked: a tag moving meanwhile does not stop an operator's prefetch.
    let found = crate::prefetch::Image { tag: None, ..found };
    let mut total = 0;
    crate::prefetch::fetch_image(&fleet.fetcher, &r.store, &found, None, |b| {
        total = b.total;
        let _ = tx.try_send(PrefetchEvent::Progress {
            image: image.to_owned(),
            done: b.done,
            total: b.total,
        });
    })
    .await?;
    Ok(total)
}

/// The error of a file write run on the blocking pool: the write's, or its task's.
fn write_failure<E: std::error::Error + Send + Sync + 'static>(
    written: Result<Result<(), E>, tokio::task::JoinError>,
) -> Option<Box<dyn std::error::Error + Send + Sync>> {
    match written {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(Box::new(e)),
        Err(e) => Some(Box::new(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Auth;
    use crate::fetch::Fetcher;
    use crate::identity::Identity;
    use crate::net::{NetConfig, Network};
    use crate::registry::Fleet;
    use crate::store::Store;
    use crate::tags::Tags;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    #[tokio::test]
    async fn a_node_whose_network_is_down_answers_503_without_internal_text() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_owned();
        let store = tokio::task::spawn_blocking(move || Store::open(&path))
            .await
            .unwrap()
            .unwrap();
        let identity = Identity::from_seed([9; 32]);
        let tags = Tags::new(
            store.clone(),
            identity.signing_key(),
            Auth::open(identity.signing_key()),
        );
        let config = NetConfig {
            listen: vec![
                format!("/memory/{}", rand::random::<u64>() >> 1)
                    .parse()
                    .unwrap(),
            ],
            mdns: false,
            ..NetConfig::default()
        };
        let (cancel, tasks) = (
            tokio_util::sync::CancellationToken::new(),
            tokio_util::task::TaskTracker::new(),
        );
        let network = Network::start(
            identity.keypair(),
            config,
            store.clone(),
            tags.clone(),
            cancel.clone(),
            &tasks,
        )
        .await
        .unwrap();
        let fetcher = Fetcher::new(
            store.clone(),
            network.clone(),
            cancel.clone(),
            tasks.clone(),
        );
        let fleet = Fleet {
            network: network.clone(),
            fetcher,
        };
        let router = Registry::with_fleet(store, tags, Some(fleet)).router();
        let get = |path: &'static str| {
            let router = router.clone();
            async move {
                let request = axum::http::Request::get(path)
                    .body(axum::body::Body::empty())
                    .unwrap();
                let response = router.oneshot(request).await.unwrap();
                let status = response.status();
                let body = response.into_body().collect().await.unwrap().to_bytes();
                (status, String::from_utf8_lossy(&body).into_owned())
            }
        };
        let (status, body) = get("/_shoal/v1/peers").await;
        assert_eq!(status, 200, "{body}");
        let peers: Peers = serde_json::from_str(&body).unwrap();
        assert!(peers.peers.is_empty());
        let (status, body) = get("/_shoal/v1/status").await;
        assert_eq!(status, 200, "{body}");
        let parsed: Status = serde_json::from_str(&body).unwrap();
        assert_eq!(parsed.peer_id, Some(network.peer_id().to_string()));

        cancel.cancel();
        tasks.close();
        tasks.wait().await;
        for path in ["/_shoal/v1/peers", "/_shoal/v1/status"] {
            let (status, body) = get(path).await;
            assert_eq!(status, 503, "{path}: {body}");
            let json: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(json["errors"][0]["code"], "UNAVAILABLE");
            assert!(!body.contains("shut down"), "internal text leaked: {body}");
        }
    }
}
