//! One request, one meaning: the path and host that policy checks, the accountability log records and the app
//! receives are the same bytes.
//!
//! Policy matches strings; an app's framework decodes and normalizes them. Without this module, `/api//admin`,
//! `/api/./admin`, `/api/%61dmin` or `/api/x/../admin` would pass a DENY on `/api/admin*` and be served as
//! `/api/admin` by the app behind. So, as Istio does (`normalize_path`, `merge_slashes`,
//! `path_with_escaped_slashes_action: REJECT_REQUEST`), before anything looks at a request:
//!
//! - **paths** ([`normalize`]): RFC 3986 §6.2.2 — percent-encoded unreserved characters are decoded, the remaining
//!   escapes are uppercased, dot segments are removed (§5.2.4) — and runs of `/` are merged. Escaped slashes
//!   (`%2F`, `%5C`), backslashes, malformed escapes and dot segments with parameters (`..;`, which Java servlet
//!   containers treat as `..`) are refused: no app agrees on what they mean. The query string is kept as sent
//!   and never takes part in path matching.
//! - **hosts** ([`check_host`]): one request names one host. A target in absolute form (HTTP/1.1) or an HTTP/2
//!   `:authority` that differs from the `Host` header, and a repeated `Host`, are refused.
//!
//! Each listener picks what to do with a path that is not canonical ([`PathMode`]): normalize it (the default),
//! refuse it with 400, or leave it alone (unsafe: policy and the app may then disagree).

use std::borrow::Cow;

use http::header::{self, HeaderMap};
use http::uri::{PathAndQuery, Uri};
use serde::Deserialize;

/// What a listener does with a request path that is not in canonical form.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PathMode {
    /// Rewrite it to canonical form; policy, the log and the app see the rewritten path.
    #[default]
    Normalize,
    /// Refuse it with 400.
    Reject,
    /// Leave it as sent. Unsafe: a policy on paths can then be bypassed by a spelling the app decodes.
    None,
}

