//! PostgreSQL backend, for several CA replicas on one database.
//!
//! One connection per CA, used under an async mutex so transactions never interleave; statements are prepared once
//! per connection; a lost connection is re-established on the next call. Correctness between replicas rests on the
//! database: unique constraints and partial unique indexes, row locks (`SELECT … FOR UPDATE`) plus conditional
//! updates whose row counts are checked, and counters bumped in the same transaction as the change. Migrations run
//! under a transaction-scoped advisory lock so replicas starting together migrate once.

use std::collections::{HashMap, HashSet};

use tokio::sync::{Mutex, MutexGuard};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Config, NoTls, Row, Statement};
use trustline_identity::selector_set_key;

use super::*;

/// Advisory lock key serializing migrations across replicas ("trustl").
const MIGRATION_LOCK: i64 = 0x7472_7573_746c;

macro_rules! entry_cols {
    () => {
        "id, spiffe_id, parent_id, selectors, x509_svid_ttl, jwt_svid_ttl, dns_names, admin, revision, created_at"
    };
}
macro_rules! key_cols {
    () => {
        "id, kind, state, key_type, key_ref, certificate, public_key_spki, not_before, not_after, created_at, \
         activated_at, retired_at"
    };
}
macro_rules! issued_cols {
    () => {
        "serial, spiffe_id, kind, issued_at, not_after, signing_key_id, requested_by"
    };
}

const BUMP: &str = "UPDATE meta SET value = value + 1 WHERE name = $1 RETURNING value";
const COUNTER: &str = "SELECT value FROM meta WHERE name = $1";
const VERSION: &str = "SELECT COALESCE(MAX(version), 0)::BIGINT FROM schema_migrations";
const FIND_DUPLICATE: &str =
    "SELECT id FROM entries WHERE spiffe_id = $1 AND parent_id = $2 AND selector_key = $3";
const INSERT_ENTRY: &str = concat!(
    "INSERT INTO entries (",
    entry_cols!(),
    ", selector_key) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
);
const UPDATE_ENTRY: &str =
    "UPDATE entries SET spiffe_id = $2, parent_id = $3, selectors = $4, selector_key = $5,
    x509_svid_ttl = $6, jwt_svid_ttl = $7, dns_names = $8, admin = $9, revision = $10
    WHERE id = $1 RETURNING created_at";
const GET_ENTRY: &str = concat!("SELECT ", entry_cols!(), " FROM entries WHERE id = $1");
const LIST_ENTRIES: &str = concat!(
    "SELECT ",
    entry_cols!(),
    " FROM entries WHERE ($1::TEXT IS NULL OR spiffe_id = $1) AND ($2::TEXT IS NULL OR parent_id = $2)
      AND ($3::TEXT IS NULL OR selectors::JSONB @> jsonb_build_array($3::TEXT))
      ORDER BY created_at, id"
);
const DELETE_ENTRY: &str = concat!("DELETE FROM entries WHERE id = $1 RETURNING ", entry_cols!());
const INSERT_TOKEN: &str =
    "INSERT INTO join_tokens (token, agent_spiffe_id, expires_at, created_at) VALUES ($1, $2, $3, $4)";
const TAKE_TOKEN: &str =
    "DELETE FROM join_tokens WHERE token = $1 RETURNING token, agent_spiffe_id, expires_at, created_at";
const PRUNE_TOKENS: &str = "DELETE FROM join_tokens WHERE expires_at <= $1";
const SELECT_CLEAR_TOKENS: &str =
    "SELECT token, agent_spiffe_id FROM join_tokens WHERE substr(token, 1, 7) <> 'sha256:' FOR UPDATE";
const HASH_TOKEN: &str = "UPDATE join_tokens SET token = $2, agent_spiffe_id = $3 WHERE token = $1";
const IS_AGENT_ID: &str = "SELECT EXISTS (SELECT 1 FROM nodes WHERE spiffe_id = $1)
    OR EXISTS (SELECT 1 FROM join_tokens WHERE agent_spiffe_id = $1)";
