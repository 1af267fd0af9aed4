//! Client access to one node over HTTP, as docker, podman and skopeo meet it: the `401`
//! challenge, the token endpoint, Basic credentials on every request, `403` for a principal
//! without the action, `429` after repeated failures, immutable tags, the filtered catalog,
//! mounts, and the audit trail. The node treats its loopback clients like any other
//! (`local_clients = authenticated`), so the test's own connections are the clients.

mod testnet;

use std::time::Duration;

use base64::Engine as _;
use shoal_node::auth::LocalClients;
use shoal_node::auth::users::{User, Users, hash_password};
use shoal_node::config::AccessConfig;
use shoal_protocol::fleet::{AccessToken, FleetId, JoinTicket, JoinToken, ObjectId, Scope, Signed};
use shoal_protocol::{Digest, SigningKey};
use testnet::{Response, TestNet, TestNode, http, image};

fn now() -> u64 {
    shoal_node::auth::now_ms()
}

struct Fleet {
    key: SigningKey,
    id: FleetId,
}

impl Fleet {
    fn new() -> Fleet {
        let key = SigningKey::from_seed([42; 32]);
        Fleet {
            id: FleetId::founded_by(&key.public()),
            key,
        }
    }

    fn join(&self) -> String {
        let ticket = JoinTicket {
            fleet: self.id,
            id: ObjectId::from_bytes([1; 16]),
            groups: Vec::new(),
            issued_ms: now(),
            expires_ms: now() + 3_600_000,
            admin: self.key.public(),
        };
        JoinToken {
            fleet: self.id,
            admins: vec![self.key.public()],
            bootstrap: Vec::new(),
            ticket: Signed::sign(&ticket, &self.key).unwrap(),
        }
        .to_text()
    }

    fn token(&self, scopes: &[(&str, &str)], ttl_ms: u64) -> String {
        let token = AccessToken {
            fleet: self.id,
            id: ObjectId::from_bytes(rand::random()),
            principal: "ci".parse().unwrap(),
            scopes: scopes
                .iter()
                .map(|(r, a)| Scope {
                    repos: r.parse().unwrap(),
                    actions: a.parse().unwrap(),
                })
                .collect(),
            issued_ms: now(),
            expires_ms: now() + ttl_ms,
            admin: self.key.public(),
        };
        Signed::sign(&token, &self.key).unwrap().to_text()
    }
}

fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

async fn get(node: &TestNode, path: &str, auth: Option<&str>) -> Response {
    let mut headers = vec![("Accept", "*/*")];
    if let Some(a) = auth {
        headers.push(("Authorization", a));
    }
    http(node.http_addr(), "GET", path, &headers, b"").await
}

