//! Who may do what: the one place that evaluates access. The registry asks it about clients,
//! the network about peers, the tag state about publishers; none re-implements a rule.
//!
//! - A node without a fleet is open, as a lone node on loopback is by default: every peer is
//!   admitted, publishers are trusted by the node's own trust rules ([`trust`]), and clients are
//!   trusted as the operator configured (`local_clients`, `users`).
//! - A node in a fleet ([`FleetConfig`]) admits only peers that prove membership
//!   ([`MemberProof`]): a ticket signed by one of the fleet's admins, unexpired, unrevoked,
//!   bound to the peer's own key. Member nodes' tag records count in public repositories; in
//!   a private one, only a member's granted what the record does (`push`, `delete`), as reads
//!   need `pull`. Admins' policies ([`policy`]) set what else holds: repository visibility,
//!   tag mutability, allowed publishers, grants to users, nodes and groups, revocations.
//! - Clients: a loopback client is trusted when the operator leaves `local_clients = "open"`
//!   (the default); others present a fleet access token, a node user's password ([`users`]) or
//!   a bearer token this node issued ([`bearer`]), or are anonymous.
//!
//! The [`Auth`] handle is cheap to clone and shared by the whole node. Its state changes at run
//! time (a fleet joined, a policy or member arriving, trust rules reloaded) without a restart;
//! [`Auth::changes`] lets the network react (disconnect a revoked peer).

pub mod audit;
pub mod bearer;
pub mod ingest;
pub mod policy;
pub mod trust;
pub mod users;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_protocol::fleet::{
    Action, Actions, FleetId, JoinTicket, MemberProof, Name, ObjectId, Policy, Principal,
    RepoSettings, Revoked, Signed, SignedPolicy, TagMutability, Verified, Visibility,
};
use shoal_protocol::{PublisherKey, RepoName, SigningKey, Tag};
use tokio::sync::watch;

use policy::{Applied, PolicySet};
use trust::TrustRule;

/// How far in the future a policy's timestamp may be before it is refused: a clock that runs
/// ahead must not let an admin's statement (or a stolen admin key's) outlive every later one.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(10 * 60);

/// File in the data directory holding the fleet this node belongs to.
pub const FLEET_FILE: &str = "fleet.toml";

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The fleet a node belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetConfig {
    /// The fleet's id.
    pub id: FleetId,
    /// Its admins: whose policies, tokens and tickets count.
    pub admins: Vec<PublisherKey>,
    /// The ticket this node joined with, if it is a member (an admin-only tool may know a
    /// fleet without being in it).
    #[serde(default, with = "ticket_text", skip_serializing_if = "Option::is_none")]
    pub ticket: Option<Signed<JoinTicket>>,
    /// Where to find members (from the join token), dialled at every start.
    #[serde(default)]
    pub bootstrap: Vec<String>,
}

impl FleetConfig {
    /// The fleet a join token describes, with its ticket for this node. The ticket must be
    /// signed by one of the token's admins for the token's fleet, and not have expired.
    pub fn from_token(token: &shoal_protocol::fleet::JoinToken) -> Result<FleetConfig, Refused> {
        let ticket = token.ticket.verify()?;
        let t = ticket.statement();
        if t.fleet != token.fleet {
            return Err(Refused::OtherFleet);
        }
        if !token.admins.contains(&t.admin) {
            return Err(Refused::NotAdmin);
        }
        if now_ms() >= t.expires_ms {
            return Err(Refused::Expired);
        }
        Ok(FleetConfig {
            id: token.fleet,
            admins: token.admins.clone(),
            ticket: Some(token.ticket.clone()),
            bootstrap: token.bootstrap.clone(),
        })
    }
}

/// A ticket in `fleet.toml`, as the base64 of its encoding.
mod ticket_text {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};
    use shoal_protocol::codec;
    use shoal_protocol::fleet::{JoinTicket, Signed};

    pub fn serialize<S: Serializer>(
        t: &Option<Signed<JoinTicket>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => {
                let bytes = codec::encode(t).map_err(serde::ser::Error::custom)?;
                s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
            }
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Signed<JoinTicket>>, D::Error> {
        let text = String::deserialize(d)?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(serde::de::Error::custom)?;
        codec::decode(&bytes)
            .map(Some)
            .map_err(serde::de::Error::custom)
    }
}