const UPSERT_NODE: &str =
    "INSERT INTO nodes (spiffe_id, attestation_type, serial, expires_at, created_at, updated_at)
     VALUES ($1, $2, $3, $4, $5, $6)
     ON CONFLICT (spiffe_id) DO UPDATE SET attestation_type = EXCLUDED.attestation_type,
       serial = EXCLUDED.serial, expires_at = EXCLUDED.expires_at, updated_at = EXCLUDED.updated_at";
const GET_NODE: &str =
    "SELECT spiffe_id, attestation_type, serial, expires_at, created_at, updated_at FROM nodes WHERE spiffe_id = $1";
const LIST_NODES: &str =
    "SELECT spiffe_id, attestation_type, serial, expires_at, created_at, updated_at FROM nodes ORDER BY spiffe_id";
const DELETE_NODE: &str = "DELETE FROM nodes WHERE spiffe_id = $1";
const INSERT_KEY: &str = concat!(
    "INSERT INTO ca_keys (",
    key_cols!(),
    ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
);
const LIST_KEYS: &str = concat!("SELECT ", key_cols!(), " FROM ca_keys ORDER BY created_at, seq");
const LOCK_PREPARED: &str =
    "SELECT 1 FROM ca_keys WHERE id = $1 AND kind = $2 AND state = 'prepared' FOR UPDATE";
const DEMOTE_ACTIVE: &str = "UPDATE ca_keys SET state = 'old' WHERE kind = $1 AND state = 'active'";
const PROMOTE: &str =
    "UPDATE ca_keys SET state = 'active', activated_at = $3 WHERE id = $1 AND kind = $2 AND state = 'prepared'";
const RETIRE: &str = "UPDATE ca_keys SET state = 'retired', retired_at = $2 WHERE id = $1 AND state = 'old'";
/// The whole batch in one statement (one round trip, atomic without an explicit transaction).
const INSERT_ISSUED: &str = concat!(
    "INSERT INTO issued (",
    issued_cols!(),
    ") SELECT * FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::BIGINT[], $5::BIGINT[], $6::TEXT[], $7::TEXT[])"
);
const FIND_SERIAL: &str = "SELECT serial FROM issued WHERE serial = ANY($1::TEXT[]) LIMIT 1";
const LIST_ISSUED: &str = concat!(
    "SELECT ",
    issued_cols!(),
    " FROM issued WHERE ($1::TEXT IS NULL OR spiffe_id = $1) AND ($2::TEXT IS NULL OR serial = $2)
      ORDER BY issued_at DESC, seq DESC LIMIT $3"
);
const MAX_NOT_AFTER: &str = "SELECT MAX(not_after) FROM issued WHERE signing_key_id = $1";

/// The PostgreSQL store.
pub struct PgStore {
    /// Boxed so the `Store` enum's variants stay of similar size.
    config: Box<Config>,
    /// TLS to the server, when the operator gave its CA (`store.tls_ca_file`).
    tls: Option<trustline_identity::pgtls::PgTls>,
    conn: Mutex<Conn>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The config may hold a password: show only where it points.
        f.debug_struct("PgStore")
            .field("hosts", &self.config.get_hosts())
            .field("dbname", &self.config.get_dbname())
            .finish_non_exhaustive()
    }
}

/// A connection and the statements prepared on it.
struct Conn {
    client: Client,
    statements: HashMap<&'static str, Statement>,
}

impl Conn {
    async fn connect(
        config: &Config,
        tls: Option<&trustline_identity::pgtls::PgTls>,
    ) -> Result<Self, StoreError> {
        let client = match tls {
            Some(tls) => {
                let (client, connection) = config.connect(tls.clone()).await?;
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::warn!(error = %e, "postgres connection closed");
                    }
                });
                client
            }
            None => {
                let (client, connection) = config.connect(NoTls).await?;
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::warn!(error = %e, "postgres connection closed");
                    }
                });
                client
            }
        };
        Ok(Self {
            client,
            statements: HashMap::new(),
        })
    }

    /// The prepared statement for `sql`, preparing it on first use.
    async fn stmt(&mut self, sql: &'static str) -> Result<Statement, StoreError> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(sql).await?;
        self.statements.insert(sql, s.clone());
        Ok(s)
    }
}

