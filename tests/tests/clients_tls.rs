//! Real clients logging in to a node over HTTPS, as on a real network: the node listens on an
//! address of its own (in 198.18.0.0/15, not a loopback address), with a certificate
//! from a test CA the clients are given, and accepts no client without credentials. Its fleet
//! was founded on the data directory before it started (`shoal fleet init` with no node), and
//! the credential is an access token from `shoal token create`: the ECR-style login.
//!
//! - skopeo: `--dest-creds`/`--src-creds` and `--*-cert-dir`: push and pull back, digests kept;
//!   wrong credentials fail.
//! - podman: `podman login` with the token on standard input, then `podman pull`.
//! - docker (when a daemon runs): `docker login --password-stdin`, push, pull, run, with the CA
//!   in `/etc/docker/certs.d/<host:port>/`.
//! - containerd (when one runs): `ctr images pull --user` with the CA.
//! - the PyPI `oras` client: login, push and pull of an artifact, trusting only the CA.
//!
//! Each test needs root and `ip` for its address (SKIP otherwise, outside CI).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use rand::RngCore;
use shoal_tests::tools::assert_layout_matches;
use shoal_tests::{OciImage, ShoalProcess, Tool, require, run, run_ok, seeded_rng};
use tempfile::TempDir;

const CLIENT_TIMEOUT: Duration = Duration::from_secs(300);

/// An address of the test's own on the loopback device (not a loopback address: the node
/// treats its clients as remote), removed on drop. The loopback device is used because the
/// test machines' kernels lack the dummy interface type.
struct Address(String);

impl Address {
    fn add(ip: &str) -> Result<Address> {
        let cidr = format!("{ip}/32");
        let _ = Command::new("ip")
            .args(["addr", "del", &cidr, "dev", "lo"])
            .output();
        run_ok(
            Command::new("ip").args(["addr", "add", &cidr, "dev", "lo"]),
            Duration::from_secs(10),
        )?;
        Ok(Address(cidr))
    }
}

impl Drop for Address {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["addr", "del", &self.0, "dev", "lo"])
            .output();
    }
}

/// A file removed on drop (the CA in docker's certs.d).
struct Removed(PathBuf);

impl Drop for Removed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A node on its own address with HTTPS and a fleet, and a token for it.
struct Secured {
    node: ShoalProcess,
    /// `ip:port`.
    host: String,
    /// A directory holding the CA as `ca.crt` (skopeo's and podman's `--cert-dir`).
    cert_dir: PathBuf,
    token: String,
    work: TempDir,
    image: OciImage,
    _address: Address,
}

/// Makes a CA and a server certificate for `ip`: the CA as `ca.crt` in `clients` (skopeo and
/// podman read every file of a `--cert-dir`, and take a `.key` for a client key), the server's
/// `server.pem` and `server.key` in `server`.
fn certificates(clients: &Path, server_dir: &Path, ip: &str) -> Result<()> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "shoal test CA");
    let ca_cert = ca.self_signed(&ca_key)?;
    let server_key = KeyPair::generate()?;
    let mut server = CertificateParams::new(Vec::<String>::new())?;
    server.subject_alt_names = vec![SanType::IpAddress(ip.parse()?)];
    server.distinguished_name.push(DnType::CommonName, ip);
    let server_cert = server.signed_by(&server_key, &ca_cert, &ca_key)?;
    std::fs::write(clients.join("ca.crt"), ca_cert.pem())?;
    std::fs::write(server_dir.join("server.pem"), server_cert.pem())?;
    std::fs::write(server_dir.join("server.key"), server_key.serialize_pem())?;
    Ok(())
}

impl Secured {
    fn start(test: &str, n: u8) -> Result<Option<Secured>> {
        if !require(test, Tool::NetAdmin) || !require(test, Tool::Skopeo) {
            return Ok(None);
        }
        let (mut rng, _) = seeded_rng(test);
        let work = tempfile::Builder::new().prefix("shoal-tls-").tempdir()?;
        let image = OciImage::build(&work.path().join("image"), 2.0, rng.next_u64())?;
        let ip = format!("198.18.2.{n}");
        let address = Address::add(&ip)?;
        let (cert_dir, server_dir) = (work.path().join("certs"), work.path().join("server"));
        std::fs::create_dir_all(&cert_dir)?;
        std::fs::create_dir_all(&server_dir)?;
        certificates(&cert_dir, &server_dir, &ip)?;
        let mut token = String::new();
        let args = vec![
            "--tls-cert".to_owned(),
            server_dir.join("server.pem").display().to_string(),
            "--tls-key".to_owned(),
            server_dir.join("server.key").display().to_string(),
        ];
        let node = ShoalProcess::start_prepared(&format!("{ip}:0"), &args, |data| {
            ShoalProcess::cli_on(data, &["fleet", "init"])?;
            let out = ShoalProcess::cli_on(
                data,
                &[
                    "token",
                    "create",
                    "--principal",
                    "ci",
                    "--repo",
                    "*",
                    "--actions",
                    "pull,push",
                    "--ttl",
                    "1h",
                ],
            )?;
            token = out.stdout.trim().to_owned();
            Ok(())
        })?;
        ensure!(token.starts_with("shoal1."), "no token");
        Ok(Some(Secured {
            host: node.addr().to_string(),
            node,
            cert_dir,
            token,
            work,
            image,
            _address: address,
        }))
    }

