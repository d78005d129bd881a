//! SQLite backend: one file, WAL journal, `synchronous=NORMAL` (a commit is durable once the WAL is synced at the
//! next checkpoint; a crash loses at most the last transactions, never consistency). Operations take
//! microseconds, so they run inline under a mutex.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use rusqlite::{params, Connection, ErrorCode, OptionalExtension, Row, Transaction};
use trustline_identity::selector_set_key;

use super::*;

const MIGRATIONS: &[&str] = &[
    // v1
    "CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
     INSERT INTO meta (name, value) VALUES ('entries_revision', 0), ('bundle_sequence', 0);
     CREATE TABLE entries (
        id TEXT PRIMARY KEY, spiffe_id TEXT NOT NULL, parent_id TEXT NOT NULL,
        selectors TEXT NOT NULL, selector_key TEXT NOT NULL,
        x509_svid_ttl INTEGER NOT NULL, jwt_svid_ttl INTEGER NOT NULL, dns_names TEXT NOT NULL,
        admin INTEGER NOT NULL, revision INTEGER NOT NULL, created_at INTEGER NOT NULL,
        UNIQUE (spiffe_id, parent_id, selector_key));
     CREATE INDEX entries_parent ON entries (parent_id);
     CREATE TABLE join_tokens (token TEXT PRIMARY KEY, agent_spiffe_id TEXT NOT NULL,
        expires_at INTEGER NOT NULL, created_at INTEGER NOT NULL);
     CREATE TABLE nodes (spiffe_id TEXT PRIMARY KEY, attestation_type TEXT NOT NULL, serial TEXT NOT NULL,
        expires_at INTEGER NOT NULL, created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL);
     CREATE TABLE ca_keys (id TEXT PRIMARY KEY, kind TEXT NOT NULL, state TEXT NOT NULL, key_type TEXT NOT NULL,
        key_ref TEXT NOT NULL, certificate BLOB, public_key_spki BLOB NOT NULL, not_before INTEGER NOT NULL,
        not_after INTEGER NOT NULL, created_at INTEGER NOT NULL, activated_at INTEGER, retired_at INTEGER);
     CREATE UNIQUE INDEX ca_keys_one_prepared ON ca_keys (kind) WHERE state = 'prepared';
     CREATE UNIQUE INDEX ca_keys_one_active ON ca_keys (kind) WHERE state = 'active';
     CREATE TABLE issued (serial TEXT PRIMARY KEY, spiffe_id TEXT NOT NULL, kind TEXT NOT NULL,
        issued_at INTEGER NOT NULL, not_after INTEGER NOT NULL, signing_key_id TEXT NOT NULL,
        requested_by TEXT NOT NULL);
     CREATE INDEX issued_by_id ON issued (spiffe_id, issued_at);
     CREATE INDEX issued_by_key ON issued (signing_key_id, not_after);",
];

/// The SQLite store.
pub struct SqliteStore {
    path: String,
    conn: Mutex<Connection>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SqliteStore({})", self.path)
    }
}

fn is_constraint(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.code == ErrorCode::ConstraintViolation)
}

const ENTRY_COLS: &str =
    "id, spiffe_id, parent_id, selectors, x509_svid_ttl, jwt_svid_ttl, dns_names, admin, revision, created_at";
const KEY_COLS: &str =
    "id, kind, state, key_type, key_ref, certificate, public_key_spki, not_before, not_after, \
                        created_at, activated_at, retired_at";
const ISSUED_COLS: &str = "serial, spiffe_id, kind, issued_at, not_after, signing_key_id, requested_by";

fn row_entry(r: &Row<'_>) -> rusqlite::Result<(Entry, String, String)> {
    Ok((
        Entry {
            id: r.get(0)?,
            spiffe_id: r.get(1)?,
            parent_id: r.get(2)?,
            selectors: Vec::new(),
            x509_svid_ttl: r.get(4)?,
            jwt_svid_ttl: r.get(5)?,
            dns_names: Vec::new(),
            admin: r.get(7)?,
            revision: r.get(8)?,
            created_at: r.get(9)?,
        },
        r.get(3)?,
        r.get(6)?,
    ))
}

