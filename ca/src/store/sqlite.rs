//! SQLite backend: one file, WAL journal, `synchronous=NORMAL` (a committed transaction survives a process crash;
//! a power loss may lose the last few commits, never consistency). Operations take microseconds, so they run
//! inline under a mutex. Every write transaction is `BEGIN IMMEDIATE`, so a second process on the same file waits
//! (`busy_timeout`) instead of failing half-way.
//!
//! The file is the CA's alone: created 0600 (in a folder created 0700) before SQLite opens it, so its `-wal` and
//! `-shm` files, which SQLite gives the database's mode, are 0600 too; a database, `-wal`, `-shm` or `-journal`
//! file that group or others can access is refused before anything is read. `secure_delete` is on, so deleted
//! rows (spent tokens, and the clear-text tokens of an older version once hashed) are overwritten, not left in
//! free space.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{params, Connection, ErrorCode, OptionalExtension, Row, Transaction, TransactionBehavior};
use trustline_identity::selector_set_key;

use super::*;
use crate::private_files;

/// How long a write waits for another process holding the database lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

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
    e.sqlite_error_code() == Some(ErrorCode::ConstraintViolation)
}

const ENTRY_COLS: &str =
    "id, spiffe_id, parent_id, selectors, x509_svid_ttl, jwt_svid_ttl, dns_names, admin, revision, created_at";
const KEY_COLS: &str =
    "id, kind, state, key_type, key_ref, certificate, public_key_spki, not_before, not_after, \
                        created_at, activated_at, retired_at";
const ISSUED_COLS: &str = "serial, spiffe_id, kind, issued_at, not_after, signing_key_id, requested_by";

/// A row as read, before the JSON and enum columns are parsed (parsing errors are ours, not rusqlite's).
struct RawEntry(Entry, String, String);