/// Why a request path or host is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// `%2F` or `%5C` in the path.
    #[error("path {path:?}: escaped slash {escape:?} at byte {at} (ambiguous: refused)")]
    EscapedSlash {
        /// The path as sent.
        path: String,
        /// The escape.
        escape: String,
        /// Its byte offset.
        at: usize,
    },
    /// A backslash in the path.
    #[error("path {path:?}: backslash at byte {at} (ambiguous: refused)")]
    Backslash {
        /// The path as sent.
        path: String,
        /// Its byte offset.
        at: usize,
    },
    /// `%` not followed by two hex digits.
    #[error("path {path:?}: malformed percent-escape at byte {at}")]
    BadEscape {
        /// The path as sent.
        path: String,
        /// Its byte offset.
        at: usize,
    },
    /// A dot segment with parameters (`..;x`, `.;x`).
    #[error("path {path:?}: dot segment with parameters {segment:?} (ambiguous: refused)")]
    DotSegmentParams {
        /// The path as sent.
        path: String,
        /// The segment.
        segment: String,
    },
    /// Not in canonical form, and the listener refuses those.
    #[error(
        "path {path:?} is not in canonical form ({canonical:?}); this listener refuses non-canonical paths"
    )]
    NotCanonical {
        /// The path as sent.
        path: String,
        /// Its canonical form.
        canonical: String,
    },
    /// The path does not start with `/` (and is not `*` of `OPTIONS *`).
    #[error("path {path:?}: must start with \"/\"")]
    NotAbsolute {
        /// The path as sent.
        path: String,
    },
    /// More than one `Host` header.
    #[error("{count} Host headers: a request names one host")]
    DuplicateHost {
        /// How many.
        count: usize,
    },
    /// The target's authority (absolute form, or HTTP/2 `:authority`) and `Host` differ.
    #[error("the request target names host {target:?} but the Host header says {host:?}")]
    ConflictingHost {
        /// From the request target.
        target: String,
        /// From the `Host` header.
        host: String,
    },
    /// `Host` is not visible ASCII.
    #[error("Host header is not visible ASCII")]
    BadHost,
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The canonical form of `path` (a request path without its query), or why it is refused. Borrowed when the
/// path is canonical already (the common case costs one scan and no allocation).
pub fn normalize(path: &str) -> Result<Cow<'_, str>, TargetError> {
    if path == "*" {
        return Ok(Cow::Borrowed(path));
    }
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        return Err(TargetError::NotAbsolute { path: path.into() });
    }
    // Pass 1: escapes. Decode unreserved, uppercase the rest, refuse slashes and malformed ones.
    let mut decoded: Option<String> = None;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' => {
                return Err(TargetError::Backslash {
                    path: path.into(),
                    at: i,
                })
            }
            b'%' => {
                let (Some(hi), Some(lo)) = (
                    b.get(i + 1).copied().and_then(hex),
                    b.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(TargetError::BadEscape {
                        path: path.into(),
                        at: i,
                    });
                };
                let v = hi << 4 | lo;
                if v == b'/' || v == b'\\' {
                    return Err(TargetError::EscapedSlash {
                        path: path.into(),
                        escape: path[i..i + 3].to_owned(),
                        at: i,
                    });
                }
                let canonical_escape =
                    !is_unreserved(v) && !b[i + 1..i + 3].iter().any(u8::is_ascii_lowercase);
                if decoded.is_none() && !canonical_escape {
                    decoded = Some(path[..i].to_owned());
                }
                if let Some(d) = decoded.as_mut() {
                    if is_unreserved(v) {
                        d.push(char::from(v));
                    } else {
                        d.push('%');
                        d.push_str(&path[i + 1..i + 3].to_ascii_uppercase());
                    }
                }
                i += 3;
            }
            _ => {
                // Copy the run up to the next byte that needs a look (UTF-8 runs stay whole).
                let end = b[i..]
                    .iter()
                    .position(|c| matches!(c, b'%' | b'\\'))
                    .map_or(b.len(), |p| i + p);
                if let Some(d) = decoded.as_mut() {
                    d.push_str(&path[i..end]);
                }
                i = end;
            }
        }
    }
    let escaped: Cow<'_, str> = match decoded {
        Some(d) => Cow::Owned(d),
        None => Cow::Borrowed(path),
    };
    // Pass 2: dot segments and empty segments (merged slashes).
    let segments = || escaped[1..].split('/');
    let count = segments().count();
    let needs_rewrite = segments().enumerate().any(|(n, s)| {
        matches!(s, "." | "..")
            || (s.is_empty() && n + 1 != count)
            || s.starts_with(".;")
            || s.starts_with("..;")
    });
    if !needs_rewrite {
        return Ok(escaped);
    }
    let mut out: Vec<&str> = Vec::with_capacity(count);
    let mut trailing = false;
    for (n, s) in segments().enumerate() {
        let last = n + 1 == count;
        if s.starts_with(".;") || s.starts_with("..;") {
            return Err(TargetError::DotSegmentParams {
                path: path.into(),
                segment: s.to_owned(),
            });
        }
        match s {
            "" | "." => trailing = last,
            ".." => {
                out.pop();
                trailing = last;
            }
            s => {
                out.push(s);
                trailing = false;
            }
        }
    }
    let mut p = String::with_capacity(escaped.len());
    for s in &out {
        p.push('/');
        p.push_str(s);
    }
    if trailing || out.is_empty() {
        p.push('/');
    }
    Ok(Cow::Owned(p))
}

