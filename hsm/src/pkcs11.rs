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
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
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

/// Reads a PIN from the first line of `path` (mode 0600 or stricter).
pub fn pin_from_file(path: &Path) -> Result<String, HsmError> {
    crate::read_secret_file(path).map(|p| p.to_string())
}

/// The token: the module, how to find it, and the one logged-in session every key of the store shares. A failed
/// operation drops the session and is tried once more on a fresh one, re-initialising the module if the token
/// cannot be found otherwise, so a token that was removed and put back (or an HSM that restarted) is used again
/// without restarting the CA.
struct Token {
    module: PathBuf,
    label: String,
    pin: String,
    state: Mutex<State>,
}

struct State {
    /// The loaded, initialised module (`C_Finalize` runs when the last clone of it is dropped).
    ctx: Option<Pkcs11>,
    session: Option<Session>,
    /// How many sessions were opened so far: object handles found in an older one are void.
    generation: u64,
}

fn load_module(module: &Path) -> Result<Pkcs11, HsmError> {
    let ctx = Pkcs11::new(module).map_err(|e| err(&format!("module {}", module.display()), e))?;
    match ctx.initialize(CInitializeArgs::OsThreads) {
        // Another store in this process already initialised the same module: that is fine.
        Ok(())
        | Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(err("C_Initialize", e)),
    }
    Ok(ctx)
}

impl Token {
    fn connect(&self, ctx: &Pkcs11) -> Result<Session, HsmError> {
        let mut labels = Vec::new();
        let mut found = None;
        for slot in ctx.get_slots_with_token().map_err(|e| err("C_GetSlotList", e))? {
            let info = ctx.get_token_info(slot).map_err(|e| err("C_GetTokenInfo", e))?;
            let label = info.label().trim().to_owned();
            if label == self.label {
                found = Some(slot);
                break;
            }
            labels.push(label);
        }
        let slot = found.ok_or_else(|| {
            HsmError::Pkcs11(format!(
                "no token labelled {:?} (tokens present: {})",
                self.label,
                if labels.is_empty() {
                    "none".to_owned()
                } else {
                    labels.join(", ")
                }
            ))
        })?;
        let session = ctx.open_rw_session(slot).map_err(|e| err("C_OpenSession", e))?;
        session
            .login(UserType::User, Some(&AuthPin::from(self.pin.clone())))
            .map_err(|e| err(&format!("login to token {:?}", self.label), e))?;
        Ok(session)
    }

    /// A fresh session: on the loaded module first, then, if the token cannot be found that way (a module keeps
    /// its view of removed tokens until it is re-initialised), on a freshly loaded and initialised module.
    fn reconnect(&self, state: &mut State) -> Result<(), HsmError> {
        state.session = None;
        if let Some(ctx) = &state.ctx {
            if let Ok(s) = self.connect(ctx) {
                state.session = Some(s);
                state.generation += 1;
                return Ok(());
            }
        }
        // No session refers to the old module any more: dropping it runs C_Finalize.
        state.ctx = None;
        let ctx = load_module(&self.module)?;
        let session = self.connect(&ctx)?;
        state.ctx = Some(ctx);
        state.session = Some(session);
        state.generation += 1;
        Ok(())
    }

    /// Runs `op` with the session and its generation; on failure reconnects and runs it once more.
    fn run<T>(
        &self,
        mut op: impl FnMut(&Pkcs11, &Session, u64) -> Result<T, HsmError>,
    ) -> Result<T, HsmError> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut first_error = None;
        for _ in 0..2 {
            if state.session.is_none() {
                if let Err(e) = self.reconnect(&mut state) {
                    return Err(HsmError::Pkcs11(match first_error {
                        Some(first) => format!(
                            "token {:?} unavailable: {}; reconnecting: {}",
                            self.label,
                            strip(&first),
                            strip(&e)
                        ),
                        None => format!("token {:?} unavailable: {}", self.label, strip(&e)),
                    }));
                }
            }
            let result = match (&state.ctx, &state.session) {
                (Some(ctx), Some(session)) => op(ctx, session, state.generation),
                _ => continue,
            };
            match result {
                Ok(v) => return Ok(v),
                Err(e) if first_error.is_none() => {
                    // The token may have gone and come back: every handle of the old session is void.
                    state.session = None;
                    first_error = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(first_error.unwrap_or_else(|| HsmError::Pkcs11("no session".into())))
    }

    fn find(&self, session: &Session, class: ObjectClass, label: &str) -> Result<ObjectHandle, HsmError> {
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
                self.label
            ))
        })
    }
}

