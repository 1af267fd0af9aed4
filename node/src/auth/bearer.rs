//! Bearer tokens this node issues at its token endpoint (the distribution token flow: a client
//! trades its Basic credentials for a short-lived token scoped to the repositories and actions
//! it asked for and may have).
//!
//! A token is a statement signed with the node's own key, so it needs no server-side session
//! and survives nothing but its short life; only the node that issued it accepts it (another
//! node would need the client to log in there). It names the principal (for the audit log) and
//! each repository with the actions granted.

use std::time::Duration;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use shoal_protocol::fleet::{Actions, FleetError, Signed, Statement};
use shoal_protocol::{PublisherKey, RepoName, SigningKey, codec};

/// Prefix of a bearer token.
const PREFIX: &str = "shoalb1.";
/// Most repositories one token covers (a client asks for one or two).
const MAX_REPOS: usize = 16;
/// Longest principal name carried, in bytes.
const MAX_PRINCIPAL_BYTES: usize = 160;

/// What a bearer token says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Who it was issued to (as the audit log names them).
    pub principal: String,
    /// Each repository and what may be done there.
    pub grants: Vec<(RepoName, Actions)>,
    /// What the client asked for and was refused: a request needing one of these is denied
    /// (`403`), while one needing an action it never asked for is sent back for a token that
    /// covers it (`401` with `error="insufficient_scope"`).
    pub refused: Vec<(RepoName, Actions)>,
    /// When it was issued, milliseconds since the Unix epoch.
    pub issued_ms: u64,
    /// When it stops working.
    pub expires_ms: u64,
    /// The node that issued it.
    pub issuer: PublisherKey,
}

impl Claims {
    /// What the token allows on `repo`.
    pub fn allowed(&self, repo: &RepoName) -> Actions {
        union_for(&self.grants, repo)
    }

    /// What the client asked for on `repo` and was refused.
    pub fn refused(&self, repo: &RepoName) -> Actions {
        union_for(&self.refused, repo)
    }
}

fn union_for(list: &[(RepoName, Actions)], repo: &RepoName) -> Actions {
    list.iter()
        .filter(|(r, _)| r == repo)
        .fold(Actions::NONE, |acc, (_, a)| acc.union(*a))
}

impl Claims {}

impl Statement for Claims {
    const DOMAIN: &'static [u8] = b"shoal bearer token v2\0";

    fn signer(&self) -> &PublisherKey {
        &self.issuer
    }

    fn validate(&self) -> Result<(), FleetError> {
        if self.grants.len() > MAX_REPOS
            || self.refused.len() > MAX_REPOS
            || self.principal.len() > MAX_PRINCIPAL_BYTES
        {
            return Err(FleetError::Limit("bearer token too large".into()));
        }
        Ok(())
    }
}

/// Issues and checks this node's bearer tokens.
#[derive(Debug, Clone)]
pub struct Issuer {
    key: SigningKey,
}

impl Issuer {
    /// An issuer signing with the node's key.
    pub fn new(key: SigningKey) -> Issuer {
        Issuer { key }
    }

    /// A token for `principal` granting `grants` (and saying what was `refused`) from `now_ms`
    /// for `ttl`.
    pub fn issue(
        &self,
        principal: String,
        grants: &[(RepoName, Actions)],
        refused: &[(RepoName, Actions)],
        now_ms: u64,
        ttl: Duration,
    ) -> String {
        let mut principal = principal;
        principal.truncate(MAX_PRINCIPAL_BYTES);
        let claims = Claims {
            principal,
            grants: grants.iter().take(MAX_REPOS).cloned().collect(),
            refused: refused.iter().take(MAX_REPOS).cloned().collect(),
            issued_ms: now_ms,
            expires_ms: now_ms.saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)),
            issuer: self.key.public(),
        };
        let Ok(signed) = Signed::sign(&claims, &self.key) else {
            // Only limits can fail, and they were enforced above: an empty token grants nothing.
            return String::new();
        };
        let bytes = codec::encode(&signed).unwrap_or_default();
        format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
        )
    }

    /// The claims of a token this node issued that is still valid at `now_ms`.
    pub fn verify(&self, text: &str, now_ms: u64) -> Option<Claims> {
        let body = text.trim().strip_prefix(PREFIX)?;
        if body.len() > 8 * 1024 {
            return None;
        }
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .ok()?;
        let signed: Signed<Claims> = codec::decode(&bytes).ok()?;
        let claims = signed.verify().ok()?.statement().clone();
        (claims.issuer == self.key.public() && now_ms < claims.expires_ms).then_some(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_grants_what_it_names_until_it_expires() {
        let issuer = Issuer::new(SigningKey::from_seed([3; 32]));
        let repo: RepoName = "team/app".parse().unwrap();
        let grants = vec![(repo.clone(), "pull".parse().unwrap())];
        let token = issuer.issue(
            "user:ci".into(),
            &grants,
            &[],
            1_000,
            Duration::from_secs(60),
        );
        let claims = issuer.verify(&token, 2_000).unwrap();
        assert_eq!(claims.allowed(&repo), "pull".parse().unwrap());
        assert!(claims.allowed(&"team/other".parse().unwrap()).is_empty());
        assert!(issuer.verify(&token, 61_000).is_none(), "expired");
        // Another node does not accept it; a tampered one does not verify.
        let other = Issuer::new(SigningKey::from_seed([4; 32]));
        assert!(other.verify(&token, 2_000).is_none());
        let mut tampered = token.clone();
        tampered.pop();
        tampered.push(if token.ends_with('A') { 'B' } else { 'A' });
        assert!(issuer.verify(&tampered, 2_000).is_none());
        assert!(issuer.verify("garbage", 2_000).is_none());
    }
}
