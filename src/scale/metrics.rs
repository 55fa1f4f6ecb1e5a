//! Prometheus metrics of scale-out: desired and running replicas and the
//! queue depth of each worker, queue-depth reads, and whether this daemon
//! leads. Registered into the daemon's one registry (`/metrics`, by
//! `metrics.rs`); the leader gauge is set by `daemon.rs`; recording
//! is cheap and never fails; nothing here decides anything.

use std::collections::BTreeSet;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::model::QueueDepth;
use crate::model::WorkerId;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabels {
    pub worker: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

/// One worker's replicas and queue after a pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkerScale {
    pub id: WorkerId,
    pub desired: u32,
    pub running: u32,
    /// `None` when the depth is unknown: its series are dropped, not zeroed.
    pub queue: Option<QueueDepth>,
}

#[derive(Default)]
pub struct ScaleMetrics {
    pub replicas_desired: Family<WorkerLabels, Gauge>,
    pub replicas_running: Family<WorkerLabels, Gauge>,
    pub queue_ready: Family<WorkerLabels, Gauge>,
    pub depth_reads: Family<OutcomeLabels, Counter>,
    pub leader: Gauge,
    /// The workers recorded last, so that a deleted one's series go.
    known: Mutex<BTreeSet<WorkerId>>,
}

impl ScaleMetrics {
    /// Adds every metric to `registry` (prefixed `workerctl_` by it).
    pub(crate) fn register(&self, registry: &mut Registry) {
        registry.register(
            "worker_replicas_desired",
            "Replicas each worker should run",
            self.replicas_desired.clone(),
        );
        registry.register(
            "worker_replicas_running",
            "Replicas of each worker running and ready",
            self.replicas_running.clone(),
        );
        registry.register(
            "worker_queue_ready_messages",
            "Messages ready in each worker's queue, as the management API last said",
            self.queue_ready.clone(),
        );
        registry.register(
            "queue_depth_reads",
            "Reads of the management API by outcome",
            self.depth_reads.clone(),
        );
        registry.register(
            "leader",
            "1 while this daemon leads its instance, else 0",
            self.leader.clone(),
        );
    }

    /// Records every worker of a pass; workers not among them lose their series.
    pub fn record(&self, workers: &[WorkerScale]) {
        let ids: BTreeSet<WorkerId> = workers.iter().map(|w| w.id).collect();
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        for gone in known.difference(&ids) {
            self.forget(*gone);
        }
        for w in workers {
            self.record_one(w);
        }
        *known = ids;
    }

    fn record_one(&self, w: &WorkerScale) {
        let labels = labels(w.id);
        self.replicas_desired
            .get_or_create(&labels)
            .set(i64::from(w.desired));
        self.replicas_running
            .get_or_create(&labels)
            .set(i64::from(w.running));
        // No consumer count: the depth read carries none (depths.rs).
        match w.queue.and_then(|q| q.ready) {
            Some(ready) => {
                self.queue_ready
                    .get_or_create(&labels)
                    .set(i64::try_from(ready).unwrap_or(i64::MAX));
            }
            None => {
                self.queue_ready.remove(&labels);
            }
        }
    }

    fn forget(&self, id: WorkerId) {
        let labels = labels(id);
        for family in [
            &self.replicas_desired,
            &self.replicas_running,
            &self.queue_ready,
        ] {
            family.remove(&labels);
        }
    }

    /// Counts one read of the management API.
    pub(crate) fn depth_read(&self, ok: bool) {
        let outcome = if ok { "ok" } else { "error" };
        self.depth_reads
            .get_or_create(&OutcomeLabels {
                outcome: outcome.into(),
            })
            .inc();
    }

    pub(crate) fn set_leader(&self, leads: bool) {
        self.leader.set(i64::from(leads));
    }
}

fn labels(id: WorkerId) -> WorkerLabels {
    WorkerLabels {
        worker: id.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn render(m: &ScaleMetrics) -> String {
        let mut registry = Registry::with_prefix("workerctl");
        m.register(&mut registry);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).expect("encodes");
        out
    }

    fn scale(n: u128, queue: Option<QueueDepth>) -> WorkerScale {
        WorkerScale {
            id: WorkerId(Uuid::from_u128(n)),
            desired: 4,
            running: 3,
            queue,
        }
    }

    #[test]
    fn replicas_and_queue_depth_are_exported_per_worker() {
        let m = ScaleMetrics::default();
        let queue = QueueDepth {
            ready: Some(81),
            consumers: 0,
        };
        m.record(&[scale(1, Some(queue))]);
        m.set_leader(true);
        m.depth_read(true);
        let text = render(&m);
        let w = WorkerId(Uuid::from_u128(1)).to_string();
        for line in [
            format!("workerctl_worker_replicas_desired{{worker=\"{w}\"}} 4"),
            format!("workerctl_worker_replicas_running{{worker=\"{w}\"}} 3"),
            format!("workerctl_worker_queue_ready_messages{{worker=\"{w}\"}} 81"),
            "workerctl_leader 1".to_string(),
            "workerctl_queue_depth_reads_total{outcome=\"ok\"} 1".to_string(),
        ] {
            assert!(text.contains(&line), "{line} missing from:\n{text}");
        }
    }

    #[test]
    fn an_unknown_depth_drops_the_queue_series_rather_than_zeroing_them() {
        let m = ScaleMetrics::default();
        let queue = QueueDepth {
            ready: Some(5),
            consumers: 0,
        };
        m.record(&[scale(1, Some(queue))]);
        m.record(&[scale(1, None)]);
        let text = render(&m);
        assert!(
            !text.contains("workerctl_worker_queue_ready_messages{"),
            "{text}"
        );
        assert!(
            text.contains("workerctl_worker_replicas_desired{"),
            "{text}"
        );
    }

    #[test]
    fn a_worker_no_longer_recorded_loses_its_series() {
        let m = ScaleMetrics::default();
        m.record(&[scale(1, None), scale(2, None)]);
        m.record(&[scale(2, None)]);
        let text = render(&m);
        let gone = WorkerId(Uuid::from_u128(1)).to_string();
        assert!(!text.contains(&gone), "{text}");
        assert!(text.contains(&WorkerId(Uuid::from_u128(2)).to_string()));
    }
}
