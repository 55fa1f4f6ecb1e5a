//! `workerctl_recorded_messages` (migrations/0032): the last messages each
//! worker received, as received, with what each produced where it could be
//! matched. The recorder (src/recorder.rs) inserts what it reads from a
//! worker's tap and matches outputs, each time one of `workerctl worker
//! messages`, `worker try` or the status page asks; they then read here. Plain SQL and row mapping: what to record is decided by the callers.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use super::StoreError;

/// One input message as the tap delivered it, or as its worker recorded it.
#[derive(Clone, Debug, PartialEq)]
pub struct NewRecording {
    pub worker_id: Uuid,
    pub received_at: DateTime<Utc>,
    pub routing_key: String,
    pub message_id: Option<String>,
    pub tracing_id: Option<String>,
    pub body: Vec<u8>,
    /// What it produced, when the worker recorded that itself (a copy in a
    /// tap has none: outputs are matched to it later, [`match_outputs`]).
    pub output: Option<Produced>,
    /// The key the worker runtime gave it, when it recorded it itself
    /// (migrations/0034): stored once, however often it is read.
    pub record_key: Option<String>,
}

/// What a worker published for a recorded input, and when.
#[derive(Clone, Debug, PartialEq)]
pub struct Produced {
    pub routing_key: String,
    pub body: Vec<u8>,
    pub at: DateTime<Utc>,
}

/// What a worker published for an input with `tracing_id`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct NewOutput {
    pub worker_id: Uuid,
    pub tracing_id: String,
    pub routing_key: String,
    pub body: Vec<u8>,
    pub at: DateTime<Utc>,
}

/// A stored recording.
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow)]
pub struct Recording {
    pub id: i64,
    pub worker_id: Uuid,
    pub received_at: DateTime<Utc>,
    pub routing_key: String,
    pub message_id: Option<String>,
    pub tracing_id: Option<String>,
    #[serde(skip)]
    pub body: Vec<u8>,
    pub output_key: Option<String>,
    #[serde(skip)]
    pub output_body: Option<Vec<u8>>,
    pub output_at: Option<DateTime<Utc>>,
}

const SELECT: &str = "
    SELECT id, worker_id, received_at, routing_key, message_id, tracing_id, body,
           output_key, output_body, output_at
      FROM workerctl_recorded_messages";

fn query_failed(what: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| StoreError::Query { what, source }
}

/// The ids of the enabled workers: the ones whose traffic is recorded.
pub(crate) async fn enabled_workers(pool: &PgPool) -> Result<Vec<Uuid>, StoreError> {
    sqlx::query_scalar("SELECT id FROM user_workers WHERE state = 'enabled' ORDER BY id")
        .fetch_all(pool)
        .await
        .map_err(query_failed("list the enabled workers"))
}

