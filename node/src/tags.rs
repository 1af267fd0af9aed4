//! Tag state: which signed record currently names each (repository, tag).
//!
//! Records arrive from local pushes (signed here), from gossip and from anti-entropy. A record
//! is kept only if its signature verifies and its publisher is trusted for the repository; the
//! current record of a tag is the kept one with the highest (timestamp, sequence, publisher), so
//! every node that holds the same records gives the same answer, whatever the arrival order. A
//! tombstone (a record with no target) deletes the tag. An old record replayed by a peer loses
//! to the newer one and changes nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use shoal_protocol::{
    BlobRef, Digest, RepoName, SignedTagRecord, SigningKey, Tag, TagRecord, TagTarget,
    VerifiedTagRecord,
};

use crate::manifest::ManifestInfo;
use crate::store::{Event, Store, StoreError};
use crate::trust::Trust;

/// Counters of what happened to incoming records.
#[derive(Debug, Default)]
pub struct TagStats {
    /// Records that became current.
    pub accepted: AtomicU64,
    /// Records older than (or equal to) the current one: replays and losers.
    pub stale: AtomicU64,
    /// Records whose publisher is not trusted for the repository.
    pub untrusted: AtomicU64,
    /// Records that did not verify or decode.
    pub invalid: AtomicU64,
}

/// What became of an incoming record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ingest {
    /// It is now the tag's current record.
    Accepted,
    /// The node already holds this record or a newer one.
    Stale,
    /// Its publisher is not trusted for the repository.
    Untrusted,
    /// It does not verify.
    Invalid,
}

/// Handle to the tag state (cheap to clone).
#[derive(Clone)]
pub struct Tags {
    store: Store,
    trust: Arc<std::sync::RwLock<Trust>>,
    key: Arc<SigningKey>,
    stats: Arc<TagStats>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Tags {
    /// Tag state over `store`, signing with `key` and accepting what `trust` allows.
    pub fn new(store: Store, key: SigningKey, trust: Trust) -> Tags {
        Tags {
            store,
            trust: Arc::new(std::sync::RwLock::new(trust)),
            key: Arc::new(key),
            stats: Arc::default(),
        }
    }

    /// The counters.
    pub fn stats(&self) -> &TagStats {
        &self.stats
    }

    fn trusted(&self, record: &TagRecord) -> bool {
        self.trust
            .read()
            .map(|t| t.allows(&record.publisher, &record.repo))
            .unwrap_or(false)
    }

    /// Checks and keeps a record from a peer. Never fails on bad input: the outcome says what
    /// happened, and the counters count it.
    pub async fn ingest(&self, signed: SignedTagRecord) -> Result<Ingest, StoreError> {
        let verified = match signed.verify() {
            Ok(v) => v,
            Err(e) => {
                self.stats.invalid.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "rejected a tag record that does not verify");
                return Ok(Ingest::Invalid);
            }
        };
        let record = verified.record();
        if !self.trusted(record) {
            self.stats.untrusted.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                repo = %record.repo, tag = %record.tag, publisher = %record.publisher,
                "ignored a tag record from a publisher not trusted for the repository"
            );
            return Ok(Ingest::Untrusted);
        }
        let (repo, tag) = (record.repo.clone(), record.tag.clone());
        let current = self.store.read(move |i| i.record(&repo, &tag)).await?;
        if current.is_some_and(|c| c.record().order_key() >= record.order_key()) {
            self.stats.stale.fetch_add(1, Ordering::Relaxed);
            return Ok(Ingest::Stale);
        }
        tracing::info!(
            repo = %record.repo, tag = %record.tag,
            target = %record.target.as_ref().map_or_else(|| "(deleted)".to_owned(), |t| t.manifest.to_string()),
            "accepted a tag record"
        );
        self.store
            .commit(vec![Event::Record {
                record: verified.into_signed(),
            }])
            .await?;
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        Ok(Ingest::Accepted)
    }

    /// Signs a record that points `repo:tag` at `target` (or deletes the tag, with `None`) and
    /// commits it after `before`, in one journal batch. The record is newer than the tag's
    /// current one even if this node's clock is behind the publisher of that one.
    pub async fn publish(
        &self,
        repo: &RepoName,
        tag: &Tag,
        target: Option<TagTarget>,
        before: Vec<Event>,
    ) -> Result<VerifiedTagRecord, StoreError> {
        let (r, t) = (repo.clone(), tag.clone());
        let current = self.store.read(move |i| i.record(&r, &t)).await?;
        let mut timestamp_ms = now_ms();
        let mut sequence = 0;
        if let Some(c) = current {
            let c = c.record();
            if c.timestamp_ms >= timestamp_ms {
                timestamp_ms = c.timestamp_ms;
                sequence = c.sequence.saturating_add(1);
            }
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
            .map_err(|e| StoreError::Corrupt(format!("signing a tag record: {e}")))?;
        let mut events = before;
        events.push(Event::Record {
            record: verified.signed().clone(),
        });
        self.store.commit(events).await?;
        Ok(verified)
    }

    /// The target of a manifest push: the manifest and every blob it (or, for an index, its
    /// children) names, each with its `BlobIndex` id so peers can check chunks before storing.
    pub async fn target_for(
        &self,
        repo: &RepoName,
        digest: &Digest,
        info: &ManifestInfo,
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
            let index = self.store.blob_index(&d).await?.ok_or_else(|| {
                StoreError::Corrupt(format!("blob {d} is referenced but not stored"))
            })?;
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
