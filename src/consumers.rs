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
//! A pass asks for counts read after it listed the containers
//! ([`ConsumerCounts::as_of`]): a count read before then may still hold the
//! consumer of a container that has gone since (a superseded one, retired a
//! moment ago), and would make a new container that has not connected yet
//! look as if it consumed.
//!
//! It decides nothing: the planner reads the counts (`Snapshot::consumers`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::backoff::error_chain;
use crate::model::WorkerId;
use crate::plan::containers::ConsumerCount;

/// How often the named queues are asked while a rollout waits on them.
pub(crate) const POLL: Duration = Duration::from_millis(100);
/// How long to wait before connecting again after the broker refused.
const RECONNECT: Duration = Duration::from_secs(1);
/// How long a pass waits for a count read after it listed the containers.
const FRESH: Duration = Duration::from_millis(300);

/// The counts of one read of the broker.
#[derive(Clone, Debug, Default)]
struct Counts {
    /// When the read began; `None` before the first.
    began: Option<Instant>,
    by_worker: BTreeMap<WorkerId, u32>,
}

/// The reconciler's side of the task.
#[derive(Clone)]
pub(crate) struct ConsumerCounts {
    wanted: Arc<watch::Sender<BTreeSet<WorkerId>>>,
    counts: watch::Receiver<Counts>,
    /// Asks the task to read now rather than at its next poll.
    nudge: Arc<Notify>,
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
        let (counts_tx, counts) = watch::channel(Counts::default());
        let nudge = Arc::new(Notify::new());
        let shutdown = shutdown.clone();
        let task = Task {
            amqp_url,
            wanted: wanted_rx,
            counts: counts_tx,
            wake,
            nudge: nudge.clone(),
        };
        tracker.spawn(task.run(shutdown));
        ConsumerCounts {
            wanted: Arc::new(wanted),
            counts,
            nudge,
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

    /// The counts of the watched queues, [`ConsumerCount::Fresh`] if a read
    /// that began at `listed` or later comes within [`FRESH`], else the
    /// latest ones as [`ConsumerCount::Stale`]. Empty while the broker
    /// cannot be asked, without waiting.
    pub(crate) async fn as_of(&self, listed: Instant) -> BTreeMap<WorkerId, ConsumerCount> {
        if self.counts.borrow().by_worker.is_empty() {
            return BTreeMap::new();
        }
        self.nudge.notify_one();
        let mut counts = self.counts.clone();
        let fresh = counts.wait_for(|c| c.began.is_some_and(|at| at >= listed));
        let (counts, count): (Counts, fn(u32) -> ConsumerCount) =
            match tokio::time::timeout(FRESH, fresh).await {
                Ok(Ok(fresh)) => (fresh.clone(), ConsumerCount::Fresh),
                // The task ended (shutdown), or no read came in time.
                _ => (self.counts.borrow().clone(), |_| ConsumerCount::Stale),
            };
        counts
            .by_worker
            .into_iter()
            .map(|(id, n)| (id, count(n)))
            .collect()
    }
}

/// The task that asks the broker.
struct Task {
    amqp_url: String,
    wanted: watch::Receiver<BTreeSet<WorkerId>>,
    counts: watch::Sender<Counts>,
    /// Wakes the reconciler's loop when a count changes.
    wake: Arc<Notify>,
    nudge: Arc<Notify>,
}

impl Task {
    async fn run(mut self, shutdown: CancellationToken) {
        let mut broker: Option<(Connection, Channel)> = None;
        loop {
            let workers = self.wanted.borrow_and_update().clone();
            if workers.is_empty() {
                if let Some((connection, _)) = broker.take() {
                    let _ = connection.close(200, "nothing to watch".into()).await;
                }
                self.forget();
                tokio::select! {
                    // Cancel-safe: both only wait.
                    _ = shutdown.cancelled() => return,
                    changed = self.wanted.changed() => if changed.is_err() { return },
                }
                continue;
            }
            broker = match broker {
                Some((connection, channel)) => {
                    let began = Instant::now();
                    let (now, channel) = read(&connection, channel, &workers).await;
                    self.publish(began, now);
                    channel.map(|channel| (connection, channel))
                }
                None => connect(&self.amqp_url).await,
            };
            if broker.is_none() {
                // Nothing can be counted: no count may stand for one.
                self.forget();
            }
            let pause = if broker.is_some() { POLL } else { RECONNECT };
            tokio::select! {
                // Cancel-safe: all four only wait.
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
                _ = self.nudge.notified() => {}
                changed = self.wanted.changed() => if changed.is_err() { return },
            }
        }
    }

    /// Records a read (every read: a pass may be waiting for a fresh one),
    /// and wakes the loop if a count changed.
    fn publish(&self, began: Instant, now: BTreeMap<WorkerId, u32>) {
        let mut changed = false;
        self.counts.send_modify(|c| {
            changed = c.by_worker != now;
            *c = Counts {
                began: Some(began),
                by_worker: now,
            };
        });
        if changed {
            self.wake.notify_one();
        }
    }

    fn forget(&self) {
        self.counts.send_if_modified(|c| {
            let had = !c.by_worker.is_empty();
            *c = Counts::default();
            had
        });
    }
}

/// Each worker queue's consumer count, leaving out the queues not declared
/// yet; the channel to go on with (`None`: the connection is lost).
async fn read(
    connection: &Connection,
    mut channel: Channel,
    workers: &BTreeSet<WorkerId>,
) -> (BTreeMap<WorkerId, u32>, Option<Channel>) {
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
                // A queue not declared yet closes the channel: open another.
                match connection.create_channel().await {
                    Ok(next) => channel = next,
                    Err(_) => return (now, None),
                }
            }
        }
    }
    (now, Some(channel))
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
