//! JWT-SVID validation against a SPIFFE JWT bundle (jsonwebtoken does the cryptography).
//!
//! Accepted algorithms are exactly the JWT-SVID ones (RS/ES/PS 256/384/512); `none`, HMAC and EdDSA are refused
//! before any key is looked up. `kid` must name a key in the bundle, `aud` must contain the expected audience,
//! `exp` is required and enforced, `sub` must be a SPIFFE ID.
//!
//! One extension, for SM-mode trust domains that opt in (`keys.jwt_key_type = "sm2"` at the CA): `alg`
//! [`SM2_SM3_ALG`], an SM2-with-SM3 signature (ID `1234567812345678`) as `r || s` (32 + 32 bytes) by a bundle key
//! with `"kty": "EC", "crv": "SM2"`. Only processes built with the `sm` feature check it; the claim rules are the
//! same.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use crate::bundle::JwkSet;
use crate::spiffe_id::SpiffeId;

/// The `alg` of Trustline's SM2/SM3 JWT profile (an extension: JOSE registers no SM2 algorithm).
pub const SM2_SM3_ALG: &str = "SM2SM3";

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
    if header_alg(token).as_deref() == Some(SM2_SM3_ALG) {
        return validate_sm2(token, audience, bundle);
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
    // Strictly: the `spiffe` crate would lowercase an upper-case trust domain and report another ID than the token's
    // (found by the jwt_claims fuzz target).
    let spiffe_id =
        crate::spiffe_id::parse_spiffe_id("sub", &sub).map_err(|_| JwtSvidError::Subject(sub.clone()))?;
    Ok(ValidJwt {
        spiffe_id,
        claims: data.claims,
    })
}

fn b64(part: &str, what: &str) -> Result<Vec<u8>, JwtSvidError> {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|e| JwtSvidError::Malformed(format!("{what}: {e}")))
}

/// The `alg` of a compact JWS's header, if it can be read.
fn header_alg(token: &str) -> Option<String> {
    let header = b64(token.split('.').next()?, "header").ok()?;
    let v: serde_json::Value = serde_json::from_slice(&header).ok()?;
    v.get("alg")?.as_str().map(str::to_owned)
}

/// The SM2/SM3 profile: the same checks as for the JOSE algorithms, with the signature checked by `hsm::sm`.
fn validate_sm2(token: &str, audience: &str, bundle: &JwkSet) -> Result<ValidJwt, JwtSvidError> {
    let parts: Vec<&str> = token.split('.').collect();
    let [h, c, sig] = parts[..] else {
        return Err(JwtSvidError::Malformed("not three dot-separated parts".into()));
    };
    let header: serde_json::Value = serde_json::from_slice(&b64(h, "header")?)
        .map_err(|e| JwtSvidError::Malformed(format!("header: {e}")))?;
    let kid = header
        .get("kid")
        .and_then(|k| k.as_str())
        .unwrap_or_default()
        .to_owned();
    let jwk = bundle
        .jwt_keys()
        .find(|k| k.kid.as_deref() == Some(kid.as_str()))
        .ok_or_else(|| JwtSvidError::UnknownKey(kid.clone()))?;
    let (Some("SM2"), Some(x), Some(y)) = (jwk.crv.as_deref(), jwk.x.as_deref(), jwk.y.as_deref()) else {
        return Err(JwtSvidError::UnknownKey(format!("{kid}: not an SM2 key")));
    };
    let mut point = vec![0x04];
    point.extend(b64(x, "x")?);
    point.extend(b64(y, "y")?);
    let sig = b64(sig, "signature")?;
    if sig.len() != 64 || point.len() != 65 {
        return Err(JwtSvidError::Invalid("InvalidSignature".into()));
    }
    let der = trustline_hsm::ecdsa_fixed_to_der(&sig);
    let signing_input = &token[..h.len() + 1 + c.len()];
    trustline_hsm::sm::verify(&point, signing_input.as_bytes(), &der)
        .map_err(|_| JwtSvidError::Invalid("InvalidSignature".into()))?;
    let claims: serde_json::Value = serde_json::from_slice(&b64(c, "claims")?)
        .map_err(|e| JwtSvidError::Malformed(format!("claims: {e}")))?;
    let exp = claims
        .get("exp")
        .and_then(|e| e.as_i64())
        .ok_or_else(|| JwtSvidError::Invalid("Missing required claim: exp".into()))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    if exp <= now {
        return Err(JwtSvidError::Invalid("ExpiredSignature".into()));
    }
    let aud_ok = match claims.get("aud") {
        Some(serde_json::Value::String(a)) => a == audience,
        Some(serde_json::Value::Array(v)) => v.iter().any(|a| a.as_str() == Some(audience)),
        _ => return Err(JwtSvidError::Invalid("Missing required claim: aud".into())),
    };
    if !aud_ok {
        return Err(JwtSvidError::Invalid("InvalidAudience".into()));
    }
    let sub = claims
        .get("sub")
        .and_then(|s| s.as_str())
        .ok_or_else(|| JwtSvidError::Invalid("Missing required claim: sub".into()))?
        .to_owned();
    // Strictly: the `spiffe` crate would lowercase an upper-case trust domain and report another ID than the token's
    // (found by the jwt_claims fuzz target).
    let spiffe_id =
        crate::spiffe_id::parse_spiffe_id("sub", &sub).map_err(|_| JwtSvidError::Subject(sub.clone()))?;
    Ok(ValidJwt { spiffe_id, claims })
}
