//! The SPIFFE vocabulary every Trustline process shares, and the one place TLS configurations are built.
//!
//! - [`Selector`]: `type:value` workload facts that registration entries match on.
//! - [`spiffe_id`]: SPIFFE IDs and trust domains (the `spiffe` crate's types, re-exported) plus the IDs Trustline
//!   reserves for its own components.
//! - [`bundle`]: the SPIFFE trust bundle in its JWK-set form.
//! - [`tls`]: TLS 1.3-only rustls configurations that verify peers by SPIFFE ID against a trust bundle.
//!
//! This crate never touches private keys it did not receive, and never builds a TLS configuration that accepts a
//! peer without verifying it against a bundle.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod selector;

pub use selector::{selector_set_key, Selector, SelectorError};
pub mod bundle;
pub mod devid;
pub mod jwt;
pub mod lifecycle;
pub mod pgtls;
pub mod spiffe_id;
pub mod tls;
pub mod uds;
