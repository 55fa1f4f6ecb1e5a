//! The executor: applies one action of a plan through the container runtime.
//! It makes no decisions: every branch here is the mechanics of one step,
//! and failures are reported, not retried (the planner decides when to try
//! again). The loop runs each action as a task of its own, so a slow action
//! (a graceful stop waiting out its grace period) delays only its worker.

use std::time::Duration;

use crate::model::{ManagedContainer, Owner, RunState, parked_name};
use crate::plan::Step;
use crate::runtime::{ContainerRuntime, RuntimeError};

/// How a container is asked to stop (`docker.stop_timeout`, `docker.stop_signal`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stopping {
    /// Grace period between the stop signal and SIGKILL.
    pub timeout: Duration,
    /// The configured signal; `None`: chosen by the image.
    pub signal: Option<String>,
}

impl Stopping {
    /// The signal for a container workerctl did not create, whose own stop
    /// signal was never chosen for it: the configured one, else SIGINT —
    /// SensorBucket's controller starts its image with none, and that image
    /// (a Python PID 1 without handlers) ignores SIGTERM but stops on SIGINT.
    pub fn foreign_signal(&self) -> &str {
        self.signal.as_deref().unwrap_or("SIGINT")
    }
}

/// Applies `step`; returns the id of the container it started, if any.
pub async fn apply<R: ContainerRuntime>(
    runtime: &R,
    step: &Step,
    stopping: &Stopping,
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
            let parked = parked_name(&old.name, old.short_id());
            runtime.rename(&old.id, &parked).await?;
            let id = runtime.create(spec).await?;
            runtime.start(&id).await?;
            Ok(Some(id))
        }
        Step::Remove { container } => {
            retire(runtime, container, stopping).await?;
            Ok(None)
        }
    }
}

/// Stops a container gracefully (its stop signal, then SIGKILL after the
/// timeout) and removes it. Never a bare force-remove of a running worker.
async fn retire<R: ContainerRuntime>(
    runtime: &R,
    container: &ManagedContainer,
    stopping: &Stopping,
) -> Result<(), RuntimeError> {
    let running = !matches!(container.state, RunState::Exited(_) | RunState::Created);
    match container.owner {
        _ if !running => {}
        Owner::Workerctl => runtime.stop(&container.id, stopping.timeout).await?,
        Owner::SensorBucket => {
            let signal = stopping.foreign_signal();
            runtime
                .interrupt(&container.id, signal, stopping.timeout)
                .await?
        }
    }
    runtime.remove(&container.id).await
}
