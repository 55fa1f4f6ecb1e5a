//! The planner: PURE. Given a snapshot of desired state (rows of
//! `user_workers`), actual state (managed containers, the image, the network)
//! and the crash-backoff book, it decides every container action of a pass,
//! each with a reason, and the status each worker should show.
//!
//! Architecture invariant: nothing here does I/O, reads the clock or
//! allocates ids; the same snapshot always yields the same plan.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::time::Duration;

use crate::exit;
use crate::model::{
    ContainerSpec, DesiredWorker, Intent, Limits, ManagedContainer, Revision, RunState, Status,
    WorkerId, WorkerRow, container_name, intent_of,
};
use crate::runtime::ImageState;

/// The settings a container spec is built from: everything but the worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecTemplate {
    pub instance: String,
    pub image: String,
    pub network: String,
    pub amqp_url: String,
    pub amqp_exchange: String,
    pub code_base_url: String,
    pub endpoint_devices: String,
    pub limits: Limits,
}

impl SpecTemplate {
    /// The spec of a worker's container, given the image id the tag resolved to.
    pub fn spec(&self, worker: &DesiredWorker, image_id: &str) -> ContainerSpec {
        let base = self.code_base_url.trim_end_matches('/');
        let mut env = BTreeMap::from([
            ("WORKER_ID".into(), worker.id.to_string()),
            ("AMQP_HOST".into(), self.amqp_url.clone()),
            ("AMQP_XCHG".into(), self.amqp_exchange.clone()),
            (
                "CODE_URL".into(),
                format!("{base}/{}/source?token={}", worker.id, worker.code_token),
            ),
            ("CODE_ENTRYPOINT".into(), worker.entrypoint.clone()),
            ("ENDPOINT_DEVICES".into(), self.endpoint_devices.clone()),
            ("WORKER_REVISION".into(), worker.revision.to_string()),
            ("CODE_SHA256".into(), worker.code_sha256.clone()),
        ]);
        if self.network == "host" {
            // Workers share the host's ports: a fixed health port would let
            // only the first one bind. Port 0 picks a free one.
            env.insert("WORKER_HEALTH_PORT".into(), "0".into());
        }
        ContainerSpec {
            worker_id: worker.id,
            revision: worker.revision,
            name: container_name(&self.instance, worker.id),
            image: self.image.clone(),
            image_id: image_id.to_string(),
            env,
            network: self.network.clone(),
            limits: self.limits.clone(),
        }
    }
}

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

/// Backoff timing, from the configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackoffPolicy {
    pub initial: Duration,
    pub max: Duration,
    /// A restarted container that ran this long is healthy again.
    pub reset: Duration,
}

impl BackoffPolicy {
    /// The delay before restart number `restarts + 1`: initial · 2^restarts, capped.
    pub fn delay(&self, restarts: u32) -> Duration {
        crate::backoff::delay(self.initial, self.max, restarts)
    }
}

/// Whether the pass could see what it needs to create containers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetworkState {
    Present,
    Missing,
}

/// Everything a pass observed. The planner sees nothing else.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub rows: Vec<WorkerRow>,
    pub containers: Vec<ManagedContainer>,
    pub image: ImageState,
    pub network: NetworkState,
    pub backoff: BTreeMap<WorkerId, Backoff>,
    /// Why each exited container exited, in its own words, by container id
    /// (see [`crate::exit::explain`]); absent when it said nothing useful.
    pub last_words: HashMap<String, String>,
    pub now_ms: i64,
}

/// What to do to one container or worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Create and start a container.
    Create { spec: ContainerSpec },
    /// Start an existing, stopped container.
    Start { container: ManagedContainer },
    /// Start a new container in place of an old one: the old one is renamed
    /// out of the way, the new one created and started, then the old one
    /// stopped gracefully and removed — the worker is never without one.
    Replace {
        old: ManagedContainer,
        spec: ContainerSpec,
    },
    /// Stop gracefully (if running) and remove.
    Remove { container: ManagedContainer },
}

