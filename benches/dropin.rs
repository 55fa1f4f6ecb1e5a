//! The drop-in benchmark: rollouts with any image, and taking over from
//! SensorBucket's own controller, under steady traffic.
//!
//! (a) **Five saves in two seconds.** The daemon runs in-process (as in
//! tests/pipeline.rs), host network, on the dockerworker and on the
//! contract-only image (`workerctl/contract-worker`, which behaves as
//! SensorBucket's does: no ready report, no health check, Python as PID 1
//! ignoring SIGTERM, stopping on SIGINT, acknowledging before it publishes).
//! A fresh worker per round; messages are published every 5 ms (200 msg/s)
//! while its code is saved five times, 500 ms apart (versions 1–5). Per
//! round: ms from the newest revision's first answer to the older
//! revisions' last answer (≤ 0: the old code had stopped first), and to the
//! moment one container is left; the peak container count; messages
//! published but never answered. Beside them, the floor of retiring one
//! container: an idle container of the same image, sent the signal the
//! daemon chooses for it, until it has exited (`docker kill -s`, `docker wait`).
//!
//! (b) **Takeover.** A container as SensorBucket's controller leaves it
//! (its name and labels, the contract-only image, code of version 1) serves
//! a worker whose row is at revision 2; traffic as in (a); the daemon
//! starts. Per round: seconds from the daemon's start to the first answer by
//! revision 2, to the last answer by revision 1, and to SensorBucket's
//! container being gone; messages lost. Beside them, the floor: the same
//! daemon starting on a worker that nobody serves yet (start → first answer).
//!
//! Run: `cargo bench --bench dropin` (scripts/bench runs it). Needs Postgres
//! (`DATABASE_URL`), RabbitMQ (`AMQP_URL`), Docker and the images of
//! scripts/build-images. It creates the database `bench_dropin_<random>`
//! and drops it at the end, and removes its containers, queues and exchange.
//! Settings: BENCH_ROUNDS (5), BENCH_TAKEOVERS (3), BENCH_IMAGES (the
//! images of (a): `dockerworker,contract`).

mod common;

use common::{admin_pool, bench_main, load_average, lock, median, ms, progress, setting, sorted};
use std::collections::BTreeSet;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use futures::{FutureExt, StreamExt};
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;
use workerctl::archive::sensorbucket_archive;
use workerctl::config::{Config, Secret};
use workerctl::runtime::docker::DockerRuntime;
use workerctl::store::postgres::PgStore;

const WORKER_IMAGE: &str = "workerctl/dockerworker:latest";
const CONTRACT_IMAGE: &str = "workerctl/contract-worker:latest";
/// Labels the benchmark's own `docker run` containers, for the clean-up.
const BENCH_LABEL: &str = "workerctl-bench.dropin";
const PUBLISH_EVERY: Duration = Duration::from_millis(5);
const SAVE_EVERY: Duration = Duration::from_millis(500);
const DEADLINE: Duration = Duration::from_secs(120);

fn main() -> ExitCode {
    bench_main("dropin", run)
}

async fn run() -> ExitCode {
    let load_before = load_average();
    let b = Arc::new(Bench::set_up().await);
    let body = b.clone();
    // Not spawned: the clean-up runs after a panicking measurement too.
    let outcome = std::panic::AssertUnwindSafe(async move {
        let mut rapid = Vec::new();
        let images: String = setting("BENCH_IMAGES", "dockerworker,contract".into());
        for (name, image, code) in [
            (
                "dockerworker",
                WORKER_IMAGE,
                attr_versioned as fn(usize) -> String,
            ),
            ("contract", CONTRACT_IMAGE, dict_versioned),
        ] {
            if images.split(',').any(|i| i == name) {
                rapid.push((image, rapid_saves(&body, image, code).await));
            }
        }
        let takeovers = takeovers(&body).await;
        (rapid, takeovers)
    })
    .catch_unwind()
    .await;
    b.clean_up().await;
    match outcome {
        Ok((rapid, takeovers)) => {
            print(&rapid, &takeovers, &load_before, &load_average());
            ExitCode::SUCCESS
        }
        Err(panic) => {
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
            eprintln!("bench: FAILED: {}", why.unwrap_or_default());
            ExitCode::FAILURE
        }
    }
}

/// Milliseconds from `from` to `to`, negative if `to` came first.
fn signed_ms(from: Instant, to: Instant) -> f64 {
    if to >= from {
        ms(to - from)
    } else {
        -ms(from - to)
    }
}

