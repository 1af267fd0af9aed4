//! Real registry clients against the real `shoal` binary.
//!
//! Each test builds a two-layer image locally (busybox-static + a random layer, see
//! `tests/scripts/make-oci-image.py`), starts its own node on a loopback port and drives one
//! client: skopeo (push and pull back, digests preserved), podman (pull into a temp root),
//! the PyPI `oras` client (artifact + referrer, then the referrers API), and docker (push,
//! pull, run) when a daemon is reachable.
//!
//! A missing tool prints `SKIP: <test>: <tool> not found` and the test returns early; in CI
//! only a missing docker daemon may skip. `SHOAL_TEST_TARGET=distribution` runs the same tests
//! against Debian's docker-registry to check the tests themselves.

use shoal_tests::tools::assert_layout_matches;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use rand::RngCore;
use shoal_tests::http::{OCI_INDEX, OCI_MANIFEST};
use shoal_tests::{
    OciImage, RegistryClient, RegistryServer, Tool, require, run_ok, seeded_rng, sha256_digest,
};
use tempfile::TempDir;

/// Size of the random layer of the test image.
const RANDOM_LAYER_MIB: f64 = 8.0;
/// Upper bound for one client command (push, pull, run).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(300);

/// A fresh temp dir, a seeded test image in it, and a running registry.
struct Setup {
    work: TempDir,
    image: OciImage,
    server: RegistryServer,
    seed: u64,
}

impl Setup {
    fn new(test: &str) -> Result<Self> {
        let (mut rng, seed) = seeded_rng(test);
        let work = tempfile::Builder::new()
            .prefix("shoal-clients-")
            .tempdir()?;
        let image = OciImage::build(&work.path().join("image"), RANDOM_LAYER_MIB, rng.next_u64())?;
        let server = RegistryServer::start_from_env()?;
        eprintln!("{test}: registry {} at {}", server.name(), server.addr());
        Ok(Self {
            work,
            image,
            server,
            seed,
        })
    }

    fn client(&self) -> RegistryClient {
        self.server.client()
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.work.path().join(name)
    }

    /// `host:port/<repo>:<tag>` as a `docker://` reference.
    fn docker_ref(&self, repo: &str, tag: &str) -> String {
        format!("docker://{}/{repo}:{tag}", self.server.addr())
    }

    /// Pushes the test image with skopeo to `<repo>:<tag>`.
    fn skopeo_push(&self, repo: &str, tag: &str) -> Result<()> {
        run_ok(
            Command::new("skopeo").args([
                "copy",
                "--dest-tls-verify=false",
                &self.image.skopeo_ref(),
                &self.docker_ref(repo, tag),
            ]),
            CLIENT_TIMEOUT,
        )
        .with_context(|| self.context("skopeo push"))?;
        Ok(())
    }

    /// Seed and server log, appended to failures.
    fn context(&self, what: &str) -> String {
        format!(
            "{what} failed (seed {}); {} log tail:\n{}",
            self.seed,
            self.server.name(),
            self.server.log_tail(40)
        )
    }
}

