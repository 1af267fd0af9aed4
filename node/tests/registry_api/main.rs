//! In-process HTTP tests of the registry API (OCI distribution spec v1.1): every endpoint and
//! every error, with status codes, spec error bodies and headers, driven through the axum router
//! with `tower::ServiceExt::oneshot` over a store in a temp dir. Restarts reopen the store on the
//! same directory; `fsck` runs once the store is dropped.

mod base_and_routing;
mod blobs;
mod gc;
mod harness;
mod listing;
mod manifests;
mod push;
mod referrers;
mod restarts;
mod uploads;
mod uploads_expiry;
