//! Shoal in front of other registries (Docker Hub, GHCR, a company's registry): pulls of an
//! upstream's images that the fleet cannot serve are fetched from the upstream once, kept under
//! the upstream's namespace with signed tag records, and served from the fleet from then on,
//! whether or not the upstream answers.

pub mod pull;
pub mod recipes;
pub mod route;
pub mod upstream;
