//! The sidecar's configuration file (TOML, unknown keys refused, relative paths relative to the file).
//!
//! ```toml
//! workload_api_socket = "/run/trustline/agent/workload.sock"
//! policy_dir = "/etc/trustline/policies"
//! metrics_listen = "127.0.0.1:15090"
//!
//! [[inbound]]                 # mutual TLS from other sidecars -> plaintext to the local app
//! listen = "0.0.0.0:15443"
//! app = "127.0.0.1:8080"
//!
//! [[outbound]]                # plaintext from the local app -> mutual TLS to upstreams, routed by Host
//! listen = "127.0.0.1:15001"
//! [[outbound.route]]
//! host = "payments"
//! upstream = "payments.internal:15443"
//! spiffe_ids = ["spiffe://example.org/payments"]
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use crate::canon::PathMode;
use trustline_identity::spiffe_id::SpiffeId;

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
        /// Field (with its table, e.g. `outbound[0].route[1].upstream`).
        field: String,
        /// Value.
        value: String,
        /// Why.
        reason: String,
    },
}

/// What a listener carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1, HTTP/2 and gRPC: every request is authorized (method, path, headers, JWT-SVID).
    #[default]
    Http,
    /// Opaque TCP: only the peer's SPIFFE ID is authorized, once per connection.
    Tcp,
}

/// The sidecar configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The identity agent's SPIFFE Workload API socket.
    pub workload_api_socket: PathBuf,
    /// Folder of authorization policy files (`*.yaml`). Absent: every authenticated peer is allowed.
    #[serde(default)]
    pub policy_dir: Option<PathBuf>,
    /// How often the policy folder is checked for changes (also on SIGHUP). Default `1s`.
    #[serde(default = "default_reload", deserialize_with = "de_duration")]
    pub policy_reload_interval: Duration,
    /// `/metrics` (Prometheus) and `/healthz` on this loopback address; off when absent.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// Mutual-TLS listeners for traffic to the local app.
    #[serde(default)]
    pub inbound: Vec<Inbound>,
    /// Plaintext loopback listeners for traffic from the local app.
    #[serde(default)]
    pub outbound: Vec<Outbound>,
    /// Size limits and timeouts.
    #[serde(default)]
    pub limits: Limits,
    /// Caller-chain bounds.
    #[serde(default)]
    pub chain: ChainConfig,
    /// The accountability log; off when absent.
    #[serde(default)]
    pub log: Option<LogConfig>,
    /// Runtime worker threads that serve connections; absent: one per CPU core (the default).
    #[serde(default)]
    pub worker_threads: Option<usize>,
}

/// `[chain]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainConfig {
    /// Most hops accepted (default 16).
    #[serde(default = "default_max_hops")]
    pub max_hops: usize,
    /// Largest header (bytes, default 32768).
    #[serde(default = "default_chain_bytes")]
    pub max_bytes: usize,
    /// Oldest hop accepted: older chains are refused as replays (default 60s).
    #[serde(default = "default_chain_age", deserialize_with = "de_duration")]
    pub max_age: Duration,
    /// Also verify the signature of the hop the mTLS peer itself added (default false: the connection already
    /// authenticates the peer; services further down the chain verify that signature as an earlier hop).
    #[serde(default)]
    pub verify_peer_signature: bool,
    /// Sign the hops of requests that arrive together under one signature (a Merkle tree, each hop with its
    /// inclusion proof; default true). Sidecars before this option refuse such hops: set false while a mesh
    /// still runs them.
    #[serde(default = "yes")]
    pub batch_signatures: bool,
}

impl Default for ChainConfig {
    fn default() -> Self {
        Self {
            max_hops: default_max_hops(),
            max_bytes: default_chain_bytes(),
            max_age: default_chain_age(),
            verify_peer_signature: false,
            batch_signatures: true,
        }
    }
}

fn default_max_hops() -> usize {
    16
}
fn default_chain_bytes() -> usize {
    32 * 1024
}
fn default_chain_age() -> Duration {
    Duration::from_secs(60)
}

/// What to do when the log cannot take a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// Refuse requests with 503 while records cannot be written.
    Closed,
    /// Serve, count `trustline_sidecar_log_records_total{result="refused"}` and log an ALARM line.
    Open,
}

