//! The rollout benchmark: how long a saved revision takes to be live, and
//! whether a worker stuck in its grace period holds anybody else up.
//!
//! (a) **Save → answered by the new code.** The daemon runs in-process (as in
//! tests/pipeline.rs) on the real `workerctl/dockerworker:latest` image, host
//! network. One worker is saved 20 times (after 2 warm-ups) with code that
//! stamps `metadata.version = N`, as the dashboard saves it (`source` and
//! `revision + 1` in one UPDATE). From the moment the UPDATE returned, a
//! message is published every 20 ms; the clock stops at the arrival, on the
//! next step's queue, of the first result with version N. Beside it,
//! **container start → consuming** for the same image: `docker run -d` with
//! the flags and environment of the worker's own container (only
//! `WORKER_READY_URL` points at a listener of this benchmark) until the
//! container's ready report arrives; 10 runs after one warm-up. And the
//! floor both are read against, in the same run: `python -c pass` in the
//! same image with the same flags, `docker run -d` → the engine's
//! FinishedAt (and StartedAt → FinishedAt); BENCH_FLOORS runs (10).
//!
//! (b) **A worker stuck in its grace period.** A second daemon, with
//! `docker.stop_timeout = 15s`, on a busybox stand-in image (as in
//! tests/common/mod.rs) whose `stubborn.*` entrypoint ignores SIGTERM. Worker
//! A (stubborn) gets a new revision; once A is ready at it (its old container
//! now waits out its 15 s), worker B is inserted and timed from the INSERT
//! returning to B's status `ready` (its container running and reported).
//! The same B timing with nobody stuck, interleaved; 5 rounds each.
//!
//! Run: `cargo bench --bench rollout` (scripts/bench runs it after the
//! controller benchmark). Needs Postgres (`DATABASE_URL`), RabbitMQ
//! (`AMQP_URL`), Docker and the images of scripts/build-images. It creates
//! the database `bench_rollout_<random>` and drops it at the end, and removes
//! its containers, queues and exchange, also when a measurement fails.
//! Settings: BENCH_SAVES (20), BENCH_STARTS (10), BENCH_FLOORS (10), BENCH_ROUNDS (5), and
//! RUST_LOG for the daemons' log (default warnings only).

mod common;

use common::{
    admin_pool, bench_main, count, env_or, load_average, lock, median, ms, percentile, progress,
};
use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::extract::Query;
use base64::Engine;
use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer, ExchangeKind};
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;
use workerctl::archive::sensorbucket_archive;
use workerctl::config::{Config, Secret};
use workerctl::model::{WorkerId, container_name, labels};
use workerctl::runtime::docker::DockerRuntime;
use workerctl::store::postgres::PgStore;

const WORKER_IMAGE: &str = "workerctl/dockerworker:latest";
/// Reports ready as the dockerworker does once it consumes; `stubborn.*`
/// ignores SIGTERM. The script of tests/common/mod.rs, but it reports 300 ms
/// after it starts (the dockerworker needs 170 ms or more), as it did when
/// the recorded figures were taken: a report that arrived before the
/// engine's start call had returned used to be lost (fixed since, see
/// readiness.rs and docs/benchmarks.md), and the delay is kept so that the
/// figures stay comparable.
const STAND_IN_IMAGE: &str = "workerctl-bench/rollout-worker:latest";
const STAND_IN_SCRIPT: &str = r#"sleep 0.3; case "$CODE_ENTRYPOINT" in crash.*) echo crashing; exit 3;; esac; echo "hello from revision $WORKER_REVISION"; echo "warming up" >&2; case "$CODE_ENTRYPOINT" in silent.*) ;; *) wget -q -O /dev/null --post-data '' "$WORKER_READY_URL" || echo "cannot report ready";; esac; case "$CODE_ENTRYPOINT" in stubborn.*) trap '' TERM;; *) trap 'exit 0' TERM;; esac; while :; do sleep 0.1; done"#;
/// Labels the benchmark's own `docker run` containers, for the clean-up.
const BENCH_LABEL: &str = "workerctl-bench.rollout";
const WARMUP: usize = 2;
const GRACE: Duration = Duration::from_secs(15);
const PUBLISH_EVERY: Duration = Duration::from_millis(20);
const POLL: Duration = Duration::from_millis(10);
const DEADLINE: Duration = Duration::from_secs(120);

