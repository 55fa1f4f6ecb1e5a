//! The container planner: PURE. Given a snapshot of desired state (rows of
//! `user_workers`), actual state (managed containers, the image, the
//! network), what containers reported, which workers have an action in
//! flight, and the books carried from the last pass, it decides every
//! container action of a pass, each with a reason, the status every worker
//! shows, what to record as observed, and when to look again.
//!
//! The rules, per worker:
//! - **One action at a time.** A worker with an action in flight is left
//!   alone (its status too); every other worker proceeds. At most one action
//!   per worker per pass; the end of an action wakes the loop for the next.
//! - **Start first, readiness gated.** A new revision's container starts
//!   beside the old one; the old one is retired only once the new one is
//!   ready (it reported consuming its queue, or its health check says so).
//!   If the new one exits or is not ready within `ready_timeout`, it goes,
//!   the old one keeps serving, and that spec is not tried again until the
//!   worker's code, revision or spec changes.
//! - **Crash loops back off**; a dockerworker that exits because its code is
//!   invalid waits for a fix instead.
//! - **A failed action is retried with per-worker backoff**, not on every
//!   wake-up.
//!
//! Architecture invariant: nothing here does I/O, reads the clock or
//! allocates ids; the same snapshot always yields the same plan.

mod takeover;
mod worker;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use super::replicas::ScaleState;
use super::{
    ActionFailure, Decision, Policy, Slot, SpecTemplate, Verdict, image_missing, network_missing,
    retry_at, scale_decision, scaled_to_zero, with_depth_note,
};
use crate::model::{
    ContainerSpec, ImageState, Intent, ManagedContainer, NetworkState, Observed, Owner,
    QueueDepths, Revision, RunState, Status, WorkerId, WorkerRow, intent_of,
};

/// Crash-loop bookkeeping of one worker, carried from pass to pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// The revision whose container keeps dying; a new revision starts afresh.
    pub revision: Revision,
    /// Restarts made so far.
    pub restarts: u32,
    /// Unix ms before which the container must not be restarted.
    pub not_before_ms: i64,
    /// Unix ms of the last restart (or of the first crash seen).
    pub since_ms: i64,
    pub last_exit_code: Option<i64>,
    /// What the container said last before that exit (see [`crate::exit`]).
    pub last_words: Option<String>,
}

/// A rollout that was given up: the new spec's container exited or was not
/// ready in time while an older container kept serving. That spec is not
/// tried again; a new save (new revision, code or spec) is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailedRollout {
    pub spec_hash: String,
    pub revision: Revision,
    /// Why, in one line: the container's last words, or what did not happen.
    pub why: String,
}

/// A worker whose container of SensorBucket's own controller workerctl
/// replaced (or began to).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Takeover {
    /// Unix ms when its removal was decided: a container of that
    /// controller created later was made again by it, still running.
    pub removed_at_ms: i64,
    /// The container removed, by id and by name.
    pub container_id: String,
    pub container: String,
    pub revision: Option<Revision>,
    /// The container that controller made again, if it did: workerctl then
    /// leaves its containers of this worker alone rather than fight.
    pub recreated: Option<String>,
}

/// What the planner carries from one pass to the next.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Books {
    /// Crash backoff per replica.
    pub backoff: BTreeMap<(WorkerId, u32), Backoff>,
    /// Per worker: all replicas share a spec hash, so a broken revision is
    /// given up for all of them.
    pub failed_rollouts: BTreeMap<WorkerId, FailedRollout>,
    /// What the scaler decided last, per worker.
    pub scale: BTreeMap<WorkerId, ScaleState>,
    /// Workers taken over from SensorBucket's controller.
    pub takeovers: BTreeMap<WorkerId, Takeover>,
}

/// A container's word that it consumes its queue: `POST /<id>/ready` with
/// what its `WORKER_READY_URL` carries. Taken as valid only if the token is
/// the worker's and the container and spec match a listed container.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReadyReport {
    pub worker: WorkerId,
    pub token: String,
    pub container: String,
    pub spec_hash: String,
}

impl ReadyReport {
    /// Whether this is the word of `c`: same spec, and the container's name,
    /// or the name it was parked under while its replacement starts.
    pub(crate) fn is_of(&self, c: &ManagedContainer) -> bool {
        c.spec_hash.as_ref() == Some(&self.spec_hash)
            && crate::model::was_named(&c.name, &self.container)
    }
}

