//! An inbound peer stays verified for as long as its connection takes requests.
//!
//! The inbound handshake verifies the peer's X.509-SVID once (a full handshake every time: sessions are never
//! resumed, see `trustline_identity::tls::server_config`). A connection can outlive that check: HTTP/1.1
//! keep-alive and HTTP/2 connections carry requests for as long as both ends keep them open, past the end of
//! the SVID or the removal of its root from the bundle. Envoy and Linkerd let such a connection go on; here every
//! request on an inbound HTTP connection is checked first ([`LivePeer::check`]):
//!
//! - past the notAfter of the peer's chain (the earliest of its certificates), the request is refused (403
//!   `{"error": "peer_certificate_expired", ...}`, or gRPC `PERMISSION_DENIED`), and the connection drains: it
//!   takes no new request and closes once those in flight are answered (HTTP/1.1 `Connection: close`, HTTP/2
//!   GOAWAY);
//! - when the trust bundle changed since the chain last verified, the chain is verified again against the roots
//!   now in force (once per chain and change, not per request); if it no longer verifies, the same, as
//!   `peer_not_trusted`.
//!
//! The hot path is one clock read and comparison and two atomic loads (the bundle's generation and the one this
//! chain last verified at).
//!
//! So that a well-behaved peer never meets that 403, a connection is retired ahead of its peer's expiry, once
//! less than a tenth of the chain's lifetime is left (agents renew an SVID at `svid.rotate_fraction` of its
//! lifetime, half by default and at most 0.9, so the peer holds a newer one by then): an HTTP/2 connection sends
//! GOAWAY at that time, busy or idle; an idle (parked) HTTP/1.1 connection is closed then; every response from
//! then on says `Connection: close` (HTTP/1.1) or is followed by GOAWAY (HTTP/2). The client's next request opens
//! a new connection, with its current SVID. A peer that could not renew its SVID (its agent cannot reach the CA)
//! pays a full handshake per request in that last tenth, and is then refused at the handshake anyway.
//!
//! The chains of live connections are interned by their SHA-256: the connections of one peer share one copy and
//! one parse, and an idle connection holds no chain of its own.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::{CertificateDer, UnixTime};
use trustline_identity::tls::{svid_leaf_id, Refusal, SvidError, TrustBundle};
use x509_parser::prelude::{FromDer as _, X509Certificate};

use crate::park::Retire;

/// Why a live connection takes no new request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The peer's chain is past its notAfter.
    Expired,
    /// The peer's chain no longer verifies against the trust bundle (its root was removed).
    NotTrusted,
}

impl Refused {
    /// The stable label: the `error` of the 403's body, the `decision` of the request metric and record.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Expired => "peer_certificate_expired",
            Self::NotTrusted => "peer_not_trusted",
        }
    }

    fn code(self) -> u8 {
        match self {
            Self::Expired => 1,
            Self::NotTrusted => 2,
        }
    }
}

/// What to do with one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Serve it.
    Serve,
    /// Serve it; the connection was told to drain (its peer's chain is in the last tenth of its life).
    ServeAndRetire,
    /// Refuse it; the connection was told to drain.
    Refuse {
        /// The label.
        why: Refused,
        /// What is wrong, with the values at fault.
        reason: String,
    },
}

/// A peer's certificate chain as its handshake verified it, shared by the connections that presented it.
#[derive(Debug)]
pub struct PeerChain {
    id: Arc<str>,
    /// Leaf first.
    certs: Vec<CertificateDer<'static>>,
    /// The earliest notAfter of the chain (unix seconds).
    not_after: u64,
    /// From then on (unix seconds) a connection is retired: a tenth of the leaf's lifetime before `not_after`.
    retire_from: u64,
    /// The bundle generation the chain last verified at.
    verified: AtomicU64,
}

impl PeerChain {
    /// The peer's SPIFFE ID.
    pub fn id(&self) -> &Arc<str> {
        &self.id
    }

