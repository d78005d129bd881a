//! The CA's configuration file (TOML). Unknown keys are refused with their name; durations are written like
//! `90s`, `5m`, `1h`, `7d`; every default lives in a named function.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use trustline_hsm::KeyType;
use trustline_identity::spiffe_id::{parse_trust_domain, TrustDomain};

/// The configuration could not be read or is invalid. Messages name the file, field and value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// TOML syntax error, unknown key or wrong type (the message carries line and column).
    #[error("config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// A field has a value that is not allowed.
    #[error("config {path}: {field} = {value:?}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Dotted field name.
        field: &'static str,
        /// The value given.
        value: String,
        /// Why it is refused.
        reason: String,
    },
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The trust domain this CA issues for, e.g. `example.org`.
    pub trust_domain: String,
    /// Where the CA keeps its state (SQLite file, admin socket) unless told otherwise.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Listeners.
    #[serde(default)]
    pub server: ServerConfig,
    /// Durable store.
    #[serde(default)]
    pub store: StoreSection,
    /// Key custody.
    #[serde(default)]
    pub keys: KeysConfig,
    /// The CA's own certificates and rotation.
    #[serde(default)]
    pub ca: CaSection,
    /// SVID defaults.
    #[serde(default)]
    pub svid: SvidConfig,
    /// How nodes may attest besides join tokens.
    #[serde(default)]
    pub node_attestation: NodeAttestationConfig,
}

/// `[node_attestation]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeAttestationConfig {
    /// `[node_attestation.tpm_devid]`: accept nodes that prove possession of a TPM-resident DevID key.
    #[serde(default)]
    pub tpm_devid: Option<TpmDevIdSection>,
}

/// `[node_attestation.tpm_devid]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TpmDevIdSection {
    /// PEM file with the certificate(s) of the CA(s) that issue the nodes' DevID certificates.
    pub devid_ca: PathBuf,
}

/// `[server]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Agent API (mutual TLS gRPC) listen address.
    #[serde(default = "default_agent_listen")]
    pub agent_listen: SocketAddr,
    /// Admin API Unix socket. Default: `<data_dir>/admin.sock`.
    #[serde(default)]
    pub admin_socket: Option<PathBuf>,
    /// Extra uids admitted on the admin socket (the CA's own uid always is).
    #[serde(default)]
    pub admin_uids: Vec<u32>,
    /// Health and Prometheus metrics HTTP listener (`/healthz`, `/readyz`, `/metrics`). Off when absent.
    #[serde(default)]
    pub health_listen: Option<SocketAddr>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            agent_listen: default_agent_listen(),
            admin_socket: None,
            admin_uids: Vec::new(),
            health_listen: None,
        }
    }
}

/// `[store]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "lowercase")]
pub enum StoreSection {
    /// Embedded SQLite file (default `<data_dir>/ca.db`).
    Sqlite {
        /// File path.
        #[serde(default)]
        path: Option<PathBuf>,
    },
    /// PostgreSQL, for several CA replicas on one database.
    Postgres {
        /// libpq-style connection string without the password, e.g. `host=db user=trustline dbname=trustline`.
        conninfo: String,
        /// File holding the password (never put it in this file).
        #[serde(default)]
        password_file: Option<PathBuf>,
        /// CA certificate(s) (PEM) of the server: connect over TLS 1.3 and verify the server and the host name.
        /// Add `sslmode=require` to the conninfo to refuse a server without TLS.
        #[serde(default)]
        tls_ca_file: Option<PathBuf>,
    },
}

impl Default for StoreSection {
    fn default() -> Self {
        StoreSection::Sqlite { path: None }
    }
}

