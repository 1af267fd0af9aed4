//! The store's change vocabulary: what a repository can be told to link, index, tag or forget.
//!
//! A [`Change`] is one line of the records log (`journal.v1.log`) and one update of the index;
//! the journal writes changes and the index applies them, and neither needs the other to say
//! what a change is. Callers outside the store never build changes one by one: they call the
//! store's typed operations ([`Store::link`](super::Store::link) and its siblings) or gather
//! several changes that must land together in a [`Batch`].

use serde::{Deserialize, Serialize};
use shoal_protocol::fleet::{MemberProof, SignedPolicy};
use shoal_protocol::{BlobRef, Digest, RepoName, SignedTagRecord, Tag, TagRecord};

use crate::manifest::ManifestInfo;

/// One change to the repository state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Change {
    /// The repository links a blob (an upload finished or a blob was mounted).
    Link {
        /// Repository.
        repo: RepoName,
        /// Blob.
        digest: Digest,
    },
    /// The blob was deleted from the repository (the file stays for other repositories).
    Unlink {
        /// Repository.
        repo: RepoName,
        /// Blob.
        digest: Digest,
    },
    /// A manifest was pushed to the repository; its bytes are the blob `digest`.
    Manifest {
        /// Repository.
        repo: RepoName,
        /// Manifest digest.
        digest: Digest,
        /// What the index keeps about it.
        info: ManifestInfo,
    },
    /// The manifest and every tag naming it were deleted from the repository.
    DeleteManifest {
        /// Repository.
        repo: RepoName,
        /// Manifest digest.
        digest: Digest,
    },
    /// A verified, trusted tag record (or tombstone). It becomes the tag's current record by
    /// [`supersedes`]: if it is newer than the one held, by (timestamp, sequence, publisher); for
    /// an immutable tag, a record naming another manifest only if it is older (the first since
    /// the tag was last deleted wins).
    Record {
        /// The record, as signed.
        #[serde(with = "codec_hex")]
        record: SignedTagRecord,
        /// Whether the tag was immutable when the record was accepted (so that replaying the
        /// journal decides the same way whatever the policies are by then).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        immutable: bool,
    },
    /// The tag's current record was derived again, because the one held stopped counting (its
    /// publisher is no longer trusted, or it claims a time beyond the clock skew): `record`
    /// (the newest of the tag's records that still count, or none) and `deleted_at` replace
    /// what the index holds, provided the index still holds `replaces` (so that a record
    /// applied in between is not undone).
    Rederived {
        /// The record that stopped counting.
        #[serde(with = "codec_hex")]
        replaces: SignedTagRecord,
        /// The tag's current record from now on, if any of its records still counts.
        #[serde(with = "codec_hex_option", default)]
        record: Option<SignedTagRecord>,
        /// The order key of the latest tombstone among the records that still count.
        #[serde(default)]
        deleted_at: Option<OrderKey>,
    },
    /// A fleet policy, verified and signed by an admin of the node's fleet. It becomes the
    /// current one for its key if it is newer than the one held.
    Policy {
        /// The policy, as signed.
        #[serde(with = "codec_hex")]
        policy: SignedPolicy,
    },
    /// A member's proof, checked when it arrived; it replaces the member's earlier one.
    Member {
        /// The proof.
        #[serde(with = "codec_hex")]
        proof: MemberProof,
    },
    /// A retention policy expired the tag `record` names: if `record` is still the tag's current
    /// one, the tag is gone and its latest delete is at the record's order key, as if a tombstone
    /// of that order had arrived. The same record arriving again does not bring the tag back
    /// ([`supersedes`] refuses it); a newer one does. Every node decides the same from the same
    /// records and rules, so no record is signed for it.
    Expired {
        /// The tag's record that expired, as signed.
        #[serde(with = "codec_hex")]
        record: SignedTagRecord,
    },
    /// The disk quota evicted the blob's file: the repository no longer links it, but a
    /// current record that names it still does, so the next pull fetches it from the fleet.
    Evict {
        /// Repository.
        repo: RepoName,
        /// Blob.
        digest: Digest,
    },
    /// A line of a compacted journal: an entry of the index as the compaction rebuilt it from
    /// the journal before (see [`super::compact`]). Only compaction writes it.
    Kept {
        /// The entry.
        entry: Kept,
    },
}

