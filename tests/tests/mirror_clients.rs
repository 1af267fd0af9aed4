//! Real clients pulling through a node in mirror mode, from a stand-in upstream (Debian's
//! docker-registry on loopback; no internet): containerd (`ctr images pull --hosts-dir` with
//! the files `shoal mirror containerd` writes, so requests carry `?ns=`), docker with
//! `registry-mirrors` (a second, private dockerd; the host's daemon is never touched), and the
//! upstream's credentials, which must never reach a log or another node's data directory.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use rand::RngCore;
use shoal_tests::process::LOOPBACK_P2P_ARGS;
use shoal_tests::standin::{StandIn, dir_contains};
use shoal_tests::tools::{command_line, containerd_socket, find_in_path, wait_child};
use shoal_tests::{
    Launch, OciImage, ShoalProcess, Tool, require, run, run_ok, seeded_rng, wait_until,
};

const CLIENT_TIMEOUT: Duration = Duration::from_secs(300);
/// The name nodes and clients know the stand-in by.
const UPSTREAM: &str = "upstream.test";
/// The containerd namespaces the tests pull into (and remove afterwards) start with this;
/// each test has its own, so that one's clean-up never takes another's leases.
const CTR_NAMESPACE: &str = "shoal-mirror-test";

/// The containerd namespace of the test that calls it `name`, in this test process.
fn ctr_namespace(name: &str) -> String {
    format!("{CTR_NAMESPACE}-{name}-{}", std::process::id())
}
/// docker's own containerd on this kind of machine, shared by the private dockerd.
const DOCKER_CONTAINERD: &str = "/run/docker/containerd/containerd.sock";

/// A node started with the config file `config` (written next to nothing the node owns) and
/// extra environment.
fn node_with_config(
    config: &str,
    env: &[(&str, &str)],
) -> Result<(ShoalProcess, tempfile::TempDir)> {
    let dir = tempfile::Builder::new()
        .prefix("shoal-mirror-cfg-")
        .tempdir()?;
    let path = dir.path().join("config.toml");
    std::fs::write(&path, config)?;
    let mut args: Vec<String> = LOOPBACK_P2P_ARGS.iter().map(|s| (*s).to_owned()).collect();
    args.extend(["--config".to_owned(), path.display().to_string()]);
    let node = ShoalProcess::start_launched(Launch {
        listen: "127.0.0.1:0".into(),
        args,
        env: env
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect(),
        ..Launch::default()
    })?;
    Ok((node, dir))
}

fn config_path(dir: &tempfile::TempDir) -> String {
    dir.path().join("config.toml").display().to_string()
}

/// `[[upstream]]` for the stand-in, as `name`.
fn upstream_table(name: &str, standin: &StandIn) -> String {
    format!(
        "[[upstream]]\nname = \"{name}\"\nurl = \"{}\"\ninsecure = true\ntimeout_ms = 2000\n",
        standin.url()
    )
}

/// A small image that runs (busybox), built for this test.
fn small_image(rng: &mut impl RngCore, work: &Path) -> Result<OciImage> {
    OciImage::build(&work.join("image"), 0.25, rng.next_u64())
}

/// Checks that the stand-in served every blob of `image` (as `repo`) exactly once.
fn served_once(standin: &StandIn, repo: &str, image: &OciImage) -> Result<()> {
    for blob in std::iter::once(&image.config).chain(&image.layers) {
        let n = standin.blob_gets(repo, &blob.digest);
        ensure!(
            n == 1,
            "the upstream served {} {n} times, not once; its log:\n{}",
            blob.digest,
            standin.log()
        );
    }
    Ok(())
}

/// Checks that `node` holds `repo:tag` as `image` with the upstream stopped: the fleet, not
/// the upstream, serves it now.
fn node_holds(node: &ShoalProcess, repo: &str, tag: &str, image: &OciImage) -> Result<()> {
    let r = node.client().get_manifest(repo, tag)?;
    ensure!(
        r.status == 200
            && r.header("docker-content-digest") == Some(image.manifest.digest.as_str()),
        "the node does not hold {repo}:{tag}: {}; its log:\n{}",
        r.describe(),
        node.log_tail(40)
    );
    Ok(())
}

