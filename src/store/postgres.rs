//! Postgres implementation of [`super::WorkerStore`] (sqlx), the embedded
//! migrations, and the LISTEN/NOTIFY wake-up source.
//!
//! Every method issues at most one statement whatever the number of workers,
//! and counts it, so a pass costs a constant number of round trips. Queries
//! are built at run time (`sqlx::query`), so building needs no database.
//! This module maps rows to model values; it makes no decisions about them.

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Code, StatusUpdate, StoreError, WorkerStore};
use crate::backoff::{self, error_chain};
use crate::model::Observed;
use crate::model::ScaleBounds;
use crate::model::{Revision, WorkerId, WorkerRow};

/// The channel the `user_workers` trigger notifies (migrations/0003).
pub const CHANNEL: &str = "workerctl_user_workers";

/// How long a query waits for a connection: an unreachable database must fail
/// a pass quickly and say so, not hang it.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// Shown in `pg_stat_activity`, so an operator can tell workerctl's sessions apart.
const APPLICATION_NAME: &str = "workerctl";
const LISTENER_APPLICATION_NAME: &str = "workerctl-listener";

/// Retry delays of the listener: first retry soon, never more than this apart.
const LISTEN_BACKOFF_MIN: Duration = Duration::from_millis(500);
const LISTEN_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A LISTEN session that lasted this long was healthy: the next failure starts
/// the backoff again from the minimum. Shorter sessions keep doubling it, so a
/// connection that drops right after connecting cannot make us spin.
const LISTEN_STABLE: Duration = Duration::from_secs(30);

/// The worker store on Postgres. Clones share the pool and the statement count.
#[derive(Clone, Debug)]
pub struct PgStore {
    pool: PgPool,
    statements: Arc<AtomicU64>,
}

impl PgStore {
    /// A store on `url`. Connections are made on first use, so this fails only
    /// for a malformed URL; an unreachable database fails the first query
    /// within [`ACQUIRE_TIMEOUT`].
    pub fn connect(url: &str) -> Result<Self, StoreError> {
        let options = connect_options(url, APPLICATION_NAME).map_err(StoreError::Connect)?;
        let pool = PgPoolOptions::new()
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_lazy_with(options);
        Ok(Self::from_pool(pool))
    }

    /// A store on an existing pool (tests, or a caller that tunes the pool).
    pub fn from_pool(pool: PgPool) -> Self {
        PgStore {
            pool,
            statements: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies the embedded migrations. Safe to run at every start and from
    /// two daemons at once (sqlx serialises them with an advisory lock).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("./migrations")
            .run(&self.pool)
            .await
            .map_err(StoreError::Migrate)
    }

    /// Whether the database answers (`SELECT 1`), for readiness probes.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(drop)
            .map_err(|source| StoreError::Query {
                what: "ping",
                source,
            })
    }

    /// How many statements the [`WorkerStore`] methods have issued so far
    /// (migrations not included): a benchmark compares it before and after a pass.
    pub fn statements(&self) -> u64 {
        self.statements.load(Ordering::Relaxed)
    }

    fn count_statement(&self) {
        self.statements.fetch_add(1, Ordering::Relaxed);
    }
}

/// The connection options of every workerctl session: the URL, and a name in
/// `pg_stat_activity` that tells an operator which part of workerctl it is.
pub fn connect_options(url: &str, application_name: &str) -> Result<PgConnectOptions, sqlx::Error> {
    Ok(PgConnectOptions::from_str(url)?.application_name(application_name))
}

