//! Peers that must not get through: each bad certificate is refused at the inbound sidecar's handshake, and the
//! refusal reason shows in `trustline_sidecar_tls_handshakes_total{outcome=...}` and in the log.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose, SanType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trustline_identity::spiffe_id::{SpiffeId, TrustDomain};
use trustline_identity::tls::{client_config, ExpectedPeer, RotatingCert, SpiffeServerVerifier, TrustBundle};
use trustline_tests::mesh::{echo_app, Mesh, TD};
use trustline_tests::{eventually, PATIENCE};

/// A leaf with the given URI SANs, as an X.509-SVID would be (digitalSignature, not a CA).
fn leaf_params(uris: &[&str]) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    for u in uris {
        p.subject_alt_names.push(SanType::URI((*u).try_into().unwrap()));
    }
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.is_ca = IsCa::ExplicitNoCa;
    p
}

/// A CA of another trust domain signing leaves with `uris`.
fn foreign(uris: &[&str]) -> (Vec<Vec<u8>>, Vec<u8>) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.subject_alt_names
        .push(SanType::URI("spiffe://other.org".try_into().unwrap()));
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let leaf = leaf_params(uris).signed_by(&key, &issuer).unwrap();
    (
        vec![leaf.der().to_vec(), ca_cert.der().to_vec()],
        key.serialize_der(),
    )
}

/// Connects with `cert` (or none) and tries one request; returns whether the request got an HTTP answer.
async fn attempt(
    addr: std::net::SocketAddr,
    roots: &[Vec<u8>],
    cert: Option<(Vec<Vec<u8>>, Vec<u8>)>,
) -> bool {
    let bundle = TrustBundle::new(TrustDomain::new("example.org").unwrap(), roots).unwrap();
    let verifier = Arc::new(SpiffeServerVerifier::new(
        bundle,
        ExpectedPeer::OneOf(vec![SpiffeId::new(format!("{TD}/api")).unwrap()]),
    ));
    let rc = cert.map(|(chain, key)| {
        let rc = Arc::new(RotatingCert::default());
        rc.set(chain, &key).unwrap();
        rc
    });
    let mut cfg = client_config(verifier, rc).unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("api").unwrap();
    let Ok(mut tls) = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
    else {
        return false;
    };
    // TLS 1.3: the server checks our certificate after our Finished, so the refusal arrives on first read.
    if tls
        .write_all(b"GET / HTTP/1.1\r\nhost: api\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(PATIENCE, tls.read(&mut buf)).await,
        Ok(Ok(n)) if n > 0 && buf.starts_with(b"HTTP/1.1")
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_peer_certificates_are_refused_at_the_handshake_with_their_reason() {
    let mesh = Mesh::start("");
    let app = echo_app().await;
    let api = mesh.sidecar(
        "api",
        &format!("[[inbound]]\nlisten = \"127.0.0.1:0\"\napp = \"{app}\"\n"),
        &[],
    );
    let addr = api.inbound[0];
    let roots = mesh.ca.bundle_roots();

    // Control: a valid SVID of the trust domain gets an answer.
    let dir = mesh.tmp.path().join("minted");
    let mint = |ttl: &str, out: &str| {
        let (key, svid, _, _) =
            trustline_tests::mint_svid(&mesh.ca, &dir.join(out), &format!("{TD}/client"), ttl);
        let chain =
            trustline_identity::bundle::certs_from_pem(&std::fs::read_to_string(svid).unwrap()).unwrap();
        (chain, key.serialize_der())
    };
    assert!(
        attempt(addr, &roots, Some(mint("1h", "good"))).await,
        "a valid SVID is admitted"
    );

    // Expired: a real SVID of this CA whose lifetime has run out.
    let short = mint("1s", "short");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(!attempt(addr, &roots, Some(short)).await);

    // Another trust domain's SVID.
    assert!(!attempt(addr, &roots, Some(foreign(&["spiffe://other.org/client"]))).await);

    // Self-signed, with our trust domain's ID.
    let k = KeyPair::generate().unwrap();
    let selfie = leaf_params(&[&format!("{TD}/client")]).self_signed(&k).unwrap();
    assert!(
        !attempt(
            addr,
            &roots,
            Some((vec![selfie.der().to_vec()], k.serialize_der()))
        )
        .await
    );

    // Two URI SANs.
    assert!(
        !attempt(
            addr,
            &roots,
            Some(foreign(&[&format!("{TD}/client"), &format!("{TD}/other")]))
        )
        .await
    );

    // No certificate at all.
    assert!(!attempt(addr, &roots, None).await);

    for reason in [
        "expired",
        "foreign_trust_domain",
        "self_signed",
        "bad_svid",
        "no_certificate",
    ] {
        let n = eventually(PATIENCE, reason, || async {
            let n = api
                .metric(
                    "trustline_sidecar_tls_handshakes_total",
                    &[("direction", "inbound"), ("outcome", reason)],
                )
                .await;
            (n >= 1.0).then_some(n)
        })
        .await;
        assert_eq!(n, 1.0, "{reason}");
        assert!(api.logged(&format!("reason=\"{reason}\"")), "{reason} logged");
    }
    assert!(api.logged("exactly one URI SAN"), "the log says which rule broke");
    assert_eq!(
        api.metric(
            "trustline_sidecar_tls_handshakes_total",
            &[("direction", "inbound"), ("outcome", "ok")]
        )
        .await,
        1.0
    );
    assert_eq!(
        api.metric("trustline_sidecar_requests_total", &[]).await,
        1.0,
        "only the valid peer's request reached policy"
    );
}
