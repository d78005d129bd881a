//! End-to-end tests of `trustline-agent` against a real `trustline-ca`, with the reference SPIFFE client (the
//! `spiffe` crate's `WorkloadApiClient`, unmodified) and raw clients for bad input.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::MetadataExt;
use std::time::Instant;

use tokio_stream::StreamExt;
use trustline_tests::{eventually, now, verify_svid, Agent, Ca, PATIENCE};

fn my_uid() -> u32 {
    std::fs::metadata("/proc/self").unwrap().uid()
}

fn node_token(ca: &Ca, node: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(&ca.cli_ok(&["token", "generate", "--spiffe-id", node, "--output", "json"]))
            .unwrap();
    v["token"].as_str().unwrap().to_owned()
}

fn entry(ca: &Ca, id: &str, parent: &str, selector: &str) {
    ca.cli_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        id,
        "--parent-id",
        parent,
        "--selector",
        selector,
    ]);
}

const NODE: &str = "spiffe://example.org/trustline/agent/n1";

async fn client(agent: &Agent) -> spiffe::WorkloadApiClient {
    spiffe::WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .unwrap()
}

fn jwt_sub(token: &str) -> String {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).unwrap();
    let v: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    v["sub"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_rust_spiffe_client_gets_svids_bundles_and_jwts() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::start(&tmp.path().join("ca"));
    let me = format!("unix:uid:{}", my_uid());
    entry(&ca, "spiffe://example.org/web", NODE, &me);
    let agent = Agent::start(
        &tmp.path().join("agent"),
        &ca,
        Some(&node_token(&ca, NODE)),
        "health_listen = \"127.0.0.1:0\"\n",
    );
    assert_eq!(agent.id, NODE);
    let metrics_addr = agent.listening("health and metrics");

    let c = client(&agent).await;
    let svid = eventually(PATIENCE, "an X.509-SVID", || {
        let c = c.clone();
        async move { c.fetch_x509_svid().await.ok() }
    })
    .await;
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/web");
    let chain: Vec<Vec<u8>> = svid.cert_chain().iter().map(|c| c.as_ref().to_vec()).collect();
    assert_eq!(
        verify_svid(&chain, &ca.bundle_roots(), now()).unwrap(),
        "spiffe://example.org/web"
    );
    let bundles = c.fetch_x509_bundles().await.unwrap();
    let td = spiffe::TrustDomain::new("example.org").unwrap();
    assert_eq!(bundles.get(&td).unwrap().authorities().len(), 1);

    let jwt = c.fetch_jwt_svid(["payments"], None).await.unwrap();
    assert_eq!(jwt.spiffe_id().to_string(), "spiffe://example.org/web");
    let validated = c.validate_jwt_token("payments", jwt.token()).await.unwrap();
    assert_eq!(validated.spiffe_id().to_string(), "spiffe://example.org/web");
    assert!(
        c.validate_jwt_token("other", jwt.token()).await.is_err(),
        "wrong audience"
    );
    let jb = c.fetch_jwt_bundles().await.unwrap();
    assert!(jb.get(&td).is_some());

    // The HTTP API: one call for a JWT-SVID.
    let (status, body) = agent.http("GET", "/v1/jwt-svid?audience=payments", None).await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["spiffe_id"], "spiffe://example.org/web");
    let token = v["token"].as_str().unwrap();
    let (status, body) = agent
        .http(
            "POST",
            "/v1/jwt-svid/validate",
            Some(&format!(r#"{{"token":"{token}","audience":"payments"}}"#)),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("spiffe://example.org/web"));
    let (status, body) = agent.http("GET", "/v1/bundle/jwks", None).await;
    assert_eq!(status, 200);
    assert!(body.contains("jwt-svid"));

    // A new entry reaches the agent by push (its only way in): measure until a workload can use it.
    let started = Instant::now();
    entry(&ca, "spiffe://example.org/api", NODE, &me);
    eventually(PATIENCE, "the new entry to reach the agent", || {
        let agent = &agent;
        async move {
            let (s, _) = agent
                .http(
                    "GET",
                    "/v1/jwt-svid?audience=a&spiffe_id=spiffe://example.org/api",
                    None,
                )
                .await;
            (s == 200).then_some(())
        }
    })
    .await;
    println!(
        "new entry usable by a workload {:?} after `entry create` started (includes CLI process start)",
        started.elapsed()
    );

    // Prometheus metrics.
    let metrics = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(metrics_addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    };
    assert!(
        metrics.contains("trustline_agent_requests_total{api=\"http\",method=\"jwt-svid\",outcome=\"ok\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("trustline_agent_x509_svids_minted_total"),
        "{metrics}"
    );
    assert!(metrics.contains("trustline_agent_ca_connected 1"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread")]
async fn workloads_are_told_apart_by_kernel_uid() {
    if my_uid() != 0
        || std::process::Command::new("setpriv")
            .arg("--version")
            .output()
            .is_err()
    {
        println!("skipped: needs root and setpriv to run workloads as other uids");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::start(&tmp.path().join("ca"));
    entry(&ca, "spiffe://example.org/alice", NODE, "unix:uid:4101");
    entry(&ca, "spiffe://example.org/bob", NODE, "unix:uid:4102");
    let agent = Agent::start(&tmp.path().join("agent"), &ca, Some(&node_token(&ca, NODE)), "");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let fetch_as = |uid: u32| {
        std::process::Command::new("setpriv")
            .args([
                format!("--reuid={uid}"),
                format!("--regid={uid}"),
                "--clear-groups".into(),
            ])
            .arg(trustline_tests::bin("trustline-agent"))
            .args(["api", "fetch", "jwt", "--audience", "db", "--socket"])
            .arg(&agent.socket)
            .output()
            .unwrap()
    };
    let mut subs = Vec::new();
    for uid in [4101, 4102] {
        let out = eventually(PATIENCE, "a JWT for the uid", || {
            let out = fetch_as(uid);
            async move { out.status.success().then_some(out) }
        })
        .await;
        subs.push(jwt_sub(String::from_utf8_lossy(&out.stdout).trim()));
    }
    assert_eq!(
        subs,
        vec!["spiffe://example.org/alice", "spiffe://example.org/bob"]
    );
    let out = fetch_as(4103);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no identity issued"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn rotations_reach_an_open_stream_and_every_svid_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    let mut cfg = trustline_tests::default_config(&dir);
    cfg.push_str("\n[svid]\nx509_ttl = \"6s\"\nagent_ttl = \"6s\"\n");
    let ca = Ca::start_with(&dir, &cfg);
    entry(
        &ca,
        "spiffe://example.org/web",
        NODE,
        &format!("unix:uid:{}", my_uid()),
    );
    let agent = Agent::start(&tmp.path().join("agent"), &ca, Some(&node_token(&ca, NODE)), "");
    let c = client(&agent).await;
    let mut stream = c.stream_x509_svids().await.unwrap();
    let mut serials = std::collections::HashSet::new();
    let deadline = Instant::now() + 2 * PATIENCE;
    while serials.len() < 3 && Instant::now() < deadline {
        let svid = tokio::time::timeout(PATIENCE, stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let chain: Vec<Vec<u8>> = svid.cert_chain().iter().map(|c| c.as_ref().to_vec()).collect();
        verify_svid(&chain, &ca.bundle_roots(), now()).unwrap();
        serials.insert(chain[0].clone());
    }
    assert!(
        serials.len() >= 3,
        "saw {} SVIDs (first + rotations) on one stream",
        serials.len()
    );
    // The agent's own 6 s SVID is renewed over mutual TLS (its CSR names its own ID).
    assert!(
        agent.logged("agent SVID renewed"),
        "{}",
        agent.logs.lock().unwrap().join("\n")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_ca_outage_is_ridden_out_and_recovered_from() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    let mut ca = Ca::start(&dir);
    // The CA comes back on the port it picked: pin it in the config for the restart.
    let cfg = trustline_tests::default_config(&dir)
        .replace("127.0.0.1:0\"\nhealth", &format!("{}\"\nhealth", ca.agent_addr));
    std::fs::write(&ca.config, cfg).unwrap();
    entry(
        &ca,
        "spiffe://example.org/web",
        NODE,
        &format!("unix:uid:{}", my_uid()),
    );
    let agent = Agent::start(&tmp.path().join("agent"), &ca, Some(&node_token(&ca, NODE)), "");
    let c = client(&agent).await;
    let first = eventually(PATIENCE, "an SVID", || {
        let c = c.clone();
        async move { c.fetch_x509_svid().await.ok() }
    })
    .await;
    let (s, _) = agent.http("GET", "/v1/jwt-svid?audience=x", None).await;
    assert_eq!(s, 200);

    ca.stop();
    // Cached SVIDs keep being served.
    let again = c.fetch_x509_svid().await.unwrap();
    assert_eq!(again.spiffe_id(), first.spiffe_id());
    let (s, _) = agent.http("GET", "/v1/jwt-svid?audience=x", None).await;
    assert_eq!(s, 200, "cached JWT-SVID still served");
    // Something never cached cannot be minted: a clear error.
    let (s, body) = agent.http("GET", "/v1/jwt-svid?audience=never-seen", None).await;
    assert_eq!(s, 503, "{body}");
    assert!(body.contains("ca_unavailable"), "{body}");
    let health = eventually(PATIENCE, "the agent to notice the outage", || {
        let agent = &agent;
        async move {
            let (_, b) = agent.http("GET", "/v1/health", None).await;
            b.contains("\"ca_connected\":false").then_some(b)
        }
    })
    .await;
    assert!(health.contains("agent_id"));

    // The CA comes back on the same address: the agent reconnects by itself.
    let addr = ca.agent_addr;
    ca.restart();
    assert_eq!(ca.agent_addr, addr);
    eventually(PATIENCE, "the agent to reconnect", || {
        let agent = &agent;
        async move {
            let (s, _) = agent.http("GET", "/v1/jwt-svid?audience=never-seen", None).await;
            (s == 200).then_some(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_clear_errors_and_the_agent_stays_up() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::start(&tmp.path().join("ca"));
    entry(
        &ca,
        "spiffe://example.org/web",
        NODE,
        &format!("unix:uid:{}", my_uid()),
    );
    let agent = Agent::start(&tmp.path().join("agent"), &ca, Some(&node_token(&ca, NODE)), "");

    // Raw gRPC without the security header.
    let path = agent.socket.clone();
    let ch = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let p = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(p).await?,
                ))
            }
        }))
        .await
        .unwrap();
    let mut raw = trustline_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(ch);
    let err = raw
        .fetch_jwtsvid(trustline_proto::workload::JwtsvidRequest {
            audience: vec!["a".into()],
            spiffe_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("workload.spiffe.io"), "{}", err.message());

    let c = client(&agent).await;
    let err = c.fetch_jwt_svid(Vec::<String>::new(), None).await.unwrap_err();
    assert!(format!("{err:?}").to_lowercase().contains("audience"), "{err:?}");
    let many: Vec<String> = (0..100).map(|i| format!("aud{i}")).collect();
    let err = c.fetch_jwt_svid(many, None).await.unwrap_err();
    assert!(format!("{err:?}").contains("too many audiences"), "{err:?}");
    assert!(c.validate_jwt_token("a", "not.a.jwt").await.is_err());

    for (path, status, code) in [
        ("/v1/jwt-svid", 400, "missing_audience"),
        ("/v1/jwt-svid?audience=", 400, "invalid_request"),
        (
            "/v1/jwt-svid?audience=a&spiffe_id=spiffe://example.org/nobody",
            403,
            "no_identity",
        ),
        ("/v1/jwt-svid?audience=%zz", 400, "invalid_request"),
        ("/v1/jwt-svid?aud=a", 400, "invalid_request"),
    ] {
        let (s, body) = agent.http("GET", path, None).await;
        assert_eq!(s, status, "{path}: {body}");
        let v: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|_| panic!("{path}: JSON error body, got {body}"));
        assert_eq!(v["code"], code, "{path}: {body}");
        assert!(!v["message"].as_str().unwrap().is_empty());
    }
    let (s, body) = agent
        .http(
            "POST",
            "/v1/jwt-svid/validate",
            Some(r#"{"token":"x.y.z","audience":"a"}"#),
        )
        .await;
    assert_eq!(s, 401, "{body}");
    assert!(body.contains("invalid_token"));
    let (s, body) = agent
        .http("POST", "/v1/jwt-svid/validate", Some("{not json"))
        .await;
    assert_eq!(s, 400, "{body}");

    // Still serving.
    let (s, _) = agent.http("GET", "/v1/jwt-svid?audience=a", None).await;
    assert_eq!(s, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_agent_needs_no_new_join_token() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::start(&tmp.path().join("ca"));
    entry(
        &ca,
        "spiffe://example.org/web",
        NODE,
        &format!("unix:uid:{}", my_uid()),
    );
    let mut agent = Agent::start(&tmp.path().join("agent"), &ca, Some(&node_token(&ca, NODE)), "");
    agent.restart();
    assert_eq!(agent.id, NODE);
    let c = client(&agent).await;
    let svid = eventually(PATIENCE, "an SVID after restart", || {
        let c = c.clone();
        async move { c.fetch_x509_svid().await.ok() }
    })
    .await;
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/web");
    // The stored agent key is sealed: no PKCS#8 EC key header in clear on disk.
    let state = std::fs::read(tmp.path().join("agent/state/agent-svid.json")).unwrap();
    assert!(!String::from_utf8_lossy(&state).contains("PRIVATE KEY"));
    // A node that never attested gets told what to do.
    let other = tmp.path().join("fresh");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("bundle.pem"), ca.cli_ok(&["bundle", "show"])).unwrap();
    std::fs::write(
        other.join("a.toml"),
        format!(
            "trust_domain = \"example.org\"\nca_address = \"{}\"\ntrust_bundle = \"bundle.pem\"\ndata_dir = \"state\"\n",
            ca.agent_addr
        ),
    )
    .unwrap();
    let out = std::process::Command::new(trustline_tests::bin("trustline-agent"))
        .args(["run", "--config"])
        .arg(other.join("a.toml"))
        .env_remove("TRUSTLINE_JOIN_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("has not attested yet") && err.contains("--join-token"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_python_spiffe_client_works_unmodified() {
    // py-spiffe on grpc-python sends `:authority: <percent-encoded socket path>`, which a stock tonic server resets
    // with PROTOCOL_ERROR; the agent must accept it as SPIRE does.
    let Ok(python) = std::env::var("TRUSTLINE_TEST_PYTHON") else {
        println!(
            "skipped: TRUSTLINE_TEST_PYTHON is not set (scripts/test.sh installs py-spiffe and sets it)"
        );
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::start(&tmp.path().join("ca"));
    entry(
        &ca,
        "spiffe://example.org/py",
        NODE,
        &format!("unix:uid:{}", my_uid()),
    );
    let agent = Agent::start(&tmp.path().join("agent"), &ca, Some(&node_token(&ca, NODE)), "");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/workload_client.py");
    let out = tokio::process::Command::new(&python)
        .arg(&script)
        .env(
            "SPIFFE_ENDPOINT_SOCKET",
            format!("unix://{}", agent.socket.display()),
        )
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "py-spiffe failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["x509_spiffe_id"], "spiffe://example.org/py");
    assert_eq!(v["jwt_spiffe_id"], "spiffe://example.org/py");
    assert_eq!(v["validated_spiffe_id"], "spiffe://example.org/py");
    assert_eq!(v["bundle_trust_domains"], serde_json::json!(["example.org"]));
}

#[tokio::test(flavor = "multi_thread")]
async fn loopback_tcp_callers_are_identified_by_the_kernels_socket_tables() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::start(&tmp.path().join("ca"));
    entry(
        &ca,
        "spiffe://example.org/web",
        NODE,
        &format!("unix:uid:{}", my_uid()),
    );
    entry(&ca, "spiffe://example.org/tcp-user", NODE, "unix:uid:4201");
    let agent = Agent::start(
        &tmp.path().join("agent"),
        &ca,
        Some(&node_token(&ca, NODE)),
        "http_listen = \"127.0.0.1:0\"\n",
    );
    let addr = agent.listening("HTTP API");
    let get = |path: &str| {
        let path = path.to_owned();
        async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            // A header naming another identity changes nothing: only the kernel's tables count. `Metadata: true`
            // and a loopback Host are what the TCP listener requires of every request (agent_bounds.rs).
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nMetadata: true\r\nX-Spiffe-Id: spiffe://example.org/tcp-user\r\nConnection: close\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        }
    };
    let out = eventually(PATIENCE, "a JWT over loopback TCP", || {
        let f = get("/v1/jwt-svid?audience=a");
        async move {
            let o = f.await;
            o.starts_with("HTTP/1.1 200").then_some(o)
        }
    })
    .await;
    assert!(
        out.contains("\"spiffe_id\":\"spiffe://example.org/web\""),
        "{out}"
    );
    let _ = &agent;
    if my_uid() == 0
        && std::process::Command::new("setpriv")
            .arg("--version")
            .output()
            .is_ok()
    {
        let curl_as = |uid: u32| {
            std::process::Command::new("setpriv")
                .args([
                    format!("--reuid={uid}"),
                    format!("--regid={uid}"),
                    "--clear-groups".into(),
                ])
                .args(["curl", "-s", "-H", "Metadata: true"])
                .arg(format!("http://{addr}/v1/jwt-svid?audience=a"))
                .output()
                .unwrap()
        };
        let body = String::from_utf8_lossy(&curl_as(4201).stdout).into_owned();
        assert!(body.contains("spiffe://example.org/tcp-user"), "{body}");
        let body = String::from_utf8_lossy(&curl_as(4202).stdout).into_owned();
        assert!(body.contains("no_identity"), "{body}");
    }
}
