//! The recording benchmark (`scripts/bench --recording`, or `cargo bench
//! --bench recording`): what recording a worker's traffic costs, and how
//! long `worker try` on its last 200 messages takes.
//!
//! 1. **Throughput with recording on and off, in one run.** The daemon
//!    binary (`workerctl run`) with the real dockerworker, one echo worker.
//!    Each round publishes `BENCH_RECORD_MESSAGES` (default 30,000)
//!    messages to it as fast as the publisher can and times the first
//!    publish → the last output on the next step (msg/s through the
//!    worker, above the 5,000 msg/s asked about). Rounds cycle through
//!    three modes: a daemon with `record.enabled = false` and no tap (the
//!    floor); the same daemon with the copy taps the recorder makes for an
//!    image that does not record itself (input tap and outputs tap,
//!    declared and bound by the benchmark) but nobody reading them (what
//!    the broker's copies cost); and a daemon with recording on (with the
//!    dockerworker: the worker recording itself into an unbound tap). The
//!    daemon is restarted between rounds; recording on or off changes the
//!    worker's environment, so each round starts once its one container of
//!    the mode runs and answered a warm-up. `BENCH_RECORD_ROUNDS` (default 3)
//!    of each; medians and spread. Also the daemon's and the broker's CPU
//!    time per 1,000 messages in each mode (from /proc; the broker is the
//!    local `beam.smp`, or `BENCH_BROKER_PID`), and whether the table holds
//!    exactly `record.keep` rows at the end (after a `worker messages`).
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
use lapin::types::{AMQPValue, FieldTable};
use serde_json::json;
use uuid::Uuid;

/// The daemon and CLI: this build's, or `BENCH_WORKERCTL_BIN` (to measure
/// another build with the same benchmark).
fn bin() -> String {
    std::env::var("BENCH_WORKERCTL_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_workerctl").into())
}
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

/// What a round measures.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    /// Recording off, no tap: the floor.
    Off,
    /// Recording off, the taps declared and bound but read by nobody.
    TapsOnly,
    /// Recording on.
    On,
}

impl Mode {
    const ALL: [Mode; 3] = [Mode::Off, Mode::TapsOnly, Mode::On];

    fn name(self) -> &'static str {
        match self {
            Mode::Off => "recording off (floor)",
            Mode::TapsOnly => "copy taps, unread",
            Mode::On => "recording on",
        }
    }
}

/// One round's figures.
struct Round {
    mode: Mode,
    msg_per_s: f64,
    daemon_cpu_ms_per_1000: f64,
    broker_cpu_ms_per_1000: f64,
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
        let rounds: usize = setting("BENCH_RECORD_ROUNDS", 3);
        let load_start = load();
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
        let broker_pid = broker_pid();
        let mut figures = Vec::new();
        for round in 0..rounds * Mode::ALL.len() {
            let mode = Mode::ALL[round % Mode::ALL.len()];
            drop(daemon);
            broker.delete_taps(worker, &self.instance).await;
            if mode == Mode::TapsOnly {
                broker.declare_taps(worker, &self.instance).await?;
            }
            daemon = self.daemon(mode == Mode::On);
            // Recording on gives the worker WORKER_RECORD_KEEP (a worker
            // runtime that records itself), so switching modes replaces its
            // container: each round starts once that rollout is over.
            self.settled(worker, mode == Mode::On).await?;
            if mode == Mode::On {
                self.wait_for_tap(&broker, &mut outputs, worker).await?;
            } else {
                // One message through, so that the round starts on a consumer.
                broker.publish(worker, "warm-up").await;
                let _ = tokio::time::timeout(Duration::from_secs(30), outputs.next()).await;
            }
            let cpu_before = cpu_ticks(daemon.0.id());
            let broker_before = broker_pid.map(cpu_ticks).unwrap_or(0);
            let rate = broker.drain(&mut outputs, worker, n).await?;
            // Let the recorder write what it holds before reading its CPU.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let cpu = cpu_ticks(daemon.0.id()).saturating_sub(cpu_before);
            let broker_cpu = broker_pid
                .map(cpu_ticks)
                .unwrap_or(0)
                .saturating_sub(broker_before);
            eprintln!(
                "bench: round {} ({}): {rate:.0} msg/s, load {}",
                round + 1,
                mode.name(),
                load()
            );
            let per_1000 = |ticks: u64| ticks as f64 * 10.0 / (n as f64 / 1000.0);
            figures.push(Round {
                mode,
                msg_per_s: rate,
                daemon_cpu_ms_per_1000: per_1000(cpu),
                broker_cpu_ms_per_1000: per_1000(broker_cpu),
            });
        }
        // What `worker messages` shows (and, where the recorder reads on
        // demand, the read that fills the table).
        let listed = self
            .cli(&[
                "worker", "messages", "echo", "--last", "1", "--output", "json",
            ])
            .output()
            .map_err(|e| e.to_string())?;
        if !listed.status.success() {
            return Err(format!(
                "worker messages failed: {}",
                String::from_utf8_lossy(&listed.stderr)
            ));
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
        report(&figures, n, rows, &trial, &load_start);
        Ok(())
    }

