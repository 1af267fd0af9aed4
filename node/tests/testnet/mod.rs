//! `TestNet`: real Shoal nodes in one process, joined over libp2p's memory transport, each with
//! its own temp data directory and its registry API on a loopback port.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use libp2p::Multiaddr;
use shoal_node::Node;
use shoal_node::auth::trust::TrustRule;
use shoal_node::config::{AccessConfig, Config};
use shoal_node::identity::Identity;
use shoal_node::net::NetConfig;
use shoal_node::net::links::Kind;
use shoal_protocol::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub mod admin;
pub mod standin;

/// Polls `check` until it returns `Some` or `timeout` passes.
pub async fn wait_until<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An HTTP response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A minimal HTTP/1.1 client: one request per connection.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    s.write_all(body).await.expect("write body");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.expect("read");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("header end");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut body = raw[split + 4..].to_vec();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| {
            l.split_once(':')
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        })
        .collect();
    if headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"))
    {
        body = dechunk(&body);
    }
    Response {
        status,
        headers,
        body,
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let n = usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
        b = &b[eol + 2 + n + 2..];
    }
}

/// A pushed image: its blobs and manifest.
pub struct Image {
    pub blobs: Vec<Vec<u8>>,
    pub manifest: Vec<u8>,
    pub digest: Digest,
}

/// Builds an OCI image with a config and layers of the given sizes (seeded content).
pub fn image(seed: u64, layer_sizes: &[usize]) -> Image {
    use rand::{RngCore, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let config =
        format!("{{\"architecture\":\"amd64\",\"os\":\"linux\",\"seed\":{seed}}}").into_bytes();
    let mut blobs = vec![config];
    for &n in layer_sizes {
        let mut layer = vec![0u8; n];
        rng.fill_bytes(&mut layer);
        blobs.push(layer);
    }
    let desc = |b: &Vec<u8>, t: &str| serde_json::json!({"mediaType": t, "digest": Digest::sha256(b).to_string(), "size": b.len()});
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": desc(&blobs[0], "application/vnd.oci.image.config.v1+json"),
        "layers": blobs[1..].iter().map(|b| desc(b, "application/vnd.oci.image.layer.v1.tar")).collect::<Vec<_>>(),
    }))
    .expect("json");
    let digest = Digest::sha256(&manifest);
    Image {
        blobs,
        manifest,
        digest,
    }
}

/// One node of the net.
pub struct TestNode {
    pub node: Option<Node>,
    pub dir: tempfile::TempDir,
    pub identity: Identity,
    pub memory: Multiaddr,
}

impl TestNode {
    pub fn node(&self) -> &Node {
        self.node.as_ref().expect("node is running")
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.node().registry_addr()
    }

    pub async fn get(&self, path: &str) -> Response {
        http(self.http_addr(), "GET", path, &[("Accept", "*/*")], b"").await
    }

    /// Pushes an image (monolithic blob uploads, then the manifest by tag).
    pub async fn push(&self, repo: &str, tag: &str, image: &Image) {
        for b in &image.blobs {
            let d = Digest::sha256(b);
            let r = http(
                self.http_addr(),
                "POST",
                &format!("/v2/{repo}/blobs/uploads/?digest={d}"),
                &[],
                b,
            )
            .await;
            assert_eq!(
                r.status,
                201,
                "blob upload: {}",
                String::from_utf8_lossy(&r.body)
            );
        }
        let r = http(
            self.http_addr(),
            "PUT",
            &format!("/v2/{repo}/manifests/{tag}"),
            &[("Content-Type", "application/vnd.oci.image.manifest.v1+json")],
            &image.manifest,
        )
        .await;
        assert_eq!(
            r.status,
            201,
            "manifest push: {}",
            String::from_utf8_lossy(&r.body)
        );
    }

