//! The admin API: gRPC on a Unix socket only. Every call is admitted by the caller's kernel-reported uid
//! (SO_PEERCRED): the CA's own uid and the configured `server.admin_uids`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};
use trustline_identity::spiffe_id::{parse_spiffe_id, parse_workload_id};
use trustline_proto::admin as pb;
use trustline_proto::admin::admin_server::{Admin, AdminServer};
use trustline_proto::agent as apb;

use crate::agent_api::{bundle_to_pb, entry_to_pb, svid_to_pb};
use crate::service::{Ca, CaError, EntryRequest, X509Request};
use crate::store::{EntryFilter, IssuedFilter, KeyKind, KeyState, StoreError};
use crate::x509::now_unix;

/// The admin service.
pub struct AdminApi {
    ca: Arc<Ca>,
}

/// The uid check, as a tonic interceptor.
#[derive(Clone)]
pub struct UidGuard {
    allowed: Arc<Vec<u32>>,
}

impl tonic::service::Interceptor for UidGuard {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let uid = req
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|c| c.peer_cred)
            .map(|c| c.uid());
        match uid {
            Some(uid) if self.allowed.contains(&uid) => Ok(req),
            Some(uid) => {
                tracing::warn!(uid, "admin API call refused: uid not allowed");
                Err(Status::permission_denied(format!(
                    "uid {uid} may not use the admin API (allowed: {:?})",
                    self.allowed
                )))
            }
            None => Err(Status::permission_denied(
                "admin API caller has no peer credentials",
            )),
        }
    }
}

/// The service wrapped in its uid guard. `allowed` are the admitted uids.
pub fn service(ca: Arc<Ca>, allowed: Vec<u32>) -> InterceptedService<AdminServer<AdminApi>, UidGuard> {
    AdminServer::with_interceptor(
        AdminApi { ca },
        UidGuard {
            allowed: Arc::new(allowed),
        },
    )
}

/// Binds the admin socket: creates its folder (0700), replaces a stale socket file, and sets the file mode to
/// 0600 (0666 when other uids are admitted: the uid guard is then the gate).
pub fn bind(path: &Path, others_allowed: bool) -> std::io::Result<UnixListener> {
    let mode = if others_allowed { 0o666 } else { 0o600 };
    UnixListener::from_std(trustline_identity::uds::bind(path, 0o700, mode)?)
}

impl AdminApi {
    fn fail(&self, e: CaError) -> Status {
        self.ca.metrics.error(e.kind());
        e.into()
    }
}

fn entry_request(spec: pb::EntrySpec) -> EntryRequest {
    EntryRequest {
        spiffe_id: spec.spiffe_id,
        parent_id: spec.parent_id,
        selectors: spec.selectors,
        x509_svid_ttl: spec.x509_svid_ttl,
        jwt_svid_ttl: spec.jwt_svid_ttl,
        dns_names: spec.dns_names,
        admin: spec.admin,
    }
}

fn ttl(field: &'static str, secs: i64, default: Duration) -> Result<Duration, CaError> {
    match secs {
        0 => Ok(default),
        s if s > 0 && s <= crate::service::MAX_SVID_TTL.as_secs() as i64 => Ok(Duration::from_secs(s as u64)),
        s => Err(CaError::Invalid {
            field,
            value: s.to_string(),
            reason: "must be a positive number of seconds, at most 30 days".into(),
        }),
    }
}

fn key_to_pb(k: &crate::store::CaKeyRecord) -> pb::CaKey {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &k.public_key_spki);
    pb::CaKey {
        id: k.id.clone(),
        kind: k.kind.as_str().to_owned(),
        state: match k.state {
            KeyState::Prepared => "prepared",
            KeyState::Active => "active",
            KeyState::Old => "old",
            KeyState::Retired => "retired",
        }
        .to_owned(),
        key_type: k.key_type.clone(),
        not_before: k.not_before,
        not_after: k.not_after,
        created_at: k.created_at,
        activated_at: k.activated_at.unwrap_or(0),
        retired_at: k.retired_at.unwrap_or(0),
        certificate: k.certificate.clone().unwrap_or_default(),
        public_key_sha256: digest.as_ref().iter().map(|b| format!("{b:02x}")).collect(),
    }
}

