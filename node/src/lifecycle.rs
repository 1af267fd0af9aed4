//! Retention policies on this node's repositories: which images a lifecycle policy (Amazon
//! ECR's JSON, [`shoal_protocol::lifecycle`]) expires, and why; and what expiring them changes.
//!
//! A tagged image is a manifest that a current tag record of the repository names, whether or
//! not this node holds the manifest: its tags are the current records that name it, and it was
//! pushed when the earliest of them was signed. So every node that holds the same records sees
//! the same tagged images with the same times, and a policy expires the same tags everywhere.
//! An untagged image is a manifest this node holds that no record names and that is neither a
//! referrer (a signature or an SBOM follows its subject) nor the child of an index there (a
//! platform image follows its index); its manifest file's time stands in for its push time.
//!
//! The fleet's policies are admin-signed [`PolicyBody::Lifecycle`] statements by repository
//! pattern ([`Retention`]: the most specific pattern that covers a repository applies). Garbage
//! collection applies them before its mark ([`plan`], then the store's
//! [`Change::Expired`](crate::store::Change::Expired) for each tag and a manifest delete for each
//! untagged image), so what they expire is swept in the same collection.
//!
//! [`PolicyBody::Lifecycle`]: shoal_protocol::fleet::PolicyBody::Lifecycle

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use shoal_protocol::fleet::RepoPattern;
use shoal_protocol::lifecycle::{Image, LifecyclePolicy};
use shoal_protocol::{Digest, RepoName, SignedTagRecord, Tag};

use crate::auth::FleetConfig;
use crate::auth::policy::PolicySet;
use crate::store::{Index, Layout, StoreError};

/// Repositories looked at per read of the repository list.
const REPO_PAGE: usize = 256;

/// The retention policies in force, by repository pattern.
#[derive(Debug, Clone, Default)]
pub struct Retention {
    /// Most specific pattern first (ties by pattern, so the order is the same everywhere).
    policies: Vec<(RepoPattern, LifecyclePolicy)>,
    /// The fleet's time, which the ages of images are counted in (`None`: this node's clock).
    clock: Option<crate::clock::FleetClock>,
}

impl Retention {
    /// The policies of these patterns.
    pub fn new(mut policies: Vec<(RepoPattern, LifecyclePolicy)>) -> Retention {
        policies
            .sort_by(|(a, _), (b, _)| b.specificity().cmp(&a.specificity()).then_with(|| a.cmp(b)));
        Retention {
            policies,
            clock: None,
        }
    }

    /// The same policies, counting ages in `clock`'s time: images are stamped in the fleet's
    /// time, so a node whose clock is off expires them when the others do.
    pub fn with_clock(mut self, clock: crate::clock::FleetClock) -> Retention {
        self.clock = Some(clock);
        self
    }

    /// Now, as the policies count it.
    pub fn now_ms(&self) -> u64 {
        self.clock
            .as_ref()
            .map_or_else(crate::clock::own_now_ms, crate::clock::FleetClock::now_ms)
    }

    /// Whether no policy is in force.
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// The policy that applies to `repo`, with its pattern: the most specific that covers it.
    pub fn for_repo(&self, repo: &RepoName) -> Option<(&RepoPattern, &LifecyclePolicy)> {
        self.policies
            .iter()
            .find(|(pattern, _)| pattern.matches(repo))
            .map(|(pattern, policy)| (pattern, policy))
    }

    /// Every pattern with its policy, most specific first.
    pub fn iter(&self) -> impl Iterator<Item = (&RepoPattern, &LifecyclePolicy)> {
        self.policies
            .iter()
            .map(|(pattern, policy)| (pattern, policy))
    }
}

/// What the retention policies expire now (see [`plan`]).
#[derive(Debug, Clone, Default)]
pub struct ExpiryPlan {
    /// The current records of the tags they expire.
    pub records: Vec<SignedTagRecord>,
    /// The tagged images those tags named.
    pub tagged_images: u64,
    /// The untagged manifests they delete, by repository.
    pub untagged: Vec<(RepoName, Digest)>,
}

