//! Retention rules in Amazon ECR's lifecycle-policy JSON, and their evaluation.
//!
//! A [`LifecyclePolicy`] is read from the JSON an ECR user already has:
//!
//! ```json
//! {"rules": [
//!   {"rulePriority": 1, "description": "keep the last 3 prod images",
//!    "selection": {"tagStatus": "tagged", "tagPatternList": ["prod*"],
//!                  "countType": "imageCountMoreThan", "countNumber": 3},
//!    "action": {"type": "expire"}},
//!   {"rulePriority": 2, "description": "untagged go after a day",
//!    "selection": {"tagStatus": "untagged", "countType": "sinceImagePushed",
//!                  "countUnit": "days", "countNumber": 1},
//!    "action": {"type": "expire"}}
//! ]}
//! ```
//!
//! and validated as ECR validates it (unique priorities, `any` last, one rule for untagged
//! images, a tag filter exactly when `tagged`, at most four wildcards a pattern). Parts of ECR's
//! syntax that have no meaning here (`storageClass`, `sinceImagePulled`, the `transition`
//! action) are refused by name rather than ignored.
//!
//! [`LifecyclePolicy::evaluate`] is a pure function of the policy, the images and the time, so
//! every node that holds the same records expires the same images. Its rules are ECR's:
//!
//! - rules apply in priority order, lowest first;
//! - an image whose tags a rule selects is *claimed* by the first such rule: that rule may expire
//!   it, no later rule can, though later rules still count it;
//! - `imageCountMoreThan n` keeps the `n` most recently pushed images the rule selects and
//!   expires the older ones; `sinceImagePushed n days` expires those pushed more than `n` days
//!   ago;
//! - with `tagPrefixList` or `tagPatternList`, an image is selected when every prefix (pattern)
//!   matches at least one of its tags;
//! - ties in push time are broken by digest, so the order is the same everywhere.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::Digest;

/// Most rules in a policy (ECR's limit).
pub const MAX_RULES: usize = 50;
/// Most prefixes or patterns in one rule's tag filter.
pub const MAX_TAG_FILTERS: usize = 100;
/// Most wildcards in one pattern (ECR's limit).
pub const MAX_WILDCARDS: usize = 4;
/// Longest prefix or pattern, in bytes (a tag is at most 128).
pub const MAX_FILTER_BYTES: usize = 128;
/// Longest rule description, in bytes.
pub const MAX_DESCRIPTION_BYTES: usize = 1024;
/// Longest policy text, in bytes: a policy travels inside one signed fleet statement, which is
/// at most [`MAX_STATEMENT_PAYLOAD_BYTES`](crate::fleet::MAX_STATEMENT_PAYLOAD_BYTES).
pub const MAX_POLICY_BYTES: usize = 12 * 1024;
/// Milliseconds in a day.
const DAY_MS: u64 = 24 * 3600 * 1000;

/// Why a policy text is not a valid policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The policy has no rules, or more than [`MAX_RULES`].
    #[error("a lifecycle policy has 1 to {MAX_RULES} rules, this one has {0}")]
    RuleCount(usize),
    /// Two rules share a priority.
    #[error("rulePriority {0} is used twice; every rule needs its own")]
    DuplicatePriority(u32),
    /// A priority of 0.
    #[error("rulePriority starts at 1")]
    ZeroPriority,
    /// A rule with `tagStatus: any` is not the last one.
    #[error("the rule with tagStatus \"any\" (priority {0}) must have the highest rulePriority")]
    AnyNotLast(u32),
    /// More than one rule selects untagged images.
    #[error("only one rule may select untagged images")]
    UntaggedTwice,
    /// A rule's selection is not valid; the text says why.
    #[error("rule {priority}: {reason}")]
    Rule {
        /// The rule's priority.
        priority: u32,
        /// What is wrong with it.
        reason: String,
    },
}

/// Why a policy text could not be read as a policy.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// The text is longer than [`MAX_POLICY_BYTES`].
    #[error("a lifecycle policy is at most {MAX_POLICY_BYTES} bytes, this one has {0}")]
    TooLong(usize),
    /// Not JSON, not in ECR's shape, or not a valid policy ([`PolicyError`]); the text says
    /// where.
    #[error("not a valid lifecycle policy: {0}")]
    Json(#[source] serde_json::Error),
}

