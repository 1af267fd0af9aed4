//! Shoal's protocol crate: every type that crosses a wire, names stored content or is signed.
//!
//! This crate is pure. It has no async runtime, no database and no sockets, so that the node,
//! the tests and the simulations agree on one definition of each identifier, record and
//! message, and can test them without a network.
//!
//! - [`digest`] and [`name`]: OCI digests, repository names, tags and references. Every
//!   identifier is a newtype validated when it is constructed and when it is deserialized: a
//!   [`Digest`], [`RepoName`], [`Tag`] or [`Reference`] that exists is valid.
//! - [`blob_index`]: a blob's [`BlobIndex`], the BLAKE3 [`ChunkHash`] of each fixed-size chunk,
//!   so that chunks from untrusted peers are checked one by one; built in one pass by a
//!   [`BlobIndexer`] and named by its [`BlobIndexId`].
//! - [`record`]: signed tag records. A [`TagRecord`] says which manifest (and which blobs, by
//!   [`BlobRef`]) a tag names, or that it was deleted. It travels as a [`SignedTagRecord`]:
//!   ed25519 over a domain-separated encoding, and [`SignedTagRecord::verify`] is the only way to
//!   obtain the trusted [`VerifiedTagRecord`].
//! - [`fleet`]: what makes a fleet: its admins' signed statements (join tickets, policies,
//!   access tokens) and a node's proof of membership.
//! - [`lifecycle`]: retention rules in Amazon ECR's lifecycle-policy JSON, validated as ECR
//!   validates them, and their evaluation: a pure function, so every node expires alike.
//! - [`message`]: the peer-to-peer protocols (`shoal/tags/1` gossip, `/shoal/sync/2`,
//!   `/shoal/chunk/1`), their messages and their limits.
//! - [`codec`]: the one wire encoding (fixed bincode configuration, length-prefixed frames,
//!   [`MAX_FRAME_BYTES`](codec::MAX_FRAME_BYTES)), documented there: goals, non-goals,
//!   versioning and limits.
//!
//! Anything decoded from a peer is bounded and validated before it is returned; no input makes
//! this crate panic or allocate beyond the frame limit.

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod bitfield;
pub mod blob_index;
pub mod codec;
pub mod digest;
pub mod fleet;
pub mod lifecycle;
pub mod message;
pub mod name;
pub mod record;

pub use bitfield::Bitfield;
pub use blob_index::{
    BlobIndex, BlobIndexError, BlobIndexId, BlobIndexer, ChunkHash, MAX_AUTO_CHUNK_SIZE_BYTES,
    MIN_AUTO_CHUNK_SIZE_BYTES, TARGET_CHUNKS, chunk_size_for,
};
pub use codec::CodecError;
pub use digest::{Algorithm, Digest, DigestError, DigestHasher};
pub use name::{NameError, Reference, RepoName, Tag};
pub use record::{
    BlobRef, PublisherKey, RecordError, SignedTagRecord, SigningKey, TagRecord, TagTarget,
    VerifiedTagRecord,
};
