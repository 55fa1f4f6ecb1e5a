//! `--wait`: follow a worker in the overview until its current revision runs
//! and is ready, or has failed, printing one line per change on stderr.
//!
//! Polls the overview read model; the daemon writes it. The verdict on each
//! snapshot is a pure function ([`progress`]) so that it can be tested
//! without a database.

use std::time::Duration;

use tokio::time::Instant;

use crate::cli::CliError;
use crate::model::Status;
use crate::store::admin::{Db, Target};
use crate::store::overview::WorkerOverview;

const POLL: Duration = Duration::from_millis(100);

/// What one snapshot of the worker says about the wait.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Progress {
    /// Its current revision runs and the daemon calls it ready: its
    /// container consumes its queue.
    Ready,
    /// The daemon reports an error for it; the reason.
    Failed(String),
    /// Disabled: there is nothing to wait for.
    Disabled,
    /// Not there yet.
    Pending,
}

pub(super) fn progress(w: &WorkerOverview) -> Progress {
    if !w.state.is_enabled() {
        return Progress::Disabled;
    }
    match w.status {
        Status::Error => Progress::Failed(w.status_info.clone()),
        Status::Ready if w.running_revision == Some(w.revision) => Progress::Ready,
        _ => Progress::Pending,
    }
}

/// The line printed when a snapshot differs from the one before.
fn describe(w: &WorkerOverview) -> String {
    let container = match (&w.container_state, w.running_revision) {
        (Some(state), Some(r)) => format!("container {state}, revision {r}"),
        (Some(state), None) => format!("container {state}"),
        (None, _) => "no container observed yet".into(),
    };
    let info = if w.status_info.is_empty() {
        String::new()
    } else {
        format!(": {}", w.status_info)
    };
    format!("revision {} {}{info} ({container})", w.revision, w.status)
}

/// Waits until the worker's current revision is ready (the daemon writes
/// `ready` only once its container consumes its queue); fails if it reports
/// an error, is disabled or deleted, or `timeout` passes first.
pub(super) async fn until_ready(
    db: &Db,
    target: &Target,
    timeout: Duration,
) -> Result<(), CliError> {
    let start = Instant::now();
    let mut last_line = String::new();
    loop {
        let w = db
            .overview(target.id)
            .await?
            .ok_or(CliError::UnknownId(target.id))?;
        let line = describe(&w);
        if line != last_line {
            eprintln!("[{:>5.1}s] {line}", start.elapsed().as_secs_f64());
            last_line = line;
        }
        match progress(&w) {
            Progress::Ready => {
                eprintln!(
                    "worker {} runs revision {} and is ready",
                    target.name, w.revision
                );
                return Ok(());
            }
            Progress::Failed(reason) => {
                return Err(CliError::WorkerFailed(format!(
                    "worker {} failed at revision {}: {reason}",
                    target.name, w.revision
                )));
            }
            Progress::Disabled => {
                return Err(CliError::BadArgument(format!(
                    "worker {} is {}: nothing to wait for (workerctl worker enable {})",
                    target.name, w.state, target.name
                )));
            }
            Progress::Pending => {}
        }
        if start.elapsed() >= timeout {
            return Err(timed_out(target, timeout, &w));
        }
        tokio::time::sleep(POLL).await;
    }
}

fn timed_out(target: &Target, timeout: Duration, w: &WorkerOverview) -> CliError {
    let now = if w.status_info.is_empty() {
        format!(" (status {})", w.status)
    } else {
        format!(" (status {}: {})", w.status, w.status_info)
    };
    CliError::Timeout(format!(
        "worker {} was not ready within {}{now}; is the daemon running (`workerctl run`)? \
         see `workerctl worker show {}`",
        target.name,
        humantime::format_duration(timeout),
        target.name
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn worker(state: &str, status: &str, revision: i32, running: Option<i32>) -> WorkerOverview {
        WorkerOverview {
            id: Uuid::nil(),
            name: "w".into(),
            description: String::new(),
            state: crate::model::WorkerState::from(state.to_string()),
            language: "python".into(),
            revision,
            status: Status::from_column(status),
            status_info: "why".into(),
            entrypoint: "main.main".into(),
            running_revision: running,
            container: None,
            container_state: None,
            restarts: 0,
            last_exit_code: None,
            observed_at: None,
            min_replicas: 1,
            max_replicas: 1,
            per_replica: 20,
            desired_replicas: 1,
            running_replicas: 1,
        }
    }

    #[test]
    fn ready_needs_the_current_revision_running() {
        assert_eq!(
            progress(&worker("enabled", "ready", 2, Some(2))),
            Progress::Ready
        );
        assert_eq!(
            progress(&worker("enabled", "ready", 2, Some(1))),
            Progress::Pending
        );
        assert_eq!(
            progress(&worker("enabled", "ready", 2, None)),
            Progress::Pending
        );
    }

    #[test]
    fn an_error_status_fails_the_wait_with_its_reason() {
        assert_eq!(
            progress(&worker("enabled", "error", 2, None)),
            Progress::Failed("why".into())
        );
    }

    #[test]
    fn a_disabled_worker_is_not_waited_for() {
        assert_eq!(
            progress(&worker("disabled", "unknown", 1, None)),
            Progress::Disabled
        );
    }
}
