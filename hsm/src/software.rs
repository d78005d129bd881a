//! Software keys, sealed at rest.
//!
//! A software key is generated with aws-lc-rs and stored only as a sealed blob inside its [`KeyRef`]:
//!
//! ```text
//! "soft:v1:" base64( header || nonce(12) || AES-256-GCM(PKCS#8 DER) || tag(16) )
//! header = "TLK1" | version(1) = 1 | kdf(1) | kdf params | key type(1)
//!   kdf 0: sealing key read from a key file (no params)
//!   kdf 1: Argon2id: m_kib(u32 BE) | t(u32 BE) | p(u32 BE) | salt(16)
//! ```
//!
//! With SM4 sealing (the `sm2` CA backend, cargo feature `sm`) the header's version is 2 and the blob is sealed
//! with SM4-GCM (RFC 8998 §2) under the first 16 bytes of HMAC-SM3(sealing key, "trustline sm4 seal v1");
//! everything else is the same.
//!
//! The whole header is the AEAD's associated data, so changing the key type or KDF parameters breaks the tag.
//! A store derives its sealing key once (with a fresh random salt); keys sealed by other stores are opened by
//! deriving for their salt, and derivations are cached by salt.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use aws_lc_rs::signature::{self as sig, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use zeroize::Zeroizing;

use crate::{HsmError, KeyRef, KeyType, SignatureAlgorithm, Signer};

const MAGIC: &[u8; 4] = b"TLK1";
const VERSION: u8 = 1;
/// Header version of blobs sealed with SM4-GCM.
const VERSION_SM4: u8 = 2;
const KDF_KEY_FILE: u8 = 0;
const KDF_ARGON2ID: u8 = 1;
const PREFIX: &str = "soft:v1:";
const MIN_PASSPHRASE: usize = 12;

#[derive(Clone, Copy, PartialEq, Eq)]
struct Argon2Params {
    m_kib: u32,
    t: u32,
    p: u32,
}

const DEFAULT_ARGON2: Argon2Params = Argon2Params {
    m_kib: 64 * 1024,
    t: 3,
    p: 1,
};

/// Derived sealing keys by (salt, m, t, p).
type DerivedKeys = HashMap<([u8; 16], u32, u32, u32), Zeroizing<[u8; 32]>>;

enum Secret {
    KeyFile(Zeroizing<[u8; 32]>),
    Passphrase {
        passphrase: Zeroizing<String>,
        params: Argon2Params,
        salt: [u8; 16],
        key: Zeroizing<[u8; 32]>,
        cache: Mutex<DerivedKeys>,
    },
}

/// Software key backend: keys live in memory and, at rest, only sealed in their [`KeyRef`].
pub struct SoftwareKeyStore {
    secret: Secret,
    /// Seal new keys with SM4-GCM instead of AES-256-GCM.
    sm4: bool,
}

impl std::fmt::Debug for SoftwareKeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.secret {
            Secret::KeyFile(_) => "key file",
            Secret::Passphrase { .. } => "passphrase",
        };
        let cipher = if self.sm4 { "SM4-GCM" } else { "AES-256-GCM" };
        write!(f, "SoftwareKeyStore({kind}, {cipher})")
    }
}

fn derive(passphrase: &str, salt: &[u8; 16], p: Argon2Params) -> Result<Zeroizing<[u8; 32]>, HsmError> {
    let params = argon2::Params::new(p.m_kib, p.t, p.p, Some(32))
        .map_err(|_| HsmError::Crypto("argon2 parameters"))?;
    let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = Zeroizing::new([0u8; 32]);
    a.hash_password_into(passphrase.as_bytes(), salt, out.as_mut())
        .map_err(|_| HsmError::Crypto("argon2 derivation"))?;
    Ok(out)
}

impl SoftwareKeyStore {
    /// A store whose sealing key is derived from `passphrase` with Argon2id (m = 64 MiB, t = 3, p = 1).
    pub fn from_passphrase(passphrase: &str) -> Result<Self, HsmError> {
        Self::with_params(passphrase, DEFAULT_ARGON2)
    }

    fn with_params(passphrase: &str, params: Argon2Params) -> Result<Self, HsmError> {
        if passphrase.chars().count() < MIN_PASSPHRASE {
            return Err(HsmError::WeakPassphrase);
        }
        let mut salt = [0u8; 16];
        SystemRandom::new()
            .fill(&mut salt)
            .map_err(|_| HsmError::Crypto("random salt"))?;
        let key = derive(passphrase, &salt, params)?;
        Ok(Self {
            sm4: false,
            secret: Secret::Passphrase {
                passphrase: Zeroizing::new(passphrase.to_owned()),
                params,
                salt,
                key,
                cache: Mutex::new(HashMap::new()),
            },
        })
    }

