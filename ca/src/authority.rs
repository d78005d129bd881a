//! The CA's signing keys and their rotation, and the trust bundle they publish.
//!
//! Each kind of key (X.509 CA, JWT) moves through SPIRE's phases: **prepared** (generated, published in the
//! bundle, not yet signing) → **active** (signing) → **old** (no longer signing, still published) → **retired**
//! (removed from the bundle once everything it signed has expired). With a CA lifetime L the next key is prepared
//! at `notAfter − min(L/2, 30d)` and activated at `notAfter − min(L/6, 7d)`, so it has been in every bundle for a
//! long time before anything chains to it. No SVID ever chains to a key absent from the bundle.
//!
//! State lives in the store, so several CA replicas on one PostgreSQL database share keys (sealed key blobs) and
//! converge: each polls the bundle sequence every second and reloads when another replica changed it; racing
//! replicas are arbitrated by the store's unique slots and conditional activation.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rcgen::Issuer;
use tokio::sync::watch;
use trustline_hsm::{KeyRef, KeyStore, KeyType, Signer};
use trustline_identity::bundle::{jwk_from_spki, BundleError, JwkSet, USE_JWT_SVID, USE_X509_SVID};
use trustline_identity::spiffe_id::{SpiffeId, TrustDomain};

use crate::jwt::{self, JwtAlg, JwtError, JwtKey, MintedJwt};
use crate::store::{CaKeyRecord, KeyKind, KeyState, Store, StoreError};
use crate::x509::{self, CaCertSpec, HsmKey, IssuedSvid, SigningCa, ValidCsr, X509Error, BACKDATE};

/// Time an old key stays published after its successor was activated, even if it signed nothing: covers
/// replicas that had not yet reloaded and were still signing with it.
pub const RETIRE_GRACE: Duration = Duration::from_secs(60);

/// Bundle refresh hint given to consumers.
pub const REFRESH_HINT: Duration = Duration::from_secs(60);

/// Something went wrong with the CA's keys.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthorityError {
    /// No active key of this kind (the CA has not finished starting).
    #[error("no active {0} CA key")]
    NoActiveKey(&'static str),
    /// Key backend failure.
    #[error("key backend: {0}")]
    Hsm(#[from] trustline_hsm::HsmError),
    /// Certificate failure.
    #[error(transparent)]
    X509(#[from] X509Error),
    /// JWT failure.
    #[error(transparent)]
    Jwt(#[from] JwtError),
    /// Store failure.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// Bundle encoding failure.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// An operator-provided existing key cannot be used.
    #[error("keys.pkcs11 existing key: {0}")]
    ExistingKey(String),
    /// The upstream CA material is unusable.
    #[error("upstream CA {path}: {reason}")]
    Upstream {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// A stored key record is inconsistent.
    #[error("CA key {id}: {reason}")]
    Record {
        /// Key id.
        id: String,
        /// What is wrong.
        reason: String,
    },
}

/// The upstream CA in intermediate mode.
pub struct Upstream {
    /// Issuer over the upstream CA's certificate and key.
    pub issuer: Issuer<'static, HsmKey>,
    /// Upstream certificate (DER).
    pub cert_der: Vec<u8>,
    /// Roots published in the bundle.
    pub roots: Vec<Vec<u8>>,
    /// End of the upstream certificate's validity.
    pub not_after: i64,
}

/// Fixed settings of the authority.
pub struct Settings {
    /// Trust domain.
    pub trust_domain: TrustDomain,
    /// Subject organization of CA certificates.
    pub organization: String,
    /// Lifetime of each CA key.
    pub ca_ttl: Duration,
    /// X.509 CA key type.
    pub x509_key_type: KeyType,
    /// JWT key type.
    pub jwt_key_type: KeyType,
    /// RSA-PSS for RSA JWT keys.
    pub jwt_rsa_pss: bool,
    /// Intermediate mode.
    pub upstream: Option<Upstream>,
    /// Keys that exist already in the backend (a PKCS#11 label) to use as the first X.509 and JWT keys instead
    /// of generating them; rotations generate.
    pub existing_keys: ExistingKeys,
}

/// Operator-provided first keys (see [`Settings::existing_keys`]).
#[derive(Debug, Clone, Default)]
pub struct ExistingKeys {
    /// The first X.509 CA key.
    pub x509: Option<KeyRef>,
    /// The first JWT key.
    pub jwt: Option<KeyRef>,
}

/// The published trust bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    /// Increases with every change.
    pub sequence: i64,
    /// X.509 roots (DER).
    pub x509_authorities: Vec<Vec<u8>>,
    /// The whole bundle as a SPIFFE JWK set.
    pub jwks: JwkSet,
    /// `jwks` serialized.
    pub jwks_json: Vec<u8>,
}

struct ActiveX509 {
    key_id: String,
    ca: SigningCa,
}

struct State {
    keys: Vec<CaKeyRecord>,
    x509: Option<Arc<ActiveX509>>,
    jwt: Option<(String, JwtKey)>,
    bundle: Arc<Bundle>,
}

/// What a rotation step did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RotationEvent {
    /// A key was generated and published.
    Prepared {
        /// Kind.
        kind: KeyKind,
        /// Key id.
        id: String,
    },
    /// A prepared key became the signing key.
    Activated {
        /// Kind.
        kind: KeyKind,
        /// Key id.
        id: String,
    },
    /// An old key left the bundle.
    Retired {
        /// Kind.
        kind: KeyKind,
        /// Key id.
        id: String,
    },
}

impl std::fmt::Display for RotationEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Prepared { kind, id } => write!(f, "prepared {} key {id}", kind.as_str()),
            Self::Activated { kind, id } => write!(f, "activated {} key {id}", kind.as_str()),
            Self::Retired { kind, id } => write!(f, "retired {} key {id}", kind.as_str()),
        }
    }
}