fn attr_versioned(v: usize) -> String {
    format!("def process(msg):\n    msg.metadata[\"version\"] = {v}\n    return msg\n")
}

/// SensorBucket's image hands `process` a dict.
fn dict_versioned(v: usize) -> String {
    format!("def process(msg):\n    msg[\"metadata\"][\"version\"] = {v}\n    return msg\n")
}

// ---------------------------------------------------------------------------
// Services: the throwaway database, the broker side, daemons, docker.

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
    queues: Mutex<Vec<String>>,
    instances: Mutex<Vec<String>>,
}

/// A daemon of the benchmark: what stops it.
struct Daemon(CancellationToken, TaskTracker);

impl Daemon {
    async fn stop(self) {
        self.0.cancel();
        self.1.wait().await;
    }
}

impl Bench {
    async fn set_up() -> Bench {
        let tag = Uuid::new_v4().simple().to_string();
        let amqp_url = std::env::var("AMQP_URL")
            .unwrap_or_else(|_| "amqp://workerctl:workerctl@127.0.0.1:5672/%2f".into());
        let amqp = Connection::connect(&amqp_url, ConnectionProperties::default())
            .await
            .expect("RabbitMQ answers at AMQP_URL (run scripts/services)");
        let exchange = format!("pipeline.messages.bench-{tag}");
        let channel = amqp.create_channel().await.expect("channel");
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        let declared = channel.exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        );
        declared.await.expect("declare the bench exchange");
        let admin_url = std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://workerctl:workerctl@127.0.0.1:5432/workerctl".into());
        let db_name = format!("bench_dropin_{}", &tag[..12]);
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
            instances: Mutex::default(),
        }
    }

    async fn clean_up(&self) {
        self.shutdown.cancel();
        let instances = lock(&self.instances).clone();
        let mut filters: Vec<String> = instances
            .iter()
            .map(|i| format!("label=workerctl.instance={i}"))
            .collect();
        filters.push(format!("label={BENCH_LABEL}={}", self.tag));
        for filter in filters {
            let ids = docker_cli(["ps", "-aq", "--filter", &filter]).await;
            for id in ids.unwrap_or_default().split_whitespace() {
                let _ = docker_cli(["rm", "-f", id]).await;
            }
        }
        if let Ok(channel) = self.amqp.create_channel().await {
            let queues = lock(&self.queues).clone();
            for q in queues {
                let _ = channel
                    .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
            let exchange = self.exchange.as_str().into();
            let _ = channel
                .exchange_delete(exchange, ExchangeDeleteOptions::default())
                .await;
        }
        let _ = self.amqp.close(200, "bench done".into()).await;
        self.pool.close().await;
        let admin = admin_pool(&self.admin_url).await;
        let sql = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.db_name);
        if let Err(e) = sqlx::query(&sql).execute(&admin).await {
            eprintln!("bench: cannot drop database {}: {e}", self.db_name);
        }
    }

    /// The daemon as `workerctl run` assembles it, on `image`, host network.
    async fn daemon(&self, image: &str) -> Daemon {
        let instance = format!("dropin{}{}", &self.tag[..8], lock(&self.instances).len());
        lock(&self.instances).push(instance.clone());
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
        let addr = listener.local_addr().expect("address");
        config.code_server.public_url = format!("http://{addr}");
        config.amqp.url = Secret::new(self.amqp_url.clone());
        config.amqp.exchange = self.exchange.clone();
        let store = Arc::new(PgStore::connect(&self.db_url).expect("database URL parses"));
        let runtime = Arc::new(DockerRuntime::connect(&instance).await.expect("Docker"));
        let (shutdown, tracker) = (self.shutdown.child_token(), TaskTracker::new());
        workerctl::daemon::Daemon::new(config, store, runtime)
            .spawn(listener, &tracker, &shutdown)
            .expect("the daemon starts");
        tracker.close();
        Daemon(shutdown, tracker)
    }

    /// Inserts an enabled worker at `revision`; returns its id.
    async fn insert(&self, code: &str, revision: i32) -> Uuid {
        let id = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO user_workers (id, name, description, state, language, tenant_id, revision, status, status_info, source, entrypoint)
             VALUES ($1, 'bench', '', 'enabled', 'python', 1, $2, 'unknown', '', $3, 'main.main')",
        )
        .bind(id)
        .bind(revision)
        .bind(sensorbucket_archive(code).expect("archive builds"))
        .execute(&self.pool)
        .await
        .expect("insert worker");
        lock(&self.queues).extend([format!("worker_{id}"), format!("worker_{id}.retry")]);
        id
    }

    async fn save(&self, id: Uuid, code: &str) {
        sqlx::query("UPDATE user_workers SET source = $1, revision = revision + 1 WHERE id = $2")
            .bind(sensorbucket_archive(code).expect("archive builds"))
            .bind(id)
            .execute(&self.pool)
            .await
            .expect("save code");
    }

    async fn delete(&self, id: Uuid) {
        sqlx::query("DELETE FROM user_workers WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await
            .expect("delete worker");
        until("the worker's containers to go", async || {
            containers_of(id).await.is_empty().then_some(())
        })
        .await;
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

    /// Records every answer on the next step's queue: when, which version,
    /// which message.
    async fn answers(&self) -> (Arc<Mutex<Vec<Answer>>>, tokio::task::JoinHandle<()>) {
        let channel = self.amqp.create_channel().await.expect("channel");
        let queue = format!("{}.next", self.exchange);
        let declared = channel.queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        );
        declared.await.expect("declare the next queue");
        let bound = channel.queue_bind(
            queue.as_str().into(),
            self.exchange.as_str().into(),
            self.next_key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        );
        bound.await.expect("bind the next queue");
        let no_ack = BasicConsumeOptions {
            no_ack: true,
            ..BasicConsumeOptions::default()
        };
        let mut consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                no_ack,
                FieldTable::default(),
            )
            .await
            .expect("consume the next queue");
        let answers = Arc::new(Mutex::new(Vec::new()));
        let into = answers.clone();
        let task = tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                let body: Value = serde_json::from_slice(&delivery.data).unwrap_or_default();
                let id = delivery.properties.message_id().as_ref();
                lock(&into).push(Answer {
                    at: Instant::now(),
                    version: body["metadata"]["version"].as_u64().unwrap_or(0),
                    message: id.map(|s| s.to_string()).unwrap_or_default(),
                });
            }
        });
        (answers, task)
    }
}

