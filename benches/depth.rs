//! The queue-depth freshness benchmark: how long after a message lands in an
//! idle worker queue the daemon's depth poller reads it — the part of "a
//! message brings a scaled-to-zero worker back" that the broker and the
//! poller add before any pass runs.
//!
//! Each trial declares a fresh worker queue (durable, quorum, no consumer:
//! a worker at zero replicas), waits until the management API lists it with
//! 0 ready messages, publishes one message with a publisher confirm, and
//! times, from the confirm, until a reading shows it ready, on two pollers
//! running `depths::poll`:
//!
//! - the **daemon's** poller, every `scale.poll_interval` of the default
//!   configuration (5 s): what autoscaling sees. A fresh one per trial,
//!   started a random 0–5 s after the queue, and the message published a
//!   random 0–5 s after it: a worker's queue, the broker's cycles and the
//!   daemon's polls keep no step with each other (with one poller for all
//!   trials, each queue would be declared just after the poll that ended
//!   the trial before, and tick in step with the polls);
//! - a **100 ms** poller, for the whole run: how late the broker's figures are, to within
//!   0.1 s — for a quorum queue, up to its `quorum_tick_interval` (why:
//!   `src/broker.rs`).
//!
//! The broker's settings are not read (the API does not show them): say
//! which ones it runs with beside the figures (docs/benchmarks.md).
//!
//! It also counts the management API requests the 100 ms poller made over the
//! whole run, beside the polls it had time for (run time / 100 ms, rounded
//! up): the poller's cost is one request per poll, for every queue at once.
//!
//! Run: `cargo bench --bench depth`. Needs RabbitMQ (`AMQP_URL`) and its
//! management API (`MANAGEMENT_URL`, default http://127.0.0.1:15672, with
//! the credentials of `AMQP_URL`). Settings: BENCH_TRIALS (20). Deletes its
//! queues, also when a trial fails.

mod common;

use common::{bench_main, env_or};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use workerctl::config::Config;
use workerctl::model::WorkerId;
use workerctl::scale::depths::{self, QueueMonitor, Reading};

const FAST_POLL: Duration = Duration::from_millis(100);
/// A reading later than this is a failure, not a figure.
const DEADLINE: Duration = Duration::from_secs(60);

fn main() -> ExitCode {
    bench_main("depth", run)
}

async fn run() -> ExitCode {
    let amqp_url = env_or("AMQP_URL", "amqp://workerctl:workerctl@127.0.0.1:5672/%2f");
    let management_url = env_or("MANAGEMENT_URL", "http://127.0.0.1:15672");
    let trials: usize = env_or("BENCH_TRIALS", "20").parse().unwrap_or(20);
    let every = Config::default().scale.poll_interval;
    let conn = Connection::connect(&amqp_url, ConnectionProperties::default())
        .await
        .expect("RabbitMQ answers at AMQP_URL (run scripts/services)");
    let channel = conn.create_channel().await.expect("channel");
    let confirms = channel.confirm_select(ConfirmSelectOptions::default());
    confirms.await.expect("publisher confirms");
    let shutdown = CancellationToken::new();
    let fast_started = Instant::now();
    let (fast_monitor, fast) = poller(&management_url, &amqp_url, FAST_POLL, &shutdown);
    let daemon = || poller(&management_url, &amqp_url, every, &shutdown).1;
    let mut lags = Vec::new();
    let mut seen = Vec::new();
    for n in 1..=trials {
        let trial = trial(&channel, fast.clone(), daemon).await;
        eprintln!(
            "bench: trial {n}/{trials}: {:.1} s (100 ms poller), {:.1} s (daemon's poller)",
            trial.0.as_secs_f64(),
            trial.1.as_secs_f64()
        );
        lags.push(trial.0);
        seen.push(trial.1);
    }
    shutdown.cancel();
    let ran = fast_started.elapsed();
    let _ = conn.close(200, "bench done".into()).await;
    println!(
        "\nqueue-depth freshness: publish into an idle worker queue (quorum, no consumer) → a reading shows it ready ({trials} trials, {management_url})"
    );
    println!("broker's lag (100 ms poller): {}", summary(&mut lags));
    println!(
        "daemon's poller (scale.poll_interval {every:?}): {}",
        summary(&mut seen)
    );
    println!(
        "100 ms poller over the run ({:.1} s): {} management requests, {} polls had time to start",
        ran.as_secs_f64(),
        fast_monitor.calls(),
        ran.as_millis().div_ceil(FAST_POLL.as_millis())
    );
    ExitCode::SUCCESS
}

