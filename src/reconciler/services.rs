//! One pass of the Swarm backend, and the actions it leaves running: read
//! the store → list the services (one call) → plan ([`plan_services`]) →
//! record statuses → start the actions. The same shape as the container
//! reconciler (`reconciler.rs`), sharing its action tasks ([`InFlight`]),
//! its publishing ([`Publisher`]), the leadership checks and the failure
//! book; only what is observed and how a step is carried out differ.
//!
//! Observation is a constant number of calls per pass, whatever the worker
//! count: one to list services, one for the image, one for the network, and
//! one for the tasks of all services that run fewer than they want (none
//! while every service is whole).
//!
//! State carried between passes: the scaler's decisions, the spec hash this
//! daemon last had Swarm roll out per worker (so that a rolled-back spec is
//! not tried again), the failures of the last actions, and what was last
//! written. Nothing here decides anything.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{
    ActionError, Clock, Done, PassError, PassReport, PassSettings, announce, confirmed,
    latest_depths, may_act, measured, record_outcome,
};
use super::{in_flight::InFlight, publish::Publisher};
use crate::broker::Reading;
use crate::controller::Passes;
use crate::leader::Leadership;
use crate::metrics::Metrics;
use crate::model::{Rollout, WorkerId};
use crate::plan::service::{
    ServiceAction, ServicePlan, ServiceSnapshot, ServiceStep, plan_services,
};
use crate::plan::{ActionFailure, Slot};
use crate::runtime::ServiceRuntime;
use crate::scale::ScaleState;
use crate::store::WorkerStore;

pub struct ServiceReconciler<S, R> {
    store: Arc<S>,
    runtime: Arc<R>,
    settings: PassSettings,
    metrics: Arc<Metrics>,
    scale: BTreeMap<WorkerId, ScaleState>,
    asked: BTreeMap<WorkerId, String>,
    failures: BTreeMap<Slot, ActionFailure>,
    publisher: Publisher<S>,
    in_flight: InFlight<Done<ServiceAction>>,
    clock: Clock,
    leadership: Option<Leadership>,
    depths: Option<watch::Receiver<Reading>>,
}

impl<S: WorkerStore, R: ServiceRuntime> ServiceReconciler<S, R> {
    pub fn new(
        store: Arc<S>,
        runtime: Arc<R>,
        settings: PassSettings,
        metrics: Arc<Metrics>,
    ) -> Self {
        ServiceReconciler {
            publisher: Publisher::new(store.clone(), metrics.clone()),
            in_flight: InFlight::new(settings.concurrency),
            store,
            runtime,
            settings,
            metrics,
            scale: BTreeMap::new(),
            asked: BTreeMap::new(),
            failures: BTreeMap::new(),
            clock: Clock::new(),
            leadership: None,
            depths: None,
        }
    }

    /// The same reconciler, acting only while `leadership` holds.
    pub fn led_by(mut self, leadership: Leadership) -> Self {
        self.leadership = Some(leadership);
        self
    }

    /// The same reconciler, reading queue depths from `readings`.
    pub fn reading_depths(mut self, readings: watch::Receiver<Reading>) -> Self {
        self.depths = Some(readings);
        self
    }

    /// Reads desired and actual state (see the module docs for the calls).
    pub async fn observe(&self) -> Result<ServiceSnapshot, PassError> {
        let rows = self.store.load_workers().await.map_err(PassError::Store)?;
        let services = self.runtime.list().await.map_err(PassError::Swarm)?;
        let template = &self.settings.template;
        let image = self
            .runtime
            .image(&template.image)
            .await
            .map_err(PassError::Swarm)?;
        let network = self
            .runtime
            .network(&template.network)
            .await
            .map_err(PassError::Swarm)?;
        let lagging: Vec<_> = services
            .iter()
            .filter(|s| {
                s.running < u64::from(s.replicas)
                    || matches!(
                        s.rollout,
                        Rollout::Paused { .. } | Rollout::RolledBack { .. }
                    )
            })
            .collect();
        let task_errors = self
            .runtime
            .task_errors(&lagging)
            .await
            .map_err(PassError::Swarm)?;
        let (depths, depths_unknown) = latest_depths(self.depths.as_ref());
        Ok(ServiceSnapshot {
            rows,
            services,
            image,
            network,
            scale: self.scale.clone(),
            failures: self.failures.clone(),
            busy: self.in_flight.busy(),
            asked: self.asked.clone(),
            task_errors,
            depths,
            depths_unknown,
            now_ms: self.clock.now_ms(),
        })
    }

