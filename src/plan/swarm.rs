//! The planner of the Swarm backend: PURE, like the rest of `plan`. Each
//! worker is one replicated Swarm service, so the decisions are per worker,
//! not per container: create the service, update its spec (a new revision:
//! Swarm rolls it out one task at a time, start-first, health-gated, and
//! rolls a failure back), change its replica count, or remove it.
//!
//! What is shared with the container planner, so that both backends decide
//! alike: how a row is understood ([`intent_of`]), the container spec
//! ([`SpecTemplate::spec`]), the replica count ([`super::scale_decision`],
//! KEDA's rule), the retry backoff of failed actions, and the status texts
//! of what blocks every worker (no image, no network). What differs is only
//! who carries out a rollout: here Swarm does, and the planner reads where
//! it stands from the service's update status.
//!
//! The rules, per worker:
//! - one action at a time (a worker with an action in flight is left alone);
//! - a spec that Swarm rolled back is not tried again until the worker's
//!   code, revision or spec changes, and the status says why (which spec
//!   was rolled back is the one this daemon last asked for: the API keeps
//!   no record of it that bollard reads);
//! - while Swarm rolls out or rolls back, nothing is changed;
//! - the replica count follows the scaler, also after a rollback;
//! - tasks on a node that is not ready are not counted as running, and the
//!   status names the node while Swarm starts them again elsewhere; nodes
//!   that lack the service's image are named with what to do, and the
//!   service is watched (its tasks listed every pass) until they have it
//!   ([`nodes`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::{
    ActionFailure, Policy, Slot, SpecTemplate, Verdict, network_missing, retry_at, scale_decision,
    scaled_to_zero, service_image_missing, with_depth_note,
};
use crate::model::{
    ContainerSpec, DesiredWorker, Intent, ManagedService, Revision, Rollout, Status, WorkerId,
    WorkerRow, WorkerService, intent_of,
};
use crate::model::{ImageState, NetworkState, Observed, QueueDepths, SwarmNode, SwarmTask};
use crate::plan::replicas::ScaleState;

/// How often a pass looks again while a service converges (tasks start on
/// other nodes too, whose events this daemon does not see).
const CONVERGE_POLL_MS: i64 = 1_000;

/// Everything a Swarm pass observed.
#[derive(Clone, Debug)]
pub struct ServiceSnapshot {
    pub rows: Vec<WorkerRow>,
    pub services: Vec<ManagedService>,
    pub image: ImageState,
    pub network: NetworkState,
    /// What the scaler decided last, per worker.
    pub scale: BTreeMap<WorkerId, ScaleState>,
    /// Actions that failed, by slot, since that slot's last success.
    pub failures: BTreeMap<Slot, ActionFailure>,
    pub busy: BTreeSet<Slot>,
    /// The spec hash this daemon last had Swarm roll out, per worker (the
    /// API does not say which spec a rollback undid). A daemon that
    /// restarts has none, and a rolled-back spec is tried once more.
    pub asked: BTreeMap<WorkerId, String>,
    /// Why the tasks of a service that runs fewer than it wants fail, by
    /// service id, in Swarm's words.
    pub task_errors: HashMap<String, String>,
    /// The swarm's nodes.
    pub nodes: Vec<SwarmNode>,
    /// The tasks listed: those of the services that lag or are watched,
    /// and every task on a node that is not ready.
    pub tasks: Vec<SwarmTask>,
    /// The services the last pass watched (see [`ServicePlan::watch`]).
    pub watched: BTreeSet<String>,
    pub depths: Option<QueueDepths>,
    pub depths_unknown: String,
    pub now_ms: i64,
}

/// What to do to one worker's service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceStep {
    Create {
        service: WorkerService,
    },
    /// A new spec (revision, code, image or settings): Swarm's rolling update.
    Update {
        current: ManagedService,
        service: WorkerService,
    },
    /// The same spec, another replica count: tasks are added or removed,
    /// none is replaced.
    Scale {
        current: ManagedService,
        replicas: u32,
    },
    /// Swarm stops the tasks gracefully (SIGTERM, the grace period, SIGKILL).
    Remove {
        service: ManagedService,
    },
}

/// One action of a Swarm plan, with why it is needed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceAction {
    pub slot: Slot,
    pub worker: Option<WorkerId>,
    pub step: ServiceStep,
    pub reason: String,
}

