//! The one place Trustline builds TLS configurations.
//!
//! Every configuration here is TLS 1.3 only, speaks ALPN `h2`, and verifies the peer by the SPIFFE X.509-SVID
//! rules against a trust bundle that can be swapped at runtime ([`TrustBundle::update`]) without rebuilding the
//! config. Our own certificate comes from a [`RotatingCert`], which also swaps in place; until a certificate is
//! set, handshakes fail closed.
//!
//! No configuration built here resumes a TLS session, on either side: every connection is a full handshake in
//! which the peer presents its certificate chain and the verifier checks it against the bundle as it is now.
//! rustls does not run the certificate verifier again on resumption: it restores the peer's chain from the
//! session (a ticket or a cache entry) as it was when the session was made. A resumed connection would carry an
//! identity past the end of its X.509-SVID, past the removal of its root from the bundle, past the deletion of
//! the peer's registration entry: a peer that saved a session while its SVID was valid could come back without
//! a certificate at all. See [`server_config`] and [`client_config`].

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, TrustAnchor, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};

use crate::spiffe_id::{SpiffeId, TrustDomain};

/// Why a TLS configuration or an SVID could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// The private key could not be loaded.
    #[error("private key: {0}")]
    Key(String),
    /// The trust domain uses the national algorithms and this build cannot.
    #[error("SM mode: {0}")]
    Sm(String),
    /// A bundle certificate is not a usable trust anchor.
    #[error("trust bundle certificate #{index}: {reason}")]
    Anchor {
        /// Position in the bundle.
        index: usize,
        /// What is wrong.
        reason: String,
    },
}

/// An X.509-SVID broke a SPIFFE rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SvidError {
    /// Not parseable DER.
    #[error("certificate is not valid DER: {0}")]
    Malformed(String),
    /// Zero or several URI SANs.
    #[error("an X.509-SVID must have exactly one URI SAN, found {0}")]
    UriSanCount(usize),
    /// The URI SAN is not a SPIFFE ID.
    #[error("URI SAN {uri:?} is not a valid SPIFFE ID: {reason}")]
    BadSpiffeId {
        /// The URI.
        uri: String,
        /// Why.
        reason: String,
    },
    /// A leaf with `cA=true`.
    #[error("leaf certificate has the CA flag set")]
    LeafIsCa,
    /// keyUsage missing, not critical, lacking digitalSignature, or with keyCertSign/cRLSign.
    #[error("leaf key usage: {0}")]
    KeyUsage(&'static str),
    /// The SPIFFE ID is in another trust domain.
    #[error("SPIFFE ID {id} is not in trust domain {trust_domain}")]
    WrongTrustDomain {
        /// The peer's ID.
        id: String,
        /// The expected trust domain.
        trust_domain: String,
    },
}

/// Checks the leaf rules of the X.509-SVID spec and returns the SPIFFE ID it carries.
pub fn svid_leaf_id(der: &[u8]) -> Result<SpiffeId, SvidError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| SvidError::Malformed(e.to_string()))?;
    let uris: Vec<&str> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(u) => Some(*u),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(e) => return Err(SvidError::Malformed(e.to_string())),
    };
    if uris.len() != 1 {
        return Err(SvidError::UriSanCount(uris.len()));
    }
    // Strictly, as for JWT-SVIDs: no silently lowercased trust domain.
    let id = crate::spiffe_id::parse_spiffe_id("URI SAN", uris[0]).map_err(|e| SvidError::BadSpiffeId {
        uri: uris[0].to_owned(),
        reason: e.to_string(),
    })?;
    if let Ok(Some(bc)) = cert.basic_constraints() {
        if bc.value.ca {
            return Err(SvidError::LeafIsCa);
        }
    }
    match cert.key_usage() {
        Ok(Some(ku)) => {
            if !ku.critical {
                return Err(SvidError::KeyUsage("extension must be critical"));
            }
            if !ku.value.digital_signature() {
                return Err(SvidError::KeyUsage("digitalSignature missing"));
            }
            if ku.value.key_cert_sign() || ku.value.crl_sign() {
                return Err(SvidError::KeyUsage("keyCertSign/cRLSign not allowed on a leaf"));
            }
        }
        Ok(None) => return Err(SvidError::KeyUsage("extension missing")),
        Err(e) => return Err(SvidError::Malformed(e.to_string())),
    }
    Ok(id)
}

static PROVIDER: std::sync::LazyLock<Arc<CryptoProvider>> = std::sync::LazyLock::new(|| {
    use rustls::crypto::aws_lc_rs::kx_group;
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    // Hybrid post-quantum first: a client sends its key share for the first group, so a peer that also speaks
    // X25519MLKEM768 agrees on it in one round trip; an older peer answers with X25519 (a HelloRetryRequest
    // costs one extra round trip only against peers that support neither).
    p.kx_groups = vec![
        kx_group::X25519MLKEM768,
        kx_group::X25519,
        kx_group::SECP256R1,
        kx_group::SECP384R1,
    ];
    Arc::new(p)
});

