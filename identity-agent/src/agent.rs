//! The agent's core: its own identity, the live view of what its node may issue, and the workload SVID cache.
//!
//! - **Own identity.** First start: a one-time join token and a CSR for a key generated in the key store; the
//!   agent SVID is kept on disk with its key *sealed* (`hsm`), so a restart re-uses it without a new token. It is
//!   renewed at `svid.rotate_fraction` of its lifetime over mutual TLS.
//! - **Sync.** A `WatchUpdates` stream from the CA pushes this node's entries and the bundle whenever they change
//!   (no periodic full re-sync). On a broken stream the agent reconnects with backoff and keeps serving.
//! - **Workload SVIDs.** Minted only when a workload asks (or listed in `svid.prewarm`), each with a fresh key made
//!   here (the CA sees only a CSR), cached up to `svid.cache_max` entries (least recently used dropped), renewed
//!   before expiry, and served from cache while the CA is unreachable until they expire. A cached SVID belongs to
//!   one revision of its entry: when the CA pushes a changed entry (TTL, DNS names, selectors, …) its SVIDs are
//!   minted again at once and open streams get them.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use tokio::sync::watch;
use trustline_hsm::{KeyRef, KeyStore, KeyType, SoftwareKeyStore};
use trustline_identity::bundle::{certs_from_pem, JwkSet};
use trustline_identity::spiffe_id::{ca_server_id, SpiffeId, TrustDomain};
use trustline_identity::tls::{client_config, ExpectedPeer, RotatingCert, SpiffeServerVerifier, TrustBundle};
use trustline_identity::Selector;
use trustline_proto::agent as pb;
use trustline_proto::agent::agent_client::AgentClient;
use zeroize::Zeroizing;

use crate::config::Validated;

/// What went wrong; messages say what to do where the operator must act.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// No valid agent SVID and no join token.
    #[error("{0}")]
    NeedJoinToken(String),
    /// The CA refused or failed a call.
    #[error("CA: {0}")]
    Ca(String),
    /// The CA cannot be reached and nothing usable is cached.
    #[error("CA unreachable and no valid SVID cached: {0}")]
    CaUnavailable(String),
    /// No entry for the caller.
    #[error("no identity issued")]
    NoIdentity,
    /// Key custody.
    #[error("keys: {0}")]
    Keys(#[from] trustline_hsm::HsmError),
    /// Local file problem.
    #[error("{path}: {reason}")]
    File {
        /// File.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// TLS setup.
    #[error("TLS: {0}")]
    Tls(#[from] trustline_identity::tls::TlsError),
    /// Bad data from the CA.
    #[error("CA sent unusable data: {0}")]
    Protocol(String),
    /// The node's DevID (TPM key or certificate) cannot be used.
    #[error("tpm_devid: {0}")]
    DevId(String),
}

fn file_err(path: &std::path::Path, reason: impl ToString) -> AgentError {
    AgentError::File {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

/// Unix seconds now.
pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A registration entry this node may issue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Entry id.
    pub id: String,
    /// SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// Selectors.
    pub selectors: Vec<Selector>,
    /// DNS names.
    pub dns_names: Vec<String>,
    /// The CA's revision of the entry: it changes with every update (TTL, DNS names, selectors, …), and SVIDs
    /// minted from an older revision are minted again.
    pub revision: i64,
}

/// This node's entries, indexed by id and by selector (a workload lookup touches only entries sharing one of its
/// selectors, not all of them).
#[derive(Debug, Clone, Default)]
pub struct Entries {
    by_id: HashMap<String, Arc<Entry>>,
    by_selector: HashMap<Selector, Vec<String>>,
}

impl Entries {
    fn from_map(by_id: HashMap<String, Arc<Entry>>) -> Self {
        let mut by_selector: HashMap<Selector, Vec<String>> = HashMap::new();
        for e in by_id.values() {
            for s in &e.selectors {
                by_selector.entry(s.clone()).or_default().push(e.id.clone());
            }
        }
        Self { by_id, by_selector }
    }

    /// The entries after a CA update: a full replacement, or upserts and removals on top of these.
    fn apply(&self, full: bool, upserts: Vec<Entry>, removed: &[String]) -> Self {
        let mut map = if full { HashMap::new() } else { self.by_id.clone() };
        for id in removed {
            map.remove(id);
        }
        for e in upserts {
            map.insert(e.id.clone(), Arc::new(e));
        }
        Self::from_map(map)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// One entry by id.
    pub fn get(&self, id: &str) -> Option<&Arc<Entry>> {
        self.by_id.get(id)
    }

    /// All entries.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Entry>> {
        self.by_id.values()
    }

    /// Entries all of whose selectors the workload has, ordered by id.
    pub fn matching(&self, workload: &[Selector]) -> Vec<Entry> {
        let mut ids: Vec<&String> = workload
            .iter()
            .filter_map(|s| self.by_selector.get(s))
            .flatten()
            .collect();
        ids.sort();
        ids.dedup();
        ids.into_iter()
            .filter_map(|id| self.by_id.get(id))
            .filter(|e| crate::attest::matches(&e.selectors, workload))
            .map(|e| (**e).clone())
            .collect()
    }
}

/// The live view from the CA.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Entries of this node.
    pub entries: Arc<Entries>,
    /// X.509 roots.
    pub roots: Vec<Vec<u8>>,
    /// JWT bundle (the whole SPIFFE bundle; JWT keys are those with use jwt-svid).
    pub jwks: Option<JwkSet>,
    /// CA's entries revision.
    pub revision: i64,
    /// Bundle sequence.
    pub bundle_sequence: i64,
    /// Whether the push stream is up.
    pub connected: bool,
}

/// A workload X.509-SVID with its key (held in memory only).
#[derive(Clone)]
pub struct X509Svid {
    /// Entry it was minted for.
    pub entry_id: String,
    /// SPIFFE ID.
    pub spiffe_id: String,
    /// DER chain, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// PKCS#8 DER private key.
    pub key: Arc<Zeroizing<Vec<u8>>>,
    /// Start of its lifetime for renewal purposes: when it was received (certificates are backdated for clock
    /// skew, so `notBefore` lies a little earlier).
    pub not_before: i64,
    /// Expiry (`notAfter`).
    pub not_after: i64,
}

impl std::fmt::Debug for X509Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("X509Svid")
            .field("spiffe_id", &self.spiffe_id)
            .field("not_after", &self.not_after)
            .finish()
    }
}

