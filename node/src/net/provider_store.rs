//! The Kademlia record store: libp2p's memory store, with a share for each peer.
//!
//! Any peer may ask this node to keep provider records (`ADD_PROVIDER`), and the memory store
//! alone caps only the total number of keys: one peer could fill it with made-up keys and crowd
//! out every honest announcement. [`ProviderStore`] counts the provider records each peer has
//! here and refuses more than [`MAX_PROVIDER_RECORDS_PER_PEER`] from one peer; this node's own
//! records are not counted. Value records are refused outright: a node only ever stores and
//! looks up provider records, so a value record is an unasked-for use of its memory.

use std::borrow::Cow;
use std::collections::HashMap;

use libp2p::PeerId;
use libp2p::kad::store::{Error, MemoryStore, RecordStore, Result};
use libp2p::kad::{ProviderRecord, Record, RecordKey};

/// Most provider records one peer may have this node keep (a registry of a few hundred images
/// announces a few thousand keys, spread over the nodes closest to each key).
pub const MAX_PROVIDER_RECORDS_PER_PEER: usize = 1024;

/// A memory store that caps the provider records of each peer (see the module doc).
pub struct ProviderStore {
    inner: MemoryStore,
    local: PeerId,
    per_peer: usize,
    /// How many provider records each peer other than this node has in `inner`.
    counts: HashMap<PeerId, usize>,
}

impl ProviderStore {
    /// A store over `inner` for the node `local`, keeping at most `per_peer` provider records
    /// of each other peer.
    pub fn new(local: PeerId, inner: MemoryStore, per_peer: usize) -> ProviderStore {
        ProviderStore {
            inner,
            local,
            per_peer,
            counts: HashMap::new(),
        }
    }

    /// How many provider records of `peer` the store holds.
    pub fn count_of(&self, peer: &PeerId) -> usize {
        self.counts.get(peer).copied().unwrap_or(0)
    }

    fn add(&mut self, peer: PeerId, by: isize) {
        if peer == self.local {
            return;
        }
        let count = self.counts.entry(peer).or_default();
        *count = count.saturating_add_signed(by);
        if *count == 0 {
            self.counts.remove(&peer);
        }
    }
}

impl RecordStore for ProviderStore {
    type RecordsIter<'a> = <MemoryStore as RecordStore>::RecordsIter<'a>;
    type ProvidedIter<'a> = <MemoryStore as RecordStore>::ProvidedIter<'a>;

    fn get(&self, k: &RecordKey) -> Option<Cow<'_, Record>> {
        self.inner.get(k)
    }

    fn put(&mut self, _: Record) -> Result<()> {
        Err(Error::MaxRecords)
    }

    fn remove(&mut self, k: &RecordKey) {
        self.inner.remove(k);
    }

    fn records(&self) -> Self::RecordsIter<'_> {
        self.inner.records()
    }

    fn add_provider(&mut self, record: ProviderRecord) -> Result<()> {
        let before = self.inner.providers(&record.key);
        let refresh = before.iter().any(|p| p.provider == record.provider);
        if !refresh
            && record.provider != self.local
            && self.count_of(&record.provider) >= self.per_peer
        {
            return Err(Error::MaxProvidedKeys);
        }
        let key = record.key.clone();
        self.inner.add_provider(record)?;
        // The memory store may have replaced another peer's record of this key to make room:
        // count what actually changed.
        let after = self.inner.providers(&key);
        for gone in before
            .iter()
            .filter(|b| !after.iter().any(|a| a.provider == b.provider))
        {
            self.add(gone.provider, -1);
        }
        for new in after
            .iter()
            .filter(|a| !before.iter().any(|b| b.provider == a.provider))
        {
            self.add(new.provider, 1);
        }
        Ok(())
    }

    fn providers(&self, key: &RecordKey) -> Vec<ProviderRecord> {
        self.inner.providers(key)
    }

    fn provided(&self) -> Self::ProvidedIter<'_> {
        self.inner.provided()
    }

    fn remove_provider(&mut self, k: &RecordKey, p: &PeerId) {
        let held = self.inner.providers(k).iter().any(|r| &r.provider == p);
        self.inner.remove_provider(k, p);
        if held {
            self.add(*p, -1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: u32, provider: PeerId) -> ProviderRecord {
        ProviderRecord::new(RecordKey::new(&n.to_be_bytes()), provider, Vec::new())
    }

    fn store(per_peer: usize) -> (ProviderStore, PeerId) {
        let local = PeerId::random();
        let inner = MemoryStore::with_config(
            local,
            libp2p::kad::store::MemoryStoreConfig {
                max_provided_keys: 1 << 16,
                ..Default::default()
            },
        );
        (ProviderStore::new(local, inner, per_peer), local)
    }

    #[test]
    fn one_peer_cannot_fill_the_provider_store() {
        let (mut store, local) = store(MAX_PROVIDER_RECORDS_PER_PEER);
        let flooder = PeerId::random();
        let mut refused = 0;
        for n in 0..(MAX_PROVIDER_RECORDS_PER_PEER as u32 + 500) {
            if store.add_provider(record(n, flooder)).is_err() {
                refused += 1;
            }
        }
        assert_eq!(refused, 500);
        assert_eq!(store.count_of(&flooder), MAX_PROVIDER_RECORDS_PER_PEER);
        // Refreshing a record it already has is not a new one.
        assert!(store.add_provider(record(7, flooder)).is_ok());
        // Others, and this node itself, still have room.
        let honest = PeerId::random();
        assert!(store.add_provider(record(1, honest)).is_ok());
        for n in 0..(MAX_PROVIDER_RECORDS_PER_PEER as u32 + 10) {
            assert!(store.add_provider(record(n, local)).is_ok());
        }
        // A removed record frees its place.
        store.remove_provider(&RecordKey::new(&3u32.to_be_bytes()), &flooder);
        assert_eq!(store.count_of(&flooder), MAX_PROVIDER_RECORDS_PER_PEER - 1);
        assert!(store.add_provider(record(1_000_000, flooder)).is_ok());
        assert!(store.add_provider(record(1_000_001, flooder)).is_err());
    }

    #[test]
    fn a_replaced_provider_is_no_longer_counted() {
        let (mut store, _) = store(4);
        // The memory store keeps 20 providers a key; the 21st closer one replaces another.
        let peers: Vec<PeerId> = (0..30).map(|_| PeerId::random()).collect();
        for p in &peers {
            let _ = store.add_provider(record(0, *p));
        }
        let kept = store.providers(&RecordKey::new(&0u32.to_be_bytes()));
        let counted: usize = peers.iter().map(|p| store.count_of(p)).sum();
        assert_eq!(counted, kept.len());
    }

    #[test]
    fn value_records_are_refused() {
        let (mut store, _) = store(4);
        let r = Record::new(RecordKey::new(&1u32.to_be_bytes()), vec![1, 2, 3]);
        assert!(store.put(r).is_err());
        assert_eq!(store.records().count(), 0);
    }
}