impl FleetConfig {
    /// The fleet config in `data_dir`, if the node belongs to one. Blocking.
    pub fn read(data_dir: &std::path::Path) -> Result<Option<FleetConfig>, AuthError> {
        let path = data_dir.join(FLEET_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text)
                .map(Some)
                .map_err(|e| AuthError::File(path, Box::new(e))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(AuthError::File(path, Box::new(e))),
        }
    }

    /// Writes the fleet config to `data_dir` (atomically). Blocking.
    pub fn write(&self, data_dir: &std::path::Path) -> Result<(), AuthError> {
        let path = data_dir.join(FLEET_FILE);
        let err = |e: Box<dyn std::error::Error + Send + Sync>| AuthError::File(path.clone(), e);
        let text = toml::to_string(self).map_err(|e| err(e.into()))?;
        let tmp = data_dir.join(format!("{FLEET_FILE}.tmp"));
        std::fs::create_dir_all(data_dir).map_err(|e| err(e.into()))?;
        std::fs::write(&tmp, text).map_err(|e| err(e.into()))?;
        std::fs::rename(&tmp, &path).map_err(|e| err(e.into()))?;
        crate::store::sync_dir(data_dir).map_err(|e| err(e.into()))
    }
}

/// Why access state could not be loaded or changed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// A file in the data directory could not be read or written.
    #[error("{0}")]
    File(
        std::path::PathBuf,
        #[source] Box<dyn std::error::Error + Send + Sync>,
    ),
}

/// Why a fleet statement or a peer's proof was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// This node belongs to no fleet, so it takes no fleet statements.
    #[error("this node belongs to no fleet")]
    NoFleet,
    /// The signature, encoding or limits are wrong.
    #[error("invalid: {0}")]
    Invalid(#[from] shoal_protocol::fleet::FleetError),
    /// It is for another fleet.
    #[error("for another fleet")]
    OtherFleet,
    /// Its signer is not an admin of this fleet.
    #[error("not signed by an admin of this fleet")]
    NotAdmin,
    /// It claims a time further ahead than the clock skew allows.
    #[error("timestamp too far in the future")]
    FromTheFuture,
    /// It has expired.
    #[error("expired")]
    Expired,
    /// It, or the node, was revoked.
    #[error("revoked")]
    Revoked,
    /// The proof is for another node than the peer that sent it.
    #[error("the proof is for another node")]
    NotThePeer,
}

/// What the node knows of a member of its fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The ticket it joined with (`None` for a node an admin enrolled, known before its ticket).
    pub ticket: Option<ObjectId>,
    /// Its groups.
    pub groups: Vec<Name>,
    /// Whether an admin enrolled it (it stays a member after its ticket expires).
    pub enrolled: bool,
}

/// File in the data directory holding a fleet admin's secret key (mode 0600), on the node where
/// `shoal fleet init` ran.
pub const ADMIN_KEY_FILE: &str = "fleet-admin.key";

/// How this node treats clients that connect over loopback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LocalClients {
    /// Trusted with everything, as the node's own operator (the default: a lone node on
    /// loopback stays zero-config).
    #[default]
    Open,
    /// Treated like any other client.
    Authenticated,
}

/// Who made a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A loopback client of a node whose local clients are open.
    Local,
    /// No credentials.
    Anonymous,
    /// A user of this node, by name.
    User(Name),
    /// A client with a fleet access token.
    Token(Verified<shoal_protocol::fleet::AccessToken>),
    /// A client with a bearer token this node issued: the principal, and what it may do where.
    Bearer(bearer::Claims),
}

impl Caller {
    /// The principal's name for the audit log.
    pub fn name(&self) -> String {
        match self {
            Caller::Local => "local".into(),
            Caller::Anonymous => "anonymous".into(),
            Caller::User(n) => format!("user:{n}"),
            Caller::Token(t) => format!("token:{}:{}", t.statement().principal, t.statement().id),
            Caller::Bearer(c) => c.principal.clone(),
        }
    }
}

