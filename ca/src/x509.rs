//! X.509 certificates: CA certificates for our signing keys and X.509-SVIDs from workload CSRs.
//!
//! SVIDs follow the SPIFFE X.509-SVID spec: exactly one URI SAN (the SPIFFE ID), `cA=false`, critical keyUsage
//! with digitalSignature (and keyEncipherment/keyAgreement, no keyCertSign/cRLSign), EKU serverAuth+clientAuth,
//! random 128-bit serials, lifetime capped by the signing CA certificate. The CA never sees workload private
//! keys: it takes the public key from a CSR whose self-signature it verifies, and uses nothing else from it.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, SigningKey,
};
use trustline_hsm::{KeyType, SignatureAlgorithm, Signer};
use trustline_identity::spiffe_id::SpiffeId;

/// Backdating of `notBefore`, for clock skew between machines (SPIRE does the same).
pub const BACKDATE: Duration = Duration::from_secs(10);

/// A CSR or certificate could not be used. Messages name what is wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum X509Error {
    /// The CSR is not parseable DER, its signature does not verify, or it carries an extension we refuse.
    #[error("CSR rejected: {0}")]
    Csr(String),
    /// The CSR asks for a SAN the entry does not grant.
    #[error(
        "CSR rejected: SAN {san} is not allowed (only the entry's SPIFFE ID {spiffe_id} and its DNS names)"
    )]
    CsrSan {
        /// The offending SAN.
        san: String,
        /// The SPIFFE ID being issued.
        spiffe_id: String,
    },
    /// The CSR asks to be a CA.
    #[error("CSR rejected: requests a CA certificate")]
    CsrIsCa,
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Generate(String),
    /// A DNS name is invalid.
    #[error("DNS name {0:?} is not a valid hostname")]
    DnsName(String),
}

fn gen_err(e: rcgen::Error) -> X509Error {
    X509Error::Generate(e.to_string())
}

/// Adapts an `hsm` [`Signer`] (possibly a device key) to rcgen's signing interface.
#[derive(Debug, Clone)]
pub struct HsmKey {
    signer: Arc<dyn Signer>,
    alg: SignatureAlgorithm,
    rcgen_alg: &'static rcgen::SignatureAlgorithm,
    /// rcgen's signing interface carries no error detail, so the key's own failure (a TPM gone, a token
    /// removed) is kept here for [`HsmKey::explain`].
    last_error: Arc<std::sync::Mutex<Option<String>>>,
}

impl HsmKey {
    /// Wraps `signer`, signing certificates with its key type's default algorithm.
    pub fn new(signer: Arc<dyn Signer>) -> Self {
        let alg = signer.key_type().default_x509_algorithm();
        let rcgen_alg = match signer.key_type() {
            // Stands in for SM2 while rcgen lays out the certificate (see `trustline_hsm::sm`).
            KeyType::EcP256 | KeyType::Sm2 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyType::EcP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            KeyType::Ed25519 => &rcgen::PKCS_ED25519,
            _ => &rcgen::PKCS_RSA_SHA256,
        };
        Self {
            signer,
            alg,
            rcgen_alg,
            last_error: Arc::default(),
        }
    }

    /// Whether this key signs SM2 certificates.
    pub fn is_sm2(&self) -> bool {
        self.alg == SignatureAlgorithm::Sm2Sm3
    }

    /// A certificate rcgen made with this key as issuer, in final form (SM2 OIDs rewritten for an SM2 key).
    fn finish(&self, der: &[u8]) -> Result<Vec<u8>, X509Error> {
        if !self.is_sm2() {
            return Ok(der.to_vec());
        }
        trustline_hsm::sm::finish_signed(der.to_vec())
            .ok_or_else(|| X509Error::Generate("SM2 certificate: unexpected DER layout".into()))
    }

    /// Turns an rcgen failure into an error that says why the key could not sign, when that was the cause.
    pub fn explain(&self, e: rcgen::Error) -> X509Error {
        if matches!(e, rcgen::Error::RemoteKeyError) {
            if let Some(why) = self.last_error.lock().unwrap_or_else(|p| p.into_inner()).take() {
                return X509Error::Generate(format!("signing with the CA key: {why}"));
            }
        }
        gen_err(e)
    }
}

