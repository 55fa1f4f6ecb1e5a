//! The controller benchmark: how fast workerctl's control loop turns a change
//! of `user_workers` into running containers, beside the docker CLI doing the
//! same by hand, and how many Docker API calls and SQL statements an idle pass
//! costs. `scripts/bench` runs it (services, images, then
//! `cargo bench --bench controller`); docs/benchmarks.md records the figures.
//!
//! The daemon runs in-process as in tests/daemon.rs: the real control loop,
//! the Postgres LISTEN wake-up and the Docker events wake-up, on a throwaway
//! database `workerctl_bench_<random>` (dropped at the end), under its own
//! `instance`, so it never sees anyone else's containers. Its store and
//! runtime are wrapped in a recorder that timestamps every call (well under a
//! microsecond each): that is where the "where the time goes" breakdown comes
//! from. Latencies are measured here, never inside the daemon: from just
//! before the COMMIT is sent to the engine's timestamp of the Docker `start`
//! event of the new container.
//!
//! Figures are printed, never asserted: the targets are shown beside them.
//! Settings (environment): BENCH_BUMPS (20), BENCH_FLEET (100),
//! BENCH_FLEET_REPEATS (3), BENCH_SIZES (50,100,200), DATABASE_URL, and
//! RUST_LOG for the daemon's own log (default warnings only).

mod common;

use common::{
    admin_pool, bench_main, load_average, lock, median, ms, percentile, progress, sorted,
};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use workerctl::model::{ImageState, Observed};
use workerctl::reconcile::containers::Containers;

use bollard::Docker;
use bollard::models::EventMessage;
use bollard::query_parameters::EventsOptionsBuilder;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;
use workerctl::archive::{DEFAULT_USERCODE, sensorbucket_archive};
use workerctl::config::{Config, Secret};
use workerctl::daemon;
use workerctl::leader::{LeaderTiming, Leadership};
use workerctl::metrics::Metrics;
use workerctl::model::{
    ContainerSpec, DesiredWorker, ManagedContainer, Revision, RunState, WorkerId, WorkerRow, labels,
};
use workerctl::readiness::ReadyReports;
use workerctl::reconcile::{PassSettings, Reconciler};
use workerctl::runtime::docker::DockerRuntime;
use workerctl::runtime::{ContainerRuntime, RuntimeError};
use workerctl::store::postgres::PgStore;
use workerctl::store::{Code, StatusUpdate, StoreError, WorkerStore};

/// The stand-in worker, built from busybox at start (never pulled). Unlike
/// the test image it sleeps in one long `sleep` rather than waking every
/// 100 ms, so 200 idle workers do not load the 2 cores the figures share;
/// `wait` is interrupted by the trapped SIGTERM, so it still stops at once.
const IMAGE: &str = "workerctl-bench/worker:latest";
/// Reports ready (as the dockerworker does once it consumes), then idles.
const SCRIPT: &str = "wget -q -O /dev/null --post-data '' \"$WORKER_READY_URL\"; trap 'exit 0' TERM; while :; do sleep 3600 & wait $!; done";
const DEFAULT_DATABASE_URL: &str = "postgres://workerctl:workerctl@127.0.0.1:5432/workerctl";
/// Bumps and CLI replacements run first and not counted.
const WARMUP: usize = 2;
const DEADLINE: Duration = Duration::from_secs(180);
/// No store or Docker call and no wake-up for this long: the loop is idle.
const QUIET: Duration = Duration::from_millis(400);
/// What the CLI reference runs in parallel, as the daemon's default concurrency.
const CLI_PARALLEL: &str = "-P8";
/// A target is judged met or missed only on a median of at least this many runs.
const MIN_JUDGED: usize = 5;

struct Settings {
    bumps: usize,
    fleet: usize,
    fleet_repeats: usize,
    sizes: Vec<usize>,
    database_url: String,
}

impl Settings {
    fn from_env() -> Settings {
        let var = |key: &str| std::env::var(key).ok();
        let num = |key: &str, default| var(key).and_then(|v| v.parse().ok()).unwrap_or(default);
        let sizes: Vec<usize> = var("BENCH_SIZES")
            .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
            .unwrap_or_default();
        Settings {
            bumps: num("BENCH_BUMPS", 20).max(1),
            fleet: num("BENCH_FLEET", 100).max(1),
            fleet_repeats: num("BENCH_FLEET_REPEATS", MIN_JUDGED).max(1),
            sizes: if sizes.is_empty() {
                vec![50, 100, 200]
            } else {
                sizes
            },
            database_url: var("DATABASE_URL").unwrap_or_else(|| DEFAULT_DATABASE_URL.into()),
        }
    }
}

fn main() -> ExitCode {
    bench_main("controller", || run(Settings::from_env()))
}

