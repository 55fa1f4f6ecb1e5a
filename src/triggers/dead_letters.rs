//! The dead-letter collector, a daemon task: keeps what the pipeline routes
//! to `errors` where a person can see it.
//!
//! It declares a durable quorum queue (`dead_letters.queue`, default
//! `workerctl.errors`, bounded by `x-max-length`) bound to `errors` on the
//! pipeline exchange, and consumes it into `workerctl_dead_letters`. A
//! message is acknowledged only after its row is committed, so a crash in
//! between redelivers it (and its digest makes that one row). Other queues
//! bound to `errors` get their own copies from the broker; this changes
//! nothing for them. Two daemons consume the one queue as competing
//! consumers, so each message is stored once without any leader.
//!
//! Why a table and not browsing the queue: reading a queue without taking
//! messages off it (get, then requeue) reorders it, bumps redelivery counts
//! and races other readers; a table can be listed, filtered, shown and
//! replayed by id as often as needed, and the status page can join it.
//!
//! [`read_letter`] (an error body → a row) is pure and tested here.

use super::amqp::{self, AmqpError, keep_session, refused};

use chrono::{DateTime, TimeZone, Utc};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::info;
use uuid::Uuid;

use crate::config::{AmqpConfig, DeadLettersConfig};
use crate::store::StoreError;
use crate::store::dead_letters::{self, NewDeadLetter};
use crate::triggers::invoke::ERRORS_KEY;

/// Messages in flight to the collector at once.
const PREFETCH: u16 = 32;

/// Why a collecting session ended.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CollectError {
    #[error("cannot set up the dead-letter queue")]
    Broker(#[from] AmqpError),
    #[error("the dead-letter consumer was cancelled by the broker")]
    Cancelled,
    #[error("cannot store a dead letter")]
    Store(#[source] StoreError),
}

/// The header in which workerctl's runtime says which attempt failed (the
/// body keeps SensorBucket's fields only, docs/compatibility.md §4).
pub(crate) const ATTEMPT_HEADER: &str = "x-workerctl-attempt";

/// Below this a `timestamp` is Unix seconds (SensorBucket's error body and
/// workerctl's runtime), above it milliseconds (older runtimes): 10^11 s is
/// the year 5138, 10^11 ms is 1973.
const SECONDS_BELOW: i64 = 100_000_000_000;

/// An error body (docs/compatibility.md §4) as a row: the worker, queue, attempt,
/// time and traceback it names; the whole body kept. A body that is not
/// JSON is kept as a string with nothing else known. The attempt is the
/// `x-workerctl-attempt` header's (`attempt_header`), else an older
/// runtime's `attempt` field.
pub fn read_letter(
    body: &[u8],
    message_id: Option<&str>,
    attempt_header: Option<i64>,
    now: DateTime<Utc>,
) -> NewDeadLetter {
    let parsed = serde_json::from_slice::<Value>(body).ok();
    let doc = parsed
        .clone()
        .unwrap_or_else(|| Value::String(String::from_utf8_lossy(body).into_owned()));
    let text = |key: &str| doc.get(key).and_then(Value::as_str).map(str::to_string);
    let worker_id = text("worker").and_then(|w| Uuid::parse_str(&w).ok());
    let attempt = attempt_header
        .or_else(|| {
            ["attempt", "processing_attempt"]
                .iter()
                .find_map(|k| doc.get(*k).and_then(Value::as_i64))
        })
        .and_then(|a| i32::try_from(a).ok());
    let failed_at = doc
        .get("timestamp")
        .and_then(Value::as_i64)
        .and_then(failed_at)
        .unwrap_or(now);
    let mut digest = Sha256::new();
    digest.update(message_id.unwrap_or("").as_bytes());
    digest.update([0]);
    digest.update(body);
    NewDeadLetter {
        worker_id,
        queue: text("queue").unwrap_or_default(),
        error: text("error").unwrap_or_default(),
        attempt,
        failed_at,
        message_id: message_id.map(str::to_string),
        body: doc,
        digest: hex::encode(digest.finalize()),
    }
}

/// The time of an error body's `timestamp`, in seconds or milliseconds
/// ([`SECONDS_BELOW`]).
fn failed_at(timestamp: i64) -> Option<DateTime<Utc>> {
    if timestamp < SECONDS_BELOW {
        Utc.timestamp_opt(timestamp, 0).single()
    } else {
        Utc.timestamp_millis_opt(timestamp).single()
    }
}

/// An integer header value, whatever width the publisher chose.
fn header_integer(headers: Option<&FieldTable>, key: &str) -> Option<i64> {
    match headers?.inner().get(key)? {
        AMQPValue::ShortShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::LongUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongLongInt(v) => Some(*v),
        _ => None,
    }
}

/// Collects dead letters until `shutdown` is cancelled; a lost broker or
/// database is logged and retried with capped backoff. Never returns early.
pub async fn run(
    amqp: AmqpConfig,
    pool: PgPool,
    config: DeadLettersConfig,
    shutdown: CancellationToken,
) {
    keep_session("dead-letter collector", &shutdown, || {
        session(&amqp, &pool, &config)
    })
    .await;
}

async fn session(amqp: &AmqpConfig, pool: &PgPool, config: &DeadLettersConfig) -> CollectError {
    match consume(amqp, pool, config).await {
        Ok(()) => CollectError::Cancelled,
        Err(e) => e,
    }
}

async fn consume(
    amqp: &AmqpConfig,
    pool: &PgPool,
    config: &DeadLettersConfig,
) -> Result<(), CollectError> {
    let connection = amqp::connect(amqp, "workerctl dead letters").await?;
    let channel = connection
        .create_channel()
        .await
        .map_err(refused("open a channel"))?;
    amqp::declare_exchange(&channel, &amqp.exchange).await?;
    declare_queue(&channel, &amqp.exchange, config).await?;
    channel
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .map_err(refused("set the prefetch"))?;
    let mut deliveries = channel
        .basic_consume(
            config.queue.as_str().into(),
            "workerctl-dead-letters".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(refused("consume the dead-letter queue"))?;
    info!(queue = %config.queue, "collecting dead letters from {ERRORS_KEY}");
    while let Some(delivery) = deliveries.next().await {
        let delivery = delivery.map_err(refused("deliver a dead letter"))?;
        let id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str());
        let attempt = header_integer(delivery.properties.headers().as_ref(), ATTEMPT_HEADER);
        let letter = read_letter(&delivery.data, id, attempt, Utc::now());
        match dead_letters::insert(pool, &letter, config.keep).await {
            Ok(_) => {
                delivery
                    .ack(BasicAckOptions::default())
                    .await
                    .map_err(refused("acknowledge a dead letter"))?;
            }
            Err(e) => {
                // Back to the queue: it waits there until the database is back.
                let requeue = BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                };
                let _ = delivery.nack(requeue).await;
                return Err(CollectError::Store(e));
            }
        }
    }
    Ok(())
}

