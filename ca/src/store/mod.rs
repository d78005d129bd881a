//! The CA's durable store: SQLite (default, one embedded file) or PostgreSQL (several CA replicas on one
//! database). One concrete enum, two real backends, the same behaviour, tested by one shared suite.
//!
//! Every change that agents must see bumps a counter in the same transaction: the entries revision (entry
//! create/update/delete) and the bundle sequence (any CA key change). Replicas poll these counters.
//! Uniqueness (duplicate entries, serials, one prepared and one active key per kind) is enforced by the database
//! itself, so racing replicas cannot both win. A failed operation changes nothing.

//!
//! Schema changes are ordered, append-only migrations (see `migrations.rs`); a binary refuses a database written
//! by a newer one ([`StoreError::SchemaTooNew`]).
//!
//! Stored secrets are not credentials: join tokens are stored as digests and looked up by the digest of the token
//! presented; a presented value in the stored form is refused ([`StoreError::TokenInStoredForm`]), and rows an
//! older version kept in clear are hashed on open, in the migration transaction. The SQLite file, its `-wal` and
//! `-shm` files and a folder the store creates for them are private to the CA's user (0600, 0700), and a file
//! that group or others can access is refused ([`StoreError::FileMode`]).

mod migrations;
mod postgres;
mod sqlite;

use std::path::PathBuf;
use std::str::FromStr;

use trustline_identity::Selector;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

/// Schema version this binary writes and understands.
pub const SCHEMA_VERSION: i64 = 1;

/// A registration entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Random id.
    pub id: String,
    /// SPIFFE ID issued to matching workloads.
    pub spiffe_id: String,
    /// SPIFFE ID of the node allowed to issue it.
    pub parent_id: String,
    /// Selectors (stored sorted and deduplicated).
    pub selectors: Vec<Selector>,
    /// X.509-SVID TTL in seconds (0 = default).
    pub x509_svid_ttl: i64,
    /// JWT-SVID TTL in seconds (0 = default).
    pub jwt_svid_ttl: i64,
    /// DNS names.
    pub dns_names: Vec<String>,
    /// Admin flag.
    pub admin: bool,
    /// The entries revision at which this entry last changed (set by the store).
    pub revision: i64,
    /// Creation time (unix seconds).
    pub created_at: i64,
}

/// Filters for [`Store::list_entries`]; `None` matches all.
#[derive(Debug, Clone, Default)]
pub struct EntryFilter {
    /// Exact SPIFFE ID.
    pub spiffe_id: Option<String>,
    /// Exact parent ID.
    pub parent_id: Option<String>,
    /// Entries having this selector.
    pub selector: Option<Selector>,
}

/// A one-time join token.
///
/// The store never holds the token itself, only its digest ([`token_digest`], `sha256:<hex>`): callers give and
/// present the token in clear and the store hashes it, so what is stored can never be presented in its place
/// ([`StoreError::TokenInStoredForm`]). Rows an older version stored in clear are hashed when the store opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// The secret token, in clear (as generated, or as presented).
    pub token: String,
    /// SPIFFE ID the attested node receives; empty when the CA derives it from the token (it would contain the
    /// token).
    pub agent_spiffe_id: String,
    /// Expiry (unix seconds).
    pub expires_at: i64,
    /// Creation time.
    pub created_at: i64,
}

/// Kind of CA key (and of issued SVID).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyKind {
    /// X.509.
    X509,
    /// JWT.
    Jwt,
}

impl KeyKind {
    /// `x509` or `jwt`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::X509 => "x509",
            Self::Jwt => "jwt",
        }
    }
}

impl FromStr for KeyKind {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "x509" => Ok(Self::X509),
            "jwt" => Ok(Self::Jwt),
            other => Err(StoreError::Corrupt(format!("unknown key kind {other:?}"))),
        }
    }
}

/// Rotation phase of a CA key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyState {
    /// Published, not signing yet.
    Prepared,
    /// Signing.
    Active,
    /// Published, no longer signing.
    Old,
    /// Out of the bundle.
    Retired,
}

impl KeyState {
    /// The stored name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Prepared => "prepared",
            Self::Active => "active",
            Self::Old => "old",
            Self::Retired => "retired",
        }
    }
}

impl FromStr for KeyState {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "prepared" => Self::Prepared,
            "active" => Self::Active,
            "old" => Self::Old,
            "retired" => Self::Retired,
            other => return Err(StoreError::Corrupt(format!("unknown key state {other:?}"))),
        })
    }
}

