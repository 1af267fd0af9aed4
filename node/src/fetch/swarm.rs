//! One blob from many peers at once: the I/O around the sans-IO [`plan`](super::plan).
//!
//! The download keeps up to [`MAX_CANDIDATES`] peers. It asks each which chunks it holds
//! (`Have`), then keeps a `HaveWait` long poll parked at each peer still downloading, which the
//! peer answers as soon as it stores another chunk: a chunk becomes a source for the others one
//! network hop after it lands. It feeds the answers to the plan, and carries out the plan's
//! actions: each `Request` is a task that takes a chunk stream to the peer from a small pool (or
//! opens one), reads the chunk, checks its BLAKE3 hash against the signed `BlobIndex`, and writes
//! it into the partial blob; `Cancel` aborts the task; `Ban` disconnects the peer. The node
//! announces itself as a provider as soon as it starts, so later downloaders find it and take the
//! chunks it already holds. A peer that advertises another site than this node's is marked
//! remote, so the plan fetches each chunk over the WAN about once per site.
//!
//! A growing partial (a blob a peer fetches from an upstream right now) knows the hashes of its
//! first chunks only: the download shows the plan only the chunks whose hash it knows, and asks
//! the peer fetching the blob for more hashes (`ChunkHashes`) whenever some peer holds a chunk
//! past them. That peer holds each chunk before anyone else, so the fleet fetches the blob
//! about one chunk behind the upstream's stream.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use shoal_protocol::message::{ChunkHashes, HaveChunks, SyncRequest, SyncResponse};
use shoal_protocol::{BlobIndex, BlobRef};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};

use super::plan::{Action, Bitfield, Event, Plan, PlanConfig};
use crate::net::chunk::{self, ChunkClient};
use crate::net::conduct::Offence;
use crate::net::{NetError, Network};
use crate::store::partial::Partial;
use crate::store::{Buffers, Store, StoreError};

/// How long to wait before asking a peer again after a failed `Have`.
const HAVE_RETRY: Duration = Duration::from_secs(1);
/// How long to wait before asking again a peer that does not download the blob (yet): it may
/// start any moment, as the whole fleet does in a rollout. Doubled on every such answer up to
/// [`IDLE_RETRY_MAX`].
const IDLE_RETRY: Duration = Duration::from_millis(250);
/// The longest wait between asks to a peer that does not download the blob.
const IDLE_RETRY_MAX: Duration = Duration::from_secs(4);
/// Failed `Have`s in a row after which a peer is dropped from the candidates (the candidate
/// refresh may bring it back).
const HAVE_FAILURES: u32 = 3;
/// How long to wait before asking again for chunk hashes when the last answer brought none new
/// though a peer holds a chunk past them (the source has not stored it yet).
const HASHES_RETRY: Duration = Duration::from_millis(50);
/// How often the download loop wakes when nothing happens, to check its limits.
const TICK: Duration = Duration::from_millis(500);
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
/// How long one chunk request may take (a chunk of up to 4 MiB over a fair share of a busy
/// 100 Mbit/s uplink).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(90);
/// Most chunk requests in flight for one download. Each holds one chunk in memory, so blobs cut
/// into large chunks get fewer: see [`max_in_flight`].
pub const MAX_IN_FLIGHT: usize = 32;
/// The chunk bytes one download may hold in memory for its requests in flight.
pub const MAX_IN_FLIGHT_BYTES: u64 = 64 * 1024 * 1024;
/// The fewest requests in flight a download is allowed, however large its chunks.
const MIN_IN_FLIGHT: usize = 4;
/// Capacity of the channel from request tasks back to the download loop.
const EVENT_CAPACITY: usize = 256;
/// A pooled chunk stream idle for longer is dropped rather than reused: the serving side closes
/// streams idle for [`chunk::IDLE_TIMEOUT`].
const POOLED_STREAM_MAX_IDLE: Duration =
    Duration::from_millis(chunk::IDLE_TIMEOUT.as_millis() as u64 / 2);

