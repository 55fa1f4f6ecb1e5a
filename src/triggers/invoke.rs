//! Invoking a worker: send one pipeline message (docs/compatibility.md §4) to it and
//! catch what comes out of it, on the next step or on `errors`. The one
//! implementation behind both doors: `workerctl worker invoke` and
//! `POST /api/workers/{id}/invoke`.
//!
//! The order matters: the exchange is declared and a private queue is bound
//! to the next step's key and to `errors` *before* publishing, so that the
//! answer cannot slip past. The publish is confirmed by the broker and
//! mandatory: a message no queue takes (the worker never consumed yet) is
//! published again until the timeout, and a message nobody processes expires
//! with the timeout instead of surprising the worker later.
//!
//! [`prepare`] (filling in a minimal message) and [`verdict`] (what came
//! out, read) are pure and tested here.

use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use serde_json::{Map, Value, json};
use tokio::time::Instant;
use uuid::Uuid;

use super::amqp::{
    AmqpError, Target, connect, declare_exchange, pipeline_properties, publish_once, refused,
};
use crate::config::AmqpConfig;

/// The routing key failures are published with (docs/compatibility.md §4).
pub(crate) const ERRORS_KEY: &str = "errors";
/// Prefix of the step key appended when the message has no step after the worker.
const INVOKE_KEY_PREFIX: &str = "workerctl.invoke.";
/// How soon an unroutable message (no queue bound yet) is published again.
const REPUBLISH_AFTER: Duration = Duration::from_millis(250);

/// A message ready to publish, and how to recognise its answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Prepared {
    pub body: Value,
    pub tracing_id: String,
    /// The routing key the worker publishes its result with.
    pub next_key: String,
    /// What was changed in the given message (not what was only filled in).
    pub notes: Vec<String>,
}

/// Makes `message` a pipeline message whose current step is `worker` and
/// that has a step after it: fills in missing fields (ids, times in Unix
/// ms, step_index 0), puts the worker at `step_index`, and appends a step
/// key of our own when nothing follows the worker.
pub fn prepare(
    message: Value,
    worker: Uuid,
    now_ms: i64,
    mut fresh: impl FnMut() -> Uuid,
) -> Result<Prepared, String> {
    let Value::Object(mut m) = message else {
        return Err("the message must be a JSON object, e.g. {\"payload\": \"aGVsbG8=\"}".into());
    };
    let fill = |m: &mut Map<String, Value>, key: &str, value: Value| {
        if m.get(key).is_none_or(Value::is_null) {
            m.insert(key.to_string(), value);
        }
    };
    fill(&mut m, "tracing_id", json!(fresh().to_string()));
    fill(&mut m, "pipeline_id", json!(fresh().to_string()));
    fill(&mut m, "tenant_id", json!(0));
    fill(&mut m, "access_token", json!(""));
    fill(&mut m, "received_at", json!(now_ms));
    fill(&mut m, "timestamp", json!(now_ms));
    fill(&mut m, "step_index", json!(0));
    fill(&mut m, "pipeline_steps", json!([]));
    let mut steps = steps_of(&m)?;
    let index = m
        .get("step_index")
        .and_then(Value::as_u64)
        .and_then(|i| usize::try_from(i).ok())
        .ok_or("step_index must be a non-negative integer")?;
    let mut notes = Vec::new();
    let me = worker.to_string();
    let index = if steps.get(index) == Some(&me) {
        index
    } else if let Some(found) = steps.iter().position(|s| *s == me) {
        notes.push(format!(
            "step_index {index} → {found}, where the worker is in pipeline_steps"
        ));
        found
    } else {
        let at = index.min(steps.len());
        if !steps.is_empty() {
            notes.push(format!("the worker is inserted in pipeline_steps at {at}"));
        }
        steps.insert(at, me);
        at
    };
    let next_key = match steps.get(index + 1) {
        Some(next) => next.clone(),
        None => {
            let key = format!("{INVOKE_KEY_PREFIX}{}", fresh());
            steps.push(key.clone());
            key
        }
    };
    m.insert("step_index".into(), json!(index));
    m.insert("pipeline_steps".into(), json!(steps));
    let tracing_id = text_of(&m["tracing_id"]);
    Ok(Prepared {
        body: Value::Object(m),
        tracing_id,
        next_key,
        notes,
    })
}

