//! The CA with its keys in a device: a PKCS#11 token (SoftHSM2, initialised here) and a TPM 2.0 (swtpm, started
//! here). X.509-SVIDs and JWT-SVIDs signed inside the device verify against the bundle, across CA key rotations;
//! a TPM that disappears gives clear errors and changes nothing, and service resumes when it returns.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use trustline_tests::{csr, now, verify_svid, Ca};

/// Mints an X.509-SVID for `spiffe://example.org/<name>` through the CA's admin CLI and returns its chain.
fn mint(ca: &Ca, tmp: &Path, name: &str) -> Result<Vec<Vec<u8>>, String> {
    let (_key, req) = csr(&[&format!("spiffe://example.org/{name}")], &[]);
    let csr_path = tmp.join(format!("{name}.der"));
    std::fs::write(&csr_path, &req).unwrap();
    let out = tmp.join(name);
    let o = ca.cli(&[
        "x509",
        "mint",
        "--csr",
        csr_path.to_str().unwrap(),
        "--spiffe-id",
        &format!("spiffe://example.org/{name}"),
        "--write",
        out.to_str().unwrap(),
    ]);
    if !o.status.success() {
        return Err(String::from_utf8_lossy(&o.stderr).into_owned());
    }
    Ok(
        trustline_identity::bundle::certs_from_pem(&std::fs::read_to_string(out.join("svid.pem")).unwrap())
            .unwrap(),
    )
}

/// What every backend must do: X.509 and JWT signing, and a rotation that works as with software keys.
fn exercise(ca: &Ca, tmp: &Path) {
    let chain = mint(ca, tmp, "web").unwrap();
    assert_eq!(
        verify_svid(&chain, &ca.bundle_roots(), now()).unwrap(),
        "spiffe://example.org/web"
    );
    let token = ca.cli_ok(&[
        "jwt",
        "mint",
        "--spiffe-id",
        "spiffe://example.org/web",
        "--audience",
        "pay",
    ]);
    let jwks = trustline_identity::bundle::JwkSet::parse(
        ca.cli_ok(&["bundle", "show", "--format", "jwks"]).as_bytes(),
    )
    .unwrap();
    let v = trustline_identity::jwt::validate(token.trim(), "pay", &jwks).unwrap();
    assert_eq!(v.spiffe_id.to_string(), "spiffe://example.org/web");
    // Rotation: prepare, activate, sign with the new key.
    ca.cli_ok(&["ca", "rotate"]);
    ca.cli_ok(&["ca", "rotate"]);
    let chain = mint(ca, tmp, "api").unwrap();
    assert_eq!(
        verify_svid(&chain, &ca.bundle_roots(), now()).unwrap(),
        "spiffe://example.org/api"
    );
}

