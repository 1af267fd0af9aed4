//! Garbage collection at scale: how long a collection of a large store takes, and what it does
//! to the pushes and pulls that run meanwhile.
//!
//! `cargo bench -p shoal-node --bench gc` builds a store of `SHOAL_GC_IMAGES` images (default
//! 10,000) of ten blobs each (100,000 blobs), deletes the tags of half of them, then measures
//! pushes (a blob upload and a manifest `PUT`) and pulls (a manifest and a blob `GET`) from
//! four clients through the registry's router, first alone (`SHOAL_GC_QUIET_SECS`, default 60 s,
//! about as long as the collection) and then while a collection with a one-second grace period
//! sweeps the deleted half. It prints the collection's times and the latency
//! percentiles of both runs. Blob files are written straight into the data directory (the
//! bench measures collection, not ingest); every index entry goes through the journal as in a
//! node, and manifests are pushed through the registry API.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use shoal_node::registry::Registry;
use shoal_node::store::{Batch, GcOptions, Store};
use shoal_protocol::{Digest, RepoName};
use tower::ServiceExt;

const BLOBS_PER_IMAGE: usize = 10;
const BLOB_BYTES: usize = 1024;
const CLIENTS: usize = 4;
const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn blob(image: usize, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; BLOB_BYTES];
    let seed = blake3::hash(format!("{image}/{n}").as_bytes());
    for (i, chunk) in b.chunks_mut(32).enumerate() {
        let h = blake3::keyed_hash(seed.as_bytes(), &i.to_le_bytes());
        chunk.copy_from_slice(&h.as_bytes()[..chunk.len()]);
    }
    b
}

fn manifest(digests: &[Digest]) -> Vec<u8> {
    let d = |d: &Digest, t: &str| serde_json::json!({"mediaType": t, "digest": d.to_string(), "size": BLOB_BYTES});
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": d(&digests[0], "application/vnd.oci.image.config.v1+json"),
        "layers": digests[1..].iter().map(|x| d(x, "application/vnd.oci.image.layer.v1.tar+gzip")).collect::<Vec<_>>(),
    }))
    .expect("json")
}

async fn send(app: &axum::Router, method: Method, uri: &str, body: Vec<u8>) -> StatusCode {
    let mut req = Request::builder().method(method).uri(uri);
    if uri.contains("/manifests/") {
        req = req.header("content-type", MANIFEST);
    }
    let response = app
        .clone()
        .oneshot(req.body(Body::from(body)).expect("request"))
        .await
        .expect("infallible");
    let status = response.status();
    let _ = axum::body::to_bytes(response.into_body(), usize::MAX).await;
    status
}

/// Latencies in microseconds, by kind.
#[derive(Default)]
struct Latencies {
    push: Vec<u64>,
    pull: Vec<u64>,
}

fn percentile(v: &mut [u64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i] as f64 / 1000.0
}

/// Runs the clients until `stop`; returns their latencies.
async fn clients(app: axum::Router, kept: usize, stop: Arc<AtomicBool>, run: usize) -> Latencies {
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let (app, stop) = (app.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut l = Latencies::default();
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                // A push: one new blob and a manifest naming it and an old kept layer.
                let fresh = blob(1_000_000 + run * 100_000 + c * 10_000 + n, 0);
                let fd = Digest::sha256(&fresh);
                let t = Instant::now();
                let s = send(
                    &app,
                    Method::POST,
                    &format!("/v2/bench/app/blobs/uploads/?digest={fd}"),
                    fresh,
                )
                .await;
                assert_eq!(s, StatusCode::CREATED);
                let old = Digest::sha256(&blob((n * 2) % kept * 2, 1));
                let m = manifest(&[fd, old]);
                let s = send(
                    &app,
                    Method::PUT,
                    &format!("/v2/bench/app/manifests/c{c}-{run}-{n}"),
                    m,
                )
                .await;
                assert_eq!(s, StatusCode::CREATED, "push");
                l.push.push(t.elapsed().as_micros() as u64);
                // A pull of a kept image: its manifest and a layer.
                let i = (n * 7 + c) % kept * 2;
                let t = Instant::now();
                let s = send(
                    &app,
                    Method::GET,
                    &format!("/v2/bench/app/manifests/t{i}"),
                    Vec::new(),
                )
                .await;
                assert_eq!(s, StatusCode::OK, "pull t{i}");
                let layer = Digest::sha256(&blob(i, 3));
                let s = send(
                    &app,
                    Method::GET,
                    &format!("/v2/bench/app/blobs/{layer}"),
                    Vec::new(),
                )
                .await;
                assert_eq!(s, StatusCode::OK, "pull layer");
                l.pull.push(t.elapsed().as_micros() as u64);
            }
            l
        }));
    }
    let mut all = Latencies::default();
    for t in tasks {
        let l = t.await.expect("client");
        all.push.extend(l.push);
        all.pull.extend(l.pull);
    }
    all
}

