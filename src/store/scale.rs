//! Scale settings of workers (`workerctl_worker_scale`, migrations/0020):
//! read all in one statement, set one worker's. A worker without a row runs
//! one replica ([`ScaleBounds::default`]). Rows are mapped leniently (a
//! value edited by hand out of range is clamped, see
//! [`ScaleBounds::lenient`]); checking what a person asks for is the
//! caller's job, before [`set`].

use std::collections::HashMap;

use sqlx::PgPool;

use super::StoreError;
use crate::model::ScaleBounds;
use crate::model::WorkerId;

/// Joined with user_workers: the settings of a deleted row are never seen.
const LOAD_ALL: &str = "
SELECT s.worker_id, s.min_replicas::int8, s.max_replicas::int8, s.per_replica::int8
  FROM workerctl_worker_scale s
  JOIN user_workers w ON w.id = s.worker_id";

const LOAD_ONE: &str = "
SELECT s.min_replicas::int8, s.max_replicas::int8, s.per_replica::int8
  FROM workerctl_worker_scale s
  JOIN user_workers w ON w.id = s.worker_id
 WHERE s.worker_id = $1";

/// Holding the worker's row (FOR KEY SHARE) while inserting means a
/// concurrent DELETE waits for this insert and its trigger then removes
/// the settings: no row outlives its worker. No row: the worker is gone.
const SET: &str = "
INSERT INTO workerctl_worker_scale AS s (worker_id, min_replicas, max_replicas, per_replica)
SELECT w.id, $2, $3, $4 FROM user_workers w WHERE w.id = $1 FOR KEY SHARE
ON CONFLICT (worker_id) DO UPDATE
   SET min_replicas = EXCLUDED.min_replicas,
       max_replicas = EXCLUDED.max_replicas,
       per_replica  = EXCLUDED.per_replica,
       updated_at   = now()";

/// The settings of every worker that has any, in one statement.
pub async fn load_all(pool: &PgPool) -> Result<HashMap<WorkerId, ScaleBounds>, StoreError> {
    let rows: Vec<(uuid::Uuid, i64, i64, i64)> = sqlx::query_as(LOAD_ALL)
        .fetch_all(pool)
        .await
        .map_err(|source| StoreError::Query {
            what: "load scale settings",
            source,
        })?;
    Ok(rows
        .into_iter()
        .map(|(id, min, max, per)| (WorkerId(id), ScaleBounds::lenient(min, max, per)))
        .collect())
}

/// One worker's settings; the default when it has none (or is gone).
pub async fn load(pool: &PgPool, id: WorkerId) -> Result<ScaleBounds, StoreError> {
    let row: Option<(i64, i64, i64)> = sqlx::query_as(LOAD_ONE)
        .bind(id.0)
        .fetch_optional(pool)
        .await
        .map_err(|source| StoreError::Query {
            what: "load the scale settings",
            source,
        })?;
    Ok(row.map_or_else(ScaleBounds::default, |(min, max, per)| {
        ScaleBounds::lenient(min, max, per)
    }))
}

/// Sets a worker's settings; `false` if the worker does not exist.
pub async fn set(pool: &PgPool, id: WorkerId, bounds: ScaleBounds) -> Result<bool, StoreError> {
    let as_int = |v: u32| i32::try_from(v).unwrap_or(i32::MAX);
    let done = sqlx::query(SET)
        .bind(id.0)
        .bind(as_int(bounds.min()))
        .bind(as_int(bounds.max()))
        .bind(as_int(bounds.per_replica()))
        .execute(pool)
        .await
        .map_err(|source| StoreError::Query {
            what: "set the scale settings",
            source,
        })?;
    Ok(done.rows_affected() > 0)
}
