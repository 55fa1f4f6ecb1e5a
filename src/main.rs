//! The `workerctl` binary: parse the command line, load the configuration,
//! set up logging, wire the parts together and run. `anyhow` lives here only.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

use workerctl::backoff::{self, error_chain};
use workerctl::cli::{Cli, Command};
use workerctl::config::{Config, LogFormat};
use workerctl::metrics::Metrics;
use workerctl::model::Status;
use workerctl::reconciler::{PassSettings, Reconciler};
use workerctl::runtime::docker::DockerRuntime;
use workerctl::store::postgres::{self, PgStore};
use workerctl::{controller, http, worker_cli};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut config = match Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("workerctl: {}", error_chain(&e));
            return ExitCode::from(2);
        }
    };
    if matches!(
        cli.command,
        Command::Worker(_) | Command::Schedule(_) | Command::Errors(_)
    ) {
        // Worker commands report every failure themselves, on one line;
        // library logs would only get in the way (RUST_LOG still shows them).
        config.log.filter = "off".into();
    }
    init_logging(&config);
    match dispatch(cli.command, config).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("workerctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command, config: Config) -> Result<ExitCode> {
    match command {
        Command::Run => run(config).await.map(|()| ExitCode::SUCCESS),
        Command::Migrate => {
            PgStore::connect(config.database_url.expose())?
                .migrate()
                .await?;
            println!("migrations applied");
            Ok(ExitCode::SUCCESS)
        }
        Command::Plan => plan(config).await.map(|()| ExitCode::SUCCESS),
        Command::Reconcile(_) => reconcile_once(config).await,
        Command::Worker(cmd) => worker_cli::execute(cmd, &config).await,
        Command::Schedule(cmd) => Ok(workerctl::trigger_cli::schedule(cmd, &config).await),
        Command::Errors(cmd) => Ok(workerctl::trigger_cli::errors(cmd, &config).await),
    }
}

fn init_logging(config: &Config) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log.filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log.format {
        // One JSON object per line, with the fields of the current span
        // (`span`) and of every enclosing one (`spans`: pass, action).
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init(),
        LogFormat::Text => builder.init(),
    }
}

async fn reconciler(
    config: &Config,
    metrics: Arc<Metrics>,
) -> Result<Reconciler<PgStore, DockerRuntime>> {
    let store = PgStore::connect(config.database_url.expose())?;
    let runtime = DockerRuntime::connect(&config.instance).await?;
    Ok(Reconciler::new(
        Arc::new(store),
        Arc::new(runtime),
        PassSettings::from_config(config),
        metrics,
    ))
}

async fn plan(config: Config) -> Result<()> {
    let plan = reconciler(&config, Arc::default()).await?.dry_run().await?;
    if plan.actions.is_empty() {
        println!("no container changes: every container is in line with the store");
    }
    for action in &plan.actions {
        println!("{action}");
    }
    let blocked = plan.verdicts.iter().filter(|v| v.status == Status::Error);
    for verdict in blocked {
        println!("error   worker {}: {}", verdict.id, verdict.info);
    }
    Ok(())
}

