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
//! The inbound sidecar verifies every hop against the trust bundle, that indexes run 0.., that each hop's `prev`
//! is the digest of the hops before it and its caller was the previous hop's callee, that no hop is older than
//! the allowed age, and that the last hop comes from the very peer of the mTLS connection and names this
//! service as callee. The header size and the number of hops are bounded.
//!
//! The last hop is the peer's own statement, received over the mutual-TLS connection that authenticated that
//! peer: by default its signature is not checked here (the channel already proves who sent it; the signature is
//! for the services further down the chain, which check it as one of their earlier hops). With
//! [`Limits::verify_peer_signature`] it is checked too.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use trustline_identity::tls::{RotatingCert, SvidSignature, TrustBundle};

/// The header carrying the chain.
pub const HEADER: &str = "trustline-caller-chain";
const DOMAIN: &[u8] = b"trustline-chain-v1.";

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
}

fn parse_hop(i: usize, text: &str) -> Result<Parts<'_>, ChainError> {
    let bad = |reason: String| ChainError::Malformed { hop: i, reason };
    let mut parts = text.split('.');
    let (Some(p), Some(c), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(bad("expected payload.chain.signature".into()));
    };
    let payload = B64.decode(p).map_err(|e| bad(format!("payload: {e}")))?;
    let hop: Hop = serde_json::from_slice(&payload).map_err(|e| bad(format!("payload: {e}")))?;
    Ok(Parts {
        hop,
        payload_b64: p,
        chain_b64: c,
        signature_b64: s,
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
            let mut msg = DOMAIN.to_vec();
            msg.extend_from_slice(parts.payload_b64.as_bytes());
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

/// Appends a signed hop to `existing` (the chain the app propagated, if any) and returns the new header value.
pub fn append(existing: Option<&str>, hop: &NewHop<'_>, key: &RotatingCert) -> Result<String, String> {
    let existing = existing.map(str::trim).filter(|e| !e.is_empty());
    let index = existing.map_or(0, |e| e.split(',').count());
    let payload = Hop {
        v: 1,
        tid: hop.tid.to_owned(),
        i: index,
        from: hop.from.to_owned(),
        to: hop.to.to_vec(),
        m: hop.method.to_owned(),
        a: hop.authority.to_owned(),
        p: hop.path.to_owned(),
        t: now_ms(),
        d: "allow".into(),
        prev: digest(existing.unwrap_or("")),
    };
    let p = B64.encode(serde_json::to_vec(&payload).map_err(|e| e.to_string())?);
    let mut msg = DOMAIN.to_vec();
    msg.extend_from_slice(p.as_bytes());
    let sig = key.sign(&msg).ok_or("no SVID yet")?.map_err(|e| e.to_string())?;
    let mut s = sig.scheme.to_be_bytes().to_vec();
    s.extend_from_slice(&sig.signature);
    let text = format!("{p}.{}.{}", B64.encode(sig.chain.concat()), B64.encode(s));
    Ok(match existing {
        Some(e) => format!("{e},{text}"),
        None => text,
    })
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
/// Two generations of ids, swapped every 30 s (or when the current one holds 100,000 ids): memory is bounded
/// and every operation is O(1); an id is remembered for 30 to 60 s.
#[derive(Debug)]
pub struct Recent {
    gens: Mutex<(
        std::collections::HashSet<String>,
        std::collections::HashSet<String>,
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
    const CAP: usize = 100_000;

    /// Remembers `tid`.
    pub fn saw(&self, tid: &str) {
        let mut g = self.gens.lock().unwrap_or_else(|p| p.into_inner());
        if g.2.elapsed() >= Self::PERIOD || g.0.len() >= Self::CAP {
            let current = std::mem::take(&mut g.0);
            g.1 = current;
            g.2 = Instant::now();
        }
        if !g.0.contains(tid) {
            g.0.insert(tid.to_owned());
        }
    }

    /// Whether `tid` arrived with a chain recently.
    pub fn seen(&self, tid: &str) -> bool {
        let g = self.gens.lock().unwrap_or_else(|p| p.into_inner());
        g.0.contains(tid) || (g.2.elapsed() < Self::PERIOD * 2 && g.1.contains(tid))
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
}
