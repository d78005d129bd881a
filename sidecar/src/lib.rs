//! The Trustline sidecar: the process beside each service that makes every call between services mutually
//! authenticated (TLS 1.3 with X.509-SVIDs from the identity agent) and authorized (Istio AuthorizationPolicy
//! semantics on every request).
//!
//! - [`config`]: the TOML configuration, validated with errors naming the field.
//! - [`svid_source`]: the sidecar's own SVID and bundles, streamed from the Workload API, swapped in place.
//! - [`policy`]: the authorization policy engine; [`policy_store`]: the set in force, hot-reloaded.
//! - [`canon`]: one request, one meaning: canonical paths and one host, before policy looks.
//! - [`chain`]: the signed caller chain.
//! - [`proxy`]: inbound and outbound HTTP/1.1, HTTP/2, gRPC and opaque TCP proxying.
//! - [`server`]: listeners, metrics, graceful drain; [`park`]: idle HTTP/1.1 connections without
//!   buffers; [`tls_stream`]: the inbound TLS stream, buffers only while bytes are in flight.
//! - [`live_peer`]: every request on an inbound connection checks that its peer's SVID is still valid and
//!   trusted (a connection outlives its handshake).
//!
//! The policy engine never admits a request when an ALLOW policy exists and none matched, and refuses a whole
//! policy folder when any file in it is invalid (so a running sidecar keeps its last good set).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod canon;
pub mod chain;
pub mod cli;
pub mod config;
pub mod live_peer;
pub mod metrics;
pub mod park;
pub mod policy;
pub mod policy_store;
pub mod proxy;
pub mod server;
pub mod svid_source;
pub mod tls_stream;