/// `[log]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Folder of segment files (created).
    pub dir: PathBuf,
    /// `batch` (fsync per group commit, default), an interval such as `10ms`, or `never`.
    #[serde(default = "default_fsync")]
    pub fsync: String,
    /// Segment size before a new file starts (default 64 MiB).
    #[serde(default = "default_segment")]
    pub segment_bytes: u64,
    /// Sign a checkpoint at least this often (default 10s) ...
    #[serde(default = "default_cp_interval", deserialize_with = "de_duration")]
    pub checkpoint_interval: Duration,
    /// ... or after this many records (default 10000).
    #[serde(default = "default_cp_records")]
    pub checkpoint_records: u64,
    /// Bounded queue between requests and the writer (default 65536).
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// `closed` (default: refuse requests while the log fails) or `open` (serve and alarm).
    #[serde(default = "default_on_failure")]
    pub on_failure: OnFailure,
    /// Hold each response until its record is on disk (default false: records are queued).
    #[serde(default)]
    pub durable: bool,
    /// Encrypt request records at rest with SM4-GCM under this key file (16 raw bytes or 32 hex digits, mode
    /// 0600). Hash links and checkpoints stay verifiable without it; `trustline-audit trace/query --log-key`
    /// reads the records. Needs a build with `--features trustline-hsm/sm`.
    #[serde(default)]
    pub encryption_key_file: Option<PathBuf>,
}

fn default_fsync() -> String {
    "batch".into()
}
fn default_segment() -> u64 {
    64 << 20
}
fn default_cp_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_cp_records() -> u64 {
    10_000
}
fn default_queue() -> usize {
    65_536
}
fn default_on_failure() -> OnFailure {
    OnFailure::Closed
}

impl LogConfig {
    /// The writer settings.
    pub fn writer(&self) -> Result<trustline_audit::LogConfig, String> {
        let fsync = match self.fsync.trim() {
            "batch" => trustline_audit::Fsync::Batch,
            "never" => trustline_audit::Fsync::Never,
            other => trustline_audit::Fsync::Interval(
                humantime::parse_duration(other)
                    .map_err(|e| format!("expected batch, never or a duration: {e}"))?,
            ),
        };
        let mut c = trustline_audit::LogConfig::new(self.dir.clone());
        c.fsync = fsync;
        c.segment_bytes = self.segment_bytes;
        c.checkpoint_interval = self.checkpoint_interval;
        c.checkpoint_records = self.checkpoint_records.max(1);
        c.queue = self.queue.max(1);
        if let Some(p) = &self.encryption_key_file {
            c.encryption = Some(trustline_audit::format::LogKey::from_file(p).map_err(|e| e.to_string())?);
        }
        Ok(c)
    }
}

/// `[[inbound]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inbound {
    /// Where other sidecars connect (mutual TLS).
    pub listen: SocketAddr,
    /// The local app (plaintext, loopback).
    pub app: SocketAddr,
    /// `http` (default) or `tcp`.
    #[serde(default)]
    pub protocol: Protocol,
    /// Validate a JWT-SVID sent in `Authorization: Bearer` (HTTP only).
    #[serde(default)]
    pub jwt: Option<JwtAuth>,
    /// What to do with a request path that is not canonical: `normalize` (default), `reject` (400) or `none`
    /// (unsafe: policy and the app may read the path differently). See docs/policy.md.
    #[serde(default)]
    pub path_normalization: PathMode,
}

/// `[inbound.jwt]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtAuth {
    /// The audience a token must carry.
    pub audience: String,
    /// Refuse requests without a token (401). Default true; with false, a request without a token passes on to
    /// policy with no claims, but a bad token is still refused.
    #[serde(default = "yes")]
    pub required: bool,
    /// Accepted algorithms (default: all JWT-SVID ones: ES256, ES384, RS256, RS384, RS512, PS256, PS384, PS512).
    #[serde(default)]
    pub algorithms: Vec<String>,
}

/// `[[outbound]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outbound {
    /// Where the local app connects (plaintext; loopback only).
    pub listen: SocketAddr,
    /// `http` (default: route by Host / `:authority`) or `tcp` (every connection goes to `upstream`).
    #[serde(default)]
    pub protocol: Protocol,
    /// HTTP routes, matched on the request's host (port ignored).
    #[serde(default)]
    pub route: Vec<Route>,
    /// TCP mode: the upstream sidecar, `host:port`.
    #[serde(default)]
    pub upstream: Option<String>,
    /// TCP mode: SPIFFE IDs the upstream may present.
    #[serde(default)]
    pub spiffe_ids: Vec<String>,
    /// As for `[[inbound]]`: the path the caller chain's hop, the log and the upstream see.
    #[serde(default)]
    pub path_normalization: PathMode,
}

/// `[[outbound.route]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Host the app calls (`payments`, `payments.default.svc`); `*` matches any host.
    pub host: String,
    /// The upstream sidecar's inbound listener, `host:port`.
    pub upstream: String,
    /// SPIFFE IDs the upstream may present (at least one).
    pub spiffe_ids: Vec<String>,
}

