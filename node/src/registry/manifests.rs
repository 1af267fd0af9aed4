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
/// A manifest that a trusted record names but this node lacks is fetched from the fleet.
async fn resolve(
    r: &Registry,
    name: &RepoName,
    reference: &Reference,
) -> Result<(Digest, ManifestInfo)> {
    let (n, rf) = (name.clone(), reference.clone());
    let (digest, info, fleet_size) = r
        .store
        .read(move |i| {
            let (digest, size) = match rf {
                Reference::Digest(d) => {
                    let size = i.record_blob(&n, &d)?.map(|b| b.size);
                    (d, size)
                }
                Reference::Tag(t) => match i.record(&n, &t)? {
                    Some(rec) => match &rec.record().target {
                        Some(target) => (target.manifest.clone(), Some(target.size)),
                        None => return Ok(None),
                    },
                    None => return Ok(None),
                },
            };
            let info = i.manifest(&n, &digest)?;
            Ok(Some((digest, info, size)))
        })
        .await?
        .ok_or(RegistryError::ManifestUnknown)?;
    if let Some(info) = info {
        return Ok((digest, info));
    }
    let (Some(fleet), Some(size)) = (&r.fleet, fleet_size) else {
        return Err(RegistryError::ManifestUnknown);
    };
    fleet
        .fetcher
        .manifest(name, &digest, size)
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, %digest, "manifest named by a record could not be fetched");
            RegistryError::ManifestUnknown
        })?;
    let (n, d) = (name.clone(), digest.clone());
    let info = r
        .store
        .read(move |i| i.manifest(&n, &d))
        .await?
        .ok_or(RegistryError::ManifestUnknown)?;
    Ok((digest, info))
}

/// Gossips a record (no-op without a fleet).
async fn gossip(r: &Registry, record: &shoal_protocol::VerifiedTagRecord) {
    if let Some(f) = &r.fleet {
        if let Err(e) = f.network.publish(record.signed()).await {
            tracing::warn!(error = %e, "could not gossip a tag record");
        }
    }
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

    let mut writer = r
        .store
        .blob_writer(algorithm, Some(bytes.len() as u64))
        .await?;
    writer.write(&bytes).await?;
    writer.finish(&digest).await?;
    let subject = info.subject.clone();
    match reference {
        Reference::Tag(tag) => {
            let target = r.tags.target_for(name, &digest, &info).await?;
            let event = Event::Manifest {
                repo: name.clone(),
                digest: digest.clone(),
                info,
            };
            let record = r.tags.publish(name, tag, Some(target), vec![event]).await?;
            gossip(r, &record).await;
        }
        Reference::Digest(_) => {
            let event = Event::Manifest {
                repo: name.clone(),
                digest: digest.clone(),
                info,
            };
            r.store.commit(vec![event]).await?;
        }
    }
    r.announce(&digest).await;

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
    for b in &info.blobs {
        let (n, d) = (name.clone(), b.clone());
        let (present, known) = r
            .store
            .read(move |i| {
                Ok((
                    i.is_linked(&n, &d)? || i.manifest(&n, &d)?.is_some(),
                    i.record_blob(&n, &d)?,
                ))
            })
            .await?;
        if present && r.store.blob_size(b).await?.is_some() {
            continue;
        }
        // The client may have skipped a blob the fleet has (HEAD said it exists): fetch it.
        match (&r.fleet, known) {
            (Some(f), Some(blob)) => f
                .fetcher
                .blob(name, &blob)
                .await
                .map_err(|_| RegistryError::ManifestBlobUnknown(b.to_string()))?,
            _ => return Err(RegistryError::ManifestBlobUnknown(b.to_string())),
        }
    }
    for m in &info.manifests {
        let reference = Reference::Digest(m.clone());
        if resolve(r, name, &reference).await.is_err() {
            return Err(RegistryError::ManifestBlobUnknown(m.to_string()));
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
    match reference {
        Reference::Digest(_) => {
            let (n, d) = (name.clone(), digest.clone());
            let tags = r.store.read(move |i| i.tags_naming(&n, &d)).await?;
            let mut before = vec![Event::DeleteManifest {
                repo: name.clone(),
                digest,
            }];
            for tag in tags {
                let record = r
                    .tags
                    .publish(name, &tag, None, std::mem::take(&mut before))
                    .await?;
                gossip(r, &record).await;
            }
            if !before.is_empty() {
                r.store.commit(before).await?;
            }
        }
        Reference::Tag(tag) => {
            let record = r.tags.publish(name, tag, None, Vec::new()).await?;
            gossip(r, &record).await;
        }
    }
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
