//! Manifest endpoints: `GET`, `HEAD`, `PUT` and `DELETE /v2/<name>/manifests/<reference>`.

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use http_body_util::BodyExt;
use shoal_protocol::record::{MAX_RECORD_BLOBS, MAX_RECORD_PAYLOAD_BYTES, TagRecord, TagTarget};
use shoal_protocol::{Algorithm, Digest, Reference, RepoName, SigningKey, Tag};

use super::error::RegistryError;
use super::{Registry, Result, empty};
use crate::auth::audit::Event;
use crate::manifest::{self, MANIFEST_MEDIA_TYPES, MAX_MANIFEST_BYTES, ManifestInfo};
use crate::store::{Batch, StoreError};

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
        .map_err(|e| RegistryError::from_fetch(e, RegistryError::ManifestUnknown))?;
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
            tracing::warn!(
                error = &e as &dyn std::error::Error,
                "could not gossip a tag record"
            );
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
    builder.body(body).map_err(RegistryError::Response)
}

/// PUT /v2/<name>/manifests/<reference>
pub(super) async fn put(
    r: &Registry,
    request: &super::Request<'_>,
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
    // A tag's target must fit in a signed record: refused before anything is written.
    let target = match reference {
        Reference::Tag(tag) => {
            let target = r.tags.target_for(name, &digest, &info).await?;
            fits_in_a_record(name, tag, &target)?;
            Some(target)
        }
        Reference::Digest(_) => None,
    };

    let mut writer = r
        .store
        .blob_writer(algorithm, Some(bytes.len() as u64))
        .await?;
    writer.write(&bytes).await?;
    writer.finish(&digest).await?;
    let subject = info.subject.clone();
    // Checked above; still there when the manifest commits, whatever garbage collection does.
    let references: Vec<Digest> = info.blobs.iter().chain(&info.manifests).cloned().collect();
    match (reference, target) {
        (Reference::Tag(tag), Some(target)) => {
            let manifest = Batch::new()
                .manifest(name, &digest, info)
                .requiring(references);
            let record = match r.tags.publish(name, tag, Some(target), manifest).await {
                Ok(record) => record,
                Err(e) => {
                    let e = RegistryError::from(e);
                    r.audit.record(
                        request
                            .audit(Event::TagMove, e.to_string())
                            .repository(name)
                            .reference(tag),
                    );
                    return Err(e);
                }
            };
            gossip(r, &record).await;
            r.audit.record(
                request
                    .audit(Event::TagMove, "ok")
                    .repository(name)
                    .reference(format!("{tag}={digest}")),
            );
        }
        (Reference::Digest(_), _) | (Reference::Tag(_), None) => {
            r.store
                .commit(
                    Batch::new()
                        .manifest(name, &digest, info)
                        .requiring(references),
                )
                .await?;
            r.audit.record(
                request
                    .audit(Event::Push, "ok")
                    .repository(name)
                    .reference(&digest),
            );
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

/// Refuses a tag target that no signed tag record can carry: too many blobs (about 2,000
/// sha256 blobs fill a record, whose size the gossip message limit bounds).
fn fits_in_a_record(name: &RepoName, tag: &Tag, target: &TagTarget) -> Result<()> {
    let too_big = |why: String| {
        RegistryError::ManifestInvalid(format!(
            "a tag can name at most {MAX_RECORD_BLOBS} blobs in a record of at most \
             {MAX_RECORD_PAYLOAD_BYTES} bytes; this manifest names {} ({why}); push it by \
             digest, or split it",
            target.blobs.len()
        ))
    };
    target.validate().map_err(|e| too_big(e.to_string()))?;
    // The largest the record's other fields can be.
    let record = TagRecord {
        repo: name.clone(),
        tag: tag.clone(),
        target: Some(target.clone()),
        timestamp_ms: u64::MAX,
        sequence: u64::MAX,
        publisher: SigningKey::from_seed([0; 32]).public(),
    };
    let payload = shoal_protocol::codec::encode(&record)
        .map_err(|e| too_big(format!("cannot encode it: {}", e.describe())))?;
    if payload.len() > MAX_RECORD_PAYLOAD_BYTES {
        return Err(too_big(format!("a record of {} bytes", payload.len())));
    }
    Ok(())
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
            (Some(f), Some(blob)) => f.fetcher.blob(name, &blob).await.map_err(|e| {
                RegistryError::from_fetch(e, RegistryError::ManifestBlobUnknown(b.to_string()))
            })?,
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
    request: &super::Request<'_>,
    name: &RepoName,
    reference: &Reference,
) -> Result<Response> {
    super::access::node_may_write(
        r,
        request.caller,
        name,
        shoal_protocol::fleet::Action::Delete,
        request.client,
    )?;
    let (digest, _) = resolve(r, name, reference).await?;
    match reference {
        Reference::Digest(_) => {
            let (n, d) = (name.clone(), digest.clone());
            let tags = r.store.read(move |i| i.tags_naming(&n, &d)).await?;
            // The manifest goes with the first tombstone, in one batch.
            let mut before = Batch::new().delete_manifest(name, &digest);
            for tag in tags {
                let record = r
                    .tags
                    .publish(name, &tag, None, std::mem::take(&mut before))
                    .await?;
                gossip(r, &record).await;
            }
            r.store.commit(before).await?;
        }
        Reference::Tag(tag) => {
            let record = r.tags.publish(name, tag, None, Batch::new()).await?;
            gossip(r, &record).await;
        }
    }
    r.audit.record(
        request
            .audit(Event::Delete, "ok")
            .repository(name)
            .reference(reference),
    );
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
