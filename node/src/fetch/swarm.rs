//! One blob from many peers at once: the I/O around the sans-IO [`plan`](super::plan).
//!
//! The download asks every candidate peer which chunks it holds (`Have`), feeds the answers to
//! the plan, and carries out the plan's actions: each `Request` is a task that takes a chunk
//! stream to the peer from a small pool (or opens one), reads the chunk, checks its BLAKE3 hash
//! against the signed `BlobIndex`, and writes it into the partial blob; `Cancel` aborts the task;
//! `Ban` disconnects the peer. Peers that hold part of the blob are asked again every
//! [`HAVE_REFRESH`], so chunks that other downloaders obtain meanwhile become sources too. The
//! node announces itself as a provider as soon as it starts, so later downloaders find it and
//! take the chunks it already holds.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use shoal_protocol::message::{HaveChunks, SyncRequest, SyncResponse};
use shoal_protocol::{BlobIndex, BlobRef};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::plan::{Action, Bitfield, Event, Plan, PlanConfig};
use crate::net::chunk::ChunkClient;
use crate::net::{NetError, Network};
use crate::store::partial::Partial;
use crate::store::{Store, StoreError};

/// How often peers holding part of the blob are asked again what they hold.
pub const HAVE_REFRESH: Duration = Duration::from_millis(250);
/// How often the candidate list is refreshed (new providers appear as others download).
pub const CANDIDATE_REFRESH: Duration = Duration::from_secs(3);
/// Most peers one download asks for chunks. Bounded so that a fleet of thousands costs each node
/// a few dozen conversations, as in BitTorrent (whose clients keep 30 to 80 peers).
pub const MAX_CANDIDATES: usize = 32;
/// How long a download may have no usable source for a missing chunk before it gives up.
pub const STALL_LIMIT: Duration = Duration::from_secs(30);
/// How long a download may receive no chunk at all, sources or not. Long, because a seeder
/// saturated by a whole fleet can take this long per chunk for the unlucky few.
pub const PROGRESS_LIMIT: Duration = Duration::from_secs(300);
/// How long one chunk request may take (4 MiB over a fair share of a busy 100 Mbit/s uplink).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(90);
/// Most chunk requests in flight for one download (each holds one chunk in memory).
pub const MAX_IN_FLIGHT: usize = 16;
/// Capacity of the channel from request tasks back to the download loop.
const EVENT_CAPACITY: usize = 256;

/// Why a download stopped.
#[derive(Debug)]
pub enum SwarmError {
    /// No peer supplied the missing chunks in time.
    Stalled,
    /// The local store failed.
    Store(crate::store::StoreError),
}

enum Msg {
    Have(PeerId, Option<HaveChunks>),
    Chunk {
        peer: PeerId,
        chunk: u32,
        outcome: ChunkOutcome,
        client: Option<Box<ChunkClient>>,
    },
}

enum ChunkOutcome {
    Done(u64),
    Bad,
    Failed,
}

/// The bitfield a peer sent, if it is well formed and for this blob.
fn bitfield(have: &HaveChunks, count: u32) -> Option<Bitfield> {
    have.bitfield().filter(|b| b.len() == count)
}

