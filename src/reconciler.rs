//! One reconcile pass, and the actions it leaves running: read the store →
//! observe the runtime → plan → record statuses → start the actions. A pass
//! takes no input: whatever woke it, it re-reads everything.
//!
//! Actions run as tasks of their own (at most `concurrency` talk to Docker
//! at once), so a pass never waits for one: the workers with an action in
//! flight are "busy" and the planner leaves them alone until it ends. The
//! end of an action is recorded here ([`Reconciler::finished`]) and wakes
//! the loop for the next pass.
//!
//! State carried between passes: the planner's books, the actions in flight,
//! the failures of the last actions (for per-worker retry backoff), when
//! this daemon started each container, and what was last written to
//! `workerctl_observed`. Nothing here decides anything.

pub mod in_flight;
pub mod publish;
pub mod services;

use crate::consumers::ConsumerCounts;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::{StreamExt, stream};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::backoff::error_chain;
use crate::broker::{QueueDepths, Reading};
use crate::config::Config;
use crate::execute;
use crate::exit;
use crate::leader::{LeaderError, Leadership};
use crate::metrics::Metrics;
use crate::model::{ManagedContainer, RunState, WorkerId};
use crate::plan::service::ServiceAction;
use crate::plan::{
    Action, ActionFailure, Books, NetworkState, Plan, Policy, Slot, Snapshot, SpecTemplate, Step,
    plan,
};
use crate::readiness::ReadyReports;
use crate::runtime::{ContainerRuntime, RuntimeError};
use crate::store::{StoreError, WorkerStore};
use crate::swarm::SwarmError;
use in_flight::InFlight;
use publish::Publisher;

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
    /// Checked just before the first Docker call: a daemon that cannot be
    /// sure it leads its instance changes nothing.
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
pub struct Done<A = Action> {
    pub action: A,
    /// The container (or service) it started, if any, or why it failed.
    pub result: Result<Option<String>, ActionError>,
    /// The change announced by the store that the pass which decided it
    /// reacted to, if any: a container it starts is timed from it.
    pub change: Option<std::time::Instant>,
}

/// Settings of a pass that do not come from the snapshot.
#[derive(Clone, Debug)]
pub struct PassSettings {
    pub template: SpecTemplate,
    pub policy: Policy,
    pub concurrency: usize,
    pub stopping: execute::Stopping,
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
            stopping: config.stopping(),
        }
    }
}

pub struct Reconciler<S, R> {
    store: Arc<S>,
    runtime: Arc<R>,
    settings: PassSettings,
    metrics: Arc<Metrics>,
    reports: Arc<ReadyReports>,
    books: Books,
    failures: BTreeMap<Slot, ActionFailure>,
    started_ms: HashMap<String, i64>,
    publisher: Publisher<S>,
    in_flight: InFlight<Done>,
    clock: Clock,
    /// When set, passes and actions run only while the lock is confirmed.
    leadership: Option<Leadership>,
    /// The latest queue-depth reading of the poller (`broker::poll`); none:
    /// depths unknown, replica counts held.
    depths: Option<watch::Receiver<Reading>>,
    /// Consumer counts of the queues a rollout waits on.
    consumers: Option<ConsumerCounts>,
}

/// Unix milliseconds that advance with tokio's clock, so that tests with
/// paused time see deadlines pass as time is advanced.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Clock {
    unix_ms: i64,
    at: Instant,
}

impl Clock {
    pub(crate) fn new() -> Self {
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        Clock {
            unix_ms,
            at: Instant::now(),
        }
    }

    pub(crate) fn now_ms(&self) -> i64 {
        self.unix_ms + self.at.elapsed().as_millis() as i64
    }

    /// The instant of a Unix ms time (now, if it is past).
    pub(crate) fn instant(&self, unix_ms: i64) -> Instant {
        Instant::now() + Duration::from_millis((unix_ms - self.now_ms()).max(0) as u64)
    }
}

