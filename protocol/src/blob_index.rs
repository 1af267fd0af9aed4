//! Blob indexes: the BLAKE3 hash of every fixed-size chunk of a blob.
//!
//! A blob's OCI digest (sha256) can only be checked once the whole blob is present. To fetch a
//! blob from many untrusted peers at once, a node needs to check each chunk as it arrives, so
//! that a bad peer is caught after one chunk, not after a gigabyte. A [`BlobIndex`] gives that:
//! the blob's digest and size, a chunk size, and the [`ChunkHash`] of every chunk. The signed tag
//! record commits to the [`BlobIndexId`] of every blob the manifest names, so an index fetched
//! from any peer is checked against its id, and every chunk against the index.
//!
//! Invariants of a [`BlobIndex`], checked on construction and on deserialize:
//!
//! - the chunk size is a power of two in [`MIN_CHUNK_SIZE_BYTES`]..=[`MAX_CHUNK_SIZE_BYTES`];
//! - there are exactly `ceil(size / chunk_size)` chunks (none for an empty blob), each of
//!   `chunk_size` bytes except the last, which holds the remainder;
//! - there are at most [`MAX_CHUNKS`] chunks, so an index always fits in one frame (at most
//!   about 2 MiB) and a blob is at most `MAX_CHUNKS * chunk_size` bytes.
//!
//! The chunk size of a blob's index is [`chunk_size_for`] its size, so every node that indexes
//! the same blob makes the same index. It aims at about [`TARGET_CHUNKS`] chunks: a chunk can be
//! passed on only once it is whole, so the smaller the chunks, the sooner a downloader serves
//! what it got and the more of the fleet's uplinks work at once, while each chunk costs a
//! request and a hash. The fleet simulator (`simulations/`) measured rollouts markedly faster
//! with about 512 chunks per blob than with fixed 4 MiB chunks, and the swarm benchmark agreed
//! (`simulations/README.md`, `tests/bench/RESULTS.md`).

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::codec;
use crate::digest::Digest;

/// How many chunks [`chunk_size_for`] aims at.
pub const TARGET_CHUNKS: u64 = 512;
/// The smallest chunk size [`chunk_size_for`] picks (256 KiB, BitTorrent's usual piece size).
pub const MIN_AUTO_CHUNK_SIZE_BYTES: u32 = 256 * 1024;
/// The largest chunk size [`chunk_size_for`] picks for a blob of up to 256 GiB (4 MiB, as Kraken
/// and Dragonfly use); bigger blobs get bigger chunks, to stay within [`MAX_CHUNKS`].
pub const MAX_AUTO_CHUNK_SIZE_BYTES: u32 = 4 * 1024 * 1024;
/// The smallest accepted chunk size.
pub const MIN_CHUNK_SIZE_BYTES: u32 = 64 * 1024;
/// The largest accepted chunk size.
pub const MAX_CHUNK_SIZE_BYTES: u32 = 64 * 1024 * 1024;
/// The most chunks one index may list.
pub const MAX_CHUNKS: usize = 65_536;

/// Key derivation context for [`BlobIndexId`]s. Versioned: a change to the encoding of
/// [`BlobIndex`] needs a new context.
const BLOB_INDEX_ID_CONTEXT: &str = "shoal blob index v1";

/// Why a blob index is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlobIndexError {
    /// The chunk size is not a power of two within the accepted range.
    #[error(
        "chunk size {0} is not a power of two in {MIN_CHUNK_SIZE_BYTES}..={MAX_CHUNK_SIZE_BYTES}"
    )]
    BadChunkSize(u32),
    /// The blob needs more chunks than an index may list.
    #[error("blob needs {chunks} chunks, more than the limit of {MAX_CHUNKS}")]
    TooManyChunks {
        /// Chunks the blob would need.
        chunks: u64,
    },
    /// The number of chunk hashes does not match the size and chunk size.
    #[error("index lists {actual} chunks but the size needs {expected}")]
    ChunkCountMismatch {
        /// Chunks the size and chunk size call for.
        expected: u64,
        /// Chunk hashes listed.
        actual: u64,
    },
    /// A hash or id is not 64 lowercase hex digits.
    #[error("not 64 lowercase hex digits")]
    InvalidHex,
    /// The index could not be encoded to compute its id.
    #[error("index cannot be encoded: {0}")]
    Encode(String),
}

