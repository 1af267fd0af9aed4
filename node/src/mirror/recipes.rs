//! What containerd and docker need to be told to pull through this node: the text of
//! containerd's `hosts.toml` files and `config.toml` lines, and docker's `daemon.json` lines
//! (`shoal mirror containerd|docker`).
//!
//! Everything here is pure: it turns the node's settings into text, and writes files only in
//! [`write_hosts`]. No credential of an upstream is ever part of a recipe: the clients talk to
//! the node, and only the node talks to the upstreams.
//!
//! containerd sends a mirror every request of a registry that has a `hosts.toml` naming the
//! mirror, with `?ns=<registry>`; when the mirror does not answer (or answers 404), it tries the
//! file's `server`, the registry itself. docker's `registry-mirrors` only ever mirror Docker Hub
//! and send no `ns`: the node's `default_upstream` takes those requests.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use crate::config::{Config, MirrorConfig};
use crate::mirror::route::{DOCKER_HUB, Routes};

/// Where containerd's CRI plugin looks for `hosts.toml` files, as containerd's docs suggest.
pub const DEFAULT_HOSTS_DIR: &str = "/etc/containerd/certs.d";
/// The `hosts.toml` namespace containerd uses for registries that have none of their own.
pub const DEFAULT_NAMESPACE: &str = "_default";
/// How long containerd may take to connect to the node before it goes to the registry itself.
/// The node is on the same host (or close by): a connection that takes longer is a node that
/// is down.
pub const DIAL_TIMEOUT: &str = "1s";
/// The first containerd release that reads `dial_timeout` (containerd/containerd#11106).
const DIAL_TIMEOUT_SINCE: &str = "2.1";
/// Docker Hub's registry API, where containerd goes when the node does not answer.
const DOCKER_HUB_SERVER: &str = "https://registry-1.docker.io";

/// How clients on this host reach the node's registry API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeEndpoint {
    /// `http://127.0.0.1:5000`: scheme, host and port, nothing else.
    origin: url::Url,
    /// A PEM file containerd should trust for the node's certificate (its own chain).
    pub ca: Option<PathBuf>,
    /// Whether containerd should accept any certificate from the node.
    pub skip_verify: bool,
}

/// Why a recipe cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    /// `--node` is not a URL.
    #[error("the node URL is not a valid URL")]
    Url(#[source] url::ParseError),
    /// `--node` is a URL, but not one of a registry's root.
    #[error(
        "the node URL must be http:// or https://, a host and a port, without a path, user or query"
    )]
    NotOrigin,
    /// An upstream's name cannot be a directory name (the configuration checks prevent it).
    #[error("upstream {0:?} cannot name a hosts.toml directory")]
    BadName(String),
    /// The upstreams do not make valid routes.
    #[error("mirror settings")]
    Routes(#[source] crate::mirror::route::RoutesError),
    /// A `hosts.toml` file cannot be written.
    #[error("writing {}", path.display())]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl NodeEndpoint {
    /// The endpoint of a node with `config`: its listen address (loopback when it listens on
    /// every address) and scheme, trusting its own certificate when it serves HTTPS.
    pub fn of(config: &Config) -> Result<NodeEndpoint, RecipeError> {
        let addr = reachable(config.listen);
        let scheme = if config.access.tls.is_some() {
            "https"
        } else {
            "http"
        };
        Ok(NodeEndpoint {
            ca: config.access.tls.as_ref().map(|(cert, _)| cert.clone()),
            ..NodeEndpoint::parse(&format!("{scheme}://{addr}"))?
        })
    }

    /// An endpoint given as a URL (`--node https://node.example:5000`).
    pub fn parse(url: &str) -> Result<NodeEndpoint, RecipeError> {
        let origin = url::Url::parse(url).map_err(RecipeError::Url)?;
        let plain = matches!(origin.scheme(), "http" | "https")
            && origin.host_str().is_some_and(|h| !h.is_empty())
            && origin.username().is_empty()
            && origin.password().is_none()
            && origin.path() == "/"
            && origin.query().is_none()
            && origin.fragment().is_none();
        if !plain {
            return Err(RecipeError::NotOrigin);
        }
        Ok(NodeEndpoint {
            origin,
            ca: None,
            skip_verify: false,
        })
    }

    /// `http://127.0.0.1:5000`, as clients are told it (no trailing slash).
    pub fn url(&self) -> String {
        self.origin.as_str().trim_end_matches('/').to_owned()
    }

    /// `127.0.0.1:5000`, as image references name the node.
    pub fn host_port(&self) -> String {
        let host = self.origin.host_str().unwrap_or("127.0.0.1");
        match self.origin.port_or_known_default() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        }
    }

    /// Whether clients reach the node over HTTPS.
    pub fn is_https(&self) -> bool {
        self.origin.scheme() == "https"
    }

    /// Whether the node is on this host's loopback (`localhost`, `127.0.0.0/8`, `::1`), which
    /// docker allows over plain HTTP without configuration.
    pub fn is_loopback(&self) -> bool {
        match self.origin.host() {
            Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
            Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
            Some(url::Host::Domain(d)) => d == "localhost",
            None => false,
        }
    }
}

