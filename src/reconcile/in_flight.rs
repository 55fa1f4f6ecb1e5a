//! The actions a reconciler has started and not yet seen end: each runs as
//! a task of its own, at most `concurrency` of them at once (a semaphore),
//! and its slot is busy until it ends. Shared by both backends' reconcilers;
//! it knows nothing of what an action does.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::{Id, JoinSet};
use tokio::time::Instant;
use tracing::{Instrument, warn};

use crate::plan::Slot;

pub(super) struct InFlight<D> {
    tasks: JoinSet<D>,
    busy: HashMap<Id, Slot>,
    permits: Arc<Semaphore>,
}

impl<D: Send + 'static> InFlight<D> {
    pub(super) fn new(concurrency: usize) -> Self {
        InFlight {
            tasks: JoinSet::new(),
            busy: HashMap::new(),
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
        }
    }

    /// Runs `work` once a permit is free; `slot` is busy until it ends.
    pub(super) fn spawn(
        &mut self,
        slot: Slot,
        span: tracing::Span,
        work: impl Future<Output = D> + Send + 'static,
    ) {
        let permits = self.permits.clone();
        let task = async move {
            // Never closed: the semaphore lives as long as its reconciler.
            let _permit = permits.acquire_owned().await.ok();
            work.await
        };
        let handle = self.tasks.spawn(task.instrument(span));
        self.busy.insert(handle.id(), slot);
    }

    /// The slots with an action in flight.
    pub(super) fn busy(&self) -> BTreeSet<Slot> {
        self.busy.values().cloned().collect()
    }

    pub(super) fn len(&self) -> usize {
        self.tasks.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// The next action to end; pending forever while none is in flight.
    /// Cancel-safe: an action that ends while this is dropped is kept.
    pub(super) async fn next(&mut self) -> D {
        loop {
            match self.tasks.join_next_with_id().await {
                Some(Ok((id, done))) => {
                    self.busy.remove(&id);
                    return done;
                }
                Some(Err(e)) => {
                    // A panicked (or aborted) action: its slot is free again,
                    // and the next pass sees what it left behind.
                    warn!("an action ended abnormally: {e}");
                    self.busy.remove(&e.id());
                }
                None => std::future::pending::<()>().await,
            }
        }
    }

    /// An action that has ended by now, without waiting.
    pub(super) fn try_next(&mut self) -> Option<D> {
        while let Some(ended) = self.tasks.try_join_next_with_id() {
            match ended {
                Ok((id, done)) => {
                    self.busy.remove(&id);
                    return Some(done);
                }
                Err(e) => {
                    warn!("an action ended abnormally: {e}");
                    self.busy.remove(&e.id());
                }
            }
        }
        None
    }

    /// Waits for the actions in flight to end, at most `limit`; those still
    /// running then are abandoned (the next daemon re-plans from what it
    /// finds). Returns those that ended.
    pub(super) async fn drain(&mut self, limit: Duration) -> Vec<D> {
        let mut done = Vec::new();
        let deadline = Instant::now() + limit;
        while !self.is_empty() {
            match tokio::time::timeout_at(deadline, self.next()).await {
                Ok(d) => done.push(d),
                Err(_) => {
                    warn!(
                        "{} action(s) still running after {limit:?}; leaving them",
                        self.len()
                    );
                    self.tasks.abort_all();
                    break;
                }
            }
        }
        done
    }
}
