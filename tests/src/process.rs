//! Registry servers as child processes: the real `shoal` binary, and Debian's
//! `docker-registry` (CNCF Distribution 2.8) as the reference to check the tests against.
//!
//! Each server gets its own temp directory holding `data/` (the store) and `logs/` (its
//! stdout and stderr, one file per start), listens on a loopback port, and is SIGKILLed when
//! its handle drops. Set `SHOAL_TEST_KEEP=1` to keep the temp directory for a post-mortem.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, sync_channel};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use tempfile::TempDir;

use crate::http::RegistryClient;
use crate::tools::{CmdOutput, command_line, run, wait_child};
use crate::wait::wait_until;

/// How long a server may take from spawn to ready.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a server may take to exit after SIGTERM.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `shoal fsck` may run.
pub const FSCK_TIMEOUT: Duration = Duration::from_secs(120);
/// How long building the binary may take when the tests have to do it.
const BUILD_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// The line `shoal node` prints on stdout once it serves HTTP; the URL follows it.
pub const READY_PREFIX: &str = "shoal ready: registry listening on ";

/// Flags that keep a test node's peer-to-peer side on loopback: no mDNS (multicast on every
/// interface), listeners on 127.0.0.1 with OS-chosen ports (so nodes can run in parallel).
/// Tests send traffic to loopback addresses only.
pub const LOOPBACK_P2P_ARGS: &[&str] = &[
    "--no-mdns",
    "--p2p-listen",
    "/ip4/127.0.0.1/tcp/0",
    "--p2p-listen",
    "/ip4/127.0.0.1/udp/0/quic-v1",
];

/// Environment variables of `shoal` a test must not inherit from the developer's shell.
const SHOAL_ENV: &[&str] = &[
    "SHOAL_DATA_DIR",
    "SHOAL_LISTEN",
    "SHOAL_CONFIG",
    "SHOAL_P2P_LISTEN",
    "SHOAL_PEERS",
    "SHOAL_NO_MDNS",
    "SHOAL_TRUST",
    "SHOAL_JOIN",
    "SHOAL_LOCAL_CLIENTS",
    "SHOAL_ANONYMOUS_PULL",
    "SHOAL_TLS_CERT",
    "SHOAL_TLS_KEY",
    "SHOAL_INSECURE",
];

/// What `shoal fsck` did: exit status and output.
pub type FsckOutput = CmdOutput;

/// The `target/<profile>` directory the running test binary was built into.
fn profile_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        let dir = PathBuf::from(dir);
        let dir = if dir.is_relative() {
            workspace_dir().join(dir)
        } else {
            dir
        };
        return dir.join("debug");
    }
    // The test executable lives in target/<profile>/deps/.
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.to_owned()))
        .filter(|dir| dir.join("deps").is_dir())
        .unwrap_or_else(|| workspace_dir().join("target").join("debug"))
}

/// The workspace root (parent of this crate).
pub fn workspace_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_owned()
}

/// Newest modification time of any file under `path`.
fn newest_mtime(path: &Path) -> Option<SystemTime> {
    let meta = std::fs::metadata(path).ok()?;
    if meta.is_file() {
        return meta.modified().ok();
    }
    std::fs::read_dir(path)
        .ok()?
        .filter_map(|entry| newest_mtime(&entry.ok()?.path()))
        .max()
}

/// Whether a source file of the binary is newer than the binary.
fn binary_is_stale(bin: &Path) -> bool {
    let Some(built) = std::fs::metadata(bin).and_then(|m| m.modified()).ok() else {
        return true;
    };
    let ws = workspace_dir();
    [
        "node/src",
        "node/Cargo.toml",
        "protocol/src",
        "protocol/Cargo.toml",
        "Cargo.toml",
        "Cargo.lock",
    ]
    .iter()
    .filter_map(|p| newest_mtime(&ws.join(p)))
    .any(|source| source > built)
}

