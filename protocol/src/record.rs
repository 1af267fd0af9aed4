//! Signed tag records: who says which manifest a tag names.
//!
//! A [`TagRecord`] says "in repository `team/app`, tag `1.4` names manifest `sha256:…`, whose
//! blobs have these sizes and [`BlobIndexId`]s", or, with no target, "tag `1.4` was deleted" (a
//! tombstone). Records are stamped with a wall-clock time, a per-publisher sequence number and
//! the publisher's key; among records for one tag the highest [`TagRecord::order_key`] wins.
//!
//! A publisher signs a record with its ed25519 key. What is signed is exact bytes: the signing
//! domain [`RECORD_SIGNING_DOMAIN`] followed by the record's [codec] encoding (the
//! payload). A [`SignedTagRecord`] carries the payload as bytes, so a verifier checks the
//! signature over exactly what the publisher signed before it decodes anything, and never
//! re-encodes a record to check a signature.
//!
//! [`SignedTagRecord::verify`] is the only way to get a [`VerifiedTagRecord`], the type the rest
//! of Shoal accepts as a trusted record. It checks, in order: the payload size, the signature
//! (strict ed25519, no malleable signatures or small-order keys), that the payload decodes to a
//! record in its canonical encoding, that the record names the same publisher that signed it,
//! and the record's limits. Whether that publisher is *trusted* for the repository is policy,
//! decided by the node.

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::Signer as _;
use serde::{Deserialize, Serialize};

use crate::blob_index::BlobIndexId;
use crate::codec;
use crate::digest::Digest;
use crate::name::{RepoName, Tag};

/// Prefix of every signed message: the protocol, the kind of object and its version. The NUL
/// ends it so that no payload can extend it into another domain.
pub const RECORD_SIGNING_DOMAIN: &[u8] = b"shoal tag record v1\0";

/// The most blobs one record may list.
pub const MAX_RECORD_BLOBS: usize = 4096;

/// The longest media type, in bytes.
pub const MAX_MEDIA_TYPE_BYTES: usize = 255;

/// The largest signed payload. Chosen so that any signed record fits in one gossip message
/// ([`MAX_GOSSIP_BYTES`](crate::message::MAX_GOSSIP_BYTES)) with room to spare; with long
/// digests this binds before [`MAX_RECORD_BLOBS`] (about 2000 sha256 blobs fit).
pub const MAX_RECORD_PAYLOAD_BYTES: usize = 255 * 1024;

/// Prefix of a [`PublisherKey`]'s text form.
const KEY_PREFIX: &str = "ed25519:";

/// Why a record could not be signed, decoded or verified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The signature does not verify with the publisher's key.
    #[error("bad signature")]
    BadSignature,
    /// The payload is not a valid, canonically encoded record.
    #[error("bad record payload: {0}")]
    Decode(String),
    /// The record names a different publisher than the key that signed it.
    #[error("record publisher does not match its signer")]
    PublisherMismatch,
    /// A size or count limit is exceeded, or a field is malformed.
    #[error("record limit: {0}")]
    Limit(String),
    /// The record could not be encoded.
    #[error("record cannot be encoded: {0}")]
    Encode(String),
    /// Not an `ed25519:<64 hex>` key, or not a usable ed25519 public key.
    #[error("invalid ed25519 public key")]
    InvalidKey,
    /// Signing failed.
    #[error("signing failed: {0}")]
    Signing(String),
}

/// An ed25519 public key that signs tag records. Text form `ed25519:<64 lowercase hex>`.
///
/// Only valid curve points that are not of small order are accepted, on parse and on
/// deserialize.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PublisherKey([u8; 32]);

impl PublisherKey {
    /// The key from its 32 raw bytes, if it is a usable ed25519 public key.
    pub fn from_bytes(bytes: [u8; 32]) -> Result<PublisherKey, RecordError> {
        let key =
            ed25519_dalek::VerifyingKey::from_bytes(&bytes).map_err(|_| RecordError::InvalidKey)?;
        if key.is_weak() {
            return Err(RecordError::InvalidKey);
        }
        Ok(PublisherKey(bytes))
    }

