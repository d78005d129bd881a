//! Keys inside a TPM 2.0 (a hardware TPM through `/dev/tpmrm0`, or swtpm) through the TSS2 ESAPI (`tss-esapi`).
//!
//! Keys are ECDSA P-256 or P-384 signing keys created by the TPM under the owner hierarchy's storage root key
//! (SRK). The SRK is re-derived on every connection from the standard ECC P-256 SRK template, so nothing needs to
//! be provisioned in the TPM beforehand and nothing is left in its persistent storage. A key's [`KeyRef`] is
//! `tpm:v1:<public area>:<private area>` (base64): the private area is encrypted by the TPM under the SRK (a
//! wrapped blob), so it is useless outside the TPM that created it, and the key has `fixedTPM` and
//! `fixedParent` set, so the TPM itself refuses to export or duplicate it.
//!
//! The ESAPI context is not thread-safe, so one worker thread owns it and every signer sends it requests. When
//! the TPM goes away (device reset, swtpm killed), the failing request returns an error naming the TPM, the worker
//! drops its context, and the next request connects again and reloads the key from its blob: service resumes
//! without a restart once the TPM is back. A TPM holds few transient objects (three on swtpm), so the worker keeps
//! at most two keys loaded besides the SRK and flushes the least recently used.

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use tss_esapi::constants::tss::{TPM2_RH_NULL, TPM2_ST_HASHCHECK};
use tss_esapi::handles::KeyHandle;
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{
    Digest, EccPoint, EccScheme, HashScheme, Private, Public, PublicBuilder, PublicEccParametersBuilder,
    Signature, SignatureScheme, SymmetricDefinitionObject,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::tss2_esys::TPMT_TK_HASHCHECK;
use tss_esapi::Context;

use crate::pkcs11::{fixed_to_der, P256_SPKI, P384_SPKI};
use crate::{HsmError, KeyRef, KeyType, SignatureAlgorithm, Signer, TpmConfig};

/// At most this many keys stay loaded besides the SRK.
const MAX_LOADED: usize = 2;

fn tpm_err(tcti: &str, what: &str, e: impl fmt::Display) -> HsmError {
    HsmError::Tpm(format!("{what} on TPM {tcti}: {e}"))
}

/// A TPM and the keys created in it.
pub struct TpmKeyStore {
    worker: Arc<Worker>,
}

impl fmt::Debug for TpmKeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TpmKeyStore")
            .field("tcti", &self.worker.tcti)
            .finish()
    }
}

/// A key's two TPM areas.
#[derive(Clone)]
struct Blob {
    public: Public,
    private: Private,
    /// The marshalled public area: identifies the key in the worker's cache.
    public_bytes: Vec<u8>,
}

/// A pair of byte strings (public and private areas, or `r` and `s`) or the error that replaced them.
type PairReply = mpsc::Sender<Result<(Vec<u8>, Vec<u8>), HsmError>>;

enum Job {
    Create {
        key_type: KeyType,
        reply: PairReply,
    },
    Sign {
        blob: Arc<Blob>,
        hash: HashingAlgorithm,
        digest: Vec<u8>,
        reply: PairReply,
    },
}

