//! The local HTTP API: what apps use to get a JWT-SVID in one call.
//!
//! - `GET /v1/jwt-svid?audience=A[&audience=B…][&spiffe_id=ID]` → `{"spiffe_id", "token", "expires_at"}`
//! - `GET /v1/bundle/jwks` → the JWT bundle (JWK set)
//! - `POST /v1/jwt-svid/validate` with `{"token", "audience"}` → `{"spiffe_id", "claims"}`
//!
//! Served on a Unix socket; the caller is identified by SO_PEERCRED (`curl --unix-socket … http://agent/v1/…`).
//! Errors are JSON `{"code", "message"}` with stable codes: `missing_audience`, `invalid_request`,
//! `no_identity`, `ca_unavailable`, `invalid_token`, `attestation_failed`.
//!
//! Optionally also on loopback TCP (`http_listen`, [`serve_tcp`]), where a web page in a browser on the node
//! (through DNS rebinding) or an app that fetches URLs for others (SSRF) could otherwise ask on a workload's behalf
//! and be attested as that workload. There, and only there, [`check_tcp_request`] runs before anything else:
//! a request must carry `Metadata: true` (a browser cannot add that header to a cross-origin request without a
//! CORS preflight, which this API never approves; URL fetchers do not add it), name a loopback `Host`
//! (`localhost`, a 127.0.0.0/8 address or `[::1]`, optional port: a rebound DNS name is refused), and carry no
//! `Origin` and no `Sec-Fetch-*` header (only browsers send those). Codes: `metadata_header_required` (403),
//! `browser_request` (403), `host_not_loopback` (421).

use std::sync::Arc;

use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tokio::net::UnixListener;

use crate::agent::{Agent, AgentError};
use crate::attest::PeerCred;
use crate::workload_api::{check_audience, jwt_bundle_json};

/// Longest request body accepted by the validate endpoint.
pub const MAX_BODY: usize = 64 * 1024;

/// The header every request on the TCP listener must carry, with the value `true`.
pub const METADATA_HEADER: &str = "Metadata";

/// Kernel credentials of an HTTP caller.
#[derive(Clone, Copy, Debug)]
pub struct HttpPeer(Option<PeerCred>);

impl Connected<axum::serve::IncomingStream<'_, UnixListener>> for HttpPeer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, UnixListener>) -> Self {
        HttpPeer(stream.io().peer_cred().ok().map(|c| PeerCred {
            uid: c.uid(),
            gid: c.gid(),
            pid: c.pid(),
        }))
    }
}

impl Connected<axum::serve::IncomingStream<'_, tokio::net::TcpListener>> for HttpPeer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, tokio::net::TcpListener>) -> Self {
        let client = *stream.remote_addr();
        let server = stream.io().local_addr().ok();
        HttpPeer(server.and_then(|s| crate::tcp_owner::owner(client, s)))
    }
}

/// An API error: HTTP status, stable code, message.
pub struct ApiError(StatusCode, &'static str, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"code": self.1, "message": self.2}))).into_response()
    }
}

fn agent_error(e: AgentError) -> ApiError {
    match e {
        AgentError::NoIdentity => ApiError(StatusCode::FORBIDDEN, "no_identity", "no identity issued".into()),
        AgentError::CaUnavailable(m) => ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "ca_unavailable",
            format!("CA unreachable and nothing cached: {m}"),
        ),
        AgentError::Ca(m) => ApiError(StatusCode::BAD_REQUEST, "invalid_request", m),
        other => ApiError(StatusCode::INTERNAL_SERVER_ERROR, "internal", other.to_string()),
    }
}

/// Decodes `%XX` and `+` in a query component.
fn pct_decode(s: &str) -> Result<String, ApiError> {
    let bad = || {
        ApiError(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("malformed query component {s:?}"),
        )
    };
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = b.get(i + 1..i + 3).ok_or_else(bad)?;
                let v = u8::from_str_radix(std::str::from_utf8(hex).map_err(|_| bad())?, 16)
                    .map_err(|_| bad())?;
                out.push(v);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| bad())
}

