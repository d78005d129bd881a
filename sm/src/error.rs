//! The one error type of this crate.

/// What went wrong in an SM operation. Each variant names the field or value at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SmError {
    /// OpenSSL refused an operation; `op` names it (e.g. `"EVP_DigestSignInit"`).
    #[error("OpenSSL {op}: {source}")]
    OpenSsl {
        /// The OpenSSL call or step that failed.
        op: &'static str,
        /// OpenSSL's error queue at the time.
        source: openssl::error::ErrorStack,
    },
    /// A key was not an SM2 key (e.g. an ECDSA key, or an EC key on another curve).
    #[error("{field}: expected an SM2 key, found {found}")]
    NotSm2Key {
        /// Which input held the key.
        field: &'static str,
        /// What the key is (OpenSSL key type and curve).
        found: String,
    },
    /// A byte string had the wrong length.
    #[error("{field}: expected {expected} bytes, got {actual}")]
    Length {
        /// Which input.
        field: &'static str,
        /// The length it must have.
        expected: usize,
        /// The length it had.
        actual: usize,
    },
    /// A public key was neither an SM2 SubjectPublicKeyInfo nor a 65-byte uncompressed SM2 point.
    #[error("public key ({len} bytes): not an SM2 SubjectPublicKeyInfo or uncompressed point: {reason}")]
    BadPublicKey {
        /// Length of the input.
        len: usize,
        /// Why it was refused.
        reason: String,
    },
    /// An SM2 signature did not verify (with the distinguishing ID named in `id`).
    #[error("SM2 signature ({sig_len} bytes) over {msg_len} bytes does not verify with ID {id}")]
    BadSignature {
        /// The distinguishing ID used (`1234567812345678`, or `TLSv1.3+GM+Cipher+Suite` in TLS 1.3).
        id: &'static str,
        /// Length of the signature.
        sig_len: usize,
        /// Length of the signed message.
        msg_len: usize,
    },
    /// A certificate or CSR was not signed with SM2-with-SM3, or its DER was malformed.
    #[error("{what}: {reason}")]
    Der {
        /// Which structure (`"certificate"`, `"CSR"`).
        what: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// SM4-GCM authentication failed: the ciphertext, tag, nonce, AAD or key is not the one sealed.
    #[error("SM4-GCM: authentication failed for {len} bytes of ciphertext")]
    AeadOpen {
        /// Length of the ciphertext (with tag) that was refused.
        len: usize,
    },
    /// SM4-GCM refused to seal (plaintext beyond GCM's limit of 2^36 - 32 bytes).
    #[error("SM4-GCM: cannot seal {len} bytes of plaintext")]
    AeadSeal {
        /// Length of the plaintext.
        len: usize,
    },
    /// An at-rest blob lacked the `TLSM4G1` header or was too short.
    #[error("at-rest blob ({len} bytes): {reason}")]
    AtRestFormat {
        /// Length of the blob.
        len: usize,
        /// What was wrong.
        reason: &'static str,
    },
}

impl SmError {
    /// Wraps an OpenSSL error stack with the name of the failing step.
    pub(crate) fn openssl(op: &'static str) -> impl FnOnce(openssl::error::ErrorStack) -> SmError {
        move |source| SmError::OpenSsl { op, source }
    }
}
