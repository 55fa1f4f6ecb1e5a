//! Recorded traffic and trying code on it, end to end: a real daemon records
//! a real dockerworker's messages from RabbitMQ into Postgres, and `worker
//! try` (CLI and HTTP) replays them through candidate code in a throwaway
//! container of the worker's image. Each test has a fresh database, its own
//! instance and its own exchange.
//!
//! Without Postgres, Docker, RabbitMQ or the images (`scripts/build-images`)
//! these tests fail; they never skip.

mod common;
#[path = "common/harness.rs"]
mod harness;

use std::process::Command as StdCommand;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use harness::{Cli, Daemon, Terminal, s, save};

const TOKEN: &str = "test-token-0123456789";
const DEADLINE: Duration = Duration::from_secs(90);

/// The current revision: a measurement of the payload's number; raises on "bad".
const CURRENT_PY: &str = "\
def process(msg):
    text = msg.payload.decode()
    if text == 'bad':
        raise ValueError('bad payload')
    msg.create_measurement(int(text), 'count', '1').add()
    return msg
";
/// The candidate: doubles 2, raises on 3, lets 'bad' through.
const CANDIDATE_PY: &str = "\
def process(msg):
    text = msg.payload.decode()
    if text == 'bad':
        return msg
    if text == '3':
        raise KeyError('three')
    n = int(text)
    msg.create_measurement(n * 2 if n == 2 else n, 'count', '1').add()
    return msg
";

/// The worker image: `TEST_WORKER_IMAGE` (a locally built variant),
/// else the one scripts/build-images makes.
fn worker_image() -> String {
    std::env::var("TEST_WORKER_IMAGE").unwrap_or_else(|_| common::worker_image().into())
}

/// A daemon recording at most `keep` messages per worker, with the write API on.
async fn recording(pool: PgPool, keep: usize) -> (Cli, Daemon) {
    recording_with(pool, keep, &worker_image()).await
}

/// [`recording`], its workers on `image`.
async fn recording_with(pool: PgPool, keep: usize, image: &str) -> (Cli, Daemon) {
    let mut cli = Cli::new(pool).await;
    cli.set("WORKERCTL_API__TOKEN", TOKEN);
    cli.set("WORKERCTL_RECORD__KEEP", &keep.to_string());
    cli.set("WORKERCTL_DEAD_LETTERS__ENABLED", "false");
    let exchange = format!("pipeline.messages.rec-test-{}", Uuid::new_v4().simple());
    cli.set("WORKERCTL_AMQP__EXCHANGE", &exchange);
    cli.set("WORKERCTL_DOCKER__IMAGE", image);
    let mut daemon = Daemon::start(&mut cli, image).await;
    daemon
        .queues
        .push(format!("workerctl.record.outputs.{}", daemon.instance));
    daemon.exchange = Some(exchange);
    (cli, daemon)
}

async fn create(cli: &Cli, daemon: &mut Daemon, name: &str, code: &str) -> Uuid {
    let id = cli.create(name, code, &["--wait"]).await;
    daemon.remember(id);
    daemon.queues.push(format!("workerctl.record.{id}"));
    id
}

fn message(worker: Uuid, next: &str, payload: &str, tracing_id: &str) -> Vec<u8> {
    use base64::Engine as _;
    let body = json!({
        "tracing_id": tracing_id, "tenant_id": 1, "access_token": "", "received_at": 1,
        "pipeline_id": "p", "step_index": 0, "pipeline_steps": [worker.to_string(), next],
        "timestamp": 1_700_000_000_000_i64,
        "payload": base64::engine::general_purpose::STANDARD.encode(payload),
    });
    serde_json::to_vec(&body).expect("json")
}

struct Broker {
    connection: lapin::Connection,
    channel: lapin::Channel,
    exchange: String,
}

impl Broker {
    async fn open(daemon: &Daemon) -> Broker {
        let connection =
            lapin::Connection::connect(&common::amqp_url(), lapin::ConnectionProperties::default())
                .await
                .expect("the broker answers");
        let channel = connection.create_channel().await.expect("channel");
        let exchange = daemon.exchange.clone().expect("exchange");
        let durable = lapin::options::ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .exchange_declare(
                exchange.as_str().into(),
                lapin::ExchangeKind::Topic,
                durable,
                Default::default(),
            )
            .await
            .expect("exchange");
        Broker {
            connection,
            channel,
            exchange,
        }
    }

