//! Crash test: SIGKILL the real `shoal` binary while pushes are in flight.
//!
//! Each round, two worker threads push over HTTP — monolithic blob uploads
//! (`POST /v2/<name>/blobs/uploads/?digest=` with the body), chunked uploads (POST, PATCH...,
//! PUT) and manifest PUTs by tag — while the main thread waits until a random amount of work
//! has been sent and then SIGKILLs the node, often in the middle of a request body. A push is
//! *acknowledged* when its final response (201) was read before the kill.
//!
//! After every kill: `shoal fsck` must pass on the store as the kill left it; the node
//! restarts on the same data dir; every acknowledged blob must be served byte-identical with
//! the right `Docker-Content-Digest`, every acknowledged tag must resolve to its manifest, and
//! every unacknowledged push must be either absent (404) or whole — never half-written. At
//! the end everything acknowledged in any round is checked again, the node is stopped with
//! SIGTERM (exit 0) and `shoal fsck` must pass once more.
//!
//! Knobs: `SHOAL_TEST_SEED` (replay), `SHOAL_CRASH_ROUNDS` (default 16),
//! `SHOAL_TEST_TARGET=distribution` (run against docker-registry; no fsck then).

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use shoal_tests::http::{Body, OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST, UnexpectedStatus};
use shoal_tests::{RegistryClient, RegistryServer, seeded_rng, sha256_digest, wait_until};

/// Rounds of push-then-kill unless `SHOAL_CRASH_ROUNDS` says otherwise.
const DEFAULT_ROUNDS: u32 = 16;
/// No new round starts after this much time (the whole test stays well under a minute).
const ROUNDS_BUDGET: Duration = Duration::from_secs(30);
/// Worker threads pushing concurrently in each round.
const WORKERS: usize = 2;
/// Bytes a body reader hands out per `read` call; each call is one unit of progress.
const READ_UNIT_BYTES: usize = 16 * 1024;
/// The kill lands after this many more units of progress, at most.
const MAX_UNITS_BEFORE_KILL: u64 = 300;
/// How long the node may go without progress before the test calls it hung.
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(20);
/// Per-request timeout for the workers (a request to a killed node fails at once anyway).
const WORKER_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
const REPOS: [&str; 3] = ["crash/alpha", "crash/beta", "crash/nested/gamma"];

/// One blob push, acknowledged or not.
struct BlobPush {
    repo: &'static str,
    digest: String,
    data: Arc<Vec<u8>>,
    how: &'static str,
    round: u32,
    acked: bool,
}

/// One manifest PUT by tag, acknowledged or not.
struct TagPush {
    repo: &'static str,
    tag: String,
    digest: String,
    manifest: Vec<u8>,
    round: u32,
    acked: bool,
}

/// What the workers attempted and what the node acknowledged.
#[derive(Default)]
struct Journal {
    blobs: Vec<BlobPush>,
    tags: Vec<TagPush>,
    /// Responses no correct registry gives to these requests (not transport errors).
    wrong_answers: Vec<String>,
}

impl Journal {
    fn acked_blobs_in(&self, repo: &str) -> Vec<(String, u64)> {
        self.blobs
            .iter()
            .filter(|b| b.acked && b.repo == repo)
            .map(|b| (b.digest.clone(), b.data.len() as u64))
            .collect()
    }
}

/// Shared between the main thread and the workers of one round.
struct Shared {
    journal: Mutex<Journal>,
    /// Units of work sent so far (requests started and body reads).
    progress: AtomicU64,
    stop: AtomicBool,
    /// Single-POST uploads the registry declined with 202 (then finished with PUT).
    post_fallbacks: AtomicU64,
}

impl Shared {
    fn tick(&self) {
        self.progress.fetch_add(1, Ordering::SeqCst);
    }
}

/// Hands out a slice of a blob in small reads, ticking progress on each.
struct CountingReader {
    data: Arc<Vec<u8>>,
    pos: usize,
    end: usize,
    shared: Arc<Shared>,
}

impl Read for CountingReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(READ_UNIT_BYTES).min(self.end - self.pos);
        if n == 0 {
            return Ok(0);
        }
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        self.shared.tick();
        Ok(n)
    }
}

fn counting_body(
    data: &Arc<Vec<u8>>,
    start: usize,
    end: usize,
    shared: &Arc<Shared>,
) -> Body<'static> {
    Body::Reader {
        len: (end - start) as u64,
        reader: Box::new(CountingReader {
            data: data.clone(),
            pos: start,
            end,
            shared: shared.clone(),
        }),
    }
}

