//! What a pass tells the world, whichever backend decided it: worker
//! statuses (to `user_workers`, only those that changed), the observed
//! state (to `workerctl_observed`, only what changed since the last write),
//! and the status and scale metrics. Write failures are logged, never fatal:
//! the next pass writes again.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use tracing::warn;

use crate::backoff::error_chain;
use crate::metrics::Metrics;
use crate::model::{Observed, QueueDepths};
use crate::model::{Status, WorkerId, WorkerRow};
use crate::plan::Verdict;
use crate::scale::metrics::WorkerScale;
use crate::store::{StatusUpdate, WorkerStore};

pub(super) struct StatusWriter<S> {
    store: Arc<S>,
    metrics: Arc<Metrics>,
    /// What was last written to `workerctl_observed`, per worker.
    observed: HashMap<WorkerId, Observed>,
}

impl<S: WorkerStore> StatusWriter<S> {
    pub(super) fn new(store: Arc<S>, metrics: Arc<Metrics>) -> Self {
        StatusWriter {
            store,
            metrics,
            observed: HashMap::new(),
        }
    }

    /// Records a pass's statuses and observations. An idle pass writes nothing.
    pub(super) async fn publish(
        &mut self,
        rows: &[WorkerRow],
        verdicts: &[Verdict],
        observed: Vec<Observed>,
        depths: Option<&QueueDepths>,
    ) {
        self.count_statuses(rows, verdicts);
        self.write_statuses(rows, verdicts).await;
        self.record_scale(&observed, depths);
        self.write_observed(observed).await;
    }

    /// Replicas wanted and running, and queue depths, per worker.
    fn record_scale(&self, observed: &[Observed], depths: Option<&QueueDepths>) {
        let workers: Vec<WorkerScale> = observed
            .iter()
            .map(|o| WorkerScale {
                id: o.id,
                desired: u32::try_from(o.desired_replicas).unwrap_or(0),
                running: u32::try_from(o.running_replicas).unwrap_or(0),
                queue: depths.and_then(|d| d.get(o.id)),
            })
            .collect();
        self.metrics.scale.record(&workers);
    }

    fn count_statuses(&self, rows: &[WorkerRow], verdicts: &[Verdict]) {
        let decided: HashMap<WorkerId, Status> =
            verdicts.iter().map(|v| (v.id, v.status)).collect();
        for status in [Status::Unknown, Status::Ready, Status::Error] {
            let n = rows
                .iter()
                .filter(|r| {
                    decided.get(&r.id).map(|s| s.as_str()).unwrap_or(&r.status) == status.as_str()
                })
                .count();
            self.metrics.set_workers(status.as_str(), n as i64);
        }
    }

    /// Writes only statuses that differ from the rows.
    async fn write_statuses(&self, rows: &[WorkerRow], verdicts: &[Verdict]) {
        let current: HashMap<WorkerId, (&str, &str)> = rows
            .iter()
            .map(|r| (r.id, (r.status.as_str(), r.status_info.as_str())))
            .collect();
        let changed: Vec<StatusUpdate> = verdicts
            .iter()
            .filter(|v| current.get(&v.id) != Some(&(v.status.as_str(), v.info.as_str())))
            .map(|v| StatusUpdate {
                id: v.id,
                revision: v.revision,
                status: v.status,
                info: v.info.clone(),
            })
            .collect();
        if changed.is_empty() {
            return;
        }
        if let Err(e) = self.store.write_statuses(&changed).await {
            warn!("{}", error_chain(&e));
        }
    }

    /// Upserts what changed in the observed state since the last write.
    async fn write_observed(&mut self, observed: Vec<Observed>) {
        // A deleted row's observation goes with it (a trigger); forget it here
        // too, so that a row restored under the same id is written afresh.
        let ids: BTreeSet<WorkerId> = observed.iter().map(|o| o.id).collect();
        self.observed.retain(|id, _| ids.contains(id));
        let changed: Vec<Observed> = observed
            .into_iter()
            .filter(|o| self.observed.get(&o.id) != Some(o))
            .collect();
        if changed.is_empty() {
            return;
        }
        match self.store.write_observed(&changed).await {
            Ok(()) => self.observed.extend(changed.into_iter().map(|o| (o.id, o))),
            Err(e) => warn!("{}", error_chain(&e)),
        }
    }
}
