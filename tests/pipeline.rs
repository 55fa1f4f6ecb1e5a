//! The whole pipeline end to end, on real services and without mocks: the
//! daemon (control loop, Postgres listener, Docker events and the HTTP code
//! server) runs in-process on a fresh database (`#[sqlx::test]`), starts the
//! real `workerctl/dockerworker:latest` image on the host network, and the
//! container downloads its code from the daemon and processes pipeline
//! messages from RabbitMQ. The test publishes and consumes with `lapin`.
//!
//! Each test has its own workerctl instance and its own exchange
//! (`pipeline.messages.test-<uuid>`), so tests never see each other's
//! containers or messages; it removes its containers, queues and exchange at
//! the end, whether it passed or not.
//!
//! Without Postgres, RabbitMQ (AMQP_URL, default the one `scripts/services`
//! provides), Docker or the worker image (`scripts/build-images`) these tests
//! fail; they never skip.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use futures::{FutureExt, StreamExt};
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer, ExchangeKind};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;
use workerctl::archive::sensorbucket_archive;
use workerctl::config::{Config, Secret};
use workerctl::daemon::Daemon;
use workerctl::model::{ManagedContainer, Owner, Revision, RunState, WorkerId};
use workerctl::runtime::docker::DockerRuntime;
use workerctl::runtime::{ContainerRuntime, ServiceRuntime};
use workerctl::store::postgres::PgStore;

use common::swarm::TestSwarm;
use common::{amqp_url, worker_image};
use workerctl::model::Rollout;
use workerctl::runtime::swarm::SwarmRuntime;

/// Generous: a worker container starts a Python interpreter and downloads
/// its code before it consumes; a loaded CI host can take a while.
const DEADLINE: Duration = Duration::from_secs(120);

fn now_ms() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    since.as_millis() as i64
}

/// The daemon of one test, the worker's code server, and the test's own side
/// of the broker: an exchange, a queue on the next step and one on `errors`.
struct Pipeline {
    /// The image workers run on.
    image: &'static str,
    pool: PgPool,
    runtime: Arc<DockerRuntime>,
    instance: String,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    amqp: Connection,
    publisher: Channel,
    exchange: String,
    next_key: String,
    next_queue: String,
    errors_queue: String,
    next: Consumer,
    errors: Consumer,
    workers: Vec<WorkerId>,
    /// Set on the Swarm backend: the test's own single-node swarm (left
    /// when the pipeline is dropped) and the daemon's manager client.
    swarm: Option<(TestSwarm, Arc<SwarmRuntime>)>,
    /// Changes to the daemon's configuration this test makes.
    configure: fn(&mut Config),
}

impl Pipeline {
    async fn start(pool: PgPool, image: &'static str, on_swarm: bool) -> Pipeline {
        let mut pipeline = Self::prepare(pool, image, on_swarm, |_| {}).await;
        pipeline.start_daemon().await;
        pipeline
    }

    /// A pipeline whose daemon is not started yet, with `configure` applied
    /// to its configuration.
    async fn start_idle(pool: PgPool, image: &'static str, configure: fn(&mut Config)) -> Pipeline {
        Self::prepare(pool, image, false, configure).await
    }

    async fn prepare(
        pool: PgPool,
        image: &'static str,
        on_swarm: bool,
        configure: fn(&mut Config),
    ) -> Pipeline {
        let tag = Uuid::new_v4().simple().to_string();
        let exchange = format!("pipeline.messages.test-{tag}");
        let next_key = format!("storage-{tag}");
        // Postgres and Docker first: nothing on the broker to clean up if they fail.
        let instance = format!("p{}", &tag[..12]);
        PgStore::from_pool(pool.clone())
            .migrate()
            .await
            .expect("migrations apply");
        let runtime = Arc::new(
            DockerRuntime::connect(&instance)
                .await
                .expect("Docker answers"),
        );

        let amqp = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .expect("RabbitMQ answers (run scripts/services)");
        let publisher = amqp.create_channel().await.expect("channel");
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("publisher confirms");
        declare_exchange(&publisher, &exchange).await;
        let next_queue = format!("{exchange}.next");
        let errors_queue = format!("{exchange}.errors");
        let next = bound_consumer(&amqp, &exchange, &next_queue, &next_key).await;
        let errors = bound_consumer(&amqp, &exchange, &errors_queue, "errors").await;
        let mut pipeline = Pipeline {
            image,
            pool,
            runtime,
            instance,
            shutdown: CancellationToken::new(),
            tasks: vec![],
            amqp,
            publisher,
            exchange,
            next_key,
            next_queue,
            errors_queue,
            next,
            errors,
            workers: vec![],
            swarm: None,
            configure,
        };
        if on_swarm {
            let mut turn = TestSwarm::take_turn();
            turn.init();
            let options = pipeline.config(String::new()).swarm_options();
            let manager = SwarmRuntime::connect(&pipeline.instance, options)
                .await
                .expect("the test swarm's manager answers");
            pipeline.swarm = Some((turn, Arc::new(manager)));
        }
        pipeline
    }

    async fn start_daemon(&mut self) {
        self.spawn_daemon(Arc::new(PgStore::from_pool(self.pool.clone())))
            .await;
    }

