//! Access decisions, as a fleet's nodes and clients meet them.

use super::*;
use proptest::prelude::*;
use shoal_protocol::fleet::{AccessToken, Grant, PolicyBody, RepoPattern, Scope, TagPattern};
use std::str::FromStr;

fn admin() -> SigningKey {
    SigningKey::from_seed([1; 32])
}

fn node_key(n: u8) -> SigningKey {
    SigningKey::from_seed([10 + n; 32])
}

fn fleet_id() -> FleetId {
    FleetId::founded_by(&admin().public())
}

fn ticket(id: u8, groups: &[&str], expires_ms: u64) -> Signed<JoinTicket> {
    Signed::sign(
        &JoinTicket {
            fleet: fleet_id(),
            id: ObjectId::from_bytes([id; 16]),
            groups: groups.iter().map(|g| g.parse().unwrap()).collect(),
            issued_ms: 0,
            expires_ms,
            admin: admin().public(),
        },
        &admin(),
    )
    .unwrap()
}

fn fleet_config() -> AuthConfig {
    AuthConfig {
        fleet: Some(FleetConfig {
            id: fleet_id(),
            admins: vec![admin().public()],
            ticket: Some(ticket(1, &[], u64::MAX)),
            bootstrap: Vec::new(),
        }),
        ..AuthConfig::default()
    }
}

fn fleet_auth(me: u8) -> Auth {
    Auth::new(node_key(me), fleet_config())
}

fn signed_policy(body: PolicyBody, timestamp_ms: u64) -> SignedPolicy {
    Signed::sign(
        &Policy {
            fleet: fleet_id(),
            body,
            timestamp_ms,
            sequence: 0,
            admin: admin().public(),
        },
        &admin(),
    )
    .unwrap()
}

/// Applies `body` as the newest policy: each one later than the last, even within a
/// millisecond (two with the same time and sequence do not replace each other).
fn apply(auth: &Auth, body: PolicyBody) {
    static LAST_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let at = now_ms().max(LAST_MS.load(std::sync::atomic::Ordering::Relaxed) + 1);
    LAST_MS.fetch_max(at, std::sync::atomic::Ordering::Relaxed);
    let checked = auth.check_policy(&signed_policy(body, at)).unwrap();
    auth.apply_policy(checked);
}

fn repo(s: &str) -> RepoName {
    s.parse().unwrap()
}

fn private(pattern: &str) -> PolicyBody {
    PolicyBody::Repo {
        pattern: pattern.parse().unwrap(),
        settings: Some(RepoSettings {
            visibility: Visibility::Private,
            ..RepoSettings::default()
        }),
    }
}

fn grant(id: &str, principal: &str, repos: &str, actions: &str) -> PolicyBody {
    PolicyBody::Grant {
        id: id.parse().unwrap(),
        grant: Some(Grant {
            principal: principal.parse().unwrap(),
            repos: repos.parse().unwrap(),
            actions: actions.parse().unwrap(),
            expires_ms: None,
        }),
    }
}

fn join(auth: &Auth, n: u8, proof_ticket: Signed<JoinTicket>) -> Result<(), Refused> {
    let key = node_key(n);
    let proof = MemberProof::new(proof_ticket, &key).unwrap();
    let ticket = auth.check_member(&proof, Some(&key.public()), now_ms())?;
    auth.add_member(key.public(), ticket);
    Ok(())
}

fn token(scopes: &[(&str, &str)], expires_ms: u64, id: u8) -> Signed<AccessToken> {
    Signed::sign(
        &AccessToken {
            fleet: fleet_id(),
            id: ObjectId::from_bytes([id; 16]),
            principal: "ci".parse().unwrap(),
            scopes: scopes
                .iter()
                .map(|(r, a)| Scope {
                    repos: r.parse().unwrap(),
                    actions: a.parse().unwrap(),
                })
                .collect(),
            issued_ms: 0,
            expires_ms,
            admin: admin().public(),
        },
        &admin(),
    )
    .unwrap()
}