/// The message of a PKCS#11 error without its `PKCS#11: ` prefix, for joining two of them.
fn strip(e: &HsmError) -> String {
    match e {
        HsmError::Pkcs11(m) => m.clone(),
        other => other.to_string(),
    }
}

/// Keys in one PKCS#11 token.
pub struct Pkcs11KeyStore {
    token: Arc<Token>,
}

impl fmt::Debug for Pkcs11KeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11KeyStore")
            .field("token_label", &self.token.label)
            .finish()
    }
}

impl Pkcs11KeyStore {
    /// Loads the module, finds the token by label and logs in (so a wrong label or PIN fails at startup).
    pub fn open(cfg: &Pkcs11Config) -> Result<Self, HsmError> {
        let token = Token {
            module: cfg.module.clone(),
            label: cfg.token_label.clone(),
            pin: cfg.pin.clone(),
            state: Mutex::new(State {
                ctx: None,
                session: None,
                generation: 0,
            }),
        };
        let ctx = load_module(&token.module)?;
        let session = token.connect(&ctx)?;
        *token.state.lock().unwrap_or_else(|p| p.into_inner()) = State {
            ctx: Some(ctx),
            session: Some(session),
            generation: 1,
        };
        Ok(Self {
            token: Arc::new(token),
        })
    }

    /// Whether the token offers `alg` (RSA-PSS is optional in PKCS#11; ECDSA and PKCS#1 v1.5 are not checked).
    pub fn supports(&self, alg: SignatureAlgorithm) -> Result<bool, HsmError> {
        let wanted = match alg {
            SignatureAlgorithm::RsaPssSha256 => MechanismType::SHA256_RSA_PKCS_PSS,
            _ => return Ok(true),
        };
        self.token.run(|ctx, session, _| {
            let slot = session
                .get_session_info()
                .map_err(|e| err("C_GetSessionInfo", e))?
                .slot_id();
            let list = ctx
                .get_mechanism_list(slot)
                .map_err(|e| err("C_GetMechanismList", e))?;
            Ok(list.contains(&wanted))
        })
    }