/// The BLAKE3 hash of one chunk's bytes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ChunkHash(#[serde(with = "crate::codec::fixed_bytes")] [u8; 32]);

impl ChunkHash {
    /// The hash of `bytes`.
    pub fn of(bytes: &[u8]) -> ChunkHash {
        ChunkHash(*blake3::hash(bytes).as_bytes())
    }

    /// Wraps a hash computed elsewhere.
    pub fn from_bytes(bytes: [u8; 32]) -> ChunkHash {
        ChunkHash(bytes)
    }

    /// The raw hash.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkHash({self})")
    }
}

impl FromStr for ChunkHash {
    type Err = BlobIndexError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        codec::decode_hex_lower(s)
            .map(ChunkHash)
            .ok_or(BlobIndexError::InvalidHex)
    }
}

/// The id of a [`BlobIndex`]: BLAKE3, in key derivation mode with the context
/// `shoal blob index v1`, of the index's codec encoding.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BlobIndexId(#[serde(with = "crate::codec::fixed_bytes")] [u8; 32]);

impl BlobIndexId {
    /// Wraps an id computed elsewhere.
    pub fn from_bytes(bytes: [u8; 32]) -> BlobIndexId {
        BlobIndexId(bytes)
    }

    /// The raw id.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for BlobIndexId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for BlobIndexId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobIndexId({self})")
    }
}

impl FromStr for BlobIndexId {
    type Err = BlobIndexError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        codec::decode_hex_lower(s)
            .map(BlobIndexId)
            .ok_or(BlobIndexError::InvalidHex)
    }
}

/// A validated blob index: digest, size, chunk size and the hash of every chunk.
///
/// See the [module docs](self) for the invariants. The id is computed once, when the index is
/// built or decoded.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawBlobIndex")]
pub struct BlobIndex {
    digest: Digest,
    size: u64,
    chunk_size: u32,
    chunks: Vec<ChunkHash>,
    #[serde(skip)]
    id: BlobIndexId,
}

/// The unvalidated shape of a [`BlobIndex`] on the wire. Field order matches `BlobIndex`.
#[derive(Deserialize)]
struct RawBlobIndex {
    digest: Digest,
    size: u64,
    chunk_size: u32,
    chunks: Vec<ChunkHash>,
}

impl TryFrom<RawBlobIndex> for BlobIndex {
    type Error = BlobIndexError;

    fn try_from(raw: RawBlobIndex) -> Result<Self, Self::Error> {
        BlobIndex::new(raw.digest, raw.size, raw.chunk_size, raw.chunks)
    }
}

/// The chunk size of the index of a blob of `size` bytes: the largest power of two that cuts
/// it into at least [`TARGET_CHUNKS`] chunks, within
/// [`MIN_AUTO_CHUNK_SIZE_BYTES`]..=[`MAX_AUTO_CHUNK_SIZE_BYTES`], and in any case large enough
/// for [`MAX_CHUNKS`] chunks (up to [`MAX_CHUNK_SIZE_BYTES`]: a blob past 4 TiB cannot be
/// indexed). A function of the size alone, so that every node indexes a blob the same way.
pub fn chunk_size_for(size: u64) -> u32 {
    let per_chunk = size / TARGET_CHUNKS;
    // The largest power of two at most `per_chunk`, clamped.
    let target = if per_chunk == 0 {
        MIN_AUTO_CHUNK_SIZE_BYTES
    } else {
        let pow = 1u64 << (63 - per_chunk.leading_zeros());
        let clamped = pow.clamp(
            u64::from(MIN_AUTO_CHUNK_SIZE_BYTES),
            u64::from(MAX_AUTO_CHUNK_SIZE_BYTES),
        );
        u32::try_from(clamped).unwrap_or(MAX_AUTO_CHUNK_SIZE_BYTES)
    };
    let needed = size.div_ceil(MAX_CHUNKS as u64).next_power_of_two();
    let needed =
        u32::try_from(needed.min(u64::from(MAX_CHUNK_SIZE_BYTES))).unwrap_or(MAX_CHUNK_SIZE_BYTES);
    target.max(needed)
}

