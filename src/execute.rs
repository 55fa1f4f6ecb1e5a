//! The executor: applies the actions of a plan through the container runtime,
//! at most `concurrency` at a time. It makes no decisions: every branch here
//! is the mechanics of one action, and failures are reported, not retried
//! (the next pass re-plans from what it observes).

use std::time::Duration;

use futures::StreamExt;
use futures::stream;

use crate::model::{ManagedContainer, RunState};
use crate::plan::{Action, Step};
use crate::runtime::{ContainerRuntime, RuntimeError};

/// An action and how it went.
#[derive(Debug)]
pub struct Outcome {
    pub action: Action,
    pub result: Result<(), RuntimeError>,
}

/// Applies `actions`, `concurrency` at a time, and returns every outcome.
pub async fn execute<R: ContainerRuntime>(
    runtime: &R,
    actions: Vec<Action>,
    concurrency: usize,
    stop_timeout: Duration,
) -> Vec<Outcome> {
    stream::iter(actions)
        .map(|action| async move {
            let result = apply(runtime, &action.step, stop_timeout).await;
            Outcome { action, result }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await
}

async fn apply<R: ContainerRuntime>(
    runtime: &R,
    step: &Step,
    stop_timeout: Duration,
) -> Result<(), RuntimeError> {
    match step {
        Step::Create { spec } => {
            let id = runtime.create(spec).await?;
            runtime.start(&id).await
        }
        Step::Start { container } => runtime.start(&container.id).await,
        Step::Replace { old, spec } => {
            // Free the name first so the new container can take it; the old
            // one keeps serving until the new one runs.
            let parked = format!("{}-replaced-{}", old.name, old.short_id());
            runtime.rename(&old.id, &parked).await?;
            let id = runtime.create(spec).await?;
            runtime.start(&id).await?;
            retire(runtime, old, stop_timeout).await
        }
        Step::Remove { container } => retire(runtime, container, stop_timeout).await,
    }
}

/// Stops a container gracefully (SIGTERM, then SIGKILL after the timeout)
/// and removes it. Never a bare force-remove of a running worker.
async fn retire<R: ContainerRuntime>(
    runtime: &R,
    container: &ManagedContainer,
    stop_timeout: Duration,
) -> Result<(), RuntimeError> {
    if !matches!(container.state, RunState::Exited(_) | RunState::Created) {
        runtime.stop(&container.id, stop_timeout).await?;
    }
    runtime.remove(&container.id).await
}
