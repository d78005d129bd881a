//! The agent's local attack surface (issue 19), against the real `trustline-agent`: what any local user can send
//! to the Workload API socket before being attested (raw HTTP/2 bytes), what a browser or a URL fetcher can make
//! the loopback TCP HTTP API do, and what a planted link can make `api fetch x509 --write` do.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;

use trustline_tests::{bin, eventually, Agent, Ca, PATIENCE};

const NODE: &str = "spiffe://example.org/trustline/agent/bounds";

fn my_uid() -> u32 {
    std::fs::metadata("/proc/self").unwrap().uid()
}

/// A CA, an entry `spiffe://example.org/web` for this test's uid, and an agent for it; `extra` goes into the
/// agent's config.
fn start(tmp: &Path, extra: &str) -> (Ca, Agent) {
    let ca = Ca::start(&tmp.join("ca"));
    ca.cli_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/web",
        "--parent-id",
        NODE,
        "--selector",
        &format!("unix:uid:{}", my_uid()),
    ]);
    let v: serde_json::Value =
        serde_json::from_str(&ca.cli_ok(&["token", "generate", "--spiffe-id", NODE, "--output", "json"]))
            .unwrap();
    let agent = Agent::start(&tmp.join("agent"), &ca, v["token"].as_str(), extra);
    (ca, agent)
}

/// Peak resident memory of a process, in KiB (`VmHWM`).
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

// ---------------------------------------------------------------------------------------------------------------
// Raw HTTP/2 on the Workload API socket.

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const FRAME_SIZE_ERROR: u32 = 0x6;
const COMPRESSION_ERROR: u32 = 0x9;
const ENHANCE_YOUR_CALM: u32 = 0xb;

fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, ty, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HPACK integer with an `n`-bit prefix (RFC 7541 §5.1); `first` holds the bits above the prefix.
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u8, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// A literal field with incremental indexing and a new name (RFC 7541 §6.2.1): it enters the dynamic table.
fn hpack_indexed_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x40);
    hpack_int(out, 0, 7, name.len());
    out.extend_from_slice(name);
    hpack_int(out, 0, 7, value.len());
    out.extend_from_slice(value);
}

/// The bomb of issue 19: a table size update making room for it, one 10 KB literal added to the dynamic table,
/// then `references` indexed references to it (index 62: the newest dynamic entry). 60,000 decode to 600 MB.
fn bomb(references: usize) -> Vec<u8> {
    let mut b = Vec::new();
    hpack_int(&mut b, 0x20, 5, 65_536);
    hpack_indexed_literal(&mut b, b"x-bomb", &[b'a'; 10_000]);
    b.extend(std::iter::repeat_n(0xbe, references));
    b
}

/// The connection preface and an empty SETTINGS frame, as any client starts.
fn client_start() -> Vec<u8> {
    let mut b = PREFACE.to_vec();
    b.extend(frame(SETTINGS, 0, 0, &[]));
    b
}

/// Sends `bytes` on a new connection to the Workload API and reads until the agent closes it (panics if it does
/// not within [`PATIENCE`]); returns the error code of the agent's GOAWAY, if it sent one.
fn send_and_wait_for_close(socket: &Path, bytes: &[u8]) -> Option<u32> {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s.set_write_timeout(Some(PATIENCE)).unwrap();
    // The agent may close before it has read everything: a failed write is expected then.
    let _ = s.write_all(bytes);
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            // Closed with our bytes unread: the kernel reports a reset after the data it delivered.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the agent kept the connection open for {PATIENCE:?} ({e})"),
        }
    }
    let mut at = 0;
    while got.len() >= at + 9 {
        let len = (usize::from(got[at]) << 16) | (usize::from(got[at + 1]) << 8) | usize::from(got[at + 2]);
        if got[at + 3] == GOAWAY && got.len() >= at + 9 + 8 {
            let code = u32::from_be_bytes(got[at + 13..at + 17].try_into().unwrap());
            let reason = String::from_utf8_lossy(&got[at + 17..(at + 9 + len).min(got.len())]);
            println!("GOAWAY {code:#x}: {reason}");
            return Some(code);
        }
        at += 9 + len;
    }
    None
}

