//! Node attestation with a TPM-resident DevID key (the `tpm_devid` profile, after IEEE 802.1AR).
//!
//! The operator's DevID CA certifies keys that live in each node's TPM, and gives the CA its certificate
//! (`[node_attestation.tpm_devid] devid_ca`). An agent attests in two calls on one connection:
//!
//! 1. `AttestChallenge`: the CA returns a fresh random nonce, valid for [`NONCE_TTL`] and usable once;
//! 2. `AttestAgent` with a `DevIdProof`: the DevID certificate chain, the nonce, and the TPM's signature over
//!    [`trustline_identity::devid::proof_message`] (trust domain, nonce and the SHA-256 of the agent's CSR).
//!
//! The CA checks that the chain leads to a configured DevID CA at the current time, that the nonce is one it
//! issued and has not seen back, and that the signature verifies with the DevID certificate's key. A copied
//! certificate is therefore worthless without the TPM, a recorded proof cannot be replayed, and a proof cannot be
//! moved onto another CSR. The agent's SPIFFE ID is `spiffe://<td>/trustline/agent/tpm_devid/<sha256 of the
//! DevID certificate>`, stable for as long as the node keeps its DevID certificate.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};

/// How long a challenge nonce stays valid.
pub const NONCE_TTL: Duration = Duration::from_secs(60);
/// Most outstanding nonces (older ones are dropped first).
const MAX_OUTSTANDING: usize = 10_000;

/// Why a DevID proof was refused. Messages name the part at fault; they never echo the signature.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DevIdError {
    /// The DevID CA file could not be used.
    #[error("node_attestation.tpm_devid.devid_ca {path}: {reason}")]
    CaFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// This CA does not accept DevID attestation.
    #[error("this CA does not accept tpm_devid attestation (no [node_attestation.tpm_devid] in its config)")]
    NotEnabled,
    /// The nonce is unknown, used or expired.
    #[error("devid.nonce: unknown, already used or expired (ask for a fresh challenge)")]
    Nonce,
    /// The certificate chain is empty or malformed.
    #[error("devid.cert_chain: {0}")]
    Chain(String),
    /// The chain does not lead to a configured DevID CA.
    #[error("devid.cert_chain: not issued by a trusted DevID CA ({0})")]
    Untrusted(String),
    /// The signature does not verify with the DevID key.
    #[error("devid.signature: does not verify with the DevID certificate's key")]
    Signature,
}

/// A node identified by its DevID certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevIdNode {
    /// SHA-256 of the DevID certificate (hex).
    pub fingerprint: String,
    /// The certificate's subject, for logs.
    pub subject: String,
}

/// Issues challenges and checks proofs.
pub struct DevIdVerifier {
    anchors: Vec<TrustAnchor<'static>>,
    nonces: Mutex<HashMap<[u8; 32], i64>>,
}

impl std::fmt::Debug for DevIdVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevIdVerifier")
            .field("anchors", &self.anchors.len())
            .finish()
    }
}