impl ServiceAction {
    /// "create", "update", "scale" or "remove": for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self.step {
            ServiceStep::Create { .. } => "create",
            ServiceStep::Update { .. } => "update",
            ServiceStep::Scale { .. } => "scale",
            ServiceStep::Remove { .. } => "remove",
        }
    }

    /// The service the action is about, by name.
    pub fn target(&self) -> &str {
        match &self.step {
            ServiceStep::Create { service } | ServiceStep::Update { service, .. } => {
                &service.spec.name
            }
            ServiceStep::Scale { current, .. } => &current.name,
            ServiceStep::Remove { service } => &service.name,
        }
    }
}

impl std::fmt::Display for ServiceAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:<12} {}: {}", self.kind(), self.target(), self.reason)
    }
}

/// The decisions of one Swarm pass.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServicePlan {
    pub actions: Vec<ServiceAction>,
    /// The status of every worker that is not busy.
    pub verdicts: Vec<Verdict>,
    pub observed: Vec<Observed>,
    /// The scaler's decisions, to carry into the next pass.
    pub scale: BTreeMap<WorkerId, ScaleState>,
    /// When the next pass must run at the latest, Unix ms.
    pub wake_at_ms: Option<i64>,
    /// Services whose tasks the next pass must list although they run
    /// whole: some nodes lacked their image (see [`nodes`]).
    pub watch: BTreeSet<String>,
}

impl ServicePlan {
    fn wake_at(&mut self, at_ms: i64) {
        self.wake_at_ms = Some(self.wake_at_ms.map_or(at_ms, |t| t.min(at_ms)));
    }
}

/// The spec of a worker's service: replica 0's container spec (tasks are
/// numbered by Swarm), and no ready URL (a task's readiness is its health
/// check, which Swarm itself waits for).
pub(crate) fn service_spec(
    template: &SpecTemplate,
    worker: &DesiredWorker,
    image_id: &str,
) -> ContainerSpec {
    let mut spec = template.spec(worker, image_id, 0);
    spec.ready_url = None;
    spec
}

/// Decides one Swarm pass. See the module docs.
pub(crate) fn plan_services(
    snapshot: &ServiceSnapshot,
    template: &SpecTemplate,
    policy: &Policy,
) -> ServicePlan {
    let mut plan = ServicePlan::default();
    // Tasks on a node that is not ready do not serve, though Swarm counts
    // them as running until the node is back: neither does the planner.
    let services: Vec<ManagedService> = snapshot
        .services
        .iter()
        .map(|s| {
            let lost = nodes::on_nodes(s, "", &snapshot.tasks, &snapshot.nodes).lost_tasks();
            ManagedService {
                running: s.running.saturating_sub(lost),
                ..s.clone()
            }
        })
        .collect();
    let mut by_worker: BTreeMap<WorkerId, Vec<&ManagedService>> = BTreeMap::new();
    for s in &services {
        match s.worker_id {
            Some(id) => by_worker.entry(id).or_default().push(s),
            None => plan.remove(
                snapshot,
                Slot::Container(s.id.clone()),
                None,
                s,
                "orphan: its worker label is unreadable",
            ),
        }
    }
    let mut seen = BTreeSet::new();
    for row in &snapshot.rows {
        seen.insert(row.id);
        let services = by_worker.get(&row.id).map(Vec::as_slice).unwrap_or(&[]);
        Worker {
            row,
            services,
            snapshot,
            template,
            policy,
        }
        .decide(&mut plan);
    }
    for (id, services) in &by_worker {
        if !seen.contains(id)
            && let Some(s) = services.first()
        {
            plan.remove(
                snapshot,
                Slot::Worker(*id),
                Some(*id),
                s,
                "its worker no longer exists",
            );
        }
    }
    plan
}

impl ServicePlan {
    /// Removes `service` unless its slot is busy.
    fn remove(
        &mut self,
        snapshot: &ServiceSnapshot,
        slot: Slot,
        worker: Option<WorkerId>,
        service: &ManagedService,
        reason: &str,
    ) {
        if !snapshot.busy.contains(&slot) {
            self.actions.push(ServiceAction {
                slot,
                worker,
                step: ServiceStep::Remove {
                    service: service.clone(),
                },
                reason: reason.into(),
            });
        }
    }
}

/// One worker's part of the snapshot, and the settings.
struct Worker<'a> {
    row: &'a WorkerRow,
    services: &'a [&'a ManagedService],
    snapshot: &'a ServiceSnapshot,
    template: &'a SpecTemplate,
    policy: &'a Policy,
}

type Decision = super::Decision<ServiceStep>;

