//! The registry auth handshake: parsing `WWW-Authenticate`, the token service's answer, and
//! the cache of tokens per scope.
//!
//! Which host may receive credentials is decided here too: a token realm is named by the
//! upstream's answer, so an upstream (or whoever sits on a plain-HTTP path to it) could point
//! the node's password at any host. The realm must at least be as private as the upstream: an
//! `https://` upstream's realm must be `https://`, and a realm never carries credentials in its
//! URL.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::config::Secret;

/// How long a token without `expires_in` is used (the distribution spec's default).
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// A token is dropped this long before it expires, so that a request does not race its end.
const TOKEN_EXPIRY_MARGIN: Duration = Duration::from_secs(5);
/// The longest a token is kept, whatever the token service says.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
/// Tokens kept per upstream (one per repository pulled recently); the expired and then the
/// oldest go first.
const MAX_CACHED_TOKENS: usize = 1024;

/// A parsed `WWW-Authenticate` challenge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Challenge {
    /// `Bearer realm=…,service=…` : get a token from the realm.
    Bearer {
        realm: String,
        service: Option<String>,
    },
    /// `Basic realm=…`: send the user name and password.
    Basic,
}

/// The first `Bearer` or `Basic` challenge in a `WWW-Authenticate` header value, if any.
pub(crate) fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header
        .split_once(|c: char| c.is_ascii_whitespace())
        .unwrap_or((header, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let params = parse_params(rest);
    let realm = params.get("realm")?.clone();
    Some(Challenge::Bearer {
        realm,
        service: params.get("service").cloned(),
    })
}

/// `key=value` or `key="quoted, value"` pairs separated by commas; keys lowercased.
fn parse_params(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars
            .peek()
            .is_some_and(|c| *c == ',' || c.is_ascii_whitespace())
        {
            chars.next();
        }
        let mut key = String::new();
        while let Some(c) = chars.peek().copied() {
            if c == '=' || c == ',' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if chars.next() != Some('=') {
            return out;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '"' => break,
                    '\\' => {
                        if let Some(escaped) = chars.next() {
                            value.push(escaped);
                        }
                    }
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.peek().copied() {
                if c == ',' {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        out.insert(key.trim().to_ascii_lowercase(), value.trim().to_owned());
    }
}

/// Whether the node may send credentials to `realm`, named by an upstream at `upstream`.
pub(crate) fn realm_allowed(upstream: &url::Url, realm: &url::Url) -> bool {
    let scheme_ok = match realm.scheme() {
        "https" => true,
        "http" => upstream.scheme() == "http",
        _ => false,
    };
    scheme_ok && realm.username().is_empty() && realm.password().is_none() && realm.host().is_some()
}

/// The token service's answer (distribution's `token` or OAuth2's `access_token`).
#[derive(Deserialize)]
pub(crate) struct TokenAnswer {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

impl TokenAnswer {
    /// The token and how long to use it, or `None` if the answer has no token.
    pub(crate) fn into_token(self) -> Option<(Secret, Duration)> {
        let token = self
            .token
            .filter(|t| !t.is_empty())
            .or(self.access_token.filter(|t| !t.is_empty()))?;
        let lifetime = self
            .expires_in
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_TOKEN_LIFETIME)
            .min(MAX_TOKEN_LIFETIME);
        Some((Secret::new(token), lifetime))
    }
}

/// Bearer tokens per scope, each until shortly before it expires.
#[derive(Default)]
pub(crate) struct TokenCache {
    tokens: HashMap<String, (Secret, Instant)>,
}

impl TokenCache {
    /// The unexpired token for `scope`.
    pub(crate) fn get(&self, scope: &str, now: Instant) -> Option<Secret> {
        self.tokens
            .get(scope)
            .filter(|(_, until)| *until > now)
            .map(|(t, _)| t.clone())
    }

    /// Keeps `token` for `scope` for `lifetime` (minus a margin; a token that short-lived is
    /// used once and not kept).
    pub(crate) fn insert(&mut self, scope: &str, token: Secret, lifetime: Duration, now: Instant) {
        let Some(keep) = lifetime
            .checked_sub(TOKEN_EXPIRY_MARGIN)
            .filter(|d| !d.is_zero())
        else {
            return;
        };
        if self.tokens.len() >= MAX_CACHED_TOKENS && !self.tokens.contains_key(scope) {
            self.tokens.retain(|_, (_, until)| *until > now);
            if self.tokens.len() >= MAX_CACHED_TOKENS {
                let oldest = self
                    .tokens
                    .iter()
                    .min_by_key(|(_, (_, until))| *until)
                    .map(|(k, _)| k.clone());
                if let Some(oldest) = oldest {
                    self.tokens.remove(&oldest);
                }
            }
        }
        self.tokens.insert(scope.to_owned(), (token, now + keep));
    }

    /// Forgets the token for `scope` (the registry refused it).
    pub(crate) fn remove(&mut self, scope: &str) {
        self.tokens.remove(scope);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.tokens.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
            })
        );
        assert_eq!(
            parse_challenge(r#"bearer realm="http://h/t?a=1,b", service=svc"#),
            Some(Challenge::Bearer {
                realm: "http://h/t?a=1,b".into(),
                service: Some("svc".into()),
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="x""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge("Negotiate abc"), None);
        assert_eq!(parse_challenge("Bearer service=x"), None);
        assert_eq!(parse_challenge(""), None);
        assert_eq!(
            parse_challenge(r#"Bearer realm="unterminated"#),
            Some(Challenge::Bearer {
                realm: "unterminated".into(),
                service: None
            })
        );
    }

    #[test]
    fn realms() {
        let https: url::Url = "https://reg.io".parse().unwrap();
        let http: url::Url = "http://reg.io".parse().unwrap();
        let ok = |u: &url::Url, r: &str| realm_allowed(u, &r.parse().unwrap());
        assert!(ok(&https, "https://auth.io/token"));
        assert!(
            !ok(&https, "http://auth.io/token"),
            "no downgrade to plain http"
        );
        assert!(ok(&http, "http://auth.io/token"));
        assert!(!ok(&https, "https://u:p@auth.io/token"));
        assert!(!ok(&https, "file:///etc/passwd"));
    }

    #[test]
    fn token_answers() {
        let a: TokenAnswer = serde_json::from_str(r#"{"token":"t","expires_in":300}"#).unwrap();
        assert_eq!(a.into_token().unwrap().1, Duration::from_secs(300));
        let a: TokenAnswer = serde_json::from_str(r#"{"access_token":"t"}"#).unwrap();
        assert_eq!(a.into_token().unwrap().1, DEFAULT_TOKEN_LIFETIME);
        let a: TokenAnswer = serde_json::from_str(r#"{"token":""}"#).unwrap();
        assert!(a.into_token().is_none());
        let a: TokenAnswer =
            serde_json::from_str(r#"{"token":"t","expires_in":99999999}"#).unwrap();
        assert_eq!(a.into_token().unwrap().1, MAX_TOKEN_LIFETIME);
    }

    #[test]
    fn cache_expires_and_stays_bounded() {
        let now = Instant::now();
        let mut c = TokenCache::default();
        c.insert("a", Secret::new("ta"), Duration::from_secs(60), now);
        assert_eq!(c.get("a", now), Some(Secret::new("ta")));
        assert_eq!(c.get("a", now + Duration::from_secs(56)), None);
        c.insert("short", Secret::new("x"), Duration::from_secs(2), now);
        assert_eq!(c.get("short", now), None);
        for i in 0..MAX_CACHED_TOKENS + 10 {
            c.insert(
                &format!("s{i}"),
                Secret::new("t"),
                Duration::from_secs(60 + i as u64),
                now,
            );
        }
        assert_eq!(c.len(), MAX_CACHED_TOKENS);
        assert!(c.get(&format!("s{}", MAX_CACHED_TOKENS + 9), now).is_some());
        c.remove(&format!("s{}", MAX_CACHED_TOKENS + 9));
        assert!(c.get(&format!("s{}", MAX_CACHED_TOKENS + 9), now).is_none());
    }
}
