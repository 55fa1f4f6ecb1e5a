//! Docker implementation of [`super::ContainerRuntime`] (bollard), and the
//! Docker events wake-up source.
//!
//! This file owns the translation between Docker API types and the model:
//! labels ↔ [`ManagedContainer`], [`ContainerSpec`] → create body, Docker
//! status codes → [`RuntimeError`]. It makes no decisions: what to create,
//! stop or remove is the planner's business.
//!
//! **Invariant:** every Docker API call goes through [`DockerRuntime::api`],
//! so [`DockerRuntime::api_calls`] counts all of them.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::models::{
    ContainerCreateBody, ContainerSummary, ContainerSummaryStateEnum, EventMessage, HostConfig,
    HostConfigLogConfig, RestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, EventsOptionsBuilder, KillContainerOptionsBuilder,
    ListContainersOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder,
    RenameContainerOptionsBuilder, StopContainerOptionsBuilder, WaitContainerOptionsBuilder,
};
use futures::StreamExt;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{ContainerRuntime, RuntimeError};
use crate::backoff::{self, error_chain};
use crate::model::ImageState;
use crate::model::{
    ContainerSpec, Health, Labelled, ManagedContainer, Owner, RunState, WorkerId, labels,
};

/// The events that may change what a pass decides: a worker exited, was
/// removed, ran out of memory, or its health check changed its mind (the
/// engine matches `health_status` against `health_status: healthy` etc.).
const WAKE_EVENTS: [&str; 4] = ["die", "destroy", "oom", "health_status"];
/// The longest a `die` event waits for the engine to finish handling the exit.
const EXIT_HANDLED_MAX: Duration = Duration::from_secs(5);
/// First delay before reconnecting the event stream; doubles up to the cap.
const EVENTS_BACKOFF_INITIAL: Duration = Duration::from_millis(500);
const EVENTS_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Options of the worker's writable places. `exec` must be explicit: Docker
/// mounts a tmpfs `noexec` by default, and Python may load code extracted
/// there.
/// How long a stopping container has to exit before its stop signal is sent
/// once more (then it waits out the rest of its grace period). An
/// interpreter that runs as PID 1 ignores a signal that arrives before it
/// has set its handler — a container retired in its first moments, such as
/// SensorBucket's image superseded by a quick second save — and would
/// otherwise hold its whole grace period (10 s by default) for nothing.
const RESIGNAL: Duration = Duration::from_secs(1);
const TMPFS_OPTIONS: &str = "rw,exec,nosuid,nodev,size=64m";

/// The bollard-backed runtime; one per daemon, scoped to one `instance`.
pub struct DockerRuntime {
    docker: Docker,
    instance: String,
    /// Labels every created container carries beside the spec's: those of
    /// the Compose project the daemon runs in (`compose.rs`), if any.
    extra_labels: BTreeMap<String, String>,
    calls: AtomicU64,
}

impl DockerRuntime {
    /// Sends `signal`; whether the container is down within `wait`. A
    /// stopped or vanished container is down.
    async fn signal_and_wait(
        &self,
        id: &str,
        signal: &str,
        wait: Duration,
    ) -> Result<bool, RuntimeError> {
        let options = KillContainerOptionsBuilder::default()
            .signal(signal)
            .build();
        match self.api().kill_container(id, Some(options)).await {
            // 404: gone; 409: not running. Either way it is down.
            Err(e) if matches!(status_code(&e), Some(404 | 409)) => return Ok(true),
            other => other.map_err(|source| RuntimeError::Stop {
                container: id.to_string(),
                source,
            })?,
        }
        let options = WaitContainerOptionsBuilder::default()
            .condition("not-running")
            .build();
        let mut exited = self.api().wait_container(id, Some(options));
        Ok(tokio::time::timeout(wait, exited.next()).await.is_ok())
    }

    /// One stop request: the container's stop signal, then SIGKILL after
    /// `timeout`. A stopped or vanished container is fine.
    async fn stop_once(&self, id: &str, timeout: Duration) -> Result<(), RuntimeError> {
        let options = StopContainerOptionsBuilder::default()
            .t(whole_seconds(timeout))
            .build();
        // The engine answers only once the container is down: allow for the grace period.
        let client = self
            .api()
            .clone()
            .with_timeout(self.docker.timeout() + timeout);
        match client.stop_container(id, Some(options)).await {
            // 404: gone; 304: already stopped (by the other request, say).
            Err(e) if matches!(status_code(&e), Some(304 | 404)) => Ok(()),
            other => other.map_err(|source| RuntimeError::Stop {
                container: id.to_string(),
                source,
            }),
        }
    }