fn is_unique(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::UNIQUE_VIOLATION)
}

fn constraint(e: &tokio_postgres::Error) -> Option<&str> {
    e.as_db_error().and_then(|d| d.constraint())
}

fn row_entry(r: &Row) -> Result<Entry, StoreError> {
    Ok(Entry {
        id: r.try_get(0)?,
        spiffe_id: r.try_get(1)?,
        parent_id: r.try_get(2)?,
        selectors: parse_selectors(r.try_get(3)?)?,
        x509_svid_ttl: r.try_get(4)?,
        jwt_svid_ttl: r.try_get(5)?,
        dns_names: parse_strings(r.try_get(6)?)?,
        admin: r.try_get(7)?,
        revision: r.try_get(8)?,
        created_at: r.try_get(9)?,
    })
}

fn row_key(r: &Row) -> Result<CaKeyRecord, StoreError> {
    Ok(CaKeyRecord {
        id: r.try_get(0)?,
        kind: r.try_get::<_, &str>(1)?.parse()?,
        state: r.try_get::<_, &str>(2)?.parse()?,
        key_type: r.try_get(3)?,
        key_ref: r.try_get(4)?,
        certificate: r.try_get(5)?,
        public_key_spki: r.try_get(6)?,
        not_before: r.try_get(7)?,
        not_after: r.try_get(8)?,
        created_at: r.try_get(9)?,
        activated_at: r.try_get(10)?,
        retired_at: r.try_get(11)?,
    })
}

fn row_issued(r: &Row) -> Result<IssuedRecord, StoreError> {
    Ok(IssuedRecord {
        serial: r.try_get(0)?,
        spiffe_id: r.try_get(1)?,
        kind: r.try_get::<_, &str>(2)?.parse()?,
        issued_at: r.try_get(3)?,
        not_after: r.try_get(4)?,
        signing_key_id: r.try_get(5)?,
        requested_by: r.try_get(6)?,
    })
}

impl PgStore {
    /// Connects with a libpq-style conninfo (`host=… user=… dbname=…` or a `postgres://` URL) and applies pending
    /// migrations.
    pub async fn open(conninfo: &str) -> Result<Self, StoreError> {
        Self::open_config(conninfo.parse()?, None).await
    }

    /// Connects with a parsed config (over TLS when `tls` is given) and applies pending migrations.
    pub async fn open_config(
        config: Config,
        tls: Option<trustline_identity::pgtls::PgTls>,
    ) -> Result<Self, StoreError> {
        let mut conn = Conn::connect(&config, tls.as_ref()).await?;
        Self::migrate(&mut conn.client).await?;
        Ok(Self {
            config: Box::new(config),
            tls,
            conn: Mutex::new(conn),
        })
    }