/// The CA's keys.
pub struct Authority {
    settings: Settings,
    store: Arc<Store>,
    keys: KeyStore,
    state: RwLock<Arc<State>>,
    signers: Mutex<HashMap<String, Arc<dyn Signer>>>,
    bundle_tx: watch::Sender<Arc<Bundle>>,
    rotation_lock: tokio::sync::Mutex<()>,
}

fn random_id() -> Result<String, AuthorityError> {
    let mut b = [0u8; 16];
    aws_lc_rs::rand::fill(&mut b).map_err(|_| AuthorityError::Record {
        id: String::new(),
        reason: "no randomness".into(),
    })?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

fn lifetime(rec: &CaKeyRecord) -> i64 {
    (rec.not_after - rec.not_before).max(0)
}

/// When the successor of `rec` is prepared.
pub fn prepare_at(rec: &CaKeyRecord) -> i64 {
    rec.not_after - (lifetime(rec) / 2).min(30 * 86400)
}

/// When the successor of `rec` is activated.
pub fn activate_at(rec: &CaKeyRecord) -> i64 {
    rec.not_after - (lifetime(rec) / 6).min(7 * 86400)
}

impl Authority {
    /// Opens the authority: loads keys from the store, creating and activating the first keys on first start.
    pub async fn open(
        settings: Settings,
        store: Arc<Store>,
        keys: KeyStore,
    ) -> Result<Arc<Self>, AuthorityError> {
        let empty = Arc::new(Bundle {
            sequence: -1,
            x509_authorities: Vec::new(),
            jwks: JwkSet {
                keys: Vec::new(),
                spiffe_sequence: None,
                spiffe_refresh_hint: None,
            },
            jwks_json: Vec::new(),
        });
        let (bundle_tx, _) = watch::channel(empty.clone());
        let auth = Arc::new(Self {
            settings,
            store,
            keys,
            state: RwLock::new(Arc::new(State {
                keys: Vec::new(),
                x509: None,
                jwt: None,
                bundle: empty,
            })),
            signers: Mutex::new(HashMap::new()),
            bundle_tx,
            rotation_lock: tokio::sync::Mutex::new(()),
        });
        auth.reload().await?;
        auth.tick(x509::now_unix()).await?;
        Ok(auth)
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.settings.trust_domain
    }

    fn state(&self) -> Arc<State> {
        self.state.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The current bundle.
    pub fn bundle(&self) -> Arc<Bundle> {
        self.state().bundle.clone()
    }

    /// A receiver that sees every new bundle.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Bundle>> {
        self.bundle_tx.subscribe()
    }

    /// Where the CA's keys live (`software`, `pkcs11`, `tpm`).
    pub fn backend_name(&self) -> &'static str {
        self.keys.backend_name()
    }

    /// All key records, oldest first.
    pub fn keys(&self) -> Vec<CaKeyRecord> {
        self.state().keys.clone()
    }

    /// Id of the active X.509 CA key.
    pub fn active_x509_key_id(&self) -> Option<String> {
        self.state().x509.as_ref().map(|a| a.key_id.clone())
    }

    /// Expiry of the active X.509 CA certificate.
    pub fn x509_ca_not_after(&self) -> Option<i64> {
        self.state().x509.as_ref().map(|a| a.ca.not_after)
    }

    fn signer(&self, rec: &CaKeyRecord) -> Result<Arc<dyn Signer>, AuthorityError> {
        let mut cache = self.signers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = cache.get(&rec.id) {
            return Ok(s.clone());
        }
        let s = self.keys.load(&KeyRef::new(rec.key_ref.clone()))?;
        cache.insert(rec.id.clone(), s.clone());
        Ok(s)
    }

    /// Re-reads the keys from the store and republishes the bundle if it changed.
    pub async fn reload(&self) -> Result<(), AuthorityError> {
        let sequence = self.store.bundle_sequence().await?;
        let keys = self.store.list_ca_keys().await?;
        let mut x509 = None;
        let mut jwt = None;
        let mut authorities = Vec::new();
        let mut jwks = Vec::new();
        if let Some(up) = &self.settings.upstream {
            authorities.extend(up.roots.iter().cloned());
        }
        for rec in &keys {
            if rec.state == KeyState::Retired {
                continue;
            }
            match rec.kind {
                KeyKind::X509 => {
                    let cert = rec.certificate.clone().ok_or_else(|| AuthorityError::Record {
                        id: rec.id.clone(),
                        reason: "X.509 CA key without certificate".into(),
                    })?;
                    if self.settings.upstream.is_none() {
                        authorities.push(cert.clone());
                    }
                    if rec.state == KeyState::Active {
                        let signer = self.signer(rec)?;
                        let is_root = self.settings.upstream.is_none();
                        let mut ca = SigningCa::new(cert, HsmKey::new(signer), is_root, rec.not_after)?;
                        if let Some(up) = &self.settings.upstream {
                            if !up.roots.contains(&up.cert_der) {
                                ca.chain_above.push(up.cert_der.clone());
                            }
                        }
                        x509 = Some(Arc::new(ActiveX509 {
                            key_id: rec.id.clone(),
                            ca,
                        }));
                    }
                }
                KeyKind::Jwt => {
                    jwks.push(jwk_from_spki(
                        &rec.public_key_spki,
                        USE_JWT_SVID,
                        Some(rec.id.clone()),
                        None,
                    )?);
                    if rec.state == KeyState::Active {
                        let signer = self.signer(rec)?;
                        let alg = JwtAlg::for_key(signer.key_type(), self.settings.jwt_rsa_pss)?;
                        jwt = Some((
                            rec.id.clone(),
                            JwtKey {
                                kid: rec.id.clone(),
                                signer,
                                alg,
                                not_after: rec.not_after,
                            },
                        ));
                    }
                }
            }
        }
        let mut all = Vec::with_capacity(authorities.len() + jwks.len());
        for der in &authorities {
            let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| AuthorityError::Record {
                id: "bundle".into(),
                reason: e.to_string(),
            })?;
            all.push(jwk_from_spki(
                cert.public_key().raw,
                USE_X509_SVID,
                None,
                Some(der),
            )?);
        }
        all.extend(jwks);
        let set = JwkSet {
            keys: all,
            spiffe_sequence: Some(sequence),
            spiffe_refresh_hint: Some(REFRESH_HINT.as_secs() as i64),
        };
        let jwks_json = serde_json::to_vec(&set).map_err(|e| BundleError::Json(e.to_string()))?;
        let bundle = Arc::new(Bundle {
            sequence,
            x509_authorities: authorities,
            jwks: set,
            jwks_json,
        });
        let changed = *self.bundle_tx.borrow() != bundle;
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(State {
            keys,
            x509,
            jwt,
            bundle: bundle.clone(),
        });
        if changed {
            self.bundle_tx.send_replace(bundle);
        }
        Ok(())
    }

    /// Reloads if another replica changed the keys.
    pub async fn reload_if_changed(&self) -> Result<bool, AuthorityError> {
        let seq = self.store.bundle_sequence().await?;
        if seq != self.state().bundle.sequence {
            self.reload().await?;
            return Ok(true);
        }
        Ok(false)
    }

    async fn prepare(&self, kind: KeyKind, now: i64) -> Result<Option<RotationEvent>, AuthorityError> {
        let key_type = match kind {
            KeyKind::X509 => self.settings.x509_key_type,
            KeyKind::Jwt => self.settings.jwt_key_type,
        };
        let existing = match kind {
            KeyKind::X509 => self.settings.existing_keys.x509.as_ref(),
            KeyKind::Jwt => self.settings.existing_keys.jwt.as_ref(),
        };
        // An operator's existing key is the first key of its kind; once recorded, rotations generate.
        let unused = match existing {
            Some(r) => {
                let used = self.store.list_ca_keys().await?.iter().any(|k| k.kind == kind);
                (!used).then(|| r.clone())
            }
            None => None,
        };
        let (signer, key_ref) = match unused {
            Some(r) => {
                let signer = self.keys.load(&r)?;
                if signer.key_type() != key_type {
                    return Err(AuthorityError::ExistingKey(format!(
                        "{} is {}, but the {kind:?} key type is {key_type}",
                        r.as_str(),
                        signer.key_type()
                    )));
                }
                (signer, r)
            }
            None => self.keys.generate(key_type)?,
        };
        let id = random_id()?;
        let not_before = now - BACKDATE.as_secs() as i64;
        let mut not_after = now + self.settings.ca_ttl.as_secs() as i64;
        if let Some(up) = &self.settings.upstream {
            not_after = not_after.min(up.not_after);
        }
        let certificate = match kind {
            KeyKind::X509 => {
                let key = HsmKey::new(signer.clone());
                let spec = CaCertSpec {
                    trust_domain: self.settings.trust_domain.as_str(),
                    organization: &self.settings.organization,
                    not_before,
                    not_after,
                };
                let (der, _) = match &self.settings.upstream {
                    None => x509::self_signed_ca(&key, &spec)?,
                    Some(up) => x509::intermediate_ca(&key, &spec, &up.issuer)?,
                };
                Some(der)
            }
            KeyKind::Jwt => None,
        };
        let rec = CaKeyRecord {
            id: id.clone(),
            kind,
            state: KeyState::Prepared,
            key_type: key_type.as_str().to_owned(),
            key_ref: key_ref.as_str().to_owned(),
            certificate,
            public_key_spki: signer.public_key_spki_der(),
            not_before,
            not_after,
            created_at: now,
            activated_at: None,
            retired_at: None,
        };
        match self.store.insert_ca_key(&rec).await {
            Ok(()) => {
                self.signers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(id.clone(), signer);
                tracing::info!(kind = kind.as_str(), key_id = %id, not_after, "prepared next CA key (published in bundle)");
                Ok(Some(RotationEvent::Prepared { kind, id }))
            }
            // Another replica prepared one first: use theirs.
            Err(StoreError::KeySlotTaken { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn activate(
        &self,
        kind: KeyKind,
        id: &str,
        now: i64,
    ) -> Result<Option<RotationEvent>, AuthorityError> {
        if self.store.activate_ca_key(kind, id, now).await? {
            tracing::info!(kind = kind.as_str(), key_id = %id, "activated CA key");
            Ok(Some(RotationEvent::Activated {
                kind,
                id: id.to_owned(),
            }))
        } else {
            Ok(None)
        }
    }

    /// Runs the rotation state machine once at time `now`; returns what it did.
    pub async fn tick(&self, now: i64) -> Result<Vec<RotationEvent>, AuthorityError> {
        let _guard = self.rotation_lock.lock().await;
        self.reload_if_changed().await?;
        let mut events = Vec::new();
        for kind in [KeyKind::X509, KeyKind::Jwt] {
            let keys = self.state().keys.clone();
            let active = keys
                .iter()
                .find(|k| k.kind == kind && k.state == KeyState::Active)
                .cloned();
            let mut prepared = keys
                .iter()
                .find(|k| k.kind == kind && k.state == KeyState::Prepared)
                .map(|k| k.id.clone());
            let need_prepare = match &active {
                None => prepared.is_none(),
                Some(a) => prepared.is_none() && now >= prepare_at(a),
            };
            if need_prepare {
                if let Some(ev) = self.prepare(kind, now).await? {
                    if let RotationEvent::Prepared { id, .. } = &ev {
                        prepared = Some(id.clone());
                    }
                    events.push(ev);
                }
                self.reload().await?;
                if prepared.is_none() {
                    prepared = self
                        .state()
                        .keys
                        .iter()
                        .find(|k| k.kind == kind && k.state == KeyState::Prepared)
                        .map(|k| k.id.clone());
                }
            }
            let need_activate = match &active {
                None => true,
                Some(a) => now >= activate_at(a),
            };
            if need_activate {
                if let Some(id) = prepared {
                    if let Some(ev) = self.activate(kind, &id, now).await? {
                        events.push(ev);
                    }
                    self.reload().await?;
                }
            }
            events.extend(self.retire_expired(kind, now).await?);
        }
        Ok(events)
    }

    async fn retire_expired(&self, kind: KeyKind, now: i64) -> Result<Vec<RotationEvent>, AuthorityError> {
        let keys = self.state().keys.clone();
        let Some(active) = keys
            .iter()
            .find(|k| k.kind == kind && k.state == KeyState::Active)
        else {
            return Ok(Vec::new());
        };
        let since_activation = now - active.activated_at.unwrap_or(now);
        let mut events = Vec::new();
        for old in keys.iter().filter(|k| k.kind == kind && k.state == KeyState::Old) {
            let expired_cert = now >= old.not_after;
            let signed_until = self.store.max_not_after_signed_by(&old.id).await?;
            let all_expired = signed_until.is_none_or(|t| t <= now);
            if expired_cert || (all_expired && since_activation >= RETIRE_GRACE.as_secs() as i64) {
                self.store.retire_ca_key(&old.id, now).await?;
                tracing::info!(kind = kind.as_str(), key_id = %old.id, "retired CA key (everything it signed has expired)");
                events.push(RotationEvent::Retired {
                    kind,
                    id: old.id.clone(),
                });
            }
        }
        if !events.is_empty() {
            self.reload().await?;
        }
        Ok(events)
    }

    /// Operator-driven rotation: for each kind asked, prepare a next key if none is prepared, else activate it.
    pub async fn rotate(&self, kinds: &[KeyKind], now: i64) -> Result<Vec<RotationEvent>, AuthorityError> {
        let _guard = self.rotation_lock.lock().await;
        self.reload_if_changed().await?;
        let mut events = Vec::new();
        for &kind in kinds {
            let prepared = self
                .state()
                .keys
                .iter()
                .find(|k| k.kind == kind && k.state == KeyState::Prepared)
                .map(|k| k.id.clone());
            match prepared {
                None => events.extend(self.prepare(kind, now).await?),
                Some(id) => events.extend(self.activate(kind, &id, now).await?),
            }
            self.reload().await?;
        }
        Ok(events)
    }

    /// Signs an X.509-SVID with the active CA key. Returns the SVID and the signing key id.
    pub fn sign_x509(
        &self,
        csr: &ValidCsr,
        id: &SpiffeId,
        dns_names: &[String],
        ttl: Duration,
        now: i64,
    ) -> Result<(IssuedSvid, String), AuthorityError> {
        let state = self.state();
        let active = state.x509.as_ref().ok_or(AuthorityError::NoActiveKey("x509"))?;
        let svid = x509::sign_svid(&active.ca, csr, id, dns_names, ttl, now)?;
        Ok((svid, active.key_id.clone()))
    }

    /// Mints a JWT-SVID with the active JWT key. Returns the token and the signing key id.
    pub fn mint_jwt(
        &self,
        sub: &SpiffeId,
        audience: &[String],
        ttl: Duration,
        now: i64,
    ) -> Result<(MintedJwt, String), AuthorityError> {
        let state = self.state();
        let (kid, key) = state.jwt.as_ref().ok_or(AuthorityError::NoActiveKey("jwt"))?;
        let minted = jwt::mint(key, &sub.to_string(), audience, ttl.as_secs() as i64, now)?;
        Ok((minted, kid.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreConfig;
    use rustls::pki_types::{CertificateDer, UnixTime};
    use trustline_hsm::SoftwareKeyStore;
    use trustline_identity::tls::TrustBundle;

    async fn authority(dir: &std::path::Path, ttl: Duration) -> Arc<Authority> {
        let store = Arc::new(
            Store::open(&StoreConfig::Sqlite {
                path: dir.join("ca.db"),
            })
            .await
            .unwrap(),
        );
        let key = dir.join("seal.key");
        if !key.exists() {
            SoftwareKeyStore::create_key_file(&key).unwrap();
        }
        let keys = KeyStore::Software(SoftwareKeyStore::from_key_file(&key).unwrap());
        let settings = Settings {
            trust_domain: TrustDomain::new("example.org").unwrap(),
            organization: "Test".into(),
            ca_ttl: ttl,
            x509_key_type: KeyType::EcP256,
            jwt_key_type: KeyType::EcP256,
            jwt_rsa_pss: false,
            upstream: None,
            existing_keys: ExistingKeys::default(),
        };
        let a = Authority::open(settings, store, keys).await.unwrap();
        a
    }

    fn verify(chain: &[Vec<u8>], roots: &[Vec<u8>], at: i64) -> Result<SpiffeId, rustls::Error> {
        let b = TrustBundle::new(TrustDomain::new("example.org").unwrap(), roots).unwrap();
        let inter: Vec<CertificateDer<'_>> = chain[1..]
            .iter()
            .map(|c| CertificateDer::from(c.as_slice()))
            .collect();
        b.verify_chain(
            &CertificateDer::from(chain[0].as_slice()),
            &inter,
            UnixTime::since_unix_epoch(Duration::from_secs(at as u64)),
            true,
        )
    }

    fn csr() -> ValidCsr {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        let der = params.serialize_request(&key).unwrap().der().to_vec();
        x509::parse_csr(&der).unwrap()
    }

    #[test]
    fn phases_follow_spire() {
        let rec = CaKeyRecord {
            id: "k".into(),
            kind: KeyKind::X509,
            state: KeyState::Active,
            key_type: "ec-p256".into(),
            key_ref: String::new(),
            certificate: None,
            public_key_spki: Vec::new(),
            not_before: 0,
            not_after: 24 * 3600,
            created_at: 0,
            activated_at: Some(0),
            retired_at: None,
        };
        assert_eq!(prepare_at(&rec), 12 * 3600);
        assert_eq!(activate_at(&rec), 20 * 3600);
        let long = CaKeyRecord {
            not_after: 365 * 86400,
            ..rec
        };
        assert_eq!(prepare_at(&long), 365 * 86400 - 30 * 86400);
        assert_eq!(activate_at(&long), 365 * 86400 - 7 * 86400);
    }

    /// Drives the rotation clock by hand through two full rotations and checks, at every step, that every SVID
    /// issued so far and still valid verifies against the bundle of that moment, and that a key leaves the bundle
    /// only once nothing it signed is still valid.
    #[tokio::test]
    async fn svids_verify_against_the_bundle_at_every_moment_of_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let ttl = Duration::from_secs(24 * 3600);
        let a = authority(dir.path(), ttl).await;
        // Re-base the first key's clock: issue relative to its own notBefore.
        let first = a.keys().into_iter().find(|k| k.kind == KeyKind::X509).unwrap();
        let start = first.not_before + 10;
        let id = SpiffeId::new("spiffe://example.org/w").unwrap();
        let mut svids: Vec<(Vec<Vec<u8>>, i64)> = Vec::new();
        let mut retired_seen = 0;
        let step = 1800; // 30 min
        let mut now = start;
        while now < start + 3 * 24 * 3600 {
            let events = a.tick(now).await.unwrap();
            for ev in &events {
                if let RotationEvent::Retired {
                    kind: KeyKind::X509, ..
                } = ev
                {
                    retired_seen += 1;
                }
            }
            let (svid, key_id) = a
                .sign_x509(&csr(), &id, &[], Duration::from_secs(3600), now)
                .unwrap();
            a.store
                .record_issued(&[crate::store::IssuedRecord {
                    serial: svid.serial.clone(),
                    spiffe_id: id.to_string(),
                    kind: KeyKind::X509,
                    issued_at: now,
                    not_after: svid.not_after,
                    signing_key_id: key_id,
                    requested_by: "test".into(),
                }])
                .await
                .unwrap();
            svids.push((svid.chain, svid.not_after));
            let roots = a.bundle().x509_authorities.clone();
            for (i, (chain, not_after)) in svids.iter().enumerate() {
                if *not_after > now {
                    verify(chain, &roots, now)
                        .unwrap_or_else(|e| panic!("t+{}s: SVID #{i} fails: {e}", now - start));
                }
            }
            // Never more than prepared + active + old(s) published.
            assert!(roots.len() <= 3, "bundle grew to {}", roots.len());
            now += step;
        }
        let x509_keys = a.keys().into_iter().filter(|k| k.kind == KeyKind::X509).count();
        assert!(x509_keys >= 3, "expected several rotations, got {x509_keys} keys");
        assert!(retired_seen >= 1, "old keys are retired");
        // JWT keys rotate too, and the JWKS always contains the active kid.
        let jwt_keys = a.keys().into_iter().filter(|k| k.kind == KeyKind::Jwt).count();
        assert!(jwt_keys >= 3);
        let (minted, kid) = a
            .mint_jwt(&id, &["aud".to_owned()], Duration::from_secs(300), now)
            .unwrap();
        assert!(a
            .bundle()
            .jwks
            .jwt_keys()
            .any(|k| k.kid.as_deref() == Some(kid.as_str())));
        assert!(!minted.token.is_empty());
    }

    #[tokio::test]
    async fn manual_rotation_prepares_then_activates_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let a = authority(dir.path(), Duration::from_secs(86400)).await;
        let now = x509::now_unix();
        let ev = a.rotate(&[KeyKind::X509], now).await.unwrap();
        assert!(matches!(
            ev.as_slice(),
            [RotationEvent::Prepared {
                kind: KeyKind::X509,
                ..
            }]
        ));
        assert_eq!(a.bundle().x509_authorities.len(), 2);
        let before = a.active_x509_key_id();
        let ev = a.rotate(&[KeyKind::X509], now).await.unwrap();
        assert!(matches!(
            ev.as_slice(),
            [RotationEvent::Activated {
                kind: KeyKind::X509,
                ..
            }]
        ));
        assert_ne!(a.active_x509_key_id(), before);
        let bundle = a.bundle();
        drop(a);
        let b = authority(dir.path(), Duration::from_secs(86400)).await;
        assert_eq!(b.bundle().x509_authorities, bundle.x509_authorities);
    }
}