/// `[keys]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysConfig {
    /// Key backend: `software` (keys encrypted at rest in the store), `pkcs11` (keys inside a token), `tpm`
    /// (keys inside a TPM 2.0; builds with the `trustline-hsm/tpm` feature) or `sm2` (an SM-mode trust domain:
    /// SM2/SM3 certificates, keys sealed with SM4-GCM; builds with the `trustline-hsm/sm` feature).
    #[serde(default = "default_backend")]
    pub backend: String,
    /// `[keys.tpm]`: the TPM, for `backend = "tpm"`.
    #[serde(default)]
    pub tpm: Option<TpmSection>,
    /// `[keys.pkcs11]`: the token, for `backend = "pkcs11"`.
    #[serde(default)]
    pub pkcs11: Option<Pkcs11Section>,
    /// Key type of the X.509 CA key: ec-p256 (default), ec-p384, ed25519, rsa-2048, rsa-3072, rsa-4096.
    #[serde(default = "default_key_type")]
    pub x509_key_type: String,
    /// Key type of the JWT signing key: ec-p256 (default, ES256), ec-p384 (ES384), rsa-* (RS256 or PS256).
    #[serde(default = "default_key_type")]
    pub jwt_key_type: String,
    /// For RSA JWT keys: `pkcs1` (RS256, default) or `pss` (PS256).
    #[serde(default = "default_rsa_padding")]
    pub jwt_rsa_padding: String,
    /// File with the passphrase that seals software keys (first line). Or set `TRUSTLINE_CA_PASSPHRASE`.
    #[serde(default)]
    pub passphrase_file: Option<PathBuf>,
    /// File with a 32-byte sealing key (raw or 64 hex digits, mode 0600). Alternative to a passphrase.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

impl Default for KeysConfig {
    fn default() -> Self {
        Self {
            backend: default_backend(),
            x509_key_type: default_key_type(),
            jwt_key_type: default_key_type(),
            jwt_rsa_padding: default_rsa_padding(),
            passphrase_file: None,
            key_file: None,
            pkcs11: None,
            tpm: None,
        }
    }
}

/// `[keys.tpm]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TpmSection {
    /// The TCTI naming the TPM: `device:/dev/tpmrm0` (the kernel's resource manager), `tabrmd:`, or
    /// `swtpm:host=127.0.0.1,port=2321`.
    pub tcti: String,
}

/// `[keys.pkcs11]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Section {
    /// The PKCS#11 module (shared library), e.g. `/usr/lib/softhsm/libsofthsm2.so`.
    pub module: PathBuf,
    /// Label of the token holding the CA keys.
    pub token_label: String,
    /// File whose first line is the user PIN (mode 0600).
    #[serde(default)]
    pub pin_file: Option<PathBuf>,
    /// Or: the name of an environment variable holding the PIN.
    #[serde(default)]
    pub pin_env: Option<String>,
    /// Use this existing key pair in the token (by `CKA_LABEL`) as the first X.509 CA key instead of generating
    /// one; later rotations generate new keys in the token.
    #[serde(default)]
    pub x509_key_label: Option<String>,
    /// The same for the first JWT signing key.
    #[serde(default)]
    pub jwt_key_label: Option<String>,
}

/// `[ca]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaSection {
    /// Lifetime of each CA certificate / JWT key (default 24h). Rotation follows SPIRE's phases.
    #[serde(default = "default_ca_ttl", deserialize_with = "de_duration")]
    pub ttl: Duration,
    /// Organization in the CA certificate subject.
    #[serde(default = "default_org")]
    pub organization: String,
    /// Intermediate mode: the upstream CA certificate (PEM) that signs this CA's certificates.
    #[serde(default)]
    pub upstream_cert: Option<PathBuf>,
    /// Intermediate mode: the upstream CA private key (PEM, PKCS#8 or SEC1).
    #[serde(default)]
    pub upstream_key: Option<PathBuf>,
    /// Intermediate mode: the roots to publish in the bundle (PEM). Default: `upstream_cert`.
    #[serde(default)]
    pub upstream_bundle: Option<PathBuf>,
}

impl Default for CaSection {
    fn default() -> Self {
        Self {
            ttl: default_ca_ttl(),
            organization: default_org(),
            upstream_cert: None,
            upstream_key: None,
            upstream_bundle: None,
        }
    }
}

