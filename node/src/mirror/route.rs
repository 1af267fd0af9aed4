//! Which requests go to an upstream registry, and under which repository name the fleet keeps
//! what they bring.
//!
//! Everything fetched from an upstream lives in the fleet under the upstream's namespace: the
//! repository `library/nginx` of `docker.io` is `docker.io/library/nginx` on every node, with
//! signed tag records like any other repository. A request reaches that namespace three ways:
//! - containerd's mirror requests carry `?ns=<upstream host>` (`/v2/library/nginx/manifests/1?ns=docker.io`);
//! - an explicit name starts with the namespace (`localhost:5000/docker.io/library/nginx:1`, or
//!   `ghcr.io/org/tool` for any configured upstream);
//! - with a default upstream (docker's `registry-mirrors`, which only ever mirrors Docker Hub and
//!   sends no `ns`), a pull of a repository the fleet does not have locally.
//!
//! An upstream named with a port (`registry.example.com:5000`) has the namespace
//! `registry.example.com-5000`, since a repository name cannot hold a colon.

use shoal_protocol::RepoName;

/// Docker Hub's name, as containerd sends it in `ns` and as image references spell it.
pub const DOCKER_HUB: &str = "docker.io";

/// Other names clients use for Docker Hub.
const DOCKER_HUB_ALIASES: [&str; 3] = ["registry-1.docker.io", "index.docker.io", "docker.com"];

/// The namespace (first component of the fleet's repository names) of the upstream `name`,
/// or `None` if `name` cannot be one (it must be a host, optionally with a port, whose
/// namespace is a valid repository name component).
pub fn namespace_of(name: &str) -> Option<String> {
    let (host, port) = match name.rsplit_once(':') {
        Some((h, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => (h, Some(p)),
        Some(_) => return None,
        None => (name, None),
    };
    if host.is_empty() || host.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    let namespace = match port {
        Some(p) => format!("{host}-{p}"),
        None => host.to_owned(),
    };
    // A namespace must be one valid component: no `/`, the repository grammar otherwise.
    (!namespace.contains('/') && namespace.parse::<RepoName>().is_ok()).then_some(namespace)
}

/// Where one request's repository leads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Routed {
    /// A repository of the fleet's own: served as it is.
    Local,
    /// The repository of an upstream.
    Upstream {
        /// Which upstream (an index into the routes' list).
        upstream: usize,
        /// The repository in the fleet: the upstream's namespace, then the upstream's path.
        repo: RepoName,
        /// The repository's path at the upstream (`library/nginx`).
        remote: String,
    },
}

/// The upstreams a node mirrors, by name, and which one takes requests that name none.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    /// (name, namespace) of each upstream, in the configuration's order.
    upstreams: Vec<(String, String)>,
    /// The upstream of pulls that name none (docker's `registry-mirrors`).
    default: Option<usize>,
}

/// Why the routes cannot be built from a configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoutesError {
    /// An upstream's name is not a host (with an optional port).
    #[error(
        "upstream {0:?}: a name is a registry host, like docker.io or registry.example.com:5000"
    )]
    BadName(String),
    /// Two upstreams share a name.
    #[error("upstream {0:?} is configured twice")]
    Duplicate(String),
    /// The default upstream is not configured.
    #[error("the default upstream {0:?} is not one of the [[upstream]] names")]
    UnknownDefault(String),
}

