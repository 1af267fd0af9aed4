//! Garbage collection through the registry: what it frees, what it keeps, and pushes racing it.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::http::StatusCode;
use shoal_node::lifecycle::Retention;
use shoal_node::store::{GcOptions, GcReport};
use shoal_protocol::lifecycle::LifecyclePolicy;

use crate::harness::*;
use crate::push::*;

const NOW: GcOptions = GcOptions::new(Duration::ZERO);

/// Pushes a signature (an artifact with an empty config) whose subject is `subject`.
async fn push_signature(h: &Harness, repo: &str, subject: &Image) -> Referrer {
    let empty = h.push_blob(repo, b"{}").await;
    push_referrer(
        h,
        repo,
        serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": "application/vnd.example.signature",
            "config": desc(OCI_EMPTY, &empty, 2),
            "layers": [],
            "subject": desc(OCI_MANIFEST, &subject.digest, subject.manifest.len()),
        }),
    )
    .await
}

fn swept(report: &GcReport) -> BTreeSet<String> {
    report.swept.iter().map(|(d, _)| d.to_string()).collect()
}

async fn fsck_clean(h: &mut Harness) {
    h.stop();
    let d = h.path().to_owned();
    let report = retry_blocking("fsck", move || shoal_node::store::fsck(&d, false)).await;
    assert!(report.is_clean(), "fsck: {:?}", report.problems);
    h.start().await;
}

/// Every blob of `img` is served whole in `repo`, and its manifest by `reference`.
async fn assert_whole(h: &Harness, repo: &str, reference: &str, img: &Image) {
    let r = h.get(&format!("/v2/{repo}/manifests/{reference}")).await;
    r.expect(StatusCode::OK);
    for (digest, bytes) in &img.blobs {
        let r = h.get(&format!("/v2/{repo}/blobs/{digest}")).await;
        r.expect(StatusCode::OK);
        assert_eq!(&r.body, bytes, "blob {digest}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn gc_frees_what_nothing_needs_and_every_tagged_image_stays_whole() {
    let mut h = Harness::new().await;
    let kept = push_image(&h, "r", Some("keep"), 1).await;
    let signature = push_signature(&h, "r", &kept).await;
    let untagged = push_image(&h, "r", Some("old"), 2).await;
    h.delete("/v2/r/manifests/old")
        .await
        .expect(StatusCode::ACCEPTED);
    let by_digest = push_image(&h, "r", None, 3).await;
    let orphan = h.push_blob("r", &bytes(9, 5000)).await;
    let mut garbage: BTreeSet<String> = [&untagged, &by_digest]
        .iter()
        .flat_map(|i| [i.digest.clone(), i.config.clone(), i.layers[0].clone()])
        .collect();
    garbage.insert(orphan.clone());

    // Within the grace period, nothing goes.
    let report = h
        .store()
        .gc(GcOptions::new(Duration::from_secs(3600)))
        .await
        .unwrap();
    assert!(report.swept.is_empty(), "{report:?}");
    assert!(report.young > 0, "{report:?}");

    // A dry run lists exactly the garbage and removes nothing.
    let dry = h.store().gc(NOW.dry()).await.unwrap();
    assert_eq!(swept(&dry), garbage);
    h.get(&format!("/v2/r/blobs/{orphan}"))
        .await
        .expect(StatusCode::OK);

    let report = h.store().gc(NOW).await.unwrap();
    assert_eq!(swept(&report), garbage);
    let sizes: u64 = report.swept.iter().map(|(_, s)| s).sum();
    assert_eq!(report.bytes_freed, sizes);
    assert!(report.bytes_freed > 5000);

    assert_whole(&h, "r", "keep", &kept).await;
    h.get(&format!("/v2/r/manifests/{}", signature.digest))
        .await
        .expect(StatusCode::OK);
    let listed = h.get(&format!("/v2/r/referrers/{}", kept.digest)).await;
    assert!(referrer_map(&listed.json()).contains_key(&signature.digest));
    for d in &garbage {
        let blob = h.get(&format!("/v2/r/blobs/{d}")).await;
        blob.expect_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN");
    }
    for img in [&untagged, &by_digest] {
        let m = h.get(&format!("/v2/r/manifests/{}", img.digest)).await;
        m.expect_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
    }
    // Nothing is left to collect, and the store is consistent.
    assert!(h.store().gc(NOW).await.unwrap().swept.is_empty());
    fsck_clean(&mut h).await;
    assert_whole(&h, "r", "keep", &kept).await;

    // What was swept can be pushed again.
    let again = push_image(&h, "r", Some("again"), 2).await;
    assert_whole(&h, "r", "again", &again).await;
}

/// Pushes an image of `config` and `layer` to `repo:tag`; `None` if the manifest is refused.
async fn push_parts(h: &Harness, tag: &str, config: &[u8], layer: &[u8]) -> Option<Image> {
    let c = h.push_blob("r", config).await;
    let l = h.push_blob("r", layer).await;
    let manifest = to_bytes(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": desc(OCI_CONFIG, &c, config.len()),
        "layers": [desc(OCI_LAYER, &l, layer.len())],
    }));
    let r = h.put_manifest("r", tag, OCI_MANIFEST, &manifest).await;
    if r.status != StatusCode::CREATED {
        // The only refusal a collection may cause, and then nothing was acknowledged.
        r.expect_error(StatusCode::BAD_REQUEST, "MANIFEST_BLOB_UNKNOWN");
        return None;
    }
    Some(Image {
        digest: sha256(&manifest),
        manifest,
        config: c.clone(),
        layers: vec![l.clone()],
        blobs: vec![(c, config.to_vec()), (l, layer.to_vec())],
    })
}

