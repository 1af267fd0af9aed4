//! What makes a fleet: its admins, and the statements they sign.
//!
//! A fleet is defined by its admin keys, not by who happens to be reachable. Admins sign three
//! kinds of statements, each a [`Signed`] envelope over exact bytes (like tag records, with a
//! signing domain of its own per kind, so a signature over one kind can never pass for another):
//!
//! - [`JoinTicket`]: lets a node join. A node proves membership to each peer right after the
//!   libp2p handshake with a [`MemberProof`]: an unexpired, unrevoked ticket of the fleet plus
//!   the node's own signature binding the ticket to its key (the handshake already proved that
//!   the peer holds that key). A [`JoinToken`] is what an operator copies to a new node: the
//!   fleet's id and admin keys, bootstrap addresses and a ticket, as one line of text.
//! - [`Policy`]: repository settings (visibility, tag mutability, allowed publishers), grants
//!   (principal × repository pattern × actions, with an expiry), revocations (of a token, a
//!   ticket, a node) and retention policies (ECR lifecycle-policy JSON, by repository pattern). Policies travel like tag records (gossip and anti-entropy); among policies
//!   with the same [`PolicyKey`] the highest [`Policy::order_key`] wins, so every node that holds
//!   the same policies agrees, whatever order they arrived in, and a replayed old policy changes
//!   nothing.
//! - [`AccessToken`]: a client credential (`docker login` password) with scopes and an expiry,
//!   which every node of the fleet verifies offline.
//!
//! Every statement names its [`FleetId`], so one fleet's statements never count in another even
//! if an admin key is shared. [`Signed::verify`] checks the signature, that the payload decodes
//! canonically, that the signer is the key the statement names, and the statement's limits; it
//! is the only way to a [`Verified`] statement. Whether the signer is an admin of *this* fleet,
//! and whether the statement has expired, is for the node to decide, with its clock: this crate
//! reads no clock.

use std::fmt;
use std::marker::PhantomData;
use std::str::FromStr;

use base64::Engine as _;
use ed25519_dalek::Signer as _;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::codec;
use crate::name::{RepoName, Tag};
use crate::record::{PublisherKey, SigningKey};

/// The largest signed payload of any fleet statement.
pub const MAX_STATEMENT_PAYLOAD_BYTES: usize = 16 * 1024;
/// Most entries in any list a statement holds (groups, scopes, publishers, exclusions, admins,
/// bootstrap addresses).
pub const MAX_LIST_ENTRIES: usize = 64;
/// The longest name (principal, group, grant id), in bytes.
pub const MAX_NAME_BYTES: usize = 64;
/// The longest bootstrap address in a join token, in bytes.
pub const MAX_ADDRESS_BYTES: usize = 256;

/// Why a fleet statement, token or pattern is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FleetError {
    /// The signature does not verify with the signer's key.
    #[error("bad signature")]
    BadSignature,
    /// The statement names another signer than the key that signed it.
    #[error("the statement names another signer than the key that signed it")]
    SignerMismatch,
    /// The payload is not the canonical encoding of a statement of this kind.
    #[error("bad statement payload: {0}")]
    Decode(String),
    /// The statement could not be encoded.
    #[error("statement cannot be encoded: {0}")]
    Encode(String),
    /// A size or count limit is exceeded, or a field is malformed.
    #[error("statement limit: {0}")]
    Limit(String),
    /// Not a repository pattern: `*`, `name/*` or a repository name.
    #[error("{0:?} is not a repository pattern ('*', 'name/*' or a repository name)")]
    Pattern(String),
    /// Not a tag pattern: a tag, optionally ending in `*`.
    #[error("{0:?} is not a tag pattern (a tag, optionally ending in '*')")]
    TagPattern(String),
    /// Not a list of actions (`pull`, `push`, `delete`, `admin`).
    #[error("{0:?} is not a list of actions (pull, push, delete, admin)")]
    Actions(String),
    /// Not a name: 1 to 64 of `[a-z0-9._-]`, starting with a letter or digit.
    #[error("{0:?} is not a name (1 to 64 of a-z 0-9 . _ -, starting with a letter or digit)")]
    Name(String),
    /// Not a token or join token in its text form.
    #[error("not a {0}")]
    Text(&'static str),
    /// A lifecycle policy that is too long or not valid; the text says why.
    #[error("{0}")]
    Lifecycle(String),
}

/// A fleet's identity: derived from its founding admin key, fixed for the fleet's life.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct FleetId(#[serde(with = "crate::codec::fixed_bytes")] [u8; 32]);

impl FleetId {
    /// The id of the fleet founded with `admin`.
    pub fn founded_by(admin: &PublisherKey) -> FleetId {
        FleetId(blake3::derive_key("shoal fleet id v1", admin.as_bytes()))
    }

    /// The raw id.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for FleetId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "fleet:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for FleetId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FleetId({})", hex::encode(&self.0[..8]))
    }
}

impl FromStr for FleetId {
    type Err = FleetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex = s.strip_prefix("fleet:").unwrap_or(s);
        codec::decode_hex_lower(hex)
            .map(FleetId)
            .ok_or(FleetError::Text("fleet id (fleet:<64 hex>)"))
    }
}

/// A random 16-byte id naming a ticket or a token, so that it can be revoked.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObjectId(#[serde(with = "crate::codec::fixed_bytes")] [u8; 16]);

impl ObjectId {
    /// The id with these bytes (from a CSPRNG when a new object is made).
    pub fn from_bytes(bytes: [u8; 16]) -> ObjectId {
        ObjectId(bytes)
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ObjectId({self})")
    }
}

impl FromStr for ObjectId {
    type Err = FleetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        codec::decode_hex_lower(s)
            .map(ObjectId)
            .ok_or(FleetError::Text("object id (32 lowercase hex)"))
    }
}