fn row(name: &str, l: &mut Latencies) {
    let over = |v: &[u64]| v.iter().filter(|&&us| us > 50_000).count();
    println!(
        "| {name} | {} | {:.1} | {:.1} | {:.1} | {} | {} | {:.1} | {:.1} | {:.1} | {} |",
        l.push.len(),
        percentile(&mut l.push, 0.5),
        percentile(&mut l.push, 0.99),
        percentile(&mut l.push, 1.0),
        over(&l.push),
        l.pull.len(),
        percentile(&mut l.pull, 0.5),
        percentile(&mut l.pull, 0.99),
        percentile(&mut l.pull, 1.0),
        over(&l.pull),
    );
}

fn main() -> anyhow::Result<()> {
    let images: usize = std::env::var("SHOAL_GC_IMAGES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let dir = tempfile::tempdir()?;
        let d = dir.path().to_owned();
        let store = tokio::task::spawn_blocking(move || Store::open(&d)).await??;
        let repo: RepoName = "bench/app".parse()?;
        let app = Registry::new(store.clone()).router();

        let started = Instant::now();
        let layout = store.layout().clone();
        let mut batch = Batch::new();
        for i in 0..images {
            for n in 0..BLOBS_PER_IMAGE {
                let b = blob(i, n);
                let digest = Digest::sha256(&b);
                let path = layout.blob(&digest);
                std::fs::create_dir_all(path.parent().expect("parent"))?;
                std::fs::write(&path, &b)?;
                batch = batch.link(&repo, &digest);
            }
            if i % 100 == 99 {
                store.commit(std::mem::take(&mut batch)).await?;
            }
        }
        store.commit(batch).await?;
        let blobs_done = started.elapsed();
        // Manifests through the API, four at a time; the odd ones are deleted again.
        let mut pushes = tokio::task::JoinSet::new();
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for _ in 0..CLIENTS {
            let (app, next) = (app.clone(), next.clone());
            pushes.spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= images {
                        return;
                    }
                    let digests: Vec<Digest> = (0..BLOBS_PER_IMAGE).map(|n| Digest::sha256(&blob(i, n))).collect();
                    let s = send(&app, Method::PUT, &format!("/v2/bench/app/manifests/t{i}"), manifest(&digests)).await;
                    assert_eq!(s, StatusCode::CREATED, "manifest t{i}");
                    if i % 2 == 1 {
                        let s = send(&app, Method::DELETE, &format!("/v2/bench/app/manifests/t{i}"), Vec::new()).await;
                        assert_eq!(s, StatusCode::ACCEPTED);
                    }
                }
            });
        }
        while let Some(r) = pushes.join_next().await {
            r?;
        }
        println!(
            "store: {images} images, {} blobs (files and links {:.1} s, manifests {:.1} s)",
            images * BLOBS_PER_IMAGE,
            blobs_done.as_secs_f64(),
            (started.elapsed() - blobs_done).as_secs_f64()
        );
        // The deleted half is older than the grace period below.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let kept = images / 2;

        // Without a collection, for about as long as one takes (so that the rare slow requests
        // of the machine itself show about as often in both runs).
        let quiet_secs: u64 = std::env::var("SHOAL_GC_QUIET_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(60);
        let stop = Arc::new(AtomicBool::new(false));
        let quiet = tokio::spawn(clients(app.clone(), kept, stop.clone(), 0));
        let dry = store.gc(GcOptions::new(Duration::from_secs(1)).dry()).await?;
        tokio::time::sleep(Duration::from_secs(quiet_secs)).await;
        stop.store(true, Ordering::Relaxed);
        let mut alone = quiet.await?;

        let stop = Arc::new(AtomicBool::new(false));
        let busy = tokio::spawn(clients(app.clone(), kept, stop.clone(), 1));
        let t = Instant::now();
        let report = store.gc(GcOptions::new(Duration::from_secs(1))).await?;
        let gc_time = t.elapsed();
        stop.store(true, Ordering::Relaxed);
        let mut during = busy.await?;
        println!(
            "collection: {} of {} blob files swept ({} MB), dry run listed {}; mark {} ms, sweep {} ms, whole {:.1} s; {} kept as touched",
            report.swept.len(),
            report.blobs,
            report.bytes_freed / 1_000_000,
            dry.swept.len(),
            report.mark_ms,
            report.sweep_ms,
            gc_time.as_secs_f64(),
            report.touched
        );
        println!(
            "the collection held the guard exclusively for {} ms; its longest journal write took {} ms",
            report.hold_ms, report.longest_write_ms
        );
        println!();
        println!(
            "| run | pushes | p50 ms | p99 ms | max ms | over 50 ms | pulls | p50 ms | p99 ms | max ms | over 50 ms |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        row(&format!("no collection ({quiet_secs} s)"), &mut alone);
        row("during the collection", &mut during);
        store.close().await;
        anyhow::Ok(())
    })
}
