//! The `/shoal/chunk/1` stream protocol: raw blob bytes between peers.
//!
//! A requester opens a stream and sends `ChunkRequest` frames one after another; for each, the
//! server answers with a `ChunkResponse` frame and, on `Ok { length }`, exactly `length` raw
//! bytes. Streams come from `libp2p-stream`, so bytes go from file to socket without being held
//! as whole messages. The server limits concurrent streams; past the limit a stream is refused,
//! and the requester tries another peer.
//!
//! No one peer can take the server over:
//!
//! - A peer gets at most its fair share of the [`MAX_INBOUND_CHUNK_STREAMS`] streams: the total
//!   split among the peers being served, never more than [`MAX_CHUNK_STREAMS_PER_PEER`] (see
//!   [`fair_share`]). Past its share it is told "busy". When every stream is taken, a peer below
//!   its share still gets one: the peer holding the most streams past its own share gives its
//!   oldest one up (it is closed). So however many streams a few peers (or a few peer IDs of one
//!   attacker) hold, a new asker is served at once.
//! - A peer has at most [`MAX_BYTES_IN_FLIGHT_PER_PEER`] asked for and not yet sent, all its
//!   streams together; a request past it is answered "busy" (the stream stays open).
//! - Every chunk has a send deadline ([`send_deadline`]: its length at a floor rate, and never
//!   less than a minimum): a chunk its asker does not take in time (a peer that reads a trickle)
//!   closes the stream and counts against the peer ([`Offence::Greedy`]). Time spent waiting for
//!   this node's own upload limit does not count. A write that makes no progress at all for
//!   [`STALL_TIMEOUT`] (a peer that asks and never reads) closes the stream sooner and counts
//!   more ([`Offence::Stalled`]); a frame over a chunk request's limit, or one that does not
//!   decode, closes it too ([`Offence::Malformed`]).
//! - Under an upload limit, askers take turns: each peer has at most one piece waiting for the
//!   shared rate limit at a time, so the upload is shared per peer, not per stream.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::{PeerId, Stream, StreamProtocol};
use shoal_protocol::Digest;
use shoal_protocol::codec;
use shoal_protocol::message::{CHUNK_PROTOCOL, ChunkRequest, ChunkResponse, MAX_CHUNK_FRAME_BYTES};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::NetError;
use super::conduct::Offence;
use super::framing::{FrameError, read_frame, write_frame};
use super::handle::Shared;
use super::serve_log::{self, ServeLog};
use crate::store::{Held, Store};

/// Most chunk streams served at once.
pub const MAX_INBOUND_CHUNK_STREAMS: usize = 64;
/// Most chunk streams served at once to one peer, however few others ask: as many as one
/// download asks of one peer at most (the plan's per-peer base of 4, times 4 for a peer faster
/// than the median), a quarter of [`MAX_INBOUND_CHUNK_STREAMS`]. With more askers a peer's share
/// is smaller ([`fair_share`]).
pub const MAX_CHUNK_STREAMS_PER_PEER: usize = 16;
/// Most bytes one peer may have asked for and not yet been sent, all its streams together: one
/// download's most (16 streams of 4 MiB, the largest chunk a blob's index picks by itself), and
/// one request of the largest size the protocol allows
/// ([`MAX_CHUNK_REQUEST_BYTES`](shoal_protocol::message::MAX_CHUNK_REQUEST_BYTES)), which is
/// always served to a peer that has nothing else in flight.
pub const MAX_BYTES_IN_FLIGHT_PER_PEER: u64 = 64 * 1024 * 1024;
/// How long a write to a peer may make no progress at all before the stream is closed and the
/// peer is held to have stalled it. Generous: an honest peer on a slow, shared link still takes
/// some bytes every few seconds.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The slowest a chunk may be taken on average, for its [`send_deadline`]. A 4 MiB chunk (the
/// largest a blob's index picks by itself) gets 64 s, more than the 60 s ([`CHUNK_TIMEOUT`]) its
/// requester waits for it: an honest requester on a slow link gives up on the chunk (closing the
/// stream, which costs it nothing here) before this node would judge it. A 10 Mbit/s link
/// (1.25 MB/s) is 19 streams at this rate, more than the 16 one peer may hold here; a 1 MiB/s
/// floor would strike such a peer as soon as it pulled on more than one stream.
pub const MIN_SEND_BYTES_PER_SEC: u64 = 64 * 1024;
/// The least time a chunk has to be taken, however small: a small chunk still shares its
/// requester's link with its other streams, and a round trip or two of a far link.
pub const MIN_SEND_TIME: Duration = Duration::from_secs(10);
/// How long a served stream may sit idle between requests. Short: an idle stream holds one of
/// the [`MAX_INBOUND_CHUNK_STREAMS`] permits, and a permit held by a requester that has moved on
/// to other peers is one a waiting requester cannot use (the fleet simulator shows long idle
/// timeouts slowing rollouts down: `simulations/README.md`).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long one chunk may take to arrive before the requester gives up on the peer.
pub const CHUNK_TIMEOUT: Duration = Duration::from_secs(60);
/// Copy buffer for serving.
const COPY_BUFFER_BYTES: usize = 256 * 1024;
/// Most refused streams being told "busy" at once; past it a stream is just dropped.
const MAX_BUSY_ANSWERS: usize = 256;
/// How long telling a refused stream "busy" may take.
const BUSY_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// The protocol id.
pub fn protocol() -> StreamProtocol {
    StreamProtocol::new(CHUNK_PROTOCOL)
}

