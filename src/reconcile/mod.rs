//! One reconcile pass, and the actions it leaves running: read the store →
//! observe the runtime → plan → record statuses → start the actions. A pass
//! takes no input: whatever woke it, it re-reads everything.
//!
//! One [`Reconciler`] drives every backend. What differs between them is a
//! [`Backend`]: what a pass observes of the runtime, which pure planner
//! decides, and how a step is carried out — [`containers`] (one container
//! per replica, through the Docker API) and [`swarm`] (one replicated
//! service per worker). Everything else is kept here once: reading the
//! store, the actions in flight, the failure book behind each worker's
//! retry backoff, the statuses written, the leadership checks before each
//! pass and each action, the queue depths, and the clock.
//!
//! Actions run as tasks of their own (at most `concurrency` talk to the
//! runtime at once), so a pass never waits for one: the workers with an
//! action in flight are "busy" and the planner leaves them alone until it
//! ends. The end of an action is recorded here ([`Reconciler::finished`])
//! and wakes the loop for the next pass. Nothing here decides anything.

pub mod containers;
mod in_flight;
mod publish;
pub mod swarm;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::backoff::error_chain;
use crate::config::Config;
use crate::leader::{LeaderError, Leadership};
use crate::metrics::Metrics;
use crate::model::{Observed, QueueDepths};
use crate::model::{WorkerId, WorkerRow};
use crate::plan::{ActionFailure, Policy, Slot, SpecTemplate, Verdict};
use crate::runtime::RuntimeError;
use crate::runtime::SwarmError;
use crate::scale::depths::Reading;
use crate::store::{StoreError, WorkerStore};
use in_flight::InFlight;
use publish::StatusWriter;

/// What differs between backends, and only that. A backend is shared by the
/// pass and the action tasks (`&self` only); what it carries from one pass
/// to the next is its [`Backend::Memory`], kept by the reconciler.
pub trait Backend: Send + Sync + 'static {
    /// Everything its planner sees.
    type Snapshot: Observation + Send + Sync;
    /// Its planner's decisions.
    type Plan: Send;
    /// One action of a plan.
    type Action: Planned + fmt::Display + Send + Sync + 'static;
    /// What one pass leaves to the next, besides what every backend keeps.
    type Memory: Default + Send + Sync;

    /// Observes the runtime, with a constant number of calls whatever the
    /// number of workers, and completes `shared` into the planner's input.
    fn observe(
        &self,
        shared: Shared,
        settings: &PassSettings,
        memory: &Self::Memory,
    ) -> impl Future<Output = Result<Self::Snapshot, PassError>> + Send;

    /// Decides, without I/O.
    fn plan(snapshot: &Self::Snapshot, settings: &PassSettings) -> Self::Plan;

    /// Keeps what the next pass needs of `plan`.
    fn remember(&self, plan: &Self::Plan, memory: &mut Self::Memory);

    /// What every backend's plan holds.
    fn decisions(plan: Self::Plan) -> PassPlan<Self::Action>;

    /// Carries out one action; the id of what it started, if anything.
    fn apply(
        &self,
        action: &Self::Action,
        settings: &PassSettings,
    ) -> impl Future<Output = Result<Option<String>, ActionError>> + Send;

    /// Records, in `memory`, how an action went.
    fn finished(&self, done: &Done<Self::Action>, now_ms: i64, memory: &mut Self::Memory);

    /// Forgets, in `memory`, what `snapshot` no longer shows.
    fn forget_gone(&self, snapshot: &Self::Snapshot, memory: &mut Self::Memory);
}

/// What every backend's planner sees besides the runtime: read or kept here.
#[derive(Clone, Debug)]
pub struct Shared {
    pub rows: Vec<WorkerRow>,
    /// Actions that failed, by slot, since that slot's last success.
    pub failures: BTreeMap<Slot, ActionFailure>,
    /// Slots with an action in flight: left alone this pass.
    pub busy: BTreeSet<Slot>,
    pub depths: Option<QueueDepths>,
    /// Why `depths` is `None`, in one line.
    pub depths_unknown: String,
    pub now_ms: i64,
}

/// What the reconciler needs of any backend's snapshot.
pub trait Observation {
    fn rows(&self) -> &[WorkerRow];
    fn depths(&self) -> Option<&QueueDepths>;
}

/// What every backend's plan holds.
#[derive(Debug)]
pub struct PassPlan<A> {
    pub actions: Vec<A>,
    /// The status of every worker that is not busy.
    pub verdicts: Vec<Verdict>,
    /// What every worker runs, for `workerctl_observed`.
    pub observed: Vec<Observed>,
    /// When the next pass must run at the latest, Unix ms.
    pub wake_at_ms: Option<i64>,
}