    async fn publish(&self, key: &str, body: &[u8]) {
        self.channel
            .basic_publish(
                self.exchange.as_str().into(),
                key.into(),
                Default::default(),
                body,
                lapin::BasicProperties::default(),
            )
            .await
            .expect("publish")
            .await
            .expect("sent");
    }

    /// A private queue bound to `keys`, consumed.
    async fn listen(&self, keys: &[&str]) -> lapin::Consumer {
        let private = lapin::options::QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..Default::default()
        };
        let queue = self
            .channel
            .queue_declare("".into(), private, Default::default())
            .await
            .expect("queue");
        for key in keys {
            self.channel
                .queue_bind(
                    queue.name().clone(),
                    self.exchange.as_str().into(),
                    (*key).into(),
                    Default::default(),
                    Default::default(),
                )
                .await
                .expect("bind");
        }
        let no_ack = lapin::options::BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        };
        self.channel
            .basic_consume(queue.name().clone(), "t".into(), no_ack, Default::default())
            .await
            .expect("consume")
    }
}

async fn next_body(consumer: &mut lapin::Consumer) -> Value {
    let delivery = tokio::time::timeout(DEADLINE, consumer.next())
        .await
        .expect("a message within the deadline")
        .expect("stream open")
        .expect("delivery");
    serde_json::from_slice(&delivery.data).expect("json")
}

