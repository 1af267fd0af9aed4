//! A bitfield with one bit per chunk of a blob: which chunks a peer (or this node) holds.
//!
//! One type for every place that needs it: the `Have` message on the wire, the download plan,
//! and the chunk bitmap a partial blob keeps on disk. The byte form is BitTorrent's: chunk 0 is
//! the high bit of the first byte, and the spare bits of the last byte are zero.

use std::fmt::{self, Debug};

fn words_for(len: u32) -> usize {
    len.div_ceil(64) as usize
}

/// Words kept in the bitfield itself: 512 chunks, [`crate::blob_index::TARGET_CHUNKS`], which is
/// as many as the index of any blob up to 1 GiB has.
const INLINE_WORDS: usize = 8;

/// A bitfield's words: in place up to [`INLINE_WORDS`], so that reading one is not a second
/// trip to memory (the download plan reads every peer's, often); on the heap beyond. Which one
/// is decided by the length alone, and the words past the length are zero, so the derived
/// comparisons and hash are those of the bits.
#[derive(Clone, PartialEq, Eq, Hash)]
enum Words {
    Inline([u64; INLINE_WORDS]),
    Heap(Vec<u64>),
}

impl Default for Words {
    fn default() -> Self {
        Words::Inline([0; INLINE_WORDS])
    }
}

impl Words {
    fn new(len: u32, fill: u64) -> Words {
        let n = words_for(len);
        if n <= INLINE_WORDS {
            let mut words = [0; INLINE_WORDS];
            words[..n].fill(fill);
            Words::Inline(words)
        } else {
            Words::Heap(vec![fill; n])
        }
    }
}

/// One bit per chunk of a blob: which chunks a peer (or this node) holds.
///
/// The wire form ([`Bitfield::to_bytes`], [`Bitfield::from_bytes`]) is BitTorrent's: chunk 0 is
/// the high bit of the first byte, and the spare bits of the last byte are zero.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Bitfield {
    /// Bit `i` is bit `i % 64` of word `i / 64`; bits at and beyond `len` are always zero.
    words: Words,
    len: u32,
    /// How many bits are set, kept with every change so that [`Bitfield::is_full`] and
    /// [`Bitfield::count_ones`] do not walk the words (the download plan asks for every peer,
    /// often).
    ones: u32,
}

impl Bitfield {
    /// A bitfield of `len` chunks, none held.
    pub fn new(len: u32) -> Self {
        Bitfield {
            words: Words::new(len, 0),
            len,
            ones: 0,
        }
    }

    /// A bitfield of `len` chunks, all held.
    pub fn full(len: u32) -> Self {
        let mut bits = Bitfield {
            words: Words::new(len, u64::MAX),
            len,
            ones: len,
        };
        bits.clear_spare();
        bits
    }

    /// Its words: `ceil(len / 64)` of them.
    fn words(&self) -> &[u64] {
        let n = words_for(self.len);
        match &self.words {
            Words::Inline(words) => &words[..n.min(INLINE_WORDS)],
            Words::Heap(words) => words,
        }
    }

    fn words_mut(&mut self) -> &mut [u64] {
        let n = words_for(self.len);
        match &mut self.words {
            Words::Inline(words) => &mut words[..n.min(INLINE_WORDS)],
            Words::Heap(words) => words,
        }
    }

    /// Zeroes the bits at and beyond `len` in the last word.
    fn clear_spare(&mut self) {
        let spare = self.len % 64;
        if let Some(last) = self.words_mut().last_mut().filter(|_| spare != 0) {
            *last &= (1u64 << spare) - 1;
        }
    }

    /// The number of chunks it describes.
    pub fn len(&self) -> u32 {
        self.len
    }

    /// Whether it describes no chunks at all (a zero-length blob), not whether no bit is set.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether chunk `i` is held; `false` for an `i` out of range.
    pub fn get(&self, i: u32) -> bool {
        i < self.len
            && self
                .words()
                .get((i / 64) as usize)
                .is_some_and(|w| (w >> (i % 64)) & 1 == 1)
    }

    /// Marks chunk `i` held. Returns whether it was not held before; an `i` out of range is
    /// ignored and returns `false`.
    pub fn set(&mut self, i: u32) -> bool {
        if i >= self.len {
            return false;
        }
        match self.words_mut().get_mut((i / 64) as usize) {
            Some(w) => {
                let mask = 1u64 << (i % 64);
                let was = *w & mask != 0;
                *w |= mask;
                self.ones += u32::from(!was);
                !was
            }
            None => false,
        }
    }

    /// Marks chunk `i` not held. Returns whether it was held; an `i` out of range is ignored.
    pub fn clear(&mut self, i: u32) -> bool {
        if i >= self.len {
            return false;
        }
        match self.words_mut().get_mut((i / 64) as usize) {
            Some(w) => {
                let mask = 1u64 << (i % 64);
                let was = *w & mask != 0;
                *w &= !mask;
                self.ones -= u32::from(was);
                was
            }
            None => false,
        }
    }

    /// How many chunks are held.
    pub fn count_ones(&self) -> u32 {
        self.ones
    }

