//! The `trustline-caller-chain` header, as any peer with an SVID can send it to an inbound sidecar.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = std::str::from_utf8(data) else { return };
    let limits = trustline_sidecar::chain::Limits {
        max_hops: 16,
        max_bytes: 16 * 1024,
        max_age: std::time::Duration::from_secs(30),
        skew: std::time::Duration::from_secs(5),
        verify_peer_signature: true,
    };
    let _ = trustline_sidecar::chain::verify(
        value,
        &common::bundle(),
        "spiffe://example.org/web",
        "spiffe://example.org/api",
        &limits,
    );
    let _ = trustline_sidecar::chain::callers_unverified(value);
});
