//! Identities do not outlive their X.509-SVIDs (issue 18, part 4): a saved TLS session does not bring one back
//! (the sidecar's inbound listener resumes nothing), and a live connection takes no new request once its peer's
//! SVID has expired (and is retired before that, so a well-behaved client never meets the refusal).
//!
//! Against a real CA, agent and sidecar; the clients are the test's own rustls clients presenting SVIDs minted
//! with short lifetimes. Waits poll the clock past the SVID's notAfter, and never assert on elapsed time.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::client::{ClientSessionMemoryCache, ClientSessionStore, ResolvesClientCert, Resumption};
use rustls::pki_types::ServerName;
use rustls::sign::CertifiedKey;
use rustls::{HandshakeKind, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trustline_identity::spiffe_id::{SpiffeId, TrustDomain};
use trustline_identity::tls::{client_config, ExpectedPeer, RotatingCert, SpiffeServerVerifier, TrustBundle};
use trustline_tests::mesh::{echo_app, Mesh, Sidecar, TD};
use trustline_tests::{eventually, now, PATIENCE};

/// An X.509-SVID for `spiffe://example.org/web` minted by the CA with `ttl`: (chain, PKCS#8 key, notAfter).
fn mint_web(mesh: &Mesh, ttl: &str, out: &str) -> (Vec<Vec<u8>>, Vec<u8>, u64) {
    let dir = mesh.tmp.path().join("minted").join(out);
    let (key, svid, _, _) = trustline_tests::mint_svid(&mesh.ca, &dir, &format!("{TD}/web"), ttl);
    let chain = trustline_identity::bundle::certs_from_pem(&std::fs::read_to_string(svid).unwrap()).unwrap();
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
    let not_after = u64::try_from(leaf.validity().not_after.timestamp()).unwrap();
    (chain, key.serialize_der(), not_after)
}

/// The start of the last tenth of an SVID's lifetime (the CA backdates notBefore by 10 s), when the sidecar
/// retires the connections that presented it (`sidecar/src/live_peer.rs`).
fn retire_from(chain: &[Vec<u8>]) -> u64 {
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
    let nb = u64::try_from(leaf.validity().not_before.timestamp()).unwrap();
    let na = u64::try_from(leaf.validity().not_after.timestamp()).unwrap();
    na - (na - nb) / 10
}

/// Polls the clock (this machine's, which the sidecar shares) until it reads `t` or later.
async fn clock_reaches(t: u64) {
    while now() < t {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The api sidecar in front of `app`. Idle connections are kept for an hour: only the peer's SVID closes them
/// in these tests.
fn api_sidecar(mesh: &Mesh, app: SocketAddr) -> Sidecar {
    mesh.sidecar(
        "api",
        &format!("[limits]\nidle_timeout = \"1h\"\n[[inbound]]\nlisten = \"127.0.0.1:0\"\napp = \"{app}\"\n"),
        &[],
    )
}

/// Our client config (no resumption), expecting the api sidecar, presenting `cert`, offering `alpn`.
fn client(mesh: &Mesh, cert: Option<(&[Vec<u8>], &[u8])>, alpn: &[u8]) -> rustls::ClientConfig {
    let bundle = TrustBundle::new(TrustDomain::new("example.org").unwrap(), &mesh.ca.bundle_roots()).unwrap();
    let verifier = Arc::new(SpiffeServerVerifier::new(
        bundle,
        ExpectedPeer::OneOf(vec![SpiffeId::new(format!("{TD}/api")).unwrap()]),
    ));
    let rc = cert.map(|(chain, key)| {
        let rc = Arc::new(RotatingCert::default());
        rc.set(chain.to_vec(), key).unwrap();
        rc
    });
    let mut cfg = client_config(verifier, rc).unwrap();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    cfg
}

async fn tls_connect(
    addr: SocketAddr,
    cfg: &Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(cfg.clone())
        .connect(ServerName::try_from("api").unwrap(), tcp)
        .await
}

/// A client session store that counts the TLS 1.3 tickets it is given.
#[derive(Debug)]
struct CountingStore {
    inner: ClientSessionMemoryCache,
    tickets: AtomicUsize,
}

impl ClientSessionStore for CountingStore {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: rustls::NamedGroup) {
        self.inner.set_kx_hint(server_name, group);
    }
    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<rustls::NamedGroup> {
        self.inner.kx_hint(server_name)
    }
    fn set_tls12_session(
        &self,
        server_name: ServerName<'static>,
        value: rustls::client::Tls12ClientSessionValue,
    ) {
        self.inner.set_tls12_session(server_name, value);
    }
    fn tls12_session(&self, server_name: &ServerName<'_>) -> Option<rustls::client::Tls12ClientSessionValue> {
        self.inner.tls12_session(server_name)
    }
    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        self.inner.remove_tls12_session(server_name);
    }
    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: rustls::client::Tls13ClientSessionValue,
    ) {
        self.tickets.fetch_add(1, Ordering::SeqCst);
        self.inner.insert_tls13_ticket(server_name, value);
    }
    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        self.inner.take_tls13_ticket(server_name)
    }
}