fn steps_of(m: &Map<String, Value>) -> Result<Vec<String>, String> {
    let bad = || "pipeline_steps must be a list of routing keys (strings)".to_string();
    m.get("pipeline_steps")
        .and_then(Value::as_array)
        .ok_or_else(bad)?
        .iter()
        .map(|s| s.as_str().map(str::to_string).ok_or_else(bad))
        .collect()
}

/// A JSON value as the text it is compared by (strings without quotes).
fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Whether a delivery is the answer to our message: the worker keeps the
/// AMQP message_id; failing that, the tracing id is in the body (or, for
/// an error body, in the message it received).
pub(crate) fn is_answer(
    message_id: Option<&str>,
    body: &[u8],
    ours: &str,
    tracing_id: &str,
) -> bool {
    if message_id == Some(ours) {
        return true;
    }
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return false;
    };
    let traced = |v: &Value| v.get("tracing_id").map(text_of).as_deref() == Some(tracing_id);
    traced(&v)
        || match v.get("received_by_worker") {
            Some(Value::String(s)) => s.contains(tracing_id),
            Some(received) => traced(received),
            None => false,
        }
}

/// How an invocation ended.
#[derive(Debug)]
pub enum Outcome {
    /// Something came out on `routing_key` within the timeout.
    Answer {
        routing_key: String,
        body: Vec<u8>,
        elapsed: Duration,
    },
    /// Nothing came. `routed` says whether any queue took the message.
    TimedOut { routed: bool },
}

/// What came out of a worker, read.
#[derive(Clone, Debug, PartialEq)]
pub enum Answer {
    /// `process` returned: the message the worker published to the next step.
    Output(Value),
    /// `process` failed: the error body from `errors`, and the last line of
    /// its traceback.
    Failed { body: Value, reason: String },
}

/// Reads an answer: anything on `errors` is a failure, anything else the
/// output. A body that is not JSON is kept as a string.
pub fn verdict(routing_key: &str, body: &[u8]) -> Answer {
    let value = serde_json::from_slice::<Value>(body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()));
    if routing_key != ERRORS_KEY {
        return Answer::Output(value);
    }
    let error = value.get("error").and_then(Value::as_str).unwrap_or("");
    let reason = error
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("see the error body")
        .trim()
        .to_string();
    Answer::Failed {
        body: value,
        reason,
    }
}

/// Told once when the worker's routing key takes no message yet (it is
/// still starting), so that a person knows why the answer takes long.
pub(crate) type OnUnroutable<'a> = &'a (dyn Fn(Uuid) + Send + Sync);

/// Publishes `prepared` to `worker` and waits up to `timeout` for its answer.
pub async fn invoke(
    amqp: &AmqpConfig,
    worker: Uuid,
    prepared: &Prepared,
    timeout: Duration,
    on_unroutable: OnUnroutable<'_>,
) -> Result<Outcome, AmqpError> {
    let start = Instant::now();
    let connection = connect(amqp, "workerctl invoke").await?;
    let outcome = exchange(
        &connection,
        &amqp.exchange,
        worker,
        prepared,
        Limits {
            timeout,
            start,
            on_unroutable,
        },
    )
    .await;
    // The private queue goes with the connection.
    let _ = connection.close(200, "done".into()).await;
    outcome
}

/// How long an invocation may take, and whom to tell when it waits.
struct Limits<'a> {
    timeout: Duration,
    start: Instant,
    on_unroutable: OnUnroutable<'a>,
}

