//! What can go wrong in a worker command, as one line a person can act on,
//! and the exit code each kind of failure gets (documented in `--help`).
//!
//! Every variant names what failed; the cause is kept as `#[source]` and a
//! hint (what to do) is added when printed, so the line reads
//! "what: cause — what to do".

use std::fmt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use uuid::Uuid;

use crate::store::StoreError;
use crate::store::admin::{Db, DbError};
use crate::triggers::amqp::AmqpError;

/// Exit codes of `workerctl worker …`.
pub mod exit {
    /// The worker failed: `invoke` received an error body, `--wait` saw status 'error'.
    pub(crate) const WORKER_FAILED: u8 = 1;
    /// The input is wrong: unknown or ambiguous worker, unreadable file, bad code or message.
    pub(crate) const BAD_INPUT: u8 = 2;
    /// Nothing came within the time allowed (`invoke --timeout`, `--wait-timeout`).
    pub(crate) const TIMEOUT: u8 = 3;
    /// A service (Postgres, Docker, RabbitMQ) did not answer or refused a request.
    pub(crate) const UNAVAILABLE: u8 = 4;
}

/// The `--help` text that documents [`exit`].
pub(crate) const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  done (invoke: a result came out on the next step)
  1  the worker failed (invoke: an error body came out on `errors`; --wait: status error)
  2  wrong input: unknown or ambiguous worker, unreadable file, bad code or message
  3  timed out (invoke --timeout, --wait-timeout)
  4  a service did not answer: Postgres, Docker or RabbitMQ";

