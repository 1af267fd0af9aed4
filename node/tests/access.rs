//! Access control across a fleet, with real nodes in one process: membership decides who talks
//! to whom, a private repository reaches only the nodes granted it (through every peer protocol:
//! gossip, sync, chunk streams, the DHT), a revoked grant stops working, and an immutable tag
//! cannot be moved from any node.

mod testnet;

use std::sync::atomic::Ordering;
use std::time::Duration;

use libp2p::PeerId;
use shoal_node::auth::ingest;
use shoal_node::config::AccessConfig;
use shoal_node::net::chunk::ChunkClient;
use shoal_protocol::fleet::{
    Grant, Policy, PolicyBody, RepoSettings, Signed, TagMutability, Visibility,
};
use shoal_protocol::message::{SyncRequest, SyncResponse};
use shoal_protocol::{Digest, SigningKey};
use testnet::admin::{Admin, apply};
use testnet::{TestNet, TestNode, image, wait_until};

const WAIT: Duration = Duration::from_secs(60);

/// Offers a policy to `node` as from a peer: what became of it.
async fn take(node: &TestNode, policy: shoal_protocol::fleet::SignedPolicy) -> ingest::Outcome {
    let n = node.node();
    ingest::policy(n.tags().auth(), n.store(), policy)
        .await
        .unwrap()
}

fn peer(node: &TestNode) -> PeerId {
    node.node().network().peer_id()
}

/// A grant of `actions` on `repos` to `node`, as the policy `id`.
fn node_grant(id: &str, node: &TestNode, repos: &str, actions: &str) -> PolicyBody {
    PolicyBody::Grant {
        id: id.parse().unwrap(),
        grant: Some(Grant {
            principal: shoal_protocol::fleet::Principal::Node(node.identity.publisher()),
            repos: repos.parse().unwrap(),
            actions: actions.parse().unwrap(),
            expires_ms: None,
        }),
    }
}

/// Waits until each of `nodes` holds at least `n` policies.
async fn wait_policies(nodes: &[&TestNode], n: usize) {
    for node in nodes {
        wait_until(WAIT, "the policies on every member", || async {
            (node.node().tags().auth().policies().len() >= n).then_some(())
        })
        .await;
    }
}

