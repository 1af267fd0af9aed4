//! A hostile or careless HTTP client cannot take a node from the others: listings come in
//! bounded pages, slow and idle connections are cut off, connections and requests past their
//! limits get a clear `503` (over HTTPS too), a stalled body is cut off, upload sessions expire and have quotas,
//! a tag push too large for a record is refused before anything is written, a session resumes
//! at its acknowledged offset after a crash, and an overflowing `Content-Range` is a clean
//! error.
//!
//! Two `#[ignore]`d tests print the figures of issue 23 (`cargo test -p shoal-node --release
//! --test hostile_client -- --ignored --nocapture`).

mod testnet;

use std::net::SocketAddr;
use std::time::Duration;

use shoal_node::config::HttpLimits;
use shoal_protocol::Digest;
use testnet::{TestNet, TestNode, http, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(10);

/// One node with these HTTP limits.
async fn node_with(limits: HttpLimits) -> TestNet {
    let mut net = TestNet::with_identities(1);
    net.http = limits;
    net.start_next().await;
    net
}

fn error_code(body: &[u8]) -> String {
    let json: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    json["errors"][0]["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Reads what the server sends until it closes the connection (or `WAIT` passes).
async fn read_until_closed(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut raw = Vec::new();
    match tokio::time::timeout(WAIT, stream.read_to_end(&mut raw)).await {
        Ok(Ok(_)) => Some(raw),
        // A reset after the answer still counts as closed.
        Ok(Err(_)) => Some(raw),
        Err(_) => None,
    }
}

/// The status of a raw HTTP/1.1 answer.
fn status_of(raw: &[u8]) -> Option<u16> {
    std::str::from_utf8(raw.get(..12)?)
        .ok()?
        .get(9..12)?
        .parse()
        .ok()
}

/// Whether the server has closed `stream` (reading gives end of file or an error at once).
async fn is_closed(stream: &mut TcpStream) -> bool {
    let mut b = [0u8; 64];
    matches!(
        tokio::time::timeout(Duration::from_millis(20), stream.read(&mut b)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// A connection from `source` (a loopback address) to `addr`.
async fn connect_from(source: &str, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(format!("{source}:0").parse().expect("source"))?;
    socket.connect(addr).await
}

async fn upload_blob(node: &TestNode, repo: &str, blob: &[u8]) -> Digest {
    let d = Digest::sha256(blob);
    let r = http(
        node.http_addr(),
        "POST",
        &format!("/v2/{repo}/blobs/uploads/?digest={d}"),
        &[],
        blob,
    )
    .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    d
}

async fn put_manifest(node: &TestNode, repo: &str, reference: &str, manifest: &[u8]) -> u16 {
    http(
        node.http_addr(),
        "PUT",
        &format!("/v2/{repo}/manifests/{reference}"),
        &[("Content-Type", "application/vnd.oci.image.manifest.v1+json")],
        manifest,
    )
    .await
    .status
}

/// A manifest referring to `subject`, with an annotation of `annotation_bytes` bytes.
fn referrer(config: &Digest, subject: &Digest, i: usize, annotation_bytes: usize) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/vnd.example.sbom",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": config.to_string(), "size": 2},
        "layers": [],
        "subject": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": subject.to_string(), "size": 1},
        "annotations": {"n": i.to_string(), "pad": "x".repeat(annotation_bytes)},
    }))
    .expect("json")
}

/// Pushes `count` referrers of one subject; returns the subject and their digests.
async fn push_referrers(
    node: &TestNode,
    repo: &str,
    count: usize,
    annotation_bytes: usize,
) -> (Digest, Vec<Digest>) {
    let config = upload_blob(node, repo, b"{}").await;
    let subject = Digest::sha256(b"the subject");
    let mut digests = Vec::new();
    for i in 0..count {
        let m = referrer(&config, &subject, i, annotation_bytes);
        let d = Digest::sha256(&m);
        assert_eq!(put_manifest(node, repo, &d.to_string(), &m).await, 201);
        digests.push(d);
    }
    (subject, digests)
}

/// Digests in a referrers response.
fn listed(body: &[u8]) -> Vec<String> {
    let json: serde_json::Value = serde_json::from_slice(body).expect("json");
    json["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .map(|m| m["digest"].as_str().expect("digest").to_owned())
        .collect()
}

/// The path in a `Link: <path>; rel="next"` header.
fn next_link(r: &testnet::Response) -> Option<String> {
    let link = r.header("link")?;
    Some(link.split_once('<')?.1.split_once('>')?.0.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn referrers_come_in_pages_with_a_link_to_the_next() {
    let net = node_with(HttpLimits::default()).await;
    let node = &net.nodes[0];
    let (subject, mut digests) = push_referrers(node, "team/app", 5, 16).await;
    digests.sort_by_key(ToString::to_string);
    let mut seen = Vec::new();
    let mut path = format!("/v2/team/app/referrers/{subject}?n=2");
    let mut pages = 0;
    loop {
        let r = node.get(&path).await;
        assert_eq!(r.status, 200);
        let page = listed(&r.body);
        assert!(page.len() <= 2, "a page of {} entries", page.len());
        seen.extend(page);
        pages += 1;
        match next_link(&r) {
            Some(next) => path = next,
            None => break,
        }
        assert!(pages < 10, "the pages never end");
    }
    assert_eq!(pages, 3);
    let want: Vec<String> = digests.iter().map(ToString::to_string).collect();
    assert_eq!(seen, want, "every referrer once, in order");

    // The filter goes on in the link.
    let r = node
        .get(&format!(
            "/v2/team/app/referrers/{subject}?n=4&artifactType=application/vnd.example.sbom"
        ))
        .await;
    assert_eq!(listed(&r.body).len(), 4);
    assert!(
        next_link(&r)
            .expect("a next page")
            .contains("artifactType=")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_of_referrers_is_bounded_by_size_whatever_n_asks() {
    let net = node_with(HttpLimits::default()).await;
    let node = &net.nodes[0];
    // Six referrers of 400 KiB of annotations each: more than one page holds.
    let (subject, _) = push_referrers(node, "team/big", 6, 400 << 10).await;
    let r = node
        .get(&format!("/v2/team/big/referrers/{subject}?n=100000"))
        .await;
    assert_eq!(r.status, 200);
    let first = listed(&r.body);
    assert!(
        !first.is_empty() && first.len() < 6,
        "a page of {} referrers",
        first.len()
    );
    assert!(r.body.len() < 2 << 20, "a page of {} bytes", r.body.len());
    let mut all = first;
    let mut next = next_link(&r);
    while let Some(path) = next {
        let r = node.get(&path).await;
        all.extend(listed(&r.body));
        next = next_link(&r);
    }
    assert_eq!(all.len(), 6);
}

/// A client that asks for a blob and reads none of it loses its connection after the send
/// timeout: its slot (the only one of its address here) comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_its_response_is_cut_off() {
    let net = node_with(HttpLimits {
        max_connections_per_client: 1,
        send_timeout: Duration::from_secs(2),
        ..HttpLimits::default()
    })
    .await;
    let node = &net.nodes[0];
    let addr = node.http_addr();
    // Larger than what the socket buffers of both ends hold.
    let blob: Vec<u8> = (0..64u32 << 20).map(|i| (i % 251) as u8).collect();
    let digest = upload_blob(node, "r", &blob).await;
    let mut reader = connect_from("127.0.0.2", addr).await.expect("connect");
    reader
        .write_all(format!("GET /v2/r/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let status_from_its_address = || async {
        let mut s = connect_from("127.0.0.2", addr).await.ok()?;
        s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        status_of(&read_until_closed(&mut s).await?)
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        status_from_its_address().await,
        Some(503),
        "the reader holds the address's one slot"
    );
    let started = std::time::Instant::now();
    wait_until(WAIT, "the stalled response to be cut off", || async {
        (status_from_its_address().await == Some(200)).then_some(())
    })
    .await;
    println!(
        "slot back {:.1} s after the check",
        started.elapsed().as_secs_f64()
    );
    drop(reader);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_connections_are_cut_off_while_an_honest_client_is_served() {
    let net = node_with(HttpLimits {
        header_read_timeout: Duration::from_secs(2),
        idle_timeout: Duration::from_secs(3),
        max_connections_per_client: 1000,
        ..HttpLimits::default()
    })
    .await;
    let node = &net.nodes[0];
    let addr = node.http_addr();
    // Half send nothing; half send a request's headers a byte at a time and never finish.
    let mut silent = Vec::new();
    let mut trickling = Vec::new();
    for i in 0..300 {
        let s = connect_from("127.0.0.2", addr).await.expect("connect");
        if i % 2 == 0 {
            silent.push(s);
        } else {
            trickling.push(s);
        }
    }
    let trickle = tokio::spawn(async move {
        let request = b"GET /v2/_catalog HTTP/1.1\r\nHost: x\r\nX-Slow: ";
        for i in 0.. {
            let mut open = 0;
            for s in &mut trickling {
                let b = request.get(i).copied().unwrap_or(b'a');
                if s.write_all(&[b]).await.is_ok() {
                    open += 1;
                }
            }
            if open == 0 {
                return trickling;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        trickling
    });
    // Served meanwhile.
    let r = node.get("/v2/_catalog").await;
    assert_eq!(
        r.status, 200,
        "an honest client while 300 slow ones are open"
    );
    // Every slow connection is closed well before the old 30 s header timeout.
    let mut trickling = tokio::time::timeout(Duration::from_secs(20), trickle)
        .await
        .expect("the trickling connections are cut off")
        .expect("trickle task");
    for s in &mut trickling {
        assert!(is_closed(s).await, "a trickling connection is still open");
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    for s in &mut silent {
        while !is_closed(s).await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "a silent connection is still open"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // A keep-alive connection idle after its request is closed too.
    let mut kept = TcpStream::connect(addr).await.expect("connect");
    kept.write_all(b"GET /v2/_catalog HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut buf = vec![0u8; 4096];
    let n = kept.read(&mut buf).await.expect("answer");
    assert_eq!(status_of(&buf[..n]), Some(200));
    let closed = read_until_closed(&mut kept).await;
    assert!(closed.is_some(), "an idle keep-alive connection stays open");
    assert_eq!(node.get("/v2/_catalog").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_connection_limits_a_client_gets_503_and_the_connection_closes() {
    let net = node_with(HttpLimits {
        max_connections: 8,
        max_connections_per_client: 4,
        ..HttpLimits::default()
    })
    .await;
    let node = &net.nodes[0];
    let addr = node.http_addr();
    // One address holds its four.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(connect_from("127.0.0.2", addr).await.expect("connect"));
    }
    let mut fifth = connect_from("127.0.0.2", addr).await.expect("connect");
    fifth
        .write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let raw = read_until_closed(&mut fifth).await.expect("closed");
    assert_eq!(
        status_of(&raw),
        Some(503),
        "{}",
        String::from_utf8_lossy(&raw)
    );
    let body = &raw[raw.windows(4).position(|w| w == b"\r\n\r\n").expect("head") + 4..];
    assert_eq!(error_code(body), "UNAVAILABLE");
    // Another address is still served.
    let r = node.get("/v2/_catalog").await;
    assert_eq!(r.status, 200);
    // Then the node-wide limit.
    for _ in 0..4 {
        held.push(connect_from("127.0.0.3", addr).await.expect("connect"));
    }
    let mut ninth = connect_from("127.0.0.4", addr).await.expect("connect");
    ninth
        .write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let raw = read_until_closed(&mut ninth).await.expect("closed");
    assert_eq!(status_of(&raw), Some(503));
    // Slots come back when connections close.
    drop(held);
    wait_until(WAIT, "a slot to come back", || async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /v2/_catalog HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let raw = read_until_closed(&mut s).await?;
        (status_of(&raw) == Some(200)).then_some(())
    })
    .await;
}

/// Starts a session and sends a PATCH whose body stalls after `sent` of `declared` bytes.
async fn stalled_patch(addr: SocketAddr, repo: &str, sent: usize, declared: usize) -> TcpStream {
    let r = http(
        addr,
        "POST",
        &format!("/v2/{repo}/blobs/uploads/"),
        &[],
        b"",
    )
    .await;
    assert_eq!(r.status, 202);
    let location = r.header("location").expect("location").to_owned();
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "PATCH {location} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: {declared}\r\nContent-Range: 0-{}\r\n\r\n",
        declared - 1
    );
    s.write_all(head.as_bytes()).await.expect("head");
    s.write_all(&vec![7u8; sent]).await.expect("body");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_is_cut_off_and_the_session_stays_where_it_was() {
    let net = node_with(HttpLimits {
        body_read_timeout: Duration::from_secs(1),
        ..HttpLimits::default()
    })
    .await;
    let node = &net.nodes[0];
    let addr = node.http_addr();
    let r = http(addr, "POST", "/v2/team/stall/blobs/uploads/", &[], b"").await;
    let location = r.header("location").expect("location").to_owned();
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "PATCH {location} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\nContent-Range: 0-999\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.expect("head");
    s.write_all(&[7u8; 100]).await.expect("body");
    let raw = read_until_closed(&mut s)
        .await
        .expect("the stalled request is cut off");
    assert_eq!(
        status_of(&raw),
        Some(400),
        "{}",
        String::from_utf8_lossy(&raw)
    );
    // The session is where it was, and takes the chunk whole.
    let r = node.get(&location).await;
    assert_eq!(r.status, 204);
    let r = http(
        addr,
        "PATCH",
        &location,
        &[("Content-Range", "0-999")],
        &[7u8; 1000],
    )
    .await;
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("range"), Some("0-999"));
}

/// Over HTTPS a connection past the limits gets the same `503` after its handshake, rather than
/// a reset the client cannot tell from a broken node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_connection_limits_an_https_client_gets_503_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert_file, key_file, cert) = testnet::self_signed(dir.path());
    let mut net = TestNet::with_identities(1);
    net.http = HttpLimits {
        max_connections_per_client: 1,
        ..HttpLimits::default()
    };
    net.access.insert(
        0,
        shoal_node::config::AccessConfig {
            tls: Some((cert_file, key_file)),
            ..Default::default()
        },
    );
    net.start_next().await;
    let addr = net.nodes[0].http_addr();

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).expect("root");
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let request = b"GET /v2/ HTTP/1.1\r\nHost: localhost\r\n\r\n";

    // The one slot of 127.0.0.2, held over HTTPS and served.
    let held = connect_from("127.0.0.2", addr).await.expect("connect");
    let mut held = connector
        .connect(name.clone(), held)
        .await
        .expect("handshake");
    held.write_all(request).await.expect("write");
    let mut buf = vec![0u8; 4096];
    let n = held.read(&mut buf).await.expect("answer");
    assert_ne!(
        status_of(&buf[..n]),
        Some(503),
        "the first connection is served"
    );

    // The next from that address: a handshake, then the 503, then the close.
    let next = connect_from("127.0.0.2", addr).await.expect("connect");
    let mut next = connector
        .connect(name.clone(), next)
        .await
        .expect("a handshake past the limit");
    next.write_all(request).await.expect("write");
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(WAIT, next.read_to_end(&mut raw))
        .await
        .expect("the refused connection closes");
    assert_eq!(
        status_of(&raw),
        Some(503),
        "{}",
        String::from_utf8_lossy(&raw)
    );
    let body = &raw[raw.windows(4).position(|w| w == b"\r\n\r\n").expect("head") + 4..];
    assert_eq!(error_code(body), "UNAVAILABLE");
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_request_limit_a_request_gets_503_and_then_is_served() {
    let net = node_with(HttpLimits {
        max_requests: 1,
        ..HttpLimits::default()
    })
    .await;
    let node = &net.nodes[0];
    // A stalled upload holds the one request slot.
    let stalled = stalled_patch(node.http_addr(), "team/busy", 10, 100).await;
    wait_until(WAIT, "a 503", || async {
        let r = node.get("/v2/_catalog").await;
        (r.status == 503).then_some(r)
    })
    .await;
    drop(stalled);
    wait_until(WAIT, "the slot to come back", || async {
        (node.get("/v2/_catalog").await.status == 200).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_upload_session_answers_404_and_is_removed() {
    let net = node_with(HttpLimits {
        upload_session_ttl: Duration::from_secs(1),
        ..HttpLimits::default()
    })
    .await;
    let node = &net.nodes[0];
    let addr = node.http_addr();
    let r = http(addr, "POST", "/v2/team/old/blobs/uploads/", &[], b"").await;
    let location = r.header("location").expect("location").to_owned();
    let id = location.rsplit('/').next().expect("id").to_owned();
    let dir = node.dir.path().join("uploads").join(&id);
    assert!(dir.is_dir());
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = http(addr, "PATCH", &location, &[], b"late").await;
    assert_eq!(r.status, 404);
    assert_eq!(error_code(&r.body), "BLOB_UPLOAD_UNKNOWN");
    assert!(!dir.exists(), "the abandoned session's bytes are removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_sessions_have_a_size_and_a_count_quota() {
    let net = node_with(HttpLimits {
        max_upload_session_bytes: 1000,
        max_upload_sessions: 2,
        ..HttpLimits::default()
    })
    .await;
    let node = &net.nodes[0];
    let addr = node.http_addr();
    let r = http(addr, "POST", "/v2/team/q/blobs/uploads/", &[], b"").await;
    let location = r.header("location").expect("location").to_owned();
    let r = http(addr, "PATCH", &location, &[], &[1u8; 600]).await;
    assert_eq!(r.status, 202);
    // Declared too large: refused up front.
    let r = http(addr, "PATCH", &location, &[], &[1u8; 600]).await;
    assert_eq!(r.status, 413, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(error_code(&r.body), "SIZE_INVALID");
    // Chunked (no declared length) and too large: cut off, the session unchanged.
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "PATCH {location} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n258\r\n"
    );
    s.write_all(head.as_bytes()).await.expect("head");
    s.write_all(&[2u8; 600]).await.expect("body");
    s.write_all(b"\r\n0\r\n\r\n").await.expect("end");
    let raw = read_until_closed(&mut s).await.expect("answer");
    assert_eq!(
        status_of(&raw),
        Some(413),
        "{}",
        String::from_utf8_lossy(&raw)
    );
    let r = node.get(&location).await;
    assert_eq!(r.header("range"), Some("0-599"));
    // Two sessions are open at most.
    let r = http(addr, "POST", "/v2/team/q/blobs/uploads/", &[], b"").await;
    assert_eq!(r.status, 202);
    let r = http(addr, "POST", "/v2/team/q/blobs/uploads/", &[], b"").await;
    assert_eq!(r.status, 429, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(error_code(&r.body), "TOOMANYREQUESTS");
    // Cancelling one makes room.
    assert_eq!(http(addr, "DELETE", &location, &[], b"").await.status, 204);
    let r = http(addr, "POST", "/v2/team/q/blobs/uploads/", &[], b"").await;
    assert_eq!(r.status, 202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overflowing_content_range_is_a_clean_error() {
    let net = node_with(HttpLimits::default()).await;
    let node = &net.nodes[0];
    let addr = node.http_addr();
    let r = http(addr, "POST", "/v2/team/range/blobs/uploads/", &[], b"").await;
    let location = r.header("location").expect("location").to_owned();
    let range = format!("0-{}", u64::MAX);
    let r = http(
        addr,
        "PATCH",
        &location,
        &[("Content-Range", &range)],
        b"abc",
    )
    .await;
    assert!(
        r.status == 400 || r.status == 416,
        "status {}: {}",
        r.status,
        String::from_utf8_lossy(&r.body)
    );
    // The node still serves the session.
    let r = http(
        addr,
        "PATCH",
        &location,
        &[("Content-Range", "0-2")],
        b"abc",
    )
    .await;
    assert_eq!(r.status, 202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_push_too_large_for_a_record_is_refused_before_anything_is_written() {
    let net = node_with(HttpLimits::default()).await;
    let node = &net.nodes[0];
    let addr = node.http_addr();
    // 2,500 small distinct layers (a record holds about 2,000), uploaded a few at a time.
    let blobs: Vec<Vec<u8>> = (0..2500u32).map(|i| i.to_le_bytes().to_vec()).collect();
    let mut layers = Vec::new();
    for batch in blobs.chunks(16) {
        let uploads = batch.iter().map(|b| async move {
            let d = Digest::sha256(b);
            let r = http(
                addr,
                "POST",
                &format!("/v2/team/huge/blobs/uploads/?digest={d}"),
                &[],
                b,
            )
            .await;
            assert_eq!(r.status, 201);
            serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d.to_string(), "size": b.len()})
        });
        layers.extend(futures_util::future::join_all(uploads).await);
    }
    let config = upload_blob(node, "team/huge", b"{}").await;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.to_string(), "size": 2},
        "layers": layers,
    }))
    .expect("json");
    let digest = Digest::sha256(&manifest);
    let r = http(
        addr,
        "PUT",
        "/v2/team/huge/manifests/latest",
        &[("Content-Type", "application/vnd.oci.image.manifest.v1+json")],
        &manifest,
    )
    .await;
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(error_code(&r.body), "MANIFEST_INVALID");
    // Nothing half-written: no manifest blob, no tag.
    assert_eq!(
        node.node().store().blob_size(&digest).await.expect("store"),
        None
    );
    assert_eq!(node.tag_digest("team/huge", "latest").await, None);
    // By digest it is stored (no record needed).
    assert_eq!(
        put_manifest(node, "team/huge", &digest.to_string(), &manifest).await,
        201
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_crash_mid_chunk_a_session_resumes_at_its_acknowledged_offset() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo: shoal_protocol::RepoName = "team/crash".parse().expect("repo");
    let first = vec![1u8; 1000];
    let id = {
        let root = dir.path().to_path_buf();
        let store = tokio::task::spawn_blocking(move || shoal_node::store::Store::open(&root))
            .await
            .expect("task")
            .expect("store");
        let id = store.create_upload(&repo).await.expect("session");
        let session = store.upload(&repo, &id).await.expect("session");
        let body = futures_util::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from(
            first.clone(),
        ))]);
        let offset = session
            .lock()
            .await
            .append(body, Some(0), Some(1000))
            .await
            .expect("first chunk");
        assert_eq!(offset, 1000);
        drop(session);
        drop(store);
        id
    };
    // The crash: half of the next chunk reached the file, and was never acknowledged.
    let data = dir.path().join("uploads").join(&id).join("data");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&data)
        .expect("data");
    std::io::Write::write_all(&mut f, &[2u8; 300]).expect("partial chunk");
    drop(f);
    let root = dir.path().to_path_buf();
    let store = wait_until(WAIT, "the store to reopen", || {
        let root = root.clone();
        async move {
            tokio::task::spawn_blocking(move || shoal_node::store::Store::open(&root))
                .await
                .ok()?
                .ok()
        }
    })
    .await;
    let session = store.upload(&repo, &id).await.expect("session");
    let mut upload = session.lock().await;
    assert_eq!(upload.offset(), 1000, "the acknowledged offset");
    // The client retries its chunk where it was told the session stands.
    let second = vec![2u8; 500];
    let body =
        futures_util::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from(second.clone()))]);
    let offset = upload
        .append(body, Some(1000), Some(500))
        .await
        .expect("the retried chunk");
    assert_eq!(offset, 1500);
    drop(upload);
    let mut whole = first;
    whole.extend_from_slice(&second);
    let digest = Digest::sha256(&whole);
    let none = futures_util::stream::iter(Vec::<Result<bytes::Bytes, std::io::Error>>::new());
    store
        .finish_upload(&repo, &id, &digest, none, None)
        .await
        .expect("the blob is what the client sent");
}

/// A crash between creating a session's offset file and writing it (found by the SIGKILL test:
/// every later `POST` answered `500`): the next start removes that session, whose id no client
/// was ever given, and new sessions work; a session damaged while the node runs does not stop
/// others from starting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_cut_short_at_creation_is_removed_and_uploads_go_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo: shoal_protocol::RepoName = "team/crash".parse().expect("repo");
    // The index's lock goes with the last of its threads: retried until it has.
    let open = |root: std::path::PathBuf| {
        wait_until(WAIT, "the store to open", move || {
            let root = root.clone();
            async move {
                tokio::task::spawn_blocking(move || shoal_node::store::Store::open(&root))
                    .await
                    .ok()?
                    .ok()
            }
        })
    };
    let store = open(dir.path().to_path_buf()).await;
    let torn = store.create_upload(&repo).await.expect("session");
    let damaged = store.create_upload(&repo).await.expect("session");
    store.close().await;
    drop(store);
    let offset_file = |id: &str| dir.path().join("uploads").join(id).join("offset");
    std::fs::write(offset_file(&torn), b"").expect("the torn offset file");
    let store = open(dir.path().to_path_buf()).await;
    assert!(
        !offset_file(&torn).exists(),
        "the session cut short is still there"
    );
    assert!(matches!(
        store.upload(&repo, &torn).await,
        Err(shoal_node::store::StoreError::UploadUnknown)
    ));
    // Damaged while the node runs (not by a crash): reported, and the others go on.
    std::fs::write(offset_file(&damaged), b"12345").expect("damage");
    assert_eq!(
        store
            .expire_uploads(Duration::from_secs(3600))
            .await
            .expect("looking for abandoned sessions"),
        1
    );
    let id = store.create_upload(&repo).await.expect("a new session");
    assert!(store.upload(&repo, &id).await.is_ok());
}

/// Resident memory of this process, in MiB.
fn rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        / 1024
}

/// Issue 23's referrers figure: RSS around six concurrent referrers requests over ~37 MiB of
/// referring manifests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: prints the RSS figure of issue 23"]
async fn measure_rss_of_concurrent_referrers_requests() {
    let net = node_with(HttpLimits::default()).await;
    let node = &net.nodes[0];
    let (subject, digests) = push_referrers(node, "team/rss", 1000, 37 << 10).await;
    println!("pushed {} referrers of ~37 KiB", digests.len());
    let before = rss_mib();
    let path = format!("/v2/team/rss/referrers/{subject}");
    let mut peak = before;
    for _ in 0..3 {
        let asks = (0..6).map(|_| node.get(&path));
        let answers = futures_util::future::join_all(asks).await;
        for a in &answers {
            assert_eq!(a.status, 200);
        }
        peak = peak.max(rss_mib());
    }
    println!(
        "RSS before {before} MiB, after six concurrent referrers requests (three rounds) {} MiB, peak seen {peak} MiB",
        rss_mib()
    );
    // Six clients that each follow every page.
    let walks = (0..6).map(|_| async {
        let (mut path, mut listed_all, mut pages) = (Some(path.clone()), 0, 0);
        while let Some(p) = path {
            let r = node.get(&p).await;
            assert_eq!(r.status, 200);
            listed_all += listed(&r.body).len();
            pages += 1;
            path = next_link(&r);
        }
        (listed_all, pages)
    });
    let walked = futures_util::future::join_all(walks).await;
    println!(
        "six concurrent walks of every page: {walked:?} (referrers, pages); RSS after {} MiB",
        rss_mib()
    );
}

/// Issue 23's slowloris figure: how many of 1,000 slow connections are still held after 60 s,
/// and whether an honest client is served meanwhile (default limits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: prints the slowloris figure of issue 23"]
async fn measure_slowloris_connections_held_after_60_s() {
    let net = node_with(HttpLimits::default()).await;
    let node = &net.nodes[0];
    let addr = node.http_addr();
    // From four addresses, so that the per-client limit is not what stops them.
    let mut slow = Vec::new();
    for i in 0..1000 {
        let source = format!("127.0.0.{}", 2 + i % 4);
        slow.push(connect_from(&source, addr).await.expect("connect"));
    }
    let start = std::time::Instant::now();
    let mut served = 0;
    let mut asked = 0;
    while start.elapsed() < Duration::from_secs(60) {
        for s in &mut slow {
            let _ = s.write_all(b"X").await;
        }
        asked += 1;
        let r = tokio::time::timeout(Duration::from_secs(5), node.get("/v2/_catalog")).await;
        if matches!(r, Ok(r) if r.status == 200) {
            served += 1;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    let mut held = 0;
    for s in &mut slow {
        if !is_closed(s).await {
            held += 1;
        }
    }
    println!(
        "after 60 s: {held} of 1000 slow connections held; honest requests served {served} of {asked}"
    );
}
