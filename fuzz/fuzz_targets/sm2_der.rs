//! SM2 public keys and DER signatures (SM2-with-SM3) as a peer presents them, through OpenSSL.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let (key, rest) = common::split(data, 0xff);
    let (sig, msg) = common::split(rest, 0xff);
    let _ = trustline_sm::sm2::public_key_from_bytes(key);
    let _ = trustline_sm::sm2::verify(key, msg, sig);
    let _ = trustline_sm::sm2::verify_tls13(key, msg, sig);
    if let Ok(req) = trustline_sm::openssl::x509::X509Req::from_der(data) {
        let _ = trustline_sm::sm2::verify_x509_req(&req);
    }
});