fn basic(password: String) -> Credentials {
    Credentials::Basic {
        user: "ci".into(),
        password,
    }
}

#[test]
fn an_open_node_admits_every_peer_and_trusts_only_itself_and_its_rules() {
    let other = node_key(2).public();
    let auth = Auth::open(node_key(1));
    assert!(auth.admits(&other));
    assert!(auth.may_publish(&node_key(1).public(), &repo("x"), Action::Push));
    assert!(!auth.may_publish(&other, &repo("x"), Action::Push));
    auth.set_trust_rules(vec![format!("{other}=team/*").parse().unwrap()]);
    assert!(auth.may_publish(&other, &repo("team/app"), Action::Push));
    assert!(!auth.may_publish(&other, &repo("lib"), Action::Push));
    assert_eq!(
        auth.authenticate(Credentials::None, true),
        Ok(Caller::Local)
    );
    assert_eq!(auth.allowed(&Caller::Local, &repo("x")), Actions::ALL);
    assert_eq!(
        auth.authenticate(Credentials::None, false),
        Ok(Caller::Anonymous)
    );
    assert!(auth.allowed(&Caller::Anonymous, &repo("x")).is_empty());
}

#[test]
fn members_are_admitted_and_others_are_not() {
    let auth = fleet_auth(1);
    assert!(!auth.admits(&node_key(2).public()), "unknown peer");
    join(&auth, 2, ticket(2, &[], u64::MAX)).unwrap();
    assert!(auth.admits(&node_key(2).public()));
    // A member's records count by default.
    assert!(auth.may_publish(&node_key(2).public(), &repo("any/repo"), Action::Push));
    // An expired ticket, another fleet's ticket, a proof for another peer.
    assert_eq!(join(&auth, 3, ticket(3, &[], 1)), Err(Refused::Expired));
    let stranger = SigningKey::from_seed([99; 32]);
    let foreign = Signed::sign(
        &JoinTicket {
            fleet: FleetId::founded_by(&stranger.public()),
            id: ObjectId::from_bytes([4; 16]),
            groups: Vec::new(),
            issued_ms: 0,
            expires_ms: u64::MAX,
            admin: stranger.public(),
        },
        &stranger,
    )
    .unwrap();
    assert_eq!(join(&auth, 4, foreign), Err(Refused::OtherFleet));
    let proof = MemberProof::new(ticket(5, &[], u64::MAX), &node_key(5)).unwrap();
    assert_eq!(
        auth.check_member(&proof, Some(&node_key(6).public()), now_ms()),
        Err(Refused::NotThePeer)
    );
}

#[test]
fn a_revoked_ticket_or_node_is_a_member_no_more() {
    let auth = fleet_auth(1);
    join(&auth, 2, ticket(2, &[], u64::MAX)).unwrap();
    join(&auth, 3, ticket(3, &[], u64::MAX)).unwrap();
    apply(
        &auth,
        PolicyBody::Revoke(Revoked::Ticket(ObjectId::from_bytes([2; 16]))),
    );
    apply(
        &auth,
        PolicyBody::Revoke(Revoked::Node(node_key(3).public())),
    );
    for n in [2, 3] {
        assert!(!auth.admits(&node_key(n).public()), "node {n}");
        assert!(
            !auth.may_publish(&node_key(n).public(), &repo("x"), Action::Push),
            "node {n}"
        );
    }
    assert_eq!(
        join(&auth, 2, ticket(2, &[], u64::MAX)),
        Err(Refused::Revoked)
    );
}

