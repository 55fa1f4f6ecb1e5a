//! Which workers run a debug adapter (`workerctl_worker_debug`,
//! migrations/0033): a row while `workerctl worker dev --debug` runs for
//! the worker. The daemon reads it with the workers ([`super::postgres`]);
//! this file holds the writes of the CLI.

use sqlx::PgPool;

use super::StoreError;
use crate::model::WorkerId;

/// Holding the worker's row (FOR KEY SHARE) while inserting means a
/// concurrent DELETE waits for this insert and its trigger then removes
/// the row: no row outlives its worker. No row: the worker is gone.
const ON: &str = "
INSERT INTO workerctl_worker_debug (worker_id)
SELECT w.id FROM user_workers w WHERE w.id = $1 FOR KEY SHARE
ON CONFLICT (worker_id) DO NOTHING";

const OFF: &str = "DELETE FROM workerctl_worker_debug WHERE worker_id = $1";

const IS_ON: &str = "
SELECT EXISTS (SELECT 1 FROM workerctl_worker_debug d
                 JOIN user_workers w ON w.id = d.worker_id
                WHERE d.worker_id = $1)";

/// Turns the debug adapter of a worker's containers on or off. `false`
/// when turning it on for a worker that does not exist.
pub async fn set(pool: &PgPool, id: WorkerId, on: bool) -> Result<bool, StoreError> {
    let what = if on {
        "turn debugging on"
    } else {
        "turn debugging off"
    };
    let query = if on { ON } else { OFF };
    let done = sqlx::query(query)
        .bind(id.0)
        .execute(pool)
        .await
        .map_err(|source| StoreError::Query { what, source })?;
    // ON CONFLICT DO NOTHING affects no row when it was on already.
    Ok(!on || done.rows_affected() > 0 || is_on(pool, id).await?)
}

/// Whether the worker's containers run a debug adapter.
pub(crate) async fn is_on(pool: &PgPool, id: WorkerId) -> Result<bool, StoreError> {
    sqlx::query_scalar(IS_ON)
        .bind(id.0)
        .fetch_one(pool)
        .await
        .map_err(|source| StoreError::Query {
            what: "read whether debugging is on",
            source,
        })
}