/// The SM-only provider, once this process has met an SM2 trust domain.
static SM_PROVIDER: std::sync::OnceLock<Arc<CryptoProvider>> = std::sync::OnceLock::new();

/// The crypto provider every Trustline TLS endpoint uses: aws-lc-rs, key exchange preferring the hybrid
/// post-quantum X25519MLKEM768, then X25519, P-256, P-384; or, in a process of an SM-mode trust domain (see
/// [`enable_sm`]), the SM-only provider of RFC 8998 (`TLS_SM4_GCM_SM3`, curveSM2, `sm2sig_sm3`).
pub fn provider() -> Arc<CryptoProvider> {
    SM_PROVIDER.get().cloned().unwrap_or_else(|| PROVIDER.clone())
}

/// Switches this process to the SM-only TLS provider. A trust domain is SM or not, so is a process: this happens
/// on its own when a bundle root or an SVID key is SM2 ([`TrustBundle::new`], [`RotatingCert::set`]), before any
/// TLS configuration is built from them. Fails in builds without the `sm` feature.
pub fn enable_sm() -> Result<(), TlsError> {
    if SM_PROVIDER.get().is_none() {
        let p = trustline_hsm::sm::tls_provider().map_err(|e| TlsError::Sm(e.to_string()))?;
        let _ = SM_PROVIDER.set(Arc::new(p));
    }
    Ok(())
}

/// Whether this process speaks SM TLS.
pub fn sm_enabled() -> bool {
    SM_PROVIDER.get().is_some()
}

/// Whether a DER certificate carries an SM2 public key.
pub fn is_sm2_cert(der: &[u8]) -> bool {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, c)| trustline_hsm::sm::is_sm2_spki(c.tbs_certificate.subject_pki.raw))
        .unwrap_or(false)
}

/// Whether a PKCS#8 private key is an SM2 key (its algorithm parameters name the SM2 curve).
fn is_sm2_pkcs8(der: &[u8]) -> bool {
    // PrivateKeyInfo { version, AlgorithmIdentifier { id-ecPublicKey, curve }, ... }: look for the curve OID in the
    // AlgorithmIdentifier, which comes within the first 30 bytes.
    der.len() > 30
        && der[..30]
            .windows(trustline_hsm::sm::SM2_CURVE_OID.len())
            .any(|w| w == trustline_hsm::sm::SM2_CURVE_OID)
}

/// Why a peer's certificate (or handshake) was refused, as a short stable label for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Refusal {
    /// The peer sent no certificate.
    NoCertificate,
    /// Past its notAfter.
    Expired,
    /// Before its notBefore.
    NotYetValid,
    /// Does not chain to the bundle (unknown issuer or bad signature).
    Untrusted,
    /// Self-signed and not in the bundle.
    SelfSigned,
    /// The SPIFFE ID belongs to another trust domain.
    ForeignTrustDomain,
    /// Breaks an X.509-SVID rule (URI SAN count, CA flag, key usage, not a SPIFFE ID).
    BadSvid,
    /// A valid SVID, but not one of the SPIFFE IDs expected for this upstream.
    WrongId,
    /// The peer refused our certificate (it sent an alert).
    PeerAlert,
    /// Any other handshake failure (protocol version, no common cipher, timeout, I/O).
    Protocol,
}

impl Refusal {
    /// The label (`expired`, `untrusted`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoCertificate => "no_certificate",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::Untrusted => "untrusted",
            Self::SelfSigned => "self_signed",
            Self::ForeignTrustDomain => "foreign_trust_domain",
            Self::BadSvid => "bad_svid",
            Self::WrongId => "wrong_id",
            Self::PeerAlert => "peer_alert",
            Self::Protocol => "protocol",
        }
    }

    /// Classifies a handshake error.
    pub fn of(err: &rustls::Error) -> Self {
        match err {
            rustls::Error::NoCertificatesPresented => Self::NoCertificate,
            rustls::Error::AlertReceived(_) => Self::PeerAlert,
            rustls::Error::InvalidCertificate(ce) => match ce {
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => Self::Expired,
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    Self::NotYetValid
                }
                CertificateError::UnknownIssuer | CertificateError::BadSignature => Self::Untrusted,
                CertificateError::Other(o) => {
                    let e: &(dyn std::error::Error + 'static) = &*o.0;
                    e.downcast_ref::<Reason>().map_or(Self::Protocol, |r| r.kind)
                }
                _ => Self::BadSvid,
            },
            _ => Self::Protocol,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

struct Anchors {
    trust_domain: TrustDomain,
    anchors: Vec<TrustAnchor<'static>>,
}

/// Signer chains that verified, by SHA-256 of the chain: SPIFFE ID and validity (unix seconds).
type SignerCache = std::collections::HashMap<[u8; 32], (SpiffeId, u64, u64)>;

/// A trust bundle shared by verifiers; [`update`](Self::update) swaps it for every later handshake.
#[derive(Clone)]
pub struct TrustBundle {
    inner: Arc<RwLock<Arc<Anchors>>>,
    /// Counts the changes of the roots ([`generation`](Self::generation)): whoever verified a chain at one
    /// generation knows, with one atomic load, whether the verdict still stands.
    generation: Arc<AtomicU64>,
    /// Chains already verified against the current roots (cleared by `update`), so a signer seen on every request
    /// costs one signature check, not a path validation.
    signers: Arc<std::sync::Mutex<SignerCache>>,
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let snap = self.snapshot();
        f.debug_struct("TrustBundle")
            .field("trust_domain", &snap.trust_domain.as_str())
            .field("anchors", &snap.anchors.len())
            .finish()
    }
}

fn anchors_from(certs: &[Vec<u8>]) -> Result<Vec<TrustAnchor<'static>>, TlsError> {
    certs
        .iter()
        .enumerate()
        .map(|(index, der)| {
            webpki::anchor_from_trusted_cert(&CertificateDer::from(der.as_slice()))
                .map(|a| a.to_owned())
                .map_err(|e| TlsError::Anchor {
                    index,
                    reason: format!("{e:?}"),
                })
        })
        .collect()
}

