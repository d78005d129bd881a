//! The proxy: inbound (mutual TLS from peers → policy → plaintext to the app) and outbound (plaintext from the
//! app → route by host → mutual TLS to the upstream sidecar), for HTTP/1.1, HTTP/2 (gRPC) and opaque TCP.
//!
//! HTTP requests keep their protocol end to end: an HTTP/2 request leaves on an HTTP/2 connection (ALPN `h2`
//! between sidecars, prior-knowledge h2c to the app), an HTTP/1.1 one on HTTP/1.1, so trailers, streaming and
//! upgrades pass through. Upstream connections are pooled per host.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use trustline_identity::tls::Refusal;

use crate::canon::{PathMode, TargetError};
use crate::config::{JwtAuth, Limits, ValidRoute};
use crate::metrics::{Direction, Metrics};
use crate::park::RequestBody;
use crate::policy::{Decision, Request as PolicyRequest};
use crate::policy_store::PolicyStore;
use crate::svid_source::SvidSource;

/// Boxed error of proxied bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type of everything the proxy sends.
pub type Body = BoxBody<Bytes, BoxError>;

const INBOUND: Direction = "inbound";
const OUTBOUND: Direction = "outbound";
const XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|n| match n {}).boxed()
}

/// What every listener shares.
#[derive(Debug)]
pub struct Shared {
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Policy in force.
    pub policies: Arc<PolicyStore>,
    /// Our SVID, bundles.
    pub identity: Arc<SvidSource>,
    /// Limits and timeouts.
    pub limits: Limits,
    /// Caller-chain bounds and freshness.
    pub chain_limits: crate::chain::Limits,
    /// Signs the hops this sidecar adds to caller chains.
    pub hop_signer: crate::chain::HopSigner,
    /// Trace ids that recently arrived with a chain.
    pub recent_chains: crate::chain::Recent,
    /// The accountability log, when configured.
    pub log: Option<LogSink>,
}

/// Where request records go, and what to do when they cannot be written.
#[derive(Debug, Clone)]
pub struct LogSink {
    /// The log.
    pub log: trustline_audit::Log,
    /// Hold each response until its record is on disk.
    pub durable: bool,
    /// Refuse requests (503) while the log cannot take records; otherwise serve and raise the alarm.
    pub fail_closed: bool,
}

impl Shared {
    /// Our SPIFFE ID (empty before the first SVID).
    pub fn own_id(&self) -> String {
        self.identity
            .subscribe()
            .borrow()
            .as_ref()
            .map(|c| c.spiffe_id.clone())
            .unwrap_or_default()
    }

    /// `Some(503)` when the log is failing and the operator chose fail-closed.
    fn log_gate(&self, grpc: bool) -> Option<Response<Body>> {
        let sink = self.log.as_ref()?;
        let failing = sink
            .log
            .stats()
            .failing
            .load(std::sync::atomic::Ordering::Relaxed);
        (sink.fail_closed && failing).then(|| {
            error_response(
                grpc,
                StatusCode::SERVICE_UNAVAILABLE,
                "log_unavailable",
                format!(
                    "the accountability log cannot record requests ({}); refusing (log.on_failure = \"closed\")",
                    sink.log.stats().last_error().unwrap_or_default()
                ),
            )
        })
    }

    /// Counts the request and writes its record; under fail-closed a record that cannot be queued (or, in
    /// durable mode, written) turns the response into a 503.
    async fn finish(
        &self,
        direction: Direction,
        decision: &'static str,
        resp: Response<Body>,
        mut rec: trustline_audit::Record,
        start: Instant,
        grpc: bool,
    ) -> Response<Body> {
        let took = start.elapsed();
        rec.status = resp.status().as_u16();
        rec.decision = decision.to_owned();
        rec.duration_us = took.as_micros() as u64;
        rec.bytes_out = content_length(resp.headers());
        self.metrics.request(direction, decision, rec.status, took);
        let Some(sink) = &self.log else { return resp };
        let result = if sink.durable {
            sink.log.append_durable(&rec).await
        } else {
            sink.log.try_append(&rec)
        };
        match result {
            Ok(()) => {
                self.metrics.log_record(true);
                resp
            }
            Err(e) => {
                self.metrics.log_record(false);
                tracing::error!(error = %e, trace_id = %rec.trace_id, "ALARM: request not recorded in the accountability log");
                if sink.fail_closed {
                    error_response(
                        grpc,
                        StatusCode::SERVICE_UNAVAILABLE,
                        "log_unavailable",
                        e.to_string(),
                    )
                } else {
                    resp
                }
            }
        }
    }
}

