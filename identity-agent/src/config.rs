//! The agent's configuration file (TOML, unknown keys refused, relative paths relative to the file).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use trustline_identity::spiffe_id::{parse_trust_domain, TrustDomain};

/// The configuration could not be read or is invalid; messages name the file, field and value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// Unreadable file.
    #[error("config {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Syntax error, unknown key or wrong type.
    #[error("config {path}: {message}")]
    Parse {
        /// File.
        path: PathBuf,
        /// Parser message (with line and column).
        message: String,
    },
    /// A value is not allowed.
    #[error("config {path}: {field} = {value:?}: {reason}")]
    Invalid {
        /// File.
        path: PathBuf,
        /// Field.
        field: &'static str,
        /// Value.
        value: String,
        /// Why.
        reason: String,
    },
}

/// The agent configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Trust domain.
    pub trust_domain: String,
    /// The CA's agent API, `host:port`.
    pub ca_address: SocketAddr,
    /// Bootstrap trust bundle (PEM, from `trustline-ca bundle show`), used to verify the CA on first contact.
    pub trust_bundle: PathBuf,
    /// State folder: the agent's sealed SVID and key, and the default socket paths.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// SPIFFE Workload API socket. Default `<data_dir>/sockets/workload.sock`.
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// Local HTTP API socket. Default `<data_dir>/sockets/http.sock`.
    #[serde(default)]
    pub http_socket: Option<PathBuf>,
    /// Also serve the HTTP API on this loopback TCP address (callers identified via the kernel's socket tables;
    /// see docs). Off when absent; only loopback addresses are accepted.
    #[serde(default)]
    pub http_listen: Option<SocketAddr>,
    /// Health and metrics listener (`/healthz`, `/readyz`, `/metrics`); off when absent.
    #[serde(default)]
    pub health_listen: Option<SocketAddr>,
    /// A one-time join token for the first attestation (or `--join-token`, or `TRUSTLINE_JOIN_TOKEN`).
    #[serde(default)]
    pub join_token: Option<String>,
    /// Sealing secret for the agent's key at rest.
    #[serde(default)]
    pub keys: KeysConfig,
    /// SVID handling.
    #[serde(default)]
    pub svid: SvidConfig,
    /// Attest with a TPM-resident DevID key instead of a join token (and re-attest on its own whenever the stored
    /// agent SVID has expired).
    #[serde(default)]
    pub tpm_devid: Option<TpmDevIdConfig>,
    /// Workload attestation.
    #[serde(default)]
    pub attestation: AttestationConfig,
}

/// `[attestation]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttestationConfig {
    /// Largest caller binary hashed for the `unix:sha256` selector (bytes, default 256 MiB). A larger binary gets
    /// no `unix:sha256` selector (the agent logs why); its other selectors are unaffected.
    #[serde(default = "default_max_executable_bytes")]
    pub max_executable_bytes: u64,
}

impl Default for AttestationConfig {
    fn default() -> Self {
        Self {
            max_executable_bytes: default_max_executable_bytes(),
        }
    }
}

fn default_max_executable_bytes() -> u64 {
    crate::attest::DEFAULT_MAX_EXECUTABLE_BYTES
}

/// `[tpm_devid]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TpmDevIdConfig {
    /// The TCTI naming the TPM: `device:/dev/tpmrm0`, `tabrmd:`, `swtpm:host=127.0.0.1,port=2321`.
    pub tcti: String,
    /// File holding the DevID key's reference (`tpm:v1:…`, a TPM-wrapped blob) as written by
    /// `trustline-agent devid create`.
    pub key: PathBuf,
    /// The DevID certificate (PEM), followed by any intermediates up to the operator's DevID CA.
    pub certificate: PathBuf,
}

/// `[keys]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysConfig {
    /// 32-byte key file (mode 0600). Created on first start if missing.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Passphrase file (alternative to `key_file`).
    #[serde(default)]
    pub passphrase_file: Option<PathBuf>,
}

/// `[svid]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SvidConfig {
    /// Renew SVIDs once this fraction of their lifetime has passed (default 0.5).
    #[serde(default = "default_fraction")]
    pub rotate_fraction: f64,
    /// Most workload SVIDs held in memory (least recently used ones are dropped and re-minted on demand).
    #[serde(default = "default_cache_max")]
    pub cache_max: usize,
    /// SPIFFE IDs to mint at start, before any workload asks.
    #[serde(default)]
    pub prewarm: Vec<String>,
}

impl Default for SvidConfig {
    fn default() -> Self {
        Self {
            rotate_fraction: default_fraction(),
            cache_max: default_cache_max(),
            prewarm: Vec::new(),
        }
    }
}

