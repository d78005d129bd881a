//! Verification: walks every segment, re-computes every hash link, checks every checkpoint signature against the
//! trust bundle, and names exactly what was altered, removed or reordered.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use trustline_identity::tls::{SvidSignature, TrustBundle};

use crate::format::{
    chain_hash, checkpoint_message, decode_frame, hex, parse_header, unhex, Checkpoint, Hash, HEADER_LEN,
    KIND_CHECKPOINT, KIND_RECORD, KIND_SEALED_RECORD,
};
use crate::writer::{segments, LogError};

/// One problem found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// The record's contents (or its stored hash) changed after it was written.
    Altered {
        /// Segment file.
        segment: PathBuf,
        /// Record sequence number.
        seq: u64,
    },
    /// Records are missing.
    Removed {
        /// Segment file where the gap is.
        segment: PathBuf,
        /// First missing sequence number.
        from: u64,
        /// Last missing sequence number.
        to: u64,
    },
    /// Records appear out of order.
    Reordered {
        /// Segment file.
        segment: PathBuf,
        /// The sequence number found.
        found: u64,
        /// The one expected at that place.
        expected: u64,
    },
    /// A whole segment is missing between two others (or at the start).
    SegmentMissing {
        /// First missing sequence number.
        from: u64,
        /// Last missing sequence number.
        to: u64,
    },
    /// A segment's header does not continue the previous segment's chain.
    SegmentBroken {
        /// Segment file.
        segment: PathBuf,
        /// Why.
        reason: String,
    },
    /// Bytes after the last complete frame (a torn tail, or damage that breaks framing).
    Unreadable {
        /// Segment file.
        segment: PathBuf,
        /// Byte offset.
        offset: usize,
        /// Bytes left unread.
        bytes: usize,
    },
    /// A checkpoint's signature, signer or head does not verify.
    BadCheckpoint {
        /// Its sequence number.
        seq: u64,
        /// Why.
        reason: String,
    },
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Altered { segment, seq } => {
                write!(
                    f,
                    "record {seq} in {} was altered (its hash does not match its contents)",
                    segment.display()
                )
            }
            Self::Removed { segment, from, to } if from == to => {
                write!(f, "record {from} was removed (gap in {})", segment.display())
            }
            Self::Removed { segment, from, to } => {
                write!(
                    f,
                    "records {from}..={to} were removed (gap in {})",
                    segment.display()
                )
            }
            Self::Reordered {
                segment,
                found,
                expected,
            } => write!(
                f,
                "records reordered in {}: found record {found} where record {expected} belongs",
                segment.display()
            ),
            Self::SegmentMissing { from, to } => write!(f, "a segment is missing: records {from}..={to}"),
            Self::SegmentBroken { segment, reason } => write!(f, "segment {}: {reason}", segment.display()),
            Self::Unreadable {
                segment,
                offset,
                bytes,
            } => write!(
                f,
                "{}: {bytes} unreadable bytes at offset {offset} (torn tail or damaged framing)",
                segment.display()
            ),
            Self::BadCheckpoint { seq, reason } => write!(f, "checkpoint {seq}: {reason}"),
        }
    }
}

/// The outcome of [`verify`].
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Segments read.
    pub segments: usize,
    /// Request records read.
    pub records: u64,
    /// Checkpoints that verified.
    pub checkpoints: u64,
    /// SPIFFE IDs that signed checkpoints.
    pub signers: Vec<String>,
    /// Frames after the last valid checkpoint (hash-chained, not yet covered by a signature).
    pub uncovered: u64,
    /// Problems, in log order.
    pub findings: Vec<Finding>,
}

impl Report {
    /// No findings.
    pub fn ok(&self) -> bool {
        self.findings.is_empty()
    }
}

