//! The on-disk format.
//!
//! A log is a folder of segment files `seg-<first seq, 20 digits>.tlog`. A segment starts with a 48-byte header:
//!
//! ```text
//! magic "TLLOG01\n" (8) | first_seq u64 LE (8) | prev_hash [32]  (hash of the record before first_seq; zeros at 0)
//! ```
//!
//! then frames, one per record:
//!
//! ```text
//! body_len u32 LE | body = kind u8 | seq u64 LE | payload (JSON, body_len - 9 bytes) | hash [32]
//! hash = SHA-256(prev_hash || body)
//! ```
//!
//! `kind` 1 is a request record, 2 a signed checkpoint, 3 a request record encrypted at rest (an operator's
//! choice: `[log] encryption_key_file`): its payload is `nonce (12) || SM4-GCM(record JSON) || tag (16)`, with
//! associated data `"trustline log record v1" || seq (u64 LE)`, so a sealed record cannot be moved to another
//! position unnoticed. Every frame's hash chains over the previous one (over the ciphertext for kind 3), across
//! segments, so any change, removal or reordering breaks the chain at a place `verify` can name, with or without
//! the key.

use serde::{Deserialize, Serialize};

/// Segment header magic.
pub const MAGIC: &[u8; 8] = b"TLLOG01\n";
/// Header length.
pub const HEADER_LEN: usize = 48;
/// Largest accepted frame body.
pub const MAX_BODY: usize = 1 << 20;
/// Frame kind: a request record.
pub const KIND_RECORD: u8 = 1;
/// Frame kind: a signed checkpoint.
pub const KIND_CHECKPOINT: u8 = 2;
/// Frame kind: a request record encrypted with SM4-GCM.
pub const KIND_SEALED_RECORD: u8 = 3;

/// The key that encrypts request records at rest (SM4-GCM, 16 bytes). `Debug` never shows it.
#[derive(Clone)]
pub struct LogKey([u8; 16]);

impl std::fmt::Debug for LogKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogKey(..)")
    }
}

/// A log key could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The key file could not be read, is readable by others, or holds no key.
    #[error("log key file {path}: {reason}")]
    File {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// SM4-GCM is not in this build, or a record does not open with this key.
    #[error("log record {seq}: {reason}")]
    Record {
        /// The record.
        seq: u64,
        /// What failed.
        reason: String,
    },
}

const SEAL_AAD: &[u8] = b"trustline log record v1";

impl LogKey {
    /// Reads a key file: 16 raw bytes or 32 hex digits (a trailing newline is fine), mode 0600 or stricter.
    /// Create one with `head -c 16 /dev/urandom > log.key && chmod 600 log.key`.
    pub fn from_file(path: &std::path::Path) -> Result<Self, KeyError> {
        use std::os::unix::fs::PermissionsExt;
        let bad = |reason: String| KeyError::File {
            path: path.to_owned(),
            reason,
        };
        let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(bad(format!("mode {mode:o} lets others read it: chmod 600")));
        }
        let raw = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let mut key = [0u8; 16];
        if raw.len() == 16 {
            key.copy_from_slice(&raw);
        } else {
            let text = std::str::from_utf8(&raw).map(str::trim_end).unwrap_or("");
            if text.len() != 32 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad(format!(
                    "must hold 16 raw bytes or 32 hex digits, found {} bytes",
                    raw.len()
                )));
            }
            for (i, byte) in key.iter_mut().enumerate() {
                *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|e| bad(e.to_string()))?;
            }
        }
        // Fail now, not at the first record, in a build without SM4-GCM.
        let k = Self(key);
        k.seal(0, b"{}").map_err(|e| bad(e.to_string()))?;
        Ok(k)
    }

    fn aad(seq: u64) -> Vec<u8> {
        let mut aad = SEAL_AAD.to_vec();
        aad.extend_from_slice(&seq.to_le_bytes());
        aad
    }

    /// Encrypts a record's JSON for position `seq`: `nonce || ciphertext || tag`.
    pub fn seal(&self, seq: u64, json: &[u8]) -> Result<Vec<u8>, KeyError> {
        let mut nonce = [0u8; 12];
        aws_lc_rs::rand::fill(&mut nonce).map_err(|_| KeyError::Record {
            seq,
            reason: "no randomness".into(),
        })?;
        let sealed =
            trustline_hsm::sm::sm4_gcm_seal(&self.0, &nonce, &Self::aad(seq), json).map_err(|e| {
                KeyError::Record {
                    seq,
                    reason: e.to_string(),
                }
            })?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Decrypts the payload of the sealed record at `seq`.
    pub fn open(&self, seq: u64, payload: &[u8]) -> Result<Vec<u8>, KeyError> {
        let bad = |reason: &str| KeyError::Record {
            seq,
            reason: reason.to_owned(),
        };
        let (nonce, sealed) = payload.split_at_checked(12).ok_or_else(|| bad("truncated"))?;
        let nonce: [u8; 12] = nonce.try_into().map_err(|_| bad("truncated"))?;
        trustline_hsm::sm::sm4_gcm_open(&self.0, &nonce, &Self::aad(seq), sealed)
            .map_err(|_| bad("does not open with this key (wrong key, or altered)"))
    }
}

