//! Authorization policy: what operators write, with the semantics of Istio's AuthorizationPolicy.
//!
//! A policy file (YAML, one policy per file) names an `action` (`ALLOW`, `DENY` or `AUDIT`) and `rules`. A rule
//! matches when one of its `from` sources, one of its `to` operations and all of its `when` conditions match
//! (an omitted section matches anything); fields inside one source or operation are ANDed, values inside one
//! field are ORed, and `not*` fields negate. Strings match exactly, by prefix (`abc*`), by suffix (`*abc`), or by
//! presence (`*`).
//!
//! Evaluation of a request: any matching DENY rule denies; otherwise, if any ALLOW policy exists, the request must
//! match one of its rules (an ALLOW policy with no rules matches nothing; `rules: [{}]` matches everything);
//! otherwise the request is allowed. Matching AUDIT rules mark the request for the accountability log. See
//! `docs/policy.md`.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};

/// A policy could not be loaded. Messages carry `file:line:column` and the field at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The file or folder could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file is not a valid policy.
    #[error("{path}:{line}:{column}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// 1-based line (0 when unknown).
        line: u64,
        /// 1-based column (0 when unknown).
        column: u64,
        /// What is wrong, naming the field.
        message: String,
    },
    /// Two files define policies with the same name.
    #[error("{second}: policy name {name:?} is already used by {first}")]
    DuplicateName {
        /// The name.
        name: String,
        /// The first file.
        first: PathBuf,
        /// The second file.
        second: PathBuf,
    },
}

/// A string pattern: exact, prefix (`abc*`), suffix (`*abc`) or presence (`*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    /// Equal to the string.
    Exact(String),
    /// Starts with the string.
    Prefix(String),
    /// Ends with the string.
    Suffix(String),
    /// Any value (the field is present).
    Any,
}

impl Pattern {
    /// Parses a pattern; `*` may only stand alone, first or last.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("an empty string matches nothing: remove it or use \"*\"".into());
        }
        if s == "*" {
            return Ok(Self::Any);
        }
        let body = s.strip_prefix('*').unwrap_or(s);
        let body = body.strip_suffix('*').unwrap_or(body);
        if body.contains('*') || (s.starts_with('*') && s.ends_with('*')) {
            return Err(format!(
                "{s:?}: `*` is allowed only alone, as a prefix (abc*) or as a suffix (*abc)"
            ));
        }
        Ok(if let Some(p) = s.strip_suffix('*') {
            Self::Prefix(p.to_owned())
        } else if let Some(p) = s.strip_prefix('*') {
            Self::Suffix(p.to_owned())
        } else {
            Self::Exact(s.to_owned())
        })
    }

    /// Whether `v` matches.
    pub fn matches(&self, v: &str) -> bool {
        match self {
            Self::Exact(e) => v == e,
            Self::Prefix(p) => v.starts_with(p.as_str()),
            Self::Suffix(p) => v.ends_with(p.as_str()),
            Self::Any => true,
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(e) => write!(f, "{e}"),
            Self::Prefix(p) => write!(f, "{p}*"),
            Self::Suffix(p) => write!(f, "*{p}"),
            Self::Any => f.write_str("*"),
        }
    }
}

impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Pattern::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// What a policy does when one of its rules matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    /// Admit (once any ALLOW policy exists, only matching requests are admitted).
    Allow,
    /// Refuse.
    Deny,
    /// Admit as decided otherwise, and mark for the accountability log.
    Audit,
}

/// The caller, as established by mutual TLS.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Source {
    /// Caller SPIFFE IDs.
    #[serde(default)]
    pub principals: Vec<Pattern>,
    /// Caller SPIFFE IDs that must not match.
    #[serde(default)]
    pub not_principals: Vec<Pattern>,
}

/// The request.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Operation {
    /// HTTP methods (gRPC calls are POST).
    #[serde(default)]
    pub methods: Vec<Pattern>,
    /// Methods that must not match.
    #[serde(default)]
    pub not_methods: Vec<Pattern>,
    /// Paths (gRPC: `/pkg.Service/Method`).
    #[serde(default)]
    pub paths: Vec<Pattern>,
    /// Paths that must not match.
    #[serde(default)]
    pub not_paths: Vec<Pattern>,
    /// Host / authority.
    #[serde(default)]
    pub hosts: Vec<Pattern>,
    /// Hosts that must not match.
    #[serde(default)]
    pub not_hosts: Vec<Pattern>,
    /// Destination ports.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Ports that must not match.
    #[serde(default)]
    pub not_ports: Vec<u16>,
}

