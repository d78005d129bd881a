//! curveSM2 (NamedGroup 0x0029): ephemeral ECDH on the SM2 curve (RFC 8998 §3.1).
//!
//! Key shares are uncompressed points (`04 || x || y`, 65 bytes); the shared secret is the x-coordinate of
//! `d * Q_peer` (32 bytes), as for the NIST curves in RFC 8446 §7.4.2. This is ECDH, not SM2 key exchange, and
//! not a signature, so plain EC arithmetic on the curve is what is wanted (OpenSSL's `EC_POINT_mul`, a
//! constant-time ladder for secret scalars).

use openssl::bn::{BigNum, BigNumContext};
use openssl::ec::{EcGroup, EcKey, EcPoint, PointConversionForm};
use openssl::nid::Nid;
use openssl::pkey::Private;
use rustls::crypto::{ActiveKeyExchange, SharedSecret, SupportedKxGroup};
use rustls::{Error, NamedGroup, PeerMisbehaved};

/// Length of an SM2 field element.
const FIELD_LEN: i32 = 32;

/// The curveSM2 key exchange group.
pub static CURVE_SM2_GROUP: CurveSm2 = CurveSm2;

/// curveSM2 ECDHE.
#[derive(Debug)]
pub struct CurveSm2;

fn general(what: &str, e: openssl::error::ErrorStack) -> Error {
    Error::General(format!("curveSM2 {what}: {e}"))
}

impl SupportedKxGroup for CurveSm2 {
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, Error> {
        let group = EcGroup::from_curve_name(Nid::SM2).map_err(|e| general("group", e))?;
        let key = EcKey::generate(&group).map_err(|e| general("key generation", e))?;
        let mut ctx = BigNumContext::new().map_err(|e| general("BN_CTX", e))?;
        let pub_key = key
            .public_key()
            .to_bytes(&group, PointConversionForm::UNCOMPRESSED, &mut ctx)
            .map_err(|e| general("point encoding", e))?;
        Ok(Box::new(CurveSm2Exchange { group, key, pub_key }))
    }

    fn name(&self) -> NamedGroup {
        super::CURVE_SM2
    }
}

struct CurveSm2Exchange {
    group: EcGroup,
    key: EcKey<Private>,
    pub_key: Vec<u8>,
}

impl ActiveKeyExchange for CurveSm2Exchange {
    fn complete(self: Box<Self>, peer_pub_key: &[u8]) -> Result<SharedSecret, Error> {
        // Uncompressed points only (RFC 8446 §4.2.8.2); OpenSSL checks that the point is on the curve, and the
        // SM2 curve has cofactor 1, so every such point other than infinity is in the prime-order group.
        if peer_pub_key.len() != 1 + 2 * FIELD_LEN as usize || peer_pub_key[0] != 0x04 {
            return Err(PeerMisbehaved::InvalidKeyShare.into());
        }
        let mut ctx = BigNumContext::new().map_err(|e| general("BN_CTX", e))?;
        let peer = EcPoint::from_bytes(&self.group, peer_pub_key, &mut ctx)
            .map_err(|_| Error::from(PeerMisbehaved::InvalidKeyShare))?;
        if peer.is_infinity(&self.group) {
            return Err(PeerMisbehaved::InvalidKeyShare.into());
        }
        let mut shared = EcPoint::new(&self.group).map_err(|e| general("point", e))?;
        shared
            .mul2(&self.group, &peer, self.key.private_key(), &mut ctx)
            .map_err(|e| general("ECDH", e))?;
        if shared.is_infinity(&self.group) {
            return Err(PeerMisbehaved::InvalidKeyShare.into());
        }
        let mut x = BigNum::new().map_err(|e| general("BN", e))?;
        let mut y = BigNum::new().map_err(|e| general("BN", e))?;
        shared
            .affine_coordinates(&self.group, &mut x, &mut y, &mut ctx)
            .map_err(|e| general("ECDH", e))?;
        let x = x.to_vec_padded(FIELD_LEN).map_err(|e| general("ECDH", e))?;
        Ok(SharedSecret::from(&x[..]))
    }

    fn pub_key(&self) -> &[u8] {
        &self.pub_key
    }

    fn group(&self) -> NamedGroup {
        super::CURVE_SM2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_sides_agree_and_bad_shares_are_refused() {
        let a = CURVE_SM2_GROUP.start().unwrap();
        let b = CURVE_SM2_GROUP.start().unwrap();
        assert_eq!(a.pub_key().len(), 65);
        let b_pub = b.pub_key().to_vec();
        let sa = a.complete(&b_pub).unwrap();
        let a2 = CURVE_SM2_GROUP.start().unwrap();
        let a2_pub = a2.pub_key().to_vec();
        let sb = b.complete(&a2_pub).unwrap();
        assert_eq!(sa.secret_bytes().len(), 32);
        // Different pairs, different secrets; the same pair agrees:
        assert_ne!(sa.secret_bytes(), sb.secret_bytes());
        let (x, y) = (CURVE_SM2_GROUP.start().unwrap(), CURVE_SM2_GROUP.start().unwrap());
        let (xp, yp) = (x.pub_key().to_vec(), y.pub_key().to_vec());
        assert_eq!(
            x.complete(&yp).unwrap().secret_bytes(),
            y.complete(&xp).unwrap().secret_bytes()
        );

        let mut off_curve = xp.clone();
        off_curve[64] ^= 1;
        assert!(CURVE_SM2_GROUP.start().unwrap().complete(&off_curve).is_err());
        assert!(CURVE_SM2_GROUP.start().unwrap().complete(&xp[..33]).is_err());
        assert!(CURVE_SM2_GROUP.start().unwrap().complete(&[0u8; 65]).is_err());
    }
}