struct Worker {
    id: usize,
    round: u32,
    client: RegistryClient,
    rng: StdRng,
    shared: Arc<Shared>,
    ops: u64,
}

impl Worker {
    fn run(mut self) {
        while !self.shared.stop.load(Ordering::SeqCst) {
            self.ops += 1;
            let repo = REPOS[self.rng.random_range(0..REPOS.len())];
            let choice = self.rng.random_range(0..10);
            // A transport error means the node is gone (or going): the next round restarts it.
            let _ = match choice {
                0..=3 => self.monolithic(repo),
                4..=6 => self.chunked(repo),
                _ => self.manifest(repo),
            };
        }
    }

    fn wrong(&self, what: String) {
        if let Ok(mut j) = self.shared.journal.lock() {
            j.wrong_answers.push(what);
        }
    }

    fn random_blob(&mut self) -> Arc<Vec<u8>> {
        let len = match self.rng.random_range(0..20) {
            0 => 0,
            1..=3 => self.rng.random_range(1..=1024),
            4..=17 => self.rng.random_range(1024..=256 * 1024),
            _ => self.rng.random_range(256 * 1024..=2 * 1024 * 1024),
        };
        let mut data = vec![0u8; len];
        self.rng.fill_bytes(&mut data);
        Arc::new(data)
    }

    /// Records an attempted blob push; returns its index in the journal.
    fn attempt_blob(&self, repo: &'static str, data: &Arc<Vec<u8>>, how: &'static str) -> usize {
        let mut j = self.shared.journal.lock().expect("journal lock");
        j.blobs.push(BlobPush {
            repo,
            digest: sha256_digest(data),
            data: data.clone(),
            how,
            round: self.round,
            acked: false,
        });
        j.blobs.len() - 1
    }

    fn ack_blob(&self, index: usize) {
        self.shared.journal.lock().expect("journal lock").blobs[index].acked = true;
    }

    /// `POST /v2/<repo>/blobs/uploads/?digest=<d>` with the whole blob as the body.
    fn monolithic(&mut self, repo: &'static str) -> Result<()> {
        let data = self.random_blob();
        self.push_monolithic(repo, data, "monolithic").map(|_| ())
    }

    fn push_monolithic(
        &mut self,
        repo: &'static str,
        data: Arc<Vec<u8>>,
        how: &'static str,
    ) -> Result<String> {
        let index = self.attempt_blob(repo, &data, how);
        let digest = sha256_digest(&data);
        self.shared.tick();
        let body = counting_body(&data, 0, data.len(), &self.shared);
        let mut resp = self.client.post_blob(repo, &digest, body)?;
        if resp.status == 202 {
            // The spec lets a registry decline single-POST uploads with 202 and a session;
            // the client then PUTs the whole blob there (Distribution 2.8 does this).
            if let Some(location) = resp.header("location").map(str::to_owned) {
                self.shared.post_fallbacks.fetch_add(1, Ordering::SeqCst);
                self.shared.tick();
                let body = counting_body(&data, 0, data.len(), &self.shared);
                resp = self.client.finish_upload_with(&location, &digest, body)?;
            }
        }
        if resp.status == 201 {
            self.ack_blob(index);
            Ok(digest)
        } else {
            self.wrong(format!(
                "worker {} monolithic upload of {digest} ({} bytes) to {repo}:\n{}",
                self.id,
                data.len(),
                resp.describe()
            ));
            bail!("rejected")
        }
    }