/// A tag record for `secret/app:1` signed by `signer`, naming `target` (a delete with `None`),
/// `ahead_ms` later than now.
fn record_by(
    signer: &TestNode,
    target: Option<shoal_protocol::TagTarget>,
    ahead_ms: u64,
) -> shoal_protocol::SignedTagRecord {
    let record = shoal_protocol::TagRecord {
        repo: "secret/app".parse().unwrap(),
        tag: "1".parse().unwrap(),
        target,
        timestamp_ms: Admin::now() + ahead_ms,
        sequence: 0,
        publisher: signer.identity.publisher(),
    };
    shoal_protocol::SignedTagRecord::sign(&record, &signer.identity.signing_key()).unwrap()
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

async fn fleet_net(admin: &Admin, n: usize) -> TestNet {
    let mut net = TestNet::with_identities(n);
    net.trust_each_other = false;
    net.sync_interval = Duration::from_secs(1);
    for i in 0..n {
        net.access.insert(i, admin.access(&[]));
    }
    for _ in 0..n {
        net.start_next().await;
    }
    net.wait_connected(n - 1).await;
    net
}

#[derive(libp2p::swarm::NetworkBehaviour)]
#[behaviour(prelude = "libp2p::swarm::derive_prelude")]
struct EavesdropperBehaviour {
    gossipsub: libp2p::gossipsub::Behaviour,
    sync: libp2p::request_response::Behaviour<shoal_node::net::framing::SyncCodec>,
}

/// A stranger connects to a fleet's node and subscribes to its records' topic but never answers
/// `Hello` (so the node waits out its whole `Hello` timeout before cutting it off), while the
/// node gossips a record every few hundred milliseconds: the stranger hears none of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_that_has_not_proved_membership_hears_no_gossip() {
    use futures::StreamExt;
    use libp2p::gossipsub;
    use libp2p::swarm::SwarmEvent;
    let admin = Admin::new(7);
    let net = fleet_net(&admin, 1).await;
    let node = &net.nodes[0];
    let mut swarm = testnet::memory_swarm(
        |key| EavesdropperBehaviour {
            gossipsub: gossipsub::Behaviour::new(
                gossipsub::MessageAuthenticity::Signed(key.clone()),
                gossipsub::Config::default(),
            )
            .unwrap(),
            sync: libp2p::request_response::Behaviour::with_codec(
                shoal_node::net::framing::SyncCodec,
                [(
                    libp2p::StreamProtocol::new(shoal_protocol::message::SYNC_PROTOCOL),
                    libp2p::request_response::ProtocolSupport::Full,
                )],
                libp2p::request_response::Config::default()
                    .with_request_timeout(Duration::from_secs(60)),
            ),
        },
        Duration::from_secs(60),
    );
    swarm
        .behaviour_mut()
        .gossipsub
        .subscribe(&gossipsub::IdentTopic::new(
            shoal_protocol::message::TAGS_TOPIC,
        ))
        .unwrap();
    swarm.dial(node.memory.clone()).unwrap();
    // The node's pushes, gossiped, while the stranger listens.
    let pushes = async {
        for i in 0..12u64 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            node.push("team/app", &format!("t{i}"), &image(40 + i, &[1 << 10]))
                .await;
        }
    };
    let listen = async {
        let (mut heard, mut connected, mut hellos) = (0, false, Vec::new());
        let deadline = tokio::time::sleep(Duration::from_secs(5));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                () = &mut deadline => return (heard, connected),
                event = swarm.select_next_some() => match event {
                    SwarmEvent::ConnectionEstablished { .. } => connected = true,
                    SwarmEvent::Behaviour(EavesdropperBehaviourEvent::Gossipsub(
                        gossipsub::Event::Message { .. },
                    )) => heard += 1,
                    // Hello goes unanswered: the channel is kept, so nothing is sent back.
                    SwarmEvent::Behaviour(EavesdropperBehaviourEvent::Sync(
                        libp2p::request_response::Event::Message {
                            message: libp2p::request_response::Message::Request { channel, .. },
                            ..
                        },
                    )) => hellos.push(channel),
                    _ => {}
                },
            }
        }
    };
    let ((heard, connected), ()) = tokio::join!(listen, pushes);
    assert!(connected, "the stranger never connected");
    assert_eq!(
        heard, 0,
        "a peer that never proved membership heard {heard} records"
    );
}

/// The audit trail says who changed what: a tag pushed, a manifest deleted, and a policy,
/// on the node where it was signed and on a member that took it from gossip, under the signing
/// admin's key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_audit_trail_names_pushes_deletes_and_policies_from_peers() {
    use shoal_node::auth::audit::{Event, read};
    let admin = Admin::new(6);
    let net = fleet_net(&admin, 2).await;
    let (owner, member) = (&net.nodes[0], &net.nodes[1]);
    let img = image(36, &[64 << 10]);
    owner.push("team/audit", "1", &img).await;
    let digest = Digest::sha256(&img.manifest);
    let r = testnet::http(
        owner.http_addr(),
        "DELETE",
        &format!("/v2/team/audit/manifests/{digest}"),
        &[],
        b"",
    )
    .await;
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    apply(owner, admin.sign(private("secret/*"), 0)).await;
    let admin_principal = format!("admin:{}", admin.key.public());
    let has = |node: &TestNode, action: Event, principal: Option<String>| {
        let dir = node.dir.path().to_path_buf();
        async move {
            read(&dir).ok()?.into_iter().find(|e| {
                e.action == action && principal.as_ref().is_none_or(|p| &e.principal == p)
            })
        }
    };
    for action in [Event::TagMove, Event::Delete] {
        let entry = wait_until(WAIT, "the owner's entry", || has(owner, action, None)).await;
        assert_eq!(entry.repository.as_deref(), Some("team/audit"), "{entry:?}");
    }
    for node in [owner, member] {
        let entry = wait_until(WAIT, "the policy in the trail", || {
            has(node, Event::PolicyChange, Some(admin_principal.clone()))
        })
        .await;
        assert!(
            entry
                .reference
                .as_deref()
                .unwrap_or_default()
                .contains("secret/*"),
            "{entry:?}"
        );
    }
}