    /// Pulls an image by tag and checks every byte.
    pub async fn pull_and_check(&self, repo: &str, tag: &str, image: &Image) {
        let r = self.get(&format!("/v2/{repo}/manifests/{tag}")).await;
        assert_eq!(
            r.status,
            200,
            "manifest pull: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.body, image.manifest, "manifest bytes differ");
        for b in &image.blobs {
            let d = Digest::sha256(b);
            let r = self.get(&format!("/v2/{repo}/blobs/{d}")).await;
            assert_eq!(
                r.status,
                200,
                "blob {d}: {}",
                String::from_utf8_lossy(&r.body)
            );
            // A download that fails after the headers went out cuts the body short.
            assert_eq!(
                r.body.len(),
                b.len(),
                "blob {d}: body cut short (did the node's download stall?)"
            );
            assert_eq!(Digest::sha256(&r.body), d, "blob bytes differ");
        }
    }

    /// The digest the tag resolves to on this node, if any.
    pub async fn tag_digest(&self, repo: &str, tag: &str) -> Option<String> {
        let r = http(
            self.http_addr(),
            "HEAD",
            &format!("/v2/{repo}/manifests/{tag}"),
            &[],
            b"",
        )
        .await;
        (r.status == 200).then(|| {
            r.header("docker-content-digest")
                .unwrap_or_default()
                .to_owned()
        })
    }

    /// Whether the node's index holds a current record for the tag (no fetching involved).
    pub async fn has_record(&self, repo: &str, tag: &str) -> bool {
        let (repo, tag) = (repo.parse().expect("repo"), tag.parse().expect("tag"));
        self.node()
            .store()
            .read(move |i| Ok(i.record(&repo, &tag)?.is_some()))
            .await
            .expect("read")
    }

    pub async fn stop(&mut self) {
        if let Some(n) = self.node.take() {
            n.shutdown().await;
        }
    }
}

/// Something to do to a node's data directory before it starts.
pub type Hook = Box<dyn Fn(&std::path::Path) + Send + Sync>;

/// A set of nodes that trust each other.
pub struct TestNet {
    pub nodes: Vec<TestNode>,
    pub seeds: Vec<[u8; 32]>,
    pub extra_trust: Vec<TrustRule>,
    /// Upload limits (bytes per second) by node index.
    pub serve_limits: std::collections::HashMap<usize, u64>,
    /// Site labels by node index.
    pub sites: std::collections::HashMap<usize, String>,
    /// Nodes listen on QUIC and TCP on 127.0.0.1, as a real node does by default, and are
    /// bootstrapped to the QUIC addresses of the running ones (instead of the memory transport).
    pub quic_and_tcp: bool,
    /// How often each node syncs records with a random peer (the node's default unless set).
    pub sync_interval: Duration,
    /// How long each stage of a node's shutdown may take (the node's default unless set).
    pub shutdown_grace: Duration,
    /// Access settings by node index (a join token, how clients are treated).
    pub access: std::collections::HashMap<usize, AccessConfig>,
    /// Whether every node trusts every other's publisher key by a trust rule (the default, for
    /// tests about transfers); a fleet's members trust each other by membership instead.
    pub trust_each_other: bool,
    /// Runs on each node's data directory before it starts (to write its users file, say).
    pub before_start: Option<Hook>,
    /// Limits on HTTP clients, for every node (the node's defaults unless set).
    pub http: shoal_node::config::HttpLimits,
    /// Garbage collection on a schedule, for every node (none unless set).
    pub gc: shoal_node::config::GcSchedule,
    /// Subscriptions and prefetch rate by node index (none unless set).
    pub prefetch: std::collections::HashMap<usize, shoal_node::prefetch::PrefetchConfig>,
    /// The upstream registries every node mirrors (none unless set).
    pub mirror: shoal_node::config::MirrorConfig,
}

fn memory_addr() -> Multiaddr {
    format!("/memory/{}", rand::random::<u64>() >> 1)
        .parse()
        .expect("memory addr")
}

impl TestNet {
    /// Seeds for `n` node identities, so trust can be configured before any node starts.
    pub fn with_identities(n: usize) -> TestNet {
        let seeds = (0..n).map(|i| {
            let mut s = [0u8; 32];
            s[0] = i as u8 + 1;
            s[1] = rand::random();
            s
        });
        TestNet {
            nodes: Vec::new(),
            seeds: seeds.collect(),
            extra_trust: Vec::new(),
            serve_limits: Default::default(),
            sites: Default::default(),
            quic_and_tcp: false,
            sync_interval: shoal_node::net::RECORD_SYNC_INTERVAL,
            shutdown_grace: shoal_node::node::SHUTDOWN_GRACE,
            access: Default::default(),
            trust_each_other: true,
            before_start: None,
            http: Default::default(),
            gc: Default::default(),
            prefetch: Default::default(),
            mirror: Default::default(),
        }
    }

