//! X.509-SVIDs as peers present them: the leaf's SPIFFE ID, and the chain against a bundle (as a client and as a
//! server certificate).
#![no_main]
use libfuzzer_sys::fuzz_target;
use rustls_pki_types::{CertificateDer, UnixTime};

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let _ = trustline_identity::tls::svid_leaf_id(data);
    let bundle = common::bundle();
    // One certificate, or a leaf and an intermediate split at the first 0xff.
    let (a, b) = common::split(data, 0xff);
    let (leaf, intermediates) = if b.is_empty() {
        (CertificateDer::from(data), Vec::new())
    } else {
        (CertificateDer::from(a), vec![CertificateDer::from(b)])
    };
    let now = UnixTime::now();
    let _ = bundle.verify_chain(&leaf, &intermediates, now, true);
    let _ = bundle.verify_chain(&leaf, &intermediates, now, false);
});