/// What both backends' actions say of themselves, for logs, metrics and
/// the failure book.
pub trait Planned {
    fn slot(&self) -> &Slot;
    fn worker(&self) -> Option<WorkerId>;
    fn kind(&self) -> &'static str;
    fn target(&self) -> &str;
}

/// Why a pass could not even look at the world. Containers are left as they are.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error("cannot read the worker store")]
    Store(#[source] StoreError),
    #[error("cannot observe the container runtime")]
    Runtime(#[source] RuntimeError),
    #[error("cannot observe the swarm")]
    Swarm(#[source] SwarmError),
}

/// Why an action was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Swarm(#[from] SwarmError),
    /// Checked just before the first call to the runtime: a daemon that
    /// cannot be sure it leads its instance changes nothing.
    #[error("not done: this daemon cannot confirm that it leads its instance")]
    NotLeader(#[source] LeaderError),
}

/// What a pass did.
#[derive(Debug, Default)]
pub struct PassReport {
    /// Actions started.
    pub started: usize,
    /// The next pass must run by then (a pending restart, a readiness deadline).
    pub wake_at: Option<Instant>,
}

/// An action that ended, and how.
#[derive(Debug)]
pub struct Done<A> {
    pub action: A,
    /// The container (or service) it started, if any, or why it failed.
    pub result: Result<Option<String>, ActionError>,
    /// The change announced by the store that the pass which decided it
    /// reacted to, if any: a container it starts is timed from it.
    pub change: Option<std::time::Instant>,
}

/// How a container is asked to stop (`docker.stop_timeout`, `docker.stop_signal`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stopping {
    /// Grace period between the stop signal and SIGKILL.
    pub timeout: Duration,
    /// The configured signal; `None`: chosen by the image.
    pub signal: Option<String>,
}

/// Settings of a pass that do not come from the snapshot.
#[derive(Clone, Debug)]
pub struct PassSettings {
    pub template: SpecTemplate,
    pub policy: Policy,
    pub concurrency: usize,
    pub stopping: Stopping,
}

impl PassSettings {
    pub fn from_config(config: &Config) -> Self {
        PassSettings {
            template: SpecTemplate {
                instance: config.instance.clone(),
                image: config.docker.image.clone(),
                network: config.docker.network.clone(),
                amqp_url: config.amqp.url.expose().to_string(),
                amqp_exchange: config.amqp.exchange.clone(),
                code_base_url: config.code_server.public_url.clone(),
                endpoint_devices: config.endpoint_devices.clone(),
                limits: config.limits(),
                hardening: config.hardening(),
                stop_signal: config.docker.stop_signal.clone(),
                record_keep: config.record.enabled.then_some(config.record.keep),
            },
            policy: Policy {
                backoff_initial: config.reconcile.backoff_initial,
                backoff_max: config.reconcile.backoff_max,
                backoff_reset: config.reconcile.backoff_reset,
                ready_timeout: config.reconcile.ready_timeout,
                assume_ready_after: config.reconcile.assume_ready_after,
                scale_cooldown: config.scale.cooldown,
                depth_poll: config.scale.poll_interval,
                takeover: config.docker.takeover,
            },
            concurrency: config.reconcile.concurrency,
            stopping: Stopping {
                timeout: config.docker.stop_timeout,
                signal: config.docker.stop_signal.clone(),
            },
        }
    }
}

/// Drives one backend: passes, and the actions they leave running.
pub struct Reconciler<S, B: Backend> {
    store: Arc<S>,
    backend: Arc<B>,
    settings: Arc<PassSettings>,
    metrics: Arc<Metrics>,
    memory: B::Memory,
    failures: BTreeMap<Slot, ActionFailure>,
    publisher: StatusWriter<S>,
    in_flight: InFlight<Done<B::Action>>,
    clock: PassClock,
    /// When set, passes and actions run only while the lock is confirmed.
    leadership: Option<Leadership>,
    /// The latest queue-depth reading of the poller (`broker::poll`); none:
    /// depths unknown, replica counts held.
    depths: Option<watch::Receiver<Reading>>,
}

/// Unix milliseconds that advance with tokio's clock, so that tests with
/// paused time see deadlines pass as time is advanced.
#[derive(Clone, Copy, Debug)]
struct PassClock {
    unix_ms: i64,
    at: Instant,
}

impl PassClock {
    fn new() -> Self {
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        PassClock {
            unix_ms,
            at: Instant::now(),
        }
    }

    fn now_ms(&self) -> i64 {
        self.unix_ms + self.at.elapsed().as_millis() as i64
    }

    /// The instant of a Unix ms time (now, if it is past).
    fn instant(&self, unix_ms: i64) -> Instant {
        Instant::now() + Duration::from_millis((unix_ms - self.now_ms()).max(0) as u64)
    }
}

impl<S: WorkerStore, B: Backend> Reconciler<S, B> {
    pub fn new(store: Arc<S>, backend: B, settings: PassSettings, metrics: Arc<Metrics>) -> Self {
        Reconciler {
            publisher: StatusWriter::new(store.clone(), metrics.clone()),
            in_flight: InFlight::new(settings.concurrency),
            store,
            backend: Arc::new(backend),
            settings: Arc::new(settings),
            metrics,
            memory: B::Memory::default(),
            failures: BTreeMap::new(),
            clock: PassClock::new(),
            leadership: None,
            depths: None,
        }
    }

    /// The same reconciler, acting only while `leadership` holds: each pass
    /// and each action first confirms the lock with the server.
    pub fn led_by(mut self, leadership: Leadership) -> Self {
        self.leadership = Some(leadership);
        self
    }

    /// The same reconciler, reading queue depths from `readings`.
    pub fn reading_depths(mut self, readings: watch::Receiver<Reading>) -> Self {
        self.depths = Some(readings);
        self
    }

    /// Reads desired and actual state: one SQL statement, and what the
    /// backend observes.
    pub async fn observe(&self) -> Result<B::Snapshot, PassError> {
        let rows = self.store.load_workers().await.map_err(PassError::Store)?;
        let (depths, depths_unknown) = latest_depths(self.depths.as_ref());
        let shared = Shared {
            rows,
            failures: self.failures.clone(),
            busy: self.in_flight.busy(),
            depths,
            depths_unknown,
            now_ms: self.clock.now_ms(),
        };
        self.backend
            .observe(shared, &self.settings, &self.memory)
            .await
    }

    /// Decides a pass without acting: what `workerctl plan` prints.
    pub(crate) async fn dry_run(&self) -> Result<PassPlan<B::Action>, PassError> {
        let snapshot = self.observe().await?;
        Ok(B::decisions(B::plan(&snapshot, &self.settings)))
    }

    /// Runs one pass: decides, records the statuses, starts the actions.
    #[tracing::instrument(name = "pass", skip_all)]
    pub async fn pass(&mut self) -> Result<PassReport, PassError> {
        let metrics = self.metrics.clone();
        measured(&metrics, self.pass_inner()).await
    }

    async fn pass_inner(&mut self) -> Result<PassReport, PassError> {
        if !may_act(self.leadership.as_ref()).await {
            return Ok(PassReport::default());
        }
        let snapshot = self.observe().await?;
        let plan = B::plan(&snapshot, &self.settings);
        self.backend.remember(&plan, &mut self.memory);
        let decided = B::decisions(plan);
        self.forget_gone(&snapshot);
        self.publisher
            .publish(
                snapshot.rows(),
                &decided.verdicts,
                decided.observed,
                snapshot.depths(),
            )
            .await;
        let started = decided.actions.len();
        for (action, span) in announce(snapshot.rows(), decided.actions) {
            self.spawn(action, span);
        }
        let wake_at = decided.wake_at_ms.map(|t| self.clock.instant(t));
        Ok(PassReport { started, wake_at })
    }

    /// Runs `action` as a task of its own; its slot is busy until it ends.
    fn spawn(&mut self, action: B::Action, span: tracing::Span) {
        let (backend, settings) = (self.backend.clone(), self.settings.clone());
        let slot = action.slot().clone();
        let change = self.metrics.change_in_pass();
        let leadership = self.leadership.clone();
        let task = async move {
            let result = confirmed(leadership.as_ref(), backend.apply(&action, &settings)).await;
            Done {
                action,
                result,
                change,
            }
        };
        self.in_flight.spawn(slot, span, task);
    }

    /// How many actions are in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// The next action to end; pending forever while none is in flight.
    /// Cancel-safe: an action that ends while this is dropped is kept.
    pub(crate) async fn next_done(&mut self) -> Done<B::Action> {
        self.in_flight.next().await
    }

    /// Records every action that has ended by now, without waiting: a burst
    /// of endings makes one pass, not one each.
    pub(crate) fn finish_ended(&mut self) {
        while let Some(done) = self.in_flight.try_next() {
            self.finished(&done);
        }
    }

    /// Records how an action went: metrics, logs, the failure book, and
    /// what the backend keeps of it.
    pub fn finished(&mut self, done: &Done<B::Action>) {
        let now_ms = self.clock.now_ms();
        record_outcome(&self.metrics, &mut self.failures, done, now_ms);
        self.backend.finished(done, now_ms, &mut self.memory);
    }

    /// Waits for the actions in flight to end, at most `limit`; those still
    /// running then are abandoned (the next daemon re-plans from what it
    /// finds). Returns how the others went.
    pub async fn drain(&mut self, limit: Duration) -> Vec<Done<B::Action>> {
        let done = self.in_flight.drain(limit).await;
        for d in &done {
            self.finished(d);
        }
        done
    }

    /// Forgets what no longer exists: failures of deleted workers, and what
    /// the backend keeps of what it no longer sees.
    fn forget_gone(&mut self, snapshot: &B::Snapshot) {
        let rows: BTreeSet<WorkerId> = snapshot.rows().iter().map(|r| r.id).collect();
        self.failures
            .retain(|slot, _| slot.worker().is_none_or(|id| rows.contains(&id)));
        self.backend.forget_gone(snapshot, &mut self.memory);
    }
}

/// The span of one action's log lines: which worker (id and name), what
/// kind of action, on which container or service.
fn action_span(action: &impl Planned, names: &HashMap<WorkerId, &str>) -> tracing::Span {
    let worker = action.worker();
    let name = worker.and_then(|id| names.get(&id).copied());
    tracing::info_span!(
        "action",
        worker = worker.as_ref().map(tracing::field::display),
        worker_name = name,
        kind = action.kind(),
        container = action.target(),
    )
}

/// Logs each action of a pass in its own span (worker id and name, kind,
/// target), and hands the actions back with their spans.
fn announce<A: Planned + fmt::Display>(
    rows: &[WorkerRow],
    actions: Vec<A>,
) -> Vec<(A, tracing::Span)> {
    let names: HashMap<WorkerId, &str> = rows.iter().map(|r| (r.id, r.name.as_str())).collect();
    actions
        .into_iter()
        .map(|action| {
            let span = action_span(&action, &names);
            span.in_scope(|| info!("{action}"));
            (action, span)
        })
        .collect()
}

/// Records how an action went: metrics, logs, and the failure book (a
/// success clears its slot's failures; a failure of a worker's action
/// counts towards its retry backoff; not leading is nobody's failure).
fn record_outcome<A: Planned>(
    metrics: &Metrics,
    failures: &mut BTreeMap<Slot, ActionFailure>,
    done: &Done<A>,
    now_ms: i64,
) {
    let action = &done.action;
    let (kind, target) = (action.kind(), action.target());
    metrics.action(kind, done.result.is_ok());
    match &done.result {
        Ok(_) => {
            info!(container = target, "{kind} {target} done");
            if action.worker().is_some() {
                failures.remove(action.slot());
            }
        }
        Err(e @ ActionError::NotLeader(_)) => {
            warn!(container = target, "{kind} {target}: {}", error_chain(e));
        }
        Err(e) => {
            let error = error_chain(e);
            warn!(container = target, "{kind} failed: {error}");
            if action.worker().is_some() {
                let failure =
                    ActionFailure::after(failures.get(action.slot()), kind, target, now_ms, error);
                failures.insert(action.slot().clone(), failure);
            }
        }
    }
}

/// Runs a pass, timed and counted in the metrics.
async fn measured(
    metrics: &Metrics,
    pass: impl Future<Output = Result<PassReport, PassError>>,
) -> Result<PassReport, PassError> {
    let started = Instant::now();
    metrics.pass_started();
    let result = pass.await;
    metrics
        .pass_seconds
        .observe(started.elapsed().as_secs_f64());
    metrics.pass_finished(result.as_ref().map(|_| ()).map_err(|e| error_chain(e)));
    result
}

/// Whether this daemon may act now (always, without leader election).
async fn may_act(leadership: Option<&Leadership>) -> bool {
    match leadership {
        None => true,
        Some(l) => match l.verify().await {
            Ok(()) => true,
            Err(e) => {
                debug!("standing by, no pass: {}", error_chain(&e));
                false
            }
        },
    }
}

/// Runs `work` only once the lock is confirmed (checked just before the
/// first call to the runtime).
async fn confirmed<T>(
    leadership: Option<&Leadership>,
    work: impl Future<Output = Result<T, ActionError>>,
) -> Result<T, ActionError> {
    if let Some(l) = leadership {
        l.verify().await.map_err(ActionError::NotLeader)?;
    }
    work.await
}

/// The latest queue depths, or why there are none.
fn latest_depths(readings: Option<&watch::Receiver<Reading>>) -> (Option<QueueDepths>, String) {
    let Some(readings) = readings else {
        return (
            None,
            "no depth poller (scale.management_url is empty)".into(),
        );
    };
    match &*readings.borrow() {
        Reading::Depths(d) => (Some(d.clone()), String::new()),
        Reading::NotYet => (None, "not read yet".into()),
        Reading::Unavailable(why) => (None, why.clone()),
    }
}
