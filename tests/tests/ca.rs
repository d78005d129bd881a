//! End-to-end tests of `trustline-ca`: the real binary on loopback, driven through its CLI (admin socket) and its
//! agent API (mutual TLS gRPC), checked with independent parsers (x509-parser, the `spiffe` crate, jsonwebtoken,
//! webpki).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use trustline_proto::agent as pb;
use trustline_tests::{agent_client, csr, eventually, now, verify_svid, Ca, PATIENCE};
use x509_parser::prelude::*;

const WEB: &str = "spiffe://example.org/web";

fn write_csr(dir: &std::path::Path, name: &str, der: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, der).unwrap();
    p.display().to_string()
}

fn chain_from_pem(pem: &str) -> Vec<Vec<u8>> {
    trustline_identity::bundle::certs_from_pem(pem).unwrap()
}

/// Every SPIFFE X.509-SVID rule, checked with x509-parser and with the `spiffe` crate.
fn assert_conformant_svid(chain: &[Vec<u8>], key_pkcs8: &[u8], id: &str) {
    let (_, leaf) = X509Certificate::from_der(&chain[0]).unwrap();
    let sans = leaf.subject_alternative_name().unwrap().unwrap();
    let uris: Vec<_> = sans
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    assert_eq!(uris, vec![id], "exactly one URI SAN with the SPIFFE ID");
    let bc = leaf
        .basic_constraints()
        .unwrap()
        .expect("basicConstraints present");
    assert!(!bc.value.ca, "leaf must not be a CA");
    let ku = leaf.key_usage().unwrap().expect("keyUsage present");
    assert!(ku.critical, "keyUsage must be critical");
    assert!(ku.value.digital_signature());
    assert!(!ku.value.key_cert_sign() && !ku.value.crl_sign());
    let eku = leaf.extended_key_usage().unwrap().expect("EKU present");
    assert!(eku.value.server_auth && eku.value.client_auth);
    assert!(leaf.validity().is_valid());
    // The reference SPIFFE library accepts it.
    let concat: Vec<u8> = chain.concat();
    let svid = spiffe::X509Svid::parse_from_der(&concat, key_pkcs8).expect("spiffe crate accepts the SVID");
    assert_eq!(svid.spiffe_id().to_string(), id);
}

