//! The signed caller chain: who called whom, hop by hop, each hop signed by the calling sidecar's SVID key.
//!
//! Header `trustline-caller-chain`: hops separated by `,`, oldest first. A hop is three base64url (no padding)
//! parts joined by `.`:
//!
//! ```text
//! payload . chain . signature
//! payload   = JSON {"v":1,"tid":trace id,"i":hop index,"from":caller ID,"to":[callee IDs],"m":method,
//!                   "a":authority,"p":path,"t":unix ms,"d":decision,"prev":digest of the hops before}
//! chain     = the caller's X.509-SVID chain, DER certificates concatenated (leaf first)
//! signature = TLS SignatureScheme (2 bytes, big-endian) || signature over "trustline-chain-v1." || payload part
//! digest(h) = base64url(SHA-256(hops h joined by ",")); "" for the first hop
//! ```
//!
//! Hops that one sidecar signs at the same moment (the requests of one turn of its event loop) share one
//! signature: a batch of n > 1 hops is a Merkle tree (RFC 6962 hashing: leaf = SHA-256(0x00 || "trustline-chain-v1."
//! || payload part), node = SHA-256(0x01 || left || right), an unpaired last node moves up a level unchanged), the
//! signature is over "trustline-chain-batch-v1." || root, and each hop carries a fourth part, its inclusion proof:
//!
//! ```text
//! proof     = index (2 bytes, big-endian) || batch size (2 bytes) || sibling hashes, leaf level first (32 bytes each)
//! ```
//!
//! A batch of one is an ordinary three-part hop.
//!
//! The inbound sidecar verifies every hop against the trust bundle, that indexes run 0.., that each hop's `prev`
//! is the digest of the hops before it and its caller was the previous hop's callee, that no hop is older than
//! the allowed age, and that the last hop comes from the very peer of the mTLS connection and names this
//! service as callee. The header size and the number of hops are bounded.
//!
//! The last hop is the peer's own statement, received over the mutual-TLS connection that authenticated that
//! peer: by default its signature is not checked here (the channel already proves who sent it; the signature is
//! for the services further down the chain, which check it as one of their earlier hops). With
//! [`Limits::verify_peer_signature`] it is checked too.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use trustline_identity::tls::{RotatingCert, SvidSignature, TrustBundle};

/// The header carrying the chain.
pub const HEADER: &str = "trustline-caller-chain";
const DOMAIN: &[u8] = b"trustline-chain-v1.";
/// What a batch signature covers: this, then the Merkle root of the batch.
const BATCH_DOMAIN: &[u8] = b"trustline-chain-batch-v1.";
/// Most hops under one signature (a proof is then at most 8 hashes).
pub const MAX_BATCH: usize = 256;

/// Bounds and freshness.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most hops accepted.
    pub max_hops: usize,
    /// Largest header value (bytes).
    pub max_bytes: usize,
    /// Oldest hop accepted (replay window).
    pub max_age: Duration,
    /// Clock skew tolerated for hops from the future.
    pub skew: Duration,
    /// Also verify the signature of the last hop, the one the mTLS peer itself added (`chain.verify_peer_signature`).
    pub verify_peer_signature: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_hops: 16,
            max_bytes: 32 * 1024,
            max_age: Duration::from_secs(60),
            skew: Duration::from_secs(5),
            verify_peer_signature: false,
        }
    }
}

/// One hop's signed statement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hop {
    /// Format version (1).
    pub v: u8,
    /// Trace id (W3C, 32 hex), the same in every hop.
    pub tid: String,
    /// Position, from 0.
    pub i: usize,
    /// The calling service's SPIFFE ID (the signer).
    pub from: String,
    /// The SPIFFE IDs the caller meant to reach.
    pub to: Vec<String>,
    /// Method.
    pub m: String,
    /// Authority.
    pub a: String,
    /// Path.
    pub p: String,
    /// Unix milliseconds when signed.
    pub t: i64,
    /// The caller sidecar's decision.
    pub d: String,
    /// Digest of the hops before.
    pub prev: String,
}

/// Why a chain was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChainError {
    /// Header larger than allowed.
    #[error("caller chain is {0} bytes, above the limit")]
    TooLarge(usize),
    /// More hops than allowed.
    #[error("caller chain has {0} hops, above the limit")]
    TooLong(usize),
    /// A hop is not three base64url parts or its JSON is unreadable.
    #[error("hop {hop} is malformed: {reason}")]
    Malformed {
        /// Hop position.
        hop: usize,
        /// Why.
        reason: String,
    },
    /// Hop signature or signer certificate does not verify, or the signer is not the hop's caller.
    #[error("hop {hop} is forged: {reason}")]
    Forged {
        /// Hop position.
        hop: usize,
        /// Why.
        reason: String,
    },
    /// Hops out of order, missing, or not linked.
    #[error("hop {hop} breaks the chain: {reason}")]
    Broken {
        /// Hop position.
        hop: usize,
        /// Why.
        reason: String,
    },
    /// A hop is too old (replayed) or from the future.
    #[error("hop {hop} is stale: signed {age_ms} ms ago, the limit is {max_ms} ms (replayed?)")]
    Stale {
        /// Hop position.
        hop: usize,
        /// Age.
        age_ms: i64,
        /// Limit.
        max_ms: i64,
    },
    /// The last hop was not signed by the connection's peer, or names another callee.
    #[error("last hop: {0}")]
    NotForUs(String),
}