/// Everything a pass observed. The planner sees nothing else.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub rows: Vec<WorkerRow>,
    pub containers: Vec<ManagedContainer>,
    pub image: ImageState,
    pub network: NetworkState,
    pub books: Books,
    /// Actions that failed, by slot, since that slot's last success.
    pub failures: BTreeMap<Slot, ActionFailure>,
    /// Slots with an action in flight: left alone this pass.
    pub busy: BTreeSet<Slot>,
    pub reports: BTreeSet<ReadyReport>,
    /// When this daemon started each container (by id), Unix ms; a container
    /// it did not start counts from its creation.
    pub started_ms: HashMap<String, i64>,
    /// Why each exited container exited, in its own words, by container id
    /// (see [`crate::exit::explain`]); absent when it said nothing useful.
    pub last_words: HashMap<String, String>,
    /// The latest queue depths; `None` while unknown (not read yet, or the
    /// management API cannot be read).
    pub depths: Option<QueueDepths>,
    /// Why `depths` is `None`, in one line (for the status).
    pub depths_unknown: String,
    /// Consumers on the queues of the workers the last plan asked to watch
    /// (`Plan::watch_consumers`); absent where the broker cannot count them.
    pub consumers: BTreeMap<WorkerId, ConsumerCount>,
    pub now_ms: i64,
}

/// A worker queue's consumers, as the broker counted them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsumerCount {
    /// Counted after `containers` was listed: a container missing from the
    /// list had closed its connection before, and is not in the count.
    Fresh(u32),
    /// Counted before (no later count came in time): it may hold the
    /// consumer of a container gone since, so it proves nothing but that the
    /// broker can count.
    Stale,
}

/// What to do to one container or worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Create and start a container.
    Create { spec: ContainerSpec },
    /// Start an existing, stopped container.
    Start { container: ManagedContainer },
    /// Create and start a container beside an older one of the same worker
    /// that holds the name: the old one is renamed out of the way and keeps
    /// running; a later pass retires it once the new one is ready.
    StartBeside {
        old: ManagedContainer,
        spec: ContainerSpec,
    },
    /// Stop gracefully (if running) and remove.
    Remove { container: ManagedContainer },
}

/// One action of a plan, with why it is needed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Action {
    pub slot: Slot,
    pub worker: Option<WorkerId>,
    pub step: Step,
    pub reason: String,
}

impl Action {
    /// "create", "start", "start-beside" or "remove": for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self.step {
            Step::Create { .. } => "create",
            Step::Start { .. } => "start",
            Step::StartBeside { .. } => "start-beside",
            Step::Remove { .. } => "remove",
        }
    }

    /// The container the action is about, by name.
    pub fn target(&self) -> &str {
        match &self.step {
            Step::Create { spec } | Step::StartBeside { spec, .. } => &spec.name,
            Step::Start { container } | Step::Remove { container } => &container.name,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:<12} {}: {}", self.kind(), self.target(), self.reason)
    }
}

/// The decisions of one pass.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub actions: Vec<Action>,
    /// The status of every worker that is not busy.
    pub verdicts: Vec<Verdict>,
    /// What every worker's containers look like, for `workerctl_observed`.
    pub observed: Vec<Observed>,
    /// The books to carry into the next pass.
    pub books: Books,
    /// When the next pass must run at the latest, Unix ms.
    pub wake_at_ms: Option<i64>,
    /// Workers with a new container that cannot say it consumes (no ready
    /// report, no health check): the broker's consumer count of their queue
    /// tells instead (see `consumers.rs`).
    pub watch_consumers: BTreeSet<WorkerId>,
}

impl Plan {
    fn wake_at(&mut self, at_ms: i64) {
        self.wake_at_ms = Some(self.wake_at_ms.map_or(at_ms, |t| t.min(at_ms)));
    }
}