/// A local user with no identity sends HPACK bombs to the Workload API socket (mode 0777, parsed before
/// attestation): each connection is closed with a GOAWAY naming the limit, the agent's peak memory stays flat,
/// and it goes on serving. Fails before issue 19: the first bomb alone took the agent to about 1 GB.
#[tokio::test(flavor = "multi_thread")]
async fn hpack_bombs_are_refused_and_the_agent_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let (_ca, agent) = start(tmp.path(), "");
    let pid = agent.pid().unwrap();
    let client = spiffe::WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .unwrap();
    eventually(PATIENCE, "a first X.509-SVID", || {
        let c = client.clone();
        async move { c.fetch_x509_svid().await.ok() }
    })
    .await;
    let before = peak_rss_kib(pid);

    // 1. The bomb as reported: one HEADERS frame of 70 KB.
    let mut one_frame = client_start();
    one_frame.extend(frame(HEADERS, END_HEADERS | END_STREAM, 1, &bomb(60_000)));
    // 2. The same block in frames of the allowed size (HEADERS + CONTINUATION).
    let mut split = client_start();
    let block = bomb(60_000);
    let chunks: Vec<&[u8]> = block.chunks(16_384).collect();
    for (i, c) in chunks.iter().enumerate() {
        let ty = if i == 0 { HEADERS } else { CONTINUATION };
        let flags = if i == chunks.len() - 1 { END_HEADERS } else { 0 };
        split.extend(frame(ty, flags, 1, c));
    }
    // 3. A block within 16 KiB: the table size update, the 10 KB entry and 5,000 references (50 MB decoded).
    let mut small = client_start();
    small.extend(frame(HEADERS, END_HEADERS | END_STREAM, 1, &bomb(5_000)));
    // 4. Without a size update: a 4 KB entry (it fits the default table) referenced 10,000 times (40 MB decoded).
    let mut fits = client_start();
    let mut block = Vec::new();
    hpack_indexed_literal(&mut block, b"x-b", &[b'a'; 4_000]);
    block.extend(std::iter::repeat_n(0xbe, 10_000));
    fits.extend(frame(HEADERS, END_HEADERS | END_STREAM, 1, &block));

    for (what, bytes, code) in [
        ("one 70 KB HEADERS frame", &one_frame, FRAME_SIZE_ERROR),
        ("a 70 KB header block in 16 KiB frames", &split, ENHANCE_YOUR_CALM),
        ("a table size update to 64 KiB", &small, COMPRESSION_ERROR),
        ("10,000 references to a 4 KB entry", &fits, ENHANCE_YOUR_CALM),
    ] {
        let socket = agent.socket.clone();
        let bytes = bytes.clone();
        let goaway = tokio::task::spawn_blocking(move || send_and_wait_for_close(&socket, &bytes))
            .await
            .unwrap();
        assert_eq!(goaway, Some(code), "{what}: GOAWAY code");
    }
    assert!(agent.logged("connection closed before attestation"));

    let after = peak_rss_kib(pid);
    println!("agent peak RSS (VmHWM): {before} KiB before the bombs, {after} KiB after");
    assert!(
        after < 64 * 1024,
        "the agent's peak RSS reached {after} KiB (it was {before} KiB before the bombs)"
    );

    // It goes on serving, on a new connection.
    let client = spiffe::WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .unwrap();
    let svid = client.fetch_x509_svid().await.unwrap();
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/web");
    let jwt = client.fetch_jwt_svid(["payments"], None).await.unwrap();
    assert_eq!(jwt.spiffe_id().to_string(), "spiffe://example.org/web");
}

// ---------------------------------------------------------------------------------------------------------------
// The HTTP API on loopback TCP.

async fn tcp_get(addr: std::net::SocketAddr, path: &str, headers: &[&str]) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!("GET {path} HTTP/1.1\r\nConnection: close\r\n");
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, out)
}

