//! Issuance throughput: X.509-SVIDs (CSR in, signed certificate out, recorded in SQLite) and JWT-SVIDs
//! (minted, recorded), on ONE core (a current-thread runtime), with P-256 software keys.
//!
//! Run: `cargo bench -p trustline-ca --bench issuance` (prints the figures; see docs/benchmarks.md).
//! Set `TRUSTLINE_BENCH_N` to change the number of operations (default 20000).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use trustline_ca::authority::{Authority, Settings};
use trustline_ca::metrics::Metrics;
use trustline_ca::service::{Ca, Defaults, X509Request};
use trustline_ca::store::{Store, StoreConfig};
use trustline_hsm::{KeyStore, KeyType, SoftwareKeyStore};
use trustline_identity::spiffe_id::{SpiffeId, TrustDomain};

fn main() {
    let n: usize = std::env::var("TRUSTLINE_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(n));
}

async fn run(n: usize) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        Store::open(&StoreConfig::Sqlite {
            path: dir.path().join("ca.db"),
        })
        .await
        .unwrap(),
    );
    let key = dir.path().join("seal.key");
    SoftwareKeyStore::create_key_file(&key).unwrap();
    let keys = KeyStore::Software(SoftwareKeyStore::from_key_file(&key).unwrap());
    let settings = Settings {
        trust_domain: TrustDomain::new("example.org").unwrap(),
        organization: "Bench".into(),
        ca_ttl: Duration::from_secs(86400),
        x509_key_type: KeyType::EcP256,
        jwt_key_type: KeyType::EcP256,
        jwt_rsa_pss: false,
        upstream: None,
        existing_keys: Default::default(),
    };
    let authority = Authority::open(settings, store.clone(), keys).await.unwrap();
    let defaults = Defaults {
        x509_ttl: Duration::from_secs(3600),
        jwt_ttl: Duration::from_secs(300),
        agent_ttl: Duration::from_secs(3600),
        join_token_ttl: Duration::from_secs(600),
    };
    let ca = Ca::new(store, authority, defaults, Metrics::new(), None)
        .await
        .unwrap();
    let id = SpiffeId::new("spiffe://example.org/bench/web").unwrap();

    // 64 distinct workload keys and CSRs, reused round-robin (key generation is the workload's cost, not ours).
    let csrs: Vec<Vec<u8>> = (0..64)
        .map(|_| {
            let k = rcgen::KeyPair::generate().unwrap();
            let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            p.subject_alt_names = vec![rcgen::SanType::URI(id.to_string().try_into().unwrap())];
            p.serialize_request(&k).unwrap().der().to_vec()
        })
        .collect();
    let req = |i: usize| X509Request {
        csr: csrs[i % csrs.len()].clone(),
        spiffe_id: id.clone(),
        dns_names: Vec::new(),
        ttl: Duration::from_secs(3600),
    };

    println!("trustline-ca issuance benchmark: one core, P-256 software keys, SQLite (WAL), n = {n}");

    // Warm-up.
    for i in 0..200 {
        ca.issue_x509(vec![req(i)], "bench").await.pop().unwrap().unwrap();
    }

    // One CSR per call, one after another (each recorded in its own transaction).
    let t = Instant::now();
    for i in 0..n {
        ca.issue_x509(vec![req(i)], "bench").await.pop().unwrap().unwrap();
    }
    report("X.509-SVID, 1 CSR per request, sequential", n, t.elapsed());

    // One CSR per request, 64 requests in flight (many agents at once): group commit shares transactions.
    let t = Instant::now();
    let per = n / 64;
    let tasks: Vec<_> = (0..64)
        .map(|w| {
            let ca = ca.clone();
            let reqs: Vec<X509Request> = (0..per).map(|i| req(w * per + i)).collect();
            tokio::spawn(async move {
                for r in reqs {
                    ca.issue_x509(vec![r], "bench").await.pop().unwrap().unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    report(
        "X.509-SVID, 1 CSR per request, 64 in flight",
        per * 64,
        t.elapsed(),
    );

    // Batches of 100 CSRs, as an agent renewing many workloads sends them (one transaction per batch).
    let t = Instant::now();
    let mut done = 0;
    while done < n {
        let batch: Vec<_> = (done..(done + 100).min(n)).map(req).collect();
        let len = batch.len();
        for r in ca.issue_x509(batch, "bench").await {
            r.unwrap();
        }
        done += len;
    }
    report("X.509-SVID, batches of 100 CSRs", n, t.elapsed());

    // Signature alone, for scale: what one P-256 signature costs here.
    let signer = {
        let dir2 = tempfile::tempdir().unwrap();
        let p = dir2.path().join("k");
        SoftwareKeyStore::create_key_file(&p).unwrap();
        KeyStore::Software(SoftwareKeyStore::from_key_file(&p).unwrap())
            .generate(KeyType::EcP256)
            .unwrap()
            .0
    };
    let t = Instant::now();
    for i in 0..n {
        signer
            .sign(
                trustline_hsm::SignatureAlgorithm::EcdsaP256Sha256,
                &i.to_le_bytes(),
            )
            .unwrap();
    }
    report("P-256 signature alone (reference)", n, t.elapsed());

    let aud = vec!["bench".to_owned()];
    let t = Instant::now();
    for _ in 0..n {
        ca.mint_jwt(&id, &aud, Duration::from_secs(300), "bench")
            .await
            .unwrap();
    }
    report("JWT-SVID (ES256), minted and recorded", n, t.elapsed());
}

fn report(what: &str, n: usize, d: Duration) {
    let per_sec = n as f64 / d.as_secs_f64();
    let us = d.as_secs_f64() * 1e6 / n as f64;
    println!("{what:<42} {per_sec:>10.0} /s/core   {us:>8.1} µs each");
}