impl PublicKeyData for HsmKey {
    fn der_bytes(&self) -> &[u8] {
        self.signer.public_key()
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.rcgen_alg
    }
}

impl SigningKey for HsmKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        let rewritten;
        let msg = if self.is_sm2() {
            let mut tbs = msg.to_vec();
            trustline_hsm::sm::rewrite_placeholders(&mut tbs);
            rewritten = tbs;
            &rewritten[..]
        } else {
            msg
        };
        self.signer.sign(self.alg, msg).map_err(|e| {
            *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
            rcgen::Error::RemoteKeyError
        })
    }
}

/// Unix seconds now.
pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn to_time(unix: i64) -> Result<time::OffsetDateTime, X509Error> {
    time::OffsetDateTime::from_unix_timestamp(unix).map_err(|e| X509Error::Generate(e.to_string()))
}

/// A fresh random positive serial (128 bits of entropy), and its hex form.
pub fn random_serial() -> Result<(SerialNumber, String), X509Error> {
    let mut bytes = [0u8; 17];
    aws_lc_rs::rand::fill(&mut bytes[1..]).map_err(|_| X509Error::Generate("random serial".into()))?;
    // Leading 0x00 byte keeps the INTEGER positive; strip it when not needed for DER minimality.
    let slice: &[u8] = if bytes[1] & 0x80 == 0 {
        &bytes[1..]
    } else {
        &bytes[..]
    };
    let hex: String = bytes[1..].iter().map(|b| format!("{b:02x}")).collect();
    Ok((SerialNumber::from_slice(slice), hex))
}

/// What a new CA certificate should say.
pub struct CaCertSpec<'a> {
    /// Trust domain (the certificate's URI SAN is `spiffe://<td>`).
    pub trust_domain: &'a str,
    /// Organization.
    pub organization: &'a str,
    /// Validity start (unix seconds).
    pub not_before: i64,
    /// Validity end (unix seconds).
    pub not_after: i64,
}

fn ca_params(spec: &CaCertSpec<'_>) -> Result<(CertificateParams, String), X509Error> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, spec.organization);
    dn.push(DnType::CommonName, format!("Trustline CA {}", spec.trust_domain));
    params.distinguished_name = dn;
    let (serial, hex) = random_serial()?;
    params.serial_number = Some(serial);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let td_uri = format!("spiffe://{}", spec.trust_domain);
    params.subject_alt_names = vec![SanType::URI(td_uri.try_into().map_err(gen_err)?)];
    params.not_before = to_time(spec.not_before)?;
    params.not_after = to_time(spec.not_after)?;
    params.use_authority_key_identifier_extension = true;
    Ok((params, hex))
}

/// A self-signed root CA certificate for `key`. Returns (DER, serial hex).
pub fn self_signed_ca(key: &HsmKey, spec: &CaCertSpec<'_>) -> Result<(Vec<u8>, String), X509Error> {
    let (mut params, hex) = ca_params(spec)?;
    params.use_authority_key_identifier_extension = false;
    let cert = params.self_signed(key).map_err(|e| key.explain(e))?;
    Ok((key.finish(cert.der())?, hex))
}

/// An intermediate CA certificate for `key`, signed by the upstream CA. Returns (DER, serial hex).
pub fn intermediate_ca(
    key: &HsmKey,
    spec: &CaCertSpec<'_>,
    upstream: &Issuer<'static, HsmKey>,
) -> Result<(Vec<u8>, String), X509Error> {
    let (params, hex) = ca_params(spec)?;
    if key.is_sm2() {
        return Err(X509Error::Generate(
            "an SM2 CA cannot be an intermediate under an upstream CA here (use a self-signed SM2 root)"
                .into(),
        ));
    }
    let cert = params.signed_by(key, upstream).map_err(|e| key.explain(e))?;
    Ok((cert.der().to_vec(), hex))
}