/// Why a download stopped.
#[derive(Debug)]
pub enum SwarmError {
    /// No peer supplied the missing chunks in time.
    Stalled,
    /// The local store failed.
    Store(crate::store::StoreError),
    /// The peer that supplied a growing download's chunk hashes contradicted what it said
    /// before, or could not supply them.
    Hashes(PeerId),
}

enum Msg {
    /// What a peer holds; `None`: it neither holds nor downloads the blob (any more), or it
    /// stopped answering.
    Have(PeerId, Option<HaveChunks>),
    /// A peer stopped downloading the blob without finishing it (it is still asked now and then).
    Gone(PeerId),
    Chunk {
        peer: PeerId,
        chunk: u32,
        outcome: ChunkOutcome,
        client: Option<Box<ChunkClient>>,
    },
    /// Chunk hashes from the peer that supplies them (`None`: it could not, after retries).
    Hashes(Option<ChunkHashes>),
}

enum ChunkOutcome {
    Done(u64),
    Bad,
    Failed,
    /// The peer is at capacity.
    Busy,
    /// The chunk arrived but this node's store could not write it: the download fails with
    /// the store's error, and the peer is not blamed.
    Local(crate::store::StoreError),
}

/// The bitfield a peer sent, if it is well formed and for this blob.
fn bitfield(have: &HaveChunks, count: u32) -> Option<Bitfield> {
    have.bitfield().filter(|b| b.len() == count)
}

/// `bits` without the chunks from `known` on, and whether it had any of them.
fn known_part(bits: &Bitfield, known: u32) -> (Bitfield, bool) {
    let mut masked = bits.clone();
    let mut beyond = false;
    for i in bits.iter_ones().filter(|i| *i >= known).collect::<Vec<_>>() {
        masked.clear(i);
        beyond = true;
    }
    (masked, beyond)
}

/// Where a download's chunks, and a growing partial's chunk hashes, come from.
pub struct Sources<R> {
    /// The peers asked first.
    pub candidates: Vec<PeerId>,
    /// More peers, asked every [`CANDIDATE_REFRESH`] (new providers appear as others download).
    pub refresh: R,
    /// The peer that gives a growing partial's chunk hashes (see the module docs).
    pub hashes_from: Option<PeerId>,
}

/// When a download's chunks arrived: where a fetch's time goes (logged with each fetched blob,
/// and read by the swarm benchmark's per-node timelines).
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// The first chunk written (`None`: every chunk was held already).
    pub first_chunk: Option<Instant>,
    /// The last chunk written; the whole blob's digest check comes after it.
    pub last_chunk: Instant,
}

