//! The SPIFFE trust bundle as a JWK set (SPIFFE Trust Domain and Bundle spec): X.509 authorities carry
//! `use: "x509-svid"` and their certificate in `x5c`; JWT signing keys carry `use: "jwt-svid"` and a `kid`.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use x509_parser::prelude::FromDer as _;
use x509_parser::public_key::PublicKey;
use x509_parser::x509::SubjectPublicKeyInfo;

/// `use` of an X.509 authority in a SPIFFE bundle.
pub const USE_X509_SVID: &str = "x509-svid";
/// `use` of a JWT signing key in a SPIFFE bundle.
pub const USE_JWT_SVID: &str = "jwt-svid";

/// A bundle or key could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// A public key could not be parsed or is of an unsupported type.
    #[error("public key: {0}")]
    PublicKey(String),
    /// The JWK set JSON is malformed.
    #[error("bundle JSON: {0}")]
    Json(String),
    /// A JWK in the set is malformed.
    #[error("bundle key #{index}: {reason}")]
    Key {
        /// Position of the key in `keys`.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// PEM input held no certificate or was malformed.
    #[error("PEM: {0}")]
    Pem(String),
}

/// One JSON Web Key as SPIFFE bundles use it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    /// Key type: `EC`, `RSA` or `OKP`.
    pub kty: String,
    /// Curve for EC/OKP keys.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub crv: Option<String>,
    /// EC x coordinate / OKP public key (base64url).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub x: Option<String>,
    /// EC y coordinate (base64url).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub y: Option<String>,
    /// RSA modulus (base64url).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub n: Option<String>,
    /// RSA exponent (base64url).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub e: Option<String>,
    /// `x509-svid` or `jwt-svid`.
    #[serde(rename = "use")]
    pub use_: String,
    /// Key id (required for `jwt-svid`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub kid: Option<String>,
    /// The certificate (standard base64 DER), for `x509-svid`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub x5c: Option<Vec<String>>,
}

/// A SPIFFE bundle in JWK-set form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JwkSet {
    /// The keys.
    pub keys: Vec<Jwk>,
    /// Bundle sequence number.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub spiffe_sequence: Option<i64>,
    /// How often (seconds) consumers should refresh.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub spiffe_refresh_hint: Option<i64>,
}

/// Builds a JWK from a DER SubjectPublicKeyInfo.
pub fn jwk_from_spki(
    spki_der: &[u8],
    use_: &str,
    kid: Option<String>,
    x5c: Option<&[u8]>,
) -> Result<Jwk, BundleError> {
    let (_, spki) = SubjectPublicKeyInfo::from_der(spki_der)
        .map_err(|e| BundleError::PublicKey(format!("bad SPKI: {e}")))?;
    let mut jwk = Jwk {
        kty: String::new(),
        crv: None,
        x: None,
        y: None,
        n: None,
        e: None,
        use_: use_.to_owned(),
        kid,
        x5c: x5c.map(|der| vec![STANDARD.encode(der)]),
    };
    let parsed = spki
        .parsed()
        .map_err(|e| BundleError::PublicKey(format!("unsupported key: {e}")))?;
    match parsed {
        PublicKey::EC(point) => {
            let curve_oid = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|o| o.to_id_string())
                .unwrap_or_default();
            let (crv, len) = match curve_oid.as_str() {
                "1.2.840.10045.3.1.7" => ("P-256", 32),
                "1.3.132.0.34" => ("P-384", 48),
                // No JOSE registration exists for SM2; SM-mode bundles name the curve "SM2" (as GmSSL and
                // Tongsuo's JOSE code do) and carry the certificate in x5c, which is what X.509 consumers use.
                "1.2.156.10197.1.301" => ("SM2", 32),
                other => return Err(BundleError::PublicKey(format!("unsupported EC curve {other}"))),
            };
            let data = point.data();
            if data.len() != 1 + 2 * len || data[0] != 4 {
                return Err(BundleError::PublicKey("EC point is not uncompressed".into()));
            }
            jwk.kty = "EC".into();
            jwk.crv = Some(crv.into());
            jwk.x = Some(URL_SAFE_NO_PAD.encode(&data[1..1 + len]));
            jwk.y = Some(URL_SAFE_NO_PAD.encode(&data[1 + len..]));
        }
        PublicKey::RSA(rsa) => {
            jwk.kty = "RSA".into();
            jwk.n = Some(URL_SAFE_NO_PAD.encode(strip_leading_zeros(rsa.modulus)));
            jwk.e = Some(URL_SAFE_NO_PAD.encode(strip_leading_zeros(rsa.exponent)));
        }
        _ if spki.algorithm.algorithm.to_id_string() == "1.3.101.112" => {
            jwk.kty = "OKP".into();
            jwk.crv = Some("Ed25519".into());
            jwk.x = Some(URL_SAFE_NO_PAD.encode(spki.subject_public_key.data.as_ref()));
        }
        _ => return Err(BundleError::PublicKey("unsupported public key algorithm".into())),
    }
    Ok(jwk)
}