/// Access settings of a node.
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    /// The fleet it belongs to, if any.
    pub fleet: Option<FleetConfig>,
    /// Per-node publisher trust rules (`--trust`, `trust.toml`).
    pub trust: Vec<TrustRule>,
    /// How loopback clients are treated.
    pub local_clients: LocalClients,
    /// Whether clients without credentials may pull public repositories.
    pub anonymous_pull: bool,
    /// The node's users.
    pub users: users::Users,
    /// Admin keys this node takes besides its fleet's (config `admins`, `--admin`): a local
    /// trust decision. Their policies, access tokens and join tickets count on this node only
    /// (other members refuse what they sign unless they list them too). Only in a fleet.
    pub admins: Vec<PublisherKey>,
    /// The operator allowed a registry beyond loopback without HTTPS or credentials: while the
    /// node has no credentials at all (no fleet, no users), every client is trusted like a
    /// local one.
    pub insecure: bool,
}

struct State {
    fleet: Option<FleetConfig>,
    /// This node's own proof, when it is a member.
    proof: Option<MemberProof>,
    policies: PolicySet,
    members: HashMap<PublisherKey, Verified<JoinTicket>>,
    rules: Vec<TrustRule>,
    users: users::Users,
    /// Admin keys from this node's config, besides the fleet's.
    local_admins: Vec<PublisherKey>,
}

impl State {
    /// Whether `key` is an admin for this node: one of its fleet's, or one its config adds.
    fn is_admin(&self, key: &PublisherKey) -> bool {
        self.fleet.as_ref().is_some_and(|f| f.admins.contains(key))
            || self.local_admins.contains(key)
    }

    /// The groups of `key` as this node knows them: enrolled by an admin, else named by the
    /// ticket it joined with (this node's own from its fleet config).
    fn groups(&self, key: &PublisherKey, own: &PublisherKey) -> Vec<Name> {
        if let Some(groups) = self.policies.enrolled(key) {
            return groups;
        }
        if let Some(t) = self.members.get(key) {
            return t.statement().groups.clone();
        }
        if key == own
            && let Some(ticket) = self.fleet.as_ref().and_then(|f| f.ticket.as_ref())
            && let Ok(t) = ticket.verify()
        {
            return t.statement().groups.clone();
        }
        Vec::new()
    }

    /// See [`Auth::member`].
    fn member(&self, key: &PublisherKey) -> Option<Member> {
        let fleet = self.fleet.as_ref()?;
        if self.policies.is_node_revoked(key) {
            return None;
        }
        let ticket = self.members.get(key).map(Verified::statement);
        let ticket_ok = ticket.is_some_and(|t| check_ticket(self, fleet, t, now_ms()).is_ok());
        if let Some(groups) = self.policies.enrolled(key) {
            // A revoked ticket revokes the nodes that joined with it, enrolled or not.
            let ticket_revoked =
                ticket.is_some_and(|t| self.policies.is_revoked(&Revoked::Ticket(t.id)));
            return (!ticket_revoked).then(|| Member {
                ticket: ticket.map(|t| t.id),
                groups,
                enrolled: true,
            });
        }
        ticket.filter(|_| ticket_ok).map(|t| Member {
            ticket: Some(t.id),
            groups: t.groups.clone(),
            enrolled: false,
        })
    }
}

struct Inner {
    key: SigningKey,
    /// A fleet admin's key, on the node that holds one.
    admin: RwLock<Option<SigningKey>>,
    state: RwLock<State>,
    local_clients: LocalClients,
    anonymous_pull: bool,
    insecure: bool,
    bearer: bearer::Issuer,
    changes: watch::Sender<u64>,
    /// The fleet's time, which records and policies are stamped and checked against.
    clock: crate::clock::FleetClock,
    /// The audit trail, once the node has one: policies accepted from anyone go in it.
    audit: std::sync::OnceLock<audit::Audit>,
}

/// Access decisions (cheap to clone).
#[derive(Clone)]
pub struct Auth {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth").finish_non_exhaustive()
    }
}

impl Auth {
    /// Access state for the node with `key`.
    pub fn new(key: SigningKey, config: AuthConfig) -> Auth {
        let proof = own_proof(&key, config.fleet.as_ref());
        let (changes, _) = watch::channel(0);
        Auth {
            inner: Arc::new(Inner {
                bearer: bearer::Issuer::new(key.clone()),
                key,
                admin: RwLock::new(None),
                state: RwLock::new(State {
                    fleet: config.fleet,
                    proof,
                    policies: PolicySet::default(),
                    members: HashMap::new(),
                    rules: config.trust,
                    users: config.users,
                    local_admins: config.admins,
                }),
                local_clients: config.local_clients,
                anonymous_pull: config.anonymous_pull,
                insecure: config.insecure,
                changes,
                clock: crate::clock::FleetClock::new(),
                audit: std::sync::OnceLock::new(),
            }),
        }
    }