/// A SHA-256 hash.
pub type Hash = [u8; 32];

/// `SHA-256(prev || body)`.
pub fn chain_hash(prev: &Hash, body: &[u8]) -> Hash {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    ctx.update(prev);
    ctx.update(body);
    let d = ctx.finish();
    let mut h = [0u8; 32];
    h.copy_from_slice(d.as_ref());
    h
}

/// Lowercase hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Parses lowercase or uppercase hex into a hash.
pub fn unhex(s: &str) -> Option<Hash> {
    if s.len() != 64 {
        return None;
    }
    let mut h = [0u8; 32];
    for (i, byte) in h.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(h)
}

/// The file name of the segment starting at `first_seq`.
pub fn segment_name(first_seq: u64) -> String {
    format!("seg-{first_seq:020}.tlog")
}

/// Encodes a segment header.
pub fn header(first_seq: u64, prev: &Hash) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..16].copy_from_slice(&first_seq.to_le_bytes());
    h[16..].copy_from_slice(prev);
    h
}

/// Decodes a segment header.
pub fn parse_header(b: &[u8]) -> Option<(u64, Hash)> {
    if b.len() < HEADER_LEN || &b[..8] != MAGIC {
        return None;
    }
    let seq = u64::from_le_bytes(b[8..16].try_into().ok()?);
    let mut prev = [0u8; 32];
    prev.copy_from_slice(&b[16..48]);
    Some((seq, prev))
}

/// Appends one frame to `out` and returns its hash.
pub fn encode_frame(out: &mut Vec<u8>, prev: &Hash, kind: u8, seq: u64, payload: &[u8]) -> Hash {
    let body_len = 9 + payload.len();
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
    let start = out.len();
    out.push(kind);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(payload);
    let h = chain_hash(prev, &out[start..]);
    out.extend_from_slice(&h);
    h
}

/// One decoded frame (borrowing the segment bytes).
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    /// Byte offset of the frame in its segment.
    pub offset: usize,
    /// Kind.
    pub kind: u8,
    /// Sequence number.
    pub seq: u64,
    /// Body (kind, seq, payload): what the hash covers after the previous hash.
    pub body: &'a [u8],
    /// Payload (JSON).
    pub payload: &'a [u8],
    /// Stored hash.
    pub hash: Hash,
}

