//! The Chinese national algorithms for Trustline, and TLS 1.3 with them (RFC 8998).
//!
//! - [`sm2`]: SM2 keys and SM2-with-SM3 signatures, always with the distinguishing ID `1234567812345678`
//!   (GB/T 35276), including certificate and CSR signing.
//! - [`sm3`]: the SM3 hash and HMAC-SM3.
//! - [`sm4gcm`]: the SM4-GCM AEAD, and a small at-rest format for keys and logs.
//! - [`tls`]: a rustls [`CryptoProvider`](rustls::crypto::CryptoProvider) with only SM algorithms:
//!   `TLS_SM4_GCM_SM3`, curveSM2 key exchange, `sm2sig_sm3` signatures.
//!
//! What this crate must never do: sign or verify SM2 with any ID other than `1234567812345678` — except TLS 1.3
//! CertificateVerify, where RFC 8998 §3.2.1 fixes `TLSv1.3+GM+Cipher+Suite` — (a different ID produces
//! signatures no peer accepts, and accepting them would make the ID meaningless); treat an EC key on the
//! SM2 curve as an SM2 key without converting it (it would sign as ECDSA); or mix a non-SM algorithm into the
//! SM TLS provider.
//!
//! `unsafe` is confined to one private module, `ffi`, which calls the four OpenSSL 3.0 functions the `openssl`
//! crate does not wrap; each block there states why it is sound. Every other module is checked by `deny`.
#![deny(unsafe_code)]
#![warn(missing_docs)]

mod der;
mod error;
mod ffi;
pub mod sm2;
pub mod sm3;
pub mod sm4gcm;
pub mod tls;

pub use error::SmError;
/// The OpenSSL bindings this crate links (for building certificates and CSRs around its SM2 keys).
pub use openssl;