    /// A store whose sealing key is read from `path`: 32 raw bytes, or 64 hex digits (a trailing newline is
    /// allowed). The file must not be accessible to group or others.
    pub fn from_key_file(path: &Path) -> Result<Self, HsmError> {
        use std::os::unix::fs::PermissionsExt;
        let io = |source| HsmError::Io {
            path: path.to_owned(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(io)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(HsmError::KeyFilePermissions {
                path: path.to_owned(),
                mode,
            });
        }
        let raw = Zeroizing::new(std::fs::read(path).map_err(io)?);
        let mut key = Zeroizing::new([0u8; 32]);
        if raw.len() == 32 {
            key.copy_from_slice(&raw);
        } else {
            let text = std::str::from_utf8(&raw).map(str::trim_end).unwrap_or("");
            if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(HsmError::BadKeyFile {
                    path: path.to_owned(),
                    reason: format!(
                        "must hold 32 raw bytes or 64 hex digits, found {} bytes",
                        raw.len()
                    ),
                });
            }
            for (i, chunk) in text.as_bytes().chunks(2).enumerate() {
                let hex = std::str::from_utf8(chunk).unwrap_or("00");
                key[i] = u8::from_str_radix(hex, 16).map_err(|_| HsmError::BadKeyFile {
                    path: path.to_owned(),
                    reason: "not hex".into(),
                })?;
            }
        }
        Ok(Self {
            secret: Secret::KeyFile(key),
            sm4: false,
        })
    }

    /// Seals the keys it generates from now on with SM4-GCM (an SM-mode trust domain); opens both kinds. Needs
    /// the `sm` feature.
    pub fn with_sm4_sealing(mut self) -> Result<Self, HsmError> {
        if !crate::SM_SUPPORTED {
            return Err(HsmError::UnsupportedBackend(
                "SM4 sealing (rebuild with --features trustline-hsm/sm; it needs libssl-dev)".into(),
            ));
        }
        self.sm4 = true;
        Ok(self)
    }