#[tokio::test(flavor = "multi_thread")]
async fn svids_conform_to_the_spiffe_specs() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::start(tmp.path());
    let roots = ca.bundle_roots();
    assert_eq!(roots.len(), 1);
    // The root is a CA with keyCertSign and the trust domain URI.
    let (_, root) = X509Certificate::from_der(&roots[0]).unwrap();
    assert!(root.is_ca());
    assert!(root.key_usage().unwrap().unwrap().value.key_cert_sign());

    // X.509-SVID from our own CSR; the CA never sees the key.
    let (key, der) = csr(&[WEB], &["web.example.org"]);
    let csr_path = write_csr(tmp.path(), "web.csr", &der);
    let pem = ca.cli_ok(&[
        "x509",
        "mint",
        "--csr",
        &csr_path,
        "--spiffe-id",
        WEB,
        "--dns",
        "web.example.org",
    ]);
    let chain = chain_from_pem(&pem);
    assert_conformant_svid(&chain, &key.serialize_der(), WEB);
    assert_eq!(verify_svid(&chain, &roots, now()).unwrap(), WEB);
    // Default TTL 1h (backdated 10 s).
    let (_, leaf) = X509Certificate::from_der(&chain[0]).unwrap();
    let life = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
    assert_eq!(life, 3600 + 10);

    // Serials are unique.
    let mut serials = std::collections::HashSet::new();
    for _ in 0..5 {
        let pem = ca.cli_ok(&[
            "x509",
            "mint",
            "--csr",
            &csr_path,
            "--spiffe-id",
            WEB,
            "--dns",
            "web.example.org",
        ]);
        let c = chain_from_pem(&pem);
        let (_, l) = X509Certificate::from_der(&c[0]).unwrap();
        assert!(serials.insert(l.raw_serial().to_vec()));
    }

    // JWT-SVID verifies with jsonwebtoken against the JWKS, and with the spiffe crate.
    let token = ca
        .cli_ok(&["jwt", "mint", "--spiffe-id", WEB, "--audience", "payments"])
        .trim()
        .to_owned();
    let jwks_json = ca.cli_ok(&["bundle", "show", "--format", "jwks"]);
    let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_str(&jwks_json).unwrap();
    let header = jsonwebtoken::decode_header(&token).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::ES256);
    let kid = header.kid.clone().expect("kid in header");
    let jwk = jwks.find(&kid).expect("kid is in the JWKS");
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    validation.set_audience(&["payments"]);
    validation.set_required_spec_claims(&["exp", "aud", "sub"]);
    let data = jsonwebtoken::decode::<serde_json::Value>(
        &token,
        &jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap(),
        &validation,
    )
    .unwrap();
    assert_eq!(data.claims["sub"], WEB);
    let exp = data.claims["exp"].as_i64().unwrap();
    let iat = data.claims["iat"].as_i64().unwrap();
    assert_eq!(exp - iat, 300, "default JWT-SVID TTL is 5 minutes");
    // Wrong audience fails.
    let mut wrong = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    wrong.set_audience(&["other"]);
    assert!(jsonwebtoken::decode::<serde_json::Value>(
        &token,
        &jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap(),
        &wrong
    )
    .is_err());

    // The spiffe crate validates it against the bundle too.
    let td = spiffe::TrustDomain::new("example.org").unwrap();
    let raw: serde_json::Value = serde_json::from_str(&jwks_json).unwrap();
    let mut jb = spiffe::JwtBundle::new(td.clone());
    for k in raw["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["use"] == "jwt-svid")
    {
        jb.add_jwk_authority_json(k.to_string().as_bytes()).unwrap();
    }
    let mut set = spiffe::JwtBundleSet::new();
    set.add_bundle(jb);
    let svid =
        spiffe::JwtSvid::parse_and_validate(&token, &set, &["payments"]).expect("spiffe crate validates");
    assert_eq!(svid.spiffe_id().to_string(), WEB);
    // JWT with no audience is refused.
    let err = ca.cli_err(&["jwt", "mint", "--spiffe-id", WEB]);
    assert!(err.contains("audience"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_refused_clearly_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::start(tmp.path());
    let parent = "spiffe://example.org/trustline/agent/a";
    ca.cli_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        WEB,
        "--parent-id",
        parent,
        "--selector",
        "unix:uid:1000",
    ]);
    let before = ca.cli_ok(&["entry", "list", "--output", "json"]);

    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "--spiffe-id",
                "spiffe://Example.org/x",
                "--parent-id",
                parent,
                "--selector",
                "unix:uid:1",
            ],
            "trust domain \"Example.org\" must be lowercase",
        ),
        (
            &[
                "--spiffe-id",
                "https://example.org/x",
                "--parent-id",
                parent,
                "--selector",
                "unix:uid:1",
            ],
            "scheme \"https\"",
        ),
        (
            &[
                "--spiffe-id",
                "spiffe://example.org/a//b",
                "--parent-id",
                parent,
                "--selector",
                "unix:uid:1",
            ],
            "path \"/a//b\"",
        ),
        (
            &[
                "--spiffe-id",
                "spiffe://example.org/x/",
                "--parent-id",
                parent,
                "--selector",
                "unix:uid:1",
            ],
            "trailing slash",
        ),
        (
            &[
                "--spiffe-id",
                "spiffe://other.org/x",
                "--parent-id",
                parent,
                "--selector",
                "unix:uid:1",
            ],
            "not this CA's trust domain",
        ),
        (
            &[
                "--spiffe-id",
                "spiffe://example.org/x",
                "--parent-id",
                "spiffe://example.org/../n",
                "--selector",
                "unix:uid:1",
            ],
            "parent_id",
        ),
        (
            &[
                "--spiffe-id",
                "spiffe://example.org/x",
                "--parent-id",
                parent,
                "--selector",
                "k8s:ns:default",
            ],
            "unknown type \"k8s\"",
        ),
        (
            &[
                "--spiffe-id",
                "spiffe://example.org/x",
                "--parent-id",
                parent,
                "--selector",
                "unix:ui:1000",
            ],
            "unknown unix selector key \"ui\"",
        ),
        (
            &["--spiffe-id", "spiffe://example.org/x", "--parent-id", parent],
            "at least one selector",
        ),
        (
            &[
                "--spiffe-id",
                "spiffe://example.org/x",
                "--parent-id",
                parent,
                "--selector",
                "unix:uid:1",
                "--x509-ttl",
                "soon",
            ],
            "--x509-ttl \"soon\"",
        ),
        (
            &[
                "--spiffe-id",
                "spiffe://example.org/x",
                "--parent-id",
                parent,
                "--selector",
                "unix:uid:1",
                "--dns",
                "bad host",
            ],
            "dns",
        ),
        (
            &[
                "--spiffe-id",
                WEB,
                "--parent-id",
                parent,
                "--selector",
                "unix:uid:1000",
            ],
            "already exists",
        ),
    ];
    for (args, want) in cases {
        let mut full = vec!["entry", "create"];
        full.extend_from_slice(args);
        let err = ca.cli_err(&full);
        assert!(err.contains(want), "{args:?}: expected {want:?} in {err:?}");
        assert!(
            err.starts_with("Error: ") && err.trim_end().lines().count() == 1,
            "one readable line: {err:?}"
        );
    }
    assert_eq!(
        ca.cli_ok(&["entry", "list", "--output", "json"]),
        before,
        "nothing stored changed"
    );

    // A CSR asking for an extra SAN is refused and nothing is recorded.
    let issued_before = ca.cli_ok(&["issued", "list", "--output", "json"]);
    let (_, der) = csr(&[WEB, "spiffe://example.org/admin"], &[]);
    let p = write_csr(tmp.path(), "extra.csr", &der);
    let err = ca.cli_err(&["x509", "mint", "--csr", &p, "--spiffe-id", WEB]);
    assert!(
        err.contains("SAN URI:spiffe://example.org/admin is not allowed"),
        "{err}"
    );
    let (_, der) = csr(&[WEB], &["evil.example.org"]);
    let p = write_csr(tmp.path(), "dns.csr", &der);
    let err = ca.cli_err(&["x509", "mint", "--csr", &p, "--spiffe-id", WEB]);
    assert!(err.contains("DNS:evil.example.org"), "{err}");
    let p = write_csr(tmp.path(), "garbage.csr", b"not a csr");
    let err = ca.cli_err(&["x509", "mint", "--csr", &p, "--spiffe-id", WEB]);
    assert!(err.contains("CSR rejected"), "{err}");
    assert_eq!(ca.cli_ok(&["issued", "list", "--output", "json"]), issued_before);

    // Unknown entry id.
    let err = ca.cli_err(&["entry", "show", "--id", "nope"]);
    assert!(err.contains("not found") && err.contains("nope"), "{err}");
}