/// Applies `mode` to the request's path: rewrites `uri` in place when normalizing changed it. Returns the path
/// as sent when it was rewritten (for the log's note).
pub fn canonicalize_uri(uri: &mut Uri, mode: PathMode) -> Result<Option<String>, TargetError> {
    if mode == PathMode::None {
        return Ok(None);
    }
    let path = uri.path();
    let canonical = normalize(path)?;
    let Cow::Owned(canonical) = canonical else {
        return Ok(None);
    };
    if canonical == path {
        return Ok(None);
    }
    if mode == PathMode::Reject {
        return Err(TargetError::NotCanonical {
            path: path.into(),
            canonical,
        });
    }
    let sent = path.to_owned();
    let pq = match uri.query() {
        Some(q) => format!("{canonical}?{q}"),
        None => canonical,
    };
    let mut parts = std::mem::take(uri).into_parts();
    // Built from a path that hyper parsed, with bytes only removed or decoded to unreserved characters:
    // it parses again. Refuse (never forward the raw form) if it somehow does not.
    parts.path_and_query = Some(PathAndQuery::try_from(pq).map_err(|_| TargetError::NotCanonical {
        path: sent.clone(),
        canonical: String::new(),
    })?);
    *uri = Uri::from_parts(parts).map_err(|_| TargetError::NotCanonical {
        path: sent.clone(),
        canonical: String::new(),
    })?;
    Ok(Some(sent))
}

