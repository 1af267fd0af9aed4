//! A stand-in for an upstream registry: Debian's `docker-registry` (CNCF Distribution 2.8),
//! started by the test on a free loopback port, optionally with htpasswd credentials. Its
//! access log tells how often it served each path.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use shoal_protocol::Digest;

use super::{Image, http};

/// The registry binary Debian's `docker-registry` package installs.
const BINARY: &str = "/usr/bin/docker-registry";

/// A running (or stopped) stand-in upstream.
pub struct StandIn {
    child: Option<Child>,
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
    /// `user:password` when it asks for credentials.
    creds: Option<(String, String)>,
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.stop();
    }
}

impl StandIn {
    /// Starts one, or prints a SKIP line naming `test` and returns `None` when the binary is
    /// missing (`bash tests/scripts/install-deps.sh` installs it).
    pub async fn start(test: &str, creds: Option<(&str, &str)>) -> Option<StandIn> {
        if !std::path::Path::new(BINARY).exists() {
            println!("SKIP: {test}: {BINARY} not found (Debian package docker-registry)");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut s = StandIn {
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir: tempfile::tempdir().expect("tempdir"),
            creds: creds.map(|(u, p)| (u.to_owned(), p.to_owned())),
        };
        s.write_config();
        s.resume().await;
        Some(s)
    }

    fn write_config(&self) {
        let root = self.dir.path();
        let auth = match &self.creds {
            Some((user, password)) => {
                let hash = bcrypt::hash(password, 4).expect("bcrypt");
                std::fs::write(root.join("htpasswd"), format!("{user}:{hash}\n"))
                    .expect("htpasswd");
                format!(
                    "auth:\n  htpasswd:\n    realm: standin\n    path: {}\n",
                    root.join("htpasswd").display()
                )
            }
            None => String::new(),
        };
        let config = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {}\n{auth}",
            root.join("storage").display(),
            self.addr
        );
        std::fs::write(root.join("config.yml"), config).expect("config");
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("access.log")
    }

    /// Starts (again) on the same port and storage, and waits until it answers.
    pub async fn resume(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log");
        let child = Command::new(BINARY)
            .arg("serve")
            .arg(self.dir.path().join("config.yml"))
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start docker-registry");
        self.child = Some(child);
        let addr = self.addr;
        super::wait_until(
            Duration::from_secs(20),
            "the stand-in registry answers",
            || async move { tokio::net::TcpStream::connect(addr).await.ok().map(|_| ()) },
        )
        .await;
    }

    /// Stops it (its port then refuses connections).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The URL a node's `[[upstream]]` gives for it.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How many requests of `method` for `path` it served with a 2xx or 3xx status, from its
    /// access log.
    pub fn served(&self, method: &str, path: &str) -> usize {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let wanted = format!("\"{method} {path} ");
        log.lines()
            .filter(|l| l.contains(&wanted))
            .filter(|l| {
                l.split(&wanted)
                    .nth(1)
                    .and_then(|rest| rest.split('"').nth(1))
                    .and_then(|s| s.split_whitespace().next())
                    .is_some_and(|status| status.starts_with('2') || status.starts_with('3'))
            })
            .count()
    }

    /// How many times it served blob `digest` of `repo` in full.
    pub fn blob_gets(&self, repo: &str, digest: &Digest) -> usize {
        self.served("GET", &format!("/v2/{repo}/blobs/{digest}"))
    }

    fn authorization(&self) -> Vec<(&'static str, String)> {
        use base64::Engine as _;
        match &self.creds {
            Some((u, p)) => vec![(
                "Authorization",
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
                ),
            )],
            None => Vec::new(),
        }
    }

    /// Pushes `image` as `repo:tag` (uploads in two steps, as distribution wants them).
    pub async fn push(&self, repo: &str, tag: &str, image: &Image) {
        let auth = self.authorization();
        let auth: Vec<(&str, &str)> = auth.iter().map(|(k, v)| (*k, v.as_str())).collect();
        for b in &image.blobs {
            let d = Digest::sha256(b);
            let r = http(
                self.addr,
                "POST",
                &format!("/v2/{repo}/blobs/uploads/"),
                &auth,
                b"",
            )
            .await;
            assert_eq!(
                r.status,
                202,
                "upload start: {}",
                String::from_utf8_lossy(&r.body)
            );
            let location = r.header("location").expect("a Location").to_owned();
            let path = location
                .strip_prefix(&format!("http://{}", self.addr))
                .unwrap_or(&location)
                .to_owned();
            let sep = if path.contains('?') { '&' } else { '?' };
            let r = http(
                self.addr,
                "PUT",
                &format!("{path}{sep}digest={d}"),
                &auth,
                b,
            )
            .await;
            assert_eq!(
                r.status,
                201,
                "upload: {}",
                String::from_utf8_lossy(&r.body)
            );
        }
        let mut headers = auth.clone();
        headers.push(("Content-Type", "application/vnd.oci.image.manifest.v1+json"));
        let r = http(
            self.addr,
            "PUT",
            &format!("/v2/{repo}/manifests/{tag}"),
            &headers,
            &image.manifest,
        )
        .await;
        assert_eq!(
            r.status,
            201,
            "manifest: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
}
