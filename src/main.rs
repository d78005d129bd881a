//! `trustline`: every Trustline program in one binary.
//!
//! ```text
//! trustline up [--dir DIR] [--exit]   a local mesh on embedded defaults (CA, agent, three services, sidecars)
//! trustline ca …                      = trustline-ca …
//! trustline agent …                   = trustline-agent …
//! trustline sidecar …                 = trustline-sidecar …
//! trustline audit …                   = trustline-audit …
//! ```
//!
//! `up` runs the CA in this process and starts the agent and each sidecar as `<this binary> agent|sidecar …`
//! (each sidecar from its own copy of the binary, so the agent can tell them apart by executable path).

#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::process::ExitCode;

const USAGE: &str = "trustline: zero-trust workload identity

Usage:
  trustline up [--dir DIR] [--exit]   start a local mesh: CA, identity agent, three services behind sidecars
  trustline ca <command> …            the certificate authority and its admin CLI (trustline ca --help)
  trustline agent <command> …         the identity agent (trustline agent --help)
  trustline sidecar <command> …       the sidecar proxy and policy tools (trustline sidecar --help)
  trustline audit <command> …         verify, trace and query accountability logs (trustline audit --help)
";

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    let sub = args.get(1).and_then(|a| a.to_str()).unwrap_or("").to_owned();
    // The program name each tool prints in its usage and errors: "trustline ca", …
    let rest = |name: &str| -> Vec<OsString> {
        std::iter::once(OsString::from(format!("trustline {name}")))
            .chain(args.iter().skip(2).cloned())
            .collect()
    };
    match sub.as_str() {
        "up" => {
            match std::env::current_exe() {
                Ok(exe) => trustline_ca::demo_mesh::use_multicall(exe),
                Err(e) => {
                    eprintln!(
                        "Error: up: cannot find this program's path to start the agent and sidecars: {e}"
                    );
                    return ExitCode::FAILURE;
                }
            }
            let argv: Vec<OsString> = [OsString::from("trustline ca"), OsString::from("quickstart")]
                .into_iter()
                .chain(args.iter().skip(2).cloned())
                .collect();
            trustline_ca::cli::main_with(argv)
        }
        "ca" => trustline_ca::cli::main_with(rest("ca")),
        "agent" => trustline_identity_agent::cli::main_with(rest("agent")),
        "sidecar" => trustline_sidecar::cli::main_with(rest("sidecar")),
        "audit" => trustline_audit::cli::main_with(rest("audit")),
        "" | "-h" | "--help" | "help" => {
            print!("{USAGE}");
            ExitCode::SUCCESS
        }
        "-V" | "--version" => {
            println!("trustline {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        other => {
            eprintln!(
                "Error: unknown command {other:?}: use up, ca, agent, sidecar or audit (trustline --help)"
            );
            ExitCode::from(2)
        }
    }
}
