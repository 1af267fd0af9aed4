use proptest::prelude::*;

use super::*;

const NOW: u64 = 1_800_000_000_000;

fn policy(json: &str) -> Result<LifecyclePolicy, String> {
    serde_json::from_str(json).map_err(|e| e.to_string())
}

fn image(n: u8, tags: &[&str], days_ago: u64) -> Image {
    Image {
        digest: Digest::sha256(&[n]),
        tags: tags.iter().map(|t| (*t).to_owned()).collect(),
        pushed_at_ms: NOW - days_ago * DAY_MS,
    }
}

/// Which of `images` (by position) the policy expires, in the order it lists them.
fn expired(p: &LifecyclePolicy, images: &[Image]) -> Vec<usize> {
    p.evaluate(images, NOW)
        .iter()
        .map(|e| {
            images
                .iter()
                .position(|i| i.digest == e.digest)
                .expect("an expired image is one of the inputs")
        })
        .collect()
}

#[test]
fn tagged_images_older_than_a_limit_expire() {
    // ECR's "Filtering on image age" example.
    let p = policy(
        r#"{"rules":[{"rulePriority":1,"description":"Expire images older than 14 days",
        "selection":{"tagStatus":"tagged","tagPatternList":["prod*"],"countType":"sinceImagePushed",
        "countUnit":"days","countNumber":14},"action":{"type":"expire"}}]}"#,
    )
    .unwrap();
    let images = [
        image(0, &["prod-1"], 20),
        image(1, &["prod-2"], 14),
        image(2, &["test-1"], 30),
        image(3, &[], 40),
    ];
    assert_eq!(expired(&p, &images), [0]);
    let e = &p.evaluate(&images, NOW)[0];
    assert_eq!(
        e.reason,
        Reason::Age {
            age_days: 20,
            limit_days: 14
        }
    );
}

#[test]
fn one_untagged_image_is_kept() {
    // ECR's "Filtering on image count" example.
    let p = policy(
        r#"{"rules":[{"rulePriority":1,"description":"Keep only one untagged image, expire all others",
        "selection":{"tagStatus":"untagged","countType":"imageCountMoreThan","countNumber":1},
        "action":{"type":"expire"}}]}"#,
    )
    .unwrap();
    let images = [
        image(0, &[], 3),
        image(1, &[], 1),
        image(2, &["v1"], 5),
        image(3, &[], 2),
    ];
    // Oldest first.
    assert_eq!(expired(&p, &images), [0, 3]);
}

#[test]
fn an_image_claimed_by_an_earlier_rule_is_counted_but_not_expired_by_a_later_one() {
    // ECR's "Filtering on multiple rules" example.
    let p = policy(
        r#"{"rules":[
        {"rulePriority":1,"selection":{"tagStatus":"tagged","tagPrefixList":["prod"],
         "countType":"imageCountMoreThan","countNumber":1},"action":{"type":"expire"}},
        {"rulePriority":2,"selection":{"tagStatus":"tagged","tagPrefixList":["beta"],
         "countType":"imageCountMoreThan","countNumber":1},"action":{"type":"expire"}}]}"#,
    )
    .unwrap();
    let images = [
        image(0, &["beta-1", "prod-1"], 10),
        image(1, &["beta-2", "prod-2"], 9),
        image(2, &["beta-3"], 8),
    ];
    // Rule 1 keeps B, expires A; rule 2 keeps C and may not expire B (rule 1 claimed it).
    assert_eq!(expired(&p, &images), [0]);
    assert_eq!(p.evaluate(&images, NOW)[0].priority, 1);
}

#[test]
fn every_prefix_of_a_rule_must_match_a_tag() {
    // ECR's "Filtering on multiple tags in a single rule" example.
    let p = policy(
        r#"{"rules":[{"rulePriority":1,"selection":{"tagStatus":"tagged",
        "tagPrefixList":["alpha","beta"],"countType":"imageCountMoreThan","countNumber":1},
        "action":{"type":"expire"}}]}"#,
    )
    .unwrap();
    let images = [
        image(0, &["alpha-1"], 12),
        image(1, &["beta-1"], 11),
        image(2, &["alpha-2", "beta-2"], 10),
        image(3, &["alpha-3"], 4),
        image(4, &["beta-3"], 3),
        image(5, &["alpha-4", "beta-4"], 2),
    ];
    assert_eq!(expired(&p, &images), [2]);
}