impl ChainError {
    /// Short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::TooLarge(_) => "too_large",
            Self::TooLong(_) => "too_long",
            Self::Malformed { .. } => "malformed",
            Self::Forged { .. } => "forged",
            Self::Broken { .. } => "broken",
            Self::Stale { .. } => "stale",
            Self::NotForUs(_) => "not_for_us",
        }
    }
}

/// A verified chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The hops, oldest first.
    pub hops: Vec<Hop>,
    /// Digest of the whole header value.
    pub digest: String,
}

impl Verified {
    /// The callers, oldest first.
    pub fn callers(&self) -> Vec<String> {
        self.hops.iter().map(|h| h.from.clone()).collect()
    }
}

/// `digest(hops)`: base64url SHA-256 of the header text of `hops`.
pub fn digest(text: &str) -> String {
    if text.is_empty() {
        return String::new();
    }
    B64.encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        text.as_bytes(),
    ))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// A hop's three parts, its payload decoded.
struct Parts<'a> {
    hop: Hop,
    payload_b64: &'a str,
    chain_b64: &'a str,
    signature_b64: &'a str,
    /// The inclusion proof of a hop signed in a batch.
    proof_b64: Option<&'a str>,
}

fn parse_hop(i: usize, text: &str) -> Result<Parts<'_>, ChainError> {
    let bad = |reason: String| ChainError::Malformed { hop: i, reason };
    let mut parts = text.split('.');
    let (Some(p), Some(c), Some(s), proof, None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(bad("expected payload.chain.signature[.proof]".into()));
    };
    let payload = B64.decode(p).map_err(|e| bad(format!("payload: {e}")))?;
    let hop: Hop = serde_json::from_slice(&payload).map_err(|e| bad(format!("payload: {e}")))?;
    Ok(Parts {
        hop,
        payload_b64: p,
        chain_b64: c,
        signature_b64: s,
        proof_b64: proof,
    })
}

/// The signer's certificate chain and signature of a hop.
fn parse_signature(i: usize, parts: &Parts<'_>) -> Result<SvidSignature, ChainError> {
    let bad = |reason: String| ChainError::Malformed { hop: i, reason };
    let der = B64
        .decode(parts.chain_b64)
        .map_err(|e| bad(format!("chain: {e}")))?;
    let mut chain = Vec::new();
    let mut rest = der.as_slice();
    while !rest.is_empty() {
        let (r, _) =
            x509_parser::parse_x509_certificate(rest).map_err(|e| bad(format!("certificate: {e}")))?;
        chain.push(rest[..rest.len() - r.len()].to_vec());
        rest = r;
    }
    let sig = B64
        .decode(parts.signature_b64)
        .map_err(|e| bad(format!("signature: {e}")))?;
    if sig.len() < 3 {
        return Err(bad("signature too short".into()));
    }
    Ok(SvidSignature {
        chain,
        scheme: u16::from_be_bytes([sig[0], sig[1]]),
        signature: sig[2..].to_vec(),
    })
}

