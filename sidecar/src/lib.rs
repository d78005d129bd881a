//! The Trustline sidecar.
//!
//! Today: the authorization [`policy`] engine, the sidecar's own identity streamed from the Workload API
//! ([`svid_source`]), (Istio AuthorizationPolicy semantics) and the operator commands
//! `trustline-sidecar policy check` and `policy explain`. The mutual-TLS proxy that evaluates these policies on
//! every request is being built on top of it.
//!
//! The policy engine never admits a request when an ALLOW policy exists and none matched, and refuses a whole
//! policy folder when any file in it is invalid (so a running sidecar keeps its last good set).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod policy;
pub mod svid_source;
