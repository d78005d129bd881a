//! `trustline-audit`: verify, trace and query Trustline accountability logs.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Verify, trace and query Trustline accountability logs.
#[derive(Parser, Debug)]
#[command(name = "trustline-audit", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Check every hash link and checkpoint signature; name each altered, removed or reordered record.
    ///
    /// Exit 0 when the log is intact, 3 when something was found.
    ///
    /// Example: trustline-audit verify --bundle bundle.pem /var/lib/trustline/sidecar/log
    Verify {
        /// Log folders (one per sidecar).
        #[arg(required_unless_present = "store")]
        dirs: Vec<PathBuf>,
        /// Verify the logs shipped to this PostgreSQL store instead (conninfo, e.g. "host=db user=audit dbname=trustline").
        #[arg(long)]
        store: Option<String>,
        /// Trust bundle (PEM) to verify checkpoint signers against; without it only hashes are checked.
        #[arg(long)]
        bundle: Option<PathBuf>,
        /// Trust domain of the bundle.
        #[arg(long, default_value = "example.org")]
        trust_domain: String,
    },
    /// Ship logs to a central PostgreSQL store (incremental: only frames not stored yet); verify, trace and query
    /// then work on the store.
    ///
    /// Example: trustline-audit ship --store "host=db user=audit dbname=trustline" --name payments-7f9c /var/lib/trustline/sidecar/log
    Ship {
        /// PostgreSQL conninfo.
        #[arg(long)]
        store: String,
        /// The log's name in the store (default: the folder's name); one name per sidecar.
        #[arg(long)]
        name: Option<String>,
        /// Log folder.
        dir: PathBuf,
    },
    /// The call tree of one request, merged from many sidecars' logs.
    ///
    /// Example: trustline-audit trace 4bf92f3577b34da6a3ce929d0e0e4736 --format html --out trace.html logs/*
    Trace {
        /// W3C trace id (32 hex).
        trace_id: String,
        /// Log folders.
        #[arg(required_unless_present = "store")]
        dirs: Vec<PathBuf>,
        /// Read the records from this PostgreSQL store instead (conninfo).
        #[arg(long)]
        store: Option<String>,
        /// text, json, dot (Graphviz) or html (a self-contained page drawing the call graph).
        #[arg(long, default_value = "text")]
        format: Format,
        /// Write to this file instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Key of logs whose records are encrypted (`[log] encryption_key_file` of the sidecar).
        #[arg(long)]
        log_key: Option<PathBuf>,
    },
    /// Records matching every given filter, as JSON lines (with the log and sequence number of each).
    ///
    /// Example: trustline-audit query --callee spiffe://example.org/payments --decision deny --since 2026-11-23T00:00:00Z logs/*
    Query {
        /// Log folders.
        #[arg(required_unless_present = "store")]
        dirs: Vec<PathBuf>,
        /// Read the records from this PostgreSQL store instead (conninfo).
        #[arg(long)]
        store: Option<String>,
        /// Caller SPIFFE ID (exact, or a prefix ending in *).
        #[arg(long)]
        caller: Option<String>,
        /// Callee SPIFFE ID (exact, or a prefix ending in *).
        #[arg(long)]
        callee: Option<String>,
        /// Path (exact, or a prefix ending in *).
        #[arg(long)]
        path: Option<String>,
        /// Decision: allow, deny, bad_chain, unauthenticated, error.
        #[arg(long)]
        decision: Option<String>,
        /// Trace id.
        #[arg(long)]
        trace_id: Option<String>,
        /// From this time (RFC 3339, e.g. 2026-11-23T10:00:00Z), inclusive.
        #[arg(long)]
        since: Option<String>,
        /// Until this time (RFC 3339), exclusive.
        #[arg(long)]
        until: Option<String>,
        /// Key of logs whose records are encrypted (`[log] encryption_key_file` of the sidecar).
        #[arg(long)]
        log_key: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Format {
    Text,
    Json,
    Dot,
    Html,
}

fn load(dirs: &[PathBuf], log_key: &Option<PathBuf>) -> Result<Vec<crate::query::Located>, String> {
    let key = match log_key {
        Some(p) => Some(crate::format::LogKey::from_file(p).map_err(|e| format!("--log-key: {e}"))?),
        None => None,
    };
    let mut out = Vec::new();
    for d in dirs {
        if !d.is_dir() {
            return Err(format!("{}: not a log folder", d.display()));
        }
        for (seq, record) in crate::verify::records(d, key.as_ref()).map_err(|e| e.to_string())? {
            out.push(crate::query::Located {
                log: d.display().to_string(),
                seq,
                record,
            });
        }
    }
    Ok(out)
}

fn time_us(flag: &str, v: &Option<String>) -> Result<Option<i64>, String> {
    v.as_ref()
        .map(|s| {
            humantime::parse_rfc3339_weak(s)
                .map_err(|e| format!("{flag} {s:?}: {e} (expected RFC 3339, e.g. 2026-11-23T10:00:00Z)"))
                .and_then(|t| {
                    t.duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_micros() as i64)
                        .map_err(|e| format!("{flag} {s:?}: {e}"))
                })
        })
        .transpose()
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start runtime: {e}"))
}

/// Connects to the central store; over TLS 1.3 verifying the server against `PGSSLROOTCERT` (a PEM file, the
/// libpq variable) when it is set.
async fn store_client(conninfo: &str) -> Result<tokio_postgres::Client, String> {
    let tls = match std::env::var_os("PGSSLROOTCERT") {
        Some(p) => {
            let pem = std::fs::read_to_string(&p)
                .map_err(|e| format!("PGSSLROOTCERT {}: {e}", p.to_string_lossy()))?;
            Some(
                crate::store::PgTls::from_pem(&pem)
                    .map_err(|e| format!("PGSSLROOTCERT {}: {e}", p.to_string_lossy()))?,
            )
        }
        None => None,
    };
    crate::store::connect(conninfo, tls)
        .await
        .map_err(|e| format!("--store: {e}"))
}

