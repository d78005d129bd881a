//! JWT-SVIDs per the SPIFFE JWT-SVID spec: compact JWS, `alg` one of ES256/ES384/RS256/PS256, `kid` in the
//! header, claims `sub` (the SPIFFE ID), `aud` (required), `exp` (required), `iat` and a random `jti`.

use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::Serialize;
use trustline_hsm::{ecdsa_der_to_fixed, KeyType, SignatureAlgorithm, Signer};

/// A JWT-SVID could not be minted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JwtError {
    /// No audience given.
    #[error("audience is required (at least one)")]
    MissingAudience,
    /// An audience is empty.
    #[error("audience #{0} is empty")]
    EmptyAudience(usize),
    /// The key type cannot sign JWT-SVIDs.
    #[error("key type {0} cannot sign JWT-SVIDs (allowed: ec-p256, ec-p384, rsa-*)")]
    KeyType(KeyType),
    /// Signing failed.
    #[error("signing: {0}")]
    Sign(#[from] trustline_hsm::HsmError),
    /// Randomness unavailable.
    #[error("random jti")]
    Random,
}

/// JWS algorithms a JWT-SVID may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtAlg {
    /// ECDSA P-256 SHA-256.
    Es256,
    /// ECDSA P-384 SHA-384.
    Es384,
    /// RSA PKCS#1 v1.5 SHA-256.
    Rs256,
    /// RSA-PSS SHA-256.
    Ps256,
    /// SM2 with SM3 (ID `1234567812345678`), `r || s`: Trustline's opt-in extension for SM-mode trust domains
    /// (JOSE registers no SM2 algorithm; standard JWT-SVID validators refuse it).
    Sm2Sm3,
}

impl JwtAlg {
    /// The algorithm for a key type (`pss` picks PS256 over RS256 for RSA).
    pub fn for_key(key_type: KeyType, pss: bool) -> Result<Self, JwtError> {
        match key_type {
            KeyType::EcP256 => Ok(Self::Es256),
            KeyType::EcP384 => Ok(Self::Es384),
            KeyType::Ed25519 => Err(JwtError::KeyType(key_type)),
            KeyType::Sm2 => Ok(Self::Sm2Sm3),
            _ if pss => Ok(Self::Ps256),
            _ => Ok(Self::Rs256),
        }
    }

    /// The JOSE name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Es256 => "ES256",
            Self::Es384 => "ES384",
            Self::Rs256 => "RS256",
            Self::Ps256 => "PS256",
            Self::Sm2Sm3 => trustline_identity::jwt::SM2_SM3_ALG,
        }
    }

    fn signature_algorithm(self) -> SignatureAlgorithm {
        match self {
            Self::Es256 => SignatureAlgorithm::EcdsaP256Sha256,
            Self::Es384 => SignatureAlgorithm::EcdsaP384Sha384,
            Self::Rs256 => SignatureAlgorithm::RsaPkcs1Sha256,
            Self::Ps256 => SignatureAlgorithm::RsaPssSha256,
            Self::Sm2Sm3 => SignatureAlgorithm::Sm2Sm3,
        }
    }
}

/// A JWT signing key with its id.
#[derive(Debug, Clone)]
pub struct JwtKey {
    /// Key id (`kid`), also the CA key record id.
    pub kid: String,
    /// The signer.
    pub signer: Arc<dyn Signer>,
    /// The algorithm.
    pub alg: JwtAlg,
    /// Key validity end (unix seconds); tokens never outlive it.
    pub not_after: i64,
}

