//! The executor: applies one action of a plan through the container runtime.
//! It makes no decisions: every branch here is the mechanics of one step,
//! and failures are reported, not retried (the planner decides when to try
//! again). The loop runs each action as a task of its own, so a slow action
//! (a graceful stop waiting out its grace period) delays only its worker.

use std::time::Duration;

use crate::model::{ManagedContainer, RunState};
use crate::plan::Step;
use crate::runtime::{ContainerRuntime, RuntimeError};

/// Applies `step`; returns the id of the container it started, if any.
pub async fn apply<R: ContainerRuntime>(
    runtime: &R,
    step: &Step,
    stop_timeout: Duration,
) -> Result<Option<String>, RuntimeError> {
    match step {
        Step::Create { spec } => {
            let id = runtime.create(spec).await?;
            runtime.start(&id).await?;
            Ok(Some(id))
        }
        Step::Start { container } => {
            runtime.start(&container.id).await?;
            Ok(Some(container.id.clone()))
        }
        Step::StartBeside { old, spec } => {
            // Free the name first so the new container can take it; the old
            // one keeps serving until a later pass sees the new one ready.
            let parked = format!("{}-old-{}", old.name, old.short_id());
            runtime.rename(&old.id, &parked).await?;
            let id = runtime.create(spec).await?;
            runtime.start(&id).await?;
            Ok(Some(id))
        }
        Step::Remove { container } => {
            retire(runtime, container, stop_timeout).await?;
            Ok(None)
        }
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