async fn exchange(
    connection: &Connection,
    exchange: &str,
    worker: Uuid,
    prepared: &Prepared,
    limits: Limits<'_>,
) -> Result<Outcome, AmqpError> {
    let Limits {
        timeout,
        start,
        on_unroutable,
    } = limits;
    let deadline = start + timeout;
    let channel = connection
        .create_channel()
        .await
        .map_err(refused("open a channel"))?;
    let mut answers = listen(&channel, exchange, &prepared.next_key).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(refused("enable publisher confirms"))?;
    let message_id = Uuid::now_v7().to_string();
    // Serialising a serde_json::Value cannot fail.
    let body = serde_json::to_vec(&prepared.body).unwrap_or_default();
    let properties = properties(&message_id, timeout);
    let target = Target {
        exchange,
        routing_key: &worker.to_string(),
    };
    let routed = publish(&channel, target, &body, properties, deadline, &|| {
        on_unroutable(worker)
    })
    .await?;
    if !routed {
        return Ok(Outcome::TimedOut { routed: false });
    }
    loop {
        let delivery = match tokio::time::timeout_at(deadline, answers.next()).await {
            Err(_) => return Ok(Outcome::TimedOut { routed: true }),
            Ok(None) => {
                return Err(AmqpError::Said(
                    "closed the answer queue before the answer came".into(),
                ));
            }
            Ok(Some(delivery)) => delivery.map_err(refused("deliver the answer"))?,
        };
        let id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str());
        if is_answer(id, &delivery.data, &message_id, &prepared.tracing_id) {
            return Ok(Outcome::Answer {
                routing_key: delivery.routing_key.as_str().to_string(),
                body: delivery.data,
                elapsed: start.elapsed(),
            });
        }
    }
}

/// Declares the exchange (as the workers do: durable topic) and a private
/// queue bound to `next_key` and `errors`; returns its consumer.
async fn listen(
    channel: &Channel,
    exchange: &str,
    next_key: &str,
) -> Result<lapin::Consumer, AmqpError> {
    declare_exchange(channel, exchange).await?;
    let private = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..QueueDeclareOptions::default()
    };
    let queue = channel
        .queue_declare("".into(), private, FieldTable::default())
        .await
        .map_err(refused("declare the answer queue"))?;
    for key in [next_key, ERRORS_KEY] {
        channel
            .queue_bind(
                queue.name().clone(),
                exchange.into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(refused("bind the answer queue"))?;
    }
    let no_ack = BasicConsumeOptions {
        no_ack: true,
        ..BasicConsumeOptions::default()
    };
    channel
        .basic_consume(
            queue.name().clone(),
            "workerctl-invoke".into(),
            no_ack,
            FieldTable::default(),
        )
        .await
        .map_err(refused("consume the answer queue"))
}

/// As the pipeline publishes: persistent JSON with a message_id and a
/// `timestamp` header (Unix ms); expiring with the timeout, so that a
/// message no worker took in time is not processed long after.
fn properties(message_id: &str, timeout: Duration) -> BasicProperties {
    pipeline_properties(message_id, FieldTable::default())
        .with_expiration(timeout.as_millis().max(1).to_string().into())
}

