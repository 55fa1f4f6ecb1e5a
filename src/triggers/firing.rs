//! The firing loop, a daemon task: at each fire time of each schedule of an
//! enabled worker, publish the schedule's message to the worker's routing
//! key, the same path any pipeline message takes.
//!
//! Each pass re-reads every schedule (one statement), asks the pure
//! [`cron::decide`] what is due, records each due fire with a
//! compare-and-set and publishes only when that write won. So a fire time
//! is published once with any number of daemons and across restarts,
//! without leader election: the database decides. A fire whose publish
//! fails stays recorded (at most once, never twice) and its error is kept
//! on the schedule for `schedule list`.
//!
//! The loop sleeps until the earliest next fire time or `poll` (to see new
//! and removed schedules), whichever is sooner. Time comes from a [`Clock`],
//! so tests run it on paused tokio time with in-memory fakes.

use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};
use lapin::types::{AMQPValue, FieldTable};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use uuid::Uuid;

use super::amqp::{self, AmqpError, Target, open_channel};
use crate::backoff::error_chain;
use crate::config::AmqpConfig;
use crate::store::StoreError;
use crate::store::schedules::{self, ScheduleRow};
use crate::triggers::cron::{self, Due};

/// The AMQP header that carries the fire time (Unix ms) of a scheduled message.
pub const FIRE_TIME_HEADER: &str = "x-workerctl-fire-time";
/// The AMQP header that names the schedule of a scheduled message.
pub(crate) const SCHEDULE_HEADER: &str = "x-workerctl-schedule";