impl ExpiryPlan {
    /// The (repository, tag) of each expired record, for a dry run's mark.
    pub fn tags(&self) -> HashSet<(RepoName, Tag)> {
        self.records
            .iter()
            .filter_map(|s| s.verify().ok())
            .map(|v| (v.record().repo.clone(), v.record().tag.clone()))
            .collect()
    }
}

/// One image a policy expires, as `shoal lifecycle preview` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expired {
    /// The manifest.
    pub digest: Digest,
    /// Its tags now.
    pub tags: Vec<String>,
    /// When it was pushed, in milliseconds since the Unix epoch.
    pub pushed_at_ms: u64,
    /// The rule that expires it.
    pub rule: u32,
    /// That rule's description.
    pub description: Option<String>,
    /// Why.
    pub reason: String,
}

/// The images of `repo` as a policy sees them. Blocking.
pub fn images(index: &Index, layout: &Layout, repo: &RepoName) -> Result<Vec<Image>, StoreError> {
    Ok(images_and_records(index, layout, repo)?.0)
}

/// The current records naming each tagged image.
type RecordsByImage = BTreeMap<Digest, Vec<SignedTagRecord>>;

/// The images of `repo`, and the current records naming each tagged one. Blocking.
fn images_and_records(
    index: &Index,
    layout: &Layout,
    repo: &RepoName,
) -> Result<(Vec<Image>, RecordsByImage), StoreError> {
    let mut manifests = Vec::new();
    let mut followers: HashSet<Digest> = HashSet::new();
    index.visit_manifests(Some(repo), |_, digest, info| {
        followers.extend(info.manifests.iter().cloned());
        if info.subject.is_some() {
            followers.insert(digest.clone());
        }
        manifests.push(digest);
    })?;
    // Tags and the time of the earliest record naming each manifest.
    let mut tagged: BTreeMap<Digest, (Vec<String>, u64)> = BTreeMap::new();
    let mut records: BTreeMap<Digest, Vec<SignedTagRecord>> = BTreeMap::new();
    index.visit_repo_records(repo, |signed| {
        // Records are verified before they are stored; one that does not verify counts for none.
        if let Ok(verified) = signed.verify() {
            let record = verified.record();
            if let Some(target) = &record.target {
                let entry = tagged
                    .entry(target.manifest.clone())
                    .or_insert_with(|| (Vec::new(), u64::MAX));
                entry.0.push(record.tag.as_str().to_owned());
                entry.1 = entry.1.min(record.timestamp_ms);
                records
                    .entry(target.manifest.clone())
                    .or_default()
                    .push(signed);
            }
        }
    })?;
    let mut out = Vec::new();
    for digest in manifests {
        if followers.contains(&digest) || tagged.contains_key(&digest) {
            continue;
        }
        let pushed_at_ms = file_time_ms(layout, &digest);
        out.push(Image {
            digest,
            tags: Vec::new(),
            pushed_at_ms,
        });
    }
    for (digest, (tags, pushed_at_ms)) in tagged {
        out.push(Image {
            digest,
            tags,
            pushed_at_ms,
        });
    }
    Ok((out, records))
}

fn file_time_ms(layout: &Layout, digest: &Digest) -> u64 {
    std::fs::metadata(layout.blob(digest))
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64)
}

/// What `policy` would expire in `repo` at `now_ms`. Blocking.
pub fn preview(
    index: &Index,
    layout: &Layout,
    repo: &RepoName,
    policy: &LifecyclePolicy,
    now_ms: u64,
) -> Result<Vec<Expired>, StoreError> {
    let images = images(index, layout, repo)?;
    let descriptions: BTreeMap<u32, Option<String>> = policy
        .rules()
        .iter()
        .map(|r| (r.priority, r.description.clone()))
        .collect();
    Ok(policy
        .evaluate(&images, now_ms)
        .into_iter()
        .map(|e| {
            let image = images.iter().find(|i| i.digest == e.digest);
            Expired {
                tags: image.map(|i| i.tags.clone()).unwrap_or_default(),
                pushed_at_ms: image.map_or(0, |i| i.pushed_at_ms),
                rule: e.priority,
                description: descriptions.get(&e.priority).cloned().flatten(),
                reason: e.reason.to_string(),
                digest: e.digest,
            }
        })
        .collect())
}

