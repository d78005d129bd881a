//! gRPC (unary, server, client and bidirectional streaming) through a sidecar pair with a tonic client and
//! server, policy on every call; and SVID rotation under continuous load with zero failed requests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_stream::{Stream, StreamExt as _};
use tonic::{Request, Response, Status, Streaming};
use trustline_tests::echo::echo_client::EchoClient;
use trustline_tests::echo::echo_server::{Echo, EchoServer};
use trustline_tests::echo::{EchoReply, EchoRequest};
use trustline_tests::mesh::{echo_app, request, Mesh, Sidecar, TD};
use trustline_tests::PATIENCE;

struct App;

fn caller<T>(r: &Request<T>) -> String {
    r.metadata()
        .get("x-forwarded-client-cert")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for App {
    async fn unary(&self, r: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let caller = caller(&r);
        Ok(Response::new(EchoReply {
            message: r.into_inner().message,
            index: 0,
            caller,
        }))
    }

    type ServerStreamStream = ReplyStream;
    async fn server_stream(&self, r: Request<EchoRequest>) -> Result<Response<ReplyStream>, Status> {
        let caller = caller(&r);
        let req = r.into_inner();
        let s = tokio_stream::iter((0..req.count).map(move |i| {
            Ok(EchoReply {
                message: req.message.clone(),
                index: i,
                caller: caller.clone(),
            })
        }));
        Ok(Response::new(Box::pin(s)))
    }

    async fn client_stream(&self, r: Request<Streaming<EchoRequest>>) -> Result<Response<EchoReply>, Status> {
        let caller = caller(&r);
        let mut s = r.into_inner();
        let mut n = 0;
        let mut all = String::new();
        while let Some(m) = s.next().await {
            all.push_str(&m?.message);
            n += 1;
        }
        Ok(Response::new(EchoReply {
            message: all,
            index: n,
            caller,
        }))
    }

    type BidiStream = ReplyStream;
    async fn bidi(&self, r: Request<Streaming<EchoRequest>>) -> Result<Response<ReplyStream>, Status> {
        let caller = caller(&r);
        let mut i = 0u32;
        let s = r.into_inner().map(move |m| {
            let index = i;
            i += 1;
            m.map(|m| EchoReply {
                message: m.message,
                index,
                caller: caller.clone(),
            })
        });
        Ok(Response::new(Box::pin(s)))
    }
}

async fn grpc_app() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(EchoServer::new(App))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
    );
    addr
}

const POLICY: &str = r#"
name: echo-for-web
action: ALLOW
rules:
  - from:
      - source:
          principals: ["spiffe://example.org/web"]
    to:
      - operation:
          paths: ["/trustline.test.v1.Echo/*"]
---
"#;

const DENY: &str = r#"
name: no-client-streams
action: DENY
rules:
  - to:
      - operation:
          paths: ["/trustline.test.v1.Echo/ClientStream"]
"#;