/// Removes what a test pulled into its containerd namespace ([`ctr_namespace`]), and the
/// namespace, even when it fails.
struct CtrCleanup {
    socket: PathBuf,
    namespace: String,
}

impl CtrCleanup {
    fn new(socket: impl Into<PathBuf>, namespace: String) -> CtrCleanup {
        CtrCleanup {
            socket: socket.into(),
            namespace,
        }
    }

    fn ctr(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(&self.socket)
            .args(["-n", &self.namespace])
            .args(args);
        cmd
    }
}

impl Drop for CtrCleanup {
    fn drop(&mut self) {
        let t = Duration::from_secs(60);
        // Leases (docker holds its pulls' content with them) first: they keep content alive.
        if let Ok(out) = run(&mut self.ctr(&["leases", "ls", "-q"]), t) {
            for lease in out.stdout.lines().filter(|l| !l.is_empty()) {
                let _ = run(&mut self.ctr(&["leases", "rm", lease]), t);
            }
        }
        if let Ok(out) = run(&mut self.ctr(&["images", "ls", "-q"]), t) {
            for image in out.stdout.lines().filter(|l| !l.is_empty()) {
                let _ = run(&mut self.ctr(&["images", "rm", "--sync", image]), t);
            }
        }
        // What the garbage collector left: snapshots of every snapshotter used, then content.
        for snapshotter in ["native", "overlayfs"] {
            if let Ok(out) = run(
                &mut self.ctr(&["snapshots", "--snapshotter", snapshotter, "ls"]),
                t,
            ) {
                for key in out
                    .stdout
                    .lines()
                    .skip(1)
                    .filter_map(|l| l.split_whitespace().next())
                {
                    let _ = run(
                        &mut self.ctr(&["snapshots", "--snapshotter", snapshotter, "rm", key]),
                        t,
                    );
                }
            }
        }
        if let Ok(out) = run(&mut self.ctr(&["content", "ls", "-q"]), t) {
            for digest in out.stdout.lines().filter(|l| !l.is_empty()) {
                let _ = run(&mut self.ctr(&["content", "rm", digest]), t);
            }
        }
        let _ = run(
            Command::new("ctr")
                .arg("--address")
                .arg(&self.socket)
                .args(["namespaces", "rm", &self.namespace]),
            t,
        );
    }
}

/// Writes the hosts dir for `node` with `shoal mirror containerd --print --dir`, as an
/// operator would, from the node's own config file and listen address.
fn write_hosts_dir(node: &ShoalProcess, config: &str, dir: &Path) -> Result<String> {
    let out = node.cli(&[
        "mirror",
        "--config",
        config,
        "containerd",
        "--print",
        "--dir",
        &dir.display().to_string(),
        "--listen",
        &node.addr().to_string(),
    ])?;
    Ok(out.stdout)
}

