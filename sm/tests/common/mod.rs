//! Test PKI: an SM2 CA and SM2 leaf certificates made with this crate's `sm2` module and OpenSSL's X509Builder,
//! and rustls configs over the SM provider. Shared by the integration tests and the bench.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::x509::extension::{BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName};
use openssl::x509::{X509Name, X509NameBuilder, X509};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use trustline_sm::sm2::{self, Sm2Key};

/// An SM2 CA.
pub struct Ca {
    pub cert: X509,
    pub key: Sm2Key,
}

/// An SM2 leaf: certificate, key, and the PEM files other tools want.
pub struct Leaf {
    pub cert: X509,
    pub key: Sm2Key,
}

impl Leaf {
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        vec![CertificateDer::from(self.cert.to_der().unwrap())]
    }

    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.to_pkcs8_der().unwrap()))
    }
}

fn name(cn: &str) -> X509Name {
    let mut b = X509NameBuilder::new().unwrap();
    b.append_entry_by_text("O", "Trustline SM test").unwrap();
    b.append_entry_by_text("CN", cn).unwrap();
    b.build()
}

fn serial() -> openssl::asn1::Asn1Integer {
    let mut bn = BigNum::new().unwrap();
    bn.rand(120, MsbOption::MAYBE_ZERO, false).unwrap();
    bn.set_bit(119).unwrap();
    bn.to_asn1_integer().unwrap()
}

impl Ca {
    pub fn new(cn: &str) -> Ca {
        let key = sm2::generate().unwrap();
        let mut b = X509::builder().unwrap();
        b.set_version(2).unwrap();
        b.set_serial_number(&serial()).unwrap();
        b.set_subject_name(&name(cn)).unwrap();
        b.set_issuer_name(&name(cn)).unwrap();
        b.set_pubkey(key.pkey()).unwrap();
        b.set_not_before(&Asn1Time::days_from_now(0).unwrap()).unwrap();
        b.set_not_after(&Asn1Time::days_from_now(2).unwrap()).unwrap();
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
        let cert = sm2::sign_x509(b, &key).unwrap();
        Ca { cert, key }
    }

    /// A leaf for `localhost` / 127.0.0.1, usable as server and client certificate.
    pub fn issue(&self, cn: &str) -> Leaf {
        let key = sm2::generate().unwrap();
        let mut b = X509::builder().unwrap();
        b.set_version(2).unwrap();
        b.set_serial_number(&serial()).unwrap();
        b.set_subject_name(&name(cn)).unwrap();
        b.set_issuer_name(self.cert.subject_name()).unwrap();
        b.set_pubkey(key.pkey()).unwrap();
        b.set_not_before(&Asn1Time::days_from_now(0).unwrap()).unwrap();
        b.set_not_after(&Asn1Time::days_from_now(1).unwrap()).unwrap();
        b.append_extension(BasicConstraints::new().critical().build().unwrap())
            .unwrap();
        b.append_extension(KeyUsage::new().critical().digital_signature().build().unwrap())
            .unwrap();
        b.append_extension(
            ExtendedKeyUsage::new()
                .server_auth()
                .client_auth()
                .build()
                .unwrap(),
        )
        .unwrap();
        let san = SubjectAlternativeName::new()
            .dns("localhost")
            .ip(&IpAddr::V4(Ipv4Addr::LOCALHOST).to_string())
            .build(&b.x509v3_context(Some(&self.cert), None))
            .unwrap();
        b.append_extension(san).unwrap();
        let cert = sm2::sign_x509(b, &self.key).unwrap();
        Leaf { cert, key }
    }

    pub fn roots(&self) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from(self.cert.to_der().unwrap()))
            .unwrap();
        Arc::new(roots)
    }
}

/// A TLS 1.3 SM server config requiring a client certificate from `ca`.
pub fn sm_server_config(ca: &Ca, leaf: &Leaf) -> Arc<ServerConfig> {
    let provider = Arc::new(trustline_sm::tls::provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(ca.roots(), provider.clone())
        .build()
        .unwrap();
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(leaf.chain(), leaf.key_der())
        .unwrap();
    Arc::new(config)
}

/// A TLS 1.3 SM client config trusting `ca` and presenting `leaf`.
pub fn sm_client_config(ca: &Ca, leaf: &Leaf) -> Arc<ClientConfig> {
    let config = ClientConfig::builder_with_provider(Arc::new(trustline_sm::tls::provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(ca.roots())
        .with_client_auth_cert(leaf.chain(), leaf.key_der())
        .unwrap();
    Arc::new(config)
}
