//! External tools: finding them, running them with a timeout, and the local test image.
//!
//! A test that needs a tool calls [`require`] first. Outside CI a missing tool skips the test
//! with one line on stderr, `SKIP: <test name>: <tool> not found`. In CI (`CI=true`) the tools
//! that `tests/scripts/install-deps.sh` installs must be there, so their absence fails the test;
//! only a missing docker daemon (which no package can provide) still skips.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

/// How long looking for a tool may take (`docker info`, `python3 -c 'import oras'`).
const PROBE_TIMEOUT: Duration = Duration::from_secs(60);

/// An external program some tests drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    /// `skopeo` (copies images between OCI dirs, registries and the docker daemon).
    Skopeo,
    /// `podman` (pulls with its own storage under a temp root).
    Podman,
    /// The PyPI `oras` package, importable by `python3`.
    Oras,
    /// A reachable docker daemon (`docker info` succeeds).
    DockerDaemon,
    /// Debian's `docker-registry` (CNCF Distribution), the reference registry.
    DockerRegistry,
    /// Root and iproute2's `ip`, to give the test an address of its own.
    NetAdmin,
    /// containerd's `ctr` and a containerd socket it can reach ([`containerd_socket`]).
    Containerd,
    /// libfaketime's multi-threaded preload library ([`faketime_library`]), from Debian's
    /// `faketime` package.
    Faketime,
}

