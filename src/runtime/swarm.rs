//! Docker Swarm implementation of the runtime boundary (bollard): one
//! replicated *service* per worker instead of containers, so that a swarm
//! manager spreads a worker's replicas over its nodes.
//!
//! This file owns the translation between Swarm API types and the model:
//! [`ContainerSpec`] + a replica count → `ServiceSpec`, services carrying
//! this instance's label → [`ManagedService`]. It makes no decisions: which
//! service to create, update or remove, and how many replicas, is the
//! planner's business. Revision rollouts are Swarm's own rolling update:
//! one task at a time, start-first, each new task counted only once its
//! image's HEALTHCHECK passes, watched for `update_monitor`, rolled back on
//! failure.
//!
//! What Swarm on Engine 20.10 (API 1.41) can and cannot enforce, beside the
//! plain-container hardening of `docker.rs`: read-only root filesystem, all
//! capabilities dropped, memory/CPU/pids limits and a tmpfs `/tmp` — yes;
//! `no-new-privileges` — **no** (services gain it with API 1.44), and the
//! tmpfs is mounted `noexec` (mount options arrive with API 1.46).
//! [`SwarmRuntime::limitations`] says so for the status page.
//!
//! **Invariant:** every API call goes through [`SwarmRuntime::api`], so
//! [`SwarmRuntime::api_calls`] counts all of them; [`SwarmRuntime::list`] is
//! one call for every service and its task counts.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::models::{
    HealthConfig, Limit, LocalNodeState, Mount, MountTmpfsOptions, MountType,
    NetworkAttachmentConfig, Node, Service, ServiceSpec, ServiceSpecMode,
    ServiceSpecModeReplicated, ServiceSpecRollbackConfig,
    ServiceSpecRollbackConfigFailureActionEnum, ServiceSpecRollbackConfigOrderEnum,
    ServiceSpecUpdateConfig, ServiceSpecUpdateConfigFailureActionEnum,
    ServiceSpecUpdateConfigOrderEnum, ServiceUpdateStatusStateEnum, Task, TaskSpec,
    TaskSpecContainerSpec, TaskSpecLogDriver, TaskSpecResources, TaskSpecRestartPolicy,
    TaskSpecRestartPolicyConditionEnum, TaskState,
};
use bollard::query_parameters::{
    EventsOptionsBuilder, ListNodesOptions, ListServicesOptionsBuilder, ListTasksOptionsBuilder,
    UpdateServiceOptionsBuilder,
};
use futures::StreamExt;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::model::{ContainerSpec, Labelled, labels, registry_of, repository_of};
use crate::model::{ImageState, NetworkState, SwarmNode, SwarmTask, TaskReport};
pub use crate::model::{ManagedService, Rollout, WorkerService};
use crate::runtime::{ServiceRuntime, SwarmError};

/// The label of a worker's replica number. Swarm numbers a service's
/// tasks itself (its *slot*); containers get it in `WORKERCTL_REPLICA`
/// and their hostname, which Swarm fills in per task.
pub const REPLICA_ENV: &str = "WORKERCTL_REPLICA";
const SLOT_TEMPLATE: &str = "{{.Task.Slot}}";

/// The worker's only writable place, as in `docker.rs`.
const TMPFS_BYTES: i64 = 64 << 20;
/// The pause before following node events again after the stream failed:
/// doubled each time, up to the maximum.
const NODE_EVENTS_BACKOFF_INITIAL: Duration = Duration::from_millis(500);
const NODE_EVENTS_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// How services are rolled out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SwarmOptions {
    /// Watch each updated task this long; a failure within it rolls back.
    pub update_monitor: Duration,
    /// Swarm starts a task again this long after it exited or was lost
    /// with its node.
    pub restart_delay: Duration,
    /// SIGTERM, then this long, then SIGKILL.
    pub stop_timeout: Duration,
    /// What makes a task of a dockerworker image count as started in a
    /// rollout. `None`: the image's own HEALTHCHECK (the dockerworker's
    /// tests the same ready file, but only every 2 minutes, so the daemon
    /// passes [`Probe::dockerworker_ready`], every 2 s). Images without the
    /// dockerworker label keep their own HEALTHCHECK either way.
    pub readiness: Option<Probe>,
}

/// A health check run inside each task; Swarm counts a task as running only
/// once it passes, which is what gates a rolling update.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    /// Run directly (no shell), exit 0 = ready.
    pub command: Vec<String>,
    pub interval: Duration,
    pub timeout: Duration,
    /// Failures in a row after which the task is unhealthy (and replaced).
    pub retries: u32,
    /// Failures in this time after start do not count (the code download).
    pub start_period: Duration,
}