/// What a compacted journal's snapshot holds: its header, then one line per entry of the
/// journal-derived index trees (each sets exactly one entry, so that replaying the snapshot
/// gives the very trees it was taken from, less the stale `blob_repos.v1` entries), then its
/// end. Signed records are kept signed and verified again when replayed; policies and member
/// proofs are kept as [`Change::Policy`] and [`Change::Member`] lines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Kept {
    /// The first line of a compacted journal: which generation of the journal it is. Offsets
    /// in the index carry the generation, so that an index applied to an earlier generation is
    /// never read against this one.
    Header {
        /// 1 for the first compaction, and one more for each after it.
        generation: u16,
    },
    /// The last line of the snapshot: the tail (changes since the compaction) follows.
    SnapshotEnd,
    /// A repository exists (`repos.v1`).
    Repo {
        /// Repository.
        repo: RepoName,
    },
    /// A repository links a blob (`links.v1`).
    Link {
        /// Repository.
        repo: RepoName,
        /// Blob.
        digest: Digest,
    },
    /// A manifest is in a repository (`manifests.v1`).
    Manifest {
        /// Repository.
        repo: RepoName,
        /// Manifest digest.
        digest: Digest,
        /// What the index keeps about it.
        info: ManifestInfo,
    },
    /// A manifest of a repository refers to a subject (`referrers.v1`).
    Referrer {
        /// Repository.
        repo: RepoName,
        /// The manifest referred to.
        subject: Digest,
        /// The manifest referring to it.
        referrer: Digest,
    },
    /// A tag's current record, as signed (`records.v1`, and `tags.v1` derived from it).
    Record {
        /// The record.
        #[serde(with = "codec_hex")]
        record: SignedTagRecord,
    },
    /// What a record said of a blob of a repository (`record_blobs.v1`).
    RecordBlob {
        /// Repository.
        repo: RepoName,
        /// The blob reference.
        #[serde(with = "codec_hex")]
        blob: BlobRef,
    },
    /// The order key of a tag's latest tombstone (`deleted_at.v1`).
    DeletedAt {
        /// Repository.
        repo: RepoName,
        /// Tag.
        tag: Tag,
        /// The order key.
        at: OrderKey,
    },
    /// A repository may name a blob (`blob_repos.v1`).
    BlobRepo {
        /// Blob.
        digest: Digest,
        /// Repository.
        repo: RepoName,
    },
}

/// Signed statements are kept in the journal in their exact signed encoding, hex-encoded, so
/// the signature still verifies when the journal is replayed.
mod codec_hex {
    use serde::de::DeserializeOwned;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use shoal_protocol::codec;

    pub fn serialize<T: Serialize, S: Serializer>(value: &T, s: S) -> Result<S::Ok, S::Error> {
        let bytes = codec::encode(value).map_err(serde::ser::Error::custom)?;
        s.serialize_str(&hex::encode(bytes))
    }

    pub fn deserialize<'de, T: DeserializeOwned, D: Deserializer<'de>>(
        d: D,
    ) -> Result<T, D::Error> {
        let text = String::deserialize(d)?;
        let bytes = hex::decode(text).map_err(serde::de::Error::custom)?;
        codec::decode(&bytes).map_err(serde::de::Error::custom)
    }
}

/// [`codec_hex`] for an optional value.
mod codec_hex_option {
    use serde::de::DeserializeOwned;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<T: Serialize, S: Serializer>(
        value: &Option<T>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Hex<'a, T: Serialize>(#[serde(with = "super::codec_hex")] &'a T);
        value.as_ref().map(Hex).serialize(s)
    }

    pub fn deserialize<'de, T: DeserializeOwned, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<T>, D::Error> {
        #[derive(Deserialize)]
        #[serde(bound = "T: DeserializeOwned")]
        struct Hex<T>(#[serde(with = "super::codec_hex")] T);
        Ok(Option::<Hex<T>>::deserialize(d)?.map(|Hex(v)| v))
    }
}

/// The order of records for one tag: (timestamp, sequence, publisher).
pub type OrderKey = (u64, u64, shoal_protocol::PublisherKey);

/// Whether `new` becomes the tag's current record over `current`. `deleted_at` is the order
/// key of the tag's latest tombstone (or expiry, see [`Change::Expired`]), if any: no record at
/// or before it names anything again. A mutable tag takes the newest record (last writer
/// wins). An immutable tag takes a newer tombstone, a record naming the manifest it already
/// names if newer, and a record naming another manifest only if it is older than the current
/// one but newer than the latest delete: so the first record since the tag was last deleted
/// wins on every node, whatever order records arrive in.
pub fn supersedes(
    current: Option<&TagRecord>,
    deleted_at: Option<OrderKey>,
    new: &TagRecord,
    immutable: bool,
) -> bool {
    let newer = current.is_none_or(|c| new.order_key() > c.order_key());
    if new.is_tombstone() {
        return newer;
    }
    // A record no newer than the latest delete or expiry: deleted already. (For a mutable tag
    // whose current record is that tombstone, `newer` says the same.)
    if deleted_at.is_some_and(|d| new.order_key() <= d) {
        return false;
    }
    if !immutable {
        return newer;
    }
    match current {
        None => true,
        Some(c) if c.is_tombstone() => newer,
        Some(c) => match (&c.target, &new.target) {
            (Some(a), Some(b)) if a.manifest == b.manifest => newer,
            _ => new.order_key() < c.order_key(),
        },
    }
}

/// Changes that land together: one journal write, one fsync, applied to the index in order.
/// Either all of them are acknowledged or none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[must_use = "a batch does nothing until it is committed"]
pub struct Batch {
    changes: Vec<Change>,
    /// Blobs that must still be stored when the batch commits (not journaled).
    requires: Vec<Digest>,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Batch {
        Batch::default()
    }