/// Pushes of images whose layers are garbage (their last image was deleted and the grace period
/// has passed), while collections run back to back: the layer is swept before its upload (and
/// written again), or kept because the upload touched it; either way every push is acknowledged
/// and stays whole, and the garbage that nothing took back is freed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pushes_racing_the_collector_are_never_harmed() {
    const GRACE: Duration = Duration::from_millis(500);
    let mut h = Harness::new().await;
    let stop = Arc::new(AtomicBool::new(false));
    let store = h.store().clone();
    let collector = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let (mut runs, mut freed) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let options = GcOptions::new(GRACE);
                let report = store.gc(options).await.expect("gc");
                runs += 1;
                freed += report.swept.len() as u64;
                tokio::task::yield_now().await;
            }
            (runs, freed)
        })
    };
    let mut acknowledged = Vec::new();
    let config = |round: u64, n: u64| {
        format!(r#"{{"architecture":"amd64","os":"linux","round":{round},"n":{n}}}"#).into_bytes()
    };
    for round in 0..6u64 {
        let layer = bytes(200 + round, 40_000);
        // Garbage: an image pushed and deleted, left for longer than the grace period.
        push_parts(&h, "gone", &config(round, 0), &layer)
            .await
            .expect("nothing is collected yet");
        h.delete("/v2/r/manifests/gone")
            .await
            .expect(StatusCode::ACCEPTED);
        tokio::time::sleep(GRACE * 2).await;
        // The same layer pushed again while the collector runs.
        for n in 1..4 {
            let tag = format!("r{round}n{n}");
            let img = push_parts(&h, &tag, &config(round, n), &layer).await;
            acknowledged.push((
                tag,
                img.expect("a push within the grace period was refused"),
            ));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (runs, freed) = collector.await.unwrap();
    println!(
        "{runs} collections freed {freed} blobs while {} images were pushed",
        acknowledged.len()
    );
    assert!(runs > 6, "the collector never raced the pushes");
    // Each round's deleted config and manifest at least.
    assert!(freed >= 10, "the garbage was not collected");
    for (tag, img) in &acknowledged {
        assert_whole(&h, "r", tag, img).await;
    }
    fsck_clean(&mut h).await;
    for (tag, img) in &acknowledged {
        assert_whole(&h, "r", tag, img).await;
    }
}

/// The images a lifecycle policy sees: tagged and untagged manifests, not referrers; each
/// tagged one dated by its record.
#[tokio::test(flavor = "multi_thread")]
async fn a_policy_sees_the_images_of_a_repository_but_not_their_referrers() {
    let h = Harness::new().await;
    let tagged = push_image(&h, "r", Some("prod-1"), 1).await;
    let untagged = push_image(&h, "r", None, 2).await;
    push_image(&h, "other", Some("prod-9"), 3).await;
    let signature = push_signature(&h, "r", &tagged).await;
    let layout = h.store().layout().clone();
    let repo: shoal_protocol::RepoName = "r".parse().unwrap();
    let r = repo.clone();
    let images = h
        .store()
        .read(move |i| shoal_node::lifecycle::images(i, &layout, &r))
        .await
        .unwrap();
    let by_digest: std::collections::BTreeMap<String, &shoal_protocol::lifecycle::Image> =
        images.iter().map(|i| (i.digest.to_string(), i)).collect();
    assert_eq!(by_digest.len(), 2, "{images:?}");
    assert!(!by_digest.contains_key(&signature.digest));
    assert_eq!(by_digest[&tagged.digest].tags, ["prod-1"]);
    assert!(by_digest[&untagged.digest].tags.is_empty());
    let now = shoal_node::auth::now_ms();
    for image in &images {
        assert!(image.pushed_at_ms <= now && image.pushed_at_ms + 60_000 > now);
    }
    // Untagged images older than a day: none now, the untagged one two days from now.
    let policy: shoal_protocol::lifecycle::LifecyclePolicy = serde_json::from_str(
        r#"{"rules":[{"rulePriority":1,"selection":{"tagStatus":"untagged",
        "countType":"sinceImagePushed","countUnit":"days","countNumber":1},
        "action":{"type":"expire"}}]}"#,
    )
    .unwrap();
    let layout = h.store().layout().clone();
    let (p, r) = (policy.clone(), repo.clone());
    let now_list = h
        .store()
        .read(move |i| shoal_node::lifecycle::preview(i, &layout, &r, &p, now))
        .await
        .unwrap();
    assert!(now_list.is_empty(), "{now_list:?}");
    let layout = h.store().layout().clone();
    let later = h
        .store()
        .read(move |i| {
            shoal_node::lifecycle::preview(i, &layout, &repo, &policy, now + 2 * 86_400_000)
        })
        .await
        .unwrap();
    assert_eq!(later.len(), 1);
    assert_eq!(later[0].digest.to_string(), untagged.digest);
    assert!(
        later[0].reason.contains("pushed 2 days ago"),
        "{}",
        later[0].reason
    );
}