    /// Parses a chain the handshake verified.
    fn parse(certs: &[CertificateDer<'_>], generation: u64) -> Result<Self, SvidError> {
        let leaf = certs
            .first()
            .ok_or_else(|| SvidError::Malformed("no certificate".into()))?;
        let id = svid_leaf_id(leaf)?;
        let mut not_before = 0u64;
        let mut not_after = u64::MAX;
        for (i, der) in certs.iter().enumerate() {
            let (_, c) = X509Certificate::from_der(der)
                .map_err(|e| SvidError::Malformed(format!("certificate #{i}: {e}")))?;
            let secs = |t: x509_parser::time::ASN1Time| u64::try_from(t.timestamp()).unwrap_or(0);
            if i == 0 {
                not_before = secs(c.validity().not_before);
            }
            not_after = not_after.min(secs(c.validity().not_after));
        }
        let lifetime = not_after.saturating_sub(not_before);
        Ok(Self {
            id: Arc::from(id.to_string()),
            certs: certs.iter().map(|c| c.clone().into_owned()).collect(),
            not_after,
            retire_from: not_after - lifetime / 10,
            verified: AtomicU64::new(generation),
        })
    }

    fn expired_reason(&self) -> String {
        let at = UNIX_EPOCH + Duration::from_secs(self.not_after);
        format!(
            "the certificate of {} expired at {} (notAfter, unix {}); this connection takes no new request",
            self.id,
            humantime::format_rfc3339_seconds(at),
            self.not_after
        )
    }
}

/// Chains of live connections by SHA-256, and when to sweep out the dead entries.
#[derive(Debug, Default)]
struct Interned {
    chains: HashMap<[u8; 32], Weak<PeerChain>>,
    sweep_at: usize,
}

/// The inbound peers of one sidecar: the trust bundle they are checked against, and their chains.
#[derive(Debug)]
pub struct Peers {
    bundle: TrustBundle,
    interned: Mutex<Interned>,
}

impl Peers {
    /// Peers checked against `bundle` (the one the handshakes verify against).
    pub fn new(bundle: TrustBundle) -> Arc<Self> {
        Arc::new(Self {
            bundle,
            interned: Mutex::default(),
        })
    }

    /// The bundle's generation: read it before a handshake, and give it to [`chain`](Self::chain) after.
    pub fn generation(&self) -> u64 {
        self.bundle.generation()
    }

