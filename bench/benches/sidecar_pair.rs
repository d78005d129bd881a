//! Added latency and throughput of a sidecar pair, policy on, without and with the accountability log:
//!
//! ```text
//! load --plaintext--> web sidecar (outbound) ==mTLS 1.3, X25519MLKEM768==> api sidecar (inbound, policy) --> app
//! ```
//!
//! against the direct path (load --plaintext--> app). Starts a real CA, agent and two sidecar processes on
//! loopback (the release binaries: run `cargo build --release --workspace --bins` first), an in-process app
//! answering a small fixed body, and then:
//! 1. open loop at fixed rates over keep-alive HTTP/1.1 connections: each connection has its own timetable, and a
//!    request held up by a slow previous answer is timed from its *scheduled* time (no coordinated omission);
//! 2. closed loop at 32 connections for the maximum throughput.
//!
//! Knobs: `TRUSTLINE_BENCH_RATES=1000,2000,5000`, `TRUSTLINE_BENCH_SECS=5`, `TRUSTLINE_BENCH_CONNS=16`.
//! Run: `cargo build --release --workspace --bins && cargo bench -p trustline-bench --bench sidecar_pair`.
//! Everything (load, app, both sidecars, agent, CA) shares this machine's cores.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use trustline_bench::load;
use trustline_tests::mesh::{Mesh, TD};

const ALLOW: &str = "name: bench-allow\naction: ALLOW\nrules:\n  - from:\n      - source:\n          principals: [\"spiffe://example.org/web\"]\n    to:\n      - operation:\n          methods: [\"GET\"]\n          paths: [\"/bench*\"]\n";
const DENY: &str = "name: bench-deny-admin\naction: DENY\nrules:\n  - to:\n      - operation:\n          paths: [\"/admin*\"]\n";

fn env_or<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` lists benches; nothing to list.
    }
    let rates: Vec<u64> = std::env::var("TRUSTLINE_BENCH_RATES")
        .unwrap_or_else(|_| "1000,2000,5000".into())
        .split(',')
        .filter_map(|r| r.trim().parse().ok())
        .collect();
    let secs = env_or("TRUSTLINE_BENCH_SECS", 5u64);
    let conns = env_or("TRUSTLINE_BENCH_CONNS", 16usize);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let app = load::backend(&rt);
    let mesh = Mesh::start("");
    // Two pairs: without and with the accountability log (both sidecars logging, fsync group commit).
    let pair = |suffix: &str, log: bool| {
        let log_cfg = |n: &str| {
            if log {
                format!(
                    "[log]\ndir = \"{}\"\n",
                    mesh.tmp.path().join(format!("log-{n}")).display()
                )
            } else {
                String::new()
            }
        };
        let (api_n, web_n) = (format!("api{suffix}"), format!("web{suffix}"));
        let allow = ALLOW.replace("spiffe://example.org/web", &format!("{TD}/{web_n}"));
        let api = mesh.sidecar(
            &api_n,
            &format!(
                "{}[[inbound]]\nlisten = \"127.0.0.1:0\"\napp = \"{app}\"\n",
                log_cfg(&api_n)
            ),
            &[("10-allow.yaml", allow.as_str()), ("20-deny.yaml", DENY)],
        );
        let web = mesh.sidecar(
            &web_n,
            &format!(
                "{}[[outbound]]\nlisten = \"127.0.0.1:0\"\n[[outbound.route]]\nhost = \"api\"\nupstream = \"{}\"\nspiffe_ids = [\"{TD}/{api_n}\"]\n",
                log_cfg(&web_n),
                api.inbound[0]
            ),
            &[],
        );
        (api, web)
    };
    let (_api, web) = pair("", false);
    let (_api_l, web_l) = pair("-log", true);
    let via = web.outbound[0];
    let via_log = web_l.outbound[0];
    // Warm up every path (connections, pools, caches).
    load::closed_loop(app, 4, 1);
    load::closed_loop(via, 4, 1);
    load::closed_loop(via_log, 4, 1);

    println!(
        "sidecar pair (policy on: 1 ALLOW + 1 DENY), {} cores shared by load, app, both sidecars, agent and CA",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("open loop, {conns} keep-alive HTTP/1.1 connections, {secs} s per rate; latency in µs");
    println!(
        "{:>7}  {:<8} {:>8} {:>8} {:>8} {:>8} {:>7}",
        "rate", "path", "p50", "p90", "p99", "max", "errors"
    );
    for &rate in &rates {
        let d = load::open_loop(app, rate, secs, conns);
        let s = load::open_loop(via, rate, secs, conns);
        let l = load::open_loop(via_log, rate, secs, conns);
        for (name, st) in [("direct", &d), ("sidecars", &s), ("+log", &l)] {
            println!(
                "{rate:>7}  {name:<8} {:>8.0} {:>8.0} {:>8.0} {:>8.0} {:>7}",
                st.pct(0.50),
                st.pct(0.90),
                st.pct(0.99),
                st.pct(1.0),
                st.errors
            );
        }
        println!(
            "{rate:>7}  added    p50 {:>6.0} µs   p99 {:>6.0} µs   (with the log: p50 {:>6.0} µs   p99 {:>6.0} µs)",
            s.pct(0.50) - d.pct(0.50),
            s.pct(0.99) - d.pct(0.99),
            l.pct(0.50) - d.pct(0.50),
            l.pct(0.99) - d.pct(0.99)
        );
    }
    let (d, de) = load::closed_loop(app, 32, secs);
    let (s, se) = load::closed_loop(via, 32, secs);
    let (l, le) = load::closed_loop(via_log, 32, secs);
    println!("max throughput, closed loop, 32 connections, {secs} s:");
    println!("  direct   {d:>9.0} req/s  errors {de}");
    println!("  sidecars {s:>9.0} req/s  errors {se}");
    println!("  +log     {l:>9.0} req/s  errors {le}");
    let denied = web.outbound[0];
    let mut r = load::connect(denied);
    assert_eq!(load::request(&mut r, load::DENIED), 403, "policy is on");
}
