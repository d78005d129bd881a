//! `trustline-agent`: the Trustline identity agent and its client commands (see `trustline_identity_agent::cli`).

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    trustline_identity_agent::cli::main_with(std::env::args_os())
}
