//! Credentials for an upstream: the configured ones, and those a docker `config.json` or its
//! credential helper holds.
//!
//! The docker config is the operator's file, but what it names still runs as a program on the
//! node, so a helper's name is checked (no path separators) and the helper gets a time limit and
//! a bounded output. Nothing read here is quoted in an error: a malformed `auth` or a helper's
//! broken answer is reported by position, never by content.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use base64::Engine as _;
use serde::Deserialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::config::{MAX_CREDENTIAL_FILE_BYTES, Secret};

/// How long a `docker-credential-*` helper may take.
pub const HELPER_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest answer read from a helper.
const MAX_HELPER_OUTPUT_BYTES: u64 = 64 * 1024;
/// The key docker uses for Docker Hub in `auths` and with helpers.
const DOCKER_HUB_KEY: &str = "https://index.docker.io/v1/";

/// What is sent to a registry or its token service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Login {
    /// User name and password, for Basic auth and for the token service.
    Basic { username: String, password: Secret },
    /// An OAuth2 refresh token (docker's `identitytoken`), exchanged at the token service.
    IdentityToken(Secret),
}

/// Why credentials from a docker config cannot be had. Never quotes what the file or the helper
/// holds.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// The docker config cannot be read.
    #[error("cannot read docker config {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The docker config is larger than 1 MiB.
    #[error("docker config {} is too large", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// The docker config is not the JSON docker writes.
    #[error("docker config {} is not valid JSON of a docker config (line {line}, column {column})", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// Where it goes wrong.
        line: usize,
        /// Where it goes wrong.
        column: usize,
    },
    /// An `auths` entry's `auth` is not base64 of `user:password`.
    #[error("docker config {}: the auth entry for {key:?} is not base64 of user:password", path.display())]
    BadAuth {
        /// The file.
        path: PathBuf,
        /// The `auths` key.
        key: String,
    },
    /// `credHelpers` or `credsStore` names something that is not a helper name.
    #[error("docker config names credential helper {helper:?}, which is not a valid helper name")]
    HelperName {
        /// The name, cut to 64 characters.
        helper: String,
    },
    /// The helper program cannot be started.
    #[error("cannot run docker-credential-{helper}")]
    HelperSpawn {
        /// The helper's name.
        helper: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The helper did not answer in time; it was killed.
    #[error("docker-credential-{helper} did not answer in time")]
    HelperTimeout {
        /// The helper's name.
        helper: String,
    },
    /// The helper exited with an error (its output is not shown: it may hold a secret).
    #[error("docker-credential-{helper} failed ({status})")]
    HelperFailed {
        /// The helper's name.
        helper: String,
        /// How it exited.
        status: ExitStatus,
    },
    /// The helper's answer is not `{"Username": …, "Secret": …}`.
    #[error("docker-credential-{helper} answered something that is not its JSON")]
    HelperOutput {
        /// The helper's name.
        helper: String,
    },
}

#[derive(Deserialize, Default)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: BTreeMap<String, String>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
}

#[derive(Deserialize, Default)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

#[derive(Deserialize)]
struct HelperAnswer {
    #[serde(rename = "Username")]
    username: String,
    #[serde(rename = "Secret")]
    secret: String,
}

/// The credentials `config.json` at `path` holds for registry `name`, or `None` when it holds
/// none (the registry is then asked anonymously).
///
/// Order: a `credHelpers` entry for the registry, then an `auths` entry with inline
/// credentials, then `credsStore`. Cancel-safe: a helper still running is killed on drop.
pub(crate) async fn from_docker_config(
    path: &Path,
    name: &str,
) -> Result<Option<Login>, CredentialError> {
    let config = read_docker_config(path).await?;
    let keys = lookup_keys(name);
    if let Some(helper) = keys.iter().find_map(|k| config.cred_helpers.get(k)) {
        return run_helper(helper, server_for_helper(name)).await;
    }
    for (key, entry) in &config.auths {
        if !keys.iter().any(|k| k == key) && !key_names_host(key, name) {
            continue;
        }
        if let Some(login) = login_from_entry(path, key, entry)? {
            return Ok(Some(login));
        }
    }
    match &config.creds_store {
        Some(store) if !store.is_empty() => run_helper(store, server_for_helper(name)).await,
        _ => Ok(None),
    }
}