/// An address of `listen` that a client on the same host can connect to.
fn reachable(listen: SocketAddr) -> SocketAddr {
    match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::from((Ipv4Addr::LOCALHOST, listen.port()))
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::from((Ipv6Addr::LOCALHOST, listen.port()))
        }
        _ => listen,
    }
}

/// One `hosts.toml` file: `<hosts dir>/<namespace>/hosts.toml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostsFile {
    /// The directory under the hosts dir: a registry host (`docker.io`, `ghcr.io`,
    /// `registry.example.com:5000`) or `_default`.
    pub namespace: String,
    /// The file's text.
    pub text: String,
}

/// The `hosts.toml` files that send pulls of every upstream of `mirror` to `node`, and one for
/// `_default`.
///
/// Each upstream's file lets the node `pull` and `resolve` (turn tags into digests): the node
/// resolves those tags from the upstream, or from the fleet's signed records of them, and the
/// operator chose it as that upstream's mirror. The `_default` file, for registries the node
/// does not mirror, only lets it `pull`: the node answers such requests from the fleet's own
/// repositories, so resolving there would let whoever may push `team/app` to the fleet decide
/// what `any.registry/team/app:1` means on every host. Content pulled by digest is checked by
/// containerd, whoever serves it.
pub fn containerd_hosts(
    mirror: &MirrorConfig,
    node: &NodeEndpoint,
) -> Result<Vec<HostsFile>, RecipeError> {
    let routes = mirror.routes().map_err(RecipeError::Routes)?;
    let mut files = Vec::with_capacity(mirror.upstreams.len() + 1);
    for (i, upstream) in mirror.upstreams.iter().enumerate() {
        let docker_hub = routes.by_name(DOCKER_HUB) == Some(i);
        let namespace = if docker_hub {
            DOCKER_HUB.to_owned()
        } else {
            upstream.name.clone()
        };
        if !is_directory_name(&namespace) {
            return Err(RecipeError::BadName(upstream.name.clone()));
        }
        let server = if docker_hub {
            DOCKER_HUB_SERVER.to_owned()
        } else {
            format!("https://{}", upstream.name)
        };
        let mut text = format!(
            "# Written by `shoal mirror containerd`: pulls of {namespace} go to the Shoal node\n\
             # first; when it does not answer, containerd goes to `server`, the registry itself.\n\
             server = {}\n\n",
            quote(&server)
        );
        text.push_str(&host_table(node, &["pull", "resolve"]));
        files.push(HostsFile { namespace, text });
    }
    let mut text = String::from(
        "# Written by `shoal mirror containerd`: registries without a hosts.toml of their own.\n\
         # The node only serves content by digest here (containerd checks every digest); tags are\n\
         # resolved by the registry itself, since the node would answer them from the fleet's own\n\
         # repositories of the same name.\n\n",
    );
    text.push_str(&host_table(node, &["pull"]));
    files.push(HostsFile {
        namespace: DEFAULT_NAMESPACE.to_owned(),
        text,
    });
    Ok(files)
}

/// The `[host."<node>"]` table with `capabilities`, the dial timeout and the TLS settings.
fn host_table(node: &NodeEndpoint, capabilities: &[&str]) -> String {
    let caps: Vec<String> = capabilities.iter().map(|c| quote(c)).collect();
    let mut table = format!(
        "[host.{}]\n  capabilities = [{}]\n\
         \x20 # Read by containerd {DIAL_TIMEOUT_SINCE} and later; older releases ignore it and wait up to\n\
         \x20 # 30 s for a node that is down before they go to the registry.\n\
         \x20 dial_timeout = {}\n",
        quote(&node.url()),
        caps.join(", "),
        quote(DIAL_TIMEOUT)
    );
    if node.is_https() {
        if let Some(ca) = &node.ca {
            table.push_str(&format!(
                "  # The node's own certificate; it must name {}.\n  ca = {}\n",
                node.origin.host_str().unwrap_or_default(),
                quote(&ca.to_string_lossy())
            ));
        }
        if node.skip_verify {
            table.push_str("  skip_verify = true\n");
        }
    }
    table
}

