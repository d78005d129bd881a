//! `trustline-ca`: the Trustline certificate authority and its admin CLI (see `trustline_ca::cli`).
//!
//! Command names follow `spire-server` so operators' habits carry over. Admin commands talk to a running CA over
//! its Unix socket (`--socket`, `TRUSTLINE_CA_SOCKET`, or the socket named in `--config`).

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    trustline_ca::cli::main_with(std::env::args_os())
}
