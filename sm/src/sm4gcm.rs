//! SM4-GCM (RFC 8998 §2): NIST GCM with SM4 as the block cipher; 16-byte key, 12-byte nonce, 16-byte tag.
//!
//! OpenSSL 3.0 has SM4 but not SM4-GCM, so this is RustCrypto's generic GCM (`aes-gcm`'s `AesGcm`, which takes
//! any 128-bit block cipher) over RustCrypto's SM4.
//!
//! Also a small at-rest format for keys and logs: `b"TLSM4G1" || nonce (12, random) || ciphertext || tag (16)`.

use aes_gcm::aead::consts::U12;
use aes_gcm::aead::{Aead, AeadInPlace, KeyInit, Payload};
use aes_gcm::{AesGcm, Nonce};

use crate::error::SmError;

/// Key length.
pub const KEY_LEN: usize = 16;
/// Nonce length.
pub const NONCE_LEN: usize = 12;
/// Tag length.
pub const TAG_LEN: usize = 16;
/// The header of the at-rest format.
pub const AT_REST_MAGIC: &[u8; 7] = b"TLSM4G1";

/// SM4-GCM with a 96-bit nonce.
pub(crate) type Sm4Gcm = AesGcm<sm4::Sm4, U12>;

/// Encrypts and authenticates: returns `ciphertext || tag`. Never reuse a nonce under one key.
pub fn seal(
    key: &[u8; KEY_LEN],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, SmError> {
    let mut out = plaintext.to_vec();
    // GCM refuses only plaintexts longer than 2^36 - 32 bytes.
    let tag = cipher(key)
        .encrypt_in_place_detached(Nonce::from_slice(nonce), aad, &mut out)
        .map_err(|_| SmError::AeadSeal { len: plaintext.len() })?;
    out.extend_from_slice(&tag);
    Ok(out)
}

/// Checks and decrypts `ciphertext || tag`. Any change to key, nonce, AAD, ciphertext or tag is refused.
pub fn open(
    key: &[u8; KEY_LEN],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    ciphertext_and_tag: &[u8],
) -> Result<Vec<u8>, SmError> {
    cipher(key)
        .decrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: ciphertext_and_tag,
                aad,
            },
        )
        .map_err(|_| SmError::AeadOpen {
            len: ciphertext_and_tag.len(),
        })
}

/// Encrypts `plaintext` for storage: `b"TLSM4G1" || random nonce || ciphertext || tag`. The header is also
/// authenticated (as part of the AAD), so a blob cannot be relabelled.
pub fn seal_at_rest(key: &[u8; KEY_LEN], plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, SmError> {
    let mut nonce = [0u8; NONCE_LEN];
    openssl::rand::rand_bytes(&mut nonce).map_err(SmError::openssl("RAND_bytes"))?;
    let mut out = Vec::with_capacity(AT_REST_MAGIC.len() + NONCE_LEN + plaintext.len() + TAG_LEN);
    out.extend_from_slice(AT_REST_MAGIC);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&seal(key, &nonce, &at_rest_aad(aad), plaintext)?);
    Ok(out)
}

/// Opens a blob made by [`seal_at_rest`] with the same key and AAD.
pub fn open_at_rest(key: &[u8; KEY_LEN], blob: &[u8], aad: &[u8]) -> Result<Vec<u8>, SmError> {
    let rest = blob
        .strip_prefix(&AT_REST_MAGIC[..])
        .ok_or(SmError::AtRestFormat {
            len: blob.len(),
            reason: "no TLSM4G1 header",
        })?;
    if rest.len() < NONCE_LEN + TAG_LEN {
        return Err(SmError::AtRestFormat {
            len: blob.len(),
            reason: "shorter than header, nonce and tag",
        });
    }
    let (nonce, sealed) = rest.split_at(NONCE_LEN);
    let nonce: &[u8; NONCE_LEN] = nonce.try_into().map_err(|_| SmError::Length {
        field: "at-rest nonce",
        expected: NONCE_LEN,
        actual: nonce.len(),
    })?;
    open(key, nonce, &at_rest_aad(aad), sealed)
}

