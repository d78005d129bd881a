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
//! Run: `cargo build --release --workspace --bins && cargo bench -p trustline-tests --bench sidecar`.
//! Everything (load, app, both sidecars, agent, CA) shares this machine's cores.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use trustline_tests::mesh::{Mesh, TD};

const ALLOW: &str = "name: bench-allow\naction: ALLOW\nrules:\n  - from:\n      - source:\n          principals: [\"spiffe://example.org/web\"]\n    to:\n      - operation:\n          methods: [\"GET\"]\n          paths: [\"/bench*\"]\n";
const DENY: &str = "name: bench-deny-admin\naction: DENY\nrules:\n  - to:\n      - operation:\n          paths: [\"/admin*\"]\n";
const REQ: &[u8] = b"GET /bench/item HTTP/1.1\r\nhost: api\r\n\r\n";

fn env_or<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d)
}

/// One request on a keep-alive connection; returns whether it got a 200.
fn request(r: &mut BufReader<TcpStream>) -> bool {
    r.get_mut().write_all(REQ).unwrap();
    let (mut len, mut ok) = (0usize, false);
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).unwrap() == 0 {
            return false;
        }
        if line.starts_with("HTTP/1.1 ") {
            ok = line.starts_with("HTTP/1.1 200");
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap();
        }
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).unwrap();
    ok
}

fn connect(addr: SocketAddr) -> BufReader<TcpStream> {
    let s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    BufReader::new(s)
}

struct Stats {
    lat: Vec<Duration>,
    errors: u64,
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)].as_secs_f64() * 1e6
}

/// Open loop: `rate` req/s for `secs` over `conns` connections.
fn open_loop(addr: SocketAddr, rate: u64, secs: u64, conns: usize) -> Stats {
    let per_conn = rate as f64 / conns as f64;
    let n_per_conn = (per_conn * secs as f64) as usize;
    let interval = Duration::from_secs_f64(1.0 / per_conn);
    let start = Instant::now() + Duration::from_millis(100);
    let handles: Vec<_> = (0..conns)
        .map(|c| {
            std::thread::spawn(move || {
                let mut r = connect(addr);
                let mut lat = Vec::with_capacity(n_per_conn);
                let mut errors = 0;
                // Spread the connections' timetables evenly over one interval.
                let offset = interval.mul_f64(c as f64 / conns as f64);
                let mut prev_done = start;
                for i in 0..n_per_conn {
                    let scheduled = start + offset + interval.mul_f64(i as f64);
                    let now = Instant::now();
                    if now < scheduled {
                        std::thread::sleep(scheduled - now);
                    }
                    // Timed from the schedule when the previous answer held this request up, else from the send
                    // (so the sleep's own wake-up delay is not counted).
                    let t0 = if prev_done > scheduled {
                        scheduled
                    } else {
                        Instant::now()
                    };
                    if !request(&mut r) {
                        errors += 1;
                    }
                    prev_done = Instant::now();
                    lat.push(prev_done - t0);
                }
                Stats { lat, errors }
            })
        })
        .collect();
    let mut all = Stats {
        lat: Vec::new(),
        errors: 0,
    };
    for h in handles {
        let s = h.join().unwrap();
        all.lat.extend(s.lat);
        all.errors += s.errors;
    }
    all.lat.sort();
    all
}

/// Closed loop: `conns` connections back to back for `secs`; returns (req/s, errors).
fn closed_loop(addr: SocketAddr, conns: usize, secs: u64) -> (f64, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let (count, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let handles: Vec<_> = (0..conns)
        .map(|_| {
            let (stop, count, errors) = (stop.clone(), count.clone(), errors.clone());
            std::thread::spawn(move || {
                let mut r = connect(addr);
                while !stop.load(Ordering::Relaxed) {
                    if request(&mut r) {
                        count.fetch_add(1, Ordering::Relaxed);
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().unwrap();
    }
    (
        count.load(Ordering::Relaxed) as f64 / t.elapsed().as_secs_f64(),
        errors.load(Ordering::Relaxed),
    )
}

/// A minimal app: `200 ok` with a small body, HTTP/1.1 keep-alive.
fn app(rt: &tokio::runtime::Runtime) -> SocketAddr {
    rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = l.accept().await {
                let _ = tcp.set_nodelay(true);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from_static(b"{\"ok\":true}"),
                        )))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        a
    })
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
    let app = app(&rt);
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
    closed_loop(app, 4, 1);
    closed_loop(via, 4, 1);
    closed_loop(via_log, 4, 1);

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
        let d = open_loop(app, rate, secs, conns);
        let s = open_loop(via, rate, secs, conns);
        let l = open_loop(via_log, rate, secs, conns);
        for (name, st) in [("direct", &d), ("sidecars", &s), ("+log", &l)] {
            println!(
                "{rate:>7}  {name:<8} {:>8.0} {:>8.0} {:>8.0} {:>8.0} {:>7}",
                pct(&st.lat, 0.50),
                pct(&st.lat, 0.90),
                pct(&st.lat, 0.99),
                pct(&st.lat, 1.0),
                st.errors
            );
        }
        println!(
            "{rate:>7}  added    p50 {:>6.0} µs   p99 {:>6.0} µs   (with the log: p50 {:>6.0} µs   p99 {:>6.0} µs)",
            pct(&s.lat, 0.50) - pct(&d.lat, 0.50),
            pct(&s.lat, 0.99) - pct(&d.lat, 0.99),
            pct(&l.lat, 0.50) - pct(&d.lat, 0.50),
            pct(&l.lat, 0.99) - pct(&d.lat, 0.99)
        );
    }
    let (d, de) = closed_loop(app, 32, secs);
    let (s, se) = closed_loop(via, 32, secs);
    let (l, le) = closed_loop(via_log, 32, secs);
    println!("max throughput, closed loop, 32 connections, {secs} s:");
    println!("  direct   {d:>9.0} req/s  errors {de}");
    println!("  sidecars {s:>9.0} req/s  errors {se}");
    println!("  +log     {l:>9.0} req/s  errors {le}");
    let denied = web.outbound[0];
    let mut r = connect(denied);
    r.get_mut()
        .write_all(b"GET /admin HTTP/1.1\r\nhost: api\r\n\r\n")
        .unwrap();
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.starts_with("HTTP/1.1 403"), "policy is on: {line}");
}
