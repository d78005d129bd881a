//! SM2 tests, checked against the `openssl` command-line tool (an independent signer and verifier).

use std::path::Path;
use std::process::Command;

use openssl::asn1::Asn1Time;
use openssl::bn::BigNum;
use openssl::ec::{EcGroup, EcKey};
use openssl::nid::Nid;
use openssl::pkey::PKey;
use openssl::x509::extension::{BasicConstraints, KeyUsage};
use openssl::x509::{X509Name, X509NameBuilder, X509Req, X509};

use super::*;

const DISTID: &str = "distid:1234567812345678";

/// Runs the openssl CLI in `dir`; returns whether it succeeded (output kept for the failure message).
fn cli(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl CLI");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn cli_ok(dir: &Path, args: &[&str]) -> String {
    let (ok, text) = cli(dir, args);
    assert!(ok, "openssl {args:?} failed:\n{text}");
    text
}

#[test]
fn generated_key_is_sm2_and_round_trips() {
    let key = generate().unwrap();
    assert!(ffi::is_sm2(key.pkey()));
    let der = key.to_pkcs8_der().unwrap();
    let again = Sm2Key::from_pkcs8_der(&der).unwrap();
    assert_eq!(again.public_key_der().unwrap(), key.public_key_der().unwrap());
    let pem = key.to_pkcs8_pem().unwrap();
    let again = Sm2Key::from_pem(&pem).unwrap();
    assert_eq!(again.public_key_point().unwrap(), key.public_key_point().unwrap());
    let point = key.public_key_point().unwrap();
    assert_eq!(point[0], 4);
    assert_eq!(
        key.public_key_der().unwrap(),
        [&der::SM2_SPKI_PREFIX[..], &point[..]].concat()
    );
}

#[test]
fn sign_verify_with_spki_and_point() {
    let key = generate().unwrap();
    let sig = key.sign(b"hello").unwrap();
    verify(&key.public_key_der().unwrap(), b"hello", &sig).unwrap();
    verify(&key.public_key_point().unwrap(), b"hello", &sig).unwrap();
    assert!(matches!(
        verify(&key.public_key_der().unwrap(), b"hellO", &sig),
        Err(SmError::BadSignature { .. })
    ));
    let other = generate().unwrap();
    assert!(verify(&other.public_key_der().unwrap(), b"hello", &sig).is_err());
    assert!(verify(&key.public_key_der().unwrap(), b"hello", b"\x30\x00").is_err());
}

/// Our signature verifies with the CLI given the standard ID, and does NOT verify with the CLI's default
/// (empty) ID: proof that the ID is really set.
#[test]
fn our_signature_verifies_with_openssl_cli_and_standard_id_only() {
    let dir = tempfile::tempdir().unwrap();
    let key = generate().unwrap();
    let msg = b"trustline SM2 interop message";
    std::fs::write(dir.path().join("msg"), msg).unwrap();
    std::fs::write(dir.path().join("sig"), key.sign(msg).unwrap()).unwrap();
    std::fs::write(dir.path().join("pub.pem"), key.public_key_pem().unwrap()).unwrap();
    let verify_args = [
        "pkeyutl", "-verify", "-rawin", "-digest", "sm3", "-pubin", "-inkey", "pub.pem", "-in", "msg",
        "-sigfile", "sig",
    ];
    let out = cli_ok(dir.path(), &[&verify_args[..], &["-pkeyopt", DISTID]].concat());
    assert!(out.contains("Signature Verified Successfully"), "{out}");
    let (ok, out) = cli(dir.path(), &verify_args);
    assert!(!ok, "the empty-ID verification must fail: {out}");
}

/// The CLI signs with the standard ID: we verify. The CLI signs with its default (empty) ID: we refuse.
#[test]
fn openssl_cli_signature_verifies_and_empty_id_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    cli_ok(dir.path(), &["genpkey", "-algorithm", "SM2", "-out", "key.pem"]);
    cli_ok(
        dir.path(),
        &["pkey", "-in", "key.pem", "-pubout", "-out", "pub.pem"],
    );
    let msg = b"signed by the openssl CLI";
    std::fs::write(dir.path().join("msg"), msg).unwrap();
    let sign_args = [
        "pkeyutl", "-sign", "-rawin", "-digest", "sm3", "-inkey", "key.pem", "-in", "msg",
    ];
    cli_ok(
        dir.path(),
        &[&sign_args[..], &["-out", "sig.std", "-pkeyopt", DISTID]].concat(),
    );
    cli_ok(dir.path(), &[&sign_args[..], &["-out", "sig.empty"]].concat());

    let key = Sm2Key::from_pem(&std::fs::read(dir.path().join("key.pem")).unwrap()).unwrap();
    let spki = key.public_key_der().unwrap();
    let pub_pem = PKey::public_key_from_pem(&std::fs::read(dir.path().join("pub.pem")).unwrap()).unwrap();
    assert_eq!(pub_pem.public_key_to_der().unwrap(), spki);

    verify(&spki, msg, &std::fs::read(dir.path().join("sig.std")).unwrap()).unwrap();
    let empty = std::fs::read(dir.path().join("sig.empty")).unwrap();
    assert!(matches!(
        verify(&spki, msg, &empty),
        Err(SmError::BadSignature { .. })
    ));

    // The key loaded from the CLI's PEM signs SM2 (not ECDSA) with the standard ID.
    std::fs::write(dir.path().join("sig.ours"), key.sign(msg).unwrap()).unwrap();
    cli_ok(
        dir.path(),
        &[
            "pkeyutl", "-verify", "-rawin", "-digest", "sm3", "-pubin", "-inkey", "pub.pem", "-in", "msg",
            "-sigfile", "sig.ours", "-pkeyopt", DISTID,
        ],
    );
}

