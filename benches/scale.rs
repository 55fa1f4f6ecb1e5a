//! The scale-out benchmark: how fast a backlog drains with autoscaling, and
//! what autoscaling adds to an idle pass.
//!
//! (a) **Draining a backlog.** The daemon runs in-process (as in
//! tests/pipeline.rs) on the real `workerctl/dockerworker:latest` image, host
//! network, `scale.poll_interval` = 1 s. A disabled worker (`return msg`)
//! gets its bounds (min 1, per_replica 20, max 4 — then, with a fresh worker,
//! max 1); its queue `worker_<id>` is declared (durable, quorum) and bound
//! first, and 20,000 messages are published into it with publisher confirms.
//! The clock starts when the UPDATE that enables the worker returns and
//! stops when the worker's queue holds no ready message and the next step's
//! queue holds all 20,000 results (both read by passive declare every
//! 200 ms). Meanwhile the running containers of the worker are counted
//! every 500 ms: the replica timeline.
//!
//! (b) **An idle pass with autoscaling on.** 10, then 50 idle workers, each
//! with max 4. A fresh `Reconciler` reading queue depths (as the daemon
//! wires it) makes one pass to fill its memory, then one counted pass: its
//! Docker API calls and SQL statements; beside it, the management-API
//! requests of one depth read (`QueueMonitor::calls`), which covers every
//! worker queue.
//!
//! Run: `cargo bench --bench scale` (scripts/bench runs it after the rollout
//! benchmark). Needs Postgres (`DATABASE_URL`), RabbitMQ (`AMQP_URL`, and its
//! management API at `MANAGEMENT_URL`, default http://127.0.0.1:15672 with
//! the credentials of `AMQP_URL`), Docker and the images of
//! scripts/build-images. It creates the database `bench_scale_<random>` and
//! drops it at the end, and removes its containers, queues and exchange,
//! also when a measurement fails. Settings: BENCH_BACKLOG (20000),
//! BENCH_IDLE_SIZES (10,50), and RUST_LOG for the daemon's log (default
//! warnings only).

mod common;

use common::{admin_pool, bench_main, env_or, load_average, lock, ms, progress};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use workerctl::reconcile::containers::Containers;

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::process::Command;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;
use workerctl::archive::sensorbucket_archive;
use workerctl::config::{Config, Secret};
use workerctl::metrics::Metrics;
use workerctl::model::labels;
use workerctl::readiness::ReadyReports;
use workerctl::reconcile::{PassSettings, Reconciler};
use workerctl::runtime::docker::DockerRuntime;
use workerctl::scale::depths::{QueueMonitor, Reading};
use workerctl::store::postgres::PgStore;

const WORKER_IMAGE: &str = "workerctl/dockerworker:latest";
const CODE: &str = "def process(msg):\n    return msg\n";
const PER_REPLICA: i32 = 20;
const POLL_INTERVAL: Duration = Duration::from_secs(1);
const DEPTH_EVERY: Duration = Duration::from_millis(200);
const SAMPLE_EVERY: Duration = Duration::from_millis(500);
const DEADLINE: Duration = Duration::from_secs(300);

fn main() -> ExitCode {
    bench_main("scale", run)
}