fn content_length(h: &HeaderMap) -> u64 {
    h.get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// What every request goes through first, in this order: hop-by-hop headers are removed (so a header named in
/// `Connection` can only remove what the client itself sent, never what the sidecar sets later), a valid
/// traceparent is ensured, the host is checked to be one and the path put in canonical form
/// ([`crate::canon`]). `Ok(Some(path as sent))` when the path was rewritten.
fn admit<B>(req: &mut Request<B>, paths: PathMode) -> Result<Option<String>, TargetError> {
    let upgrade = wants_upgrade(req);
    strip_hop_by_hop(req.headers_mut(), upgrade);
    ensure_traceparent(req.headers_mut());
    crate::canon::check_host(req.uri(), req.headers())?;
    crate::canon::canonicalize_uri(req.uri_mut(), paths)
}

fn note_normalized(rec: &mut trustline_audit::Record, sent: Option<String>) {
    if let Some(sent) = sent {
        rec.note = format!("path normalized from {sent:?}");
    }
}

/// A 400 for a request whose target [`admit`] refused; logged, and recorded with the target as sent.
fn refuse_target(
    rec: &mut trustline_audit::Record,
    grpc: bool,
    e: &TargetError,
    peer: Option<&str>,
) -> (&'static str, Response<Body>) {
    tracing::warn!(peer = peer.unwrap_or("local app"), method = %rec.method, path = %rec.path, reason = %e, "request refused: ambiguous target");
    rec.note = format!("request refused: {e}");
    (
        "bad_request",
        error_response(grpc, StatusCode::BAD_REQUEST, "bad_request", e.to_string()),
    )
}

/// Every value of header `name`, joined with "," (`None` when absent or not visible ASCII).
fn header_values(h: &HeaderMap, name: &str) -> Option<String> {
    let mut values = h.get_all(name).iter();
    let mut joined = values.next()?.to_str().ok()?.to_owned();
    for v in values {
        joined.push(',');
        joined.push_str(v.to_str().ok()?);
    }
    Some(joined)
}

/// A record with what the request line says, and the trace ids of its (ensured) traceparent.
fn new_record<B>(direction: Direction, req: &Request<B>, local: String) -> trustline_audit::Record {
    let tp = req
        .headers()
        .get(&TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    trustline_audit::Record {
        time_us: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or_default(),
        trace_id: tp.get(3..35).unwrap_or_default().to_owned(),
        span_id: tp.get(36..52).unwrap_or_default().to_owned(),
        direction: direction.to_owned(),
        local,
        method: req.method().as_str().to_owned(),
        authority: req
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                req.headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            })
            .unwrap_or_default(),
        path: req.uri().path().to_owned(),
        bytes_in: content_length(req.headers()),
        ..Default::default()
    }
}

/// The name of a negotiated key exchange group, for metrics and logs.
pub fn group_name(g: Option<rustls::NamedGroup>) -> &'static str {
    match g {
        Some(rustls::NamedGroup::X25519MLKEM768) => "X25519MLKEM768",
        Some(rustls::NamedGroup::X25519) => "X25519",
        Some(rustls::NamedGroup::secp256r1) => "secp256r1",
        Some(rustls::NamedGroup::secp384r1) => "secp384r1",
        // RFC 8998, SM-mode trust domains.
        Some(rustls::NamedGroup::Unknown(0x0029)) => "curveSM2",
        Some(_) => "other",
        None => "",
    }
}

/// Classifies a failed handshake's I/O error.
pub fn refusal_of(e: &std::io::Error) -> &'static str {
    e.get_ref()
        .and_then(|i| i.downcast_ref::<rustls::Error>())
        .map_or("protocol", |r| Refusal::of(r).as_str())
}

// ---------------------------------------------------------------------------------------------------------------
// Connectors

/// Connects to the local app (plaintext), whatever the request URI says.
#[derive(Clone, Debug)]
pub struct AppConnector {
    addr: SocketAddr,
    timeout: Duration,
}

impl tower::Service<Uri> for AppConnector {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let (addr, t) = (self.addr, self.timeout);
        Box::pin(async move {
            let s = tokio::time::timeout(t, TcpStream::connect(addr))
                .await
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, format!("connect to app {addr}"))
                })??;
            s.set_nodelay(true)?;
            Ok(TokioIo::new(s))
        })
    }
}

/// A mutual-TLS connection to an upstream sidecar.
#[derive(Debug)]
pub struct MtlsConn(tokio_rustls::client::TlsStream<TcpStream>);

impl Connection for MtlsConn {
    fn connected(&self) -> Connected {
        let c = Connected::new();
        if self.0.get_ref().1.alpn_protocol() == Some(b"h2") {
            c.negotiated_h2()
        } else {
            c
        }
    }
}

