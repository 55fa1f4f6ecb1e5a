//! The container backend: one Docker container per replica of each worker.
//! A pass observes the worker containers (one list call), the image, the
//! network, why exited containers exited (one log read each), the ready
//! reports received and, for a new container that cannot report itself,
//! its queue's consumer count; [`crate::plan::plan`] decides; each step is
//! carried out here.
//!
//! The executor makes no decisions: every branch of [`apply`] is the
//! mechanics of one step, and failures are reported, not retried (the
//! planner decides when to try again). A slow step (a graceful stop waiting
//! out its grace period) delays only its worker: each runs as a task of its
//! own.
//!
//! What a pass leaves to the next: the planner's books, and when this
//! daemon started each container.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use futures::{StreamExt, stream};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::{
    ActionError, Backend, Done, Observation, PassError, PassPlan, PassSettings, Planned, Shared,
    Stopping,
};
use crate::backoff::error_chain;
use crate::consumers::ConsumerCounts;
use crate::exit;
use crate::metrics::Metrics;
use crate::model::{ManagedContainer, Owner, RunState, WorkerId, WorkerRow, parked_name};
use crate::model::{NetworkState, QueueDepths};
use crate::plan::Slot;
use crate::plan::containers::{Action, Books, Plan, Snapshot, Step, plan};
use crate::readiness::ReadyReports;
use crate::runtime::{ContainerRuntime, RuntimeError};

/// The signal for a container workerctl did not create, whose own stop
/// signal was never chosen for it: the configured one, else SIGINT —
/// SensorBucket's controller starts its image with none, and that image (a
/// Python PID 1 without handlers) ignores SIGTERM but stops on SIGINT.
fn foreign_signal(stopping: &Stopping) -> &str {
    stopping.signal.as_deref().unwrap_or("SIGINT")
}

/// Applies `step`; returns the id of the container it started, if any.
async fn apply<R: ContainerRuntime>(
    runtime: &R,
    step: &Step,
    stopping: &Stopping,
) -> Result<Option<String>, RuntimeError> {
    match step {
        Step::Create { spec } => {
            let id = runtime.create(spec).await?;
            runtime.start(&id).await?;
            Ok(Some(id))
        }
        Step::Start { container } => {
            runtime.start(&container.id).await?;
            Ok(Some(container.id.clone()))
        }
        Step::StartBeside { old, spec } => {
            // Free the name first so the new container can take it; the old
            // one keeps serving until a later pass sees the new one ready.
            let parked = parked_name(&old.name, old.short_id());
            runtime.rename(&old.id, &parked).await?;
            let id = runtime.create(spec).await?;
            runtime.start(&id).await?;
            Ok(Some(id))
        }
        Step::Remove { container } => {
            retire(runtime, container, stopping).await?;
            Ok(None)
        }
    }
}

/// Stops a container gracefully (its stop signal, then SIGKILL after the
/// timeout) and removes it. Never a bare force-remove of a running worker.
async fn retire<R: ContainerRuntime>(
    runtime: &R,
    container: &ManagedContainer,
    stopping: &Stopping,
) -> Result<(), RuntimeError> {
    let running = !matches!(container.state, RunState::Exited(_) | RunState::Created);
    match container.owner {
        _ if !running => {}
        Owner::Workerctl => runtime.stop(&container.id, stopping.timeout).await?,
        Owner::SensorBucket => {
            let signal = foreign_signal(stopping);
            runtime
                .interrupt(&container.id, signal, stopping.timeout)
                .await?
        }
    }
    runtime.remove(&container.id).await
}

/// The container backend over `runtime`.
pub struct Containers<R> {
    runtime: Arc<R>,
    reports: Arc<ReadyReports>,
    metrics: Arc<Metrics>,
    /// Consumer counts of the queues a rollout waits on.
    consumers: Option<ConsumerCounts>,
}

impl<R: ContainerRuntime> Containers<R> {
    /// Containers through `runtime`, ready when `reports` says so (or their
    /// health check, or the broker's count, or the guess).
    pub fn new(runtime: Arc<R>, reports: Arc<ReadyReports>, metrics: Arc<Metrics>) -> Self {
        Containers {
            runtime,
            reports,
            metrics,
            consumers: None,
        }
    }

    /// The same backend, asking the broker who consumes the queues of
    /// workers whose new container cannot say so itself.
    pub(crate) fn counting_consumers(mut self, counts: ConsumerCounts) -> Self {
        self.consumers = Some(counts);
        self
    }

    /// Drops the ready reports whose token is not their worker's, counting
    /// and logging each: nobody but the worker's container has its token.
    fn drop_forged_reports(&self, rows: &[WorkerRow]) {
        for report in self.reports.drop_forged(rows) {
            self.metrics.ready_reports_rejected.inc();
            warn!(
                worker = %report.worker,
                container = %report.container,
                "ignored a ready report with a wrong token: only the worker's container has its token"
            );
        }
    }