#[test]
fn only_this_fleets_admins_sign_policy_and_not_from_the_future() {
    let auth = fleet_auth(1);
    let mallory = node_key(7);
    let forged = Signed::sign(
        &Policy {
            fleet: fleet_id(),
            body: private("*"),
            timestamp_ms: now_ms(),
            sequence: 0,
            admin: mallory.public(),
        },
        &mallory,
    )
    .unwrap();
    assert_eq!(auth.check_policy(&forged), Err(Refused::NotAdmin));
    let future = signed_policy(private("*"), now_ms() + 3_600_000);
    assert_eq!(auth.check_policy(&future), Err(Refused::FromTheFuture));
    assert_eq!(
        Auth::open(node_key(1)).check_policy(&signed_policy(private("*"), 1)),
        Err(Refused::NoFleet)
    );
}

#[test]
fn a_lifecycle_policy_counts_only_when_a_fleet_admin_signed_it() {
    let auth = fleet_auth(1);
    let expire_all = PolicyBody::Lifecycle {
        pattern: "*".parse().unwrap(),
        policy: Some(
            r#"{"rules":[{"rulePriority":1,"selection":{"tagStatus":"any",
            "countType":"imageCountMoreThan","countNumber":1},"action":{"type":"expire"}}]}"#
                .into(),
        ),
    };
    // A member of the fleet (or a thief of its node key) signs a policy expiring everything.
    let member = node_key(2);
    join(&auth, 2, ticket(1, &[], u64::MAX)).unwrap();
    let forged = Signed::sign(
        &Policy {
            fleet: fleet_id(),
            body: expire_all.clone(),
            timestamp_ms: now_ms(),
            sequence: 0,
            admin: member.public(),
        },
        &member,
    )
    .unwrap();
    assert_eq!(auth.check_policy(&forged), Err(Refused::NotAdmin));
    assert!(auth.retention().is_empty(), "nothing expires");
    // The admin's own is in force.
    apply(&auth, expire_all);
    assert!(auth.retention().for_repo(&repo("team/app")).is_some());
}

#[test]
fn a_private_repository_is_read_only_by_granted_nodes_and_groups() {
    let auth = fleet_auth(1);
    join(&auth, 2, ticket(2, &[], u64::MAX)).unwrap();
    join(&auth, 3, ticket(3, &["edge"], u64::MAX)).unwrap();
    join(&auth, 4, ticket(4, &[], u64::MAX)).unwrap();
    apply(&auth, private("secret/*"));
    apply(
        &auth,
        grant(
            "n2",
            &format!("node:{}", node_key(2).public()),
            "secret/*",
            "pull",
        ),
    );
    apply(&auth, grant("edge", "group:edge", "secret/app", "pull"));
    let (secret, public) = (repo("secret/app"), repo("team/app"));
    assert!(auth.has_private_repos());
    assert!(auth.peer_may_read(&node_key(2).public(), &secret));
    assert!(auth.peer_may_read(&node_key(3).public(), &secret));
    assert!(!auth.peer_may_read(&node_key(4).public(), &secret));
    assert!(!auth.peer_may_read(&node_key(3).public(), &repo("secret/db")));
    for n in [2, 3, 4] {
        assert!(auth.peer_may_read(&node_key(n).public(), &public));
    }
    // A stranger reads nothing.
    assert!(!auth.peer_may_read(&node_key(8).public(), &public));
    // Withdrawing the grant withdraws the access.
    apply(
        &auth,
        PolicyBody::Grant {
            id: "n2".parse().unwrap(),
            grant: None,
        },
    );
    assert!(!auth.peer_may_read(&node_key(2).public(), &secret));
}

#[test]
fn listed_publishers_are_the_only_ones() {
    let auth = fleet_auth(1);
    join(&auth, 2, ticket(2, &[], u64::MAX)).unwrap();
    apply(
        &auth,
        PolicyBody::Repo {
            pattern: "prod/*".parse().unwrap(),
            settings: Some(RepoSettings {
                publishers: vec![node_key(2).public()],
                ..RepoSettings::default()
            }),
        },
    );
    assert!(auth.may_publish(&node_key(2).public(), &repo("prod/app"), Action::Push));
    assert!(!auth.may_publish(&node_key(1).public(), &repo("prod/app"), Action::Push));
    assert!(auth.may_publish(&node_key(1).public(), &repo("dev/app"), Action::Push));
}

