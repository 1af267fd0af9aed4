//! Peer-to-peer messages: what nodes say to each other, under which protocol, within which
//! limits.
//!
//! Every message is encoded with the [codec] (big-endian, fixed-width bincode) and
//! every limit below is checked when a message is decoded, so a node never acts on, or allocates
//! for, a message outside them. Protocol ids carry a version; a breaking change to a message
//! ships under a new id (see the codec docs on versioning).
//!
//! # `shoal/tags/2` (gossipsub topic)
//!
//! Nodes publish every tag record of a public repository they sign or accept, every fleet
//! policy and every member proof as a [`Gossip`] message. Messages are at
//! most [`MAX_GOSSIP_BYTES`]; [`Gossip::to_bytes`] and [`Gossip::from_bytes`] check that bound
//! (configure gossipsub's transmit size to match). Every signed record fits, because its payload
//! is at most [`MAX_RECORD_PAYLOAD_BYTES`](crate::record::MAX_RECORD_PAYLOAD_BYTES). A receiver
//! verifies the record and checks that its publisher is trusted before it keeps or forwards it.
//!
//! # `/shoal/sync/3` (request-response)
//!
//! Membership, anti-entropy and index lookup. One [`SyncRequest`], one [`SyncResponse`], each a single
//! codec-encoded message in one frame: a request of at most [`MAX_SYNC_REQUEST_BYTES`], a response
//! of at most [`MAX_SYNC_RESPONSE_BYTES`]. A receiver checks the announced length against the
//! limit of the message it expects before it reads (or allocates for) the payload.
//!
//! - `Summary` → `Summary { records, hash }`: the count and a [`SummaryHasher`] hash of every
//!   current record. Equal summaries mean there is nothing to exchange.
//! - `Records { after, limit }` → `Records { records, more }`: current records in ascending
//!   (repo, tag) order, starting after `after`. A page holds at most `limit` records, at most
//!   [`MAX_SYNC_RECORDS`], and fits in one frame (build it with a [`RecordsPage`]); `more` says
//!   whether to ask for the next page. Records are checked one by one with `verify()` by the
//!   receiver; a bad record does not spoil the page.
//! - `BlobIndex { digest }` → `BlobIndex(Some(index))` or `BlobIndex(None)` if the peer has no
//!   index for that blob. The receiver checks the index's id against the `BlobRef` of a verified
//!   record before using it.
//! - `Have { digest }` → `Have(Some(chunks))` or `Have(None)` if the peer neither holds nor
//!   downloads the blob. A node holding the whole blob adds an [`ServeReport`]: which chunks it is
//!   sending and has sent, so downloaders ask it for each chunk about once.
//! - `HaveWait { digest, held, serves }`: `Have` as a long poll, answered when the peer holds more
//!   than `held` chunks, when its serve report's version differs from `serves`, when it stops
//!   downloading, or after [`HAVE_WAIT_MAX`].
//! - `Hello(proof)` → `Hello(proof)`: the first exchange on a connection, each way; a node in a
//!   fleet serves nothing to a peer before its proof checks out, and disconnects a peer whose
//!   proof does not.
//! - `FleetSummary` → `Summary`, and `Fleet { after, limit }` → `Fleet { items, more }`: the same
//!   exchange as for records, over the fleet's policies and member proofs ([`FleetItem`]), at
//!   most [`MAX_SYNC_FLEET_ITEMS`] a page.
//! - `Push(record)` → `Pushed`: a record of a private repository, sent only to peers that may
//!   read it (it is never gossiped); the receiver checks it as any record.
//! - `Clock` → `Clock(ms)`: the responder's wall clock, which the asker weighs against its own
//!   (see the node's `clock` module).
//! - `Prefetch { repo, reference }` → `Prefetch(answer)`: asks the peer to fetch an image the
//!   fleet has records for into its own store, paced by its own rate limit (`shoal prefetch
//!   --node`). The answer says whether it was queued; the fetch itself is not reported back. A
//!   peer that may not read the repository is refused, as is one with too many asks queued.
//! - `Mirror { upstream, repo, digest }` → `Mirror(state)`: asks a peer that mirrors an upstream
//!   to fetch a blob from it for the fleet, or how far it has come ([`MirrorState`]).
//! - `ChunkHashes { digest, from }` → `ChunkHashes(Some(hashes))`: the chunk hashes the peer
//!   knows of a blob, from chunk `from` on (at most [`MAX_CHUNK_HASHES`]), with its size and
//!   chunk size; `None` if it knows none. The peer fetching a blob from an upstream knows each
//!   chunk's hash as soon as the chunk arrives, long before the blob's digest can be checked,
//!   so the fleet fetches the chunks from it (and from each other) as they arrive. Such hashes
//!   are bound to nothing signed: the receiver checks the whole blob against its digest before
//!   it keeps it, and a blob that fails it convicts the peer that sent the hashes.
//! - Any request may be answered with `Error(reason)`: a short reason without internal detail.
//!   A node answers a peer that may not read a repository as if the repository did not exist.
//!
//! # `/shoal/chunk/1` (raw stream)
//!
//! Bulk transfer of blob bytes. The requester opens a stream and writes one frame (a `u32`
//! big-endian length, then the encoded [`ChunkRequest`], at most [`MAX_CHUNK_FRAME_BYTES`]). The
//! responder writes one frame holding a [`ChunkResponse`] header; after `Ok { length }` exactly
//! `length` raw bytes follow on the stream, which is then closed. The requested range must lie
//! within the blob and is at most [`MAX_CHUNK_REQUEST_BYTES`]; the responder sends all of it or
//! answers `NotFound` (it lacks some of the bytes), `Busy` (try another peer or later) or
//! `Invalid(reason)`. The requester checks every chunk against the blob index before storing
//! it.

use crate::bitfield::Bitfield;
use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::blob_index::BlobIndex;
use crate::codec::{self, CodecError};
use crate::digest::Digest;
use crate::fleet::{FleetItem, MemberProof, SignedPolicy};
use crate::name::{Reference, RepoName, Tag};
use crate::record::SignedTagRecord;

/// The gossipsub topic on which tag records, fleet policies and member proofs are published.
pub const TAGS_TOPIC: &str = "shoal/tags/2";
/// The request-response protocol for membership, record and policy sync, and blob indexes.
pub const SYNC_PROTOCOL: &str = "/shoal/sync/3";
/// The stream protocol for chunk transfer.
pub const CHUNK_PROTOCOL: &str = "/shoal/chunk/1";