/// The `config.toml` lines that make containerd's CRI plugin read `hosts_dir`, for both
/// containerd 1.x (config version 2) and 2.x (config version 3).
pub fn containerd_config(hosts_dir: &Path) -> String {
    let path = quote(&hosts_dir.to_string_lossy());
    format!(
        "# containerd 2.x (/etc/containerd/config.toml, version = 3):\n\
         [plugins.\"io.containerd.cri.v1.images\".registry]\n  config_path = {path}\n\n\
         # containerd 1.x (/etc/containerd/config.toml, version = 2):\n\
         # [plugins.\"io.containerd.grpc.v1.cri\".registry]\n#   config_path = {path}\n\n\
         # Remove any `mirrors` table and `configs` TLS settings under `registry`: containerd\n\
         # refuses config_path beside them. `ctr images pull --hosts-dir {dir}` reads the files\n\
         # directly. No restart is needed when the files change.\n",
        dir = hosts_dir.display()
    )
}

/// docker's `daemon.json` lines that make `node` Docker Hub's mirror.
pub fn docker_daemon_json(node: &NodeEndpoint) -> String {
    let value = serde_json::json!({ "registry-mirrors": [node.url()] });
    serde_json::to_string_pretty(&value).unwrap_or_default()
}

/// What a docker user must know besides the `daemon.json` lines.
pub fn docker_notes(mirror: &MirrorConfig, node: &NodeEndpoint) -> Vec<String> {
    let mut notes = Vec::new();
    let hub_is_default = mirror
        .routes()
        .ok()
        .and_then(|routes| {
            let hub = routes.by_name(DOCKER_HUB)?;
            let default = mirror.default.as_deref()?;
            (routes.by_name(default) == Some(hub)).then_some(())
        })
        .is_some();
    if !hub_is_default {
        notes.push(
            "the node has no `default_upstream = \"docker.io\"` with a `[[upstream]]` named docker.io: \
             docker's mirror requests will find only the fleet's own repositories"
                .to_owned(),
        );
    }
    if !node.is_https() && !node.is_loopback() {
        notes.push(format!(
            "docker talks plain HTTP to {} only if it is also listed in daemon.json's \
             \"insecure-registries\"",
            node.host_port()
        ));
    }
    if node.is_https() {
        notes.push(format!(
            "docker must trust the node's certificate: copy it to /etc/docker/certs.d/{}/ca.crt",
            node.host_port()
        ));
    }
    notes.push("restart docker after changing daemon.json (`systemctl restart docker`)".to_owned());
    let others: Vec<String> = mirror
        .upstreams
        .iter()
        .filter(|u| {
            Routes::new([u.name.as_str()], None)
                .ok()
                .and_then(|r| r.by_name(DOCKER_HUB))
                .is_none()
        })
        .filter_map(|u| crate::mirror::route::namespace_of(&u.name))
        .collect();
    let example = others.first().map_or("ghcr.io", String::as_str);
    notes.push(format!(
        "registry-mirrors cover Docker Hub only; pull other upstreams through the node by name: \
         docker pull {}/<upstream namespace>/<repo>:<tag>, e.g. {}/{example}/org/tool:1{}",
        node.host_port(),
        node.host_port(),
        if others.is_empty() {
            String::new()
        } else {
            format!(" (this node's: {})", others.join(", "))
        }
    ));
    notes
}

/// Writes `files` under `dir` (`dir/<namespace>/hosts.toml`), creating the directories.
pub fn write_hosts(dir: &Path, files: &[HostsFile]) -> Result<Vec<PathBuf>, RecipeError> {
    let mut written = Vec::with_capacity(files.len());
    for file in files {
        if !is_directory_name(&file.namespace) {
            return Err(RecipeError::BadName(file.namespace.clone()));
        }
        let sub = dir.join(&file.namespace);
        std::fs::create_dir_all(&sub).map_err(|source| RecipeError::Write {
            path: sub.clone(),
            source,
        })?;
        let path = sub.join("hosts.toml");
        std::fs::write(&path, &file.text).map_err(|source| RecipeError::Write {
            path: path.clone(),
            source,
        })?;
        written.push(path);
    }
    Ok(written)
}

/// Whether `name` is one plain directory name: not empty, no separator, not `.` or `..`.
fn is_directory_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && !name.contains(['/', '\\', '\0'])
        && name.chars().all(|c| !c.is_control())
}

