//! Latency and throughput of cached JWT-SVIDs from the agent's HTTP API (`GET /v1/jwt-svid`) and from the gRPC
//! Workload API (`FetchJWTSVID`), workload
//! attestation included on every request (SO_PEERCRED + /proc + cached binary hash).
//!
//! Starts a real CA and a real agent in this process (loopback, temp dirs), registers this process's uid, then:
//! 1. closed loop at rising concurrency (N keep-alive connections, each sending as soon as the last answer came);
//! 2. open loop at fixed rates (requests scheduled on a clock, latency measured from the *scheduled* time, so a
//!    slow answer is not hidden by a late send: no coordinated omission).
//!
//! Run: `cargo bench -p trustline-identity-agent --bench http_jwt` (figures in docs/benchmarks.md).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const REQ: &[u8] = b"GET /v1/jwt-svid?audience=bench HTTP/1.1\r\nHost: agent\r\n\r\n";

fn request(reader: &mut BufReader<UnixStream>) {
    reader.get_mut().write_all(REQ).unwrap();
    let mut len = 0usize;
    let mut line = String::new();
    let mut status_ok = false;
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        if line.starts_with("HTTP/1.1 ") {
            status_ok = line.starts_with("HTTP/1.1 200");
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap();
        }
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).unwrap();
    assert!(status_ok, "{}", String::from_utf8_lossy(&body));
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn report(label: &str, mut lat: Vec<Duration>, wall: Duration) {
    lat.sort();
    println!(
        "{label:<34} {:>8.0} req/s   p50 {:>6.0} µs   p99 {:>6.0} µs   p99.9 {:>6.0} µs",
        lat.len() as f64 / wall.as_secs_f64(),
        pct(&lat, 0.50).as_secs_f64() * 1e6,
        pct(&lat, 0.99).as_secs_f64() * 1e6,
        pct(&lat, 0.999).as_secs_f64() * 1e6,
    );
}

