//! Prometheus metrics of the daemon: what the reconciler counts and the
//! `/metrics` endpoint renders. Recording is cheap and never fails; nothing
//! here decides anything.

use std::sync::Mutex;
use std::time::Instant;

use chrono::{DateTime, Utc};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::Serialize;

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
    /// Ready reports dropped because their token was not their worker's.
    pub ready_reports_rejected: Counter,
    /// Replicas, queue depths and leadership (`scale/metrics.rs`).
    pub scale: crate::scale::metrics::ScaleMetrics,
    timing: Mutex<Timing>,
}

/// What the metrics remember between calls, under one lock.
#[derive(Default)]
struct Timing {
    /// The earliest change announced since the last pass started.
    announced: Option<Instant>,
    /// The change the running pass reacts to.
    in_pass: Option<Instant>,
    last_pass: Option<LastPass>,
}

/// How a pass ended, as the status page shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LastPass {
    pub finished_at: DateTime<Utc>,
    /// Why the pass could not observe the world; `None` when it could.
    pub error: Option<String>,
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
        let ready_reports_rejected = Counter::default();
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
        registry.register(
            "ready_reports_rejected",
            "Ready reports dropped because their token was not their worker's",
            ready_reports_rejected.clone(),
        );
        let scale = crate::scale::metrics::ScaleMetrics::default();
        scale.register(&mut registry);
        Metrics {
            registry,
            scale,
            passes,
            pass_errors,
            pass_seconds,
            actions,
            workers,
            restarts,
            change_to_running_seconds,
            ready_reports_rejected,
            timing: Mutex::new(Timing::default()),
        }
    }

    /// Notes that the store announced a change (a NOTIFY arrived). The
    /// earliest announcement not yet picked up by a pass is kept.
    pub fn change_announced(&self) {
        if let Ok(mut t) = self.timing.lock() {
            t.announced.get_or_insert_with(Instant::now);
        }
    }

    /// Counts a pass that starts now. The changes announced so far are what
    /// it reacts to: containers it starts are timed from them. A change
    /// announced while the pass runs is left for the next one.
    pub fn pass_started(&self) {
        self.passes.inc();
        if let Ok(mut t) = self.timing.lock() {
            t.in_pass = t.announced.take();
        }
    }

    /// The change the current pass reacts to, if any: actions it starts
    /// carry it, to time the change to the container they start.
    pub(crate) fn change_in_pass(&self) -> Option<Instant> {
        self.timing.lock().ok().and_then(|t| t.in_pass)
    }

    /// Records that an action got a container running, timed from the
    /// change it reacted to, if any (not on a plain resync or a crash restart).
    pub(crate) fn container_running(&self, since: Option<Instant>) {
        if let Some(t) = since {
            self.change_to_running_seconds
                .observe(t.elapsed().as_secs_f64());
        }
    }

    /// Remembers how the pass went, for the status page. A pass that could
    /// not observe the world hands its change on to the next pass.
    pub(crate) fn pass_finished(&self, result: Result<(), String>) {
        if result.is_err() {
            self.pass_errors.inc();
        }
        if let Ok(mut t) = self.timing.lock() {
            if let (Err(_), Some(change)) = (&result, t.in_pass.take()) {
                t.announced = Some(t.announced.map_or(change, |a| a.min(change)));
            }
            t.last_pass = Some(LastPass {
                finished_at: Utc::now(),
                error: result.err(),
            });
        }
    }

    /// How the last completed pass went; `None` before the first.
    pub fn last_pass(&self) -> Option<LastPass> {
        self.timing.lock().ok().and_then(|t| t.last_pass.clone())
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

    pub(crate) fn set_workers(&self, status: &str, count: i64) {
        self.workers
            .get_or_create(&StatusLabels {
                status: status.into(),
            })
            .set(count);
    }

    /// The Prometheus text exposition of every metric.
    pub(crate) fn render(&self) -> String {
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
        m.pass_started();
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

    /// How many change → running durations were observed.
    fn timed(m: &Metrics) -> u64 {
        let text = m.render();
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix("workerctl_change_to_running_seconds_count "));
        line.and_then(|n| n.parse().ok())
            .expect("the histogram is rendered")
    }

    #[test]
    fn a_container_started_by_the_pass_after_a_change_is_timed() {
        let m = Metrics::new();
        m.change_announced();
        m.pass_started();
        m.container_running(m.change_in_pass());
        m.pass_finished(Ok(()));
        assert_eq!(timed(&m), 1);
    }

    #[test]
    fn a_container_started_without_a_change_is_not_timed() {
        let m = Metrics::new();
        m.change_announced();
        m.pass_started();
        m.pass_finished(Ok(()));
        m.pass_started();
        m.container_running(m.change_in_pass());
        assert_eq!(timed(&m), 0);
    }

    #[test]
    fn a_change_announced_during_a_pass_is_left_for_the_next() {
        let m = Metrics::new();
        m.pass_started();
        m.change_announced();
        m.container_running(m.change_in_pass());
        m.pass_finished(Ok(()));
        assert_eq!(timed(&m), 0);
        m.pass_started();
        m.container_running(m.change_in_pass());
        assert_eq!(timed(&m), 1);
    }

    #[test]
    fn a_failed_pass_hands_its_change_on() {
        let m = Metrics::new();
        m.change_announced();
        m.pass_started();
        m.pass_finished(Err("cannot read the worker store".into()));
        let last = m.last_pass().expect("a pass finished");
        assert_eq!(last.error.as_deref(), Some("cannot read the worker store"));
        m.pass_started();
        m.container_running(m.change_in_pass());
        assert_eq!(timed(&m), 1);
    }
}