/// `shoal du`'s figures: each repository's bytes, unique and shared, and what a collection
/// would free.
#[tokio::test(flavor = "multi_thread")]
async fn usage_counts_each_repository_and_what_a_collection_would_free() {
    let h = Harness::new().await;
    let shared = bytes(50, 10_000);
    let only_a = bytes(51, 3_000);
    let loose = bytes(52, 7_000);
    for repo in ["a", "b"] {
        h.push_blob(repo, &shared).await;
    }
    h.push_blob("a", &only_a).await;
    h.push_blob("b", &loose).await;
    h.delete(&format!("/v2/b/blobs/{}", sha256(&loose)))
        .await
        .expect(StatusCode::ACCEPTED);
    let none = Retention::default();
    let usage = h.store().usage(Duration::ZERO, &none).await.unwrap();
    assert_eq!(usage.blobs, 3);
    assert_eq!(usage.bytes, 20_000);
    assert_eq!(usage.unheld_bytes, 7_000);
    // Nothing tagged: every blob is garbage to a collection without a grace period.
    assert_eq!(usage.reclaimable_bytes, 20_000);
    let by_repo: std::collections::BTreeMap<&str, &shoal_node::store::RepoUsage> =
        usage.repos.iter().map(|r| (r.repo.as_str(), r)).collect();
    assert_eq!(by_repo["a"].bytes, 13_000);
    assert_eq!(by_repo["a"].unique_bytes, 3_000);
    assert_eq!(by_repo["a"].shared_bytes, 10_000);
    assert_eq!(by_repo["b"].bytes, 10_000);
    assert_eq!(by_repo["b"].unique_bytes, 0);
    assert_eq!(usage.repos[0].repo, "a", "largest first");
    // Within the grace period nothing is reclaimable, and looking changed nothing.
    let usage = h
        .store()
        .usage(Duration::from_secs(3600), &none)
        .await
        .unwrap();
    assert_eq!(usage.reclaimable_bytes, 0);
    h.get(&format!("/v2/a/blobs/{}", sha256(&only_a)))
        .await
        .expect(StatusCode::OK);
}

/// What a retention policy would expire counts as reclaimable, and looking expires nothing.
#[tokio::test(flavor = "multi_thread")]
async fn usage_counts_what_retention_would_expire_as_reclaimable() {
    let h = Harness::new().await;
    let (old, new) = (
        push_image(&h, "team/app", Some("prod-1"), 60).await,
        push_image(&h, "team/app", Some("prod-2"), 61).await,
    );
    let keep_one = Retention::new(vec![(
        "team/*".parse().unwrap(),
        LifecyclePolicy::from_json(
            r#"{"rules": [{"rulePriority": 1, "selection": {"tagStatus": "tagged",
                "tagPrefixList": ["prod"], "countType": "imageCountMoreThan", "countNumber": 1},
                "action": {"type": "expire"}}]}"#,
        )
        .unwrap(),
    )]);
    let none = h
        .store()
        .usage(Duration::ZERO, &Retention::default())
        .await
        .unwrap();
    assert_eq!(none.reclaimable_bytes, 0, "everything is tagged");
    let usage = h.store().usage(Duration::ZERO, &keep_one).await.unwrap();
    let old_bytes: u64 =
        old.manifest.len() as u64 + old.blobs.iter().map(|(_, b)| b.len() as u64).sum::<u64>();
    assert_eq!(
        usage.reclaimable_bytes, old_bytes,
        "prod-1's manifest and blobs"
    );
    for image in [&old, &new] {
        h.get(&format!("/v2/team/app/manifests/{}", image.digest))
            .await
            .expect(StatusCode::OK);
    }
}