/// What `retention` expires at `now_ms` on this node: in each repository a policy covers, the
/// current records of the tagged images it expires, and the untagged manifests it expires that
/// are older than `grace` (one younger may be a push by digest about to be tagged). Blocking.
pub fn plan(
    index: &Index,
    layout: &Layout,
    retention: &Retention,
    now_ms: u64,
    grace: Duration,
) -> Result<ExpiryPlan, StoreError> {
    let mut plan = ExpiryPlan::default();
    if retention.is_empty() {
        return Ok(plan);
    }
    let grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
    let mut last: Option<String> = None;
    loop {
        let repos = index.repos(last.as_deref(), REPO_PAGE)?;
        let Some(end) = repos.last() else { break };
        last = Some(end.as_str().to_owned());
        for repo in repos {
            let Some((_, policy)) = retention.for_repo(&repo) else {
                continue;
            };
            let (images, mut records) = images_and_records(index, layout, &repo)?;
            for expiry in policy.evaluate(&images, now_ms) {
                match records.remove(&expiry.digest) {
                    Some(named) => {
                        plan.tagged_images += 1;
                        plan.records.extend(named);
                    }
                    None => {
                        let young = images
                            .iter()
                            .find(|i| i.digest == expiry.digest)
                            .is_none_or(|i| now_ms.saturating_sub(i.pushed_at_ms) < grace_ms);
                        if !young {
                            plan.untagged.push((repo.clone(), expiry.digest));
                        }
                    }
                }
            }
        }
    }
    Ok(plan)
}

