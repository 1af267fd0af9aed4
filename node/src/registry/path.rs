//! The one place registry URLs are parsed.
//!
//! Repository names contain `/`, so routes cannot be matched segment by segment from the left.
//! The path is read from the right instead: the last segments say which endpoint it is
//! (`tags/list`, `manifests/<ref>`, `blobs/uploads/<id>`, `blobs/<digest>`,
//! `referrers/<digest>`), and everything before them is the repository name, validated once here.

use shoal_protocol::{Digest, NameError, Reference, RepoName};

/// A parsed `/v2/...` path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/v2/`
    Base,
    /// `/v2/_catalog`
    Catalog,
    /// `/v2/<name>/tags/list`
    Tags(RepoName),
    /// `/v2/<name>/manifests/<reference>`
    Manifest(RepoName, Reference),
    /// `/v2/<name>/blobs/<digest>`
    Blob(RepoName, Digest),
    /// `/v2/<name>/blobs/uploads/`
    UploadStart(RepoName),
    /// `/v2/<name>/blobs/uploads/<id>`
    Upload(RepoName, String),
    /// `/v2/<name>/referrers/<digest>`
    Referrers(RepoName, Digest),
}

/// Why a path is not a registry route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    /// No endpoint has this shape.
    NotFound,
    /// The repository name breaks the grammar.
    NameInvalid,
    /// The digest in the path is not a valid digest.
    DigestInvalid,
    /// The manifest reference is neither a valid tag nor a valid digest (`digest`: it has a
    /// digest's `algorithm:` form). A `PUT` answers `TAG_INVALID` or `DIGEST_INVALID`; a read or a
    /// delete answers `MANIFEST_UNKNOWN`, as for any manifest that is not there.
    ReferenceInvalid {
        /// Whether it looked like a digest.
        digest: bool,
    },
}

fn name(segments: &[&str]) -> Result<RepoName, RouteError> {
    if segments.is_empty() {
        return Err(RouteError::NotFound);
    }
    segments
        .join("/")
        .parse()
        .map_err(|_| RouteError::NameInvalid)
}

fn digest(s: &str) -> Result<Digest, RouteError> {
    s.parse().map_err(|_| RouteError::DigestInvalid)
}

