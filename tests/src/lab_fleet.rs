//! A fleet of real `shoal` processes, one per network namespace of a [`Lab`], for the
//! fault-injection suite (`tests/tests/faults.rs`).
//!
//! Every node listens for registry clients on `<its address>:5000` (with `--insecure`: the
//! address is not loopback, and the lab is private) and for peers on port 4001 over QUIC and
//! TCP. Each node's identity is made before it starts (`shoal keys show`), so every node is
//! started knowing every other node's address as a bootstrap peer and trusting every node's
//! publisher key for `faults/*`: a push on any node is an image of the whole fleet.
//!
//! [`TestImage`] is a random image pushed over the registry API; [`TestImage::check_on`]
//! pulls it whole from a node and compares every byte, which on a node that lacks it makes
//! the node fetch it from its peers. [`LabFleet::finish`] is the end of every scenario: every
//! node still running, stopped with SIGTERM, and `shoal fsck` clean on every store.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use rand::{Rng, RngCore};
use tempfile::TempDir;

use crate::http::{OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST};
use crate::netns::Lab;
use crate::process::{Launch, ShoalProcess};
use crate::tools::faketime_library;
use crate::wait::wait_until;
use crate::{RegistryClient, sha256_digest};

/// The registry port of every node (each namespace has its own ports).
pub const REGISTRY_PORT: u16 = 5000;
/// The peer-to-peer port of every node, for QUIC and TCP.
pub const P2P_PORT: u16 = 4001;
/// The repositories every node's key is trusted for.
pub const TRUSTED_PATTERN: &str = "faults/*";
/// How long one registry request of the tests may take (pulls through peers included).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// How one node of the fleet is started.
#[derive(Debug, Clone, Default)]
pub struct NodeSpec {
    /// A libfaketime offset for the node's wall clock (`"+3h"`, `"-3h"`); `None`: the real
    /// clock. Its monotonic clock is left alone (timers keep working).
    pub clock_offset: Option<String>,
    /// Where its store lives (a small tmpfs, for instance); a temp dir when `None`.
    pub data_dir: Option<PathBuf>,
}

/// A node's identity, known before it starts.
#[derive(Debug, Clone)]
struct Identity {
    peer_id: String,
    publisher_key: String,
}

/// Real nodes in a [`Lab`], all peers of each other.
pub struct LabFleet {
    /// Killed first when the fleet drops (fields drop in order), then the lab goes.
    nodes: Vec<ShoalProcess>,
    identities: Vec<Identity>,
    /// The namespaces and their switch (public: scenarios cut and heal it).
    pub lab: Lab,
    /// Holds the data dirs that were not given.
    _dirs: TempDir,
}

fn identity_of(data_dir: &std::path::Path) -> Result<Identity> {
    let out = ShoalProcess::cli_on(data_dir, &["keys", "show"])?;
    let field = |name: &str| {
        out.stdout
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .with_context(|| format!("`shoal keys show` printed no {name:?}:\n{}", out.stdout))
    };
    Ok(Identity {
        peer_id: field("peer id:")?,
        publisher_key: field("publisher key:")?,
    })
}

