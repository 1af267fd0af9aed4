//! The disk quota of an edge node: `--max-disk`, eviction of cached content least recently
//! used first, and pins that keep K copies in the fleet.
//!
//! **When.** A round runs every [`QuotaConfig::interval`] and soon after a blob is installed
//! (a download or a push finished). It measures the store (blob files, upload sessions,
//! downloads in progress); if that is over the limit it evicts until it is under
//! [`LOW_WATER_PERCENT`] of it, so that the next download does not start another round at once.
//!
//! **What.** See `store::evict` for the classes. Cached content goes first, least recently used
//! first (a blob being read waits for a later round). Then, only if cached content cannot make
//! the room, pinned content, least recently used first, but only blobs this node may give up:
//! published content, unreferenced content (garbage collection's) and blobs open for reading
//! are never evicted.
//!
//! **Pins across the fleet.** A pinned blob asks for K copies. The node asks the peers that
//! may hold it (DHT providers and connected peers, only verified members when the node is in a
//! fleet) whether they hold it whole ([`SyncRequest::Have`], fresh, not the DHT's possibly stale
//! provider records). Then one deterministic rule, [`may_give_up`]: rank the known holders and
//! this node by a rendezvous hash of (peer id, digest); the top K never evict the blob, the
//! others may, since at least K holders rank above them. Every node ranks the same way, so when
//! all nodes evict at once, the top K of the holders all keep it. A node that cannot learn the
//! holders (no network, no answers) knows no other holder and so is in the top K: it keeps the
//! blob. Missing knowledge only makes a node keep more.
//!
//! **Per site.** A node with a `site` counts only holders it knows to be in its own site: the K
//! copies are kept in every site (a site that loses its WAN link still has them, and a pull
//! there does not cross it). A holder whose site is unknown does not count.
//!
//! **Residual risk.** A member that lies (says it holds a blob it does not) can make the
//! nodes ranked below it evict, leaving fewer than K real copies. Only members are counted in a
//! fleet, so this needs a member's key; outside a fleet any connected peer is counted, as any
//! peer can already fetch and announce there. A node that does not carry the pin (neither the
//! `[[pin]]` rule nor `shoal pin`) evicts by LRU alone: give every node the same rules.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use shoal_protocol::message::{SyncRequest, SyncResponse};
use shoal_protocol::{Digest, PublisherKey};
use tokio_util::sync::CancellationToken;

use crate::auth::Auth;
use crate::net::Network;
use crate::store::evict::{Class, Entry, EvictReport, PinRule};
use crate::store::{Store, StoreError};

/// A round evicts until usage is at most this share of the limit.
pub const LOW_WATER_PERCENT: u64 = 90;
/// Default time between rounds.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);
/// The most pinned blobs whose holders one round looks up.
const MAX_HOLDER_LOOKUPS: usize = 256;
/// The most peers asked about one blob.
const MAX_PEERS_ASKED: usize = 64;
/// How long a peer has to answer whether it holds a blob.
const HAVE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a round waits after an install before it measures (a pull installs many blobs).
const SETTLE: Duration = Duration::from_secs(1);

/// The disk limit: bytes, or a share of the data directory's filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum MaxDisk {
    /// At most this many bytes.
    Bytes(u64),
    /// At most this percentage (1 to 100) of the filesystem's size.
    Percent(u8),
}

/// Why a `--max-disk` value is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "max disk {0:?}: expected bytes (`20GiB`, `500MB`, `1048576`) or a percentage of the filesystem (`80%`)"
)]
pub struct MaxDiskError(String);

impl std::str::FromStr for MaxDisk {
    type Err = MaxDiskError;

    fn from_str(s: &str) -> Result<MaxDisk, MaxDiskError> {
        let bad = || MaxDiskError(s.chars().take(64).collect());
        let t = s.trim();
        if let Some(p) = t.strip_suffix('%') {
            return match p.trim().parse::<u8>() {
                Ok(p @ 1..=100) => Ok(MaxDisk::Percent(p)),
                _ => Err(bad()),
            };
        }
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (digits, unit) = t.split_at(split);
        let n: u64 = digits.parse().map_err(|_| bad())?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1_000,
            "kib" => 1 << 10,
            "m" | "mb" => 1_000_000,
            "mib" => 1 << 20,
            "g" | "gb" => 1_000_000_000,
            "gib" => 1 << 30,
            "t" | "tb" => 1_000_000_000_000,
            "tib" => 1 << 40,
            _ => return Err(bad()),
        };
        match n.checked_mul(mult) {
            Some(0) | None => Err(bad()),
            Some(b) => Ok(MaxDisk::Bytes(b)),
        }
    }
}

