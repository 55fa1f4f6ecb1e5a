//! The Swarm backend benchmark: time from a revision bump to every replica
//! of a worker's service running (and healthy) at the new revision, three
//! ways, interleaved bump by bump on one single-node swarm:
//!
//! 1. **The daemon**, the product path: `workerctl::daemon::Daemon` on the
//!    Swarm backend, in-process as tests/pipeline.rs starts it, on a
//!    throwaway database `bench_swarm_<random>`, with one worker whose scale
//!    is min = max = N (`workerctl_worker_scale`). The bump is a dashboard
//!    save, `UPDATE user_workers SET source = <new archive>, revision =
//!    revision + 1`, timed from the moment that UPDATE returned (committed):
//!    the NOTIFY wakes the loop, a pass plans the update, an action calls
//!    `SwarmRuntime::update`, Swarm rolls it out.
//! 2. **`SwarmRuntime::update`** called directly on a service of its own
//!    (what one action of the daemon does: list, then update).
//! 3. **`docker service update --detach`** by the CLI, of that same service.
//!
//! The two services have the same image, replica count, limits and update
//! config (one task at a time, start-first, gated by the image's own
//! HEALTHCHECK, `swarm.update_monitor` = 1 s, stop grace 2 s), all from one
//! `Config`. All three are timed by the same poll of the service's running
//! task containers (every 100 ms): the headline is until N run healthy at
//! the new revision and no other is left (start-first stops each old task
//! only after its replacement is healthy); beside it, when the N new ones
//! were first all healthy. Also printed: how long after the bump Swarm
//! started the update and how long it took by its own clock (the service's
//! `UpdateStatus`), and the API calls counted by `SwarmRuntime::api_calls`
//! (the daemon's: of all its passes and actions from the UPDATE until Swarm
//! reports the update completed) with the daemon's passes.
//!
//! The swarm is made through tests/common/swarm.rs (`TestSwarm`): `docker
//! swarm init --advertise-addr 127.0.0.1`, left at the end; an engine
//! already in a swarm it did not make is refused; it takes turns with the
//! swarm tests (`/tmp/workerctl-swarm-tests.lock`). Figures are printed,
//! never asserted.
//!
//! Run: `cargo bench --bench swarm` (after scripts/build-images). Needs
//! Postgres (`DATABASE_URL`; the role must be allowed to create a database)
//! and Docker. The daemon's triggers (schedules, dead letters) and
//! autoscaling are off (min = max), so RabbitMQ is not used. Settings:
//! BENCH_SWARM_REPLICAS (4), BENCH_SWARM_BUMPS (3), RUST_LOG for the
//! daemon's log (default warnings). docs/benchmarks.md records the figures.

#[path = "../tests/common/swarm.rs"]
mod test_swarm;

mod common;

use common::{count, load_average, progress};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::models::ServiceUpdateStatusStateEnum;
use bollard::query_parameters::ListContainersOptionsBuilder;
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing_subscriber::EnvFilter;
use uuid::Uuid;
use workerctl::archive::sensorbucket_archive;
use workerctl::backoff::error_chain;
use workerctl::config::{Config, Secret};
use workerctl::daemon::Daemon;
use workerctl::metrics::Metrics;
use workerctl::model::{ContainerSpec, Revision, WorkerId, container_name, labels};
use workerctl::runtime::ServiceRuntime;
use workerctl::runtime::docker::DockerRuntime;
use workerctl::runtime::swarm::{ManagedService, SwarmRuntime, WorkerService};
use workerctl::store::postgres::PgStore;

use test_swarm::{TestSwarm, try_docker_cli as docker_cli};

