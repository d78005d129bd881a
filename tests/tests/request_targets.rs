//! The sidecar under attack by a peer with a valid SVID: every spelling of a path and host that policy and the
//! app could read differently. Against a real mesh (CA, agent, sidecars, an echo app that reports exactly what it
//! received), each variant is either refused, or reaches the app as the one canonical request that policy
//! checked and the accountability log recorded.
//!
//! Before `sidecar::canon`, 15 of the path variants below passed the DENY on `/api/admin*` and reached the app
//! (which decodes and normalizes) as `/api/admin/users`; the host variants reached it with a host policy never
//! saw; and a client naming an identity header in `Connection` made the sidecar drop the header it had set.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trustline_identity::spiffe_id::{SpiffeId, TrustDomain};
use trustline_identity::tls::{client_config, ExpectedPeer, RotatingCert, SpiffeServerVerifier, TrustBundle};
use trustline_tests::mesh::{echo_app, request, Mesh, TD};
use trustline_tests::PATIENCE;

const ALLOW: &str = "name: web-reads-api\naction: ALLOW\nrules:\n  - from:\n      - source:\n          principals: [\"spiffe://example.org/web\"]\n    to:\n      - operation:\n          paths: [\"/api/*\"]\n";
const DENY: &str =
    "name: no-admin\naction: DENY\nrules:\n  - to:\n      - operation:\n          paths: [\"/api/admin*\"]\n";

/// A peer of the mesh: `spiffe://example.org/web`'s SVID, talking straight to an inbound listener.
struct Peer {
    tls: Arc<rustls::ClientConfig>,
    h2: Arc<rustls::ClientConfig>,
}

impl Peer {
    fn new(mesh: &Mesh) -> Peer {
        let (key, svid, _, _) = trustline_tests::mint_svid(
            &mesh.ca,
            &mesh.tmp.path().join("peer"),
            &format!("{TD}/web"),
            "1h",
        );
        let chain =
            trustline_identity::bundle::certs_from_pem(&std::fs::read_to_string(svid).unwrap()).unwrap();
        let roots = mesh.ca.bundle_roots();
        let config = |alpn: &[u8]| {
            let bundle = TrustBundle::new(TrustDomain::new("example.org").unwrap(), &roots).unwrap();
            let verifier = Arc::new(SpiffeServerVerifier::new(
                bundle,
                ExpectedPeer::OneOf(vec![SpiffeId::new(format!("{TD}/api")).unwrap()]),
            ));
            let rc = Arc::new(RotatingCert::default());
            rc.set(chain.clone(), &key.serialize_der()).unwrap();
            let mut cfg = client_config(verifier, Some(rc)).unwrap();
            cfg.alpn_protocols = vec![alpn.to_vec()];
            Arc::new(cfg)
        };
        Peer {
            tls: config(b"http/1.1"),
            h2: config(b"h2"),
        }
    }

