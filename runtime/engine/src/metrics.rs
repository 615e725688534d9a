//! Prometheus metrics: plugin invocations, latency and failures per tenant.

use plugboard_host::Report;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::Mutex;

type Labels = Vec<(String, String)>;

/// The server's metrics registry.
pub struct Metrics {
    registry: Mutex<Registry>,
    invocations: Family<Labels, Counter>,
    failures: Family<Labels, Counter>,
    latency: Family<Labels, Histogram>,
    loaded: Gauge,
    auth: Family<Labels, Counter>,
    security: Family<Labels, Counter>,
    cluster: Family<Labels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with Plugboard's metrics.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("plugboard");
        let invocations = Family::<Labels, Counter>::default();
        let failures = Family::<Labels, Counter>::default();
        let latency = Family::<Labels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_005, 2.0, 20))
        });
        let loaded = Gauge::default();
        let auth = Family::<Labels, Counter>::default();
        let security = Family::<Labels, Counter>::default();
        let cluster = Family::<Labels, Counter>::default();
        registry.register(
            "auth_failures",
            "Failed authentications by channel and outcome (failed: wrong credentials; refused: cooling off, unchecked)",
            auth.clone(),
        );
        registry.register(
            "security_events",
            "Security events (lockouts) by kind",
            security.clone(),
        );
        registry.register(
            "plugin_invocations",
            "Plugin invocations by tenant, plugin, kind and outcome",
            invocations.clone(),
        );
        registry.register(
            "plugin_failures",
            "Plugin traps, timeouts and other failures by tenant and code",
            failures.clone(),
        );
        registry.register(
            "plugin_invocation_seconds",
            "Plugin invocation latency (instantiate + call) by tenant",
            latency.clone(),
        );
        registry.register(
            "plugin_versions_loaded",
            "Plugin versions compiled and ready in this process",
            loaded.clone(),
        );
        registry.register(
            "cluster_notices",
            "Cross-node notices (events, plugin deploys) over NATS by outcome: sent, received, dropped (NATS behind or unreachable), failed",
            cluster.clone(),
        );
        Metrics {
            registry: Mutex::new(registry),
            invocations,
            failures,
            latency,
            loaded,
            auth,
            security,
            cluster,
        }
    }

    /// Records one invocation.
    pub fn observe<T>(&self, tenant: &str, plugin: &str, kind: &str, report: &Report<T>) {
        let outcome = match &report.outcome {
            Ok(_) => "ok",
            Err(e) => e.code(),
        };
        self.invocations
            .get_or_create(&vec![
                ("tenant".into(), tenant.into()),
                ("plugin".into(), plugin.into()),
                ("kind".into(), kind.into()),
                ("outcome".into(), outcome.into()),
            ])
            .inc();
        if let Err(e) = &report.outcome {
            self.failures
                .get_or_create(&vec![
                    ("tenant".into(), tenant.into()),
                    ("code".into(), e.code().into()),
                ])
                .inc();
        }
        self.latency
            .get_or_create(&vec![("tenant".into(), tenant.into())])
            .observe(report.elapsed_us as f64 / 1e6);
    }

    /// Counts a failed (`failed`) or throttled (`refused`) authentication.
    pub fn auth_failure(&self, channel: &str, outcome: &str) {
        self.auth
            .get_or_create(&vec![
                ("channel".into(), channel.into()),
                ("outcome".into(), outcome.into()),
            ])
            .inc();
    }

    /// Counts a security event.
    pub fn security_event(&self, kind: &str) {
        self.security
            .get_or_create(&vec![("kind".into(), kind.into())])
            .inc();
    }

    /// Counts `n` cross-node notices with an outcome (`sent`, `received`,
    /// `dropped`, `failed`).
    pub fn cluster_notices(&self, outcome: &str, n: u64) {
        self.cluster
            .get_or_create(&vec![("outcome".into(), outcome.into())])
            .inc_by(n);
    }

    /// The text exposition.
    pub fn encode(&self, loaded: usize) -> String {
        self.loaded.set(loaded as i64);
        let mut out = String::new();
        if let Ok(r) = self.registry.lock() {
            let _ = encode(&mut out, &r);
        }
        out
    }
}