impl TrustBundle {
    /// A bundle for `trust_domain` holding the given DER root certificates.
    pub fn new(trust_domain: TrustDomain, roots: &[Vec<u8>]) -> Result<Self, TlsError> {
        if roots.iter().any(|r| is_sm2_cert(r)) {
            enable_sm()?;
        }
        let anchors = anchors_from(roots)?;
        Ok(Self {
            inner: Arc::new(RwLock::new(Arc::new(Anchors {
                trust_domain,
                anchors,
            }))),
            generation: Arc::default(),
            signers: Arc::default(),
        })
    }

    /// Replaces the roots; later handshakes verify against the new set. The same roots again (every SVID
    /// rotation delivers the bundle too) change nothing, not even the [`generation`](Self::generation).
    pub fn update(&self, roots: &[Vec<u8>]) -> Result<(), TlsError> {
        let anchors = anchors_from(roots)?;
        let mut guard = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if guard.anchors == anchors {
            return Ok(());
        }
        *guard = Arc::new(Anchors {
            trust_domain: guard.trust_domain.clone(),
            anchors,
        });
        // Under the lock: whoever reads the new generation finds the new roots.
        self.generation.fetch_add(1, Ordering::AcqRel);
        drop(guard);
        self.signers.lock().unwrap_or_else(|p| p.into_inner()).clear();
        Ok(())
    }

    /// How many times the roots changed. A chain verified (by [`verify_chain`](Self::verify_chain) or a
    /// handshake) after reading generation `g` stays verified while the generation is still `g`, except for time:
    /// its validity period is the caller's to check. Read it *before* verifying, so a change that races the
    /// verification is seen the next time.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn snapshot(&self) -> Arc<Anchors> {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Verifies a presented chain (leaf first) against the bundle at `now` and returns the peer's SPIFFE ID.
    pub fn verify_chain(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        client: bool,
    ) -> Result<SpiffeId, rustls::Error> {
        let snap = self.snapshot();
        // SVID shape and trust domain first, so the refusal names the most specific fault.
        let id = svid_leaf_id(end_entity).map_err(|e| other_error(Refusal::BadSvid, e.to_string()))?;
        if !id.is_member_of(&snap.trust_domain) {
            return Err(other_error(
                Refusal::ForeignTrustDomain,
                SvidError::WrongTrustDomain {
                    id: id.to_string(),
                    trust_domain: snap.trust_domain.to_string(),
                }
                .to_string(),
            ));
        }
        let ee = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
        let algs = provider().signature_verification_algorithms;
        let usage = if client {
            webpki::KeyUsage::client_auth()
        } else {
            webpki::KeyUsage::server_auth()
        };
        let result = ee.verify_for_usage(algs.all, &snap.anchors, intermediates, now, usage, None, None);
        match result {
            Ok(_) => {}
            Err(webpki::Error::UnknownIssuer) if self_issued(end_entity) => {
                return Err(other_error(
                    Refusal::SelfSigned,
                    format!("{id}: self-signed certificate not in the trust bundle"),
                ))
            }
            Err(e) => return Err(pki_error(e)),
        }
        Ok(id)
    }
}

#[derive(Debug)]
struct Reason {
    kind: Refusal,
    message: String,
}
impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}
impl std::error::Error for Reason {}

fn other_error(kind: Refusal, message: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(Reason {
        kind,
        message,
    }))))
}

fn self_issued(der: &[u8]) -> bool {
    X509Certificate::from_der(der).is_ok_and(|(_, c)| c.issuer().as_raw() == c.subject().as_raw())
}

fn pki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    let ce = match e {
        E::BadDer | E::BadDerTime => CertificateError::BadEncoding,
        E::CertExpired { .. } => CertificateError::Expired,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        other => return other_error(Refusal::Untrusted, format!("{other:?}")),
    };
    rustls::Error::InvalidCertificate(ce)
}