impl TryFrom<String> for MaxDisk {
    type Error = MaxDiskError;
    fn try_from(s: String) -> Result<MaxDisk, MaxDiskError> {
        s.parse()
    }
}

impl From<MaxDisk> for String {
    fn from(m: MaxDisk) -> String {
        match m {
            MaxDisk::Bytes(b) => b.to_string(),
            MaxDisk::Percent(p) => format!("{p}%"),
        }
    }
}

impl MaxDisk {
    /// The limit in bytes for a data directory on a filesystem of `fs_bytes`.
    pub fn bytes(&self, fs_bytes: u64) -> u64 {
        match *self {
            MaxDisk::Bytes(b) => b,
            MaxDisk::Percent(p) => fs_bytes / 100 * u64::from(p),
        }
    }
}

/// The size of the filesystem that holds `dir`.
fn filesystem_bytes(dir: &std::path::Path) -> Option<u64> {
    let s = nix::sys::statvfs::statvfs(dir).ok()?;
    s.blocks().checked_mul(s.fragment_size())
}

/// The quota's settings (`--max-disk`, the config file's `max_disk` and `[[pin]]` tables).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaConfig {
    /// The limit; `None`: no quota (pins still act as garbage-collection roots).
    pub max_disk: Option<MaxDisk>,
    /// Time between rounds.
    pub interval: Duration,
    /// Pin rules every node of a fleet can carry.
    pub pins: Vec<PinRule>,
}

impl Default for QuotaConfig {
    fn default() -> Self {
        QuotaConfig {
            max_disk: None,
            interval: DEFAULT_INTERVAL,
            pins: Vec::new(),
        }
    }
}

/// The rendezvous score of `peer` for `digest`: higher ranks first.
fn score(peer: &PeerId, digest: &Digest) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"shoal quota rank v1\0");
    h.update(&peer.to_bytes());
    h.update(digest.to_string().as_bytes());
    *h.finalize().as_bytes()
}

/// Whether `me` may give up its copy of `digest` when `others` (not `me`) are known to hold it
/// whole and `copies` are asked for: only if `me` is not among the top `copies` of all known
/// holders ranked by a hash of (peer id, digest), which means at least `copies` others rank above it.
pub fn may_give_up(me: &PeerId, others: &[PeerId], copies: u32, digest: &Digest) -> bool {
    let mine = score(me, digest);
    let mut above = std::collections::HashSet::new();
    for p in others {
        if p != me && score(p, digest) > mine {
            above.insert(*p);
        }
    }
    above.len() >= copies as usize
}

/// The cached blobs to evict, least recently used first, until `need` bytes are freed: blobs
/// open for reading are skipped. Returns them and the bytes they free.
pub fn pick_cached(entries: &[Entry], need: u64) -> (Vec<(Digest, u64)>, u64) {
    let mut cached: Vec<&Entry> = entries
        .iter()
        .filter(|e| e.class == Class::Cached && !e.in_use)
        .collect();
    cached.sort_by(|a, b| a.last_use.cmp(&b.last_use).then(a.digest.cmp(&b.digest)));
    let (mut picked, mut freed) = (Vec::new(), 0u64);
    for e in cached {
        if freed >= need {
            break;
        }
        picked.push((e.digest.clone(), e.size));
        freed += e.size;
    }
    (picked, freed)
}

/// Pinned blobs that are not open, least recently used first, with their copies.
fn pinned_lru(entries: &[Entry]) -> Vec<(Digest, u64, u32)> {
    let mut pinned: Vec<(&Entry, u32)> = entries
        .iter()
        .filter_map(|e| match e.class {
            Class::Pinned(k) if !e.in_use => Some((e, k)),
            _ => None,
        })
        .collect();
    pinned.sort_by(|(a, _), (b, _)| a.last_use.cmp(&b.last_use).then(a.digest.cmp(&b.digest)));
    pinned
        .into_iter()
        .map(|(e, k)| (e.digest.clone(), e.size, k))
        .collect()
}

/// Whether a holder counts toward a pin's copies: without a site of its own a node counts every
/// holder; with one, only holders known to be in the same site (see the module doc).
fn counts_in_site(has_site: bool, same_site: Option<bool>) -> bool {
    !has_site || same_site == Some(true)
}