/// `s` as a TOML basic string, escaped.
fn quote(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FileConfig;
    use crate::mirror::upstream::UpstreamConfig;

    fn mirror(names: &[&str], default: Option<&str>) -> MirrorConfig {
        MirrorConfig {
            upstreams: names
                .iter()
                .map(|n| UpstreamConfig::new(*n, format!("https://{n}")))
                .collect(),
            default: default.map(str::to_owned),
        }
    }

    fn node() -> NodeEndpoint {
        NodeEndpoint::parse("http://127.0.0.1:5000").unwrap()
    }

    fn parse(file: &HostsFile) -> toml::Table {
        file.text
            .parse::<toml::Table>()
            .unwrap_or_else(|e| panic!("{}: {e}\n{}", file.namespace, file.text))
    }

    fn host<'t>(t: &'t toml::Table, url: &str) -> &'t toml::Table {
        t["host"][url]
            .as_table()
            .unwrap_or_else(|| panic!("no host {url}: {t:?}"))
    }

    fn strings(v: &toml::Value) -> Vec<&str> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap())
            .collect()
    }

    #[test]
    fn every_upstream_and_default_get_a_file_pointing_at_the_node() {
        let m = mirror(
            &["docker.io", "ghcr.io", "registry.example.com:5000"],
            Some("docker.io"),
        );
        let files = containerd_hosts(&m, &node()).unwrap();
        let names: Vec<&str> = files.iter().map(|f| f.namespace.as_str()).collect();
        assert_eq!(
            names,
            [
                "docker.io",
                "ghcr.io",
                "registry.example.com:5000",
                "_default"
            ]
        );
        let servers = [
            "https://registry-1.docker.io",
            "https://ghcr.io",
            "https://registry.example.com:5000",
        ];
        for (file, server) in files.iter().zip(servers) {
            let t = parse(file);
            assert_eq!(t["server"].as_str(), Some(server), "{}", file.namespace);
            let h = host(&t, "http://127.0.0.1:5000");
            assert_eq!(strings(&h["capabilities"]), ["pull", "resolve"]);
            assert_eq!(h["dial_timeout"].as_str(), Some(DIAL_TIMEOUT));
            assert!(!h.contains_key("ca") && !h.contains_key("skip_verify"));
        }
        let default = parse(&files[3]);
        assert!(
            !default.contains_key("server"),
            "the registry itself stays the fallback"
        );
    }

    /// A fleet member that may push `team/app` must not decide what `quay.io/team/app:1` is
    /// for containerd: the node routes registries it does not mirror to the fleet's own
    /// repositories, so `_default` must not let it resolve tags.
    #[test]
    fn the_default_namespace_never_resolves_tags() {
        let files = containerd_hosts(&mirror(&[], None), &node()).unwrap();
        assert_eq!(files.len(), 1);
        let t = parse(&files[0]);
        let caps = strings(&host(&t, "http://127.0.0.1:5000")["capabilities"]);
        assert_eq!(caps, ["pull"]);
    }

    #[test]
    fn docker_hub_aliases_use_docker_io_and_its_real_server() {
        let files = containerd_hosts(&mirror(&["index.docker.io"], None), &node()).unwrap();
        assert_eq!(files[0].namespace, "docker.io");
        assert_eq!(
            parse(&files[0])["server"].as_str(),
            Some("https://registry-1.docker.io")
        );
    }

    #[test]
    fn an_https_node_is_trusted_by_its_own_certificate() {
        let file: FileConfig = toml::from_str(
            "data_dir = \"/d\"\nlisten = \"0.0.0.0:5443\"\ntls_cert = \"/etc/shoal/cert \\\"1\\\".pem\"\ntls_key = \"/etc/shoal/key.pem\"\n",
        )
        .unwrap();
        let config = Config::resolve(FileConfig::default(), file).unwrap();
        let node = NodeEndpoint::of(&config).unwrap();
        assert_eq!(node.url(), "https://127.0.0.1:5443");
        let files = containerd_hosts(&mirror(&["ghcr.io"], None), &node).unwrap();
        let t = parse(&files[0]);
        let h = host(&t, "https://127.0.0.1:5443");
        assert_eq!(h["ca"].as_str(), Some("/etc/shoal/cert \"1\".pem"));
        assert!(!h.contains_key("skip_verify"));
        let skip = NodeEndpoint {
            skip_verify: true,
            ..node
        };
        let t = parse(&containerd_hosts(&mirror(&[], None), &skip).unwrap()[0]);
        assert_eq!(
            host(&t, "https://127.0.0.1:5443")["skip_verify"].as_bool(),
            Some(true)
        );
    }

    #[test]
    fn the_node_address_comes_from_its_listen_setting() {
        let resolve = |listen: &str| {
            let file: FileConfig =
                toml::from_str(&format!("data_dir = \"/d\"\nlisten = \"{listen}\"\n")).unwrap();
            NodeEndpoint::of(&Config::resolve(FileConfig::default(), file).unwrap()).unwrap()
        };
        assert_eq!(resolve("127.0.0.1:5000").url(), "http://127.0.0.1:5000");
        assert_eq!(resolve("0.0.0.0:6000").url(), "http://127.0.0.1:6000");
        assert_eq!(resolve("[::]:6000").url(), "http://[::1]:6000");
        assert_eq!(resolve("10.1.2.3:5000").url(), "http://10.1.2.3:5000");
        assert!(!resolve("10.1.2.3:5000").is_loopback());
        assert!(resolve("[::]:6000").is_loopback());
    }

    #[test]
    fn node_urls_are_origins_only() {
        assert_eq!(
            NodeEndpoint::parse("https://node.example:5000/")
                .unwrap()
                .url(),
            "https://node.example:5000"
        );
        for bad in [
            "node:5000",
            "ftp://node",
            "http://u:p@node:5000",
            "http://node:5000/v2",
            "http://node:5000?x=1",
            "not a url",
        ] {
            assert!(NodeEndpoint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_namespaces_are_never_written() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["", "..", "../etc", "a/b", ".hidden"] {
            let files = [HostsFile {
                namespace: bad.into(),
                text: String::new(),
            }];
            assert!(write_hosts(dir.path(), &files).is_err(), "{bad:?}");
        }
        let files = containerd_hosts(&mirror(&["ghcr.io"], None), &node()).unwrap();
        let written = write_hosts(dir.path(), &files).unwrap();
        assert_eq!(
            written,
            [
                dir.path().join("ghcr.io/hosts.toml"),
                dir.path().join("_default/hosts.toml")
            ]
        );
        assert_eq!(std::fs::read_to_string(&written[0]).unwrap(), files[0].text);
    }

    #[test]
    fn the_config_snippet_sets_config_path_for_both_layouts() {
        let text = containerd_config(Path::new("/etc/containerd/certs.d"));
        let t: toml::Table = text.parse().unwrap();
        assert_eq!(
            t["plugins"]["io.containerd.cri.v1.images"]["registry"]["config_path"].as_str(),
            Some("/etc/containerd/certs.d")
        );
        // The 1.x lines are commented out (one config file is one version); uncommented, they
        // are valid as well.
        let v1: String = text
            .lines()
            .skip_while(|l| !l.contains("containerd 1.x"))
            .skip(1)
            .take(2)
            .map(|l| format!("{}\n", l.trim_start_matches("# ")))
            .collect();
        let t: toml::Table = v1.parse().unwrap_or_else(|e| panic!("{e}\n{v1}"));
        assert_eq!(
            t["plugins"]["io.containerd.grpc.v1.cri"]["registry"]["config_path"].as_str(),
            Some("/etc/containerd/certs.d")
        );
    }

    #[test]
    fn docker_gets_the_node_as_docker_hub_mirror() {
        let json = docker_daemon_json(&node());
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"registry-mirrors": ["http://127.0.0.1:5000"]})
        );
        let m = mirror(
            &["docker.io", "registry.example.com:5000"],
            Some("docker.io"),
        );
        let notes = docker_notes(&m, &node()).join("\n");
        assert!(!notes.contains("insecure-registries"), "{notes}");
        assert!(!notes.contains("default_upstream"), "{notes}");
        assert!(
            notes.contains("127.0.0.1:5000/registry.example.com-5000/org/tool:1"),
            "{notes}"
        );
        let far = NodeEndpoint::parse("http://10.0.0.5:5000").unwrap();
        let notes = docker_notes(&mirror(&["ghcr.io"], None), &far).join("\n");
        assert!(notes.contains("insecure-registries"), "{notes}");
        assert!(notes.contains("default_upstream"), "{notes}");
    }

    #[test]
    fn recipes_never_carry_credentials() {
        let mut m = mirror(&["docker.io"], Some("docker.io"));
        m.upstreams[0].username = Some("bob".into());
        m.upstreams[0].password = Some(crate::mirror::upstream::Secret::new("hunter2-recipe"));
        let mut all: Vec<String> = containerd_hosts(&m, &node())
            .unwrap()
            .into_iter()
            .map(|f| f.text)
            .collect();
        all.push(docker_daemon_json(&node()));
        all.extend(docker_notes(&m, &node()));
        let all = all.join("\n");
        assert!(!all.contains("hunter2") && !all.contains("bob"), "{all}");
    }
}
