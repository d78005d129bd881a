//! The Trustline certificate authority.
//!
//! Signs X.509-SVIDs and JWT-SVIDs for SPIFFE IDs, keeps registration entries, join tokens, the trust bundle and
//! a record of everything it issued, and rotates its own keys without outage. Serves identity agents over
//! mutually authenticated gRPC ([`agent_api`]) and operators over a Unix-socket admin API ([`admin_api`]).
//!
//! The CA never sees a workload's private key (it signs CSRs), never writes its own keys in clear (they are
//! sealed by the `hsm` key store before they reach the database), and never logs key material or tokens.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin_api;
pub mod agent_api;
pub mod authority;
pub mod cli;
pub mod config;
pub mod demo_mesh;
pub mod devid;
pub mod jwt;
pub mod metrics;
pub mod private_files;
pub mod server;
pub mod service;
pub mod store;
pub mod x509;
