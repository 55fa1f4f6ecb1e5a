//! `workerctl_dead_letters` (migrations/0010): what the pipeline routed to
//! `errors`, as the daemon's collector stored it. The collector inserts;
//! `workerctl errors …` and the status page read, replay and purge.
//! Plain SQL and row mapping; what to do with a dead letter is decided by
//! the callers.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use super::StoreError;

/// One message from `errors`, read out of its body, ready to store.
#[derive(Clone, Debug, PartialEq)]
pub struct NewDeadLetter {
    pub worker_id: Option<Uuid>,
    pub queue: String,
    pub error: String,
    pub attempt: Option<i32>,
    pub failed_at: DateTime<Utc>,
    pub message_id: Option<String>,
    /// The whole error document (a JSON string if the body was not JSON).
    pub body: Value,
    /// Identifies the message, so that a redelivery is stored once.
    pub digest: String,
}

/// A stored dead letter.
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow)]
pub struct DeadLetter {
    pub id: i64,
    pub worker_id: Option<Uuid>,
    /// The worker's name now, if its row is still there.
    pub worker_name: Option<String>,
    pub queue: String,
    /// The traceback.
    pub error: String,
    pub attempt: Option<i32>,
    pub failed_at: DateTime<Utc>,
    pub collected_at: DateTime<Utc>,
    pub message_id: Option<String>,
    /// The error document: `received_by_worker` is the message as received.
    pub body: Value,
    pub replays: i32,
    pub replayed_at: Option<DateTime<Utc>>,
}

impl DeadLetter {
    /// The message the worker received, as it received it.
    pub fn received(&self) -> Option<&Value> {
        self.body.get("received_by_worker")
    }

    /// The last line of the traceback: what went wrong, in one line.
    pub fn reason(&self) -> &str {
        self.error
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("")
    }
}

/// Which dead letters a command is about.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    pub worker: Option<Uuid>,
    pub since: Option<DateTime<Utc>>,
    pub limit: Option<i64>,
}

const SELECT: &str = "
    SELECT d.id, d.worker_id, w.name::text AS worker_name, d.queue, d.error, d.attempt,
           d.failed_at, d.collected_at, d.message_id, d.body, d.replays, d.replayed_at
      FROM workerctl_dead_letters d
      LEFT JOIN user_workers w ON w.id = d.worker_id";

fn query_failed(what: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| StoreError::Query { what, source }
}

/// Stores one dead letter (once per digest) and drops the oldest beyond
/// `keep`. Returns whether it was new.
pub async fn insert(pool: &PgPool, letter: &NewDeadLetter, keep: i64) -> Result<bool, StoreError> {
    let inserted = sqlx::query(
        "INSERT INTO workerctl_dead_letters
                (worker_id, queue, error, attempt, failed_at, message_id, body, digest)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT (digest) DO NOTHING",
    )
    .bind(letter.worker_id)
    .bind(&letter.queue)
    .bind(&letter.error)
    .bind(letter.attempt)
    .bind(letter.failed_at)
    .bind(&letter.message_id)
    .bind(&letter.body)
    .bind(&letter.digest)
    .execute(pool)
    .await
    .map_err(query_failed("store a dead letter"))?;
    sqlx::query(
        "DELETE FROM workerctl_dead_letters
          WHERE id IN (SELECT id FROM workerctl_dead_letters ORDER BY id DESC OFFSET $1)",
    )
    .bind(keep)
    .execute(pool)
    .await
    .map_err(query_failed("prune dead letters"))?;
    Ok(inserted.rows_affected() == 1)
}

/// The newest first.
pub async fn list(pool: &PgPool, filter: &Filter) -> Result<Vec<DeadLetter>, StoreError> {
    let sql = format!(
        "{SELECT}
          WHERE ($1::uuid IS NULL OR d.worker_id = $1)
            AND ($2::timestamptz IS NULL OR d.failed_at >= $2)
          ORDER BY d.id DESC
          LIMIT $3"
    );
    sqlx::query_as(&sql)
        .bind(filter.worker)
        .bind(filter.since)
        .bind(filter.limit.unwrap_or(i64::MAX))
        .fetch_all(pool)
        .await
        .map_err(query_failed("list dead letters"))
}

pub async fn get(pool: &PgPool, id: i64) -> Result<Option<DeadLetter>, StoreError> {
    let sql = format!("{SELECT} WHERE d.id = $1");
    sqlx::query_as(&sql)
        .bind(id)
        .fetch_optional(pool)
        .await
        .map_err(query_failed("load a dead letter"))
}

/// The last `per_worker` dead letters of each worker, newest first, for
/// the status page.
pub async fn recent(pool: &PgPool, per_worker: i64) -> Result<Vec<DeadLetter>, StoreError> {
    let sql = format!(
        "{SELECT}
          WHERE d.id IN (SELECT id FROM (
                  SELECT id, row_number() OVER (PARTITION BY worker_id ORDER BY id DESC) AS n
                    FROM workerctl_dead_letters) r
                 WHERE r.n <= $1)
          ORDER BY d.id DESC"
    );
    sqlx::query_as(&sql)
        .bind(per_worker)
        .fetch_all(pool)
        .await
        .map_err(query_failed("list recent dead letters"))
}

/// Counts a replay of each of `ids`.
pub(crate) async fn mark_replayed(pool: &PgPool, ids: &[i64]) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE workerctl_dead_letters
            SET replays = replays + 1, replayed_at = now()
          WHERE id = ANY($1)",
    )
    .bind(ids)
    .execute(pool)
    .await
    .map(drop)
    .map_err(query_failed("record a replay"))
}

/// Deletes the dead letters of one worker, or all; returns how many.
pub async fn purge(pool: &PgPool, worker: Option<Uuid>) -> Result<u64, StoreError> {
    sqlx::query("DELETE FROM workerctl_dead_letters WHERE $1::uuid IS NULL OR worker_id = $1")
        .bind(worker)
        .execute(pool)
        .await
        .map(|done| done.rows_affected())
        .map_err(query_failed("purge dead letters"))
}