fn main() -> ExitCode {
    bench_main("rollout", run)
}

/// Sets up, measures, and always cleans up, also when a measurement panics.
async fn run() -> ExitCode {
    let load_before = load_average();
    build_stand_in().await;
    let b = Arc::new(Bench::set_up().await);
    let body = b.clone();
    let outcome = tokio::spawn(async move {
        let (saves, (starts, floors)) = saves_and_starts(&body).await;
        let (free, stuck, overlapped) = grace_period(&body).await;
        Results {
            saves,
            starts,
            floors,
            free,
            stuck,
            overlapped,
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
// Services: the throwaway database, the broker side, the daemons, docker.

struct Bench {
    tag: String,
    admin_url: String,
    db_name: String,
    db_url: String,
    amqp_url: String,
    pool: PgPool,
    amqp: Connection,
    exchange: String,
    next_key: String,
    shutdown: CancellationToken,
    daemons: Mutex<Vec<TaskTracker>>,
    queues: Mutex<Vec<String>>,
}

/// A running daemon: its instance, and what stops it.
struct Daemon(String, CancellationToken, TaskTracker);

impl Daemon {
    async fn stop(self) {
        self.1.cancel();
        self.2.wait().await;
    }
}

impl Bench {
    async fn set_up() -> Bench {
        let tag = Uuid::new_v4().simple().to_string();
        let amqp_url = env_or("AMQP_URL", "amqp://workerctl:workerctl@127.0.0.1:5672/%2f");
        let amqp = Connection::connect(&amqp_url, ConnectionProperties::default())
            .await
            .expect("RabbitMQ answers at AMQP_URL (run scripts/services)");
        let exchange = format!("pipeline.messages.bench-{tag}");
        // Exactly as the dockerworker declares it, or one of the two is refused.
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        let channel = amqp.create_channel().await.expect("channel");
        let name = exchange.as_str().into();
        let topic = ExchangeKind::Topic;
        let declared = channel.exchange_declare(name, topic, durable, FieldTable::default());
        declared.await.expect("declare the bench exchange");
        let _ = channel.close(200, "declared".into()).await;
        let admin_url = env_or(
            "DATABASE_URL",
            "postgres://workerctl:workerctl@127.0.0.1:5432/workerctl",
        );
        let db_name = format!("bench_rollout_{}", &tag[..12]);
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
            next_key: format!("next-{tag}"),
            queues: Mutex::new(vec![format!("{exchange}.next")]),
            pool: PgPoolOptions::new()
                .max_connections(2)
                .connect_lazy(&db_url)
                .expect("database URL parses"),
            tag,
            admin_url,
            db_name,
            db_url,
            amqp_url,
            amqp,
            exchange,
            shutdown: CancellationToken::new(),
            daemons: Mutex::default(),
        }
    }

    /// Stops the daemons; removes the containers, queues, exchange, database.
    async fn clean_up(&self) {
        self.shutdown.cancel();
        let daemons = lock(&self.daemons).clone();
        for d in daemons {
            d.wait().await;
        }
        for filter in [
            format!("{}={}", labels::INSTANCE, self.instance("a")),
            format!("{}={}", labels::INSTANCE, self.instance("b")),
            format!("{BENCH_LABEL}={}", self.tag),
        ] {
            let filter = format!("label={filter}");
            let ids = docker_cli(["ps", "-aq", "--filter", &filter]).await;
            for id in ids.unwrap_or_default().split_whitespace() {
                let _ = docker_cli(["rm", "-f", id]).await;
            }
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

    fn instance(&self, phase: &str) -> String {
        format!("rollout{}{phase}", &self.tag[..10])
    }

    /// `docker run -d` of a container `name`, labelled for the clean-up, with `flags`.
    fn docker_run(&self, name: &str, flags: &[String]) -> Vec<String> {
        let mut args: Vec<String> = ["run", "-d", "--name", name].map(String::from).into();
        args.extend(["--label".into(), format!("{BENCH_LABEL}={}", self.tag)]);
        args.extend(flags.iter().cloned());
        args
    }

    /// The daemon as `workerctl run` assembles it: the defaults but for the
    /// image, the host network and the stop grace period.
    async fn daemon(&self, phase: &str, image: &str, grace: Duration) -> Daemon {
        let instance = self.instance(phase);
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("bind a free port");
        let mut config = Config {
            instance: instance.clone(),
            database_url: Secret::new(self.db_url.clone()),
            ..Config::default()
        };
        config.docker.image = image.into();
        config.docker.network = "host".into();
        config.docker.stop_timeout = grace;
        let addr = listener.local_addr().expect("address");
        config.code_server.public_url = format!("http://{addr}");
        config.amqp.url = Secret::new(self.amqp_url.clone());
        config.amqp.exchange = self.exchange.clone();
        let store = Arc::new(PgStore::connect(&self.db_url).expect("database URL parses"));
        let runtime = DockerRuntime::connect(&instance).await;
        let runtime = Arc::new(runtime.expect("Docker answers"));
        let (shutdown, tracker) = (self.shutdown.child_token(), TaskTracker::new());
        workerctl::daemon::Daemon::new(config, store, runtime)
            .spawn(listener, &tracker, &shutdown)
            .expect("the daemon starts");
        tracker.close();
        lock(&self.daemons).push(tracker.clone());
        progress(format_args!("daemon {instance} on {image}"));
        Daemon(instance, shutdown, tracker)
    }

    /// Inserts an enabled worker; returns its id and when the INSERT returned.
    async fn insert(&self, entrypoint: &str, code: &str) -> (Uuid, Instant) {
        let id = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO user_workers (id, name, description, state, language, tenant_id, revision, status, status_info, source, entrypoint)
             VALUES ($1, 'bench', '', 'enabled', 'python', 1, 1, 'unknown', '', $2, $3)",
        )
        .bind(id)
        .bind(sensorbucket_archive(code).expect("archive builds"))
        .bind(entrypoint)
        .execute(&self.pool)
        .await
        .expect("insert worker");
        (id, Instant::now())
    }

    /// Saves new code as the dashboard does; returns when the UPDATE returned.
    async fn save(&self, id: Uuid, code: &str) -> Instant {
        sqlx::query("UPDATE user_workers SET source = $1, revision = revision + 1 WHERE id = $2")
            .bind(sensorbucket_archive(code).expect("archive builds"))
            .bind(id)
            .execute(&self.pool)
            .await
            .expect("save code");
        Instant::now()
    }

    /// Deletes the worker and waits for its containers to go.
    async fn delete(&self, id: Uuid) {
        sqlx::query("DELETE FROM user_workers WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await
            .expect("delete worker");
        self.containers(id, 0).await;
    }

    /// Polls until the worker's status is `ready` at `revision`; returns when.
    async fn ready_at(&self, id: Uuid, revision: i32) -> Instant {
        let wanted = format!("running revision {revision} ");
        let start = Instant::now();
        loop {
            let (status, info): (String, String) =
                sqlx::query_as("SELECT status, status_info FROM user_workers WHERE id = $1")
                    .bind(id)
                    .fetch_one(&self.pool)
                    .await
                    .expect("read status");
            if status == "ready" && info.starts_with(&wanted) {
                return Instant::now();
            }
            let late = start.elapsed() > DEADLINE;
            assert!(!late, "{id} not ready at revision {revision}: {info}");
            tokio::time::sleep(POLL).await;
        }
    }

    /// Until the worker has exactly `n` containers, running or not.
    async fn containers(&self, id: Uuid, n: usize) {
        let start = Instant::now();
        while containers_of(id).await.len() != n {
            assert!(start.elapsed() < DEADLINE, "{id}: never {n} containers");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Consumes the next step's queue.
    async fn next_consumer(&self) -> Consumer {
        let channel = self.amqp.create_channel().await.expect("channel");
        let queue = format!("{}.next", self.exchange);
        let (q, none) = (queue.as_str(), FieldTable::default);
        let options = QueueDeclareOptions::default();
        let declared = channel.queue_declare(q.into(), options, none());
        declared.await.expect("declare the next queue");
        let (exchange, key) = (self.exchange.as_str(), self.next_key.as_str());
        let bound = channel.queue_bind(
            q.into(),
            exchange.into(),
            key.into(),
            Default::default(),
            none(),
        );
        bound.await.expect("bind the next queue");
        let no_ack = BasicConsumeOptions {
            no_ack: true,
            ..BasicConsumeOptions::default()
        };
        let consumer = channel.basic_consume(q.into(), "".into(), no_ack, none());
        consumer.await.expect("consume the next queue")
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
            "payload": base64::engine::general_purpose::STANDARD.encode("reading"),
            "metadata": {},
        });
        serde_json::to_vec(&body).expect("json")
    }
}

async fn build_stand_in() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cmd = serde_json::to_string(&["/bin/sh", "-c", STAND_IN_SCRIPT]).expect("json");
    let dockerfile = format!("FROM workerctl/busybox:latest\nCMD {cmd}\n");
    std::fs::write(dir.path().join("Dockerfile"), dockerfile).expect("write Dockerfile");
    let dir = dir.path().to_string_lossy().into_owned();
    docker(["build", "-q", "-t", STAND_IN_IMAGE, &dir]).await;
}

/// Runs the docker CLI: its stdout, or what went wrong.
async fn docker_cli<I: IntoIterator<Item = S>, S: AsRef<std::ffi::OsStr>>(
    args: I,
) -> Result<String, String> {
    let args: Vec<S> = args.into_iter().collect();
    let what = args
        .first()
        .map(|a| a.as_ref().to_string_lossy().into_owned());
    match Command::new("docker").args(&args).output().await {
        Ok(out) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout).into()),
        Ok(out) => Err(format!(
            "docker {what:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )),
        Err(e) => Err(format!("the docker CLI does not run: {e}")),
    }
}

/// [`docker_cli`], panicking if it fails.
async fn docker<I: IntoIterator<Item = S>, S: AsRef<std::ffi::OsStr>>(args: I) -> String {
    docker_cli(args).await.unwrap_or_else(|e| panic!("{e}"))
}

async fn containers_of(id: Uuid) -> Vec<String> {
    let filter = format!("label={}={id}", labels::WORKER_ID);
    let out = docker(["ps", "-aq", "--filter", &filter]).await;
    out.split_whitespace().map(String::from).collect()
}

/// An engine timestamp (RFC 3339) as a time of this clock.
fn engine_time(stamp: &str) -> Option<SystemTime> {
    let at = chrono::DateTime::parse_from_rfc3339(stamp.trim()).ok()?;
    Some(SystemTime::from(at))
}

// ---------------------------------------------------------------------------
// (a) Save → first message answered by the new code; container start → consuming.

fn versioned(v: usize) -> String {
    format!("def process(msg):\n    msg.metadata[\"version\"] = {v}\n    return msg\n")
}

/// Per run, ms from `docker run` and from the engine's StartedAt to what
/// was awaited (a ready report, an exit).
type Timed = Vec<(f64, f64)>;

async fn saves_and_starts(b: &Bench) -> (Vec<f64>, (Timed, Timed)) {
    let (saves, grace) = (
        count("BENCH_SAVES", 20),
        Config::default().docker.stop_timeout,
    );
    let daemon = b.daemon("a", WORKER_IMAGE, grace).await;
    let mut next = b.next_consumer().await;
    let (id, _) = b.insert("main.main", &versioned(0)).await;
    lock(&b.queues).extend([format!("worker_{id}"), format!("worker_{id}.retry")]);
    b.ready_at(id, 1).await;
    let publisher = b.amqp.create_channel().await.expect("channel");
    let mut out = Vec::new();
    for i in 0..WARMUP + saves {
        let (version, revision) = (i + 1, i as i32 + 2);
        let saved = b.save(id, &versioned(version)).await;
        let stop = CancellationToken::new();
        let (message, key) = (b.message(id), id.to_string());
        let publishing = publish_every(&publisher, &b.exchange, &key, &message, &stop);
        let answered = async {
            loop {
                let delivery = tokio::time::timeout(DEADLINE, next.next()).await;
                let delivery = delivery.expect("results within the deadline");
                let delivery = delivery.expect("the consumer is open").expect("a delivery");
                let body: Value = serde_json::from_slice(&delivery.data).expect("JSON");
                if body["metadata"]["version"] == version {
                    stop.cancel();
                    return ms(saved.elapsed());
                }
            }
        };
        let ((), took) = tokio::join!(publishing, answered);
        b.ready_at(id, revision).await;
        b.containers(id, 1).await;
        // What was published before the new code answered comes out now.
        let drained = Duration::from_millis(300);
        while let Ok(Some(_)) = tokio::time::timeout(drained, next.next()).await {}
        if i >= WARMUP {
            progress(format_args!(
                "(a) save {}/{saves}: {took:.0} ms",
                i + 1 - WARMUP
            ));
            out.push(took);
        }
    }
    let _ = publisher.close(200, "done".into()).await;
    let starts = start_to_consuming(b, &container_name(&daemon.0, WorkerId(id))).await;
    daemon.stop().await;
    (out, starts)
}

/// Publishes `body` every [`PUBLISH_EVERY`] until `stop` (no confirms: the
/// pace is the clock's, not the broker's).
async fn publish_every(
    ch: &Channel,
    exchange: &str,
    key: &str,
    body: &[u8],
    stop: &CancellationToken,
) {
    let mut tick = tokio::time::interval(PUBLISH_EVERY);
    for n in 0u64.. {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let properties = BasicProperties::default()
            .with_message_id(format!("m-{n}").into())
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        let options = BasicPublishOptions::default();
        let sent = ch.basic_publish(exchange.into(), key.into(), options, body, properties);
        if let Err(e) = sent.await {
            return eprintln!("bench: publish failed: {e}");
        }
    }
}

/// `docker run -d` of the worker container's own image, flags and
/// environment, but its ready report comes to a listener of ours: per run,
/// ms from `docker run` and from the engine's StartedAt to the report. Then
/// the floor: `python -c pass` in that image with those flags, to its exit.
async fn start_to_consuming(b: &Bench, worker_container: &str) -> (Timed, Timed) {
    let runs = count("BENCH_STARTS", 10);
    let inspected: Value = serde_json::from_str(&docker(["inspect", worker_container]).await)
        .expect("docker inspect prints JSON");
    let (c, hc) = (&inspected[0], &inspected[0]["HostConfig"]);
    let strings =
        |v: &Value| -> Vec<String> { serde_json::from_value(v.clone()).unwrap_or_default() };
    let num = |key: &str| hc[key].as_i64().unwrap_or(0);
    let mut flags: Vec<String> = vec!["--network".into(), "host".into()];
    for (flag, value) in [
        ("--memory", "Memory"),
        ("--memory-swap", "MemorySwap"),
        ("--pids-limit", "PidsLimit"),
    ] {
        if num(value) > 0 {
            flags.extend([flag.into(), num(value).to_string()]);
        }
    }
    if num("NanoCpus") > 0 {
        flags.extend(["--cpus".into(), (num("NanoCpus") as f64 / 1e9).to_string()]);
    }
    let opts = strings(&hc["SecurityOpt"])
        .into_iter()
        .map(|o| ("--security-opt", o));
    let caps = strings(&hc["CapDrop"])
        .into_iter()
        .map(|o| ("--cap-drop", o));
    let env = strings(&c["Config"]["Env"])
        .into_iter()
        .map(|e| ("--env", e));
    let env = env.filter(|(_, e)| !e.starts_with("WORKER_READY_URL="));
    let tmpfs = hc["Tmpfs"].as_object().into_iter().flatten();
    let tmpfs = tmpfs.map(|(path, o)| ("--tmpfs", format!("{path}:{}", o.as_str().unwrap_or(""))));
    let user = c["Config"]["User"]
        .as_str()
        .filter(|u| !u.is_empty())
        .map(|u| ("--user", u.to_string()));
    for (flag, value) in opts.chain(caps).chain(tmpfs).chain(user) {
        flags.extend([flag.to_string(), value]);
    }
    let env: Vec<String> = env.flat_map(|(flag, e)| [flag.to_string(), e]).collect();
    if hc["ReadonlyRootfs"] == true {
        flags.push("--read-only".into());
    }
    let image = c["Image"]
        .as_str()
        .expect("the container's image id")
        .to_string();

    let (tx, mut reports) = tokio::sync::mpsc::unbounded_channel();
    let ready = async move |Query(q): Query<HashMap<String, String>>| {
        let run = q.get("run").cloned().unwrap_or_default();
        let _ = tx.send((run, Instant::now(), SystemTime::now()));
        axum::http::StatusCode::NO_CONTENT
    };
    let app = axum::Router::new().route("/ready", axum::routing::post(ready));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await;
    let listener = listener.expect("bind a free port");
    let addr = listener.local_addr().expect("address");
    let stop = b.shutdown.child_token();
    let serve = axum::serve(listener, app).with_graceful_shutdown(stop.clone().cancelled_owned());
    let server = tokio::spawn(serve.into_future());
    let mut out = Vec::new();
    for k in 0..=runs {
        let name = format!("{}-start-{k}", b.instance("a"));
        let mut args = b.docker_run(&name, &flags);
        args.extend(env.iter().cloned());
        args.extend([
            "--env".into(),
            format!("WORKER_READY_URL=http://{addr}/ready?run={k}"),
        ]);
        args.push(image.clone());
        let t0 = Instant::now();
        docker(&args).await;
        let (at, wall) = loop {
            let report = tokio::time::timeout(DEADLINE, reports.recv()).await;
            let (run, at, wall) = report.expect("a ready report in time").expect("listening");
            if run == k.to_string() {
                break (at, wall);
            }
        };
        let run = ms(at - t0);
        let started = docker(["inspect", "--format", "{{.State.StartedAt}}", &name]).await;
        let started = engine_time(&started).and_then(|s| wall.duration_since(s).ok());
        let started = started.map_or(f64::NAN, ms);
        docker(["rm", "-f", &name]).await;
        if k > 0 {
            progress(format_args!(
                "(a) start {k}/{runs}: run → ready {run:.0} ms, StartedAt → ready {started:.0} ms"
            ));
            out.push((run, started));
        }
    }
    stop.cancel();
    let _ = server.await;
    let floors = python_pass(b, &image, &flags).await;
    (out, floors)
}

/// `python -c pass` in `image` with the worker container's `flags` (not its
/// environment): per run, ms from `docker run` and from StartedAt to FinishedAt.
async fn python_pass(b: &Bench, image: &str, flags: &[String]) -> Timed {
    let runs = count("BENCH_FLOORS", 10);
    let mut out = Vec::new();
    for k in 0..=runs {
        let name = format!("{}-floor-{k}", b.instance("a"));
        let mut args = b.docker_run(&name, flags);
        args.extend(["--entrypoint", "python", image, "-c", "pass"].map(String::from));
        let called = SystemTime::now();
        docker(&args).await;
        let exit = docker(["wait", &name]).await;
        assert_eq!(
            exit.trim(),
            "0",
            "python -c pass in {image} exited with {exit}"
        );
        let format = "{{.State.StartedAt}} {{.State.FinishedAt}}";
        let stamps = docker(["inspect", "--format", format, &name]).await;
        docker(["rm", "-f", &name]).await;
        let mut stamps = stamps.split_whitespace().map(engine_time);
        let (Some(Some(started)), Some(Some(finished))) = (stamps.next(), stamps.next()) else {
            panic!("docker inspect of {name}: no StartedAt and FinishedAt");
        };
        let since = |t: SystemTime| finished.duration_since(t).map_or(f64::NAN, ms);
        if k > 0 {
            out.push((since(called), since(started)));
        }
    }
    out
}

// ---------------------------------------------------------------------------
// (b) Another worker's create → ready, with and without one stuck in its grace period.

/// B's insert → ready and insert → its container started (engine's clock), ms.
type Create = (f64, f64);

/// (none stuck, one stuck, rounds in which A's old container was still
/// waiting out its grace period when B was done).
async fn grace_period(b: &Bench) -> (Vec<Create>, Vec<Create>, usize) {
    let rounds = count("BENCH_ROUNDS", 5);
    let daemon = b.daemon("b", STAND_IN_IMAGE, GRACE).await;
    let (a, _) = b.insert("stubborn.main", &versioned(0)).await;
    b.ready_at(a, 1).await;
    time_create(b).await; // warm-up
    let (mut free, mut stuck, mut overlapped) = (Vec::new(), Vec::new(), 0);
    for round in 1..=rounds {
        b.containers(a, 1).await; // nobody in a grace period
        free.push(time_create(b).await);
        b.save(a, &versioned(round)).await;
        b.ready_at(a, round as i32 + 1).await;
        stuck.push(time_create(b).await);
        // B is gone again: two containers mean A's old one still stops.
        let still = containers_of(a).await.len() == 2;
        overlapped += usize::from(still);
        progress(format_args!(
            "(b) round {round}/{rounds}: none stuck {:.0} ms, one stuck {:.0} ms (A still stopping after: {still})",
            free[round - 1].0,
            stuck[round - 1].0
        ));
    }
    b.delete(a).await;
    daemon.stop().await;
    (free, stuck, overlapped)
}

/// Inserts worker B, times it until its status is ready, then deletes it.
async fn time_create(b: &Bench) -> Create {
    let wall = SystemTime::now();
    let (id, inserted) = b.insert("main.main", &versioned(0)).await;
    let ready = ms(b.ready_at(id, 1).await - inserted);
    let mut started = f64::NAN;
    if let Some(c) = containers_of(id).await.first() {
        let stamp = docker(["inspect", "--format", "{{.State.StartedAt}}", c]).await;
        let since = engine_time(&stamp).and_then(|t| t.duration_since(wall).ok());
        started = since.map_or(f64::NAN, ms);
    }
    b.delete(id).await;
    (ready, started)
}

// ---------------------------------------------------------------------------
// The report.

struct Results {
    saves: Vec<f64>,
    starts: Timed,
    floors: Timed,
    free: Vec<Create>,
    stuck: Vec<Create>,
    overlapped: usize,
}

impl Results {
    fn print(&self, load_before: &str, load_after: &str) {
        let row = |what: &str, v: &[f64], note: String| {
            let (m, p90, n) = (median(v), percentile(v, 0.9), v.len());
            println!("{what:<38} median {m:>5.0} ms  p90 {p90:>5.0} ms  (n={n}){note}");
        };
        let firsts = |v: &[(f64, f64)]| v.iter().map(|x| x.0).collect::<Vec<_>>();
        let seconds = |v: &[(f64, f64)]| v.iter().map(|x| x.1).collect::<Vec<_>>();
        let cpus = std::thread::available_parallelism().map_or(0, usize::from);
        println!(
            "\nrollouts: save → live ({cpus} CPUs; load average {load_before} at the start, {load_after} at the end)"
        );
        let (floor_run, floor_started) = (firsts(&self.floors), seconds(&self.floors));
        let note = format!(
            "  docker run -d → exit; StartedAt → exit {:.0} ms",
            median(&floor_started)
        );
        row("floor: python -c pass in the image", &floor_run, note);
        let beside =
            |v: &[f64]| format!("  = the floor + {:.0} ms", median(v) - median(&floor_run));
        row(
            "save → answered by new code",
            &self.saves,
            beside(&self.saves),
        );
        let (run, started) = (firsts(&self.starts), seconds(&self.starts));
        let note = format!(
            "{}; docker run -d → ready report; StartedAt → ready {:.0} ms = the floor + {:.0} ms",
            beside(&run),
            median(&started),
            median(&started) - median(&floor_started)
        );
        row("container start → consuming", &run, note);
        let (free, stuck) = (firsts(&self.free), firsts(&self.stuck));
        let started = |v: &[Create]| format!("  insert → started {:.0} ms", median(seconds(v)));
        row("create → running, none stuck", &free, started(&self.free));
        let note = format!(
            "{}; A still in its grace after B: {}/{}",
            started(&self.stuck),
            self.overlapped,
            stuck.len()
        );
        row("create → running, one stuck in grace", &stuck, note);
        let ratio = median(&stuck) / median(&free);
        println!(
            "{:<38} {ratio:.2}",
            "ratio one stuck / none stuck (medians)"
        );
        let rounded = |v: &[f64]| v.iter().map(|x| x.round()).collect::<Vec<_>>();
        println!("samples (ms): saves {:?}", rounded(&self.saves));
        println!("  starts {:?}", rounded(&run));
        println!(
            "  none stuck {:?}; one stuck {:?}",
            rounded(&free),
            rounded(&stuck)
        );
    }
}