/// A member who may publish to a public repository signs a record there naming a private
/// layer's digest: the node holding the layer still serves it to no one without a grant (no
/// have, no blob index, no chunk), since only a repository that holds a blob lends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_record_naming_a_private_blob_from_a_public_repository_does_not_unlock_it() {
    let admin = Admin::new(5);
    let net = fleet_net(&admin, 2).await;
    let (owner, member) = (&net.nodes[0], &net.nodes[1]);
    apply(owner, admin.sign(private("secret/*"), 0)).await;
    apply(
        owner,
        admin.sign(node_grant("owner", owner, "secret/*", "push"), 0),
    )
    .await;
    let repo: shoal_protocol::RepoName = "secret/app".parse().unwrap();
    let member_auth = member.node().tags().auth().clone();
    wait_until(WAIT, "the policy on the member", || async {
        (member_auth.settings(&repo).visibility == Visibility::Private).then_some(())
    })
    .await;
    let img = image(35, &[256 << 10]);
    let layer = Digest::sha256(&img.blobs[1]);
    owner.push("secret/app", "1", &img).await;
    let index = owner
        .node()
        .store()
        .blob_index(&layer)
        .await
        .unwrap()
        .expect("the layer's index");

    // The member's record in a public repository, naming the layer it has only the digest of.
    let record = shoal_protocol::TagRecord {
        repo: "pub/app".parse().unwrap(),
        tag: "1".parse().unwrap(),
        target: Some(shoal_protocol::TagTarget {
            manifest: layer.clone(),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            size: index.size(),
            blobs: vec![shoal_protocol::BlobRef {
                digest: layer.clone(),
                size: index.size(),
                index: index.id(),
            }],
        }),
        timestamp_ms: Admin::now(),
        sequence: 0,
        publisher: member.identity.publisher(),
    };
    let signed =
        shoal_protocol::SignedTagRecord::sign(&record, &member.identity.signing_key()).unwrap();
    assert_eq!(
        owner.node().tags().ingest(signed).await.unwrap(),
        shoal_node::tags::Ingest::Accepted,
        "a member's record in a public repository counts"
    );

    let (source, net2) = (peer(owner), member.node().network());
    assert_eq!(
        net2.sync(
            source,
            SyncRequest::Have {
                digest: layer.clone()
            }
        )
        .await
        .unwrap(),
        SyncResponse::Have(None)
    );
    assert_eq!(
        net2.sync(
            source,
            SyncRequest::BlobIndex {
                digest: layer.clone()
            }
        )
        .await
        .unwrap(),
        SyncResponse::BlobIndex(None)
    );
    assert_eq!(
        net2.sync(
            source,
            SyncRequest::ChunkHashes {
                digest: layer.clone(),
                from: 0,
            }
        )
        .await
        .unwrap(),
        SyncResponse::ChunkHashes(None)
    );
    let mut client = ChunkClient::open(&mut net2.control(), source)
        .await
        .unwrap();
    let mut buf = Vec::new();
    assert!(!client.fetch(&layer, 0, 1024, &mut buf).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn members_trust_each_others_pushes_and_a_node_of_another_fleet_is_cut_off() {
    let (ours, theirs) = (Admin::new(1), Admin::new(2));
    let mut net = TestNet::with_identities(4);
    net.trust_each_other = false;
    net.sync_interval = Duration::from_secs(1);
    for i in 0..3 {
        net.access.insert(i, ours.access(&[]));
    }
    net.access.insert(3, theirs.access(&[]));
    for _ in 0..3 {
        net.start_next().await;
    }
    net.wait_connected(2).await;
    // No trust rule anywhere: membership alone makes node 0's push count on the others.
    let img = image(31, &[2 << 20]);
    net.nodes[0].push("team/app", "1", &img).await;
    for i in 1..3 {
        let node = &net.nodes[i];
        wait_until(WAIT, "the record on a member", || async {
            node.has_record("team/app", "1").await.then_some(())
        })
        .await;
    }
    net.nodes[2].pull_and_check("team/app", "1", &img).await;

    // A node of another fleet dials all three: each of them hangs up on it.
    net.start_next().await;
    let stranger = net.nodes[3].node();
    let members: Vec<PeerId> = (0..3).map(|i| peer(&net.nodes[i])).collect();
    wait_until(
        WAIT,
        "the stranger to be cut off by every member",
        || async {
            let peers = stranger.network().peers().await.ok()?;
            peers
                .iter()
                .all(|p| !members.contains(&p.peer_id))
                .then_some(())
        },
    )
    .await;
    // Its own push stays its own, and it learned nothing of ours.
    let theirs_img = image(32, &[1 << 20]);
    net.nodes[3].push("team/other", "1", &theirs_img).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!net.nodes[3].has_record("team/app", "1").await);
    for i in 0..3 {
        assert!(!net.nodes[i].has_record("team/other", "1").await);
    }
    // Asked directly, a member answers a stranger nothing.
    let answer = stranger
        .network()
        .sync(
            members[0],
            SyncRequest::Records {
                after: None,
                limit: 100,
            },
        )
        .await;
    assert!(
        !matches!(answer, Ok(SyncResponse::Records { ref records, .. }) if !records.is_empty()),
        "{answer:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_private_repository_reaches_only_the_granted_node_and_a_revoked_grant_stops() {
    let admin = Admin::new(3);
    let net = fleet_net(&admin, 3).await;
    let (owner, granted, other) = (&net.nodes[0], &net.nodes[1], &net.nodes[2]);
    let grant = |on: bool| PolicyBody::Grant {
        id: "n1".parse().unwrap(),
        grant: on.then(|| Grant {
            principal: shoal_protocol::fleet::Principal::Node(granted.identity.publisher()),
            repos: "secret/*".parse().unwrap(),
            actions: "pull".parse().unwrap(),
            expires_ms: None,
        }),
    };
    apply(owner, admin.sign(private("secret/*"), 0)).await;
    apply(owner, admin.sign(grant(true), 0)).await;
    // The owner takes the pushes: the fleet counts its records with a push grant.
    apply(
        owner,
        admin.sign(node_grant("owner", owner, "secret/*", "push"), 0),
    )
    .await;
    let repo: shoal_protocol::RepoName = "secret/app".parse().unwrap();
    wait_policies(&[granted, other], 3).await;

    let img = image(33, &[3 << 20]);
    let layer = Digest::sha256(&img.blobs[1]);
    owner.push("secret/app", "1", &img).await;
    wait_until(WAIT, "the record on the granted node", || async {
        granted.has_record("secret/app", "1").await.then_some(())
    })
    .await;
    granted.pull_and_check("secret/app", "1", &img).await;

    // The other node learns nothing, over several sync rounds.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        !other.has_record("secret/app", "1").await,
        "a record reached the other node"
    );
    let catalog = other.get("/v2/_catalog").await;
    assert!(!String::from_utf8_lossy(&catalog.body).contains("secret"));
    let (from_owner, from_granted) = (peer(owner), peer(granted));
    let net2 = other.node().network();
    for source in [from_owner, from_granted] {
        // Sync: no record of the repository in any page.
        let page = net2
            .sync(
                source,
                SyncRequest::Records {
                    after: None,
                    limit: 512,
                },
            )
            .await
            .unwrap();
        let SyncResponse::Records { records, .. } = page else {
            panic!("not a page: {page:?}");
        };
        assert!(
            records
                .iter()
                .all(|r| r.verify().unwrap().record().repo.as_str() != "secret/app")
        );
        // Blob index, haves, chunks: as if the blob did not exist.
        assert_eq!(
            net2.sync(
                source,
                SyncRequest::BlobIndex {
                    digest: layer.clone()
                }
            )
            .await
            .unwrap(),
            SyncResponse::BlobIndex(None)
        );
        assert_eq!(
            net2.sync(
                source,
                SyncRequest::Have {
                    digest: layer.clone()
                }
            )
            .await
            .unwrap(),
            SyncResponse::Have(None)
        );
        assert_eq!(
            net2.sync(
                source,
                SyncRequest::ChunkHashes {
                    digest: layer.clone(),
                    from: 0,
                }
            )
            .await
            .unwrap(),
            SyncResponse::ChunkHashes(None)
        );
        let mut client = ChunkClient::open(&mut net2.control(), source)
            .await
            .unwrap();
        let mut buf = Vec::new();
        assert!(!client.fetch(&layer, 0, 1024, &mut buf).await.unwrap());
        let manifest = Digest::sha256(&img.manifest);
        let mut client = ChunkClient::open(&mut net2.control(), source)
            .await
            .unwrap();
        assert!(
            !client
                .fetch(&manifest, 0, img.manifest.len() as u64, &mut buf)
                .await
                .unwrap()
        );
    }
    // The DHT was never told of the private blob.
    assert!(net2.find_providers(layer.clone()).await.unwrap().is_empty());

    // Withdrawn, the grant stops working: a new push does not reach the node, nor its bytes.
    apply(owner, admin.sign(grant(false), 1)).await;
    let owner_auth = owner.node().tags().auth().clone();
    let granted_key = granted.identity.publisher();
    wait_until(WAIT, "the grant withdrawn", || async {
        (!owner_auth.peer_may_read(&granted_key, &repo)).then_some(())
    })
    .await;
    let img2 = image(34, &[1 << 20]);
    let layer2 = Digest::sha256(&img2.blobs[1]);
    owner.push("secret/app", "2", &img2).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(!granted.has_record("secret/app", "2").await);
    let mut client = ChunkClient::open(&mut granted.node().network().control(), from_owner)
        .await
        .unwrap();
    let mut buf = Vec::new();
    assert!(!client.fetch(&layer2, 0, 1024, &mut buf).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_immutable_tag_cannot_be_moved_from_any_node() {
    let admin = Admin::new(4);
    let net = fleet_net(&admin, 3).await;
    let immutable = PolicyBody::Repo {
        pattern: "prod/*".parse().unwrap(),
        settings: Some(RepoSettings {
            tags: TagMutability::Immutable(vec!["latest".parse().unwrap()]),
            ..RepoSettings::default()
        }),
    };
    apply(&net.nodes[0], admin.sign(immutable, 0)).await;
    let repo: shoal_protocol::RepoName = "prod/app".parse().unwrap();
    let tag: shoal_protocol::Tag = "1".parse().unwrap();
    for node in &net.nodes {
        let (repo, tag) = (repo.clone(), tag.clone());
        wait_until(WAIT, "the rule on every member", || async {
            (!node.node().tags().auth().tag_is_mutable(&repo, &tag)).then_some(())
        })
        .await;
    }
    let (first, second) = (image(35, &[1 << 20]), image(36, &[1 << 20]));
    net.nodes[0].push("prod/app", "1", &first).await;
    for node in &net.nodes {
        wait_until(WAIT, "the first record everywhere", || async {
            node.has_record("prod/app", "1").await.then_some(())
        })
        .await;
    }
    // Through the registry of another node: refused as the spec says, with a clear message.
    for b in &second.blobs {
        let d = Digest::sha256(b);
        let r = testnet::http(
            net.nodes[1].http_addr(),
            "POST",
            &format!("/v2/prod/app/blobs/uploads/?digest={d}"),
            &[],
            b,
        )
        .await;
        assert_eq!(r.status, 201);
    }
    let r = testnet::http(
        net.nodes[1].http_addr(),
        "PUT",
        "/v2/prod/app/manifests/1",
        &[("Content-Type", "application/vnd.oci.image.manifest.v1+json")],
        &second.manifest,
    )
    .await;
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    let body = String::from_utf8_lossy(&r.body);
    assert!(
        body.contains("TAG_INVALID") && body.contains("immutable"),
        "{body}"
    );
    // A record signed by a member that would move the tag is refused wherever it arrives.
    let mover = shoal_protocol::TagRecord {
        repo: repo.clone(),
        tag: tag.clone(),
        target: Some(
            net.nodes[1]
                .node()
                .tags()
                .target_for(
                    &repo,
                    &second.digest,
                    &shoal_node::manifest::parse(&second.manifest, None).unwrap(),
                )
                .await
                .unwrap(),
        ),
        timestamp_ms: Admin::now() + 1000,
        sequence: 0,
        publisher: net.nodes[1].identity.publisher(),
    };
    let signed =
        shoal_protocol::SignedTagRecord::sign(&mover, &net.nodes[1].identity.signing_key())
            .unwrap();
    for node in &net.nodes {
        let outcome = node.node().tags().ingest(signed.clone()).await.unwrap();
        assert_eq!(outcome, shoal_node::tags::Ingest::Immutable);
        assert_eq!(
            node.tag_digest("prod/app", "1").await.as_deref(),
            Some(first.digest.to_string().as_str())
        );
    }
    // The excluded tag still moves.
    net.nodes[0].push("prod/app", "latest", &first).await;
    net.nodes[1].push("prod/app", "latest", &second).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revoked_member_is_cut_off_and_its_records_stop_counting() {
    let admin = Admin::new(5);
    let net = fleet_net(&admin, 3).await;
    // Node 2's key was stolen: the admin revokes the node.
    let thief = &net.nodes[2];
    let revoke = PolicyBody::Revoke(shoal_protocol::fleet::Revoked::Node(
        thief.identity.publisher(),
    ));
    apply(&net.nodes[0], admin.sign(revoke, 0)).await;
    let thief_id = peer(thief);
    for i in 0..2 {
        let node = net.nodes[i].node();
        wait_until(WAIT, "the revoked node cut off", || async {
            let peers = node.network().peers().await.ok()?;
            peers.iter().all(|p| p.peer_id != thief_id).then_some(())
        })
        .await;
    }
    // Whatever it signs no longer counts, wherever it turns up.
    let record = shoal_protocol::TagRecord {
        repo: "team/app".parse().unwrap(),
        tag: "1".parse().unwrap(),
        target: None,
        timestamp_ms: Admin::now(),
        sequence: 0,
        publisher: thief.identity.publisher(),
    };
    let signed =
        shoal_protocol::SignedTagRecord::sign(&record, &thief.identity.signing_key()).unwrap();
    for i in 0..2 {
        let outcome = net.nodes[i]
            .node()
            .tags()
            .ingest(signed.clone())
            .await
            .unwrap();
        assert_eq!(outcome, shoal_node::tags::Ingest::Untrusted);
    }
}

/// In a private repository, a member's tag records count only with a grant of what they do:
/// a member that may only pull (or a thief of its node key) signs records that move and delete
/// a tag, and every other node refuses them; its registry refuses a push or a delete up front
/// with `403`, saying why, instead of acknowledging what the fleet would ignore. A member
/// granted push and delete moves and deletes the tag everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_private_repositorys_tags_move_only_by_members_granted_to() {
    let admin = Admin::new(8);
    let net = fleet_net(&admin, 3).await;
    let (owner, reader, writer) = (&net.nodes[0], &net.nodes[1], &net.nodes[2]);
    apply(owner, admin.sign(private("secret/*"), 0)).await;
    let all = "pull,push,delete";
    apply(
        owner,
        admin.sign(node_grant("o", owner, "secret/*", all), 0),
    )
    .await;
    apply(
        owner,
        admin.sign(node_grant("r", reader, "secret/*", "pull"), 0),
    )
    .await;
    apply(
        owner,
        admin.sign(node_grant("w", writer, "secret/*", all), 0),
    )
    .await;
    wait_policies(&[reader, writer], 4).await;
    let (first, second) = (image(50, &[64 << 10]), image(51, &[64 << 10]));
    owner.push("secret/app", "1", &first).await;
    owner.push("secret/app", "2", &second).await;
    for node in [reader, writer] {
        wait_until(WAIT, "the records on the granted nodes", || async {
            (node.has_record("secret/app", "1").await && node.has_record("secret/app", "2").await)
                .then_some(())
        })
        .await;
    }
    let repo: shoal_protocol::RepoName = "secret/app".parse().unwrap();
    let to_second = owner
        .node()
        .tags()
        .target_for(
            &repo,
            &second.digest,
            &shoal_node::manifest::parse(&second.manifest, None).unwrap(),
        )
        .await
        .unwrap();
    let names = |digest: &Digest| Some(digest.to_string());

    // The reader's move and delete, newer than the tag's record: refused wherever they arrive.
    for forged in [
        record_by(reader, Some(to_second.clone()), 500),
        record_by(reader, None, 600),
    ] {
        for node in [owner, writer] {
            let outcome = node.node().tags().ingest(forged.clone()).await.unwrap();
            assert_eq!(outcome, shoal_node::tags::Ingest::Untrusted);
            assert_eq!(
                node.tag_digest("secret/app", "1").await,
                names(&first.digest)
            );
        }
    }
    // Its registry says so up front: a push, and a delete.
    let upload = testnet::http(
        reader.http_addr(),
        "POST",
        "/v2/secret/app/blobs/uploads/",
        &[],
        b"",
    )
    .await;
    let put = testnet::http(
        reader.http_addr(),
        "PUT",
        "/v2/secret/app/manifests/1",
        &[("Content-Type", "application/vnd.oci.image.manifest.v1+json")],
        &second.manifest,
    )
    .await;
    let delete = testnet::http(
        reader.http_addr(),
        "DELETE",
        "/v2/secret/app/manifests/1",
        &[],
        b"",
    )
    .await;
    for (r, action) in [(upload, "push"), (put, "push"), (delete, "delete")] {
        let body = String::from_utf8_lossy(&r.body);
        assert_eq!(r.status, 403, "{body}");
        assert!(
            body.contains("DENIED") && body.contains(&format!("lacks a {action} grant")),
            "{body}"
        );
    }
    for node in [owner, reader, writer] {
        assert_eq!(
            node.tag_digest("secret/app", "1").await,
            names(&first.digest)
        );
    }
    // A public repository takes any member's push, as before.
    reader.push("team/app", "1", &first).await;

    // The writer's move, then its delete: accepted by the others.
    let moved = record_by(writer, Some(to_second), 1000);
    let deleted = record_by(writer, None, 2000);
    for node in [owner, reader] {
        let outcome = node.node().tags().ingest(moved.clone()).await.unwrap();
        assert_eq!(outcome, shoal_node::tags::Ingest::Accepted);
        assert_eq!(
            node.tag_digest("secret/app", "1").await,
            names(&second.digest)
        );
        let outcome = node.node().tags().ingest(deleted.clone()).await.unwrap();
        assert_eq!(outcome, shoal_node::tags::Ingest::Accepted);
        assert_eq!(node.tag_digest("secret/app", "1").await, None);
    }
}

/// An admin key the operator adds in a node's config (`admins`, `--admin`) counts on that node
/// only: its policy is in force there, and a member that does not list it refuses the policy
/// both handed to it and gossiped to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_policy_of_an_admin_from_the_config_counts_only_where_it_is_listed() {
    let admin = Admin::new(9);
    let extra = SigningKey::from_seed([77; 32]);
    let mut net = TestNet::with_identities(2);
    net.trust_each_other = false;
    net.sync_interval = Duration::from_secs(1);
    net.access.insert(
        0,
        AccessConfig {
            admins: vec![extra.public()],
            ..admin.access(&[])
        },
    );
    net.access.insert(1, admin.access(&[]));
    for _ in 0..2 {
        net.start_next().await;
    }
    net.wait_connected(1).await;
    let (listing, other) = (&net.nodes[0], &net.nodes[1]);
    let policy = Signed::sign(
        &Policy {
            fleet: admin.fleet,
            body: private("secret/*"),
            timestamp_ms: Admin::now(),
            sequence: 0,
            admin: extra.public(),
        },
        &extra,
    )
    .unwrap();
    let repo: shoal_protocol::RepoName = "secret/app".parse().unwrap();
    assert_eq!(
        take(listing, policy.clone()).await,
        ingest::Outcome::Accepted
    );
    assert_eq!(
        listing.node().tags().auth().settings(&repo).visibility,
        Visibility::Private
    );
    let _ = listing.node().network().publish_policy(&policy).await;
    assert_eq!(
        take(other, policy.clone()).await,
        ingest::Outcome::Refused(shoal_node::auth::Refused::NotAdmin)
    );
    // Over a few sync rounds and the gossip, the other member still refuses it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let auth = other.node().tags().auth();
    assert_eq!(auth.settings(&repo).visibility, Visibility::Public);
    assert!(auth.policies().is_empty());
    // The fleet's admin counts on both.
    apply(listing, admin.sign(private("team/*"), 0)).await;
    wait_policies(&[other], 1).await;
}

/// A node that was stopped while the admin changed the policies catches up through sync when
/// it comes back, and enforces them: it refuses a push into the repository made private, which
/// it holds no grant for.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_that_was_offline_catches_up_on_policies_through_sync() {
    let admin = Admin::new(10);
    let mut net = fleet_net(&admin, 2).await;
    net.nodes[1].stop().await;
    for body in [
        private("secret/*"),
        node_grant("o", &net.nodes[0], "secret/*", "push"),
    ] {
        let outcome = take(&net.nodes[0], admin.sign(body, 0)).await;
        assert_eq!(outcome, ingest::Outcome::Accepted);
    }
    net.restart(1).await;
    let back = &net.nodes[1];
    wait_policies(&[back], 2).await;
    let repo: shoal_protocol::RepoName = "secret/app".parse().unwrap();
    assert_eq!(
        back.node().tags().auth().settings(&repo).visibility,
        Visibility::Private
    );
    let r = testnet::http(
        back.http_addr(),
        "POST",
        "/v2/secret/app/blobs/uploads/",
        &[],
        b"",
    )
    .await;
    assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body));
    back.push("team/app", "1", &image(52, &[1 << 10])).await;
}