async fn read_docker_config(path: &Path) -> Result<DockerConfig, CredentialError> {
    let read_err = |source| CredentialError::Read {
        path: path.to_owned(),
        source,
    };
    let file = tokio::fs::File::open(path).await.map_err(read_err)?;
    let mut bytes = Vec::new();
    file.take(MAX_CREDENTIAL_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .await
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_CREDENTIAL_FILE_BYTES {
        return Err(CredentialError::TooLarge {
            path: path.to_owned(),
        });
    }
    // serde_json's message can quote a value of the file (a password of the wrong type); keep
    // only the position.
    serde_json::from_slice(&bytes).map_err(|e| CredentialError::Parse {
        path: path.to_owned(),
        line: e.line(),
        column: e.column(),
    })
}

/// The `auths`/`credHelpers` keys docker would use for registry `name`.
fn lookup_keys(name: &str) -> Vec<String> {
    if name == "docker.io" {
        return [
            DOCKER_HUB_KEY,
            "index.docker.io",
            "docker.io",
            "registry-1.docker.io",
        ]
        .map(String::from)
        .to_vec();
    }
    vec![
        name.to_owned(),
        format!("https://{name}"),
        format!("http://{name}"),
    ]
}

/// Whether an `auths` key such as `https://registry.example.com/v1/` names host `name`.
fn key_names_host(key: &str, name: &str) -> bool {
    let rest = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    rest.split('/').next() == Some(name)
}

/// What a helper is told on stdin: the Docker Hub key, or the host.
fn server_for_helper(name: &str) -> &str {
    if name == "docker.io" {
        DOCKER_HUB_KEY
    } else {
        name
    }
}

fn login_from_entry(
    path: &Path,
    key: &str,
    entry: &AuthEntry,
) -> Result<Option<Login>, CredentialError> {
    if let Some(token) = entry.identitytoken.as_deref().filter(|t| !t.is_empty()) {
        return Ok(Some(Login::IdentityToken(Secret::new(token))));
    }
    let bad_auth = || CredentialError::BadAuth {
        path: path.to_owned(),
        key: key.chars().take(128).collect(),
    };
    if let Some(auth) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|_| bad_auth())?;
        let decoded = String::from_utf8(decoded).map_err(|_| bad_auth())?;
        let (user, pass) = decoded.split_once(':').ok_or_else(bad_auth)?;
        return Ok(Some(Login::Basic {
            username: user.to_owned(),
            password: Secret::new(pass),
        }));
    }
    match (&entry.username, &entry.password) {
        (Some(u), Some(p)) if !u.is_empty() => Ok(Some(Login::Basic {
            username: u.clone(),
            password: Secret::new(p.as_str()),
        })),
        _ => Ok(None),
    }
}

