//! Support for the side-by-side benchmark (`bench/run.sh`, `benches/side_by_side.rs`): the same loopback
//! scenario through a Trustline sidecar pair, an nginx pair and an HAProxy pair.
//!
//! - [`load`]: the load generator (open loop without coordinated omission, closed loop, new mTLS connections,
//!   idle mTLS connections) and a trivial HTTP backend;
//! - [`procstat`]: CPU time and resident memory of a process, from `/proc`;
//! - [`proxies`]: configuration files for nginx and HAProxy, and their processes.
//!
//! This is benchmark code: it panics on any failure instead of reporting it, and must never be used by a
//! Trustline component.

#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod load;
pub mod procstat;
pub mod proxies;
