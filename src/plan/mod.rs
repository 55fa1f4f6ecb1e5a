//! The planner: PURE. It imports only the vocabulary (`model`) and pure
//! rules (`backoff`, `exit`): nothing here does I/O, reads the clock or
//! allocates ids, and the same snapshot always yields the same plan.
//!
//! One planner per backend, each deciding from a snapshot of its own —
//! [`containers`] (one container per replica, rolled out start-first by
//! workerctl itself) and [`swarm`] (one service per worker, rolled out by
//! Swarm) — over what both share, kept here: the container spec a worker's
//! row makes ([`SpecTemplate`]), the timing ([`Policy`]), who an action is
//! for ([`Slot`]), the status a worker shows ([`Verdict`]), the retry
//! backoff of a failed action, the status texts, and the replica count
//! ([`replicas`], KEDA's rule).
//!
//! A third backend (Kubernetes, say) adds a planner file beside these two,
//! over the same shared words.

pub(crate) mod containers;
#[cfg(test)]
mod fixtures;
pub(crate) mod replicas;
pub(crate) mod swarm;

use std::collections::BTreeMap;
use std::time::Duration;

use crate::model::{
    ContainerSpec, Demand, DesiredWorker, Hardening, Limits, QueueDepths, Revision, Status,
    WorkerId, WorkerRow, container_name, replica_name,
};
use replicas::{ScaleReason, ScaleState};

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
    pub hardening: Hardening,
    /// `docker.stop_signal`: `None` lets the runtime choose by the image.
    pub stop_signal: Option<String>,
    /// `record.keep` while recording is on: a worker runtime that records
    /// itself (`WORKER_RECORD_KEEP`, see `recorder`) keeps that many.
    pub record_keep: Option<i64>,
}

impl SpecTemplate {
    /// The spec of replica `replica` of a worker's container, given the
    /// image id the tag resolved to.
    pub fn spec(&self, worker: &DesiredWorker, image_id: &str, replica: u32) -> ContainerSpec {
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
        if worker.debug {
            // Part of the spec (and its hash): turning debugging on or off
            // replaces the container, like a new revision.
            env.insert("WORKER_DEBUG".into(), "1".into());
        }
        if let Some(keep) = self.record_keep {
            env.insert("WORKER_RECORD_KEEP".into(), keep.to_string());
        }
        if self.network == "host" {
            // Workers share the host's ports: a fixed health port would let
            // only the first one bind. Port 0 picks a free one.
            env.insert("WORKER_HEALTH_PORT".into(), "0".into());
        }
        let mut spec = ContainerSpec {
            worker_id: worker.id,
            revision: worker.revision,
            replica,
            name: replica_name(&container_name(&self.instance, worker.id), replica),
            image: self.image.clone(),
            image_id: image_id.to_string(),
            env,
            network: self.network.clone(),
            limits: self.limits.clone(),
            hardening: self.hardening.clone(),
            stop_signal: self.stop_signal.clone(),
            ready_url: None,
        };
        // The report names the container and its spec, so that only this
        // container's word makes it ready (see `ReadyReport`).
        spec.ready_url = Some(format!(
            "{base}/{}/ready?token={}&container={}&spec={}",
            worker.id,
            worker.code_token,
            spec.name,
            spec.hash()
        ));
        spec
    }
}

/// What a worker (or replica) needs now, on either backend: at most one
/// step with its reason, and the status meanwhile.
struct Decision<S> {
    step: Option<(S, String)>,
    status: Status,
    info: String,
}

impl<S> Decision<S> {
    fn status(status: Status, info: impl Into<String>) -> Self {
        Decision {
            step: None,
            status,
            info: info.into(),
        }
    }

    fn with(mut self, step: S, reason: impl Into<String>) -> Self {
        self.step = Some((step, reason.into()));
        self
    }
}

/// An action that failed, as the loop recorded it: the planner decides when
/// to try again (per-worker backoff) and what the status says meanwhile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActionFailure {
    /// `Action::kind` and `Action::target` of the failed action: only the
    /// same action waits; a different one (the worker was disabled, say)
    /// goes ahead at once.
    pub kind: &'static str,
    pub target: String,
    /// Consecutive failures of that action.
    pub attempts: u32,
    /// Unix ms of the last failure.
    pub at_ms: i64,
    /// The error chain, in one line.
    pub error: String,
}

/// Timing of the decisions, from the configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// First delay before restarting a crash (or retrying a failed action).
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// A restarted container that ran this long is healthy again.
    pub backoff_reset: Duration,
    /// How long a new container may take to become ready.
    pub ready_timeout: Duration,
    /// An image that tells nothing of its readiness is taken as ready after
    /// running this long.
    pub assume_ready_after: Duration,
    /// How long demand must stay lower before replicas are removed.
    pub scale_cooldown: Duration,
    /// How often queue depths are read (for the status of a worker at zero).
    pub depth_poll: Duration,
    /// Replace SensorBucket's controller's containers (`docker.takeover`).
    pub takeover: bool,
}