/// Whether `chunk_size` is acceptable.
fn valid_chunk_size(chunk_size: u32) -> bool {
    chunk_size.is_power_of_two()
        && (MIN_CHUNK_SIZE_BYTES..=MAX_CHUNK_SIZE_BYTES).contains(&chunk_size)
}

/// Chunks needed for `size` bytes, or an error if the chunk size is invalid or there would be
/// too many.
fn chunks_needed(size: u64, chunk_size: u32) -> Result<u64, BlobIndexError> {
    if !valid_chunk_size(chunk_size) {
        return Err(BlobIndexError::BadChunkSize(chunk_size));
    }
    let chunks = size.div_ceil(u64::from(chunk_size));
    if chunks > MAX_CHUNKS as u64 {
        return Err(BlobIndexError::TooManyChunks { chunks });
    }
    Ok(chunks)
}

impl BlobIndex {
    /// Builds an index, checking the invariants in the [module docs](self).
    pub fn new(
        digest: Digest,
        size: u64,
        chunk_size: u32,
        chunks: Vec<ChunkHash>,
    ) -> Result<BlobIndex, BlobIndexError> {
        let expected = chunks_needed(size, chunk_size)?;
        let actual = chunks.len() as u64;
        if actual != expected {
            return Err(BlobIndexError::ChunkCountMismatch { expected, actual });
        }
        let mut index = BlobIndex {
            digest,
            size,
            chunk_size,
            chunks,
            id: BlobIndexId([0; 32]),
        };
        let encoded = codec::encode(&index).map_err(|e| BlobIndexError::Encode(e.describe()))?;
        let mut hasher = blake3::Hasher::new_derive_key(BLOB_INDEX_ID_CONTEXT);
        hasher.update(&encoded);
        index.id = BlobIndexId(*hasher.finalize().as_bytes());
        Ok(index)
    }

    /// Indexes a blob held in memory, computing its sha256 digest too. Convenient for small
    /// blobs and tests; the store uses a [`BlobIndexer`] while writing.
    pub fn of(bytes: &[u8], chunk_size: u32) -> Result<BlobIndex, BlobIndexError> {
        let mut indexer = BlobIndexer::new(chunk_size);
        indexer.update(bytes);
        indexer.finish(Digest::sha256(bytes))
    }

    /// The blob's OCI digest.
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// The blob's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The chunk size in bytes.
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// The hash of every chunk, in order.
    pub fn chunks(&self) -> &[ChunkHash] {
        &self.chunks
    }

    /// The number of chunks (at most [`MAX_CHUNKS`]).
    pub fn chunk_count(&self) -> u32 {
        // Never saturates: the count is at most MAX_CHUNKS.
        u32::try_from(self.chunks.len()).unwrap_or(u32::MAX)
    }

    /// The byte range of chunk `index` within the blob, or `None` past the last chunk. Every
    /// chunk is `chunk_size` bytes long except the last, which may be shorter.
    pub fn chunk_range(&self, index: u32) -> Option<Range<u64>> {
        if index >= self.chunk_count() {
            return None;
        }
        // index < MAX_CHUNKS and chunk_size <= 2^26, so this cannot overflow.
        let start = u64::from(index) * u64::from(self.chunk_size);
        let end = start
            .saturating_add(u64::from(self.chunk_size))
            .min(self.size);
        Some(start..end)
    }

    /// Whether `bytes` are exactly chunk `index`: the right length and the right hash.
    pub fn verify_chunk(&self, index: u32, bytes: &[u8]) -> bool {
        let (Some(range), Some(expected)) = (
            self.chunk_range(index),
            usize::try_from(index).ok().and_then(|i| self.chunks.get(i)),
        ) else {
            return false;
        };
        bytes.len() as u64 == range.end - range.start && ChunkHash::of(bytes) == *expected
    }

    /// The index's id, which signed tag records commit to.
    pub fn id(&self) -> BlobIndexId {
        self.id
    }
}