impl<S: WorkerStore, R: ContainerRuntime> Reconciler<S, R> {
    pub fn new(
        store: Arc<S>,
        runtime: Arc<R>,
        settings: PassSettings,
        metrics: Arc<Metrics>,
        reports: Arc<ReadyReports>,
    ) -> Self {
        Reconciler {
            publisher: Publisher::new(store.clone(), metrics.clone()),
            in_flight: InFlight::new(settings.concurrency),
            store,
            runtime,
            settings,
            metrics,
            reports,
            books: Books::default(),
            failures: BTreeMap::new(),
            started_ms: HashMap::new(),
            clock: Clock::new(),
            leadership: None,
            depths: None,
            consumers: None,
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

    /// The same reconciler, asking the broker who consumes the queues of
    /// workers whose new container cannot say so itself.
    pub(crate) fn counting_consumers(mut self, counts: ConsumerCounts) -> Self {
        self.consumers = Some(counts);
        self
    }

    /// Reads desired and actual state: one SQL statement and a constant
    /// number of Docker calls, whatever the number of workers.
    pub async fn observe(&self) -> Result<Snapshot, PassError> {
        let rows = self.store.load_workers().await.map_err(PassError::Store)?;
        let listed_at = Instant::now();
        let containers = self.runtime.list().await.map_err(PassError::Runtime)?;
        let image = self
            .runtime
            .image(&self.settings.template.image)
            .await
            .map_err(PassError::Runtime)?;
        let network = self.network().await?;
        let last_words = self.last_words(&containers).await;
        self.drop_forged_reports(&rows);
        let reports = self.reports.current(&containers, listed_at);
        let (depths, depths_unknown) = latest_depths(self.depths.as_ref());
        Ok(Snapshot {
            rows,
            image,
            network,
            books: self.books.clone(),
            failures: self.failures.clone(),
            busy: self.in_flight.busy(),
            reports,
            started_ms: self.started_ms.clone(),
            last_words,
            depths,
            depths_unknown,
            consumers: self
                .consumers
                .as_ref()
                .map(ConsumerCounts::latest)
                .unwrap_or_default(),
            containers,
            now_ms: self.clock.now_ms(),
        })
    }

    /// Drops the ready reports whose token is not their worker's, counting
    /// and logging each: nobody but the worker's container has its token.
    fn drop_forged_reports(&self, rows: &[crate::model::WorkerRow]) {
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
    async fn last_words(&self, containers: &[ManagedContainer]) -> HashMap<String, String> {
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
            .buffer_unordered(self.settings.concurrency.max(1))
            .collect()
            .await;
        explained.into_iter().flatten().collect()
    }

    async fn network(&self) -> Result<NetworkState, PassError> {
        let name = &self.settings.template.network;
        // Docker's built-in modes are not networks one can inspect by name.
        if matches!(name.as_str(), "host" | "bridge" | "none") {
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

    /// Decides a pass without acting: what `workerctl plan` prints.
    pub async fn dry_run(&self) -> Result<Plan, PassError> {
        let snapshot = self.observe().await?;
        Ok(plan(
            &snapshot,
            &self.settings.template,
            &self.settings.policy,
        ))
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
        let plan = plan(&snapshot, &self.settings.template, &self.settings.policy);
        self.books = plan.books.clone();
        if let Some(consumers) = &self.consumers {
            consumers.want(plan.watch_consumers.clone());
        }
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
    fn spawn(&mut self, action: Action, span: tracing::Span) {
        let runtime = self.runtime.clone();
        let stopping = self.settings.stopping.clone();
        let slot = action.slot.clone();
        let change = self.metrics.change_in_pass();
        let leadership = self.leadership.clone();
        let task = async move {
            let result = confirmed(leadership.as_ref(), async {
                execute::apply(&*runtime, &action.step, &stopping)
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

    /// How many actions are in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// The next action to end; pending forever while none is in flight.
    /// Cancel-safe: an action that ends while this is dropped is kept.
    pub async fn next_done(&mut self) -> Done {
        self.in_flight.next().await
    }

    /// Records every action that has ended by now, without waiting: a burst
    /// of endings makes one pass, not one each.
    pub fn finish_ended(&mut self) {
        while let Some(done) = self.in_flight.try_next() {
            self.finished(&done);
        }
    }

    /// Records how an action went: metrics, logs, the failure book, and when
    /// the container it started was started.
    pub fn finished(&mut self, done: &Done) {
        let now_ms = self.clock.now_ms();
        record_outcome(&self.metrics, &mut self.failures, done, now_ms);
        let action = &done.action;
        if let Ok(Some(container)) = &done.result {
            self.started_ms.insert(container.clone(), now_ms);
            self.record_start(&action.step, done.change);
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

    /// Waits for the actions in flight to end, at most `limit`; those still
    /// running then are abandoned (the next daemon re-plans from what it
    /// finds). Returns how the others went.
    pub async fn drain(&mut self, limit: Duration) -> Vec<Done> {
        let done = self.in_flight.drain(limit).await;
        for d in &done {
            self.finished(d);
        }
        done
    }

    /// Forgets what no longer exists: start times of containers not listed,
    /// failures of deleted workers.
    fn forget_gone(&mut self, snapshot: &Snapshot) {
        let listed: BTreeSet<&str> = snapshot.containers.iter().map(|c| c.id.as_str()).collect();
        self.started_ms.retain(|id, _| listed.contains(id.as_str()));
        let rows: BTreeSet<WorkerId> = snapshot.rows.iter().map(|r| r.id).collect();
        self.failures
            .retain(|slot, _| slot.worker().is_none_or(|id| rows.contains(&id)));
    }
}

/// The span of one action's log lines: which worker (id and name), what
/// kind of action, on which container.
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
fn announce<A: Planned + std::fmt::Display>(
    rows: &[crate::model::WorkerRow],
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

/// What both backends' actions say of themselves, for logs, metrics and
/// the failure book.
pub trait Planned {
    fn slot(&self) -> &Slot;
    fn worker(&self) -> Option<WorkerId>;
    fn kind(&self) -> &'static str;
    fn target(&self) -> &str;
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
/// first call to the engine).
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