/// The retention policies a store holds for `fleet`, checked as a starting node checks them
/// (signature, fleet, admin): for `shoal gc` and `shoal lifecycle preview` on a stopped node's
/// directory. None outside a fleet. Blocking.
pub fn stored_retention(
    index: &Index,
    fleet: Option<&FleetConfig>,
) -> Result<Retention, StoreError> {
    let Some(fleet) = fleet else {
        return Ok(Retention::default());
    };
    let mut set = PolicySet::default();
    let _every = index.visit_fleet(None, |item| {
        if let shoal_protocol::fleet::FleetItem::Policy(p) = item
            && let Ok(v) = p.verify()
            && v.statement().fleet == fleet.id
            && fleet.admins.contains(&v.statement().admin)
        {
            set.apply(v);
        }
        std::ops::ControlFlow::Continue(())
    })?;
    Ok(set.retention())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::ManifestInfo;
    use crate::store::Change;
    use shoal_protocol::{SigningKey, TagRecord, TagTarget};

    const KEEP_TWO_PROD: &str = r#"{"rules":[
        {"rulePriority":1,"selection":{"tagStatus":"tagged","tagPrefixList":["prod"],
         "countType":"imageCountMoreThan","countNumber":2},"action":{"type":"expire"}},
        {"rulePriority":2,"selection":{"tagStatus":"untagged",
         "countType":"imageCountMoreThan","countNumber":1},"action":{"type":"expire"}}]}"#;
    const HOUR: Duration = Duration::from_secs(3600);

    fn record(repo: &str, tag: &str, manifest: &Digest, timestamp_ms: u64) -> SignedTagRecord {
        let key = SigningKey::from_seed([5; 32]);
        let record = TagRecord {
            repo: repo.parse().unwrap(),
            tag: tag.parse().unwrap(),
            target: Some(TagTarget {
                manifest: manifest.clone(),
                media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                size: 2,
                blobs: Vec::new(),
            }),
            timestamp_ms,
            sequence: 0,
            publisher: key.public(),
        };
        SignedTagRecord::sign(&record, &key).unwrap()
    }

    fn retention(pattern: &str) -> Retention {
        Retention::new(vec![(
            pattern.parse().unwrap(),
            LifecyclePolicy::from_json(KEEP_TWO_PROD).unwrap(),
        )])
    }

    /// prod-1..5 in `team/app` and `other/app` (pushed in that order, no manifest file held:
    /// tagged images come from records), `dev` in `team/app`, and two untagged manifests there
    /// whose files are 2 hours and a minute old.
    fn store() -> (Index, Layout, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let index = Index::temporary().unwrap();
        let mut end = 0;
        let mut apply = |c: Change| {
            end += 1;
            index.apply(&c, end).unwrap();
        };
        for repo in ["team/app", "other/app"] {
            for n in 1..=5u64 {
                let m = Digest::sha256(format!("{repo}{n}").as_bytes());
                apply(Change::Record {
                    record: record(repo, &format!("prod-{n}"), &m, n * 1000),
                    immutable: false,
                });
            }
        }
        apply(Change::Record {
            record: record("team/app", "dev", &Digest::sha256(b"dev"), 500),
            immutable: false,
        });
        let now = std::time::SystemTime::now();
        for (name, age) in [("old", 2 * HOUR), ("new", Duration::from_secs(60))] {
            let digest = Digest::sha256(name.as_bytes());
            let path = layout.blob(&digest);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            let file = std::fs::File::create(&path).unwrap();
            file.set_modified(now - age).unwrap();
            apply(Change::Manifest {
                repo: "team/app".parse().unwrap(),
                digest,
                info: ManifestInfo {
                    media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                    size: 2,
                    blobs: vec![],
                    manifests: vec![],
                    subject: None,
                    artifact_type: None,
                    annotations: None,
                },
            });
        }
        (index, layout, dir)
    }

    fn expired_tags(plan: &ExpiryPlan) -> Vec<String> {
        let mut tags: Vec<String> = plan
            .tags()
            .into_iter()
            .map(|(r, t)| format!("{r}:{t}"))
            .collect();
        tags.sort();
        tags
    }

    #[test]
    fn a_plan_expires_the_oldest_selected_tags_of_covered_repositories_only() {
        let (index, layout, _dir) = store();
        let now = crate::auth::now_ms();
        let plan = plan(&index, &layout, &retention("team/*"), now, HOUR).unwrap();
        // Not dev (no prod tag), not other/app (not covered).
        assert_eq!(
            expired_tags(&plan),
            ["team/app:prod-1", "team/app:prod-2", "team/app:prod-3"]
        );
        assert_eq!(plan.tagged_images, 3);
        // The older untagged manifest, older than the grace period.
        assert_eq!(
            plan.untagged,
            [("team/app".parse().unwrap(), Digest::sha256(b"old"))]
        );
        // With a longer grace period it may be a push by digest about to be tagged: it stays.
        let graced = super::plan(&index, &layout, &retention("team/*"), now, 3 * HOUR).unwrap();
        assert!(graced.untagged.is_empty());
        assert_eq!(graced.records.len(), 3);
        // No policy: nothing.
        let none = super::plan(&index, &layout, &Retention::default(), now, HOUR).unwrap();
        assert!(none.records.is_empty() && none.untagged.is_empty());
    }

    #[test]
    fn retention_counts_ages_in_the_fleets_time() {
        let clock = crate::clock::FleetClock::new();
        clock.set_offset_ms(-3 * 3_600_000);
        let own = crate::clock::own_now_ms();
        let fleet = Retention::default().with_clock(clock).now_ms();
        assert!(fleet + 3 * 3_600_000 >= own && fleet + 3 * 3_600_000 < own + 1_000);
        let plain = Retention::default().now_ms();
        assert!(plain >= own && plain < own + 1_000);
    }

    #[test]
    fn applying_a_plan_expires_its_tags_and_a_second_plan_finds_nothing_more() {
        let (index, layout, _dir) = store();
        let r = retention("*");
        let now = crate::auth::now_ms();
        let first = plan(&index, &layout, &r, now, 3 * HOUR).unwrap();
        assert_eq!(expired_tags(&first).len(), 6);
        for (i, record) in first.records.into_iter().enumerate() {
            index
                .apply(&Change::Expired { record }, 100 + i as u64)
                .unwrap();
        }
        let app: RepoName = "team/app".parse().unwrap();
        for (tag, kept) in [
            ("prod-1", false),
            ("prod-3", false),
            ("prod-4", true),
            ("dev", true),
        ] {
            let t: Tag = tag.parse().unwrap();
            assert_eq!(index.tag(&app, &t).unwrap().is_some(), kept, "{tag}");
        }
        // The same rules over what is left expire nothing: the fleet converges.
        let again = plan(&index, &layout, &r, now, 3 * HOUR).unwrap();
        assert!(again.records.is_empty(), "{:?}", expired_tags(&again));
    }
}
