//! JWT-SVID validation, as a sidecar or an app's agent runs it on a bearer token from the network.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else { return };
    static BUNDLE: std::sync::OnceLock<trustline_identity::bundle::JwkSet> = std::sync::OnceLock::new();
    let bundle = BUNDLE.get_or_init(|| {
        trustline_identity::bundle::JwkSet::parse(br#"{"keys":[{"kty":"EC","crv":"P-256","use":"jwt-svid","kid":"k1","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}"#)
            .expect("fixed bundle")
    });
    let _ = trustline_identity::jwt::validate(token, "spiffe://example.org/api", bundle);
});
