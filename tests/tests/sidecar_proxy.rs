//! The sidecar pair end to end: a real CA and agent, sidecars as real processes on loopback, an app behind
//! them. Covers policy decisions on proxied requests, handshake refusals with their reasons, hot reload, and
//! the protocol details (keep-alive, upgrades, traceparent, the caller's identity header).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use trustline_tests::mesh::{echo_app, request, Mesh, TD};
use trustline_tests::{eventually, PATIENCE};

const ALLOW: &str = r#"
name: allow-web-and-batch
action: ALLOW
rules:
  - from:
      - source:
          principals: ["spiffe://example.org/web"]
    to:
      - operation:
          methods: ["GET", "POST"]
          paths: ["/api/*"]
  - from:
      - source:
          principals: ["spiffe://example.org/batch"]
    to:
      - operation:
          methods: ["GET"]
          paths: ["/reports*"]
"#;

const DENY_ADMIN: &str = r#"
name: deny-admin
action: DENY
rules:
  - to:
      - operation:
          paths: ["/api/admin*"]
"#;

fn inbound(app: std::net::SocketAddr) -> String {
    format!("[[inbound]]\nlisten = \"127.0.0.1:0\"\napp = \"{app}\"\n")
}

fn outbound(routes: &[(&str, std::net::SocketAddr, &str)]) -> String {
    let mut s = "[[outbound]]\nlisten = \"127.0.0.1:0\"\n".to_owned();
    for (host, up, id) in routes {
        s.push_str(&format!(
            "[[outbound.route]]\nhost = \"{host}\"\nupstream = \"{up}\"\nspiffe_ids = [\"{id}\"]\n"
        ));
    }
    s
}

