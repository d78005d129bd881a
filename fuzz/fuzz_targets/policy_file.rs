//! Authorization policy files (YAML, Istio semantics), then an evaluation with what was accepted.
#![no_main]
use libfuzzer_sys::fuzz_target;
use trustline_sidecar::policy::{PolicySet, Request};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(p) = PolicySet::parse_file(std::path::Path::new("fuzz.yaml"), text) else { return };
    let mut set = PolicySet::default();
    set.policies.push((std::path::PathBuf::from("fuzz.yaml"), p));
    let r = Request {
        principal: Some("spiffe://example.org/web".into()),
        method: "GET".into(),
        path: "/api/hello".into(),
        host: "api".into(),
        port: Some(8080),
        headers: vec![("x-env".into(), "prod".into())],
        chain: vec!["spiffe://example.org/web".into()],
        ..Default::default()
    };
    let d = set.evaluate(&r);
    let (e, _) = set.explain(&r);
    assert_eq!(d, e, "evaluate and explain agree");
});