    /// The raw key.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    fn verifying_key(&self) -> Result<ed25519_dalek::VerifyingKey, RecordError> {
        ed25519_dalek::VerifyingKey::from_bytes(&self.0).map_err(|_| RecordError::InvalidKey)
    }
}

impl FromStr for PublisherKey {
    type Err = RecordError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex = s.strip_prefix(KEY_PREFIX).ok_or(RecordError::InvalidKey)?;
        let bytes = codec::decode_hex_lower(hex).ok_or(RecordError::InvalidKey)?;
        PublisherKey::from_bytes(bytes)
    }
}

impl TryFrom<String> for PublisherKey {
    type Error = RecordError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<PublisherKey> for String {
    fn from(k: PublisherKey) -> String {
        k.to_string()
    }
}

impl fmt::Display for PublisherKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{KEY_PREFIX}{}", hex::encode(self.0))
    }
}

impl fmt::Debug for PublisherKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublisherKey({self})")
    }
}

/// A publisher's ed25519 secret key. Its `Debug` shows only the public half, and the secret is
/// zeroed when dropped.
#[derive(Clone)]
pub struct SigningKey(pub(crate) ed25519_dalek::SigningKey);

impl SigningKey {
    /// The key whose secret seed is `seed` (32 bytes from a CSPRNG, or read from a key file).
    pub fn from_seed(seed: [u8; 32]) -> SigningKey {
        SigningKey(ed25519_dalek::SigningKey::from_bytes(&seed))
    }

    /// The public key that verifies this key's signatures.
    pub fn public(&self) -> PublisherKey {
        PublisherKey(self.0.verifying_key().to_bytes())
    }

    /// The secret seed, for saving the key. Handle with care.
    pub fn seed(&self) -> [u8; 32] {
        self.0.to_bytes()
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey(public: {})", self.public())
    }
}

/// One blob a manifest names, with the id of its [`BlobIndex`](crate::BlobIndex).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BlobRef {
    /// The blob's OCI digest.
    pub digest: Digest,
    /// The blob's size in bytes.
    pub size: u64,
    /// The id of the blob's chunk index, which a fetcher checks an index from a peer against.
    pub index: BlobIndexId,
}

/// What a tag names: a manifest and every blob it needs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TagTarget {
    /// The manifest's digest.
    pub manifest: Digest,
    /// The manifest's media type, at most [`MAX_MEDIA_TYPE_BYTES`] of printable ASCII.
    pub media_type: String,
    /// The manifest's size in bytes.
    pub size: u64,
    /// Every blob the manifest names; for an index, the child manifests and their blobs too.
    /// At most [`MAX_RECORD_BLOBS`].
    pub blobs: Vec<BlobRef>,
}

impl TagTarget {
    /// Checks the limits on the media type and the number of blobs.
    pub fn validate(&self) -> Result<(), RecordError> {
        if self.media_type.len() > MAX_MEDIA_TYPE_BYTES {
            return Err(RecordError::Limit(format!(
                "media type longer than {MAX_MEDIA_TYPE_BYTES} bytes"
            )));
        }
        if !self
            .media_type
            .bytes()
            .all(|b| b.is_ascii_graphic() || b == b' ')
        {
            return Err(RecordError::Limit(
                "media type is not printable ASCII".into(),
            ));
        }
        if self.blobs.len() > MAX_RECORD_BLOBS {
            return Err(RecordError::Limit(format!(
                "{} blobs, more than {MAX_RECORD_BLOBS}",
                self.blobs.len()
            )));
        }
        Ok(())
    }
}

/// A statement by a publisher about what a tag names, or that it was deleted.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TagRecord {
    /// The repository.
    pub repo: RepoName,
    /// The tag within it.
    pub tag: Tag,
    /// What the tag names; `None` is a tombstone: the tag was deleted.
    pub target: Option<TagTarget>,
    /// When the publisher made the statement, in milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// Breaks ties between records with the same timestamp; a publisher increments it for each
    /// record it signs.
    pub sequence: u64,
    /// Who made the statement: must be the key that signs the record.
    pub publisher: PublisherKey,
}

