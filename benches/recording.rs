//! The recording benchmark (`scripts/bench --recording`, or `cargo bench
//! --bench recording`): what recording a worker's traffic costs, and how
//! long `worker try` on its last 200 messages takes.
//!
//! 1. **Throughput with recording on and off, in one run.** The daemon
//!    binary (`workerctl run`) with the real dockerworker, one echo worker.
//!    Each round publishes `BENCH_RECORD_MESSAGES` (default 30,000)
//!    messages to it as fast as the publisher can and times the first
//!    publish → the last output on the next step (msg/s through the
//!    worker, above the 5,000 msg/s asked about). Rounds alternate between
//!    a daemon with `record.enabled = false` (its tap deleted: the floor)
//!    and one with recording on (the daemon is restarted between rounds;
//!    it adopts the running container unchanged). `BENCH_RECORD_ROUNDS`
//!    (default 2) of each; medians. Also the daemon's CPU time per 1,000
//!    messages in each mode (from /proc), and whether the table holds
//!    exactly `record.keep` rows at the end.
//! 2. **`worker try` on the last 200 messages**: seconds from the command
//!    to its report (a process, as a person runs it), beside `worker
//!    invoke` of the same 200 messages one by one (200 processes), and
//!    beside `python -c pass` in a throwaway container of the image (the
//!    floor of any container).
//!
//! Everything runs on a throwaway database `workerctl_bench_rec_<random>`,
//! under its own instance label and exchange, all removed at the end.

mod common;

use common::{Database, amqp_url, setting};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use serde_json::json;
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_workerctl");
const ECHO_PY: &str = "def process(msg):\n    return msg\n";
const CANDIDATE_PY: &str =
    "def process(msg):\n    msg.metadata = {'decoder': 'v2'}\n    return msg\n";
const KEEP: usize = 200;
const DEADLINE: Duration = Duration::from_secs(300);

fn image() -> String {
    std::env::var("WORKERCTL_DOCKER__IMAGE")
        .unwrap_or_else(|_| "workerctl/dockerworker:latest".into())
}

#[tokio::main]
async fn main() -> ExitCode {
    if std::env::args().any(|a| a == "--list") {
        return ExitCode::SUCCESS;
    }
    let db = Database::create("workerctl_bench_rec").await;
    let bench = Bench::new(db);
    let result = bench.run().await;
    bench.cleanup().await;
    bench.db.drop().await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e}");
            ExitCode::FAILURE
        }
    }
}

struct Bench {
    db: Database,
    exchange: String,
    instance: String,
    next_key: String,
    dir: tempfile::TempDir,
    port: u16,
}

/// One round's figures.
struct Round {
    recording: bool,
    msg_per_s: f64,
    daemon_cpu_ms_per_1000: f64,
}

impl Bench {
    fn new(db: Database) -> Bench {
        let short = &Uuid::new_v4().simple().to_string()[..6];
        Bench {
            db,
            exchange: format!("pipeline.messages.bench-rec-{short}"),
            instance: format!("benchrec{short}"),
            next_key: format!("bench-next-{short}"),
            dir: tempfile::tempdir().expect("temp dir"),
            port: free_port(),
        }
    }