/// What the chunk server sends to peers, and how fast it may.
#[derive(Debug, Default)]
pub struct Serving {
    /// Bytes of blobs sent to peers.
    pub served_bytes: std::sync::atomic::AtomicU64,
    /// Which chunks of whole blobs are being sent and were sent.
    pub log: ServeLog,
    limit: Option<RateLimit>,
}

impl Serving {
    /// Serving accounting, limited to `bytes_per_sec` if given.
    pub fn new(bytes_per_sec: Option<u64>) -> Serving {
        Serving {
            served_bytes: Default::default(),
            log: ServeLog::default(),
            limit: bytes_per_sec.filter(|r| *r > 0).map(RateLimit::new),
        }
    }

    /// Waits until `bytes` may be sent, taking `turn` (the asking peer's) first: each peer has
    /// at most one piece waiting at the shared limit, which serves them in turn.
    async fn spend(&self, bytes: usize, turn: &tokio::sync::Mutex<()>) {
        if let Some(l) = &self.limit {
            let _turn = turn.lock().await;
            l.acquire(bytes as u64).await;
        }
        self.served_bytes
            .fetch_add(bytes as u64, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A token bucket shared by every stream the node serves (one second of burst).
#[derive(Debug)]
struct RateLimit {
    bytes_per_sec: u64,
    state: tokio::sync::Mutex<(f64, tokio::time::Instant)>,
}

impl RateLimit {
    fn new(bytes_per_sec: u64) -> RateLimit {
        RateLimit {
            bytes_per_sec,
            state: tokio::sync::Mutex::new((bytes_per_sec as f64, tokio::time::Instant::now())),
        }
    }

    /// Waits until `n` bytes may be sent. Holding the lock while waiting queues senders fairly.
    async fn acquire(&self, n: u64) {
        let rate = self.bytes_per_sec as f64;
        let mut state = self.state.lock().await;
        let now = tokio::time::Instant::now();
        let (tokens, last) = *state;
        let mut tokens = (tokens + now.duration_since(last).as_secs_f64() * rate).min(rate);
        tokens -= n as f64;
        if tokens < 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(-tokens / rate)).await;
        }
        *state = (tokens, now);
    }
}

/// How long a chunk of `length` bytes may take to be sent: its length at
/// [`MIN_SEND_BYTES_PER_SEC`], and at least [`MIN_SEND_TIME`].
pub fn send_deadline(length: u64) -> Duration {
    Duration::from_secs_f64(length as f64 / MIN_SEND_BYTES_PER_SEC as f64).max(MIN_SEND_TIME)
}

/// A chunk its asker did not take within its [`send_deadline`]; the source of the
/// [`std::io::ErrorKind::TimedOut`] error that says so.
#[derive(Debug, thiserror::Error)]
#[error("{length} bytes were not taken within their send deadline of {deadline:?}")]
struct SendDeadlinePassed {
    length: u64,
    deadline: Duration,
}

impl SendDeadlinePassed {
    fn error(length: u64, deadline: Duration) -> NetError {
        let passed = SendDeadlinePassed { length, deadline };
        NetError::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, passed))
    }

    fn is(e: &std::io::Error) -> bool {
        e.get_ref()
            .is_some_and(|inner| inner.downcast_ref::<SendDeadlinePassed>().is_some())
    }
}

/// The most streams one of `askers` peers being served may hold: an equal part of
/// [`MAX_INBOUND_CHUNK_STREAMS`], at least one and at most [`MAX_CHUNK_STREAMS_PER_PEER`].
pub fn fair_share(askers: usize) -> usize {
    (MAX_INBOUND_CHUNK_STREAMS / askers.max(1)).clamp(1, MAX_CHUNK_STREAMS_PER_PEER)
}

/// The peers being served, and the share of the server each holds. It counts the streams
/// served, all peers together, so it is the node-wide limit too.
#[derive(Default)]
struct Askers {
    state: std::sync::Mutex<AskersState>,
}

