//! A fleet's admin as a test holds it: its key, join tokens for nodes, and signed policies.

use shoal_node::auth::ingest;
use shoal_node::config::AccessConfig;
use shoal_protocol::SigningKey;
use shoal_protocol::fleet::{
    FleetId, JoinTicket, JoinToken, ObjectId, Policy, PolicyBody, Signed, SignedPolicy,
};

use super::TestNode;

/// A fleet's admin: the key that founded the fleet.
pub struct Admin {
    pub key: SigningKey,
    pub fleet: FleetId,
}

impl Admin {
    /// The admin of a fleet founded by the key of `seed`.
    pub fn new(seed: u8) -> Admin {
        let key = SigningKey::from_seed([seed; 32]);
        Admin {
            fleet: FleetId::founded_by(&key.public()),
            key,
        }
    }

    pub fn now() -> u64 {
        shoal_node::auth::now_ms()
    }

    /// A join token for nodes of `groups`.
    pub fn token(&self, groups: &[&str]) -> String {
        let ticket = JoinTicket {
            fleet: self.fleet,
            id: ObjectId::from_bytes(rand::random()),
            groups: groups.iter().map(|g| g.parse().unwrap()).collect(),
            issued_ms: Admin::now(),
            expires_ms: Admin::now() + 24 * 3600 * 1000,
            admin: self.key.public(),
        };
        JoinToken {
            fleet: self.fleet,
            admins: vec![self.key.public()],
            bootstrap: Vec::new(),
            ticket: Signed::sign(&ticket, &self.key).unwrap(),
        }
        .to_text()
    }

    /// A node's access settings: it joins the fleet in `groups`.
    pub fn access(&self, groups: &[&str]) -> AccessConfig {
        AccessConfig {
            join: Some(self.token(groups)),
            ..AccessConfig::default()
        }
    }

    /// `body` signed as the fleet's policy of `sequence`.
    pub fn sign(&self, body: PolicyBody, sequence: u64) -> SignedPolicy {
        let policy = Policy {
            fleet: self.fleet,
            body,
            timestamp_ms: Admin::now(),
            sequence,
            admin: self.key.public(),
        };
        Signed::sign(&policy, &self.key).unwrap()
    }
}

/// Applies a policy on `node` and gossips it, as an admin's node does.
pub async fn apply(node: &TestNode, policy: SignedPolicy) {
    let n = node.node();
    let outcome = ingest::policy(n.tags().auth(), n.store(), policy.clone())
        .await
        .unwrap();
    assert_eq!(outcome, ingest::Outcome::Accepted);
    n.network().publish_policy(&policy).await.unwrap();
}