fn finish_entry((mut e, sel, dns): (Entry, String, String)) -> Result<Entry, StoreError> {
    e.selectors = parse_selectors(&sel)?;
    e.dns_names = parse_strings(&dns)?;
    Ok(e)
}

type RawKey = (CaKeyRecord, String, String);

fn row_key(r: &Row<'_>) -> rusqlite::Result<RawKey> {
    Ok((
        CaKeyRecord {
            id: r.get(0)?,
            kind: KeyKind::X509,
            state: KeyState::Prepared,
            key_type: r.get(3)?,
            key_ref: r.get(4)?,
            certificate: r.get(5)?,
            public_key_spki: r.get(6)?,
            not_before: r.get(7)?,
            not_after: r.get(8)?,
            created_at: r.get(9)?,
            activated_at: r.get(10)?,
            retired_at: r.get(11)?,
        },
        r.get(1)?,
        r.get(2)?,
    ))
}

fn finish_key((mut k, kind, state): RawKey) -> Result<CaKeyRecord, StoreError> {
    k.kind = kind.parse()?;
    k.state = state.parse()?;
    Ok(k)
}

fn row_issued(r: &Row<'_>) -> rusqlite::Result<(IssuedRecord, String)> {
    Ok((
        IssuedRecord {
            serial: r.get(0)?,
            spiffe_id: r.get(1)?,
            kind: KeyKind::X509,
            issued_at: r.get(3)?,
            not_after: r.get(4)?,
            signing_key_id: r.get(5)?,
            requested_by: r.get(6)?,
        },
        r.get(2)?,
    ))
}

fn bump(tx: &Transaction<'_>, name: &str) -> rusqlite::Result<i64> {
    tx.query_row(
        "UPDATE meta SET value = value + 1 WHERE name = ?1 RETURNING value",
        [name],
        |r| r.get(0),
    )
}