/// Verifies `value` as received from `peer` by the service `own`.
pub fn verify(
    value: &str,
    bundle: &TrustBundle,
    peer: &str,
    own: &str,
    limits: &Limits,
) -> Result<Verified, ChainError> {
    if value.len() > limits.max_bytes {
        return Err(ChainError::TooLarge(value.len()));
    }
    let texts: Vec<&str> = value.split(',').map(str::trim).collect();
    if texts.len() > limits.max_hops {
        return Err(ChainError::TooLong(texts.len()));
    }
    let now = now_ms();
    let max_ms = limits.max_age.as_millis() as i64;
    let skew_ms = limits.skew.as_millis() as i64;
    let mut hops: Vec<Hop> = Vec::with_capacity(texts.len());
    let last_i = texts.len() - 1;
    for (i, text) in texts.iter().enumerate() {
        let parts = parse_hop(i, text)?;
        let hop = &parts.hop;
        if hop.v != 1 {
            return Err(ChainError::Malformed {
                hop: i,
                reason: format!("version {}", hop.v),
            });
        }
        if hop.i != i {
            return Err(ChainError::Broken {
                hop: i,
                reason: format!(
                    "says it is hop {}: hops were reordered, removed or inserted",
                    hop.i
                ),
            });
        }
        if hop.prev != digest(&texts[..i].join(",")) {
            return Err(ChainError::Broken {
                hop: i,
                reason: "its digest of the hops before it does not match them".into(),
            });
        }
        if let Some(p) = hops.last() {
            if hop.tid != p.tid {
                return Err(ChainError::Broken {
                    hop: i,
                    reason: format!("trace id {} differs from {}", hop.tid, p.tid),
                });
            }
            if !p.to.contains(&hop.from) {
                return Err(ChainError::Broken {
                    hop: i,
                    reason: format!("caller {} was not the previous hop's callee", hop.from),
                });
            }
        }
        let age = now - hop.t;
        if age > max_ms || age < -skew_ms {
            return Err(ChainError::Stale {
                hop: i,
                age_ms: age,
                max_ms,
            });
        }
        // The peer's own hop arrived on the connection that authenticated the peer (checked below: its `from`
        // must be the peer); its signature is for the services further down the chain.
        if i != last_i || limits.verify_peer_signature {
            let sig = parse_signature(i, &parts)?;
            let msg = match parts.proof_b64 {
                None => [DOMAIN, parts.payload_b64.as_bytes()].concat(),
                Some(proof) => {
                    let root =
                        batch_root(parts.payload_b64, proof).map_err(|reason| ChainError::Malformed {
                            hop: i,
                            reason: format!("batch proof: {reason}"),
                        })?;
                    [BATCH_DOMAIN, &root[..]].concat()
                }
            };
            let at = rustls_pki_types::UnixTime::since_unix_epoch(Duration::from_millis(hop.t.max(0) as u64));
            let signer = bundle
                .verify_signature(&sig, &msg, at)
                .map_err(|reason| ChainError::Forged { hop: i, reason })?;
            if signer.to_string() != hop.from {
                return Err(ChainError::Forged {
                    hop: i,
                    reason: format!("signed by {signer}, but claims caller {}", hop.from),
                });
            }
        }
        hops.push(parts.hop);
    }
    let last = hops.last().ok_or_else(|| ChainError::Malformed {
        hop: 0,
        reason: "empty".into(),
    })?;
    if last.from != peer {
        return Err(ChainError::NotForUs(format!(
            "signed by {}, but this connection is from {peer} (truncated or replayed by another caller)",
            last.from
        )));
    }
    if !last.to.iter().any(|t| t == own) {
        return Err(ChainError::NotForUs(format!(
            "names callee {:?}, not this service {own}",
            last.to
        )));
    }
    Ok(Verified {
        hops,
        digest: digest(&texts.join(",")),
    })
}

/// What the outbound side needs to add a hop.
#[derive(Debug)]
pub struct NewHop<'a> {
    /// Trace id.
    pub tid: &'a str,
    /// Our SPIFFE ID.
    pub from: &'a str,
    /// The upstream's expected SPIFFE IDs.
    pub to: &'a [String],
    /// Method.
    pub method: &'a str,
    /// Authority.
    pub authority: &'a str,
    /// Path.
    pub path: &'a str,
}

/// The payload part of a new hop after `existing` (trimmed, `None` when empty).
fn payload_part<'e>(
    existing: Option<&'e str>,
    hop: &NewHop<'_>,
) -> Result<(Option<&'e str>, String), String> {
    let existing = existing.map(str::trim).filter(|e| !e.is_empty());
    let index = existing.map_or(0, |e| e.split(',').count());
    // `Hop`'s fields, borrowed (the same JSON without copying every string first).
    #[derive(Serialize)]
    struct HopRef<'a> {
        v: u8,
        tid: &'a str,
        i: usize,
        from: &'a str,
        to: &'a [String],
        m: &'a str,
        a: &'a str,
        p: &'a str,
        t: i64,
        d: &'a str,
        prev: String,
    }
    let payload = HopRef {
        v: 1,
        tid: hop.tid,
        i: index,
        from: hop.from,
        to: hop.to,
        m: hop.method,
        a: hop.authority,
        p: hop.path,
        t: now_ms(),
        d: "allow",
        prev: digest(existing.unwrap_or("")),
    };
    let p = B64.encode(serde_json::to_vec(&payload).map_err(|e| e.to_string())?);
    Ok((existing, p))
}

fn joined(existing: Option<&str>, hop: String) -> String {
    match existing {
        Some(e) => format!("{e},{hop}"),
        None => hop,
    }
}

/// Appends a hop, signed on its own, to `existing` (the chain the app propagated, if any) and returns the new
/// header value.
pub fn append(existing: Option<&str>, hop: &NewHop<'_>, key: &RotatingCert) -> Result<String, String> {
    let (existing, p) = payload_part(existing, hop)?;
    let (chain, sig) = sign(key, &[DOMAIN, p.as_bytes()].concat())?;
    Ok(joined(existing, format!("{p}.{chain}.{sig}")))
}

