//! `trustline-sidecar`: the sidecar proxy and its operator commands (see `trustline_sidecar::cli`).

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    trustline_sidecar::cli::main_with(std::env::args_os())
}