/// Path to the `shoal` binary, building it first when it is missing or older than its sources.
///
/// `SHOAL_BIN` overrides the lookup. Otherwise the binary is `target/<profile>/shoal` of this
/// test build (honouring `CARGO_TARGET_DIR`); `cargo build -p shoal-node --bin shoal` runs at
/// most once per test process.
pub fn shoal_binary() -> Result<PathBuf> {
    static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BINARY
        .get_or_init(|| locate_or_build().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn locate_or_build() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("SHOAL_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let profile = profile_dir();
    let bin = profile.join("shoal");
    if !binary_is_stale(&bin) {
        return Ok(bin);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_dir())
        .args(["build", "-p", "shoal-node", "--bin", "shoal"]);
    if profile.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    if let Some(target) = profile.parent() {
        cmd.env("CARGO_TARGET_DIR", target);
    }
    let out = run(&mut cmd, BUILD_TIMEOUT)?;
    if !out.success() {
        bail!("building the shoal binary failed:\n{}", out.describe());
    }
    if !bin.is_file() {
        bail!(
            "cargo built shoal-node but {} does not exist",
            bin.display()
        );
    }
    Ok(bin)
}

/// A free loopback port (bound, read, released; the caller binds it again shortly after).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A temp root holding `data/` and `logs/` for one server.
struct ServerDirs {
    root: Option<TempDir>,
    root_path: PathBuf,
    data: PathBuf,
    logs: PathBuf,
}

impl ServerDirs {
    fn new(prefix: &str) -> Result<Self> {
        Self::with_data(prefix, None)
    }

    /// Like `new`, but the store lives in `data` (owned by the caller) when given.
    fn with_data(prefix: &str, data: Option<&Path>) -> Result<Self> {
        let root = tempfile::Builder::new().prefix(prefix).tempdir()?;
        let root_path = root.path().to_owned();
        let data = data.map_or_else(|| root_path.join("data"), Path::to_owned);
        let logs = root_path.join("logs");
        std::fs::create_dir_all(&data)?;
        std::fs::create_dir_all(&logs)?;
        Ok(Self {
            root: Some(root),
            root_path,
            data,
            logs,
        })
    }
}

impl Drop for ServerDirs {
    fn drop(&mut self) {
        if std::env::var_os("SHOAL_TEST_KEEP").is_some() {
            if let Some(root) = self.root.take() {
                eprintln!("keeping {}", root.keep().display());
            }
        }
    }
}

/// The last lines of a log file, for failure messages.
fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Copies `pipe` line by line into the shared log file.
fn pump_lines(
    pipe: impl std::io::Read + Send + 'static,
    log: std::sync::Arc<Mutex<File>>,
    label: &'static str,
    ready: Option<std::sync::mpsc::SyncSender<SocketAddr>>,
) {
    std::thread::spawn(move || {
        let mut ready = ready;
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if let Ok(mut f) = log.lock() {
                let _ = writeln!(f, "[{label}] {line}");
            }
            if let Some(rest) = line.trim().strip_prefix(READY_PREFIX) {
                let rest = rest
                    .strip_prefix("http://")
                    .or_else(|| rest.strip_prefix("https://"))
                    .unwrap_or(rest);
                if let (Some(tx), Ok(addr)) = (ready.as_ref(), rest.trim_end_matches('/').parse()) {
                    let _ = tx.try_send(addr);
                    ready = None;
                }
            }
        }
    });
}

/// How to start a node somewhere other than loopback with the default flags: inside a
/// network namespace, with a faked clock, on a data dir the caller owns.
#[derive(Debug, Clone, Default)]
pub struct Launch {
    /// Words run before the binary, which they must `exec` (so that the pid the test holds is
    /// the node's): `["ip", "netns", "exec", "<ns>"]`. Empty: the binary itself.
    pub prefix: Vec<String>,
    /// Extra environment variables (`LD_PRELOAD` and `FAKETIME` for a skewed clock).
    pub env: Vec<(String, String)>,
    /// The registry's `--listen` address.
    pub listen: String,
    /// Every flag after `--listen` (no loopback defaults are added).
    pub args: Vec<String>,
    /// The store's directory, owned by the caller; a temp dir when `None`.
    pub data_dir: Option<PathBuf>,
}

/// The real `shoal` binary running `shoal node` on a temp data dir and a loopback port.
pub struct ShoalProcess {
    bin: PathBuf,
    /// Command words before the binary, and extra environment ([`Launch`]).
    prefix: Vec<String>,
    env: Vec<(String, String)>,
    dirs: ServerDirs,
    /// The registry's `--listen` address.
    listen: String,
    /// Peer-to-peer and trust flags ([`LOOPBACK_P2P_ARGS`] unless started as a fleet node).
    p2p_args: Vec<String>,
    child: Option<Child>,
    addr: SocketAddr,
    starts: u32,
    log: PathBuf,
}

impl ShoalProcess {
    /// Spawns `shoal node --data-dir <temp> --listen 127.0.0.1:0` (peer-to-peer on loopback
    /// only, see [`LOOPBACK_P2P_ARGS`]) and waits for its ready line.
    pub fn start() -> Result<Self> {
        Self::start_with(ServerDirs::new("shoal-test-")?)
    }

    /// Like [`ShoalProcess::start`], but on an existing data dir that the caller owns (for
    /// example another node's, to check that two nodes cannot share one store).
    pub fn start_on(data_dir: &Path) -> Result<Self> {
        Self::start_with(ServerDirs::with_data("shoal-test-", Some(data_dir))?)
    }

    /// Starts a node of a fleet: `p2p_args` replace [`LOOPBACK_P2P_ARGS`] (give it loopback
    /// `--p2p-listen` addresses, `--peer` and `--trust` flags).
    pub fn start_fleet_node(p2p_args: &[String]) -> Result<Self> {
        Self::start_full(ServerDirs::new("shoal-test-")?, p2p_args.to_vec())
    }

    /// A node whose data directory `prepare` sets up first (with `shoal` commands run on it:
    /// [`ShoalProcess::cli_on`]), listening on `listen` (`ip:port`) with `args` after
    /// [`LOOPBACK_P2P_ARGS`].
    pub fn start_prepared(
        listen: &str,
        args: &[String],
        prepare: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<Self> {
        let dirs = ServerDirs::new("shoal-test-")?;
        prepare(&dirs.data)?;
        let mut p2p: Vec<String> = LOOPBACK_P2P_ARGS.iter().map(|s| (*s).to_owned()).collect();
        p2p.extend(args.iter().cloned());
        Self::start_in(
            dirs,
            Launch {
                listen: listen.to_owned(),
                args: p2p,
                ..Launch::default()
            },
        )
    }

    /// Runs `shoal <args> --data-dir <data_dir>` (no node needed), failing if it fails.
    pub fn cli_on(data_dir: &Path, args: &[&str]) -> Result<CmdOutput> {
        let mut cmd = Command::new(shoal_binary()?);
        cmd.args(args).arg("--data-dir").arg(data_dir);
        for var in SHOAL_ENV {
            cmd.env_remove(var);
        }
        crate::tools::run_ok(&mut cmd, FSCK_TIMEOUT)
    }

    fn start_with(dirs: ServerDirs) -> Result<Self> {
        Self::start_full(
            dirs,
            LOOPBACK_P2P_ARGS.iter().map(|s| (*s).to_owned()).collect(),
        )
    }

    fn start_full(dirs: ServerDirs, p2p_args: Vec<String>) -> Result<Self> {
        Self::start_in(
            dirs,
            Launch {
                listen: "127.0.0.1:0".to_owned(),
                args: p2p_args,
                ..Launch::default()
            },
        )
    }

    /// Starts a node the way `launch` says (see [`Launch`]) and waits for its ready line.
    /// Restarts use the same launch.
    pub fn start_launched(launch: Launch) -> Result<Self> {
        let dirs = ServerDirs::with_data("shoal-test-", launch.data_dir.as_deref())?;
        Self::start_in(dirs, launch)
    }

    /// Starts a node on `dirs` (`launch.data_dir` is already in them).
    fn start_in(dirs: ServerDirs, launch: Launch) -> Result<Self> {
        let mut process = Self {
            bin: shoal_binary()?,
            prefix: launch.prefix,
            env: launch.env,
            listen: launch.listen,
            p2p_args: launch.args,
            log: dirs.logs.join("shoal-0.log"),
            dirs,
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            starts: 0,
        };
        process.spawn()?;
        Ok(process)
    }

    fn spawn(&mut self) -> Result<()> {
        self.starts += 1;
        self.log = self.dirs.logs.join(format!("shoal-{}.log", self.starts));
        let log = std::sync::Arc::new(Mutex::new(File::create(&self.log)?));
        let mut cmd = match self.prefix.split_first() {
            Some((program, words)) => {
                let mut cmd = Command::new(program);
                cmd.args(words).arg(&self.bin);
                cmd
            }
            None => Command::new(&self.bin),
        };
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd.arg("node")
            .arg("--data-dir")
            .arg(&self.dirs.data)
            .args(["--listen", &self.listen])
            .args(&self.p2p_args)
            // No user config file may leak into a test node.
            .env("XDG_CONFIG_HOME", &self.dirs.root_path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for var in SHOAL_ENV {
            cmd.env_remove(var);
        }
        let command = command_line(&cmd);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning `{command}`"))?;
        let (tx, rx) = sync_channel(1);
        pump_lines(
            child.stdout.take().context("stdout pipe")?,
            log.clone(),
            "stdout",
            Some(tx),
        );
        pump_lines(
            child.stderr.take().context("stderr pipe")?,
            log,
            "stderr",
            None,
        );
        match wait_ready(&mut child, &rx) {
            Ok(addr) => {
                self.addr = addr;
                self.child = Some(child);
                Ok(())
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e.context(format!(
                    "`{command}` did not become ready; log {}:\n{}",
                    self.log.display(),
                    log_tail(&self.log, 60)
                )))
            }
        }
    }

    /// The address the registry API listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A client for the registry API.
    pub fn client(&self) -> RegistryClient {
        RegistryClient::new(self.addr)
    }

    /// What the node printed about itself: (peer id, p2p listen addresses, publisher key).
    /// Read from the current run's log; `None` until the node has printed it.
    pub fn p2p_identity(&self) -> Option<(String, Vec<String>, String)> {
        let log = std::fs::read_to_string(&self.log).ok()?;
        let mut peer = None;
        let mut key = None;
        for line in log.lines() {
            let line = line.strip_prefix("[stdout] ").unwrap_or(line);
            if let Some(rest) = line.strip_prefix("shoal p2p: peer id ") {
                let mut words = rest.split_whitespace();
                let id = words.next()?.to_owned();
                let addrs: Vec<String> = words.skip(2).map(str::to_owned).collect();
                peer = Some((id, addrs));
            }
            if let Some(k) = line.strip_prefix("shoal publisher key: ") {
                key = Some(k.trim().to_owned());
            }
        }
        let (id, addrs) = peer?;
        Some((id, addrs, key?))
    }

    /// The store's data directory (survives restarts).
    pub fn data_dir(&self) -> &Path {
        &self.dirs.data
    }

    /// The log file of the current (or last) run.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last `lines` lines of the current run's stdout and stderr.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }

    /// The pid of the running process, if any.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    /// SIGKILL, then reap. The store is left however the kill found it.
    pub fn kill_hard(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then wait for the exit (SIGKILL after [`SHUTDOWN_TIMEOUT`]).
    pub fn terminate(&mut self) -> Result<ExitStatus> {
        self.stop_with_signal("TERM")
    }

    /// Sends `signal` (a name `kill -s` knows: `TERM`, `INT`...) and waits for the exit;
    /// SIGKILL and an error after [`SHUTDOWN_TIMEOUT`].
    pub fn stop_with_signal(&mut self, signal: &str) -> Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("shoal is not running");
        };
        let pid = child.id().to_string();
        run(
            Command::new("kill").args(["-s", signal, &pid]),
            Duration::from_secs(10),
        )?;
        match wait_child(&mut child, SHUTDOWN_TIMEOUT)? {
            Some(status) => Ok(status),
            None => bail!(
                "shoal did not exit within {SHUTDOWN_TIMEOUT:?} of SIG{signal} (killed); log:\n{}",
                self.log_tail(40)
            ),
        }
    }

    /// Kills the process if it runs (SIGKILL) and starts it again on the same data dir.
    ///
    /// The new process listens on a new port: use [`ShoalProcess::addr`] again.
    pub fn restart(&mut self) -> Result<()> {
        self.kill_hard();
        self.spawn()
    }

    /// Runs `shoal fsck --data-dir <dir>` (the node should be stopped first).
    pub fn fsck(&self) -> Result<FsckOutput> {
        self.run_fsck(false)
    }

    /// Runs `shoal fsck --data-dir <dir> --repair` (the node should be stopped first).
    pub fn fsck_repair(&self) -> Result<FsckOutput> {
        self.run_fsck(true)
    }

    /// Runs `shoal <args> --data-dir <dir>`, a command for this node (`fleet init`, `token
    /// create`, ...), and returns what it printed; fails if it fails.
    pub fn cli(&self, args: &[&str]) -> Result<CmdOutput> {
        crate::tools::run_ok(&mut self.command(args), FSCK_TIMEOUT)
    }

    /// `shoal <args> --data-dir <dir>`, with this node's config home and none of the caller's
    /// `SHOAL_*` settings.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args).arg("--data-dir").arg(&self.dirs.data);
        for var in SHOAL_ENV {
            cmd.env_remove(var);
        }
        cmd.env("XDG_CONFIG_HOME", &self.dirs.root_path);
        cmd
    }

    fn run_fsck(&self, repair: bool) -> Result<FsckOutput> {
        let mut cmd = self.command(if repair {
            &["fsck", "--repair"]
        } else {
            &["fsck"]
        });
        // The node's own clock (a faked one, in the fault suite): what is "from the future" is
        // judged as the node judges it.
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        run(&mut cmd, FSCK_TIMEOUT)
    }
}

