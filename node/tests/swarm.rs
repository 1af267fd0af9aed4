//! Swarm transfer in one process: many nodes fetch one multi-chunk blob at once and share the
//! chunks they hold, so the publisher serves far less than every copy; a peer serving corrupt
//! chunks is banned while the others finish; a peer killed mid-transfer stops no one; a
//! restarted node resumes its partial download; a seeder sends one copy of a chunk at a time; a
//! chunk stream the peer drops unanswered reads as a refusal, not a failure; a peer speaking
//! stock libp2p TLS, or only noise, is reached; nodes that meet over QUIC move to TCP and go on
//! gossiping and transferring; a manifest a record names is found even when its holder comes
//! back only after the client asked, and so is a layer; a blob a node fetches from an upstream
//! reaches a peer chunk by chunk as it grows, and each of its newest chunks leaves that node once.

mod testnet;

use std::time::Duration;

use shoal_protocol::Digest;
use shoal_protocol::message::{SyncRequest, SyncResponse};
use testnet::{TestNet, http, image, wait_until};

const WAIT: Duration = Duration::from_secs(60);
const MIB: usize = 1024 * 1024;

async fn served(net: &TestNet, i: usize) -> u64 {
    net.nodes[i].node().network().served_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn six_nodes_fetch_one_blob_at_once_and_share_chunks() {
    let mut net = TestNet::with_identities(7);
    // The publisher's uplink is the bottleneck, as in a real rollout.
    net.serve_limits.insert(0, 24 * MIB as u64);
    for _ in 0..7 {
        net.start_next().await;
    }
    net.wait_connected(6).await;
    let img = image(11, &[96 * MIB]);
    let layer = Digest::sha256(&img.blobs[1]);
    net.nodes[0].push("team/roll", "1", &img).await;
    for n in &net.nodes[1..] {
        wait_until(WAIT, "the record everywhere", || async {
            n.has_record("team/roll", "1").await.then_some(())
        })
        .await;
    }
    let path = format!("/v2/team/roll/blobs/{layer}");
    let pulls = net.nodes[1..].iter().map(|n| {
        let (path, layer) = (path.clone(), layer.clone());
        async move {
            let r = n.get(&path).await;
            assert_eq!(r.status, 200);
            assert_eq!(Digest::sha256(&r.body), layer, "wrong bytes");
        }
    });
    futures::future::join_all(pulls).await;
    let size = img.blobs[1].len() as u64;
    let publisher = served(&net, 0).await;
    let others: u64 = {
        let mut t = 0;
        for i in 1..7 {
            t += served(&net, i).await;
        }
        t
    };
    println!("publisher served {publisher} bytes, the others {others}, blob {size}");
    // Six copies were delivered; the publisher must have sent at most two and a half. Its upload
    // report (which chunks it is sending and sent) steers the downloaders to chunks it has not
    // sent yet: it sent 1.3 to 1.5 copies in trials on an idle machine and 1.5 to 1.9 with two
    // such tests sharing two cores; 2.3 to 2.6 with the report ignored on an idle machine.
    assert!(
        publisher <= 5 * size / 2,
        "publisher served {publisher} bytes for 6 copies of {size}"
    );
    assert!(others > 0, "no downloader served a chunk to another");
    for n in &net.nodes[1..] {
        // The last bytes reach the client as the blob is being fsynced and renamed into place.
        let blob = shoal_node::store::Layout::new(n.dir.path()).blob(&layer);
        wait_until(WAIT, "the blob stored", || async {
            blob.exists().then_some(())
        })
        .await;
    }
}

/// Four clients asking one node at once for a blob it does not hold share one download: every
/// one gets the whole blob, and the publisher sends it about once, not four times.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_gets_of_one_missing_blob_share_one_download() {
    let mut net = TestNet::with_identities(2);
    // Slow enough that the four requests arrive while the download is under way.
    net.serve_limits.insert(0, 8 * MIB as u64);
    net.start_next().await;
    net.start_next().await;
    net.wait_connected(1).await;
    let img = image(12, &[8 * MIB]);
    let layer = Digest::sha256(&img.blobs[1]);
    net.nodes[0].push("team/one", "1", &img).await;
    let b = &net.nodes[1];
    wait_until(WAIT, "the record on the puller", || async {
        b.has_record("team/one", "1").await.then_some(())
    })
    .await;
    let before = served(&net, 0).await;
    let path = format!("/v2/team/one/blobs/{layer}");
    let (r1, r2, r3, r4) = tokio::join!(b.get(&path), b.get(&path), b.get(&path), b.get(&path));
    for r in [r1, r2, r3, r4] {
        assert_eq!(r.status, 200);
        assert!(r.body == img.blobs[1], "a client got other bytes");
    }
    let sent = served(&net, 0).await - before;
    println!(
        "the publisher sent {sent} bytes for 4 clients of an {} byte blob",
        img.blobs[1].len()
    );
    assert!(
        sent < img.blobs[1].len() as u64 * 3 / 2,
        "the publisher sent {sent} bytes: more than one download"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_site_pulls_each_chunk_across_the_wan_about_once() {
    // Node 0 publishes in site "hq"; nodes 1 to 3 pull in site "shop". Every chunk should cross
    // from hq to the shop about once, the shop's nodes sharing them among themselves.
    let mut net = TestNet::with_identities(4);
    net.sites.insert(0, "hq".into());
    for i in 1..4 {
        net.sites.insert(i, "shop".into());
    }
    // A slow WAN, so that the shop's nodes hear of each other before the first chunks arrive.
    net.serve_limits.insert(0, 16 * MIB as u64);
    for _ in 0..4 {
        net.start_next().await;
    }
    net.wait_connected(3).await;
    let img = image(12, &[64 * MIB]);
    let layer = Digest::sha256(&img.blobs[1]);
    net.nodes[0].push("team/site", "1", &img).await;
    for n in &net.nodes[1..] {
        wait_until(WAIT, "the record everywhere", || async {
            n.has_record("team/site", "1").await.then_some(())
        })
        .await;
    }
    // The publisher announced on the DHT that it holds the whole blob: a node with a site looks
    // for such seeders right after its own site's peers.
    let id = |i: usize| net.nodes[i].node().network().peer_id();
    let seeders = |i: usize| {
        let (network, layer) = (net.nodes[i].node().network().clone(), layer.clone());
        async move { network.find_seeders(layer).await.unwrap_or_default() }
    };
    wait_until(WAIT, "the publisher found as a seeder", || async {
        seeders(3).await.contains(&id(0)).then_some(())
    })
    .await;
    let path = format!("/v2/team/site/blobs/{layer}");
    let pulls = net.nodes[1..].iter().map(|n| {
        let (path, layer) = (path.clone(), layer.clone());
        async move {
            let r = n.get(&path).await;
            assert_eq!(r.status, 200);
            assert_eq!(Digest::sha256(&r.body), layer, "wrong bytes");
        }
    });
    futures::future::join_all(pulls).await;
    let size = img.blobs[1].len() as u64;
    let wan = served(&net, 0).await;
    println!("hq served {wan} bytes for 3 copies of {size} in the shop");
    // Each puller announced itself as a seeder once its copy was whole.
    wait_until(WAIT, "every puller found as a seeder", || async {
        let found = seeders(0).await;
        (1..4).all(|i| found.contains(&id(i))).then_some(())
    })
    .await;
    // Before a node hears of its site's other downloaders it may take up to two chunks that
    // were not its share: at most 3 x 2 chunks over one copy.
    let chunk = u64::from(shoal_protocol::chunk_size_for(size));
    assert!(
        wan <= size + 6 * chunk,
        "the WAN carried {wan} bytes for a {size}-byte blob"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_serving_corrupt_chunks_is_banned_and_the_download_completes() {
    let mut net = TestNet::with_identities(3);
    net.serve_limits.insert(0, 8 * MIB as u64);
    for _ in 0..3 {
        net.start_next().await;
    }
    net.wait_connected(2).await;
    let img = image(12, &[24 * MIB]);
    let layer = Digest::sha256(&img.blobs[1]);
    net.nodes[0].push("team/evil", "1", &img).await;
    // Node 1 gets a full copy, then its copy is corrupted in every chunk (same length).
    let (evil, victim) = (&net.nodes[1], &net.nodes[2]);
    wait_until(WAIT, "record on 1", || async {
        evil.has_record("team/evil", "1").await.then_some(())
    })
    .await;
    evil.pull_and_check("team/evil", "1", &img).await;
    let path = shoal_node::store::Layout::new(evil.dir.path()).blob(&layer);
    // The pull's last bytes reach the client before the download's sha256 check installs the
    // blob file.
    wait_until(WAIT, "blob file on 1", || async {
        path.exists().then_some(())
    })
    .await;
    let mut bytes = std::fs::read(&path).unwrap();
    for i in (0..bytes.len()).step_by(4 * MIB) {
        bytes[i] ^= 0xff;
    }
    std::fs::write(&path, &bytes).unwrap();

    wait_until(WAIT, "record on 2", || async {
        victim.has_record("team/evil", "1").await.then_some(())
    })
    .await;
    victim.pull_and_check("team/evil", "1", &img).await;
    let status = victim.get("/_shoal/v1/status").await;
    let status: serde_json::Value = serde_json::from_slice(&status.body).unwrap();
    assert!(
        status["bad_peers"].as_u64().unwrap() >= 1,
        "the corrupt peer was not detected: {status}"
    );
    // The ban outlasts the connection: the liar is cut off, and dialled again (as mDNS or a
    // `--peer` would), it is refused.
    let (evil_id, network) = (evil.node().network().peer_id(), victim.node().network());
    wait_until(WAIT, "the liar cut off", || async {
        let peers = network.peers().await.ok()?;
        peers.iter().all(|p| p.peer_id != evil_id).then_some(())
    })
    .await;
    assert!(network.is_banned(&evil_id));
    for addr in evil.node().network().listen_addrs().await.unwrap() {
        let _ = network.dial(addr).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let peers = network.peers().await.unwrap();
    assert!(
        peers.iter().all(|p| p.peer_id != evil_id),
        "a banned peer got back in by dialling"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_killed_mid_transfer_does_not_stop_the_download() {
    let mut net = TestNet::with_identities(3);
    net.serve_limits.insert(0, 8 * MIB as u64);
    net.serve_limits.insert(1, 8 * MIB as u64);
    for _ in 0..3 {
        net.start_next().await;
    }
    net.wait_connected(2).await;
    let img = image(13, &[40 * MIB]);
    let layer = Digest::sha256(&img.blobs[1]);
    net.nodes[0].push("team/churn", "1", &img).await;
    let seeder = &net.nodes[1];
    wait_until(WAIT, "record on 1", || async {
        seeder.has_record("team/churn", "1").await.then_some(())
    })
    .await;
    seeder.pull_and_check("team/churn", "1", &img).await;
    wait_until(WAIT, "record on 2", || async {
        net.nodes[2]
            .has_record("team/churn", "1")
            .await
            .then_some(())
    })
    .await;
    let addr = net.nodes[2].http_addr();
    let path = format!("/v2/team/churn/blobs/{layer}");
    let pull = tokio::spawn(async move { testnet::http(addr, "GET", &path, &[], b"").await });
    // Stop the seeder once the download is under way.
    let store = net.nodes[2].node().store().clone();
    wait_until(WAIT, "the download to start", || async {
        let p = store.partial_in_progress(&layer)?;
        (p.progress().borrow().held >= 1).then_some(())
    })
    .await;
    net.nodes[1].stop().await;
    let r = pull.await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(Digest::sha256(&r.body), layer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_node_resumes_its_partial_download() {
    let mut net = TestNet::with_identities(2);
    net.serve_limits.insert(0, 6 * MIB as u64);
    for _ in 0..2 {
        net.start_next().await;
    }
    net.wait_connected(1).await;
    let img = image(14, &[32 * MIB]);
    let layer = Digest::sha256(&img.blobs[1]);
    let size = img.blobs[1].len() as u64;
    net.nodes[0].push("team/resume", "1", &img).await;
    wait_until(WAIT, "record on 1", || async {
        net.nodes[1]
            .has_record("team/resume", "1")
            .await
            .then_some(())
    })
    .await;
    let addr = net.nodes[1].http_addr();
    let path = format!("/v2/team/resume/blobs/{layer}");
    let first = tokio::spawn(async move { testnet::http(addr, "GET", &path, &[], b"").await });
    let store = net.nodes[1].node().store().clone();
    let held_before = wait_until(WAIT, "some chunks", || async {
        let p = store.partial_in_progress(&layer)?;
        let held = p.progress().borrow().held;
        (held >= 3).then_some(held)
    })
    .await;
    drop(store);
    net.nodes[1].stop().await;
    first.abort();
    // Let requests already on the wire drain before counting.
    let mut served_before_restart = served(&net, 0).await;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = served(&net, 0).await;
        if now == served_before_restart {
            break;
        }
        served_before_restart = now;
    }
    net.restart(1).await;
    net.wait_connected(1).await;
    let n = &net.nodes[1];
    let r = n.get(&format!("/v2/team/resume/blobs/{layer}")).await;
    assert_eq!(r.status, 200);
    assert_eq!(Digest::sha256(&r.body), layer);
    let after = served(&net, 0).await - served_before_restart;
    let chunk = u64::from(shoal_protocol::chunk_size_for(size));
    println!(
        "held {held_before} chunks before the restart; publisher served {after} bytes after it"
    );
    // What it lacked, and at most one endgame duplicate per request in flight.
    let duplicates = shoal_node::fetch::swarm::MAX_IN_FLIGHT as u64 * chunk;
    assert!(
        after <= size - u64::from(held_before) * chunk + duplicates,
        "the restarted node downloaded {after} bytes again; it held {held_before} chunks"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_seeder_sends_one_copy_of_a_chunk_at_a_time() {
    use shoal_node::net::NetError;
    use shoal_node::net::chunk::ChunkClient;
    let mut net = TestNet::with_identities(2);
    // Slow enough that the first transfer is still under way when the second request comes
    // (the limit allows a burst of one second's worth, then a chunk takes a second more).
    let size = 8 * MIB;
    let chunk = u64::from(shoal_protocol::chunk_size_for(size as u64));
    net.serve_limits.insert(0, chunk / 2);
    for _ in 0..2 {
        net.start_next().await;
    }
    net.wait_connected(1).await;
    let img = image(31, &[size]);
    let layer = Digest::sha256(&img.blobs[1]);
    net.nodes[0].push("team/one", "1", &img).await;
    // As in a rollout: the downloader asks once it has the record naming the blob's index.
    wait_until(WAIT, "the record on the downloader", || async {
        net.nodes[1].has_record("team/one", "1").await.then_some(())
    })
    .await;
    let seeder = net.nodes[0].node().network().peer_id();
    let network = net.nodes[1].node().network();
    let mut first = ChunkClient::open(&mut network.control(), seeder)
        .await
        .expect("first stream");

    let digest = layer.clone();
    let first_copy = tokio::spawn(async move {
        let mut buf = Vec::new();
        let held = first.fetch(&digest, 0, chunk, &mut buf).await;
        (held.map_err(|e| e.to_string()), buf)
    });
    // The seeder's serve report says when chunk 0 is being sent.
    wait_until(WAIT, "the first copy of chunk 0 under way", || async {
        let have = SyncRequest::Have {
            digest: layer.clone(),
        };
        match network.sync(seeder, have).await {
            Ok(SyncResponse::Have(Some(h))) => h.serve_bitfields()?.0.get(0).then_some(()),
            _ => None,
        }
    })
    .await;
    // Opened now: a stream left idle for a second is closed by the server.
    let mut second = ChunkClient::open(&mut network.control(), seeder)
        .await
        .expect("second stream");
    let mut buf = Vec::new();
    let again = second.fetch(&layer, 0, chunk, &mut buf).await;
    assert!(
        matches!(again, Err(NetError::Busy)),
        "a second copy of chunk 0 while the first is on its way: {again:?}"
    );
    // The stream stays usable, and another chunk is served at once.
    let other = second.fetch(&layer, chunk, chunk, &mut buf).await;
    assert!(matches!(other, Ok(true)), "chunk 1: {other:?}");
    assert_eq!(&buf[..], &img.blobs[1][chunk as usize..2 * chunk as usize]);

    let (held, bytes) = first_copy.await.expect("first fetch task");
    assert_eq!(held, Ok(true));
    assert_eq!(&bytes[..], &img.blobs[1][..chunk as usize]);
    // Once the first copy is out, the chunk is served again.
    let later = second.fetch(&layer, 0, chunk, &mut buf).await;
    assert!(matches!(later, Ok(true)), "chunk 0 again: {later:?}");
    assert_eq!(&buf[..], &bytes[..]);
}

/// Runs `swarm` as a peer that drops every chunk stream unread, as libp2p-stream does to an
/// inbound stream when the server's queue of new streams is full. Returns its address.
async fn run_stream_dropper(
    mut swarm: libp2p::Swarm<libp2p_stream::Behaviour>,
    listen: libp2p::Multiaddr,
) -> libp2p::Multiaddr {
    use futures::StreamExt;
    use libp2p::swarm::SwarmEvent;

    swarm.listen_on(listen).expect("listen");
    let mut incoming = swarm
        .behaviour()
        .new_control()
        .accept(shoal_node::net::chunk::protocol())
        .expect("accept");
    let id = *swarm.local_peer_id();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let mut tx = Some(tx);
    tokio::spawn(async move {
        loop {
            if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(address);
                }
            }
        }
    });
    tokio::spawn(async move {
        while let Some((_, stream)) = incoming.next().await {
            drop(stream);
        }
    });
    rx.await
        .expect("listening")
        .with(libp2p::multiaddr::Protocol::P2p(id))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_stream_dropped_before_an_answer_is_a_refusal() {
    use shoal_node::net::NetError;
    use shoal_node::net::chunk::ChunkClient;

    let mut net = TestNet::with_identities(1);
    net.start_next().await;
    // The dropping peer speaks stock libp2p TLS, which the node's own TLS must meet.
    let swarm = testnet::memory_swarm(|_| libp2p_stream::Behaviour::new(), WAIT);
    let memory = format!("/memory/{}", rand::random::<u64>())
        .parse()
        .expect("address");
    let addr = run_stream_dropper(swarm, memory).await;
    let Some(libp2p::multiaddr::Protocol::P2p(dropper)) = addr.iter().last() else {
        panic!("no peer id in {addr}");
    };

    let network = net.nodes[0].node().network();
    network.dial(addr).await.expect("dial");
    let mut client = wait_until(WAIT, "a stream to the dropping peer", || async {
        ChunkClient::open(&mut network.control(), dropper)
            .await
            .ok()
    })
    .await;
    let mut buf = Vec::new();
    let answer = client.fetch(&Digest::sha256(b"any"), 0, 1, &mut buf).await;
    // The download rests such a peer as if it had said "busy" instead of striking it out.
    assert!(
        matches!(answer, Err(NetError::Refused(_))),
        "a stream dropped unanswered: {answer:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_offers_only_noise_over_tcp_is_still_reached() {
    use shoal_node::net::chunk::ChunkClient;

    let mut net = TestNet::with_identities(1);
    net.start_next().await;
    // A node offers TLS first on TCP; a peer that knows only noise gets noise.
    let swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            libp2p::tcp::Config::default(),
            libp2p::noise::Config::new,
            libp2p::yamux::Config::default,
        )
        .expect("transport")
        .with_behaviour(|_| libp2p_stream::Behaviour::new())
        .expect("behaviour")
        .with_swarm_config(|c| c.with_idle_connection_timeout(WAIT))
        .build();
    let tcp = "/ip4/127.0.0.1/tcp/0".parse().expect("address");
    let addr = run_stream_dropper(swarm, tcp).await;
    let Some(libp2p::multiaddr::Protocol::P2p(peer)) = addr.iter().last() else {
        panic!("no peer id in {addr}");
    };
    let network = net.nodes[0].node().network();
    network.dial(addr).await.expect("dial");
    wait_until(WAIT, "a chunk stream to the noise-only peer", || async {
        ChunkClient::open(&mut network.control(), peer).await.ok()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_that_meet_over_quic_move_to_tcp_and_still_gossip_and_transfer() {
    let mut net = TestNet::with_identities(2);
    net.quic_and_tcp = true;
    net.start_next().await;
    // Dials node 0 at its QUIC address only, and hears from identify that it has TCP too.
    net.start_next().await;
    for i in 0..2 {
        wait_until(WAIT, &format!("node {i} to keep only TCP"), || async {
            let peers = net.nodes[i].node().network().peers().await.ok()?;
            let connections = &peers.first()?.connections;
            let tcp_only = !connections.is_empty()
                && connections
                    .iter()
                    .all(|c| c.contains("/tcp/") && !c.contains("/quic"));
            tcp_only.then_some(())
        })
        .await;
    }
    // Pushed after the QUIC connection closed: the record can only come by gossip, which needs
    // the subscriptions the nodes exchanged on the QUIC connection to have survived it.
    let image = image(41, &[3 * MIB]);
    net.nodes[0].push("team/app", "1", &image).await;
    wait_until(WAIT, "the record on node 1", || async {
        net.nodes[1].has_record("team/app", "1").await.then_some(())
    })
    .await;
    net.nodes[1].pull_and_check("team/app", "1", &image).await;
}

// One thread: the node's event loop runs only when the test yields, as on a loaded machine.
#[tokio::test(flavor = "current_thread")]
async fn a_started_node_reports_every_listen_address_at_once() {
    // A QUIC listener binds on the swarm's first poll: a node that returned from its start
    // before that gave peers (and `shoal run`'s first line) its TCP address only.
    for _ in 0..20 {
        let mut net = TestNet::with_identities(1);
        net.quic_and_tcp = true;
        net.start_next().await;
        let addrs = net.nodes[0]
            .node()
            .network()
            .listen_addrs()
            .await
            .expect("addresses");
        let has = |proto: &str| addrs.iter().any(|a| a.to_string().contains(proto));
        assert!(has("/quic-v1"), "no QUIC address in {addrs:?}");
        assert!(has("/tcp/"), "no TCP address in {addrs:?}");
    }
}

/// Stops node 0, has a client GET `path` from node 1, and restarts node 0 400 ms later: the
/// client's answer.
async fn get_while_the_publisher_returns(net: &mut TestNet, path: String) -> testnet::Response {
    net.nodes[0].stop().await;
    let addr = net.nodes[1].http_addr();
    let client = tokio::spawn(async move { http(addr, "GET", &path, &[], b"").await });
    tokio::time::sleep(Duration::from_millis(400)).await;
    net.restart(0).await;
    client.await.expect("the client task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_manifest_a_record_names_is_found_when_its_holder_returns_while_the_client_waits() {
    // The puller holds the record but not the manifest, and no peer is there when the client
    // asks: the node asks the fleet again for a few seconds, and the publisher comes back within
    // them. (The swarm benchmark's skopeo pulls met the same gap right after a tag arrived: one
    // round of asking, 404 in 0.45 s.)
    let mut net = TestNet::start(2).await;
    net.wait_connected(1).await;
    let img = image(31, &[MIB]);
    net.nodes[0].push("team/back", "1", &img).await;
    let b = &net.nodes[1];
    wait_until(WAIT, "the record on the puller", || async {
        b.has_record("team/back", "1").await.then_some(())
    })
    .await;
    let r = get_while_the_publisher_returns(&mut net, "/v2/team/back/manifests/1".into()).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.body, img.manifest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_layer_is_found_when_its_holder_returns_while_the_client_waits() {
    // The same for a layer: the puller has the manifest, no peer holds the layer when the
    // client asks, and the publisher comes back within the node's few seconds of asking again.
    let mut net = TestNet::start(2).await;
    net.wait_connected(1).await;
    let img = image(32, &[2 * MIB]);
    net.nodes[0].push("team/back", "1", &img).await;
    let b = &net.nodes[1];
    wait_until(WAIT, "the manifest on the puller", || async {
        (b.get("/v2/team/back/manifests/1").await.status == 200).then_some(())
    })
    .await;
    let path = format!("/v2/team/back/blobs/{}", Digest::sha256(&img.blobs[1]));
    let r = get_while_the_publisher_returns(&mut net, path).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.body == img.blobs[1], "other bytes");
}

/// Found while testing prefetch: a node alone in its site, pulling after a node of another
/// site, must get every blob, a one-chunk config included.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_alone_in_its_site_pulls_after_another_site() {
    let mut net = TestNet::with_identities(3);
    net.sites.insert(1, "hq".into());
    net.sites.insert(2, "shop-17".into());
    for _ in 0..3 {
        net.start_next().await;
    }
    net.wait_connected(2).await;
    let img = image(31, &[256 << 10]);
    net.nodes[0].push("team/app", "1", &img).await;
    for i in [1, 2] {
        let n = &net.nodes[i];
        wait_until(Duration::from_secs(20), "the record", || async {
            n.has_record("team/app", "1").await.then_some(())
        })
        .await;
        tokio::time::timeout(
            Duration::from_secs(30),
            n.pull_and_check("team/app", "1", &img),
        )
        .await
        .unwrap_or_else(|_| panic!("node {i} did not finish its pull in 30 s"));
    }
}

/// A random blob of `len` bytes as "an upstream" would send it: its bytes, digest, size, and the
/// index every node makes of it.
fn upstream_blob(seed: u64, len: usize) -> (Vec<u8>, Digest, u64, shoal_protocol::BlobIndex) {
    let bytes = image(seed, &[len]).blobs[1].clone();
    let (digest, size) = (Digest::sha256(&bytes), bytes.len() as u64);
    let chunk_size = shoal_protocol::blob_index::chunk_size_for(size);
    let index = shoal_protocol::BlobIndex::of(&bytes, chunk_size).unwrap();
    (bytes, digest, size, index)
}

/// Chunk `i` of `bytes` by `index`.
fn chunk_of<'a>(bytes: &'a [u8], index: &shoal_protocol::BlobIndex, i: u32) -> &'a [u8] {
    let r = index.chunk_range(i).unwrap();
    &bytes[r.start as usize..r.end as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blob_being_fetched_from_an_upstream_reaches_a_peer_chunk_by_chunk_as_it_grows() {
    let net = TestNet::start(2).await;
    net.wait_connected(1).await;
    let (bytes, digest, size, index) = upstream_blob(41, 6 * MIB);
    let (count, half) = (index.chunk_count(), index.chunk_count() / 2);
    let chunk = |i: u32| chunk_of(&bytes, &index, i);
    // The source has the first half of the blob from "the upstream", so far.
    let source = net.nodes[0].node();
    let growing = source.store().growing_partial(&digest, size).await.unwrap();
    for i in 0..half {
        growing.write_own_chunk(i, chunk(i)).unwrap();
    }
    let follower = net.nodes[1].node();
    let fetcher = shoal_node::fetch::Fetcher::new(
        follower.store().clone(),
        follower.network().clone(),
        tokio_util::sync::CancellationToken::new(),
        tokio_util::task::TaskTracker::new(),
    );
    let repo: shoal_protocol::RepoName = "team/app".parse().unwrap();
    let fetch = tokio::spawn({
        let (d, source) = (digest.clone(), source.network().peer_id());
        async move { fetcher.growing_blob(&repo, &d, size, source).await }
    });
    // The follower takes what the source holds, before the source has the rest.
    let held = || {
        follower
            .store()
            .partial_in_progress(&digest)
            .map_or(0, |p| p.held().count_ones())
    };
    wait_until(WAIT, "the follower to hold the first half", || async {
        (held() >= half).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        held(),
        half,
        "the follower holds chunks the source has not got"
    );
    assert!(!fetch.is_finished());
    // The rest arrives at the source, and from there at the follower.
    for i in half..count {
        growing.write_own_chunk(i, chunk(i)).unwrap();
    }
    source.store().finish_partial(&growing).await.unwrap();
    tokio::time::timeout(WAIT, fetch)
        .await
        .expect("the follower's fetch ended")
        .unwrap()
        .unwrap();
    assert_eq!(
        follower.store().blob_size(&digest).await.unwrap(),
        Some(size)
    );
    assert_eq!(
        follower.store().blob_index(&digest).await.unwrap(),
        Some(index)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_newest_chunks_of_a_blob_from_an_upstream_leave_its_node_once() {
    use shoal_node::net::NetError;
    use shoal_node::net::chunk::ChunkClient;
    let net = TestNet::start(3).await;
    net.wait_connected(2).await;
    // 40 chunks of 256 KiB, all from "the upstream" so far; the blob is not finished.
    let (bytes, digest, size, index) = upstream_blob(43, 10 * MIB);
    let count = index.chunk_count();
    assert!(count > 32, "{count} chunks");
    let source = net.nodes[0].node();
    let growing = source.store().growing_partial(&digest, size).await.unwrap();
    for i in 0..count {
        growing
            .write_own_chunk(i, chunk_of(&bytes, &index, i))
            .unwrap();
    }
    let fetch = |asker: usize, chunk: u32| {
        let network = net.nodes[asker].node().network().clone();
        let (digest, r) = (digest.clone(), index.chunk_range(chunk).unwrap());
        let peer = source.network().peer_id();
        async move {
            let mut client = ChunkClient::open(&mut network.control(), peer).await?;
            let mut buf = Vec::new();
            client
                .fetch(&digest, r.start, r.end - r.start, &mut buf)
                .await
        }
    };
    // The newest chunk: one peer gets it, the next is told "busy" (it gets it from the first).
    assert!(fetch(1, count - 1).await.unwrap());
    assert!(matches!(fetch(2, count - 1).await, Err(NetError::Busy)));
    // An older one leaves again: a peer that passes nothing on holds up only the newest few.
    assert!(fetch(1, 0).await.unwrap());
    assert!(fetch(2, 0).await.unwrap());
    // Once the blob is whole, it is served like any blob.
    source.store().finish_partial(&growing).await.unwrap();
    assert!(fetch(2, count - 1).await.unwrap());
}
