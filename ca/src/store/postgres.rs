//! PostgreSQL backend, for several CA replicas on one database. One connection per CA, used under a mutex so
//! transactions never interleave; reconnects when the connection was lost. Migrations run under an advisory
//! lock so replicas starting together migrate once.

use tokio::sync::{Mutex, MutexGuard};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls, Row};
use trustline_identity::selector_set_key;

use super::*;

const MIGRATION_LOCK: i64 = 0x7472_7573_746c; // "trustl"

const MIGRATIONS: &[&str] = &[
    // v1
    "CREATE TABLE meta (name TEXT PRIMARY KEY, value BIGINT NOT NULL);
     INSERT INTO meta (name, value) VALUES ('entries_revision', 0), ('bundle_sequence', 0);
     CREATE TABLE entries (
        id TEXT PRIMARY KEY, spiffe_id TEXT NOT NULL, parent_id TEXT NOT NULL,
        selectors TEXT NOT NULL, selector_key TEXT NOT NULL,
        x509_svid_ttl BIGINT NOT NULL, jwt_svid_ttl BIGINT NOT NULL, dns_names TEXT NOT NULL,
        admin BOOLEAN NOT NULL, revision BIGINT NOT NULL, created_at BIGINT NOT NULL,
        UNIQUE (spiffe_id, parent_id, selector_key));
     CREATE INDEX entries_parent ON entries (parent_id);
     CREATE TABLE join_tokens (token TEXT PRIMARY KEY, agent_spiffe_id TEXT NOT NULL,
        expires_at BIGINT NOT NULL, created_at BIGINT NOT NULL);
     CREATE TABLE nodes (spiffe_id TEXT PRIMARY KEY, attestation_type TEXT NOT NULL, serial TEXT NOT NULL,
        expires_at BIGINT NOT NULL, created_at BIGINT NOT NULL, updated_at BIGINT NOT NULL);
     CREATE TABLE ca_keys (seq BIGSERIAL, id TEXT PRIMARY KEY, kind TEXT NOT NULL, state TEXT NOT NULL, key_type TEXT NOT NULL,
        key_ref TEXT NOT NULL, certificate BYTEA, public_key_spki BYTEA NOT NULL, not_before BIGINT NOT NULL,
        not_after BIGINT NOT NULL, created_at BIGINT NOT NULL, activated_at BIGINT, retired_at BIGINT);
     CREATE UNIQUE INDEX ca_keys_one_prepared ON ca_keys (kind) WHERE state = 'prepared';
     CREATE UNIQUE INDEX ca_keys_one_active ON ca_keys (kind) WHERE state = 'active';
     CREATE TABLE issued (seq BIGSERIAL, serial TEXT PRIMARY KEY, spiffe_id TEXT NOT NULL, kind TEXT NOT NULL,
        issued_at BIGINT NOT NULL, not_after BIGINT NOT NULL, signing_key_id TEXT NOT NULL,
        requested_by TEXT NOT NULL);
     CREATE INDEX issued_by_id ON issued (spiffe_id, issued_at);
     CREATE INDEX issued_by_key ON issued (signing_key_id, not_after);",
];

/// The PostgreSQL store.
pub struct PgStore {
    conninfo: String,
    client: Mutex<Client>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PgStore")
    }
}

async fn connect(conninfo: &str) -> Result<Client, StoreError> {
    let (client, connection) = tokio_postgres::connect(conninfo, NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "postgres connection closed");
        }
    });
    Ok(client)
}

fn is_unique(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::UNIQUE_VIOLATION)
}

const ENTRY_COLS: &str =
    "id, spiffe_id, parent_id, selectors, x509_svid_ttl, jwt_svid_ttl, dns_names, admin, revision, created_at";
const KEY_COLS: &str =
    "id, kind, state, key_type, key_ref, certificate, public_key_spki, not_before, not_after, \
                        created_at, activated_at, retired_at";