    /// Starts `n` nodes, all trusting each other for every repository.
    pub async fn start(n: usize) -> TestNet {
        let mut net = TestNet::with_identities(n);
        for _ in 0..n {
            net.start_next().await;
        }
        net
    }

    fn trust(&self) -> Vec<TrustRule> {
        if !self.trust_each_other {
            return self.extra_trust.clone();
        }
        let mut rules: Vec<TrustRule> = self
            .seeds
            .iter()
            .map(|s| {
                format!("{}=*", Identity::from_seed(*s).publisher())
                    .parse()
                    .expect("rule")
            })
            .collect();
        rules.extend(self.extra_trust.iter().cloned());
        rules
    }

    /// Starts the next node (by index into `seeds`), bootstrapped to every running node.
    pub async fn start_next(&mut self) -> usize {
        let i = self.nodes.len();
        let dir = tempfile::tempdir().expect("tempdir");
        let identity = Identity::from_seed(self.seeds[i]);
        std::fs::write(
            dir.path().join(shoal_node::identity::KEY_FILE),
            self.seeds[i],
        )
        .expect("key");
        let memory = memory_addr();
        let (listen, bootstrap) = self.addressing(i, &memory).await;
        if let Some(hook) = &self.before_start {
            hook(dir.path());
        }
        let node = start_node(self.config_for(i, dir.path(), listen, bootstrap)).await;
        self.nodes.push(TestNode {
            node: Some(node),
            dir,
            identity,
            memory,
        });
        i
    }

    /// The settings node `i` starts with.
    fn config_for(
        &self,
        i: usize,
        dir: &std::path::Path,
        listen: Vec<Multiaddr>,
        bootstrap: Vec<Multiaddr>,
    ) -> Config {
        Config {
            data_dir: dir.to_path_buf(),
            listen: "127.0.0.1:0".parse().expect("addr"),
            net: NetConfig {
                listen,
                bootstrap,
                mdns: false,
                serve_limit_bytes_per_sec: self.serve_limits.get(&i).copied(),
                site: self.sites.get(&i).cloned(),
                sync_interval: self.sync_interval,
                redial_backoff: NetConfig::default().redial_backoff,
            },
            trust: self.trust(),
            shutdown_grace: self.shutdown_grace,
            access: self.access.get(&i).cloned().unwrap_or_default(),
            http: self.http.clone(),
            gc: self.gc.clone(),
            quota: Default::default(),
            prefetch: self.prefetch.get(&i).cloned().unwrap_or_default(),
            mirror: self.mirror.clone(),
        }
    }

