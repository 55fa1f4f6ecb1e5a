//! `workerctl worker …`: manage and test workers from the command line.

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum WorkerCommand {
    /// List workers.
    List,
}

/// Carries out a worker command; the exit code says how it went.
pub async fn execute(
    command: WorkerCommand,
    _config: &crate::config::Config,
) -> anyhow::Result<std::process::ExitCode> {
    match command {
        WorkerCommand::List => Ok(std::process::ExitCode::SUCCESS),
    }
}
