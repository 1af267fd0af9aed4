//! `shoal du`: where a node's disk goes, by repository.
//!
//! Every blob file is counted once in the total and once in each repository that holds it (links
//! it, holds it as a manifest, or has a current record naming it): *unique* bytes are held by one
//! repository only (deleting it would free them), *shared* bytes by several. Upload sessions and
//! downloads in progress are counted apart, and *reclaimable* is what a garbage collection with
//! the given grace period would free now.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use shoal_protocol::RepoName;

use super::gc::GcOptions;
use super::{Store, StoreError};

/// What one repository holds.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoUsage {
    /// The repository.
    pub repo: String,
    /// Blob files it holds.
    pub blobs: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Bytes no other repository holds.
    pub unique_bytes: u64,
    /// Bytes other repositories hold too.
    pub shared_bytes: u64,
}

/// Where the disk goes.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Blob files in all.
    pub blobs: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Blob files no repository holds (garbage, or not linked yet).
    pub unheld_bytes: u64,
    /// Bytes in upload sessions.
    pub uploads_bytes: u64,
    /// Bytes in downloads in progress.
    pub partial_bytes: u64,
    /// What a garbage collection would free now.
    pub reclaimable_bytes: u64,
    /// By repository, largest first.
    pub repos: Vec<RepoUsage>,
    /// The disk quota, and bytes by what the quota makes of them (only from a running node).
    #[serde(default)]
    pub quota: Option<crate::quota::QuotaStatus>,
}

impl Store {
    /// Where the disk goes; reclaimable as a collection with `grace` would find it, once the
    /// fleet's `retention` policies expired what they would.
    pub async fn usage(
        &self,
        grace: std::time::Duration,
        retention: &crate::lifecycle::Retention,
    ) -> Result<Usage, StoreError> {
        let reclaimable = self
            .gc_with_retention(GcOptions::new(grace).dry(), retention)
            .await?
            .bytes_freed;
        let (index, layout) = (self.inner.index.clone(), self.inner.layout.clone());
        let mut usage = tokio::task::spawn_blocking(move || -> Result<Usage, StoreError> {
            let mut usage = Usage::default();
            let mut repos: BTreeMap<RepoName, RepoUsage> = BTreeMap::new();
            super::gc::visit_blob_files(&layout.blobs(), |digest, path| {
                let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
                usage.blobs += 1;
                usage.bytes += size;
                let holders = index.repos_of_blob(&digest)?;
                if holders.is_empty() {
                    usage.unheld_bytes += size;
                }
                for repo in &holders {
                    let r = repos.entry(repo.clone()).or_default();
                    r.blobs += 1;
                    r.bytes += size;
                    if holders.len() == 1 {
                        r.unique_bytes += size;
                    } else {
                        r.shared_bytes += size;
                    }
                }
                Ok(())
            })?;
            usage.uploads_bytes = dir_bytes(&layout.uploads());
            usage.partial_bytes = dir_bytes(&layout.root().join("partial"));
            usage.repos = repos
                .into_iter()
                .map(|(repo, mut r)| {
                    r.repo = repo.to_string();
                    r
                })
                .collect();
            usage
                .repos
                .sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.repo.cmp(&b.repo)));
            Ok(usage)
        })
        .await??;
        usage.reclaimable_bytes = reclaimable;
        Ok(usage)
    }
}

/// Bytes of the files under `dir` (0 if it does not exist).
pub fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(_) => e.metadata().map(|m| m.len()).unwrap_or(0),
            Err(_) => 0,
        })
        .sum()
}