const ISSUED_COLS: &str = "serial, spiffe_id, kind, issued_at, not_after, signing_key_id, requested_by";

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

async fn bump(tx: &tokio_postgres::Transaction<'_>, name: &str) -> Result<i64, StoreError> {
    Ok(tx
        .query_one(
            "UPDATE meta SET value = value + 1 WHERE name = $1 RETURNING value",
            &[&name],
        )
        .await?
        .try_get(0)?)
}

impl PgStore {
    /// Connects and applies pending migrations.
    pub async fn open(conninfo: &str) -> Result<Self, StoreError> {
        let mut client = connect(conninfo).await?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
        )
        .await?;
        let current: i64 = tx
            .query_one(
                "SELECT COALESCE(MAX(version), 0)::BIGINT FROM schema_migrations",
                &[],
            )
            .await?
            .try_get(0)?;
        let supported = MIGRATIONS.len() as i64;
        if current > supported {
            return Err(StoreError::SchemaTooNew {
                found: current,
                supported,
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
            tx.batch_execute(sql).await?;
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, EXTRACT(EPOCH FROM now())::BIGINT)",
                &[&(i as i64 + 1)],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(Self {
            conninfo: conninfo.to_owned(),
            client: Mutex::new(client),
        })
    }

    async fn client(&self) -> Result<MutexGuard<'_, Client>, StoreError> {
        let mut guard = self.client.lock().await;
        if guard.is_closed() {
            tracing::info!("reconnecting to postgres");
            *guard = connect(&self.conninfo).await?;
        }
        Ok(guard)
    }

    pub(super) async fn schema_version(&self) -> Result<i64, StoreError> {
        let c = self.client().await?;
        Ok(c.query_one(
            "SELECT COALESCE(MAX(version), 0)::BIGINT FROM schema_migrations",
            &[],
        )
        .await?
        .try_get(0)?)
    }

    pub(super) async fn counter(&self, name: &str) -> Result<i64, StoreError> {
        let c = self.client().await?;
        Ok(c.query_one("SELECT value FROM meta WHERE name = $1", &[&name])
            .await?
            .try_get(0)?)
    }

    async fn duplicate_of(&self, c: &Client, e: &Entry, key: &str) -> StoreError {
        let existing = c
            .query_opt(
                "SELECT id FROM entries WHERE spiffe_id = $1 AND parent_id = $2 AND selector_key = $3",
                &[&e.spiffe_id, &e.parent_id, &key],
            )
            .await
            .ok()
            .flatten()
            .and_then(|r| r.try_get::<_, String>(0).ok());
        StoreError::DuplicateEntry {
            spiffe_id: e.spiffe_id.clone(),
            parent_id: e.parent_id.clone(),
            existing_id: existing.unwrap_or_default(),
        }
    }

