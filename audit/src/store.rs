//! The central store: sidecars' logs shipped to PostgreSQL, frame by frame (raw bodies and hashes kept, so
//! verification still works on what was shipped), with the request fields as columns for queries.
//!
//! `ship` is incremental and idempotent: each log (named, one per sidecar) continues from the highest sequence
//! number already stored.

use std::path::Path;

use tokio_postgres::{Client, NoTls};
pub use trustline_identity::pgtls::PgTls;
use trustline_identity::tls::TrustBundle;

use crate::format::{
    chain_hash, decode_frame, Hash, Record, HEADER_LEN, KIND_CHECKPOINT, KIND_RECORD, KIND_SEALED_RECORD,
};
use crate::query::Located;
use crate::verify::{check_checkpoint, Finding, Report};
use crate::writer::segments;

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// PostgreSQL refused or is unreachable.
    #[error("PostgreSQL: {0}")]
    Db(#[from] tokio_postgres::Error),
    /// Reading the local log failed.
    #[error("{0}")]
    Log(#[from] crate::writer::LogError),
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS trustline_log_frames (
    log         TEXT     NOT NULL,
    seq         BIGINT   NOT NULL,
    kind        SMALLINT NOT NULL,
    body        BYTEA    NOT NULL,
    hash        BYTEA    NOT NULL,
    time_us     BIGINT,
    trace_id    TEXT,
    caller      TEXT,
    callee      TEXT,
    path        TEXT,
    decision    TEXT,
    record      JSONB,
    PRIMARY KEY (log, seq)
);
CREATE INDEX IF NOT EXISTS trustline_log_frames_trace ON trustline_log_frames (trace_id);
CREATE INDEX IF NOT EXISTS trustline_log_frames_time ON trustline_log_frames (time_us);
";

/// Connects (over TLS 1.3 when `tls` is given: the server's CA) and creates the table if needed.
pub async fn connect(
    conninfo: &str,
    tls: Option<trustline_identity::pgtls::PgTls>,
) -> Result<Client, StoreError> {
    let client = match tls {
        Some(tls) => {
            let (client, conn) = tokio_postgres::connect(conninfo, tls).await?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::warn!(error = %e, "PostgreSQL connection ended");
                }
            });
            client
        }
        None => {
            let (client, conn) = tokio_postgres::connect(conninfo, NoTls).await?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::warn!(error = %e, "PostgreSQL connection ended");
                }
            });
            client
        }
    };
    client.batch_execute(SCHEMA).await?;
    Ok(client)
}

/// Ships the frames of the log in `dir` not yet stored under `name`; returns how many were added.
pub async fn ship(client: &mut Client, name: &str, dir: &Path) -> Result<u64, StoreError> {
    let have: Option<i64> = client
        .query_one(
            "SELECT max(seq) FROM trustline_log_frames WHERE log = $1",
            &[&name],
        )
        .await?
        .get(0);
    let from = have.map_or(0, |s| s as u64 + 1);
    let tx = client.transaction().await?;
    let stmt = tx
        .prepare(
            "INSERT INTO trustline_log_frames (log, seq, kind, body, hash, time_us, trace_id, caller, callee, path, decision, record)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) ON CONFLICT DO NOTHING",
        )
        .await?;
    let mut added = 0u64;
    for path in segments(dir)? {
        let bytes = std::fs::read(&path).map_err(|source| crate::writer::LogError::Io {
            path: path.clone(),
            source,
        })?;
        let mut off = HEADER_LEN;
        while let Some(f) = decode_frame(&bytes, off) {
            off += f.len();
            if f.seq < from {
                continue;
            }
            let rec: Option<Record> = (f.kind == KIND_RECORD)
                .then(|| serde_json::from_slice(f.payload).ok())
                .flatten();
            let located = rec.clone().map(|record| Located {
                log: name.to_owned(),
                seq: f.seq,
                record,
            });
            let json = rec.as_ref().and_then(|r| serde_json::to_value(r).ok());
            tx.execute(
                &stmt,
                &[
                    &name,
                    &(f.seq as i64),
                    &i16::from(f.kind),
                    &f.body,
                    &f.hash.as_slice(),
                    &rec.as_ref().map(|r| r.time_us),
                    &rec.as_ref().map(|r| r.trace_id.as_str()),
                    &located.as_ref().map(|l| l.caller().to_owned()),
                    &located.as_ref().map(|l| l.callee().to_owned()),
                    &rec.as_ref().map(|r| r.path.as_str()),
                    &rec.as_ref().map(|r| r.decision.as_str()),
                    &json,
                ],
            )
            .await?;
            added += 1;
        }
    }
    tx.commit().await?;
    Ok(added)
}

