//! The sled index: the only code that touches sled.
//!
//! The index is a cache of the journal and the upload directories, shaped for the registry's
//! reads. Trees (keys joined with a NUL byte, which no name, tag or digest contains):
//!
//! | tree           | key                               | value                    |
//! |----------------|-----------------------------------|--------------------------|
//! | `repos.v1`     | repo                              | empty                    |
//! | `links.v1`     | repo, digest                      | empty                    |
//! | `manifests.v1` | repo, digest                      | JSON `ManifestInfo`      |
//! | `tags.v1`      | repo, tag                         | manifest digest          |
//! | `records.v1`   | repo, tag                         | current signed record    |
//! | `record_blobs.v1` | repo, digest                   | `BlobRef` from a record  |
//! | `referrers.v1` | repo, subject digest, referrer    | empty                    |
//! | `deleted_at.v1` | repo, tag                        | order key of its latest tombstone |
//! | `blob_repos.v1` | digest, repo                     | empty (a repo may name it) |
//! | `fleet.v1`     | `policy/<key>` or `member/<key>`  | `FleetItem` (codec)      |
//! | `blob_indexes.v1` | digest                         | `BlobIndex` (codec)      |
//! | `uploads.v1`   | upload id                         | JSON `UploadMeta`        |
//! | `meta.v1`      | `journal_applied`                 | u64 BE offset            |
//!
//! `tags.v1` and `record_blobs.v1` are derived from `records.v1`: a tag names what its current
//! record names. `blob_repos.v1` lists every repository that ever linked, held as a manifest or
//! named a blob in a record: it may hold stale entries, and [`Index::repos_of_blob`] confirms each
//! one against the other trees (a compaction keeps only the entries that still count, and
//! `fsck` compares the tree without the stale ones). `blob_indexes.v1` is derived from the blob
//! files.
//!
//! Only the journal thread writes the journal-derived trees, one change at a time, each in one
//! sled transaction with the applied offset: after a crash the index is exactly the journal up
//! to the recorded offset, and a start replays the rest.
//!
//! sled never writes again after one of its writes failed (it keeps the error for good), so an
//! [`Index`] is a handle that can drop its sled database and open it again while the node runs:
//! see the `handle` module for how a full disk stops writes and how room brings them back.

use std::ops::ControlFlow;
use std::path::Path;

use shoal_protocol::fleet::FleetItem;
use shoal_protocol::fleet::SignedPolicy;
use shoal_protocol::{
    BlobIndex, BlobRef, Digest, RepoName, SignedTagRecord, Tag, VerifiedTagRecord, codec,
};

use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};

use super::StoreError;
use super::change::{Change, Kept, OrderKey, supersedes};
use super::upload::UploadMeta;
use crate::manifest::ManifestInfo;

mod handle;

pub use handle::Index;

const SEP: u8 = 0;
const APPLIED_KEY: &[u8] = b"journal_applied";
/// A raw key and value, as `fsck` compares them.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// What a page of referrers asks for (see [`Index::referrers_page`]).
#[derive(Debug, Clone, Copy)]
pub struct ReferrersPage<'a> {
    /// The last digest of the previous page.
    pub after: Option<&'a str>,
    /// The most entries.
    pub n: usize,
    /// About the most bytes of descriptors.
    pub max_bytes: usize,
    /// Only referrers of this artifact type.
    pub artifact_type: Option<&'a str>,
}

/// What a referrers listing shows of a manifest: its descriptor. Decoded from a manifest
/// entry, skipping what a descriptor does not show (the blob lists).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct Referrer {
    /// The manifest's digest (not in the entry: filled in from its key).
    #[serde(skip, default = "placeholder_digest")]
    pub digest: Digest,
    /// Its media type.
    pub media_type: String,
    /// Its size.
    pub size: u64,
    /// Its artifact type.
    pub artifact_type: Option<String>,
    /// Its annotations.
    pub annotations: Option<std::collections::BTreeMap<String, String>>,
}

fn placeholder_digest() -> Digest {
    Digest::sha256(b"")
}

impl Referrer {
    /// About how many bytes its descriptor takes in a response.
    pub fn weight(&self) -> usize {
        let annotations = self
            .annotations
            .iter()
            .flatten()
            .map(|(k, v)| k.len() + v.len() + 8)
            .sum::<usize>();
        200 + self.media_type.len()
            + self.artifact_type.as_ref().map_or(0, String::len)
            + annotations
    }
}

/// One open sled database and its trees: what an [`Index`] reads and writes, until a failure
/// makes it open a new one (see [`handle`]).
struct Trees {
    db: sled::Db,
    repos: sled::Tree,
    links: sled::Tree,
    manifests: sled::Tree,
    tags: sled::Tree,
    records: sled::Tree,
    record_blobs: sled::Tree,
    deleted_at: sled::Tree,
    blob_repos: sled::Tree,
    fleet: sled::Tree,
    referrers: sled::Tree,
    blob_indexes: sled::Tree,
    uploads: sled::Tree,
    meta: sled::Tree,
}

fn key(parts: &[&[u8]]) -> Vec<u8> {
    let mut k = Vec::with_capacity(parts.iter().map(|p| p.len() + 1).sum());
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            k.push(SEP);
        }
        k.extend_from_slice(p);
    }
    k
}

fn prefix(repo: &RepoName) -> Vec<u8> {
    let mut k = repo.as_str().as_bytes().to_vec();
    k.push(SEP);
    k
}

fn utf8(bytes: &[u8]) -> Result<&str, StoreError> {
    std::str::from_utf8(bytes).map_err(|_| StoreError::Corrupt("index key is not UTF-8".into()))
}

fn parse<T: std::str::FromStr>(bytes: &[u8]) -> Result<T, StoreError> {
    utf8(bytes)?
        .parse()
        .map_err(|_| StoreError::Corrupt("index holds an invalid name".into()))
}

impl Trees {
    /// Opens (or creates) the sled database in `dir`.
    fn open(dir: &Path) -> Result<Trees, StoreError> {
        Trees::from_db(sled::Config::new().path(dir).open()?)
    }

