//! A node's shutdown in the middle of work: a download from a peer and a client's push are both
//! under way when `Node::shutdown` is called. Once it returns nothing writes to the data
//! directory any more, and what is there is consistent and resumable.

mod testnet;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use shoal_protocol::Digest;
use testnet::{TestNet, image, wait_until};
use tokio::io::AsyncWriteExt;

const MIB: usize = 1 << 20;
const WAIT: Duration = Duration::from_secs(60);

/// Every file under `dir`: its size and a hash of its content.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (u64, blake3::Hash)> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).expect("read_dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                todo.push(path);
            } else {
                let bytes = std::fs::read(&path).expect("read");
                out.insert(path, (bytes.len() as u64, blake3::hash(&bytes)));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_stopped_mid_download_and_mid_push_writes_nothing_after_and_leaves_a_clean_store() {
    let mut net = TestNet::with_identities(2);
    // Slow enough that the download is far from done when the node stops.
    net.serve_limits.insert(0, 4 * MIB as u64);
    net.shutdown_grace = Duration::from_secs(1);
    for _ in 0..2 {
        net.start_next().await;
    }
    net.wait_connected(1).await;
    let img = image(21, &[48 * MIB]);
    let layer = Digest::sha256(&img.blobs[1]);
    net.nodes[0].push("team/stop", "1", &img).await;
    wait_until(WAIT, "record on 1", || async {
        net.nodes[1]
            .has_record("team/stop", "1")
            .await
            .then_some(())
    })
    .await;

    // A download under way on node 1, streamed to a client.
    let addr = net.nodes[1].http_addr();
    let path = format!("/v2/team/stop/blobs/{layer}");
    let pull = tokio::spawn(async move { testnet::http(addr, "GET", &path, &[], b"").await });
    let store = net.nodes[1].node().store().clone();
    wait_until(WAIT, "the download to hold a few chunks", || async {
        let p = store.partial_in_progress(&layer)?;
        (p.progress().borrow().held >= 2).then_some(())
    })
    .await;

    // A push under way on node 1: a session with one acknowledged chunk, and a second chunk
    // whose body is still arriving (the client sends part of it and stalls).
    let start = testnet::http(addr, "POST", "/v2/team/push/blobs/uploads/", &[], b"").await;
    assert_eq!(start.status, 202);
    let location = start.header("location").expect("location").to_owned();
    let first = vec![7u8; MIB];
    let patched = testnet::http(
        addr,
        "PATCH",
        &location,
        &[("Content-Range", &format!("0-{}", MIB - 1))],
        &first,
    )
    .await;
    assert_eq!(patched.status, 202, "the first chunk is acknowledged");
    let mut stalled = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "PATCH {location} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nContent-Range: {}-{}\r\n\r\n",
        4 * MIB,
        MIB,
        5 * MIB - 1
    );
    stalled.write_all(head.as_bytes()).await.expect("write");
    stalled
        .write_all(&vec![8u8; 3 * MIB])
        .await
        .expect("write body");
    let session = location.rsplit('/').next().expect("session id").to_owned();
    let data = net.nodes[1]
        .dir
        .path()
        .join("uploads")
        .join(&session)
        .join("data");
    wait_until(
        WAIT,
        "the unacknowledged chunk to reach the disk",
        || async { (std::fs::metadata(&data).ok()?.len() > MIB as u64).then_some(()) },
    )
    .await;

    let held_at_stop = store
        .partial_in_progress(&layer)
        .expect("the download is still under way")
        .held()
        .count_ones();
    drop(store);
    let dir = net.nodes[1].dir.path().to_owned();
    let node = net.nodes[1].node.take().expect("node 1 runs");
    node.shutdown().await;

    // Chunks were in flight from node 0, and the stalled client now sends the rest of its
    // chunk: any write either could still cause would land in this window.
    let before = snapshot(&dir);
    let _ = stalled.write_all(&vec![8u8; MIB]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = snapshot(&dir);
    assert!(
        before == after,
        "the data directory changed after the shutdown returned"
    );
    drop(stalled);
    let _ = pull.await;

    // Clean: nothing left in tmp/, fsck finds nothing to say.
    assert_eq!(
        std::fs::read_dir(dir.join("tmp")).expect("tmp").count(),
        0,
        "tmp/ holds files"
    );
    let d = dir.clone();
    let report = tokio::task::spawn_blocking(move || shoal_node::store::fsck(&d, false))
        .await
        .expect("fsck task")
        .expect("fsck ran");
    assert!(report.is_clean(), "{:?}", report.problems);

    // Resumable: the session holds its acknowledged chunk (the cut-off one is dropped when the
    // next chunk arrives), and the partial download every chunk it held when the node stopped.
    let d = dir.clone();
    let reopened = tokio::task::spawn_blocking(move || shoal_node::store::Store::open(&d))
        .await
        .expect("open task")
        .expect("the store reopens");
    let repo = "team/push".parse().expect("repo");
    let upload = reopened.upload(&repo, &session).await.expect("the session");
    assert!(upload.lock().await.offset() >= MIB as u64);
    let index = net.nodes[0]
        .node()
        .store()
        .blob_index(&layer)
        .await
        .expect("index")
        .expect("node 0 holds the layer");
    let partial = reopened.partial(index).await.expect("the partial resumes");
    assert!(
        partial.held().count_ones() >= held_at_stop,
        "held {} chunks at the stop, {} after",
        held_at_stop,
        partial.held().count_ones()
    );
    assert!(!partial.is_complete(), "the download was cut off early");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_in_flight_when_the_node_stops_still_gets_its_answer() {
    let mut net = TestNet::with_identities(1);
    net.shutdown_grace = Duration::from_secs(10);
    net.start_next().await;
    let addr = net.nodes[0].http_addr();
    let start = testnet::http(addr, "POST", "/v2/team/late/blobs/uploads/", &[], b"").await;
    assert_eq!(start.status, 202);
    let location = start.header("location").expect("location").to_owned();
    // The chunk's headers and half its body are sent before the shutdown starts, the rest
    // after: the node finishes the request and acknowledges the chunk.
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "PATCH {location} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\nContent-Range: 0-{}\r\n\r\n",
        2 * MIB,
        2 * MIB - 1
    );
    s.write_all(head.as_bytes()).await.expect("write");
    s.write_all(&vec![1u8; MIB]).await.expect("write");
    let dir = net.nodes[0].dir.path().to_owned();
    let session = location.rsplit('/').next().expect("session id").to_owned();
    let data = dir.join("uploads").join(&session).join("data");
    // In flight: the node is reading the body (a request whose headers it has not read yet
    // is not in flight; its connection is closed as idle, and the client sends it again).
    wait_until(
        Duration::from_secs(30),
        "the first half on disk",
        || async { (std::fs::metadata(&data).ok()?.len() >= MIB as u64).then_some(()) },
    )
    .await;
    let node = net.nodes[0].node.take().expect("node runs");
    let stop = tokio::spawn(node.shutdown());
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.write_all(&vec![1u8; MIB]).await.expect("write the rest");
    let mut answer = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut s, &mut answer)
        .await
        .expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
    stop.await.expect("shutdown");
    let len = std::fs::metadata(&data).expect("the session's data").len();
    assert_eq!(len, 2 * MIB as u64, "the acknowledged chunk is on disk");
}