/// Which repositories a grant, scope or setting covers: `*` (all), `name/*` (every repository
/// under `name/`, at any depth) or one repository name.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RepoPattern(String);

impl RepoPattern {
    /// The pattern that covers every repository.
    pub fn all() -> RepoPattern {
        RepoPattern("*".into())
    }

    /// Whether the pattern covers `repo`.
    pub fn matches(&self, repo: &RepoName) -> bool {
        let r = repo.as_str();
        if self.0 == "*" {
            return true;
        }
        match self.0.strip_suffix("/*") {
            Some(prefix) => r
                .strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with('/')),
            None => r == self.0,
        }
    }

    /// How specific the pattern is, for picking the setting that applies to a repository when
    /// several match: an exact name beats any prefix, a longer prefix a shorter one, and `*`
    /// comes last.
    pub fn specificity(&self) -> (u8, usize) {
        match self.0.strip_suffix("/*") {
            _ if self.0 == "*" => (0, 0),
            Some(prefix) => (1, prefix.len()),
            None => (2, self.0.len()),
        }
    }

    /// The pattern as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for RepoPattern {
    type Err = FleetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let valid = s == "*"
            || s.strip_suffix("/*")
                .map_or_else(|| RepoName::is_valid(s), RepoName::is_valid);
        if valid {
            Ok(RepoPattern(s.to_owned()))
        } else {
            Err(FleetError::Pattern(s.to_owned()))
        }
    }
}

impl TryFrom<String> for RepoPattern {
    type Error = FleetError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<RepoPattern> for String {
    fn from(p: RepoPattern) -> String {
        p.0
    }
}

impl fmt::Display for RepoPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RepoPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RepoPattern({})", self.0)
    }
}

/// Tags an immutability rule leaves mutable: a tag, or a prefix ending in `*` (`latest`,
/// `dev-*`), as ECR's exclusion filters.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TagPattern(String);

impl TagPattern {
    /// Whether the pattern covers `tag`.
    pub fn matches(&self, tag: &Tag) -> bool {
        match self.0.strip_suffix('*') {
            Some(prefix) => tag.as_str().starts_with(prefix),
            None => tag.as_str() == self.0,
        }
    }
}

impl FromStr for TagPattern {
    type Err = FleetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let body = s.strip_suffix('*').unwrap_or(s);
        if body.is_empty() && s == "*" || Tag::is_valid(body) {
            Ok(TagPattern(s.to_owned()))
        } else {
            Err(FleetError::TagPattern(s.to_owned()))
        }
    }
}

impl TryFrom<String> for TagPattern {
    type Error = FleetError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<TagPattern> for String {
    fn from(p: TagPattern) -> String {
        p.0
    }
}

impl fmt::Display for TagPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TagPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TagPattern({})", self.0)
    }
}

/// A principal's or a group's name: 1 to [`MAX_NAME_BYTES`] of `[a-z0-9._-]`, starting with a
/// letter or digit.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Name(String);

impl Name {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Name {
    type Err = FleetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b);
        let valid = s.len() <= MAX_NAME_BYTES
            && s.as_bytes()
                .first()
                .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            && s.bytes().all(ok);
        if valid {
            Ok(Name(s.to_owned()))
        } else {
            Err(FleetError::Name(s.to_owned()))
        }
    }
}

impl TryFrom<String> for Name {
    type Error = FleetError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Name> for String {
    fn from(n: Name) -> String {
        n.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Name({})", self.0)
    }
}

/// One thing a principal may do to a repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Read manifests, blobs and tags.
    Pull,
    /// Upload blobs, push manifests, move tags.
    Push,
    /// Delete manifests, tags and blobs.
    Delete,
    /// Change the repository's settings and grants (fleet admins only hold it by key; a grant
    /// can hand it to a principal for the admin API of a node).
    Admin,
}

impl Action {
    const ALL: [(Action, &'static str, u8); 4] = [
        (Action::Pull, "pull", 1),
        (Action::Push, "push", 2),
        (Action::Delete, "delete", 4),
        (Action::Admin, "admin", 8),
    ];

    fn bit(self) -> u8 {
        Action::ALL
            .iter()
            .find(|(a, _, _)| *a == self)
            .map_or(0, |(_, _, b)| *b)
    }

    /// The action's name, as in a scope (`pull`).
    pub fn as_str(self) -> &'static str {
        Action::ALL
            .iter()
            .find(|(a, _, _)| *a == self)
            .map_or("", |(_, n, _)| n)
    }
}

/// A set of [`Action`]s. Text form `pull,push`; `*` is every action.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub struct Actions(u8);

impl Actions {
    /// No action.
    pub const NONE: Actions = Actions(0);
    /// Every action.
    pub const ALL: Actions = Actions(15);

    /// The set of `actions`.
    pub fn of(actions: &[Action]) -> Actions {
        Actions(actions.iter().fold(0, |acc, a| acc | a.bit()))
    }

    /// Whether `action` is in the set.
    pub fn contains(self, action: Action) -> bool {
        self.0 & action.bit() != 0
    }

    /// The actions in both sets.
    pub fn intersect(self, other: Actions) -> Actions {
        Actions(self.0 & other.0)
    }