/// Decides one pass. See the module docs.
pub(crate) fn plan(snapshot: &Snapshot, template: &SpecTemplate, policy: &Policy) -> Plan {
    let mut by_worker: BTreeMap<WorkerId, Vec<&ManagedContainer>> = BTreeMap::new();
    let mut plan = Plan::default();
    for c in &snapshot.containers {
        match c.worker_id {
            Some(id) => by_worker.entry(id).or_default().push(c),
            None => plan_orphan(c, snapshot, &mut plan),
        }
    }
    let mut seen = BTreeSet::new();
    for row in &snapshot.rows {
        seen.insert(row.id);
        let all = by_worker.get(&row.id).map(Vec::as_slice).unwrap_or(&[]);
        let taken = takeover::sort(row, all, snapshot, policy, &mut plan);
        plan_worker(
            row,
            &taken.containers,
            snapshot,
            template,
            policy,
            &mut plan,
        );
        taken.annotate(row.id, &mut plan);
    }
    for (id, containers) in &by_worker {
        if seen.contains(id) {
            continue;
        }
        // SensorBucket's controller's containers of workers not in this
        // store are never touched.
        for c in containers.iter().filter(|c| c.owner == Owner::Workerctl) {
            let slot = Slot::Container(c.id.clone());
            if !snapshot.busy.contains(&slot) {
                plan.actions
                    .push(remove(slot, *id, c, "its worker no longer exists"));
            }
        }
    }
    plan
}

/// One worker: how many replicas it needs, then each replica's decision
/// (a replica ≥ that count goes), and the one status of the worker.
fn plan_worker(
    row: &WorkerRow,
    containers: &[&ManagedContainer],
    snapshot: &Snapshot,
    template: &SpecTemplate,
    policy: &Policy,
    plan: &mut Plan,
) {
    let runs = matches!(intent_of(row), Intent::Run(_));
    let scaled = runs.then(|| {
        scale_decision(
            row,
            running_replicas(containers),
            &snapshot.books.scale,
            snapshot.depths.as_ref(),
            policy,
            snapshot.now_ms,
        )
    });
    if let Some(d) = &scaled {
        plan.books.scale.insert(row.id, d.state);
        if let Some(at) = d.wake_at_ms {
            plan.wake_at(at);
        }
    }
    let desired = scaled.as_ref().map_or(1, |d| d.desired);
    let mut replicas = replicas_of(containers);
    if runs {
        replicas.extend(0..desired);
    } else if replicas.is_empty() {
        // The status of a worker with no container comes from replica 0.
        replicas.insert(0);
    }
    let mut busy = false;
    // Whether the replicas so far run the current spec and are ready: a
    // replica replaces its container only then (one replica at a time).
    let mut may_roll = true;
    let mut verdicts = Vec::new();
    for replica in replicas {
        let mine: Vec<&ManagedContainer> = containers
            .iter()
            .copied()
            .filter(|c| c.replica == replica)
            .collect();
        if snapshot.busy.contains(&Slot::Replica(row.id, replica)) {
            carry_books(row.id, replica, snapshot, plan);
            busy = true;
            may_roll = false;
            continue;
        }
        let ctx = worker::Context {
            row,
            containers: &mine,
            snapshot,
            template,
            policy,
            replica,
            may_roll,
        };
        if runs && replica >= desired {
            ctx.scale_down(desired, plan);
            continue;
        }
        let (verdict, settled) = ctx.decide(plan);
        may_roll = may_roll && settled;
        verdicts.push(verdict);
    }
    let mut observed = observe(row.id, containers, &plan.books);
    // A disabled worker wants none; one the planner cannot act on keeps
    // what it has.
    let wanted = match intent_of(row) {
        Intent::Run(_) => desired,
        Intent::Stop => 0,
        Intent::Invalid(_) => u32::try_from(replicas_of(containers).len()).unwrap_or(u32::MAX),
    };
    observed.desired_replicas = i32::try_from(wanted).unwrap_or(i32::MAX);
    plan.observed.push(observed);
    if busy {
        // Nothing decided for a busy replica: no status either (as for one
        // container with an action in flight).
        return;
    }
    if let Some(v) = summary(row, scaled.as_ref(), desired, verdicts, snapshot, policy) {
        plan.verdicts.push(v);
    }
}

/// How many replicas of a worker have a running container.
fn running_replicas(containers: &[&ManagedContainer]) -> u32 {
    let running = containers
        .iter()
        .filter(|c| c.state == RunState::Running)
        .map(|c| c.replica)
        .collect::<BTreeSet<_>>()
        .len();
    u32::try_from(running).unwrap_or(u32::MAX)
}

