//! Trustline's accountability log.
//!
//! Every sidecar writes one record per request it handles to append-only segment files. Each record carries the
//! hash of the previous one; at regular intervals a checkpoint (count, head hash, time) is signed with the
//! sidecar's SVID key. [`verify`] walks the segments and names exactly which record was altered, removed or
//! reordered, and whether the checkpoints verify against the trust bundle. The format is in [`format`].

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cli;
pub mod format;
pub mod query;
pub mod store;
pub mod verify;
pub mod writer;

pub use format::Record;
pub use verify::{verify, Finding, Report};
pub use writer::{AppendError, CheckpointSigner, Fsync, Log, LogConfig, LogError, Recovery};

#[cfg(test)]
mod tests;