    /// Connects to the local engine (`DOCKER_HOST` or the default socket) and
    /// negotiates the API version down to what the engine speaks.
    pub async fn connect(instance: &str) -> Result<Self, RuntimeError> {
        let docker = Docker::connect_with_local_defaults().map_err(RuntimeError::Connect)?;
        Self::with_client(docker, instance).await
    }

    /// Like [`connect`](Self::connect), on a client the caller configured
    /// (another socket or host). The version negotiation is the first call,
    /// so an unreachable engine fails here rather than in the first pass.
    pub async fn with_client(docker: Docker, instance: &str) -> Result<Self, RuntimeError> {
        let docker = docker
            .negotiate_version()
            .await
            .map_err(RuntimeError::Connect)?;
        Ok(DockerRuntime {
            docker,
            instance: instance.to_string(),
            extra_labels: BTreeMap::new(),
            calls: AtomicU64::new(1),
        })
    }

    /// When this process runs in a container of a Compose project, every
    /// container it creates from now on is labelled a one-off of that
    /// project (`compose.rs`), so `docker compose down` removes it. Returns
    /// the project's name, if any.
    pub async fn join_compose_project(&mut self) -> Option<String> {
        let labels = super::compose::detect(self.api()).await?;
        let project = labels.get(super::compose::PROJECT).cloned();
        self.extra_labels = labels;
        project
    }

    /// How many Docker API calls this runtime has made (event streams count
    /// once per connection).
    pub fn api_calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// The instance whose containers this runtime manages.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The engine client, for read-only requests the reconciler never makes
    /// (`workerctl worker logs` streams a container's logs). Counted as one
    /// call, like every other use of the client.
    pub fn client(&self) -> &Docker {
        self.api()
    }

    pub async fn ping(&self) -> Result<(), RuntimeError> {
        self.api()
            .ping()
            .await
            .map(drop)
            .map_err(RuntimeError::Connect)
    }

    /// The client, counting the call about to be made.
    fn api(&self) -> &Docker {
        self.calls.fetch_add(1, Ordering::Relaxed);
        &self.docker
    }

    fn instance_filter(&self) -> String {
        format!("{}={}", labels::INSTANCE, self.instance)
    }

    /// Every container (running or not) carrying `label`.
    async fn list_labelled(&self, label: String) -> Result<Vec<ContainerSummary>, RuntimeError> {
        let filters = HashMap::from([("label", vec![label])]);
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        self.api()
            .list_containers(Some(options))
            .await
            .map_err(RuntimeError::List)
    }

    /// The stop signal a new container gets: the configured one, else none
    /// (so the image's STOPSIGNAL, or SIGTERM) for an image that declares
    /// one or is the dockerworker, else SIGINT (see `docker.stop_signal`).
    async fn stop_signal(&self, spec: &ContainerSpec) -> Option<String> {
        if spec.stop_signal.is_some() {
            return spec.stop_signal.clone();
        }
        let image = if spec.image_id.is_empty() {
            &spec.image
        } else {
            &spec.image_id
        };
        // An image that cannot be inspected fails the create anyway.
        let config = self.api().inspect_image(image).await.ok()?.config?;
        let declared = config.stop_signal.filter(|s| !s.is_empty());
        let dockerworker = labels::is(
            config.labels.as_ref(),
            labels::RUNTIME,
            labels::RUNTIME_DOCKERWORKER,
        );
        (declared.is_none() && !dockerworker).then(|| "SIGINT".to_string())
    }

    /// Whether `image` records its own traffic (its [`labels::RECORDS`]
    /// label); `None` when it cannot be told (not here, or the engine did
    /// not answer).
    pub(crate) async fn records_itself(&self, image: &str) -> Option<bool> {
        let config = self.api().inspect_image(image).await.ok()?.config?;
        Some(labels::is(
            config.labels.as_ref(),
            labels::RECORDS,
            labels::RECORDS_BATCHES,
        ))
    }

    /// Whether the container holding `name` belongs to this instance.
    /// `None` when it cannot be told (the holder vanished meanwhile, say).
    async fn name_is_ours(&self, name: &str) -> Option<bool> {
        let holder = self.api().inspect_container(name, None).await.ok()?;
        let labels = holder.config.and_then(|c| c.labels).unwrap_or_default();
        Some(labels.get(labels::INSTANCE) == Some(&self.instance))
    }
}

