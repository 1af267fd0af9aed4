//! Frames on the node's streams: a 4-byte length, then that many bytes of the protocol crate's
//! codec; and the `/shoal/sync/3` request-response codec, one frame each way. Nothing read is
//! trusted until it is decoded and validated.
//!
//! What a frame may cost a reader is bounded before it is read:
//!
//! - Each read names the limit of the message it expects (a chunk request
//!   [`MAX_CHUNK_FRAME_BYTES`], a sync request [`MAX_SYNC_REQUEST_BYTES`], a sync response
//!   [`MAX_SYNC_RESPONSE_BYTES`]); a header announcing more is refused before anything is
//!   allocated for it ([`FrameError::TooLarge`], which the caller holds against the peer).
//! - A payload is read piece by piece, its buffer growing with the bytes that actually arrive,
//!   never to the length the header claims up front: a peer that announces a large frame and
//!   stalls costs no more than it sent.
//! - The buffers of every frame being read in this process take their bytes from one budget
//!   ([`FRAME_MEMORY_BYTES`]); a frame waits for budget while it is exhausted.
//! - A payload must arrive within [`payload_deadline`] of its header: a frame that trickles in
//!   is cut off ([`std::io::ErrorKind::TimedOut`]).

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use shoal_protocol::codec::{self, CodecError};
use shoal_protocol::message::{
    MAX_SYNC_REQUEST_BYTES, MAX_SYNC_RESPONSE_BYTES, SyncRequest, SyncResponse,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[cfg(doc)]
use shoal_protocol::message::MAX_CHUNK_FRAME_BYTES;

/// The bytes that the buffers of all frames being read at once may hold, in this process.
pub const FRAME_MEMORY_BYTES: usize = 64 * 1024 * 1024;
/// The most a payload buffer grows by at a time.
const READ_PIECE_BYTES: usize = 64 * 1024;
/// How long any payload may take to arrive once its header has.
const PAYLOAD_BASE_TIME: Duration = Duration::from_secs(10);
/// The slowest rate a payload may arrive at, beyond [`PAYLOAD_BASE_TIME`].
const PAYLOAD_MIN_BYTES_PER_SEC: u64 = 64 * 1024;

/// The frame memory budget of this process.
static FRAME_MEMORY: LazyLock<Arc<Semaphore>> =
    LazyLock::new(|| Arc::new(Semaphore::new(FRAME_MEMORY_BYTES)));

/// Codec for [`SyncRequest`] / [`SyncResponse`].
#[derive(Debug, Clone, Default)]
pub struct SyncCodec;

/// Why a frame was refused.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The header announced more than the expected message may hold.
    #[error("frame refused")]
    TooLarge(#[source] CodecError),
    /// The payload did not arrive within its deadline.
    #[error("frame payload of {0} bytes did not arrive in time")]
    Trickled(usize),
}

impl FrameError {
    /// Whether `e` is a frame refused for its length: the peer broke a message's limit.
    pub fn is_too_large(e: &std::io::Error) -> bool {
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<FrameError>())
            .is_some_and(|f| matches!(f, FrameError::TooLarge(_)))
    }
}

fn invalid(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e)
}

/// How long a payload of `len` bytes may take to arrive after its header.
pub fn payload_deadline(len: usize) -> Duration {
    let len = u64::try_from(len).unwrap_or(u64::MAX);
    PAYLOAD_BASE_TIME + Duration::from_secs(len / PAYLOAD_MIN_BYTES_PER_SEC)
}

/// The capacity a payload buffer of `capacity` bytes grows to so that it holds `needed`
/// bytes: doubling (so a large payload is not copied over and over), never past `len`, the
/// payload's length.
fn grown_capacity(capacity: usize, needed: usize, len: usize) -> usize {
    needed.max(capacity.saturating_mul(2)).min(len).max(needed)
}