    /// A throwaway in-memory database.
    fn temporary() -> Result<Trees, StoreError> {
        Trees::from_db(sled::Config::new().temporary(true).open()?)
    }

    fn from_db(db: sled::Db) -> Result<Trees, StoreError> {
        Ok(Trees {
            repos: db.open_tree("repos.v1")?,
            links: db.open_tree("links.v1")?,
            manifests: db.open_tree("manifests.v1")?,
            tags: db.open_tree("tags.v1")?,
            records: db.open_tree("records.v1")?,
            record_blobs: db.open_tree("record_blobs.v1")?,
            deleted_at: db.open_tree("deleted_at.v1")?,
            blob_repos: db.open_tree("blob_repos.v1")?,
            fleet: db.open_tree("fleet.v1")?,
            referrers: db.open_tree("referrers.v1")?,
            blob_indexes: db.open_tree("blob_indexes.v1")?,
            uploads: db.open_tree("uploads.v1")?,
            meta: db.open_tree("meta.v1")?,
            db,
        })
    }

    /// Drops everything derived from the journal, so that it can be replayed from the start.
    pub fn clear_journal_state(&self) -> Result<(), StoreError> {
        for tree in self.journal_trees() {
            tree.clear()?;
        }
        self.meta.remove(APPLIED_KEY)?;
        Ok(())
    }

    fn journal_trees(&self) -> [&sled::Tree; 10] {
        [
            &self.repos,
            &self.links,
            &self.manifests,
            &self.tags,
            &self.records,
            &self.record_blobs,
            &self.deleted_at,
            &self.blob_repos,
            &self.fleet,
            &self.referrers,
        ]
    }

