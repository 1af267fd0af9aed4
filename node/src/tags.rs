//! Tag state: which signed record currently names each (repository, tag).
//!
//! Records arrive from local pushes (signed here), from gossip and from anti-entropy. A record
//! is kept only if its signature verifies, its publisher may publish to the repository
//! ([`Auth::may_publish`]) and its timestamp is not further ahead than the clock skew allows. A
//! mutable tag's current record is the one with the highest (timestamp, sequence, publisher),
//! so every node that holds the same records gives the same answer, whatever the arrival order;
//! an immutable tag keeps the first record since it was last deleted
//! ([`supersedes`]). A tombstone (a record with no target)
//! deletes the tag. An old record replayed by a peer changes nothing.
//!
//! Whether a record counts can change after it was kept: its publisher's trust rule is
//! removed, its node is revoked, or (in a store written before the skew bound was enforced) it
//! claims a time far ahead. [`Tags::rederive`] runs at start and whenever the access state
//! changes: each tag whose current record no longer counts falls back to the newest of its
//! journaled records that still do, so no key can pin a tag beyond its trust. A local push
//! is acknowledged only if its record became the tag's current one.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use shoal_protocol::{
    BlobRef, Digest, RepoName, SignedTagRecord, SigningKey, Tag, TagRecord, TagTarget,
    VerifiedTagRecord,
};

use crate::auth::{Auth, MAX_CLOCK_SKEW};
use crate::manifest::ManifestInfo;
use crate::store::change::supersedes;
use crate::store::{Batch, Store, StoreError, TagEvent};

/// Counters of what happened to incoming records.
#[derive(Debug, Default)]
pub struct TagStats {
    /// Records that became current.
    pub accepted: AtomicU64,
    /// Records older than (or equal to) the current one: replays and losers; and records that
    /// would move an immutable tag.
    pub stale: AtomicU64,
    /// Records whose publisher is not trusted for the repository.
    pub untrusted: AtomicU64,
    /// Records that did not verify or decode, or claim a time too far ahead.
    pub invalid: AtomicU64,
}

/// What became of an incoming record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ingest {
    /// It is now the tag's current record.
    Accepted,
    /// The node already holds this record or a newer one.
    Stale,
    /// It would move an immutable tag.
    Immutable,
    /// Its publisher is not trusted for the repository.
    Untrusted,
    /// It does not verify, or its timestamp is too far in the future.
    Invalid,
}

/// Why a local push could not publish its record.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The tag is immutable and names another manifest.
    #[error("tag {tag} of repository {repo} is immutable and names {current}")]
    Immutable {
        /// The repository.
        repo: RepoName,
        /// The tag.
        tag: Tag,
        /// The manifest it names.
        current: Digest,
    },
    /// The repository's settings list the keys that may publish to it, and this node's is not
    /// one of them.
    #[error("this node may not publish to repository {0}")]
    NotAPublisher(RepoName),
    /// The record was kept but did not become the tag's current one: another record of the
    /// same time, pushed concurrently, won.
    #[error("tag {tag} of repository {repo} was moved by a concurrent push")]
    Lost {
        /// The repository.
        repo: RepoName,
        /// The tag.
        tag: Tag,
    },
    /// The store failed.
    #[error("store")]
    Store(#[from] StoreError),
}

/// The latest timestamp a record may claim now: the local clock plus the skew allowed.
fn latest_allowed_ms(clock: &crate::clock::FleetClock) -> u64 {
    clock
        .now_ms()
        .saturating_add(MAX_CLOCK_SKEW.as_millis() as u64)
}

/// How many accepted records a slow follower of [`Tags::accepted`] may lag behind before it
/// misses some (it hears that it lagged, and how many it missed).
pub const ACCEPTED_CAPACITY: usize = 1024;

/// Handle to the tag state (cheap to clone).
#[derive(Clone)]
pub struct Tags {
    store: Store,
    auth: Auth,
    key: Arc<SigningKey>,
    stats: Arc<TagStats>,
    accepted: tokio::sync::broadcast::Sender<VerifiedTagRecord>,
}

impl Tags {
    /// Tag state over `store`, signing with `key` and accepting what `auth` allows.
    pub fn new(store: Store, key: SigningKey, auth: Auth) -> Tags {
        Tags {
            store,
            auth,
            key: Arc::new(key),
            stats: Arc::default(),
            accepted: tokio::sync::broadcast::Sender::new(ACCEPTED_CAPACITY),
        }
    }

