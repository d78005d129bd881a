//! The SPIFFE Workload API (gRPC on a Unix socket), wire-compatible with standard SPIFFE clients.
//!
//! Every call must carry the `workload.spiffe.io: true` metadata header (else `InvalidArgument`, as the spec
//! says). The caller is identified by the kernel (SO_PEERCRED on its connection), never by what it sends; a
//! caller matching no entry gets `PermissionDenied: no identity issued`, as SPIRE answers.
//!
//! The streams (`FetchX509SVID`, `FetchX509Bundles`, `FetchJWTBundles`) attest the caller again before every
//! update they send: the update holds only what the caller's selectors match *now*, and a caller that exited, was
//! replaced (`exec`, pid reuse) or matches nothing any more gets `PermissionDenied` and the stream ends. A
//! connection handed to another process keeps being judged by the process that opened it.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};
use trustline_identity::Selector;
use trustline_proto::workload as pb;
use trustline_proto::workload::spiffe_workload_api_server::{SpiffeWorkloadApi, SpiffeWorkloadApiServer};

use crate::agent::{Agent, AgentError, Entry};
use crate::attest::PeerCred;

/// Most audiences one request may name.
pub const MAX_AUDIENCES: usize = 32;
/// Longest audience accepted.
pub const MAX_AUDIENCE_LEN: usize = 256;

/// The Workload API service.
#[derive(Clone)]
pub struct WorkloadApi {
    agent: Arc<Agent>,
}

impl WorkloadApi {
    /// The tonic service.
    pub fn service(agent: Arc<Agent>) -> SpiffeWorkloadApiServer<Self> {
        SpiffeWorkloadApiServer::new(Self { agent })
    }
}

/// Checks the `workload.spiffe.io` header.
fn check_header<T>(req: &Request<T>) -> Result<(), Status> {
    match req.metadata().get("workload.spiffe.io").map(|v| v.to_str()) {
        Some(Ok("true")) => Ok(()),
        _ => Err(Status::invalid_argument(
            "security header missing from request: the Workload API requires metadata workload.spiffe.io: true",
        )),
    }
}

/// Kernel credentials of the caller of `req`.
pub fn peer<T>(req: &Request<T>) -> Option<PeerCred> {
    let c = req.extensions().get::<UdsConnectInfo>()?.peer_cred?;
    Some(PeerCred {
        uid: c.uid(),
        gid: c.gid(),
        pid: c.pid(),
    })
}

/// Checks audiences: at least one, each non-empty and bounded, not too many.
pub fn check_audience(aud: &[String]) -> Result<(), String> {
    if aud.is_empty() {
        return Err("audience is required (at least one)".into());
    }
    if aud.len() > MAX_AUDIENCES {
        return Err(format!(
            "too many audiences: {} (at most {MAX_AUDIENCES})",
            aud.len()
        ));
    }
    for (i, a) in aud.iter().enumerate() {
        if a.trim().is_empty() {
            return Err(format!("audience #{i} is empty"));
        }
        if a.len() > MAX_AUDIENCE_LEN {
            return Err(format!("audience #{i} is longer than {MAX_AUDIENCE_LEN} bytes"));
        }
    }
    Ok(())
}

impl WorkloadApi {
    /// Attests the caller with credentials `cred` from the kernel (off the runtime threads) and returns the
    /// entries its selectors match now: `PermissionDenied` when attestation fails or nothing matches.
    async fn authorize(&self, cred: Option<PeerCred>, method: &str) -> Result<Vec<Entry>, Status> {
        let cred = cred.ok_or_else(|| Status::permission_denied("no peer credentials on the connection"))?;
        let selectors = self.agent.attestor.attest_async(cred).await.map_err(|e| {
            tracing::warn!(error = %e, method, "workload attestation failed");
            Status::permission_denied(format!("workload attestation failed: {e}"))
        })?;
        self.entries(&selectors, method)
    }

    fn entries(&self, selectors: &[Selector], method: &str) -> Result<Vec<Entry>, Status> {
        let entries = self.agent.entries_for(selectors);
        if entries.is_empty() {
            self.agent.metrics.request("workload_api", method, "no_identity");
            tracing::info!(selectors = ?selectors.iter().map(ToString::to_string).collect::<Vec<_>>(), "no identity issued");
            return Err(Status::permission_denied("no identity issued"));
        }
        Ok(entries)
    }