#[derive(Default)]
struct AskersState {
    /// Every peer holding a stream.
    peers: HashMap<PeerId, Asker>,
    /// Streams held, all peers together.
    streams: usize,
    /// The id of the next stream admitted.
    next: u64,
}

/// One peer's streams, its bytes in flight, and its turn at the shared upload limit.
struct Asker {
    /// The streams it holds, oldest first, each with the token that closes it to make room.
    streams: Vec<(u64, CancellationToken)>,
    /// Bytes asked for and not yet sent, all its streams together.
    bytes: u64,
    turn: Arc<tokio::sync::Mutex<()>>,
}

impl Askers {
    /// A stream for `peer`, if it holds fewer than its [`fair_share`]. When every stream is
    /// taken, the peer holding the most past its share gives its oldest one up (its token is
    /// cancelled); if no peer holds more than its share, `None`.
    fn admit(self: &Arc<Self>, peer: PeerId) -> Option<AskerSlot> {
        let mut state = lock(&self.state);
        let AskersState {
            peers,
            streams,
            next,
        } = &mut *state;
        let share = fair_share(peers.len() + usize::from(!peers.contains_key(&peer)));
        if peers.get(&peer).is_some_and(|a| a.streams.len() >= share) {
            return None;
        }
        if *streams >= MAX_INBOUND_CHUNK_STREAMS {
            let (_, greediest) = peers
                .iter_mut()
                .filter(|(p, _)| **p != peer)
                .max_by_key(|(_, a)| a.streams.len())
                .filter(|(_, a)| a.streams.len() > share)?;
            // The oldest: most likely one the requester pooled, which it retries once on a
            // fresh stream (told "busy" then) before it counts a failure against this node.
            let (_, evicted) = greediest.streams.remove(0);
            evicted.cancel();
            *streams -= 1;
        }
        let (id, evicted) = (*next, CancellationToken::new());
        *next += 1;
        *streams += 1;
        let asker = peers.entry(peer).or_insert_with(|| Asker {
            streams: Vec::new(),
            bytes: 0,
            turn: Arc::default(),
        });
        asker.streams.push((id, evicted.clone()));
        Some(AskerSlot {
            askers: self.clone(),
            peer,
            id,
            turn: asker.turn.clone(),
            evicted,
        })
    }

    /// How many streams `peer` holds.
    #[cfg(test)]
    fn streams(&self, peer: &PeerId) -> usize {
        lock(&self.state)
            .peers
            .get(peer)
            .map_or(0, |a| a.streams.len())
    }

    /// Forgets `peer` once it holds no stream and no bytes in flight.
    fn forget_if_idle(peers: &mut HashMap<PeerId, Asker>, peer: &PeerId) {
        if peers
            .get(peer)
            .is_some_and(|a| a.streams.is_empty() && a.bytes == 0)
        {
            peers.remove(peer);
        }
    }
}

/// One stream of a peer's share; given back when dropped.
struct AskerSlot {
    askers: Arc<Askers>,
    peer: PeerId,
    id: u64,
    turn: Arc<tokio::sync::Mutex<()>>,
    /// Cancelled when the stream is closed to make room for another asker.
    evicted: CancellationToken,
}

impl AskerSlot {
    /// Takes `bytes` of the peer's [`MAX_BYTES_IN_FLIGHT_PER_PEER`], if they fit (or if the peer
    /// has nothing else in flight: one request of any size the protocol allows is served).
    fn reserve(&self, bytes: u64) -> Option<InFlight<'_>> {
        let mut state = lock(&self.askers.state);
        let asker = state.peers.get_mut(&self.peer)?;
        if asker.bytes > 0 && asker.bytes.saturating_add(bytes) > MAX_BYTES_IN_FLIGHT_PER_PEER {
            return None;
        }
        asker.bytes = asker.bytes.saturating_add(bytes);
        Some(InFlight { slot: self, bytes })
    }
}

impl Drop for AskerSlot {
    fn drop(&mut self) {
        let mut state = lock(&self.askers.state);
        let AskersState { peers, streams, .. } = &mut *state;
        if let Some(asker) = peers.get_mut(&self.peer) {
            // Not there if it was given up to make room (and counted off then).
            if let Some(i) = asker.streams.iter().position(|(id, _)| *id == self.id) {
                asker.streams.remove(i);
                *streams = streams.saturating_sub(1);
            }
        }
        Askers::forget_if_idle(peers, &self.peer);
    }
}

/// Bytes of a peer's budget taken by one request, given back as they are sent.
struct InFlight<'a> {
    slot: &'a AskerSlot,
    bytes: u64,
}