impl TagRecord {
    /// The key that orders records for the same tag: the highest wins (last writer wins). Ties
    /// on time are broken by sequence, then by publisher key, so every node picks the same
    /// winner.
    pub fn order_key(&self) -> (u64, u64, PublisherKey) {
        (self.timestamp_ms, self.sequence, self.publisher)
    }

    /// Whether this record deletes the tag.
    pub fn is_tombstone(&self) -> bool {
        self.target.is_none()
    }

    /// Checks the limits of the target, if any.
    pub fn validate(&self) -> Result<(), RecordError> {
        self.target.as_ref().map_or(Ok(()), TagTarget::validate)
    }
}

/// A tag record as signed bytes, as it is gossiped, synced and stored. Not trusted until
/// [`verify`](Self::verify)d.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawSignedTagRecord")]
pub struct SignedTagRecord {
    publisher: PublisherKey,
    #[serde(with = "crate::codec::byte_buf")]
    payload: Vec<u8>,
    #[serde(with = "crate::codec::fixed_bytes")]
    signature: [u8; 64],
    /// BLAKE3 of the encoding of the fields above, computed once.
    #[serde(skip)]
    id: [u8; 32],
}

/// The wire shape of a [`SignedTagRecord`]. Field order matches it.
#[derive(Deserialize)]
struct RawSignedTagRecord {
    publisher: PublisherKey,
    #[serde(with = "crate::codec::byte_buf")]
    payload: Vec<u8>,
    #[serde(with = "crate::codec::fixed_bytes")]
    signature: [u8; 64],
}

impl TryFrom<RawSignedTagRecord> for SignedTagRecord {
    type Error = RecordError;

    fn try_from(raw: RawSignedTagRecord) -> Result<Self, Self::Error> {
        SignedTagRecord::from_parts(raw.publisher, raw.payload, raw.signature)
    }
}

/// The message an ed25519 signature covers: the domain, then the payload.
fn signed_message(payload: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(RECORD_SIGNING_DOMAIN.len() + payload.len());
    message.extend_from_slice(RECORD_SIGNING_DOMAIN);
    message.extend_from_slice(payload);
    message
}

impl SignedTagRecord {
    /// Assembles a signed record (unverified) and computes its id. Refuses oversized payloads.
    fn from_parts(
        publisher: PublisherKey,
        payload: Vec<u8>,
        signature: [u8; 64],
    ) -> Result<SignedTagRecord, RecordError> {
        if payload.len() > MAX_RECORD_PAYLOAD_BYTES {
            return Err(RecordError::Limit(format!(
                "payload of {} bytes, more than {MAX_RECORD_PAYLOAD_BYTES}",
                payload.len()
            )));
        }
        let mut signed = SignedTagRecord {
            publisher,
            payload,
            signature,
            id: [0; 32],
        };
        let encoded = codec::encode(&signed).map_err(|e| RecordError::Encode(e.describe()))?;
        signed.id = *blake3::hash(&encoded).as_bytes();
        Ok(signed)
    }

    /// Signs `record` with `key`, which must be the record's publisher.
    ///
    /// The record's limits are checked first, so whatever is signed will verify.
    pub fn sign(record: &TagRecord, key: &SigningKey) -> Result<SignedTagRecord, RecordError> {
        let publisher = key.public();
        if record.publisher != publisher {
            return Err(RecordError::PublisherMismatch);
        }
        record.validate()?;
        let payload = codec::encode(record).map_err(|e| RecordError::Encode(e.describe()))?;
        if payload.len() > MAX_RECORD_PAYLOAD_BYTES {
            return Err(RecordError::Limit(format!(
                "payload of {} bytes, more than {MAX_RECORD_PAYLOAD_BYTES}",
                payload.len()
            )));
        }
        let signature = key
            .0
            .try_sign(&signed_message(&payload))
            .map_err(|e| RecordError::Signing(e.to_string()))?;
        SignedTagRecord::from_parts(publisher, payload, signature.to_bytes())
    }

