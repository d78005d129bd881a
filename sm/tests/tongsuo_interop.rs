//! Interop with Tongsuo (Ant Group's OpenSSL fork, which implements RFC 8998): our rustls SM client against
//! Tongsuo's `s_server`, and Tongsuo's `s_client` against our rustls SM server, both with mutual TLS over SM2
//! certificates made by this crate, TLS_SM4_GCM_SM3 + curveSM2 + sm2sig_sm3 in Tongsuo's strict mode, and an
//! HTTP exchange.
//!
//! Runs when `TRUSTLINE_TEST_TONGSUO` names Tongsuo's `openssl` binary (`sm/scripts/build-tongsuo.sh` builds
//! it); prints "skipped: …" otherwise. Loopback only, ephemeral ports, temp dirs; children are killed on drop.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;
use tokio_rustls::{TlsAcceptor, TlsConnector};

const PATIENCE: Duration = Duration::from_secs(30);

/// Tongsuo's `openssl`, or `None` (and a "skipped" line) when the test is not configured.
fn tongsuo(test: &str) -> Option<PathBuf> {
    match std::env::var_os("TRUSTLINE_TEST_TONGSUO") {
        Some(path) => Some(PathBuf::from(path)),
        None => {
            println!("skipped: {test}: set TRUSTLINE_TEST_TONGSUO to Tongsuo's openssl (sm/scripts/build-tongsuo.sh)");
            None
        }
    }
}

