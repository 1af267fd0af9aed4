//! A Shoal node: the content-addressed store, the registry HTTP API and the command line.
//!
//! - [`store`] owns the data directory: blob files, the records log and the sled index.
//! - [`registry`] serves the OCI distribution API on top of the store.
//! - [`node`] wires them together and owns start-up and shutdown.
//! - [`config`] resolves settings from flags, `SHOAL_*` environment variables, a config file and
//!   embedded defaults.

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod config;
pub mod manifest;
pub mod node;
pub mod registry;
pub mod store;

pub use config::Config;
pub use node::Node;
pub use store::Store;