    async fn migrate(client: &mut Client) -> Result<(), StoreError> {
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
        )
        .await?;
        let current: i64 = tx.query_one(VERSION, &[]).await?.try_get(0)?;
        if current > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew {
                found: current,
                supported: SCHEMA_VERSION,
            });
        }
        for (version, sql) in (1_i64..)
            .zip(migrations::POSTGRES)
            .skip(usize::try_from(current).unwrap_or(0))
        {
            tracing::info!(version, "applying postgres schema migration");
            tx.batch_execute(sql).await?;
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, EXTRACT(EPOCH FROM now())::BIGINT)",
                &[&version],
            )
            .await?;
        }
        Self::hash_clear_tokens(&tx).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Replaces every join token row stored in clear (by versions before digests) with its digest, under the
    /// migration lock, so replicas starting together do it once. The old row versions remain in the table's
    /// files until PostgreSQL vacuums them (autovacuum does).
    async fn hash_clear_tokens(tx: &tokio_postgres::Transaction<'_>) -> Result<(), StoreError> {
        let rows = tx.query(SELECT_CLEAR_TOKENS, &[]).await?;
        for r in &rows {
            let (token, agent): (String, String) = (r.try_get(0)?, r.try_get(1)?);
            let (digest, agent) = hashed_row(&token, &agent);
            tx.execute(HASH_TOKEN, &[&token, &digest, &agent]).await?;
        }
        if !rows.is_empty() {
            tracing::info!(
                count = rows.len(),
                "join tokens stored in clear by an older version replaced by their digests"
            );
        }
        Ok(())
    }

    /// The connection, re-established (with an empty statement cache) if it was lost.
    async fn conn(&self) -> Result<MutexGuard<'_, Conn>, StoreError> {
        let mut guard = self.conn.lock().await;
        if guard.client.is_closed() {
            tracing::info!("reconnecting to postgres");
            *guard = Conn::connect(&self.config, self.tls.as_ref()).await?;
        }
        Ok(guard)
    }

    pub(super) async fn schema_version(&self) -> Result<i64, StoreError> {
        let mut c = self.conn().await?;
        let st = c.stmt(VERSION).await?;
        Ok(c.client.query_one(&st, &[]).await?.try_get(0)?)
    }

    pub(super) async fn counter(&self, name: &str) -> Result<i64, StoreError> {
        let mut c = self.conn().await?;
        let st = c.stmt(COUNTER).await?;
        Ok(c.client.query_one(&st, &[&name]).await?.try_get(0)?)
    }

    /// Explains a unique violation on `entries`: a duplicate of an existing entry, or (for a reused id) the raw
    /// error. Runs after the failed transaction was rolled back.
    async fn entry_conflict(
        &self,
        c: &mut Conn,
        e: &Entry,
        key: &str,
        source: tokio_postgres::Error,
    ) -> StoreError {
        let found = match c.stmt(FIND_DUPLICATE).await {
            Ok(st) => c
                .client
                .query_opt(&st, &[&e.spiffe_id, &e.parent_id, &key])
                .await
                .map_err(StoreError::from),
            Err(err) => Err(err),
        };
        match found.and_then(|row| {
            row.map(|r| r.try_get::<_, String>(0))
                .transpose()
                .map_err(StoreError::from)
        }) {
            Ok(Some(existing_id)) => StoreError::DuplicateEntry {
                spiffe_id: e.spiffe_id.clone(),
                parent_id: e.parent_id.clone(),
                existing_id,
            },
            Ok(None) => source.into(),
            Err(err) => err,
        }
    }

    pub(super) async fn create_entry(&self, entry: &Entry) -> Result<Entry, StoreError> {
        let mut c = self.conn().await?;
        let sel = canonical(&entry.selectors);
        let key = selector_set_key(&sel);
        let (bump, insert) = (c.stmt(BUMP).await?, c.stmt(INSERT_ENTRY).await?);
        let tx = c.client.transaction().await?;
        let rev: i64 = tx.query_one(&bump, &[&"entries_revision"]).await?.try_get(0)?;
        let res = tx
            .execute(
                &insert,
                &[
                    &entry.id,
                    &entry.spiffe_id,
                    &entry.parent_id,
                    &selectors_json(&sel),
                    &entry.x509_svid_ttl,
                    &entry.jwt_svid_ttl,
                    &strings_json(&entry.dns_names),
                    &entry.admin,
                    &rev,
                    &entry.created_at,
                    &key,
                ],
            )
            .await;
        match res {
            Ok(_) => tx.commit().await?,
            Err(e) if is_unique(&e) => {
                drop(tx);
                return Err(self.entry_conflict(&mut c, entry, &key, e).await);
            }
            Err(e) => return Err(e.into()),
        }
        Ok(Entry {
            selectors: sel,
            revision: rev,
            ..entry.clone()
        })
    }

    pub(super) async fn update_entry(&self, entry: &Entry) -> Result<Entry, StoreError> {
        let mut c = self.conn().await?;
        let sel = canonical(&entry.selectors);
        let key = selector_set_key(&sel);
        let (bump, update) = (c.stmt(BUMP).await?, c.stmt(UPDATE_ENTRY).await?);
        let tx = c.client.transaction().await?;
        let rev: i64 = tx.query_one(&bump, &[&"entries_revision"]).await?.try_get(0)?;
        let res = tx
            .query_opt(
                &update,
                &[
                    &entry.id,
                    &entry.spiffe_id,
                    &entry.parent_id,
                    &selectors_json(&sel),
                    &key,
                    &entry.x509_svid_ttl,
                    &entry.jwt_svid_ttl,
                    &strings_json(&entry.dns_names),
                    &entry.admin,
                    &rev,
                ],
            )
            .await;
        let created_at: i64 = match res {
            Ok(Some(row)) => row.try_get(0)?,
            Ok(None) => return Err(StoreError::EntryNotFound(entry.id.clone())),
            Err(e) if is_unique(&e) => {
                drop(tx);
                return Err(self.entry_conflict(&mut c, entry, &key, e).await);
            }
            Err(e) => return Err(e.into()),
        };
        tx.commit().await?;
        Ok(Entry {
            selectors: sel,
            revision: rev,
            created_at,
            ..entry.clone()
        })
    }

    pub(super) async fn get_entry(&self, id: &str) -> Result<Option<Entry>, StoreError> {
        let mut c = self.conn().await?;
        let st = c.stmt(GET_ENTRY).await?;
        c.client
            .query_opt(&st, &[&id])
            .await?
            .as_ref()
            .map(row_entry)
            .transpose()
    }

    pub(super) async fn list_entries(&self, f: &EntryFilter) -> Result<Vec<Entry>, StoreError> {
        let mut c = self.conn().await?;
        let st = c.stmt(LIST_ENTRIES).await?;
        let selector = f.selector.as_ref().map(ToString::to_string);
        let rows = c
            .client
            .query(&st, &[&f.spiffe_id, &f.parent_id, &selector])
            .await?;
        rows.iter().map(row_entry).collect()
    }

    pub(super) async fn delete_entry(&self, id: &str) -> Result<Entry, StoreError> {
        let mut c = self.conn().await?;
        let (delete, bump) = (c.stmt(DELETE_ENTRY).await?, c.stmt(BUMP).await?);
        let tx = c.client.transaction().await?;
        let row = tx
            .query_opt(&delete, &[&id])
            .await?
            .ok_or_else(|| StoreError::EntryNotFound(id.to_owned()))?;
        let e = row_entry(&row)?;
        tx.query_one(&bump, &[&"entries_revision"]).await?;
        tx.commit().await?;
        Ok(e)
    }

    pub(super) async fn create_join_token(&self, t: &JoinToken) -> Result<(), StoreError> {
        let mut c = self.conn().await?;
        let st = c.stmt(INSERT_TOKEN).await?;
        c.client
            .execute(&st, &[&t.token, &t.agent_spiffe_id, &t.expires_at, &t.created_at])
            .await?;
        Ok(())
    }

    /// Deletes a token and returns what it was (one statement, so two replicas can never both get it).
    pub(super) async fn take_join_token(&self, token: &str) -> Result<Option<JoinToken>, StoreError> {
        let mut c = self.conn().await?;
        let st = c.stmt(TAKE_TOKEN).await?;
        let row = c.client.query_opt(&st, &[&token]).await?;
        row.map(|r| {
            Ok(JoinToken {
                token: r.try_get(0)?,
                agent_spiffe_id: r.try_get(1)?,
                expires_at: r.try_get(2)?,
                created_at: r.try_get(3)?,
            })
        })
        .transpose()
    }

    pub(super) async fn is_agent_id(&self, id: &str) -> Result<bool, StoreError> {
        let mut c = self.conn().await?;
        let st = c.stmt(IS_AGENT_ID).await?;
        Ok(c.client.query_one(&st, &[&id]).await?.try_get(0)?)
    }

    pub(super) async fn prune_join_tokens(&self, now: i64) -> Result<u64, StoreError> {
        let mut c = self.conn().await?;
        let st = c.stmt(PRUNE_TOKENS).await?;
        Ok(c.client.execute(&st, &[&now]).await?)
    }

    pub(super) async fn upsert_node(&self, n: &NodeRecord) -> Result<(), StoreError> {
        let mut c = self.conn().await?;
        let st = c.stmt(UPSERT_NODE).await?;
        c.client
            .execute(
                &st,
                &[
                    &n.spiffe_id,
                    &n.attestation_type,
                    &n.serial,
                    &n.expires_at,
                    &n.created_at,
                    &n.updated_at,
                ],
            )
            .await?;
        Ok(())
    }

    pub(super) async fn list_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let mut c = self.conn().await?;
        let st = c.stmt(LIST_NODES).await?;
        c.client
            .query(&st, &[])
            .await?
            .into_iter()
            .map(|r| {
                Ok(NodeRecord {
                    spiffe_id: r.try_get(0)?,
                    attestation_type: r.try_get(1)?,
                    serial: r.try_get(2)?,
                    expires_at: r.try_get(3)?,
                    created_at: r.try_get(4)?,
                    updated_at: r.try_get(5)?,
                })
            })
            .collect()
    }

    pub(super) async fn delete_node(&self, id: &str) -> Result<bool, StoreError> {
        let mut c = self.conn().await?;
        let st = c.stmt(DELETE_NODE).await?;
        Ok(c.client.execute(&st, &[&id]).await? > 0)
    }

    pub(super) async fn get_node(&self, id: &str) -> Result<Option<NodeRecord>, StoreError> {
        let mut c = self.conn().await?;
        let st = c.stmt(GET_NODE).await?;
        let row = c.client.query_opt(&st, &[&id]).await?;
        row.map(|r| {
            Ok(NodeRecord {
                spiffe_id: r.try_get(0)?,
                attestation_type: r.try_get(1)?,
                serial: r.try_get(2)?,
                expires_at: r.try_get(3)?,
                created_at: r.try_get(4)?,
                updated_at: r.try_get(5)?,
            })
        })
        .transpose()
    }

    pub(super) async fn insert_ca_key(&self, k: &CaKeyRecord) -> Result<(), StoreError> {
        let mut c = self.conn().await?;
        let (insert, bump) = (c.stmt(INSERT_KEY).await?, c.stmt(BUMP).await?);
        let tx = c.client.transaction().await?;
        let res = tx
            .execute(
                &insert,
                &[
                    &k.id,
                    &k.kind.as_str(),
                    &k.state.as_str(),
                    &k.key_type,
                    &k.key_ref,
                    &k.certificate,
                    &k.public_key_spki,
                    &k.not_before,
                    &k.not_after,
                    &k.created_at,
                    &k.activated_at,
                    &k.retired_at,
                ],
            )
            .await;
        match res {
            Ok(_) => {}
            // The slot indexes are named in the migration; anything else (a reused id) is reported raw.
            Err(e)
                if matches!(
                    constraint(&e),
                    Some("ca_keys_one_prepared" | "ca_keys_one_active")
                ) =>
            {
                return Err(StoreError::KeySlotTaken {
                    kind: k.kind.as_str(),
                    state: k.state.as_str(),
                })
            }
            Err(e) => return Err(e.into()),
        }
        tx.query_one(&bump, &[&"bundle_sequence"]).await?;
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn list_ca_keys(&self) -> Result<Vec<CaKeyRecord>, StoreError> {
        let mut c = self.conn().await?;
        let st = c.stmt(LIST_KEYS).await?;
        c.client.query(&st, &[]).await?.iter().map(row_key).collect()
    }

    pub(super) async fn activate_ca_key(
        &self,
        kind: KeyKind,
        id: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        let mut c = self.conn().await?;
        let lock = c.stmt(LOCK_PREPARED).await?;
        let demote = c.stmt(DEMOTE_ACTIVE).await?;
        let promote = c.stmt(PROMOTE).await?;
        let bump = c.stmt(BUMP).await?;
        let tx = c.client.transaction().await?;
        // Lock the prepared row. A racing replica blocks here until we commit, then re-reads the row, finds it
        // no longer prepared and returns false.
        if tx.query_opt(&lock, &[&id, &kind.as_str()]).await?.is_none() {
            return Ok(false);
        }
        tx.execute(&demote, &[&kind.as_str()]).await?;
        if tx.execute(&promote, &[&id, &kind.as_str(), &now]).await? != 1 {
            return Ok(false); // dropping `tx` rolls the demotion back
        }
        tx.query_one(&bump, &[&"bundle_sequence"]).await?;
        tx.commit().await?;
        Ok(true)
    }

    pub(super) async fn retire_ca_key(&self, id: &str, now: i64) -> Result<(), StoreError> {
        let mut c = self.conn().await?;
        let (retire, bump) = (c.stmt(RETIRE).await?, c.stmt(BUMP).await?);
        let tx = c.client.transaction().await?;
        if tx.execute(&retire, &[&id, &now]).await? == 0 {
            return Err(StoreError::KeyNotFound(id.to_owned()));
        }
        tx.query_one(&bump, &[&"bundle_sequence"]).await?;
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn record_issued(&self, records: &[IssuedRecord]) -> Result<(), StoreError> {
        // A serial repeated inside the batch is refused before anything is sent.
        let mut seen = HashSet::with_capacity(records.len());
        if let Some(r) = records.iter().find(|r| !seen.insert(r.serial.as_str())) {
            return Err(StoreError::DuplicateSerial(r.serial.clone()));
        }
        let serials: Vec<&str> = records.iter().map(|r| r.serial.as_str()).collect();
        let spiffe_ids: Vec<&str> = records.iter().map(|r| r.spiffe_id.as_str()).collect();
        let kinds: Vec<&str> = records.iter().map(|r| r.kind.as_str()).collect();
        let issued_at: Vec<i64> = records.iter().map(|r| r.issued_at).collect();
        let not_after: Vec<i64> = records.iter().map(|r| r.not_after).collect();
        let keys: Vec<&str> = records.iter().map(|r| r.signing_key_id.as_str()).collect();
        let requested_by: Vec<&str> = records.iter().map(|r| r.requested_by.as_str()).collect();
        let mut c = self.conn().await?;
        let st = c.stmt(INSERT_ISSUED).await?;
        let res = c
            .client
            .execute(
                &st,
                &[
                    &serials,
                    &spiffe_ids,
                    &kinds,
                    &issued_at,
                    &not_after,
                    &keys,
                    &requested_by,
                ],
            )
            .await;
        match res {
            Ok(_) => Ok(()),
            Err(e) if is_unique(&e) => {
                // The statement failed as a whole; name one serial that was already there.
                let find = c.stmt(FIND_SERIAL).await?;
                match c.client.query_opt(&find, &[&serials]).await? {
                    Some(row) => Err(StoreError::DuplicateSerial(row.try_get(0)?)),
                    None => Err(e.into()),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    pub(super) async fn list_issued(&self, f: &IssuedFilter) -> Result<Vec<IssuedRecord>, StoreError> {
        let mut c = self.conn().await?;
        let st = c.stmt(LIST_ISSUED).await?;
        c.client
            .query(&st, &[&f.spiffe_id, &f.serial, &limit(f.limit)])
            .await?
            .iter()
            .map(row_issued)
            .collect()
    }

    pub(super) async fn max_not_after_signed_by(&self, key_id: &str) -> Result<Option<i64>, StoreError> {
        let mut c = self.conn().await?;
        let st = c.stmt(MAX_NOT_AFTER).await?;
        Ok(c.client.query_one(&st, &[&key_id]).await?.try_get(0)?)
    }
}
