//! Parsing and checking image manifests and indexes as they are pushed.
//!
//! A manifest's bytes are stored and served exactly as pushed; this module only reads them to
//! learn what the registry must check and index: the media type, the blobs (config and layers)
//! or child manifests it references, its `subject`, its artifact type and annotations. Docker
//! schema 2 manifests and manifest lists are the same shape as OCI manifests and indexes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use shoal_protocol::Digest;

/// Largest manifest accepted, in bytes (the limit CNCF Distribution and the OCI spec suggest).
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker image manifest, schema 2.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Every manifest media type the registry stores.
pub const MANIFEST_MEDIA_TYPES: [&str; 4] = [
    OCI_MANIFEST,
    OCI_INDEX,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
];

/// What the registry needs to know about a stored manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestInfo {
    /// The media type it is served with.
    pub media_type: String,
    /// Size of the stored bytes.
    pub size: u64,
    /// Blobs it references (config and layers) that must be present in the repository.
    pub blobs: Vec<Digest>,
    /// Child manifests (for an index) that must be present in the repository.
    pub manifests: Vec<Digest>,
    /// The manifest this one refers to (OCI 1.1 referrers).
    pub subject: Option<Digest>,
    /// `artifactType`, or the config media type of an image manifest.
    pub artifact_type: Option<String>,
    /// The manifest's annotations, shown in the referrers list.
    pub annotations: Option<BTreeMap<String, String>>,
}

/// Why a manifest is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// Not valid JSON or not of a manifest's shape.
    #[error("manifest is not valid: {0}")]
    Invalid(String),
    /// A media type the registry does not store (for example Docker schema 1).
    #[error("manifest media type {0:?} is not supported")]
    UnsupportedMediaType(String),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDescriptor {
    media_type: Option<String>,
    digest: Digest,
    size: i64,
    #[serde(default)]
    urls: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    schema_version: Option<i64>,
    media_type: Option<String>,
    artifact_type: Option<String>,
    config: Option<RawDescriptor>,
    layers: Option<Vec<RawDescriptor>>,
    manifests: Option<Vec<RawDescriptor>>,
    subject: Option<RawDescriptor>,
    annotations: Option<BTreeMap<String, String>>,
}

