//! The status page people open in a browser: one self-contained HTML file
//! (inline CSS and script, no external assets, so it works offline) and the
//! JSON view it polls every two seconds. This module owns what the page shows;
//! `http.rs` owns the routes. It only reads: the overview read model and the
//! outcome of the last pass.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use crate::metrics::{LastPass, Metrics};
use crate::store::StoreError;
use crate::store::dead_letters::{self, DeadLetter};
use crate::store::overview::{self, WorkerOverview};
use crate::store::recorded::{self, Recording};

/// How many of each worker's latest dead letters the page gets.
pub(crate) const ERRORS_PER_WORKER: i64 = 5;
/// How many of each worker's latest recorded messages the page gets (their
/// bodies are not in the view: the page opens one by its id).
pub(crate) const MESSAGES_PER_WORKER: i64 = 5;

/// The page itself. It renders nothing from the server: its script fetches
/// [`StatusView`] from `api/workers` and draws the table.
pub(crate) const PAGE: &str = include_str!("status_page.html");

/// The runtime backend a daemon drives, as the page names it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Backend {
    /// `docker` or `swarm`.
    pub name: String,
    /// Hardening the backend cannot apply on this engine, one sentence each.
    pub limitations: Vec<String>,
}

impl Backend {
    /// Plain containers: every hardening knob applies.
    pub fn docker() -> Self {
        Backend {
            name: "docker".into(),
            limitations: Vec::new(),
        }
    }
}

/// What `GET /api/workers` returns: everything the page draws.
#[derive(Clone, Debug, Serialize)]
pub struct StatusView {
    /// The daemon's `instance`, so that two daemons' pages are told apart.
    pub instance: String,
    pub backend: Backend,
    /// When this view was read; the page shows ages relative to it, so a
    /// browser with a wrong clock still shows the right ones.
    pub generated_at: DateTime<Utc>,
    /// `None` until the first pass completes.
    pub last_pass: Option<LastPass>,
    /// Every worker, by name then id.
    pub workers: Vec<WorkerOverview>,
    /// The latest dead letters of each worker, newest first.
    pub recent_errors: Vec<DeadLetter>,
    /// The latest recorded messages of each worker, newest first, without
    /// their bodies (`GET /api/workers/{id}/messages/{n}` has one whole).
    pub recent_messages: Vec<Recording>,
}

/// Reads the view: one query of the overview read model, one of the dead
/// letters, one of the recorded messages.
pub async fn view(
    pool: &PgPool,
    instance: &str,
    metrics: &Metrics,
    backend: &Backend,
) -> Result<StatusView, StoreError> {
    let workers = overview::list(pool).await?;
    let recent_errors = dead_letters::recent(pool, ERRORS_PER_WORKER).await?;
    let recent_messages = recorded::recent(pool, MESSAGES_PER_WORKER).await?;
    Ok(StatusView {
        instance: instance.to_string(),
        backend: backend.clone(),
        generated_at: Utc::now(),
        last_pass: metrics.last_pass(),
        workers,
        recent_errors,
        recent_messages,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_is_self_contained() {
        for external in ["http://", "https://", "<link", "src="] {
            assert!(!PAGE.contains(external), "the page loads {external}");
        }
        assert!(PAGE.contains("api/workers"));
    }
}