/// Every column is COALESCEd and cast so that hand-edited or legacy rows
/// (NULLs, other column types) still load and are judged by the model, rather
/// than failing the whole pass. The code itself stays in the database: only
/// its size, zip signature and digest travel.
const LOAD_WORKERS: &str = r"
SELECT w.id,
       COALESCE(name::text, '')              AS name,
       COALESCE(state::text, '')             AS state,
       COALESCE(language::text, '')          AS language,
       COALESCE(revision, 0)::int4           AS revision,
       COALESCE(entrypoint::text, '')        AS entrypoint,
       COALESCE(status::text, 'unknown')     AS status,
       COALESCE(status_info::text, '')       AS status_info,
       octet_length(source)::int8            AS source_len,
       COALESCE(substring(source from 1 for 4) = '\x504b0304'::bytea, false) AS source_is_zip,
       encode(sha256(source), 'hex')         AS source_sha256,
       COALESCE(workerctl_code_token(w.id), '') AS code_token,
       COALESCE(s.min_replicas, 1)::int8     AS min_replicas,
       COALESCE(s.max_replicas, 1)::int8     AS max_replicas,
       COALESCE(s.per_replica, 20)::int8     AS per_replica,
       d.worker_id IS NOT NULL               AS debug
  FROM user_workers w
  LEFT JOIN workerctl_worker_scale s ON s.worker_id = w.id
  LEFT JOIN workerctl_worker_debug d ON d.worker_id = w.id
 ORDER BY w.id";

/// The revision condition makes a status decided for an older revision a
/// no-op; the IS DISTINCT FROM makes an unchanged status no write at all.
const WRITE_STATUSES: &str = r"
UPDATE user_workers AS w
   SET status = u.status, status_info = u.info
  FROM unnest($1::uuid[], $2::int4[], $3::text[], $4::text[]) AS u(id, revision, status, info)
 WHERE w.id = u.id
   AND w.revision = u.revision
   AND (w.status::text, w.status_info::text) IS DISTINCT FROM (u.status, u.info)";

/// `updated_at` is when the observation last changed: an unchanged one is not
/// rewritten, so an idle pass writes nothing.
const WRITE_OBSERVED: &str = r"
INSERT INTO workerctl_observed AS o
       (worker_id, running_revision, container, container_state, restarts, last_exit_code,
        desired_replicas, running_replicas)
SELECT * FROM unnest($1::uuid[], $2::int4[], $3::text[], $4::text[], $5::int4[], $6::int8[],
                     $7::int4[], $8::int4[])
ON CONFLICT (worker_id) DO UPDATE
   SET running_revision = EXCLUDED.running_revision,
       container        = EXCLUDED.container,
       container_state  = EXCLUDED.container_state,
       restarts         = EXCLUDED.restarts,
       last_exit_code   = EXCLUDED.last_exit_code,
       desired_replicas = EXCLUDED.desired_replicas,
       running_replicas = EXCLUDED.running_replicas,
       updated_at       = now()
 WHERE (o.running_revision, o.container, o.container_state, o.restarts, o.last_exit_code,
        o.desired_replicas, o.running_replicas)
       IS DISTINCT FROM
       (EXCLUDED.running_revision, EXCLUDED.container, EXCLUDED.container_state,
        EXCLUDED.restarts, EXCLUDED.last_exit_code, EXCLUDED.desired_replicas,
        EXCLUDED.running_replicas)";

/// Only what the code server may hand out: enabled python workers with code,
/// to whoever presents the worker's token (see migrations/0004).
const LOAD_CODE: &str = r"
SELECT revision, source
  FROM user_workers
 WHERE id = $1 AND state = 'enabled' AND language = 'python' AND source IS NOT NULL
   AND $2 = workerctl_code_token(id)";

/// One row of [`LOAD_WORKERS`].
#[derive(sqlx::FromRow)]
struct WorkerRecord {
    id: Uuid,
    name: String,
    state: String,
    language: String,
    revision: i32,
    entrypoint: String,
    status: String,
    status_info: String,
    source_len: Option<i64>,
    source_is_zip: bool,
    source_sha256: Option<String>,
    code_token: String,
    min_replicas: i64,
    max_replicas: i64,
    per_replica: i64,
    debug: bool,
}

impl From<WorkerRecord> for WorkerRow {
    fn from(r: WorkerRecord) -> Self {
        WorkerRow {
            id: WorkerId(r.id),
            name: r.name,
            state: r.state,
            language: r.language,
            revision: Revision(r.revision),
            entrypoint: r.entrypoint,
            status: r.status,
            status_info: r.status_info,
            source_len: r.source_len,
            source_is_zip: r.source_is_zip,
            source_sha256: r.source_sha256,
            code_token: r.code_token,
            scale: ScaleBounds::lenient(r.min_replicas, r.max_replicas, r.per_replica),
            debug: r.debug,
        }
    }
}

