//! Call-chain accountability end to end: A -> B -> C, each service behind its own sidecar (real processes), C's
//! policy requiring the chain to start at A; forged, reordered and replayed chains refused; every request
//! recorded in each sidecar's accountability log, which `trustline-audit verify` accepts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use trustline_tests::bin;
use trustline_tests::mesh::{echo_app, request, Mesh, TD};

const CHAIN: &str = "trustline-caller-chain";

const C_POLICY: &str = r#"
name: payments-start-at-a
action: ALLOW
rules:
  - to:
      - operation:
          paths: ["/payments*"]
    when:
      - key: request.chain.origin
        values: ["spiffe://example.org/a"]
"#;

/// App B: forwards every request to C through B's outbound sidecar, propagating `traceparent` and the caller
/// chain like a well-behaved app (except under `/nochain`, where it drops the chain).
async fn app_b(outbound: Arc<OnceLock<SocketAddr>>) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let outbound = outbound.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let outbound = outbound.clone();
                    async move {
                        let mut headers: Vec<(String, String)> = Vec::new();
                        for name in ["traceparent", CHAIN] {
                            if name == CHAIN && req.uri().path().starts_with("/nochain") {
                                continue;
                            }
                            if let Some(v) = req.headers().get(name) {
                                headers.push((name.to_owned(), v.to_str().unwrap().to_owned()));
                            }
                        }
                        let h: Vec<(&str, &str)> =
                            headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                        let path = req.uri().path().replace("/nochain", "");
                        let r = request(*outbound.get().unwrap(), "GET", "c", &path, &h, "")
                            .await
                            .unwrap();
                        Ok::<_, std::convert::Infallible>(
                            http::Response::builder()
                                .status(r.status)
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(r.body)))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

fn log_cfg(dir: &std::path::Path) -> String {
    format!(
        "[log]\ndir = \"{}\"\ncheckpoint_records = 5\ncheckpoint_interval = \"200ms\"\n[chain]\nmax_age = \"3s\"\n",
        dir.display()
    )
}

fn route(host: &str, up: SocketAddr, id: &str) -> String {
    format!("[[outbound]]\nlisten = \"127.0.0.1:0\"\n[[outbound.route]]\nhost = \"{host}\"\nupstream = \"{up}\"\nspiffe_ids = [\"{TD}/{id}\"]\n")
}