const BUSYBOX: &str = "workerctl/busybox:latest";
/// Healthy one second after start; `wait` wakes on SIGTERM at once. No
/// `workerctl.runtime=dockerworker` label, so the daemon's readiness probe
/// is not applied and this HEALTHCHECK gates the rollout.
const IMAGE: &str = "workerctl-bench/swarm-worker:latest";
const SCRIPT: &str = "trap 'exit 0' TERM; touch /tmp/ready; sleep 86400 & wait";
const CONVERGE_MAX: Duration = Duration::from_secs(300);
const POLL: Duration = Duration::from_millis(100);
const UPDATE_MONITOR: Duration = Duration::from_secs(1);
const STOP_TIMEOUT: Duration = Duration::from_secs(2);
const DEFAULT_DATABASE_URL: &str = "postgres://workerctl:workerctl@127.0.0.1:5432/workerctl";
/// The worker of the bench's own service (rows 2 and 3).
const BENCH_WORKER: WorkerId = WorkerId(Uuid::from_u128(0xbe));

type Fallible<T> = Result<T, String>;

/// One error and its causes, on one line.
fn chain<E: std::error::Error>(e: E) -> String {
    error_chain(&e)
}

fn main() -> ExitCode {
    // `cargo bench` passes --bench; `cargo test --all-targets` must not run it.
    if !std::env::args().skip(1).any(|a| a == "--bench") {
        eprintln!("the Swarm benchmark runs with `cargo bench --bench swarm`");
        return ExitCode::SUCCESS;
    }
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("warn,sqlx::query=error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bench: cannot start tokio: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Sets up, measures, and always cleans up (database, services, swarm).
async fn run() -> Fallible<()> {
    let replicas = count("BENCH_SWARM_REPLICAS", 4);
    let bumps = count("BENCH_SWARM_BUMPS", 3);
    let load_before = load_average();
    let image_id = build_image()?;
    let db = Database::create().await?;
    let outcome = on_a_swarm(&db, &image_id, replicas, bumps).await;
    db.drop_it().await;
    let rows = outcome?;
    rows.print(replicas, bumps, &load_before, &load_average());
    Ok(())
}

fn build_image() -> Fallible<String> {
    docker_cli(&["image", "inspect", BUSYBOX])
        .map_err(|_| format!("{BUSYBOX} is missing: run scripts/build-images first"))?;
    let dir = tempfile::tempdir().map_err(chain)?;
    let cmd = serde_json::to_string(&["/bin/sh", "-c", SCRIPT]).map_err(chain)?;
    let dockerfile = format!(
        "FROM {BUSYBOX}\nHEALTHCHECK --interval=1s --timeout=1s --retries=2 CMD test -f /tmp/ready\nCMD {cmd}\n"
    );
    std::fs::write(dir.path().join("Dockerfile"), dockerfile).map_err(chain)?;
    let path = dir.path().to_str().ok_or("temp dir is not UTF-8")?;
    docker_cli(&["build", "-q", "-t", IMAGE, path])?;
    docker_cli(&["image", "inspect", "--format", "{{.Id}}", IMAGE])
}

/// The configuration of both instances: the defaults but for what makes
/// the rollouts comparable and short (image, limits, monitor, grace) and
/// what this benchmark does not exercise (triggers, autoscaling).
fn config(instance: &str, database_url: &str, public_url: String) -> Config {
    let mut config = Config {
        instance: instance.into(),
        database_url: Secret::new(database_url),
        ..Config::default()
    };
    config.docker.image = IMAGE.into();
    config.docker.network = "host".into();
    config.docker.stop_timeout = STOP_TIMEOUT;
    config.docker.memory_bytes = 32 << 20;
    config.docker.cpus = 0.1;
    config.docker.pids_limit = 16;
    config.swarm.update_monitor = UPDATE_MONITOR;
    config.code_server.public_url = public_url;
    config.scale.management_url = Secret::new("");
    config.schedules.enabled = false;
    config.dead_letters.enabled = false;
    config
}

/// Takes the turn, makes the swarm, measures, removes the services; the
/// swarm is left when `swarm` drops, whatever happened.
async fn on_a_swarm(
    db: &Database,
    image_id: &str,
    replicas: usize,
    bumps: usize,
) -> Fallible<Rows> {
    progress(format_args!(
        "waiting for the swarm turn ({})",
        test_swarm::LOCK_FILE
    ));
    let mut swarm = tokio::task::spawn_blocking(TestSwarm::try_take_turn)
        .await
        .map_err(chain)??;
    swarm.try_init()?;
    let docker = Docker::connect_with_local_defaults().map_err(chain)?;
    let tag = Uuid::new_v4().simple().to_string();
    let daemon = BenchDaemon::start(db, &format!("swarmd{}", &tag[..8])).await?;
    let instance = format!("swarmb{}", &tag[..8]);
    let outcome = match BenchService::create(&docker, &instance, image_id, replicas).await {
        Ok(mut service) => {
            let measured = measure(&docker, &daemon, &mut service, replicas, bumps).await;
            service.remove().await;
            measured
        }
        Err(e) => Err(e),
    };
    daemon.stop_and_remove().await;
    drop(swarm);
    outcome
}

/// Interleaves the three ways, one bump of each per round.
async fn measure(
    docker: &Docker,
    daemon: &BenchDaemon,
    service: &mut BenchService,
    replicas: usize,
    bumps: usize,
) -> Fallible<Rows> {
    daemon.insert_worker(replicas).await?;
    all_updated(docker, &daemon.service, 1, replicas, Instant::now()).await?;
    progress(format_args!(
        "the daemon's service runs {replicas} replicas"
    ));
    let mut rows = Rows::default();
    for round in 1..=bumps {
        let revision = i32::try_from(round + 1).map_err(chain)?;
        rows.daemon
            .push(daemon.save(docker, revision, replicas).await?);
        rows.runtime.push(service.through_runtime(docker).await?);
        rows.cli.push(service.through_cli(docker).await?);
        progress(format_args!("round {round} of {bumps} done"));
    }
    Ok(rows)
}

// ---------------------------------------------------------------------------
// The throwaway database.

struct Database {
    admin_url: String,
    name: String,
    url: String,
}

impl Database {
    async fn create() -> Fallible<Database> {
        let admin_url =
            std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.into());
        let name = format!("bench_swarm_{}", &Uuid::new_v4().simple().to_string()[..12]);
        let admin = admin_pool(&admin_url).await?;
        let created = sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&admin)
            .await;
        admin.close().await;
        created.map_err(|e| format!("CREATE DATABASE {name}: {}", chain(e)))?;
        let mut url = reqwest::Url::parse(&admin_url).map_err(chain)?;
        url.set_path(&name);
        let db = Database {
            admin_url,
            name,
            url: url.to_string(),
        };
        if let Err(e) = db.migrate().await {
            db.drop_it().await;
            return Err(e);
        }
        progress(format_args!("database {} ready", db.name));
        Ok(db)
    }

    async fn migrate(&self) -> Fallible<()> {
        let store = PgStore::connect(&self.url).map_err(chain)?;
        store.migrate().await.map_err(chain)?;
        store.pool().close().await;
        Ok(())
    }

    async fn drop_it(&self) {
        let sql = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name);
        let dropped = match admin_pool(&self.admin_url).await {
            Ok(admin) => sqlx::query(&sql).execute(&admin).await.map_err(chain),
            Err(e) => Err(e),
        };
        match dropped {
            Ok(_) => progress(format_args!("database {} dropped", self.name)),
            Err(e) => eprintln!("bench: cannot drop database {}: {e}", self.name),
        }
    }
}