    async fn run(&self) -> Result<(), String> {
        let n: usize = setting("BENCH_RECORD_MESSAGES", 30_000);
        let rounds: usize = setting("BENCH_RECORD_ROUNDS", 2);
        let mut daemon = self.daemon(false);
        let code = self.dir.path().join("echo.py");
        std::fs::write(&code, ECHO_PY).map_err(|e| e.to_string())?;
        let created = self
            .cli(&[
                "worker",
                "create",
                "--name",
                "echo",
                "--code",
                path(&code),
                "--wait",
            ])
            .output()
            .map_err(|e| e.to_string())?;
        if !created.status.success() {
            return Err(format!(
                "the worker never became ready: {}",
                String::from_utf8_lossy(&created.stderr)
            ));
        }
        let worker = Uuid::parse_str(String::from_utf8_lossy(&created.stdout).trim())
            .map_err(|e| e.to_string())?;
        let broker = Broker::open(&self.exchange, &self.next_key).await;
        let mut outputs = broker.listen().await;
        let mut figures = Vec::new();
        for round in 0..rounds * 2 {
            let recording = round % 2 == 1;
            drop(daemon);
            daemon = self.daemon(recording);
            if recording {
                self.wait_for_tap(&broker, &mut outputs, worker).await?;
            } else {
                broker.delete_tap(worker).await;
            }
            let cpu_before = cpu_ticks(&daemon.0);
            let rate = broker.drain(&mut outputs, worker, n).await?;
            // Let the recorder write what it holds before reading its CPU.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let cpu = cpu_ticks(&daemon.0).saturating_sub(cpu_before);
            eprintln!(
                "bench: round {} (recording {}): {rate:.0} msg/s",
                round + 1,
                if recording { "on" } else { "off" }
            );
            figures.push(Round {
                recording,
                msg_per_s: rate,
                daemon_cpu_ms_per_1000: cpu as f64 * 10.0 / (n as f64 / 1000.0),
            });
        }
        let rows: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM workerctl_recorded_messages WHERE worker_id = $1",
        )
        .bind(worker)
        .fetch_one(&self.db.pool)
        .await
        .map_err(|e| e.to_string())?;
        let trial = self.try_beside_invoke(worker).await?;
        drop(daemon);
        let _ = broker.connection.close(200, "done".into()).await;
        report(&figures, n, rows, &trial);
        Ok(())
    }

    /// Publishes warm-up messages until one is recorded (the tap exists).
    async fn wait_for_tap(
        &self,
        broker: &Broker,
        outputs: &mut lapin::Consumer,
        worker: Uuid,
    ) -> Result<(), String> {
        let start = Instant::now();
        loop {
            broker.publish(worker, "warm-up").await;
            let _ = tokio::time::timeout(Duration::from_secs(10), outputs.next()).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            let rows: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM workerctl_recorded_messages
                  WHERE worker_id = $1 AND tracing_id = 'warm-up'",
            )
            .bind(worker)
            .fetch_one(&self.db.pool)
            .await
            .map_err(|e| e.to_string())?;
            if rows > 0 {
                return Ok(());
            }
            if start.elapsed() > DEADLINE {
                return Err("the daemon never tapped the worker".into());
            }
        }
    }

    async fn try_beside_invoke(&self, worker: Uuid) -> Result<TrialFigures, String> {
        let candidate = self.dir.path().join("candidate.py");
        std::fs::write(&candidate, CANDIDATE_PY).map_err(|e| e.to_string())?;
        let start = Instant::now();
        let tried = self
            .cli(&[
                "worker",
                "try",
                "echo",
                "--code",
                path(&candidate),
                "--last",
                "200",
                "--output",
                "json",
            ])
            .output()
            .map_err(|e| e.to_string())?;
        let try_s = start.elapsed().as_secs_f64();
        let report: serde_json::Value = serde_json::from_slice(&tried.stdout).map_err(|e| {
            format!(
                "worker try gave no report: {e}: {}",
                String::from_utf8_lossy(&tried.stderr)
            )
        })?;
        let bodies: Vec<Vec<u8>> = sqlx::query_scalar(
            "SELECT body FROM workerctl_recorded_messages WHERE worker_id = $1 ORDER BY id",
        )
        .bind(worker)
        .fetch_all(&self.db.pool)
        .await
        .map_err(|e| e.to_string())?;
        let start = Instant::now();
        let mut invoked = 0;
        for (i, body) in bodies.iter().enumerate() {
            let file = self.dir.path().join(format!("m{i}.json"));
            std::fs::write(&file, body).map_err(|e| e.to_string())?;
            let out = self
                .cli(&["worker", "invoke", "echo", "--message", path(&file)])
                .output()
                .map_err(|e| e.to_string())?;
            invoked += usize::from(out.status.success());
        }
        let invoke_s = start.elapsed().as_secs_f64();
        let start = Instant::now();
        let floor = Command::new("docker")
            .args([
                "run",
                "--rm",
                "--entrypoint",
                "python",
                &image(),
                "-c",
                "pass",
            ])
            .output()
            .map_err(|e| e.to_string())?;
        let floor_s = start.elapsed().as_secs_f64();
        Ok(TrialFigures {
            try_s,
            summary: report["summary_line"].as_str().unwrap_or("?").to_string(),
            invoke_s,
            invoked,
            messages: bodies.len(),
            floor_s: floor.status.success().then_some(floor_s),
        })
    }

    fn daemon(&self, recording: bool) -> Daemon {
        Daemon(
            self.cli(&["run"])
                .env("WORKERCTL_RECORD__ENABLED", recording.to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("workerctl run"),
        )
    }

    fn cli(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        for (key, _) in std::env::vars() {
            if key.starts_with("WORKERCTL_") && key != "WORKERCTL_DOCKER__IMAGE" {
                cmd.env_remove(key);
            }
        }
        let port = self.port;
        cmd.args(args)
            .env("WORKERCTL_DATABASE_URL", &self.db.url)
            .env("WORKERCTL_INSTANCE", &self.instance)
            .env("WORKERCTL_AMQP__URL", amqp_url())
            .env("WORKERCTL_AMQP__EXCHANGE", &self.exchange)
            .env("WORKERCTL_DOCKER__NETWORK", "host")
            .env("WORKERCTL_DOCKER__STOP_TIMEOUT", "2s")
            .env("WORKERCTL_SCHEDULES__ENABLED", "false")
            .env("WORKERCTL_DEAD_LETTERS__ENABLED", "false")
            .env("WORKERCTL_RECORD__KEEP", KEEP.to_string())
            .env("WORKERCTL_CODE_SERVER__LISTEN", format!("127.0.0.1:{port}"))
            .env(
                "WORKERCTL_CODE_SERVER__PUBLIC_URL",
                format!("http://127.0.0.1:{port}"),
            );
        cmd
    }

    async fn cleanup(&self) {
        let filter = format!("label=workerctl.instance={}", self.instance);
        if let Ok(out) = Command::new("docker")
            .args(["ps", "-aq", "--filter", &filter])
            .output()
        {
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("docker").args(["rm", "-f", id]).output();
            }
        }
        let workers: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM user_workers")
            .fetch_all(&self.db.pool)
            .await
            .unwrap_or_default();
        if let Ok(conn) =
            lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default()).await
            && let Ok(channel) = conn.create_channel().await
        {
            let mut queues = vec![format!("workerctl.record.outputs.{}", self.instance)];
            for w in workers {
                queues.extend([
                    format!("worker_{w}"),
                    format!("worker_{w}.retry"),
                    format!("workerctl.record.{w}"),
                ]);
            }
            for q in queues {
                let _ = channel
                    .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
            let _ = channel
                .exchange_delete(
                    self.exchange.as_str().into(),
                    ExchangeDeleteOptions::default(),
                )
                .await;
            let _ = conn.close(200, "done".into()).await;
        }
    }
}