pub(crate) fn check_checkpoint(
    payload: &[u8],
    hashes: &dyn Fn(u64) -> Option<Hash>,
    bundle: Option<&TrustBundle>,
) -> Result<String, String> {
    let cp: Checkpoint = serde_json::from_slice(payload).map_err(|e| format!("unreadable: {e}"))?;
    let head = unhex(&cp.head_hash).ok_or("head_hash is not a hash")?;
    match hashes(cp.covers_seq) {
        Some(h) if h == head => {}
        Some(_) => return Err(format!("head hash does not match record {}", cp.covers_seq)),
        None => return Err(format!("covers record {} which is not in the log", cp.covers_seq)),
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let sig = SvidSignature {
        chain: cp
            .x5c
            .iter()
            .map(|c| b64.decode(c))
            .collect::<Result<_, _>>()
            .map_err(|e| format!("x5c: {e}"))?,
        scheme: cp.scheme,
        signature: b64.decode(&cp.sig).map_err(|e| format!("sig: {e}"))?,
    };
    let msg = checkpoint_message(cp.covers_seq, &head, cp.time);
    match bundle {
        Some(b) => {
            let at = rustls_pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_secs(
                cp.time.max(0) as u64,
            ));
            b.verify_signature(&sig, &msg, at).map(|id| id.to_string())
        }
        // Without a bundle only the chain of hashes is checked; say whose certificate it claims.
        None => sig
            .chain
            .first()
            .ok_or_else(|| "no signer certificate".to_owned())
            .and_then(|c| {
                trustline_identity::tls::svid_leaf_id(c)
                    .map(|id| format!("{id} (signature not checked: no bundle)"))
                    .map_err(|e| e.to_string())
            }),
    }
}

/// Verifies the log in `dir`. With a `bundle`, checkpoint signatures and signer certificates are verified (at the
/// time each checkpoint was signed).
pub fn verify(dir: &Path, bundle: Option<&TrustBundle>) -> Result<Report, LogError> {
    let mut r = Report::default();
    let mut expected_seq = 0u64;
    let mut prev: Hash = [0u8; 32];
    // Hashes of recent frames, for checkpoint heads (checkpoints cover frames shortly before them).
    let mut recent: std::collections::VecDeque<(u64, Hash)> = std::collections::VecDeque::new();
    let mut since_checkpoint = 0u64;
    for path in segments(dir)? {
        r.segments += 1;
        let bytes = std::fs::read(&path).map_err(|source| LogError::Io {
            path: path.clone(),
            source,
        })?;
        let Some((first, header_prev)) = parse_header(&bytes) else {
            r.findings.push(Finding::SegmentBroken {
                segment: path.clone(),
                reason: "bad header".into(),
            });
            continue;
        };
        if first > expected_seq {
            r.findings.push(Finding::SegmentMissing {
                from: expected_seq,
                to: first - 1,
            });
        } else if first < expected_seq {
            r.findings.push(Finding::SegmentBroken {
                segment: path.clone(),
                reason: format!(
                    "starts at record {first}, overlapping records up to {}",
                    expected_seq - 1
                ),
            });
        } else if header_prev != prev {
            r.findings.push(Finding::SegmentBroken {
                segment: path.clone(),
                reason: "its header does not chain to the previous segment's last record".into(),
            });
        }
        expected_seq = first;
        prev = header_prev;
        let mut off = HEADER_LEN;
        let mut frames = Vec::new();
        while let Some(f) = decode_frame(&bytes, off) {
            off += f.len();
            frames.push(f);
        }
        if off < bytes.len() {
            r.findings.push(Finding::Unreadable {
                segment: path.clone(),
                offset: off,
                bytes: bytes.len() - off,
            });
        }
        let mut i = 0;
        while i < frames.len() {
            let f = frames[i];
            if f.seq != expected_seq {
                let next_is_expected = frames.get(i + 1).is_some_and(|n| n.seq == expected_seq);
                if f.seq > expected_seq && next_is_expected {
                    // Two records swapped: report once, check both against their own hashes, move on.
                    r.findings.push(Finding::Reordered {
                        segment: path.clone(),
                        found: f.seq,
                        expected: expected_seq,
                    });
                    let g = frames[i + 1];
                    // Out of place, their links cannot match: continue from their stored hashes.
                    for fr in [g, f] {
                        prev = fr.hash;
                        count(&mut r, fr.kind, &mut since_checkpoint);
                        recent.push_back((fr.seq, fr.hash));
                    }
                    expected_seq = expected_seq.saturating_add(2);
                    i += 2;
                    continue;
                }
                if f.seq > expected_seq {
                    r.findings.push(Finding::Removed {
                        segment: path.clone(),
                        from: expected_seq,
                        to: f.seq - 1,
                    });
                } else {
                    r.findings.push(Finding::Reordered {
                        segment: path.clone(),
                        found: f.seq,
                        expected: expected_seq,
                    });
                }
                // Resynchronise on the stored hash so later problems are reported on their own.
                prev = f.hash;
                expected_seq = f.seq.saturating_add(1);
                count(&mut r, f.kind, &mut since_checkpoint);
                recent.push_back((f.seq, f.hash));
                i += 1;
                continue;
            }
            if chain_hash(&prev, f.body) != f.hash {
                r.findings.push(Finding::Altered {
                    segment: path.clone(),
                    seq: f.seq,
                });
            }
            if f.kind == KIND_CHECKPOINT {
                let lookup = |s: u64| recent.iter().rev().find(|(q, _)| *q == s).map(|(_, h)| *h);
                match check_checkpoint(f.payload, &lookup, bundle) {
                    Ok(signer) => {
                        r.checkpoints += 1;
                        since_checkpoint = 0;
                        if !r.signers.contains(&signer) {
                            r.signers.push(signer);
                        }
                    }
                    Err(reason) => r.findings.push(Finding::BadCheckpoint { seq: f.seq, reason }),
                }
            } else {
                count(&mut r, f.kind, &mut since_checkpoint);
            }
            prev = f.hash;
            recent.push_back((f.seq, f.hash));
            if recent.len() > 1 << 20 {
                recent.pop_front();
            }
            expected_seq = expected_seq.saturating_add(1);
            i += 1;
        }
    }
    r.uncovered = since_checkpoint;
    Ok(r)
}

