//! The sidecar's own identity, streamed from the identity agent's SPIFFE Workload API.
//!
//! [`SvidSource`] keeps one `FetchX509SVID` stream open. Every message (first SVID, rotation, bundle change)
//! swaps the certificate and key into a [`RotatingCert`] and the roots into a [`TrustBundle`] in place, so new
//! handshakes use them at once and existing connections carry on. Until the first SVID arrives the certificate is
//! empty and handshakes fail closed. A broken stream is reopened with backoff; the last SVID stays in use.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use std::collections::HashMap;
use std::sync::RwLock;

use tokio::sync::watch;
use trustline_identity::bundle::JwkSet;
use trustline_identity::spiffe_id::SpiffeId;
use trustline_identity::tls::{RotatingCert, TrustBundle};
use trustline_proto::workload as pb;

/// Why an SVID from the Workload API could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// The socket could not be reached.
    #[error("Workload API at {path}: {reason}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The agent answered with an error.
    #[error("Workload API: {0}")]
    Status(String),
    /// The response is unusable.
    #[error("Workload API sent an unusable SVID: {0}")]
    Invalid(String),
}

type StreamFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), SourceError>> + Send>>;

/// What the sidecar currently presents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Current {
    /// Our SPIFFE ID.
    pub spiffe_id: String,
    /// Leaf certificate (DER).
    pub leaf: Vec<u8>,
    /// Number of bundle roots.
    pub roots: usize,
    /// The leaf's notAfter (unix seconds).
    pub not_after: i64,
}

/// Our SVID and trust bundle, kept current from the Workload API.
pub struct SvidSource {
    /// The certificate and key our TLS configs present.
    pub cert: Arc<RotatingCert>,
    /// The roots our TLS configs verify peers against (set once the first SVID arrives).
    bundle: watch::Sender<Option<TrustBundle>>,
    current: watch::Sender<Option<Current>>,
    /// JWT bundles by trust domain name (from `FetchJWTBundles`).
    jwt: RwLock<HashMap<String, Arc<JwkSet>>>,
}

impl std::fmt::Debug for SvidSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SvidSource")
            .field("current", &*self.current.borrow())
            .finish()
    }
}

/// Splits concatenated DER certificates.
fn split_ders(concat: &[u8]) -> Result<Vec<Vec<u8>>, SourceError> {
    let mut out = Vec::new();
    let mut rest = concat;
    while !rest.is_empty() {
        let (r, _) = x509_parser::parse_x509_certificate(rest)
            .map_err(|e| SourceError::Invalid(format!("certificate: {e}")))?;
        out.push(rest[..rest.len() - r.len()].to_vec());
        rest = r;
    }
    Ok(out)
}

async fn connect(
    path: &std::path::Path,
) -> Result<pb::spiffe_workload_api_client::SpiffeWorkloadApiClient<tonic::transport::Channel>, SourceError> {
    let p = path.to_owned();
    let ch = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let p = p.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(p).await?,
                ))
            }
        }))
        .await
        .map_err(|e| SourceError::Connect {
            path: path.to_owned(),
            reason: std::error::Error::source(&e).map_or_else(|| e.to_string(), |s| s.to_string()),
        })?;
    Ok(pb::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(ch))
}

/// A Workload API request with the header the spec requires.
fn workload_request<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    req
}

fn status_error(s: tonic::Status) -> SourceError {
    SourceError::Status(format!("{:?}: {}", s.code(), s.message()))
}

impl SvidSource {
    /// Starts streaming from the Workload API socket at `socket`; returns at once (fail closed until the first
    /// SVID). The background task lives as long as the returned source.
    pub fn start(socket: PathBuf) -> Arc<Self> {
        let (bundle, _) = watch::channel(None);
        let (current, _) = watch::channel(None);
        let src = Arc::new(Self {
            cert: Arc::new(RotatingCert::default()),
            bundle,
            current,
            jwt: RwLock::new(HashMap::new()),
        });
        src.spawn_stream(socket.clone(), "X.509-SVID", |src, socket| {
            Box::pin(async move { src.stream_once(&socket).await })
        });
        src.spawn_stream(socket, "JWT bundle", |src, socket| {
            Box::pin(async move { src.stream_jwt_bundles(&socket).await })
        });
        src
    }