/// Parses `bytes` pushed with `content_type` (the request's `Content-Type`, if any).
///
/// The media type is the `Content-Type`, else the manifest's own `mediaType`, else what its
/// shape says (`manifests` makes an index, `config` an image manifest). When both the header and
/// the field are present they must agree.
pub fn parse(bytes: &[u8], content_type: Option<&str>) -> Result<ManifestInfo, ManifestError> {
    if bytes.len() > MAX_MANIFEST_BYTES {
        return Err(ManifestError::Invalid(
            "manifest is larger than 4 MiB".into(),
        ));
    }
    let raw: RawManifest =
        serde_json::from_slice(bytes).map_err(|e| ManifestError::Invalid(e.to_string()))?;
    if raw.schema_version != Some(2) {
        return match raw.schema_version {
            Some(1) => Err(ManifestError::UnsupportedMediaType(
                "application/vnd.docker.distribution.manifest.v1+json".into(),
            )),
            _ => Err(ManifestError::Invalid("schemaVersion must be 2".into())),
        };
    }
    // Strip parameters such as "; charset=utf-8" from the header.
    let header = content_type
        .map(|c| c.split(';').next().unwrap_or(c).trim())
        .filter(|c| !c.is_empty() && *c != "application/json" && *c != "application/octet-stream");
    let media_type = match (header, raw.media_type.as_deref()) {
        (Some(h), Some(f)) if h != f => {
            return Err(ManifestError::Invalid(format!(
                "Content-Type {h:?} does not match mediaType {f:?}"
            )));
        }
        (Some(h), _) => h.to_owned(),
        (None, Some(f)) => f.to_owned(),
        (None, None) if raw.manifests.is_some() => OCI_INDEX.to_owned(),
        (None, None) if raw.config.is_some() => OCI_MANIFEST.to_owned(),
        (None, None) => return Err(ManifestError::Invalid("cannot tell the media type".into())),
    };
    let size = bytes.len() as u64;
    let subject = raw.subject.map(|s| s.digest);
    let check_size = |d: &RawDescriptor| {
        if d.size < 0 {
            Err(ManifestError::Invalid(format!(
                "descriptor {} has a negative size",
                d.digest
            )))
        } else {
            Ok(())
        }
    };
    match media_type.as_str() {
        OCI_MANIFEST | DOCKER_MANIFEST => {
            let config = raw
                .config
                .ok_or_else(|| ManifestError::Invalid("image manifest has no config".into()))?;
            let layers = raw.layers.unwrap_or_default();
            if raw.manifests.is_some() {
                return Err(ManifestError::Invalid(
                    "image manifest has \"manifests\"".into(),
                ));
            }
            check_size(&config)?;
            let mut blobs = vec![config.digest.clone()];
            for layer in &layers {
                check_size(layer)?;
                // Non-distributable layers live elsewhere and are never pushed.
                if layer.urls.as_ref().is_some_and(|u| !u.is_empty()) {
                    continue;
                }
                blobs.push(layer.digest.clone());
            }
            // Without `artifactType`, the referrers API reports the config's media type,
            // even the empty one.
            let config_type = config.media_type;
            Ok(ManifestInfo {
                media_type,
                size,
                blobs,
                manifests: Vec::new(),
                subject,
                artifact_type: raw.artifact_type.or(config_type),
                annotations: raw.annotations,
            })
        }
        OCI_INDEX | DOCKER_MANIFEST_LIST => {
            let children = raw
                .manifests
                .ok_or_else(|| ManifestError::Invalid("index has no \"manifests\"".into()))?;
            if raw.config.is_some() || raw.layers.is_some() {
                return Err(ManifestError::Invalid(
                    "index has \"config\" or \"layers\"".into(),
                ));
            }
            let mut manifests = Vec::with_capacity(children.len());
            for child in &children {
                check_size(child)?;
                manifests.push(child.digest.clone());
            }
            Ok(ManifestInfo {
                media_type,
                size,
                blobs: Vec::new(),
                manifests,
                subject,
                artifact_type: raw.artifact_type,
                annotations: raw.annotations,
            })
        }
        other => Err(ManifestError::UnsupportedMediaType(
            other.chars().take(128).collect(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &[u8]) -> Digest {
        Digest::sha256(s)
    }

    #[test]
    fn image_manifest() {
        let body = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": d(b"c").to_string(), "size": 1},
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d(b"l").to_string(), "size": 1},
                {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d(b"f").to_string(), "size": 1, "urls": ["https://example.invalid/x"]}
            ],
        });
        let bytes = serde_json::to_vec(&body).unwrap();
        let info = parse(&bytes, Some(OCI_MANIFEST)).unwrap();
        assert_eq!(info.blobs, vec![d(b"c"), d(b"l")]);
        assert_eq!(
            info.artifact_type.as_deref(),
            Some("application/vnd.oci.image.config.v1+json")
        );
        assert_eq!(parse(&bytes, None).unwrap(), info);
        assert!(parse(&bytes, Some(OCI_INDEX)).is_err());
    }

    #[test]
    fn index_and_subject() {
        let body = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{"mediaType": OCI_MANIFEST, "digest": d(b"m").to_string(), "size": 3}],
            "subject": {"mediaType": OCI_MANIFEST, "digest": d(b"s").to_string(), "size": 3},
            "artifactType": "application/x.test",
        });
        let info = parse(&serde_json::to_vec(&body).unwrap(), None).unwrap();
        assert_eq!(info.media_type, OCI_INDEX);
        assert_eq!(info.manifests, vec![d(b"m")]);
        assert_eq!(info.subject, Some(d(b"s")));
    }

    #[test]
    fn rejects() {
        assert!(parse(b"not json", None).is_err());
        assert!(parse(b"{}", None).is_err());
        assert!(matches!(
            parse(br#"{"schemaVersion":1}"#, None),
            Err(ManifestError::UnsupportedMediaType(_))
        ));
        let bad_digest =
            br#"{"schemaVersion":2,"config":{"digest":"sha256:x","size":1},"layers":[]}"#;
        assert!(parse(bad_digest, None).is_err());
        assert!(parse(&vec![b' '; MAX_MANIFEST_BYTES + 1], None).is_err());
    }
}