    /// What node `i` listens on, and the addresses of the other running nodes it dials.
    async fn addressing(&self, i: usize, memory: &Multiaddr) -> (Vec<Multiaddr>, Vec<Multiaddr>) {
        let others = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(j, n)| *j != i && n.node.is_some());
        if !self.quic_and_tcp {
            return (
                vec![memory.clone()],
                others.map(|(_, n)| n.memory.clone()).collect(),
            );
        }
        let listen = ["/ip4/127.0.0.1/udp/0/quic-v1", "/ip4/127.0.0.1/tcp/0"]
            .map(|a| a.parse().expect("multiaddr"))
            .to_vec();
        let mut bootstrap = Vec::new();
        for (_, n) in others {
            let network = n.node().network();
            let addrs = network.listen_addrs().await.expect("listen addresses");
            let quic = addrs
                .into_iter()
                .find(|a| Kind::of(a) == Kind::Quic)
                .expect("a QUIC listen address");
            bootstrap.push(quic.with(libp2p::multiaddr::Protocol::P2p(network.peer_id())));
        }
        (listen, bootstrap)
    }

    /// Restarts a stopped node on its data directory.
    pub async fn restart(&mut self, i: usize) {
        // libp2p's memory transport never frees a listening port, so a restarted node gets a
        // new address (as a real node may after a reboot); it dials the others itself.
        let memory = memory_addr();
        let (listen, bootstrap) = self.addressing(i, &memory).await;
        let config = self.config_for(i, self.nodes[i].dir.path(), listen, bootstrap);
        let n = &mut self.nodes[i];
        n.memory = memory;
        n.node = Some(start_node(config).await);
    }

    /// Waits until every running node has at least `k` peers.
    pub async fn wait_connected(&self, k: usize) {
        for (i, n) in self.nodes.iter().enumerate() {
            let Some(node) = &n.node else { continue };
            wait_until(
                Duration::from_secs(20),
                &format!("node {i} to have {k} peers"),
                || async { (node.network().peers().await.ok()?.len() >= k).then_some(()) },
            )
            .await;
        }
    }
}

async fn start_node(config: Config) -> Node {
    // A node just stopped on this directory may hold sled's lock for a moment longer.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match Node::start(config.clone()).await {
            Ok(node) => return node,
            Err(e) if tokio::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("node did not start: {e}"),
        }
    }
}

/// A bare libp2p peer speaking the nodes' memory transport (TLS, yamux) with `behaviour` and a
/// new identity, for tests that play a peer the node does not run: a hostile one, a stranger.
pub fn memory_swarm<B: libp2p::swarm::NetworkBehaviour>(
    behaviour: impl FnOnce(&libp2p::identity::Keypair) -> B,
    idle: Duration,
) -> libp2p::Swarm<B> {
    memory_swarm_as(
        libp2p::identity::Keypair::generate_ed25519(),
        behaviour,
        idle,
    )
}

/// [`memory_swarm`] with the identity `key`.
pub fn memory_swarm_as<B: libp2p::swarm::NetworkBehaviour>(
    key: libp2p::identity::Keypair,
    behaviour: impl FnOnce(&libp2p::identity::Keypair) -> B,
    idle: Duration,
) -> libp2p::Swarm<B> {
    use libp2p::core::transport::{MemoryTransport, Transport};
    use libp2p::core::upgrade::Version;
    libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_other_transport(|key| {
            Ok(MemoryTransport::default()
                .upgrade(Version::V1)
                .authenticate(libp2p::tls::Config::new(key)?)
                .multiplex(libp2p::yamux::Config::default()))
        })
        .expect("transport")
        .with_behaviour(|key| behaviour(key))
        .expect("behaviour")
        .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
        .build()
}

/// A self-signed certificate for `localhost`, written as `cert.pem` and `key.pem` in `dir`:
/// the two paths, and the certificate for a client to trust.
pub fn self_signed(
    dir: &std::path::Path,
) -> (
    std::path::PathBuf,
    std::path::PathBuf,
    rustls::pki_types::CertificateDer<'static>,
) {
    let rcgen::CertifiedKey { cert, key_pair } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("certificate");
    let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&c, cert.pem()).expect("write the certificate");
    std::fs::write(&k, key_pair.serialize_pem()).expect("write the key");
    (c, k, cert.der().clone())
}