impl AsyncRead for MtlsConn {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for MtlsConn {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
    fn poll_flush(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }
    fn poll_shutdown(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

/// One outbound route with its TLS client configs (each verifies the route's expected SPIFFE IDs).
#[derive(Debug)]
pub struct RouteEntry {
    /// The route.
    pub route: ValidRoute,
    h1: Arc<rustls::ClientConfig>,
    h2: Arc<rustls::ClientConfig>,
    tcp: Arc<rustls::ClientConfig>,
}

/// The routes of one outbound listener.
#[derive(Debug)]
pub struct RouteTable {
    routes: Vec<RouteEntry>,
}

impl RouteTable {
    /// TLS configs for every route, verifying against `identity`'s bundle and presenting its SVID.
    pub fn new(
        routes: Vec<ValidRoute>,
        identity: &SvidSource,
    ) -> Result<Self, trustline_identity::tls::TlsError> {
        let bundle = identity.bundle().ok_or_else(|| {
            trustline_identity::tls::TlsError::Key("no SVID from the Workload API yet".into())
        })?;
        let routes = routes
            .into_iter()
            .map(|route| {
                let verifier = Arc::new(trustline_identity::tls::SpiffeServerVerifier::new(
                    bundle.clone(),
                    trustline_identity::tls::ExpectedPeer::OneOf(route.spiffe_ids.clone()),
                ));
                let base = trustline_identity::tls::client_config(verifier, Some(identity.cert.clone()))?;
                let with = |alpn: &[&[u8]]| {
                    let mut c = base.clone();
                    c.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
                    Arc::new(c)
                };
                Ok(RouteEntry {
                    h1: with(&[b"http/1.1"]),
                    h2: with(&[b"h2"]),
                    tcp: with(&[]),
                    route,
                })
            })
            .collect::<Result<Vec<_>, trustline_identity::tls::TlsError>>()?;
        Ok(Self { routes })
    }

    /// The route for `host` (exact match first, then `*`).
    pub fn find(&self, host: &str) -> Option<&RouteEntry> {
        self.routes
            .iter()
            .find(|r| r.route.host.eq_ignore_ascii_case(host))
            .or_else(|| self.routes.iter().find(|r| r.route.host == "*"))
    }
}

/// Which TLS config an upstream connection uses.
#[derive(Debug, Clone, Copy)]
enum Alpn {
    H1,
    H2,
    Tcp,
}

/// Opens a mutual-TLS connection to a route's upstream, recording the handshake outcome.
async fn connect_upstream(
    entry: &RouteEntry,
    alpn: Alpn,
    shared: &Shared,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let up = &entry.route.upstream;
    let limits = &shared.limits;
    let tcp = tokio::time::timeout(limits.connect_timeout, TcpStream::connect(up.as_str()))
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, format!("connect to {up} timed out"))
        })??;
    tcp.set_nodelay(true)?;
    let cfg = match alpn {
        Alpn::H1 => entry.h1.clone(),
        Alpn::H2 => entry.h2.clone(),
        Alpn::Tcp => entry.tcp.clone(),
    };
    // SNI is off (the verifier checks the SPIFFE ID, not a DNS name); rustls still wants a name.
    let host = up.rsplit_once(':').map_or(up.as_str(), |(h, _)| h);
    let name = ServerName::try_from(host.trim_matches(['[', ']']).to_owned()).unwrap_or_else(|_| {
        ServerName::try_from("upstream.invalid")
            .unwrap_or(ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()))
    });
    let handshake = tokio_rustls::TlsConnector::from(cfg).connect(name, tcp);
    match tokio::time::timeout(limits.handshake_timeout, handshake).await {
        Err(_) => {
            shared.metrics.handshake(OUTBOUND, "timeout", "");
            tracing::warn!(upstream = %up, "upstream TLS handshake timed out");
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("TLS handshake with {up} timed out"),
            ))
        }
        Ok(Err(e)) => {
            let reason = refusal_of(&e);
            shared.metrics.handshake(OUTBOUND, reason, "");
            tracing::warn!(upstream = %up, reason, error = %e, "upstream refused at the TLS handshake");
            Err(std::io::Error::new(
                e.kind(),
                format!("TLS handshake with {up} ({reason}): {e}"),
            ))
        }
        Ok(Ok(tls)) => {
            let group = group_name(tls.get_ref().1.negotiated_key_exchange_group().map(|g| g.name()));
            shared.metrics.handshake(OUTBOUND, "ok", group);
            tracing::debug!(upstream = %up, key_exchange = group, "upstream connected");
            Ok(tls)
        }
    }
}

/// Connects to the upstream that the request's host routes to.
#[derive(Clone, Debug)]
pub struct UpstreamConnector {
    table: Arc<RouteTable>,
    shared: Arc<Shared>,
    h2: bool,
}

impl tower::Service<Uri> for UpstreamConnector {
    type Response = TokioIo<MtlsConn>;
    type Error = std::io::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = uri.host().unwrap_or_default();
            let entry = this.table.find(host).ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::NotFound, format!("no route for {host:?}"))
            })?;
            let alpn = if this.h2 { Alpn::H2 } else { Alpn::H1 };
            Ok(TokioIo::new(MtlsConn(
                connect_upstream(entry, alpn, &this.shared).await?,
            )))
        })
    }
}

fn client<C>(connector: C, limits: &Limits, h2: bool) -> Client<C, Body>
where
    C: tower::Service<Uri> + Clone + Send + Sync + 'static,
    C::Response: Connection + hyper::rt::Read + hyper::rt::Write + Send + Unpin + 'static,
    C::Future: Send + Unpin + 'static,
    C::Error: Into<BoxError>,
{
    let mut b = Client::builder(TokioExecutor::new());
    b.pool_idle_timeout(limits.idle_timeout)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .set_host(false);
    if h2 {
        b.http2_only(true)
            .http2_adaptive_window(true)
            .http2_keep_alive_interval(Some(Duration::from_secs(30)))
            .http2_max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    }
    b.build(connector)
}

// ---------------------------------------------------------------------------------------------------------------
// HTTP helpers