    /// Writes the index to disk.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    /// Journal offset up to which changes are applied.
    pub fn applied_offset(&self) -> Result<u64, StoreError> {
        match self.meta.get(APPLIED_KEY)? {
            None => Ok(0),
            Some(v) => {
                let bytes: [u8; 8] = v
                    .as_ref()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("bad journal offset".into()))?;
                Ok(u64::from_be_bytes(bytes))
            }
        }
    }

    /// Applies one journal change that ends at journal offset `end`, with the offset, in one
    /// sled transaction: a crash leaves the index before or after the change, never between,
    /// so replaying from the recorded offset gives what the journal says.
    pub fn apply(&self, change: &Change, end: u64) -> Result<(), StoreError> {
        self.apply_all(&[(change, end)])
    }

    /// Applies journal changes in their order, each with the offset where it ends, in one sled
    /// transaction, and records the last offset: all of them or none, as for one change. A
    /// transaction costs about the same for one change as for dozens (it takes every tree), so
    /// the journal applies each write's changes together.
    pub fn apply_all(&self, changes: &[(&Change, u64)]) -> Result<(), StoreError> {
        let Some(&(_, end)) = changes.last() else {
            return Ok(());
        };
        let trees = (
            &self.repos,
            &self.links,
            &self.manifests,
            &self.tags,
            &self.records,
            &self.record_blobs,
            &self.deleted_at,
            &self.blob_repos,
            &self.fleet,
            &self.referrers,
            &self.meta,
        );
        let outcome = trees.transaction(
            |(
                repos,
                links,
                manifests,
                tags,
                records,
                record_blobs,
                deleted_at,
                blob_repos,
                fleet,
                referrers,
                meta,
            )| {
                let tx = Tx {
                    repos,
                    links,
                    manifests,
                    tags,
                    records,
                    record_blobs,
                    deleted_at,
                    blob_repos,
                    fleet,
                    referrers,
                };
                for (change, _) in changes {
                    tx.apply(change)?;
                }
                meta.insert(APPLIED_KEY, &end.to_be_bytes())?;
                Ok(())
            },
        );
        outcome.map_err(|e| match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => StoreError::Index(e),
        })
    }

    /// Records that the index holds the journal up to `offset` (after a compaction moved the
    /// journal's offsets to a new generation).
    pub fn set_applied_offset(&self, offset: u64) -> Result<(), StoreError> {
        self.meta.insert(APPLIED_KEY, &offset.to_be_bytes())?;
        Ok(())
    }

    /// Hands `f` the journal-derived state as the changes that rebuild it exactly, one per
    /// entry (see [`Kept`]): replayed on an empty index, they give the same trees. For a
    /// compaction's snapshot.
    pub fn snapshot(
        &self,
        mut f: impl FnMut(Change) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut kept = |entry| f(Change::Kept { entry });
        let two = |k: &[u8]| -> Result<(Vec<u8>, Vec<u8>), StoreError> {
            let mut parts = k.splitn(2, |b| *b == SEP);
            match (parts.next(), parts.next()) {
                (Some(a), Some(b)) => Ok((a.to_vec(), b.to_vec())),
                _ => Err(StoreError::Corrupt("malformed index key".into())),
            }
        };
        for entry in self.repos.iter() {
            let (k, _) = entry?;
            kept(Kept::Repo { repo: parse(&k)? })?;
        }
        for entry in self.links.iter() {
            let (r, d) = two(&entry?.0)?;
            kept(Kept::Link {
                repo: parse(&r)?,
                digest: parse(&d)?,
            })?;
        }
        for entry in self.manifests.iter() {
            let (k, v) = entry?;
            let (r, d) = two(&k)?;
            let info =
                serde_json::from_slice(&v).map_err(StoreError::decode("a manifest entry"))?;
            kept(Kept::Manifest {
                repo: parse(&r)?,
                digest: parse(&d)?,
                info,
            })?;
        }
        for entry in self.referrers.iter() {
            let (k, _) = entry?;
            let mut parts = k.splitn(3, |b| *b == SEP);
            let (Some(r), Some(s), Some(d)) = (parts.next(), parts.next(), parts.next()) else {
                return Err(StoreError::Corrupt("malformed index key".into()));
            };
            kept(Kept::Referrer {
                repo: parse(r)?,
                subject: parse(s)?,
                referrer: parse(d)?,
            })?;
        }
        for entry in self.records.iter() {
            let (_, v) = entry?;
            let record = codec::decode(&v).map_err(StoreError::decode("a signed record"))?;
            kept(Kept::Record { record })?;
        }
        for entry in self.record_blobs.iter() {
            let (k, v) = entry?;
            let (r, _) = two(&k)?;
            let blob = codec::decode(&v).map_err(StoreError::decode("a blob reference"))?;
            kept(Kept::RecordBlob {
                repo: parse(&r)?,
                blob,
            })?;
        }
        for entry in self.deleted_at.iter() {
            let (k, v) = entry?;
            let (r, t) = two(&k)?;
            kept(Kept::DeletedAt {
                repo: parse(&r)?,
                tag: parse(&t)?,
                at: decode_order(&v)?,
            })?;
        }
        // Only the entries that still count: a stale one (the repository no longer links,
        // holds or names the blob) changes no answer, and they grow with the history.
        for entry in self.blob_repos.iter() {
            let (d, r) = two(&entry?.0)?;
            let (digest, repo) = (parse(&d)?, parse(&r)?);
            if self.names_blob(&repo, &digest)? {
                kept(Kept::BlobRepo { digest, repo })?;
            }
        }
        for entry in self.fleet.iter() {
            let (_, v) = entry?;
            match codec::decode(&v).map_err(StoreError::decode("a fleet item"))? {
                FleetItem::Policy(policy) => f(Change::Policy { policy })?,
                FleetItem::Member(proof) => f(Change::Member { proof })?,
            }
        }
        Ok(())
    }

    /// The order key of the latest tombstone of the tag at `k`.
    fn deleted_at_key(&self, k: &[u8]) -> Result<Option<OrderKey>, StoreError> {
        self.deleted_at
            .get(k)?
            .map(|v| decode_order(&v))
            .transpose()
    }

    /// The latest tombstone's order key of a tag, if it was ever deleted.
    pub fn deleted_at(&self, repo: &RepoName, tag: &Tag) -> Result<Option<OrderKey>, StoreError> {
        self.deleted_at_key(&key(&[repo.as_str().as_bytes(), tag.as_str().as_bytes()]))
    }

    /// Every repository that links `digest`, holds it as a manifest, or whose current records
    /// name it.
    pub fn repos_of_blob(&self, digest: &Digest) -> Result<Vec<RepoName>, StoreError> {
        let mut p = digest.to_string().into_bytes();
        p.push(SEP);
        let mut out = Vec::new();
        for entry in self.blob_repos.scan_prefix(&p) {
            let (k, _) = entry?;
            let repo: RepoName = parse(&k[p.len()..])?;
            if self.is_linked(&repo, digest)?
                || self.manifest(&repo, digest)?.is_some()
                || self.record_blob(&repo, digest)?.is_some()
            {
                out.push(repo);
            }
        }
        Ok(out)
    }

    /// Hands the fleet items (current policies, then member proofs, in cursor order) to `f`,
    /// starting after `after`, until `f` breaks.
    pub fn visit_fleet(
        &self,
        after: Option<&str>,
        mut f: impl FnMut(FleetItem) -> ControlFlow<()>,
    ) -> Result<ControlFlow<()>, StoreError> {
        let iter = match after {
            Some(a) => self.fleet.range::<&[u8], _>((
                std::ops::Bound::Excluded(a.as_bytes()),
                std::ops::Bound::Unbounded,
            )),
            None => self.fleet.iter(),
        };
        for entry in iter {
            let (_, v) = entry?;
            let item = codec::decode(&v).map_err(StoreError::decode("a fleet item"))?;
            if f(item).is_break() {
                return Ok(ControlFlow::Break(()));
            }
        }
        Ok(ControlFlow::Continue(()))
    }

    fn record_at(&self, k: &[u8]) -> Result<Option<VerifiedTagRecord>, StoreError> {
        self.records.get(k)?.map(|v| decode_record(&v)).transpose()
    }

    /// The current record of a tag (a tombstone if the tag was deleted).
    pub fn record(
        &self,
        repo: &RepoName,
        tag: &Tag,
    ) -> Result<Option<VerifiedTagRecord>, StoreError> {
        self.record_at(&key(&[repo.as_str().as_bytes(), tag.as_str().as_bytes()]))
    }

    /// Hands the current records of `repo` (tombstones included) to `f`, in tag order.
    pub fn visit_repo_records(
        &self,
        repo: &RepoName,
        mut f: impl FnMut(SignedTagRecord),
    ) -> Result<(), StoreError> {
        for entry in self.records.scan_prefix(prefix(repo)) {
            let (_, v) = entry?;
            f(codec::decode(&v).map_err(StoreError::decode("a signed record"))?);
        }
        Ok(())
    }

    /// Hands the current records (tombstones included) to `f` in (repo, tag) order, starting
    /// after `after`, until `f` breaks. Returns `Break` if `f` stopped before the last record.
    pub fn visit_records(
        &self,
        after: Option<(&RepoName, &Tag)>,
        mut f: impl FnMut(SignedTagRecord) -> ControlFlow<()>,
    ) -> Result<ControlFlow<()>, StoreError> {
        let iter = match after {
            Some((r, t)) => self.records.range::<Vec<u8>, _>((
                std::ops::Bound::Excluded(key(&[r.as_str().as_bytes(), t.as_str().as_bytes()])),
                std::ops::Bound::Unbounded,
            )),
            None => self.records.iter(),
        };
        for entry in iter {
            let (_, v) = entry?;
            let record = codec::decode(&v).map_err(StoreError::decode("a signed record"))?;
            if f(record).is_break() {
                return Ok(ControlFlow::Break(()));
            }
        }
        Ok(ControlFlow::Continue(()))
    }

    /// What a current record of `repo` says about the blob, if any record names it.
    pub fn record_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<BlobRef>, StoreError> {
        let k = key(&[repo.as_str().as_bytes(), digest.to_string().as_bytes()]);
        match self.record_blobs.get(k)? {
            None => Ok(None),
            Some(v) => codec::decode(&v)
                .map(Some)
                .map_err(StoreError::decode("a blob reference")),
        }
    }

    /// The recorded `BlobIndex` of a blob.
    pub fn blob_index(&self, digest: &Digest) -> Result<Option<BlobIndex>, StoreError> {
        match self.blob_indexes.get(digest.to_string())? {
            None => Ok(None),
            Some(v) => codec::decode(&v)
                .map(Some)
                .map_err(StoreError::decode("a blob index")),
        }
    }

    /// Records a blob's `BlobIndex`.
    pub fn put_blob_index(&self, index: &BlobIndex) -> Result<(), StoreError> {
        let v = codec::encode(index).map_err(StoreError::encode("a blob index"))?;
        self.blob_indexes.insert(index.digest().to_string(), v)?;
        Ok(())
    }

    /// Forgets the `BlobIndex` of a blob no longer stored.
    pub fn remove_blob_index(&self, digest: &Digest) -> Result<(), StoreError> {
        self.blob_indexes.remove(digest.to_string())?;
        Ok(())
    }

    /// Hands every manifest entry of `repo` (of every repository if `None`) to `f`.
    pub fn visit_manifests(
        &self,
        repo: Option<&RepoName>,
        mut f: impl FnMut(RepoName, Digest, ManifestInfo),
    ) -> Result<(), StoreError> {
        let entries = match repo {
            Some(r) => self.manifests.scan_prefix(prefix(r)),
            None => self.manifests.iter(),
        };
        for entry in entries {
            let (k, v) = entry?;
            let mut parts = k.splitn(2, |b| *b == SEP);
            let (Some(r), Some(d)) = (parts.next(), parts.next()) else {
                return Err(StoreError::Corrupt("malformed index key".into()));
            };
            let info: ManifestInfo =
                serde_json::from_slice(&v).map_err(StoreError::decode("a manifest entry"))?;
            f(parse(r)?, parse(d)?, info);
        }
        Ok(())
    }

    /// Tags of `repo` that currently name `digest`.
    pub fn tags_naming(&self, repo: &RepoName, digest: &Digest) -> Result<Vec<Tag>, StoreError> {
        let p = prefix(repo);
        let d = digest.to_string();
        let mut out = Vec::new();
        for entry in self.tags.scan_prefix(&p) {
            let (k, v) = entry?;
            if v.as_ref() == d.as_bytes() {
                out.push(parse(&k[p.len()..])?);
            }
        }
        Ok(out)
    }

    /// Whether the repository exists (anything was ever pushed to it).
    pub fn repo_exists(&self, repo: &RepoName) -> Result<bool, StoreError> {
        Ok(self.repos.contains_key(repo.as_str())?)
    }

    /// Repositories in order, after `last`, at most `n`.
    pub fn repos(&self, last: Option<&str>, n: usize) -> Result<Vec<RepoName>, StoreError> {
        let iter = match last {
            Some(l) => self.repos.range::<&[u8], _>((
                std::ops::Bound::Excluded(l.as_bytes()),
                std::ops::Bound::Unbounded,
            )),
            None => self.repos.iter(),
        };
        iter.take(n).map(|e| parse(&e?.0)).collect()
    }

    /// Whether the repository links the blob.
    pub fn is_linked(&self, repo: &RepoName, digest: &Digest) -> Result<bool, StoreError> {
        let k = key(&[repo.as_str().as_bytes(), digest.to_string().as_bytes()]);
        Ok(self.links.contains_key(k)?)
    }

    /// The manifest `digest` in `repo`, if it is there.
    pub fn manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<ManifestInfo>, StoreError> {
        let k = key(&[repo.as_str().as_bytes(), digest.to_string().as_bytes()]);
        match self.manifests.get(k)? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(StoreError::decode("a manifest entry")),
        }
    }

    /// What the tag names.
    pub fn tag(&self, repo: &RepoName, tag: &Tag) -> Result<Option<Digest>, StoreError> {
        let k = key(&[repo.as_str().as_bytes(), tag.as_str().as_bytes()]);
        self.tags.get(k)?.map(|v| parse(&v)).transpose()
    }

    /// Tags of the repository in order, after `last`, at most `n`.
    pub fn tags(
        &self,
        repo: &RepoName,
        last: Option<&str>,
        n: usize,
    ) -> Result<Vec<Tag>, StoreError> {
        let p = prefix(repo);
        let start = match last {
            Some(l) => {
                let mut k = p.clone();
                k.extend_from_slice(l.as_bytes());
                std::ops::Bound::Excluded(k)
            }
            None => std::ops::Bound::Included(p.clone()),
        };
        let mut out = Vec::new();
        for entry in self.tags.range((start, std::ops::Bound::Unbounded)) {
            let (k, _) = entry?;
            let Some(tag) = k.strip_prefix(p.as_slice()) else {
                break;
            };
            if out.len() >= n {
                break;
            }
            out.push(parse(tag)?);
        }
        Ok(out)
    }

    /// One page of the manifests in `repo` whose subject is `subject`, in digest order after
    /// `after`: at most `n`, and no more (past the first) once their descriptors hold about
    /// `max_bytes`; with `artifact_type`, only those of that type. Reads the range from the
    /// cursor, one entry at a time, and decodes of each manifest entry only what a descriptor
    /// shows. Returns the page and whether the listing goes on past it.
    pub fn referrers_page(
        &self,
        repo: &RepoName,
        subject: &Digest,
        page: &ReferrersPage<'_>,
    ) -> Result<(Vec<Referrer>, bool), StoreError> {
        let mut p = prefix(repo);
        p.extend_from_slice(subject.to_string().as_bytes());
        p.push(SEP);
        let start = match page.after {
            Some(after) => {
                let mut k = p.clone();
                k.extend_from_slice(after.as_bytes());
                std::ops::Bound::Excluded(k)
            }
            None => std::ops::Bound::Included(p.clone()),
        };
        let (mut out, mut bytes) = (Vec::new(), 0usize);
        for entry in self.referrers.range((start, std::ops::Bound::Unbounded)) {
            let (k, _) = entry?;
            let Some(rest) = k.strip_prefix(p.as_slice()) else {
                break;
            };
            if out.len() >= page.n || (!out.is_empty() && bytes >= page.max_bytes) {
                return Ok((out, true));
            }
            let digest: Digest = parse(rest)?;
            let mkey = key(&[repo.as_str().as_bytes(), rest]);
            let Some(value) = self.manifests.get(mkey)? else {
                continue;
            };
            let info: Referrer =
                serde_json::from_slice(&value).map_err(StoreError::decode("a manifest entry"))?;
            let info = Referrer { digest, ..info };
            if page
                .artifact_type
                .is_some_and(|t| info.artifact_type.as_deref() != Some(t))
            {
                continue;
            }
            bytes = bytes.saturating_add(info.weight());
            out.push(info);
        }
        Ok((out, false))
    }

    /// Manifests in `repo` whose subject is `subject`, all at once (for checks; the registry
    /// serves [`Index::referrers_page`]).
    pub fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
    ) -> Result<Vec<(Digest, ManifestInfo)>, StoreError> {
        let mut p = prefix(repo);
        p.extend_from_slice(subject.to_string().as_bytes());
        p.push(SEP);
        let mut out = Vec::new();
        for entry in self.referrers.scan_prefix(&p) {
            let (k, _) = entry?;
            let digest: Digest = parse(&k[p.len()..])?;
            if let Some(info) = self.manifest(repo, &digest)? {
                out.push((digest, info));
            }
        }
        Ok(out)
    }

    /// Records an upload session.
    pub fn put_upload(&self, id: &str, meta: &UploadMeta) -> Result<(), StoreError> {
        let json = serde_json::to_vec(meta).map_err(StoreError::encode("an upload session"))?;
        self.uploads.insert(id, json)?;
        Ok(())
    }

    /// An upload session.
    pub fn upload(&self, id: &str) -> Result<Option<UploadMeta>, StoreError> {
        match self.uploads.get(id)? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(StoreError::decode("an upload session")),
        }
    }

    /// Forgets an upload session.
    pub fn remove_upload(&self, id: &str) -> Result<(), StoreError> {
        self.uploads.remove(id)?;
        Ok(())
    }

    /// Ids of every upload session.
    pub fn upload_ids(&self) -> Result<Vec<String>, StoreError> {
        self.uploads
            .iter()
            .keys()
            .map(|k| Ok(utf8(&k?)?.to_owned()))
            .collect()
    }

    /// Whether `repo` links `digest`, holds it as a manifest or names it in a record: what
    /// confirms an entry of `blob_repos.v1`.
    fn names_blob(&self, repo: &RepoName, digest: &Digest) -> Result<bool, StoreError> {
        Ok(self.is_linked(repo, digest)?
            || self.manifest(repo, digest)?.is_some()
            || self.record_blob(repo, digest)?.is_some())
    }

    /// [`Index::dump_journal_trees`] without the stale entries of `blob_repos.v1` (which a
    /// compaction drops): what two indexes of the same journal, compacted or not, agree on.
    pub fn dump_comparable_trees(&self) -> Result<Vec<(String, Vec<KeyValue>)>, StoreError> {
        let mut trees = self.dump_journal_trees()?;
        for (name, entries) in &mut trees {
            if name.as_str() != "blob_repos.v1" {
                continue;
            }
            let mut live = Vec::with_capacity(entries.len());
            for (k, v) in entries.drain(..) {
                let mut parts = k.splitn(2, |b| *b == SEP);
                let (Some(d), Some(r)) = (parts.next(), parts.next()) else {
                    return Err(StoreError::Corrupt("malformed index key".into()));
                };
                if self.names_blob(&parse(r)?, &parse(d)?)? {
                    live.push((k, v));
                }
            }
            *entries = live;
        }
        Ok(trees)
    }

    /// Every (key, value) of each journal-derived tree, by tree name, for `fsck` to compare
    /// two indexes.
    pub fn dump_journal_trees(&self) -> Result<Vec<(String, Vec<KeyValue>)>, StoreError> {
        self.journal_trees()
            .into_iter()
            .map(|t| {
                let entries = t.iter().map(|e| e.map(|(k, v)| (k.to_vec(), v.to_vec())));
                let entries = entries.collect::<Result<Vec<_>, _>>()?;
                Ok((String::from_utf8_lossy(&t.name()).into_owned(), entries))
            })
            .collect()
    }

    /// Every blob any repository links or names as a manifest, with the repository.
    pub fn referenced_blobs(&self) -> Result<Vec<(RepoName, Digest)>, StoreError> {
        let mut out = Vec::new();
        for tree in [&self.links, &self.manifests] {
            for entry in tree.iter() {
                let (k, _) = entry?;
                let mut parts = k.splitn(2, |b| *b == SEP);
                let (Some(r), Some(d)) = (parts.next(), parts.next()) else {
                    return Err(StoreError::Corrupt("malformed index key".into()));
                };
                out.push((parse(r)?, parse(d)?));
            }
        }
        Ok(out)
    }
}