/// Downloads the rest of `partial` from `candidates` (and whoever else turns up).
pub async fn download(
    store: &Store,
    network: &Network,
    blob: &BlobRef,
    partial: Arc<Partial>,
    mut candidates: Vec<PeerId>,
    refresh_candidates: impl Fn() -> futures::future::BoxFuture<'static, Vec<PeerId>>,
    bad_peers: &std::sync::atomic::AtomicU64,
) -> Result<(), SwarmError> {
    let index: BlobIndex = partial.index().clone();
    let count = index.chunk_count();
    let held = bitfield(&partial.have(), count).unwrap_or_else(|| Bitfield::new(count));
    let mut plan: Plan<PeerId> = Plan::new(count, held, plan_config(rand::random()));
    let (tx, mut rx) = mpsc::channel::<Msg>(EVENT_CAPACITY);
    let mut tasks: HashMap<(PeerId, u32), JoinHandle<()>> = HashMap::new();
    let mut pool: HashMap<PeerId, Vec<Box<ChunkClient>>> = HashMap::new();
    let mut full_peers = std::collections::HashSet::new();
    let start = Instant::now();
    let mut last_progress = Instant::now();
    let mut stalled_since: Option<Instant> = None;
    let mut have_tick = tokio::time::interval(HAVE_REFRESH);
    let mut candidate_tick = tokio::time::interval(CANDIDATE_REFRESH);
    candidate_tick.tick().await;
    candidates.retain(|p| *p != network.peer_id());
    for peer in &candidates {
        ask_have(network, &tx, *peer, &blob.digest);
    }

    let result = loop {
        for action in plan.next_actions(start.elapsed()) {
            match action {
                Action::Request { peer, chunk } => {
                    let client = pool.get_mut(&peer).and_then(Vec::pop);
                    let job = request_chunk(
                        network.clone(),
                        partial.clone(),
                        peer,
                        chunk,
                        client,
                        tx.clone(),
                    );
                    tasks.insert((peer, chunk), tokio::spawn(job));
                }
                Action::Cancel { peer, chunk } => {
                    if let Some(t) = tasks.remove(&(peer, chunk)) {
                        t.abort();
                    }
                }
                Action::Ban { peer } => {
                    bad_peers.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(%peer, digest = %blob.digest, "peer sent a chunk that fails its hash; banned");
                    pool.remove(&peer);
                    let _ = network.disconnect(peer).await;
                }
            }
        }
        if plan.is_complete() {
            break Ok(());
        }
        if plan.is_stalled() {
            if stalled_since.get_or_insert_with(Instant::now).elapsed() > STALL_LIMIT {
                break Err(SwarmError::Stalled);
            }
        } else {
            stalled_since = None;
        }
        if last_progress.elapsed() > PROGRESS_LIMIT {
            break Err(SwarmError::Stalled);
        }
        let wake = plan
            .next_deadline()
            .map_or(HAVE_REFRESH, |d| d.saturating_sub(start.elapsed()))
            .min(HAVE_REFRESH);
        tokio::select! {
            msg = rx.recv() => {
                let Some(msg) = msg else { break Err(SwarmError::Stalled) };
                match msg {
                    Msg::Have(peer, Some(have)) => {
                        if let Some(bits) = bitfield(&have, count) {
                            if bits.is_full() {
                                full_peers.insert(peer);
                            }
                            plan.handle(Event::PeerHas { peer, have: bits }, start.elapsed());
                        }
                    }
                    Msg::Have(_, None) => {}
                    Msg::Chunk { peer, chunk, outcome, client } => {
                        tasks.remove(&(peer, chunk));
                        if let Some(c) = client {
                            pool.entry(peer).or_default().push(c);
                        }
                        let event = match outcome {
                            ChunkOutcome::Done(bytes) => {
                                last_progress = Instant::now();
                                Event::ChunkDone { peer, chunk, bytes }
                            }
                            ChunkOutcome::Bad => Event::ChunkBad { peer, chunk },
                            ChunkOutcome::Failed => Event::ChunkFailed { peer, chunk },
                        };
                        plan.handle(event, start.elapsed());
                    }
                }
            }
            _ = have_tick.tick() => {
                // Partial holders gain chunks as they download: ask them again.
                for peer in &candidates {
                    if !full_peers.contains(peer) {
                        ask_have(network, &tx, *peer, &blob.digest);
                    }
                }
            }
            _ = candidate_tick.tick() => {
                for peer in refresh_candidates().await {
                    if peer != network.peer_id() && !candidates.contains(&peer) {
                        candidates.push(peer);
                        ask_have(network, &tx, peer, &blob.digest);
                    }
                }
            }
            () = tokio::time::sleep(wake) => {}
        }
    };
    for (_, t) in tasks {
        t.abort();
    }
    result?;
    store
        .finish_partial(&partial)
        .await
        .map_err(SwarmError::Store)
}

/// The plan configuration every download uses (the simulations use it too).
pub fn plan_config(seed: u64) -> PlanConfig {
    PlanConfig {
        max_in_flight: MAX_IN_FLIGHT,
        request_timeout: REQUEST_TIMEOUT,
        seed,
        ..PlanConfig::default()
    }
}

fn ask_have(
    network: &Network,
    tx: &mpsc::Sender<Msg>,
    peer: PeerId,
    digest: &shoal_protocol::Digest,
) {
    let (network, tx, digest) = (network.clone(), tx.clone(), digest.clone());
    tokio::spawn(async move {
        let have = match network.sync(peer, SyncRequest::Have { digest }).await {
            Ok(SyncResponse::Have(h)) => h,
            _ => None,
        };
        let _ = tx.send(Msg::Have(peer, have)).await;
    });
}

async fn request_chunk(
    network: Network,
    partial: Arc<Partial>,
    peer: PeerId,
    chunk: u32,
    client: Option<Box<ChunkClient>>,
    tx: mpsc::Sender<Msg>,
) {
    let index = partial.index();
    let (outcome, client) = match index.chunk_range(chunk) {
        None => (ChunkOutcome::Failed, client),
        Some(range) => {
            let client = match client {
                Some(c) => Ok(c),
                None => ChunkClient::open(&mut network.control(), peer)
                    .await
                    .map(Box::new),
            };
            match client {
                Err(_) => (ChunkOutcome::Failed, None),
                Ok(mut c) => {
                    let mut buf = Vec::new();
                    match c
                        .fetch(
                            index.digest(),
                            range.start,
                            range.end - range.start,
                            &mut buf,
                        )
                        .await
                    {
                        Ok(true) => {
                            // `write_chunk` checks the BLAKE3 hash before a byte is written.
                            let p = partial.clone();
                            let len = buf.len() as u64;
                            let written =
                                tokio::task::spawn_blocking(move || p.write_chunk(chunk, &buf))
                                    .await;
                            match written {
                                Ok(Ok(())) => (ChunkOutcome::Done(len), Some(c)),
                                Ok(Err(StoreError::Corrupt(_))) => (ChunkOutcome::Bad, None),
                                _ => (ChunkOutcome::Failed, Some(c)),
                            }
                        }
                        Ok(false) => (ChunkOutcome::Failed, Some(c)),
                        Err(NetError::Protocol(_)) => (ChunkOutcome::Bad, None),
                        Err(_) => (ChunkOutcome::Failed, None),
                    }
                }
            }
        }
    };
    let _ = tx
        .send(Msg::Chunk {
            peer,
            chunk,
            outcome,
            client,
        })
        .await;
}