fn is_grpc(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// A locally generated error response: JSON for HTTP, a trailers-only status for gRPC.
fn local_response(grpc: bool, status: StatusCode, grpc_code: u8, body: serde_json::Value) -> Response<Body> {
    if grpc {
        let msg = body
            .get("reason")
            .and_then(|r| r.as_str())
            .unwrap_or_default()
            .replace(|c: char| !(' '..='~').contains(&c), " ");
        let mut r = Response::new(full(Bytes::new()));
        let h = r.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        h.insert("grpc-status", HeaderValue::from(u16::from(grpc_code)));
        if let Ok(v) = HeaderValue::from_str(&msg) {
            h.insert("grpc-message", v);
        }
        return r;
    }
    let mut r = Response::new(full(body.to_string()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn deny_response(grpc: bool, d: &Decision, principal: Option<&str>) -> Response<Body> {
    let (policy, rule) =
        d.by.as_ref()
            .map_or((None, None), |(p, r)| (Some(p.as_str()), Some(*r)));
    local_response(
        grpc,
        StatusCode::FORBIDDEN,
        7, // PERMISSION_DENIED
        serde_json::json!({
            "error": "denied",
            "policy": policy,
            "rule": rule,
            "reason": d.reason,
            "principal": principal,
        }),
    )
}

fn error_response(grpc: bool, status: StatusCode, error: &str, reason: String) -> Response<Body> {
    let code = match status {
        StatusCode::UNAUTHORIZED => 16,     // UNAUTHENTICATED
        StatusCode::PAYLOAD_TOO_LARGE => 8, // RESOURCE_EXHAUSTED
        StatusCode::GATEWAY_TIMEOUT => 4,   // DEADLINE_EXCEEDED
        StatusCode::NOT_FOUND => 12,        // UNIMPLEMENTED
        _ => 14,                            // UNAVAILABLE
    };
    let mut r = local_response(
        grpc,
        status,
        code,
        serde_json::json!({ "error": error, "reason": reason }),
    );
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer error=\"invalid_token\""),
        );
    }
    r
}

const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), keeping `Connection: upgrade` + `Upgrade` for an upgrade and
/// `TE: trailers` (gRPC needs it).
fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .filter(|n| !(keep_upgrade && n == header::UPGRADE))
        .collect();
    for n in named {
        h.remove(n);
    }
    let upgrade = keep_upgrade.then(|| h.get(header::UPGRADE).cloned()).flatten();
    for n in &HOP_BY_HOP {
        h.remove(n);
    }
    if let Some(te) = h.get(header::TE) {
        if te.as_bytes().eq_ignore_ascii_case(b"trailers") {
            h.insert(header::TE, HeaderValue::from_static("trailers"));
        } else {
            h.remove(header::TE);
        }
    }
    if let Some(u) = upgrade {
        h.insert(header::UPGRADE, u);
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

fn wants_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
}

/// A W3C traceparent for a new trace.
fn new_traceparent() -> HeaderValue {
    let mut b = [0u8; 24];
    // aws-lc's system RNG; an all-zero id is invalid per W3C, so fall back to time-derived bytes on failure.
    if aws_lc_rs::rand::fill(&mut b).is_err() || b[..16].iter().all(|x| *x == 0) {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(1);
        b[..16].copy_from_slice(&t.to_be_bytes());
        b[16..].copy_from_slice(&(t as u64 | 1).to_le_bytes());
    }
    traceparent_of(&b)
}

/// `00-<trace id: b[..16] in hex>-<parent id: b[16..] in hex>-01`, written in place (no allocation per digit).
fn traceparent_of(b: &[u8; 24]) -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut v = *b"00-00000000000000000000000000000000-0000000000000000-01";
    for (i, x) in b.iter().enumerate() {
        let at = if i < 16 { 3 + 2 * i } else { 36 + 2 * (i - 16) };
        v[at] = HEX[usize::from(x >> 4)];
        v[at + 1] = HEX[usize::from(x & 0xf)];
    }
    HeaderValue::from_bytes(&v).unwrap_or(HeaderValue::from_static(
        "00-00000000000000000000000000000001-0000000000000001-01",
    ))
}

fn valid_traceparent(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    b.len() >= 55
        && b[2] == b'-'
        && b[35] == b'-'
        && b[52] == b'-'
        && b[..2] != *b"ff"
        && b.iter()
            .enumerate()
            .all(|(i, c)| matches!(i, 2 | 35 | 52) || c.is_ascii_hexdigit())
        && b[3..35].iter().any(|c| *c != b'0')
        && b[36..52].iter().any(|c| *c != b'0')
}

/// Keeps a valid `traceparent` or starts a new trace.
fn ensure_traceparent(h: &mut HeaderMap) {
    if !h.get(&TRACEPARENT).is_some_and(valid_traceparent) {
        h.insert(TRACEPARENT, new_traceparent());
        h.remove("tracestate");
    }
}

/// The request's host without port, lowercase (from the URI, else `Host`).
fn request_host<B>(req: &Request<B>) -> String {
    let raw = req
        .uri()
        .host()
        .map(str::to_owned)
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(|h| match h.rsplit_once(':') {
                    Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host.to_owned(),
                    _ => h.to_owned(),
                })
        })
        .unwrap_or_default();
    raw.trim_matches(['[', ']']).to_ascii_lowercase()
}

/// Rewrites the request URI to absolute form with `scheme` (the pool key is its authority).
fn absolute_uri<B>(req: &mut Request<B>, scheme: &str, fallback_authority: &str) -> Result<(), String> {
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| fallback_authority.to_owned());
    let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let uri: Uri = format!("{scheme}://{authority}{pq}")
        .parse()
        .map_err(|e| format!("request target {authority:?}{pq:?}: {e}"))?;
    *req.uri_mut() = uri;
    Ok(())
}

fn limit_body(req: Request<RequestBody>, max: u64) -> Request<Body> {
    if max == 0 {
        return req.map(|b| b.map_err(BoxError::from).boxed());
    }
    let max = usize::try_from(max).unwrap_or(usize::MAX);
    req.map(|b| Limited::new(b, max).boxed())
}

/// A 431 when the header block exceeds `limits.max_header_bytes` (HTTP/1.1's parser buffer is at least 8 KiB
/// and HTTP/2 counts differently, so the limit is also checked here on what was received).
fn headers_too_large<B>(req: &Request<B>, max: usize, grpc: bool) -> Option<Response<Body>> {
    let size: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum::<usize>()
        + req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    (size > max).then(|| {
        error_response(
            grpc,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!("request headers ({size} bytes) exceed limits.max_header_bytes = {max}"),
        )
    })
}

