//! Where Trustline's private keys live: one signing interface ([`Signer`]) over key backends ([`KeyStore`]).
//!
//! The interface is shaped for keys whose private half can never leave a device (TPM 2.0, PKCS#11 HSMs): a signer
//! exposes its public key, its key type and a `sign` operation, and nothing else. Keys are referred to by an
//! opaque, storable [`KeyRef`]; for the first backend, software keys, that reference is the key sealed with
//! AES-256-GCM under a key derived from an operator passphrase (Argon2id) or read from a key file.
//!
//! This crate must never write a private key in clear, and never log or print secrets (passphrases, sealing
//! keys, PKCS#8 material): `Debug` of every type here is redacted.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod pkcs11;
mod software;
#[doc(hidden)]
pub mod swtpm;
#[cfg(feature = "tpm")]
pub mod tpm;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

pub use pkcs11::{Pkcs11Config, Pkcs11KeyStore};
pub use software::{load_private_key_pem, SoftwareKeyStore};
#[cfg(feature = "tpm")]
pub use tpm::TpmKeyStore;
pub mod sm;

/// Whether this build has the TPM 2.0 backend (cargo feature `tpm`, which needs libtss2 at build time).
pub const TPM_SUPPORTED: bool = cfg!(feature = "tpm");

/// Whether this build has the Chinese national algorithms (cargo feature `sm`: SM2 keys, SM4-GCM sealing).
pub const SM_SUPPORTED: bool = cfg!(feature = "sm");

/// Where a TPM 2.0 is.
#[derive(Debug, Clone)]
pub struct TpmConfig {
    /// The TCTI: `device:/dev/tpmrm0`, `swtpm:host=127.0.0.1,port=2321`, `tabrmd:` …
    pub tcti: String,
}

/// Key-related failures. Messages name the field or file at fault, never a secret.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HsmError {
    /// A key type name is not known.
    #[error("unknown key type {0:?} (accepted: ec-p256, ec-p384, ed25519, rsa-2048, rsa-3072, rsa-4096)")]
    UnknownKeyType(String),
    /// The signature algorithm does not fit the key.
    #[error("signature algorithm {alg:?} cannot be used with a {key_type} key")]
    AlgorithmMismatch {
        /// The key's type.
        key_type: KeyType,
        /// The algorithm asked for.
        alg: SignatureAlgorithm,
    },
    /// The passphrase is too short.
    #[error("passphrase is too short: use at least 12 characters")]
    WeakPassphrase,
    /// The key file is malformed.
    #[error("key file {path}: {reason}")]
    BadKeyFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The key file is readable by group or others.
    #[error("key file {path} has mode {mode:o}: group and others must have no access (chmod 600)")]
    KeyFilePermissions {
        /// The file.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
    /// I/O on a key file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A sealed key could not be opened.
    #[error("sealed key: {0}")]
    Sealed(&'static str),
    /// A key reference is malformed or of an unknown backend.
    #[error("key reference with scheme {0:?} is not understood")]
    BadKeyRef(String),
    /// The backend is not available in this build.
    #[error("key backend {0:?} is not supported by this build")]
    UnsupportedBackend(String),
    /// A cryptographic operation failed.
    #[error("crypto: {0}")]
    Crypto(&'static str),
    /// PEM input could not be used.
    #[error("PEM private key: {0}")]
    BadPem(String),
    /// A PKCS#11 module, token or key failed (the message names which; never the PIN).
    #[error("PKCS#11: {0}")]
    Pkcs11(String),
    /// A TPM failed or could not be reached (the message names the TPM and the command).
    #[error("TPM: {0}")]
    Tpm(String),
    /// An SM2 operation failed (OpenSSL's reason).
    #[error("SM2: {0}")]
    Sm(String),
}

/// Key types Trustline can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyType {
    /// ECDSA on P-256 (the default).
    EcP256,
    /// ECDSA on P-384.
    EcP384,
    /// Ed25519.
    Ed25519,
    /// RSA, 2048-bit modulus.
    Rsa2048,
    /// RSA, 3072-bit modulus.
    Rsa3072,
    /// RSA, 4096-bit modulus.
    Rsa4096,
    /// SM2 (GB/T 32918), signing SM2-with-SM3 with the distinguishing ID `1234567812345678`. Needs the `sm`
    /// feature to generate or use.
    Sm2,
}

impl KeyType {
    /// The stable name used in configs and records.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::EcP256 => "ec-p256",
            Self::EcP384 => "ec-p384",
            Self::Ed25519 => "ed25519",
            Self::Rsa2048 => "rsa-2048",
            Self::Rsa3072 => "rsa-3072",
            Self::Rsa4096 => "rsa-4096",
            Self::Sm2 => "sm2",
        }
    }

    /// The algorithm used to sign certificates with this key type.
    pub fn default_x509_algorithm(&self) -> SignatureAlgorithm {
        match self {
            Self::EcP256 => SignatureAlgorithm::EcdsaP256Sha256,
            Self::EcP384 => SignatureAlgorithm::EcdsaP384Sha384,
            Self::Ed25519 => SignatureAlgorithm::Ed25519,
            Self::Rsa2048 | Self::Rsa3072 | Self::Rsa4096 => SignatureAlgorithm::RsaPkcs1Sha256,
            Self::Sm2 => SignatureAlgorithm::Sm2Sm3,
        }
    }

    fn is_rsa(&self) -> bool {
        matches!(self, Self::Rsa2048 | Self::Rsa3072 | Self::Rsa4096)
    }

    fn code(&self) -> u8 {
        match self {
            Self::EcP256 => 1,
            Self::EcP384 => 2,
            Self::Ed25519 => 3,
            Self::Rsa2048 => 4,
            Self::Rsa3072 => 5,
            Self::Rsa4096 => 6,
            Self::Sm2 => 7,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            1 => Self::EcP256,
            2 => Self::EcP384,
            3 => Self::Ed25519,
            4 => Self::Rsa2048,
            5 => Self::Rsa3072,
            6 => Self::Rsa4096,
            7 => Self::Sm2,
            _ => return None,
        })
    }
}

