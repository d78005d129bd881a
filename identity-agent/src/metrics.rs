//! Prometheus metrics of the agent.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of API requests.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `workload_api` or `http`.
    pub api: String,
    /// Method.
    pub method: String,
    /// `ok` or an error code.
    pub outcome: String,
}

/// The agent's metrics.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    minted: Counter,
    mint_latency: Histogram,
    jwt_cache: Family<RequestLabels, Counter>,
    cached: Gauge,
    connected: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// Registers everything.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("trustline_agent");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("requests", "Workload API and HTTP API requests", requests.clone());
        let minted = Counter::default();
        registry.register(
            "x509_svids_minted",
            "Workload X.509-SVIDs minted (first issue and rotation)",
            minted.clone(),
        );
        let mint_latency = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        registry.register(
            "mint_duration_seconds",
            "Time of one batch CSR round trip to the CA",
            mint_latency.clone(),
        );
        let jwt_cache = Family::<RequestLabels, Counter>::default();
        registry.register(
            "jwt_svids",
            "JWT-SVIDs served, by cache outcome",
            jwt_cache.clone(),
        );
        let cached = Gauge::default();
        registry.register(
            "x509_svids_cached",
            "Workload X.509-SVIDs held in memory",
            cached.clone(),
        );
        let connected = Gauge::default();
        registry.register(
            "ca_connected",
            "1 while the CA update stream is up",
            connected.clone(),
        );
        Arc::new(Self {
            registry,
            requests,
            minted,
            mint_latency,
            jwt_cache,
            cached,
            connected,
        })
    }

    /// Counts a request.
    pub fn request(&self, api: &str, method: &str, outcome: &str) {
        self.requests
            .get_or_create(&RequestLabels {
                api: api.into(),
                method: method.into(),
                outcome: outcome.into(),
            })
            .inc();
    }

    pub(crate) fn x509_minted(&self, n: u64, took: Duration) {
        self.minted.inc_by(n);
        self.mint_latency.observe(took.as_secs_f64());
    }

    pub(crate) fn jwt_served(&self, cached: bool) {
        self.jwt_cache
            .get_or_create(&RequestLabels {
                api: "any".into(),
                method: "jwt".into(),
                outcome: if cached { "cache_hit" } else { "minted" }.into(),
            })
            .inc();
    }

    pub(crate) fn set_cached(&self, n: i64) {
        self.cached.set(n);
    }

    pub(crate) fn set_connected(&self, up: bool) {
        self.connected.set(i64::from(up));
    }

    /// Prometheus text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