    /// Why each exited worker container exited, from its last lines: one
    /// Docker call per exited container, none for running ones. A container
    /// whose logs cannot be read is simply not explained.
    async fn last_words(
        &self,
        containers: &[ManagedContainer],
        concurrency: usize,
    ) -> HashMap<String, String> {
        let reads: Vec<_> = containers
            .iter()
            .filter(|c| c.worker_id.is_some() && matches!(c.state, RunState::Exited(_)))
            .map(|c| {
                let (runtime, id, name) = (Arc::clone(&self.runtime), c.id.clone(), c.name.clone());
                async move {
                    match runtime.last_lines(&id, exit::LINES_READ).await {
                        Ok(lines) => exit::explain(&lines).map(|words| (id, words)),
                        Err(e) => {
                            debug!(container = %name, error = %error_chain(&e), "cannot read why it exited");
                            None
                        }
                    }
                }
            })
            .collect();
        let explained: Vec<Option<(String, String)>> = stream::iter(reads)
            .buffer_unordered(concurrency.max(1))
            .collect()
            .await;
        explained.into_iter().flatten().collect()
    }

    async fn network(&self, name: &str) -> Result<NetworkState, PassError> {
        // Docker's built-in modes are not networks one can inspect by name.
        if matches!(name, "host" | "bridge" | "none") {
            return Ok(NetworkState::Present);
        }
        match self
            .runtime
            .network_exists(name)
            .await
            .map_err(PassError::Runtime)?
        {
            true => Ok(NetworkState::Present),
            false => Ok(NetworkState::Missing),
        }
    }

    fn record_start(&self, step: &Step, change: Option<std::time::Instant>) {
        match step {
            Step::Create { .. } | Step::StartBeside { .. } => {
                self.metrics.container_running(change)
            }
            Step::Start { container } if matches!(container.state, RunState::Exited(_)) => {
                self.metrics.restarts.inc();
            }
            _ => {}
        }
    }
}

/// What a pass of the container backend leaves to the next.
#[derive(Default)]
pub struct ContainerMemory {
    books: Books,
    /// When this daemon started each container, by id, Unix ms.
    started_ms: HashMap<String, i64>,
}

impl<R: ContainerRuntime> Backend for Containers<R> {
    type Snapshot = Snapshot;
    type Plan = Plan;
    type Action = Action;
    type Memory = ContainerMemory;

    async fn observe(
        &self,
        shared: Shared,
        settings: &PassSettings,
        memory: &ContainerMemory,
    ) -> Result<Snapshot, PassError> {
        let listed_at = Instant::now();
        let containers = self.runtime.list().await.map_err(PassError::Runtime)?;
        let template = &settings.template;
        let image = self
            .runtime
            .image(&template.image)
            .await
            .map_err(PassError::Runtime)?;
        let network = self.network(&template.network).await?;
        let last_words = self.last_words(&containers, settings.concurrency).await;
        self.drop_forged_reports(&shared.rows);
        let reports = self.reports.current(&containers, listed_at);
        Ok(Snapshot {
            rows: shared.rows,
            image,
            network,
            books: memory.books.clone(),
            failures: shared.failures,
            busy: shared.busy,
            reports,
            started_ms: memory.started_ms.clone(),
            last_words,
            depths: shared.depths,
            depths_unknown: shared.depths_unknown,
            consumers: match &self.consumers {
                Some(counts) => counts.as_of(listed_at).await,
                None => BTreeMap::new(),
            },
            containers,
            now_ms: shared.now_ms,
        })
    }

    fn plan(snapshot: &Snapshot, settings: &PassSettings) -> Plan {
        plan(snapshot, &settings.template, &settings.policy)
    }

    /// Keeps the books, and has the broker asked who consumes the queues
    /// of the workers the plan watches.
    fn remember(&self, plan: &Plan, memory: &mut ContainerMemory) {
        memory.books = plan.books.clone();
        if let Some(consumers) = &self.consumers {
            consumers.want(plan.watch_consumers.clone());
        }
    }

    fn decisions(plan: Plan) -> PassPlan<Action> {
        PassPlan {
            actions: plan.actions,
            verdicts: plan.verdicts,
            observed: plan.observed,
            wake_at_ms: plan.wake_at_ms,
        }
    }

    async fn apply(
        &self,
        action: &Action,
        settings: &PassSettings,
    ) -> Result<Option<String>, ActionError> {
        apply(&*self.runtime, &action.step, &settings.stopping)
            .await
            .map_err(ActionError::from)
    }

    /// Notes when the container an action started was started.
    fn finished(&self, done: &Done<Action>, now_ms: i64, memory: &mut ContainerMemory) {
        if let Ok(Some(container)) = &done.result {
            memory.started_ms.insert(container.clone(), now_ms);
            self.record_start(&done.action.step, done.change);
        }
    }

    /// Forgets the start times of containers no longer listed.
    fn forget_gone(&self, snapshot: &Snapshot, memory: &mut ContainerMemory) {
        let listed: BTreeSet<&str> = snapshot.containers.iter().map(|c| c.id.as_str()).collect();
        memory
            .started_ms
            .retain(|id, _| listed.contains(id.as_str()));
    }
}

impl Observation for Snapshot {
    fn rows(&self) -> &[WorkerRow] {
        &self.rows
    }
    fn depths(&self) -> Option<&QueueDepths> {
        self.depths.as_ref()
    }
}

impl Planned for Action {
    fn slot(&self) -> &Slot {
        &self.slot
    }
    fn worker(&self) -> Option<WorkerId> {
        self.worker
    }
    fn kind(&self) -> &'static str {
        Action::kind(self)
    }
    fn target(&self) -> &str {
        Action::target(self)
    }
}