impl FromStr for KeyType {
    type Err = HsmError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "ec-p256" => Self::EcP256,
            "ec-p384" => Self::EcP384,
            "ed25519" => Self::Ed25519,
            "rsa-2048" => Self::Rsa2048,
            "rsa-3072" => Self::Rsa3072,
            "rsa-4096" => Self::Rsa4096,
            "sm2" => Self::Sm2,
            other => return Err(HsmError::UnknownKeyType(other.to_owned())),
        })
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Signature algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SignatureAlgorithm {
    /// ECDSA P-256 with SHA-256 (DER signature).
    EcdsaP256Sha256,
    /// ECDSA P-384 with SHA-384 (DER signature).
    EcdsaP384Sha384,
    /// Ed25519.
    Ed25519,
    /// RSA PKCS#1 v1.5 with SHA-256.
    RsaPkcs1Sha256,
    /// RSA PKCS#1 v1.5 with SHA-384.
    RsaPkcs1Sha384,
    /// RSA-PSS with SHA-256 (salt length = digest length).
    RsaPssSha256,
    /// SM2 with SM3 (DER signature), distinguishing ID `1234567812345678` (certificates, CSRs, JWTs).
    Sm2Sm3,
    /// SM2 with SM3, distinguishing ID `TLSv1.3+GM+Cipher+Suite` (TLS 1.3 CertificateVerify, RFC 8998).
    Sm2Sm3Tls13,
}

impl SignatureAlgorithm {
    /// Whether this algorithm can be used with `key_type`.
    pub fn fits(&self, key_type: KeyType) -> bool {
        match self {
            Self::EcdsaP256Sha256 => key_type == KeyType::EcP256,
            Self::EcdsaP384Sha384 => key_type == KeyType::EcP384,
            Self::Ed25519 => key_type == KeyType::Ed25519,
            Self::RsaPkcs1Sha256 | Self::RsaPkcs1Sha384 | Self::RsaPssSha256 => key_type.is_rsa(),
            Self::Sm2Sm3 | Self::Sm2Sm3Tls13 => key_type == KeyType::Sm2,
        }
    }
}

/// A private key that can sign. No method exposes private material, so device-held keys fit the same interface.
pub trait Signer: Send + Sync + fmt::Debug {
    /// The key type.
    fn key_type(&self) -> KeyType;
    /// The raw subjectPublicKey bits: EC uncompressed point, Ed25519 32 bytes, RSA PKCS#1 `RSAPublicKey` DER.
    fn public_key(&self) -> &[u8];
    /// DER `SubjectPublicKeyInfo`.
    fn public_key_spki_der(&self) -> Vec<u8>;
    /// Signs `msg` (hashing as `alg` says). ECDSA signatures come DER-encoded, as X.509 wants them.
    fn sign(&self, alg: SignatureAlgorithm, msg: &[u8]) -> Result<Vec<u8>, HsmError>;
}

/// Reads the first line of a secret file (a passphrase, PIN or password), refusing a file that group or others
/// can read, as for key files. The line is trimmed; an empty one is refused.
pub fn read_secret_file(path: &std::path::Path) -> Result<zeroize::Zeroizing<String>, HsmError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |source| HsmError::Io {
        path: path.to_owned(),
        source,
    };
    let mode = std::fs::metadata(path).map_err(io)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(HsmError::KeyFilePermissions {
            path: path.to_owned(),
            mode,
        });
    }
    let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(io)?);
    let line = text.lines().next().unwrap_or_default().trim().to_owned();
    if line.is_empty() {
        return Err(HsmError::BadKeyFile {
            path: path.to_owned(),
            reason: "the first line is empty".into(),
        });
    }
    Ok(zeroize::Zeroizing::new(line))
}

