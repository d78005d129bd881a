//! `TLS_SM4_GCM_SM3`: SM3 hash, HKDF over HMAC-SM3, SM4-GCM record protection.

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Nonce as GcmNonce, Tag as GcmTag};
use hmac::{KeyInit, Mac};
use rustls::crypto::cipher::{
    make_tls13_aad, AeadKey, InboundOpaqueMessage, InboundPlainMessage, Iv, MessageDecrypter,
    MessageEncrypter, Nonce, OutboundOpaqueMessage, OutboundPlainMessage, PrefixedPayload,
    Tls13AeadAlgorithm, UnsupportedOperationError,
};
use rustls::crypto::tls13::HkdfUsingHmac;
use rustls::crypto::{hash, hmac as rhmac, CipherSuiteCommon};
use rustls::{
    ConnectionTrafficSecrets, ContentType, ProtocolVersion, SupportedCipherSuite, Tls13CipherSuite,
};
use sm3::Digest;

use crate::sm3::{unreachable_hmac_key, HmacSm3, DIGEST_LEN};
use crate::sm4gcm::{Sm4Gcm, KEY_LEN, TAG_LEN};

/// The `TLS_SM4_GCM_SM3` cipher suite (TLS 1.3 only).
pub static TLS_SM4_GCM_SM3: SupportedCipherSuite = SupportedCipherSuite::Tls13(&Tls13CipherSuite {
    common: CipherSuiteCommon {
        suite: super::TLS_SM4_GCM_SM3_ID,
        hash_provider: &Sm3Hash,
        // As for AES-GCM (a 128-bit block cipher in GCM): RFC 9001 §6.6 / RFC 8446 §5.5.
        confidentiality_limit: 1 << 23,
    },
    hkdf_provider: &HkdfUsingHmac(&HmacSm3Provider),
    aead_alg: &Sm4GcmAead,
    quic: None,
});

/// SM3 for rustls. SM3 has no TLS HashAlgorithm number; rustls only compares this value between suites.
struct Sm3Hash;

impl hash::Hash for Sm3Hash {
    fn start(&self) -> Box<dyn hash::Context> {
        Box::new(Sm3Context(sm3::Sm3::new()))
    }

    fn hash(&self, data: &[u8]) -> hash::Output {
        hash::Output::new(&crate::sm3::digest(data))
    }

    fn output_len(&self) -> usize {
        DIGEST_LEN
    }

    fn algorithm(&self) -> hash::HashAlgorithm {
        // Unassigned in the TLS HashAlgorithm registry, distinct from every SHA variant.
        hash::HashAlgorithm::Unknown(0x07)
    }
}

struct Sm3Context(sm3::Sm3);

impl hash::Context for Sm3Context {
    fn fork_finish(&self) -> hash::Output {
        hash::Output::new(&self.0.clone().finalize())
    }

    fn fork(&self) -> Box<dyn hash::Context> {
        Box::new(Sm3Context(self.0.clone()))
    }

    fn finish(self: Box<Self>) -> hash::Output {
        hash::Output::new(&self.0.finalize())
    }

    fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }
}

/// HMAC-SM3 for rustls' HKDF.
struct HmacSm3Provider;

impl rhmac::Hmac for HmacSm3Provider {
    fn with_key(&self, key: &[u8]) -> Box<dyn rhmac::Key> {
        Box::new(HmacSm3Key(
            HmacSm3::new_from_slice(key).unwrap_or_else(|_| unreachable_hmac_key()),
        ))
    }

    fn hash_output_len(&self) -> usize {
        DIGEST_LEN
    }
}

struct HmacSm3Key(HmacSm3);

impl rhmac::Key for HmacSm3Key {
    fn sign_concat(&self, first: &[u8], middle: &[&[u8]], last: &[u8]) -> rhmac::Tag {
        let mut mac = self.0.clone();
        mac.update(first);
        for part in middle {
            mac.update(part);
        }
        mac.update(last);
        rhmac::Tag::new(&mac.finalize().into_bytes())
    }