/// Whether `helper` can only name a `docker-credential-<helper>` program on `PATH`.
fn is_helper_name(helper: &str) -> bool {
    !helper.is_empty()
        && helper.len() <= 64
        && !helper.starts_with('.')
        && helper
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Runs `docker-credential-<helper> get` with `server` on stdin.
async fn run_helper(helper: &str, server: &str) -> Result<Option<Login>, CredentialError> {
    if !is_helper_name(helper) {
        return Err(CredentialError::HelperName {
            helper: helper.chars().take(64).collect(),
        });
    }
    let program = PathBuf::from(format!("docker-credential-{helper}"));
    run_program(&program, helper, server, HELPER_TIMEOUT).await
}

/// Runs `program get` as helper `helper`, killing it after `timeout`.
async fn run_program(
    program: &Path,
    helper: &str,
    server: &str,
    timeout: Duration,
) -> Result<Option<Login>, CredentialError> {
    let run = async {
        let mut child = tokio::process::Command::new(program)
            .arg("get")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| CredentialError::HelperSpawn {
                helper: helper.to_owned(),
                source,
            })?;
        let spawn_io = |source| CredentialError::HelperSpawn {
            helper: helper.to_owned(),
            source,
        };
        if let Some(mut stdin) = child.stdin.take() {
            // A helper that does not read stdin closes the pipe: its answer still counts.
            let _ = stdin.write_all(server.as_bytes()).await;
            // Dropping stdin closes it: the helper reads to end of file.
        }
        let mut out = Vec::new();
        if let Some(stdout) = child.stdout.take() {
            stdout
                .take(MAX_HELPER_OUTPUT_BYTES)
                .read_to_end(&mut out)
                .await
                .map_err(spawn_io)?;
        }
        let status = child.wait().await.map_err(spawn_io)?;
        Ok::<_, CredentialError>((status, out))
    };
    let (status, out) = tokio::time::timeout(timeout, run).await.map_err(|_| {
        CredentialError::HelperTimeout {
            helper: helper.to_owned(),
        }
    })??;
    if !status.success() {
        // The helper protocol's answer for an unknown server: ask anonymously.
        if String::from_utf8_lossy(&out).contains("credentials not found") {
            return Ok(None);
        }
        return Err(CredentialError::HelperFailed {
            helper: helper.to_owned(),
            status,
        });
    }
    let answer: HelperAnswer =
        serde_json::from_slice(&out).map_err(|_| CredentialError::HelperOutput {
            helper: helper.to_owned(),
        })?;
    if answer.username == "<token>" {
        return Ok(Some(Login::IdentityToken(Secret::new(answer.secret))));
    }
    if answer.username.is_empty() && answer.secret.is_empty() {
        return Ok(None);
    }
    Ok(Some(Login::Basic {
        username: answer.username,
        password: Secret::new(answer.secret),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[tokio::test]
    async fn auths_entries() {
        let dir = tempfile::tempdir().unwrap();
        let auth = base64::engine::general_purpose::STANDARD.encode("bob:hunter2");
        let p = write(
            &dir,
            "config.json",
            &format!(
                r#"{{"auths": {{
                    "https://index.docker.io/v1/": {{"auth": "{auth}"}},
                    "https://reg.example.com:5000/v2/": {{"auth": "{auth}"}},
                    "ghcr.io": {{"identitytoken": "refresh-me"}}
                }}}}"#
            ),
        )
        .to_owned();
        let basic = Some(Login::Basic {
            username: "bob".into(),
            password: Secret::new("hunter2"),
        });
        assert_eq!(from_docker_config(&p, "docker.io").await.unwrap(), basic);
        assert_eq!(
            from_docker_config(&p, "reg.example.com:5000")
                .await
                .unwrap(),
            basic
        );
        assert_eq!(
            from_docker_config(&p, "ghcr.io").await.unwrap(),
            Some(Login::IdentityToken(Secret::new("refresh-me")))
        );
        assert_eq!(from_docker_config(&p, "quay.io").await.unwrap(), None);
        assert_eq!(
            from_docker_config(&p, "reg.example.com").await.unwrap(),
            None
        );
    }

    /// A malformed file or entry is reported without what it holds.
    #[tokio::test]
    async fn bad_files_do_not_quote_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            &dir,
            "a.json",
            r#"{"auths": {"a.io": {"auth": "hunter2-not-base64!"}}}"#,
        );
        let e = from_docker_config(&p, "a.io").await.unwrap_err();
        assert!(matches!(e, CredentialError::BadAuth { .. }));
        assert!(!format!("{e} {e:?}").contains("hunter2"));
        let p = write(
            &dir,
            "b.json",
            r#"{"auths": {"a.io": {"auth": 1, "password": ["hunter2"]}}}"#,
        );
        let e = from_docker_config(&p, "a.io").await.unwrap_err();
        assert!(matches!(e, CredentialError::Parse { .. }));
        assert!(!format!("{e} {e:?}").contains("hunter2"), "{e:?}");
    }

    fn script(dir: &tempfile::TempDir, name: &str, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt as _;
        let p = write(dir, name, &format!("#!/bin/sh\n{body}\n"));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    /// The helper protocol: the server on stdin, `{"Username","Secret"}` on stdout, `<token>`
    /// for an identity token, "credentials not found" for none.
    #[tokio::test]
    async fn helpers_answer_by_protocol() {
        let dir = tempfile::tempdir().unwrap();
        let t = Duration::from_secs(10);
        let p = script(
            &dir,
            "basic",
            r#"[ "$1" = get ] || exit 3; read -r s; [ "$s" = "reg.io:5000" ] || exit 4; echo '{"ServerURL":"reg.io:5000","Username":"bob","Secret":"hunter2"}'"#,
        );
        assert_eq!(
            run_program(&p, "basic", "reg.io:5000", t).await.unwrap(),
            Some(Login::Basic {
                username: "bob".into(),
                password: Secret::new("hunter2")
            })
        );
        let p = script(
            &dir,
            "token",
            r#"echo '{"Username":"<token>","Secret":"refresh"}'"#,
        );
        assert_eq!(
            run_program(&p, "token", "a.io", t).await.unwrap(),
            Some(Login::IdentityToken(Secret::new("refresh")))
        );
        let p = script(
            &dir,
            "none",
            "echo 'credentials not found in native keychain'; exit 1",
        );
        assert_eq!(run_program(&p, "none", "a.io", t).await.unwrap(), None);
        let p = script(&dir, "fails", "echo 'hunter2 leaked on failure'; exit 2");
        let e = run_program(&p, "fails", "a.io", t).await.unwrap_err();
        assert!(matches!(e, CredentialError::HelperFailed { .. }), "{e:?}");
        assert!(!format!("{e} {e:?}").contains("hunter2"));
        let p = script(&dir, "garbage", "echo 'hunter2 is not json'");
        let e = run_program(&p, "garbage", "a.io", t).await.unwrap_err();
        assert!(matches!(e, CredentialError::HelperOutput { .. }), "{e:?}");
        assert!(!format!("{e} {e:?}").contains("hunter2"));
    }

    /// A helper that hangs is killed after the time limit instead of holding the pull.
    #[tokio::test]
    async fn a_hanging_helper_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let p = script(&dir, "hang", "exec sleep 30");
        let started = std::time::Instant::now();
        let e = run_program(&p, "hang", "a.io", Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(e, CredentialError::HelperTimeout { .. }), "{e:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn helper_names_cannot_be_paths() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            &dir,
            "c.json",
            r#"{"credHelpers": {"a.io": "../../bin/sh"}}"#,
        );
        let e = from_docker_config(&p, "a.io").await.unwrap_err();
        assert!(matches!(e, CredentialError::HelperName { .. }), "{e:?}");
        let p = write(
            &dir,
            "d.json",
            r#"{"credsStore": "shoal-test-no-such-helper"}"#,
        );
        let e = from_docker_config(&p, "a.io").await.unwrap_err();
        assert!(matches!(e, CredentialError::HelperSpawn { .. }), "{e:?}");
    }
}
