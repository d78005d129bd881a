//! Trustline's own gRPC definitions, generated from `proto/*.proto`.
//!
//! - [`agent`]: the API the CA serves to identity agents over mutual TLS (attest a node, renew its SVID, fetch
//!   authorized entries, sign workload CSRs, mint JWT-SVIDs, watch bundle and entry changes).
//! - [`admin`]: the CA's admin API, served on a Unix socket only and guarded by the caller's uid.
//!
//! - [`workload`]: the standard SPIFFE Workload API, served by the identity agent.
//!
//! This crate holds generated code only; conversions to domain types happen at the edges (in `ca`, the agent).

#![forbid(unsafe_code)]

/// Generated modules, nested as their protobuf packages are (generated code refers across packages by path).
pub mod trustline {
    /// `trustline.agent.*`
    pub mod agent {
        /// The CA <-> agent API (`trustline.agent.v1`).
        pub mod v1 {
            #![allow(missing_docs, clippy::all)]
            tonic::include_proto!("trustline.agent.v1");
        }
    }
    /// `trustline.admin.*`
    pub mod admin {
        /// The CA admin API (`trustline.admin.v1`).
        pub mod v1 {
            #![allow(missing_docs, clippy::all)]
            tonic::include_proto!("trustline.admin.v1");
        }
    }
}

/// The SPIFFE Workload API (`SpiffeWorkloadAPI`, empty protobuf package, as the standard defines it).
pub mod workload {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("_");
}

pub use trustline::admin::v1 as admin;
pub use trustline::agent::v1 as agent;