/// The worker's one status, from its replicas' (in replica order): with one
/// replica, its own; with more, the first error, else the first that is not
/// ready, else ready.
fn summary(
    row: &WorkerRow,
    scaled: Option<&super::replicas::ScaleDecision>,
    desired: u32,
    verdicts: Vec<Verdict>,
    snapshot: &Snapshot,
    policy: &Policy,
) -> Option<Verdict> {
    if scaled.is_some() && desired == 0 {
        return Some(Verdict {
            id: row.id,
            revision: row.revision,
            status: Status::Ready,
            info: scaled_to_zero(policy),
        });
    }
    let n = verdicts.len();
    // The scaler's count is held without depths; fixed bounds need none.
    let first_error = verdicts.iter().position(|v| v.status == Status::Error);
    let first_pending = verdicts.iter().position(|v| v.status != Status::Ready);
    let mut verdict = match first_error.or(first_pending) {
        Some(i) => verdicts.into_iter().nth(i)?,
        None if n > 1 => Verdict {
            id: row.id,
            revision: row.revision,
            status: Status::Ready,
            info: format!("running revision {} in {n} replicas", row.revision),
        },
        None => verdicts.into_iter().next()?,
    };
    if let Some(d) = scaled {
        verdict.info = with_depth_note(verdict.info, d, &snapshot.depths_unknown);
    }
    Some(verdict)
}

/// The replicas that have containers.
fn replicas_of(containers: &[&ManagedContainer]) -> BTreeSet<u32> {
    containers.iter().map(|c| c.replica).collect()
}

fn plan_orphan(c: &ManagedContainer, snapshot: &Snapshot, plan: &mut Plan) {
    let slot = Slot::Container(c.id.clone());
    if !snapshot.busy.contains(&slot) {
        plan.actions.push(Action {
            slot,
            worker: None,
            step: Step::Remove {
                container: c.clone(),
            },
            reason: "orphan: its worker label is unreadable".into(),
        });
    }
}

/// A busy replica's books go on unchanged: nothing was decided about it.
fn carry_books(id: WorkerId, replica: u32, snapshot: &Snapshot, plan: &mut Plan) {
    if let Some(b) = snapshot.books.backoff.get(&(id, replica)) {
        plan.books.backoff.insert((id, replica), b.clone());
    }
    if let Some(f) = snapshot.books.failed_rollouts.get(&id) {
        plan.books.failed_rollouts.insert(id, f.clone());
    }
}

fn remove(slot: Slot, id: WorkerId, c: &ManagedContainer, reason: &str) -> Action {
    Action {
        slot,
        worker: Some(id),
        step: Step::Remove {
            container: c.clone(),
        },
        reason: reason.into(),
    }
}

/// What a worker's containers look like: the one that matters most (a
/// running one, else the newest), and the crash bookkeeping.
pub(crate) fn observe(id: WorkerId, containers: &[&ManagedContainer], books: &Books) -> Observed {
    let book = books.backoff.get(&(id, 0));
    let running_replicas = containers
        .iter()
        .filter(|c| c.state == RunState::Running)
        .map(|c| c.replica)
        .collect::<BTreeSet<_>>()
        .len();
    let running_replicas = i32::try_from(running_replicas).unwrap_or(i32::MAX);
    let (restarts, last_exit_code) =
        book.map_or((0, None), |b| (b.restarts as i32, b.last_exit_code));
    let current = containers
        .iter()
        .max_by_key(|c| (c.state == RunState::Running, c.created, c.id.clone()));
    match current {
        Some(c) => Observed {
            id,
            running_revision: (c.state == RunState::Running)
                .then_some(c.revision)
                .flatten(),
            container: Some(c.name.clone()),
            container_state: state_text(&c.state),
            restarts,
            last_exit_code: last_exit_code.or(match c.state {
                RunState::Exited(code) => code,
                _ => None,
            }),
            desired_replicas: 1,
            running_replicas,
        },
        None => Observed {
            id,
            running_revision: None,
            container: None,
            container_state: "absent".into(),
            restarts,
            last_exit_code,
            desired_replicas: 1,
            running_replicas,
        },
    }
}

/// A container's state in a word or two, as `worker show` prints it.
pub(crate) fn state_text(state: &RunState) -> String {
    match state {
        RunState::Running => "running".into(),
        RunState::Created => "created".into(),
        RunState::Exited(Some(code)) => format!("exited ({code})"),
        RunState::Exited(None) => "exited".into(),
        RunState::Other(s) => s.clone(),
    }
}

#[cfg(test)]
mod tests;
