//! JWT-SVID validation, differential: `trustline_identity::jwt::validate` against jsonwebtoken's own validation
//! (same ES256 key, audience and expiry checked), on tokens signed here from a structured description (header
//! alg/kid/typ, claims sub/aud/exp/nbf/iat and extras, duplicate claims, signature by the right key or not).
//!
//! Properties:
//! - whenever ours accepts, jsonwebtoken accepts too, with the same claims, and `sub` is a SPIFFE ID by the
//!   `spiffe` crate as well as ours;
//! - ours is stricter only where intended, so when jsonwebtoken accepts, the `kid` names the bundle's JWT key,
//!   `aud` is our audience or an array of strings holding it (jsonwebtoken lets a missing, null or malformed
//!   `aud` pass: a number, an array with a non-string),
//!   `sub` is present, `sub` is a SPIFFE ID and `exp` is in the future with no leeway, ours accepts.
#![no_main]
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use arbitrary::Arbitrary;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Validation};
use libfuzzer_sys::fuzz_target;
use rcgen::{KeyPair, PublicKeyData as _};
use serde_json::{json, Value};
use trustline_identity::bundle::{jwk_from_spki, JwkSet};

const AUDIENCE: &str = "spiffe://example.org/api";

struct Fixture {
    /// The bundle's JWT key (kid `k1`).
    key: EncodingKey,
    decoding: DecodingKey,
    /// A key that is in the bundle only as an X.509 authority (kid `x1`).
    other: EncodingKey,
    bundle: JwkSet,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let k1 = KeyPair::generate().unwrap();
        let x1 = KeyPair::generate().unwrap();
        let point = k1.public_key_raw();
        assert_eq!((point.len(), point[0]), (65, 4));
        let decoding =
            DecodingKey::from_ec_components(&B64.encode(&point[1..33]), &B64.encode(&point[33..])).unwrap();
        let bundle = JwkSet {
            keys: vec![
                jwk_from_spki(&k1.subject_public_key_info(), "jwt-svid", Some("k1".into()), None).unwrap(),
                jwk_from_spki(&x1.subject_public_key_info(), "x509-svid", Some("x1".into()), None).unwrap(),
            ],
            spiffe_sequence: None,
            spiffe_refresh_hint: None,
        };
        Fixture {
            key: EncodingKey::from_ec_der(&k1.serialize_der()),
            decoding,
            other: EncodingKey::from_ec_der(&x1.serialize_der()),
            bundle,
        }
    })
}

#[derive(Arbitrary, Debug)]
enum Alg {
    Es256,
    Es384,
    Rs256,
    Hs256,
    None,
    Other(String),
}

