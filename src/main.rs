//! The `workerctl` binary: parse the command line, load the configuration,
//! set up logging, wire the parts together and run. `anyhow` lives here only.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

use workerctl::backoff::{self, error_chain};
use workerctl::cli::{Cli, Command, pass, triggers, worker};
use workerctl::config::{Backend, Config, LogFormat};
use workerctl::daemon::Daemon;
use workerctl::runtime::docker::DockerRuntime;
use workerctl::runtime::swarm::SwarmRuntime;
use workerctl::store::postgres::PgStore;

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
        Command::Plan => pass::plan(&config).await.map(|()| ExitCode::SUCCESS),
        Command::Reconcile(_) => pass::reconcile_once(&config).await,
        Command::Worker(cmd) => worker::execute(cmd, &config).await,
        Command::Schedule(cmd) => Ok(triggers::schedule(cmd, &config).await),
        Command::Errors(cmd) => Ok(triggers::errors(cmd, &config).await),
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

/// The daemon: migrations, then the parts of [`Daemon`] under one
/// cancellation token, until SIGTERM/SIGINT.
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
    let Some(mut runtime) = retry("connect to Docker", &shutdown, connect).await else {
        return Ok(());
    };
    if let Some(project) = runtime.join_compose_project().await {
        info!(%project, "in Compose project {project}: worker containers are its one-offs, removed by `docker compose down`");
    }
    let swarm = match config.runtime.backend {
        Backend::Docker => None,
        Backend::Swarm => {
            let connect = || SwarmRuntime::connect(&config.instance, config.swarm_options());
            let Some(swarm) = retry("reach a Swarm manager", &shutdown, connect).await else {
                return Ok(());
            };
            for limitation in swarm.limitations() {
                warn!("swarm backend: {limitation}");
            }
            Some(Arc::new(swarm))
        }
    };
    let listener = tokio::net::TcpListener::bind(config.code_server.listen).await?;
    info!(instance = %config.instance, backend = ?config.runtime.backend, image = %config.docker.image, network = %config.docker.network, "workerctl running");
    let daemon = Daemon::new(config, store, Arc::new(runtime));
    let daemon = match swarm {
        Some(swarm) => daemon.on_swarm(swarm),
        None => daemon,
    };
    daemon.spawn(listener, &tracker, &shutdown)?;
    tracker.close();
    tracker.wait().await;
    Ok(())
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
