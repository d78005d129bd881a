//! Fixtures the targets share: a trust domain with a CA, built once per process.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::OnceLock;

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose, SanType};
use trustline_identity::spiffe_id::TrustDomain;
use trustline_identity::tls::TrustBundle;

/// A CA certificate (DER) and its key, for `spiffe://example.org`.
pub struct Td {
    pub ca_der: Vec<u8>,
    pub issuer: rcgen::Issuer<'static, KeyPair>,
    pub leaf_key: KeyPair,
}

pub fn td() -> &'static Td {
    static TD: OnceLock<Td> = OnceLock::new();
    TD.get_or_init(|| {
        let key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        ca.subject_alt_names
            .push(SanType::URI("spiffe://example.org".try_into().unwrap()));
        let cert = ca.self_signed(&key).unwrap();
        Td {
            ca_der: cert.der().to_vec(),
            issuer: rcgen::Issuer::new(ca, key),
            leaf_key: KeyPair::generate().unwrap(),
        }
    })
}

pub fn bundle() -> TrustBundle {
    TrustBundle::new(TrustDomain::new("example.org").unwrap(), &[td().ca_der.clone()]).unwrap()
}

/// Splits the input at the first `sep` byte (or at the end).
pub fn split(data: &[u8], sep: u8) -> (&[u8], &[u8]) {
    match data.iter().position(|b| *b == sep) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[]),
    }
}
