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
//! | `blob_indexes.v1` | digest                         | `BlobIndex` (codec)      |
//! | `uploads.v1`   | upload id                         | JSON `UploadMeta`        |
//! | `meta.v1`      | `journal_applied`                 | u64 BE offset            |
//!
//! `tags.v1` and `record_blobs.v1` are derived from `records.v1`: a tag names what its current
//! record names. `blob_indexes.v1` is derived from the blob files.
//!
//! Only the journal thread writes the journal-derived trees, one event at a time, and writes the
//! applied offset after the event's changes; applying an event twice gives the same state, so a
//! crash between the two is repaired by replaying from the recorded offset.

use std::path::Path;

use shoal_protocol::message::{RecordsPage, SummaryHasher, SyncResponse};
use shoal_protocol::{
    BlobIndex, BlobRef, Digest, RepoName, SignedTagRecord, Tag, VerifiedTagRecord, codec,
};

use super::StoreError;
use super::journal::Event;
use super::upload::UploadMeta;
use crate::manifest::ManifestInfo;

const SEP: u8 = 0;
const APPLIED_KEY: &[u8] = b"journal_applied";
/// A raw key and value, as `fsck` compares them.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// Handle to the index (cheap to clone; sled is internally shared).
#[derive(Clone)]
pub struct Index {
    db: sled::Db,
    repos: sled::Tree,
    links: sled::Tree,
    manifests: sled::Tree,
    tags: sled::Tree,
    records: sled::Tree,
    record_blobs: sled::Tree,
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

impl Index {
    /// Opens (or creates) the index in `dir`.
    pub fn open(dir: &Path) -> Result<Index, StoreError> {
        let db = sled::Config::new().path(dir).open()?;
        Index::from_db(db)
    }

    /// A throwaway in-memory index, used by `fsck` to rebuild and compare.
    pub fn temporary() -> Result<Index, StoreError> {
        Index::from_db(sled::Config::new().temporary(true).open()?)
    }