/// The largest gossip message, in bytes.
pub const MAX_GOSSIP_BYTES: usize = 256 * 1024;
/// The largest encoded [`SyncRequest`]. The largest request is a `Push` of one signed record,
/// which has the same encoding as a gossiped record and so fits in [`MAX_GOSSIP_BYTES`]; a
/// `Hello`'s membership proof is far smaller.
pub const MAX_SYNC_REQUEST_BYTES: usize = MAX_GOSSIP_BYTES;
/// The largest encoded [`SyncResponse`]: a page of records or fleet items, or a blob index,
/// fills at most one whole frame.
pub const MAX_SYNC_RESPONSE_BYTES: usize = codec::MAX_FRAME_BYTES;
/// The most records in one sync page.
pub const MAX_SYNC_RECORDS: usize = 512;
/// The most fleet items (policies and member proofs) in one sync page.
pub const MAX_SYNC_FLEET_ITEMS: usize = 128;
/// The largest byte range one chunk request may ask for.
pub const MAX_CHUNK_REQUEST_BYTES: u64 = 64 * 1024 * 1024;
/// The largest frame on the chunk protocol (request or response header); they are small.
pub const MAX_CHUNK_FRAME_BYTES: usize = 4 * 1024;
/// The longest reason in an `Error` or `Invalid` answer, in bytes.
pub const MAX_REASON_BYTES: usize = 1024;

/// Key derivation context of [`SummaryHasher`].
const SUMMARY_CONTEXT: &str = "shoal sync summary v1";

/// Why a message breaks the protocol's rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// More records than a page may hold.
    #[error("{count} records in one page, more than {MAX_SYNC_RECORDS}")]
    TooManyRecords {
        /// Records in the page.
        count: usize,
    },
    /// A chunk request's range is empty, too long or overflows.
    #[error("invalid chunk range: {0}")]
    BadRange(String),
    /// A reason string is too long.
    #[error("reason longer than {MAX_REASON_BYTES} bytes")]
    ReasonTooLong,
    /// A `HaveChunks` bitfield has the wrong length or too many chunks.
    #[error("malformed chunk bitfield")]
    BadBitfield,
    /// A `ChunkHashes` answer does not fit its blob.
    #[error("malformed chunk hashes: {0}")]
    BadChunkHashes(String),
}

/// A message on the [`TAGS_TOPIC`] gossip topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Gossip {
    /// A signed tag record, new or re-announced (of a public repository: a private one's
    /// records go only to peers that may read them, with [`SyncRequest::Push`]).
    Record(SignedTagRecord),
    /// A fleet policy signed by an admin.
    Policy(SignedPolicy),
    /// A member's proof, which its publisher key's records are trusted by.
    Member(MemberProof),
}

impl Gossip {
    /// Encodes the message, refusing one larger than [`MAX_GOSSIP_BYTES`].
    pub fn to_bytes(&self) -> Result<Vec<u8>, CodecError> {
        let bytes = codec::encode(self)?;
        if bytes.len() > MAX_GOSSIP_BYTES {
            return Err(CodecError::FrameTooLarge {
                len: bytes.len(),
                max: MAX_GOSSIP_BYTES,
            });
        }
        Ok(bytes)
    }

    /// Decodes a message, refusing one larger than [`MAX_GOSSIP_BYTES`] before reading it.
    pub fn from_bytes(bytes: &[u8]) -> Result<Gossip, CodecError> {
        if bytes.len() > MAX_GOSSIP_BYTES {
            return Err(CodecError::FrameTooLarge {
                len: bytes.len(),
                max: MAX_GOSSIP_BYTES,
            });
        }
        codec::decode(bytes)
    }
}

/// A request on [`SYNC_PROTOCOL`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SyncRequest {
    /// The count and hash of every current record, to skip a full exchange when equal.
    Summary,
    /// A page of current records in ascending (repo, tag) order.
    Records {
        /// Start after this (repo, tag); `None` starts at the beginning.
        after: Option<(RepoName, Tag)>,
        /// The most records wanted; the responder caps it at [`MAX_SYNC_RECORDS`].
        limit: u32,
    },
    /// The chunk index of one blob.
    BlobIndex {
        /// The blob's digest.
        digest: Digest,
    },
    /// Which chunks of a blob the peer holds (all of them, part of a download, or none).
    Have {
        /// The blob's digest.
        digest: Digest,
    },
    /// [`SyncRequest::Have`] as a long poll: the peer answers as soon as it holds more than
    /// `held` chunks of the blob, or when it stops downloading it, or after at most
    /// [`HAVE_WAIT_MAX`]. A downloader keeps one parked at each source, so it hears of a new chunk
    /// one network hop after it is stored instead of at its next poll.
    HaveWait {
        /// The blob's digest.
        digest: Digest,
        /// How many chunks the asker already knows the peer holds.
        held: u32,
        /// The [`ServeReport::version`] the asker last heard from the peer (0 if none): a peer
        /// that reports serves answers as soon as its report changes.
        serves: u64,
    },
    /// The first request on a new connection, each way: the sender's membership proof (`None`
    /// from a node without a fleet). A node in a fleet answers a peer that fails to prove
    /// membership with an error and disconnects it.
    Hello(Option<MemberProof>),
    /// The count and hash of every fleet item (policies and member proofs).
    FleetSummary,
    /// A page of fleet items in ascending cursor order ([`FleetItem::cursor`]).
    Fleet {
        /// Start after this cursor; `None` starts at the beginning.
        after: Option<String>,
        /// The most items wanted; capped at [`MAX_SYNC_FLEET_ITEMS`].
        limit: u32,
    },
    /// A record of a private repository, sent to a peer that may read it (it is not gossiped).
    Push(SignedTagRecord),
    /// The peer's wall clock, so that a node whose clock is off can stamp its records in the
    /// fleet's time. Appended last: a node that predates it answers with an error.
    Clock,
    /// Fetch the image `repo` / `reference` into the peer's store, as if it were subscribed to
    /// it. The names are validated on decode like every name. Appended last: a node that
    /// predates it answers with an error.
    Prefetch {
        /// The repository.
        repo: RepoName,
        /// A tag (the record current when the peer gets to it) or a manifest digest.
        reference: Reference,
    },
    /// Asks a peer that mirrors the upstream `upstream` to fetch the blob `digest` of `repo`
    /// (a repository in that upstream's namespace) from it for the fleet, or says how far it
    /// has come: the fleet then fetches the blob from that peer, and the upstream sends it
    /// once. Appended after `Prefetch`: a node that predates it answers with an error.
    Mirror {
        /// The upstream's name (`docker.io`); at most [`MAX_UPSTREAM_NAME_BYTES`].
        upstream: String,
        /// The repository, in the upstream's namespace (`docker.io/library/nginx`).
        repo: RepoName,
        /// The blob.
        digest: Digest,
    },
    /// The hashes the peer knows of the chunks of blob `digest`, from chunk `from` on. Appended
    /// after `Mirror`: a node that predates it answers with an error.
    ChunkHashes {
        /// The blob.
        digest: Digest,
        /// The first chunk whose hash is wanted.
        from: u32,
    },
}