async fn reconcile_once(config: Config) -> Result<ExitCode> {
    let report = reconciler(&config, Arc::default()).await?.pass().await?;
    println!(
        "{} action(s), {} failed",
        report.actions,
        report.failures.len()
    );
    for failure in &report.failures {
        println!("failed: {failure}");
    }
    Ok(if report.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The daemon: migrations, then the HTTP server, the wake-up sources and the
/// control loop, all under one cancellation token.
async fn run(config: Config) -> Result<()> {
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    tracker.spawn(on_signal(shutdown.clone()));
    let store = Arc::new(PgStore::connect(config.database_url.expose())?);
    if retry("apply migrations", &shutdown, || store.migrate())
        .await
        .is_none()
    {
        return Ok(());
    }
    let connect = || DockerRuntime::connect(&config.instance);
    let Some(runtime) = retry("connect to Docker", &shutdown, connect).await else {
        return Ok(());
    };
    let runtime = Arc::new(runtime);
    let metrics = Arc::new(Metrics::new());
    let wake = Arc::new(Notify::new());
    spawn_http(&tracker, &config, &store, &runtime, &metrics, &shutdown);
    spawn_wake_sources(&tracker, &config, &runtime, &metrics, &wake, &shutdown);
    spawn_triggers(&tracker, &config, &store, &shutdown);

    let settings = PassSettings::from_config(&config);
    let reconciler = Reconciler::new(store, runtime, settings, metrics);
    info!(instance = %config.instance, image = %config.docker.image, network = %config.docker.network, "workerctl running");
    controller::run(
        reconciler,
        wake,
        config.reconcile.interval,
        shutdown.clone(),
    )
    .await;
    shutdown.cancel();
    tracker.close();
    tracker.wait().await;
    Ok(())
}

/// The HTTP server; if it cannot serve, the daemon shuts down.
fn spawn_http(
    tracker: &TaskTracker,
    config: &Config,
    store: &Arc<PgStore>,
    runtime: &Arc<DockerRuntime>,
    metrics: &Arc<Metrics>,
    shutdown: &CancellationToken,
) {
    let state = http::AppState {
        store: store.clone(),
        metrics: metrics.clone(),
        instance: config.instance.as_str().into(),
        pool: store.pool().clone(),
        probes: Arc::new([
            http::Probe::database(store.clone()),
            http::Probe::docker(runtime.clone()),
        ]),
    };
    let listen = config.code_server.listen;
    let api = http::api::routes(http::api::ApiState {
        db: workerctl::store::admin::Db::from_pool(store.pool().clone()),
        amqp: config.amqp.clone(),
        token: config.api.token.clone(),
    });
    let server = http::serve_with(listen, state, api, shutdown.clone());
    let stop = shutdown.clone();
    tracker.spawn(async move {
        if let Err(e) = server.await {
            error!("HTTP server on {listen} failed: {e}; shutting down");
            stop.cancel();
        }
    });
}

/// What wakes the loop besides its tick: Postgres notifications from the
/// `user_workers` trigger, and Docker events of managed containers.
fn spawn_wake_sources(
    tracker: &TaskTracker,
    config: &Config,
    runtime: &Arc<DockerRuntime>,
    metrics: &Arc<Metrics>,
    wake: &Arc<Notify>,
    shutdown: &CancellationToken,
) {
    let url = config.database_url.expose().to_string();
    let (w, m) = (wake.clone(), metrics.clone());
    tracker.spawn(postgres::listen_with(url, shutdown.clone(), move |why| {
        if why == postgres::Wake::Changed {
            m.change_announced();
        }
        w.notify_one();
    }));
    let (rt, w, s) = (runtime.clone(), wake.clone(), shutdown.clone());
    tracker.spawn(async move { rt.events(w, s).await });
}

/// The triggers beside the loop: the cron schedules' firing loop and the
/// dead-letter collector (each can be turned off in the config).
fn spawn_triggers(
    tracker: &TaskTracker,
    config: &Config,
    store: &Arc<PgStore>,
    shutdown: &CancellationToken,
) {
    use workerctl::{dead_letters, scheduler};
    if config.schedules.enabled {
        tracker.spawn(scheduler::run(
            scheduler::PgSchedules(store.pool().clone()),
            scheduler::AmqpPublisher::new(config.amqp.clone()),
            scheduler::SystemClock,
            config.schedules.poll,
            shutdown.clone(),
        ));
    }
    if config.dead_letters.enabled {
        tracker.spawn(dead_letters::run(
            config.amqp.clone(),
            store.pool().clone(),
            config.dead_letters.clone(),
            shutdown.clone(),
        ));
    }
}

/// Retries `op` with capped exponential backoff until it succeeds, or gives
/// up (`None`) when shutdown is requested. Used only at start-up: services
/// may come up after the daemon.
async fn retry<T, E, F, Fut>(what: &str, shutdown: &CancellationToken, mut op: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
    E: std::error::Error,
{
    for attempt in 0u32.. {
        let delay = backoff::delay(Duration::from_millis(250), Duration::from_secs(15), attempt);
        match op().await {
            Ok(value) => return Some(value),
            Err(e) => warn!("cannot {what}, retrying in {delay:?}: {}", error_chain(&e)),
        }
        tokio::select! {
            // Both arms are cancel-safe.
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    None
}

/// Cancels `shutdown` on SIGTERM or SIGINT.
async fn on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        // All arms are cancel-safe.
        _ = term.recv() => info!("SIGTERM: finishing the actions in flight"),
        _ = int.recv() => info!("SIGINT: finishing the actions in flight"),
        _ = shutdown.cancelled() => {}
    }
    shutdown.cancel();
}
