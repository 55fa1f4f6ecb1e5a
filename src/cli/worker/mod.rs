//! `workerctl worker …`: manage and test workers from the command line.
//!
//! Each command resolves its worker (ID or NAME), does one statement or one
//! transaction on the store, and maybe follows up (`--wait`, `logs`,
//! `invoke`). Output for scripts goes to stdout (the id from `create`, the
//! message from `invoke`, tables and JSON); everything meant for a person
//! goes to stderr. A failure is one line on stderr and an exit code from
//! [`error::exit`].
//!
//! Submodules: `store` (SQL), `code` (files → archives), `table`
//! (formatting), `wait` (`--wait`), `logs` (Docker logs), `invoke` (AMQP).

mod code;
mod debug;
mod dev;
mod messages;
mod scale;
mod trial;
mod wait;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use chrono::Utc;
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use uuid::Uuid;

use super::{CliError, EXIT_CODES_HELP, Output, logs, pretty, read_message, table};
use crate::config::Config;
use crate::model::{Status, WorkerState};
use crate::runtime::ContainerRuntime;
use crate::store::admin::{self as store, Changes, Db, NewWorker, Target};
use crate::store::overview::WorkerOverview;
use crate::triggers::invoke::{self, Answer};

#[derive(Debug, Subcommand)]
#[command(after_long_help = EXIT_CODES_HELP)]
pub enum WorkerCommand {
    /// List workers: name, id, state, revision, status, container, restarts, age.
    #[command(after_long_help = EXIT_CODES_HELP)]
    List(ListArgs),
    /// Everything known about a worker: fields, the reason of its status,
    /// its container and the last lines of its logs.
    #[command(after_long_help = EXIT_CODES_HELP)]
    Show(ShowArgs),
    /// Create a worker from a .py file or a .zip archive; prints its id on stdout.
    #[command(after_long_help = EXIT_CODES_HELP)]
    Create(CreateArgs),
    /// Change a worker's code, name, description or entrypoint. New code
    /// bumps the revision; identical code does not.
    #[command(after_long_help = EXIT_CODES_HELP)]
    Update(UpdateArgs),
    /// Enable a worker: the daemon starts its container.
    #[command(after_long_help = EXIT_CODES_HELP)]
    Enable(EnableArgs),
    /// Disable a worker: the daemon removes its container.
    #[command(after_long_help = EXIT_CODES_HELP)]
    Disable(TargetArgs),
    /// Delete a worker's row: the daemon removes its container.
    #[command(after_long_help = EXIT_CODES_HELP)]
    Delete(TargetArgs),
    /// Print a worker's container logs (stdout and stderr) through the Docker API.
    #[command(after_long_help = EXIT_CODES_HELP)]
    Logs(LogsArgs),
    /// Send a pipeline message to a worker and print what comes out of it
    /// (the next step's message, or the error body on `errors`).
    #[command(after_long_help = EXIT_CODES_HELP)]
    Invoke(InvokeArgs),
    /// Set how many replicas a worker runs: between --min and --max, one
    /// per --per-replica ready messages in its queue.
    #[command(after_long_help = EXIT_CODES_HELP)]
    Scale(scale::ScaleArgs),
    /// Watch mode: deploy FILE on every save, wait until ready, invoke the
    /// message if given and print the result, with the logs in between.
    #[command(after_long_help = EXIT_CODES_HELP)]
    Dev(dev::DevArgs),
    /// The messages the worker received lately (recorded by the daemon),
    /// with what each produced; --show N prints one.
    #[command(after_long_help = EXIT_CODES_HELP)]
    Messages(messages::MessagesArgs),
    /// Run candidate code on the worker's recorded messages (or one message,
    /// or its dead letters) beside its current revision, in a throwaway
    /// container, and report per message: unchanged, changed, now raises, fixed.
    #[command(after_long_help = trial::TRY_EXIT_CODES_HELP)]
    Try(trial::TryArgs),
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[arg(long, short, value_enum, default_value = "table")]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct TargetArgs {
    /// The worker's id, or its exact name.
    #[arg(value_name = "ID|NAME")]
    pub worker: String,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The worker's id, or its exact name.
    #[arg(value_name = "ID|NAME")]
    pub worker: String,
    #[arg(long, short, value_enum, default_value = "table")]
    pub output: Output,
    /// How many log lines to show.
    #[arg(long, default_value_t = 20)]
    pub lines: u64,
    /// Print only the worker's usercode.py.
    #[arg(long, conflicts_with = "output")]
    pub code: bool,
}

#[derive(Debug, Args)]
pub struct WaitArgs {
    /// Wait until the worker's current revision runs and is ready, and
    /// still is 2s later (exit 0), or has failed (exit 1), showing each
    /// change of status.
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits (exit 3 after that).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    pub wait_timeout: Duration,
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The worker's name (unique: ID|NAME arguments find it by name).
    #[arg(long)]
    pub name: String,
    /// A .py file defining process(message), or a .zip code archive
    /// (with usercode.py or the entrypoint's module). Default: the
    /// dashboard's `def process(msg): return msg`.
    #[arg(long, value_name = "FILE")]
    pub code: Option<PathBuf>,
    /// A description, shown in the dashboard.
    #[arg(long, default_value = "")]
    pub description: String,
    /// module.function the runtime calls (main.main calls usercode.process).
    #[arg(long, default_value = code::DEFAULT_ENTRYPOINT)]
    pub entrypoint: String,
    /// Create it disabled (default: enabled).
    #[arg(long, conflicts_with = "wait")]
    pub disabled: bool,
    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// The worker's id, or its exact name.
    #[arg(value_name = "ID|NAME")]
    pub worker: String,
    /// New code: a .py file or a .zip archive.
    #[arg(long, value_name = "FILE")]
    pub code: Option<PathBuf>,
    /// A new name.
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long)]
    pub description: Option<String>,
    #[arg(long)]
    pub entrypoint: Option<String>,
    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Debug, Args)]