impl ContainerRuntime for DockerRuntime {
    async fn list(&self) -> Result<Vec<ManagedContainer>, RuntimeError> {
        let sensorbucket = format!(
            "{}={}",
            labels::sensorbucket::CONTROLLED_BY,
            labels::sensorbucket::CONTROLLER
        );
        let (ours, theirs) = tokio::join!(
            self.list_labelled(self.instance_filter()),
            self.list_labelled(sensorbucket)
        );
        Ok(ours?
            .into_iter()
            .filter_map(managed_container)
            .chain(theirs?.into_iter().filter_map(sensorbucket_container))
            .collect())
    }

    async fn image(&self, image: &str) -> Result<ImageState, RuntimeError> {
        match self.api().inspect_image(image).await {
            Ok(found) => Ok(ImageState::Present {
                id: found.id.unwrap_or_default(),
            }),
            Err(e) if status_code(&e) == Some(404) => Ok(ImageState::Missing),
            Err(source) => Err(RuntimeError::InspectImage {
                image: image.to_string(),
                source,
            }),
        }
    }

    async fn network_exists(&self, network: &str) -> Result<bool, RuntimeError> {
        match self.api().inspect_network(network, None).await {
            // The engine also resolves id prefixes; only an exact name counts.
            Ok(found) => Ok(found.name.as_deref() == Some(network)),
            Err(e) if status_code(&e) == Some(404) => Ok(false),
            Err(source) => Err(RuntimeError::InspectNetwork {
                network: network.to_string(),
                source,
            }),
        }
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        let options = CreateContainerOptionsBuilder::default()
            .name(&spec.name)
            .build();
        let mut body = create_body(spec, &self.instance, &self.extra_labels);
        body.stop_signal = self.stop_signal(spec).await;
        match self.api().create_container(Some(options), body).await {
            Ok(created) => {
                for warning in created.warnings {
                    warn!(container = %spec.name, %warning, "Docker warned on create");
                }
                Ok(created.id)
            }
            Err(e) if status_code(&e) == Some(409) => Err(self.name_conflict(&spec.name, e).await),
            Err(source) => Err(RuntimeError::Create {
                name: spec.name.clone(),
                source,
            }),
        }
    }

    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        // 304 (already started) is a success for bollard.
        self.api()
            .start_container(id, None)
            .await
            .map_err(|source| RuntimeError::Start {
                container: id.to_string(),
                source,
            })
    }

    async fn stop(&self, id: &str, timeout: Duration) -> Result<(), RuntimeError> {
        // Each stop request sends the container's stop signal: a second one,
        // made while the first waits, is the signal again (see RESIGNAL).
        let first = self.stop_once(id, timeout);
        if timeout <= RESIGNAL {
            return first.await;
        }
        tokio::pin!(first);
        tokio::select! {
            stopped = &mut first => return stopped,
            _ = tokio::time::sleep(RESIGNAL) => {}
        }
        debug!(
            container = id,
            "still running after its stop signal: sending it again"
        );
        let (first, second) = tokio::join!(first, self.stop_once(id, timeout - RESIGNAL));
        first.and(second)
    }

    async fn interrupt(
        &self,
        id: &str,
        signal: &str,
        timeout: Duration,
    ) -> Result<(), RuntimeError> {
        let first = RESIGNAL.min(timeout);
        if self.signal_and_wait(id, signal, first).await? {
            return Ok(());
        }
        let rest = timeout - first;
        if !rest.is_zero() {
            debug!(
                container = id,
                signal, "still running after the signal: sending it again"
            );
            if self.signal_and_wait(id, signal, rest).await? {
                return Ok(());
            }
        }
        // It did not stop in time: what `docker stop` does after its grace period.
        self.stop_once(id, Duration::ZERO).await
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        // No force: a running worker is stopped gracefully first. `v` removes
        // anonymous volumes so they do not pile up.
        let options = RemoveContainerOptionsBuilder::default().v(true).build();
        match self.api().remove_container(id, Some(options)).await {
            Err(e) if status_code(&e) == Some(404) => Ok(()),
            other => other.map_err(|source| RuntimeError::Remove {
                container: id.to_string(),
                source,
            }),
        }
    }

    async fn last_lines(&self, id: &str, lines: usize) -> Result<Vec<String>, RuntimeError> {
        tail(self.api(), id, lines)
            .await
            .map_err(|source| RuntimeError::Logs {
                container: id.to_string(),
                source,
            })
    }

    async fn rename(&self, id: &str, name: &str) -> Result<(), RuntimeError> {
        let options = RenameContainerOptionsBuilder::default().name(name).build();
        self.api()
            .rename_container(id, options)
            .await
            .map_err(|source| RuntimeError::Rename {
                container: id.to_string(),
                name: name.to_string(),
                source,
            })
    }
}