/// Checks that the registry serves `repo:tag` as exactly the local image: manifest bytes and
/// digest, and every blob byte for byte.
fn assert_registry_has_image(
    client: &RegistryClient,
    repo: &str,
    tag: &str,
    image: &OciImage,
) -> Result<()> {
    let local_manifest = image.read_blob(&image.manifest.digest)?;
    let resp = client.get(
        &format!("/v2/{repo}/manifests/{tag}"),
        &[("accept", OCI_MANIFEST)],
    )?;
    ensure!(
        resp.status == 200,
        "GET manifest {repo}:{tag}:\n{}",
        resp.describe()
    );
    ensure!(
        resp.body == local_manifest,
        "manifest {repo}:{tag} differs from the pushed one:\n{}",
        resp.describe()
    );
    ensure!(
        resp.header("docker-content-digest") == Some(image.manifest.digest.as_str()),
        "manifest {repo}:{tag}: Docker-Content-Digest {:?}, expected {}",
        resp.header("docker-content-digest"),
        image.manifest.digest
    );
    ensure!(
        resp.header("content-type") == Some(OCI_MANIFEST),
        "manifest {repo}:{tag}: Content-Type {:?}",
        resp.header("content-type")
    );
    for blob in [&image.config].into_iter().chain(image.layers.iter()) {
        let resp = client.get_blob(repo, &blob.digest)?;
        ensure!(
            resp.status == 200,
            "GET blob {}:\n{}",
            blob.digest,
            resp.describe()
        );
        ensure!(
            sha256_digest(&resp.body) == blob.digest && resp.body.len() as u64 == blob.size,
            "blob {} served with {} bytes hashing to {}",
            blob.digest,
            resp.body.len(),
            sha256_digest(&resp.body)
        );
    }
    let tags = client.get(&format!("/v2/{repo}/tags/list"), &[])?;
    ensure!(tags.status == 200, "tags/list:\n{}", tags.describe());
    let listed = tags.json()?;
    ensure!(
        listed["tags"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t.as_str() == Some(tag))),
        "tags/list of {repo} lacks {tag}: {listed}"
    );
    Ok(())
}

#[test]
fn skopeo_push_and_pull_preserve_digests() -> Result<()> {
    const TEST: &str = "skopeo_push_and_pull_preserve_digests";
    if !require(TEST, Tool::Skopeo) {
        return Ok(());
    }
    let setup = Setup::new(TEST)?;
    setup.skopeo_push("test/skopeo", "1")?;
    assert_registry_has_image(&setup.client(), "test/skopeo", "1", &setup.image)
        .with_context(|| setup.context("checking the pushed image"))?;

    let raw = run_ok(
        Command::new("skopeo").args([
            "inspect",
            "--raw",
            "--tls-verify=false",
            &setup.docker_ref("test/skopeo", "1"),
        ]),
        CLIENT_TIMEOUT,
    )?;
    ensure!(
        raw.stdout.as_bytes() == setup.image.read_blob(&setup.image.manifest.digest)?,
        "skopeo inspect --raw differs from the pushed manifest:\n{}",
        raw.stdout
    );

    let out = setup.path("pulled");
    run_ok(
        Command::new("skopeo").args([
            "copy",
            "--src-tls-verify=false",
            "--preserve-digests",
            "--dest-oci-accept-uncompressed-layers",
            &setup.docker_ref("test/skopeo", "1"),
            &format!("oci:{}:pulled", out.display()),
        ]),
        CLIENT_TIMEOUT,
    )
    .with_context(|| setup.context("skopeo pull"))?;
    assert_layout_matches(&out, "pulled", &setup.image)?;

    // Pull by digest as well: the manifest must be addressable by what it hashes to.
    let by_digest = setup.path("pulled-by-digest");
    run_ok(
        Command::new("skopeo").args([
            "copy",
            "--src-tls-verify=false",
            "--preserve-digests",
            &format!(
                "docker://{}/test/skopeo@{}",
                setup.server.addr(),
                setup.image.manifest.digest
            ),
            &format!("oci:{}:bydigest", by_digest.display()),
        ]),
        CLIENT_TIMEOUT,
    )
    .with_context(|| setup.context("skopeo pull by digest"))?;
    assert_layout_matches(&by_digest, "bydigest", &setup.image)?;

    // A second push of the same image finds every blob present and changes nothing.
    setup.skopeo_push("test/skopeo", "2")?;
    assert_registry_has_image(&setup.client(), "test/skopeo", "2", &setup.image)?;
    Ok(())
}