/// Downloads the rest of `partial` from `sources.candidates` (and whoever else turns up); for
/// a growing partial, learning its chunk hashes from `sources.hashes_from` as they become known.
///
/// Every request and every peer watcher runs in a task of this download's own `JoinSet`: when
/// the download ends, or its future is dropped (the fetch cancelled at shutdown), they are
/// aborted with it.
pub async fn download(
    store: &Store,
    network: &Network,
    blob: &BlobRef,
    partial: Arc<Partial>,
    sources: Sources<impl Fn() -> futures::future::BoxFuture<'static, Vec<PeerId>>>,
    bad_peers: &std::sync::atomic::AtomicU64,
) -> Result<Timing, SwarmError> {
    let Sources {
        mut candidates,
        refresh: refresh_candidates,
        hashes_from,
    } = sources;
    let index: BlobIndex = partial.index().clone();
    let count = index.chunk_count();
    // Chunks `0..known` have a known hash. While some do not, what each peer said it holds is
    // kept whole here, and the plan is shown only the known part.
    let mut known = partial.known_chunks();
    let mut said: HashMap<PeerId, Bitfield> = HashMap::new();
    let mut want_hashes = false;
    let mut asking_hashes = false;
    let held = partial.held();
    let mut plan: Plan<PeerId> =
        Plan::new(count, held, plan_config(rand::random(), index.chunk_size()))
            .with_self(&network.peer_id());
    let (tx, mut rx) = mpsc::channel::<Msg>(EVENT_CAPACITY);
    let mut tasks = JoinSet::new();
    let mut requests: HashMap<(PeerId, u32), AbortHandle> = HashMap::new();
    // Open chunk streams per peer, with when each was last used.
    let mut pool: HashMap<PeerId, Vec<(Box<ChunkClient>, Instant)>> = HashMap::new();
    let start = Instant::now();
    let mut first_chunk = None;
    let mut last_progress = Instant::now();
    let mut stalled_since: Option<Instant> = None;
    let mut candidate_tick = tokio::time::interval(CANDIDATE_REFRESH);
    candidate_tick.tick().await;
    candidates.retain(|p| *p != network.peer_id());
    candidates.truncate(MAX_CANDIDATES);
    // Chunk buffers reused between requests: a chunk is read into memory already allocated.
    let buffers = Buffers::new(plan.config().max_in_flight);
    for peer in &candidates {
        tasks.spawn(watch_peer(network, &tx, *peer, blob, count));
    }

    let result = loop {
        for action in plan.next_actions(start.elapsed()) {
            match action {
                Action::Request { peer, chunk } => {
                    let client = pool.get_mut(&peer).and_then(|streams| {
                        streams.retain(|(_, used)| used.elapsed() < POOLED_STREAM_MAX_IDLE);
                        streams.pop().map(|(c, _)| c)
                    });
                    let job = request_chunk(
                        network.clone(),
                        partial.clone(),
                        (peer, chunk),
                        client,
                        buffers.clone(),
                        tx.clone(),
                    );
                    requests.insert((peer, chunk), tasks.spawn(job));
                }
                Action::Cancel { peer, chunk } => {
                    if let Some(t) = requests.remove(&(peer, chunk)) {
                        t.abort();
                    }
                }
                Action::Ban { peer } => {
                    bad_peers.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(%peer, digest = %blob.digest, "peer sent a chunk that fails its hash; banned");
                    pool.remove(&peer);
                    network.report(peer, Offence::BadContent);
                }
            }
        }
        if want_hashes && !asking_hashes {
            if let Some(source) = hashes_from {
                tasks.spawn(ask_hashes(
                    network,
                    &tx,
                    source,
                    blob,
                    known,
                    Duration::ZERO,
                ));
                asking_hashes = true;
            }
            want_hashes = false;
        }
        // Finished tasks have already reported on `tx`: only their slots are freed here.
        while tasks.try_join_next().is_some() {}
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
            .map_or(TICK, |d| d.saturating_sub(start.elapsed()))
            .min(TICK);
        tokio::select! {
            msg = rx.recv() => {
                let Some(msg) = msg else { break Err(SwarmError::Stalled) };
                match msg {
                    Msg::Have(peer, Some(have)) => {
                        if let Some(mut bits) = bitfield(&have, count) {
                            if network.is_remote(&peer) {
                                plan.handle(Event::PeerRemote { peer }, start.elapsed());
                            }
                            if known < count {
                                let (part, beyond) = known_part(&bits, known);
                                // Only the source's word counts for new hashes: any peer may
                                // claim chunks, and the source is asked only when it has more.
                                want_hashes |= beyond && hashes_from == Some(peer);
                                said.insert(peer, std::mem::replace(&mut bits, part));
                            }
                            plan.handle(Event::PeerHas { peer, have: bits }, start.elapsed());
                            if let Some((sending, sent)) = have.serve_bitfields() {
                                let event = Event::PeerServes { peer, sending, sent };
                                plan.handle(event, start.elapsed());
                            }
                        }
                    }
                    Msg::Gone(peer) => {
                        said.remove(&peer);
                        plan.handle(Event::PeerGone { peer }, start.elapsed());
                    }
                    Msg::Hashes(answer) => {
                        asking_hashes = false;
                        let Some(source) = hashes_from else { continue };
                        let fits = answer.as_ref().is_some_and(|h| {
                            h.size == index.size() && h.chunk_size == index.chunk_size()
                        });
                        let Some(hashes) = answer else {
                            // It did not answer (it restarted, or it is gone): nothing to learn
                            // from it; the download stalls and ends like any other.
                            continue;
                        };
                        let learned = if fits {
                            partial.learn(hashes.from, &hashes.hashes).ok()
                        } else {
                            None
                        };
                        let Some(now_known) = learned else {
                            tracing::warn!(peer = %source, digest = %blob.digest, "the peer fetching a blob from an upstream sent chunk hashes that contradict its own");
                            break Err(SwarmError::Hashes(source));
                        };
                        let source_ahead =
                            |known| said.get(&source).is_some_and(|b| known_part(b, known).1);
                        if now_known > known {
                            known = now_known;
                            for (peer, bits) in &said {
                                let (part, _) = known_part(bits, known);
                                plan.handle(Event::PeerHas { peer: *peer, have: part }, start.elapsed());
                            }
                            want_hashes = source_ahead(known);
                            if known >= count {
                                said.clear();
                            }
                        } else if source_ahead(known) {
                            // Nothing new yet though a peer holds a chunk past them: the source
                            // has not stored it yet. Ask again shortly.
                            tasks.spawn(ask_hashes(network, &tx, source, blob, known, HASHES_RETRY));
                            asking_hashes = true;
                        }
                    }
                    Msg::Have(peer, None) => {
                        said.remove(&peer);
                        // It gave up, or it is unreachable: forget it; a later candidate refresh
                        // may bring it back.
                        plan.handle(Event::PeerGone { peer }, start.elapsed());
                        candidates.retain(|p| *p != peer);
                    }
                    Msg::Chunk { peer, chunk, outcome, client } => {
                        requests.remove(&(peer, chunk));
                        if let Some(c) = client {
                            pool.entry(peer).or_default().push((c, Instant::now()));
                        }
                        let event = match outcome {
                            ChunkOutcome::Local(e) => break Err(SwarmError::Store(e)),
                            ChunkOutcome::Done(bytes) => {
                                last_progress = Instant::now();
                                first_chunk.get_or_insert_with(Instant::now);
                                Event::ChunkDone { peer, chunk, bytes }
                            }
                            // Against hashes nothing signed (a growing download's), a bad
                            // chunk may be the source's lie, not this peer's: a strike, no ban.
                            ChunkOutcome::Bad if partial.is_growing() && hashes_from.is_some() => {
                                Event::ChunkFailed { peer, chunk }
                            }
                            ChunkOutcome::Bad => Event::ChunkBad { peer, chunk },
                            ChunkOutcome::Failed => Event::ChunkFailed { peer, chunk },
                            ChunkOutcome::Busy => Event::ChunkBusy { peer, chunk },
                        };
                        plan.handle(event, start.elapsed());
                    }
                }
            }
            _ = candidate_tick.tick() => {
                for peer in refresh_candidates().await {
                    if candidates.len() >= MAX_CANDIDATES {
                        break;
                    }
                    if peer != network.peer_id() && !candidates.contains(&peer) {
                        candidates.push(peer);
                        tasks.spawn(watch_peer(network, &tx, peer, blob, count));
                    }
                }
            }
            () = tokio::time::sleep(wake) => {}
        }
    };
    let last_chunk = Instant::now();
    tasks.shutdown().await;
    result?;
    let timing = Timing {
        first_chunk,
        last_chunk,
    };
    store
        .finish_partial(&partial)
        .await
        .map_err(SwarmError::Store)?;
    Ok(timing)
}