    /// Generates a non-extractable key pair inside the token.
    pub fn generate(&self, key_type: KeyType) -> Result<(Arc<dyn Signer>, KeyRef), HsmError> {
        let mut id = [0u8; 16];
        aws_lc_rs::rand::fill(&mut id).map_err(|_| HsmError::Crypto("random key id"))?;
        let label = format!(
            "trustline-{}",
            id.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        let common = [
            Attribute::Token(true),
            Attribute::Label(label.clone().into_bytes()),
            Attribute::Id(id.to_vec()),
        ];
        let (mechanism, mut public) = match key_type {
            KeyType::EcP256 => (
                Mechanism::EccKeyPairGen,
                vec![Attribute::EcParams(P256_OID.to_vec())],
            ),
            KeyType::EcP384 => (
                Mechanism::EccKeyPairGen,
                vec![Attribute::EcParams(P384_OID.to_vec())],
            ),
            KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096 => (
                Mechanism::RsaPkcsKeyPairGen,
                vec![
                    Attribute::ModulusBits(rsa_bits(key_type).into()),
                    Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
                ],
            ),
            other => {
                return Err(HsmError::Pkcs11(format!(
                    "key type {other} is not supported in PKCS#11 tokens here (use ec-p256, ec-p384 or rsa-*)"
                )))
            }
        };
        public.push(Attribute::Verify(true));
        public.extend_from_slice(&common);
        let mut private = vec![
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
        ];
        private.extend_from_slice(&common);
        self.token.run(|_, session, _| {
            session
                .generate_key_pair(&mechanism, &public, &private)
                .map_err(|e| err("C_GenerateKeyPair", e))
        })?;
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

    /// Finds an existing key pair (EC P-256/P-384 or RSA) by label.
    pub fn load_label(&self, label: &str) -> Result<Arc<dyn Signer>, HsmError> {
        let (key_type, public, spki, handle) = self.token.run(|_, session, generation| {
            let private = self.token.find(session, ObjectClass::PRIVATE_KEY, label)?;
            let public = self.token.find(session, ObjectClass::PUBLIC_KEY, label)?;
            let (key_type, point, spki) = public_key(session, public, label)?;
            Ok((key_type, point, spki, (generation, private)))
        })?;
        Ok(Arc::new(Pkcs11Signer {
            token: self.token.clone(),
            handle: Mutex::new(handle),
            key_type,
            public,
            spki,
            label: label.to_owned(),
        }))
    }
}

fn rsa_bits(key_type: KeyType) -> u64 {
    match key_type {
        KeyType::Rsa3072 => 3072,
        KeyType::Rsa4096 => 4096,
        _ => 2048,
    }
}

/// Reads a public key object: its type, raw public key (EC point or PKCS#1 `RSAPublicKey`) and SPKI DER.
fn public_key(
    session: &Session,
    public: ObjectHandle,
    label: &str,
) -> Result<(KeyType, Vec<u8>, Vec<u8>), HsmError> {
    let attrs = session
        .get_attributes(public, &[AttributeType::KeyType])
        .map_err(|e| err("C_GetAttributeValue", e))?;
    let ck_type = attrs.into_iter().find_map(|a| match a {
        Attribute::KeyType(t) => Some(t),
        _ => None,
    });
    if ck_type == Some(CkKeyType::RSA) {
        let attrs = session
            .get_attributes(public, &[AttributeType::Modulus, AttributeType::PublicExponent])
            .map_err(|e| err("C_GetAttributeValue", e))?;
        let (mut n, mut e) = (Vec::new(), Vec::new());
        for a in attrs {
            match a {
                Attribute::Modulus(v) => n = v,
                Attribute::PublicExponent(v) => e = v,
                _ => {}
            }
        }
        let key_type = match n.iter().skip_while(|b| **b == 0).count() * 8 {
            2048 => KeyType::Rsa2048,
            3072 => KeyType::Rsa3072,
            4096 => KeyType::Rsa4096,
            bits => {
                return Err(HsmError::Pkcs11(format!(
                    "key {label:?} is RSA-{bits}; Trustline uses RSA-2048, 3072 or 4096"
                )))
            }
        };
        let rsa_public = der::sequence(&[der::integer(&n), der::integer(&e)].concat());
        // AlgorithmIdentifier { rsaEncryption, NULL }
        let alg = [
            0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
        ];
        let spki = der::sequence(&[&alg[..], &der::bit_string(&rsa_public)].concat());
        return Ok((key_type, rsa_public, spki));
    }
    if ck_type != Some(CkKeyType::EC) {
        return Err(HsmError::Pkcs11(format!("key {label:?} is neither EC nor RSA")));
    }
    let attrs = session
        .get_attributes(public, &[AttributeType::EcParams, AttributeType::EcPoint])
        .map_err(|e| err("C_GetAttributeValue", e))?;
    let (mut params, mut point) = (Vec::new(), Vec::new());
    for a in attrs {
        match a {
            Attribute::EcParams(p) => params = p,
            Attribute::EcPoint(p) => point = p,
            _ => {}
        }
    }
    let (key_type, prefix) = if params == P256_OID {
        (KeyType::EcP256, P256_SPKI)
    } else if params == P384_OID {
        (KeyType::EcP384, P384_SPKI)
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
    let mut spki = prefix.to_vec();
    spki.extend_from_slice(&point);
    Ok((key_type, point, spki))
}

/// Just enough DER for an RSA public key.
mod der {
    fn tlv(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let len = body.len();
        if len < 0x80 {
            out.push(len as u8);
        } else if len < 0x100 {
            out.extend([0x81, len as u8]);
        } else {
            out.extend([0x82, (len >> 8) as u8, len as u8]);
        }
        out.extend_from_slice(body);
        out
    }

    pub(super) fn sequence(body: &[u8]) -> Vec<u8> {
        tlv(0x30, body)
    }

    /// A non-negative INTEGER from big-endian magnitude bytes.
    pub(super) fn integer(magnitude: &[u8]) -> Vec<u8> {
        let mut v: Vec<u8> = magnitude.iter().copied().skip_while(|b| *b == 0).collect();
        if v.first().is_none_or(|b| b & 0x80 != 0) {
            v.insert(0, 0);
        }
        tlv(0x02, &v)
    }

    pub(super) fn bit_string(bytes: &[u8]) -> Vec<u8> {
        tlv(0x03, &[&[0u8][..], bytes].concat())
    }
}

/// A key that lives in the token.
struct Pkcs11Signer {
    token: Arc<Token>,
    /// The private key's handle, and the session generation it was found in.
    handle: Mutex<(u64, ObjectHandle)>,
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
    let (r, s) = rs.split_at(rs.len() / 2);
    der::sequence(&[der::integer(r), der::integer(s)].concat())
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
        // ECDSA: hash here, raw CKM_ECDSA in the token (all SoftHSM 2.6 offers). RSA: the token hashes.
        let (mechanism, input, ecdsa) = match alg {
            SignatureAlgorithm::EcdsaP256Sha256 => (
                Mechanism::Ecdsa,
                aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, msg)
                    .as_ref()
                    .to_vec(),
                true,
            ),
            SignatureAlgorithm::EcdsaP384Sha384 => (
                Mechanism::Ecdsa,
                aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA384, msg)
                    .as_ref()
                    .to_vec(),
                true,
            ),
            SignatureAlgorithm::RsaPkcs1Sha256 => (Mechanism::Sha256RsaPkcs, msg.to_vec(), false),
            SignatureAlgorithm::RsaPkcs1Sha384 => (Mechanism::Sha384RsaPkcs, msg.to_vec(), false),
            SignatureAlgorithm::RsaPssSha256 => (
                Mechanism::Sha256RsaPkcsPss(PkcsPssParams {
                    hash_alg: MechanismType::SHA256,
                    mgf: PkcsMgfType::MGF1_SHA256,
                    s_len: 32.into(),
                }),
                msg.to_vec(),
                false,
            ),
            SignatureAlgorithm::Ed25519 | SignatureAlgorithm::Sm2Sm3 | SignatureAlgorithm::Sm2Sm3Tls13 => {
                return Err(HsmError::AlgorithmMismatch {
                    key_type: self.key_type,
                    alg,
                })
            }
        };
        let out = self.token.run(|_, session, generation| {
            let mut cached = self.handle.lock().unwrap_or_else(|p| p.into_inner());
            if cached.0 != generation {
                *cached = (
                    generation,
                    self.token.find(session, ObjectClass::PRIVATE_KEY, &self.label)?,
                );
            }
            session
                .sign(&mechanism, cached.1, &input)
                .map_err(|e| err(&format!("C_Sign with key {:?}", self.label), e))
        })?;
        Ok(if ecdsa { fixed_to_der(&out) } else { out })
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
        // RSA keys made in the token sign PKCS#1 v1.5 and, where the token has CKM_SHA256_RSA_PKCS_PSS, PSS.
        assert!(store.supports(SignatureAlgorithm::RsaPssSha256).unwrap());
        let (rsa, rsa_ref) = store.generate(KeyType::Rsa2048).unwrap();
        assert_eq!(rsa.key_type(), KeyType::Rsa2048);
        for alg in [
            SignatureAlgorithm::RsaPkcs1Sha256,
            SignatureAlgorithm::RsaPkcs1Sha384,
            SignatureAlgorithm::RsaPssSha256,
        ] {
            let sig = rsa.sign(alg, b"hello").unwrap();
            crate::verify(KeyType::Rsa2048, alg, rsa.public_key(), b"hello", &sig).unwrap();
        }
        let again = store.load(&rsa_ref).unwrap();
        assert_eq!(again.public_key_spki_der(), rsa.public_key_spki_der());
        // The SPKI is well-formed DER that an independent parser reads as RSA.
        let spki = rsa.public_key_spki_der();
        assert_eq!(spki[0], 0x30);
        assert!(rsa.sign(SignatureAlgorithm::EcdsaP256Sha256, b"x").is_err());

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

    /// The token is removed (SoftHSM2's token folder taken away) and put back: while it is away signing and key
    /// generation fail with errors naming the token, and afterwards the same store and signer work again.
    #[test]
    fn a_removed_token_fails_clearly_and_is_used_again_when_it_returns() {
        let Ok(module) = std::env::var("TRUSTLINE_TEST_SOFTHSM") else {
            println!("skipped: TRUSTLINE_TEST_SOFTHSM is not set (scripts/test.sh sets it)");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let conf = softhsm_token(dir.path(), "trustline-removal", "1234").unwrap();
        let _guard = EnvGuard::set("SOFTHSM2_CONF", &conf);
        let store = Pkcs11KeyStore::open(&Pkcs11Config {
            module: module.into(),
            token_label: "trustline-removal".into(),
            pin: "1234".into(),
        })
        .unwrap();
        let alg = SignatureAlgorithm::EcdsaP256Sha256;
        let (signer, key_ref) = store.generate(KeyType::EcP256).unwrap();
        signer.sign(alg, b"before").unwrap();

        let tokens = dir.path().join("tokens");
        let away = dir.path().join("away");
        std::fs::rename(&tokens, &away).unwrap();
        let e = signer.sign(alg, b"away").unwrap_err().to_string();
        assert!(
            e.contains("token \"trustline-removal\" unavailable: C_Sign") && e.contains("reconnecting"),
            "{e}"
        );
        let e = store.generate(KeyType::EcP256).unwrap_err().to_string();
        assert!(e.contains("trustline-removal"), "{e}");

        std::fs::rename(&away, &tokens).unwrap();
        let sig = signer.sign(alg, b"back").unwrap();
        crate::verify(KeyType::EcP256, alg, signer.public_key(), b"back", &sig).unwrap();
        store.load(&key_ref).unwrap().sign(alg, b"again").unwrap();
        store.generate(KeyType::EcP256).unwrap();
    }

    /// Sets an environment variable for the test's duration. The tests that use it serialise on a lock, so no
    /// other test thread changes the variable meanwhile.
    struct EnvGuard(
        &'static str,
        #[allow(dead_code)] std::sync::MutexGuard<'static, ()>,
    );
    static ENV_LOCK: Mutex<()> = Mutex::new(());
    impl EnvGuard {
        fn set(k: &'static str, v: &Path) -> Self {
            let lock = ENV_LOCK.lock().unwrap_or_else(|p| p.into_inner());
            // The workspace forbids unsafe code; std::env::set_var is safe on edition 2021.
            std::env::set_var(k, v);
            Self(k, lock)
        }
    }
    impl Drop for EnvGuard {
        fn drop(&mut self) {
            std::env::remove_var(self.0);
        }
    }
}