/// Sets up, measures, and always cleans up: containers of both instances and
/// the throwaway database go even when a measurement panics.
async fn run(settings: Settings) -> ExitCode {
    let load_before = load_average();
    build_image().await;
    let db = Database::create(&settings.database_url).await;
    let instance = format!("bench{}", &Uuid::new_v4().simple().to_string()[..10]);
    let tasks = Arc::new(Tasks::default());
    let body = tokio::spawn(measure(
        db.url.clone(),
        instance.clone(),
        tasks.clone(),
        settings,
    ));
    let outcome = body.await;
    tasks.stop().await;
    remove_containers(&instance).await;
    remove_containers(&reference_instance(&instance)).await;
    db.drop().await;
    match outcome {
        Ok(results) => {
            results.print(&load_before, &load_average());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn measure(db_url: String, instance: String, tasks: Arc<Tasks>, s: Settings) -> Results {
    let d = Daemon::start(db_url, instance, &tasks).await;
    let (bumps, cli_bumps, parity) = revision_bumps(&d, s.bumps).await;
    let mut fleet = Vec::new();
    let mut cli_fleet = Vec::new();
    for round in 1..=s.fleet_repeats {
        progress(format_args!("(2) {} workers, round {round}", s.fleet));
        fleet.push(enable_fleet(&d, s.fleet).await);
        cli_fleet.push(cli_fleet_run(&d, s.fleet).await);
    }
    let idle = idle_passes(&d, &s.sizes).await;
    Results {
        grace_s: d.config.docker.stop_timeout.as_secs(),
        bumps,
        cli_bumps,
        parity,
        fleet_size: s.fleet,
        fleet,
        cli_fleet,
        idle,
    }
}

// ---------------------------------------------------------------------------
// The recorder: every store and runtime call of the daemon, timestamped.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    LoadWorkers,
    WriteStatuses,
    WriteObserved,
    LoadCode,
    List,
    Image,
    Network,
    Create,
    Start,
    Stop,
    Remove,
    Rename,
    Logs,
}

#[derive(Clone, Copy, Debug)]
struct Call {
    op: Op,
    start: Instant,
    end: Instant,
}

#[derive(Default)]
struct Trace {
    calls: Mutex<Vec<Call>>,
    /// When the listener delivered a change notification.
    notified: Mutex<Vec<Instant>>,
    in_flight: AtomicUsize,
}

impl Trace {
    async fn time<T>(&self, op: Op, call: impl Future<Output = T>) -> T {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let start = Instant::now();
        let out = call.await;
        let end = Instant::now();
        lock(&self.calls).push(Call { op, start, end });
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        out
    }

    fn notify(&self) {
        lock(&self.notified).push(Instant::now());
    }

    /// Calls begun at or after `t`, in the order they began.
    fn calls_since(&self, t: Instant) -> Vec<Call> {
        let mut calls: Vec<Call> = lock(&self.calls)
            .iter()
            .filter(|c| c.start >= t)
            .copied()
            .collect();
        calls.sort_by_key(|c| c.start);
        calls
    }

    fn first_notify_since(&self, t: Instant) -> Option<Instant> {
        lock(&self.notified).iter().copied().find(|n| *n >= t)
    }

    /// Whether nothing ran and nothing woke the loop for [`QUIET`].
    fn quiet(&self) -> bool {
        let last_call = lock(&self.calls).iter().map(|c| c.end).max();
        let last_notify = lock(&self.notified).last().copied();
        self.in_flight.load(Ordering::SeqCst) == 0
            && last_call
                .max(last_notify)
                .is_none_or(|t| t.elapsed() >= QUIET)
    }
}

/// A store or runtime whose every call is recorded in a [`Trace`].
struct Timed<T> {
    inner: Arc<T>,
    trace: Arc<Trace>,
}

impl<T> Timed<T> {
    fn new(inner: Arc<T>, trace: Arc<Trace>) -> Self {
        Timed { inner, trace }
    }
}

impl<S: WorkerStore> WorkerStore for Timed<S> {
    async fn load_workers(&self) -> Result<Vec<WorkerRow>, StoreError> {
        let call = self.inner.load_workers();
        self.trace.time(Op::LoadWorkers, call).await
    }

    async fn write_statuses(&self, updates: &[StatusUpdate]) -> Result<u64, StoreError> {
        let call = self.inner.write_statuses(updates);
        self.trace.time(Op::WriteStatuses, call).await
    }

    async fn write_observed(&self, observed: &[Observed]) -> Result<(), StoreError> {
        let call = self.inner.write_observed(observed);
        self.trace.time(Op::WriteObserved, call).await
    }

    async fn load_code(&self, id: WorkerId, token: &str) -> Result<Option<Code>, StoreError> {
        self.trace
            .time(Op::LoadCode, self.inner.load_code(id, token))
            .await
    }
}

impl<R: ContainerRuntime> ContainerRuntime for Timed<R> {
    async fn list(&self) -> Result<Vec<ManagedContainer>, RuntimeError> {
        self.trace.time(Op::List, self.inner.list()).await
    }

    async fn image(&self, image: &str) -> Result<ImageState, RuntimeError> {
        self.trace.time(Op::Image, self.inner.image(image)).await
    }

    async fn network_exists(&self, network: &str) -> Result<bool, RuntimeError> {
        let call = self.inner.network_exists(network);
        self.trace.time(Op::Network, call).await
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        self.trace.time(Op::Create, self.inner.create(spec)).await
    }

    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        self.trace.time(Op::Start, self.inner.start(id)).await
    }

    async fn stop(&self, id: &str, timeout: Duration) -> Result<(), RuntimeError> {
        self.trace
            .time(Op::Stop, self.inner.stop(id, timeout))
            .await
    }

    async fn interrupt(
        &self,
        id: &str,
        signal: &str,
        timeout: Duration,
    ) -> Result<(), RuntimeError> {
        let call = self.inner.interrupt(id, signal, timeout);
        self.trace.time(Op::Stop, call).await
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        self.trace.time(Op::Remove, self.inner.remove(id)).await
    }

    async fn rename(&self, id: &str, name: &str) -> Result<(), RuntimeError> {
        self.trace
            .time(Op::Rename, self.inner.rename(id, name))
            .await
    }

    async fn last_lines(&self, id: &str, lines: usize) -> Result<Vec<String>, RuntimeError> {
        self.trace
            .time(Op::Logs, self.inner.last_lines(id, lines))
            .await
    }
}

// ---------------------------------------------------------------------------
// Services: the image, the throwaway database, the daemon, the start events.

async fn build_image() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cmd = serde_json::to_string(&["/bin/sh", "-c", SCRIPT]).expect("json");
    let dockerfile = format!("FROM workerctl/busybox:latest\nCMD {cmd}\n");
    std::fs::write(dir.path().join("Dockerfile"), dockerfile).expect("write Dockerfile");
    let out = Command::new("docker")
        .args(["build", "-q", "-t", IMAGE])
        .arg(dir.path())
        .output()
        .await
        .expect("the docker CLI runs");
    assert!(
        out.status.success(),
        "building {IMAGE} failed (is workerctl/busybox:latest built? run scripts/build-images): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `workerctl_bench_<random>`, created on the server of DATABASE_URL.
struct Database {
    admin_url: String,
    name: String,
    url: String,
}

impl Database {
    async fn create(admin_url: &str) -> Database {
        let name = format!(
            "workerctl_bench_{}",
            &Uuid::new_v4().simple().to_string()[..12]
        );
        let admin = admin_pool(admin_url).await;
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&admin)
            .await
            .expect("CREATE DATABASE (the DATABASE_URL role must be allowed to)");
        admin.close().await;
        let mut url = reqwest::Url::parse(admin_url).expect("DATABASE_URL is a URL");
        url.set_path(&name);
        progress(format_args!("database {name} created"));
        Database {
            admin_url: admin_url.into(),
            url: url.to_string(),
            name,
        }
    }

    async fn drop(self) {
        let admin = admin_pool(&self.admin_url).await;
        let dropped = sqlx::query(&format!(
            "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
            self.name
        ))
        .execute(&admin)
        .await;
        match dropped {
            Ok(_) => progress(format_args!("database {} dropped", self.name)),
            Err(e) => eprintln!("bench: cannot drop database {}: {e}", self.name),
        }
    }
}

/// The daemon's background tasks, stopped by the caller of [`measure`]
/// whatever happens to the measurement.
#[derive(Default)]
struct Tasks {
    shutdown: CancellationToken,
    handles: Mutex<Vec<JoinHandle<()>>>,
}

impl Tasks {
    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        lock(&self.handles).push(tokio::spawn(task));
    }

    async fn stop(&self) {
        self.shutdown.cancel();
        let handles: Vec<_> = lock(&self.handles).drain(..).collect();
        for handle in handles {
            if tokio::time::timeout(DEADLINE, handle).await.is_err() {
                eprintln!("bench: a daemon task did not stop in time");
            }
        }
    }
}

