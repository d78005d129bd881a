//! `ServerTls` (the inbound TLS stream on rustls' unbuffered API) against a `tokio-rustls` client, over real
//! sockets on 127.0.0.1: handshake and mutual authentication, data both ways, close_notify, refused peers,
//! readiness for parking, and peers that vanish.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::{poll_fn, Future};
use std::io;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{AlertDescription, ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use trustline_sidecar::park::Transport;
use trustline_sidecar::tls_stream::ServerTls;

const MIB: usize = 1 << 20;

/// Every test is bounded: a hang is a failure, not a stuck CI job.
async fn bounded<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .expect("the test did not finish within 20 s")
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A certificate authority that signs leaves.
struct Ca {
    cert: CertificateDer<'static>,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap().der().clone();
        Self {
            cert,
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    fn roots(&self) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots.add(self.cert.clone()).unwrap();
        Arc::new(roots)
    }

    /// A leaf for `usage`, its chain (leaf only) and key.
    fn leaf(
        &self,
        name: &str,
        usage: rcgen::ExtendedKeyUsagePurpose,
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        (vec![cert.der().clone()], key)
    }
}

/// A CA, the server's config (TLS 1.3, client certificates from the CA required, ALPN http/1.1) and a client
/// certificate from the CA.
struct Pki {
    ca: Ca,
    server: Arc<ServerConfig>,
    client_chain: Vec<CertificateDer<'static>>,
    client_key: PrivateKeyDer<'static>,
}

impl Pki {
    fn new() -> Self {
        let ca = Ca::new("Test CA");
        let verifier = WebPkiClientVerifier::builder_with_provider(ca.roots(), provider())
            .build()
            .unwrap();
        let (chain, key) = ca.leaf("localhost", rcgen::ExtendedKeyUsagePurpose::ServerAuth);
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .unwrap();
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        let (client_chain, client_key) = ca.leaf("client.test", rcgen::ExtendedKeyUsagePurpose::ClientAuth);
        Self {
            ca,
            server: Arc::new(server),
            client_chain,
            client_key,
        }
    }

    fn client_builder(&self) -> rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert> {
        ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(self.ca.roots())
    }

    /// A client presenting the CA's client certificate and offering ALPN http/1.1.
    fn client(&self) -> Arc<ClientConfig> {
        let mut c = self
            .client_builder()
            .with_client_auth_cert(self.client_chain.clone(), self.client_key.clone_key())
            .unwrap();
        c.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(c)
    }
}

/// Connects `client` to a fresh listener whose one connection `ServerTls::accept`s with `server`; the two
/// handshakes run concurrently and both results are returned.
async fn connect(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
) -> (io::Result<ServerTls>, io::Result<TlsStream<TcpStream>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accept = async move {
        let (tcp, _) = listener.accept().await.unwrap();
        ServerTls::accept(tcp, server).await
    };
    let dial = async move {
        let tcp = TcpStream::connect(addr).await.unwrap();
        TlsConnector::from(client)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
    };
    tokio::join!(accept, dial)
}

/// Both ends of an accepted connection.
async fn pair(pki: &Pki) -> (ServerTls, TlsStream<TcpStream>) {
    let (server, client) = connect(pki.server.clone(), pki.client()).await;
    (server.unwrap(), client.unwrap())
}

fn pattern(i: usize) -> u8 {
    u8::try_from((i * 7 + i / 251) % 251).unwrap()
}

fn patterned(len: usize) -> Vec<u8> {
    (0..len).map(pattern).collect()
}

/// The `rustls::Error` an `io::Error` wraps, if any.
fn rustls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

/// What the client sees of a refusal: its handshake fails, or (TLS 1.3 clients finish before the server has
/// judged their certificate) its first read does.
async fn client_refusal(client: io::Result<TlsStream<TcpStream>>) -> io::Error {
    match client {
        Err(e) => e,
        Ok(mut tls) => {
            let mut buf = [0u8; 64];
            match tls.read(&mut buf).await {
                Err(e) => e,
                Ok(n) => panic!("a refused client read {n} bytes instead of an error"),
            }
        }
    }
}

#[tokio::test]
async fn the_handshake_authenticates_the_client_negotiates_alpn_and_echoes_messages() {
    bounded(async {
        let pki = Pki::new();
        let (mut server, mut client) = pair(&pki).await;

        let session = server.session();
        assert_eq!(session.peer_certificates(), Some(&pki.client_chain[..]));
        assert_eq!(session.alpn_protocol(), Some(&b"http/1.1"[..]));
        assert_eq!(session.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
        assert_eq!(client.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
        assert_eq!(
            server.tcp().peer_addr().unwrap(),
            client.get_ref().0.local_addr().unwrap()
        );

        let echo = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let mut echoed = 0;
            loop {
                let n = server.read(&mut buf).await.unwrap();
                if n == 0 {
                    return echoed;
                }
                server.write_all(&buf[..n]).await.unwrap();
                server.flush().await.unwrap();
                echoed += n;
            }
        });

        let mut sent = 0;
        for i in 0..10 {
            let msg = format!("message {i}: {}", "x".repeat(i * 13));
            client.write_all(msg.as_bytes()).await.unwrap();
            client.flush().await.unwrap();
            let mut back = vec![0u8; msg.len()];
            client.read_exact(&mut back).await.unwrap();
            assert_eq!(back, msg.as_bytes());
            sent += msg.len();
        }
        client.shutdown().await.unwrap();
        assert_eq!(echo.await.unwrap(), sent);
    })
    .await;
}

#[tokio::test]
async fn a_megabyte_goes_each_way_in_odd_writes_and_small_reads() {
    bounded(async {
        let pki = Pki::new();
        let (mut server, mut client) = pair(&pki).await;

        let server_side = tokio::spawn(async move {
            // Reads with a buffer smaller than a record: records are delivered across several reads.
            let mut buf = [0u8; 1000];
            let mut got = 0;
            while got < MIB {
                let n = server.read(&mut buf).await.unwrap();
                assert!(n > 0, "end of stream after {got} bytes");
                for (k, b) in buf[..n].iter().enumerate() {
                    assert_eq!(*b, pattern(got + k), "byte {} differs", got + k);
                }
                got += n;
            }
            // One write of a megabyte: many records, more than one poll_write takes.
            server.write_all(&patterned(MIB)).await.unwrap();
            server.flush().await.unwrap();
            let n = server.read(&mut buf).await.unwrap();
            assert_eq!(n, 0, "the client sent more than a megabyte");
            server.shutdown().await.unwrap();
        });

        let data = patterned(MIB);
        for chunk in data.chunks(7001) {
            client.write_all(chunk).await.unwrap();
        }
        client.flush().await.unwrap();

        let mut buf = [0u8; 1000];
        let mut got = 0;
        while got < MIB {
            let n = client.read(&mut buf).await.unwrap();
            assert!(n > 0, "end of stream after {got} bytes");
            assert_eq!(&buf[..n], &data[got..got + n], "bytes {got}.. differ");
            got += n;
        }
        client.shutdown().await.unwrap();
        assert_eq!(client.read(&mut buf).await.unwrap(), 0);
        server_side.await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_megabyte_echoes_while_both_directions_are_busy() {
    bounded(async {
        let pki = Pki::new();
        let (server, client) = pair(&pki).await;

        // One task reads and writes the server stream, as copy_bidirectional and hyper do.
        let echo = tokio::spawn(async move {
            let (mut r, mut w) = tokio::io::split(server);
            let n = tokio::io::copy(&mut r, &mut w).await.unwrap();
            w.shutdown().await.unwrap();
            n
        });

        let (mut r, mut w) = tokio::io::split(client);
        let send = async move {
            let data = patterned(MIB);
            for chunk in data.chunks(7001) {
                w.write_all(chunk).await.unwrap();
            }
            w.shutdown().await.unwrap();
        };
        let receive = async move {
            let mut back = Vec::with_capacity(MIB);
            r.read_to_end(&mut back).await.unwrap();
            back
        };
        let ((), back) = tokio::join!(send, receive);
        assert_eq!(back.len(), MIB);
        assert!(back == patterned(MIB), "the echo differs from what was sent");
        assert_eq!(echo.await.unwrap(), u64::try_from(MIB).unwrap());
    })
    .await;
}

#[tokio::test]
async fn close_notify_from_the_client_ends_the_servers_stream_and_the_server_may_still_answer() {
    bounded(async {
        let pki = Pki::new();
        let (mut server, mut client) = pair(&pki).await;

        client.write_all(b"last request").await.unwrap();
        client.shutdown().await.unwrap();

        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"last request");
        let mut buf = [0u8; 16];
        assert_eq!(server.read(&mut buf).await.unwrap(), 0, "end of stream is sticky");

        // TLS 1.3 close_notify closes one direction: the server can still send, then close its own.
        server.write_all(b"last answer").await.unwrap();
        server.shutdown().await.unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"last answer");
    })
    .await;
}

#[tokio::test]
async fn close_notify_from_the_server_ends_the_clients_stream_without_error() {
    bounded(async {
        let pki = Pki::new();
        let (mut server, mut client) = pair(&pki).await;

        server.write_all(b"goodbye").await.unwrap();
        server.shutdown().await.unwrap();

        // rustls reports a socket closed without close_notify as an UnexpectedEof error: reaching the end
        // without one means close_notify arrived.
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"goodbye");

        // The client's side is still open: what it sends reaches the server.
        client.write_all(b"still here").await.unwrap();
        client.shutdown().await.unwrap();
        let mut from_client = Vec::new();
        server.read_to_end(&mut from_client).await.unwrap();
        assert_eq!(from_client, b"still here");
    })
    .await;
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused_with_an_alert() {
    bounded(async {
        let pki = Pki::new();
        let mut anonymous = pki.client_builder().with_no_client_auth();
        anonymous.alpn_protocols = vec![b"http/1.1".to_vec()];
        let (server, client) = connect(pki.server.clone(), Arc::new(anonymous)).await;

        let e = server.expect_err("the server accepted a client without a certificate");
        assert_eq!(
            rustls_error(&e),
            Some(&rustls::Error::NoCertificatesPresented),
            "server error: {e:?}"
        );

        let e = client_refusal(client).await;
        assert_eq!(
            rustls_error(&e),
            Some(&rustls::Error::AlertReceived(
                AlertDescription::CertificateRequired
            )),
            "client error: {e:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn a_client_certified_by_another_ca_is_refused_with_an_alert() {
    bounded(async {
        let pki = Pki::new();
        let other = Ca::new("Other CA");
        let (chain, key) = other.leaf("client.test", rcgen::ExtendedKeyUsagePurpose::ClientAuth);
        let mut stranger = pki.client_builder().with_client_auth_cert(chain, key).unwrap();
        stranger.alpn_protocols = vec![b"http/1.1".to_vec()];
        let (server, client) = connect(pki.server.clone(), Arc::new(stranger)).await;

        let e = server.expect_err("the server accepted a client certified by another CA");
        assert_eq!(
            rustls_error(&e),
            Some(&rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer
            )),
            "server error: {e:?}"
        );

        let e = client_refusal(client).await;
        assert_eq!(
            rustls_error(&e),
            Some(&rustls::Error::AlertReceived(AlertDescription::UnknownCA)),
            "client error: {e:?}"
        );
    })
    .await;
}

/// Checks that `poll_readable` stays pending for 200 ms.
async fn assert_quiet(server: &ServerTls, when: &str) {
    let quiet = tokio::time::timeout(
        Duration::from_millis(200),
        poll_fn(|cx| Transport::poll_readable(server, cx)),
    )
    .await;
    assert!(quiet.is_err(), "poll_readable resolved {when}: {quiet:?}");
}

/// The client sends `bytes`; the server's `poll_readable` resolves.
async fn send_and_wait_readable<C: tokio::io::AsyncWrite + Unpin>(
    client: &mut C,
    server: &ServerTls,
    bytes: &[u8],
) {
    client.write_all(bytes).await.unwrap();
    client.flush().await.unwrap();
    poll_fn(|cx| Transport::poll_readable(server, cx)).await.unwrap();
}

#[tokio::test]
async fn poll_readable_waits_for_the_client_and_resolves_when_it_writes() {
    bounded(async {
        let pki = Pki::new();
        let (mut server, mut client) = pair(&pki).await;

        assert_quiet(&server, "while the client sent nothing").await;

        send_and_wait_readable(&mut client, &server, b"wake up, there is a request").await;

        // Part of it read: the rest is decrypted and waiting, so the stream is readable without the socket.
        let mut buf = [0u8; 8];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"wake up,");
        poll_fn(|cx| Transport::poll_readable(&server, cx)).await.unwrap();
        let mut rest = [0u8; 19];
        server.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b" there is a request");

        // All of it read: quiet again until the client writes.
        assert_quiet(&server, "with nothing left to read").await;

        send_and_wait_readable(&mut client, &server, b"again").await;
        let mut again = [0u8; 5];
        server.read_exact(&mut again).await.unwrap();
        assert_eq!(&again, b"again");
    })
    .await;
}

/// Reads until end of stream or an error (both are fine for a peer that vanished), returning the bytes read
/// and whether it ended with an error.
async fn read_until_end_or_error(server: &mut ServerTls) -> (Vec<u8>, Option<io::Error>) {
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        match server.read(&mut buf).await {
            Ok(0) => return (got, None),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return (got, Some(e)),
        }
    }
}

#[tokio::test]
async fn reads_end_when_the_client_drops_the_socket_without_close_notify() {
    bounded(async {
        let pki = Pki::new();
        let (mut server, mut client) = pair(&pki).await;

        client.write_all(b"last words").await.unwrap();
        client.flush().await.unwrap();
        let (tcp, _conn) = client.into_inner();
        drop(tcp);

        let (got, error) = read_until_end_or_error(&mut server).await;
        eprintln!("a vanished client ended the stream with {error:?} after {got:?}");
        // A reset (the client had unread session tickets) may discard what was in flight; a FIN may not.
        assert!(b"last words".starts_with(&got), "read {got:?}");
        if error.is_none() {
            assert_eq!(got, b"last words");
        }
        // And it stays ended.
        let mut buf = [0u8; 16];
        let again = server.read(&mut buf).await;
        assert!(matches!(again, Ok(0) | Err(_)), "read after the end: {again:?}");
    })
    .await;
}

#[tokio::test]
async fn reads_end_when_the_client_drops_the_socket_in_the_middle_of_a_record() {
    bounded(async {
        let pki = Pki::new();
        let (mut server, client) = pair(&pki).await;

        // The header of an application-data record of 200 bytes, and only 20 of them.
        let (mut tcp, _conn) = client.into_inner();
        let mut partial = vec![0x17, 0x03, 0x03, 0x00, 200];
        partial.extend_from_slice(&[0x5a; 20]);
        tcp.write_all(&partial).await.unwrap();
        tcp.shutdown().await.unwrap();
        drop(tcp);

        let (got, error) = read_until_end_or_error(&mut server).await;
        assert!(got.is_empty(), "read {got:?} from an incomplete record");
        eprintln!("a truncated record ended the stream with {error:?}");
    })
    .await;
}