impl DockerRuntime {
    /// A 409 on create: someone else's container is [`RuntimeError::NameTaken`];
    /// ours means a race with an earlier create, which the next pass lists and
    /// sorts out, so it stays a plain create error.
    async fn name_conflict(&self, name: &str, source: DockerError) -> RuntimeError {
        match self.name_is_ours(name).await {
            Some(false) => RuntimeError::NameTaken {
                name: name.to_string(),
            },
            Some(true) | None => RuntimeError::Create {
                name: name.to_string(),
                source,
            },
        }
    }
}

/// How one event stream ended.
enum StreamEnd {
    Shutdown,
    Ended,
    Failed(DockerError),
}

/// The outcome of waiting to reconnect the event stream.
enum Reconnect {
    Shutdown,
    Unreachable,
    Ready,
}

impl DockerRuntime {
    /// Wakes `wake` whenever a container of this instance dies, is destroyed
    /// or runs out of memory, until `shutdown`. The stream is reconnected
    /// with capped exponential backoff when it fails (engine restarted), and
    /// `wake` is notified after a reconnect since events may have been missed.
    pub async fn events(&self, wake: Arc<Notify>, shutdown: CancellationToken) {
        // Events are asked for from this moment on, and after a reconnect from
        // the last one seen: a container that dies while the stream is being
        // set up still wakes the loop (the engine replays past events).
        let mut since = unix_now_nanos();
        let mut failures = 0u32;
        loop {
            if failures > 0 {
                match self.await_engine(failures, &shutdown).await {
                    Reconnect::Shutdown => return,
                    Reconnect::Unreachable => {
                        failures = failures.saturating_add(1);
                        continue;
                    }
                    Reconnect::Ready => wake.notify_one(),
                }
            }
            let started = Instant::now();
            match self.follow_events(&wake, &shutdown, &mut since).await {
                StreamEnd::Shutdown => return,
                StreamEnd::Ended => warn!("Docker event stream ended; reconnecting"),
                StreamEnd::Failed(e) => {
                    warn!(error = %error_chain(&e), "Docker event stream failed; reconnecting")
                }
            }
            // A stream that lived a while was healthy: start the backoff over.
            failures = if started.elapsed() > EVENTS_BACKOFF_MAX {
                1
            } else {
                failures.saturating_add(1)
            };
        }
    }

    /// Waits out the backoff for attempt `failures`, then asks whether the
    /// engine answers again.
    async fn await_engine(&self, failures: u32, shutdown: &CancellationToken) -> Reconnect {
        let ping = async {
            tokio::time::sleep(backoff::delay(
                EVENTS_BACKOFF_INITIAL,
                EVENTS_BACKOFF_MAX,
                failures - 1,
            ))
            .await;
            self.ping().await
        };
        tokio::select! {
            // Cancel-safe: dropping a sleep or a ping in flight loses nothing.
            _ = shutdown.cancelled() => Reconnect::Shutdown,
            answer = ping => match answer {
                Ok(()) => {
                    debug!("Docker engine reachable again; reconnecting the event stream");
                    Reconnect::Ready
                }
                Err(e) => {
                    warn!(error = %error_chain(&e), "Docker engine still unreachable");
                    Reconnect::Unreachable
                }
            },
        }
    }

    /// Returns once the engine has finished handling the exit that `die`
    /// announced. The engine sends `die` before the container's listed state
    /// says it exited (Docker 20.10 updates the list's view last, under the
    /// container's lock), so a pass woken at once would still list it as
    /// running and miss the crash until the next resync. Inspecting waits for
    /// that lock; its answer is not needed.
    async fn exit_handled(&self, die: &EventMessage) {
        let Some(id) = die.actor.as_ref().and_then(|a| a.id.as_deref()) else {
            return;
        };
        let inspect = self.api().inspect_container(id, None);
        if tokio::time::timeout(EXIT_HANDLED_MAX, inspect)
            .await
            .is_err()
        {
            debug!(
                container = id,
                "the engine is slow to handle an exit; waking anyway"
            );
        }
    }

