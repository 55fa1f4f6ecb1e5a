//! The Swarm backend: one replicated service per worker, rolled out by
//! Swarm's own rolling update. A pass observes the services (one call), the
//! image, the network, the nodes (one call), and the tasks of all services
//! that run fewer than they want or whose image some nodes lacked (one
//! call, none while every service is whole), and of the nodes that are not
//! ready (one call, none while every node is);
//! [`plan_services`] decides; each step is one call to the swarm.
//!
//! What a pass leaves to the next: the scaler's decisions, and the spec
//! hash this daemon last had Swarm roll out per worker (the API does not
//! say which spec a rollback undid, so a rolled-back spec is not tried
//! again until the next save).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::{
    ActionError, Backend, Done, Observation, PassError, PassPlan, PassSettings, Planned, Shared,
};
use crate::model::QueueDepths;
use crate::model::{Rollout, WorkerId, WorkerRow};
use crate::plan::Slot;
use crate::plan::replicas::ScaleState;
use crate::plan::swarm::{ServiceAction, ServicePlan, ServiceSnapshot, ServiceStep, plan_services};
use crate::runtime::ServiceRuntime;
use crate::runtime::SwarmError;

/// The Swarm backend over `runtime` (a swarm manager).
pub struct Services<R> {
    runtime: Arc<R>,
}

impl<R: ServiceRuntime> Services<R> {
    pub fn new(runtime: Arc<R>) -> Self {
        Services { runtime }
    }
}

/// What a pass of the Swarm backend leaves to the next.
#[derive(Default)]
pub struct ServiceMemory {
    scale: BTreeMap<WorkerId, ScaleState>,
    asked: BTreeMap<WorkerId, String>,
    /// Services whose tasks to list although they run whole.
    watch: BTreeSet<String>,
}

impl<R: ServiceRuntime> Backend for Services<R> {
    type Snapshot = ServiceSnapshot;
    type Plan = ServicePlan;
    type Action = ServiceAction;
    type Memory = ServiceMemory;

    async fn observe(
        &self,
        shared: Shared,
        settings: &PassSettings,
        memory: &ServiceMemory,
    ) -> Result<ServiceSnapshot, PassError> {
        let services = self.runtime.list().await.map_err(PassError::Swarm)?;
        let template = &settings.template;
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
        let nodes = self.runtime.nodes().await.map_err(PassError::Swarm)?;
        // Tasks are listed for the services that lag, whose rollout failed,
        // or in which some nodes lacked the image last time; and every
        // task on a node that is not ready (the services it held count
        // them as running). Two calls at most, none while all is well.
        let lagging: Vec<_> = services
            .iter()
            .filter(|s| {
                s.running < u64::from(s.replicas)
                    || matches!(
                        s.rollout,
                        Rollout::Paused { .. } | Rollout::RolledBack { .. }
                    )
                    || memory.watch.contains(&s.id)
            })
            .collect();
        let not_ready: Vec<&str> = nodes
            .iter()
            .filter(|n| !n.is_ready())
            .map(|n| n.id.as_str())
            .collect();
        let report = self
            .runtime
            .tasks(&lagging, &not_ready)
            .await
            .map_err(PassError::Swarm)?;
        Ok(ServiceSnapshot {
            rows: shared.rows,
            services,
            image,
            network,
            scale: memory.scale.clone(),
            failures: shared.failures,
            busy: shared.busy,
            asked: memory.asked.clone(),
            watched: memory.watch.clone(),
            task_errors: report.errors,
            nodes,
            tasks: report.tasks,
            depths: shared.depths,
            depths_unknown: shared.depths_unknown,
            now_ms: shared.now_ms,
        })
    }

    fn plan(snapshot: &ServiceSnapshot, settings: &PassSettings) -> ServicePlan {
        plan_services(snapshot, &settings.template, &settings.policy)
    }

    /// Keeps the scaler's decisions, and which services to watch.
    fn remember(&self, plan: &ServicePlan, memory: &mut ServiceMemory) {
        memory.scale = plan.scale.clone();
        memory.watch = plan.watch.clone();
    }

    fn decisions(plan: ServicePlan) -> PassPlan<ServiceAction> {
        PassPlan {
            actions: plan.actions,
            verdicts: plan.verdicts,
            observed: plan.observed,
            wake_at_ms: plan.wake_at_ms,
        }
    }

    async fn apply(
        &self,
        action: &ServiceAction,
        _settings: &PassSettings,
    ) -> Result<Option<String>, ActionError> {
        apply(&*self.runtime, &action.step)
            .await
            .map_err(ActionError::from)
    }

    /// Remembers a spec Swarm accepted to roll out.
    fn finished(&self, done: &Done<ServiceAction>, _now_ms: i64, memory: &mut ServiceMemory) {
        if done.result.is_ok()
            && let (Some(id), ServiceStep::Create { service } | ServiceStep::Update { service, .. }) =
                (done.action.worker, &done.action.step)
        {
            memory.asked.insert(id, service.spec.hash());
        }
    }

    /// Forgets the books of workers that no longer exist.
    fn forget_gone(&self, snapshot: &ServiceSnapshot, memory: &mut ServiceMemory) {
        let rows: BTreeSet<WorkerId> = snapshot.rows.iter().map(|r| r.id).collect();
        memory.asked.retain(|id, _| rows.contains(id));
    }
}

/// Carries out one step; returns the id of a service it created.
async fn apply<R: ServiceRuntime>(
    runtime: &R,
    step: &ServiceStep,
) -> Result<Option<String>, SwarmError> {
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

impl Observation for ServiceSnapshot {
    fn rows(&self) -> &[WorkerRow] {
        &self.rows
    }
    fn depths(&self) -> Option<&QueueDepths> {
        self.depths.as_ref()
    }
}

impl Planned for ServiceAction {
    fn slot(&self) -> &Slot {
        &self.slot
    }
    fn worker(&self) -> Option<WorkerId> {
        self.worker
    }
    fn kind(&self) -> &'static str {
        ServiceAction::kind(self)
    }
    fn target(&self) -> &str {
        ServiceAction::target(self)
    }
}
