//! SM2 keys and SM2-with-SM3 signatures (GB/T 32918, GB/T 35276), always with the distinguishing ID
//! `1234567812345678`.
//!
//! The ID enters the hash that is signed (`Z = SM3(ENTL || ID || curve || public key)`), so signer and verifier
//! must agree on it. GB/T 35276 and RFC 8998 §3.2.1 fix it to `1234567812345678`; Debian's OpenSSL 3.0 defaults
//! to an empty ID, which nothing else uses. Every signature made or checked here uses the standard ID, and a
//! signature made with another ID (the empty one included) does not verify.
//!
//! Keys: only keys whose OpenSSL type is SM2 are accepted. An EC key on the SM2 curve, built by hand, would sign
//! as plain ECDSA; such a key is converted to SM2 on load when OpenSSL can, and refused otherwise.

use openssl::ec::EcKey;
use openssl::nid::Nid;
use openssl::pkey::{Id, PKey, PKeyRef, Private, Public};
use openssl::pkey_ctx::PkeyCtx;
use openssl::x509::{X509Builder, X509Ref, X509Req, X509ReqBuilder, X509ReqRef, X509};

use crate::der;
use crate::error::SmError;
use crate::ffi;

/// The SM2 distinguishing ID of GB/T 35276 (the default user ID of GM/T 0009), used for every signature of this
/// module: certificates, CSRs, and [`Sm2Key::sign`]/[`verify`].
pub const DISTINGUISHING_ID: &[u8; 16] = b"1234567812345678";

/// The SM2 distinguishing ID that RFC 8998 §3.2.1 fixes for TLS 1.3 handshake signatures (CertificateVerify
/// with `sm2sig_sm3`). Used only by the [`crate::tls`] provider; Tongsuo, GmSSL and Tencent Kona use it too.
pub const TLS13_DISTINGUISHING_ID: &[u8; 23] = b"TLSv1.3+GM+Cipher+Suite";

/// Which distinguishing ID a signature uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DistId {
    /// [`DISTINGUISHING_ID`]: certificates, CSRs, general signatures.
    Standard,
    /// [`TLS13_DISTINGUISHING_ID`]: TLS 1.3 CertificateVerify.
    Tls13,
}

impl DistId {
    pub(crate) fn bytes(self) -> &'static [u8] {
        match self {
            DistId::Standard => DISTINGUISHING_ID,
            DistId::Tls13 => TLS13_DISTINGUISHING_ID,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            DistId::Standard => "1234567812345678",
            DistId::Tls13 => "TLSv1.3+GM+Cipher+Suite",
        }
    }
}

/// Length of an uncompressed SM2 public point (`04 || x || y`).
pub const POINT_LEN: usize = 65;

/// An SM2 private key (OpenSSL key type SM2).
#[derive(Clone)]
pub struct Sm2Key {
    pkey: PKey<Private>,
}

impl std::fmt::Debug for Sm2Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the private key.
        f.debug_struct("Sm2Key").finish_non_exhaustive()
    }
}

/// Generates a fresh SM2 key.
pub fn generate() -> Result<Sm2Key, SmError> {
    let mut ctx = PkeyCtx::new_id(Id::SM2).map_err(SmError::openssl("EVP_PKEY_CTX_new_id(SM2)"))?;
    ctx.keygen_init()
        .map_err(SmError::openssl("EVP_PKEY_keygen_init"))?;
    let pkey = ctx.keygen().map_err(SmError::openssl("EVP_PKEY_keygen"))?;
    Sm2Key::from_pkey(pkey, "generated key")
}

impl Sm2Key {
    /// Loads a PKCS#8 `PrivateKeyInfo` (DER) holding an SM2 key.
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, SmError> {
        let pkey = PKey::private_key_from_pkcs8(der).map_err(SmError::openssl("d2i_PKCS8PrivateKey"))?;
        Self::from_pkey(pkey, "PKCS#8 key")
    }

    /// Loads a PEM private key (`PRIVATE KEY` or `EC PRIVATE KEY`) holding an SM2 key.
    pub fn from_pem(pem: &[u8]) -> Result<Self, SmError> {
        let pkey = PKey::private_key_from_pem(pem).map_err(SmError::openssl("PEM_read_bio_PrivateKey"))?;
        Self::from_pkey(pkey, "PEM key")
    }