/// `[svid]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SvidConfig {
    /// Default X.509-SVID lifetime (1h).
    #[serde(default = "default_x509_ttl", deserialize_with = "de_duration")]
    pub x509_ttl: Duration,
    /// Default JWT-SVID lifetime (5m).
    #[serde(default = "default_jwt_ttl", deserialize_with = "de_duration")]
    pub jwt_ttl: Duration,
    /// Lifetime of agent X.509-SVIDs (1h).
    #[serde(default = "default_x509_ttl", deserialize_with = "de_duration")]
    pub agent_ttl: Duration,
    /// Default join token lifetime (10m).
    #[serde(default = "default_token_ttl", deserialize_with = "de_duration")]
    pub join_token_ttl: Duration,
}

impl Default for SvidConfig {
    fn default() -> Self {
        Self {
            x509_ttl: default_x509_ttl(),
            jwt_ttl: default_jwt_ttl(),
            agent_ttl: default_x509_ttl(),
            join_token_ttl: default_token_ttl(),
        }
    }
}

fn default_data_dir() -> PathBuf {
    PathBuf::from(".trustline/ca")
}
fn default_agent_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8081))
}
fn default_backend() -> String {
    "software".into()
}
fn default_key_type() -> String {
    "ec-p256".into()
}
fn default_rsa_padding() -> String {
    "pkcs1".into()
}
fn default_ca_ttl() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_org() -> String {
    "Trustline".into()
}
fn default_x509_ttl() -> Duration {
    Duration::from_secs(3600)
}
fn default_jwt_ttl() -> Duration {
    Duration::from_secs(300)
}
fn default_token_ttl() -> Duration {
    Duration::from_secs(600)
}

/// Parses `90s`, `5m`, `1h`, `7d`, `1h30m` (humantime syntax).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("{e} (write durations like 90s, 5m, 1h, 7d)"))
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    let v = parse_duration(&s).map_err(|e| serde::de::Error::custom(format!("{s:?}: {e}")))?;
    if v.is_zero() {
        return Err(serde::de::Error::custom(format!(
            "{s:?}: must be longer than zero"
        )));
    }
    Ok(v)
}