impl InFlight<'_> {
    /// `n` of the bytes were sent.
    fn sent(&mut self, n: u64) {
        let n = n.min(self.bytes);
        self.bytes -= n;
        let mut state = lock(&self.slot.askers.state);
        if let Some(asker) = state.peers.get_mut(&self.slot.peer) {
            asker.bytes = asker.bytes.saturating_sub(n);
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut state = lock(&self.slot.askers.state);
        if let Some(asker) = state.peers.get_mut(&self.slot.peer) {
            asker.bytes = asker.bytes.saturating_sub(self.bytes);
        }
        Askers::forget_if_idle(&mut state.peers, &self.slot.peer);
    }
}

/// Locks a mutex, going on if a panic poisoned it: every update leaves the map consistent.
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Why serving a stream ended early, and what it says of the peer.
fn offence_of(e: &NetError) -> Option<Offence> {
    match e {
        NetError::Timeout => Some(Offence::Stalled),
        NetError::Io(io) if SendDeadlinePassed::is(io) => Some(Offence::Greedy),
        NetError::Io(io) if FrameError::is_too_large(io) => Some(Offence::Malformed),
        NetError::Codec(_) => Some(Offence::Malformed),
        _ => None,
    }
}

/// Accepts and serves chunk streams until `cancel` fires. Each stream is served by a task of
/// the server's own; they are aborted when the server stops.
///
/// In a fleet, a stream from a peer that has not proved membership is dropped unanswered, and a
/// blob only private repositories name is served only to peers that may read one of them (to
/// others it is `NotFound`, as if this node did not have it). A peer that stalls a stream or
/// sends a malformed request is reported to the node's [`conduct`](super::conduct).
pub(super) async fn serve(
    mut control: libp2p_stream::Control,
    shared: Arc<Shared>,
    cancel: tokio_util::sync::CancellationToken,
) {
    let mut incoming = match control.accept(protocol()) {
        Ok(i) => i,
        Err(e) => {
            tracing::error!(
                error = &e as &dyn std::error::Error,
                "cannot accept chunk streams"
            );
            return;
        }
    };
    let auth = shared.auth.clone();
    let askers = Arc::new(Askers::default());
    let busy_answers = Arc::new(Semaphore::new(MAX_BUSY_ANSWERS));
    let mut streams = JoinSet::new();
    loop {
        let next = tokio::select! {
            () = cancel.cancelled() => break,
            next = incoming.next() => next,
            Some(_) = streams.join_next(), if !streams.is_empty() => continue,
        };
        let Some((peer, stream)) = next else { break };
        if auth.in_fleet() && !super::publisher_of(&peer).is_some_and(|k| auth.admits(&k)) {
            tracing::debug!(%peer, "dropping a chunk stream from a peer that is not a member");
            continue;
        }
        if shared.conduct.is_banned(&peer) {
            continue;
        }
        let Some(slot) = askers.admit(peer) else {
            tracing::debug!(%peer, "refusing a chunk stream: too many in flight");
            // Say so, so the requester rests this node instead of counting a failure.
            if let Ok(permit) = busy_answers.clone().try_acquire_owned() {
                let mut stream = stream;
                streams.spawn(async move {
                    let answer = async {
                        // The request is read first, so the answer cannot race it.
                        read_frame(&mut stream, MAX_CHUNK_FRAME_BYTES).await?;
                        write_frame(&mut stream, &codec::encode(&ChunkResponse::Busy)?).await?;
                        stream.close().await?;
                        Ok::<_, NetError>(())
                    };
                    let _ = tokio::time::timeout(BUSY_ANSWER_TIMEOUT, answer).await;
                    drop(permit);
                });
            }
            continue;
        };
        let shared = shared.clone();
        let reader = super::sync::Reader::of(&auth, &peer);
        streams.spawn(async move {
            let served = serve_stream(&shared.store, &shared.serving, &reader, &slot, stream);
            let served = tokio::select! {
                served = served => served,
                // Dropping the stream resets it; the peer asks another one or again later.
                () = slot.evicted.cancelled() => {
                    tracing::debug!(%peer, "closing a chunk stream to make room for another asker");
                    Ok(())
                }
            };
            if let Err(e) = served {
                match offence_of(&e) {
                    Some(offence) => {
                        tracing::debug!(%peer, ?offence, error = &e as &dyn std::error::Error, "closing a chunk stream: the peer misbehaved");
                        shared.conduct.report(peer, offence);
                    }
                    None => {
                        tracing::debug!(%peer, error = &e as &dyn std::error::Error, "chunk stream ended with an error");
                    }
                }
            }
            drop(slot);
        });
    }
    streams.shutdown().await;
}

/// Writes one answer frame; [`NetError::Timeout`] if it does not drain within [`STALL_TIMEOUT`].
async fn answer(stream: &mut Stream, response: &ChunkResponse) -> Result<(), NetError> {
    let frame = codec::encode(response)?;
    tokio::time::timeout(STALL_TIMEOUT, write_frame(stream, &frame))
        .await
        .map_err(|_| NetError::Timeout)??;
    Ok(())
}

