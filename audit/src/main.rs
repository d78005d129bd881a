//! `trustline-audit`: verify, trace and query Trustline accountability logs.

#![forbid(unsafe_code)]

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
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
        /// Trust bundle (PEM) to verify checkpoint signers against; without it only hashes are checked.
        #[arg(long)]
        bundle: Option<PathBuf>,
        /// Trust domain of the bundle.
        #[arg(long, default_value = "example.org")]
        trust_domain: String,
    },
}

fn run(cli: Cli) -> Result<ExitCode, String> {
    match cli.command {
        Command::Verify {
            dirs,
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
            let mut clean = true;
            for d in &dirs {
                let r = trustline_audit::verify(d, bundle.as_ref()).map_err(|e| e.to_string())?;
                for f in &r.findings {
                    println!("{}: FAIL {f}", d.display());
                }
                println!(
                    "{}: {} — {} records in {} segments, {} signed checkpoints ({}), {} records after the last checkpoint",
                    d.display(),
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
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("Error: {e}");
            ExitCode::FAILURE
        }
    }
}
