//! The `/shoal/chunk/1` stream protocol: raw blob bytes between peers.
//!
//! A requester opens a stream and sends `ChunkRequest` frames one after another; for each, the
//! server answers with a `ChunkResponse` frame and, on `Ok { length }`, exactly `length` raw
//! bytes. Streams come from `libp2p-stream`, so bytes go from file to socket without being held
//! as whole messages. The server limits concurrent streams; past the limit a stream is refused,
//! and the requester tries another peer.

use std::sync::Arc;
use std::time::Duration;

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::{PeerId, Stream, StreamProtocol};
use shoal_protocol::Digest;
use shoal_protocol::codec;
use shoal_protocol::message::{CHUNK_PROTOCOL, ChunkRequest, ChunkResponse};
use tokio::sync::Semaphore;

use super::NetError;
use super::sync::{read_frame, write_frame};
use super::upload_log::{Start, UploadLog};
use crate::store::{Held, Store};

/// Most chunk streams served at once.
pub const MAX_INBOUND_CHUNK_STREAMS: usize = 64;
/// How long a served stream may sit idle between requests. Short: an idle stream holds one of
/// the [`MAX_INBOUND_CHUNK_STREAMS`] permits, and a permit held by a requester that has moved on
/// to other peers is one a waiting requester cannot use (the simulations show rollouts of 100
/// nodes taking twice as long with 30 s as with 1 s).
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

/// What the chunk server did, and how fast it may do it.
#[derive(Debug, Default)]
pub struct Uploads {
    /// Bytes of blobs sent to peers.
    pub served_bytes: std::sync::atomic::AtomicU64,
    /// Which chunks of whole blobs are being sent and were sent.
    pub log: UploadLog,
    limit: Option<RateLimit>,
}

impl Uploads {
    /// Upload accounting, limited to `bytes_per_sec` if given.
    pub fn new(bytes_per_sec: Option<u64>) -> Uploads {
        Uploads {
            served_bytes: Default::default(),
            log: UploadLog::default(),
            limit: bytes_per_sec.filter(|r| *r > 0).map(RateLimit::new),
        }
    }

