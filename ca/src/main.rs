//! `trustline-ca`: the Trustline certificate authority and its admin CLI.
//!
//! Command names follow `spire-server` so operators' habits carry over. Admin commands talk to a running CA over
//! its Unix socket (`--socket`, `TRUSTLINE_CA_SOCKET`, or the socket named in `--config`).

#![forbid(unsafe_code)]

mod cli;
mod demo_mesh;

fn main() -> std::process::ExitCode {
    cli::main()
}
