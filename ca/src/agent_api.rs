//! The agent API: gRPC over mutually authenticated TLS 1.3.
//!
//! The TLS layer verifies any client certificate against the bundle (SPIFFE rules, our trust domain) and admits
//! clients without one, because a node attesting for the first time has no SVID yet. Each call then checks what
//! it needs: `AttestAgent` needs a join token or a TPM DevID proof (after `AttestChallenge`); every other call needs the verified agent SVID of an attested node,
//! and acts only for that node.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status};
use trustline_identity::spiffe_id::SpiffeId;
use trustline_identity::tls::svid_leaf_id;
use trustline_proto::agent as pb;
use trustline_proto::agent::agent_server::{Agent, AgentServer};

use crate::authority::{Bundle, REFRESH_HINT};
use crate::service::{Ca, CaError, X509Request};
use crate::store::Entry;
use crate::x509::IssuedSvid;

/// Longest a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is on the other end of a connection (attached to every request).
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// Remote address.
    pub remote: SocketAddr,
    /// The verified SPIFFE ID of the client certificate, if one was presented.
    pub spiffe_id: Option<SpiffeId>,
}

/// A TLS connection that carries its [`PeerInfo`] into tonic.
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerInfo,
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts TCP connections, completes TLS handshakes off the accept loop, and yields verified connections.
pub fn incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
) -> ReceiverStream<Result<TlsConn, std::io::Error>> {
    let (tx, rx) = mpsc::channel(128);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "agent API accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            if tx.is_closed() {
                return;
            }
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::info!(%remote, error = %e, "agent API TLS handshake refused");
                        return;
                    }
                    Err(_) => {
                        tracing::info!(%remote, "agent API TLS handshake timed out");
                        return;
                    }
                };
                let spiffe_id = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|leaf| svid_leaf_id(leaf).ok());
                let conn = TlsConn {
                    inner: tls,
                    info: PeerInfo { remote, spiffe_id },
                };
                let _ = tx.send(Ok(conn)).await;
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Converts a stored entry to its wire form.
pub fn entry_to_pb(e: &Entry) -> pb::Entry {
    pb::Entry {
        id: e.id.clone(),
        spiffe_id: e.spiffe_id.clone(),
        parent_id: e.parent_id.clone(),
        selectors: e
            .selectors
            .iter()
            .map(|s| pb::Selector {
                r#type: s.kind().to_owned(),
                value: s.value().to_owned(),
            })
            .collect(),
        x509_svid_ttl: e.x509_svid_ttl,
        jwt_svid_ttl: e.jwt_svid_ttl,
        dns_names: e.dns_names.clone(),
        admin: e.admin,
        revision: e.revision,
        created_at: e.created_at,
    }
}

/// Converts the bundle to its wire form.
pub fn bundle_to_pb(td: &str, b: &Bundle) -> pb::Bundle {
    pb::Bundle {
        trust_domain: td.to_owned(),
        x509_authorities: b.x509_authorities.clone(),
        jwks: b.jwks_json.clone(),
        sequence: b.sequence,
        refresh_hint: REFRESH_HINT.as_secs() as i64,
    }
}

/// Converts an issued SVID to its wire form.
pub fn svid_to_pb(id: &str, s: &IssuedSvid) -> pb::X509svid {
    pb::X509svid {
        spiffe_id: id.to_owned(),
        cert_chain: s.chain.clone(),
        expires_at: s.not_after,
        serial: s.serial.clone(),
    }
}

/// The agent API service.
#[derive(Clone)]
pub struct AgentApi {
    ca: Arc<Ca>,
}

impl AgentApi {
    /// The tonic service for `ca`.
    pub fn service(ca: Arc<Ca>) -> AgentServer<Self> {
        AgentServer::new(Self { ca })
    }

    fn fail(&self, e: CaError) -> Status {
        self.ca.metrics.error(e.kind());
        e.into()
    }

    async fn agent<T>(&self, req: &Request<T>) -> Result<SpiffeId, Status> {
        let id = req
            .extensions()
            .get::<PeerInfo>()
            .and_then(|p| p.spiffe_id.clone())
            .ok_or_else(|| {
                self.fail(CaError::Unauthenticated(
                    "this call requires the agent's X.509-SVID as TLS client certificate".into(),
                ))
            })?;
        self.ca.require_node(&id).await.map_err(|e| self.fail(e))?;
        Ok(id)
    }

    fn bundle(&self) -> pb::Bundle {
        bundle_to_pb(self.ca.td.as_str(), &self.ca.authority.bundle())
    }
}

type WatchStream = ReceiverStream<Result<pb::WatchUpdatesResponse, Status>>;