/// What one change touches, inside the transaction that applies it (see [`Index::apply`]).
struct Tx<'a> {
    repos: &'a TransactionalTree,
    links: &'a TransactionalTree,
    manifests: &'a TransactionalTree,
    tags: &'a TransactionalTree,
    records: &'a TransactionalTree,
    record_blobs: &'a TransactionalTree,
    deleted_at: &'a TransactionalTree,
    blob_repos: &'a TransactionalTree,
    fleet: &'a TransactionalTree,
    referrers: &'a TransactionalTree,
}

/// The result of a step inside the transaction: an abort carries the store's error.
type TxResult<T = ()> = Result<T, ConflictableTransactionError<StoreError>>;

impl From<StoreError> for ConflictableTransactionError<StoreError> {
    fn from(e: StoreError) -> Self {
        ConflictableTransactionError::Abort(e)
    }
}

impl Tx<'_> {
    fn apply(&self, change: &Change) -> TxResult {
        match change {
            Change::Link { repo, digest } => {
                self.repos.insert(repo.as_str(), &[])?;
                self.links.insert(
                    key(&[repo.as_str().as_bytes(), digest.to_string().as_bytes()]),
                    &[],
                )?;
                self.name_blob(digest, repo)?;
            }
            Change::Unlink { repo, digest } => {
                // A blob deleted from a repository is gone from it, even where a record names it:
                // the record's reference goes too (a later record naming it brings it back).
                let k = key(&[repo.as_str().as_bytes(), digest.to_string().as_bytes()]);
                self.links.remove(k.as_slice())?;
                self.record_blobs.remove(k)?;
            }
            Change::Evict { repo, digest } => {
                // Unlike an unlink, the record's reference stays: the blob is fetched again.
                let k = key(&[repo.as_str().as_bytes(), digest.to_string().as_bytes()]);
                self.links.remove(k)?;
            }
            Change::Manifest { repo, digest, info } => {
                self.repos.insert(repo.as_str(), &[])?;
                self.name_blob(digest, repo)?;
                let d = digest.to_string();
                let json =
                    serde_json::to_vec(info).map_err(StoreError::encode("a manifest entry"))?;
                self.manifests
                    .insert(key(&[repo.as_str().as_bytes(), d.as_bytes()]), json)?;
                if let Some(subject) = &info.subject {
                    let s = subject.to_string();
                    self.referrers.insert(
                        key(&[repo.as_str().as_bytes(), s.as_bytes(), d.as_bytes()]),
                        &[],
                    )?;
                }
            }
            Change::DeleteManifest { repo, digest } => {
                let d = digest.to_string();
                let mkey = key(&[repo.as_str().as_bytes(), d.as_bytes()]);
                if let Some(old) = self.manifests.remove(mkey)? {
                    let info: ManifestInfo = serde_json::from_slice(&old)
                        .map_err(StoreError::decode("a manifest entry"))?;
                    if let Some(subject) = info.subject {
                        let s = subject.to_string();
                        self.referrers.remove(key(&[
                            repo.as_str().as_bytes(),
                            s.as_bytes(),
                            d.as_bytes(),
                        ]))?;
                    }
                }
            }
            Change::Record { record, immutable } => self.record(record, *immutable)?,
            Change::Rederived {
                replaces,
                record,
                deleted_at,
            } => self.rederived(replaces, record.as_ref(), *deleted_at)?,
            Change::Policy { policy } => self.policy(policy)?,
            Change::Member { proof } => {
                let item = FleetItem::Member(proof.clone());
                let v = codec::encode(&item).map_err(StoreError::encode("a member proof"))?;
                self.fleet.insert(item.cursor().as_bytes(), v)?;
            }
            Change::Expired { record } => self.expired(record)?,
            Change::Kept { entry } => self.kept(entry)?,
        }
        Ok(())
    }

    /// Sets the one entry a snapshot line stands for (see [`Kept`]).
    fn kept(&self, entry: &Kept) -> TxResult {
        let pair = |a: &str, b: &str| key(&[a.as_bytes(), b.as_bytes()]);
        match entry {
            Kept::Header { .. } | Kept::SnapshotEnd => {}
            Kept::Repo { repo } => {
                self.repos.insert(repo.as_str(), &[])?;
            }
            Kept::Link { repo, digest } => {
                self.links
                    .insert(pair(repo.as_str(), &digest.to_string()), &[])?;
            }
            Kept::Manifest { repo, digest, info } => {
                let json =
                    serde_json::to_vec(info).map_err(StoreError::encode("a manifest entry"))?;
                self.manifests
                    .insert(pair(repo.as_str(), &digest.to_string()), json)?;
            }
            Kept::Referrer {
                repo,
                subject,
                referrer,
            } => {
                let k = key(&[
                    repo.as_str().as_bytes(),
                    subject.to_string().as_bytes(),
                    referrer.to_string().as_bytes(),
                ]);
                self.referrers.insert(k, &[])?;
            }
            Kept::Record { record } => {
                // Verified again, like every record replayed: a damaged snapshot plants nothing.
                let Ok(verified) = record.verify() else {
                    tracing::error!(
                        "journal snapshot holds a record that does not verify; skipped"
                    );
                    return Ok(());
                };
                let rec = verified.record();
                let k = pair(rec.repo.as_str(), rec.tag.as_str());
                let bytes = codec::encode(record).map_err(StoreError::encode("a signed record"))?;
                self.records.insert(k.as_slice(), bytes)?;
                if let Some(target) = &rec.target {
                    self.tags
                        .insert(k, target.manifest.to_string().as_bytes())?;
                }
            }
            Kept::RecordBlob { repo, blob } => {
                let v = codec::encode(blob).map_err(StoreError::encode("a blob reference"))?;
                self.record_blobs
                    .insert(pair(repo.as_str(), &blob.digest.to_string()), v)?;
            }
            Kept::DeletedAt { repo, tag, at } => {
                let order = codec::encode(at).map_err(StoreError::encode("an order key"))?;
                self.deleted_at
                    .insert(pair(repo.as_str(), tag.as_str()), order)?;
            }
            Kept::BlobRepo { digest, repo } => self.name_blob(digest, repo)?,
        }
        Ok(())
    }

    /// Removes the tag whose current record is `signed`, and puts its latest delete at that
    /// record's order key (see [`Change::Expired`]); nothing if the tag has moved on since.
    fn expired(&self, signed: &SignedTagRecord) -> TxResult {
        let Ok(verified) = signed.verify() else {
            tracing::error!("journal holds an expired record that does not verify; skipped");
            return Ok(());
        };
        let rec = verified.record();
        let k = key(&[rec.repo.as_str().as_bytes(), rec.tag.as_str().as_bytes()]);
        let expired = codec::encode(signed).map_err(StoreError::encode("a signed record"))?;
        if self.records.get(k.as_slice())?.as_deref() != Some(expired.as_slice()) {
            return Ok(());
        }
        self.records.remove(k.as_slice())?;
        self.tags.remove(k.as_slice())?;
        let held = self
            .deleted_at
            .get(k.as_slice())?
            .map(|v| decode_order(&v))
            .transpose()?;
        let order = held.map_or(rec.order_key(), |h| h.max(rec.order_key()));
        let order = codec::encode(&order).map_err(StoreError::encode("an order key"))?;
        self.deleted_at.insert(k, order)?;
        Ok(())
    }

    fn record(&self, signed: &SignedTagRecord, immutable: bool) -> TxResult {
        // Records are verified before they are journaled; checking again on replay costs little
        // and keeps a damaged journal from planting a record.
        let Ok(verified) = signed.verify() else {
            tracing::error!("journal holds a record that does not verify; skipped");
            return Ok(());
        };
        let rec = verified.record();
        let k = key(&[rec.repo.as_str().as_bytes(), rec.tag.as_str().as_bytes()]);
        let current = self
            .records
            .get(k.as_slice())?
            .map(|v| decode_record(&v))
            .transpose()?;
        let deleted_at = self
            .deleted_at
            .get(k.as_slice())?
            .map(|v| decode_order(&v))
            .transpose()?;
        if !supersedes(
            current.as_ref().map(|c| c.record()),
            deleted_at,
            rec,
            immutable,
        ) {
            return Ok(());
        }
        let bytes = codec::encode(signed).map_err(StoreError::encode("a signed record"))?;
        self.records.insert(k.as_slice(), bytes)?;
        self.repos.insert(rec.repo.as_str(), &[])?;
        match &rec.target {
            Some(target) => {
                self.tags
                    .insert(k.as_slice(), target.manifest.to_string().as_bytes())?;
                self.name_blob(&target.manifest, &rec.repo)?;
                for b in &target.blobs {
                    let bk = key(&[
                        rec.repo.as_str().as_bytes(),
                        b.digest.to_string().as_bytes(),
                    ]);
                    let v = codec::encode(b).map_err(StoreError::encode("a blob reference"))?;
                    self.record_blobs.insert(bk, v)?;
                    self.name_blob(&b.digest, &rec.repo)?;
                }
            }
            None => {
                self.tags.remove(k.as_slice())?;
                let order =
                    codec::encode(&rec.order_key()).map_err(StoreError::encode("an order key"))?;
                self.deleted_at.insert(k, order)?;
            }
        }
        Ok(())
    }

    /// Replaces a tag's current record that stopped counting with the one derived again (see
    /// [`Change::Rederived`]), if the index still holds the one replaced.
    fn rederived(
        &self,
        replaces: &SignedTagRecord,
        record: Option<&SignedTagRecord>,
        deleted_at: Option<OrderKey>,
    ) -> TxResult {
        let Ok(old) = replaces.verify() else {
            tracing::error!("journal holds a replaced record that does not verify; skipped");
            return Ok(());
        };
        let old = old.record();
        let k = key(&[old.repo.as_str().as_bytes(), old.tag.as_str().as_bytes()]);
        let held = self.records.get(k.as_slice())?;
        let replaced = codec::encode(replaces).map_err(StoreError::encode("a signed record"))?;
        if held.as_deref() != Some(replaced.as_slice()) {
            return Ok(());
        }
        self.records.remove(k.as_slice())?;
        self.tags.remove(k.as_slice())?;
        match deleted_at {
            Some(order) => {
                let order = codec::encode(&order).map_err(StoreError::encode("an order key"))?;
                self.deleted_at.insert(k, order)?;
            }
            None => {
                self.deleted_at.remove(k)?;
            }
        }
        if let Some(record) = record {
            let same_tag = record
                .verify()
                .is_ok_and(|v| v.record().repo == old.repo && v.record().tag == old.tag);
            if same_tag {
                // Applied over an empty slot, it becomes current whatever its order.
                self.record(record, false)?;
            } else {
                tracing::error!("journal holds a rederived record of another tag; skipped");
            }
        }
        Ok(())
    }

    fn policy(&self, signed: &SignedPolicy) -> TxResult {
        // Checked against the fleet before it was journaled; the signature is checked again so a
        // damaged journal cannot plant a policy.
        let Ok(verified) = signed.verify() else {
            tracing::error!("journal holds a policy that does not verify; skipped");
            return Ok(());
        };
        let item = FleetItem::Policy(signed.clone());
        let k = item.cursor();
        if let Some(v) = self.fleet.get(k.as_bytes())? {
            if let Ok(FleetItem::Policy(current)) = codec::decode::<FleetItem>(&v)
                && let Ok(current) = current.verify()
                && current.statement().order_key() >= verified.statement().order_key()
            {
                return Ok(());
            }
        }
        let v = codec::encode(&item).map_err(StoreError::encode("a policy"))?;
        self.fleet.insert(k.as_bytes(), v)?;
        Ok(())
    }

    fn name_blob(&self, digest: &Digest, repo: &RepoName) -> TxResult {
        self.blob_repos.insert(
            key(&[digest.to_string().as_bytes(), repo.as_str().as_bytes()]),
            &[],
        )?;
        Ok(())
    }
}