/// A signing CA: its certificate, and an rcgen issuer over its key.
pub struct SigningCa {
    /// The CA certificate (DER).
    pub cert_der: Vec<u8>,
    /// Certificates between this CA and the bundle roots (empty for a self-signed root; the CA cert itself is
    /// included in SVID chains when it is an intermediate).
    pub chain_above: Vec<Vec<u8>>,
    /// Whether the CA certificate itself is a bundle root.
    pub is_root: bool,
    /// End of the CA certificate's validity (unix seconds).
    pub not_after: i64,
    issuer: Issuer<'static, HsmKey>,
    key: HsmKey,
}

impl SigningCa {
    /// Loads an issuer from a CA certificate and its key.
    pub fn new(cert_der: Vec<u8>, key: HsmKey, is_root: bool, not_after: i64) -> Result<Self, X509Error> {
        let issuer = Issuer::from_ca_cert_der(&cert_der.as_slice().into(), key.clone()).map_err(gen_err)?;
        Ok(Self {
            cert_der,
            chain_above: Vec::new(),
            is_root,
            not_after,
            issuer,
            key,
        })
    }

    /// The rcgen issuer (for signing intermediates in upstream mode).
    pub fn issuer(&self) -> &Issuer<'static, HsmKey> {
        &self.issuer
    }
}

/// A validated CSR: its public key, to be certified under names the CA chooses.
pub struct ValidCsr {
    key: CsrKey,
    sans: Vec<SanType>,
}

enum CsrKey {
    /// A key rcgen knows (ECDSA, Ed25519, RSA).
    Classic(rcgen::PublicKey),
    /// An SM2 public point (65 bytes): certified by SM2 CAs only.
    Sm2(Vec<u8>),
}

/// An SM2 subject key, laid out by rcgen as a P-256 key and rewritten (see `trustline_hsm::sm::rewrite_placeholders`).
struct Sm2Subject<'a>(&'a [u8]);

impl PublicKeyData for Sm2Subject<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.0
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl ValidCsr {
    /// Whether the CSR's key is SM2.
    pub fn is_sm2(&self) -> bool {
        matches!(self.key, CsrKey::Sm2(_))
    }
}

/// Parses and verifies an SM2 CSR (SM2-with-SM3, ID `1234567812345678`).
fn parse_sm2_csr(der: &[u8]) -> Result<ValidCsr, X509Error> {
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    use x509_parser::prelude::FromDer;
    let (_, req) = x509_parser::certification_request::X509CertificationRequest::from_der(der)
        .map_err(|_| X509Error::Csr("not a parseable PKCS#10 CSR".into()))?;
    trustline_hsm::sm::verify_csr(der).map_err(|e| X509Error::Csr(format!("SM2 signature: {e}")))?;
    let point = req
        .certification_request_info
        .subject_pki
        .subject_public_key
        .data
        .to_vec();
    let mut sans = Vec::new();
    for ext in req.requested_extensions().into_iter().flatten() {
        match ext {
            ParsedExtension::SubjectAlternativeName(san) => {
                for name in &san.general_names {
                    sans.push(match name {
                        GeneralName::URI(u) => SanType::URI((*u).try_into().map_err(gen_err)?),
                        GeneralName::DNSName(d) => SanType::DnsName((*d).try_into().map_err(gen_err)?),
                        GeneralName::RFC822Name(m) => SanType::Rfc822Name((*m).try_into().map_err(gen_err)?),
                        other => return Err(X509Error::Csr(format!("SAN {other:?} is not accepted"))),
                    });
                }
            }
            ParsedExtension::BasicConstraints(bc) if bc.ca => return Err(X509Error::CsrIsCa),
            _ => {}
        }
    }
    Ok(ValidCsr {
        key: CsrKey::Sm2(point),
        sans,
    })
}

/// Parses a PKCS#10 CSR, verifies its self-signature and checks it asks for nothing beyond `spiffe_id` and
/// `allowed_dns`: any other SAN, or a CA request, is refused.
pub fn check_csr(der: &[u8], spiffe_id: &str, allowed_dns: &[String]) -> Result<ValidCsr, X509Error> {
    let csr = parse_csr(der)?;
    check_csr_sans(&csr, spiffe_id, allowed_dns)?;
    Ok(csr)
}