#[test]
fn containerd_pulls_an_upstream_image_through_the_node_with_ns() -> Result<()> {
    const TEST: &str = "containerd_pulls_an_upstream_image_through_the_node_with_ns";
    for tool in [Tool::Containerd, Tool::DockerRegistry, Tool::Skopeo] {
        if !require(TEST, tool) {
            return Ok(());
        }
    }
    let socket = containerd_socket().context("no containerd socket")?;
    let work = tempfile::Builder::new()
        .prefix("shoal-mirror-ctr-")
        .tempdir()?;
    let image = small_image(&mut seeded_rng(TEST).0, work.path())?;
    let mut standin = StandIn::start(None)?;
    standin.push(&image, "team/app", "1")?;

    let (node, cfg) = node_with_config(&upstream_table(UPSTREAM, &standin), &[])?;
    let hosts = work.path().join("certs.d");
    let printed = write_hosts_dir(&node, &config_path(&cfg), &hosts)?;
    ensure!(
        printed.contains("io.containerd.cri.v1.images")
            && printed.contains(&node.addr().to_string()),
        "the printed recipe lacks the config lines or the node:\n{printed}"
    );

    let cleanup = CtrCleanup::new(socket, ctr_namespace("ctr"));
    // `upstream.test` does not resolve: if the node did not answer, containerd's fallback to the
    // registry itself would fail, so a pull that succeeds came through the node.
    let reference = format!("{UPSTREAM}/team/app:1");
    let hosts_dir = hosts.display().to_string();
    run_ok(
        &mut cleanup.ctr(&[
            "images",
            "pull",
            "--snapshotter",
            "native",
            "--hosts-dir",
            &hosts_dir,
            &reference,
        ]),
        CLIENT_TIMEOUT,
    )
    .with_context(|| format!("ctr pull through the node; its log:\n{}", node.log_tail(60)))?;
    let listed = run_ok(&mut cleanup.ctr(&["images", "ls"]), CLIENT_TIMEOUT)?;
    ensure!(
        listed.stdout.contains(&reference) && listed.stdout.contains(&image.manifest.digest),
        "ctr lists no {reference} at {}:\n{}",
        image.manifest.digest,
        listed.stdout
    );
    served_once(&standin, "team/app", &image)?;
    standin.stop();
    node_holds(&node, &format!("{UPSTREAM}/team/app"), "1", &image)?;
    drop(cleanup);
    Ok(())
}

/// A member that may push `team/app` to the fleet must not decide what an image of a registry
/// the node does not mirror is: `_default` lets containerd fetch content from the node by
/// digest, never resolve a tag there.
#[test]
fn containerd_never_resolves_an_unmirrored_registry_through_the_node() -> Result<()> {
    const TEST: &str = "containerd_never_resolves_an_unmirrored_registry_through_the_node";
    for tool in [Tool::Containerd, Tool::Skopeo] {
        if !require(TEST, tool) {
            return Ok(());
        }
    }
    let socket = containerd_socket().context("no containerd socket")?;
    let work = tempfile::Builder::new()
        .prefix("shoal-mirror-ctr-")
        .tempdir()?;
    let image = small_image(&mut seeded_rng(TEST).0, work.path())?;
    let (node, cfg) = node_with_config("", &[])?;
    // The fleet's own `team/app:1`, as a member would push it.
    run_ok(
        Command::new("skopeo").args([
            "copy",
            "--dest-tls-verify=false",
            &image.skopeo_ref(),
            &format!("docker://{}/team/app:1", node.addr()),
        ]),
        CLIENT_TIMEOUT,
    )?;
    let hosts = work.path().join("certs.d");
    write_hosts_dir(&node, &config_path(&cfg), &hosts)?;
    let cleanup = CtrCleanup::new(socket, ctr_namespace("unmirrored"));
    let hosts_dir = hosts.display().to_string();
    let out = run(
        &mut cleanup.ctr(&[
            "images",
            "pull",
            "--snapshotter",
            "native",
            "--hosts-dir",
            &hosts_dir,
            "unmirrored.test/team/app:1",
        ]),
        CLIENT_TIMEOUT,
    )?;
    ensure!(
        !out.success(),
        "containerd took the fleet's team/app for unmirrored.test/team/app:\n{}",
        out.describe()
    );
    drop(cleanup);
    Ok(())
}

/// A private dockerd on temp directories and its own socket, stopped (and its directories
/// removed) on drop.
struct PrivateDockerd {
    child: Option<std::process::Child>,
    dir: tempfile::TempDir,
    /// Its own bridge, removed on drop. Never `--bridge none`: a dockerd started so deletes
    /// the host's `docker0` (moby removes "the default bridge interface"), and every later
    /// `docker run` of the host's daemon fails.
    bridge: Option<String>,
}