/// Takes the lock that serialises the readers of one worker's tap (the
/// daemon, `worker messages`, `worker try`), held until the returned
/// transaction ends: two readers of one tap would each see part of it.
pub(crate) async fn lock_tap(
    pool: &PgPool,
    worker: Uuid,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, StoreError> {
    let mut tx = pool
        .begin()
        .await
        .map_err(query_failed("begin reading a recording tap"))?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(format!("workerctl.record.{worker}"))
        .execute(&mut *tx)
        .await
        .map_err(query_failed("lock a recording tap"))?;
    Ok(tx)
}

/// Stores a batch of inputs (one statement), then drops, for each worker in
/// it, all but its newest `keep` (one statement).
pub async fn insert(pool: &PgPool, batch: &[NewRecording], keep: i64) -> Result<(), StoreError> {
    if batch.is_empty() {
        return Ok(());
    }
    let mut tx = pool
        .begin()
        .await
        .map_err(query_failed("begin a recording batch"))?;
    insert_on(&mut tx, batch, keep).await?;
    tx.commit()
        .await
        .map_err(query_failed("commit recorded messages"))
}

/// [`insert`] on a connection (the reader's, which holds its tap's lock in
/// a transaction).
pub(crate) async fn insert_on(
    conn: &mut sqlx::PgConnection,
    batch: &[NewRecording],
    keep: i64,
) -> Result<(), StoreError> {
    if batch.is_empty() {
        return Ok(());
    }
    let workers: Vec<Uuid> = batch.iter().map(|r| r.worker_id).collect();
    let times: Vec<DateTime<Utc>> = batch.iter().map(|r| r.received_at).collect();
    let keys: Vec<String> = batch.iter().map(|r| r.routing_key.clone()).collect();
    let ids: Vec<Option<String>> = batch.iter().map(|r| r.message_id.clone()).collect();
    let traces: Vec<Option<String>> = batch.iter().map(|r| r.tracing_id.clone()).collect();
    let bodies: Vec<Vec<u8>> = batch.iter().map(|r| r.body.clone()).collect();
    let outputs = batch.iter().map(|r| r.output.as_ref());
    let output_keys: Vec<Option<String>> = outputs
        .clone()
        .map(|o| o.map(|o| o.routing_key.clone()))
        .collect();
    let output_bodies: Vec<Option<Vec<u8>>> =
        outputs.clone().map(|o| o.map(|o| o.body.clone())).collect();
    let output_times: Vec<Option<DateTime<Utc>>> = outputs.map(|o| o.map(|o| o.at)).collect();
    let record_keys: Vec<Option<String>> = batch.iter().map(|r| r.record_key.clone()).collect();
    sqlx::query(
        "INSERT INTO workerctl_recorded_messages
                (worker_id, received_at, routing_key, message_id, tracing_id, body,
                 output_key, output_body, output_at, record_key)
         SELECT * FROM UNNEST($1::uuid[], $2::timestamptz[], $3::text[], $4::text[],
                              $5::text[], $6::bytea[], $7::text[], $8::bytea[],
                              $9::timestamptz[], $10::text[])
         ON CONFLICT (worker_id, record_key) WHERE record_key IS NOT NULL DO NOTHING",
    )
    .bind(&workers)
    .bind(&times)
    .bind(&keys)
    .bind(&ids)
    .bind(&traces)
    .bind(&bodies)
    .bind(&output_keys)
    .bind(&output_bodies)
    .bind(&output_times)
    .bind(&record_keys)
    .execute(&mut *conn)
    .await
    .map_err(query_failed("store recorded messages"))?;
    let mut distinct = workers;
    distinct.sort();
    distinct.dedup();
    sqlx::query(
        "DELETE FROM workerctl_recorded_messages
          WHERE id IN (SELECT id FROM (
                  SELECT id, row_number() OVER (PARTITION BY worker_id ORDER BY id DESC) AS n
                    FROM workerctl_recorded_messages
                   WHERE worker_id = ANY($1)) r
                 WHERE r.n > $2)",
    )
    .bind(&distinct)
    .bind(keep)
    .execute(&mut *conn)
    .await
    .map_err(query_failed("prune recorded messages"))?;
    Ok(())
}

/// Attaches each output to the newest recording of its worker and tracing
/// id that has none yet (one statement). Returns the indexes in `outputs`
/// that found their input.
pub(crate) async fn match_outputs(
    pool: &PgPool,
    outputs: &[NewOutput],
) -> Result<Vec<usize>, StoreError> {
    if outputs.is_empty() {
        return Ok(Vec::new());
    }
    let index: Vec<i32> = (0..outputs.len())
        .map(|i| i32::try_from(i).unwrap_or(i32::MAX))
        .collect();
    let workers: Vec<Uuid> = outputs.iter().map(|o| o.worker_id).collect();
    let traces: Vec<String> = outputs.iter().map(|o| o.tracing_id.clone()).collect();
    let keys: Vec<String> = outputs.iter().map(|o| o.routing_key.clone()).collect();
    let bodies: Vec<Vec<u8>> = outputs.iter().map(|o| o.body.clone()).collect();
    let times: Vec<DateTime<Utc>> = outputs.iter().map(|o| o.at).collect();
    let matched: Vec<i32> = sqlx::query_scalar(
        "WITH o AS (
              SELECT * FROM UNNEST($1::int[], $2::uuid[], $3::text[], $4::text[], $5::bytea[],
                                   $6::timestamptz[]) AS o(i, worker_id, tracing_id, key, body, at)),
              m AS (
              SELECT DISTINCT ON (r.worker_id, r.tracing_id) r.id, o.i, o.key, o.body, o.at
                FROM workerctl_recorded_messages r
                JOIN o ON r.worker_id = o.worker_id AND r.tracing_id = o.tracing_id
               WHERE r.output_key IS NULL
               ORDER BY r.worker_id, r.tracing_id, r.id DESC)
         UPDATE workerctl_recorded_messages t
            SET output_key = m.key, output_body = m.body, output_at = m.at
           FROM m WHERE t.id = m.id
         RETURNING m.i",
    )
    .bind(&index)
    .bind(&workers)
    .bind(&traces)
    .bind(&keys)
    .bind(&bodies)
    .bind(&times)
    .fetch_all(pool)
    .await
    .map_err(query_failed("match outputs to recorded messages"))?;
    Ok(matched
        .into_iter()
        .filter_map(|i| usize::try_from(i).ok())
        .collect())
}