/// Requests in flight for a download of chunks of `chunk_size` bytes: as many as fit in
/// [`MAX_IN_FLIGHT_BYTES`], within `4..=`[`MAX_IN_FLIGHT`] (32 for chunks of up to 2 MiB, 16
/// for the 4 MiB chunks of blobs over 2 GiB, fewer for larger chunks an index may have).
pub fn max_in_flight(chunk_size: u32) -> usize {
    let fit = MAX_IN_FLIGHT_BYTES / u64::from(chunk_size.max(1));
    usize::try_from(fit)
        .unwrap_or(MAX_IN_FLIGHT)
        .clamp(MIN_IN_FLIGHT, MAX_IN_FLIGHT)
}

/// The plan configuration every download of chunks of `chunk_size` bytes uses (the simulations
/// use it too).
pub fn plan_config(seed: u64, chunk_size: u32) -> PlanConfig {
    PlanConfig {
        max_in_flight: max_in_flight(chunk_size),
        request_timeout: REQUEST_TIMEOUT,
        seed,
        ..PlanConfig::default()
    }
}

/// Asks `source`, after `delay`, for the hashes of the chunks from `from` on, a few times if it
/// fails.
fn ask_hashes(
    network: &Network,
    tx: &mpsc::Sender<Msg>,
    source: PeerId,
    blob: &BlobRef,
    from: u32,
    delay: Duration,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let (network, tx, digest) = (network.clone(), tx.clone(), blob.digest.clone());
    async move {
        tokio::time::sleep(delay).await;
        let mut answer = None;
        for attempt in 0..HAVE_FAILURES {
            if attempt > 0 {
                tokio::time::sleep(HAVE_RETRY).await;
            }
            let request = SyncRequest::ChunkHashes {
                digest: digest.clone(),
                from,
            };
            if let Ok(SyncResponse::ChunkHashes(Some(hashes))) = network.sync(source, request).await
            {
                answer = Some(hashes);
                break;
            }
        }
        let _ = tx.send(Msg::Hashes(answer)).await;
    }
}

