//! The peers of the last run, kept on disk so that a restarted node finds its fleet again even
//! if its bootstrap peers are gone (or it was never given any, and mDNS cannot reach across
//! the network).
//!
//! The file is `peers.v1.json` in the data directory: a JSON list of `{peer, addrs}`, most
//! recently seen first, at most [`MAX_STORED_PEERS`] peers of at most [`MAX_ADDRS_PER_PEER`]
//! addresses each. It is written whole to a temporary file, fsynced and renamed over the old
//! one, so a crash leaves the old list or the new one. It is a hint, not state: a missing,
//! damaged or oversized file is an empty list.

use std::io::Write;
use std::path::{Path, PathBuf};

use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};

/// The file's name in the data directory.
pub const PEER_STORE_FILE: &str = "peers.v1.json";
/// Most peers kept.
pub const MAX_STORED_PEERS: usize = 256;
/// Most addresses kept for one peer.
pub const MAX_ADDRS_PER_PEER: usize = 8;
/// Largest file read (a full list is well under this).
const MAX_FILE_BYTES: u64 = 1 << 20;

#[derive(Serialize, Deserialize)]
struct Entry {
    peer: String,
    addrs: Vec<String>,
}

/// The known peers, most recently seen first.
#[derive(Debug, Default)]
pub struct PeerStore {
    peers: Vec<(PeerId, Vec<Multiaddr>)>,
    /// Whether the list changed since it was last taken to be written.
    dirty: bool,
}

impl PeerStore {
    /// The path of the file in the data directory `dir`.
    pub fn path_in(dir: &Path) -> PathBuf {
        dir.join(PEER_STORE_FILE)
    }

