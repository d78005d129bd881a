//! PKCS#10 CSRs through the CA's checks (signature, SANs, no CA request), as an agent sends them.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = trustline_ca::x509::check_csr(data, "spiffe://example.org/workload", &["svc.example.org".to_owned()]);
    if let Ok(csr) = trustline_ca::x509::parse_csr(data) {
        let _ = trustline_ca::x509::csr_uri_sans(&csr);
        let _ = trustline_ca::x509::check_csr_sans(&csr, "spiffe://example.org/workload", &[]);
    }
});
