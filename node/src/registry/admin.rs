//! The node's own small admin API, beside `/v2/`: `GET /_shoal/v1/peers` (what `shoal peers`
//! prints) and `GET /_shoal/v1/status` (identity, listen addresses, record counters).

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::response::{IntoResponse, Response};

use super::Registry;
use super::error::RegistryError;

/// GET /_shoal/v1/peers
pub(super) async fn peers(State(r): State<Registry>) -> Response {
    let Some(fleet) = &r.fleet else {
        return axum::Json(serde_json::json!({ "peers": [] })).into_response();
    };
    match fleet.network.peers().await {
        Ok(peers) => axum::Json(serde_json::json!({ "peers": peers })).into_response(),
        Err(e) => RegistryError::Unsupported(format!("network unavailable: {e}")).into_response(),
    }
}

/// GET /_shoal/v1/status
pub(super) async fn status(State(r): State<Registry>) -> Response {
    let stats = r.tags.stats();
    let bad_peers = r.fleet.as_ref().map_or(0, |f| f.fetcher.bad_peers());
    let (peer_id, listen) = match &r.fleet {
        Some(f) => (
            Some(f.network.peer_id().to_string()),
            f.network
                .listen_addrs()
                .await
                .unwrap_or_default()
                .iter()
                .map(ToString::to_string)
                .collect(),
        ),
        None => (None, Vec::new()),
    };
    axum::Json(serde_json::json!({
        "peer_id": peer_id,
        "p2p_listen": listen,
        "bad_peers": bad_peers,
        "served_bytes": r.fleet.as_ref().map_or(0, |f| f.network.served_bytes()),
        "records": {
            "accepted": stats.accepted.load(Ordering::Relaxed),
            "stale": stats.stale.load(Ordering::Relaxed),
            "untrusted": stats.untrusted.load(Ordering::Relaxed),
            "invalid": stats.invalid.load(Ordering::Relaxed),
        },
    }))
    .into_response()
}
