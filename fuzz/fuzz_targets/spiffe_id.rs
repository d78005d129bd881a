//! SPIFFE IDs and trust domains: our parser against the `spiffe` crate's (differential). Ours may be stricter,
//! never looser, and what it accepts round-trips unchanged.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(id) = trustline_identity::spiffe_id::parse_spiffe_id("id", s) {
        let theirs = spiffe::SpiffeId::new(s).expect("accepted by us, refused by the spiffe crate");
        assert_eq!(id.to_string(), theirs.to_string());
        assert_eq!(id.to_string(), s, "accepted IDs are canonical");
        let td = id.trust_domain().clone();
        let _ = trustline_identity::spiffe_id::parse_workload_id("id", s, &td);
        let _ = trustline_identity::spiffe_id::parse_agent_id("id", s, &td);
    }
    if let Ok(td) = trustline_identity::spiffe_id::parse_trust_domain("td", s) {
        spiffe::TrustDomain::new(s).expect("trust domain accepted by us, refused by the spiffe crate");
        let _ = td.to_string();
    }
});