    /// The daemon as `workerctl run` assembles it, serving HTTP on a free
    /// port of 127.0.0.1, which containers on the host network reach as it is.
    async fn spawn_daemon(&mut self, store: Arc<PgStore>) {
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("bind a free port");
        let addr = listener.local_addr().expect("local address");
        let mut config = self.config(format!("http://{addr}"));
        config.database_url = Secret::new(self.database_url());
        let tracker = TaskTracker::new();
        let daemon = Daemon::new(config, store, self.runtime.clone());
        let daemon = match &self.swarm {
            Some((_, manager)) => daemon.on_swarm(manager.clone()),
            None => daemon,
        };
        daemon
            .spawn(listener, &tracker, &self.shutdown)
            .expect("the daemon starts");
        tracker.close();
        self.tasks
            .push(tokio::spawn(async move { tracker.wait().await }));
    }

    fn config(&self, public_url: String) -> Config {
        let mut config = Config {
            instance: self.instance.clone(),
            ..Config::default()
        };
        config.docker.image = self.image.into();
        config.docker.network = "host".into();
        config.docker.stop_timeout = Duration::from_secs(10);
        config.reconcile.backoff_initial = Duration::from_millis(200);
        config.reconcile.backoff_max = Duration::from_secs(2);
        // Far beyond any deadline: changes must arrive by notification or
        // Docker event, never by the resync.
        config.reconcile.interval = Duration::from_secs(3600);
        config.code_server.public_url = public_url;
        config.amqp.url = Secret::new(amqp_url());
        config.amqp.exchange = self.exchange.clone();
        config.swarm.update_monitor = Duration::from_secs(3);
        (self.configure)(&mut config);
        config
    }

    fn database_url(&self) -> String {
        common::database_url(&self.pool)
    }

    /// Runs `body` against a started pipeline, then cleans up even if it
    /// panicked, and passes the panic on.
    async fn run(pool: PgPool, body: impl AsyncFnOnce(&mut Pipeline)) {
        // Before anything is created that would need cleaning up.
        Self::run_on(pool, worker_image(), body).await
    }

    /// [`run`](Self::run) with workers on `image`.
    async fn run_on(pool: PgPool, image: &'static str, body: impl AsyncFnOnce(&mut Pipeline)) {
        Self::run_with(Pipeline::start(pool, image, false).await, body).await
    }

    /// [`run`](Self::run) on the Swarm backend, on a single-node swarm the
    /// test makes (and leaves at the end).
    async fn run_on_swarm(pool: PgPool, body: impl AsyncFnOnce(&mut Pipeline)) {
        Self::run_with(Pipeline::start(pool, worker_image(), true).await, body).await
    }

    /// [`run`](Self::run) with the daemon started by `body` itself
    /// ([`start_daemon`](Self::start_daemon)), after it set the scene.
    async fn run_before_daemon(
        pool: PgPool,
        image: &'static str,
        configure: fn(&mut Config),
        body: impl AsyncFnOnce(&mut Pipeline),
    ) {
        Self::run_with(Pipeline::start_idle(pool, image, configure).await, body).await
    }

    async fn run_with(mut pipeline: Pipeline, body: impl AsyncFnOnce(&mut Pipeline)) {
        let outcome = AssertUnwindSafe(body(&mut pipeline)).catch_unwind().await;
        pipeline.cleanup().await;
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    }