#[derive(Arbitrary, Debug, PartialEq)]
enum Kid {
    K1,
    X1,
    Absent,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum Typ {
    Absent,
    Jwt,
    Jose,
    Other(String),
}

const VALID_IDS: [&str; 4] = [
    "spiffe://example.org/web",
    "spiffe://other.org/a/b",
    "spiffe://example.org/x-y_z.1",
    AUDIENCE,
];
const INVALID_IDS: [&str; 12] = [
    "http://example.org/web",
    "spiffe://Example.org/web",
    "spiffe://example.org/",
    "spiffe://example.org",
    "spiffe://example.org/a/../b",
    "spiffe://example.org//a",
    "spiffe://",
    "spiffe://example.org/a%2Fb",
    "spiffe://user@example.org/a",
    "spiffe://example.org:8080/a",
    "spiffe://example.org/a?q=1",
    "",
];

#[derive(Arbitrary, Debug)]
enum Sub {
    Valid(u8),
    Invalid(u8),
    Text(String),
    Number(i64),
    Absent,
}

#[derive(Arbitrary, Debug)]
enum AudItem {
    Ours,
    Other(String),
    Number(i64),
}

#[derive(Arbitrary, Debug)]
enum Aud {
    One(AudItem),
    Many(Vec<AudItem>),
    Absent,
    Null,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Off {
    MinusHour,
    Minus2Min,
    Minus30s,
    Minus5s,
    Plus5s,
    Plus30s,
    PlusHour,
    /// Kept at least 3 s away from now (no second-boundary flakiness).
    Raw(i32),
}

impl Off {
    fn secs(self) -> i64 {
        match self {
            Off::MinusHour => -3600,
            Off::Minus2Min => -120,
            Off::Minus30s => -30,
            Off::Minus5s => -5,
            Off::Plus5s => 5,
            Off::Plus30s => 30,
            Off::PlusHour => 3600,
            Off::Raw(r) if (-2..=2).contains(&r) => 3,
            Off::Raw(r) => i64::from(r),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Time {
    Absent,
    At(Off),
    /// A non-integer NumericDate.
    Fraction(Off),
    Text(Off),
    Raw(i64),
}

#[derive(Arbitrary, Debug)]
enum ExtraKey {
    Sub,
    Aud,
    Exp,
    Nbf,
    Iss,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum ExtraVal {
    Text(String),
    Number(i64),
    Ours,
    ValidId(u8),
    Bool(bool),
}

#[derive(Arbitrary, Debug)]
enum Sig {
    Right,
    /// By the X.509-only key.
    OtherKey,
    /// Right, then one byte of its base64 changed.
    Corrupt { pos: u8 },
    Empty,
}

#[derive(Arbitrary, Debug)]
enum Shape {
    Plain,
    TrailingDot,
    ExtraPart,
    Padded,
}

#[derive(Arbitrary, Debug)]
struct Input {
    alg: Alg,
    kid: Kid,
    typ: Typ,
    sub: Sub,
    aud: Aud,
    exp: Time,
    nbf: Time,
    iat: Time,
    /// Added after the claims above (a repeated name is a duplicate member).
    extras: Vec<(ExtraKey, ExtraVal)>,
    sig: Sig,
    shape: Shape,
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

fn time(t: &Time, now: i64) -> Option<Value> {
    match t {
        Time::Absent => None,
        Time::At(o) => Some(json!(now + o.secs())),
        Time::Fraction(o) => Some(json!(now as f64 + o.secs() as f64 + 0.5)),
        Time::Text(o) => Some(json!((now + o.secs()).to_string())),
        Time::Raw(r) => Some(json!(r)),
    }
}

fn aud_item(a: &AudItem) -> Value {
    match a {
        AudItem::Ours => json!(AUDIENCE),
        AudItem::Other(s) => json!(s),
        AudItem::Number(n) => json!(n),
    }
}

/// An object with members in order, duplicates kept.
fn object(members: &[(String, Value)]) -> String {
    let body: Vec<String> = members
        .iter()
        .map(|(k, v)| format!("{}:{}", serde_json::to_string(k).unwrap(), v))
        .collect();
    format!("{{{}}}", body.join(","))
}

fuzz_target!(|input: Input| {
    let f = fixture();
    let now = now();

    let mut header: Vec<(String, Value)> = Vec::new();
    let alg = match &input.alg {
        Alg::Es256 => "ES256".to_owned(),
        Alg::Es384 => "ES384".into(),
        Alg::Rs256 => "RS256".into(),
        Alg::Hs256 => "HS256".into(),
        Alg::None => "none".into(),
        Alg::Other(s) => s.chars().take(16).collect(),
    };
    header.push(("alg".into(), json!(alg)));
    match &input.kid {
        Kid::K1 => header.push(("kid".into(), json!("k1"))),
        Kid::X1 => header.push(("kid".into(), json!("x1"))),
        Kid::Absent => {}
        Kid::Other(s) => header.push(("kid".into(), json!(s))),
    }
    match &input.typ {
        Typ::Absent => {}
        Typ::Jwt => header.push(("typ".into(), json!("JWT"))),
        Typ::Jose => header.push(("typ".into(), json!("JOSE"))),
        Typ::Other(s) => header.push(("typ".into(), json!(s))),
    }

    let mut claims: Vec<(String, Value)> = Vec::new();
    match &input.sub {
        Sub::Valid(i) => claims.push(("sub".into(), json!(VALID_IDS[usize::from(*i) % VALID_IDS.len()]))),
        Sub::Invalid(i) => {
            claims.push(("sub".into(), json!(INVALID_IDS[usize::from(*i) % INVALID_IDS.len()])))
        }
        Sub::Text(s) => claims.push(("sub".into(), json!(s))),
        Sub::Number(n) => claims.push(("sub".into(), json!(n))),
        Sub::Absent => {}
    }
    match &input.aud {
        Aud::One(a) => claims.push(("aud".into(), aud_item(a))),
        Aud::Many(v) => claims.push(("aud".into(), Value::Array(v.iter().take(4).map(aud_item).collect()))),
        Aud::Absent => {}
        Aud::Null => claims.push(("aud".into(), Value::Null)),
    }
    for (name, t) in [("exp", &input.exp), ("nbf", &input.nbf), ("iat", &input.iat)] {
        if let Some(v) = time(t, now) {
            claims.push((name.into(), v));
        }
    }
    for (k, v) in input.extras.iter().take(4) {
        let k = match k {
            ExtraKey::Sub => "sub".to_owned(),
            ExtraKey::Aud => "aud".into(),
            ExtraKey::Exp => "exp".into(),
            ExtraKey::Nbf => "nbf".into(),
            ExtraKey::Iss => "iss".into(),
            ExtraKey::Other(s) => s.chars().take(16).collect(),
        };
        let v = match v {
            ExtraVal::Text(s) => json!(s),
            ExtraVal::Number(n) => json!(n),
            ExtraVal::Ours => json!(AUDIENCE),
            ExtraVal::ValidId(i) => json!(VALID_IDS[usize::from(*i) % VALID_IDS.len()]),
            ExtraVal::Bool(b) => json!(b),
        };
        claims.push((k, v));
    }

    let signing_input = format!(
        "{}.{}",
        B64.encode(object(&header)),
        B64.encode(object(&claims))
    );
    let sign = |key: &EncodingKey| jsonwebtoken::crypto::sign(signing_input.as_bytes(), key, Algorithm::ES256).unwrap();
    let sig = match input.sig {
        Sig::Right => sign(&f.key),
        Sig::OtherKey => sign(&f.other),
        Sig::Corrupt { pos } => {
            let mut s = sign(&f.key).into_bytes();
            let p = usize::from(pos) % s.len();
            s[p] = if s[p] == b'A' { b'B' } else { b'A' };
            String::from_utf8(s).unwrap()
        }
        Sig::Empty => String::new(),
    };
    let token = match input.shape {
        Shape::Plain => format!("{signing_input}.{sig}"),
        Shape::TrailingDot => format!("{signing_input}.{sig}."),
        Shape::ExtraPart => format!("{signing_input}.{sig}.e30"),
        Shape::Padded => format!("{signing_input}.{sig}=="),
    };

    let ours = trustline_identity::jwt::validate(&token, AUDIENCE, &f.bundle);
    let mut v = Validation::new(Algorithm::ES256);
    v.set_audience(&[AUDIENCE]);
    assert!(v.validate_exp);
    let reference = jsonwebtoken::decode::<Value>(&token, &f.decoding, &v);

    if let Ok(valid) = &ours {
        let Ok(r) = &reference else {
            panic!("ours accepts what jsonwebtoken refuses ({reference:?}): {token}\n{input:?}");
        };
        assert_eq!(valid.claims, r.claims, "{token}");
        let sub = r.claims.get("sub").and_then(Value::as_str).expect("a string sub");
        let theirs = spiffe::SpiffeId::new(sub).expect("sub accepted by us, refused by the spiffe crate");
        // The ID reported is exactly the token's `sub` (this target found `sub: "spiffe://Example.org/web"`
        // validating as `spiffe://example.org/web`; `jwt::validate` now parses `sub` strictly).
        assert_eq!(valid.spiffe_id, theirs, "{token}");
        assert_eq!(valid.spiffe_id.to_string(), sub, "{token}");
    }
    if let Ok(r) = &reference {
        let sub = r.claims.get("sub").and_then(Value::as_str);
        let exp = r.claims.get("exp").and_then(Value::as_i64);
        let intended_stricter = input.kid != Kid::K1
            // jsonwebtoken checks `aud` only when it is present and well-formed (its default required claims are
            // just `exp`): a token with no `aud`, `"aud": null` or a number passes it with an audience set.
            || !match r.claims.get("aud") {
                Some(Value::String(a)) => a == AUDIENCE,
                // An array with a non-string member is malformed (RFC 7519: StringOrURI values) and refused.
                Some(Value::Array(v)) => {
                    v.iter().all(Value::is_string) && v.iter().any(|a| a.as_str() == Some(AUDIENCE))
                }
                _ => false,
            }
            // `sub` must be a SPIFFE ID in canonical form (an upper-case trust domain is refused, not lowercased).
            || !sub.is_some_and(|s| trustline_identity::spiffe_id::parse_spiffe_id("sub", s).is_ok())
            || !exp.is_some_and(|e| e > now + 1);
        assert!(
            ours.is_ok() || intended_stricter,
            "jsonwebtoken accepts what ours refuses ({ours:?}): {token}\n{input:?}"
        );
    }
});