impl fmt::Debug for BlobIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Tens of thousands of chunk hashes are noise in a log line.
        f.debug_struct("BlobIndex")
            .field("id", &self.id)
            .field("digest", &self.digest)
            .field("size", &self.size)
            .field("chunk_size", &self.chunk_size)
            .field("chunks", &self.chunks.len())
            .finish()
    }
}

/// Builds a [`BlobIndex`] from a blob's bytes as they are written, in one pass.
///
/// Feed the bytes in order with [`update`](Self::update), split however they arrive; the result
/// depends only on the concatenation. An invalid chunk size is reported by
/// [`finish`](Self::finish).
#[derive(Clone)]
pub struct BlobIndexer {
    chunk_size: u32,
    /// Hasher of the chunk being filled.
    hasher: blake3::Hasher,
    /// Bytes in the chunk being filled, always less than `chunk_size` between calls.
    filled: u32,
    size: u64,
    chunks: Vec<ChunkHash>,
}

impl BlobIndexer {
    /// A fresh indexer for chunks of `chunk_size` bytes.
    pub fn new(chunk_size: u32) -> BlobIndexer {
        BlobIndexer {
            chunk_size,
            hasher: blake3::Hasher::new(),
            filled: 0,
            size: 0,
            chunks: Vec::new(),
        }
    }

    /// The chunk size it cuts the blob into.
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// Feeds the next bytes of the blob.
    pub fn update(&mut self, mut bytes: &[u8]) {
        self.size = self.size.saturating_add(bytes.len() as u64);
        // With a bad chunk size or once past the chunk limit, only the size matters: `finish`
        // fails either way, and the hash list must not grow without bound.
        if !valid_chunk_size(self.chunk_size) || self.chunks.len() >= MAX_CHUNKS {
            return;
        }
        while !bytes.is_empty() {
            let room = (self.chunk_size - self.filled) as usize;
            let (head, tail) = bytes.split_at(room.min(bytes.len()));
            self.hasher.update(head);
            // head.len() <= room <= chunk_size, which fits in u32.
            self.filled += head.len() as u32;
            if self.filled == self.chunk_size {
                self.chunks
                    .push(ChunkHash(*self.hasher.finalize().as_bytes()));
                self.hasher.reset();
                self.filled = 0;
            }
            bytes = tail;
        }
    }

    /// Bytes fed so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The index of everything fed, for a blob whose digest is `digest` (computed by the caller
    /// over the same bytes).
    pub fn finish(mut self, digest: Digest) -> Result<BlobIndex, BlobIndexError> {
        chunks_needed(self.size, self.chunk_size)?;
        if self.filled > 0 {
            self.chunks
                .push(ChunkHash(*self.hasher.finalize().as_bytes()));
        }
        BlobIndex::new(digest, self.size, self.chunk_size, self.chunks)
    }
}

impl fmt::Debug for BlobIndexer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlobIndexer")
            .field("chunk_size", &self.chunk_size)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// Proptest strategies shared by this crate's tests.
#[cfg(test)]
pub(crate) mod strategies {
    use super::*;
    use crate::digest::Algorithm;
    use proptest::prelude::*;

    pub(crate) fn digest() -> impl Strategy<Value = Digest> {
        (any::<bool>(), any::<[u8; 8]>()).prop_map(|(sha512, seed)| {
            let alg = if sha512 {
                Algorithm::Sha512
            } else {
                Algorithm::Sha256
            };
            Digest::of(alg, &seed)
        })
    }

    pub(crate) fn blob_index_id() -> impl Strategy<Value = BlobIndexId> {
        any::<[u8; 32]>().prop_map(BlobIndexId)
    }