fn strip_leading_zeros(b: &[u8]) -> &[u8] {
    let i = b
        .iter()
        .position(|&x| x != 0)
        .unwrap_or(b.len().saturating_sub(1));
    &b[i..]
}

impl JwkSet {
    /// Parses a JWK set and checks the SPIFFE rules for each key (`use` known; `kid` on JWT keys; one `x5c`
    /// certificate on X.509 authorities).
    pub fn parse(json: &[u8]) -> Result<Self, BundleError> {
        let set: JwkSet = serde_json::from_slice(json).map_err(|e| BundleError::Json(e.to_string()))?;
        for (index, k) in set.keys.iter().enumerate() {
            let bad = |reason: &str| BundleError::Key {
                index,
                reason: reason.to_owned(),
            };
            match k.use_.as_str() {
                USE_X509_SVID => {
                    if k.x5c.as_ref().map(Vec::len) != Some(1) {
                        return Err(bad("x509-svid key must carry exactly one x5c certificate"));
                    }
                }
                USE_JWT_SVID => {
                    if k.kid.as_deref().unwrap_or("").is_empty() {
                        return Err(bad("jwt-svid key must have a kid"));
                    }
                }
                _ => return Err(bad("use must be x509-svid or jwt-svid")),
            }
        }
        Ok(set)
    }

    /// The X.509 authorities (DER certificates) in the set.
    pub fn x509_authorities(&self) -> Result<Vec<Vec<u8>>, BundleError> {
        self.keys
            .iter()
            .enumerate()
            .filter(|(_, k)| k.use_ == USE_X509_SVID)
            .map(|(index, k)| {
                let b64 = k
                    .x5c
                    .as_ref()
                    .and_then(|v| v.first())
                    .ok_or_else(|| BundleError::Key {
                        index,
                        reason: "missing x5c".into(),
                    })?;
                STANDARD.decode(b64).map_err(|e| BundleError::Key {
                    index,
                    reason: format!("x5c is not base64: {e}"),
                })
            })
            .collect()
    }

    /// The JWT signing keys in the set.
    pub fn jwt_keys(&self) -> impl Iterator<Item = &Jwk> {
        self.keys.iter().filter(|k| k.use_ == USE_JWT_SVID)
    }
}

/// Parses every `CERTIFICATE` block of a PEM string into DER.
pub fn certs_from_pem(pem_text: &str) -> Result<Vec<Vec<u8>>, BundleError> {
    let blocks = pem::parse_many(pem_text).map_err(|e| BundleError::Pem(e.to_string()))?;
    let certs: Vec<Vec<u8>> = blocks
        .into_iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(|p| p.into_contents())
        .collect();
    if certs.is_empty() {
        return Err(BundleError::Pem("no CERTIFICATE block found".into()));
    }
    Ok(certs)
}

/// Encodes DER certificates as PEM.
pub fn certs_to_pem(certs: &[Vec<u8>]) -> String {
    certs
        .iter()
        .map(|der| pem::encode(&pem::Pem::new("CERTIFICATE", der.clone())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ec_key_round_trips_through_jwk_set() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
        let x = jwk_from_spki(&spki, USE_X509_SVID, None, Some(cert.der())).unwrap();
        let j = jwk_from_spki(&spki, USE_JWT_SVID, Some("k1".into()), None).unwrap();
        assert_eq!(x.crv.as_deref(), Some("P-256"));
        let set = JwkSet {
            keys: vec![x, j],
            spiffe_sequence: Some(3),
            spiffe_refresh_hint: None,
        };
        let json = serde_json::to_vec(&set).unwrap();
        let back = JwkSet::parse(&json).unwrap();
        assert_eq!(back.x509_authorities().unwrap(), vec![cert.der().to_vec()]);
        assert_eq!(back.jwt_keys().count(), 1);
    }

    #[test]
    fn refuses_jwt_key_without_kid() {
        let json = br#"{"keys":[{"kty":"EC","crv":"P-256","x":"a","y":"b","use":"jwt-svid"}]}"#;
        let err = JwkSet::parse(json).unwrap_err();
        assert!(err.to_string().contains("kid"), "{err}");
    }
}