impl Routes {
    /// Routes for upstreams with these `names` (in order), and the name of the default one.
    pub fn new<'a>(
        names: impl IntoIterator<Item = &'a str>,
        default: Option<&str>,
    ) -> Result<Routes, RoutesError> {
        let mut upstreams: Vec<(String, String)> = Vec::new();
        for name in names {
            let namespace =
                namespace_of(name).ok_or_else(|| RoutesError::BadName(name.to_owned()))?;
            if upstreams.iter().any(|(_, ns)| *ns == namespace) {
                return Err(RoutesError::Duplicate(name.to_owned()));
            }
            upstreams.push((name.to_owned(), namespace));
        }
        let default = match default {
            None => None,
            Some(d) => Some(
                upstreams
                    .iter()
                    .position(|(name, _)| canonical(name) == canonical(d))
                    .ok_or_else(|| RoutesError::UnknownDefault(d.to_owned()))?,
            ),
        };
        Ok(Routes { upstreams, default })
    }

    /// Whether any upstream is configured.
    pub fn is_empty(&self) -> bool {
        self.upstreams.is_empty()
    }

    /// The namespace of upstream `i`.
    pub fn namespace(&self, i: usize) -> Option<&str> {
        self.upstreams.get(i).map(|(_, ns)| ns.as_str())
    }

    /// The upstream called `host` (as a client names it, Docker Hub's aliases included).
    pub fn by_name(&self, host: &str) -> Option<usize> {
        let host = canonical(host);
        self.upstreams
            .iter()
            .position(|(name, _)| canonical(name) == host)
    }

    /// The upstream whose namespace is the first component of `repo`, and the rest of it.
    pub fn by_namespace<'r>(&self, repo: &'r RepoName) -> Option<(usize, &'r str)> {
        let (first, rest) = repo.as_str().split_once('/')?;
        let i = self.upstreams.iter().position(|(_, ns)| ns == first)?;
        Some((i, rest))
    }

    /// Where a pull of `name` leads, with `ns` the `ns` query parameter if the client sent
    /// one; `local` says whether the fleet has a repository `name` of its own (asked only
    /// when a default upstream could take the request).
    pub fn route(&self, name: &RepoName, ns: Option<&str>, local: impl FnOnce() -> bool) -> Routed {
        if let Some(host) = ns {
            return match self.by_name(host) {
                // A client that names both (`ns` and the namespace in the path) means the same.
                Some(i) if self.by_namespace(name).is_some_and(|(j, _)| j == i) => {
                    self.upstream(i, strip(name, i, self))
                }
                Some(i) => self.upstream(i, name.as_str()),
                // An upstream this node does not mirror: the fleet's own repository, if any.
                None => Routed::Local,
            };
        }
        if let Some((i, rest)) = self.by_namespace(name) {
            return self.upstream(i, rest);
        }
        match self.default {
            Some(i) if !local() => self.upstream(i, name.as_str()),
            _ => Routed::Local,
        }
    }

    fn upstream(&self, i: usize, remote: &str) -> Routed {
        let Some((name, namespace)) = self.upstreams.get(i) else {
            return Routed::Local;
        };
        // Docker Hub's official images live under `library/`: `docker.io/nginx` is
        // `library/nginx` there (docker adds it for its own pulls; an explicit name may not).
        let remote = if canonical(name) == DOCKER_HUB && !remote.contains('/') {
            format!("library/{remote}")
        } else {
            remote.to_owned()
        };
        match format!("{namespace}/{remote}").parse() {
            Ok(repo) => Routed::Upstream {
                upstream: i,
                repo,
                remote,
            },
            // Too long once the namespace is added: not a name the fleet can hold.
            Err(_) => Routed::Local,
        }
    }
}

/// `name` without the namespace of upstream `i` (which it starts with).
fn strip<'n>(name: &'n RepoName, i: usize, routes: &Routes) -> &'n str {
    routes
        .namespace(i)
        .and_then(|ns| name.as_str().strip_prefix(ns))
        .and_then(|rest| rest.strip_prefix('/'))
        .unwrap_or(name.as_str())
}