fn count(r: &mut Report, kind: u8, since: &mut u64) {
    if kind == KIND_RECORD || kind == KIND_SEALED_RECORD {
        r.records += 1;
        *since += 1;
    }
}

/// Reads every request record of the log in `dir` (no verification), with its sequence number. Encrypted records
/// need `key`; without it, or with the wrong one, reading fails naming the first such record.
pub fn records(
    dir: &Path,
    key: Option<&crate::format::LogKey>,
) -> Result<Vec<(u64, crate::format::Record)>, RecordsError> {
    let mut out = Vec::new();
    for path in segments(dir)? {
        let bytes = std::fs::read(&path).map_err(|source| LogError::Io {
            path: path.clone(),
            source,
        })?;
        let mut off = HEADER_LEN;
        while let Some(f) = decode_frame(&bytes, off) {
            off += f.len();
            if f.kind == KIND_RECORD {
                if let Ok(rec) = serde_json::from_slice(f.payload) {
                    out.push((f.seq, rec));
                }
            } else if f.kind == KIND_SEALED_RECORD {
                let key = key.ok_or_else(|| RecordsError::Encrypted {
                    path: path.clone(),
                    seq: f.seq,
                })?;
                let json = key.open(f.seq, f.payload)?;
                if let Ok(rec) = serde_json::from_slice(&json) {
                    out.push((f.seq, rec));
                }
            }
        }
    }
    Ok(out)
}

/// Records could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecordsError {
    /// The folder or a segment could not be read.
    #[error(transparent)]
    Log(#[from] LogError),
    /// The log holds encrypted records and no key was given.
    #[error("{path}: record {seq} is encrypted (SM4-GCM): give the log key (--log-key FILE)")]
    Encrypted {
        /// The segment.
        path: std::path::PathBuf,
        /// The first encrypted record.
        seq: u64,
    },
    /// A record does not open with the key given.
    #[error(transparent)]
    Key(#[from] crate::format::KeyError),
}

/// Hex of a hash (re-exported for tools).
pub fn hash_hex(h: &Hash) -> String {
    hex(h)
}