    /// Writes a new random 32-byte key file with mode 0600; refuses to overwrite an existing file.
    pub fn create_key_file(path: &Path) -> Result<(), HsmError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let io = |source| HsmError::Io {
            path: path.to_owned(),
            source,
        };
        let mut key = Zeroizing::new([0u8; 32]);
        SystemRandom::new()
            .fill(key.as_mut())
            .map_err(|_| HsmError::Crypto("random key"))?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        f.write_all(key.as_ref()).map_err(io)?;
        f.sync_all().map_err(io)?;
        Ok(())
    }

    fn header(&self, key_type: KeyType) -> Vec<u8> {
        let mut h = Vec::with_capacity(40);
        h.extend_from_slice(MAGIC);
        h.push(if self.sm4 { VERSION_SM4 } else { VERSION });
        match &self.secret {
            Secret::KeyFile(_) => h.push(KDF_KEY_FILE),
            Secret::Passphrase { params, salt, .. } => {
                h.push(KDF_ARGON2ID);
                h.extend_from_slice(&params.m_kib.to_be_bytes());
                h.extend_from_slice(&params.t.to_be_bytes());
                h.extend_from_slice(&params.p.to_be_bytes());
                h.extend_from_slice(salt);
            }
        }
        h.push(key_type.code());
        h
    }

    fn seal(&self, key_type: KeyType, pkcs8: &[u8]) -> Result<KeyRef, HsmError> {
        let sealing: &[u8; 32] = match &self.secret {
            Secret::KeyFile(k) => k,
            Secret::Passphrase { key, .. } => key,
        };
        let header = self.header(key_type);
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| HsmError::Crypto("random nonce"))?;
        let buf = if self.sm4 {
            sm4::seal(sealing, &nonce, &header, pkcs8)?
        } else {
            let aead = LessSafeKey::new(
                UnboundKey::new(&AES_256_GCM, sealing).map_err(|_| HsmError::Crypto("AES key"))?,
            );
            let mut buf = Zeroizing::new(pkcs8.to_vec());
            aead.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(&header), &mut *buf)
                .map_err(|_| HsmError::Crypto("seal"))?;
            buf
        };
        let mut blob = header;
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&buf);
        Ok(KeyRef::new(format!("{PREFIX}{}", STANDARD.encode(blob))))
    }

    fn unseal(&self, key_ref: &KeyRef) -> Result<(KeyType, Zeroizing<Vec<u8>>), HsmError> {
        let b64 = key_ref
            .as_str()
            .strip_prefix(PREFIX)
            .ok_or(HsmError::Sealed("unsupported software key version"))?;
        let blob = STANDARD.decode(b64).map_err(|_| HsmError::Sealed("not base64"))?;
        if blob.len() < 6 || &blob[..4] != MAGIC {
            return Err(HsmError::Sealed("bad magic"));
        }
        if blob[4] != VERSION && blob[4] != VERSION_SM4 {
            return Err(HsmError::Sealed("unsupported blob version"));
        }
        let (kdf_len, derived): (usize, Zeroizing<[u8; 32]>) = match (blob[5], &self.secret) {
            (KDF_KEY_FILE, Secret::KeyFile(k)) => (0, k.clone()),
            (
                KDF_ARGON2ID,
                Secret::Passphrase {
                    passphrase,
                    params,
                    salt,
                    key,
                    cache,
                },
            ) => {
                if blob.len() < 6 + 28 {
                    return Err(HsmError::Sealed("truncated blob"));
                }
                let rd = |i: usize| u32::from_be_bytes([blob[i], blob[i + 1], blob[i + 2], blob[i + 3]]);
                let p = Argon2Params {
                    m_kib: rd(6),
                    t: rd(10),
                    p: rd(14),
                };
                let mut s = [0u8; 16];
                s.copy_from_slice(&blob[18..34]);
                if s == *salt && p == *params {
                    (28, key.clone())
                } else {
                    let mut c = cache.lock().unwrap_or_else(|e| e.into_inner());
                    let k = match c.get(&(s, p.m_kib, p.t, p.p)) {
                        Some(k) => k.clone(),
                        None => {
                            if p.m_kib > 4 * 1024 * 1024 || p.t > 64 || p.p > 64 {
                                return Err(HsmError::Sealed("unreasonable KDF parameters"));
                            }
                            let k = derive(passphrase, &s, p)?;
                            c.insert((s, p.m_kib, p.t, p.p), k.clone());
                            k
                        }
                    };
                    (28, k)
                }
            }
            (KDF_KEY_FILE, _) => {
                return Err(HsmError::Sealed(
                    "key was sealed with a key file, but a passphrase is configured",
                ))
            }
            (KDF_ARGON2ID, _) => {
                return Err(HsmError::Sealed(
                    "key was sealed with a passphrase, but a key file is configured",
                ))
            }
            _ => return Err(HsmError::Sealed("unknown KDF")),
        };
        let kt_at = 6 + kdf_len;
        if blob.len() < kt_at + 1 + NONCE_LEN + 16 {
            return Err(HsmError::Sealed("truncated blob"));
        }
        let key_type = KeyType::from_code(blob[kt_at]).ok_or(HsmError::Sealed("unknown key type"))?;
        let header = &blob[..=kt_at];
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&blob[kt_at + 1..kt_at + 1 + NONCE_LEN]);
        let sealed = &blob[kt_at + 1 + NONCE_LEN..];
        if blob[4] == VERSION_SM4 {
            return Ok((key_type, sm4::open(&derived, &nonce, header, sealed)?));
        }
        let aead = LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, derived.as_ref()).map_err(|_| HsmError::Crypto("AES key"))?,
        );
        let mut buf = Zeroizing::new(sealed.to_vec());
        let plain_len = aead
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(header), &mut buf)
            .map_err(|_| HsmError::Sealed("wrong passphrase or key file, or corrupted key blob"))?
            .len();
        buf.truncate(plain_len);
        Ok((key_type, buf))
    }

    /// Generates a key and returns it with its sealed reference.
    pub fn generate(&self, key_type: KeyType) -> Result<(Arc<dyn Signer>, KeyRef), HsmError> {
        let (key, pkcs8) = SoftwareKey::generate(key_type)?;
        let r = self.seal(key_type, &pkcs8)?;
        Ok((Arc::new(key), r))
    }

    /// Opens a sealed key.
    pub fn load(&self, key_ref: &KeyRef) -> Result<Arc<dyn Signer>, HsmError> {
        let (key_type, pkcs8) = self.unseal(key_ref)?;
        Ok(Arc::new(SoftwareKey::from_pkcs8(key_type, &pkcs8)?))
    }
}

enum Inner {
    Ec(EcdsaKeyPair),
    Ed(Ed25519KeyPair),
    Rsa(RsaKeyPair),
    #[cfg(feature = "sm")]
    Sm2(trustline_sm::sm2::Sm2Key),
}

struct SoftwareKey {
    key_type: KeyType,
    inner: Inner,
    public: Vec<u8>,
    spki: Vec<u8>,
}

impl std::fmt::Debug for SoftwareKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SoftwareKey({})", self.key_type)
    }
}

fn rsa_type(k: &RsaKeyPair) -> Result<KeyType, HsmError> {
    match k.public_modulus_len() * 8 {
        2048 => Ok(KeyType::Rsa2048),
        3072 => Ok(KeyType::Rsa3072),
        4096 => Ok(KeyType::Rsa4096),
        _ => Err(HsmError::Crypto(
            "unsupported RSA modulus size (use 2048, 3072 or 4096 bits)",
        )),
    }
}