    fn tag_len(&self) -> usize {
        DIGEST_LEN
    }
}

/// SM4-GCM as a TLS 1.3 AEAD.
struct Sm4GcmAead;

impl Tls13AeadAlgorithm for Sm4GcmAead {
    fn encrypter(&self, key: AeadKey, iv: Iv) -> Box<dyn MessageEncrypter> {
        Box::new(Sm4GcmRecords::new(&key, iv))
    }

    fn decrypter(&self, key: AeadKey, iv: Iv) -> Box<dyn MessageDecrypter> {
        Box::new(Sm4GcmRecords::new(&key, iv))
    }

    fn key_len(&self) -> usize {
        KEY_LEN
    }

    fn extract_keys(
        &self,
        _key: AeadKey,
        _iv: Iv,
    ) -> Result<ConnectionTrafficSecrets, UnsupportedOperationError> {
        // No kernel TLS offload for SM4-GCM.
        Err(UnsupportedOperationError)
    }
}

/// The record protection state of one direction.
struct Sm4GcmRecords {
    /// `None` if rustls handed over a key that is not 16 bytes (it never does: `key_len()` is 16); then every
    /// record is refused.
    cipher: Option<Sm4Gcm>,
    iv: Iv,
}

impl Sm4GcmRecords {
    fn new(key: &AeadKey, iv: Iv) -> Self {
        let cipher = <&[u8; KEY_LEN]>::try_from(key.as_ref())
            .ok()
            .map(crate::sm4gcm::cipher);
        Self { cipher, iv }
    }
}

impl MessageEncrypter for Sm4GcmRecords {
    fn encrypt(
        &mut self,
        msg: OutboundPlainMessage<'_>,
        seq: u64,
    ) -> Result<OutboundOpaqueMessage, rustls::Error> {
        let total_len = self.encrypted_payload_len(msg.payload.len());
        let mut payload = PrefixedPayload::with_capacity(total_len);
        payload.extend_from_chunks(&msg.payload);
        payload.extend_from_slice(&[u8::from(msg.typ)]);
        let nonce = Nonce::new(&self.iv, seq).0;
        let aad = make_tls13_aad(total_len);
        let cipher = self.cipher.as_ref().ok_or(rustls::Error::EncryptError)?;
        let tag = cipher
            .encrypt_in_place_detached(GcmNonce::from_slice(&nonce), &aad, payload.as_mut())
            .map_err(|_| rustls::Error::EncryptError)?;
        payload.extend_from_slice(&tag);
        Ok(OutboundOpaqueMessage::new(
            ContentType::ApplicationData,
            ProtocolVersion::TLSv1_2,
            payload,
        ))
    }

    fn encrypted_payload_len(&self, payload_len: usize) -> usize {
        payload_len + 1 + TAG_LEN
    }
}

impl MessageDecrypter for Sm4GcmRecords {
    fn decrypt<'a>(
        &mut self,
        mut msg: InboundOpaqueMessage<'a>,
        seq: u64,
    ) -> Result<InboundPlainMessage<'a>, rustls::Error> {
        let payload = &mut msg.payload;
        let ct_len = payload
            .len()
            .checked_sub(TAG_LEN)
            .ok_or(rustls::Error::DecryptError)?;
        let nonce = Nonce::new(&self.iv, seq).0;
        let aad = make_tls13_aad(payload.len());
        let tag = GcmTag::clone_from_slice(&payload[ct_len..]);
        let cipher = self.cipher.as_ref().ok_or(rustls::Error::DecryptError)?;
        cipher
            .decrypt_in_place_detached(GcmNonce::from_slice(&nonce), &aad, &mut payload[..ct_len], &tag)
            .map_err(|_| rustls::Error::DecryptError)?;
        payload.truncate(ct_len);
        msg.into_tls13_unpadded_message()
    }
}