/// The private dockerd's bridge, with an address in the benchmarking range.
const PRIVATE_BRIDGE_ADDR: &str = "198.18.77.1/24";

impl PrivateDockerd {
    /// Starts one whose Docker Hub mirror is `mirror`, or says why it cannot run here.
    fn start(mirror: &str) -> Result<std::result::Result<PrivateDockerd, String>> {
        if find_in_path("dockerd").is_none() || find_in_path("docker").is_none() {
            return Ok(Err("dockerd or docker not found".into()));
        }
        if !Path::new(DOCKER_CONTAINERD).exists() {
            return Ok(Err(format!("no containerd socket at {DOCKER_CONTAINERD}")));
        }
        let is_root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
        if !is_root {
            return Ok(Err("a second dockerd needs root".into()));
        }
        if find_in_path("ip").is_none() {
            return Ok(Err(
                "ip (iproute2) not found, for the private dockerd's bridge".into(),
            ));
        }
        let bridge = format!("shoalmd{}", std::process::id() % 100_000);
        let made = run(
            Command::new("ip").args(["link", "add", &bridge, "type", "bridge"]),
            Duration::from_secs(10),
        )?;
        if !made.success() {
            return Ok(Err(format!("cannot make a bridge: {}", made.describe())));
        }
        for args in [
            vec!["addr", "add", PRIVATE_BRIDGE_ADDR, "dev", &bridge],
            vec!["link", "set", &bridge, "up"],
        ] {
            let _ = run(Command::new("ip").args(&args), Duration::from_secs(10));
        }
        // Short paths: dockerd puts sockets under its exec root.
        let dir = tempfile::Builder::new()
            .prefix("shoal-dockerd-")
            .tempdir_in("/tmp")?;
        let p = |name: &str| dir.path().join(name).display().to_string();
        std::fs::create_dir_all(dir.path().join("data"))?;
        std::fs::create_dir_all(dir.path().join("exec"))?;
        let log = std::fs::File::create(dir.path().join("dockerd.log"))?;
        let mut cmd = Command::new("dockerd");
        cmd.args(["--data-root", &p("data")])
            .args(["--exec-root", &p("exec")])
            .args(["--pidfile", &p("dockerd.pid")])
            .args(["--host", &format!("unix://{}", p("docker.sock"))])
            .args(["--bridge", &bridge, "--iptables=false", "--ip-masq=false"])
            // The machine's overlay may be unavailable (nested containers); vfs always works.
            .args(["--storage-driver", "vfs"])
            .args(["--registry-mirror", mirror])
            .args(["--containerd", DOCKER_CONTAINERD])
            .args(["--containerd-namespace", &ctr_namespace("docker")])
            .args([
                "--containerd-plugins-namespace",
                &ctr_namespace("docker-plugins"),
            ])
            // No user or system daemon.json may change it.
            .args(["--config-file", &p("daemon.json")])
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        std::fs::write(dir.path().join("daemon.json"), "{}")?;
        eprintln!("+ {}", command_line(&cmd));
        let child = cmd.spawn().context("spawning dockerd")?;
        let mut daemon = PrivateDockerd {
            child: Some(child),
            dir,
            bridge: Some(bridge),
        };
        let ready = wait_until(
            Duration::from_secs(60),
            "the private dockerd answers",
            || {
                if let Some(Ok(Some(_))) = daemon.child.as_mut().map(std::process::Child::try_wait)
                {
                    return true;
                }
                daemon
                    .docker(&["version", "--format", "{{.Server.Version}}"])
                    .output()
                    .is_ok_and(|o| o.status.success())
            },
        );
        let exited = matches!(
            daemon.child.as_mut().map(std::process::Child::try_wait),
            Some(Ok(Some(_)))
        );
        if exited || ready.is_err() {
            return Ok(Err(format!(
                "the private dockerd did not start; its log:\n{}",
                daemon.log()
            )));
        }
        Ok(Ok(daemon))
    }

