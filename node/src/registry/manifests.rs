//! Manifest endpoints: `GET`, `HEAD`, `PUT` and `DELETE /v2/<name>/manifests/<reference>`.

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use http_body_util::BodyExt;
use shoal_protocol::{Algorithm, Digest, Reference, RepoName};

use super::error::RegistryError;
use super::{Registry, Result, empty};
use crate::manifest::{self, MANIFEST_MEDIA_TYPES, MAX_MANIFEST_BYTES, ManifestInfo};
use crate::store::{Event, StoreError};

/// The manifest digest a reference names in the repository, with what the index knows of it.
async fn resolve(
    r: &Registry,
    name: &RepoName,
    reference: &Reference,
) -> Result<(Digest, ManifestInfo)> {
    let (n, reference) = (name.clone(), reference.clone());
    r.store
        .read(move |i| {
            let digest = match reference {
                Reference::Digest(d) => d,
                Reference::Tag(t) => match i.tag(&n, &t)? {
                    Some(d) => d,
                    None => return Ok(None),
                },
            };
            Ok(i.manifest(&n, &digest)?.map(|info| (digest, info)))
        })
        .await?
        .ok_or(RegistryError::ManifestUnknown)
}

/// Whether a client that sent `headers` accepts `media_type`.
///
/// A client that names no manifest type at all (or `*/*`) accepts anything; one that lists
/// manifest types gets only those, as docker and containerd expect.
fn accepts(headers: &HeaderMap, media_type: &str) -> bool {
    let offered: Vec<&str> = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.split(';').next().unwrap_or(t).trim())
        .collect();
    let negotiating = offered.iter().any(|t| MANIFEST_MEDIA_TYPES.contains(t));
    !negotiating || offered.iter().any(|t| *t == media_type || *t == "*/*")
}

/// GET and HEAD /v2/<name>/manifests/<reference>
pub(super) async fn get(
    r: &Registry,
    name: &RepoName,
    reference: &Reference,
    headers: &HeaderMap,
    with_body: bool,
) -> Result<Response> {
    let (digest, info) = resolve(r, name, reference).await?;
    if !accepts(headers, &info.media_type) {
        return Err(RegistryError::ManifestUnknown);
    }
    let d = digest.to_string();
    let builder = Response::builder()
        .header(header::CONTENT_TYPE, info.media_type.as_str())
        .header(header::CONTENT_LENGTH, info.size)
        .header("docker-content-digest", d.as_str())
        .header(header::ETAG, format!("\"{d}\""));
    let body = if with_body {
        let bytes = r
            .store
            .read_small_blob(&digest, MAX_MANIFEST_BYTES as u64)
            .await?
            .ok_or_else(|| {
                RegistryError::Internal(StoreError::Corrupt(format!(
                    "manifest {d} is indexed but missing"
                )))
            })?;
        Body::from(bytes)
    } else {
        Body::empty()
    };
    builder
        .body(body)
        .map_err(|e| RegistryError::Internal(StoreError::Task(e.to_string())))
}

/// PUT /v2/<name>/manifests/<reference>
pub(super) async fn put(
    r: &Registry,
    name: &RepoName,
    reference: &Reference,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response> {
    let limited = http_body_util::Limited::new(body, MAX_MANIFEST_BYTES);
    let bytes = match limited.collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(RegistryError::TooLarge(format!(
                "a manifest is at most {MAX_MANIFEST_BYTES} bytes"
            )));
        }
        Err(e) => {
            return Err(RegistryError::ManifestInvalid(format!(
                "request body failed: {e}"
            )));
        }
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let info = manifest::parse(&bytes, content_type)?;
    let algorithm = match reference {
        Reference::Digest(d) => d.algorithm(),
        Reference::Tag(_) => Algorithm::Sha256,
    };
    let digest = Digest::of(algorithm, &bytes);
    if let Reference::Digest(d) = reference {
        if d != &digest {
            return Err(RegistryError::DigestInvalid(format!(
                "manifest hashes to {digest}, not {d}"
            )));
        }
    }
    check_references(r, name, &info).await?;

    let mut writer = r.store.blob_writer(algorithm).await?;
    writer.write(&bytes).await?;
    writer.finish(&digest).await?;
    let subject = info.subject.clone();
    let mut events = vec![Event::Manifest {
        repo: name.clone(),
        digest: digest.clone(),
        info,
    }];
    if let Reference::Tag(tag) = reference {
        events.push(Event::Tag {
            repo: name.clone(),
            tag: tag.clone(),
            digest: digest.clone(),
        });
    }
    r.store.commit(events).await?;

    let mut headers = vec![
        ("location", format!("/v2/{name}/manifests/{digest}")),
        ("docker-content-digest", digest.to_string()),
    ];
    if let Some(s) = subject {
        headers.push(("oci-subject", s.to_string()));
    }
    empty(StatusCode::CREATED, &headers)
}

/// Refuses a manifest that names blobs (or, for an index, manifests) the repository lacks.
async fn check_references(r: &Registry, name: &RepoName, info: &ManifestInfo) -> Result<()> {
    let (n, blobs, children) = (name.clone(), info.blobs.clone(), info.manifests.clone());
    let missing = r
        .store
        .read(move |i| {
            for b in &blobs {
                if !i.is_linked(&n, b)? && i.manifest(&n, b)?.is_none() {
                    return Ok(Some(b.clone()));
                }
            }
            for m in &children {
                if i.manifest(&n, m)?.is_none() {
                    return Ok(Some(m.clone()));
                }
            }
            Ok(None)
        })
        .await?;
    if let Some(m) = missing {
        return Err(RegistryError::ManifestBlobUnknown(m.to_string()));
    }
    for b in &info.blobs {
        if r.store.blob_size(b).await?.is_none() {
            return Err(RegistryError::ManifestBlobUnknown(b.to_string()));
        }
    }
    Ok(())
}

/// DELETE /v2/<name>/manifests/<reference>
///
/// By digest: the manifest and every tag naming it. By tag: only the tag.
pub(super) async fn delete(
    r: &Registry,
    name: &RepoName,
    reference: &Reference,
) -> Result<Response> {
    let (digest, _) = resolve(r, name, reference).await?;
    let event = match reference {
        Reference::Digest(_) => Event::DeleteManifest {
            repo: name.clone(),
            digest,
        },
        Reference::Tag(tag) => Event::Untag {
            repo: name.clone(),
            tag: tag.clone(),
        },
    };
    r.store.commit(vec![event]).await?;
    empty(StatusCode::ACCEPTED, &[])
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn negotiation() {
        let mut h = HeaderMap::new();
        assert!(accepts(&h, manifest::OCI_INDEX));
        h.append(
            header::ACCEPT,
            HeaderValue::from_static("application/vnd.oci.image.manifest.v1+json"),
        );
        assert!(accepts(&h, manifest::OCI_MANIFEST));
        assert!(!accepts(&h, manifest::OCI_INDEX));
        h.append(
            header::ACCEPT,
            HeaderValue::from_static("application/vnd.oci.image.index.v1+json; q=0.5"),
        );
        assert!(accepts(&h, manifest::OCI_INDEX));
        let mut any = HeaderMap::new();
        any.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/json, */*"),
        );
        assert!(accepts(&any, manifest::DOCKER_MANIFEST_LIST));
    }
}
