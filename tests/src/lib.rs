//! Helpers shared by Shoal integration tests.
//!
//! The out-of-process tests (`tests/crash.rs`, `tests/clients.rs`) drive the real `shoal`
//! binary the way a user or a registry client would: over HTTP on a loopback port, and with
//! real clients (skopeo, podman, docker, the PyPI `oras` client). This crate gives them:
//!
//! - [`process`]: [`ShoalProcess`], which spawns `shoal node` on a temp data dir, waits for its
//!   ready line, and kills it on drop; [`DistributionProcess`], the same for Debian's
//!   `docker-registry` (the reference implementation, used to check the tests themselves); and
//!   [`RegistryServer`], either of the two, chosen by `SHOAL_TEST_TARGET`.
//! - [`http`]: a small blocking registry client ([`RegistryClient`]) for the distribution API.
//! - [`tools`]: [`require`] for external tools (prints the `SKIP:` line, or fails in CI),
//!   [`run`] for subprocesses with a timeout, and [`OciImage`], a locally built test image.
//! - [`wait`]: [`wait_until`] (every wait is a polled wait with a timeout) and [`seeded_rng`]
//!   (every random test prints its seed and can be replayed with `SHOAL_TEST_SEED`).
//! - [`netns`]: [`netns::Lab`], network namespaces behind a private switch that a test can
//!   partition and heal; [`lab_fleet`]: [`lab_fleet::LabFleet`], real nodes in such a lab, and
//!   [`lab_fleet::TestImage`]; [`disk`]: [`disk::SmallDisk`], a tiny tmpfs to fill. The
//!   fault-injection suite (`tests/faults.rs`) is built from these.
//! - [`standin`]: [`standin::StandIn`], a stand-in upstream registry for the mirror tests.

pub mod disk;
pub mod http;
pub mod lab_fleet;
pub mod netns;
pub mod process;
pub mod standin;
pub mod tools;
pub mod wait;

pub use http::{HttpResponse, RegistryClient, sha256_digest};
pub use process::{
    DistributionProcess, FsckOutput, Launch, RegistryServer, ShoalProcess, shoal_binary,
};
pub use tools::{CmdOutput, OciImage, Tool, require, run, run_ok};
pub use wait::{seeded_rng, wait_until};
