//! The traffic recorder, a daemon task: keeps the last `record.keep`
//! messages each enabled worker received, as received, and what each
//! produced, in `workerctl_recorded_messages` — the inputs `workerctl worker
//! try` replays through new code.
//!
//! **How it taps.** Beside each enabled worker's own queue (`worker_<id>`,
//! bound to the pipeline exchange with the worker's id) it declares a
//! *tap*: a classic, non-durable queue `workerctl.record.<id>` with the same
//! binding, `x-max-length = record.keep` and `x-overflow = drop-head`, so the
//! broker hands it a copy of every message the worker's queue gets and
//! drops the oldest beyond the bound. The worker's queue, its consumers and
//! the publisher's path are untouched: the tap is another queue the exchange
//! routes to (classic and transient, so the copy costs no disk write and no
//! raft round). A worker is tapped only once its own queue exists, or the
//! tap would make messages routable that no worker queue takes (`worker
//! invoke` and the scaler read "unroutable" as "never started").
//!
//! Outputs: one more bounded queue, `workerctl.record.outputs.<instance>`, bound to
//! `errors`, to `workerctl.invoke.*` and to each next step a recorded
//! message names (at most [`MAX_OUTPUT_KEYS`] keys). An output is attached
//! to the newest recording of its worker with its tracing id.
//!
//! The daemon consumes the taps on one channel, writes them in batches (one
//! insert and one prune per batch, one statement to match outputs) and
//! acknowledges a batch after it committed. Nothing here is in the path of a
//! pipeline message: when the daemon falls behind or is away, the taps drop
//! their oldest, which is what a bounded recording wants anyway. Every tap
//! expires an hour after its last consumer went.
//!
//! The reading of deliveries ([`read_input`], [`read_output`],
//! [`next_key`]) is pure and tested here.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::stream::SelectAll;
use futures::{Stream, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection};
use serde_json::Value;
use sqlx::PgPool;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};
use uuid::Uuid;

use crate::config::{AmqpConfig, RecordConfig};
use crate::store::StoreError;
use crate::store::recorded::{self, NewOutput, NewRecording};
use crate::triggers::amqp::{self, AmqpError, keep_session, refused};
use crate::triggers::invoke::ERRORS_KEY;

/// The queue outputs are tapped into: one per instance, so that daemons
/// with other databases on the same broker do not take each other's.
pub(crate) fn outputs_queue(instance: &str) -> String {
    format!("workerctl.record.outputs.{instance}")
}
/// What a tap of a worker is named.
pub(crate) fn tap_queue(worker: Uuid) -> String {
    format!("workerctl.record.{worker}")
}
/// The most next-step keys the outputs queue is bound to.
pub(crate) const MAX_OUTPUT_KEYS: usize = 256;
const OUTPUTS_MAX_LENGTH: i64 = 10_000;
/// Unused taps are deleted by the broker after this long (ms).
const TAP_EXPIRES_MS: i64 = 3_600_000;
/// How often the enabled workers are read again (new ones tapped, gone ones untapped).
const REFRESH: Duration = Duration::from_secs(2);
/// A batch is written when it has this many messages, or this long after its first.
const BATCH_MAX: usize = 500;
const BATCH_WAIT: Duration = Duration::from_millis(100);
/// Per consumer: bounds what is in the daemon's memory at once.
const PREFETCH: u16 = 1000;
/// How many batches an output waits for its input to be written.
const OUTPUT_TRIES: u8 = 3;

