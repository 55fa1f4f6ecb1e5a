//! The traffic recorder: keeps the last `record.keep` messages each enabled
//! worker received, as received, and what each produced — the inputs
//! `workerctl worker try` replays through new code.
//!
//! **How it taps.** Each enabled worker has a *tap*: a classic,
//! non-durable queue `workerctl.record.<id>` with `x-max-length =
//! record.keep` and `x-overflow = drop-head`, so it holds the newest
//! `record.keep` of what reaches it. What reaches it depends on the
//! workers' image (`docker.image`, its [`labels::RECORDS`] label, asked
//! through [`RecordsItself`]):
//!
//! - **An image that records itself** (the dockerworker,
//!   dockerworker/recording.py): given `WORKER_RECORD_KEEP`, the worker
//!   keeps its last settled inputs with their outputs in memory and sends
//!   the new ones, at most once a second, as one *batch* (header
//!   [`BATCH_HEADER`]) into its tap through the default exchange. The tap
//!   is bound to nothing, so the broker copies none of the pipeline's
//!   messages, and there is no outputs queue. The daemon takes the batches
//!   into the table as they come ([`take_batches`]: a few rows a second
//!   per busy worker, not one per message): left alone, a tap would hold
//!   `record.keep` batches of up to `record.keep` records each.
//! - **Any other image**: the tap is bound to the pipeline exchange with
//!   the worker's id, beside the worker's own queue (`worker_<id>`), so the
//!   broker hands it a copy of every message. The worker's queue, its
//!   consumers and the publisher's path are untouched: the tap is another
//!   queue the exchange routes to (classic and transient, so the copy costs
//!   no disk write and no raft round). A worker is tapped only once its own
//!   queue exists, or the tap would make messages routable that no worker
//!   queue takes (`worker invoke` and the scaler read "unroutable" as
//!   "never started"). Outputs: one more bounded queue,
//!   `workerctl.record.outputs.<instance>`, bound to `errors`, to
//!   `workerctl.invoke.*` and to each next step a recorded message names
//!   (at most [`MAX_OUTPUT_KEYS`] keys).
//!
//! What each costs is measured in docs/benchmarks.md ("Recorded traffic").
//!
//! **Nobody consumes the copy taps.** A copy tap *is* the bounded buffer of
//! the last `record.keep` messages, so it is read only when someone asks ([`read`]:
//! `worker messages`, `worker try --last`, HTTP try, the status page at
//! most every [`STATUS_READ_EVERY`]): a consumer with a prefetch of the
//! tap's length takes every message without acknowledging any, then closes
//! its channel, and the broker puts them all back, in order, where they
//! were. What was read (a batch's records, or the copies) is written to
//! `workerctl_recorded_messages` (the records not in the table yet, found
//! by where the tap's head overlaps the table's tail), and each output in
//! the outputs queue is attached to the newest recording of its worker with
//! its tracing id. Between reads the daemon's only work is keeping the
//! taps declared. A message's arrival time is when it was published if it
//! says (the `timestamp` header a worker runtime adds, or the AMQP
//! `timestamp` property), else when the worker took it (a batch) or when it
//! was first read (a copy). Every tap
//! expires an hour after it was last declared or read (the daemon declares
//! it again every [`TAP_RENEW`]), so a daemon that is gone leaves none.
//!
//! The reading of deliveries ([`read_input`], [`read_batch`],
//! [`read_output`], [`next_key`], [`seen_before`]) is pure and tested here.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicQosOptions, BasicRejectOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection};
use serde_json::Value;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::backoff::error_chain;
use crate::config::{AmqpConfig, RecordConfig};
#[cfg(doc)]
use crate::model::labels;
use crate::store::StoreError;
use crate::store::recorded::{self, NewOutput, NewRecording, Produced};
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
/// How often the daemon declares its taps again (before they expire).
pub(crate) const TAP_RENEW: Duration = Duration::from_secs(600);
/// How long a read waits for a tap's next message before it takes what it has.
const READ_IDLE: Duration = Duration::from_secs(2);
/// The status page reads the taps at most this often (while it is open).
pub(crate) const STATUS_READ_EVERY: Duration = Duration::from_secs(10);

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
        output: None,
        record_key: None,
    }
}

/// The header that marks a batch of records a worker runtime sent into its
/// tap itself (dockerworker/recording.py), as opposed to a copy of a
/// pipeline message.
pub(crate) const BATCH_HEADER: &str = "x-workerctl-records";

/// A batch of records, as a worker runtime that records itself sends it.
#[derive(serde::Deserialize)]
struct Batch {
    records: Vec<BatchRecord>,
}

#[derive(serde::Deserialize)]
struct BatchRecord {
    key: Option<String>,
    received_ms: i64,
    routing_key: String,
    message_id: Option<String>,
    body: String,
    output: Option<BatchOutput>,
}

#[derive(serde::Deserialize)]
struct BatchOutput {
    routing_key: String,
    body: String,
    at_ms: i64,
}

