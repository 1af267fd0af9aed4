//! The fleet's shared state on disk: policies and member proofs, checked, journaled and applied.
//!
//! Like tag records, fleet items are kept in the store's journal (the truth) and index, and
//! applied to the [`Auth`] state in memory. At start the index's items are checked again and
//! applied; an item from a peer (gossip, anti-entropy) or an admin (the admin API) is checked
//! against the fleet, journaled if new, and applied.

use std::ops::ControlFlow;

use shoal_protocol::PublisherKey;
use shoal_protocol::fleet::{FleetItem, MemberProof, SignedPolicy};

use super::policy::Applied;
use super::{Auth, Refused};
use crate::store::{Batch, Store, StoreError};

/// What became of a fleet item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It is new and now in force.
    Accepted,
    /// The node holds it, or something newer.
    Stale,
    /// It was refused.
    Refused(Refused),
}

/// Applies the fleet items the store holds to `auth` (at start, or after joining a fleet). Items
/// that no longer check out (another fleet's, an expired ticket) are skipped.
pub async fn load(auth: &Auth, store: &Store) -> Result<(), StoreError> {
    let items = store
        .read(|i| {
            let mut items = Vec::new();
            let _every = i.visit_fleet(None, |item| {
                items.push(item);
                ControlFlow::Continue(())
            })?;
            Ok(items)
        })
        .await?;
    // Policies first: a revocation decides whether a member still counts.
    for item in &items {
        if let FleetItem::Policy(p) = item
            && let Ok(v) = auth.check_policy(p)
        {
            auth.apply_policy(v);
        }
    }
    for item in items {
        if let FleetItem::Member(proof) = item
            && let Ok(ticket) = auth.check_member(&proof, None, auth.clock().now_ms())
        {
            auth.add_member(proof.node, ticket);
        }
    }
    Ok(())
}

/// Checks a policy and keeps it if it is new.
pub async fn policy(
    auth: &Auth,
    store: &Store,
    signed: SignedPolicy,
) -> Result<Outcome, StoreError> {
    let verified = match auth.check_policy(&signed) {
        Ok(v) => v,
        Err(why) => return Ok(Outcome::Refused(why)),
    };
    let (key, admin) = (verified.statement().key(), verified.statement().admin);
    let newer = auth
        .policies()
        .get(&key)
        .is_none_or(|c| c.statement().order_key() < verified.statement().order_key());
    if !newer {
        return Ok(Outcome::Stale);
    }
    store.commit(Batch::new().policy(signed)).await?;
    Ok(match auth.apply_policy(verified) {
        Applied::Current => {
            tracing::info!(%key, "fleet policy in force");
            // Whoever brought it (this node's admin API, gossip, a sync), the signer decided.
            auth.audit(
                super::audit::Entry::new(
                    format!("admin:{admin}"),
                    super::audit::Event::PolicyChange,
                    "in force",
                )
                .reference(&key),
            );
            Outcome::Accepted
        }
        Applied::Stale => Outcome::Stale,
    })
}

/// Checks a member proof, from `peer` if it came from the member itself, and keeps it if new.
pub async fn member(
    auth: &Auth,
    store: &Store,
    proof: MemberProof,
    peer: Option<&PublisherKey>,
) -> Result<Outcome, StoreError> {
    let ticket = match auth.check_member(&proof, peer, auth.clock().now_ms()) {
        Ok(t) => t,
        Err(why) => return Ok(Outcome::Refused(why)),
    };
    if auth
        .member(&proof.node)
        .is_some_and(|m| m.ticket == Some(ticket.statement().id))
    {
        return Ok(Outcome::Stale);
    }
    let node = proof.node;
    store.commit(Batch::new().member(proof)).await?;
    auth.add_member(node, ticket);
    tracing::info!(member = %node, "fleet member known");
    Ok(Outcome::Accepted)
}
