//! An SM-mode trust domain (`keys.backend = "sm2"`): the CA's certificates and the X.509-SVIDs it issues are SM2
//! keys signed SM2-with-SM3 with the distinguishing ID `1234567812345678`, checked by an independent tool (Debian's
//! `openssl` command line); CSRs are made by that tool too; JWT-SVIDs stay ES256 (JOSE has no SM2 algorithm).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use trustline_tests::{default_config, Ca};

const ID: &str = "1234567812345678";

fn openssl(args: &[&str], dir: &Path) -> std::process::Output {
    Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

fn openssl_ok(args: &[&str], dir: &Path) -> String {
    let out = openssl(args, dir);
    assert!(
        out.status.success(),
        "openssl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An SM2 key and a DER CSR for `spiffe://example.org/<name>`, both made by the openssl CLI, signed with the
/// standard ID.
fn sm2_csr(dir: &Path, name: &str) -> std::path::PathBuf {
    let key = format!("{name}.key");
    openssl_ok(&["genpkey", "-algorithm", "SM2", "-out", &key], dir);
    let csr = format!("{name}.csr");
    openssl_ok(
        &[
            "req",
            "-new",
            "-key",
            &key,
            "-sm3",
            "-sigopt",
            &format!("distid:{ID}"),
            "-subj",
            "/O=sm-test",
            "-addext",
            &format!("subjectAltName=URI:spiffe://example.org/{name}"),
            "-outform",
            "DER",
            "-out",
            &csr,
        ],
        dir,
    );
    dir.join(csr)
}

fn mint(ca: &Ca, csr: &Path, name: &str, out: &Path) -> std::process::Output {
    ca.cli(&[
        "x509",
        "mint",
        "--csr",
        csr.to_str().unwrap(),
        "--spiffe-id",
        &format!("spiffe://example.org/{name}"),
        "--write",
        out.to_str().unwrap(),
    ])
}

#[test]
fn an_sm_mode_ca_issues_sm2_svids_that_openssl_verifies() {
    if !trustline_hsm::SM_SUPPORTED {
        println!("skipped: build with --features trustline-hsm/sm (scripts/test.sh does)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    let cfg = default_config(&dir).replace("[keys]\n", "[keys]\nbackend = \"sm2\"\n");
    let ca = Ca::start_with(&dir, &cfg);
    let work = tmp.path();

    // The bundle root is an SM2 certificate, self-signed SM2-with-SM3.
    std::fs::write(
        work.join("bundle.pem"),
        ca.cli_ok(&["bundle", "show", "--format", "pem"]),
    )
    .unwrap();
    let text = openssl_ok(&["x509", "-in", "bundle.pem", "-noout", "-text"], work);
    assert!(text.contains("Signature Algorithm: SM2-with-SM3"), "{text}");
    assert!(text.contains("ASN1 OID: SM2"), "{text}");
    // `openssl verify` does not apply -vfyopt to a root's self-signature: check it with pkeyutl over the TBS.
    let root = trustline_identity::bundle::certs_from_pem(
        &std::fs::read_to_string(work.join("bundle.pem")).unwrap(),
    )
    .unwrap()
    .remove(0);
    let (_, parsed) = x509_parser::parse_x509_certificate(&root).unwrap();
    std::fs::write(work.join("root.tbs"), parsed.tbs_certificate.as_ref()).unwrap();
    std::fs::write(work.join("root.sig"), parsed.signature_value.data.as_ref()).unwrap();
    openssl_ok(
        &[
            "x509",
            "-in",
            "bundle.pem",
            "-pubkey",
            "-noout",
            "-out",
            "root.pub",
        ],
        work,
    );
    let pkeyutl = |id: Option<&str>| {
        let mut args = vec![
            "pkeyutl", "-verify", "-rawin", "-digest", "sm3", "-pubin", "-inkey", "root.pub", "-in",
            "root.tbs", "-sigfile", "root.sig",
        ];
        let opt = id.map(|i| format!("distid:{i}"));
        if let Some(o) = &opt {
            args.extend(["-pkeyopt", o.as_str()]);
        }
        openssl(&args, work).status.success()
    };
    assert!(
        pkeyutl(Some(ID)),
        "the root's self-signature must verify with ID {ID}"
    );
    assert!(!pkeyutl(None), "and not with openssl's default (empty) ID");

    // An SVID from an SM2 CSR made by openssl: openssl verifies it with the standard ID, and only with it.
    let csr = sm2_csr(work, "web");
    let out = work.join("web-svid");
    let o = mint(&ca, &csr, "web", &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let svid = out.join("svid.pem");
    let svid = svid.to_str().unwrap();
    let text = openssl_ok(&["x509", "-in", svid, "-noout", "-text"], work);
    assert!(text.contains("Signature Algorithm: SM2-with-SM3"), "{text}");
    assert!(text.contains("ASN1 OID: SM2"), "{text}");
    assert!(text.contains("URI:spiffe://example.org/web"), "{text}");
    assert!(text.contains("CA:FALSE"), "{text}");
    let ok = openssl_ok(
        &[
            "verify",
            "-vfyopt",
            &format!("distid:{ID}"),
            "-CAfile",
            "bundle.pem",
            svid,
        ],
        work,
    );
    assert!(ok.contains(": OK"), "{ok}");
    let wrong_id = openssl(&["verify", "-CAfile", "bundle.pem", svid], work);
    assert!(
        !wrong_id.status.success(),
        "an empty ID must not verify: the signature is bound to 1234567812345678"
    );
    // It is an X.509-SVID by the SPIFFE rules (the same checks as for classic SVIDs).
    let chain = trustline_identity::bundle::certs_from_pem(&std::fs::read_to_string(svid).unwrap()).unwrap();
    assert_eq!(
        trustline_identity::tls::svid_leaf_id(&chain[0])
            .unwrap()
            .to_string(),
        "spiffe://example.org/web"
    );

    // A classic key has no place in an SM-mode trust domain, and the refusal says so.
    let (_, p256) = trustline_tests::csr(&["spiffe://example.org/p256"], &[]);
    std::fs::write(work.join("p256.der"), p256).unwrap();
    let o = mint(&ca, &work.join("p256.der"), "p256", &work.join("p256"));
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("must be SM2"), "{err}");
    // A CSR signed with the wrong ID (openssl's default, empty) is refused: its signature does not verify.
    openssl_ok(&["genpkey", "-algorithm", "SM2", "-out", "noid.key"], work);
    openssl_ok(
        &[
            "req",
            "-new",
            "-key",
            "noid.key",
            "-sm3",
            "-subj",
            "/O=x",
            "-addext",
            "subjectAltName=URI:spiffe://example.org/noid",
            "-outform",
            "DER",
            "-out",
            "noid.csr",
        ],
        work,
    );
    let o = mint(&ca, &work.join("noid.csr"), "noid", &work.join("noid"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("SM2 signature"), "{err}");

    // JWT-SVIDs stay ES256: JOSE registers no SM2 algorithm.
    let token = ca.cli_ok(&[
        "jwt",
        "mint",
        "--spiffe-id",
        "spiffe://example.org/web",
        "--audience",
        "pay",
    ]);
    let header = jsonwebtoken::decode_header(token.trim()).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::ES256);

    // A rotation makes a new SM2 CA key; SVIDs from it verify with openssl against the new bundle.
    ca.cli_ok(&["ca", "rotate"]);
    ca.cli_ok(&["ca", "rotate"]);
    std::fs::write(
        work.join("bundle2.pem"),
        ca.cli_ok(&["bundle", "show", "--format", "pem"]),
    )
    .unwrap();
    let csr = sm2_csr(work, "api");
    let out = work.join("api-svid");
    let o = mint(&ca, &csr, "api", &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ok = openssl_ok(
        &[
            "verify",
            "-vfyopt",
            &format!("distid:{ID}"),
            "-CAfile",
            "bundle2.pem",
            out.join("svid.pem").to_str().unwrap(),
        ],
        work,
    );
    assert!(ok.contains(": OK"), "{ok}");
}

/// A whole SM-mode mesh: the agent (SM2 agent key, SM TLS to the CA) serves SM2 SVIDs through the Workload API,
/// and two sidecars speak RFC 8998 TLS 1.3 to each other (curveSM2 key exchange, `TLS_SM4_GCM_SM3`, `sm2sig_sm3`)
/// with policy and a verified SM2-signed caller chain; an SM sidecar refuses a classic TLS client.
#[tokio::test(flavor = "multi_thread")]
async fn sidecars_of_an_sm_mode_trust_domain_speak_sm_tls() {
    use trustline_tests::mesh::{echo_app, request, Mesh, TD};
    if !trustline_hsm::SM_SUPPORTED {
        println!("skipped: build with --features trustline-hsm/sm (scripts/test.sh does)");
        return;
    }
    // default_config ends inside [keys]: this line joins that table.
    let mesh = Mesh::start("backend = \"sm2\"\n");
    let app = echo_app().await;
    let allow_web = format!(
        "name: web-only\naction: ALLOW\nrules:\n  - from:\n      - source:\n          principals: [\"{TD}/web\"]\n"
    );
    // api keeps its accountability log encrypted at rest with SM4-GCM.
    let log_dir = mesh.tmp.path().join("api-log");
    let log_key = mesh.tmp.path().join("log.key");
    std::fs::write(&log_key, [42u8; 16]).unwrap();
    std::fs::set_permissions(&log_key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let api = mesh.sidecar(
        "api",
        &format!(
            "[[inbound]]\nlisten = \"127.0.0.1:0\"\napp = \"{app}\"\n[log]\ndir = \"{}\"\nencryption_key_file = \"{}\"\n",
            log_dir.display(),
            log_key.display()
        ),
        &[("web-only.yaml", &allow_web)],
    );
    let web = mesh.sidecar(
        "web",
        &format!(
            "[[outbound]]\nlisten = \"127.0.0.1:0\"\n[[outbound.route]]\nhost = \"api\"\nupstream = \"{}\"\nspiffe_ids = [\"{TD}/api\"]\n",
            api.inbound[0]
        ),
        &[],
    );
    let r = request(web.outbound[0], "GET", "api", "/hello", &[], "")
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let seen = r.json();
    let xfcc = seen["headers"]["x-forwarded-client-cert"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(xfcc.contains(&format!("URI={TD}/web")), "{seen}");
    // The app got the verified caller chain, whose hop is signed sm2sig_sm3 by web's SVID key.
    assert!(seen["headers"]["trustline-caller-chain"].is_string(), "{seen}");
    for (side, dir) in [(&web, "outbound"), (&api, "inbound")] {
        let n = side
            .metric(
                "trustline_sidecar_tls_handshakes_total",
                &[("direction", dir), ("outcome", "ok"), ("group", "curveSM2")],
            )
            .await;
        assert!(n >= 1.0, "{dir}: {}", side.metrics_text().await);
    }

    // The record is on disk encrypted: verify needs no key, query needs it.
    let audit = |args: &[&str]| {
        Command::new(trustline_tests::bin("trustline-audit"))
            .args(args)
            .output()
            .unwrap()
    };
    let dir = log_dir.to_str().unwrap();
    let key = log_key.to_str().unwrap();
    let found = trustline_tests::eventually(trustline_tests::PATIENCE, "the encrypted record", || async {
        let o = audit(&["query", "--log-key", key, "--path", "/hello", dir]);
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        (o.status.success() && out.contains("spiffe://example.org/web")).then_some(out)
    })
    .await;
    assert!(found.contains("\"allow\""), "{found}");
    let o = audit(&["query", dir]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--log-key"), "{err}");
    let o = audit(&["verify", dir]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    for seg in std::fs::read_dir(&log_dir).unwrap() {
        let bytes = std::fs::read(seg.unwrap().path()).unwrap();
        assert!(!bytes.windows(6).any(|w| w == b"/hello"), "a record is in clear");
    }

    // A classic TLS 1.3 client (aws-lc, no SM algorithm) gets no handshake from an SM sidecar.
    let roots = mesh.ca.bundle_roots();
    let mut store = rustls::RootCertStore::empty();
    for r in &roots {
        let _ = store.add(rustls::pki_types::CertificateDer::from(r.clone()));
    }
    let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(store)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(api.inbound[0]).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("api").unwrap();
    let res = tokio::time::timeout(
        trustline_tests::PATIENCE,
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg)).connect(name, tcp),
    )
    .await
    .unwrap();
    assert!(res.is_err(), "a classic client must not get a handshake");
}

/// The opt-in SM2/SM3 JWT profile (`keys.jwt_key_type = "sm2"`): tokens with `alg` SM2SM3 validate against the
/// bundle (and refuse a wrong audience or a changed byte), and openssl checks the signature independently.
#[test]
fn the_opt_in_sm2_jwt_profile_signs_tokens_openssl_can_check() {
    use base64::Engine as _;
    if !trustline_hsm::SM_SUPPORTED {
        println!("skipped: build with --features trustline-hsm/sm (scripts/test.sh does)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    let cfg = default_config(&dir).replace("[keys]\n", "[keys]\nbackend = \"sm2\"\njwt_key_type = \"sm2\"\n");
    let ca = Ca::start_with(&dir, &cfg);
    let token = ca.cli_ok(&[
        "jwt",
        "mint",
        "--spiffe-id",
        "spiffe://example.org/web",
        "--audience",
        "pay",
    ]);
    let token = token.trim();
    let jwks = trustline_identity::bundle::JwkSet::parse(
        ca.cli_ok(&["bundle", "show", "--format", "jwks"]).as_bytes(),
    )
    .unwrap();
    let v = trustline_identity::jwt::validate(token, "pay", &jwks).unwrap();
    assert_eq!(v.spiffe_id.to_string(), "spiffe://example.org/web");
    assert!(trustline_identity::jwt::validate(token, "other", &jwks).is_err());
    let mut bad = token.to_owned().into_bytes();
    let i = bad.len() - 5;
    bad[i] = if bad[i] == b'A' { b'B' } else { b'A' };
    assert!(trustline_identity::jwt::validate(std::str::from_utf8(&bad).unwrap(), "pay", &jwks).is_err());

    // Independently: the JWK's point as an SM2 public key, the signature as DER, openssl pkeyutl with the ID.
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let parts: Vec<&str> = token.split('.').collect();
    let header: serde_json::Value = serde_json::from_slice(&b64.decode(parts[0]).unwrap()).unwrap();
    assert_eq!(header["alg"], "SM2SM3");
    let jwk = jwks
        .jwt_keys()
        .find(|k| k.kid.as_deref() == header["kid"].as_str())
        .unwrap();
    assert_eq!(jwk.crv.as_deref(), Some("SM2"));
    let mut spki = vec![
        0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x81,
        0x1c, 0xcf, 0x55, 0x01, 0x82, 0x2d, 0x03, 0x42, 0x00, 0x04,
    ];
    spki.extend(b64.decode(jwk.x.as_deref().unwrap()).unwrap());
    spki.extend(b64.decode(jwk.y.as_deref().unwrap()).unwrap());
    let work = tmp.path();
    std::fs::write(work.join("jwk.der"), &spki).unwrap();
    std::fs::write(work.join("input"), format!("{}.{}", parts[0], parts[1])).unwrap();
    let sig = b64.decode(parts[2]).unwrap();
    std::fs::write(work.join("sig"), trustline_hsm::ecdsa_fixed_to_der(&sig)).unwrap();
    let out = openssl_ok(
        &[
            "pkeyutl",
            "-verify",
            "-rawin",
            "-digest",
            "sm3",
            "-pubin",
            "-keyform",
            "DER",
            "-inkey",
            "jwk.der",
            "-in",
            "input",
            "-sigfile",
            "sig",
            "-pkeyopt",
            &format!("distid:{ID}"),
        ],
        work,
    );
    assert!(out.contains("Signature Verified Successfully"), "{out}");
}