impl SoftwareKey {
    fn new(key_type: KeyType, inner: Inner) -> Result<Self, HsmError> {
        let (public, spki) = match &inner {
            Inner::Ec(k) => (
                k.public_key().as_ref().to_vec(),
                k.public_key()
                    .as_der()
                    .map_err(|_| HsmError::Crypto("SPKI"))?
                    .as_ref()
                    .to_vec(),
            ),
            Inner::Ed(k) => (
                k.public_key().as_ref().to_vec(),
                k.public_key()
                    .as_der()
                    .map_err(|_| HsmError::Crypto("SPKI"))?
                    .as_ref()
                    .to_vec(),
            ),
            Inner::Rsa(k) => (
                k.public_key().as_ref().to_vec(),
                k.public_key()
                    .as_der()
                    .map_err(|_| HsmError::Crypto("SPKI"))?
                    .as_ref()
                    .to_vec(),
            ),
            #[cfg(feature = "sm")]
            Inner::Sm2(k) => (
                k.public_key_point().map_err(sm_err)?.to_vec(),
                k.public_key_der().map_err(sm_err)?,
            ),
        };
        Ok(Self {
            key_type,
            inner,
            public,
            spki,
        })
    }

    fn generate(key_type: KeyType) -> Result<(Self, Zeroizing<Vec<u8>>), HsmError> {
        let fail = |_| HsmError::Crypto("key generation");
        let (inner, pkcs8) = match key_type {
            KeyType::EcP256 | KeyType::EcP384 => {
                let alg = if key_type == KeyType::EcP256 {
                    &sig::ECDSA_P256_SHA256_ASN1_SIGNING
                } else {
                    &sig::ECDSA_P384_SHA384_ASN1_SIGNING
                };
                let k = EcdsaKeyPair::generate(alg).map_err(fail)?;
                let der = Zeroizing::new(k.to_pkcs8v1().map_err(fail)?.as_ref().to_vec());
                (Inner::Ec(k), der)
            }
            KeyType::Ed25519 => {
                let k = Ed25519KeyPair::generate().map_err(fail)?;
                let der = Zeroizing::new(k.to_pkcs8v1().map_err(fail)?.as_ref().to_vec());
                (Inner::Ed(k), der)
            }
            KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096 => {
                let size = match key_type {
                    KeyType::Rsa2048 => aws_lc_rs::rsa::KeySize::Rsa2048,
                    KeyType::Rsa3072 => aws_lc_rs::rsa::KeySize::Rsa3072,
                    _ => aws_lc_rs::rsa::KeySize::Rsa4096,
                };
                let k = RsaKeyPair::generate(size).map_err(fail)?;
                let der: Pkcs8V1Der<'static> = k.as_der().map_err(fail)?;
                (Inner::Rsa(k), Zeroizing::new(der.as_ref().to_vec()))
            }
            #[cfg(feature = "sm")]
            KeyType::Sm2 => {
                let k = trustline_sm::sm2::generate().map_err(sm_err)?;
                let der = Zeroizing::new(k.to_pkcs8_der().map_err(sm_err)?);
                (Inner::Sm2(k), der)
            }
            #[cfg(not(feature = "sm"))]
            KeyType::Sm2 => return Err(no_sm()),
        };
        Ok((Self::new(key_type, inner)?, pkcs8))
    }

    fn from_pkcs8(key_type: KeyType, der: &[u8]) -> Result<Self, HsmError> {
        let bad = |_| HsmError::Sealed("sealed PKCS#8 does not hold the recorded key type");
        let inner = match key_type {
            KeyType::EcP256 => {
                Inner::Ec(EcdsaKeyPair::from_pkcs8(&sig::ECDSA_P256_SHA256_ASN1_SIGNING, der).map_err(bad)?)
            }
            KeyType::EcP384 => {
                Inner::Ec(EcdsaKeyPair::from_pkcs8(&sig::ECDSA_P384_SHA384_ASN1_SIGNING, der).map_err(bad)?)
            }
            KeyType::Ed25519 => Inner::Ed(Ed25519KeyPair::from_pkcs8_maybe_unchecked(der).map_err(bad)?),
            #[cfg(feature = "sm")]
            KeyType::Sm2 => Inner::Sm2(
                trustline_sm::sm2::Sm2Key::from_pkcs8_der(der)
                    .map_err(|_| HsmError::Sealed("sealed PKCS#8 does not hold the recorded key type"))?,
            ),
            #[cfg(not(feature = "sm"))]
            KeyType::Sm2 => return Err(no_sm()),
            _ => Inner::Rsa(RsaKeyPair::from_pkcs8(der).map_err(bad)?),
        };
        Self::new(key_type, inner)
    }
}