async fn serve_stream(
    store: &Store,
    serving: &Serving,
    reader: &super::sync::Reader,
    slot: &AskerSlot,
    mut stream: Stream,
) -> Result<(), NetError> {
    // One copy buffer for the stream's life, not one per request.
    let mut buf = Vec::new();
    // A stream asks for chunks of one blob after another: the last answer is kept.
    let mut readable: Option<(Digest, bool)> = None;
    loop {
        let read = read_frame(&mut stream, MAX_CHUNK_FRAME_BYTES);
        let frame = match tokio::time::timeout(IDLE_TIMEOUT, read).await {
            Err(_) => return Ok(()),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(r) => r?,
        };
        let request: ChunkRequest = match codec::decode(&frame) {
            Ok(r) => r,
            Err(e) => {
                let reply = ChunkResponse::Invalid(format!("bad request: {e}"));
                answer(&mut stream, &reply).await?;
                return Err(e.into());
            }
        };
        if let Err(e) = request.validate() {
            answer(&mut stream, &ChunkResponse::Invalid(e.to_string())).await?;
            continue;
        }
        let may_have = match &readable {
            Some((d, ok)) if *d == request.digest => *ok,
            _ => {
                let ok = reader.may_have(store, &request.digest).await?;
                readable = Some((request.digest.clone(), ok));
                ok
            }
        };
        if !may_have {
            answer(&mut stream, &ChunkResponse::NotFound).await?;
            continue;
        }
        // A download in progress first: it is in memory, where a stored blob is a file opened
        // on the blocking pool (a thread hop per request, which most requests in a swarm, to
        // nodes still downloading, would pay for nothing). A download whose blob is stored is
        // not live, and one that lacks the chunk leaves the request to the stored blob.
        let covers =
            |p: &Arc<crate::store::partial::Partial>| p.covers(request.offset, request.length);
        let live = store.live_partial(&request.digest).filter(covers);
        let opened = match live {
            Some(_) => None,
            None => store.open_blob(&request.digest).await?,
        };
        let Some((file, size)) = opened else {
            // A download in progress serves the chunks it already holds, piece by piece like
            // a file, so a busy seeder holds no whole chunk in memory per stream. (One whose
            // blob is installed but not indexed yet, while it is being finished, too.)
            let partial =
                live.or_else(|| store.partial_in_progress(&request.digest).filter(covers));
            let Some(p) = partial else {
                answer(&mut stream, &ChunkResponse::NotFound).await?;
                continue;
            };
            let Some(mut in_flight) = slot.reserve(request.length) else {
                answer(&mut stream, &ChunkResponse::Busy).await?;
                continue;
            };
            // A blob this node fetches from an upstream enters the fleet here: its sends are
            // logged as a seeder's are, so the fleet takes each chunk from here about once.
            let log = serving.log.for_upstream_fetch(&p);
            // While it grows, a chunk among the newest leaves here once: the peer that got it
            // passes it on, and the upstream's link, as fast as this node's, leaves this node's
            // uplink no room for second copies. An older chunk may leave again, so that a peer
            // that takes the one copy and passes nothing on delays the fleet by a few chunks.
            let newest = u64::from(
                p.progress()
                    .borrow()
                    .contiguous
                    .saturating_sub(ONE_COPY_WINDOW_CHUNKS),
            ) * u64::from(p.index().chunk_size());
            if log.is_some()
                && request.offset >= newest
                && p.was_sent(request.offset, request.length)
            {
                answer(&mut stream, &ChunkResponse::Busy).await?;
                continue;
            }
            let Ok(sending) = serve_log::begin(log, request.offset, request.length) else {
                answer(&mut stream, &ChunkResponse::Busy).await?;
                continue;
            };
            let ok = ChunkResponse::Ok {
                length: request.length,
            };
            answer(&mut stream, &ok).await?;
            let held = Held::Partial(p.clone());
            let sent = send_range(
                &mut stream,
                &held,
                &request,
                &mut buf,
                serving,
                &mut in_flight,
            );
            sent.await?;
            if let Some(sending) = sending {
                sending.finish();
                p.mark_sent(request.offset, request.length);
            }
            continue;
        };
        let end = request.offset.saturating_add(request.length);
        if end > size {
            let reply =
                ChunkResponse::Invalid(format!("range ends at {end}, blob is {size} bytes"));
            answer(&mut stream, &reply).await?;
            continue;
        }
        // Past its budget, the peer is busy for this request: the stream stays open.
        let Some(mut in_flight) = slot.reserve(request.length) else {
            answer(&mut stream, &ChunkResponse::Busy).await?;
            continue;
        };
        let log = serving.log.for_stored(store, &request.digest, size).await?;
        let Ok(sending) = serve_log::begin(log, request.offset, request.length) else {
            // Another peer is getting this chunk from here right now; the stream stays open
            // for this peer's next request.
            answer(&mut stream, &ChunkResponse::Busy).await?;
            continue;
        };
        let ok = ChunkResponse::Ok {
            length: request.length,
        };
        answer(&mut stream, &ok).await?;
        let held = Held::Blob(file);
        let sent = send_range(
            &mut stream,
            &held,
            &request,
            &mut buf,
            serving,
            &mut in_flight,
        );
        sent.await?;
        if let Some(sending) = sending {
            sending.finish();
        }
    }
}