struct CachedX509 {
    svid: X509Svid,
    /// Revision of the entry it was minted from.
    revision: i64,
    last_used: Instant,
}

impl CachedX509 {
    /// Whether this SVID can be served for `entry` at `now` without minting a new one: unexpired, and minted from
    /// the entry's current revision.
    fn current_for(&self, entry: &Entry, now: i64) -> bool {
        self.svid.not_after > now && self.revision == entry.revision
    }
}

#[derive(Clone)]
struct CachedJwt {
    token: String,
    /// Revision of the entry it was minted from.
    revision: i64,
    issued_at: i64,
    expires_at: i64,
    last_used: Instant,
}

/// A minted JWT-SVID.
#[derive(Debug, Clone)]
pub struct JwtSvid {
    /// SPIFFE ID.
    pub spiffe_id: String,
    /// Compact JWS.
    pub token: String,
    /// Expiry.
    pub expires_at: i64,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Persisted {
    spiffe_id: String,
    chain: Vec<String>,
    key_ref: String,
}

/// The agent.
pub struct Agent {
    cfg: Validated,
    keys: KeyStore,
    ca_bundle: TrustBundle,
    cert: Arc<RotatingCert>,
    client: AgentClient<tonic::transport::Channel>,
    identity: RwLock<Option<(String, i64, i64)>>,
    state: watch::Sender<Arc<Snapshot>>,
    generation: watch::Sender<u64>,
    x509: Mutex<HashMap<String, CachedX509>>,
    /// One minting of an entry's X.509-SVID at a time (streams woken together by an entry update, the
    /// rotation task): whoever comes second finds it minted.
    mint_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    jwt: Mutex<HashMap<(String, String), CachedJwt>>,
    /// Workload attestation.
    pub attestor: crate::attest::Attestor,
    /// Metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
}

fn open_keystore(cfg: &Validated) -> Result<KeyStore, AgentError> {
    let k = &cfg.raw.keys;
    let store = if let Some(p) = &k.passphrase_file {
        SoftwareKeyStore::from_passphrase(&trustline_hsm::read_secret_file(p)?)?
    } else {
        let p = k
            .key_file
            .clone()
            .unwrap_or_else(|| cfg.raw.data_dir.join("agent-seal.key"));
        if !p.exists() {
            SoftwareKeyStore::create_key_file(&p)?;
        }
        SoftwareKeyStore::from_key_file(&p)?
    };
    // An SM-mode trust domain (its bundle holds SM2 roots, which switched TLS to the SM provider): the agent's
    // own keys are SM2 and sealed with SM4-GCM.
    if trustline_identity::tls::sm_enabled() {
        return Ok(KeyStore::Software(store.with_sm4_sealing()?));
    }
    Ok(KeyStore::Software(store))
}

/// The key type of the agent's own SVID key.
fn agent_key_type() -> KeyType {
    if trustline_identity::tls::sm_enabled() {
        KeyType::Sm2
    } else {
        KeyType::EcP256
    }
}

fn connector(
    addr: std::net::SocketAddr,
    tls: Arc<rustls::ClientConfig>,
) -> Result<tonic::transport::Channel, AgentError> {
    let tls = tokio_rustls::TlsConnector::from(tls);
    let ep = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| AgentError::Ca(e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10));
    Ok(
        ep.connect_with_connector_lazy(tower::service_fn(move |_: tonic::transport::Uri| {
            let tls = tls.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let _ = tcp.set_nodelay(true);
                let name = rustls::pki_types::ServerName::try_from("trustline-ca")
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
                let s = tls.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        })),
    )
}

