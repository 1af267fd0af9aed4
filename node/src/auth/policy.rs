//! The fleet's current policies and what they allow: pure evaluation, no I/O and no clock (the
//! caller passes the time).
//!
//! [`PolicySet`] keeps, for each [`PolicyKey`], the verified policy with the highest order key,
//! so every node that holds the same policies answers the same, whatever order they arrived in.
//! Questions it answers:
//! - the settings of a repository: those of the most specific pattern that covers it (an exact
//!   name, then the longest `prefix/*`, then `*`), else the defaults (public, mutable tags, any
//!   member may publish);
//! - what a set of principals may do to a repository: the union of the actions of the grants
//!   that name one of them, cover the repository and have not expired;
//! - whether a token, a ticket or a node is revoked;
//! - the retention policies in force ([`Retention`]: the most specific pattern's applies).

use std::collections::BTreeMap;

use shoal_protocol::fleet::{
    Actions, Grant, Policy, PolicyBody, PolicyKey, Principal, RepoSettings, Revoked, Verified,
};
use shoal_protocol::{PublisherKey, RepoName};

use crate::lifecycle::Retention;

/// What became of a policy offered to the set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// It is now the current policy for its key.
    Current,
    /// The set holds this policy or a newer one for the key.
    Stale,
}

/// The current policy for each key.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    by_key: BTreeMap<PolicyKey, Verified<Policy>>,
}

impl PolicySet {
    /// Offers a verified policy (of this fleet, signed by one of its admins: the caller checked).
    pub fn apply(&mut self, policy: Verified<Policy>) -> Applied {
        let key = policy.statement().key();
        match self.by_key.get(&key) {
            Some(current) if current.statement().order_key() >= policy.statement().order_key() => {
                Applied::Stale
            }
            _ => {
                self.by_key.insert(key, policy);
                Applied::Current
            }
        }
    }

    /// The current policy for `key`.
    pub fn get(&self, key: &PolicyKey) -> Option<&Verified<Policy>> {
        self.by_key.get(key)
    }

    /// Every current policy, in key order.
    pub fn iter(&self) -> impl Iterator<Item = &Verified<Policy>> {
        self.by_key.values()
    }

    /// How many keys have a policy.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// The settings that apply to `repo`.
    pub fn settings(&self, repo: &RepoName) -> RepoSettings {
        self.by_key
            .values()
            .filter_map(|p| match &p.statement().body {
                PolicyBody::Repo {
                    pattern,
                    settings: Some(settings),
                } if pattern.matches(repo) => Some((pattern.specificity(), settings)),
                _ => None,
            })
            .max_by_key(|(specificity, _)| *specificity)
            .map(|(_, s)| s.clone())
            .unwrap_or_default()
    }

    /// The grants in force at `now_ms`, by name.
    pub fn grants(&self, now_ms: u64) -> impl Iterator<Item = (&str, &Grant)> {
        self.by_key
            .values()
            .filter_map(move |p| match &p.statement().body {
                PolicyBody::Grant {
                    id,
                    grant: Some(grant),
                } if grant.expires_ms.is_none_or(|e| now_ms < e) => Some((id.as_str(), grant)),
                _ => None,
            })
    }

    /// What any of `principals` may do to `repo` at `now_ms`, by grant.
    pub fn granted(&self, principals: &[Principal], repo: &RepoName, now_ms: u64) -> Actions {
        self.grants(now_ms)
            .filter(|(_, g)| principals.contains(&g.principal) && g.repos.matches(repo))
            .fold(Actions::NONE, |acc, (_, g)| acc.union(g.actions))
    }

    /// Whether something is revoked.
    pub fn is_revoked(&self, what: &Revoked) -> bool {
        self.by_key
            .values()
            .any(|p| matches!(&p.statement().body, PolicyBody::Revoke(r) if r == what))
    }