/// The newest chunks of a blob this node fetches from an upstream that it sends to one peer only
/// (see the partial path of the chunk server).
const ONE_COPY_WINDOW_CHUNKS: u32 = 32;

/// Writes all of `bytes`; [`NetError::Timeout`] if any [`STALL_TIMEOUT`] passes with none of
/// them taken (the peer does not read).
async fn write_draining(stream: &mut Stream, mut bytes: &[u8]) -> Result<(), NetError> {
    while !bytes.is_empty() {
        let n = tokio::time::timeout(STALL_TIMEOUT, stream.write(bytes))
            .await
            .map_err(|_| NetError::Timeout)??;
        if n == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into());
        }
        bytes = bytes.get(n..).unwrap_or_default();
    }
    Ok(())
}

/// Sends the bytes `request` asks for, read from `held` into `buf` a piece at a time on the
/// blocking pool (positioned reads straight into the stream's one buffer: no second copy, as an
/// async file adapter would make, and no allocation per piece), giving them back to the peer's
/// budget as they go. Each piece must drain (see [`write_draining`]), and all of them within the
/// request's [`send_deadline`], not counting the waits for the node's upload limit.
async fn send_range(
    stream: &mut Stream,
    held: &Held,
    request: &ChunkRequest,
    buf: &mut Vec<u8>,
    serving: &Serving,
    in_flight: &mut InFlight<'_>,
) -> Result<(), NetError> {
    let (mut pos, end) = (
        request.offset,
        request.offset.saturating_add(request.length),
    );
    let deadline = send_deadline(request.length);
    let mut left = deadline;
    let passed = || SendDeadlinePassed::error(request.length, deadline);
    buf.resize(COPY_BUFFER_BYTES, 0);
    while pos < end {
        let n = usize::try_from(end - pos)
            .unwrap_or(usize::MAX)
            .min(COPY_BUFFER_BYTES);
        let (source, mut piece) = (held.clone(), std::mem::take(buf));
        let (read, piece) = tokio::task::spawn_blocking(move || {
            let read = piece.get_mut(..n).map(|p| source.read_at(pos, p));
            (read, piece)
        })
        .await?;
        *buf = piece;
        read.ok_or_else(|| std::io::Error::other("copy buffer shorter than a piece"))??;
        serving.spend(n, &in_flight.slot.turn).await;
        let piece = write_draining(stream, buf.get(..n).unwrap_or_default());
        within(&mut left, piece).await.ok_or_else(passed)??;
        in_flight.sent(n as u64);
        pos += n as u64;
    }
    let flush = async {
        tokio::time::timeout(STALL_TIMEOUT, stream.flush())
            .await
            .map_err(|_| NetError::Timeout)?
            .map_err(NetError::from)
    };
    within(&mut left, flush).await.ok_or_else(passed)?
}

/// Runs `write` within `left`, and counts the time it took off `left`; `None` if it ran out.
async fn within<T>(left: &mut Duration, write: impl Future<Output = T>) -> Option<T> {
    let started = tokio::time::Instant::now();
    let written = tokio::time::timeout(*left, write).await;
    *left = left.saturating_sub(started.elapsed());
    written.ok()
}

/// A chunk stream to one peer, for sequential requests.
pub struct ChunkClient {
    peer: PeerId,
    stream: Stream,
}

impl ChunkClient {
    /// Opens a chunk stream to `peer`.
    pub async fn open(
        control: &mut libp2p_stream::Control,
        peer: PeerId,
    ) -> Result<ChunkClient, NetError> {
        let stream = tokio::time::timeout(CHUNK_TIMEOUT, control.open_stream(peer, protocol()))
            .await
            .map_err(|_| NetError::Timeout)??;
        Ok(ChunkClient { peer, stream })
    }

    /// The peer.
    pub fn peer(&self) -> PeerId {
        self.peer
    }