/// The AAD of the at-rest format: the header, then the caller's AAD.
fn at_rest_aad(aad: &[u8]) -> Vec<u8> {
    [&AT_REST_MAGIC[..], aad].concat()
}

/// The GCM instance for `key`.
pub(crate) fn cipher(key: &[u8; KEY_LEN]) -> Sm4Gcm {
    Sm4Gcm::new(key.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// RFC 8998 appendix A.1.
    #[test]
    fn rfc8998_a1_vector() {
        let key: [u8; 16] = unhex("0123456789ABCDEFFEDCBA9876543210").try_into().unwrap();
        let nonce: [u8; 12] = unhex("00001234567800000000ABCD").try_into().unwrap();
        let aad = unhex("FEEDFACEDEADBEEFFEEDFACEDEADBEEFABADDAD2");
        let pt = unhex(
            "AAAAAAAAAAAAAAAABBBBBBBBBBBBBBBB CCCCCCCCCCCCCCCCDDDDDDDDDDDDDDDD
             EEEEEEEEEEEEEEEEFFFFFFFFFFFFFFFF EEEEEEEEEEEEEEEEAAAAAAAAAAAAAAAA",
        );
        let expected = unhex(
            "17F399F08C67D5EE19D0DC9969C4BB7D 5FD46FD3756489069157B282BB200735
             D82710CA5C22F0CCFA7CBF93D496AC15 A56834CBCF98C397B4024A2691233B8D
             83DE3541E4C2B58177E065A9BF7B62EC",
        );
        let sealed = seal(&key, &nonce, &aad, &pt).unwrap();
        assert_eq!(sealed, expected);
        assert_eq!(open(&key, &nonce, &aad, &sealed).unwrap(), pt);
    }

    /// Every single-bit flip (ciphertext, tag, AAD, nonce) is refused.
    #[test]
    fn flipped_bits_are_refused() {
        let key = [7u8; 16];
        let nonce = [9u8; 12];
        let sealed = seal(&key, &nonce, b"aad", b"attack at dawn").unwrap();
        for i in 0..sealed.len() * 8 {
            let mut bad = sealed.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert!(
                matches!(open(&key, &nonce, b"aad", &bad), Err(SmError::AeadOpen { .. })),
                "bit {i}"
            );
        }
        assert!(open(&key, &nonce, b"aae", &sealed).is_err());
        let mut other_nonce = nonce;
        other_nonce[11] ^= 1;
        assert!(open(&key, &other_nonce, b"aad", &sealed).is_err());
        let mut other_key = key;
        other_key[0] ^= 0x80;
        assert!(open(&other_key, &nonce, b"aad", &sealed).is_err());
    }

    #[test]
    fn at_rest_round_trip_and_refusals() {
        let key = [1u8; 16];
        let blob = seal_at_rest(&key, b"secret key bytes", b"ca/key.p8").unwrap();
        assert!(blob.starts_with(b"TLSM4G1"));
        assert_eq!(blob.len(), 7 + 12 + 16 + 16);
        assert_eq!(
            open_at_rest(&key, &blob, b"ca/key.p8").unwrap(),
            b"secret key bytes"
        );
        // Random nonce: two seals differ.
        assert_ne!(
            seal_at_rest(&key, b"secret key bytes", b"ca/key.p8").unwrap(),
            blob
        );
        // Wrong AAD, wrong key, truncated, no header, tampered header.
        assert!(matches!(
            open_at_rest(&key, &blob, b"other"),
            Err(SmError::AeadOpen { .. })
        ));
        assert!(matches!(
            open_at_rest(&[2u8; 16], &blob, b"ca/key.p8"),
            Err(SmError::AeadOpen { .. })
        ));
        assert!(matches!(
            open_at_rest(&key, &blob[..30], b"ca/key.p8"),
            Err(SmError::AtRestFormat { .. })
        ));
        assert!(matches!(
            open_at_rest(&key, &blob[7..], b"ca/key.p8"),
            Err(SmError::AtRestFormat { .. })
        ));
        let mut relabelled = blob.clone();
        relabelled[6] = b'2';
        assert!(open_at_rest(&key, &relabelled, b"ca/key.p8").is_err());
    }
}