    pub(super) async fn create_entry(&self, entry: &Entry) -> Result<Entry, StoreError> {
        let mut c = self.client().await?;
        let sel = canonical(entry);
        let key = selector_set_key(&sel);
        let dns = serde_json::to_string(&entry.dns_names).unwrap_or_else(|_| "[]".into());
        let tx = c.transaction().await?;
        let rev = bump(&tx, "entries_revision").await?;
        let res = tx
            .execute(
                "INSERT INTO entries (id, spiffe_id, parent_id, selectors, selector_key, x509_svid_ttl, jwt_svid_ttl,
                 dns_names, admin, revision, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                &[
                    &entry.id,
                    &entry.spiffe_id,
                    &entry.parent_id,
                    &selectors_json(&sel),
                    &key,
                    &entry.x509_svid_ttl,
                    &entry.jwt_svid_ttl,
                    &dns,
                    &entry.admin,
                    &rev,
                    &entry.created_at,
                ],
            )
            .await;
        match res {
            Ok(_) => tx.commit().await?,
            Err(e) if is_unique(&e) => {
                drop(tx);
                return Err(self.duplicate_of(&c, entry, &key).await);
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
        let mut c = self.client().await?;
        let sel = canonical(entry);
        let key = selector_set_key(&sel);
        let dns = serde_json::to_string(&entry.dns_names).unwrap_or_else(|_| "[]".into());
        let tx = c.transaction().await?;
        let rev = bump(&tx, "entries_revision").await?;
        let res = tx
            .query_opt(
                "UPDATE entries SET spiffe_id = $2, parent_id = $3, selectors = $4, selector_key = $5,
                 x509_svid_ttl = $6, jwt_svid_ttl = $7, dns_names = $8, admin = $9, revision = $10
                 WHERE id = $1 RETURNING created_at",
                &[
                    &entry.id,
                    &entry.spiffe_id,
                    &entry.parent_id,
                    &selectors_json(&sel),
                    &key,
                    &entry.x509_svid_ttl,
                    &entry.jwt_svid_ttl,
                    &dns,
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
                return Err(self.duplicate_of(&c, entry, &key).await);
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
        let c = self.client().await?;
        c.query_opt(&format!("SELECT {ENTRY_COLS} FROM entries WHERE id = $1"), &[&id])
            .await?
            .as_ref()
            .map(row_entry)
            .transpose()
    }

    pub(super) async fn list_entries(&self, f: &EntryFilter) -> Result<Vec<Entry>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                &format!(
                    "SELECT {ENTRY_COLS} FROM entries WHERE ($1::TEXT IS NULL OR spiffe_id = $1)
                     AND ($2::TEXT IS NULL OR parent_id = $2) ORDER BY created_at, id"
                ),
                &[&f.spiffe_id, &f.parent_id],
            )
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let e = row_entry(r)?;
            if f.selector.as_ref().is_none_or(|s| e.selectors.contains(s)) {
                out.push(e);
            }
        }
        Ok(out)
    }

    pub(super) async fn delete_entry(&self, id: &str) -> Result<Entry, StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        let row = tx
            .query_opt(
                &format!("DELETE FROM entries WHERE id = $1 RETURNING {ENTRY_COLS}"),
                &[&id],
            )
            .await?
            .ok_or_else(|| StoreError::EntryNotFound(id.to_owned()))?;
        let e = row_entry(&row)?;
        bump(&tx, "entries_revision").await?;
        tx.commit().await?;
        Ok(e)
    }

    pub(super) async fn create_join_token(&self, t: &JoinToken) -> Result<(), StoreError> {
        let c = self.client().await?;
        c.execute(
            "INSERT INTO join_tokens (token, agent_spiffe_id, expires_at, created_at) VALUES ($1, $2, $3, $4)",
            &[&t.token, &t.agent_spiffe_id, &t.expires_at, &t.created_at],
        )
        .await?;
        Ok(())
    }

    pub(super) async fn take_join_token(&self, token: &str) -> Result<Option<JoinToken>, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_opt(
                "DELETE FROM join_tokens WHERE token = $1 RETURNING token, agent_spiffe_id, expires_at, created_at",
                &[&token],
            )
            .await?;
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

    pub(super) async fn prune_join_tokens(&self, now: i64) -> Result<u64, StoreError> {
        let c = self.client().await?;
        Ok(
            c.execute("DELETE FROM join_tokens WHERE expires_at <= $1", &[&now])
                .await?,
        )
    }

