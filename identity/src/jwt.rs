//! JWT-SVID validation against a SPIFFE JWT bundle (jsonwebtoken does the cryptography).
//!
//! Accepted algorithms are exactly the JWT-SVID ones (RS/ES/PS 256/384/512); `none`, HMAC and EdDSA are refused
//! before any key is looked up. `kid` must name a key in the bundle, `aud` must contain the expected audience,
//! `exp` is required and enforced, `sub` must be a SPIFFE ID.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use crate::bundle::JwkSet;
use crate::spiffe_id::SpiffeId;

/// Longest token accepted (bytes).
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Why a JWT-SVID was refused. Messages are safe to return to callers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwtSvidError {
    /// Not a compact JWS, or too long.
    #[error("token is malformed: {0}")]
    Malformed(String),
    /// `alg` is not allowed for JWT-SVIDs.
    #[error("algorithm {0} is not allowed for JWT-SVIDs")]
    Algorithm(String),
    /// No `kid`, or one not in the bundle.
    #[error("key id {0:?} is not in the trust bundle")]
    UnknownKey(String),
    /// Signature, expiry, audience or claims failed.
    #[error("token rejected: {0}")]
    Invalid(String),
    /// `sub` is not a SPIFFE ID.
    #[error("sub {0:?} is not a SPIFFE ID")]
    Subject(String),
}

/// A validated JWT-SVID.
#[derive(Debug, Clone)]
pub struct ValidJwt {
    /// The `sub` SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// All claims.
    pub claims: serde_json::Value,
}

/// Validates `token` for `audience` against the JWT keys of `bundle`.
pub fn validate(token: &str, audience: &str, bundle: &JwkSet) -> Result<ValidJwt, JwtSvidError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(JwtSvidError::Malformed(format!(
            "longer than {MAX_TOKEN_LEN} bytes"
        )));
    }
    if audience.is_empty() {
        return Err(JwtSvidError::Invalid("audience is required".into()));
    }
    let header = jsonwebtoken::decode_header(token).map_err(|e| JwtSvidError::Malformed(e.to_string()))?;
    let alg = header.alg;
    match alg {
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::ES256
        | Algorithm::ES384
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512 => {}
        other => return Err(JwtSvidError::Algorithm(format!("{other:?}"))),
    }
    let kid = header.kid.unwrap_or_default();
    let jwk = bundle
        .jwt_keys()
        .find(|k| k.kid.as_deref() == Some(kid.as_str()))
        .ok_or_else(|| JwtSvidError::UnknownKey(kid.clone()))?;
    let jwk: jsonwebtoken::jwk::Jwk = serde_json::to_value(jwk)
        .and_then(serde_json::from_value)
        .map_err(|e| JwtSvidError::UnknownKey(format!("{kid}: {e}")))?;
    let key = DecodingKey::from_jwk(&jwk).map_err(|e| JwtSvidError::UnknownKey(format!("{kid}: {e}")))?;
    let mut v = Validation::new(alg);
    v.set_audience(&[audience]);
    v.set_required_spec_claims(&["exp", "aud", "sub"]);
    v.leeway = 0;
    let data = jsonwebtoken::decode::<serde_json::Value>(token, &key, &v)
        .map_err(|e| JwtSvidError::Invalid(e.to_string()))?;
    let sub = data
        .claims
        .get("sub")
        .and_then(|s| s.as_str())
        .unwrap_or_default()
        .to_owned();
    let spiffe_id = SpiffeId::new(&sub).map_err(|_| JwtSvidError::Subject(sub.clone()))?;
    Ok(ValidJwt {
        spiffe_id,
        claims: data.claims,
    })
}