    fn x509_bundles(&self) -> HashMap<String, Vec<u8>> {
        let snap = self.agent.snapshot();
        HashMap::from([(self.agent.trust_domain().to_string(), snap.roots.concat())])
    }

    fn jwt_bundles(&self) -> HashMap<String, Vec<u8>> {
        jwt_bundle_json(&self.agent)
            .map(|j| HashMap::from([(self.agent.trust_domain().to_string(), j)]))
            .unwrap_or_default()
    }
}

/// The JWT bundle (JWT keys only) of the agent's trust domain as JWK-set JSON.
pub fn jwt_bundle_json(agent: &Agent) -> Option<Vec<u8>> {
    let snap = agent.snapshot();
    let jwks = snap.jwks.as_ref()?;
    let only_jwt = trustline_identity::bundle::JwkSet {
        keys: jwks.jwt_keys().cloned().collect(),
        spiffe_sequence: jwks.spiffe_sequence,
        spiffe_refresh_hint: jwks.spiffe_refresh_hint,
    };
    serde_json::to_vec(&only_jwt).ok()
}

fn agent_status(e: AgentError) -> Status {
    match e {
        AgentError::NoIdentity => Status::permission_denied("no identity issued"),
        AgentError::CaUnavailable(m) => {
            Status::unavailable(format!("CA unreachable and nothing cached: {m}"))
        }
        AgentError::Ca(m) => Status::invalid_argument(m),
        other => Status::internal(other.to_string()),
    }
}

/// JSON to protobuf Struct.
fn to_struct(v: &serde_json::Value) -> prost_types::Struct {
    prost_types::Struct {
        fields: v
            .as_object()
            .map(|o| o.iter().map(|(k, v)| (k.clone(), to_value(v))).collect())
            .unwrap_or_default(),
    }
}

fn to_value(v: &serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(to_value).collect(),
        }),
        serde_json::Value::Object(_) => Kind::StructValue(to_struct(v)),
    };
    prost_types::Value { kind: Some(kind) }
}

type Stream<T> = ReceiverStream<Result<T, Status>>;