impl DevIdVerifier {
    /// Loads the DevID CA certificates (PEM, one or more).
    pub fn load(path: &Path) -> Result<Self, DevIdError> {
        let bad = |reason: String| DevIdError::CaFile {
            path: path.to_owned(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let certs = trustline_identity::bundle::certs_from_pem(&text).map_err(|e| bad(e.to_string()))?;
        if certs.is_empty() {
            return Err(bad("no CERTIFICATE in the file".into()));
        }
        let anchors = certs
            .iter()
            .map(|der| {
                webpki::anchor_from_trusted_cert(&CertificateDer::from(der.as_slice()))
                    .map(|a| a.to_owned())
                    .map_err(|e| bad(format!("unusable certificate: {e:?}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            anchors,
            nonces: Mutex::new(HashMap::new()),
        })
    }

    /// A fresh nonce and when it expires (unix seconds).
    pub fn challenge(&self, now: i64) -> Result<(Vec<u8>, i64), DevIdError> {
        let mut nonce = [0u8; 32];
        aws_lc_rs::rand::fill(&mut nonce).map_err(|_| DevIdError::Nonce)?;
        let expires = now + NONCE_TTL.as_secs() as i64;
        let mut map = self.nonces.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, exp| *exp > now);
        if map.len() >= MAX_OUTSTANDING {
            // Under a flood, drop the oldest half rather than refuse every new node.
            let mut exps: Vec<i64> = map.values().copied().collect();
            exps.sort_unstable();
            let cut = exps[exps.len() / 2];
            map.retain(|_, exp| *exp > cut);
        }
        map.insert(nonce, expires);
        Ok((nonce.to_vec(), expires))
    }

    /// Checks a proof. The nonce is consumed whether or not the rest verifies.
    pub fn verify(
        &self,
        trust_domain: &str,
        chain: &[Vec<u8>],
        nonce: &[u8],
        signature: &[u8],
        csr_der: &[u8],
        now: i64,
    ) -> Result<DevIdNode, DevIdError> {
        let key: [u8; 32] = nonce.try_into().map_err(|_| DevIdError::Nonce)?;
        match self.nonces.lock().unwrap_or_else(|p| p.into_inner()).remove(&key) {
            Some(exp) if exp > now => {}
            _ => return Err(DevIdError::Nonce),
        }
        let (leaf, rest) = chain
            .split_first()
            .ok_or_else(|| DevIdError::Chain("empty".into()))?;
        let leaf_der = CertificateDer::from(leaf.as_slice());
        let ee = webpki::EndEntityCert::try_from(&leaf_der).map_err(|e| match e {
            webpki::Error::UnsupportedCertVersion => DevIdError::Chain(
                "the DevID certificate is X.509 v1; it must be v3 (sign it with extensions, e.g. keyUsage)"
                    .into(),
            ),
            e => DevIdError::Chain(format!("unreadable DevID certificate: {e:?}")),
        })?;
        let intermediates: Vec<CertificateDer<'_>> =
            rest.iter().map(|c| CertificateDer::from(c.as_slice())).collect();
        let algs = webpki::ALL_VERIFICATION_ALGS;
        ee.verify_for_usage(
            algs,
            &self.anchors,
            &intermediates,
            UnixTime::since_unix_epoch(Duration::from_secs(now.max(0) as u64)),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| DevIdError::Untrusted(format!("{e:?}")))?;
        let msg = trustline_identity::devid::proof_message(trust_domain, nonce, csr_der);
        let ok = [
            webpki::aws_lc_rs::ECDSA_P256_SHA256,
            webpki::aws_lc_rs::ECDSA_P384_SHA384,
        ]
        .iter()
        .any(|alg| ee.verify_signature(*alg, &msg, signature).is_ok());
        if !ok {
            return Err(DevIdError::Signature);
        }
        let fingerprint = trustline_identity::devid::fingerprint(leaf);
        let subject = x509_parser::parse_x509_certificate(leaf)
            .map(|(_, c)| c.subject().to_string())
            .unwrap_or_default();
        Ok(DevIdNode { fingerprint, subject })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    struct Pki {
        _dir: tempfile::TempDir,
        ca_path: PathBuf,
        chain: Vec<Vec<u8>>,
        key: rcgen::KeyPair,
    }

    fn pki() -> Pki {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Example DevID CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, &ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, "node-1");
        let leaf = p.signed_by(&key, &issuer).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ca_path = dir.path().join("devid-ca.pem");
        std::fs::write(&ca_path, ca_cert.pem()).unwrap();
        Pki {
            _dir: dir,
            ca_path,
            chain: vec![leaf.der().to_vec()],
            key,
        }
    }

    fn sign(key: &rcgen::KeyPair, msg: &[u8]) -> Vec<u8> {
        use rcgen::SigningKey;
        key.sign(msg).unwrap()
    }

    #[test]
    fn a_fresh_proof_verifies_once_and_nothing_else_does() {
        let p = pki();
        let v = DevIdVerifier::load(&p.ca_path).unwrap();
        let now = crate::x509::now_unix();
        let (nonce, exp) = v.challenge(now).unwrap();
        assert_eq!(exp, now + 60);
        let csr = b"csr bytes";
        let msg = trustline_identity::devid::proof_message("example.org", &nonce, csr);
        let sig = sign(&p.key, &msg);
        let node = v.verify("example.org", &p.chain, &nonce, &sig, csr, now).unwrap();
        assert_eq!(node.fingerprint.len(), 64);
        assert!(node.subject.contains("node-1"), "{}", node.subject);
        // Replay: the nonce is gone.
        let e = v.verify("example.org", &p.chain, &nonce, &sig, csr, now);
        assert!(matches!(e, Err(DevIdError::Nonce)), "{e:?}");

        // Another CSR (a proof moved to another request), another trust domain, an expired nonce.
        let (nonce, _) = v.challenge(now).unwrap();
        let sig = sign(
            &p.key,
            &trustline_identity::devid::proof_message("example.org", &nonce, csr),
        );
        let e = v.verify("example.org", &p.chain, &nonce, &sig, b"other csr", now);
        assert!(matches!(e, Err(DevIdError::Signature)), "{e:?}");
        let (nonce, _) = v.challenge(now).unwrap();
        let sig = sign(
            &p.key,
            &trustline_identity::devid::proof_message("example.org", &nonce, csr),
        );
        let e = v.verify("other.org", &p.chain, &nonce, &sig, csr, now);
        assert!(matches!(e, Err(DevIdError::Signature)), "{e:?}");
        let (nonce, _) = v.challenge(now).unwrap();
        let sig = sign(
            &p.key,
            &trustline_identity::devid::proof_message("example.org", &nonce, csr),
        );
        let e = v.verify("example.org", &p.chain, &nonce, &sig, csr, now + 61);
        assert!(matches!(e, Err(DevIdError::Nonce)), "{e:?}");
        let e = v.verify("example.org", &p.chain, b"made up", &sig, csr, now);
        assert!(matches!(e, Err(DevIdError::Nonce)), "{e:?}");

        // A certificate from another DevID CA, even with a valid signature by its own key.
        let other = pki();
        let (nonce, _) = v.challenge(now).unwrap();
        let sig = sign(
            &other.key,
            &trustline_identity::devid::proof_message("example.org", &nonce, csr),
        );
        let e = v.verify("example.org", &other.chain, &nonce, &sig, csr, now);
        assert!(matches!(e, Err(DevIdError::Untrusted(_))), "{e:?}");
        // The right certificate with another key's signature (a copied certificate).
        let (nonce, _) = v.challenge(now).unwrap();
        let sig = sign(
            &other.key,
            &trustline_identity::devid::proof_message("example.org", &nonce, csr),
        );
        let e = v.verify("example.org", &p.chain, &nonce, &sig, csr, now);
        assert!(matches!(e, Err(DevIdError::Signature)), "{e:?}");
    }

    #[test]
    fn a_bad_ca_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("empty.pem");
        std::fs::write(&f, "").unwrap();
        let e = DevIdVerifier::load(&f).unwrap_err().to_string();
        assert!(e.contains("devid_ca") && e.contains("empty.pem"), "{e}");
    }
}