/// Signs `msg` with the SVID key: the hop's chain and signature parts (base64url).
fn sign(key: &RotatingCert, msg: &[u8]) -> Result<(String, String), String> {
    let sig = key.sign(msg).ok_or("no SVID yet")?.map_err(|e| e.to_string())?;
    let mut s = sig.scheme.to_be_bytes().to_vec();
    s.extend_from_slice(&sig.signature);
    Ok((B64.encode(sig.chain.concat()), B64.encode(s)))
}

type Digest = [u8; 32];

fn sha256(parts: &[&[u8]]) -> Digest {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for p in parts {
        ctx.update(p);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

fn leaf_hash(payload_b64: &str) -> Digest {
    sha256(&[&[0], DOMAIN, payload_b64.as_bytes()])
}

fn node_hash(left: &Digest, right: &Digest) -> Digest {
    sha256(&[&[1], left, right])
}

/// The Merkle tree over `leaves`, level by level (leaves first, the root alone last); an unpaired last node
/// moves up unchanged, which gives RFC 6962's tree shape.
fn merkle_levels(leaves: Vec<Digest>) -> Vec<Vec<Digest>> {
    let mut levels = vec![leaves];
    while let Some(level) = levels.last().filter(|l| l.len() > 1) {
        let up = level
            .chunks(2)
            .filter_map(|pair| match pair {
                [l, r] => Some(node_hash(l, r)),
                [one] => Some(*one),
                _ => None,
            })
            .collect();
        levels.push(up);
    }
    levels
}

/// The inclusion proof of leaf `index`: index, size, then the sibling at each level where there is one.
fn inclusion_proof(levels: &[Vec<Digest>], index: usize) -> Vec<u8> {
    let size = levels.first().map_or(0, Vec::len);
    let mut out = Vec::with_capacity(4 + 32 * levels.len());
    out.extend_from_slice(&(index as u16).to_be_bytes());
    out.extend_from_slice(&(size as u16).to_be_bytes());
    let mut i = index;
    for level in &levels[..levels.len().saturating_sub(1)] {
        if let Some(sibling) = level.get(i ^ 1) {
            out.extend_from_slice(sibling);
        }
        i /= 2;
    }
    out
}

/// The root a batched hop's proof leads to from its payload part.
fn batch_root(payload_b64: &str, proof_b64: &str) -> Result<Digest, String> {
    let proof = B64.decode(proof_b64).map_err(|e| e.to_string())?;
    if proof.len() < 4 || (proof.len() - 4) % 32 != 0 {
        return Err(format!("{} bytes, expected 4 + a multiple of 32", proof.len()));
    }
    let index = usize::from(u16::from_be_bytes([proof[0], proof[1]]));
    let size = usize::from(u16::from_be_bytes([proof[2], proof[3]]));
    if !(2..=MAX_BATCH).contains(&size) || index >= size {
        return Err(format!("index {index} in a batch of {size}"));
    }
    let mut path = proof[4..].chunks_exact(32).map(|c| {
        let mut d = [0u8; 32];
        d.copy_from_slice(c);
        d
    });
    let (mut i, mut n, mut h) = (index, size, leaf_hash(payload_b64));
    while n > 1 {
        if i % 2 == 1 {
            h = node_hash(&path.next().ok_or("too few hashes")?, &h);
        } else if i + 1 < n {
            h = node_hash(&h, &path.next().ok_or("too few hashes")?);
        }
        i /= 2;
        n = n.div_ceil(2);
    }
    if path.next().is_some() {
        return Err("too many hashes".into());
    }
    Ok(h)
}

/// Signs the hops this sidecar adds, one signature per batch of hops made at the same time.
///
/// A hop waits for the end of the event loop's current turn: every request that became ready in that turn adds
/// its hop first, then one task signs them all (one ECDSA signature instead of one per request). A quiet
/// sidecar signs batches of one, which are ordinary hops.
pub struct HopSigner {
    key: Arc<RotatingCert>,
    batch: bool,
    pending: Arc<Mutex<Pending>>,
}

type Signed = Result<String, String>;

#[derive(Default)]
struct Pending {
    hops: Vec<(String, oneshot::Sender<Signed>)>,
    scheduled: bool,
}

impl std::fmt::Debug for HopSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HopSigner")
            .field("batch", &self.batch)
            .finish_non_exhaustive()
    }
}

impl HopSigner {
    /// Signs with `key`; `batch = false` signs every hop on its own (`chain.batch_signatures`).
    pub fn new(key: Arc<RotatingCert>, batch: bool) -> Self {
        Self {
            key,
            batch,
            pending: Arc::default(),
        }
    }