#[test]
fn immutable_tags_except_the_excluded_ones() {
    let auth = fleet_auth(1);
    apply(
        &auth,
        PolicyBody::Repo {
            pattern: "prod/*".parse().unwrap(),
            settings: Some(RepoSettings {
                tags: TagMutability::Immutable(vec![
                    "latest".parse::<TagPattern>().unwrap(),
                    "dev-*".parse().unwrap(),
                ]),
                ..RepoSettings::default()
            }),
        },
    );
    let tag = |s: &str| s.parse::<Tag>().unwrap();
    assert!(!auth.tag_is_mutable(&repo("prod/app"), &tag("1.0")));
    assert!(auth.tag_is_mutable(&repo("prod/app"), &tag("latest")));
    assert!(auth.tag_is_mutable(&repo("prod/app"), &tag("dev-7")));
    assert!(auth.tag_is_mutable(&repo("dev/app"), &tag("1.0")));
}

#[test]
fn a_token_grants_its_scopes_until_it_expires_or_is_revoked() {
    let auth = fleet_auth(1);
    let t = token(&[("team/*", "pull,push")], now_ms() + 60_000, 7);
    let caller = auth.authenticate(basic(t.to_text()), false).unwrap();
    assert_eq!(
        auth.allowed(&caller, &repo("team/app")),
        "pull,push".parse().unwrap()
    );
    assert!(
        auth.allowed(&caller, &repo("other/app"))
            .contains(Action::Pull),
        "public"
    );
    assert!(
        !auth
            .allowed(&caller, &repo("other/app"))
            .contains(Action::Push)
    );
    apply(&auth, private("other/*"));
    assert!(auth.allowed(&caller, &repo("other/app")).is_empty());
    apply(
        &auth,
        PolicyBody::Revoke(Revoked::Token(ObjectId::from_bytes([7; 16]))),
    );
    assert!(
        auth.allowed(&caller, &repo("team/app")).is_empty(),
        "revoked mid-session"
    );
    assert_eq!(
        auth.authenticate(basic(t.to_text()), false),
        Err(Denied::BadCredentials)
    );
    let expired = token(&[("*", "*")], now_ms() - 1, 8);
    assert_eq!(
        auth.authenticate(basic(expired.to_text()), false),
        Err(Denied::Expired)
    );
}

#[test]
fn a_bearer_token_grants_the_intersection_of_asked_and_allowed() {
    let auth = fleet_auth(1);
    let t = token(&[("team/*", "pull")], now_ms() + 60_000, 9);
    let caller = auth.authenticate(basic(t.to_text()), false).unwrap();
    let asked = vec![
        (repo("team/app"), "pull,push".parse().unwrap()),
        (repo("lib/x"), "push".parse().unwrap()),
    ];
    let (bearer, granted) = auth.issue_bearer(&caller, &asked, Duration::from_secs(300));
    assert_eq!(
        granted,
        vec![(repo("team/app"), Actions::of(&[Action::Pull]))]
    );
    let back = auth
        .authenticate(Credentials::Bearer(bearer), false)
        .unwrap();
    assert_eq!(
        auth.allowed(&back, &repo("team/app")),
        Actions::of(&[Action::Pull])
    );
    assert!(auth.allowed(&back, &repo("lib/x")).is_empty());
}

#[test]
fn local_clients_are_trusted_only_when_the_operator_says_so() {
    let strict = Auth::new(
        node_key(1),
        AuthConfig {
            local_clients: LocalClients::Authenticated,
            anonymous_pull: true,
            ..AuthConfig::default()
        },
    );
    assert_eq!(
        strict.authenticate(Credentials::None, true),
        Ok(Caller::Anonymous)
    );
    // Anonymous pull of a public repository, as the operator allowed; nothing more.
    assert_eq!(
        strict.allowed(&Caller::Anonymous, &repo("x")),
        Actions::of(&[Action::Pull])
    );
}

