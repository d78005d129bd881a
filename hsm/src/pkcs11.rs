//! PKCS#11 keys (HSMs, smart cards, SoftHSM2) through `cryptoki`.
//!
//! Keys are generated inside the token as non-extractable, sensitive EC keys (P-256, P-384) with a label and
//! an id; the [`KeyRef`] stored by callers is `pkcs11:v1:<label>`, which names the key but holds no secret.
//! Signing hashes in software and sends the digest to the token with `CKM_ECDSA` (SoftHSM 2.6 offers raw ECDSA
//! only), then converts the token's `r || s` into the DER form the rest of Trustline uses. The PIN comes from a
//! file or an environment variable, never from the command line, and is never logged.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use cryptoki::context::{CInitializeArgs, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType as CkKeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;

use crate::{HsmError, KeyRef, KeyType, SignatureAlgorithm, Signer};

/// DER OIDs of the curves (EC parameters).
const P256_OID: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const P384_OID: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
/// SubjectPublicKeyInfo prefixes (algorithm identifier + BIT STRING header) for an uncompressed point.
pub(crate) const P256_SPKI: &[u8] = &[
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86,
    0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
pub(crate) const P384_SPKI: &[u8] = &[
    0x30, 0x76, 0x30, 0x10, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x05, 0x2b, 0x81,
    0x04, 0x00, 0x22, 0x03, 0x62, 0x00,
];

fn err(what: &str, e: impl fmt::Display) -> HsmError {
    HsmError::Pkcs11(format!("{what}: {e}"))
}

/// Where the token is and how to log in.
#[derive(Clone)]
pub struct Pkcs11Config {
    /// The PKCS#11 module (e.g. `/usr/lib/softhsm/libsofthsm2.so`).
    pub module: PathBuf,
    /// The token's label.
    pub token_label: String,
    /// The user PIN.
    pub pin: String,
}

impl fmt::Debug for Pkcs11Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Config")
            .field("module", &self.module)
            .field("token_label", &self.token_label)
            .field("pin", &"<redacted>")
            .finish()
    }
}

/// Reads a PIN from the first line of `path`.
pub fn pin_from_file(path: &Path) -> Result<String, HsmError> {
    let text = std::fs::read_to_string(path).map_err(|source| HsmError::Io {
        path: path.to_owned(),
        source,
    })?;
    let pin = text.lines().next().unwrap_or_default().trim().to_owned();
    if pin.is_empty() {
        return Err(HsmError::BadKeyFile {
            path: path.to_owned(),
            reason: "the PIN file is empty".into(),
        });
    }
    Ok(pin)
}

/// A logged-in session on one token. The session is shared by every key of the store.
pub struct Pkcs11KeyStore {
    session: Arc<Mutex<Session>>,
    token_label: String,
    // Keeps the module loaded and initialised for as long as the store lives.
    _ctx: Pkcs11,
}

impl fmt::Debug for Pkcs11KeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11KeyStore")
            .field("token_label", &self.token_label)
            .finish()
    }
}

