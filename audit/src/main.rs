//! `trustline-audit`: verify, trace and query accountability logs (see `trustline_audit::cli`).

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    trustline_audit::cli::main_with(std::env::args_os())
}