#[tonic::async_trait]
impl Admin for AdminApi {
    async fn create_entry(
        &self,
        req: Request<pb::CreateEntryRequest>,
    ) -> Result<Response<apb::Entry>, Status> {
        let spec = req
            .into_inner()
            .spec
            .ok_or_else(|| Status::invalid_argument("spec is required"))?;
        let e = self
            .ca
            .create_entry(&entry_request(spec))
            .await
            .map_err(|e| self.fail(e))?;
        Ok(Response::new(entry_to_pb(&e)))
    }

    async fn update_entry(
        &self,
        req: Request<pb::UpdateEntryRequest>,
    ) -> Result<Response<apb::Entry>, Status> {
        let r = req.into_inner();
        let cur = self
            .ca
            .store
            .get_entry(&r.id)
            .await
            .map_err(|e| self.fail(e.into()))?
            .ok_or_else(|| self.fail(StoreError::EntryNotFound(r.id.clone()).into()))?;
        let merged = EntryRequest {
            spiffe_id: r.spiffe_id.unwrap_or(cur.spiffe_id),
            parent_id: r.parent_id.unwrap_or(cur.parent_id),
            selectors: if r.replace_selectors {
                r.selectors
            } else {
                cur.selectors.iter().map(ToString::to_string).collect()
            },
            x509_svid_ttl: r.x509_svid_ttl.unwrap_or(cur.x509_svid_ttl),
            jwt_svid_ttl: r.jwt_svid_ttl.unwrap_or(cur.jwt_svid_ttl),
            dns_names: if r.replace_dns_names {
                r.dns_names
            } else {
                cur.dns_names
            },
            admin: r.admin.unwrap_or(cur.admin),
        };
        let e = self
            .ca
            .update_entry(&r.id, &merged)
            .await
            .map_err(|e| self.fail(e))?;
        Ok(Response::new(entry_to_pb(&e)))
    }

    async fn get_entry(&self, req: Request<pb::GetEntryRequest>) -> Result<Response<apb::Entry>, Status> {
        let id = req.into_inner().id;
        let e = self
            .ca
            .store
            .get_entry(&id)
            .await
            .map_err(|e| self.fail(e.into()))?
            .ok_or_else(|| self.fail(StoreError::EntryNotFound(id).into()))?;
        Ok(Response::new(entry_to_pb(&e)))
    }

    async fn list_entries(
        &self,
        req: Request<pb::ListEntriesRequest>,
    ) -> Result<Response<pb::ListEntriesResponse>, Status> {
        let r = req.into_inner();
        let selector = if r.selector.is_empty() {
            None
        } else {
            Some(r.selector.parse().map_err(|e| self.fail(CaError::Selector(e)))?)
        };
        let filter = EntryFilter {
            spiffe_id: Some(r.spiffe_id).filter(|s| !s.is_empty()),
            parent_id: Some(r.parent_id).filter(|s| !s.is_empty()),
            selector,
        };
        let entries = self.ca.list_entries(&filter).await.map_err(|e| self.fail(e))?;
        Ok(Response::new(pb::ListEntriesResponse {
            entries: entries.iter().map(entry_to_pb).collect(),
        }))
    }

    async fn delete_entry(
        &self,
        req: Request<pb::DeleteEntryRequest>,
    ) -> Result<Response<pb::DeleteEntryResponse>, Status> {
        self.ca
            .delete_entry(&req.into_inner().id)
            .await
            .map_err(|e| self.fail(e))?;
        Ok(Response::new(pb::DeleteEntryResponse {}))
    }

    async fn generate_join_token(
        &self,
        req: Request<pb::GenerateJoinTokenRequest>,
    ) -> Result<Response<pb::JoinToken>, Status> {
        let r = req.into_inner();
        let ttl = match r.ttl {
            0 => None,
            s if s > 0 => Some(Duration::from_secs(s as u64)),
            s => {
                return Err(self.fail(CaError::Invalid {
                    field: "ttl",
                    value: s.to_string(),
                    reason: "must be positive".into(),
                }))
            }
        };
        let jt = self
            .ca
            .generate_join_token(ttl, Some(r.spiffe_id.as_str()))
            .await
            .map_err(|e| self.fail(e))?;
        Ok(Response::new(pb::JoinToken {
            token: jt.token,
            expires_at: jt.expires_at,
            agent_spiffe_id: jt.agent_spiffe_id,
        }))
    }

    async fn get_bundle(&self, _req: Request<pb::GetBundleRequest>) -> Result<Response<apb::Bundle>, Status> {
        Ok(Response::new(bundle_to_pb(
            self.ca.td.as_str(),
            &self.ca.authority.bundle(),
        )))
    }