/// Polls `worker messages --output json` until `ready` holds for the list.
async fn messages_until(
    cli: &Cli,
    daemon: &Daemon,
    worker: &str,
    ready: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let start = Instant::now();
    loop {
        let out = cli
            .run(&[
                "worker", "messages", worker, "--last", "100", "--output", "json",
            ])
            .await
            .ok();
        let list: Vec<Value> = serde_json::from_str(&out.stdout).expect("a JSON list");
        if ready(&list) {
            return list;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the recorded messages never got there: {list:#?}\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn try_containers(worker: Uuid) -> String {
    let out = StdCommand::new("docker")
        .args([
            "ps",
            "-aq",
            "--filter",
            &format!("label=workerctl.try={worker}"),
        ])
        .output()
        .expect("docker ps");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[sqlx::test(migrations = false)]
async fn recording_keeps_the_newest_with_their_outputs_and_loses_no_pipeline_message(pool: PgPool) {
    let (cli, mut daemon) = recording(pool, 5).await;
    let id = create(&cli, &mut daemon, "counter", CURRENT_PY).await;
    let broker = Broker::open(&daemon).await;
    let next = format!("next-{}", Uuid::new_v4().simple());
    let mut downstream = broker.listen(&[&next]).await;
    warm_up(&cli, &daemon, &broker, id, &next, &mut downstream).await;
    for n in 1..=12 {
        let body = message(id, &next, &n.to_string(), &format!("t-{n}"));
        broker.publish(&id.to_string(), &body).await;
    }
    let mut seen = Vec::new();
    for _ in 1..=12 {
        seen.push(next_body(&mut downstream).await["tracing_id"].clone());
    }
    let want: Vec<Value> = (1..=12).map(|n| json!(format!("t-{n}"))).collect();
    seen.sort_by_key(|v| v.as_str().map(|s| s[2..].parse::<u32>().unwrap_or(0)));
    assert_eq!(seen, want, "every pipeline message reached the next step");
    let newest = |l: &[Value]| {
        l.first().and_then(|m| m["tracing_id"].as_str()) == Some("t-12")
            && l.iter().all(|m| m["output_key"] == json!(next))
    };
    let list = messages_until(&cli, &daemon, "counter", newest).await;
    let traces: Vec<&str> = list
        .iter()
        .filter_map(|m| m["tracing_id"].as_str())
        .collect();
    assert_eq!(
        traces,
        ["t-12", "t-11", "t-10", "t-9", "t-8"],
        "the newest 5, newest first"
    );
    assert_eq!(list[0]["message"]["payload"], json!("MTI="), "as received");
    assert_eq!(list[0]["output"]["measurements"][0]["value"], json!(12));
    let shown = cli
        .run(&[
            "worker",
            "messages",
            "counter",
            "--show",
            &list[0]["id"].to_string(),
        ])
        .await
        .ok();
    assert!(
        shown.stdout.contains(&format!("output on {next}")),
        "{}",
        shown.stdout
    );
    let table = cli
        .run(&["worker", "messages", "counter", "--last", "2"])
        .await
        .ok();
    assert_eq!(
        table.stdout.lines().count(),
        3,
        "a header and two lines: {}",
        table.stdout
    );
}

/// Publishes `t-<n>` (payload n) for each `n` of `numbers` and waits until
/// the next step has seen as many.
async fn send_numbered(
    broker: &Broker,
    downstream: &mut lapin::Consumer,
    id: Uuid,
    next: &str,
    numbers: std::ops::RangeInclusive<u32>,
) {
    for n in numbers.clone() {
        let body = message(id, next, &n.to_string(), &format!("t-{n}"));
        broker.publish(&id.to_string(), &body).await;
    }
    for _ in numbers {
        next_body(downstream).await;
    }
}

/// Sends a message through the worker until one is recorded: the daemon
/// taps a worker within a refresh (2 s) of its queue existing, and `worker
/// messages` reads the tap into the table.
async fn warm_up(
    cli: &Cli,
    daemon: &Daemon,
    broker: &Broker,
    id: Uuid,
    next: &str,
    downstream: &mut lapin::Consumer,
) {
    let start = Instant::now();
    loop {
        let body = message(id, next, "0", "warm-up");
        broker.publish(&id.to_string(), &body).await;
        next_body(downstream).await;
        let out = cli
            .run(&[
                "worker",
                "messages",
                &id.to_string(),
                "--last",
                "1",
                "--output",
                "json",
            ])
            .await
            .ok();
        let listed: Vec<Value> = serde_json::from_str(&out.stdout).expect("a JSON list");
        if !listed.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "never recorded: {}\n{}",
            out.stderr,
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A worker's tap, as the broker has it: (messages, consumers).
async fn tap(broker: &Broker, worker: Uuid) -> (u32, u32) {
    let channel = broker.connection.create_channel().await.expect("channel");
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let q = channel
        .queue_declare(
            format!("workerctl.record.{worker}").as_str().into(),
            passive,
            Default::default(),
        )
        .await
        .expect("the tap exists");
    let _ = channel.close(200, "done".into()).await;
    (q.message_count(), q.consumer_count())
}

/// (id, tracing id) of what `worker messages` lists, newest first.
async fn listed(cli: &Cli, worker: &str) -> Vec<(i64, String)> {
    let out = cli
        .run(&[
            "worker", "messages", worker, "--last", "100", "--output", "json",
        ])
        .await
        .ok();
    let list: Vec<Value> = serde_json::from_str(&out.stdout).expect("a JSON list");
    list.iter()
        .map(|m| {
            (
                m["id"].as_i64().unwrap_or(-1),
                m["tracing_id"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// The messages in a worker's tap, oldest first, left in place (taken
/// unacknowledged, then the channel is closed): whether each is a batch of
/// records its worker sent, and the tracing ids of those that are copies.
async fn tap_contents(broker: &Broker, worker: Uuid) -> (Vec<bool>, Vec<String>) {
    let channel = broker.connection.create_channel().await.expect("channel");
    let (mut batches, mut copies) = (Vec::new(), Vec::new());
    while let Some(got) = channel
        .basic_get(
            format!("workerctl.record.{worker}").as_str().into(),
            lapin::options::BasicGetOptions { no_ack: false },
        )
        .await
        .expect("get")
    {
        let batch = got
            .delivery
            .properties
            .headers()
            .as_ref()
            .is_some_and(|h| h.inner().contains_key("x-workerctl-records"));
        if !batch {
            let body: Value = serde_json::from_slice(&got.delivery.data).expect("json");
            copies.push(body["tracing_id"].as_str().unwrap_or("").to_string());
        }
        batches.push(batch);
    }
    let _ = channel.close(200, "done".into()).await;
    (batches, copies)
}

/// The exchanges a worker's tap is bound from ("" is the default exchange,
/// which every queue is bound to), through the management API.
async fn tap_bindings(worker: Uuid) -> Vec<String> {
    let url = format!(
        "{}/api/queues/%2f/workerctl.record.{worker}/bindings",
        common::management_url().trim_end_matches('/')
    );
    let bindings: Vec<Value> = reqwest::Client::new()
        .get(&url)
        .basic_auth("workerctl", Some("workerctl"))
        .send()
        .await
        .expect("the management API answers")
        .json()
        .await
        .expect("a JSON list");
    bindings
        .iter()
        .map(|b| b["source"].as_str().unwrap_or("?").to_string())
        .collect()
}

/// What `worker messages` lists once its newest is `newest`.
async fn listed_until(
    cli: &Cli,
    daemon: &Daemon,
    worker: &str,
    newest: &str,
) -> Vec<(i64, String)> {
    let start = Instant::now();
    loop {
        let list = listed(cli, worker).await;
        if list.first().is_some_and(|(_, t)| t == newest) {
            return list;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{newest} was never listed: {list:?}\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[sqlx::test(migrations = false)]
async fn a_worker_that_records_itself_sends_batches_and_is_copied_nothing(pool: PgPool) {
    let (cli, mut daemon) = recording(pool, 5).await;
    let id = create(&cli, &mut daemon, "reader", CURRENT_PY).await;
    let broker = Broker::open(&daemon).await;
    let next = format!("next-{}", Uuid::new_v4().simple());
    let mut downstream = broker.listen(&[&next]).await;
    warm_up(&cli, &daemon, &broker, id, &next, &mut downstream).await;
    send_numbered(&broker, &mut downstream, id, &next, 1..=12).await;
    let first = listed_until(&cli, &daemon, "reader", "t-12").await;
    let traces: Vec<&str> = first.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(traces, ["t-12", "t-11", "t-10", "t-9", "t-8"]);
    assert_eq!(
        tap_bindings(id).await,
        [""],
        "the tap is bound to nothing but the default exchange: the broker copies no message"
    );
    let (_, copies) = tap_contents(&broker, id).await;
    assert!(copies.is_empty(), "no copy in the tap: {copies:?}");
    assert_eq!(
        tap(&broker, id).await.1,
        1,
        "the daemon takes the batches as they come"
    );
    assert_eq!(
        listed(&cli, "reader").await,
        first,
        "a second read stores nothing again"
    );
    send_numbered(&broker, &mut downstream, id, &next, 13..=14).await;
    let after = listed_until(&cli, &daemon, "reader", "t-14").await;
    let traces: Vec<&str> = after.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(traces, ["t-14", "t-13", "t-12", "t-11", "t-10"]);
    assert_eq!(
        after[2..],
        first[..3],
        "what was read before keeps its row (and its arrival time)"
    );

    // The status page, while it is read, has the taps read for it (in the
    // background: a later view shows what an earlier one asked for).
    broker
        .publish(&id.to_string(), &message(id, &next, "15", "t-15"))
        .await;
    next_body(&mut downstream).await;
    let url = format!("http://127.0.0.1:{}/api/workers", daemon.port);
    let start = Instant::now();
    loop {
        let view: Value = reqwest::get(&url)
            .await
            .expect("answer")
            .json()
            .await
            .expect("json");
        if view["recent_messages"][0]["tracing_id"] == "t-15" {
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the status page never showed t-15: {view}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // A message that says when it was published (the `timestamp` header a
    // worker runtime adds, Unix ms) arrived then; one that does not, when
    // its worker took it.
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(
        "timestamp".into(),
        lapin::types::AMQPValue::LongLongInt(1_700_000_000_000),
    );
    broker
        .channel
        .basic_publish(
            broker.exchange.as_str().into(),
            id.to_string().as_str().into(),
            Default::default(),
            &message(id, &next, "16", "t-16"),
            lapin::BasicProperties::default().with_headers(headers),
        )
        .await
        .expect("publish")
        .await
        .expect("sent");
    next_body(&mut downstream).await;
    listed_until(&cli, &daemon, "reader", "t-16").await;
    let out = cli
        .run(&[
            "worker", "messages", "reader", "--last", "2", "--output", "json",
        ])
        .await
        .ok();
    let list: Vec<Value> = serde_json::from_str(&out.stdout).expect("a JSON list");
    assert_eq!(list[0]["tracing_id"], "t-16");
    assert_eq!(list[0]["received_at"], "2023-11-14T22:13:20Z");
    assert_eq!(list[1]["tracing_id"], "t-15");
    assert_ne!(list[1]["received_at"], "2023-11-14T22:13:20Z");
    let _ = broker.connection.close(200, "done".into()).await;
}

#[sqlx::test(migrations = false)]
async fn a_save_keeps_what_the_revision_before_it_recorded(pool: PgPool) {
    let (cli, mut daemon) = recording(pool, 10).await;
    let id = create(&cli, &mut daemon, "saved", CURRENT_PY).await;
    let broker = Broker::open(&daemon).await;
    let next = format!("next-{}", Uuid::new_v4().simple());
    let mut downstream = broker.listen(&[&next]).await;
    warm_up(&cli, &daemon, &broker, id, &next, &mut downstream).await;
    send_numbered(&broker, &mut downstream, id, &next, 1..=3).await;
    // What revision 1 recorded reached the table through its batches only:
    // nobody reads the tap meanwhile.
    let code = cli.dir.path().join("candidate.py");
    save(&code, CANDIDATE_PY.as_bytes());
    cli.run(&["worker", "update", "saved", "--code", s(&code), "--wait"])
        .await
        .ok();
    send_numbered(&broker, &mut downstream, id, &next, 4..=5).await;
    let list = listed_until(&cli, &daemon, "saved", "t-5").await;
    let traces: Vec<&str> = list.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(
        traces[..5],
        ["t-5", "t-4", "t-3", "t-2", "t-1"],
        "{traces:?}"
    );
    let _ = broker.connection.close(200, "done".into()).await;
}

#[sqlx::test(migrations = false)]
async fn an_image_that_does_not_record_itself_is_tapped_and_read_in_place(pool: PgPool) {
    let (cli, mut daemon) = recording_with(pool, 5, common::contract_worker_image()).await;
    let id = create(
        &cli,
        &mut daemon,
        "copied",
        "def process(msg):\n    return msg\n",
    )
    .await;
    let broker = Broker::open(&daemon).await;
    let next = format!("next-{}", Uuid::new_v4().simple());
    let mut downstream = broker.listen(&[&next]).await;
    warm_up(&cli, &daemon, &broker, id, &next, &mut downstream).await;
    send_numbered(&broker, &mut downstream, id, &next, 1..=12).await;
    assert_eq!(
        tap(&broker, id).await,
        (5, 0),
        "between reads the tap holds the newest record.keep copies, and nobody consumes it"
    );
    let first = listed(&cli, "copied").await;
    let traces: Vec<&str> = first.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(traces, ["t-12", "t-11", "t-10", "t-9", "t-8"]);
    assert_eq!(
        tap(&broker, id).await,
        (5, 0),
        "a read leaves the tap whole"
    );
    assert_eq!(
        listed(&cli, "copied").await,
        first,
        "a second read stores nothing again"
    );
    send_numbered(&broker, &mut downstream, id, &next, 13..=14).await;
    let after = listed(&cli, "copied").await;
    let traces: Vec<&str> = after.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(traces, ["t-14", "t-13", "t-12", "t-11", "t-10"]);
    assert_eq!(
        after[2..],
        first[..3],
        "what was read before keeps its row (and its arrival time)"
    );
    // The broker put every copy back where it was: oldest first.
    let (_, copies) = tap_contents(&broker, id).await;
    assert_eq!(copies, ["t-10", "t-11", "t-12", "t-13", "t-14"]);
    let _ = broker.connection.close(200, "done".into()).await;
}

/// Publishes the fixture and waits until the daemon recorded all of it.
async fn record_fixture(cli: &Cli, daemon: &Daemon, broker: &Broker, id: Uuid, next: &str) {
    let mut downstream = broker.listen(&[next, "errors"]).await;
    warm_up(cli, daemon, broker, id, next, &mut downstream).await;
    for (i, payload) in ["1", "2", "bad", "3"].iter().enumerate() {
        let body = message(id, next, payload, &format!("fixture-{i}"));
        broker.publish(&id.to_string(), &body).await;
    }
    for _ in 0..4 {
        next_body(&mut downstream).await;
    }
    messages_until(cli, daemon, &id.to_string(), |l| {
        l.iter().filter(|m| m["tracing_id"] != "warm-up").count() == 4
    })
    .await;
}

#[sqlx::test(migrations = false)]
async fn try_on_recorded_traffic_reports_each_kind_of_change_and_touches_nothing(pool: PgPool) {
    let (cli, mut daemon) = recording(pool, 50).await;
    let id = create(&cli, &mut daemon, "decoder", CURRENT_PY).await;
    let broker = Broker::open(&daemon).await;
    let next = format!("next-{}", Uuid::new_v4().simple());
    record_fixture(&cli, &daemon, &broker, id, &next).await;
    let mut downstream = broker.listen(&[&next, "errors"]).await;
    let candidate = cli.file("candidate.py", CANDIDATE_PY.as_bytes());

    let out = cli
        .run(&[
            "worker",
            "try",
            "decoder",
            "--code",
            s(&candidate),
            "--last",
            "4",
            "--output",
            "json",
        ])
        .await;
    assert_eq!(out.code, 1, "something changed: {}", out.stderr);
    let report: Value = serde_json::from_str(&out.stdout).expect("a JSON report");
    let changes: Vec<&str> = report["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["change"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(changes, ["unchanged", "changed", "fixed", "now_raises"]);
    assert_eq!(
        report["summary_line"],
        "4 messages: 1 unchanged, 1 changed, 1 now raises, 1 fixed"
    );
    let diff = report["messages"][1]["diff"].to_string();
    assert!(
        diff.contains("~ measurement count (sensor , at 1700000000000): value: 2 → 4"),
        "{diff}"
    );
    let traceback = report["messages"][3]["traceback"].as_str().unwrap_or("");
    assert!(traceback.contains("KeyError: 'three'"), "{traceback}");

    let table = cli
        .run(&[
            "worker",
            "try",
            "decoder",
            "--code",
            s(&candidate),
            "--last",
            "4",
        ])
        .await;
    assert_eq!(table.code, 1);
    assert!(table.stdout.contains("now raises\n"), "{}", table.stdout);
    assert!(
        table
            .stdout
            .ends_with("4 messages: 1 unchanged, 1 changed, 1 now raises, 1 fixed\n")
    );

    let same = cli.file("same.py", CURRENT_PY.as_bytes());
    let unchanged = cli
        .run(&[
            "worker",
            "try",
            "decoder",
            "--code",
            s(&same),
            "--last",
            "4",
        ])
        .await;
    assert_eq!(unchanged.code, 0, "{}", unchanged.stderr);
    assert!(
        unchanged.stdout.ends_with("4 messages: 4 unchanged\n"),
        "{}",
        unchanged.stdout
    );

    let one = cli.file("one.json", br#"{"payload": "Mg=="}"#);
    let by_message = cli
        .run(&[
            "worker",
            "try",
            "decoder",
            "--code",
            s(&candidate),
            "--message",
            s(&one),
        ])
        .await;
    assert_eq!(by_message.code, 1);
    assert!(
        by_message
            .stdout
            .contains("1 message: 0 unchanged, 1 changed"),
        "{}",
        by_message.stdout
    );

    let unknown = cli
        .run(&["worker", "try", "nobody", "--code", s(&candidate)])
        .await;
    assert_eq!(unknown.code, 2, "an error is exit 2: {}", unknown.stderr);
    let broken = cli.file(
        "broken.py",
        b"def process(msg):\n    return msg\n\nx = 1/0\n",
    );
    let invalid = cli
        .run(&["worker", "try", "decoder", "--code", s(&broken)])
        .await;
    assert_eq!(invalid.code, 2, "{}", invalid.stderr);
    assert!(
        invalid.stderr.contains("does not load"),
        "{}",
        invalid.stderr
    );

    // Nothing reached the pipeline: the first thing the next step and
    // `errors` see after all those tries is a marker sent now.
    broker
        .publish(&id.to_string(), &message(id, &next, "7", "marker"))
        .await;
    assert_eq!(next_body(&mut downstream).await["tracing_id"], "marker");
    assert_eq!(try_containers(id), "", "no try container is left behind");
    let _ = broker.connection.close(200, "done".into()).await;
}

#[sqlx::test(migrations = false)]
async fn http_try_answers_the_report_as_json_behind_the_token(pool: PgPool) {
    let (cli, mut daemon) = recording(pool, 50).await;
    let id = create(&cli, &mut daemon, "decoder", CURRENT_PY).await;
    let broker = Broker::open(&daemon).await;
    let next = format!("next-{}", Uuid::new_v4().simple());
    record_fixture(&cli, &daemon, &broker, id, &next).await;
    let url = format!("http://127.0.0.1:{}/api/workers/decoder/try", daemon.port);
    let client = reqwest::Client::new();
    let body = json!({"code": CANDIDATE_PY, "last": 4});
    let refused = client.post(&url).json(&body).send().await.expect("answer");
    assert_eq!(refused.status().as_u16(), 401);
    let answer = client
        .post(&url)
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .expect("answer");
    assert_eq!(answer.status().as_u16(), 200);
    let report: Value = answer.json().await.expect("json");
    assert_eq!(
        report["summary"],
        json!({"messages": 4, "unchanged": 1, "changed": 1, "now_raises": 1, "fixed": 1})
    );
    let bad = json!({"code": "def process(msg:\n", "last": 4});
    let invalid = client
        .post(&url)
        .bearer_auth(TOKEN)
        .json(&bad)
        .send()
        .await
        .expect("answer");
    assert_eq!(invalid.status().as_u16(), 422);
    assert_eq!(try_containers(id), "");

    // The status page's view lists the latest recorded messages without
    // their bodies, and opens one whole.
    let base = format!("http://127.0.0.1:{}", daemon.port);
    let view: Value = client
        .get(format!("{base}/api/workers"))
        .send()
        .await
        .expect("answer")
        .json()
        .await
        .expect("json");
    let recent = view["recent_messages"].as_array().expect("recent messages");
    assert_eq!(recent.len(), 5, "the newest five: {recent:?}");
    assert_eq!(recent[0]["tracing_id"], "fixture-3");
    assert!(recent[0].get("body").is_none() && recent[0].get("message").is_none());
    let opened: Value = client
        .get(format!(
            "{base}/api/workers/{id}/messages/{}",
            recent[0]["id"]
        ))
        .send()
        .await
        .expect("answer")
        .json()
        .await
        .expect("json");
    assert_eq!(opened["message"]["tracing_id"], "fixture-3");
    assert_eq!(opened["output_key"], json!(next), "{opened}");
    let _ = broker.connection.close(200, "done".into()).await;
}

#[sqlx::test(migrations = false)]
async fn dev_mode_with_try_reports_each_save_on_recorded_traffic_and_no_deploy_stores_nothing(
    pool: PgPool,
) {
    let (cli, mut daemon) = recording(pool, 50).await;
    let id = create(&cli, &mut daemon, "decoder", CURRENT_PY).await;
    let broker = Broker::open(&daemon).await;
    let next = format!("next-{}", Uuid::new_v4().simple());
    record_fixture(&cli, &daemon, &broker, id, &next).await;
    let code = cli.file("dev.py", CANDIDATE_PY.as_bytes());
    let term = Terminal::start(
        &cli,
        &[
            "worker",
            "dev",
            "decoder",
            "--code",
            s(&code),
            "--try",
            "4",
            "--no-deploy",
        ],
    );
    let screen = term
        .wait_for(
            "4 messages: 1 unchanged, 1 changed, 1 now raises, 1 fixed",
            1,
        )
        .await;
    assert!(screen.contains("KeyError: 'three'"), "{screen}");
    save(&code, CURRENT_PY.as_bytes());
    term.wait_for("4 messages: 4 unchanged", 1).await;
    term.keys("C-c");
    term.wait_for("worker decoder left as it is", 1).await;
    assert_eq!(cli.row(id).await.revision, 1, "--no-deploy stores nothing");
    assert_eq!(try_containers(id), "", "no try container is left behind");
    let _ = broker.connection.close(200, "done".into()).await;
}