    /// A valid index with arbitrary hashes (no bytes behind it).
    pub(crate) fn blob_index() -> impl Strategy<Value = BlobIndex> {
        (
            digest(),
            16u32..=26,
            0u64..=20,
            0u64..MIN_CHUNK_SIZE_BYTES as u64,
        )
            .prop_flat_map(|(digest, shift, full, extra)| {
                let chunk_size = 1u32 << shift;
                let size = full * u64::from(chunk_size) + extra.min(u64::from(chunk_size) - 1);
                let count = size.div_ceil(u64::from(chunk_size)) as usize;
                proptest::collection::vec(any::<[u8; 32]>().prop_map(ChunkHash), count).prop_map(
                    move |chunks| BlobIndex::new(digest.clone(), size, chunk_size, chunks).unwrap(),
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{CodecError, decode, encode};
    use proptest::prelude::*;

    const MIN: u32 = MIN_CHUNK_SIZE_BYTES;

    fn bytes(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    /// Index by hashing each chunk separately: the obvious implementation.
    fn naive(data: &[u8], chunk_size: u32) -> BlobIndex {
        let chunks = data
            .chunks(chunk_size as usize)
            .map(ChunkHash::of)
            .collect();
        BlobIndex::new(Digest::sha256(data), data.len() as u64, chunk_size, chunks).unwrap()
    }

    #[test]
    fn empty_blob_has_no_chunks() {
        let index = BlobIndex::of(b"", MIN).unwrap();
        assert_eq!(index.size(), 0);
        assert_eq!(index.chunk_count(), 0);
        assert_eq!(index.chunk_range(0), None);
        assert!(!index.verify_chunk(0, b""));
        assert_eq!(index, naive(b"", MIN));
    }

    #[test]
    fn exact_multiple_has_no_short_chunk() {
        let data = bytes(3 * MIN as usize);
        let index = BlobIndex::of(&data, MIN).unwrap();
        assert_eq!(index.chunk_count(), 3);
        let m = u64::from(MIN);
        assert_eq!(index.chunk_range(0), Some(0..m));
        assert_eq!(index.chunk_range(2), Some(2 * m..3 * m));
        assert_eq!(index.chunk_range(3), None);
        for (i, chunk) in data.chunks(MIN as usize).enumerate() {
            assert!(index.verify_chunk(i as u32, chunk));
        }
        assert!(!index.verify_chunk(3, &data[..MIN as usize]));
        assert_eq!(index, naive(&data, MIN));
    }

    #[test]
    fn last_chunk_is_short() {
        let data = bytes(2 * MIN as usize + 5);
        let index = BlobIndex::of(&data, MIN).unwrap();
        assert_eq!(index.chunk_count(), 3);
        let m = u64::from(MIN);
        assert_eq!(index.chunk_range(2), Some(2 * m..2 * m + 5));
        let last = &data[2 * MIN as usize..];
        assert!(index.verify_chunk(2, last));
        // Right hash prefix but wrong length, and right length but wrong bytes.
        assert!(!index.verify_chunk(2, &last[..4]));
        let mut padded = last.to_vec();
        padded.push(0);
        assert!(!index.verify_chunk(2, &padded));
        assert!(!index.verify_chunk(2, &[0; 5]));
        // A chunk at the wrong position.
        assert!(!index.verify_chunk(1, &data[..MIN as usize]));
        assert!(!index.verify_chunk(u32::MAX, last));
    }

    #[test]
    fn one_byte_blob() {
        let index = BlobIndex::of(b"x", MIN).unwrap();
        assert_eq!(index.chunk_count(), 1);
        assert_eq!(index.chunk_range(0), Some(0..1));
        assert!(index.verify_chunk(0, b"x"));
        assert!(!index.verify_chunk(0, b"y"));
    }

    #[test]
    fn invalid_shapes_rejected_on_new() {
        let d = Digest::sha256(b"");
        let h = ChunkHash::of(b"");
        for bad in [
            0,
            1,
            MIN - 1,
            MIN / 2,
            MIN + 1,
            3 * MIN,
            MAX_CHUNK_SIZE_BYTES * 2,
            u32::MAX,
        ] {
            assert_eq!(
                BlobIndex::new(d.clone(), 0, bad, vec![]),
                Err(BlobIndexError::BadChunkSize(bad))
            );
        }
        assert_eq!(
            BlobIndex::new(d.clone(), 0, MIN, vec![h]),
            Err(BlobIndexError::ChunkCountMismatch {
                expected: 0,
                actual: 1
            })
        );
        assert_eq!(
            BlobIndex::new(d.clone(), u64::from(MIN) + 1, MIN, vec![h]),
            Err(BlobIndexError::ChunkCountMismatch {
                expected: 2,
                actual: 1
            })
        );
        assert_eq!(
            BlobIndex::new(d.clone(), u64::from(MIN), MIN, vec![h, h]),
            Err(BlobIndexError::ChunkCountMismatch {
                expected: 1,
                actual: 2
            })
        );
        let too_big = (MAX_CHUNKS as u64 + 1) * u64::from(MIN);
        assert_eq!(
            BlobIndex::new(d.clone(), too_big, MIN, vec![]),
            Err(BlobIndexError::TooManyChunks {
                chunks: MAX_CHUNKS as u64 + 1
            })
        );
        assert!(matches!(
            BlobIndex::new(d.clone(), u64::MAX, MAX_CHUNK_SIZE_BYTES, vec![]),
            Err(BlobIndexError::TooManyChunks { .. })
        ));
        // The largest index is accepted and fits in a frame.
        let max = MAX_CHUNKS as u64 * u64::from(MIN);
        let index = BlobIndex::new(d, max, MIN, vec![h; MAX_CHUNKS]).unwrap();
        assert_eq!(index.chunk_count() as usize, MAX_CHUNKS);
        assert_eq!(
            decode::<BlobIndex>(&encode(&index).unwrap()).unwrap(),
            index
        );
    }

    /// Encodes a `RawBlobIndex`-shaped value without validation.
    #[derive(Serialize)]
    struct Unchecked {
        digest: Digest,
        size: u64,
        chunk_size: u32,
        chunks: Vec<ChunkHash>,
    }

    #[test]
    fn invalid_shapes_rejected_on_decode() {
        let d = Digest::sha256(b"");
        let h = ChunkHash::of(b"");
        let good = Unchecked {
            digest: d.clone(),
            size: 10,
            chunk_size: MIN,
            chunks: vec![h],
        };
        let index = decode::<BlobIndex>(&encode(&good).unwrap()).unwrap();
        assert_eq!(index, BlobIndex::new(d.clone(), 10, MIN, vec![h]).unwrap());
        for bad in [
            Unchecked {
                chunk_size: MIN + 1,
                ..good
            },
            Unchecked {
                digest: d.clone(),
                size: 10,
                chunk_size: MIN,
                chunks: vec![],
            },
            Unchecked {
                digest: d.clone(),
                size: 0,
                chunk_size: MIN,
                chunks: vec![h],
            },
            Unchecked {
                digest: d.clone(),
                size: u64::MAX,
                chunk_size: MIN,
                chunks: vec![h],
            },
        ] {
            let encoded = encode(&bad).unwrap();
            assert!(matches!(
                decode::<BlobIndex>(&encoded),
                Err(CodecError::Decode(_))
            ));
            let json = serde_json::to_string(&bad).unwrap();
            assert!(serde_json::from_str::<BlobIndex>(&json).is_err());
        }
    }

    #[test]
    fn chunk_count_claiming_huge_length_fails_cleanly() {
        let d = Digest::sha256(b"");
        let mut bytes = encode(&Unchecked {
            digest: d,
            size: 0,
            chunk_size: MIN,
            chunks: vec![],
        })
        .unwrap();
        let n = bytes.len();
        bytes[n - 8..].copy_from_slice(&u64::MAX.to_be_bytes());
        assert!(decode::<BlobIndex>(&bytes).is_err());
    }

    #[test]
    fn indexer_rejects_bad_chunk_size() {
        let mut indexer = BlobIndexer::new(0);
        indexer.update(b"abc");
        assert_eq!(indexer.size(), 3);
        assert_eq!(
            indexer.finish(Digest::sha256(b"abc")),
            Err(BlobIndexError::BadChunkSize(0))
        );
    }

    #[test]
    fn indexer_rejects_too_many_chunks_without_growing() {
        let mut indexer = BlobIndexer::new(MIN);
        // Start from a full index rather than hashing 4 GiB.
        indexer.chunks = vec![ChunkHash::of(b""); MAX_CHUNKS];
        indexer.size = MAX_CHUNKS as u64 * u64::from(MIN);
        indexer.update(&[1; 3 * MIN as usize]);
        assert_eq!(indexer.chunks.len(), MAX_CHUNKS);
        assert_eq!(
            indexer.finish(Digest::sha256(b"")),
            Err(BlobIndexError::TooManyChunks {
                chunks: MAX_CHUNKS as u64 + 3
            })
        );
    }

    #[test]
    fn indexer_accepts_exactly_max_chunks() {
        let mut indexer = BlobIndexer::new(MIN);
        indexer.chunks = vec![ChunkHash::of(b""); MAX_CHUNKS - 1];
        indexer.size = (MAX_CHUNKS as u64 - 1) * u64::from(MIN);
        indexer.update(&[1; MIN as usize]);
        let index = indexer.finish(Digest::sha256(b"")).unwrap();
        assert_eq!(index.chunk_count() as usize, MAX_CHUNKS);
        assert!(index.verify_chunk(MAX_CHUNKS as u32 - 1, &[1; MIN as usize]));
    }

    #[test]
    fn chunk_size_for_aims_at_target_chunks_within_bounds() {
        const MIB: u64 = 1 << 20;
        let min = u64::from(MIN_AUTO_CHUNK_SIZE_BYTES);
        let max = u64::from(MAX_AUTO_CHUNK_SIZE_BYTES);
        for (size, want) in [
            (0, min),
            (1, min),
            (10 * MIB, min),
            (128 * MIB, min),
            (256 * MIB, 512 * 1024),
            (512 * MIB - 1, 512 * 1024),
            (512 * MIB, MIB),
            (538_000_000, MIB),
            (1024 * MIB, 2 * MIB),
            (2048 * MIB, max),
            (100 * 1024 * MIB, max),
            (256 * 1024 * MIB, max),
            (256 * 1024 * MIB + 1, 8 * MIB),
            (u64::MAX, u64::from(MAX_CHUNK_SIZE_BYTES)),
        ] {
            assert_eq!(u64::from(chunk_size_for(size)), want, "size {size}");
        }
    }

    proptest! {
        #[test]
        fn chunk_size_for_any_size_is_valid_and_indexes_up_to_4_tib(size in any::<u64>()) {
            let c = chunk_size_for(size);
            prop_assert!(valid_chunk_size(c));
            prop_assert!(c >= MIN_AUTO_CHUNK_SIZE_BYTES);
            if size <= (MAX_CHUNKS as u64) * u64::from(MAX_CHUNK_SIZE_BYTES) {
                prop_assert!(chunks_needed(size, c).is_ok());
            }
            // Never fewer chunks than the target when the size allows it.
            if size / u64::from(MIN_AUTO_CHUNK_SIZE_BYTES) >= TARGET_CHUNKS
                && size <= (MAX_CHUNKS as u64) * u64::from(MAX_AUTO_CHUNK_SIZE_BYTES)
                && c < MAX_AUTO_CHUNK_SIZE_BYTES
            {
                prop_assert!(size.div_ceil(u64::from(c)) >= TARGET_CHUNKS);
            }
        }
    }

    #[test]
    fn id_depends_on_every_field() {
        let data = bytes(MIN as usize + 1);
        let index = BlobIndex::of(&data, MIN).unwrap();
        let same = BlobIndex::new(
            index.digest().clone(),
            index.size(),
            index.chunk_size(),
            index.chunks().to_vec(),
        )
        .unwrap();
        assert_eq!(index.id(), same.id());
        let other_digest = BlobIndex::new(
            Digest::sha256(b"x"),
            index.size(),
            index.chunk_size(),
            index.chunks().to_vec(),
        )
        .unwrap();
        let other_size = BlobIndex::new(
            index.digest().clone(),
            index.size() + 1,
            index.chunk_size(),
            index.chunks().to_vec(),
        )
        .unwrap();
        let other_chunks = BlobIndex::new(
            index.digest().clone(),
            index.size(),
            index.chunk_size(),
            vec![ChunkHash::of(b"a"), ChunkHash::of(b"b")],
        )
        .unwrap();
        let other_chunk_size = BlobIndex::new(
            index.digest().clone(),
            index.size(),
            index.chunk_size() * 2,
            vec![ChunkHash::of(b"a")],
        )
        .unwrap();
        for other in [other_digest, other_size, other_chunks, other_chunk_size] {
            assert_ne!(index.id(), other.id());
        }
        // The id is not a plain hash of the encoding: it is domain separated.
        let plain = blake3::hash(&encode(&index).unwrap());
        assert_ne!(index.id().as_bytes(), plain.as_bytes());
    }

    #[test]
    fn text_forms() {
        let h = ChunkHash::of(b"");
        assert_eq!(
            h.to_string(),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
        assert_eq!(h.to_string().parse::<ChunkHash>().unwrap(), h);
        let id = BlobIndex::of(b"", MIN).unwrap().id();
        assert_eq!(id.to_string().parse::<BlobIndexId>().unwrap(), id);
        assert_eq!(
            id.to_string().to_uppercase().parse::<BlobIndexId>(),
            Err(BlobIndexError::InvalidHex)
        );
        assert_eq!("ab".parse::<BlobIndexId>(), Err(BlobIndexError::InvalidHex));
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{id}\""));
        assert_eq!(serde_json::from_str::<BlobIndexId>(&json).unwrap(), id);
        assert_eq!(encode(&id).unwrap(), id.as_bytes());
        assert_eq!(encode(&h).unwrap(), h.as_bytes());
    }

    #[test]
    fn json_round_trip() {
        let index = BlobIndex::of(&bytes(MIN as usize * 2 + 3), MIN).unwrap();
        let json = serde_json::to_string(&index).unwrap();
        let back: BlobIndex = serde_json::from_str(&json).unwrap();
        assert_eq!(back, index);
        assert_eq!(back.id(), index.id());
    }

    proptest! {
        #[test]
        fn indexer_split_invariant(
            len in 0usize..(4 * MIN as usize + 10),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let data = bytes(len);
            let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(len + 1)).collect();
            cuts.sort_unstable();
            let mut indexer = BlobIndexer::new(MIN);
            let mut start = 0;
            for cut in cuts.into_iter().chain([len]) {
                indexer.update(&data[start..cut]);
                start = cut;
            }
            let index = indexer.finish(Digest::sha256(&data)).unwrap();
            prop_assert_eq!(&index, &naive(&data, MIN));
            prop_assert_eq!(&index, &BlobIndex::of(&data, MIN).unwrap());
            for (i, chunk) in data.chunks(MIN as usize).enumerate() {
                let range = index.chunk_range(i as u32).unwrap();
                prop_assert_eq!(&data[range.start as usize..range.end as usize], chunk);
                prop_assert!(index.verify_chunk(i as u32, chunk));
            }
        }

        #[test]
        fn codec_round_trip(index in strategies::blob_index()) {
            let encoded = encode(&index).unwrap();
            let back: BlobIndex = decode(&encoded).unwrap();
            prop_assert_eq!(back.id(), index.id());
            prop_assert_eq!(back, index);
        }

        #[test]
        fn ranges_tile_the_blob(index in strategies::blob_index()) {
            let mut next = 0;
            for i in 0..index.chunk_count() {
                let range = index.chunk_range(i).unwrap();
                prop_assert_eq!(range.start, next);
                prop_assert!(range.end > range.start);
                prop_assert!(range.end - range.start <= u64::from(index.chunk_size()));
                next = range.end;
            }
            prop_assert_eq!(next, index.size());
            prop_assert_eq!(index.chunk_range(index.chunk_count()), None);
        }

        #[test]
        fn any_bytes_decode_or_err(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
            let _ = decode::<BlobIndex>(&bytes);
        }

        #[test]
        fn mutated_encoding_decodes_valid_or_errs(
            index in strategies::blob_index(),
            pos in any::<prop::sample::Index>(),
            bit in 0u8..8,
        ) {
            let mut encoded = encode(&index).unwrap();
            let i = pos.index(encoded.len());
            encoded[i] ^= 1 << bit;
            if let Ok(other) = decode::<BlobIndex>(&encoded) {
                // Whatever decodes is a valid index, and a different one.
                prop_assert_ne!(other.id(), index.id());
                prop_assert_eq!(other.chunks().len() as u64, other.size().div_ceil(u64::from(other.chunk_size())));
            }
        }
    }
}
