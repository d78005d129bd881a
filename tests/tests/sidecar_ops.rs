//! JWT-SVID request authentication, opaque TCP, limits, graceful drain and config errors, through real
//! sidecars on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trustline_tests::mesh::{echo_app, echo_app_counting_slow, request, Mesh, TD};
use trustline_tests::{bin, eventually, PATIENCE};

fn route(up: std::net::SocketAddr) -> String {
    format!(
        "[[outbound]]\nlisten = \"127.0.0.1:0\"\n[[outbound.route]]\nhost = \"api\"\nupstream = \"{up}\"\nspiffe_ids = [\"{TD}/api\"]\n"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn jwt_svids_are_validated_and_their_claims_drive_policy() {
    let mesh = Mesh::start("");
    let app = echo_app().await;
    let claims_policy = r#"
name: reports-need-the-reporter
action: DENY
rules:
  - to:
      - operation:
          paths: ["/reports*"]
    when:
      - key: request.auth.claims[sub]
        notValues: ["spiffe://example.org/reporter"]
"#;
    let api = mesh.sidecar(
        "api",
        &format!(
            "[[inbound]]\nlisten = \"127.0.0.1:0\"\napp = \"{app}\"\n[inbound.jwt]\naudience = \"api\"\nalgorithms = [\"ES256\", \"ES384\"]\n"
        ),
        &[("deny.yaml", claims_policy)],
    );
    let web = mesh.sidecar("web", &route(api.inbound[0]), &[]);
    let w = web.outbound[0];
    let mint = |id: &str, aud: &str, ttl: &str| {
        mesh.ca
            .cli_ok(&["jwt", "mint", "--spiffe-id", id, "--audience", aud, "--ttl", ttl])
            .trim()
            .to_owned()
    };
    let bearer = |t: &str| format!("Bearer {t}");

    // No token: 401 (required), never forwarded.
    let r = request(w, "GET", "api", "/x", &[], "").await.unwrap();
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(r.body.contains("JWT-SVID is required"), "{}", r.body);

    // A valid token for the audience. The JWT bundle arrives on its own stream: allow a moment.
    let good = mint(&format!("{TD}/web"), "api", "5m");
    let r = eventually(PATIENCE, "the JWT bundle", || async {
        let r = request(w, "GET", "api", "/x", &[("authorization", &bearer(&good))], "")
            .await
            .unwrap();
        (r.status == 200).then_some(r)
    })
    .await;
    assert!(r.json()["headers"]["authorization"]
        .as_str()
        .unwrap()
        .starts_with("Bearer "));

    // Claims in policy: only the reporter's token may read /reports.
    let r = request(
        w,
        "GET",
        "api",
        "/reports/1",
        &[("authorization", &bearer(&good))],
        "",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.json()["policy"], "reports-need-the-reporter");
    let reporter = mint(&format!("{TD}/reporter"), "api", "5m");
    let r = request(
        w,
        "GET",
        "api",
        "/reports/1",
        &[("authorization", &bearer(&reporter))],
        "",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);

    // Bad tokens, each refused with its reason.
    let wrong_aud = mint(&format!("{TD}/web"), "billing", "5m");
    let expired = mint(&format!("{TD}/web"), "api", "1s");
    let key = rcgen::KeyPair::generate().unwrap();
    let claims =
        serde_json::json!({"sub": format!("{TD}/web"), "aud": "api", "exp": trustline_tests::now() + 300});
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    h.kid = Some("not-a-bundle-key".into());
    let unknown_kid = jsonwebtoken::encode(
        &h,
        &claims,
        &jsonwebtoken::EncodingKey::from_ec_der(&key.serialize_der()),
    )
    .unwrap();
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    h.kid = Some("k".into());
    let hmac =
        jsonwebtoken::encode(&h, &claims, &jsonwebtoken::EncodingKey::from_secret(b"guessable")).unwrap();
    // `exp` has one-second granularity and a token is expired only once `now > exp`: wait past two seconds.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for (token, why) in [
        (wrong_aud.as_str(), "InvalidAudience"),
        (expired.as_str(), "ExpiredSignature"),
        (unknown_kid.as_str(), "not in the trust bundle"),
        (hmac.as_str(), "HS256 is not allowed"),
        ("not.a.jwt", "malformed"),
    ] {
        let r = request(w, "GET", "api", "/x", &[("authorization", &bearer(token))], "")
            .await
            .unwrap();
        assert_eq!(r.status, 401, "{why}: {}", r.body);
        assert!(r.body.contains(why), "{why}: {}", r.body);
        assert!(r.headers.contains_key("www-authenticate"));
    }
    assert!(
        api.metric(
            "trustline_sidecar_requests_total",
            &[("direction", "inbound"), ("decision", "unauthenticated")]
        )
        .await
            >= 6.0
    );
}

/// A TCP echo server.
async fn tcp_echo() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    a
}