    /// Checks the record and returns its trusted form. See the [module docs](self) for what is
    /// checked; the signature is checked before the payload is decoded.
    pub fn verify(&self) -> Result<VerifiedTagRecord, RecordError> {
        if self.payload.len() > MAX_RECORD_PAYLOAD_BYTES {
            return Err(RecordError::Limit("payload too large".into()));
        }
        let key = self.publisher.verifying_key()?;
        let signature = ed25519_dalek::Signature::from_bytes(&self.signature);
        key.verify_strict(&signed_message(&self.payload), &signature)
            .map_err(|_| RecordError::BadSignature)?;

        // Only signed bytes are decoded from here on.
        let record: TagRecord =
            codec::decode(&self.payload).map_err(|e| RecordError::Decode(e.describe()))?;
        if record.publisher != self.publisher {
            return Err(RecordError::PublisherMismatch);
        }
        // One record, one payload: otherwise a publisher's record could circulate under several
        // ids.
        let canonical = codec::encode(&record).map_err(|e| RecordError::Encode(e.describe()))?;
        if canonical != self.payload {
            return Err(RecordError::Decode(
                "payload is not canonically encoded".into(),
            ));
        }
        record.validate()?;
        Ok(VerifiedTagRecord {
            record,
            signed: self.clone(),
        })
    }

    /// A stable id for deduplication: BLAKE3 of the record's codec encoding.
    pub fn id(&self) -> [u8; 32] {
        self.id
    }

    /// The key the record claims to be signed by (unverified until [`verify`](Self::verify)).
    pub fn publisher(&self) -> PublisherKey {
        self.publisher
    }

    /// Length of this record's codec encoding, without encoding it.
    pub fn encoded_len(&self) -> usize {
        // publisher: u64 length + "ed25519:" + 64 hex; payload: u64 length + bytes; signature.
        (8 + KEY_PREFIX.len() + 64) + (8 + self.payload.len()) + 64
    }

    /// The signed payload: the codec encoding of a [`TagRecord`].
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }
}

impl fmt::Debug for SignedTagRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignedTagRecord")
            .field("id", &hex::encode(self.id))
            .field("publisher", &self.publisher)
            .field("payload_bytes", &self.payload.len())
            .finish_non_exhaustive()
    }
}

/// A tag record whose signature, publisher and limits have been checked.
///
/// Only [`SignedTagRecord::verify`] makes one, so holding one is proof of those checks. It
/// cannot be deserialized: store and send the [`signed`](Self::signed) form and verify it again
/// when it is read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedTagRecord {
    record: TagRecord,
    signed: SignedTagRecord,
}

impl VerifiedTagRecord {
    /// Signs `record` with `key` and returns the verified result.
    pub fn sign(record: &TagRecord, key: &SigningKey) -> Result<VerifiedTagRecord, RecordError> {
        SignedTagRecord::sign(record, key)?.verify()
    }

    /// The record.
    pub fn record(&self) -> &TagRecord {
        &self.record
    }

    /// The signed form, to store or send.
    pub fn signed(&self) -> &SignedTagRecord {
        &self.signed
    }

    /// The signed form, to store or send.
    pub fn into_signed(self) -> SignedTagRecord {
        self.signed
    }
}

/// Proptest strategies shared by this crate's tests.
#[cfg(test)]
pub(crate) mod strategies {
    use super::*;
    use crate::blob_index::strategies::{blob_index_id, digest};
    use proptest::prelude::*;

    pub(crate) fn signing_key() -> impl Strategy<Value = SigningKey> {
        any::<[u8; 32]>().prop_map(SigningKey::from_seed)
    }

    pub(crate) fn repo() -> impl Strategy<Value = RepoName> {
        "[a-z0-9]{1,8}(/[a-z0-9]{1,8}){0,2}".prop_map(|s| s.parse().unwrap())
    }

    pub(crate) fn tag() -> impl Strategy<Value = Tag> {
        "[a-zA-Z0-9_][a-zA-Z0-9._-]{0,20}".prop_map(|s| s.parse().unwrap())
    }