/// The inputs in a batch of records, oldest first, each with what it
/// produced. `None` if it is not a batch this reader understands (it is
/// then skipped: a recording is best-effort). A time in the future is
/// taken as `now`.
pub(crate) fn read_batch(
    worker: Uuid,
    body: &[u8],
    now: DateTime<Utc>,
) -> Option<Vec<NewRecording>> {
    use base64::Engine as _;
    let decode = |b: &str| base64::engine::general_purpose::STANDARD.decode(b).ok();
    let batch: Batch = serde_json::from_slice(body).ok()?;
    batch
        .records
        .into_iter()
        .map(|r| {
            let input = decode(&r.body)?;
            let output = match r.output {
                Some(o) => Some(Produced {
                    body: decode(&o.body)?,
                    routing_key: o.routing_key,
                    at: published_or_now(Some(o.at_ms), now),
                }),
                None => None,
            };
            Some(NewRecording {
                output,
                record_key: r.key,
                ..read_input(
                    worker,
                    &r.routing_key,
                    r.message_id.as_deref(),
                    &input,
                    published_or_now(Some(r.received_ms), now),
                )
            })
        })
        .collect()
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

/// Whether the workers' image records its own traffic (`Some(true)`), does
/// not (`Some(false)`), or cannot be told yet (`None`: the image is not
/// there, the engine did not answer): asked when the recorder starts, again
/// while it cannot be told, and at every [`TAP_RENEW`].
pub(crate) type RecordsItself =
    std::sync::Arc<dyn Fn() -> futures::future::BoxFuture<'static, Option<bool>> + Send + Sync>;

/// Keeps the taps until `shutdown` is cancelled; a lost broker or database
/// is logged and retried with capped backoff. Never returns early.
pub(crate) async fn run(
    amqp: AmqpConfig,
    pool: PgPool,
    config: RecordConfig,
    instance: String,
    records_itself: RecordsItself,
    shutdown: CancellationToken,
) {
    keep_session("traffic recorder", &shutdown, || {
        session(&amqp, &pool, &config, &instance, &records_itself)
    })
    .await;
}

async fn session(
    amqp: &AmqpConfig,
    pool: &PgPool,
    config: &RecordConfig,
    instance: &str,
    records_itself: &RecordsItself,
) -> RecordError {
    let connection = match amqp::connect(amqp, "workerctl recorder").await {
        Ok(c) => c,
        Err(e) => return e.into(),
    };
    let known = records_itself().await;
    let opened = Taps::open(
        &connection,
        pool,
        &amqp.exchange,
        config.keep,
        instance,
        known,
    )
    .await;
    let ended = match opened {
        Ok(mut taps) => keep_taps(&mut taps, pool, config, records_itself).await,
        Err(e) => e,
    };
    let _ = connection.close(200, "done".into()).await;
    ended
}

/// The daemon's side: a channel for declarations (a refused declaration
/// closes its channel; it is opened again when next needed).
struct Taps<'c> {
    connection: &'c Connection,
    exchange: String,
    keep: i64,
    outputs: String,
    setup: Option<Channel>,
    /// Whether the workers' image records itself, as last told (`None`:
    /// not yet). Unless it does, the taps are bound beside each worker's
    /// queue and get a copy of every message, and the outputs queue a copy
    /// of each next step's; if it does, the taps only take the batches the
    /// workers send, and there is no outputs queue.
    records_itself: Option<bool>,
    /// The tapped workers, and whether their next step was looked for.
    tapped: HashMap<Uuid, bool>,
    bound: HashSet<String>,
    /// While the workers record themselves: the task taking each one's
    /// batches into the table as they come ([`take_batches`]).
    takers: HashMap<Uuid, tokio::task::JoinHandle<()>>,
    pool: PgPool,
}

impl Drop for Taps<'_> {
    fn drop(&mut self) {
        for taker in self.takers.values() {
            taker.abort();
        }
    }
}

impl<'c> Taps<'c> {
    async fn open(
        connection: &'c Connection,
        pool: &PgPool,
        exchange: &str,
        keep: i64,
        instance: &str,
        records_itself: Option<bool>,
    ) -> Result<Self, RecordError> {
        let mut taps = Taps {
            connection,
            exchange: exchange.to_string(),
            keep,
            outputs: outputs_queue(instance),
            setup: None,
            records_itself,
            tapped: HashMap::new(),
            bound: HashSet::new(),
            takers: HashMap::new(),
            pool: pool.clone(),
        };
        let channel = taps.setup().await?;
        amqp::declare_exchange(&channel, exchange).await?;
        taps.keep_outputs().await?;
        Ok(taps)
    }

    /// Whether copies are taken: unless the workers record themselves.
    fn copies(&self) -> bool {
        self.records_itself != Some(true)
    }

    /// The outputs queue while copies are taken; none (deleted, with the
    /// bindings an earlier daemon made) while the workers record themselves.
    async fn keep_outputs(&mut self) -> Result<(), RecordError> {
        if self.copies() {
            return self.declare_outputs().await;
        }
        self.bound.clear();
        self.setup()
            .await?
            .queue_delete(self.outputs.as_str().into(), QueueDeleteOptions::default())
            .await
            .map_err(refused("delete the recording outputs queue"))?;
        Ok(())
    }

