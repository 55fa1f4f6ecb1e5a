//! The writes and look-ups people make, from the command line or the HTTP
//! API: a fail-fast connection, ID|NAME resolution, and the writes (create,
//! update, enable/disable, delete) a dashboard would make.
//!
//! Every command is one statement, or one transaction when it must read
//! before it writes (`update`), so an interrupted command leaves nothing
//! half-written. Reads for people go through [`super::overview`]. PassPlan
//! (what an update changes) are made by the caller; this file only runs SQL
//! and classifies its errors ([`DbError`]).

use std::time::Duration;

use sqlx::postgres::PgPoolOptions;
use sqlx::{ConnectOptions, Connection, PgPool, Postgres, Transaction};
use uuid::Uuid;

use super::overview::{self, WorkerOverview};
use super::{Failure, StoreError, classify};
use crate::model::WorkerState;

/// A dead or unreachable database must fail a command at once, not hang it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

type Cause = Box<dyn std::error::Error + Send + Sync>;

/// What went wrong talking to the database, or finding a worker in it.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("invalid database_url")]
    Url(#[source] sqlx::Error),
    #[error("cannot reach the database at {at}")]
    Unreachable {
        at: String,
        #[source]
        source: Cause,
    },
    #[error("the database at {at} refused the connection")]
    Refused {
        at: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("the database at {at} has no `user_workers` table")]
    NotMigrated { at: String },
    #[error("database request failed ({what})")]
    Query {
        what: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("no worker named {0:?} (see `workerctl worker list`)")]
    UnknownName(String),
    #[error("no worker has the id {0} (see `workerctl worker list`)")]
    UnknownId(Uuid),
    #[error("{} workers are named {name:?}: {}; use the id", ids.len(), join(ids))]
    AmbiguousName { name: String, ids: Vec<Uuid> },
    #[error("a worker named {name:?} already exists ({id}); choose another name")]
    NameTaken { name: String, id: Uuid },
}

fn join(ids: &[Uuid]) -> String {
    ids.iter()
        .map(Uuid::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// "no answer within 3s", as a cause.
#[derive(Debug, thiserror::Error)]
#[error("no answer within {}", humantime::format_duration(*.0))]
pub(crate) struct NoAnswer(pub Duration);

/// A worker named on the command line, once found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub id: Uuid,
    pub name: String,
}

/// A worker to insert.
#[derive(Clone, Debug)]
pub struct NewWorker {
    pub id: Uuid,
    pub name: String,
    pub description: String,
    pub enabled: bool,
    pub entrypoint: String,
    pub source: Vec<u8>,
}

/// A worker's editable fields as stored, read under a row lock by `update`.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct Current {
    pub name: String,
    pub description: String,
    pub entrypoint: String,
    pub revision: i32,
    pub source: Option<Vec<u8>>,
}

/// What an update writes; `None` leaves a column as it is. A new `source`
/// bumps the revision in the same statement, as the dashboard does.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub name: Option<String>,
    pub description: Option<String>,
    pub entrypoint: Option<String>,
    pub source: Option<Vec<u8>>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        *self == Changes::default()
    }
}

/// Size and digest of a worker's code, for `show`.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct CodeSummary {
    pub bytes: Option<i64>,
    pub sha256: Option<String>,
    pub source: Option<Vec<u8>>,
}

/// The database people's commands use.
#[derive(Clone, Debug)]
pub struct Db {
    pool: PgPool,
    /// host:port, for messages (never the URL: it carries the password).
    at: String,
}

/// Connects, failing within [`CONNECT_TIMEOUT`] with the reason when the
/// database does not answer.
pub async fn connect(url: &str) -> Result<Db, DbError> {
    let options = super::postgres::connect_options(url, "workerctl-cli")
        .map_err(DbError::Url)?
        .disable_statement_logging();
    let at = format!("{}:{}", options.get_host(), options.get_port());
    // One plain connection first: a pool retries a refused connection until
    // its timeout and then only says "timed out"; this says why.
    match tokio::time::timeout(CONNECT_TIMEOUT, options.connect()).await {
        Ok(Ok(probe)) => drop(probe.close().await),
        // The server answered, and said no: wrong user, password or database.
        Ok(Err(source @ sqlx::Error::Database(_))) => {
            return Err(DbError::Refused { at, source });
        }
        Ok(Err(e)) => {
            return Err(DbError::Unreachable {
                at,
                source: Box::new(e),
            });
        }
        Err(_) => {
            return Err(DbError::Unreachable {
                at,
                source: Box::new(NoAnswer(CONNECT_TIMEOUT)),
            });
        }
    }
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(CONNECT_TIMEOUT)
        .connect_lazy_with(options);
    Ok(Db { pool, at })
}