#[tonic::async_trait]
impl Agent for AgentApi {
    async fn attest_agent(
        &self,
        req: Request<pb::AttestAgentRequest>,
    ) -> Result<Response<pb::AttestAgentResponse>, Status> {
        let r = req.into_inner();
        let attested = match (&r.devid, r.join_token.is_empty()) {
            (Some(p), true) => {
                self.ca
                    .attest_devid(&p.cert_chain, &p.nonce, &p.signature, &r.csr)
                    .await
            }
            (Some(_), false) => Err(CaError::Invalid {
                field: "join_token",
                value: String::new(),
                reason: "send a join token or a DevID proof, not both".into(),
            }),
            (None, _) => self.ca.attest_join_token(&r.join_token, &r.csr).await,
        };
        let (id, svid) = attested.map_err(|e| self.fail(e))?;
        Ok(Response::new(pb::AttestAgentResponse {
            svid: Some(svid_to_pb(&id.to_string(), &svid)),
            bundle: Some(self.bundle()),
        }))
    }

    async fn attest_challenge(
        &self,
        _req: Request<pb::AttestChallengeRequest>,
    ) -> Result<Response<pb::AttestChallengeResponse>, Status> {
        let (nonce, expires_at) = self.ca.devid_challenge().map_err(|e| self.fail(e))?;
        Ok(Response::new(pb::AttestChallengeResponse { nonce, expires_at }))
    }

    async fn renew_agent(
        &self,
        req: Request<pb::RenewAgentRequest>,
    ) -> Result<Response<pb::RenewAgentResponse>, Status> {
        let id = self.agent(&req).await?;
        let svid = self
            .ca
            .renew_agent(&id, &req.into_inner().csr)
            .await
            .map_err(|e| self.fail(e))?;
        Ok(Response::new(pb::RenewAgentResponse {
            svid: Some(svid_to_pb(&id.to_string(), &svid)),
        }))
    }

    async fn fetch_authorized_entries(
        &self,
        req: Request<pb::FetchAuthorizedEntriesRequest>,
    ) -> Result<Response<pb::FetchAuthorizedEntriesResponse>, Status> {
        let id = self.agent(&req).await?;
        let revision = self
            .ca
            .store
            .entries_revision()
            .await
            .map_err(|e| self.fail(e.into()))?;
        let entries = self.ca.authorized_entries(&id).await.map_err(|e| self.fail(e))?;
        Ok(Response::new(pb::FetchAuthorizedEntriesResponse {
            entries: entries.iter().map(entry_to_pb).collect(),
            bundle: Some(self.bundle()),
            revision,
        }))
    }

    type WatchUpdatesStream = WatchStream;