/// One action of a plan, with why it is needed and the status to record
/// when it succeeds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Action {
    pub worker: Option<WorkerId>,
    pub step: Step,
    pub reason: String,
    pub on_success: Option<Verdict>,
}

impl Action {
    /// "create", "start", "replace" or "remove": for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self.step {
            Step::Create { .. } => "create",
            Step::Start { .. } => "start",
            Step::Replace { .. } => "replace",
            Step::Remove { .. } => "remove",
        }
    }

    /// The container the action is about, by name.
    pub fn target(&self) -> &str {
        match &self.step {
            Step::Create { spec } | Step::Replace { spec, .. } => &spec.name,
            Step::Start { container } | Step::Remove { container } => &container.name,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:<7} {}: {}", self.kind(), self.target(), self.reason)
    }
}

/// The status a worker should show, valid for one revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub id: WorkerId,
    pub revision: Revision,
    pub status: Status,
    pub info: String,
}

/// The decisions of one pass.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub actions: Vec<Action>,
    /// Statuses of workers that need no action (or whose status holds whatever
    /// the actions do).
    pub verdicts: Vec<Verdict>,
    /// The backoff book to carry into the next pass.
    pub backoff: BTreeMap<WorkerId, Backoff>,
    /// When the next pass must run at the latest (a pending restart), Unix ms.
    pub wake_at_ms: Option<i64>,
}

/// Decides one pass. See the module docs.
pub fn plan(snapshot: &Snapshot, template: &SpecTemplate, policy: &BackoffPolicy) -> Plan {
    let mut by_worker: BTreeMap<WorkerId, Vec<&ManagedContainer>> = BTreeMap::new();
    let mut plan = Plan::default();
    for c in &snapshot.containers {
        match c.worker_id {
            Some(id) => by_worker.entry(id).or_default().push(c),
            None => plan
                .actions
                .push(remove(None, c, "orphan: its worker label is unreadable")),
        }
    }
    let mut seen = BTreeSet::new();
    for row in &snapshot.rows {
        seen.insert(row.id);
        let containers = by_worker.get(&row.id).map(Vec::as_slice).unwrap_or(&[]);
        plan_worker(row, containers, snapshot, template, policy, &mut plan);
    }
    for (id, containers) in &by_worker {
        if !seen.contains(id) {
            for c in containers {
                plan.actions
                    .push(remove(Some(*id), c, "its worker no longer exists"));
            }
        }
    }
    plan
}

fn plan_worker(
    row: &WorkerRow,
    containers: &[&ManagedContainer],
    snapshot: &Snapshot,
    template: &SpecTemplate,
    policy: &BackoffPolicy,
    plan: &mut Plan,
) {
    match intent_of(row) {
        Intent::Stop => {
            for c in containers {
                plan.actions
                    .push(remove(Some(row.id), c, "the worker is disabled"));
            }
            plan.verdicts
                .push(verdict(row, Status::Unknown, "disabled: no container runs"));
        }
        Intent::Invalid(reason) => {
            // Leave any container as it is: it runs the last good code.
            plan.verdicts.push(verdict(row, Status::Error, &reason));
        }
        Intent::Run(worker) => {
            plan_running(row, &worker, containers, snapshot, template, policy, plan)
        }
    }
}

