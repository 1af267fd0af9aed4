//! Abandoned upload sessions and downloads go on an idle node, with no request to trigger it:
//! a real node (its periodic expiry runs on its own task tracker), short expiry times, and the
//! data directory watched from outside.

#[path = "../testnet/mod.rs"]
mod testnet;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use shoal_protocol::{BlobIndex, Digest};
use testnet::{TestNet, http, wait_until};

use crate::harness::{bytes, sha256};

/// Gives every file in `dir` the modification time `t`.
fn age_files(dir: &Path, t: SystemTime) {
    for entry in std::fs::read_dir(dir).expect("read_dir") {
        let path = entry.expect("entry").path();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .expect("open")
            .set_modified(t)
            .expect("set_modified");
    }
}

fn partial_dir(root: &Path, digest: &Digest) -> PathBuf {
    root.join("partial")
        .join(digest.algorithm().as_str())
        .join(digest.hex())
}

/// Starts an upload session in `team/app` with one chunk; returns its location.
async fn session_with_a_chunk(addr: std::net::SocketAddr, chunk: &[u8]) -> String {
    let start = http(addr, "POST", "/v2/team/app/blobs/uploads/", &[], b"").await;
    assert_eq!(
        start.status,
        202,
        "{:?}",
        String::from_utf8_lossy(&start.body)
    );
    let location = start.header("location").expect("location").to_owned();
    let range = format!("0-{}", chunk.len() - 1);
    let r = http(
        addr,
        "PATCH",
        &location,
        &[("Content-Range", &range)],
        chunk,
    )
    .await;
    assert_eq!(r.status, 202, "{:?}", String::from_utf8_lossy(&r.body));
    location
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_node_removes_abandoned_uploads_and_downloads_by_itself() {
    let mut net = TestNet::with_identities(1);
    net.http.upload_session_ttl = Duration::from_secs(2);
    net.gc.abandoned_downloads = Duration::from_secs(2);
    net.start_next().await;
    let node = &net.nodes[0];
    let (addr, root) = (node.http_addr(), node.dir.path().to_owned());
    let store = node.node().store().clone();
    let long_ago = SystemTime::now() - Duration::from_secs(48 * 3600);

    // An upload session its client gave up after one chunk.
    let abandoned = session_with_a_chunk(addr, &bytes(1, 1000)).await;
    let abandoned_dir = root
        .join("uploads")
        .join(abandoned.rsplit('/').next().expect("id"));
    assert!(abandoned_dir.is_dir());

    // A live one: a chunk every 300 ms, for as long as the test waits.
    let chunk = bytes(2, 500);
    let live = session_with_a_chunk(addr, &chunk).await;
    let done = Arc::new(AtomicBool::new(false));
    let feeder = {
        let (live, chunk, done) = (live.clone(), chunk.clone(), done.clone());
        tokio::spawn(async move {
            let mut sent = chunk.clone();
            while !done.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let range = format!("{}-{}", sent.len(), sent.len() + chunk.len() - 1);
                let r = http(addr, "PATCH", &live, &[("Content-Range", &range)], &chunk).await;
                assert_eq!(r.status, 202, "{:?}", String::from_utf8_lossy(&r.body));
                sent.extend_from_slice(&chunk);
            }
            sent
        })
    };

    // A download a fetch holds, untouched on disk for two days (no peer had its next chunk).
    let held_blob = bytes(3, 300_000);
    let held_index = BlobIndex::of(&held_blob, 64 * 1024).expect("index");
    let held = store.partial(held_index.clone()).await.expect("partial");
    held.write_chunk(0, &held_blob[..64 * 1024]).expect("chunk");
    let held_dir = partial_dir(&root, held_index.digest());
    age_files(&held_dir, long_ago);
    // One the store remembers but nothing holds any more (its fetch stalled and ended).
    let stalled_blob = bytes(4, 200_000);
    let stalled_index = BlobIndex::of(&stalled_blob, 64 * 1024).expect("index");
    drop(store.partial(stalled_index.clone()).await.expect("partial"));
    let stalled_dir = partial_dir(&root, stalled_index.digest());
    age_files(&stalled_dir, long_ago);
    // And one a previous run left.
    let left: Digest = sha256(b"left").parse().expect("digest");
    let left_dir = partial_dir(&root, &left);
    std::fs::create_dir_all(&left_dir).expect("mkdir");
    for file in ["index", "data", "chunks"] {
        std::fs::write(left_dir.join(file), b"x").expect("write");
    }
    age_files(&left_dir, long_ago);

    // No request: the node removes them by itself.
    wait_until(Duration::from_secs(20), "the abandoned ones to go", || {
        let gone = !abandoned_dir.exists() && !stalled_dir.exists() && !left_dir.exists();
        async move { gone.then_some(()) }
    })
    .await;
    done.store(true, Ordering::Relaxed);
    let sent = feeder.await.expect("feeder");

    let r = http(addr, "GET", &abandoned, &[], b"").await;
    assert_eq!(r.status, 404);
    let body: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    assert_eq!(body["errors"][0]["code"], "BLOB_UPLOAD_UNKNOWN", "{body}");
    assert!(
        store.partial_in_progress(stalled_index.digest()).is_none(),
        "the stalled download is still remembered"
    );

    // The live session took every chunk and finishes whole; the held download is untouched.
    assert!(
        held_dir.join("data").is_file(),
        "a held download was removed"
    );
    assert!(held.has(0), "the held download lost its chunk");
    assert!(store.partial_in_progress(held_index.digest()).is_some());
    let digest = sha256(&sent);
    let r = http(addr, "PUT", &format!("{live}?digest={digest}"), &[], b"").await;
    assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
    let got = http(
        addr,
        "GET",
        &format!("/v2/team/app/blobs/{digest}"),
        &[],
        b"",
    )
    .await;
    assert_eq!(got.body, sent);
}
