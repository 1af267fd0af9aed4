//! The wire codec: how every Shoal message and signed payload becomes bytes.
//!
//! This is the only module that calls bincode. Everything that crosses a wire or is signed is
//! encoded here, with one fixed configuration, so two nodes (or one node before and after an
//! upgrade) always produce the same bytes for the same value.
//!
//! # Goals
//!
//! - **Deterministic.** A value has exactly one encoding. Signed tag records are signed over
//!   these bytes and [`BlobIndexId`](crate::BlobIndexId)s and record ids are BLAKE3 hashes of
//!   them, so the encoding must not depend on the platform, the compiler or the library version.
//! - **Bounded.** No value larger than [`MAX_FRAME_BYTES`] is encoded or decoded, and decoding
//!   never allocates more than that limit however large the lengths written in the input claim to
//!   be. Each protocol sets its own, smaller limits on top (see [`crate::message`]).
//! - **Strict.** Decoding rejects trailing bytes, invalid UTF-8, out-of-range enum tags and
//!   booleans, and every identifier is validated by its own `Deserialize` impl, so a decoded
//!   value is a valid value.
//!
//! # Non-goals
//!
//! - Self-description. The bytes carry no field names or type tags; both sides must agree on
//!   the type from the protocol being spoken.
//! - Zero-copy decoding or streaming. Messages are small; bulk data (chunk bytes) travels raw
//!   after a header frame and never goes through this codec.
//! - Compatibility with other bincode configurations or with serde formats other than this one.
//!
//! # Format
//!
//! The format is bincode 2 with `standard()` settings, **big-endian, fixed-width integers**:
//!
//! - `u8`/`u16`/`u32`/`u64` take 1/2/4/8 bytes, most significant first; `bool` is one byte, 0 or
//!   1; `usize` lengths are written as `u64`.
//! - strings and byte buffers are a `u64` length followed by the bytes; sequences are a `u64`
//!   count followed by the elements; fixed-size byte arrays (hashes, signatures) are their bytes
//!   with no length.
//! - `Option` is a byte 0 (`None`) or 1 (`Some`) followed by the value; an enum is its variant
//!   index as a `u32` followed by the variant's fields; structs are their fields in declaration
//!   order.
//!
//! Consequently the **order of fields and of enum variants is part of the wire format**:
//! reordering them, or inserting a variant anywhere but at the end, is a breaking change.
//!
//! Streams carry messages as frames: a `u32` big-endian payload length, then the payload
//! ([`frame`], [`frame_len`]).
//!
//! # Versioning
//!
//! The format has no version field of its own. What is versioned is each use of it: the protocol
//! ids and gossip topic (`/shoal/sync/2`, `/shoal/chunk/1`, `shoal/tags/1`), the signing domain
//! of tag records (`shoal tag record v1`) and the key derivation context of blob index ids
//! (`shoal blob index v1`). A breaking change to any encoded type ships under a new protocol id
//! (and, for signed or hashed types, a new domain), and nodes speak both versions during a
//! rollout.
//!
//! # Limits
//!
//! - [`MAX_FRAME_BYTES`] (4 MiB) bounds every encoded value and every frame.
//! - [`decode`] rejects longer input before looking at it, and runs bincode with a byte limit of
//!   the same size, so a length prefix that claims more than that is refused before anything is
//!   allocated for it.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The largest encoded value or frame payload, in bytes.
pub const MAX_FRAME_BYTES: usize = 4 * 1024 * 1024;

/// Bytes in a frame header: the payload length as a big-endian `u32`.
pub const FRAME_HEADER_BYTES: usize = 4;

/// The one bincode configuration Shoal uses. Changing it changes every signature and id.
fn config() -> bincode::config::Configuration<
    bincode::config::BigEndian,
    bincode::config::Fixint,
    bincode::config::Limit<MAX_FRAME_BYTES>,
> {
    bincode::config::standard()
        .with_big_endian()
        .with_fixed_int_encoding()
        .with_limit::<MAX_FRAME_BYTES>()
}

/// Why a value could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The value could not be serialized.
    #[error("encode")]
    Encode(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The bytes are not a valid encoding of the expected type.
    #[error("decode")]
    Decode(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A valid value was followed by more bytes.
    #[error("trailing bytes after the encoded value")]
    TrailingBytes,
    /// A value or frame is longer than its limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// The length found or announced.
        len: usize,
        /// The limit it broke.
        max: usize,
    },
}

