//! The queue-depth boundary against the real RabbitMQ and its management
//! API (scripts/services enables the plugin; 127.0.0.1:15672, the
//! workerctl user): messages published to a fresh worker queue are read
//! back as its depth, in one request for every queue; one message in an
//! idle queue reaches the daemon's poller and a one-shot read; a management
//! API that is absent or refuses the credentials is an error that says so.
//!
//! Without a reachable broker every test fails; none is skipped.

mod common;

use std::sync::Arc;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use workerctl::config::Config;
use workerctl::model::WorkerId;
use workerctl::scale::depths::{BrokerError, QueueMonitor, Reading, poll, read_once};

const MANAGEMENT_URL: &str = "http://127.0.0.1:15672";
/// Queue counters lag the broker by up to a quorum tick (seconds); this only
/// catches a hang.
const MUST_HAPPEN: Duration = Duration::from_secs(60);

fn management_url() -> String {
    std::env::var("RABBITMQ_MANAGEMENT_URL").unwrap_or_else(|_| MANAGEMENT_URL.into())
}

async fn channel() -> (Connection, Channel) {
    let conn = Connection::connect(&common::amqp_url(), ConnectionProperties::default())
        .await
        .expect("RabbitMQ answers at AMQP_URL (scripts/services starts it)");
    let channel = conn.create_channel().await.expect("a channel opens");
    (conn, channel)
}

/// A durable quorum queue named like a worker's (docs/compatibility.md §4).
async fn worker_queue(channel: &Channel, id: WorkerId) -> String {
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

async fn publish(channel: &Channel, queue: &str, n: usize) {
    for i in 0..n {
        channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                format!("{{\"n\": {i}}}").as_bytes(),
                BasicProperties::default(),
            )
            .await
            .expect("publishes")
            .await
            .expect("the broker takes it");
    }
}