fn run(cli: Cli) -> Result<ExitCode, String> {
    match cli.command {
        Command::Ship { store, name, dir } => {
            let name = name
                .or_else(|| dir.file_name().map(|n| n.to_string_lossy().into_owned()))
                .ok_or_else(|| format!("{}: give the log a --name", dir.display()))?;
            runtime()?.block_on(async {
                let mut c = store_client(&store).await?;
                let n = crate::store::ship(&mut c, &name, &dir)
                    .await
                    .map_err(|e| e.to_string())?;
                println!("{}: shipped {n} new frames as log {name:?}", dir.display());
                Ok(ExitCode::SUCCESS)
            })
        }
        Command::Verify {
            dirs,
            store,
            bundle,
            trust_domain,
        } => {
            let bundle = match bundle {
                None => None,
                Some(p) => {
                    let pem =
                        std::fs::read_to_string(&p).map_err(|e| format!("--bundle {}: {e}", p.display()))?;
                    let roots = trustline_identity::bundle::certs_from_pem(&pem)
                        .map_err(|e| format!("--bundle {}: {e}", p.display()))?;
                    let td = trustline_identity::spiffe_id::TrustDomain::new(&trust_domain)
                        .map_err(|e| format!("--trust-domain {trust_domain:?}: {e}"))?;
                    Some(
                        trustline_identity::tls::TrustBundle::new(td, &roots)
                            .map_err(|e| format!("--bundle {}: {e}", p.display()))?,
                    )
                }
            };
            let mut reports = Vec::new();
            if let Some(store) = &store {
                runtime()?.block_on(async {
                    let c = store_client(store).await?;
                    for name in crate::store::logs(&c).await.map_err(|e| e.to_string())? {
                        let r = crate::store::verify(&c, &name, bundle.as_ref())
                            .await
                            .map_err(|e| e.to_string())?;
                        reports.push((format!("store:{name}"), r));
                    }
                    Ok::<_, String>(())
                })?;
            }
            for d in &dirs {
                let r = crate::verify(d, bundle.as_ref()).map_err(|e| e.to_string())?;
                reports.push((d.display().to_string(), r));
            }
            let mut clean = true;
            for (d, r) in &reports {
                for f in &r.findings {
                    println!("{d}: FAIL {f}");
                }
                println!(
                    "{d}: {} — {} records in {} segments, {} signed checkpoints ({}), {} records after the last checkpoint",
                    if r.ok() { "OK" } else { "TAMPERED" },
                    r.records,
                    r.segments,
                    r.checkpoints,
                    if r.signers.is_empty() { "no signer".to_owned() } else { r.signers.join(", ") },
                    r.uncovered
                );
                clean &= r.ok();
            }
            Ok(if clean {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(3)
            })
        }
        Command::Trace {
            trace_id,
            dirs,
            store,
            format,
            out,
            log_key,
        } => {
            let mut records = load(&dirs, &log_key)?;
            if let Some(store) = &store {
                records.extend(runtime()?.block_on(async {
                    let c = store_client(store).await?;
                    crate::store::records(&c, Some(&trace_id))
                        .await
                        .map_err(|e| e.to_string())
                })?);
            }
            let t = crate::query::trace(&trace_id, &records);
            if t.calls.is_empty() {
                return Err(format!("trace {trace_id}: no records in {} log(s)", dirs.len()));
            }
            let text = match format {
                Format::Text => t.to_text(),
                Format::Json => serde_json::to_string_pretty(&t).map_err(|e| e.to_string())? + "\n",
                Format::Dot => t.to_dot(),
                Format::Html => t.to_html(),
            };
            match out {
                Some(p) => {
                    std::fs::write(&p, text).map_err(|e| format!("--out {}: {e}", p.display()))?;
                    println!(
                        "{}: {} calls between {} services",
                        p.display(),
                        t.calls.len(),
                        t.services.len()
                    );
                }
                None => print!("{text}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Query {
            dirs,
            store,
            caller,
            callee,
            path,
            decision,
            trace_id,
            since,
            until,
            log_key,
        } => {
            let f = crate::query::Filter {
                caller,
                callee,
                path,
                decision,
                trace_id,
                since_us: time_us("--since", &since)?,
                until_us: time_us("--until", &until)?,
            };
            let mut records = load(&dirs, &log_key)?;
            if let Some(store) = &store {
                records.extend(runtime()?.block_on(async {
                    let c = store_client(store).await?;
                    crate::store::records(&c, f.trace_id.as_deref())
                        .await
                        .map_err(|e| e.to_string())
                })?);
            }
            records.retain(|r| f.accepts(r));
            records.sort_by_key(|r| r.record.time_us);
            let mut out = std::io::stdout().lock();
            for r in &records {
                let line = serde_json::to_string(r).map_err(|e| e.to_string())?;
                if std::io::Write::write_all(&mut out, format!("{line}\n").as_bytes()).is_err() {
                    break; // a closed pipe (head, less)
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Runs the `trustline-audit` command line with `args` (the first is the program name), as the binary does;
/// the `trustline` multi-call binary calls it too.
pub fn main_with<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    match run(Cli::parse_from(args)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("Error: {e}");
            ExitCode::FAILURE
        }
    }
}