fn closed_loop(sock: &Path, conns: usize, per_conn: usize) {
    let start = Instant::now();
    let handles: Vec<_> = (0..conns)
        .map(|_| {
            let sock = sock.to_owned();
            std::thread::spawn(move || {
                let mut r = BufReader::new(UnixStream::connect(sock).unwrap());
                let mut lat = Vec::with_capacity(per_conn);
                for _ in 0..per_conn {
                    let t = Instant::now();
                    request(&mut r);
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect();
    let lat: Vec<Duration> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
    report(
        &format!("closed loop, {conns} connection(s)"),
        lat,
        start.elapsed(),
    );
}

fn open_loop(sock: &Path, rate: u64, secs: u64, conns: u64) {
    let per_conn_interval = Duration::from_nanos(1_000_000_000 * conns / rate);
    let n = rate * secs / conns;
    let start = Instant::now() + Duration::from_millis(50);
    let handles: Vec<_> = (0..conns)
        .map(|c| {
            let sock = sock.to_owned();
            std::thread::spawn(move || {
                let mut r = BufReader::new(UnixStream::connect(sock).unwrap());
                let offset = per_conn_interval * c as u32 / conns as u32;
                let mut lat = Vec::with_capacity(n as usize);
                for i in 0..n {
                    let due = start + offset + per_conn_interval * i as u32;
                    let now = Instant::now();
                    if due > now + Duration::from_micros(120) {
                        std::thread::sleep(due - now - Duration::from_micros(80));
                    }
                    while Instant::now() < due {
                        std::hint::spin_loop();
                    }
                    request(&mut r);
                    lat.push(due.elapsed());
                }
                lat
            })
        })
        .collect();
    let lat: Vec<Duration> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
    report(
        &format!("open loop at {rate} req/s, {conns} conn"),
        lat,
        start.elapsed(),
    );
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let http_sock: PathBuf = rt.block_on(async { setup(dir.path()).await });
    // Warm the JWT cache and the binary-hash cache.
    let mut r = BufReader::new(UnixStream::connect(&http_sock).unwrap());
    for _ in 0..200 {
        request(&mut r);
    }
    println!(
        "trustline-agent HTTP /v1/jwt-svid (cached token, attestation on every request), 2-core machine"
    );
    for c in [1, 4, 16, 64] {
        closed_loop(&http_sock, c, 20_000 / c);
    }
    // One paced connection perturbs the 2-core machine least; 4 connections for the rate one cannot carry.
    for rate in [1_000, 5_000] {
        open_loop(&http_sock, rate, 4, 1);
    }
    for rate in [5_000, 10_000] {
        open_loop(&http_sock, rate, 4, 4);
    }
    let workload_sock = http_sock.with_file_name("workload.sock");
    println!("trustline-agent Workload API FetchJWTSVID (gRPC, cached token, attestation on every call)");
    for c in [1, 4, 16] {
        rt.block_on(grpc_closed_loop(&workload_sock, c, 20_000 / c));
    }
}

async fn grpc_closed_loop(sock: &Path, conns: usize, per_conn: usize) {
    use trustline_proto::workload as pb;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let sock = sock.to_owned();
        tasks.push(tokio::spawn(async move {
            let ch = tonic::transport::Endpoint::from_static("http://localhost")
                .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                    let p = sock.clone();
                    async move {
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                            tokio::net::UnixStream::connect(p).await?,
                        ))
                    }
                }))
                .await
                .unwrap();
            let mut c = pb::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(ch);
            let mut lat = Vec::with_capacity(per_conn);
            for _ in 0..per_conn {
                let mut req = tonic::Request::new(pb::JwtsvidRequest {
                    audience: vec!["bench".into()],
                    spiffe_id: String::new(),
                });
                req.metadata_mut().insert(
                    "workload.spiffe.io",
                    tonic::metadata::MetadataValue::from_static("true"),
                );
                let t = Instant::now();
                c.fetch_jwtsvid(req).await.unwrap();
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    report(
        &format!("gRPC closed loop, {conns} connection(s)"),
        lat,
        start.elapsed(),
    );
}

async fn setup(dir: &Path) -> PathBuf {
    // CA.
    let ca_dir = dir.join("ca");
    std::fs::create_dir_all(&ca_dir).unwrap();
    trustline_hsm::SoftwareKeyStore::create_key_file(&ca_dir.join("seal.key")).unwrap();
    let text = format!(
        "trust_domain = \"example.org\"\ndata_dir = \"{}\"\n[server]\nagent_listen = \"127.0.0.1:0\"\n[keys]\nkey_file = \"seal.key\"\n",
        ca_dir.display()
    );
    let cfg = trustline_ca::config::Config::parse(&ca_dir.join("ca.toml"), &text).unwrap();
    let (running, _join) = trustline_ca::server::start(cfg, std::future::pending())
        .await
        .unwrap();
    let mut admin = trustline_ca::admin_api::connect(&running.admin_socket)
        .await
        .unwrap();
    use trustline_proto::admin as pb;
    let token = admin
        .generate_join_token(pb::GenerateJoinTokenRequest {
            ttl: 600,
            spiffe_id: "spiffe://example.org/trustline/agent/bench".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let uid = std::fs::metadata("/proc/self").unwrap().uid();
    admin
        .create_entry(pb::CreateEntryRequest {
            spec: Some(pb::EntrySpec {
                spiffe_id: "spiffe://example.org/bench".into(),
                parent_id: "spiffe://example.org/trustline/agent/bench".into(),
                selectors: vec![format!("unix:uid:{uid}")],
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let bundle = admin
        .get_bundle(pb::GetBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    // Agent.
    let a_dir = dir.join("agent");
    std::fs::create_dir_all(&a_dir).unwrap();
    std::fs::write(
        a_dir.join("bundle.pem"),
        trustline_identity::bundle::certs_to_pem(&bundle.x509_authorities),
    )
    .unwrap();
    let text = format!(
        "trust_domain = \"example.org\"\nca_address = \"{}\"\ntrust_bundle = \"bundle.pem\"\ndata_dir = \"state\"\n",
        running.agent_addr
    );
    let cfg = trustline_identity_agent::config::Config::parse(&a_dir.join("agent.toml"), &text).unwrap();
    let http = cfg.http_socket.clone();
    tokio::spawn(async move {
        trustline_identity_agent::server::run(cfg, Some(token), std::future::pending(), |_, _| {})
            .await
            .unwrap();
    });
    for _ in 0..200 {
        if UnixStream::connect(&http).is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    http
}