impl Probe {
    /// The dockerworker's readiness: its ready file exists (code loaded, a
    /// consumer attached to the worker's queue) and is fresh (the runtime's
    /// event loop touches it every 30 s; older than 90 s means the loop
    /// stopped, and Swarm replaces the task). A `find`, not a Python
    /// process: this runs every 2 s in every task. Only while there is no
    /// ready file (a task starting, or an image from before the ready file)
    /// does it ask `/readyz`, as it did before, so older dockerworker
    /// images still roll out.
    pub fn dockerworker_ready() -> Probe {
        const READY: &str = "if [ -e /tmp/dockerworker.ready ]; then \
            exec find /tmp/dockerworker.ready ! -newermt '90 seconds ago' -exec false {} +; fi; \
            exec python -c \"import urllib.request; \
            port = open('/tmp/dockerworker.health-port').read().strip(); \
            urllib.request.urlopen('http://127.0.0.1:%s/readyz' % port, timeout=2)\"";
        Probe {
            command: vec!["sh".into(), "-c".into(), READY.into()],
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(2),
            retries: 3,
            start_period: Duration::from_secs(30),
        }
    }

    fn health_config(&self) -> HealthConfig {
        let mut test = vec!["CMD".to_string()];
        test.extend(self.command.iter().cloned());
        HealthConfig {
            test: Some(test),
            interval: Some(nanos(self.interval)),
            timeout: Some(nanos(self.timeout)),
            retries: Some(i64::from(self.retries)),
            start_period: Some(nanos(self.start_period)),
            ..Default::default()
        }
    }
}

/// The bollard-backed Swarm runtime; one per daemon, scoped to one `instance`.
pub struct SwarmRuntime {
    docker: Docker,
    instance: String,
    options: SwarmOptions,
    calls: AtomicU64,
}

impl SwarmRuntime {
    /// Connects to the local engine (`DOCKER_HOST` or the default socket),
    /// negotiates the API version and checks that it is a swarm manager.
    pub async fn connect(instance: &str, options: SwarmOptions) -> Result<Self, SwarmError> {
        let docker = Docker::connect_with_local_defaults().map_err(SwarmError::Connect)?;
        Self::with_client(docker, instance, options).await
    }

    /// Like [`connect`](Self::connect), on a client the caller configured.
    pub async fn with_client(
        docker: Docker,
        instance: &str,
        options: SwarmOptions,
    ) -> Result<Self, SwarmError> {
        let docker = docker
            .negotiate_version()
            .await
            .map_err(SwarmError::Connect)?;
        let runtime = SwarmRuntime {
            docker,
            instance: instance.to_string(),
            options,
            calls: AtomicU64::new(1),
        };
        runtime.check_manager().await?;
        Ok(runtime)
    }

    /// Fails unless the engine manages a swarm: only a manager takes
    /// service requests.
    pub(crate) async fn check_manager(&self) -> Result<(), SwarmError> {
        let info = self.api().info().await.map_err(SwarmError::Connect)?;
        let swarm = info.swarm.unwrap_or_default();
        let state = swarm.local_node_state.unwrap_or(LocalNodeState::EMPTY);
        if state == LocalNodeState::ACTIVE && swarm.control_available == Some(true) {
            return Ok(());
        }
        let state = match (state, swarm.control_available) {
            (LocalNodeState::ACTIVE, _) => "a worker node, not a manager".to_string(),
            (LocalNodeState::EMPTY, _) => "unknown".to_string(),
            (other, _) => other.to_string(),
        };
        Err(SwarmError::NotManager { state })
    }

    /// Wakes `wake` whenever a node of the swarm changes (goes down, comes
    /// back, is drained, joins or leaves), until `shutdown`. Tasks on other
    /// nodes send no events to the manager's engine, but node changes do:
    /// a lost node is seen as soon as the manager marks it down, not at the
    /// next resync. The stream is made again, after a growing pause, when
    /// it fails; `wake` is notified then, since events may have been missed.
    pub async fn node_events(&self, wake: Arc<Notify>, shutdown: CancellationToken) {
        let mut failures = 0u32;
        loop {
            if failures > 0 {
                let pause = crate::backoff::delay(
                    NODE_EVENTS_BACKOFF_INITIAL,
                    NODE_EVENTS_BACKOFF_MAX,
                    failures - 1,
                );
                tokio::select! {
                    // Cancel-safe: dropping a sleep loses nothing.
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(pause) => wake.notify_one(),
                }
            }
            let filters = HashMap::from([("type", vec!["node".to_string()])]);
            let options = EventsOptionsBuilder::default().filters(&filters).build();
            let mut stream = self.api().events(Some(options));
            let started = std::time::Instant::now();
            loop {
                let next = tokio::select! {
                    // Cancel-safe: `next` on a stream loses no item when dropped.
                    _ = shutdown.cancelled() => return,
                    next = stream.next() => next,
                };
                match next {
                    Some(Ok(event)) => {
                        tracing::debug!(action = ?event.action, node = ?event.actor.and_then(|a| a.id), "swarm node event");
                        wake.notify_one();
                    }
                    Some(Err(e)) => {
                        warn!(error = %e, "the swarm's node event stream failed; following it again");
                        break;
                    }
                    None => break,
                }
            }
            failures = if started.elapsed() > NODE_EVENTS_BACKOFF_MAX {
                1
            } else {
                failures.saturating_add(1)
            };
        }
    }