    /// The actions in either set.
    pub fn union(self, other: Actions) -> Actions {
        Actions(self.0 | other.0)
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The actions, in the order pull, push, delete, admin.
    pub fn iter(self) -> impl Iterator<Item = Action> {
        Action::ALL
            .into_iter()
            .filter(move |(_, _, b)| self.0 & b != 0)
            .map(|(a, _, _)| a)
    }
}

impl TryFrom<u8> for Actions {
    type Error = FleetError;
    fn try_from(bits: u8) -> Result<Self, Self::Error> {
        if bits & !Actions::ALL.0 == 0 {
            Ok(Actions(bits))
        } else {
            Err(FleetError::Actions(format!("bits {bits:#x}")))
        }
    }
}

impl From<Actions> for u8 {
    fn from(a: Actions) -> u8 {
        a.0
    }
}

impl FromStr for Actions {
    type Err = FleetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim() == "*" {
            return Ok(Actions::ALL);
        }
        let mut out = Actions::NONE;
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (action, _, _) = Action::ALL
                .iter()
                .find(|(_, n, _)| *n == part)
                .ok_or_else(|| FleetError::Actions(s.to_owned()))?;
            out = out.union(Actions::of(&[*action]));
        }
        if out.is_empty() {
            return Err(FleetError::Actions(s.to_owned()));
        }
        Ok(out)
    }
}

impl fmt::Display for Actions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.iter().map(Action::as_str).collect();
        f.write_str(&names.join(","))
    }
}

impl fmt::Debug for Actions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Actions({self})")
    }
}

/// A kind of statement that travels in a [`Signed`] envelope.
pub trait Statement: Serialize + DeserializeOwned {
    /// The signing domain: the protocol, the kind of statement and its version, ending in NUL.
    const DOMAIN: &'static [u8];
    /// The key that must have signed the statement.
    fn signer(&self) -> &PublisherKey;
    /// Checks the statement's limits and shape.
    fn validate(&self) -> Result<(), FleetError>;
}

/// A statement as signed bytes: the signer's key, the statement's codec encoding (the payload)
/// and an ed25519 signature over the statement kind's domain followed by the payload. Not
/// trusted until [`verify`](Self::verify)d.
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
pub struct Signed<T> {
    signer: PublisherKey,
    #[serde(with = "crate::codec::byte_buf")]
    payload: Vec<u8>,
    #[serde(with = "crate::codec::fixed_bytes")]
    signature: [u8; 64],
    #[serde(skip)]
    kind: PhantomData<fn() -> T>,
}

impl<T> Clone for Signed<T> {
    fn clone(&self) -> Self {
        Signed {
            signer: self.signer,
            payload: self.payload.clone(),
            signature: self.signature,
            kind: PhantomData,
        }
    }
}

impl<T> PartialEq for Signed<T> {
    fn eq(&self, other: &Self) -> bool {
        self.signer == other.signer
            && self.payload == other.payload
            && self.signature == other.signature
    }
}

impl<T> Eq for Signed<T> {}

impl<T> fmt::Debug for Signed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signed")
            .field("signer", &self.signer)
            .field("payload_bytes", &self.payload.len())
            .finish_non_exhaustive()
    }
}

fn message(domain: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(domain.len() + payload.len());
    m.extend_from_slice(domain);
    m.extend_from_slice(payload);
    m
}

impl<T: Statement> Signed<T> {
    /// Signs `statement` with `key`, which must be the key the statement names. The limits are
    /// checked first, so whatever is signed will verify.
    pub fn sign(statement: &T, key: &SigningKey) -> Result<Signed<T>, FleetError> {
        if statement.signer() != &key.public() {
            return Err(FleetError::SignerMismatch);
        }
        statement.validate()?;
        let payload = codec::encode(statement).map_err(|e| FleetError::Encode(e.describe()))?;
        if payload.len() > MAX_STATEMENT_PAYLOAD_BYTES {
            return Err(FleetError::Limit(format!(
                "payload of {} bytes, more than {MAX_STATEMENT_PAYLOAD_BYTES}",
                payload.len()
            )));
        }
        let signature = key
            .0
            .try_sign(&message(T::DOMAIN, &payload))
            .map_err(|e| FleetError::Encode(e.to_string()))?;
        Ok(Signed {
            signer: key.public(),
            payload,
            signature: signature.to_bytes(),
            kind: PhantomData,
        })
    }

    /// Checks the signature (before decoding anything), the canonical encoding, the signer and
    /// the limits, and returns the trusted form.
    pub fn verify(&self) -> Result<Verified<T>, FleetError> {
        if self.payload.len() > MAX_STATEMENT_PAYLOAD_BYTES {
            return Err(FleetError::Limit("payload too large".into()));
        }
        let key = ed25519_dalek::VerifyingKey::from_bytes(self.signer.as_bytes())
            .map_err(|_| FleetError::BadSignature)?;
        let signature = ed25519_dalek::Signature::from_bytes(&self.signature);
        key.verify_strict(&message(T::DOMAIN, &self.payload), &signature)
            .map_err(|_| FleetError::BadSignature)?;
        let statement: T =
            codec::decode(&self.payload).map_err(|e| FleetError::Decode(e.describe()))?;
        if statement.signer() != &self.signer {
            return Err(FleetError::SignerMismatch);
        }
        let canonical = codec::encode(&statement).map_err(|e| FleetError::Encode(e.describe()))?;
        if canonical != self.payload {
            return Err(FleetError::Decode(
                "payload is not canonically encoded".into(),
            ));
        }
        statement.validate()?;
        Ok(Verified {
            statement,
            signed: self.clone(),
        })
    }

    /// The key the envelope claims it was signed with (unverified until `verify`).
    pub fn signer(&self) -> PublisherKey {
        self.signer
    }

    /// A stable id: BLAKE3 of the envelope's codec encoding.
    pub fn id(&self) -> [u8; 32] {
        let encoded = codec::encode(self).unwrap_or_default();
        *blake3::hash(&encoded).as_bytes()
    }
}

/// A statement whose signature, signer, encoding and limits have been checked. Only
/// [`Signed::verify`] makes one; store and send the [`signed`](Self::signed) form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified<T> {
    statement: T,
    signed: Signed<T>,
}

impl<T> Verified<T> {
    /// The statement.
    pub fn statement(&self) -> &T {
        &self.statement
    }