    /// The fleet's time (see [`crate::clock`]): what this node stamps its records and policies
    /// with and checks others' against.
    pub fn clock(&self) -> &crate::clock::FleetClock {
        &self.inner.clock
    }

    /// Writes what access changes (policies accepted from an admin, a peer or a sync) to `audit`.
    pub fn set_audit(&self, audit: audit::Audit) {
        let _ = self.inner.audit.set(audit);
    }

    /// Records `entry` in the audit trail, if the node keeps one.
    pub fn audit(&self, entry: audit::Entry) {
        if let Some(a) = self.inner.audit.get() {
            a.record(entry);
        }
    }

    /// An open node's access: no fleet, no rules but its own key.
    pub fn open(key: SigningKey) -> Auth {
        Auth::new(key, AuthConfig::default())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.inner
            .state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.inner
            .state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn changed(&self) {
        self.inner.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Follows changes of the access state (a fleet joined, a policy or member applied, trust
    /// rules reloaded).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// This node's key.
    pub fn own_key(&self) -> PublisherKey {
        self.inner.key.public()
    }

    /// The fleet this node belongs to.
    pub fn fleet(&self) -> Option<FleetConfig> {
        self.read().fleet.clone()
    }

    /// Whether the node enforces fleet membership.
    pub fn in_fleet(&self) -> bool {
        self.read().fleet.is_some()
    }

    /// This node's proof of membership, to show its peers.
    pub fn own_proof(&self) -> Option<MemberProof> {
        self.read().proof.clone()
    }

    /// Joins (or replaces) the fleet at run time: peers are checked against it from now on.
    pub fn join(&self, fleet: FleetConfig) {
        {
            let mut state = self.write();
            state.proof = own_proof(&self.inner.key, Some(&fleet));
            state.fleet = Some(fleet);
            state.members.clear();
            state.policies = PolicySet::default();
        }
        self.changed();
    }

    /// Replaces the per-node trust rules (`shoal trust add` on a running node).
    pub fn set_trust_rules(&self, rules: Vec<TrustRule>) {
        self.write().rules = rules;
        self.changed();
    }

    /// The per-node trust rules.
    pub fn trust_rules(&self) -> Vec<TrustRule> {
        self.read().rules.clone()
    }

    /// Replaces the node's users (`shoal user add` on a running node).
    pub fn set_users(&self, users: users::Users) {
        self.write().users = users;
    }

    /// Checks a policy from a peer or an admin: signature, fleet, admin, clock skew.
    pub fn check_policy(&self, signed: &SignedPolicy) -> Result<Verified<Policy>, Refused> {
        let state = self.read();
        let fleet = state.fleet.as_ref().ok_or(Refused::NoFleet)?;
        let verified = signed.verify()?;
        let p = verified.statement();
        if p.fleet != fleet.id {
            return Err(Refused::OtherFleet);
        }
        if !state.is_admin(&p.admin) {
            return Err(Refused::NotAdmin);
        }
        let latest = self.clock().now_ms();
        if p.timestamp_ms > latest.saturating_add(MAX_CLOCK_SKEW.as_millis() as u64) {
            return Err(Refused::FromTheFuture);
        }
        Ok(verified)
    }

    /// Applies a checked policy; returns whether it became the current one for its key.
    pub fn apply_policy(&self, policy: Verified<Policy>) -> Applied {
        let applied = self.write().policies.apply(policy);
        if applied == Applied::Current {
            self.changed();
        }
        applied
    }

    /// The fleet's retention policies in force (none on an open node).
    pub fn retention(&self) -> crate::lifecycle::Retention {
        self.read()
            .policies
            .retention()
            .with_clock(self.clock().clone())
    }

    /// The current policies.
    pub fn policies(&self) -> PolicySet {
        self.read().policies.clone()
    }

    /// Checks a peer's membership proof at `now_ms`: the node's binding, the ticket's
    /// signature, fleet, admin, expiry and revocations. `peer`, if given, must be the key the
    /// proof is for (the key that the libp2p handshake proved).
    pub fn check_member(
        &self,
        proof: &MemberProof,
        peer: Option<&PublisherKey>,
        now_ms: u64,
    ) -> Result<Verified<JoinTicket>, Refused> {
        let state = self.read();
        let fleet = state.fleet.as_ref().ok_or(Refused::NoFleet)?;
        if peer.is_some_and(|p| *p != proof.node) {
            return Err(Refused::NotThePeer);
        }
        let ticket = proof.verify()?;
        check_ticket(&state, fleet, ticket.statement(), now_ms)?;
        if state.policies.is_node_revoked(&proof.node) {
            return Err(Refused::Revoked);
        }
        Ok(ticket)
    }

    /// Records a member whose proof was checked.
    pub fn add_member(&self, node: PublisherKey, ticket: Verified<JoinTicket>) {
        let new = self.write().members.insert(node, ticket.clone()).as_ref() != Some(&ticket);
        if new {
            self.changed();
        }
    }

    /// What the node knows of the member with `key`, if it is one now: enrolled by an admin,
    /// or holding a valid ticket; and not revoked.
    pub fn member(&self, key: &PublisherKey) -> Option<Member> {
        self.read().member(key)
    }

    /// Makes this node able to sign for the fleet with an admin key (the fleet's founder).
    pub fn set_admin_key(&self, key: SigningKey) {
        *self
            .inner
            .admin
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(key);
    }

    fn admin_key(&self) -> Option<SigningKey> {
        self.inner
            .admin
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Whether this node holds one of its fleet's admin keys.
    pub fn holds_admin_key(&self) -> bool {
        let Some(admin) = self.admin_key() else {
            return false;
        };
        self.fleet()
            .is_some_and(|f| f.admins.contains(&admin.public()))
    }

    /// Signs a policy with this node's admin key, newer than the current one for its key.
    /// `None` without an admin key of the fleet.
    pub fn sign_policy(&self, body: shoal_protocol::fleet::PolicyBody) -> Option<SignedPolicy> {
        let admin = self.admin_key()?;
        let fleet = self.fleet()?;
        let mut policy = Policy {
            fleet: fleet.id,
            body,
            timestamp_ms: now_ms(),
            sequence: 0,
            admin: admin.public(),
        };
        if let Some(current) = self.read().policies.get(&policy.key()) {
            let c = current.statement();
            if c.timestamp_ms >= policy.timestamp_ms {
                policy.timestamp_ms = c.timestamp_ms;
                policy.sequence = c.sequence.saturating_add(1);
            }
        }
        Signed::sign(&policy, &admin).ok()
    }

    /// A join ticket of this node's fleet for `groups`, valid for `ttl`. `None` without an
    /// admin key of the fleet.
    pub fn issue_ticket(&self, groups: Vec<Name>, ttl: Duration) -> Option<Signed<JoinTicket>> {
        let admin = self.admin_key()?;
        let fleet = self.fleet()?;
        let now = now_ms();
        let ticket = JoinTicket {
            fleet: fleet.id,
            id: ObjectId::from_bytes(rand::random()),
            groups,
            issued_ms: now,
            expires_ms: now.saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)),
            admin: admin.public(),
        };
        Signed::sign(&ticket, &admin).ok()
    }

    /// An access token of this node's fleet. `None` without an admin key of the fleet.
    pub fn issue_token(
        &self,
        principal: Name,
        scopes: Vec<shoal_protocol::fleet::Scope>,
        ttl: Duration,
    ) -> Option<Signed<shoal_protocol::fleet::AccessToken>> {
        let admin = self.admin_key()?;
        let fleet = self.fleet()?;
        let now = now_ms();
        let token = shoal_protocol::fleet::AccessToken {
            fleet: fleet.id,
            id: ObjectId::from_bytes(rand::random()),
            principal,
            scopes,
            issued_ms: now,
            expires_ms: now.saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)),
            admin: admin.public(),
        };
        Signed::sign(&token, &admin).ok()
    }