    /// `POST /v2/<repo>/blobs/uploads/`, one to four `PATCH`es, `PUT ?digest=`.
    fn chunked(&mut self, repo: &'static str) -> Result<()> {
        let data = self.random_blob();
        let index = self.attempt_blob(repo, &data, "chunked");
        let digest = sha256_digest(&data);
        let mut cuts: Vec<usize> = (0..self.rng.random_range(0..4))
            .map(|_| self.rng.random_range(0..=data.len()))
            .collect();
        cuts.push(0);
        cuts.push(data.len());
        cuts.sort_unstable();
        cuts.dedup();
        self.shared.tick();
        let mut location = match self.client.start_upload(repo) {
            Ok(l) => l,
            Err(e) if is_http_error(&e) => {
                self.wrong(format!("worker {} POST upload to {repo}: {e:#}", self.id));
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        let mut offset = 0;
        for pair in cuts.windows(2) {
            let (start, end) = (pair[0], pair[1]);
            self.shared.tick();
            let body = counting_body(&data, start, end, &self.shared);
            location = match self.client.patch_chunk(&location, offset, body) {
                Ok(l) => l,
                Err(e) if is_http_error(&e) => {
                    self.wrong(format!(
                        "worker {} chunk {start}..{end} of {digest}: {e:#}",
                        self.id
                    ));
                    return Err(e);
                }
                Err(e) => return Err(e),
            };
            offset = end as u64;
        }
        self.shared.tick();
        let resp = self.client.finish_upload(&location, &digest)?;
        if resp.status == 201 {
            self.ack_blob(index);
            Ok(())
        } else {
            self.wrong(format!(
                "worker {} closing chunked upload of {digest} ({} bytes, cuts {cuts:?}):\n{}",
                self.id,
                data.len(),
                resp.describe()
            ));
            bail!("rejected")
        }
    }

    /// Pushes a config blob, then `PUT /v2/<repo>/manifests/<tag>` naming it and 1-3 layers
    /// the node already acknowledged in that repo.
    fn manifest(&mut self, repo: &'static str) -> Result<()> {
        let mut layers = self
            .shared
            .journal
            .lock()
            .expect("journal lock")
            .acked_blobs_in(repo);
        if layers.is_empty() {
            let data = self.random_blob();
            let size = data.len() as u64;
            let digest = self.push_monolithic(repo, data, "layer for a manifest")?;
            layers.push((digest, size));
        }
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": []},
            "shoal-crash-test": self.rng.next_u64().to_string(),
        }))?;
        let config_len = config.len();
        let config_digest = self.push_monolithic(repo, Arc::new(config), "config")?;
        let count = self.rng.random_range(1..=3.min(layers.len()));
        let chosen: Vec<serde_json::Value> = (0..count)
            .map(|_| {
                let (digest, size) = &layers[self.rng.random_range(0..layers.len())];
                serde_json::json!({"mediaType": OCI_LAYER_GZIP, "digest": digest, "size": size})
            })
            .collect();
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_len},
            "layers": chosen,
        }))?;
        let digest = sha256_digest(&manifest);
        let tag = format!("r{}-w{}-{}", self.round, self.id, self.ops);
        let index = {
            let mut j = self.shared.journal.lock().expect("journal lock");
            j.tags.push(TagPush {
                repo,
                tag: tag.clone(),
                digest: digest.clone(),
                manifest: manifest.clone(),
                round: self.round,
                acked: false,
            });
            j.tags.len() - 1
        };
        self.shared.tick();
        let resp = self
            .client
            .put_manifest(repo, &tag, OCI_MANIFEST, &manifest)?;
        if resp.status == 201 {
            self.shared.journal.lock().expect("journal lock").tags[index].acked = true;
            Ok(())
        } else {
            self.wrong(format!(
                "worker {} PUT manifest {repo}:{tag} ({digest}):\n{}\nmanifest: {}",
                self.id,
                resp.describe(),
                String::from_utf8_lossy(&manifest)
            ));
            bail!("rejected")
        }
    }
}

/// Whether an error is an answer from the node (a wrong status), not a transport failure.
fn is_http_error(e: &anyhow::Error) -> bool {
    e.downcast_ref::<UnexpectedStatus>().is_some()
}

/// Checks one blob after a restart. Acknowledged: must be whole; otherwise whole or 404.
fn check_blob(client: &RegistryClient, push: &BlobPush) -> Result<()> {
    let what = format!(
        "{} blob {} ({} bytes, {}, round {}) in {}",
        if push.acked {
            "acknowledged"
        } else {
            "unacknowledged"
        },
        push.digest,
        push.data.len(),
        push.how,
        push.round,
        push.repo
    );
    let resp = client.get_blob(push.repo, &push.digest)?;
    match resp.status {
        200 => {
            ensure!(
                resp.body.len() == push.data.len() && resp.body == *push.data,
                "{what}: served {} bytes that differ from what was pushed (sha256 {})",
                resp.body.len(),
                sha256_digest(&resp.body)
            );
            ensure!(
                resp.header("docker-content-digest") == Some(push.digest.as_str()),
                "{what}: GET has Docker-Content-Digest {:?}",
                resp.header("docker-content-digest")
            );
            let head = client.head(&format!("/v2/{}/blobs/{}", push.repo, push.digest), &[])?;
            ensure!(
                head.status == 200,
                "{what}: GET 200 but HEAD:\n{}",
                head.describe()
            );
            ensure!(
                head.header("content-length") == Some(push.data.len().to_string().as_str()),
                "{what}: HEAD Content-Length {:?}",
                head.header("content-length")
            );
        }
        404 if !push.acked => {}
        _ => bail!("{what}: GET answered\n{}", resp.describe()),
    }
    Ok(())
}

