//! The triggers benchmark (`scripts/bench --triggers`, or `cargo bench
//! --bench triggers`): how late a cron schedule fires, and what an HTTP
//! invoke costs beside `workerctl worker invoke` doing the same.
//!
//! 1. **Fire-time lateness.** The real firing loop (`firing::run` on
//!    Postgres and RabbitMQ, in-process) with one schedule firing every
//!    second for `BENCH_SCHEDULE_SECS` (default 60) seconds. A listener
//!    bound to the worker's routing key takes each message as it is routed;
//!    lateness = when it arrived − its fire time (the `x-workerctl-fire-time`
//!    header). p50 and p99.
//! 2. **Invoke round trip.** The daemon binary (`workerctl run`) with the
//!    real dockerworker; one echo worker. `POST /api/workers/{id}/invoke`,
//!    sequential, median of `BENCH_INVOKES` (default 100), beside the same
//!    number of `workerctl worker invoke` runs (a process each, as a person
//!    or a script runs it).
//!
//! Everything runs on a throwaway database `workerctl_bench_triggers_<random>`,
//! under its own instance label and exchange, all removed at the end.

#[path = "../tests/common/amqp.rs"]
mod amqp;
mod common;

use common::{Database, amqp_url, percentile, setting};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::StreamExt;
use lapin::options::ExchangeDeleteOptions;
use lapin::types::AMQPValue;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use workerctl::config::{AmqpConfig, Secret};
use workerctl::triggers::firing::{self, AmqpPublisher, PgSchedules, SystemClock};

const BIN: &str = env!("CARGO_BIN_EXE_workerctl");
const TOKEN: &str = "bench-token-0123456789";
const ECHO_PY: &str = "def process(msg):\n    return msg\n";

#[tokio::main]
async fn main() -> ExitCode {
    if std::env::args().any(|a| a == "--list") {
        return ExitCode::SUCCESS;
    }
    let db = Database::create("workerctl_bench_triggers").await;
    let exchange = format!("pipeline.messages.bench-{}", Uuid::new_v4().simple());
    let lateness = schedule_lateness(&db, &exchange).await;
    let invokes = invoke_round_trips(&db, &exchange).await;
    cleanup_exchange(&exchange).await;
    db.drop().await;
    println!();
    println!(
        "triggers benchmark ({})",
        Utc::now().format("%Y-%m-%d %H:%M UTC")
    );
    println!("  load average at end: {}", load());
    println!(
        "  schedule every 1 s for {} s: {} fires, lateness p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        lateness.secs,
        lateness.samples.len(),
        percentile(&lateness.samples, 0.50),
        percentile(&lateness.samples, 0.99),
        lateness.samples.iter().cloned().fold(0.0, f64::max),
    );
    match invokes {
        Some((http, cli)) => println!(
            "  invoke round trip, median of {}: HTTP {:.1} ms (p90 {:.1}), `worker invoke` {:.1} ms (p90 {:.1})",
            http.len(),
            percentile(&http, 0.50),
            percentile(&http, 0.90),
            percentile(&cli, 0.50),
            percentile(&cli, 0.90),
        ),
        None => println!("  invoke round trip: not measured (the worker never became ready)"),
    }
    ExitCode::SUCCESS
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

struct Lateness {
    secs: u64,
    samples: Vec<f64>,
}

async fn schedule_lateness(db: &Database, exchange: &str) -> Lateness {
    let secs: u64 = setting("BENCH_SCHEDULE_SECS", 60);
    let worker = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO user_workers (id, name, state, language, revision, status, source)
         VALUES ($1, 'bench-ticker', 'enabled', 'python', 1, 'unknown', '\\x00')",
    )
    .bind(worker)
    .execute(&db.pool)
    .await
    .expect("worker row");
    let (_conn, mut consumer) = listen(exchange, &worker.to_string()).await;
    let amqp = AmqpConfig {
        url: Secret::new(amqp_url()),
        exchange: exchange.to_string(),
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(firing::run(
        PgSchedules(db.pool.clone()),
        AmqpPublisher::new(amqp),
        SystemClock,
        Duration::from_secs(1),
        shutdown.clone(),
    ));
    sqlx::query("INSERT INTO workerctl_schedules (worker_id, cron) VALUES ($1, '* * * * * *')")
        .bind(worker)
        .execute(&db.pool)
        .await
        .expect("schedule");
    eprintln!("bench: a schedule firing every second, for {secs} s");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut samples = Vec::new();
    while let Ok(Some(Ok(delivery))) = tokio::time::timeout_at(deadline, consumer.next()).await {
        let arrived = Utc::now().timestamp_micros();
        let fire = delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(firing::FIRE_TIME_HEADER).cloned());
        if let Some(AMQPValue::LongLongInt(ms)) = fire {
            samples.push((arrived - ms * 1000) as f64 / 1000.0);
        }
    }
    shutdown.cancel();
    let _ = task.await;
    // The first fire may come up to poll late (the schedule was added while
    // the loop slept): it measures the pick-up of a new schedule, not lateness.
    if !samples.is_empty() {
        samples.remove(0);
    }
    Lateness { secs, samples }
}

