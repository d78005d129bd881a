//! `trustline-ca run`: opens the store and keys, starts the agent API, the admin socket and the health/metrics
//! listener, and runs the rotation loop until shutdown.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use trustline_hsm::{KeyStore, SoftwareKeyStore};
use trustline_identity::spiffe_id::{ca_server_id, parse_spiffe_id};
use trustline_identity::tls::{self, RotatingCert, SpiffeClientVerifier, TrustBundle};

use crate::authority::{Authority, Settings, Upstream};
use crate::config::{StoreSection, Validated};
use crate::metrics::Metrics;
use crate::service::{Ca, Defaults, X509Request};
use crate::store::{Store, StoreConfig};
use crate::x509::{now_unix, HsmKey};

/// Environment variable holding the passphrase that seals software keys.
pub const PASSPHRASE_ENV: &str = "TRUSTLINE_CA_PASSPHRASE";

/// The CA could not start or stopped with an error. Each variant names the component.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// Key custody setup failed.
    #[error("keys: {0}")]
    Keys(String),
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    /// The authority failed.
    #[error("authority: {0}")]
    Authority(#[from] crate::authority::AuthorityError),
    /// The service failed.
    #[error("{0}")]
    Ca(#[from] crate::service::CaError),
    /// TLS setup failed.
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    /// A listener could not be opened.
    #[error("{what} {addr}: {source}")]
    Listen {
        /// Which listener.
        what: &'static str,
        /// Where.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A server task failed.
    #[error("{0}")]
    Serve(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ServerError + '_ {
    move |source| ServerError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The operator's existing token keys, if any (`[keys.pkcs11] x509_key_label`, `jwt_key_label`).
fn existing_keys(cfg: &Validated) -> crate::authority::ExistingKeys {
    let p = cfg
        .raw
        .keys
        .pkcs11
        .as_ref()
        .filter(|_| cfg.raw.keys.backend == "pkcs11");
    let label = |l: Option<&String>| l.map(|l| trustline_hsm::KeyRef::new(format!("pkcs11:v1:{l}")));
    crate::authority::ExistingKeys {
        x509: label(p.and_then(|p| p.x509_key_label.as_ref())),
        jwt: label(p.and_then(|p| p.jwt_key_label.as_ref())),
    }
}

/// Opens the key store named by the config.
pub fn open_keystore(cfg: &Validated) -> Result<KeyStore, ServerError> {
    let k = &cfg.raw.keys;
    if let (true, Some(p)) = (k.backend == "pkcs11", &k.pkcs11) {
        let pin = match (&p.pin_file, &p.pin_env) {
            (Some(f), _) => trustline_hsm::pkcs11::pin_from_file(f)
                .map_err(|e| ServerError::Keys(format!("keys.pkcs11.pin_file: {e}")))?,
            (None, Some(var)) => std::env::var(var).map_err(|_| {
                ServerError::Keys(format!(
                    "keys.pkcs11.pin_env: environment variable {var} is not set"
                ))
            })?,
            (None, None) => return Err(ServerError::Keys("keys.pkcs11: no PIN source".into())),
        };
        let store = trustline_hsm::Pkcs11KeyStore::open(&trustline_hsm::Pkcs11Config {
            module: p.module.clone(),
            token_label: p.token_label.clone(),
            pin,
        })
        .map_err(|e| ServerError::Keys(format!("keys.pkcs11: {e}")))?;
        // RSA-PSS is optional in PKCS#11: refuse at startup rather than at the first JWT.
        if cfg.jwt_rsa_pss && k.jwt_key_type.starts_with("rsa-") {
            let pss = trustline_hsm::SignatureAlgorithm::RsaPssSha256;
            if !store
                .supports(pss)
                .map_err(|e| ServerError::Keys(format!("keys.pkcs11: {e}")))?
            {
                return Err(ServerError::Keys(format!(
                    "keys.jwt_rsa_padding: \"pss\" needs CKM_SHA256_RSA_PKCS_PSS, which token {:?} does not offer (use \"pkcs1\")",
                    p.token_label
                )));
            }
        }
        return Ok(KeyStore::Pkcs11(store));
    }
    if let (true, Some(t)) = (k.backend == "tpm", &k.tpm) {
        return KeyStore::open_tpm(&trustline_hsm::TpmConfig { tcti: t.tcti.clone() })
            .map_err(|e| ServerError::Keys(format!("keys.tpm: {e}")));
    }
    let soft = if let Some(path) = &k.key_file {
        SoftwareKeyStore::from_key_file(path).map_err(|e| ServerError::Keys(e.to_string()))?
    } else if let Some(path) = &k.passphrase_file {
        let pass = trustline_hsm::read_secret_file(path)
            .map_err(|e| ServerError::Keys(format!("keys.passphrase_file: {e}")))?;
        SoftwareKeyStore::from_passphrase(&pass)
            .map_err(|e| ServerError::Keys(format!("keys.passphrase_file {}: {e}", path.display())))?
    } else if let Ok(pass) = std::env::var(PASSPHRASE_ENV) {
        SoftwareKeyStore::from_passphrase(&pass)
            .map_err(|e| ServerError::Keys(format!("{PASSPHRASE_ENV}: {e}")))?
    } else {
        return Err(ServerError::Keys(format!(
            "no sealing secret for software keys: set keys.key_file or keys.passphrase_file, or {PASSPHRASE_ENV}"
        )));
    };
    if k.backend == "sm2" {
        // An SM-mode trust domain: keys at rest under SM4-GCM, and TLS with the SM-only provider.
        let soft = soft
            .with_sm4_sealing()
            .map_err(|e| ServerError::Keys(format!("keys.backend: {e}")))?;
        trustline_identity::tls::enable_sm().map_err(|e| ServerError::Keys(format!("keys.backend: {e}")))?;
        return Ok(KeyStore::Software(soft));
    }
    Ok(KeyStore::Software(soft))
}

/// Opens the store named by the config.
pub async fn open_store(cfg: &Validated) -> Result<Store, ServerError> {
    let sc = match &cfg.raw.store {
        StoreSection::Sqlite { path } => StoreConfig::Sqlite {
            path: path.clone().unwrap_or_else(|| cfg.raw.data_dir.join("ca.db")),
        },
        StoreSection::Postgres {
            conninfo,
            password_file,
            tls_ca_file,
        } => {
            let mut conninfo = conninfo.clone();
            if let Some(pf) = password_file {
                let pw = trustline_hsm::read_secret_file(pf)
                    .map_err(|e| ServerError::Keys(format!("store.password_file: {e}")))?;
                let pw = pw.replace('\\', "\\\\").replace('\'', "\\'");
                conninfo.push_str(&format!(" password='{pw}'"));
            }
            let tls =
                match tls_ca_file {
                    Some(p) => {
                        let pem = std::fs::read_to_string(p).map_err(io_err(p))?;
                        Some(trustline_identity::pgtls::PgTls::from_pem(&pem).map_err(|e| {
                            ServerError::Keys(format!("store.tls_ca_file {}: {e}", p.display()))
                        })?)
                    }
                    None => None,
                };
            StoreConfig::Postgres { conninfo, tls }
        }
    };
    Ok(Store::open(&sc).await?)
}

fn load_upstream(cfg: &Validated) -> Result<Option<Upstream>, ServerError> {
    let (Some(cert_path), Some(key_path)) = (&cfg.raw.ca.upstream_cert, &cfg.raw.ca.upstream_key) else {
        return Ok(None);
    };
    let up_err = |path: &Path, reason: String| {
        ServerError::Authority(crate::authority::AuthorityError::Upstream {
            path: path.display().to_string(),
            reason,
        })
    };
    let cert_pem = std::fs::read_to_string(cert_path).map_err(io_err(cert_path))?;
    let cert_der = trustline_identity::bundle::certs_from_pem(&cert_pem)
        .map_err(|e| up_err(cert_path, e.to_string()))?
        .remove(0);
    let key_pem = std::fs::read_to_string(key_path).map_err(io_err(key_path))?;
    let signer =
        trustline_hsm::load_private_key_pem(&key_pem).map_err(|e| up_err(key_path, e.to_string()))?;
    let (_, parsed) =
        x509_parser::parse_x509_certificate(&cert_der).map_err(|e| up_err(cert_path, e.to_string()))?;
    if parsed.public_key().raw != signer.public_key_spki_der().as_slice() {
        return Err(up_err(
            key_path,
            "private key does not match ca.upstream_cert".into(),
        ));
    }
    if !parsed.is_ca() {
        return Err(up_err(
            cert_path,
            "certificate is not a CA (basicConstraints cA=false)".into(),
        ));
    }
    let not_after = parsed.validity().not_after.timestamp();
    let issuer = rcgen::Issuer::from_ca_cert_der(&cert_der.as_slice().into(), HsmKey::new(signer))
        .map_err(|e| up_err(cert_path, e.to_string()))?;
    let roots = match &cfg.raw.ca.upstream_bundle {
        Some(p) => {
            let pem = std::fs::read_to_string(p).map_err(io_err(p))?;
            trustline_identity::bundle::certs_from_pem(&pem).map_err(|e| up_err(p, e.to_string()))?
        }
        None => vec![cert_der.clone()],
    };
    Ok(Some(Upstream {
        issuer,
        cert_der,
        roots,
        not_after,
    }))
}

/// A running CA's addresses, for callers that start it in-process.
#[derive(Debug, Clone)]
pub struct Running {
    /// Bound agent API address.
    pub agent_addr: SocketAddr,
    /// Admin socket path.
    pub admin_socket: PathBuf,
    /// Bound health address.
    pub health_addr: Option<SocketAddr>,
}

/// Issues (or re-issues) the CA's own serving SVID into `cert`.
async fn refresh_server_cert(ca: &Ca, cert: &RotatingCert) -> Result<i64, ServerError> {
    let id_str = ca_server_id(&ca.td);
    let id = parse_spiffe_id("ca id", &id_str).map_err(crate::service::CaError::from)?;
    let (csr, key_der) = if trustline_identity::tls::sm_enabled() {
        let key = zeroize::Zeroizing::new(
            trustline_hsm::sm::generate_pkcs8().map_err(|e| ServerError::Keys(e.to_string()))?,
        );
        let csr = trustline_hsm::sm::csr(&key, std::slice::from_ref(&id_str), &[], None)
            .map_err(|e| ServerError::Keys(e.to_string()))?;
        (csr, key)
    } else {
        classic_server_csr(&id_str)?
    };
    let mut out = ca
        .issue_x509(
            vec![X509Request {
                csr,
                spiffe_id: id,
                dns_names: Vec::new(),
                ttl: ca.defaults.x509_ttl,
            }],
            "ca",
        )
        .await;
    let svid = out
        .pop()
        .ok_or_else(|| ServerError::Serve("no server SVID".into()))??;
    cert.set(svid.chain.clone(), &key_der)?;
    Ok(svid.not_after)
}

/// A P-256 key (PKCS#8) and a CSR for the CA's serving SVID.
fn classic_server_csr(id_str: &str) -> Result<(Vec<u8>, zeroize::Zeroizing<Vec<u8>>), ServerError> {
    let key = rcgen::KeyPair::generate().map_err(|e| ServerError::Keys(e.to_string()))?;
    let mut params =
        rcgen::CertificateParams::new(Vec::<String>::new()).map_err(|e| ServerError::Keys(e.to_string()))?;
    params.subject_alt_names = vec![rcgen::SanType::URI(
        id_str
            .to_owned()
            .try_into()
            .map_err(|e: rcgen::Error| ServerError::Keys(e.to_string()))?,
    )];
    let csr = params
        .serialize_request(&key)
        .map_err(|e| ServerError::Keys(e.to_string()))?;
    Ok((csr.der().to_vec(), zeroize::Zeroizing::new(key.serialize_der())))
}

/// How long in-flight calls get to finish after shutdown is signalled.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(5);

/// Starts everything; returns once listeners are bound, with a future that runs until `shutdown` resolves.
pub async fn start(
    cfg: Validated,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(Running, tokio::task::JoinHandle<Result<(), ServerError>>), ServerError> {
    // The data folder and any missing parent are created 0700 whatever the umask; an existing one is left as is
    // (the database files in it are checked by the store).
    let data_dir = cfg.raw.data_dir.clone();
    crate::private_files::create_dir_all(&data_dir).map_err(io_err(&data_dir))?;
    let keys = open_keystore(&cfg)?;
    let store = Arc::new(open_store(&cfg).await?);
    let upstream = load_upstream(&cfg)?;
    let settings = Settings {
        trust_domain: cfg.trust_domain.clone(),
        organization: cfg.raw.ca.organization.clone(),
        ca_ttl: cfg.raw.ca.ttl,
        x509_key_type: cfg.x509_key_type,
        jwt_key_type: cfg.jwt_key_type,
        jwt_rsa_pss: cfg.jwt_rsa_pss,
        upstream,
        existing_keys: existing_keys(&cfg),
    };
    let authority = Authority::open(settings, store.clone(), keys).await?;
    let metrics = Metrics::new();
    let defaults = Defaults {
        x509_ttl: cfg.raw.svid.x509_ttl,
        jwt_ttl: cfg.raw.svid.jwt_ttl,
        agent_ttl: cfg.raw.svid.agent_ttl,
        join_token_ttl: cfg.raw.svid.join_token_ttl,
    };
    let devid = match &cfg.raw.node_attestation.tpm_devid {
        Some(t) => Some(
            crate::devid::DevIdVerifier::load(&t.devid_ca)
                .map_err(|e| ServerError::Ca(crate::service::CaError::DevId(e)))?,
        ),
        None => None,
    };
    let ca = Ca::new(store.clone(), authority.clone(), defaults, metrics.clone(), devid).await?;

    // TLS for the agent API: our own SVID, clients verified against the live bundle.
    let bundle = TrustBundle::new(cfg.trust_domain.clone(), &authority.bundle().x509_authorities)?;
    let server_cert = Arc::new(RotatingCert::default());
    let mut cert_expiry = refresh_server_cert(&ca, &server_cert).await?;
    let mut cert_signed_by = authority.active_x509_key_id();
    let verifier = Arc::new(SpiffeClientVerifier::new(bundle.clone(), false));
    let tls_config = tls::server_config(server_cert.clone(), verifier)?;
    let acceptor = TlsAcceptor::from(Arc::new(tls_config));
    let agent_listener = TcpListener::bind(cfg.raw.server.agent_listen)
        .await
        .map_err(|source| ServerError::Listen {
            what: "agent API",
            addr: cfg.raw.server.agent_listen.to_string(),
            source,
        })?;
    let agent_addr = agent_listener
        .local_addr()
        .map_err(|source| ServerError::Listen {
            what: "agent API",
            addr: cfg.raw.server.agent_listen.to_string(),
            source,
        })?;

    // Admin socket.
    let mut allowed = cfg.raw.server.admin_uids.clone();
    let own_uid = current_uid();
    allowed.push(own_uid);
    allowed.sort_unstable();
    allowed.dedup();
    let admin_listener = crate::admin_api::bind(&cfg.admin_socket, allowed.len() > 1).map_err(|source| {
        ServerError::Listen {
            what: "admin socket",
            addr: cfg.admin_socket.display().to_string(),
            source,
        }
    })?;

    // Health and metrics.
    let health = match cfg.raw.server.health_listen {
        Some(addr) => {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::Listen {
                    what: "health listener",
                    addr: addr.to_string(),
                    source,
                })?;
            let bound = l.local_addr().map_err(|source| ServerError::Listen {
                what: "health listener",
                addr: addr.to_string(),
                source,
            })?;
            Some((l, bound))
        }
        None => None,
    };

    let running = Running {
        agent_addr,
        admin_socket: cfg.admin_socket.clone(),
        health_addr: health.as_ref().map(|(_, a)| *a),
    };

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|v| *v).await;
        }
    };

    let agent_task = {
        let svc = crate::agent_api::AgentApi::service(ca.clone());
        let inc = crate::agent_api::incoming(agent_listener, acceptor);
        let stop = stopped();
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(Duration::from_secs(30)))
                .add_service(svc)
                .serve_with_incoming_shutdown(inc, stop)
                .await
                .map_err(|e| ServerError::Serve(format!("agent API: {e}")))
        })
    };
    let admin_task = {
        let svc = crate::admin_api::service(ca.clone(), allowed);
        let inc = tokio_stream::wrappers::UnixListenerStream::new(admin_listener);
        let stop = stopped();
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(inc, stop)
                .await
                .map_err(|e| ServerError::Serve(format!("admin API: {e}")))
        })
    };
    let health_task = health.map(|(listener, _)| {
        let ca = ca.clone();
        let stop = stopped();
        tokio::spawn(async move {
            let ready_ca = ca.clone();
            let app = axum::Router::new()
                .route("/healthz", get(|| async { "ok\n" }))
                .route(
                    "/readyz",
                    get(move || {
                        let ca = ready_ca.clone();
                        async move {
                            let ok = ca.authority.x509_ca_not_after().is_some_and(|t| t > now_unix())
                                && ca.store.entries_revision().await.is_ok();
                            if ok {
                                (axum::http::StatusCode::OK, "ready\n")
                            } else {
                                (axum::http::StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                            }
                        }
                    }),
                )
                .route(
                    "/metrics",
                    get(move || {
                        let m = ca.metrics.clone();
                        async move {
                            (
                                [(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                                m.encode(),
                            )
                        }
                    }),
                );
            axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .await
                .map_err(|e| ServerError::Serve(format!("health listener: {e}")))
        })
    });

    // Background: rotation, replica sync, server SVID renewal, token pruning.
    let bg_task = {
        let ca = ca.clone();
        let stop = stopped();
        tokio::spawn(async move {
            let mut bundle_rx = ca.authority.subscribe();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut n: u64 = 0;
            tokio::pin!(stop);
            loop {
                tokio::select! {
                    _ = &mut stop => return,
                    _ = tick.tick() => {}
                    r = bundle_rx.changed() => { if r.is_err() { return } }
                }
                n += 1;
                let now = now_unix();
                if let Err(e) = ca.authority.tick(now).await {
                    tracing::error!(error = %e, "rotation step failed");
                }
                if let Err(e) = ca.poll_entries_revision().await {
                    tracing::warn!(error = %e, "could not poll entries revision");
                }
                let b = ca.authority.bundle();
                ca.metrics.set_bundle_sequence(b.sequence);
                if let Err(e) = bundle.update(&b.x509_authorities) {
                    tracing::error!(error = %e, "bundle unusable for TLS verification");
                }
                // Renew our serving SVID at half life, or when the signing key changed.
                let signing_key = ca.authority.active_x509_key_id();
                if now >= cert_expiry - (ca.defaults.x509_ttl.as_secs() as i64) / 2
                    || signing_key != cert_signed_by
                {
                    match refresh_server_cert(&ca, &server_cert).await {
                        Ok(exp) => {
                            cert_expiry = exp;
                            cert_signed_by = signing_key;
                        }
                        Err(e) => tracing::error!(error = %e, "could not renew the CA's serving SVID"),
                    }
                }
                if n.is_multiple_of(60) {
                    if let Err(e) = ca.store.prune_join_tokens(now).await {
                        tracing::warn!(error = %e, "could not prune expired join tokens");
                    }
                }
            }
        })
    };

    let join = tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
        let mut first_err = None;
        // Graceful shutdown lets in-flight calls finish, but an agent's update stream never does: after
        // SHUTDOWN_DRAIN the servers are dropped with their connections (agents reconnect to the next CA), so
        // SIGTERM always stops the CA.
        for (name, t) in [("agent API", agent_task), ("admin API", admin_task)] {
            let abort = t.abort_handle();
            match tokio::time::timeout(SHUTDOWN_DRAIN, t).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => first_err = first_err.or(Some(e)),
                Ok(Err(e)) => first_err = first_err.or(Some(ServerError::Serve(format!("{name}: {e}")))),
                Err(_) => {
                    abort.abort();
                    tracing::info!(
                        server = name,
                        drain = ?SHUTDOWN_DRAIN,
                        "connections still open after the drain (agents' update streams): closed"
                    );
                }
            }
        }
        if let Some(h) = health_task {
            let _ = h.await;
        }
        let _ = bg_task.await;
        let _ = std::fs::remove_file(&cfg.admin_socket);
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    });
    Ok((running, join))
}

/// The effective uid of this process (the owner of `/proc/self`), without `unsafe` FFI.
fn current_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(0)
}