async fn admin_pool(url: &str) -> Fallible<PgPool> {
    let pool = PgPoolOptions::new().max_connections(1).connect(url).await;
    pool.map_err(|e| format!("Postgres at DATABASE_URL: {}", chain(e)))
}

// ---------------------------------------------------------------------------
// Row 1: the daemon.

/// The daemon on the Swarm backend, with the one worker it runs.
struct BenchDaemon {
    /// The benchmark's own connection: the dashboard's writes.
    pool: PgPool,
    /// The daemon's manager client; its call count is the daemon's.
    swarm: Arc<SwarmRuntime>,
    metrics: Arc<Metrics>,
    worker: WorkerId,
    service: String,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl BenchDaemon {
    /// The daemon as `workerctl run` assembles it with `runtime.backend =
    /// "swarm"`, serving HTTP on a free port of 127.0.0.1.
    async fn start(db: &Database, instance: &str) -> Fallible<BenchDaemon> {
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .map_err(chain)?;
        let addr = listener.local_addr().map_err(chain)?;
        let config = config(instance, &db.url, format!("http://{addr}"));
        let store = Arc::new(PgStore::connect(&db.url).map_err(chain)?);
        let docker = Arc::new(DockerRuntime::connect(instance).await.map_err(chain)?);
        let swarm = SwarmRuntime::connect(instance, config.swarm_options()).await;
        let swarm = Arc::new(swarm.map_err(chain)?);
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect_lazy(&db.url);
        let pool = pool.map_err(chain)?;
        let (shutdown, tracker) = (CancellationToken::new(), TaskTracker::new());
        let running = Daemon::new(config, store, docker)
            .on_swarm(swarm.clone())
            .spawn(listener, &tracker, &shutdown)
            .map_err(chain)?;
        tracker.close();
        let worker = WorkerId(Uuid::now_v7());
        progress(format_args!("daemon {instance} on the swarm"));
        Ok(BenchDaemon {
            pool,
            swarm,
            metrics: running.metrics,
            worker,
            service: container_name(instance, worker),
            shutdown,
            tracker,
        })
    }

    /// The worker at revision 1 with min = max = `replicas`, in one
    /// transaction, so that the daemon's first pass creates all of them.
    async fn insert_worker(&self, replicas: usize) -> Fallible<()> {
        let n = i32::try_from(replicas).map_err(chain)?;
        let mut tx = self.pool.begin().await.map_err(chain)?;
        sqlx::query(
            "INSERT INTO user_workers (id, name, description, state, language, tenant_id, revision, status, status_info, source, entrypoint)
             VALUES ($1, 'bench-swarm', '', 'enabled', 'python', 1, 1, 'unknown', '', $2, 'main.main')",
        )
        .bind(self.worker.0)
        .bind(code(1)?)
        .execute(&mut *tx)
        .await
        .map_err(chain)?;
        sqlx::query(
            "INSERT INTO workerctl_worker_scale (worker_id, min_replicas, max_replicas) VALUES ($1, $2, $2)",
        )
        .bind(self.worker.0)
        .bind(n)
        .execute(&mut *tx)
        .await
        .map_err(chain)?;
        tx.commit().await.map_err(chain)
    }

    /// A dashboard save of new code, which is `revision`; timed from the
    /// UPDATE's return to all replicas updated.
    async fn save(&self, docker: &Docker, revision: i32, replicas: usize) -> Fallible<Sample> {
        let source = code(revision)?;
        let (calls, passes) = (self.swarm.api_calls(), self.metrics.passes.get());
        sqlx::query("UPDATE user_workers SET source = $1, revision = revision + 1 WHERE id = $2")
            .bind(source)
            .bind(self.worker.0)
            .execute(&self.pool)
            .await
            .map_err(chain)?;
        let bump = Bump::now();
        let mut sample = rolled_out(docker, &self.service, revision, replicas, &bump).await?;
        sample.calls = Some(self.swarm.api_calls() - calls);
        sample.passes = Some(self.metrics.passes.get() - passes);
        Ok(sample)
    }

    /// Stops the daemon (it waits for its actions), then removes its service.
    async fn stop_and_remove(self) {
        self.shutdown.cancel();
        self.tracker.wait().await;
        for s in self.swarm.list().await.unwrap_or_default() {
            if let Err(e) = self.swarm.remove(&s.id).await {
                eprintln!("bench: cannot remove service {}: {}", s.name, chain(e));
            }
        }
        self.pool.close().await;
    }
}

/// The code of `revision`, as the dashboard saves it.
fn code(revision: i32) -> Fallible<Vec<u8>> {
    let usercode = format!("def process(msg):\n    return msg  # revision {revision}\n");
    sensorbucket_archive(&usercode).map_err(chain)
}

// ---------------------------------------------------------------------------
// Rows 2 and 3: the benchmark's own service, through SwarmRuntime and the CLI.

/// A service of another instance (the daemon leaves it alone), with the
/// spec the daemon's would have: the same `Config`, but for the instance.
struct BenchService {
    runtime: SwarmRuntime,
    config: Config,
    image_id: String,
    name: String,
    replicas: usize,
    revision: i32,
}

impl BenchService {
    async fn create(
        docker: &Docker,
        instance: &str,
        image_id: &str,
        replicas: usize,
    ) -> Fallible<BenchService> {
        let config = config(instance, "", String::new());
        let runtime = SwarmRuntime::with_client(docker.clone(), instance, config.swarm_options());
        let service = BenchService {
            runtime: runtime.await.map_err(chain)?,
            name: container_name(instance, BENCH_WORKER),
            config,
            image_id: image_id.into(),
            replicas,
            revision: 1,
        };
        service
            .runtime
            .create(&service.worker()?)
            .await
            .map_err(chain)?;
        all_updated(docker, &service.name, 1, replicas, Instant::now()).await?;
        progress(format_args!("the bench's service runs {replicas} replicas"));
        Ok(service)
    }

