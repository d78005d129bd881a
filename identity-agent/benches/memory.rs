//! Agent memory against the number of entries its node may issue: SVIDs are minted only for workloads that ask,
//! so registering 10,000 more entries for the node costs only their (small) descriptions, not 10,000 SVIDs.
//!
//! Starts a real CA in this process and the real `trustline-agent` binary as a child (its RSS is read from
//! /proc/<pid>/status), fetches one identity, then registers 10,000 more entries for the node.
//!
//! Run: `cargo bench -p trustline-identity-agent --bench memory`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use trustline_proto::admin as pb;

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Peak RSS since the process started (`VmHWM`), in KiB.
fn peak_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

fn http_get(sock: &Path, path: &str) -> String {
    let mut s = UnixStream::connect(sock).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn entries_seen(sock: &Path) -> u64 {
    let body = http_get(sock, "/v1/health");
    let v: serde_json::Value = body
        .find('{')
        .and_then(|i| serde_json::from_str(&body[i..body.rfind('}').unwrap() + 1]).ok())
        .unwrap_or_default();
    v["entries"].as_u64().unwrap_or(0)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn run() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
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
    let node = "spiffe://example.org/trustline/agent/mem";
    let token = admin
        .generate_join_token(pb::GenerateJoinTokenRequest {
            ttl: 600,
            spiffe_id: node.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let admin_for_create = admin.clone();
    let create = |id: String, sel: String| {
        let mut admin = admin_for_create.clone();
        async move {
            admin
                .create_entry(pb::CreateEntryRequest {
                    spec: Some(pb::EntrySpec {
                        spiffe_id: id,
                        parent_id: node.into(),
                        selectors: vec![sel],
                        ..Default::default()
                    }),
                })
                .await
                .unwrap();
        }
    };
    let uid = std::fs::metadata("/proc/self").unwrap().uid();
    create("spiffe://example.org/mem/me".into(), format!("unix:uid:{uid}")).await;
    let bundle = admin
        .get_bundle(pb::GetBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    let a_dir = dir.path().join("agent");
    std::fs::create_dir_all(&a_dir).unwrap();
    std::fs::write(
        a_dir.join("bundle.pem"),
        trustline_identity::bundle::certs_to_pem(&bundle.x509_authorities),
    )
    .unwrap();
    std::fs::write(
        a_dir.join("agent.toml"),
        format!(
            "trust_domain = \"example.org\"\nca_address = \"{}\"\ntrust_bundle = \"bundle.pem\"\ndata_dir = \"state\"\n",
            running.agent_addr
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_trustline-agent"))
        .args(["run", "--config"])
        .arg(a_dir.join("agent.toml"))
        .args(["--join-token", &token])
        .env("TRUSTLINE_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("trustline-agent ready"), "{line}");
    let pid = child.id();
    println!(
        "trustline-agent start-up peak RSS (VmHWM at its ready line; join token, key file created, SVID sealed): {} KiB",
        peak_kib(pid)
    );
    let http = a_dir.join("state/sockets/http.sock");
    let out = http_get(&http, "/v1/jwt-svid?audience=mem");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_1 = rss_kib(pid);
    println!("trustline-agent RSS with 1 entry for its node, 1 identity served: {rss_1} KiB");

    let n = 10_000;
    let t = Instant::now();
    for i in 0..n {
        create(
            format!("spiffe://example.org/mem/w{i}"),
            format!("unix:uid:{}", 200_000 + i),
        )
        .await;
    }
    let created = t.elapsed();
    let deadline = Instant::now() + Duration::from_secs(120);
    while entries_seen(&http) < n + 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seen = entries_seen(&http);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_2 = rss_kib(pid);
    println!(
        "after registering {n} more entries for the node ({:?}; agent holds {seen}): RSS {rss_2} KiB (+{} KiB, {:.0} bytes per entry)",
        created,
        rss_2 as i64 - rss_1 as i64,
        (rss_2 as f64 - rss_1 as f64) * 1024.0 / n as f64
    );
    let _ = child.kill();
    let _ = child.wait();

    // Steady state: a fresh agent (re-using its SVID, no token) receives the 10,001 entries in one update.
    let mut child = Command::new(env!("CARGO_BIN_EXE_trustline-agent"))
        .args(["run", "--config"])
        .arg(a_dir.join("agent.toml"))
        .env("TRUSTLINE_LOG", "warn")
        .env_remove("TRUSTLINE_JOIN_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    println!(
        "restarted trustline-agent start-up peak RSS (VmHWM at its ready line; sealed SVID opened with the key file, the 10,001 entries received): {} KiB",
        peak_kib(child.id())
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while entries_seen(&http) < n + 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = http_get(&http, "/v1/jwt-svid?audience=mem");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_3 = rss_kib(child.id());
    println!(
        "restarted agent holding the same {n} + 1 entries, 1 identity served: RSS {rss_3} KiB ({:+} KiB vs 1 entry, {:.0} bytes per entry)",
        rss_3 as i64 - rss_1 as i64,
        (rss_3 as f64 - rss_1 as f64) * 1024.0 / n as f64
    );
    let _ = child.kill();
    let _ = child.wait();
}