    /// The signed form it was verified from.
    pub fn signed(&self) -> &Signed<T> {
        &self.signed
    }

    /// The signed form, consuming the verified one.
    pub fn into_signed(self) -> Signed<T> {
        self.signed
    }
}

fn check_list<T>(what: &str, list: &[T]) -> Result<(), FleetError> {
    if list.len() > MAX_LIST_ENTRIES {
        return Err(FleetError::Limit(format!(
            "{} {what}, more than {MAX_LIST_ENTRIES}",
            list.len()
        )));
    }
    Ok(())
}

/// Who a grant is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Principal {
    /// A client that logged in as this user (a node's user, or the principal of an access
    /// token).
    User(Name),
    /// One node, by its key (the key of its peer id).
    Node(PublisherKey),
    /// Every node whose join ticket names this group.
    Group(Name),
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::User(n) => write!(f, "user:{n}"),
            Principal::Node(k) => write!(f, "node:{k}"),
            Principal::Group(g) => write!(f, "group:{g}"),
        }
    }
}

impl FromStr for Principal {
    type Err = FleetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            Some(("user", n)) => Ok(Principal::User(n.parse()?)),
            Some(("group", g)) => Ok(Principal::Group(g.parse()?)),
            Some(("node", k)) => k
                .parse()
                .map(Principal::Node)
                .map_err(|_| FleetError::Text("node key (node:ed25519:<64 hex>)")),
            _ => Err(FleetError::Text(
                "principal (user:NAME, group:NAME or node:ed25519:KEY)",
            )),
        }
    }
}

/// Who may see a repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Visibility {
    /// Every member node, and clients with a pull grant (or anonymous clients where a node's
    /// operator allows them).
    #[default]
    Public,
    /// Only nodes and clients with a pull grant: a node without one is sent nothing of it.
    Private,
}

/// Whether a repository's tags may move.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum TagMutability {
    /// A tag may be pointed at another manifest.
    #[default]
    Mutable,
    /// A tag, once it names a manifest, names it until it is deleted; except the tags that
    /// match one of these patterns.
    Immutable(Vec<TagPattern>),
}

impl TagMutability {
    /// Whether `tag` may move.
    pub fn is_mutable(&self, tag: &Tag) -> bool {
        match self {
            TagMutability::Mutable => true,
            TagMutability::Immutable(except) => except.iter().any(|p| p.matches(tag)),
        }
    }
}

/// Settings for the repositories a pattern covers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct RepoSettings {
    /// Who may see them.
    pub visibility: Visibility,
    /// Whether their tags may move.
    pub tags: TagMutability,
    /// Which keys may sign tag records for them; empty: any member of the fleet.
    pub publishers: Vec<PublisherKey>,
}

/// What a principal may do, where, until when.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Grant {
    /// Who.
    pub principal: Principal,
    /// Which repositories.
    pub repos: RepoPattern,
    /// What.
    pub actions: Actions,
    /// Until when, milliseconds since the Unix epoch; `None`: until revoked.
    pub expires_ms: Option<u64>,
}

/// Something revoked for good.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Revoked {
    /// An access token, by id.
    Token(ObjectId),
    /// A join ticket, by id: nodes that joined with it are members no more.
    Ticket(ObjectId),
    /// A node, by key: it is a member no more, and its tag records are not trusted.
    Node(PublisherKey),
}

/// What a policy says.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PolicyBody {
    /// The settings of the repositories `pattern` covers; `None` withdraws earlier settings.
    Repo {
        /// Which repositories.
        pattern: RepoPattern,
        /// Their settings.
        settings: Option<RepoSettings>,
    },
    /// A grant, named so that it can be replaced or withdrawn; `None` withdraws it.
    Grant {
        /// The grant's name.
        id: Name,
        /// The grant.
        grant: Option<Grant>,
    },
    /// A revocation. It cannot be withdrawn.
    Revoke(Revoked),
    /// Enrols a node as a member for as long as it is not revoked, whatever its join ticket's
    /// expiry (a node holding an admin key enrols the nodes that join with a ticket, so a
    /// ticket's expiry bounds only when new nodes may join).
    Member {
        /// The node.
        node: PublisherKey,
        /// Its groups.
        groups: Vec<Name>,
    },
    /// The retention policy of the repositories `pattern` covers, in Amazon ECR's
    /// lifecycle-policy JSON (see [`crate::lifecycle`]), kept as its text; `None` withdraws it.
    /// Where several patterns cover a repository, the most specific one's policy applies.
    Lifecycle {
        /// Which repositories.
        pattern: RepoPattern,
        /// The policy's JSON text: valid, at most
        /// [`MAX_POLICY_BYTES`](crate::lifecycle::MAX_POLICY_BYTES).
        policy: Option<String>,
    },
}

impl PolicyBody {
    /// Checks the body's limits and shape: list lengths, and that a lifecycle policy is short
    /// enough and valid. A signed policy is checked on signing and on every
    /// [`verify`](Signed::verify), so an invalid one is refused wherever it comes from.
    pub fn validate(&self) -> Result<(), FleetError> {
        match self {
            PolicyBody::Repo {
                settings: Some(s), ..
            } => {
                check_list("publishers", &s.publishers)?;
                if let TagMutability::Immutable(except) = &s.tags {
                    check_list("tag exclusions", except)?;
                }
                Ok(())
            }
            PolicyBody::Member { groups, .. } => check_list("groups", groups),
            PolicyBody::Lifecycle {
                policy: Some(text), ..
            } => crate::lifecycle::LifecyclePolicy::from_json(text)
                .map(|_| ())
                .map_err(|e| FleetError::Lifecycle(e.to_string())),
            PolicyBody::Repo { settings: None, .. }
            | PolicyBody::Grant { .. }
            | PolicyBody::Revoke(_)
            | PolicyBody::Lifecycle { policy: None, .. } => Ok(()),
        }
    }