fn decode_record(bytes: &[u8]) -> Result<VerifiedTagRecord, StoreError> {
    let signed: SignedTagRecord =
        codec::decode(bytes).map_err(StoreError::decode("a signed record"))?;
    signed
        .verify()
        .map_err(StoreError::decode("a signed record's signature"))
}

fn decode_order(bytes: &[u8]) -> Result<OrderKey, StoreError> {
    codec::decode(bytes).map_err(StoreError::decode("an order key"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(subject: Option<Digest>) -> ManifestInfo {
        ManifestInfo {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            size: 2,
            blobs: vec![],
            manifests: vec![],
            subject,
            artifact_type: None,
            annotations: None,
        }
    }

    /// An index holding a referrer of `team/app` applied at offset 20 whose entry is damaged: a
    /// delete of it removes the entry, then fails to read which referrer it was. With the repo,
    /// the referrer's digest and the journal trees as they are.
    fn index_with_a_damaged_referrer() -> (Index, RepoName, Digest, Vec<(String, Vec<KeyValue>)>) {
        let index = Index::temporary().unwrap();
        let repo: RepoName = "team/app".parse().unwrap();
        let subject = Digest::sha256(b"subject");
        let digest = Digest::sha256(b"referrer");
        let manifest = Change::Manifest {
            repo: repo.clone(),
            digest: digest.clone(),
            info: info(Some(subject)),
        };
        index.apply(&manifest, 20).unwrap();
        let k = key(&[repo.as_str().as_bytes(), digest.to_string().as_bytes()]);
        index
            .trees_for_test()
            .manifests
            .insert(&k, b"not json".as_slice())
            .unwrap();
        let before = index.dump_journal_trees().unwrap();
        (index, repo, digest, before)
    }

    #[test]
    fn a_change_that_fails_half_way_leaves_the_index_as_it_was() {
        let (index, repo, digest, before) = index_with_a_damaged_referrer();

        let delete = Change::DeleteManifest {
            repo: repo.clone(),
            digest: digest.clone(),
        };
        assert!(index.apply(&delete, 30).is_err());

        assert_eq!(index.dump_journal_trees().unwrap(), before);
        assert_eq!(index.applied_offset().unwrap(), 20);
    }

    #[test]
    fn changes_applied_together_go_in_whole_or_not_at_all() {
        let (index, repo, digest, before) = index_with_a_damaged_referrer();
        // A link that would apply, then a delete that fails: neither is kept.
        let layer = Digest::sha256(b"layer");
        let link = Change::Link {
            repo: repo.clone(),
            digest: layer.clone(),
        };
        let delete = Change::DeleteManifest {
            repo: repo.clone(),
            digest: digest.clone(),
        };
        assert!(index.apply_all(&[(&link, 25), (&delete, 30)]).is_err());
        assert_eq!(index.dump_journal_trees().unwrap(), before);
        assert_eq!(index.applied_offset().unwrap(), 20);
        // Both apply, in their order.
        let unlink = Change::Unlink {
            repo: repo.clone(),
            digest: layer.clone(),
        };
        index.apply_all(&[(&link, 40), (&unlink, 50)]).unwrap();
        assert!(!index.is_linked(&repo, &layer).unwrap());
        assert_eq!(index.applied_offset().unwrap(), 50);
        index.apply_all(&[]).unwrap();
        assert_eq!(
            index.applied_offset().unwrap(),
            50,
            "nothing applied, nothing moved"
        );
    }

    #[test]
    fn applying_a_change_records_its_end_with_it() {
        let index = Index::temporary().unwrap();
        let repo: RepoName = "team/app".parse().unwrap();
        let digest = Digest::sha256(b"layer");
        let link = Change::Link {
            repo: repo.clone(),
            digest: digest.clone(),
        };
        index.apply(&link, 7).unwrap();
        assert!(index.is_linked(&repo, &digest).unwrap());
        assert_eq!(index.applied_offset().unwrap(), 7);
        let unlink = Change::Unlink {
            repo: repo.clone(),
            digest: digest.clone(),
        };
        index.apply(&unlink, 9).unwrap();
        assert!(!index.is_linked(&repo, &digest).unwrap());
        assert_eq!(index.applied_offset().unwrap(), 9);
    }

    fn record(tag: &str, manifest: Option<&Digest>, timestamp_ms: u64) -> SignedTagRecord {
        use shoal_protocol::{SigningKey, TagRecord, TagTarget};
        let key = SigningKey::from_seed([4; 32]);
        let record = TagRecord {
            repo: "team/app".parse().unwrap(),
            tag: tag.parse().unwrap(),
            target: manifest.map(|m| TagTarget {
                manifest: m.clone(),
                media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                size: 100,
                blobs: Vec::new(),
            }),
            timestamp_ms,
            sequence: 0,
            publisher: key.public(),
        };
        SignedTagRecord::sign(&record, &key).unwrap()
    }

    #[test]
    fn an_expired_tag_is_gone_and_the_same_record_does_not_bring_it_back_but_a_newer_one_does() {
        let index = Index::temporary().unwrap();
        let repo: RepoName = "team/app".parse().unwrap();
        let tag: Tag = "prod-1".parse().unwrap();
        let (old, new) = (Digest::sha256(b"old"), Digest::sha256(b"new"));
        let first = record("prod-1", Some(&old), 1_000);
        let apply_record = |r: &SignedTagRecord, end| {
            index
                .apply(
                    &Change::Record {
                        record: r.clone(),
                        immutable: false,
                    },
                    end,
                )
                .unwrap();
        };
        apply_record(&first, 1);
        assert_eq!(index.tag(&repo, &tag).unwrap(), Some(old.clone()));

        index
            .apply(
                &Change::Expired {
                    record: first.clone(),
                },
                2,
            )
            .unwrap();
        assert_eq!(index.tag(&repo, &tag).unwrap(), None);
        assert!(index.record(&repo, &tag).unwrap().is_none());
        let order = first.verify().unwrap().record().order_key();
        assert_eq!(index.deleted_at(&repo, &tag).unwrap(), Some(order));
        assert_eq!(index.applied_offset().unwrap(), 2);

        // Replayed by sync: refused, the tag stays gone. So is an older record of the tag.
        apply_record(&first, 3);
        apply_record(&record("prod-1", Some(&new), 999), 4);
        assert_eq!(index.tag(&repo, &tag).unwrap(), None);

        // A newer push names it again; expiring the old record then changes nothing.
        let second = record("prod-1", Some(&new), 2_000);
        apply_record(&second, 5);
        assert_eq!(index.tag(&repo, &tag).unwrap(), Some(new.clone()));
        index.apply(&Change::Expired { record: first }, 6).unwrap();
        assert_eq!(index.tag(&repo, &tag).unwrap(), Some(new));
        assert_eq!(index.deleted_at(&repo, &tag).unwrap(), Some(order));
    }

    #[test]
    fn an_expiry_never_moves_the_latest_delete_back() {
        let index = Index::temporary().unwrap();
        let repo: RepoName = "team/app".parse().unwrap();
        let tag: Tag = "v".parse().unwrap();
        let m = Digest::sha256(b"m");
        // Deleted at 3000, pushed again at 4000, then expired: the latest delete is at 4000.
        for (i, r) in [record("v", None, 3_000), record("v", Some(&m), 4_000)]
            .iter()
            .enumerate()
        {
            index
                .apply(
                    &Change::Record {
                        record: r.clone(),
                        immutable: false,
                    },
                    i as u64,
                )
                .unwrap();
        }
        let held = index.record(&repo, &tag).unwrap().unwrap().signed().clone();
        index.apply(&Change::Expired { record: held }, 9).unwrap();
        let at = index.deleted_at(&repo, &tag).unwrap().unwrap();
        assert_eq!(at.0, 4_000);
        assert_eq!(index.tag(&repo, &tag).unwrap(), None);
    }
}