/// Why a recording session ended.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RecordError {
    #[error("cannot set up the recording taps")]
    Broker(#[from] AmqpError),
    #[error("cannot store recorded messages")]
    Store(#[from] StoreError),
    #[error("the broker closed the recording channel")]
    Closed,
}

/// One input, read: what to store about it.
pub(crate) fn read_input(
    worker: Uuid,
    routing_key: &str,
    message_id: Option<&str>,
    body: &[u8],
    now: DateTime<Utc>,
) -> NewRecording {
    let tracing_id = Head::of(body).and_then(|h| h.tracing_id.as_ref().map(text_of));
    NewRecording {
        worker_id: worker,
        received_at: now,
        routing_key: routing_key.to_string(),
        message_id: message_id.map(str::to_string),
        tracing_id,
        body: body.to_vec(),
    }
}

/// The routing key the worker will publish an input's result with
/// (`pipeline_steps[step_index + 1]`), if the outputs queue should be bound
/// to it: not `errors` (always bound), not an invocation's own key (bound by
/// pattern), nothing with topic wildcards.
pub(crate) fn next_key(body: &[u8]) -> Option<String> {
    let head = Head::of(body)?;
    let index = usize::try_from(head.step_index?).ok()?;
    let key = head.pipeline_steps?.get(index + 1)?.clone();
    let ours = key.starts_with(INVOKE_PATTERN.trim_end_matches('*'));
    let bindable = !key.is_empty() && key != ERRORS_KEY && !ours && !key.contains(['*', '#']);
    bindable.then_some(key)
}

/// The fields of a pipeline message the recorder reads; the rest of the
/// body is skipped by the parser, not built (a recorded message is parsed
/// for these only: it is stored as bytes).
#[derive(serde::Deserialize)]
struct Head {
    tracing_id: Option<Value>,
    step_index: Option<i64>,
    pipeline_steps: Option<Vec<String>>,
}

impl Head {
    fn of(body: &[u8]) -> Option<Head> {
        serde_json::from_slice(body).ok()
    }

    /// The worker at `step_index + offset` of the steps.
    fn step_worker(&self, offset: i64) -> Option<Uuid> {
        let index = self.step_index?.checked_add(offset)?;
        let step = self
            .pipeline_steps
            .as_ref()?
            .get(usize::try_from(index).ok()?)?;
        Uuid::parse_str(step).ok()
    }
}

/// Matches the keys `worker invoke` appends when a message has no next step.
const INVOKE_PATTERN: &str = "workerctl.invoke.*";

/// What a worker published, read: whose output it is (the worker before
/// the current step, or the one an error body names) and for which
/// tracing id. `None` when it cannot be told.
pub(crate) fn read_output(routing_key: &str, body: &[u8], now: DateTime<Utc>) -> Option<NewOutput> {
    let (worker_id, tracing_id) = if routing_key == ERRORS_KEY {
        let v = serde_json::from_slice::<Value>(body).ok()?;
        let received = v.get("received_by_worker")?;
        let named = v
            .get("worker")
            .and_then(Value::as_str)
            .and_then(|w| Uuid::parse_str(w).ok());
        let worker = named.or_else(|| step_worker(received, 0))?;
        (worker, text_of(received.get("tracing_id")?))
    } else {
        let head = Head::of(body)?;
        (head.step_worker(-1)?, text_of(head.tracing_id.as_ref()?))
    };
    Some(NewOutput {
        worker_id,
        tracing_id,
        routing_key: routing_key.to_string(),
        body: body.to_vec(),
        at: now,
    })
}

/// The worker at `step_index + offset` of a message's steps.
fn step_worker(message: &Value, offset: i64) -> Option<Uuid> {
    let index = message.get("step_index")?.as_i64()?.checked_add(offset)?;
    let step = message
        .get("pipeline_steps")?
        .as_array()?
        .get(usize::try_from(index).ok()?)?;
    Uuid::parse_str(step.as_str()?).ok()
}

fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Records until `shutdown` is cancelled; a lost broker or database is
/// logged and retried with capped backoff. Never returns early.
pub(crate) async fn run(
    amqp: AmqpConfig,
    pool: PgPool,
    config: RecordConfig,
    instance: String,
    shutdown: CancellationToken,
) {
    keep_session("traffic recorder", &shutdown, || {
        session(&amqp, &pool, &config, &instance)
    })
    .await;
}

async fn session(
    amqp: &AmqpConfig,
    pool: &PgPool,
    config: &RecordConfig,
    instance: &str,
) -> RecordError {
    let connection = match amqp::connect(amqp, "workerctl recorder").await {
        Ok(c) => c,
        Err(e) => return e.into(),
    };
    let ended = match Taps::open(&connection, &amqp.exchange, config.keep, instance).await {
        Ok(mut taps) => record(&mut taps, pool, config).await,
        Err(e) => e,
    };
    let _ = connection.close(200, "done".into()).await;
    ended
}

/// Where a delivery came from.
#[derive(Clone, Copy, Debug)]
enum Source {
    Input(Uuid),
    Output,
}

type Deliveries = Pin<Box<dyn Stream<Item = (Source, Result<Delivery, lapin::Error>)> + Send>>;

/// The session's broker side: the consuming channel with one consumer per
/// tap, and a channel for declarations (a refused declaration closes its
/// channel; that must not take the consumers with it).
struct Taps<'c> {
    connection: &'c Connection,
    exchange: String,
    keep: i64,
    outputs: String,
    consume: Channel,
    setup: Option<Channel>,
    tapped: HashMap<Uuid, String>,
    bound: HashSet<String>,
    streams: SelectAll<Deliveries>,
}

