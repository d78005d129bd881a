//! The local HTTP API: what apps use to get a JWT-SVID in one call.
//!
//! - `GET /v1/jwt-svid?audience=A[&audience=B…][&spiffe_id=ID]` → `{"spiffe_id", "token", "expires_at"}`
//! - `GET /v1/bundle/jwks` → the JWT bundle (JWK set)
//! - `POST /v1/jwt-svid/validate` with `{"token", "audience"}` → `{"spiffe_id", "claims"}`
//!
//! Served on a Unix socket; the caller is identified by SO_PEERCRED (`curl --unix-socket … http://agent/v1/…`).
//! Errors are JSON `{"code", "message"}` with stable codes: `missing_audience`, `invalid_request`,
//! `no_identity`, `ca_unavailable`, `invalid_token`, `attestation_failed`.

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

/// Serves the HTTP API on loopback TCP until `shutdown`.
pub async fn serve_tcp(
    listener: tokio::net::TcpListener,
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