async fn attest(ca: &Ca, token: &str) -> Result<(rcgen::KeyPair, pb::AttestAgentResponse), tonic::Status> {
    let mut client = agent_client(ca.agent_addr, &ca.bundle_roots(), None)
        .await
        .unwrap();
    let (key, der) = csr(&[], &[]);
    let resp = client
        .attest_agent(pb::AttestAgentRequest {
            join_token: token.to_owned(),
            csr: der,
            devid: None,
        })
        .await?;
    Ok((key, resp.into_inner()))
}

fn token(ca: &Ca, extra: &[&str]) -> (String, String) {
    let mut args = vec!["token", "generate", "--output", "json"];
    args.extend_from_slice(extra);
    let v: serde_json::Value = serde_json::from_str(&ca.cli_ok(&args)).unwrap();
    (
        v["token"].as_str().unwrap().to_owned(),
        v["agent_spiffe_id"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn agents_attest_with_one_time_tokens_and_fetch_what_their_node_may_issue() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::start(tmp.path());
    let roots = ca.bundle_roots();

    // Join token -> agent SVID; the token is then spent.
    let (tok, agent_id) = token(&ca, &[]);
    assert!(agent_id.starts_with("spiffe://example.org/trustline/agent/join_token/"));
    // The token is a secret until spent: the CA's log names the agent without it.
    let generated = ca.logged("join token generated");
    let logged = ca.logs.lock().unwrap().join("\n");
    assert!(generated && !logged.contains(&tok), "{logged}");
    // ... and the database holds only its digest.
    for f in ["ca.db", "ca.db-wal"] {
        if let Ok(bytes) = std::fs::read(ca.dir.join(f)) {
            assert!(
                !bytes.windows(tok.len()).any(|w| w == tok.as_bytes()),
                "{f} holds the token in clear"
            );
        }
    }
    let (agent_key, resp) = attest(&ca, &tok).await.unwrap();
    let svid = resp.svid.unwrap();
    assert_eq!(svid.spiffe_id, agent_id);
    assert_eq!(verify_svid(&svid.cert_chain, &roots, now()).unwrap(), agent_id);
    let err = attest(&ca, &tok).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("not found or already used"), "{err:?}");
    let err = attest(&ca, "0123456789abcdef").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);

    // An expired token is refused.
    let (short, _) = token(&ca, &["--ttl", "1s"]);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let err = attest(&ca, &short).await.unwrap_err();
    assert!(err.message().contains("expired"), "{err:?}");

    // A CSR naming another ID does not spend the token... it is refused (and the token stays one-time).
    let (tok2, _) = token(&ca, &["--spiffe-id", "spiffe://example.org/trustline/agent/b"]);
    let mut client = agent_client(ca.agent_addr, &roots, None).await.unwrap();
    let (_, bad) = csr(&["spiffe://other.org/x"], &[]);
    let err = client
        .attest_agent(pb::AttestAgentRequest {
            join_token: tok2.clone(),
            csr: bad,
            devid: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let (_, ok) = attest(&ca, &tok2).await.unwrap();
    assert_eq!(
        ok.svid.unwrap().spiffe_id,
        "spiffe://example.org/trustline/agent/b"
    );

    // Without a client certificate only AttestAgent works.
    let err = client.fetch_bundle(pb::FetchBundleRequest {}).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);

    // As the agent: entries for this node only, CSRs signed, JWTs minted.
    let e_mine: serde_json::Value = serde_json::from_str(&ca.cli_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        WEB,
        "--parent-id",
        &agent_id,
        "--selector",
        "unix:uid:1000",
        "--output",
        "json",
    ]))
    .unwrap();
    let e_other: serde_json::Value = serde_json::from_str(&ca.cli_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/db",
        "--parent-id",
        "spiffe://example.org/trustline/agent/b",
        "--selector",
        "unix:uid:5432",
        "--output",
        "json",
    ]))
    .unwrap();
    let mut agent = agent_client(
        ca.agent_addr,
        &roots,
        Some((svid.cert_chain.clone(), agent_key.serialize_der())),
    )
    .await
    .unwrap();
    let entries = agent
        .fetch_authorized_entries(pb::FetchAuthorizedEntriesRequest {})
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<_> = entries.entries.iter().map(|e| e.spiffe_id.as_str()).collect();
    assert_eq!(ids, vec![WEB]);
    assert!(entries.bundle.unwrap().x509_authorities.len() == 1);

    let (wkey, good) = csr(&[WEB], &[]);
    let (_, extra) = csr(&[WEB], &["x.example.org"]);
    let (_, other) = csr(&["spiffe://example.org/db"], &[]);
    let resp = agent
        .batch_new_x509svid(pb::BatchNewX509svidRequest {
            params: vec![
                pb::NewX509svidParams {
                    entry_id: e_mine["id"].as_str().unwrap().into(),
                    csr: good,
                },
                pb::NewX509svidParams {
                    entry_id: e_mine["id"].as_str().unwrap().into(),
                    csr: extra,
                },
                pb::NewX509svidParams {
                    entry_id: e_other["id"].as_str().unwrap().into(),
                    csr: other,
                },
            ],
        })
        .await
        .unwrap()
        .into_inner();
    use pb::x509svid_result::Result as R;
    match &resp.results[0].result {
        Some(R::Svid(s)) => {
            assert_conformant_svid(&s.cert_chain, &wkey.serialize_der(), WEB);
            assert_eq!(verify_svid(&s.cert_chain, &roots, now()).unwrap(), WEB);
        }
        other => panic!("expected an SVID, got {other:?}"),
    }
    match &resp.results[1].result {
        Some(R::Error(e)) => assert!(e.contains("DNS:x.example.org"), "{e}"),
        other => panic!("expected an error, got {other:?}"),
    }
    match &resp.results[2].result {
        Some(R::Error(e)) => assert!(e.contains("not authorized"), "{e}"),
        other => panic!("expected an error, got {other:?}"),
    }
    let jwt = agent
        .new_jwtsvid(pb::NewJwtsvidRequest {
            entry_id: e_mine["id"].as_str().unwrap().into(),
            audience: vec!["db".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(jwt.spiffe_id, WEB);
    let err = agent
        .new_jwtsvid(pb::NewJwtsvidRequest {
            entry_id: e_other["id"].as_str().unwrap().into(),
            audience: vec!["db".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);

    // Renewal with the current SVID.
    let (nkey, ncsr) = csr(&[&agent_id], &[]);
    let renewed = agent
        .renew_agent(pb::RenewAgentRequest { csr: ncsr })
        .await
        .unwrap()
        .into_inner()
        .svid
        .unwrap();
    assert_ne!(renewed.serial, svid.serial);
    let mut renewed_client = agent_client(
        ca.agent_addr,
        &roots,
        Some((renewed.cert_chain.clone(), nkey.serialize_der())),
    )
    .await
    .unwrap();
    renewed_client
        .fetch_bundle(pb::FetchBundleRequest {})
        .await
        .unwrap();

    // Everything is in the issuance record.
    let issued = ca.cli_ok(&["issued", "list", "--output", "json"]);
    assert!(issued.contains(&svid.serial) && issued.contains(&renewed.serial));
    assert!(issued.contains("\"kind\":\"jwt\""));
}

#[tokio::test(flavor = "multi_thread")]
async fn entry_changes_reach_a_watching_agent_quickly() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::start(tmp.path());
    let roots = ca.bundle_roots();
    let (tok, agent_id) = token(&ca, &[]);
    let (key, resp) = attest(&ca, &tok).await.unwrap();
    let svid = resp.svid.unwrap();
    let mut agent = agent_client(
        ca.agent_addr,
        &roots,
        Some((svid.cert_chain, key.serialize_der())),
    )
    .await
    .unwrap();
    let mut stream = agent
        .watch_updates(pb::WatchUpdatesRequest {})
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(first.full && first.entries.is_empty());
    let started = Instant::now();
    ca.cli_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        WEB,
        "--parent-id",
        &agent_id,
        "--selector",
        "unix:uid:1",
    ]);
    let update = tokio::time::timeout(PATIENCE, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    println!(
        "entry propagation (CLI process start to agent stream): {:?}",
        started.elapsed()
    );
    assert_eq!(update.entries.len(), 1, "a delta with the new entry only");
    assert!(!update.full);
    assert_eq!(update.entries[0].spiffe_id, WEB);
    // An entry for another node does not wake this agent with a change.
    ca.cli_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        WEB,
        "--parent-id",
        "spiffe://example.org/trustline/agent/z",
        "--selector",
        "unix:uid:1",
    ]);
    ca.cli_ok(&["ca", "rotate", "--kind", "x509"]);
    let next = tokio::time::timeout(PATIENCE, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        next.entries.is_empty() && next.removed_entry_ids.is_empty() && !next.full,
        "a delta with no entry change for this node"
    );
    assert_eq!(
        next.bundle.unwrap().x509_authorities.len(),
        2,
        "the bundle change (prepared key) is pushed"
    );
    // Deleting the node's entry is pushed as a removal.
    let listed = ca.cli_ok(&["entry", "list", "--parent-id", &agent_id, "--output", "json"]);
    let listed: serde_json::Value = serde_json::from_str(listed.lines().next().unwrap()).unwrap();
    let entry_id = listed["id"].as_str().unwrap().to_owned();
    ca.cli_ok(&["entry", "delete", "--id", &entry_id]);
    let gone = tokio::time::timeout(PATIENCE, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(gone.removed_entry_ids, vec![entry_id]);
    assert!(gone.entries.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn svids_verify_before_during_and_after_a_rotation() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::start(tmp.path());
    let mut issued: Vec<Vec<Vec<u8>>> = Vec::new();
    let mint = |ca: &Ca| {
        let (_, der) = csr(&[WEB], &[]);
        let p = write_csr(tmp.path(), "r.csr", &der);
        chain_from_pem(&ca.cli_ok(&["x509", "mint", "--csr", &p, "--spiffe-id", WEB]))
    };
    let check_all = |ca: &Ca, issued: &[Vec<Vec<u8>>]| {
        let roots = ca.bundle_roots();
        for (i, chain) in issued.iter().enumerate() {
            verify_svid(chain, &roots, now())
                .unwrap_or_else(|e| panic!("SVID #{i} does not verify against the bundle: {e}"));
        }
        roots
    };
    issued.push(mint(&ca));
    assert_eq!(check_all(&ca, &issued).len(), 1);

    // Phase 1: prepare. The next key is published but not yet signing.
    let out = ca.cli_ok(&["ca", "rotate"]);
    assert!(out.contains("prepared x509 key"), "{out}");
    assert!(out.contains("prepared jwt key"), "{out}");
    issued.push(mint(&ca));
    let roots = check_all(&ca, &issued);
    assert_eq!(roots.len(), 2);
    assert_eq!(
        verify_svid(&issued[1], &roots[..1], now()).unwrap(),
        WEB,
        "still signed by the old key"
    );

    // Phase 2: activate. New SVIDs chain to the new key; old ones still verify.
    let out = ca.cli_ok(&["ca", "rotate"]);
    assert!(out.contains("activated x509 key"), "{out}");
    issued.push(mint(&ca));
    let roots = check_all(&ca, &issued);
    assert!(
        verify_svid(&issued[2], &roots[..1], now()).is_err(),
        "new SVID is signed by the new key"
    );
    let status: serde_json::Value =
        serde_json::from_str(&ca.cli_ok(&["ca", "status", "--output", "json"])).unwrap();
    let states: Vec<_> = status["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["kind"] == "x509")
        .map(|k| k["state"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(states, vec!["old", "active"]);

    // A JWT minted after rotation carries the new kid, which is in the JWKS.
    let token = ca
        .cli_ok(&["jwt", "mint", "--spiffe-id", WEB, "--audience", "a"])
        .trim()
        .to_owned();
    let kid = jsonwebtoken::decode_header(&token).unwrap().kid.unwrap();
    assert!(ca.cli_ok(&["bundle", "show", "--format", "jwks"]).contains(&kid));

    // Across a restart, the same keys and the same bundle.
    let mut ca = ca;
    let before = ca.cli_ok(&["bundle", "show", "--format", "pem"]);
    ca.restart();
    assert_eq!(ca.cli_ok(&["bundle", "show", "--format", "pem"]), before);
    check_all(&ca, &issued);
}

#[tokio::test(flavor = "multi_thread")]
async fn automatic_rotation_with_short_lifetimes_never_breaks_verification() {
    // CA keys live 24 s: the next key is prepared at 12 s and activated at 20 s; old keys retire when their
    // certificate expires. SVIDs live 4 s. Every SVID must verify against the bundle the whole time.
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = trustline_tests::default_config(tmp.path());
    cfg.push_str("\n[ca]\nttl = \"24s\"\n\n[svid]\nx509_ttl = \"4s\"\n");
    let ca = Ca::start_with(tmp.path(), &cfg);
    let mut seen_keys = std::collections::HashSet::new();
    let mut retired = false;
    let deadline = Instant::now() + 2 * PATIENCE;
    let mut minted = 0;
    while Instant::now() < deadline && !(retired && seen_keys.len() >= 3) {
        let (_, der) = csr(&[WEB], &[]);
        let p = write_csr(tmp.path(), "a.csr", &der);
        let chain = chain_from_pem(&ca.cli_ok(&["x509", "mint", "--csr", &p, "--spiffe-id", WEB]));
        minted += 1;
        // Verify right away and again a moment later, each time against the bundle of that moment.
        let roots = ca.bundle_roots();
        verify_svid(&chain, &roots, now()).unwrap_or_else(|e| panic!("fresh SVID fails: {e}"));
        tokio::time::sleep(Duration::from_millis(700)).await;
        let roots = ca.bundle_roots();
        let (_, leaf) = X509Certificate::from_der(&chain[0]).unwrap();
        if (leaf.validity().not_after.timestamp() as u64) > now() {
            verify_svid(&chain, &roots, now())
                .unwrap_or_else(|e| panic!("SVID fails later against the then-current bundle: {e}"));
        }
        let status: serde_json::Value =
            serde_json::from_str(&ca.cli_ok(&["ca", "status", "--output", "json"])).unwrap();
        for k in status["keys"].as_array().unwrap() {
            if k["kind"] == "x509" {
                seen_keys.insert(k["id"].as_str().unwrap().to_owned());
                if k["state"] == "retired" {
                    retired = true;
                }
            }
        }
    }
    println!("minted {minted} SVIDs across {} X.509 CA keys", seen_keys.len());
    assert!(
        seen_keys.len() >= 3,
        "expected at least two automatic rotations, saw {} keys",
        seen_keys.len()
    );
    assert!(retired, "an old key should have been retired");
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_keeps_keys_entries_and_issuance_record() {
    let tmp = tempfile::tempdir().unwrap();
    let mut ca = Ca::start(tmp.path());
    ca.cli_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        WEB,
        "--parent-id",
        "spiffe://example.org/n",
        "--selector",
        "unix:uid:7",
        "--x509-ttl",
        "10m",
    ]);
    let (_, der) = csr(&[WEB], &[]);
    let p = write_csr(tmp.path(), "x.csr", &der);
    let chain = chain_from_pem(&ca.cli_ok(&["x509", "mint", "--csr", &p, "--spiffe-id", WEB]));
    let entries = ca.cli_ok(&["entry", "list", "--output", "json"]);
    let issued = ca.cli_ok(&["issued", "list", "--output", "json"]);
    let status = ca.cli_ok(&["ca", "status", "--output", "json"]);
    ca.restart();
    assert_eq!(ca.cli_ok(&["entry", "list", "--output", "json"]), entries);
    // Every record is still there (the restarted CA adds one for its own new serving SVID).
    let after = ca.cli_ok(&["issued", "list", "--output", "json"]);
    for line in issued.lines() {
        assert!(after.contains(line), "record lost across restart: {line}");
    }
    assert_eq!(ca.cli_ok(&["ca", "status", "--output", "json"]), status);
    verify_svid(&chain, &ca.bundle_roots(), now()).unwrap();
    // The sealed key blobs in the database never hold a private key in clear: the database file does not contain
    // the PKCS#8 header of an EC key.
    let db = std::fs::read(tmp.path().join("ca.db")).unwrap();
    let pkcs8_ec_prefix = [
        0x30u8, 0x81, 0x87, 0x02, 0x01, 0x00, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02,
        0x01,
    ];
    assert!(!db.windows(pkcs8_ec_prefix.len()).any(|w| w == pkcs8_ec_prefix));
}

#[tokio::test(flavor = "multi_thread")]
async fn healthcheck_and_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::start(tmp.path());
    let out = ca.cli_ok(&["healthcheck"]);
    assert!(out.contains("healthy"), "{out}");
    let (_, der) = csr(&[WEB], &[]);
    let p = write_csr(tmp.path(), "m.csr", &der);
    ca.cli_ok(&["x509", "mint", "--csr", &p, "--spiffe-id", WEB]);
    let _ = ca.cli(&[
        "entry",
        "create",
        "--spiffe-id",
        "bad",
        "--parent-id",
        "x",
        "--selector",
        "unix:uid:1",
    ]);
    let addr = ca.health_addr.unwrap();
    let body = http_get(addr, "/metrics").await;
    assert!(
        body.contains("trustline_ca_svids_issued_total{kind=\"x509\"}"),
        "{body}"
    );
    assert!(
        body.contains("trustline_ca_issue_duration_seconds_bucket"),
        "{body}"
    );
    assert!(
        body.contains("trustline_ca_errors_total{kind=\"invalid_argument\"}"),
        "{body}"
    );
    assert!(http_get(addr, "/readyz").await.contains("ready"));
    // A stopped CA: the healthcheck fails with a clear message.
    let mut ca = ca;
    let sock = ca.socket.clone();
    ca.stop();
    let out = std::process::Command::new(trustline_tests::bin("trustline-ca"))
        .arg("--socket")
        .arg(&sock)
        .arg("healthcheck")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the CA admin socket"));
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_replicas_share_entries_keys_and_rotation() {
    let Ok(conninfo) = std::env::var("TRUSTLINE_TEST_POSTGRES") else {
        println!("skipped: TRUSTLINE_TEST_POSTGRES is not set (scripts/test.sh sets it)");
        return;
    };
    let test_db = TestDb::new(&conninfo, "tl_e2e");
    let dsn = test_db.dsn.clone();
    let tmp = tempfile::tempdir().unwrap();
    let key = tmp.path().join("seal.key");
    trustline_hsm::SoftwareKeyStore::create_key_file(&key).unwrap();
    let cfg = |d: &std::path::Path| {
        format!(
            "trust_domain = \"example.org\"\ndata_dir = \"{}\"\n[server]\nagent_listen = \"127.0.0.1:0\"\n[store]\nkind = \"postgres\"\nconninfo = \"{dsn}\"\n[keys]\nkey_file = \"{}\"\n",
            d.display(),
            key.display()
        )
    };
    let a_dir = tmp.path().join("a");
    let b_dir = tmp.path().join("b");
    let a = Ca::start_with(&a_dir, &cfg(&a_dir));
    let b = Ca::start_with(&b_dir, &cfg(&b_dir));
    assert_eq!(a.bundle_roots(), b.bundle_roots(), "replicas share one CA key");
    a.cli_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        WEB,
        "--parent-id",
        "spiffe://example.org/n",
        "--selector",
        "unix:uid:1",
    ]);
    assert!(b.cli_ok(&["entry", "list"]).contains(WEB));
    let (_, der) = csr(&[WEB], &[]);
    let p = write_csr(tmp.path(), "p.csr", &der);
    let chain = chain_from_pem(&b.cli_ok(&["x509", "mint", "--csr", &p, "--spiffe-id", WEB]));
    assert!(a.cli_ok(&["issued", "list"]).contains(WEB));
    a.cli_ok(&["ca", "rotate", "--kind", "x509"]);
    let want = a.bundle_roots();
    assert_eq!(want.len(), 2);
    eventually(PATIENCE, "replica b to see the prepared key", || {
        let got = b.bundle_roots();
        let want = want.clone();
        async move { (got == want).then_some(()) }
    })
    .await;
    verify_svid(&chain, &b.bundle_roots(), now()).unwrap();
    // Entries reach an agent connected to the *other* replica.
    let (tok, agent_id) = token(&a, &[]);
    let (k, r) = attest(&b, &tok).await.unwrap();
    let mut agent = agent_client(
        b.agent_addr,
        &b.bundle_roots(),
        Some((r.svid.unwrap().cert_chain, k.serialize_der())),
    )
    .await
    .unwrap();
    let mut stream = agent
        .watch_updates(pb::WatchUpdatesRequest {})
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap();
    a.cli_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/api",
        "--parent-id",
        &agent_id,
        "--selector",
        "unix:uid:2",
    ]);
    let u = tokio::time::timeout(PATIENCE, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(u.entries.len(), 1);
    drop(agent);
    drop(a);
    drop(b);
}

#[tokio::test(flavor = "multi_thread")]
async fn intermediate_mode_chains_to_the_operators_root() {
    let tmp = tempfile::tempdir().unwrap();
    // The operator's own root CA.
    let root_key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Corp Root");
    let root = params.self_signed(&root_key).unwrap();
    let cert_path = tmp.path().join("upstream.pem");
    let key_path = tmp.path().join("upstream-key.pem");
    std::fs::write(&cert_path, root.pem()).unwrap();
    std::fs::write(&key_path, root_key.serialize_pem()).unwrap();
    let mut cfg = trustline_tests::default_config(tmp.path());
    cfg.push_str(&format!(
        "\n[ca]\nupstream_cert = \"{}\"\nupstream_key = \"{}\"\n",
        cert_path.display(),
        key_path.display()
    ));
    let ca = Ca::start_with(tmp.path(), &cfg);
    assert_eq!(
        ca.bundle_roots(),
        vec![root.der().to_vec()],
        "the bundle publishes the operator's root"
    );
    let (key, der) = csr(&[WEB], &[]);
    let p = write_csr(tmp.path(), "i.csr", &der);
    let chain = chain_from_pem(&ca.cli_ok(&["x509", "mint", "--csr", &p, "--spiffe-id", WEB]));
    assert_eq!(chain.len(), 2, "leaf + the CA's intermediate");
    assert_conformant_svid(&chain, &key.serialize_der(), WEB);
    assert_eq!(verify_svid(&chain, &[root.der().to_vec()], now()).unwrap(), WEB);
    // Rotating the intermediate leaves the bundle unchanged, and new SVIDs still chain to the root.
    ca.cli_ok(&["ca", "rotate", "--kind", "x509"]);
    ca.cli_ok(&["ca", "rotate", "--kind", "x509"]);
    assert_eq!(ca.bundle_roots(), vec![root.der().to_vec()]);
    let chain2 = chain_from_pem(&ca.cli_ok(&["x509", "mint", "--csr", &p, "--spiffe-id", WEB]));
    assert_ne!(chain2[1], chain[1], "a new intermediate");
    assert_eq!(verify_svid(&chain2, &[root.der().to_vec()], now()).unwrap(), WEB);
    // Agents verify the CA's own serving SVID through the intermediate too.
    let (tok, _) = token(&ca, &[]);
    attest(&ca, &tok).await.unwrap();
}

#[test]
fn config_errors_name_the_key_and_value() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |body: &str| {
        let p = tmp.path().join("c.toml");
        std::fs::write(&p, body).unwrap();
        let out = std::process::Command::new(trustline_tests::bin("trustline-ca"))
            .arg("--config")
            .arg(&p)
            .args(["run", "--validate"])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, out) = run("trust_domain = \"example.org\"\n[svid]\nx509_tll = \"1h\"\n");
    assert!(!ok && out.contains("x509_tll"), "{out}");
    let (ok, out) = run("trust_domain = \"example.org\"\n[keys]\nx509_key_type = \"dsa\"\n");
    assert!(
        !ok && out.contains("keys.x509_key_type") && out.contains("\"dsa\""),
        "{out}"
    );
    let (ok, out) = run("trust_domain = \"example.org\"\n");
    assert!(ok && out.contains("is valid"), "{out}");
    // The shipped examples validate.
    for f in ["ca.toml", "ca-postgres.toml"] {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../docs/examples")
            .join(f);
        let out = std::process::Command::new(trustline_tests::bin("trustline-ca"))
            .arg("--config")
            .arg(&p)
            .args(["run", "--validate"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{f}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The test PostgreSQL's conninfo and the CA of its TLS certificate; `None` (the test says it skipped) when unset.
fn postgres_with_tls() -> Option<(String, String)> {
    match (
        std::env::var("TRUSTLINE_TEST_POSTGRES"),
        std::env::var("TRUSTLINE_TEST_POSTGRES_CA"),
    ) {
        (Ok(conninfo), Ok(ca)) => Some((conninfo, ca)),
        _ => {
            println!(
                "skipped: TRUSTLINE_TEST_POSTGRES(_CA) not set (scripts/test.sh starts PostgreSQL with TLS)"
            );
            None
        }
    }
}

/// SCRAM over TLS with channel binding: with `channel_binding=require` the password exchange is bound to the
/// certificate the server presented on this very connection (`SCRAM-SHA-256-PLUS`, `tls-server-end-point`), so
/// it cannot be relayed through a server holding another certificate. scripts/test.sh has PostgreSQL ask the role
/// `trustline_scram` for SCRAM over TLS.
#[tokio::test]
async fn postgres_scram_is_bound_to_the_tls_channel() {
    let Some((conninfo, pg_ca)) = postgres_with_tls() else {
        return;
    };
    let (admin, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    admin
        .batch_execute(
            "DROP ROLE IF EXISTS trustline_scram; \
             SET password_encryption = 'scram-sha-256'; \
             CREATE ROLE trustline_scram LOGIN PASSWORD 'channel-bound'",
        )
        .await
        .unwrap();
    let tls = trustline_identity::pgtls::PgTls::from_pem(&std::fs::read_to_string(&pg_ca).unwrap()).unwrap();
    let mut config: tokio_postgres::Config = conninfo.parse().unwrap();
    config
        .user("trustline_scram")
        .password("channel-bound")
        .ssl_mode(tokio_postgres::config::SslMode::Require)
        .channel_binding(tokio_postgres::config::ChannelBinding::Require);
    let (client, conn) = tokio::time::timeout(Duration::from_secs(20), config.connect(tls.clone()))
        .await
        .unwrap()
        .expect("SCRAM-SHA-256-PLUS over TLS");
    tokio::spawn(conn);
    let who: String = client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(who, "trustline_scram");
    // The wrong password is still refused.
    config.password("not-it");
    assert!(config.connect(tls).await.is_err());
}

/// The CA's PostgreSQL store over TLS 1.3 (`store.tls_ca_file`, `sslmode=require`): it starts and issues; a CA file
/// that does not vouch for the server stops it at startup with an error naming the store.
#[test]
fn postgres_over_tls_verifies_the_server() {
    let Some((conninfo, pg_ca)) = postgres_with_tls() else {
        return;
    };
    let test_db = TestDb::new(&conninfo, "tl_tls");
    let dsn = format!("{} sslmode=require", test_db.dsn);
    let tmp = tempfile::tempdir().unwrap();
    let cfg = |d: &std::path::Path, ca_file: &str| {
        format!(
            "trust_domain = \"example.org\"\ndata_dir = \"{}\"\n[server]\nagent_listen = \"127.0.0.1:0\"\n[store]\nkind = \"postgres\"\nconninfo = \"{dsn}\"\ntls_ca_file = \"{ca_file}\"\n[keys]\nkey_file = \"{}/seal.key\"\n",
            d.display(),
            d.display()
        )
    };
    let dir = tmp.path().join("ca");
    let ca = Ca::start_with(&dir, &cfg(&dir, &pg_ca));
    let (_, svid, _, _) =
        trustline_tests::mint_svid(&ca, &tmp.path().join("m"), "spiffe://example.org/tls", "1h");
    assert!(svid.exists());
    drop(ca);

    // A CA file that does not vouch for the server: refused at startup, naming the store.
    let other = tmp.path().join("other-ca.pem");
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
        ])
        .arg(tmp.path().join("other.key"))
        .arg("-out")
        .arg(&other)
        .args(["-days", "1", "-subj", "/CN=not the server's CA"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let bad = tmp.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    trustline_hsm::SoftwareKeyStore::create_key_file(&bad.join("seal.key")).unwrap();
    std::fs::write(bad.join("ca.toml"), cfg(&bad, other.to_str().unwrap())).unwrap();
    let out = std::process::Command::new(trustline_tests::bin("trustline-ca"))
        .args(["run", "--config"])
        .arg(bad.join("ca.toml"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("store"), "{err}");
    assert!(
        err.to_lowercase().contains("certificate") || err.contains("tls"),
        "{err}"
    );
}

/// `agent list` / `agent evict`: an evicted agent's calls are refused at once, its open update stream ends with
/// the refusal, and it is gone from the list until it attests again.
#[tokio::test(flavor = "multi_thread")]
async fn an_evicted_agent_is_refused_until_it_attests_again() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::start(tmp.path());
    let roots = ca.bundle_roots();
    let (tok, agent_id) = token(
        &ca,
        &["--spiffe-id", "spiffe://example.org/trustline/agent/evictee"],
    );
    let (key, resp) = attest(&ca, &tok).await.unwrap();
    let svid = resp.svid.unwrap();
    let listed = ca.cli_ok(&["agent", "list", "--output", "json"]);
    let row: serde_json::Value = serde_json::from_str(listed.lines().next().unwrap()).unwrap();
    assert_eq!(row["spiffe_id"], agent_id);
    assert_eq!(row["attestation_type"], "join_token");
    assert_eq!(row["serial"], svid.serial);

    let mut agent = agent_client(
        ca.agent_addr,
        &roots,
        Some((svid.cert_chain.clone(), key.serialize_der())),
    )
    .await
    .unwrap();
    agent
        .fetch_authorized_entries(pb::FetchAuthorizedEntriesRequest {})
        .await
        .unwrap();
    let mut stream = agent
        .watch_updates(pb::WatchUpdatesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().unwrap().full);

    assert!(ca
        .cli_ok(&["agent", "evict", "--spiffe-id", &agent_id])
        .contains("evicted"));
    let end = tokio::time::timeout(PATIENCE, stream.message())
        .await
        .expect("the stream ends promptly");
    assert_eq!(end.unwrap_err().code(), tonic::Code::PermissionDenied);
    let err = agent
        .fetch_authorized_entries(pb::FetchAuthorizedEntriesRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("not an attested agent"), "{err:?}");
    assert!(ca.cli_ok(&["agent", "list"]).contains("no attested agents"));
    let e = ca.cli_err(&["agent", "evict", "--spiffe-id", &agent_id]);
    assert!(e.contains("no attested agent has this ID"), "{e}");

    // Attesting again (a new token) brings it back.
    let (tok2, _) = token(
        &ca,
        &["--spiffe-id", "spiffe://example.org/trustline/agent/evictee"],
    );
    attest(&ca, &tok2).await.unwrap();
    assert!(ca.cli_ok(&["agent", "list"]).contains(&agent_id));
}

/// A fresh, empty database `<prefix>_<pid>` on the server of `conninfo`, dropped with the value.
struct TestDb {
    admin: String,
    name: String,
    /// The conninfo naming it.
    dsn: String,
}

impl TestDb {
    fn new(conninfo: &str, prefix: &str) -> Self {
        let name = format!("{prefix}_{}", std::process::id());
        let db = Self {
            admin: conninfo.to_owned(),
            dsn: format!(
                "{} dbname={name}",
                conninfo
                    .split_whitespace()
                    .filter(|p| !p.starts_with("dbname="))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
            name,
        };
        assert!(db.psql(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", db.name)));
        assert!(
            db.psql(&format!("CREATE DATABASE {}", db.name)),
            "CREATE DATABASE"
        );
        db
    }

    fn psql(&self, sql: &str) -> bool {
        std::process::Command::new("psql")
            .args(["-v", "ON_ERROR_STOP=1", "-q", "-c", sql, &self.admin])
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        self.psql(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name));
    }
}