impl<'c> Taps<'c> {
    async fn open(
        connection: &'c Connection,
        exchange: &str,
        keep: i64,
        instance: &str,
    ) -> Result<Self, RecordError> {
        let consume = connection
            .create_channel()
            .await
            .map_err(refused("open a channel"))?;
        amqp::declare_exchange(&consume, exchange).await?;
        consume
            .basic_qos(PREFETCH, BasicQosOptions::default())
            .await
            .map_err(refused("set the prefetch"))?;
        let mut taps = Taps {
            connection,
            exchange: exchange.to_string(),
            keep,
            outputs: outputs_queue(instance),
            consume,
            setup: None,
            tapped: HashMap::new(),
            bound: HashSet::new(),
            streams: SelectAll::new(),
        };
        let outputs = taps.outputs.clone();
        taps.declare(&outputs, OUTPUTS_MAX_LENGTH).await?;
        for key in [ERRORS_KEY, INVOKE_PATTERN] {
            taps.bind(&outputs, key).await?;
        }
        taps.consume(&outputs, Source::Output).await?;
        Ok(taps)
    }

    async fn setup(&mut self) -> Result<Channel, RecordError> {
        if let Some(channel) = self.setup.as_ref().filter(|c| c.status().connected()) {
            return Ok(channel.clone());
        }
        let channel = self
            .connection
            .create_channel()
            .await
            .map_err(refused("open a channel"))?;
        self.setup = Some(channel.clone());
        Ok(channel)
    }

    async fn declare(&mut self, queue: &str, max_length: i64) -> Result<(), RecordError> {
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
        args.insert("x-expires".into(), AMQPValue::LongLongInt(TAP_EXPIRES_MS));
        let transient = QueueDeclareOptions::default();
        let channel = self.setup().await?;
        if channel
            .queue_declare(queue.into(), transient, args.clone())
            .await
            .is_ok()
        {
            return Ok(());
        }
        // Declared before with other arguments (record.keep changed): the
        // tap holds only copies, so it is made again. The refusal closed
        // the channel.
        self.setup = None;
        let channel = self.setup().await?;
        channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await
            .map_err(refused(
                "delete a recording tap declared with other arguments",
            ))?;
        channel
            .queue_declare(queue.into(), transient, args)
            .await
            .map_err(refused("declare a recording tap"))?;
        Ok(())
    }

