//! How many consumers a worker's queue has, read from the broker for the
//! workers whose new container cannot say it consumes: an image with no
//! ready report and no health check (SensorBucket's own, or any image that
//! knows only the contract). Without it such a container would count as
//! ready only after `reconcile.assume_ready_after`, and the old revision
//! would go on answering that long after the new one has begun.
//!
//! A daemon task: the reconciler names the workers it waits on
//! ([`ConsumerCounts::want`], from `Plan::watch_consumers`); while any are
//! named, the task asks the broker every [`POLL`] with a passive
//! `queue.declare` (the broker answers with the queue's consumer count as it
//! is now, no statistics involved) and wakes the loop when a count changes.
//! With nobody named it holds no connection and makes no request.
//!
//! It decides nothing: the planner reads the counts (`Snapshot::consumers`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::backoff::error_chain;
use crate::model::WorkerId;

/// How often the named queues are asked while a rollout waits on them.
pub(crate) const POLL: Duration = Duration::from_millis(100);
/// How long to wait before connecting again after the broker refused.
const RECONNECT: Duration = Duration::from_secs(1);

/// The reconciler's side of the task.
#[derive(Clone)]
pub(crate) struct ConsumerCounts {
    wanted: Arc<watch::Sender<BTreeSet<WorkerId>>>,
    counts: watch::Receiver<BTreeMap<WorkerId, u32>>,
}

impl ConsumerCounts {
    /// Starts the task on `amqp_url`; it ends with `shutdown`.
    pub(crate) fn spawn(
        amqp_url: String,
        wake: Arc<Notify>,
        tracker: &tokio_util::task::TaskTracker,
        shutdown: &CancellationToken,
    ) -> ConsumerCounts {
        let (wanted, wanted_rx) = watch::channel(BTreeSet::new());
        let (counts_tx, counts) = watch::channel(BTreeMap::new());
        let shutdown = shutdown.clone();
        tracker.spawn(run(amqp_url, wanted_rx, counts_tx, wake, shutdown));
        ConsumerCounts {
            wanted: Arc::new(wanted),
            counts,
        }
    }

    /// The workers whose queues to watch from now on (the others are dropped).
    pub(crate) fn want(&self, workers: BTreeSet<WorkerId>) {
        self.wanted.send_if_modified(|current| {
            let changed = *current != workers;
            *current = workers;
            changed
        });
    }

    /// The latest counts of the watched queues.
    pub(crate) fn latest(&self) -> BTreeMap<WorkerId, u32> {
        self.counts.borrow().clone()
    }
}

async fn run(
    amqp_url: String,
    mut wanted: watch::Receiver<BTreeSet<WorkerId>>,
    counts: watch::Sender<BTreeMap<WorkerId, u32>>,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut broker: Option<(Connection, Channel)> = None;
    loop {
        let workers = wanted.borrow_and_update().clone();
        if workers.is_empty() {
            if let Some((connection, _)) = broker.take() {
                let _ = connection.close(200, "nothing to watch".into()).await;
            }
            counts.send_if_modified(|c| !std::mem::take(c).is_empty());
            tokio::select! {
                // Cancel-safe: both only wait.
                _ = shutdown.cancelled() => return,
                changed = wanted.changed() => if changed.is_err() { return },
            }
            continue;
        }
        let read = match &broker {
            Some((_, channel)) => Some(read(channel, &workers).await),
            None => None,
        };
        match read {
            Some(Ok(now)) => {
                if counts.send_if_modified(|c| replace_if_changed(c, now)) {
                    wake.notify_one();
                }
            }
            // A queue not declared yet closes the channel: open another.
            Some(Err(())) => broker = reopen(broker.take()).await,
            None => broker = connect(&amqp_url).await,
        }
        let pause = if broker.is_some() { POLL } else { RECONNECT };
        tokio::select! {
            // Cancel-safe: all three only wait.
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
            changed = wanted.changed() => if changed.is_err() { return },
        }
    }
}

/// Each worker queue's consumer count; `Err` when the channel was closed
/// (a queue that does not exist yet), with the counts read so far dropped.
async fn read(
    channel: &Channel,
    workers: &BTreeSet<WorkerId>,
) -> Result<BTreeMap<WorkerId, u32>, ()> {
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let mut now = BTreeMap::new();
    for id in workers {
        let queue = format!("worker_{id}");
        match channel
            .queue_declare(queue.as_str().into(), passive, FieldTable::default())
            .await
        {
            Ok(declared) => {
                now.insert(*id, declared.consumer_count());
            }
            Err(e) => {
                debug!(%queue, error = %error_chain(&e), "cannot count its consumers yet");
                return Err(());
            }
        }
    }
    Ok(now)
}

fn replace_if_changed(current: &mut BTreeMap<WorkerId, u32>, now: BTreeMap<WorkerId, u32>) -> bool {
    let changed = *current != now;
    *current = now;
    changed
}

async fn connect(amqp_url: &str) -> Option<(Connection, Channel)> {
    let connected = async {
        let connection = Connection::connect(amqp_url, ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        Ok::<_, lapin::Error>((connection, channel))
    };
    match connected.await {
        Ok(broker) => Some(broker),
        Err(e) => {
            warn!(
                error = %error_chain(&e),
                "cannot count consumers on the broker: a container that gives no ready report \
                 counts as ready after reconcile.assume_ready_after"
            );
            None
        }
    }
}

async fn reopen(broker: Option<(Connection, Channel)>) -> Option<(Connection, Channel)> {
    let (connection, _) = broker?;
    match connection.create_channel().await {
        Ok(channel) => Some((connection, channel)),
        Err(_) => None,
    }
}
