//! Signatures per second per key backend: software keys (aws-lc; SM2 through OpenSSL with the `sm` feature), a PKCS#11 token (SoftHSM2, when
//! `TRUSTLINE_TEST_SOFTHSM` names its module) and a TPM 2.0 (swtpm, in a build with the `tpm` feature and
//! `TRUSTLINE_TEST_SWTPM` set); scripts/test.sh installs both.
//!
//! Run: `TRUSTLINE_TEST_SOFTHSM=/usr/lib/softhsm/libsofthsm2.so TRUSTLINE_TEST_SWTPM=1 \
//!       cargo bench -p trustline-hsm --features tpm,sm --bench sign`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use trustline_hsm::{
    KeyStore, KeyType, Pkcs11Config, Pkcs11KeyStore, SignatureAlgorithm, Signer, SoftwareKeyStore,
};

fn rate(label: &str, signer: &Arc<dyn Signer>, alg: SignatureAlgorithm) {
    let msg = [7u8; 256]; // about the size of a certificate's to-be-signed digest input for a small SVID
    let until = Instant::now() + Duration::from_secs(2);
    let start = Instant::now();
    let mut n = 0u64;
    while Instant::now() < until {
        signer.sign(alg, &msg).unwrap();
        n += 1;
    }
    println!(
        "{label:<34} {:>9.0} signatures/s (one thread)",
        n as f64 / start.elapsed().as_secs_f64()
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("seal.key");
    SoftwareKeyStore::create_key_file(&key).unwrap();
    let soft = KeyStore::Software(SoftwareKeyStore::from_key_file(&key).unwrap());
    for (kt, alg) in [
        (KeyType::EcP256, SignatureAlgorithm::EcdsaP256Sha256),
        (KeyType::EcP384, SignatureAlgorithm::EcdsaP384Sha384),
        (KeyType::Ed25519, SignatureAlgorithm::Ed25519),
        (KeyType::Rsa2048, SignatureAlgorithm::RsaPkcs1Sha256),
    ] {
        let (s, _) = soft.generate(kt).unwrap();
        rate(&format!("software {kt}"), &s, alg);
    }
    if trustline_hsm::SM_SUPPORTED {
        let (s, _) = soft.generate(KeyType::Sm2).unwrap();
        rate("software sm2 (SM2-with-SM3)", &s, SignatureAlgorithm::Sm2Sm3);
    } else {
        println!("sm2: skipped (build with --features sm)");
    }
    pkcs11(dir.path());
    tpm(dir.path());
}

fn pkcs11(dir: &std::path::Path) {
    let Ok(module) = std::env::var("TRUSTLINE_TEST_SOFTHSM") else {
        println!("pkcs11: skipped (set TRUSTLINE_TEST_SOFTHSM to the SoftHSM2 module)");
        return;
    };
    let conf = trustline_hsm::pkcs11::softhsm_token(dir, "bench", "1234").unwrap();
    std::env::set_var("SOFTHSM2_CONF", &conf);
    let p11 = Pkcs11KeyStore::open(&Pkcs11Config {
        module: module.into(),
        token_label: "bench".into(),
        pin: "1234".into(),
    })
    .unwrap();
    for (kt, alg) in [
        (KeyType::EcP256, SignatureAlgorithm::EcdsaP256Sha256),
        (KeyType::EcP384, SignatureAlgorithm::EcdsaP384Sha384),
    ] {
        let (s, _) = p11.generate(kt).unwrap();
        rate(&format!("pkcs11 (SoftHSM2) {kt}"), &s, alg);
    }
}

#[cfg(feature = "tpm")]
fn tpm(dir: &std::path::Path) {
    if std::env::var_os("TRUSTLINE_TEST_SWTPM").is_none() {
        println!("tpm: skipped (set TRUSTLINE_TEST_SWTPM=1; needs swtpm)");
        return;
    }
    let swtpm = trustline_hsm::swtpm::Swtpm::start(&dir.join("tpm")).unwrap();
    let store = KeyStore::open_tpm(&trustline_hsm::TpmConfig { tcti: swtpm.tcti() }).unwrap();
    for (kt, alg) in [
        (KeyType::EcP256, SignatureAlgorithm::EcdsaP256Sha256),
        (KeyType::EcP384, SignatureAlgorithm::EcdsaP384Sha384),
    ] {
        let (s, _) = store.generate(kt).unwrap();
        rate(&format!("tpm (swtpm) {kt}"), &s, alg);
    }
}

#[cfg(not(feature = "tpm"))]
fn tpm(_: &std::path::Path) {
    println!("tpm: skipped (build with --features tpm)");
}