fn too_large<B>(req: &Request<B>, max: u64) -> bool {
    max > 0
        && req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|n| n > max)
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// Sends `req` on `h1` or `h2` by its version, with the request timeout; bridges an HTTP/1.1 upgrade.
async fn forward<C>(
    h1: &Client<C, Body>,
    h2: &Client<C, Body>,
    mut req: Request<Body>,
    limits: &Limits,
    grpc: bool,
    upstream_name: &str,
) -> Result<Response<Body>, Response<Body>>
where
    C: tower::Service<Uri> + Clone + Send + Sync + 'static,
    C::Response: Connection + hyper::rt::Read + hyper::rt::Write + Send + Unpin + 'static,
    C::Future: Send + Unpin + 'static,
    C::Error: Into<BoxError>,
{
    // Hop-by-hop headers were stripped when the request arrived (`admit`), before the identity headers were set:
    // stripping here again would let a client remove those by naming them in `Connection`.
    let upgrade = wants_upgrade(&req);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let fut = if req.version() == Version::HTTP_2 {
        // `:authority` carries the host (checked against any `Host` on arrival): no second spelling of it.
        req.headers_mut().remove(header::HOST);
        h2.request(req)
    } else {
        *req.version_mut() = Version::HTTP_11;
        h1.request(req)
    };
    let mut resp = match tokio::time::timeout(limits.request_timeout, fut).await {
        Err(_) => {
            return Err(error_response(
                grpc,
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                format!(
                    "{upstream_name} did not answer within {:?}",
                    limits.request_timeout
                ),
            ))
        }
        Ok(Err(e)) => {
            let reason = format!("{upstream_name}: {}", error_chain(&e));
            tracing::warn!(error = %reason, "forwarding failed");
            return Err(error_response(
                grpc,
                StatusCode::BAD_GATEWAY,
                "upstream_unavailable",
                reason,
            ));
        }
        Ok(Ok(r)) => r,
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_upgrade) = client_upgrade {
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                match tokio::try_join!(client_upgrade, upstream_upgrade) {
                    Ok((a, b)) => {
                        let (mut a, mut b) = (TokioIo::new(a), TokioIo::new(b));
                        if let Err(e) = tokio::io::copy_bidirectional(&mut a, &mut b).await {
                            tracing::debug!(error = %e, "upgraded connection ended");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "upgrade failed"),
                }
            });
        }
        let upgrade = resp.headers().get(header::UPGRADE).cloned();
        strip_hop_by_hop(resp.headers_mut(), true);
        if let Some(u) = upgrade {
            resp.headers_mut().insert(header::UPGRADE, u);
        }
    } else {
        strip_hop_by_hop(resp.headers_mut(), false);
    }
    Ok(resp.map(|b| b.map_err(BoxError::from).boxed()))
}

// ---------------------------------------------------------------------------------------------------------------
// Inbound

/// One inbound listener's state.
#[derive(Debug)]
pub struct Inbound {
    shared: Arc<Shared>,
    app: SocketAddr,
    jwt: Option<JwtAuth>,
    h1: Client<AppConnector, Body>,
    h2: Client<AppConnector, Body>,
    app_name: String,
    paths: PathMode,
}

impl Inbound {
    /// State for an inbound listener forwarding to `app`, treating non-canonical paths as `paths` says.
    pub fn new(shared: Arc<Shared>, app: SocketAddr, jwt: Option<JwtAuth>, paths: PathMode) -> Arc<Self> {
        let conn = AppConnector {
            addr: app,
            timeout: shared.limits.connect_timeout,
        };
        Arc::new(Self {
            h1: client(conn.clone(), &shared.limits, false),
            h2: client(conn, &shared.limits, true),
            app_name: format!("app {app}"),
            shared,
            app,
            jwt,
            paths,
        })
    }

    /// Authorizes and forwards one request from the authenticated `peer`.
    pub async fn handle(
        self: Arc<Self>,
        peer: Arc<str>,
        mut req: Request<RequestBody>,
    ) -> Result<Response<Body>, Infallible> {
        let start = Instant::now();
        let admitted = admit(&mut req, self.paths);
        let grpc = is_grpc(req.headers());
        let mut rec = new_record(INBOUND, &req, self.shared.own_id());
        rec.peer = peer.to_string();
        let (decision, resp) = match admitted {
            Ok(sent) => {
                note_normalized(&mut rec, sent);
                self.decide_and_forward(&peer, req, &mut rec).await
            }
            Err(e) => refuse_target(&mut rec, grpc, &e, Some(&peer)),
        };
        Ok(self
            .shared
            .finish(INBOUND, decision, resp, rec, start, grpc)
            .await)
    }

    /// Refuses one request from `peer` without forwarding it: 403 with `{"error": decision, "reason": ...}`, or
    /// gRPC `PERMISSION_DENIED`; counted and recorded under `decision` like every inbound request. For requests
    /// on a connection whose peer is no longer valid (`crate::live_peer`).
    pub(crate) async fn refuse(
        self: Arc<Self>,
        peer: Arc<str>,
        mut req: Request<RequestBody>,
        decision: &'static str,
        reason: String,
    ) -> Result<Response<Body>, Infallible> {
        let start = Instant::now();
        ensure_traceparent(req.headers_mut());
        let grpc = is_grpc(req.headers());
        let mut rec = new_record(INBOUND, &req, self.shared.own_id());
        rec.peer = peer.to_string();
        let body = serde_json::json!({ "error": decision, "reason": reason, "principal": &*peer });
        rec.note = reason;
        let resp = local_response(grpc, StatusCode::FORBIDDEN, 7, body);
        Ok(self
            .shared
            .finish(INBOUND, decision, resp, rec, start, grpc)
            .await)
    }