    async fn spend(&self, bytes: usize) {
        if let Some(l) = &self.limit {
            l.acquire(bytes as u64).await;
        }
        self.served_bytes
            .fetch_add(bytes as u64, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A token bucket shared by every upload stream of the node (one second of burst).
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

/// Accepts and serves chunk streams until `cancel` fires.
pub async fn serve(
    mut control: libp2p_stream::Control,
    store: Store,
    uploads: Arc<Uploads>,
    cancel: tokio_util::sync::CancellationToken,
) {
    let mut incoming = match control.accept(protocol()) {
        Ok(i) => i,
        Err(e) => {
            tracing::error!(error = %e, "cannot accept chunk streams");
            return;
        }
    };
    let limit = Arc::new(Semaphore::new(MAX_INBOUND_CHUNK_STREAMS));
    let busy_answers = Arc::new(Semaphore::new(MAX_BUSY_ANSWERS));
    loop {
        let next = tokio::select! {
            () = cancel.cancelled() => return,
            next = incoming.next() => next,
        };
        let Some((peer, stream)) = next else { return };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "refusing a chunk stream: too many in flight");
            // Say so, so the requester rests this node instead of counting a failure.
            if let Ok(permit) = busy_answers.clone().try_acquire_owned() {
                let mut stream = stream;
                tokio::spawn(async move {
                    let answer = async {
                        // The request is read first, so the answer cannot race it.
                        read_frame(&mut stream).await?;
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
        let (store, uploads) = (store.clone(), uploads.clone());
        tokio::spawn(async move {
            if let Err(e) = serve_stream(&store, &uploads, stream).await {
                tracing::debug!(%peer, error = %e, "chunk stream ended with an error");
            }
            drop(permit);
        });
    }
}

async fn serve_stream(
    store: &Store,
    uploads: &Uploads,
    mut stream: Stream,
) -> Result<(), NetError> {
    // One copy buffer for the stream's life, not one per request.
    let mut buf = Vec::new();
    loop {
        let frame = match tokio::time::timeout(IDLE_TIMEOUT, read_frame(&mut stream)).await {
            Err(_) => return Ok(()),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(r) => r?,
        };
        let request: ChunkRequest = match codec::decode(&frame) {
            Ok(r) => r,
            Err(e) => {
                let answer = ChunkResponse::Invalid(format!("bad request: {e}"));
                write_frame(&mut stream, &codec::encode(&answer)?).await?;
                return Ok(());
            }
        };
        if let Err(e) = request.validate() {
            write_frame(
                &mut stream,
                &codec::encode(&ChunkResponse::Invalid(e.to_string()))?,
            )
            .await?;
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
                    write_frame(&mut stream, &codec::encode(&ok)?).await?;
                    let held = Held::Partial(p);
                    send_range(&mut stream, &held, &request, &mut buf, uploads).await?;
                }
                None => write_frame(&mut stream, &codec::encode(&ChunkResponse::NotFound)?).await?,
            }
            continue;
        };
        let end = request.offset.saturating_add(request.length);
        if end > size {
            let answer =
                ChunkResponse::Invalid(format!("range ends at {end}, blob is {size} bytes"));
            write_frame(&mut stream, &codec::encode(&answer)?).await?;
            continue;
        }
        let log = uploads.log.for_stored(store, &request.digest, size).await?;
        let sending = match log.map(|log| log.start(request.offset, request.length)) {
            Some(Start::Declined) => {
                // Another peer is getting this chunk from here right now; the stream stays
                // open for this peer's next request.
                write_frame(&mut stream, &codec::encode(&ChunkResponse::Busy)?).await?;
                continue;
            }
            Some(Start::Logged(sending)) => Some(sending),
            Some(Start::Unlogged) | None => None,
        };
        write_frame(
            &mut stream,
            &codec::encode(&ChunkResponse::Ok {
                length: request.length,
            })?,
        )
        .await?;
        send_range(&mut stream, &Held::Blob(file), &request, &mut buf, uploads).await?;
        if let Some(sending) = sending {
            sending.finish();
        }
    }
}

/// Sends the bytes `request` asks for, read from `held` into `buf` a piece at a time on the
/// blocking pool (positioned reads straight into the stream's one buffer: no second copy, as an
/// async file adapter would make, and no allocation per piece).
async fn send_range(
    stream: &mut Stream,
    held: &Held,
    request: &ChunkRequest,
    buf: &mut Vec<u8>,
    uploads: &Uploads,
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
        .await
        .map_err(|e| NetError::Protocol(e.to_string()))?;
        *buf = piece;
        read.ok_or_else(|| NetError::Protocol("copy buffer".into()))??;
        uploads.spend(n).await;
        stream.write_all(buf.get(..n).unwrap_or_default()).await?;
        pos += n as u64;
    }
    stream.flush().await?;
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
            .map_err(|_| NetError::Timeout)?
            .map_err(|e| NetError::Stream(e.to_string()))?;
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
        request
            .validate()
            .map_err(|e| NetError::Protocol(e.to_string()))?;
        let work = async {
            let frame = codec::encode(&request)?;
            let answer = async {
                write_frame(&mut self.stream, &frame).await?;
                read_frame(&mut self.stream).await
            };
            let response: ChunkResponse = match answer.await {
                Ok(answer) => codec::decode(&answer)?,
                // A malformed frame header is the peer's fault.
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => return Err(e.into()),
                // Reset or closed before any answer: libp2p-stream drops an inbound stream when
                // the server's queue of new streams is full, as it is when a flood of requests
                // outruns the task that accepts them.
                Err(e) => return Err(NetError::Refused(e.to_string())),
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
            let len = usize::try_from(length).map_err(|_| NetError::Protocol("length".into()))?;
            buf.resize(len, 0);
            self.stream.read_exact(buf).await?;
            Ok(true)
        };
        tokio::time::timeout(CHUNK_TIMEOUT, work)
            .await
            .map_err(|_| NetError::Timeout)?
    }
}
