//! The CLI's side of the admin API: HTTP/1.1 over the node's admin socket (`admin.sock` in the
//! data directory), one request per connection.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// How long the CLI waits for the node.
const TIMEOUT: Duration = Duration::from_secs(30);

/// The admin socket of one data directory.
pub struct AdminClient {
    socket: PathBuf,
}

impl AdminClient {
    /// The client for the node running on `data_dir`.
    pub fn new(data_dir: &Path) -> AdminClient {
        AdminClient {
            socket: data_dir.join(shoal_node::registry::server::ADMIN_SOCKET),
        }
    }

    /// Whether a node seems to run there (its socket exists).
    pub fn exists(&self) -> bool {
        self.socket.exists()
    }

    fn request(&self, method: &str, path: &str, body: Option<Vec<u8>>) -> anyhow::Result<String> {
        let mut s = UnixStream::connect(&self.socket).with_context(|| {
            format!(
                "connecting to the node's admin socket {} (is the node running?)",
                self.socket.display()
            )
        })?;
        s.set_read_timeout(Some(TIMEOUT))?;
        s.set_write_timeout(Some(TIMEOUT))?;
        let body = body.unwrap_or_default();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )?;
        s.write_all(&body)?;
        let mut response = Vec::new();
        s.read_to_end(&mut response)?;
        let response = String::from_utf8(response).context("the node's answer is not UTF-8")?;
        let (head, body) = response
            .split_once("\r\n\r\n")
            .context("malformed HTTP response")?;
        let status = head.split(' ').nth(1).unwrap_or("");
        let body = if head.lines().any(|l| {
            l.to_ascii_lowercase()
                .starts_with("transfer-encoding: chunked")
        }) {
            dechunk(body)
        } else {
            body.to_owned()
        };
        if !status.starts_with('2') {
            let message = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["errors"][0]["message"].as_str().map(str::to_owned))
                .unwrap_or_else(|| head.lines().next().unwrap_or("").to_owned());
            anyhow::bail!("the node answered {status}: {message}");
        }
        Ok(body)
    }

    /// GETs `path` and decodes the JSON answer.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let body = self.request("GET", path, None)?;
        serde_json::from_str(&body).context("the node's answer is not what was expected")
    }

    /// POSTs `body` as JSON to `path` and decodes the JSON answer.
    pub fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        let body = self.request("POST", path, Some(serde_json::to_vec(body)?))?;
        serde_json::from_str(&body).context("the node's answer is not what was expected")
    }

    /// POSTs `body` as JSON to `path`, expecting no answer body.
    pub fn post_empty_json<B: Serialize>(&self, path: &str, body: &B) -> anyhow::Result<()> {
        self.request("POST", path, Some(serde_json::to_vec(body)?))
            .map(|_| ())
    }

    /// POSTs nothing to `path`.
    pub fn post_empty(&self, path: &str) -> anyhow::Result<()> {
        self.request("POST", path, Some(Vec::new())).map(|_| ())
    }
}

fn dechunk(mut b: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = b.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        b = rest[n..].trim_start_matches("\r\n");
    }
    out
}
