//! One reconcile pass: read the store → observe the runtime → plan → execute
//! → record statuses. A pass takes no input: whatever woke it, it re-reads
//! everything. The only state carried between passes is the crash-backoff
//! book and what was last written to `workerctl_observed`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::{StreamExt, stream};
use tracing::{debug, info, warn};

use crate::backoff::error_chain;
use crate::config::Config;
use crate::execute::{Outcome, execute};
use crate::exit;
use crate::metrics::Metrics;
use crate::model::{ManagedContainer, RunState, Status, WorkerId, WorkerRow};
use crate::plan::{
    Action, Backoff, BackoffPolicy, NetworkState, Plan, Snapshot, SpecTemplate, Step, plan,
};
use crate::runtime::{ContainerRuntime, RuntimeError};
use crate::store::{Observed, StatusUpdate, StoreError, WorkerStore};

/// Why a pass could not even look at the world. Containers are left as they are.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error("cannot read the worker store")]
    Store(#[source] StoreError),
    #[error("cannot observe the container runtime")]
    Runtime(#[source] RuntimeError),
}

/// What a pass did.
#[derive(Debug, Default)]
pub struct PassReport {
    pub actions: usize,
    pub failures: Vec<String>,
    /// The next pass must run by then (a pending crash restart).
    pub wake_at: Option<Instant>,
}

/// Settings of a pass that do not come from the snapshot.
#[derive(Clone, Debug)]
pub struct PassSettings {
    pub template: SpecTemplate,
    pub policy: BackoffPolicy,
    pub concurrency: usize,
    pub stop_timeout: Duration,
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
            },
            policy: BackoffPolicy {
                initial: config.reconcile.backoff_initial,
                max: config.reconcile.backoff_max,
                reset: config.reconcile.backoff_reset,
            },
            concurrency: config.reconcile.concurrency,
            stop_timeout: config.docker.stop_timeout,
        }
    }
}

pub struct Reconciler<S, R> {
    store: Arc<S>,
    runtime: Arc<R>,
    settings: PassSettings,
    metrics: Arc<Metrics>,
    backoff: BTreeMap<WorkerId, Backoff>,
    observed: HashMap<WorkerId, Observed>,
}

impl<S: WorkerStore, R: ContainerRuntime> Reconciler<S, R> {
    pub fn new(
        store: Arc<S>,
        runtime: Arc<R>,
        settings: PassSettings,
        metrics: Arc<Metrics>,
    ) -> Self {
        Reconciler {
            store,
            runtime,
            settings,
            metrics,
            backoff: BTreeMap::new(),
            observed: HashMap::new(),
        }
    }

