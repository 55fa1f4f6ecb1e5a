//! The `workerctl` binary: parse the command line, load the configuration,
//! set up logging, wire the parts together and run. `anyhow` lives here only.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

use workerctl::backoff::{self, error_chain};
use workerctl::broker::{self, Reading};
use workerctl::cli::{Cli, Command};
use workerctl::config::{Backend, Config, LogFormat};
use workerctl::controller::Passes;
use workerctl::daemon::Daemon;
use workerctl::leader::LockSession;
use workerctl::metrics::Metrics;
use workerctl::model::Status;
use workerctl::plan::Verdict;
use workerctl::readiness::ReadyReports;
use workerctl::reconciler::services::ServiceReconciler;
use workerctl::reconciler::{Done, PassSettings, Planned, Reconciler};
use workerctl::runtime::docker::DockerRuntime;
use workerctl::scale::Demand;
use workerctl::store::Observed;
use workerctl::store::postgres::PgStore;
use workerctl::swarm::SwarmRuntime;
use workerctl::worker_cli;

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

/// The reconciler of a single pass, scaling on `depths` as the daemon's
/// would on its latest reading.
async fn reconciler(
    config: &Config,
    metrics: Arc<Metrics>,
    depths: Reading,
) -> Result<Reconciler<PgStore, DockerRuntime>> {
    let store = PgStore::connect(config.database_url.expose())?;
    let mut runtime = DockerRuntime::connect(&config.instance).await?;
    runtime.join_compose_project().await;
    // The pass only borrows the value: the sender may go at once.
    let (_, depths) = watch::channel(depths);
    Ok(Reconciler::new(
        Arc::new(store),
        Arc::new(runtime),
        PassSettings::from_config(config),
        metrics,
        Arc::new(ReadyReports::new(Arc::default())),
    )
    .reading_depths(depths))
}

/// One read of the queue depths (one management request), as the daemon's
/// poller makes it.
async fn depths(config: &Config) -> Reading {
    let (management, amqp) = (&config.scale.management_url, &config.amqp.url);
    broker::read_once(management.expose(), amqp.expose()).await
}

async fn plan(config: Config) -> Result<()> {
    let depths = depths(&config).await;
    match config.runtime.backend {
        Backend::Docker => {
            let reconciler = reconciler(&config, Arc::default(), depths.clone()).await?;
            let p = reconciler.dry_run().await?;
            print_plan("container", &p.actions, &p.observed, &p.verdicts, &depths);
        }
        Backend::Swarm => {
            let reconciler = service_reconciler(&config, depths.clone()).await?;
            let p = reconciler.dry_run().await?;
            print_plan("service", &p.actions, &p.observed, &p.verdicts, &depths);
        }
    }
    Ok(())
}

/// What a pass would do, on either backend: its actions, the replica counts
/// it would change, and the workers it cannot act on.
fn print_plan(
    what: &str,
    actions: &[impl std::fmt::Display],
    observed: &[Observed],
    verdicts: &[Verdict],
    depths: &Reading,
) {
    if actions.is_empty() {
        println!("no {what} changes: every {what} is in line with the store");
    }
    for action in actions {
        println!("{action}");
    }
    print_replicas(observed, depths);
    for verdict in verdicts.iter().filter(|v| v.status == Status::Error) {
        println!("error   worker {}: {}", verdict.id, verdict.info);
    }
}

/// The scaler's decisions in a plan: every replica count that differs from
/// what runs, with the demand behind it.
fn print_replicas(observed: &[Observed], depths: &Reading) {
    for o in observed {
        if o.desired_replicas == o.running_replicas {
            continue;
        }
        let ready = match depths.demand(o.id) {
            Demand::Ready(n) => format!("{n} message(s) ready"),
            Demand::NoQueue => "no queue yet".into(),
            Demand::Unknown => "queue depth unknown".into(),
        };
        println!(
            "{:<12} worker {}: {} wanted, {} running ({ready})",
            "replicas", o.id, o.desired_replicas, o.running_replicas
        );
    }
    if let Reading::Unavailable(why) = depths {
        println!("queue depths unknown: {why}; replica counts held");
    }
}

async fn reconcile_once(config: Config) -> Result<ExitCode> {
    // A pass beside a daemon that leads this instance would race it: take
    // the instance's lock for the pass, or refuse.
    let url = config.database_url.expose();
    let mut lock = LockSession::connect(url, &config.instance, config.leader_timing()).await?;
    if !lock.try_acquire().await? {
        let who = lock.holder().await.ok().flatten();
        anyhow::bail!(
            "instance {} is led by {}: a pass now would race it; stop that daemon first \
             (`workerctl plan` shows what a pass would do)",
            config.instance,
            who.as_deref().unwrap_or("a running daemon")
        );
    }
    let depths = depths(&config).await;
    // One pass: its actions run to their end, however long a stop takes.
    let all = Duration::from_secs(24 * 3600);
    let pass = async {
        match config.runtime.backend {
            Backend::Docker => {
                let mut reconciler = reconciler(&config, Arc::default(), depths).await?;
                let report = reconciler.pass().await?;
                Ok(report_pass(report.started, &reconciler.drain(all).await))
            }
            Backend::Swarm => {
                let mut reconciler = service_reconciler(&config, depths).await?;
                let report = Passes::pass(&mut reconciler).await?;
                Ok(report_pass(report.started, &reconciler.drain(all).await))
            }
        }
    };
    let result: Result<ExitCode> = pass.await;
    lock.release().await;
    result
}

/// Prints how a pass's actions went; failure if any failed.
fn report_pass<A: Planned>(started: usize, done: &[Done<A>]) -> ExitCode {
    let failures: Vec<String> = done
        .iter()
        .filter_map(|d| {
            let e = d.result.as_ref().err()?;
            Some(format!(
                "{} {}: {}",
                d.action.kind(),
                d.action.target(),
                error_chain(e)
            ))
        })
        .collect();
    println!("{started} action(s), {} failed", failures.len());
    for failure in &failures {
        println!("failed: {failure}");
    }
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The Swarm backend's reconciler of a single pass.
async fn service_reconciler(
    config: &Config,
    depths: Reading,
) -> Result<ServiceReconciler<PgStore, SwarmRuntime>> {
    let store = PgStore::connect(config.database_url.expose())?;
    let swarm = SwarmRuntime::connect(&config.instance, config.swarm_options()).await?;
    // The pass only borrows the value: the sender may go at once.
    let (_, depths) = watch::channel(depths);
    Ok(ServiceReconciler::new(
        Arc::new(store),
        Arc::new(swarm),
        PassSettings::from_config(config),
        Arc::default(),
    )
    .reading_depths(depths))
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
