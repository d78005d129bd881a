//! `trustline-sidecar`: the sidecar proxy (`run`) and operator commands for authorization policy.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::Config;
use crate::policy::{PolicySet, Request};
use crate::server;
use clap::{Parser, Subcommand};
use trustline_identity::lifecycle::{exit_with_parent, Shutdown};

/// The Trustline sidecar: mutual TLS 1.3 between services, with authorization policy on every request.
///
/// It takes its identity (X.509-SVID) from the identity agent's Workload API, accepts mutual TLS from other
/// sidecars on its inbound listeners and forwards allowed requests to the local app in plaintext, and accepts
/// plaintext from the local app on loopback outbound listeners and sends it on over mutual TLS to the upstream
/// whose SPIFFE ID the route names.
///
/// Start:    trustline-sidecar run --config /etc/trustline/sidecar.toml
/// Policies: trustline-sidecar policy check /etc/trustline/policies
/// Docs:     docs/operator-guide.md (sidecar), docs/policy.md
#[derive(Parser, Debug)]
#[command(name = "trustline-sidecar", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the sidecar.
    ///
    /// Waits for an X.509-SVID from the Workload API (nothing is served before it), then listens. Prints one
    /// line `trustline-sidecar ready: ...` with the bound addresses. SIGTERM or Ctrl-C stops accepting and
    /// drains in-flight requests for up to limits.drain_timeout. SIGHUP re-reads the policy folder.
    ///
    /// Example: trustline-sidecar run --config docs/examples/sidecar.toml
    Run {
        /// Configuration file (TOML; see docs/examples/sidecar.toml).
        #[arg(long, short, env = "TRUSTLINE_SIDECAR_CONFIG")]
        config: PathBuf,
    },
    /// Validate a configuration file and print the listeners and routes it defines.
    CheckConfig {
        /// Configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
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
        /// A caller of the verified caller chain, origin first (repeatable), for `request.chain.*` conditions.
        #[arg(long = "chain")]
        chain: Vec<String>,
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
        Command::Run { config } => {
            // Started by `trustline up`: stop when it does, even if it is killed with SIGKILL.
            exit_with_parent().map_err(|e| e.to_string())?;
            let (cfg, routes) = Config::load(&config).map_err(|e| e.to_string())?;
            let filter = tracing_subscriber::EnvFilter::try_from_env("TRUSTLINE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .try_init();
            // One worker: the current-thread scheduler (everything on this thread, no work-stealing or
            // cross-thread wake-ups); otherwise the multi-threaded one, one worker per core by default.
            let mut rt = match cfg.worker_threads {
                Some(1) => tokio::runtime::Builder::new_current_thread(),
                Some(n) => {
                    let mut b = tokio::runtime::Builder::new_multi_thread();
                    b.worker_threads(n);
                    b
                }
                None => tokio::runtime::Builder::new_multi_thread(),
            };
            let rt = rt
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start runtime: {e}"))?;
            // SIGINT and SIGTERM are caught from here on, before the ready line: a signal right after it drains
            // instead of killing the process mid-request.
            let shutdown = {
                let _rt = rt.enter();
                Shutdown::install().map_err(|e| format!("cannot install signal handlers: {e}"))?
            };
            rt.block_on(server::run(cfg, routes, shutdown.wait(), |b| {
                let list = |v: &[std::net::SocketAddr]| {
                    v.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
                };
                println!(
                    "trustline-sidecar ready: id={} inbound={} outbound={} metrics={}",
                    b.spiffe_id,
                    list(&b.inbound),
                    list(&b.outbound),
                    b.metrics.map(|m| m.to_string()).unwrap_or_default()
                );
            }))
            .map_err(|e| e.to_string())?;
            println!("trustline-sidecar stopped");
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig { config } => {
            let (cfg, routes) = Config::load(&config).map_err(|e| e.to_string())?;
            for ib in &cfg.inbound {
                println!("inbound  {} -> app {} ({:?})", ib.listen, ib.app, ib.protocol);
            }
            for (ob, rs) in cfg.outbound.iter().zip(&routes) {
                for r in rs {
                    let ids: Vec<String> = r.spiffe_ids.iter().map(ToString::to_string).collect();
                    println!(
                        "outbound {} host {} -> {} expecting {} ({:?})",
                        ob.listen,
                        r.host,
                        r.upstream,
                        ids.join(" | "),
                        ob.protocol
                    );
                }
            }
            if let Some(d) = &cfg.policy_dir {
                let set = PolicySet::load_dir(d).map_err(|e| e.to_string())?;
                println!("policy   {}: {} valid", d.display(), set.policies.len());
            }
            println!("{}: valid", config.display());
            Ok(ExitCode::SUCCESS)
        }
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
            chain,
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
                chain,
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

/// Runs the `trustline-sidecar` command line with `args` (the first is the program name), as the binary does;
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
