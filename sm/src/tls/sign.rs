//! `sm2sig_sm3`: SM2-with-SM3 signing keys for rustls, and the webpki verification algorithm.

use rustls::pki_types::{
    AlgorithmIdentifier, InvalidSignature, SignatureVerificationAlgorithm, SubjectPublicKeyInfoDer,
};
use rustls::sign::{Signer, SigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};
use std::sync::Arc;

use crate::sm2::{self, DistId, Sm2Key};

/// An SM2 key that signs TLS 1.3 CertificateVerify messages with `sm2sig_sm3` (ID `TLSv1.3+GM+Cipher+Suite`,
/// RFC 8998 §3.2.1).
#[derive(Debug, Clone)]
pub struct Sm2SigningKey {
    key: Arc<Sm2Key>,
    spki: Option<Vec<u8>>,
}

impl Sm2SigningKey {
    /// Wraps an SM2 key.
    pub fn new(key: Sm2Key) -> Self {
        let spki = key.public_key_der().ok();
        Self {
            key: Arc::new(key),
            spki,
        }
    }
}

impl SigningKey for Sm2SigningKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        offered
            .contains(&super::SM2SIG_SM3)
            .then(|| Box::new(Sm2Signer(self.key.clone())) as Box<dyn Signer>)
    }

    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        self.spki.as_deref().map(SubjectPublicKeyInfoDer::from)
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        // SM2 is an elliptic-curve signature; rustls uses this only to pick TLS 1.2 suites, which this provider
        // does not have.
        SignatureAlgorithm::ECDSA
    }
}

#[derive(Debug)]
struct Sm2Signer(Arc<Sm2Key>);

impl Signer for Sm2Signer {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        self.0
            .sign_tls13(message)
            .map_err(|e| rustls::Error::General(format!("sm2sig_sm3: {e}")))
    }

    fn scheme(&self) -> SignatureScheme {
        super::SM2SIG_SM3
    }
}

/// SM2-with-SM3 with the ID `1234567812345678`, for webpki: certificate chains (`WebPkiSupportedAlgorithms::all`).
pub static SM2_WITH_SM3: &dyn SignatureVerificationAlgorithm = &Sm2WithSm3(DistId::Standard);

/// SM2-with-SM3 with the ID `TLSv1.3+GM+Cipher+Suite`, for TLS 1.3 CertificateVerify signatures
/// (`WebPkiSupportedAlgorithms::mapping` of `sm2sig_sm3`).
pub static SM2SIG_SM3_TLS13: &dyn SignatureVerificationAlgorithm = &Sm2WithSm3(DistId::Tls13);

/// See [`SM2_WITH_SM3`] and [`SM2SIG_SM3_TLS13`].
#[derive(Debug)]
struct Sm2WithSm3(DistId);

/// The contents of the SubjectPublicKeyInfo AlgorithmIdentifier of an SM2 key: `id-ecPublicKey` with the SM2
/// curve as parameter (what OpenSSL writes).
const SM2_PUBLIC_KEY_ALG_ID: &[u8] = &[
    0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, // id-ecPublicKey 1.2.840.10045.2.1
    0x06, 0x08, 0x2a, 0x81, 0x1c, 0xcf, 0x55, 0x01, 0x82, 0x2d, // sm2 1.2.156.10197.1.301
];

impl SignatureVerificationAlgorithm for Sm2WithSm3 {
    fn verify_signature(
        &self,
        public_key: &[u8],
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), InvalidSignature> {
        // webpki passes the subjectPublicKey BIT STRING contents: the 65-byte uncompressed point.
        match self.0 {
            DistId::Standard => sm2::verify(public_key, message, signature),
            DistId::Tls13 => sm2::verify_tls13(public_key, message, signature),
        }
        .map_err(|_| InvalidSignature)
    }

    fn public_key_alg_id(&self) -> AlgorithmIdentifier {
        AlgorithmIdentifier::from_slice(SM2_PUBLIC_KEY_ALG_ID)
    }

    fn signature_alg_id(&self) -> AlgorithmIdentifier {
        // SM2-with-SM3 1.2.156.10197.1.501, no parameters (what OpenSSL writes; checked in the sm2 tests).
        AlgorithmIdentifier::from_slice(crate::der::OID_SM2_WITH_SM3)
    }

    fn fips(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CertificateVerify signatures carry the TLS 1.3 ID (RFC 8998 §3.2.1), certificates the standard one: each
    /// verification algorithm accepts its own and refuses the other.
    #[test]
    fn handshake_signatures_use_the_tls13_id() {
        let key = sm2::generate().unwrap();
        let point = key.public_key_point().unwrap();
        let signing = Sm2SigningKey::new(key.clone());
        assert!(signing
            .choose_scheme(&[SignatureScheme::ECDSA_NISTP256_SHA256])
            .is_none());
        let signer = signing.choose_scheme(&[super::super::SM2SIG_SM3]).unwrap();
        let msg = b"TLS 1.3, server CertificateVerify";
        let tls_sig = signer.sign(msg).unwrap();
        SM2SIG_SM3_TLS13.verify_signature(&point, msg, &tls_sig).unwrap();
        assert!(SM2_WITH_SM3.verify_signature(&point, msg, &tls_sig).is_err());
        let cert_sig = key.sign(msg).unwrap();
        SM2_WITH_SM3.verify_signature(&point, msg, &cert_sig).unwrap();
        assert!(SM2SIG_SM3_TLS13.verify_signature(&point, msg, &cert_sig).is_err());
    }
}