/// Follows what `peer` holds: a `Have`, then `HaveWait` long polls until it holds the whole blob,
/// and after that too if it reports its serves (then each answer says what it sent since).
/// While it neither holds nor downloads the blob, asks again after [`IDLE_RETRY`], backing off.
/// Sends `Msg::Have(peer, None)` when it stops downloading, and stops after [`HAVE_FAILURES`]
/// failed asks in a row.
fn watch_peer(
    network: &Network,
    tx: &mpsc::Sender<Msg>,
    peer: PeerId,
    blob: &BlobRef,
    count: u32,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let (network, tx, digest) = (network.clone(), tx.clone(), blob.digest.clone());
    async move {
        let mut request = SyncRequest::Have {
            digest: digest.clone(),
        };
        let mut failures = 0;
        let mut idle = IDLE_RETRY;
        let mut known = false;
        loop {
            match network.sync(peer, request.clone()).await {
                Ok(SyncResponse::Have(Some(have))) => {
                    failures = 0;
                    idle = IDLE_RETRY;
                    known = true;
                    let held = bitfield(&have, count).map_or(0, |b| b.count_ones());
                    let serves = have.serves.as_ref().map(|u| u.version);
                    if tx.send(Msg::Have(peer, Some(have))).await.is_err()
                        || (held == count && serves.is_none())
                    {
                        return;
                    }
                    request = SyncRequest::HaveWait {
                        digest: digest.clone(),
                        held,
                        serves: serves.unwrap_or(0),
                    };
                }
                Ok(SyncResponse::Have(None)) => {
                    failures = 0;
                    if std::mem::take(&mut known) && tx.send(Msg::Gone(peer)).await.is_err() {
                        return;
                    }
                    request = SyncRequest::Have {
                        digest: digest.clone(),
                    };
                    tokio::time::sleep(idle).await;
                    idle = (idle * 2).min(IDLE_RETRY_MAX);
                }
                _ => {
                    failures += 1;
                    if failures >= HAVE_FAILURES {
                        break;
                    }
                    tokio::time::sleep(HAVE_RETRY).await;
                }
            }
        }
        let _ = tx.send(Msg::Have(peer, None)).await;
    }
}