    /// Whether every chunk is held (true for a zero-length bitfield).
    pub fn is_full(&self) -> bool {
        self.count_ones() == self.len
    }

    /// Parses the wire form of a bitfield of `len` chunks. `None` unless `bytes` is exactly
    /// `ceil(len / 8)` bytes long with the spare bits of the last byte zero. Allocates only after
    /// the length matched, so a peer cannot choose the allocation.
    pub fn from_bytes(bytes: &[u8], len: u32) -> Option<Bitfield> {
        if bytes.len() != len.div_ceil(8) as usize {
            return None;
        }
        let mut bits = Bitfield::new(len);
        for (k, &byte) in bytes.iter().enumerate() {
            for j in 0..8u32 {
                if byte & (0x80 >> j) != 0 {
                    let i = u32::try_from(k).ok()?.checked_mul(8)?.checked_add(j)?;
                    if i >= len {
                        return None;
                    }
                    bits.set(i);
                }
            }
        }
        Some(bits)
    }

    /// The wire form: `ceil(len / 8)` bytes, chunk 0 in the high bit of the first byte.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.len.div_ceil(8) as usize];
        for i in self.iter_ones() {
            if let Some(byte) = out.get_mut((i / 8) as usize) {
                *byte |= 0x80 >> (i % 8);
            }
        }
        out
    }

    /// The held chunks, in increasing order.
    pub fn iter_ones(&self) -> impl Iterator<Item = u32> + '_ {
        self.words().iter().enumerate().flat_map(|(k, &word)| Ones {
            word,
            base: (k as u32).wrapping_mul(64),
        })
    }

    /// The chunks not held, in increasing order.
    pub fn iter_zeros(&self) -> impl Iterator<Item = u32> + '_ {
        let len = self.len;
        self.words()
            .iter()
            .enumerate()
            .flat_map(|(k, &word)| Ones {
                word: !word,
                base: (k as u32).wrapping_mul(64),
            })
            .take_while(move |&i| i < len)
    }

    /// Whether some chunk held here is not held in `other`.
    pub fn has_any_not_in(&self, other: &Bitfield) -> bool {
        let theirs = other.words();
        self.words()
            .iter()
            .enumerate()
            .any(|(k, &w)| w & !theirs.get(k).copied().unwrap_or(0) != 0)
    }

    /// Adds the chunks held in `other` (those within this bitfield's length).
    pub fn union_with(&mut self, other: &Bitfield) {
        for (w, &o) in self.words_mut().iter_mut().zip(other.words()) {
            *w |= o;
        }
        self.clear_spare();
        self.ones = self.words().iter().map(|w| w.count_ones()).sum();
    }

    /// The same chunks, described as a bitfield of `len` chunks (chunks beyond `len` dropped).
    pub fn resized(&self, len: u32) -> Bitfield {
        let mut bits = Bitfield::new(len);
        for i in self.iter_ones().take_while(|&i| i < len) {
            bits.set(i);
        }
        bits
    }
}

impl Debug for Bitfield {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.len <= 128 {
            let bits: String = (0..self.len)
                .map(|i| if self.get(i) { '1' } else { '0' })
                .collect();
            write!(f, "Bitfield({bits})")
        } else {
            write!(f, "Bitfield({}/{} held)", self.count_ones(), self.len)
        }
    }
}

/// The set bits of one word, offset by `base`.
struct Ones {
    word: u64,
    base: u32,
}

impl Iterator for Ones {
    type Item = u32;

    fn next(&mut self) -> Option<u32> {
        if self.word == 0 {
            return None;
        }
        let bit = self.word.trailing_zeros();
        self.word &= self.word - 1;
        Some(self.base.wrapping_add(bit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn popcount(bits: &Bitfield) -> u32 {
        (0..bits.len()).filter(|&i| bits.get(i)).count() as u32
    }

    proptest! {
        /// The kept count of set bits agrees with the bits after any sequence of changes, after
        /// the wire round trip and after resizing; `is_full` agrees with it.
        #[test]
        fn ones_follow_the_bits(
            len in 0u32..300,
            start_full in any::<bool>(),
            ops in proptest::collection::vec((any::<bool>(), 0u32..320), 0..200),
            new_len in 0u32..300,
        ) {
            let mut bits = if start_full { Bitfield::full(len) } else { Bitfield::new(len) };
            for (set, i) in ops {
                let before = bits.get(i);
                let changed = if set { bits.set(i) } else { bits.clear(i) };
                prop_assert_eq!(changed, i < len && before != set);
                prop_assert_eq!(bits.count_ones(), popcount(&bits));
                prop_assert_eq!(bits.is_full(), popcount(&bits) == len);
            }
            let back = Bitfield::from_bytes(&bits.to_bytes(), len).expect("own wire form");
            prop_assert_eq!(back.count_ones(), popcount(&bits));
            prop_assert_eq!(&back, &bits);
            let resized = bits.resized(new_len);
            prop_assert_eq!(resized.count_ones(), popcount(&resized));
            let mut union = Bitfield::new(new_len);
            union.union_with(&bits);
            prop_assert_eq!(&union, &resized);
            union.union_with(&Bitfield::full(new_len));
            prop_assert_eq!(&union, &Bitfield::full(new_len));
        }
    }
}