impl Worker<'_> {
    fn slot(&self) -> Slot {
        Slot::Worker(self.row.id)
    }

    /// The worker's service: the one of the expected name, else the first.
    fn service(&self) -> Option<&ManagedService> {
        let name = crate::model::container_name(&self.template.instance, self.row.id);
        self.services
            .iter()
            .find(|s| s.name == name)
            .or(self.services.first())
            .copied()
    }

    fn decide(&self, plan: &mut ServicePlan) {
        let id = self.row.id;
        let service = self.service();
        if self.snapshot.busy.contains(&self.slot()) {
            if let Some(state) = self.snapshot.scale.get(&id) {
                plan.scale.insert(id, *state);
            }
            plan.observed.push(observe(id, service, None));
            // Still watched: this pass decides nothing about it.
            if let Some(s) = service.filter(|s| self.snapshot.watched.contains(&s.id)) {
                plan.watch.insert(s.id.clone());
            }
            return;
        }
        // A second service of one worker (made by hand, or by another
        // name scheme) goes first: two would both consume its queue.
        if let Some(extra) = self
            .services
            .iter()
            .find(|s| Some(s.id.as_str()) != service.map(|s| s.id.as_str()))
        {
            plan.remove(
                self.snapshot,
                self.slot(),
                Some(id),
                extra,
                "a second service of this worker",
            );
            plan.observed.push(observe(id, service, None));
            return;
        }
        let (decision, desired) = match intent_of(self.row) {
            Intent::Stop => (self.stop(service), Some(0)),
            // The service is left as it is: it runs the last good code.
            Intent::Invalid(reason) => (Decision::status(Status::Error, reason), None),
            Intent::Run(worker) => {
                let (decision, desired) = self.run(&worker, service, plan);
                (decision, Some(desired))
            }
        };
        plan.observed.push(observe(id, service, desired));
        self.conclude(decision, plan);
    }

    fn stop(&self, service: Option<&ManagedService>) -> Decision {
        match service {
            Some(s) => Decision::status(
                Status::Unknown,
                format!("disabled: removing service {}", s.name),
            )
            .with(
                ServiceStep::Remove { service: s.clone() },
                "the worker is disabled",
            ),
            None => Decision::status(Status::Unknown, "disabled: no container runs"),
        }
    }

    /// The decision for a worker that should run, and its replica count.
    fn run(
        &self,
        worker: &DesiredWorker,
        service: Option<&ManagedService>,
        plan: &mut ServicePlan,
    ) -> (Decision, u32) {
        let running = service.map_or(0, |s| u32::try_from(s.running).unwrap_or(u32::MAX));
        let scaled = scale_decision(
            self.row,
            running,
            &self.snapshot.scale,
            self.snapshot.depths.as_ref(),
            self.policy,
            self.snapshot.now_ms,
        );
        plan.scale.insert(self.row.id, scaled.state);
        if let Some(at) = scaled.wake_at_ms {
            plan.wake_at(at);
        }
        let desired = scaled.desired;
        let image_id = match &self.snapshot.image {
            ImageState::Present { id } => id,
            ImageState::Missing => {
                return (
                    Decision::status(Status::Error, service_image_missing(&self.template.image)),
                    desired,
                );
            }
        };
        if let Some(why) = network_unusable(&self.snapshot.network, &self.template.network) {
            return (Decision::status(Status::Error, why), desired);
        }
        let spec = service_spec(self.template, worker, image_id);
        let mut decision = match service {
            None => self.create(spec, desired),
            Some(s) => self.keep(s, spec, desired, plan),
        };
        decision.info = with_depth_note(decision.info, &scaled, &self.snapshot.depths_unknown);
        (decision, desired)
    }

    fn create(&self, spec: ContainerSpec, replicas: u32) -> Decision {
        let revision = spec.revision;
        let status = match replicas {
            0 => Decision::status(Status::Ready, scaled_to_zero(self.policy)),
            n => Decision::status(
                Status::Unknown,
                format!("starting revision {revision} in {n} replica(s)"),
            ),
        };
        status.with(
            ServiceStep::Create {
                service: WorkerService { spec, replicas },
            },
            format!("no service runs revision {revision}"),
        )
    }

    /// A worker that has its service: roll out, scale, or report.
    fn keep(
        &self,
        current: &ManagedService,
        spec: ContainerSpec,
        desired: u32,
        plan: &mut ServicePlan,
    ) -> Decision {
        let hash = spec.hash();
        let revision = spec.revision;
        // Looked at whatever the rollout's state: a service whose image
        // some nodes lack stays watched through it.
        let found = nodes::on_nodes(
            current,
            spec.service_image(),
            &self.snapshot.tasks,
            &self.snapshot.nodes,
        );
        if !found.without_image.is_empty() {
            plan.watch.insert(current.id.clone());
        }
        let is_current = current.spec_hash.as_deref() == Some(hash.as_str());
        // This daemon asked Swarm for this very spec, and Swarm undoes it.
        let ours = !is_current && self.snapshot.asked.get(&self.row.id) == Some(&hash);
        match &current.rollout {
            Rollout::RollingBack { message } if ours => {
                plan.wake_at(self.snapshot.now_ms + CONVERGE_POLL_MS);
                return Decision::status(
                    Status::Unknown,
                    format!(
                        "revision {revision} failed its rollout; Swarm rolls it back: {message}; {}",
                        keeps_serving(current.revision)
                    ),
                );
            }
            Rollout::RolledBack { message } if ours => {
                // That spec failed; the one Swarm rolled back to keeps
                // serving, and scales as demand says.
                let info = format!(
                    "revision {revision} does not start: Swarm rolled it back ({message}){}; {}",
                    self.task_error(current),
                    keeps_serving(current.revision)
                );
                return self.scale(current, desired, Decision::status(Status::Error, info));
            }
            Rollout::Paused { message } if ours => {
                return Decision::status(
                    Status::Error,
                    format!(
                        "revision {revision} does not start and Swarm paused its rollback: \
                         {message}{}; save the worker again to retry",
                        self.task_error(current)
                    ),
                );
            }
            _ => {}
        }
        if !is_current {
            let reason = match current.revision {
                Some(r) if r != revision => format!("revision {r} → {revision}"),
                Some(_) => "spec changed".to_string(),
                None => format!("unreadable revision → {revision}"),
            };
            let info = format!(
                "rolling out revision {revision}: one task at a time, start-first; {}",
                keeps_serving(current.revision)
            );
            plan.wake_at(self.snapshot.now_ms + CONVERGE_POLL_MS);
            return Decision::status(Status::Unknown, info).with(
                ServiceStep::Update {
                    current: current.clone(),
                    service: WorkerService {
                        spec,
                        replicas: desired,
                    },
                },
                reason,
            );
        }
        let (running, wanted) = (current.running, current.replicas);
        match &current.rollout {
            Rollout::Updating => {
                plan.wake_at(self.snapshot.now_ms + CONVERGE_POLL_MS);
                Decision::status(
                    Status::Unknown,
                    format!(
                        "rolling out revision {revision}: one task at a time, start-first \
                         ({running} of {wanted} running)"
                    ),
                )
            }
            Rollout::RollingBack { message } => {
                plan.wake_at(self.snapshot.now_ms + CONVERGE_POLL_MS);
                Decision::status(
                    Status::Unknown,
                    format!(
                        "revision {revision} failed its rollout; Swarm rolls it back: {message}"
                    ),
                )
            }
            Rollout::Paused { message } => Decision::status(
                Status::Error,
                format!(
                    "Swarm paused the rollout of revision {revision}: {message}{}; save the \
                     worker again to retry",
                    self.task_error(current)
                ),
            ),
            Rollout::Settled | Rollout::RolledBack { .. } => {
                let status = self.settled(current, &spec, &found, plan);
                self.scale(current, desired, status)
            }
        }
    }

    /// The status of a service at the current spec with no rollout going on.
    /// Tasks on nodes that are not ready do not count as running.
    fn settled(
        &self,
        current: &ManagedService,
        spec: &ContainerSpec,
        found: &nodes::OnNodes,
        plan: &mut ServicePlan,
    ) -> Decision {
        let revision = spec.revision;
        // Already without the tasks lost with nodes (see `plan_services`).
        let running = current.running;
        let wanted = u64::from(current.replicas);
        let image = (!found.without_image.is_empty()).then(|| {
            nodes::image_not_on_nodes(&self.template.image, &spec.image_id, &found.without_image)
        });
        if wanted == 0 {
            return Decision::status(Status::Ready, scaled_to_zero(self.policy));
        }
        if running >= wanted {
            if running > wanted {
                // Tasks on their way out (Swarm stops a replaced task a
                // little after its successor is healthy): look again, so
                // that what is observed settles without waiting for an event.
                plan.wake_at(self.snapshot.now_ms + CONVERGE_POLL_MS);
            }
            let mut info = format!(
                "running revision {revision} in {wanted} replica(s) of service {}",
                current.name
            );
            if !found.lost.is_empty() {
                info.push_str(&format!(
                    "; {}: they run on the other nodes now",
                    nodes::nodes_lost(&found.lost)
                ));
            }
            if let Some(image) = image {
                info.push_str(&format!("; but {image}"));
            }
            return Decision::status(Status::Ready, info);
        }
        plan.wake_at(self.snapshot.now_ms + CONVERGE_POLL_MS);
        if !found.lost.is_empty() {
            let mut info = format!(
                "{}: Swarm starts them again on the remaining nodes ({running} of {wanted} \
                 replica(s) of revision {revision} running)",
                nodes::nodes_lost(&found.lost)
            );
            if let Some(image) = image {
                info.push_str(&format!("; {image}"));
            }
            return Decision::status(Status::Unknown, info);
        }
        if let Some(image) = image {
            return Decision::status(
                Status::Error,
                format!("{running} of {wanted} replica(s) of revision {revision} running: {image}"),
            );
        }
        match self.snapshot.task_errors.get(&current.id) {
            Some(error) => Decision::status(
                Status::Error,
                format!(
                    "{running} of {wanted} replica(s) of revision {revision} running; a task \
                     failed: {error} (docker service ps {})",
                    current.name
                ),
            ),
            None => Decision::status(
                Status::Unknown,
                format!("starting revision {revision}: {running} of {wanted} replica(s) running"),
            ),
        }
    }

    /// Adds a change of the replica count to `decision` if one is due.
    fn scale(&self, current: &ManagedService, desired: u32, decision: Decision) -> Decision {
        if current.replicas == desired {
            return decision;
        }
        let reason = format!("scale {} → {desired} replica(s)", current.replicas);
        decision.with(
            ServiceStep::Scale {
                current: current.clone(),
                replicas: desired,
            },
            reason,
        )
    }

    fn task_error(&self, service: &ManagedService) -> String {
        self.snapshot
            .task_errors
            .get(&service.id)
            .map(|e| format!("; a task said: {e}"))
            .unwrap_or_default()
    }

    /// Adds the decision's action to the plan (unless it waits out a retry
    /// backoff) and its status.
    fn conclude(&self, decision: Decision, plan: &mut ServicePlan) {
        let mut verdict = Verdict {
            id: self.row.id,
            revision: self.row.revision,
            status: decision.status,
            info: decision.info,
        };
        if let Some((step, reason)) = decision.step {
            let action = ServiceAction {
                slot: self.slot(),
                worker: Some(self.row.id),
                step,
                reason,
            };
            let retry = retry_at(
                self.snapshot.failures.get(&action.slot),
                action.kind(),
                action.target(),
                self.policy,
                self.snapshot.now_ms,
            );
            match retry {
                Some((at, info)) if self.snapshot.now_ms < at => {
                    verdict.status = Status::Error;
                    verdict.info = info;
                    plan.wake_at(at);
                }
                _ => plan.actions.push(action),
            }
        }
        plan.verdicts.push(verdict);
    }
}

