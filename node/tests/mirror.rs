//! Pull-through from an upstream registry: a stand-in upstream (Debian's docker-registry) on
//! loopback, real nodes in one process.

mod testnet;

use std::time::Duration;

use shoal_node::config::MirrorConfig;
use shoal_node::mirror::upstream::UpstreamConfig;
use shoal_protocol::Digest;
use testnet::standin::StandIn;
use testnet::{Image, TestNet, TestNode, image};

/// The name nodes know the stand-in by (as clients would say `docker.io`).
const UPSTREAM: &str = "upstream.test";

fn upstream(standin: &StandIn, freshness_secs: u64) -> UpstreamConfig {
    toml::from_str(&format!(
        "name = \"{UPSTREAM}\"\nurl = \"{}\"\ninsecure = true\nfreshness_secs = {freshness_secs}\ntimeout_ms = 1000\n",
        standin.url()
    ))
    .expect("an upstream table")
}

fn mirror_of(standin: &StandIn, freshness_secs: u64, default: bool) -> MirrorConfig {
    MirrorConfig {
        upstreams: vec![upstream(standin, freshness_secs)],
        default: default.then(|| UPSTREAM.to_owned()),
    }
}

/// Pulls `path_repo:tag` (with `query`, e.g. `?ns=…`) from `node` and checks every byte
/// against `image`.
async fn pull(node: &TestNode, path_repo: &str, tag: &str, query: &str, image: &Image) {
    let r = node
        .get(&format!("/v2/{path_repo}/manifests/{tag}{query}"))
        .await;
    assert_eq!(
        r.status,
        200,
        "manifest: {}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.body, image.manifest);
    for b in &image.blobs {
        let d = Digest::sha256(b);
        let r = node.get(&format!("/v2/{path_repo}/blobs/{d}{query}")).await;
        assert_eq!(
            r.status,
            200,
            "blob {d}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(Digest::sha256(&r.body), d, "blob {d} bytes");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pull_through_goes_upstream_once_and_every_way_of_naming_it_finds_it() {
    let test = "a_pull_through_goes_upstream_once_and_every_way_of_naming_it_finds_it";
    let Some(standin) = StandIn::start(test, None).await else {
        return;
    };
    let img = image(1, &[300_000, 5_000]);
    standin.push("team/app", "1", &img).await;

    let mut net = TestNet::with_identities(1);
    net.mirror = mirror_of(&standin, 300, true);
    net.start_next().await;
    let node = &net.nodes[0];

    // containerd's form: the upstream in `ns`.
    pull(node, "team/app", "1", &format!("?ns={UPSTREAM}"), &img).await;
    // The explicit name under the upstream's namespace, as docker is told for other upstreams.
    pull(node, &format!("{UPSTREAM}/team/app"), "1", "", &img).await;
    // docker's registry-mirrors form: no `ns`, the default upstream.
    pull(node, "team/app", "1", "", &img).await;
    for b in &img.blobs {
        assert_eq!(
            standin.blob_gets("team/app", &Digest::sha256(b)),
            1,
            "the upstream served a blob more than once"
        );
    }
    // The tag was resolved once: the fleet's record is fresh.
    assert_eq!(standin.served("GET", "/v2/team/app/manifests/1"), 1);
    assert!(node.has_record(&format!("{UPSTREAM}/team/app"), "1").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_without_the_upstream_pulls_a_mirrored_image_from_the_fleet() {
    let test = "a_node_without_the_upstream_pulls_a_mirrored_image_from_the_fleet";
    let Some(standin) = StandIn::start(test, None).await else {
        return;
    };
    let img = image(2, &[400_000]);
    standin.push("team/app", "2", &img).await;
    let mut net = TestNet::with_identities(2);
    net.mirror = mirror_of(&standin, 300, false);
    net.start_next().await;
    net.mirror = MirrorConfig::default();
    net.start_next().await;
    net.wait_connected(1).await;

    let repo = format!("{UPSTREAM}/team/app");
    pull(&net.nodes[0], &repo, "2", "", &img).await;
    // Node 1 knows no upstream: the record node 0 signed, and its blobs, come from the fleet.
    testnet::wait_until(
        Duration::from_secs(20),
        "the mirror's record with its blobs arrives",
        || {
            let n = &net.nodes[1];
            let repo = repo.clone();
            async move { n.has_record(&repo, "2").await.then_some(()) }
        },
    )
    .await;
    testnet::wait_until(Duration::from_secs(20), "node 1 pulls the image", || {
        let (n, repo, img) = (&net.nodes[1], repo.clone(), &img);
        async move {
            let r = n.get(&format!("/v2/{repo}/manifests/2")).await;
            (r.status == 200).then_some(())?;
            for b in &img.blobs {
                let r = n
                    .get(&format!("/v2/{repo}/blobs/{}", Digest::sha256(b)))
                    .await;
                (r.status == 200 && r.body == *b).then_some(())?;
            }
            Some(())
        }
    })
    .await;
    for b in &img.blobs {
        assert_eq!(standin.blob_gets("team/app", &Digest::sha256(b)), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_upstream_down_a_resolved_tag_still_pulls_and_a_new_one_fails_clearly() {
    let test = "with_the_upstream_down_a_resolved_tag_still_pulls_and_a_new_one_fails_clearly";
    let Some(mut standin) = StandIn::start(test, None).await else {
        return;
    };
    let img = image(3, &[200_000]);
    standin.push("team/app", "3", &img).await;
    let mut net = TestNet::with_identities(1);
    // Freshness 0: every pull asks the upstream first.
    net.mirror = mirror_of(&standin, 0, false);
    net.start_next().await;
    let node = &net.nodes[0];
    let repo = format!("{UPSTREAM}/team/app");
    pull(node, &repo, "3", "", &img).await;

    standin.stop();
    let started = std::time::Instant::now();
    pull(node, &repo, "3", "", &img).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "an offline pull waited {:?}",
        started.elapsed()
    );
    let r = node.get(&format!("/v2/{repo}/manifests/never-seen")).await;
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    let text = String::from_utf8_lossy(&r.body);
    assert!(
        text.contains("UNAVAILABLE") && text.contains(UPSTREAM),
        "{text}"
    );
    assert!(text.contains("never resolved"), "{text}");

    // Back up: a tag the upstream does not have is unknown, not unavailable.
    standin.resume().await;
    let r = node.get(&format!("/v2/{repo}/manifests/missing")).await;
    assert_eq!(r.status, 404, "{}", String::from_utf8_lossy(&r.body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn credentials_reach_the_upstream_and_stay_out_of_every_data_directory() {
    let test = "credentials_reach_the_upstream_and_stay_out_of_every_data_directory";
    let secret = "s3cret-pa55-for-the-upstream";
    let Some(standin) = StandIn::start(test, Some(("mirror", secret))).await else {
        return;
    };
    let img = image(4, &[100_000]);
    standin.push("team/app", "4", &img).await;
    let mut with_creds = upstream(&standin, 300);
    with_creds.username = Some("mirror".into());
    with_creds.password = Some(
        toml::from_str::<toml::Value>(&format!("p = \"{secret}\""))
            .ok()
            .and_then(|v| v.get("p").cloned())
            .and_then(|p| p.try_into().ok())
            .expect("a secret"),
    );
    let mut net = TestNet::with_identities(2);
    net.mirror = MirrorConfig {
        upstreams: vec![with_creds],
        default: None,
    };
    net.start_next().await;
    net.mirror = MirrorConfig::default();
    net.start_next().await;
    net.wait_connected(1).await;
    let repo = format!("{UPSTREAM}/team/app");
    pull(&net.nodes[0], &repo, "4", "", &img).await;
    testnet::wait_until(Duration::from_secs(20), "node 1 has the record", || {
        let (n, repo) = (&net.nodes[1], repo.clone());
        async move { n.has_record(&repo, "4").await.then_some(()) }
    })
    .await;
    // Without credentials the stand-in refuses: node 0 used them.
    let r = testnet::http(standin.addr, "GET", "/v2/team/app/manifests/4", &[], b"").await;
    assert_eq!(r.status, 401);
    for n in &net.nodes {
        assert!(
            !contains_anywhere(n.dir.path(), secret.as_bytes()),
            "a node's data directory holds the upstream's password"
        );
    }
}

/// Asks `mirror` through `asker`'s network to fetch a blob from its upstream (`ask`, a
/// [`SyncRequest::Mirror`](shoal_protocol::message::SyncRequest::Mirror)) until it answers
/// that it holds it.
async fn wait_mirrored(
    asker: &shoal_node::net::Network,
    mirror: libp2p::PeerId,
    ask: shoal_protocol::message::SyncRequest,
    what: &str,
) {
    use shoal_protocol::message::{MirrorState, SyncResponse};
    testnet::wait_until(Duration::from_secs(30), what, || {
        let ask = ask.clone();
        async move {
            let answer = asker.sync(mirror, ask).await.ok()?;
            (answer == SyncResponse::Mirror(MirrorState::Done)).then_some(())
        }
    })
    .await;
}

/// Whether any file under `dir` contains `needle`.
fn contains_anywhere(dir: &std::path::Path, needle: &[u8]) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        let p = e.path();
        if p.is_dir() {
            contains_anywhere(&p, needle)
        } else {
            std::fs::read(&p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle))
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_pulling_at_once_get_each_blob_from_the_upstream_once() {
    let test = "three_nodes_pulling_at_once_get_each_blob_from_the_upstream_once";
    let Some(standin) = StandIn::start(test, None).await else {
        return;
    };
    let img = image(5, &[2_000_000, 1_500_000, 700_000]);
    standin.push("team/app", "5", &img).await;
    let mut net = TestNet::with_identities(3);
    net.mirror = mirror_of(&standin, 300, false);
    for _ in 0..3 {
        net.start_next().await;
    }
    net.wait_connected(2).await;
    let repo = format!("{UPSTREAM}/team/app");
    let pulls = net.nodes.iter().map(|n| pull(n, &repo, "5", "", &img));
    futures::future::join_all(pulls).await;
    for b in &img.blobs {
        let d = Digest::sha256(b);
        assert_eq!(
            standin.blob_gets("team/app", &d),
            1,
            "the upstream served {d} more than once to a fleet of three"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_cannot_make_a_node_fetch_from_an_upstream_it_does_not_mirror() {
    use shoal_protocol::message::{MirrorState, SyncRequest, SyncResponse};
    let test = "a_peer_cannot_make_a_node_fetch_from_an_upstream_it_does_not_mirror";
    let Some(standin) = StandIn::start(test, None).await else {
        return;
    };
    let img = image(6, &[50_000]);
    standin.push("team/app", "6", &img).await;
    let mut net = TestNet::with_identities(2);
    net.mirror = mirror_of(&standin, 300, false);
    net.start_next().await;
    net.mirror = MirrorConfig::default();
    net.start_next().await;
    net.wait_connected(1).await;
    let asker = net.nodes[1].node().network();
    let mirror_peer = net.nodes[0].node().network().peer_id();
    let digest = Digest::sha256(&img.blobs[0]);
    let ask = |upstream: &str, repo: &str| SyncRequest::Mirror {
        upstream: upstream.into(),
        repo: repo.parse().expect("repo"),
        digest: digest.clone(),
    };
    // An upstream the node does not mirror, a repository outside the upstream's namespace,
    // and a name longer than any host: refused, and nothing is fetched.
    for request in [
        ask("other.test", "other.test/team/app"),
        ask(UPSTREAM, "team/app"),
        ask(UPSTREAM, "other.test/team/app"),
        ask(&"x".repeat(300), &format!("{UPSTREAM}/team/app")),
    ] {
        let answer = asker.sync(mirror_peer, request).await.expect("an answer");
        assert_eq!(answer, SyncResponse::Mirror(MirrorState::Unsupported));
    }
    // A node without a mirror says so too.
    let answer = net.nodes[0]
        .node()
        .network()
        .sync(
            asker.peer_id(),
            ask(UPSTREAM, &format!("{UPSTREAM}/team/app")),
        )
        .await
        .expect("an answer");
    assert_eq!(answer, SyncResponse::Mirror(MirrorState::Unsupported));
    assert_eq!(standin.blob_gets("team/app", &digest), 0);
    // The one request that names what the node mirrors is served.
    let good = ask(UPSTREAM, &format!("{UPSTREAM}/team/app"));
    wait_mirrored(asker, mirror_peer, good, "the mirror fetches the blob").await;
    assert_eq!(standin.blob_gets("team/app", &digest), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_the_platform_asked_for_comes_from_the_upstream() {
    let test = "only_the_platform_asked_for_comes_from_the_upstream";
    let Some(standin) = StandIn::start(test, None).await else {
        return;
    };
    let (amd64, arm64) = (image(7, &[150_000]), image(8, &[160_000]));
    // Both platforms' blobs and manifests by digest, then an index naming both under the tag.
    standin.push("team/multi", "amd64", &amd64).await;
    standin.push("team/multi", "arm64", &arm64).await;
    let entry = |img: &Image, arch: &str| {
        serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": img.digest.to_string(),
            "size": img.manifest.len(),
            "platform": {"architecture": arch, "os": "linux"},
        })
    };
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [entry(&amd64, "amd64"), entry(&arm64, "arm64")],
    }))
    .expect("json");
    let r = testnet::http(
        standin.addr,
        "PUT",
        "/v2/team/multi/manifests/7",
        &[("Content-Type", "application/vnd.oci.image.index.v1+json")],
        &index,
    )
    .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));

    let mut net = TestNet::with_identities(1);
    net.mirror = mirror_of(&standin, 300, false);
    net.start_next().await;
    let node = &net.nodes[0];
    let repo = format!("{UPSTREAM}/team/multi");
    let r = node.get(&format!("/v2/{repo}/manifests/7")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, index);
    // The client picks amd64, as docker on an amd64 host does.
    let r = node
        .get(&format!("/v2/{repo}/manifests/{}", amd64.digest))
        .await;
    assert_eq!(r.status, 200);
    for b in &amd64.blobs {
        let d = Digest::sha256(b);
        let r = node.get(&format!("/v2/{repo}/blobs/{d}")).await;
        assert_eq!(r.status, 200);
    }
    assert_eq!(
        standin.served("GET", &format!("/v2/team/multi/manifests/{}", arm64.digest)),
        0,
        "the arm64 manifest came from the upstream"
    );
    for b in &arm64.blobs {
        assert_eq!(standin.blob_gets("team/multi", &Digest::sha256(b)), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_members_record_of_an_upstream_tag_is_checked_with_the_upstream_before_it_is_served() {
    let test =
        "a_members_record_of_an_upstream_tag_is_checked_with_the_upstream_before_it_is_served";
    let Some(mut standin) = StandIn::start(test, None).await else {
        return;
    };
    let real = image(8, &[120_000]);
    standin.push("team/app", "7", &real).await;
    let evil = image(9, &[90_000]);
    let mut net = TestNet::with_identities(3);
    net.mirror = mirror_of(&standin, 300, false);
    net.start_next().await;
    // Node 1 mirrors nothing: to it the namespace is a repository like any other, and its key
    // (stolen, say) signs a record there naming an image of its own.
    net.mirror = MirrorConfig::default();
    net.start_next().await;
    net.wait_connected(1).await;
    let repo = format!("{UPSTREAM}/team/app");
    net.nodes[1].push(&repo, "7", &evil).await;
    testnet::wait_until(
        Duration::from_secs(20),
        "the forged record reaches the mirror",
        || {
            let (n, repo) = (&net.nodes[0], repo.clone());
            async move { n.has_record(&repo, "7").await.then_some(()) }
        },
    )
    .await;

    // The mirror asks the upstream, whose answer wins, and its own record supersedes the
    // forged one in the fleet.
    pull(&net.nodes[0], &repo, "7", "", &real).await;
    assert_eq!(standin.served("GET", "/v2/team/app/manifests/7"), 1);
    let real_digest = real.digest.to_string();
    testnet::wait_until(
        Duration::from_secs(20),
        "the thief's node resolves the upstream's image",
        || {
            let (n, repo, want) = (&net.nodes[1], repo.clone(), real_digest.clone());
            async move { (n.tag_digest(&repo, "7").await? == want).then_some(()) }
        },
    )
    .await;
    // The mirror's own record is fresh and its own: no more asking.
    pull(&net.nodes[0], &repo, "7", "", &real).await;
    assert_eq!(standin.served("GET", "/v2/team/app/manifests/7"), 1);

    // Another mirror checks the first one's record once, then serves it while it is fresh.
    net.mirror = mirror_of(&standin, 300, false);
    net.start_next().await;
    net.wait_connected(2).await;
    testnet::wait_until(Duration::from_secs(20), "node 2 has the record", || {
        let (n, repo) = (&net.nodes[2], repo.clone());
        async move { n.has_record(&repo, "7").await.then_some(()) }
    })
    .await;
    pull(&net.nodes[2], &repo, "7", "", &real).await;
    assert_eq!(standin.served("GET", "/v2/team/app/manifests/7"), 2);
    pull(&net.nodes[2], &repo, "7", "", &real).await;
    assert_eq!(standin.served("GET", "/v2/team/app/manifests/7"), 2);

    // The thief signs again, and the upstream goes down: the mirror serves what the upstream
    // last told it, not the newer forged record.
    let evil2 = image(10, &[80_000]);
    net.nodes[1].push(&repo, "7", &evil2).await;
    let thief = net.nodes[1].identity.publisher();
    testnet::wait_until(
        Duration::from_secs(20),
        "the second forged record reaches the mirror",
        || {
            let (n, thief) = (&net.nodes[0], thief);
            let (r, t) = (repo.parse().unwrap(), "7".parse().unwrap());
            async move {
                let current = n
                    .node()
                    .store()
                    .read(move |i| i.record(&r, &t))
                    .await
                    .ok()??;
                (current.record().publisher == thief).then_some(())
            }
        },
    )
    .await;
    standin.stop();
    pull(&net.nodes[0], &repo, "7", "", &real).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_for_a_cold_tag_at_once_ask_the_upstream_once() {
    let test = "requests_for_a_cold_tag_at_once_ask_the_upstream_once";
    let Some(standin) = StandIn::start(test, None).await else {
        return;
    };
    let img = image(11, &[30_000]);
    standin.push("team/app", "11", &img).await;
    let mut net = TestNet::with_identities(1);
    net.mirror = mirror_of(&standin, 300, false);
    net.start_next().await;
    let node = &net.nodes[0];
    let path = format!("/v2/{UPSTREAM}/team/app/manifests/11");
    let gets = (0..6).map(|_| node.get(&path));
    for r in futures::future::join_all(gets).await {
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.body, img.manifest);
    }
    assert_eq!(standin.served("GET", "/v2/team/app/manifests/11"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_that_may_not_read_a_private_namespace_cannot_make_its_mirror_fetch() {
    use shoal_protocol::fleet::{Grant, PolicyBody, Principal, RepoSettings, Visibility};
    use shoal_protocol::message::{MirrorState, SyncRequest, SyncResponse};
    use testnet::admin::{Admin, apply};
    let test = "a_member_that_may_not_read_a_private_namespace_cannot_make_its_mirror_fetch";
    let Some(standin) = StandIn::start(test, None).await else {
        return;
    };
    let img = image(12, &[40_000]);
    standin.push("team/app", "12", &img).await;
    let admin = Admin::new(12);
    let mut net = TestNet::with_identities(2);
    net.trust_each_other = false;
    net.access.insert(0, admin.access(&["mirrors"]));
    net.access.insert(1, admin.access(&["guests"]));
    net.mirror = mirror_of(&standin, 300, false);
    net.start_next().await;
    net.mirror = MirrorConfig::default();
    net.start_next().await;
    net.wait_connected(1).await;
    let grant = |group: &str| PolicyBody::Grant {
        id: group.parse().unwrap(),
        grant: Some(Grant {
            principal: Principal::Group(group.parse().unwrap()),
            repos: format!("{UPSTREAM}/*").parse().unwrap(),
            actions: "pull,push".parse().unwrap(),
            expires_ms: None,
        }),
    };
    let private = PolicyBody::Repo {
        pattern: format!("{UPSTREAM}/*").parse().unwrap(),
        settings: Some(RepoSettings {
            visibility: Visibility::Private,
            ..RepoSettings::default()
        }),
    };
    apply(&net.nodes[0], admin.sign(private, 0)).await;
    apply(&net.nodes[0], admin.sign(grant("mirrors"), 0)).await;
    let repo: shoal_protocol::RepoName = format!("{UPSTREAM}/team/app").parse().unwrap();
    let mirror_auth = net.nodes[0].node().tags().auth();
    let guest = net.nodes[1].identity.publisher();
    assert!(!mirror_auth.peer_may_read(&guest, &repo));

    let asker = net.nodes[1].node().network();
    let mirror_peer = net.nodes[0].node().network().peer_id();
    let digest = Digest::sha256(&img.blobs[0]);
    let ask = SyncRequest::Mirror {
        upstream: UPSTREAM.into(),
        repo: repo.clone(),
        digest: digest.clone(),
    };
    let answer = asker
        .sync(mirror_peer, ask.clone())
        .await
        .expect("an answer");
    assert_eq!(answer, SyncResponse::Mirror(MirrorState::Unsupported));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(standin.blob_gets("team/app", &digest), 0);

    // Granted, the same member is served: the refusal was the private namespace's.
    apply(&net.nodes[0], admin.sign(grant("guests"), 0)).await;
    wait_mirrored(
        asker,
        mirror_peer,
        ask,
        "the granted member's ask is fetched",
    )
    .await;
    assert_eq!(standin.blob_gets("team/app", &digest), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn records_of_the_listed_publishers_of_a_namespace_are_served_without_asking() {
    use shoal_protocol::fleet::{PolicyBody, RepoSettings};
    use testnet::admin::{Admin, apply};
    let test = "records_of_the_listed_publishers_of_a_namespace_are_served_without_asking";
    let Some(mut standin) = StandIn::start(test, None).await else {
        return;
    };
    let img = image(13, &[60_000]);
    standin.push("team/app", "13", &img).await;
    let admin = Admin::new(13);
    let mut net = TestNet::with_identities(2);
    net.trust_each_other = false;
    net.access.insert(0, admin.access(&[]));
    net.access.insert(1, admin.access(&[]));
    net.mirror = mirror_of(&standin, 300, false);
    net.start_next().await;
    net.start_next().await;
    net.wait_connected(1).await;
    let repo = format!("{UPSTREAM}/team/app");
    let listed = PolicyBody::Repo {
        pattern: format!("{UPSTREAM}/*").parse().unwrap(),
        settings: Some(RepoSettings {
            publishers: vec![net.nodes[0].identity.publisher()],
            ..RepoSettings::default()
        }),
    };
    apply(&net.nodes[0], admin.sign(listed, 0)).await;
    let name: shoal_protocol::RepoName = repo.parse().unwrap();
    testnet::wait_until(Duration::from_secs(30), "the policy on node 1", || {
        let (auth, name) = (net.nodes[1].node().tags().auth(), name.clone());
        async move { (!auth.settings(&name).publishers.is_empty()).then_some(()) }
    })
    .await;

    pull(&net.nodes[0], &repo, "13", "", &img).await;
    testnet::wait_until(Duration::from_secs(20), "node 1 has the record", || {
        let (n, repo) = (&net.nodes[1], repo.clone());
        async move { n.has_record(&repo, "13").await.then_some(()) }
    })
    .await;
    // The listed publisher's record is served as it is: no second question to the upstream.
    pull(&net.nodes[1], &repo, "13", "", &img).await;
    assert_eq!(standin.served("GET", "/v2/team/app/manifests/13"), 1);
    // And with the upstream gone too.
    standin.stop();
    pull(&net.nodes[1], &repo, "13", "", &img).await;
}