    /// Accepts an OpenSSL key if it is SM2; converts an EC key on the SM2 curve; refuses anything else.
    pub fn from_pkey(pkey: PKey<Private>, field: &'static str) -> Result<Self, SmError> {
        if ffi::is_sm2(&pkey) {
            return Ok(Sm2Key { pkey });
        }
        let spki = pkey.public_key_to_der().map_err(SmError::openssl("i2d_PUBKEY"))?;
        if spki.starts_with(&der::SM2_SPKI_PREFIX) {
            // An EC key on the SM2 curve signs as ECDSA. Re-decoding its PKCS#8 lets OpenSSL's decoders pick
            // the SM2 key type for the SM2 curve; if they do not, the key is refused below.
            let der = pkey
                .private_key_to_pkcs8()
                .map_err(SmError::openssl("i2d_PKCS8PrivateKey"))?;
            let again =
                PKey::private_key_from_pkcs8(&der).map_err(SmError::openssl("d2i_PKCS8PrivateKey"))?;
            if ffi::is_sm2(&again) {
                return Ok(Sm2Key { pkey: again });
            }
        }
        Err(SmError::NotSm2Key {
            field,
            found: describe(&pkey),
        })
    }

    /// The key as PKCS#8 `PrivateKeyInfo` DER. Secret: store it encrypted (see [`crate::sm4gcm::seal_at_rest`]).
    pub fn to_pkcs8_der(&self) -> Result<Vec<u8>, SmError> {
        self.pkey
            .private_key_to_pkcs8()
            .map_err(SmError::openssl("i2d_PKCS8PrivateKey"))
    }

    /// The key as PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`). Secret.
    pub fn to_pkcs8_pem(&self) -> Result<Vec<u8>, SmError> {
        self.pkey
            .private_key_to_pem_pkcs8()
            .map_err(SmError::openssl("PEM_write_bio_PKCS8PrivateKey"))
    }

    /// The public key as SubjectPublicKeyInfo DER (`id-ecPublicKey` with the SM2 curve).
    pub fn public_key_der(&self) -> Result<Vec<u8>, SmError> {
        self.pkey
            .public_key_to_der()
            .map_err(SmError::openssl("i2d_PUBKEY"))
    }

    /// The public key as PEM (`-----BEGIN PUBLIC KEY-----`).
    pub fn public_key_pem(&self) -> Result<Vec<u8>, SmError> {
        self.pkey
            .public_key_to_pem()
            .map_err(SmError::openssl("PEM_write_bio_PUBKEY"))
    }

    /// The public key as a 65-byte uncompressed point `04 || x || y`.
    pub fn public_key_point(&self) -> Result<[u8; POINT_LEN], SmError> {
        let spki = self.public_key_der()?;
        point_of_spki(&spki)
    }

    /// SM2-with-SM3 signature of `msg` (DER `SEQUENCE { r, s }`), ID `1234567812345678`.
    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, SmError> {
        ffi::sign(&self.pkey, msg, DistId::Standard)
    }

    /// SM2-with-SM3 signature with the TLS 1.3 ID `TLSv1.3+GM+Cipher+Suite` (RFC 8998 §3.2.1).
    pub fn sign_tls13(&self, msg: &[u8]) -> Result<Vec<u8>, SmError> {
        ffi::sign(&self.pkey, msg, DistId::Tls13)
    }

    /// The OpenSSL key, e.g. for `X509Builder::set_pubkey`.
    pub fn pkey(&self) -> &PKeyRef<Private> {
        &self.pkey
    }
}

/// Checks an SM2-with-SM3 signature (DER) of `msg`, ID `1234567812345678`. `public_key` is either an SM2
/// SubjectPublicKeyInfo (DER) or a 65-byte uncompressed point.
pub fn verify(public_key: &[u8], msg: &[u8], sig: &[u8]) -> Result<(), SmError> {
    let pkey = public_key_from_bytes(public_key)?;
    ffi::verify(&pkey, msg, sig, DistId::Standard)
}

/// Checks an SM2-with-SM3 signature with the TLS 1.3 ID `TLSv1.3+GM+Cipher+Suite` (RFC 8998 §3.2.1).
pub fn verify_tls13(public_key: &[u8], msg: &[u8], sig: &[u8]) -> Result<(), SmError> {
    let pkey = public_key_from_bytes(public_key)?;
    ffi::verify(&pkey, msg, sig, DistId::Tls13)
}

/// Parses an SM2 public key: SubjectPublicKeyInfo DER, or a 65-byte uncompressed point.
pub fn public_key_from_bytes(public_key: &[u8]) -> Result<PKey<Public>, SmError> {
    let bad = |reason: String| SmError::BadPublicKey {
        len: public_key.len(),
        reason,
    };
    let spki;
    let der = if public_key.len() == POINT_LEN {
        if public_key[0] != 0x04 {
            return Err(bad(format!(
                "point starts with {:#04x}, not 04 (uncompressed)",
                public_key[0]
            )));
        }
        spki = [&der::SM2_SPKI_PREFIX[..], public_key].concat();
        &spki[..]
    } else {
        public_key
    };
    // Only the SM2 SubjectPublicKeyInfo encoding: anything else (another curve, another algorithm) is refused
    // before OpenSSL sees it.
    point_of_spki(der)?;
    // OpenSSL checks that the point is on the curve while decoding.
    let pkey = PKey::public_key_from_der(der).map_err(|e| bad(format!("OpenSSL d2i_PUBKEY: {e}")))?;
    if ffi::is_sm2(&pkey) {
        return Ok(pkey);
    }
    // OpenSSL decoded the SM2 curve as a plain EC key, which would verify as ECDSA.
    Err(bad(format!("decoded as {}", describe(&pkey))))
}