pub struct EnableArgs {
    /// The worker's id, or its exact name.
    #[arg(value_name = "ID|NAME")]
    pub worker: String,
    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The worker's id, or its exact name.
    #[arg(value_name = "ID|NAME")]
    pub worker: String,
    /// Keep printing new lines, across restarts and new revisions, until Ctrl-C.
    #[arg(long, short)]
    pub follow: bool,
    /// Only lines newer than this: a duration (10m, 2h) or a time (RFC 3339).
    #[arg(long)]
    pub since: Option<String>,
    /// Only the last N lines.
    #[arg(long, value_name = "N")]
    pub tail: Option<u64>,
    /// Prefix each line with Docker's timestamp.
    #[arg(long, short)]
    pub timestamps: bool,
}

#[derive(Debug, Args)]
pub struct InvokeArgs {
    /// The worker's id, or its exact name.
    #[arg(value_name = "ID|NAME")]
    pub worker: String,
    /// A JSON pipeline message, or `-` for stdin. Missing fields are filled
    /// in, so `{"payload": "aGVsbG8="}` is enough.
    #[arg(long, value_name = "FILE")]
    pub message: PathBuf,
    /// How long to wait for the answer (exit 3 after that).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// Carries out a worker command; the exit code says how it went (see
/// [`exit`]). Failures are reported here, on one line.
pub async fn execute(command: WorkerCommand, config: &Config) -> anyhow::Result<ExitCode> {
    // `try` has exit codes of its own (0 unchanged, 1 changed, 2 error).
    let command = match command {
        WorkerCommand::Try(a) => return Ok(trial::execute(config, a).await),
        other => other,
    };
    Ok(match run(command, config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => e.report(),
    })
}

async fn run(command: WorkerCommand, config: &Config) -> Result<(), CliError> {
    match command {
        WorkerCommand::List(a) => list(config, a).await,
        WorkerCommand::Show(a) => show(config, a).await,
        WorkerCommand::Create(a) => create(config, a).await,
        WorkerCommand::Update(a) => update(config, a).await,
        WorkerCommand::Enable(a) => enable(config, a).await,
        WorkerCommand::Disable(a) => disable(config, a).await,
        WorkerCommand::Delete(a) => delete(config, a).await,
        WorkerCommand::Logs(a) => print_logs(config, a).await,
        WorkerCommand::Invoke(a) => invoke(config, a).await,
        WorkerCommand::Scale(a) => scale::run(config, a).await,
        WorkerCommand::Dev(a) => dev::dev(config, a).await,
        WorkerCommand::Messages(a) => messages::run(config, a).await,
        WorkerCommand::Try(_) => Err(CliError::BadArgument("worker try is run by execute".into())),
    }
}

async fn list(config: &Config, a: ListArgs) -> Result<(), CliError> {
    let db = store::connect(config.database_url.expose()).await?;
    let workers = db.list().await?;
    match a.output {
        Output::Json => println!("{}", pretty(&workers)),
        Output::Table => {
            print!("{}", table::list(&workers, Utc::now()));
            if workers.is_empty() {
                eprintln!("no workers yet: workerctl worker create --name NAME --code FILE.py");
            }
        }
    }
    Ok(())
}

async fn show(config: &Config, a: ShowArgs) -> Result<(), CliError> {
    let db = store::connect(config.database_url.expose()).await?;
    let target = db.resolve(&a.worker).await?;
    let worker = db
        .overview(target.id)
        .await?
        .ok_or(CliError::UnknownId(target.id))?;
    let code = db.code(target.id).await?;
    let source = code.as_ref().and_then(|c| c.source.as_deref());
    if a.code {
        let usercode = source.and_then(code::usercode_of).ok_or_else(|| {
            CliError::BadArgument(format!("worker {} has no usercode.py", target.name))
        })?;
        print!("{usercode}");
        return Ok(());
    }
    let logs = recent_logs(config, target.id, a.lines).await;
    match a.output {
        Output::Json => {
            let mut value = json!(worker);
            value["code_bytes"] = json!(code.as_ref().and_then(|c| c.bytes));
            value["code_sha256"] = json!(code.as_ref().and_then(|c| c.sha256.clone()));
            value["logs"] = match &logs {
                Ok((_, lines)) => json!(lines),
                Err(reason) => json!({ "unavailable": reason }),
            };
            println!("{}", pretty(&value));
        }
        Output::Table => {
            print!("{}", table::show(&worker, code.as_ref(), Utc::now()));
            match logs {
                Ok((container, lines)) => {
                    println!("logs (last {} lines of {container}):", a.lines);
                    for line in lines {
                        println!("  {line}");
                    }
                }
                Err(reason) => println!("logs: {reason}"),
            }
        }
    }
    Ok(())
}

/// The last lines of the worker's container, or why there are none. Docker
/// being away does not fail `show`: the rest is still worth seeing.
async fn recent_logs(
    config: &Config,
    id: Uuid,
    lines: u64,
) -> Result<(String, Vec<String>), String> {
    let docker = logs::docker(&config.instance)
        .await
        .map_err(|e| e.one_line())?;
    let container = logs::container_of(&docker, id)
        .await
        .map_err(|e| e.one_line())?
        .ok_or_else(|| format!("no container under instance {:?}", config.instance))?;
    let lines = usize::try_from(lines).unwrap_or(usize::MAX);
    let text = docker
        .last_lines(&container.id, lines)
        .await
        .map_err(|e| crate::backoff::error_chain(&e))?;
    Ok((container.name, text))
}

async fn create(config: &Config, a: CreateArgs) -> Result<(), CliError> {
    check_name(&a.name)?;
    code::check_entrypoint(&a.entrypoint)?;
    let source = match &a.code {
        Some(path) => {
            let code = code::read(path)?;
            code::check_callable(&code, path, &a.entrypoint)?;
            code.archive().to_vec()
        }
        None => crate::archive::sensorbucket_archive(crate::archive::DEFAULT_USERCODE)
            .map_err(|e| CliError::BadArgument(format!("cannot build the code archive: {e}")))?,
    };
    let db = store::connect(config.database_url.expose()).await?;
    let new = NewWorker {
        id: Uuid::now_v7(),
        name: a.name.clone(),
        description: a.description,
        enabled: !a.disabled,
        entrypoint: a.entrypoint,
        source,
    };
    db.create(&new).await?;
    println!("{}", new.id);
    let state = if new.enabled { "enabled" } else { "disabled" };
    eprintln!(
        "created worker {} ({}): revision 1, {state}",
        new.name, new.id
    );
    let target = Target {
        id: new.id,
        name: new.name,
    };
    wait_if_asked(&db, &target, &a.wait).await
}

async fn update(config: &Config, a: UpdateArgs) -> Result<(), CliError> {
    if a.code.is_none() && a.name.is_none() && a.description.is_none() && a.entrypoint.is_none() {
        return Err(CliError::BadArgument(
            "nothing to update: give --code, --name, --description or --entrypoint".into(),
        ));
    }
    if let Some(name) = &a.name {
        check_name(name)?;
    }
    if let Some(entrypoint) = &a.entrypoint {
        code::check_entrypoint(entrypoint)?;
    }
    // Read before touching the database: a bad file changes nothing.
    let new_code = a.code.as_deref().map(code::read).transpose()?;
    let db = store::connect(config.database_url.expose()).await?;
    let target = db.resolve(&a.worker).await?;
    let mut report = Vec::new();
    let (changes, revision) = db
        .update(&target, |current| {
            decide(current, &a, new_code.as_ref(), &mut report)
        })
        .await?;
    if changes.is_empty() {
        report.push("nothing changed".into());
    }
    for line in &report {
        println!("{line}");
    }
    let renamed = Target {
        id: target.id,
        name: changes.name.unwrap_or(target.name),
    };
    if a.wait.wait {
        eprintln!("waiting for worker {} revision {revision}", renamed.name);
    }
    wait_if_asked(&db, &renamed, &a.wait).await
}

/// What an update changes, given what is stored; `report` says it in words.
fn decide(
    current: &store::Current,
    a: &UpdateArgs,
    new_code: Option<&code::Code>,
    report: &mut Vec<String>,
) -> Result<Changes, CliError> {
    let differs = |new: &Option<String>, old: &str| new.clone().filter(|n| n != old);
    let mut changes = Changes {
        name: differs(&a.name, &current.name),
        description: differs(&a.description, &current.description),
        entrypoint: differs(&a.entrypoint, &current.entrypoint),
        source: None,
    };
    if let (Some(code), Some(path)) = (new_code, a.code.as_deref()) {
        let entrypoint = a.entrypoint.as_deref().unwrap_or(&current.entrypoint);
        code::check_callable(code, path, entrypoint)?;
        if code.same_as(current.source.as_deref()) {
            report.push(format!(
                "code: identical to revision {}, not saved again",
                current.revision
            ));
        } else {
            report.push(format!(
                "code: revision {} → {}",
                current.revision,
                current.revision + 1
            ));
            changes.source = Some(code.archive().to_vec());
        }
    }
    if let Some(name) = &changes.name {
        report.push(format!("name: {} → {name}", current.name));
    }
    if changes.description.is_some() {
        report.push("description: changed".into());
    }
    if let Some(entrypoint) = &changes.entrypoint {
        report.push(format!("entrypoint: {} → {entrypoint}", current.entrypoint));
    }
    Ok(changes)
}

async fn enable(config: &Config, a: EnableArgs) -> Result<(), CliError> {
    let db = store::connect(config.database_url.expose()).await?;
    let target = db.resolve(&a.worker).await?;
    set_state(&db, &target, true).await?;
    wait_if_asked(&db, &target, &a.wait).await
}

async fn disable(config: &Config, a: TargetArgs) -> Result<(), CliError> {
    let db = store::connect(config.database_url.expose()).await?;
    let target = db.resolve(&a.worker).await?;
    set_state(&db, &target, false).await
}

async fn set_state(db: &Db, target: &Target, enabled: bool) -> Result<(), CliError> {
    let new = if enabled {
        WorkerState::Enabled
    } else {
        WorkerState::Disabled
    };
    let old = db
        .set_state(target.id, enabled)
        .await?
        .ok_or(CliError::UnknownId(target.id))?;
    if old == new {
        println!("worker {} was already {new}", target.name);
    } else {
        println!("worker {} {new}", target.name);
    }
    Ok(())
}

async fn delete(config: &Config, a: TargetArgs) -> Result<(), CliError> {
    let db = store::connect(config.database_url.expose()).await?;
    let target = db.resolve(&a.worker).await?;
    if !db.delete(target.id).await? {
        return Err(CliError::UnknownId(target.id));
    }
    println!(
        "deleted worker {} ({}); the daemon removes its container",
        target.name, target.id
    );
    Ok(())
}

async fn print_logs(config: &Config, a: LogsArgs) -> Result<(), CliError> {
    let since = a
        .since
        .as_deref()
        .map(|s| logs::parse_since(s, Utc::now()))
        .transpose()?;
    let db = store::connect(config.database_url.expose()).await?;
    let target = db.resolve(&a.worker).await?;
    let docker = logs::docker(&config.instance).await?;
    let no_container = || CliError::NoContainer {
        name: target.name.clone(),
        instance: config.instance.clone(),
    };
    let container = logs::container_of(&docker, target.id)
        .await?
        .ok_or_else(no_container)?;
    let request = logs::LogRequest {
        follow: a.follow,
        since,
        tail: a.tail,
        timestamps: a.timestamps,
    };
    match logs::print(&docker, target.id, container, &request).await? {
        logs::Ended::Stopped => Ok(()),
        logs::Ended::Gone => Err(no_container()),
    }
}

async fn invoke(config: &Config, a: InvokeArgs) -> Result<(), CliError> {
    let message = read_message(&a.message)?;
    let db = store::connect(config.database_url.expose()).await?;
    let target = db.resolve(&a.worker).await?;
    let now_ms = Utc::now().timestamp_millis();
    let prepared =
        invoke::prepare(message, target.id, now_ms, Uuid::new_v4).map_err(|problem| {
            CliError::BadMessage {
                path: a.message.clone(),
                problem,
            }
        })?;
    for note in &prepared.notes {
        eprintln!("workerctl: note: {note}");
    }
    eprintln!(
        "invoking worker {} ({}) with tracing_id {}; listening on {} and {}",
        target.name,
        target.id,
        prepared.tracing_id,
        prepared.next_key,
        invoke::ERRORS_KEY
    );
    let waiting = |worker: Uuid| {
        eprintln!(
            "no queue takes routing key {worker} yet (is the worker still starting?); \
             publishing again until the timeout"
        );
    };
    match invoke::invoke(&config.amqp, target.id, &prepared, a.timeout, &waiting).await? {
        invoke::Outcome::Answer {
            routing_key,
            body,
            elapsed,
        } => answer(&target, &routing_key, &body, elapsed),
        invoke::Outcome::TimedOut { routed } => {
            let worker = db.overview(target.id).await.ok().flatten();
            Err(no_answer(&target, a.timeout, routed, worker.as_ref()))
        }
    }
}

/// Prints what came out: the body on stdout, where it came out on stderr.
fn answer(
    target: &Target,
    routing_key: &str,
    body: &[u8],
    elapsed: Duration,
) -> Result<(), CliError> {
    let verdict = invoke::verdict(routing_key, body);
    let shown = match &verdict {
        Answer::Output(v) | Answer::Failed { body: v, .. } => v,
    };
    match shown {
        Value::String(text) => println!("{text}"),
        v => println!("{}", pretty(v)),
    }
    eprintln!(
        "came out on routing key {routing_key} after {} ms",
        elapsed.as_millis()
    );
    let Answer::Failed { body, reason } = verdict else {
        return Ok(());
    };
    let error = body.get("error").and_then(Value::as_str).unwrap_or("");
    if !error.is_empty() {
        eprintln!("{}", error.trim_end());
    }
    Err(CliError::WorkerFailed(format!(
        "worker {} failed: {reason}",
        target.name
    )))
}

/// Why nothing came, as far as the store can tell.
fn no_answer(
    target: &Target,
    timeout: Duration,
    routed: bool,
    worker: Option<&WorkerOverview>,
) -> CliError {
    let name = &target.name;
    let why = match worker {
        Some(w) if !w.state.is_enabled() => format!(
            "the worker is {}; enable it: workerctl worker enable {name}",
            w.state
        ),
        Some(w) if w.status == Status::Error => {
            format!("the worker has status error: {}", w.status_info)
        }
        _ if !routed => format!(
            "no queue takes its messages: the worker never consumed; see workerctl worker show {name}"
        ),
        _ => format!("see workerctl worker logs {name}"),
    };
    CliError::Timeout(format!(
        "no answer from worker {name} within {}: {why}",
        humantime::format_duration(timeout)
    ))
}

async fn wait_if_asked(db: &Db, target: &Target, wait: &WaitArgs) -> Result<(), CliError> {
    if wait.wait {
        wait::until_ready(db, target, wait.wait_timeout).await
    } else {
        Ok(())
    }
}

fn check_name(name: &str) -> Result<(), CliError> {
    if name.trim().is_empty() {
        return Err(CliError::BadArgument(
            "a worker name cannot be empty".into(),
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(CliError::BadArgument(format!(
            "worker name {name:?} has control characters"
        )));
    }
    Ok(())
}
