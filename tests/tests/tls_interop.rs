//! The sidecar's mutual TLS against an independent TLS stack, Debian's OpenSSL 3: `openssl s_client` as a peer
//! calling the inbound listener, and `openssl s_server` as an upstream of the outbound listener. TLS 1.3 and client
//! certificates both ways.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::process::{Command, Stdio};

use trustline_tests::mesh::{echo_app, request, Mesh, TD};
use trustline_tests::{spawn_ready, PATIENCE};

/// Mints an SVID for `name`; returns (cert chain PEM path, key PEM path, bundle PEM path).
fn svid_files(mesh: &Mesh, name: &str) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let dir = mesh.tmp.path().join(format!("ossl-{name}"));
    let (_, svid, key, bundle) = trustline_tests::mint_svid(&mesh.ca, &dir, &format!("{TD}/{name}"), "1h");
    (svid, key, bundle)
}

#[tokio::test(flavor = "multi_thread")]
async fn openssl_peers_speak_mutual_tls_1_3_with_the_sidecar() {
    let mesh = Mesh::start("");
    let app = echo_app().await;
    let api = mesh.sidecar(
        "api",
        &format!("[[inbound]]\nlisten = \"127.0.0.1:0\"\napp = \"{app}\"\n"),
        &[],
    );

    // 1. openssl s_client -> inbound sidecar, presenting a client SVID, verifying the sidecar against the bundle.
    let (cert, key, bundle) = svid_files(&mesh, "ossl-client");
    let mut client = Command::new("openssl")
        .args([
            "s_client",
            "-tls1_3",
            "-quiet",
            "-alpn",
            "http/1.1",
            "-verify_return_error",
        ])
        .arg("-connect")
        .arg(api.inbound[0].to_string())
        .arg("-cert")
        .arg(&cert)
        .arg("-key")
        .arg(&key)
        .arg("-CAfile")
        .arg(&bundle)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    client
        .stdin
        .as_mut()
        .unwrap()
        .write_all(b"GET /from-openssl HTTP/1.1\r\nhost: api\r\nconnection: close\r\n\r\n")
        .unwrap();
    let out = tokio::task::spawn_blocking(move || client.wait_with_output().unwrap())
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!(
            "\"x-forwarded-client-cert\":\"By={TD}/api;URI={TD}/ossl-client\""
        )),
        "the sidecar saw openssl's SVID: {text}"
    );

    // 2. outbound sidecar -> openssl s_server, which requires our client certificate.
    let (scert, skey, sbundle) = svid_files(&mesh, "ossl-server");
    // Port 0: s_server prints `ACCEPT 127.0.0.1:PORT` with the port it bound once it listens.
    let mut cmd = Command::new("openssl");
    cmd.args([
        "s_server",
        "-tls1_3",
        "-www",
        "-Verify",
        "2",
        "-verify_return_error",
    ])
    .arg("-accept")
    .arg("127.0.0.1:0")
    .arg("-cert")
    .arg(&scert)
    .arg("-key")
    .arg(&skey)
    .arg("-CAfile")
    .arg(&sbundle);
    let (mut server, accept, server_err) = spawn_ready(cmd, "ACCEPT ");
    let upstream = accept.trim_start_matches("ACCEPT ").trim();
    let web = mesh.sidecar(
        "web",
        &format!(
            "[[outbound]]\nlisten = \"127.0.0.1:0\"\n[[outbound.route]]\nhost = \"ossl\"\nupstream = \"{upstream}\"\nspiffe_ids = [\"{TD}/ossl-server\"]\n"
        ),
        &[],
    );
    let r = trustline_tests::eventually(PATIENCE, "openssl s_server answering", || async {
        request(web.outbound[0], "GET", "ossl", "/", &[], "")
            .await
            .ok()
            .filter(|r| r.status == 200)
    })
    .await;
    // s_server -www describes the session it served: TLS 1.3, and our SVID as the client certificate.
    assert!(r.body.contains("TLSv1.3"), "{}", r.body);
    assert!(r.body.contains("Client certificate"), "{}", r.body);
    let _ = server.kill();
    let _ = server.wait();
    let err = server_err.lock().unwrap().join("\n");
    assert!(
        web.metric(
            "trustline_sidecar_tls_handshakes_total",
            &[("direction", "outbound"), ("outcome", "ok"), ("group", "X25519")]
        )
        .await
            >= 1.0,
        "OpenSSL 3.0 has no ML-KEM: the sidecar falls back to X25519 and says so: {err}"
    );
}