/// Reads the depths until `id`'s queue shows `ready` messages, counting reads.
async fn wait_for_depth(monitor: &QueueMonitor, id: WorkerId, ready: u64) -> u64 {
    let mut reads = 0;
    let wait = async {
        loop {
            reads += 1;
            let depths = monitor.depths().await.expect("the management API answers");
            if depths.get(id).and_then(|d| d.ready) == Some(ready) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    tokio::time::timeout(MUST_HAPPEN, wait)
        .await
        .unwrap_or_else(|_| panic!("queue of {id} never showed {ready} ready messages"));
    reads
}

#[tokio::test]
async fn messages_in_a_worker_queue_are_read_back_as_its_depth_in_one_call_per_read() {
    let (conn, channel) = channel().await;
    let (busy, idle) = (WorkerId(Uuid::now_v7()), WorkerId(Uuid::now_v7()));
    let busy_queue = worker_queue(&channel, busy).await;
    let idle_queue = worker_queue(&channel, idle).await;
    publish(&channel, &busy_queue, 7).await;

    let monitor = QueueMonitor::new(&management_url(), &common::amqp_url()).expect("valid URLs");
    let reads = wait_for_depth(&monitor, busy, 7).await;
    assert_eq!(
        monitor.calls(),
        reads,
        "one request per read, for all queues"
    );
    let depths = monitor.depths().await.expect("answers");
    let idle_depth = depths.get(idle).expect("the idle queue is listed");
    assert_eq!(idle_depth.ready, Some(0));

    for queue in [busy_queue, idle_queue] {
        let _ = channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = conn.close(200, "done".into()).await;
}

#[tokio::test]
async fn an_absent_management_api_says_how_to_enable_it() {
    let url = format!("http://127.0.0.1:{}", common::free_port());
    let monitor = QueueMonitor::new(&url, &common::amqp_url()).expect("valid URLs");
    let err = monitor.depths().await.expect_err("nothing listens there");
    assert!(matches!(err, BrokerError::Unreachable { .. }), "{err:?}");
    let text = workerctl::backoff::error_chain(&err);
    assert!(text.contains("rabbitmq_management"), "{text}");
    assert!(text.contains("scale.management_url"), "{text}");
}

#[tokio::test]
async fn wrong_credentials_are_named_as_such() {
    let base = reqwest::Url::parse(&management_url()).expect("a URL");
    let mut url = base.clone();
    url.set_username("workerctl").expect("has a host");
    url.set_password(Some("not-the-password"))
        .expect("has a host");
    let monitor = QueueMonitor::new(url.as_str(), &common::amqp_url()).expect("valid URLs");
    let err = monitor.depths().await.expect_err("refused");
    assert!(
        matches!(err, BrokerError::Unauthorized { status: 401, .. }),
        "{err:?}"
    );
    assert!(!err.to_string().contains("not-the-password"), "{err}");
}

/// A poller on `url` every 200 ms: its readings, its wake-ups, and its stop.
fn poller(url: &str) -> (watch::Receiver<Reading>, Arc<Notify>, CancellationToken) {
    let (rx, wake, shutdown, _) = poller_every(url, Duration::from_millis(200));
    (rx, wake, shutdown)
}

/// A poller on `url` every `every`, and its monitor (to count requests).
fn poller_every(
    url: &str,
    every: Duration,
) -> (
    watch::Receiver<Reading>,
    Arc<Notify>,
    CancellationToken,
    Arc<QueueMonitor>,
) {
    let monitor = Arc::new(QueueMonitor::new(url, &common::amqp_url()).expect("valid URLs"));
    let (tx, rx) = watch::channel(Reading::NotYet);
    let wake = Arc::new(Notify::new());
    let shutdown = CancellationToken::new();
    tokio::spawn(poll(
        monitor.clone(),
        every,
        tx,
        wake.clone(),
        shutdown.clone(),
        |_| {},
    ));
    (rx, wake, shutdown, monitor)
}

/// Whether a reading shows at least `n` messages ready in `id`'s queue.
fn shows_at_least(id: WorkerId, n: u64) -> impl Fn(&Reading) -> bool {
    move |r| r.depths().and_then(|d| d.get(id)?.ready) >= Some(n)
}

#[tokio::test]
async fn the_poller_wakes_the_controller_when_messages_arrive() {
    let (conn, channel) = channel().await;
    let id = WorkerId(Uuid::now_v7());
    let queue = worker_queue(&channel, id).await;
    let (mut readings, wake, shutdown) = poller(&management_url());
    let shows = |n: u64| {
        move |r: &Reading| r.depths().and_then(|d| d.get(id)).and_then(|q| q.ready) == Some(n)
    };
    tokio::time::timeout(MUST_HAPPEN, readings.wait_for(shows(0)))
        .await
        .expect("the empty queue is read")
        .expect("the poller runs");
    publish(&channel, &queue, 3).await;
    // Other tests' queues on the broker wake it too: wait for a wake-up
    // after which the reading shows our messages. The poller publishes a
    // reading before it wakes for it.
    let woken = async {
        loop {
            wake.notified().await;
            if shows(3)(&readings.borrow_and_update()) {
                return;
            }
        }
    };
    tokio::time::timeout(MUST_HAPPEN, woken)
        .await
        .expect("a wake-up for the new depth");
    shutdown.cancel();
    let _ = channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = conn.close(200, "done".into()).await;
}

/// Scale from zero: a worker at zero replicas has an idle queue (no
/// consumer), and one message in it must reach the daemon's poller, polling
/// at the daemon's interval. How soon, and how many requests per poll, is
/// for benches/depth.rs to measure (one request per read for every queue is
/// asserted above); this only catches the message never arriving.
#[tokio::test]
async fn one_message_in_an_idle_queue_reaches_the_daemons_poller() {
    let (conn, channel) = channel().await;
    let id = WorkerId(Uuid::now_v7());
    let queue = worker_queue(&channel, id).await;
    let every = Config::default().scale.poll_interval;
    let (mut readings, _wake, shutdown, monitor) = poller_every(&management_url(), every);
    let idle = readings.wait_for(|r| r.depths().and_then(|d| d.get(id)?.ready) == Some(0));
    tokio::time::timeout(MUST_HAPPEN, idle)
        .await
        .expect("the idle queue is read as empty")
        .expect("the poller runs");
    publish(&channel, &queue, 1).await;
    let seen = tokio::time::timeout(MUST_HAPPEN, readings.wait_for(shows_at_least(id, 1)));
    seen.await
        .expect("the message reaches a reading")
        .expect("the poller runs");
    assert!(monitor.calls() >= 2, "read before and after the message");
    shutdown.cancel();
    let _ = channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = conn.close(200, "done".into()).await;
}

/// What `workerctl plan` and `reconcile --once` scale on: one read.
#[tokio::test]
async fn a_one_shot_read_shows_the_messages_of_an_idle_queue() {
    let (conn, channel) = channel().await;
    let id = WorkerId(Uuid::now_v7());
    let queue = worker_queue(&channel, id).await;
    publish(&channel, &queue, 2).await;
    let wait = async {
        while !shows_at_least(id, 2)(&read_once(&management_url(), &common::amqp_url()).await) {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::time::timeout(MUST_HAPPEN, wait)
        .await
        .expect("a read shows the messages");
    let _ = channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = conn.close(200, "done".into()).await;
}

#[tokio::test]
async fn a_one_shot_read_without_a_management_url_says_why() {
    let reading = read_once("", &common::amqp_url()).await;
    let Reading::Unavailable(why) = reading else {
        panic!("read without a URL: {reading:?}")
    };
    assert!(why.contains("scale.management_url"), "{why}");
}

#[tokio::test]
async fn an_unreadable_management_api_is_published_once_with_its_reason() {
    let url = format!("http://127.0.0.1:{}", common::free_port());
    let (mut readings, wake, shutdown) = poller(&url);
    let reading = tokio::time::timeout(
        MUST_HAPPEN,
        readings.wait_for(|r| matches!(r, Reading::Unavailable(_))),
    )
    .await
    .expect("the failure is published")
    .expect("the poller runs")
    .clone();
    let Reading::Unavailable(why) = reading else {
        unreachable!("waited for it")
    };
    assert!(why.contains("rabbitmq_management"), "{why}");
    wake.notified().await;
    // Polls keep failing the same way: no further wake-up, no new reading.
    readings.mark_unchanged();
    let quiet = tokio::time::timeout(Duration::from_secs(1), wake.notified()).await;
    assert!(
        quiet.is_err(),
        "an unchanged failure woke the controller again"
    );
    assert!(!readings.has_changed().expect("the poller runs"));
    shutdown.cancel();
}