impl Drop for ShoalProcess {
    fn drop(&mut self) {
        self.kill_hard();
    }
}

fn wait_ready(child: &mut Child, rx: &Receiver<SocketAddr>) -> Result<SocketAddr> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(addr) => return Ok(addr),
            Err(RecvTimeoutError::Disconnected) => {
                let status = wait_child(child, Duration::from_secs(5))?;
                bail!("stdout closed before the ready line (exit status {status:?})");
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
        if let Some(status) = child.try_wait()? {
            // The ready line may still be in the pipe.
            if let Ok(addr) = rx.recv_timeout(Duration::from_millis(200)) {
                return Ok(addr);
            }
            bail!("exited with {status} before the ready line");
        }
        if Instant::now() >= deadline {
            bail!("no ready line within {STARTUP_TIMEOUT:?}");
        }
    }
}

/// Debian's `docker-registry` (CNCF Distribution 2.8) on a loopback port with temp storage.
pub struct DistributionProcess {
    dirs: ServerDirs,
    config: PathBuf,
    child: Option<Child>,
    addr: SocketAddr,
    starts: u32,
    log: PathBuf,
}

impl DistributionProcess {
    /// Writes a config (filesystem storage in a temp dir, deletes enabled) and starts it.
    pub fn start() -> Result<Self> {
        let dirs = ServerDirs::new("distribution-test-")?;
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let config = dirs.root_path.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\n\
                 log:\n  level: info\n  accesslog:\n    disabled: true\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 http:\n  addr: {addr}\n",
                dirs.data.display()
            ),
        )?;
        let mut process = Self {
            log: dirs.logs.join("registry-0.log"),
            dirs,
            config,
            child: None,
            addr,
            starts: 0,
        };
        process.spawn()?;
        Ok(process)
    }

    fn spawn(&mut self) -> Result<()> {
        self.starts += 1;
        self.log = self.dirs.logs.join(format!("registry-{}.log", self.starts));
        let log = File::create(&self.log)?;
        let mut child = Command::new("docker-registry")
            .arg("serve")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning docker-registry")?;
        let client = RegistryClient::with_timeout(self.addr, Duration::from_secs(2));
        let mut exited = None;
        let ready = wait_until(STARTUP_TIMEOUT, "docker-registry to answer /v2/", || {
            if let Ok(Some(status)) = child.try_wait() {
                exited = Some(status);
                return true;
            }
            client.get("/v2/", &[]).is_ok_and(|r| r.status == 200)
        });
        if let Some(status) = exited {
            bail!(
                "docker-registry exited with {status}; log:\n{}",
                log_tail(&self.log, 40)
            );
        }
        if let Err(e) = ready {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e.context(log_tail(&self.log, 40)));
        }
        self.child = Some(child);
        Ok(())
    }

    /// The address the registry listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The storage root.
    pub fn data_dir(&self) -> &Path {
        &self.dirs.data
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    /// SIGKILL, then reap.
    pub fn kill_hard(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills it if it runs and starts it again on the same storage and port.
    pub fn restart(&mut self) -> Result<()> {
        self.kill_hard();
        self.spawn()
    }
}

impl Drop for DistributionProcess {
    fn drop(&mut self) {
        self.kill_hard();
    }
}

/// The registry a test talks to: shoal, or the reference implementation.
///
/// `SHOAL_TEST_TARGET=distribution` runs the client and crash tests against Debian's
/// `docker-registry` instead of shoal, which checks the tests themselves against a registry
/// known to be right (shoal-only checks such as fsck are skipped then).
pub enum RegistryServer {
    /// The real `shoal` binary.
    Shoal(ShoalProcess),
    /// Debian's `docker-registry`.
    Distribution(DistributionProcess),
}

impl RegistryServer {
    /// Starts the server `SHOAL_TEST_TARGET` names (`shoal`, the default, or `distribution`).
    pub fn start_from_env() -> Result<Self> {
        match std::env::var("SHOAL_TEST_TARGET").as_deref() {
            Ok("distribution") => Ok(Self::Distribution(DistributionProcess::start()?)),
            Ok("shoal") | Ok("") | Err(_) => Ok(Self::Shoal(ShoalProcess::start()?)),
            Ok(other) => bail!("SHOAL_TEST_TARGET={other}: expected shoal or distribution"),
        }
    }

    /// `shoal` or `distribution`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Shoal(_) => "shoal",
            Self::Distribution(_) => "distribution",
        }
    }

    /// The address the registry API listens on.
    pub fn addr(&self) -> SocketAddr {
        match self {
            Self::Shoal(p) => p.addr(),
            Self::Distribution(p) => p.addr(),
        }
    }

    /// A client for the registry API.
    pub fn client(&self) -> RegistryClient {
        RegistryClient::new(self.addr())
    }

    /// Whether the server process is still running.
    pub fn is_running(&mut self) -> bool {
        match self {
            Self::Shoal(p) => p.is_running(),
            Self::Distribution(p) => p.is_running(),
        }
    }

    /// SIGKILL, then reap.
    pub fn kill_hard(&mut self) {
        match self {
            Self::Shoal(p) => p.kill_hard(),
            Self::Distribution(p) => p.kill_hard(),
        }
    }

    /// Kills the server if it runs and starts it again on the same storage.
    pub fn restart(&mut self) -> Result<()> {
        match self {
            Self::Shoal(p) => p.restart(),
            Self::Distribution(p) => p.restart(),
        }
    }

    /// The shoal process, when the target is shoal.
    pub fn as_shoal(&self) -> Option<&ShoalProcess> {
        match self {
            Self::Shoal(p) => Some(p),
            Self::Distribution(_) => None,
        }
    }

    /// The shoal process, when the target is shoal.
    pub fn as_shoal_mut(&mut self) -> Option<&mut ShoalProcess> {
        match self {
            Self::Shoal(p) => Some(p),
            Self::Distribution(_) => None,
        }
    }

    /// The last lines of the server's log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        match self {
            Self::Shoal(p) => p.log_tail(lines),
            Self::Distribution(p) => log_tail(&p.log, lines),
        }
    }
}