/// What a `when` condition looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConditionKey {
    /// `request.headers[<name>]` (names are case-insensitive).
    Header(String),
    /// `request.auth.claims[<claim>]` of the caller's validated JWT-SVID.
    Claim(String),
    /// `source.principal`: the caller's SPIFFE ID.
    SourcePrincipal,
    /// `request.chain.origin`: the SPIFFE ID that started the verified caller chain (absent without a chain).
    ChainOrigin,
    /// `request.chain.callers`: matches when any caller in the chain matches.
    ChainCallers,
    /// `request.chain.length`: number of hops (0 without a chain); values are `N`, `>N`, `>=N`, `<N`, `<=N`.
    ChainLength,
}

impl<'de> Deserialize<'de> for ConditionKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let inner = |prefix: &str| {
            s.strip_prefix(prefix)
                .and_then(|r| r.strip_suffix(']'))
                .filter(|n| !n.is_empty())
                .map(str::to_owned)
        };
        if let Some(h) = inner("request.headers[") {
            Ok(Self::Header(h.to_ascii_lowercase()))
        } else if let Some(c) = inner("request.auth.claims[") {
            Ok(Self::Claim(c))
        } else if s == "source.principal" {
            Ok(Self::SourcePrincipal)
        } else if s == "request.chain.origin" {
            Ok(Self::ChainOrigin)
        } else if s == "request.chain.callers" {
            Ok(Self::ChainCallers)
        } else if s == "request.chain.length" {
            Ok(Self::ChainLength)
        } else {
            Err(serde::de::Error::custom(format!(
                "unknown condition key {s:?} (supported: request.headers[NAME], request.auth.claims[NAME], source.principal, request.chain.origin, request.chain.callers, request.chain.length)"
            )))
        }
    }
}

impl fmt::Display for ConditionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Header(h) => write!(f, "request.headers[{h}]"),
            Self::Claim(c) => write!(f, "request.auth.claims[{c}]"),
            Self::SourcePrincipal => f.write_str("source.principal"),
            Self::ChainOrigin => f.write_str("request.chain.origin"),
            Self::ChainCallers => f.write_str("request.chain.callers"),
            Self::ChainLength => f.write_str("request.chain.length"),
        }
    }
}

/// A `when` condition.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RawCondition")]
pub struct Condition {
    /// What to look at.
    pub key: ConditionKey,
    /// The value must match one of these (when given).
    #[serde(default)]
    pub values: Vec<Pattern>,
    /// The value must match none of these.
    #[serde(default)]
    pub not_values: Vec<Pattern>,
}

/// `from: - source: {...}`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct From {
    /// The source.
    pub source: Source,
}

/// `to: - operation: {...}`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct To {
    /// The operation.
    pub operation: Operation,
}

/// A rule.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Sources (any may match); omitted = any caller.
    #[serde(default)]
    pub from: Vec<From>,
    /// Operations (any may match); omitted = any request.
    #[serde(default)]
    pub to: Vec<To>,
    /// Conditions (all must match).
    #[serde(default)]
    pub when: Vec<Condition>,
}

/// A policy as written in a file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Unique name (reported in decisions and denials).
    pub name: String,
    /// ALLOW, DENY or AUDIT.
    pub action: Action,
    /// Rules; an ALLOW or DENY policy with none matches nothing.
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// A request as the sidecar sees it.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// The caller's SPIFFE ID (from the verified mTLS certificate).
    pub principal: Option<String>,
    /// Method.
    pub method: String,
    /// Path (without query).
    pub path: String,
    /// Host / authority.
    pub host: String,
    /// Destination port.
    pub port: Option<u16>,
    /// Headers (names lowercase).
    pub headers: Vec<(String, String)>,
    /// Claims of a validated JWT-SVID, if the caller sent one.
    pub claims: Option<serde_json::Value>,
    /// Callers of the verified caller chain, origin first (empty without a chain).
    pub chain: Vec<String>,
}

