//! The daemon's one AMQP client for the triggers: connect (failing fast,
//! with the broker's address and never the URL), declare the pipeline
//! exchange as the workers do, and publish confirmed and mandatory, with
//! the properties every pipeline message carries.

use std::future::Future;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::backoff::{self, error_chain};
use crate::config::AmqpConfig;

type Cause = Box<dyn std::error::Error + Send + Sync>;

/// Why an invocation could not be carried out (a worker that fails is not
/// an error here: it is a [`Verdict`]).
#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    #[error("cannot reach RabbitMQ at {at}")]
    Unreachable {
        at: String,
        #[source]
        source: Cause,
    },
    #[error("RabbitMQ refused to {what}")]
    Refused {
        what: &'static str,
        #[source]
        source: lapin::Error,
    },
    /// The broker refused or dropped something without an error value.
    #[error("RabbitMQ {0}")]
    Said(String),
}

/// "no answer within 3s", as a cause.
#[derive(Debug, thiserror::Error)]
#[error("no answer within {}", humantime::format_duration(*.0))]
struct NoAnswer(Duration);

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A connection to the broker, failing fast with the reason.
pub async fn connect(amqp: &AmqpConfig, name: &str) -> Result<Connection, AmqpError> {
    let url = amqp.url.expose();
    let at = broker_address(url);
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(url, properties)).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(e)) => Err(AmqpError::Unreachable {
            at,
            source: Box::new(e),
        }),
        Err(_) => Err(AmqpError::Unreachable {
            at,
            source: Box::new(NoAnswer(CONNECT_TIMEOUT)),
        }),
    }
}

/// host:port of an AMQP URL, for messages (never the URL: it has the password).
fn broker_address(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => format!(
            "{}:{}",
            u.host_str().unwrap_or("?"),
            u.port().unwrap_or(5672)
        ),
        Err(_) => "the configured amqp.url".into(),
    }
}

pub(crate) fn refused(what: &'static str) -> impl FnOnce(lapin::Error) -> AmqpError {
    move |source| AmqpError::Refused { what, source }
}

/// Declares the pipeline exchange as the workers do: a durable topic exchange.
pub async fn declare_exchange(channel: &Channel, exchange: &str) -> Result<(), AmqpError> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await
        .map_err(refused("declare the exchange"))
}

/// What every message workerctl puts into the pipeline carries: persistent
/// JSON with a message_id and a `timestamp` header (Unix ms), beside `headers`.
pub(crate) fn pipeline_properties(message_id: &str, mut headers: FieldTable) -> BasicProperties {
    headers.insert(
        "timestamp".into(),
        AMQPValue::LongLongInt(chrono::Utc::now().timestamp_millis()),
    );
    BasicProperties::default()
        .with_message_id(message_id.into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_headers(headers)
}

/// Where a message goes.
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    pub exchange: &'a str,
    pub routing_key: &'a str,
}

/// Publishes once, confirmed and mandatory: `Ok(true)` if a queue took
/// it, `Ok(false)` if none is bound to the key. The channel must be in
/// confirm mode.
pub(crate) async fn publish_once(
    channel: &Channel,
    target: Target<'_>,
    body: &[u8],
    properties: BasicProperties,
) -> Result<bool, AmqpError> {
    let mandatory = BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    let confirm = channel
        .basic_publish(
            target.exchange.into(),
            target.routing_key.into(),
            mandatory,
            body,
            properties,
        )
        .await
        .map_err(refused("publish the message"))?
        .await
        .map_err(refused("confirm the message"))?;
    match confirm {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(true),
        Confirmation::Nack(_) => Err(AmqpError::Said("did not accept the message (nack)".into())),
        Confirmation::Ack(Some(_returned)) => Ok(false),
    }
}

/// A channel in confirm mode on a new connection, the exchange declared.
pub(crate) async fn open_channel(
    amqp: &AmqpConfig,
    name: &str,
) -> Result<(lapin::Connection, lapin::Channel), AmqpError> {
    let connection = connect(amqp, name).await?;
    let channel = connection
        .create_channel()
        .await
        .map_err(refused("open a channel"))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(refused("enable publisher confirms"))?;
    declare_exchange(&channel, &amqp.exchange).await?;
    Ok((connection, channel))
}

/// First and longest wait before a broker session is tried again.
const SESSION_BACKOFF_MIN: Duration = Duration::from_millis(500);
const SESSION_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A session that lasted this long was healthy: backoff starts over.
const SESSION_STABLE: Duration = Duration::from_secs(30);

/// Runs a long-lived broker session again each time it ends, until
/// `shutdown`: what it ended with is logged as `what` interrupted, and the
/// next try waits a capped backoff (reset after a session that lasted).
/// Never returns early. Dropping a session drops its connection, so its
/// unacknowledged deliveries go back to their queue.
pub(crate) async fn keep_session<E, F, Fut>(
    what: &str,
    shutdown: &CancellationToken,
    mut session: F,
) where
    E: std::error::Error,
    F: FnMut() -> Fut,
    Fut: Future<Output = E>,
{
    let mut failures = 0u32;
    loop {
        let started = Instant::now();
        // Cancel-safe: see above.
        let ended = tokio::select! {
            () = shutdown.cancelled() => return,
            ended = session() => ended,
        };
        if started.elapsed() >= SESSION_STABLE {
            failures = 0;
        }
        let delay = backoff::delay(SESSION_BACKOFF_MIN, SESSION_BACKOFF_MAX, failures);
        failures = failures.saturating_add(1);
        warn!(error = %error_chain(&ended), retry_in = ?delay, "{what} interrupted");
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}