#[test]
fn the_ca_signs_with_keys_that_live_in_a_pkcs11_token() {
    let Ok(module) = std::env::var("TRUSTLINE_TEST_SOFTHSM") else {
        println!(
            "skipped: TRUSTLINE_TEST_SOFTHSM is not set (scripts/test.sh installs softhsm2 and sets it)"
        );
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    // A token of our own: SoftHSM2 reads its token folder from SOFTHSM2_CONF.
    // A PIN no log line can contain by chance (a port, a pid or a serial could contain "1234").
    const PIN: &str = "pin-Zq7vKx";
    let conf = trustline_hsm::pkcs11::softhsm_token(tmp.path(), "trustline-ca", PIN).unwrap();
    // This test file holds one test, so the variable is set for the CA processes it starts and nothing else.
    std::env::set_var("SOFTHSM2_CONF", &conf);
    let pin = tmp.path().join("pin");
    std::fs::write(&pin, format!("{PIN}\n")).unwrap();
    // A PIN file others can read is refused (like key files), naming it.
    let loose = trustline_hsm::pkcs11::pin_from_file(&pin)
        .unwrap_err()
        .to_string();
    assert!(loose.contains("pin") && loose.contains("644"), "{loose}");
    std::fs::set_permissions(&pin, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();

    let dir = tmp.path().join("ca");
    let cfg = format!(
        "trust_domain = \"example.org\"\ndata_dir = \"{d}\"\n\n[server]\nagent_listen = \"127.0.0.1:0\"\n\n[keys]\nbackend = \"pkcs11\"\n\n[keys.pkcs11]\nmodule = \"{module}\"\ntoken_label = \"trustline-ca\"\npin_file = \"{pin}\"\n",
        d = dir.display(),
        pin = pin.display()
    );
    let ca = Ca::start_with(&dir, &cfg);
    exercise(&ca, tmp.path());

    // The token now holds the CA's keys; the PIN never appears in the CA's logs.
    let logs = ca.logs.lock().unwrap().join("\n");
    assert!(!logs.contains(PIN), "PIN in logs");
    let listing = std::process::Command::new("softhsm2-util")
        .arg("--show-slots")
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&listing.stdout).contains("trustline-ca"));

    // The token is removed (its folder taken away): signing and rotation fail naming the token, nothing changes;
    // it is put back: the CA signs and rotates again without a restart.
    let tokens = tmp.path().join("tokens");
    let away = tmp.path().join("tokens-away");
    std::fs::rename(&tokens, &away).unwrap();
    let e = mint(&ca, tmp.path(), "removed").unwrap_err();
    assert!(e.contains("token \"trustline-ca\" unavailable"), "{e}");
    let before = ca.cli_ok(&["ca", "status"]);
    let e = ca.cli_err(&["ca", "rotate"]);
    assert!(e.contains("token \"trustline-ca\" unavailable"), "{e}");
    assert_eq!(
        ca.cli_ok(&["ca", "status"]),
        before,
        "a failed rotation must leave no trace"
    );
    std::fs::rename(&away, &tokens).unwrap();
    let chain = mint(&ca, tmp.path(), "returned").unwrap();
    assert_eq!(
        verify_svid(&chain, &ca.bundle_roots(), now()).unwrap(),
        "spiffe://example.org/returned"
    );
    ca.cli_ok(&["ca", "rotate"]);
    drop(ca);

    // An existing key in the token (made by openssl, imported by softhsm2-util, as an HSM administrator would)
    // becomes the first X.509 CA key; the bundle root carries exactly its public key.
    let work = tmp.path();
    let sh = |cmd: &mut std::process::Command| {
        let o = cmd.env("SOFTHSM2_CONF", &conf).output().unwrap();
        assert!(
            o.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    sh(std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
        ])
        .arg(work.join("hsm-admin.pem")));
    sh(std::process::Command::new("openssl")
        .args(["pkey", "-pubout", "-outform", "DER", "-in"])
        .arg(work.join("hsm-admin.pem"))
        .arg("-out")
        .arg(work.join("hsm-admin.pub.der")));
    sh(std::process::Command::new("softhsm2-util")
        .args(["--import"])
        .arg(work.join("hsm-admin.pem"))
        .args([
            "--token",
            "trustline-ca",
            "--label",
            "ca-root-2026",
            "--id",
            "a1",
            "--pin",
            PIN,
        ]));
    let ex_dir = tmp.path().join("ca-existing");
    let ex_cfg = cfg
        .replace(&dir.display().to_string(), &ex_dir.display().to_string())
        .replace(
            "token_label = \"trustline-ca\"\n",
            "token_label = \"trustline-ca\"\nx509_key_label = \"ca-root-2026\"\n",
        );
    let ex_ca = Ca::start_with(&ex_dir, &ex_cfg);
    let root = ex_ca.bundle_roots().remove(0);
    let (_, parsed) = x509_parser::parse_x509_certificate(&root).unwrap();
    assert_eq!(
        parsed.tbs_certificate.subject_pki.raw,
        std::fs::read(work.join("hsm-admin.pub.der")).unwrap().as_slice()
    );
    let chain = mint(&ex_ca, tmp.path(), "existing").unwrap();
    assert_eq!(
        verify_svid(&chain, &ex_ca.bundle_roots(), now()).unwrap(),
        "spiffe://example.org/existing"
    );
    drop(ex_ca);
    // A label that names no key is a startup error naming it.
    let missing = ex_cfg
        .replace(
            &ex_dir.display().to_string(),
            &tmp.path().join("ca-missing").display().to_string(),
        )
        .replace("ca-root-2026", "no-such-key");
    std::fs::create_dir_all(tmp.path().join("ca-missing")).unwrap();
    std::fs::write(tmp.path().join("ca-missing/ca.toml"), &missing).unwrap();
    trustline_hsm::SoftwareKeyStore::create_key_file(&tmp.path().join("ca-missing/seal.key")).ok();
    let out = std::process::Command::new(trustline_tests::bin("trustline-ca"))
        .args(["run", "--config"])
        .arg(tmp.path().join("ca-missing/ca.toml"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("no-such-key"), "{err}");

    // RSA keys in the token: PKCS#1 v1.5 certificates, and PS256 JWT-SVIDs through CKM_SHA256_RSA_PKCS_PSS.
    let rsa_dir = tmp.path().join("ca-rsa");
    let rsa_cfg = cfg.replace(&dir.display().to_string(), &rsa_dir.display().to_string()).replace(
        "backend = \"pkcs11\"\n",
        "backend = \"pkcs11\"\nx509_key_type = \"rsa-2048\"\njwt_key_type = \"rsa-2048\"\njwt_rsa_padding = \"pss\"\n",
    );
    let rsa_ca = Ca::start_with(&rsa_dir, &rsa_cfg);
    exercise(&rsa_ca, tmp.path());
    let token = rsa_ca.cli_ok(&[
        "jwt",
        "mint",
        "--spiffe-id",
        "spiffe://example.org/web",
        "--audience",
        "a",
    ]);
    let header = jsonwebtoken::decode_header(token.trim()).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::PS256);
    drop(rsa_ca);

    // A wrong PIN is a clear, one-line startup error naming the field, without the PIN.
    std::fs::write(&pin, "wrong-pin-Jw3\n").unwrap();
    let cfg_path = dir.join("ca.toml");
    let out = std::process::Command::new(trustline_tests::bin("trustline-ca"))
        .args(["run", "--config"])
        .arg(&cfg_path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("keys.pkcs11") && err.contains("login") && !err.contains("wrong-pin-Jw3"),
        "{err}"
    );
}