#[tokio::test(flavor = "multi_thread")]
async fn policy_decides_every_proxied_request() {
    let mesh = Mesh::start("");
    let app = echo_app().await;
    let api = mesh.sidecar(
        "api",
        &inbound(app),
        &[("10-allow.yaml", ALLOW), ("20-deny-admin.yaml", DENY_ADMIN)],
    );
    let api_in = api.inbound[0];
    let api_id = format!("{TD}/api");
    let web = mesh.sidecar(
        "web",
        &outbound(&[
            ("api", api_in, &api_id),
            ("impostor", api_in, "spiffe://example.org/ledger"),
        ]),
        &[],
    );
    let batch = mesh.sidecar("batch", &outbound(&[("api", api_in, &api_id)]), &[]);
    let (w, b) = (web.outbound[0], batch.outbound[0]);

    // Allowed: the app sees the caller's SPIFFE ID (set by the sidecar, not forgeable) and a traceparent.
    let r = request(
        w,
        "GET",
        "api",
        "/api/items",
        &[("x-forwarded-client-cert", "URI=spiffe://example.org/forged")],
        "",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    assert_eq!(j["path"], "/api/items");
    assert_eq!(
        j["headers"]["x-forwarded-client-cert"],
        format!("By={api_id};URI={TD}/web")
    );
    let tp = j["headers"]["traceparent"].as_str().unwrap();
    assert_eq!(tp.len(), 55, "{tp}");
    // An existing traceparent is propagated unchanged.
    let given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = request(w, "POST", "api", "/api/items", &[("traceparent", given)], "hello")
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["headers"]["traceparent"], given);
    assert_eq!(r.json()["body_len"], 5);

    // Denied by method, by path (no ALLOW rule matches: default deny), by principal.
    for (addr, method, path, who) in [
        (w, "DELETE", "/api/items", "method"),
        (w, "GET", "/other", "path"),
        (b, "GET", "/api/items", "principal"),
    ] {
        let r = request(addr, method, "api", path, &[], "").await.unwrap();
        assert_eq!(r.status, 403, "denied by {who}: {}", r.body);
        let j = r.json();
        assert_eq!(j["error"], "denied");
        assert!(j["policy"].is_null(), "default deny names no policy: {j}");
        assert!(j["reason"].as_str().unwrap().contains("(default deny)"), "{j}");
    }
    // The second ALLOW rule admits batch where it should.
    assert_eq!(
        request(b, "GET", "api", "/reports/q3", &[], "")
            .await
            .unwrap()
            .status,
        200
    );

    // DENY overrides ALLOW, and the 403 names the policy and rule.
    let r = request(w, "GET", "api", "/api/admin/users", &[], "")
        .await
        .unwrap();
    assert_eq!(r.status, 403);
    let j = r.json();
    assert_eq!(j["policy"], "deny-admin");
    assert_eq!(j["rule"], 0);
    assert_eq!(j["principal"], format!("{TD}/web"));

    // An upstream presenting another SPIFFE ID than the route expects is refused at the handshake.
    let r = request(w, "GET", "impostor", "/api/items", &[], "")
        .await
        .unwrap();
    assert_eq!(r.status, 502, "{}", r.body);
    assert!(r.body.contains("wrong_id"), "{}", r.body);
    assert!(
        web.metric(
            "trustline_sidecar_tls_handshakes_total",
            &[("direction", "outbound"), ("outcome", "wrong_id")]
        )
        .await
            >= 1.0
    );
    // No route for a host: 404 naming it.
    let r = request(w, "GET", "nowhere", "/", &[], "").await.unwrap();
    assert_eq!(r.status, 404);
    assert!(r.body.contains("nowhere"), "{}", r.body);

    // HTTP/1.1 upgrade through both sidecars: bytes flow both ways after 101.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(w).await.unwrap();
        s.write_all(b"GET /api/ws HTTP/1.1\r\nhost: api\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 1024];
        let n = tokio::time::timeout(PATIENCE, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let head = String::from_utf8_lossy(&buf[..n]).to_string();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        // Each message comes back whole through the tunnel (read_exact fails if it closes first), also after a
        // pause: a quiet tunnel is not an idle HTTP connection.
        for (msg, pause) in [(&b"ping through the tunnel"[..], 0), (&b"still there"[..], 300)] {
            tokio::time::sleep(Duration::from_millis(pause)).await;
            s.write_all(msg).await.unwrap();
            let mut got = vec![0u8; msg.len()];
            tokio::time::timeout(PATIENCE, s.read_exact(&mut got))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(got, msg);
        }
    }

    // Keep-alive between the sidecars survives idleness: after a pause long enough for `api` to park the
    // pooled connection (no buffers, no task), the next request reuses it (no new handshake).
    let handshakes = || {
        api.metric(
            "trustline_sidecar_tls_handshakes_total",
            &[("direction", "inbound"), ("outcome", "ok")],
        )
    };
    assert_eq!(
        request(w, "GET", "api", "/api/items", &[], "")
            .await
            .unwrap()
            .status,
        200
    );
    let before = handshakes().await;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let r = request(w, "POST", "api", "/api/items", &[], "after a pause")
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json()["body_len"], 13);
    }
    assert_eq!(
        handshakes().await,
        before,
        "the pooled connection was reused after parking"
    );

    // Metrics: requests by direction and decision, handshakes by key exchange group.
    assert!(
        api.metric(
            "trustline_sidecar_requests_total",
            &[("direction", "inbound"), ("decision", "deny"), ("status", "403")]
        )
        .await
            >= 4.0
    );
    assert!(
        api.metric(
            "trustline_sidecar_requests_total",
            &[("direction", "inbound"), ("decision", "allow")]
        )
        .await
            >= 3.0
    );
    assert!(
        web.metric("trustline_sidecar_requests_total", &[("direction", "outbound")])
            .await
            >= 5.0
    );
    let pq = api
        .metric(
            "trustline_sidecar_tls_handshakes_total",
            &[
                ("direction", "inbound"),
                ("outcome", "ok"),
                ("group", "X25519MLKEM768"),
            ],
        )
        .await;
    assert!(pq >= 1.0, "sidecars agree on the hybrid post-quantum group");
    assert!(
        api.logged("key_exchange=\"X25519MLKEM768\""),
        "{:?}",
        api.logs.lock().unwrap()
    );
    assert!(
        api.metric("trustline_sidecar_svid_expiry_timestamp_seconds", &[])
            .await
            > 1.7e9
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn policy_hot_reload_takes_valid_changes_and_keeps_the_last_good_set() {
    let mesh = Mesh::start("");
    let app = echo_app().await;
    // No policy yet: every authenticated peer is allowed.
    let api = mesh.sidecar("api", &inbound(app), &[]);
    let web = mesh.sidecar(
        "web",
        &outbound(&[("api", api.inbound[0], &format!("{TD}/api"))]),
        &[],
    );
    let w = web.outbound[0];
    assert_eq!(
        request(w, "GET", "api", "/anything", &[], "")
            .await
            .unwrap()
            .status,
        200
    );

    // An ALLOW policy for someone else: default deny now applies to web.
    std::fs::write(
        api.policy_dir.join("allow.yaml"),
        "name: only-batch\naction: ALLOW\nrules:\n  - from:\n      - source:\n          principals: [\"spiffe://example.org/batch\"]\n",
    )
    .unwrap();
    eventually(PATIENCE, "the new policy in force", || async {
        (request(w, "GET", "api", "/anything", &[], "")
            .await
            .unwrap()
            .status
            == 403)
            .then_some(())
    })
    .await;

    // Allow web too.
    std::fs::write(
        api.policy_dir.join("allow.yaml"),
        "name: web-and-batch\naction: ALLOW\nrules:\n  - from:\n      - source:\n          principals: [\"spiffe://example.org/batch\", \"spiffe://example.org/web\"]\n",
    )
    .unwrap();
    eventually(PATIENCE, "the second policy in force", || async {
        (request(w, "GET", "api", "/anything", &[], "")
            .await
            .unwrap()
            .status
            == 200)
            .then_some(())
    })
    .await;

    // An invalid change is refused with file:line:column and the field; the last good set stays in force.
    std::fs::write(
        api.policy_dir.join("allow.yaml"),
        "name: broken\naction: ALLOW\nrules:\n  - from:\n      - source:\n          principalz: [\"x\"]\n",
    )
    .unwrap();
    eventually(PATIENCE, "the refusal", || async {
        (api.metric(
            "trustline_sidecar_policy_reloads_total",
            &[("result", "rejected")],
        )
        .await
            >= 1.0)
            .then_some(())
    })
    .await;
    assert!(api.logged("allow.yaml:6:"), "{:?}", api.logs.lock().unwrap());
    assert!(api.logged("principalz"));
    for _ in 0..5 {
        assert_eq!(
            request(w, "GET", "api", "/anything", &[], "")
                .await
                .unwrap()
                .status,
            200
        );
    }
}