/// A worker's newest `last` recordings, newest first.
pub async fn list(pool: &PgPool, worker: Uuid, last: i64) -> Result<Vec<Recording>, StoreError> {
    let mut conn = pool
        .acquire()
        .await
        .map_err(query_failed("list recorded messages"))?;
    list_on(&mut conn, worker, last).await
}

/// [`list`] on a connection.
pub(crate) async fn list_on(
    conn: &mut sqlx::PgConnection,
    worker: Uuid,
    last: i64,
) -> Result<Vec<Recording>, StoreError> {
    let sql = format!("{SELECT} WHERE worker_id = $1 ORDER BY id DESC LIMIT $2");
    sqlx::query_as(&sql)
        .bind(worker)
        .bind(last)
        .fetch_all(conn)
        .await
        .map_err(query_failed("list recorded messages"))
}

/// The keys of a worker's stored recordings that have one (those its
/// runtime made itself), at most as many as it keeps.
pub(crate) async fn keys_on(
    conn: &mut sqlx::PgConnection,
    worker: Uuid,
) -> Result<Vec<String>, StoreError> {
    sqlx::query_scalar(
        "SELECT record_key FROM workerctl_recorded_messages
          WHERE worker_id = $1 AND record_key IS NOT NULL",
    )
    .bind(worker)
    .fetch_all(conn)
    .await
    .map_err(query_failed("list the keys of recorded messages"))
}

/// One recording of a worker.
pub async fn get(pool: &PgPool, worker: Uuid, id: i64) -> Result<Option<Recording>, StoreError> {
    let sql = format!("{SELECT} WHERE worker_id = $1 AND id = $2");
    sqlx::query_as(&sql)
        .bind(worker)
        .bind(id)
        .fetch_optional(pool)
        .await
        .map_err(query_failed("load a recorded message"))
}

/// The newest `per_worker` recordings of every worker, newest first, for
/// the status page.
pub async fn recent(pool: &PgPool, per_worker: i64) -> Result<Vec<Recording>, StoreError> {
    let sql = format!(
        "{SELECT}
          WHERE id IN (SELECT id FROM (
                  SELECT id, row_number() OVER (PARTITION BY worker_id ORDER BY id DESC) AS n
                    FROM workerctl_recorded_messages) r
                 WHERE r.n <= $1)
          ORDER BY id DESC"
    );
    sqlx::query_as(&sql)
        .bind(per_worker)
        .fetch_all(pool)
        .await
        .map_err(query_failed("list recent recorded messages"))
}

/// How many recordings a worker has (tests and benchmarks).
pub async fn count(pool: &PgPool, worker: Uuid) -> Result<i64, StoreError> {
    sqlx::query_scalar("SELECT count(*) FROM workerctl_recorded_messages WHERE worker_id = $1")
        .bind(worker)
        .fetch_one(pool)
        .await
        .map_err(query_failed("count recorded messages"))
}