fn default_data_dir() -> PathBuf {
    PathBuf::from(".trustline/agent")
}
fn default_fraction() -> f64 {
    0.5
}
fn default_cache_max() -> usize {
    1024
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Validated {
    /// Raw values (paths resolved).
    pub raw: Config,
    /// Trust domain.
    pub trust_domain: TrustDomain,
    /// Workload API socket.
    pub socket: PathBuf,
    /// HTTP API socket.
    pub http_socket: PathBuf,
}

impl Config {
    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Validated, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates text.
    pub fn parse(path: &Path, text: &str) -> Result<Validated, ConfigError> {
        let mut raw: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        let invalid = |field: &'static str, value: String, reason: String| ConfigError::Invalid {
            path: path.to_owned(),
            field,
            value,
            reason,
        };
        let trust_domain = parse_trust_domain("trust_domain", &raw.trust_domain)
            .map_err(|e| invalid("trust_domain", raw.trust_domain.clone(), e.reason))?;
        let f = raw.svid.rotate_fraction;
        if !(0.1..=0.9).contains(&f) {
            return Err(invalid(
                "svid.rotate_fraction",
                f.to_string(),
                "must be between 0.1 and 0.9".into(),
            ));
        }
        if let Some(a) = raw.http_listen {
            if !a.ip().is_loopback() {
                return Err(invalid(
                    "http_listen",
                    a.to_string(),
                    "must be a loopback address (127.0.0.0/8 or ::1)".into(),
                ));
            }
        }
        if let Some(t) = &raw.tpm_devid {
            if t.tcti.trim().is_empty() {
                return Err(invalid(
                    "tpm_devid.tcti",
                    t.tcti.clone(),
                    "must not be empty".into(),
                ));
            }
            if !trustline_hsm::TPM_SUPPORTED {
                return Err(invalid(
                    "tpm_devid",
                    t.tcti.clone(),
                    "this build has no TPM support: rebuild with --features trustline-hsm/tpm (needs libtss2-dev)"
                        .into(),
                ));
            }
        }
        if raw.svid.cache_max == 0 {
            return Err(invalid("svid.cache_max", "0".into(), "must be at least 1".into()));
        }
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
            *p = p.components().collect();
        };
        resolve(&mut raw.data_dir);
        resolve(&mut raw.trust_bundle);
        if let Some(t) = raw.tpm_devid.as_mut() {
            resolve(&mut t.key);
            resolve(&mut t.certificate);
        }
        for p in [
            raw.socket.as_mut(),
            raw.http_socket.as_mut(),
            raw.keys.key_file.as_mut(),
            raw.keys.passphrase_file.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            resolve(p);
        }
        let socket = raw
            .socket
            .clone()
            .unwrap_or_else(|| raw.data_dir.join("sockets/workload.sock"));
        let http_socket = raw
            .http_socket
            .clone()
            .unwrap_or_else(|| raw.data_dir.join("sockets/http.sock"));
        Ok(Validated {
            raw,
            trust_domain,
            socket,
            http_socket,
        })
    }
}

impl Validated {
    /// Renewal point of an SVID valid from `not_before` to `not_after` (unix seconds).
    pub fn renew_at(&self, not_before: i64, not_after: i64) -> i64 {
        not_before + (((not_after - not_before) as f64) * self.raw.svid.rotate_fraction) as i64
    }

    /// [`renew_at`](Self::renew_at) moved earlier by up to 10 % of the lifetime, spread by `seed`, so SVIDs issued
    /// together (a node restart, a CA rotation) are not all renewed in the same second, as SPIRE does.
    pub fn renew_at_jittered(&self, not_before: i64, not_after: i64, seed: &[u8]) -> i64 {
        let life = (not_after - not_before).max(0);
        let spread = life / 10;
        if spread == 0 {
            return self.renew_at(not_before, not_after);
        }
        let h = seed.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
        });
        self.renew_at(not_before, not_after) - (h % spread as u64) as i64
    }
}

/// Parses `90s`, `5m`, `1h` style durations.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_example_parses() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/agent.toml");
        let v = Config::load(&p).unwrap();
        assert_eq!(v.socket, PathBuf::from("/run/trustline/agent/workload.sock"));
        assert_eq!(v.raw.attestation.max_executable_bytes, 256 << 20);
    }

    #[test]
    fn parses_with_defaults_and_names_bad_fields() {
        let p = Path::new("/etc/trustline/agent.toml");
        let v = Config::parse(
            p,
            "trust_domain = \"example.org\"\nca_address = \"127.0.0.1:8081\"\ntrust_bundle = \"b.pem\"\n",
        )
        .unwrap();
        assert_eq!(v.raw.trust_bundle, PathBuf::from("/etc/trustline/b.pem"));
        assert_eq!(
            v.socket,
            PathBuf::from("/etc/trustline/.trustline/agent/sockets/workload.sock")
        );
        assert_eq!(v.renew_at(0, 100), 50);
        let j: Vec<i64> = (0..50u8).map(|i| v.renew_at_jittered(0, 1000, &[i])).collect();
        assert!(j.iter().all(|t| (400..=500).contains(t)), "{j:?}");
        assert!(
            j.iter().collect::<std::collections::HashSet<_>>().len() > 10,
            "spread out"
        );
        let err = Config::parse(p, "trust_domain = \"example.org\"\nca_address = \"127.0.0.1:8081\"\ntrust_bundle = \"b\"\nsokcet = \"x\"\n").unwrap_err();
        assert!(err.to_string().contains("sokcet"), "{err}");
        let err = Config::parse(
            p,
            "trust_domain = \"example.org\"\nca_address = \"127.0.0.1:8081\"\ntrust_bundle = \"b\"\n[svid]\nrotate_fraction = 2.0\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("svid.rotate_fraction"), "{err}");
        let err = Config::parse(
            p,
            "trust_domain = \"example.org\"\nca_address = \"nope\"\ntrust_bundle = \"b\"\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("ca_address"), "{err}");
        assert_eq!(
            v.raw.attestation.max_executable_bytes,
            crate::attest::DEFAULT_MAX_EXECUTABLE_BYTES
        );
        let v = Config::parse(
            p,
            "trust_domain = \"example.org\"\nca_address = \"127.0.0.1:8081\"\ntrust_bundle = \"b\"\n[attestation]\nmax_executable_bytes = 1048576\n",
        )
        .unwrap();
        assert_eq!(v.raw.attestation.max_executable_bytes, 1 << 20);
        let err = Config::parse(
            p,
            "trust_domain = \"example.org\"\nca_address = \"127.0.0.1:8081\"\ntrust_bundle = \"b\"\n[attestation]\nmax_executable_size = 1\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("max_executable_size"), "{err}");
    }
}
