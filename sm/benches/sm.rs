//! SM primitives and SM TLS vs classic TLS, over loopback. No criterion: each figure is a timed loop.
//!
//! Run: `cargo bench -p trustline-sm --bench sm`
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use openssl::asn1::Asn1Time;
use openssl::bn::BigNum;
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::x509::extension::{BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName};
use openssl::x509::{X509NameBuilder, X509};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use trustline_sm::{sm2, sm4gcm};

const RUN: Duration = Duration::from_secs(2);
const RECORD: usize = 16 * 1024;
const BULK: usize = 128 * 1024 * 1024;

/// Runs `f` repeatedly for about `RUN`; returns operations per second.
fn rate(mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < RUN {
        f();
        n += 1;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn primitives() {
    let key = sm2::generate().unwrap();
    let spki = key.public_key_der().unwrap();
    let msg = [0x5au8; 64];
    let sig = key.sign(&msg).unwrap();
    println!(
        "SM2 sign (SM3, ID 1234567812345678):  {:>10.0} signatures/s",
        rate(|| drop(key.sign(&msg).unwrap()))
    );
    println!(
        "SM2 verify:                           {:>10.0} verifications/s",
        rate(|| sm2::verify(&spki, &msg, &sig).unwrap())
    );
    let p256 = EcKey::generate(&EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap()).unwrap();
    let p256 = PKey::from_ec_key(p256).unwrap();
    let ecdsa_sig = {
        let mut s = openssl::sign::Signer::new(MessageDigest::sha256(), &p256).unwrap();
        s.sign_oneshot_to_vec(&msg).unwrap()
    };
    println!(
        "  (reference, same OpenSSL) ECDSA P-256 sign {:>8.0}/s, verify {:>8.0}/s",
        rate(|| {
            let mut s = openssl::sign::Signer::new(MessageDigest::sha256(), &p256).unwrap();
            drop(s.sign_oneshot_to_vec(&msg).unwrap());
        }),
        rate(|| {
            let mut v = openssl::sign::Verifier::new(MessageDigest::sha256(), &p256).unwrap();
            assert!(v.verify_oneshot(&ecdsa_sig, &msg).unwrap());
        })
    );
    let k = [7u8; 16];
    let nonce = [1u8; 12];
    let record = vec![0xa5u8; RECORD];
    let per_s = rate(|| drop(sm4gcm::seal(&k, &nonce, b"hdr", &record).unwrap()));
    println!(
        "SM4-GCM seal, 16 KiB records:         {:>10.1} MB/s",
        per_s * RECORD as f64 / 1e6
    );
    let sealed = sm4gcm::seal(&k, &nonce, b"hdr", &record).unwrap();
    let per_s = rate(|| drop(sm4gcm::open(&k, &nonce, b"hdr", &sealed).unwrap()));
    println!(
        "SM4-GCM open, 16 KiB records:         {:>10.1} MB/s",
        per_s * RECORD as f64 / 1e6
    );
}

/// Classic configs: aws-lc-rs, TLS13_AES_128_GCM_SHA256 + X25519 + ECDSA P-256 certificates, mutual TLS.
fn classic_configs() -> (Arc<ServerConfig>, Arc<ClientConfig>) {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites = vec![rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256];
    provider.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::X25519];
    let provider = Arc::new(provider);
    let new_key = || {
        PKey::from_ec_key(EcKey::generate(&EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap()).unwrap())
            .unwrap()
    };
    let name = |cn: &str| {
        let mut b = X509NameBuilder::new().unwrap();
        b.append_entry_by_text("CN", cn).unwrap();
        b.build()
    };
    let cert = |subject: &str, key: &PKey<Private>, issuer: Option<(&X509, &PKey<Private>)>| {
        let mut b = X509::builder().unwrap();
        b.set_version(2).unwrap();
        b.set_serial_number(&BigNum::from_u32(rand_u32()).unwrap().to_asn1_integer().unwrap())
            .unwrap();
        b.set_subject_name(&name(subject)).unwrap();
        b.set_pubkey(key).unwrap();
        b.set_not_before(&Asn1Time::days_from_now(0).unwrap()).unwrap();
        b.set_not_after(&Asn1Time::days_from_now(1).unwrap()).unwrap();
        match issuer {
            None => {
                b.set_issuer_name(&name(subject)).unwrap();
                b.append_extension(BasicConstraints::new().critical().ca().build().unwrap())
                    .unwrap();
                b.append_extension(KeyUsage::new().critical().key_cert_sign().build().unwrap())
                    .unwrap();
                b.sign(key, MessageDigest::sha256()).unwrap();
            }
            Some((ca, ca_key)) => {
                b.set_issuer_name(ca.subject_name()).unwrap();
                b.append_extension(BasicConstraints::new().critical().build().unwrap())
                    .unwrap();
                b.append_extension(KeyUsage::new().critical().digital_signature().build().unwrap())
                    .unwrap();
                b.append_extension(
                    ExtendedKeyUsage::new()
                        .server_auth()
                        .client_auth()
                        .build()
                        .unwrap(),
                )
                .unwrap();
                let san = SubjectAlternativeName::new()
                    .dns("localhost")
                    .build(&b.x509v3_context(Some(ca), None))
                    .unwrap();
                b.append_extension(san).unwrap();
                b.sign(ca_key, MessageDigest::sha256()).unwrap();
            }
        }
        b.build()
    };
    let ca_key = new_key();
    let ca = cert("classic CA", &ca_key, None);
    let leaf = |cn: &str| {
        let key = new_key();
        let c = cert(cn, &key, Some((&ca, &ca_key)));
        (
            vec![CertificateDer::from(c.to_der().unwrap())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.private_key_to_pkcs8().unwrap())),
        )
    };
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from(ca.to_der().unwrap())).unwrap();
    let roots = Arc::new(roots);
    let (s_chain, s_key) = leaf("server");
    let (c_chain, c_key) = leaf("client");
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .unwrap();
    let server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(s_chain, s_key)
        .unwrap();
    let client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(c_chain, c_key)
        .unwrap();
    (Arc::new(server), Arc::new(client))
}

fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    openssl::rand::rand_bytes(&mut b).unwrap();
    u32::from_be_bytes(b) >> 1
}

fn sm_configs() -> (Arc<ServerConfig>, Arc<ClientConfig>) {
    let ca = common::Ca::new("bench SM2 CA");
    let server = ca.issue("server");
    let client = ca.issue("client");
    (
        common::sm_server_config(&ca, &server),
        common::sm_client_config(&ca, &client),
    )
}

/// Full mutual-TLS handshakes per second (new TCP connection each, no resumption), then bulk MB/s on one
/// connection (client → server, 16 KiB writes), over 127.0.0.1.
async fn tls(label: &str, (server, client): (Arc<ServerConfig>, Arc<ClientConfig>)) {
    let mut server = (*server).clone();
    server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    server.send_tls13_tickets = 0;
    let acceptor = TlsAcceptor::from(Arc::new(server));
    let mut client = (*client).clone();
    client.resumption = rustls::client::Resumption::disabled();
    let connector = TlsConnector::from(Arc::new(client));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = vec![0u8; 64 * 1024];
                let mut total = 0usize;
                loop {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => total += n,
                    }
                }
                let _ = tls.write_all(&(total as u64).to_be_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    let name = ServerName::try_from("localhost").unwrap();

    let start = Instant::now();
    let mut n = 0u32;
    while start.elapsed() < RUN {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut tls = connector.connect(name.clone(), tcp).await.unwrap();
        tls.shutdown().await.unwrap();
        n += 1;
    }
    let hs = f64::from(n) / start.elapsed().as_secs_f64();

    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls = connector.connect(name.clone(), tcp).await.unwrap();
    let suite = tls.get_ref().1.negotiated_cipher_suite().unwrap().suite();
    let group = tls.get_ref().1.negotiated_key_exchange_group().unwrap().name();
    let chunk = vec![0x42u8; RECORD];
    let start = Instant::now();
    for _ in 0..BULK / RECORD {
        tls.write_all(&chunk).await.unwrap();
    }
    tls.shutdown().await.unwrap();
    let mut count = [0u8; 8];
    tls.read_exact(&mut count).await.unwrap();
    let mbs = BULK as f64 / start.elapsed().as_secs_f64() / 1e6;
    assert_eq!(u64::from_be_bytes(count), BULK as u64);
    println!(
        "{label:<8} suite {:#06x} group {:#06x}: {hs:>7.0} handshakes/s (mutual TLS, full), {mbs:>7.1} MB/s bulk",
        u16::from(suite),
        u16::from(group)
    );
}

fn main() {
    println!("$ cargo bench -p trustline-sm --bench sm");
    println!(
        "({} cores; each figure is a {} s loop; TLS over 127.0.0.1 with tokio-rustls, client and server in this process)",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        RUN.as_secs()
    );
    primitives();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        tls("SM", sm_configs()).await;
        tls("classic", classic_configs()).await;
    });
}