/// `[limits]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Most open connections per listener; later ones wait in the accept queue.
    #[serde(default = "default_max_conns")]
    pub max_connections: usize,
    /// Largest request header block (bytes); larger ones get 431.
    #[serde(default = "default_max_header")]
    pub max_header_bytes: usize,
    /// Largest request body (bytes); 0 = no limit. Larger ones get 413 (or are cut when streaming).
    #[serde(default)]
    pub max_body_bytes: u64,
    /// Time for an upstream or the app to answer with response headers (504 after).
    #[serde(default = "default_request_timeout", deserialize_with = "de_duration")]
    pub request_timeout: Duration,
    /// Time to open a TCP connection to an upstream or the app (502 after).
    #[serde(default = "default_connect_timeout", deserialize_with = "de_duration")]
    pub connect_timeout: Duration,
    /// Time for a TLS handshake.
    #[serde(default = "default_connect_timeout", deserialize_with = "de_duration")]
    pub handshake_timeout: Duration,
    /// An idle pooled or client connection is closed after this.
    #[serde(default = "default_idle_timeout", deserialize_with = "de_duration")]
    pub idle_timeout: Duration,
    /// On SIGTERM, in-flight requests get this long to finish.
    #[serde(default = "default_drain_timeout", deserialize_with = "de_duration")]
    pub drain_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: default_max_conns(),
            max_header_bytes: default_max_header(),
            max_body_bytes: 0,
            request_timeout: default_request_timeout(),
            connect_timeout: default_connect_timeout(),
            handshake_timeout: default_connect_timeout(),
            idle_timeout: default_idle_timeout(),
            drain_timeout: default_drain_timeout(),
        }
    }
}

fn yes() -> bool {
    true
}
fn default_reload() -> Duration {
    Duration::from_secs(1)
}
fn default_max_conns() -> usize {
    10_000
}
fn default_max_header() -> usize {
    64 * 1024
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(90)
}
fn default_drain_timeout() -> Duration {
    Duration::from_secs(15)
}

fn de_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(s.trim()).map_err(|e| serde::de::Error::custom(format!("{s:?}: {e}")))
}

/// JWT-SVID algorithms a sidecar may accept.
pub const JWT_ALGORITHMS: &[&str] = &[
    "ES256", "ES384", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
];

/// A validated route.
#[derive(Debug, Clone)]
pub struct ValidRoute {
    /// Host pattern (lowercase; `*` = any).
    pub host: String,
    /// `host:port` of the upstream.
    pub upstream: String,
    /// Expected SPIFFE IDs.
    pub spiffe_ids: Vec<SpiffeId>,
}