    /// Whether `caller` may use the node's admin API: a local client of an open node, or a
    /// principal with `admin` on every repository (a user, or an access token's scope).
    pub fn is_admin(&self, caller: &Caller) -> bool {
        let everything = shoal_protocol::fleet::RepoPattern::all();
        match caller {
            Caller::Local => true,
            Caller::Anonymous | Caller::Bearer(_) => false,
            Caller::User(name) => {
                let state = self.read();
                state.users.list().iter().any(|u| {
                    &u.name == name && u.repos == everything && u.actions.contains(Action::Admin)
                }) || state.policies.grants(now_ms()).any(|(_, g)| {
                    g.principal == Principal::User(name.clone())
                        && g.repos == everything
                        && g.actions.contains(Action::Admin)
                })
            }
            Caller::Token(t) => {
                let t = t.statement();
                now_ms() < t.expires_ms
                    && !self.read().policies.is_revoked(&Revoked::Token(t.id))
                    && t.scopes
                        .iter()
                        .any(|s| s.repos == everything && s.actions.contains(Action::Admin))
            }
        }
    }

    /// Whether a peer with `key` may talk to this node: any peer of an open node; a member of
    /// the fleet otherwise (this node itself always).
    pub fn admits(&self, key: &PublisherKey) -> bool {
        !self.in_fleet() || *key == self.own_key() || self.member(key).is_some()
    }

