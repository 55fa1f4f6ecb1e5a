//! What a pass observes of the world outside the store, in the words the
//! planner decides with: the image, the network, the queue depths, and
//! what runs (as written to `workerctl_observed`). The runtime and broker
//! modules produce these; the planner reads them; neither imports the other.

use std::collections::HashMap;

use super::ids::{Revision, WorkerId};

/// What is known of one worker's queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueDepth {
    /// Messages waiting for a consumer; `None` while a new queue has not yet
    /// counted its messages (a quorum queue does at its first tick).
    pub ready: Option<u64>,
    /// Always 0: the queue-totals listing (module docs) carries no consumer
    /// count, and nothing reads this any more.
    pub consumers: u32,
}

/// The depths of every worker queue on the vhost, from one read. A worker
/// absent here has no queue (yet): its dockerworker declares it on start.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueDepths {
    pub by_worker: HashMap<WorkerId, QueueDepth>,
}

impl QueueDepths {
    pub fn get(&self, id: WorkerId) -> Option<QueueDepth> {
        self.by_worker.get(&id).copied()
    }

    /// What the scaler knows of a worker's queue: no queue yet, no count
    /// yet, or the messages ready.
    pub(crate) fn demand(&self, id: WorkerId) -> Demand {
        match self.get(id) {
            None => Demand::NoQueue,
            Some(q) => q.ready.map_or(Demand::Unknown, Demand::Ready),
        }
    }
}

/// What is known of the messages waiting for a worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Demand {
    /// The queue depth could not be read (no management API, or no
    /// statistics yet for a new queue).
    Unknown,
    /// The worker's queue does not exist yet: its dockerworker declares it
    /// on start, and until then messages routed to the worker are dropped
    /// by the broker. So at least one replica runs, whatever `min`.
    NoQueue,
    /// Messages ready for a consumer.
    Ready(u64),
}

/// The state of the worker image, as one pass sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageState {
    Present { id: String },
    Missing,
}

/// Whether the pass could see what it needs to create containers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetworkState {
    Present,
    Missing,
    /// It exists, but only on one engine (a bridge network): Swarm services
    /// cannot join it.
    LocalOnly {
        driver: String,
    },
}

/// What workerctl last observed of a worker's container, kept in
/// `workerctl_observed` for the CLI and the status page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    pub id: WorkerId,
    /// Revision of the container that runs, if one runs.
    pub running_revision: Option<Revision>,
    pub container: Option<String>,
    /// "running", "exited (3)", "absent", …
    pub container_state: String,
    pub restarts: i32,
    pub last_exit_code: Option<i64>,
    /// Replicas the scaler wants, and replicas with a running container.
    pub desired_replicas: i32,
    pub running_replicas: i32,
}