fn error_code(r: &Response) -> String {
    serde_json::from_slice::<serde_json::Value>(&r.body)
        .ok()
        .and_then(|v| v["errors"][0]["code"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Pushes `img` to `repo:tag` with `auth` on every request; returns the manifest PUT's answer.
async fn push(
    node: &TestNode,
    repo: &str,
    tag: &str,
    img: &testnet::Image,
    auth: &str,
) -> Response {
    for b in &img.blobs {
        let d = Digest::sha256(b);
        let r = http(
            node.http_addr(),
            "POST",
            &format!("/v2/{repo}/blobs/uploads/?digest={d}"),
            &[("Authorization", auth)],
            b,
        )
        .await;
        if r.status != 201 {
            return r;
        }
    }
    http(
        node.http_addr(),
        "PUT",
        &format!("/v2/{repo}/manifests/{tag}"),
        &[
            ("Content-Type", "application/vnd.oci.image.manifest.v1+json"),
            ("Authorization", auth),
        ],
        &img.manifest,
    )
    .await
}

/// Makes the repositories of `pattern` private on `n`, as the fleet's admin, and grants the
/// node push and delete there (the fleet counts a private repository's records only from nodes
/// granted what they do).
async fn make_private(n: &TestNode, fleet: &Fleet, pattern: &str) {
    let body = shoal_protocol::fleet::PolicyBody::Repo {
        pattern: pattern.parse().unwrap(),
        settings: Some(shoal_protocol::fleet::RepoSettings {
            visibility: shoal_protocol::fleet::Visibility::Private,
            ..Default::default()
        }),
    };
    apply_policy(n, fleet, body).await;
    let grant = shoal_protocol::fleet::PolicyBody::Grant {
        id: format!("node-{}", pattern.replace(['*', '/'], ""))
            .parse()
            .unwrap(),
        grant: Some(shoal_protocol::fleet::Grant {
            principal: shoal_protocol::fleet::Principal::Node(n.identity.publisher()),
            repos: pattern.parse().unwrap(),
            actions: "push,delete".parse().unwrap(),
            expires_ms: None,
        }),
    };
    apply_policy(n, fleet, grant).await;
}

/// Signs `body` as the fleet's admin and has `n` take it in, as from gossip.
async fn apply_policy(n: &TestNode, fleet: &Fleet, body: shoal_protocol::fleet::PolicyBody) {
    let policy = shoal_protocol::fleet::Policy {
        fleet: fleet.id,
        body,
        timestamp_ms: now(),
        sequence: 0,
        admin: fleet.key.public(),
    };
    let node = n.node();
    shoal_node::auth::ingest::policy(
        node.tags().auth(),
        node.store(),
        Signed::sign(&policy, &fleet.key).unwrap(),
    )
    .await
    .unwrap();
}

/// Each of `calls` (method, path, body) answers anonymous with 401 and the user `ana` and the
/// access token `ci` with 403, in the registry's error format, naming no repository.
async fn refused_to_non_admins(n: &TestNode, calls: &[(&str, &str, &str)], ana: &str, ci: &str) {
    for (who, auth, status) in [
        ("anonymous", None, 401),
        ("a user", Some(ana), 403),
        ("an access token", Some(ci), 403),
    ] {
        for &(method, path, body) in calls {
            let mut headers = vec![("Content-Type", "application/json")];
            if let Some(a) = auth {
                headers.push(("Authorization", a));
            }
            let r = http(n.http_addr(), method, path, &headers, body.as_bytes()).await;
            assert_eq!(r.status, status, "{who} {method} {path}");
            let code = error_code(&r);
            assert!(
                code == "UNAUTHORIZED" || code == "DENIED",
                "{who} {path}: {code}"
            );
            assert!(
                !String::from_utf8_lossy(&r.body).contains("team/app"),
                "{who} {path}"
            );
        }
    }
}

async fn node(fleet: &Fleet) -> TestNet {
    node_with(fleet, false).await
}

/// [`node`], letting clients without credentials pull public repositories if `anonymous_pull`.
async fn node_with(fleet: &Fleet, anonymous_pull: bool) -> TestNet {
    let mut net = TestNet::with_identities(1);
    net.access.insert(
        0,
        AccessConfig {
            join: Some(fleet.join()),
            local_clients: LocalClients::Authenticated,
            anonymous_pull,
            ..AccessConfig::default()
        },
    );
    // A user of this node, for people: pull and push on team/*.
    let users = Users::from_list(vec![User {
        name: "ana".parse().unwrap(),
        hash: hash_password("correct horse").unwrap(),
        repos: "team/*".parse().unwrap(),
        actions: "pull,push".parse().unwrap(),
    }]);
    net.before_start = Some(Box::new(move |dir: &std::path::Path| {
        users.write(dir).unwrap();
    }));
    net.start_next().await;
    net
}

#[tokio::test(flavor = "multi_thread")]
async fn the_token_flow_works_as_docker_uses_it() {
    let fleet = Fleet::new();
    let net = node(&fleet).await;
    let n = &net.nodes[0];
    // Anonymous: a challenge pointing at the token endpoint.
    let r = get(n, "/v2/", None).await;
    assert_eq!(r.status, 401);
    assert_eq!(error_code(&r), "UNAUTHORIZED");
    let challenge = r.header("www-authenticate").unwrap().to_owned();
    assert!(
        challenge.starts_with("Bearer realm=\"http://"),
        "{challenge}"
    );
    assert!(
        challenge.contains("/token\",service=\"shoal\""),
        "{challenge}"
    );
    let r = get(n, "/v2/team/app/tags/list", None).await;
    assert_eq!(r.status, 401);
    assert!(
        r.header("www-authenticate")
            .unwrap()
            .contains("scope=\"repository:team/app:pull\"")
    );

    // docker login: the token endpoint with Basic credentials (an access token as password).
    let access = fleet.token(&[("team/*", "pull,push")], 600_000);
    let login = get(
        n,
        "/token?service=shoal&account=ci",
        Some(&basic("ci", &access)),
    )
    .await;
    assert_eq!(
        login.status,
        200,
        "{}",
        String::from_utf8_lossy(&login.body)
    );
    // A pull-and-push scope on team/app, and a scope the token does not cover: the token
    // grants the intersection.
    let r = get(
        n,
        "/token?service=shoal&scope=repository:team/app:pull,push&scope=repository:lib/x:pull,push",
        Some(&basic("ci", &access)),
    )
    .await;
    assert_eq!(r.status, 200);
    let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    for key in ["token", "access_token", "expires_in", "issued_at"] {
        assert!(!body[key].is_null(), "{key} missing in {body}");
    }
    let bearer = format!("Bearer {}", body["token"].as_str().unwrap());
    assert_eq!(get(n, "/v2/", Some(&bearer)).await.status, 200);
    let img = image(41, &[64 << 10]);
    assert_eq!(push(n, "team/app", "1", &img, &bearer).await.status, 201);
    // lib/x was asked for but not granted: no push, though lib/x is public to pull.
    let r = push(n, "lib/x", "1", &img, &bearer).await;
    assert_eq!(r.status, 403);
    assert_eq!(error_code(&r), "DENIED");
    assert!(
        r.header("www-authenticate").is_none(),
        "asked and refused: no new token helps"
    );
    // A token asked for `pull` only (as oras asks first, then pushes): a push is sent back for
    // a token that covers it (RFC 6750's insufficient_scope), and the new token pushes.
    let r = get(
        n,
        "/token?service=shoal&scope=repository:team/app:pull",
        Some(&basic("ci", &access)),
    )
    .await;
    let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let pull_only = format!("Bearer {}", body["token"].as_str().unwrap());
    let r = push(n, "team/app", "2", &img, &pull_only).await;
    assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body));
    let challenge = r.header("www-authenticate").unwrap();
    assert!(
        challenge.contains("error=\"insufficient_scope\""),
        "{challenge}"
    );
    assert!(
        challenge.contains("repository:team/app:push"),
        "{challenge}"
    );

    // Basic credentials on every request work too.
    let auth = basic("ci", &access);
    let r = get(n, "/v2/team/app/manifests/1", Some(&auth)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, img.manifest);
    // A node user with a password.
    let ana = basic("ana", "correct horse");
    assert_eq!(
        get(n, "/v2/team/app/manifests/1", Some(&ana)).await.status,
        200
    );
    assert_eq!(push(n, "other/app", "1", &img, &ana).await.status, 403);
    // The catalog lists what the caller may pull.
    let catalog = get(n, "/v2/_catalog", Some(&ana)).await;
    assert!(String::from_utf8_lossy(&catalog.body).contains("team/app"));
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_credentials_are_refused_and_repeated_failures_slowed_down() {
    let fleet = Fleet::new();
    let net = node(&fleet).await;
    let n = &net.nodes[0];
    let expired = fleet.token(&[("*", "pull")], 0);
    let forged = Fleet {
        key: SigningKey::from_seed([43; 32]),
        id: fleet.id,
    }
    .token(&[("*", "pull,push")], 600_000);
    for (what, auth) in [
        ("a wrong password", basic("ana", "wrong")),
        ("an expired token", basic("ci", &expired)),
        ("a token of another admin", basic("ci", &forged)),
        (
            "a bearer token this node did not issue",
            "Bearer shoalb1.AAAA".to_owned(),
        ),
    ] {
        let r = get(n, "/v2/team/app/tags/list", Some(&auth)).await;
        assert_eq!(r.status, 401, "{what}");
        assert_eq!(error_code(&r), "UNAUTHORIZED", "{what}");
        assert!(
            !String::from_utf8_lossy(&r.body).contains("wrong"),
            "the answer repeats the secret"
        );
    }
    // Six more failures reach the limit of ten; then even good credentials wait.
    for _ in 0..6 {
        get(n, "/v2/", Some(&basic("ana", "wrong"))).await;
    }
    let r = get(n, "/v2/", Some(&basic("ana", "correct horse"))).await;
    assert_eq!(r.status, 429);
    assert_eq!(error_code(&r), "TOOMANYREQUESTS");
    assert!(r.header("retry-after").is_some());
    // Nothing secret went to the audit trail; every denial did.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let trail = std::fs::read_to_string(n.dir.path().join("audit.log")).unwrap();
    assert!(trail.matches("\"denied\"").count() >= 4, "{trail}");
    assert!(
        !trail.contains("wrong") && !trail.contains("correct horse") && !trail.contains(&forged)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mount_never_lends_a_blob_the_caller_cannot_pull() {
    let fleet = Fleet::new();
    let net = node(&fleet).await;
    let n = &net.nodes[0];
    // secret/* is private: only explicit grants pull it.
    make_private(n, &fleet, "secret/*").await;
    let writer = basic("ci", &fleet.token(&[("*", "pull,push")], 600_000));
    let img = image(42, &[64 << 10]);
    assert_eq!(push(n, "secret/app", "1", &img, &writer).await.status, 201);
    // Ana may push to team/* but not pull secret/*: the mount is refused.
    let layer = Digest::sha256(&img.blobs[1]);
    let r = http(
        n.http_addr(),
        "POST",
        &format!("/v2/team/app/blobs/uploads/?mount={layer}&from=secret/app"),
        &[("Authorization", &basic("ana", "correct horse"))],
        b"",
    )
    .await;
    assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body));
    // Without `from`, a mount that would reach the private blob is no mount: a new session.
    let r = http(
        n.http_addr(),
        "POST",
        &format!("/v2/team/app/blobs/uploads/?mount={layer}"),
        &[("Authorization", &basic("ana", "correct horse"))],
        b"",
    )
    .await;
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let r = get(
        n,
        &format!("/v2/team/app/blobs/{layer}"),
        Some(&basic("ana", "correct horse")),
    )
    .await;
    assert_eq!(r.status, 404);
}

/// A bearer token stops working as soon as the access token it was issued for is revoked, not
/// minutes later when it runs out.
#[tokio::test(flavor = "multi_thread")]
async fn revoking_an_access_token_stops_the_bearer_tokens_issued_for_it() {
    let fleet = Fleet::new();
    let net = node(&fleet).await;
    let n = &net.nodes[0];
    let access = fleet.token(&[("team/*", "pull,push")], 600_000);
    let id = Signed::<AccessToken>::from_text(&access)
        .unwrap()
        .verify()
        .unwrap()
        .statement()
        .id;
    let login = get(
        n,
        "/token?service=shoal&scope=repository:team/app:pull",
        Some(&basic("ci", &access)),
    )
    .await;
    let body: serde_json::Value = serde_json::from_slice(&login.body).unwrap();
    let bearer = format!("Bearer {}", body["token"].as_str().unwrap());
    assert_eq!(get(n, "/v2/", Some(&bearer)).await.status, 200);
    let revoke =
        shoal_protocol::fleet::PolicyBody::Revoke(shoal_protocol::fleet::Revoked::Token(id));
    apply_policy(n, &fleet, revoke).await;
    let r = get(n, "/v2/", Some(&bearer)).await;
    assert_eq!(r.status, 401, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        get(n, "/token?service=shoal", Some(&basic("ci", &access)))
            .await
            .status,
        401,
        "the revoked access token itself"
    );
}

/// A node asked to serve a non-loopback address in plain HTTP, or over HTTPS with nobody to
/// log in, refuses to start (anyone who reaches the port would own the registry), unless told
/// `--insecure`.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_refuses_an_open_non_loopback_address_unless_told_insecure() {
    use shoal_node::Node;
    use shoal_node::config::Config;
    let start = |dir: &std::path::Path, access: AccessConfig| {
        let memory: libp2p::Multiaddr = format!("/memory/{}", rand::random::<u64>() >> 1)
            .parse()
            .unwrap();
        Node::start(Config {
            data_dir: dir.to_path_buf(),
            // Every address of the host: not loopback.
            listen: "0.0.0.0:0".parse().unwrap(),
            net: shoal_node::net::NetConfig {
                listen: vec![memory],
                mdns: false,
                ..Default::default()
            },
            trust: Vec::new(),
            shutdown_grace: Duration::from_secs(5),
            access,
            http: Default::default(),
            gc: Default::default(),
            quota: Default::default(),
            prefetch: Default::default(),
            mirror: Default::default(),
        })
    };
    let dir = tempfile::tempdir().unwrap();
    let refused = start(dir.path(), AccessConfig::default()).await;
    assert!(
        matches!(refused, Err(shoal_node::node::NodeError::Unsafe(_))),
        "plain HTTP on 0.0.0.0 started: {:?}",
        refused.as_ref().err()
    );
    // HTTPS, but no user and no fleet: still nobody to tell owners from strangers.
    let (c, k, _) = testnet::self_signed(dir.path());
    let tls_only = AccessConfig {
        tls: Some((c, k)),
        ..AccessConfig::default()
    };
    // (Each start in its own directory: the index of a refused one is released a moment later.)
    let dir2 = tempfile::tempdir().unwrap();
    let refused = start(dir2.path(), tls_only).await;
    assert!(
        matches!(refused, Err(shoal_node::node::NodeError::Unsafe(_))),
        "HTTPS with nobody to log in started: {:?}",
        refused.as_ref().err()
    );
    let insecure = AccessConfig {
        insecure: true,
        ..AccessConfig::default()
    };
    let dir3 = tempfile::tempdir().unwrap();
    let node = start(dir3.path(), insecure)
        .await
        .expect("--insecure starts it");
    node.shutdown().await;
}

/// Paging the catalog one name at a time shows a caller only what it may pull, in the pages
/// and in their `Link` cursors: a private repository's name does not leak through the cursor
/// of a page that skipped it.
#[tokio::test(flavor = "multi_thread")]
async fn catalog_pages_and_their_cursors_name_no_repository_the_caller_cannot_see() {
    let fleet = Fleet::new();
    let net = node(&fleet).await;
    let n = &net.nodes[0];
    make_private(n, &fleet, "secret/*").await;
    let writer = basic("ci", &fleet.token(&[("*", "pull,push")], 600_000));
    // Sorted: the private names come first, between and last.
    for (i, repo) in [
        "secret/a", "secret/b", "team/x", "secret/m", "team/y", "secret/z",
    ]
    .iter()
    .enumerate()
    {
        let img = image(60 + i as u64, &[1 << 10]);
        assert_eq!(
            push(n, repo, "1", &img, &writer).await.status,
            201,
            "{repo}"
        );
    }
    let ana = basic("ana", "correct horse");
    let (mut seen, mut path) = (Vec::new(), Some("/v2/_catalog?n=1".to_owned()));
    while let Some(p) = path {
        let r = get(n, &p, Some(&ana)).await;
        assert_eq!(r.status, 200, "{p}: {}", String::from_utf8_lossy(&r.body));
        let link = r.header("link").map(str::to_owned);
        assert!(
            !link.as_deref().unwrap_or_default().contains("secret"),
            "the cursor names a private repository: {link:?}"
        );
        let page: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        seen.extend(
            page["repositories"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_owned()),
        );
        path = link.and_then(|l| Some(l.split_once('<')?.1.split_once('>')?.0.to_owned()));
        assert!(seen.len() <= 2, "more pages than visible names: {seen:?}");
    }
    assert_eq!(seen, ["team/x", "team/y"]);
    // The writer, who may pull everything, pages through all six.
    let r = get(n, "/v2/_catalog?n=10", Some(&writer)).await;
    let page: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(page["repositories"].as_array().unwrap().len(), 6);
}

/// The admin API's garbage collection, journal compaction, disk usage, retention preview and
/// policies, and fleet policy signing answer a client that is
/// not an admin (anonymous, a user, a fleet access token) with 401 or 403 and change nothing:
/// a stranger cannot make the node collect with no grace period and so drop a push that no tag
/// names yet, nor learn the node's repositories from `du`.
#[tokio::test(flavor = "multi_thread")]
async fn the_admin_api_refuses_clients_that_are_not_admins() {
    let fleet = Fleet::new();
    let net = node(&fleet).await;
    let n = &net.nodes[0];
    let ana = basic("ana", "correct horse");
    let ci = basic("ci", &fleet.token(&[("team/*", "pull,push")], 600_000));
    // Pushed by digest: garbage to a collection with no grace period.
    let img = image(21, &[10_000]);
    let by_digest = img.digest.to_string();
    let r = push(n, "team/app", &by_digest, &img, &ana).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let preview = r#"{"repo": "team/app", "policy": {"rules": [{"rulePriority": 1,
        "selection": {"tagStatus": "any", "countType": "imageCountMoreThan", "countNumber": 1},
        "action": {"type": "expire"}}]}}"#;
    // A retention policy that would expire every image but one, fleet-wide.
    let expire_all = serde_json::json!({"body": {"Lifecycle": {"pattern": "*", "policy":
        r#"{"rules": [{"rulePriority": 1, "selection": {"tagStatus": "any",
        "countType": "imageCountMoreThan", "countNumber": 1}, "action": {"type": "expire"}}]}"#}}})
    .to_string();
    let calls: [(&str, &str, &str); 6] = [
        (
            "POST",
            "/_shoal/v1/gc",
            r#"{"dry_run": false, "grace_secs": 0}"#,
        ),
        ("POST", "/_shoal/v1/compact", ""),
        ("GET", "/_shoal/v1/du?grace_secs=0", ""),
        ("POST", "/_shoal/v1/lifecycle/preview", preview),
        ("GET", "/_shoal/v1/lifecycle", ""),
        ("POST", "/_shoal/v1/fleet/policy", expire_all.as_str()),
    ];
    refused_to_non_admins(n, &calls, &ana, &ci).await;
    // Nothing was collected.
    let path = format!("/v2/team/app/manifests/{by_digest}");
    assert_eq!(get(n, &path, Some(&ana)).await.status, 200);
    for b in &img.blobs {
        let path = format!("/v2/team/app/blobs/{}", Digest::sha256(b));
        assert_eq!(get(n, &path, Some(&ana)).await.status, 200);
    }
}