/// What a web page on the node (a DNS-rebound name, a cross-origin fetch) or an app that fetches URLs for others
/// can send to `http_listen` is refused before it reaches a handler; an app that means it adds `Metadata: true`.
/// The Unix socket is unchanged. Fails before issue 19: any GET got a JWT-SVID.
#[tokio::test(flavor = "multi_thread")]
async fn the_tcp_http_api_refuses_what_browsers_and_url_fetchers_send() {
    let tmp = tempfile::tempdir().unwrap();
    let (_ca, agent) = start(tmp.path(), "http_listen = \"127.0.0.1:0\"\n");
    let addr = agent.listening("HTTP API");
    let path = "/v1/jwt-svid?audience=a";
    let host = format!("Host: {addr}");
    let (_, ok) = eventually(PATIENCE, "a JWT over loopback TCP", || {
        let host = host.clone();
        async move {
            let r = tcp_get(addr, path, &[&host, "Metadata: true"]).await;
            (r.0 == 200).then_some(r)
        }
    })
    .await;
    assert!(ok.contains("spiffe://example.org/web"), "{ok}");
    let (status, body) = tcp_get(
        addr,
        path,
        &[&format!("Host: localhost:{}", addr.port()), "Metadata: true"],
    )
    .await;
    assert_eq!(status, 200, "{body}");

    // What a plain fetch, <img>, form or SSRF'd URL sends: no Metadata header.
    let (status, body) = tcp_get(addr, path, &[&host]).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("metadata_header_required") && body.contains("Metadata: true"),
        "{body}"
    );
    assert!(!body.contains("token"), "{body}");
    // DNS rebinding: the attacker's name arrives as Host.
    let (status, body) = tcp_get(
        addr,
        path,
        &[&format!("Host: rebind.example:{}", addr.port()), "Metadata: true"],
    )
    .await;
    assert_eq!(status, 421, "{body}");
    assert!(
        body.contains("host_not_loopback") && body.contains("rebind.example"),
        "{body}"
    );
    // Browser-only headers, even with everything else right (a CORS preflight carries Origin too).
    for browser in [
        "Origin: http://rebind.example",
        "Sec-Fetch-Site: cross-site",
        "Sec-Fetch-Mode: no-cors",
    ] {
        let (status, body) = tcp_get(addr, path, &[&host, "Metadata: true", browser]).await;
        assert_eq!(status, 403, "{browser}: {body}");
        assert!(body.contains("browser_request"), "{body}");
    }
    // The Unix socket: as before, no extra header.
    let (status, body) = agent.http("GET", path, None).await;
    assert_eq!(status, 200, "{body}");
}

// ---------------------------------------------------------------------------------------------------------------
// `trustline-agent api fetch x509 --write DIR`.

fn fetch_x509_write(agent: &Agent, dir: &Path) -> std::process::Output {
    std::process::Command::new(bin("trustline-agent"))
        .args(["api", "fetch", "x509", "--socket"])
        .arg(&agent.socket)
        .arg("--write")
        .arg(dir)
        .env_remove("SPIFFE_ENDPOINT_SOCKET")
        .output()
        .unwrap()
}

fn mode_of(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

/// A link planted where the key goes is replaced, not followed (its target is untouched), an existing file with a
/// loose mode is replaced with the right one, and folders others can write, or that are links, are refused with
/// a message naming them. Fails before issue 19: the key was written through the link into its target.
#[tokio::test(flavor = "multi_thread")]
async fn write_replaces_planted_links_and_refuses_open_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let (_ca, agent) = start(tmp.path(), "");
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o700)).unwrap();
    let victim = tmp.path().join("victim");
    std::fs::write(&victim, "untouched").unwrap();
    std::os::unix::fs::symlink(&victim, out.join("svid.0.key")).unwrap();
    std::fs::write(out.join("bundle.0.pem"), "old").unwrap();
    std::fs::set_permissions(out.join("bundle.0.pem"), std::fs::Permissions::from_mode(0o666)).unwrap();

    let done = eventually(PATIENCE, "fetch x509 --write to succeed", || {
        let o = fetch_x509_write(&agent, &out);
        async move { o.status.success().then_some(o) }
    })
    .await;
    assert!(
        String::from_utf8_lossy(&done.stdout).contains("spiffe://example.org/web"),
        "{done:?}"
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
    let key = out.join("svid.0.key");
    assert!(std::fs::symlink_metadata(&key).unwrap().file_type().is_file());
    assert!(std::fs::read_to_string(&key)
        .unwrap()
        .contains("BEGIN PRIVATE KEY"));
    assert_eq!(mode_of(&key), 0o600);
    assert_eq!(mode_of(&out.join("bundle.0.pem")), 0o644);
    assert!(std::fs::read_to_string(out.join("bundle.0.pem"))
        .unwrap()
        .contains("BEGIN CERTIFICATE"));
    assert_eq!(mode_of(&out.join("svid.0.pem")), 0o644);

    // A folder anyone can write into.
    let open = tmp.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let o = fetch_x509_write(&agent, &open);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(&open.display().to_string()) && err.contains("0777"),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(&open).unwrap().count(), 0);
    // A folder that is a link (to a good folder).
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&out, &link).unwrap();
    let o = fetch_x509_write(&agent, &link);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains(&link.display().to_string()) && err.contains("symbolic link"),
        "{err}"
    );
}