/// Sets up, measures, and always cleans up, also when a measurement panics.
async fn run() -> ExitCode {
    let load_before = load_average();
    let b = Arc::new(Bench::set_up().await);
    let body = b.clone();
    let outcome = tokio::spawn(async move {
        body.daemon().await;
        let backlog = env_or("BENCH_BACKLOG", "20000").parse().unwrap_or(20_000);
        let wide = drain(&body, 4, backlog).await;
        let narrow = drain(&body, 1, backlog).await;
        let sizes: Vec<usize> = env_or("BENCH_IDLE_SIZES", "10,50")
            .split(',')
            .filter_map(|s| s.trim().parse().ok())
            .collect();
        let idle = idle_passes(&body, &sizes).await;
        Results {
            backlog,
            drains: vec![wide, narrow],
            idle,
        }
    })
    .await;
    b.clean_up().await;
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

// ---------------------------------------------------------------------------
// Services: the throwaway database, the broker side, the daemon, docker.

struct Bench {
    tag: String,
    admin_url: String,
    db_name: String,
    db_url: String,
    amqp_url: String,
    management_url: String,
    pool: PgPool,
    amqp: Connection,
    /// Publishes (with confirms), declares, purges, reads depths.
    channel: Channel,
    exchange: String,
    next_key: String,
    next_queue: String,
    shutdown: CancellationToken,
    daemons: Mutex<Vec<TaskTracker>>,
    config: Mutex<Option<Config>>,
    queues: Mutex<Vec<String>>,
}

impl Bench {
    async fn set_up() -> Bench {
        let tag = Uuid::new_v4().simple().to_string();
        let amqp_url = env_or("AMQP_URL", "amqp://workerctl:workerctl@127.0.0.1:5672/%2f");
        let amqp = Connection::connect(&amqp_url, ConnectionProperties::default())
            .await
            .expect("RabbitMQ answers at AMQP_URL (run scripts/services)");
        let exchange = format!("pipeline.messages.bench-{tag}");
        let channel = amqp.create_channel().await.expect("channel");
        // Exactly as the dockerworker declares it, or one of the two is refused.
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        let name = exchange.as_str().into();
        let declared =
            channel.exchange_declare(name, ExchangeKind::Topic, durable, FieldTable::default());
        declared.await.expect("declare the bench exchange");
        let confirms = channel.confirm_select(ConfirmSelectOptions::default());
        confirms.await.expect("publisher confirms");
        let next_key = format!("next-{tag}");
        let next_queue = format!("{exchange}.next");
        declare_bound(&channel, &next_queue, &exchange, &next_key, false).await;
        let admin_url = env_or(
            "DATABASE_URL",
            "postgres://workerctl:workerctl@127.0.0.1:5432/workerctl",
        );
        let db_name = format!("bench_scale_{}", &tag[..12]);
        let admin = admin_pool(&admin_url).await;
        sqlx::query(&format!("CREATE DATABASE \"{db_name}\""))
            .execute(&admin)
            .await
            .expect("CREATE DATABASE (the DATABASE_URL role must be allowed to)");
        admin.close().await;
        let mut url = reqwest::Url::parse(&admin_url).expect("DATABASE_URL is a URL");
        url.set_path(&db_name);
        let db_url = url.to_string();
        let store = PgStore::connect(&db_url).expect("database URL parses");
        store.migrate().await.expect("migrations apply");
        progress(format_args!("database {db_name} ready"));
        Bench {
            pool: PgPoolOptions::new()
                .max_connections(2)
                .connect_lazy(&db_url)
                .expect("database URL parses"),
            management_url: env_or("MANAGEMENT_URL", "http://127.0.0.1:15672"),
            queues: Mutex::new(vec![next_queue.clone()]),
            tag,
            admin_url,
            db_name,
            db_url,
            amqp_url,
            amqp,
            channel,
            exchange,
            next_key,
            next_queue,
            shutdown: CancellationToken::new(),
            daemons: Mutex::default(),
            config: Mutex::default(),
        }
    }

    /// Stops the daemon; removes the containers, queues, exchange, database.
    async fn clean_up(&self) {
        self.shutdown.cancel();
        let daemons = lock(&self.daemons).clone();
        for d in daemons {
            d.wait().await;
        }
        let filter = format!("label={}={}", labels::INSTANCE, self.instance());
        let ids = docker_cli(["ps", "-aq", "--filter", &filter]).await;
        for id in ids.unwrap_or_default().split_whitespace() {
            let _ = docker_cli(["rm", "-f", id]).await;
        }
        if let Ok(channel) = self.amqp.create_channel().await {
            let queues = lock(&self.queues).clone();
            for q in queues {
                let options = QueueDeleteOptions::default();
                let _ = channel.queue_delete(q.as_str().into(), options).await;
            }
            let options = ExchangeDeleteOptions::default();
            let exchange = self.exchange.as_str().into();
            let _ = channel.exchange_delete(exchange, options).await;
            let _ = channel.close(200, "cleaned up".into()).await;
        }
        let _ = self.amqp.close(200, "bench done".into()).await;
        self.pool.close().await;
        let admin = admin_pool(&self.admin_url).await;
        let sql = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.db_name);
        match sqlx::query(&sql).execute(&admin).await {
            Ok(_) => progress(format_args!("database {} dropped", self.db_name)),
            Err(e) => eprintln!("bench: cannot drop database {}: {e}", self.db_name),
        }
    }

    fn instance(&self) -> String {
        format!("scale{}", &self.tag[..10])
    }

    /// The daemon as `workerctl run` assembles it: the defaults but for the
    /// image, the host network and the depth poll interval.
    async fn daemon(&self) {
        let instance = self.instance();
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("bind a free port");
        let mut config = Config {
            instance: instance.clone(),
            database_url: Secret::new(self.db_url.clone()),
            ..Config::default()
        };
        config.docker.image = WORKER_IMAGE.into();
        config.docker.network = "host".into();
        let addr = listener.local_addr().expect("address");
        config.code_server.public_url = format!("http://{addr}");
        config.amqp.url = Secret::new(self.amqp_url.clone());
        config.amqp.exchange = self.exchange.clone();
        config.scale.management_url = Secret::new(self.management_url.clone());
        config.scale.poll_interval = POLL_INTERVAL;
        let store = Arc::new(PgStore::connect(&self.db_url).expect("database URL parses"));
        let runtime = DockerRuntime::connect(&instance).await;
        let runtime = Arc::new(runtime.expect("Docker answers"));
        let tracker = TaskTracker::new();
        workerctl::daemon::Daemon::new(config.clone(), store, runtime)
            .spawn(listener, &tracker, &self.shutdown)
            .expect("the daemon starts");
        tracker.close();
        lock(&self.daemons).push(tracker);
        *lock(&self.config) = Some(config);
        progress(format_args!("daemon {instance} on {WORKER_IMAGE}"));
    }

    fn config(&self) -> Config {
        lock(&self.config).clone().expect("the daemon runs")
    }

    /// Inserts `n` disabled workers with bounds min 1, `max`, per_replica
    /// 20, their queues declared and bound; returns their ids.
    async fn insert(&self, n: usize, max: i32) -> Vec<Uuid> {
        let archive = sensorbucket_archive(CODE).expect("archive builds");
        let mut ids = Vec::new();
        for _ in 0..n {
            let id = Uuid::now_v7();
            sqlx::query(
                "INSERT INTO user_workers (id, name, description, state, language, tenant_id, revision, status, status_info, source, entrypoint)
                 VALUES ($1, 'bench', '', 'disabled', 'python', 1, 1, 'unknown', '', $2, 'main.main')",
            )
            .bind(id)
            .bind(&archive)
            .execute(&self.pool)
            .await
            .expect("insert worker");
            sqlx::query(
                "INSERT INTO workerctl_worker_scale (worker_id, min_replicas, max_replicas, per_replica)
                 VALUES ($1, 1, $2, $3)",
            )
            .bind(id)
            .bind(max)
            .bind(PER_REPLICA)
            .execute(&self.pool)
            .await
            .expect("set the scale bounds");
            lock(&self.queues).extend([format!("worker_{id}"), format!("worker_{id}.retry")]);
            let queue = format!("worker_{id}");
            declare_bound(&self.channel, &queue, &self.exchange, &id.to_string(), true).await;
            ids.push(id);
        }
        ids
    }

    /// Enables the workers in one UPDATE; returns when it returned.
    async fn enable(&self, ids: &[Uuid]) -> Instant {
        sqlx::query("UPDATE user_workers SET state = 'enabled' WHERE id = ANY($1)")
            .bind(ids)
            .execute(&self.pool)
            .await
            .expect("enable workers");
        Instant::now()
    }

    /// Deletes the workers and waits for their containers to go.
    async fn delete(&self, ids: &[Uuid]) {
        sqlx::query("DELETE FROM user_workers WHERE id = ANY($1)")
            .bind(ids)
            .execute(&self.pool)
            .await
            .expect("delete workers");
        let start = Instant::now();
        for &id in ids {
            while !containers_of(id, false).await.is_empty() {
                assert!(start.elapsed() < DEADLINE, "{id}: containers never removed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// Publishes `n` messages for `worker`, waiting for every confirm.
    async fn publish(&self, worker: Uuid, n: usize) {
        let body = self.message(worker);
        let key = worker.to_string();
        let mut pending = Vec::new();
        for i in 0..n {
            let properties = BasicProperties::default()
                .with_message_id(format!("m-{i}").into())
                .with_content_type("application/json".into())
                .with_delivery_mode(2);
            let options = BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            };
            let exchange = self.exchange.as_str().into();
            let sent = self.channel.basic_publish(
                exchange,
                key.as_str().into(),
                options,
                &body,
                properties,
            );
            pending.push(sent.await.expect("publish"));
            if pending.len() == 1000 || i + 1 == n {
                for confirm in pending.drain(..) {
                    let confirm = confirm.await.expect("a confirm");
                    assert!(confirm.is_ack(), "the broker took every message");
                }
            }
        }
    }

    /// A pipeline message for `worker`, then the benchmark's next step.
    fn message(&self, worker: Uuid) -> Vec<u8> {
        let body = json!({
            "tracing_id": Uuid::new_v4().to_string(),
            "tenant_id": 1,
            "access_token": "bench-access-token",
            "received_at": 0,
            "pipeline_id": Uuid::new_v4().to_string(),
            "step_index": 0,
            "pipeline_steps": [worker.to_string(), self.next_key],
            "timestamp": 0,
            "payload": "cmVhZGluZw==",
            "metadata": {},
        });
        serde_json::to_vec(&body).expect("json")
    }

    /// Ready messages in `queue` now (passive declare: the broker's own count).
    async fn depth(&self, queue: &str) -> u32 {
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let declared = self
            .channel
            .queue_declare(queue.into(), passive, FieldTable::default());
        declared.await.expect("the queue exists").message_count()
    }
}

/// Declares `queue` (durable quorum if `quorum`, as the dockerworker
/// declares a worker's) and binds it to `key` on `exchange`.
async fn declare_bound(channel: &Channel, queue: &str, exchange: &str, key: &str, quorum: bool) {
    let mut args = FieldTable::default();
    if quorum {
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
    }
    let options = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let declared = channel.queue_declare(queue.into(), options, args);
    declared.await.expect("declare a queue");
    let bound = channel.queue_bind(
        queue.into(),
        exchange.into(),
        key.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    );
    bound.await.expect("bind a queue");
}

/// Runs the docker CLI: its stdout, or what went wrong.
async fn docker_cli<I: IntoIterator<Item = S>, S: AsRef<std::ffi::OsStr>>(
    args: I,
) -> Result<String, String> {
    let args: Vec<S> = args.into_iter().collect();
    match Command::new("docker").args(&args).output().await {
        Ok(out) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout).into()),
        Ok(out) => Err(format!(
            "docker failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )),
        Err(e) => Err(format!("the docker CLI does not run: {e}")),
    }
}

/// The worker's containers (only the running ones if `running`).
async fn containers_of(id: Uuid, running: bool) -> Vec<String> {
    let filter = format!("label={}={id}", labels::WORKER_ID);
    let mut args = vec!["ps", "-aq", "--filter", &filter];
    if running {
        args.extend(["--filter", "status=running"]);
    }
    let out = docker_cli(args).await.unwrap_or_else(|e| panic!("{e}"));
    out.split_whitespace().map(String::from).collect()
}

// ---------------------------------------------------------------------------
// (a) Draining a backlog.

struct Drain {
    max: i32,
    /// Enable → first result on the next step's queue.
    first_result: Option<Duration>,
    /// Enable → worker queue empty and every result on the next step's queue.
    drained: Duration,
    /// (seconds since enable, running containers).
    timeline: Vec<(f64, usize)>,
}

async fn drain(b: &Bench, max: i32, backlog: usize) -> Drain {
    let ids = b.insert(1, max).await;
    let id = ids[0];
    let queue = format!("worker_{id}");
    let purged = b
        .channel
        .queue_purge(b.next_queue.as_str().into(), QueuePurgeOptions::default());
    purged.await.expect("purge the next queue");
    b.publish(id, backlog).await;
    let queued = b.depth(&queue).await;
    assert_eq!(queued as usize, backlog, "the backlog waits in {queue}");
    progress(format_args!("(a) max {max}: {backlog} messages queued"));

    let enabled = b.enable(&ids).await;
    let stop = CancellationToken::new();
    let sampler = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut samples = Vec::new();
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let at = enabled.elapsed().as_secs_f64();
                samples.push((at, containers_of(id, true).await.len()));
            }
            samples
        }
    });
    let mut first_result = None;
    let drained = loop {
        let (ready, done) = (b.depth(&queue).await, b.depth(&b.next_queue).await);
        let at = enabled.elapsed();
        if done > 0 && first_result.is_none() {
            first_result = Some(at);
        }
        if ready == 0 && done as usize >= backlog {
            break at;
        }
        assert!(at < DEADLINE, "not drained: {ready} ready, {done} results");
        tokio::time::sleep(DEPTH_EVERY).await;
    };
    // One more sample at the end, then the timeline is complete.
    tokio::time::sleep(SAMPLE_EVERY).await;
    stop.cancel();
    let timeline = sampler.await.expect("sampler");
    progress(format_args!(
        "(a) max {max}: drained in {:.1} s",
        drained.as_secs_f64()
    ));
    b.delete(&ids).await;
    if let Ok(channel) = b.amqp.create_channel().await {
        for q in [queue.clone(), format!("{queue}.retry")] {
            let options = QueueDeleteOptions::default();
            let _ = channel.queue_delete(q.as_str().into(), options).await;
        }
        let _ = channel.close(200, "drained".into()).await;
    }
    Drain {
        max,
        first_result,
        drained,
        timeline,
    }
}