/// Where the node's disk stands against its quota (`shoal du`, the admin API).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaStatus {
    /// The limit in bytes (`None`: no quota).
    pub max_disk_bytes: Option<u64>,
    /// Bytes counted against it: blob files, upload sessions, downloads in progress.
    pub used_bytes: u64,
    /// Blob bytes pushed here (never evicted).
    pub published_bytes: u64,
    /// Blob bytes of pinned images.
    pub pinned_bytes: u64,
    /// Blob bytes that came from the fleet (evicted first).
    pub cached_bytes: u64,
    /// Blob bytes nothing names (garbage collection's).
    pub unreferenced_bytes: u64,
    /// Blobs evicted since the node started.
    pub evicted_blobs: u64,
    /// Their bytes.
    pub evicted_bytes: u64,
}

/// The node's quota (cheap to clone): its settings, and what it did.
#[derive(Clone)]
pub struct Quota {
    config: Arc<QuotaConfig>,
    store: Store,
    network: Option<Network>,
    auth: Auth,
    own: PublisherKey,
    evicted: Arc<Mutex<(u64, u64)>>,
    /// One round at a time.
    round: Arc<tokio::sync::Mutex<()>>,
}

impl Quota {
    /// The quota of `store`, asking `network` who holds pinned blobs, counting only members of
    /// `auth`'s fleet when there is one; `own` is this node's publisher key.
    pub fn new(
        config: QuotaConfig,
        store: Store,
        network: Option<Network>,
        auth: Auth,
        own: PublisherKey,
    ) -> Quota {
        Quota {
            config: Arc::new(config),
            store,
            network,
            auth,
            own,
            evicted: Arc::default(),
            round: Arc::default(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &QuotaConfig {
        &self.config
    }

    fn limit(&self) -> Option<u64> {
        let m = self.config.max_disk?;
        let fs = filesystem_bytes(self.store.layout().root()).unwrap_or(0);
        Some(m.bytes(fs))
    }

    async fn entries(&self) -> Result<Vec<Entry>, StoreError> {
        self.store
            .quota_entries(self.own, self.config.pins.clone())
            .await
    }

    /// Where the disk stands now.
    pub async fn status(&self) -> Result<QuotaStatus, StoreError> {
        let entries = self.entries().await?;
        Ok(self.status_of(&entries).await)
    }

    async fn status_of(&self, entries: &[Entry]) -> QuotaStatus {
        let mut s = QuotaStatus {
            max_disk_bytes: self.limit(),
            ..QuotaStatus::default()
        };
        for e in entries {
            match e.class {
                Class::Published => s.published_bytes += e.size,
                Class::Pinned(_) => s.pinned_bytes += e.size,
                Class::Cached => s.cached_bytes += e.size,
                Class::Unreferenced => s.unreferenced_bytes += e.size,
            }
        }
        let root = self.store.layout().root().to_owned();
        let side = tokio::task::spawn_blocking(move || {
            crate::store::usage::dir_bytes(&root.join("uploads"))
                + crate::store::usage::dir_bytes(&root.join("partial"))
        })
        .await
        .unwrap_or(0);
        s.used_bytes = entries.iter().map(|e| e.size).sum::<u64>() + side;
        let (blobs, bytes) = *self
            .evicted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        s.evicted_blobs = blobs;
        s.evicted_bytes = bytes;
        s
    }

    /// One round: if over the limit, evicts down to [`LOW_WATER_PERCENT`] of it.
    pub async fn round(&self) -> Result<EvictReport, StoreError> {
        let _one = self.round.lock().await;
        let Some(limit) = self.limit() else {
            return Ok(EvictReport::default());
        };
        let entries = self.entries().await?;
        let status = self.status_of(&entries).await;
        if status.used_bytes <= limit {
            return Ok(EvictReport::default());
        }
        let target = limit / 100 * LOW_WATER_PERCENT;
        let need = status.used_bytes.saturating_sub(target);
        let (mut victims, mut freed) = pick_cached(&entries, need);
        // Cached blobs being read now go in a later round: pinned ones are not touched while
        // cached content could still make the room.
        let busy_cached: u64 = entries
            .iter()
            .filter(|e| e.class == Class::Cached && e.in_use)
            .map(|e| e.size)
            .sum();
        if freed.saturating_add(busy_cached) < need {
            for (digest, size, copies) in pinned_lru(&entries).into_iter().take(MAX_HOLDER_LOOKUPS)
            {
                if freed >= need {
                    break;
                }
                let others = self.holders(&digest).await;
                let me = self.network.as_ref().map(Network::peer_id);
                if me.is_some_and(|me| may_give_up(&me, &others, copies, &digest)) {
                    tracing::info!(%digest, copies, holders = ?others, "evicting a pinned blob: enough other copies rank above this one");
                    victims.push((digest, size));
                    freed += size;
                }
            }
        }
        if victims.is_empty() {
            tracing::warn!(
                used = status.used_bytes,
                limit,
                "over the disk quota with nothing this node may evict (published, pinned or in use)"
            );
            return Ok(EvictReport::default());
        }
        // From here on a push that links a blob keeps it; one that did so while the victims
        // were chosen (the lookups above take seconds) shows in the entries read again: a
        // victim whose class changed stays. The round holds off collections only this long.
        let eviction = self.store.begin_eviction().await?;
        let classes: std::collections::HashMap<Digest, Class> = self
            .entries()
            .await?
            .into_iter()
            .map(|e| (e.digest, e.class))
            .collect();
        let chosen: std::collections::HashMap<&Digest, Class> =
            entries.iter().map(|e| (&e.digest, e.class)).collect();
        victims.retain(|(d, _)| classes.get(d).is_some_and(|c| chosen.get(d) == Some(c)));
        tracing::debug!(?victims, "evicting");
        let report = eviction.evict(victims).await?;
        {
            let mut e = self
                .evicted
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            e.0 += report.evicted.len() as u64;
            e.1 += report.bytes_freed;
        }
        tracing::info!(
            blobs = report.evicted.len(),
            bytes = report.bytes_freed,
            kept = report.kept,
            used = status.used_bytes,
            limit,
            "evicted cached content over the disk quota"
        );
        Ok(report)
    }

    /// The peers that say they hold `digest` whole: providers and connected peers (members
    /// only, in a fleet), each asked now. Empty when the network cannot tell.
    async fn holders(&self, digest: &Digest) -> Vec<PeerId> {
        let Some(network) = &self.network else {
            return Vec::new();
        };
        let mut peers = network
            .find_providers(digest.clone())
            .await
            .unwrap_or_default();
        peers.extend(
            network
                .peers()
                .await
                .unwrap_or_default()
                .into_iter()
                .map(|p| p.peer_id),
        );
        let me = network.peer_id();
        let in_fleet = self.auth.fleet().is_some();
        let has_site = network.site().is_some();
        let mut seen = std::collections::HashSet::new();
        peers.retain(|p| {
            *p != me
                && seen.insert(*p)
                && (!in_fleet
                    || crate::net::publisher_of(p).is_some_and(|k| self.auth.member(&k).is_some()))
                && counts_in_site(has_site, network.same_site(p))
        });
        peers.truncate(MAX_PEERS_ASKED);
        let asks = peers.into_iter().map(|peer| async move {
            let request = SyncRequest::Have {
                digest: digest.clone(),
            };
            match tokio::time::timeout(HAVE_TIMEOUT, network.sync(peer, request)).await {
                Ok(Ok(SyncResponse::Have(Some(chunks))))
                    if chunks.bitfield().is_some_and(|b| b.is_full()) =>
                {
                    Some(peer)
                }
                _ => None,
            }
        });
        futures::future::join_all(asks)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// Runs rounds every interval and soon after installs, until `cancel`. Saves the last
    /// uses after each round.
    pub async fn run(self, cancel: CancellationToken) {
        if self.config.max_disk.is_none() {
            return;
        }
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(self.config.interval) => {}
                () = self.store.installed() => {
                    tokio::time::sleep(SETTLE).await;
                }
            }
            if let Err(e) = self.round().await {
                tracing::warn!(
                    error = &e as &dyn std::error::Error,
                    "disk quota round failed"
                );
            }
            if let Err(e) = self.store.save_uses().await {
                tracing::warn!(error = &e as &dyn std::error::Error, "saving last uses");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_a_site_only_holders_known_in_it_count() {
        // No site: every holder counts, whatever is known of its site.
        for known in [None, Some(true), Some(false)] {
            assert!(counts_in_site(false, known));
        }
        // A site: its own holders count; another site's, or an unknown one's, do not.
        assert!(counts_in_site(true, Some(true)));
        assert!(!counts_in_site(true, Some(false)));
        assert!(!counts_in_site(true, None));
    }
    use shoal_protocol::Algorithm;

    fn peers(n: usize) -> Vec<PeerId> {
        (0..n).map(|_| PeerId::random()).collect()
    }

    #[test]
    fn max_disk_parses_bytes_units_and_percentages() {
        assert_eq!("20GiB".parse(), Ok(MaxDisk::Bytes(20 << 30)));
        assert_eq!("500MB".parse(), Ok(MaxDisk::Bytes(500_000_000)));
        assert_eq!("1048576".parse(), Ok(MaxDisk::Bytes(1 << 20)));
        assert_eq!("3 MiB".parse(), Ok(MaxDisk::Bytes(3 << 20)));
        assert_eq!("80%".parse(), Ok(MaxDisk::Percent(80)));
        for bad in [
            "",
            "0",
            "0%",
            "101%",
            "-1",
            "12XB",
            "%",
            "20GiBs",
            "99999999999999TiB",
        ] {
            assert!(bad.parse::<MaxDisk>().is_err(), "{bad:?}");
        }
        assert_eq!(MaxDisk::Percent(50).bytes(1000), 500);
        assert_eq!(MaxDisk::Bytes(7).bytes(1000), 7);
    }

    #[test]
    fn the_top_k_holders_never_give_up_and_the_others_only_with_k_above_them() {
        let d = Digest::of(Algorithm::Sha256, b"layer");
        for k in 1..4u32 {
            let all = peers(6);
            let mut ranked = all.clone();
            ranked.sort_by_key(|p| std::cmp::Reverse(score(p, &d)));
            for (i, me) in ranked.iter().enumerate() {
                let others: Vec<PeerId> = all.iter().copied().filter(|p| p != me).collect();
                assert_eq!(
                    may_give_up(me, &others, k, &d),
                    i >= k as usize,
                    "rank {i}, k {k}"
                );
            }
            // Every node deciding at once from the same view: exactly the top k keep it.
            let keep = all
                .iter()
                .filter(|me| {
                    let others: Vec<PeerId> = all.iter().copied().filter(|p| p != *me).collect();
                    !may_give_up(me, &others, k, &d)
                })
                .count();
            assert_eq!(keep, k as usize);
        }
    }

    #[test]
    fn a_node_that_knows_no_holders_or_too_few_keeps_its_copy() {
        let d = Digest::of(Algorithm::Sha256, b"layer");
        let me = PeerId::random();
        assert!(!may_give_up(&me, &[], 1, &d));
        // However the others rank, fewer than k of them can never let it go.
        for _ in 0..50 {
            let others = peers(2);
            assert!(!may_give_up(&me, &others, 3, &d));
        }
        // Counting itself, or the same peer twice, does not help.
        let other = PeerId::random();
        assert!(!may_give_up(&me, &[me, me, other, other], 2, &d));
    }

    #[test]
    fn views_that_miss_holders_only_keep_more() {
        // Each node sees a random part of the holders; the copies kept are never fewer than
        // with a full view.
        let d = Digest::of(Algorithm::Sha256, b"img");
        let mut rng = 7u64;
        let mut next = || {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            rng >> 33
        };
        for _ in 0..100 {
            let all = peers(5);
            let kept = all
                .iter()
                .filter(|me| {
                    let seen: Vec<PeerId> = all
                        .iter()
                        .copied()
                        .filter(|p| p != *me && next() % 3 != 0)
                        .collect();
                    !may_give_up(me, &seen, 2, &d)
                })
                .count();
            assert!(kept >= 2, "kept {kept}");
        }
    }

    fn entry(n: u8, class: Class, last_use: u64, in_use: bool) -> Entry {
        Entry {
            digest: Digest::of(Algorithm::Sha256, &[n]),
            size: 100,
            class,
            last_use,
            in_use,
        }
    }

    #[test]
    fn cached_blobs_go_least_recently_used_first_and_nothing_else_does() {
        let entries = vec![
            entry(1, Class::Cached, 30, false),
            entry(2, Class::Cached, 10, false),
            entry(3, Class::Published, 0, false),
            entry(4, Class::Pinned(2), 1, false),
            entry(5, Class::Cached, 5, true),
            entry(6, Class::Unreferenced, 0, false),
            entry(7, Class::Cached, 20, false),
        ];
        let (picked, freed) = pick_cached(&entries, 150);
        let names: Vec<Digest> = picked.into_iter().map(|(d, _)| d).collect();
        assert_eq!(
            names,
            vec![entries[1].digest.clone(), entries[6].digest.clone()]
        );
        assert_eq!(freed, 200);
        let (all, _) = pick_cached(&entries, u64::MAX);
        assert_eq!(
            all.len(),
            3,
            "published, pinned, in-use and unreferenced stay"
        );
        assert_eq!(pick_cached(&entries, 0).0.len(), 0);
        let pinned = pinned_lru(&entries);
        assert_eq!(pinned.len(), 1);
        assert_eq!(pinned[0].2, 2);
    }
}
