//! What refusing TLS session resumption costs: handshakes per second in memory (no sockets, no network), on one
//! thread doing both sides, mutual TLS 1.3 with P-256 X.509-SVIDs as our CA issues and our provider's key
//! exchange (X25519MLKEM768 first):
//!
//! - **full**: our configs as they are (`tls::server_config`, `tls::client_config`): every connection a full
//!   handshake, both certificates sent, signed and verified;
//! - **resumed**: the same configs with resumption put back as rustls has it by default (a server session
//!   cache of 256 and two TLS 1.3 tickets per connection, a client cache): every connection after the first
//!   resumes (PSK with (EC)DHE: a key exchange, no certificates, no signatures, no verifier).
//!
//! Each measurement runs `TRUSTLINE_BENCH_SECS` (default 3) seconds; three rounds, the modes interleaved.
//! Besides handshakes per second (both sides on one core), the time spent in the server side is reported
//! apart: that is the inbound sidecar's cost per connection.
//! Run: `cargo bench -p trustline-bench --bench resumption`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::ServerName;
use rustls::{ClientConnection, HandshakeKind, ServerConnection};
use trustline_identity::spiffe_id::{SpiffeId, TrustDomain};
use trustline_identity::tls::{
    client_config, server_config, ExpectedPeer, RotatingCert, SpiffeClientVerifier, SpiffeServerVerifier,
    TrustBundle,
};

/// A CA of `example.org` with a P-256 key, and SVIDs it signs, as `trustline-ca` issues them.
struct Pki {
    root: Vec<u8>,
    issuer: rcgen::Issuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Self {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.subject_alt_names
            .push(SanType::URI("spiffe://example.org".try_into().unwrap()));
        let root = p.self_signed(&key).unwrap().der().to_vec();
        Self {
            root,
            issuer: rcgen::Issuer::new(p, key),
        }
    }

    fn svid(&self, name: &str) -> Arc<RotatingCert> {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.subject_alt_names.push(SanType::URI(
            format!("spiffe://example.org/{name}").try_into().unwrap(),
        ));
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.is_ca = IsCa::ExplicitNoCa;
        let leaf = p.signed_by(&key, &self.issuer).unwrap();
        let rc = Arc::new(RotatingCert::default());
        rc.set(vec![leaf.der().to_vec()], &key.serialize_der()).unwrap();
        rc
    }

    fn bundle(&self) -> TrustBundle {
        TrustBundle::new(
            TrustDomain::new("example.org").unwrap(),
            std::slice::from_ref(&self.root),
        )
        .unwrap()
    }
}

/// Time spent in each side.
#[derive(Default)]
struct Split {
    client: Duration,
    server: Duration,
}

/// One connection in memory until neither side has anything left to send (tickets included).
fn connect(
    client: &Arc<rustls::ClientConfig>,
    server: &Arc<rustls::ServerConfig>,
    split: &mut Split,
) -> HandshakeKind {
    let t = Instant::now();
    let mut c = ClientConnection::new(client.clone(), ServerName::try_from("api").unwrap()).unwrap();
    split.client += t.elapsed();
    let t = Instant::now();
    let mut s = ServerConnection::new(server.clone()).unwrap();
    split.server += t.elapsed();
    let mut buf = Vec::with_capacity(8192);
    loop {
        let mut moved = false;
        let t = Instant::now();
        while c.wants_write() {
            buf.clear();
            c.write_tls(&mut buf).unwrap();
            moved = true;
        }
        split.client += t.elapsed();
        if !buf.is_empty() {
            let t = Instant::now();
            let mut rest = buf.as_slice();
            while !rest.is_empty() {
                s.read_tls(&mut rest).unwrap();
                s.process_new_packets().unwrap();
            }
            split.server += t.elapsed();
            buf.clear();
        }
        let t = Instant::now();
        while s.wants_write() {
            s.write_tls(&mut buf).unwrap();
            moved = true;
        }
        split.server += t.elapsed();
        if !buf.is_empty() {
            let t = Instant::now();
            let mut rest = buf.as_slice();
            while !rest.is_empty() {
                c.read_tls(&mut rest).unwrap();
                c.process_new_packets().unwrap();
            }
            split.client += t.elapsed();
            buf.clear();
        }
        if !moved {
            break;
        }
    }
    assert!(!c.is_handshaking() && !s.is_handshaking());
    assert!(
        s.peer_certificates().is_some(),
        "mutual TLS: the server knows the client"
    );
    c.handshake_kind().unwrap()
}

/// Connections per second for `secs`, and the microseconds each side spent per connection.
fn measure(
    client: &Arc<rustls::ClientConfig>,
    server: &Arc<rustls::ServerConfig>,
    want: HandshakeKind,
    secs: Duration,
) -> (f64, f64, f64) {
    let mut split = Split::default();
    // Warm-up, and for the resumed mode the first (full) handshake that yields the tickets.
    connect(client, server, &mut split);
    let mut split = Split::default();
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < secs {
        assert_eq!(connect(client, server, &mut split), want);
        n += 1;
    }
    let took = start.elapsed().as_secs_f64();
    let per = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    (n as f64 / took, per(split.server), per(split.client))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` lists benches; nothing to list.
    }
    let secs = Duration::from_secs(
        std::env::var("TRUSTLINE_BENCH_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3),
    );
    let pki = Pki::new();
    let verifier = Arc::new(SpiffeClientVerifier::new(pki.bundle(), true));
    let ours_server = server_config(pki.svid("api"), verifier).unwrap();
    let ours_client = client_config(
        Arc::new(SpiffeServerVerifier::new(
            pki.bundle(),
            ExpectedPeer::OneOf(vec![SpiffeId::new("spiffe://example.org/api").unwrap()]),
        )),
        Some(pki.svid("web")),
    )
    .unwrap();
    let full = (Arc::new(ours_server.clone()), Arc::new(ours_client.clone()));
    let resuming = {
        let mut s = ours_server;
        s.session_storage = rustls::server::ServerSessionMemoryCache::new(256);
        s.send_tls13_tickets = 2;
        let mut c = ours_client;
        c.resumption = rustls::client::Resumption::in_memory_sessions(256);
        (Arc::new(s), Arc::new(c))
    };
    let group = trustline_identity::tls::provider().kx_groups[0].name();
    println!(
        "in-memory mutual TLS 1.3 handshakes, one thread for both sides, P-256 SVIDs, key exchange {group:?}, {}s each",
        secs.as_secs()
    );
    println!("| round | mode | handshakes/s | server µs/handshake | client µs/handshake |");
    println!("| --- | --- | --- | --- | --- |");
    for round in 1..=3 {
        for (name, (server, client), want) in [
            ("full (ours)", &full, HandshakeKind::Full),
            ("resumed (rustls defaults)", &resuming, HandshakeKind::Resumed),
        ] {
            let (rate, server_us, client_us) = measure(client, server, want, secs);
            println!("| {round} | {name} | {rate:.0} | {server_us:.0} | {client_us:.0} |");
        }
    }
}
