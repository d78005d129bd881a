//! The sidecar's hybrid post-quantum key exchange against an independent TLS stack, BoringSSL (the `boring`
//! crate): a BoringSSL client calling the inbound listener and a BoringSSL server as the upstream of the outbound
//! listener, both TLS 1.3 with client certificates (X.509-SVIDs minted by the real CA), both offering only
//! X25519MLKEM768, and both asserting that group was negotiated; then a client offering only X25519, which must
//! get X25519 — so the assertion can fail.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use boring::ec::{EcGroup, EcKey};
use boring::hash::MessageDigest;
use boring::nid::Nid;
use boring::pkey::PKey;
use boring::ssl::{
    select_next_proto, AlpnError, Ssl, SslContext, SslContextBuilder, SslFiletype, SslMethod, SslRef,
    SslVerifyMode, SslVersion,
};
use boring::stack::Stack;
use boring::x509::extension::SubjectAlternativeName;
use boring::x509::{X509NameBuilder, X509Ref, X509ReqBuilder};

use support::{echo_app, read_http, Mesh, IO_TIMEOUT, TD};

const HANDSHAKES: &str = "trustline_sidecar_tls_handshakes_total";

/// A fresh EC P-256 key and a CSR for it with `spiffe://example.org/<name>` as its URI SAN, made by BoringSSL;
/// the CA mints the SVID into a folder that then also holds `key.pem` (PKCS#8).
fn svid(mesh: &Mesh, name: &str) -> std::path::PathBuf {
    let key = PKey::from_ec_key(
        EcKey::generate(&EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap()).unwrap(),
    )
    .unwrap();
    let mut req = X509ReqBuilder::new().unwrap();
    req.set_pubkey(&key).unwrap();
    let mut subject = X509NameBuilder::new().unwrap();
    subject
        .append_entry_by_text("O", "trustline-interop-boring")
        .unwrap();
    req.set_subject_name(&subject.build()).unwrap();
    let san = SubjectAlternativeName::new()
        .uri(&format!("{TD}/{name}"))
        .build(&req.x509v3_context(None))
        .unwrap();
    let mut exts = Stack::new().unwrap();
    exts.push(san).unwrap();
    req.add_extensions(&exts).unwrap();
    req.sign(&key, MessageDigest::sha256()).unwrap();
    let dir = mesh.mint(name, &req.build().to_der().unwrap());
    std::fs::write(dir.join("key.pem"), key.private_key_to_pem_pkcs8().unwrap()).unwrap();
    dir
}

/// A BoringSSL context: TLS 1.3 only, key exchange limited to `groups`, our SVID (chain and key) from `dir`,
/// the peer verified against the trust bundle there (BoringSSL checks the chain; the tests check the ID).
fn context(dir: &Path, groups: &str, verify: SslVerifyMode) -> SslContextBuilder {
    let mut ctx = SslContext::builder(SslMethod::tls()).unwrap();
    ctx.set_min_proto_version(Some(SslVersion::TLS1_3)).unwrap();
    ctx.set_max_proto_version(Some(SslVersion::TLS1_3)).unwrap();
    ctx.set_curves_list(groups).unwrap();
    ctx.set_certificate_chain_file(dir.join("svid.pem")).unwrap();
    ctx.set_private_key_file(dir.join("key.pem"), SslFiletype::PEM)
        .unwrap();
    ctx.check_private_key().unwrap();
    ctx.set_ca_file(dir.join("bundle.pem")).unwrap();
    ctx.set_verify(verify);
    ctx
}

/// The URI SANs of a certificate.
fn uris(cert: &X509Ref) -> Vec<String> {
    cert.subject_alt_names()
        .map(|names| names.iter().filter_map(|n| n.uri().map(str::to_owned)).collect())
        .unwrap_or_default()
}

/// What a BoringSSL endpoint saw of one connection.
#[derive(Debug)]
struct Seen {
    /// The negotiated key exchange group, by BoringSSL's name.
    group: Option<String>,
    /// The peer certificate's URI SANs.
    peer: Vec<String>,
    /// The HTTP message received (a response for the client, a request for the server).
    http: String,
}

fn seen(ssl: &SslRef, http: String) -> Seen {
    Seen {
        group: ssl.curve_name().map(str::to_owned),
        peer: ssl.peer_certificate().map(|c| uris(&c)).unwrap_or_default(),
        http,
    }
}