    /// How many API calls this runtime has made.
    pub fn api_calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// The hardening a Swarm service cannot have on this engine, in words
    /// for the README and the status page. Honest, not aspirational.
    pub fn limitations(&self) -> Vec<&'static str> {
        let version = self.docker.client_version();
        let at_least = |minor: usize| {
            version.major_version > 1
                || (version.major_version == 1 && version.minor_version >= minor)
        };
        let mut missing = Vec::new();
        if !at_least(44) {
            missing.push("no-new-privileges is not set: Swarm services support it from Docker API 1.44 (Engine 25)");
        }
        if !at_least(46) {
            missing.push("/tmp is mounted noexec: tmpfs options for services arrive with Docker API 1.46 (Engine 27)");
        }
        missing
    }

    fn api(&self) -> &Docker {
        self.calls.fetch_add(1, Ordering::Relaxed);
        &self.docker
    }

    fn instance_filter(&self) -> String {
        format!("{}={}", labels::INSTANCE, self.instance)
    }

    /// The options for a service of `spec`: the readiness probe applies to
    /// dockerworker images only (see [`Self::probe_for`]).
    async fn options_for(&self, spec: &ContainerSpec) -> SwarmOptions {
        let mut options = self.options.clone();
        options.readiness = self.probe_for(&pinned_image(spec)).await.cloned();
        options
    }

    /// The readiness probe for tasks of `image`: the daemon's, for a
    /// dockerworker image (its label says so); none for any other image,
    /// which keeps its own HEALTHCHECK, if it has one. An image that cannot
    /// be inspected gets none: Swarm then counts its tasks once they run.
    async fn probe_for(&self, image: &str) -> Option<&Probe> {
        let probe = self.options.readiness.as_ref()?;
        let dockerworker = match self.api().inspect_image(image).await {
            Ok(found) => labels::is(
                found.config.and_then(|c| c.labels).as_ref(),
                labels::RUNTIME,
                labels::RUNTIME_DOCKERWORKER,
            ),
            Err(e) => {
                warn!(%image, error = %e, "cannot inspect the image; no readiness probe");
                false
            }
        };
        dockerworker.then_some(probe)
    }

    /// A registry's digest of `image`, asked through the manager's engine
    /// (its registry settings and credentials apply); a tag the registry
    /// does not have is missing.
    async fn registry_image(&self, image: &str) -> Result<ImageState, SwarmError> {
        match self.api().inspect_registry_image(image, None).await {
            Ok(found) => Ok(match found.descriptor.digest {
                Some(digest) => ImageState::Present {
                    id: format!("{}@{digest}", repository_of(image)),
                },
                None => ImageState::Missing,
            }),
            // The engine answers 401/403/404 (or 500 with the registry's
            // "manifest unknown") for a tag the registry does not have.
            Err(e) if status_code(&e).is_some_and(|c| c < 500) => Ok(ImageState::Missing),
            Err(source) => Err(SwarmError::InspectImage {
                image: image.to_string(),
                source,
            }),
        }
    }

    async fn list_tasks(
        &self,
        filters: HashMap<&str, Vec<String>>,
    ) -> Result<Vec<Task>, SwarmError> {
        let options = ListTasksOptionsBuilder::default().filters(&filters).build();
        self.api()
            .list_tasks(Some(options))
            .await
            .map_err(SwarmError::Tasks)
    }

    /// What a failed task's container said last, if it ran on this node
    /// (one call; a container elsewhere, or gone, says nothing).
    async fn last_words(&self, container: &str) -> Option<String> {
        match crate::runtime::docker::tail(self.api(), container, crate::exit::LINES_READ).await {
            Ok(lines) => crate::exit::explain(&lines),
            Err(e) => {
                tracing::debug!(%container, error = %e, "cannot read a failed task's logs");
                None
            }
        }
    }
}

impl ServiceRuntime for SwarmRuntime {
    /// Every service carrying this instance's label, with its running and
    /// desired task counts: one API call.
    async fn list(&self) -> Result<Vec<ManagedService>, SwarmError> {
        let filters = HashMap::from([("label", vec![self.instance_filter()])]);
        let options = ListServicesOptionsBuilder::default()
            .filters(&filters)
            .status(true)
            .build();
        let services = self
            .api()
            .list_services(Some(options))
            .await
            .map_err(SwarmError::List)?;
        Ok(services.into_iter().filter_map(managed_service).collect())
    }

