//! SPIFFE IDs and trust domains (the `spiffe` crate's types) with the stricter checks Trustline applies at its
//! edges, and the IDs Trustline reserves for its own components.

pub use spiffe::{SpiffeId, SpiffeIdError, TrustDomain};

/// Path prefix reserved for Trustline's own components; workloads cannot be registered under it.
pub const RESERVED_PATH_PREFIX: &str = "/trustline/";

/// Path of the CA's own serving ID (`spiffe://<td>/trustline/ca`, see [`ca_server_id`]).
pub const CA_PATH: &str = "/trustline/ca";

/// Path prefix of every agent (node) ID: `spiffe://<td>/trustline/agent/<name>`. Operator-named agent IDs must be
/// under it, and no workload may be registered under it, so an agent ID and a workload ID can never be the same.
pub const AGENT_PATH_PREFIX: &str = "/trustline/agent/";

/// Sub-prefixes of [`AGENT_PATH_PREFIX`] the CA derives IDs under itself (from a join token, from a TPM DevID
/// certificate); an operator cannot name an agent ID under them.
pub const DERIVED_AGENT_PREFIXES: [(&str, &str); 2] = [
    ("/trustline/agent/join_token/", "a join token"),
    ("/trustline/agent/tpm_devid/", "a TPM DevID certificate"),
];

/// A SPIFFE ID (or trust domain) given by a user was refused. Names the field, the value and the bad part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} {value:?}: {reason}")]
pub struct IdError {
    /// The field or flag that carried the value (e.g. `--spiffe-id`, `parent_id`).
    pub field: &'static str,
    /// The value as given.
    pub value: String,
    /// What is wrong, naming the offending part.
    pub reason: String,
}

fn id_error(field: &'static str, value: &str, reason: impl Into<String>) -> IdError {
    IdError {
        field,
        value: value.to_owned(),
        reason: reason.into(),
    }
}

/// Parses a SPIFFE ID strictly: the trust domain must already be lowercase (the spec says so; the `spiffe` crate
/// would silently lowercase it), and errors name which part is wrong.
pub fn parse_spiffe_id(field: &'static str, value: &str) -> Result<SpiffeId, IdError> {
    let rest = value.strip_prefix("spiffe://").ok_or_else(|| {
        let scheme = value.split_once("://").map_or("", |(s, _)| s);
        if scheme.is_empty() {
            id_error(field, value, "must start with \"spiffe://\"")
        } else {
            id_error(field, value, format!("scheme {scheme:?} must be \"spiffe\""))
        }
    })?;
    let (td, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    if td.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(id_error(
            field,
            value,
            format!("trust domain {td:?} must be lowercase"),
        ));
    }
    SpiffeId::new(value).map_err(|e| {
        let part = match e {
            SpiffeIdError::BadTrustDomainChar | SpiffeIdError::MissingTrustDomain => {
                format!("trust domain {td:?}")
            }
            SpiffeIdError::BadPathSegmentChar
            | SpiffeIdError::EmptySegment
            | SpiffeIdError::DotSegment
            | SpiffeIdError::TrailingSlash => format!("path {path:?}"),
            _ => "SPIFFE ID".to_owned(),
        };
        id_error(field, value, format!("{part}: {e}"))
    })
}

/// Parses a workload SPIFFE ID that must belong to `td`, have a non-root path and not use the reserved prefix.
pub fn parse_workload_id(field: &'static str, value: &str, td: &TrustDomain) -> Result<SpiffeId, IdError> {
    let id = parse_spiffe_id(field, value)?;
    check_member(field, value, &id, td)?;
    if id.path().is_empty() {
        return Err(id_error(
            field,
            value,
            "a workload SPIFFE ID needs a path (e.g. spiffe://td/web)",
        ));
    }
    if id.path() == CA_PATH {
        return Err(id_error(field, value, "reserved for the CA"));
    }
    if is_agent_id(&id) {
        return Err(id_error(
            field,
            value,
            format!("path prefix {AGENT_PATH_PREFIX:?} is reserved for agent (node) IDs"),
        ));
    }
    if id.path().starts_with(RESERVED_PATH_PREFIX) {
        return Err(id_error(
            field,
            value,
            format!("path prefix {RESERVED_PATH_PREFIX:?} is reserved for Trustline's own components"),
        ));
    }
    Ok(id)
}

/// Whether `id` is under the reserved agent path ([`AGENT_PATH_PREFIX`]).
pub fn is_agent_id(id: &SpiffeId) -> bool {
    id.path().starts_with(AGENT_PATH_PREFIX)
}

/// Parses an agent (node) SPIFFE ID an operator names (a join token's `--spiffe-id`): it must belong to `td` and
/// lie under `spiffe://<td>/trustline/agent/`, but not under a sub-path the CA derives IDs in
/// ([`DERIVED_AGENT_PREFIXES`]), and it is never the CA's own ID.
pub fn parse_agent_id(field: &'static str, value: &str, td: &TrustDomain) -> Result<SpiffeId, IdError> {
    let id = parse_spiffe_id(field, value)?;
    check_member(field, value, &id, td)?;
    if id.path() == CA_PATH {
        return Err(id_error(field, value, "reserved for the CA"));
    }
    if !is_agent_id(&id) {
        return Err(id_error(
            field,
            value,
            format!(
                "an agent (node) ID must be under spiffe://{td}{AGENT_PATH_PREFIX} (e.g. spiffe://{td}{AGENT_PATH_PREFIX}web-1)",
                td = td.as_str()
            ),
        ));
    }
    if let Some((prefix, source)) = DERIVED_AGENT_PREFIXES
        .iter()
        .find(|(prefix, _)| id.path().starts_with(prefix))
    {
        return Err(id_error(
            field,
            value,
            format!("path prefix {prefix:?} is reserved for agent IDs the CA derives from {source}"),
        ));
    }
    Ok(id)
}