    /// Follows one event stream until it ends, fails or `shutdown`.
    /// `since` (Unix ns) is where the stream starts, and advances with each event.
    async fn follow_events(
        &self,
        wake: &Notify,
        shutdown: &CancellationToken,
        since: &mut i64,
    ) -> StreamEnd {
        let from = format!("{}.{:09}", *since / 1_000_000_000, *since % 1_000_000_000);
        // This instance's containers, and SensorBucket's controller's (which
        // the planner takes over, or reports made again): two streams, as
        // the engine matches every label filter of one.
        let sensorbucket = format!(
            "{}={}",
            labels::sensorbucket::CONTROLLED_BY,
            labels::sensorbucket::CONTROLLER
        );
        let follow = |label: String, events: &[&str]| {
            let filters = HashMap::from([
                ("type", vec!["container".to_string()]),
                ("label", vec![label]),
                ("event", events.iter().map(|e| e.to_string()).collect()),
            ]);
            let options = EventsOptionsBuilder::default()
                .filters(&filters)
                .since(&from)
                .build();
            // An end marker: the first stream that ends ends both (`None`).
            self.api()
                .events(Some(options))
                .map(Some)
                .chain(futures::stream::iter([None]))
        };
        // Theirs also when they start: a controller that is still on makes
        // again the container workerctl replaced.
        let mut theirs_events = WAKE_EVENTS.to_vec();
        theirs_events.push("start");
        let mut stream = futures::stream::select(
            follow(self.instance_filter(), &WAKE_EVENTS),
            follow(sensorbucket, &theirs_events),
        );
        // `next.flatten()` below: `None` is either stream's end marker (or,
        // never reached, the end of both).
        loop {
            let next = tokio::select! {
                // Cancel-safe: `next` on a stream loses no item when dropped.
                _ = shutdown.cancelled() => return StreamEnd::Shutdown,
                next = stream.next() => next,
            };
            match next.flatten() {
                Some(Ok(event)) => {
                    log_event(&event);
                    *since = event.time_nano.unwrap_or(*since).max(*since);
                    if event.action.as_deref() == Some("die") {
                        tokio::select! {
                            _ = shutdown.cancelled() => return StreamEnd::Shutdown,
                            () = self.exit_handled(&event) => {}
                        }
                    }
                    wake.notify_one();
                }
                Some(Err(e)) => return StreamEnd::Failed(e),
                None => return StreamEnd::Ended,
            }
        }
    }
}

fn unix_now_nanos() -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    now.map_or(0, |d| d.as_nanos() as i64)
}

fn log_event(event: &EventMessage) {
    let attributes = event.actor.as_ref().and_then(|a| a.attributes.as_ref());
    let attribute = |key: &str| attributes.and_then(|a| a.get(key)).map(String::as_str);
    debug!(
        action = event.action.as_deref().unwrap_or(""),
        container = attribute("name").unwrap_or(""),
        exit_code = attribute("exitCode"),
        "Docker event"
    );
}