    /// Decides a pass without acting: what `workerctl plan` prints.
    pub async fn dry_run(&self) -> Result<ServicePlan, PassError> {
        let snapshot = self.observe().await?;
        Ok(plan_services(
            &snapshot,
            &self.settings.template,
            &self.settings.policy,
        ))
    }

    async fn pass_inner(&mut self) -> Result<PassReport, PassError> {
        if !may_act(self.leadership.as_ref()).await {
            return Ok(PassReport::default());
        }
        let snapshot = self.observe().await?;
        let plan = plan_services(&snapshot, &self.settings.template, &self.settings.policy);
        self.scale = plan.scale;
        self.forget_gone(&snapshot);
        self.publisher
            .publish(
                &snapshot.rows,
                &plan.verdicts,
                plan.observed,
                snapshot.depths.as_ref(),
            )
            .await;
        let started = plan.actions.len();
        for (action, span) in announce(&snapshot.rows, plan.actions) {
            self.spawn(action, span);
        }
        let wake_at = plan.wake_at_ms.map(|t| self.clock.instant(t));
        Ok(PassReport { started, wake_at })
    }

    /// Runs `action` as a task of its own; its slot is busy until it ends.
    fn spawn(&mut self, action: ServiceAction, span: tracing::Span) {
        let runtime = self.runtime.clone();
        let slot = action.slot.clone();
        let leadership = self.leadership.clone();
        let change = self.metrics.change_in_pass();
        let task = async move {
            let result = confirmed(leadership.as_ref(), async {
                apply(&*runtime, &action.step)
                    .await
                    .map_err(ActionError::from)
            })
            .await;
            Done {
                action,
                result,
                change,
            }
        };
        self.in_flight.spawn(slot, span, task);
    }

    /// Waits for the actions in flight, at most `limit`, then abandons them;
    /// returns how those that ended went.
    pub async fn drain(&mut self, limit: Duration) -> Vec<Done<ServiceAction>> {
        let done = self.in_flight.drain(limit).await;
        for d in &done {
            self.finished(d);
        }
        done
    }

    /// Forgets the books of workers that no longer exist.
    fn forget_gone(&mut self, snapshot: &ServiceSnapshot) {
        let rows: BTreeSet<WorkerId> = snapshot.rows.iter().map(|r| r.id).collect();
        self.failures
            .retain(|slot, _| slot.worker().is_none_or(|id| rows.contains(&id)));
        self.asked.retain(|id, _| rows.contains(id));
    }
}

/// Carries out one step; returns the id of a service it created.
async fn apply<R: ServiceRuntime>(
    runtime: &R,
    step: &ServiceStep,
) -> Result<Option<String>, crate::swarm::SwarmError> {
    match step {
        ServiceStep::Create { service } => runtime.create(service).await.map(Some),
        ServiceStep::Update { current, service } => {
            runtime.update(current, service).await.map(|()| None)
        }
        ServiceStep::Scale { current, replicas } => {
            runtime.scale(current, *replicas).await.map(|()| None)
        }
        ServiceStep::Remove { service } => runtime.remove(&service.id).await.map(|()| None),
    }
}

impl<S: WorkerStore, R: ServiceRuntime> Passes for ServiceReconciler<S, R> {
    type Done = Done<ServiceAction>;

    #[tracing::instrument(name = "pass", skip_all)]
    async fn pass(&mut self) -> Result<PassReport, PassError> {
        let metrics = self.metrics.clone();
        measured(&metrics, self.pass_inner()).await
    }

    async fn next_done(&mut self) -> Self::Done {
        self.in_flight.next().await
    }

    /// Records how an action went; a spec Swarm accepted to roll out is
    /// remembered (see the module docs).
    fn finished(&mut self, done: &Self::Done) {
        record_outcome(&self.metrics, &mut self.failures, done, self.clock.now_ms());
        if done.result.is_ok()
            && let (Some(id), ServiceStep::Create { service } | ServiceStep::Update { service, .. }) =
                (done.action.worker, &done.action.step)
        {
            self.asked.insert(id, service.spec.hash());
        }
    }

    fn finish_ended(&mut self) {
        while let Some(done) = self.in_flight.try_next() {
            self.finished(&done);
        }
    }

    fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    async fn drain(&mut self, limit: Duration) {
        ServiceReconciler::drain(self, limit).await;
    }
}