/// libfaketime's multi-threaded preload library, if installed. Preloaded with `FAKETIME` set,
/// it shifts the clock of the process it is loaded into (and of nothing else).
pub fn faketime_library() -> Option<PathBuf> {
    [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/faketime/libfaketimeMT.so.1",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
}

/// The socket of a running containerd: its own, or the one docker runs.
pub fn containerd_socket() -> Option<PathBuf> {
    [
        "/run/containerd/containerd.sock",
        "/run/docker/containerd/containerd.sock",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

impl Tool {
    /// The name printed in the `SKIP:` line.
    pub fn name(self) -> &'static str {
        match self {
            Tool::Skopeo => "skopeo",
            Tool::Podman => "podman",
            Tool::Oras => "oras",
            Tool::DockerDaemon => "docker daemon",
            Tool::DockerRegistry => "docker-registry",
            Tool::NetAdmin => "root with iproute2 (ip)",
            Tool::Containerd => "containerd (ctr and a containerd socket)",
            Tool::Faketime => "libfaketime (Debian package faketime)",
        }
    }

    /// Whether the tool can be used right now.
    pub fn available(self) -> bool {
        match self {
            Tool::Skopeo => find_in_path("skopeo").is_some(),
            Tool::Podman => find_in_path("podman").is_some(),
            Tool::DockerRegistry => find_in_path("docker-registry").is_some(),
            Tool::NetAdmin => {
                find_in_path("ip").is_some()
                    && run_quiet(Command::new("ip").args(["link", "show"]), PROBE_TIMEOUT)
                    && Command::new("id")
                        .arg("-u")
                        .output()
                        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
            }
            Tool::Containerd => {
                find_in_path("ctr").is_some()
                    && containerd_socket().is_some_and(|socket| {
                        run_quiet(
                            Command::new("ctr")
                                .arg("--address")
                                .arg(socket)
                                .arg("version"),
                            PROBE_TIMEOUT,
                        )
                    })
            }
            Tool::Faketime => faketime_library().is_some(),
            Tool::Oras => {
                find_in_path("python3").is_some()
                    && run_quiet(
                        Command::new("python3").args(["-c", "import oras.client"]),
                        PROBE_TIMEOUT,
                    )
            }
            Tool::DockerDaemon => {
                find_in_path("docker").is_some()
                    && run_quiet(
                        Command::new("docker").args(["info", "--format", "{{.ServerVersion}}"]),
                        PROBE_TIMEOUT,
                    )
            }
        }
    }

    /// Whether CI may skip a test for lack of this tool (install-deps cannot provide it).
    fn may_skip_in_ci(self) -> bool {
        matches!(self, Tool::DockerDaemon)
    }
}

/// True when running under CI (`CI=true` or `CI=1`).
pub fn in_ci() -> bool {
    matches!(
        std::env::var("CI")
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Ok("true" | "1")
    )
}

/// Checks that `tool` is available for `test`; if not, prints the SKIP line and returns false.
///
/// # Panics
/// In CI, when a tool that install-deps provides is missing: that is a broken CI machine, not a
/// reason to skip.
pub fn require(test: &str, tool: Tool) -> bool {
    if tool.available() {
        return true;
    }
    if in_ci() && !tool.may_skip_in_ci() {
        panic!(
            "{test}: {} not found, but CI must have it (bash tests/scripts/install-deps.sh)",
            tool.name()
        );
    }
    // Straight to the process's stderr: libtest captures `eprintln!`, and a skip should show.
    let _ = writeln!(std::io::stderr(), "SKIP: {test}: {} not found", tool.name());
    false
}

/// The first executable called `name` on `PATH`.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| {
            candidate
                .metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// What a finished subprocess did.
#[derive(Debug)]
pub struct CmdOutput {
    /// The command line, for messages.
    pub command: String,
    /// How it exited.
    pub status: ExitStatus,
    /// Everything it wrote to stdout (lossy UTF-8).
    pub stdout: String,
    /// Everything it wrote to stderr (lossy UTF-8).
    pub stderr: String,
}

impl CmdOutput {
    /// Exit code 0.
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Command, status and both outputs, for failure messages.
    pub fn describe(&self) -> String {
        format!(
            "`{}` exited with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command,
            self.status,
            tail(&self.stdout, 8000),
            tail(&self.stderr, 8000)
        )
    }
}

/// The last `max` bytes of `s` (on a char boundary).
fn tail(s: &str, max: usize) -> &str {
    let mut start = s.len().saturating_sub(max);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// A command line as one string.
pub fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

fn drain(mut pipe: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        // A read error (the child died) just ends the capture.
        let _ = pipe.read_to_end(&mut buf);
        buf
    })
}

/// Polls `child` until it exits or `timeout` passes; kills it (SIGKILL) on timeout.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `cmd` to completion with stdin closed, capturing its output; fails after `timeout`.
///
/// The command line is echoed to stderr first, so a failing test shows what it ran.
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<CmdOutput> {
    let command = command_line(cmd);
    eprintln!("+ {command}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning `{command}`"))?;
    let out = drain(child.stdout.take().context("stdout pipe")?);
    let err = drain(child.stderr.take().context("stderr pipe")?);
    let status = wait_child(&mut child, timeout)?;
    // The pipes close once the child (and anything it forked that kept them) is gone.
    let stdout = String::from_utf8_lossy(&out.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned();
    match status {
        Some(status) => Ok(CmdOutput {
            command,
            status,
            stdout,
            stderr,
        }),
        None => bail!(
            "`{command}` timed out after {timeout:?} and was killed\n--- stdout ---\n{}\n--- stderr ---\n{}",
            tail(&stdout, 8000),
            tail(&stderr, 8000)
        ),
    }
}

/// Like [`run`], but a non-zero exit is an error carrying both outputs.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Result<CmdOutput> {
    let output = run(cmd, timeout)?;
    if !output.success() {
        bail!("{}", output.describe());
    }
    Ok(output)
}

/// Runs `cmd` silently; true if it exited 0 within `timeout`.
fn run_quiet(cmd: &mut Command, timeout: Duration) -> bool {
    let Ok(mut child) = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    else {
        return false;
    };
    matches!(wait_child(&mut child, timeout), Ok(Some(status)) if status.success())
}

/// `tests/scripts/`, where the shell and python helpers live.
pub fn scripts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts")
}

/// One blob of a locally built image.
#[derive(Debug, Clone)]
pub struct OciBlob {
    /// `sha256:<hex>`.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
}