/// A CA key and where it is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaKeyRecord {
    /// Key id (also the JWT `kid`).
    pub id: String,
    /// Kind.
    pub kind: KeyKind,
    /// Phase.
    pub state: KeyState,
    /// Key type name, e.g. `ec-p256`.
    pub key_type: String,
    /// Opaque backend reference (a sealed blob for software keys); never clear key material.
    pub key_ref: String,
    /// CA certificate (DER), X.509 kind only.
    pub certificate: Option<Vec<u8>>,
    /// DER SubjectPublicKeyInfo.
    pub public_key_spki: Vec<u8>,
    /// Validity start.
    pub not_before: i64,
    /// Validity end.
    pub not_after: i64,
    /// Creation time.
    pub created_at: i64,
    /// When it became active.
    pub activated_at: Option<i64>,
    /// When it left the bundle.
    pub retired_at: Option<i64>,
}

/// One issued SVID in the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedRecord {
    /// Serial (hex) for X.509, `jti` for JWT; unique.
    pub serial: String,
    /// SPIFFE ID.
    pub spiffe_id: String,
    /// What was issued.
    pub kind: KeyKind,
    /// Issue time.
    pub issued_at: i64,
    /// Expiry.
    pub not_after: i64,
    /// CA key that signed it.
    pub signing_key_id: String,
    /// Agent SPIFFE ID, `admin`, `join_token` or `ca`.
    pub requested_by: String,
}

/// Filters for [`Store::list_issued`].
#[derive(Debug, Clone, Default)]
pub struct IssuedFilter {
    /// Exact SPIFFE ID.
    pub spiffe_id: Option<String>,
    /// Exact serial.
    pub serial: Option<String>,
    /// Maximum rows (0 = 100).
    pub limit: i64,
}

/// An attested node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    /// Agent SPIFFE ID.
    pub spiffe_id: String,
    /// How it attested (`join_token`).
    pub attestation_type: String,
    /// Serial of its current SVID.
    pub serial: String,
    /// Expiry of its current SVID.
    pub expires_at: i64,
    /// First attestation.
    pub created_at: i64,
    /// Last change.
    pub updated_at: i64,
}

/// Store failures. Refusals carry what was refused; no message ever contains a join token.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Same SPIFFE ID, parent and selector set as an existing entry.
    #[error(
        "an entry with SPIFFE ID {spiffe_id}, parent {parent_id} and the same selectors already exists (id {existing_id})"
    )]
    DuplicateEntry {
        /// SPIFFE ID.
        spiffe_id: String,
        /// Parent ID.
        parent_id: String,
        /// The existing entry's id.
        existing_id: String,
    },
    /// No such entry.
    #[error("no entry with id {0:?}")]
    EntryNotFound(String),
    /// Unknown or already used token.
    #[error("join token not found or already used")]
    TokenNotFound,
    /// The presented join token is in the form the store keeps (`sha256:<hex>`): a stored digest is not a
    /// credential. The value is not echoed.
    #[error("join_token: a stored token digest (sha256:…) is not a join token; present the token itself")]
    TokenInStoredForm,
    /// Expired token (now deleted).
    #[error("join token expired at {expires_at}")]
    TokenExpired {
        /// When it expired.
        expires_at: i64,
    },
    /// Serial already recorded.
    #[error("serial {0} was already issued")]
    DuplicateSerial(String),
    /// A second prepared (or active) key of a kind.
    #[error("a {kind} CA key in state {state} already exists")]
    KeySlotTaken {
        /// Kind.
        kind: &'static str,
        /// State.
        state: &'static str,
    },
    /// No such CA key.
    #[error("no CA key with id {0:?}")]
    KeyNotFound(String),
    /// The database was written by a newer version.
    #[error("database schema version {found} is newer than this binary supports ({supported}); upgrade trustline-ca")]
    SchemaTooNew {
        /// Version found.
        found: i64,
        /// Version supported.
        supported: i64,
    },
    /// A database file (or its `-wal`, `-shm` or `-journal` file) that group or others can access.
    #[error(
        "database file {path} has mode {mode:o}: group and others must have no access (chmod 600 {path})"
    )]
    FileMode {
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// The database's folder or files could not be created or inspected.
    #[error("sqlite {path}: {source}")]
    Io {
        /// The file or folder.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// SQLite failure.
    #[error("sqlite {path}: {source}")]
    Sqlite {
        /// Database file.
        path: String,
        /// The error.
        #[source]
        source: rusqlite::Error,
    },
    /// PostgreSQL failure.
    #[error("postgres: {}", with_cause(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// A stored row cannot be read back.
    #[error("stored row is corrupt: {0}")]
    Corrupt(String),
}

/// Where the store lives.
#[derive(Debug, Clone)]
pub enum StoreConfig {
    /// SQLite file.
    Sqlite {
        /// File path.
        path: PathBuf,
    },
    /// PostgreSQL connection string.
    Postgres {
        /// libpq-style conninfo.
        conninfo: String,
        /// TLS to the server (its CA), if configured.
        tls: Option<trustline_identity::pgtls::PgTls>,
    },
}

/// The durable store.
#[derive(Debug)]
pub enum Store {
    /// SQLite.
    Sqlite(SqliteStore),
    /// PostgreSQL.
    Postgres(PgStore),
}

macro_rules! dispatch {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            Store::Sqlite($s) => $e,
            Store::Postgres($s) => $e.await,
        }
    };
}

