//! `workerctl worker try ID|NAME --code FILE`: what the candidate code does
//! to the messages the worker really gets, beside its current revision,
//! without saving anything or touching the pipeline ([`crate::trial`]).
//!
//! Exit codes of its own, so that a CI job can gate a save on it: 0 when
//! nothing changed, 1 when something did, 2 on any error.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use super::{CliError, Output, code, pretty, read_message};
use crate::config::Config;
use crate::store::admin;
use crate::trial::{self, Change, Entry, Inputs, Report, Settings, TrialError};

/// The `--help` text of the exit codes of `worker try`.
pub(super) const TRY_EXIT_CODES_HELP: &str = "\
Exit codes:
  0  nothing changed: every message came out as with the current revision
  1  something changed: a message's output changed, it now raises, or it is fixed
  2  the try could not be made (unknown worker, unreadable code, no inputs, a service away)";

#[derive(Debug, Args)]
pub struct TryArgs {
    /// The worker's id, or its exact name.
    #[arg(value_name = "ID|NAME")]
    pub worker: String,
    /// The candidate code: a .py file defining process(message), or a .zip archive.
    #[arg(long, value_name = "FILE")]
    pub code: PathBuf,
    /// Run the worker's newest N recorded messages (with --dead-letters: its newest N dead letters).
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub last: i64,
    /// Run this one message instead (a JSON file, or - for stdin).
    #[arg(long, value_name = "FILE", conflicts_with = "dead_letters")]
    pub message: Option<PathBuf>,
    /// Run the messages of the worker's dead letters instead of its recorded traffic.
    #[arg(long)]
    pub dead_letters: bool,
    /// How long process() may take on one message before it counts as raising.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    #[arg(long, short, value_enum, default_value = "table")]
    pub output: Output,
}

pub(super) async fn execute(config: &Config, a: TryArgs) -> ExitCode {
    match run(config, &a).await {
        Ok(report) => {
            print_report(&report, a.output);
            ExitCode::from(u8::from(report.summary.anything_changed()))
        }
        Err(e) => {
            eprintln!("workerctl: {}", e.one_line());
            ExitCode::from(2)
        }
    }
}

async fn run(config: &Config, a: &TryArgs) -> Result<Report, CliError> {
    let candidate = code::read(&a.code)?;
    let inputs = match &a.message {
        Some(path) => Inputs::Message(read_message(path)?),
        None if a.dead_letters => Inputs::DeadLetters(a.last),
        None => Inputs::Last(a.last),
    };
    let db = admin::connect(config.database_url.expose()).await?;
    let worker = db.resolve(&a.worker).await?;
    eprintln!(
        "trying {} on worker {} beside its current revision ...",
        a.code.display(),
        worker.name
    );
    let request = trial::Request {
        worker,
        candidate: candidate.archive().to_vec(),
        inputs,
        message_timeout: a.timeout,
    };
    trial::run(&db, &Settings::from_config(config), request)
        .await
        .map_err(|e| cli_error(e, &a.code))
}

fn cli_error(e: TrialError, path: &std::path::Path) -> CliError {
    match e {
        TrialError::Db(e) => e.into(),
        TrialError::CandidateInvalid(problem) => CliError::BadCode {
            path: path.to_path_buf(),
            problem: format!("does not load in the worker's image: {problem}"),
        },
        TrialError::NoInputs(why) | TrialError::BadInput(why) => CliError::BadArgument(why),
        other => CliError::WorkerFailed(crate::backoff::error_chain(&other)),
    }
}

pub(super) fn print_report(report: &Report, output: Output) {
    if output == Output::Json {
        println!("{}", pretty(report));
        return;
    }
    if let Some(why) = &report.current_invalid {
        println!("revision {} does not load: {why}", report.revision);
    }
    for entry in &report.messages {
        print!("{}", entry_text(entry));
    }
    println!("{}", report.summary_line);
    eprintln!(
        "compared with revision {} of {} in {:.1}s",
        report.revision, report.worker_name, report.seconds
    );
}

/// One message: a head line, then what changed, indented.
pub(super) fn entry_text(entry: &Entry) -> String {
    let what = match entry.change {
        Change::Unchanged => "unchanged",
        Change::Changed => "changed",
        Change::NowRaises => "now raises",
        Change::Fixed => "fixed",
    };
    let trace = entry
        .input
        .tracing_id
        .as_deref()
        .map(|t| format!(" (tracing id {t})"))
        .unwrap_or_default();
    let mut out = format!("{}{trace}: {what}\n", entry.input.source);
    let body: Vec<&str> = match (&entry.change, &entry.traceback) {
        (Change::NowRaises, Some(tb)) => tb.lines().collect(),
        _ => entry.diff.iter().map(String::as_str).collect(),
    };
    for line in body {
        out.push_str("    ");
        out.push_str(line);
        out.push('\n');
    }
    out
}