/// The most hashes one [`SyncResponse::ChunkHashes`] carries (512 KiB of them).
pub const MAX_CHUNK_HASHES: usize = 16_384;

/// Answer to [`SyncRequest::ChunkHashes`]: a run of a blob's chunk hashes, unsigned (see the
/// module docs for how a receiver may use them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkHashes {
    /// The blob's size in bytes.
    pub size: u64,
    /// Its chunk size: [`chunk_size_for`](crate::blob_index::chunk_size_for) its size, as every
    /// node indexes it.
    pub chunk_size: u32,
    /// The chunk the first hash is of.
    pub from: u32,
    /// The hashes of chunks `from..from + hashes.len()`, at most [`MAX_CHUNK_HASHES`].
    pub hashes: Vec<crate::blob_index::ChunkHash>,
}

impl ChunkHashes {
    /// Checks the shape: the chunk size every node picks for the size, at most
    /// [`MAX_CHUNK_HASHES`] hashes, none past the blob's last chunk.
    pub fn validate(&self) -> Result<(), MessageError> {
        let bad = |why: &str| Err(MessageError::BadChunkHashes(why.to_owned()));
        if self.chunk_size != crate::blob_index::chunk_size_for(self.size) {
            return bad("the chunk size is not the one for the blob's size");
        }
        if self.hashes.len() > MAX_CHUNK_HASHES {
            return bad("too many hashes");
        }
        let count = self.size.div_ceil(u64::from(self.chunk_size));
        if count > crate::blob_index::MAX_CHUNKS as u64 {
            return bad("too many chunks");
        }
        if u64::from(self.from) + self.hashes.len() as u64 > count {
            return bad("hashes past the blob's last chunk");
        }
        Ok(())
    }

    /// How many chunks the blob has (valid once [`ChunkHashes::validate`] passed).
    pub fn chunk_count(&self) -> u32 {
        u32::try_from(self.size.div_ceil(u64::from(self.chunk_size.max(1)))).unwrap_or(u32::MAX)
    }
}

/// Answer to [`SyncRequest::Prefetch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PrefetchAnswer {
    /// Queued (or already queued); it is fetched in turn, at the peer's rate limit.
    Queued,
    /// The asker may not read the repository, or the peer does not take prefetch asks.
    Denied,
    /// The peer's queue, or the asker's share of it, is full: ask again later.
    Busy,
}

/// The longest upstream name a [`SyncRequest::Mirror`] carries (a host and port).
pub const MAX_UPSTREAM_NAME_BYTES: usize = 255;

/// How a peer's fetch of a blob from its upstream stands ([`SyncResponse::Mirror`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MirrorState {
    /// The peer does not mirror that upstream, or will not fetch this for the asker.
    Unsupported,
    /// Under way: this many bytes received.
    Fetching {
        /// Bytes received from the upstream so far.
        received: u64,
    },
    /// The peer holds the blob: fetch it from the fleet.
    Done,
    /// The fetch failed; why, for a log (at most [`MAX_REASON_BYTES`]).
    Failed(String),
}

/// The longest a [`SyncRequest::HaveWait`] is held before it is answered anyway.
pub const HAVE_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(10);

/// Which chunks of a blob a peer holds: a [`Bitfield`]'s byte form (chunk 0 in the high bit of
/// the first byte) and its length.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaveChunks {
    /// Number of chunks of the blob.
    pub chunk_count: u32,
    /// `ceil(chunk_count / 8)` bytes.
    pub bits: Vec<u8>,
    /// What the peer has uploaded of the blob, if it reports it (a node holding the whole blob
    /// does), so that downloaders fetch each chunk from it about once.
    pub serves: Option<ServeReport>,
}

/// Which chunks of a blob a node is sending and has sent to other peers, in [`HaveChunks`]'s
/// byte form, each `ceil(chunk_count / 8)` bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServeReport {
    /// Changes whenever the report does: a transfer of the blob started or ended.
    pub version: u64,
    /// Chunks being sent to some peer now.
    pub sending: Vec<u8>,
    /// Chunks sent in full to some peer at least once.
    pub sent: Vec<u8>,
}

impl HaveChunks {
    /// Checks the shape: at most `MAX_CHUNKS` chunks and well-formed bitfields for them.
    pub fn validate(&self) -> Result<(), MessageError> {
        self.bitfield().ok_or(MessageError::BadBitfield)?;
        if self.serves.is_some() && self.serve_bitfields().is_none() {
            return Err(MessageError::BadBitfield);
        }
        Ok(())
    }

    /// The report's `(sending, sent)` bitfields, if there is a report and its shape is valid.
    pub fn serve_bitfields(&self) -> Option<(Bitfield, Bitfield)> {
        let report = self.serves.as_ref()?;
        self.bitfield()?;
        Some((
            Bitfield::from_bytes(&report.sending, self.chunk_count)?,
            Bitfield::from_bytes(&report.sent, self.chunk_count)?,
        ))
    }

    /// The bitfield, if the shape is valid.
    pub fn bitfield(&self) -> Option<Bitfield> {
        let count = usize::try_from(self.chunk_count).ok()?;
        if count > crate::blob_index::MAX_CHUNKS {
            return None;
        }
        Bitfield::from_bytes(&self.bits, self.chunk_count)
    }

    /// Whether chunk `i` is held.
    pub fn has(&self, i: u32) -> bool {
        self.bitfield().is_some_and(|b| b.get(i))
    }
}

impl From<&Bitfield> for HaveChunks {
    fn from(bits: &Bitfield) -> Self {
        HaveChunks {
            chunk_count: bits.len(),
            bits: bits.to_bytes(),
            serves: None,
        }
    }
}

/// A response on [`SYNC_PROTOCOL`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawSyncResponse")]
pub enum SyncResponse {
    /// Answer to [`SyncRequest::Summary`], as made by a [`SummaryHasher`].
    Summary {
        /// How many current records there are.
        records: u64,
        /// The [`SummaryHasher`] hash of them.
        hash: [u8; 32],
    },
    /// Answer to [`SyncRequest::Records`]: at most [`MAX_SYNC_RECORDS`] records.
    Records {
        /// The page, in ascending (repo, tag) order. Unverified.
        records: Vec<SignedTagRecord>,
        /// Whether more records follow the last one.
        more: bool,
    },
    /// Answer to [`SyncRequest::BlobIndex`]; `None` if the peer has no index for the blob.
    BlobIndex(Option<BlobIndex>),
    /// The request could not be served.
    Error(String),
    /// Answer to [`SyncRequest::Have`] and [`SyncRequest::HaveWait`]; `None` if the peer neither
    /// holds nor downloads the blob.
    Have(Option<HaveChunks>),
    /// Answer to [`SyncRequest::Hello`]: the responder's proof.
    Hello(Option<MemberProof>),
    /// Answer to [`SyncRequest::Fleet`].
    Fleet {
        /// The page. Unverified.
        items: Vec<FleetItem>,
        /// Whether more items follow the last one.
        more: bool,
    },
    /// Answer to [`SyncRequest::Push`]: received (not a statement that it was accepted).
    Pushed,
    /// Answer to [`SyncRequest::Clock`]: the responder's wall clock as it answered, in
    /// milliseconds since the Unix epoch (its own clock, uncorrected).
    Clock(u64),
    /// Answer to [`SyncRequest::Prefetch`].
    Prefetch(PrefetchAnswer),
    /// Answer to [`SyncRequest::Mirror`].
    Mirror(MirrorState),
    /// Answer to [`SyncRequest::ChunkHashes`]; `None` if the peer knows none of the blob's.
    ChunkHashes(Option<ChunkHashes>),
}

