//! Runs a configured sidecar: identity from the Workload API, policy with hot reload, the listeners, metrics,
//! and graceful drain on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderValue, Request, Response, StatusCode, Version};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use trustline_identity::tls::{server_config, SpiffeClientVerifier};

use crate::config::{Config, Limits, Protocol, ValidRoute};
use crate::live_peer::{LivePeer, Peers, Verdict};
use crate::metrics::Metrics;
use crate::park::{Http, Lot, RequestBody};
use crate::policy_store::PolicyStore;
use crate::proxy::{group_name, refusal_of, Body, Inbound, Outbound, RouteTable, Shared};
use crate::svid_source::SvidSource;
use crate::tls_stream::ServerTls;

/// Why the sidecar could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// The policy folder is invalid at start.
    #[error("policy: {0}")]
    Policy(#[from] crate::policy::PolicyError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({field}): {source}")]
    Bind {
        /// Config field.
        field: String,
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// TLS setup failed.
    #[error("TLS: {0}")]
    Tls(#[from] trustline_identity::tls::TlsError),
    /// The accountability log could not be opened.
    #[error("{0}")]
    Log(String),
}

/// The addresses actually bound (useful with port 0).
#[derive(Debug, Clone)]
pub struct Bound {
    /// Inbound listeners, in config order.
    pub inbound: Vec<SocketAddr>,
    /// Outbound listeners, in config order.
    pub outbound: Vec<SocketAddr>,
    /// Metrics listener.
    pub metrics: Option<SocketAddr>,
    /// Our SPIFFE ID.
    pub spiffe_id: String,
}

async fn bind(field: String, addr: SocketAddr) -> Result<TcpListener, RunError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| RunError::Bind { field, addr, source })
}

/// Tracks connections so shutdown can wait for them: each holds a permit of a semaphore sized to the limit.
#[derive(Clone)]
struct Conns {
    sem: Arc<Semaphore>,
    max: usize,
}