fn status_msg(s: &tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

fn entry_from_pb(e: &pb::Entry) -> Option<Entry> {
    let spiffe_id = SpiffeId::new(&e.spiffe_id).ok()?;
    let selectors = e
        .selectors
        .iter()
        .map(|s| Selector::new(&s.r#type, &s.value))
        .collect::<Result<Vec<_>, _>>()
        .ok()?;
    Some(Entry {
        id: e.id.clone(),
        spiffe_id,
        selectors,
        dns_names: e.dns_names.clone(),
        revision: e.revision,
    })
}

fn cert_validity(der: &[u8]) -> Result<(i64, i64), AgentError> {
    let (_, c) = x509_parser::parse_x509_certificate(der).map_err(|e| AgentError::Protocol(e.to_string()))?;
    Ok((
        c.validity().not_before.timestamp(),
        c.validity().not_after.timestamp(),
    ))
}

/// A fresh key and a CSR for `uris` / `dns` (the key never leaves this process): P-256, or SM2 in an SM-mode
/// trust domain.
fn key_and_csr(uris: &[&str], dns: &[String]) -> Result<(Zeroizing<Vec<u8>>, Vec<u8>), AgentError> {
    if trustline_identity::tls::sm_enabled() {
        let sm = |e: trustline_hsm::HsmError| AgentError::Protocol(e.to_string());
        let key = Zeroizing::new(trustline_hsm::sm::generate_pkcs8().map_err(sm)?);
        let uris: Vec<String> = uris.iter().map(|u| (*u).to_owned()).collect();
        let csr = trustline_hsm::sm::csr(&key, &uris, dns, None).map_err(sm)?;
        return Ok((key, csr));
    }
    let key = rcgen::KeyPair::generate().map_err(|e| AgentError::Protocol(e.to_string()))?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
        .map_err(|e| AgentError::Protocol(e.to_string()))?;
    for u in uris {
        params.subject_alt_names.push(rcgen::SanType::URI(
            (*u).try_into()
                .map_err(|e: rcgen::Error| AgentError::Protocol(e.to_string()))?,
        ));
    }
    for d in dns {
        params.subject_alt_names.push(rcgen::SanType::DnsName(
            d.clone()
                .try_into()
                .map_err(|e: rcgen::Error| AgentError::Protocol(e.to_string()))?,
        ));
    }
    let csr = params
        .serialize_request(&key)
        .map_err(|e| AgentError::Protocol(e.to_string()))?;
    Ok((Zeroizing::new(key.serialize_der()), csr.der().to_vec()))
}

impl Agent {
    /// Loads or obtains the agent's identity and returns the agent, ready to serve (tasks not yet started).
    pub async fn start(cfg: Validated, join_token: Option<String>) -> Result<Arc<Self>, AgentError> {
        let dir = &cfg.raw.data_dir;
        if !dir.exists() {
            use std::os::unix::fs::PermissionsExt;
            std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| file_err(dir, e))?;
        }
        let pem_text =
            std::fs::read_to_string(&cfg.raw.trust_bundle).map_err(|e| file_err(&cfg.raw.trust_bundle, e))?;
        let roots = certs_from_pem(&pem_text).map_err(|e| file_err(&cfg.raw.trust_bundle, e))?;
        // First the bundle: SM2 roots switch this process to the SM provider, and the key store to SM keys.
        let ca_bundle = TrustBundle::new(cfg.trust_domain.clone(), &roots)?;
        let keys = open_keystore(&cfg)?;
        let ca_id = SpiffeId::new(ca_server_id(&cfg.trust_domain))
            .map_err(|e| AgentError::Protocol(e.to_string()))?;
        let verifier = Arc::new(SpiffeServerVerifier::new(
            ca_bundle.clone(),
            ExpectedPeer::OneOf(vec![ca_id]),
        ));
        let cert = Arc::new(RotatingCert::default());
        let mtls = Arc::new(client_config(verifier.clone(), Some(cert.clone()))?);
        let client = AgentClient::new(connector(cfg.raw.ca_address, mtls)?);
        let (state, _) = watch::channel(Arc::new(Snapshot {
            roots: roots.clone(),
            ..Snapshot::default()
        }));
        let (generation, _) = watch::channel(0);
        let cfg_max_executable_bytes = cfg.raw.attestation.max_executable_bytes;
        let agent = Arc::new(Self {
            cfg,
            keys,
            ca_bundle,
            cert,
            client,
            identity: RwLock::new(None),
            state,
            generation,
            x509: Mutex::new(HashMap::new()),
            mint_locks: Mutex::new(HashMap::new()),
            jwt: Mutex::new(HashMap::new()),
            attestor: crate::attest::Attestor::new(cfg_max_executable_bytes),
            metrics: crate::metrics::Metrics::new(),
        });
        let now = now_unix();
        match agent.load_persisted()? {
            Some((id, not_after)) if not_after > now + 5 => {
                tracing::info!(agent_id = %id, expires = not_after, "re-using the stored agent SVID (no join token needed)");
            }
            stored => {
                let anon = Arc::new(client_config(verifier, None)?);
                if let Some(devid) = &agent.cfg.raw.tpm_devid {
                    // A node with a DevID key attests (and re-attests after any outage) on its own.
                    agent.attest(Credential::DevId(DevId::load(devid)?), anon).await?;
                } else {
                    let token = join_token.filter(|t| !t.is_empty()).ok_or_else(|| {
                        AgentError::NeedJoinToken(match stored {
                            Some((id, exp)) => format!(
                                "the stored agent SVID for {id} expired at {exp} and cannot be renewed: generate a new token with `trustline-ca token generate --spiffe-id {id}` and start the agent with --join-token"
                            ),
                            None => "this node has not attested yet: generate a token with `trustline-ca token generate` and start the agent with --join-token (or TRUSTLINE_JOIN_TOKEN), or configure [tpm_devid]".to_owned(),
                        })
                    })?;
                    agent.attest(Credential::JoinToken(token), anon).await?;
                }
            }
        }
        Ok(agent)
    }

    fn state_path(&self) -> PathBuf {
        self.cfg.raw.data_dir.join("agent-svid.json")
    }

    fn load_persisted(&self) -> Result<Option<(String, i64)>, AgentError> {
        let path = self.state_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(file_err(&path, e)),
        };
        let p: Persisted = serde_json::from_str(&text).map_err(|e| file_err(&path, e))?;
        let chain = p
            .chain
            .iter()
            .map(|c| STANDARD.decode(c))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| file_err(&path, e))?;
        let leaf = chain
            .first()
            .ok_or_else(|| file_err(&path, "empty certificate chain"))?;
        let (nb, na) = cert_validity(leaf)?;
        if na > now_unix() {
            let signer = self.keys.load(&KeyRef::new(p.key_ref))?;
            self.cert.set_signer(chain, signer);
            *self.identity.write().unwrap_or_else(|e| e.into_inner()) = Some((p.spiffe_id.clone(), nb, na));
        }
        Ok(Some((p.spiffe_id, na)))
    }

    fn persist(&self, id: &str, chain: &[Vec<u8>], key_ref: &KeyRef) -> Result<(), AgentError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.state_path();
        let tmp = path.with_extension("json.tmp");
        let p = Persisted {
            spiffe_id: id.to_owned(),
            chain: chain.iter().map(|c| STANDARD.encode(c)).collect(),
            key_ref: key_ref.as_str().to_owned(),
        };
        let body = serde_json::to_vec(&p).map_err(|e| file_err(&path, e))?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| file_err(&tmp, e))?;
        f.write_all(&body)
            .and_then(|_| f.sync_all())
            .map_err(|e| file_err(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| file_err(&path, e))
    }

    fn install(
        &self,
        svid: &pb::X509svid,
        signer: Arc<dyn trustline_hsm::Signer>,
        key_ref: &KeyRef,
    ) -> Result<(), AgentError> {
        let leaf = svid
            .cert_chain
            .first()
            .ok_or_else(|| AgentError::Protocol("empty agent SVID".into()))?;
        let (nb, na) = cert_validity(leaf)?;
        // Certificates are backdated for clock skew; measure the lifetime from when we got it.
        let nb = nb.max(now_unix());
        self.persist(&svid.spiffe_id, &svid.cert_chain, key_ref)?;
        self.cert.set_signer(svid.cert_chain.clone(), signer);
        *self.identity.write().unwrap_or_else(|e| e.into_inner()) = Some((svid.spiffe_id.clone(), nb, na));
        Ok(())
    }

    async fn attest(&self, cred: Credential, anon: Arc<rustls::ClientConfig>) -> Result<(), AgentError> {
        let (signer, key_ref) = self.keys.generate(agent_key_type())?;
        // The agent's ID is decided by the CA (from the token or the DevID), so the attestation CSR names none.
        let csr = csr_for_signer(&signer, &[], None)?;
        let mut c = AgentClient::new(connector(self.cfg.raw.ca_address, anon)?);
        let refused = |s: tonic::Status| AgentError::Ca(format!("attestation refused: {}", status_msg(&s)));
        let (join_token, devid, how) = match cred {
            Credential::JoinToken(t) => (t, None, "join token"),
            Credential::DevId(d) => {
                // A fresh challenge on this connection, answered by the TPM.
                let ch = c
                    .attest_challenge(pb::AttestChallengeRequest {})
                    .await
                    .map_err(refused)?
                    .into_inner();
                let msg =
                    trustline_identity::devid::proof_message(self.cfg.trust_domain.as_str(), &ch.nonce, &csr);
                let alg = d.signer.key_type().default_x509_algorithm();
                let signature = d
                    .signer
                    .sign(alg, &msg)
                    .map_err(|e| AgentError::DevId(format!("signing the challenge: {e}")))?;
                let proof = pb::DevIdProof {
                    cert_chain: d.chain,
                    nonce: ch.nonce,
                    signature,
                };
                (String::new(), Some(proof), "TPM DevID")
            }
        };
        let resp = c
            .attest_agent(pb::AttestAgentRequest {
                join_token,
                csr,
                devid,
            })
            .await
            .map_err(refused)?
            .into_inner();
        let svid = resp
            .svid
            .ok_or_else(|| AgentError::Protocol("no SVID in attestation response".into()))?;
        if let Some(b) = resp.bundle {
            self.apply_bundle(&b)?;
        }
        self.install(&svid, signer, &key_ref)?;
        tracing::info!(agent_id = %svid.spiffe_id, "node attested with {how}");
        Ok(())
    }

    /// The agent's SPIFFE ID, the start of its SVID's lifetime for renewal (when received) and its expiry.
    pub fn identity(&self) -> Option<(String, i64, i64)> {
        self.identity.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.state.borrow().clone()
    }

    /// Sees every change a workload may care about (entries, bundle, rotated SVIDs).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    fn bump(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.cfg.trust_domain
    }

    fn apply_bundle(&self, b: &pb::Bundle) -> Result<(), AgentError> {
        let jwks = JwkSet::parse(&b.jwks).map_err(|e| AgentError::Protocol(e.to_string()))?;
        self.ca_bundle.update(&b.x509_authorities)?;
        self.state.send_modify(|s| {
            let mut n = (**s).clone();
            n.roots = b.x509_authorities.clone();
            n.jwks = Some(jwks);
            n.bundle_sequence = b.sequence;
            *s = Arc::new(n);
        });
        Ok(())
    }

    /// Spawns the background tasks (agent SVID renewal, sync stream, workload SVID rotation).
    pub fn spawn_tasks(self: &Arc<Self>) {
        let a = self.clone();
        tokio::spawn(async move { a.renew_loop().await });
        let a = self.clone();
        tokio::spawn(async move { a.sync_loop().await });
        let a = self.clone();
        tokio::spawn(async move { a.rotate_loop().await });
    }

    async fn renew_loop(self: Arc<Self>) {
        let mut backoff = Duration::from_secs(1);
        loop {
            let Some((id, nb, na)) = self.identity() else {
                return;
            };
            let at = self.cfg.renew_at(nb, na);
            let wait = (at - now_unix()).max(0) as u64;
            tokio::time::sleep(Duration::from_secs(wait)).await;
            match self.renew_agent(&id).await {
                Ok(()) => backoff = Duration::from_secs(1),
                Err(e) => {
                    let left = na - now_unix();
                    if left <= 0 {
                        tracing::error!(error = %e, agent_id = %id, "agent SVID expired and could not be renewed: restart the agent with a new join token (`trustline-ca token generate --spiffe-id {id}`)");
                    } else {
                        tracing::warn!(error = %e, seconds_left = left, "agent SVID renewal failed; retrying");
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    async fn renew_agent(&self, id: &str) -> Result<(), AgentError> {
        let (signer, key_ref) = self.keys.generate(agent_key_type())?;
        // The CA checks that a renewal CSR names the agent's own ID (or nothing).
        let csr = csr_for_signer(&signer, &[id], None)?;
        let svid = self
            .client
            .clone()
            .renew_agent(pb::RenewAgentRequest { csr })
            .await
            .map_err(|s| AgentError::Ca(status_msg(&s)))?
            .into_inner()
            .svid
            .ok_or_else(|| AgentError::Protocol("no SVID in renewal".into()))?;
        self.install(&svid, signer, &key_ref)?;
        tracing::info!(agent_id = %svid.spiffe_id, serial = %svid.serial, "agent SVID renewed");
        Ok(())
    }

    async fn sync_loop(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(200);
        loop {
            match self
                .client
                .clone()
                .watch_updates(pb::WatchUpdatesRequest {})
                .await
            {
                Ok(resp) => {
                    let mut stream = resp.into_inner();
                    loop {
                        match stream.message().await {
                            Ok(Some(update)) => {
                                backoff = Duration::from_millis(200);
                                let changed = self.apply_update(update);
                                if !changed.is_empty() {
                                    let a = self.clone();
                                    tokio::spawn(async move { a.reissue(changed).await });
                                }
                            }
                            Ok(None) => break,
                            Err(s) => {
                                tracing::warn!(error = %status_msg(&s), "CA update stream broke");
                                break;
                            }
                        }
                    }
                }
                Err(s) => tracing::warn!(error = %status_msg(&s), "cannot reach the CA; serving from cache"),
            }
            self.set_connected(false);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(15));
        }
    }

    fn set_connected(&self, up: bool) {
        self.state.send_if_modified(|s| {
            if s.connected == up {
                return false;
            }
            let mut n = (**s).clone();
            n.connected = up;
            *s = Arc::new(n);
            true
        });
        self.metrics.set_connected(up);
    }

    /// Applies a CA update; returns the entries that changed and have an X.509-SVID cached (to be minted again).
    fn apply_update(&self, u: pb::WatchUpdatesResponse) -> Vec<Entry> {
        if let Some(b) = &u.bundle {
            if let Err(e) = self.apply_bundle(b) {
                tracing::error!(error = %e, "ignoring an unusable bundle from the CA");
            }
        }
        let upserts: Vec<Entry> = u.entries.iter().filter_map(entry_from_pb).collect();
        self.state.send_modify(|s| {
            let mut n = (**s).clone();
            n.entries = Arc::new(n.entries.apply(u.full, upserts, &u.removed_entry_ids));
            n.revision = u.revision;
            n.connected = true;
            *s = Arc::new(n);
        });
        self.metrics.set_connected(true);
        // Drop cached SVIDs of entries that are gone or now name another SPIFFE ID. Those of entries changed
        // otherwise (TTL, DNS names, selectors) are minted again; the previous one is served only if that fails.
        let snap = self.snapshot();
        let mut changed = Vec::new();
        self.x509
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|id, c| {
                let Some(e) = snap.entries.get(id) else {
                    return false;
                };
                if e.spiffe_id.to_string() != c.svid.spiffe_id {
                    return false;
                }
                if c.revision != e.revision {
                    changed.push((**e).clone());
                }
                true
            });
        self.jwt
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(id, _), c| snap.entries.get(id).is_some_and(|e| e.revision == c.revision));
        tracing::debug!(
            entries = snap.entries.len(),
            revision = u.revision,
            "applied CA update"
        );
        self.bump();
        changed
    }

    /// Mints again the X.509-SVIDs of `entries`, which changed, so that open streams deliver SVIDs with the new
    /// contents (SPIRE does the same).
    async fn reissue(&self, entries: Vec<Entry>) {
        match self.refresh_x509(&entries).await {
            Ok(n) if n > 0 => {
                tracing::info!(
                    count = n,
                    "workload X.509-SVIDs minted again after an entry update"
                );
                self.bump();
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot mint workload SVIDs again after an entry update; serving the previous ones until they expire")
            }
        }
    }

    async fn rotate_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = now_unix();
            let due: Vec<String> = self
                .x509
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .filter(|(_, c)| {
                    now >= self.cfg.renew_at_jittered(
                        c.svid.not_before,
                        c.svid.not_after,
                        c.svid.chain.first().map_or(&[][..], Vec::as_slice),
                    )
                })
                .map(|(id, _)| id.clone())
                .collect();
            let prewarm: Vec<String> = if self.cfg.raw.svid.prewarm.is_empty() {
                Vec::new()
            } else {
                let cached = self
                    .x509
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>();
                self.snapshot()
                    .entries
                    .iter()
                    .filter(|e| {
                        self.cfg.raw.svid.prewarm.contains(&e.spiffe_id.to_string())
                            && !cached.contains(&e.id)
                    })
                    .map(|e| e.id.clone())
                    .collect()
            };
            let all: Vec<String> = due.into_iter().chain(prewarm).collect();
            if all.is_empty() {
                continue;
            }
            match self.mint_x509(&all).await {
                Ok(n) if n > 0 => {
                    tracing::info!(count = n, "workload X.509-SVIDs rotated");
                    self.bump();
                }
                Ok(_) => {}
                Err(e) => {
                    let expired: usize = self
                        .x509
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .values()
                        .filter(|c| c.svid.not_after <= now)
                        .count();
                    tracing::warn!(error = %e, expired, "cannot renew workload SVIDs; serving cached ones until they expire");
                }
            }
        }
    }

    /// Mints X.509-SVIDs for `entry_ids` in one batch and caches them. Returns how many were minted.
    async fn mint_x509(&self, entry_ids: &[String]) -> Result<usize, AgentError> {
        let snap = self.snapshot();
        let mut params = Vec::new();
        let mut keys = Vec::new();
        for id in entry_ids {
            let Some(e) = snap.entries.get(id) else {
                continue;
            };
            let sid = e.spiffe_id.to_string();
            let (key, csr) = key_and_csr(&[&sid], &e.dns_names)?;
            params.push(pb::NewX509svidParams {
                entry_id: id.clone(),
                csr,
            });
            keys.push((id.clone(), key, e.revision));
        }
        if params.is_empty() {
            return Ok(0);
        }
        let started = Instant::now();
        let resp = self
            .client
            .clone()
            .batch_new_x509svid(pb::BatchNewX509svidRequest { params })
            .await
            .map_err(|s| AgentError::Ca(status_msg(&s)))?
            .into_inner();
        let mut n = 0;
        let mut cache = self.x509.lock().unwrap_or_else(|e| e.into_inner());
        for ((id, key, revision), r) in keys.into_iter().zip(resp.results) {
            match r.result {
                Some(pb::x509svid_result::Result::Svid(s)) => {
                    let Some(leaf) = s.cert_chain.first() else {
                        continue;
                    };
                    let (nb, na) = cert_validity(leaf)?;
                    // Backdated for clock skew; renewal counts from receipt.
                    let nb = nb.max(now_unix());
                    cache.insert(
                        id.clone(),
                        CachedX509 {
                            svid: X509Svid {
                                entry_id: id,
                                spiffe_id: s.spiffe_id,
                                chain: s.cert_chain,
                                key: Arc::new(key),
                                not_before: nb,
                                not_after: na,
                            },
                            revision,
                            last_used: Instant::now(),
                        },
                    );
                    n += 1;
                }
                Some(pb::x509svid_result::Result::Error(e)) => {
                    tracing::warn!(entry_id = %id, error = %e, "CA refused a workload CSR");
                }
                None => {}
            }
        }
        // Bound the cache: drop the least recently used.
        let max = self.cfg.raw.svid.cache_max;
        if cache.len() > max {
            let mut by_age: Vec<(String, Instant)> =
                cache.iter().map(|(k, v)| (k.clone(), v.last_used)).collect();
            by_age.sort_by_key(|(_, t)| *t);
            for (k, _) in by_age.into_iter().take(cache.len() - max) {
                cache.remove(&k);
            }
        }
        self.metrics.x509_minted(n as u64, started.elapsed());
        self.metrics.set_cached(cache.len() as i64);
        Ok(n)
    }

    /// Entries matching `selectors`.
    pub fn entries_for(&self, selectors: &[Selector]) -> Vec<Entry> {
        self.snapshot().entries.matching(selectors)
    }

    /// X.509-SVIDs for `entries`, minting what is missing, expired or minted from an older revision of its entry.
    /// Cached SVIDs are served while still valid when minting fails (the CA is unreachable).
    pub async fn x509_svids(&self, entries: &[Entry]) -> Result<Vec<X509Svid>, AgentError> {
        if let Err(e) = self.refresh_x509(entries).await {
            tracing::warn!(error = %e, "could not mint workload SVIDs");
            let now = now_unix();
            let cache = self.x509.lock().unwrap_or_else(|e| e.into_inner());
            if !entries
                .iter()
                .any(|e| cache.get(&e.id).is_some_and(|c| c.svid.not_after > now))
            {
                return Err(AgentError::CaUnavailable(e.to_string()));
            }
        }
        let now = now_unix();
        let mut cache = self.x509.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            if let Some(c) = cache.get_mut(&e.id) {
                if c.svid.not_after > now {
                    if c.revision != e.revision {
                        tracing::debug!(entry_id = %e.id, "serving an SVID minted from an older revision of its entry: minting failed");
                    }
                    c.last_used = Instant::now();
                    out.push(c.svid.clone());
                }
            }
        }
        Ok(out)
    }

    /// Mints, in one batch, the X.509-SVIDs of `entries` that have no [current](CachedX509::current_for) one
    /// cached; returns how many were minted. One caller at a time mints a given entry: the others wait for it and
    /// then find a current SVID (streams woken together by an entry update mint it once).
    async fn refresh_x509(&self, entries: &[Entry]) -> Result<usize, AgentError> {
        let stale = || -> Vec<String> {
            let now = now_unix();
            let cache = self.x509.lock().unwrap_or_else(|e| e.into_inner());
            let mut ids: Vec<String> = entries
                .iter()
                .filter(|e| !cache.get(&e.id).is_some_and(|c| c.current_for(e, now)))
                .map(|e| e.id.clone())
                .collect();
            ids.sort();
            ids.dedup();
            ids
        };
        let ids = stale();
        if ids.is_empty() {
            return Ok(0);
        }
        // Locked in id order by every caller, so two callers never wait for each other.
        let locks: Vec<Arc<tokio::sync::Mutex<()>>> = {
            let mut m = self.mint_locks.lock().unwrap_or_else(|e| e.into_inner());
            ids.iter()
                .map(|id| m.entry(id.clone()).or_default().clone())
                .collect()
        };
        let mut guards = Vec::with_capacity(locks.len());
        for l in &locks {
            guards.push(l.clone().lock_owned().await);
        }
        let mut missing = stale();
        missing.retain(|id| ids.contains(id));
        let minted = if missing.is_empty() {
            Ok(0)
        } else {
            self.mint_x509(&missing).await
        };
        drop(guards);
        drop(locks);
        self.mint_locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, l| Arc::strong_count(l) > 1);
        minted
    }

    /// A JWT-SVID for `entry` and `audience`, from cache while more than half its life remains.
    pub async fn jwt_svid(&self, entry: &Entry, audience: &[String]) -> Result<JwtSvid, AgentError> {
        let mut aud = audience.to_vec();
        aud.sort();
        aud.dedup();
        let key = (entry.id.clone(), aud.join("\n"));
        let now = now_unix();
        if let Some(c) = self.jwt.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&key) {
            if c.revision == entry.revision && now < self.cfg.renew_at(c.issued_at, c.expires_at) {
                c.last_used = Instant::now();
                self.metrics.jwt_served(true);
                return Ok(JwtSvid {
                    spiffe_id: entry.spiffe_id.to_string(),
                    token: c.token.clone(),
                    expires_at: c.expires_at,
                });
            }
        }
        let resp = self
            .client
            .clone()
            .new_jwtsvid(pb::NewJwtsvidRequest {
                entry_id: entry.id.clone(),
                audience: aud,
            })
            .await;
        match resp {
            Ok(r) => {
                let r = r.into_inner();
                let mut cache = self.jwt.lock().unwrap_or_else(|e| e.into_inner());
                if cache.len() >= self.cfg.raw.svid.cache_max {
                    if let Some(oldest) = cache
                        .iter()
                        .min_by_key(|(_, v)| v.last_used)
                        .map(|(k, _)| k.clone())
                    {
                        cache.remove(&oldest);
                    }
                }
                cache.insert(
                    key,
                    CachedJwt {
                        token: r.token.clone(),
                        revision: entry.revision,
                        issued_at: now,
                        expires_at: r.expires_at,
                        last_used: Instant::now(),
                    },
                );
                self.metrics.jwt_served(false);
                Ok(JwtSvid {
                    spiffe_id: r.spiffe_id,
                    token: r.token,
                    expires_at: r.expires_at,
                })
            }
            Err(s)
                if s.code() == tonic::Code::InvalidArgument || s.code() == tonic::Code::PermissionDenied =>
            {
                Err(AgentError::Ca(s.message().to_owned()))
            }
            Err(s) => {
                // CA unreachable: a cached token that has not expired is still good.
                if let Some(c) = self.jwt.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
                    if c.revision == entry.revision && c.expires_at > now + 5 {
                        tracing::warn!(error = %status_msg(&s), "CA unreachable; serving a cached JWT-SVID");
                        return Ok(JwtSvid {
                            spiffe_id: entry.spiffe_id.to_string(),
                            token: c.token.clone(),
                            expires_at: c.expires_at,
                        });
                    }
                }
                Err(AgentError::CaUnavailable(status_msg(&s)))
            }
        }
    }
}