    /// The settings of `repo` (the defaults on an open node).
    pub fn settings(&self, repo: &RepoName) -> RepoSettings {
        self.read().policies.settings(repo)
    }

    /// Whether any repository is private (then serving peers needs a look at each repository).
    pub fn has_private_repos(&self) -> bool {
        self.read().policies.iter().any(|p| {
            matches!(
                &p.statement().body,
                shoal_protocol::fleet::PolicyBody::Repo {
                    settings: Some(RepoSettings {
                        visibility: Visibility::Private,
                        ..
                    }),
                    ..
                }
            )
        })
    }

    /// Whether the peer with `key` may be sent what `repo` holds: any admitted peer for a
    /// public repository; for a private one, a peer with a pull grant for it (as a node, or by
    /// one of its groups).
    pub fn peer_may_read(&self, key: &PublisherKey, repo: &RepoName) -> bool {
        if !self.admits(key) {
            return false;
        }
        if *key == self.own_key() {
            return true;
        }
        let state = self.read();
        state.policies.settings(repo).visibility == Visibility::Public
            || self.node_granted(&state, key, repo).contains(Action::Pull)
    }

    /// What the node with `key` may do to `repo` by grant: to itself as a node, or to one of
    /// its groups.
    fn node_granted(&self, state: &State, key: &PublisherKey, repo: &RepoName) -> Actions {
        let mut principals = vec![Principal::Node(*key)];
        principals.extend(
            state
                .groups(key, &self.own_key())
                .into_iter()
                .map(Principal::Group),
        );
        state.policies.granted(&principals, repo, now_ms())
    }

    /// Whether tag records signed with `key` count for `repo`: `action` is what the record
    /// does ([`record_action`]: `push` names a manifest, `delete` is a tombstone).
    ///
    /// A revoked node's never count; if the repository's settings list publishers, only
    /// theirs. Otherwise a key this node's trust rules name for the repository (a local
    /// decision); without a fleet, the node's own key; in a fleet, what [`Auth::fleet_accepts`]
    /// says every member decides.
    pub fn may_publish(&self, key: &PublisherKey, repo: &RepoName, action: Action) -> bool {
        let state = self.read();
        if state.policies.is_node_revoked(key) {
            return false;
        }
        let settings = state.policies.settings(repo);
        if !settings.publishers.is_empty() {
            return settings.publishers.contains(key);
        }
        if state.rules.iter().any(|r| &r.key == key && r.matches(repo)) {
            return true;
        }
        match state.fleet {
            None => *key == self.own_key(),
            Some(_) => self.fleet_rule(&state, key, repo, action, &settings),
        }
    }

    /// Whether the fleet's rules let records of `action` signed with `key` count for `repo`,
    /// whatever this node's own trust rules add: what every member decides, the same on each.
    /// The repository's listed publishers, if it lists any; otherwise any member (or this node)
    /// for a public repository, and for a private one only a member holding a grant of the
    /// action for it (as a node, or by one of its groups), so that a member without one, or
    /// a thief of its key, cannot move or delete a private repository's tags. Without a fleet
    /// there is no fleet rule: `true`.
    pub fn fleet_accepts(&self, key: &PublisherKey, repo: &RepoName, action: Action) -> bool {
        let state = self.read();
        if state.fleet.is_none() {
            return true;
        }
        if state.policies.is_node_revoked(key) {
            return false;
        }
        let settings = state.policies.settings(repo);
        if !settings.publishers.is_empty() {
            return settings.publishers.contains(key);
        }
        self.fleet_rule(&state, key, repo, action, &settings)
    }