#[test]
fn credentials_never_show_their_secret() {
    let shown = format!(
        "{:?} {:?}",
        basic("hunter2".into()),
        Credentials::Bearer("shoalb1.secret".into())
    );
    assert!(
        !shown.contains("hunter2") && !shown.contains("secret"),
        "{shown}"
    );
}

proptest! {
    #[test]
    fn a_mutated_token_never_authenticates(byte in any::<usize>(), bit in 0u8..8) {
        let auth = fleet_auth(1);
        let t = token(&[("*", "*")], u64::MAX, 1);
        let mut bytes = shoal_protocol::codec::encode(&t).unwrap();
        let i = byte % bytes.len();
        bytes[i] ^= 1 << bit;
        if let Ok(mutated) = shoal_protocol::codec::decode::<Signed<AccessToken>>(&bytes) {
            prop_assert!(auth.authenticate(basic(mutated.to_text()), false).is_err());
        }
    }

    #[test]
    fn an_expired_token_or_ticket_never_counts(expired_by in 1u64..1_000_000_000) {
        let auth = fleet_auth(1);
        let expires = now_ms().saturating_sub(expired_by);
        let t = token(&[("*", "*")], expires, 2);
        prop_assert!(auth.authenticate(basic(t.to_text()), false).is_err());
        prop_assert_eq!(join(&auth, 2, ticket(2, &[], expires)), Err(Refused::Expired));
    }

    #[test]
    fn a_grant_never_reaches_beyond_its_pattern(name in "[a-z]{1,8}(/[a-z]{1,8}){0,2}") {
        let auth = fleet_auth(1);
        apply(&auth, private("*"));
        apply(&auth, grant("g", "user:ci", "team/*", "pull"));
        let r = repo(&name);
        let caller = Caller::User("ci".parse().unwrap());
        let inside = RepoPattern::from_str("team/*").unwrap().matches(&r);
        prop_assert_eq!(auth.allowed(&caller, &r).contains(Action::Pull), inside);
    }
}