/// Decodes the frame at `offset`; `None` when the bytes there are not a complete frame (a torn tail).
pub fn decode_frame(b: &[u8], offset: usize) -> Option<Frame<'_>> {
    let len_bytes = b.get(offset..offset + 4)?;
    let body_len = u32::from_le_bytes(len_bytes.try_into().ok()?) as usize;
    if !(9..=MAX_BODY).contains(&body_len) {
        return None;
    }
    let body = b.get(offset + 4..offset + 4 + body_len)?;
    let hash_b = b.get(offset + 4 + body_len..offset + 4 + body_len + 32)?;
    let kind = body[0];
    let seq = u64::from_le_bytes(body[1..9].try_into().ok()?);
    let mut hash = [0u8; 32];
    hash.copy_from_slice(hash_b);
    Some(Frame {
        offset,
        kind,
        seq,
        body,
        payload: &body[9..],
        hash,
    })
}

impl Frame<'_> {
    /// Bytes this frame occupies.
    pub fn len(&self) -> usize {
        4 + self.body.len() + 32
    }

    /// Never empty (a frame has at least its header); for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// One request a sidecar handled.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Unix time in microseconds when the request arrived.
    pub time_us: i64,
    /// W3C trace id (32 hex).
    pub trace_id: String,
    /// This hop's span id (16 hex).
    pub span_id: String,
    /// `inbound` or `outbound`.
    pub direction: String,
    /// This sidecar's SPIFFE ID.
    pub local: String,
    /// The peer's SPIFFE ID (inbound: the caller; outbound: the expected callee).
    pub peer: String,
    /// Method.
    pub method: String,
    /// Host / authority.
    pub authority: String,
    /// Path.
    pub path: String,
    /// HTTP status returned.
    pub status: u16,
    /// `allow`, `deny`, `unauthenticated`, `error`.
    pub decision: String,
    /// Deciding policy, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Deciding rule index, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<usize>,
    /// AUDIT policies that marked the request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audit: Vec<String>,
    /// Digest of the caller chain (base64url SHA-256), when one was presented or created.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub chain_digest: String,
    /// The callers, first to last, from the verified chain (inbound) or the chain sent on (outbound).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chain: Vec<String>,
    /// Request body bytes.
    pub bytes_in: u64,
    /// Response body bytes (as far as known when the response headers left).
    pub bytes_out: u64,
    /// Microseconds from request headers in to response headers out.
    pub duration_us: u64,
    /// A note (e.g. "chain restarted: the app did not propagate it").
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
}

/// A signed checkpoint: the log's head at `covers_seq`, signed with the writer's SVID key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Sequence number of the last frame covered.
    pub covers_seq: u64,
    /// That frame's hash (hex).
    pub head_hash: String,
    /// Unix time (seconds) of signing.
    pub time: i64,
    /// Signer chain, base64 DER, leaf first.
    pub x5c: Vec<String>,
    /// TLS signature scheme code point.
    pub scheme: u16,
    /// Signature (base64).
    pub sig: String,
}

/// The bytes a checkpoint signature covers.
pub fn checkpoint_message(covers_seq: u64, head_hash: &Hash, time: i64) -> Vec<u8> {
    let mut m = b"trustline-checkpoint-v1\n".to_vec();
    m.extend_from_slice(&covers_seq.to_le_bytes());
    m.extend_from_slice(head_hash);
    m.extend_from_slice(&time.to_le_bytes());
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_chain() {
        let mut buf = Vec::new();
        let h0 = [0u8; 32];
        let h1 = encode_frame(&mut buf, &h0, KIND_RECORD, 7, b"{\"a\":1}");
        let h2 = encode_frame(&mut buf, &h1, KIND_RECORD, 8, b"{}");
        let f = decode_frame(&buf, 0).unwrap();
        assert_eq!((f.seq, f.payload, f.hash), (7, &b"{\"a\":1}"[..], h1));
        assert_eq!(chain_hash(&h0, f.body), h1);
        let g = decode_frame(&buf, f.len()).unwrap();
        assert_eq!((g.seq, g.hash), (8, h2));
        assert!(decode_frame(&buf, f.len() + g.len()).is_none());
        assert!(decode_frame(&buf[..buf.len() - 1], f.len()).is_none(), "torn");
        assert_eq!(unhex(&hex(&h2)), Some(h2));
    }
}