    /// Appends our signed hop to `existing` (the chain the app propagated, if any) and returns the new header
    /// value. Batching needs a tokio runtime.
    pub async fn append(&self, existing: Option<&str>, hop: &NewHop<'_>) -> Result<String, String> {
        if !self.batch {
            return append(existing, hop, &self.key);
        }
        let (existing, p) = payload_part(existing, hop)?;
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut g = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            g.hops.push((p, tx));
            !std::mem::replace(&mut g.scheduled, true)
        };
        if start {
            let (pending, key) = (self.pending.clone(), self.key.clone());
            // A new task runs after the tasks already ready on a current-thread runtime (the one-worker
            // sidecar); a multi-thread runtime may run it next, so there it first goes to the back of the line.
            let yields = tokio::runtime::Handle::current().runtime_flavor()
                != tokio::runtime::RuntimeFlavor::CurrentThread;
            let mut guard = Unfinished(Some(pending));
            tokio::spawn(async move {
                if yields {
                    tokio::task::yield_now().await;
                }
                if let Some(pending) = &guard.0 {
                    sign_pending(pending, &key);
                }
                // Signed: nothing for the guard to undo.
                drop(guard.0.take());
            });
        }
        let text = rx.await.map_err(|_| "the hop signer stopped".to_owned())??;
        Ok(joined(existing, text))
    }
}

/// Held by the signing task until it has signed: if the task is dropped first (the runtime shutting down) or
/// panics, the waiting hops get an error instead of waiting for ever, and the next hop starts a new task.
struct Unfinished(Option<Arc<Mutex<Pending>>>);

impl Drop for Unfinished {
    fn drop(&mut self) {
        if let Some(pending) = self.0.take() {
            let mut g = pending.lock().unwrap_or_else(|p| p.into_inner());
            g.hops.clear();
            g.scheduled = false;
        }
    }
}

/// Signs everything pending, `MAX_BATCH` hops per signature.
fn sign_pending(pending: &Mutex<Pending>, key: &RotatingCert) {
    loop {
        let batch: Vec<_> = {
            let mut g = pending.lock().unwrap_or_else(|p| p.into_inner());
            if g.hops.is_empty() {
                g.scheduled = false;
                return;
            }
            let n = g.hops.len().min(MAX_BATCH);
            g.hops.drain(..n).collect()
        };
        sign_batch(batch, key);
    }
}

fn sign_batch(batch: Vec<(String, oneshot::Sender<Signed>)>, key: &RotatingCert) {
    let levels = (batch.len() > 1).then(|| merkle_levels(batch.iter().map(|(p, _)| leaf_hash(p)).collect()));
    let msg = match levels
        .as_ref()
        .and_then(|l| l.last())
        .and_then(|root| root.first())
    {
        Some(root) => [BATCH_DOMAIN, &root[..]].concat(),
        None => [DOMAIN, batch[0].0.as_bytes()].concat(),
    };
    let signed = sign(key, &msg);
    for (i, (p, tx)) in batch.into_iter().enumerate() {
        let text = match (&signed, &levels) {
            (Err(e), _) => Err(e.clone()),
            (Ok((chain, sig)), None) => Ok(format!("{p}.{chain}.{sig}")),
            (Ok((chain, sig)), Some(levels)) => Ok(format!(
                "{p}.{chain}.{sig}.{}",
                B64.encode(inclusion_proof(levels, i))
            )),
        };
        // The request may have gone meanwhile.
        let _ = tx.send(text);
    }
}

/// The callers named by a chain we built ourselves (no verification: for our own records).
pub fn callers_unverified(value: &str) -> Vec<String> {
    value
        .split(',')
        .filter_map(|h| h.split('.').next())
        .filter_map(|p| B64.decode(p).ok())
        .filter_map(|p| serde_json::from_slice::<Hop>(&p).ok())
        .map(|h| h.from)
        .collect()
}

/// Trace ids of chains this sidecar received recently, so an outbound request of the same trace without a
/// chain is known to be a restart (the app did not propagate the header).
///
/// Only ids of chains that verified are stored ([`saw`](Self::saw) is called after [`verify`]), each as 16 bytes
/// whatever the peer sent (a W3C trace id as its value, anything else by its SHA-256), in two generations swapped
/// every 30 s or when the current one holds [`CAP`](Self::CAP) ids: a peer sending a flood of distinct trace ids
/// with valid chains moves the window faster, but the tracker never holds more than about 2 MiB, and every
/// operation is O(1); an id is remembered for up to 60 s.
#[derive(Debug)]
pub struct Recent {
    gens: Mutex<(
        std::collections::HashSet<u128>,
        std::collections::HashSet<u128>,
        Instant,
    )>,
}

impl Default for Recent {
    fn default() -> Self {
        Self {
            gens: Mutex::new((Default::default(), Default::default(), Instant::now())),
        }
    }
}

impl Recent {
    const PERIOD: Duration = Duration::from_secs(30);
    /// Ids per generation (two generations of 16-byte keys, with the hash table's overhead: about 2 MiB).
    pub const CAP: usize = 32_768;