/// The test PKI as PEM files for Tongsuo: ca.pem, server.{pem,key}, client.{pem,key}.
struct Pki {
    ca: common::Ca,
    server: common::Leaf,
    client: common::Leaf,
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let ca = common::Ca::new("Trustline SM2 interop CA");
        let server = ca.issue("localhost");
        let client = ca.issue("trustline-rustls-client");
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, bytes: Vec<u8>| std::fs::write(dir.path().join(name), bytes).unwrap();
        write("ca.pem", ca.cert.to_pem().unwrap());
        write("server.pem", server.cert.to_pem().unwrap());
        write("server.key", server.key.to_pkcs8_pem().unwrap());
        write("client.pem", client.cert.to_pem().unwrap());
        write("client.key", client.key.to_pkcs8_pem().unwrap());
        Pki {
            ca,
            server,
            client,
            dir,
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// The RFC 8998 options both Tongsuo tools get: TLS 1.3 with only the SM suite, group and signature scheme, and
/// Tongsuo's strict mode (which insists on exactly that combination).
const SM_TLS13: &[&str] = &[
    "-tls1_3",
    "-ciphersuites",
    "TLS_SM4_GCM_SM3",
    "-sigalgs",
    "sm2sig_sm3",
    "-groups",
    "SM2",
    "-enable_sm_tls13_strict",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rustls_sm_client_against_tongsuo_s_server() {
    let Some(tongsuo) = tongsuo("rustls_sm_client_against_tongsuo_s_server") else {
        return;
    };
    let pki = Pki::new();

    // Tongsuo serves its status page (-www), which reports the cipher it negotiated and the client certificate.
    let mut server = Command::new(&tongsuo)
        .arg("s_server")
        .args(["-accept", "127.0.0.1:0", "-naccept", "1", "-www"])
        .args(SM_TLS13)
        .args([
            "-cert",
            "server.pem",
            "-key",
            "server.key",
            "-CAfile",
            "ca.pem",
            "-Verify",
            "1",
        ])
        .args(["-verify_return_error"])
        .current_dir(pki.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start Tongsuo s_server");
    let mut lines = BufReader::new(server.stdout.take().unwrap()).lines();
    let port: u16 = tokio::time::timeout(PATIENCE, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            // "ACCEPT 127.0.0.1:PORT" once listening.
            if let Some(addr) = line.strip_prefix("ACCEPT ") {
                return addr.rsplit(':').next().unwrap().parse().unwrap();
            }
        }
        panic!("s_server exited before listening");
    })
    .await
    .expect("s_server listening in time");

    let connector = TlsConnector::from(common::sm_client_config(&pki.ca, &pki.client));
    let exchange = async {
        let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut tls = connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let (_, conn) = tls.get_ref();
        let suite = u16::from(conn.negotiated_cipher_suite().unwrap().suite());
        let group = u16::from(conn.negotiated_key_exchange_group().unwrap().name());
        let server_cert = conn.peer_certificates().unwrap()[0].as_ref().to_vec();
        tls.write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut response = Vec::new();
        // Tongsuo may close without close_notify after the page: keep what arrived.
        match tls.read_to_end(&mut response).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
            Err(e) => panic!("reading s_server's response: {e}"),
        }
        (
            suite,
            group,
            server_cert,
            String::from_utf8_lossy(&response).into_owned(),
        )
    };
    let (suite, group, server_cert, response) = tokio::time::timeout(PATIENCE, exchange)
        .await
        .expect("exchange in time");
    let status = tokio::time::timeout(PATIENCE, server.wait())
        .await
        .expect("s_server exits")
        .unwrap();

    // Our side.
    assert_eq!((suite, group), (0x00C6, 0x0029));
    assert_eq!(server_cert, pki.server.cert.to_der().unwrap());
    // Tongsuo's side, from its status page.
    assert!(response.starts_with("HTTP/1.0 200 ok"), "{response}");
    assert!(
        response.contains("New, TLSv1.3, Cipher is TLS_SM4_GCM_SM3"),
        "{response}"
    );
    assert!(
        response.contains("Client certificate"),
        "s_server did not get our certificate:\n{response}"
    );
    assert!(response.contains("trustline-rustls-client"), "{response}");
    assert!(status.success(), "s_server: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tongsuo_s_client_against_rustls_sm_server() {
    let Some(tongsuo) = tongsuo("tongsuo_s_client_against_rustls_sm_server") else {
        return;
    };
    let pki = Pki::new();

    let acceptor = TlsAcceptor::from(common::sm_server_config(&pki.ca, &pki.server));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.unwrap();
        let (_, conn) = tls.get_ref();
        let suite = u16::from(conn.negotiated_cipher_suite().unwrap().suite());
        let group = u16::from(conn.negotiated_key_exchange_group().unwrap().name());
        let client_cert = conn.peer_certificates().unwrap()[0].as_ref().to_vec();
        let mut request = Vec::new();
        let mut buf = [0u8; 1024];
        while !request.ends_with(b"\r\n\r\n") {
            let n = tls.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "s_client closed before the request was complete: {request:?}"
            );
            request.extend_from_slice(&buf[..n]);
        }
        let body = "hello from rustls over TLS_SM4_GCM_SM3\n";
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        tls.write_all(response.as_bytes()).await.unwrap();
        tls.shutdown().await.unwrap();
        (suite, group, client_cert, String::from_utf8(request).unwrap())
    });

    let mut client = Command::new(&tongsuo)
        .arg("s_client")
        .args([
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-servername",
            "localhost",
        ])
        .args(SM_TLS13)
        .args([
            "-cert",
            "client.pem",
            "-key",
            "client.key",
            "-CAfile",
            "ca.pem",
            "-verify_return_error",
        ])
        // Keep reading after stdin ends, until our server closes.
        .arg("-ign_eof")
        .current_dir(pki.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start Tongsuo s_client");
    let mut stdin = client.stdin.take().unwrap();
    stdin
        .write_all(b"GET /hello HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    drop(stdin);
    let output = tokio::time::timeout(PATIENCE, client.wait_with_output())
        .await
        .expect("s_client in time")
        .unwrap();
    let (suite, group, client_cert, request) = tokio::time::timeout(PATIENCE, server)
        .await
        .expect("server in time")
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);

    // Our side.
    assert_eq!((suite, group), (0x00C6, 0x0029));
    assert_eq!(client_cert, pki.client.cert.to_der().unwrap());
    assert!(request.starts_with("GET /hello HTTP/1.1\r\n"), "{request}");
    // Tongsuo's side.
    assert!(
        stdout.contains("New, TLSv1.3, Cipher is TLS_SM4_GCM_SM3"),
        "{stdout}\n{stderr}"
    );
    assert!(stdout.contains("Peer signature type: sm2sig_sm3"), "{stdout}");
    assert!(stdout.contains("Peer Temp Key: ECDH, SM2"), "{stdout}");
    assert!(stdout.contains("Verification: OK"), "{stdout}");
    assert!(stdout.contains("HTTP/1.1 200 OK"), "{stdout}");
    assert!(
        stdout.contains("hello from rustls over TLS_SM4_GCM_SM3"),
        "{stdout}"
    );
    assert!(output.status.success(), "s_client: {}\n{stderr}", output.status);
}