impl Config {
    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<(Self, Vec<Vec<ValidRoute>>), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates text; also returns each outbound listener's routes (TCP listeners: one route).
    pub fn parse(path: &Path, text: &str) -> Result<(Self, Vec<Vec<ValidRoute>>), ConfigError> {
        let mut raw: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        let invalid = |field: String, value: String, reason: &str| ConfigError::Invalid {
            path: path.to_owned(),
            field,
            value,
            reason: reason.to_owned(),
        };
        if raw.inbound.is_empty() && raw.outbound.is_empty() {
            return Err(invalid(
                "inbound, outbound".into(),
                String::new(),
                "configure at least one [[inbound]] or [[outbound]] listener",
            ));
        }
        if let Some(a) = raw.metrics_listen {
            if !a.ip().is_loopback() {
                return Err(invalid(
                    "metrics_listen".into(),
                    a.to_string(),
                    "must be a loopback address (127.0.0.0/8 or ::1)",
                ));
            }
        }
        if raw.worker_threads == Some(0) {
            return Err(invalid("worker_threads".into(), "0".into(), "must be at least 1"));
        }
        if raw.limits.max_connections == 0 {
            return Err(invalid(
                "limits.max_connections".into(),
                "0".into(),
                "must be at least 1",
            ));
        }
        if raw.limits.max_header_bytes < 1024 {
            return Err(invalid(
                "limits.max_header_bytes".into(),
                raw.limits.max_header_bytes.to_string(),
                "must be at least 1024",
            ));
        }
        for (i, ib) in raw.inbound.iter().enumerate() {
            if !ib.app.ip().is_loopback() {
                return Err(invalid(
                    format!("inbound[{i}].app"),
                    ib.app.to_string(),
                    "the app must be on loopback (traffic to it is plaintext)",
                ));
            }
            if let Some(j) = &ib.jwt {
                if ib.protocol == Protocol::Tcp {
                    return Err(invalid(
                        format!("inbound[{i}].jwt"),
                        "tcp".into(),
                        "JWT-SVID authentication needs protocol = \"http\"",
                    ));
                }
                if j.audience.trim().is_empty() {
                    return Err(invalid(
                        format!("inbound[{i}].jwt.audience"),
                        j.audience.clone(),
                        "must not be empty",
                    ));
                }
                for a in &j.algorithms {
                    if !JWT_ALGORITHMS.contains(&a.as_str()) {
                        return Err(invalid(
                            format!("inbound[{i}].jwt.algorithms"),
                            a.clone(),
                            "not a JWT-SVID algorithm (ES256, ES384, RS256, RS384, RS512, PS256, PS384, PS512)",
                        ));
                    }
                }
            }
        }
        let mut routes = Vec::new();
        for (i, ob) in raw.outbound.iter_mut().enumerate() {
            if !ob.listen.ip().is_loopback() {
                return Err(invalid(
                    format!("outbound[{i}].listen"),
                    ob.listen.to_string(),
                    "must be a loopback address: the app sends plaintext here",
                ));
            }
            let ids = |field: String, ids: &[String]| -> Result<Vec<SpiffeId>, ConfigError> {
                if ids.is_empty() {
                    return Err(invalid(field, String::new(), "name at least one SPIFFE ID"));
                }
                ids.iter()
                    .map(|s| SpiffeId::new(s).map_err(|e| invalid(field.clone(), s.clone(), &e.to_string())))
                    .collect()
            };
            let upstream = |field: String, u: &str| -> Result<String, ConfigError> {
                match u.rsplit_once(':') {
                    Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0) => {
                        Ok(u.to_owned())
                    }
                    _ => Err(invalid(field, u.to_owned(), "expected host:port")),
                }
            };
            let list = match ob.protocol {
                Protocol::Tcp => {
                    if !ob.route.is_empty() {
                        return Err(invalid(
                            format!("outbound[{i}].route"),
                            String::new(),
                            "routes are for protocol = \"http\"; a tcp listener has one upstream",
                        ));
                    }
                    let u = ob.upstream.clone().ok_or_else(|| {
                        invalid(
                            format!("outbound[{i}].upstream"),
                            String::new(),
                            "required for protocol = \"tcp\"",
                        )
                    })?;
                    vec![ValidRoute {
                        host: "*".into(),
                        upstream: upstream(format!("outbound[{i}].upstream"), &u)?,
                        spiffe_ids: ids(format!("outbound[{i}].spiffe_ids"), &ob.spiffe_ids)?,
                    }]
                }
                Protocol::Http => {
                    if ob.upstream.is_some() || !ob.spiffe_ids.is_empty() {
                        return Err(invalid(
                            format!("outbound[{i}].upstream"),
                            ob.upstream.clone().unwrap_or_default(),
                            "an http listener routes by host: use [[outbound.route]] entries",
                        ));
                    }
                    if ob.route.is_empty() {
                        return Err(invalid(
                            format!("outbound[{i}].route"),
                            String::new(),
                            "an http listener needs at least one [[outbound.route]]",
                        ));
                    }
                    let mut out: Vec<ValidRoute> = Vec::new();
                    for (j, r) in ob.route.iter().enumerate() {
                        let host = r.host.trim().to_ascii_lowercase();
                        if host.is_empty() || host.contains(['/', ' ']) {
                            return Err(invalid(
                                format!("outbound[{i}].route[{j}].host"),
                                r.host.clone(),
                                "expected a host name or *",
                            ));
                        }
                        if out.iter().any(|o| o.host == host) {
                            return Err(invalid(
                                format!("outbound[{i}].route[{j}].host"),
                                r.host.clone(),
                                "duplicate route host",
                            ));
                        }
                        out.push(ValidRoute {
                            host,
                            upstream: upstream(format!("outbound[{i}].route[{j}].upstream"), &r.upstream)?,
                            spiffe_ids: ids(format!("outbound[{i}].route[{j}].spiffe_ids"), &r.spiffe_ids)?,
                        });
                    }
                    out
                }
            };
            routes.push(list);
        }
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut raw.workload_api_socket);
        if let Some(l) = raw.log.as_mut() {
            resolve(&mut l.dir);
            if let Some(k) = l.encryption_key_file.as_mut() {
                resolve(k);
                let shown = k.display().to_string();
                if let Err(e) = trustline_audit::format::LogKey::from_file(k) {
                    return Err(invalid("log.encryption_key_file".into(), shown, &e.to_string()));
                }
            }
            let probe = LogConfig {
                encryption_key_file: None,
                ..l.clone()
            };
            probe
                .writer()
                .map_err(|e| invalid("log.fsync".into(), l.fsync.clone(), &e))?;
            if l.segment_bytes < 4096 {
                return Err(invalid(
                    "log.segment_bytes".into(),
                    l.segment_bytes.to_string(),
                    "must be at least 4096",
                ));
            }
        }
        if raw.chain.max_hops == 0 {
            return Err(invalid("chain.max_hops".into(), "0".into(), "must be at least 1"));
        }
        if let Some(d) = raw.policy_dir.as_mut() {
            resolve(d);
        }
        Ok((raw, routes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> Result<(Config, Vec<Vec<ValidRoute>>), ConfigError> {
        Config::parse(Path::new("/etc/trustline/sidecar.toml"), t)
    }

    #[test]
    fn the_shipped_example_parses() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/sidecar.toml");
        let (c, routes) = Config::load(&p).unwrap();
        assert_eq!(c.inbound.len(), 1);
        assert!(!routes[0].is_empty());
    }

    #[test]
    fn defaults_and_relative_paths() {
        let (c, r) = parse(
            "workload_api_socket = \"agent.sock\"\n[[outbound]]\nlisten = \"127.0.0.1:15001\"\nprotocol = \"tcp\"\nupstream = \"db:5432\"\nspiffe_ids = [\"spiffe://example.org/db\"]\n",
        )
        .unwrap();
        assert_eq!(c.workload_api_socket, PathBuf::from("/etc/trustline/agent.sock"));
        assert_eq!(c.limits.max_connections, 10_000);
        assert_eq!(c.worker_threads, None);
        assert!(!c.chain.verify_peer_signature);
        assert_eq!(r[0][0].upstream, "db:5432");
        let (c, _) = parse(&format!(
            "workload_api_socket = \"a.sock\"\n[chain]\nverify_peer_signature = true\n{}",
            "[[inbound]]\nlisten = \"127.0.0.1:1\"\napp = \"127.0.0.1:2\"\n"
        ))
        .unwrap();
        assert!(c.chain.verify_peer_signature);
    }

    #[test]
    fn bad_values_name_the_field() {
        let base = "workload_api_socket = \"a.sock\"\n";
        let cases = [
            ("[[outbound]]\nlisten = \"0.0.0.0:1\"\n[[outbound.route]]\nhost=\"a\"\nupstream=\"a:1\"\nspiffe_ids=[\"spiffe://t/a\"]\n", "outbound[0].listen"),
            ("[[outbound]]\nlisten = \"127.0.0.1:1\"\n[[outbound.route]]\nhost=\"a\"\nupstream=\"a\"\nspiffe_ids=[\"spiffe://t/a\"]\n", "outbound[0].route[0].upstream"),
            ("[[outbound]]\nlisten = \"127.0.0.1:1\"\n[[outbound.route]]\nhost=\"a\"\nupstream=\"a:1\"\nspiffe_ids=[\"http://t/a\"]\n", "outbound[0].route[0].spiffe_ids"),
            ("[[outbound]]\nlisten = \"127.0.0.1:1\"\n[[outbound.route]]\nhost=\"a\"\nupstream=\"a:1\"\nspiffe_ids=[]\n", "outbound[0].route[0].spiffe_ids"),
            ("[[inbound]]\nlisten = \"0.0.0.0:1\"\napp = \"10.0.0.1:80\"\n", "inbound[0].app"),
            ("[[inbound]]\nlisten = \"0.0.0.0:1\"\napp = \"127.0.0.1:80\"\n[inbound.jwt]\naudience=\"x\"\nalgorithms=[\"HS256\"]\n", "inbound[0].jwt.algorithms"),
            ("metrics_listen = \"0.0.0.0:9\"\n[[inbound]]\nlisten = \"0.0.0.0:1\"\napp = \"127.0.0.1:80\"\n", "metrics_listen"),
            ("", "inbound, outbound"),
            ("worker_threads = 0\n[[inbound]]\nlisten = \"0.0.0.0:1\"\napp = \"127.0.0.1:80\"\n", "worker_threads"),
        ];
        for (t, field) in cases {
            let e = parse(&format!("{base}{t}")).unwrap_err().to_string();
            assert!(e.contains(field), "{t}: {e}");
        }
        let e = parse(&format!("{base}[limits]\nrequest_timeout = \"soon\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("request_timeout") && e.contains("soon"), "{e}");
        let e = parse(&format!("{base}bogus = 1\n")).unwrap_err().to_string();
        assert!(e.contains("bogus"), "{e}");
    }
}