    /// Follows the records from peers (gossip, anti-entropy, pushes) that become current, as
    /// they are committed; not this node's own pushes, whose content is already here.
    pub fn accepted(&self) -> tokio::sync::broadcast::Receiver<VerifiedTagRecord> {
        self.accepted.subscribe()
    }

    /// The counters.
    pub fn stats(&self) -> &TagStats {
        &self.stats
    }

    /// The access state that decides which records count.
    pub fn auth(&self) -> &Auth {
        &self.auth
    }

    /// Checks and keeps a record from a peer. Never fails on bad input: the outcome says what
    /// happened, and the counters count it.
    pub async fn ingest(&self, signed: SignedTagRecord) -> Result<Ingest, StoreError> {
        let verified = match signed.verify() {
            Ok(v) => v,
            Err(e) => {
                self.stats.invalid.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    error = &e as &dyn std::error::Error,
                    "rejected a tag record that does not verify"
                );
                return Ok(Ingest::Invalid);
            }
        };
        let record = verified.record();
        match self.check(record) {
            Ok(()) => {}
            Err(Ingest::Untrusted) => {
                self.stats.untrusted.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    repo = %record.repo, tag = %record.tag, publisher = %record.publisher,
                    "ignored a tag record from a publisher not trusted for the repository"
                );
                return Ok(Ingest::Untrusted);
            }
            Err(other) => {
                self.stats.invalid.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(repo = %record.repo, tag = %record.tag, "rejected a tag record from the future");
                return Ok(other);
            }
        }
        self.rederive_if_stale(&record.repo, &record.tag).await?;
        let immutable = !self.auth.tag_is_mutable(&record.repo, &record.tag);
        let (repo, tag) = (record.repo.clone(), record.tag.clone());
        let (current, deleted_at) = self
            .store
            .read(move |i| Ok((i.record(&repo, &tag)?, i.deleted_at(&repo, &tag)?)))
            .await?;
        let current = current.as_ref().map(VerifiedTagRecord::record);
        if !supersedes(current, deleted_at, record, immutable) {
            let moves = immutable
                && current
                    .and_then(|c| c.target.as_ref())
                    .zip(record.target.as_ref())
                    .is_some_and(|(a, b)| a.manifest != b.manifest);
            self.stats.stale.fetch_add(1, Ordering::Relaxed);
            return Ok(if moves {
                tracing::info!(repo = %record.repo, tag = %record.tag, "refused a record that would move an immutable tag");
                Ingest::Immutable
            } else {
                Ingest::Stale
            });
        }
        tracing::info!(
            repo = %record.repo, tag = %record.tag,
            target = %record.target.as_ref().map_or_else(|| "(deleted)".to_owned(), |t| t.manifest.to_string()),
            "accepted a tag record"
        );
        self.store
            .commit(Batch::new().record(verified.signed().clone(), immutable))
            .await?;
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        // Nobody following is fine: the send only fails then.
        let _ = self.accepted.send(verified);
        Ok(Ingest::Accepted)
    }

    /// Signs a record that points `repo:tag` at `target` (or deletes the tag, with `None`) and
    /// commits it after the changes of `before`, in one journal batch. The record is newer than
    /// the tag's current one even if this node's clock is behind the publisher of that one. An
    /// immutable tag that names another manifest is not moved.
    pub async fn publish(
        &self,
        repo: &RepoName,
        tag: &Tag,
        target: Option<TagTarget>,
        before: Batch,
    ) -> Result<VerifiedTagRecord, PublishError> {
        let action = crate::auth::record_action(target.as_ref());
        if !self.auth.may_publish(&self.key.public(), repo, action) {
            return Err(PublishError::NotAPublisher(repo.clone()));
        }
        let immutable = !self.auth.tag_is_mutable(repo, tag);
        self.rederive_if_stale(repo, tag).await?;
        let (r, t) = (repo.clone(), tag.clone());
        let (current, deleted_at) = self
            .store
            .read(move |i| Ok((i.record(&r, &t)?, i.deleted_at(&r, &t)?)))
            .await?;
        if immutable
            && let (Some(current), Some(new)) = (
                current.as_ref().and_then(|c| c.record().target.as_ref()),
                target.as_ref(),
            )
            && current.manifest != new.manifest
        {
            return Err(PublishError::Immutable {
                repo: repo.clone(),
                tag: tag.clone(),
                current: current.manifest.clone(),
            });
        }
        // Strictly after the current record (which counts, so it lies within the skew) and the
        // latest delete or expiry, even if this node's clock is behind their publisher's.
        let mut timestamp_ms = self.auth.clock().now_ms();
        let mut sequence = 0;
        let after = current
            .map(|c| (c.record().timestamp_ms, c.record().sequence))
            .into_iter()
            .chain(deleted_at.map(|(ts, seq, _)| (ts, seq)))
            .max();
        if let Some((ts, seq)) = after
            && ts >= timestamp_ms
        {
            (timestamp_ms, sequence) = match seq.checked_add(1) {
                Some(next) => (ts, next),
                None => (ts.saturating_add(1), 0),
            };
        }
        let record = TagRecord {
            repo: repo.clone(),
            tag: tag.clone(),
            target,
            timestamp_ms,
            sequence,
            publisher: self.key.public(),
        };
        let verified = SignedTagRecord::sign(&record, &self.key)
            .and_then(|s| s.verify())
            .map_err(StoreError::encode("a signed tag record"))?;
        self.store
            .commit(before.record(verified.signed().clone(), immutable))
            .await?;
        // A push is acknowledged only if the tag now names what it pushed: its record is the
        // current one, or a newer one arrived since, or the current one names the same thing.
        let (r, t) = (repo.clone(), tag.clone());
        let now = self.store.read(move |i| i.record(&r, &t)).await?;
        let ours = verified.record();
        let manifest = |r: &TagRecord| r.target.as_ref().map(|t| t.manifest.clone());
        let took = now
            .as_ref()
            .map(VerifiedTagRecord::record)
            .is_some_and(|c| c.order_key() > ours.order_key() || manifest(c) == manifest(ours));
        if !took {
            return Err(PublishError::Lost {
                repo: repo.clone(),
                tag: tag.clone(),
            });
        }
        Ok(verified)
    }

    /// Whether a verified record counts: its publisher may publish to the repository, and it
    /// claims no time beyond the clock skew. `Err` says why not ([`Ingest::Untrusted`] or
    /// [`Ingest::Invalid`]).
    pub fn check(&self, record: &TagRecord) -> Result<(), Ingest> {
        let action = crate::auth::record_action(record.target.as_ref());
        if !self
            .auth
            .may_publish(&record.publisher, &record.repo, action)
        {
            return Err(Ingest::Untrusted);
        }
        // A trusted key's record from beyond the clock skew would otherwise win every later one
        // for as long as its timestamp lies ahead: refused until that time comes.
        if record.timestamp_ms > latest_allowed_ms(self.auth.clock()) {
            return Err(Ingest::Invalid);
        }
        Ok(())
    }

    /// Re-derives the current record of every tag whose current record no longer counts (see
    /// the module doc). Returns how many tags changed. Reads every current record, and the
    /// journal if any needs it.
    pub async fn rederive(&self) -> Result<usize, StoreError> {
        let this = self.clone();
        let stale = self
            .store
            .read(move |i| {
                let mut stale = Vec::new();
                // Visits every record: the closure never breaks.
                let _all = i.visit_records(None, |signed| {
                    let counts = signed
                        .verify()
                        .is_ok_and(|v| this.check(v.record()).is_ok());
                    if !counts {
                        stale.push(signed);
                    }
                    std::ops::ControlFlow::Continue(())
                })?;
                Ok(stale)
            })
            .await?;
        self.rederive_records(stale).await
    }

    /// [`Tags::rederive`] for one tag, before a record of it is weighed against its current one.
    async fn rederive_if_stale(&self, repo: &RepoName, tag: &Tag) -> Result<(), StoreError> {
        let (r, t) = (repo.clone(), tag.clone());
        let current = self.store.read(move |i| i.record(&r, &t)).await?;
        if let Some(c) = current
            && self.check(c.record()).is_err()
        {
            self.rederive_records(vec![c.into_signed()]).await?;
        }
        Ok(())
    }

    /// Replaces each of `stale` (current records that stopped counting) by the newest record of
    /// its tag that still counts, found in the journal.
    async fn rederive_records(&self, stale: Vec<SignedTagRecord>) -> Result<usize, StoreError> {
        if stale.is_empty() {
            return Ok(0);
        }
        let stale: Vec<VerifiedTagRecord> =
            stale.into_iter().filter_map(|s| s.verify().ok()).collect();
        let wanted = stale
            .iter()
            .map(|v| (v.record().repo.clone(), v.record().tag.clone()))
            .collect();
        let history = self.store.tag_history(wanted).await?;
        let mut batch = Batch::new();
        for old in &stale {
            let old_record = old.record();
            let mut current: Option<VerifiedTagRecord> = None;
            let mut deleted_at = None;
            // The journal's records of the tag that still count, weighed in the order they
            // were accepted, as the index weighed them. An expiry (or a kept delete) counts
            // whoever signed the record it expired: what a retention policy took stays gone.
            for event in &history {
                let (signed, immutable) = match event {
                    TagEvent::Record { record, immutable } => (record, immutable),
                    TagEvent::DeletedAt { repo, tag, at } => {
                        if *repo == old_record.repo && *tag == old_record.tag {
                            deleted_at = deleted_at.max(Some(*at));
                            if current
                                .as_ref()
                                .is_some_and(|c| c.record().order_key() <= *at)
                            {
                                current = None;
                            }
                        }
                        continue;
                    }
                };
                let Ok(v) = signed.verify() else { continue };
                let r = v.record();
                if r.repo != old_record.repo || r.tag != old_record.tag || self.check(r).is_err() {
                    continue;
                }
                if supersedes(
                    current.as_ref().map(|c| c.record()),
                    deleted_at,
                    r,
                    *immutable,
                ) {
                    if r.is_tombstone() {
                        deleted_at = Some(r.order_key());
                    }
                    current = Some(v);
                }
            }
            tracing::warn!(
                repo = %old_record.repo, tag = %old_record.tag, publisher = %old_record.publisher,
                timestamp_ms = old_record.timestamp_ms,
                fallback = ?current.as_ref().map(|c| c.record().order_key()),
                "a tag's current record no longer counts (its publisher is not trusted, or it is \
                 from the future); the tag falls back to the newest record that does"
            );
            batch = batch.rederived(
                old.signed().clone(),
                current.map(VerifiedTagRecord::into_signed),
                deleted_at,
            );
        }
        self.store.commit(batch).await?;
        Ok(stale.len())
    }

    /// The target of a manifest push: the manifest and every blob it (or, for an index, its
    /// children) names, each with its `BlobIndex` id so peers can check chunks before storing.
    pub async fn target_for(
        &self,
        repo: &RepoName,
        digest: &Digest,
        info: &ManifestInfo,
    ) -> Result<TagTarget, StoreError> {
        self.target_of(repo, digest, info, false).await
    }

    /// [`Tags::target_for`] with only the blobs this node holds: a mirror's record, signed
    /// again as the upstream's blobs arrive.
    pub async fn held_target_for(
        &self,
        repo: &RepoName,
        digest: &Digest,
        info: &ManifestInfo,
    ) -> Result<TagTarget, StoreError> {
        self.target_of(repo, digest, info, true).await
    }

    async fn target_of(
        &self,
        repo: &RepoName,
        digest: &Digest,
        info: &ManifestInfo,
        held_only: bool,
    ) -> Result<TagTarget, StoreError> {
        let mut blobs = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut add = |d: &Digest, blobs: &mut Vec<Digest>| {
            if seen.insert(d.clone()) {
                blobs.push(d.clone());
            }
        };
        let mut wanted = Vec::new();
        for b in &info.blobs {
            add(b, &mut wanted);
        }
        for child in &info.manifests {
            add(child, &mut wanted);
            let (r, c) = (repo.clone(), child.clone());
            if let Some(ci) = self.store.read(move |i| i.manifest(&r, &c)).await? {
                for b in &ci.blobs {
                    add(b, &mut wanted);
                }
            }
        }
        for d in wanted {
            if held_only && self.store.blob_size(&d).await?.is_none() {
                continue;
            }
            // Checked by the caller; only garbage collection can have taken it since.
            let Some(index) = self.store.blob_index(&d).await? else {
                if held_only {
                    continue;
                }
                return Err(StoreError::BlobGone(d));
            };
            blobs.push(BlobRef {
                digest: d,
                size: index.size(),
                index: index.id(),
            });
        }
        Ok(TagTarget {
            manifest: digest.clone(),
            media_type: info.media_type.clone(),
            size: info.size,
            blobs,
        })
    }
}