    pub(crate) fn target() -> impl Strategy<Value = TagTarget> {
        let blob =
            (digest(), any::<u64>(), blob_index_id()).prop_map(|(digest, size, index)| BlobRef {
                digest,
                size,
                index,
            });
        (
            digest(),
            "[ -~]{0,60}",
            any::<u64>(),
            proptest::collection::vec(blob, 0..6),
        )
            .prop_map(|(manifest, media_type, size, blobs)| TagTarget {
                manifest,
                media_type,
                size,
                blobs,
            })
    }

    /// A record and the key that signs it.
    pub(crate) fn record() -> impl Strategy<Value = (TagRecord, SigningKey)> {
        (
            repo(),
            tag(),
            proptest::option::weighted(0.8, target()),
            any::<u64>(),
            any::<u64>(),
            signing_key(),
        )
            .prop_map(|(repo, tag, target, timestamp_ms, sequence, key)| {
                let record = TagRecord {
                    repo,
                    tag,
                    target,
                    timestamp_ms,
                    sequence,
                    publisher: key.public(),
                };
                (record, key)
            })
    }

    pub(crate) fn signed_record() -> impl Strategy<Value = SignedTagRecord> {
        record().prop_map(|(record, key)| SignedTagRecord::sign(&record, &key).unwrap())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode, encode};
    use proptest::prelude::*;

    fn key(n: u8) -> SigningKey {
        SigningKey::from_seed([n; 32])
    }

    fn record(key: &SigningKey) -> TagRecord {
        TagRecord {
            repo: "team/app".parse().unwrap(),
            tag: "1.4".parse().unwrap(),
            target: Some(TagTarget {
                manifest: Digest::sha256(b"manifest"),
                media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                size: 512,
                blobs: vec![BlobRef {
                    digest: Digest::sha256(b"layer"),
                    size: 5,
                    index: crate::BlobIndex::of(b"layer", crate::MAX_AUTO_CHUNK_SIZE_BYTES)
                        .unwrap()
                        .id(),
                }],
            }),
            timestamp_ms: 1_700_000_000_000,
            sequence: 3,
            publisher: key.public(),
        }
    }

    /// Signs `payload` with `key` and wraps it as coming from `publisher`, bypassing `sign`'s
    /// checks, as a hostile peer could.
    fn forge(publisher: PublisherKey, payload: Vec<u8>, key: &SigningKey) -> SignedTagRecord {
        let signature = key.0.sign(&signed_message(&payload)).to_bytes();
        SignedTagRecord::from_parts(publisher, payload, signature).unwrap()
    }

    #[test]
    fn sign_verify_round_trip() {
        let k = key(1);
        let r = record(&k);
        let signed = SignedTagRecord::sign(&r, &k).unwrap();
        assert_eq!(signed.publisher(), k.public());
        let verified = signed.verify().unwrap();
        assert_eq!(verified.record(), &r);
        assert_eq!(verified.signed(), &signed);
        assert_eq!(VerifiedTagRecord::sign(&r, &k).unwrap(), verified);
        assert_eq!(verified.into_signed(), signed);
        // Ed25519 is deterministic: signing twice gives the same bytes and id.
        assert_eq!(SignedTagRecord::sign(&r, &k).unwrap().id(), signed.id());
    }

    #[test]
    fn tombstone_round_trip() {
        let k = key(2);
        let r = TagRecord {
            target: None,
            ..record(&k)
        };
        assert!(r.is_tombstone());
        let verified = VerifiedTagRecord::sign(&r, &k).unwrap();
        assert!(verified.record().is_tombstone());
    }

    #[test]
    fn signed_by_a_claiming_b_fails() {
        let (a, b) = (key(1), key(2));
        // `sign` refuses outright.
        assert_eq!(
            SignedTagRecord::sign(&record(&b), &a),
            Err(RecordError::PublisherMismatch)
        );
        // A forged envelope: payload claims B, signed by A, outer publisher A.
        let payload = encode(&record(&b)).unwrap();
        let forged = forge(a.public(), payload.clone(), &a);
        assert_eq!(forged.verify(), Err(RecordError::PublisherMismatch));
        // Outer publisher B, but signed by A.
        let forged = forge(b.public(), payload, &a);
        assert_eq!(forged.verify(), Err(RecordError::BadSignature));
    }

