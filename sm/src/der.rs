//! Just enough DER to split a signed X.509 structure (certificate or CSR) into its signed bytes, signature
//! algorithm and signature, and the fixed encodings of the SM2 object identifiers.

/// SM2-with-SM3 (1.2.156.10197.1.501), as an encoded OID TLV.
pub(crate) const OID_SM2_WITH_SM3: &[u8] = &[0x06, 0x08, 0x2a, 0x81, 0x1c, 0xcf, 0x55, 0x01, 0x83, 0x75];

/// The DER of an SM2 SubjectPublicKeyInfo up to (not including) the 65-byte uncompressed point:
/// `SEQUENCE { SEQUENCE { id-ecPublicKey, sm2 }, BIT STRING (0 unused bits) }`.
pub(crate) const SM2_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x81,
    0x1c, 0xcf, 0x55, 0x01, 0x82, 0x2d, 0x03, 0x42, 0x00,
];

/// One DER element: its tag, contents, and the whole encoding (tag, length and contents).
pub(crate) struct Tlv<'a> {
    pub(crate) tag: u8,
    pub(crate) contents: &'a [u8],
    pub(crate) whole: &'a [u8],
}

/// Reads one element from the front of `input`; returns it and what follows. Single-byte tags and definite
/// lengths of up to 4 length bytes only (X.509 needs nothing else).
pub(crate) fn read(input: &[u8]) -> Result<(Tlv<'_>, &[u8]), String> {
    let (&tag, rest) = input.split_first().ok_or("truncated: no tag")?;
    if tag & 0x1f == 0x1f {
        return Err(format!("multi-byte tag {tag:#04x} not supported"));
    }
    let (&first, rest) = rest.split_first().ok_or("truncated: no length")?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return Err(format!("bad length octet {first:#04x}"));
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        if len < 0x80 || rest[0] == 0 {
            return Err(format!("non-minimal length {len}"));
        }
        (len, &rest[n..])
    };
    if rest.len() < len {
        return Err(format!("truncated: element of {len} bytes, {} left", rest.len()));
    }
    let header = input.len() - rest.len();
    let (contents, after) = rest.split_at(len);
    Ok((
        Tlv {
            tag,
            contents,
            whole: &input[..header + len],
        },
        after,
    ))
}

/// A signed structure: `SEQUENCE { tbs, AlgorithmIdentifier, BIT STRING signature }`.
pub(crate) struct Signed<'a> {
    /// The DER of the signed part (the TBSCertificate or CertificationRequestInfo), tag and length included.
    pub(crate) tbs: &'a [u8],
    /// The contents of the signature AlgorithmIdentifier SEQUENCE.
    pub(crate) algorithm: &'a [u8],
    /// The signature bytes (the BIT STRING's contents after the unused-bits octet).
    pub(crate) signature: &'a [u8],
}

/// Splits a certificate or CSR.
pub(crate) fn split_signed(der: &[u8]) -> Result<Signed<'_>, String> {
    let (outer, trailing) = read(der)?;
    if outer.tag != 0x30 || !trailing.is_empty() {
        return Err("not a single DER SEQUENCE".into());
    }
    let (tbs, rest) = read(outer.contents)?;
    let (algorithm, rest) = read(rest)?;
    let (signature, rest) = read(rest)?;
    if tbs.tag != 0x30 || algorithm.tag != 0x30 || signature.tag != 0x03 || !rest.is_empty() {
        return Err("not SEQUENCE { SEQUENCE, AlgorithmIdentifier, BIT STRING }".into());
    }
    let signature = match signature.contents.split_first() {
        Some((0, sig)) => sig,
        _ => return Err("signature BIT STRING has unused bits".into()),
    };
    Ok(Signed {
        tbs: tbs.whole,
        algorithm: algorithm.contents,
        signature,
    })
}

/// Whether an AlgorithmIdentifier's contents say SM2-with-SM3 (parameters absent, or NULL).
pub(crate) fn is_sm2_with_sm3(algorithm: &[u8]) -> bool {
    algorithm == OID_SM2_WITH_SM3
        || (algorithm.len() == OID_SM2_WITH_SM3.len() + 2
            && algorithm.starts_with(OID_SM2_WITH_SM3)
            && algorithm.ends_with(&[0x05, 0x00]))
}