    /// The fleet's rule for a repository that lists no publishers (see
    /// [`Auth::fleet_accepts`]).
    fn fleet_rule(
        &self,
        state: &State,
        key: &PublisherKey,
        repo: &RepoName,
        action: Action,
        settings: &RepoSettings,
    ) -> bool {
        if *key != self.own_key() && state.member(key).is_none() {
            return false;
        }
        settings.visibility == Visibility::Public
            || self.node_granted(state, key, repo).contains(action)
    }

    /// Whether `tag` of `repo` may move once it names a manifest.
    pub fn tag_is_mutable(&self, repo: &RepoName, tag: &Tag) -> bool {
        match self.settings(repo).tags {
            TagMutability::Mutable => true,
            rule @ TagMutability::Immutable(_) => rule.is_mutable(tag),
        }
    }

    /// Checks credentials a client sent. `loopback` says whether it connected over loopback.
    pub fn authenticate(&self, credentials: Credentials, loopback: bool) -> Result<Caller, Denied> {
        match credentials {
            Credentials::None
                if (loopback && self.inner.local_clients == LocalClients::Open)
                    || (self.inner.insecure && !self.has_credentials()) =>
            {
                Ok(Caller::Local)
            }
            Credentials::None => Ok(Caller::Anonymous),
            Credentials::Basic { user, password } => {
                if let Ok(token) =
                    Signed::<shoal_protocol::fleet::AccessToken>::from_text(&password)
                {
                    return self.check_token(&token).map(Caller::Token);
                }
                let name: Name = user.parse().map_err(|_| Denied::BadCredentials)?;
                let users = self.read().users.clone();
                if users.verify(&name, &password) {
                    Ok(Caller::User(name))
                } else {
                    Err(Denied::BadCredentials)
                }
            }
            Credentials::Bearer(text) => self
                .inner
                .bearer
                .verify(&text, now_ms())
                .filter(|claims| self.still_valid(&claims.principal))
                .map(Caller::Bearer)
                .ok_or(Denied::BadCredentials),
        }
    }

    /// Whether the credentials a bearer token was issued for still hold: its access token is
    /// not revoked since, its user not removed. A bearer token lives minutes, but a revocation
    /// must not wait for it to run out.
    fn still_valid(&self, principal: &str) -> bool {
        let state = self.read();
        if let Some(rest) = principal.strip_prefix("token:") {
            // `token:PRINCIPAL:ID`; a principal name holds no `:`.
            return rest
                .rsplit_once(':')
                .and_then(|(_, id)| id.parse::<shoal_protocol::fleet::ObjectId>().ok())
                .is_some_and(|id| !state.policies.is_revoked(&Revoked::Token(id)));
        }
        if let Some(name) = principal.strip_prefix("user:") {
            return state.users.list().iter().any(|u| u.name.as_str() == name);
        }
        true
    }

    /// Checks a fleet access token now: signature, fleet, admin, expiry, revocation.
    pub fn check_token(
        &self,
        token: &Signed<shoal_protocol::fleet::AccessToken>,
    ) -> Result<Verified<shoal_protocol::fleet::AccessToken>, Denied> {
        let state = self.read();
        let fleet = state.fleet.as_ref().ok_or(Denied::BadCredentials)?;
        let verified = token.verify().map_err(|_| Denied::BadCredentials)?;
        let t = verified.statement();
        if t.fleet != fleet.id || !state.is_admin(&t.admin) {
            return Err(Denied::BadCredentials);
        }
        if now_ms() >= t.expires_ms {
            return Err(Denied::Expired);
        }
        if state.policies.is_revoked(&Revoked::Token(t.id)) {
            return Err(Denied::BadCredentials);
        }
        Ok(verified)
    }