impl LabFleet {
    /// Starts one node per spec in namespaces of a new lab (`label`, `subnet`: see
    /// [`Lab::new`]), and waits until every node is connected to every other.
    pub fn start(label: &str, subnet: u8, specs: &[NodeSpec]) -> Result<Self> {
        let mut lab = Lab::new(label, subnet)?;
        let dirs = tempfile::Builder::new().prefix("shoal-faults-").tempdir()?;
        let mut data_dirs = Vec::new();
        let mut identities = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            lab.add_host()?;
            let data = spec
                .data_dir
                .clone()
                .unwrap_or_else(|| dirs.path().join(format!("node-{i}")));
            std::fs::create_dir_all(&data)?;
            identities.push(identity_of(&data)?);
            data_dirs.push(data);
        }
        let mut fleet = Self {
            nodes: Vec::new(),
            identities,
            lab,
            _dirs: dirs,
        };
        for (i, spec) in specs.iter().enumerate() {
            let launch = fleet.launch(i, spec, &data_dirs[i])?;
            let node = ShoalProcess::start_launched(launch)
                .with_context(|| format!("starting node {i}"))?;
            fleet.nodes.push(node);
        }
        fleet.wait_connected(Duration::from_secs(60))?;
        Ok(fleet)
    }

    fn launch(&self, i: usize, spec: &NodeSpec, data: &std::path::Path) -> Result<Launch> {
        let ip = self.lab.host_ip(i);
        let mut args: Vec<String> = vec![
            "--no-mdns".into(),
            "--insecure".into(),
            "--p2p-listen".into(),
            format!("/ip4/{ip}/udp/{P2P_PORT}/quic-v1"),
            "--p2p-listen".into(),
            format!("/ip4/{ip}/tcp/{P2P_PORT}"),
        ];
        for (j, id) in self.identities.iter().enumerate() {
            args.push("--trust".into());
            args.push(format!("{}={TRUSTED_PATTERN}", id.publisher_key));
            if j != i {
                args.push("--peer".into());
                args.push(format!(
                    "/ip4/{}/udp/{P2P_PORT}/quic-v1/p2p/{}",
                    self.lab.host_ip(j),
                    id.peer_id
                ));
            }
        }
        let mut env = Vec::new();
        if let Some(offset) = &spec.clock_offset {
            let lib = faketime_library().context("libfaketime is not installed")?;
            env.push(("LD_PRELOAD".to_owned(), lib.display().to_string()));
            env.push(("FAKETIME".to_owned(), offset.clone()));
            env.push(("FAKETIME_DONT_FAKE_MONOTONIC".to_owned(), "1".to_owned()));
        }
        Ok(Launch {
            prefix: self.lab.exec_prefix(i),
            env,
            listen: format!("{ip}:{REGISTRY_PORT}"),
            args,
            data_dir: Some(data.to_owned()),
        })
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the fleet has no node.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node `i`.
    pub fn node(&self, i: usize) -> &ShoalProcess {
        &self.nodes[i]
    }

    /// Node `i`, to kill or restart it.
    pub fn node_mut(&mut self, i: usize) -> &mut ShoalProcess {
        &mut self.nodes[i]
    }

    /// Every node, mutably (to restart several at once from threads).
    pub fn nodes_mut(&mut self) -> impl Iterator<Item = &mut ShoalProcess> {
        self.nodes.iter_mut()
    }

    /// A registry client for node `i`.
    pub fn client(&self, i: usize) -> RegistryClient {
        RegistryClient::with_timeout(self.nodes[i].addr(), REQUEST_TIMEOUT)
    }

    /// How many peers node `i` says it is connected to (0 when it does not answer).
    pub fn peer_count(&self, i: usize) -> usize {
        RegistryClient::with_timeout(self.nodes[i].addr(), Duration::from_secs(5))
            .get("/_shoal/v1/peers", &[])
            .ok()
            .and_then(|r| r.json().ok())
            .and_then(|v| v["peers"].as_array().map(Vec::len))
            .unwrap_or(0)
    }

    /// What node `i` answers to `GET /_shoal/v1/peers`, for failure messages.
    pub fn peers_raw(&self, i: usize) -> String {
        RegistryClient::with_timeout(self.nodes[i].addr(), Duration::from_secs(5))
            .get("/_shoal/v1/peers", &[])
            .map(|r| String::from_utf8_lossy(&r.body).into_owned())
            .unwrap_or_else(|e| format!("no answer: {e:#}"))
    }

    /// The nodes node `i` says it is connected to (empty when it does not answer).
    pub fn peers_of(&self, i: usize) -> Vec<usize> {
        let Some(list) = RegistryClient::with_timeout(self.nodes[i].addr(), Duration::from_secs(5))
            .get("/_shoal/v1/peers", &[])
            .ok()
            .and_then(|r| r.json().ok())
        else {
            return Vec::new();
        };
        let ids: Vec<&str> = list["peers"]
            .as_array()
            .map(|a| a.iter().filter_map(|p| p["peer_id"].as_str()).collect())
            .unwrap_or_default();
        (0..self.identities.len())
            .filter(|&j| ids.contains(&self.identities[j].peer_id.as_str()))
            .collect()
    }

    /// Waits until every node is connected to every other.
    pub fn wait_connected(&self, timeout: Duration) -> Result<()> {
        let want = self.len().saturating_sub(1);
        wait_until(timeout, "every node to be connected to every other", || {
            (0..self.len()).all(|i| self.peer_count(i) >= want)
        })
        .with_context(|| {
            let counts: Vec<usize> = (0..self.len()).map(|i| self.peer_count(i)).collect();
            format!("peer counts per node: {counts:?}")
        })
    }

    /// The manifest digest `repo:tag` resolves to on node `i`, if it resolves.
    pub fn tag_digest(&self, i: usize, repo: &str, tag: &str) -> Option<String> {
        let resp = RegistryClient::with_timeout(self.nodes[i].addr(), Duration::from_secs(10))
            .head(
                &format!("/v2/{repo}/manifests/{tag}"),
                &[("accept", crate::http::ACCEPT_ANY_MANIFEST)],
            )
            .ok()?;
        (resp.status == 200)
            .then(|| resp.header("docker-content-digest").map(str::to_owned))
            .flatten()
    }

    /// Waits until `repo:tag` resolves to `digest` on every node of `nodes`.
    pub fn wait_tag(
        &self,
        nodes: &[usize],
        repo: &str,
        tag: &str,
        digest: &str,
        timeout: Duration,
    ) -> Result<()> {
        wait_until(
            timeout,
            &format!("{repo}:{tag} = {digest} on nodes {nodes:?}"),
            || {
                nodes
                    .iter()
                    .all(|&i| self.tag_digest(i, repo, tag).as_deref() == Some(digest))
            },
        )
        .with_context(|| {
            let seen: Vec<Option<String>> = nodes
                .iter()
                .map(|&i| self.tag_digest(i, repo, tag))
                .collect();
            format!("{repo}:{tag} per node: {seen:?}")
        })
    }

    /// Node `i`'s log tail, for failure messages.
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        self.nodes[i].log_tail(lines)
    }

    /// Fails unless every node is running.
    pub fn ensure_all_running(&mut self) -> Result<()> {
        for i in 0..self.nodes.len() {
            if !self.nodes[i].is_running() {
                bail!("node {i} is down; its log:\n{}", self.log_tail(i, 60));
            }
        }
        Ok(())
    }

    /// The end of a scenario: every node still running, stopped with SIGTERM (clean exit),
    /// and `shoal fsck` clean on every store.
    pub fn finish(mut self) -> Result<()> {
        self.ensure_all_running()?;
        for i in 0..self.nodes.len() {
            let status = self.nodes[i]
                .terminate()
                .with_context(|| format!("stopping node {i}"))?;
            ensure!(
                status.success(),
                "node {i} exited with {status} on SIGTERM; its log:\n{}",
                self.log_tail(i, 60)
            );
        }
        for i in 0..self.nodes.len() {
            let fsck = self.nodes[i].fsck()?;
            ensure!(
                fsck.success(),
                "fsck of node {i} is not clean:\n{}\nits log:\n{}",
                fsck.describe(),
                self.log_tail(i, 40)
            );
        }
        Ok(())
    }
}