    /// The retention policy the body sets, if it is a lifecycle policy that sets one (parsed
    /// again: a body that passed [`validate`](Self::validate) always parses).
    pub fn lifecycle(&self) -> Option<(&RepoPattern, crate::lifecycle::LifecyclePolicy)> {
        match self {
            PolicyBody::Lifecycle {
                pattern,
                policy: Some(text),
            } => crate::lifecycle::LifecyclePolicy::from_json(text)
                .ok()
                .map(|p| (pattern, p)),
            _ => None,
        }
    }
}

/// What a policy is about: among policies with the same key, the newest wins.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PolicyKey(String);

impl PolicyKey {
    /// The key as text (`repo/team/*`, `grant/ci`, `revoke/token/<id>`).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key from its text form (as stored); not validated beyond being text.
    pub fn from_text(s: &str) -> PolicyKey {
        PolicyKey(s.to_owned())
    }
}

impl fmt::Display for PolicyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A statement by a fleet admin.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Policy {
    /// The fleet it is for.
    pub fleet: FleetId,
    /// What it says.
    pub body: PolicyBody,
    /// When the admin made it, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// Breaks ties between policies with the same key and time.
    pub sequence: u64,
    /// The admin who signed it.
    pub admin: PublisherKey,
}

impl Policy {
    /// What the policy is about.
    pub fn key(&self) -> PolicyKey {
        PolicyKey(match &self.body {
            PolicyBody::Repo { pattern, .. } => format!("repo/{pattern}"),
            PolicyBody::Grant { id, .. } => format!("grant/{id}"),
            PolicyBody::Revoke(Revoked::Token(id)) => format!("revoke/token/{id}"),
            PolicyBody::Revoke(Revoked::Ticket(id)) => format!("revoke/ticket/{id}"),
            PolicyBody::Revoke(Revoked::Node(k)) => format!("revoke/node/{k}"),
            PolicyBody::Member { node, .. } => format!("member/{node}"),
            PolicyBody::Lifecycle { pattern, .. } => format!("lifecycle/{pattern}"),
        })
    }

    /// Orders policies with the same key: the highest wins.
    pub fn order_key(&self) -> (u64, u64, PublisherKey) {
        (self.timestamp_ms, self.sequence, self.admin)
    }
}

impl Statement for Policy {
    const DOMAIN: &'static [u8] = b"shoal fleet policy v1\0";

    fn signer(&self) -> &PublisherKey {
        &self.admin
    }

    fn validate(&self) -> Result<(), FleetError> {
        self.body.validate()
    }
}

/// A signed policy, as it is gossiped, synced and stored.
pub type SignedPolicy = Signed<Policy>;

/// One repository pattern and what may be done there, as a token's scope.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Scope {
    /// Which repositories.
    pub repos: RepoPattern,
    /// What.
    pub actions: Actions,
}

/// A client credential signed by a fleet admin: whoever presents it (as a password) may do what
/// its scopes say until it expires or is revoked.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AccessToken {
    /// The fleet it is for.
    pub fleet: FleetId,
    /// Its id, for revocation and the audit log.
    pub id: ObjectId,
    /// Who it was made for (the audit log's principal).
    pub principal: Name,
    /// What it allows.
    pub scopes: Vec<Scope>,
    /// When it was made, milliseconds since the Unix epoch.
    pub issued_ms: u64,
    /// When it stops working.
    pub expires_ms: u64,
    /// The admin who signed it.
    pub admin: PublisherKey,
}

impl Statement for AccessToken {
    const DOMAIN: &'static [u8] = b"shoal access token v1\0";

    fn signer(&self) -> &PublisherKey {
        &self.admin
    }

    fn validate(&self) -> Result<(), FleetError> {
        check_list("scopes", &self.scopes)?;
        if self.expires_ms < self.issued_ms {
            return Err(FleetError::Limit("expires before it was issued".into()));
        }
        Ok(())
    }
}

/// Text forms of signed statements: a prefix naming the kind, then base64url (no padding) of
/// the envelope's codec encoding. One line, no characters a shell or a password field minds.
fn to_text<T: Serialize>(prefix: &str, value: &T) -> String {
    let bytes = codec::encode(value).unwrap_or_default();
    format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

fn from_text<T: DeserializeOwned>(
    prefix: &str,
    what: &'static str,
    s: &str,
) -> Result<T, FleetError> {
    let body = s
        .trim()
        .strip_prefix(prefix)
        .ok_or(FleetError::Text(what))?;
    // Bounded before decoding: no text longer than a statement can be becomes an allocation.
    if body.len() > 4 * MAX_STATEMENT_PAYLOAD_BYTES {
        return Err(FleetError::Text(what));
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(body)
        .map_err(|_| FleetError::Text(what))?;
    codec::decode(&bytes).map_err(|_| FleetError::Text(what))
}

/// Prefix of an access token's text form.
pub const ACCESS_TOKEN_PREFIX: &str = "shoal1.";

impl Signed<AccessToken> {
    /// The token as a password: `shoal1.` and base64url.
    pub fn to_text(&self) -> String {
        to_text(ACCESS_TOKEN_PREFIX, self)
    }

    /// Parses the text form (unverified).
    pub fn from_text(s: &str) -> Result<Signed<AccessToken>, FleetError> {
        from_text(ACCESS_TOKEN_PREFIX, "shoal access token", s)
    }
}

/// Lets a node join a fleet; signed by a fleet admin.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct JoinTicket {
    /// The fleet.
    pub fleet: FleetId,
    /// Its id, for revocation.
    pub id: ObjectId,
    /// Groups the nodes that join with it belong to (for grants to a group).
    pub groups: Vec<Name>,
    /// When it was made, milliseconds since the Unix epoch.
    pub issued_ms: u64,
    /// When it stops working (for joining, and as a membership proof).
    pub expires_ms: u64,
    /// The admin who signed it.
    pub admin: PublisherKey,
}

impl Statement for JoinTicket {
    const DOMAIN: &'static [u8] = b"shoal join ticket v1\0";

    fn signer(&self) -> &PublisherKey {
        &self.admin
    }

    fn validate(&self) -> Result<(), FleetError> {
        check_list("groups", &self.groups)?;
        if self.expires_ms < self.issued_ms {
            return Err(FleetError::Limit("expires before it was issued".into()));
        }
        Ok(())
    }
}

/// Domain of a node's signature binding a ticket to its key.
const MEMBER_DOMAIN: &[u8] = b"shoal member v1\0";

/// A node's proof of membership: a join ticket, and the node's signature binding it to its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberProof {
    /// The ticket the node joined with.
    pub ticket: Signed<JoinTicket>,
    /// The node's key (its peer id's key).
    pub node: PublisherKey,
    #[serde(with = "crate::codec::fixed_bytes")]
    signature: [u8; 64],
}