fn attest(agent: &Agent, peer: HttpPeer) -> Result<Vec<trustline_identity::Selector>, ApiError> {
    let cred = peer.0.ok_or_else(|| {
        ApiError(
            StatusCode::FORBIDDEN,
            "attestation_failed",
            "no peer credentials on the connection".into(),
        )
    })?;
    agent
        .attestor
        .attest(cred)
        .map_err(|e| ApiError(StatusCode::FORBIDDEN, "attestation_failed", e.to_string()))
}

async fn jwt_svid(
    State(agent): State<Arc<Agent>>,
    ConnectInfo(peer): ConnectInfo<HttpPeer>,
    RawQuery(query): RawQuery,
) -> Result<Json<serde_json::Value>, ApiError> {
    let mut audience = Vec::new();
    let mut spiffe_id = None;
    for pair in query.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "audience" => audience.push(pct_decode(v)?),
            "spiffe_id" => spiffe_id = Some(pct_decode(v)?),
            other => {
                return Err(ApiError(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    format!("unknown query parameter {other:?} (expected audience, spiffe_id)"),
                ))
            }
        }
    }
    if audience.is_empty() {
        agent.metrics.request("http", "jwt-svid", "missing_audience");
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "missing_audience",
            "audience is required: GET /v1/jwt-svid?audience=<aud>".into(),
        ));
    }
    check_audience(&audience).map_err(|m| ApiError(StatusCode::BAD_REQUEST, "invalid_request", m))?;
    let selectors = attest(&agent, peer)?;
    let mut entries = agent.entries_for(&selectors);
    if let Some(id) = &spiffe_id {
        entries.retain(|e| &e.spiffe_id.to_string() == id);
    }
    let entry = entries.first().ok_or_else(|| {
        agent.metrics.request("http", "jwt-svid", "no_identity");
        agent_error(AgentError::NoIdentity)
    })?;
    let j = agent.jwt_svid(entry, &audience).await.map_err(agent_error)?;
    agent.metrics.request("http", "jwt-svid", "ok");
    Ok(Json(
        json!({"spiffe_id": j.spiffe_id, "token": j.token, "expires_at": j.expires_at}),
    ))
}

async fn health(State(agent): State<Arc<Agent>>) -> Json<serde_json::Value> {
    let snap = agent.snapshot();
    let id = agent.identity();
    Json(json!({
        "agent_id": id.as_ref().map(|i| i.0.clone()),
        "agent_svid_expires_at": id.map(|i| i.2),
        "ca_connected": snap.connected,
        "entries": snap.entries.len(),
        "bundle_sequence": snap.bundle_sequence,
    }))
}

async fn jwks(State(agent): State<Arc<Agent>>) -> Result<Response, ApiError> {
    let body = jwt_bundle_json(&agent).ok_or_else(|| {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "ca_unavailable",
            "no JWT bundle received from the CA yet".into(),
        )
    })?;
    Ok(([(axum::http::header::CONTENT_TYPE, "application/json")], body).into_response())
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ValidateBody {
    token: String,
    audience: String,
}

async fn validate(
    State(agent): State<Arc<Agent>>,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let b: ValidateBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("body must be {{\"token\", \"audience\"}}: {e}"),
        )
    })?;
    if b.audience.is_empty() {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "missing_audience",
            "audience is required".into(),
        ));
    }
    let snap = agent.snapshot();
    let jwks = snap.jwks.as_ref().ok_or_else(|| {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "ca_unavailable",
            "no JWT bundle yet".into(),
        )
    })?;
    let v = trustline_identity::jwt::validate(&b.token, &b.audience, jwks)
        .map_err(|e| ApiError(StatusCode::UNAUTHORIZED, "invalid_token", e.to_string()))?;
    Ok(Json(
        json!({"spiffe_id": v.spiffe_id.to_string(), "claims": v.claims}),
    ))
}