#[derive(Serialize)]
struct Header<'a> {
    alg: &'a str,
    kid: &'a str,
    typ: &'a str,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Aud<'a> {
    One(&'a str),
    Many(&'a [String]),
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    aud: Aud<'a>,
    exp: i64,
    iat: i64,
    jti: &'a str,
}

/// A minted JWT-SVID.
#[derive(Debug, Clone)]
pub struct MintedJwt {
    /// The compact JWS.
    pub token: String,
    /// Expiry (unix seconds).
    pub expires_at: i64,
    /// The token id (recorded as its serial).
    pub jti: String,
}

/// Mints a JWT-SVID for `sub` valid for `ttl_secs` (capped by the key's lifetime).
pub fn mint(
    key: &JwtKey,
    sub: &str,
    audience: &[String],
    ttl_secs: i64,
    now: i64,
) -> Result<MintedJwt, JwtError> {
    if audience.is_empty() {
        return Err(JwtError::MissingAudience);
    }
    if let Some(i) = audience.iter().position(|a| a.trim().is_empty()) {
        return Err(JwtError::EmptyAudience(i));
    }
    let mut jti_bytes = [0u8; 16];
    aws_lc_rs::rand::fill(&mut jti_bytes).map_err(|_| JwtError::Random)?;
    let jti: String = jti_bytes.iter().map(|b| format!("{b:02x}")).collect();
    let exp = (now + ttl_secs).min(key.not_after);
    let header = Header {
        alg: key.alg.name(),
        kid: &key.kid,
        typ: "JWT",
    };
    let claims = Claims {
        sub,
        aud: if audience.len() == 1 {
            Aud::One(&audience[0])
        } else {
            Aud::Many(audience)
        },
        exp,
        iat: now,
        jti: &jti,
    };
    // Serializing these plain structs cannot fail.
    let h = serde_json::to_vec(&header).unwrap_or_default();
    let c = serde_json::to_vec(&claims).unwrap_or_default();
    let mut signing_input = String::with_capacity(512);
    signing_input.push_str(&URL_SAFE_NO_PAD.encode(h));
    signing_input.push('.');
    signing_input.push_str(&URL_SAFE_NO_PAD.encode(c));
    let sig = key
        .signer
        .sign(key.alg.signature_algorithm(), signing_input.as_bytes())?;
    let sig = match key.alg {
        JwtAlg::Es256 | JwtAlg::Sm2Sm3 => ecdsa_der_to_fixed(&sig, 32)?,
        JwtAlg::Es384 => ecdsa_der_to_fixed(&sig, 48)?,
        JwtAlg::Rs256 | JwtAlg::Ps256 => sig,
    };
    signing_input.push('.');
    signing_input.push_str(&URL_SAFE_NO_PAD.encode(sig));
    Ok(MintedJwt {
        token: signing_input,
        expires_at: exp,
        jti,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use trustline_hsm::{KeyStore, SoftwareKeyStore};
    use trustline_identity::bundle::{jwk_from_spki, USE_JWT_SVID};

    fn key(kt: KeyType, pss: bool) -> JwtKey {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        SoftwareKeyStore::create_key_file(&p).unwrap();
        let ks = KeyStore::Software(SoftwareKeyStore::from_key_file(&p).unwrap());
        let (signer, _) = ks.generate(kt).unwrap();
        JwtKey {
            kid: "kid1".into(),
            alg: JwtAlg::for_key(kt, pss).unwrap(),
            signer,
            not_after: i64::MAX,
        }
    }

    #[test]
    fn every_allowed_algorithm_verifies_with_jsonwebtoken() {
        let now = x509_now();
        for (kt, pss, alg) in [
            (KeyType::EcP256, false, jsonwebtoken::Algorithm::ES256),
            (KeyType::EcP384, false, jsonwebtoken::Algorithm::ES384),
            (KeyType::Rsa2048, false, jsonwebtoken::Algorithm::RS256),
            (KeyType::Rsa2048, true, jsonwebtoken::Algorithm::PS256),
        ] {
            let k = key(kt, pss);
            let m = mint(&k, "spiffe://example.org/a", &["x".into(), "y".into()], 300, now).unwrap();
            let jwk = jwk_from_spki(
                &k.signer.public_key_spki_der(),
                USE_JWT_SVID,
                Some("kid1".into()),
                None,
            )
            .unwrap();
            let jwk: jsonwebtoken::jwk::Jwk =
                serde_json::from_value(serde_json::to_value(&jwk).unwrap()).unwrap();
            let mut v = jsonwebtoken::Validation::new(alg);
            v.set_audience(&["y"]);
            let data = jsonwebtoken::decode::<serde_json::Value>(
                &m.token,
                &jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap(),
                &v,
            )
            .unwrap_or_else(|e| panic!("{alg:?}: {e}"));
            assert_eq!(data.header.kid.as_deref(), Some("kid1"));
            assert_eq!(data.claims["exp"].as_i64(), Some(now + 300));
        }
    }

    #[test]
    fn refuses_missing_audience_and_ed25519() {
        let k = key(KeyType::EcP256, false);
        assert!(matches!(
            mint(&k, "spiffe://e/a", &[], 300, 0),
            Err(JwtError::MissingAudience)
        ));
        assert!(matches!(
            mint(&k, "spiffe://e/a", &[" ".into()], 300, 0),
            Err(JwtError::EmptyAudience(0))
        ));
        assert!(JwtAlg::for_key(KeyType::Ed25519, false).is_err());
    }

    #[test]
    fn token_never_outlives_the_key() {
        let mut k = key(KeyType::EcP256, false);
        k.not_after = 1000;
        let m = mint(&k, "spiffe://e/a", &["a".into()], 300, 900).unwrap();
        assert_eq!(m.expires_at, 1000);
    }

    fn x509_now() -> i64 {
        crate::x509::now_unix()
    }
}