#[test]
fn non_sm2_keys_are_refused_or_converted() {
    // ECDSA P-256: refused, naming the curve.
    let p256 = EcKey::generate(&EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap()).unwrap();
    let p256 = PKey::from_ec_key(p256).unwrap();
    let err = Sm2Key::from_pkcs8_der(&p256.private_key_to_pkcs8().unwrap()).unwrap_err();
    assert!(
        matches!(err, SmError::NotSm2Key { ref found, .. } if found.contains("prime256v1")),
        "{err}"
    );
    // An EC key built by hand on the SM2 curve is the trap: as an EC key it signs ECDSA. Either it is converted
    // to an SM2 key (and then signs SM2, checked here with the CLI) or refused.
    let ec = EcKey::generate(&EcGroup::from_curve_name(Nid::SM2).unwrap()).unwrap();
    let ec = PKey::from_ec_key(ec).unwrap();
    match Sm2Key::from_pkey(ec, "hand-built key") {
        Ok(key) => {
            assert!(ffi::is_sm2(key.pkey()));
            let sig = key.sign(b"m").unwrap();
            verify(&key.public_key_der().unwrap(), b"m", &sig).unwrap();
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("msg"), b"m").unwrap();
            std::fs::write(dir.path().join("sig"), &sig).unwrap();
            std::fs::write(dir.path().join("pub.pem"), key.public_key_pem().unwrap()).unwrap();
            cli_ok(
                dir.path(),
                &[
                    "pkeyutl", "-verify", "-rawin", "-digest", "sm3", "-pubin", "-inkey", "pub.pem", "-in",
                    "msg", "-sigfile", "sig", "-pkeyopt", DISTID,
                ],
            );
        }
        Err(err) => assert!(matches!(err, SmError::NotSm2Key { .. }), "{err}"),
    }
    // A P-256 public key is not an SM2 public key.
    assert!(matches!(
        verify(&p256.public_key_to_der().unwrap(), b"m", b"sig"),
        Err(SmError::BadPublicKey { .. })
    ));
    // A point that is not on the curve.
    let mut point = generate().unwrap().public_key_point().unwrap();
    point[64] ^= 1;
    assert!(matches!(
        verify(&point, b"m", b"sig"),
        Err(SmError::BadPublicKey { .. })
    ));
}

fn name(cn: &str) -> X509Name {
    let mut b = X509NameBuilder::new().unwrap();
    b.append_entry_by_text("CN", cn).unwrap();
    b.build()
}

/// A certificate for `subject_key`, issued under `issuer_name` and signed by `issuer_key`.
fn cert(subject: &str, subject_key: &Sm2Key, issuer: &str, issuer_key: &Sm2Key, ca: bool) -> X509 {
    let mut b = X509::builder().unwrap();
    b.set_version(2).unwrap();
    b.set_serial_number(&BigNum::from_u32(7).unwrap().to_asn1_integer().unwrap())
        .unwrap();
    b.set_subject_name(&name(subject)).unwrap();
    b.set_issuer_name(&name(issuer)).unwrap();
    b.set_pubkey(subject_key.pkey()).unwrap();
    b.set_not_before(&Asn1Time::days_from_now(0).unwrap()).unwrap();
    b.set_not_after(&Asn1Time::days_from_now(1).unwrap()).unwrap();
    if ca {
        b.append_extension(BasicConstraints::new().critical().ca().build().unwrap())
            .unwrap();
        b.append_extension(
            KeyUsage::new()
                .critical()
                .key_cert_sign()
                .crl_sign()
                .build()
                .unwrap(),
        )
        .unwrap();
    } else {
        b.append_extension(BasicConstraints::new().critical().build().unwrap())
            .unwrap();
        b.append_extension(KeyUsage::new().critical().digital_signature().build().unwrap())
            .unwrap();
    }
    sign_x509(b, issuer_key).unwrap()
}