    async fn bind(&mut self, queue: &str, key: &str) -> Result<(), RecordError> {
        self.setup()
            .await?
            .queue_bind(
                queue.into(),
                self.exchange.as_str().into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(refused("bind a recording tap"))?;
        Ok(())
    }

    async fn consume(&mut self, queue: &str, source: Source) -> Result<String, RecordError> {
        let consumer = self
            .consume
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(refused("consume a recording tap"))?;
        let tag = consumer.tag().to_string();
        self.streams
            .push(Box::pin(consumer.map(move |d| (source, d))));
        Ok(tag)
    }

    /// Whether the worker's own queue exists (a passive declare; its refusal
    /// closes the setup channel, which is opened again when next needed).
    async fn worker_queue_exists(&mut self, worker: Uuid) -> Result<bool, RecordError> {
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let channel = self.setup().await?;
        let name = format!("worker_{worker}");
        let found = channel
            .queue_declare(name.as_str().into(), passive, FieldTable::default())
            .await
            .is_ok();
        if !found {
            // The refusal closed the channel.
            self.setup = None;
        }
        Ok(found)
    }

    /// Taps the enabled workers not tapped yet (whose queue exists), and
    /// stops recording the others.
    async fn refresh(&mut self, enabled: &[Uuid]) -> Result<(), RecordError> {
        for &worker in enabled {
            if self.tapped.contains_key(&worker) || !self.worker_queue_exists(worker).await? {
                continue;
            }
            let queue = tap_queue(worker);
            self.declare(&queue, self.keep).await?;
            self.bind(&queue, &worker.to_string()).await?;
            let tag = self.consume(&queue, Source::Input(worker)).await?;
            debug!(%worker, "recording the worker's messages");
            self.tapped.insert(worker, tag);
        }
        let wanted: HashSet<&Uuid> = enabled.iter().collect();
        let gone: Vec<Uuid> = self
            .tapped
            .keys()
            .filter(|w| !wanted.contains(w))
            .copied()
            .collect();
        for worker in gone {
            if let Some(tag) = self.tapped.remove(&worker) {
                let _ = self
                    .consume
                    .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                    .await;
            }
            self.setup()
                .await?
                .queue_delete(
                    tap_queue(worker).as_str().into(),
                    QueueDeleteOptions::default(),
                )
                .await
                .map_err(refused("delete a recording tap"))?;
        }
        Ok(())
    }

    /// Binds the outputs queue to a next step seen in a recorded message.
    async fn follow(&mut self, key: String) -> Result<(), RecordError> {
        if self.bound.contains(&key) || self.bound.len() >= MAX_OUTPUT_KEYS {
            return Ok(());
        }
        let outputs = self.outputs.clone();
        self.bind(&outputs, &key).await?;
        self.bound.insert(key);
        Ok(())
    }
}

/// The newest `keep` of each worker's inputs in a batch, in order: older
/// ones would be pruned in the same transaction anyway.
pub(crate) fn newest_per_worker(inputs: Vec<NewRecording>, keep: i64) -> Vec<NewRecording> {
    let mut seen: HashMap<Uuid, i64> = HashMap::new();
    let mut kept: Vec<NewRecording> = inputs
        .into_iter()
        .rev()
        .filter(|r| {
            let n = seen.entry(r.worker_id).or_default();
            *n += 1;
            *n <= keep
        })
        .collect();
    kept.reverse();
    kept
}

/// What is read and not yet written.
#[derive(Default)]
struct Batch {
    inputs: Vec<NewRecording>,
    outputs: Vec<(NewOutput, u8)>,
    last_tag: Option<u64>,
    started: Option<Instant>,
}

async fn record(taps: &mut Taps<'_>, pool: &PgPool, config: &RecordConfig) -> RecordError {
    match record_until_error(taps, pool, config).await {
        Ok(()) => RecordError::Closed,
        Err(e) => e,
    }
}

async fn record_until_error(
    taps: &mut Taps<'_>,
    pool: &PgPool,
    config: &RecordConfig,
) -> Result<(), RecordError> {
    info!(
        keep = config.keep,
        "recording each enabled worker's messages"
    );
    let mut refresh = tokio::time::interval(REFRESH);
    let mut batch = Batch::default();
    loop {
        let flush_at = batch.started.map(|s| s + BATCH_WAIT);
        // Cancel-safe arms: a tick, a delivery (nothing is taken off the
        // stream unless this arm wins), a sleep.
        tokio::select! {
            _ = refresh.tick() => {
                let enabled = recorded::enabled_workers(pool).await?;
                taps.refresh(&enabled).await?;
            }
            next = taps.streams.next(), if !taps.streams.is_empty() => {
                let Some((source, delivery)) = next else { return Ok(()) };
                let delivery = delivery.map_err(refused("deliver a recorded message"))?;
                take(taps, &mut batch, source, delivery).await?;
                if batch.inputs.len() + batch.outputs.len() >= BATCH_MAX {
                    flush(&taps.consume, pool, config, &mut batch).await?;
                }
            }
            () = sleep_until(flush_at) => flush(&taps.consume, pool, config, &mut batch).await?,
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn take(
    taps: &mut Taps<'_>,
    batch: &mut Batch,
    source: Source,
    delivery: Delivery,
) -> Result<(), RecordError> {
    let now = Utc::now();
    batch.started.get_or_insert_with(Instant::now);
    batch.last_tag = Some(delivery.delivery_tag);
    let routing_key = delivery.routing_key.as_str();
    match source {
        Source::Input(worker) => {
            let id = delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.as_str());
            batch
                .inputs
                .push(read_input(worker, routing_key, id, &delivery.data, now));
            if let Some(key) = next_key(&delivery.data) {
                taps.follow(key).await?;
            }
        }
        Source::Output => {
            if let Some(output) = read_output(routing_key, &delivery.data, now) {
                batch.outputs.push((output, 0));
            }
        }
    }
    Ok(())
}

/// Writes the inputs, matches the outputs (an unmatched one waits a few
/// batches for its input), then acknowledges everything delivered so far.
async fn flush(
    consume: &Channel,
    pool: &PgPool,
    config: &RecordConfig,
    batch: &mut Batch,
) -> Result<(), RecordError> {
    let newest = newest_per_worker(std::mem::take(&mut batch.inputs), config.keep);
    recorded::insert(pool, &newest, config.keep).await?;
    let outputs: Vec<NewOutput> = batch.outputs.iter().map(|(o, _)| o.clone()).collect();
    let matched: HashSet<usize> = recorded::match_outputs(pool, &outputs)
        .await?
        .into_iter()
        .collect();
    let waiting = std::mem::take(&mut batch.outputs);
    batch.outputs = waiting
        .into_iter()
        .enumerate()
        .filter(|(i, (_, tries))| !matched.contains(i) && *tries + 1 < OUTPUT_TRIES)
        .map(|(_, (o, tries))| (o, tries + 1))
        .collect();
    if let Some(tag) = batch.last_tag.take() {
        let all = BasicAckOptions { multiple: true };
        consume
            .basic_ack(tag, all)
            .await
            .map_err(refused("acknowledge recorded messages"))?;
    }
    batch.started = (!batch.outputs.is_empty()).then(Instant::now);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use serde_json::json;

    fn now() -> DateTime<Utc> {
        Utc.timestamp_millis_opt(5_000).single().expect("time")
    }

    const W1: &str = "00000000-0000-0000-0000-000000000001";
    const W2: &str = "00000000-0000-0000-0000-000000000002";

    fn id(s: &str) -> Uuid {
        Uuid::parse_str(s).expect("uuid")
    }

    #[test]
    fn an_input_is_kept_as_received_with_its_tracing_id() {
        let body = json!({"tracing_id": "t-1", "step_index": 0}).to_string();
        let r = read_input(id(W1), W1, Some("m"), body.as_bytes(), now());
        assert_eq!(r.tracing_id.as_deref(), Some("t-1"));
        assert_eq!(r.body, body.as_bytes());
        assert_eq!(r.routing_key, W1);
        assert_eq!(r.message_id.as_deref(), Some("m"));
        let odd = read_input(id(W1), W1, None, b"not json", now());
        assert_eq!((odd.tracing_id, odd.body), (None, b"not json".to_vec()));
    }

    #[test]
    fn the_next_step_is_followed_unless_it_is_errors_an_invocation_or_a_pattern() {
        let with_next = |next: &str| {
            json!({"step_index": 0, "pipeline_steps": [W1, next]})
                .to_string()
                .into_bytes()
        };
        let table = [
            (with_next("storage"), Some("storage")),
            (with_next(W2), Some(W2)),
            (with_next("errors"), None),
            (with_next("workerctl.invoke.abc"), None),
            (with_next("a.#"), None),
            (
                json!({"step_index": 1, "pipeline_steps": [W1, W2]})
                    .to_string()
                    .into_bytes(),
                None,
            ),
            (b"nope".to_vec(), None),
        ];
        for (body, want) in table {
            assert_eq!(
                next_key(&body).as_deref(),
                want,
                "{}",
                String::from_utf8_lossy(&body)
            );
        }
    }

    #[test]
    fn a_batch_keeps_only_the_newest_of_each_worker_in_order() {
        let r = |w: &str, t: &str| {
            read_input(
                id(w),
                w,
                None,
                format!("{{\"tracing_id\": \"{t}\"}}").as_bytes(),
                now(),
            )
        };
        let batch = vec![r(W1, "a"), r(W2, "b"), r(W1, "c"), r(W1, "d"), r(W2, "e")];
        let kept: Vec<String> = newest_per_worker(batch, 2)
            .into_iter()
            .filter_map(|x| x.tracing_id)
            .collect();
        assert_eq!(kept, ["b", "c", "d", "e"]);
    }

    #[test]
    fn a_forwarded_output_belongs_to_the_step_before_it() {
        let body = json!({"tracing_id": "t", "step_index": 1, "pipeline_steps": [W1, "storage"]});
        let out = read_output("storage", body.to_string().as_bytes(), now()).expect("read");
        assert_eq!((out.worker_id, out.tracing_id.as_str()), (id(W1), "t"));
        assert_eq!(out.routing_key, "storage");
    }

    #[test]
    fn an_error_body_belongs_to_the_worker_it_names_or_the_step_it_was_at() {
        let received = json!({"tracing_id": "t", "step_index": 0, "pipeline_steps": [W2, "x"]});
        let named = json!({"received_by_worker": received, "worker": W1, "error": "E"});
        let out = read_output("errors", named.to_string().as_bytes(), now()).expect("read");
        assert_eq!((out.worker_id, out.tracing_id.as_str()), (id(W1), "t"));
        let no_topic = json!({"received_by_worker": received, "worker": "No Topic"});
        let out = read_output("errors", no_topic.to_string().as_bytes(), now()).expect("read");
        assert_eq!(out.worker_id, id(W2));
    }

    #[test]
    fn an_output_that_names_no_worker_or_trace_is_not_matched() {
        assert!(read_output("storage", b"{}", now()).is_none());
        assert!(read_output("errors", b"{\"received_by_worker\": null}", now()).is_none());
        let unparsed = json!({"tracing_id": "t", "step_index": 1, "pipeline_steps": ["a", "b"]});
        assert!(read_output("b", unparsed.to_string().as_bytes(), now()).is_none());
    }
}