/// A validated lifecycle policy, its rules in priority order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "raw::Policy", into = "raw::Policy")]
pub struct LifecyclePolicy {
    rules: Vec<Rule>,
}

/// One validated rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Its priority: lower applies first.
    pub priority: u32,
    /// What the rule is for, as its author wrote it.
    pub description: Option<String>,
    /// Which images it selects.
    pub tags: TagSelection,
    /// Which of the selected images it expires.
    pub count: Count,
}

/// Which images a rule looks at, by their tags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TagSelection {
    /// Images with at least one tag that pass the filter.
    Tagged(TagFilter),
    /// Images with no tag.
    Untagged,
    /// Every image.
    Any,
}

/// A tagged rule's filter: every entry must match one of the image's tags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TagFilter {
    /// Tag prefixes.
    Prefixes(Vec<String>),
    /// Tag patterns where `*` stands for any run of characters.
    Patterns(Vec<String>),
}

/// Which of the selected images a rule expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    /// All but the `n` most recently pushed.
    MoreThan(u32),
    /// Those pushed more than `n` days ago.
    OlderThanDays(u32),
}

/// An image as a policy sees it: a manifest in one repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// The manifest's digest.
    pub digest: Digest,
    /// The tags that name it now (empty for an untagged image).
    pub tags: Vec<String>,
    /// When it was pushed, in milliseconds since the Unix epoch.
    pub pushed_at_ms: u64,
}

/// One image a policy expires, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expiry {
    /// The image's digest.
    pub digest: Digest,
    /// The rule that expires it.
    pub priority: u32,
    /// Why that rule expires it.
    pub reason: Reason,
}

/// Why a rule expires an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// It is the `rank`-th most recently pushed of the images the rule selects (1 is the
    /// newest), and the rule keeps `keep`.
    Count {
        /// Its place among the selected images, newest first, from 1.
        rank: usize,
        /// How many the rule keeps.
        keep: u32,
    },
    /// It was pushed `age_days` (whole days) ago, more than the rule's `limit_days`.
    Age {
        /// Its age in whole days.
        age_days: u64,
        /// The rule's limit.
        limit_days: u32,
    },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Count { rank, keep } => {
                write!(
                    f,
                    "newest #{rank} of the images it selects; it keeps {keep}"
                )
            }
            Reason::Age {
                age_days,
                limit_days,
            } => write!(f, "pushed {age_days} days ago; it keeps {limit_days} days"),
        }
    }
}

impl LifecyclePolicy {
    /// Parses and validates a policy from its JSON text, refusing a text longer than
    /// [`MAX_POLICY_BYTES`] before reading it.
    pub fn from_json(text: &str) -> Result<LifecyclePolicy, ParseError> {
        if text.len() > MAX_POLICY_BYTES {
            return Err(ParseError::TooLong(text.len()));
        }
        serde_json::from_str(text).map_err(ParseError::Json)
    }

    /// The rules, lowest priority first.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The images this policy expires at `now_ms`, oldest first within each rule, rules in
    /// priority order. Images not listed are kept.
    pub fn evaluate(&self, images: &[Image], now_ms: u64) -> Vec<Expiry> {
        // Newest first; ties by digest so every node orders alike.
        let mut order: Vec<&Image> = images.iter().collect();
        order.sort_by(|a, b| {
            b.pushed_at_ms
                .cmp(&a.pushed_at_ms)
                .then_with(|| a.digest.cmp(&b.digest))
        });
        let mut claimed: BTreeSet<&Digest> = BTreeSet::new();
        let mut expired = Vec::new();
        for rule in &self.rules {
            let selected: Vec<&Image> = order
                .iter()
                .copied()
                .filter(|image| rule.tags.selects(&image.tags))
                .collect();
            let mut of_rule = Vec::new();
            for (i, image) in selected.iter().enumerate() {
                if claimed.contains(&image.digest) {
                    continue;
                }
                if let Some(reason) = rule.count.expires(i + 1, image.pushed_at_ms, now_ms) {
                    of_rule.push(Expiry {
                        digest: image.digest.clone(),
                        priority: rule.priority,
                        reason,
                    });
                }
            }
            for image in &selected {
                claimed.insert(&image.digest);
            }
            of_rule.reverse();
            expired.extend(of_rule);
        }
        expired
    }
}