/// Parses and verifies a CSR without checking its SANs yet (see [`check_csr_sans`]).
pub fn parse_csr(der: &[u8]) -> Result<ValidCsr, X509Error> {
    use x509_parser::prelude::FromDer;
    if let Ok((_, req)) = x509_parser::certification_request::X509CertificationRequest::from_der(der) {
        if trustline_hsm::sm::is_sm2_spki(req.certification_request_info.subject_pki.raw) {
            return parse_sm2_csr(der);
        }
    }
    let csr = CertificateSigningRequestParams::from_der(&der.into()).map_err(|e| {
        X509Error::Csr(match e {
            rcgen::Error::CouldNotParseCertificationRequest => "not a parseable PKCS#10 CSR".into(),
            rcgen::Error::InvalidCertificationRequestSignature => "signature does not verify".into(),
            rcgen::Error::UnsupportedExtension => "carries an extension the CA does not accept".into(),
            other => other.to_string(),
        })
    })?;
    if matches!(csr.params.is_ca, IsCa::Ca(_)) {
        return Err(X509Error::CsrIsCa);
    }
    Ok(ValidCsr {
        sans: csr.params.subject_alt_names,
        key: CsrKey::Classic(csr.public_key),
    })
}

/// Checks the SANs of a parsed CSR against what the entry grants.
pub fn check_csr_sans(csr: &ValidCsr, spiffe_id: &str, allowed_dns: &[String]) -> Result<(), X509Error> {
    for san in &csr.sans {
        let ok = match san {
            SanType::URI(u) => u.as_str() == spiffe_id,
            SanType::DnsName(d) => allowed_dns.iter().any(|a| a.eq_ignore_ascii_case(d.as_str())),
            _ => false,
        };
        if !ok {
            let text = match san {
                SanType::URI(u) => format!("URI:{}", u.as_str()),
                SanType::DnsName(d) => format!("DNS:{}", d.as_str()),
                SanType::IpAddress(ip) => format!("IP:{ip}"),
                SanType::Rfc822Name(m) => format!("email:{}", m.as_str()),
                other => format!("{other:?}"),
            };
            return Err(X509Error::CsrSan {
                san: text,
                spiffe_id: spiffe_id.to_owned(),
            });
        }
    }
    Ok(())
}

/// The URI SANs a CSR asks for (used to check an agent's CSR once its ID is known).
pub fn csr_uri_sans(csr: &ValidCsr) -> Vec<String> {
    csr.sans
        .iter()
        .filter_map(|s| match s {
            SanType::URI(u) => Some(u.as_str().to_owned()),
            _ => None,
        })
        .collect()
}

/// An issued X.509-SVID.
#[derive(Debug, Clone)]
pub struct IssuedSvid {
    /// DER chain, leaf first, up to (not including) the bundle root.
    pub chain: Vec<Vec<u8>>,
    /// Serial (hex).
    pub serial: String,
    /// Expiry (unix seconds).
    pub not_after: i64,
}