/// Our own certificate and key, swapped in place on rotation. Empty until [`set`](Self::set): handshakes then
/// fail closed.
#[derive(Default)]
pub struct RotatingCert {
    current: RwLock<Option<Arc<CertifiedKey>>>,
}

impl fmt::Debug for RotatingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RotatingCert")
            .field("set", &self.get().is_some())
            .finish()
    }
}

impl RotatingCert {
    /// Installs a new chain (leaf first) and its PKCS#8 private key for all later handshakes.
    pub fn set(&self, chain: Vec<Vec<u8>>, pkcs8_key: &[u8]) -> Result<(), TlsError> {
        if is_sm2_pkcs8(pkcs8_key) {
            enable_sm()?;
        }
        let key = PrivateKeyDer::Pkcs8(pkcs8_key.to_vec().into());
        let signing = provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| TlsError::Key(e.to_string()))?;
        let chain: Vec<CertificateDer<'static>> = chain.into_iter().map(CertificateDer::from).collect();
        let ck = Arc::new(CertifiedKey::new(chain, signing));
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(ck);
        Ok(())
    }

    /// Installs a new chain whose private key lives behind an `hsm` [`trustline_hsm::Signer`] (software,
    /// TPM or PKCS#11: the key never has to leave its backend).
    pub fn set_signer(&self, chain: Vec<Vec<u8>>, signer: Arc<dyn trustline_hsm::Signer>) {
        // An SM2 key in the backend needs the SM provider, which its key type requires at build time; a build
        // without it made no SM2 key, so there is nothing to switch.
        if signer.key_type() == trustline_hsm::KeyType::Sm2 {
            let _ = enable_sm();
        }
        let chain: Vec<CertificateDer<'static>> = chain.into_iter().map(CertificateDer::from).collect();
        let ck = Arc::new(CertifiedKey::new(chain, Arc::new(HsmSigningKey(signer))));
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(ck);
    }

    /// The current certificate, if any.
    pub fn get(&self) -> Option<Arc<CertifiedKey>> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A signature made with an SVID key, with the certificate chain that vouches for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvidSignature {
    /// The signer's chain (leaf first, DER).
    pub chain: Vec<Vec<u8>>,
    /// TLS `SignatureScheme` code point (e.g. 0x0403 ECDSA P-256 SHA-256).
    pub scheme: u16,
    /// The signature bytes, as the scheme defines them (ECDSA: ASN.1 DER).
    pub signature: Vec<u8>,
}

const SIGN_SCHEMES: [SignatureScheme; 7] = [
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::ED25519,
    SignatureScheme::RSA_PSS_SHA256,
    SignatureScheme::RSA_PSS_SHA384,
    SignatureScheme::RSA_PSS_SHA512,
    // sm2sig_sm3 (RFC 8998), for SM2 SVIDs: verifiable only by SM-mode processes.
    SignatureScheme::Unknown(0x0708),
];

impl RotatingCert {
    /// Signs `message` with the current SVID key (never exported); `None` before the first SVID.
    pub fn sign(&self, message: &[u8]) -> Option<Result<SvidSignature, TlsError>> {
        let ck = self.get()?;
        let signer = match ck.key.choose_scheme(&SIGN_SCHEMES) {
            Some(s) => s,
            None => {
                return Some(Err(TlsError::Key(
                    "the SVID key supports no signature scheme we verify".into(),
                )))
            }
        };
        Some(
            signer
                .sign(message)
                .map(|signature| SvidSignature {
                    chain: ck.cert.iter().map(|c| c.to_vec()).collect(),
                    scheme: u16::from(signer.scheme()),
                    signature,
                })
                .map_err(|e| TlsError::Key(e.to_string())),
        )
    }
}