impl Policy {
    /// The delay before attempt `n + 1`: initial · 2^n, capped.
    pub fn delay(&self, n: u32) -> Duration {
        crate::backoff::delay(self.backoff_initial, self.backoff_max, n)
    }
}

/// Who an action is for: one replica of a worker, or an unlabelled
/// container. The loop runs at most one action per slot, so the replicas of
/// a worker act in parallel.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Slot {
    Replica(WorkerId, u32),
    /// All of a worker: its Swarm service.
    Worker(WorkerId),
    /// A container (or service) by id, whose worker label is unreadable.
    Container(String),
}

impl Slot {
    /// The worker the slot belongs to, if it is known.
    pub fn worker(&self) -> Option<WorkerId> {
        match self {
            Slot::Replica(id, _) | Slot::Worker(id) => Some(*id),
            Slot::Container(_) => None,
        }
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

/// The replica count of a worker that should run, given how many run now
/// (what a daemon that has not decided for it yet adopts). Shared by both
/// backends: containers and Swarm services scale alike.
fn scale_decision(
    row: &WorkerRow,
    running: u32,
    decided: &BTreeMap<WorkerId, ScaleState>,
    depths: Option<&QueueDepths>,
    policy: &Policy,
    now_ms: i64,
) -> replicas::ScaleDecision {
    let previous = decided
        .get(&row.id)
        .copied()
        .unwrap_or_else(|| ScaleState::adopt(running));
    let demand = depths.map_or(Demand::Unknown, |d| d.demand(row.id));
    replicas::desired_replicas(
        demand,
        row.scale,
        previous,
        ms(policy.scale_cooldown),
        now_ms,
    )
}

/// The status of a worker scaled to zero.
fn scaled_to_zero(policy: &Policy) -> String {
    format!(
        "scaled to zero: no messages wait; one brings a replica back at the next depth read \
         (every {})",
        humantime::format_duration(policy.depth_poll)
    )
}

/// A status line, with why the replica count is held if the depth is unknown.
fn with_depth_note(info: String, scaled: &replicas::ScaleDecision, unknown: &str) -> String {
    match scaled.reason {
        ScaleReason::DepthUnknown => format!(
            "{info}; queue depth unknown: {unknown}; holding {} replica(s)",
            scaled.desired
        ),
        _ => info,
    }
}

/// Why no worker can start: the image is missing.
fn image_missing(image: &str) -> String {
    format!(
        "the worker image {image} does not exist: build it with scripts/build-images \
         (or set docker.image)"
    )
}

/// Why no service can start on a swarm: the image is not there. A tag in a
/// registry is what the nodes pull, so it must be in the registry.
fn service_image_missing(image: &str) -> String {
    match crate::model::registry_of(image) {
        Some(registry) => format!(
            "the worker image {image} is not in its registry {registry}, or the manager \
             cannot reach that registry: push it there (docker push {image}), or set \
             docker.image"
        ),
        None => image_missing(image),
    }
}

/// Why no worker can start: the network is missing.
fn network_missing(network: &str) -> String {
    format!(
        "the Docker network {network} does not exist: create it (docker network \
         create {network}) or set docker.network"
    )
}

/// When the action that failed last may be tried again (per-slot
/// exponential backoff), and the status meanwhile; `None` if `failure` is
/// of another action (a different action goes ahead at once).
fn retry_at(
    failure: Option<&ActionFailure>,
    kind: &str,
    target: &str,
    policy: &Policy,
    now_ms: i64,
) -> Option<(i64, String)> {
    let f = failure.filter(|f| f.kind == kind && f.target == target)?;
    let delay = policy.delay(f.attempts.saturating_sub(1));
    let at = f.at_ms + ms(delay);
    let wait = Duration::from_millis((at - now_ms).max(0) as u64);
    let info = format!(
        "{} of {} failed: {}; retrying in {} (attempt {})",
        f.kind,
        f.target,
        f.error,
        humantime::format_duration(Duration::from_secs(wait.as_secs().max(1))),
        f.attempts + 1
    );
    Some((at, info))
}

impl ActionFailure {
    /// The failure book of a slot after `kind` of `target` failed again:
    /// attempts count up for the same action and start over for another.
    pub fn after(
        previous: Option<&ActionFailure>,
        kind: &'static str,
        target: &str,
        at_ms: i64,
        error: String,
    ) -> ActionFailure {
        let same = previous.filter(|f| f.kind == kind && f.target == target);
        ActionFailure {
            kind,
            target: target.to_string(),
            attempts: same.map_or(0, |f| f.attempts) + 1,
            at_ms,
            error,
        }
    }
}

/// A duration in Unix ms arithmetic.
fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
