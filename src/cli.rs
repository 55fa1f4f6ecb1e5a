//! The command line (clap): the daemon's commands and the worker management
//! commands. Parsing only; each command is carried out in main.rs or in
//! the module named beside it.

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
    Worker(crate::worker_cli::WorkerCommand),
    /// Cron schedules that fire workers.
    #[command(subcommand)]
    Schedule(crate::trigger_cli::ScheduleCommand),
    /// Dead letters: messages that failed, to list, show, replay and purge.
    #[command(subcommand)]
    Errors(crate::trigger_cli::ErrorsCommand),
}

#[derive(Debug, Args)]
pub struct ReconcileArgs {
    /// Run exactly one pass and exit non-zero if any action failed.
    #[arg(long, required = true)]
    pub once: bool,
}