struct Worker {
    tcti: String,
    /// `None` once dropped: closing the channel ends the thread.
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Worker {
    /// Closes the channel and waits for the thread to flush its loaded keys and close the TPM connection, so a
    /// TPM taken down right after the last key is dropped sees an orderly goodbye.
    fn drop(&mut self) {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Worker {
    fn call<T>(&self, make: impl FnOnce(mpsc::Sender<Result<T, HsmError>>) -> Job) -> Result<T, HsmError> {
        let (tx, rx) = mpsc::channel();
        let gone = || HsmError::Tpm(format!("the worker for TPM {} has stopped", self.tcti));
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .ok_or_else(gone)?
            .send(make(tx))
            .map_err(|_| gone())?;
        rx.recv().map_err(|_| gone())?
    }
}

/// The connection the worker thread owns.
struct Conn {
    ctx: Context,
    srk: KeyHandle,
    /// Loaded keys, most recently used last.
    loaded: VecDeque<(Vec<u8>, KeyHandle)>,
}

impl TpmKeyStore {
    /// Checks the TCTI, connects to the TPM once (so a wrong address fails at startup) and starts the worker.
    pub fn open(cfg: &TpmConfig) -> Result<Self, HsmError> {
        let tcti = cfg.tcti.clone();
        let name = TctiNameConf::from_str(&tcti).map_err(|e| {
            HsmError::Tpm(format!(
                "tcti {tcti:?} is not understood ({e}); use device:/dev/tpmrm0 or swtpm:host=H,port=P"
            ))
        })?;
        // Fail early, and in the caller's thread, when the TPM cannot be reached.
        let first = connect(&tcti, name.clone())?;
        let (tx, rx) = mpsc::channel::<Job>();
        let thread_tcti = tcti.clone();
        let thread = std::thread::Builder::new()
            .name("tpm".into())
            .spawn(move || run_worker(thread_tcti, name, Some(first), rx))
            .map_err(|e| HsmError::Tpm(format!("starting the TPM worker thread: {e}")))?;
        Ok(Self {
            worker: Arc::new(Worker {
                tcti,
                jobs: Mutex::new(Some(tx)),
                thread: Some(thread),
            }),
        })
    }

    /// Creates a non-exportable signing key in the TPM.
    pub fn generate(&self, key_type: KeyType) -> Result<(Arc<dyn Signer>, KeyRef), HsmError> {
        if !matches!(key_type, KeyType::EcP256 | KeyType::EcP384) {
            return Err(HsmError::Tpm(format!(
                "key type {key_type} is not supported in a TPM here (use ec-p256 or ec-p384)"
            )));
        }
        let (public, private) = self.worker.call(|reply| Job::Create { key_type, reply })?;
        let key_ref = KeyRef::new(format!("tpm:v1:{}:{}", B64.encode(&public), B64.encode(&private)));
        Ok((self.load(&key_ref)?, key_ref))
    }

    /// Loads a key from its reference (`tpm:v1:…`). The key is loaded into the TPM on first use.
    pub fn load(&self, key_ref: &KeyRef) -> Result<Arc<dyn Signer>, HsmError> {
        let bad = |why: &str| HsmError::BadKeyRef(format!("tpm ({why})"));
        let rest = key_ref
            .as_str()
            .strip_prefix("tpm:v1:")
            .ok_or_else(|| bad("expected tpm:v1:<public>:<private>"))?;
        let (p, s) = rest
            .split_once(':')
            .ok_or_else(|| bad("expected tpm:v1:<public>:<private>"))?;
        let public_bytes = B64.decode(p).map_err(|_| bad("public area is not base64"))?;
        let private_bytes = B64.decode(s).map_err(|_| bad("private area is not base64"))?;
        let public = Public::unmarshall(&public_bytes).map_err(|_| bad("public area is malformed"))?;
        let private = Private::try_from(private_bytes).map_err(|_| bad("private area is malformed"))?;
        let (key_type, point) = match &public {
            Public::Ecc {
                parameters, unique, ..
            } => {
                let (kt, len) = match parameters.ecc_curve() {
                    EccCurve::NistP256 => (KeyType::EcP256, 32),
                    EccCurve::NistP384 => (KeyType::EcP384, 48),
                    other => return Err(bad(&format!("curve {other:?} is not supported"))),
                };
                let mut point = vec![0x04];
                for coord in [unique.x().value(), unique.y().value()] {
                    if coord.len() > len {
                        return Err(bad("public point is too long for its curve"));
                    }
                    point.extend(std::iter::repeat_n(0, len - coord.len()));
                    point.extend_from_slice(coord);
                }
                (kt, point)
            }
            _ => return Err(bad("not an ECC key")),
        };
        let mut spki = if key_type == KeyType::EcP256 {
            P256_SPKI
        } else {
            P384_SPKI
        }
        .to_vec();
        spki.extend_from_slice(&point);
        Ok(Arc::new(TpmSigner {
            worker: self.worker.clone(),
            blob: Arc::new(Blob {
                public,
                private,
                public_bytes,
            }),
            key_type,
            point,
            spki,
        }))
    }
}

fn connect(tcti: &str, name: TctiNameConf) -> Result<Conn, HsmError> {
    let mut ctx = Context::new(name).map_err(|e| tpm_err(tcti, "connecting", e))?;
    // Objects here have an empty auth value and userWithAuth: the password session carries it.
    ctx.set_sessions((Some(AuthSession::Password), None, None));
    let srk = ctx
        .create_primary(Hierarchy::Owner, srk_template()?, None, None, None, None)
        .map_err(|e| tpm_err(tcti, "creating the storage root key (owner hierarchy)", e))?
        .key_handle;
    Ok(Conn {
        ctx,
        srk,
        loaded: VecDeque::new(),
    })
}

/// The TCG ECC P-256 SRK template (restricted decryption key, AES-128-CFB for its children).
fn srk_template() -> Result<Public, HsmError> {
    let attrs = tss_esapi::attributes::ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_decrypt(true)
        .with_restricted(true)
        .with_no_da(true)
        .build()
        .map_err(|e| HsmError::Tpm(format!("SRK attributes: {e}")))?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_restricted_decryption_key(
                SymmetricDefinitionObject::AES_128_CFB,
                EccCurve::NistP256,
            )
            .build()
            .map_err(|e| HsmError::Tpm(format!("SRK parameters: {e}")))?,
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
        .map_err(|e| HsmError::Tpm(format!("SRK template: {e}")))
}

/// A non-exportable ECDSA signing key template.
fn signing_template(key_type: KeyType) -> Result<Public, HsmError> {
    let (curve, hash) = match key_type {
        KeyType::EcP384 => (EccCurve::NistP384, HashingAlgorithm::Sha384),
        _ => (EccCurve::NistP256, HashingAlgorithm::Sha256),
    };
    let attrs = tss_esapi::attributes::ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_sign_encrypt(true)
        .build()
        .map_err(|e| HsmError::Tpm(format!("key attributes: {e}")))?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_unrestricted_signing_key(
                EccScheme::EcDsa(HashScheme::new(hash)),
                curve,
            )
            .build()
            .map_err(|e| HsmError::Tpm(format!("key parameters: {e}")))?,
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
        .map_err(|e| HsmError::Tpm(format!("key template: {e}")))
}

fn run_worker(tcti: String, name: TctiNameConf, mut conn: Option<Conn>, jobs: mpsc::Receiver<Job>) {
    for job in jobs {
        match job {
            Job::Create { key_type, reply } => {
                let r = with_retry(&tcti, &name, &mut conn, |c| create(&tcti, c, key_type));
                let _ = reply.send(r);
            }
            Job::Sign {
                blob,
                hash,
                digest,
                reply,
            } => {
                let r = with_retry(&tcti, &name, &mut conn, |c| sign(&tcti, c, &blob, hash, &digest));
                let _ = reply.send(r);
            }
        }
    }
}

/// Runs `op` on a live connection. A failure drops the connection (the TPM may have been reset or restarted, and
/// with it every loaded object), then `op` is tried once more on a fresh one.
fn with_retry<T>(
    tcti: &str,
    name: &TctiNameConf,
    conn: &mut Option<Conn>,
    mut op: impl FnMut(&mut Conn) -> Result<T, HsmError>,
) -> Result<T, HsmError> {
    let mut last = None;
    for _ in 0..2 {
        if conn.is_none() {
            match connect(tcti, name.clone()) {
                Ok(c) => *conn = Some(c),
                Err(e) => return Err(e),
            }
        }
        let Some(c) = conn.as_mut() else { break };
        match op(c) {
            Ok(v) => return Ok(v),
            Err(e) => {
                *conn = None;
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| HsmError::Tpm(format!("TPM {tcti} is unavailable"))))
}

fn create(tcti: &str, c: &mut Conn, key_type: KeyType) -> Result<(Vec<u8>, Vec<u8>), HsmError> {
    let made = c
        .ctx
        .create(c.srk, signing_template(key_type)?, None, None, None, None)
        .map_err(|e| tpm_err(tcti, "TPM2_Create", e))?;
    let public = made
        .out_public
        .marshall()
        .map_err(|e| tpm_err(tcti, "marshalling the public area", e))?;
    Ok((public, made.out_private.value().to_vec()))
}

fn sign(
    tcti: &str,
    c: &mut Conn,
    blob: &Blob,
    hash: HashingAlgorithm,
    digest: &[u8],
) -> Result<(Vec<u8>, Vec<u8>), HsmError> {
    let handle = match c.loaded.iter().position(|(k, _)| *k == blob.public_bytes) {
        Some(i) => {
            let entry = c
                .loaded
                .remove(i)
                .ok_or_else(|| HsmError::Tpm("key cache".into()))?;
            let h = entry.1;
            c.loaded.push_back(entry);
            h
        }
        None => {
            if c.loaded.len() >= MAX_LOADED {
                if let Some((_, old)) = c.loaded.pop_front() {
                    c.ctx
                        .flush_context(old.into())
                        .map_err(|e| tpm_err(tcti, "TPM2_FlushContext", e))?;
                }
            }
            let h = c
                .ctx
                .load(c.srk, blob.private.clone(), blob.public.clone())
                .map_err(|e| tpm_err(tcti, "TPM2_Load (was the key created in this TPM?)", e))?;
            c.loaded.push_back((blob.public_bytes.clone(), h));
            h
        }
    };
    let validation = TPMT_TK_HASHCHECK {
        tag: TPM2_ST_HASHCHECK,
        hierarchy: TPM2_RH_NULL,
        digest: Default::default(),
    }
    .try_into()
    .map_err(|e| tpm_err(tcti, "hashcheck ticket", e))?;
    let digest = Digest::try_from(digest.to_vec()).map_err(|e| tpm_err(tcti, "digest", e))?;
    let sig = c
        .ctx
        .sign(
            handle,
            digest,
            SignatureScheme::EcDsa {
                hash_scheme: HashScheme::new(hash),
            },
            validation,
        )
        .map_err(|e| tpm_err(tcti, "TPM2_Sign", e))?;
    match sig {
        Signature::EcDsa(s) => Ok((s.signature_r().value().to_vec(), s.signature_s().value().to_vec())),
        _ => Err(HsmError::Tpm(format!(
            "TPM {tcti} returned a non-ECDSA signature"
        ))),
    }
}

/// A key that lives in the TPM.
struct TpmSigner {
    worker: Arc<Worker>,
    blob: Arc<Blob>,
    key_type: KeyType,
    point: Vec<u8>,
    spki: Vec<u8>,
}

impl fmt::Debug for TpmSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TpmSigner")
            .field("tcti", &self.worker.tcti)
            .field("key_type", &self.key_type)
            .finish()
    }
}

impl Signer for TpmSigner {
    fn key_type(&self) -> KeyType {
        self.key_type
    }

    fn public_key(&self) -> &[u8] {
        &self.point
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
        let (field, hash, digest) = match alg {
            SignatureAlgorithm::EcdsaP384Sha384 => (
                48,
                HashingAlgorithm::Sha384,
                aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA384, msg),
            ),
            _ => (
                32,
                HashingAlgorithm::Sha256,
                aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, msg),
            ),
        };
        let (r, s) = self.worker.call(|reply| Job::Sign {
            blob: self.blob.clone(),
            hash,
            digest: digest.as_ref().to_vec(),
            reply,
        })?;
        let mut rs = vec![0u8; 2 * field];
        for (i, part) in [r, s].iter().enumerate() {
            if part.len() > field {
                return Err(HsmError::Tpm("signature component longer than the curve".into()));
            }
            rs[(i + 1) * field - part.len()..(i + 1) * field].copy_from_slice(part);
        }
        Ok(fixed_to_der(&rs))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Against a real swtpm (`TRUSTLINE_TEST_SWTPM=1`; scripts/test.sh installs swtpm and sets it).
    #[test]
    fn swtpm_creates_signs_survives_a_restart_and_refuses_foreign_blobs() {
        if std::env::var_os("TRUSTLINE_TEST_SWTPM").is_none() {
            println!("skipped: TRUSTLINE_TEST_SWTPM is not set (scripts/test.sh sets it)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut tpm = crate::swtpm::Swtpm::start(&dir.path().join("state")).unwrap();
        let store = TpmKeyStore::open(&TpmConfig { tcti: tpm.tcti() }).unwrap();
        let mut refs = Vec::new();
        for (kt, alg) in [
            (KeyType::EcP256, SignatureAlgorithm::EcdsaP256Sha256),
            (KeyType::EcP384, SignatureAlgorithm::EcdsaP384Sha384),
            (KeyType::EcP256, SignatureAlgorithm::EcdsaP256Sha256),
        ] {
            let (signer, key_ref) = store.generate(kt).unwrap();
            assert!(key_ref.as_str().starts_with("tpm:v1:"));
            for _ in 0..2 {
                let sig = signer.sign(alg, b"hello").unwrap();
                crate::verify(kt, alg, signer.public_key(), b"hello", &sig).unwrap();
            }
            refs.push((kt, alg, key_ref));
        }
        // Three keys, two slots: the least recently used is flushed and reloaded from its blob.
        for (kt, alg, r) in &refs {
            let s = store.load(r).unwrap();
            let sig = s.sign(*alg, b"again").unwrap();
            crate::verify(*kt, *alg, s.public_key(), b"again", &sig).unwrap();
        }
        let signer = store.load(&refs[0].2).unwrap();
        assert!(
            signer.sign(SignatureAlgorithm::Ed25519, b"x").is_err(),
            "algorithm must fit the key"
        );

        // The TPM disappears: a clear error, no panic, no hang.
        tpm.kill();
        let e = signer
            .sign(SignatureAlgorithm::EcdsaP256Sha256, b"x")
            .unwrap_err()
            .to_string();
        assert!(e.contains(&tpm.tcti()), "{e}");
        // It returns (same state, fresh boot): the key is reloaded from its blob and signing resumes.
        tpm.restart().unwrap();
        let sig = signer.sign(SignatureAlgorithm::EcdsaP256Sha256, b"back").unwrap();
        crate::verify(
            KeyType::EcP256,
            SignatureAlgorithm::EcdsaP256Sha256,
            signer.public_key(),
            b"back",
            &sig,
        )
        .unwrap();

        // A blob from another TPM (different owner seed) cannot be loaded here.
        let other_dir = tempfile::tempdir().unwrap();
        let other = crate::swtpm::Swtpm::start(&other_dir.path().join("state")).unwrap();
        let other_store = TpmKeyStore::open(&TpmConfig { tcti: other.tcti() }).unwrap();
        let e = other_store
            .load(&refs[0].2)
            .unwrap()
            .sign(SignatureAlgorithm::EcdsaP256Sha256, b"x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("TPM2_Load"), "{e}");

        let e = TpmKeyStore::open(&TpmConfig {
            tcti: "nonsense".into(),
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("\"nonsense\""), "{e}");
        assert!(store.load(&KeyRef::new("tpm:v1:zz".into())).is_err());
    }
}