/// One host per request: refuses a repeated `Host`, and a `Host` that differs from the target's authority
/// (absolute form in HTTP/1.1, `:authority` in HTTP/2). Compared without regard to ASCII case.
pub fn check_host(uri: &Uri, headers: &HeaderMap) -> Result<(), TargetError> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let first = hosts.next();
    let more = hosts.count();
    if more > 0 {
        return Err(TargetError::DuplicateHost { count: more + 1 });
    }
    let (Some(authority), Some(host)) = (uri.authority(), first) else {
        return Ok(());
    };
    let host = host.to_str().map_err(|_| TargetError::BadHost)?;
    if !authority.as_str().eq_ignore_ascii_case(host) {
        return Err(TargetError::ConflictingHost {
            target: authority.as_str().to_owned(),
            host: host.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn n(p: &str) -> String {
        normalize(p).unwrap().into_owned()
    }

    #[test]
    fn canonical_paths_are_borrowed_unchanged() {
        for p in [
            "/",
            "/api/hello",
            "/api/admin/users",
            "/a/b/",
            "/pkg.Svc/Method",
            "/%20x",
            "/a%3Fb",
            "*",
        ] {
            assert!(matches!(normalize(p).unwrap(), Cow::Borrowed(_)), "{p}");
        }
    }

    #[test]
    fn the_bypass_spellings_all_become_the_one_path() {
        for p in [
            "/api//admin/users",
            "/api/./admin/users",
            "/api/%61dmin/users",
            "/api/%61%64%6D%69%6E/users",
            "/api/x/../admin/users",
            "/api/x/%2e%2e/admin/users",
            "/api/x/%2E./admin/users",
            "/api/%2e/admin/users",
            "//api/admin/users",
            "/api///admin//users",
            "/api/admin/./users",
            "/../api/admin/users",
            "/api/x/y/../../admin/users",
            "/%61pi/admin/users",
        ] {
            assert_eq!(n(p), "/api/admin/users", "{p}");
        }
    }

    #[test]
    fn dot_segments_and_slashes_follow_rfc_3986() {
        assert_eq!(n("/a/b/.."), "/a/");
        assert_eq!(n("/a/b/."), "/a/b/");
        assert_eq!(n("/.."), "/");
        assert_eq!(n("/."), "/");
        assert_eq!(n("//"), "/");
        assert_eq!(n("/a//"), "/a/");
        assert_eq!(n("/a/..b/c"), "/a/..b/c");
        assert_eq!(n("/a/.b"), "/a/.b");
    }

    #[test]
    fn escapes_other_than_unreserved_stay_escaped_in_upper_case() {
        assert_eq!(n("/a%3fb"), "/a%3Fb");
        assert_eq!(n("/%7e%41"), "/~A");
        assert_eq!(n("/a%25%32%65"), "/a%252e");
        assert_eq!(n("/caf%c3%a9"), "/caf%C3%A9");
    }

    #[test]
    fn ambiguous_spellings_are_refused() {
        for (p, what) in [
            ("/api%2Fadmin", "escaped slash"),
            ("/api%2fadmin", "escaped slash"),
            ("/api%5Cadmin", "escaped slash"),
            ("/api\\admin", "backslash"),
            ("/api/%", "malformed"),
            ("/api/%4", "malformed"),
            ("/api/%zz", "malformed"),
            ("/api/..;/admin", "parameters"),
            ("/api/.;x/admin", "parameters"),
            ("api/admin", "must start"),
        ] {
            let e = normalize(p).unwrap_err().to_string();
            assert!(e.contains(what), "{p}: {e}");
        }
    }

    #[test]
    fn the_uri_keeps_its_query_and_reject_mode_refuses() {
        let mut u: Uri = "/api/./admin?x=/../y&z=%2F".parse().unwrap();
        assert_eq!(
            canonicalize_uri(&mut u, PathMode::Normalize).unwrap().as_deref(),
            Some("/api/./admin")
        );
        assert_eq!(u.path(), "/api/admin");
        assert_eq!(u.query(), Some("x=/../y&z=%2F"));
        let mut u: Uri = "/api/./admin".parse().unwrap();
        assert!(matches!(
            canonicalize_uri(&mut u, PathMode::Reject),
            Err(TargetError::NotCanonical { .. })
        ));
        let mut u: Uri = "/api/./admin".parse().unwrap();
        assert_eq!(canonicalize_uri(&mut u, PathMode::None).unwrap(), None);
        assert_eq!(u.path(), "/api/./admin");
        let mut u: Uri = "http://api/a//b".parse().unwrap();
        canonicalize_uri(&mut u, PathMode::Normalize).unwrap();
        assert_eq!(u.to_string(), "http://api/a/b");
    }

    #[test]
    fn one_host_per_request() {
        let h = |vals: &[&str]| {
            let mut m = HeaderMap::new();
            for v in vals {
                m.append(header::HOST, v.parse().unwrap());
            }
            m
        };
        let origin: Uri = "/x".parse().unwrap();
        let absolute: Uri = "http://api/x".parse().unwrap();
        assert!(check_host(&origin, &h(&["api"])).is_ok());
        assert!(check_host(&absolute, &h(&["API"])).is_ok());
        assert!(check_host(&absolute, &h(&[])).is_ok());
        assert!(matches!(
            check_host(&absolute, &h(&["admin"])),
            Err(TargetError::ConflictingHost { .. })
        ));
        assert!(matches!(
            check_host(&absolute, &h(&["api:8080"])),
            Err(TargetError::ConflictingHost { .. })
        ));
        assert!(matches!(
            check_host(&origin, &h(&["api", "admin"])),
            Err(TargetError::DuplicateHost { count: 2 })
        ));
    }

    /// Random paths from the characters that matter: whatever is accepted comes out canonical (normalizing it
    /// again changes nothing) and holds no spelling that an app could read as another path.
    #[test]
    fn accepted_paths_come_out_canonical_and_stable() {
        const ALPHABET: &[u8] = b"/./%2eEfF5cC6a1;\\x";
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut accepted = 0;
        for _ in 0..200_000 {
            let len = 1 + (next() % 14) as usize;
            let mut p = String::from("/");
            for _ in 0..len {
                p.push(char::from(ALPHABET[(next() % ALPHABET.len() as u64) as usize]));
            }
            let Ok(c) = normalize(&p) else { continue };
            accepted += 1;
            assert_eq!(normalize(&c).unwrap(), c, "{p:?} -> {c:?} is not stable");
            assert!(c.starts_with('/'), "{p:?} -> {c:?}");
            for bad in ["//", "/./", "/../", "\\", "%2f", "%2F", "%5c", "%5C"] {
                assert!(!c.contains(bad), "{p:?} -> {c:?} holds {bad:?}");
            }
            assert!(!c.ends_with("/.") && !c.ends_with("/.."), "{p:?} -> {c:?}");
        }
        assert!(accepted > 10_000, "{accepted}");
    }
}