    async fn watch_updates(
        &self,
        req: Request<pb::WatchUpdatesRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let id = self.agent(&req).await?;
        tracing::info!(agent = %id, "agent update stream opened");
        let (tx, rx) = mpsc::channel(4);
        let ca = self.ca.clone();
        tokio::spawn(async move {
            let mut entries_rx = ca.subscribe_entries();
            let mut bundle_rx = ca.authority.subscribe();
            // What this agent holds: entry id -> revision. None until the first (full) message is sent.
            let mut sent: Option<HashMap<String, i64>> = None;
            let mut sent_bundle = -1;
            // Evictions wake the stream; replicas sharing a database are checked on this period too.
            let mut recheck = tokio::time::interval(std::time::Duration::from_secs(30));
            recheck.tick().await;
            loop {
                entries_rx.borrow_and_update();
                if let Err(e) = ca.require_node(&id).await {
                    // Evicted (or gone): the agent learns it and gets nothing more.
                    let _ = tx.send(Err(tonic::Status::from(e))).await;
                    return;
                }
                let bundle = bundle_rx.borrow_and_update().clone();
                let revision = *entries_rx.borrow();
                match ca.authorized_entries(&id).await {
                    Ok(entries) => {
                        let msg = match &sent {
                            None => Some(pb::WatchUpdatesResponse {
                                entries: entries.iter().map(entry_to_pb).collect(),
                                bundle: Some(bundle_to_pb(ca.td.as_str(), &bundle)),
                                revision,
                                removed_entry_ids: Vec::new(),
                                full: true,
                            }),
                            Some(held) => {
                                let upserted: Vec<pb::Entry> = entries
                                    .iter()
                                    .filter(|e| held.get(&e.id) != Some(&e.revision))
                                    .map(entry_to_pb)
                                    .collect();
                                let removed: Vec<String> = held
                                    .keys()
                                    .filter(|k| !entries.iter().any(|e| &e.id == *k))
                                    .cloned()
                                    .collect();
                                (!upserted.is_empty()
                                    || !removed.is_empty()
                                    || bundle.sequence != sent_bundle)
                                    .then(|| pb::WatchUpdatesResponse {
                                        entries: upserted,
                                        bundle: Some(bundle_to_pb(ca.td.as_str(), &bundle)),
                                        revision,
                                        removed_entry_ids: removed,
                                        full: false,
                                    })
                            }
                        };
                        if let Some(msg) = msg {
                            if tx.send(Ok(msg)).await.is_err() {
                                return;
                            }
                            sent = Some(entries.iter().map(|e| (e.id.clone(), e.revision)).collect());
                            sent_bundle = bundle.sequence;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(agent = %id, error = %e, "watch: could not load entries");
                    }
                }
                tokio::select! {
                    r = entries_rx.changed() => if r.is_err() { return },
                    r = bundle_rx.changed() => if r.is_err() { return },
                    _ = recheck.tick() => {},
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn batch_new_x509svid(
        &self,
        req: Request<pb::BatchNewX509svidRequest>,
    ) -> Result<Response<pb::BatchNewX509svidResponse>, Status> {
        let agent = self.agent(&req).await?;
        let params = req.into_inner().params;
        let entries: HashMap<String, Entry> = self
            .ca
            .authorized_entries(&agent)
            .await
            .map_err(|e| self.fail(e))?
            .into_iter()
            .map(|e| (e.id.clone(), e))
            .collect();
        // Resolve each param to a request, or an error in its slot.
        let mut slots: Vec<Result<usize, String>> = Vec::with_capacity(params.len());
        let mut reqs = Vec::new();
        let mut ids = Vec::new();
        for p in params {
            let Some(e) = entries.get(&p.entry_id) else {
                self.ca.metrics.error("permission_denied");
                slots.push(Err(format!(
                    "entry {:?} is not authorized for agent {agent}",
                    p.entry_id
                )));
                continue;
            };
            let spiffe_id = match trustline_identity::spiffe_id::parse_spiffe_id("spiffe_id", &e.spiffe_id) {
                Ok(id) => id,
                Err(err) => {
                    slots.push(Err(err.to_string()));
                    continue;
                }
            };
            slots.push(Ok(reqs.len()));
            ids.push(e.spiffe_id.clone());
            reqs.push(X509Request {
                csr: p.csr,
                spiffe_id,
                dns_names: e.dns_names.clone(),
                ttl: self.ca.x509_ttl(e),
            });
        }
        let mut issued: Vec<Option<Result<IssuedSvid, CaError>>> = self
            .ca
            .issue_x509(reqs, &agent.to_string())
            .await
            .into_iter()
            .map(Some)
            .collect();
        let results = slots
            .into_iter()
            .map(|slot| {
                let result = match slot {
                    Err(msg) => pb::x509svid_result::Result::Error(msg),
                    Ok(i) => match issued.get_mut(i).and_then(Option::take) {
                        Some(Ok(svid)) => pb::x509svid_result::Result::Svid(svid_to_pb(&ids[i], &svid)),
                        Some(Err(e)) => pb::x509svid_result::Result::Error(e.to_string()),
                        None => pb::x509svid_result::Result::Error("internal: missing result".into()),
                    },
                };
                pb::X509svidResult { result: Some(result) }
            })
            .collect();
        Ok(Response::new(pb::BatchNewX509svidResponse { results }))
    }

    async fn new_jwtsvid(
        &self,
        req: Request<pb::NewJwtsvidRequest>,
    ) -> Result<Response<pb::NewJwtsvidResponse>, Status> {
        let agent = self.agent(&req).await?;
        let r = req.into_inner();
        let entry = self
            .ca
            .authorized_entries(&agent)
            .await
            .map_err(|e| self.fail(e))?
            .into_iter()
            .find(|e| e.id == r.entry_id)
            .ok_or_else(|| {
                self.fail(CaError::PermissionDenied(format!(
                    "entry {:?} is not authorized for agent {agent}",
                    r.entry_id
                )))
            })?;
        let id = trustline_identity::spiffe_id::parse_spiffe_id("spiffe_id", &entry.spiffe_id)
            .map_err(|e| self.fail(e.into()))?;
        let minted = self
            .ca
            .mint_jwt(&id, &r.audience, self.ca.jwt_ttl(&entry), &agent.to_string())
            .await
            .map_err(|e| self.fail(e))?;
        Ok(Response::new(pb::NewJwtsvidResponse {
            token: minted.token,
            expires_at: minted.expires_at,
            spiffe_id: entry.spiffe_id,
        }))
    }

    async fn fetch_bundle(
        &self,
        req: Request<pb::FetchBundleRequest>,
    ) -> Result<Response<pb::Bundle>, Status> {
        self.agent(&req).await?;
        Ok(Response::new(self.bundle()))
    }
}