/// Converts a fixed-width `r || s` signature (JWS form) to DER `SEQUENCE { INTEGER r, INTEGER s }`.
pub fn ecdsa_fixed_to_der(rs: &[u8]) -> Vec<u8> {
    pkcs11::fixed_to_der(rs)
}

/// Converts a DER ECDSA signature to the fixed-width `r || s` form JWS uses (`field_len` 32 for P-256, 48 for
/// P-384).
pub fn ecdsa_der_to_fixed(der: &[u8], field_len: usize) -> Result<Vec<u8>, HsmError> {
    let bad = HsmError::Crypto("malformed DER ECDSA signature");
    // SEQUENCE { INTEGER r, INTEGER s }; lengths fit in one byte for P-256/P-384 (< 128) or use 0x81.
    let (seq, rest) = der_tlv(der, 0x30).ok_or(HsmError::Crypto("malformed DER ECDSA signature"))?;
    if !rest.is_empty() {
        return Err(bad);
    }
    let (r, rest) = der_tlv(seq, 0x02).ok_or(HsmError::Crypto("malformed DER ECDSA signature"))?;
    let (s, rest) = der_tlv(rest, 0x02).ok_or(HsmError::Crypto("malformed DER ECDSA signature"))?;
    if !rest.is_empty() {
        return Err(bad);
    }
    let mut out = vec![0u8; 2 * field_len];
    for (i, int) in [r, s].into_iter().enumerate() {
        let int = match int {
            [0, tail @ ..] => tail,
            x => x,
        };
        if int.len() > field_len {
            return Err(HsmError::Crypto(
                "ECDSA signature component too long for the curve",
            ));
        }
        let start = (i + 1) * field_len - int.len();
        out[start..(i + 1) * field_len].copy_from_slice(int);
    }
    Ok(out)
}

fn der_tlv(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&t, rest) = input.split_first()?;
    if t != tag {
        return None;
    }
    let (&l, rest) = rest.split_first()?;
    let (len, rest) = match l {
        l if l < 0x80 => (l as usize, rest),
        0x81 => {
            let (&l2, rest) = rest.split_first()?;
            (l2 as usize, rest)
        }
        _ => return None,
    };
    if rest.len() < len {
        return None;
    }
    Some(rest.split_at(len))
}

/// Verifies `sig` over `msg` with a public key in [`Signer::public_key`] form.
pub fn verify(
    key_type: KeyType,
    alg: SignatureAlgorithm,
    public_key: &[u8],
    msg: &[u8],
    sig: &[u8],
) -> Result<(), HsmError> {
    use aws_lc_rs::signature as s;
    if !alg.fits(key_type) {
        return Err(HsmError::AlgorithmMismatch { key_type, alg });
    }
    if alg == SignatureAlgorithm::Sm2Sm3 {
        return sm::verify(public_key, msg, sig).map_err(|_| HsmError::Crypto("signature does not verify"));
    }
    if alg == SignatureAlgorithm::Sm2Sm3Tls13 {
        return verify_sm2_tls13(public_key, msg, sig);
    }
    let algorithm: &'static dyn s::VerificationAlgorithm = match alg {
        SignatureAlgorithm::EcdsaP256Sha256 => &s::ECDSA_P256_SHA256_ASN1,
        SignatureAlgorithm::EcdsaP384Sha384 => &s::ECDSA_P384_SHA384_ASN1,
        SignatureAlgorithm::Ed25519 => &s::ED25519,
        SignatureAlgorithm::RsaPkcs1Sha256 => &s::RSA_PKCS1_2048_8192_SHA256,
        SignatureAlgorithm::RsaPkcs1Sha384 => &s::RSA_PKCS1_2048_8192_SHA384,
        SignatureAlgorithm::RsaPssSha256 => &s::RSA_PSS_2048_8192_SHA256,
        SignatureAlgorithm::Sm2Sm3 | SignatureAlgorithm::Sm2Sm3Tls13 => {
            return Err(HsmError::Crypto("SM2 is checked above"))
        }
    };
    s::UnparsedPublicKey::new(algorithm, public_key)
        .verify(msg, sig)
        .map_err(|_| HsmError::Crypto("signature does not verify"))
}

#[cfg(feature = "sm")]
fn verify_sm2_tls13(public_key: &[u8], msg: &[u8], sig: &[u8]) -> Result<(), HsmError> {
    trustline_sm::sm2::verify_tls13(public_key, msg, sig)
        .map_err(|_| HsmError::Crypto("signature does not verify"))
}