/// Why Swarm services cannot join the configured network, if they cannot.
fn network_unusable(state: &NetworkState, network: &str) -> Option<String> {
    match state {
        NetworkState::Present => None,
        NetworkState::Missing => Some(network_missing(network)),
        NetworkState::LocalOnly { driver } => Some(format!(
            "the Docker network {network} ({driver}) is local to one engine and Swarm services \
             cannot join it: create an overlay network (docker network create -d overlay \
             --attachable {network}) or set docker.network = \"host\""
        )),
    }
}

fn keeps_serving(revision: Option<Revision>) -> String {
    match revision {
        Some(r) => format!("revision {r} keeps serving"),
        None => "the running tasks keep serving".into(),
    }
}

/// What a worker's service looks like, for `workerctl_observed`.
/// `desired`: the replicas wanted, `None` when the planner cannot act on
/// the worker (it keeps what it has).
fn observe(id: WorkerId, service: Option<&ManagedService>, desired: Option<u32>) -> Observed {
    let running = service.map_or(0, |s| s.running);
    let kept = service.map_or(0, |s| s.replicas);
    let to_i32 = |n: u64| i32::try_from(n).unwrap_or(i32::MAX);
    Observed {
        id,
        running_revision: service.filter(|s| s.running > 0).and_then(|s| s.revision),
        container: service.map(|s| s.name.clone()),
        container_state: match service {
            None => "absent".into(),
            Some(s) => {
                let rollout = match &s.rollout {
                    Rollout::Settled => "",
                    Rollout::Updating => ", updating",
                    Rollout::RollingBack { .. } => ", rolling back",
                    Rollout::RolledBack { .. } => ", rolled back",
                    Rollout::Paused { .. } => ", update paused",
                };
                format!("service: {running}/{} running{rollout}", s.replicas)
            }
        },
        restarts: 0,
        last_exit_code: None,
        desired_replicas: to_i32(u64::from(desired.unwrap_or(kept))),
        running_replicas: to_i32(running),
    }
}

mod nodes;
#[cfg(test)]
mod tests;