/// The Docker `start` event of one container, as the engine stamped it.
#[derive(Clone, Debug)]
struct Started {
    worker: Option<WorkerId>,
    revision: Option<i32>,
    /// Engine time, ns since the Unix epoch.
    at_ns: i128,
    /// When this benchmark received it.
    seen: Instant,
}

impl Started {
    fn of(event: EventMessage) -> Started {
        let attributes = event.actor.and_then(|a| a.attributes).unwrap_or_default();
        Started {
            worker: attributes
                .get(labels::WORKER_ID)
                .and_then(|v| v.parse().ok()),
            revision: attributes
                .get(labels::REVISION)
                .and_then(|v| v.parse().ok()),
            at_ns: event.time_nano.map_or_else(now_ns, i128::from),
            seen: Instant::now(),
        }
    }
}

fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

/// Follows the `start` events of `instance`'s containers. `since` replays
/// whatever happened between this call and the stream being established.
fn watch_starts(docker: Docker, instance: &str, tasks: &Tasks) -> mpsc::UnboundedReceiver<Started> {
    let (tx, rx) = mpsc::unbounded_channel();
    let filters = HashMap::from([
        ("type", vec!["container".to_string()]),
        ("event", vec!["start".to_string()]),
        ("label", vec![format!("{}={instance}", labels::INSTANCE)]),
    ]);
    let now = now_ns();
    let since = format!("{}.{:09}", now / 1_000_000_000, now % 1_000_000_000);
    let options = EventsOptionsBuilder::default()
        .filters(&filters)
        .since(&since)
        .build();
    let shutdown = tasks.shutdown.clone();
    tasks.spawn(async move {
        let mut stream = docker.events(Some(options));
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => return,
                next = stream.next() => next,
            };
            match next {
                Some(Ok(event)) => {
                    // The receiver outlives every measurement; a send after it is gone is moot.
                    let _ = tx.send(Started::of(event));
                }
                Some(Err(e)) => {
                    eprintln!("bench: the Docker event stream failed: {e}");
                    return;
                }
                None => {
                    eprintln!("bench: the Docker event stream ended");
                    return;
                }
            }
        }
    });
    rx
}

/// The daemon under test, and the benchmark's own handles beside it.
struct Daemon {
    config: Config,
    db_url: String,
    /// The benchmark's connection: never one of the daemon's.
    pool: PgPool,
    /// The benchmark's view of the containers, so the daemon's counts stay its own.
    observer: DockerRuntime,
    trace: Arc<Trace>,
    starts: tokio::sync::Mutex<mpsc::UnboundedReceiver<Started>>,
    code: Vec<u8>,
}

impl Daemon {
    async fn start(db_url: String, instance: String, tasks: &Tasks) -> Daemon {
        let mut config = Config {
            instance,
            database_url: Secret::new(db_url.clone()),
            ..Config::default()
        };
        config.docker.image = IMAGE.into();
        // The daemon's HTTP server (code and ready reports) on a free port;
        // the config says where, so that every reconciler builds the same specs.
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("bind a free port");
        let addr = listener.local_addr().expect("address");
        config.code_server.public_url = format!("http://{addr}");
        let store = Arc::new(PgStore::connect(&db_url).expect("database URL parses"));
        store.migrate().await.expect("migrations apply");
        let docker = Docker::connect_with_local_defaults().expect("Docker client");
        let starts = watch_starts(docker, &config.instance, tasks);
        let trace = Arc::new(Trace::default());
        spawn_daemon(&config, store, listener, trace.clone(), tasks).await;
        progress(format_args!(
            "daemon running as instance {}",
            config.instance
        ));
        Daemon {
            observer: DockerRuntime::connect(&config.instance)
                .await
                .expect("Docker answers"),
            pool: PgPoolOptions::new()
                .max_connections(2)
                .connect(&db_url)
                .await
                .expect("bench database answers"),
            config,
            db_url,
            trace,
            starts: tokio::sync::Mutex::new(starts),
            code: sensorbucket_archive(DEFAULT_USERCODE).expect("archive builds"),
        }
    }

    fn instance(&self) -> &str {
        &self.config.instance
    }

    /// Inserts `n` workers in one statement; returns their ids.
    async fn insert(&self, n: usize, state: &str) -> Vec<WorkerId> {
        let ids: Vec<Uuid> = (0..n).map(|_| Uuid::now_v7()).collect();
        sqlx::query(
            "INSERT INTO user_workers (id, name, description, state, language, tenant_id, revision, status, status_info, source, entrypoint)
             SELECT id, 'bench-' || ord, '', $2, 'python', 1, 1, 'unknown', '', $3, 'main.main'
               FROM unnest($1::uuid[]) WITH ORDINALITY AS u(id, ord)",
        )
        .bind(&ids)
        .bind(state)
        .bind(&self.code)
        .execute(&self.pool)
        .await
        .expect("insert workers");
        ids.into_iter().map(WorkerId).collect()
    }