    fn from_db(db: sled::Db) -> Result<Index, StoreError> {
        Ok(Index {
            repos: db.open_tree("repos.v1")?,
            links: db.open_tree("links.v1")?,
            manifests: db.open_tree("manifests.v1")?,
            tags: db.open_tree("tags.v1")?,
            records: db.open_tree("records.v1")?,
            record_blobs: db.open_tree("record_blobs.v1")?,
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

    fn journal_trees(&self) -> [&sled::Tree; 7] {
        [
            &self.repos,
            &self.links,
            &self.manifests,
            &self.tags,
            &self.records,
            &self.record_blobs,
            &self.referrers,
        ]
    }

    /// Writes the index to disk.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    /// Journal offset up to which events are applied.
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

    /// Applies one journal event that ends at journal offset `end`.
    pub fn apply(&self, event: &Event, end: u64) -> Result<(), StoreError> {
        match event {
            Event::Link { repo, digest } => {
                self.repos.insert(repo.as_str(), &[])?;
                self.links.insert(
                    key(&[repo.as_str().as_bytes(), digest.to_string().as_bytes()]),
                    &[],
                )?;
            }
            Event::Unlink { repo, digest } => {
                self.links.remove(key(&[
                    repo.as_str().as_bytes(),
                    digest.to_string().as_bytes(),
                ]))?;
            }
            Event::Manifest { repo, digest, info } => {
                self.repos.insert(repo.as_str(), &[])?;
                let d = digest.to_string();
                let json =
                    serde_json::to_vec(info).map_err(|e| StoreError::Corrupt(e.to_string()))?;
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
            Event::DeleteManifest { repo, digest } => {
                let d = digest.to_string();
                let mkey = key(&[repo.as_str().as_bytes(), d.as_bytes()]);
                if let Some(old) = self.manifests.remove(&mkey)? {
                    let info: ManifestInfo = serde_json::from_slice(&old)
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
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
            Event::Record { record } => self.apply_record(record)?,
        }
        self.meta.insert(APPLIED_KEY, &end.to_be_bytes())?;
        Ok(())
    }

    fn apply_record(&self, signed: &SignedTagRecord) -> Result<(), StoreError> {
        // Records are verified before they are journaled; checking again on replay costs little
        // and keeps a damaged journal from planting a record.
        let Ok(verified) = signed.verify() else {
            tracing::error!("journal holds a record that does not verify; skipped");
            return Ok(());
        };
        let rec = verified.record();
        let k = key(&[rec.repo.as_str().as_bytes(), rec.tag.as_str().as_bytes()]);
        if let Some(current) = self.record_at(&k)? {
            if rec.order_key() <= current.record().order_key() {
                return Ok(());
            }
        }
        let bytes = codec::encode(signed).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.records.insert(&k, bytes)?;
        self.repos.insert(rec.repo.as_str(), &[])?;
        match &rec.target {
            Some(target) => {
                self.tags
                    .insert(&k, target.manifest.to_string().as_bytes())?;
                for b in &target.blobs {
                    let bk = key(&[
                        rec.repo.as_str().as_bytes(),
                        b.digest.to_string().as_bytes(),
                    ]);
                    let v = codec::encode(b).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                    self.record_blobs.insert(bk, v)?;
                }
            }
            None => {
                self.tags.remove(&k)?;
            }
        }
        Ok(())
    }

    fn record_at(&self, k: &[u8]) -> Result<Option<VerifiedTagRecord>, StoreError> {
        let Some(v) = self.records.get(k)? else {
            return Ok(None);
        };
        let signed: SignedTagRecord =
            codec::decode(&v).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        signed
            .verify()
            .map(Some)
            .map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    /// The current record of a tag (a tombstone if the tag was deleted).
    pub fn record(
        &self,
        repo: &RepoName,
        tag: &Tag,
    ) -> Result<Option<VerifiedTagRecord>, StoreError> {
        self.record_at(&key(&[repo.as_str().as_bytes(), tag.as_str().as_bytes()]))
    }

    /// A page of current records in (repo, tag) order after `after`, filled by count and by
    /// encoded size so that it always fits one frame.
    pub fn records_page(
        &self,
        after: Option<(&RepoName, &Tag)>,
        limit: u32,
    ) -> Result<SyncResponse, StoreError> {
        let iter = match after {
            Some((r, t)) => self.records.range::<Vec<u8>, _>((
                std::ops::Bound::Excluded(key(&[r.as_str().as_bytes(), t.as_str().as_bytes()])),
                std::ops::Bound::Unbounded,
            )),
            None => self.records.iter(),
        };
        let mut page = RecordsPage::new(limit);
        for entry in iter {
            let (_, v) = entry?;
            let record = codec::decode(&v).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            if !page.push(record) {
                return Ok(page.finish(true));
            }
        }
        Ok(page.finish(false))
    }

    /// The summary of all current records (`SyncResponse::Summary`): two nodes with the same
    /// summary hold the same records.
    pub fn records_summary(&self) -> Result<SyncResponse, StoreError> {
        let mut hasher = SummaryHasher::new();
        for entry in self.records.iter() {
            let (_, v) = entry?;
            let record: SignedTagRecord =
                codec::decode(&v).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            hasher.add(&record);
        }
        Ok(hasher.finish())
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
                .map_err(|e| StoreError::Corrupt(e.to_string())),
        }
    }

    /// The recorded `BlobIndex` of a blob.
    pub fn blob_index(&self, digest: &Digest) -> Result<Option<BlobIndex>, StoreError> {
        match self.blob_indexes.get(digest.to_string())? {
            None => Ok(None),
            Some(v) => codec::decode(&v)
                .map(Some)
                .map_err(|e| StoreError::Corrupt(e.to_string())),
        }
    }

    /// Records a blob's `BlobIndex`.
    pub fn put_blob_index(&self, index: &BlobIndex) -> Result<(), StoreError> {
        let v = codec::encode(index).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.blob_indexes.insert(index.digest().to_string(), v)?;
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
                .map_err(|e| StoreError::Corrupt(e.to_string())),
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

    /// Manifests in `repo` whose subject is `subject`.
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
        let json = serde_json::to_vec(meta).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.uploads.insert(id, json)?;
        Ok(())
    }

    /// An upload session.
    pub fn upload(&self, id: &str) -> Result<Option<UploadMeta>, StoreError> {
        match self.uploads.get(id)? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| StoreError::Corrupt(e.to_string())),
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
