//! SM3 (GB/T 32905) and HMAC-SM3.
//!
//! Pure Rust (RustCrypto `sm3` + `hmac`) rather than OpenSSL: these functions cannot fail, which is what rustls'
//! hash and HMAC traits require. The tests check them against the `openssl` command-line tool.

use hmac::{KeyInit, Mac};
use sm3::Digest;

/// Length of an SM3 digest.
pub const DIGEST_LEN: usize = 32;

/// SM3 of `data`.
pub fn digest(data: &[u8]) -> [u8; DIGEST_LEN] {
    sm3::Sm3::digest(data).into()
}

/// HMAC-SM3 (RFC 2104 with SM3) of `data` under `key`.
pub fn hmac(key: &[u8], data: &[u8]) -> [u8; DIGEST_LEN] {
    let mut mac = HmacSm3::new_from_slice(key).unwrap_or_else(|_| unreachable_hmac_key());
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// HMAC-SM3 state, for incremental use (the rustls provider).
pub(crate) type HmacSm3 = hmac::Hmac<sm3::Sm3>;

/// HMAC accepts keys of any length, so `new_from_slice` never fails; this keeps that fact out of `unwrap`.
#[cold]
pub(crate) fn unreachable_hmac_key() -> HmacSm3 {
    // HMAC's InvalidLength is only produced by MACs with fixed key sizes; Hmac<Sm3> has none. Should that ever
    // change, an HMAC under the empty key is still a valid (if useless) MAC, never a panic.
    <HmacSm3 as KeyInit>::new(&Default::default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::process::{Command, Stdio};

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// GB/T 32905 appendix A, example 1.
    #[test]
    fn sm3_abc_known_answer() {
        assert_eq!(
            hex(&digest(b"abc")),
            "66c7f0f462eeedd9d1f2d46bdc10e4e24167c4875cf2f7a2297da02b8f4ba8e0"
        );
    }

    /// GB/T 32905 appendix A, example 2: "abcd" repeated 16 times.
    #[test]
    fn sm3_abcd16_known_answer() {
        assert_eq!(
            hex(&digest(&b"abcd".repeat(16))),
            "debe9ff92275b8a138604889c18e5a4d6fdb70e5387e5765293dcba39c0c5732"
        );
    }

    fn openssl_cli(args: &[&str], stdin: &[u8]) -> String {
        let mut child = Command::new("openssl")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("openssl CLI");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin)
            .expect("write");
        let out = child.wait_with_output().expect("openssl output");
        assert!(out.status.success(), "openssl {args:?} failed");
        String::from_utf8(out.stdout).expect("utf-8")
    }

    /// Digest and HMAC agree with the openssl CLI (an independent implementation) on a longer input.
    #[test]
    fn sm3_and_hmac_match_openssl_cli() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
        let out = openssl_cli(&["dgst", "-sm3", "-r"], &data);
        assert_eq!(out.split_whitespace().next(), Some(hex(&digest(&data)).as_str()));

        let key = b"trustline hmac key";
        let out = openssl_cli(&["dgst", "-sm3", "-r", "-hmac", "trustline hmac key"], &data);
        assert_eq!(
            out.split_whitespace().next(),
            Some(hex(&hmac(key, &data)).as_str())
        );
    }
}
