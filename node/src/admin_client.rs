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
/// The largest chunk of a streamed answer the CLI reads (the node sends one line per chunk).
const MAX_CHUNK_BYTES: usize = 1 << 20;

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

    /// POSTs `body` as JSON to `path` and hands each line of the answer (newline-delimited
    /// JSON, streamed) to `on_line` as it arrives. The node must send something at least every
    /// [`TIMEOUT`].
    pub fn post_streaming<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        mut on_line: impl FnMut(T),
    ) -> anyhow::Result<()> {
        use std::io::BufRead;
        let mut s = self.connect()?;
        let body = serde_json::to_vec(body)?;
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )?;
        s.write_all(&body)?;
        let mut r = std::io::BufReader::new(s);
        let mut head = Vec::new();
        loop {
            let mut line = String::new();
            if r.read_line(&mut line)? == 0 {
                anyhow::bail!("the node closed the connection before answering");
            }
            let line = line.trim_end().to_owned();
            if line.is_empty() {
                break;
            }
            head.push(line);
        }
        let status = head
            .first()
            .and_then(|l| l.split(' ').nth(1))
            .unwrap_or("")
            .to_owned();
        let chunked = head.iter().any(|l| {
            l.to_ascii_lowercase()
                .starts_with("transfer-encoding: chunked")
        });
        let mut pending = Vec::new();
        let mut feed = |bytes: &[u8], pending: &mut Vec<u8>| -> anyhow::Result<()> {
            pending.extend_from_slice(bytes);
            if !status.starts_with('2') {
                // An error body: read whole below.
                return Ok(());
            }
            while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                if line.len() > 1 {
                    on_line(
                        serde_json::from_slice(&line)
                            .context("the node's answer is not what was expected")?,
                    );
                }
            }
            Ok(())
        };
        if chunked {
            loop {
                let mut size = String::new();
                r.read_line(&mut size)?;
                let n =
                    usize::from_str_radix(size.trim(), 16).context("malformed chunked answer")?;
                if n == 0 {
                    break;
                }
                anyhow::ensure!(n <= MAX_CHUNK_BYTES, "the node sent a chunk of {n} bytes");
                let mut chunk = vec![0; n];
                r.read_exact(&mut chunk)?;
                let mut crlf = [0; 2];
                r.read_exact(&mut crlf)?;
                feed(&chunk, &mut pending)?;
            }
        } else {
            let mut rest = Vec::new();
            r.read_to_end(&mut rest)?;
            feed(&rest, &mut pending)?;
        }
        if !status.starts_with('2') {
            let text = String::from_utf8_lossy(&pending);
            let message = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v["errors"][0]["message"].as_str().map(str::to_owned))
                .unwrap_or_else(|| head.first().cloned().unwrap_or_default());
            anyhow::bail!("the node answered {status}: {message}");
        }
        Ok(())
    }

    fn connect(&self) -> anyhow::Result<UnixStream> {
        let s = UnixStream::connect(&self.socket).with_context(|| {
            format!(
                "connecting to the node's admin socket {} (is the node running?)",
                self.socket.display()
            )
        })?;
        s.set_read_timeout(Some(TIMEOUT))?;
        s.set_write_timeout(Some(TIMEOUT))?;
        Ok(s)
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
