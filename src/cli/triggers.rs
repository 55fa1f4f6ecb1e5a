//! `workerctl schedule …` and `workerctl errors …`: cron schedules and dead
//! letters from the command line. Like the worker commands: output for
//! scripts on stdout (ids, tables, JSON), everything for a person on
//! stderr, a failure as one line and an exit code ([`CliError`]).
//!
//! The SQL is in `store/schedules.rs` and `store/dead_letters.rs`, the cron
//! decisions in `triggers/cron.rs`; this file parses arguments and prints.

use std::path::PathBuf;
use std::process::ExitCode;

use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use uuid::Uuid;

use super::{CliError, EXIT_CODES_HELP, Output, logs, pretty, read_message, store_failed, table};
use crate::config::Config;
use crate::store::admin::{self, Db};
use crate::store::dead_letters::{self, DeadLetter, Filter};
use crate::store::schedules::{self, NewSchedule, ScheduleRow};
use crate::triggers::amqp::{self, Target, open_channel};
use crate::triggers::cron;

#[derive(Debug, Subcommand)]
#[command(after_long_help = EXIT_CODES_HELP)]
pub enum ScheduleCommand {
    /// Fire a worker on a cron schedule: at each fire time the daemon
    /// publishes the message (a fresh tracing_id and times) to the worker.
    /// Prints the schedule's id.
    Add(ScheduleAddArgs),
    /// Every schedule: worker, expression, zone, next and last fire.
    List(ScheduleListArgs),
    /// Remove a schedule.
    Rm(ScheduleIdArgs),
    /// Print the next fire times of a schedule, in its time zone.
    Next(ScheduleNextArgs),
}