/// Signs an X.509-SVID for `spiffe_id` over the CSR's public key.
pub fn sign_svid(
    ca: &SigningCa,
    csr: &ValidCsr,
    spiffe_id: &SpiffeId,
    dns_names: &[String],
    ttl: Duration,
    now: i64,
) -> Result<IssuedSvid, X509Error> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Trustline");
    if let Some(first) = dns_names.first() {
        dn.push(DnType::CommonName, first.as_str());
    }
    params.distinguished_name = dn;
    let (serial, hex) = random_serial()?;
    params.serial_number = Some(serial);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
        KeyUsagePurpose::KeyAgreement,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let mut sans = Vec::with_capacity(1 + dns_names.len());
    sans.push(SanType::URI(spiffe_id.to_string().try_into().map_err(gen_err)?));
    for d in dns_names {
        sans.push(SanType::DnsName(
            d.clone().try_into().map_err(|_| X509Error::DnsName(d.clone()))?,
        ));
    }
    params.subject_alt_names = sans;
    let not_after = (now + ttl.as_secs() as i64).min(ca.not_after);
    params.not_before = to_time(now - BACKDATE.as_secs() as i64)?;
    params.not_after = to_time(not_after)?;
    params.use_authority_key_identifier_extension = true;
    let cert = match (&csr.key, ca.key.is_sm2()) {
        (CsrKey::Classic(k), false) => params.signed_by(k, &ca.issuer),
        (CsrKey::Sm2(point), true) => params.signed_by(&Sm2Subject(point), &ca.issuer),
        (CsrKey::Classic(_), true) => {
            return Err(X509Error::Csr(
                "this trust domain uses the national algorithms: the CSR's key must be SM2".into(),
            ))
        }
        (CsrKey::Sm2(_), false) => {
            return Err(X509Error::Csr(
                "an SM2 key needs an SM-mode CA (keys.backend = \"sm2\")".into(),
            ))
        }
    }
    .map_err(|e| ca.key.explain(e))?;
    let mut chain = Vec::with_capacity(2 + ca.chain_above.len());
    chain.push(ca.key.finish(cert.der())?);
    if !ca.is_root {
        chain.push(ca.cert_der.clone());
        chain.extend(ca.chain_above.iter().cloned());
    }
    Ok(IssuedSvid {
        chain,
        serial: hex,
        not_after,
    })
}

/// Checks that a DNS name is a valid hostname.
pub fn check_dns_name(name: &str) -> Result<(), X509Error> {
    rustls::pki_types::DnsName::try_from(name)
        .map(|_| ())
        .map_err(|_| X509Error::DnsName(name.to_owned()))
}