/// A two-layer image in an OCI layout directory, built by `tests/scripts/make-oci-image.py`.
///
/// Layer 1 is busybox-static (so the image runs `echo hello from shoal`), layer 2 is random
/// bytes. Refer to it as `oci:<dir>:latest`.
#[derive(Debug, Clone)]
pub struct OciImage {
    /// The layout directory.
    pub dir: PathBuf,
    /// Digest of the image manifest.
    pub manifest: OciBlob,
    /// Digest of the config blob.
    pub config: OciBlob,
    /// The layers, in order.
    pub layers: Vec<OciBlob>,
}

impl OciImage {
    /// Builds the image into `dir` (must not exist or be empty) with a random layer of
    /// `random_mib` MiB drawn from `seed`.
    pub fn build(dir: &Path, random_mib: f64, seed: u64) -> Result<Self> {
        let script = scripts_dir().join("make-oci-image.py");
        let out = run_ok(
            Command::new("python3")
                .arg(&script)
                .arg(dir)
                .arg("--random-mib")
                .arg(random_mib.to_string())
                .arg("--seed")
                .arg(seed.to_string()),
            Duration::from_secs(300),
        )?;
        let summary: serde_json::Value =
            serde_json::from_str(out.stdout.trim()).with_context(|| {
                format!("make-oci-image.py printed no summary:\n{}", out.describe())
            })?;
        let manifest_digest = summary["manifest"]
            .as_str()
            .context("summary has no manifest")?
            .to_owned();
        let manifest_size = std::fs::metadata(blob_path(dir, &manifest_digest))?.len();
        let config_digest = summary["config"]
            .as_str()
            .context("summary has no config")?
            .to_owned();
        let config_size = std::fs::metadata(blob_path(dir, &config_digest))?.len();
        let layers = summary["layers"]
            .as_array()
            .context("summary has no layers")?
            .iter()
            .map(|l| {
                Ok(OciBlob {
                    digest: l["digest"].as_str().context("layer digest")?.to_owned(),
                    size: l["size"].as_u64().context("layer size")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            dir: dir.to_owned(),
            manifest: OciBlob {
                digest: manifest_digest,
                size: manifest_size,
            },
            config: OciBlob {
                digest: config_digest,
                size: config_size,
            },
            layers,
        })
    }

    /// `oci:<dir>:latest`, the image as skopeo names it.
    pub fn skopeo_ref(&self) -> String {
        format!("oci:{}:latest", self.dir.display())
    }

    /// The manifest, config and layers: every blob a registry must hold for this image.
    pub fn blobs(&self) -> Vec<&OciBlob> {
        let mut all = vec![&self.manifest, &self.config];
        all.extend(self.layers.iter());
        all
    }

    /// Reads one blob of the layout.
    pub fn read_blob(&self, digest: &str) -> Result<Vec<u8>> {
        let path = blob_path(&self.dir, digest);
        std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
    }
}

/// `<layout>/blobs/<algorithm>/<hex>` for `digest`.
pub fn blob_path(layout: &Path, digest: &str) -> PathBuf {
    let (algorithm, hex) = digest.split_once(':').unwrap_or(("sha256", digest));
    layout.join("blobs").join(algorithm).join(hex)
}

/// Checks that the OCI layout at `dir` holds `image` under `ref_name` with identical blobs.
pub fn assert_layout_matches(dir: &Path, ref_name: &str, image: &OciImage) -> Result<()> {
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("index.json"))?)?;
    let entry = index["manifests"]
        .as_array()
        .and_then(|m| {
            m.iter().find(|d| {
                d["annotations"]["org.opencontainers.image.ref.name"].as_str() == Some(ref_name)
            })
        })
        .with_context(|| format!("pulled index.json has no {ref_name}: {index}"))?;
    ensure!(
        entry["digest"].as_str() == Some(image.manifest.digest.as_str()),
        "pulled manifest digest {} != pushed {}",
        entry["digest"],
        image.manifest.digest
    );
    for blob in image.blobs() {
        let pulled = std::fs::read(blob_path(dir, &blob.digest))
            .with_context(|| format!("pulled layout lacks blob {}", blob.digest))?;
        ensure!(
            pulled == image.read_blob(&blob.digest)?,
            "pulled blob {} differs from the original",
            blob.digest
        );
    }
    Ok(())
}