    #[test]
    fn signature_covers_the_domain() {
        let k = key(1);
        let payload = encode(&record(&k)).unwrap();
        let signature = k.0.sign(&payload).to_bytes();
        let undomained = SignedTagRecord::from_parts(k.public(), payload, signature).unwrap();
        assert_eq!(undomained.verify(), Err(RecordError::BadSignature));
    }

    #[test]
    fn garbage_payload_with_valid_signature_fails_decode() {
        let k = key(1);
        let forged = forge(k.public(), b"not a record".to_vec(), &k);
        assert!(matches!(forged.verify(), Err(RecordError::Decode(_))));
        let mut payload = encode(&record(&k)).unwrap();
        payload.push(0);
        let forged = forge(k.public(), payload, &k);
        assert!(matches!(forged.verify(), Err(RecordError::Decode(_))));
    }

    #[test]
    fn limits_enforced_on_sign_and_verify() {
        let k = key(1);
        let mut r = record(&k);
        let target = r.target.as_mut().unwrap();
        target.media_type = "a".repeat(MAX_MEDIA_TYPE_BYTES + 1);
        assert!(matches!(
            SignedTagRecord::sign(&r, &k),
            Err(RecordError::Limit(_))
        ));
        let forged = forge(k.public(), encode(&r).unwrap(), &k);
        assert!(matches!(forged.verify(), Err(RecordError::Limit(_))));

        let mut r = record(&k);
        r.target.as_mut().unwrap().media_type = "text/plain\n".into();
        assert!(matches!(
            SignedTagRecord::sign(&r, &k),
            Err(RecordError::Limit(_))
        ));

        let mut r = record(&k);
        let target = r.target.as_mut().unwrap();
        target.blobs = vec![target.blobs[0].clone(); MAX_RECORD_BLOBS + 1];
        assert!(matches!(
            SignedTagRecord::sign(&r, &k),
            Err(RecordError::Limit(_))
        ));
        // Within the blob count but over the payload size.
        target_blobs(&mut r, MAX_RECORD_BLOBS);
        assert!(matches!(
            SignedTagRecord::sign(&r, &k),
            Err(RecordError::Limit(_))
        ));
        target_blobs(&mut r, 1000);
        assert!(SignedTagRecord::sign(&r, &k).unwrap().verify().is_ok());
    }

    fn target_blobs(r: &mut TagRecord, n: usize) {
        let target = r.target.as_mut().unwrap();
        let blob = target.blobs[0].clone();
        target.blobs = vec![blob; n];
    }

    #[test]
    fn oversized_payload_refused_on_decode() {
        #[derive(Serialize)]
        struct Raw {
            publisher: PublisherKey,
            #[serde(with = "crate::codec::byte_buf")]
            payload: Vec<u8>,
            #[serde(with = "crate::codec::fixed_bytes")]
            signature: [u8; 64],
        }
        let raw = Raw {
            publisher: key(1).public(),
            payload: vec![0; MAX_RECORD_PAYLOAD_BYTES + 1],
            signature: [0; 64],
        };
        assert!(decode::<SignedTagRecord>(&encode(&raw).unwrap()).is_err());
    }

    #[test]
    fn order_key_orders_time_then_sequence_then_publisher() {
        let (a, b) = (key(1), key(2));
        let base = record(&a);
        let later = TagRecord {
            timestamp_ms: base.timestamp_ms + 1,
            sequence: 0,
            ..base.clone()
        };
        let next_seq = TagRecord {
            sequence: base.sequence + 1,
            ..base.clone()
        };
        let other = TagRecord {
            publisher: b.public(),
            ..base.clone()
        };
        assert!(later.order_key() > next_seq.order_key());
        assert!(next_seq.order_key() > base.order_key());
        assert_ne!(other.order_key(), base.order_key());
        assert_eq!(
            other.order_key() > base.order_key(),
            b.public() > a.public()
        );
        // A tombstone with a higher key wins over a live record.
        let tombstone = TagRecord {
            target: None,
            ..later.clone()
        };
        assert!(tombstone.order_key() > base.order_key());
    }