    fn reference(&self, repo: &str) -> String {
        format!("docker://{}/{repo}:1", self.host)
    }

    fn skopeo_push(&self, repo: &str, creds: &str) -> Result<shoal_tests::tools::CmdOutput> {
        run(
            Command::new("skopeo").args([
                "copy",
                "--dest-cert-dir",
                &self.cert_dir.display().to_string(),
                "--dest-creds",
                creds,
                &self.image.skopeo_ref(),
                &self.reference(repo),
            ]),
            CLIENT_TIMEOUT,
        )
    }
}

/// Runs `cmd` with `input` on its standard input.
fn with_stdin(cmd: &mut Command, input: &str) -> Result<std::process::Output> {
    use std::io::Write as _;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())?;
    Ok(child.wait_with_output()?)
}

#[test]
fn skopeo_with_creds_over_https_and_nothing_without() -> Result<()> {
    const TEST: &str = "skopeo_with_creds_over_https_and_nothing_without";
    let Some(s) = Secured::start(TEST, 1)? else {
        return Ok(());
    };
    // Wrong credentials, and none: refused.
    let wrong = s.skopeo_push("team/skopeo", "ci:not-a-token")?;
    ensure!(
        !wrong.success(),
        "a wrong token pushed: {}",
        wrong.describe()
    );
    let anonymous = run(
        Command::new("skopeo").args([
            "copy",
            "--dest-cert-dir",
            &s.cert_dir.display().to_string(),
            &s.image.skopeo_ref(),
            &s.reference("team/skopeo"),
        ]),
        CLIENT_TIMEOUT,
    )?;
    ensure!(!anonymous.success(), "an anonymous client pushed");
    // The token, over HTTPS with the test CA: push and pull back, digests kept.
    let ok = s.skopeo_push("team/skopeo", &format!("ci:{}", s.token))?;
    ensure!(ok.success(), "{}\n{}", ok.describe(), s.node.log_tail(30));
    let out = s.work.path().join("pulled");
    run_ok(
        Command::new("skopeo").args([
            "copy",
            "--src-cert-dir",
            &s.cert_dir.display().to_string(),
            "--src-creds",
            &format!("ci:{}", s.token),
            "--preserve-digests",
            "--dest-oci-accept-uncompressed-layers",
            &s.reference("team/skopeo"),
            &format!("oci:{}:pulled", out.display()),
        ]),
        CLIENT_TIMEOUT,
    )?;
    assert_layout_matches(&out, "pulled", &s.image)?;
    Ok(())
}

