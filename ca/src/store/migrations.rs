//! Schema migrations, one ordered, append-only list per backend.
//!
//! Version `n` is the `n`-th step (1-based). On open, every step above the database's version runs in one
//! transaction together with its row in `schema_migrations`; a database whose version is above
//! [`SCHEMA_VERSION`] is refused with [`StoreError::SchemaTooNew`](super::StoreError::SchemaTooNew).
//!
//! To change the schema: never edit a released step; add `migrations/{sqlite,postgres}/000N_<what>.sql`, append
//! it to both lists and bump [`SCHEMA_VERSION`]. The assertion below keeps the three in step.

use super::SCHEMA_VERSION;

/// SQLite steps.
pub(super) const SQLITE: &[&str] = &[include_str!("migrations/sqlite/0001_init.sql")];

/// PostgreSQL steps.
pub(super) const POSTGRES: &[&str] = &[include_str!("migrations/postgres/0001_init.sql")];

const _: () = assert!(
    SQLITE.len() as i64 == SCHEMA_VERSION && POSTGRES.len() as i64 == SCHEMA_VERSION,
    "each backend needs exactly SCHEMA_VERSION migration steps"
);