/// The durable, bounded quorum queue bound to `errors`.
async fn declare_queue(
    channel: &lapin::Channel,
    exchange: &str,
    config: &DeadLettersConfig,
) -> Result<(), AmqpError> {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args.insert(
        "x-max-length".into(),
        AMQPValue::LongLongInt(config.queue_max_length),
    );
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(config.queue.as_str().into(), durable, args)
        .await
        .map_err(refused("declare the dead-letter queue"))?;
    channel
        .queue_bind(
            config.queue.as_str().into(),
            exchange.into(),
            ERRORS_KEY.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(refused("bind the dead-letter queue to errors"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn now() -> DateTime<Utc> {
        Utc.timestamp_millis_opt(5_000).single().expect("time")
    }

    #[test]
    fn an_error_body_gives_its_worker_time_attempt_and_traceback() {
        let worker = Uuid::from_u128(7);
        let body = json!({
            "received_by_worker": {"tracing_id": "t"}, "processing_attempt": {"x": 1},
            "worker": worker.to_string(), "queue": worker.to_string(),
            "timestamp": 1_700_000_000, "error": "Traceback\nValueError: bad"
        });
        let letter = read_letter(body.to_string().as_bytes(), Some("m-1"), Some(2), now());
        assert_eq!(letter.worker_id, Some(worker));
        assert_eq!(letter.queue, worker.to_string());
        assert_eq!(letter.attempt, Some(2));
        assert_eq!(letter.failed_at.timestamp(), 1_700_000_000);
        assert_eq!(letter.error, "Traceback\nValueError: bad");
        assert_eq!(letter.body["received_by_worker"]["tracing_id"], "t");
        assert_eq!(letter.message_id.as_deref(), Some("m-1"));
    }

    #[test]
    fn a_timestamp_is_read_as_seconds_or_as_an_older_runtimes_milliseconds() {
        let cases = [
            // SensorBucket's wrapper and workerctl's runtime: seconds.
            (1_700_000_000, 1_700_000_000_000),
            (0, 0),
            // An older runtime: milliseconds.
            (1_700_000_000_123, 1_700_000_000_123),
            (SECONDS_BELOW, SECONDS_BELOW),
            (SECONDS_BELOW - 1, (SECONDS_BELOW - 1) * 1000),
        ];
        for (timestamp, ms) in cases {
            let body = json!({ "timestamp": timestamp }).to_string();
            let letter = read_letter(body.as_bytes(), None, None, now());
            assert_eq!(letter.failed_at.timestamp_millis(), ms, "{timestamp}");
        }
    }

    #[test]
    fn an_older_runtimes_attempt_field_counts_when_no_header_says_it() {
        let body = json!({ "attempt": 3 }).to_string();
        assert_eq!(
            read_letter(body.as_bytes(), None, None, now()).attempt,
            Some(3)
        );
        assert_eq!(
            read_letter(body.as_bytes(), None, Some(1), now()).attempt,
            Some(1)
        );
    }

    #[test]
    fn a_body_that_is_not_json_is_kept_as_text_at_the_time_it_came() {
        let letter = read_letter(b"oops", None, None, now());
        assert_eq!(letter.body, json!("oops"));
        assert_eq!(letter.worker_id, None);
        assert_eq!(letter.failed_at, now());
    }

    #[test]
    fn the_same_message_twice_has_one_digest_and_another_message_another() {
        let a = read_letter(b"{}", Some("m-1"), None, now());
        let again = read_letter(b"{}", Some("m-1"), None, now());
        let other = read_letter(b"{}", Some("m-2"), None, now());
        assert_eq!(a.digest, again.digest);
        assert_ne!(a.digest, other.digest);
    }
}