    /// Creates a worker's service; returns its id. A name held by a service
    /// of someone else is [`SwarmError::NameTaken`].
    async fn create(&self, service: &WorkerService) -> Result<String, SwarmError> {
        let options = self.options_for(&service.spec).await;
        let spec = service_spec(service, &self.instance, &options);
        let name = service.spec.name.clone();
        match self.api().create_service(spec, None).await {
            Ok(created) => {
                for warning in created.warnings.unwrap_or_default() {
                    warn!(service = %name, %warning, "Docker warned on service create");
                }
                Ok(created.id.unwrap_or_default())
            }
            Err(e) if status_code(&e) == Some(409) => Err(SwarmError::NameTaken { name }),
            Err(source) => Err(SwarmError::Create { name, source }),
        }
    }

    /// Replaces a service's spec: a new revision or spec rolls out as a
    /// rolling update; a new replica count alone just adds or removes tasks.
    /// `current` must be what [`list`](Self::list) returned (its version): a
    /// service changed since is refused by Swarm, and the next pass re-plans.
    async fn update(
        &self,
        current: &ManagedService,
        service: &WorkerService,
    ) -> Result<(), SwarmError> {
        let options = self.options_for(&service.spec).await;
        let spec = service_spec(service, &self.instance, &options);
        let version = i32::try_from(current.version).unwrap_or(i32::MAX);
        let options = UpdateServiceOptionsBuilder::default()
            .version(version)
            .build();
        let updated = self
            .api()
            .update_service(&current.id, spec, options, None)
            .await
            .map_err(|source| SwarmError::Update {
                service: current.name.clone(),
                source,
            })?;
        for warning in updated.warnings.unwrap_or_default() {
            warn!(service = %current.name, %warning, "Docker warned on service update");
        }
        Ok(())
    }

    /// Sets a service's replica count and nothing else: tasks are added or
    /// removed, none is replaced. Reads the service's spec first (one more
    /// call), so that whatever else it holds is kept as it is.
    async fn scale(&self, current: &ManagedService, replicas: u32) -> Result<(), SwarmError> {
        let inspected = self
            .api()
            .inspect_service(&current.id, None)
            .await
            .map_err(|source| SwarmError::Inspect {
                service: current.name.clone(),
                source,
            })?;
        let mut spec = inspected.spec.unwrap_or_default();
        // The engine names the task's health check `Healthcheck`, bollard
        // reads `HealthCheck`: the probe does not survive the read, and
        // written back without it the tasks would fall back on the image's
        // own, rare check. Set it again, as create and update do.
        if let Some(container) = spec
            .task_template
            .as_mut()
            .and_then(|t| t.container_spec.as_mut())
        {
            let image = container.image.clone().unwrap_or_default();
            container.health_check = self.probe_for(&image).await.map(Probe::health_config);
        }
        spec.mode = Some(ServiceSpecMode {
            replicated: Some(ServiceSpecModeReplicated {
                replicas: Some(i64::from(replicas)),
            }),
            ..Default::default()
        });
        let version = inspected
            .version
            .and_then(|v| v.index)
            .unwrap_or(current.version);
        let options = UpdateServiceOptionsBuilder::default()
            .version(i32::try_from(version).unwrap_or(i32::MAX))
            .build();
        self.api()
            .update_service(&current.id, spec, options, None)
            .await
            .map_err(|source| SwarmError::Update {
                service: current.name.clone(),
                source,
            })?;
        Ok(())
    }

    /// The swarm's nodes: one API call.
    async fn nodes(&self) -> Result<Vec<SwarmNode>, SwarmError> {
        let nodes = self
            .api()
            .list_nodes(None::<ListNodesOptions>)
            .await
            .map_err(SwarmError::Nodes)?;
        Ok(nodes.into_iter().filter_map(swarm_node).collect())
    }

    /// The tasks of `services`, and every task on `nodes`; why
    /// the tasks of `services` fail, by service id (the latest task of each
    /// that failed or was rejected, in Swarm's words). One API call per
    /// list that is not empty.
    async fn tasks(
        &self,
        services: &[&ManagedService],
        nodes: &[&str],
    ) -> Result<TaskReport, SwarmError> {
        let mut report = TaskReport::default();
        if !nodes.is_empty() {
            // Every service's tasks on those nodes: the planner looks at
            // those of its own services only (a task names its service by id).
            let filters = HashMap::from([("node", nodes.iter().map(|n| n.to_string()).collect())]);
            let tasks = self.list_tasks(filters).await?;
            report.tasks.extend(tasks.iter().filter_map(swarm_task));
        }
        if services.is_empty() {
            return Ok(report);
        }
        let ids: Vec<String> = services.iter().map(|s| s.id.clone()).collect();
        let tasks = self.list_tasks(HashMap::from([("service", ids)])).await?;
        report.tasks.extend(tasks.iter().filter_map(swarm_task));
        for (service, failed) in latest_task_errors(tasks) {
            let words = match &failed.container {
                Some(id) => self.last_words(id).await,
                None => None,
            };
            let error = match words {
                Some(words) => format!("{words} ({})", failed.error),
                None => failed.error,
            };
            report.errors.insert(service, error);
        }
        Ok(report)
    }

