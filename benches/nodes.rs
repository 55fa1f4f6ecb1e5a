//! The Swarm backend on a real three-node swarm (`scripts/swarm-nodes`),
//! each figure beside Swarm's own doing the same in the same run:
//!
//! 1. **A node killed → all replicas running again.** A worker with
//!    `min = max = 3` (the real dockerworker, answering every message) and
//!    a plain service of three `sleep` tasks (the same restart policy,
//!    restart delay and network; no health check) both have a task on a worker node, which is
//!    killed (`docker kill` of its container: every process at once) while
//!    messages are published steadily (confirmed, `BENCH_NODES_RATE` a
//!    second). Timed from the kill, polled every 100 ms on the manager:
//!    when it marks the node down; when each service has three tasks
//!    running on the other nodes (for the worker: passed its readiness
//!    probe); when the worker's status first names the node. Then every
//!    confirmed message is waited for (up to 90 s): lost = published and
//!    never answered; twice = answered more than once (redelivered after
//!    the loss). The node is started again and the round waits until it is
//!    ready.
//! 2. **A save → all replicas on the new revision, across the nodes.** The
//!    worker's code saved (`UPDATE user_workers … revision + 1`, timed from
//!    its commit), beside `docker service update --detach` of an identical
//!    service (the worker's service spec, copied under another name and
//!    instance label, so the daemon leaves it alone; the update sets the
//!    environment the worker's service has by then, its code's revision
//!    and digest, and a new container label). Done when exactly three task containers run,
//!    counted on the three nodes' own engines, all of the new revision (or
//!    label) and healthy. The order alternates round by round. The rollouts
//!    also spread the tasks again over the nodes (Swarm does not rebalance
//!    after a node returns), and the plain service is spread again with
//!    `docker service update --force`, so that the next round's node has a
//!    task of each.
//!
//! Rounds alternate the killed node (node-2, node-3). Figures are printed,
//! never asserted. Needs Postgres (`DATABASE_URL`; the role must be allowed
//! to create a database), RabbitMQ (`AMQP_URL`, listening on all addresses:
//! the tasks reach it at the nodes' gateway) and the images of
//! scripts/build-images; makes the nodes itself and removes them at the
//! end (taking turns with tests/multinode.rs through its lock file).
//!
//! Run: `scripts/bench --nodes` or `cargo bench --bench nodes`. Settings:
//! BENCH_NODES_ROUNDS (3), BENCH_NODES_RATE (40 messages a second),
//! BENCH_NODES_RESTART_DELAY_MS (`swarm.restart_delay`, default 5000: Swarm
//! starts a task lost with its node only after it, as after an exit).
//! docs/benchmarks.md records the figures.

#[path = "../tests/common/nodes.rs"]
mod nodes;

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::net::SocketAddr;
use std::process::{Command, ExitCode};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use bollard::Docker;
use bollard::query_parameters::ListContainersOptionsBuilder;
use common::{Database, amqp_url, count, load_average, lock, median, progress};
use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use nodes::{GATEWAY, LOCK_FILE, node_engine};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;
use workerctl::archive::sensorbucket_archive;
use workerctl::config::{Config, Secret};
use workerctl::daemon::Daemon;
use workerctl::runtime::docker::DockerRuntime;
use workerctl::runtime::swarm::SwarmRuntime;
use workerctl::store::postgres::PgStore;

const WORKER_IMAGE: &str = "workerctl/dockerworker:latest";
const BUSYBOX: &str = "workerctl/busybox:latest";
const PLAIN: &str = "bench-plain";
const REFERENCE: &str = "bench-reference";
/// Only catches a hang.
const DEADLINE: Duration = Duration::from_secs(180);
const POLL: Duration = Duration::from_millis(100);

type Fallible<T> = Result<T, String>;