/// The unvalidated wire shape of [`SyncResponse`]; variants in the same order.
#[derive(Deserialize)]
enum RawSyncResponse {
    Summary {
        records: u64,
        hash: [u8; 32],
    },
    Records {
        records: Vec<SignedTagRecord>,
        more: bool,
    },
    BlobIndex(Option<BlobIndex>),
    Error(String),
    Have(Option<HaveChunks>),
    Hello(Option<MemberProof>),
    Fleet {
        items: Vec<FleetItem>,
        more: bool,
    },
    Pushed,
    Clock(u64),
    Prefetch(PrefetchAnswer),
    Mirror(MirrorState),
    ChunkHashes(Option<ChunkHashes>),
}

impl TryFrom<RawSyncResponse> for SyncResponse {
    type Error = MessageError;

    fn try_from(raw: RawSyncResponse) -> Result<Self, MessageError> {
        let response = match raw {
            RawSyncResponse::Summary { records, hash } => SyncResponse::Summary { records, hash },
            RawSyncResponse::Records { records, more } => SyncResponse::Records { records, more },
            RawSyncResponse::BlobIndex(index) => SyncResponse::BlobIndex(index),
            RawSyncResponse::Error(reason) => SyncResponse::Error(reason),
            RawSyncResponse::Have(have) => SyncResponse::Have(have),
            RawSyncResponse::Hello(proof) => SyncResponse::Hello(proof),
            RawSyncResponse::Fleet { items, more } => SyncResponse::Fleet { items, more },
            RawSyncResponse::Pushed => SyncResponse::Pushed,
            RawSyncResponse::Clock(ms) => SyncResponse::Clock(ms),
            RawSyncResponse::Prefetch(answer) => SyncResponse::Prefetch(answer),
            RawSyncResponse::Mirror(state) => SyncResponse::Mirror(state),
            RawSyncResponse::ChunkHashes(hashes) => SyncResponse::ChunkHashes(hashes),
        };
        response.validate()?;
        Ok(response)
    }
}

impl SyncResponse {
    /// Checks the limits: at most [`MAX_SYNC_RECORDS`] records, a reason of at most
    /// [`MAX_REASON_BYTES`]. Run on every decode.
    pub fn validate(&self) -> Result<(), MessageError> {
        match self {
            SyncResponse::Records { records, .. } if records.len() > MAX_SYNC_RECORDS => {
                Err(MessageError::TooManyRecords {
                    count: records.len(),
                })
            }
            SyncResponse::Error(reason) | SyncResponse::Mirror(MirrorState::Failed(reason))
                if reason.len() > MAX_REASON_BYTES =>
            {
                Err(MessageError::ReasonTooLong)
            }
            SyncResponse::Have(Some(have)) => have.validate(),
            SyncResponse::ChunkHashes(Some(hashes)) => hashes.validate(),
            SyncResponse::Fleet { items, .. } if items.len() > MAX_SYNC_FLEET_ITEMS => {
                Err(MessageError::TooManyRecords { count: items.len() })
            }
            SyncResponse::Hello(_)
            | SyncResponse::Fleet { .. }
            | SyncResponse::Pushed
            | SyncResponse::Clock(_)
            | SyncResponse::Prefetch(_)
            | SyncResponse::Mirror(_) => Ok(()),
            SyncResponse::Summary { .. }
            | SyncResponse::Records { .. }
            | SyncResponse::BlobIndex(_)
            | SyncResponse::Have(None)
            | SyncResponse::ChunkHashes(None)
            | SyncResponse::Error(_) => Ok(()),
        }
    }
}

/// Hashes a node's current records for [`SyncResponse::Summary`].
///
/// Feed every current record in ascending (repo, tag) order, the order of
/// [`SyncRequest::Records`] pages. The hash is BLAKE3, keyed by derivation from
/// `shoal sync summary v1`, over each record's 32-byte [`id`](SignedTagRecord::id).
#[derive(Debug, Clone)]
pub struct SummaryHasher {
    hasher: blake3::Hasher,
    records: u64,
}

impl SummaryHasher {
    /// A hasher for an empty set.
    pub fn new() -> SummaryHasher {
        SummaryHasher {
            hasher: blake3::Hasher::new_derive_key(SUMMARY_CONTEXT),
            records: 0,
        }
    }

    /// Adds the next record.
    pub fn add(&mut self, record: &SignedTagRecord) {
        self.hasher.update(&record.id());
        self.records = self.records.saturating_add(1);
    }

    /// The summary of the records added.
    pub fn finish(&self) -> SyncResponse {
        SyncResponse::Summary {
            records: self.records,
            hash: *self.hasher.finalize().as_bytes(),
        }
    }
}

impl Default for SummaryHasher {
    fn default() -> Self {
        SummaryHasher::new()
    }
}

/// Fills one [`SyncResponse::Records`] page without breaking its limits: at most the requested
/// number of records (capped to 1..=[`MAX_SYNC_RECORDS`]) and at most
/// [`MAX_FRAME_BYTES`](crate::codec::MAX_FRAME_BYTES) encoded. Any one signed record always fits
/// in an empty page, so paging always makes progress.
#[derive(Debug, Clone)]
pub struct RecordsPage {
    records: Vec<SignedTagRecord>,
    limit: usize,
    encoded_bytes: usize,
}

impl RecordsPage {
    /// Bytes of a `Records` response besides its records: variant tag, count and `more`.
    const OVERHEAD_BYTES: usize = 4 + 8 + 1;

    /// An empty page for a request asking for `limit` records.
    pub fn new(limit: u32) -> RecordsPage {
        let limit = usize::try_from(limit)
            .unwrap_or(MAX_SYNC_RECORDS)
            .clamp(1, MAX_SYNC_RECORDS);
        RecordsPage {
            records: Vec::new(),
            limit,
            encoded_bytes: Self::OVERHEAD_BYTES,
        }
    }