fn row_entry(r: &Row<'_>) -> rusqlite::Result<RawEntry> {
    Ok(RawEntry(
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

impl RawEntry {
    fn finish(self) -> Result<Entry, StoreError> {
        let RawEntry(mut e, sel, dns) = self;
        e.selectors = parse_selectors(&sel)?;
        e.dns_names = parse_strings(&dns)?;
        Ok(e)
    }
}

struct RawKey(CaKeyRecord, String, String);

fn row_key(r: &Row<'_>) -> rusqlite::Result<RawKey> {
    Ok(RawKey(
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

impl RawKey {
    fn finish(self) -> Result<CaKeyRecord, StoreError> {
        let RawKey(mut k, kind, state) = self;
        k.kind = kind.parse()?;
        k.state = state.parse()?;
        Ok(k)
    }
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

/// Increments a counter in `meta` inside `tx` and returns its new value.
fn bump(tx: &Transaction<'_>, name: &str) -> rusqlite::Result<i64> {
    tx.prepare_cached("UPDATE meta SET value = value + 1 WHERE name = ?1 RETURNING value")?
        .query_row([name], |r| r.get(0))
}

fn read_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.prepare_cached("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")?
        .query_row([], |r| r.get(0))
}

impl SqliteStore {
    /// Opens or creates the database file (and its directory) and applies pending migrations.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let p = path.display().to_string();
        let err = |source| StoreError::Sqlite {
            path: p.clone(),
            source,
        };
        let io = |at: &Path| {
            let at = at.display().to_string();
            move |source| StoreError::Io { path: at, source }
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            private_files::create_dir_all(dir).map_err(io(dir))?;
        }
        let files = private_files::sqlite_files(path);
        for f in &files {
            if let Some(mode) = private_files::loose_mode(f).map_err(io(f))? {
                return Err(StoreError::FileMode {
                    path: f.display().to_string(),
                    mode,
                });
            }
        }
        private_files::create_file(path).map_err(io(path))?;
        let mut conn = Connection::open(path).map_err(err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(err)?;
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .map_err(err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(path = %p, journal_mode = %mode, "sqlite refused WAL mode");
        }
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(err)?;
        conn.pragma_update(None, "foreign_keys", true).map_err(err)?;
        conn.pragma_update(None, "secure_delete", true).map_err(err)?;
        conn.set_prepared_statement_cache_capacity(64);
        conn.set_transaction_behavior(TransactionBehavior::Immediate);
        let hashed = Self::migrate(&mut conn).map_err(|e| match e {
            MigrateError::Sqlite(source) => err(source),
            MigrateError::Store(e) => e,
        })?;
        if hashed > 0 {
            // The clear-text rows are overwritten in the WAL; copy that into the main file now instead of at the
            // next checkpoint, so the file stops holding them at once.
            conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                .map_err(err)?;
        }
        // SQLite gives its -wal and -shm files the database's mode; make sure of it whatever created them.
        for f in &files[1..] {
            private_files::tighten(f).map_err(io(f))?;
        }
        Ok(Self {
            path: p,
            conn: Mutex::new(conn),
        })
    }

    /// Applies pending schema steps, then hashes join tokens an older version stored in clear (in the same
    /// transaction); returns how many were hashed.
    fn migrate(conn: &mut Connection) -> Result<usize, MigrateError> {
        let tx = conn.transaction()?;
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)",
        )?;
        let current = read_version(&tx)?;
        let steps = migrations::SQLITE;
        if current > SCHEMA_VERSION {
            return Err(MigrateError::Store(StoreError::SchemaTooNew {
                found: current,
                supported: SCHEMA_VERSION,
            }));
        }
        for (version, sql) in (1_i64..).zip(steps).skip(usize::try_from(current).unwrap_or(0)) {
            tracing::info!(version, "applying sqlite schema migration");
            tx.execute_batch(sql)?;
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, unixepoch())",
                [version],
            )?;
        }
        let hashed = Self::hash_clear_tokens(&tx)?;
        tx.commit()?;
        Ok(hashed)
    }

    /// Replaces every join token row stored in clear (by versions before digests) with its digest.
    fn hash_clear_tokens(tx: &Transaction<'_>) -> rusqlite::Result<usize> {
        let clear: Vec<(String, String)> = tx
            .prepare("SELECT token, agent_spiffe_id FROM join_tokens WHERE substr(token, 1, 7) <> 'sha256:'")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        for (token, agent) in &clear {
            let (digest, agent) = hashed_row(token, agent);
            tx.execute(
                "UPDATE join_tokens SET token = ?2, agent_spiffe_id = ?3 WHERE token = ?1",
                params![token, digest, agent],
            )?;
        }
        if !clear.is_empty() {
            tracing::info!(
                count = clear.len(),
                "join tokens stored in clear by an older version replaced by their digests"
            );
        }
        Ok(clear.len())
    }

    fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// The connection. A panic while it was held cannot leave a transaction open (rusqlite rolls back on drop),
    /// so a poisoned lock is safe to take over.
    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn schema_version(&self) -> Result<i64, StoreError> {
        read_version(&self.conn()).map_err(|e| self.err(e))
    }

    pub(super) fn counter(&self, name: &str) -> Result<i64, StoreError> {
        self.conn()
            .prepare_cached("SELECT value FROM meta WHERE name = ?1")
            .and_then(|mut s| s.query_row([name], |r| r.get(0)))
            .map_err(|e| self.err(e))
    }

    /// Explains a constraint failure on `entries`: a duplicate of an existing entry, or (for a reused id) the raw
    /// error.
    fn entry_conflict(&self, conn: &Connection, e: &Entry, key: &str, source: rusqlite::Error) -> StoreError {
        let existing = conn
            .prepare_cached(
                "SELECT id FROM entries WHERE spiffe_id = ?1 AND parent_id = ?2 AND selector_key = ?3",
            )
            .and_then(|mut s| {
                s.query_row(params![e.spiffe_id, e.parent_id, key], |r| r.get(0))
                    .optional()
            });
        match existing {
            Ok(Some(existing_id)) => StoreError::DuplicateEntry {
                spiffe_id: e.spiffe_id.clone(),
                parent_id: e.parent_id.clone(),
                existing_id,
            },
            Ok(None) => self.err(source),
            Err(e) => self.err(e),
        }
    }

    pub(super) fn create_entry(&self, entry: &Entry) -> Result<Entry, StoreError> {
        let mut conn = self.conn();
        let sel = canonical(&entry.selectors);
        let key = selector_set_key(&sel);
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        let rev = bump(&tx, "entries_revision").map_err(|e| self.err(e))?;
        let res = tx
            .prepare_cached(&format!(
                "INSERT INTO entries ({ENTRY_COLS}, selector_key) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"
            ))
            .and_then(|mut s| {
                s.execute(params![
                    entry.id,
                    entry.spiffe_id,
                    entry.parent_id,
                    selectors_json(&sel),
                    entry.x509_svid_ttl,
                    entry.jwt_svid_ttl,
                    strings_json(&entry.dns_names),
                    entry.admin,
                    rev,
                    entry.created_at,
                    key,
                ])
            });
        match res {
            Ok(_) => {}
            Err(e) if is_constraint(&e) => {
                drop(tx);
                return Err(self.entry_conflict(&conn, entry, &key, e));
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
        let sel = canonical(&entry.selectors);
        let key = selector_set_key(&sel);
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        let rev = bump(&tx, "entries_revision").map_err(|e| self.err(e))?;
        let res = tx
            .prepare_cached(
                "UPDATE entries SET spiffe_id = ?2, parent_id = ?3, selectors = ?4, selector_key = ?5,
                 x509_svid_ttl = ?6, jwt_svid_ttl = ?7, dns_names = ?8, admin = ?9, revision = ?10
                 WHERE id = ?1 RETURNING created_at",
            )
            .and_then(|mut s| {
                s.query_row(
                    params![
                        entry.id,
                        entry.spiffe_id,
                        entry.parent_id,
                        selectors_json(&sel),
                        key,
                        entry.x509_svid_ttl,
                        entry.jwt_svid_ttl,
                        strings_json(&entry.dns_names),
                        entry.admin,
                        rev
                    ],
                    |r| r.get::<_, i64>(0),
                )
                .optional()
            });
        let created_at = match res {
            Ok(Some(c)) => c,
            Ok(None) => return Err(StoreError::EntryNotFound(entry.id.clone())),
            Err(e) if is_constraint(&e) => {
                drop(tx);
                return Err(self.entry_conflict(&conn, entry, &key, e));
            }
            Err(e) => return Err(self.err(e)),
        };
        tx.commit().map_err(|e| self.err(e))?;
        Ok(Entry {
            selectors: sel,
            revision: rev,
            created_at,
            ..entry.clone()
        })
    }

    pub(super) fn get_entry(&self, id: &str) -> Result<Option<Entry>, StoreError> {
        let raw = self
            .conn()
            .prepare_cached(&format!("SELECT {ENTRY_COLS} FROM entries WHERE id = ?1"))
            .and_then(|mut s| s.query_row([id], row_entry).optional())
            .map_err(|e| self.err(e))?;
        raw.map(RawEntry::finish).transpose()
    }

    pub(super) fn list_entries(&self, f: &EntryFilter) -> Result<Vec<Entry>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT {ENTRY_COLS} FROM entries
                 WHERE (?1 IS NULL OR spiffe_id = ?1) AND (?2 IS NULL OR parent_id = ?2)
                   AND (?3 IS NULL OR EXISTS (SELECT 1 FROM json_each(entries.selectors) AS s WHERE s.value = ?3))
                 ORDER BY created_at, id"
            ))
            .map_err(|e| self.err(e))?;
        let selector = f.selector.as_ref().map(ToString::to_string);
        let rows = stmt
            .query_map(params![f.spiffe_id, f.parent_id, selector], row_entry)
            .map_err(|e| self.err(e))?;
        rows.map(|r| r.map_err(|e| self.err(e)).and_then(RawEntry::finish))
            .collect()
    }

    pub(super) fn delete_entry(&self, id: &str) -> Result<Entry, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        let raw = tx
            .prepare_cached(&format!(
                "DELETE FROM entries WHERE id = ?1 RETURNING {ENTRY_COLS}"
            ))
            .and_then(|mut s| s.query_row([id], row_entry).optional())
            .map_err(|e| self.err(e))?
            .ok_or_else(|| StoreError::EntryNotFound(id.to_owned()))?;
        let entry = raw.finish()?;
        bump(&tx, "entries_revision").map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        Ok(entry)
    }

    pub(super) fn create_join_token(&self, t: &JoinToken) -> Result<(), StoreError> {
        self.conn()
            .prepare_cached(
                "INSERT INTO join_tokens (token, agent_spiffe_id, expires_at, created_at) VALUES (?1, ?2, ?3, ?4)",
            )
            .and_then(|mut s| s.execute(params![t.token, t.agent_spiffe_id, t.expires_at, t.created_at]))
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Deletes a token and returns what it was (one statement, so two callers can never both get it).
    pub(super) fn take_join_token(&self, token: &str) -> Result<Option<JoinToken>, StoreError> {
        self.conn()
            .prepare_cached(
                "DELETE FROM join_tokens WHERE token = ?1 RETURNING token, agent_spiffe_id, expires_at, created_at",
            )
            .and_then(|mut s| {
                s.query_row([token], |r| {
                    Ok(JoinToken {
                        token: r.get(0)?,
                        agent_spiffe_id: r.get(1)?,
                        expires_at: r.get(2)?,
                        created_at: r.get(3)?,
                    })
                })
                .optional()
            })
            .map_err(|e| self.err(e))
    }

    pub(super) fn is_agent_id(&self, id: &str) -> Result<bool, StoreError> {
        self.conn()
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM nodes WHERE spiffe_id = ?1)
                     OR EXISTS (SELECT 1 FROM join_tokens WHERE agent_spiffe_id = ?1)",
            )
            .and_then(|mut s| s.query_row([id], |r| r.get(0)))
            .map_err(|e| self.err(e))
    }

    pub(super) fn prune_join_tokens(&self, now: i64) -> Result<u64, StoreError> {
        self.conn()
            .prepare_cached("DELETE FROM join_tokens WHERE expires_at <= ?1")
            .and_then(|mut s| s.execute([now]))
            .map(|n| n as u64)
            .map_err(|e| self.err(e))
    }

    pub(super) fn upsert_node(&self, n: &NodeRecord) -> Result<(), StoreError> {
        self.conn()
            .prepare_cached(
                "INSERT INTO nodes (spiffe_id, attestation_type, serial, expires_at, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (spiffe_id) DO UPDATE SET attestation_type = excluded.attestation_type,
                   serial = excluded.serial, expires_at = excluded.expires_at, updated_at = excluded.updated_at",
            )
            .and_then(|mut s| {
                s.execute(params![
                    n.spiffe_id,
                    n.attestation_type,
                    n.serial,
                    n.expires_at,
                    n.created_at,
                    n.updated_at
                ])
            })
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    pub(super) fn list_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let conn = self.conn();
        let mut st = conn
            .prepare_cached(
                "SELECT spiffe_id, attestation_type, serial, expires_at, created_at, updated_at
                 FROM nodes ORDER BY spiffe_id",
            )
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([], |r| {
                Ok(NodeRecord {
                    spiffe_id: r.get(0)?,
                    attestation_type: r.get(1)?,
                    serial: r.get(2)?,
                    expires_at: r.get(3)?,
                    created_at: r.get(4)?,
                    updated_at: r.get(5)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }

    pub(super) fn delete_node(&self, id: &str) -> Result<bool, StoreError> {
        self.conn()
            .prepare_cached("DELETE FROM nodes WHERE spiffe_id = ?1")
            .and_then(|mut s| s.execute([id]))
            .map(|n| n > 0)
            .map_err(|e| self.err(e))
    }

    pub(super) fn get_node(&self, id: &str) -> Result<Option<NodeRecord>, StoreError> {
        self.conn()
            .prepare_cached(
                "SELECT spiffe_id, attestation_type, serial, expires_at, created_at, updated_at
                 FROM nodes WHERE spiffe_id = ?1",
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
        let res = tx
            .prepare_cached(&format!(
                "INSERT INTO ca_keys ({KEY_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
            ))
            .and_then(|mut s| {
                s.execute(params![
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
                ])
            });
        match res {
            Ok(_) => {}
            Err(e) if is_constraint(&e) => {
                // Either the id is reused (a bug in the caller: report it raw) or the slot is taken.
                let id_taken = tx
                    .prepare_cached("SELECT 1 FROM ca_keys WHERE id = ?1")
                    .and_then(|mut s| s.exists([&k.id]))
                    .map_err(|e| self.err(e))?;
                return Err(if id_taken {
                    self.err(e)
                } else {
                    StoreError::KeySlotTaken {
                        kind: k.kind.as_str(),
                        state: k.state.as_str(),
                    }
                });
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
        rows.map(|r| r.map_err(|e| self.err(e)).and_then(RawKey::finish))
            .collect()
    }

    pub(super) fn activate_ca_key(&self, kind: KeyKind, id: &str, now: i64) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        // IMMEDIATE: holds the write lock from the start, so another process cannot interleave.
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        // Demote the active key only if `id` is still prepared; then promote conditionally and count.
        tx.prepare_cached(
            "UPDATE ca_keys SET state = 'old' WHERE kind = ?1 AND state = 'active'
               AND EXISTS (SELECT 1 FROM ca_keys WHERE id = ?2 AND kind = ?1 AND state = 'prepared')",
        )
        .and_then(|mut s| s.execute(params![kind.as_str(), id]))
        .map_err(|e| self.err(e))?;
        let promoted = tx
            .prepare_cached(
                "UPDATE ca_keys SET state = 'active', activated_at = ?3
                 WHERE id = ?2 AND kind = ?1 AND state = 'prepared'",
            )
            .and_then(|mut s| s.execute(params![kind.as_str(), id, now]))
            .map_err(|e| self.err(e))?;
        if promoted != 1 {
            return Ok(false); // dropping `tx` rolls back
        }
        bump(&tx, "bundle_sequence").map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        Ok(true)
    }

    pub(super) fn retire_ca_key(&self, id: &str, now: i64) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        let n = tx
            .prepare_cached(
                "UPDATE ca_keys SET state = 'retired', retired_at = ?2 WHERE id = ?1 AND state = 'old'",
            )
            .and_then(|mut s| s.execute(params![id, now]))
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
                    // The only constraint on `issued` is the serial; dropping `tx` discards the whole batch.
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
        rows.map(|r| {
            let (mut rec, kind) = r.map_err(|e| self.err(e))?;
            rec.kind = kind.parse()?;
            Ok(rec)
        })
        .collect()
    }

    pub(super) fn max_not_after_signed_by(&self, key_id: &str) -> Result<Option<i64>, StoreError> {
        self.conn()
            .prepare_cached("SELECT MAX(not_after) FROM issued WHERE signing_key_id = ?1")
            .and_then(|mut s| s.query_row([key_id], |r| r.get(0)))
            .map_err(|e| self.err(e))
    }
}

/// Migration failures before the store (and its path-carrying error helper) exists.
enum MigrateError {
    Sqlite(rusqlite::Error),
    Store(StoreError),
}

impl From<rusqlite::Error> for MigrateError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Sqlite(e)
    }
}