// ---------------------------------------------------------------------------
// (b) The idle pass with autoscaling on.

struct Idle {
    workers: usize,
    docker_calls: u64,
    statements: u64,
    actions: usize,
    pass_ms: f64,
    management_calls: u64,
    queues_read: usize,
}

async fn idle_passes(b: &Bench, sizes: &[usize]) -> Vec<Idle> {
    let mut sizes = sizes.to_vec();
    sizes.sort_unstable();
    sizes.dedup();
    let mut ids = Vec::new();
    let mut out = Vec::new();
    for size in sizes {
        progress(format_args!("(b) converging {size} workers"));
        let new = b.insert(size.saturating_sub(ids.len()), 4).await;
        b.enable(&new).await;
        ids.extend(new);
        let start = Instant::now();
        for &id in &ids {
            while containers_of(id, true).await.len() != 1 {
                assert!(start.elapsed() < DEADLINE, "{id}: never one replica");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        // The daemon's statuses written and the broker's statistics of the
        // new queues published.
        tokio::time::sleep(Duration::from_secs(6)).await;
        out.push(idle_pass(b, size).await);
    }
    b.delete(&ids).await;
    out
}

/// One pass of a fresh reconciler reading depths (fresh counters) over idle
/// workers, after a first pass that fills its memory.
async fn idle_pass(b: &Bench, workers: usize) -> Idle {
    let config = b.config();
    let store = Arc::new(PgStore::connect(&b.db_url).expect("database URL parses"));
    let docker = DockerRuntime::connect(&b.instance()).await;
    let docker = Arc::new(docker.expect("Docker answers"));
    let monitor = QueueMonitor::new(&b.management_url, &b.amqp_url).expect("management URL");
    let read = monitor.depths().await.expect("the management API answers");
    let management_calls = monitor.calls();
    let queues_read = read.by_worker.len();
    let (_tx, rx) = watch::channel(Reading::Depths(read));
    let metrics = Arc::new(Metrics::new());
    let reports = Arc::new(ReadyReports::new(Arc::default()));
    let mut reconciler = Reconciler::new(
        store.clone(),
        Containers::new(docker.clone(), reports, metrics.clone()),
        PassSettings::from_config(&config),
        metrics,
    )
    .reading_depths(rx);
    reconciler.pass().await.expect("first pass");
    let (calls, statements) = (docker.api_calls(), store.statements());
    let start = Instant::now();
    let report = reconciler.pass().await.expect("idle pass");
    let took = start.elapsed();
    Idle {
        workers,
        docker_calls: docker.api_calls() - calls,
        statements: store.statements() - statements,
        actions: report.started,
        pass_ms: ms(took),
        management_calls,
        queues_read,
    }
}

// ---------------------------------------------------------------------------
// The report.

struct Results {
    backlog: usize,
    drains: Vec<Drain>,
    idle: Vec<Idle>,
}

/// `t=0.0s 1, t=2.5s 4, …`: the first sample and every change.
fn timeline(samples: &[(f64, usize)]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut last = None;
    for &(at, n) in samples {
        if last != Some(n) {
            out.push(format!("t={at:.1}s {n}"));
            last = Some(n);
        }
    }
    if let Some(&(at, n)) = samples.last() {
        out.push(format!("(last sample t={at:.1}s {n})"));
    }
    out.join(", ")
}

impl Results {
    fn print(&self, load_before: &str, load_after: &str) {
        let cpus = std::thread::available_parallelism().map_or(0, usize::from);
        println!(
            "\nscale-out: draining a backlog of {} messages ({cpus} CPUs; load average {load_before} at the start, {load_after} at the end; scale.poll_interval {:?}, per_replica {PER_REPLICA}, min 1)",
            self.backlog, POLL_INTERVAL
        );
        for d in &self.drains {
            let first = d.first_result.map_or(f64::NAN, |t| t.as_secs_f64());
            let rate = self.backlog as f64 / d.drained.as_secs_f64();
            let peak = d.timeline.iter().map(|s| s.1).max().unwrap_or(0);
            println!(
                "max {}: enable → drained {:>6.1} s ({rate:.0} msg/s overall), enable → first result {first:.1} s, peak {peak} replicas",
                d.max,
                d.drained.as_secs_f64()
            );
            println!("  replicas: {}", timeline(&d.timeline));
        }
        if let [wide, narrow] = &self.drains[..] {
            println!(
                "drain time max {} / max {}: {:.2}",
                wide.max,
                narrow.max,
                wide.drained.as_secs_f64() / narrow.drained.as_secs_f64()
            );
        }
        println!("\nidle pass with autoscaling on (each worker max 4, queues empty)");
        for i in &self.idle {
            println!(
                "{:>3} workers: {} Docker API calls, {} SQL statements, {} actions, {:.1} ms; management API: {} request(s) per depth read ({} worker queues in it)",
                i.workers,
                i.docker_calls,
                i.statements,
                i.actions,
                i.pass_ms,
                i.management_calls,
                i.queues_read
            );
        }
    }
}
