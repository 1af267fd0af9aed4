//! A store whose index failed (sled keeps the first write error for good, as on a full disk)
//! takes writes again once the disk has room, without a restart, and loses nothing it
//! acknowledged.

use std::path::{Path, PathBuf};
use std::process::Command;

use shoal_protocol::{Algorithm, BlobIndex, Digest, RepoName, chunk_size_for};

use super::{Store, StoreError, fsck};

fn repo() -> RepoName {
    "team/app".parse().unwrap()
}

fn digest(n: u64) -> Digest {
    Digest::sha256(&n.to_be_bytes())
}

/// Stores the blob of [`digest`]`(n)`.
async fn put_blob(store: &Store, n: u64) {
    let mut writer = store.blob_writer(Algorithm::Sha256, Some(8)).await.unwrap();
    writer.write(&n.to_be_bytes()).await.unwrap();
    writer.finish(&digest(n)).await.unwrap();
}

async fn open(root: &Path) -> Store {
    Store::open_in_test(root).await
}

/// Closes `store` and opens its data directory again, once the journal thread of the closed
/// one has let go of the index.
async fn restart(store: Store) -> Store {
    let root = store.layout().root().to_owned();
    store.close().await;
    drop(store);
    for _ in 0..500 {
        let r = root.clone();
        if let Ok(store) = tokio::task::spawn_blocking(move || Store::open(&r))
            .await
            .unwrap()
        {
            return store;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("the store did not open again");
}

async fn linked(store: &Store, n: u64) -> bool {
    store
        .read(move |i| i.is_linked(&repo(), &digest(n)))
        .await
        .unwrap()
}

/// Checks the store with `fsck`, once the journal thread of the closed store has let go of the
/// index.
async fn fsck_is_clean(root: &Path) {
    for _ in 0..500 {
        let r = root.to_owned();
        match tokio::task::spawn_blocking(move || fsck(&r, false))
            .await
            .unwrap()
        {
            Ok(report) => {
                assert!(report.is_clean(), "fsck: {:?}", report.problems);
                return;
            }
            Err(_locked) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
        }
    }
    panic!("fsck could not open the index");
}

#[tokio::test]
async fn a_failed_index_refuses_writes_and_takes_them_again_at_the_next_commit() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    for n in [1, 2] {
        put_blob(&store, n).await;
    }
    store.link(&repo(), &digest(1)).await.unwrap();

    store.inner.index.fail_for_test();
    let refused = store
        .read(|i| i.put_blob_index(&BlobIndex::of(b"x", chunk_size_for(1)).unwrap()))
        .await
        .unwrap_err();
    assert!(refused.is_disk_full(), "refused with {refused:?}");
    assert!(
        linked(&store, 1).await,
        "reads go on while the index is failed"
    );

    // The disk has room: the journal thread opens the index again before the batch.
    store.link(&repo(), &digest(2)).await.unwrap();
    assert!(store.inner.index.failure().is_none());
    assert!(linked(&store, 1).await && linked(&store, 2).await);

    let store = restart(store).await;
    assert!(linked(&store, 1).await && linked(&store, 2).await);
    store.close().await;
    drop(store);
    fsck_is_clean(dir.path()).await;
}

#[tokio::test]
async fn a_refused_write_nudges_the_journal_thread_to_open_the_index_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    store.inner.index.fail_for_test();
    // No commit follows: the refused write alone brings the index back.
    let _refused = store.create_upload(&repo()).await.unwrap_err();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while store.inner.index.failure().is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "the index stayed failed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    store.create_upload(&repo()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_during_a_reopen_see_the_index_before_or_after_it_never_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    put_blob(&store, 1).await;
    store.link(&repo(), &digest(1)).await.unwrap();
    store.inner.index.fail_for_test();

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let (index, stop) = (store.inner.index.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut reads = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    assert!(index.is_linked(&repo(), &digest(1)).unwrap());
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    // The commit opens the index again while they read.
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    put_blob(&store, 2).await;
    store.link(&repo(), &digest(2)).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for reader in readers {
        assert!(reader.join().unwrap() > 0);
    }
    assert!(store.inner.index.failure().is_none());
    assert!(linked(&store, 2).await);
}

/// A tmpfs of a few MiB, unmounted when dropped. Needs root.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(mib: u64) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().ok()?;
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .output()
            .is_ok_and(|o| o.status.success());
        mounted.then_some(SmallDisk { dir })
    }

    fn ballast(&self) -> PathBuf {
        self.dir.path().join("ballast")
    }

    /// Writes ballast until the disk is full.
    fn fill(&self) {
        use std::io::Write;
        let mut file = std::fs::File::create(self.ballast()).unwrap();
        let zeros = vec![0u8; 1 << 20];
        let mut piece = zeros.len();
        while piece >= 512 {
            match file.write(&zeros[..piece]) {
                Ok(0) | Err(_) => piece /= 2,
                Ok(_) => {}
            }
        }
    }

    fn free(&self) {
        std::fs::remove_file(self.ballast()).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .output();
    }
}