/// A PKCS#10 CSR (DER) for an EC P-256 or P-384 key held by an `hsm` signer, naming `uris` and, optionally, a
/// subject common name.
pub fn csr_for_signer(
    signer: &Arc<dyn trustline_hsm::Signer>,
    uris: &[&str],
    common_name: Option<&str>,
) -> Result<Vec<u8>, AgentError> {
    // rcgen builds and signs the CSR through the hsm signer, so the key never leaves its store (or its TPM).
    struct Remote(Arc<dyn trustline_hsm::Signer>);
    impl rcgen::PublicKeyData for Remote {
        fn der_bytes(&self) -> &[u8] {
            self.0.public_key()
        }
        fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
            match self.0.key_type() {
                KeyType::EcP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
                // P-256 also stands in for SM2 (see `trustline_hsm::sm::rewrite_placeholders`).
                _ => &rcgen::PKCS_ECDSA_P256_SHA256,
            }
        }
    }
    impl rcgen::SigningKey for Remote {
        fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
            let mut tbs = msg.to_vec();
            if self.0.key_type() == KeyType::Sm2 {
                trustline_hsm::sm::rewrite_placeholders(&mut tbs);
            }
            self.0
                .sign(self.0.key_type().default_x509_algorithm(), &tbs)
                .map_err(|_| rcgen::Error::RemoteKeyError)
        }
    }
    if !matches!(
        signer.key_type(),
        KeyType::EcP256 | KeyType::EcP384 | KeyType::Sm2
    ) {
        return Err(AgentError::Protocol(format!(
            "CSRs are made for ec-p256, ec-p384 or sm2 keys, not {}",
            signer.key_type()
        )));
    }
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
        .map_err(|e| AgentError::Protocol(e.to_string()))?;
    if let Some(cn) = common_name {
        params.distinguished_name.push(rcgen::DnType::CommonName, cn);
    }
    for u in uris {
        params.subject_alt_names.push(rcgen::SanType::URI(
            (*u).try_into()
                .map_err(|e: rcgen::Error| AgentError::Protocol(e.to_string()))?,
        ));
    }
    let csr = params
        .serialize_request(&Remote(signer.clone()))
        .map_err(|e| match e {
            rcgen::Error::RemoteKeyError => AgentError::Protocol("the key could not sign the CSR".into()),
            e => AgentError::Protocol(e.to_string()),
        })?;
    if signer.key_type() == KeyType::Sm2 {
        return trustline_hsm::sm::finish_signed(csr.der().to_vec())
            .ok_or_else(|| AgentError::Protocol("SM2 CSR: unexpected DER layout".into()));
    }
    Ok(csr.der().to_vec())
}

