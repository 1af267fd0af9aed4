//! A stand-in for an upstream registry (Docker Hub, GHCR…): Debian's `docker-registry` (CNCF
//! Distribution 2.8) on a free loopback port, optionally asking for htpasswd credentials. Its
//! access log tells how often it served each path, so a test can count what went upstream.
//! Blocking, for the out-of-process tests; `node/tests/testnet/standin.rs` is the in-process
//! twin.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tempfile::TempDir;

use crate::http::RegistryClient;
use crate::process::{STARTUP_TIMEOUT, free_port};
use crate::tools::{OciImage, run_ok};
use crate::wait::wait_until;

/// A running stand-in upstream; killed on drop.
pub struct StandIn {
    child: Option<Child>,
    addr: SocketAddr,
    dir: TempDir,
    creds: Option<(String, String)>,
}

impl StandIn {
    /// Starts one with temp storage; with `creds` (`user`, `password`) it asks every client for
    /// them (htpasswd, Basic auth).
    pub fn start(creds: Option<(&str, &str)>) -> Result<StandIn> {
        let dir = tempfile::Builder::new().prefix("standin-").tempdir()?;
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let auth = match creds {
            Some((user, password)) => {
                let hash = bcrypt::hash(password, 4).context("bcrypt")?;
                let htpasswd = dir.path().join("htpasswd");
                std::fs::write(&htpasswd, format!("{user}:{hash}\n"))?;
                format!(
                    "auth:\n  htpasswd:\n    realm: standin\n    path: {}\n",
                    htpasswd.display()
                )
            }
            None => String::new(),
        };
        std::fs::write(
            dir.path().join("config.yml"),
            format!(
                "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: {addr}\n{auth}",
                dir.path().join("storage").display()
            ),
        )?;
        let log = std::fs::File::create(dir.path().join("access.log"))?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning docker-registry")?;
        let mut standin = StandIn {
            child: Some(child),
            addr,
            dir,
            creds: creds.map(|(u, p)| (u.to_owned(), p.to_owned())),
        };
        let client = RegistryClient::with_timeout(addr, Duration::from_secs(2));
        let mut exited = false;
        let ready = wait_until(STARTUP_TIMEOUT, "the stand-in registry answers", || {
            if let Some(Ok(Some(_))) = standin.child.as_mut().map(Child::try_wait) {
                exited = true;
                return true;
            }
            // 401 is an answer too, when it asks for credentials.
            client
                .get("/v2/", &[])
                .is_ok_and(|r| r.status == 200 || r.status == 401)
        });
        if exited || ready.is_err() {
            bail!(
                "docker-registry did not start ({ready:?}); log:\n{}",
                standin.log()
            );
        }
        Ok(standin)
    }

    /// `http://127.0.0.1:<port>`, the URL of a node's `[[upstream]]`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its storage directory.
    pub fn storage(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// Its log (access log and errors).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }

    /// Copies the OCI layout `image` into it as `repo:tag` with skopeo (digests kept).
    pub fn push(&self, image: &OciImage, repo: &str, tag: &str) -> Result<()> {
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--dest-tls-verify=false"]);
        if let Some((u, p)) = &self.creds {
            cmd.arg("--dest-creds").arg(format!("{u}:{p}"));
        }
        cmd.arg(image.skopeo_ref())
            .arg(format!("docker://{}/{repo}:{tag}", self.addr));
        run_ok(&mut cmd, Duration::from_secs(300))?;
        Ok(())
    }

    /// How many `method path` requests it answered with a 2xx or 3xx status.
    pub fn served(&self, method: &str, path: &str) -> usize {
        let wanted = format!("\"{method} {path} ");
        self.log()
            .lines()
            .filter_map(|l| l.split_once(&wanted).map(|(_, rest)| rest.to_owned()))
            .filter(|rest| {
                rest.split('"')
                    .nth(1)
                    .and_then(|s| s.split_whitespace().next())
                    .is_some_and(|status| status.starts_with('2') || status.starts_with('3'))
            })
            .count()
    }

    /// How many times it served blob `digest` of `repo` in full.
    pub fn blob_gets(&self, repo: &str, digest: &str) -> usize {
        self.served("GET", &format!("/v2/{repo}/blobs/{digest}"))
    }

    /// Stops it: from now on its port refuses connections.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether any file under `dir` contains `needle` (symlinks are not followed).
pub fn dir_contains(dir: &Path, needle: &[u8]) -> Result<Option<PathBuf>> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let path = entry.path();
        if kind.is_dir() {
            if let Some(found) = dir_contains(&path, needle)? {
                return Ok(Some(found));
            }
        } else if kind.is_file() {
            let bytes = std::fs::read(&path)?;
            if bytes.windows(needle.len()).any(|w| w == needle) {
                return Ok(Some(path));
            }
        }
    }
    Ok(None)
}