#[test]
fn keep_the_last_prod_images_and_drop_untagged_after_a_day() {
    let p = policy(
        r#"{"rules":[
        {"rulePriority":1,"description":"keep the last 2 prod","selection":{"tagStatus":"tagged",
         "tagPatternList":["prod*"],"countType":"imageCountMoreThan","countNumber":2},
         "action":{"type":"expire"}},
        {"rulePriority":2,"description":"untagged go after a day","selection":{
         "tagStatus":"untagged","countType":"sinceImagePushed","countUnit":"days","countNumber":1},
         "action":{"type":"expire"}},
        {"rulePriority":3,"description":"at most 5 images","selection":{"tagStatus":"any",
         "countType":"imageCountMoreThan","countNumber":5},"action":{"type":"expire"}}]}"#,
    )
    .unwrap();
    let images = [
        image(0, &["prod-1"], 30),
        image(1, &["prod-2"], 20),
        image(2, &["prod-3"], 10),
        image(3, &[], 2),
        image(4, &[], 0),
        image(5, &["dev-1"], 25),
        image(6, &["dev-2"], 15),
        image(7, &["dev-3"], 5),
    ];
    // Rule 1 expires prod-1; rule 2 the two-day-old untagged image; rule 3 ranks all eight
    // (newest: 4, 3, 7, 2, 6, 1, 5, 0) and may only expire the unclaimed dev-1 at #7.
    assert_eq!(expired(&p, &images), [0, 3, 5]);
    let reasons: Vec<u32> = p
        .evaluate(&images, NOW)
        .iter()
        .map(|e| e.priority)
        .collect();
    assert_eq!(reasons, [1, 2, 3]);
}

#[test]
fn ties_in_push_time_are_broken_the_same_way_whatever_the_input_order() {
    let p = policy(
        r#"{"rules":[{"rulePriority":1,"selection":{"tagStatus":"any",
        "countType":"imageCountMoreThan","countNumber":2},"action":{"type":"expire"}}]}"#,
    )
    .unwrap();
    let mut images: Vec<Image> = (0..6).map(|n| image(n, &["x"], 1)).collect();
    let a: Vec<Expiry> = p.evaluate(&images, NOW);
    images.reverse();
    let b: Vec<Expiry> = p.evaluate(&images, NOW);
    assert_eq!(a, b);
    assert_eq!(a.len(), 4);
}