impl Db {
    /// On a pool the caller already has (the daemon's, for its HTTP API).
    pub fn from_pool(pool: PgPool) -> Db {
        let options = pool.connect_options();
        let at = format!("{}:{}", options.get_host(), options.get_port());
        Db { pool, at }
    }

    /// The pool, for statements that live in [`crate::store`].
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// A UUID is looked up as an id, anything else as an exact name.
    pub(crate) async fn resolve(&self, worker: &str) -> Result<Target, DbError> {
        if let Ok(id) = Uuid::parse_str(worker) {
            let name: Option<(String,)> =
                sqlx::query_as("SELECT COALESCE(name::text, '') FROM user_workers WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(|e| self.failed("look up the worker", e))?;
            return match name {
                Some((name,)) => Ok(Target { id, name }),
                None => Err(DbError::UnknownId(id)),
            };
        }
        let ids = self.ids_named(worker).await?;
        match ids.as_slice() {
            [] => Err(DbError::UnknownName(worker.to_string())),
            [id] => Ok(Target {
                id: *id,
                name: worker.to_string(),
            }),
            _ => Err(DbError::AmbiguousName {
                name: worker.to_string(),
                ids,
            }),
        }
    }

    async fn ids_named(&self, name: &str) -> Result<Vec<Uuid>, DbError> {
        let rows: Vec<(Uuid,)> =
            sqlx::query_as("SELECT id FROM user_workers WHERE name = $1 ORDER BY id")
                .bind(name)
                .fetch_all(&self.pool)
                .await
                .map_err(|e| self.failed("look up the worker", e))?;
        Ok(rows.into_iter().map(|(id,)| id).collect())
    }

    pub async fn list(&self) -> Result<Vec<WorkerOverview>, DbError> {
        overview::list(&self.pool)
            .await
            .map_err(|e| self.store_failed(e))
    }

    pub(crate) async fn overview(&self, id: Uuid) -> Result<Option<WorkerOverview>, DbError> {
        overview::get(&self.pool, id)
            .await
            .map_err(|e| self.store_failed(e))
    }

    pub async fn code(&self, id: Uuid) -> Result<Option<CodeSummary>, DbError> {
        sqlx::query_as(
            "SELECT octet_length(source)::int8 AS bytes,
                    encode(sha256(source), 'hex') AS sha256,
                    source
               FROM user_workers WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.failed("load the worker's code", e))
    }

    /// Inserts the worker unless another one already has its name.
    pub async fn create(&self, new: &NewWorker) -> Result<(), DbError> {
        let state = if new.enabled { "enabled" } else { "disabled" };
        let info = if new.enabled {
            "created; waiting for workerctl to start revision 1"
        } else {
            "created disabled"
        };
        // One statement: the name check and the insert cannot be split.
        let inserted = sqlx::query(
            "INSERT INTO user_workers
                    (id, name, description, state, language, revision, status, status_info, source, entrypoint)
             SELECT $1, $2, $3, $4, 'python', 1, 'unknown', $5, $6, $7
              WHERE NOT EXISTS (SELECT 1 FROM user_workers WHERE name = $2)",
        )
        .bind(new.id)
        .bind(&new.name)
        .bind(&new.description)
        .bind(state)
        .bind(info)
        .bind(&new.source)
        .bind(&new.entrypoint)
        .execute(&self.pool)
        .await
        .map_err(|e| self.failed("create the worker", e))?;
        if inserted.rows_affected() == 1 {
            return Ok(());
        }
        let id = self.ids_named(&new.name).await?.first().copied();
        Err(DbError::NameTaken {
            name: new.name.clone(),
            id: id.unwrap_or(Uuid::nil()),
        })
    }

    /// The worker's stored code, entrypoint and revision (no lock).
    pub async fn current(&self, id: Uuid) -> Result<Option<Current>, DbError> {
        sqlx::query_as(
            "SELECT COALESCE(name::text, '') AS name,
                    COALESCE(description::text, '') AS description,
                    COALESCE(entrypoint::text, '') AS entrypoint,
                    COALESCE(revision, 0) AS revision,
                    source
               FROM user_workers WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.failed("load the worker's code", e))
    }

    /// Reads the worker under a row lock, lets `decide` say what changes, and
    /// writes that, all in one transaction. Returns the changes written and
    /// the revision after them.
    pub async fn update<F, E>(&self, target: &Target, decide: F) -> Result<(Changes, i32), E>
    where
        F: FnOnce(&Current) -> Result<Changes, E>,
        E: From<DbError>,
    {
        let what = "update the worker";
        let mut tx = self.pool.begin().await.map_err(|e| self.failed(what, e))?;
        let current: Option<Current> = sqlx::query_as(
            "SELECT COALESCE(name::text, '') AS name,
                    COALESCE(description::text, '') AS description,
                    COALESCE(entrypoint::text, '') AS entrypoint,
                    COALESCE(revision, 0) AS revision,
                    source
               FROM user_workers WHERE id = $1 FOR UPDATE",
        )
        .bind(target.id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| self.failed(what, e))?;
        let current = current.ok_or(DbError::UnknownId(target.id))?;
        let changes = decide(&current)?;
        if changes.is_empty() {
            return Ok((changes, current.revision));
        }
        if let Some(name) = &changes.name {
            self.check_name_free(&mut tx, name, target.id).await?;
        }
        let revision = self.write_changes(&mut tx, target.id, &changes).await?;
        tx.commit().await.map_err(|e| self.failed(what, e))?;
        Ok((changes, revision))
    }

    async fn check_name_free(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        name: &str,
        id: Uuid,
    ) -> Result<(), DbError> {
        let other: Option<(Uuid,)> =
            sqlx::query_as("SELECT id FROM user_workers WHERE name = $1 AND id <> $2 LIMIT 1")
                .bind(name)
                .bind(id)
                .fetch_optional(&mut **tx)
                .await
                .map_err(|e| self.failed("update the worker", e))?;
        match other {
            Some((other,)) => Err(DbError::NameTaken {
                name: name.to_string(),
                id: other,
            }),
            None => Ok(()),
        }
    }

    /// A code change bumps the revision and resets the status, whose old
    /// value speaks of the previous revision (the daemon's status writes are
    /// conditional on the revision, so a stale one cannot overwrite this).
    async fn write_changes(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        id: Uuid,
        changes: &Changes,
    ) -> Result<i32, DbError> {
        let (revision,): (i32,) = sqlx::query_as(
            "UPDATE user_workers
                SET name        = COALESCE($2, name),
                    description = COALESCE($3, description),
                    entrypoint  = COALESCE($4, entrypoint),
                    source      = COALESCE($5, source),
                    revision    = revision + CASE WHEN $5 IS NULL THEN 0 ELSE 1 END,
                    status      = CASE WHEN $5 IS NULL THEN status ELSE 'unknown' END,
                    status_info = CASE WHEN $5 IS NULL THEN status_info
                                  ELSE 'revision ' || (revision + 1) || ' saved; waiting for workerctl to deploy it' END
              WHERE id = $1
          RETURNING revision",
        )
        .bind(id)
        .bind(&changes.name)
        .bind(&changes.description)
        .bind(&changes.entrypoint)
        .bind(&changes.source)
        .fetch_one(&mut **tx)
        .await
        .map_err(|e| self.failed("update the worker", e))?;
        Ok(revision)
    }

    /// Sets `state`; returns the state before, `None` if the worker is gone.
    /// A real change resets the status, which spoke of the old state.
    pub(crate) async fn set_state(
        &self,
        id: Uuid,
        enabled: bool,
    ) -> Result<Option<WorkerState>, DbError> {
        let (state, info) = if enabled {
            ("enabled", "enabled; waiting for workerctl to start it")
        } else {
            (
                "disabled",
                "disabled; waiting for workerctl to remove its container",
            )
        };
        let old: Option<(String,)> = sqlx::query_as(
            "UPDATE user_workers AS w
                SET state       = $2,
                    status      = CASE WHEN old.state IS DISTINCT FROM $2 THEN 'unknown' ELSE w.status END,
                    status_info = CASE WHEN old.state IS DISTINCT FROM $2 THEN $3 ELSE w.status_info END
               FROM user_workers AS old
              WHERE w.id = $1 AND old.id = w.id
          RETURNING COALESCE(old.state::text, '')",
        )
        .bind(id)
        .bind(state)
        .bind(info)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.failed("change the worker's state", e))?;
        Ok(old.map(|(s,)| WorkerState::from(s)))
    }

    /// Deletes the row; the daemon then removes the container. Returns
    /// whether there was a row.
    pub async fn delete(&self, id: Uuid) -> Result<bool, DbError> {
        let done = sqlx::query("DELETE FROM user_workers WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(|e| self.failed("delete the worker", e))?;
        Ok(done.rows_affected() > 0)
    }

    /// Maps a failed query: a missing table means the migrations never ran,
    /// a lost connection is an unreachable database.
    pub fn failed(&self, what: &'static str, e: sqlx::Error) -> DbError {
        match classify(&e) {
            Failure::NotMigrated => DbError::NotMigrated {
                at: self.at.clone(),
            },
            Failure::Unreachable => DbError::Unreachable {
                at: self.at.clone(),
                source: Box::new(e),
            },
            Failure::Query => DbError::Query { what, source: e },
        }
    }

    pub(crate) fn store_failed(&self, e: StoreError) -> DbError {
        match e {
            StoreError::Query { source, .. } => self.failed("read the workers", source),
            other => DbError::Unreachable {
                at: self.at.clone(),
                source: Box::new(other),
            },
        }
    }
}
