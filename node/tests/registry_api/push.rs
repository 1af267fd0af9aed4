//! Pushing as a client does: blobs uploaded monolithically or in chunks and mounted from other
//! repositories, images with their blobs, tags, and referrers. A helper asserts the status of
//! each step it takes for granted; the response a test examines is returned to it.

use axum::body::Body;
use axum::http::{Method, StatusCode};

use crate::harness::{
    Harness, OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, Resp, bytes, desc, sha256, to_bytes,
};

/// The requests of blob uploads and manifest pushes, and the sequences clients make of them.
impl Harness {
    /// Monolithic upload by `POST ?digest=`, with `digest` sent as given (tests send wrong and
    /// malformed ones).
    pub async fn upload_monolithic(&self, repo: &str, digest: &str, data: &[u8]) -> Resp {
        self.request(
            Method::POST,
            &format!("/v2/{repo}/blobs/uploads/?digest={digest}"),
            &[("content-type", "application/octet-stream")],
            data.to_vec(),
        )
        .await
    }

    /// Monolithic upload by `POST ?digest=`; asserts 201 and returns the digest.
    pub async fn push_blob(&self, repo: &str, data: &[u8]) -> String {
        let d = sha256(data);
        self.upload_monolithic(repo, &d, data)
            .await
            .expect(StatusCode::CREATED);
        d
    }

    /// Starts an upload session; asserts 202 and returns its `Location`.
    pub async fn start_upload(&self, repo: &str) -> String {
        let r = self
            .request(
                Method::POST,
                &format!("/v2/{repo}/blobs/uploads/"),
                &[("content-length", "0")],
                Body::empty(),
            )
            .await;
        r.expect(StatusCode::ACCEPTED);
        r.must_header("location").to_owned()
    }

    /// Starts an upload session and PATCHes `first` into it, leaving it open for the test to
    /// continue, break or interrupt; asserts 202 for both and returns the session's `Location`.
    pub async fn start_upload_with(&self, repo: &str, first: &[u8]) -> String {
        let location = self.start_upload(repo).await;
        self.patch(&location, 0, first)
            .await
            .expect(StatusCode::ACCEPTED);
        location
    }

    /// PATCH of a chunk at `location` with `Content-Range: start-end`.
    pub async fn patch(&self, location: &str, start: usize, chunk: &[u8]) -> Resp {
        let range = format!("{}-{}", start, start + chunk.len() - 1);
        let len = chunk.len().to_string();
        self.request(
            Method::PATCH,
            location,
            &[
                ("content-type", "application/octet-stream"),
                ("content-range", &range),
                ("content-length", &len),
            ],
            chunk.to_vec(),
        )
        .await
    }

    /// The closing PUT of an upload at `location` with `?digest=` and `last` as the body.
    pub async fn put_upload(&self, location: &str, digest: &str, last: &[u8]) -> Resp {
        let sep = if location.contains('?') { '&' } else { '?' };
        self.request(
            Method::PUT,
            &format!("{location}{sep}digest={digest}"),
            &[("content-type", "application/octet-stream")],
            last.to_vec(),
        )
        .await
    }

    /// A chunked upload: POST, one PATCH per chunk, each sent to the `Location` the previous
    /// answer gave as a client must, and the closing PUT with `digest` and `last` as its body.
    /// Asserts 202 for every step before the PUT and returns the PUT's response.
    pub async fn upload_in_chunks(
        &self,
        repo: &str,
        digest: &str,
        chunks: &[&[u8]],
        last: &[u8],
    ) -> Resp {
        let mut location = self.start_upload(repo).await;
        let mut offset = 0;
        for chunk in chunks {
            let p = self.patch(&location, offset, chunk).await;
            p.expect(StatusCode::ACCEPTED);
            location = p.must_header("location").to_owned();
            offset += chunk.len();
        }
        self.put_upload(&location, digest, last).await
    }

    /// `POST ?mount=<digest>&from=<from>` (without `from` when it is `None`), with `digest` sent
    /// as given: 201 if the blob was mounted, 202 and a new session if it could not be.
    pub async fn mount_blob(&self, repo: &str, digest: &str, from: Option<&str>) -> Resp {
        let from = from.map_or_else(String::new, |from| format!("&from={from}"));
        self.request(
            Method::POST,
            &format!("/v2/{repo}/blobs/uploads/?mount={digest}{from}"),
            &[("content-length", "0")],
            Body::empty(),
        )
        .await
    }

