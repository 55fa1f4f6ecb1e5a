//! The Swarm backend on a real three-node swarm (`scripts/swarm-nodes`:
//! docker-in-docker nodes on a bridge whose gateway is this host), with the
//! real dockerworker image and the real broker: a worker's tasks land on
//! several nodes, each fetches its code from the daemon's code server and
//! consumes its queue from there, and a save rolls out across the nodes.
//!
//! The daemon runs in-process, as `workerctl run` on the Swarm backend does
//! with `DOCKER_HOST` at the manager: its Swarm and Docker clients both talk
//! to node 1's engine. Its code server is bound on the bridge's gateway and
//! the workers get the broker at the gateway too, so both are reached from
//! every node, not only from the manager.
//!
//! Placement: workerctl asks Swarm for none (no constraint, no preference,
//! no replicas-per-node limit). Swarm's scheduler already puts a service's
//! next task on the eligible node with the fewest tasks of that service, so
//! three replicas on three nodes spread one per node; a limit per node would
//! make a start-first rollout wait for room, and a worker scaled beyond the
//! node count impossible.
//!
//! Needs what `scripts/test` provides (Postgres, RabbitMQ, the images); the
//! test makes the nodes itself (`scripts/swarm-nodes up`) and removes them
//! at the end (`down`), whether it passed or not. Ignored by default: it
//! adds about a minute; run it with
//! `cargo test --test multinode -- --ignored`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use bollard::Docker;
use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer, ExchangeKind};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;
use workerctl::archive::sensorbucket_archive;
use workerctl::config::{Config, Secret};
use workerctl::daemon::Daemon;
use workerctl::model::WorkerId;
use workerctl::runtime::docker::DockerRuntime;
use workerctl::runtime::swarm::SwarmRuntime;
use workerctl::store::postgres::PgStore;

use common::nodes::{GATEWAY, LOCK_FILE, REGISTRY, node_engine};
use common::worker_image;

/// Node 1's engine, the swarm's manager.
const MANAGER: &str = "tcp://172.30.213.11:2375";
const DEADLINE: Duration = Duration::from_secs(180);

/// The three nodes, made for this test and removed when dropped.
struct Nodes {
    _turn: File,
}

impl Nodes {
    fn up(image: &str) -> Nodes {
        let turn = File::create(LOCK_FILE).expect("the nodes' lock file");
        turn.lock().expect("waiting for another user of the nodes");
        // Nodes an interrupted run left behind.
        swarm_nodes(&["down"]);
        let started = Instant::now();
        swarm_nodes(&["up", image]);
        eprintln!("three-node swarm up in {:?}", started.elapsed());
        Nodes { _turn: turn }
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        swarm_nodes(&["down"]);
    }
}