#[tokio::test(flavor = "multi_thread")]
async fn opaque_tcp_authorizes_the_peer_id_only() {
    let mesh = Mesh::start("");
    let app = tcp_echo().await;
    let allow_web = "name: web-only\naction: ALLOW\nrules:\n  - from:\n      - source:\n          principals: [\"spiffe://example.org/web\"]\n";
    let db = mesh.sidecar(
        "db",
        &format!("[[inbound]]\nlisten = \"127.0.0.1:0\"\napp = \"{app}\"\nprotocol = \"tcp\"\n"),
        &[("allow.yaml", allow_web)],
    );
    let tcp_out = |up| {
        format!(
            "[[outbound]]\nlisten = \"127.0.0.1:0\"\nprotocol = \"tcp\"\nupstream = \"{up}\"\nspiffe_ids = [\"{TD}/db\"]\n"
        )
    };
    let web = mesh.sidecar("web", &tcp_out(db.inbound[0]), &[]);
    let batch = mesh.sidecar("batch", &tcp_out(db.inbound[0]), &[]);

    let mut s = tokio::net::TcpStream::connect(web.outbound[0]).await.unwrap();
    let msg = vec![7u8; 100_000];
    s.write_all(&msg).await.unwrap();
    let mut got = vec![0u8; msg.len()];
    tokio::time::timeout(PATIENCE, s.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, msg, "bytes pass both ways, unchanged");

    // batch is authenticated but not allowed: the connection is closed without reaching the app.
    let mut s = tokio::net::TcpStream::connect(batch.outbound[0]).await.unwrap();
    let _ = s.write_all(b"hello").await;
    let mut buf = [0u8; 8];
    let n = tokio::time::timeout(PATIENCE, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "closed");
    assert_eq!(
        db.metric(
            "trustline_sidecar_tcp_connections_denied_total",
            &[("direction", "inbound")]
        )
        .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn limits_and_graceful_drain() {
    let mesh = Mesh::start("");
    let (app, slow_started) = echo_app_counting_slow().await;
    let mut api = mesh.sidecar(
        "api",
        &format!(
            "[limits]\nmax_body_bytes = 1000\nmax_header_bytes = 2048\ndrain_timeout = \"10s\"\n[[inbound]]\nlisten = \"127.0.0.1:0\"\napp = \"{app}\"\n"
        ),
        &[],
    );
    let web = mesh.sidecar("web", &route(api.inbound[0]), &[]);
    let w = web.outbound[0];
    assert_eq!(
        request(w, "POST", "api", "/small", &[], &"a".repeat(1000))
            .await
            .unwrap()
            .status,
        200
    );
    let r = request(w, "POST", "api", "/big", &[], &"a".repeat(1001))
        .await
        .unwrap();
    assert_eq!(r.status, 413, "{}", r.body);
    assert!(r.body.contains("max_body_bytes"), "{}", r.body);
    let big = "b".repeat(3000);
    let r = request(w, "GET", "api", "/h", &[("x-big", &big)], "")
        .await
        .unwrap();
    assert_eq!(r.status, 431, "{}", r.body);

    // SIGTERM while a request is in flight: it completes; then the listener is gone.
    let slow = tokio::spawn(async move { request(w, "GET", "api", "/slow", &[], "").await });
    eventually(PATIENCE, "the slow request to reach the app", || {
        let n = slow_started.load(std::sync::atomic::Ordering::SeqCst);
        async move { (n > 0).then_some(()) }
    })
    .await;
    let pid = api.pid().unwrap();
    std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .unwrap();
    let r = slow.await.unwrap().unwrap();
    assert_eq!(
        r.status, 200,
        "the in-flight request finished during drain: {}",
        r.body
    );
    api.stop();
    assert!(api.logged("draining"));
    assert!(
        tokio::net::TcpStream::connect(api.inbound[0]).await.is_err(),
        "no longer listening"
    );
}

#[test]
fn config_errors_name_the_field_and_exit_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("sidecar.toml");
    std::fs::write(
        &cfg,
        "workload_api_socket = \"/run/agent.sock\"\n[[outbound]]\nlisten = \"0.0.0.0:15001\"\n[[outbound.route]]\nhost = \"a\"\nupstream = \"a:1\"\nspiffe_ids = [\"spiffe://example.org/a\"]\n",
    )
    .unwrap();
    for args in [["run", "--config"], ["check-config", "--config"]] {
        let out = std::process::Command::new(bin("trustline-sidecar"))
            .args(args)
            .arg(&cfg)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("outbound[0].listen") && err.contains("0.0.0.0:15001"),
            "{err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "one readable line: {err}");
    }
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/sidecar.toml");
    let out = std::process::Command::new(bin("trustline-sidecar"))
        .args(["check-config", "--config"])
        .arg(&shipped)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("host payments"));
}