impl Store {
    /// Opens (creating or migrating the schema).
    pub async fn open(config: &StoreConfig) -> Result<Store, StoreError> {
        match config {
            StoreConfig::Sqlite { path } => Ok(Store::Sqlite(SqliteStore::open(path)?)),
            StoreConfig::Postgres { conninfo, tls } => Ok(Store::Postgres(
                PgStore::open_config(conninfo.parse()?, tls.clone()).await?,
            )),
        }
    }

    /// The schema version in the database.
    pub async fn schema_version(&self) -> Result<i64, StoreError> {
        dispatch!(self, s => s.schema_version())
    }

    /// Creates an entry.
    pub async fn create_entry(&self, entry: &Entry) -> Result<Entry, StoreError> {
        dispatch!(self, s => s.create_entry(entry))
    }

    /// Replaces an entry by id.
    pub async fn update_entry(&self, entry: &Entry) -> Result<Entry, StoreError> {
        dispatch!(self, s => s.update_entry(entry))
    }

    /// One entry.
    pub async fn get_entry(&self, id: &str) -> Result<Option<Entry>, StoreError> {
        dispatch!(self, s => s.get_entry(id))
    }

    /// Entries matching `filter`, oldest first.
    pub async fn list_entries(&self, filter: &EntryFilter) -> Result<Vec<Entry>, StoreError> {
        dispatch!(self, s => s.list_entries(filter))
    }

    /// Entries whose parent is `parent_id`.
    pub async fn list_entries_by_parent(&self, parent_id: &str) -> Result<Vec<Entry>, StoreError> {
        self.list_entries(&EntryFilter {
            parent_id: Some(parent_id.to_owned()),
            ..EntryFilter::default()
        })
        .await
    }

    /// Deletes an entry, returning it.
    pub async fn delete_entry(&self, id: &str) -> Result<Entry, StoreError> {
        dispatch!(self, s => s.delete_entry(id))
    }

    /// The entries revision.
    pub async fn entries_revision(&self) -> Result<i64, StoreError> {
        dispatch!(self, s => s.counter("entries_revision"))
    }

    /// Stores a join token: its digest, never the token.
    pub async fn create_join_token(&self, token: &JoinToken) -> Result<(), StoreError> {
        let stored = JoinToken {
            token: token_digest(&token.token),
            ..token.clone()
        };
        dispatch!(self, s => s.create_join_token(&stored))
    }

    /// Atomically deletes and returns the token presented in clear (looked up by its digest); an expired one is
    /// deleted and reported as expired. A value in the stored form is refused without a lookup.
    pub async fn consume_join_token(&self, token: &str, now: i64) -> Result<JoinToken, StoreError> {
        if is_stored_token_form(token) {
            return Err(StoreError::TokenInStoredForm);
        }
        let digest = token_digest(token);
        let t = dispatch!(self, s => s.take_join_token(&digest))?.ok_or(StoreError::TokenNotFound)?;
        if t.expires_at <= now {
            return Err(StoreError::TokenExpired {
                expires_at: t.expires_at,
            });
        }
        Ok(JoinToken {
            token: token.to_owned(),
            ..t
        })
    }

    /// Whether `spiffe_id` is an agent's: an attested node, or the agent ID an unspent join token names.
    pub async fn is_agent_id(&self, spiffe_id: &str) -> Result<bool, StoreError> {
        dispatch!(self, s => s.is_agent_id(spiffe_id))
    }

    /// Deletes expired tokens; returns how many.
    pub async fn prune_join_tokens(&self, now: i64) -> Result<u64, StoreError> {
        dispatch!(self, s => s.prune_join_tokens(now))
    }

    /// Inserts or replaces a node record.
    pub async fn upsert_node(&self, node: &NodeRecord) -> Result<(), StoreError> {
        dispatch!(self, s => s.upsert_node(node))
    }

    /// One node.
    pub async fn get_node(&self, spiffe_id: &str) -> Result<Option<NodeRecord>, StoreError> {
        dispatch!(self, s => s.get_node(spiffe_id))
    }