/// Where schedules are kept.
pub trait ScheduleStore: Send + Sync {
    fn load(&self) -> impl Future<Output = Result<Vec<ScheduleRow>, StoreError>> + Send;
    /// Compare-and-set of the last fire: `true` if this caller won it.
    fn record_fire(
        &self,
        id: i64,
        at: DateTime<Utc>,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    fn record_error(
        &self,
        id: i64,
        error: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// Where fires are published.
pub trait Publisher: Send + Sync {
    /// Publishes `body` with `routing_key`; `Ok(false)` if no queue took it.
    fn publish(
        &self,
        routing_key: &str,
        body: &[u8],
        fire: &Fire,
    ) -> impl Future<Output = Result<bool, AmqpError>> + Send;
}

/// What a published fire is, for its headers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fire {
    pub schedule: i64,
    pub at: DateTime<Utc>,
}

/// The wall clock, as the loop sees it.
pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
}

/// The system clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// Runs passes until `shutdown` is cancelled; a failed pass is logged and
/// retried at the next wake-up. Never returns early.
pub async fn run<S, P, C>(
    store: S,
    publisher: P,
    clock: C,
    poll: Duration,
    shutdown: CancellationToken,
) where
    S: ScheduleStore,
    P: Publisher,
    C: Clock,
{
    loop {
        // Leader gating would go here: a daemon that is not the leader
        // skips the pass. It is not needed for correctness (the
        // compare-and-set makes every fire once), only to spare the
        // followers' statements.
        let wake = match pass(&store, &publisher, &clock).await {
            Ok(wake) => wake,
            Err(e) => {
                warn!("schedules: {}", error_chain(&e));
                None
            }
        };
        let sleep = until(wake, clock.now()).map_or(poll, |d| d.min(poll));
        tokio::select! {
            // Both arms are cancel-safe: a pass is never interrupted.
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(sleep) => {}
        }
    }
}

/// How long from `now` to `wake`, zero if it has passed.
fn until(wake: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Option<Duration> {
    wake.map(|w| (w - now).to_std().unwrap_or(Duration::ZERO))
}

/// One pass: every due fire published once. Returns the earliest next fire time.
pub async fn pass<S, P, C>(
    store: &S,
    publisher: &P,
    clock: &C,
) -> Result<Option<DateTime<Utc>>, StoreError>
where
    S: ScheduleStore,
    P: Publisher,
    C: Clock,
{
    let rows = store.load().await?;
    let mut earliest: Option<DateTime<Utc>> = None;
    for row in rows.iter().filter(|r| r.worker_enabled) {
        let parsed = match cron::parse(&row.cron, &row.timezone) {
            Ok(s) => s,
            Err(e) => {
                store.record_error(row.id, &e.to_string()).await?;
                continue;
            }
        };
        let Due { fire, wake } =
            cron::decide(&parsed, row.last_fire_at, row.created_at, clock.now());
        if let Some(at) = fire {
            fire_once(store, publisher, clock, row, at).await?;
        }
        earliest = match (earliest, wake) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
    Ok(earliest)
}

async fn fire_once<S: ScheduleStore, P: Publisher, C: Clock>(
    store: &S,
    publisher: &P,
    clock: &C,
    row: &ScheduleRow,
    at: DateTime<Utc>,
) -> Result<(), StoreError> {
    if !store.record_fire(row.id, at).await? {
        debug!(schedule = row.id, %at, "fire already recorded elsewhere");
        return Ok(());
    }
    let now_ms = clock.now().timestamp_millis();
    let message = cron::fire_message(&row.message, row.worker_id, now_ms, Uuid::new_v4);
    let body = serde_json::to_vec(&message).unwrap_or_default();
    let fire = Fire {
        schedule: row.id,
        at,
    };
    let key = row.worker_id.to_string();
    let error = match publisher.publish(&key, &body, &fire).await {
        Ok(true) => String::new(),
        Ok(false) => format!(
            "the fire at {at} found no queue for worker {}: is its container running?",
            row.worker_name
        ),
        Err(e) => format!("the fire at {at} was not published: {}", error_chain(&e)),
    };
    if !error.is_empty() {
        warn!(schedule = row.id, "{error}");
    }
    store.record_error(row.id, &error).await
}

/// The schedules in Postgres.
#[derive(Clone, Debug)]
pub struct PgSchedules(pub sqlx::PgPool);

impl ScheduleStore for PgSchedules {
    async fn load(&self) -> Result<Vec<ScheduleRow>, StoreError> {
        schedules::list(&self.0, None).await
    }
    async fn record_fire(&self, id: i64, at: DateTime<Utc>) -> Result<bool, StoreError> {
        schedules::record_fire(&self.0, id, at).await
    }
    async fn record_error(&self, id: i64, error: &str) -> Result<(), StoreError> {
        schedules::record_error(&self.0, id, error).await
    }
}

/// Publishes to the pipeline exchange on one connection, made on first use
/// and made again after a failure.
pub struct AmqpPublisher {
    amqp: AmqpConfig,
    channel: Mutex<Option<(lapin::Connection, lapin::Channel)>>,
}

impl AmqpPublisher {
    pub fn new(amqp: AmqpConfig) -> Self {
        AmqpPublisher {
            amqp,
            channel: Mutex::new(None),
        }
    }
}

impl Publisher for AmqpPublisher {
    async fn publish(
        &self,
        routing_key: &str,
        body: &[u8],
        fire: &Fire,
    ) -> Result<bool, AmqpError> {
        let mut held = self.channel.lock().await;
        if held.as_ref().is_none_or(|(_, c)| !c.status().connected()) {
            *held = Some(open_channel(&self.amqp, "workerctl schedules").await?);
        }
        let Some((_, channel)) = held.as_ref() else {
            return Err(AmqpError::Said("has no channel".into()));
        };
        let mut headers = FieldTable::default();
        headers.insert(
            FIRE_TIME_HEADER.into(),
            AMQPValue::LongLongInt(fire.at.timestamp_millis()),
        );
        headers.insert(
            SCHEDULE_HEADER.into(),
            AMQPValue::LongLongInt(fire.schedule),
        );
        let properties = amqp::pipeline_properties(&Uuid::now_v7().to_string(), headers);
        let target = Target {
            exchange: &self.amqp.exchange,
            routing_key,
        };
        let result = amqp::publish_once(channel, target, body, properties).await;
        if result.is_err() {
            *held = None;
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex as StdMutex};
    use tokio::time::Instant;

    /// Wall-clock time that moves with (paused) tokio time.
    #[derive(Clone)]
    struct TokioClock {
        base: DateTime<Utc>,
        start: Instant,
    }

    impl Clock for TokioClock {
        fn now(&self) -> DateTime<Utc> {
            self.base + chrono::Duration::from_std(self.start.elapsed()).unwrap_or_default()
        }
    }

    /// Schedules in memory, shared by every "daemon" of a test.
    #[derive(Clone, Default)]
    struct FakeStore(Arc<StdMutex<Vec<ScheduleRow>>>);

    impl ScheduleStore for FakeStore {
        async fn load(&self) -> Result<Vec<ScheduleRow>, StoreError> {
            Ok(self.0.lock().expect("lock").clone())
        }
        async fn record_fire(&self, id: i64, at: DateTime<Utc>) -> Result<bool, StoreError> {
            let mut rows = self.0.lock().expect("lock");
            let row = rows.iter_mut().find(|r| r.id == id).expect("row");
            if row.last_fire_at.is_some_and(|l| l >= at) {
                return Ok(false);
            }
            row.last_fire_at = Some(at);
            row.fires += 1;
            Ok(true)
        }
        async fn record_error(&self, id: i64, error: &str) -> Result<(), StoreError> {
            let mut rows = self.0.lock().expect("lock");
            if let Some(row) = rows.iter_mut().find(|r| r.id == id) {
                row.last_error = error.into();
            }
            Ok(())
        }
    }

    /// (routing key, fire time, when published).
    type Sent = (String, DateTime<Utc>, DateTime<Utc>);

    /// Every publish, with the clock's time when it happened.
    #[derive(Clone)]
    struct FakePublisher {
        clock: TokioClock,
        sent: Arc<StdMutex<Vec<Sent>>>,
    }

    impl Publisher for FakePublisher {
        async fn publish(&self, key: &str, _body: &[u8], fire: &Fire) -> Result<bool, AmqpError> {
            let now = self.clock.now();
            self.sent
                .lock()
                .expect("lock")
                .push((key.into(), fire.at, now));
            Ok(true)
        }
    }

    fn row(id: i64, cron: &str, created_at: DateTime<Utc>) -> ScheduleRow {
        ScheduleRow {
            id,
            worker_id: Uuid::from_u128(id as u128),
            worker_name: format!("w{id}"),
            worker_enabled: true,
            cron: cron.into(),
            timezone: "UTC".into(),
            message: serde_json::json!({}),
            created_at,
            last_fire_at: None,
            fires: 0,
            last_error: String::new(),
        }
    }

    fn base() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-01-01T00:00:00.250Z")
            .expect("time")
            .with_timezone(&Utc)
    }

    fn setup(rows: Vec<ScheduleRow>) -> (FakeStore, FakePublisher, TokioClock) {
        let clock = TokioClock {
            base: base(),
            start: Instant::now(),
        };
        let store = FakeStore(Arc::new(StdMutex::new(rows)));
        let publisher = FakePublisher {
            clock: clock.clone(),
            sent: Arc::default(),
        };
        (store, publisher, clock)
    }

    #[tokio::test(start_paused = true)]
    async fn an_every_second_schedule_fires_once_per_second_on_time() {
        let (store, publisher, clock) = setup(vec![row(1, "* * * * * *", base())]);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(
            store.clone(),
            publisher.clone(),
            clock,
            Duration::from_secs(1),
            shutdown.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(10_100)).await;
        shutdown.cancel();
        task.await.expect("loop ends");
        let sent = publisher.sent.lock().expect("lock").clone();
        assert_eq!(sent.len(), 10, "{sent:?}");
        for (i, (key, at, published)) in sent.iter().enumerate() {
            assert_eq!(key, &Uuid::from_u128(1).to_string());
            let expected = DateTime::parse_from_rfc3339("2026-01-01T00:00:01Z")
                .expect("t")
                .with_timezone(&Utc)
                + chrono::Duration::seconds(i as i64);
            assert_eq!(*at, expected);
            assert!(
                *published - *at < chrono::Duration::milliseconds(5),
                "late: {published} for {at}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn two_daemons_on_one_store_publish_each_fire_once() {
        let (store, publisher, clock) = setup(vec![row(1, "* * * * * *", base())]);
        let shutdown = CancellationToken::new();
        let a = tokio::spawn(run(
            store.clone(),
            publisher.clone(),
            clock.clone(),
            Duration::from_secs(1),
            shutdown.clone(),
        ));
        let b = tokio::spawn(run(
            store.clone(),
            publisher.clone(),
            clock,
            Duration::from_millis(300),
            shutdown.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(5_100)).await;
        shutdown.cancel();
        a.await.expect("a");
        b.await.expect("b");
        let sent = publisher.sent.lock().expect("lock").clone();
        let mut times: Vec<_> = sent.iter().map(|(_, at, _)| *at).collect();
        times.dedup();
        assert_eq!(sent.len(), 5, "{sent:?}");
        assert_eq!(times.len(), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_restart_after_missed_fire_times_fires_once_not_in_a_burst() {
        let mut r = row(1, "* * * * * *", base() - chrono::Duration::hours(1));
        r.last_fire_at = Some(base() - chrono::Duration::seconds(30));
        let (store, publisher, clock) = setup(vec![r]);
        let fired = pass(&store, &publisher, &clock).await.expect("pass");
        assert!(fired.is_some());
        let sent = publisher.sent.lock().expect("lock").clone();
        assert_eq!(sent.len(), 1, "one fire for thirty missed: {sent:?}");
        assert_eq!(sent[0].1, base() - chrono::Duration::milliseconds(250));
        pass(&store, &publisher, &clock).await.expect("pass");
        assert_eq!(
            publisher.sent.lock().expect("lock").len(),
            1,
            "and not again"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn disabled_workers_and_broken_expressions_do_not_fire() {
        let mut off = row(1, "* * * * * *", base());
        off.worker_enabled = false;
        let broken = row(2, "not cron", base());
        let (store, publisher, clock) = setup(vec![off, broken]);
        tokio::time::sleep(Duration::from_secs(3)).await;
        pass(&store, &publisher, &clock).await.expect("pass");
        assert!(publisher.sent.lock().expect("lock").is_empty());
        let rows = store.load().await.expect("rows");
        assert!(
            rows[1].last_error.contains("invalid cron expression"),
            "{:?}",
            rows[1]
        );
    }
}