    /// Stops the daemon, removes this instance's containers, the worker
    /// queues, the test's queues and its exchange.
    async fn cleanup(mut self) {
        self.shutdown.cancel();
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
        if let Some((_, manager)) = &self.swarm {
            for s in manager.list().await.unwrap_or_default() {
                let _ = manager.remove(&s.id).await;
            }
        }
        // Only this instance's containers, and SensorBucket-labelled ones
        // of this test's workers: never another test's.
        for c in self.runtime.list().await.unwrap_or_default() {
            let mine = c.owner == Owner::Workerctl
                || c.worker_id.is_some_and(|id| self.workers.contains(&id));
            if mine {
                let _ = Command::new("docker").args(["rm", "-f", &c.id]).output();
            }
        }
        let channel = self.amqp.create_channel().await.expect("channel");
        let mut queues = vec![self.next_queue.clone(), self.errors_queue.clone()];
        for id in &self.workers {
            queues.push(format!("worker_{id}"));
            queues.push(format!("worker_{id}.retry"));
        }
        for queue in queues {
            let _ = channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = channel
            .exchange_delete(
                self.exchange.as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await;
        let _ = self.amqp.close(200, "test done".into()).await;
    }

    // -- the worker store ------------------------------------------------------

    async fn enabled_worker(&mut self, name: &str, usercode: &str) -> WorkerId {
        let id = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO user_workers (id, name, description, state, language, tenant_id, revision, status, status_info, source, entrypoint)
             VALUES ($1, $2, '', 'enabled', 'python', 1, 1, 'unknown', '', $3, 'main.main')",
        )
        .bind(id)
        .bind(name)
        .bind(archive(usercode))
        .execute(&self.pool)
        .await
        .expect("insert worker");
        self.workers.push(WorkerId(id));
        WorkerId(id)
    }

    /// Saves new code the way the dashboard does.
    async fn save_code(&self, id: WorkerId, usercode: &str) {
        sqlx::query("UPDATE user_workers SET source = $1, revision = revision + 1 WHERE id = $2")
            .bind(archive(usercode))
            .bind(id.0)
            .execute(&self.pool)
            .await
            .expect("update worker code");
    }

    async fn restarts(&self, id: WorkerId) -> i32 {
        let row: Option<(i32,)> =
            sqlx::query_as("SELECT restarts FROM workerctl_observed WHERE worker_id = $1")
                .bind(id.0)
                .fetch_optional(&self.pool)
                .await
                .expect("read workerctl_observed");
        row.map_or(0, |(n,)| n)
    }

    // -- containers ------------------------------------------------------------

    async fn containers_of(&self, id: WorkerId) -> Vec<ManagedContainer> {
        let all = self.runtime.list().await.expect("list containers");
        all.into_iter()
            .filter(|c| c.worker_id == Some(id))
            .collect()
    }

    /// Waits until the worker has one running container at `revision` and
    /// its consumer is attached to the worker's queue.
    async fn consuming_at(&self, id: WorkerId, revision: i32) -> ManagedContainer {
        let c = wait_for(
            &format!("worker {id} running revision {revision}"),
            async || match self.containers_of(id).await.as_slice() {
                [c] if c.state == RunState::Running && c.revision == Some(Revision(revision)) => {
                    Some(c.clone())
                }
                _ => None,
            },
        )
        .await;
        let queue = format!("worker_{id}");
        wait_for(&format!("a consumer on {queue}"), async || {
            (self.consumers_on(&queue).await? > 0).then_some(())
        })
        .await;
        c
    }

    /// How many consumers the queue has, or None while it does not exist.
    async fn consumers_on(&self, queue: &str) -> Option<u32> {
        // A passive declare of a missing queue closes its channel: use a fresh one.
        let channel = self.amqp.create_channel().await.ok()?;
        let options = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let declared = channel
            .queue_declare(queue.into(), options, FieldTable::default())
            .await;
        let _ = channel.close(200, "checked".into()).await;
        declared.ok().map(|q| q.consumer_count())
    }

    // -- messages --------------------------------------------------------------

    /// A pipeline message with every docs/compatibility.md §4 field, for `worker` then the
    /// test's next step.
    fn message(&self, worker: WorkerId, n: usize) -> Value {
        let now = now_ms();
        json!({
            "tracing_id": Uuid::new_v4().to_string(),
            "tenant_id": 1,
            "access_token": "test-access-token",
            "received_at": now,
            "pipeline_id": Uuid::new_v4().to_string(),
            "step_index": 0,
            "pipeline_steps": [worker.to_string(), self.next_key],
            "timestamp": now,
            "payload": base64::engine::general_purpose::STANDARD.encode(format!("reading {n}")),
            "metadata": {"n": n},
        })
    }

    /// Publishes `body` with routing key `worker` and waits for the broker's confirm.
    async fn publish(&self, worker: WorkerId, message_id: &str, body: &Value) {
        let properties = BasicProperties::default()
            .with_message_id(message_id.into())
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let confirm = self
            .publisher
            .basic_publish(
                self.exchange.as_str().into(),
                worker.to_string().as_str().into(),
                options,
                &serde_json::to_vec(body).expect("json"),
                properties,
            )
            .await
            .expect("publish")
            .await
            .expect("publisher confirm");
        assert!(confirm.is_ack(), "the broker refused the publish");
        assert!(
            confirm.take_message().is_none(),
            "the message was unroutable: no queue bound to {worker}"
        );
    }

    /// The next message on the next step's queue, within `wait`.
    async fn next_within(&mut self, wait: Duration) -> Option<Received> {
        receive(&mut self.next, wait).await
    }

    async fn next_message(&mut self) -> Received {
        let next = self.next_queue.clone();
        self.next_within(DEADLINE)
            .await
            .unwrap_or_else(|| panic!("no message on {next} within {DEADLINE:?}"))
    }

    async fn error_message(&mut self) -> Received {
        let errors = self.errors_queue.clone();
        receive(&mut self.errors, DEADLINE)
            .await
            .unwrap_or_else(|| panic!("no message on {errors} within {DEADLINE:?}"))
    }
}

/// One message the test consumed.
struct Received {
    message_id: Option<String>,
    timestamp_header: Option<i64>,
    body: Value,
}

async fn declare_exchange(channel: &Channel, exchange: &str) {
    // Exactly as the dockerworker declares it, or one of the two is refused.
    let options = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            options,
            FieldTable::default(),
        )
        .await
        .expect("declare the test exchange");
}

/// Declares `queue`, binds it to `exchange` on `routing_key` and consumes it.
async fn bound_consumer(
    amqp: &Connection,
    exchange: &str,
    queue: &str,
    routing_key: &str,
) -> Consumer {
    let channel = amqp.create_channel().await.expect("channel");
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("declare a test queue");
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            routing_key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind a test queue");
    let options = BasicConsumeOptions {
        no_ack: true,
        ..BasicConsumeOptions::default()
    };
    channel
        .basic_consume(queue.into(), "".into(), options, FieldTable::default())
        .await
        .expect("consume a test queue")
}

async fn receive(consumer: &mut Consumer, wait: Duration) -> Option<Received> {
    let delivery = match tokio::time::timeout(wait, consumer.next()).await {
        Err(_elapsed) => return None,
        Ok(None) => panic!("the test consumer was cancelled"),
        Ok(Some(delivery)) => delivery.expect("a delivery"),
    };
    let properties = &delivery.properties;
    let timestamp_header = properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("timestamp"))
        .and_then(integer);
    Some(Received {
        message_id: properties.message_id().as_ref().map(|s| s.to_string()),
        timestamp_header,
        body: serde_json::from_slice(&delivery.data).expect("a JSON body"),
    })
}

/// An AMQP header value as an integer, whatever width the publisher chose.
fn integer(value: &AMQPValue) -> Option<i64> {
    match value {
        AMQPValue::ShortShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::Timestamp(n) => i64::try_from(*n).ok(),
        _ => None,
    }
}