/// A registry host as compared: lower case, Docker Hub's aliases folded into `docker.io`.
fn canonical(host: &str) -> String {
    let host = host.to_ascii_lowercase();
    if DOCKER_HUB_ALIASES.contains(&host.as_str()) {
        DOCKER_HUB.to_owned()
    } else {
        host
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(s: &str) -> RepoName {
        s.parse().unwrap()
    }

    fn routes(default: Option<&str>) -> Routes {
        Routes::new(
            ["docker.io", "ghcr.io", "registry.example.com:5000"],
            default,
        )
        .unwrap()
    }

    fn to(upstream: usize, repo_name: &str, remote: &str) -> Routed {
        Routed::Upstream {
            upstream,
            repo: repo(repo_name),
            remote: remote.into(),
        }
    }

    #[test]
    fn namespaces_are_one_component_and_ports_become_dashes() {
        assert_eq!(namespace_of("docker.io").as_deref(), Some("docker.io"));
        assert_eq!(
            namespace_of("registry.example.com:5000").as_deref(),
            Some("registry.example.com-5000")
        );
        assert_eq!(
            namespace_of("127.0.0.1:5001").as_deref(),
            Some("127.0.0.1-5001")
        );
        for bad in [
            "",
            "Docker.io",
            "a/b",
            "host:",
            "host:port",
            ":5000",
            "-x.io",
            "x..io",
        ] {
            assert_eq!(namespace_of(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn containerd_names_the_upstream_in_ns() {
        let r = routes(None);
        let never = || panic!("a request with ns needs no local lookup");
        assert_eq!(
            r.route(&repo("library/nginx"), Some("docker.io"), never),
            to(0, "docker.io/library/nginx", "library/nginx")
        );
        assert_eq!(
            r.route(&repo("org/tool"), Some("ghcr.io"), never),
            to(1, "ghcr.io/org/tool", "org/tool")
        );
        assert_eq!(
            r.route(&repo("team/app"), Some("registry.example.com:5000"), never),
            to(2, "registry.example.com-5000/team/app", "team/app")
        );
        // Docker Hub's other names, and case, fold into one upstream.
        assert_eq!(
            r.route(&repo("library/nginx"), Some("registry-1.docker.io"), never),
            to(0, "docker.io/library/nginx", "library/nginx")
        );
        // An upstream the node does not mirror: the fleet's own repository.
        assert_eq!(r.route(&repo("x/y"), Some("quay.io"), never), Routed::Local);
        // The namespace written out as well as in `ns`: the same repository.
        assert_eq!(
            r.route(&repo("docker.io/library/nginx"), Some("docker.io"), never),
            to(0, "docker.io/library/nginx", "library/nginx")
        );
    }

    #[test]
    fn explicit_names_start_with_the_namespace() {
        let r = routes(None);
        let never = || panic!("an explicit name needs no local lookup");
        assert_eq!(
            r.route(&repo("ghcr.io/org/tool"), None, never),
            to(1, "ghcr.io/org/tool", "org/tool")
        );
        assert_eq!(
            r.route(&repo("docker.io/nginx"), None, never),
            to(0, "docker.io/library/nginx", "library/nginx")
        );
        assert_eq!(
            r.route(&repo("registry.example.com-5000/a/b"), None, never),
            to(2, "registry.example.com-5000/a/b", "a/b")
        );
    }

    #[test]
    fn the_default_upstream_takes_only_names_the_fleet_lacks() {
        let r = routes(Some("docker.io"));
        assert_eq!(
            r.route(&repo("library/nginx"), None, || false),
            to(0, "docker.io/library/nginx", "library/nginx")
        );
        assert_eq!(r.route(&repo("team/app"), None, || true), Routed::Local);
        let no_default = routes(None);
        assert_eq!(
            no_default.route(&repo("library/nginx"), None, || false),
            Routed::Local
        );
    }

    #[test]
    fn bad_configurations_are_refused() {
        assert_eq!(
            Routes::new(["docker.io", "Docker.io"], None).unwrap_err(),
            RoutesError::BadName("Docker.io".into())
        );
        assert_eq!(
            Routes::new(["ghcr.io", "ghcr.io"], None).unwrap_err(),
            RoutesError::Duplicate("ghcr.io".into())
        );
        assert_eq!(
            Routes::new(["ghcr.io"], Some("docker.io")).unwrap_err(),
            RoutesError::UnknownDefault("docker.io".into())
        );
        assert_eq!(
            Routes::new(["docker.io"], Some("index.docker.io"))
                .unwrap()
                .default,
            Some(0)
        );
    }

    #[test]
    fn a_name_too_long_with_its_namespace_stays_local() {
        let r = routes(None);
        let long = "a".repeat(250);
        let name = repo(&long);
        assert_eq!(r.route(&name, Some("ghcr.io"), || true), Routed::Local);
    }
}
