//! Prometheus metrics of the daemon: what the reconciler counts and the
//! `/metrics` endpoint renders. Recording is cheap and never fails; nothing
//! here decides anything.

use std::sync::Mutex;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabels {
    pub kind: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    pub status: String,
}

/// Every metric workerctl exports.
pub struct Metrics {
    registry: Registry,
    pub passes: Counter,
    pub pass_errors: Counter,
    pub pass_seconds: Histogram,
    pub actions: Family<ActionLabels, Counter>,
    pub workers: Family<StatusLabels, Gauge>,
    pub restarts: Counter,
    pub change_to_running_seconds: Histogram,
    /// When the store last announced a change, to time change → running.
    last_change: Mutex<Option<Instant>>,
    /// The outcome of the last completed pass; `None` before the first.
    last_pass: Mutex<Option<Result<(), String>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("workerctl");
        let passes = Counter::default();
        let pass_errors = Counter::default();
        let pass_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let actions = Family::<ActionLabels, Counter>::default();
        let workers = Family::<StatusLabels, Gauge>::default();
        let restarts = Counter::default();
        let change_to_running_seconds = Histogram::new(exponential_buckets(0.01, 2.0, 14));
        registry.register("reconcile_passes", "Reconcile passes run", passes.clone());
        registry.register(
            "reconcile_pass_errors",
            "Passes that could not observe state",
            pass_errors.clone(),
        );
        registry.register(
            "reconcile_pass_duration_seconds",
            "Duration of a reconcile pass",
            pass_seconds.clone(),
        );
        registry.register(
            "actions",
            "Container actions by kind and outcome",
            actions.clone(),
        );
        registry.register(
            "workers",
            "Workers by status after the last pass",
            workers.clone(),
        );
        registry.register(
            "worker_restarts",
            "Restarts of crashed worker containers",
            restarts.clone(),
        );
        registry.register(
            "change_to_running_seconds",
            "Time from a change announced by the store to its container running",
            change_to_running_seconds.clone(),
        );
        Metrics {
            registry,
            passes,
            pass_errors,
            pass_seconds,
            actions,
            workers,
            restarts,
            change_to_running_seconds,
            last_change: Mutex::new(None),
            last_pass: Mutex::new(None),
        }
    }

    /// Notes that the store announced a change (a NOTIFY arrived).
    pub fn change_announced(&self) {
        if let Ok(mut last) = self.last_change.lock() {
            *last = Some(Instant::now());
        }
    }

    /// Records that a container for a changed worker now runs.
    pub fn container_running(&self) {
        let since = self.last_change.lock().ok().and_then(|l| *l);
        if let Some(t) = since {
            self.change_to_running_seconds
                .observe(t.elapsed().as_secs_f64());
        }
    }

    /// Remembers how the last pass went, for the readiness probe.
    pub fn pass_finished(&self, result: Result<(), String>) {
        if result.is_err() {
            self.pass_errors.inc();
        }
        if let Ok(mut last) = self.last_pass.lock() {
            *last = Some(result);
        }
    }

    /// Why the daemon is not ready, if it is not: the last pass could not
    /// reach the database or Docker, or none has completed yet.
    pub fn not_ready_reason(&self) -> Option<String> {
        match self.last_pass.lock().ok().and_then(|l| l.clone()) {
            None => Some("no reconcile pass has completed yet".into()),
            Some(Ok(())) => None,
            Some(Err(e)) => Some(e),
        }
    }

    pub fn action(&self, kind: &str, ok: bool) {
        let outcome = if ok { "ok" } else { "error" };
        self.actions
            .get_or_create(&ActionLabels {
                kind: kind.into(),
                outcome: outcome.into(),
            })
            .inc();
    }

    pub fn set_workers(&self, status: &str, count: i64) {
        self.workers
            .get_or_create(&StatusLabels {
                status: status.into(),
            })
            .set(count);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendered_metrics_carry_recorded_values() {
        let m = Metrics::new();
        m.passes.inc();
        m.action("create", true);
        m.set_workers("ready", 3);
        let text = m.render();
        assert!(
            text.contains("workerctl_reconcile_passes_total 1"),
            "{text}"
        );
        assert!(
            text.contains("workerctl_actions_total{kind=\"create\",outcome=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("workerctl_workers{status=\"ready\"} 3"),
            "{text}"
        );
    }
}