struct Answer {
    at: Instant,
    version: u64,
    message: String,
}

/// Publishes every [`PUBLISH_EVERY`] until `stop`; returns how many.
async fn publish_every(ch: &Channel, b: &Bench, worker: Uuid, stop: CancellationToken) -> usize {
    let (key, body) = (worker.to_string(), b.message(worker));
    let mut tick = tokio::time::interval(PUBLISH_EVERY);
    for n in 0usize.. {
        tokio::select! {
            _ = stop.cancelled() => return n,
            _ = tick.tick() => {}
        }
        let properties = BasicProperties::default()
            .with_message_id(format!("{worker}-{n}").into())
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        let sent = ch.basic_publish(
            b.exchange.as_str().into(),
            key.as_str().into(),
            BasicPublishOptions::default(),
            &body,
            properties,
        );
        if let Err(e) = sent.await {
            eprintln!("bench: publish failed: {e}");
            return n;
        }
    }
    0
}

async fn docker_cli<I: IntoIterator<Item = S>, S: AsRef<std::ffi::OsStr>>(
    args: I,
) -> Result<String, String> {
    match Command::new("docker").args(args).output().await {
        Ok(out) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout).into()),
        Ok(out) => Err(String::from_utf8_lossy(&out.stderr).into()),
        Err(e) => Err(format!("the docker CLI does not run: {e}")),
    }
}

async fn docker<I: IntoIterator<Item = S>, S: AsRef<std::ffi::OsStr>>(args: I) -> String {
    docker_cli(args)
        .await
        .unwrap_or_else(|e| panic!("docker: {e}"))
}

/// Every container of the worker, workerctl's and SensorBucket-labelled.
async fn containers_of(id: Uuid) -> Vec<String> {
    let mut all = Vec::new();
    for label in [
        format!("workerctl.worker-id={id}"),
        format!("worker-id={id}"),
    ] {
        let out = docker(["ps", "-aq", "--filter", &format!("label={label}")]).await;
        all.extend(out.split_whitespace().map(String::from));
    }
    all
}

