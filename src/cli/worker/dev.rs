//! `workerctl worker dev`: the developer's loop in one terminal. Creates the
//! worker if it does not exist, then on each save of its code file
//! (filesystem notifications, debounced): update, wait until ready, invoke
//! the message if one is given, and print the result or the error with its
//! traceback — with the worker's logs streaming in between.
//!
//! A save that does not compile (checked with the local `python3`, when
//! there is one) is shown at once and never stored, so the revision that
//! runs keeps serving. Ctrl-C leaves the worker as it is, or deletes it with
//! `--rm`. Each round reuses the commands' own pieces (`store`, `wait`,
//! `invoke`, `logs`); nothing here is specific but the loop. With `--try`,
//! each save first runs the report of `worker try` on the worker's recorded
//! traffic (and with `--no-deploy` only that). With `--debug`, the worker's
//! containers run a debug adapter for as long as the loop runs, reached on
//! the host's loopback through `debug.rs`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use chrono::Utc;
use clap::Args;
use notify_debouncer_mini::notify::RecursiveMode;
use notify_debouncer_mini::{DebounceEventResult, new_debouncer};
use serde_json::Value;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use uuid::Uuid;

use super::{CliError, code, debug, logs, pretty, read_message, wait};
use crate::config::Config;
use crate::store::admin::{self, Changes, Db, DbError, NewWorker, Target};
use crate::triggers::invoke::{self, Answer, Outcome};

/// Saves closer together than this are one save (editors write in steps).
const DEBOUNCE: Duration = Duration::from_millis(300);

#[derive(Debug, Args)]
pub struct DevArgs {
    /// The worker's id, or its name (a new worker gets it).
    #[arg(value_name = "ID|NAME")]
    pub worker: String,
    /// The .py file (or .zip) to deploy on every save.
    #[arg(long, value_name = "FILE")]
    pub code: PathBuf,
    /// A pipeline message to invoke the worker with after each deploy.
    #[arg(long, value_name = "FILE")]
    pub message: Option<PathBuf>,
    /// Delete the worker on Ctrl-C (default: leave it as it is).
    #[arg(long)]
    pub rm: bool,
    /// How long each invocation waits for its answer.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// How long each deploy waits to be ready.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    pub wait_timeout: Duration,
    /// Before each deploy, run the saved code on the worker's last N
    /// recorded messages beside the running revision and print what
    /// changes (as `workerctl worker try --last N`).
    #[arg(long = "try", value_name = "N", num_args = 0..=1, default_missing_value = "20")]
    pub try_last: Option<i64>,
    /// With --try: only the report, never deploy (the running revision stays).
    #[arg(long, requires = "try_last")]
    pub no_deploy: bool,
    /// Run the worker's containers with a debug adapter (debugpy) for as
    /// long as this runs, and offer it on 127.0.0.1:--debug-port to a DAP
    /// client (VS Code: attach). The session survives saves.
    #[arg(long)]
    pub debug: bool,
    /// The port on 127.0.0.1 a debug client attaches to.
    #[arg(long, value_name = "PORT", default_value_t = 5678, requires = "debug")]
    pub debug_port: u16,
}