impl TrustBundle {
    /// Verifies a [`SvidSignature`] over `message`: the chain must be a valid X.509-SVID of the bundle's trust
    /// domain at `at` (the time the signature claims), and the signature must verify with the leaf's key.
    /// Returns the signer's SPIFFE ID.
    pub fn verify_signature(
        &self,
        s: &SvidSignature,
        message: &[u8],
        at: UnixTime,
    ) -> Result<SpiffeId, String> {
        let leaf = s.chain.first().ok_or("no signer certificate")?;
        let ee_der = CertificateDer::from(leaf.as_slice());
        let key = {
            let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
            for c in &s.chain {
                ctx.update(&(c.len() as u64).to_le_bytes());
                ctx.update(c);
            }
            let mut k = [0u8; 32];
            k.copy_from_slice(ctx.finish().as_ref());
            k
        };
        let t = at.as_secs();
        let cached = self
            .signers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .filter(|(_, nb, na)| (*nb..=*na).contains(&t))
            .map(|(id, _, _)| id.clone());
        let id = match cached {
            Some(id) => id,
            None => {
                let inter: Vec<CertificateDer<'_>> = s.chain[1..]
                    .iter()
                    .map(|c| CertificateDer::from(c.as_slice()))
                    .collect();
                let id = self
                    .verify_chain(&ee_der, &inter, at, true)
                    .map_err(|e| format!("signer certificate: {e}"))?;
                // Valid for the intersection of the chain's validity periods.
                let (mut nb, mut na) = (0u64, u64::MAX);
                for c in &s.chain {
                    if let Ok((_, x)) = X509Certificate::from_der(c) {
                        nb = nb.max(x.validity().not_before.timestamp().max(0) as u64);
                        na = na.min(x.validity().not_after.timestamp().max(0) as u64);
                    }
                }
                let mut cache = self.signers.lock().unwrap_or_else(|p| p.into_inner());
                if cache.len() >= 4096 {
                    cache.clear();
                }
                cache.insert(key, (id.clone(), nb, na));
                id
            }
        };
        let scheme = SignatureScheme::from(s.scheme);
        if !SIGN_SCHEMES.contains(&scheme) {
            return Err(format!("signature scheme {scheme:?} not accepted"));
        }
        let algs = provider().signature_verification_algorithms;
        let candidates = algs
            .mapping
            .iter()
            .find(|(sc, _)| *sc == scheme)
            .map(|(_, a)| *a)
            .ok_or_else(|| format!("signature scheme {scheme:?} not supported"))?;
        let ee =
            webpki::EndEntityCert::try_from(&ee_der).map_err(|e| format!("signer certificate: {e:?}"))?;
        if candidates
            .iter()
            .any(|alg| ee.verify_signature(*alg, message, &s.signature).is_ok())
        {
            Ok(id)
        } else {
            Err(format!("signature by {id} does not verify"))
        }
    }
}

impl ResolvesServerCert for RotatingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.get()
    }
}

impl rustls::client::ResolvesClientCert for RotatingCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.get()
    }

    fn has_certs(&self) -> bool {
        self.get().is_some()
    }
}