/// The outcome for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Admit or refuse.
    pub allowed: bool,
    /// The policy and rule index that decided, if a rule did.
    pub by: Option<(String, usize)>,
    /// Why, in words.
    pub reason: String,
    /// AUDIT policies (and rules) that matched.
    pub audit: Vec<(String, usize)>,
}

fn any_match(patterns: &[Pattern], v: &str) -> bool {
    patterns.iter().any(|p| p.matches(v))
}

fn list(patterns: &[Pattern]) -> String {
    patterns
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks a field: `Err(why)` when it does not match.
fn field(name: &str, value: Option<&str>, yes: &[Pattern], no: &[Pattern]) -> Result<(), String> {
    if !yes.is_empty() {
        match value {
            Some(v) if any_match(yes, v) => {}
            Some(v) => return Err(format!("{name} {v:?} is not one of [{}]", list(yes))),
            None => return Err(format!("{name} is absent (required: [{}])", list(yes))),
        }
    }
    if let Some(v) = value {
        if any_match(no, v) {
            return Err(format!("{name} {v:?} matches excluded [{}]", list(no)));
        }
    }
    Ok(())
}

impl Source {
    fn check(&self, r: &Request) -> Result<(), String> {
        field(
            "principal",
            r.principal.as_deref(),
            &self.principals,
            &self.not_principals,
        )
    }
}

impl Operation {
    fn check(&self, r: &Request) -> Result<(), String> {
        field("method", Some(&r.method), &self.methods, &self.not_methods)?;
        field("path", Some(&r.path), &self.paths, &self.not_paths)?;
        field("host", Some(&r.host), &self.hosts, &self.not_hosts)?;
        if !self.ports.is_empty() && !r.port.is_some_and(|p| self.ports.contains(&p)) {
            return Err(format!("port {:?} is not one of {:?}", r.port, self.ports));
        }
        if r.port.is_some_and(|p| self.not_ports.contains(&p)) {
            return Err(format!("port {:?} is excluded", r.port));
        }
        Ok(())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawCondition {
    key: ConditionKey,
    #[serde(default)]
    values: Vec<Pattern>,
    #[serde(default)]
    not_values: Vec<Pattern>,
}

/// A length comparison of `request.chain.length`.
fn length_matches(spec: &Pattern, n: usize) -> Result<bool, String> {
    let Pattern::Exact(s) = spec else {
        return Err(format!(
            "{spec}: request.chain.length takes N, >N, >=N, <N or <=N"
        ));
    };
    let (op, num) = [">=", "<=", ">", "<"]
        .iter()
        .find_map(|op| s.strip_prefix(op).map(|r| (*op, r)))
        .unwrap_or(("=", s.as_str()));
    let k: usize = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: request.chain.length takes N, >N, >=N, <N or <=N"))?;
    Ok(match op {
        ">=" => n >= k,
        "<=" => n <= k,
        ">" => n > k,
        "<" => n < k,
        _ => n == k,
    })
}

impl TryFrom<RawCondition> for Condition {
    type Error = String;
    fn try_from(r: RawCondition) -> Result<Self, String> {
        if r.key == ConditionKey::ChainLength {
            for v in r.values.iter().chain(&r.not_values) {
                length_matches(v, 0)?;
            }
        }
        Ok(Self {
            key: r.key,
            values: r.values,
            not_values: r.not_values,
        })
    }
}

impl Condition {
    fn check(&self, r: &Request) -> Result<(), String> {
        match &self.key {
            ConditionKey::ChainLength => {
                let n = r.chain.len();
                let any = |ps: &[Pattern]| ps.iter().any(|p| length_matches(p, n).unwrap_or(false));
                if !self.values.is_empty() && !any(&self.values) {
                    return Err(format!(
                        "request.chain.length {n} is not one of [{}]",
                        list(&self.values)
                    ));
                }
                if any(&self.not_values) {
                    return Err(format!(
                        "request.chain.length {n} is excluded by [{}]",
                        list(&self.not_values)
                    ));
                }
                return Ok(());
            }
            ConditionKey::ChainCallers => {
                let hit = |ps: &[Pattern]| r.chain.iter().any(|c| any_match(ps, c));
                if !self.values.is_empty() && !hit(&self.values) {
                    return Err(format!(
                        "no caller in the chain [{}] is one of [{}]",
                        r.chain.join(", "),
                        list(&self.values)
                    ));
                }
                if hit(&self.not_values) {
                    return Err(format!(
                        "a caller in the chain [{}] is excluded",
                        r.chain.join(", ")
                    ));
                }
                return Ok(());
            }
            _ => {}
        }
        let value: Option<String> = match &self.key {
            ConditionKey::Header(h) => r.headers.iter().find(|(k, _)| k == h).map(|(_, v)| v.clone()),
            ConditionKey::Claim(c) => r.claims.as_ref().and_then(|cl| cl.get(c)).map(|v| match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            }),
            ConditionKey::SourcePrincipal => r.principal.clone(),
            ConditionKey::ChainOrigin => r.chain.first().cloned(),
            ConditionKey::ChainCallers | ConditionKey::ChainLength => None,
        };
        field(
            &self.key.to_string(),
            value.as_deref(),
            &self.values,
            &self.not_values,
        )
    }
}

impl Rule {
    /// `Ok` when the rule matches `r`, else why not.
    pub fn check(&self, r: &Request) -> Result<(), String> {
        if !self.from.is_empty() {
            let errs: Vec<String> = self.from.iter().filter_map(|f| f.source.check(r).err()).collect();
            if errs.len() == self.from.len() {
                return Err(format!("from: {}", errs.join("; ")));
            }
        }
        if !self.to.is_empty() {
            let errs: Vec<String> = self
                .to
                .iter()
                .filter_map(|t| t.operation.check(r).err())
                .collect();
            if errs.len() == self.to.len() {
                return Err(format!("to: {}", errs.join("; ")));
            }
        }
        for c in &self.when {
            c.check(r).map_err(|e| format!("when: {e}"))?;
        }
        Ok(())
    }
}

/// The policies in force (from one folder).
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    /// Policies with the file each came from, in file-name order.
    pub policies: Vec<(PathBuf, Policy)>,
}

/// One line of an explanation: which rule of which policy matched or why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    /// Policy name.
    pub policy: String,
    /// Its action.
    pub action: Action,
    /// Rule index, or None for a policy without rules.
    pub rule: Option<usize>,
    /// `Ok` = matched, `Err(why not)`.
    pub outcome: Result<(), String>,
}