    /// Adds `record` if it fits. Returns `false`, dropping it, if the page is full: finish the
    /// page with `more = true`, and the requester asks again after the last record sent.
    pub fn push(&mut self, record: SignedTagRecord) -> bool {
        let len = record.encoded_len();
        if self.records.len() >= self.limit
            || self.encoded_bytes.saturating_add(len) > codec::MAX_FRAME_BYTES
        {
            return false;
        }
        self.encoded_bytes += len;
        self.records.push(record);
        true
    }

    /// Whether no more records fit by count (one may still not fit by size).
    pub fn is_full(&self) -> bool {
        self.records.len() >= self.limit
    }

    /// Records in the page.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether the page has no records.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The response; `more` says whether records follow the last one in the page.
    pub fn finish(self, more: bool) -> SyncResponse {
        SyncResponse::Records {
            records: self.records,
            more,
        }
    }
}

/// A request on [`CHUNK_PROTOCOL`]: a byte range of one blob.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "RawChunkRequest")]
pub struct ChunkRequest {
    /// The blob.
    pub digest: Digest,
    /// The first byte wanted.
    pub offset: u64,
    /// How many bytes, 1..=[`MAX_CHUNK_REQUEST_BYTES`].
    pub length: u64,
}

/// The unvalidated wire shape of [`ChunkRequest`].
#[derive(Deserialize)]
struct RawChunkRequest {
    digest: Digest,
    offset: u64,
    length: u64,
}

impl TryFrom<RawChunkRequest> for ChunkRequest {
    type Error = MessageError;

    fn try_from(raw: RawChunkRequest) -> Result<Self, MessageError> {
        let request = ChunkRequest {
            digest: raw.digest,
            offset: raw.offset,
            length: raw.length,
        };
        request.validate()?;
        Ok(request)
    }
}

impl ChunkRequest {
    /// Checks the range: not empty, at most [`MAX_CHUNK_REQUEST_BYTES`], no overflow. Run on
    /// every decode; whether the range lies within the blob is for the responder to check.
    pub fn validate(&self) -> Result<(), MessageError> {
        if self.length == 0 {
            return Err(MessageError::BadRange("empty".into()));
        }
        if self.length > MAX_CHUNK_REQUEST_BYTES {
            return Err(MessageError::BadRange(format!(
                "{} bytes, more than {MAX_CHUNK_REQUEST_BYTES}",
                self.length
            )));
        }
        if self.offset.checked_add(self.length).is_none() {
            return Err(MessageError::BadRange("offset + length overflows".into()));
        }
        Ok(())
    }

    /// The requested byte range, if valid.
    pub fn range(&self) -> Result<Range<u64>, MessageError> {
        self.validate()?;
        // validate() checked the sum.
        Ok(self.offset..self.offset.saturating_add(self.length))
    }
}

/// The header a responder writes on [`CHUNK_PROTOCOL`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawChunkResponse")]
pub enum ChunkResponse {
    /// `length` raw bytes follow this frame: the whole requested range.
    Ok {
        /// Bytes that follow, equal to the request's length.
        length: u64,
    },
    /// The responder does not hold all of the range.
    NotFound,
    /// The responder is at capacity; try another peer or later.
    Busy,
    /// The request is invalid (out of the blob, bad range); a short reason.
    Invalid(String),
}

/// The unvalidated wire shape of [`ChunkResponse`]; variants in the same order.
#[derive(Deserialize)]
enum RawChunkResponse {
    Ok { length: u64 },
    NotFound,
    Busy,
    Invalid(String),
}

impl TryFrom<RawChunkResponse> for ChunkResponse {
    type Error = MessageError;

    fn try_from(raw: RawChunkResponse) -> Result<Self, MessageError> {
        let response = match raw {
            RawChunkResponse::Ok { length } => ChunkResponse::Ok { length },
            RawChunkResponse::NotFound => ChunkResponse::NotFound,
            RawChunkResponse::Busy => ChunkResponse::Busy,
            RawChunkResponse::Invalid(reason) => ChunkResponse::Invalid(reason),
        };
        response.validate()?;
        Ok(response)
    }
}