/// Whether `host` (a `Host` header or URI authority) names this machine's loopback interface: `localhost`, an
/// address of 127.0.0.0/8 or `::1` (in brackets), with an optional port.
fn is_loopback_host(host: &str) -> bool {
    let (name, port) = match host.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((ip, port)) => (ip, port),
            None => return false,
        },
        None => host.split_at(host.find(':').unwrap_or(host.len())),
    };
    let port_ok = port.is_empty()
        || port
            .strip_prefix(':')
            .is_some_and(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()));
    let loopback = if host.starts_with('[') {
        name.parse::<std::net::Ipv6Addr>()
            .is_ok_and(|ip| ip.is_loopback())
    } else {
        name.eq_ignore_ascii_case("localhost")
            || name
                .parse::<std::net::Ipv4Addr>()
                .is_ok_and(|ip| ip.is_loopback())
    };
    port_ok && loopback
}

/// What the TCP listener refuses before routing: requests a browser or a URL fetcher could have been made to
/// send (see the module documentation). The Unix socket does not need this: neither can reach it.
pub fn check_tcp_request(headers: &axum::http::HeaderMap, uri: &axum::http::Uri) -> Result<(), ApiError> {
    let browser = |name: &str| {
        ApiError(
            StatusCode::FORBIDDEN,
            "browser_request",
            format!("requests carrying {name} are refused on the TCP listener (only browsers send it)"),
        )
    };
    if headers.contains_key(axum::http::header::ORIGIN) {
        return Err(browser("an Origin header"));
    }
    if let Some(name) = headers.keys().find(|n| n.as_str().starts_with("sec-fetch-")) {
        return Err(browser(&format!("a {name} header")));
    }
    let misdirected = |what: String| {
        ApiError(
            StatusCode::MISDIRECTED_REQUEST,
            "host_not_loopback",
            format!("{what}: the TCP listener answers only requests for localhost, a 127.0.0.0/8 address or [::1]"),
        )
    };
    // HTTP/1.1 names the host in `Host` (and, rarely, an absolute-form target); HTTP/2 in `:authority`, which
    // becomes the URI's authority. Whichever are present must be loopback names, and one must be.
    let mut hosts = headers.get_all(axum::http::header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => return Err(misdirected("more than one Host header".into())),
        (Some(host), None) => {
            let host = host
                .to_str()
                .map_err(|_| misdirected(format!("Host {:?} is not text", host.as_bytes())))?;
            if !is_loopback_host(host) {
                return Err(misdirected(format!("Host {host:?} is not a loopback name")));
            }
        }
        (None, _) if uri.authority().is_none() => return Err(misdirected("no Host header".into())),
        (None, _) => {}
    }
    if let Some(authority) = uri.authority().filter(|a| !is_loopback_host(a.as_str())) {
        return Err(misdirected(format!(
            "request authority {:?} is not a loopback name",
            authority.as_str()
        )));
    }
    let mut values = headers.get_all(METADATA_HEADER).iter();
    match (values.next(), values.next()) {
        (Some(v), None) if v.as_bytes().eq_ignore_ascii_case(b"true") => Ok(()),
        _ => Err(ApiError(
            StatusCode::FORBIDDEN,
            "metadata_header_required",
            format!(
                "requests on the TCP listener need the header `{METADATA_HEADER}: true` (once), e.g. curl -H '{METADATA_HEADER}: true'"
            ),
        )),
    }
}

async fn tcp_guard(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    match check_tcp_request(req.headers(), req.uri()) {
        Ok(()) => next.run(req).await,
        Err(e) => {
            tracing::warn!(code = e.1, reason = %e.2, "HTTP API (TCP): request refused");
            e.into_response()
        }
    }
}

/// The router.
pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/v1/jwt-svid", get(jwt_svid))
        .route("/v1/bundle/jwks", get(jwks))
        .route("/v1/jwt-svid/validate", post(validate))
        .route("/v1/health", get(health))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(agent)
}

/// Serves the HTTP API on loopback TCP until `shutdown`; every request passes [`check_tcp_request`] first.
pub async fn serve_tcp(
    listener: tokio::net::TcpListener,
    agent: Arc<Agent>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(agent).layer(axum::middleware::from_fn(tcp_guard));
    axum::serve(listener, app.into_make_service_with_connect_info::<HttpPeer>())
        .with_graceful_shutdown(shutdown)
        .await
}