impl MemberProof {
    fn bound(ticket: &Signed<JoinTicket>, node: &PublisherKey) -> Vec<u8> {
        let mut m = MEMBER_DOMAIN.to_vec();
        m.extend_from_slice(&ticket.id());
        m.extend_from_slice(node.as_bytes());
        m
    }

    /// Binds `ticket` to `key`, the node's own key.
    pub fn new(ticket: Signed<JoinTicket>, key: &SigningKey) -> Result<MemberProof, FleetError> {
        let node = key.public();
        let signature = key
            .0
            .try_sign(&MemberProof::bound(&ticket, &node))
            .map_err(|e| FleetError::Encode(e.to_string()))?;
        Ok(MemberProof {
            ticket,
            node,
            signature: signature.to_bytes(),
        })
    }

    /// Checks the node's binding signature and the ticket's signature, and returns the ticket.
    /// Whether the ticket's admin belongs to the fleet, whether it expired or was revoked, and
    /// whether `node` is the peer that sent the proof, the caller checks.
    pub fn verify(&self) -> Result<Verified<JoinTicket>, FleetError> {
        let key = ed25519_dalek::VerifyingKey::from_bytes(self.node.as_bytes())
            .map_err(|_| FleetError::BadSignature)?;
        let signature = ed25519_dalek::Signature::from_bytes(&self.signature);
        key.verify_strict(&MemberProof::bound(&self.ticket, &self.node), &signature)
            .map_err(|_| FleetError::BadSignature)?;
        self.ticket.verify()
    }
}

/// Prefix of a join token's text form.
pub const JOIN_TOKEN_PREFIX: &str = "shoaljoin1.";

/// What a new node needs to join a fleet, as one line of text: `shoal node --join TOKEN`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    /// The fleet.
    pub fleet: FleetId,
    /// Its admin keys: whose policies, tokens and tickets count.
    pub admins: Vec<PublisherKey>,
    /// Where to find members (multiaddresses, `/p2p/<peer id>` included).
    pub bootstrap: Vec<String>,
    /// The ticket the node joins with.
    pub ticket: Signed<JoinTicket>,
}

impl JoinToken {
    /// The token's text form.
    pub fn to_text(&self) -> String {
        to_text(JOIN_TOKEN_PREFIX, self)
    }

    /// Parses a token (the ticket is not verified here; bounds are).
    pub fn from_text(s: &str) -> Result<JoinToken, FleetError> {
        let token: JoinToken = from_text(JOIN_TOKEN_PREFIX, "shoal join token", s)?;
        check_list("admins", &token.admins)?;
        check_list("bootstrap addresses", &token.bootstrap)?;
        if token.bootstrap.iter().any(|a| a.len() > MAX_ADDRESS_BYTES) {
            return Err(FleetError::Limit("bootstrap address too long".into()));
        }
        if token.admins.is_empty() {
            return Err(FleetError::Limit("a fleet has at least one admin".into()));
        }
        Ok(token)
    }
}

/// One item of the fleet's shared state, as synced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FleetItem {
    /// A policy.
    Policy(SignedPolicy),
    /// A member's proof.
    Member(MemberProof),
}

impl FleetItem {
    /// The item's place in sync order: policies by key, then members by key.
    pub fn cursor(&self) -> String {
        match self {
            FleetItem::Policy(p) => match p.verify() {
                Ok(v) => format!("policy/{}", v.statement().key()),
                Err(_) => "policy/".into(),
            },
            FleetItem::Member(m) => format!("member/{}", m.node),
        }
    }