impl TagSelection {
    /// Whether an image with these tags is selected.
    pub fn selects(&self, tags: &[String]) -> bool {
        match self {
            TagSelection::Any => true,
            TagSelection::Untagged => tags.is_empty(),
            TagSelection::Tagged(filter) => !tags.is_empty() && filter.passes(tags),
        }
    }
}

impl TagFilter {
    fn passes(&self, tags: &[String]) -> bool {
        match self {
            TagFilter::Prefixes(prefixes) => prefixes
                .iter()
                .all(|p| tags.iter().any(|t| t.starts_with(p.as_str()))),
            TagFilter::Patterns(patterns) => patterns
                .iter()
                .all(|p| tags.iter().any(|t| wildcard_match(p, t))),
        }
    }
}

impl Count {
    /// Whether the image at `rank` (newest is 1) pushed at `pushed_at_ms` expires at `now_ms`.
    fn expires(self, rank: usize, pushed_at_ms: u64, now_ms: u64) -> Option<Reason> {
        match self {
            Count::MoreThan(keep) => (rank > keep as usize).then_some(Reason::Count { rank, keep }),
            Count::OlderThanDays(limit_days) => {
                let age_ms = now_ms.saturating_sub(pushed_at_ms);
                (age_ms > u64::from(limit_days).saturating_mul(DAY_MS)).then_some(Reason::Age {
                    age_days: age_ms / DAY_MS,
                    limit_days,
                })
            }
        }
    }
}

/// Whether `text` matches `pattern`, where `*` matches any run of characters (none included)
/// and everything else matches itself. Linear in the text for each wildcard.
pub fn wildcard_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    // Where the last `*` was and which text position it is trying to cover up to.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some(b'*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(c) if *c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|c| *c == b'*')
}

