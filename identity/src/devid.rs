//! The message a node's TPM signs to prove it holds its DevID key (`tpm_devid` node attestation). Shared by the
//! agent, which signs it, and the CA, which checks it.

/// Domain separation: this signature can be mistaken for no other Trustline signature.
const CONTEXT: &[u8] = b"trustline tpm_devid attestation v1\0";

/// `CONTEXT || len(td) || td || nonce (32 bytes) || SHA-256(csr)`: the proof is bound to the trust domain, to
/// the CA's one-time challenge and to the exact CSR the agent sends with it.
pub fn proof_message(trust_domain: &str, nonce: &[u8], csr_der: &[u8]) -> Vec<u8> {
    let csr_hash = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, csr_der);
    let mut m = Vec::with_capacity(CONTEXT.len() + 2 + trust_domain.len() + nonce.len() + 32);
    m.extend_from_slice(CONTEXT);
    m.extend_from_slice(&(trust_domain.len() as u16).to_be_bytes());
    m.extend_from_slice(trust_domain.as_bytes());
    m.extend_from_slice(nonce);
    m.extend_from_slice(csr_hash.as_ref());
    m
}

/// The DevID certificate's fingerprint as it appears in the agent's SPIFFE ID: lowercase hex SHA-256 of the DER.
pub fn fingerprint(cert_der: &[u8]) -> String {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, cert_der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_input_changes_the_message() {
        let base = proof_message("example.org", &[1; 32], b"csr");
        assert_ne!(base, proof_message("example.com", &[1; 32], b"csr"));
        assert_ne!(base, proof_message("example.org", &[2; 32], b"csr"));
        assert_ne!(base, proof_message("example.org", &[1; 32], b"csr2"));
        assert!(base.starts_with(CONTEXT));
    }
}