/// Checks that `id` is a member of `td`.
pub fn check_member(
    field: &'static str,
    value: &str,
    id: &SpiffeId,
    td: &TrustDomain,
) -> Result<(), IdError> {
    if id.is_member_of(td) {
        Ok(())
    } else {
        Err(id_error(
            field,
            value,
            format!(
                "trust domain {:?} is not this CA's trust domain {:?}",
                id.trust_domain_name(),
                td.as_str()
            ),
        ))
    }
}

/// Parses a trust domain name strictly (lowercase, no scheme).
pub fn parse_trust_domain(field: &'static str, value: &str) -> Result<TrustDomain, IdError> {
    if value.contains("://") {
        return Err(id_error(
            field,
            value,
            "give the trust domain name only (e.g. example.org), not a URI",
        ));
    }
    if value.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(id_error(field, value, "trust domain must be lowercase"));
    }
    TrustDomain::new(value).map_err(|e| id_error(field, value, e.to_string()))
}

/// The SPIFFE ID the CA presents on its agent API.
pub fn ca_server_id(td: &TrustDomain) -> String {
    format!("spiffe://{}/trustline/ca", td.as_str())
}

/// The default SPIFFE ID of an agent attested with a join token.
pub fn join_token_agent_id(td: &TrustDomain, token: &str) -> String {
    format!("spiffe://{}/trustline/agent/join_token/{token}", td.as_str())
}

/// The SPIFFE ID of an agent attested with a TPM DevID whose certificate has `fingerprint`.
pub fn tpm_devid_agent_id(td: &TrustDomain, fingerprint: &str) -> String {
    format!("spiffe://{}/trustline/agent/tpm_devid/{fingerprint}", td.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    #[test]
    fn accepts_good_ids() {
        let id = parse_workload_id("--spiffe-id", "spiffe://example.org/ns/web", &td()).unwrap();
        assert_eq!(id.path(), "/ns/web");
    }

    #[test]
    fn names_the_bad_part() {
        let cases = [
            ("http://example.org/web", "scheme \"http\""),
            ("example.org/web", "must start with"),
            ("spiffe://Example.org/web", "must be lowercase"),
            ("spiffe://exa$mple.org/web", "trust domain \"exa$mple.org\""),
            ("spiffe://example.org/a//b", "path \"/a//b\""),
            ("spiffe://example.org/a/../b", "path \"/a/../b\""),
            ("spiffe://example.org/web/", "trailing slash"),
            ("spiffe://example.org", "needs a path"),
            ("spiffe://other.org/web", "not this CA's trust domain"),
            ("spiffe://example.org/trustline/ca", "reserved"),
        ];
        for (input, want) in cases {
            let err = parse_workload_id("--spiffe-id", input, &td()).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(want), "{input}: {msg}");
            assert!(msg.starts_with("--spiffe-id"), "{msg}");
        }
    }

    #[test]
    fn workload_ids_stay_out_of_the_ca_and_agent_paths() {
        let err = parse_workload_id("spiffe_id", "spiffe://example.org/trustline/ca", &td()).unwrap_err();
        assert!(err.to_string().ends_with(": reserved for the CA"), "{err}");
        for agent in [
            "spiffe://example.org/trustline/agent/web-1",
            "spiffe://example.org/trustline/agent/join_token/abc",
        ] {
            let err = parse_workload_id("spiffe_id", agent, &td()).unwrap_err();
            assert!(err.to_string().contains("reserved for agent (node) IDs"), "{err}");
        }
        let err = parse_workload_id("spiffe_id", "spiffe://example.org/trustline/x", &td()).unwrap_err();
        assert!(err.to_string().contains("Trustline's own components"), "{err}");
    }

    #[test]
    fn agent_ids_live_under_the_reserved_agent_path() {
        let id = parse_agent_id("spiffe_id", "spiffe://example.org/trustline/agent/web-1", &td()).unwrap();
        assert!(is_agent_id(&id));
        assert!(is_agent_id(
            &parse_spiffe_id("x", &join_token_agent_id(&td(), "abc")).unwrap()
        ));
        assert!(is_agent_id(
            &parse_spiffe_id("x", &tpm_devid_agent_id(&td(), "00ff")).unwrap()
        ));
        let cases = [
            ("spiffe://example.org/trustline/ca", "reserved for the CA"),
            (
                "spiffe://example.org/node/web-1",
                "must be under spiffe://example.org/trustline/agent/",
            ),
            ("spiffe://example.org/trustline/agent", "must be under"),
            ("spiffe://example.org/trustline/agentx/a", "must be under"),
            ("spiffe://example.org/web", "must be under"),
            (
                "spiffe://other.org/trustline/agent/a",
                "not this CA's trust domain",
            ),
            (
                "spiffe://example.org/trustline/agent/join_token/abc",
                "derives from a join token",
            ),
            (
                "spiffe://example.org/trustline/agent/tpm_devid/00ff",
                "derives from a TPM DevID",
            ),
        ];
        for (input, want) in cases {
            let err = parse_agent_id("spiffe_id", input, &td()).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(want), "{input}: {msg}");
            assert!(msg.starts_with(&format!("spiffe_id {input:?}")), "{msg}");
        }
    }

    #[test]
    fn trust_domain_checks() {
        assert!(parse_trust_domain("trust_domain", "example.org").is_ok());
        assert!(parse_trust_domain("trust_domain", "spiffe://example.org").is_err());
        assert!(parse_trust_domain("trust_domain", "Example.org").is_err());
    }
}