    /// Validates the bearer JWT-SVID: `Ok(claims)`, or `Err(reason)` for a 401.
    fn authenticate(&self, jwt: &JwtAuth, h: &HeaderMap) -> Result<Option<serde_json::Value>, String> {
        let token = match h.get(header::AUTHORIZATION) {
            None if jwt.required => {
                return Err("a JWT-SVID is required (Authorization: Bearer <token>)".into())
            }
            None => return Ok(None),
            Some(v) => {
                let v = v
                    .to_str()
                    .map_err(|_| "Authorization header is not ASCII".to_owned())?;
                match v.split_once(' ') {
                    Some((scheme, t)) if scheme.eq_ignore_ascii_case("bearer") => t.trim().to_owned(),
                    _ => return Err("Authorization is not a Bearer token".into()),
                }
            }
        };
        if !jwt.algorithms.is_empty() {
            let alg = jsonwebtoken::decode_header(&token)
                .map(|hd| format!("{:?}", hd.alg))
                .map_err(|e| format!("token is malformed: {e}"))?;
            if !jwt.algorithms.contains(&alg) {
                return Err(format!("algorithm {alg} is not allowed here"));
            }
        }
        let td = self
            .shared
            .identity
            .subscribe()
            .borrow()
            .as_ref()
            .and_then(|c| trustline_identity::spiffe_id::SpiffeId::new(&c.spiffe_id).ok())
            .map(|id| id.trust_domain().to_string())
            .unwrap_or_default();
        let bundle = self
            .shared
            .identity
            .jwt_bundle(&td)
            .ok_or_else(|| format!("no JWT bundle for trust domain {td:?} yet"))?;
        trustline_identity::jwt::validate(&token, &jwt.audience, &bundle)
            .map(|v| Some(v.claims))
            .map_err(|e| e.to_string())
    }

    async fn decide_and_forward(
        &self,
        peer: &str,
        req: Request<RequestBody>,
        rec: &mut trustline_audit::Record,
    ) -> (&'static str, Response<Body>) {
        let grpc = is_grpc(req.headers());
        let limits = &self.shared.limits;
        if let Some(r) = self.shared.log_gate(grpc) {
            return ("error", r);
        }
        if let Some(r) = headers_too_large(&req, limits.max_header_bytes, grpc) {
            return ("error", r);
        }
        if too_large(&req, limits.max_body_bytes) {
            return (
                "error",
                error_response(
                    grpc,
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    format!(
                        "request body exceeds limits.max_body_bytes = {}",
                        limits.max_body_bytes
                    ),
                ),
            );
        }
        let claims = match &self.jwt {
            None => None,
            Some(j) => match self.authenticate(j, req.headers()) {
                Ok(c) => c,
                Err(reason) => {
                    tracing::info!(peer, method = %req.method(), path = req.uri().path(), reason, "JWT-SVID refused");
                    return (
                        "unauthenticated",
                        error_response(grpc, StatusCode::UNAUTHORIZED, "unauthenticated", reason),
                    );
                }
            },
        };
        // The caller chain: verified when present; a bad one is refused before policy.
        let mut callers = Vec::new();
        if let Some(v) = req.headers().get(crate::chain::HEADER) {
            let repeated = req
                .headers()
                .get_all(crate::chain::HEADER)
                .iter()
                .nth(1)
                .is_some();
            let verified = match (v.to_str(), self.shared.identity.bundle()) {
                // Two chains: the app behind could read the one that was not verified.
                _ if repeated => Err(crate::chain::ChainError::Malformed {
                    hop: 0,
                    reason: format!("more than one {} header", crate::chain::HEADER),
                }),
                (Ok(text), Some(bundle)) => {
                    crate::chain::verify(text, &bundle, peer, &rec.local, &self.shared.chain_limits)
                }
                (Err(_), _) => Err(crate::chain::ChainError::Malformed {
                    hop: 0,
                    reason: "header is not ASCII".into(),
                }),
                (_, None) => Err(crate::chain::ChainError::Forged {
                    hop: 0,
                    reason: "no trust bundle yet".into(),
                }),
            };
            match verified {
                Ok(c) => {
                    self.shared.metrics.chain("ok");
                    callers = c.callers();
                    rec.chain_digest = c.digest;
                    rec.chain = callers.clone();
                    if let Some(h) = c.hops.first() {
                        self.shared.recent_chains.saw(&h.tid);
                    }
                    self.shared.recent_chains.saw(&rec.trace_id);
                }
                Err(e) => {
                    self.shared.metrics.chain(e.label());
                    tracing::warn!(peer, path = req.uri().path(), reason = %e, "caller chain refused");
                    rec.note = format!("caller chain refused: {e}");
                    return (
                        "bad_chain",
                        local_response(
                            grpc,
                            StatusCode::FORBIDDEN,
                            7,
                            serde_json::json!({"error": "bad_caller_chain", "reason": e.to_string(), "principal": peer}),
                        ),
                    );
                }
            }
        } else {
            self.shared.metrics.chain("absent");
        }
        let policies = self.shared.policies.get();
        if !policies.policies.is_empty() {
            let pr = PolicyRequest {
                principal: Some(peer.to_owned()),
                method: req.method().as_str().to_owned(),
                path: req.uri().path().to_owned(),
                host: request_host(&req),
                port: Some(self.app.port()),
                // Only the headers some condition reads (the rest would be copied for nothing); a repeated header
                // is seen whole, its values joined with "," (as Istio does), so a condition cannot be met by one
                // value while the app reads another.
                headers: policies
                    .header_names()
                    .filter_map(|k| Some((k.to_owned(), header_values(req.headers(), k)?)))
                    .collect(),
                claims,
                chain: callers,
            };
            let d = policies.evaluate(&pr);
            rec.policy = d.by.as_ref().map(|(p, _)| p.clone());
            rec.rule = d.by.as_ref().map(|(_, r)| *r);
            rec.audit = d.audit.iter().map(|(p, _)| p.clone()).collect();
            if !d.audit.is_empty() {
                tracing::info!(target: "trustline::audit", peer, method = %pr.method, path = %pr.path, allowed = d.allowed, audit = ?d.audit, "request marked for audit");
            }
            if !d.allowed {
                tracing::info!(peer, method = %pr.method, path = %pr.path, policy = ?d.by, reason = %d.reason, "request denied");
                return ("deny", deny_response(grpc, &d, Some(peer)));
            }
        }
        let mut req = limit_body(req, limits.max_body_bytes);
        if let Err(reason) = absolute_uri(&mut req, "http", &self.app.to_string()) {
            return (
                "error",
                error_response(grpc, StatusCode::BAD_REQUEST, "bad_request", reason),
            );
        }
        let h = req.headers_mut();
        // Tell the app who called, as Istio does; a caller cannot forge it (any value it sent is replaced).
        if let Ok(v) = HeaderValue::from_str(&format!("By={};URI={peer}", rec.local)) {
            h.insert(XFCC, v);
        }
        match forward(&self.h1, &self.h2, req, limits, grpc, &self.app_name).await {
            Ok(r) => ("allow", r),
            Err(r) => ("error", r),
        }
    }