impl Signer for SoftwareKey {
    fn key_type(&self) -> KeyType {
        self.key_type
    }

    fn public_key(&self) -> &[u8] {
        &self.public
    }

    fn public_key_spki_der(&self) -> Vec<u8> {
        self.spki.clone()
    }

    fn sign(&self, alg: SignatureAlgorithm, msg: &[u8]) -> Result<Vec<u8>, HsmError> {
        if !alg.fits(self.key_type) {
            return Err(HsmError::AlgorithmMismatch {
                key_type: self.key_type,
                alg,
            });
        }
        let rng = SystemRandom::new();
        match &self.inner {
            Inner::Ec(k) => Ok(k
                .sign(&rng, msg)
                .map_err(|_| HsmError::Crypto("ECDSA signing"))?
                .as_ref()
                .to_vec()),
            Inner::Ed(k) => Ok(k.sign(msg).as_ref().to_vec()),
            Inner::Rsa(k) => {
                let padding: &'static dyn sig::RsaEncoding = match alg {
                    SignatureAlgorithm::RsaPkcs1Sha384 => &sig::RSA_PKCS1_SHA384,
                    SignatureAlgorithm::RsaPssSha256 => &sig::RSA_PSS_SHA256,
                    _ => &sig::RSA_PKCS1_SHA256,
                };
                let mut out = vec![0u8; k.public_modulus_len()];
                k.sign(padding, &rng, msg, &mut out)
                    .map_err(|_| HsmError::Crypto("RSA signing"))?;
                Ok(out)
            }
            #[cfg(feature = "sm")]
            Inner::Sm2(k) => match alg {
                SignatureAlgorithm::Sm2Sm3Tls13 => crate::sm::sign_tls13(k, msg),
                _ => k.sign(msg).map_err(sm_err),
            },
        }
    }
}

#[cfg(feature = "sm")]
fn sm_err(e: trustline_sm::SmError) -> HsmError {
    HsmError::Sm(e.to_string())
}

#[cfg(not(feature = "sm"))]
fn no_sm() -> HsmError {
    HsmError::UnsupportedBackend(
        "sm2 keys (rebuild with --features trustline-hsm/sm; it needs libssl-dev)".into(),
    )
}

/// SM4-GCM sealing of software keys: the AES-256-GCM blob layout with an SM4 key derived from the sealing key.
mod sm4 {
    use super::*;

    #[cfg(feature = "sm")]
    fn key(sealing: &[u8; 32]) -> Zeroizing<[u8; 16]> {
        let mac = Zeroizing::new(trustline_sm::sm3::hmac(sealing, b"trustline sm4 seal v1"));
        let mut k = Zeroizing::new([0u8; 16]);
        k.copy_from_slice(&mac[..16]);
        k
    }

    #[cfg(feature = "sm")]
    pub(super) fn seal(
        sealing: &[u8; 32],
        nonce: &[u8; NONCE_LEN],
        header: &[u8],
        plain: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        trustline_sm::sm4gcm::seal(&key(sealing), nonce, header, plain)
            .map(Zeroizing::new)
            .map_err(|_| HsmError::Crypto("SM4-GCM seal"))
    }

    #[cfg(feature = "sm")]
    pub(super) fn open(
        sealing: &[u8; 32],
        nonce: &[u8; NONCE_LEN],
        header: &[u8],
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        trustline_sm::sm4gcm::open(&key(sealing), nonce, header, sealed)
            .map(Zeroizing::new)
            .map_err(|_| HsmError::Sealed("wrong passphrase or key file, or corrupted key blob"))
    }

    #[cfg(not(feature = "sm"))]
    pub(super) fn seal(
        _: &[u8; 32],
        _: &[u8; NONCE_LEN],
        _: &[u8],
        _: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        Err(no_sm())
    }

    #[cfg(not(feature = "sm"))]
    pub(super) fn open(
        _: &[u8; 32],
        _: &[u8; NONCE_LEN],
        _: &[u8],
        _: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        Err(HsmError::Sealed(
            "key is sealed with SM4-GCM: rebuild with --features trustline-hsm/sm",
        ))
    }
}