/// Trust rules change on a running node (`shoal trust add`, then the admin API's reload): a
/// publisher's records start counting without a restart, and stop counting (its tags fall
/// back) when the rule goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn trust_rules_change_on_a_running_node_without_a_restart() {
    let mut net = TestNet::with_identities(2);
    net.trust_each_other = false;
    net.sync_interval = Duration::from_secs(1);
    for _ in 0..2 {
        net.start_next().await;
    }
    net.wait_connected(1).await;
    let (publisher, node) = (&net.nodes[0], &net.nodes[1]);
    let img = image(53, &[64 << 10]);
    publisher.push("team/app", "1", &img).await;
    publisher.push("lib/x", "1", &img).await;
    wait_until(WAIT, "the records refused as untrusted", || async {
        let untrusted = node.node().tags().stats().untrusted.load(Ordering::Relaxed);
        (untrusted >= 2).then_some(())
    })
    .await;
    assert!(!node.has_record("team/app", "1").await);
    let reload = || async {
        let r = testnet::http(node.http_addr(), "POST", "/_shoal/v1/reload", &[], b"").await;
        assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    };
    let rule = format!("{}=team/*", publisher.identity.publisher());
    shoal_node::auth::trust::write_file(node.dir.path(), &[rule.parse().unwrap()]).unwrap();
    reload().await;
    wait_until(WAIT, "the trusted publisher's record", || async {
        node.has_record("team/app", "1").await.then_some(())
    })
    .await;
    node.pull_and_check("team/app", "1", &img).await;
    // Only for the rule's repositories.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!node.has_record("lib/x", "1").await);
    // The rule removed, the tag falls back to nothing.
    shoal_node::auth::trust::write_file(node.dir.path(), &[]).unwrap();
    reload().await;
    wait_until(WAIT, "the record to stop counting", || async {
        (!node.has_record("team/app", "1").await).then_some(())
    })
    .await;
}