/// Runs the loop until Ctrl-C.
pub(super) async fn dev(config: &Config, a: DevArgs) -> Result<(), CliError> {
    let db = admin::connect(config.database_url.expose()).await?;
    let target = ensure_worker(&db, &a).await?;
    let (tx, mut saves) = mpsc::unbounded_channel();
    let watched = absolute(&a.code);
    let mut debouncer = new_debouncer(DEBOUNCE, move |events: DebounceEventResult| {
        if let Ok(events) = events
            && events.iter().any(|e| absolute(&e.path) == watched)
        {
            let _ = tx.send(());
        }
    })
    .map_err(|e| CliError::BadArgument(format!("cannot watch files: {e}")))?;
    // The folder, not the file: editors save by writing a new file and
    // renaming it over the old one.
    let folder = absolute(&a.code)
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    debouncer
        .watcher()
        .watch(&folder, RecursiveMode::NonRecursive)
        .map_err(|e| CliError::BadArgument(format!("cannot watch {}: {e}", folder.display())))?;
    let debugging = match a.debug {
        true => Some(start_debugging(&db, config, &target, &a).await?),
        false => None,
    };
    let follow = tokio::spawn(follow_logs(config.instance.clone(), target.id));
    eprintln!(
        "workerctl: watching {} for worker {} ({}); Ctrl-C to stop",
        a.code.display(),
        target.name,
        target.id
    );
    // One SIGINT stream for the whole loop: a Ctrl-C during a round is
    // not lost, and ends the round.
    let mut interrupt = signal(SignalKind::interrupt())
        .map_err(|e| CliError::BadArgument(format!("cannot catch Ctrl-C: {e}")))?;
    let mut first = true;
    loop {
        if !first {
            tokio::select! {
                // Both arms are cancel-safe.
                _ = interrupt.recv() => break,
                Some(()) = saves.recv() => while saves.try_recv().is_ok() {},
            }
        }
        if let Some(last) = a.try_last {
            // Not cut short by Ctrl-C (the signal waits in `interrupt`): a
            // try container must be removed by the try that made it.
            try_save(&db, config, &target, &a, last).await;
        }
        if !a.no_deploy {
            tokio::select! {
                // A round cut short leaves at most a stored revision that the
                // daemon deploys anyway.
                _ = interrupt.recv() => break,
                () = round(&db, config, &target, &a, first) => {}
            }
        }
        first = false;
    }
    follow.abort();
    drop(debouncer);
    if let Some(server) = debugging {
        server.abort();
        stop_debugging(&db, &target, a.rm).await;
    }
    finish(&db, &target, a.rm).await
}

/// Binds the debug port (first: a port in use is an error before anything
/// changes), turns the worker's debug adapter on and serves the port.
async fn start_debugging(
    db: &Db,
    config: &Config,
    target: &Target,
    a: &DevArgs,
) -> Result<tokio::task::JoinHandle<()>, CliError> {
    let at = std::net::SocketAddr::from(([127, 0, 0, 1], a.debug_port));
    let listener = tokio::net::TcpListener::bind(at).await.map_err(|e| {
        CliError::BadArgument(format!(
            "cannot listen on {at} for the debugger: {e}; give another --debug-port"
        ))
    })?;
    let runtime = std::sync::Arc::new(logs::docker(&config.instance).await?);
    let id = crate::model::WorkerId(target.id);
    if !crate::store::debug::set(db.pool(), id, true)
        .await
        .map_err(|e| db.store_failed(e))?
    {
        return Err(CliError::UnknownId(target.id));
    }
    let local = absolute(&a.code).display().to_string();
    eprintln!(
        "workerctl: debugger on {at}; VS Code's launch configuration (launch.json):\n{}",
        debug::launch_configuration(&target.name, a.debug_port, &local)
    );
    Ok(tokio::spawn(debug::serve(listener, runtime, target.id)))
}

/// Turns the debug adapter off again: the daemon replaces the container
/// with one without it.
async fn stop_debugging(db: &Db, target: &Target, removed: bool) {
    if removed {
        return; // The row goes with the worker.
    }
    let id = crate::model::WorkerId(target.id);
    match crate::store::debug::set(db.pool(), id, false).await {
        Ok(_) => println!(
            "worker {}: debugging off; the daemon restarts it without the debug adapter",
            target.name
        ),
        Err(e) => eprintln!(
            "workerctl: cannot turn debugging off ({}); run `workerctl worker dev {} --code FILE` \
             and stop it, or delete the row of workerctl_worker_debug",
            crate::backoff::error_chain(&e),
            target.name
        ),
    }
}