/// Loads an operator-supplied private key from PEM: PKCS#8 (`PRIVATE KEY`: P-256, P-384, Ed25519, RSA), SEC1
/// (`EC PRIVATE KEY`: P-256, P-384) or PKCS#1 (`RSA PRIVATE KEY`). The key stays in memory only.
pub fn load_private_key_pem(pem_text: &str) -> Result<Arc<dyn Signer>, HsmError> {
    let blocks = pem::parse_many(pem_text).map_err(|e| HsmError::BadPem(e.to_string()))?;
    let block = blocks
        .into_iter()
        .find(|b| b.tag().ends_with("PRIVATE KEY"))
        .ok_or_else(|| HsmError::BadPem("no PRIVATE KEY block".into()))?;
    if block.tag().contains("ENCRYPTED") {
        return Err(HsmError::BadPem(
            "encrypted PEM keys are not supported: decrypt it into a protected file".into(),
        ));
    }
    let der = Zeroizing::new(block.contents().to_vec());
    let key = match block.tag() {
        "PRIVATE KEY" => {
            if let Ok(k) = EcdsaKeyPair::from_pkcs8(&sig::ECDSA_P256_SHA256_ASN1_SIGNING, &der) {
                SoftwareKey::new(KeyType::EcP256, Inner::Ec(k))?
            } else if let Ok(k) = EcdsaKeyPair::from_pkcs8(&sig::ECDSA_P384_SHA384_ASN1_SIGNING, &der) {
                SoftwareKey::new(KeyType::EcP384, Inner::Ec(k))?
            } else if let Ok(k) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der) {
                SoftwareKey::new(KeyType::Ed25519, Inner::Ed(k))?
            } else if let Ok(k) = RsaKeyPair::from_pkcs8(&der) {
                SoftwareKey::new(rsa_type(&k)?, Inner::Rsa(k))?
            } else {
                return Err(HsmError::BadPem("PKCS#8 key of an unsupported type".into()));
            }
        }
        "EC PRIVATE KEY" => {
            if let Ok(k) = EcdsaKeyPair::from_private_key_der(&sig::ECDSA_P256_SHA256_ASN1_SIGNING, &der) {
                SoftwareKey::new(KeyType::EcP256, Inner::Ec(k))?
            } else if let Ok(k) =
                EcdsaKeyPair::from_private_key_der(&sig::ECDSA_P384_SHA384_ASN1_SIGNING, &der)
            {
                SoftwareKey::new(KeyType::EcP384, Inner::Ec(k))?
            } else {
                return Err(HsmError::BadPem(
                    "SEC1 key on an unsupported curve (use P-256 or P-384)".into(),
                ));
            }
        }
        "RSA PRIVATE KEY" => {
            let k = RsaKeyPair::from_der(&der)
                .map_err(|_| HsmError::BadPem("malformed PKCS#1 RSA key".into()))?;
            SoftwareKey::new(rsa_type(&k)?, Inner::Rsa(k))?
        }
        other => return Err(HsmError::BadPem(format!("unsupported PEM block {other:?}"))),
    };
    Ok(Arc::new(key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify;

    const CHEAP: Argon2Params = Argon2Params {
        m_kib: 256,
        t: 1,
        p: 1,
    };

    /// SM mode: SM2 keys sign SM2-with-SM3 (checked by the SM crate's verifier, itself checked against the openssl
    /// CLI), and every key the store makes is sealed with SM4-GCM; AES-sealed keys still open; tampering is caught.
    #[cfg(feature = "sm")]
    #[test]
    fn sm_mode_makes_sm2_keys_and_seals_with_sm4() {
        let (_dir, aes) = key_file_store();
        let (_, old_ref) = aes.generate(KeyType::EcP256).unwrap();
        let store = aes.with_sm4_sealing().unwrap();
        let (sm2, sm2_ref) = store.generate(KeyType::Sm2).unwrap();
        let sig = sm2.sign(SignatureAlgorithm::Sm2Sm3, b"tbs").unwrap();
        verify(
            KeyType::Sm2,
            SignatureAlgorithm::Sm2Sm3,
            sm2.public_key(),
            b"tbs",
            &sig,
        )
        .unwrap();
        verify(
            KeyType::Sm2,
            SignatureAlgorithm::Sm2Sm3,
            &sm2.public_key_spki_der(),
            b"tbs",
            &sig,
        )
        .unwrap();
        assert!(verify(
            KeyType::Sm2,
            SignatureAlgorithm::Sm2Sm3,
            sm2.public_key(),
            b"tbx",
            &sig
        )
        .is_err());
        assert!(sm2.sign(SignatureAlgorithm::EcdsaP256Sha256, b"x").is_err());
        let blob = STANDARD
            .decode(sm2_ref.as_str().strip_prefix(PREFIX).unwrap())
            .unwrap();
        assert_eq!(blob[4], VERSION_SM4);
        let again = store.load(&sm2_ref).unwrap();
        assert_eq!(again.public_key_spki_der(), sm2.public_key_spki_der());
        // The JWT key of an SM-mode CA (P-256 by default) is sealed with SM4 too.
        let (_, p256_ref) = store.generate(KeyType::EcP256).unwrap();
        let blob = STANDARD
            .decode(p256_ref.as_str().strip_prefix(PREFIX).unwrap())
            .unwrap();
        assert_eq!(blob[4], VERSION_SM4);
        store.load(&p256_ref).unwrap();
        store.load(&old_ref).unwrap();
        // One flipped bit anywhere is refused.
        let mut bad = blob.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        let bad_ref = KeyRef::new(format!("{PREFIX}{}", STANDARD.encode(&bad)));
        assert!(matches!(store.load(&bad_ref), Err(HsmError::Sealed(_))));
    }

    fn key_file_store() -> (tempfile::TempDir, SoftwareKeyStore) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("seal.key");
        SoftwareKeyStore::create_key_file(&p).unwrap();
        let s = SoftwareKeyStore::from_key_file(&p).unwrap();
        (dir, s)
    }

    #[test]
    fn every_key_type_signs_verifies_and_round_trips_sealed() {
        let (_d, store) = key_file_store();
        for kt in [
            KeyType::EcP256,
            KeyType::EcP384,
            KeyType::Ed25519,
            KeyType::Rsa2048,
        ] {
            let (signer, r) = store.generate(kt).unwrap();
            let alg = kt.default_x509_algorithm();
            let s = signer.sign(alg, b"hello").unwrap();
            verify(kt, alg, signer.public_key(), b"hello", &s).unwrap();
            assert!(verify(kt, alg, signer.public_key(), b"other", &s).is_err());
            let loaded = store.load(&r).unwrap();
            assert_eq!(loaded.public_key(), signer.public_key());
            assert_eq!(loaded.key_type(), kt);
            assert_eq!(loaded.public_key_spki_der(), signer.public_key_spki_der());
        }
        let (rsa, _) = store.generate(KeyType::Rsa2048).unwrap();
        for alg in [
            SignatureAlgorithm::RsaPssSha256,
            SignatureAlgorithm::RsaPkcs1Sha384,
        ] {
            let s = rsa.sign(alg, b"m").unwrap();
            verify(KeyType::Rsa2048, alg, rsa.public_key(), b"m", &s).unwrap();
        }
    }

    #[test]
    fn algorithm_mismatch_is_refused() {
        let (_d, store) = key_file_store();
        let (ed, _) = store.generate(KeyType::Ed25519).unwrap();
        assert!(matches!(
            ed.sign(SignatureAlgorithm::EcdsaP256Sha256, b"x"),
            Err(HsmError::AlgorithmMismatch { .. })
        ));
    }

    #[test]
    fn passphrase_seals_and_wrong_passphrase_fails_cleanly() {
        let a = SoftwareKeyStore::with_params("correct horse battery", CHEAP).unwrap();
        let (k, r) = a.generate(KeyType::EcP256).unwrap();
        // Another store with the same passphrase (fresh salt) opens it by deriving for the blob's salt.
        let b = SoftwareKeyStore::with_params("correct horse battery", CHEAP).unwrap();
        assert_eq!(b.load(&r).unwrap().public_key(), k.public_key());
        let wrong = SoftwareKeyStore::with_params("incorrect horse battery", CHEAP).unwrap();
        let err = wrong.load(&r).unwrap_err();
        assert!(err.to_string().contains("wrong passphrase"), "{err}");
        assert!(matches!(
            SoftwareKeyStore::from_passphrase("short"),
            Err(HsmError::WeakPassphrase)
        ));
        // A key-file store refuses a passphrase-sealed blob with a clear reason.
        let (_d, kf) = key_file_store();
        assert!(kf
            .load(&r)
            .unwrap_err()
            .to_string()
            .contains("sealed with a passphrase"));
    }

    #[test]
    fn tampered_blob_fails_and_blob_holds_no_clear_key() {
        let (_d, store) = key_file_store();
        let (key, pkcs8) = SoftwareKey::generate(KeyType::EcP256).unwrap();
        let r = store.seal(KeyType::EcP256, &pkcs8).unwrap();
        let blob = STANDARD.decode(r.as_str().strip_prefix(PREFIX).unwrap()).unwrap();
        // The private scalar is the 32 bytes after the OCTET STRING header inside the PKCS#8.
        let needle = &pkcs8[pkcs8.len() - 90..pkcs8.len() - 58];
        assert!(!blob.windows(needle.len()).any(|w| w == needle));
        assert!(!blob.windows(16).any(|w| w == &pkcs8[..16]));
        for i in [5usize, 7, blob.len() - 1] {
            let mut t = blob.clone();
            t[i] ^= 1;
            let r2 = KeyRef::new(format!("{PREFIX}{}", STANDARD.encode(&t)));
            assert!(store.load(&r2).is_err(), "flip at {i} must fail");
        }
        assert_eq!(store.load(&r).unwrap().public_key(), key.public_key());
    }

    #[test]
    fn key_file_formats_and_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let hex = dir.path().join("hex.key");
        std::fs::write(&hex, format!("{}\n", "ab".repeat(32))).unwrap();
        std::fs::set_permissions(&hex, std::fs::Permissions::from_mode(0o600)).unwrap();
        SoftwareKeyStore::from_key_file(&hex).unwrap();
        let short = dir.path().join("short.key");
        std::fs::write(&short, b"tooshort").unwrap();
        std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = SoftwareKeyStore::from_key_file(&short).unwrap_err();
        assert!(err.to_string().contains("short.key"), "{err}");
        let open = dir.path().join("open.key");
        std::fs::write(&open, [7u8; 32]).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            SoftwareKeyStore::from_key_file(&open),
            Err(HsmError::KeyFilePermissions { .. })
        ));
        let created = dir.path().join("new.key");
        SoftwareKeyStore::create_key_file(&created).unwrap();
        assert!(
            SoftwareKeyStore::create_key_file(&created).is_err(),
            "never overwrites"
        );
    }

    /// Keys sealed by earlier releases must open forever: the CA's keys in its database and the agent's sealed SVID
    /// key were sealed in this format (key file: the file's 32 bytes are the AES-256-GCM key, no KDF; passphrase:
    /// Argon2id with the parameters and salt in the blob). Any change of derivation must keep these opening.
    #[test]
    fn blobs_sealed_by_earlier_releases_still_open() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("seal.key");
        std::fs::write(&p, (1u8..=32).collect::<Vec<u8>>()).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let key_file = SoftwareKeyStore::from_key_file(&p).unwrap();
        let sealed = KeyRef::new(
            "soft:v1:VExLMQEAAVPAFVmbLy5S/nZcUmE/PQlAIqZ5+2pXz1wG35Cdsz7qfVW5yBmMw6i4tQz1MTLMreTTgfs4M7dVRAFg6pH/\
             PWqdVTvRYf9/9Y1TPh+B+jsy6ZKZPqtfXaqYqatyE7VQQkz0iOfSzE3BjGBjGoxB4dPkv7LizbbfvavUt7axgHu8HmxINJw1rV/jA1z6\
             3tJ7k+qg8AxvJvfu01uLR/k13rA9r9MNdy4="
                .into(),
        );
        let k = key_file.load(&sealed).unwrap();
        assert_eq!(k.key_type(), KeyType::EcP256);
        assert_eq!(
            STANDARD.encode(k.public_key()),
            "BEbUCFQlcpf70BCm8m7PxV1EOtQhizTbuSKLjPict626rKWx07KYqh9DRJ8ET/1WCcyqUeVZCSlqeP3AYXmGvCw="
        );
        let sig = k.sign(SignatureAlgorithm::EcdsaP256Sha256, b"m").unwrap();
        verify(
            KeyType::EcP256,
            SignatureAlgorithm::EcdsaP256Sha256,
            k.public_key(),
            b"m",
            &sig,
        )
        .unwrap();
        // Sealed with passphrase "correct horse battery", Argon2id m = 256 KiB, t = 1, p = 1 (read from the blob).
        let sealed = KeyRef::new(
            "soft:v1:VExLMQEBAAABAAAAAAEAAAABgz/kHaHsEKrZ90RALfpFvwNrQzTkT/iCR0B9x03xYkcm3GpYhKdk+fv2DWKW0gh4xlBs4MGBO\
             Juh4bhZyX2sLIBGRP6uckUHKXn8yJrRixr1XB0rNwOSTx9wp4FL"
                .into(),
        );
        let passphrase = SoftwareKeyStore::with_params("correct horse battery", CHEAP).unwrap();
        let k = passphrase.load(&sealed).unwrap();
        assert_eq!(k.key_type(), KeyType::Ed25519);
        assert_eq!(
            STANDARD.encode(k.public_key()),
            "30+B/ZV+F680oejUDXBms4LjZzphDRuazxFWmKgd1l4="
        );
    }

    #[test]
    fn loads_pem_keys() {
        let (_k, pkcs8) = SoftwareKey::generate(KeyType::EcP256).unwrap();
        let text = pem::encode(&pem::Pem::new("PRIVATE KEY", pkcs8.to_vec()));
        let s = load_private_key_pem(&text).unwrap();
        assert_eq!(s.key_type(), KeyType::EcP256);
        let (_k, pkcs8) = SoftwareKey::generate(KeyType::Ed25519).unwrap();
        let text = pem::encode(&pem::Pem::new("PRIVATE KEY", pkcs8.to_vec()));
        assert_eq!(load_private_key_pem(&text).unwrap().key_type(), KeyType::Ed25519);
        assert!(
            load_private_key_pem("-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n").is_err()
        );
    }
}