/// Links the blobs of `ns`, flushing the index after each, until the index fails or the
/// journal refuses `give_up` batches; the blobs whose link was acknowledged.
async fn link_until_the_index_fails(
    store: &Store,
    ns: std::ops::Range<u64>,
    give_up: usize,
) -> Vec<u64> {
    let (mut acknowledged, mut refused) = (Vec::new(), 0);
    for n in ns {
        match store.link(&repo(), &digest(n)).await {
            Ok(()) => acknowledged.push(n),
            Err(e) => {
                assert!(e.is_disk_full(), "a link on a full disk failed with {e:?}");
                refused += 1;
            }
        }
        // sled writes its log in the background: make it write now.
        let _ = store.read(|i| i.flush()).await;
        if store.inner.index.failure().is_some() || refused >= give_up {
            break;
        }
    }
    acknowledged
}

#[tokio::test]
async fn an_index_failed_by_a_full_disk_takes_writes_again_once_there_is_room() {
    const TEST: &str = "an_index_failed_by_a_full_disk_takes_writes_again_once_there_is_room";
    let Some(disk) = SmallDisk::mount(24) else {
        eprintln!("SKIP: {TEST}: cannot mount a tmpfs (needs root)");
        return;
    };
    let root = disk.dir.path().join("data");
    let store = open(&root).await;
    for n in (0..20).chain(1_000..1_060).chain([5_000, 9_999]) {
        put_blob(&store, n).await;
    }
    let mut acknowledged = Vec::new();
    for n in 0..20 {
        store.link(&repo(), &digest(n)).await.unwrap();
        acknowledged.push(n);
    }

    disk.fill();
    // Small commits while the disk is full: the journal's last page takes a few lines, and
    // sled fails when its log needs a page.
    acknowledged.extend(link_until_the_index_fails(&store, 1_000..1_060, 20).await);
    if store.inner.index.failure().is_none() {
        // The journal filled first: make sled write on its own.
        let _ = store
            .read(|i| {
                for n in 0..4_000u64 {
                    let bytes = n.to_be_bytes();
                    let bi = BlobIndex::of(&bytes, chunk_size_for(8))
                        .map_err(StoreError::encode("a blob index"))?;
                    i.put_blob_index(&bi)?;
                }
                i.flush()
            })
            .await;
    }
    let failure = store.inner.index.failure().expect("the index failed");
    assert!(failure.is_disk_full(), "the index failed with {failure:?}");

    // Still full: writes are refused as a full disk (507), before the journal.
    let refused = store.link(&repo(), &digest(9_999)).await.unwrap_err();
    assert!(refused.is_disk_full(), "refused with {refused:?}");
    assert!(matches!(refused, StoreError::Index(_)), "{refused:?}");
    for &n in &acknowledged {
        assert!(linked(&store, n).await, "acknowledged link {n} is readable");
    }

    // Room again: the index is opened again by itself, without a write or a restart.
    disk.free();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while store.inner.index.failure().is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "the index stayed failed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    store.link(&repo(), &digest(5_000)).await.unwrap();
    let id = store.create_upload(&repo()).await.unwrap();
    for &n in acknowledged.iter().chain(&[5_000]) {
        assert!(linked(&store, n).await, "link {n} after the recovery");
    }
    assert!(
        !linked(&store, 9_999).await,
        "a refused link is not written"
    );

    let store = restart(store).await;
    for &n in acknowledged.iter().chain(&[5_000]) {
        assert!(linked(&store, n).await, "link {n} after a restart");
    }
    let upload = store.read(move |i| i.upload(&id)).await.unwrap();
    assert!(upload.is_some(), "the upload session survives");
    store.close().await;
    drop(store);
    fsck_is_clean(&root).await;
}