#[cfg(not(feature = "sm"))]
fn verify_sm2_tls13(_: &[u8], _: &[u8], _: &[u8]) -> Result<(), HsmError> {
    Err(HsmError::UnsupportedBackend(
        "sm2 (rebuild with --features trustline-hsm/sm; it needs libssl-dev)".into(),
    ))
}

/// An opaque, storable reference to a key in a backend (`soft:v1:<sealed blob>` for software keys). It never
/// holds a private key in clear. `Debug` shows the scheme and length only.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyRef(String);

impl KeyRef {
    /// Wraps a stored reference.
    pub fn new(s: String) -> Self {
        Self(s)
    }

    /// The reference string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn scheme(&self) -> &str {
        self.0.split(':').next().unwrap_or("")
    }
}

impl fmt::Debug for KeyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyRef({}:…, {} bytes)", self.scheme(), self.0.len())
    }
}

/// The key backends.
#[derive(Debug)]
#[non_exhaustive]
pub enum KeyStore {
    /// Software keys sealed at rest.
    Software(SoftwareKeyStore),
    /// Keys inside a PKCS#11 token.
    Pkcs11(Pkcs11KeyStore),
    /// Keys inside a TPM 2.0.
    #[cfg(feature = "tpm")]
    Tpm(TpmKeyStore),
}

impl KeyStore {
    /// Generates a key inside the backend and returns it with its storable reference.
    pub fn generate(&self, key_type: KeyType) -> Result<(Arc<dyn Signer>, KeyRef), HsmError> {
        match self {
            Self::Software(s) => s.generate(key_type),
            Self::Pkcs11(p) => p.generate(key_type),
            #[cfg(feature = "tpm")]
            Self::Tpm(t) => t.generate(key_type),
        }
    }

    /// Loads a key by reference.
    pub fn load(&self, key_ref: &KeyRef) -> Result<Arc<dyn Signer>, HsmError> {
        match (self, key_ref.scheme()) {
            (Self::Software(s), "soft") => s.load(key_ref),
            (Self::Pkcs11(p), "pkcs11") => p.load(key_ref),
            #[cfg(feature = "tpm")]
            (Self::Tpm(t), "tpm") => t.load(key_ref),
            (_, other) => Err(HsmError::BadKeyRef(other.to_owned())),
        }
    }

    /// Connects to a TPM 2.0; fails with [`HsmError::UnsupportedBackend`] in builds without the `tpm` feature.
    pub fn open_tpm(cfg: &TpmConfig) -> Result<Self, HsmError> {
        #[cfg(feature = "tpm")]
        {
            TpmKeyStore::open(cfg).map(Self::Tpm)
        }
        #[cfg(not(feature = "tpm"))]
        {
            let _ = cfg;
            Err(HsmError::UnsupportedBackend(
                "tpm (rebuild with --features trustline-hsm/tpm; it needs libtss2-dev)".into(),
            ))
        }
    }

    /// The backend's name.
    pub fn backend_name(&self) -> &'static str {
        match self {
            Self::Software(_) => "software",
            Self::Pkcs11(_) => "pkcs11",
            #[cfg(feature = "tpm")]
            Self::Tpm(_) => "tpm",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_type_names_round_trip() {
        for kt in [
            KeyType::EcP256,
            KeyType::EcP384,
            KeyType::Ed25519,
            KeyType::Rsa2048,
            KeyType::Rsa3072,
            KeyType::Rsa4096,
            KeyType::Sm2,
        ] {
            assert_eq!(kt.as_str().parse::<KeyType>().unwrap(), kt);
            assert_eq!(KeyType::from_code(kt.code()), Some(kt));
        }
        let err = "dsa".parse::<KeyType>().unwrap_err();
        assert!(err.to_string().contains("\"dsa\""));
    }

    #[test]
    fn der_to_fixed_pads_short_components_and_rejects_garbage() {
        // r = 0x01, s = 0x00ff (leading zero for sign)
        let der = [0x30, 0x07, 0x02, 0x01, 0x01, 0x02, 0x02, 0x00, 0xff];
        let fixed = ecdsa_der_to_fixed(&der, 32).unwrap();
        assert_eq!(fixed.len(), 64);
        assert_eq!(fixed[31], 1);
        assert_eq!(fixed[63], 0xff);
        assert!(fixed[..31].iter().all(|&b| b == 0));
        assert!(ecdsa_der_to_fixed(b"garbage", 32).is_err());
        assert!(ecdsa_der_to_fixed(&[0x30, 0x03, 0x02, 0x01, 0x01, 0x00], 32).is_err());
    }

    #[test]
    fn key_ref_debug_hides_the_blob() {
        let r = KeyRef::new("soft:v1:SECRETSECRETSECRET".into());
        let d = format!("{r:?}");
        assert!(!d.contains("SECRET"), "{d}");
    }
}