#[test]
fn podman_logs_in_with_a_token_over_https_and_pulls() -> Result<()> {
    const TEST: &str = "podman_logs_in_with_a_token_over_https_and_pulls";
    if !require(TEST, Tool::Podman) {
        return Ok(());
    }
    let Some(s) = Secured::start(TEST, 2)? else {
        return Ok(());
    };
    let pushed = s.skopeo_push("team/podman", &format!("ci:{}", s.token))?;
    ensure!(pushed.success(), "{}", pushed.describe());
    let root = s.work.path().join("podman");
    let auth_file = s.work.path().join("podman-auth.json");
    std::fs::write(&auth_file, r#"{"auths":{}}"#)?;
    let podman = |args: &[&str]| {
        let mut cmd = Command::new("podman");
        cmd.arg("--root")
            .arg(root.join("root"))
            .arg("--runroot")
            .arg(root.join("run"))
            .args(["--storage-driver", "vfs", "--events-backend", "none"])
            .args(args)
            .env("REGISTRY_AUTH_FILE", &auth_file);
        cmd
    };
    let cert_dir = s.cert_dir.display().to_string();
    let login = with_stdin(
        &mut podman(&[
            "login",
            "--cert-dir",
            &cert_dir,
            "--username",
            "ci",
            "--password-stdin",
            &s.host,
        ]),
        &s.token,
    )?;
    ensure!(
        login.status.success(),
        "podman login: {}",
        String::from_utf8_lossy(&login.stderr)
    );
    run_ok(
        &mut podman(&[
            "pull",
            "--cert-dir",
            &cert_dir,
            &format!("{}/team/podman:1", s.host),
        ]),
        CLIENT_TIMEOUT,
    )
    .with_context(|| s.node.log_tail(30))?;
    Ok(())
}

#[test]
fn docker_logs_in_with_a_token_over_https_pushes_pulls_and_runs() -> Result<()> {
    const TEST: &str = "docker_logs_in_with_a_token_over_https_pushes_pulls_and_runs";
    if !require(TEST, Tool::DockerDaemon) {
        return Ok(());
    }
    let Some(s) = Secured::start(TEST, 3)? else {
        return Ok(());
    };
    let certs = PathBuf::from("/etc/docker/certs.d").join(&s.host);
    std::fs::create_dir_all(&certs)?;
    let _certs = Removed(certs.clone());
    std::fs::copy(s.cert_dir.join("ca.crt"), certs.join("ca.crt"))?;
    // docker's own credential store, away from the machine's.
    let config = s.work.path().join("docker-config");
    std::fs::create_dir_all(&config)?;
    let docker = |args: &[&str]| {
        let mut cmd = Command::new("docker");
        cmd.arg("--config").arg(&config).args(args);
        cmd
    };
    let image = format!("{}/team/docker:1", s.host);
    let login = with_stdin(
        &mut docker(&["login", "--username", "ci", "--password-stdin", &s.host]),
        &s.token,
    )?;
    ensure!(
        login.status.success(),
        "docker login: {}",
        String::from_utf8_lossy(&login.stderr)
    );
    run_ok(
        Command::new("skopeo").args([
            "copy",
            &s.image.skopeo_ref(),
            &format!("docker-daemon:{image}"),
        ]),
        CLIENT_TIMEOUT,
    )?;
    let cleanup = || {
        let _ = Command::new("docker").args(["rmi", "-f", &image]).output();
    };
    let result = (|| -> Result<()> {
        run_ok(&mut docker(&["push", &image]), CLIENT_TIMEOUT)?;
        run_ok(&mut docker(&["rmi", &image]), CLIENT_TIMEOUT)?;
        run_ok(&mut docker(&["pull", &image]), CLIENT_TIMEOUT)?;
        let out = run_ok(&mut docker(&["run", "--rm", &image]), CLIENT_TIMEOUT)?;
        ensure!(
            out.stdout.trim() == "hello from shoal",
            "docker run printed {:?}",
            out.stdout
        );
        Ok(())
    })();
    cleanup();
    result.with_context(|| s.node.log_tail(40))
}

#[test]
fn ctr_pulls_with_user_over_https() -> Result<()> {
    const TEST: &str = "ctr_pulls_with_user_over_https";
    if !require(TEST, Tool::Containerd) {
        return Ok(());
    }
    let Some(s) = Secured::start(TEST, 4)? else {
        return Ok(());
    };
    let pushed = s.skopeo_push("team/ctr", &format!("ci:{}", s.token))?;
    ensure!(pushed.success(), "{}", pushed.describe());
    let socket = shoal_tests::tools::containerd_socket().context("containerd socket")?;
    // A namespace of the test's own, removed with its images at the end.
    let namespace = format!("shoal-test-{}", std::process::id());
    let ctr = |args: &[&str]| {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(&socket)
            .args(["--namespace", &namespace])
            .args(args);
        cmd
    };
    let reference = format!("{}/team/ctr:1", s.host);
    let ca = s.cert_dir.join("ca.crt").display().to_string();
    let wrong = run(
        &mut ctr(&[
            "images",
            "pull",
            "--tlscacert",
            &ca,
            "--user",
            "ci:not-a-token",
            &reference,
        ]),
        CLIENT_TIMEOUT,
    )?;
    let pulled = run(
        &mut ctr(&[
            "images",
            "pull",
            "--tlscacert",
            &ca,
            "--user",
            &format!("ci:{}", s.token),
            &reference,
        ]),
        CLIENT_TIMEOUT,
    );
    let _ = run(&mut ctr(&["images", "rm", &reference]), CLIENT_TIMEOUT);
    let _ = run(
        &mut ctr(&["content", "prune", "references"]),
        CLIENT_TIMEOUT,
    );
    let _ = run(
        Command::new("ctr")
            .arg("--address")
            .arg(&socket)
            .args(["namespaces", "rm", &namespace]),
        CLIENT_TIMEOUT,
    );
    ensure!(
        !wrong.success(),
        "ctr pulled with a wrong token: {}",
        wrong.describe()
    );
    let pulled = pulled?;
    ensure!(
        pulled.success(),
        "{}\n{}",
        pulled.describe(),
        s.node.log_tail(30)
    );
    Ok(())
}

#[test]
fn oras_logs_in_pushes_and_pulls_over_https() -> Result<()> {
    const TEST: &str = "oras_logs_in_pushes_and_pulls_over_https";
    if !require(TEST, Tool::Oras) {
        return Ok(());
    }
    let Some(s) = Secured::start(TEST, 5)? else {
        return Ok(());
    };
    let script = shoal_tests::tools::scripts_dir().join("oras-login.py");
    let work = s.work.path().join("oras");
    std::fs::create_dir_all(&work)?;
    let ca = s.cert_dir.join("ca.crt");
    // (Wrong credentials are refused as for skopeo above; oras retries them with backoff for
    // minutes, so they are not tried here.)
    let login = |password: &str| {
        run(
            Command::new("python3")
                .arg(&script)
                .arg(&s.host)
                .arg("team/oras")
                .arg(&work)
                .arg("ci")
                .arg(password)
                .arg(&ca),
            CLIENT_TIMEOUT,
        )
    };
    let ok = login(&s.token)?;
    ensure!(ok.success(), "{}\n{}", ok.describe(), s.node.log_tail(30));
    Ok(())
}