fn plan_running(
    row: &WorkerRow,
    worker: &DesiredWorker,
    containers: &[&ManagedContainer],
    snapshot: &Snapshot,
    template: &SpecTemplate,
    policy: &BackoffPolicy,
    plan: &mut Plan,
) {
    let image_id = match &snapshot.image {
        ImageState::Present { id } => id,
        ImageState::Missing => {
            let info = format!(
                "the worker image {} does not exist: build it with scripts/build-images \
                 (or set docker.image)",
                template.image
            );
            return plan.verdicts.push(verdict(row, Status::Error, &info));
        }
    };
    if snapshot.network == NetworkState::Missing {
        let info = format!(
            "the Docker network {} does not exist: create it (docker network create {}) \
             or set docker.network",
            template.network, template.network
        );
        return plan.verdicts.push(verdict(row, Status::Error, &info));
    }
    let spec = template.spec(worker, image_id);
    let hash = spec.hash();
    let current = |c: &&&ManagedContainer| {
        c.revision == Some(worker.revision) && c.spec_hash.as_deref() == Some(hash.as_str())
    };
    let keep = pick_best(containers.iter().filter(current).copied());
    let mut rest: Vec<&ManagedContainer> = containers
        .iter()
        .copied()
        .filter(|c| Some(c.id.as_str()) != keep.map(|k| k.id.as_str()))
        .collect();
    match keep {
        Some(kept) => {
            keep_running(row, worker, kept, snapshot, policy, plan);
        }
        None => {
            // Replace the container holding the name, if any, so the worker
            // keeps one running while the new one starts.
            let holder = rest.iter().position(|c| c.name == spec.name);
            let ready = verdict(
                row,
                Status::Ready,
                &running_info(worker.revision, &spec.name),
            );
            let action = match holder.map(|i| rest.remove(i)) {
                Some(old) => Action {
                    worker: Some(row.id),
                    reason: replace_reason(old, worker.revision, &hash),
                    step: Step::Replace {
                        old: old.clone(),
                        spec,
                    },
                    on_success: Some(ready),
                },
                None => Action {
                    worker: Some(row.id),
                    reason: format!("no container runs revision {}", worker.revision),
                    step: Step::Create { spec },
                    on_success: Some(ready),
                },
            };
            plan.actions.push(action);
        }
    }
    for c in rest {
        let why = if c.revision == Some(worker.revision) {
            "duplicate container"
        } else {
            "outdated container"
        };
        plan.actions.push(remove(Some(row.id), c, why));
    }
}

/// Decides what to do with the container that matches the desired spec.
fn keep_running(
    row: &WorkerRow,
    worker: &DesiredWorker,
    kept: &ManagedContainer,
    snapshot: &Snapshot,
    policy: &BackoffPolicy,
    plan: &mut Plan,
) {
    let book = snapshot
        .backoff
        .get(&row.id)
        .filter(|b| b.revision == worker.revision);
    match &kept.state {
        RunState::Running => {
            let healthy_since = book.map(|b| b.since_ms + policy.reset.as_millis() as i64);
            let info = match book {
                Some(b) if healthy_since.is_some_and(|t| snapshot.now_ms < t) => {
                    plan.backoff.insert(row.id, b.clone());
                    format!(
                        "{}; restarted {} time(s) after exit code {}",
                        running_info(worker.revision, &kept.name),
                        b.restarts,
                        exit_story(b.last_exit_code, b.last_words.as_deref())
                    )
                }
                _ => running_info(worker.revision, &kept.name),
            };
            plan.verdicts.push(verdict(row, Status::Ready, &info));
        }
        RunState::Created => plan.actions.push(Action {
            worker: Some(row.id),
            step: Step::Start {
                container: kept.clone(),
            },
            reason: "created but never started".into(),
            on_success: Some(verdict(
                row,
                Status::Ready,
                &running_info(worker.revision, &kept.name),
            )),
        }),
        RunState::Exited(code) => crashed(
            row,
            worker,
            kept,
            Exit {
                code: *code,
                words: snapshot.last_words.get(&kept.id).cloned(),
            },
            book,
            snapshot.now_ms,
            policy,
            plan,
        ),
        RunState::Other(state) => {
            let info = format!(
                "container {} is {state}; waiting for it to settle",
                kept.name
            );
            plan.verdicts.push(verdict(row, Status::Unknown, &info));
        }
    }
}

/// How a container exited: its code, and what it said last.
struct Exit {
    code: Option<i64>,
    words: Option<String>,
}

