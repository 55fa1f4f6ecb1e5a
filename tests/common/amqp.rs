//! A listener on the pipeline exchange, as the tests and benchmarks use it:
//! a private queue bound to some routing keys, consumed without acks. The
//! benchmarks include this file (`#[path]`), so it needs nothing else of
//! `common`.
#![allow(dead_code)]

use lapin::options::{
    BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, Consumer, ExchangeKind};

/// A connection to `amqp_url` with a private queue bound to each of `keys`
/// on `exchange` (declared as the workers do), and its consumer.
pub async fn listen(
    amqp_url: &str,
    exchange: &str,
    keys: &[&str],
) -> (Connection, Channel, Consumer) {
    let connection = Connection::connect(amqp_url, ConnectionProperties::default())
        .await
        .expect("RabbitMQ answers at AMQP_URL (run scripts/services)");
    let channel = connection.create_channel().await.expect("channel");
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await
        .expect("exchange");
    let private = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..Default::default()
    };
    let queue = channel
        .queue_declare("".into(), private, FieldTable::default())
        .await
        .expect("queue");
    for key in keys {
        channel
            .queue_bind(
                queue.name().clone(),
                exchange.into(),
                (*key).into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind");
    }
    let no_ack = BasicConsumeOptions {
        no_ack: true,
        ..Default::default()
    };
    let consumer = channel
        .basic_consume(
            queue.name().clone(),
            "listener".into(),
            no_ack,
            FieldTable::default(),
        )
        .await
        .expect("consume");
    (connection, channel, consumer)
}