    /// Resolves an image tag on the manager to its id; a tag in a registry
    /// to the digest the registry serves for it now, which every node pulls
    /// (as `docker service create` does).
    async fn image(&self, image: &str) -> Result<ImageState, SwarmError> {
        if registry_of(image).is_some() {
            return self.registry_image(image).await;
        }
        match self.api().inspect_image(image).await {
            Ok(found) => Ok(ImageState::Present {
                id: found.id.unwrap_or_default(),
            }),
            Err(e) if status_code(&e) == Some(404) => Ok(ImageState::Missing),
            Err(source) => Err(SwarmError::InspectImage {
                image: image.to_string(),
                source,
            }),
        }
    }

    /// Whether services can join the network of that exact name: it must
    /// exist and span the swarm (an overlay network), or be `host`.
    async fn network(&self, network: &str) -> Result<NetworkState, SwarmError> {
        if network == "host" {
            return Ok(NetworkState::Present);
        }
        match self.api().inspect_network(network, None).await {
            // The engine also resolves id prefixes; only an exact name counts.
            Ok(found) if found.name.as_deref() != Some(network) => Ok(NetworkState::Missing),
            Ok(found) if found.scope.as_deref() == Some("swarm") => Ok(NetworkState::Present),
            Ok(found) => Ok(NetworkState::LocalOnly {
                driver: found.driver.unwrap_or_else(|| "local".into()),
            }),
            Err(e) if status_code(&e) == Some(404) => Ok(NetworkState::Missing),
            Err(source) => Err(SwarmError::InspectNetwork {
                network: network.to_string(),
                source,
            }),
        }
    }

    /// Removes a service; Swarm stops its tasks gracefully (SIGTERM, the
    /// stop grace period, then SIGKILL). Removing a vanished one is fine.
    async fn remove(&self, id: &str) -> Result<(), SwarmError> {
        match self.api().delete_service(id).await {
            Err(e) if status_code(&e) == Some(404) => Ok(()),
            other => other.map_err(|source| SwarmError::Remove {
                service: id.to_string(),
                source,
            }),
        }
    }
}