/// Every request record in the store (optionally of one trace), for `trace` and `query`.
pub async fn records(client: &Client, trace_id: Option<&str>) -> Result<Vec<Located>, StoreError> {
    let rows = client
        .query(
            "SELECT log, seq, record FROM trustline_log_frames
             WHERE kind = 1 AND ($1::TEXT IS NULL OR trace_id = $1) ORDER BY time_us, log, seq",
            &[&trace_id],
        )
        .await?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            let record: Record = serde_json::from_value(r.get::<_, serde_json::Value>(2)).ok()?;
            Some(Located {
                log: r.get(0),
                seq: r.get::<_, i64>(1) as u64,
                record,
            })
        })
        .collect())
}

/// The names of the logs in the store.
pub async fn logs(client: &Client) -> Result<Vec<String>, StoreError> {
    Ok(client
        .query("SELECT DISTINCT log FROM trustline_log_frames ORDER BY log", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Verifies one shipped log: sequence continuity from 0, every hash link, every checkpoint.
pub async fn verify(client: &Client, name: &str, bundle: Option<&TrustBundle>) -> Result<Report, StoreError> {
    let rows = client
        .query(
            "SELECT seq, kind, body, hash FROM trustline_log_frames WHERE log = $1 ORDER BY seq",
            &[&name],
        )
        .await?;
    let mut r = Report {
        segments: 1,
        ..Report::default()
    };
    let place = std::path::PathBuf::from(format!("store:{name}"));
    let mut prev: Hash = [0u8; 32];
    let mut expected = 0u64;
    let mut hashes: std::collections::HashMap<u64, Hash> = std::collections::HashMap::new();
    let mut since = 0u64;
    for row in &rows {
        let seq = row.get::<_, i64>(0) as u64;
        let kind = row.get::<_, i16>(1) as u8;
        let body: Vec<u8> = row.get(2);
        let stored: Vec<u8> = row.get(3);
        let mut hash = [0u8; 32];
        if stored.len() == 32 {
            hash.copy_from_slice(&stored);
        }
        if seq > expected {
            r.findings.push(Finding::Removed {
                segment: place.clone(),
                from: expected,
                to: seq - 1,
            });
        } else if seq < expected {
            r.findings.push(Finding::Reordered {
                segment: place.clone(),
                found: seq,
                expected,
            });
        } else if chain_hash(&prev, &body) != hash {
            r.findings.push(Finding::Altered {
                segment: place.clone(),
                seq,
            });
        }
        if kind == KIND_CHECKPOINT {
            let lookup = |s: u64| hashes.get(&s).copied();
            match check_checkpoint(body.get(9..).unwrap_or_default(), &lookup, bundle) {
                Ok(signer) => {
                    r.checkpoints += 1;
                    since = 0;
                    if !r.signers.contains(&signer) {
                        r.signers.push(signer);
                    }
                }
                Err(reason) => r.findings.push(Finding::BadCheckpoint { seq, reason }),
            }
        } else if kind == KIND_RECORD || kind == KIND_SEALED_RECORD {
            r.records += 1;
            since += 1;
        }
        hashes.insert(seq, hash);
        prev = hash;
        expected = seq.saturating_add(1);
    }
    r.uncovered = since;
    Ok(r)
}
