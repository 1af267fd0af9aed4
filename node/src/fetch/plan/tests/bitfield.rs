//! The bitfield a peer's haves travel in (`shoal_protocol::Bitfield`, re-exported here): its
//! wire form, and that no bytes from a peer can make it panic.

use proptest::prelude::*;

use super::*;

#[test]
fn bitfield_wire_form_round_trips_and_rejects_spare_bits() {
    let b = bits(10, [0, 3, 9]);
    assert_eq!(b.to_bytes(), vec![0b1001_0000, 0b0100_0000]);
    assert_eq!(Bitfield::from_bytes(&b.to_bytes(), 10), Some(b.clone()));
    assert_eq!(b.iter_ones().collect::<Vec<_>>(), vec![0, 3, 9]);
    assert_eq!(b.iter_zeros().count(), 7);
    assert_eq!(b.count_ones(), 3);
    assert!(!b.is_full());
    // A spare bit set, or the wrong number of bytes, is not a bitfield of 10 chunks.
    assert_eq!(Bitfield::from_bytes(&[0, 0b0010_0000], 10), None);
    assert_eq!(Bitfield::from_bytes(&[0], 10), None);
    assert_eq!(Bitfield::from_bytes(&[0, 0, 0], 10), None);
    // Out of range is ignored, never a panic.
    let mut b = b;
    assert!(!b.set(10));
    assert!(!b.get(u32::MAX));
    assert!(!b.clear(1_000));
    assert!(b.clear(3));
    assert!(!b.get(3));
    let full = Bitfield::full(70);
    assert!(full.is_full());
    assert_eq!(full.count_ones(), 70);
    assert_eq!(full.iter_zeros().count(), 0);
    assert_eq!(Bitfield::from_bytes(&full.to_bytes(), 70), Some(full));
    assert!(Bitfield::new(0).is_full());
    assert_eq!(Bitfield::from_bytes(&[], 0), Some(Bitfield::new(0)));
}

proptest! {
    #[test]
    fn bitfield_from_any_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..20), len in 0u32..160) {
        if let Some(b) = Bitfield::from_bytes(&bytes, len) {
            prop_assert_eq!(b.to_bytes(), bytes);
            prop_assert!(b.count_ones() <= len);
        }
    }
}