    /// Runs `sql` (with `$1` = the ids) in a transaction; returns the moment
    /// just before the COMMIT was sent, as an instant and as Unix ns.
    async fn commit(&self, sql: &str, ids: &[WorkerId]) -> (Instant, i128) {
        let ids: Vec<Uuid> = ids.iter().map(|id| id.0).collect();
        let mut tx = self.pool.begin().await.expect("begin");
        sqlx::query(sql)
            .bind(&ids)
            .execute(&mut *tx)
            .await
            .expect("statement runs");
        let t0 = (Instant::now(), now_ns());
        tx.commit().await.expect("commit");
        t0
    }

    async fn drain_starts(&self) {
        let mut rx = self.starts.lock().await;
        while rx.try_recv().is_ok() {}
    }

    /// The start events of every worker in `ids` at `revision`, in arrival order.
    async fn starts_of(&self, ids: &[WorkerId], revision: i32) -> Vec<Started> {
        let mut waiting: HashSet<WorkerId> = ids.iter().copied().collect();
        let mut seen = Vec::new();
        let mut rx = self.starts.lock().await;
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while !waiting.is_empty() {
            let event = tokio::time::timeout_at(deadline, rx.recv())
                .await
                .expect("start events within the deadline")
                .expect("the event stream is open");
            let ours = event.worker.is_some_and(|w| waiting.contains(&w));
            if ours && event.revision == Some(revision) {
                waiting.remove(&event.worker.expect("checked"));
                seen.push(event);
            }
        }
        seen
    }

