//! The Chinese national algorithms as the rest of Trustline sees them. Every build has this module; with the `sm`
//! feature (Debian's OpenSSL 3 through `trustline-sm`) it works, without it every call says how to get it.
//!
//! SM2 signatures over certificates and CSRs use the distinguishing ID `1234567812345678` (GB/T 35276); TLS 1.3
//! CertificateVerify signatures use `TLSv1.3+GM+Cipher+Suite` (RFC 8998 §3.2.1).

use crate::HsmError;

/// DER of the SM2 curve's OID (1.2.156.10197.1.301), as it appears in an SM2 SubjectPublicKeyInfo.
pub const SM2_CURVE_OID: &[u8] = &[0x06, 0x08, 0x2a, 0x81, 0x1c, 0xcf, 0x55, 0x01, 0x82, 0x2d];
/// DER of the SM2-with-SM3 signature OID (1.2.156.10197.1.501).
pub const SM2_WITH_SM3_OID: &[u8] = &[0x06, 0x08, 0x2a, 0x81, 0x1c, 0xcf, 0x55, 0x01, 0x83, 0x75];

/// Whether a SubjectPublicKeyInfo (DER) holds a key on the SM2 curve.
pub fn is_sm2_spki(spki: &[u8]) -> bool {
    // SEQUENCE { SEQUENCE { id-ecPublicKey, <curve OID> }, BIT STRING }: the curve OID sits at a fixed place.
    spki.len() > 23 && spki.get(13..23) == Some(SM2_CURVE_OID)
}

#[cfg_attr(feature = "sm", allow(dead_code))]
fn missing() -> HsmError {
    HsmError::UnsupportedBackend(
        "the national algorithms (rebuild with --features trustline-hsm/sm; it needs libssl-dev)".into(),
    )
}

/// Checks an SM2 CSR's self-signature (SM2-with-SM3, ID `1234567812345678`).
pub fn verify_csr(der: &[u8]) -> Result<(), HsmError> {
    #[cfg(feature = "sm")]
    {
        let req = openssl_req(der)?;
        trustline_sm::sm2::verify_x509_req(&req).map_err(|e| HsmError::Sm(e.to_string()))
    }
    #[cfg(not(feature = "sm"))]
    {
        let _ = der;
        Err(missing())
    }
}

#[cfg(feature = "sm")]
fn openssl_req(der: &[u8]) -> Result<trustline_sm::openssl::x509::X509Req, HsmError> {
    trustline_sm::openssl::x509::X509Req::from_der(der).map_err(|e| HsmError::Sm(format!("CSR: {e}")))
}

/// Checks an SM2-with-SM3 signature (ID `1234567812345678`) of `msg` by `public_key` (SPKI DER or point).
pub fn verify(public_key: &[u8], msg: &[u8], sig: &[u8]) -> Result<(), HsmError> {
    #[cfg(feature = "sm")]
    {
        trustline_sm::sm2::verify(public_key, msg, sig).map_err(|e| HsmError::Sm(e.to_string()))
    }
    #[cfg(not(feature = "sm"))]
    {
        let _ = (public_key, msg, sig);
        Err(missing())
    }
}

/// A fresh SM2 key as PKCS#8 DER (secret: for an in-memory TLS key).
pub fn generate_pkcs8() -> Result<Vec<u8>, HsmError> {
    #[cfg(feature = "sm")]
    {
        trustline_sm::sm2::generate()
            .and_then(|k| k.to_pkcs8_der())
            .map_err(|e| HsmError::Sm(e.to_string()))
    }
    #[cfg(not(feature = "sm"))]
    {
        Err(missing())
    }
}

/// The SubjectPublicKeyInfo (DER) of an SM2 PKCS#8 key.
pub fn public_key_of_pkcs8(pkcs8: &[u8]) -> Result<Vec<u8>, HsmError> {
    #[cfg(feature = "sm")]
    {
        trustline_sm::sm2::Sm2Key::from_pkcs8_der(pkcs8)
            .and_then(|k| k.public_key_der())
            .map_err(|e| HsmError::Sm(e.to_string()))
    }
    #[cfg(not(feature = "sm"))]
    {
        let _ = pkcs8;
        Err(missing())
    }
}

