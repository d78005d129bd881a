//! Validly signed caller chains, built from a structured description, then tampered with (or not).
//!
//! Raw bytes never get past the hops' signature checks, so this target signs real chains with real SVIDs (the
//! sidecar's own `append` and batching `HopSigner`, or a hop built here from the documented format, for a
//! timestamp other than now) and feeds them to `chain::verify`. Properties:
//!
//! - an untampered chain verifies exactly when its shape is right (every caller was the previous hop's callee,
//!   the last hop is from the peer and names us, every hop inside the age window), and then its `callers()` are
//!   the hops' `from`s in order;
//! - a hop signed by another key (another service's SVID, or the same SPIFFE ID from a CA outside the bundle) is
//!   refused, as `Forged` at that hop when nothing else is wrong; a changed trace id, swapped hops, a dropped hop
//!   that is not the last, or a flipped byte are refused. The one exception is the peer's own last hop when
//!   `verify_peer_signature` is off: its signature is deliberately not checked (the mTLS channel authenticated
//!   the peer), so a change there may verify, but never changes the earlier callers or the peer.
#![no_main]
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arbitrary::Arbitrary;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType};
use trustline_identity::tls::RotatingCert;
use trustline_sidecar::chain::{self, ChainError, Hop, HopSigner, Limits, NewHop};

#[path = "common.rs"]
mod common;

const IDS: [&str; 4] = [
    "spiffe://example.org/web",
    "spiffe://example.org/api",
    "spiffe://example.org/a",
    "spiffe://example.org/b",
];
/// The mTLS peer and this service.
const PEER: usize = 0;
const OWN: usize = 1;
const TID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const MAX_HOPS: usize = 6;

struct Keys {
    /// An SVID for each of `IDS`, issued by the bundle's CA.
    ids: Vec<Arc<RotatingCert>>,
    /// The same SPIFFE IDs, issued by a CA outside the bundle.
    alien: Vec<Arc<RotatingCert>>,
    rt: tokio::runtime::Runtime,
}

fn svid(issuer: &rcgen::Issuer<'static, KeyPair>, id: &str) -> Arc<RotatingCert> {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names.push(SanType::URI(id.try_into().unwrap()));
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ClientAuth,
        ExtendedKeyUsagePurpose::ServerAuth,
    ];
    p.is_ca = IsCa::ExplicitNoCa;
    let c = p.signed_by(&key, issuer).unwrap();
    let rc = Arc::new(RotatingCert::default());
    rc.set(vec![c.der().to_vec()], &key.serialize_der()).unwrap();
    rc
}

fn keys() -> &'static Keys {
    static K: OnceLock<Keys> = OnceLock::new();
    K.get_or_init(|| {
        let key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        ca.subject_alt_names
            .push(SanType::URI("spiffe://example.org".try_into().unwrap()));
        let alien_issuer = rcgen::Issuer::new(ca, key);
        Keys {
            ids: IDS.iter().map(|id| svid(&common::td().issuer, id)).collect(),
            alien: IDS.iter().map(|id| svid(&alien_issuer, id)).collect(),
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        }
    })
}

#[derive(Arbitrary, Debug)]
enum Method {
    Get,
    Post,
    Other(String),
}

#[derive(Arbitrary, Debug, Clone, Copy, PartialEq)]
enum At {
    /// Inside the window.
    Now,
    Past10s,
    Future2s,
    /// Outside it: older than `max_age`, further ahead than `skew`.
    Past5min,
    Future1min,
}

impl At {
    fn offset_ms(self) -> i64 {
        match self {
            At::Now => 0,
            At::Past10s => -10_000,
            At::Future2s => 2_000,
            At::Past5min => -300_000,
            At::Future1min => 60_000,
        }
    }
    fn fresh(self) -> bool {
        matches!(self, At::Now | At::Past10s | At::Future2s)
    }
}