    /// What the image check said: on a change, every tap is bound or
    /// unbound, and the outputs queue made or deleted, to match.
    async fn told(&mut self, records_itself: Option<bool>) -> Result<(), RecordError> {
        let was = self.copies();
        self.records_itself = records_itself.or(self.records_itself);
        if self.copies() == was {
            return Ok(());
        }
        info!(
            copies = self.copies(),
            "the workers' image {} its own traffic",
            if self.copies() {
                "does not record"
            } else {
                "records"
            }
        );
        self.keep_outputs().await?;
        let workers: Vec<Uuid> = self.tapped.keys().copied().collect();
        for worker in workers {
            self.tap(worker).await?;
        }
        self.keep_takers().await
    }

    async fn declare_outputs(&mut self) -> Result<(), RecordError> {
        let outputs = self.outputs.clone();
        self.declare(&outputs, OUTPUTS_MAX_LENGTH).await?;
        for key in [ERRORS_KEY, INVOKE_PATTERN] {
            self.bind(&outputs, key).await?;
        }
        for key in self.bound.clone() {
            self.bind(&outputs, &key).await?;
        }
        Ok(())
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
        let args = tap_arguments(max_length);
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

    /// Declares a worker's tap, bound beside its queue while copies are
    /// taken, unbound (if an earlier daemon bound it) while not.
    async fn tap(&mut self, worker: Uuid) -> Result<(), RecordError> {
        let queue = tap_queue(worker);
        self.declare(&queue, self.keep).await?;
        if self.copies() {
            return self.bind(&queue, &worker.to_string()).await;
        }
        self.setup()
            .await?
            .queue_unbind(
                queue.as_str().into(),
                self.exchange.as_str().into(),
                worker.to_string().as_str().into(),
                FieldTable::default(),
            )
            .await
            .map_err(refused("unbind a recording tap"))?;
        Ok(())
    }

    /// Taps the enabled workers not tapped yet (whose queue exists), looks
    /// for each one's next step once (so that its outputs are tapped
    /// before anyone first asks), and stops recording the others.
    async fn refresh(&mut self, enabled: &[Uuid]) -> Result<(), RecordError> {
        for &worker in enabled {
            if self.tapped.contains_key(&worker) || !self.worker_queue_exists(worker).await? {
                continue;
            }
            self.tap(worker).await?;
            debug!(%worker, "tapping the worker's messages");
            self.tapped.insert(worker, false);
        }
        let wanted: HashSet<&Uuid> = enabled.iter().collect();
        let gone: Vec<Uuid> = self
            .tapped
            .keys()
            .filter(|w| !wanted.contains(w))
            .copied()
            .collect();
        for worker in gone {
            self.tapped.remove(&worker);
            if let Some(taker) = self.takers.remove(&worker) {
                taker.abort();
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
        let unlooked: Vec<Uuid> = self
            .tapped
            .iter()
            .filter(|(_, looked)| !**looked && self.copies())
            .map(|(w, _)| *w)
            .collect();
        for worker in unlooked {
            if let Some(key) = self.peek_next_key(worker).await? {
                self.follow(key).await?;
                self.tapped.insert(worker, true);
            }
        }
        self.keep_takers().await
    }

    /// While the workers record themselves, a task per tapped worker takes
    /// its batches into the table as they come (one that ended, on an
    /// error it logged, is started again); while copies are taken, none.
    async fn keep_takers(&mut self) -> Result<(), RecordError> {
        if self.copies() {
            for (_, taker) in self.takers.drain() {
                taker.abort();
            }
            return Ok(());
        }
        let idle: Vec<Uuid> = self
            .tapped
            .keys()
            .filter(|w| self.takers.get(w).is_none_or(|t| t.is_finished()))
            .copied()
            .collect();
        for worker in idle {
            let channel = self
                .connection
                .create_channel()
                .await
                .map_err(refused("open a channel"))?;
            let taker = tokio::spawn(take_batches(channel, worker, self.pool.clone(), self.keep));
            self.takers.insert(worker, taker);
        }
        Ok(())
    }

    /// The next step the oldest message in a worker's tap names: one
    /// message taken and put back (rejected with requeue: it keeps its
    /// place). `None` while the tap is empty.
    async fn peek_next_key(&mut self, worker: Uuid) -> Result<Option<String>, RecordError> {
        let channel = self.setup().await?;
        let got = channel
            .basic_get(
                tap_queue(worker).as_str().into(),
                BasicGetOptions { no_ack: false },
            )
            .await
            .map_err(refused("look at a recording tap"))?;
        let Some(message) = got else {
            return Ok(None);
        };
        let key = next_key(&message.delivery.data);
        channel
            .basic_reject(
                message.delivery.delivery_tag,
                BasicRejectOptions { requeue: true },
            )
            .await
            .map_err(refused("put a message back into its recording tap"))?;
        // A message naming no next step to follow still counts as looked at
        // (an empty key, which `follow` skips).
        Ok(Some(key.unwrap_or_default()))
    }

    /// Binds the outputs queue to a next step seen in a recorded message.
    async fn follow(&mut self, key: String) -> Result<(), RecordError> {
        if key.is_empty() || self.bound.contains(&key) || self.bound.len() >= MAX_OUTPUT_KEYS {
            return Ok(());
        }
        let outputs = self.outputs.clone();
        self.bind(&outputs, &key).await?;
        self.bound.insert(key);
        Ok(())
    }

    /// Declares every tap again: a declaration restarts its expiry, and
    /// makes again (with its bindings) one the broker lost.
    async fn renew(&mut self) -> Result<(), RecordError> {
        self.keep_outputs().await?;
        let workers: Vec<Uuid> = self.tapped.keys().copied().collect();
        for worker in workers {
            self.tap(worker).await?;
            // Look at its next step again: the pipeline may have changed.
            self.tapped.insert(worker, false);
        }
        Ok(())
    }
}

/// The arguments of a tap: classic, bounded, oldest dropped first, gone an
/// hour after its last use.
fn tap_arguments(max_length: i64) -> FieldTable {
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
    args
}

async fn keep_taps(
    taps: &mut Taps<'_>,
    pool: &PgPool,
    config: &RecordConfig,
    records_itself: &RecordsItself,
) -> RecordError {
    match keep_taps_until_error(taps, pool, config, records_itself).await {
        Ok(()) => RecordError::Closed,
        Err(e) => e,
    }
}

async fn keep_taps_until_error(
    taps: &mut Taps<'_>,
    pool: &PgPool,
    config: &RecordConfig,
    records_itself: &RecordsItself,
) -> Result<(), RecordError> {
    info!(
        keep = config.keep,
        copies = taps.copies(),
        "recording each enabled worker's messages"
    );
    let mut refresh = tokio::time::interval(REFRESH);
    let mut renew = tokio::time::interval(TAP_RENEW);
    renew.tick().await;
    loop {
        tokio::select! {
            _ = refresh.tick() => {
                if !taps.connection.status().connected() {
                    return Ok(());
                }
                if taps.records_itself.is_none() {
                    taps.told(records_itself().await).await?;
                }
                let enabled = recorded::enabled_workers(pool).await?;
                taps.refresh(&enabled).await?;
            }
            _ = renew.tick() => {
                taps.told(records_itself().await).await?;
                taps.renew().await?;
            }
        }
    }
}

/// What reading the taps needs: the broker, the bound, whose outputs queue.
/// `None` from [`Reader::from_config`] when recording is off.
#[derive(Clone, Debug)]
pub(crate) struct Reader {
    pub amqp: AmqpConfig,
    pub keep: i64,
    pub instance: String,
}

impl Reader {
    pub(crate) fn from_config(config: &crate::config::Config) -> Option<Reader> {
        config.record.enabled.then(|| Reader {
            amqp: config.amqp.clone(),
            keep: config.record.keep,
            instance: config.instance.clone(),
        })
    }

    /// [`read`] with these settings.
    pub(crate) async fn read(&self, pool: &PgPool, workers: &[Uuid]) -> Result<(), RecordError> {
        read(&self.amqp, pool, self.keep, &self.instance, workers).await
    }
}

/// The status page's reads of the taps: in the background (the page is
/// served from the table as it is), one at a time, at most every
/// [`STATUS_READ_EVERY`]: a page left open costs one read of each tap per
/// interval, a page nobody looks at none.
pub(crate) fn status_reads(reader: Reader, pool: PgPool) -> impl Fn() + Send + Sync + 'static {
    let last: std::sync::Mutex<Option<std::time::Instant>> = std::sync::Mutex::new(None);
    move || {
        {
            let Ok(mut last) = last.lock() else { return };
            if last.is_some_and(|t| t.elapsed() < STATUS_READ_EVERY) {
                return;
            }
            *last = Some(std::time::Instant::now());
        }
        let (reader, pool) = (reader.clone(), pool.clone());
        tokio::spawn(async move {
            let read = async {
                let workers = recorded::enabled_workers(&pool).await?;
                reader.read(&pool, &workers).await
            };
            if let Err(e) = read.await {
                debug!(
                    "status page: cannot read the recording taps: {}",
                    error_chain(&e)
                );
            }
        });
    }
}

/// Reads the taps of `workers` into the table, and the outputs queue of
/// `instance` onto what was read: what `worker messages`, `worker try
/// --last` and the status page do before they read the table. A worker
/// with no tap (not enabled, or recording off) is skipped.
pub(crate) async fn read(
    amqp: &AmqpConfig,
    pool: &PgPool,
    keep: i64,
    instance: &str,
    workers: &[Uuid],
) -> Result<(), RecordError> {
    let connection = amqp::connect(amqp, "workerctl recorder (read)").await?;
    let read = read_on(&connection, &amqp.exchange, pool, keep, instance, workers).await;
    let _ = connection.close(200, "done".into()).await;
    read
}

async fn read_on(
    connection: &Connection,
    exchange: &str,
    pool: &PgPool,
    keep: i64,
    instance: &str,
    workers: &[Uuid],
) -> Result<(), RecordError> {
    let most = usize::try_from(keep).unwrap_or(0);
    let mut keys = HashSet::new();
    for &worker in workers {
        // One connection for the lock and the writes: a CLI's pool may
        // have no other.
        let mut lock = recorded::lock_tap(pool, worker).await?;
        let Some(deliveries) = read_queue(connection, &tap_queue(worker), most, true).await? else {
            continue;
        };
        let mut tap = recordings_of(worker, &deliveries, Utc::now(), &mut keys);
        // Batches can hold more than `keep` records between them.
        let tap = tap.split_off(tap.len().saturating_sub(most));
        store_new(&mut lock, worker, &tap, keep).await?;
        lock.commit().await.map_err(|source| StoreError::Query {
            what: "end reading a recording tap",
            source,
        })?;
    }
    let outputs = outputs_queue(instance);
    bind_outputs(connection, exchange, &outputs, keys).await?;
    let Some(deliveries) =
        read_queue(connection, &outputs, OUTPUTS_MAX_LENGTH as usize, false).await?
    else {
        return Ok(());
    };
    let now = Utc::now();
    let read: Vec<NewOutput> = deliveries
        .iter()
        .filter_map(|d| read_output(d.routing_key.as_str(), &d.data, arrival(d, now)))
        .collect();
    recorded::match_outputs(pool, &read).await?;
    Ok(())
}

/// What a tap's messages hold, oldest first: its copies if it holds any,
/// else its batches' records; the next steps the copies name are added to
/// `keys`. Copies win: a tap that holds both is bound beside the worker's
/// queue (the daemon could not tell that the image records itself, or it
/// just changed), so its copies are every message, and a batch would
/// record some twice.
fn recordings_of(
    worker: Uuid,
    deliveries: &[Delivery],
    now: DateTime<Utc>,
    keys: &mut HashSet<String>,
) -> Vec<NewRecording> {
    let read: Vec<TapMessage> = deliveries
        .iter()
        .map(|d| TapMessage {
            batch: is_batch(d),
            routing_key: d.routing_key.as_str(),
            message_id: d.properties.message_id().as_ref().map(|s| s.as_str()),
            body: &d.data,
            arrival: arrival(d, now),
        })
        .collect();
    recordings_in(worker, &read, now, keys)
}

/// A message of a tap, as [`recordings_in`] reads it.
struct TapMessage<'a> {
    batch: bool,
    routing_key: &'a str,
    message_id: Option<&'a str>,
    body: &'a [u8],
    arrival: DateTime<Utc>,
}

/// [`recordings_of`], on what it reads of each delivery.
fn recordings_in(
    worker: Uuid,
    tap: &[TapMessage],
    now: DateTime<Utc>,
    keys: &mut HashSet<String>,
) -> Vec<NewRecording> {
    let (batches, copies): (Vec<&TapMessage>, Vec<&TapMessage>) = tap.iter().partition(|m| m.batch);
    if !copies.is_empty() {
        return copies
            .into_iter()
            .map(|m| {
                let copy = read_input(worker, m.routing_key, m.message_id, m.body, m.arrival);
                keys.extend(next_key(&copy.body));
                copy
            })
            .collect();
    }
    let mut records = Vec::new();
    for m in batches {
        match read_batch(worker, m.body, now) {
            Some(read) => records.extend(read),
            None => warn!(%worker, "skipped a batch of records that does not parse"),
        }
    }
    records
}

/// Stores what of `tap` (oldest first) the table does not hold yet, in the
/// transaction that holds the tap's lock: records a worker made are stored
/// by their key (once however often they are read), copies after where the
/// tap's head overlaps the table's tail ([`seen_before`]).
async fn store_new(
    lock: &mut sqlx::PgConnection,
    worker: Uuid,
    tap: &[NewRecording],
    keep: i64,
) -> Result<(), RecordError> {
    if tap.iter().all(|r| r.record_key.is_some()) {
        let stored = recorded::keys_on(lock, worker).await?;
        recorded::insert_on(lock, &newer_than_stored(tap, &stored), keep).await?;
        return Ok(());
    }
    let mut stored = recorded::list_on(lock, worker, keep).await?;
    stored.reverse();
    let stored: Vec<&[u8]> = stored.iter().map(|r| r.body.as_slice()).collect();
    let bodies: Vec<&[u8]> = tap.iter().map(|r| r.body.as_slice()).collect();
    let seen = seen_before(&stored, &bodies);
    recorded::insert_on(lock, &tap[seen..], keep).await?;
    Ok(())
}

/// The keyed records of `tap` that come after every stored record of the
/// same runtime process (a key is `<process>-<number>`, numbered in the
/// order the process settled them): a batch stored before, or older than
/// what is stored (read while no daemon took the batches, then taken), is
/// not stored again as if it were the newest. A key that does not parse is
/// kept (the unique key still stores it once).
pub(crate) fn newer_than_stored(tap: &[NewRecording], stored: &[String]) -> Vec<NewRecording> {
    fn split(key: &str) -> Option<(&str, u64)> {
        let (process, number) = key.rsplit_once('-')?;
        Some((process, number.parse().ok()?))
    }
    let mut newest: HashMap<&str, u64> = HashMap::new();
    for (process, number) in stored.iter().filter_map(|k| split(k)) {
        let n = newest.entry(process).or_insert(number);
        *n = (*n).max(number);
    }
    tap.iter()
        .filter(|r| {
            let parsed = r.record_key.as_deref().and_then(split);
            parsed.is_none_or(|(process, number)| newest.get(process).is_none_or(|n| number > *n))
        })
        .cloned()
        .collect()
}

/// Whether storing failed because the database refused what was stored
/// (storing it again would fail again), not because it could not be reached.
fn refused_by_database(e: &RecordError) -> bool {
    matches!(
        e,
        RecordError::Store(StoreError::Query {
            source: sqlx::Error::Database(_),
            ..
        })
    )
}

/// Takes a worker's batches into the table as they come, each under the
/// tap's lock and acknowledged once stored, one at a time, until the
/// channel closes or an error (logged; the batch goes back to the tap for
/// the next taker, started within a refresh). A batch the database refuses
/// is dropped, so that it cannot stop the worker's recording; a copy left
/// in the tap from before the workers recorded themselves is dropped too
/// (the worker's own batches record that message). While a taker runs, a
/// read leaves the tap to it ([`read_queue`]). At most one batch a second comes from each of the worker's
/// containers, so this costs the daemon a few rows a second, not a row per
/// message; and it keeps the tap short: left alone, it would hold
/// `record.keep` batches of up to `record.keep` records each.
async fn take_batches(channel: Channel, worker: Uuid, pool: PgPool, keep: i64) {
    let taken = async {
        channel
            .basic_qos(1, BasicQosOptions::default())
            .await
            .map_err(refused("set the prefetch of a recording tap"))?;
        let mut batches = channel
            .basic_consume(
                tap_queue(worker).as_str().into(),
                "workerctl-recorder".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(refused("take a worker's batches of records"))?;
        while let Some(batch) = batches.next().await {
            let batch = batch.map_err(refused("take a worker's batches of records"))?;
            if !is_batch(&batch) {
                batch
                    .ack(BasicAckOptions::default())
                    .await
                    .map_err(refused("acknowledge a batch of records"))?;
                continue;
            }
            let records = recordings_of(
                worker,
                std::slice::from_ref(&batch),
                Utc::now(),
                &mut HashSet::new(),
            );
            let stored = async {
                let mut lock = recorded::lock_tap(&pool, worker).await?;
                store_new(&mut lock, worker, &records, keep).await?;
                lock.commit().await.map_err(|source| StoreError::Query {
                    what: "store a batch of records",
                    source,
                })?;
                Ok::<(), RecordError>(())
            };
            if let Err(e) = stored.await {
                if !refused_by_database(&e) {
                    return Err(e);
                }
                warn!(%worker, "dropped a batch of records the database refused: {}", error_chain(&e));
            }
            batch
                .ack(BasicAckOptions::default())
                .await
                .map_err(refused("acknowledge a batch of records"))?;
        }
        Ok::<(), RecordError>(())
    };
    if let Err(e) = taken.await {
        warn!(%worker, "stopped taking the worker's batches (again within a refresh): {}", error_chain(&e));
    }
    // Whatever it held unacknowledged goes back to the tap.
    let _ = channel.close(200, "done".into()).await;
}

/// Binds the outputs queue (if it exists: the daemon makes it) to next steps
/// a read found, at most [`MAX_OUTPUT_KEYS`] at once.
async fn bind_outputs(
    connection: &Connection,
    exchange: &str,
    outputs: &str,
    keys: HashSet<String>,
) -> Result<(), RecordError> {
    if keys.is_empty() {
        return Ok(());
    }
    let channel = connection
        .create_channel()
        .await
        .map_err(refused("open a channel"))?;
    for key in keys.into_iter().take(MAX_OUTPUT_KEYS) {
        let bound = channel
            .queue_bind(
                outputs.into(),
                exchange.into(),
                key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await;
        if bound.is_err() {
            // No outputs queue (recording is off in the daemon): nothing to bind.
            return Ok(());
        }
    }
    let _ = channel.close(200, "done".into()).await;
    Ok(())
}

/// Every message in `queue` (at most `most`, and at most 65,535: the
/// largest prefetch; a larger `record.keep` is read in its oldest 65,535),
/// oldest first, left in place:
/// taken by a consumer with a prefetch of the queue's length that
/// acknowledges none, whose channel is then closed, so that the broker puts
/// them back where they were. `None` if the queue does not exist; nothing
/// if `unless_taken` and someone consumes it (a daemon's taker).
async fn read_queue(
    connection: &Connection,
    queue: &str,
    most: usize,
    unless_taken: bool,
) -> Result<Option<Vec<Delivery>>, RecordError> {
    let channel = connection
        .create_channel()
        .await
        .map_err(refused("open a channel"))?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let Ok(declared) = channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
    else {
        return Ok(None);
    };
    if unless_taken && declared.consumer_count() > 0 {
        // A daemon takes this tap's batches as they come (`take_batches`):
        // the table is current, and reading beside it would store out of
        // order.
        let _ = channel.close(200, "taken by a daemon".into()).await;
        return Ok(Some(Vec::new()));
    }
    let count = usize::try_from(declared.message_count())
        .unwrap_or(usize::MAX)
        .min(most)
        .min(usize::from(u16::MAX));
    let mut read = Vec::with_capacity(count);
    if count > 0 {
        let prefetch = u16::try_from(count).unwrap_or(u16::MAX);
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(refused("set the prefetch of a tap read"))?;
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(refused("read a recording tap"))?;
        while read.len() < count {
            match tokio::time::timeout(READ_IDLE, consumer.next()).await {
                Ok(Some(Ok(delivery))) => read.push(delivery),
                Ok(Some(Err(e))) => return Err(refused("read a recording tap")(e).into()),
                Ok(None) | Err(_) => break,
            }
        }
    }
    // Closing the channel puts back every message it holds unacknowledged.
    channel
        .close(200, "read, left in place".into())
        .await
        .map_err(refused("put a tap's messages back"))?;
    Ok(Some(read))
}

/// Whether a tap's message is a batch of records its worker sent (the
/// [`BATCH_HEADER`]) rather than a copy.
fn is_batch(delivery: &Delivery) -> bool {
    delivery
        .properties
        .headers()
        .as_ref()
        .is_some_and(|h| h.inner().contains_key(BATCH_HEADER))
}

/// When a message arrived, as far as a read can tell: when it was
/// published, if it says — the `timestamp` header (Unix ms) every message a
/// worker runtime publishes carries (docs/compatibility.md §4), else the
/// AMQP `timestamp` property (Unix s) — unless that is in the future; else
/// now (it arrived at or before the read).
fn arrival(delivery: &Delivery, now: DateTime<Utc>) -> DateTime<Utc> {
    let header = delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("timestamp"))
        .and_then(header_millis);
    let property = delivery
        .properties
        .timestamp()
        .and_then(|s| i64::try_from(s).ok())
        .and_then(|s| s.checked_mul(1000));
    published_or_now(header.or(property), now)
}

/// An integer header's value.
fn header_millis(value: &AMQPValue) -> Option<i64> {
    match value {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::Timestamp(s) => i64::try_from(*s).ok()?.checked_mul(1000),
        _ => None,
    }
}

/// The publish time (Unix ms) if there is one that is not in the future,
/// else `now`.
pub(crate) fn published_or_now(published_ms: Option<i64>, now: DateTime<Utc>) -> DateTime<Utc> {
    published_ms
        .and_then(DateTime::<Utc>::from_timestamp_millis)
        .filter(|t| *t <= now)
        .unwrap_or(now)
}

/// How many of the tap's messages (oldest first) are the table's newest
/// rows already (oldest first): the longest head of `tap` that is the tail
/// of `stored`. A tap read twice holds, at its head, what the first read
/// stored, minus what it dropped since.
pub(crate) fn seen_before(stored: &[&[u8]], tap: &[&[u8]]) -> usize {
    (1..=stored.len().min(tap.len()))
        .rev()
        .find(|&k| stored[stored.len() - k..] == tap[..k])
        .unwrap_or(0)
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

    fn b64(bytes: &[u8]) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    #[test]
    fn a_batch_is_read_into_its_inputs_each_with_what_it_produced() {
        let input = json!({"tracing_id": "t-1", "step_index": 0}).to_string();
        let batch = json!({"worker": W1, "records": [
                        {"key": "p-1", "received_ms": 1_000, "routing_key": W1, "message_id": "m-1",
             "body": b64(input.as_bytes()),
             "output": {"routing_key": "next", "body": b64(b"out"), "at_ms": 2_000}},
            {"received_ms": 9_000_000, "routing_key": W1, "message_id": null,
             "body": b64(b"not json"), "output": null},
        ]});
        let read = read_batch(id(W1), batch.to_string().as_bytes(), now()).expect("a batch");
        assert_eq!(read.len(), 2);
        assert_eq!(
            (read[0].tracing_id.as_deref(), read[0].message_id.as_deref()),
            (Some("t-1"), Some("m-1"))
        );
        assert_eq!(
            (
                read[0].body.as_slice(),
                read[0].received_at.timestamp_millis()
            ),
            (input.as_bytes(), 1_000)
        );
        assert_eq!(
            (read[0].record_key.as_deref(), read[1].record_key.as_deref()),
            (Some("p-1"), None)
        );
        let out = read[0].output.as_ref().expect("its output");
        assert_eq!(
            (
                out.routing_key.as_str(),
                out.body.as_slice(),
                out.at.timestamp_millis()
            ),
            ("next", &b"out"[..], 2_000)
        );
        assert_eq!(
            read[1].received_at,
            now(),
            "a time in the future is taken as now"
        );
        assert_eq!(
            (read[1].tracing_id.as_ref(), read[1].output.as_ref()),
            (None, None)
        );
    }

    #[test]
    fn a_tap_holding_copies_is_read_for_its_copies_only_else_for_its_batches() {
        let copy_body =
            json!({"tracing_id": "c", "step_index": 0, "pipeline_steps": [W1, "next"]}).to_string();
        let batch_body = json!({"records": [
            {"key": "p-1", "received_ms": 1, "routing_key": W1, "message_id": null,
             "body": b64(b"b"), "output": null},
        ]})
        .to_string();
        let copy = || TapMessage {
            batch: false,
            routing_key: W1,
            message_id: None,
            body: copy_body.as_bytes(),
            arrival: now(),
        };
        let batch = || TapMessage {
            batch: true,
            routing_key: "workerctl.record.x",
            message_id: None,
            body: batch_body.as_bytes(),
            arrival: now(),
        };
        let bodies = |tap: &[TapMessage]| -> (Vec<Vec<u8>>, HashSet<String>) {
            let mut keys = HashSet::new();
            let read = recordings_in(id(W1), tap, now(), &mut keys);
            (read.into_iter().map(|r| r.body).collect(), keys)
        };
        let next = HashSet::from(["next".to_string()]);
        for (tap, want, want_keys, why) in [
            (
                vec![copy(), copy()],
                vec![copy_body.as_bytes().to_vec(); 2],
                next.clone(),
                "copies",
            ),
            (
                vec![batch(), batch()],
                vec![b"b".to_vec(); 2],
                HashSet::new(),
                "batches",
            ),
            (
                vec![batch(), copy(), batch()],
                vec![copy_body.as_bytes().to_vec()],
                next.clone(),
                "both: the copies, each message once",
            ),
            (vec![], vec![], HashSet::new(), "nothing"),
        ] {
            assert_eq!(bodies(&tap), (want, want_keys), "{why}");
        }
    }

    #[test]
    fn a_keyed_record_is_stored_only_after_every_stored_one_of_its_process() {
        let rec = |key: &str| NewRecording {
            record_key: Some(key.to_string()),
            ..read_input(id(W1), W1, None, key.as_bytes(), now())
        };
        let stored = |keys: &[&str]| keys.iter().map(|k| k.to_string()).collect::<Vec<_>>();
        let kept = |tap: &[NewRecording], keys: &[String]| -> Vec<String> {
            newer_than_stored(tap, keys)
                .into_iter()
                .filter_map(|r| r.record_key)
                .collect()
        };
        for (tap, keys, want, why) in [
            (
                vec![rec("a-1"), rec("a-2")],
                stored(&[]),
                vec!["a-1", "a-2"],
                "nothing stored",
            ),
            (
                vec![rec("a-2"), rec("a-3")],
                stored(&["a-1", "a-2"]),
                vec!["a-3"],
                "read before",
            ),
            (
                vec![rec("a-1")],
                stored(&["a-5"]),
                vec![],
                "older than what is stored (pruned since)",
            ),
            (
                vec![rec("b-1"), rec("a-6")],
                stored(&["a-5"]),
                vec!["b-1", "a-6"],
                "another process",
            ),
            (
                vec![rec("a-10")],
                stored(&["a-9"]),
                vec!["a-10"],
                "numbers, not text",
            ),
            (
                vec![rec("odd"), rec("x-y")],
                stored(&["a-1"]),
                vec!["odd", "x-y"],
                "keys that do not parse",
            ),
        ] {
            assert_eq!(kept(&tap, &keys), want, "{why}");
        }
    }

    #[test]
    fn what_is_not_a_batch_this_reader_understands_is_none() {
        let good = json!({"received_ms": 1, "routing_key": W1, "message_id": null, "body": b64(b"x"), "output": null});
        for (body, why) in [
            ("not json".to_string(), "not JSON"),
            (json!({"worker": W1}).to_string(), "no records"),
            (json!({"records": [{"received_ms": 1}]}).to_string(), "a record without its fields"),
            (json!({"records": [good, {"received_ms": 1, "routing_key": W1, "message_id": null, "body": "%%", "output": null}]}).to_string(), "a body that is not base64"),
        ] {
            assert!(read_batch(id(W1), body.as_bytes(), now()).is_none(), "{why}");
        }
        let empty = json!({"worker": W1, "records": []}).to_string();
        assert_eq!(read_batch(id(W1), empty.as_bytes(), now()), Some(vec![]));
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
    fn a_message_arrived_when_it_was_published_if_it_says_and_that_is_not_later() {
        assert_eq!(
            published_or_now(Some(4_000), now()).timestamp_millis(),
            4_000
        );
        assert_eq!(published_or_now(Some(6_000), now()), now(), "in the future");
        assert_eq!(published_or_now(None, now()), now());
        assert_eq!(header_millis(&AMQPValue::LongLongInt(7)), Some(7));
        assert_eq!(header_millis(&AMQPValue::Timestamp(2)), Some(2_000));
        assert_eq!(header_millis(&AMQPValue::LongString("x".into())), None);
    }

    #[test]
    fn a_read_stores_only_what_follows_the_tables_tail() {
        let (a, b, c, d): (&[u8], &[u8], &[u8], &[u8]) = (b"a", b"b", b"c", b"d");
        // Never read: everything is new.
        assert_eq!(seen_before(&[], &[a, b]), 0);
        // Read before, then the tap dropped `a` and got `c`, `d`.
        assert_eq!(seen_before(&[a, b], &[b, c, d]), 1);
        // Nothing new since.
        assert_eq!(seen_before(&[a, b, c], &[a, b, c]), 3);
        // The tap was made again (lost): nothing overlaps.
        assert_eq!(seen_before(&[a, b], &[c, d]), 0);
        // Two equal messages in a row: the longest overlap wins.
        assert_eq!(seen_before(&[c, a, a], &[a, a, a]), 2);
        assert_eq!(seen_before(&[a], &[a, a]), 1);
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