fn status_code(error: &DockerError) -> Option<u16> {
    match error {
        DockerError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// The image a service runs: see [`ContainerSpec::service_image`].
fn pinned_image(spec: &ContainerSpec) -> String {
    spec.service_image().to_string()
}

fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

/// The service a worker's container spec describes.
pub(crate) fn service_spec(
    service: &WorkerService,
    instance: &str,
    options: &SwarmOptions,
) -> ServiceSpec {
    let spec = &service.spec;
    let labels: HashMap<String, String> = spec.labels(instance).into_iter().collect();
    ServiceSpec {
        name: Some(spec.name.clone()),
        labels: Some(labels.clone()),
        task_template: Some(task_spec(spec, labels, options)),
        mode: Some(ServiceSpecMode {
            replicated: Some(ServiceSpecModeReplicated {
                replicas: Some(i64::from(service.replicas)),
            }),
            ..Default::default()
        }),
        update_config: Some(update_config(options)),
        rollback_config: Some(rollback_config(options)),
        ..Default::default()
    }
}

/// One task at a time, the new one started (and healthy) before the old
/// one stops, watched for `update_monitor`; any failure rolls back.
fn update_config(options: &SwarmOptions) -> ServiceSpecUpdateConfig {
    ServiceSpecUpdateConfig {
        parallelism: Some(1),
        delay: Some(0),
        failure_action: Some(ServiceSpecUpdateConfigFailureActionEnum::ROLLBACK),
        monitor: Some(nanos(options.update_monitor)),
        max_failure_ratio: Some(0.0),
        order: Some(ServiceSpecUpdateConfigOrderEnum::START_FIRST),
    }
}

/// A rollback goes the same careful way; if it fails too, Swarm pauses and
/// the status says so.
fn rollback_config(options: &SwarmOptions) -> ServiceSpecRollbackConfig {
    ServiceSpecRollbackConfig {
        parallelism: Some(1),
        delay: Some(0),
        failure_action: Some(ServiceSpecRollbackConfigFailureActionEnum::PAUSE),
        monitor: Some(nanos(options.update_monitor)),
        max_failure_ratio: Some(0.0),
        order: Some(ServiceSpecRollbackConfigOrderEnum::START_FIRST),
    }
}

fn task_spec(
    spec: &ContainerSpec,
    labels: HashMap<String, String>,
    options: &SwarmOptions,
) -> TaskSpec {
    let limits = &spec.limits;
    TaskSpec {
        container_spec: Some(container_spec(spec, labels, options)),
        resources: Some(TaskSpecResources {
            limits: Some(Limit {
                nano_cpus: Some(limits.nano_cpus),
                memory_bytes: Some(limits.memory_bytes),
                pids: Some(limits.pids),
            }),
            ..Default::default()
        }),
        restart_policy: Some(TaskSpecRestartPolicy {
            condition: Some(TaskSpecRestartPolicyConditionEnum::ANY),
            delay: Some(nanos(options.restart_delay)),
            max_attempts: Some(0),
            window: Some(0),
        }),
        networks: Some(vec![NetworkAttachmentConfig {
            target: Some(spec.network.clone()),
            ..Default::default()
        }]),
        log_driver: Some(TaskSpecLogDriver {
            name: Some("json-file".into()),
            options: Some(HashMap::from([
                ("max-size".into(), "10m".into()),
                ("max-file".into(), "3".into()),
            ])),
        }),
        ..Default::default()
    }
}

fn container_spec(
    spec: &ContainerSpec,
    labels: HashMap<String, String>,
    options: &SwarmOptions,
) -> TaskSpecContainerSpec {
    let hardening = &spec.hardening;
    // No WORKER_READY_URL: a task's readiness is the health probe, which
    // Swarm itself waits for.
    let mut env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    env.push(format!("{REPLICA_ENV}={SLOT_TEMPLATE}"));
    TaskSpecContainerSpec {
        image: Some(pinned_image(spec)),
        labels: Some(labels),
        hostname: Some(format!("{}-{SLOT_TEMPLATE}", spec.name)),
        env: Some(env),
        read_only: Some(hardening.read_only_rootfs),
        capability_drop: Some(hardening.cap_drop.clone()),
        mounts: Some(hardening.tmpfs.iter().map(|path| tmpfs(path)).collect()),
        stop_signal: Some(spec.stop_signal.clone().unwrap_or_else(|| "SIGTERM".into())),
        stop_grace_period: Some(nanos(options.stop_timeout)),
        health_check: options.readiness.as_ref().map(Probe::health_config),
        // The worker image brings its own init (dumb-init; tini before).
        init: Some(false),
        ..Default::default()
    }
}

/// A writable tmpfs at `path`, open to the image's user (as Docker's own
/// `--tmpfs` is).
fn tmpfs(path: &str) -> Mount {
    Mount {
        target: Some(path.to_string()),
        typ: Some(MountType::TMPFS),
        tmpfs_options: Some(MountTmpfsOptions {
            size_bytes: Some(TMPFS_BYTES),
            mode: Some(0o1777),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A listed service in model terms; `None` for one without an id.
fn managed_service(service: Service) -> Option<ManagedService> {
    let spec = service.spec.unwrap_or_default();
    let labels = spec.labels.unwrap_or_default();
    let status = service.service_status.unwrap_or_default();
    let replicas = spec
        .mode
        .and_then(|m| m.replicated)
        .and_then(|r| r.replicas)
        .unwrap_or(0);
    let labelled = Labelled::read(|key| labels.get(key));
    Some(ManagedService {
        id: service.id?,
        name: spec.name.unwrap_or_default(),
        version: service.version.and_then(|v| v.index).unwrap_or(0),
        worker_id: labelled.worker_id,
        revision: labelled.revision,
        spec_hash: labelled.spec_hash,
        replicas: u32::try_from(replicas).unwrap_or(0),
        running: status.running_tasks.unwrap_or(0),
        desired_tasks: status.desired_tasks.unwrap_or(0),
        rollout: rollout_of(service.update_status),
    })
}

/// A listed node in model terms; `None` for one without an id.
fn swarm_node(node: Node) -> Option<SwarmNode> {
    let status = node.status.unwrap_or_default();
    Some(SwarmNode {
        id: node.id?,
        hostname: node
            .description
            .and_then(|d| d.hostname)
            .unwrap_or_default(),
        state: status
            .state
            .map_or_else(|| "unknown".to_string(), |s| s.to_string()),
    })
}

/// A listed task in model terms; `None` for one of no service.
fn swarm_task(task: &Task) -> Option<SwarmTask> {
    let status = task.status.clone().unwrap_or_default();
    let image = task
        .spec
        .as_ref()
        .and_then(|s| s.container_spec.as_ref())
        .and_then(|c| c.image.clone())
        .unwrap_or_default();
    Some(SwarmTask {
        service_id: task.service_id.clone()?,
        node_id: task.node_id.clone().filter(|n| !n.is_empty()),
        image,
        state: status
            .state
            .map_or_else(|| "unknown".to_string(), |s| s.to_string()),
        error: status.err.filter(|e| !e.is_empty()),
        version: task.version.as_ref().and_then(|v| v.index).unwrap_or(0),
    })
}

/// A task that failed: Swarm's words, and its container, if it had one.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FailedTask {
    error: String,
    container: Option<String>,
}

/// The newest failed or rejected task of each service, by service id:
/// its error, with the exit code of its container if it had one.
fn latest_task_errors(tasks: Vec<Task>) -> HashMap<String, FailedTask> {
    let mut latest: HashMap<String, (u64, FailedTask)> = HashMap::new();
    for task in tasks {
        let (Some(service), Some(status)) = (task.service_id, task.status) else {
            continue;
        };
        let failed = matches!(status.state, Some(TaskState::FAILED | TaskState::REJECTED))
            || status.err.as_deref().is_some_and(|e| !e.is_empty());
        if !failed {
            continue;
        }
        let version = task.version.and_then(|v| v.index).unwrap_or(0);
        let mut error = status
            .err
            .filter(|e| !e.is_empty())
            .or(status.message)
            .unwrap_or_else(|| "failed".into());
        let container_status = status.container_status.unwrap_or_default();
        if let Some(code) = container_status.exit_code
            && !error.contains(&format!("({code})"))
        {
            error = format!("{error} (exit code {code})");
        }
        let failed = FailedTask {
            error,
            container: container_status.container_id.filter(|c| !c.is_empty()),
        };
        if latest.get(&service).is_none_or(|(v, _)| *v < version) {
            latest.insert(service, (version, failed));
        }
    }
    latest.into_iter().map(|(k, (_, e))| (k, e)).collect()
}

fn rollout_of(status: Option<bollard::models::ServiceUpdateStatus>) -> Rollout {
    use ServiceUpdateStatusStateEnum as S;
    let Some(status) = status else {
        return Rollout::Settled;
    };
    let message = status.message.unwrap_or_default();
    match status.state {
        Some(S::UPDATING) => Rollout::Updating,
        Some(S::PAUSED | S::ROLLBACK_PAUSED) => Rollout::Paused { message },
        Some(S::ROLLBACK_STARTED) => Rollout::RollingBack { message },
        Some(S::ROLLBACK_COMPLETED) => Rollout::RolledBack { message },
        Some(S::COMPLETED | S::EMPTY) | None => Rollout::Settled,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Hardening, Limits, Revision, WorkerId};
    use std::collections::BTreeMap;
    use uuid::Uuid;

    const NANOS_PER_SEC: i64 = 1_000_000_000;
    const OPTIONS: SwarmOptions = SwarmOptions {
        update_monitor: Duration::from_secs(10),
        restart_delay: Duration::from_secs(5),
        stop_timeout: Duration::from_secs(10),
        readiness: None,
    };

    fn worker(image: &str, image_id: &str) -> WorkerService {
        WorkerService {
            spec: ContainerSpec {
                worker_id: WorkerId(Uuid::nil()),
                revision: Revision(3),
                replica: 0,
                name: "worker-x".into(),
                image: image.into(),
                image_id: image_id.into(),
                env: BTreeMap::from([("WORKER_REVISION".into(), "3".into())]),
                network: "host".into(),
                limits: Limits {
                    memory_bytes: 64 << 20,
                    nano_cpus: 500_000_000,
                    pids: 32,
                },
                hardening: Hardening {
                    read_only_rootfs: true,
                    no_new_privileges: true,
                    cap_drop: vec!["ALL".into()],
                    tmpfs: vec!["/tmp".into(), "/usercode".into()],
                },
                stop_signal: None,
                ready_url: Some("http://ctl/x/ready".into()),
            },
            replicas: 4,
        }
    }

    #[test]
    fn the_image_is_pinned_to_its_id_unless_it_is_a_registry_digest() {
        assert_eq!(
            pinned_image(&worker("img:latest", "sha256:1").spec),
            "sha256:1"
        );
        assert_eq!(pinned_image(&worker("img:latest", "").spec), "img:latest");
        let digest = "reg/img@sha256:abc";
        assert_eq!(pinned_image(&worker(digest, "sha256:1").spec), digest);
    }

    #[test]
    fn a_revision_rolls_out_one_task_at_a_time_start_first_and_rolls_back_on_failure() {
        let spec = service_spec(&worker("i", ""), "inst", &OPTIONS);
        let update = spec.update_config.expect("update config");
        assert_eq!(update.parallelism, Some(1));
        assert_eq!(
            update.order,
            Some(ServiceSpecUpdateConfigOrderEnum::START_FIRST)
        );
        assert_eq!(
            update.failure_action,
            Some(ServiceSpecUpdateConfigFailureActionEnum::ROLLBACK)
        );
        assert_eq!(update.monitor, Some(10 * NANOS_PER_SEC));
        let rollback = spec.rollback_config.expect("rollback config");
        assert_eq!(
            rollback.order,
            Some(ServiceSpecRollbackConfigOrderEnum::START_FIRST)
        );
    }

    #[test]
    fn the_service_carries_replicas_labels_limits_and_hardening() {
        let spec = service_spec(&worker("i", ""), "inst", &OPTIONS);
        let replicas = spec
            .mode
            .and_then(|m| m.replicated)
            .and_then(|r| r.replicas);
        assert_eq!(replicas, Some(4));
        let labels = spec.labels.expect("labels");
        assert_eq!(
            labels.get(labels::INSTANCE).map(String::as_str),
            Some("inst")
        );
        assert_eq!(labels.get(labels::REVISION).map(String::as_str), Some("3"));
        let task = spec.task_template.expect("task");
        let limits = task.resources.and_then(|r| r.limits).expect("limits");
        assert_eq!(
            (limits.pids, limits.memory_bytes),
            (Some(32), Some(64 << 20))
        );
        let c = task.container_spec.expect("container");
        assert_eq!(c.read_only, Some(true));
        assert_eq!(c.capability_drop, Some(vec!["ALL".to_string()]));
        let env = c.env.expect("env");
        assert!(env.contains(&"WORKER_REVISION=3".to_string()));
        assert!(env.contains(&format!("{REPLICA_ENV}={{{{.Task.Slot}}}}")));
        let mounts = c.mounts.expect("mounts");
        let targets: Vec<_> = mounts.iter().filter_map(|m| m.target.as_deref()).collect();
        assert_eq!(targets, ["/tmp", "/usercode"]);
        assert!(mounts.iter().all(|m| m.typ == Some(MountType::TMPFS)));
        assert!(
            !env.iter().any(|e| e.starts_with("WORKER_READY_URL=")),
            "readiness is the probe's"
        );
    }

    #[test]
    fn without_a_probe_the_image_healthcheck_gates_and_with_one_it_replaces_it() {
        let inherit = service_spec(&worker("i", ""), "inst", &OPTIONS);
        let c = inherit.task_template.and_then(|t| t.container_spec);
        assert_eq!(c.and_then(|c| c.health_check), None);
        let options = SwarmOptions {
            readiness: Some(Probe::dockerworker_ready()),
            ..OPTIONS
        };
        let probed = service_spec(&worker("i", ""), "inst", &options);
        let health = probed
            .task_template
            .and_then(|t| t.container_spec)
            .and_then(|c| c.health_check)
            .expect("a health check");
        let test = health.test.expect("a test");
        assert_eq!(&test[..3], ["CMD", "sh", "-c"]);
        assert!(test[3].contains("/tmp/dockerworker.ready"), "{}", test[3]);
        assert!(test[3].contains("/readyz"), "{}", test[3]);
        assert_eq!(health.retries, Some(3));
    }

    #[test]
    fn listed_services_map_to_the_model() {
        let id = Uuid::now_v7();
        let mut spec = service_spec(&worker("i", ""), "inst", &OPTIONS);
        let mut labels = spec.labels.take().expect("labels");
        labels.insert(labels::WORKER_ID.into(), id.to_string());
        spec.labels = Some(labels);
        let service = Service {
            id: Some("svc1".into()),
            version: Some(bollard::models::ObjectVersion { index: Some(42) }),
            spec: Some(spec),
            service_status: Some(bollard::models::ServiceServiceStatus {
                running_tasks: Some(3),
                desired_tasks: Some(4),
                completed_tasks: None,
            }),
            update_status: Some(bollard::models::ServiceUpdateStatus {
                state: Some(ServiceUpdateStatusStateEnum::ROLLBACK_COMPLETED),
                message: Some("rollback completed".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let m = managed_service(service).expect("has an id");
        assert_eq!(
            (m.version, m.replicas, m.running, m.desired_tasks),
            (42, 4, 3, 4)
        );
        assert_eq!(m.worker_id, Some(WorkerId(id)));
        assert_eq!(m.revision, Some(Revision(3)));
        assert_eq!(
            m.rollout,
            Rollout::RolledBack {
                message: "rollback completed".into()
            }
        );
    }

    #[test]
    fn the_newest_failed_task_of_each_service_says_why() {
        use bollard::models::{ObjectVersion, TaskStatus};
        let task =
            |service: &str, version: u64, state: TaskState, err: &str, code: Option<i64>| Task {
                service_id: Some(service.into()),
                version: Some(ObjectVersion {
                    index: Some(version),
                }),
                status: Some(TaskStatus {
                    state: Some(state),
                    err: Some(err.into()),
                    container_status: code.map(|c| bollard::models::ContainerStatus {
                        exit_code: Some(c),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            };
        let errors = latest_task_errors(vec![
            task(
                "a",
                1,
                TaskState::FAILED,
                "task: non-zero exit (1)",
                Some(1),
            ),
            task(
                "a",
                5,
                TaskState::FAILED,
                "task: non-zero exit (4)",
                Some(4),
            ),
            task("a", 9, TaskState::RUNNING, "", None),
            task("b", 2, TaskState::REJECTED, "no suitable node", None),
            task("c", 3, TaskState::RUNNING, "", None),
        ]);
        let error = |s: &str| errors.get(s).map(|f| f.error.as_str());
        assert_eq!(error("a"), Some("task: non-zero exit (4)"));
        assert_eq!(error("b"), Some("no suitable node"));
        assert!(!errors.contains_key("c"), "a running task is no error");
    }
}