impl Pkcs11KeyStore {
    /// Loads the module, finds the token by label and logs in.
    pub fn open(cfg: &Pkcs11Config) -> Result<Self, HsmError> {
        let ctx =
            Pkcs11::new(&cfg.module).map_err(|e| err(&format!("module {}", cfg.module.display()), e))?;
        match ctx.initialize(CInitializeArgs::OsThreads) {
            // Another store in this process already initialised the same module: that is fine.
            Ok(())
            | Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::CryptokiAlreadyInitialized, _)) => {
            }
            Err(e) => return Err(err("C_Initialize", e)),
        }
        let mut found = None;
        let mut labels = Vec::new();
        for slot in ctx.get_slots_with_token().map_err(|e| err("C_GetSlotList", e))? {
            let info = ctx.get_token_info(slot).map_err(|e| err("C_GetTokenInfo", e))?;
            let label = info.label().trim().to_owned();
            if label == cfg.token_label {
                found = Some(slot);
                break;
            }
            labels.push(label);
        }
        let slot = found.ok_or_else(|| {
            HsmError::Pkcs11(format!(
                "no token labelled {:?} (tokens present: {})",
                cfg.token_label,
                if labels.is_empty() {
                    "none".to_owned()
                } else {
                    labels.join(", ")
                }
            ))
        })?;
        let session = ctx.open_rw_session(slot).map_err(|e| err("C_OpenSession", e))?;
        session
            .login(UserType::User, Some(&AuthPin::from(cfg.pin.clone())))
            .map_err(|e| err(&format!("login to token {:?}", cfg.token_label), e))?;
        Ok(Self {
            session: Arc::new(Mutex::new(session)),
            token_label: cfg.token_label.clone(),
            _ctx: ctx,
        })
    }

    /// Generates a non-extractable key pair inside the token.
    pub fn generate(&self, key_type: KeyType) -> Result<(Arc<dyn Signer>, KeyRef), HsmError> {
        let params = match key_type {
            KeyType::EcP256 => P256_OID,
            KeyType::EcP384 => P384_OID,
            other => {
                return Err(HsmError::Pkcs11(format!(
                    "key type {other} is not supported in PKCS#11 tokens here (use ec-p256 or ec-p384)"
                )))
            }
        };
        let mut id = [0u8; 16];
        aws_lc_rs::rand::fill(&mut id).map_err(|_| HsmError::Crypto("random key id"))?;
        let label = format!(
            "trustline-{}",
            id.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        let public = [
            Attribute::Token(true),
            Attribute::Verify(true),
            Attribute::EcParams(params.to_vec()),
            Attribute::Label(label.clone().into_bytes()),
            Attribute::Id(id.to_vec()),
        ];
        let private = [
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            Attribute::Label(label.clone().into_bytes()),
            Attribute::Id(id.to_vec()),
        ];
        let session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        session
            .generate_key_pair(&Mechanism::EccKeyPairGen, &public, &private)
            .map_err(|e| err("C_GenerateKeyPair", e))?;
        drop(session);
        let key_ref = KeyRef::new(format!("pkcs11:v1:{label}"));
        Ok((self.load(&key_ref)?, key_ref))
    }

    /// Finds a key by its reference (`pkcs11:v1:<label>`), or by a bare label for keys made outside Trustline.
    pub fn load(&self, key_ref: &KeyRef) -> Result<Arc<dyn Signer>, HsmError> {
        let label = key_ref
            .as_str()
            .strip_prefix("pkcs11:v1:")
            .unwrap_or(key_ref.as_str());
        self.load_label(label)
    }

    /// Finds an existing key pair by label.
    pub fn load_label(&self, label: &str) -> Result<Arc<dyn Signer>, HsmError> {
        let session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let find = |class: ObjectClass| -> Result<ObjectHandle, HsmError> {
            let found = session
                .find_objects(&[
                    Attribute::Class(class),
                    Attribute::Label(label.as_bytes().to_vec()),
                ])
                .map_err(|e| err("C_FindObjects", e))?;
            found.first().copied().ok_or_else(|| {
                HsmError::Pkcs11(format!(
                    "no {} labelled {label:?} in token {:?}",
                    if class == ObjectClass::PRIVATE_KEY {
                        "private key"
                    } else {
                        "public key"
                    },
                    self.token_label
                ))
            })
        };
        let private = find(ObjectClass::PRIVATE_KEY)?;
        let public = find(ObjectClass::PUBLIC_KEY)?;
        let attrs = session
            .get_attributes(
                public,
                &[
                    AttributeType::KeyType,
                    AttributeType::EcParams,
                    AttributeType::EcPoint,
                ],
            )
            .map_err(|e| err("C_GetAttributeValue", e))?;
        let (mut params, mut point) = (Vec::new(), Vec::new());
        let mut ck_type = None;
        for a in attrs {
            match a {
                Attribute::KeyType(t) => ck_type = Some(t),
                Attribute::EcParams(p) => params = p,
                Attribute::EcPoint(p) => point = p,
                _ => {}
            }
        }
        if ck_type != Some(CkKeyType::EC) {
            return Err(HsmError::Pkcs11(format!("key {label:?} is not an EC key")));
        }
        let key_type = if params == P256_OID {
            KeyType::EcP256
        } else if params == P384_OID {
            KeyType::EcP384
        } else {
            return Err(HsmError::Pkcs11(format!(
                "key {label:?} is on a curve other than P-256 or P-384"
            )));
        };
        // CKA_EC_POINT is a DER OCTET STRING around the uncompressed point.
        let point = match point.as_slice() {
            [0x04, len, rest @ ..] if usize::from(*len) == rest.len() => rest.to_vec(),
            [0x04, 0x81, len, rest @ ..] if usize::from(*len) == rest.len() => rest.to_vec(),
            raw if raw.first() == Some(&0x04) => raw.to_vec(),
            _ => return Err(HsmError::Pkcs11(format!("key {label:?}: unreadable EC point"))),
        };
        let prefix = if key_type == KeyType::EcP256 {
            P256_SPKI
        } else {
            P384_SPKI
        };
        let mut spki = prefix.to_vec();
        spki.extend_from_slice(&point);
        drop(session);
        Ok(Arc::new(Pkcs11Signer {
            session: self.session.clone(),
            handle: private,
            key_type,
            public: point,
            spki,
            label: label.to_owned(),
        }))
    }
}

/// A key that lives in the token.
struct Pkcs11Signer {
    session: Arc<Mutex<Session>>,
    handle: ObjectHandle,
    key_type: KeyType,
    public: Vec<u8>,
    spki: Vec<u8>,
    label: String,
}

impl fmt::Debug for Pkcs11Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Signer")
            .field("label", &self.label)
            .field("key_type", &self.key_type)
            .finish()
    }
}

