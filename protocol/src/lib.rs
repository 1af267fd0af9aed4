//! Shoal's protocol crate: every type that crosses a wire, names stored content or is signed.
//!
//! This crate is pure. It has no async runtime, no database and no sockets, so that the node,
//! the tests and the simulations agree on one definition of each identifier. Every identifier is
//! a newtype validated when it is constructed and when it is deserialized: a [`Digest`],
//! [`RepoName`], [`Tag`] or [`Reference`] that exists is valid.

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod digest;
pub mod name;

pub use digest::{Algorithm, Digest, DigestError, DigestHasher};
pub use name::{NameError, Reference, RepoName, Tag};