/// Reads the validity end of a DER certificate.
pub fn cert_not_after(der: &[u8]) -> Result<i64, X509Error> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| X509Error::Generate(e.to_string()))?;
    Ok(cert.validity().not_after.timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::{CertificateDer, UnixTime};
    use trustline_hsm::{KeyStore, SoftwareKeyStore};
    use trustline_identity::spiffe_id::TrustDomain;
    use trustline_identity::tls::{svid_leaf_id, TrustBundle};

    fn keystore(dir: &std::path::Path) -> KeyStore {
        let p = dir.join("k");
        SoftwareKeyStore::create_key_file(&p).unwrap();
        KeyStore::Software(SoftwareKeyStore::from_key_file(&p).unwrap())
    }

    fn csr_for(uris: &[&str]) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        for u in uris {
            p.subject_alt_names.push(SanType::URI((*u).try_into().unwrap()));
        }
        p.serialize_request(&key).unwrap().der().to_vec()
    }

    fn verify(chain: &[Vec<u8>], roots: &[Vec<u8>], now: i64) -> Result<SpiffeId, rustls::Error> {
        let b = TrustBundle::new(TrustDomain::new("example.org").unwrap(), roots).unwrap();
        let inter: Vec<CertificateDer<'_>> = chain[1..]
            .iter()
            .map(|c| CertificateDer::from(c.as_slice()))
            .collect();
        b.verify_chain(
            &CertificateDer::from(chain[0].as_slice()),
            &inter,
            UnixTime::since_unix_epoch(Duration::from_secs(now as u64)),
            true,
        )
    }

    /// Every CA key type issues SVIDs that webpki verifies against the root and that meet the leaf rules.
    #[test]
    fn every_ca_key_type_issues_verifiable_svids() {
        let dir = tempfile::tempdir().unwrap();
        let ks = keystore(dir.path());
        let now = now_unix();
        let id = SpiffeId::new("spiffe://example.org/w").unwrap();
        for kt in [
            KeyType::EcP256,
            KeyType::EcP384,
            KeyType::Ed25519,
            KeyType::Rsa2048,
        ] {
            let (signer, _) = ks.generate(kt).unwrap();
            let key = HsmKey::new(signer);
            let spec = CaCertSpec {
                trust_domain: "example.org",
                organization: "T",
                not_before: now - 10,
                not_after: now + 3600,
            };
            let (root, _) = self_signed_ca(&key, &spec).unwrap();
            let ca = SigningCa::new(root.clone(), key, true, now + 3600).unwrap();
            let csr = check_csr(&csr_for(&["spiffe://example.org/w"]), &id.to_string(), &[]).unwrap();
            let svid = sign_svid(&ca, &csr, &id, &[], Duration::from_secs(600), now).unwrap();
            assert_eq!(
                svid.chain.len(),
                1,
                "{kt}: self-signed mode carries the leaf only"
            );
            assert_eq!(svid_leaf_id(&svid.chain[0]).unwrap(), id, "{kt}");
            assert_eq!(verify(&svid.chain, &[root], now).unwrap(), id, "{kt}");
            // Capped by the CA certificate.
            let long = sign_svid(&ca, &csr, &id, &[], Duration::from_secs(86400), now).unwrap();
            assert_eq!(long.not_after, now + 3600, "{kt}");
        }
    }

    #[test]
    fn intermediate_chain_verifies_against_the_upstream_root() {
        let dir = tempfile::tempdir().unwrap();
        let ks = keystore(dir.path());
        let now = now_unix();
        let (up_signer, _) = ks.generate(KeyType::EcP384).unwrap();
        let up_key = HsmKey::new(up_signer);
        let spec = CaCertSpec {
            trust_domain: "example.org",
            organization: "Upstream",
            not_before: now - 10,
            not_after: now + 7200,
        };
        let (up_root, _) = self_signed_ca(&up_key, &spec).unwrap();
        let upstream = Issuer::from_ca_cert_der(&up_root.as_slice().into(), up_key).unwrap();
        let (signer, _) = ks.generate(KeyType::EcP256).unwrap();
        let key = HsmKey::new(signer);
        let (inter, _) = intermediate_ca(&key, &spec, &upstream).unwrap();
        let ca = SigningCa::new(inter.clone(), key, false, now + 7200).unwrap();
        let id = SpiffeId::new("spiffe://example.org/w").unwrap();
        let csr = check_csr(&csr_for(&[]), &id.to_string(), &[]).unwrap();
        let svid = sign_svid(&ca, &csr, &id, &[], Duration::from_secs(600), now).unwrap();
        assert_eq!(svid.chain, vec![svid.chain[0].clone(), inter.clone()]);
        assert_eq!(
            verify(&svid.chain, std::slice::from_ref(&up_root), now).unwrap(),
            id
        );
        assert!(
            verify(&svid.chain[..1], &[up_root], now).is_err(),
            "the intermediate is needed"
        );
    }

    #[test]
    fn csr_checks_name_the_problem() {
        let id = "spiffe://example.org/w";
        assert!(check_csr(&csr_for(&[id]), id, &[]).is_ok());
        assert!(
            check_csr(&csr_for(&[]), id, &[]).is_ok(),
            "no SAN: the CA names the certificate"
        );
        let err = check_csr(&csr_for(&[id, "spiffe://example.org/x"]), id, &[])
            .err()
            .unwrap();
        assert!(err.to_string().contains("URI:spiffe://example.org/x"), "{err}");
        let mut der = csr_for(&[id]);
        let last = der.len() - 1;
        der[last] ^= 0xff;
        let err = check_csr(&der, id, &[]).err().unwrap();
        assert!(
            err.to_string().contains("signature does not verify") || err.to_string().contains("parseable"),
            "{err}"
        );
        assert!(check_csr(b"junk", id, &[]).is_err());
        // A CSR asking to be a CA.
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let der = p.serialize_request(&key).unwrap().der().to_vec();
        assert!(matches!(
            check_csr(&der, id, &[]),
            Err(X509Error::CsrIsCa) | Err(X509Error::Csr(_))
        ));
    }

    #[test]
    fn serials_are_positive_and_distinct() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let (s, hex) = random_serial().unwrap();
            assert_eq!(hex.len(), 32);
            assert!(s.to_bytes()[0] & 0x80 == 0, "DER INTEGER stays positive");
            assert!(seen.insert(hex));
        }
    }
}