/// Publishes until a queue takes the message (confirmed, not returned);
/// `false` if none did before `deadline`.
async fn publish(
    channel: &Channel,
    target: Target<'_>,
    body: &[u8],
    properties: BasicProperties,
    deadline: Instant,
    on_unroutable: &(dyn Fn() + Send + Sync),
) -> Result<bool, AmqpError> {
    let mut said = false;
    loop {
        if publish_once(channel, target, body, properties.clone()).await? {
            return Ok(true);
        }
        if !said {
            on_unroutable();
            said = true;
        }
        if Instant::now() + REPUBLISH_AFTER >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(REPUBLISH_AFTER).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> impl FnMut() -> Uuid {
        let mut n = 0u128;
        move || {
            n += 1;
            Uuid::from_u128(n)
        }
    }

    fn worker() -> Uuid {
        Uuid::from_u128(0xabc)
    }

    #[test]
    fn a_bare_payload_becomes_a_pipeline_message_with_a_step_to_listen_on() {
        let p = prepare(json!({"payload": "aGk="}), worker(), 1000, ids()).expect("prepared");
        let b = &p.body;
        assert_eq!(b["payload"], "aGk=");
        assert_eq!(b["step_index"], 0);
        assert_eq!(b["received_at"], 1000);
        assert_eq!(b["timestamp"], 1000);
        assert_eq!(b["tracing_id"], Uuid::from_u128(1).to_string());
        let steps = b["pipeline_steps"].as_array().expect("steps");
        assert_eq!(steps[0], worker().to_string());
        assert_eq!(steps[1], p.next_key);
        assert!(
            p.next_key.starts_with("workerctl.invoke."),
            "{}",
            p.next_key
        );
        assert_eq!(p.tracing_id, Uuid::from_u128(1).to_string());
        assert!(p.notes.is_empty());
    }

    #[test]
    fn given_fields_are_kept_and_an_existing_next_step_is_listened_on() {
        let msg = json!({
            "tracing_id": "t-1", "tenant_id": 7, "pipeline_steps": [worker().to_string(), "storage"],
            "step_index": 0, "received_at": 5, "timestamp": 6
        });
        let p = prepare(msg, worker(), 1000, ids()).expect("prepared");
        assert_eq!(p.next_key, "storage");
        assert_eq!(p.tracing_id, "t-1");
        assert_eq!(p.body["tenant_id"], 7);
        assert_eq!(p.body["received_at"], 5);
        assert_eq!(p.body["pipeline_steps"].as_array().map(Vec::len), Some(2));
    }

    #[test]
    fn the_step_index_moves_to_where_the_worker_is() {
        let msg = json!({"pipeline_steps": ["a", worker().to_string(), "b"], "step_index": 0});
        let p = prepare(msg, worker(), 0, ids()).expect("prepared");
        assert_eq!(p.body["step_index"], 1);
        assert_eq!(p.next_key, "b");
        assert_eq!(p.notes.len(), 1);
    }

    #[test]
    fn a_worker_missing_from_the_steps_is_put_at_the_step_index() {
        let msg = json!({"pipeline_steps": ["a", "b"], "step_index": 1});
        let p = prepare(msg, worker(), 0, ids()).expect("prepared");
        let steps = &p.body["pipeline_steps"];
        assert_eq!(steps[1], worker().to_string());
        assert_eq!(p.next_key, "b");
    }

    #[test]
    fn malformed_messages_are_refused_with_a_reason() {
        assert!(prepare(json!([1]), worker(), 0, ids()).is_err());
        assert!(prepare(json!({"pipeline_steps": "x"}), worker(), 0, ids()).is_err());
        assert!(prepare(json!({"step_index": -1}), worker(), 0, ids()).is_err());
    }

    #[test]
    fn answers_are_recognised_by_message_id_or_tracing_id() {
        assert!(is_answer(Some("m"), b"not json", "m", "t"));
        assert!(is_answer(None, br#"{"tracing_id": "t"}"#, "m", "t"));
        assert!(is_answer(
            None,
            br#"{"received_by_worker": {"tracing_id": "t"}}"#,
            "m",
            "t"
        ));
        assert!(is_answer(
            None,
            br#"{"received_by_worker": "{\"tracing_id\": \"t\"}"}"#,
            "m",
            "t"
        ));
        assert!(!is_answer(
            Some("other"),
            br#"{"tracing_id": "u"}"#,
            "m",
            "t"
        ));
    }

    #[test]
    fn what_comes_out_on_errors_is_a_failure_with_the_last_line_of_the_traceback() {
        let body = br#"{"error": "Traceback:\n  line 2\nValueError: no good\n\n", "worker": "w"}"#;
        match verdict("errors", body) {
            Answer::Failed { body, reason } => {
                assert_eq!(reason, "ValueError: no good");
                assert_eq!(body["worker"], "w");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            verdict("storage", br#"{"a": 1}"#),
            Answer::Output(json!({"a": 1}))
        );
        assert_eq!(verdict("storage", b"plain"), Answer::Output(json!("plain")));
    }
}