/// A BoringSSL client offering only `groups` sends one HTTP/1.1 GET to the sidecar's inbound listener `addr`.
fn boring_get(dir: &Path, groups: &str, addr: SocketAddr, path: &str) -> Seen {
    let mut ctx = context(dir, groups, SslVerifyMode::PEER);
    ctx.set_alpn_protos(b"\x08http/1.1").unwrap();
    let ctx = ctx.build();
    let tcp = TcpStream::connect_timeout(&addr, IO_TIMEOUT).unwrap();
    tcp.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    tcp.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut tls = Ssl::new(&ctx)
        .unwrap()
        .connect(tcp)
        .unwrap_or_else(|e| panic!("BoringSSL handshake with the sidecar failed: {e}"));
    assert_eq!(tls.ssl().version_str(), "TLSv1.3");
    tls.ssl()
        .verify_result()
        .expect("BoringSSL verified the sidecar's chain against the bundle");
    write!(
        tls,
        "GET {path} HTTP/1.1\r\nhost: api\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let response = read_http(&mut tls, false);
    seen(tls.ssl(), response)
}

#[test]
fn boringssl_client_negotiates_x25519mlkem768_with_the_inbound_sidecar() {
    let app = echo_app();
    let mesh = Mesh::start(
        "api",
        &format!("[[inbound]]\nlisten = \"127.0.0.1:0\"\napp = \"{app}\"\n"),
    );
    let dir = svid(&mesh, "boring-client");
    let s = boring_get(&dir, "X25519MLKEM768", mesh.sidecar.inbound[0], "/pq");

    assert!(s.http.starts_with("HTTP/1.1 200"), "{}", s.http);
    assert_eq!(s.group.as_deref(), Some("X25519MLKEM768"), "{s:?}");
    assert_eq!(s.peer, [format!("{TD}/api")], "the sidecar's SVID");
    // The app's echo of its request: the sidecar authenticated BoringSSL's SVID.
    assert!(
        s.http.to_ascii_lowercase().contains(&format!(
            "x-forwarded-client-cert: by={TD}/api;uri={TD}/boring-client"
        )),
        "{}",
        s.http
    );
    // The sidecar agrees on the group.
    let pq = [
        ("direction", "inbound"),
        ("outcome", "ok"),
        ("group", "X25519MLKEM768"),
    ];
    assert_eq!(
        mesh.sidecar.metric(HANDSHAKES, &pq),
        1.0,
        "{}",
        mesh.sidecar.proc.logs()
    );
}

#[test]
fn boringssl_client_offering_only_x25519_gets_x25519() {
    let app = echo_app();
    let mesh = Mesh::start(
        "api",
        &format!("[[inbound]]\nlisten = \"127.0.0.1:0\"\napp = \"{app}\"\n"),
    );
    let dir = svid(&mesh, "boring-classic");
    let s = boring_get(&dir, "X25519", mesh.sidecar.inbound[0], "/classic");

    assert!(s.http.starts_with("HTTP/1.1 200"), "{}", s.http);
    assert_eq!(s.group.as_deref(), Some("X25519"), "{s:?}");
    let sidecar = &mesh.sidecar;
    let labels = |group| [("direction", "inbound"), ("outcome", "ok"), ("group", group)];
    assert_eq!(sidecar.metric(HANDSHAKES, &labels("X25519")), 1.0);
    assert_eq!(sidecar.metric(HANDSHAKES, &labels("X25519MLKEM768")), 0.0);
}

/// Serves `listener` as a BoringSSL server offering only X25519MLKEM768 and requiring a client certificate that
/// chains to the bundle: answers each request `200` and reports what it saw, until `deadline`.
fn boring_server(listener: TcpListener, dir: &Path, deadline: Instant) -> mpsc::Receiver<Seen> {
    let mut ctx = context(
        dir,
        "X25519MLKEM768",
        SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT,
    );
    ctx.set_alpn_select_callback(|_, client| {
        select_next_proto(b"\x08http/1.1", client).ok_or(AlpnError::NOACK)
    });
    let ctx = ctx.build();
    listener.set_nonblocking(true).unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        while Instant::now() < deadline {
            let tcp = match listener.accept() {
                Ok((tcp, _)) => tcp,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                Err(e) => panic!("accept: {e}"),
            };
            tcp.set_nonblocking(false).unwrap();
            tcp.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            tcp.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
            let mut tls = match Ssl::new(&ctx).unwrap().accept(tcp) {
                Ok(tls) => tls,
                Err(e) => {
                    eprintln!("BoringSSL server: handshake failed: {e}");
                    continue;
                }
            };
            let request = read_http(&mut tls, true);
            let body = "hello from BoringSSL";
            let _ = write!(
                tls,
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = tls.shutdown();
            if tx.send(seen(tls.ssl(), request)).is_err() {
                return;
            }
        }
    });
    rx
}

#[test]
fn outbound_sidecar_negotiates_x25519mlkem768_with_a_boringssl_upstream() {
    // Bind first: the sidecar's route names the upstream's address; the server's SVID comes from the mesh's CA.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream = listener.local_addr().unwrap();
    let mesh = Mesh::start(
        "web",
        &format!(
            "[[outbound]]\nlisten = \"127.0.0.1:0\"\n[[outbound.route]]\nhost = \"boring\"\nupstream = \"{upstream}\"\nspiffe_ids = [\"{TD}/boring-server\"]\n"
        ),
    );
    let dir = svid(&mesh, "boring-server");
    let seen = boring_server(listener, &dir, Instant::now() + Duration::from_secs(60));

    // The app calls its sidecar in plaintext; the sidecar originates mutual TLS to BoringSSL.
    let response = support::http_get(mesh.sidecar.outbound[0], "boring", "/pq-upstream");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with("hello from BoringSSL"), "{response}");
    let s = seen.recv_timeout(IO_TIMEOUT).unwrap();
    assert_eq!(s.group.as_deref(), Some("X25519MLKEM768"), "{s:?}");
    assert_eq!(s.peer, [format!("{TD}/web")], "the sidecar's client SVID");
    assert!(s.http.starts_with("GET /pq-upstream HTTP/1.1"), "{}", s.http);
    let pq = [
        ("direction", "outbound"),
        ("outcome", "ok"),
        ("group", "X25519MLKEM768"),
    ];
    assert_eq!(
        mesh.sidecar.metric(HANDSHAKES, &pq),
        1.0,
        "{}",
        mesh.sidecar.proc.logs()
    );
}

/// BoringSSL and the system OpenSSL export the same symbols: this binary must not load the latter (a dependency
/// that links `openssl-sys` would bring `libssl.so`/`libcrypto.so` in).
#[test]
fn the_system_openssl_is_not_linked() {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    for lib in ["libssl.so", "libcrypto.so"] {
        assert!(
            !maps.contains(lib),
            "{lib} is loaded: a dependency links the system OpenSSL"
        );
    }
}
