//! Workload selectors: `type:value` facts about a workload that registration entries match on.
//!
//! The CA accepts only selector types an agent can actually produce, so a typo (`unix:ui:1000`) is refused at
//! `entry create` time instead of silently never matching.

use std::fmt;
use std::str::FromStr;

/// Why a selector string was refused. Every variant carries the offending input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SelectorError {
    /// No `:` separating the type from the value.
    #[error("selector {0:?} is not of the form type:value (e.g. unix:uid:1000)")]
    MissingSeparator(String),
    /// The type is not one this version knows.
    #[error("selector {selector:?} has unknown type {kind:?} (known: {known})")]
    UnknownType {
        /// The whole selector.
        selector: String,
        /// The unknown type.
        kind: String,
        /// The known types, comma separated.
        known: &'static str,
    },
    /// The type is known but the key inside the value is not (e.g. `unix:ui:1000`).
    #[error("selector {selector:?}: unknown {kind} selector key {key:?} (known: {known})")]
    UnknownKey {
        /// The whole selector.
        selector: String,
        /// The selector type.
        kind: String,
        /// The unknown key.
        key: String,
        /// The known keys, comma separated.
        known: &'static str,
    },
    /// The value is malformed for its key (e.g. a non-numeric uid).
    #[error("selector {selector:?}: {reason}")]
    BadValue {
        /// The whole selector.
        selector: String,
        /// What is wrong with it.
        reason: String,
    },
}

const KNOWN_TYPES: &str = "unix";
const UNIX_KEYS: &str = "uid, gid, user, group, path, sha256";

/// One selector, e.g. `unix:uid:1000` (type `unix`, value `uid:1000`). Always valid once constructed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Selector {
    kind: String,
    value: String,
}

impl Selector {
    /// Builds a selector from its type and value, validating both.
    pub fn new(kind: &str, value: &str) -> Result<Self, SelectorError> {
        let whole = format!("{kind}:{value}");
        validate(&whole, kind, value)?;
        Ok(Self {
            kind: kind.to_owned(),
            value: value.to_owned(),
        })
    }

    /// The selector type (`unix`).
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The selector value (`uid:1000`).
    pub fn value(&self) -> &str {
        &self.value
    }
}

fn validate(whole: &str, kind: &str, value: &str) -> Result<(), SelectorError> {
    match kind {
        "unix" => {
            let (key, v) = value
                .split_once(':')
                .ok_or_else(|| SelectorError::MissingSeparator(whole.to_owned()))?;
            let bad = |reason: String| SelectorError::BadValue {
                selector: whole.to_owned(),
                reason,
            };
            match key {
                "uid" | "gid" => {
                    v.parse::<u32>()
                        .map_err(|_| bad(format!("{key} must be a number, got {v:?}")))?;
                }
                "user" | "group" => {
                    if v.is_empty() || v.contains(char::is_whitespace) {
                        return Err(bad(format!(
                            "{key} must be a non-empty name without spaces, got {v:?}"
                        )));
                    }
                }
                "path" => {
                    if !v.starts_with('/') {
                        return Err(bad(format!("path must be absolute, got {v:?}")));
                    }
                }
                "sha256" => {
                    if v.len() != 64
                        || !v
                            .bytes()
                            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                    {
                        return Err(bad(format!("sha256 must be 64 lowercase hex digits, got {v:?}")));
                    }
                }
                other => {
                    return Err(SelectorError::UnknownKey {
                        selector: whole.to_owned(),
                        kind: kind.to_owned(),
                        key: other.to_owned(),
                        known: UNIX_KEYS,
                    })
                }
            }
            Ok(())
        }
        other => Err(SelectorError::UnknownType {
            selector: whole.to_owned(),
            kind: other.to_owned(),
            known: KNOWN_TYPES,
        }),
    }
}

impl FromStr for Selector {
    type Err = SelectorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, value) = s
            .split_once(':')
            .ok_or_else(|| SelectorError::MissingSeparator(s.to_owned()))?;
        Self::new(kind, value)
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

/// A canonical, order-independent key for a set of selectors (sorted, deduplicated, newline separated).
/// Two entries with the same SPIFFE ID, parent and selector key are duplicates.
pub fn selector_set_key(selectors: &[Selector]) -> String {
    let mut v: Vec<String> = selectors.iter().map(ToString::to_string).collect();
    v.sort();
    v.dedup();
    v.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_known_unix_selectors() {
        for s in [
            "unix:uid:1000",
            "unix:gid:0",
            "unix:user:www-data",
            "unix:group:adm",
            "unix:path:/usr/bin/app",
            "unix:sha256:0000000000000000000000000000000000000000000000000000000000000000",
        ] {
            let sel: Selector = s.parse().unwrap();
            assert_eq!(sel.to_string(), s);
        }
    }

    #[test]
    fn refuses_unknown_type_naming_it() {
        let err = "k9s:ns:default".parse::<Selector>().unwrap_err();
        assert!(err.to_string().contains("unknown type \"k9s\""), "{err}");
    }

    #[test]
    fn refuses_unknown_key_and_bad_values() {
        let err = "unix:ui:1000".parse::<Selector>().unwrap_err();
        assert!(
            err.to_string().contains("unknown unix selector key \"ui\""),
            "{err}"
        );
        assert!("unix:uid:abc".parse::<Selector>().is_err());
        assert!("unix:path:relative/app".parse::<Selector>().is_err());
        assert!("unix:sha256:ABC".parse::<Selector>().is_err());
        assert!("unix".parse::<Selector>().is_err());
    }

    #[test]
    fn set_key_is_order_independent() {
        let a: Selector = "unix:uid:1".parse().unwrap();
        let b: Selector = "unix:gid:2".parse().unwrap();
        assert_eq!(
            selector_set_key(&[a.clone(), b.clone()]),
            selector_set_key(&[b, a])
        );
    }
}