fn main() -> ExitCode {
    common::bench_main("nodes", || async {
        match run().await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bench: FAILED: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// The docker CLI; against node `n`'s engine if given.
fn docker(node: Option<u32>, args: &[&str]) -> Fallible<String> {
    let mut cmd = Command::new("docker");
    if let Some(n) = node {
        cmd.args(["-H", &node_engine(n)]);
    }
    let out = cmd.args(args).output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn manager(args: &[&str]) -> Fallible<String> {
    docker(Some(1), args)
}

fn swarm_nodes(args: &[&str]) -> Fallible<()> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/swarm-nodes");
    let out = Command::new(script)
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "scripts/swarm-nodes {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn now_ms() -> i64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH);
    since.map_or(0, |d| d.as_millis() as i64)
}

/// The usercode of revision `version`: answers with it.
fn usercode(version: u32) -> String {
    format!("def process(msg):\n    msg.metadata[\"version\"] = {version}\n    return msg\n")
}

async fn run() -> Fallible<()> {
    let rounds = count("BENCH_NODES_ROUNDS", 3);
    let rate = count("BENCH_NODES_RATE", 40).max(1);
    let restart_delay = Duration::from_millis(count(
        "BENCH_NODES_RESTART_DELAY_MS",
        Config::default().swarm.restart_delay.as_millis() as usize,
    ) as u64);
    let turn = File::create(LOCK_FILE).map_err(|e| e.to_string())?;
    turn.lock().map_err(|e| e.to_string())?;
    swarm_nodes(&["down"])?;
    let load_before = load_average();
    let up = Instant::now();
    swarm_nodes(&["up", WORKER_IMAGE, BUSYBOX])?;
    progress(format_args!(
        "three-node swarm up in {:.1} s",
        secs(up.elapsed())
    ));
    let db = Database::create("bench_nodes").await;
    let outcome = measure(&db.pool, &db.url, rounds, rate, restart_delay).await;
    db.drop().await;
    let _ = swarm_nodes(&["down"]);
    let (failovers, saves) = outcome?;
    print(
        &failovers,
        &saves,
        rate,
        restart_delay,
        &load_before,
        &load_average(),
    );
    Ok(())
}

/// One node-loss round.
struct Failover {
    node: u32,
    down: Option<f64>,
    plain: Option<f64>,
    worker: Option<f64>,
    named: Option<f64>,
    published: usize,
    lost: usize,
    twice: usize,
}

/// One save round: the daemon's, and `docker service update`'s.
struct Save {
    daemon: f64,
    cli: f64,
    daemon_first: bool,
}

struct Bench {
    pool: PgPool,
    worker: Uuid,
    service: String,
    nodes: Vec<Docker>,
    publisher: Channel,
    exchange: String,
    /// The routing key of the step after the worker: the answers' queue.
    next_key: String,
    answers: Arc<Mutex<BTreeMap<usize, usize>>>,
    next_n: usize,
    revision: u32,
}

async fn measure(
    pool: &PgPool,
    url: &str,
    rounds: usize,
    rate: usize,
    restart_delay: Duration,
) -> Fallible<(Vec<Failover>, Vec<Save>)> {
    let chain = |e: &dyn std::fmt::Display| e.to_string();
    let tag = Uuid::new_v4().simple().to_string();
    let instance = format!("b{}", &tag[..10]);
    let exchange = format!("pipeline.messages.bench-{tag}");
    let next_key = format!("storage-{tag}");
    let next_queue = format!("{exchange}.next");
    let mut broker = reqwest::Url::parse(&amqp_url()).map_err(|e| chain(&e))?;
    let gateway = std::net::Ipv4Addr::from(GATEWAY).to_string();
    broker.set_host(Some(&gateway)).map_err(|e| chain(&e))?;
    let broker = broker.to_string();

    let amqp = Connection::connect(&broker, ConnectionProperties::default())
        .await
        .map_err(|e| format!("RabbitMQ at the gateway: {e}"))?;
    let publisher = amqp.create_channel().await.map_err(|e| chain(&e))?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| chain(&e))?;
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
        .map_err(|e| chain(&e))?;
    let channel = amqp.create_channel().await.map_err(|e| chain(&e))?;
    channel
        .queue_declare(
            next_queue.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| chain(&e))?;
    channel
        .queue_bind(
            next_queue.as_str().into(),
            exchange.as_str().into(),
            next_key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| chain(&e))?;
    let no_ack = BasicConsumeOptions {
        no_ack: true,
        ..BasicConsumeOptions::default()
    };
    let mut next = channel
        .basic_consume(
            next_queue.as_str().into(),
            "".into(),
            no_ack,
            FieldTable::default(),
        )
        .await
        .map_err(|e| chain(&e))?;
    let answers: Arc<Mutex<BTreeMap<usize, usize>>> = Arc::default();
    let collected = answers.clone();
    tokio::spawn(async move {
        while let Some(Ok(delivery)) = next.next().await {
            let body: Value = serde_json::from_slice(&delivery.data).unwrap_or_default();
            if let Some(n) = body["metadata"]["n"].as_u64() {
                *lock(&collected).entry(n as usize).or_default() += 1;
            }
        }
    });

    let worker = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO user_workers (id, name, description, state, language, tenant_id, revision, status, status_info, source, entrypoint)
         VALUES ($1, 'bench', '', 'enabled', 'python', 1, 1, 'unknown', '', $2, 'main.main')",
    )
    .bind(worker)
    .bind(sensorbucket_archive(&usercode(1)).map_err(|e| chain(&e))?)
    .execute(pool)
    .await
    .map_err(|e| chain(&e))?;
    sqlx::query(
        "INSERT INTO workerctl_worker_scale (worker_id, min_replicas, max_replicas) VALUES ($1, 3, 3)",
    )
    .bind(worker)
    .execute(pool)
    .await
    .map_err(|e| chain(&e))?;

    let listener = tokio::net::TcpListener::bind(SocketAddr::from((GATEWAY, 0)))
        .await
        .map_err(|e| chain(&e))?;
    let addr = listener.local_addr().map_err(|e| chain(&e))?;
    let mut config = Config {
        instance: instance.clone(),
        ..Config::default()
    };
    config.database_url = Secret::new(url.to_string());
    config.docker.image = WORKER_IMAGE.into();
    config.docker.network = "host".into();
    config.docker.stop_timeout = Duration::from_secs(10);
    config.code_server.public_url = format!("http://{addr}");
    config.amqp.url = Secret::new(broker.clone());
    config.amqp.exchange = exchange.clone();
    config.swarm.update_monitor = Duration::from_secs(3);
    config.swarm.restart_delay = restart_delay;
    let client = |n: u32| {
        Docker::connect_with_http(
            &node_engine(n).replace("tcp://", "http://"),
            120,
            bollard::API_DEFAULT_VERSION,
        )
        .map_err(|e| chain(&e))
    };
    let swarm = SwarmRuntime::with_client(client(1)?, &instance, config.swarm_options())
        .await
        .map_err(|e| chain(&e))?;
    let runtime = DockerRuntime::with_client(client(1)?, &instance)
        .await
        .map_err(|e| chain(&e))?;
    let store = Arc::new(PgStore::from_pool(pool.clone()));
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    Daemon::new(config, store, Arc::new(runtime))
        .on_swarm(Arc::new(swarm))
        .spawn(listener, &tracker, &shutdown)
        .map_err(|e| chain(&e))?;
    tracker.close();

    let mut bench = Bench {
        pool: pool.clone(),
        worker,
        service: String::new(),
        nodes: vec![client(1)?, client(2)?, client(3)?],
        publisher,
        exchange,
        next_key: next_key.clone(),
        answers,
        next_n: 0,
        revision: 1,
    };
    let outcome = async {
        bench.status_with("ready", "in 3 replica(s)").await?;
        bench.service = manager(&[
            "service",
            "ls",
            "--filter",
            &format!("label=workerctl.worker-id={worker}"),
            "--format",
            "{{.Name}}",
        ])?;
        let busybox = docker(None, &["image", "inspect", "--format", "{{.Id}}", BUSYBOX])?;
        manager(&[
            "service",
            "create",
            "-d",
            "--name",
            PLAIN,
            "--replicas",
            "3",
            "--network",
            "host",
            "--restart-condition",
            "any",
            "--restart-delay",
            &format!("{}ms", restart_delay.as_millis()),
            &busybox,
            "sleep",
            "1000000",
        ])?;
        copy_service(&bench.service, REFERENCE).await?;
        bench.wait_running(PLAIN, 3, None).await?;
        bench.wait_running(REFERENCE, 3, None).await?;
        let mut failovers = vec![];
        let mut saves = vec![];
        for round in 0..rounds {
            let node = 2 + (round % 2) as u32;
            failovers.push(bench.failover(node, rate).await?);
            let f = failovers.last().expect("a round");
            progress(format_args!(
                "round {}: node-{node} killed: down {:?}, plain {:?}, worker {:?}, lost {}",
                round + 1,
                f.down,
                f.plain,
                f.worker,
                f.lost
            ));
            saves.push(bench.save_round(round % 2 == 0, round).await?);
            let s = saves.last().expect("a round");
            progress(format_args!(
                "round {}: save {:.2} s, docker service update {:.2} s",
                round + 1,
                s.daemon,
                s.cli
            ));
        }
        Ok::<_, String>((failovers, saves))
    }
    .await;
    shutdown.cancel();
    let _ = manager(&["service", "rm", PLAIN, REFERENCE]);
    for queue in [
        next_queue.clone(),
        format!("worker_{worker}"),
        format!("worker_{worker}.retry"),
    ] {
        let _ = channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = channel
        .exchange_delete(
            bench.exchange.as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await;
    let _ = amqp.close(200, "bench done".into()).await;
    outcome
}

/// Creates `name`, a service of the spec of `service` under another name
/// and instance label (so no daemon manages it).
async fn copy_service(service: &str, name: &str) -> Fallible<()> {
    let spec = manager(&["service", "inspect", "--format", "{{json .Spec}}", service])?;
    let mut spec: Value = serde_json::from_str(&spec).map_err(|e| e.to_string())?;
    spec["Name"] = json!(name);
    spec["Labels"]["workerctl.instance"] = json!("bench-reference");
    spec["TaskTemplate"]["ContainerSpec"]["Labels"]["workerctl.instance"] =
        json!("bench-reference");
    let url = format!(
        "{}/v1.41/services/create",
        node_engine(1).replace("tcp://", "http://")
    );
    let answer = reqwest::Client::new()
        .post(url)
        .json(&spec)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !answer.status().is_success() {
        return Err(format!(
            "creating {name}: {}",
            answer.text().await.unwrap_or_default()
        ));
    }
    Ok(())
}

impl Bench {
    async fn status(&self) -> Fallible<(String, String)> {
        sqlx::query_as("SELECT status, status_info FROM user_workers WHERE id = $1")
            .bind(self.worker)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| e.to_string())
    }

    async fn status_with(&self, status: &str, fragment: &str) -> Fallible<()> {
        let start = Instant::now();
        loop {
            let (s, info) = self.status().await?;
            if s == status && info.contains(fragment) {
                return Ok(());
            }
            if start.elapsed() > DEADLINE {
                return Err(format!(
                    "no status {status} saying {fragment:?}: {s}: {info}"
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until `service` has `n` tasks running, on no node `but`.
    async fn wait_running(&self, service: &str, n: usize, but: Option<u32>) -> Fallible<()> {
        let start = Instant::now();
        while running_tasks(service, but)? != n {
            if start.elapsed() > DEADLINE {
                return Err(format!("{service}: not {n} tasks running"));
            }
            tokio::time::sleep(POLL).await;
        }
        Ok(())
    }

    async fn publish(&mut self) -> Fallible<usize> {
        let n = self.next_n;
        self.next_n += 1;
        let now = now_ms();
        let body = json!({
            "tracing_id": Uuid::new_v4().to_string(),
            "tenant_id": 1,
            "access_token": "bench-access-token",
            "received_at": now,
            "pipeline_id": Uuid::new_v4().to_string(),
            "step_index": 0,
            "pipeline_steps": [self.worker.to_string(), self.next_key],
            "timestamp": now,
            "payload": base64::engine::general_purpose::STANDARD.encode(format!("reading {n}")),
            "metadata": {"n": n},
        });
        let confirm = self
            .publisher
            .basic_publish(
                self.exchange.as_str().into(),
                self.worker.to_string().as_str().into(),
                BasicPublishOptions::default(),
                &serde_json::to_vec(&body).map_err(|e| e.to_string())?,
                BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2),
            )
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        if confirm.is_ack() {
            Ok(n)
        } else {
            Err("the broker refused a publish".into())
        }
    }

    /// Kills node `node` under traffic; see the module docs.
    async fn failover(&mut self, node: u32, rate: usize) -> Fallible<Failover> {
        let gap = Duration::from_secs(1) / rate as u32;
        let mut published = BTreeSet::new();
        // Two seconds of traffic before the kill.
        for _ in 0..2 * rate {
            published.insert(self.publish().await?);
            tokio::time::sleep(gap).await;
        }
        // The node asked for, else the other worker node, if it holds a
        // task of the worker; the plain service is timed if it had one there.
        let worker_nodes = task_nodes(&self.service)?;
        let node = [node, 5 - node]
            .into_iter()
            .find(|n| worker_nodes.contains(&format!("node-{n}")))
            .ok_or_else(|| {
                format!("no task of the worker on node-2 or node-3: {worker_nodes:?}")
            })?;
        let hostname = format!("node-{node}");
        let plain_held = task_nodes(PLAIN)?.contains(&hostname);
        docker(None, &["kill", &format!("workerctl-node-{node}")])?;
        let killed = Instant::now();
        let mut f = Failover {
            node,
            down: None,
            plain: None,
            worker: None,
            named: None,
            published: 0,
            lost: 0,
            twice: 0,
        };
        let mut last_poll = Instant::now() - POLL;
        while (plain_held && f.plain.is_none()) || f.worker.is_none() || f.named.is_none() {
            if killed.elapsed() > DEADLINE {
                return Err(format!(
                    "node-{node}: not recovered: {:?}",
                    self.status().await?
                ));
            }
            published.insert(self.publish().await?);
            tokio::time::sleep(gap).await;
            if last_poll.elapsed() < POLL {
                continue;
            }
            last_poll = Instant::now();
            let at = secs(killed.elapsed());
            if f.down.is_none()
                && manager(&[
                    "node",
                    "inspect",
                    &hostname,
                    "--format",
                    "{{.Status.State}}",
                ])? == "down"
            {
                f.down = Some(at);
            }
            if plain_held && f.plain.is_none() && running_tasks(PLAIN, Some(node))? == 3 {
                f.plain = Some(at);
            }
            if f.worker.is_none() && running_tasks(&self.service, Some(node))? == 3 {
                f.worker = Some(at);
            }
            if f.named.is_none()
                && self
                    .status()
                    .await?
                    .1
                    .contains(&format!("{hostname} not ready"))
            {
                f.named = Some(at);
            }
        }
        // Two seconds more, then every answer.
        for _ in 0..2 * rate {
            published.insert(self.publish().await?);
            tokio::time::sleep(gap).await;
        }
        let waiting = Instant::now();
        loop {
            let answered = lock(&self.answers).clone();
            let missing = published
                .iter()
                .filter(|n| !answered.contains_key(n))
                .count();
            if missing == 0 || waiting.elapsed() > Duration::from_secs(90) {
                f.published = published.len();
                f.lost = missing;
                f.twice = published
                    .iter()
                    .filter(|n| answered.get(n).is_some_and(|c| *c > 1))
                    .count();
                break;
            }
            tokio::time::sleep(POLL).await;
        }
        docker(None, &["start", &format!("workerctl-node-{node}")])?;
        let back = Instant::now();
        while manager(&[
            "node",
            "inspect",
            &hostname,
            "--format",
            "{{.Status.State}}",
        ])? != "ready"
            || docker(
                Some(node),
                &["info", "--format", "{{.Swarm.LocalNodeState}}"],
            )
            .ok()
            .as_deref()
                != Some("active")
        {
            if back.elapsed() > DEADLINE {
                return Err(format!("node-{node} does not come back"));
            }
            tokio::time::sleep(POLL).await;
        }
        Ok(f)
    }

    /// A save of the worker and `docker service update` of the reference,
    /// in the order given; then the plain service spread again.
    async fn save_round(&mut self, daemon_first: bool, round: usize) -> Fallible<Save> {
        let mut daemon = 0.0;
        let mut cli = 0.0;
        for first in [true, false] {
            if first == daemon_first {
                daemon = self.save().await?;
            } else {
                cli = self.cli_update(round).await?;
            }
        }
        manager(&["service", "update", "-d", "--force", PLAIN])?;
        // Spread again: a task on every node.
        let start = Instant::now();
        while !(1..=3)
            .all(|n| task_nodes(PLAIN).is_ok_and(|nodes| nodes.contains(&format!("node-{n}"))))
        {
            if start.elapsed() > DEADLINE {
                return Err(format!("{PLAIN} not spread again: {:?}", task_nodes(PLAIN)));
            }
            tokio::time::sleep(POLL).await;
        }
        Ok(Save {
            daemon,
            cli,
            daemon_first,
        })
    }

    async fn save(&mut self) -> Fallible<f64> {
        self.revision += 1;
        let code = sensorbucket_archive(&usercode(self.revision)).map_err(|e| e.to_string())?;
        sqlx::query("UPDATE user_workers SET source = $1, revision = revision + 1 WHERE id = $2")
            .bind(code)
            .bind(self.worker)
            .execute(&self.pool)
            .await
            .map_err(|e| e.to_string())?;
        let saved = Instant::now();
        let revision = self.revision.to_string();
        self.until_all(
            &self.service.clone(),
            "workerctl.revision",
            &revision,
            saved,
        )
        .await
    }

    /// The reference service updated by the CLI to what the worker's
    /// service runs now (its environment: the code's revision and digest)
    /// and a new container label, so that every round rolls it out.
    async fn cli_update(&mut self, round: usize) -> Fallible<f64> {
        let env = manager(&[
            "service",
            "inspect",
            &self.service,
            "--format",
            "{{json .Spec.TaskTemplate.ContainerSpec.Env}}",
        ])?;
        let env: Vec<String> = serde_json::from_str(&env).map_err(|e| e.to_string())?;
        let bump = format!("workerctl.bench.bump={round}");
        let mut args = vec!["service", "update", "-d", "--container-label-add", &bump];
        for var in &env {
            args.extend(["--env-add", var.as_str()]);
        }
        args.push(REFERENCE);
        let started = Instant::now();
        manager(&args)?;
        self.until_all(
            REFERENCE,
            "workerctl.bench.bump",
            &round.to_string(),
            started,
        )
        .await
    }

    /// Seconds from `since` until exactly three task containers of
    /// `service` run, on the nodes' own engines, all healthy and labelled
    /// `key=value`.
    async fn until_all(
        &self,
        service: &str,
        key: &str,
        value: &str,
        since: Instant,
    ) -> Fallible<f64> {
        let filter = HashMap::from([(
            "label",
            vec![format!("com.docker.swarm.service.name={service}")],
        )]);
        loop {
            let mut running = vec![];
            for node in &self.nodes {
                let options = ListContainersOptionsBuilder::default()
                    .filters(&filter)
                    .build();
                let listed = node
                    .list_containers(Some(options))
                    .await
                    .map_err(|e| e.to_string())?;
                running.extend(listed);
            }
            let done = running.len() == 3
                && running.iter().all(|c| {
                    let healthy = c.status.as_deref().is_some_and(|s| s.contains("(healthy)"));
                    let labelled = c
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(key))
                        .is_some_and(|v| v == value);
                    healthy && labelled
                });
            if done {
                return Ok(secs(since.elapsed()));
            }
            if since.elapsed() > DEADLINE {
                return Err(format!("{service}: not all at {key}={value}"));
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// The nodes of `service`'s running tasks.
fn task_nodes(service: &str) -> Fallible<Vec<String>> {
    let tasks = manager(&[
        "service",
        "ps",
        service,
        "--filter",
        "desired-state=running",
        "--format",
        "{{.Node}} {{.CurrentState}}",
    ])?;
    Ok(tasks
        .lines()
        .filter(|l| l.contains(" Running"))
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .collect())
}

/// How many of `service`'s tasks run, on no node `but`.
fn running_tasks(service: &str, but: Option<u32>) -> Fallible<usize> {
    let but = but.map(|n| format!("node-{n}"));
    Ok(task_nodes(service)?
        .iter()
        .filter(|node| Some(*node) != but.as_ref())
        .count())
}

fn print(
    failovers: &[Failover],
    saves: &[Save],
    rate: usize,
    restart_delay: Duration,
    before: &str,
    after: &str,
) {
    let opt = |v: Option<f64>| v.map_or_else(|| "—".to_string(), |v| format!("{v:.2} s"));
    println!();
    println!("Load average (1/5/15 min) {before} at the start, {after} at the end.");
    println!();
    println!(
        "A node killed under traffic ({rate} msg/s) → 3 replicas running again, from the kill \
         (restart delay {:.1} s, both services):",
        secs(restart_delay)
    );
    println!();
    println!(
        "| round | node   | marked down | plain service (Swarm) | workerctl worker | status names the node | published | lost | answered twice |"
    );
    println!(
        "|-------|--------|-------------|-----------------------|------------------|-----------------------|-----------|------|----------------|"
    );
    for (i, f) in failovers.iter().enumerate() {
        println!(
            "| {:>5} | node-{} | {:>11} | {:>21} | {:>16} | {:>21} | {:>9} | {:>4} | {:>14} |",
            i + 1,
            f.node,
            opt(f.down),
            opt(f.plain),
            opt(f.worker),
            opt(f.named),
            f.published,
            f.lost,
            f.twice
        );
    }
    let med = |v: Vec<f64>| {
        if v.is_empty() {
            "—".to_string()
        } else {
            format!("{:.2} s", median(v))
        }
    };
    println!(
        "| median |       | {:>11} | {:>21} | {:>16} | {:>21} |           | {:>4} |                |",
        med(failovers.iter().filter_map(|f| f.down).collect()),
        med(failovers.iter().filter_map(|f| f.plain).collect()),
        med(failovers.iter().filter_map(|f| f.worker).collect()),
        med(failovers.iter().filter_map(|f| f.named).collect()),
        failovers.iter().map(|f| f.lost).sum::<usize>(),
    );
    println!();
    println!("A save → all 3 replicas healthy at the new revision across the nodes:");
    println!();
    println!(
        "| round | first          | workerctl: dashboard save | docker service update (identical service) |"
    );
    println!(
        "|-------|----------------|---------------------------|-------------------------------------------|"
    );
    for (i, s) in saves.iter().enumerate() {
        let first = if s.daemon_first {
            "save"
        } else {
            "service update"
        };
        println!(
            "| {:>5} | {first:<14} | {:>25} | {:>41} |",
            i + 1,
            format!("{:.2} s", s.daemon),
            format!("{:.2} s", s.cli)
        );
    }
    println!(
        "| median |               | {:>25} | {:>41} |",
        format!("{:.2} s", median(saves.iter().map(|s| s.daemon))),
        format!("{:.2} s", median(saves.iter().map(|s| s.cli)))
    );
}