/// A validated configuration with derived values.
#[derive(Debug, Clone)]
pub struct Validated {
    /// The raw configuration.
    pub raw: Config,
    /// The parsed trust domain.
    pub trust_domain: TrustDomain,
    /// X.509 CA key type.
    pub x509_key_type: KeyType,
    /// JWT key type.
    pub jwt_key_type: KeyType,
    /// Use RSA-PSS for RSA JWT keys.
    pub jwt_rsa_pss: bool,
    /// Admin socket path.
    pub admin_socket: PathBuf,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Validated, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates config text; `path` is used in messages and to resolve relative paths.
    pub fn parse(path: &Path, text: &str) -> Result<Validated, ConfigError> {
        let mut raw: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        let invalid = |field: &'static str, value: &str, reason: String| ConfigError::Invalid {
            path: path.to_owned(),
            field,
            value: value.to_owned(),
            reason,
        };
        // Device backends hold EC keys only.
        let ec_only = |keys: &KeysConfig, device: &str| -> Result<(), ConfigError> {
            for (field, v) in [
                ("keys.x509_key_type", &keys.x509_key_type),
                ("keys.jwt_key_type", &keys.jwt_key_type),
            ] {
                if v != "ec-p256" && v != "ec-p384" {
                    return Err(invalid(
                        field,
                        v,
                        format!("{device} keys here are ec-p256 or ec-p384"),
                    ));
                }
            }
            Ok(())
        };
        let trust_domain = parse_trust_domain("trust_domain", &raw.trust_domain)
            .map_err(|e| invalid("trust_domain", &raw.trust_domain, e.reason))?;
        match raw.keys.backend.as_str() {
            "software" => {}
            "sm2" => {
                if !trustline_hsm::SM_SUPPORTED {
                    return Err(invalid(
                        "keys.backend",
                        "sm2",
                        "this build has no national algorithms: rebuild with --features trustline-hsm/sm (needs libssl-dev)"
                            .into(),
                    ));
                }
                if !matches!(raw.keys.x509_key_type.as_str(), "sm2" | "ec-p256") {
                    return Err(invalid(
                        "keys.x509_key_type",
                        &raw.keys.x509_key_type,
                        "with backend = \"sm2\" the X.509 CA key is SM2 (leave it unset or set \"sm2\")"
                            .into(),
                    ));
                }
                if raw.ca.upstream_cert.is_some() {
                    return Err(invalid(
                        "ca.upstream_cert",
                        "",
                        "an SM2 CA is a self-signed root here (intermediate mode is not offered with backend = \"sm2\")"
                            .into(),
                    ));
                }
            }
            "pkcs11" => {
                let Some(p) = &raw.keys.pkcs11 else {
                    return Err(invalid(
                        "keys.pkcs11",
                        "",
                        "backend = \"pkcs11\" needs a [keys.pkcs11] table (module, token_label, pin_file or pin_env)".into(),
                    ));
                };
                if p.token_label.trim().is_empty() {
                    return Err(invalid(
                        "keys.pkcs11.token_label",
                        &p.token_label,
                        "must not be empty".into(),
                    ));
                }
                for (field, label) in [
                    ("keys.pkcs11.x509_key_label", &p.x509_key_label),
                    ("keys.pkcs11.jwt_key_label", &p.jwt_key_label),
                ] {
                    if label.as_deref().is_some_and(|l| l.trim().is_empty()) {
                        return Err(invalid(field, "", "must not be empty (or leave it out)".into()));
                    }
                }
                if p.pin_file.is_some() == p.pin_env.is_some() {
                    return Err(invalid(
                        "keys.pkcs11.pin_file",
                        "",
                        "set exactly one of pin_file or pin_env (the PIN is never taken from the command line)".into(),
                    ));
                }
                for (field, v) in [
                    ("keys.x509_key_type", &raw.keys.x509_key_type),
                    ("keys.jwt_key_type", &raw.keys.jwt_key_type),
                ] {
                    if v == "ed25519" {
                        return Err(invalid(
                            field,
                            v,
                            "PKCS#11 keys here are ec-p256, ec-p384 or rsa-2048/3072/4096".into(),
                        ));
                    }
                }
            }
            "tpm" => {
                let Some(t) = &raw.keys.tpm else {
                    return Err(invalid(
                        "keys.tpm",
                        "",
                        "backend = \"tpm\" needs a [keys.tpm] table with tcti (e.g. \"device:/dev/tpmrm0\")"
                            .into(),
                    ));
                };
                if t.tcti.trim().is_empty() {
                    return Err(invalid("keys.tpm.tcti", &t.tcti, "must not be empty".into()));
                }
                if !trustline_hsm::TPM_SUPPORTED {
                    return Err(invalid(
                        "keys.backend",
                        "tpm",
                        "this build has no TPM support: rebuild with --features trustline-hsm/tpm (needs libtss2-dev)"
                            .into(),
                    ));
                }
                ec_only(&raw.keys, "TPM")?;
            }
            other => {
                return Err(invalid(
                    "keys.backend",
                    other,
                    "unsupported backend (known: software, pkcs11, tpm, sm2)".into(),
                ))
            }
        }
        let x509_key_type: KeyType =
            raw.keys
                .x509_key_type
                .parse()
                .map_err(|e: trustline_hsm::HsmError| {
                    invalid("keys.x509_key_type", &raw.keys.x509_key_type, e.to_string())
                })?;
        let x509_key_type = if raw.keys.backend == "sm2" {
            KeyType::Sm2
        } else if x509_key_type == KeyType::Sm2 {
            return Err(invalid(
                "keys.x509_key_type",
                "sm2",
                "SM2 CA keys come with keys.backend = \"sm2\" (an SM-mode trust domain)".into(),
            ));
        } else {
            x509_key_type
        };
        let jwt_key_type: KeyType = raw
            .keys
            .jwt_key_type
            .parse()
            .map_err(|e: trustline_hsm::HsmError| {
                invalid("keys.jwt_key_type", &raw.keys.jwt_key_type, e.to_string())
            })?;
        if jwt_key_type == KeyType::Sm2 && raw.keys.backend != "sm2" {
            return Err(invalid(
                "keys.jwt_key_type",
                &raw.keys.jwt_key_type,
                "the SM2 JWT profile (alg SM2SM3, an extension) exists only in SM-mode trust domains (keys.backend = \"sm2\")"
                    .into(),
            ));
        }
        if jwt_key_type == KeyType::Ed25519 {
            return Err(invalid(
                "keys.jwt_key_type",
                &raw.keys.jwt_key_type,
                "JWT-SVIDs allow only ES256/ES384/RS256/PS256 keys: use ec-p256, ec-p384 or rsa-*".into(),
            ));
        }
        let jwt_rsa_pss = match raw.keys.jwt_rsa_padding.as_str() {
            "pkcs1" => false,
            "pss" => true,
            other => {
                return Err(invalid(
                    "keys.jwt_rsa_padding",
                    other,
                    "must be pkcs1 or pss".into(),
                ))
            }
        };
        if raw.keys.passphrase_file.is_some() && raw.keys.key_file.is_some() {
            return Err(invalid(
                "keys.key_file",
                &raw.keys
                    .key_file
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                "set either keys.passphrase_file or keys.key_file, not both".into(),
            ));
        }
        if raw.ca.upstream_cert.is_some() != raw.ca.upstream_key.is_some() {
            return Err(invalid(
                "ca.upstream_cert",
                &raw.ca
                    .upstream_cert
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                "intermediate mode needs both ca.upstream_cert and ca.upstream_key".into(),
            ));
        }
        if raw.svid.x509_ttl > raw.ca.ttl {
            return Err(invalid(
                "svid.x509_ttl",
                &humantime::format_duration(raw.svid.x509_ttl).to_string(),
                format!(
                    "must not exceed ca.ttl ({})",
                    humantime::format_duration(raw.ca.ttl)
                ),
            ));
        }
        // Relative paths are relative to the config file's folder.
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
            // Drop `.` components so messages show clean paths.
            *p = p.components().collect();
        };
        resolve(&mut raw.data_dir);
        for p in [
            raw.server.admin_socket.as_mut(),
            raw.keys.passphrase_file.as_mut(),
            raw.keys.key_file.as_mut(),
            raw.keys.pkcs11.as_mut().and_then(|p| p.pin_file.as_mut()),
            raw.ca.upstream_cert.as_mut(),
            raw.ca.upstream_key.as_mut(),
            raw.ca.upstream_bundle.as_mut(),
            raw.node_attestation.tpm_devid.as_mut().map(|t| &mut t.devid_ca),
        ]
        .into_iter()
        .flatten()
        {
            resolve(p);
        }
        match &mut raw.store {
            StoreSection::Sqlite { path: Some(p) } => resolve(p),
            StoreSection::Postgres {
                password_file,
                tls_ca_file,
                ..
            } => {
                for p in [password_file.as_mut(), tls_ca_file.as_mut()]
                    .into_iter()
                    .flatten()
                {
                    resolve(p);
                }
            }
            StoreSection::Sqlite { path: None } => {}
        }
        let admin_socket = raw
            .server
            .admin_socket
            .clone()
            .unwrap_or_else(|| raw.data_dir.join("admin.sock"));
        Ok(Validated {
            trust_domain,
            x509_key_type,
            jwt_key_type,
            jwt_rsa_pss,
            admin_socket,
            raw,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Validated, ConfigError> {
        Config::parse(Path::new("/etc/trustline/ca.toml"), text)
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let v = parse("trust_domain = \"example.org\"\n").unwrap();
        assert_eq!(v.raw.svid.x509_ttl, Duration::from_secs(3600));
        assert_eq!(v.raw.svid.jwt_ttl, Duration::from_secs(300));
        assert_eq!(v.raw.ca.ttl, Duration::from_secs(86400));
        assert_eq!(v.x509_key_type, KeyType::EcP256);
        assert_eq!(v.raw.data_dir, PathBuf::from("/etc/trustline/.trustline/ca"));
        assert_eq!(
            v.admin_socket,
            PathBuf::from("/etc/trustline/.trustline/ca/admin.sock")
        );
    }

    #[test]
    fn misspelled_key_is_named() {
        let err = parse("trust_domain = \"example.org\"\n[svid]\nx509_tll = \"1h\"\n").unwrap_err();
        assert!(err.to_string().contains("x509_tll"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        let err = parse("trust_domain = \"Example.org\"\n").unwrap_err();
        assert!(err.to_string().contains("trust_domain"), "{err}");
        let err = parse("trust_domain = \"example.org\"\n[svid]\nx509_ttl = \"soon\"\n").unwrap_err();
        assert!(err.to_string().contains("soon"), "{err}");
        let err = parse("trust_domain = \"example.org\"\n[keys]\njwt_key_type = \"ed25519\"\n").unwrap_err();
        assert!(err.to_string().contains("keys.jwt_key_type"), "{err}");
        let err = parse("trust_domain = \"example.org\"\n[keys]\nx509_key_type = \"dsa\"\n").unwrap_err();
        assert!(err.to_string().contains("keys.x509_key_type"), "{err}");
        let err = parse("trust_domain = \"example.org\"\n[svid]\nx509_ttl = \"48h\"\n").unwrap_err();
        assert!(err.to_string().contains("must not exceed ca.ttl"), "{err}");
    }

    #[test]
    fn device_backends_are_validated_by_field() {
        let err = parse("trust_domain = \"example.org\"\n[keys]\nbackend = \"tpm\"\n").unwrap_err();
        assert!(err.to_string().contains("keys.tpm"), "{err}");
        let err =
            parse("trust_domain = \"example.org\"\n[keys]\nbackend = \"tpm\"\n[keys.tpm]\ntcti = \"\"\n")
                .unwrap_err();
        assert!(err.to_string().contains("keys.tpm.tcti"), "{err}");
        let tpm = "trust_domain = \"example.org\"\n[keys]\nbackend = \"tpm\"\nx509_key_type = \"rsa-2048\"\n[keys.tpm]\ntcti = \"device:/dev/tpmrm0\"\n";
        let err = parse(tpm).unwrap_err().to_string();
        if trustline_hsm::TPM_SUPPORTED {
            assert!(err.contains("keys.x509_key_type") && err.contains("TPM"), "{err}");
        } else {
            assert!(
                err.contains("keys.backend") && err.contains("--features trustline-hsm/tpm"),
                "{err}"
            );
        }
        let err = parse("trust_domain = \"example.org\"\n[keys]\nbackend = \"pkcs11\"\n").unwrap_err();
        assert!(err.to_string().contains("keys.pkcs11"), "{err}");
        let p11 = "trust_domain = \"example.org\"\n[keys]\nbackend = \"pkcs11\"\nx509_key_type = \"KT\"\n[keys.pkcs11]\nmodule = \"/usr/lib/softhsm/libsofthsm2.so\"\ntoken_label = \"ca\"\npin_env = \"PIN\"\n";
        assert!(parse(&p11.replace("KT", "rsa-3072")).is_ok());
        let err = parse("trust_domain = \"example.org\"\n[keys]\njwt_key_type = \"sm2\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("keys.jwt_key_type") && err.contains("SM-mode"),
            "{err}"
        );
        let err = parse(&p11.replace("KT", "ed25519")).unwrap_err().to_string();
        assert!(
            err.contains("keys.x509_key_type") && err.contains("ed25519"),
            "{err}"
        );
        let err = parse("trust_domain = \"example.org\"\n[keys]\nbackend = \"yubikey\"\n").unwrap_err();
        assert!(
            err.to_string().contains("keys.backend") && err.to_string().contains("yubikey"),
            "{err}"
        );
    }

    #[test]
    fn postgres_store_parses() {
        let v = parse(
            "trust_domain = \"example.org\"\n[store]\nkind = \"postgres\"\nconninfo = \"host=127.0.0.1 user=tl\"\n",
        )
        .unwrap();
        assert!(matches!(v.raw.store, StoreSection::Postgres { .. }));
    }

    #[test]
    fn shipped_example_configs_parse() {
        for f in ["../docs/examples/ca.toml", "../docs/examples/ca-postgres.toml"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(f);
            Config::load(&path).unwrap_or_else(|e| panic!("{f}: {e}"));
        }
    }
}
