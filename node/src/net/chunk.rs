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
//! - A peer gets at most [`MAX_CHUNK_STREAMS_PER_PEER`] of the [`MAX_INBOUND_CHUNK_STREAMS`]
//!   streams; past its share it is told "busy" like everyone past the node-wide limit.
//! - What the server writes must drain: a write that makes no progress for [`STALL_TIMEOUT`]
//!   (a peer that asks for a chunk and never reads it) closes the stream and counts against the
//!   peer ([`Offence::Stalled`]); a frame over a chunk request's limit, or one that does not
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

use super::NetError;
use super::conduct::Offence;
use super::framing::{FrameError, read_frame, write_frame};
use super::handle::Shared;
use super::serve_log::{ServeLog, Start};
use crate::store::{Held, Store};

/// Most chunk streams served at once.
pub const MAX_INBOUND_CHUNK_STREAMS: usize = 64;
/// Most chunk streams served at once to one peer: as many as one download asks of one peer
/// at most (the plan's per-peer base of 4, times 4 for a peer faster than the median), a
/// quarter of [`MAX_INBOUND_CHUNK_STREAMS`].
pub const MAX_CHUNK_STREAMS_PER_PEER: usize = 16;
/// How long a write to a peer may make no progress at all before the stream is closed and the
/// peer is held to have stalled it. Generous: an honest peer on a slow, shared link still takes
/// some bytes every few seconds.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(10);
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

/// The peers being served, and the share of the server each holds.
#[derive(Default)]
struct Askers {
    peers: std::sync::Mutex<HashMap<PeerId, Asker>>,
}

/// One peer's streams, and its turn at the shared upload limit.
struct Asker {
    streams: usize,
    turn: Arc<tokio::sync::Mutex<()>>,
}

impl Askers {
    /// A stream for `peer`, if it holds fewer than [`MAX_CHUNK_STREAMS_PER_PEER`].
    fn admit(self: &Arc<Self>, peer: PeerId) -> Option<AskerSlot> {
        let mut peers = lock(&self.peers);
        let asker = peers.entry(peer).or_insert_with(|| Asker {
            streams: 0,
            turn: Arc::default(),
        });
        if asker.streams >= MAX_CHUNK_STREAMS_PER_PEER {
            return None;
        }
        asker.streams += 1;
        Some(AskerSlot {
            askers: self.clone(),
            peer,
            turn: asker.turn.clone(),
        })
    }

    /// How many streams `peer` holds.
    #[cfg(test)]
    fn streams(&self, peer: &PeerId) -> usize {
        lock(&self.peers).get(peer).map_or(0, |a| a.streams)
    }
}

/// One stream of a peer's share; given back when dropped.
struct AskerSlot {
    askers: Arc<Askers>,
    peer: PeerId,
    turn: Arc<tokio::sync::Mutex<()>>,
}

impl Drop for AskerSlot {
    fn drop(&mut self) {
        let mut peers = lock(&self.askers.peers);
        if let Some(asker) = peers.get_mut(&self.peer) {
            asker.streams = asker.streams.saturating_sub(1);
            if asker.streams == 0 {
                peers.remove(&self.peer);
            }
        }
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
    let limit = Arc::new(Semaphore::new(MAX_INBOUND_CHUNK_STREAMS));
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
        let admitted = askers.admit(peer).and_then(|slot| {
            limit
                .clone()
                .try_acquire_owned()
                .ok()
                .map(|permit| (slot, permit))
        });
        let Some((slot, permit)) = admitted else {
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
            let served = serve_stream(&shared.store, &shared.serving, &reader, &slot.turn, stream);
            if let Err(e) = served.await {
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
            drop((slot, permit));
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
    turn: &tokio::sync::Mutex<()>,
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
        let Some((file, size)) = store.open_blob(&request.digest).await? else {
            // A download in progress serves the chunks it already holds, piece by piece like
            // a file, so a busy seeder holds no whole chunk in memory per stream.
            let partial = store.partial_in_progress(&request.digest);
            match partial.filter(|p| p.covers(request.offset, request.length)) {
                Some(p) => {
                    let ok = ChunkResponse::Ok {
                        length: request.length,
                    };
                    answer(&mut stream, &ok).await?;
                    let held = Held::Partial(p);
                    send_range(&mut stream, &held, &request, &mut buf, serving, turn).await?;
                }
                None => answer(&mut stream, &ChunkResponse::NotFound).await?,
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
        let log = serving.log.for_stored(store, &request.digest, size).await?;
        let sending = match log.map(|log| log.start(request.offset, request.length)) {
            Some(Start::Declined) => {
                // Another peer is getting this chunk from here right now; the stream stays
                // open for this peer's next request.
                answer(&mut stream, &ChunkResponse::Busy).await?;
                continue;
            }
            Some(Start::Logged(sending)) => Some(sending),
            Some(Start::Unlogged) | None => None,
        };
        let ok = ChunkResponse::Ok {
            length: request.length,
        };
        answer(&mut stream, &ok).await?;
        let held = Held::Blob(file);
        send_range(&mut stream, &held, &request, &mut buf, serving, turn).await?;
        if let Some(sending) = sending {
            sending.finish();
        }
    }
}

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
/// async file adapter would make, and no allocation per piece). Each piece must drain (see
/// [`write_draining`]).
async fn send_range(
    stream: &mut Stream,
    held: &Held,
    request: &ChunkRequest,
    buf: &mut Vec<u8>,
    serving: &Serving,
    turn: &tokio::sync::Mutex<()>,
) -> Result<(), NetError> {
    let (mut pos, end) = (
        request.offset,
        request.offset.saturating_add(request.length),
    );
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
        serving.spend(n, turn).await;
        write_draining(stream, buf.get(..n).unwrap_or_default()).await?;
        pos += n as u64;
    }
    tokio::time::timeout(STALL_TIMEOUT, stream.flush())
        .await
        .map_err(|_| NetError::Timeout)??;
    Ok(())
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
            lock(&askers.peers).get(&hog).is_none(),
            "forgotten once idle"
        );
        assert!(askers.admit(hog).is_some());
        assert_eq!(askers.streams(&other), 1);
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
