//! The CA with its keys in a PKCS#11 token (SoftHSM2, initialised here): X.509-SVIDs and JWT-SVIDs signed inside
//! the token verify against the bundle, across a CA key rotation.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use trustline_tests::{csr, now, verify_svid, Ca};

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
    let conf = trustline_hsm::pkcs11::softhsm_token(tmp.path(), "trustline-ca", "1234").unwrap();
    // This test file holds one test, so the variable is set for the CA processes it starts and nothing else.
    std::env::set_var("SOFTHSM2_CONF", &conf);
    let pin = tmp.path().join("pin");
    std::fs::write(&pin, "1234\n").unwrap();

    let dir = tmp.path().join("ca");
    let cfg = format!(
        "trust_domain = \"example.org\"\ndata_dir = \"{d}\"\n\n[server]\nagent_listen = \"127.0.0.1:0\"\n\n[keys]\nbackend = \"pkcs11\"\n\n[keys.pkcs11]\nmodule = \"{module}\"\ntoken_label = \"trustline-ca\"\npin_file = \"{pin}\"\n",
        d = dir.display(),
        pin = pin.display()
    );
    let ca = Ca::start_with(&dir, &cfg);
    let mint = |name: &str| {
        let (_key, req) = csr(&[&format!("spiffe://example.org/{name}")], &[]);
        let csr_path = tmp.path().join(format!("{name}.der"));
        std::fs::write(&csr_path, &req).unwrap();
        let out = tmp.path().join(name);
        ca.cli_ok(&[
            "x509",
            "mint",
            "--csr",
            csr_path.to_str().unwrap(),
            "--spiffe-id",
            &format!("spiffe://example.org/{name}"),
            "--write",
            out.to_str().unwrap(),
        ]);
        trustline_identity::bundle::certs_from_pem(&std::fs::read_to_string(out.join("svid.pem")).unwrap())
            .unwrap()
    };
    let chain = mint("web");
    assert_eq!(
        verify_svid(&chain, &ca.bundle_roots(), now()).unwrap(),
        "spiffe://example.org/web"
    );

    // A JWT-SVID signed in the token verifies against the bundle's JWT keys.
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

    // Rotation works the same with the token: prepare, activate, sign with the new key.
    ca.cli_ok(&["ca", "rotate"]);
    ca.cli_ok(&["ca", "rotate"]);
    let chain = mint("api");
    assert_eq!(
        verify_svid(&chain, &ca.bundle_roots(), now()).unwrap(),
        "spiffe://example.org/api"
    );

    // The token now holds the CA's keys; the PIN never appears in the CA's logs.
    let logs = ca.logs.lock().unwrap().join("\n");
    assert!(!logs.contains("1234"), "PIN in logs");
    let listing = std::process::Command::new("softhsm2-util")
        .arg("--show-slots")
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&listing.stdout).contains("trustline-ca"));
    drop(ca);

    // A wrong PIN is a clear, one-line startup error naming the field, without the PIN.
    std::fs::write(&pin, "9999\n").unwrap();
    let cfg_path = dir.join("ca.toml");
    let out = std::process::Command::new(trustline_tests::bin("trustline-ca"))
        .args(["run", "--config"])
        .arg(&cfg_path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("keys.pkcs11") && err.contains("login") && !err.contains("9999"),
        "{err}"
    );
}
