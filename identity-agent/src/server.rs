//! `trustline-agent run`: obtain the node identity, start syncing, serve the Workload API and the HTTP API.

use std::path::Path;

use tokio::net::UnixListener;

use crate::agent::{Agent, AgentError};
use crate::config::Validated;
use crate::h2_authority;

/// Largest Workload API request message (the biggest, a `ValidateJWTSVID` with its token, needs a few KiB).
pub const WORKLOAD_API_MAX_MESSAGE: usize = 64 * 1024;
/// HTTP/2 streams one Workload API connection may have open at once (tonic's default is no limit).
pub const WORKLOAD_API_MAX_STREAMS: u32 = 100;

fn bind(path: &Path) -> Result<UnixListener, AgentError> {
    // Workloads of any uid must reach the sockets; attestation by peer credentials is the gate.
    trustline_identity::uds::bind(path, 0o755, 0o777)
        .and_then(UnixListener::from_std)
        .map_err(|e| AgentError::File {
            path: path.to_owned(),
            reason: e.to_string(),
        })
}

/// Runs the agent until `shutdown` resolves. `ready` is called once both sockets listen.
pub async fn run(
    cfg: Validated,
    join_token: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ready: impl FnOnce(&Agent, &Validated),
) -> Result<(), AgentError> {
    let agent = Agent::start(cfg.clone(), join_token).await?;
    agent.spawn_tasks();
    // Serve once the CA's first entry snapshot is in, so a workload calling right after "ready" is not told
    // "no identity issued" for an entry that simply has not arrived yet. A CA that cannot be reached does not
    // hold the agent back for long: it serves what it has and keeps trying.
    let waited = std::time::Instant::now();
    while !agent.snapshot().connected && waited.elapsed() < std::time::Duration::from_secs(5) {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    if !agent.snapshot().connected {
        tracing::warn!("serving before the first entry snapshot from the CA arrived (CA unreachable?)");
    }
    let workload = bind(&cfg.socket)?;
    let http = bind(&cfg.http_socket)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|v| *v).await;
        }
    };
    let grpc = {
        // Requests are decoded before the handler attests the caller: a few KiB is all any of them needs.
        let svc = crate::workload_api::WorkloadApi::service(agent.clone())
            .max_decoding_message_size(WORKLOAD_API_MAX_MESSAGE);
        // Every connection goes through the `:authority` fix so gRPC-C-core clients (Python, C++) work too; it
        // also enforces, before h2 buffers anything, the limits advertised below (`h2_authority`, "Bounds").
        let inc =
            tokio_stream::StreamExt::map(tokio_stream::wrappers::UnixListenerStream::new(workload), |c| {
                c.map(h2_authority::AuthorityFix::new)
            });
        let stop = stopped();
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .max_frame_size(h2_authority::MAX_FRAME_SIZE)
                .http2_max_header_list_size(h2_authority::MAX_HEADER_LIST_SIZE)
                .max_concurrent_streams(WORKLOAD_API_MAX_STREAMS)
                // What a client may send before the server reads it (hyper's default is 1 MiB each).
                .initial_stream_window_size(64 * 1024)
                .initial_connection_window_size(256 * 1024)
                .add_service(svc)
                .serve_with_incoming_shutdown(inc, stop)
                .await
        })
    };
    let web = {
        let a = agent.clone();
        let stop = stopped();
        tokio::spawn(async move { crate::http_api::serve(http, a, stop).await })
    };
    let web_tcp = match cfg.raw.http_listen {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| AgentError::File {
                    path: addr.to_string().into(),
                    reason: e.to_string(),
                })?;
            // The bound address (port 0 in the config picks a free one).
            if let Ok(bound) = l.local_addr() {
                tracing::info!("HTTP API listening on http://{bound}");
            }
            let a = agent.clone();
            let stop = stopped();
            Some(tokio::spawn(async move {
                crate::http_api::serve_tcp(l, a, stop).await
            }))
        }
        None => None,
    };
    let health = match cfg.raw.health_listen {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| AgentError::File {
                    path: addr.to_string().into(),
                    reason: e.to_string(),
                })?;
            if let Ok(bound) = l.local_addr() {
                tracing::info!("health and metrics listening on http://{bound}");
            }
            let a = agent.clone();
            let stop = stopped();
            Some(tokio::spawn(async move {
                let m = a.metrics.clone();
                let app = axum::Router::new()
                    .route("/healthz", axum::routing::get(|| async { "ok\n" }))
                    .route(
                        "/metrics",
                        axum::routing::get(move || {
                            let m = m.clone();
                            async move { m.encode() }
                        }),
                    );
                axum::serve(l, app).with_graceful_shutdown(stop).await
            }))
        }
        None => None,
    };
    ready(&agent, &cfg);
    shutdown.await;
    let _ = stop_tx.send(true);
    let _ = grpc.await;
    let _ = web.await;
    if let Some(h) = health {
        let _ = h.await;
    }
    if let Some(w) = web_tcp {
        let _ = w.await;
    }
    let _ = std::fs::remove_file(&cfg.socket);
    let _ = std::fs::remove_file(&cfg.http_socket);
    Ok(())
}