#[derive(Arbitrary, Debug)]
enum How {
    /// `chain::append`, signed on its own.
    Append,
    /// `HopSigner::append`, with `siblings` other hops added in the same turn (a batch of several: a Merkle
    /// proof) when batching is on; the chain continues from hop `pick` of them.
    Signer { batch: bool, siblings: u8, pick: u8 },
    /// Built here from the documented format, signed at `at`.
    Manual { at: At },
}

#[derive(Arbitrary, Debug)]
struct HopDesc {
    from: u8,
    /// Bit mask over `IDS`.
    to: u8,
    method: Method,
    authority: String,
    path: String,
    how: How,
}

#[derive(Arbitrary, Debug)]
enum Tid {
    W3c,
    Other(String),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Tamper {
    /// XOR one byte of hop `hop`'s text.
    Flip { hop: u8, pos: u16, xor: u8 },
    Swap { a: u8, b: u8 },
    Drop { hop: u8 },
    /// Hop `hop` signed by another service's key (`alien` false) or by its own SPIFFE ID from another CA.
    WrongKey { hop: u8, other: u8, alien: bool },
    /// Hop `hop` with another trace id.
    ChangeTid { hop: u8 },
}

#[derive(Arbitrary, Debug)]
struct Input {
    hops: Vec<HopDesc>,
    /// Make the shape right (links, last hop from the peer to us) whatever `from`/`to` say.
    fixup: bool,
    tid: Tid,
    verify_peer_signature: bool,
    tamper: Option<Tamper>,
}

fn short(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// One planned hop.
struct Plan {
    from: usize,
    to: Vec<String>,
    method: String,
    authority: String,
    path: String,
    fresh: bool,
}

/// Whether `plans` (untampered) should verify.
fn shape_ok(plans: &[Plan]) -> bool {
    let Some(last) = plans.last() else { return false };
    plans.iter().all(|p| p.fresh)
        && plans
            .windows(2)
            .all(|w| w[0].to.iter().any(|t| t == IDS[w[1].from]))
        && last.from == PEER
        && last.to.iter().any(|t| t == IDS[OWN])
}

fn build_hop(
    existing: Option<&str>,
    plan: &Plan,
    how: &How,
    tid: &str,
    key: &Arc<RotatingCert>,
) -> String {
    let k = keys();
    let hop = NewHop {
        tid,
        from: IDS[plan.from],
        to: &plan.to,
        method: &plan.method,
        authority: &plan.authority,
        path: &plan.path,
    };
    match how {
        How::Append => chain::append(existing, &hop, key).expect("append"),
        How::Signer {
            batch,
            siblings,
            pick,
        } => {
            let n = 1 + usize::from(*siblings % 4);
            let pick = usize::from(*pick) % n;
            let signer = Arc::new(HopSigner::new(key.clone(), *batch));
            k.rt.block_on(async {
                let tasks: Vec<_> = (0..n)
                    .map(|j| {
                        let signer = signer.clone();
                        let existing = existing.map(str::to_owned);
                        let (tid, from, to) = (tid.to_owned(), IDS[plan.from], plan.to.clone());
                        let (m, a) = (plan.method.clone(), plan.authority.clone());
                        let p = if j == pick {
                            plan.path.clone()
                        } else {
                            format!("/sibling/{j}")
                        };
                        tokio::spawn(async move {
                            let h = NewHop {
                                tid: &tid,
                                from,
                                to: &to,
                                method: &m,
                                authority: &a,
                                path: &p,
                            };
                            signer.append(existing.as_deref(), &h).await
                        })
                    })
                    .collect();
                let mut out = Vec::new();
                for t in tasks {
                    out.push(t.await.expect("task").expect("signed"));
                }
                if *batch && n > 1 {
                    let last = out[pick].rsplit(',').next().unwrap();
                    assert_eq!(last.split('.').count(), 4, "a batched hop carries a proof");
                }
                out.swap_remove(pick)
            })
        }
        How::Manual { at } => {
            let existing = existing.map(str::trim).filter(|e| !e.is_empty());
            let h = Hop {
                v: 1,
                tid: tid.to_owned(),
                i: existing.map_or(0, |e| e.split(',').count()),
                from: IDS[plan.from].to_owned(),
                to: plan.to.clone(),
                m: plan.method.clone(),
                a: plan.authority.clone(),
                p: plan.path.clone(),
                t: now_ms() + at.offset_ms(),
                d: "allow".into(),
                prev: chain::digest(existing.unwrap_or("")),
            };
            let p = B64.encode(serde_json::to_vec(&h).unwrap());
            let sig = key
                .sign(&[b"trustline-chain-v1.".as_slice(), p.as_bytes()].concat())
                .expect("an SVID")
                .expect("signed");
            let mut s = sig.scheme.to_be_bytes().to_vec();
            s.extend_from_slice(&sig.signature);
            let text = format!("{p}.{}.{}", B64.encode(sig.chain.concat()), B64.encode(s));
            match existing {
                Some(e) => format!("{e},{text}"),
                None => text,
            }
        }
    }
}

fn check_ok(v: &chain::Verified, plans: &[Plan], text: &str) {
    let froms: Vec<String> = plans.iter().map(|p| IDS[p.from].to_owned()).collect();
    assert_eq!(v.callers(), froms, "callers are the hops' from, in order");
    assert_eq!(v.digest, chain::digest(text));
    for (i, (h, p)) in v.hops.iter().zip(plans).enumerate() {
        assert_eq!(h.i, i);
        assert_eq!((&h.m, &h.a, &h.p, &h.to), (&p.method, &p.authority, &p.path, &p.to));
    }
}

fuzz_target!(|input: Input| {
    let k = keys();
    let n = input.hops.len().min(MAX_HOPS);
    if n == 0 {
        return;
    }
    let descs = &input.hops[..n];
    let mut plans: Vec<Plan> = descs
        .iter()
        .map(|d| {
            Plan {
                from: usize::from(d.from % 4),
                to: IDS
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| d.to & (1 << j) != 0)
                    .map(|(_, id)| (*id).to_owned())
                    .collect(),
                method: match &d.method {
                    Method::Get => "GET".into(),
                    Method::Post => "POST".into(),
                    Method::Other(m) => short(m, 12),
                },
                authority: short(&d.authority, 32),
                path: short(&d.path, 64),
                fresh: match d.how {
                    How::Manual { at } => at.fresh(),
                    _ => true,
                },
            }
        })
        .collect();
    if input.fixup {
        plans[n - 1].from = PEER;
        for i in 0..n {
            let want = if i + 1 < n { plans[i + 1].from } else { OWN };
            if !plans[i].to.iter().any(|t| t == IDS[want]) {
                plans[i].to.push(IDS[want].to_owned());
            }
        }
    }
    let tid = match &input.tid {
        Tid::W3c => TID.to_owned(),
        Tid::Other(s) => short(s, 40),
    };

    // Build-time tampering: a wrong signing key or another trace id at one hop.
    let (wrong_key, changed_tid) = match input.tamper {
        Some(Tamper::WrongKey { hop, other, alien }) => (Some((usize::from(hop) % n, other, alien)), None),
        Some(Tamper::ChangeTid { hop }) => (None, Some(usize::from(hop) % n)),
        _ => (None, None),
    };
    let mut text: Option<String> = None;
    for (i, (plan, desc)) in plans.iter().zip(descs).enumerate() {
        let key = match wrong_key {
            Some((h, _, true)) if h == i => &k.alien[plan.from],
            Some((h, other, false)) if h == i => &k.ids[(plan.from + 1 + usize::from(other % 3)) % 4],
            _ => &k.ids[plan.from],
        };
        let t = if changed_tid == Some(i) { format!("{tid}0") } else { tid.clone() };
        text = Some(build_hop(text.as_deref(), plan, &desc.how, &t, key));
    }
    let text = text.unwrap();

    let limits = Limits {
        max_hops: 16,
        max_bytes: 32 * 1024,
        max_age: Duration::from_secs(60),
        skew: Duration::from_secs(5),
        verify_peer_signature: input.verify_peer_signature,
    };
    let verify = |value: &str| chain::verify(value, &common::bundle(), IDS[PEER], IDS[OWN], &limits);
    let ok = shape_ok(&plans);
    // Whether hop `i`'s signature is checked.
    let checked = |i: usize, n: usize| i + 1 < n || input.verify_peer_signature;
    let hops: Vec<&str> = text.split(',').collect();
    assert_eq!(hops.len(), n);

    let untampered = || {
        let r = verify(&text);
        assert_eq!(r.is_ok(), ok, "untampered chain, shape ok = {ok}: {r:?}\n{text}");
        if let Ok(v) = r {
            check_ok(&v, &plans, &text);
        }
    };
    match input.tamper {
        None => untampered(),
        // A chain of one has no other trace id to differ from.
        Some(Tamper::ChangeTid { .. }) if n == 1 => untampered(),
        Some(Tamper::ChangeTid { hop }) => {
            let r = verify(&text);
            let at = (usize::from(hop) % n).max(1);
            match r {
                Err(ChainError::Broken { hop, .. }) if ok => assert_eq!(hop, at),
                Err(_) if !ok => {}
                other => panic!("changed trace id at hop {at}: {other:?}\n{text}"),
            }
        }
        Some(Tamper::WrongKey { .. }) => {
            let (h, _, _) = wrong_key.unwrap();
            let r = verify(&text);
            if checked(h, n) {
                match r {
                    Err(ChainError::Forged { hop, .. }) if ok => assert_eq!(hop, h),
                    Err(_) if !ok => {}
                    other => panic!("hop {h} signed with a wrong key: {other:?}\n{text}"),
                }
            } else {
                // The peer's own hop, unchecked by design: the shape decides.
                assert_eq!(r.is_ok(), ok, "{r:?}");
                if let Ok(v) = r {
                    check_ok(&v, &plans, &text);
                }
            }
        }
        Some(Tamper::Swap { a, b }) => {
            let (a, b) = (usize::from(a) % n, usize::from(b) % n);
            if a == b {
                return;
            }
            let mut hs = hops.clone();
            hs.swap(a, b);
            let r = verify(&hs.join(","));
            assert!(r.is_err(), "hops {a} and {b} swapped: {r:?}");
        }
        Some(Tamper::Drop { hop }) => {
            let d = usize::from(hop) % n;
            let mut hs = hops.clone();
            hs.remove(d);
            let value = hs.join(",");
            let r = verify(&value);
            if d + 1 == n && n > 1 {
                // Dropping the last hop leaves a genuine, shorter chain.
                let prefix_ok = shape_ok(&plans[..n - 1]);
                assert_eq!(r.is_ok(), prefix_ok, "last hop dropped: {r:?}");
                if let Ok(v) = r {
                    check_ok(&v, &plans[..n - 1], &value);
                }
            } else {
                assert!(r.is_err(), "hop {d} of {n} dropped: {r:?}");
            }
        }
        Some(Tamper::Flip { hop, pos, xor }) => {
            let h = usize::from(hop) % n;
            if xor == 0 {
                return;
            }
            let mut bytes = hops[h].as_bytes().to_vec();
            let p = usize::from(pos) % bytes.len();
            bytes[p] ^= xor;
            let Ok(flipped) = String::from_utf8(bytes) else { return };
            let mut hs: Vec<&str> = hops.clone();
            hs[h] = &flipped;
            let value = hs.join(",");
            let r = verify(&value);
            if checked(h, n) {
                assert!(r.is_err(), "byte {p} of hop {h} flipped (^{xor:#04x}): {r:?}\n{value}");
            } else if let Ok(v) = r {
                // The peer's own, unchecked hop changed: the earlier callers and the peer stand.
                let callers = v.callers();
                let froms: Vec<String> = plans.iter().map(|p| IDS[p.from].to_owned()).collect();
                assert_eq!(callers[..n - 1], froms[..n - 1]);
                assert_eq!(callers.last().map(String::as_str), Some(IDS[PEER]));
            }
        }
    }
});
