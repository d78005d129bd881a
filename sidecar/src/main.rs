//! `trustline-sidecar`: operator commands for authorization policy.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use trustline_sidecar::policy::{PolicySet, Request};

/// The Trustline sidecar.
#[derive(Parser, Debug)]
#[command(name = "trustline-sidecar", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Authorization policy tools.
    #[command(subcommand)]
    Policy(PolicyCmd),
}

#[derive(Subcommand, Debug)]
enum PolicyCmd {
    /// Validate every policy file in a folder; errors name file:line:column and the field.
    ///
    /// Example: trustline-sidecar policy check /etc/trustline/policies
    Check {
        /// Policy folder (*.yaml, *.yml).
        dir: PathBuf,
    },
    /// Show which policy and rule decide a request, and why every other rule did or did not match.
    ///
    /// Example: trustline-sidecar policy explain --dir /etc/trustline/policies
    ///   --from spiffe://example.org/frontend --method POST --path /payments/42 --header x-env=prod
    Explain {
        /// Policy folder.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// The caller's SPIFFE ID (omit for a caller without one).
        #[arg(long)]
        from: Option<String>,
        /// HTTP method.
        #[arg(long, default_value = "GET")]
        method: String,
        /// Path.
        #[arg(long, default_value = "/")]
        path: String,
        /// Host / authority.
        #[arg(long, default_value = "")]
        host: String,
        /// Destination port.
        #[arg(long)]
        port: Option<u16>,
        /// Request header NAME=VALUE (repeatable).
        #[arg(long = "header")]
        headers: Vec<String>,
        /// JWT-SVID claim NAME=VALUE (repeatable), as if the caller sent a valid token.
        #[arg(long = "claim")]
        claims: Vec<String>,
    },
}

fn kv(flag: &str, s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("{flag} {s:?}: expected NAME=VALUE"))
}

fn run(cli: Cli) -> Result<ExitCode, String> {
    match cli.command {
        Command::Policy(PolicyCmd::Check { dir }) => {
            let set = PolicySet::load_dir(&dir).map_err(|e| e.to_string())?;
            println!(
                "{}: {} polic{} valid",
                dir.display(),
                set.policies.len(),
                if set.policies.len() == 1 { "y" } else { "ies" }
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Policy(PolicyCmd::Explain {
            dir,
            from,
            method,
            path,
            host,
            port,
            headers,
            claims,
        }) => {
            let set = PolicySet::load_dir(&dir).map_err(|e| e.to_string())?;
            let headers = headers
                .iter()
                .map(|h| kv("--header", h).map(|(k, v)| (k.to_ascii_lowercase(), v)))
                .collect::<Result<Vec<_>, _>>()?;
            let claims = if claims.is_empty() {
                None
            } else {
                let mut m = serde_json::Map::new();
                for c in &claims {
                    let (k, v) = kv("--claim", c)?;
                    m.insert(k, serde_json::Value::String(v));
                }
                Some(serde_json::Value::Object(m))
            };
            let req = Request {
                principal: from,
                method,
                path,
                host,
                port,
                headers,
                claims,
            };
            let (decision, traces) = set.explain(&req);
            for t in &traces {
                let rule = t.rule.map_or("-".to_owned(), |i| format!("#{i}"));
                match &t.outcome {
                    Ok(()) => println!("  {:?} {:<24} rule {rule:<3} MATCH", t.action, t.policy),
                    Err(why) => println!("  {:?} {:<24} rule {rule:<3} no match: {why}", t.action, t.policy),
                }
            }
            println!(
                "{}: {}",
                if decision.allowed { "ALLOW" } else { "DENY" },
                decision.reason
            );
            for (p, i) in &decision.audit {
                println!("AUDIT: marked by policy {p:?} rule #{i}");
            }
            Ok(if decision.allowed {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
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