impl WorkerStore for PgStore {
    async fn load_workers(&self) -> Result<Vec<WorkerRow>, StoreError> {
        self.count_statement();
        let records: Vec<WorkerRecord> = sqlx::query_as(LOAD_WORKERS)
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::LoadWorkers)?;
        Ok(records.into_iter().map(WorkerRow::from).collect())
    }

    async fn write_statuses(&self, updates: &[StatusUpdate]) -> Result<u64, StoreError> {
        if updates.is_empty() {
            return Ok(0);
        }
        self.count_statement();
        let result = sqlx::query(WRITE_STATUSES)
            .bind(updates.iter().map(|u| u.id.0).collect::<Vec<_>>())
            .bind(updates.iter().map(|u| u.revision.0).collect::<Vec<_>>())
            .bind(
                updates
                    .iter()
                    .map(|u| u.status.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(updates.iter().map(|u| u.info.as_str()).collect::<Vec<_>>())
            .execute(&self.pool)
            .await
            .map_err(StoreError::WriteStatus)?;
        Ok(result.rows_affected())
    }

    async fn write_observed(&self, observed: &[Observed]) -> Result<(), StoreError> {
        let observed = last_per_worker(observed);
        if observed.is_empty() {
            return Ok(());
        }
        self.count_statement();
        sqlx::query(WRITE_OBSERVED)
            .bind(observed.iter().map(|o| o.id.0).collect::<Vec<_>>())
            .bind(
                observed
                    .iter()
                    .map(|o| o.running_revision.map(|r| r.0))
                    .collect::<Vec<_>>(),
            )
            .bind(
                observed
                    .iter()
                    .map(|o| o.container.as_deref())
                    .collect::<Vec<_>>(),
            )
            .bind(
                observed
                    .iter()
                    .map(|o| o.container_state.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(observed.iter().map(|o| o.restarts).collect::<Vec<_>>())
            .bind(
                observed
                    .iter()
                    .map(|o| o.last_exit_code)
                    .collect::<Vec<_>>(),
            )
            .bind(
                observed
                    .iter()
                    .map(|o| o.desired_replicas)
                    .collect::<Vec<_>>(),
            )
            .bind(
                observed
                    .iter()
                    .map(|o| o.running_replicas)
                    .collect::<Vec<_>>(),
            )
            .execute(&self.pool)
            .await
            .map_err(StoreError::WriteObserved)?;
        Ok(())
    }

    async fn load_code(&self, id: WorkerId, token: &str) -> Result<Option<Code>, StoreError> {
        self.count_statement();
        let row: Option<(i32, Vec<u8>)> = sqlx::query_as(LOAD_CODE)
            .bind(id.0)
            .bind(token)
            .fetch_optional(&self.pool)
            .await
            .map_err(|source| StoreError::LoadCode { id, source })?;
        Ok(row.map(|(revision, source)| Code {
            revision: Revision(revision),
            source,
        }))
    }
}

/// One observation per worker, the last given: an upsert may not touch the
/// same row twice in one statement.
fn last_per_worker(observed: &[Observed]) -> Vec<&Observed> {
    let mut seen = std::collections::HashSet::new();
    let mut kept: Vec<&Observed> = observed
        .iter()
        .rev()
        .filter(|o| seen.insert(o.id))
        .collect();
    kept.reverse();
    kept
}

/// Why one LISTEN session ended.
#[derive(Debug, thiserror::Error)]
enum ListenError {
    #[error("cannot connect to the database and LISTEN on {CHANNEL}")]
    Subscribe(#[source] sqlx::Error),
    #[error("the LISTEN connection was closed")]
    Closed,
    #[error("cannot receive notifications")]
    Receive(#[source] sqlx::Error),
}

/// Why the listener wakes the controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Wake {
    /// A NOTIFY arrived: a statement changed `user_workers`.
    Changed,
    /// The listener (re)connected: changes made meanwhile were not announced.
    Connected,
}

/// Wakes the controller (`wake.notify_one()`) on every change notification
/// from the `user_workers` trigger, and on every (re)connection, until
/// `shutdown` is cancelled. See [`listen_with`].
pub async fn listen(url: String, wake: Arc<Notify>, shutdown: CancellationToken) {
    listen_with(url, shutdown, move |_| wake.notify_one()).await;
}

/// Calls `on_wake` for every change notification from the `user_workers`
/// trigger, until `shutdown` is cancelled; for callers that also count changes.
///
/// Runs forever otherwise: a lost or refused connection is logged and retried
/// with capped exponential backoff. Notifications sent while disconnected are
/// lost, so every (re)connection calls `on_wake(Wake::Connected)` as well; the
/// periodic resync remains the safety net. Never panics, never returns an error.
pub(crate) async fn listen_with<F>(url: String, shutdown: CancellationToken, on_wake: F)
where
    F: Fn(Wake) + Send + Sync + 'static,
{
    let mut failures = 0u32;
    loop {
        let started = Instant::now();
        // On shutdown the session is dropped, and its connection with it;
        // nothing it holds needs finishing.
        let ended = tokio::select! {
            () = shutdown.cancelled() => return,
            ended = listen_session(&url, &on_wake) => ended,
        };
        if started.elapsed() >= LISTEN_STABLE {
            failures = 0;
        }
        let delay = backoff::delay(LISTEN_BACKOFF_MIN, LISTEN_BACKOFF_MAX, failures);
        failures = failures.saturating_add(1);
        tracing::warn!(error = %error_chain(&ended), retry_in = ?delay, "database listener interrupted");
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// One connection: subscribe, wake once (anything may have changed while we
/// were not listening), then forward notifications until the connection fails.
async fn listen_session(url: &str, on_wake: &impl Fn(Wake)) -> ListenError {
    let mut listener = match subscribe(url).await {
        Ok(listener) => listener,
        Err(e) => return ListenError::Subscribe(e),
    };
    tracing::info!(channel = CHANNEL, "listening for worker changes");
    on_wake(Wake::Connected);
    loop {
        match listener.try_recv().await {
            Ok(Some(_)) => on_wake(Wake::Changed),
            Ok(None) => return ListenError::Closed,
            Err(e) => return ListenError::Receive(e),
        }
    }
}

/// A listener on its own one-connection pool, so that its connection attempts
/// share the store's fail-fast timeout, and a lost connection is reported to
/// us (not silently re-made) so that we can wake the controller.
async fn subscribe(url: &str) -> Result<PgListener, sqlx::Error> {
    let options = connect_options(url, LISTENER_APPLICATION_NAME)?;
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .max_lifetime(None)
        .idle_timeout(None)
        .connect_lazy_with(options);
    let mut listener = PgListener::connect_with(&pool).await?;
    listener.eager_reconnect(false);
    listener.listen(CHANNEL).await?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Revision;

    fn observed(id: u128, state: &str) -> Observed {
        Observed {
            id: WorkerId(Uuid::from_u128(id)),
            running_revision: Some(Revision(1)),
            container: None,
            container_state: state.into(),
            restarts: 0,
            last_exit_code: None,
            desired_replicas: 1,
            running_replicas: 1,
        }
    }

    #[test]
    fn the_last_observation_of_a_worker_wins() {
        let batch = [observed(1, "old"), observed(2, "b"), observed(1, "new")];
        let kept = last_per_worker(&batch);
        let states: Vec<_> = kept.iter().map(|o| o.container_state.as_str()).collect();
        assert_eq!(states, ["b", "new"]);
    }

    #[test]
    fn an_error_chain_names_every_cause() {
        let err = ListenError::Receive(sqlx::Error::PoolTimedOut);
        let text = error_chain(&err);
        assert!(text.starts_with("cannot receive notifications: "), "{text}");
        assert!(
            text.len() > "cannot receive notifications: ".len(),
            "{text}"
        );
    }
}