/// How a node proves itself on first contact.
enum Credential {
    JoinToken(String),
    DevId(DevId),
}

/// The node's DevID: its key in the TPM and its certificate chain.
pub struct DevId {
    /// The TPM-resident key.
    pub signer: Arc<dyn trustline_hsm::Signer>,
    /// DER, the DevID certificate first.
    pub chain: Vec<Vec<u8>>,
}

impl DevId {
    /// Opens the TPM and loads the DevID key and certificate named by `[tpm_devid]`.
    pub fn load(cfg: &crate::config::TpmDevIdConfig) -> Result<Self, AgentError> {
        let key_text = std::fs::read_to_string(&cfg.key).map_err(|e| file_err(&cfg.key, e))?;
        let key_ref = KeyRef::new(key_text.trim().to_owned());
        let store = trustline_hsm::KeyStore::open_tpm(&trustline_hsm::TpmConfig {
            tcti: cfg.tcti.clone(),
        })
        .map_err(|e| AgentError::DevId(format!("tcti {:?}: {e}", cfg.tcti)))?;
        let signer = store.load(&key_ref).map_err(|e| file_err(&cfg.key, e))?;
        let pem = std::fs::read_to_string(&cfg.certificate).map_err(|e| file_err(&cfg.certificate, e))?;
        let chain =
            trustline_identity::bundle::certs_from_pem(&pem).map_err(|e| file_err(&cfg.certificate, e))?;
        let leaf = chain
            .first()
            .ok_or_else(|| file_err(&cfg.certificate, "no CERTIFICATE in the file"))?;
        let (_, cert) =
            x509_parser::parse_x509_certificate(leaf).map_err(|e| file_err(&cfg.certificate, e))?;
        if cert.public_key().subject_public_key.data.as_ref() != signer.public_key() {
            return Err(AgentError::DevId(format!(
                "certificate {} is not for the key in {}",
                cfg.certificate.display(),
                cfg.key.display()
            )));
        }
        Ok(Self { signer, chain })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(id: &str, spiffe: &str, sels: &[&str]) -> Entry {
        Entry {
            id: id.into(),
            spiffe_id: SpiffeId::new(spiffe).unwrap(),
            selectors: sels.iter().map(|s| s.parse().unwrap()).collect(),
            dns_names: Vec::new(),
            revision: 1,
        }
    }

    #[test]
    fn full_snapshots_deltas_and_selector_lookup() {
        let sel = |s: &str| -> Selector { s.parse().unwrap() };
        let base = Entries::default().apply(
            true,
            vec![
                e("a", "spiffe://example.org/a", &["unix:uid:1"]),
                e("b", "spiffe://example.org/b", &["unix:uid:1", "unix:path:/bin/b"]),
                e("c", "spiffe://example.org/c", &["unix:uid:2"]),
            ],
            &[],
        );
        assert_eq!(base.len(), 3);
        let w1 = [sel("unix:uid:1"), sel("unix:gid:1")];
        let ids: Vec<String> = base.matching(&w1).into_iter().map(|e| e.id).collect();
        assert_eq!(ids, vec!["a"], "b needs its path selector too");
        let w1b = [sel("unix:uid:1"), sel("unix:path:/bin/b")];
        let ids: Vec<String> = base.matching(&w1b).into_iter().map(|e| e.id).collect();
        assert_eq!(ids, vec!["a", "b"]);
        // A delta: c removed, a changed to uid 3, d added.
        let next = base.apply(
            false,
            vec![
                e("a", "spiffe://example.org/a2", &["unix:uid:3"]),
                e("d", "spiffe://example.org/d", &["unix:uid:2"]),
            ],
            &["c".to_owned()],
        );
        assert_eq!(next.len(), 3);
        assert!(next.get("c").is_none());
        assert!(next.matching(&w1).is_empty(), "a moved away from uid 1");
        let ids: Vec<String> = next
            .matching(&[sel("unix:uid:2")])
            .into_iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(ids, vec!["d"]);
        // A full snapshot replaces everything.
        let reset = next.apply(true, vec![e("z", "spiffe://example.org/z", &["unix:uid:9"])], &[]);
        assert_eq!(reset.len(), 1);
        assert_eq!(base.len(), 3, "old snapshots are untouched");
    }
}
