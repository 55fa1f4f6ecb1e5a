//! `workerctl_schedules` (migrations/0011): cron schedules of workers. The
//! CLI adds, lists and removes them; the firing loop loads them and records
//! each fire with a compare-and-set, so that a fire time is published once
//! whatever the number of daemons. Plain SQL and row mapping.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use super::StoreError;

/// One schedule as stored, with its worker's name and state now.
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow)]
pub struct ScheduleRow {
    pub id: i64,
    pub worker_id: Uuid,
    pub worker_name: String,
    pub worker_enabled: bool,
    pub cron: String,
    pub timezone: String,
    /// The message template.
    pub message: Value,
    pub created_at: DateTime<Utc>,
    /// The last fire time published.
    pub last_fire_at: Option<DateTime<Utc>>,
    pub fires: i64,
    /// Why the last fire could not be published; empty when it was.
    pub last_error: String,
}

/// A schedule to add; the expression and zone are checked by the caller.
#[derive(Clone, Debug, PartialEq)]
pub struct NewSchedule {
    pub worker_id: Uuid,
    pub cron: String,
    pub timezone: String,
    pub message: Value,
}

const SELECT: &str = "
    SELECT s.id, s.worker_id, COALESCE(w.name::text, '') AS worker_name,
           COALESCE(w.state::text = 'enabled', false) AS worker_enabled,
           s.cron, s.timezone, s.message, s.created_at, s.last_fire_at, s.fires, s.last_error
      FROM workerctl_schedules s
      JOIN user_workers w ON w.id = s.worker_id";

fn query_failed(what: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| StoreError::Query { what, source }
}

pub async fn add(pool: &PgPool, new: &NewSchedule) -> Result<i64, StoreError> {
    let (id,): (i64,) = sqlx::query_as(
        "INSERT INTO workerctl_schedules (worker_id, cron, timezone, message)
         VALUES ($1, $2, $3, $4) RETURNING id",
    )
    .bind(new.worker_id)
    .bind(&new.cron)
    .bind(&new.timezone)
    .bind(&new.message)
    .fetch_one(pool)
    .await
    .map_err(query_failed("add a schedule"))?;
    Ok(id)
}

/// Every schedule (of one worker, if given), by id.
pub async fn list(pool: &PgPool, worker: Option<Uuid>) -> Result<Vec<ScheduleRow>, StoreError> {
    let sql = format!("{SELECT} WHERE $1::uuid IS NULL OR s.worker_id = $1 ORDER BY s.id");
    sqlx::query_as(&sql)
        .bind(worker)
        .fetch_all(pool)
        .await
        .map_err(query_failed("list schedules"))
}

pub async fn get(pool: &PgPool, id: i64) -> Result<Option<ScheduleRow>, StoreError> {
    let sql = format!("{SELECT} WHERE s.id = $1");
    sqlx::query_as(&sql)
        .bind(id)
        .fetch_optional(pool)
        .await
        .map_err(query_failed("load a schedule"))
}

/// Removes a schedule; whether there was one.
pub async fn remove(pool: &PgPool, id: i64) -> Result<bool, StoreError> {
    sqlx::query("DELETE FROM workerctl_schedules WHERE id = $1")
        .bind(id)
        .execute(pool)
        .await
        .map(|done| done.rows_affected() == 1)
        .map_err(query_failed("remove a schedule"))
}

/// Records `at` as the schedule's last fire, only if no fire at or after
/// it is recorded: `true` means this caller won the fire and must publish
/// it; `false` means another daemon (or an earlier pass) already did.
pub async fn record_fire(pool: &PgPool, id: i64, at: DateTime<Utc>) -> Result<bool, StoreError> {
    sqlx::query(
        "UPDATE workerctl_schedules
            SET last_fire_at = $2, fires = fires + 1
          WHERE id = $1 AND (last_fire_at IS NULL OR last_fire_at < $2)",
    )
    .bind(id)
    .bind(at)
    .execute(pool)
    .await
    .map(|done| done.rows_affected() == 1)
    .map_err(query_failed("record a fire"))
}

/// Records why the last fire was not published ('' when it was).
pub(crate) async fn record_error(pool: &PgPool, id: i64, error: &str) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE workerctl_schedules SET last_error = $2
          WHERE id = $1 AND last_error IS DISTINCT FROM $2",
    )
    .bind(id)
    .bind(error)
    .execute(pool)
    .await
    .map(drop)
    .map_err(query_failed("record a fire's error"))
}