    async fn connect(
        &self,
        addr: SocketAddr,
        cfg: &Arc<rustls::ClientConfig>,
    ) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio_rustls::TlsConnector::from(cfg.clone())
            .connect(rustls::pki_types::ServerName::try_from("api").unwrap(), tcp)
            .await
            .unwrap()
    }

    /// Sends `head` (request line and headers, without the final empty line; `Connection: close` is added) as
    /// raw bytes over HTTP/1.1 and returns the status and body.
    async fn raw(&self, addr: SocketAddr, head: &str) -> (u16, String) {
        let mut tls = self.connect(addr, &self.tls).await;
        tls.write_all(format!("{head}\r\nconnection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(PATIENCE, tls.read_to_end(&mut out))
            .await
            .expect("response within the bound")
            .ok();
        let text = String::from_utf8_lossy(&out).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status in {text:?} for {head:?}"));
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    }

    /// `GET path` with `Host: api`.
    async fn get(&self, addr: SocketAddr, path: &str) -> (u16, String) {
        self.raw(addr, &format!("GET {path} HTTP/1.1\r\nhost: api")).await
    }

    /// One HTTP/2 request with `:authority` from `uri` and extra headers.
    async fn h2(&self, addr: SocketAddr, uri: &str, headers: &[(&str, &str)]) -> (u16, String) {
        let tls = self.connect(addr, &self.h2).await;
        let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut b = http::Request::builder().uri(uri).version(http::Version::HTTP_2);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let resp = tokio::time::timeout(
            PATIENCE,
            send.send_request(b.body(Full::new(Bytes::new())).unwrap()),
        )
        .await
        .unwrap()
        .unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn no_spelling_of_a_path_or_host_reaches_the_app_unchecked() {
    let mesh = Mesh::start("");
    let app = echo_app().await;
    let log_dir = mesh.tmp.path().join("api-log");
    let api = mesh.sidecar(
        "api",
        &format!(
            "[log]\ndir = \"{}\"\n\n\
             [[inbound]]\nlisten = \"127.0.0.1:0\"\napp = \"{app}\"\n\n\
             [[inbound]]\nlisten = \"127.0.0.1:0\"\napp = \"{app}\"\npath_normalization = \"reject\"\n\n\
             [[inbound]]\nlisten = \"127.0.0.1:0\"\napp = \"{app}\"\npath_normalization = \"none\"\n",
            log_dir.display()
        ),
        &[("10-allow.yaml", ALLOW), ("20-no-admin.yaml", DENY)],
    );
    let (normalize, reject, none) = (api.inbound[0], api.inbound[1], api.inbound[2]);
    let peer = Peer::new(&mesh);
    let mut variants = 0;

    // Control: the plain requests.
    let (s, body) = peer.get(normalize, "/api/hello").await;
    assert_eq!((s, json(&body)["path"].as_str().unwrap()), (200, "/api/hello"));
    assert_eq!(peer.get(normalize, "/api/admin/users").await.0, 403);

    // 1. Spellings of /api/admin/users: normalized, so the DENY matches them all.
    for p in [
        "/api//admin/users",
        "/api/./admin/users",
        "/api/%61dmin/users",
        "/api/%61%64%6d%69%6e/users",
        "/api/x/../admin/users",
        "/api/x/%2e%2e/admin/users",
        "/api/x/%2E%2E/admin/users",
        "/api/x/.%2e/admin/users",
        "/api/%2e/admin/users",
        "//api/admin/users",
        "/api///admin//users",
        "/api/admin/./users",
        "/api/x/y/../../admin/users",
        "/%61pi/admin/users",
        "/api/adm%69n/users",
        "/./api/admin/users",
        "/../api/admin/users",
    ] {
        let (s, body) = peer.get(normalize, p).await;
        assert_eq!(s, 403, "{p}: {body}");
        assert_eq!(json(&body)["policy"], "no-admin", "{p}: {body}");
        variants += 1;
    }

    // 2. Ambiguous spellings: refused with 400 before policy, whatever policy would have said.
    for p in [
        "/api%2Fadmin/users",
        "/api%2fadmin/users",
        "/api/x%2F..%2Fadmin/users",
        "/api%5Cadmin/users",
        "/api%5cadmin/users",
        "/api/..;/admin/users",
        "/api/x/..;x/admin/users",
        "/api/.;/admin/users",
        "/api/%zzadmin/users",
        "/api/%6/users",
    ] {
        let (s, body) = peer.get(normalize, p).await;
        assert_eq!(s, 400, "{p}: {body}");
        variants += 1;
    }

    // 3. Allowed requests reach the app with exactly the canonical path; the query is never touched.
    for (p, path, uri) in [
        ("/api/./hello", "/api/hello", "/api/hello"),
        ("/api//hello", "/api/hello", "/api/hello"),
        ("/api/%68ello", "/api/hello", "/api/hello"),
        ("/api/x/../hello/", "/api/hello/", "/api/hello/"),
        ("/api/caf%c3%a9", "/api/caf%C3%A9", "/api/caf%C3%A9"),
        ("/api/a%3fb", "/api/a%3Fb", "/api/a%3Fb"),
        (
            "/api/./hello?next=/../admin&x=%2F%2e",
            "/api/hello",
            "/api/hello?next=/../admin&x=%2F%2e",
        ),
    ] {
        let (s, body) = peer.get(normalize, p).await;
        assert_eq!(s, 200, "{p}: {body}");
        let j = json(&body);
        assert_eq!(
            (j["path"].as_str(), j["uri"].as_str()),
            (Some(path), Some(uri)),
            "{p}"
        );
        variants += 1;
    }

    // 4. One host: absolute form against Host, two Hosts, HTTP/2 `host` against `:authority`.
    for head in [
        "GET http://api/api/hello HTTP/1.1\r\nhost: admin",
        "GET http://admin/api/hello HTTP/1.1\r\nhost: api",
        "GET http://api:8443/api/hello HTTP/1.1\r\nhost: api",
        "GET /api/hello HTTP/1.1\r\nhost: api\r\nhost: admin",
        "GET /api/hello HTTP/1.1\r\nhost: api\r\nHost: api",
    ] {
        let (s, body) = peer.raw(normalize, head).await;
        assert_eq!(s, 400, "{head:?}: {body}");
        variants += 1;
    }
    let (s, body) = peer
        .raw(normalize, "GET http://API/api/hello HTTP/1.1\r\nhost: api")
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(json(&body)["hosts"], serde_json::json!(["api"]), "{body}");
    variants += 1;
    let (s, body) = peer
        .h2(normalize, "https://api/api/hello", &[("host", "admin")])
        .await;
    assert_eq!(s, 400, "HTTP/2 host beside :authority: {body}");
    let (s, body) = peer.h2(normalize, "https://api/api//admin/users", &[]).await;
    assert_eq!(s, 403, "HTTP/2 path normalized too: {body}");
    let (s, body) = peer
        .h2(normalize, "https://api/api/./hello", &[("host", "api")])
        .await;
    assert_eq!(s, 200, "{body}");
    let j = json(&body);
    assert_eq!(j["path"], "/api/hello", "{body}");
    assert_eq!(
        j["hosts"],
        serde_json::json!([]),
        "no second spelling of the host: {body}"
    );
    variants += 3;

    // 5. Identity headers are set after hop-by-hop stripping: naming them in Connection removes nothing, and a
    //    caller's own value is replaced.
    let (s, body) = peer
        .raw(
            normalize,
            "GET /api/hello HTTP/1.1\r\nhost: api\r\nx-forwarded-client-cert: By=x;URI=spiffe://example.org/admin\r\nconnection: x-forwarded-client-cert, traceparent",
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let j = json(&body);
    assert_eq!(
        j["xfcc"],
        serde_json::json!([format!("By={TD}/api;URI={TD}/web")]),
        "{body}"
    );
    assert!(j["headers"]["traceparent"].is_string(), "{body}");
    variants += 1;
    let (s, body) = peer
        .raw(
            normalize,
            "GET /api/hello HTTP/1.1\r\nhost: api\r\ntrustline-caller-chain: a.b\r\ntrustline-caller-chain: c.d",
        )
        .await;
    assert_eq!(s, 403, "two caller chains: {body}");
    assert_eq!(json(&body)["error"], "bad_caller_chain", "{body}");
    variants += 1;
    // Through web's outbound: the chain it signs survives a Connection header naming it.
    let web = mesh.sidecar(
        "web",
        &format!(
            "[[outbound]]\nlisten = \"127.0.0.1:0\"\n[[outbound.route]]\nhost = \"api\"\nupstream = \"{normalize}\"\nspiffe_ids = [\"{TD}/api\"]\n"
        ),
        &[],
    );
    let r = request(
        web.outbound[0],
        "GET",
        "api",
        "/api/./hello",
        &[("connection", "trustline-caller-chain, x-forwarded-client-cert")],
        "",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    assert!(j["headers"]["trustline-caller-chain"].is_string(), "{}", r.body);
    assert_eq!(j["path"], "/api/hello", "{}", r.body);
    variants += 1;
    let r = request(web.outbound[0], "GET", "api", "/api%2Fadmin", &[], "")
        .await
        .unwrap();
    assert_eq!(r.status, 400, "the outbound refuses too: {}", r.body);
    variants += 1;

    // 6. A listener that refuses non-canonical paths, and one that leaves them alone (documented as unsafe).
    assert_eq!(peer.get(reject, "/api/./hello").await.0, 400);
    assert_eq!(peer.get(reject, "/api/%68ello").await.0, 400);
    assert_eq!(peer.get(reject, "/api/hello").await.0, 200);
    let (s, body) = peer.get(none, "/api/./hello").await;
    assert_eq!((s, json(&body)["path"].as_str()), (200, Some("/api/./hello")));
    variants += 4;

    assert!(variants >= 30, "{variants} variants");

    // The log recorded what policy checked (the canonical path) and said what was sent.
    drop(web);
    let mut api = api;
    api.stop();
    let records = trustline_audit::verify::records(&log_dir, None).unwrap();
    let r = records
        .iter()
        .map(|(_, r)| r)
        .find(|r| r.note.contains("\"/api//admin/users\""))
        .expect("a record for /api//admin/users");
    assert_eq!((r.path.as_str(), r.status), ("/api/admin/users", 403));
    assert!(records
        .iter()
        .any(|(_, r)| r.status == 400 && r.note.contains("escaped slash")));
}
