//! What one request costs before it is forwarded: the canonical-target checks (`sidecar::canon`: one host, the
//! path normalized) beside the policy evaluation they feed, with the local mesh's policies (an ALLOW by
//! principal and path, a DENY by path prefix).
//!
//! Run: `cargo bench -p trustline-sidecar --bench admit` (knob: `TRUSTLINE_BENCH_ITERS`, default 2,000,000).
//! Prints nanoseconds per request for each step, the median of five rounds.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::Instant;

use http::{HeaderMap, HeaderValue, Uri};
use trustline_sidecar::canon::{canonicalize_uri, check_host, PathMode};
use trustline_sidecar::policy::{PolicySet, Request};

const ALLOW: &str = "name: web-reads-api\naction: ALLOW\nrules:\n  - from:\n      - source:\n          principals: [\"spiffe://example.org/web\"]\n    to:\n      - operation:\n          methods: [GET, POST]\n          paths: [\"/api/*\"]\n";
const DENY: &str =
    "name: no-admin\naction: DENY\nrules:\n  - to:\n      - operation:\n          paths: [\"/api/admin*\"]\n";

fn median_ns(iters: u64, mut f: impl FnMut(u64)) -> f64 {
    let mut rounds: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            for i in 0..iters {
                f(i);
            }
            t.elapsed().as_nanos() as f64 / iters as f64
        })
        .collect();
    rounds.sort_by(f64::total_cmp);
    rounds[2]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let iters: u64 = std::env::var("TRUSTLINE_BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000_000);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("10-allow.yaml"), ALLOW).unwrap();
    std::fs::write(dir.path().join("20-no-admin.yaml"), DENY).unwrap();
    let set = PolicySet::load_dir(dir.path()).unwrap();
    let mut headers = HeaderMap::new();
    headers.insert(http::header::HOST, HeaderValue::from_static("api"));
    let request = |path: &str| Request {
        principal: Some("spiffe://example.org/web".into()),
        method: "GET".into(),
        path: path.into(),
        host: "api".into(),
        port: Some(8080),
        ..Default::default()
    };

    println!("per request, median of 5 rounds of {iters}:");
    for (label, target) in [
        ("canonical path", "/api/orders/12345/items?expand=true"),
        (
            "non-canonical path (rewritten)",
            "/api//orders/./12345/%69tems?expand=true",
        ),
    ] {
        let uri: Uri = target.parse().unwrap();
        let canon = median_ns(iters, |_| {
            let mut u = black_box(uri.clone());
            check_host(&u, &headers).unwrap();
            black_box(canonicalize_uri(&mut u, PathMode::Normalize).unwrap());
        });
        let clone_only = median_ns(iters, |_| {
            black_box(black_box(uri.clone()));
        });
        let r = request(uri.path());
        let policy = median_ns(iters, |_| {
            black_box(set.evaluate(black_box(&r)));
        });
        println!(
            "  {label:32} canonical target {:6.1} ns   policy evaluation {:6.1} ns   (uri clone alone {:5.1} ns)",
            canon - clone_only,
            policy,
            clone_only
        );
    }
}