    /// Every attested node, by SPIFFE ID.
    pub async fn list_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        dispatch!(self, s => s.list_nodes())
    }

    /// Removes a node record (eviction); whether there was one.
    pub async fn delete_node(&self, spiffe_id: &str) -> Result<bool, StoreError> {
        dispatch!(self, s => s.delete_node(spiffe_id))
    }

    /// Inserts a CA key (at most one prepared and one active per kind).
    pub async fn insert_ca_key(&self, key: &CaKeyRecord) -> Result<(), StoreError> {
        dispatch!(self, s => s.insert_ca_key(key))
    }

    /// All CA keys, oldest first (in insertion order within a second).
    pub async fn list_ca_keys(&self) -> Result<Vec<CaKeyRecord>, StoreError> {
        dispatch!(self, s => s.list_ca_keys())
    }

    /// Atomically: the active key of `kind` becomes old and prepared key `id` becomes active. `Ok(false)` and no
    /// change if `id` is no longer prepared.
    pub async fn activate_ca_key(&self, kind: KeyKind, id: &str, now: i64) -> Result<bool, StoreError> {
        dispatch!(self, s => s.activate_ca_key(kind, id, now))
    }

    /// An old key leaves the bundle.
    pub async fn retire_ca_key(&self, id: &str, now: i64) -> Result<(), StoreError> {
        dispatch!(self, s => s.retire_ca_key(id, now))
    }

    /// The bundle sequence.
    pub async fn bundle_sequence(&self) -> Result<i64, StoreError> {
        dispatch!(self, s => s.counter("bundle_sequence"))
    }

    /// Records issued SVIDs in one transaction (all or none).
    pub async fn record_issued(&self, records: &[IssuedRecord]) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        dispatch!(self, s => s.record_issued(records))
    }

    /// Issued SVIDs, newest first.
    pub async fn list_issued(&self, filter: &IssuedFilter) -> Result<Vec<IssuedRecord>, StoreError> {
        dispatch!(self, s => s.list_issued(filter))
    }

    /// The latest expiry of anything `key_id` signed.
    pub async fn max_not_after_signed_by(&self, key_id: &str) -> Result<Option<i64>, StoreError> {
        dispatch!(self, s => s.max_not_after_signed_by(key_id))
    }
}

/// What a stored join token starts with: the name of its digest (spelled out in the backends' SQL too).
pub const TOKEN_DIGEST_PREFIX: &str = "sha256:";

/// How a join token is stored: `sha256:<hex>` of the token.
pub fn token_digest(token: &str) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    let hex: String = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("{TOKEN_DIGEST_PREFIX}{hex}")
}

/// Whether a presented join token looks like a stored one (`sha256:…`, in any case). Generated tokens are hex, so
/// no real token is refused by this.
pub fn is_stored_token_form(token: &str) -> bool {
    token
        .get(..TOKEN_DIGEST_PREFIX.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(TOKEN_DIGEST_PREFIX))
}

/// A join token row an older version stored in clear, as it is stored now: the token's digest, and no agent ID
/// when the stored one was derived from the token (`…/trustline/agent/join_token/<token>`: it would keep the
/// token in clear; the CA derives it again from the token presented).
fn hashed_row(token: &str, agent_spiffe_id: &str) -> (String, String) {
    let derived = agent_spiffe_id
        .strip_suffix(token)
        .is_some_and(|rest| rest.ends_with("/trustline/agent/join_token/"));
    let agent = if derived { "" } else { agent_spiffe_id };
    (token_digest(token), agent.to_owned())
}

/// Selectors as a JSON array of `type:value` strings.
fn selectors_json(sel: &[Selector]) -> String {
    let v: Vec<String> = sel.iter().map(ToString::to_string).collect();
    strings_json(&v)
}

/// A JSON array of strings (serializing strings cannot fail).
fn strings_json(v: &[String]) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "[]".into())
}

fn parse_selectors(json: &str) -> Result<Vec<Selector>, StoreError> {
    let v: Vec<String> =
        serde_json::from_str(json).map_err(|e| StoreError::Corrupt(format!("selectors {json:?}: {e}")))?;
    v.iter()
        .map(|s| {
            s.parse()
                .map_err(|e| StoreError::Corrupt(format!("selector {s:?}: {e}")))
        })
        .collect()
}

fn parse_strings(json: &str) -> Result<Vec<String>, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt(format!("dns names {json:?}: {e}")))
}

/// Selectors in stored form: sorted, deduplicated.
fn canonical(selectors: &[Selector]) -> Vec<Selector> {
    let mut s = selectors.to_vec();
    s.sort();
    s.dedup();
    s
}

/// `IssuedFilter::limit`, with 0 (or a negative value) meaning 100.
fn limit(l: i64) -> i64 {
    if l <= 0 {
        100
    } else {
        l
    }
}

#[cfg(test)]
mod tests;

/// A PostgreSQL error with its cause (tokio-postgres says "error performing TLS handshake"; the cause says why).
fn with_cause(e: &tokio_postgres::Error) -> String {
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}