    fn docker(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("docker");
        cmd.arg("-H")
            .arg(format!(
                "unix://{}",
                self.dir.path().join("docker.sock").display()
            ))
            .args(args)
            // The caller's docker config (credentials, contexts) stays out of it.
            .env("DOCKER_CONFIG", self.dir.path().join("client"));
        cmd
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dockerd.log")).unwrap_or_default()
    }
}

impl Drop for PrivateDockerd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM by its own pid: it unmounts and exits.
            let _ = run(
                Command::new("kill").args(["-s", "TERM", &child.id().to_string()]),
                Duration::from_secs(10),
            );
            if !matches!(wait_child(&mut child, Duration::from_secs(30)), Ok(Some(_))) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if let Some(bridge) = self.bridge.take() {
            let _ = run(
                Command::new("ip").args(["link", "del", &bridge]),
                Duration::from_secs(10),
            );
        }
        // What it left in the shared containerd: content under leases, and its namespaces.
        for namespace in [ctr_namespace("docker"), ctr_namespace("docker-plugins")] {
            drop(CtrCleanup {
                socket: DOCKER_CONTAINERD.into(),
                namespace,
            });
        }
    }
}

#[test]
fn docker_with_registry_mirrors_pulls_a_docker_hub_image_through_the_node() -> Result<()> {
    const TEST: &str = "docker_with_registry_mirrors_pulls_a_docker_hub_image_through_the_node";
    for tool in [Tool::DockerRegistry, Tool::Skopeo] {
        if !require(TEST, tool) {
            return Ok(());
        }
    }
    let work = tempfile::Builder::new()
        .prefix("shoal-mirror-docker-")
        .tempdir()?;
    let image = small_image(&mut seeded_rng(TEST).0, work.path())?;
    let mut standin = StandIn::start(None)?;
    standin.push(&image, "library/app", "1")?;
    let config = format!(
        "default_upstream = \"docker.io\"\n{}",
        upstream_table("docker.io", &standin)
    );
    let (node, cfg) = node_with_config(&config, &[])?;
    let printed = node.cli(&[
        "mirror",
        "--config",
        &config_path(&cfg),
        "docker",
        "--print",
        "--listen",
        &node.addr().to_string(),
    ])?;
    let json: serde_json::Value = serde_json::from_str(&printed.stdout)
        .with_context(|| format!("daemon.json lines:\n{}", printed.stdout))?;
    let mirror = json["registry-mirrors"][0]
        .as_str()
        .context("no registry-mirrors")?
        .to_owned();
    ensure!(
        mirror == format!("http://{}", node.addr()),
        "mirror {mirror}"
    );

    let daemon = match PrivateDockerd::start(&mirror)? {
        Ok(d) => d,
        Err(why) => {
            let _ = std::io::Write::write_all(
                &mut std::io::stderr(),
                format!("SKIP: {TEST}: {why}\n").as_bytes(),
            );
            return Ok(());
        }
    };
    // Docker Hub itself is unreachable here: a pull that succeeds came through the node.
    run_ok(
        &mut daemon.docker(&["pull", "library/app:1"]),
        CLIENT_TIMEOUT,
    )
    .with_context(|| {
        format!(
            "docker pull through the node; node log:\n{}\ndockerd log:\n{}",
            node.log_tail(60),
            daemon.log()
        )
    })?;
    let out = run_ok(
        &mut daemon.docker(&[
            "image",
            "inspect",
            "--format",
            "{{json .RepoDigests}}",
            "app:1",
        ]),
        CLIENT_TIMEOUT,
    )?;
    ensure!(
        out.stdout.contains(&image.manifest.digest),
        "docker holds app:1 at {}, not {}",
        out.stdout,
        image.manifest.digest
    );
    served_once(&standin, "library/app", &image)?;
    standin.stop();
    node_holds(&node, "docker.io/library/app", "1", &image)?;
    drop(daemon);
    Ok(())
}