impl CodecError {
    /// The error and its causes on one line (`decode: unexpected end of input`), for errors
    /// that carry text rather than a source (they are compared and cloned).
    pub fn describe(&self) -> String {
        let mut text = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            text.push_str(": ");
            text.push_str(&c.to_string());
            cause = c.source();
        }
        text
    }
}

/// Encodes `value`. Fails if the encoding is longer than [`MAX_FRAME_BYTES`].
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    let bytes = bincode::serde::encode_to_vec(value, config())
        .map_err(|e| CodecError::Encode(Box::new(e)))?;
    if bytes.len() > MAX_FRAME_BYTES {
        return Err(CodecError::FrameTooLarge {
            len: bytes.len(),
            max: MAX_FRAME_BYTES,
        });
    }
    Ok(bytes)
}

/// Decodes exactly one `T` from `bytes`.
///
/// Input longer than [`MAX_FRAME_BYTES`] is rejected without being read, and bytes left over
/// after the value are an error ([`CodecError::TrailingBytes`]): a message has one encoding.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    if bytes.len() > MAX_FRAME_BYTES {
        return Err(CodecError::FrameTooLarge {
            len: bytes.len(),
            max: MAX_FRAME_BYTES,
        });
    }
    let (value, read) = bincode::serde::decode_from_slice::<T, _>(bytes, config())
        .map_err(|e| CodecError::Decode(Box::new(e)))?;
    if read != bytes.len() {
        return Err(CodecError::TrailingBytes);
    }
    Ok(value)
}