impl Conns {
    fn new(max: usize) -> Self {
        Self {
            sem: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    async fn drained(&self) {
        while self.sem.available_permits() < self.max {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Resolves once shutdown is signalled (or its sender is gone).
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Accepts connections until shutdown, at most `limits.max_connections` at once.
fn accept_loop<F, Fut>(listener: TcpListener, conns: Conns, mut shutdown: watch::Receiver<bool>, on_conn: F)
where
    F: Fn(TcpStream, SocketAddr, OwnedSemaphorePermit) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                p = conns.sem.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                () = stopped(&mut shutdown) => return,
            };
            let (tcp, remote) = tokio::select! {
                a = listener.accept() => match a {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = stopped(&mut shutdown) => return,
            };
            let _ = tcp.set_nodelay(true);
            tokio::spawn(on_conn(tcp, remote, permit));
        }
    });
}

/// Runs the sidecar until `shutdown` resolves, then drains. `ready` is called once everything listens.
pub async fn run(
    config: Config,
    routes: Vec<Vec<ValidRoute>>,
    shutdown: impl std::future::Future<Output = ()>,
    ready: impl FnOnce(&Bound),
) -> Result<(), RunError> {
    tokio::pin!(shutdown);
    let metrics = Metrics::new();
    let policies = Arc::new(PolicyStore::load(config.policy_dir.clone())?);
    policies.watch(config.policy_reload_interval, metrics.clone());
    let limits = config.limits.clone();

    // Bind everything first, so a taken port fails at once.
    let mut inbound_l = Vec::new();
    for (i, ib) in config.inbound.iter().enumerate() {
        inbound_l.push(bind(format!("inbound[{i}].listen"), ib.listen).await?);
    }
    let mut outbound_l = Vec::new();
    for (i, ob) in config.outbound.iter().enumerate() {
        outbound_l.push(bind(format!("outbound[{i}].listen"), ob.listen).await?);
    }
    let metrics_l = match config.metrics_listen {
        Some(a) => Some(bind("metrics_listen".into(), a).await?),
        None => None,
    };

    let identity = SvidSource::start(config.workload_api_socket.clone());
    let (stop_tx, stop_rx) = watch::channel(false);
    let metrics_addr = metrics_l.as_ref().and_then(|l| l.local_addr().ok());
    if let Some(l) = metrics_l {
        serve_metrics(l, metrics.clone(), identity.clone(), stop_rx.clone());
    }

    // Fail closed until the first SVID: nothing is served before it.
    let mut cur = identity.subscribe();
    let mut waited = 0u32;
    let first = loop {
        if let Some(c) = cur.borrow_and_update().clone() {
            break c;
        }
        let changed = tokio::select! {
            r = tokio::time::timeout(Duration::from_secs(5), cur.changed()) => r,
            () = &mut shutdown => return Ok(()),
        };
        if changed.is_err() {
            waited += 5;
            tracing::warn!(
                socket = %config.workload_api_socket.display(),
                waited_s = waited,
                "waiting for an X.509-SVID from the Workload API (is the agent running, and is there a registration entry for this process?)"
            );
        }
    };
    {
        let m = metrics.clone();
        let mut rx = identity.subscribe();
        tokio::spawn(async move {
            loop {
                if let Some(c) = rx.borrow_and_update().as_ref() {
                    m.svid_expiry(c.not_after);
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
    }
    let bundle = identity
        .bundle()
        .ok_or_else(|| trustline_identity::tls::TlsError::Key("SVID without bundle".into()))?;
    let log = match &config.log {
        None => None,
        Some(l) => {
            let writer = l.writer().map_err(|e| RunError::Log(format!("log.fsync: {e}")))?;
            let signer: Arc<dyn trustline_audit::CheckpointSigner> = identity.cert.clone();
            let (log, recovery) =
                trustline_audit::Log::open(writer, Some(signer)).map_err(|e| RunError::Log(e.to_string()))?;
            tracing::info!(
                dir = %l.dir.display(),
                records = recovery.next_seq,
                segments = recovery.segments,
                cut_bytes = recovery.truncated_bytes,
                "accountability log open"
            );
            Some(crate::proxy::LogSink {
                log,
                durable: l.durable,
                fail_closed: l.on_failure == crate::config::OnFailure::Closed,
            })
        }
    };
    let shared = Arc::new(Shared {
        metrics: metrics.clone(),
        policies,
        identity: identity.clone(),
        limits: limits.clone(),
        chain_limits: crate::chain::Limits {
            max_hops: config.chain.max_hops,
            max_bytes: config.chain.max_bytes,
            max_age: config.chain.max_age,
            verify_peer_signature: config.chain.verify_peer_signature,
            ..crate::chain::Limits::default()
        },
        hop_signer: crate::chain::HopSigner::new(identity.cert.clone(), config.chain.batch_signatures),
        recent_chains: crate::chain::Recent::default(),
        log: log.clone(),
    });
    let mut all_conns = Vec::new();

    // Inbound connections' peers are checked again on every request against the same bundle (`live_peer`).
    let peers = Peers::new(bundle.clone());
    let verifier = Arc::new(SpiffeClientVerifier::new(bundle, true));
    let mut bound = Bound {
        inbound: Vec::new(),
        outbound: Vec::new(),
        metrics: metrics_addr,
        spiffe_id: first.spiffe_id.clone(),
    };
    for (ib, listener) in config.inbound.iter().zip(inbound_l) {
        bound.inbound.push(listener.local_addr().unwrap_or(ib.listen));
        let mut tls = server_config(identity.cert.clone(), verifier.clone())?;
        tls.alpn_protocols = match ib.protocol {
            Protocol::Http => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            Protocol::Tcp => Vec::new(),
        };
        let acceptor = Arc::new(tls);
        let state = Inbound::new(shared.clone(), ib.app, ib.jwt.clone(), ib.path_normalization);
        let conns = Conns::new(limits.max_connections);
        all_conns.push(conns.clone());
        let (protocol, shared) = (ib.protocol, shared.clone());
        let lot = Lot::new(Http::new(&limits), stop_rx.clone());
        let peers = peers.clone();
        accept_loop(listener, conns, stop_rx.clone(), move |tcp, remote, permit| {
            let (acceptor, state, shared, lot, peers) = (
                acceptor.clone(),
                state.clone(),
                shared.clone(),
                lot.clone(),
                peers.clone(),
            );
            async move {
                let m = &shared.metrics;
                // Before the handshake: a bundle change that races it is seen by the first request.
                let generation = peers.generation();
                // The handshake's state, and then the TLS stream, live in boxes: the connection's task (which
                // an idle connection is, besides its TLS session) stays a few hundred bytes.
                let timeout = shared.limits.handshake_timeout;
                let handshake = Box::pin(async move {
                    tokio::time::timeout(timeout, ServerTls::accept(tcp, acceptor))
                        .await
                        .map(|r| r.map(Box::new))
                });
                let tls = match handshake.await {
                    Err(_) => {
                        m.handshake("inbound", "timeout", "");
                        tracing::warn!(%remote, reason = "timeout", "peer refused at the TLS handshake");
                        return;
                    }
                    Ok(Err(e)) => {
                        let reason = refusal_of(&e);
                        m.handshake("inbound", reason, "");
                        tracing::warn!(%remote, reason, error = %e, "peer refused at the TLS handshake");
                        return;
                    }
                    Ok(Ok(t)) => t,
                };
                let session = tls.session();
                let group = group_name(session.negotiated_key_exchange_group().map(|g| g.name()));
                let chain = session
                    .peer_certificates()
                    .and_then(|c| peers.chain(c, generation).ok());
                let Some(chain) = chain else {
                    // The verifier already enforced this; a missing ID here is a bug, refuse anyway.
                    m.handshake("inbound", "bad_svid", group);
                    return;
                };
                m.handshake("inbound", "ok", group);
                let peer = chain.id().clone();
                tracing::info!(%remote, peer = %peer, key_exchange = group, "peer connected");
                let open = m.open_connection("inbound");
                match protocol {
                    Protocol::Tcp => state.handle_tcp(peer, tls).await,
                    Protocol::Http => {
                        let live = Arc::new(LivePeer::new(&peers, chain));
                        let retire = live.retire();
                        let svc = move |req| serve_live(state.clone(), live.clone(), req);
                        lot.serve_retiring(tls, svc, (permit, open), retire).await;
                    }
                }
            }
        });
    }
    for ((ob, listener), routes) in config.outbound.iter().zip(outbound_l).zip(routes) {
        bound.outbound.push(listener.local_addr().unwrap_or(ob.listen));
        let state = Outbound::new(
            shared.clone(),
            RouteTable::new(routes, &identity)?,
            ob.path_normalization,
        );
        let conns = Conns::new(limits.max_connections);
        all_conns.push(conns.clone());
        let (protocol, shared) = (ob.protocol, shared.clone());
        let lot = Lot::new(Http::new(&limits), stop_rx.clone());
        accept_loop(listener, conns, stop_rx.clone(), move |tcp, _remote, permit| {
            let (state, shared, lot) = (state.clone(), shared.clone(), lot.clone());
            async move {
                let open = shared.metrics.open_connection("outbound");
                match protocol {
                    Protocol::Tcp => state.handle_tcp(tcp).await,
                    Protocol::Http => {
                        let svc = move |req| state.clone().handle(req);
                        lot.serve(tcp, svc, (permit, open)).await;
                    }
                }
            }
        });
    }
    ready(&bound);

    (&mut shutdown).await;
    tracing::info!(drain_timeout = ?limits.drain_timeout, "shutting down: no new connections, draining");
    let _ = stop_tx.send(true);
    let drained = async {
        for c in &all_conns {
            c.drained().await;
        }
    };
    if tokio::time::timeout(limits.drain_timeout, drained).await.is_err() {
        tracing::warn!("drain timeout: closing the remaining connections");
    }
    drop(shared);
    if let Some(sink) = log {
        // The last handle: write what is queued and sign a final checkpoint.
        let _ = tokio::task::spawn_blocking(move || sink.log.close()).await;
    }
    Ok(())
}

/// Serves one request of an inbound HTTP connection if its peer is still valid and trusted, refuses it if not
/// (see [`crate::live_peer`]). A refusal, or a connection retired ahead of its peer's expiry, drains the
/// connection; on HTTP/1.1 the response also says `Connection: close`, so the client does not send another
/// request on it.
async fn serve_live(
    state: Arc<Inbound>,
    live: Arc<LivePeer>,
    req: Request<RequestBody>,
) -> Result<Response<Body>, std::convert::Infallible> {
    let http1 = req.version() < Version::HTTP_2;
    let peer = live.id().clone();
    let Ok(mut resp) = match live.check() {
        Verdict::Serve => return state.handle(peer, req).await,
        Verdict::ServeAndRetire => {
            tracing::debug!(peer = %peer, "peer's certificate near its end: retiring the connection");
            state.handle(peer, req).await
        }
        Verdict::Refuse { why, reason } => {
            tracing::warn!(
                peer = %peer,
                reason = why.as_str(),
                detail = %reason,
                method = %req.method(),
                path = req.uri().path(),
                "request refused on a live connection: its peer is no longer valid"
            );
            state.refuse(peer, req, why.as_str(), reason).await
        }
    };
    // Not on a `101 Switching Protocols`: its `Connection: upgrade` is the upgrade (the tunnel it opens is the
    // connection's last use anyway).
    if http1 && resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(resp)
}

/// `/metrics` and `/healthz` (200 once the sidecar holds an SVID).
fn serve_metrics(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    identity: Arc<SvidSource>,
    stop: watch::Receiver<bool>,
) {
    let conns = Conns::new(64);
    let lot = Lot::new(Http::new(&Limits::default()), stop.clone());
    accept_loop(listener, conns, stop.clone(), move |tcp, _, permit| {
        let (metrics, identity, lot) = (metrics.clone(), identity.clone(), lot.clone());
        async move {
            let svc = move |req: hyper::Request<crate::park::RequestBody>| {
                let (metrics, identity) = (metrics.clone(), identity.clone());
                async move {
                    let (status, body) = match req.uri().path() {
                        "/metrics" => (200, metrics.render()),
                        "/healthz" | "/readyz" => match identity.subscribe().borrow().as_ref() {
                            Some(c) => (200, format!("ok: {}\n", c.spiffe_id)),
                            None => (503, "waiting for an SVID\n".to_owned()),
                        },
                        _ => (404, "not found: try /metrics or /healthz\n".to_owned()),
                    };
                    let mut r = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
                    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::OK);
                    Ok::<_, std::convert::Infallible>(r)
                }
            };
            lot.serve(tcp, svc, permit).await;
        }
    });
}