    /// PUT of a manifest with a `Content-Type` (none if `content_type` is empty).
    pub async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        content_type: &str,
        body: &[u8],
    ) -> Resp {
        let headers: &[(&str, &str)] = if content_type.is_empty() {
            &[]
        } else {
            &[("content-type", content_type)]
        };
        self.request(
            Method::PUT,
            &format!("/v2/{repo}/manifests/{reference}"),
            headers,
            body.to_vec(),
        )
        .await
    }
}

/// An image pushed to a repository: its config and layer blobs and its manifest.
#[derive(Debug, Clone)]
pub struct Image {
    /// Manifest bytes as pushed.
    pub manifest: Vec<u8>,
    /// Manifest digest.
    pub digest: String,
    /// Config digest.
    pub config: String,
    /// Layer digests.
    pub layers: Vec<String>,
    /// Every blob, with its bytes.
    pub blobs: Vec<(String, Vec<u8>)>,
}

/// Pushes the blobs of an OCI image (seeded by `seed`) to `repo` and builds, but does not push,
/// its manifest. `extra` fields are merged into the manifest.
pub async fn image_blobs(h: &Harness, repo: &str, seed: u64, extra: serde_json::Value) -> Image {
    let config = format!(r#"{{"architecture":"amd64","os":"linux","seed":{seed}}}"#).into_bytes();
    let layer = bytes(seed, 3000 + seed as usize % 100);
    let c = h.push_blob(repo, &config).await;
    let l = h.push_blob(repo, &layer).await;
    let mut m = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": desc(OCI_CONFIG, &c, config.len()),
        "layers": [desc(OCI_LAYER, &l, layer.len())],
    });
    if let (Some(m), Some(extra)) = (m.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            m.insert(k.clone(), v.clone());
        }
    }
    let manifest = to_bytes(&m);
    Image {
        digest: sha256(&manifest),
        manifest,
        config: c.clone(),
        layers: vec![l.clone()],
        blobs: vec![(c, config), (l, layer)],
    }
}

/// Pushes an OCI image to `repo` under `reference` (a tag or its digest) and returns it.
pub async fn push_image(h: &Harness, repo: &str, tag: Option<&str>, seed: u64) -> Image {
    let img = image_blobs(h, repo, seed, serde_json::json!({})).await;
    let reference = tag.map_or_else(|| img.digest.clone(), str::to_owned);
    h.put_manifest(repo, &reference, OCI_MANIFEST, &img.manifest)
        .await
        .expect(StatusCode::CREATED);
    img
}

/// PUTs `img`'s manifest to `repo` under `tag`, whether it is the first push of the manifest or
/// one more tag for it; asserts 201.
pub async fn tag_image(h: &Harness, repo: &str, tag: &str, img: &Image) {
    h.put_manifest(repo, tag, OCI_MANIFEST, &img.manifest)
        .await
        .expect(StatusCode::CREATED);
}

/// A referrer pushed by [`push_referrer`].
pub struct Referrer {
    /// Its manifest digest.
    pub digest: String,
    /// The descriptor the referrers API should list for it.
    pub descriptor: serde_json::Value,
}

/// Pushes `body` to `repo` by digest, asserting 201, and returns the descriptor it should be
/// listed with.
pub async fn push_referrer(h: &Harness, repo: &str, body: serde_json::Value) -> Referrer {
    let bytes = to_bytes(&body);
    let media_type = body["mediaType"].as_str().expect("mediaType").to_owned();
    let digest = sha256(&bytes);
    let r = h.put_manifest(repo, &digest, &media_type, &bytes).await;
    r.expect(StatusCode::CREATED);
    let mut descriptor =
        serde_json::json!({"mediaType": media_type, "digest": digest, "size": bytes.len()});
    let artifact_type = body
        .get("artifactType")
        .cloned()
        .or_else(|| body.get("config").map(|c| c["mediaType"].clone()));
    if let Some(t) = artifact_type {
        descriptor["artifactType"] = t;
    }
    if let Some(a) = body.get("annotations") {
        descriptor["annotations"] = a.clone();
    }
    Referrer { digest, descriptor }
}