/// Prefixes `payload` with its length as a big-endian `u32`.
///
/// Fails if `payload` is longer than [`MAX_FRAME_BYTES`].
pub fn frame(payload: &[u8]) -> Result<Vec<u8>, CodecError> {
    let too_large = CodecError::FrameTooLarge {
        len: payload.len(),
        max: MAX_FRAME_BYTES,
    };
    if payload.len() > MAX_FRAME_BYTES {
        return Err(too_large);
    }
    let len = u32::try_from(payload.len()).map_err(|_| too_large)?;
    let mut out = Vec::with_capacity(FRAME_HEADER_BYTES + payload.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

/// The payload length announced by a frame header, if it is at most `max`.
///
/// `max` is capped at [`MAX_FRAME_BYTES`]: no larger frame is ever valid. Check the length
/// before allocating a buffer for the payload.
pub fn frame_len(header: [u8; FRAME_HEADER_BYTES], max: usize) -> Result<usize, CodecError> {
    let max = max.min(MAX_FRAME_BYTES);
    let len = usize::try_from(u32::from_be_bytes(header)).unwrap_or(usize::MAX);
    if len > max {
        return Err(CodecError::FrameTooLarge { len, max });
    }
    Ok(len)
}

/// Decodes a lowercase hex string of exactly `2 * N` digits. Uppercase is refused so that every
/// value has one textual form.
pub(crate) fn decode_hex_lower<const N: usize>(s: &str) -> Option<[u8; N]> {
    let lower_hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
    if s.len() != 2 * N || !s.bytes().all(lower_hex) {
        return None;
    }
    let mut out = [0u8; N];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// Serde for fixed-size byte arrays (hashes, signatures): the raw bytes with no length prefix in
/// the wire codec, a lowercase hex string in human-readable formats such as JSON.
///
/// Use as `#[serde(with = "crate::codec::fixed_bytes")]`.
pub(crate) mod fixed_bytes {
    use std::fmt;

    use serde::de::{self, Deserializer, SeqAccess, Visitor};
    use serde::ser::{SerializeTuple, Serializer};

    pub(crate) fn serialize<S: Serializer, const N: usize>(
        bytes: &[u8; N],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.serialize_str(&hex::encode(bytes))
        } else {
            let mut tuple = serializer.serialize_tuple(N)?;
            for byte in bytes {
                tuple.serialize_element(byte)?;
            }
            tuple.end()
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>, const N: usize>(
        deserializer: D,
    ) -> Result<[u8; N], D::Error> {
        if deserializer.is_human_readable() {
            deserializer.deserialize_str(FixedBytes::<N>)
        } else {
            deserializer.deserialize_tuple(N, FixedBytes::<N>)
        }
    }

    struct FixedBytes<const N: usize>;

    impl<'de, const N: usize> Visitor<'de> for FixedBytes<N> {
        type Value = [u8; N];

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "{N} bytes or {} lowercase hex digits", 2 * N)
        }

        fn visit_str<E: de::Error>(self, s: &str) -> Result<[u8; N], E> {
            super::decode_hex_lower(s)
                .ok_or_else(|| E::invalid_value(de::Unexpected::Str(s), &self))
        }

        fn visit_bytes<E: de::Error>(self, b: &[u8]) -> Result<[u8; N], E> {
            <[u8; N]>::try_from(b).map_err(|_| E::invalid_length(b.len(), &self))
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<[u8; N], A::Error> {
            let mut out = [0u8; N];
            for (i, slot) in out.iter_mut().enumerate() {
                *slot = seq
                    .next_element()?
                    .ok_or_else(|| de::Error::invalid_length(i, &self))?;
            }
            if seq.next_element::<u8>()?.is_some() {
                return Err(de::Error::invalid_length(N + 1, &self));
            }
            Ok(out)
        }
    }
}

/// Serde for variable-length byte buffers (signed payloads): a length-prefixed byte string in
/// the wire codec, a lowercase hex string in human-readable formats.
///
/// Use as `#[serde(with = "crate::codec::byte_buf")]`.
pub(crate) mod byte_buf {
    use std::fmt;

    use serde::de::{self, Deserializer, SeqAccess, Visitor};
    use serde::ser::Serializer;

    pub(crate) fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.serialize_str(&hex::encode(bytes))
        } else {
            serializer.serialize_bytes(bytes)
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<u8>, D::Error> {
        if deserializer.is_human_readable() {
            deserializer.deserialize_str(ByteBuf)
        } else {
            deserializer.deserialize_byte_buf(ByteBuf)
        }
    }

    struct ByteBuf;

    impl<'de> Visitor<'de> for ByteBuf {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a byte string or lowercase hex digits")
        }

        fn visit_str<E: de::Error>(self, s: &str) -> Result<Vec<u8>, E> {
            let lower_hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
            if !s.bytes().all(lower_hex) {
                return Err(E::invalid_value(de::Unexpected::Str(s), &self));
            }
            hex::decode(s).map_err(|_| E::invalid_value(de::Unexpected::Str(s), &self))
        }

        fn visit_bytes<E: de::Error>(self, b: &[u8]) -> Result<Vec<u8>, E> {
            Ok(b.to_vec())
        }

        fn visit_byte_buf<E: de::Error>(self, b: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(b)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            // The size hint comes from the input: cap the preallocation.
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
            while let Some(byte) = seq.next_element()? {
                out.push(byte);
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde::{Deserialize, Serialize};

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        a: u32,
        b: String,
        c: Option<u64>,
        #[serde(with = "fixed_bytes")]
        d: [u8; 40],
        #[serde(with = "byte_buf")]
        e: Vec<u8>,
    }

    fn sample() -> Sample {
        Sample {
            a: 0x0102_0304,
            b: "hi".into(),
            c: Some(7),
            d: [9; 40],
            e: vec![1, 2, 3],
        }
    }

    #[test]
    fn layout_is_big_endian_fixed_width() {
        let bytes = encode(&sample()).unwrap();
        let mut expected = vec![1, 2, 3, 4];
        expected.extend_from_slice(&2u64.to_be_bytes());
        expected.extend_from_slice(b"hi");
        expected.push(1);
        expected.extend_from_slice(&7u64.to_be_bytes());
        expected.extend_from_slice(&[9; 40]);
        expected.extend_from_slice(&3u64.to_be_bytes());
        expected.extend_from_slice(&[1, 2, 3]);
        assert_eq!(bytes, expected);
        assert_eq!(decode::<Sample>(&bytes).unwrap(), sample());
    }

    #[test]
    fn human_readable_byte_fields_are_hex() {
        let json = serde_json::to_string(&sample()).unwrap();
        assert!(json.contains(&"09".repeat(40)), "{json}");
        assert!(json.contains("\"010203\""), "{json}");
        assert_eq!(serde_json::from_str::<Sample>(&json).unwrap(), sample());
        let upper = json.replace("\"010203\"", "\"0A0B\"");
        assert!(serde_json::from_str::<Sample>(&upper).is_err());
    }

    #[test]
    fn trailing_bytes_rejected() {
        let mut bytes = encode(&sample()).unwrap();
        bytes.push(0);
        assert!(matches!(
            decode::<Sample>(&bytes),
            Err(CodecError::TrailingBytes)
        ));
    }

    #[test]
    fn truncated_input_rejected() {
        let bytes = encode(&sample()).unwrap();
        for n in 0..bytes.len() {
            assert!(decode::<Sample>(&bytes[..n]).is_err(), "prefix {n} decoded");
        }
    }

    #[test]
    fn oversize_rejected() {
        let big = vec![0u8; MAX_FRAME_BYTES + 1];
        assert!(matches!(
            decode::<Vec<u8>>(&big),
            Err(CodecError::FrameTooLarge { len, max: MAX_FRAME_BYTES }) if len == big.len()
        ));
        // Serializing a Vec<u8> as a sequence adds an 8-byte length, so this is just too large.
        let payload = vec![0u8; MAX_FRAME_BYTES - 7];
        assert!(matches!(
            encode(&payload),
            Err(CodecError::FrameTooLarge { .. })
        ));
        let payload = vec![0u8; MAX_FRAME_BYTES - 8];
        assert_eq!(encode(&payload).unwrap().len(), MAX_FRAME_BYTES);
    }

    #[test]
    fn claimed_length_beyond_limit_is_refused_without_allocating() {
        // A string that claims u64::MAX - 1 bytes, followed by nothing.
        let mut bytes = (u64::MAX - 1).to_be_bytes().to_vec();
        bytes.push(b'x');
        assert!(matches!(
            decode::<String>(&bytes),
            Err(CodecError::Decode(_))
        ));
        let bytes = ((MAX_FRAME_BYTES as u64) + 1).to_be_bytes();
        assert!(decode::<String>(&bytes).is_err());
        assert!(decode::<Vec<u64>>(&u64::MAX.to_be_bytes()).is_err());
    }

    #[test]
    fn frames() {
        let framed = frame(b"abc").unwrap();
        assert_eq!(framed, [0, 0, 0, 3, b'a', b'b', b'c']);
        let header: [u8; 4] = framed[..4].try_into().unwrap();
        assert_eq!(frame_len(header, 3).unwrap(), 3);
        assert!(matches!(
            frame_len(header, 2),
            Err(CodecError::FrameTooLarge { len: 3, max: 2 })
        ));
        assert_eq!(frame(b"").unwrap(), [0, 0, 0, 0]);
        assert_eq!(frame_len([0; 4], 0).unwrap(), 0);
        assert!(matches!(
            frame_len([0xff; 4], usize::MAX),
            Err(CodecError::FrameTooLarge {
                len: 0xffff_ffff,
                max: MAX_FRAME_BYTES
            })
        ));
        let max = u32::try_from(MAX_FRAME_BYTES).unwrap().to_be_bytes();
        assert_eq!(frame_len(max, usize::MAX).unwrap(), MAX_FRAME_BYTES);
        assert!(frame(&vec![0; MAX_FRAME_BYTES]).is_ok());
        assert!(matches!(
            frame(&vec![0; MAX_FRAME_BYTES + 1]),
            Err(CodecError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn hex_helper_is_strict() {
        assert_eq!(decode_hex_lower::<2>("0aff"), Some([0x0a, 0xff]));
        assert_eq!(decode_hex_lower::<2>("0AFF"), None);
        assert_eq!(decode_hex_lower::<2>("0af"), None);
        assert_eq!(decode_hex_lower::<2>("0aff0"), None);
        assert_eq!(decode_hex_lower::<2>("0ag0"), None);
        assert_eq!(decode_hex_lower::<1>("é"), None);
    }

    proptest! {
        #[test]
        fn any_bytes_decode_or_err(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode::<Sample>(&bytes);
        }

        #[test]
        fn frame_header_round_trips(payload in proptest::collection::vec(any::<u8>(), 0..512)) {
            let framed = frame(&payload).unwrap();
            let header: [u8; 4] = framed[..4].try_into().unwrap();
            prop_assert_eq!(frame_len(header, MAX_FRAME_BYTES).unwrap(), payload.len());
            prop_assert_eq!(&framed[4..], &payload[..]);
        }

        #[test]
        fn frame_len_never_exceeds_max(header in any::<[u8; 4]>(), max in 0usize..10_000_000) {
            match frame_len(header, max) {
                Ok(len) => prop_assert!(len <= max && len <= MAX_FRAME_BYTES),
                Err(CodecError::FrameTooLarge { len, max: m }) => {
                    prop_assert!(len > m);
                    prop_assert_eq!(m, max.min(MAX_FRAME_BYTES));
                }
                Err(e) => prop_assert!(false, "unexpected {e}"),
            }
        }
    }
}