impl SqliteStore {
    /// Opens or creates the database file and applies pending migrations.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let p = path.display().to_string();
        let err = |source| StoreError::Sqlite {
            path: p.clone(),
            source,
        };
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() && !dir.exists() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| StoreError::Corrupt(format!("{}: {e}", dir.display())))?;
            }
        }
        let mut conn = Connection::open(path).map_err(err)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;
             PRAGMA busy_timeout = 5000;",
        )
        .map_err(err)?;
        conn.set_prepared_statement_cache_capacity(64);
        let tx = conn.transaction().map_err(err)?;
        tx.execute_batch("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)")
            .map_err(err)?;
        let current: i64 = tx
            .query_row(
                "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
                [],
                |r| r.get(0),
            )
            .map_err(err)?;
        let supported = MIGRATIONS.len() as i64;
        if current > supported {
            return Err(StoreError::SchemaTooNew {
                found: current,
                supported,
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
            tx.execute_batch(sql).map_err(err)?;
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, strftime('%s','now'))",
                [i as i64 + 1],
            )
            .map_err(err)?;
        }
        tx.commit().map_err(err)?;
        Ok(Self {
            path: p,
            conn: Mutex::new(conn),
        })
    }

    fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn schema_version(&self) -> Result<i64, StoreError> {
        self.conn()
            .query_row(
                "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
                [],
                |r| r.get(0),
            )
            .map_err(|e| self.err(e))
    }

    pub(super) fn counter(&self, name: &str) -> Result<i64, StoreError> {
        self.conn()
            .prepare_cached("SELECT value FROM meta WHERE name = ?1")
            .and_then(|mut s| s.query_row([name], |r| r.get(0)))
            .map_err(|e| self.err(e))
    }

    fn duplicate_of(&self, conn: &Connection, e: &Entry, key: &str) -> StoreError {
        let existing: Option<String> = conn
            .query_row(
                "SELECT id FROM entries WHERE spiffe_id = ?1 AND parent_id = ?2 AND selector_key = ?3",
                params![e.spiffe_id, e.parent_id, key],
                |r| r.get(0),
            )
            .optional()
            .unwrap_or(None);
        StoreError::DuplicateEntry {
            spiffe_id: e.spiffe_id.clone(),
            parent_id: e.parent_id.clone(),
            existing_id: existing.unwrap_or_default(),
        }
    }

    pub(super) fn create_entry(&self, entry: &Entry) -> Result<Entry, StoreError> {
        let mut conn = self.conn();
        let sel = canonical(entry);
        let key = selector_set_key(&sel);
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        let rev = bump(&tx, "entries_revision").map_err(|e| self.err(e))?;
        let res = tx.execute(
            "INSERT INTO entries (id, spiffe_id, parent_id, selectors, selector_key, x509_svid_ttl, jwt_svid_ttl,
             dns_names, admin, revision, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![
                entry.id,
                entry.spiffe_id,
                entry.parent_id,
                selectors_json(&sel),
                key,
                entry.x509_svid_ttl,
                entry.jwt_svid_ttl,
                serde_json::to_string(&entry.dns_names).unwrap_or_else(|_| "[]".into()),
                entry.admin,
                rev,
                entry.created_at
            ],
        );
        match res {
            Ok(_) => {}
            Err(e) if is_constraint(&e) => {
                drop(tx);
                return Err(self.duplicate_of(&conn, entry, &key));
            }
            Err(e) => return Err(self.err(e)),
        }
        tx.commit().map_err(|e| self.err(e))?;
        Ok(Entry {
            selectors: sel,
            revision: rev,
            ..entry.clone()
        })
    }

    pub(super) fn update_entry(&self, entry: &Entry) -> Result<Entry, StoreError> {
        let mut conn = self.conn();
        let sel = canonical(entry);
        let key = selector_set_key(&sel);
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        let rev = bump(&tx, "entries_revision").map_err(|e| self.err(e))?;
        let res = tx.execute(
            "UPDATE entries SET spiffe_id = ?2, parent_id = ?3, selectors = ?4, selector_key = ?5, x509_svid_ttl = ?6,
             jwt_svid_ttl = ?7, dns_names = ?8, admin = ?9, revision = ?10 WHERE id = ?1",
            params![
                entry.id,
                entry.spiffe_id,
                entry.parent_id,
                selectors_json(&sel),
                key,
                entry.x509_svid_ttl,
                entry.jwt_svid_ttl,
                serde_json::to_string(&entry.dns_names).unwrap_or_else(|_| "[]".into()),
                entry.admin,
                rev
            ],
        );
        let n = match res {
            Ok(n) => n,
            Err(e) if is_constraint(&e) => {
                drop(tx);
                return Err(self.duplicate_of(&conn, entry, &key));
            }
            Err(e) => return Err(self.err(e)),
        };
        if n == 0 {
            return Err(StoreError::EntryNotFound(entry.id.clone()));
        }
        let created_at: i64 = tx
            .query_row("SELECT created_at FROM entries WHERE id = ?1", [&entry.id], |r| {
                r.get(0)
            })
            .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        Ok(Entry {
            selectors: sel,
            revision: rev,
            created_at,
            ..entry.clone()
        })
    }

    pub(super) fn get_entry(&self, id: &str) -> Result<Option<Entry>, StoreError> {
        let conn = self.conn();
        let raw = conn
            .prepare_cached(&format!("SELECT {ENTRY_COLS} FROM entries WHERE id = ?1"))
            .and_then(|mut s| s.query_row([id], row_entry).optional())
            .map_err(|e| self.err(e))?;
        raw.map(finish_entry).transpose()
    }

    pub(super) fn list_entries(&self, f: &EntryFilter) -> Result<Vec<Entry>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT {ENTRY_COLS} FROM entries WHERE (?1 IS NULL OR spiffe_id = ?1) AND (?2 IS NULL OR parent_id = ?2)
                 ORDER BY created_at, id"
            ))
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![f.spiffe_id, f.parent_id], row_entry)
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for r in rows {
            let e = finish_entry(r.map_err(|e| self.err(e))?)?;
            if f.selector.as_ref().is_none_or(|s| e.selectors.contains(s)) {
                out.push(e);
            }
        }
        Ok(out)
    }

    pub(super) fn delete_entry(&self, id: &str) -> Result<Entry, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        let raw = tx
            .query_row(
                &format!("SELECT {ENTRY_COLS} FROM entries WHERE id = ?1"),
                [id],
                row_entry,
            )
            .optional()
            .map_err(|e| self.err(e))?
            .ok_or_else(|| StoreError::EntryNotFound(id.to_owned()))?;
        tx.execute("DELETE FROM entries WHERE id = ?1", [id])
            .map_err(|e| self.err(e))?;
        bump(&tx, "entries_revision").map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        finish_entry(raw)
    }

    pub(super) fn create_join_token(&self, t: &JoinToken) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "INSERT INTO join_tokens (token, agent_spiffe_id, expires_at, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![t.token, t.agent_spiffe_id, t.expires_at, t.created_at],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    pub(super) fn take_join_token(&self, token: &str) -> Result<Option<JoinToken>, StoreError> {
        self.conn()
            .query_row(
                "DELETE FROM join_tokens WHERE token = ?1 RETURNING token, agent_spiffe_id, expires_at, created_at",
                [token],
                |r| {
                    Ok(JoinToken {
                        token: r.get(0)?,
                        agent_spiffe_id: r.get(1)?,
                        expires_at: r.get(2)?,
                        created_at: r.get(3)?,
                    })
                },
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    pub(super) fn prune_join_tokens(&self, now: i64) -> Result<u64, StoreError> {
        self.conn()
            .execute("DELETE FROM join_tokens WHERE expires_at <= ?1", [now])
            .map(|n| n as u64)
            .map_err(|e| self.err(e))
    }

    pub(super) fn upsert_node(&self, n: &NodeRecord) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "INSERT INTO nodes (spiffe_id, attestation_type, serial, expires_at, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (spiffe_id) DO UPDATE SET attestation_type = excluded.attestation_type,
                   serial = excluded.serial, expires_at = excluded.expires_at, updated_at = excluded.updated_at",
                params![n.spiffe_id, n.attestation_type, n.serial, n.expires_at, n.created_at, n.updated_at],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    pub(super) fn get_node(&self, id: &str) -> Result<Option<NodeRecord>, StoreError> {
        self.conn()
            .prepare_cached(
                "SELECT spiffe_id, attestation_type, serial, expires_at, created_at, updated_at FROM nodes WHERE spiffe_id = ?1",
            )
            .and_then(|mut s| {
                s.query_row([id], |r| {
                    Ok(NodeRecord {
                        spiffe_id: r.get(0)?,
                        attestation_type: r.get(1)?,
                        serial: r.get(2)?,
                        expires_at: r.get(3)?,
                        created_at: r.get(4)?,
                        updated_at: r.get(5)?,
                    })
                })
                .optional()
            })
            .map_err(|e| self.err(e))
    }

    pub(super) fn insert_ca_key(&self, k: &CaKeyRecord) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        let res = tx.execute(
            &format!(
                "INSERT INTO ca_keys ({KEY_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
            ),
            params![
                k.id,
                k.kind.as_str(),
                k.state.as_str(),
                k.key_type,
                k.key_ref,
                k.certificate,
                k.public_key_spki,
                k.not_before,
                k.not_after,
                k.created_at,
                k.activated_at,
                k.retired_at
            ],
        );
        match res {
            Ok(_) => {}
            Err(e) if is_constraint(&e) => {
                return Err(StoreError::KeySlotTaken {
                    kind: k.kind.as_str(),
                    state: k.state.as_str(),
                })
            }
            Err(e) => return Err(self.err(e)),
        }
        bump(&tx, "bundle_sequence").map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))
    }

    pub(super) fn list_ca_keys(&self) -> Result<Vec<CaKeyRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT {KEY_COLS} FROM ca_keys ORDER BY created_at, rowid"
            ))
            .map_err(|e| self.err(e))?;
        let rows = stmt.query_map([], row_key).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for r in rows {
            out.push(finish_key(r.map_err(|e| self.err(e))?)?);
        }
        Ok(out)
    }

    pub(super) fn activate_ca_key(&self, kind: KeyKind, id: &str, now: i64) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        let prepared: Option<String> = tx
            .query_row(
                "SELECT id FROM ca_keys WHERE id = ?1 AND kind = ?2 AND state = 'prepared'",
                params![id, kind.as_str()],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        if prepared.is_none() {
            return Ok(false);
        }
        tx.execute(
            "UPDATE ca_keys SET state = 'old' WHERE kind = ?1 AND state = 'active'",
            [kind.as_str()],
        )
        .map_err(|e| self.err(e))?;
        tx.execute(
            "UPDATE ca_keys SET state = 'active', activated_at = ?2 WHERE id = ?1 AND state = 'prepared'",
            params![id, now],
        )
        .map_err(|e| self.err(e))?;
        bump(&tx, "bundle_sequence").map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        Ok(true)
    }

    pub(super) fn retire_ca_key(&self, id: &str, now: i64) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        let n = tx
            .execute(
                "UPDATE ca_keys SET state = 'retired', retired_at = ?2 WHERE id = ?1 AND state = 'old'",
                params![id, now],
            )
            .map_err(|e| self.err(e))?;
        if n == 0 {
            return Err(StoreError::KeyNotFound(id.to_owned()));
        }
        bump(&tx, "bundle_sequence").map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))
    }

    pub(super) fn record_issued(&self, records: &[IssuedRecord]) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        {
            let mut stmt = tx
                .prepare_cached(&format!(
                    "INSERT INTO issued ({ISSUED_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
                ))
                .map_err(|e| self.err(e))?;
            for r in records {
                match stmt.execute(params![
                    r.serial,
                    r.spiffe_id,
                    r.kind.as_str(),
                    r.issued_at,
                    r.not_after,
                    r.signing_key_id,
                    r.requested_by
                ]) {
                    Ok(_) => {}
                    Err(e) if is_constraint(&e) => return Err(StoreError::DuplicateSerial(r.serial.clone())),
                    Err(e) => return Err(self.err(e)),
                }
            }
        }
        tx.commit().map_err(|e| self.err(e))
    }

    pub(super) fn list_issued(&self, f: &IssuedFilter) -> Result<Vec<IssuedRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT {ISSUED_COLS} FROM issued WHERE (?1 IS NULL OR spiffe_id = ?1) AND (?2 IS NULL OR serial = ?2)
                 ORDER BY issued_at DESC, rowid DESC LIMIT ?3"
            ))
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![f.spiffe_id, f.serial, limit(f.limit)], row_issued)
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for r in rows {
            let (mut rec, kind) = r.map_err(|e| self.err(e))?;
            rec.kind = kind.parse()?;
            out.push(rec);
        }
        Ok(out)
    }

    pub(super) fn max_not_after_signed_by(&self, key_id: &str) -> Result<Option<i64>, StoreError> {
        self.conn()
            .prepare_cached("SELECT MAX(not_after) FROM issued WHERE signing_key_id = ?1")
            .and_then(|mut s| s.query_row([key_id], |r| r.get(0)))
            .map_err(|e| self.err(e))
    }

    /// Test hook: pretend the database was written by a newer version.
    #[cfg(test)]
    pub(super) fn bump_schema_for_test(&self) {
        let _ = self.conn().execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES (999, 0)",
            [],
        );
    }
}