    /// What `caller` may do to `repo` now.
    pub fn allowed(&self, caller: &Caller, repo: &RepoName) -> Actions {
        let now = now_ms();
        let state = self.read();
        let public = state.policies.settings(repo).visibility == Visibility::Public;
        let pull_if_public = if public {
            Actions::of(&[Action::Pull])
        } else {
            Actions::NONE
        };
        match caller {
            Caller::Local => Actions::ALL,
            Caller::Anonymous if self.inner.anonymous_pull => pull_if_public,
            Caller::Anonymous => Actions::NONE,
            Caller::User(name) => state
                .users
                .allowed(name, repo)
                .union(
                    state
                        .policies
                        .granted(&[Principal::User(name.clone())], repo, now),
                )
                .union(pull_if_public),
            Caller::Token(token) => {
                let t = token.statement();
                if now >= t.expires_ms || state.policies.is_revoked(&Revoked::Token(t.id)) {
                    return Actions::NONE;
                }
                t.scopes
                    .iter()
                    .filter(|s| s.repos.matches(repo))
                    .fold(Actions::NONE, |acc, s| acc.union(s.actions))
                    .union(pull_if_public)
            }
            Caller::Bearer(claims) => claims.allowed(repo),
        }
    }

    /// Issues a bearer token for `caller`, covering `requested` scopes intersected with what
    /// the caller may do (the token endpoint). Returns the token and what it grants.
    pub fn issue_bearer(
        &self,
        caller: &Caller,
        requested: &[(RepoName, Actions)],
        ttl: Duration,
    ) -> (String, Vec<(RepoName, Actions)>) {
        let mut granted = Vec::new();
        let mut refused = Vec::new();
        for (repo, asked) in requested {
            let allowed = self.allowed(caller, repo);
            let given = asked.intersect(allowed);
            let denied = Actions::of(
                &asked
                    .iter()
                    .filter(|a| !allowed.contains(*a))
                    .collect::<Vec<_>>(),
            );
            if !given.is_empty() {
                granted.push((repo.clone(), given));
            }
            if !denied.is_empty() {
                refused.push((repo.clone(), denied));
            }
        }
        let token = self
            .inner
            .bearer
            .issue(caller.name(), &granted, &refused, now_ms(), ttl);
        (token, granted)
    }

    /// Whether any credentials are configured (users, or a fleet that issues tokens), so that
    /// a non-loopback listener is not open to the world.
    pub fn has_credentials(&self) -> bool {
        let state = self.read();
        state.fleet.is_some() || !state.users.is_empty()
    }
}

/// What a tag record does, as a grant names it: one naming a manifest pushes, a tombstone
/// (no target) deletes.
pub fn record_action(target: Option<&shoal_protocol::TagTarget>) -> Action {
    if target.is_some() {
        Action::Push
    } else {
        Action::Delete
    }
}

/// Checks a ticket against the node's fleet (`fleet`, its `state`'s) at `now_ms`.
fn check_ticket(
    state: &State,
    fleet: &FleetConfig,
    ticket: &JoinTicket,
    now_ms: u64,
) -> Result<(), Refused> {
    if ticket.fleet != fleet.id {
        return Err(Refused::OtherFleet);
    }
    if !state.is_admin(&ticket.admin) {
        return Err(Refused::NotAdmin);
    }
    if now_ms >= ticket.expires_ms {
        return Err(Refused::Expired);
    }
    if state.policies.is_revoked(&Revoked::Ticket(ticket.id)) {
        return Err(Refused::Revoked);
    }
    Ok(())
}

fn own_proof(key: &SigningKey, fleet: Option<&FleetConfig>) -> Option<MemberProof> {
    let ticket = fleet?.ticket.clone()?;
    MemberProof::new(ticket, key).ok()
}

/// Credentials a client sent.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// None.
    None,
    /// `Authorization: Basic`: a user name and a password (a user's password, or a fleet access
    /// token).
    Basic {
        /// The user name (ignored for an access token).
        user: String,
        /// The password or token.
        password: String,
    },
    /// `Authorization: Bearer`: a token this node issued.
    Bearer(String),
}

impl std::fmt::Debug for Credentials {
    /// Never shows a secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::None => f.write_str("Credentials::None"),
            Credentials::Basic { user, .. } => write!(f, "Credentials::Basic({user}, …)"),
            Credentials::Bearer(_) => f.write_str("Credentials::Bearer(…)"),
        }
    }
}

/// Why a client's credentials did not authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// Wrong user, password or token.
    #[error("authentication failed")]
    BadCredentials,
    /// The token has expired.
    #[error("the token has expired")]
    Expired,
}

#[cfg(test)]
mod tests;