/// The admin API's pins and quota answer a client that is not an admin with 401 or 403 and
/// change nothing: a stranger cannot pin (holding disk forever against the quota), unpin (so
/// that the quota evicts a fleet's last copies), list the pins, or make the node evict now.
#[tokio::test(flavor = "multi_thread")]
async fn the_pins_and_quota_api_refuses_clients_that_are_not_admins() {
    let fleet = Fleet::new();
    let net = node(&fleet).await;
    let n = &net.nodes[0];
    let ana = basic("ana", "correct horse");
    let ci = basic("ci", &fleet.token(&[("team/*", "pull,push")], 600_000));
    let img = image(22, &[10_000]);
    let r = push(n, "team/app", "1", &img, &ana).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let store = n.node().store();
    let (repo, reference) = shoal_node::store::pins::parse_image("team/app:1").unwrap();
    let pin = shoal_node::store::pins::Pin {
        repo,
        reference,
        copies: 2,
    };
    assert!(store.pin(pin.clone()).await.unwrap());
    let calls: [(&str, &str, &str); 4] = [
        (
            "POST",
            "/_shoal/v1/pins",
            r#"{"image": "team/app:1", "copies": 64}"#,
        ),
        ("POST", "/_shoal/v1/unpin", r#"{"image": "team/app:1"}"#),
        ("GET", "/_shoal/v1/pins", ""),
        ("POST", "/_shoal/v1/quota", ""),
    ];
    refused_to_non_admins(n, &calls, &ana, &ci).await;
    // The pin is as it was.
    assert_eq!(store.pins().await.unwrap(), vec![pin]);
}

/// A principal that may pull and push but not delete gets `403 DENIED` for a `DELETE` of a
/// tag, a manifest or a blob, and nothing is deleted; with `delete`, the same request goes
/// through.
#[tokio::test(flavor = "multi_thread")]
async fn a_delete_without_the_delete_action_is_denied_and_deletes_nothing() {
    let fleet = Fleet::new();
    let net = node(&fleet).await;
    let n = &net.nodes[0];
    let writer = basic("ci", &fleet.token(&[("team/*", "pull,push")], 600_000));
    let img = image(70, &[16 << 10]);
    assert_eq!(push(n, "team/app", "1", &img, &writer).await.status, 201);
    let layer = Digest::sha256(&img.blobs[1]);
    let paths = [
        "/v2/team/app/manifests/1".to_owned(),
        format!("/v2/team/app/manifests/{}", img.digest),
        format!("/v2/team/app/blobs/{layer}"),
    ];
    for path in &paths {
        let r = http(
            n.http_addr(),
            "DELETE",
            path,
            &[("Authorization", &writer)],
            b"",
        )
        .await;
        assert_eq!(
            r.status,
            403,
            "{path}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(error_code(&r), "DENIED", "{path}");
    }
    for path in &paths {
        let r = get(n, path, Some(&writer)).await;
        assert_eq!(r.status, 200, "{path} is gone");
    }
    let r = get(n, "/v2/team/app/manifests/1", Some(&writer)).await;
    assert_eq!(
        r.header("docker-content-digest"),
        Some(img.digest.to_string().as_str())
    );
    // With the action, the same request deletes.
    let deleter = basic("ci", &fleet.token(&[("team/*", "pull,delete")], 600_000));
    let r = http(
        n.http_addr(),
        "DELETE",
        &paths[0],
        &[("Authorization", &deleter)],
        b"",
    )
    .await;
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(get(n, &paths[0], Some(&writer)).await.status, 404);
}

/// With anonymous pulls allowed (`anonymous_pull`), a client without credentials pulls a
/// public repository over HTTP, and is answered `401` with a challenge for a private one (and
/// for any push).
#[tokio::test(flavor = "multi_thread")]
async fn anonymous_pulls_reach_public_repositories_only() {
    let fleet = Fleet::new();
    let net = node_with(&fleet, true).await;
    let n = &net.nodes[0];
    make_private(n, &fleet, "secret/*").await;
    let writer = basic("ci", &fleet.token(&[("*", "pull,push")], 600_000));
    let img = image(71, &[16 << 10]);
    for repo in ["team/app", "secret/app"] {
        assert_eq!(
            push(n, repo, "1", &img, &writer).await.status,
            201,
            "{repo}"
        );
    }
    let r = get(n, "/v2/team/app/manifests/1", None).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.body, img.manifest);
    for b in &img.blobs {
        let r = get(
            n,
            &format!("/v2/team/app/blobs/{}", Digest::sha256(b)),
            None,
        )
        .await;
        assert_eq!(r.status, 200);
        assert_eq!(&r.body, b);
    }
    for path in [
        "/v2/secret/app/manifests/1".to_owned(),
        "/v2/secret/app/tags/list".to_owned(),
        format!("/v2/secret/app/blobs/{}", Digest::sha256(&img.blobs[1])),
    ] {
        let r = get(n, &path, None).await;
        assert_eq!(r.status, 401, "{path}");
        assert_eq!(error_code(&r), "UNAUTHORIZED", "{path}");
        let challenge = r.header("www-authenticate").unwrap_or_default();
        assert!(
            challenge.starts_with("Bearer realm=")
                && challenge.contains("scope=\"repository:secret/app:pull\""),
            "{path}: {challenge}"
        );
        assert!(!String::from_utf8_lossy(&r.body).contains(&img.digest.to_string()));
    }
    let r = http(
        n.http_addr(),
        "POST",
        "/v2/team/app/blobs/uploads/",
        &[],
        b"",
    )
    .await;
    assert_eq!(r.status, 401);
    // The catalog names only the public repository.
    let catalog = get(n, "/v2/_catalog", None).await;
    let body = String::from_utf8_lossy(&catalog.body);
    assert!(
        body.contains("team/app") && !body.contains("secret"),
        "{body}"
    );
}

/// Everything the node logs, at every level, from the moment this is first called (one
/// subscriber for the whole test process).
fn captured_log() -> std::sync::Arc<std::sync::Mutex<Vec<u8>>> {
    static LOG: std::sync::OnceLock<std::sync::Arc<std::sync::Mutex<Vec<u8>>>> =
        std::sync::OnceLock::new();
    LOG.get_or_init(|| {
        let buffer = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || Sink(sink.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("no other subscriber");
        buffer
    })
    .clone()
}

/// A writer into the captured log.
struct Sink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The node's log, at every level, holds none of the secrets clients log in with: an access
/// token, a user's password (right or wrong), a bearer token the node issued, nor their Basic
/// encodings.
#[tokio::test(flavor = "multi_thread")]
async fn no_token_or_password_reaches_the_log() {
    let log = captured_log();
    let fleet = Fleet::new();
    let net = node(&fleet).await;
    let n = &net.nodes[0];
    let access = fleet.token(&[("team/*", "pull,push,delete")], 600_000);
    let wrong = "staple battery 9f3c";
    let ana = basic("ana", "correct horse");
    let ci = basic("ci", &access);
    let img = image(72, &[16 << 10]);
    assert_eq!(push(n, "team/app", "1", &img, &ci).await.status, 201);
    assert_eq!(push(n, "team/web", "1", &img, &ana).await.status, 201);
    let login = get(
        n,
        "/token?service=shoal&scope=repository:team/app:pull,push",
        Some(&ci),
    )
    .await;
    assert_eq!(login.status, 200);
    let bearer = serde_json::from_slice::<serde_json::Value>(&login.body).unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let with_bearer = format!("Bearer {bearer}");
    assert_eq!(
        get(n, "/v2/team/app/tags/list", Some(&with_bearer))
            .await
            .status,
        200
    );
    assert_eq!(
        get(n, "/v2/team/app/tags/list", Some(&basic("ana", wrong)))
            .await
            .status,
        401
    );
    // A token with one character changed, and a bearer token cut short.
    let mut mutated = access.clone().into_bytes();
    if let Some(last) = mutated.last_mut() {
        *last = if *last == b'A' { b'B' } else { b'A' };
    }
    let mutated = String::from_utf8(mutated).unwrap();
    assert_eq!(
        get(n, "/v2/", Some(&basic("ci", &mutated))).await.status,
        401
    );
    let cut = &bearer[..bearer.len() - 4];
    assert_eq!(
        get(n, "/v2/", Some(&format!("Bearer {cut}"))).await.status,
        401
    );
    let r = http(
        n.http_addr(),
        "DELETE",
        "/v2/team/app/manifests/1",
        &[("Authorization", &ci)],
        b"",
    )
    .await;
    assert_eq!(r.status, 202);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let text = String::from_utf8_lossy(
        &log.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    )
    .into_owned();
    assert!(
        text.contains("registry listening"),
        "the node's log was not captured"
    );
    let tail = |s: &str| s[s.len().saturating_sub(24)..].to_owned();
    for (what, secret) in [
        ("the access token", access.clone()),
        ("the access token's signature", tail(&access)),
        ("the mutated token", tail(&mutated)),
        ("the password", "correct horse".to_owned()),
        ("the wrong password", wrong.to_owned()),
        ("the bearer token", bearer.clone()),
        ("the bearer token's signature", tail(&bearer)),
        ("the cut bearer token", tail(cut)),
        ("a Basic header", ana["Basic ".len()..].to_owned()),
        ("a Basic header", ci["Basic ".len()..].to_owned()),
    ] {
        assert!(!text.contains(&secret), "{what} is in the log");
    }
}