#[tokio::test(flavor = "multi_thread")]
async fn grpc_unary_and_streaming_through_a_sidecar_pair() {
    let mesh = Mesh::start("");
    let app = grpc_app().await;
    let api = mesh.sidecar(
        "api",
        &format!("[[inbound]]\nlisten = \"127.0.0.1:0\"\napp = \"{app}\"\n"),
        &[("allow.yaml", POLICY.trim_end_matches("---\n"))],
    );
    let web = mesh.sidecar(
        "web",
        &format!(
            "[[outbound]]\nlisten = \"127.0.0.1:0\"\n[[outbound.route]]\nhost = \"api\"\nupstream = \"{}\"\nspiffe_ids = [\"{TD}/api\"]\n",
            api.inbound[0]
        ),
        &[],
    );
    // The app talks plaintext h2c to its sidecar, addressing the service by name (:authority "api").
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", web.outbound[0]))
        .unwrap()
        .origin("http://api".parse().unwrap())
        .connect()
        .await
        .unwrap();
    let mut c = EchoClient::new(ch);

    let r = c
        .unary(EchoRequest {
            message: "hello".into(),
            count: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.message, "hello");
    assert_eq!(r.caller, format!("By={TD}/api;URI={TD}/web"));

    let mut s = c
        .server_stream(EchoRequest {
            message: "x".repeat(1000),
            count: 500,
        })
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    while let Some(m) = s.message().await.unwrap() {
        assert_eq!(m.index, n);
        n += 1;
    }
    assert_eq!(n, 500, "every streamed message and the OK trailer arrived");

    let out = tokio_stream::iter((0..50).map(|i| EchoRequest {
        message: format!("{i},"),
        count: 0,
    }));
    let r = c.client_stream(out).await.unwrap().into_inner();
    assert_eq!(r.index, 50);

    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut replies = c
        .bidi(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for i in 0..20u32 {
        tx.send(EchoRequest {
            message: format!("m{i}"),
            count: 0,
        })
        .await
        .unwrap();
        let m = replies.message().await.unwrap().unwrap();
        assert_eq!(
            (m.index, m.message),
            (i, format!("m{i}")),
            "ping-pong over one stream"
        );
    }
    drop(tx);
    assert!(replies.message().await.unwrap().is_none());

    // A DENY policy: the call fails with PERMISSION_DENIED naming the policy, and never reaches the app.
    std::fs::write(api.policy_dir.join("deny.yaml"), DENY).unwrap();
    let denied = trustline_tests::eventually(PATIENCE, "the DENY policy in force", || {
        let mut c = c.clone();
        async move {
            let out = tokio_stream::iter(vec![EchoRequest::default()]);
            c.client_stream(out).await.err()
        }
    })
    .await;
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains("no-client-streams"), "{denied:?}");
    // Other methods still work.
    c.unary(EchoRequest::default()).await.unwrap();
    assert!(
        api.metric(
            "trustline_sidecar_requests_total",
            &[("direction", "inbound"), ("decision", "deny")]
        )
        .await
            >= 1.0
    );
}

/// When the sidecar's current SVID expires (unix seconds).
async fn svid_expiry(s: &Sidecar) -> f64 {
    s.metric("trustline_sidecar_svid_expiry_timestamp_seconds", &[])
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn svid_rotation_under_continuous_load_fails_no_request() {
    let mesh = Mesh::start("");
    let app = echo_app().await;
    // Six-second SVIDs: the agent renews each about every three seconds.
    let ttl = ["--x509-ttl", "6s"];
    let api = mesh.sidecar_with(
        "api",
        &format!("[[inbound]]\nlisten = \"127.0.0.1:0\"\napp = \"{app}\"\n"),
        &[],
        &ttl,
    );
    let up = api.inbound[0];
    // Route "api2" is a separate upstream pool whose connections idle out quickly, so it keeps opening new
    // mutual-TLS connections (new handshakes) across the rotations while "api" reuses pooled ones.
    let web = mesh.sidecar_with(
        "web",
        &format!(
            "[limits]\nidle_timeout = \"200ms\"\n[[outbound]]\nlisten = \"127.0.0.1:0\"\n[[outbound.route]]\nhost = \"api\"\nupstream = \"{up}\"\nspiffe_ids = [\"{TD}/api\"]\n[[outbound.route]]\nhost = \"api2\"\nupstream = \"{up}\"\nspiffe_ids = [\"{TD}/api\"]\n"
        ),
        &[],
        &ttl,
    );
    let w = web.outbound[0];
    let first_api_expiry = api
        .metric("trustline_sidecar_svid_expiry_timestamp_seconds", &[])
        .await;
    let first_web_expiry = web
        .metric("trustline_sidecar_svid_expiry_timestamp_seconds", &[])
        .await;

    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..4 {
        let (ok, failed, stop) = (ok.clone(), failed.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let client = trustline_tests::mesh::pooled_client();
            while !stop.load(Ordering::Relaxed) {
                let req = http::Request::builder()
                    .uri(format!("http://{w}/load/{t}"))
                    .header("host", "api")
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .unwrap();
                match client.request(req).await {
                    Ok(r) if r.status() == 200 => {
                        use http_body_util::BodyExt as _;
                        let _ = r.into_body().collect().await;
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => failed.lock().unwrap().push(format!("status {}", r.status())),
                    Err(e) => failed.lock().unwrap().push(e.to_string()),
                }
            }
        }));
    }
    {
        let (ok, failed, stop) = (ok.clone(), failed.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match request(w, "GET", "api2", "/fresh", &[], "").await {
                    Ok(r) if r.status == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => failed
                        .lock()
                        .unwrap()
                        .push(format!("status {}: {}", r.status, r.body)),
                    Err(e) => failed.lock().unwrap().push(e),
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }));
    }
    let installs = |s: &Sidecar| {
        s.logs
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("SVID installed"))
            .count()
    };
    let handshakes_ok = || {
        api.metric(
            "trustline_sidecar_tls_handshakes_total",
            &[("direction", "inbound"), ("outcome", "ok")],
        )
    };
    // The load runs for at least 12 s and until it has done what is checked below (many answered requests, new
    // handshakes, two rotations on each side), however slow the machine; the bound is only a bound.
    let started = Instant::now();
    loop {
        let done = started.elapsed() >= Duration::from_secs(12)
            && ok.load(Ordering::Relaxed) > 100
            && installs(&api) >= 3
            && installs(&web) >= 3
            && svid_expiry(&api).await >= first_api_expiry + 5.0
            && svid_expiry(&web).await >= first_web_expiry + 5.0
            && handshakes_ok().await >= 20.0;
        if done || started.elapsed() > 2 * PATIENCE {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let failed = failed.lock().unwrap().clone();
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok.load(Ordering::Relaxed) > 100, "load ran");

    // Both sides rotated (at least twice) while the load ran, and new handshakes used the new SVIDs.
    let api_expiry = svid_expiry(&api).await;
    let web_expiry = svid_expiry(&web).await;
    assert!(
        api_expiry >= first_api_expiry + 5.0,
        "api rotated: {first_api_expiry} -> {api_expiry}"
    );
    assert!(
        web_expiry >= first_web_expiry + 5.0,
        "web rotated: {first_web_expiry} -> {web_expiry}"
    );
    assert!(
        installs(&api) >= 3 && installs(&web) >= 3,
        "{} {}",
        installs(&api),
        installs(&web)
    );
    let handshakes = handshakes_ok().await;
    assert!(
        handshakes >= 20.0,
        "new connections kept being made: {handshakes}"
    );
    assert_eq!(
        api.metric(
            "trustline_sidecar_tls_handshakes_total",
            &[("direction", "inbound")]
        )
        .await,
        handshakes,
        "no handshake failed"
    );
}