    /// The chain (leaf first) a handshake verified, the bundle being at `generation` or later when it did.
    pub fn chain(&self, certs: &[CertificateDer<'_>], generation: u64) -> Result<Arc<PeerChain>, SvidError> {
        let key = {
            let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
            for c in certs {
                ctx.update(&(c.len() as u64).to_le_bytes());
                ctx.update(c);
            }
            let mut k = [0u8; 32];
            k.copy_from_slice(ctx.finish().as_ref());
            k
        };
        let mut interned = self.interned.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(chain) = interned.chains.get(&key).and_then(Weak::upgrade) {
            // This handshake verified the chain again, perhaps against newer roots.
            chain.verified.fetch_max(generation, Ordering::AcqRel);
            return Ok(chain);
        }
        let chain = Arc::new(PeerChain::parse(certs, generation)?);
        if interned.chains.len() >= interned.sweep_at {
            interned.chains.retain(|_, w| w.strong_count() > 0);
            interned.sweep_at = (interned.chains.len() * 2).max(256);
        }
        interned.chains.insert(key, Arc::downgrade(&chain));
        Ok(chain)
    }
}

/// One inbound connection's peer, checked on each of its requests.
#[derive(Debug)]
pub struct LivePeer {
    peers: Arc<Peers>,
    chain: Arc<PeerChain>,
    /// 0, or the [`Refused`] code once a request was refused (every later one is too).
    refused: AtomicU8,
    retire: Arc<Retire>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl LivePeer {
    /// The peer of a connection opened now, whose handshake verified `chain`.
    pub fn new(peers: &Arc<Peers>, chain: Arc<PeerChain>) -> Self {
        Self::opened_at(peers, chain, unix_now())
    }

    fn opened_at(peers: &Arc<Peers>, chain: Arc<PeerChain>, now: u64) -> Self {
        // Opened later, the connection is retired by its first request: a timer at once would close it before
        // that request arrives.
        let at = (now < chain.retire_from)
            .then(|| tokio::time::Instant::now() + Duration::from_secs(chain.retire_from - now));
        Self {
            peers: peers.clone(),
            chain,
            refused: AtomicU8::new(0),
            retire: Arc::new(Retire::new(at)),
        }
    }

    /// The peer's SPIFFE ID.
    pub fn id(&self) -> &Arc<str> {
        &self.chain.id
    }

    /// What drains the connection: give it to `Lot::serve_retiring`.
    pub fn retire(&self) -> Arc<Retire> {
        self.retire.clone()
    }

    /// Whether the connection may carry one more request (see the module documentation). Anything but
    /// [`Verdict::Serve`] has already told the connection to drain.
    pub fn check(&self) -> Verdict {
        self.check_at(unix_now())
    }

    fn check_at(&self, now: u64) -> Verdict {
        let chain = &*self.chain;
        match self.refused.load(Ordering::Acquire) {
            0 => {}
            1 => return self.refuse(Refused::Expired, chain.expired_reason()),
            _ => {
                return self.refuse(
                    Refused::NotTrusted,
                    format!(
                        "the chain of {} no longer verifies against the trust bundle; this connection takes no new request",
                        chain.id
                    ),
                )
            }
        }
        // As webpki: valid through the notAfter second.
        if now > chain.not_after {
            return self.refuse(Refused::Expired, chain.expired_reason());
        }
        let generation = self.peers.bundle.generation();
        if chain.verified.load(Ordering::Acquire) != generation {
            let (leaf, intermediates) = (&chain.certs[0], &chain.certs[1..]);
            let at = UnixTime::since_unix_epoch(Duration::from_secs(now));
            match self.peers.bundle.verify_chain(leaf, intermediates, at, true) {
                Ok(_) => {
                    chain.verified.fetch_max(generation, Ordering::AcqRel);
                }
                Err(e) => {
                    let why = match Refusal::of(&e) {
                        Refusal::Expired | Refusal::NotYetValid => Refused::Expired,
                        _ => Refused::NotTrusted,
                    };
                    let reason = format!(
                        "the chain of {} no longer verifies against the trust bundle (changed since the handshake): {e}; this connection takes no new request",
                        chain.id
                    );
                    return self.refuse(why, reason);
                }
            }
        }
        if now >= chain.retire_from {
            self.retire.now();
            return Verdict::ServeAndRetire;
        }
        Verdict::Serve
    }

    fn refuse(&self, why: Refused, reason: String) -> Verdict {
        let _ = self
            .refused
            .compare_exchange(0, why.code(), Ordering::AcqRel, Ordering::Acquire);
        self.retire.now();
        Verdict::Refuse { why, reason }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
    };
    use trustline_identity::spiffe_id::TrustDomain;

    struct TestCa {
        root: Vec<u8>,
        issuer: rcgen::Issuer<'static, KeyPair>,
    }

    impl TestCa {
        fn new() -> Self {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            p.subject_alt_names
                .push(SanType::URI("spiffe://example.org".try_into().unwrap()));
            let root = p.self_signed(&key).unwrap().der().to_vec();
            Self {
                root,
                issuer: rcgen::Issuer::new(p, key),
            }
        }

        /// An SVID of `spiffe://example.org/web` valid from `not_before` to `not_after` (unix seconds).
        fn svid(&self, not_before: u64, not_after: u64) -> Vec<CertificateDer<'static>> {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.subject_alt_names
                .push(SanType::URI("spiffe://example.org/web".try_into().unwrap()));
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            p.is_ca = IsCa::ExplicitNoCa;
            let t = |s: u64| time::OffsetDateTime::from_unix_timestamp(i64::try_from(s).unwrap()).unwrap();
            p.not_before = t(not_before);
            p.not_after = t(not_after);
            vec![p.signed_by(&key, &self.issuer).unwrap().der().clone()]
        }
    }

    fn bundle(roots: &[&TestCa]) -> TrustBundle {
        let roots: Vec<Vec<u8>> = roots.iter().map(|c| c.root.clone()).collect();
        TrustBundle::new(TrustDomain::new("example.org").unwrap(), &roots).unwrap()
    }