impl ChunkResponse {
    /// Checks the limits: `Ok` announces at most [`MAX_CHUNK_REQUEST_BYTES`], a reason is at
    /// most [`MAX_REASON_BYTES`]. Run on every decode. The requester must still check that
    /// `length` equals what it asked for.
    pub fn validate(&self) -> Result<(), MessageError> {
        match self {
            ChunkResponse::Ok { length } if *length > MAX_CHUNK_REQUEST_BYTES => {
                Err(MessageError::BadRange(format!(
                    "{length} bytes, more than {MAX_CHUNK_REQUEST_BYTES}"
                )))
            }
            ChunkResponse::Invalid(reason) if reason.len() > MAX_REASON_BYTES => {
                Err(MessageError::ReasonTooLong)
            }
            ChunkResponse::Ok { .. }
            | ChunkResponse::NotFound
            | ChunkResponse::Busy
            | ChunkResponse::Invalid(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob_index::strategies::{blob_index, digest};
    use crate::codec::{decode, encode, frame, frame_len};
    use crate::record::strategies::{repo, signed_record, tag};
    use crate::record::{BlobRef, MAX_RECORD_PAYLOAD_BYTES, SigningKey, TagRecord, TagTarget};
    use proptest::prelude::*;
    use serde::de::DeserializeOwned;

    fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(value: &T) {
        let bytes = encode(value).unwrap();
        assert_eq!(&decode::<T>(&bytes).unwrap(), value);
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(matches!(
            decode::<T>(&trailing),
            Err(CodecError::TrailingBytes)
        ));
    }

    fn sample_record(n: u8) -> SignedTagRecord {
        let key = SigningKey::from_seed([n; 32]);
        let record = TagRecord {
            repo: "team/app".parse().unwrap(),
            tag: format!("v{n}").parse().unwrap(),
            target: None,
            timestamp_ms: 1,
            sequence: 0,
            publisher: key.public(),
        };
        SignedTagRecord::sign(&record, &key).unwrap()
    }

    /// A validly signed record with the largest payload `sign` accepts (about).
    fn largest_record() -> SignedTagRecord {
        let key = SigningKey::from_seed([9; 32]);
        let blob = BlobRef {
            digest: Digest::of(crate::Algorithm::Sha512, b"x"),
            size: u64::MAX,
            index: crate::BlobIndex::of(b"x", crate::MAX_AUTO_CHUNK_SIZE_BYTES)
                .unwrap()
                .id(),
        };
        let mut record = TagRecord {
            repo: "a".repeat(255).parse().unwrap(),
            tag: "t".repeat(128).parse().unwrap(),
            target: Some(TagTarget {
                manifest: Digest::of(crate::Algorithm::Sha512, b"m"),
                media_type: "m".repeat(255),
                size: 1,
                blobs: vec![],
            }),
            timestamp_ms: 1,
            sequence: 0,
            publisher: key.public(),
        };
        // Grow until one more blob would break the payload limit.
        let per_blob = encode(&blob).unwrap().len();
        let base = encode(&record).unwrap().len();
        let n = (MAX_RECORD_PAYLOAD_BYTES - base) / per_blob;
        if let Some(target) = record.target.as_mut() {
            target.blobs = vec![blob; n];
        }
        let signed = SignedTagRecord::sign(&record, &key).unwrap();
        assert!(signed.payload().len() > MAX_RECORD_PAYLOAD_BYTES - per_blob);
        signed
    }

    #[test]
    fn the_largest_sync_request_fits_its_limit() {
        let push = encode(&SyncRequest::Push(largest_record())).unwrap();
        assert!(push.len() <= MAX_SYNC_REQUEST_BYTES, "{} bytes", push.len());
        let request = encode(&ChunkRequest {
            digest: Digest::of(crate::Algorithm::Sha512, b"x"),
            offset: u64::MAX / 2,
            length: MAX_CHUNK_REQUEST_BYTES,
        })
        .unwrap();
        assert!(request.len() <= MAX_CHUNK_FRAME_BYTES);
    }

    #[test]
    fn protocol_ids_are_versioned() {
        assert!(TAGS_TOPIC.ends_with("/2"));
        assert!(SYNC_PROTOCOL.starts_with("/shoal/") && SYNC_PROTOCOL.ends_with("/3"));
        assert!(CHUNK_PROTOCOL.starts_with("/shoal/") && CHUNK_PROTOCOL.ends_with("/1"));
    }

    #[test]
    fn every_message_round_trips() {
        round_trip(&Gossip::Record(sample_record(1)));
        round_trip(&SyncRequest::Summary);
        round_trip(&SyncRequest::Records {
            after: None,
            limit: 100,
        });
        round_trip(&SyncRequest::Records {
            after: Some(("team/app".parse().unwrap(), "latest".parse().unwrap())),
            limit: 0,
        });
        round_trip(&SyncRequest::BlobIndex {
            digest: Digest::sha256(b""),
        });
        round_trip(&SyncResponse::Summary {
            records: 3,
            hash: [7; 32],
        });
        round_trip(&SyncResponse::Records {
            records: vec![sample_record(1), sample_record(2)],
            more: true,
        });
        round_trip(&SyncResponse::Records {
            records: vec![],
            more: false,
        });
        round_trip(&SyncResponse::BlobIndex(None));
        round_trip(&SyncResponse::BlobIndex(Some(
            crate::BlobIndex::of(&[5; 100_000], crate::blob_index::MIN_CHUNK_SIZE_BYTES).unwrap(),
        )));
        round_trip(&SyncResponse::Error("no".into()));
        round_trip(&SyncRequest::ChunkHashes {
            digest: Digest::sha256(b""),
            from: 3,
        });
        round_trip(&SyncResponse::ChunkHashes(None));
        round_trip(&SyncResponse::ChunkHashes(Some(ChunkHashes {
            size: 3 << 20,
            chunk_size: crate::blob_index::chunk_size_for(3 << 20),
            from: 1,
            hashes: vec![crate::ChunkHash::of(b"a"), crate::ChunkHash::of(b"b")],
        })));
        let have = HaveChunks {
            chunk_count: 10,
            bits: vec![0b1010_0000, 0b0100_0000],
            serves: None,
        };
        assert!(have.has(0) && !have.has(1) && have.has(2) && have.has(9) && !have.has(10));
        round_trip(&SyncResponse::Have(Some(have.clone())));
        round_trip(&SyncResponse::Have(None));
        let bad = SyncResponse::Have(Some(HaveChunks {
            chunk_count: 10,
            bits: vec![0],
            serves: None,
        }));
        assert!(decode::<SyncResponse>(&encode(&bad).unwrap()).is_err());
        let report = ServeReport {
            version: 3,
            sending: vec![0b1000_0000, 0],
            sent: vec![0b0010_0000, 0b0100_0000],
        };
        let with = HaveChunks {
            serves: Some(report.clone()),
            ..have.clone()
        };
        let (sending, sent) = with.serve_bitfields().unwrap();
        assert!(sending.get(0) && !sending.get(2) && sent.get(2) && sent.get(9));
        round_trip(&SyncResponse::Have(Some(with)));
        // A report whose bitfields do not fit the chunk count is refused whole.
        for bad_report in [
            ServeReport {
                sending: vec![0],
                ..report.clone()
            },
            ServeReport {
                sent: vec![0, 0b0010_0000],
                ..report.clone()
            },
        ] {
            let bad = SyncResponse::Have(Some(HaveChunks {
                serves: Some(bad_report),
                ..have.clone()
            }));
            assert!(decode::<SyncResponse>(&encode(&bad).unwrap()).is_err());
        }
        round_trip(&ChunkRequest {
            digest: Digest::sha256(b""),
            offset: 0,
            length: 1,
        });
        round_trip(&ChunkResponse::Ok { length: 4096 });
        round_trip(&ChunkResponse::NotFound);
        round_trip(&ChunkResponse::Busy);
        round_trip(&ChunkResponse::Invalid("past the end".into()));
    }

    #[test]
    fn variant_tags_are_stable() {
        // The variant index is the first four bytes; reordering variants breaks the wire.
        assert_eq!(encode(&SyncRequest::Summary).unwrap(), [0, 0, 0, 0]);
        assert_eq!(
            &encode(&SyncResponse::Error(String::new())).unwrap()[..4],
            [0, 0, 0, 3]
        );
        assert_eq!(encode(&ChunkResponse::NotFound).unwrap(), [0, 0, 0, 1]);
        assert_eq!(encode(&ChunkResponse::Busy).unwrap(), [0, 0, 0, 2]);
        assert_eq!(
            encode(&ChunkResponse::Ok { length: 5 }).unwrap(),
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5]
        );
    }

    #[test]
    fn too_many_records_rejected_on_decode() {
        let record = sample_record(1);
        let ok = SyncResponse::Records {
            records: vec![record.clone(); MAX_SYNC_RECORDS],
            more: false,
        };
        round_trip(&ok);
        let too_many = SyncResponse::Records {
            records: vec![record; MAX_SYNC_RECORDS + 1],
            more: false,
        };
        assert_eq!(
            too_many.validate(),
            Err(MessageError::TooManyRecords {
                count: MAX_SYNC_RECORDS + 1
            })
        );
        let bytes = encode(&too_many).unwrap();
        assert!(matches!(
            decode::<SyncResponse>(&bytes),
            Err(CodecError::Decode(_))
        ));
    }

    #[test]
    fn long_reasons_rejected_on_decode() {
        let long = "x".repeat(MAX_REASON_BYTES + 1);
        let bytes = encode(&SyncResponse::Error(long.clone())).unwrap();
        assert!(decode::<SyncResponse>(&bytes).is_err());
        let bytes = encode(&ChunkResponse::Invalid(long)).unwrap();
        assert!(decode::<ChunkResponse>(&bytes).is_err());
        round_trip(&ChunkResponse::Invalid("x".repeat(MAX_REASON_BYTES)));
    }

    #[test]
    fn chunk_request_validation() {
        let req = |offset, length| ChunkRequest {
            digest: Digest::sha256(b""),
            offset,
            length,
        };
        assert!(req(0, 1).validate().is_ok());
        assert_eq!(req(10, 5).range().unwrap(), 10..15);
        assert!(req(0, MAX_CHUNK_REQUEST_BYTES).validate().is_ok());
        assert!(
            req(u64::MAX - MAX_CHUNK_REQUEST_BYTES, MAX_CHUNK_REQUEST_BYTES)
                .validate()
                .is_ok()
        );
        for bad in [
            req(0, 0),
            req(0, MAX_CHUNK_REQUEST_BYTES + 1),
            req(u64::MAX, 1),
            req(u64::MAX - 10, 11),
        ] {
            assert!(matches!(bad.validate(), Err(MessageError::BadRange(_))));
            assert!(bad.range().is_err());
            // Decoding enforces the same rules.
            let bytes = encode(&bad).unwrap();
            assert!(matches!(
                decode::<ChunkRequest>(&bytes),
                Err(CodecError::Decode(_))
            ));
        }
        let bytes = encode(&ChunkResponse::Ok {
            length: MAX_CHUNK_REQUEST_BYTES + 1,
        })
        .unwrap();
        assert!(decode::<ChunkResponse>(&bytes).is_err());
    }

    #[test]
    fn chunk_frames_fit_their_limit() {
        let request = ChunkRequest {
            digest: Digest::of(crate::Algorithm::Sha512, b""),
            offset: u64::MAX - 1,
            length: 1,
        };
        let framed = frame(&encode(&request).unwrap()).unwrap();
        assert!(framed.len() <= MAX_CHUNK_FRAME_BYTES);
        let header: [u8; 4] = framed[..4].try_into().unwrap();
        let len = frame_len(header, MAX_CHUNK_FRAME_BYTES).unwrap();
        assert_eq!(
            decode::<ChunkRequest>(&framed[4..4 + len]).unwrap(),
            request
        );
        let response = ChunkResponse::Invalid("x".repeat(MAX_REASON_BYTES));
        assert!(encode(&response).unwrap().len() <= MAX_CHUNK_FRAME_BYTES);
    }

    #[test]
    fn largest_record_fits_in_gossip_and_a_page() {
        let signed = largest_record();
        assert!(signed.verify().is_ok());
        let gossip = Gossip::Record(signed.clone());
        let bytes = gossip.to_bytes().unwrap();
        assert!(bytes.len() <= MAX_GOSSIP_BYTES, "{}", bytes.len());
        assert_eq!(Gossip::from_bytes(&bytes).unwrap(), gossip);

        let mut page = RecordsPage::new(u32::MAX);
        let mut pushed = 0;
        while page.push(signed.clone()) {
            pushed += 1;
        }
        assert!((1..MAX_SYNC_RECORDS).contains(&pushed), "{pushed}");
        let response = page.finish(true);
        let encoded = encode(&response).unwrap();
        assert!(encoded.len() <= crate::codec::MAX_FRAME_BYTES);
        assert_eq!(decode::<SyncResponse>(&encoded).unwrap(), response);
    }

    #[test]
    fn oversize_gossip_rejected() {
        let bytes = vec![0; MAX_GOSSIP_BYTES + 1];
        assert!(matches!(
            Gossip::from_bytes(&bytes),
            Err(CodecError::FrameTooLarge {
                max: MAX_GOSSIP_BYTES,
                ..
            })
        ));
    }

    #[test]
    fn records_page_counts_exactly() {
        let mut page = RecordsPage::new(0);
        assert!(page.push(sample_record(1)));
        assert!(page.is_full());
        assert!(!page.push(sample_record(2)));

        let mut page = RecordsPage::new(3);
        for n in 0..3 {
            assert!(page.push(sample_record(n)));
        }
        assert_eq!(page.len(), 3);
        let response = page.finish(false);
        let encoded = encode(&response).unwrap();
        let SyncResponse::Records { records, .. } = &response else {
            panic!("not records");
        };
        let predicted: usize = RecordsPage::OVERHEAD_BYTES
            + records
                .iter()
                .map(SignedTagRecord::encoded_len)
                .sum::<usize>();
        assert_eq!(encoded.len(), predicted);
    }

    #[test]
    fn summary_depends_on_order_and_content() {
        let (a, b) = (sample_record(1), sample_record(2));
        let summary = |records: &[&SignedTagRecord]| {
            let mut hasher = SummaryHasher::new();
            for r in records {
                hasher.add(r);
            }
            hasher.finish()
        };
        assert_eq!(summary(&[&a, &b]), summary(&[&a, &b]));
        assert_ne!(summary(&[&a, &b]), summary(&[&b, &a]));
        assert_ne!(summary(&[&a]), summary(&[&a, &b]));
        let SyncResponse::Summary { records, .. } = summary(&[&a, &b]) else {
            panic!("not a summary");
        };
        assert_eq!(records, 2);
        assert_eq!(
            summary(&[]),
            SyncResponse::Summary {
                records: 0,
                hash: *blake3::Hasher::new_derive_key(SUMMARY_CONTEXT)
                    .finalize()
                    .as_bytes()
            }
        );
    }

    #[test]
    fn chunk_hashes_that_do_not_fit_their_blob_are_refused_on_decode() {
        let size = 3 << 20;
        let good = ChunkHashes {
            size,
            chunk_size: crate::blob_index::chunk_size_for(size),
            from: 0,
            hashes: vec![crate::ChunkHash::of(b"a"); 12],
        };
        assert_eq!(good.chunk_count(), 12);
        round_trip(&SyncResponse::ChunkHashes(Some(good.clone())));
        let bad = [
            // Another chunk size than every node picks: the index would differ.
            ChunkHashes {
                chunk_size: crate::blob_index::MIN_CHUNK_SIZE_BYTES,
                ..good.clone()
            },
            // One hash past the last chunk, by count or by start.
            ChunkHashes {
                hashes: vec![crate::ChunkHash::of(b"a"); 13],
                ..good.clone()
            },
            ChunkHashes {
                from: 12,
                hashes: vec![crate::ChunkHash::of(b"a")],
                ..good.clone()
            },
            ChunkHashes {
                from: u32::MAX,
                ..good.clone()
            },
            // A blob too large for any index.
            ChunkHashes {
                size: u64::MAX,
                chunk_size: crate::blob_index::chunk_size_for(u64::MAX),
                hashes: vec![],
                ..good.clone()
            },
        ];
        for hashes in bad {
            let bytes = codec::encode(&SyncResponse::ChunkHashes(Some(hashes.clone()))).unwrap();
            assert!(
                codec::decode::<SyncResponse>(&bytes).is_err(),
                "accepted {hashes:?}"
            );
        }
    }

    fn sync_request() -> impl Strategy<Value = SyncRequest> {
        prop_oneof![
            Just(SyncRequest::Summary),
            (proptest::option::of((repo(), tag())), any::<u32>())
                .prop_map(|(after, limit)| SyncRequest::Records { after, limit }),
            digest().prop_map(|digest| SyncRequest::BlobIndex { digest }),
            digest().prop_map(|digest| SyncRequest::Have { digest }),
            (digest(), any::<u32>(), any::<u64>()).prop_map(|(digest, held, serves)| {
                SyncRequest::HaveWait {
                    digest,
                    held,
                    serves,
                }
            }),
            (repo(), tag()).prop_map(|(repo, tag)| SyncRequest::Prefetch {
                repo,
                reference: Reference::Tag(tag),
            }),
            (repo(), digest()).prop_map(|(repo, digest)| SyncRequest::Prefetch {
                repo,
                reference: Reference::Digest(digest),
            }),
            (digest(), any::<u32>())
                .prop_map(|(digest, from)| SyncRequest::ChunkHashes { digest, from }),
        ]
    }

    fn sync_response() -> impl Strategy<Value = SyncResponse> {
        prop_oneof![
            (any::<u64>(), any::<[u8; 32]>())
                .prop_map(|(records, hash)| SyncResponse::Summary { records, hash }),
            (
                proptest::collection::vec(signed_record(), 0..4),
                any::<bool>()
            )
                .prop_map(|(records, more)| SyncResponse::Records { records, more }),
            proptest::option::of(blob_index()).prop_map(SyncResponse::BlobIndex),
            ".{0,50}".prop_map(SyncResponse::Error),
            prop_oneof![
                Just(PrefetchAnswer::Queued),
                Just(PrefetchAnswer::Denied),
                Just(PrefetchAnswer::Busy)
            ]
            .prop_map(SyncResponse::Prefetch),
            (0u32..40, any::<u64>(), any::<bool>()).prop_map(|(n, version, report)| {
                let full = Bitfield::full(n).to_bytes();
                SyncResponse::Have(Some(HaveChunks {
                    chunk_count: n,
                    bits: full.clone(),
                    serves: report.then(|| ServeReport {
                        version,
                        sending: Bitfield::new(n).to_bytes(),
                        sent: full,
                    }),
                }))
            }),
            (0u64..1 << 30, 0u32..8, 0usize..8).prop_map(|(size, from, n)| {
                let chunk_size = crate::blob_index::chunk_size_for(size);
                let count = size.div_ceil(u64::from(chunk_size)) as u32;
                let from = from.min(count);
                let n = n.min((count - from) as usize);
                SyncResponse::ChunkHashes(Some(ChunkHashes {
                    size,
                    chunk_size,
                    from,
                    hashes: (0..n).map(|i| crate::ChunkHash::of(&[i as u8])).collect(),
                }))
            }),
        ]
    }

    fn chunk_request() -> impl Strategy<Value = ChunkRequest> {
        (digest(), any::<u64>(), 1..=MAX_CHUNK_REQUEST_BYTES).prop_map(
            |(digest, offset, length)| ChunkRequest {
                digest,
                offset: offset.min(u64::MAX - length),
                length,
            },
        )
    }

    fn chunk_response() -> impl Strategy<Value = ChunkResponse> {
        prop_oneof![
            (0..=MAX_CHUNK_REQUEST_BYTES).prop_map(|length| ChunkResponse::Ok { length }),
            Just(ChunkResponse::NotFound),
            Just(ChunkResponse::Busy),
            ".{0,50}".prop_map(ChunkResponse::Invalid),
        ]
    }

    fn bytes() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 0..512)
    }