/// Checks one tag after a restart. Acknowledged: must resolve to its manifest; otherwise
/// resolve to it or be unknown (404).
fn check_tag(client: &RegistryClient, push: &TagPush) -> Result<()> {
    let what = format!(
        "{} tag {}:{} (manifest {}, round {})",
        if push.acked {
            "acknowledged"
        } else {
            "unacknowledged"
        },
        push.repo,
        push.tag,
        push.digest,
        push.round
    );
    let accept = [("accept", OCI_MANIFEST)];
    let resp = client.get(
        &format!("/v2/{}/manifests/{}", push.repo, push.tag),
        &accept,
    )?;
    match resp.status {
        200 => {
            ensure!(
                resp.body == push.manifest,
                "{what}: served a different manifest:\n{}",
                resp.describe()
            );
            ensure!(
                resp.header("docker-content-digest") == Some(push.digest.as_str()),
                "{what}: Docker-Content-Digest {:?}",
                resp.header("docker-content-digest")
            );
            let by_digest = client.get(
                &format!("/v2/{}/manifests/{}", push.repo, push.digest),
                &accept,
            )?;
            ensure!(
                by_digest.status == 200 && by_digest.body == push.manifest,
                "{what}: GET by digest:\n{}",
                by_digest.describe()
            );
        }
        404 if !push.acked => {}
        _ => bail!("{what}: GET answered\n{}", resp.describe()),
    }
    Ok(())
}

/// All tags of `repo`, following `Link` pagination.
fn list_tags(client: &RegistryClient, repo: &str) -> Result<Vec<String>> {
    let mut tags = Vec::new();
    let mut next = Some(format!("/v2/{repo}/tags/list"));
    let mut pages = 0;
    while let Some(path) = next.take() {
        pages += 1;
        ensure!(pages < 1000, "tags/list of {repo}: more than 1000 pages");
        let resp = client.get(&path, &[])?;
        if resp.status == 404 {
            break; // A repository with no tag yet may be unknown.
        }
        ensure!(resp.status == 200, "GET {path}:\n{}", resp.describe());
        let body = resp.json()?;
        if let Some(list) = body["tags"].as_array() {
            tags.extend(list.iter().filter_map(|t| t.as_str().map(str::to_owned)));
        }
        next = resp.header("link").and_then(|link| {
            let start = link.find('<')? + 1;
            let end = link.find('>')?;
            Some(link.get(start..end)?.to_owned())
        });
    }
    Ok(tags)
}

/// Checks everything in `journal` that `filter` selects against the running node.
fn verify(
    server: &RegistryServer,
    journal: &Journal,
    filter: impl Fn(u32) -> bool,
) -> Result<(usize, usize)> {
    let client = server.client();
    let mut checked = (0, 0);
    for push in journal.blobs.iter().filter(|b| filter(b.round)) {
        check_blob(&client, push)?;
        checked.0 += 1;
    }
    let mut listed: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for push in journal.tags.iter().filter(|t| filter(t.round)) {
        check_tag(&client, push)?;
        checked.1 += 1;
        if push.acked {
            if !listed.contains_key(push.repo) {
                listed.insert(push.repo, list_tags(&client, push.repo)?);
            }
            ensure!(
                listed[push.repo].contains(&push.tag),
                "acknowledged tag {}:{} missing from tags/list",
                push.repo,
                push.tag
            );
        }
    }
    Ok(checked)
}

fn fsck_must_pass(server: &RegistryServer, when: &str) -> Result<()> {
    if let Some(shoal) = server.as_shoal() {
        let out = shoal.fsck()?;
        ensure!(
            out.success(),
            "shoal fsck {when} failed:\n{}",
            out.describe()
        );
    }
    Ok(())
}