/// A `workerctl run` child, killed (its containers keep running) and
/// reaped when dropped.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct TrialFigures {
    try_s: f64,
    summary: String,
    invoke_s: f64,
    invoked: usize,
    messages: usize,
    floor_s: Option<f64>,
}

fn report(rounds: &[Round], n: usize, rows: i64, t: &TrialFigures) {
    let median = |on: bool, f: &dyn Fn(&Round) -> f64| {
        let mut v: Vec<f64> = rounds.iter().filter(|r| r.recording == on).map(f).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let list = |on: bool| {
        rounds
            .iter()
            .filter(|r| r.recording == on)
            .map(|r| format!("{:.0}", r.msg_per_s))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (off, on) = (
        median(false, &|r| r.msg_per_s),
        median(true, &|r| r.msg_per_s),
    );
    println!();
    println!(
        "recording benchmark ({}, load average at end {})",
        Utc::now().format("%Y-%m-%d %H:%M UTC"),
        load()
    );
    println!("  one echo worker, {n} messages per round, publish → last output on the next step:");
    println!(
        "    recording off (floor): {off:>6.0} msg/s median  (rounds: {})",
        list(false)
    );
    println!(
        "    recording on:          {on:>6.0} msg/s median  (rounds: {}), {:+.1} % of off",
        list(true),
        (on / off - 1.0) * 100.0
    );
    println!(
        "    daemon CPU per 1,000 messages: {:.1} ms recording on, {:.1} ms off ({:.0} % of a core at 5,000 msg/s on)",
        median(true, &|r| r.daemon_cpu_ms_per_1000),
        median(false, &|r| r.daemon_cpu_ms_per_1000),
        median(true, &|r| r.daemon_cpu_ms_per_1000) * 5.0 / 10.0,
    );
    println!("    recorded rows at the end: {rows} (record.keep = {KEEP})");
    println!(
        "  worker try --last {}: {:.1} s command → report ({})",
        t.messages, t.try_s, t.summary
    );
    println!(
        "  worker invoke of the same {} one by one: {:.1} s ({} answered), {:.1}× the try",
        t.messages,
        t.invoke_s,
        t.invoked,
        t.invoke_s / t.try_s
    );
    match t.floor_s {
        Some(s) => println!("  floor: docker run --rm <image> python -c pass: {s:.1} s"),
        None => println!("  floor: docker run of the image failed"),
    }
}

fn path(p: &std::path::Path) -> &str {
    p.to_str().unwrap_or("")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// utime + stime of a process, in clock ticks (100 per second).
fn cpu_ticks(child: &Child) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", child.id())).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(11) + field(12)
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

struct Broker {
    connection: lapin::Connection,
    channel: lapin::Channel,
    exchange: String,
    next_key: String,
}

impl Broker {
    async fn open(exchange: &str, next_key: &str) -> Broker {
        let connection =
            lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
                .await
                .expect("RabbitMQ answers");
        let channel = connection.create_channel().await.expect("channel");
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .exchange_declare(
                exchange.into(),
                lapin::ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            )
            .await
            .expect("exchange");
        Broker {
            connection,
            channel,
            exchange: exchange.into(),
            next_key: next_key.into(),
        }
    }

    fn body(&self, worker: Uuid, tracing_id: &str) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "tracing_id": tracing_id, "tenant_id": 1, "access_token": "", "received_at": 1,
            "pipeline_id": "p", "step_index": 0,
            "pipeline_steps": [worker.to_string(), self.next_key],
            "timestamp": 1_700_000_000_000_i64, "payload": "aGk=",
            "measurements": [{"timestamp": 1_700_000_000_000_i64, "sensor_external_id": "s1",
                              "value": 21.5, "observed_property": "temperature",
                              "unit_of_measurement": "Cel"}],
        }))
        .unwrap_or_default()
    }

    async fn publish(&self, worker: Uuid, tracing_id: &str) {
        let body = self.body(worker, tracing_id);
        let _ = self
            .channel
            .basic_publish(
                self.exchange.as_str().into(),
                worker.to_string().as_str().into(),
                BasicPublishOptions::default(),
                &body,
                lapin::BasicProperties::default(),
            )
            .await;
    }

    async fn listen(&self) -> lapin::Consumer {
        let private = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..Default::default()
        };
        let queue = self
            .channel
            .queue_declare("".into(), private, FieldTable::default())
            .await
            .expect("queue");
        self.channel
            .queue_bind(
                queue.name().clone(),
                self.exchange.as_str().into(),
                self.next_key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind");
        let no_ack = BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        };
        self.channel
            .basic_consume(
                queue.name().clone(),
                "".into(),
                no_ack,
                FieldTable::default(),
            )
            .await
            .expect("consume")
    }

    /// Publishes `n` messages as fast as possible; msg/s from the first
    /// publish to the n-th output on the next step.
    async fn drain(
        &self,
        outputs: &mut lapin::Consumer,
        worker: Uuid,
        n: usize,
    ) -> Result<f64, String> {
        let start = Instant::now();
        let publish = async {
            for i in 0..n {
                self.publish(worker, &format!("m-{i}")).await;
            }
        };
        let count = async {
            let mut seen = 0;
            while seen < n {
                match tokio::time::timeout(DEADLINE, outputs.next()).await {
                    Ok(Some(Ok(d))) if !d.data.windows(7).any(|w| w == b"warm-up") => seen += 1,
                    Ok(Some(Ok(_))) => {}
                    _ => return Err(format!("only {seen} of {n} outputs came")),
                }
            }
            Ok(())
        };
        let ((), counted) = tokio::join!(publish, count);
        counted?;
        Ok(n as f64 / start.elapsed().as_secs_f64())
    }

    async fn delete_tap(&self, worker: Uuid) {
        let name = format!("workerctl.record.{worker}");
        let _ = self
            .channel
            .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
}