    #[test]
    fn publisher_key_text_form() {
        let k = key(7).public();
        let s = k.to_string();
        assert!(s.starts_with("ed25519:") && s.len() == 8 + 64, "{s}");
        assert_eq!(s.parse::<PublisherKey>().unwrap(), k);
        assert_eq!(serde_json::to_string(&k).unwrap(), format!("\"{s}\""));
        assert_eq!(
            serde_json::from_str::<PublisherKey>(&format!("\"{s}\"")).unwrap(),
            k
        );
        assert_eq!(decode::<PublisherKey>(&encode(&k).unwrap()).unwrap(), k);
        for bad in [
            String::new(),
            s[8..].to_string(),
            s.to_uppercase(),
            format!("ed25519:{}", s[8..].to_uppercase()),
            format!("ed448:{}", &s[8..]),
            format!("{s}0"),
            s[..s.len() - 1].to_string(),
            // The identity point: a small-order key.
            format!("ed25519:01{}", "00".repeat(31)),
            // y = 2, not on the curve.
            format!("ed25519:02{}", "00".repeat(31)),
        ] {
            assert_eq!(
                bad.parse::<PublisherKey>(),
                Err(RecordError::InvalidKey),
                "{bad}"
            );
        }
    }

    #[test]
    fn signing_key_debug_hides_secret() {
        let k = key(0xab);
        let debug = format!("{k:?}");
        assert!(!debug.contains(&hex::encode(k.seed())), "{debug}");
        assert!(!debug.contains("171, 171"), "{debug}");
        assert!(debug.contains(&k.public().to_string()));
        assert_eq!(SigningKey::from_seed(k.seed()).public(), k.public());
    }

    #[test]
    fn json_round_trip() {
        let k = key(1);
        let signed = SignedTagRecord::sign(&record(&k), &k).unwrap();
        let json = serde_json::to_string(&signed).unwrap();
        let back: SignedTagRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(back.id(), signed.id());
        assert!(back.verify().is_ok());
    }

    proptest! {
        #[test]
        fn codec_round_trip(signed in strategies::signed_record()) {
            let encoded = encode(&signed).unwrap();
            let back: SignedTagRecord = decode(&encoded).unwrap();
            prop_assert_eq!(back.id(), signed.id());
            prop_assert_eq!(back.id(), *blake3::hash(&encoded).as_bytes());
            prop_assert_eq!(signed.encoded_len(), encoded.len());
            let verified = back.verify().unwrap();
            prop_assert_eq!(verified.signed(), &signed);
        }

        #[test]
        fn record_codec_round_trip((record, _key) in strategies::record()) {
            let back: TagRecord = decode(&encode(&record).unwrap()).unwrap();
            prop_assert_eq!(back, record);
        }

        #[test]
        fn any_bit_flip_fails(
            signed in strategies::signed_record(),
            pos in any::<prop::sample::Index>(),
            bit in 0u8..8,
        ) {
            let mut encoded = encode(&signed).unwrap();
            let i = pos.index(encoded.len());
            encoded[i] ^= 1 << bit;
            if let Ok(mutated) = decode::<SignedTagRecord>(&encoded) {
                prop_assert!(mutated.verify().is_err(), "flip at byte {} bit {} verified", i, bit);
            }
        }

        #[test]
        fn any_bytes_decode_or_err(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(signed) = decode::<SignedTagRecord>(&bytes) {
                prop_assert!(signed.verify().is_err());
            }
        }

        #[test]
        fn any_payload_verifies_or_errs(
            payload in proptest::collection::vec(any::<u8>(), 0..400),
            seed in any::<[u8; 32]>(),
        ) {
            // A validly signed but arbitrary payload never panics the verifier.
            let k = SigningKey::from_seed(seed);
            let _ = forge(k.public(), payload, &k).verify();
        }

        #[test]
        fn order_key_is_total_and_matches_fields(
            (a, _) in strategies::record(),
            (b, _) in strategies::record(),
        ) {
            let expected = (a.timestamp_ms, a.sequence, a.publisher)
                .cmp(&(b.timestamp_ms, b.sequence, b.publisher));
            prop_assert_eq!(a.order_key().cmp(&b.order_key()), expected);
        }
    }
}