/// A PKCS#10 CSR (DER) for an SM2 PKCS#8 key with `uris` and `dns` as SANs, signed SM2-with-SM3 with the
/// standard ID.
pub fn csr(
    pkcs8: &[u8],
    uris: &[String],
    dns: &[String],
    common_name: Option<&str>,
) -> Result<Vec<u8>, HsmError> {
    #[cfg(feature = "sm")]
    {
        use trustline_sm::openssl::{stack::Stack, x509};
        let e = |what: &'static str| {
            move |err: trustline_sm::openssl::error::ErrorStack| HsmError::Sm(format!("{what}: {err}"))
        };
        let key =
            trustline_sm::sm2::Sm2Key::from_pkcs8_der(pkcs8).map_err(|e| HsmError::Sm(e.to_string()))?;
        let mut b = x509::X509ReqBuilder::new().map_err(e("X509_REQ_new"))?;
        b.set_pubkey(key.pkey()).map_err(e("X509_REQ_set_pubkey"))?;
        let mut name = x509::X509NameBuilder::new().map_err(e("X509_NAME_new"))?;
        name.append_entry_by_text("O", "Trustline")
            .map_err(e("X509_NAME_add_entry"))?;
        if let Some(cn) = common_name {
            name.append_entry_by_text("CN", cn)
                .map_err(e("X509_NAME_add_entry"))?;
        }
        b.set_subject_name(&name.build())
            .map_err(e("X509_REQ_set_subject_name"))?;
        if !uris.is_empty() || !dns.is_empty() {
            let mut san = x509::extension::SubjectAlternativeName::new();
            for u in uris {
                san.uri(u);
            }
            for d in dns {
                san.dns(d);
            }
            let ext = san.build(&b.x509v3_context(None)).map_err(e("subjectAltName"))?;
            let mut exts = Stack::new().map_err(e("sk_new"))?;
            exts.push(ext).map_err(e("sk_push"))?;
            b.add_extensions(&exts).map_err(e("X509_REQ_add_extensions"))?;
        }
        let req = trustline_sm::sm2::sign_x509_req(b, &key).map_err(|e| HsmError::Sm(e.to_string()))?;
        req.to_der().map_err(e("i2d_X509_REQ"))
    }
    #[cfg(not(feature = "sm"))]
    {
        let _ = (pkcs8, uris, dns, common_name);
        Err(missing())
    }
}

