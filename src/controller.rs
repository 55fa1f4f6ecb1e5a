//! The control loop: run a pass whenever something may have changed — the
//! periodic resync, a store notification, a Docker event, a ready report,
//! the end of an action, or a deadline the planner asked for — until
//! shutdown. Wake-ups only wake: a burst of them coalesces into one pass (a
//! `Notify` holds at most one permit), and a wake-up during a pass causes
//! exactly one more. Passes never wait for actions: those run on their own
//! and their end is one more wake-up.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::{Instant, MissedTickBehavior, interval, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::backoff::{self, error_chain};
use crate::reconcile::{Backend, Reconciler};
use crate::store::WorkerStore;

/// Delay before retrying after a pass that could not observe the world;
/// doubled on each consecutive failure, up to the cap.
const RETRY_INITIAL: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// How the loop is timed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LoopSettings {
    /// The periodic resync.
    pub resync: Duration,
    /// How long shutdown waits for the actions in flight (a graceful stop
    /// needs its grace period).
    pub drain: Duration,
}

/// Runs passes until `shutdown` is cancelled, then waits for the actions in
/// flight (at most `settings.drain`). Containers are left running.
pub(crate) async fn run(
    mut reconciler: Reconciler<impl WorkerStore, impl Backend>,
    wake: Arc<Notify>,
    settings: LoopSettings,
    shutdown: CancellationToken,
) {
    let mut tick = interval(settings.resync);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut deadline: Option<Instant> = None;
    let mut failures = 0u32;
    loop {
        let at = deadline.unwrap_or_else(|| Instant::now() + settings.resync);
        tokio::select! {
            // All arms are cancel-safe: cancellation, ticks, permits, sleeps
            // and `next_done` (a JoinSet keeps what ends meanwhile) lose
            // nothing when another arm wins.
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => debug!("woken by the periodic resync"),
            _ = wake.notified() => debug!("woken by a change"),
            _ = sleep_until(at), if deadline.is_some() => debug!("woken by a deadline"),
            done = reconciler.next_done() => reconciler.finished(&done),
        }
        reconciler.finish_ended();
        deadline = match reconciler.pass().await {
            Ok(report) => {
                failures = 0;
                report.wake_at
            }
            Err(e) => {
                failures += 1;
                let delay = backoff::delay(RETRY_INITIAL, RETRY_MAX, failures - 1);
                error!(
                    "pass failed, containers left as they are; retrying in {delay:?}: {}",
                    error_chain(&e)
                );
                Some(Instant::now() + delay)
            }
        };
    }
    if reconciler.in_flight() > 0 {
        info!(
            "shutting down: waiting for {} action(s) in flight",
            reconciler.in_flight()
        );
        reconciler.drain(settings.drain).await;
    }
    warn!("shut down: worker containers keep running");
}

#[cfg(test)]
mod tests;