    /// Bytes that start like a real message of each kind, to get past the variant tag.
    fn near_miss(valid: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
        let len = valid.len();
        (
            proptest::collection::vec((0..len.max(1), any::<u8>()), 1..4),
            0..=len,
        )
            .prop_map(move |(edits, cut)| {
                let mut bytes = valid.clone();
                for (i, b) in edits {
                    if let Some(slot) = bytes.get_mut(i) {
                        *slot = b;
                    }
                }
                bytes.truncate(cut.max(1));
                bytes
            })
    }

    proptest! {
        #[test]
        fn gossip_round_trips(signed in signed_record()) {
            let gossip = Gossip::Record(signed);
            prop_assert_eq!(Gossip::from_bytes(&gossip.to_bytes().unwrap()).unwrap(), gossip.clone());
            round_trip(&gossip);
        }

        #[test]
        fn sync_request_round_trips(request in sync_request()) {
            round_trip(&request);
        }

        #[test]
        fn sync_response_round_trips(response in sync_response()) {
            round_trip(&response);
        }

        #[test]
        fn chunk_request_round_trips(request in chunk_request()) {
            prop_assert!(request.validate().is_ok());
            round_trip(&request);
        }

        #[test]
        fn chunk_response_round_trips(response in chunk_response()) {
            round_trip(&response);
        }

        #[test]
        fn any_bytes_decode_or_err(bytes in bytes()) {
            let _ = decode::<Gossip>(&bytes);
            let _ = Gossip::from_bytes(&bytes);
            let _ = decode::<SyncRequest>(&bytes);
            let _ = decode::<SyncResponse>(&bytes);
            let _ = decode::<ChunkRequest>(&bytes);
            let _ = decode::<ChunkResponse>(&bytes);
            let _ = decode::<SignedTagRecord>(&bytes);
            let _ = decode::<BlobIndex>(&bytes);
        }

        #[test]
        fn mutated_messages_decode_or_err(
            bytes in prop_oneof![
                sync_response().prop_flat_map(|r| near_miss(encode(&r).unwrap())),
                sync_request().prop_flat_map(|r| near_miss(encode(&r).unwrap())),
                chunk_request().prop_flat_map(|r| near_miss(encode(&r).unwrap())),
                chunk_response().prop_flat_map(|r| near_miss(encode(&r).unwrap())),
            ]
        ) {
            // Whatever decodes satisfies the limits.
            if let Ok(r) = decode::<SyncResponse>(&bytes) {
                prop_assert!(r.validate().is_ok());
            }
            if let Ok(r) = decode::<ChunkRequest>(&bytes) {
                prop_assert!(r.validate().is_ok());
            }
            if let Ok(r) = decode::<ChunkResponse>(&bytes) {
                prop_assert!(r.validate().is_ok());
            }
            let _ = decode::<SyncRequest>(&bytes);
            let _ = decode::<Gossip>(&bytes);
        }
    }
}