    /// Opaque TCP: authorizes the peer's SPIFFE ID once, then copies bytes to the app.
    pub async fn handle_tcp<S>(self: Arc<Self>, peer: Arc<str>, mut tls: S)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let policies = self.shared.policies.get();
        if !policies.policies.is_empty() {
            let d = policies.evaluate(&PolicyRequest {
                principal: Some(peer.to_string()),
                method: String::new(),
                path: String::new(),
                host: String::new(),
                port: Some(self.app.port()),
                headers: Vec::new(),
                claims: None,
                chain: Vec::new(),
            });
            if !d.allowed {
                self.shared.metrics.tcp_denied(INBOUND);
                tracing::info!(peer = %peer, policy = ?d.by, reason = %d.reason, "TCP connection denied");
                return;
            }
        }
        let app = match tokio::time::timeout(self.shared.limits.connect_timeout, TcpStream::connect(self.app))
            .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::warn!(app = %self.app, error = %e, "app unreachable");
                return;
            }
            Err(_) => {
                tracing::warn!(app = %self.app, "connect to app timed out");
                return;
            }
        };
        let mut app = app;
        let _ = app.set_nodelay(true);
        if let Err(e) = tokio::io::copy_bidirectional(&mut tls, &mut app).await {
            tracing::debug!(peer = %peer, error = %e, "TCP connection ended");
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Outbound

/// One outbound listener's state.
#[derive(Debug)]
pub struct Outbound {
    shared: Arc<Shared>,
    table: Arc<RouteTable>,
    h1: Client<UpstreamConnector, Body>,
    h2: Client<UpstreamConnector, Body>,
    paths: PathMode,
}

impl Outbound {
    /// State for an outbound listener with `table`, treating non-canonical paths as `paths` says.
    pub fn new(shared: Arc<Shared>, table: RouteTable, paths: PathMode) -> Arc<Self> {
        let table = Arc::new(table);
        let conn = |h2| UpstreamConnector {
            table: table.clone(),
            shared: shared.clone(),
            h2,
        };
        Arc::new(Self {
            h1: client(conn(false), &shared.limits, false),
            h2: client(conn(true), &shared.limits, true),
            shared,
            table,
            paths,
        })
    }

    /// Routes and forwards one request from the local app.
    pub async fn handle(
        self: Arc<Self>,
        mut req: Request<RequestBody>,
    ) -> Result<Response<Body>, Infallible> {
        let start = Instant::now();
        let admitted = admit(&mut req, self.paths);
        let grpc = is_grpc(req.headers());
        let mut rec = new_record(OUTBOUND, &req, self.shared.own_id());
        let (decision, resp) = match admitted {
            Ok(sent) => {
                note_normalized(&mut rec, sent);
                self.route_and_forward(req, &mut rec).await
            }
            Err(e) => refuse_target(&mut rec, grpc, &e, None),
        };
        Ok(self
            .shared
            .finish(OUTBOUND, decision, resp, rec, start, grpc)
            .await)
    }

    async fn route_and_forward(
        &self,
        req: Request<RequestBody>,
        rec: &mut trustline_audit::Record,
    ) -> (&'static str, Response<Body>) {
        let grpc = is_grpc(req.headers());
        let limits = &self.shared.limits;
        if let Some(r) = self.shared.log_gate(grpc) {
            return ("error", r);
        }
        if let Some(r) = headers_too_large(&req, limits.max_header_bytes, grpc) {
            return ("error", r);
        }
        let host = request_host(&req);
        let Some(entry) = self.table.find(&host) else {
            return (
                "error",
                error_response(
                    grpc,
                    StatusCode::NOT_FOUND,
                    "no_route",
                    format!("no outbound route for host {host:?}"),
                ),
            );
        };
        if too_large(&req, limits.max_body_bytes) {
            return (
                "error",
                error_response(
                    grpc,
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    format!(
                        "request body exceeds limits.max_body_bytes = {}",
                        limits.max_body_bytes
                    ),
                ),
            );
        }
        let mut req = limit_body(req, limits.max_body_bytes);
        if let Err(reason) = absolute_uri(&mut req, "https", &host) {
            return (
                "error",
                error_response(grpc, StatusCode::BAD_REQUEST, "bad_request", reason),
            );
        }
        // Append our signed hop to the chain the app propagated, or start one.
        let to: Vec<String> = entry.route.spiffe_ids.iter().map(ToString::to_string).collect();
        rec.peer = to.join(" | ");
        let existing = req
            .headers()
            .get(crate::chain::HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        if existing.is_none() && self.shared.recent_chains.seen(&rec.trace_id) {
            rec.note = "chain restarted: the app did not propagate trustline-caller-chain".into();
            tracing::info!(trace_id = %rec.trace_id, "caller chain restarted: the app did not propagate it");
        }
        let hop = crate::chain::NewHop {
            tid: &rec.trace_id,
            from: &rec.local,
            to: &to,
            method: &rec.method,
            authority: &rec.authority,
            path: &rec.path,
        };
        match self
            .shared
            .hop_signer
            .append(existing.as_deref(), &hop)
            .await
            .and_then(|v| {
                HeaderValue::from_str(&v)
                    .map(|h| (v, h))
                    .map_err(|e| e.to_string())
            }) {
            Ok((text, v)) => {
                rec.chain_digest = crate::chain::digest(&text);
                // The callers the app propagated (not verified here: the callee verifies them), then us.
                rec.chain = existing
                    .as_deref()
                    .map(crate::chain::callers_unverified)
                    .unwrap_or_default();
                rec.chain.push(rec.local.clone());
                req.headers_mut().insert(crate::chain::HEADER, v);
            }
            Err(e) => {
                return (
                    "error",
                    error_response(
                        grpc,
                        StatusCode::BAD_GATEWAY,
                        "caller_chain",
                        format!("cannot sign the caller chain: {e}"),
                    ),
                )
            }
        }
        let name = format!("upstream {} ({})", entry.route.upstream, entry.route.host);
        match forward(&self.h1, &self.h2, req, limits, grpc, &name).await {
            Ok(r) => ("allow", r),
            Err(r) => ("error", r),
        }
    }

    /// Opaque TCP: every connection goes to the listener's one upstream over mutual TLS.
    pub async fn handle_tcp(self: Arc<Self>, mut local: TcpStream) {
        let Some(entry) = self.table.find("*") else { return };
        match connect_upstream(entry, Alpn::Tcp, &self.shared).await {
            Ok(mut tls) => {
                if let Err(e) = tokio::io::copy_bidirectional(&mut local, &mut tls).await {
                    tracing::debug!(upstream = %entry.route.upstream, error = %e, "TCP connection ended");
                }
            }
            Err(e) => {
                tracing::warn!(upstream = %entry.route.upstream, error = %e, "TCP upstream unavailable")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("close, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-app", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h, false);
        assert!(
            h.get("x-secret").is_none()
                && h.get("keep-alive").is_none()
                && h.get(header::CONNECTION).is_none()
        );
        assert_eq!(h.get(header::TE).unwrap(), "trailers");
        assert_eq!(h.get("x-app").unwrap(), "kept");

        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get(header::UPGRADE).unwrap(), "websocket");
        assert_eq!(h.get(header::CONNECTION).unwrap(), "upgrade");
    }

    #[test]
    fn traceparent_is_kept_when_valid_and_created_otherwise() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static(good));
        ensure_traceparent(&mut h);
        assert_eq!(h.get(&TRACEPARENT).unwrap(), good);
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "garbage",
        ] {
            let mut h = HeaderMap::new();
            h.insert(TRACEPARENT, HeaderValue::from_static(bad));
            h.insert("tracestate", HeaderValue::from_static("x=1"));
            ensure_traceparent(&mut h);
            let v = h.get(&TRACEPARENT).unwrap();
            assert!(valid_traceparent(v), "{v:?}");
            assert_ne!(v, good);
            assert!(h.get("tracestate").is_none());
        }
        let a = new_traceparent();
        let b = new_traceparent();
        assert_ne!(a, b);
        let bytes: [u8; 24] = std::array::from_fn(|i| (i as u8).wrapping_mul(37).wrapping_add(5));
        let hex: String = bytes.iter().map(|x| format!("{x:02x}")).collect();
        assert_eq!(
            traceparent_of(&bytes),
            format!("00-{}-{}-01", &hex[..32], &hex[32..]).as_str()
        );
    }

    #[test]
    fn grpc_denials_are_trailers_only_permission_denied() {
        let d = Decision {
            allowed: false,
            by: Some(("deny-admin".into(), 0)),
            reason: "DENY policy \"deny-admin\" rule #0 matched".into(),
            audit: vec![],
        };
        let r = deny_response(true, &d, Some("spiffe://t/a"));
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "7");
        let r = deny_response(false, &d, None);
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
    }

    #[test]
    fn host_comes_from_uri_or_header_without_port() {
        let r = Request::builder()
            .uri("/x")
            .header("host", "Payments:8080")
            .body(())
            .unwrap();
        assert_eq!(request_host(&r), "payments");
        let r = Request::builder().uri("http://[::1]:80/x").body(()).unwrap();
        assert_eq!(request_host(&r), "::1");
    }
}