/// Docker's answer about a container that is removed (404), or dead or being
/// removed (409): there is nothing left to read from it.
/// The last `lines` lines a container wrote (stdout and stderr
/// interleaved); none if it is gone. One API call.
pub(crate) async fn tail(
    docker: &Docker,
    id: &str,
    lines: usize,
) -> Result<Vec<String>, DockerError> {
    let options = LogsOptionsBuilder::default()
        .stdout(true)
        .stderr(true)
        .tail(&lines.to_string())
        .build();
    let mut logs = docker.logs(id, Some(options));
    let mut out = Vec::new();
    while let Some(chunk) = logs.next().await {
        match chunk {
            Ok(chunk) => out.extend(chunk.to_string().lines().map(str::to_string)),
            Err(e) if is_gone(&e) => break,
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

pub(crate) fn is_gone(e: &DockerError) -> bool {
    matches!(status_code(e), Some(404 | 409))
}

/// The HTTP status of an engine error response, if it is one.
fn status_code(error: &DockerError) -> Option<u16> {
    match error {
        DockerError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// Docker's stop grace period is whole seconds; round up so the worker never
/// gets less time than asked for.
fn whole_seconds(timeout: Duration) -> i32 {
    let secs = timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0);
    i32::try_from(secs).unwrap_or(i32::MAX)
}

/// The container a spec describes, with the hardening every worker gets.
fn create_body(
    spec: &ContainerSpec,
    instance: &str,
    extra_labels: &BTreeMap<String, String>,
) -> ContainerCreateBody {
    // Pinning the resolved id means a rebuild of the tag between the image
    // check and this create cannot slip an unchecked image in.
    let image = if spec.image_id.is_empty() {
        &spec.image
    } else {
        &spec.image_id
    };
    // Not in `spec.env`, so that every replica has the same spec hash.
    let ready = spec
        .ready_url
        .iter()
        .map(|u| format!("WORKER_READY_URL={u}"))
        .chain([format!("WORKER_REPLICA={}", spec.replica)]);
    ContainerCreateBody {
        image: Some(image.clone()),
        env: Some(
            spec.env
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .chain(ready)
                .collect(),
        ),
        labels: Some(
            extra_labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .chain(spec.labels(instance))
                .collect(),
        ),
        host_config: Some(host_config(spec)),
        ..Default::default()
    }
}

pub(crate) fn host_config(spec: &ContainerSpec) -> HostConfig {
    let (limits, hardening) = (&spec.limits, &spec.hardening);
    HostConfig {
        network_mode: Some(spec.network.clone()),
        // The reconciler restarts crashed workers, with backoff and a status.
        restart_policy: Some(RestartPolicy {
            name: Some(RestartPolicyNameEnum::NO),
            maximum_retry_count: None,
        }),
        memory: Some(limits.memory_bytes),
        // Swap equal to memory: no swap on top of the limit.
        memory_swap: Some(limits.memory_bytes),
        nano_cpus: Some(limits.nano_cpus),
        pids_limit: Some(limits.pids),
        security_opt: Some(if hardening.no_new_privileges {
            vec!["no-new-privileges:true".into()]
        } else {
            vec![]
        }),
        cap_drop: Some(hardening.cap_drop.clone()),
        readonly_rootfs: Some(hardening.read_only_rootfs),
        tmpfs: Some(
            hardening
                .tmpfs
                .iter()
                .map(|path| (path.clone(), TMPFS_OPTIONS.to_string()))
                .collect(),
        ),
        // The worker image brings its own init (dumb-init; tini before).
        init: Some(false),
        log_config: Some(HostConfigLogConfig {
            typ: Some("json-file".into()),
            config: Some(HashMap::from([
                ("max-size".into(), "10m".into()),
                ("max-file".into(), "3".into()),
            ])),
        }),
        ..Default::default()
    }
}

/// A listed container in model terms; `None` for a summary without an id.
fn managed_container(summary: ContainerSummary) -> Option<ManagedContainer> {
    let labels: BTreeMap<String, String> = summary.labels.unwrap_or_default().into_iter().collect();
    let name = summary
        .names
        .as_ref()
        .and_then(|n| n.first())
        .map(|n| n.trim_start_matches('/'));
    let labelled = Labelled::read(|key| labels.get(key));
    Some(ManagedContainer {
        id: summary.id?,
        name: name.unwrap_or_default().to_string(),
        worker_id: labelled.worker_id,
        revision: labelled.revision,
        spec_hash: labelled.spec_hash,
        replica: labelled.replica,
        image_id: summary.image_id.unwrap_or_default(),
        health: health(summary.status.as_deref().unwrap_or_default()),
        dockerworker: labels.get(labels::RUNTIME).map(String::as_str)
            == Some(labels::RUNTIME_DOCKERWORKER),
        state: run_state(summary.state, summary.status.as_deref()),
        created: summary.created.unwrap_or_default(),
        owner: Owner::Workerctl,
    })
}

/// A container of SensorBucket's own controller in model terms: its
/// `worker-id` and `worker-revision`, replica 0, no spec hash (so never the
/// current spec). `None` without an id or a readable worker id: such a
/// container is nobody's business here.
fn sensorbucket_container(summary: ContainerSummary) -> Option<ManagedContainer> {
    let labels = summary.labels.clone().unwrap_or_default();
    let worker_id: WorkerId = labels.get(labels::sensorbucket::WORKER_ID)?.parse().ok()?;
    let revision = labels
        .get(labels::sensorbucket::REVISION)
        .and_then(|r| r.parse().ok())
        .map(crate::model::Revision);
    let mut container = managed_container(summary)?;
    container.worker_id = Some(worker_id);
    container.revision = revision;
    container.spec_hash = None;
    container.replica = 0;
    container.dockerworker = false;
    container.owner = Owner::SensorBucket;
    Some(container)
}

fn run_state(state: Option<ContainerSummaryStateEnum>, status: Option<&str>) -> RunState {
    match state {
        Some(ContainerSummaryStateEnum::RUNNING) => RunState::Running,
        Some(ContainerSummaryStateEnum::CREATED) => RunState::Created,
        Some(ContainerSummaryStateEnum::EXITED) => RunState::Exited(status.and_then(exit_code)),
        Some(other) => RunState::Other(other.to_string()),
        None => RunState::Other(String::new()),
    }
}

/// The health check's verdict in a summary's status text: "Up 5 seconds
/// (healthy)", "Up 1 second (health: starting)", "Up 2 minutes (unhealthy)";
/// nothing in parentheses when the image has no health check.
fn health(status: &str) -> Health {
    if status.contains("(healthy)") {
        Health::Healthy
    } else if status.contains("(unhealthy)") {
        Health::Unhealthy
    } else if status.contains("(health: starting)") {
        Health::Starting
    } else {
        Health::None
    }
}

/// The exit code in a summary's status text: "Exited (137) 5 seconds ago" → 137.
fn exit_code(status: &str) -> Option<i64> {
    let rest = status.trim_start().strip_prefix("Exited (")?;
    let (code, _) = rest.split_once(')')?;
    code.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Hardening, Limits, Revision, WorkerId};
    use uuid::Uuid;

    #[test]
    fn exit_code_is_read_from_the_status_text() {
        assert_eq!(exit_code("Exited (137) 5 seconds ago"), Some(137));
        assert_eq!(exit_code("Exited (0) About a minute ago"), Some(0));
        assert_eq!(exit_code("Exited (-1) 2 hours ago"), Some(-1));
    }

    #[test]
    fn health_is_read_from_the_status_text() {
        let cases = [
            ("Up 5 seconds (healthy)", Health::Healthy),
            ("Up 2 minutes (unhealthy)", Health::Unhealthy),
            ("Up 1 second (health: starting)", Health::Starting),
            ("Up 3 minutes", Health::None),
            ("Exited (4) 1 second ago", Health::None),
        ];
        for (status, want) in cases {
            assert_eq!(health(status), want, "{status}");
        }
    }

    #[test]
    fn unreadable_status_text_has_no_exit_code() {
        assert_eq!(exit_code("Up 3 minutes"), None);
        assert_eq!(exit_code("Exited (x) now"), None);
        assert_eq!(exit_code("Exited (1"), None);
        assert_eq!(exit_code(""), None);
    }

    #[test]
    fn summary_states_map_to_run_states() {
        use ContainerSummaryStateEnum as S;
        assert_eq!(
            run_state(Some(S::RUNNING), Some("Up 1 second")),
            RunState::Running
        );
        assert_eq!(
            run_state(Some(S::CREATED), Some("Created")),
            RunState::Created
        );
        assert_eq!(
            run_state(Some(S::EXITED), Some("Exited (3) now")),
            RunState::Exited(Some(3))
        );
        assert_eq!(run_state(Some(S::EXITED), None), RunState::Exited(None));
        assert_eq!(
            run_state(Some(S::PAUSED), None),
            RunState::Other("paused".into())
        );
        assert_eq!(
            run_state(Some(S::DEAD), None),
            RunState::Other("dead".into())
        );
    }

    fn summary(labels: &[(&str, &str)]) -> ContainerSummary {
        ContainerSummary {
            id: Some("0123456789abcdef".into()),
            names: Some(vec!["/worker-x".into()]),
            image_id: Some("sha256:abc".into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            state: Some(ContainerSummaryStateEnum::RUNNING),
            created: Some(42),
            ..Default::default()
        }
    }

    #[test]
    fn labels_are_parsed_into_the_container() {
        let id = Uuid::now_v7();
        let id_text = id.to_string();
        let c = managed_container(summary(&[
            (labels::WORKER_ID, &id_text),
            (labels::REVISION, "7"),
            (labels::SPEC_HASH, "beef"),
        ]))
        .expect("has an id");
        assert_eq!(c.name, "worker-x");
        assert_eq!(c.worker_id, Some(WorkerId(id)));
        assert_eq!(c.revision, Some(Revision(7)));
        assert_eq!(c.spec_hash.as_deref(), Some("beef"));
        assert_eq!((c.image_id.as_str(), c.created), ("sha256:abc", 42));
    }

    #[test]
    fn unreadable_or_missing_labels_are_none() {
        let c = managed_container(summary(&[
            (labels::WORKER_ID, "nope"),
            (labels::REVISION, "x"),
        ]))
        .expect("has an id");
        assert_eq!((c.worker_id, c.revision, c.spec_hash), (None, None, None));
    }

    #[test]
    fn a_summary_without_id_is_skipped() {
        let s = ContainerSummary {
            id: None,
            ..summary(&[])
        };
        assert!(managed_container(s).is_none());
    }

    fn spec(image_id: &str) -> ContainerSpec {
        ContainerSpec {
            worker_id: WorkerId(Uuid::nil()),
            revision: Revision(2),
            replica: 0,
            name: "worker-x".into(),
            image: "img:latest".into(),
            image_id: image_id.into(),
            env: BTreeMap::from([("A".into(), "1".into()), ("B".into(), "x=y".into())]),
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
            ready_url: Some("http://ctl/w/ready?token=t".into()),
        }
    }

    #[test]
    fn create_body_pins_the_image_id_when_known() {
        assert_eq!(
            create_body(&spec("sha256:1"), "i", &BTreeMap::new())
                .image
                .as_deref(),
            Some("sha256:1")
        );
        assert_eq!(
            create_body(&spec(""), "i", &BTreeMap::new())
                .image
                .as_deref(),
            Some("img:latest")
        );
    }

    #[test]
    fn create_body_carries_env_and_labels() {
        let body = create_body(&spec(""), "inst", &BTreeMap::new());
        assert_eq!(
            body.env,
            Some(vec![
                "A=1".to_string(),
                "B=x=y".to_string(),
                "WORKER_READY_URL=http://ctl/w/ready?token=t".to_string(),
                "WORKER_REPLICA=0".to_string(),
            ])
        );
        let labels = body.labels.expect("labels");
        assert_eq!(
            labels.get(labels::INSTANCE).map(String::as_str),
            Some("inst")
        );
        assert_eq!(labels.get(labels::REVISION).map(String::as_str), Some("2"));
    }

    #[test]
    fn host_config_has_no_swap_and_no_restart_policy() {
        let host = host_config(&spec(""));
        assert_eq!(host.memory, host.memory_swap);
        let policy = host.restart_policy.and_then(|p| p.name);
        assert_eq!(policy, Some(RestartPolicyNameEnum::NO));
    }

    #[test]
    fn the_tmpfs_mounts_are_the_only_writable_places_and_allow_exec() {
        let host = host_config(&spec(""));
        assert_eq!(host.readonly_rootfs, Some(true));
        let tmpfs = host.tmpfs.expect("tmpfs mounts");
        assert_eq!(tmpfs.len(), 2);
        for path in ["/tmp", "/usercode"] {
            let options = &tmpfs[path];
            assert!(options.split(',').any(|o| o == "exec"), "{path}: {options}");
        }
    }

    #[test]
    fn each_hardening_knob_can_be_turned_off() {
        let mut s = spec("");
        s.hardening = Hardening {
            read_only_rootfs: false,
            no_new_privileges: false,
            cap_drop: vec![],
            tmpfs: vec![],
        };
        let host = host_config(&s);
        assert_eq!(host.readonly_rootfs, Some(false));
        assert_eq!(host.security_opt, Some(vec![]));
        assert_eq!(host.cap_drop, Some(vec![]));
        assert_eq!(host.tmpfs.map(|t| t.len()), Some(0));
    }

    #[test]
    fn stop_timeout_rounds_up_to_whole_seconds() {
        assert_eq!(whole_seconds(Duration::from_secs(10)), 10);
        assert_eq!(whole_seconds(Duration::from_millis(1500)), 2);
        assert_eq!(whole_seconds(Duration::ZERO), 0);
    }

    #[tokio::test]
    async fn an_unreachable_engine_is_a_connect_error_naming_the_cause() {
        // A file where the socket should be: it exists, but nothing listens.
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("docker.sock");
        std::fs::write(&socket, b"").expect("placeholder file");
        let path = socket.to_str().expect("utf-8 path");
        let docker = Docker::connect_with_unix(path, 5, bollard::API_DEFAULT_VERSION)
            .expect("client builds");
        let err = match DockerRuntime::with_client(docker, "t").await {
            Err(e) => e,
            Ok(_) => panic!("must not connect"),
        };
        assert!(matches!(err, RuntimeError::Connect(_)), "{err:?}");
        let text = error_chain(&err);
        assert!(text.starts_with("cannot reach the Docker engine"), "{text}");
        assert!(text.contains("refused"), "the cause is named: {text}");
    }
}