type Cause = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub(crate) enum CliError {
    #[error("no worker named {0:?} (see `workerctl worker list`)")]
    UnknownName(String),
    #[error("no worker has the id {0} (see `workerctl worker list`)")]
    UnknownId(Uuid),
    #[error("{} workers are named {name:?}: {}; use the id", ids.len(), join(ids))]
    AmbiguousName { name: String, ids: Vec<Uuid> },
    #[error("a worker named {name:?} already exists ({id}); choose another name")]
    NameTaken { name: String, id: Uuid },
    #[error("{0}")]
    BadArgument(String),
    #[error("cannot read {}", path.display())]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {problem}", path.display())]
    BadCode { path: PathBuf, problem: String },
    #[error("{}: {problem}", path.display())]
    BadMessage { path: PathBuf, problem: String },
    #[error("invalid database_url")]
    DatabaseUrl(#[source] sqlx::Error),
    #[error("cannot reach the database at {at}")]
    Database {
        at: String,
        #[source]
        source: Cause,
    },
    #[error("the database at {at} refused the connection")]
    DatabaseRefused {
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
    #[error("cannot reach the Docker engine")]
    Docker(#[source] Cause),
    /// Docker answered, and said no.
    #[error("Docker refused to {what}")]
    DockerRefused {
        what: &'static str,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("cannot reach RabbitMQ at {at}")]
    Broker {
        at: String,
        #[source]
        source: Cause,
    },
    #[error("RabbitMQ refused to {what}")]
    Amqp {
        what: &'static str,
        #[source]
        source: lapin::Error,
    },
    /// The broker refused or dropped something without an error value.
    #[error("RabbitMQ {0}")]
    BrokerSaid(String),
    #[error("worker {name} has no container under instance {instance:?}")]
    NoContainer { name: String, instance: String },
    #[error("{0}")]
    WorkerFailed(String),
    #[error("{0}")]
    Timeout(String),
}

impl CliError {
    /// The process exit code for this failure.
    pub(crate) fn exit_code(&self) -> u8 {
        use CliError::*;
        match self {
            UnknownName(_) | UnknownId(_) | AmbiguousName { .. } | NameTaken { .. } => {
                exit::BAD_INPUT
            }
            BadArgument(_) | ReadFile { .. } | BadCode { .. } | BadMessage { .. } => {
                exit::BAD_INPUT
            }
            DatabaseUrl(_) | NoContainer { .. } => exit::BAD_INPUT,
            Database { .. } | DatabaseRefused { .. } | NotMigrated { .. } | Query { .. } => {
                exit::UNAVAILABLE
            }
            Docker(_) | DockerRefused { .. } => exit::UNAVAILABLE,
            Broker { .. } | Amqp { .. } | BrokerSaid(_) => exit::UNAVAILABLE,
            WorkerFailed(_) => exit::WORKER_FAILED,
            Timeout(_) => exit::TIMEOUT,
        }
    }

    /// What to do about it, when there is something to say.
    fn hint(&self) -> Option<&'static str> {
        match self {
            CliError::Database { .. } => Some("is Postgres running? (scripts/services)"),
            CliError::DatabaseRefused { .. } => Some(
                "check database_url (WORKERCTL_DATABASE_URL): user, password and database name",
            ),
            CliError::NotMigrated { .. } => Some("run `workerctl migrate` (or start the daemon)"),
            CliError::Docker(_) => Some("is Docker running? (scripts/services)"),
            CliError::Broker { .. } => Some("is RabbitMQ running? (scripts/services)"),
            CliError::DatabaseUrl(_) => Some(
                "set database_url (WORKERCTL_DATABASE_URL) to postgres://user:password@host:port/db",
            ),
            CliError::NoContainer { .. } => Some(
                "is it enabled, and is the daemon (`workerctl run`) running with this instance?",
            ),
            _ => None,
        }
    }

    /// The whole story on one line: what failed, every cause, what to do.
    pub(crate) fn one_line(&self) -> String {
        let mut text = crate::backoff::error_chain(self);
        if let Some(hint) = self.hint() {
            text.push_str(" — ");
            text.push_str(hint);
        }
        // Causes (Python tracebacks, server messages) may span lines.
        text.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    /// Prints the error on stderr and returns its exit code.
    pub(crate) fn report(&self) -> ExitCode {
        eprintln!("workerctl: {}", self.one_line());
        ExitCode::from(self.exit_code())
    }
}

impl From<AmqpError> for CliError {
    fn from(e: AmqpError) -> Self {
        match e {
            AmqpError::Unreachable { at, source } => CliError::Broker { at, source },
            AmqpError::Refused { what, source } => CliError::Amqp { what, source },
            AmqpError::Said(what) => CliError::BrokerSaid(what),
        }
    }
}

impl From<DbError> for CliError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Url(source) => CliError::DatabaseUrl(source),
            DbError::Unreachable { at, source } => CliError::Database { at, source },
            DbError::Refused { at, source } => CliError::DatabaseRefused { at, source },
            DbError::NotMigrated { at } => CliError::NotMigrated { at },
            DbError::Query { what, source } => CliError::Query { what, source },
            DbError::UnknownName(name) => CliError::UnknownName(name),
            DbError::UnknownId(id) => CliError::UnknownId(id),
            DbError::AmbiguousName { name, ids } => CliError::AmbiguousName { name, ids },
            DbError::NameTaken { name, id } => CliError::NameTaken { name, id },
        }
    }
}

/// A failed Docker request to `what`: a refusal when Docker answered with an
/// error status, else Docker out of reach.
pub(super) fn docker_error(what: &'static str, e: bollard::errors::Error) -> CliError {
    match e {
        e @ bollard::errors::Error::DockerResponseServerError { .. } => {
            CliError::DockerRefused { what, source: e }
        }
        e => CliError::Docker(Box::new(e)),
    }
}

/// A cause that is only a message (a timeout, a refusal without an error value).
#[derive(Debug)]
pub(super) struct Because(pub String);

impl fmt::Display for Because {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Because {}

/// "no answer within 3s", as a cause.
pub(super) fn no_answer(within: Duration) -> Cause {
    Box::new(Because(format!(
        "no answer within {}",
        humantime::format_duration(within)
    )))
}

fn join(ids: &[Uuid]) -> String {
    ids.iter()
        .map(Uuid::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) fn store_failed(db: &Db, e: StoreError) -> CliError {
    match e {
        StoreError::Query { what, source } => db.failed(what, source).into(),
        other => CliError::BadArgument(crate::backoff::error_chain(&other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ambiguous_name_lists_the_ids_and_says_what_to_do() {
        let ids = vec![Uuid::nil(), Uuid::max()];
        let err = CliError::AmbiguousName {
            name: "x".into(),
            ids,
        };
        assert_eq!(
            err.one_line(),
            "2 workers are named \"x\": 00000000-0000-0000-0000-000000000000, \
             ffffffff-ffff-ffff-ffff-ffffffffffff; use the id"
        );
        assert_eq!(err.exit_code(), exit::BAD_INPUT);
    }

    #[test]
    fn an_unreachable_database_names_the_cause_then_the_remedy_on_one_line() {
        let err = CliError::Database {
            at: "127.0.0.1:9".into(),
            source: Box::new(Because("connection refused\nsecond line".into())),
        };
        assert_eq!(
            err.one_line(),
            "cannot reach the database at 127.0.0.1:9: connection refused second line \
             — is Postgres running? (scripts/services)"
        );
        assert_eq!(err.exit_code(), exit::UNAVAILABLE);
    }

    #[test]
    fn timeouts_and_worker_failures_have_their_own_codes() {
        assert_eq!(CliError::Timeout("t".into()).exit_code(), exit::TIMEOUT);
        assert_eq!(
            CliError::WorkerFailed("f".into()).exit_code(),
            exit::WORKER_FAILED
        );
    }

    #[test]
    fn a_docker_refusal_is_not_reported_as_docker_being_away() {
        let refused = docker_error(
            "read the container's logs",
            bollard::errors::Error::DockerResponseServerError {
                status_code: 500,
                message: "disk full".into(),
            },
        );
        let line = refused.one_line();
        assert!(
            line.starts_with("Docker refused to read the container's logs"),
            "{line}"
        );
        assert!(line.contains("disk full"), "{line}");
        assert!(!line.contains("is Docker running"), "{line}");

        let away = docker_error(
            "read the container's logs",
            bollard::errors::Error::RequestTimeoutError,
        );
        assert!(
            away.one_line().contains("is Docker running"),
            "{}",
            away.one_line()
        );
        assert_eq!(away.exit_code(), refused.exit_code());
    }
}