    /// Reads the list at `path`. Blocking. Whatever cannot be read gives an empty list (or the
    /// entries that parse), with a warning.
    pub fn load(path: &Path) -> PeerStore {
        let bytes = match std::fs::metadata(path) {
            Ok(m) if m.len() > MAX_FILE_BYTES => {
                tracing::warn!(path = %path.display(), "the peer store is too large; ignored");
                return PeerStore::default();
            }
            Ok(_) => match std::fs::read(path) {
                Ok(bytes) => bytes,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = &e as &dyn std::error::Error, "reading the peer store");
                    return PeerStore::default();
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return PeerStore::default(),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = &e as &dyn std::error::Error, "reading the peer store");
                return PeerStore::default();
            }
        };
        let entries: Vec<Entry> = match serde_json::from_slice(&bytes) {
            Ok(entries) => entries,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = &e as &dyn std::error::Error, "the peer store is damaged; ignored");
                return PeerStore::default();
            }
        };
        let mut store = PeerStore::default();
        for entry in entries.into_iter().take(MAX_STORED_PEERS) {
            let Ok(peer) = entry.peer.parse::<PeerId>() else {
                continue;
            };
            let addrs: Vec<Multiaddr> = entry
                .addrs
                .iter()
                .filter_map(|a| a.parse().ok())
                .take(MAX_ADDRS_PER_PEER)
                .collect();
            if !addrs.is_empty() && !store.peers.iter().any(|(p, _)| *p == peer) {
                store.peers.push((peer, addrs));
            }
        }
        store
    }

    /// The known peers, most recently seen first.
    pub fn peers(&self) -> &[(PeerId, Vec<Multiaddr>)] {
        &self.peers
    }

    /// Notes that `peer` was seen at `addrs` (newest first among them): it moves to the front,
    /// and the least recently seen peer makes room if the list is full.
    pub fn seen(&mut self, peer: PeerId, addrs: impl IntoIterator<Item = Multiaddr>) {
        let mut known = match self.peers.iter().position(|(p, _)| *p == peer) {
            Some(i) => self.peers.remove(i).1,
            None => Vec::new(),
        };
        let mut fresh: Vec<Multiaddr> = Vec::new();
        for addr in addrs {
            if !fresh.contains(&addr) {
                fresh.push(addr);
            }
        }
        known.retain(|a| !fresh.contains(a));
        fresh.extend(known);
        fresh.truncate(MAX_ADDRS_PER_PEER);
        if fresh.is_empty() {
            return;
        }
        let changed = self
            .peers
            .first()
            .is_none_or(|(p, a)| *p != peer || *a != fresh);
        self.peers.insert(0, (peer, fresh));
        self.peers.truncate(MAX_STORED_PEERS);
        self.dirty |= changed;
    }

    /// Forgets `peer` (banned, or not a member of the fleet).
    pub fn forget(&mut self, peer: &PeerId) {
        let before = self.peers.len();
        self.peers.retain(|(p, _)| p != peer);
        self.dirty |= self.peers.len() != before;
    }

    /// The file's new contents if the list changed since the last call.
    pub fn take_changes(&mut self) -> Option<Vec<u8>> {
        if !std::mem::take(&mut self.dirty) {
            return None;
        }
        let entries: Vec<Entry> = self
            .peers
            .iter()
            .map(|(peer, addrs)| Entry {
                peer: peer.to_string(),
                addrs: addrs.iter().map(ToString::to_string).collect(),
            })
            .collect();
        serde_json::to_vec_pretty(&entries).ok()
    }

    /// Writes `contents` to `path` atomically (temporary file, fsync, rename, fsync of the
    /// directory). Blocking.
    pub fn write(path: &Path, contents: &[u8]) -> std::io::Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        let tmp = path.with_extension("json.tmp");
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(n: u16) -> Multiaddr {
        format!("/ip4/198.18.0.1/tcp/{n}").parse().unwrap()
    }

    #[test]
    fn the_list_survives_a_round_trip_through_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = PeerStore::path_in(dir.path());
        let (a, b) = (PeerId::random(), PeerId::random());
        let mut store = PeerStore::default();
        store.seen(a, [addr(1)]);
        store.seen(b, [addr(2), addr(3)]);
        store.seen(a, [addr(4)]);
        let bytes = store.take_changes().unwrap();
        assert!(store.take_changes().is_none(), "nothing changed since");
        PeerStore::write(&path, &bytes).unwrap();
        let loaded = PeerStore::load(&path);
        assert_eq!(
            loaded.peers(),
            &[(a, vec![addr(4), addr(1)]), (b, vec![addr(2), addr(3)])]
        );
    }

    #[test]
    fn the_list_is_bounded() {
        let mut store = PeerStore::default();
        let first = PeerId::random();
        store.seen(first, (0..20).map(addr));
        assert_eq!(store.peers()[0].1.len(), MAX_ADDRS_PER_PEER);
        for n in 0..MAX_STORED_PEERS {
            store.seen(PeerId::random(), [addr(n as u16)]);
        }
        assert_eq!(store.peers().len(), MAX_STORED_PEERS);
        assert!(
            store.peers().iter().all(|(p, _)| *p != first),
            "the least recently seen peer made room"
        );
        store.forget(&store.peers()[0].0.clone());
        assert_eq!(store.peers().len(), MAX_STORED_PEERS - 1);
    }

    #[test]
    fn a_damaged_file_is_an_empty_list() {
        let dir = tempfile::tempdir().unwrap();
        let path = PeerStore::path_in(dir.path());
        std::fs::write(&path, b"{ not json").unwrap();
        assert!(PeerStore::load(&path).peers().is_empty());
        let entries = r#"[{"peer":"nope","addrs":["/ip4/198.18.0.1/tcp/1"]},
            {"peer":"12D3KooWJbNVkGyY4UQ2GDEKJDTbNy8S2tMvSCUhxMaVLaLvvNzT","addrs":["bad"]}]"#;
        std::fs::write(&path, entries).unwrap();
        assert!(PeerStore::load(&path).peers().is_empty());
        assert!(
            PeerStore::load(&dir.path().join("missing"))
                .peers()
                .is_empty()
        );
    }
}