/// Verifies TLS clients as X.509-SVIDs of the bundle's trust domain.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    bundle: TrustBundle,
    mandatory: bool,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeClientVerifier {
    /// A verifier; with `mandatory == false` clients without a certificate are admitted as anonymous (the
    /// application must then authorize per call, as the CA does for node attestation).
    pub fn new(bundle: TrustBundle, mandatory: bool) -> Self {
        Self {
            bundle,
            mandatory,
            algs: provider().signature_verification_algorithms,
        }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.bundle.verify_chain(end_entity, intermediates, now, true)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Which server identities a client accepts.
#[derive(Debug, Clone)]
pub enum ExpectedPeer {
    /// Exactly one of these SPIFFE IDs.
    OneOf(Vec<SpiffeId>),
    /// Any SPIFFE ID of the bundle's trust domain.
    AnyInTrustDomain,
}

/// Verifies TLS servers as X.509-SVIDs with an expected SPIFFE ID (the DNS name is not used).
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    bundle: TrustBundle,
    expected: ExpectedPeer,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    /// A verifier accepting `expected` servers that chain to `bundle`.
    pub fn new(bundle: TrustBundle, expected: ExpectedPeer) -> Self {
        Self {
            bundle,
            expected,
            algs: provider().signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let id = self.bundle.verify_chain(end_entity, intermediates, now, false)?;
        match &self.expected {
            ExpectedPeer::AnyInTrustDomain => {}
            ExpectedPeer::OneOf(ids) => {
                if !ids.contains(&id) {
                    let want: Vec<String> = ids.iter().map(ToString::to_string).collect();
                    return Err(other_error(
                        Refusal::WrongId,
                        format!("server presented SPIFFE ID {id}, expected {}", want.join(" or ")),
                    ));
                }
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// A TLS 1.3 server config presenting `cert` and verifying clients with `verifier`. ALPN `h2`.
///
/// It never resumes a session: no session cache (`NoServerSessionStorage`: a client's PSK finds nothing), no
/// tickets (none sent after the handshake, and rustls' default ticketer, which never makes one, is kept), no
/// early data. rustls does not call the client-certificate verifier on a resumed handshake, it restores the
/// client's chain from the session: a client that saved a session while its X.509-SVID was valid could resume
/// after the SVID expired, after its root left the bundle or its registration entry was deleted, presenting no
/// certificate at all, and be taken for the old identity. So every connection is a full handshake and the
/// verifier sees every chain against the bundle as it is then. What this costs is in `docs/benchmarks.md`
/// ("Resumption: refused, and what it costs").
pub fn server_config(
    cert: Arc<RotatingCert>,
    verifier: Arc<SpiffeClientVerifier>,
) -> Result<rustls::ServerConfig, TlsError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert);
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    cfg.max_early_data_size = 0;
    Ok(cfg)
}

/// A TLS 1.3 client config verifying the server with `verifier` and presenting `cert` if it holds one. ALPN `h2`.
///
/// It never resumes a session (`Resumption::disabled()`: no session stored, no ticket offered), for the same
/// reason as [`server_config`] from the other side: rustls does not run the server-certificate verifier on a
/// resumed handshake, so a resumed connection would trust the server's chain as it was when the session was
/// made (past its expiry, past a bundle change), and would not present the certificate [`RotatingCert`] holds
/// now: the server would take us for whoever we were when the session was made.
pub fn client_config(
    verifier: Arc<SpiffeServerVerifier>,
    cert: Option<Arc<RotatingCert>>,
) -> Result<rustls::ClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut cfg = match cert {
        Some(c) => builder.with_client_cert_resolver(c),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    cfg.enable_sni = false;
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(cfg)
}

/// rustls signing over an `hsm` signer.
#[derive(Debug)]
struct HsmSigningKey(Arc<dyn trustline_hsm::Signer>);

#[derive(Debug)]
struct HsmTlsSigner {
    key: Arc<dyn trustline_hsm::Signer>,
    alg: trustline_hsm::SignatureAlgorithm,
    scheme: SignatureScheme,
}

impl rustls::sign::SigningKey for HsmSigningKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn rustls::sign::Signer>> {
        use trustline_hsm::{KeyType, SignatureAlgorithm as A};
        let candidates: &[(SignatureScheme, A)] = match self.0.key_type() {
            KeyType::EcP256 => &[(SignatureScheme::ECDSA_NISTP256_SHA256, A::EcdsaP256Sha256)],
            KeyType::EcP384 => &[(SignatureScheme::ECDSA_NISTP384_SHA384, A::EcdsaP384Sha384)],
            KeyType::Ed25519 => &[(SignatureScheme::ED25519, A::Ed25519)],
            KeyType::Sm2 => &[(SignatureScheme::Unknown(0x0708), A::Sm2Sm3Tls13)],
            // TLS 1.3 allows only RSA-PSS for RSA keys.
            _ => &[(SignatureScheme::RSA_PSS_SHA256, A::RsaPssSha256)],
        };
        candidates
            .iter()
            .find(|(s, _)| offered.contains(s))
            .map(|&(scheme, alg)| {
                Box::new(HsmTlsSigner {
                    key: self.0.clone(),
                    alg,
                    scheme,
                }) as Box<dyn rustls::sign::Signer>
            })
    }

    fn algorithm(&self) -> rustls::SignatureAlgorithm {
        match self.0.key_type() {
            trustline_hsm::KeyType::EcP256 | trustline_hsm::KeyType::EcP384 => {
                rustls::SignatureAlgorithm::ECDSA
            }
            trustline_hsm::KeyType::Ed25519 => rustls::SignatureAlgorithm::ED25519,
            // SM2 is an elliptic-curve signature; rustls uses this only to pick TLS 1.2 suites.
            trustline_hsm::KeyType::Sm2 => rustls::SignatureAlgorithm::ECDSA,
            _ => rustls::SignatureAlgorithm::RSA,
        }
    }
}

impl rustls::sign::Signer for HsmTlsSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        self.key
            .sign(self.alg, message)
            .map_err(|e| rustls::Error::General(format!("key backend: {e}")))
    }

    fn scheme(&self) -> SignatureScheme {
        self.scheme
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// The leaf's ID is exactly its URI SAN: an upper-case trust domain is refused, never lowercased into another
    /// ID (the `spiffe` crate's parser would; the jwt_claims fuzz target found that for JWT-SVIDs).
    #[test]
    fn an_upper_case_trust_domain_is_refused_not_lowercased() {
        let leaf = |uri: &str| {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            p.subject_alt_names
                .push(rcgen::SanType::URI(uri.try_into().unwrap()));
            p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
            p.self_signed(&key).unwrap().der().to_vec()
        };
        assert_eq!(
            svid_leaf_id(&leaf("spiffe://example.org/web"))
                .unwrap()
                .to_string(),
            "spiffe://example.org/web"
        );
        let e = svid_leaf_id(&leaf("spiffe://Example.org/web"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("lowercase"), "{e}");
    }
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
    };
    use rustls::client::{ClientSessionMemoryCache, ClientSessionStore, ResolvesClientCert, Resumption};
    use rustls::{ClientConnection, HandshakeKind, ServerConnection};
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;

    const TD: &str = "example.org";

    /// A CA of `example.org` (P-256, as ours) that signs SVIDs.
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
                .push(SanType::URI(format!("spiffe://{TD}").try_into().unwrap()));
            let root = p.self_signed(&key).unwrap().der().to_vec();
            Self {
                root,
                issuer: rcgen::Issuer::new(p, key),
            }
        }

        /// An X.509-SVID for `spiffe://example.org/<name>`: (chain, PKCS#8 key).
        fn svid(&self, name: &str) -> (Vec<Vec<u8>>, Vec<u8>) {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.subject_alt_names
                .push(SanType::URI(format!("spiffe://{TD}/{name}").try_into().unwrap()));
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            p.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            p.is_ca = IsCa::ExplicitNoCa;
            let leaf = p.signed_by(&key, &self.issuer).unwrap();
            (vec![leaf.der().to_vec()], key.serialize_der())
        }

        fn bundle(&self) -> TrustBundle {
            TrustBundle::new(TrustDomain::new(TD).unwrap(), std::slice::from_ref(&self.root)).unwrap()
        }

        fn cert(&self, name: &str) -> Arc<RotatingCert> {
            let (chain, key) = self.svid(name);
            let rc = Arc::new(RotatingCert::default());
            rc.set(chain, &key).unwrap();
            rc
        }

        /// Our server config (the sidecar's inbound listener, the CA's agent API), as `server`.
        fn server(&self) -> Arc<rustls::ServerConfig> {
            let verifier = Arc::new(SpiffeClientVerifier::new(self.bundle(), true));
            Arc::new(server_config(self.cert("server"), verifier).unwrap())
        }

        /// Our client config (the sidecar outbound, the agent), as `client`, expecting `server`.
        fn client(&self) -> rustls::ClientConfig {
            let verifier = Arc::new(SpiffeServerVerifier::new(
                self.bundle(),
                ExpectedPeer::OneOf(vec![SpiffeId::new(format!("spiffe://{TD}/server")).unwrap()]),
            ));
            client_config(verifier, Some(self.cert("client"))).unwrap()
        }
    }

    /// A client session store that counts the TLS 1.3 tickets it is given.
    #[derive(Debug)]
    struct CountingStore {
        inner: ClientSessionMemoryCache,
        tickets: AtomicUsize,
    }

    impl CountingStore {
        fn new() -> Arc<Self> {
            Arc::new(Self {
                inner: ClientSessionMemoryCache::new(32),
                tickets: AtomicUsize::new(0),
            })
        }
    }

    impl ClientSessionStore for CountingStore {
        fn set_kx_hint(&self, server_name: ServerName<'static>, group: rustls::NamedGroup) {
            self.inner.set_kx_hint(server_name, group);
        }
        fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<rustls::NamedGroup> {
            self.inner.kx_hint(server_name)
        }
        fn set_tls12_session(
            &self,
            server_name: ServerName<'static>,
            value: rustls::client::Tls12ClientSessionValue,
        ) {
            self.inner.set_tls12_session(server_name, value);
        }
        fn tls12_session(
            &self,
            server_name: &ServerName<'_>,
        ) -> Option<rustls::client::Tls12ClientSessionValue> {
            self.inner.tls12_session(server_name)
        }
        fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
            self.inner.remove_tls12_session(server_name);
        }
        fn insert_tls13_ticket(
            &self,
            server_name: ServerName<'static>,
            value: rustls::client::Tls13ClientSessionValue,
        ) {
            self.tickets.fetch_add(1, Ordering::SeqCst);
            self.inner.insert_tls13_ticket(server_name, value);
        }
        fn take_tls13_ticket(
            &self,
            server_name: &ServerName<'static>,
        ) -> Option<rustls::client::Tls13ClientSessionValue> {
            self.inner.take_tls13_ticket(server_name)
        }
    }

    /// The attacker's certificate: the SVID on the first handshake, nothing after.
    #[derive(Debug)]
    struct FirstTimeOnly(Mutex<Option<Arc<CertifiedKey>>>);

    impl ResolvesClientCert for FirstTimeOnly {
        fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
            self.0.lock().unwrap().take()
        }
        fn has_certs(&self) -> bool {
            true
        }
    }

    /// A client config that would resume if the server let it: resumption on, tickets counted.
    fn resuming(mut cfg: rustls::ClientConfig) -> (Arc<rustls::ClientConfig>, Arc<CountingStore>) {
        let store = CountingStore::new();
        cfg.resumption = Resumption::store(store.clone());
        (Arc::new(cfg), store)
    }

    /// Our server config with resumption put back as rustls' defaults have it (the control).
    fn resuming_server(cfg: &rustls::ServerConfig) -> Arc<rustls::ServerConfig> {
        let mut cfg = cfg.clone();
        cfg.session_storage = rustls::server::ServerSessionMemoryCache::new(32);
        cfg.send_tls13_tickets = 2;
        Arc::new(cfg)
    }

    /// One connection in memory, run until neither side has anything to send (so post-handshake tickets are
    /// delivered too); the first error either side raised.
    fn connect(
        client: &Arc<rustls::ClientConfig>,
        server: &Arc<rustls::ServerConfig>,
    ) -> (ClientConnection, ServerConnection, Result<(), rustls::Error>) {
        let mut c = ClientConnection::new(client.clone(), ServerName::try_from("server").unwrap()).unwrap();
        let mut s = ServerConnection::new(server.clone()).unwrap();
        let mut result = Ok(());
        loop {
            let mut moved = false;
            while c.wants_write() {
                let mut buf = Vec::new();
                c.write_tls(&mut buf).unwrap();
                moved = true;
                let mut rest = buf.as_slice();
                while !rest.is_empty() && result.is_ok() {
                    s.read_tls(&mut rest).unwrap();
                    if let Err(e) = s.process_new_packets() {
                        result = Err(e);
                    }
                }
            }
            while s.wants_write() {
                let mut buf = Vec::new();
                s.write_tls(&mut buf).unwrap();
                moved = true;
                let mut rest = buf.as_slice();
                while !rest.is_empty() && result.is_ok() {
                    c.read_tls(&mut rest).unwrap();
                    if let Err(e) = c.process_new_packets() {
                        result = Err(e);
                    }
                }
            }
            if !moved || result.is_err() && !c.wants_write() && !s.wants_write() {
                return (c, s, result);
            }
        }
    }

    /// Caught: rustls' server defaults keep a session cache and send two TLS 1.3 tickets per connection, so a
    /// client asking to resume got a resumed handshake (without the client-certificate verifier).
    #[test]
    fn our_server_config_gives_no_session_to_resume() {
        let ca = TestCa::new();
        let server = ca.server();
        assert_eq!(server.send_tls13_tickets, 0);
        assert!(!server.ticketer.enabled(), "no stateless tickets");
        assert!(!server.session_storage.can_cache(), "no session cache");
        assert_eq!(server.max_early_data_size, 0);
        let (client, store) = resuming(ca.client());
        for n in 0..2 {
            let (c, s, r) = connect(&client, &server);
            r.unwrap();
            assert_eq!(c.handshake_kind(), Some(HandshakeKind::Full), "connection {n}");
            assert_eq!(s.handshake_kind(), Some(HandshakeKind::Full), "connection {n}");
        }
        assert_eq!(
            store.tickets.load(Ordering::SeqCst),
            0,
            "the server sent no ticket"
        );

        // The control: the same client against a server that allows resumption does resume.
        let control = resuming_server(&server);
        connect(&client, &control).2.unwrap();
        assert!(store.tickets.load(Ordering::SeqCst) > 0);
        let (c, _, r) = connect(&client, &control);
        r.unwrap();
        assert_eq!(c.handshake_kind(), Some(HandshakeKind::Resumed));
    }

    /// Caught: rustls' client default keeps up to 256 sessions and offers their tickets, so our clients (the
    /// sidecar's outbound, the agent) resumed against any server that sent tickets, trusting the server's chain
    /// as verified when the session was made.
    #[test]
    fn our_client_config_never_resumes() {
        let ca = TestCa::new();
        let server = resuming_server(&ca.server());
        let client = Arc::new(ca.client());
        for n in 0..3 {
            let (c, s, r) = connect(&client, &server);
            r.unwrap();
            assert_eq!(c.handshake_kind(), Some(HandshakeKind::Full), "connection {n}");
            assert_eq!(s.handshake_kind(), Some(HandshakeKind::Full), "connection {n}");
        }
    }

    /// The attack of issue 18: connect once with a valid SVID, keep the session, come back presenting no
    /// certificate. Against a server that resumes, rustls restores the old chain without asking the verifier
    /// (shown by the control); against ours there is nothing to resume and the handshake is refused.
    #[test]
    fn a_saved_session_does_not_bring_back_an_identity() {
        let ca = TestCa::new();
        let attacker = |server: &Arc<rustls::ServerConfig>| {
            let mut cfg = ca.client();
            let (chain, key) = ca.svid("web");
            let rc = RotatingCert::default();
            rc.set(chain, &key).unwrap();
            cfg.client_auth_cert_resolver = Arc::new(FirstTimeOnly(Mutex::new(rc.get())));
            let (cfg, _) = resuming(cfg);
            let (_, s, r) = connect(&cfg, server);
            r.unwrap();
            let first = s.peer_certificates().map(<[_]>::to_vec);
            let second = connect(&cfg, server);
            (first, second)
        };

        // Control: a resuming server takes the second connection, certificate-less, for `web`.
        let (first, (c, s, r)) = attacker(&resuming_server(&ca.server()));
        r.unwrap();
        assert_eq!(c.handshake_kind(), Some(HandshakeKind::Resumed));
        assert_eq!(s.peer_certificates().map(<[_]>::to_vec), first);

        // Ours: a full handshake, no certificate, refused.
        let (_, (_, s, r)) = attacker(&ca.server());
        assert_eq!(r.unwrap_err(), rustls::Error::NoCertificatesPresented);
        assert_eq!(s.handshake_kind(), Some(HandshakeKind::Full));
    }

    #[test]
    fn the_generation_moves_only_when_the_roots_change() {
        let (a, b) = (TestCa::new(), TestCa::new());
        let bundle = a.bundle();
        let g = bundle.generation();
        bundle.update(std::slice::from_ref(&a.root)).unwrap();
        assert_eq!(bundle.generation(), g, "the same roots again");
        bundle.update(&[a.root.clone(), b.root.clone()]).unwrap();
        assert_eq!(bundle.generation(), g + 1);
        let clone = bundle.clone();
        clone.update(std::slice::from_ref(&b.root)).unwrap();
        assert_eq!(bundle.generation(), g + 2, "clones share the roots and the count");
        let (chain, _) = a.svid("web");
        let leaf = CertificateDer::from(chain[0].as_slice());
        let now = UnixTime::now();
        assert_eq!(
            Refusal::of(&bundle.verify_chain(&leaf, &[], now, true).unwrap_err()),
            Refusal::Untrusted
        );
    }
}
