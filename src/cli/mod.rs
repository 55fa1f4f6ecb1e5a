//! The command line: what it accepts (clap) and how each command is carried
//! out — `worker …` in [`worker`], `schedule …` and `errors …` in
//! [`triggers`], `plan` and `reconcile --once` in [`pass`]; `run` and
//! `migrate` in main.rs. Shared by all: the error type and exit codes
//! ([`error`]), tables and JSON ([`output`], [`table`]), container logs
//! ([`logs`]).

mod error;
pub(crate) mod logs;
mod output;
pub mod pass;
mod table;
pub mod triggers;
pub mod worker;

pub use error::exit;
pub(crate) use error::store_failed;
pub(crate) use error::{CliError, EXIT_CODES_HELP};
pub use output::Output;
pub(crate) use output::{pretty, read_message};

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// workerctl runs SensorBucket user workers as Docker containers, one per
/// enabled worker in the `user_workers` table, at its current revision.
#[derive(Debug, Parser)]
#[command(name = "workerctl", version, propagate_version = true)]
pub struct Cli {
    /// Configuration file (TOML). Environment variables WORKERCTL_<KEY>
    /// (`__` for nesting) override it.
    #[arg(long, short, global = true, env = "WORKERCTL_CONFIG")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: apply migrations, serve worker code, and keep
    /// containers in line with the store until SIGTERM/SIGINT.
    Run,
    /// Apply the database migrations and exit.
    Migrate,
    /// Print what one pass would do and why; change nothing.
    Plan,
    /// Run reconcile passes without the daemon.
    Reconcile(ReconcileArgs),
    /// Manage and test workers.
    #[command(subcommand)]
    Worker(worker::WorkerCommand),
    /// Cron schedules that fire workers.
    #[command(subcommand)]
    Schedule(triggers::ScheduleCommand),
    /// Dead letters: messages that failed, to list, show, replay and purge.
    #[command(subcommand)]
    Errors(triggers::ErrorsCommand),
}

#[derive(Debug, Args)]
pub struct ReconcileArgs {
    /// Run exactly one pass and exit non-zero if any action failed.
    #[arg(long, required = true)]
    pub once: bool,
}