#[test]
fn the_ca_signs_with_keys_that_live_in_a_tpm() {
    if std::env::var_os("TRUSTLINE_TEST_SWTPM").is_none() {
        println!("skipped: TRUSTLINE_TEST_SWTPM is not set (scripts/test.sh installs swtpm and sets it)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut tpm = trustline_hsm::swtpm::Swtpm::start(&tmp.path().join("tpm")).unwrap();
    let dir = tmp.path().join("ca");
    let cfg = format!(
        "trust_domain = \"example.org\"\ndata_dir = \"{d}\"\n\n[server]\nagent_listen = \"127.0.0.1:0\"\n\n[keys]\nbackend = \"tpm\"\n\n[keys.tpm]\ntcti = \"{tcti}\"\n",
        d = dir.display(),
        tcti = tpm.tcti(),
    );
    let ca = Ca::start_with(&dir, &cfg);
    exercise(&ca, tmp.path());
    // The CA's keys are TPM-wrapped blobs; nothing in the data folder is a private key.
    let status = ca.cli_ok(&["ca", "status"]);
    assert!(status.contains("tpm"), "{status}");

    // The TPM disappears: signing fails with an error naming the TPM, a rotation changes nothing.
    tpm.kill();
    let e = mint(&ca, tmp.path(), "down").unwrap_err();
    assert!(e.contains("TPM") && e.contains(&tpm.tcti()), "{e}");
    let before = ca.cli_ok(&["ca", "status"]);
    let e = ca.cli_err(&["ca", "rotate"]);
    assert!(e.contains("TPM"), "{e}");
    assert_eq!(
        ca.cli_ok(&["ca", "status"]),
        before,
        "a failed rotation must leave no trace"
    );

    // It returns: the CA reconnects on its own, reloads its keys and signs again; rotation works again.
    tpm.restart().unwrap();
    let chain = mint(&ca, tmp.path(), "back").unwrap();
    assert_eq!(
        verify_svid(&chain, &ca.bundle_roots(), now()).unwrap(),
        "spiffe://example.org/back"
    );
    ca.cli_ok(&["ca", "rotate"]);
    drop(ca);
    drop(tpm);

    // A TCTI that names no TPM is a one-line startup error naming the field.
    let bad = cfg.replace("swtpm:host=127.0.0.1", "swtpm:host=127.0.0.2");
    std::fs::write(dir.join("ca.toml"), bad).unwrap();
    let out = std::process::Command::new(trustline_tests::bin("trustline-ca"))
        .args(["run", "--config"])
        .arg(dir.join("ca.toml"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("keys.tpm") && err.contains("connecting"), "{err}");
}