    /// The service at the current revision.
    fn worker(&self) -> Fallible<WorkerService> {
        let config = &self.config;
        let revision = self.revision;
        let spec = ContainerSpec {
            worker_id: BENCH_WORKER,
            revision: Revision(revision),
            replica: 0,
            name: self.name.clone(),
            image: config.docker.image.clone(),
            image_id: self.image_id.clone(),
            env: BTreeMap::from([("WORKER_REVISION".into(), revision.to_string())]),
            network: config.docker.network.clone(),
            limits: config.limits(),
            hardening: config.hardening(),
            stop_signal: None,
            ready_url: None,
        };
        let replicas = u32::try_from(self.replicas).map_err(chain)?;
        Ok(WorkerService { spec, replicas })
    }

    /// The next revision through `SwarmRuntime`: list, then update.
    async fn through_runtime(&mut self, docker: &Docker) -> Fallible<Sample> {
        self.revision += 1;
        let calls = self.runtime.api_calls();
        let bump = Bump::now();
        let current = self.current().await?;
        self.runtime
            .update(&current, &self.worker()?)
            .await
            .map_err(chain)?;
        let calls = self.runtime.api_calls() - calls;
        let mut sample =
            rolled_out(docker, &self.name, self.revision, self.replicas, &bump).await?;
        sample.calls = Some(calls);
        Ok(sample)
    }

