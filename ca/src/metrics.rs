//! Prometheus metrics: issuance counts by kind, issuance latency histograms, errors by kind.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Label: what was issued (`x509`, `jwt`, `agent`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// The kind.
    pub kind: String,
}

/// Label: error kind (`invalid_argument`, `not_found`, `permission_denied`, `csr_rejected`, `token`, `store`,
/// `internal`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabel {
    /// The error kind.
    pub kind: String,
}

/// The CA's metrics.
pub struct Metrics {
    registry: Registry,
    issued: Family<KindLabel, Counter>,
    latency: Family<KindLabel, Histogram>,
    errors: Family<ErrorLabel, Counter>,
    agents_attested: Counter,
    bundle_sequence: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// Registers all metrics.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("trustline_ca");
        let issued = Family::<KindLabel, Counter>::default();
        registry.register("svids_issued", "SVIDs issued, by kind", issued.clone());
        let latency = Family::<KindLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_025, 2.0, 16))
        });
        registry.register(
            "issue_duration_seconds",
            "Time to issue one SVID (validate, sign, record), by kind",
            latency.clone(),
        );
        let errors = Family::<ErrorLabel, Counter>::default();
        registry.register(
            "errors",
            "Refused or failed requests, by error kind",
            errors.clone(),
        );
        let agents_attested = Counter::default();
        registry.register(
            "agents_attested",
            "Nodes attested with a join token",
            agents_attested.clone(),
        );
        let bundle_sequence = Gauge::default();
        registry.register(
            "bundle_sequence",
            "Sequence number of the published bundle",
            bundle_sequence.clone(),
        );
        Arc::new(Self {
            registry,
            issued,
            latency,
            errors,
            agents_attested,
            bundle_sequence,
        })
    }

    /// Counts `n` issued SVIDs of `kind`, each taking `each`.
    pub fn issued(&self, kind: &str, n: u64, each: Duration) {
        let label = KindLabel {
            kind: kind.to_owned(),
        };
        self.issued.get_or_create(&label).inc_by(n);
        let h = self.latency.get_or_create(&label);
        for _ in 0..n {
            h.observe(each.as_secs_f64());
        }
    }

    /// Counts an error of `kind`.
    pub fn error(&self, kind: &str) {
        self.errors
            .get_or_create(&ErrorLabel {
                kind: kind.to_owned(),
            })
            .inc();
    }

    /// Counts an attested agent.
    pub fn agent_attested(&self) {
        self.agents_attested.inc();
    }

    /// Records the bundle sequence.
    pub fn set_bundle_sequence(&self, seq: i64) {
        self.bundle_sequence.set(seq);
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