/// Serves the HTTP API on a Unix socket until `shutdown`.
pub async fn serve(
    listener: UnixListener,
    agent: Arc<Agent>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router(agent).into_make_service_with_connect_info::<HttpPeer>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(headers: &[(&str, &str)], uri: &str) -> Result<(), (StatusCode, &'static str, String)> {
        let mut map = axum::http::HeaderMap::new();
        for (k, v) in headers {
            map.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                axum::http::HeaderValue::from_str(v).unwrap(),
            );
        }
        check_tcp_request(&map, &uri.parse().unwrap()).map_err(|e| (e.0, e.1, e.2))
    }

    const OK: [(&str, &str); 2] = [("host", "127.0.0.1:8082"), ("metadata", "true")];

    /// What a script fetching `http://127.0.0.1:8082/...` (or a name rebound to it) or an SSRF-prone fetcher
    /// sends is refused; what an app sends on purpose passes. Fails before issue 19: the TCP listener had no check.
    #[test]
    fn the_tcp_listener_refuses_what_a_browser_or_url_fetcher_sends() {
        let path = "/v1/jwt-svid?audience=a";
        for host in [
            "127.0.0.1",
            "127.0.0.1:8082",
            "localhost",
            "LocalHost:1",
            "[::1]",
            "[::1]:8082",
            "127.0.0.53:80",
        ] {
            check(&[("host", host), ("metadata", "true")], path).unwrap();
        }
        check(&[("host", "localhost"), ("Metadata", "True")], path).unwrap();
        // No Metadata header: a plain fetch, an <img>, a form, an SSRF'd URL.
        let (status, code, msg) = check(&[("host", "127.0.0.1:8082")], path).unwrap_err();
        assert_eq!(
            (status, code),
            (StatusCode::FORBIDDEN, "metadata_header_required")
        );
        assert!(msg.contains("Metadata: true"), "{msg}");
        for bad in ["false", "1", ""] {
            let e = check(&[("host", "localhost"), ("metadata", bad)], path).unwrap_err();
            assert_eq!(e.1, "metadata_header_required");
        }
        let e = check(
            &[("host", "localhost"), ("metadata", "true"), ("metadata", "true")],
            path,
        )
        .unwrap_err();
        assert_eq!(e.1, "metadata_header_required");
        // DNS rebinding: the page's own name arrives as Host.
        for host in [
            "evil.example:8082",
            "evil.example",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
            "10.0.0.1:8082",
            "[::2]",
            "[::1",
            "localhost:80x",
            "localhost:",
        ] {
            let (status, code, msg) = check(&[("host", host), ("metadata", "true")], path).unwrap_err();
            assert_eq!(
                (status, code),
                (StatusCode::MISDIRECTED_REQUEST, "host_not_loopback"),
                "{host}"
            );
            assert!(msg.contains(&format!("{host:?}")), "{msg}");
        }
        assert_eq!(
            check(&[("metadata", "true")], path).unwrap_err().1,
            "host_not_loopback"
        );
        let e = check(
            &[
                ("host", "localhost"),
                ("host", "evil.example"),
                ("metadata", "true"),
            ],
            path,
        )
        .unwrap_err();
        assert_eq!(e.1, "host_not_loopback");
        let e = check(&OK, "http://evil.example/v1/jwt-svid?audience=a").unwrap_err();
        assert!(e.2.contains("\"evil.example\""), "{}", e.2);
        check(&OK, "http://localhost:8082/v1/health").unwrap();
        // HTTP/2: `:authority` (the URI's authority) and no Host header.
        check(&[("metadata", "true")], "http://[::1]:8082/v1/health").unwrap();
        let e = check(&[("metadata", "true")], "http://evil.example:8082/v1/health").unwrap_err();
        assert_eq!(e.1, "host_not_loopback");
        // Anything only a browser sends, even with the rest right.
        for h in [
            ("origin", "http://evil.example"),
            ("origin", "null"),
            ("sec-fetch-site", "cross-site"),
            ("sec-fetch-mode", "cors"),
        ] {
            let mut headers = OK.to_vec();
            headers.push(h);
            let (status, code, msg) = check(&headers, path).unwrap_err();
            assert_eq!((status, code), (StatusCode::FORBIDDEN, "browser_request"));
            assert!(msg.contains(h.0) || msg.contains("Origin"), "{msg}");
        }
    }
}
