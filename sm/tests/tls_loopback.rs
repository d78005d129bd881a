//! rustls client and server, both on the SM provider, over loopback: mutual TLS with SM2 chains,
//! TLS_SM4_GCM_SM3 + curveSM2 + sm2sig_sm3, and an HTTP/1.1 exchange both ways.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const PATIENCE: Duration = Duration::from_secs(20);

/// Reads an HTTP/1.1 message: headers, then `Content-Length` bytes of body.
async fn read_http<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        assert_eq!(
            s.read(&mut byte).await.unwrap(),
            1,
            "connection closed mid-headers: {buf:?}"
        );
        buf.push(byte[0]);
    }
    let head = String::from_utf8(buf).unwrap();
    let len = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0usize);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.unwrap();
    (head, body)
}

#[test]
fn provider_has_only_sm_algorithms() {
    let p = trustline_sm::tls::provider();
    let suites: Vec<u16> = p.cipher_suites.iter().map(|s| u16::from(s.suite())).collect();
    assert_eq!(suites, [0x00C6]);
    let groups: Vec<u16> = p.kx_groups.iter().map(|g| u16::from(g.name())).collect();
    assert_eq!(groups, [0x0029]);
    let schemes: Vec<u16> = p
        .signature_verification_algorithms
        .supported_schemes()
        .into_iter()
        .map(u16::from)
        .collect();
    assert_eq!(schemes, [0x0708]);
    assert_eq!(p.signature_verification_algorithms.all.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_sm4_gcm_sm3_with_http_both_ways() {
    let ca = common::Ca::new("Trustline SM2 test CA");
    let server_leaf = ca.issue("server");
    let client_leaf = ca.issue("client");
    let acceptor = TlsAcceptor::from(common::sm_server_config(&ca, &server_leaf));
    let connector = TlsConnector::from(common::sm_client_config(&ca, &client_leaf));
    let client_cert_der = client_leaf.cert.to_der().unwrap();

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.unwrap();
        let (_, conn) = tls.get_ref();
        let suite = u16::from(conn.negotiated_cipher_suite().unwrap().suite());
        let group = u16::from(conn.negotiated_key_exchange_group().unwrap().name());
        let peer = conn.peer_certificates().unwrap()[0].as_ref().to_vec();
        let (head, body) = read_http(&mut tls).await;
        assert!(head.starts_with("POST /echo HTTP/1.1\r\n"), "{head}");
        let reply = format!(
            "server saw {} bytes: {}",
            body.len(),
            String::from_utf8_lossy(&body)
        );
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{reply}",
            reply.len()
        );
        tls.write_all(response.as_bytes()).await.unwrap();
        tls.shutdown().await.unwrap();
        (suite, group, peer)
    });

    let client = async {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut tls = connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let (_, conn) = tls.get_ref();
        let suite = u16::from(conn.negotiated_cipher_suite().unwrap().suite());
        let group = u16::from(conn.negotiated_key_exchange_group().unwrap().name());
        assert_eq!(conn.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
        let body = "hello over SM4-GCM";
        let request = format!(
            "POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        tls.write_all(request.as_bytes()).await.unwrap();
        let (head, body) = read_http(&mut tls).await;
        (suite, group, head, String::from_utf8(body).unwrap())
    };
    let (c_suite, c_group, head, body) = tokio::time::timeout(PATIENCE, client)
        .await
        .expect("client in time");
    let (s_suite, s_group, peer) = tokio::time::timeout(PATIENCE, server)
        .await
        .expect("server in time")
        .unwrap();

    assert_eq!((c_suite, c_group), (0x00C6, 0x0029));
    assert_eq!((s_suite, s_group), (0x00C6, 0x0029));
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert_eq!(body, "server saw 18 bytes: hello over SM4-GCM");
    assert_eq!(
        peer, client_cert_der,
        "the server saw the client's SM2 certificate"
    );
}

/// A classic (aws-lc-rs) client has nothing in common with the SM server: the handshake fails, it does not fall
/// back to a non-SM algorithm.
#[tokio::test]
async fn classic_client_is_refused_by_sm_server() {
    let ca = common::Ca::new("Trustline SM2 test CA");
    let server_leaf = ca.issue("server");
    let acceptor = TlsAcceptor::from(common::sm_server_config(&ca, &server_leaf));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        acceptor.accept(tcp).await.map(|_| ())
    });
    let classic =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let client = TlsConnector::from(Arc::new(classic))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await;
    assert!(client.is_err());
    let server = tokio::time::timeout(PATIENCE, server).await.unwrap().unwrap();
    let err = server.unwrap_err().to_string();
    assert!(
        err.contains("no ciphersuites in common") || err.contains("peer is incompatible"),
        "{err}"
    );
}

/// A server certificate chain signed by another CA is refused by the SM client (webpki with SM2-with-SM3).
#[tokio::test]
async fn sm_client_refuses_untrusted_sm2_chain() {
    let ca = common::Ca::new("Trustline SM2 test CA");
    let rogue = common::Ca::new("Trustline SM2 test CA"); // same name, different key
    let server_leaf = rogue.issue("server");
    let client_leaf = ca.issue("client");
    let acceptor = TlsAcceptor::from(common::sm_server_config(&ca, &server_leaf));
    let connector = TlsConnector::from(common::sm_client_config(&ca, &client_leaf));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let _ = acceptor.accept(tcp).await;
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let err = tokio::time::timeout(
        PATIENCE,
        connector.connect(ServerName::try_from("localhost").unwrap(), tcp),
    )
    .await
    .unwrap()
    .unwrap_err();
    assert!(
        err.to_string().contains("BadSignature") || err.to_string().contains("invalid peer certificate"),
        "{err}"
    );
}