    async fn rotate_ca(&self, req: Request<pb::RotateCaRequest>) -> Result<Response<pb::CaStatus>, Status> {
        let kinds = match req.into_inner().kind.as_str() {
            "" | "all" => vec![KeyKind::X509, KeyKind::Jwt],
            "x509" => vec![KeyKind::X509],
            "jwt" => vec![KeyKind::Jwt],
            other => {
                return Err(self.fail(CaError::Invalid {
                    field: "kind",
                    value: other.to_owned(),
                    reason: "must be x509, jwt or all".into(),
                }))
            }
        };
        let events = self
            .ca
            .authority
            .rotate(&kinds, now_unix())
            .await
            .map_err(|e| self.fail(e.into()))?;
        let message = if events.is_empty() {
            "nothing changed (another replica may have rotated first)".to_owned()
        } else {
            events
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        };
        Ok(Response::new(pb::CaStatus {
            keys: self.ca.authority.keys().iter().map(key_to_pb).collect(),
            message,
            backend: self.ca.authority.backend_name().into(),
        }))
    }

    async fn get_ca_status(
        &self,
        _req: Request<pb::GetCaStatusRequest>,
    ) -> Result<Response<pb::CaStatus>, Status> {
        Ok(Response::new(pb::CaStatus {
            keys: self.ca.authority.keys().iter().map(key_to_pb).collect(),
            message: String::new(),
            backend: self.ca.authority.backend_name().into(),
        }))
    }

    async fn list_agents(
        &self,
        _req: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let agents = self.ca.list_agents().await.map_err(|e| self.fail(e))?;
        Ok(Response::new(pb::ListAgentsResponse {
            agents: agents
                .into_iter()
                .map(|n| pb::AttestedAgent {
                    spiffe_id: n.spiffe_id,
                    attestation_type: n.attestation_type,
                    serial: n.serial,
                    expires_at: n.expires_at,
                    created_at: n.created_at,
                    updated_at: n.updated_at,
                })
                .collect(),
        }))
    }

    async fn evict_agent(
        &self,
        req: Request<pb::EvictAgentRequest>,
    ) -> Result<Response<pb::EvictAgentResponse>, Status> {
        self.ca
            .evict_agent(&req.into_inner().spiffe_id)
            .await
            .map_err(|e| self.fail(e))?;
        Ok(Response::new(pb::EvictAgentResponse {}))
    }

    async fn list_issued(
        &self,
        req: Request<pb::ListIssuedRequest>,
    ) -> Result<Response<pb::ListIssuedResponse>, Status> {
        let r = req.into_inner();
        if r.limit < 0 {
            return Err(self.fail(CaError::Invalid {
                field: "limit",
                value: r.limit.to_string(),
                reason: "must be positive".into(),
            }));
        }
        let filter = IssuedFilter {
            spiffe_id: Some(r.spiffe_id).filter(|s| !s.is_empty()),
            serial: Some(r.serial.to_ascii_lowercase()).filter(|s| !s.is_empty()),
            limit: r.limit,
        };
        let issued = self
            .ca
            .store
            .list_issued(&filter)
            .await
            .map_err(|e| self.fail(e.into()))?;
        Ok(Response::new(pb::ListIssuedResponse {
            issued: issued
                .into_iter()
                .map(|i| pb::Issued {
                    serial: i.serial,
                    spiffe_id: i.spiffe_id,
                    kind: i.kind.as_str().to_owned(),
                    issued_at: i.issued_at,
                    not_after: i.not_after,
                    signing_key_id: i.signing_key_id,
                    requested_by: i.requested_by,
                })
                .collect(),
        }))
    }

    async fn mint_x509svid(
        &self,
        req: Request<pb::MintX509svidRequest>,
    ) -> Result<Response<apb::X509svid>, Status> {
        let r = req.into_inner();
        let id =
            parse_workload_id("spiffe_id", &r.spiffe_id, &self.ca.td).map_err(|e| self.fail(e.into()))?;
        // An X.509-SVID for an agent's ID would authenticate to the agent API as that node.
        self.ca
            .check_not_agent_id("spiffe_id", &id.to_string())
            .await
            .map_err(|e| self.fail(e))?;
        for d in &r.dns_names {
            crate::x509::check_dns_name(d).map_err(|e| self.fail(e.into()))?;
        }
        let ttl = ttl("ttl", r.ttl, self.ca.defaults.x509_ttl).map_err(|e| self.fail(e))?;
        let mut out = self
            .ca
            .issue_x509(
                vec![X509Request {
                    csr: r.csr,
                    spiffe_id: id.clone(),
                    dns_names: r.dns_names,
                    ttl,
                }],
                "admin",
            )
            .await;
        let svid = out
            .pop()
            .ok_or_else(|| Status::internal("nothing issued"))?
            .map_err(|e| self.fail(e))?;
        Ok(Response::new(svid_to_pb(&id.to_string(), &svid)))
    }

