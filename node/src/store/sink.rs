//! Streaming a byte stream into a file while hashing it, off the async threads.
//!
//! Bytes are gathered into a buffer of [`SINK_BUFFER_BYTES`]; a full buffer is written and hashed
//! on the blocking pool while the next one fills (double buffering), so receiving, writing and
//! hashing overlap and a transfer holds at most two buffers however large the blob.

use std::fs::File;
use std::io::Write;
use std::sync::Arc;

use shoal_protocol::{BlobIndexer, DigestHasher};
use tokio::task::JoinHandle;

use super::StoreError;
use super::gate::Gate;

/// Size of each of the two buffers a sink holds.
pub const SINK_BUFFER_BYTES: usize = 1 << 20;

/// What a sink computes over the bytes passing through: the content digest and, when the blob's
/// size is known before its bytes (it decides the chunk size), the chunk hashes of its
/// `BlobIndex`, in the same pass as the write.
pub struct Hashing {
    /// The content digest.
    pub digest: DigestHasher,
    /// The chunk hashes, if the size was known.
    pub index: Option<BlobIndexer>,
}

impl std::fmt::Debug for Hashing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hashing")
    }
}

impl Hashing {
    /// Fresh hashers: `algorithm` for the digest, and the index of a blob of `size` bytes if
    /// that is known (otherwise the store indexes the file once it is whole).
    pub fn new(algorithm: shoal_protocol::Algorithm, size: Option<u64>) -> Hashing {
        Hashing {
            digest: DigestHasher::new(algorithm),
            index: size.map(|s| BlobIndexer::new(shoal_protocol::chunk_size_for(s))),
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        self.digest.update(bytes);
        if let Some(index) = &mut self.index {
            index.update(bytes);
        }
    }
}

type Parts = (File, Option<Hashing>, Vec<u8>);

/// A file being appended to, with the hash of everything written through the sink.
pub struct Sink {
    /// The file and hasher, when no write is in flight.
    idle: Option<(File, Option<Hashing>)>,
    in_flight: Option<JoinHandle<Result<Parts, StoreError>>>,
    /// The store's write gate: a write goes ahead only while it is open.
    gate: Arc<Gate>,
    buf: Vec<u8>,
    spare: Vec<u8>,
    written: u64,
}

impl Sink {
    /// A sink appending to `file`, which already holds `written` bytes. With `hasher`, every
    /// byte passing through is hashed (the hasher must already cover the first `written`).
    /// Every write passes the store's `gate`.
    pub fn new(file: File, hasher: Option<Hashing>, written: u64, gate: Arc<Gate>) -> Sink {
        Sink {
            idle: Some((file, hasher)),
            in_flight: None,
            gate,
            buf: Vec::with_capacity(SINK_BUFFER_BYTES),
            spare: Vec::new(),
            written,
        }
    }

    /// Bytes in the file once everything buffered is written.
    pub fn len(&self) -> u64 {
        self.written
    }

    /// Whether nothing was written at all.
    pub fn is_empty(&self) -> bool {
        self.written == 0
    }

    /// Appends `data`.
    pub async fn write(&mut self, mut data: &[u8]) -> Result<(), StoreError> {
        while !data.is_empty() {
            let room = SINK_BUFFER_BYTES - self.buf.len();
            let take = room.min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            self.written += take as u64;
            data = &data[take..];
            if self.buf.len() >= SINK_BUFFER_BYTES {
                self.start_write().await?;
            }
        }
        Ok(())
    }

    async fn wait(&mut self) -> Result<(), StoreError> {
        if let Some(job) = self.in_flight.take() {
            let (file, hasher, mut buf) = job.await??;
            buf.clear();
            self.spare = buf;
            self.idle = Some((file, hasher));
        }
        Ok(())
    }

    async fn start_write(&mut self) -> Result<(), StoreError> {
        self.wait().await?;
        let Some((mut file, mut hasher)) = self.idle.take() else {
            return Err(StoreError::Invariant("sink used after a failed write"));
        };
        let mut next = std::mem::take(&mut self.spare);
        if next.capacity() == 0 {
            next.reserve(SINK_BUFFER_BYTES);
        }
        let buf = std::mem::replace(&mut self.buf, next);
        let gate = self.gate.clone();
        self.in_flight = Some(tokio::task::spawn_blocking(move || {
            let _open = gate.enter()?;
            file.write_all(&buf)?;
            if let Some(h) = hasher.as_mut() {
                h.update(&buf);
            }
            Ok((file, hasher, buf))
        }));
        Ok(())
    }

    /// Writes what is buffered, fsyncs, and returns the file and the hasher (if hashing).
    pub async fn finish(mut self) -> Result<(File, Option<Hashing>), StoreError> {
        if !self.buf.is_empty() {
            self.start_write().await?;
        }
        self.wait().await?;
        let Some((file, hasher)) = self.idle.take() else {
            return Err(StoreError::Invariant("sink used after a failed write"));
        };
        let gate = self.gate.clone();
        let file = tokio::task::spawn_blocking(move || -> Result<File, StoreError> {
            let _open = gate.enter()?;
            file.sync_data()?;
            Ok(file)
        })
        .await??;
        Ok((file, hasher))
    }
}