impl Route {
    /// Parses the path of a request URL (without the query string).
    pub fn parse(path: &str) -> Result<Route, RouteError> {
        let rest = path.strip_prefix("/v2").ok_or(RouteError::NotFound)?;
        if rest.is_empty() || rest == "/" {
            return Ok(Route::Base);
        }
        let rest = rest.strip_prefix('/').ok_or(RouteError::NotFound)?;
        if rest == "_catalog" {
            return Ok(Route::Catalog);
        }
        let segs: Vec<&str> = rest.split('/').collect();
        let n = segs.len();
        let tail = |k: usize| segs.get(n.wrapping_sub(k)).copied();
        match (tail(3), tail(2), tail(1)) {
            (_, Some("tags"), Some("list")) => Ok(Route::Tags(name(&segs[..n - 2])?)),
            (Some("blobs"), Some("uploads"), Some(id)) => {
                let repo = name(&segs[..n - 3])?;
                if id.is_empty() {
                    Ok(Route::UploadStart(repo))
                } else {
                    Ok(Route::Upload(repo, id.to_owned()))
                }
            }
            (_, Some("blobs"), Some("uploads")) => Ok(Route::UploadStart(name(&segs[..n - 2])?)),
            (_, Some("blobs"), Some(d)) => Ok(Route::Blob(name(&segs[..n - 2])?, digest(d)?)),
            (_, Some("manifests"), Some(r)) => {
                let repo = name(&segs[..n - 2])?;
                let reference = r.parse().map_err(|e| RouteError::ReferenceInvalid {
                    digest: matches!(e, NameError::InvalidDigest(_)),
                })?;
                Ok(Route::Manifest(repo, reference))
            }
            (_, Some("referrers"), Some(d)) => {
                Ok(Route::Referrers(name(&segs[..n - 2])?, digest(d)?))
            }
            _ => Err(RouteError::NotFound),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn repo(s: &str) -> RepoName {
        s.parse().unwrap()
    }

    #[test]
    fn routes() {
        assert_eq!(Route::parse("/v2/"), Ok(Route::Base));
        assert_eq!(Route::parse("/v2"), Ok(Route::Base));
        assert_eq!(Route::parse("/v2/_catalog"), Ok(Route::Catalog));
        assert_eq!(
            Route::parse("/v2/a/b/tags/list"),
            Ok(Route::Tags(repo("a/b")))
        );
        assert_eq!(
            Route::parse("/v2/team/app/manifests/1.4"),
            Ok(Route::Manifest(
                repo("team/app"),
                Reference::Tag("1.4".parse().unwrap())
            ))
        );
        assert_eq!(
            Route::parse(&format!("/v2/x/manifests/{D}")),
            Ok(Route::Manifest(
                repo("x"),
                Reference::Digest(D.parse().unwrap())
            ))
        );
        assert_eq!(
            Route::parse(&format!("/v2/x/y/blobs/{D}")),
            Ok(Route::Blob(repo("x/y"), D.parse().unwrap()))
        );
        assert_eq!(
            Route::parse("/v2/x/blobs/uploads/"),
            Ok(Route::UploadStart(repo("x")))
        );
        assert_eq!(
            Route::parse("/v2/x/blobs/uploads"),
            Ok(Route::UploadStart(repo("x")))
        );
        assert_eq!(
            Route::parse("/v2/x/blobs/uploads/abc"),
            Ok(Route::Upload(repo("x"), "abc".into()))
        );
        assert_eq!(
            Route::parse(&format!("/v2/x/referrers/{D}")),
            Ok(Route::Referrers(repo("x"), D.parse().unwrap()))
        );
        // Names may contain the words the endpoints use.
        assert_eq!(
            Route::parse("/v2/blobs/uploads/tags/list"),
            Ok(Route::Tags(repo("blobs/uploads")))
        );
        assert_eq!(
            Route::parse("/v2/manifests/blobs/uploads/blobs/uploads/"),
            Ok(Route::UploadStart(repo("manifests/blobs/uploads")))
        );
    }

    #[test]
    fn errors() {
        assert_eq!(Route::parse("/v1/x"), Err(RouteError::NotFound));
        assert_eq!(Route::parse("/v2/x"), Err(RouteError::NotFound));
        assert_eq!(Route::parse("/v2/tags/list"), Err(RouteError::NotFound));
        assert_eq!(
            Route::parse("/v2/UP/tags/list"),
            Err(RouteError::NameInvalid)
        );
        assert_eq!(
            Route::parse("/v2/../../etc/tags/list"),
            Err(RouteError::NameInvalid)
        );
        assert_eq!(
            Route::parse("/v2/x/manifests/-bad"),
            Err(RouteError::ReferenceInvalid { digest: false })
        );
        assert_eq!(
            Route::parse("/v2/x/manifests/sha256:zz"),
            Err(RouteError::ReferenceInvalid { digest: true })
        );
        assert_eq!(
            Route::parse("/v2/x/blobs/sha256:zz"),
            Err(RouteError::DigestInvalid)
        );
        assert_eq!(
            Route::parse("/v2//blobs/uploads/"),
            Err(RouteError::NameInvalid)
        );
    }

    proptest! {
        #[test]
        fn any_path_parses_or_errs(s in "/v2(/[a-z0-9._:-]{0,12}){0,8}/?") {
            let _ = Route::parse(&s);
        }

        #[test]
        fn any_bytes_path_parses_or_errs(s in "\\PC{0,100}") {
            let _ = Route::parse(&s);
        }
    }
}