    /// Asks for `length` bytes at `offset` of `digest` and reads them into `buf`, resized to
    /// `length` (a reused buffer of that length is overwritten, not zeroed first). `Ok(false)`
    /// means the peer does not have the blob. The caller bounds `length`.
    pub async fn fetch(
        &mut self,
        digest: &Digest,
        offset: u64,
        length: u64,
        buf: &mut Vec<u8>,
    ) -> Result<bool, NetError> {
        let request = ChunkRequest {
            digest: digest.clone(),
            offset,
            length,
        };
        request.validate().map_err(NetError::BadRequest)?;
        let work = async {
            let frame = codec::encode(&request)?;
            let answer = async {
                write_frame(&mut self.stream, &frame).await?;
                read_frame(&mut self.stream, MAX_CHUNK_FRAME_BYTES).await
            };
            let response: ChunkResponse = match answer.await {
                Ok(answer) => codec::decode(&answer)?,
                // A malformed frame header is the peer's fault.
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => return Err(e.into()),
                // Reset or closed before any answer: libp2p-stream drops an inbound stream when
                // the server's queue of new streams is full, as it is when a flood of requests
                // outruns the task that accepts them.
                Err(e) => return Err(NetError::Refused(e)),
            };
            match response {
                ChunkResponse::Ok { length: l } if l == length => {}
                ChunkResponse::Ok { length: l } => {
                    return Err(NetError::Protocol(format!(
                        "peer offered {l} bytes, asked for {length}"
                    )));
                }
                ChunkResponse::NotFound => return Ok(false),
                ChunkResponse::Busy => return Err(NetError::Busy),
                ChunkResponse::Invalid(why) => return Err(NetError::Protocol(why)),
            }
            let len = usize::try_from(length)
                .map_err(|_| NetError::Protocol(format!("{length} bytes do not fit in memory")))?;
            buf.resize(len, 0);
            self.stream.read_exact(buf).await?;
            Ok(true)
        };
        tokio::time::timeout(CHUNK_TIMEOUT, work)
            .await
            .map_err(|_| NetError::Timeout)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_holds_at_most_its_share_of_the_streams() {
        let askers = Arc::new(Askers::default());
        let (hog, other) = (PeerId::random(), PeerId::random());
        let held: Vec<AskerSlot> = (0..MAX_CHUNK_STREAMS_PER_PEER)
            .map(|_| askers.admit(hog).expect("within its share"))
            .collect();
        assert!(askers.admit(hog).is_none(), "past its share");
        let theirs = askers.admit(other).expect("another peer has its own share");
        assert!(
            Arc::ptr_eq(&held[0].turn, &held[1].turn),
            "one turn per peer"
        );
        assert!(!Arc::ptr_eq(&held[0].turn, &theirs.turn));
        drop(held);
        assert_eq!(askers.streams(&hog), 0);
        assert!(
            !lock(&askers.state).peers.contains_key(&hog),
            "forgotten once idle"
        );
        assert!(askers.admit(hog).is_some());
        assert_eq!(askers.streams(&other), 1);
    }

    #[test]
    fn a_peers_share_shrinks_as_more_peers_ask() {
        assert_eq!(fair_share(1), MAX_CHUNK_STREAMS_PER_PEER);
        assert_eq!(fair_share(4), 16);
        assert_eq!(fair_share(5), 12);
        assert_eq!(fair_share(16), 4);
        assert_eq!(fair_share(1000), 1, "everyone gets one");
    }

    /// Every stream held by four peers (an attacker's four IDs, say): a fifth peer still gets
    /// its share at once, from the greediest, and they cannot take it back.
    #[test]
    fn a_new_asker_gets_its_share_when_a_few_peers_hold_every_stream() {
        let askers = Arc::new(Askers::default());
        let hogs: Vec<PeerId> = (0..4).map(|_| PeerId::random()).collect();
        let mut held: Vec<AskerSlot> = Vec::new();
        for hog in &hogs {
            for _ in 0..MAX_CHUNK_STREAMS_PER_PEER {
                held.push(askers.admit(*hog).expect("within its share"));
            }
        }
        assert_eq!(lock(&askers.state).streams, MAX_INBOUND_CHUNK_STREAMS);
        assert!(askers.admit(hogs[0]).is_none(), "every stream is taken");
        let newcomer = PeerId::random();
        let share = fair_share(5);
        let theirs: Vec<AskerSlot> = (0..share)
            .map(|_| askers.admit(newcomer).expect("room is made"))
            .collect();
        assert!(askers.admit(newcomer).is_none(), "past its share");
        assert_eq!(lock(&askers.state).streams, MAX_INBOUND_CHUNK_STREAMS);
        let evicted = held.iter().filter(|s| s.evicted.is_cancelled()).count();
        assert_eq!(evicted, share, "one stream given up for each admitted");
        for hog in &hogs {
            let n = askers.streams(hog);
            assert!((share..=share + 1).contains(&n), "{n} streams left");
            assert!(
                askers.admit(*hog).is_none(),
                "a hog past its share gets none back"
            );
        }
        // A closed stream is counted off once, not again when its task ends.
        drop(held);
        assert_eq!(lock(&askers.state).streams, share);
        assert!(theirs.iter().all(|s| !s.evicted.is_cancelled()));
    }

    /// When every peer holds no more than its share, a full server refuses newcomers rather
    /// than take a stream from anyone.
    #[test]
    fn no_stream_is_taken_from_a_peer_within_its_share() {
        let askers = Arc::new(Askers::default());
        let peers: Vec<PeerId> = (0..MAX_INBOUND_CHUNK_STREAMS)
            .map(|_| PeerId::random())
            .collect();
        let held: Vec<AskerSlot> = peers
            .iter()
            .map(|p| askers.admit(*p).expect("one each"))
            .collect();
        assert!(askers.admit(PeerId::random()).is_none());
        assert!(held.iter().all(|s| !s.evicted.is_cancelled()));
    }

    #[test]
    fn a_peers_bytes_in_flight_are_bounded_across_its_streams() {
        let askers = Arc::new(Askers::default());
        let (greedy, other) = (PeerId::random(), PeerId::random());
        let (a, b) = (askers.admit(greedy).unwrap(), askers.admit(greedy).unwrap());
        let half = MAX_BYTES_IN_FLIGHT_PER_PEER / 2;
        let mut first = a.reserve(half).expect("within the budget");
        let second = b.reserve(half).expect("within the budget");
        assert!(
            a.reserve(1).is_none(),
            "past the budget, on any of its streams"
        );
        // Another peer has its own budget.
        let theirs = askers.admit(other).unwrap();
        assert!(theirs.reserve(MAX_BYTES_IN_FLIGHT_PER_PEER).is_some());
        // Bytes sent are given back as they go.
        first.sent(1024);
        assert!(b.reserve(1024).is_some());
        assert!(b.reserve(1025).is_none());
        drop((first, second));
        // One request of the largest size is served to a peer with nothing else in flight.
        let largest = shoal_protocol::message::MAX_CHUNK_REQUEST_BYTES;
        let whole = a.reserve(largest).expect("the largest request");
        assert!(b.reserve(1).is_none());
        drop(whole);
        drop((a, b));
        assert!(!lock(&askers.state).peers.contains_key(&greedy));
    }

    #[test]
    fn a_chunks_send_deadline_outlasts_its_requesters_own_timeout() {
        let largest_auto = u64::from(shoal_protocol::blob_index::MAX_AUTO_CHUNK_SIZE_BYTES);
        assert!(send_deadline(largest_auto) > CHUNK_TIMEOUT);
        assert_eq!(send_deadline(1), MIN_SEND_TIME);
        // A 10 Mbit/s link takes the largest share of one peer, all at once, in time.
        let link_bytes_per_sec = 10_000_000 / 8;
        let per_stream = link_bytes_per_sec / MAX_CHUNK_STREAMS_PER_PEER as u64;
        assert!(per_stream > MIN_SEND_BYTES_PER_SEC);
    }

    #[test]
    fn stalls_and_bad_frames_count_against_the_peer_and_nothing_else_does() {
        let too_large = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            FrameError::TooLarge(codec::CodecError::FrameTooLarge {
                len: 5000,
                max: 4096,
            }),
        );
        assert_eq!(offence_of(&NetError::Timeout), Some(Offence::Stalled));
        assert_eq!(
            offence_of(&SendDeadlinePassed::error(4096, MIN_SEND_TIME)),
            Some(Offence::Greedy)
        );
        assert_eq!(
            offence_of(&NetError::Io(too_large)),
            Some(Offence::Malformed)
        );
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert_eq!(offence_of(&NetError::Io(reset)), None);
        assert_eq!(offence_of(&NetError::Busy), None);
    }

    #[tokio::test]
    async fn askers_take_turns_at_the_upload_limit() {
        // 64 KiB a second, one second of burst spent: every piece waits its turn.
        let serving = Arc::new(Serving::new(Some(64 * 1024)));
        serving.spend(64 * 1024, &tokio::sync::Mutex::new(())).await;
        let askers = Arc::new(Askers::default());
        let (hog, other) = (PeerId::random(), PeerId::random());
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = JoinSet::new();
        // The hog queues four streams' pieces before the other peer queues one.
        for (peer, n) in [(hog, 4), (other, 1)] {
            for _ in 0..n {
                let slot = askers.admit(peer).unwrap();
                let (serving, order) = (serving.clone(), order.clone());
                tasks.spawn(async move {
                    serving.spend(8 * 1024, &slot.turn).await;
                    lock(&order).push(peer);
                });
                tokio::task::yield_now().await;
            }
        }
        while tasks.join_next().await.is_some() {}
        let order = lock(&order).clone();
        let other_at = order.iter().position(|p| *p == other).unwrap();
        assert!(
            other_at <= 1,
            "the other peer waited behind the hog's streams: {order:?}"
        );
    }
}