    fn key(tid: &str) -> u128 {
        if tid.len() == 32 {
            if let Ok(v) = u128::from_str_radix(tid, 16) {
                return v;
            }
        }
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, tid.as_bytes());
        let mut k = [0u8; 16];
        k.copy_from_slice(&d.as_ref()[..16]);
        u128::from_be_bytes(k)
    }

    /// Remembers `tid` (of a chain that verified).
    pub fn saw(&self, tid: &str) {
        let key = Self::key(tid);
        let mut g = self.gens.lock().unwrap_or_else(|p| p.into_inner());
        if g.2.elapsed() >= Self::PERIOD || g.0.len() >= Self::CAP {
            let current = std::mem::take(&mut g.0);
            g.1 = current;
            g.2 = Instant::now();
        }
        g.0.insert(key);
    }

    /// Whether `tid` arrived with a chain recently.
    pub fn seen(&self, tid: &str) -> bool {
        let key = Self::key(tid);
        let g = self.gens.lock().unwrap_or_else(|p| p.into_inner());
        g.0.contains(&key) || (g.2.elapsed() < Self::PERIOD * 2 && g.1.contains(&key))
    }

    /// How many ids are held (both generations).
    pub fn len(&self) -> usize {
        let g = self.gens.lock().unwrap_or_else(|p| p.into_inner());
        g.0.len() + g.1.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
    };
    use std::sync::Arc;
    use trustline_identity::spiffe_id::TrustDomain;

    pub(super) struct Td {
        pub(super) bundle: TrustBundle,
        issuer: rcgen::Issuer<'static, KeyPair>,
    }

    pub(super) fn td() -> Td {
        let key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let cert = ca.self_signed(&key).unwrap();
        let bundle =
            TrustBundle::new(TrustDomain::new("example.org").unwrap(), &[cert.der().to_vec()]).unwrap();
        Td {
            bundle,
            issuer: rcgen::Issuer::new(ca, key),
        }
    }

    pub(super) fn svid(td: &Td, id: &str) -> Arc<RotatingCert> {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.subject_alt_names.push(SanType::URI(id.try_into().unwrap()));
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        p.is_ca = IsCa::ExplicitNoCa;
        let c = p.signed_by(&key, &td.issuer).unwrap();
        let rc = Arc::new(RotatingCert::default());
        rc.set(vec![c.der().to_vec()], &key.serialize_der()).unwrap();
        rc
    }

    const A: &str = "spiffe://example.org/a";
    const B: &str = "spiffe://example.org/b";
    const C: &str = "spiffe://example.org/c";
    const TID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

    fn hop<'a>(from: &'a str, to: &'a [String]) -> NewHop<'a> {
        NewHop {
            tid: TID,
            from,
            to,
            method: "GET",
            authority: "svc",
            path: "/x",
        }
    }

    #[test]
    fn a_chain_grows_hop_by_hop_and_each_break_is_named() {
        let t = td();
        let (ka, kb) = (svid(&t, A), svid(&t, B));
        let lim = Limits::default();
        let to_b = vec![B.to_owned()];
        let to_c = vec![C.to_owned()];
        let ab = append(None, &hop(A, &to_b), &ka).unwrap();
        let v = verify(&ab, &t.bundle, A, B, &lim).unwrap();
        assert_eq!(v.callers(), vec![A]);
        let abc = append(Some(&ab), &hop(B, &to_c), &kb).unwrap();
        let v = verify(&abc, &t.bundle, B, C, &lim).unwrap();
        assert_eq!(v.callers(), vec![A, B]);
        assert_eq!(v.hops[1].i, 1);
        assert_eq!(v.digest, digest(&abc));

        // The last hop must come from the connection's peer and name us.
        assert_eq!(
            verify(&abc, &t.bundle, A, C, &lim).unwrap_err().label(),
            "not_for_us"
        );
        assert_eq!(
            verify(&ab, &t.bundle, A, C, &lim).unwrap_err().label(),
            "not_for_us"
        );
        // Reordered hops.
        let parts: Vec<&str> = abc.split(',').collect();
        let swapped = format!("{},{}", parts[1], parts[0]);
        assert_eq!(
            verify(&swapped, &t.bundle, A, B, &lim).unwrap_err().label(),
            "broken"
        );
        // Front truncated: B pretends to be the origin.
        assert_eq!(
            verify(parts[1], &t.bundle, B, C, &lim).unwrap_err().label(),
            "broken"
        );
        // Forged: B signs a hop claiming to be A; another trust domain's key; a payload changed after signing.
        let forged = append(None, &hop(A, &to_b), &kb).unwrap();
        let alien = append(None, &hop(A, &to_b), &svid(&td(), A)).unwrap();
        let (p, rest) = ab.split_once('.').unwrap();
        let mut hop0: Hop = serde_json::from_slice(&B64.decode(p).unwrap()).unwrap();
        hop0.p = "/admin".into();
        let tampered = format!("{}.{rest}", B64.encode(serde_json::to_vec(&hop0).unwrap()));
        let checked = Limits {
            verify_peer_signature: true,
            ..Limits::default()
        };
        for bad in [&forged, &alien, &tampered] {
            // As an earlier hop, passed on by B: always refused.
            let passed_on = append(Some(bad), &hop(B, &to_c), &kb).unwrap();
            let e = verify(&passed_on, &t.bundle, B, C, &lim).unwrap_err();
            assert!(matches!(e, ChainError::Forged { hop: 0, .. }), "{e}");
            // As the peer's own hop: refused when the peer's signature is checked too ...
            let e = verify(bad, &t.bundle, A, B, &checked).unwrap_err();
            assert_eq!(e.label(), "forged", "{e}");
            // ... and otherwise it is what peer A said on its own authenticated connection.
            assert_eq!(verify(bad, &t.bundle, A, B, &lim).unwrap().callers(), vec![A]);
            // Nobody else can present it as A's.
            assert_eq!(
                verify(bad, &t.bundle, B, B, &lim).unwrap_err().label(),
                "not_for_us"
            );
        }
        // Replay after the window.
        let strict = Limits {
            max_age: Duration::from_millis(50),
            ..Limits::default()
        };
        std::thread::sleep(Duration::from_millis(120));
        let e = verify(&ab, &t.bundle, A, B, &strict).unwrap_err();
        assert_eq!(e.label(), "stale", "{e}");
        // Bounds.
        let tight = Limits {
            max_hops: 1,
            ..Limits::default()
        };
        assert_eq!(
            verify(&abc, &t.bundle, B, C, &tight).unwrap_err().label(),
            "too_long"
        );
        assert_eq!(
            verify("x.y.z", &t.bundle, A, B, &lim).unwrap_err().label(),
            "malformed"
        );
    }

    #[test]
    fn a_new_hop_says_who_called_whom_with_what() {
        let t = td();
        let to = vec![B.to_owned(), C.to_owned()];
        let first = append(None, &hop(A, &to), &svid(&t, A)).unwrap();
        let text = append(Some(&first), &hop(B, &to), &svid(&t, B)).unwrap();
        let p = text.rsplit(',').next().unwrap().split('.').next().unwrap();
        let h: Hop = serde_json::from_slice(&B64.decode(p).unwrap()).unwrap();
        assert_eq!(
            (h.v, h.tid.as_str(), h.i, h.from.as_str(), &h.to[..]),
            (1, TID, 1, B, &to[..])
        );
        assert_eq!(
            (h.m.as_str(), h.a.as_str(), h.p.as_str(), h.d.as_str()),
            ("GET", "svc", "/x", "allow")
        );
        assert_eq!(h.prev, digest(&first));
        assert!((now_ms() - h.t).abs() < 10_000);
    }

    #[test]
    fn a_signing_task_that_never_ran_does_not_hold_up_later_hops() {
        let t = td();
        let signer = Arc::new(HopSigner::new(svid(&t, A), true));
        let to = vec![B.to_owned()];
        // An append polled once: its hop is pending and its signing task queued; then the runtime goes away
        // before that task runs (a sidecar shutting down).
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        {
            let _in = rt.enter();
            let h = hop(A, &to);
            let mut f = std::pin::pin!(signer.append(None, &h));
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            assert!(std::future::Future::poll(f.as_mut(), &mut cx).is_pending());
        }
        drop(rt);
        // A later hop is signed all the same.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let text = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), signer.append(None, &hop(A, &to)))
                .await
                .expect("signed, not stuck behind the task that never ran")
                .unwrap()
        });
        verify(&text, &t.bundle, A, B, &Limits::default()).unwrap();
    }

    #[test]
    fn batch_proofs_lead_to_the_root_and_nothing_else() {
        for n in (2..=17).chain([64, MAX_BATCH]) {
            let payloads: Vec<String> = (0..n).map(|i| format!("payload-{i}")).collect();
            let levels = merkle_levels(payloads.iter().map(|p| leaf_hash(p)).collect());
            let root = levels.last().unwrap()[0];
            for (i, p) in payloads.iter().enumerate() {
                let proof = inclusion_proof(&levels, i);
                assert_eq!(batch_root(p, &B64.encode(&proof)).unwrap(), root, "n={n} i={i}");
                // Another hop's payload, another index, a cut or a longer proof do not lead there.
                let other = &payloads[(i + 1) % n];
                assert_ne!(batch_root(other, &B64.encode(&proof)).unwrap(), root);
                let mut moved = proof.clone();
                moved[..2].copy_from_slice(&(((i + 1) % n) as u16).to_be_bytes());
                assert!(batch_root(p, &B64.encode(&moved)) != Ok(root));
                assert!(batch_root(p, &B64.encode(&proof[..proof.len() - 32])).is_err());
                let mut longer = proof.clone();
                longer.extend_from_slice(&[0; 32]);
                assert!(batch_root(p, &B64.encode(&longer)).is_err());
            }
        }
        // A batch is 2..=MAX_BATCH hops and the index is inside it.
        for (index, size) in [(0u16, 1u16), (2, 2), (0, MAX_BATCH as u16 + 1)] {
            let mut proof = index.to_be_bytes().to_vec();
            proof.extend_from_slice(&size.to_be_bytes());
            proof.extend_from_slice(&[0; 32]);
            assert!(batch_root("p", &B64.encode(&proof)).is_err());
        }
        assert!(batch_root("p", "!").is_err());
        assert!(batch_root("p", &B64.encode([0u8; 3])).is_err());
    }

    /// Appends `n` hops A -> B at once, each from its own task, on a current-thread runtime (the sidecar's
    /// one-worker setup): they are all pending before the signing task runs.
    async fn at_once(signer: Arc<HopSigner>, n: usize) -> Vec<String> {
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let signer = signer.clone();
                tokio::spawn(async move {
                    let to = vec![B.to_owned()];
                    let path = format!("/item/{i}");
                    let h = NewHop {
                        path: &path,
                        ..hop(A, &to)
                    };
                    signer.append(None, &h).await
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap().unwrap());
        }
        out
    }

    #[tokio::test(flavor = "current_thread")]
    async fn hops_made_together_share_one_signature_and_each_verifies() {
        let t = td();
        let (ka, kb) = (svid(&t, A), svid(&t, B));
        let checked = Limits {
            verify_peer_signature: true,
            ..Limits::default()
        };
        let hops = at_once(Arc::new(HopSigner::new(ka.clone(), true)), 12).await;
        let sigs: std::collections::HashSet<&str> =
            hops.iter().map(|h| h.split('.').nth(2).unwrap()).collect();
        assert_eq!(sigs.len(), 1, "one signature for the batch");
        let to_c = vec![C.to_owned()];
        for (i, h) in hops.iter().enumerate() {
            assert_eq!(h.split('.').count(), 4, "{h}");
            let v = verify(h, &t.bundle, A, B, &checked).unwrap();
            assert_eq!(v.hops[0].p, format!("/item/{i}"));
            // As an earlier hop, further down the chain.
            let on = append(Some(h), &hop(B, &to_c), &kb).unwrap();
            assert_eq!(
                verify(&on, &t.bundle, B, C, &Limits::default())
                    .unwrap()
                    .callers(),
                vec![A, B]
            );
        }
        // Another hop's proof, a changed payload or a cut proof: refused.
        let (p0, rest0) = hops[0].split_once('.').unwrap();
        let proof1 = hops[1].rsplit('.').next().unwrap();
        let stolen = format!("{}.{proof1}", hops[0].rsplit_once('.').unwrap().0);
        let mut hop0: Hop = serde_json::from_slice(&B64.decode(p0).unwrap()).unwrap();
        hop0.p = "/admin".into();
        let tampered = format!("{}.{rest0}", B64.encode(serde_json::to_vec(&hop0).unwrap()));
        for bad in [&stolen, &tampered] {
            let e = verify(bad, &t.bundle, A, B, &checked).unwrap_err();
            assert!(matches!(e, ChainError::Forged { hop: 0, .. }), "{e}");
        }
        let cut = &hops[0][..hops[0].len() - 10];
        let e = verify(cut, &t.bundle, A, B, &checked).unwrap_err();
        assert!(matches!(e, ChainError::Malformed { hop: 0, .. }), "{e}");

        // A hop alone is an ordinary hop; with batching off every hop is.
        let lone = at_once(Arc::new(HopSigner::new(ka.clone(), true)), 1).await;
        assert_eq!(lone[0].split('.').count(), 3);
        verify(&lone[0], &t.bundle, A, B, &checked).unwrap();
        for h in at_once(Arc::new(HopSigner::new(ka, false)), 5).await {
            assert_eq!(h.split('.').count(), 3);
            verify(&h, &t.bundle, A, B, &checked).unwrap();
        }
    }

    #[test]
    fn the_recent_tracker_is_bounded_whatever_the_peers_send() {
        let r = Recent::default();
        let long = "x".repeat(4096);
        for i in 0..(Recent::CAP * 3) {
            r.saw(&format!("{long}{i}"));
        }
        assert!(r.len() <= 2 * Recent::CAP, "{}", r.len());
        r.saw("4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(r.seen("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert!(!r.seen("4bf92f3577b34da6a3ce929d0e0e4737"));
        assert!(r.seen(&format!("{long}{}", Recent::CAP * 3 - 1)));
    }
}