async fn cleanup_exchange(exchange: &str) {
    if let Ok(conn) =
        lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default()).await
        && let Ok(channel) = conn.create_channel().await
    {
        let _ = channel
            .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
            .await;
        let _ = conn.close(200, "done".into()).await;
    }
}

/// `workerctl …` configured for the benchmark.
fn workerctl(db: &Database, exchange: &str, instance: &str, port: u16, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    for (key, _) in std::env::vars() {
        if key.starts_with("WORKERCTL_") {
            cmd.env_remove(key);
        }
    }
    cmd.args(args)
        .env("WORKERCTL_DATABASE_URL", &db.url)
        .env("WORKERCTL_INSTANCE", instance)
        .env("WORKERCTL_AMQP__URL", amqp_url())
        .env("WORKERCTL_AMQP__EXCHANGE", exchange)
        .env("WORKERCTL_API__TOKEN", TOKEN)
        .env("WORKERCTL_DOCKER__NETWORK", "host")
        .env("WORKERCTL_DOCKER__STOP_TIMEOUT", "2s")
        .env("WORKERCTL_SCHEDULES__ENABLED", "false")
        .env(
            "WORKERCTL_DEAD_LETTERS__QUEUE",
            format!("workerctl.errors.{instance}"),
        )
        .env("WORKERCTL_CODE_SERVER__LISTEN", format!("127.0.0.1:{port}"))
        .env(
            "WORKERCTL_CODE_SERVER__PUBLIC_URL",
            format!("http://127.0.0.1:{port}"),
        );
    cmd
}

async fn invoke_round_trips(db: &Database, exchange: &str) -> Option<(Vec<f64>, Vec<f64>)> {
    let n: usize = setting("BENCH_INVOKES", 100);
    let instance = format!("benchtrig{}", &Uuid::new_v4().simple().to_string()[..6]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let mut daemon = workerctl(db, exchange, &instance, port, &["run"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("workerctl run");
    let dir = tempfile::tempdir().expect("temp dir");
    let code = dir.path().join("echo.py");
    let message = dir.path().join("m.json");
    std::fs::write(&code, ECHO_PY).expect("code");
    std::fs::write(&message, br#"{"payload": "aGk="}"#).expect("message");
    let created = workerctl(
        db,
        exchange,
        &instance,
        port,
        &[
            "worker",
            "create",
            "--name",
            "echo",
            "--code",
            code.to_str().unwrap_or(""),
            "--wait",
            "--wait-timeout",
            "120s",
        ],
    )
    .output()
    .expect("worker create");
    let result = if created.status.success() {
        eprintln!("bench: {n} HTTP invokes, then {n} `worker invoke` runs");
        let http = http_invokes(port, n).await;
        let cli = cli_invokes(db, exchange, &instance, port, &message, n);
        Some((http, cli))
    } else {
        eprintln!(
            "bench: worker create failed: {}",
            String::from_utf8_lossy(&created.stderr)
        );
        None
    };
    let _ = daemon.kill();
    let _ = daemon.wait();
    remove_containers(&instance);
    result
}

async fn http_invokes(port: u16, n: usize) -> Vec<f64> {
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/api/workers/echo/invoke");
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n + 2 {
        let start = Instant::now();
        let response = client
            .post(&url)
            .bearer_auth(TOKEN)
            .body(r#"{"payload": "aGk="}"#)
            .send()
            .await;
        let ok = match response {
            Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
            Err(_) => false,
        };
        if ok {
            samples.push(start.elapsed().as_secs_f64() * 1000.0);
        }
    }
    // The first two warm up the daemon's pool and the worker.
    samples.drain(..samples.len().min(2));
    samples
}

fn cli_invokes(
    db: &Database,
    exchange: &str,
    instance: &str,
    port: u16,
    message: &std::path::Path,
    n: usize,
) -> Vec<f64> {
    let path = message.to_str().unwrap_or("");
    (0..n)
        .filter_map(|_| {
            let start = Instant::now();
            let out = workerctl(
                db,
                exchange,
                instance,
                port,
                &["worker", "invoke", "echo", "--message", path],
            )
            .output()
            .ok()?;
            out.status
                .success()
                .then(|| start.elapsed().as_secs_f64() * 1000.0)
        })
        .collect()
}

fn remove_containers(instance: &str) {
    let filter = format!("label=workerctl.instance={instance}");
    if let Ok(out) = Command::new("docker")
        .args(["ps", "-aq", "--filter", &filter])
        .output()
    {
        for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = Command::new("docker").args(["rm", "-f", id]).output();
        }
    }
}

async fn listen(exchange: &str, key: &str) -> (lapin::Connection, lapin::Consumer) {
    let (connection, _, consumer) = amqp::listen(&amqp_url(), exchange, &[key]).await;
    (connection, consumer)
}