    /// Polls until `check` holds on the listed containers.
    async fn until(&self, what: &str, check: impl Fn(&[ManagedContainer]) -> bool) {
        let start = Instant::now();
        loop {
            let containers = self.observer.list().await.expect("list containers");
            if check(&containers) {
                return;
            }
            assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Until each of `ids` has exactly one container, running at `revision`,
    /// and the instance has no other container.
    async fn converged(&self, ids: &[WorkerId], revision: i32) {
        let wanted: HashSet<WorkerId> = ids.iter().copied().collect();
        self.until("the workers to converge", |cs| {
            cs.len() == wanted.len()
                && cs.iter().all(|c| {
                    c.state == RunState::Running
                        && c.revision == Some(Revision(revision))
                        && c.worker_id.is_some_and(|w| wanted.contains(&w))
                })
                && cs
                    .iter()
                    .filter_map(|c| c.worker_id)
                    .collect::<HashSet<_>>()
                    == wanted
        })
        .await;
    }

    /// Deletes every worker and waits for the daemon to remove their containers.
    async fn delete_all(&self) {
        sqlx::query("DELETE FROM user_workers")
            .execute(&self.pool)
            .await
            .expect("delete workers");
        self.until("the containers to go", |cs| cs.is_empty()).await;
        self.settle().await;
    }

    /// Until the control loop has been idle for [`QUIET`].
    async fn settle(&self) {
        let start = Instant::now();
        while !self.trace.quiet() {
            assert!(start.elapsed() < DEADLINE, "the daemon never went idle");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The daemon, assembled as `workerctl run` assembles it ([`daemon::Daemon`]),
/// with the store and runtime of the control loop recorded in `trace`.
async fn spawn_daemon(
    config: &Config,
    store: Arc<PgStore>,
    listener: tokio::net::TcpListener,
    trace: Arc<Trace>,
    tasks: &Tasks,
) {
    let docker = Arc::new(
        DockerRuntime::connect(&config.instance)
            .await
            .expect("Docker answers"),
    );
    let config = config.clone();
    let t = trace.clone();
    let daemon = daemon::Daemon::new(config, store.clone(), docker.clone())
        .looping_through(
            Arc::new(Timed::new(store, trace.clone())),
            Arc::new(Timed::new(docker, trace)),
        )
        .on_change(move || t.notify());
    let tracker = TaskTracker::new();
    daemon
        .spawn(listener, &tracker, &tasks.shutdown)
        .expect("the daemon starts");
    tracker.close();
    tasks.spawn(async move { tracker.wait().await });
}

// ---------------------------------------------------------------------------
// The docker CLI reference.

fn reference_instance(instance: &str) -> String {
    format!("{instance}-cli")
}

/// The container spec of worker `id` at `revision`, as the daemon would make
/// it, but named and labelled for the reference instance.
fn reference_spec(d: &Daemon, id: WorkerId, revision: i32) -> ContainerSpec {
    let mut template = PassSettings::from_config(&d.config).template;
    template.instance = reference_instance(d.instance());
    let worker = DesiredWorker {
        id,
        name: "bench".into(),
        revision: Revision(revision),
        entrypoint: "main.main".into(),
        code_sha256: hex::encode(Sha256::digest(&d.code)),
        // Same length as a real token, so both sides carry the same env.
        code_token: "0".repeat(32),
        debug: false,
    };
    template.spec(&worker, IMAGE, 0)
}

/// `docker run -d` arguments with the flags the daemon gives every worker
/// (runtime/docker.rs, `create_body`): limits, hardening, logging, labels, env.
fn run_args(spec: &ContainerSpec, instance: &str) -> Vec<String> {
    let l = &spec.limits;
    let mut args: Vec<String> = [
        "run",
        "-d",
        "--name",
        &spec.name,
        "--network",
        &spec.network,
        "--restart",
        "no",
        "--memory",
        &l.memory_bytes.to_string(),
        "--memory-swap",
        &l.memory_bytes.to_string(),
        "--cpus",
        &(l.nano_cpus as f64 / 1e9).to_string(),
        "--pids-limit",
        &l.pids.to_string(),
        "--security-opt",
        "no-new-privileges:true",
        "--cap-drop",
        "ALL",
        "--read-only",
        "--tmpfs",
        "/tmp:rw,exec,nosuid,nodev,size=64m",
        "--tmpfs",
        "/usercode:rw,exec,nosuid,nodev,size=64m",
        "--log-driver",
        "json-file",
        "--log-opt",
        "max-size=10m",
        "--log-opt",
        "max-file=3",
    ]
    .map(String::from)
    .into();
    for (k, v) in spec.labels(instance) {
        args.extend(["--label".into(), format!("{k}={v}")]);
    }
    for (k, v) in &spec.env {
        args.extend(["--env".into(), format!("{k}={v}")]);
    }
    if let Some(url) = &spec.ready_url {
        args.extend(["--env".into(), format!("WORKER_READY_URL={url}")]);
    }
    args.extend(["--env".into(), format!("WORKER_REPLICA={}", spec.replica)]);
    args.push(spec.image.clone());
    args
}

async fn docker(args: &[String]) -> Duration {
    let start = Instant::now();
    let out = Command::new("docker")
        .args(args)
        .output()
        .await
        .expect("the docker CLI runs");
    let took = start.elapsed();
    assert!(
        out.status.success(),
        "docker {} failed: {}",
        args.first().map_or("", String::as_str),
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

/// Removes every container labelled for `instance` (not timed).
async fn remove_containers(instance: &str) {
    let filter = format!("label={}={instance}", labels::INSTANCE);
    let Ok(out) = Command::new("docker")
        .args(["ps", "-aq", "--filter", &filter])
        .output()
        .await
    else {
        return eprintln!("bench: cannot list the containers of {instance}");
    };
    xargs(&["-n16", CLI_PARALLEL, "docker", "rm", "-f"], &out.stdout).await;
}

/// Runs `xargs <args>` on `input`; returns its wall time.
async fn xargs(args: &[&str], input: &[u8]) -> Duration {
    let start = Instant::now();
    let mut child = Command::new("xargs")
        .arg("-r")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("xargs runs");
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin.write_all(input).await.expect("feed xargs");
    drop(stdin);
    let status = child.wait().await.expect("xargs ends");
    let took = start.elapsed();
    assert!(status.success(), "xargs {args:?} failed: {status}");
    took
}

/// Which flags of the reference container differ from the daemon's container.
async fn parity(daemon_name: &str, reference_name: &str) -> Vec<String> {
    const KEYS: [&str; 11] = [
        "NetworkMode",
        "RestartPolicy",
        "Memory",
        "MemorySwap",
        "NanoCpus",
        "PidsLimit",
        "SecurityOpt",
        "CapDrop",
        "ReadonlyRootfs",
        "Tmpfs",
        "LogConfig",
    ];
    let a = inspect(daemon_name).await;
    let b = inspect(reference_name).await;
    let mut differ: Vec<String> = KEYS
        .iter()
        .filter(|k| a["HostConfig"][**k] != b["HostConfig"][**k])
        .map(|k| format!("HostConfig.{k}"))
        .collect();
    let env = |v: &serde_json::Value| {
        let mut e: Vec<String> =
            serde_json::from_value(v["Config"]["Env"].clone()).unwrap_or_default();
        e.sort();
        e
    };
    if env(&a) != env(&b) {
        differ.push("Config.Env".into());
    }
    if a["Image"] != b["Image"] {
        differ.push("Image".into());
    }
    differ
}

async fn inspect(container: &str) -> serde_json::Value {
    let out = Command::new("docker")
        .args(["inspect", container])
        .output()
        .await
        .expect("docker inspect");
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    all[0].clone()
}

// ---------------------------------------------------------------------------
// (1) Revision bump → new container running.

/// One revision bump: milestones in ms after the COMMIT was sent.
struct Bump {
    notified: Option<f64>,
    pass_started: Option<f64>,
    observed: Option<f64>,
    renamed: Option<f64>,
    created: Option<f64>,
    /// The engine's `start` event: the figure.
    running: f64,
    /// When the benchmark received that event.
    seen: f64,
    old_stop: Option<f64>,
    old_remove: Option<f64>,
    /// The end of the old container's remove call: the replace is complete.
    retired: Option<f64>,
}

/// The same replace by hand, by the daemon's rule: the old container is
/// renamed out of the way, the new one run, then the old one stopped
/// (SIGTERM, the same grace period) and removed. In ms, each including the
/// CLI's own start-up.
struct CliBump {
    rename: f64,
    run: f64,
    stop: f64,
    rm: f64,
}

impl CliBump {
    /// Until the new container runs.
    fn running(&self) -> f64 {
        self.rename + self.run
    }

    /// Until the old container is gone.
    fn retired(&self) -> f64 {
        self.rename + self.run + self.stop + self.rm
    }
}

fn ms_since(t0: Instant, t: Instant) -> f64 {
    ms(t.saturating_duration_since(t0))
}

async fn revision_bumps(d: &Daemon, n: usize) -> (Vec<Bump>, Vec<CliBump>, Vec<String>) {
    let id = d.insert(1, "enabled").await[0];
    d.starts_of(&[id], 1).await;
    d.converged(&[id], 1).await;
    d.settle().await;
    let first = reference_spec(d, id, 1);
    docker(&run_args(&first, &reference_instance(d.instance()))).await;
    let daemon_name = workerctl::model::container_name(d.instance(), id);
    let differ = parity(&daemon_name, &first.name).await;
    let (mut bumps, mut cli) = (Vec::new(), Vec::new());
    for i in 0..WARMUP + n {
        let revision = 2 + i as i32;
        let bump = bump_once(d, id, revision).await;
        let by_hand = cli_replace(d, id, revision).await;
        if i >= WARMUP {
            progress(format_args!(
                "(1) bump {}/{n}: workerctl {:.0} ms, CLI {:.0} ms",
                i + 1 - WARMUP,
                bump.running,
                by_hand.running()
            ));
            bumps.push(bump);
            cli.push(by_hand);
        }
    }
    remove_containers(&reference_instance(d.instance())).await;
    d.delete_all().await;
    (bumps, cli, differ)
}

async fn bump_once(d: &Daemon, id: WorkerId, revision: i32) -> Bump {
    d.drain_starts().await;
    let sql = "UPDATE user_workers SET revision = revision + 1 WHERE id = ANY($1)";
    let (t0, t0_ns) = d.commit(sql, &[id]).await;
    let started = d.starts_of(&[id], revision).await.remove(0);
    d.converged(&[id], revision).await;
    d.settle().await;
    let calls = d.trace.calls_since(t0);
    let first = |op: Op, after: Instant| calls.iter().find(|c| c.op == op && c.start >= after);
    let at = |c: Option<&Call>| c.map(|c| ms_since(t0, c.end));
    let pass = first(Op::LoadWorkers, t0);
    let stop = first(Op::Stop, t0);
    Bump {
        notified: d.trace.first_notify_since(t0).map(|t| ms_since(t0, t)),
        pass_started: pass.map(|c| ms_since(t0, c.start)),
        observed: at(pass.and_then(|p| first(Op::Image, p.start))),
        renamed: at(first(Op::Rename, t0)),
        created: at(first(Op::Create, t0)),
        running: (started.at_ns - t0_ns) as f64 / 1e6,
        seen: ms_since(t0, started.seen),
        old_stop: stop.map(|c| ms(c.end - c.start)),
        old_remove: at(first(Op::Remove, t0))
            .zip(stop)
            .map(|(r, s)| r - ms_since(t0, s.end)),
        retired: at(first(Op::Remove, t0)),
    }
}

async fn cli_replace(d: &Daemon, id: WorkerId, revision: i32) -> CliBump {
    let spec = reference_spec(d, id, revision);
    let old = format!("{}-old-{revision}", spec.name);
    let grace = d.config.docker.stop_timeout.as_secs().to_string();
    let rename = docker(&["rename".into(), spec.name.clone(), old.clone()]).await;
    let run = docker(&run_args(&spec, &reference_instance(d.instance()))).await;
    let stop = docker(&["stop".into(), "-t".into(), grace, old.clone()]).await;
    let rm = docker(&["rm".into(), old]).await;
    CliBump {
        rename: ms(rename),
        run: ms(run),
        stop: ms(stop),
        rm: ms(rm),
    }
}

// ---------------------------------------------------------------------------
// (2) Many workers enabled in one transaction → all running.

struct Fleet {
    notified: Option<f64>,
    pass_started: Option<f64>,
    observed: Option<f64>,
    first_create: Option<f64>,
    /// The last `start` event: the figure.
    all_running: f64,
    creates: Vec<f64>,
    starts: Vec<f64>,
}

async fn enable_fleet(d: &Daemon, n: usize) -> Fleet {
    let ids = d.insert(n, "disabled").await;
    d.settle().await;
    d.drain_starts().await;
    let sql = "UPDATE user_workers SET state = 'enabled' WHERE id = ANY($1)";
    let (t0, t0_ns) = d.commit(sql, &ids).await;
    let started = d.starts_of(&ids, 1).await;
    let last = started.iter().map(|s| s.at_ns).max().unwrap_or(t0_ns);
    d.converged(&ids, 1).await;
    d.settle().await;
    let calls = d.trace.calls_since(t0);
    let durations = |op: Op| -> Vec<f64> {
        calls
            .iter()
            .filter(|c| c.op == op)
            .map(|c| ms(c.end - c.start))
            .collect()
    };
    let pass = calls.iter().find(|c| c.op == Op::LoadWorkers);
    let after_pass =
        |op: Op| pass.and_then(|p| calls.iter().find(|c| c.op == op && c.start >= p.start));
    let fleet = Fleet {
        notified: d.trace.first_notify_since(t0).map(|t| ms_since(t0, t)),
        pass_started: pass.map(|c| ms_since(t0, c.start)),
        observed: after_pass(Op::Image).map(|c| ms_since(t0, c.end)),
        first_create: after_pass(Op::Create).map(|c| ms_since(t0, c.start)),
        all_running: (last - t0_ns) as f64 / 1e6,
        creates: durations(Op::Create),
        starts: durations(Op::Start),
    };
    progress(format_args!(
        "    workerctl: {:.2} s",
        fleet.all_running / 1e3
    ));
    d.delete_all().await;
    fleet
}

/// `xargs -P8 docker run -d …` of `n` containers like the daemon's; ms.
async fn cli_fleet_run(d: &Daemon, n: usize) -> f64 {
    // A spec for a placeholder id, whose every mention becomes xargs' `{}`.
    let placeholder = WorkerId(Uuid::nil());
    let spec = reference_spec(d, placeholder, 1);
    let template: Vec<String> = run_args(&spec, &reference_instance(d.instance()))
        .into_iter()
        .map(|a| a.replace(&placeholder.to_string(), "{}"))
        .collect();
    let mut args = vec![CLI_PARALLEL, "-I{}", "docker"];
    args.extend(template.iter().map(String::as_str));
    let input: String = (0..n).map(|_| format!("{}\n", Uuid::now_v7())).collect();
    let took = ms(xargs(&args, input.as_bytes()).await);
    progress(format_args!("    docker CLI: {:.2} s", took / 1e3));
    remove_containers(&reference_instance(d.instance())).await;
    took
}

// ---------------------------------------------------------------------------
// (3) Cost of an idle pass.

struct Idle {
    workers: usize,
    docker_calls: u64,
    statements: u64,
    /// The leader lock confirmed before the pass (its own connection).
    leader_round_trips: u64,
    actions: usize,
    ms: f64,
    ops: Vec<Op>,
    /// Statements of the fresh reconciler's first pass (before the measured one).
    first_statements: u64,
}

async fn idle_passes(d: &Daemon, sizes: &[usize]) -> Vec<Idle> {
    let mut sizes = sizes.to_vec();
    sizes.sort_unstable();
    sizes.dedup();
    let mut ids = Vec::new();
    let mut out = Vec::new();
    for size in sizes {
        progress(format_args!("(3) converging {size} workers"));
        ids.extend(d.insert(size.saturating_sub(ids.len()), "enabled").await);
        d.converged(&ids, 1).await;
        d.settle().await;
        out.push(idle_pass(d, size).await);
    }
    out
}

/// One pass of a fresh reconciler (fresh counters) over converged workers,
/// after a first pass that fills its memory of what it last recorded, as the
/// daemon's own reconciler has long done by now. Led as the daemon's is: it
/// confirms a leader lock of its own before the pass (a lock key of its own,
/// so as not to contend with the daemon's), whose heartbeat is an hour, so
/// that only the pass's own confirmation falls in the measurement.
async fn idle_pass(d: &Daemon, workers: usize) -> Idle {
    let timing = LeaderTiming {
        heartbeat: Duration::from_secs(3600),
        lease: Duration::from_secs(7200),
    };
    let lock = format!("{}-idle-{workers}", d.instance());
    let leadership = Leadership::new(&d.db_url, &lock, timing);
    let campaign = CancellationToken::new();
    let task = tokio::spawn({
        let (l, c) = (leadership.clone(), campaign.clone());
        async move { l.run(c).await }
    });
    tokio::time::timeout(DEADLINE, leadership.until_leader())
        .await
        .expect("the idle pass's own lock is taken");
    let store = Arc::new(PgStore::connect(&d.db_url).expect("database URL parses"));
    let docker = Arc::new(
        DockerRuntime::connect(d.instance())
            .await
            .expect("Docker answers"),
    );
    let trace = Arc::new(Trace::default());
    let metrics = Arc::new(Metrics::new());
    let containers = Containers::new(
        Arc::new(Timed::new(docker.clone(), trace.clone())),
        Arc::new(ReadyReports::new(Arc::default())),
        metrics.clone(),
    );
    let mut reconciler = Reconciler::new(
        Arc::new(Timed::new(store.clone(), trace.clone())),
        containers,
        PassSettings::from_config(&d.config),
        metrics,
    )
    .led_by(leadership.clone());
    let first = reconciler.pass().await.expect("first pass");
    assert_eq!(
        first.started, 0,
        "a fresh reconciler over converged workers does nothing"
    );
    let first_statements = store.statements();
    let (calls, statements) = (docker.api_calls(), store.statements());
    let confirmations = leadership.confirmations();
    let start = Instant::now();
    let report = reconciler.pass().await.expect("idle pass");
    let took = start.elapsed();
    let leader_round_trips = leadership.confirmations() - confirmations;
    campaign.cancel();
    let _ = task.await;
    Idle {
        workers,
        docker_calls: docker.api_calls() - calls,
        statements: store.statements() - statements,
        leader_round_trips,
        actions: report.started,
        ms: ms(took),
        ops: trace.calls_since(start).iter().map(|c| c.op).collect(),
        first_statements,
    }
}

// ---------------------------------------------------------------------------
// The report.

struct Results {
    /// The grace period of a stop, both sides.
    grace_s: u64,
    bumps: Vec<Bump>,
    cli_bumps: Vec<CliBump>,
    parity: Vec<String>,
    fleet_size: usize,
    fleet: Vec<Fleet>,
    cli_fleet: Vec<f64>,
    idle: Vec<Idle>,
}

/// The median gap between consecutive milestones, over the samples that have both.
fn gap<T>(samples: &[T], from: impl Fn(&T) -> Option<f64>, to: impl Fn(&T) -> Option<f64>) -> f64 {
    median(samples.iter().filter_map(|s| Some(to(s)? - from(s)?)))
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

impl Results {
    fn print(&self, load_before: &str, load_after: &str) {
        self.print_bump_breakdown();
        self.print_fleet_breakdown();
        self.print_idle_breakdown();
        self.print_summary(load_before, load_after);
    }

    fn print_bump_breakdown(&self) {
        let b = &self.bumps;
        let zero = |_: &Bump| Some(0.0);
        println!("\n(1) where the time goes: revision bump → new container running");
        println!(
            "    medians of {} bumps, from the moment the COMMIT is sent:",
            b.len()
        );
        let rows: [(&str, f64); 6] = [
            (
                "commit → NOTIFY delivered to the listener",
                gap(b, zero, |s| s.notified),
            ),
            (
                "NOTIFY → pass starts (SELECT sent)",
                gap(b, |s| s.notified, |s| s.pass_started),
            ),
            (
                "observe: SELECT rows, list containers, inspect image",
                gap(b, |s| s.pass_started, |s| s.observed),
            ),
            (
                "plan, rename the old container out of the way",
                gap(b, |s| s.observed, |s| s.renamed),
            ),
            (
                "create the new container",
                gap(b, |s| s.renamed, |s| s.created),
            ),
            (
                "start it (until the engine's start event)",
                gap(b, |s| s.created, |s| Some(s.running)),
            ),
        ];
        for (what, value) in rows {
            println!("      {what:<54} {value:>7.1} ms");
        }
        println!(
            "      {:<54} {:>7.1} ms",
            "= new container running",
            median(b.iter().map(|s| s.running))
        );
        println!(
            "      the benchmark receives the start event {:.1} ms after the engine stamps it",
            gap(b, |s| Some(s.running), |s| Some(s.seen))
        );
        println!(
            "    after it runs, off the measured path: old container SIGTERM → exited {:.0} ms, removed {:.0} ms later",
            median(b.iter().filter_map(|s| s.old_stop)),
            median(b.iter().filter_map(|s| s.old_remove))
        );
        println!(
            "    old container removed (replace complete) {:.0} ms after the COMMIT",
            median(b.iter().filter_map(|s| s.retired))
        );
        let c = &self.cli_bumps;
        println!(
            "    docker CLI, medians: rename {:.0} ms + run -d {:.0} ms; then stop {:.0} ms + rm {:.0} ms (each includes the CLI's own start-up)",
            median(c.iter().map(|s| s.rename)),
            median(c.iter().map(|s| s.run)),
            median(c.iter().map(|s| s.stop)),
            median(c.iter().map(|s| s.rm))
        );
        if !self.parity.is_empty() {
            println!(
                "    WARNING: the CLI reference differs from the daemon's container in {:?}",
                self.parity
            );
        }
    }

    fn print_fleet_breakdown(&self) {
        let f = &self.fleet;
        let zero = |_: &Fleet| Some(0.0);
        println!(
            "\n(2) where the time goes: {} workers enabled in one transaction → all running",
            self.fleet_size
        );
        println!(
            "    medians of {} rounds, from the moment the COMMIT is sent:",
            f.len()
        );
        let rows: [(&str, f64); 5] = [
            (
                "commit → NOTIFY delivered to the listener",
                gap(f, zero, |s| s.notified),
            ),
            (
                "NOTIFY → pass starts",
                gap(f, |s| s.notified, |s| s.pass_started),
            ),
            (
                "observe: SELECT rows, list containers, inspect image",
                gap(f, |s| s.pass_started, |s| s.observed),
            ),
            (
                "plan → first create sent",
                gap(f, |s| s.observed, |s| s.first_create),
            ),
            (
                "creates and starts, 8 at a time, until the last start",
                gap(f, |s| s.first_create, |s| Some(s.all_running)),
            ),
        ];
        for (what, value) in rows {
            println!("      {what:<54} {value:>7.0} ms");
        }
        let calls = |pick: fn(&Fleet) -> &Vec<f64>| {
            f.iter()
                .flat_map(|s| pick(s).iter().copied())
                .collect::<Vec<_>>()
        };
        let (creates, starts) = (calls(|s| &s.creates), calls(|s| &s.starts));
        println!(
            "    per container (8 in flight): create call median {:.0} ms (p90 {:.0}), start call median {:.0} ms (p90 {:.0})",
            median(creates.iter().copied()),
            percentile(creates.iter().copied(), 0.9),
            median(starts.iter().copied()),
            percentile(starts.iter().copied(), 0.9)
        );
        println!(
            "    rounds: workerctl {:?} s, docker CLI {:?} s",
            f.iter()
                .map(|s| round2(s.all_running / 1e3))
                .collect::<Vec<_>>(),
            self.cli_fleet
                .iter()
                .map(|t| round2(t / 1e3))
                .collect::<Vec<_>>()
        );
    }

    fn print_idle_breakdown(&self) {
        println!(
            "\n(3) an idle pass over converged workers (fresh counters, after one warm-up pass)"
        );
        for i in &self.idle {
            println!(
                "    {:>4} workers: {} Docker calls, {} SQL statements + {} leader lock confirmation, {} actions, {:.1} ms; calls {:?} (warm-up pass: {} statements)",
                i.workers,
                i.docker_calls,
                i.statements,
                i.leader_round_trips,
                i.actions,
                i.ms,
                i.ops,
                i.first_statements
            );
        }
    }

    fn print_summary(&self, load_before: &str, load_after: &str) {
        let b = &self.bumps;
        let running = || b.iter().map(|s| s.running);
        let retired = || b.iter().filter_map(|s| s.retired);
        let cli = median(self.cli_bumps.iter().map(CliBump::running));
        let cli_retired = median(self.cli_bumps.iter().map(CliBump::retired));
        let ours = median(running());
        let fleet = median(self.fleet.iter().map(|s| s.all_running));
        let cli_fleet = median(self.cli_fleet.iter().copied());
        let counts = |pick: fn(&Idle) -> u64| self.idle.iter().map(pick).collect::<Vec<_>>();
        let constant = |v: &[u64]| v.windows(2).all(|w| w[0] == w[1]);
        let (calls, stmts) = (counts(|i| i.docker_calls), counts(|i| i.statements));
        let round_trips = counts(|i| i.statements + i.leader_round_trips);
        let joined = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(" / ");
        let sizes = self
            .idle
            .iter()
            .map(|i| i.workers.to_string())
            .collect::<Vec<_>>()
            .join("/");
        let spread = |v: &[f64]| {
            let v = sorted(v.iter().copied());
            match (v.first(), v.last()) {
                (Some(lo), Some(hi)) => format!("{:.2}–{:.2} s", lo / 1e3, hi / 1e3),
                _ => "-".into(),
            }
        };
        let fleet_runs: Vec<f64> = self.fleet.iter().map(|s| s.all_running).collect();
        println!(
            "\nload average (1/5/15 min): {load_before} at start, {load_after} at the end; {} CPUs",
            cpus()
        );
        println!(
            "\n{:<50} {:<30} {:<48} target (issue)",
            "", "workerctl", "reference (docker CLI)"
        );
        println!(
            "{:<50} {:<30} {:<48} within 100 ms of the CLI: {}",
            format!("revision bump → new running (median of {})", b.len()),
            format!(
                "{ours:.0} ms (p90 {:.0}, min {:.0})",
                percentile(running(), 0.9),
                percentile(running(), 0.0)
            ),
            format!(
                "{cli:.0} ms (p90 {:.0}, rename + run -d)",
                percentile(self.cli_bumps.iter().map(CliBump::running), 0.9)
            ),
            judged(b.len(), ours <= cli + 100.0)
        );
        println!(
            "{:<50} {:<30} {:<48} -",
            format!("revision bump → old removed (median of {})", b.len()),
            format!(
                "{:.0} ms (p90 {:.0})",
                median(retired()),
                percentile(retired(), 0.9)
            ),
            format!("{cli_retired:.0} ms (+ stop + rm)"),
        );
        println!(
            "{:<50} {:<30} {:<48} no slower than the CLI: {}",
            format!(
                "{} workers enabled → all running (median of {})",
                self.fleet_size,
                self.fleet.len()
            ),
            format!("{:.2} s ({})", fleet / 1e3, spread(&fleet_runs)),
            format!(
                "{:.2} s ({}, xargs -P8 docker run -d)",
                cli_fleet / 1e3,
                spread(&self.cli_fleet)
            ),
            judged(self.fleet.len(), fleet <= cli_fleet)
        );
        println!(
            "{:<50} {:<30} {:<48} constant: {}",
            format!("idle pass, Docker API calls ({sizes})"),
            joined(&calls),
            "-",
            met(constant(&calls))
        );
        println!(
            "{:<50} {:<30} {:<48} constant: {}",
            format!("idle pass, SQL statements ({sizes})"),
            joined(&stmts),
            "-",
            met(constant(&stmts))
        );
        println!(
            "{:<50} {:<30} {:<48} constant: {}",
            format!("idle pass, Postgres round trips ({sizes})"),
            joined(&round_trips),
            "-",
            met(constant(&round_trips))
        );
        println!("\nequal work:");
        println!(
            "  bump → new running: both rename the old container and create + start the new one (workerctl: API calls, after its wake-up and one pass; CLI: `docker rename` + `docker run -d`); neither has retired the old one yet"
        );
        println!(
            "  bump → old removed: both then stop the old one (SIGTERM, {} s grace) and remove it; workerctl also waits for the new one's ready report first, the CLI does not",
            self.grace_s
        );
        println!(
            "  workers enabled: both create + start every container, 8 at a time; neither waits for readiness"
        );
        println!(
            "  idle pass: every round trip of a led pass (statements + the leader lock's confirmation); outside passes the lock costs one more per leader.heartbeat"
        );
    }
}

/// "met" or "MISSED", only on a median of at least [`MIN_JUDGED`] runs.
fn judged(runs: usize, ok: bool) -> String {
    if runs < MIN_JUDGED {
        format!("not judged ({runs} < {MIN_JUDGED} runs)")
    } else {
        met(ok).to_string()
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(0, usize::from)
}