impl PolicySet {
    /// Parses one policy file's text.
    pub fn parse_file(path: &Path, text: &str) -> Result<Policy, PolicyError> {
        let p: Policy = serde_saphyr::from_str(text).map_err(|e| {
            let (line, column) = e.location().map(|l| (l.line(), l.column())).unwrap_or((0, 0));
            let msg = e.without_snippet().to_string();
            // serde-saphyr prefixes "error: line L column C: "; keep only the message.
            let body = msg
                .split_once(": line ")
                .and_then(|(_, rest)| rest.split_once(": "))
                .map_or(msg.as_str(), |(_, m)| m);
            let first = body.lines().next().unwrap_or_default();
            // Custom errors repeat the position at the end.
            let message = first.rfind(" at line ").map_or(first, |i| &first[..i]).to_owned();
            PolicyError::Invalid {
                path: path.to_owned(),
                line,
                column,
                message,
            }
        })?;
        if p.name.trim().is_empty() {
            return Err(PolicyError::Invalid {
                path: path.to_owned(),
                line: 1,
                column: 1,
                message: "name must not be empty".into(),
            });
        }
        Ok(p)
    }

    /// Loads every `*.yaml` / `*.yml` file of `dir`. Any invalid file fails the whole load (so a caller can keep
    /// the last good set).
    pub fn load_dir(dir: &Path) -> Result<Self, PolicyError> {
        let io = |source| PolicyError::Io {
            path: dir.to_owned(),
            source,
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
            .collect();
        files.sort();
        let mut set = PolicySet::default();
        for f in files {
            let text = std::fs::read_to_string(&f).map_err(|source| PolicyError::Io {
                path: f.clone(),
                source,
            })?;
            let p = Self::parse_file(&f, &text)?;
            if let Some((first, _)) = set.policies.iter().find(|(_, q)| q.name == p.name) {
                return Err(PolicyError::DuplicateName {
                    name: p.name,
                    first: first.clone(),
                    second: f,
                });
            }
            set.policies.push((f, p));
        }
        Ok(set)
    }

    /// Evaluates `r` and explains every rule's outcome.
    pub fn explain(&self, r: &Request) -> (Decision, Vec<Trace>) {
        let mut traces = Vec::new();
        for (_, p) in &self.policies {
            if p.rules.is_empty() {
                traces.push(Trace {
                    policy: p.name.clone(),
                    action: p.action,
                    rule: None,
                    outcome: Err("the policy has no rules, so it matches nothing".into()),
                });
            }
            for (i, rule) in p.rules.iter().enumerate() {
                traces.push(Trace {
                    policy: p.name.clone(),
                    action: p.action,
                    rule: Some(i),
                    outcome: rule.check(r),
                });
            }
        }
        let matched = |a: Action| {
            traces
                .iter()
                .filter(move |t| t.action == a && t.outcome.is_ok())
                .filter_map(|t| t.rule.map(|i| (t.policy.clone(), i)))
        };
        let audit: Vec<(String, usize)> = matched(Action::Audit).collect();
        let any_allow = self.policies.iter().any(|(_, p)| p.action == Action::Allow);
        let decision = decide(
            matched(Action::Deny).next(),
            matched(Action::Allow).next(),
            any_allow,
            audit,
        );
        (decision, traces)
    }

    /// The header names (lowercase) that some condition reads: the only ones a [`Request`] needs to carry.
    pub fn header_names(&self) -> impl Iterator<Item = &str> {
        self.policies
            .iter()
            .flat_map(|(_, p)| &p.rules)
            .flat_map(|r| &r.when)
            .filter_map(|c| match &c.key {
                ConditionKey::Header(h) => Some(h.as_str()),
                _ => None,
            })
    }

    /// Evaluates `r`: the same decision as [`explain`](Self::explain), without the per-rule trace (this runs on
    /// every request; rules that cannot change the outcome are skipped).
    pub fn evaluate(&self, r: &Request) -> Decision {
        let mut deny: Option<(&str, usize)> = None;
        let mut allow: Option<(&str, usize)> = None;
        let mut any_allow = false;
        let mut audit = Vec::new();
        for (_, p) in &self.policies {
            let first = match p.action {
                Action::Allow => {
                    any_allow = true;
                    &mut allow
                }
                Action::Deny => &mut deny,
                Action::Audit => {
                    for (i, rule) in p.rules.iter().enumerate() {
                        if rule.check(r).is_ok() {
                            audit.push((p.name.clone(), i));
                        }
                    }
                    continue;
                }
            };
            if first.is_none() {
                *first = p
                    .rules
                    .iter()
                    .position(|rule| rule.check(r).is_ok())
                    .map(|i| (p.name.as_str(), i));
            }
        }
        let owned = |(name, i): (&str, usize)| (name.to_owned(), i);
        decide(deny.map(owned), allow.map(owned), any_allow, audit)
    }
}

/// The decision from the first matching DENY and ALLOW rules, whether any ALLOW policy exists, and the AUDIT
/// matches (shared by [`PolicySet::explain`] and [`PolicySet::evaluate`]).
fn decide(
    deny: Option<(String, usize)>,
    allow: Option<(String, usize)>,
    any_allow: bool,
    audit: Vec<(String, usize)>,
) -> Decision {
    match (deny, allow) {
        (Some(by), _) => Decision {
            allowed: false,
            reason: format!("DENY policy {:?} rule #{} matched", by.0, by.1),
            by: Some(by),
            audit,
        },
        (None, Some(by)) => Decision {
            allowed: true,
            reason: format!("ALLOW policy {:?} rule #{} matched", by.0, by.1),
            by: Some(by),
            audit,
        },
        (None, None) if any_allow => Decision {
            allowed: false,
            reason: "ALLOW policies exist and none of their rules matched (default deny)".into(),
            by: None,
            audit,
        },
        (None, None) => Decision {
            allowed: true,
            reason: "no ALLOW policy exists and no DENY rule matched (default allow)".into(),
            by: None,
            audit,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(policies: &[&str]) -> PolicySet {
        PolicySet {
            policies: policies
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    let p = PathBuf::from(format!("p{i}.yaml"));
                    let pol = PolicySet::parse_file(&p, t).unwrap();
                    (p, pol)
                })
                .collect(),
        }
    }

    /// `evaluate`, checked against `explain`'s decision.
    fn eval(s: &PolicySet, r: &Request) -> Decision {
        let d = s.evaluate(r);
        assert_eq!(d, s.explain(r).0, "evaluate and explain disagree");
        d
    }

    fn req(principal: &str, method: &str, path: &str) -> Request {
        Request {
            principal: Some(principal.into()),
            method: method.into(),
            path: path.into(),
            host: "payments.internal".into(),
            port: Some(8080),
            headers: vec![("x-env".into(), "prod".into())],
            claims: None,
            chain: Vec::new(),
        }
    }

    const FRONTEND: &str = "spiffe://example.org/frontend";

    #[test]
    fn chain_conditions_use_origin_callers_and_length() {
        let set = set(&[
            "name: payments-only-from-frontend\naction: ALLOW\nrules:\n  - to:\n      - operation:\n          paths: [\"/payments*\"]\n    when:\n      - key: request.chain.origin\n        values: [\"spiffe://example.org/frontend\"]\n",
            "name: no-long-chains\naction: DENY\nrules:\n  - when:\n      - key: request.chain.length\n        values: [\">3\"]\n",
            "name: never-via-batch\naction: DENY\nrules:\n  - when:\n      - key: request.chain.callers\n        values: [\"spiffe://example.org/batch\"]\n",
        ]);
        let mut r = req("spiffe://example.org/checkout", "POST", "/payments/1");
        assert!(!eval(&set, &r).allowed, "no chain: no origin");
        r.chain = vec![FRONTEND.into(), "spiffe://example.org/checkout".into()];
        assert!(eval(&set, &r).allowed);
        r.chain = vec!["spiffe://example.org/checkout".into()];
        assert!(!eval(&set, &r).allowed, "starts elsewhere");
        r.chain = vec![FRONTEND.into(), "spiffe://example.org/batch".into()];
        let d = eval(&set, &r);
        assert_eq!(d.by.unwrap().0, "never-via-batch");
        r.chain = vec![FRONTEND.into(), "a".into(), "b".into(), "c".into()];
        assert_eq!(eval(&set, &r).by.unwrap().0, "no-long-chains");
        r.chain.pop();
        assert!(eval(&set, &r).allowed, "3 hops is not > 3");
        let e = PolicySet::parse_file(
            Path::new("p.yaml"),
            "name: x\naction: DENY\nrules:\n  - when:\n      - key: request.chain.length\n        values: [\"many\"]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("p.yaml:") && e.contains("request.chain.length takes"),
            "{e}"
        );
    }

    #[test]
    fn patterns() {
        assert!(Pattern::parse("abc*").unwrap().matches("abcdef"));
        assert!(Pattern::parse("*def").unwrap().matches("abcdef"));
        assert!(Pattern::parse("*").unwrap().matches(""));
        assert!(!Pattern::parse("abc").unwrap().matches("abcd"));
        assert!(Pattern::parse("a*c").is_err());
        assert!(Pattern::parse("*a*").is_err());
        assert!(Pattern::parse("").is_err());
        assert_eq!(Pattern::parse("a").unwrap(), Pattern::Exact("a".into()));
        assert_eq!(Pattern::parse("é*").unwrap(), Pattern::Prefix("é".into()));
    }

    #[test]
    fn no_policy_allows_and_any_allow_policy_switches_to_default_deny() {
        assert!(eval(&PolicySet::default(), &req(FRONTEND, "GET", "/")).allowed);
        let s = set(&["name: only-frontend\naction: ALLOW\nrules:\n  - from:\n      - source:\n          principals: [\"spiffe://example.org/frontend\"]\n"]);
        let d = eval(&s, &req(FRONTEND, "GET", "/x"));
        assert!(d.allowed);
        assert_eq!(d.by, Some(("only-frontend".into(), 0)));
        let d = eval(&s, &req("spiffe://example.org/batch", "GET", "/x"));
        assert!(!d.allowed);
        assert!(d.reason.contains("default deny"), "{}", d.reason);
    }

    #[test]
    fn deny_wins_and_audit_marks() {
        let s = set(&[
            "name: allow-all\naction: ALLOW\nrules:\n  - {}\n",
            "name: no-admin\naction: DENY\nrules:\n  - to:\n      - operation:\n          paths: [\"/admin*\"]\n",
            "name: audit-payments\naction: AUDIT\nrules:\n  - to:\n      - operation:\n          paths: [\"/payments/*\"]\n",
        ]);
        let d = eval(&s, &req(FRONTEND, "GET", "/admin/users"));
        assert!(!d.allowed);
        assert_eq!(d.by, Some(("no-admin".into(), 0)));
        let d = eval(&s, &req(FRONTEND, "POST", "/payments/42"));
        assert!(d.allowed);
        assert_eq!(d.audit, vec![("audit-payments".into(), 0)]);
    }

    #[test]
    fn fields_and_within_a_source_values_or_and_not_forms() {
        let s = set(&["name: p\naction: ALLOW\nrules:\n  - from:\n      - source:\n          principals: [\"spiffe://example.org/*\"]\n          notPrincipals: [\"spiffe://example.org/batch\"]\n    to:\n      - operation:\n          methods: [GET, HEAD]\n          paths: [\"/api/*\"]\n          notPaths: [\"/api/internal*\"]\n          ports: [8080]\n    when:\n      - key: request.headers[X-Env]\n        values: [prod]\n"]);
        assert!(eval(&s, &req(FRONTEND, "GET", "/api/x")).allowed);
        assert!(!eval(&s, &req("spiffe://example.org/batch", "GET", "/api/x")).allowed);
        assert!(!eval(&s, &req(FRONTEND, "POST", "/api/x")).allowed);
        assert!(!eval(&s, &req(FRONTEND, "GET", "/api/internal/x")).allowed);
        let mut r = req(FRONTEND, "GET", "/api/x");
        r.headers.clear();
        let (d, traces) = s.explain(&r);
        assert!(!d.allowed);
        assert!(
            traces[0]
                .outcome
                .as_ref()
                .unwrap_err()
                .contains("request.headers[x-env] is absent"),
            "{traces:?}"
        );
        r.port = Some(9090);
        assert!(!eval(&s, &r).allowed);
    }

    #[test]
    fn claims_and_empty_allow_policy() {
        let s = set(&["name: by-claim\naction: ALLOW\nrules:\n  - when:\n      - key: request.auth.claims[aud]\n        values: [payments]\n"]);
        let mut r = req(FRONTEND, "GET", "/");
        assert!(!eval(&s, &r).allowed, "no token, no claims");
        r.claims = Some(serde_json::json!({"aud": "payments"}));
        assert!(eval(&s, &r).allowed);
        let s = set(&["name: nothing\naction: ALLOW\n"]);
        assert!(
            !eval(&s, &r).allowed,
            "an ALLOW policy without rules denies everything"
        );
    }

    #[test]
    fn errors_name_file_line_column_and_field() {
        let p = Path::new("dir/bad.yaml");
        let err = PolicySet::parse_file(p, "name: a\naction: ALOW\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("dir/bad.yaml:2:"), "{err}");
        assert!(err.contains("ALOW"), "{err}");
        let err = PolicySet::parse_file(
            p,
            "name: a\naction: ALLOW\nrules:\n  - from:\n      - source:\n          principal: [x]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("dir/bad.yaml:6:"), "{err}");
        assert!(err.contains("principal"), "{err}");
        let err = PolicySet::parse_file(
            p,
            "name: a\naction: DENY\nrules:\n  - to:\n      - operation:\n          paths: [\"/a*b\"]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("dir/bad.yaml:6:") && err.contains("prefix"), "{err}");
        let err = PolicySet::parse_file(
            p,
            "name: a\naction: DENY\nrules:\n  - when:\n      - key: request.cookie[x]\n        values: [y]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("dir/bad.yaml:5:") && err.contains("unknown condition key"),
            "{err}"
        );
    }

    #[test]
    fn directories_load_in_order_and_refuse_duplicates() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("b.yaml"), "name: b\naction: DENY\nrules: [{}]\n").unwrap();
        std::fs::write(d.path().join("a.yml"), "name: a\naction: AUDIT\nrules: [{}]\n").unwrap();
        std::fs::write(d.path().join("notes.txt"), "ignored").unwrap();
        let s = PolicySet::load_dir(d.path()).unwrap();
        let names: Vec<_> = s.policies.iter().map(|(_, p)| p.name.as_str()).collect();
        assert_eq!(names, vec!["a", "b"]);
        std::fs::write(d.path().join("c.yaml"), "name: b\naction: ALLOW\n").unwrap();
        let err = PolicySet::load_dir(d.path()).unwrap_err().to_string();
        assert!(
            err.contains("c.yaml") && err.contains("already used by") && err.contains("b.yaml"),
            "{err}"
        );
    }
}