    pub(super) async fn upsert_node(&self, n: &NodeRecord) -> Result<(), StoreError> {
        let c = self.client().await?;
        c.execute(
            "INSERT INTO nodes (spiffe_id, attestation_type, serial, expires_at, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (spiffe_id) DO UPDATE SET attestation_type = EXCLUDED.attestation_type,
               serial = EXCLUDED.serial, expires_at = EXCLUDED.expires_at, updated_at = EXCLUDED.updated_at",
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

    pub(super) async fn get_node(&self, id: &str) -> Result<Option<NodeRecord>, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_opt(
                "SELECT spiffe_id, attestation_type, serial, expires_at, created_at, updated_at FROM nodes WHERE spiffe_id = $1",
                &[&id],
            )
            .await?;
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
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        let res = tx
            .execute(
                &format!(
                    "INSERT INTO ca_keys ({KEY_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
                ),
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
            Err(e) if is_unique(&e) => {
                return Err(StoreError::KeySlotTaken {
                    kind: k.kind.as_str(),
                    state: k.state.as_str(),
                })
            }
            Err(e) => return Err(e.into()),
        }
        bump(&tx, "bundle_sequence").await?;
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn list_ca_keys(&self) -> Result<Vec<CaKeyRecord>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                &format!("SELECT {KEY_COLS} FROM ca_keys ORDER BY created_at, seq"),
                &[],
            )
            .await?;
        rows.iter().map(row_key).collect()
    }

    pub(super) async fn activate_ca_key(
        &self,
        kind: KeyKind,
        id: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        // Lock the prepared row; a racing replica waits here and then finds it no longer prepared.
        let prepared = tx
            .query_opt(
                "SELECT id FROM ca_keys WHERE id = $1 AND kind = $2 AND state = 'prepared' FOR UPDATE",
                &[&id, &kind.as_str()],
            )
            .await?;
        if prepared.is_none() {
            return Ok(false);
        }
        tx.execute(
            "UPDATE ca_keys SET state = 'old' WHERE kind = $1 AND state = 'active'",
            &[&kind.as_str()],
        )
        .await?;
        let n = tx
            .execute(
                "UPDATE ca_keys SET state = 'active', activated_at = $2 WHERE id = $1 AND state = 'prepared'",
                &[&id, &now],
            )
            .await?;
        if n != 1 {
            return Ok(false);
        }
        bump(&tx, "bundle_sequence").await?;
        tx.commit().await?;
        Ok(true)
    }

    pub(super) async fn retire_ca_key(&self, id: &str, now: i64) -> Result<(), StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        let n = tx
            .execute(
                "UPDATE ca_keys SET state = 'retired', retired_at = $2 WHERE id = $1 AND state = 'old'",
                &[&id, &now],
            )
            .await?;
        if n == 0 {
            return Err(StoreError::KeyNotFound(id.to_owned()));
        }
        bump(&tx, "bundle_sequence").await?;
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn record_issued(&self, records: &[IssuedRecord]) -> Result<(), StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        let stmt = tx
            .prepare(&format!(
                "INSERT INTO issued ({ISSUED_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"
            ))
            .await?;
        for r in records {
            match tx
                .execute(
                    &stmt,
                    &[
                        &r.serial,
                        &r.spiffe_id,
                        &r.kind.as_str(),
                        &r.issued_at,
                        &r.not_after,
                        &r.signing_key_id,
                        &r.requested_by,
                    ],
                )
                .await
            {
                Ok(_) => {}
                Err(e) if is_unique(&e) => return Err(StoreError::DuplicateSerial(r.serial.clone())),
                Err(e) => return Err(e.into()),
            }
        }
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn list_issued(&self, f: &IssuedFilter) -> Result<Vec<IssuedRecord>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                &format!(
                    "SELECT {ISSUED_COLS} FROM issued WHERE ($1::TEXT IS NULL OR spiffe_id = $1)
                     AND ($2::TEXT IS NULL OR serial = $2) ORDER BY issued_at DESC, seq DESC LIMIT $3"
                ),
                &[&f.spiffe_id, &f.serial, &limit(f.limit)],
            )
            .await?;
        rows.iter().map(row_issued).collect()
    }

    pub(super) async fn max_not_after_signed_by(&self, key_id: &str) -> Result<Option<i64>, StoreError> {
        let c = self.client().await?;
        Ok(c.query_one(
            "SELECT MAX(not_after) FROM issued WHERE signing_key_id = $1",
            &[&key_id],
        )
        .await?
        .try_get(0)?)
    }
}