/// A member without a grant (or a thief of its key) cannot move or delete a private
/// repository's tags: its records count only with a grant of what they do, as a node or by
/// a group; a public repository's from any member, as before.
#[test]
fn a_private_repositorys_records_count_only_from_members_granted_what_they_do() {
    let auth = fleet_auth(1);
    join(&auth, 2, ticket(2, &[], u64::MAX)).unwrap();
    join(&auth, 3, ticket(3, &["build"], u64::MAX)).unwrap();
    join(&auth, 4, ticket(4, &[], u64::MAX)).unwrap();
    apply(&auth, private("secret/*"));
    let node = |n: u8| format!("node:{}", node_key(n).public());
    apply(&auth, grant("n2", &node(2), "secret/*", "pull,push"));
    apply(&auth, grant("build", "group:build", "secret/app", "delete"));
    apply(&auth, grant("n4", &node(4), "secret/*", "pull"));
    let (secret, public) = (repo("secret/app"), repo("team/app"));
    let may = |n: u8, r: &RepoName, a: Action| auth.may_publish(&node_key(n).public(), r, a);
    assert!(may(2, &secret, Action::Push));
    assert!(!may(2, &secret, Action::Delete), "push is not delete");
    assert!(may(3, &secret, Action::Delete), "by its group");
    assert!(!may(3, &secret, Action::Push));
    assert!(
        !may(3, &repo("secret/db"), Action::Delete),
        "another repository"
    );
    for a in [Action::Push, Action::Delete] {
        assert!(!may(4, &secret, a), "pull is not a write");
        assert!(!may(8, &secret, a), "a stranger");
        // This node's own key, ungranted: the fleet would refuse its records, so does it.
        assert!(!may(1, &secret, a));
        assert!(!auth.fleet_accepts(&node_key(1).public(), &secret, a));
        for n in [1, 2, 3, 4] {
            assert!(may(n, &public, a), "any member in a public repository");
        }
    }
    // A trust rule is this node's own decision; the fleet's rule stays what it is.
    auth.set_trust_rules(vec![
        format!("{}=secret/*", node_key(4).public())
            .parse()
            .unwrap(),
    ]);
    assert!(may(4, &secret, Action::Push));
    assert!(!auth.fleet_accepts(&node_key(4).public(), &secret, Action::Push));
    // Granted, this node may; withdrawn or expired, no more.
    apply(&auth, grant("n1", &node(1), "secret/*", "push"));
    assert!(may(1, &secret, Action::Push));
    assert!(auth.fleet_accepts(&node_key(1).public(), &secret, Action::Push));
    apply(
        &auth,
        PolicyBody::Grant {
            id: "n2".parse().unwrap(),
            grant: Some(Grant {
                principal: node(2).parse().unwrap(),
                repos: "secret/*".parse().unwrap(),
                actions: "push".parse().unwrap(),
                expires_ms: Some(1),
            }),
        },
    );
    assert!(!may(2, &secret, Action::Push), "expired");
    // Revoked, a granted node's records stop counting everywhere.
    apply(
        &auth,
        PolicyBody::Revoke(Revoked::Node(node_key(3).public())),
    );
    assert!(!may(3, &secret, Action::Delete));
    // Without a fleet there is no fleet rule.
    let open = Auth::open(node_key(1));
    assert!(open.fleet_accepts(&node_key(1).public(), &secret, Action::Push));
}

/// An admin key the operator adds in the config counts on this node: its policies, tokens and
/// tickets; a node that does not list it refuses them. A member's key listed nowhere never
/// becomes an admin.
#[test]
fn an_admin_key_from_the_config_counts_only_where_it_is_listed() {
    let extra = SigningKey::from_seed([42; 32]);
    let listing = Auth::new(
        node_key(1),
        AuthConfig {
            admins: vec![extra.public()],
            ..fleet_config()
        },
    );
    let other = fleet_auth(1);
    let by_extra = Signed::sign(
        &Policy {
            fleet: fleet_id(),
            body: private("secret/*"),
            timestamp_ms: now_ms(),
            sequence: 0,
            admin: extra.public(),
        },
        &extra,
    )
    .unwrap();
    let checked = listing.check_policy(&by_extra).unwrap();
    listing.apply_policy(checked);
    assert_eq!(
        listing.settings(&repo("secret/app")).visibility,
        Visibility::Private
    );
    assert_eq!(other.check_policy(&by_extra), Err(Refused::NotAdmin));
    // Its access tokens and join tickets too.
    let token = Signed::sign(
        &AccessToken {
            fleet: fleet_id(),
            id: ObjectId::from_bytes([9; 16]),
            principal: "ci".parse().unwrap(),
            scopes: Vec::new(),
            issued_ms: 0,
            expires_ms: u64::MAX,
            admin: extra.public(),
        },
        &extra,
    )
    .unwrap();
    assert!(listing.check_token(&token).is_ok());
    assert_eq!(other.check_token(&token), Err(Denied::BadCredentials));
    let ticket = Signed::sign(
        &JoinTicket {
            fleet: fleet_id(),
            id: ObjectId::from_bytes([8; 16]),
            groups: Vec::new(),
            issued_ms: 0,
            expires_ms: u64::MAX,
            admin: extra.public(),
        },
        &extra,
    )
    .unwrap();
    assert!(join(&listing, 5, ticket.clone()).is_ok());
    assert_eq!(join(&other, 5, ticket), Err(Refused::NotAdmin));
}