fn archive(usercode: &str) -> Vec<u8> {
    sensorbucket_archive(usercode).expect("archive builds")
}

/// Polls until `check` holds, failing the test after a generous deadline.
async fn wait_for<T>(what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

const MARKS_SEEN: &str = "\
def process(msg):
    msg.metadata[\"seen\"] = True
    msg.metadata[\"payload_text\"] = msg.payload.decode()
    return msg
";

#[sqlx::test(migrations = false)]
async fn a_message_goes_through_the_worker_to_the_next_step(pool: PgPool) {
    Pipeline::run(pool, async |p| {
        let id = p.enabled_worker("marks-seen", MARKS_SEEN).await;
        p.consuming_at(id, 1).await;
        let sent = p.message(id, 7);
        let before = now_ms();
        p.publish(id, "message-7", &sent).await;

        let got = p.next_message().await;
        assert_eq!(got.message_id.as_deref(), Some("message-7"));
        let stamp = got.timestamp_header.expect("a timestamp header");
        assert!(stamp >= before - 1000, "timestamp {stamp} is Unix ms");
        let body = &got.body;
        assert_eq!(body["step_index"], 1);
        assert_eq!(body["metadata"]["seen"], true);
        assert_eq!(body["metadata"]["payload_text"], "reading 7");
        assert_eq!(body["metadata"]["n"], 7, "the rest of the metadata is kept");
        for field in [
            "tracing_id",
            "tenant_id",
            "access_token",
            "received_at",
            "pipeline_id",
            "pipeline_steps",
            "timestamp",
            "payload",
        ] {
            assert_eq!(body[field], sent[field], "{field} passes through unchanged");
        }
    })
    .await;
}

#[sqlx::test(migrations = false)]
async fn saved_code_changes_what_the_running_pipeline_does(pool: PgPool) {
    let version = |v: u32| {
        format!("def process(msg):\n    msg.metadata[\"version\"] = {v}\n    return msg\n")
    };
    Pipeline::run(pool, async |p| {
        let id = p.enabled_worker("versioned", &version(1)).await;
        p.consuming_at(id, 1).await;
        p.publish(id, "before", &p.message(id, 0)).await;
        let got = p.next_message().await;
        assert_eq!(got.body["metadata"]["version"], 1);

        p.save_code(id, &version(2)).await;
        // Keep the pipeline busy while the worker is replaced; old-code
        // results may still come out, until the new code's do.
        let start = Instant::now();
        let mut n = 0;
        loop {
            n += 1;
            p.publish(id, &format!("during-{n}"), &p.message(id, n))
                .await;
            if let Some(got) = p.next_within(Duration::from_secs(1)).await {
                let v = &got.body["metadata"]["version"];
                assert!(*v == 1 || *v == 2, "unexpected version {v}");
                if *v == 2 {
                    break;
                }
            }
            assert!(
                start.elapsed() < DEADLINE,
                "the new code did not take effect within {DEADLINE:?}"
            );
        }
        let c = p.consuming_at(id, 2).await;
        assert_eq!(c.revision, Some(Revision(2)));
    })
    .await;
}

#[sqlx::test(migrations = false)]
async fn code_that_does_not_load_says_why_in_the_workers_status(pool: PgPool) {
    Pipeline::run(pool, async |p| {
        let id = p
            .enabled_worker("broken", "def process(msg)\n    return msg\n")
            .await;
        let info = wait_for("an error status that quotes the syntax error", async || {
            let (status, info): (String, String) =
                sqlx::query_as("SELECT status, status_info FROM user_workers WHERE id = $1")
                    .bind(id.0)
                    .fetch_one(&p.pool)
                    .await
                    .expect("read status");
            (status == "error" && info.contains("code_invalid")).then_some(info)
        })
        .await;
        assert!(
            info.contains("syntax error in usercode.py line 1"),
            "{info}"
        );
        assert!(info.contains("exited with code 4"), "{info}");
    })
    .await;
}

#[sqlx::test(migrations = false)]
async fn a_raising_process_sends_the_traceback_to_errors(pool: PgPool) {
    let raises =
        "def process(msg):\n    raise ValueError(\"bad reading \" + msg.payload.decode())\n";
    Pipeline::run(pool, async |p| {
        let id = p.enabled_worker("raises", raises).await;
        p.consuming_at(id, 1).await;
        let sent = p.message(id, 42);
        p.publish(id, "doomed", &sent).await;

        let got = p.error_message().await;
        assert_eq!(got.message_id.as_deref(), Some("doomed"));
        let body = &got.body;
        assert_eq!(body["received_by_worker"], sent);
        assert!(
            body.get("processing_attempt").is_some(),
            "processing_attempt is present: {body}"
        );
        assert_eq!(body["worker"], id.to_string());
        assert_eq!(body["queue"], id.to_string());
        // Unix seconds, as SensorBucket's wrapper writes them.
        let now = chrono::Utc::now().timestamp();
        assert!(
            body["timestamp"]
                .as_i64()
                .is_some_and(|t| (now - 600..=now).contains(&t)),
            "{body}"
        );
        let error = body["error"].as_str().expect("error is text");
        assert!(error.contains("Traceback"), "{error}");
        assert!(
            error.contains("ValueError: bad reading reading 42"),
            "{error}"
        );
    })
    .await;
}

#[sqlx::test(migrations = false)]
async fn a_worker_stopped_mid_stream_loses_no_message(pool: PgPool) {
    const N: usize = 300;
    // Slow enough that the stop lands while most messages still wait.
    let slow = "import time\n\ndef process(msg):\n    time.sleep(0.05)\n    return msg\n";
    Pipeline::run(pool, async |p| {
        let id = p.enabled_worker("interrupted", slow).await;
        let first = p.consuming_at(id, 1).await;
        for n in 0..N {
            p.publish(id, &format!("m-{n}"), &p.message(id, n)).await;
        }
        let mut seen = BTreeSet::new();
        while seen.len() < 30 {
            seen.insert(p.next_message().await.message_id.expect("a message_id"));
        }
        let stop = tokio::process::Command::new("docker")
            .args(["stop", "--time", "10", &first.id])
            .output()
            .await
            .expect("docker stop");
        assert!(
            stop.status.success(),
            "docker stop: {}",
            String::from_utf8_lossy(&stop.stderr)
        );
        while let Some(got) = p.next_within(Duration::ZERO).await {
            seen.insert(got.message_id.expect("a message_id"));
        }
        assert!(
            seen.len() < N,
            "the worker was stopped after all messages went through: nothing was interrupted"
        );

        wait_for("the daemon to restart the stopped worker", async || {
            (p.restarts(id).await >= 1).then_some(())
        })
        .await;
        p.consuming_at(id, 1).await;
        while seen.len() < N {
            let got = p.next_message().await;
            assert_eq!(got.body["step_index"], 1);
            seen.insert(got.message_id.expect("a message_id"));
        }
        let expected: BTreeSet<String> = (0..N).map(|n| format!("m-{n}")).collect();
        assert_eq!(seen, expected);
    })
    .await;
}

/// The worker's status and its text.
/// Polls the worker's status until `wanted(status, info)` holds and returns
/// the info; on the deadline, fails with every status seen, in order.
async fn status_until(
    p: &Pipeline,
    id: WorkerId,
    what: &str,
    wanted: impl Fn(&str, &str) -> bool,
) -> String {
    let start = Instant::now();
    let mut seen: Vec<(String, String)> = Vec::new();
    loop {
        let (status, info) = status_of(p, id).await;
        if wanted(&status, &info) {
            return info;
        }
        if seen.last() != Some(&(status.clone(), info.clone())) {
            seen.push((status, info));
        }
        assert!(
            start.elapsed() < DEADLINE,
            "timed out waiting for {what}; statuses seen: {seen:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn status_of(p: &Pipeline, id: WorkerId) -> (String, String) {
    sqlx::query_as("SELECT status, status_info FROM user_workers WHERE id = $1")
        .bind(id.0)
        .fetch_one(&p.pool)
        .await
        .expect("read status")
}

fn versioned(v: u32) -> String {
    format!("def process(msg):\n    msg.metadata[\"version\"] = {v}\n    return msg\n")
}

#[sqlx::test(migrations = false)]
async fn a_broken_save_keeps_the_old_revision_answering_until_a_good_one(pool: PgPool) {
    Pipeline::run(pool, async |p| {
        let id = p.enabled_worker("guarded", &versioned(1)).await;
        p.consuming_at(id, 1).await;
        p.save_code(id, "def process(msg)\n    return msg\n").await;
        let info = wait_for("the broken revision to be given up", async || {
            let (status, info) = status_of(p, id).await;
            (status == "error" && info.contains("revision 2 does not start")).then_some(info)
        })
        .await;
        assert!(
            info.contains("syntax error in usercode.py line 1"),
            "{info}"
        );
        assert!(info.ends_with("revision 1 keeps serving"), "{info}");
        p.publish(id, "still-served", &p.message(id, 1)).await;
        let got = p.next_message().await;
        assert_eq!(got.body["metadata"]["version"], 1, "revision 1 answers");

        p.save_code(id, &versioned(3)).await;
        p.consuming_at(id, 3).await;
        wait_for("revision 3 ready", async || {
            let (status, info) = status_of(p, id).await;
            (status == "ready" && info.contains("running revision 3")).then_some(())
        })
        .await;
        p.publish(id, "fixed", &p.message(id, 2)).await;
        let got = p.next_message().await;
        assert_eq!(
            got.body["metadata"]["version"], 3,
            "the good save took over"
        );
    })
    .await;
}

#[sqlx::test(migrations = false)]
async fn ready_is_written_only_once_the_queue_has_a_consumer(pool: PgPool) {
    Pipeline::run(pool, async |p| {
        let id = p.enabled_worker("counted", &versioned(1)).await;
        let queue = format!("worker_{id}");
        let start = Instant::now();
        loop {
            let (status, _) = status_of(p, id).await;
            if status == "ready" {
                let consumers = p.consumers_on(&queue).await.unwrap_or(0);
                assert!(consumers > 0, "ready with no consumer on {queue}");
                break;
            }
            assert!(start.elapsed() < DEADLINE, "never ready");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[sqlx::test(migrations = false)]
async fn an_image_that_knows_only_the_contract_runs_under_the_defaults(pool: PgPool) {
    // Like SensorBucket's own dockerworker: runs as root, writes
    // /tmp/code.zip, unpacks into /usercode, imports main.main from there.
    let image = common::contract_worker_image();
    Pipeline::run_on(pool, image, async |p| {
        // That image hands `process` the message as a plain dict.
        let code = "def process(msg):\n    msg[\"metadata\"][\"version\"] = 7\n    return msg\n";
        let id = p.enabled_worker("contract-only", code).await;
        p.consuming_at(id, 1).await;
        p.publish(id, "through", &p.message(id, 1)).await;
        let got = p.next_message().await;
        assert_eq!(got.body["metadata"]["version"], 7);
        assert_eq!(got.body["step_index"], 1);
        wait_for("the worker to be taken as ready", async || {
            let (status, _) = status_of(p, id).await;
            (status == "ready").then_some(())
        })
        .await;
    })
    .await;
}

/// The worker's Swarm service, as the manager lists it.
async fn service_of(p: &Pipeline, id: WorkerId) -> Option<workerctl::model::ManagedService> {
    let (_, manager) = p.swarm.as_ref().expect("on the Swarm backend");
    let listed = manager.list().await.expect("services list");
    listed.into_iter().find(|s| s.worker_id == Some(id))
}

/// Waits until the worker's status is `status` with `fragment` in its text.
async fn status_with(p: &Pipeline, id: WorkerId, status: &str, fragment: &str) -> String {
    let start = Instant::now();
    loop {
        let (s, info) = status_of(p, id).await;
        if s == status && info.contains(fragment) {
            return info;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "no status {status} saying {fragment:?} within {DEADLINE:?}; last: {s}: {info}; service: {:?}",
            service_of(p, id).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Publishes until a result of `version` comes out (older versions may
/// still answer while a rollout goes on); returns how many were answered
/// by another version.
async fn answered_by(p: &mut Pipeline, id: WorkerId, version: u32) -> usize {
    let (start, mut others) = (Instant::now(), 0);
    for n in 0.. {
        p.publish(id, &format!("v{version}-{n}"), &p.message(id, n))
            .await;
        if let Some(got) = p.next_within(Duration::from_secs(2)).await {
            if got.body["metadata"]["version"] == version {
                return others;
            }
            others += 1;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "version {version} did not answer within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    others
}

#[sqlx::test(migrations = false)]
async fn on_swarm_a_worker_is_one_service_that_rolls_out_rolls_back_scales_and_goes(pool: PgPool) {
    Pipeline::run_on_swarm(pool, async |p| {
        let id = p.enabled_worker("swarmed", &versioned(1)).await;
        sqlx::query(
            "INSERT INTO workerctl_worker_scale (worker_id, min_replicas, max_replicas) VALUES ($1, 2, 2)",
        )
        .bind(id.0)
        .execute(&p.pool)
        .await
        .expect("two replicas");
        let info = status_with(p, id, "ready", "running revision 1 in 2 replica(s)").await;
        assert!(info.contains("of service"), "{info}");
        let service = service_of(p, id).await.expect("a service");
        assert_eq!((service.replicas, service.running), (2, 2));
        assert_eq!(answered_by(p, id, 1).await, 0);

        // A new revision: Swarm's rolling update, and the new code answers.
        p.save_code(id, &versioned(2)).await;
        answered_by(p, id, 2).await;
        status_with(p, id, "ready", "running revision 2 in 2 replica(s)").await;

        // A broken revision is rolled back by Swarm; revision 2 keeps serving.
        p.save_code(id, "def process(msg)\n    return msg\n").await;
        let info = status_with(p, id, "error", "revision 3 does not start").await;
        assert!(info.contains("Swarm rolled it back"), "{info}");
        assert!(
            info.contains("syntax error in usercode.py line 1"),
            "the failed task's last words: {info}"
        );
        assert!(info.ends_with("revision 2 keeps serving"), "{info}");
        let service = service_of(p, id).await.expect("a service");
        assert!(matches!(service.rollout, Rollout::RolledBack { .. }), "{service:?}");
        assert_eq!(service.revision, Some(Revision(2)));
        p.publish(id, "still-served", &p.message(id, 99)).await;
        let got = p.next_message().await;
        assert_eq!(got.body["metadata"]["version"], 2, "revision 2 answers");

        // A good save rolls out again, and a new replica count only adds a task.
        p.save_code(id, &versioned(4)).await;
        status_with(p, id, "ready", "running revision 4 in 2 replica(s)").await;
        sqlx::query("UPDATE workerctl_worker_scale SET min_replicas = 3, max_replicas = 3 WHERE worker_id = $1")
            .bind(id.0)
            .execute(&p.pool)
            .await
            .expect("three replicas");
        status_with(p, id, "ready", "running revision 4 in 3 replica(s)").await;
        // A replaced task may still be on its way out: wait for it to go.
        wait_for("3 of 3 replicas observed", async || {
            let observed: (i32, i32) = sqlx::query_as(
                "SELECT desired_replicas, running_replicas FROM workerctl_observed WHERE worker_id = $1",
            )
            .bind(id.0)
            .fetch_one(&p.pool)
            .await
            .expect("observed");
            (observed == (3, 3)).then_some(())
        })
        .await;

        // Disabled: the service goes.
        sqlx::query("UPDATE user_workers SET state = 'disabled' WHERE id = $1")
            .bind(id.0)
            .execute(&p.pool)
            .await
            .expect("disable");
        wait_for("the service to go", async || {
            service_of(p, id).await.is_none().then_some(())
        })
        .await;
    })
    .await;
}

// -- taking over from SensorBucket's own controller ---------------------------

/// Serves `{"data": <base64 archive of usercode>}` on any path, as
/// SensorBucket's own code endpoint does; returns the URL.
async fn serve_code(usercode: &str) -> String {
    let data = base64::engine::general_purpose::STANDARD.encode(archive(usercode));
    let body = json!({"message": "Fetched worker source", "data": data});
    let app = axum::Router::new().fallback(move || {
        let body = body.clone();
        async move { axum::Json(body) }
    });
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("bind a free port");
    let addr = listener.local_addr().expect("local address");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/code")
}

/// What SensorBucket's own Docker controller leaves running for worker
/// `id`: its name, its labels, Tty on, started from an image that knows only
/// the contract, consuming the worker's queue with the code at `code_url`.
fn sensorbucket_container(p: &Pipeline, id: WorkerId, revision: i32, code_url: &str) -> String {
    let env = [
        format!("WORKER_ID={id}"),
        format!("AMQP_HOST={}", amqp_url()),
        format!("AMQP_XCHG={}", p.exchange),
        format!("CODE_URL={code_url}"),
        "CODE_ENTRYPOINT=main.main".to_string(),
    ];
    let mut args: Vec<String> = ["run", "-d", "-t", "--network", "host", "--name"]
        .map(String::from)
        .to_vec();
    args.push(format!("worker-{id}"));
    for label in [
        "controlled-by=sensorbucket".to_string(),
        format!("worker-id={id}"),
        format!("worker-revision={revision}"),
    ] {
        args.extend(["--label".to_string(), label]);
    }
    for e in env {
        args.extend(["-e".to_string(), e]);
    }
    args.push(common::contract_worker_image().to_string());
    let out = Command::new("docker")
        .args(&args)
        .output()
        .expect("the docker CLI runs");
    assert!(
        out.status.success(),
        "docker run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A worker row at `revision` whose code sets `metadata.version` (dict
/// style, as SensorBucket's image hands `process` a dict).
async fn worker_at(p: &mut Pipeline, revision: i32, version: u32) -> WorkerId {
    let id = p
        .enabled_worker("taken-over", &dict_versioned(version))
        .await;
    sqlx::query("UPDATE user_workers SET revision = $1 WHERE id = $2")
        .bind(revision)
        .bind(id.0)
        .execute(&p.pool)
        .await
        .expect("set revision");
    id
}

fn dict_versioned(v: u32) -> String {
    format!("def process(msg):\n    msg[\"metadata\"][\"version\"] = {v}\n    return msg\n")
}

/// Whether a container of that id is running.
fn running(container: &str) -> bool {
    let out = Command::new("docker")
        .args(["inspect", "--format", "{{.State.Running}}", container])
        .output();
    out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "true")
}

/// A stopped container's state and the end of its log, for a failure message.
fn stopped_container(container: &str) -> String {
    let run = |args: &[&str]| {
        let out = Command::new("docker").args(args).output();
        out.map_or_else(
            |e| format!("(docker: {e})"),
            |o| String::from_utf8_lossy(&[o.stdout, o.stderr].concat()).into_owned(),
        )
    };
    let format = "{{.State.Status}} (exit code {{.State.ExitCode}}) {{.State.Error}}";
    let state = run(&["inspect", "--format", format, container]);
    let log = run(&["logs", "--tail", "30", container]);
    format!("container {container} stopped: {state}\n{log}")
}

/// Whether a container of that id still exists.
fn exists(container: &str) -> bool {
    Command::new("docker")
        .args(["inspect", "--format", "{{.Id}}", container])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Publishes `count` messages, numbered from `from`, and returns the
/// versions that answered them, by number. Every one must be answered.
async fn versions_answering(
    p: &mut Pipeline,
    id: WorkerId,
    from: usize,
    count: usize,
) -> Vec<(usize, Value)> {
    let answers = answers_within(p, id, from, count, DEADLINE).await;
    assert_eq!(answers.len(), count, "unanswered: {answers:?}");
    answers
}

/// Publishes `count` messages, numbered from `from`, and returns the
/// versions that answered them, by number, waiting at most `quiet` for each.
async fn answers_within(
    p: &mut Pipeline,
    id: WorkerId,
    from: usize,
    count: usize,
    quiet: Duration,
) -> Vec<(usize, Value)> {
    for n in from..from + count {
        p.publish(id, &format!("m{n}"), &p.message(id, n)).await;
    }
    let mut answers = Vec::new();
    while answers.len() < count {
        let Some(got) = p.next_within(quiet).await else {
            break;
        };
        let n = got.body["metadata"]["n"].as_u64().expect("numbered") as usize;
        if (from..from + count).contains(&n) {
            answers.push((n, got.body["metadata"]["version"].clone()));
        }
    }
    answers
}

#[sqlx::test(migrations = false)]
async fn sensorbucket_controllers_containers_are_replaced_start_first(pool: PgPool) {
    let image = common::contract_worker_image();
    Pipeline::run_before_daemon(
        pool,
        image,
        |_| {},
        async |p| {
            let id = worker_at(p, 2, 2).await;
            let theirs = sensorbucket_container(p, id, 1, &serve_code(&dict_versioned(1)).await);
            let stranger = Uuid::now_v7();
            let untouched =
                sensorbucket_container(p, WorkerId(stranger), 1, "http://127.0.0.1:9/none");
            wait_for("SensorBucket's container to consume", async || {
                // It is not restarted: one that exited says why, at once.
                assert!(running(&theirs), "{}", stopped_container(&theirs));
                (p.consumers_on(&format!("worker_{id}")).await? > 0).then_some(())
            })
            .await;
            let before = versions_answering(p, id, 0, 3).await;
            assert!(before.iter().all(|(_, v)| *v == 1), "{before:?}");

            p.start_daemon().await;
            // Traffic all through the takeover: each message answered, by
            // revision 1 until revision 2 is ready. SensorBucket's image
            // acknowledges before it publishes, so a stop that lands inside its
            // `process` loses that one message — never more.
            let (mut sent, mut lost) = (3, 0);
            while exists(&theirs) {
                let answers = answers_within(p, id, sent, 5, Duration::from_secs(10)).await;
                lost += 5 - answers.len();
                sent += 5;
            }
            assert!(lost <= 1, "{lost} messages lost in the takeover");
            let after = versions_answering(p, id, sent, 20).await;
            assert!(after.iter().all(|(_, v)| *v == 2), "{after:?}");
            let info = status_until(p, id, "the status to say what was taken over", |s, i| {
                s == "ready" && i.contains("took over")
            })
            .await;
            assert!(info.contains("SensorBucket's controller"), "{info}");
            assert!(
                exists(&untouched),
                "a worker not in this store is not ours to replace"
            );
            let _ = Command::new("docker")
                .args(["rm", "-f", &untouched])
                .output();
        },
    )
    .await;
}

#[sqlx::test(migrations = false)]
async fn with_takeover_off_the_status_names_the_container_to_remove(pool: PgPool) {
    let image = common::contract_worker_image();
    let off = |c: &mut Config| c.docker.takeover = false;
    Pipeline::run_before_daemon(pool, image, off, async |p| {
        let id = worker_at(p, 2, 2).await;
        let theirs = sensorbucket_container(p, id, 1, &serve_code(&dict_versioned(1)).await);
        p.start_daemon().await;
        let info = status_until(p, id, "an error naming the container", |s, i| {
            s == "error" && i.contains("docker rm -f")
        })
        .await;
        assert!(info.contains(&format!("worker-{id}")), "{info}");
        // The daemon's own container runs beside it; theirs is never touched.
        wait_for("workerctl's container to run", async || {
            let ours = p.containers_of(id).await;
            ours.iter()
                .any(|c| c.owner == Owner::Workerctl && c.state == RunState::Running)
                .then_some(())
        })
        .await;
        assert!(exists(&theirs));
    })
    .await;
}

#[sqlx::test(migrations = false)]
async fn a_controller_that_makes_its_containers_again_is_reported_not_fought(pool: PgPool) {
    let image = common::contract_worker_image();
    Pipeline::run_before_daemon(
        pool,
        image,
        |_| {},
        async |p| {
            let id = worker_at(p, 2, 2).await;
            let url = serve_code(&dict_versioned(1)).await;
            let first = sensorbucket_container(p, id, 1, &url);
            p.start_daemon().await;
            wait_for("the first to be replaced", async || {
                (!exists(&first)).then_some(())
            })
            .await;
            // SensorBucket's controller, still on, makes it again.
            let again = sensorbucket_container(p, id, 1, &url);
            let info = status_until(p, id, "the status to say it is still on", |s, i| {
                s == "error" && i.contains("still runs")
            })
            .await;
            assert!(info.contains("CTRL_TYPE"), "{info}");
            // Left alone: the status was written by a pass that decided so.
            assert!(exists(&again), "not fought");
        },
    )
    .await;
}

// -- rapid saves ----------------------------------------------------------------

/// Five saves in about two seconds under steady traffic, on `image`:
/// afterwards one container is left, and it answers with the last save.
/// Returns how many messages went unanswered.
async fn five_quick_saves(p: &mut Pipeline, code: fn(u32) -> String) -> usize {
    let id = p.enabled_worker("saved-often", &code(1)).await;
    p.consuming_at(id, 1).await;
    let mut sent = 0;
    for v in 2..=6 {
        p.save_code(id, &code(v)).await;
        for n in sent..sent + 4 {
            p.publish(id, &format!("m{n}"), &p.message(id, n)).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        sent += 4;
    }
    let mut seen = BTreeSet::new();
    while let Some(got) = p.next_within(Duration::from_secs(15)).await {
        seen.insert(got.body["metadata"]["n"].as_u64().expect("numbered"));
        if seen.len() == sent {
            break;
        }
    }
    wait_for("one container left, at revision 6", async || {
        match p.containers_of(id).await.as_slice() {
            [c] if c.revision == Some(Revision(6)) && c.state == RunState::Running => Some(()),
            _ => None,
        }
    })
    .await;
    let after = versions_answering(p, id, 1000, 10).await;
    assert!(after.iter().all(|(_, v)| *v == 6), "{after:?}");
    sent - seen.len()
}

#[sqlx::test(migrations = false)]
async fn five_quick_saves_settle_on_the_last_and_lose_nothing(pool: PgPool) {
    Pipeline::run(pool, async |p| {
        let lost = five_quick_saves(p, versioned).await;
        assert_eq!(lost, 0, "the dockerworker confirms before it acknowledges");
    })
    .await;
}

#[sqlx::test(migrations = false)]
async fn five_quick_saves_settle_on_the_last_with_an_image_that_ignores_sigterm(pool: PgPool) {
    // The contract-only image: Python as PID 1 ignores SIGTERM and stops on
    // SIGINT; no ready report, no health check. Its stop_timeout is long,
    // so a container waited out to its SIGKILL would show.
    let image = common::contract_worker_image();
    let slow_kill = |c: &mut Config| c.docker.stop_timeout = Duration::from_secs(300);
    Pipeline::run_before_daemon(pool, image, slow_kill, async |p| {
        p.start_daemon().await;
        // It acknowledges before it publishes: what a stop inside `process`
        // loses is that image's own loss, so only the outcome is checked.
        five_quick_saves(p, dict_versioned).await;
    })
    .await;
}