async fn finish(db: &Db, target: &Target, rm: bool) -> Result<(), CliError> {
    if rm {
        db.delete(target.id).await?;
        println!(
            "worker {} deleted; the daemon removes its container",
            target.name
        );
    } else {
        println!("worker {} left as it is", target.name);
    }
    Ok(())
}

fn absolute(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// The worker named, made with the file's code if there is none (a broken
/// first file makes it with the default code, so that the loop can start).
async fn ensure_worker(db: &Db, a: &DevArgs) -> Result<Target, CliError> {
    match db.resolve(&a.worker).await {
        Ok(target) => return Ok(target),
        Err(DbError::UnknownName(_)) => {}
        Err(e) => return Err(e.into()),
    }
    let source = match code::read(&a.code) {
        Ok(c) => c.archive().to_vec(),
        Err(_) => crate::archive::sensorbucket_archive(crate::archive::DEFAULT_USERCODE)
            .map_err(|e| CliError::BadArgument(format!("cannot build the code archive: {e}")))?,
    };
    let new = NewWorker {
        id: Uuid::now_v7(),
        name: a.worker.clone(),
        description: "workerctl worker dev".into(),
        enabled: true,
        entrypoint: code::DEFAULT_ENTRYPOINT.into(),
        source,
    };
    db.create(&new).await?;
    eprintln!("workerctl: created worker {} ({})", new.name, new.id);
    Ok(Target {
        id: new.id,
        name: new.name,
    })
}

/// One save: check, store, wait, invoke. Every failure is printed; none
/// ends the loop.
async fn round(db: &Db, config: &Config, target: &Target, a: &DevArgs, first: bool) {
    let stamp = Utc::now().format("%H:%M:%S");
    match deploy(db, target, a, first).await {
        Ok(Some(revision)) => eprintln!("── {stamp} revision {revision} ready ──"),
        Ok(None) => return,
        Err(e) => {
            eprintln!("── {stamp} not deployed ──");
            eprintln!("workerctl: {}", e.one_line());
            return;
        }
    }
    if let Some(path) = &a.message
        && let Err(e) = call(config, target, path, a.timeout).await
    {
        eprintln!("workerctl: {}", e.one_line());
    }
}

/// What the saved code changes on the worker's recorded traffic, beside
/// the running revision (the report of `worker try`).
async fn try_save(db: &Db, config: &Config, target: &Target, a: &DevArgs, last: i64) {
    let stamp = Utc::now().format("%H:%M:%S");
    let candidate = match code::read(&a.code) {
        Ok(c) => c.archive().to_vec(),
        Err(e) => return eprintln!("workerctl: {}", e.one_line()),
    };
    let request = crate::trial::Request {
        worker: target.clone(),
        candidate,
        inputs: crate::trial::Inputs::Last(last),
        message_timeout: crate::trial::DEFAULT_MESSAGE_TIMEOUT,
    };
    let settings = crate::trial::Settings::from_config(config);
    match crate::trial::run(db, &settings, request).await {
        Ok(report) => {
            super::trial::print_report(&report, super::Output::Table);
            eprintln!(
                "── {stamp} tried on {} recorded messages ──",
                report.summary.messages
            );
        }
        Err(e) => eprintln!("workerctl: try: {}", crate::backoff::error_chain(&e)),
    }
}

/// Stores the file's code if it changed and compiles, then waits until
/// it runs. `None`: nothing to do (an unchanged save).
async fn deploy(
    db: &Db,
    target: &Target,
    a: &DevArgs,
    first: bool,
) -> Result<Option<i32>, CliError> {
    let new = code::read(&a.code)?;
    code::check_callable(&new, &a.code, code::DEFAULT_ENTRYPOINT)?;
    if let code::Code::Python { usercode, .. } = &new {
        syntax_check(&a.code, usercode)?;
    }
    let (changes, revision) = db
        .update(target, |current| {
            Ok::<_, CliError>(if new.same_as(current.source.as_deref()) {
                Changes::default()
            } else {
                Changes {
                    source: Some(new.archive().to_vec()),
                    ..Changes::default()
                }
            })
        })
        .await?;
    if changes.is_empty() && !first {
        return Ok(None);
    }
    if db.set_state(target.id, true).await?.is_none() {
        return Err(CliError::UnknownId(target.id));
    }
    wait::until_ready(db, target, a.wait_timeout).await?;
    Ok(Some(revision))
}

/// Compiles the code read (the very bytes that would be stored, given on
/// stdin) with the local `python3`, if there is one: a syntax error is shown
/// at once, with its line and caret, and nothing is stored.
fn syntax_check(path: &Path, usercode: &str) -> Result<(), CliError> {
    use std::io::Write as _;
    const CHECK: &str = "import ast, sys\n\
        src = sys.stdin.read()\n\
        try:\n    ast.parse(src, 'usercode.py')\n\
        except SyntaxError as e:\n\
        \x20   line = (e.text or '').rstrip()\n\
        \x20   print(f'  File \"usercode.py\", line {e.lineno}\\n    {line}\\n    {\" \" * max((e.offset or 1) - 1, 0)}^\\nSyntaxError: {e.msg}')\n\
        \x20   sys.exit(1)\n";
    let child = Command::new("python3")
        .arg("-c")
        .arg(CHECK)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut child) = child else {
        return Ok(()); // No python3 here: the worker's container will say.
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(usercode.as_bytes());
    }
    let Ok(out) = child.wait_with_output() else {
        return Ok(());
    };
    if out.status.success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{}", text.trim_end());
    let last = text
        .lines()
        .last()
        .unwrap_or("syntax error")
        .trim()
        .to_string();
    Err(CliError::BadCode {
        path: path.to_path_buf(),
        problem: format!("{last}; the running revision keeps serving"),
    })
}