/// The policy exactly as its JSON spells it, checked into [`LifecyclePolicy`].
mod raw {
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Policy {
        pub rules: Vec<Rule>,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct Rule {
        pub rule_priority: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub description: Option<String>,
        pub selection: Selection,
        pub action: Action,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct Selection {
        pub tag_status: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub tag_prefix_list: Option<Vec<String>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub tag_pattern_list: Option<Vec<String>>,
        pub count_type: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub count_unit: Option<String>,
        pub count_number: u32,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Action {
        #[serde(rename = "type")]
        pub kind: String,
    }
}

impl TryFrom<raw::Policy> for LifecyclePolicy {
    type Error = PolicyError;

    fn try_from(raw: raw::Policy) -> Result<Self, PolicyError> {
        if raw.rules.is_empty() || raw.rules.len() > MAX_RULES {
            return Err(PolicyError::RuleCount(raw.rules.len()));
        }
        let mut rules = raw
            .rules
            .into_iter()
            .map(Rule::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        rules.sort_by_key(|r| r.priority);
        for pair in rules.windows(2) {
            if pair[0].priority == pair[1].priority {
                return Err(PolicyError::DuplicatePriority(pair[0].priority));
            }
        }
        let last = rules.len() - 1;
        if let Some((_, any)) = rules
            .iter()
            .enumerate()
            .find(|(i, r)| r.tags == TagSelection::Any && *i != last)
        {
            return Err(PolicyError::AnyNotLast(any.priority));
        }
        if rules
            .iter()
            .filter(|r| r.tags == TagSelection::Untagged)
            .count()
            > 1
        {
            return Err(PolicyError::UntaggedTwice);
        }
        Ok(LifecyclePolicy { rules })
    }
}

impl TryFrom<raw::Rule> for Rule {
    type Error = PolicyError;

    fn try_from(raw: raw::Rule) -> Result<Self, PolicyError> {
        let priority = raw.rule_priority;
        if priority == 0 {
            return Err(PolicyError::ZeroPriority);
        }
        let bad = |reason: &str| PolicyError::Rule {
            priority,
            reason: reason.to_owned(),
        };
        if raw.action.kind != "expire" {
            return Err(bad("the only action is {\"type\": \"expire\"}"));
        }
        if raw
            .description
            .as_ref()
            .is_some_and(|d| d.len() > MAX_DESCRIPTION_BYTES)
        {
            return Err(bad("the description is too long"));
        }
        let s = raw.selection;
        let tags = match (s.tag_status.as_str(), s.tag_prefix_list, s.tag_pattern_list) {
            ("tagged", Some(prefixes), None) => {
                TagSelection::Tagged(TagFilter::Prefixes(filters(prefixes, false).map_err(bad)?))
            }
            ("tagged", None, Some(patterns)) => {
                TagSelection::Tagged(TagFilter::Patterns(filters(patterns, true).map_err(bad)?))
            }
            ("tagged", Some(_), Some(_)) => {
                return Err(bad("give tagPrefixList or tagPatternList, not both"));
            }
            ("tagged", None, None) => {
                return Err(bad(
                    "tagStatus \"tagged\" needs tagPrefixList or tagPatternList",
                ));
            }
            ("untagged" | "any", None, None) => {
                if s.tag_status == "any" {
                    TagSelection::Any
                } else {
                    TagSelection::Untagged
                }
            }
            ("untagged" | "any", _, _) => {
                return Err(bad("tag lists only go with tagStatus \"tagged\""));
            }
            _ => return Err(bad("tagStatus is \"tagged\", \"untagged\" or \"any\"")),
        };
        if s.count_number == 0 {
            return Err(bad("countNumber is at least 1"));
        }
        let count = match (s.count_type.as_str(), s.count_unit.as_deref()) {
            ("imageCountMoreThan", None) => Count::MoreThan(s.count_number),
            ("imageCountMoreThan", Some(_)) => {
                return Err(bad("imageCountMoreThan takes no countUnit"));
            }
            ("sinceImagePushed", Some("days")) => Count::OlderThanDays(s.count_number),
            ("sinceImagePushed", _) => {
                return Err(bad("sinceImagePushed needs \"countUnit\": \"days\""));
            }
            _ => {
                return Err(bad(
                    "countType is \"imageCountMoreThan\" or \"sinceImagePushed\"",
                ));
            }
        };
        Ok(Rule {
            priority,
            description: raw.description,
            tags,
            count,
        })
    }
}

/// Checks a rule's prefix or pattern list.
fn filters(list: Vec<String>, patterns: bool) -> Result<Vec<String>, &'static str> {
    if list.is_empty() || list.len() > MAX_TAG_FILTERS {
        return Err("a tag list has 1 to 100 entries");
    }
    for f in &list {
        if f.is_empty() || f.len() > MAX_FILTER_BYTES {
            return Err("a tag prefix or pattern has 1 to 128 characters");
        }
        if patterns && f.matches('*').count() > MAX_WILDCARDS {
            return Err("a tag pattern has at most 4 wildcards");
        }
    }
    Ok(list)
}

impl From<LifecyclePolicy> for raw::Policy {
    fn from(p: LifecyclePolicy) -> raw::Policy {
        raw::Policy {
            rules: p.rules.into_iter().map(raw::Rule::from).collect(),
        }
    }
}

impl From<Rule> for raw::Rule {
    fn from(r: Rule) -> raw::Rule {
        let (tag_status, tag_prefix_list, tag_pattern_list) = match r.tags {
            TagSelection::Tagged(TagFilter::Prefixes(p)) => ("tagged", Some(p), None),
            TagSelection::Tagged(TagFilter::Patterns(p)) => ("tagged", None, Some(p)),
            TagSelection::Untagged => ("untagged", None, None),
            TagSelection::Any => ("any", None, None),
        };
        let (count_type, count_unit, count_number) = match r.count {
            Count::MoreThan(n) => ("imageCountMoreThan", None, n),
            Count::OlderThanDays(n) => ("sinceImagePushed", Some("days".to_owned()), n),
        };
        raw::Rule {
            rule_priority: r.priority,
            description: r.description,
            selection: raw::Selection {
                tag_status: tag_status.to_owned(),
                tag_prefix_list,
                tag_pattern_list,
                count_type: count_type.to_owned(),
                count_unit,
                count_number,
            },
            action: raw::Action {
                kind: "expire".to_owned(),
            },
        }
    }
}

#[cfg(test)]
mod tests;