/// A server stream that sends `current()` at once and again whenever the agent's state changes and the value
/// differs from the last one sent (`None`: nothing to send yet). Before each send the caller is attested again
/// ([`WorkloadApi::authorize`]); when that fails the stream ends with its status. Ends when the client goes away.
fn watch_stream<T, F>(api: WorkloadApi, cred: Option<PeerCred>, method: &'static str, current: F) -> Stream<T>
where
    T: PartialEq + Clone + Send + 'static,
    F: Fn() -> Option<T> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(2);
    tokio::spawn(async move {
        let mut changes = api.agent.subscribe();
        let mut last: Option<T> = None;
        loop {
            changes.borrow_and_update();
            if let Some(msg) = current() {
                if last.as_ref() != Some(&msg) {
                    if let Err(s) = api.authorize(cred, method).await {
                        let _ = tx.send(Err(s)).await;
                        return;
                    }
                    last = Some(msg.clone());
                    if tx.send(Ok(msg)).await.is_err() {
                        return;
                    }
                }
            }
            tokio::select! {
                r = changes.changed() => if r.is_err() { return },
                _ = tx.closed() => return,
            }
        }
    });
    ReceiverStream::new(rx)
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = Stream<pb::X509svidResponse>;

    async fn fetch_x509svid(
        &self,
        req: Request<pb::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        check_header(&req)?;
        let cred = peer(&req);
        self.authorize(cred, "FetchX509SVID").await?;
        let (tx, rx) = mpsc::channel(2);
        let this = self.clone();
        tokio::spawn(async move {
            let mut changes = this.agent.subscribe();
            let mut last: Option<Vec<(String, Vec<u8>)>> = None;
            loop {
                changes.borrow_and_update();
                // Attested again for every update: only what the caller's selectors match now is sent.
                let msg = match this.authorize(cred, "FetchX509SVID").await {
                    Err(s) => Some(Err(s)),
                    Ok(entries) => match this.agent.x509_svids(&entries).await {
                        Ok(svids) if svids.is_empty() => {
                            Some(Err(Status::unavailable("no SVID could be minted yet")))
                        }
                        Ok(svids) => {
                            let key: Vec<(String, Vec<u8>)> = svids
                                .iter()
                                .map(|s| (s.spiffe_id.clone(), s.chain.first().cloned().unwrap_or_default()))
                                .collect();
                            if last.as_ref() == Some(&key) {
                                // Nothing new for this workload.
                                None
                            } else {
                                last = Some(key);
                                let roots = this.agent.snapshot().roots.concat();
                                Some(Ok(pb::X509svidResponse {
                                    svids: svids
                                        .iter()
                                        .map(|s| pb::X509svid {
                                            spiffe_id: s.spiffe_id.clone(),
                                            x509_svid: s.chain.concat(),
                                            x509_svid_key: s.key.to_vec(),
                                            bundle: roots.clone(),
                                            hint: String::new(),
                                        })
                                        .collect(),
                                    crl: Vec::new(),
                                    federated_bundles: HashMap::new(),
                                }))
                            }
                        }
                        Err(e) => Some(Err(agent_status(e))),
                    },
                };
                if let Some(msg) = msg {
                    let fatal = msg.is_err();
                    this.agent.metrics.request(
                        "workload_api",
                        "FetchX509SVID",
                        if fatal { "error" } else { "ok" },
                    );
                    if tx.send(msg).await.is_err() || fatal {
                        return;
                    }
                }
                tokio::select! {
                    r = changes.changed() => if r.is_err() { return },
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type FetchX509BundlesStream = Stream<pb::X509BundlesResponse>;

    async fn fetch_x509_bundles(
        &self,
        req: Request<pb::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        check_header(&req)?;
        let cred = peer(&req);
        self.authorize(cred, "FetchX509Bundles").await?;
        let this = self.clone();
        Ok(Response::new(watch_stream(
            self.clone(),
            cred,
            "FetchX509Bundles",
            move || {
                let bundles = this.x509_bundles();
                Some(pb::X509BundlesResponse {
                    crl: Vec::new(),
                    bundles,
                })
            },
        )))
    }

    async fn fetch_jwtsvid(
        &self,
        req: Request<pb::JwtsvidRequest>,
    ) -> Result<Response<pb::JwtsvidResponse>, Status> {
        check_header(&req)?;
        let r = req.get_ref();
        check_audience(&r.audience).map_err(Status::invalid_argument)?;
        let mut entries = self.authorize(peer(&req), "FetchJWTSVID").await?;
        if !r.spiffe_id.is_empty() {
            entries.retain(|e| e.spiffe_id.to_string() == r.spiffe_id);
            if entries.is_empty() {
                return Err(Status::permission_denied(format!(
                    "no identity {} issued to the caller",
                    r.spiffe_id
                )));
            }
        }
        let mut svids = Vec::with_capacity(entries.len());
        for e in &entries {
            let j = self.agent.jwt_svid(e, &r.audience).await.map_err(agent_status)?;
            svids.push(pb::Jwtsvid {
                spiffe_id: j.spiffe_id,
                svid: j.token,
                hint: String::new(),
            });
        }
        self.agent.metrics.request("workload_api", "FetchJWTSVID", "ok");
        Ok(Response::new(pb::JwtsvidResponse { svids }))
    }

    type FetchJWTBundlesStream = Stream<pb::JwtBundlesResponse>;

    async fn fetch_jwt_bundles(
        &self,
        req: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        check_header(&req)?;
        let cred = peer(&req);
        self.authorize(cred, "FetchJWTBundles").await?;
        let this = self.clone();
        Ok(Response::new(watch_stream(
            self.clone(),
            cred,
            "FetchJWTBundles",
            move || {
                let bundles = this.jwt_bundles();
                (!bundles.is_empty()).then_some(pb::JwtBundlesResponse { bundles })
            },
        )))
    }

    async fn validate_jwtsvid(
        &self,
        req: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        check_header(&req)?;
        self.authorize(peer(&req), "ValidateJWTSVID").await?;
        let r = req.into_inner();
        if r.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        if r.svid.is_empty() {
            return Err(Status::invalid_argument("svid must be specified"));
        }
        let snap = self.agent.snapshot();
        let jwks = snap
            .jwks
            .as_ref()
            .ok_or_else(|| Status::unavailable("no JWT bundle yet"))?;
        let v = trustline_identity::jwt::validate(&r.svid, &r.audience, jwks)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(pb::ValidateJwtsvidResponse {
            spiffe_id: v.spiffe_id.to_string(),
            claims: Some(to_struct(&v.claims)),
        }))
    }
}