    /// `repo` links the blob `digest`.
    pub fn link(mut self, repo: &RepoName, digest: &Digest) -> Batch {
        self.changes.push(Change::Link {
            repo: repo.clone(),
            digest: digest.clone(),
        });
        self
    }

    /// `repo` no longer links the blob `digest`.
    pub fn unlink(mut self, repo: &RepoName, digest: &Digest) -> Batch {
        self.changes.push(Change::Unlink {
            repo: repo.clone(),
            digest: digest.clone(),
        });
        self
    }

    /// `repo` no longer links the blob `digest`, evicted by the disk quota (see
    /// [`Change::Evict`]).
    pub fn evict(mut self, repo: &RepoName, digest: &Digest) -> Batch {
        self.changes.push(Change::Evict {
            repo: repo.clone(),
            digest: digest.clone(),
        });
        self
    }

    /// The manifest `digest` (already stored as a blob) is in `repo`.
    pub fn manifest(mut self, repo: &RepoName, digest: &Digest, info: ManifestInfo) -> Batch {
        self.changes.push(Change::Manifest {
            repo: repo.clone(),
            digest: digest.clone(),
            info,
        });
        self
    }

    /// The manifest `digest` is no longer in `repo`.
    pub fn delete_manifest(mut self, repo: &RepoName, digest: &Digest) -> Batch {
        self.changes.push(Change::DeleteManifest {
            repo: repo.clone(),
            digest: digest.clone(),
        });
        self
    }

    /// A verified, trusted signed record (the caller checked both), for a tag that is
    /// `immutable` or not.
    pub fn record(mut self, record: SignedTagRecord, immutable: bool) -> Batch {
        self.changes.push(Change::Record { record, immutable });
        self
    }

    /// A tag's current record that stopped counting, replaced by `record` (see
    /// [`Change::Rederived`]).
    pub fn rederived(
        mut self,
        replaces: SignedTagRecord,
        record: Option<SignedTagRecord>,
        deleted_at: Option<OrderKey>,
    ) -> Batch {
        self.changes.push(Change::Rederived {
            replaces,
            record,
            deleted_at,
        });
        self
    }

    /// A checked fleet policy.
    pub fn policy(mut self, policy: SignedPolicy) -> Batch {
        self.changes.push(Change::Policy { policy });
        self
    }

    /// A checked member proof.
    pub fn member(mut self, proof: MemberProof) -> Batch {
        self.changes.push(Change::Member { proof });
        self
    }

    /// A retention policy expired the tag whose current record is `record` (see
    /// [`Change::Expired`]).
    pub fn expired(mut self, record: SignedTagRecord) -> Batch {
        self.changes.push(Change::Expired { record });
        self
    }

    /// Whether the batch holds no change.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// The batch commits only if these blobs are still stored then: garbage collection may
    /// sweep a blob between a request's checks and its commit (a pushed manifest's layers).
    pub fn requiring(mut self, digests: impl IntoIterator<Item = Digest>) -> Batch {
        self.requires.extend(digests);
        self
    }

    /// The changes, in order.
    pub fn into_changes(self) -> Vec<Change> {
        self.changes
    }

    /// The changes, in order, and the blobs they require.
    pub fn into_parts(self) -> (Vec<Change>, Vec<Digest>) {
        (self.changes, self.requires)
    }
}

impl FromIterator<Change> for Batch {
    fn from_iter<I: IntoIterator<Item = Change>>(changes: I) -> Batch {
        Batch {
            changes: changes.into_iter().collect(),
            requires: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_protocol::{SigningKey, TagTarget};

    fn record(manifest: Option<&str>, timestamp_ms: u64) -> TagRecord {
        TagRecord {
            repo: "team/app".parse().unwrap(),
            tag: "prod-1".parse().unwrap(),
            target: manifest.map(|m| TagTarget {
                manifest: Digest::sha256(m.as_bytes()),
                media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                size: 2,
                blobs: Vec::new(),
            }),
            timestamp_ms,
            sequence: 0,
            publisher: SigningKey::from_seed([3; 32]).public(),
        }
    }

    #[test]
    fn after_an_expiry_only_a_newer_record_names_the_tag_again() {
        let expired = record(Some("a"), 1_000);
        let at = Some(expired.order_key());
        for immutable in [false, true] {
            // No current record, the latest delete at the expired record's order.
            assert!(
                !supersedes(None, at, &expired, immutable),
                "the same record"
            );
            assert!(!supersedes(None, at, &record(Some("b"), 999), immutable));
            assert!(supersedes(None, at, &record(Some("b"), 1_001), immutable));
            // A tombstone still deletes, whatever its age.
            assert!(supersedes(None, at, &record(None, 500), immutable));
        }
        // Without an expiry or delete, a mutable tag takes any first record.
        assert!(supersedes(None, None, &record(Some("b"), 1), false));
    }
}
