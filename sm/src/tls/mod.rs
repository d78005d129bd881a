//! A rustls [`CryptoProvider`] for RFC 8998 TLS 1.3 that carries ONLY SM algorithms, so a connection made with
//! it has nothing but SM algorithms on the wire:
//!
//! - cipher suite `TLS_SM4_GCM_SM3` (0x00C6): SM4-GCM records, SM3 transcript hash, HKDF over HMAC-SM3;
//! - key exchange group curveSM2 (0x0029): ECDHE on the SM2 curve, uncompressed points, the shared secret
//!   being the x-coordinate (32 bytes), as for the NIST curves;
//! - signature scheme `sm2sig_sm3` (0x0708): SM2-with-SM3. CertificateVerify signatures use the ID
//!   `TLSv1.3+GM+Cipher+Suite` that RFC 8998 §3.2.1 fixes for TLS 1.3 (as Tongsuo, GmSSL and Kona do);
//!   certificate chains (webpki) use the certificate ID `1234567812345678`;
//! - randomness from OpenSSL's `RAND_bytes`; private keys: SM2 in PKCS#8 (or SEC1).
//!
//! Use it with TLS 1.3 only: `ClientConfig::builder_with_provider(Arc::new(provider()))
//! .with_protocol_versions(&[&rustls::version::TLS13])`. Certificates must be SM2 certificates signed with
//! SM2-with-SM3 and the standard ID (see [`crate::sm2::sign_x509`]).

use rustls::crypto::{CryptoProvider, GetRandomFailed, KeyProvider, SecureRandom, WebPkiSupportedAlgorithms};
use rustls::pki_types::PrivateKeyDer;
use rustls::sign::SigningKey;
use rustls::{CipherSuite, NamedGroup, SignatureScheme};
use std::sync::Arc;

use crate::sm2::Sm2Key;

mod kx;
mod sign;
mod suite;

pub use kx::CURVE_SM2_GROUP;
pub use sign::{Sm2SigningKey, SM2SIG_SM3_TLS13, SM2_WITH_SM3};
pub use suite::TLS_SM4_GCM_SM3;

/// The cipher suite number of `TLS_SM4_GCM_SM3` (RFC 8998 §2).
pub const TLS_SM4_GCM_SM3_ID: CipherSuite = CipherSuite::Unknown(0x00C6);
/// The NamedGroup number of curveSM2 (RFC 8998 §2).
pub const CURVE_SM2: NamedGroup = NamedGroup::Unknown(0x0029);
/// The SignatureScheme number of `sm2sig_sm3` (RFC 8998 §2).
pub const SM2SIG_SM3: SignatureScheme = SignatureScheme::Unknown(0x0708);

/// The SM-only crypto provider.
pub fn provider() -> CryptoProvider {
    CryptoProvider {
        cipher_suites: vec![TLS_SM4_GCM_SM3],
        kx_groups: vec![&CURVE_SM2_GROUP],
        signature_verification_algorithms: SUPPORTED_SIG_ALGS,
        secure_random: &OpenSslRandom,
        key_provider: &Sm2KeyProvider,
    }
}

/// Verification algorithms: SM2-with-SM3 only. Certificates (`all`) with the ID `1234567812345678`; TLS 1.3
/// CertificateVerify (`mapping` of `sm2sig_sm3`) with the ID `TLSv1.3+GM+Cipher+Suite` (RFC 8998 §3.2.1).
pub static SUPPORTED_SIG_ALGS: WebPkiSupportedAlgorithms = WebPkiSupportedAlgorithms {
    all: &[SM2_WITH_SM3],
    mapping: &[(SM2SIG_SM3, &[SM2SIG_SM3_TLS13])],
};

/// Randomness from OpenSSL's `RAND_bytes`.
#[derive(Debug)]
struct OpenSslRandom;

impl SecureRandom for OpenSslRandom {
    fn fill(&self, buf: &mut [u8]) -> Result<(), GetRandomFailed> {
        openssl::rand::rand_bytes(buf).map_err(|_| GetRandomFailed)
    }
}

/// Loads SM2 private keys (PKCS#8, or SEC1 `EC PRIVATE KEY` on the SM2 curve); refuses every other key.
#[derive(Debug)]
struct Sm2KeyProvider;

impl KeyProvider for Sm2KeyProvider {
    fn load_private_key(
        &self,
        key_der: PrivateKeyDer<'static>,
    ) -> Result<Arc<dyn SigningKey>, rustls::Error> {
        let key = match &key_der {
            PrivateKeyDer::Pkcs8(der) => Sm2Key::from_pkcs8_der(der.secret_pkcs8_der()),
            PrivateKeyDer::Sec1(der) => openssl::pkey::PKey::private_key_from_der(der.secret_sec1_der())
                .map_err(crate::SmError::openssl("d2i_PrivateKey (SEC1)"))
                .and_then(|pkey| Sm2Key::from_pkey(pkey, "SEC1 key")),
            _ => {
                return Err(rustls::Error::General(
                    "SM provider: only SM2 keys (PKCS#8 or SEC1)".into(),
                ))
            }
        }
        .map_err(|e| rustls::Error::General(format!("SM provider: {e}")))?;
        Ok(Arc::new(Sm2SigningKey::new(key)))
    }
}