    fn spawn_stream(
        self: &Arc<Self>,
        socket: PathBuf,
        what: &'static str,
        once: fn(Arc<Self>, PathBuf) -> StreamFuture,
    ) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                let Some(src) = weak.upgrade() else { return };
                let fut = once(src, socket.clone());
                match fut.await {
                    Ok(()) => backoff = Duration::from_millis(100),
                    Err(e) => {
                        tracing::warn!(error = %e, stream = what, "Workload API stream broke; keeping the current one")
                    }
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        });
    }

    async fn stream_jwt_bundles(&self, socket: &std::path::Path) -> Result<(), SourceError> {
        let mut client = connect(socket).await?;
        let mut stream = client
            .fetch_jwt_bundles(workload_request(pb::JwtBundlesRequest {}))
            .await
            .map_err(status_error)?
            .into_inner();
        while let Some(msg) = stream.message().await.map_err(status_error)? {
            let mut map = HashMap::new();
            for (td, json) in &msg.bundles {
                match JwkSet::parse(json) {
                    Ok(set) => {
                        map.insert(td.clone(), Arc::new(set));
                    }
                    Err(e) => {
                        tracing::error!(trust_domain = %td, error = %e, "ignoring an unusable JWT bundle")
                    }
                }
            }
            *self.jwt.write().unwrap_or_else(|p| p.into_inner()) = map;
        }
        Ok(())
    }

    /// The JWT bundle of `trust_domain`, once received.
    pub fn jwt_bundle(&self, trust_domain: &str) -> Option<Arc<JwkSet>> {
        self.jwt
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(trust_domain)
            .cloned()
    }

    async fn stream_once(&self, socket: &std::path::Path) -> Result<(), SourceError> {
        let mut client = connect(socket).await?;
        let mut stream = client
            .fetch_x509svid(workload_request(pb::X509svidRequest {}))
            .await
            .map_err(status_error)?
            .into_inner();
        while let Some(msg) = stream.message().await.map_err(status_error)? {
            if let Err(e) = self.apply(&msg) {
                tracing::error!(error = %e, "ignoring an unusable SVID update");
            }
        }
        Ok(())
    }

    fn apply(&self, msg: &pb::X509svidResponse) -> Result<(), SourceError> {
        let svid = msg
            .svids
            .first()
            .ok_or_else(|| SourceError::Invalid("no SVID in the response".into()))?;
        let id = SpiffeId::new(&svid.spiffe_id).map_err(|e| SourceError::Invalid(e.to_string()))?;
        let chain = split_ders(&svid.x509_svid)?;
        let roots = split_ders(&svid.bundle)?;
        let leaf = chain
            .first()
            .cloned()
            .ok_or_else(|| SourceError::Invalid("empty chain".into()))?;
        self.cert
            .set(chain, &svid.x509_svid_key)
            .map_err(|e| SourceError::Invalid(e.to_string()))?;
        let mut bundle_err = None;
        self.bundle.send_modify(|b| match b {
            Some(existing) => {
                if let Err(e) = existing.update(&roots) {
                    bundle_err = Some(e.to_string());
                }
            }
            None => match TrustBundle::new(id.trust_domain().clone(), &roots) {
                Ok(nb) => *b = Some(nb),
                Err(e) => bundle_err = Some(e.to_string()),
            },
        });
        if let Some(e) = bundle_err {
            return Err(SourceError::Invalid(format!("bundle: {e}")));
        }
        let not_after = x509_parser::parse_x509_certificate(&leaf)
            .map(|(_, c)| c.validity().not_after.timestamp())
            .unwrap_or_default();
        tracing::info!(spiffe_id = %id, not_after, "SVID installed");
        self.current.send_replace(Some(Current {
            spiffe_id: id.to_string(),
            leaf,
            roots: roots.len(),
            not_after,
        }));
        Ok(())
    }

    /// The trust bundle, once the first SVID arrived.
    pub fn bundle(&self) -> Option<TrustBundle> {
        self.bundle.borrow().clone()
    }

    /// Watches what the sidecar presents (None until the first SVID).
    pub fn subscribe(&self) -> watch::Receiver<Option<Current>> {
        self.current.subscribe()
    }
}