    /// The groups of the node with `key`, if an admin enrolled it.
    pub fn enrolled(&self, key: &PublisherKey) -> Option<Vec<shoal_protocol::fleet::Name>> {
        let k = PolicyKey::from_text(&format!("member/{key}"));
        match &self.by_key.get(&k)?.statement().body {
            PolicyBody::Member { groups, .. } => Some(groups.clone()),
            _ => None,
        }
    }

    /// Whether the node with `key` is revoked.
    pub fn is_node_revoked(&self, key: &PublisherKey) -> bool {
        self.is_revoked(&Revoked::Node(*key))
    }

    /// The retention policies in force, by pattern.
    pub fn retention(&self) -> Retention {
        Retention::new(
            self.by_key
                .values()
                .filter_map(|p| p.statement().body.lifecycle())
                .map(|(pattern, policy)| (pattern.clone(), policy))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_protocol::SigningKey;
    use shoal_protocol::fleet::{Action, FleetId, ObjectId, Signed, TagMutability, Visibility};

    fn admin() -> SigningKey {
        SigningKey::from_seed([1; 32])
    }

    fn policy(body: PolicyBody, timestamp_ms: u64) -> Verified<Policy> {
        let p = Policy {
            fleet: FleetId::founded_by(&admin().public()),
            body,
            timestamp_ms,
            sequence: 0,
            admin: admin().public(),
        };
        Signed::sign(&p, &admin()).unwrap().verify().unwrap()
    }

    fn repo(s: &str) -> RepoName {
        s.parse().unwrap()
    }

    fn settings(pattern: &str, visibility: Visibility) -> PolicyBody {
        PolicyBody::Repo {
            pattern: pattern.parse().unwrap(),
            settings: Some(RepoSettings {
                visibility,
                tags: TagMutability::Mutable,
                publishers: Vec::new(),
            }),
        }
    }

    fn grant(
        id: &str,
        principal: &str,
        repos: &str,
        actions: &str,
        expires: Option<u64>,
    ) -> PolicyBody {
        PolicyBody::Grant {
            id: id.parse().unwrap(),
            grant: Some(Grant {
                principal: principal.parse().unwrap(),
                repos: repos.parse().unwrap(),
                actions: actions.parse().unwrap(),
                expires_ms: expires,
            }),
        }
    }

    #[test]
    fn the_most_specific_settings_apply() {
        let mut set = PolicySet::default();
        set.apply(policy(settings("*", Visibility::Private), 1));
        set.apply(policy(settings("team/*", Visibility::Public), 1));
        set.apply(policy(settings("team/secret", Visibility::Private), 1));
        assert_eq!(set.settings(&repo("other")).visibility, Visibility::Private);
        assert_eq!(
            set.settings(&repo("team/app")).visibility,
            Visibility::Public
        );
        assert_eq!(
            set.settings(&repo("team/secret")).visibility,
            Visibility::Private
        );
        assert_eq!(
            PolicySet::default().settings(&repo("x")),
            RepoSettings::default()
        );
    }

    #[test]
    fn the_newest_policy_for_a_key_wins_whatever_the_order() {
        let old = policy(settings("team/*", Visibility::Public), 1);
        let new = policy(settings("team/*", Visibility::Private), 2);
        let mut a = PolicySet::default();
        assert_eq!(a.apply(old.clone()), Applied::Current);
        assert_eq!(a.apply(new.clone()), Applied::Current);
        let mut b = PolicySet::default();
        assert_eq!(b.apply(new.clone()), Applied::Current);
        // A replay of the older one changes nothing.
        assert_eq!(b.apply(old), Applied::Stale);
        assert_eq!(b.apply(new), Applied::Stale);
        for set in [&a, &b] {
            assert_eq!(
                set.settings(&repo("team/x")).visibility,
                Visibility::Private
            );
        }
        // Withdrawn settings fall back to the next pattern.
        a.apply(policy(
            PolicyBody::Repo {
                pattern: "team/*".parse().unwrap(),
                settings: None,
            },
            3,
        ));
        assert_eq!(a.settings(&repo("team/x")), RepoSettings::default());
    }

    #[test]
    fn grants_add_up_match_patterns_and_expire() {
        let mut set = PolicySet::default();
        set.apply(policy(grant("a", "user:ci", "team/*", "pull", None), 1));
        set.apply(policy(
            grant("b", "user:ci", "team/app", "push", Some(100)),
            1,
        ));
        set.apply(policy(grant("c", "group:edge", "*", "pull", None), 1));
        let ci = ["user:ci".parse::<Principal>().unwrap()];
        let got = set.granted(&ci, &repo("team/app"), 50);
        assert!(got.contains(Action::Pull) && got.contains(Action::Push));
        assert!(!got.contains(Action::Delete));
        // Expired at 100.
        assert_eq!(
            set.granted(&ci, &repo("team/app"), 100),
            Actions::of(&[Action::Pull])
        );
        assert!(set.granted(&ci, &repo("other/app"), 50).is_empty());
        let edge = ["group:edge".parse::<Principal>().unwrap()];
        assert_eq!(
            set.granted(&edge, &repo("any"), 50),
            Actions::of(&[Action::Pull])
        );
        // Withdrawing a grant takes it away.
        set.apply(policy(
            PolicyBody::Grant {
                id: "a".parse().unwrap(),
                grant: None,
            },
            2,
        ));
        assert!(set.granted(&ci, &repo("team/other"), 50).is_empty());
    }

    #[test]
    fn revocations_are_found() {
        let mut set = PolicySet::default();
        let id = ObjectId::from_bytes([5; 16]);
        let node = SigningKey::from_seed([6; 32]).public();
        assert!(!set.is_revoked(&Revoked::Token(id)));
        set.apply(policy(PolicyBody::Revoke(Revoked::Token(id)), 1));
        set.apply(policy(PolicyBody::Revoke(Revoked::Node(node)), 1));
        assert!(set.is_revoked(&Revoked::Token(id)));
        assert!(!set.is_revoked(&Revoked::Ticket(id)));
        assert!(set.is_node_revoked(&node));
    }

    fn keep(pattern: &str, n: u32) -> PolicyBody {
        PolicyBody::Lifecycle {
            pattern: pattern.parse().unwrap(),
            policy: Some(format!(
                r#"{{"rules":[{{"rulePriority":1,"selection":{{"tagStatus":"any",
                "countType":"imageCountMoreThan","countNumber":{n}}},"action":{{"type":"expire"}}}}]}}"#
            )),
        }
    }

    fn kept_by(set: &PolicySet, r: &str) -> Option<String> {
        set.retention()
            .for_repo(&repo(r))
            .map(|(pattern, _)| pattern.to_string())
    }

    #[test]
    fn the_most_specific_lifecycle_policy_applies_and_covers_only_its_pattern() {
        let mut set = PolicySet::default();
        set.apply(policy(keep("team/*", 5), 1));
        set.apply(policy(keep("team/app", 2), 1));
        assert_eq!(kept_by(&set, "team/app").as_deref(), Some("team/app"));
        assert_eq!(kept_by(&set, "team/web").as_deref(), Some("team/*"));
        // A repository no pattern covers has no policy: nothing of it ever expires.
        assert_eq!(kept_by(&set, "other/app"), None);
        // Withdrawn, the next most specific applies.
        set.apply(policy(
            PolicyBody::Lifecycle {
                pattern: "team/app".parse().unwrap(),
                policy: None,
            },
            2,
        ));
        assert_eq!(kept_by(&set, "team/app").as_deref(), Some("team/*"));
        // An older policy replayed for the key changes nothing.
        set.apply(policy(keep("team/app", 2), 1));
        assert_eq!(kept_by(&set, "team/app").as_deref(), Some("team/*"));
    }
}