    /// A stable id, for summaries.
    pub fn id(&self) -> [u8; 32] {
        match self {
            FleetItem::Policy(p) => p.id(),
            FleetItem::Member(m) => *blake3::hash(&codec::encode(m).unwrap_or_default()).as_bytes(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn admin() -> SigningKey {
        SigningKey::from_seed([1; 32])
    }

    fn fleet() -> FleetId {
        FleetId::founded_by(&admin().public())
    }

    fn policy(body: PolicyBody) -> Policy {
        Policy {
            fleet: fleet(),
            body,
            timestamp_ms: 1_000,
            sequence: 0,
            admin: admin().public(),
        }
    }

    fn grant() -> PolicyBody {
        PolicyBody::Grant {
            id: "ci".parse().unwrap(),
            grant: Some(Grant {
                principal: Principal::User("ci".parse().unwrap()),
                repos: "team/*".parse().unwrap(),
                actions: "pull,push".parse().unwrap(),
                expires_ms: Some(5_000),
            }),
        }
    }

    fn token() -> AccessToken {
        AccessToken {
            fleet: fleet(),
            id: ObjectId::from_bytes([7; 16]),
            principal: "ci".parse().unwrap(),
            scopes: vec![Scope {
                repos: "team/*".parse().unwrap(),
                actions: "pull,push".parse().unwrap(),
            }],
            issued_ms: 1_000,
            expires_ms: 2_000,
            admin: admin().public(),
        }
    }

    #[test]
    fn patterns_cover_what_they_say() {
        let repo = |s: &str| s.parse::<RepoName>().unwrap();
        let p = |s: &str| s.parse::<RepoPattern>().unwrap();
        assert!(p("*").matches(&repo("any/thing")));
        assert!(p("team/*").matches(&repo("team/app")));
        assert!(p("team/*").matches(&repo("team/a/b")));
        assert!(!p("team/*").matches(&repo("team")));
        assert!(!p("team/*").matches(&repo("teamx/app")));
        assert!(p("team/app").matches(&repo("team/app")));
        assert!(!p("team/app").matches(&repo("team/app2")));
        assert!("Bad/*".parse::<RepoPattern>().is_err());
        assert!("team/**".parse::<RepoPattern>().is_err());
        assert!(p("team/app").specificity() > p("team/*").specificity());
        assert!(p("team/a/*").specificity() > p("team/*").specificity());
        assert!(p("team/*").specificity() > p("*").specificity());
        let t = |s: &str| s.parse::<TagPattern>().unwrap();
        let tag = |s: &str| s.parse::<Tag>().unwrap();
        assert!(t("dev-*").matches(&tag("dev-12")));
        assert!(!t("dev-*").matches(&tag("prod-1")));
        assert!(t("latest").matches(&tag("latest")));
        assert!(t("*").matches(&tag("anything")));
        assert!("-bad".parse::<TagPattern>().is_err());
    }

    #[test]
    fn actions_parse_print_and_intersect() {
        let a: Actions = "pull,push".parse().unwrap();
        assert!(a.contains(Action::Pull) && a.contains(Action::Push));
        assert!(!a.contains(Action::Delete));
        assert_eq!(a.to_string(), "pull,push");
        assert_eq!("*".parse::<Actions>().unwrap(), Actions::ALL);
        let b: Actions = "push,delete".parse().unwrap();
        assert_eq!(a.intersect(b), Actions::of(&[Action::Push]));
        assert!("pull,fly".parse::<Actions>().is_err());
        assert!("".parse::<Actions>().is_err());
        assert!(Actions::try_from(0x10).is_err());
    }

    #[test]
    fn names_and_principals() {
        assert!("ci-bot.1".parse::<Name>().is_ok());
        assert!("CI".parse::<Name>().is_err());
        assert!("-x".parse::<Name>().is_err());
        assert!("x".repeat(65).parse::<Name>().is_err());
        let node = format!("node:{}", admin().public());
        assert!(matches!(node.parse::<Principal>(), Ok(Principal::Node(_))));
        assert!("user:ci".parse::<Principal>().is_ok());
        assert!("group:edge".parse::<Principal>().is_ok());
        assert!("root".parse::<Principal>().is_err());
        let p: Principal = "group:edge".parse().unwrap();
        assert_eq!(p.to_string().parse::<Principal>().unwrap(), p);
    }

    #[test]
    fn a_signed_policy_verifies_and_keys_by_subject() {
        let p = policy(grant());
        let signed = Signed::sign(&p, &admin()).unwrap();
        let v = signed.verify().unwrap();
        assert_eq!(v.statement(), &p);
        assert_eq!(p.key().as_str(), "grant/ci");
        let other = SigningKey::from_seed([2; 32]);
        assert_eq!(
            Signed::sign(&p, &other).unwrap_err(),
            FleetError::SignerMismatch
        );
    }

    #[test]
    fn a_statement_of_one_kind_never_passes_for_another() {
        // The same bytes signed as a ticket do not verify as a token: the domains differ.
        let ticket = JoinTicket {
            fleet: fleet(),
            id: ObjectId::from_bytes([7; 16]),
            groups: Vec::new(),
            issued_ms: 1,
            expires_ms: 2,
            admin: admin().public(),
        };
        let signed = Signed::sign(&ticket, &admin()).unwrap();
        let bytes = codec::encode(&signed).unwrap();
        let as_token: Signed<AccessToken> = match codec::decode(&bytes) {
            Ok(t) => t,
            Err(_) => return,
        };
        assert!(as_token.verify().is_err());
    }

    #[test]
    fn tokens_round_trip_through_text() {
        let signed = Signed::sign(&token(), &admin()).unwrap();
        let text = signed.to_text();
        assert!(text.starts_with(ACCESS_TOKEN_PREFIX));
        assert!(text.bytes().all(|b| b.is_ascii_graphic()));
        let back = Signed::<AccessToken>::from_text(&text).unwrap();
        assert_eq!(back.verify().unwrap().statement(), &token());
        assert!(Signed::<AccessToken>::from_text("shoal1.!!!").is_err());
        assert!(Signed::<AccessToken>::from_text("password").is_err());
    }

    #[test]
    fn a_member_proof_binds_a_ticket_to_one_node() {
        let ticket = Signed::sign(
            &JoinTicket {
                fleet: fleet(),
                id: ObjectId::from_bytes([3; 16]),
                groups: vec!["edge".parse().unwrap()],
                issued_ms: 1,
                expires_ms: 10,
                admin: admin().public(),
            },
            &admin(),
        )
        .unwrap();
        let node = SigningKey::from_seed([9; 32]);
        let proof = MemberProof::new(ticket.clone(), &node).unwrap();
        assert!(proof.verify().is_ok());
        // Claimed for another node, the binding fails.
        let mut stolen = proof.clone();
        stolen.node = SigningKey::from_seed([8; 32]).public();
        assert_eq!(stolen.verify().unwrap_err(), FleetError::BadSignature);
        let token = JoinToken {
            fleet: fleet(),
            admins: vec![admin().public()],
            bootstrap: vec!["/ip4/198.18.1.2/tcp/4001".into()],
            ticket,
        };
        assert_eq!(JoinToken::from_text(&token.to_text()).unwrap(), token);
    }

    const KEEP_TWO_PROD: &str = r#"{"rules":[{"rulePriority":1,"selection":{"tagStatus":"tagged",
        "tagPrefixList":["prod"],"countType":"imageCountMoreThan","countNumber":2},
        "action":{"type":"expire"}}]}"#;

    fn lifecycle(policy: Option<&str>) -> PolicyBody {
        PolicyBody::Lifecycle {
            pattern: "team/*".parse().unwrap(),
            policy: policy.map(str::to_owned),
        }
    }

    /// A signed envelope over `policy` without the checks [`Signed::sign`] makes: what a
    /// hostile admin-key holder or a broken peer could send.
    fn signed_unchecked(policy: &Policy) -> Signed<Policy> {
        let payload = codec::encode(policy).unwrap();
        let signature = admin().0.sign(&message(Policy::DOMAIN, &payload));
        Signed {
            signer: admin().public(),
            payload,
            signature: signature.to_bytes(),
            kind: PhantomData,
        }
    }

    #[test]
    fn a_lifecycle_policy_signs_keys_by_pattern_and_parses_back() {
        let p = policy(lifecycle(Some(KEEP_TWO_PROD)));
        let v = Signed::sign(&p, &admin()).unwrap().verify().unwrap();
        assert_eq!(v.statement().key().as_str(), "lifecycle/team/*");
        let (pattern, parsed) = v.statement().body.lifecycle().unwrap();
        assert_eq!(pattern.as_str(), "team/*");
        assert_eq!(parsed.rules().len(), 1);
        // Withdrawing it is a policy of the same key, with nothing to parse.
        let withdrawn = policy(lifecycle(None));
        assert_eq!(withdrawn.key(), p.key());
        assert!(Signed::sign(&withdrawn, &admin()).unwrap().verify().is_ok());
        assert!(withdrawn.body.lifecycle().is_none());
    }

    #[test]
    fn an_invalid_or_oversized_lifecycle_policy_is_refused_when_signed_and_when_received() {
        let too_long = format!(
            r#"{{"rules":[{{"rulePriority":1,"description":"{}","selection":{{"tagStatus":"any",
            "countType":"imageCountMoreThan","countNumber":1}},"action":{{"type":"expire"}}}}]}}"#,
            "x".repeat(crate::lifecycle::MAX_POLICY_BYTES)
        );
        for bad in [
            "not json",
            r#"{"rules":[]}"#,
            // tagged without a tag filter
            r#"{"rules":[{"rulePriority":1,"selection":{"tagStatus":"tagged",
              "countType":"imageCountMoreThan","countNumber":1},"action":{"type":"expire"}}]}"#,
            // a field ECR has no use for here is refused, not ignored
            r#"{"rules":[{"rulePriority":1,"selection":{"tagStatus":"any",
              "countType":"imageCountMoreThan","countNumber":1},"action":{"type":"transition"}}]}"#,
            too_long.as_str(),
        ] {
            let p = policy(lifecycle(Some(bad)));
            assert!(
                matches!(Signed::sign(&p, &admin()), Err(FleetError::Lifecycle(_))),
                "signed {bad:.60}"
            );
            // Signed by a real admin key, bypassing the checks: still refused on receipt.
            let forged = signed_unchecked(&p);
            assert!(
                forged.verify().is_err(),
                "a received invalid policy verified: {bad:.60}"
            );
        }
        // The same envelope maker makes a valid one that verifies: the refusals above are the
        // policy's, not the envelope's.
        assert!(
            signed_unchecked(&policy(lifecycle(Some(KEEP_TWO_PROD))))
                .verify()
                .is_ok()
        );
    }

    #[test]
    fn a_lifecycle_policy_appended_last_leaves_older_encodings_alone() {
        // Older policies (variants 0..=3) encode as before: a grant decodes as a grant.
        let bytes = codec::encode(&policy(grant())).unwrap();
        assert_eq!(codec::decode::<Policy>(&bytes).unwrap(), policy(grant()));
        let l = policy(lifecycle(Some(KEEP_TWO_PROD)));
        let bytes = codec::encode(&l).unwrap();
        assert_eq!(codec::decode::<Policy>(&bytes).unwrap(), l);
    }

    proptest! {
        #[test]
        fn a_mutated_policy_or_token_never_verifies(byte in any::<usize>(), bit in 0u8..8) {
            for bytes in [
                codec::encode(&Signed::sign(&policy(grant()), &admin()).unwrap()).unwrap(),
                codec::encode(&Signed::sign(&token(), &admin()).unwrap()).unwrap(),
            ] {
                let mut bytes = bytes;
                let i = byte % bytes.len();
                bytes[i] ^= 1 << bit;
                if let Ok(p) = codec::decode::<Signed<Policy>>(&bytes) {
                    prop_assert!(p.verify().is_err());
                }
                if let Ok(t) = codec::decode::<Signed<AccessToken>>(&bytes) {
                    prop_assert!(t.verify().is_err());
                }
            }
        }

        #[test]
        fn any_text_is_refused_or_parsed_never_a_panic(s in "\\PC{0,200}") {
            let _ = Signed::<AccessToken>::from_text(&s);
            let _ = JoinToken::from_text(&s);
            let _ = s.parse::<RepoPattern>();
            let _ = s.parse::<Principal>();
            let _ = s.parse::<Actions>();
        }
    }
}
