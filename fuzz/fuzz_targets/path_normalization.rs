//! The sidecar's request-target checks: a path accepted comes out canonical and stable (normalizing it again
//! changes nothing, no dot segment, no double slash, no escaped slash), and host checks never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use trustline_sidecar::canon::{canonicalize_uri, check_host, normalize, PathMode};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(c) = normalize(s) {
        assert_eq!(normalize(&c).expect("canonical paths are accepted"), c, "{s:?}");
        if s != "*" {
            assert!(c.starts_with('/'));
            for bad in ["//", "/./", "/../", "\\", "%2f", "%2F", "%5c", "%5C"] {
                assert!(!c.contains(bad), "{s:?} -> {c:?}");
            }
            assert!(!c.ends_with("/.") && !c.ends_with("/.."), "{s:?} -> {c:?}");
        }
    }
    let (target, host) = s.split_once('\n').unwrap_or((s, "api"));
    if let Ok(mut uri) = target.parse::<http::Uri>() {
        let query = uri.query().map(str::to_owned);
        if canonicalize_uri(&mut uri, PathMode::Normalize).is_ok() {
            assert_eq!(uri.query().map(str::to_owned), query, "the query is never touched");
        }
        let mut h = http::HeaderMap::new();
        if let Ok(v) = http::HeaderValue::from_str(host) {
            h.append(http::header::HOST, v);
        }
        let _ = check_host(&uri, &h);
    }
});