/// Polls `check` every 20 ms until it holds; panics after [`DEADLINE`].
async fn until<T>(what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `answers` holds one of `version`; returns when it arrived.
/// The first answer by `version` to a message for `worker` (the answers
/// queue may still hold another round's).
async fn first_answer(answers: &Mutex<Vec<Answer>>, worker: Uuid, version: u64) -> Instant {
    let prefix = worker.to_string();
    until(&format!("an answer by version {version}"), async || {
        lock(answers)
            .iter()
            .find(|a| a.version == version && a.message.starts_with(&prefix))
            .map(|a| a.at)
    })
    .await
}

// ---------------------------------------------------------------------------
// (a) Five saves in two seconds.

struct Rapid {
    /// Newest revision's first answer → older revisions' last answer.
    old_after_new_ms: Vec<f64>,
    /// Newest revision's first answer → one container left.
    to_one_ms: Vec<f64>,
    peak: Vec<usize>,
    lost: Vec<usize>,
    /// Signal → exited, an idle container of the image.
    floor_ms: Vec<f64>,
}

async fn rapid_saves(b: &Bench, image: &str, code: fn(usize) -> String) -> Rapid {
    let rounds = setting("BENCH_ROUNDS", 5);
    let daemon = b.daemon(image).await;
    let publisher = b.amqp.create_channel().await.expect("channel");
    let mut out = Rapid {
        old_after_new_ms: vec![],
        to_one_ms: vec![],
        peak: vec![],
        lost: vec![],
        floor_ms: vec![],
    };
    for round in 0..rounds {
        let (answers, collector) = b.answers().await;
        let id = b.insert(&code(0), 1).await;
        first_answer_of(b, &publisher, id, &answers, 0).await;
        let stop = CancellationToken::new();
        let publishing = publish_every(&publisher, b, id, stop.clone());
        let watched = Arc::new(Mutex::new(Vec::new()));
        let watching = watch_containers(id, watched.clone(), stop.clone());
        let saving = async {
            for v in 1..=5 {
                b.save(id, &code(v)).await;
                tokio::time::sleep(SAVE_EVERY).await;
            }
            let newest = first_answer(&answers, id, 5).await;
            until("one container left", async || {
                (containers_of(id).await.len() == 1).then_some(())
            })
            .await;
            // A second more of traffic, all of it for the newest code.
            tokio::time::sleep(Duration::from_secs(1)).await;
            stop.cancel();
            newest
        };
        let (published, (), newest) = tokio::join!(publishing, watching, saving);
        // What is still on its way comes out now.
        let quiet = Duration::from_secs(3);
        until("the answers to settle", async || {
            let last = lock(&answers).last().map(|a| a.at);
            last.is_none_or(|t| t.elapsed() > quiet).then_some(())
        })
        .await;
        collector.abort();
        let answers = std::mem::take(&mut *lock(&answers));
        let last_old = answers.iter().filter(|a| a.version < 5).map(|a| a.at).max();
        let answered: BTreeSet<&str> = answers
            .iter()
            .filter(|a| a.message.starts_with(&id.to_string()))
            .map(|a| a.message.as_str())
            .collect();
        let watched = std::mem::take(&mut *lock(&watched));
        let one_from = watched
            .iter()
            .rev()
            .take_while(|(_, n)| *n <= 1)
            .last()
            .map(|(t, _)| *t);
        out.old_after_new_ms
            .push(last_old.map_or(f64::NAN, |t| signed_ms(newest, t)));
        out.to_one_ms
            .push(one_from.map_or(f64::NAN, |t| signed_ms(newest, t)));
        out.peak
            .push(watched.iter().map(|(_, n)| *n).max().unwrap_or(0));
        out.lost.push(published.saturating_sub(answered.len()));
        progress(format_args!(
            "(a) {image} round {}/{rounds}: old after new {:.0} ms, one left {:.0} ms, peak {}, lost {}",
            round + 1,
            out.old_after_new_ms[round],
            out.to_one_ms[round],
            out.peak[round],
            out.lost[round]
        ));
        b.delete(id).await;
        out.floor_ms.push(retire_floor(b, image).await);
    }
    let _ = publisher.close(200, "done".into()).await;
    daemon.stop().await;
    out
}

/// Publishes until version `v` answers once (the worker consumes).
async fn first_answer_of(
    b: &Bench,
    publisher: &Channel,
    id: Uuid,
    answers: &Mutex<Vec<Answer>>,
    v: u64,
) {
    let stop = CancellationToken::new();
    let publishing = publish_every(publisher, b, id, stop.clone());
    let answered = async {
        first_answer(answers, id, v).await;
        stop.cancel();
    };
    tokio::join!(publishing, answered);
}

/// Samples how many containers the worker has every 20 ms until `stop`.
async fn watch_containers(
    id: Uuid,
    into: Arc<Mutex<Vec<(Instant, usize)>>>,
    stop: CancellationToken,
) {
    while !stop.is_cancelled() {
        let n = containers_of(id).await.len();
        lock(&into).push((Instant::now(), n));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// ms from sending an idle container of `image` the signal the daemon
/// would choose for it (SIGTERM for the dockerworker, through its tini;
/// SIGINT for the contract-only image, Python as PID 1) until it exited.
async fn retire_floor(b: &Bench, image: &str) -> f64 {
    let label = format!("{BENCH_LABEL}={}", b.tag);
    let sleep = "import time; time.sleep(600)";
    let mut args = vec!["run", "-d", "--network", "none", "--label", &label];
    let signal = if image == WORKER_IMAGE {
        args.extend(["--entrypoint", "tini", image, "--", "python", "-c", sleep]);
        "SIGTERM"
    } else {
        args.extend(["--entrypoint", "python", image, "-c", sleep]);
        "SIGINT"
    };
    let id = docker(args).await;
    let id = id.trim();
    // Python has started once it sleeps; half a second is ample for an idle one.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let start = Instant::now();
    docker(["kill", "-s", signal, id]).await;
    docker(["wait", id]).await;
    let took = ms(start.elapsed());
    let _ = docker_cli(["rm", "-f", id]).await;
    took
}

// ---------------------------------------------------------------------------
// (b) Takeover.

struct Takeover {
    first_new_s: Vec<f64>,
    last_old_s: Vec<f64>,
    gone_s: Vec<f64>,
    lost: Vec<usize>,
    /// Daemon start → first answer, on a worker nobody served before.
    floor_s: Vec<f64>,
}

async fn takeovers(b: &Bench) -> Takeover {
    let rounds = setting("BENCH_TAKEOVERS", 3);
    let mut out = Takeover {
        first_new_s: vec![],
        last_old_s: vec![],
        gone_s: vec![],
        lost: vec![],
        floor_s: vec![],
    };
    let code_url = serve_code(&dict_versioned(1)).await;
    let publisher = b.amqp.create_channel().await.expect("channel");
    for round in 0..rounds {
        let (answers, collector) = b.answers().await;
        let id = b.insert(&attr_versioned(2), 2).await;
        let theirs = sensorbucket_container(b, id, &code_url).await;
        first_answer_of(b, &publisher, id, &answers, 1).await;
        let stop = CancellationToken::new();
        let publishing = publish_every(&publisher, b, id, stop.clone());
        let started = Instant::now();
        let daemon = b.daemon(WORKER_IMAGE).await;
        let taking_over = async {
            let first_new = first_answer(&answers, id, 2).await;
            until("SensorBucket's container to go", async || {
                docker_cli(["inspect", &theirs])
                    .await
                    .is_err()
                    .then_some(())
            })
            .await;
            let gone = Instant::now();
            tokio::time::sleep(Duration::from_secs(1)).await;
            stop.cancel();
            (first_new, gone)
        };
        let (published, (first_new, gone)) = tokio::join!(publishing, taking_over);
        tokio::time::sleep(Duration::from_secs(3)).await;
        collector.abort();
        let answers = std::mem::take(&mut *lock(&answers));
        let last_old = answers
            .iter()
            .filter(|a| a.version == 1 && a.at >= started)
            .map(|a| a.at)
            .max();
        let answered: BTreeSet<&str> = answers
            .iter()
            .filter(|a| a.message.starts_with(&id.to_string()))
            .map(|a| a.message.as_str())
            .collect();
        let secs = |t: Instant| t.duration_since(started).as_secs_f64();
        out.first_new_s.push(secs(first_new));
        out.last_old_s.push(last_old.map_or(f64::NAN, secs));
        out.gone_s.push(secs(gone));
        out.lost.push(published.saturating_sub(answered.len()));
        progress(format_args!(
            "(b) takeover {}/{rounds}: first new {:.2} s, last old {:.2} s, theirs gone {:.2} s, lost {}",
            round + 1,
            out.first_new_s[round],
            out.last_old_s[round],
            out.gone_s[round],
            out.lost[round]
        ));
        b.delete(id).await;
        daemon.stop().await;
        out.floor_s
            .push(daemon_start_to_first_answer(b, &publisher).await);
    }
    out
}

/// The floor of a takeover: the daemon starting on a worker nobody serves
/// yet, until its first answer.
async fn daemon_start_to_first_answer(b: &Bench, publisher: &Channel) -> f64 {
    let (answers, collector) = b.answers().await;
    let id = b.insert(&attr_versioned(2), 2).await;
    let started = Instant::now();
    let daemon = b.daemon(WORKER_IMAGE).await;
    first_answer_of(b, publisher, id, &answers, 2).await;
    let took = started.elapsed().as_secs_f64();
    collector.abort();
    b.delete(id).await;
    daemon.stop().await;
    took
}

/// Serves `{"data": <base64 archive>}` on any path, as SensorBucket's code
/// endpoint does; returns the URL.
async fn serve_code(usercode: &str) -> String {
    let archive = sensorbucket_archive(usercode).expect("archive builds");
    let data = base64::engine::general_purpose::STANDARD.encode(archive);
    let body = json!({"message": "Fetched worker source", "data": data});
    let app = axum::Router::new().fallback(move || {
        let body = body.clone();
        async move { axum::Json(body) }
    });
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .expect("bind a free port");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/code")
}

/// A container as SensorBucket's controller leaves it, serving `id`.
async fn sensorbucket_container(b: &Bench, id: Uuid, code_url: &str) -> String {
    let (name, bench) = (format!("worker-{id}"), format!("{BENCH_LABEL}={}", b.tag));
    let (worker_id, revision) = (format!("worker-id={id}"), "worker-revision=1".to_string());
    let env = [
        format!("WORKER_ID={id}"),
        format!("AMQP_HOST={}", b.amqp_url),
        format!("AMQP_XCHG={}", b.exchange),
        format!("CODE_URL={code_url}"),
        "CODE_ENTRYPOINT=main.main".into(),
    ];
    let mut args: Vec<&str> = vec!["run", "-d", "-t", "--network", "host", "--name", &name];
    for label in ["controlled-by=sensorbucket", &worker_id, &revision, &bench] {
        args.extend(["--label", label]);
    }
    for e in &env {
        args.extend(["-e", e]);
    }
    args.push(CONTRACT_IMAGE);
    docker(args).await.trim().to_string()
}

// ---------------------------------------------------------------------------
// The report.

fn spread(values: &[f64]) -> String {
    let v = sorted(values);
    match (v.first(), v.last()) {
        (Some(lo), Some(hi)) => format!("{lo:.0}…{hi:.0}"),
        _ => "-".into(),
    }
}

fn print(rapid: &[(&str, Rapid)], t: &Takeover, load_before: &str, load_after: &str) {
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    println!(
        "\ndrop-in: five saves in 2 s under 200 msg/s, and takeover ({cpus} CPUs; load average {load_before} at the start, {load_after} at the end)"
    );
    for (image, r) in rapid {
        let n = r.to_one_ms.len();
        println!("{image} (n={n}):");
        println!(
            "  newest's first answer → older revisions' last answer  median {:>6.0} ms  (spread {} ms; target ≤ 1000)",
            median(&r.old_after_new_ms),
            spread(&r.old_after_new_ms)
        );
        println!(
            "  newest's first answer → one container left            median {:>6.0} ms  (spread {} ms; target ≤ 8000)  floor: one idle container signal → exited {:.0} ms",
            median(&r.to_one_ms),
            spread(&r.to_one_ms),
            median(&r.floor_ms)
        );
        println!(
            "  containers at the peak {:?}; messages unanswered {:?}",
            r.peak, r.lost
        );
    }
    let s = |v: &[f64]| v.iter().map(|x| x * 1e3).collect::<Vec<_>>();
    println!(
        "takeover from SensorBucket's controller (n={}):",
        t.gone_s.len()
    );
    println!(
        "  daemon start → first answer by the current revision    median {:>6.0} ms  (spread {} ms)  floor: daemon start → first answer, nobody serving {:.0} ms",
        median(s(&t.first_new_s)),
        spread(&s(&t.first_new_s)),
        median(s(&t.floor_s))
    );
    println!(
        "  daemon start → last answer by SensorBucket's container median {:>6.0} ms  (spread {} ms)",
        median(s(&t.last_old_s)),
        spread(&s(&t.last_old_s))
    );
    println!(
        "  daemon start → SensorBucket's container gone           median {:>6.0} ms  (spread {} ms)",
        median(s(&t.gone_s)),
        spread(&s(&t.gone_s))
    );
    println!("  messages unanswered {:?}", t.lost);
}
