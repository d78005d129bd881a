//! What the CA does, independent of the API it is asked through: validate registration entries, hand out
//! join tokens, attest nodes, issue and record SVIDs. The agent API and the admin API are thin wrappers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use trustline_identity::selector::{Selector, SelectorError};
use trustline_identity::spiffe_id::{
    ca_server_id, join_token_agent_id, parse_agent_id, parse_spiffe_id, parse_workload_id,
    tpm_devid_agent_id, IdError, SpiffeId, TrustDomain,
};

use crate::authority::{Authority, AuthorityError};
use crate::jwt::{JwtError, MintedJwt};
use crate::metrics::Metrics;
use crate::store::{Entry, EntryFilter, IssuedRecord, JoinToken, KeyKind, NodeRecord, Store, StoreError};
use crate::x509::{self, now_unix, IssuedSvid, ValidCsr, X509Error};

/// Longest SVID lifetime an entry may ask for.
pub const MAX_SVID_TTL: Duration = Duration::from_secs(30 * 86400);

/// Why a CA operation was refused or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// A field has a bad value.
    #[error("{field} {value:?}: {reason}")]
    Invalid {
        /// Field name.
        field: &'static str,
        /// Value given.
        value: String,
        /// Why.
        reason: String,
    },
    /// A SPIFFE ID is malformed.
    #[error(transparent)]
    Id(#[from] IdError),
    /// A selector is malformed.
    #[error("--selector: {0}")]
    Selector(#[from] SelectorError),
    /// Store refusal or failure.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// CSR refusal or certificate failure.
    #[error(transparent)]
    X509(#[from] X509Error),
    /// JWT refusal.
    #[error(transparent)]
    Jwt(#[from] JwtError),
    /// Key failure.
    #[error(transparent)]
    Authority(#[from] AuthorityError),
    /// The caller may not do this.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The caller is not authenticated.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// Issued SVIDs could not be recorded, so they were withheld.
    #[error("could not record issued SVIDs, withholding them: {0}")]
    Record(String),
    /// A TPM DevID proof was refused.
    #[error("tpm_devid attestation refused: {0}")]
    DevId(#[from] crate::devid::DevIdError),
    /// No such agent.
    #[error("spiffe_id {0:?}: no attested agent has this ID")]
    AgentNotFound(String),
}

impl CaError {
    /// A short, stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Invalid { .. } | Self::Id(_) | Self::Selector(_) | Self::Jwt(_) => "invalid_argument",
            Self::X509(_) => "csr_rejected",
            Self::Store(StoreError::EntryNotFound(_)) | Self::Store(StoreError::KeyNotFound(_)) => {
                "not_found"
            }
            Self::Store(StoreError::DuplicateEntry { .. }) => "already_exists",
            Self::Store(StoreError::TokenNotFound)
            | Self::Store(StoreError::TokenExpired { .. })
            | Self::Store(StoreError::TokenInStoredForm) => "token",
            Self::Store(_) => "store",
            Self::PermissionDenied(_) => "permission_denied",
            Self::Unauthenticated(_) => "unauthenticated",
            Self::DevId(_) => "devid",
            Self::AgentNotFound(_) => "not_found",
            Self::Authority(_) | Self::Record(_) => "internal",
        }
    }
}

impl From<CaError> for tonic::Status {
    fn from(e: CaError) -> Self {
        let msg = e.to_string();
        match e {
            CaError::Invalid { .. }
            | CaError::Id(_)
            | CaError::Selector(_)
            | CaError::Jwt(_)
            | CaError::X509(_) => tonic::Status::invalid_argument(msg),
            CaError::Store(StoreError::EntryNotFound(_)) | CaError::Store(StoreError::KeyNotFound(_)) => {
                tonic::Status::not_found(msg)
            }
            CaError::Store(StoreError::DuplicateEntry { .. }) => tonic::Status::already_exists(msg),
            CaError::Store(StoreError::TokenNotFound)
            | CaError::Store(StoreError::TokenExpired { .. })
            | CaError::Store(StoreError::TokenInStoredForm) => tonic::Status::permission_denied(msg),
            CaError::PermissionDenied(_) => tonic::Status::permission_denied(msg),
            CaError::Unauthenticated(_) => tonic::Status::unauthenticated(msg),
            CaError::DevId(crate::devid::DevIdError::NotEnabled) => tonic::Status::failed_precondition(msg),
            CaError::DevId(_) => tonic::Status::permission_denied(msg),
            CaError::AgentNotFound(_) => tonic::Status::not_found(msg),
            CaError::Store(_) | CaError::Authority(_) | CaError::Record(_) => {
                tracing::error!(error = %msg, "internal error");
                tonic::Status::internal(msg)
            }
        }
    }
}

fn invalid(field: &'static str, value: impl ToString, reason: impl Into<String>) -> CaError {
    CaError::Invalid {
        field,
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// Lifetimes the CA applies when a request or entry does not say.
#[derive(Debug, Clone)]
pub struct Defaults {
    /// X.509-SVID lifetime.
    pub x509_ttl: Duration,
    /// JWT-SVID lifetime.
    pub jwt_ttl: Duration,
    /// Agent SVID lifetime.
    pub agent_ttl: Duration,
    /// Join token lifetime.
    pub join_token_ttl: Duration,
}

/// A registration entry as a user asks for it (before validation).
#[derive(Debug, Clone, Default)]
pub struct EntryRequest {
    /// SPIFFE ID to issue.
    pub spiffe_id: String,
    /// Parent (node) SPIFFE ID.
    pub parent_id: String,
    /// Selectors, `type:value`.
    pub selectors: Vec<String>,
    /// X.509-SVID TTL in seconds (0 = default).
    pub x509_svid_ttl: i64,
    /// JWT-SVID TTL in seconds (0 = default).
    pub jwt_svid_ttl: i64,
    /// DNS names.
    pub dns_names: Vec<String>,
    /// Admin flag.
    pub admin: bool,
}

/// One X.509-SVID to issue.
pub struct X509Request {
    /// The CSR (DER).
    pub csr: Vec<u8>,
    /// The SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// DNS names granted.
    pub dns_names: Vec<String>,
    /// Lifetime.
    pub ttl: Duration,
}

/// The CA.
pub struct Ca {
    /// Trust domain.
    pub td: TrustDomain,
    /// Store.
    pub store: Arc<Store>,
    /// Keys and bundle.
    pub authority: Arc<Authority>,
    /// Default lifetimes.
    pub defaults: Defaults,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    entries_tx: watch::Sender<i64>,
    recorder: mpsc::Sender<RecordJob>,
    devid: Option<crate::devid::DevIdVerifier>,
}

type RecordJob = (Vec<IssuedRecord>, oneshot::Sender<Result<(), String>>);

/// Most records committed in one group transaction.
const GROUP_COMMIT_MAX: usize = 512;

/// Group commit for the issuance record: every request waits for its records to be durable, but requests that
/// arrive while a commit is running share the next transaction. An idle CA commits each request at once (no added
/// latency); a busy one pays one commit per group instead of one per request.
async fn record_writer(store: Arc<Store>, mut rx: mpsc::Receiver<RecordJob>) {
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        let mut n = jobs[0].0.len();
        while n < GROUP_COMMIT_MAX {
            match rx.try_recv() {
                Ok(job) => {
                    n += job.0.len();
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        let result = if jobs.len() == 1 {
            store.record_issued(&jobs[0].0).await
        } else {
            let all: Vec<IssuedRecord> = jobs.iter().flat_map(|(r, _)| r.iter().cloned()).collect();
            store.record_issued(&all).await
        };
        match result {
            Ok(()) => {
                for (_, done) in jobs {
                    let _ = done.send(Ok(()));
                }
            }
            // The group failed as a whole: retry each request alone so one bad request cannot fail the others.
            Err(e) if jobs.len() > 1 => {
                tracing::warn!(error = %e, "group commit failed; committing requests one by one");
                for (records, done) in jobs {
                    let _ = done.send(store.record_issued(&records).await.map_err(|e| e.to_string()));
                }
            }
            Err(e) => {
                for (_, done) in jobs {
                    let _ = done.send(Err(e.to_string()));
                }
            }
        }
    }
}

fn random_hex(n: usize) -> Result<String, CaError> {
    let mut b = vec![0u8; n];
    aws_lc_rs::rand::fill(&mut b).map_err(|_| invalid("random", "", "no randomness available"))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

fn check_ttl(field: &'static str, secs: i64) -> Result<i64, CaError> {
    if secs < 0 || secs > MAX_SVID_TTL.as_secs() as i64 {
        return Err(invalid(
            field,
            secs,
            format!(
                "must be between 0 (default) and {} seconds",
                MAX_SVID_TTL.as_secs()
            ),
        ));
    }
    Ok(secs)
}

impl Ca {
    /// Builds the CA over an opened store and authority.
    pub async fn new(
        store: Arc<Store>,
        authority: Arc<Authority>,
        defaults: Defaults,
        metrics: Arc<Metrics>,
        devid: Option<crate::devid::DevIdVerifier>,
    ) -> Result<Arc<Self>, CaError> {
        let rev = store.entries_revision().await?;
        let (entries_tx, _) = watch::channel(rev);
        let (recorder, rx) = mpsc::channel(4096);
        tokio::spawn(record_writer(store.clone(), rx));
        Ok(Arc::new(Self {
            td: authority.trust_domain().clone(),
            store,
            authority,
            defaults,
            metrics,
            entries_tx,
            recorder,
            devid,
        }))
    }

    /// Records issued SVIDs durably (group commit); returns once they are committed.
    pub async fn record(&self, records: Vec<IssuedRecord>) -> Result<(), CaError> {
        if records.is_empty() {
            return Ok(());
        }
        let (tx, rx) = oneshot::channel();
        self.recorder
            .send((records, tx))
            .await
            .map_err(|_| CaError::Record("recorder stopped".into()))?;
        rx.await
            .map_err(|_| CaError::Record("recorder stopped".into()))?
            .map_err(CaError::Record)
    }

    /// A receiver that sees every new entries revision.
    pub fn subscribe_entries(&self) -> watch::Receiver<i64> {
        self.entries_tx.subscribe()
    }

    /// Checks the store for entry changes made by other replicas.
    pub async fn poll_entries_revision(&self) -> Result<(), CaError> {
        let rev = self.store.entries_revision().await?;
        self.entries_tx.send_if_modified(|cur| {
            if *cur != rev {
                *cur = rev;
                true
            } else {
                false
            }
        });
        Ok(())
    }

    fn validate_entry(&self, req: &EntryRequest, id: String, created_at: i64) -> Result<Entry, CaError> {
        let spiffe_id = parse_workload_id("spiffe_id", &req.spiffe_id, &self.td)?;
        let parent = parse_spiffe_id("parent_id", &req.parent_id)?;
        trustline_identity::spiffe_id::check_member("parent_id", &req.parent_id, &parent, &self.td)?;
        if req.selectors.is_empty() {
            return Err(invalid(
                "selector",
                "",
                "at least one selector is required (e.g. unix:uid:1000)",
            ));
        }
        let mut selectors = req
            .selectors
            .iter()
            .map(|s| s.parse::<Selector>())
            .collect::<Result<Vec<_>, _>>()?;
        selectors.sort();
        selectors.dedup();
        let x509_svid_ttl = check_ttl("x509_svid_ttl", req.x509_svid_ttl)?;
        let jwt_svid_ttl = check_ttl("jwt_svid_ttl", req.jwt_svid_ttl)?;
        for d in &req.dns_names {
            x509::check_dns_name(d).map_err(|_| invalid("dns", d, "not a valid DNS name"))?;
        }
        Ok(Entry {
            id,
            spiffe_id: spiffe_id.to_string(),
            parent_id: parent.to_string(),
            selectors,
            x509_svid_ttl,
            jwt_svid_ttl,
            dns_names: req.dns_names.clone(),
            admin: req.admin,
            revision: 0,
            created_at,
        })
    }

    fn entries_changed(&self, rev: i64) {
        self.entries_tx.send_if_modified(|cur| {
            if rev > *cur {
                *cur = rev;
                true
            } else {
                false
            }
        });
    }

    /// Refuses `id` as a workload's SPIFFE ID when it is an agent's: an attested node or the agent ID of an unspent
    /// join token. (IDs under the reserved agent path, and the CA's own, are refused by [`parse_workload_id`].)
    /// Agent IDs named before they had to be under the agent path are found here.
    pub async fn check_not_agent_id(&self, field: &'static str, id: &str) -> Result<(), CaError> {
        if self.store.is_agent_id(id).await? {
            return Err(invalid(
                field,
                id,
                "is an agent (node) ID (an attested agent's, or named by an unspent join token); a workload may not \
                 have it",
            ));
        }
        Ok(())
    }

    /// Creates a registration entry.
    pub async fn create_entry(&self, req: &EntryRequest) -> Result<Entry, CaError> {
        let entry = self.validate_entry(req, random_hex(16)?, now_unix())?;
        self.check_not_agent_id("spiffe_id", &entry.spiffe_id).await?;
        let stored = self.store.create_entry(&entry).await?;
        self.entries_changed(stored.revision);
        tracing::info!(entry_id = %stored.id, spiffe_id = %stored.spiffe_id, parent_id = %stored.parent_id, "entry created");
        Ok(stored)
    }

    /// Replaces a registration entry (validated as a whole).
    pub async fn update_entry(&self, id: &str, req: &EntryRequest) -> Result<Entry, CaError> {
        let existing = self
            .store
            .get_entry(id)
            .await?
            .ok_or_else(|| StoreError::EntryNotFound(id.to_owned()))?;
        let entry = self.validate_entry(req, existing.id, existing.created_at)?;
        self.check_not_agent_id("spiffe_id", &entry.spiffe_id).await?;
        let stored = self.store.update_entry(&entry).await?;
        self.entries_changed(stored.revision);
        tracing::info!(entry_id = %stored.id, "entry updated");
        Ok(stored)
    }

    /// Deletes a registration entry.
    pub async fn delete_entry(&self, id: &str) -> Result<Entry, CaError> {
        let deleted = self.store.delete_entry(id).await?;
        let rev = self.store.entries_revision().await?;
        self.entries_changed(rev);
        tracing::info!(entry_id = %deleted.id, "entry deleted");
        Ok(deleted)
    }

    /// Lists entries.
    pub async fn list_entries(&self, filter: &EntryFilter) -> Result<Vec<Entry>, CaError> {
        Ok(self.store.list_entries(filter).await?)
    }

    /// Creates a one-time join token. `agent_id`: the SPIFFE ID the node will get, under
    /// `spiffe://<td>/trustline/agent/`, not the CA's and not a registration entry's (default
    /// `spiffe://<td>/trustline/agent/join_token/<token>`).
    pub async fn generate_join_token(
        &self,
        ttl: Option<Duration>,
        agent_id: Option<&str>,
    ) -> Result<JoinToken, CaError> {
        let ttl = ttl.unwrap_or(self.defaults.join_token_ttl);
        if ttl.is_zero() || ttl > Duration::from_secs(7 * 86400) {
            return Err(invalid(
                "ttl",
                ttl.as_secs(),
                "must be between 1 second and 7 days",
            ));
        }
        let token = random_hex(16)?;
        let agent_spiffe_id = match agent_id {
            Some(a) if !a.is_empty() => {
                let id = parse_agent_id("spiffe_id", a, &self.td)?.to_string();
                self.check_not_entry_id("spiffe_id", &id).await?;
                id
            }
            _ => join_token_agent_id(&self.td, &token),
        };
        let now = now_unix();
        let jt = JoinToken {
            token,
            agent_spiffe_id,
            expires_at: now + ttl.as_secs() as i64,
            created_at: now,
        };
        // The database never holds an unspent token: only its SHA-256 (the store hashes it), and no agent ID
        // derived from it (that is derived again from the token the agent presents).
        let derived = agent_id.is_none_or(str::is_empty);
        self.store
            .create_join_token(&JoinToken {
                agent_spiffe_id: if derived {
                    String::new()
                } else {
                    jt.agent_spiffe_id.clone()
                },
                ..jt.clone()
            })
            .await?;
        // An agent ID derived from the token contains it: log it only when the operator chose the ID.
        let logged_id = if derived {
            join_token_agent_id(&self.td, "<token>")
        } else {
            jt.agent_spiffe_id.clone()
        };
        tracing::info!(agent_id = %logged_id, expires_at = jt.expires_at, "join token generated");
        Ok(jt)
    }

    /// Signs and records a batch of X.509-SVIDs; one result per request, in order. The records of all successful
    /// signatures are written in one transaction before any certificate is returned.
    pub async fn issue_x509(
        &self,
        reqs: Vec<X509Request>,
        requested_by: &str,
    ) -> Vec<Result<IssuedSvid, CaError>> {
        let start = Instant::now();
        let now = now_unix();
        let mut records = Vec::with_capacity(reqs.len());
        let mut results: Vec<Result<IssuedSvid, CaError>> = Vec::with_capacity(reqs.len());
        for r in reqs {
            let res = x509::check_csr(&r.csr, &r.spiffe_id.to_string(), &r.dns_names)
                .map_err(CaError::from)
                .and_then(|csr| self.sign_checked(&csr, &r, now));
            match res {
                Ok((svid, key_id)) => {
                    records.push(IssuedRecord {
                        serial: svid.serial.clone(),
                        spiffe_id: r.spiffe_id.to_string(),
                        kind: KeyKind::X509,
                        issued_at: now,
                        not_after: svid.not_after,
                        signing_key_id: key_id,
                        requested_by: requested_by.to_owned(),
                    });
                    results.push(Ok(svid));
                }
                Err(e) => {
                    self.metrics.error(e.kind());
                    results.push(Err(e));
                }
            }
        }
        if !records.is_empty() {
            let n = records.len() as u64;
            if let Err(e) = self.record(records).await {
                tracing::error!(error = %e, "could not record issued SVIDs; withholding them");
                self.metrics.error("internal");
                let msg = e.to_string();
                return results
                    .into_iter()
                    .map(|r| r.and_then(|_| Err(CaError::Record(msg.clone()))))
                    .collect();
            }
            self.metrics.issued("x509", n, start.elapsed() / n.max(1) as u32);
        }
        results
    }

    fn sign_checked(
        &self,
        csr: &ValidCsr,
        r: &X509Request,
        now: i64,
    ) -> Result<(IssuedSvid, String), CaError> {
        Ok(self
            .authority
            .sign_x509(csr, &r.spiffe_id, &r.dns_names, r.ttl, now)?)
    }

    /// Mints and records a JWT-SVID.
    pub async fn mint_jwt(
        &self,
        spiffe_id: &SpiffeId,
        audience: &[String],
        ttl: Duration,
        requested_by: &str,
    ) -> Result<MintedJwt, CaError> {
        let start = Instant::now();
        let now = now_unix();
        let (minted, kid) = self
            .authority
            .mint_jwt(spiffe_id, audience, ttl, now)
            .inspect_err(|e| {
                self.metrics.error(if matches!(e, AuthorityError::Jwt(_)) {
                    "invalid_argument"
                } else {
                    "internal"
                })
            })?;
        self.record(vec![IssuedRecord {
            serial: minted.jti.clone(),
            spiffe_id: spiffe_id.to_string(),
            kind: KeyKind::Jwt,
            issued_at: now,
            not_after: minted.expires_at,
            signing_key_id: kid,
            requested_by: requested_by.to_owned(),
        }])
        .await?;
        self.metrics.issued("jwt", 1, start.elapsed());
        Ok(minted)
    }

    /// Attests a node with a one-time join token and issues its agent SVID. The CSR is checked before the token
    /// is spent, so a bad CSR leaves the token usable.
    pub async fn attest_join_token(
        &self,
        token: &str,
        csr_der: &[u8],
    ) -> Result<(SpiffeId, IssuedSvid), CaError> {
        if token.is_empty() {
            return Err(invalid("join_token", "", "is required"));
        }
        let csr = self.attestation_csr(csr_der)?;
        // Looked up by the token's digest only: a stored digest presented as a token is refused, and tokens an
        // older version stored in clear were hashed when the store opened.
        let jt = self
            .store
            .consume_join_token(token, now_unix())
            .await
            .inspect_err(|_| self.metrics.error("token"))?;
        let agent_id = if jt.agent_spiffe_id.is_empty() {
            join_token_agent_id(&self.td, token)
        } else {
            jt.agent_spiffe_id.clone()
        };
        let agent_id = parse_spiffe_id("agent_spiffe_id", &agent_id)?;
        self.admit_node(&csr, agent_id, "join_token").await
    }

    /// A fresh nonce for a TPM DevID proof.
    pub fn devid_challenge(&self) -> Result<(Vec<u8>, i64), CaError> {
        let v = self.devid.as_ref().ok_or(crate::devid::DevIdError::NotEnabled)?;
        Ok(v.challenge(now_unix())?)
    }

    /// First attestation of a node that proves possession of a TPM-resident DevID key (see [`crate::devid`]).
    pub async fn attest_devid(
        &self,
        chain: &[Vec<u8>],
        nonce: &[u8],
        signature: &[u8],
        csr_der: &[u8],
    ) -> Result<(SpiffeId, IssuedSvid), CaError> {
        let v = self.devid.as_ref().ok_or(crate::devid::DevIdError::NotEnabled)?;
        let csr = self.attestation_csr(csr_der)?;
        let node = v
            .verify(self.td.as_str(), chain, nonce, signature, csr_der, now_unix())
            .inspect_err(|_| self.metrics.error("devid"))?;
        let id = tpm_devid_agent_id(&self.td, &node.fingerprint);
        let agent_id = parse_spiffe_id("agent_spiffe_id", &id)?;
        tracing::info!(subject = %node.subject, "DevID proof verified");
        self.admit_node(&csr, agent_id, "tpm_devid").await
    }

    /// Parses an attestation CSR; any URI SAN it names must be in our trust domain.
    fn attestation_csr(&self, csr_der: &[u8]) -> Result<x509::ValidCsr, CaError> {
        let csr = x509::parse_csr(csr_der)?;
        for u in &x509::csr_uri_sans(&csr) {
            let id = parse_spiffe_id("csr URI SAN", u)?;
            trustline_identity::spiffe_id::check_member("csr URI SAN", u, &id, &self.td)?;
        }
        Ok(csr)
    }

    /// Refuses `id` as an agent's SPIFFE ID when a registration entry issues it to workloads.
    async fn check_not_entry_id(&self, field: &'static str, id: &str) -> Result<(), CaError> {
        let filter = EntryFilter {
            spiffe_id: Some(id.to_owned()),
            ..EntryFilter::default()
        };
        if let Some(e) = self.store.list_entries(&filter).await?.first() {
            return Err(invalid(
                field,
                id,
                format!(
                    "is the SPIFFE ID of registration entry {}; an agent (node) may not have it",
                    e.id
                ),
            ));
        }
        Ok(())
    }

    /// Issues an attested node's agent SVID and records the node. Whatever the token or proof says, an agent never
    /// gets the CA's own ID or a registration entry's (a token stored by an older version may name any ID: those
    /// two are refused, an ID outside the agent path is honoured).
    async fn admit_node(
        &self,
        csr: &x509::ValidCsr,
        agent_id: SpiffeId,
        attestation: &str,
    ) -> Result<(SpiffeId, IssuedSvid), CaError> {
        let now = now_unix();
        let id = agent_id.to_string();
        if id == ca_server_id(&self.td) {
            return Err(invalid("agent_spiffe_id", &id, "reserved for the CA"));
        }
        self.check_not_entry_id("agent_spiffe_id", &id).await?;
        x509::check_csr_sans(csr, &id, &[])?;
        let (svid, key_id) = self
            .authority
            .sign_x509(csr, &agent_id, &[], self.defaults.agent_ttl, now)?;
        self.record(vec![IssuedRecord {
            serial: svid.serial.clone(),
            spiffe_id: id.clone(),
            kind: KeyKind::X509,
            issued_at: now,
            not_after: svid.not_after,
            signing_key_id: key_id,
            requested_by: attestation.into(),
        }])
        .await?;
        self.store
            .upsert_node(&NodeRecord {
                spiffe_id: id,
                attestation_type: attestation.into(),
                serial: svid.serial.clone(),
                expires_at: svid.not_after,
                created_at: now,
                updated_at: now,
            })
            .await?;
        self.metrics.agent_attested();
        self.metrics.issued("agent", 1, Duration::ZERO);
        tracing::info!(agent_id = %agent_id, serial = %svid.serial, attestation, "node attested");
        Ok((agent_id, svid))
    }

    /// Renews an attested agent's SVID.
    pub async fn renew_agent(&self, agent_id: &SpiffeId, csr_der: &[u8]) -> Result<IssuedSvid, CaError> {
        let node = self.require_node(agent_id).await?;
        let id = agent_id.to_string();
        let mut out = self
            .issue_x509(
                vec![X509Request {
                    csr: csr_der.to_vec(),
                    spiffe_id: agent_id.clone(),
                    dns_names: Vec::new(),
                    ttl: self.defaults.agent_ttl,
                }],
                &id,
            )
            .await;
        let svid = out.pop().ok_or_else(|| invalid("csr", "", "nothing issued"))??;
        let now = now_unix();
        self.store
            .upsert_node(&NodeRecord {
                serial: svid.serial.clone(),
                expires_at: svid.not_after,
                updated_at: now,
                ..node
            })
            .await?;
        Ok(svid)
    }

    /// The node record of an agent, or PermissionDenied if it was never attested (or was evicted).
    pub async fn require_node(&self, agent_id: &SpiffeId) -> Result<NodeRecord, CaError> {
        self.store
            .get_node(&agent_id.to_string())
            .await?
            .ok_or_else(|| CaError::PermissionDenied(format!("{agent_id} is not an attested agent")))
    }

    /// Every attested agent.
    pub async fn list_agents(&self) -> Result<Vec<NodeRecord>, CaError> {
        Ok(self.store.list_nodes().await?)
    }

    /// Evicts an agent: its node record goes, so every later call it makes (renewal, entries, SVIDs) is refused and
    /// its open update stream ends. It can come back only by attesting again (a new join token, or its DevID).
    pub async fn evict_agent(&self, agent_id: &str) -> Result<(), CaError> {
        let id = parse_spiffe_id("spiffe_id", agent_id)?;
        if !self.store.delete_node(&id.to_string()).await? {
            return Err(CaError::AgentNotFound(id.to_string()));
        }
        // Wake every update stream: each checks that its agent is still attested.
        self.entries_tx.send_modify(|_| {});
        tracing::info!(agent_id = %id, "agent evicted");
        Ok(())
    }

    /// The entries an agent may issue (those whose parent is the agent).
    pub async fn authorized_entries(&self, agent_id: &SpiffeId) -> Result<Vec<Entry>, CaError> {
        Ok(self.store.list_entries_by_parent(&agent_id.to_string()).await?)
    }

    /// TTL for an entry's X.509-SVID.
    pub fn x509_ttl(&self, e: &Entry) -> Duration {
        if e.x509_svid_ttl > 0 {
            Duration::from_secs(e.x509_svid_ttl as u64)
        } else {
            self.defaults.x509_ttl
        }
    }

    /// TTL for an entry's JWT-SVID.
    pub fn jwt_ttl(&self, e: &Entry) -> Duration {
        if e.jwt_svid_ttl > 0 {
            Duration::from_secs(e.jwt_svid_ttl as u64)
        } else {
            self.defaults.jwt_ttl
        }
    }
}
