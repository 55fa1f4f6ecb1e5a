//! The worker store boundary: everything workerctl reads from or writes to
//! Postgres goes through [`WorkerStore`]. The reconciler sees rows as
//! [`WorkerRow`] values and never builds SQL; `postgres.rs` is the one real
//! implementation.
//!
//! Beside it: `admin.rs` (the writes and look-ups people make), `overview.rs`
//! (the read model people look at), `schedules.rs`, `dead_letters.rs` and `recorded.rs`
//! (workerctl's own tables for triggers). Only this module speaks SQL.

pub mod admin;
pub mod dead_letters;
pub mod debug;
pub mod overview;
pub mod postgres;
pub mod recorded;
pub mod scale;
pub mod schedules;

use std::future::Future;

use crate::model::{Observed, Revision, Status, WorkerId, WorkerRow};

/// A status the reconciler wants recorded for one worker, valid only for the
/// revision it was decided for: a write for an older revision is a no-op.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusUpdate {
    pub id: WorkerId,
    pub revision: Revision,
    pub status: Status,
    pub info: String,
}

/// A worker's code, as served to its container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Code {
    pub revision: Revision,
    pub source: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot reach the database")]
    Connect(#[source] sqlx::Error),
    #[error("cannot apply the database migrations")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    #[error("cannot load the workers")]
    LoadWorkers(#[source] sqlx::Error),
    #[error("cannot load the code of worker {id}")]
    LoadCode {
        id: WorkerId,
        #[source]
        source: sqlx::Error,
    },
    #[error("cannot record worker statuses")]
    WriteStatus(#[source] sqlx::Error),
    #[error("cannot record observed container state")]
    WriteObserved(#[source] sqlx::Error),
    #[error("database query failed: {what}")]
    Query {
        what: &'static str,
        #[source]
        source: sqlx::Error,
    },
}

/// Postgres' code for "relation does not exist": the migrations never ran.
const UNDEFINED_TABLE: &str = "42P01";

/// What kind of failure a query met, for saying what to do about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Failure {
    /// A table is missing: the migrations never ran on this database.
    NotMigrated,
    /// The connection failed or none could be had: the database is away.
    Unreachable,
    /// The database answered, and refused the statement.
    Query,
}

/// The one classification of sqlx errors that every caller shares.
pub(crate) fn classify(e: &sqlx::Error) -> Failure {
    let code = e.as_database_error().and_then(|d| d.code());
    if code.as_deref() == Some(UNDEFINED_TABLE) {
        return Failure::NotMigrated;
    }
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Tls(_) => Failure::Unreachable,
        _ => Failure::Query,
    }
}

/// The reconciler's view of Postgres. Every method is one SQL statement, so
/// a pass makes a constant number of them whatever the worker count.
pub trait WorkerStore: Send + Sync + 'static {
    /// Every row of `user_workers`, without the code itself.
    fn load_workers(&self) -> impl Future<Output = Result<Vec<WorkerRow>, StoreError>> + Send;

    /// Records statuses, each only if the row is still at that revision.
    /// Returns how many rows changed.
    fn write_statuses(
        &self,
        updates: &[StatusUpdate],
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Upserts observed container state.
    fn write_observed(
        &self,
        observed: &[Observed],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The code of an enabled python worker, for the holder of its token;
    /// `None` if unknown, disabled, or the token is wrong.
    fn load_code(
        &self,
        id: WorkerId,
        token: &str,
    ) -> impl Future<Output = Result<Option<Code>, StoreError>> + Send;
}