    /// Waits until the worker runs in one container, given
    /// `WORKER_RECORD_KEEP` or not as `recording` says.
    async fn settled(&self, worker: Uuid, recording: bool) -> Result<(), String> {
        let start = Instant::now();
        let filter = [
            format!("label=workerctl.instance={}", self.instance),
            format!("label=workerctl.worker-id={worker}"),
        ];
        loop {
            let listed = Command::new("docker")
                .args(["ps", "-q", "--filter", &filter[0], "--filter", &filter[1]])
                .output()
                .map_err(|e| e.to_string())?;
            let ids: Vec<String> = String::from_utf8_lossy(&listed.stdout)
                .split_whitespace()
                .map(str::to_string)
                .collect();
            if let [id] = ids.as_slice() {
                let env = Command::new("docker")
                    .args(["inspect", "--format", "{{json .Config.Env}}", id])
                    .output()
                    .map_err(|e| e.to_string())?;
                if String::from_utf8_lossy(&env.stdout).contains("WORKER_RECORD_KEEP=") == recording
                {
                    return Ok(());
                }
            }
            if start.elapsed() > DEADLINE {
                return Err(format!(
                    "the worker never settled in one container: {ids:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Publishes warm-up messages until the daemon's tap takes them: it
    /// exists and is consumed (a recorder that consumes) or holds messages
    /// (one that reads on demand).
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
            if let Some((messages, consumers)) = broker.tap(worker).await
                && (messages > 0 || consumers > 0)
            {
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
        let mut cmd = Command::new(bin());
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

fn report(rounds: &[Round], n: usize, rows: i64, t: &TrialFigures, load_start: &str) {
    let of = |mode: Mode, f: &dyn Fn(&Round) -> f64| {
        let mut v: Vec<f64> = rounds.iter().filter(|r| r.mode == mode).map(f).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let median = |v: &[f64]| {
        let mid = v.len() / 2;
        match v.len() {
            0 => f64::NAN,
            l if l % 2 == 0 => (v[mid - 1] + v[mid]) / 2.0,
            _ => v[mid],
        }
    };
    let rate = |r: &Round| r.msg_per_s;
    let off = median(&of(Mode::Off, &rate));
    println!();
    println!(
        "recording benchmark ({}, load average at start {load_start}, at end {})",
        Utc::now().format("%Y-%m-%d %H:%M UTC"),
        load()
    );
    println!("  one echo worker, {n} messages per round, publish → last output on the next step:");
    if let Ok(extra) = std::env::var("BENCH_TAP_EXTRA") {
        println!("    (taps only: declared with {extra} too)");
    }
    if std::env::var("BENCH_TAPS_INPUT_ONLY").is_ok_and(|v| v == "1") {
        println!("    (taps only: the input tap alone, no outputs tap)");
    }
    for mode in Mode::ALL {
        let v = of(mode, &rate);
        let m = median(&v);
        let list: Vec<String> = rounds
            .iter()
            .filter(|r| r.mode == mode)
            .map(|r| format!("{:.0}", r.msg_per_s))
            .collect();
        let spread = match (v.first(), v.last()) {
            (Some(lo), Some(hi)) if m > 0.0 => (hi - lo) / m * 100.0,
            _ => f64::NAN,
        };
        let beside = if mode == Mode::Off {
            String::new()
        } else {
            format!(", {:+.1} % of off", (m / off - 1.0) * 100.0)
        };
        println!(
            "    {:<22} {m:>6.0} msg/s median  (rounds: {}; spread {spread:.0} %){beside}",
            format!("{}:", mode.name()),
            list.join(", "),
        );
    }
    for mode in Mode::ALL {
        let daemon = median(&of(mode, &|r| r.daemon_cpu_ms_per_1000));
        let broker = median(&of(mode, &|r| r.broker_cpu_ms_per_1000));
        println!(
            "    CPU per 1,000 messages, {:<22} daemon {daemon:>5.1} ms, broker {broker:>6.1} ms \
             (at 5,000 msg/s: {:.0} % and {:.0} % of a core)",
            format!("{}:", mode.name()),
            daemon * 5.0 / 10.0,
            broker * 5.0 / 10.0,
        );
    }
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

/// More arguments for the taps of the "taps only" mode, to measure
/// variants: `BENCH_TAP_EXTRA="x-queue-version=2,x-queue-mode=lazy"`
/// (numbers as integers, the rest as strings).
fn tap_extra() -> Vec<(String, AMQPValue)> {
    std::env::var("BENCH_TAP_EXTRA")
        .unwrap_or_default()
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| {
            let value = match v.parse::<i64>() {
                Ok(n) => AMQPValue::LongLongInt(n),
                Err(_) => AMQPValue::LongString(v.into()),
            };
            (k.trim().to_string(), value)
        })
        .collect()
}

/// The broker's process: `BENCH_BROKER_PID`, else the local `beam.smp`
/// (none when the broker runs elsewhere: its CPU then reads 0).
fn broker_pid() -> Option<u32> {
    if let Some(pid) = std::env::var("BENCH_BROKER_PID")
        .ok()
        .and_then(|p| p.parse().ok())
    {
        return Some(pid);
    }
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == "beam.smp").then_some(pid)
    })
}

/// utime + stime of a process, in clock ticks (100 per second).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
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

    /// The worker's tap, if it exists: (messages ready, consumers).
    async fn tap(&self, worker: Uuid) -> Option<(u32, u32)> {
        let channel = self.connection.create_channel().await.ok()?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let name = format!("workerctl.record.{worker}");
        let q = channel
            .queue_declare(name.as_str().into(), passive, FieldTable::default())
            .await
            .ok()?;
        let _ = channel.close(200, "done".into()).await;
        Some((q.message_count(), q.consumer_count()))
    }

    /// The queues a recorder taps with: the worker's tap, and the outputs
    /// queue (bound to the next step).
    async fn delete_taps(&self, worker: Uuid, instance: &str) {
        for name in [
            format!("workerctl.record.{worker}"),
            format!("workerctl.record.outputs.{instance}"),
        ] {
            let _ = self
                .channel
                .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
    }

    /// Declares and binds the taps as the recorder does (same arguments),
    /// for nobody to read.
    async fn declare_taps(&self, worker: Uuid, instance: &str) -> Result<(), String> {
        let taps = [
            (
                format!("workerctl.record.{worker}"),
                KEEP as i64,
                worker.to_string(),
            ),
            (
                format!("workerctl.record.outputs.{instance}"),
                10_000,
                self.next_key.clone(),
            ),
        ];
        // BENCH_TAPS_INPUT_ONLY=1: the input tap alone (how the cost splits).
        let input_only = std::env::var("BENCH_TAPS_INPUT_ONLY").is_ok_and(|v| v == "1");
        for (name, max_length, key) in taps.into_iter().take(if input_only { 1 } else { 2 }) {
            let mut args = FieldTable::default();
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("classic".into()),
            );
            args.insert("x-max-length".into(), AMQPValue::LongLongInt(max_length));
            args.insert(
                "x-overflow".into(),
                AMQPValue::LongString("drop-head".into()),
            );
            args.insert("x-expires".into(), AMQPValue::LongLongInt(3_600_000));
            for (key, value) in tap_extra() {
                args.insert(key.into(), value);
            }
            self.channel
                .queue_declare(name.as_str().into(), QueueDeclareOptions::default(), args)
                .await
                .map_err(|e| format!("declare {name}: {e}"))?;
            self.channel
                .queue_bind(
                    name.as_str().into(),
                    self.exchange.as_str().into(),
                    key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| format!("bind {name}: {e}"))?;
        }
        Ok(())
    }
}