/// Invokes the worker with the message and prints what came out.
async fn call(
    config: &Config,
    target: &Target,
    path: &Path,
    timeout: Duration,
) -> Result<(), CliError> {
    let message = read_message(path)?;
    let now_ms = Utc::now().timestamp_millis();
    let prepared =
        invoke::prepare(message, target.id, now_ms, Uuid::new_v4).map_err(|problem| {
            CliError::BadMessage {
                path: path.to_path_buf(),
                problem,
            }
        })?;
    let quiet = |_: Uuid| {};
    match invoke::invoke(&config.amqp, target.id, &prepared, timeout, &quiet).await? {
        Outcome::Answer {
            routing_key,
            body,
            elapsed,
        } => {
            match invoke::verdict(&routing_key, &body) {
                Answer::Output(v) => {
                    println!("{}", pretty(&v));
                    eprintln!("── output after {} ms ──", elapsed.as_millis());
                }
                Answer::Failed { body, reason } => {
                    let error = body.get("error").and_then(Value::as_str).unwrap_or("");
                    eprintln!("{}", error.trim_end());
                    eprintln!("── process failed: {reason} ──");
                }
            }
            Ok(())
        }
        Outcome::TimedOut { .. } => Err(CliError::Timeout(format!(
            "no answer from worker {} within {}",
            target.name,
            humantime::format_duration(timeout)
        ))),
    }
}

/// Streams the worker's logs from now on, across its restarts and new
/// revisions, until aborted.
async fn follow_logs(instance: String, id: Uuid) {
    let Ok(docker) = logs::docker(&instance).await else {
        eprintln!("workerctl: Docker is not reachable; no logs");
        return;
    };
    let request = logs::LogRequest {
        follow: true,
        since: Some(Utc::now()),
        tail: None,
        timestamps: false,
    };
    loop {
        if let Ok(Some(container)) = logs::container_of(&docker, id).await {
            eprintln!("workerctl: logs of container {}", container.name);
            let _ = logs::print(&docker, id, container, &request).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
