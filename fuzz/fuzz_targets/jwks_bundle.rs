//! SPIFFE trust bundles in their JWK-set form (from the CA, a federated domain, or a file).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(set) = trustline_identity::bundle::JwkSet::parse(data) {
        let _ = set.x509_authorities();
        for k in set.jwt_keys() {
            let _ = format!("{k:?}");
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = trustline_identity::bundle::certs_from_pem(text);
    }
});