    /// The next revision through `docker service update`: the revision's
    /// environment and labels, all else as it is.
    async fn through_cli(&mut self, docker: &Docker) -> Fallible<Sample> {
        self.revision += 1;
        let r = self.revision.to_string();
        let bump = Bump::now();
        docker_cli(&[
            "service",
            "update",
            "--detach",
            "--quiet",
            "--env-add",
            &format!("WORKER_REVISION={r}"),
            "--label-add",
            &format!("{}={r}", labels::REVISION),
            "--container-label-add",
            &format!("{}={r}", labels::REVISION),
            &self.name,
        ])?;
        rolled_out(docker, &self.name, self.revision, self.replicas, &bump).await
    }

    async fn current(&self) -> Fallible<ManagedService> {
        let mut listed = self.runtime.list().await.map_err(chain)?;
        listed
            .pop()
            .ok_or_else(|| "the bench's service is gone".into())
    }

    async fn remove(&self) {
        if let Err(e) = self.runtime.remove(&self.name).await {
            eprintln!("bench: cannot remove service {}: {}", self.name, chain(e));
        }
    }
}

// ---------------------------------------------------------------------------
// Timing a rollout.

/// When a bump was made, by the poll's clock and by Swarm's.
struct Bump {
    at: Instant,
    wall: DateTime<Utc>,
}

impl Bump {
    fn now() -> Bump {
        Bump {
            at: Instant::now(),
            wall: Utc::now(),
        }
    }
}

/// One bump, timed.
struct Sample {
    /// Bump → every replica running healthy at the new revision, and no
    /// old task container left.
    took: Duration,
    /// Bump → every replica running healthy at the new revision.
    new_healthy: Duration,
    /// Bump → Swarm's `UpdateStatus.StartedAt`, ms (Swarm's clock is the
    /// host's).
    to_swarm_ms: f64,
    /// Swarm's `StartedAt` → `CompletedAt` (after the last task's monitor).
    swarm: Duration,
    calls: Option<u64>,
    passes: Option<u64>,
}

/// Times a rollout of `revision`: until all replicas are updated, then
/// until Swarm says the update completed.
async fn rolled_out(
    docker: &Docker,
    service: &str,
    revision: i32,
    n: usize,
    bump: &Bump,
) -> Fallible<Sample> {
    let updated = all_updated(docker, service, revision, n, bump.at).await?;
    let (started, completed) = settled(docker, service, bump.at).await?;
    let ms = |d: chrono::TimeDelta| d.num_microseconds().unwrap_or(i64::MAX) as f64 / 1e3;
    Ok(Sample {
        took: updated.old_gone,
        new_healthy: updated.new_healthy,
        to_swarm_ms: ms(started - bump.wall),
        swarm: (completed - started).to_std().unwrap_or_default(),
        calls: None,
        passes: None,
    })
}

/// When a rollout was seen done, from its bump: every replica running
/// healthy at the new revision, and then no other task container left.
struct Updated {
    new_healthy: Duration,
    old_gone: Duration,
}

/// Waits until `n` task containers of `service` run healthy at `revision`
/// and no other runs (the old tasks of a start-first update stop after
/// their replacements are healthy).
async fn all_updated(
    docker: &Docker,
    service: &str,
    revision: i32,
    n: usize,
    since: Instant,
) -> Fallible<Updated> {
    let filters = HashMap::from([
        (
            "label",
            vec![format!("com.docker.swarm.service.name={service}")],
        ),
        ("status", vec!["running".to_string()]),
    ]);
    let wanted = revision.to_string();
    let mut new_healthy = None;
    loop {
        let options = ListContainersOptionsBuilder::default()
            .filters(&filters)
            .build();
        let listed = docker.list_containers(Some(options)).await.map_err(chain)?;
        let healthy_new = listed
            .iter()
            .filter(|c| {
                let revision = c.labels.as_ref().and_then(|l| l.get(labels::REVISION));
                let status = c.status.as_deref().unwrap_or("");
                revision == Some(&wanted) && status.contains("(healthy)")
            })
            .count();
        if healthy_new == n {
            let new_healthy = *new_healthy.get_or_insert(since.elapsed());
            if listed.len() == n {
                let old_gone = since.elapsed();
                return Ok(Updated {
                    new_healthy,
                    old_gone,
                });
            }
        }
        if since.elapsed() > CONVERGE_MAX {
            return Err(format!(
                "{service}: revision {revision} not rolled out in {CONVERGE_MAX:?}"
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until Swarm reports the service's update completed; when it
/// started and completed it, by Swarm's clock.
async fn settled(
    docker: &Docker,
    service: &str,
    since: Instant,
) -> Fallible<(DateTime<Utc>, DateTime<Utc>)> {
    use ServiceUpdateStatusStateEnum as S;
    loop {
        let inspected = docker.inspect_service(service, None).await.map_err(chain)?;
        let status = inspected.update_status.unwrap_or_default();
        match status.state {
            Some(S::COMPLETED) => {
                let at = |t: Option<String>| {
                    let t = t.ok_or_else(|| format!("{service}: no update times"))?;
                    let parsed = DateTime::parse_from_rfc3339(&t).map_err(chain)?;
                    Fallible::Ok(parsed.with_timezone(&Utc))
                };
                return Ok((at(status.started_at)?, at(status.completed_at)?));
            }
            Some(S::UPDATING) | None => {}
            other => {
                let message = status.message.unwrap_or_default();
                return Err(format!("{service}: update {other:?}: {message}"));
            }
        }
        if since.elapsed() > CONVERGE_MAX {
            return Err(format!(
                "{service}: update not completed in {CONVERGE_MAX:?}"
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

// ---------------------------------------------------------------------------
// The figures.

#[derive(Default)]
struct Rows {
    daemon: Vec<Sample>,
    runtime: Vec<Sample>,
    cli: Vec<Sample>,
}

fn median<T: PartialOrd + Copy + Default>(mut xs: Vec<T>) -> T {
    xs.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    xs.get(xs.len() / 2).copied().unwrap_or_default()
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// The median of the counts, or a dash where none is known (the CLI's).
fn median_count(counts: impl Iterator<Item = Option<u64>>) -> String {
    let known: Vec<u64> = counts.flatten().collect();
    if known.is_empty() {
        "—".into()
    } else {
        median(known).to_string()
    }
}

impl Rows {
    fn print(&self, replicas: usize, bumps: usize, load_before: &str, load_after: &str) {
        println!();
        println!(
            "Swarm: revision bump → all {replicas} replicas running healthy at it, no old task left"
        );
        println!(
            "(Swarm's rolling update: one task at a time, start-first, health-gated, \
             monitor {UPDATE_MONITOR:?}; {bumps} bumps each, interleaved)"
        );
        println!();
        println!(
            "| path                                | median  | fastest | slowest | new healthy | bump → Swarm starts | Swarm's own | API calls | passes |"
        );
        println!(
            "|-------------------------------------|---------|---------|---------|-------------|---------------------|-------------|-----------|--------|"
        );
        let rows = [
            ("daemon: dashboard save (UPDATE)", &self.daemon),
            ("SwarmRuntime::update (list, update)", &self.runtime),
            ("docker service update (CLI)", &self.cli),
        ];
        for (who, samples) in rows {
            print_row(who, samples);
        }
        println!();
        println!("each bump, all updated / all new healthy:");
        for (who, samples) in rows {
            let each: Vec<String> = samples
                .iter()
                .map(|s| {
                    format!(
                        "{:.2}/{:.2}",
                        s.took.as_secs_f64(),
                        s.new_healthy.as_secs_f64()
                    )
                })
                .collect();
            println!("  {who:<37} {} s", each.join(", "));
        }
        println!();
        println!("load average (1/5/15 min): {load_before} at the start, {load_after} at the end");
    }
}

fn print_row(who: &str, samples: &[Sample]) {
    let took: Vec<Duration> = samples.iter().map(|s| s.took).collect();
    let fastest = took.iter().min().copied().unwrap_or_default();
    let slowest = took.iter().max().copied().unwrap_or_default();
    let new_healthy = median(samples.iter().map(|s| s.new_healthy).collect());
    let to_swarm = median(samples.iter().map(|s| s.to_swarm_ms).collect());
    let swarm = median(samples.iter().map(|s| s.swarm).collect());
    println!(
        "| {who:<35} | {:>7} | {:>7} | {:>7} | {:>11} | {:>16.0} ms | {:>11} | {:>9} | {:>6} |",
        secs(median(took)),
        secs(fastest),
        secs(slowest),
        secs(new_healthy),
        to_swarm,
        secs(swarm),
        median_count(samples.iter().map(|s| s.calls)),
        median_count(samples.iter().map(|s| s.passes)),
    );
}