    async fn mint_jwtsvid(
        &self,
        req: Request<pb::MintJwtsvidRequest>,
    ) -> Result<Response<apb::NewJwtsvidResponse>, Status> {
        let r = req.into_inner();
        let id = parse_spiffe_id("spiffe_id", &r.spiffe_id).map_err(|e| self.fail(e.into()))?;
        let id =
            parse_workload_id("spiffe_id", &id.to_string(), &self.ca.td).map_err(|e| self.fail(e.into()))?;
        self.ca
            .check_not_agent_id("spiffe_id", &id.to_string())
            .await
            .map_err(|e| self.fail(e))?;
        let ttl = ttl("ttl", r.ttl, self.ca.defaults.jwt_ttl).map_err(|e| self.fail(e))?;
        let minted = self
            .ca
            .mint_jwt(&id, &r.audience, ttl, "admin")
            .await
            .map_err(|e| self.fail(e))?;
        Ok(Response::new(apb::NewJwtsvidResponse {
            token: minted.token,
            expires_at: minted.expires_at,
            spiffe_id: id.to_string(),
        }))
    }

    async fn health(&self, _req: Request<pb::HealthRequest>) -> Result<Response<pb::HealthResponse>, Status> {
        let ready = self
            .ca
            .authority
            .x509_ca_not_after()
            .is_some_and(|t| t > now_unix());
        let store_ok = self.ca.store.entries_revision().await;
        let (ready, message) = match store_ok {
            Ok(_) if ready => (true, "serving".to_owned()),
            Ok(_) => (false, "no active X.509 CA key".to_owned()),
            Err(e) => (false, format!("store unavailable: {e}")),
        };
        Ok(Response::new(pb::HealthResponse {
            ready,
            trust_domain: self.ca.td.to_string(),
            message,
        }))
    }
}

/// Connects an admin client to the CA's Unix socket.
pub async fn connect(
    path: &Path,
) -> Result<pb::admin_client::AdminClient<tonic::transport::Channel>, tonic::transport::Error> {
    let path = path.to_owned();
    let channel = tonic::transport::Endpoint::from_static("http://trustline-ca.admin")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await?;
    Ok(pb::admin_client::AdminClient::new(channel))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    /// The guard admits only configured uids, using the kernel-reported credentials tonic attaches to each
    /// request on a Unix socket (real SO_PEERCRED from a socketpair, not a mock).
    #[tokio::test]
    async fn uid_guard_admits_only_allowed_uids() {
        let (a, _b) = tokio::net::UnixStream::pair().unwrap();
        let cred = a.peer_cred().unwrap();
        let info = UdsConnectInfo {
            peer_addr: None,
            peer_cred: Some(cred),
        };
        let req = |info: Option<UdsConnectInfo>| {
            let mut r = Request::new(());
            if let Some(i) = info {
                r.extensions_mut().insert(i);
            }
            r
        };
        let mut allowed = UidGuard {
            allowed: Arc::new(vec![cred.uid()]),
        };
        assert!(allowed.call(req(Some(info.clone()))).is_ok());
        let mut other = UidGuard {
            allowed: Arc::new(vec![cred.uid().wrapping_add(4242)]),
        };
        let err = other.call(req(Some(info))).unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(
            err.message().contains(&format!("uid {}", cred.uid())),
            "{}",
            err.message()
        );
        assert!(allowed.call(req(None)).is_err(), "no credentials, no access");
    }

    #[test]
    fn bind_refuses_a_live_socket_and_replaces_a_stale_one() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            use std::os::unix::fs::PermissionsExt;
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("sub/admin.sock");
            let l = bind(&path, false).unwrap();
            assert_eq!(
                std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
            assert_eq!(
                std::fs::metadata(dir.path().join("sub"))
                    .unwrap()
                    .permissions()
                    .mode()
                    & 0o777,
                0o700
            );
            assert!(bind(&path, false).is_err(), "a live CA owns it");
            drop(l);
            bind(&path, false).unwrap();
        });
    }
}