#[test]
fn podman_pulls_from_shoal() -> Result<()> {
    const TEST: &str = "podman_pulls_from_shoal";
    if !require(TEST, Tool::Skopeo) || !require(TEST, Tool::Podman) {
        return Ok(());
    }
    let setup = Setup::new(TEST)?;
    setup.skopeo_push("test/podman", "1")?;
    let root = setup.path("podman-root");
    let runroot = setup.path("podman-run");
    let tmpdir = setup.path("podman-tmp");
    std::fs::create_dir_all(&tmpdir)?;
    let auth_file = setup.path("podman-auth.json");
    std::fs::write(&auth_file, r#"{"auths":{}}"#)?;
    let podman = |args: &[&str]| {
        let mut cmd = Command::new("podman");
        cmd.arg("--root")
            .arg(&root)
            .arg("--runroot")
            .arg(&runroot)
            .arg("--tmpdir")
            .arg(&tmpdir)
            .args(["--storage-driver", "vfs", "--events-backend", "none"])
            .args(args)
            // Keep podman away from the user's registries and auth files.
            .env("REGISTRY_AUTH_FILE", &auth_file);
        cmd
    };
    let image = format!("{}/test/podman:1", setup.server.addr());
    run_ok(
        &mut podman(&["pull", "--tls-verify=false", &image]),
        CLIENT_TIMEOUT,
    )
    .with_context(|| setup.context("podman pull"))?;
    let inspect = run_ok(
        &mut podman(&["image", "inspect", "--format", "{{.Digest}}", &image]),
        CLIENT_TIMEOUT,
    )?;
    ensure!(
        inspect.stdout.trim() == setup.image.manifest.digest,
        "podman sees digest {:?}, pushed {}",
        inspect.stdout.trim(),
        setup.image.manifest.digest
    );
    let by_digest = format!(
        "{}/test/podman@{}",
        setup.server.addr(),
        setup.image.manifest.digest
    );
    run_ok(
        &mut podman(&["pull", "--tls-verify=false", &by_digest]),
        CLIENT_TIMEOUT,
    )
    .with_context(|| setup.context("podman pull by digest"))?;
    // vfs layers are plain directories: removing them leaves nothing mounted behind.
    run_ok(&mut podman(&["rmi", "--all", "--force"]), CLIENT_TIMEOUT)?;
    Ok(())
}

#[test]
fn oras_artifact_and_referrer_round_trip() -> Result<()> {
    const TEST: &str = "oras_artifact_and_referrer_round_trip";
    if !require(TEST, Tool::Oras) {
        return Ok(());
    }
    let setup = Setup::new(TEST)?;
    let work = setup.path("oras");
    std::fs::create_dir_all(&work)?;
    let script = shoal_tests::tools::scripts_dir().join("oras-roundtrip.py");
    let out = run_ok(
        Command::new("python3")
            .arg(&script)
            .arg(setup.server.addr().to_string())
            .arg("test/oras")
            .arg(&work),
        CLIENT_TIMEOUT,
    )
    .with_context(|| setup.context("oras push/pull"))?;
    let summary: serde_json::Value = serde_json::from_str(
        out.stdout
            .lines()
            .last()
            .context("oras-roundtrip.py printed nothing")?,
    )?;
    let artifact = summary["artifact"]["digest"]
        .as_str()
        .context("artifact digest")?;
    let referrer = &summary["referrer"];
    let referrer_digest = referrer["digest"].as_str().context("referrer digest")?;
    let artifact_type = referrer["artifactType"].as_str().context("artifactType")?;

    if let RegistryServer::Distribution(_) = setup.server {
        eprintln!("{TEST}: distribution 2.8 has no referrers API; skipping that part");
        return Ok(());
    }
    ensure!(
        referrer["oci_subject_header"].as_str() == Some(artifact),
        "PUT of a manifest with a subject must answer OCI-Subject: {artifact}, got {}",
        referrer["oci_subject_header"]
    );

    let client = setup.client();
    let resp = client.get(&format!("/v2/test/oras/referrers/{artifact}"), &[])?;
    ensure!(resp.status == 200, "GET referrers:\n{}", resp.describe());
    ensure!(
        resp.header("content-type")
            .is_some_and(|t| t.starts_with(OCI_INDEX)),
        "referrers Content-Type {:?}",
        resp.header("content-type")
    );
    let index = resp.json()?;
    let manifests = index["manifests"]
        .as_array()
        .with_context(|| format!("referrers index without manifests: {index}"))?;
    let entry = manifests
        .iter()
        .find(|d| d["digest"].as_str() == Some(referrer_digest))
        .with_context(|| format!("referrers of {artifact} lack {referrer_digest}: {index}"))?;
    ensure!(
        entry["mediaType"].as_str() == Some(OCI_MANIFEST)
            && entry["size"].as_u64() == referrer["size"].as_u64()
            && entry["artifactType"].as_str() == Some(artifact_type),
        "referrer descriptor is wrong: {entry}"
    );

    // Filtering is optional; when the registry says it filtered, the filter must hold.
    let filtered = client.get(
        &format!("/v2/test/oras/referrers/{artifact}?artifactType=application/x-none"),
        &[],
    )?;
    ensure!(
        filtered.status == 200,
        "filtered referrers:\n{}",
        filtered.describe()
    );
    if filtered
        .header("oci-filters-applied")
        .is_some_and(|f| f.contains("artifactType"))
    {
        ensure!(
            filtered.json()?["manifests"]
                .as_array()
                .is_some_and(Vec::is_empty),
            "artifactType filter applied but results remain:\n{}",
            filtered.describe()
        );
    }

    // A digest nobody refers to has an empty list, not a 404.
    let nobody = format!("sha256:{}", "0".repeat(64));
    let empty = client.get(&format!("/v2/test/oras/referrers/{nobody}"), &[])?;
    ensure!(
        empty.status == 200
            && empty.json()?["manifests"]
                .as_array()
                .is_some_and(Vec::is_empty),
        "referrers of an unknown digest must be an empty index:\n{}",
        empty.describe()
    );
    Ok(())
}

/// Removes the docker images a test created, even when it fails.
struct DockerImages(Vec<String>);

impl Drop for DockerImages {
    fn drop(&mut self) {
        for image in &self.0 {
            let _ = shoal_tests::run(
                Command::new("docker").args(["rmi", "--force", image]),
                Duration::from_secs(60),
            );
        }
    }
}

#[test]
fn docker_push_pull_and_run() -> Result<()> {
    const TEST: &str = "docker_push_pull_and_run";
    if !require(TEST, Tool::Skopeo) || !require(TEST, Tool::DockerDaemon) {
        return Ok(());
    }
    let setup = Setup::new(TEST)?;
    // docker trusts plain HTTP for localhost registries without configuration.
    let image = format!(
        "localhost:{}/test/docker-{:x}:1",
        setup.server.addr().port(),
        setup.seed
    );
    let _cleanup = DockerImages(vec![image.clone()]);
    let docker = |args: &[&str]| {
        let mut cmd = Command::new("docker");
        cmd.args(args);
        cmd
    };
    run_ok(
        Command::new("skopeo").args([
            "copy",
            &setup.image.skopeo_ref(),
            &format!("docker-daemon:{image}"),
        ]),
        CLIENT_TIMEOUT,
    )?;
    run_ok(&mut docker(&["push", &image]), CLIENT_TIMEOUT)
        .with_context(|| setup.context("docker push"))?;
    run_ok(&mut docker(&["rmi", &image]), CLIENT_TIMEOUT)?;
    run_ok(&mut docker(&["pull", &image]), CLIENT_TIMEOUT)
        .with_context(|| setup.context("docker pull"))?;
    let out = run_ok(&mut docker(&["run", "--rm", &image]), CLIENT_TIMEOUT)
        .with_context(|| setup.context("docker run"))?;
    ensure!(
        out.stdout.trim() == "hello from shoal",
        "docker run printed {:?}",
        out.stdout
    );
    Ok(())
}