    #[tokio::test]
    async fn a_live_connection_is_refused_once_its_peer_expires() {
        let ca = TestCa::new();
        let now = unix_now();
        let peers = Peers::new(bundle(&[&ca]));
        let chain = peers
            .chain(&ca.svid(now - 10, now + 30), peers.generation())
            .unwrap();
        assert_eq!(&**chain.id(), "spiffe://example.org/web");
        let live = LivePeer::opened_at(&peers, chain.clone(), now);
        assert_eq!(live.check_at(now), Verdict::Serve);
        assert!(!live.retire.asked());
        assert_eq!(
            live.check_at(now + 30),
            Verdict::ServeAndRetire,
            "valid through its notAfter second (and retired)"
        );
        let Verdict::Refuse { why, reason } = live.check_at(now + 31) else {
            panic!("served past notAfter")
        };
        assert_eq!(why, Refused::Expired);
        assert!(
            reason.contains("spiffe://example.org/web") && reason.contains(&(now + 30).to_string()),
            "{reason}"
        );
        assert!(live.retire.asked(), "the connection drains");
        assert!(
            matches!(
                live.check_at(now),
                Verdict::Refuse {
                    why: Refused::Expired,
                    ..
                }
            ),
            "refused for good, even if the clock steps back"
        );
    }
    #[tokio::test]
    async fn a_live_connection_is_refused_once_its_root_leaves_the_bundle() {
        let (ca, other) = (TestCa::new(), TestCa::new());
        let now = unix_now();
        let b = bundle(&[&ca]);
        let peers = Peers::new(b.clone());
        let chain = peers
            .chain(&ca.svid(now - 10, now + 3600), peers.generation())
            .unwrap();
        let live = LivePeer::opened_at(&peers, chain.clone(), now);
        assert_eq!(live.check_at(now), Verdict::Serve);

        // A root added: the chain is verified again, once, and still holds.
        b.update(&[ca.root.clone(), other.root.clone()]).unwrap();
        assert_ne!(chain.verified.load(Ordering::Acquire), b.generation());
        assert_eq!(live.check_at(now), Verdict::Serve);
        assert_eq!(chain.verified.load(Ordering::Acquire), b.generation());
        assert!(!live.retire.asked());

        // Its root removed: refused, and the connection drains.
        b.update(std::slice::from_ref(&other.root)).unwrap();
        let Verdict::Refuse { why, reason } = live.check_at(now) else {
            panic!("served after its root left the bundle")
        };
        assert_eq!(why, Refused::NotTrusted);
        assert!(reason.contains("spiffe://example.org/web"), "{reason}");
        assert!(live.retire.asked());

        // The root back: that connection stays refused; a new one (a new handshake) is served.
        b.update(std::slice::from_ref(&ca.root)).unwrap();
        assert!(matches!(
            live.check_at(now),
            Verdict::Refuse {
                why: Refused::NotTrusted,
                ..
            }
        ));
        let again = LivePeer::opened_at(
            &peers,
            peers.chain(&chain.certs, peers.generation()).unwrap(),
            now,
        );
        assert_eq!(again.check_at(now), Verdict::Serve);
    }

    #[tokio::test]
    async fn a_connection_is_retired_in_the_last_tenth_of_its_peers_lifetime() {
        let ca = TestCa::new();
        let now = unix_now();
        let peers = Peers::new(bundle(&[&ca]));
        // 100 s of life, 90 s left: retired from now + 80 on.
        let chain = peers
            .chain(&ca.svid(now - 10, now + 90), peers.generation())
            .unwrap();
        let live = LivePeer::opened_at(&peers, chain.clone(), now);
        assert!(
            live.retire.at().is_some(),
            "a timer for HTTP/2 and parked connections"
        );
        assert_eq!(live.check_at(now + 79), Verdict::Serve);
        assert!(!live.retire.asked());
        assert_eq!(live.check_at(now + 80), Verdict::ServeAndRetire);
        assert!(live.retire.asked());
        // Opened in the last tenth (the peer has not renewed yet): no timer, retired by its first request.
        let late = LivePeer::opened_at(&peers, chain, now + 85);
        assert!(late.retire.at().is_none());
        assert!(!late.retire.asked());
        assert_eq!(late.check_at(now + 85), Verdict::ServeAndRetire);
        assert!(late.retire.asked());
    }

    #[test]
    fn connections_of_one_peer_share_its_chain() {
        let ca = TestCa::new();
        let now = unix_now();
        let peers = Peers::new(bundle(&[&ca]));
        let certs = ca.svid(now, now + 60);
        let a = peers.chain(&certs, 0).unwrap();
        let b = peers.chain(&certs, 0).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        let c = peers.chain(&ca.svid(now, now + 60), 0).unwrap();
        assert!(!Arc::ptr_eq(&a, &c));
        drop((a, b, c));
        // Dead entries are swept out as new chains come.
        for _ in 0..300 {
            drop(peers.chain(&ca.svid(now, now + 60), 0).unwrap());
        }
        let interned = peers.interned.lock().unwrap();
        assert!(interned.chains.len() <= 256, "{}", interned.chains.len());
        drop(interned);
        assert!(matches!(
            peers.chain(&[CertificateDer::from(vec![1u8, 2, 3])], 0),
            Err(SvidError::Malformed(_))
        ));
    }
}