async fn request_chunk(
    network: Network,
    partial: Arc<Partial>,
    (peer, chunk): (PeerId, u32),
    client: Option<Box<ChunkClient>>,
    buffers: Buffers,
    tx: mpsc::Sender<Msg>,
) {
    let index = partial.index();
    let (outcome, client) = match index.chunk_range(chunk) {
        None => (ChunkOutcome::Failed, client),
        // Written by a request the plan gave up on (timed out or cancelled) after its bytes
        // arrived: nothing to fetch.
        Some(range) if partial.has(chunk) => (ChunkOutcome::Done(range.end - range.start), client),
        // Its hash is not known yet (the plan is never shown such a chunk).
        Some(_) if chunk >= partial.known_chunks() => (ChunkOutcome::Failed, client),
        Some(range) => {
            let fetch = |client| {
                let (network, partial, buffers) = (&network, &partial, &buffers);
                fetch_chunk(
                    network,
                    partial,
                    (peer, chunk),
                    range.clone(),
                    client,
                    buffers,
                )
            };
            let mut outcome = fetch(client).await;
            if let Err(true) = outcome {
                // A pooled stream failed: the serving side may have closed it as idle just as it
                // was reused. One retry on a fresh stream tells that apart from a failing peer.
                outcome = fetch(None).await;
            }
            outcome.unwrap_or((ChunkOutcome::Failed, None))
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

/// One attempt at `chunk` over `client` or a fresh stream. `Err(reused)`: the stream failed
/// (not the peer's answer), and whether it was a pooled one.
async fn fetch_chunk(
    network: &Network,
    partial: &Arc<Partial>,
    (peer, chunk): (PeerId, u32),
    range: std::ops::Range<u64>,
    client: Option<Box<ChunkClient>>,
    buffers: &Buffers,
) -> Result<(ChunkOutcome, Option<Box<ChunkClient>>), bool> {
    let reused = client.is_some();
    let mut c = match client {
        Some(c) => c,
        None => match ChunkClient::open(&mut network.control(), peer).await {
            Ok(c) => Box::new(c),
            Err(_) => return Ok((ChunkOutcome::Failed, None)),
        },
    };
    let mut buf = buffers.take();
    let fetched = c
        .fetch(
            partial.index().digest(),
            range.start,
            range.end - range.start,
            &mut buf,
        )
        .await;
    Ok(match fetched {
        Ok(true) => {
            // `write_chunk` checks the BLAKE3 hash before a byte is written.
            let p = partial.clone();
            let len = buf.len() as u64;
            let written = tokio::task::spawn_blocking(move || {
                let written = p.write_chunk(chunk, &buf);
                (written, buf)
            })
            .await;
            let written = written.map(|(written, buf)| {
                buffers.give(buf);
                written
            });
            match written {
                Ok(Ok(())) => (ChunkOutcome::Done(len), Some(c)),
                Ok(Err(StoreError::ChunkRejected { .. })) => (ChunkOutcome::Bad, None),
                Ok(Err(e)) => (ChunkOutcome::Local(e), Some(c)),
                // The write's thread was cancelled (the runtime is shutting down).
                Err(_) => (ChunkOutcome::Failed, Some(c)),
            }
        }
        Ok(false) => (ChunkOutcome::Failed, Some(c)),
        Err(NetError::Protocol(_)) => (ChunkOutcome::Bad, None),
        Err(NetError::Busy) => (ChunkOutcome::Busy, None),
        // A fresh stream the peer dropped unanswered: it is swamped, so rest it as if it had
        // said "busy" rather than count a failure (three failures would strike it out for the
        // whole download, though it may be the only peer with the blob).
        Err(NetError::Refused(_)) if !reused => (ChunkOutcome::Busy, None),
        Err(_) => return Err(reused),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_in_flight_fit_the_memory_budget() {
        const MIB: u32 = 1024 * 1024;
        assert_eq!(max_in_flight(256 * 1024), MAX_IN_FLIGHT);
        assert_eq!(max_in_flight(4 * MIB), 16);
        assert_eq!(max_in_flight(8 * MIB), 8);
        // The largest chunks an index may have still get a few requests at once.
        assert_eq!(max_in_flight(64 * MIB), MIN_IN_FLIGHT);
        assert_eq!(max_in_flight(0), MAX_IN_FLIGHT);
        for size in [64 * 1024, MIB, 3 * MIB, 4 * MIB] {
            let n = max_in_flight(size);
            assert!(
                n as u64 * u64::from(size) <= MAX_IN_FLIGHT_BYTES,
                "{size}: {n}"
            );
            assert_eq!(plan_config(1, size).max_in_flight, n);
        }
    }
}