/// Reads one frame of at most `max` bytes (capped at [`codec::MAX_FRAME_BYTES`]).
///
/// Waiting for the header has no deadline (callers set their own idle limits); the payload has
/// [`payload_deadline`]. A header over `max` is an [`std::io::ErrorKind::InvalidData`] error
/// whose source is [`FrameError::TooLarge`] (see [`FrameError::is_too_large`]).
pub async fn read_frame<T: AsyncRead + Unpin>(io: &mut T, max: usize) -> std::io::Result<Vec<u8>> {
    read_frame_within(io, max, &FRAME_MEMORY, payload_deadline).await
}

/// [`read_frame`] with the given memory budget and payload deadline.
async fn read_frame_within<T: AsyncRead + Unpin>(
    io: &mut T,
    max: usize,
    budget: &Arc<Semaphore>,
    deadline: fn(usize) -> Duration,
) -> std::io::Result<Vec<u8>> {
    let mut header = [0u8; codec::FRAME_HEADER_BYTES];
    io.read_exact(&mut header).await?;
    let len = codec::frame_len(header, max).map_err(|e| invalid(FrameError::TooLarge(e)))?;
    match tokio::time::timeout(deadline(len), read_payload(io, len, budget)).await {
        Ok(payload) => payload,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            FrameError::Trickled(len),
        )),
    }
}

/// Reads `len` bytes a piece at a time, taking the buffer's bytes from `budget` as it grows.
async fn read_payload<T: AsyncRead + Unpin>(
    io: &mut T,
    len: usize,
    budget: &Arc<Semaphore>,
) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    let mut held: Option<OwnedSemaphorePermit> = None;
    while buf.len() < len {
        // The buffer grows only once full, so what it holds is at most twice what arrived,
        // plus one piece.
        if buf.len() == buf.capacity() {
            let needed = buf.len() + (len - buf.len()).min(READ_PIECE_BYTES);
            let target = grown_capacity(buf.capacity(), needed, len);
            let more = target - held.as_ref().map_or(0, |p| p.num_permits());
            let permit = budget
                .clone()
                .acquire_many_owned(u32::try_from(more).unwrap_or(u32::MAX))
                .await
                .map_err(std::io::Error::other)?;
            match &mut held {
                Some(h) => h.merge(permit),
                None => held = Some(permit),
            }
            buf.reserve_exact(target - buf.len());
        }
        let start = buf.len();
        let piece = (buf.capacity() - start)
            .min(len - start)
            .min(READ_PIECE_BYTES);
        buf.resize(start + piece, 0);
        let n = io.read(buf.get_mut(start..).unwrap_or_default()).await?;
        buf.truncate(start + n);
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(buf)
}

/// Writes one frame.
pub async fn write_frame<T: AsyncWrite + Unpin>(io: &mut T, payload: &[u8]) -> std::io::Result<()> {
    let frame = codec::frame(payload).map_err(invalid)?;
    io.write_all(&frame).await?;
    io.flush().await
}

impl libp2p::request_response::Codec for SyncCodec {
    type Protocol = StreamProtocol;
    type Request = SyncRequest;
    type Response = SyncResponse;

    async fn read_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> std::io::Result<SyncRequest>
    where
        T: AsyncRead + Unpin + Send,
    {
        codec::decode(&read_frame(io, MAX_SYNC_REQUEST_BYTES).await?).map_err(invalid)
    }

    async fn read_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> std::io::Result<SyncResponse>
    where
        T: AsyncRead + Unpin + Send,
    {
        codec::decode(&read_frame(io, MAX_SYNC_RESPONSE_BYTES).await?).map_err(invalid)
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: SyncRequest,
    ) -> std::io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &codec::encode(&req).map_err(invalid)?).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: SyncResponse,
    ) -> std::io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &codec::encode(&res).map_err(invalid)?).await
    }
}

#[cfg(test)]
#[path = "framing_tests.rs"]
mod tests;