/// Replaces the JSON payload of a hop (keeping its signature).
fn tamper(hop: &str, f: impl FnOnce(&mut serde_json::Value)) -> String {
    let (p, rest) = hop.split_once('.').unwrap();
    let mut v: serde_json::Value = serde_json::from_slice(&B64.decode(p).unwrap()).unwrap();
    f(&mut v);
    format!("{}.{rest}", B64.encode(serde_json::to_vec(&v).unwrap()))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chain_from_a_through_b_reaches_c_and_every_forgery_is_refused() {
    let mesh = Mesh::start("");
    let logs = mesh.tmp.path().join("logs");
    let app_c = echo_app().await;
    let c = mesh.sidecar(
        "c",
        &format!(
            "{}verify_peer_signature = true\n[[inbound]]\nlisten = \"127.0.0.1:0\"\napp = \"{app_c}\"\n",
            log_cfg(&logs.join("c"))
        ),
        &[("allow.yaml", C_POLICY)],
    );
    let b_out = Arc::new(OnceLock::new());
    let app_b = app_b(b_out.clone()).await;
    // B serves on one worker thread (the current-thread runtime), the others on the default runtime.
    let b = mesh.sidecar(
        "b",
        &format!(
            "worker_threads = 1\n{}[[inbound]]\nlisten = \"127.0.0.1:0\"\napp = \"{app_b}\"\n{}",
            log_cfg(&logs.join("b")),
            route("c", c.inbound[0], "c")
        ),
        &[],
    );
    b_out.set(b.outbound[0]).unwrap();
    let a = mesh.sidecar(
        "a",
        &format!("{}{}", log_cfg(&logs.join("a")), route("b", b.inbound[0], "b")),
        &[],
    );

    // A -> B -> C: allowed; C's app sees both hops.
    let r = request(a.outbound[0], "GET", "b", "/payments/7", &[], "")
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let seen = r.json();
    let chain = seen["headers"][CHAIN].as_str().unwrap().to_owned();
    let hops: Vec<&str> = chain.split(',').collect();
    assert_eq!(hops.len(), 2);
    let trace = seen["headers"]["traceparent"].as_str().unwrap()[3..35].to_owned();

    // A burst through A -> B -> C: hops that reach a sidecar together may share one signature (a batch, each
    // hop with its inclusion proof). C checks even B's own hop's signature (`verify_peer_signature`), and A's
    // hops are earlier hops there: every request passes.
    let burst: Vec<_> = (0..32)
        .map(|i| {
            let to = a.outbound[0];
            tokio::spawn(async move { request(to, "GET", "b", &format!("/payments/{i}"), &[], "").await })
        })
        .collect();
    let mut batched = 0;
    for t in burst {
        let r = t.await.unwrap().unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        let chain = r.json()["headers"][CHAIN].as_str().unwrap().to_owned();
        batched += chain.split(',').filter(|h| h.split('.').count() == 4).count();
    }
    eprintln!("burst: {batched} of 64 hops were signed in batches");
    assert!(batched > 0, "32 requests at once: some hops share a signature");

    // The same call from B alone: the chain starts at B, and C's policy refuses it.
    let r = request(b.outbound[0], "GET", "c", "/payments/7", &[], "")
        .await
        .unwrap();
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(
        r.json()["policy"],
        serde_json::Value::Null,
        "default deny: {}",
        r.body
    );

    // App B drops the chain: it restarts at B (C refuses), and B's log says so.
    let r = request(a.outbound[0], "GET", "b", "/nochain/payments/8", &[], "")
        .await
        .unwrap();
    assert_eq!(r.status, 403, "{}", r.body);

    // A forged first hop (its payload changed after A signed it), passed on by B.
    let forged = tamper(hops[0], |v| v["p"] = "/payments/9999".into());
    let r = request(b.outbound[0], "GET", "c", "/payments/7", &[(CHAIN, &forged)], "")
        .await
        .unwrap();
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.json()["error"], "bad_caller_chain");
    assert!(
        r.json()["reason"].as_str().unwrap().contains("hop 0 is forged"),
        "{}",
        r.body
    );

    // Reordered: B's old hop before A's.
    let reordered = format!("{},{}", hops[1], hops[0]);
    let r = request(
        b.outbound[0],
        "GET",
        "c",
        "/payments/7",
        &[(CHAIN, &reordered)],
        "",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(
        r.json()["reason"].as_str().unwrap().contains("breaks the chain"),
        "{}",
        r.body
    );

    // Truncated: B presents only A's hop as if it were its own call (the last hop is not B's).
    let r = request(c.inbound[0], "GET", "c", "/payments/7", &[], "").await;
    assert!(
        r.is_err() || r.unwrap().status != 200,
        "plaintext to an inbound listener gets nowhere"
    );

    // Replayed: A's hop, valid when signed, presented again after the 3 s window.
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let r = request(b.outbound[0], "GET", "c", "/payments/7", &[(CHAIN, hops[0])], "")
        .await
        .unwrap();
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(
        r.json()["reason"].as_str().unwrap().contains("stale"),
        "{}",
        r.body
    );

    for (s, reason) in [(&c, "forged"), (&c, "broken"), (&c, "stale"), (&c, "ok")] {
        assert!(
            s.metric("trustline_sidecar_caller_chains_total", &[("result", reason)])
                .await
                >= 1.0,
            "{reason}"
        );
    }

    // Every sidecar recorded its requests; C's record of the allowed call names both callers. A graceful stop
    // writes out what is still queued (the last records, such as the replay's, may not be on disk yet).
    for mut s in [a, b, c] {
        s.stop();
    }
    let c_records = trustline_audit::verify::records(&logs.join("c"), None).unwrap();
    let allowed = c_records
        .iter()
        .find(|(_, r)| r.trace_id == trace && r.status == 200)
        .expect("C recorded the allowed call");
    assert_eq!(allowed.1.chain, vec![format!("{TD}/a"), format!("{TD}/b")]);
    assert_eq!(allowed.1.peer, format!("{TD}/b"));
    assert_eq!(allowed.1.policy.as_deref(), Some("payments-start-at-a"));
    assert!(c_records
        .iter()
        .any(|(_, r)| r.decision == "bad_chain" && r.note.contains("forged")));
    let b_records = trustline_audit::verify::records(&logs.join("b"), None).unwrap();
    assert!(
        b_records
            .iter()
            .any(|(_, r)| r.direction == "outbound" && r.note.contains("chain restarted")),
        "B's log says the chain restarted"
    );
    assert!(b_records
        .iter()
        .any(|(_, r)| r.direction == "inbound" && r.trace_id == trace));
    let a_records = trustline_audit::verify::records(&logs.join("a"), None).unwrap();
    assert!(a_records
        .iter()
        .any(|(_, r)| r.direction == "outbound" && r.trace_id == trace));

    // The call tree of the allowed request, merged from the three logs.
    let dirs: Vec<std::path::PathBuf> = ["a", "b", "c"].iter().map(|n| logs.join(n)).collect();
    let audit = |args: &[&str]| {
        let out = std::process::Command::new(bin("trustline-audit"))
            .args(args)
            .args(&dirs)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let text = audit(&["trace", &trace]);
    assert!(
        text.contains(&format!(
            "{TD}/a\n└─ GET /payments/7 -> {TD}/b  200 allow\n   └─ GET /payments/7 -> {TD}/c  200 allow by payments-start-at-a"
        )),
        "{text}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&audit(&["trace", &trace, "--format", "json"])).unwrap();
    assert_eq!(json["calls"].as_array().unwrap().len(), 2);
    assert!(audit(&["trace", &trace, "--format", "dot"]).contains(&format!("\"{TD}/b\" -> \"{TD}/c\"")));
    let denied = audit(&["query", "--callee", &format!("{TD}/c"), "--decision", "bad_chain"]);
    assert_eq!(denied.lines().count(), 3, "forged, reordered, replayed: {denied}");
    assert!(denied
        .lines()
        .all(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["direction"] == "inbound"));
    let html_path = mesh.tmp.path().join("trace.html");
    audit(&[
        "trace",
        &trace,
        "--format",
        "html",
        "--out",
        html_path.to_str().unwrap(),
    ]);
    match std::env::var("TRUSTLINE_TEST_CHROMIUM") {
        Err(_) => println!(
            "skipped the browser check: TRUSTLINE_TEST_CHROMIUM is not set (scripts/test.sh sets it)"
        ),
        Ok(chromium) => {
            // Headless Chromium runs the page's script; the rendered DOM must hold the three services and both calls.
            let profile = tempfile::tempdir().unwrap();
            let out = std::process::Command::new(chromium)
                .args([
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--dump-dom",
                ])
                .arg(format!("--user-data-dir={}", profile.path().display()))
                .arg(format!("file://{}", html_path.display()))
                .output()
                .unwrap();
            let dom = String::from_utf8_lossy(&out.stdout);
            assert!(
                dom.contains("data-rendered=\"2\""),
                "the page's script ran: {}",
                &dom[..dom.len().min(500)]
            );
            for n in ["a", "b", "c"] {
                assert!(
                    dom.contains(&format!("class=\"node\" data-id=\"{TD}/{n}\"")),
                    "node {n}"
                );
            }
            assert_eq!(
                dom.matches("class=\"edge\"").count(),
                2,
                "two allowed calls drawn"
            );
            assert!(dom.contains("GET /payments/7 200 allow"));
        }
    }

    // Fleet view: ship the three logs to PostgreSQL; trace, query and verify work on what was shipped.
    match std::env::var("TRUSTLINE_TEST_POSTGRES") {
        Err(_) => println!(
            "skipped the central store: TRUSTLINE_TEST_POSTGRES is not set (scripts/test.sh sets it)"
        ),
        Ok(admin_conninfo) => central_store(&admin_conninfo, &logs, &trace, &text, &mesh).await,
    }

    // The logs verify, checkpoints signed by each sidecar's SVID and checked against the bundle.
    let bundle = mesh.tmp.path().join("bundle.pem");
    std::fs::write(&bundle, mesh.ca.cli_ok(&["bundle", "show", "--format", "pem"])).unwrap();
    for name in ["a", "b", "c"] {
        let out = std::process::Command::new(bin("trustline-audit"))
            .args(["verify", "--bundle"])
            .arg(&bundle)
            .arg(logs.join(name))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{name}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains("OK") && text.contains(&format!("{TD}/{name}")),
            "{text}"
        );
    }
}

/// Ships the logs to a fresh PostgreSQL database and checks `trace`, `query` and `verify` against it, including
/// a row altered and a row deleted in the database.
async fn central_store(admin_conninfo: &str, logs: &std::path::Path, trace: &str, text: &str, mesh: &Mesh) {
    let db = format!("audit_{}_{}", std::process::id(), trustline_tests::now());
    let (admin, conn) = tokio_postgres::connect(admin_conninfo, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .unwrap();
    // Over TLS 1.3 when scripts/test.sh started PostgreSQL with a certificate (PGSSLROOTCERT names its CA).
    let pg_ca = std::env::var("TRUSTLINE_TEST_POSTGRES_CA").ok();
    let conninfo = match &pg_ca {
        Some(_) => format!("{admin_conninfo} dbname={db} sslmode=require"),
        None => format!("{admin_conninfo} dbname={db}"),
    };
    let audit = |args: &[&str]| {
        let mut cmd = std::process::Command::new(bin("trustline-audit"));
        if let Some(ca) = &pg_ca {
            cmd.env("PGSSLROOTCERT", ca);
        }
        cmd.args(args).output().unwrap()
    };
    for n in ["a", "b", "c"] {
        let dir = logs.join(n);
        let out = audit(&["ship", "--store", &conninfo, dir.to_str().unwrap()]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("as log \"{n}\"")));
        // Shipping again adds nothing.
        let again = audit(&["ship", "--store", &conninfo, dir.to_str().unwrap()]);
        assert!(String::from_utf8_lossy(&again.stdout).contains("shipped 0 new frames"));
    }
    let out = audit(&["trace", trace, "--store", &conninfo]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        text,
        "the same tree from the store"
    );
    let out = audit(&["query", "--store", &conninfo, "--decision", "bad_chain"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 3);
    let bundle = mesh.tmp.path().join("store-bundle.pem");
    std::fs::write(&bundle, mesh.ca.cli_ok(&["bundle", "show", "--format", "pem"])).unwrap();
    let verify = || {
        audit(&[
            "verify",
            "--store",
            &conninfo,
            "--bundle",
            bundle.to_str().unwrap(),
        ])
    };
    let out = verify();
    let report = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{report}");
    assert_eq!(report.matches(": OK").count(), 3, "{report}");

    // Tamper in the database (as its administrator, directly): change one record, delete another.
    let (c, conn) = tokio_postgres::connect(&format!("{admin_conninfo} dbname={db}"), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c.execute(
        "UPDATE trustline_log_frames SET body = overlay(body placing '\\x58'::bytea from 20 for 1) WHERE log = 'c' AND seq = 1",
        &[],
    )
    .await
    .unwrap();
    c.execute(
        "DELETE FROM trustline_log_frames WHERE log = 'b' AND seq = 2",
        &[],
    )
    .await
    .unwrap();
    let out = verify();
    let report = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(3), "{report}");
    assert!(
        report.contains("store:c: FAIL record 1 in store:c was altered"),
        "{report}"
    );
    assert!(report.contains("store:b: FAIL record 2 was removed"), "{report}");
    drop(c);
    let _ = admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await;
}