/// SM4-GCM (RFC 8998 §2: 16-byte key, 12-byte nonce, 16-byte tag): `ciphertext || tag`.
pub fn sm4_gcm_seal(
    key: &[u8; 16],
    nonce: &[u8; 12],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, HsmError> {
    #[cfg(feature = "sm")]
    {
        trustline_sm::sm4gcm::seal(key, nonce, aad, plaintext).map_err(|e| HsmError::Sm(e.to_string()))
    }
    #[cfg(not(feature = "sm"))]
    {
        let _ = (key, nonce, aad, plaintext);
        Err(missing())
    }
}

/// Opens SM4-GCM `ciphertext || tag`; any change to key, nonce, AAD or data is refused.
pub fn sm4_gcm_open(
    key: &[u8; 16],
    nonce: &[u8; 12],
    aad: &[u8],
    sealed: &[u8],
) -> Result<Vec<u8>, HsmError> {
    #[cfg(feature = "sm")]
    {
        trustline_sm::sm4gcm::open(key, nonce, aad, sealed).map_err(|e| HsmError::Sm(e.to_string()))
    }
    #[cfg(not(feature = "sm"))]
    {
        let _ = (key, nonce, aad, sealed);
        Err(missing())
    }
}

/// The rustls provider of SM-mode trust domains: TLS 1.3 `TLS_SM4_GCM_SM3`, curveSM2, `sm2sig_sm3` only.
pub fn tls_provider() -> Result<rustls::crypto::CryptoProvider, HsmError> {
    #[cfg(feature = "sm")]
    {
        Ok(trustline_sm::tls::provider())
    }
    #[cfg(not(feature = "sm"))]
    {
        Err(missing())
    }
}

/// A TLS 1.3 CertificateVerify signature (SM2-with-SM3, ID `TLSv1.3+GM+Cipher+Suite`) by an `hsm` SM2 key.
#[cfg(feature = "sm")]
pub(crate) fn sign_tls13(key: &trustline_sm::sm2::Sm2Key, msg: &[u8]) -> Result<Vec<u8>, HsmError> {
    key.sign_tls13(msg).map_err(|e| HsmError::Sm(e.to_string()))
}

/// SM2 certificates and CSRs through rcgen. rcgen knows no SM2, so an SM2 key stands in as a P-256 key while rcgen lays
/// out the certificate; the OIDs are then rewritten in place: `ecdsa-with-SHA256` -> `SM2-with-SM3` and, in
/// SM2 public keys, `prime256v1` -> `sm2` (each pair has the same DER length, so no length changes). The
/// to-be-signed bytes are rewritten before they are signed (SM2-with-SM3, ID `1234567812345678`), and the finished
/// certificate the same way, so what was signed is exactly the certificate's TBS. One profile, SVID rules
/// included, serves both modes.
pub use rewrite::{finish_signed, rewrite_placeholders};

mod rewrite {
    /// `AlgorithmIdentifier { ecdsa-with-SHA256 }` as rcgen writes it.
    const ECDSA_SHA256: &[u8] = &[
        0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02,
    ];
    /// `AlgorithmIdentifier { SM2-with-SM3 }` (1.2.156.10197.1.501, no parameters).
    const SM2_SM3: &[u8] = &[
        0x30, 0x0a, 0x06, 0x08, 0x2a, 0x81, 0x1c, 0xcf, 0x55, 0x01, 0x83, 0x75,
    ];
    /// `AlgorithmIdentifier { id-ecPublicKey, prime256v1 }`.
    const P256_KEY: &[u8] = &[
        0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce,
        0x3d, 0x03, 0x01, 0x07,
    ];
    /// `AlgorithmIdentifier { id-ecPublicKey, sm2 }` (1.2.156.10197.1.301).
    const SM2_KEY: &[u8] = &[
        0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x81, 0x1c, 0xcf,
        0x55, 0x01, 0x82, 0x2d,
    ];

    fn replace_all(buf: &mut [u8], from: &[u8], to: &[u8]) {
        let mut i = 0;
        while i + from.len() <= buf.len() {
            if &buf[i..i + from.len()] == from {
                buf[i..i + from.len()].copy_from_slice(to);
                i += from.len();
            } else {
                i += 1;
            }
        }
    }

    /// Rewrites the placeholder algorithm identifiers of a to-be-signed structure (TBSCertificate or
    /// CertificationRequestInfo) in place.
    pub fn rewrite_placeholders(buf: &mut [u8]) {
        replace_all(buf, ECDSA_SHA256, SM2_SM3);
        replace_all(buf, P256_KEY, SM2_KEY);
    }

    /// The length of a DER header (tag + length octets) at the start of `der`, and the content length.
    fn header(der: &[u8]) -> Option<(usize, usize)> {
        let first = *der.get(1)?;
        if first < 0x80 {
            return Some((2, usize::from(first)));
        }
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 3 {
            return None;
        }
        let mut len = 0usize;
        for b in der.get(2..2 + n)? {
            len = (len << 8) | usize::from(*b);
        }
        Some((2 + n, len))
    }

    /// Rewrites a finished certificate or CSR: the signed part and its signatureAlgorithm, not the signature
    /// value. `None` if the DER is not a signed structure.
    pub fn finish_signed(mut der: Vec<u8>) -> Option<Vec<u8>> {
        let (outer_hdr, _) = header(&der)?;
        let (tbs_hdr, tbs_len) = header(der.get(outer_hdr..)?)?;
        let tbs_end = outer_hdr + tbs_hdr + tbs_len;
        let (alg_hdr, alg_len) = header(der.get(tbs_end..)?)?;
        let alg_end = tbs_end + alg_hdr + alg_len;
        rewrite_placeholders(der.get_mut(outer_hdr..alg_end)?);
        Some(der)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spki_detection() {
        let mut spki = vec![
            0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01,
        ];
        spki.extend_from_slice(&[0x06, 0x08]);
        let p256 = [
            &spki[..],
            &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07],
            &[0x03, 0x42, 0x00],
        ]
        .concat();
        spki.extend_from_slice(&SM2_CURVE_OID[2..]);
        spki.extend_from_slice(&[0x03, 0x42, 0x00]);
        assert!(is_sm2_spki(&spki));
        assert!(!is_sm2_spki(&p256));
        assert!(!is_sm2_spki(&[]));
    }
}