/// The attacker's certificate: the SVID on the first handshake, nothing after.
#[derive(Debug)]
struct FirstTimeOnly(Mutex<Option<Arc<CertifiedKey>>>);

impl ResolvesClientCert for FirstTimeOnly {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.0.lock().unwrap().take()
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// One `GET /` with `Connection: close` on `tls`: the status line, or `None` if no HTTP answer came.
async fn get_once<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut tls: S) -> Option<String> {
    tls.write_all(b"GET /resumed HTTP/1.1\r\nhost: api\r\nconnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, tls.read_to_end(&mut got)).await;
    let text = String::from_utf8_lossy(&got).into_owned();
    text.starts_with("HTTP/1.1")
        .then(|| text.lines().next().unwrap_or_default().to_owned())
}

/// Caught: the sidecar's inbound TLS config kept rustls' default session cache and sent two TLS 1.3 tickets per
/// connection, and rustls restores the client's chain on resumption without calling the verifier: a client that
/// connected once with a 10 s SVID resumed after the SVID expired, presenting no certificate, and its request was
/// served as `spiffe://example.org/web`.
#[tokio::test(flavor = "multi_thread")]
async fn a_saved_session_does_not_bring_back_an_expired_identity() {
    let mesh = Mesh::start("");
    let app = echo_app().await;
    let api = api_sidecar(&mesh, app);
    let addr = api.inbound[0];
    let (chain, key, not_after) = mint_web(&mesh, "10s", "attacker");

    // The attacker's client resumes whenever the server lets it, and holds its SVID for one handshake only.
    let mut cfg = client(&mesh, None, b"http/1.1");
    let rc = RotatingCert::default();
    rc.set(chain, &key).unwrap();
    cfg.client_auth_cert_resolver = Arc::new(FirstTimeOnly(Mutex::new(rc.get())));
    let store = Arc::new(CountingStore {
        inner: ClientSessionMemoryCache::new(32),
        tickets: AtomicUsize::new(0),
    });
    cfg.resumption = Resumption::store(store.clone());
    let cfg = Arc::new(cfg);

    let tls = tls_connect(addr, &cfg).await.expect("the valid SVID is admitted");
    assert_eq!(tls.get_ref().1.handshake_kind(), Some(HandshakeKind::Full));
    assert_eq!(
        get_once(tls).await.as_deref(),
        Some("HTTP/1.1 200 OK"),
        "served as web while its SVID is valid"
    );
    assert_eq!(
        store.tickets.load(Ordering::SeqCst),
        0,
        "the sidecar offers no session to resume (no TLS 1.3 ticket)"
    );

    // After the SVID's end, the saved session (if any) is offered, and no certificate.
    clock_reaches(not_after + 1).await;
    let answered = match tls_connect(addr, &cfg).await {
        Err(_) => None,
        Ok(tls) => {
            assert_eq!(
                tls.get_ref().1.handshake_kind(),
                Some(HandshakeKind::Full),
                "nothing was resumed"
            );
            // TLS 1.3: the server checks the client's (empty) certificate after the client's Finished, so the
            // refusal arrives on the first read.
            get_once(tls).await
        }
    };
    assert_eq!(answered, None, "the expired identity is not brought back");
    let refused = eventually(PATIENCE, "the refusal in the metrics", || async {
        let n = api
            .metric(
                "trustline_sidecar_tls_handshakes_total",
                &[("direction", "inbound"), ("outcome", "no_certificate")],
            )
            .await;
        (n >= 1.0).then_some(n)
    })
    .await;
    assert_eq!(refused, 1.0);
    assert_eq!(
        api.metric("trustline_sidecar_requests_total", &[]).await,
        1.0,
        "only the request made with the valid SVID was served"
    );
}

/// An HTTP/2 client connection over mutual TLS, and its driver.
async fn h2_connect(
    addr: SocketAddr,
    cfg: &Arc<rustls::ClientConfig>,
) -> (
    hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    tokio::task::JoinHandle<Result<(), hyper::Error>>,
) {
    let tls = tls_connect(addr, cfg).await.expect("handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
        .await
        .unwrap();
    (send, tokio::spawn(conn))
}

/// An HTTP/1.1 client connection (keep-alive) over mutual TLS, and its driver.
async fn h1_connect(
    addr: SocketAddr,
    cfg: &Arc<rustls::ClientConfig>,
) -> (
    hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    tokio::task::JoinHandle<Result<(), hyper::Error>>,
) {
    let tls = tls_connect(addr, cfg).await.expect("handshake");
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    (send, tokio::spawn(conn))
}

fn get(uri: &str) -> http::Request<Empty<Bytes>> {
    http::Request::builder()
        .uri(uri)
        .header("host", "api")
        .body(Empty::new())
        .unwrap()
}

/// Waits (bounded) for a client connection's driver to end: the server closed the connection (HTTP/1.1) or
/// sent GOAWAY and closed it (HTTP/2).
async fn closed_by_server(conn: tokio::task::JoinHandle<Result<(), hyper::Error>>, what: &str) {
    tokio::time::timeout(PATIENCE + Duration::from_secs(60), conn)
        .await
        .unwrap_or_else(|_| panic!("{what}: the server did not close the connection"))
        .unwrap()
        .unwrap_or_else(|e| panic!("{what}: the connection ended with an error: {e}"));
}

/// Caught (without the per-request check): the inbound listener verified the peer's certificate at the handshake
/// only, so a keep-alive HTTP/1.1 or HTTP/2 connection opened with a 40 s SVID went on being served as
/// `spiffe://example.org/web` after the SVID expired. And without the retirement ahead of expiry, connections
/// that carried requests early stayed open past it (HTTP/2 forever, HTTP/1.1 until the idle timeout, an hour
/// here).
#[tokio::test(flavor = "multi_thread")]
async fn a_live_connection_takes_no_request_once_its_peer_has_expired() {
    let mesh = Mesh::start("");
    let app = echo_app().await;
    let api = api_sidecar(&mesh, app);
    let addr = api.inbound[0];
    let (chain, key, not_after) = mint_web(&mesh, "40s", "web");
    let h1 = Arc::new(client(&mesh, Some((&chain, &key)), b"http/1.1"));
    let h2 = Arc::new(client(&mesh, Some((&chain, &key)), b"h2"));

    // Early in the SVID's life: keep-alive connections serve requests as web.
    let (mut early_h1, early_h1_conn) = h1_connect(addr, &h1).await;
    let r = early_h1.send_request(get("/early")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers().get("connection").is_none_or(|v| v != "close"),
        "{:?}",
        r.headers()
    );
    let (mut early_h2, early_h2_conn) = h2_connect(addr, &h2).await;
    let r = early_h2.send_request(get("http://api/early")).await.unwrap();
    assert_eq!(r.status(), 200);

    // Idle, both are retired ahead of the SVID's end: the parked HTTP/1.1 connection is closed, the HTTP/2
    // one goes away (GOAWAY). A client that needs another request opens a new connection with its new SVID.
    closed_by_server(early_h1_conn, "HTTP/1.1").await;
    closed_by_server(early_h2_conn, "HTTP/2").await;

    // Connections opened in the last tenth of the SVID's life (a peer that has not renewed) and silent until
    // it has expired: their first request is refused, and the connection drains.
    clock_reaches(retire_from(&chain)).await;
    let (mut late_h1, late_h1_conn) = h1_connect(addr, &h1).await;
    let (mut late_h2, late_h2_conn) = h2_connect(addr, &h2).await;
    clock_reaches(not_after + 1).await;

    let r = late_h1.send_request(get("/late")).await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(
        r.headers().get("connection").map(|v| v.to_str().unwrap()),
        Some("close")
    );
    let body: serde_json::Value =
        serde_json::from_slice(&r.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["error"], "peer_certificate_expired", "{body}");
    assert_eq!(body["principal"], format!("{TD}/web"), "{body}");
    assert!(
        body["reason"].as_str().unwrap().contains(&not_after.to_string()),
        "the reason names the notAfter: {body}"
    );
    closed_by_server(late_h1_conn, "HTTP/1.1 after the refusal").await;

    let grpc = http::Request::builder()
        .method("POST")
        .uri("http://api/trustline.test.v1.Echo/Say")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Empty::new())
        .unwrap();
    let r = late_h2.send_request(grpc).await.unwrap();
    assert_eq!(
        r.headers().get("grpc-status").map(|v| v.to_str().unwrap()),
        Some("7"),
        "PERMISSION_DENIED, trailers-only: {:?}",
        r.headers()
    );
    closed_by_server(late_h2_conn, "HTTP/2 after the refusal").await;

    assert_eq!(
        api.metric(
            "trustline_sidecar_requests_total",
            &[("decision", "peer_certificate_expired")]
        )
        .await,
        2.0
    );
    assert_eq!(
        api.metric("trustline_sidecar_requests_total", &[("decision", "allow")])
            .await,
        2.0,
        "only the requests made while the SVID was valid reached the app"
    );
    assert!(api.logged("request refused on a live connection"));
    assert!(api.logged("reason=\"peer_certificate_expired\""));
}