    /// Reads desired and actual state: one SQL statement and a constant
    /// number of Docker calls, whatever the number of workers.
    pub async fn observe(&self) -> Result<Snapshot, PassError> {
        let rows = self.store.load_workers().await.map_err(PassError::Store)?;
        let containers = self.runtime.list().await.map_err(PassError::Runtime)?;
        let image = self
            .runtime
            .image(&self.settings.template.image)
            .await
            .map_err(PassError::Runtime)?;
        let network = self.network().await?;
        let last_words = self.last_words(&containers).await;
        Ok(Snapshot {
            rows,
            containers,
            image,
            network,
            backoff: self.backoff.clone(),
            last_words,
            now_ms: now_ms(),
        })
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

    /// Runs one pass.
    #[tracing::instrument(name = "pass", skip_all)]
    pub async fn pass(&mut self) -> Result<PassReport, PassError> {
        let started = Instant::now();
        self.metrics.pass_started();
        let result = self.pass_inner().await;
        self.metrics
            .pass_seconds
            .observe(started.elapsed().as_secs_f64());
        self.metrics
            .pass_finished(result.as_ref().map(|_| ()).map_err(|e| error_chain(e)));
        result
    }

    async fn pass_inner(&mut self) -> Result<PassReport, PassError> {
        let snapshot = self.observe().await?;
        let plan = plan(&snapshot, &self.settings.template, &self.settings.policy);
        let names: HashMap<WorkerId, &str> = snapshot
            .rows
            .iter()
            .map(|r| (r.id, r.name.as_str()))
            .collect();
        for action in &plan.actions {
            action_span(action, &names).in_scope(|| info!("{action}"));
        }
        let s = &self.settings;
        let outcomes = execute(
            &*self.runtime,
            plan.actions.clone(),
            s.concurrency,
            s.stop_timeout,
        )
        .await;
        let failures = self.record_outcomes(&outcomes, &names);
        self.backoff = plan.backoff.clone();
        let verdicts = verdicts(&snapshot.rows, &plan, &outcomes);
        self.count_statuses(&snapshot.rows, &verdicts);
        self.write_statuses(&snapshot.rows, verdicts).await;
        self.write_observed(&snapshot, &outcomes).await;
        let wake_at = plan
            .wake_at_ms
            .map(|t| Instant::now() + Duration::from_millis((t - now_ms()).max(0) as u64));
        Ok(PassReport {
            actions: outcomes.len(),
            failures,
            wake_at,
        })
    }

    fn record_outcomes(
        &self,
        outcomes: &[Outcome],
        names: &HashMap<WorkerId, &str>,
    ) -> Vec<String> {
        let mut failures = Vec::new();
        for o in outcomes {
            let _span = action_span(&o.action, names).entered();
            self.metrics.action(o.action.kind(), o.result.is_ok());
            match &o.result {
                Ok(()) => {
                    info!("{} {} done", o.action.kind(), o.action.target());
                    self.record_success(&o.action.step);
                }
                Err(e) => {
                    let chain = error_chain(e);
                    warn!("{} failed: {chain}", o.action.target());
                    failures.push(format!(
                        "{} {}: {chain}",
                        o.action.kind(),
                        o.action.target()
                    ));
                }
            }
        }
        failures
    }

    fn record_success(&self, step: &Step) {
        match step {
            Step::Create { .. } | Step::Replace { .. } => self.metrics.container_running(),
            Step::Start { container } if matches!(container.state, RunState::Exited(_)) => {
                self.metrics.restarts.inc();
            }
            _ => {}
        }
    }

    fn count_statuses(&self, rows: &[WorkerRow], verdicts: &[StatusUpdate]) {
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

    /// Writes only statuses that differ from the rows: an idle pass writes nothing.
    async fn write_statuses(&self, rows: &[WorkerRow], verdicts: Vec<StatusUpdate>) {
        let current: HashMap<WorkerId, (&str, &str)> = rows
            .iter()
            .map(|r| (r.id, (r.status.as_str(), r.status_info.as_str())))
            .collect();
        let changed: Vec<StatusUpdate> = verdicts
            .into_iter()
            .filter(|v| current.get(&v.id) != Some(&(v.status.as_str(), v.info.as_str())))
            .collect();
        if changed.is_empty() {
            return;
        }
        if let Err(e) = self.store.write_statuses(&changed).await {
            warn!("{}", error_chain(&e));
        }
    }

    /// Upserts what changed in the observed container state since the last write.
    async fn write_observed(&mut self, snapshot: &Snapshot, outcomes: &[Outcome]) {
        // A deleted row's observation goes with it (a trigger); forget it here
        // too, so that a row restored under the same id is written afresh.
        let ids: HashSet<WorkerId> = snapshot.rows.iter().map(|r| r.id).collect();
        self.observed.retain(|id, _| ids.contains(id));
        let changed: Vec<Observed> = snapshot
            .rows
            .iter()
            .map(|row| observe_worker(row.id, &snapshot.containers, outcomes, &self.backoff))
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

/// The span of one action's log lines: which worker (id and name), what
/// kind of action, on which container.
fn action_span(action: &Action, names: &HashMap<WorkerId, &str>) -> tracing::Span {
    let name = action.worker.and_then(|id| names.get(&id).copied());
    tracing::info_span!(
        "action",
        worker = action.worker.as_ref().map(tracing::field::display),
        worker_name = name,
        kind = action.kind(),
        container = action.target(),
    )
}

/// The status of every worker after the pass: the plan's verdicts, the
/// promised status of actions that succeeded, an error for those that failed.
fn verdicts(rows: &[WorkerRow], plan: &Plan, outcomes: &[Outcome]) -> Vec<StatusUpdate> {
    let revisions: HashMap<WorkerId, _> = rows.iter().map(|r| (r.id, r.revision)).collect();
    let mut out: Vec<StatusUpdate> = plan.verdicts.iter().map(to_update).collect();
    for o in outcomes {
        let Some(id) = o.action.worker else { continue };
        let Some(&revision) = revisions.get(&id) else {
            continue;
        };
        match &o.result {
            Ok(()) => out.extend(o.action.on_success.as_ref().map(to_update)),
            Err(e) => out.push(StatusUpdate {
                id,
                revision,
                status: Status::Error,
                info: format!(
                    "{} of {} failed: {}",
                    o.action.kind(),
                    o.action.target(),
                    error_chain(e)
                ),
            }),
        }
    }
    // A failure outranks a success promised by another action of the same worker.
    out.sort_by_key(|u| (u.id, u.status == Status::Error));
    out.dedup_by(|later, earlier| {
        later.id == earlier.id && {
            *earlier = later.clone();
            true
        }
    });
    out
}

fn to_update(v: &crate::plan::Verdict) -> StatusUpdate {
    StatusUpdate {
        id: v.id,
        revision: v.revision,
        status: v.status,
        info: v.info.clone(),
    }
}

/// What a worker's container looks like after the pass.
fn observe_worker(
    id: WorkerId,
    containers: &[ManagedContainer],
    outcomes: &[Outcome],
    backoff: &BTreeMap<WorkerId, Backoff>,
) -> Observed {
    let book = backoff.get(&id);
    let (restarts, last_exit_code) =
        book.map_or((0, None), |b| (b.restarts as i32, b.last_exit_code));
    let started = outcomes
        .iter()
        .filter(|o| o.action.worker == Some(id) && o.result.is_ok())
        .find_map(|o| match &o.action.step {
            Step::Create { spec } | Step::Replace { spec, .. } => {
                Some((spec.revision, spec.name.clone()))
            }
            Step::Start { container } => container.revision.map(|r| (r, container.name.clone())),
            Step::Remove { .. } => None,
        });
    if let Some((revision, name)) = started {
        return Observed {
            id,
            running_revision: Some(revision),
            container: Some(name),
            container_state: "running".into(),
            restarts,
            last_exit_code,
        };
    }
    let removed = |c: &&ManagedContainer| {
        outcomes.iter().any(|o| {
            o.result.is_ok()
                && matches!(&o.action.step, Step::Remove { container } if container.id == c.id)
        })
    };
    let current = containers
        .iter()
        .filter(|c| c.worker_id == Some(id))
        .filter(|c| !removed(c))
        .max_by_key(|c| (c.state == RunState::Running, c.created));
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
        },
        None => Observed {
            id,
            running_revision: None,
            container: None,
            container_state: "absent".into(),
            restarts,
            last_exit_code,
        },
    }
}

fn state_text(state: &RunState) -> String {
    match state {
        RunState::Running => "running".into(),
        RunState::Created => "created".into(),
        RunState::Exited(Some(code)) => format!("exited ({code})"),
        RunState::Exited(None) => "exited".into(),
        RunState::Other(s) => s.clone(),
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