/// `r || s` to DER `SEQUENCE { INTEGER r, INTEGER s }`.
pub(crate) fn fixed_to_der(rs: &[u8]) -> Vec<u8> {
    let int = |x: &[u8]| {
        let mut v: Vec<u8> = x.iter().copied().skip_while(|b| *b == 0).collect();
        if v.is_empty() || v[0] & 0x80 != 0 {
            v.insert(0, 0);
        }
        let mut out = vec![0x02, v.len() as u8];
        out.extend(v);
        out
    };
    let (r, s) = rs.split_at(rs.len() / 2);
    let body: Vec<u8> = [int(r), int(s)].concat();
    let mut out = vec![0x30];
    if body.len() < 0x80 {
        out.push(body.len() as u8);
    } else {
        out.extend([0x81, body.len() as u8]);
    }
    out.extend(body);
    out
}

impl Signer for Pkcs11Signer {
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
        let digest = match alg {
            SignatureAlgorithm::EcdsaP384Sha384 => aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA384, msg),
            _ => aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, msg),
        };
        let rs = self
            .session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .sign(&Mechanism::Ecdsa, self.handle, digest.as_ref())
            .map_err(|e| err(&format!("C_Sign with key {:?}", self.label), e))?;
        Ok(fixed_to_der(&rs))
    }
}

/// Test support: a throwaway SoftHSM2 token (used by this crate's tests, the CA's end-to-end test and the
/// signature benchmark).
#[doc(hidden)]
pub fn softhsm_token(dir: &Path, label: &str, pin: &str) -> Result<PathBuf, HsmError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| HsmError::Io { path, source }
    };
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens).map_err(io(&tokens))?;
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .map_err(io(&conf))?;
    let out = std::process::Command::new("softhsm2-util")
        .args([
            "--init-token",
            "--free",
            "--label",
            label,
            "--so-pin",
            "5678",
            "--pin",
            pin,
        ])
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .map_err(io(Path::new("softhsm2-util")))?;
    if !out.status.success() {
        return Err(HsmError::Pkcs11(format!(
            "softhsm2-util --init-token: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(conf)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn fixed_and_der_round_trip() {
        let mut rs = vec![0u8; 64];
        rs[0] = 0x80; // high bit: needs a leading zero
        rs[63] = 7;
        let der = fixed_to_der(&rs);
        assert_eq!(crate::ecdsa_der_to_fixed(&der, 32).unwrap(), rs);
    }

    /// Against a real SoftHSM2 token, initialised here (`TRUSTLINE_TEST_SOFTHSM` names the module; scripts/test.sh
    /// installs softhsm2 and sets it).
    #[test]
    fn softhsm_generates_signs_and_finds_keys_again() {
        let Ok(module) = std::env::var("TRUSTLINE_TEST_SOFTHSM") else {
            println!("skipped: TRUSTLINE_TEST_SOFTHSM is not set (scripts/test.sh sets it)");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let conf = softhsm_token(dir.path(), "trustline-unit", "1234").unwrap();
        let cfg = Pkcs11Config {
            module: module.into(),
            token_label: "trustline-unit".into(),
            pin: "1234".into(),
        };
        let _guard = EnvGuard::set("SOFTHSM2_CONF", &conf);
        let store = Pkcs11KeyStore::open(&cfg).unwrap();
        for (kt, alg) in [
            (KeyType::EcP256, SignatureAlgorithm::EcdsaP256Sha256),
            (KeyType::EcP384, SignatureAlgorithm::EcdsaP384Sha384),
        ] {
            let (signer, key_ref) = store.generate(kt).unwrap();
            assert!(key_ref.as_str().starts_with("pkcs11:v1:trustline-"));
            let sig = signer.sign(alg, b"hello").unwrap();
            crate::verify(kt, alg, signer.public_key(), b"hello", &sig).unwrap();
            let again = store.load(&key_ref).unwrap();
            assert_eq!(again.public_key_spki_der(), signer.public_key_spki_der());
            assert!(format!("{signer:?}").contains("trustline-"));
        }
        let e = store
            .load(&KeyRef::new("pkcs11:v1:missing".into()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no private key labelled \"missing\""), "{e}");
        let bad = Pkcs11Config {
            token_label: "nope".into(),
            ..cfg.clone()
        };
        let e = Pkcs11KeyStore::open(&bad).unwrap_err().to_string();
        assert!(
            e.contains("no token labelled \"nope\"") && e.contains("trustline-unit"),
            "{e}"
        );
        let wrong_pin = Pkcs11Config {
            pin: "9999".into(),
            ..cfg
        };
        let e = Pkcs11KeyStore::open(&wrong_pin).unwrap_err().to_string();
        assert!(e.contains("login") && !e.contains("9999"), "{e}");
    }

    /// Sets an environment variable for the test's duration. Tests in this crate that use it run in one test
    /// function, so no other thread reads the variable concurrently.
    struct EnvGuard(&'static str);
    impl EnvGuard {
        fn set(k: &'static str, v: &Path) -> Self {
            // The workspace forbids unsafe code; std::env::set_var is safe on edition 2021.
            std::env::set_var(k, v);
            Self(k)
        }
    }
    impl Drop for EnvGuard {
        fn drop(&mut self) {
            std::env::remove_var(self.0);
        }
    }
}