fn swarm_nodes(args: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/swarm-nodes");
    let out = Command::new(script)
        .args(args)
        .output()
        .expect("scripts/swarm-nodes runs");
    assert!(
        out.status.success() || std::thread::panicking(),
        "scripts/swarm-nodes {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The docker CLI against the manager.
fn on_manager(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(["-H", MANAGER])
        .args(args)
        .output()
        .expect("the docker CLI runs");
    assert!(
        out.status.success(),
        "docker {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn manager_client() -> Docker {
    let addr = MANAGER.replace("tcp://", "http://");
    Docker::connect_with_http(&addr, 120, bollard::API_DEFAULT_VERSION)
        .expect("a client for the manager")
}

/// The broker's URL as the nodes (and this host) reach it: AMQP_URL's
/// credentials and vhost, at the gateway.
fn broker_at_gateway() -> String {
    let mut url = reqwest::Url::parse(&common::amqp_url()).expect("AMQP_URL is a URL");
    let host = std::net::Ipv4Addr::from(GATEWAY).to_string();
    url.set_host(Some(&host)).expect("a host");
    url.to_string()
}

fn now_ms() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    since.as_millis() as i64
}

/// Answers with its revision and the task it ran in (workerctl names a
/// task's host `<service>-<slot>`).
fn usercode(version: u32) -> String {
    format!(
        "import socket\n\ndef process(msg):\n    msg.metadata[\"version\"] = {version}\n    msg.metadata[\"task\"] = socket.gethostname()\n    return msg\n"
    )
}

/// Like [`usercode`], taking 50 ms a message: messages are in flight on
/// every task when a node is lost.
fn slow_usercode(version: u32) -> String {
    format!(
        "import socket\nimport time\n\ndef process(msg):\n    time.sleep(0.05)\n    msg.metadata[\"version\"] = {version}\n    msg.metadata[\"task\"] = socket.gethostname()\n    return msg\n"
    )
}

/// The docker CLI against node `n`'s engine; `None` if it failed.
fn on_node(n: u32, args: &[&str]) -> Option<String> {
    let out = Command::new("docker")
        .args(["-H", &node_engine(n)])
        .args(args)
        .output()
        .expect("the docker CLI runs");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The docker CLI against the host's engine (the nodes are its containers).
fn on_host(args: &[&str]) {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("the docker CLI runs");
    assert!(
        out.status.success(),
        "docker {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Test {
    pool: PgPool,
    amqp: Connection,
    publisher: Channel,
    exchange: String,
    next_key: String,
    next_queue: String,
    next: Consumer,
    worker: WorkerId,
    shutdown: CancellationToken,
}

impl Test {
    async fn status(&self) -> (String, String) {
        sqlx::query_as("SELECT status, status_info FROM user_workers WHERE id = $1")
            .bind(self.worker.0)
            .fetch_one(&self.pool)
            .await
            .expect("read status")
    }

    async fn status_with(&self, status: &str, fragment: &str) -> String {
        let start = Instant::now();
        loop {
            let (s, info) = self.status().await;
            if s == status && info.contains(fragment) {
                return info;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "no status {status} saying {fragment:?} within {DEADLINE:?}; last: {s}: {info}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Waits until the status, whatever it is, says `fragment`.
    async fn status_with_any(&self, fragment: &str) -> String {
        let start = Instant::now();
        loop {
            let (s, info) = self.status().await;
            if info.contains(fragment) {
                return format!("{s}: {info}");
            }
            assert!(
                start.elapsed() < DEADLINE,
                "no status saying {fragment:?} within {DEADLINE:?}; last: {s}: {info}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn save_code(&self, code: &str) {
        sqlx::query("UPDATE user_workers SET source = $1, revision = revision + 1 WHERE id = $2")
            .bind(sensorbucket_archive(code).expect("archive builds"))
            .bind(self.worker.0)
            .execute(&self.pool)
            .await
            .expect("update worker code");
    }

    /// The worker's running tasks, as Swarm says: task slot → node.
    fn tasks_running(&self) -> BTreeMap<String, String> {
        let service = format!("label=workerctl.worker-id={}", self.worker);
        let name = on_manager(&[
            "service",
            "ls",
            "--filter",
            &service,
            "--format",
            "{{.Name}}",
        ]);
        assert!(!name.is_empty(), "no service for worker {}", self.worker);
        let tasks = on_manager(&[
            "service",
            "ps",
            &name,
            "--filter",
            "desired-state=running",
            "--format",
            "{{.Name}} {{.Node}} {{.CurrentState}}",
        ]);
        tasks
            .lines()
            .filter(|l| l.contains(" Running"))
            .filter_map(|l| {
                let mut words = l.split_whitespace();
                let slot = words.next()?.rsplit('.').next()?.to_string();
                Some((slot, words.next()?.to_string()))
            })
            .collect()
    }

    /// The worker's service, by name.
    fn service_name(&self) -> String {
        let service = format!("label=workerctl.worker-id={}", self.worker);
        on_manager(&[
            "service",
            "ls",
            "--filter",
            &service,
            "--format",
            "{{.Name}}",
        ])
    }

    /// The worker's task containers that run, counted on each node's own
    /// engine (not in the manager's books); a node that does not answer
    /// counts none.
    fn containers_running(&self) -> BTreeMap<u32, usize> {
        let filter = format!(
            "label=com.docker.swarm.service.name={}",
            self.service_name()
        );
        (1..=3)
            .map(|n| {
                let ids = on_node(n, &["ps", "-q", "--filter", &filter]).unwrap_or_default();
                (n, ids.lines().count())
            })
            .collect()
    }

    async fn save_entrypoint(&self, entrypoint: &str) {
        sqlx::query(
            "UPDATE user_workers SET entrypoint = $1, revision = revision + 1 WHERE id = $2",
        )
        .bind(entrypoint)
        .bind(self.worker.0)
        .execute(&self.pool)
        .await
        .expect("update the worker's entry point");
    }

    /// Collects answers until every message of `numbers` has one: the task
    /// slots that answered each (a message the broker redelivered after
    /// its task was lost may be answered twice).
    async fn answers_to(
        &mut self,
        version: u32,
        numbers: &BTreeSet<usize>,
    ) -> BTreeMap<usize, Vec<String>> {
        let mut answers: BTreeMap<usize, Vec<String>> = BTreeMap::new();
        while !numbers.iter().all(|n| answers.contains_key(n)) {
            let delivery = tokio::time::timeout(DEADLINE, self.next.next())
                .await
                .unwrap_or_else(|_| {
                    let missing: Vec<_> = numbers
                        .iter()
                        .filter(|n| !answers.contains_key(n))
                        .collect();
                    panic!("messages {missing:?} not answered within {DEADLINE:?}")
                })
                .expect("the test consumer runs")
                .expect("a delivery");
            let body: Value = serde_json::from_slice(&delivery.data).expect("JSON");
            assert_eq!(body["metadata"]["version"], version, "{body}");
            let n = body["metadata"]["n"].as_u64().expect("n") as usize;
            let task = body["metadata"]["task"].as_str().expect("task");
            let slot = task.rsplit('-').next().expect("a slot").to_string();
            answers.entry(n).or_default().push(slot);
        }
        answers
    }

    async fn publish(&self, n: usize) {
        let now = now_ms();
        let body = json!({
            "tracing_id": Uuid::new_v4().to_string(),
            "tenant_id": 1,
            "access_token": "test-access-token",
            "received_at": now,
            "pipeline_id": Uuid::new_v4().to_string(),
            "step_index": 0,
            "pipeline_steps": [self.worker.to_string(), self.next_key],
            "timestamp": now,
            "payload": base64::engine::general_purpose::STANDARD.encode(format!("reading {n}")),
            "metadata": {"n": n},
        });
        let properties = BasicProperties::default()
            .with_message_id(format!("m{n}").into())
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
                self.worker.to_string().as_str().into(),
                options,
                &serde_json::to_vec(&body).expect("json"),
                properties,
            )
            .await
            .expect("publish")
            .await
            .expect("publisher confirm");
        assert!(confirm.is_ack(), "the broker refused the publish");
        assert!(confirm.take_message().is_none(), "unroutable");
    }

    /// Publishes `count` messages and collects every answer: the task slot
    /// that answered each message, by its number.
    async fn round(&mut self, version: u32, count: usize) -> Vec<(usize, String)> {
        for n in 0..count {
            self.publish(n).await;
        }
        let mut answers = vec![];
        while answers.len() < count {
            let delivery = tokio::time::timeout(DEADLINE, self.next.next())
                .await
                .unwrap_or_else(|_| panic!("{} of {count} answered", answers.len()))
                .expect("the test consumer runs")
                .expect("a delivery");
            let body: Value = serde_json::from_slice(&delivery.data).expect("JSON");
            assert_eq!(body["metadata"]["version"], version, "{body}");
            let n = body["metadata"]["n"].as_u64().expect("n") as usize;
            let task = body["metadata"]["task"].as_str().expect("task");
            let slot = task.rsplit('-').next().expect("a slot").to_string();
            answers.push((n, slot));
        }
        answers
    }

    async fn cleanup(self) {
        self.shutdown.cancel();
        let channel = self.amqp.create_channel().await.expect("channel");
        for queue in [
            self.next_queue.clone(),
            format!("worker_{}", self.worker),
            format!("worker_{}.retry", self.worker),
        ] {
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
}

async fn start(pool: PgPool, code: &str, image: &str) -> Test {
    let tag = Uuid::new_v4().simple().to_string();
    let instance = format!("n{}", &tag[..12]);
    let exchange = format!("pipeline.messages.test-{tag}");
    let next_key = format!("storage-{tag}");
    let next_queue = format!("{exchange}.next");
    let store = Arc::new(PgStore::from_pool(pool.clone()));
    store.migrate().await.expect("migrations apply");

    let amqp = Connection::connect(&broker_at_gateway(), ConnectionProperties::default())
        .await
        .expect("RabbitMQ answers on the nodes' gateway (run scripts/services)");
    let publisher = amqp.create_channel().await.expect("channel");
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("publisher confirms");
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    publisher
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await
        .expect("declare the exchange");
    let channel = amqp.create_channel().await.expect("channel");
    channel
        .queue_declare(
            next_queue.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("declare the next step's queue");
    channel
        .queue_bind(
            next_queue.as_str().into(),
            exchange.as_str().into(),
            next_key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind it");
    let no_ack = BasicConsumeOptions {
        no_ack: true,
        ..BasicConsumeOptions::default()
    };
    let next = channel
        .basic_consume(
            next_queue.as_str().into(),
            "".into(),
            no_ack,
            FieldTable::default(),
        )
        .await
        .expect("consume it");

    // The worker: enabled, three replicas, before the daemon starts.
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO user_workers (id, name, description, state, language, tenant_id, revision, status, status_info, source, entrypoint)
         VALUES ($1, 'spread', '', 'enabled', 'python', 1, 1, 'unknown', '', $2, 'main.main')",
    )
    .bind(id)
    .bind(sensorbucket_archive(code).expect("archive builds"))
    .execute(&pool)
    .await
    .expect("insert worker");
    sqlx::query(
        "INSERT INTO workerctl_worker_scale (worker_id, min_replicas, max_replicas) VALUES ($1, 3, 3)",
    )
    .bind(id)
    .execute(&pool)
    .await
    .expect("three replicas");

    // The daemon, its code server on the gateway.
    let listener = tokio::net::TcpListener::bind(SocketAddr::from((GATEWAY, 0)))
        .await
        .expect("bind on the nodes' gateway");
    let addr = listener.local_addr().expect("local address");
    let mut config = Config {
        instance: instance.clone(),
        ..Config::default()
    };
    config.database_url = Secret::new(common::database_url(&pool));
    config.docker.image = image.into();
    config.docker.network = "host".into();
    config.docker.stop_timeout = Duration::from_secs(10);
    config.code_server.public_url = format!("http://{addr}");
    config.amqp.url = Secret::new(broker_at_gateway());
    config.amqp.exchange = exchange.clone();
    config.swarm.update_monitor = Duration::from_secs(3);
    let swarm = SwarmRuntime::with_client(manager_client(), &instance, config.swarm_options())
        .await
        .expect("the manager answers");
    let runtime = DockerRuntime::with_client(manager_client(), &instance)
        .await
        .expect("the manager's engine answers");
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    Daemon::new(config, store, Arc::new(runtime))
        .on_swarm(Arc::new(swarm))
        .spawn(listener, &tracker, &shutdown)
        .expect("the daemon starts");
    tracker.close();

    Test {
        pool,
        amqp,
        publisher,
        exchange,
        next_key,
        next_queue,
        next,
        worker: WorkerId(id),
        shutdown,
    }
}

#[sqlx::test(migrations = false)]
#[ignore = "makes a three-node swarm (about a minute): cargo test --test multinode -- --ignored"]
async fn on_three_nodes_a_workers_tasks_spread_consume_roll_out_and_roll_back(pool: PgPool) {
    let nodes = Nodes::up(worker_image());
    let mut t = start(pool, &usercode(1), worker_image()).await;
    let outcome = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(async {
        t.status_with("ready", "running revision 1 in 3 replica(s)")
            .await;
        assert_spread_and_answering(&mut t, 1).await;

        // A save rolls out across the nodes; every answer after it comes
        // from the new revision, from every task, on every node with one.
        let rollout = Instant::now();
        t.save_code(&usercode(2)).await;
        t.status_with("ready", "running revision 2 in 3 replica(s)")
            .await;
        eprintln!("save rolled out over the nodes in {:?}", rollout.elapsed());
        assert_spread_and_answering(&mut t, 2).await;

        // A save that cannot start (no such module) is rolled back across
        // the nodes. Messages published meanwhile are all answered, by
        // revision 2: it never stopped serving.
        let rollback = Instant::now();
        t.save_entrypoint("crash.main").await;
        let mut during = BTreeSet::new();
        let mut n = 1_000;
        loop {
            let (status, info) = t.status().await;
            if status == "error" && info.contains("revision 3 does not start") {
                eprintln!("rolled back in {:?}: {info}", rollback.elapsed());
                assert!(info.contains("Swarm rolled it back"), "{info}");
                assert!(info.contains("revision 2 keeps serving"), "{info}");
                break;
            }
            assert!(
                rollback.elapsed() < DEADLINE,
                "no rollback within {DEADLINE:?}; last: {status}: {info}"
            );
            t.publish(n).await;
            during.insert(n);
            n += 1;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let answers = t.answers_to(2, &during).await;
        eprintln!(
            "{} messages published during the rollback, all answered",
            answers.len()
        );
        assert_spread_and_answering(&mut t, 2).await;
    }))
    .await;
    t.cleanup().await;
    drop(nodes);
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// The worker's three tasks run on at least two nodes, and each of them
/// answers (at `version`): having fetched its code from the daemon and
/// consumed its queue from the node it is on. The broker hands a queue's
/// messages round-robin to its consumers, so 30 messages reach all three.
async fn assert_spread_and_answering(t: &mut Test, version: u32) {
    let tasks = t.tasks_running();
    let nodes: BTreeSet<&String> = tasks.values().collect();
    assert_eq!(tasks.len(), 3, "three running tasks: {tasks:?}");
    assert!(nodes.len() >= 2, "three tasks on one node: {tasks:?}");
    eprintln!("revision {version}: tasks (slot → node) {tasks:?}");
    let answers = t.round(version, 30).await;
    let slots: BTreeSet<&String> = answers.iter().map(|(_, slot)| slot).collect();
    let running: BTreeSet<&String> = tasks.keys().collect();
    assert_eq!(slots, running, "the tasks that answered vs those running");
    let numbers: BTreeSet<usize> = answers.iter().map(|(n, _)| *n).collect();
    assert_eq!(numbers.len(), 30, "each message answered once");
}

#[sqlx::test(migrations = false)]
#[ignore = "makes a three-node swarm (about a minute): cargo test --test multinode -- --ignored"]
async fn a_node_lost_under_traffic_loses_no_message_and_its_tasks_return(pool: PgPool) {
    let nodes = Nodes::up(worker_image());
    let mut t = start(pool, &slow_usercode(1), worker_image()).await;
    let mut victim = None;
    let outcome = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(async {
        t.status_with("ready", "running revision 1 in 3 replica(s)")
            .await;
        let tasks = t.tasks_running();
        eprintln!("tasks (slot → node) {tasks:?}");
        // A node holding a task, not the manager (one manager: losing it
        // loses the swarm's control, a different failure).
        let lost = tasks
            .values()
            .find(|node| *node != "node-1")
            .expect("a task on a worker node")
            .clone();
        let number: u32 = lost.trim_start_matches("node-").parse().expect("node-N");

        // Steady traffic; the node is killed (every process on it at once,
        // as a crash) a third of the way in.
        let published: BTreeSet<usize> = (0..300).collect();
        let mut killed_at = None;
        for &n in &published {
            t.publish(n).await;
            if n == 100 {
                on_host(&["kill", &format!("workerctl-node-{number}")]);
                victim = Some(number);
                killed_at = Some(Instant::now());
                eprintln!("killed {lost}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let killed_at = killed_at.expect("killed");
        let said = t.status_with_any(&format!("node(s) {lost} not ready")).await;
        eprintln!("status after {:?}: {said}", killed_at.elapsed());
        let restored = t
            .status_with("ready", "running revision 1 in 3 replica(s)")
            .await;
        eprintln!("status after {:?}: {restored}", killed_at.elapsed());
        let answers = t.answers_to(1, &published).await;
        let twice = answers.values().filter(|slots| slots.len() > 1).count();
        eprintln!(
            "all {} confirmed messages answered after {:?} ({twice} twice: redelivered after the loss)",
            published.len(),
            killed_at.elapsed()
        );
        let tasks = t.tasks_running();
        assert_eq!(tasks.len(), 3, "three tasks run again: {tasks:?}");
        assert!(
            tasks.values().all(|node| *node != lost),
            "a task runs on the lost node: {tasks:?}"
        );

        // The node comes back: its old task is stopped there, and once the
        // swarm settles exactly three run, counted on the nodes themselves.
        let rejoin = Instant::now();
        on_host(&["start", &format!("workerctl-node-{number}")]);
        victim = None;
        let start = Instant::now();
        let mut most = 0;
        loop {
            let ready = on_manager(&["node", "ls", "--format", "{{.Hostname}} {{.Status}}"]);
            let running = t.containers_running();
            let total: usize = running.values().sum();
            most = most.max(total);
            if ready.lines().all(|l| l.ends_with(" Ready")) && on_node(number, &["info"]).is_some() && total == 3 {
                let (status, info) = t.status().await;
                if status == "ready" && !info.contains("not ready") {
                    eprintln!("{lost} back after {:?}: {running:?}; most seen {most}", rejoin.elapsed());
                    break;
                }
            }
            assert!(
                start.elapsed() < DEADLINE,
                "not settled within {DEADLINE:?}: {ready}; containers {running:?}; {:?}",
                t.status().await
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        // Settled: it stays at three, and all three answer.
        for _ in 0..6 {
            let running = t.containers_running();
            assert_eq!(running.values().sum::<usize>(), 3, "after the rejoin: {running:?}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let answers = t.round(1, 30).await;
        let slots: BTreeSet<&String> = answers.iter().map(|(_, slot)| slot).collect();
        assert_eq!(slots.len(), 3, "three tasks answer: {answers:?}");
    }))
    .await;
    if let Some(number) = victim {
        let _ = Command::new("docker")
            .args(["start", &format!("workerctl-node-{number}")])
            .output();
    }
    t.cleanup().await;
    drop(nodes);
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// A dockerworker image of its own id (one more label), built on the host
/// for one test and removed after it.
struct OwnImage(String);

impl OwnImage {
    fn build() -> OwnImage {
        let tag = format!(
            "workerctl-test/dockerworker-nodes:{}",
            &Uuid::new_v4().simple().to_string()[..10]
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let dockerfile = format!(
            "FROM {}\nLABEL workerctl.test.image=\"{tag}\"\n",
            worker_image()
        );
        std::fs::write(dir.path().join("Dockerfile"), dockerfile).expect("write Dockerfile");
        let dir = dir.path().to_str().expect("utf-8 path");
        on_host(&["build", "-q", "-t", &tag, dir]);
        OwnImage(tag)
    }
}

impl Drop for OwnImage {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rmi", &self.0]).output();
    }
}

#[sqlx::test(migrations = false)]
#[ignore = "makes a three-node swarm (about a minute): cargo test --test multinode -- --ignored"]
async fn an_image_missing_on_a_node_is_named_in_the_status_with_what_to_do(pool: PgPool) {
    let nodes = Nodes::up(worker_image());
    let image = OwnImage::build();
    swarm_nodes(&["load", &image.0, "node-1", "node-2"]);
    let mut t = start(pool, &usercode(1), &image.0).await;
    let outcome = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(async {
        // Swarm places a task on node-3 (the one with the fewest), which
        // rejects it, and places it again elsewhere: the status says so,
        // and keeps saying so once all three run on nodes 1 and 2.
        let said = t
            .status_with_any(&format!("the image {} (sha256:", image.0))
            .await;
        eprintln!("{said}");
        for part in [
            "is not on node(s) node-3:",
            "\"No such image\"",
            "docker push REGISTRY/",
            &format!("docker save {} | docker -H NODE load", image.0),
        ] {
            assert!(said.contains(part), "{part:?} not in {said}");
        }
        let ready = t
            .status_with("ready", "running revision 1 in 3 replica(s)")
            .await;
        assert!(
            ready.contains("but the image") && ready.contains("node(s) node-3"),
            "still said once the tasks run elsewhere: {ready}"
        );
        let tasks = t.tasks_running();
        assert!(
            tasks.values().all(|node| node != "node-3"),
            "a task on the node without the image: {tasks:?}"
        );
        let answers = t.round(1, 30).await;
        assert_eq!(answers.len(), 30);

        // What the status says to do: the image onto node-3. The next
        // rollout places a task there (it has the fewest), and the status
        // says nothing of images any more.
        swarm_nodes(&["load", &image.0, "node-3"]);
        t.save_code(&usercode(2)).await;
        let start = Instant::now();
        loop {
            let (status, info) = t.status().await;
            let on_three = t.tasks_running().values().any(|node| node == "node-3");
            if status == "ready" && info.contains("running revision 2 in 3") && on_three {
                assert!(!info.contains("image"), "{info}");
                break;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "no task of revision 2 on node-3 within {DEADLINE:?}: {status}: {info}; {:?}",
                t.tasks_running()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert_spread_and_answering(&mut t, 2).await;
    }))
    .await;
    t.cleanup().await;
    drop(nodes);
    drop(image);
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

#[sqlx::test(migrations = false)]
#[ignore = "makes a three-node swarm (about a minute): cargo test --test multinode -- --ignored"]
async fn an_image_in_a_registry_is_pinned_to_its_digest_and_pulled_by_every_node(pool: PgPool) {
    let nodes = Nodes::up(worker_image());
    // The image is pushed to the registry from the manager, and nodes 2 and
    // 3 are left without it: they can only pull it.
    let image = format!("{REGISTRY}/workerctl/dockerworker:multinode");
    on_manager(&["tag", worker_image(), &image]);
    on_manager(&["push", &image]);
    for n in [2, 3] {
        assert!(
            on_node(n, &["rmi", worker_image()]).is_some(),
            "node-{n} drops the image"
        );
    }
    let mut t = start(pool, &usercode(1), &image).await;
    let outcome = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(async {
        t.status_with("ready", "running revision 1 in 3 replica(s)")
            .await;
        let pinned = on_manager(&[
            "service",
            "inspect",
            "-f",
            "{{.Spec.TaskTemplate.ContainerSpec.Image}}",
            &t.service_name(),
        ]);
        assert!(
            pinned.starts_with(&format!("{REGISTRY}/workerctl/dockerworker@sha256:")),
            "the service runs the registry's digest: {pinned}"
        );
        assert_spread_and_answering(&mut t, 1).await;
        // The nodes other than the manager that run a task pulled it.
        let tasks = t.tasks_running();
        let pulled: Vec<&String> = tasks.values().filter(|node| *node != "node-1").collect();
        assert!(!pulled.is_empty(), "every task on the manager: {tasks:?}");
        for node in pulled {
            let n: u32 = node.trim_start_matches("node-").parse().expect("node-N");
            let images = on_node(
                n,
                &[
                    "image",
                    "ls",
                    "-q",
                    &format!("{REGISTRY}/workerctl/dockerworker"),
                ],
            );
            assert!(
                images.is_some_and(|ids| !ids.is_empty()),
                "{node} runs a task but has no image from the registry"
            );
        }

        // A new image pushed under the same tag rolls out to every node.
        let rebuilt = OwnImage::build();
        swarm_nodes(&["load", &rebuilt.0, "node-1"]);
        on_manager(&["tag", &rebuilt.0, &image]);
        on_manager(&["push", &image]);
        let start = Instant::now();
        loop {
            let now = on_manager(&[
                "service",
                "inspect",
                "-f",
                "{{.Spec.TaskTemplate.ContainerSpec.Image}}",
                &t.service_name(),
            ]);
            let (status, info) = t.status().await;
            if now != pinned && status == "ready" && info.contains("running revision 1 in 3") {
                break;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "the pushed image did not roll out within {DEADLINE:?}: {now}; {status}: {info}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        // Where the new tasks land is Swarm's choice (a node that has the
        // image pulls nothing): all three run and answer.
        assert_eq!(t.tasks_running().len(), 3, "{:?}", t.tasks_running());
        let numbers: BTreeSet<usize> = t.round(1, 30).await.into_iter().map(|(n, _)| n).collect();
        assert_eq!(numbers.len(), 30, "each message answered once");
        drop(rebuilt);
    }))
    .await;
    t.cleanup().await;
    drop(nodes);
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}