/// Our certificates pass `openssl verify` with the standard ID (and fail without it), and `verify_x509`.
#[test]
fn certificates_verify_with_openssl_cli_and_verify_x509() {
    let dir = tempfile::tempdir().unwrap();
    let ca_key = generate().unwrap();
    let leaf_key = generate().unwrap();
    let ca = cert("Trustline SM2 CA", &ca_key, "Trustline SM2 CA", &ca_key, true);
    let leaf = cert("leaf", &leaf_key, "Trustline SM2 CA", &ca_key, false);
    std::fs::write(dir.path().join("ca.pem"), ca.to_pem().unwrap()).unwrap();
    std::fs::write(dir.path().join("leaf.pem"), leaf.to_pem().unwrap()).unwrap();
    let out = cli_ok(
        dir.path(),
        &["verify", "-vfyopt", DISTID, "-CAfile", "ca.pem", "leaf.pem"],
    );
    assert!(out.contains("leaf.pem: OK"), "{out}");
    let (ok, out) = cli(dir.path(), &["verify", "-CAfile", "ca.pem", "leaf.pem"]);
    assert!(!ok, "verification with the empty ID must fail: {out}");

    verify_x509(&leaf, &ca_key.public_key_der().unwrap()).unwrap();
    verify_x509(&ca, &ca_key.public_key_point().unwrap()).unwrap();
    assert!(verify_x509(&leaf, &leaf_key.public_key_der().unwrap()).is_err());

    // The algorithm identifiers OpenSSL wrote: SM2-with-SM3 without parameters.
    let der = leaf.to_der().unwrap();
    let signed = crate::der::split_signed(&der).unwrap();
    assert_eq!(signed.algorithm, crate::der::OID_SM2_WITH_SM3);
}

/// A certificate the CLI signs with `-sigopt distid:…` passes `verify_x509`; one signed with the CLI's default
/// empty ID is refused.
#[test]
fn openssl_cli_certificates_and_empty_id_refusal() {
    let dir = tempfile::tempdir().unwrap();
    cli_ok(dir.path(), &["genpkey", "-algorithm", "SM2", "-out", "ca.key"]);
    for (out, extra) in [("std.pem", &["-sigopt", DISTID][..]), ("empty.pem", &[][..])] {
        cli_ok(
            dir.path(),
            &[
                &[
                    "req",
                    "-x509",
                    "-new",
                    "-key",
                    "ca.key",
                    "-sm3",
                    "-subj",
                    "/CN=cli CA",
                    "-days",
                    "1",
                    "-out",
                    out,
                ][..],
                extra,
            ]
            .concat(),
        );
    }
    let ca_key = Sm2Key::from_pem(&std::fs::read(dir.path().join("ca.key")).unwrap()).unwrap();
    let spki = ca_key.public_key_der().unwrap();
    let std_cert = X509::from_pem(&std::fs::read(dir.path().join("std.pem")).unwrap()).unwrap();
    verify_x509(&std_cert, &spki).unwrap();
    let empty_cert = X509::from_pem(&std::fs::read(dir.path().join("empty.pem")).unwrap()).unwrap();
    assert!(matches!(
        verify_x509(&empty_cert, &spki),
        Err(SmError::BadSignature { .. })
    ));
}

/// CSRs: ours pass `openssl req -verify` with the standard ID and `verify_x509_req`; the CLI's pass ours.
#[test]
fn csrs_verify_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let key = generate().unwrap();
    let mut b = X509Req::builder().unwrap();
    b.set_version(0).unwrap();
    b.set_subject_name(&name("workload")).unwrap();
    b.set_pubkey(key.pkey()).unwrap();
    let req = sign_x509_req(b, &key).unwrap();
    verify_x509_req(&req).unwrap();
    std::fs::write(dir.path().join("req.pem"), req.to_pem().unwrap()).unwrap();
    let out = cli_ok(
        dir.path(),
        &["req", "-verify", "-vfyopt", DISTID, "-in", "req.pem", "-noout"],
    );
    // `openssl req -verify` (3.0) exits 0 either way: read its verdict.
    assert!(out.contains("self-signature verify OK"), "{out}");
    let (_, out) = cli(dir.path(), &["req", "-verify", "-in", "req.pem", "-noout"]);
    assert!(
        out.contains("self-signature verify failure"),
        "empty-ID CSR verification must fail: {out}"
    );

    cli_ok(dir.path(), &["genpkey", "-algorithm", "SM2", "-out", "k.pem"]);
    let base = ["req", "-new", "-key", "k.pem", "-sm3", "-subj", "/CN=cli"];
    cli_ok(
        dir.path(),
        &[&base[..], &["-sigopt", DISTID, "-out", "std.csr"]].concat(),
    );
    cli_ok(dir.path(), &[&base[..], &["-out", "empty.csr"]].concat());
    let std_req = X509Req::from_pem(&std::fs::read(dir.path().join("std.csr")).unwrap()).unwrap();
    verify_x509_req(&std_req).unwrap();
    let empty_req = X509Req::from_pem(&std::fs::read(dir.path().join("empty.csr")).unwrap()).unwrap();
    assert!(verify_x509_req(&empty_req).is_err());
}
