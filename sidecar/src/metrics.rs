//! Prometheus metrics of the sidecar (`trustline_sidecar_*`).

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// `inbound` (mTLS from peers) or `outbound` (from the local app).
pub type Direction = &'static str;

/// Labels of proxied requests.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `inbound` or `outbound`.
    pub direction: Direction,
    /// `allow`, `deny` (policy), `unauthenticated` (JWT-SVID), `error` (upstream failure), and on inbound
    /// connections whose peer is no longer valid `peer_certificate_expired` or `peer_not_trusted`
    /// (`crate::live_peer`).
    pub decision: &'static str,
    /// HTTP status returned to the caller.
    pub status: u16,
}

/// Labels of TLS handshakes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    /// `inbound` or `outbound`.
    pub direction: Direction,
    /// `ok` or the refusal reason (`expired`, `untrusted`, `self_signed`, `foreign_trust_domain`, `bad_svid`,
    /// `wrong_id`, `no_certificate`, `peer_alert`, `protocol`, `timeout`).
    pub outcome: &'static str,
    /// Negotiated key exchange group (`X25519MLKEM768`, `X25519`, …; empty on failure).
    pub group: &'static str,
}

/// Labels keyed by direction only.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirLabels {
    /// `inbound` or `outbound`.
    pub direction: Direction,
}

/// Labels of policy reloads.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `ok` or `rejected`.
    pub result: &'static str,
}

/// The sidecar's metrics.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<DirLabels, Histogram>,
    handshakes: Family<HandshakeLabels, Counter>,
    connections: Family<DirLabels, Gauge>,
    tcp_denied: Family<DirLabels, Counter>,
    reloads: Family<ReloadLabels, Counter>,
    policies: Gauge,
    svid_expiry: Gauge,
    chains: Family<ResultLabels, Counter>,
    log_records: Family<ResultLabels, Counter>,
}

/// Labels with a result.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// Result.
    pub result: &'static str,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// Registers everything.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("trustline_sidecar");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Proxied HTTP requests by direction, policy decision and status",
            requests.clone(),
        );
        let latency = Family::<DirLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_05, 2.0, 18))
        });
        registry.register(
            "request_duration_seconds",
            "Time from request headers in to response headers out, including the upstream",
            latency.clone(),
        );
        let handshakes = Family::<HandshakeLabels, Counter>::default();
        registry.register(
            "tls_handshakes",
            "Mutual TLS handshakes by outcome (refusal reason) and key exchange group",
            handshakes.clone(),
        );
        let connections = Family::<DirLabels, Gauge>::default();
        registry.register("connections_open", "Open client connections", connections.clone());
        let tcp_denied = Family::<DirLabels, Counter>::default();
        registry.register(
            "tcp_connections_denied",
            "Opaque TCP connections refused by policy",
            tcp_denied.clone(),
        );
        let reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "policy_reloads",
            "Policy folder reloads by result",
            reloads.clone(),
        );
        let policies = Gauge::default();
        registry.register("policies_loaded", "Policies in force", policies.clone());
        let svid_expiry = Gauge::default();
        registry.register(
            "svid_expiry_timestamp_seconds",
            "notAfter of the X.509-SVID the sidecar presents (unix time)",
            svid_expiry.clone(),
        );
        let chains = Family::<ResultLabels, Counter>::default();
        registry.register(
            "caller_chains",
            "Inbound caller chains: ok, absent, or the refusal (forged, broken, stale, not_for_us, malformed, too_long, too_large)",
            chains.clone(),
        );
        let log_records = Family::<ResultLabels, Counter>::default();
        registry.register(
            "log_records",
            "Accountability log records: written, or refused (queue full or disk failing: the alarm)",
            log_records.clone(),
        );
        Arc::new(Self {
            chains,
            log_records,
            registry,
            requests,
            latency,
            handshakes,
            connections,
            tcp_denied,
            reloads,
            policies,
            svid_expiry,
        })
    }

    /// Counts one HTTP request.
    pub fn request(&self, direction: Direction, decision: &'static str, status: u16, took: Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                direction,
                decision,
                status,
            })
            .inc();
        self.latency
            .get_or_create(&DirLabels { direction })
            .observe(took.as_secs_f64());
    }

    /// Counts one handshake.
    pub fn handshake(&self, direction: Direction, outcome: &'static str, group: &'static str) {
        self.handshakes
            .get_or_create(&HandshakeLabels {
                direction,
                outcome,
                group,
            })
            .inc();
    }

    /// A connection opened (`+1`) or closed (`-1`).
    pub fn connection(&self, direction: Direction, delta: i64) {
        self.connections
            .get_or_create(&DirLabels { direction })
            .inc_by(delta);
    }

    /// Counts a connection open until the returned guard is dropped (a parked connection outlives its task).
    pub fn open_connection(self: &Arc<Self>, direction: Direction) -> OpenConnection {
        self.connection(direction, 1);
        OpenConnection(self.clone(), direction)
    }

    /// A TCP connection refused by policy.
    pub fn tcp_denied(&self, direction: Direction) {
        self.tcp_denied.get_or_create(&DirLabels { direction }).inc();
    }

    /// A policy reload attempt.
    pub fn reload(&self, ok: bool, policies: usize) {
        self.reloads
            .get_or_create(&ReloadLabels {
                result: if ok { "ok" } else { "rejected" },
            })
            .inc();
        if ok {
            self.policies.set(i64::try_from(policies).unwrap_or(i64::MAX));
        }
    }

    /// The presented SVID's notAfter.
    pub fn svid_expiry(&self, not_after_unix: i64) {
        self.svid_expiry.set(not_after_unix);
    }

    /// An inbound caller chain's outcome.
    pub fn chain(&self, result: &'static str) {
        self.chains.get_or_create(&ResultLabels { result }).inc();
    }

    /// A record written or refused.
    pub fn log_record(&self, written: bool) {
        self.log_records
            .get_or_create(&ResultLabels {
                result: if written { "written" } else { "refused" },
            })
            .inc();
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// An open connection, counted in `trustline_sidecar_connections` until dropped.
#[derive(Debug)]
pub struct OpenConnection(Arc<Metrics>, Direction);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connection(self.1, -1);
    }
}