#[test]
fn invalid_policies_are_refused_with_a_reason() {
    let rule = |priority: u32, selection: &str| {
        format!(
            r#"{{"rulePriority":{priority},"selection":{selection},"action":{{"type":"expire"}}}}"#
        )
    };
    let count = r#""countType":"imageCountMoreThan","countNumber":1"#;
    let cases = [
        (r#"{"rules":[]}"#.to_owned(), "1 to 50 rules"),
        (
            format!(
                r#"{{"rules":[{},{}]}}"#,
                rule(1, &format!(r#"{{"tagStatus":"untagged",{count}}}"#)),
                rule(1, &format!(r#"{{"tagStatus":"tagged","tagPrefixList":["a"],{count}}}"#))
            ),
            "used twice",
        ),
        (
            format!(
                r#"{{"rules":[{},{}]}}"#,
                rule(1, &format!(r#"{{"tagStatus":"any",{count}}}"#)),
                rule(2, &format!(r#"{{"tagStatus":"tagged","tagPrefixList":["a"],{count}}}"#))
            ),
            "highest rulePriority",
        ),
        (
            format!(
                r#"{{"rules":[{},{}]}}"#,
                rule(1, &format!(r#"{{"tagStatus":"untagged",{count}}}"#)),
                rule(2, &format!(r#"{{"tagStatus":"untagged",{count}}}"#))
            ),
            "only one rule",
        ),
        (
            format!(
                r#"{{"rules":[{}]}}"#,
                rule(1, &format!(r#"{{"tagStatus":"tagged",{count}}}"#))
            ),
            "needs tagPrefixList",
        ),
        (
            format!(
                r#"{{"rules":[{}]}}"#,
                rule(
                    1,
                    &format!(
                        r#"{{"tagStatus":"tagged","tagPrefixList":["a"],"tagPatternList":["a*"],{count}}}"#
                    )
                )
            ),
            "not both",
        ),
        (
            format!(
                r#"{{"rules":[{}]}}"#,
                rule(
                    1,
                    &format!(r#"{{"tagStatus":"tagged","tagPatternList":["*a*b*c*d*e"],{count}}}"#)
                )
            ),
            "4 wildcards",
        ),
        (
            format!(
                r#"{{"rules":[{}]}}"#,
                rule(1, &format!(r#"{{"tagStatus":"untagged","tagPrefixList":["a"],{count}}}"#))
            ),
            "only go with",
        ),
        (
            format!(
                r#"{{"rules":[{}]}}"#,
                rule(
                    1,
                    r#"{"tagStatus":"any","countType":"sinceImagePushed","countNumber":3}"#
                )
            ),
            "countUnit",
        ),
        (
            format!(
                r#"{{"rules":[{}]}}"#,
                rule(
                    1,
                    r#"{"tagStatus":"any","countType":"sinceImagePulled","countUnit":"days","countNumber":3}"#
                )
            ),
            "countType is",
        ),
        (
            format!(
                r#"{{"rules":[{}]}}"#,
                rule(0, &format!(r#"{{"tagStatus":"any",{count}}}"#))
            ),
            "starts at 1",
        ),
        (
            format!(
                r#"{{"rules":[{}]}}"#,
                rule(1, r#"{"tagStatus":"any","countType":"imageCountMoreThan","countNumber":0}"#)
            ),
            "at least 1",
        ),
        (
            format!(
                r#"{{"rules":[{}]}}"#,
                rule(
                    1,
                    &format!(r#"{{"tagStatus":"any","storageClass":"archive",{count}}}"#)
                )
            ),
            "storageClass",
        ),
        (
            r#"{"rules":[{"rulePriority":1,"selection":{"tagStatus":"any","countType":"imageCountMoreThan","countNumber":1},"action":{"type":"transition"}}]}"#.to_owned(),
            "only action",
        ),
    ];
    for (json, why) in cases {
        let e = policy(&json).expect_err(&json);
        assert!(e.contains(why), "{json}: {e} (expected {why:?})");
    }
}

#[test]
fn a_policy_round_trips_through_its_json() {
    let text = r#"{"rules":[
        {"rulePriority":5,"description":"d","selection":{"tagStatus":"tagged",
         "tagPatternList":["prod*"],"countType":"imageCountMoreThan","countNumber":2},
         "action":{"type":"expire"}},
        {"rulePriority":9,"selection":{"tagStatus":"any","countType":"sinceImagePushed",
         "countUnit":"days","countNumber":30},"action":{"type":"expire"}}]}"#;
    let p = policy(text).unwrap();
    let again = policy(&serde_json::to_string(&p).unwrap()).unwrap();
    assert_eq!(p, again);
    assert_eq!(p.rules()[0].priority, 5);
}

#[test]
fn wildcards() {
    for (p, t, m) in [
        ("prod*", "prod", true),
        ("prod*", "prod-1", true),
        ("prod*", "pro", false),
        ("*-rc*", "v1-rc2", true),
        ("*-rc*", "v1", false),
        ("a*b*c", "abc", true),
        ("a*b*c", "axxbyyc", true),
        ("a*b*c", "axxbyycd", false),
        ("*", "", true),
        ("", "", true),
        ("", "a", false),
        ("v1.*.*", "v1.2.3", true),
        ("v1.*.*", "v1.2", false),
    ] {
        assert_eq!(wildcard_match(p, t), m, "{p:?} vs {t:?}");
    }
}

/// The wildcard matcher against a plain recursive definition.
fn reference_match(p: &[u8], t: &[u8]) -> bool {
    match p.split_first() {
        None => t.is_empty(),
        Some((b'*', rest)) => (0..=t.len()).any(|i| reference_match(rest, &t[i..])),
        Some((c, rest)) => t.first() == Some(c) && reference_match(rest, &t[1..]),
    }
}

proptest! {
    #[test]
    fn wildcard_matching_agrees_with_its_definition(p in "[ab*]{0,8}", t in "[ab]{0,10}") {
        prop_assert_eq!(wildcard_match(&p, &t), reference_match(p.as_bytes(), t.as_bytes()));
    }

    #[test]
    fn any_json_parses_or_errs(s in ".{0,200}") {
        let _ = serde_json::from_str::<LifecyclePolicy>(&s);
    }

    #[test]
    fn a_count_rule_keeps_exactly_its_count(n in 1u32..8, k in 0usize..20) {
        let p = policy(&format!(
            r#"{{"rules":[{{"rulePriority":1,"selection":{{"tagStatus":"any",
            "countType":"imageCountMoreThan","countNumber":{n}}},"action":{{"type":"expire"}}}}]}}"#
        )).unwrap();
        let images: Vec<Image> = (0..k).map(|i| image(i as u8, &[], i as u64)).collect();
        prop_assert_eq!(p.evaluate(&images, NOW).len(), k.saturating_sub(n as usize));
    }
}
