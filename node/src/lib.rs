//! A Shoal node: the content-addressed store, the registry HTTP API and the command line.
//!
//! - [`store`] owns the data directory: blob files, the records log and the sled index.
//! - [`registry`] serves the OCI distribution API on top of the store.
//! - [`net`] is the libp2p side: discovery, gossip of signed tag records, chunk streams.
//! - [`tags`] decides which signed record names each tag; [`auth`] who may do what (peers,
//!   publishers, clients) in a fleet or alone.
//! - [`fetch`] gets content the node lacks from peers, verified chunk by chunk.
//! - [`identity`] is the node's key.
//! - [`quota`] keeps an edge node under its disk quota: evicts cached content, honours pins.
//! - [`node`] wires them together and owns start-up and shutdown.
//! - [`config`] resolves settings from flags, `SHOAL_*` environment variables, a config file and
//!   embedded defaults.

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod auth;
pub mod clock;
pub mod config;
pub mod fetch;
pub mod identity;
pub mod lifecycle;
pub mod manifest;
pub mod mirror;
pub mod net;
pub mod node;
pub mod prefetch;
pub mod quota;
pub mod registry;
pub mod store;
pub mod tags;

pub use config::Config;
pub use node::Node;
pub use store::Store;