/// A download nothing has continued for a day goes with the next collection; a recent one stays;
/// a node configured for a shorter time removes one untouched for that long.
#[tokio::test(flavor = "multi_thread")]
async fn abandoned_downloads_expire_and_recent_ones_stay() {
    let h = Harness::new().await;
    let partial = |n: u8| {
        h.path()
            .join("partial/sha256")
            .join(sha256(&[n]).trim_start_matches("sha256:"))
    };
    let now = std::time::SystemTime::now();
    let hours_ago = |h: u64| Some(now - Duration::from_secs(h * 3600));
    // Untouched for two days, for two hours, and just written.
    for (n, modified) in [(1u8, hours_ago(48)), (2, None), (3, hours_ago(2))] {
        let dir = partial(n);
        std::fs::create_dir_all(&dir).unwrap();
        for file in ["data", "chunks"] {
            std::fs::write(dir.join(file), vec![0u8; 1000]).unwrap();
            if let Some(t) = modified {
                std::fs::File::options()
                    .write(true)
                    .open(dir.join(file))
                    .unwrap()
                    .set_modified(t)
                    .unwrap();
            }
        }
    }
    let dry = h
        .store()
        .gc(GcOptions::new(Duration::from_secs(3600)).dry())
        .await
        .unwrap();
    assert_eq!(
        (dry.abandoned_downloads, dry.abandoned_download_bytes),
        (1, 2000)
    );
    assert!(partial(1).exists(), "a dry run removed a download");
    let report = h.store().gc(NOW).await.unwrap();
    assert_eq!(report.abandoned_downloads, 1);
    assert!(
        !partial(1).exists(),
        "the abandoned download is still there"
    );
    assert!(partial(2).exists(), "a recent download was removed");
    assert!(
        partial(3).exists(),
        "a download untouched for 2 h went by default"
    );

    // `[gc] abandoned_download_secs = 3600`: the one untouched for two hours goes too.
    let hour = shoal_node::config::GcFileConfig {
        abandoned_download_secs: Some(3600),
        ..Default::default()
    }
    .resolve()
    .unwrap();
    let report = h
        .store()
        .gc(hour.options(Duration::ZERO, false))
        .await
        .unwrap();
    assert_eq!(report.abandoned_downloads, 1);
    assert!(!partial(3).exists(), "the configured time was not applied");
    assert!(partial(2).exists(), "a recent download was removed");
}

/// `GET /_shoal/v1/status` tells an admin where the disk stands (the store's bytes, the
/// filesystem's), and a remote stranger nothing of it.
#[tokio::test(flavor = "multi_thread")]
async fn status_shows_the_disk_to_an_admin_only() {
    let h = Harness::new().await;
    let img = push_image(&h, "r", Some("1"), 1).await;
    let pushed =
        img.manifest.len() as u64 + img.blobs.iter().map(|(_, b)| b.len() as u64).sum::<u64>();
    let leftover = h.path().join("uploads");
    let r = h
        .request(
            axum::http::Method::POST,
            "/v2/r/blobs/uploads/",
            &[],
            axum::body::Body::empty(),
        )
        .await;
    r.expect(StatusCode::ACCEPTED);
    let location = r.must_header("location").to_owned();
    h.request(axum::http::Method::PATCH, &location, &[], vec![7u8; 3000])
        .await
        .expect(StatusCode::ACCEPTED);
    assert!(leftover.is_dir());

    // A local client of an open registry is its admin.
    let status = h.get("/_shoal/v1/status").await;
    status.expect(StatusCode::OK);
    let s: shoal_node::registry::admin::Status = serde_json::from_slice(&status.body).unwrap();
    let disk = s.disk.expect("no disk figures for an admin");
    assert!(
        disk.used_bytes >= pushed + 3000,
        "the store's bytes ({}) miss the image ({pushed}) or the upload session",
        disk.used_bytes
    );
    let (free, total) = (disk.fs_free_bytes.unwrap(), disk.fs_total_bytes.unwrap());
    assert!(0 < free && free <= total, "free {free} of {total}");
    // A registry without a node has no quota and does not classify its blobs.
    assert_eq!(disk.max_disk_bytes, None);
    assert_eq!(disk.published_bytes, None);

    // A client from elsewhere with no credentials sees who the node is, not its disk.
    let mut request = axum::http::Request::get("/_shoal/v1/status")
        .body(axum::body::Body::empty())
        .unwrap();
    request
        .extensions_mut()
        .insert(shoal_node::registry::access::ClientAddr(
            "203.0.113.9:40000".parse().unwrap(),
        ));
    let stranger = h.send(request).await;
    stranger.expect(StatusCode::OK);
    assert_eq!(
        stranger.json()["disk"],
        serde_json::Value::Null,
        "{:?}",
        stranger
    );
}
