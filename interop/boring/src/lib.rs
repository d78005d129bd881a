//! Interoperability tests of Trustline against BoringSSL; the tests live in `tests/`, this library is empty.
//!
//! `tests/boring_pq.rs` starts the real `trustline-ca`, `trustline-agent` and `trustline-sidecar` binaries on
//! loopback and speaks mutual TLS 1.3 to the sidecar with the `boring` crate, asserting that both sides
//! negotiate the hybrid post-quantum group X25519MLKEM768.
//!
//! This crate must never depend, directly or through another crate, on the system OpenSSL (`openssl`,
//! `openssl-sys`, hence neither on `trustline-tests` nor `trustline-hsm`): BoringSSL defines the same symbols
//! and cannot be linked into the same binary.

#![forbid(unsafe_code)]