/// A node's `/p2p` address and publisher key, once it has printed them.
fn identity(node: &ShoalProcess) -> Result<(String, String)> {
    wait_until(
        Duration::from_secs(30),
        "the node's p2p identity line",
        || node.p2p_identity().is_some_and(|(_, a, _)| !a.is_empty()),
    )?;
    let (peer, addrs, key) = node.p2p_identity().context("identity line vanished")?;
    Ok((format!("{}/p2p/{peer}", addrs[0]), key))
}

#[test]
fn upstream_credentials_never_reach_a_log_or_another_node() -> Result<()> {
    const TEST: &str = "upstream_credentials_never_reach_a_log_or_another_node";
    for tool in [Tool::DockerRegistry, Tool::Skopeo] {
        if !require(TEST, tool) {
            return Ok(());
        }
    }
    let (mut rng, _) = seeded_rng(TEST);
    let password = format!("pw-{:016x}{:016x}", rng.next_u64(), rng.next_u64());
    let user = "mirror-bot";
    let basic = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    };
    let work = tempfile::Builder::new()
        .prefix("shoal-mirror-creds-")
        .tempdir()?;
    let image = small_image(&mut rng, work.path())?;
    let standin = StandIn::start(Some((user, &password)))?;
    standin.push(&image, "team/app", "1")?;

    let debug = [("SHOAL_LOG", "debug"), ("RUST_LOG", "debug")];
    let config = format!(
        "{}username = \"{user}\"\npassword = \"{password}\"\n",
        upstream_table(UPSTREAM, &standin)
    );
    let (a, _cfg_a) = node_with_config(&config, &debug)?;
    let (addr_a, key_a) = identity(&a)?;
    let b_dir = tempfile::Builder::new()
        .prefix("shoal-mirror-b-")
        .tempdir()?;
    let mut b_args: Vec<String> = LOOPBACK_P2P_ARGS.iter().map(|s| (*s).to_owned()).collect();
    b_args.extend([
        "--peer".into(),
        addr_a,
        "--trust".into(),
        format!("{key_a}={UPSTREAM}/*"),
    ]);
    let b = ShoalProcess::start_launched(Launch {
        listen: "127.0.0.1:0".into(),
        args: b_args,
        env: debug
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect(),
        data_dir: Some(b_dir.path().to_owned()),
        ..Launch::default()
    })?;

    let repo = format!("{UPSTREAM}/team/app");
    let pull = |node: &ShoalProcess| -> Result<()> {
        let client = node.client();
        let r = client.get_manifest(&repo, "1")?;
        ensure!(r.status == 200, "manifest: {}", r.describe());
        for blob in std::iter::once(&image.config).chain(&image.layers) {
            let r = client.get_blob(&repo, &blob.digest)?;
            ensure!(r.status == 200, "blob {}: {}", blob.digest, r.describe());
        }
        Ok(())
    };
    pull(&a).with_context(|| a.log_tail(60))?;
    // B knows no upstream: A's record and bytes reach it through the fleet.
    wait_until(
        Duration::from_secs(60),
        "node B pulls the mirrored image",
        || pull(&b).is_ok(),
    )
    .with_context(|| b.log_tail(60))?;
    ensure!(
        standin.served(
            "GET",
            &format!("/v2/team/app/blobs/{}", image.config.digest)
        ) == 1,
        "the upstream served the config more than once:\n{}",
        standin.log()
    );

    for (name, node) in [("A", &a), ("B", &b)] {
        let log = std::fs::read_to_string(node.log_path())?;
        ensure!(
            log.lines().count() > 20,
            "node {name} logged too little to be at debug level:\n{log}"
        );
        for secret in [password.as_str(), basic.as_str()] {
            ensure!(
                !log.contains(secret),
                "node {name}'s log holds the upstream's credentials"
            );
            if let Some(file) = dir_contains(node.data_dir(), secret.as_bytes())? {
                anyhow::bail!(
                    "node {name}'s data directory holds the upstream's credentials in {}",
                    file.display()
                );
            }
        }
    }
    Ok(())
}