#[derive(Debug, Args)]
pub struct ScheduleAddArgs {
    /// The worker's id, or its exact name.
    #[arg(value_name = "ID|NAME")]
    pub worker: String,
    /// 5 fields (`min hour day month weekday`) or 6 with seconds first;
    /// `@hourly`, `@daily`… too.
    #[arg(long, value_name = "EXPR")]
    pub cron: String,
    /// The IANA time zone the expression is read in.
    #[arg(long, value_name = "ZONE", default_value = "UTC")]
    pub timezone: String,
    /// The pipeline message template (JSON object; default `{}`).
    #[arg(long, value_name = "FILE")]
    pub message: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ScheduleListArgs {
    /// Only the schedules of this worker (ID|NAME).
    #[arg(long, value_name = "ID|NAME")]
    pub worker: Option<String>,
    #[arg(long, short, value_enum, default_value = "table")]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct ScheduleIdArgs {
    /// The schedule's id (see `workerctl schedule list`).
    pub id: i64,
}

#[derive(Debug, Args)]
pub struct ScheduleNextArgs {
    /// The schedule's id (see `workerctl schedule list`).
    pub id: i64,
    /// How many fire times.
    #[arg(long, default_value_t = 5)]
    pub count: usize,
}

#[derive(Debug, Subcommand)]
#[command(after_long_help = EXIT_CODES_HELP)]
pub enum ErrorsCommand {
    /// Messages that failed (routed to `errors`), newest first.
    List(ErrorsListArgs),
    /// One dead letter: the traceback and the message as received.
    Show(ErrorsShowArgs),
    /// Publish the message a worker failed on to that worker again (after
    /// fixing its code): one dead letter, or all of a worker's.
    Replay(ErrorsReplayArgs),
    /// Delete dead letters: all, or a worker's.
    Purge(ErrorsPurgeArgs),
}

#[derive(Debug, Args)]
pub struct ErrorsListArgs {
    /// Only this worker's (ID|NAME).
    #[arg(long, value_name = "ID|NAME")]
    pub worker: Option<String>,
    /// Only those newer than this: a duration (10m, 1h) or a time (RFC 3339).
    #[arg(long)]
    pub since: Option<String>,
    /// At most this many.
    #[arg(long, default_value_t = 50)]
    pub limit: i64,
    #[arg(long, short, value_enum, default_value = "table")]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct ErrorsShowArgs {
    /// The dead letter's id (see `workerctl errors list`).
    pub id: i64,
    #[arg(long, short, value_enum, default_value = "table")]
    pub output: Output,
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct ErrorsReplayArgs {
    /// The dead letter's id.
    #[arg(group = "which")]
    pub id: Option<i64>,
    /// Every dead letter of this worker (ID|NAME), oldest first.
    #[arg(long, value_name = "ID|NAME", group = "which")]
    pub worker: Option<String>,
}

#[derive(Debug, Args)]
pub struct ErrorsPurgeArgs {
    /// Only this worker's (ID|NAME); default: all.
    #[arg(long, value_name = "ID|NAME")]
    pub worker: Option<String>,
}

/// Carries out a schedule command.
pub async fn schedule(command: ScheduleCommand, config: &Config) -> ExitCode {
    report(run_schedule(command, config).await)
}

/// Carries out an errors command.
pub async fn errors(command: ErrorsCommand, config: &Config) -> ExitCode {
    report(run_errors(command, config).await)
}

fn report(result: Result<(), CliError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => e.report(),
    }
}

async fn run_schedule(command: ScheduleCommand, config: &Config) -> Result<(), CliError> {
    let db = admin::connect(config.database_url.expose()).await?;
    let now = Utc::now();
    match command {
        ScheduleCommand::Add(a) => add_schedule(&db, a, now).await,
        ScheduleCommand::List(a) => {
            let worker = resolve_opt(&db, a.worker.as_deref()).await?;
            let rows = schedules::list(db.pool(), worker)
                .await
                .map_err(|e| store_failed(&db, e))?;
            match a.output {
                Output::Json => println!("{}", pretty(&rows)),
                Output::Table => print_schedules(&rows, now),
            }
            Ok(())
        }
        ScheduleCommand::Rm(a) => {
            if !schedules::remove(db.pool(), a.id)
                .await
                .map_err(|e| store_failed(&db, e))?
            {
                return Err(no_schedule(a.id));
            }
            println!("schedule {} removed", a.id);
            Ok(())
        }
        ScheduleCommand::Next(a) => {
            let row = schedules::get(db.pool(), a.id)
                .await
                .map_err(|e| store_failed(&db, e))?
                .ok_or_else(|| no_schedule(a.id))?;
            let parsed = cron::parse(&row.cron, &row.timezone)
                .map_err(|e| CliError::BadArgument(e.to_string()))?;
            for t in parsed.upcoming(now, a.count) {
                println!("{}", t.to_rfc3339());
            }
            Ok(())
        }
    }
}

fn no_schedule(id: i64) -> CliError {
    CliError::BadArgument(format!(
        "no schedule has the id {id} (see `workerctl schedule list`)"
    ))
}

async fn add_schedule(db: &Db, a: ScheduleAddArgs, now: DateTime<Utc>) -> Result<(), CliError> {
    let parsed =
        cron::parse(&a.cron, &a.timezone).map_err(|e| CliError::BadArgument(e.to_string()))?;
    let message = match &a.message {
        Some(path) => {
            let m = read_message(path)?;
            if !m.is_object() {
                return Err(CliError::BadMessage {
                    path: path.clone(),
                    problem: "the message must be a JSON object".into(),
                });
            }
            m
        }
        None => json!({}),
    };
    let target = db.resolve(&a.worker).await?;
    let new = NewSchedule {
        worker_id: target.id,
        cron: a.cron.clone(),
        timezone: a.timezone.clone(),
        message,
    };
    let id = schedules::add(db.pool(), &new)
        .await
        .map_err(|e| store_failed(db, e))?;
    println!("{id}");
    let next = parsed
        .upcoming(now, 1)
        .first()
        .map(|t| t.to_rfc3339())
        .unwrap_or_default();
    eprintln!(
        "schedule {id}: worker {} on {:?} in {}; next fire {next}",
        target.name, a.cron, a.timezone
    );
    Ok(())
}

fn print_schedules(rows: &[ScheduleRow], now: DateTime<Utc>) {
    let mut lines = vec![
        [
            "ID", "WORKER", "CRON", "ZONE", "NEXT", "LAST", "FIRES", "ERROR",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for r in rows {
        let next = match cron::parse(&r.cron, &r.timezone) {
            Ok(s) if r.worker_enabled => s
                .upcoming(now, 1)
                .first()
                .map(|t| t.format("%Y-%m-%d %H:%M:%S %Z").to_string())
                .unwrap_or_default(),
            Ok(_) => "(worker disabled)".into(),
            Err(_) => "(invalid)".into(),
        };
        let last = r
            .last_fire_at
            .map(|t| format!("{} ago", table::age(now - t)))
            .unwrap_or_else(|| "never".into());
        lines.push(vec![
            r.id.to_string(),
            r.worker_name.clone(),
            r.cron.clone(),
            r.timezone.clone(),
            next,
            last,
            r.fires.to_string(),
            r.last_error.clone(),
        ]);
    }
    print!("{}", table::columns(&lines));
    if rows.is_empty() {
        eprintln!("no schedules yet: workerctl schedule add WORKER --cron '*/5 * * * *'");
    }
}

async fn resolve_opt(db: &Db, worker: Option<&str>) -> Result<Option<Uuid>, CliError> {
    match worker {
        Some(w) => Ok(Some(db.resolve(w).await?.id)),
        None => Ok(None),
    }
}

async fn run_errors(command: ErrorsCommand, config: &Config) -> Result<(), CliError> {
    let db = admin::connect(config.database_url.expose()).await?;
    match command {
        ErrorsCommand::List(a) => list_errors(&db, a).await,
        ErrorsCommand::Show(a) => {
            let letter = load_letter(&db, a.id).await?;
            match a.output {
                Output::Json => println!("{}", pretty(&letter)),
                Output::Table => print_letter(&letter),
            }
            Ok(())
        }
        ErrorsCommand::Replay(a) => replay(&db, config, a).await,
        ErrorsCommand::Purge(a) => {
            let worker = resolve_opt(&db, a.worker.as_deref()).await?;
            let n = dead_letters::purge(db.pool(), worker)
                .await
                .map_err(|e| store_failed(&db, e))?;
            println!("{n} dead letter(s) purged");
            Ok(())
        }
    }
}

async fn list_errors(db: &Db, a: ErrorsListArgs) -> Result<(), CliError> {
    let now = Utc::now();
    let since = a
        .since
        .as_deref()
        .map(|s| logs::parse_since(s, now))
        .transpose()?;
    let filter = Filter {
        worker: resolve_opt(db, a.worker.as_deref()).await?,
        since,
        limit: Some(a.limit),
    };
    let letters = dead_letters::list(db.pool(), &filter)
        .await
        .map_err(|e| store_failed(db, e))?;
    if a.output == Output::Json {
        println!("{}", pretty(&letters));
        return Ok(());
    }
    let mut lines = vec![
        ["ID", "WORKER", "FAILED", "ATTEMPT", "REPLAYS", "ERROR"]
            .map(String::from)
            .to_vec(),
    ];
    for d in &letters {
        lines.push(vec![
            d.id.to_string(),
            worker_label(d),
            format!("{} ago", table::age(now - d.failed_at)),
            d.attempt.map(|a| a.to_string()).unwrap_or_default(),
            d.replays.to_string(),
            d.reason().chars().take(80).collect(),
        ]);
    }
    print!("{}", table::columns(&lines));
    if letters.is_empty() {
        eprintln!("no dead letters (is the daemon running? it collects them from `errors`)");
    }
    Ok(())
}

fn worker_label(d: &DeadLetter) -> String {
    match (&d.worker_name, d.worker_id) {
        (Some(name), _) => name.clone(),
        (None, Some(id)) => id.to_string(),
        (None, None) => "?".into(),
    }
}

async fn load_letter(db: &Db, id: i64) -> Result<DeadLetter, CliError> {
    dead_letters::get(db.pool(), id)
        .await
        .map_err(|e| store_failed(db, e))?
        .ok_or_else(|| {
            CliError::BadArgument(format!(
                "no dead letter has the id {id} (see `workerctl errors list`)"
            ))
        })
}

fn print_letter(d: &DeadLetter) {
    println!("id:        {}", d.id);
    println!(
        "worker:    {} ({})",
        worker_label(d),
        d.worker_id.map(|i| i.to_string()).unwrap_or_default()
    );
    println!("failed at: {}", d.failed_at.to_rfc3339());
    println!("queue:     {}", d.queue);
    if let Some(attempt) = d.attempt {
        println!("attempt:   {attempt}");
    }
    println!("replays:   {}", d.replays);
    println!("traceback:");
    for line in d.error.lines() {
        println!("  {line}");
    }
    println!("received:");
    let received = d.received().cloned().unwrap_or(Value::Null);
    for line in pretty(&received).lines() {
        println!("  {line}");
    }
}

/// Republishes `received_by_worker` to its worker's routing key.
async fn replay(db: &Db, config: &Config, a: ErrorsReplayArgs) -> Result<(), CliError> {
    let letters = match (a.id, a.worker.as_deref()) {
        (Some(id), _) => vec![load_letter(db, id).await?],
        (None, Some(worker)) => {
            let filter = Filter {
                worker: Some(db.resolve(worker).await?.id),
                ..Filter::default()
            };
            let mut all = dead_letters::list(db.pool(), &filter)
                .await
                .map_err(|e| store_failed(db, e))?;
            all.reverse();
            all
        }
        (None, None) => Vec::new(),
    };
    if letters.is_empty() {
        println!("nothing to replay");
        return Ok(());
    }
    let (connection, channel) = open_channel(&config.amqp, "workerctl errors replay").await?;
    let mut replayed = Vec::new();
    let mut outcome = Ok(());
    for d in &letters {
        match replay_one(&channel, &config.amqp.exchange, d).await {
            Ok(worker) => {
                println!("dead letter {} replayed to worker {worker}", d.id);
                replayed.push(d.id);
            }
            Err(e) => {
                outcome = Err(e);
                break;
            }
        }
    }
    let _ = connection.close(200, "done".into()).await;
    dead_letters::mark_replayed(db.pool(), &replayed)
        .await
        .map_err(|e| store_failed(db, e))?;
    outcome
}

async fn replay_one(
    channel: &lapin::Channel,
    exchange: &str,
    d: &DeadLetter,
) -> Result<Uuid, CliError> {
    let worker = d.worker_id.ok_or_else(|| {
        CliError::BadArgument(format!("dead letter {} names no worker to replay to", d.id))
    })?;
    let body = match d.received() {
        Some(Value::String(raw)) => raw.clone().into_bytes(),
        Some(v) => serde_json::to_vec(v).unwrap_or_default(),
        None => {
            return Err(CliError::BadArgument(format!(
                "dead letter {} has no received_by_worker to replay",
                d.id
            )));
        }
    };
    let properties = amqp::pipeline_properties(&Uuid::now_v7().to_string(), Default::default());
    let key = worker.to_string();
    let target = Target {
        exchange,
        routing_key: &key,
    };
    if !amqp::publish_once(channel, target, &body, properties).await? {
        return Err(CliError::WorkerFailed(format!(
            "no queue takes worker {}'s messages: is it enabled and running? (workerctl worker show {})",
            worker_label(d),
            worker_label(d)
        )));
    }
    Ok(worker)
}
