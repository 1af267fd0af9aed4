//! The `/shoal/sync/2` request-response codec: one length-prefixed frame each way, encoded by
//! the protocol crate's codec, at most `MAX_FRAME_BYTES`. Nothing read is trusted until it is
//! decoded and validated.

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use shoal_protocol::codec::{self, MAX_FRAME_BYTES};
use shoal_protocol::message::{SyncRequest, SyncResponse};

/// Codec for [`SyncRequest`] / [`SyncResponse`].
#[derive(Debug, Clone, Default)]
pub struct SyncCodec;

fn invalid(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
}

/// Reads one frame of at most `MAX_FRAME_BYTES`.
pub async fn read_frame<T: AsyncRead + Unpin>(io: &mut T) -> std::io::Result<Vec<u8>> {
    let mut header = [0u8; 4];
    io.read_exact(&mut header).await?;
    let len = codec::frame_len(header, MAX_FRAME_BYTES).map_err(invalid)?;
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
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
        codec::decode(&read_frame(io).await?).map_err(invalid)
    }

    async fn read_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> std::io::Result<SyncResponse>
    where
        T: AsyncRead + Unpin + Send,
    {
        codec::decode(&read_frame(io).await?).map_err(invalid)
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
