//! The Trustline identity agent.
//!
//! Runs on every node: attests its node to the CA (join token, then its own SVID), keeps a pushed view of the
//! entries its node may issue, attests the workloads that call it from kernel facts (SO_PEERCRED, /proc), and
//! serves them SPIFFE SVIDs over the standard Workload API ([`workload_api`]) and a local HTTP API
//! ([`http_api`]).
//!
//! The agent never trusts what a caller says about itself, never writes its own key in clear (it is sealed by the
//! `hsm` key store), and never logs key material or tokens.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod agent;
pub mod attest;
pub mod cli;
pub mod config;
pub mod h2_authority;
pub mod http_api;
pub mod metrics;
pub mod server;
pub mod svid_files;
pub mod tcp_owner;
pub mod workload_api;