/// A container of the current revision that exited: restart it, with backoff.
#[allow(clippy::too_many_arguments)]
fn crashed(
    row: &WorkerRow,
    worker: &DesiredWorker,
    kept: &ManagedContainer,
    exit: Exit,
    book: Option<&Backoff>,
    now_ms: i64,
    policy: &BackoffPolicy,
    plan: &mut Plan,
) {
    let Some(book) = book else {
        // First crash seen: wait the initial delay before the first restart.
        let not_before_ms = now_ms + policy.delay(0).as_millis() as i64;
        let entry = Backoff {
            revision: worker.revision,
            restarts: 0,
            not_before_ms,
            since_ms: now_ms,
            last_exit_code: exit.code,
            last_words: exit.words,
        };
        return wait_for_restart(row, kept, entry, now_ms, plan);
    };
    let book = Backoff {
        last_exit_code: exit.code.or(book.last_exit_code),
        last_words: exit.words.or_else(|| book.last_words.clone()),
        ..book.clone()
    };
    if now_ms < book.not_before_ms {
        return wait_for_restart(row, kept, book, now_ms, plan);
    }
    let restarts = book.restarts + 1;
    let next = Backoff {
        restarts,
        since_ms: now_ms,
        not_before_ms: now_ms + policy.delay(restarts).as_millis() as i64,
        ..book
    };
    let info = format!(
        "container exited with code {}; restarted (restart {restarts}); see `workerctl worker logs {}`",
        exit_story(next.last_exit_code, next.last_words.as_deref()),
        row.name
    );
    plan.actions.push(Action {
        worker: Some(row.id),
        step: Step::Start {
            container: kept.clone(),
        },
        reason: format!(
            "exited with code {}; restart {restarts}",
            exit::code_text(next.last_exit_code)
        ),
        on_success: Some(verdict(row, Status::Error, &info)),
    });
    plan.backoff.insert(row.id, next);
}

fn wait_for_restart(
    row: &WorkerRow,
    kept: &ManagedContainer,
    entry: Backoff,
    now_ms: i64,
    plan: &mut Plan,
) {
    let wait = Duration::from_millis((entry.not_before_ms - now_ms).max(0) as u64);
    let info = format!(
        "container {} exited with code {} ({} restart(s) so far); next restart in {}; \
         see `workerctl worker logs {}`",
        kept.name,
        exit_story(entry.last_exit_code, entry.last_words.as_deref()),
        entry.restarts,
        humantime::format_duration(Duration::from_secs(wait.as_secs().max(1))),
        row.name
    );
    plan.verdicts.push(verdict(row, Status::Error, &info));
    plan.wake_at_ms = Some(
        plan.wake_at_ms
            .map_or(entry.not_before_ms, |t| t.min(entry.not_before_ms)),
    );
    plan.backoff.insert(row.id, entry);
}

/// Among interchangeable containers, prefer a running one, then the newest.
fn pick_best<'a>(
    candidates: impl Iterator<Item = &'a ManagedContainer>,
) -> Option<&'a ManagedContainer> {
    candidates.max_by_key(|c| (c.state == RunState::Running, c.created, c.id.clone()))
}

fn replace_reason(old: &ManagedContainer, revision: Revision, hash: &str) -> String {
    match old.revision {
        Some(r) if r != revision => format!("revision {r} → {revision}"),
        None => format!("unreadable revision → {revision}"),
        Some(_) if old.spec_hash.as_deref() != Some(hash) => {
            "container spec changed (image, environment or limits)".into()
        }
        Some(_) => "container replaced".into(),
    }
}

fn remove(worker: Option<WorkerId>, c: &ManagedContainer, reason: &str) -> Action {
    Action {
        worker,
        step: Step::Remove {
            container: c.clone(),
        },
        reason: reason.into(),
        on_success: None,
    }
}

fn verdict(row: &WorkerRow, status: Status, info: &str) -> Verdict {
    Verdict {
        id: row.id,
        revision: row.revision,
        status,
        info: info.into(),
    }
}

fn running_info(revision: Revision, container: &str) -> String {
    format!("running revision {revision} in container {container}")
}

/// "4: code_invalid: …": the exit code, its meaning, and the container's
/// last words when it had any.
fn exit_story(code: Option<i64>, words: Option<&str>) -> String {
    match words {
        Some(words) => format!("{}: {words}", exit::code_text(code)),
        None => exit::code_text(code),
    }
}

#[cfg(test)]
mod tests;
