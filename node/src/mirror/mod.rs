//! Pull-through from upstream registries (Docker Hub, GHCR, a company's registry): the fleet
//! fetches what it cannot serve from the upstream once, and keeps serving it when the upstream
//! is down.

pub mod upstream;
