//! Deterministic input mutation for robustness tests of parsers that read untrusted bytes (a stable-Rust
//! stand-in for coverage-guided fuzzing): bit flips, byte changes, truncations, duplications and splices of a
//! valid input, from a fixed seed so failures reproduce.

/// A small xorshift generator (not for cryptography).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (0 is replaced).
    pub fn new(seed: u64) -> Self {
        Self(if seed == 0 { 0x9e37_79b9_7f4a_7c15 } else { seed })
    }

    /// Next value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A value below `n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

/// One mutation of `input`.
pub fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    let rounds = 1 + rng.below(4);
    for _ in 0..rounds {
        if v.is_empty() {
            v.push(rng.next_u64() as u8);
            continue;
        }
        let i = rng.below(v.len());
        match rng.below(6) {
            0 => v[i] ^= 1 << rng.below(8),
            1 => v[i] = rng.next_u64() as u8,
            2 => v.truncate(i),
            3 => {
                let end = (i + 1 + rng.below(16)).min(v.len());
                let chunk = v[i..end].to_vec();
                let at = rng.below(v.len());
                v.splice(at..at, chunk);
            }
            4 => {
                v.remove(i);
            }
            _ => v.insert(i, [0x00, 0xff, 0x30, 0x82, b'%', b':', b'/'][rng.below(7)]),
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::JwkSet;

    const ROUNDS: usize = 3000;

    #[test]
    fn text_parsers_never_panic_on_mutated_input() {
        let mut rng = Rng::new(7);
        let seeds: [&[u8]; 4] = [
            b"spiffe://example.org/ns/web",
            b"unix:sha256:0000000000000000000000000000000000000000000000000000000000000000",
            br#"{"keys":[{"kty":"EC","crv":"P-256","x":"AA","y":"AA","use":"jwt-svid","kid":"k"}],"spiffe_sequence":1}"#,
            b"eyJhbGciOiJFUzI1NiIsImtpZCI6ImsifQ.eyJzdWIiOiJzcGlmZmU6Ly9lLm9yZy9hIn0.AAAA",
        ];
        let td = crate::spiffe_id::TrustDomain::new("example.org").unwrap();
        let empty = JwkSet::parse(seeds[2]).unwrap();
        for _ in 0..ROUNDS {
            for seed in seeds {
                let m = mutate(&mut rng, seed);
                let s = String::from_utf8_lossy(&m);
                let _ = crate::spiffe_id::parse_workload_id("f", &s, &td);
                let _ = s.parse::<crate::Selector>();
                let _ = JwkSet::parse(&m).map(|j| j.x509_authorities());
                let _ = crate::jwt::validate(&s, "aud", &empty);
            }
        }
    }

    #[test]
    fn certificate_parsers_never_panic_on_mutated_input() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec!["a.example.org".to_owned()]).unwrap();
        p.subject_alt_names
            .push(rcgen::SanType::URI("spiffe://example.org/w".try_into().unwrap()));
        let cert = p.self_signed(&key).unwrap();
        let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
        let mut rng = Rng::new(11);
        for _ in 0..ROUNDS {
            let m = mutate(&mut rng, cert.der());
            let _ = crate::tls::svid_leaf_id(&m);
            let m = mutate(&mut rng, &spki);
            let _ = crate::bundle::jwk_from_spki(&m, "jwt-svid", Some("k".into()), None);
        }
    }
}