#[test]
fn crash_acknowledged_pushes_survive_sigkill() -> Result<()> {
    let (mut rng, seed) = seeded_rng("crash_acknowledged_pushes_survive_sigkill");
    let rounds: u32 = std::env::var("SHOAL_CRASH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_ROUNDS);
    let mut server = RegistryServer::start_from_env()?;
    eprintln!("crash test against {} ({rounds} rounds)", server.name());
    let mut journal = Journal::default();
    let started = Instant::now();
    let mut rounds_run = 0;
    let mut post_fallbacks = 0;

    for round in 0..rounds {
        if started.elapsed() > ROUNDS_BUDGET {
            eprintln!("round budget spent after {round} rounds");
            break;
        }
        rounds_run += 1;
        let shared = Arc::new(Shared {
            journal: Mutex::new(std::mem::take(&mut journal)),
            progress: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            post_fallbacks: AtomicU64::new(0),
        });
        let addr = server.addr();
        let workers: Vec<_> = (0..WORKERS)
            .map(|id| {
                let worker = Worker {
                    id,
                    round,
                    client: RegistryClient::with_timeout(addr, WORKER_REQUEST_TIMEOUT),
                    rng: StdRng::seed_from_u64(rng.next_u64()),
                    shared: shared.clone(),
                    ops: 0,
                };
                std::thread::spawn(move || worker.run())
            })
            .collect();

        let target = rng.random_range(1..=MAX_UNITS_BEFORE_KILL);
        let progressed = wait_until(PROGRESS_TIMEOUT, "the workers to make progress", || {
            shared.progress.load(Ordering::SeqCst) >= target
        });
        let died_on_its_own = !server.is_running();
        server.kill_hard();
        shared.stop.store(true, Ordering::SeqCst);
        for worker in workers {
            worker.join().expect("worker thread panicked");
        }
        let shared = Arc::try_unwrap(shared)
            .ok()
            .context("workers still hold the journal")?;
        post_fallbacks += shared.post_fallbacks.load(Ordering::SeqCst);
        journal = shared.journal.into_inner().expect("journal lock");
        if died_on_its_own {
            bail!(
                "round {round}: the node exited before it was killed (seed {seed}); log:\n{}",
                server.log_tail(60)
            );
        }
        if let Err(e) = progressed {
            bail!(
                "round {round}: the node stopped answering (seed {seed}): {e:#}\nlog:\n{}",
                server.log_tail(60)
            );
        }
        if !journal.wrong_answers.is_empty() {
            bail!(
                "round {round}: the node answered valid requests wrongly (seed {seed}):\n{}\nlog:\n{}",
                journal.wrong_answers.join("\n---\n"),
                server.log_tail(60)
            );
        }
        let acked = journal
            .blobs
            .iter()
            .filter(|b| b.round == round && b.acked)
            .count();
        let tried = journal.blobs.iter().filter(|b| b.round == round).count();
        let tags = journal
            .tags
            .iter()
            .filter(|t| t.round == round && t.acked)
            .count();
        eprintln!(
            "round {round} ({:.1} s): killed after {target} units; {acked}/{tried} blobs and \
             {tags} tags acknowledged",
            started.elapsed().as_secs_f64()
        );

        fsck_must_pass(
            &server,
            &format!("after the kill in round {round} (seed {seed})"),
        )?;
        server
            .restart()
            .with_context(|| format!("restart after round {round} (seed {seed})"))?;
        verify(&server, &journal, |r| r == round)
            .with_context(|| format!("after the kill in round {round} (seed {seed})"))?;
    }

    let (blobs, tags) = verify(&server, &journal, |_| true)
        .with_context(|| format!("final check (seed {seed})"))?;
    let acked_blobs = journal.blobs.iter().filter(|b| b.acked).count();
    let acked_tags = journal.tags.iter().filter(|t| t.acked).count();
    eprintln!(
        "{rounds_run} rounds ({:.1} s): checked {blobs} blobs ({acked_blobs} acknowledged) and \
         {tags} tags ({acked_tags} acknowledged)",
        started.elapsed().as_secs_f64()
    );
    if post_fallbacks > 0 {
        eprintln!(
            "note: {} declined {post_fallbacks} single-POST uploads with 202 (allowed by the spec)",
            server.name()
        );
    }
    ensure!(
        acked_blobs > 0,
        "no blob push was ever acknowledged: the test tested nothing (seed {seed})"
    );

    if let RegistryServer::Shoal(shoal) = &mut server {
        let status = shoal.terminate()?;
        ensure!(
            status.success(),
            "shoal exited with {status} on SIGTERM; log:\n{}",
            shoal.log_tail(40)
        );
    } else {
        server.kill_hard();
    }
    fsck_must_pass(&server, &format!("after a clean stop (seed {seed})"))?;
    eprintln!("done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