/// A `depths::poll` task every `every`: its monitor (to count requests), its
/// readings, and its stop (the poller also stops with `shutdown`).
fn poller(
    management_url: &str,
    amqp_url: &str,
    every: Duration,
    shutdown: &CancellationToken,
) -> (
    Arc<QueueMonitor>,
    (watch::Receiver<Reading>, CancellationToken),
) {
    let monitor = Arc::new(QueueMonitor::new(management_url, amqp_url).expect("management URL"));
    let (tx, rx) = watch::channel(Reading::NotYet);
    let wake = Arc::new(Notify::new());
    let stop = shutdown.child_token();
    tokio::spawn(depths::poll(
        monitor.clone(),
        every,
        tx,
        wake,
        stop.clone(),
        |_| {},
    ));
    (monitor, (rx, stop))
}

/// One message into a fresh idle queue: how long until each poller shows
/// it; `daemon` starts the daemon's poller.
async fn trial(
    channel: &Channel,
    (mut fast, _): (watch::Receiver<Reading>, CancellationToken),
    daemon: impl Fn() -> (watch::Receiver<Reading>, CancellationToken),
) -> (Duration, Duration) {
    let id = WorkerId(Uuid::now_v7());
    let queue = declare(channel, id).await;
    let ready = |at_least: u64| {
        move |r: &Reading| r.depths().and_then(|d| d.get(id)?.ready) >= Some(at_least)
    };
    let listed = tokio::time::timeout(DEADLINE, fast.wait_for(ready(0))).await;
    assert!(matches!(listed, Ok(Ok(_))), "{queue} never listed");
    drop(listed);
    tokio::time::sleep(random_phase()).await;
    let (daemon, stop) = daemon();
    tokio::time::sleep(random_phase()).await;
    let published = publish(channel, &queue).await;
    let shown = |mut readings: watch::Receiver<Reading>| async move {
        let read = tokio::time::timeout(DEADLINE, readings.wait_for(ready(1))).await;
        matches!(read, Ok(Ok(_))).then(|| published.elapsed())
    };
    let (lag, seen) = tokio::join!(shown(fast), shown(daemon));
    stop.cancel();
    let options = QueueDeleteOptions::default();
    let _ = channel.queue_delete(queue.as_str().into(), options).await;
    match (lag, seen) {
        (Some(lag), Some(seen)) => (lag, seen),
        _ => panic!("{queue}: the message was not read within {DEADLINE:?}"),
    }
}

/// A worker's queue, as the dockerworker declares it (docs/compatibility.md §4).
async fn declare(channel: &Channel, id: WorkerId) -> String {
    let name = format!("worker_{id}");
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(name.as_str().into(), durable, args)
        .await
        .expect("the queue is declared");
    name
}

/// Publishes one message to `queue`; the instant the broker confirmed it.
async fn publish(channel: &Channel, queue: &str) -> Instant {
    channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            b"{}",
            BasicProperties::default(),
        )
        .await
        .expect("publishes")
        .await
        .expect("the broker confirms it");
    Instant::now()
}

/// 0–5 s, uniformly.
fn random_phase() -> Duration {
    let n = Uuid::new_v4().as_u128() % 5000;
    Duration::from_millis(u64::try_from(n).unwrap_or(0))
}

/// `median M s, p90 P s, min–max A–B s`.
fn summary(d: &mut [Duration]) -> String {
    d.sort_unstable();
    let at = |q: f64| {
        let i = ((d.len() as f64 - 1.0) * q).round() as usize;
        d.get(i).map_or(f64::NAN, Duration::as_secs_f64)
    };
    format!(
        "median {:.1} s, p90 {:.1} s, min–max {:.1}–{:.1} s",
        at(0.5),
        at(0.9),
        at(0.0),
        at(1.0)
    )
}