/// A random image: a config and some layers of random bytes, with its OCI manifest.
#[derive(Debug, Clone)]
pub struct TestImage {
    /// The manifest bytes.
    pub manifest: Vec<u8>,
    /// The manifest's digest.
    pub digest: String,
    /// Config and layers: digest and bytes.
    pub blobs: Vec<(String, Arc<Vec<u8>>)>,
}

impl TestImage {
    /// An image whose layers have the given sizes, drawn from `rng`.
    pub fn random(rng: &mut impl RngCore, layer_bytes: &[usize]) -> Self {
        let config = format!(
            "{{\"architecture\":\"amd64\",\"os\":\"linux\",\"rootfs\":{{\"type\":\"layers\",\
             \"diff_ids\":[]}},\"config\":{{}},\"shoal-test\":{}}}",
            rng.random::<u64>()
        )
        .into_bytes();
        let mut blobs = vec![(sha256_digest(&config), Arc::new(config))];
        for &len in layer_bytes {
            let mut data = vec![0u8; len];
            rng.fill_bytes(&mut data);
            blobs.push((sha256_digest(&data), Arc::new(data)));
        }
        let descriptor = |media: &str, (digest, data): &(String, Arc<Vec<u8>>)| serde_json::json!({"mediaType": media, "digest": digest, "size": data.len()});
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": descriptor(OCI_CONFIG, &blobs[0]),
            "layers": blobs[1..].iter().map(|b| descriptor(OCI_LAYER_GZIP, b)).collect::<Vec<_>>(),
        });
        let manifest = serde_json::to_vec(&manifest).unwrap_or_default();
        Self {
            digest: sha256_digest(&manifest),
            manifest,
            blobs,
        }
    }

    /// Total bytes of config and layers.
    pub fn bytes(&self) -> usize {
        self.blobs.iter().map(|(_, d)| d.len()).sum()
    }

    /// Pushes the blobs, then the manifest as `repo:tag`; fails unless each push is
    /// acknowledged (201).
    pub fn push(&self, client: &RegistryClient, repo: &str, tag: &str) -> Result<()> {
        for (_, data) in &self.blobs {
            client.push_blob(repo, data)?;
        }
        let resp = client.put_manifest(repo, tag, OCI_MANIFEST, &self.manifest)?;
        ensure!(
            resp.status == 201,
            "PUT manifest {repo}:{tag} answered:\n{}",
            resp.describe()
        );
        Ok(())
    }

    /// Pulls the image through `client` (by `reference`, a tag or the digest) and checks
    /// every byte: the manifest, then every blob.
    pub fn check_on(&self, client: &RegistryClient, repo: &str, reference: &str) -> Result<()> {
        self.check_on_counting(client, repo, reference, &AtomicUsize::new(0))
    }

    /// Like [`TestImage::check_on`], adding one to `done` after the manifest and after each
    /// blob (so `1 + blobs.len()` when the pull is complete).
    pub fn check_on_counting(
        &self,
        client: &RegistryClient,
        repo: &str,
        reference: &str,
        done: &AtomicUsize,
    ) -> Result<()> {
        let resp = client.get_manifest(repo, reference)?;
        ensure!(
            resp.status == 200 && resp.body == self.manifest,
            "manifest {repo}:{reference} (want {}) answered:\n{}",
            self.digest,
            resp.describe()
        );
        done.fetch_add(1, Ordering::SeqCst);
        for (digest, data) in &self.blobs {
            let resp = client.get_blob(repo, digest)?;
            ensure!(
                resp.status == 200,
                "blob {digest} of {repo} answered:\n{}",
                resp.describe()
            );
            ensure!(
                resp.body.len() == data.len() && resp.body == **data,
                "blob {digest} of {repo}: {} bytes that differ from the {} pushed",
                resp.body.len(),
                data.len()
            );
            done.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }
}

/// A layer size near `mib` MiB that is not a round number (chunk edges get exercised).
pub fn layer_size(rng: &mut impl RngCore, mib: f64) -> usize {
    let base = (mib * 1024.0 * 1024.0) as usize;
    base + rng.random_range(0..4096)
}