/// The point of an SM2 SubjectPublicKeyInfo (DER), which must be exactly the SM2 encoding.
fn point_of_spki(spki: &[u8]) -> Result<[u8; POINT_LEN], SmError> {
    let bad = |reason: &str| SmError::BadPublicKey {
        len: spki.len(),
        reason: reason.into(),
    };
    let point = spki
        .strip_prefix(&der::SM2_SPKI_PREFIX[..])
        .ok_or_else(|| bad("not an SM2 SubjectPublicKeyInfo (id-ecPublicKey, curve 1.2.156.10197.1.301)"))?;
    let point: [u8; POINT_LEN] = point.try_into().map_err(|_| bad("point is not 65 bytes"))?;
    if point[0] != 0x04 {
        return Err(bad("point is not uncompressed"));
    }
    Ok(point)
}

/// Signs a certificate under construction with SM2-with-SM3 (ID `1234567812345678`) and returns it. The
/// builder is consumed: OpenSSL writes the signature algorithm and signature into the certificate it built.
pub fn sign_x509(builder: X509Builder, key: &Sm2Key) -> Result<X509, SmError> {
    ffi::sign_x509(builder.build(), &key.pkey)
}

/// Signs a certificate request under construction with SM2-with-SM3 (ID `1234567812345678`) and returns it.
pub fn sign_x509_req(builder: X509ReqBuilder, key: &Sm2Key) -> Result<X509Req, SmError> {
    ffi::sign_x509_req(builder.build(), &key.pkey)
}

/// Checks that `cert` is signed with SM2-with-SM3 (ID `1234567812345678`) by `issuer_public_key` (SM2
/// SubjectPublicKeyInfo DER or 65-byte point). Checks the signature only: not validity, extensions or names.
pub fn verify_x509(cert: &X509Ref, issuer_public_key: &[u8]) -> Result<(), SmError> {
    let der = cert.to_der().map_err(SmError::openssl("i2d_X509"))?;
    verify_signed(&der, issuer_public_key, "certificate")
}

/// Checks that a certificate request is signed with SM2-with-SM3 (ID `1234567812345678`) by the key it carries.
pub fn verify_x509_req(req: &X509ReqRef) -> Result<(), SmError> {
    let der = req.to_der().map_err(SmError::openssl("i2d_X509_REQ"))?;
    let public = req
        .public_key()
        .map_err(SmError::openssl("X509_REQ_get_pubkey"))?;
    let spki = public
        .public_key_to_der()
        .map_err(SmError::openssl("i2d_PUBKEY"))?;
    verify_signed(&der, &spki, "CSR")
}

/// Verifies the signature of a DER certificate or CSR.
fn verify_signed(der: &[u8], public_key: &[u8], what: &'static str) -> Result<(), SmError> {
    let signed = der::split_signed(der).map_err(|reason| SmError::Der { what, reason })?;
    if !der::is_sm2_with_sm3(signed.algorithm) {
        return Err(SmError::Der {
            what,
            reason: format!(
                "signature algorithm is not SM2-with-SM3: {:02x?}",
                signed.algorithm
            ),
        });
    }
    verify(public_key, signed.tbs, signed.signature)
}

/// The curve of an EC key, if it is one.
fn curve_of<T>(pkey: &PKeyRef<T>) -> Option<Nid>
where
    T: openssl::pkey::HasPublic,
{
    let ec: EcKey<_> = pkey.ec_key().ok()?;
    ec.group().curve_name()
}

/// "EC (prime256v1)", "RSA", …: what a refused key is.
fn describe<T: openssl::pkey::HasPublic>(pkey: &PKeyRef<T>) -> String {
    let kind = match pkey.id() {
        Id::EC => "EC".to_string(),
        Id::SM2 => "SM2".to_string(),
        Id::RSA => "RSA".to_string(),
        Id::ED25519 => "Ed25519".to_string(),
        other => format!("key type {}", other.as_raw()),
    };
    if pkey
        .public_key_to_der()
        .is_ok_and(|spki| spki.starts_with(&der::SM2_SPKI_PREFIX))
    {
        return format!("{kind} on the SM2 curve, not typed SM2 by OpenSSL");
    }
    match curve_of(pkey).map(|nid| nid.short_name()) {
        Some(Ok(curve)) => format!("{kind} ({curve})"),
        _ => kind,
    }
}

#[cfg(test)]
mod tests;
