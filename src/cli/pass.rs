//! `workerctl plan` and `reconcile --once`: one pass of the reconciler the
//! daemon runs, built the same way for either backend, without the daemon;
//! printed alike for both.

use crate::reconcile::containers::Containers;
use crate::reconcile::swarm::Services;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use tokio::sync::watch;

use crate::backoff::error_chain;
use crate::config::{Backend, Config};
use crate::leader::LockSession;
use crate::model::{Demand, Observed, Status};
use crate::readiness::ReadyReports;
use crate::reconcile::{
    Backend as ReconcileBackend, Done, PassPlan, PassSettings, Planned, Reconciler,
};
use crate::runtime::docker::DockerRuntime;
use crate::runtime::swarm::SwarmRuntime;
use crate::scale::depths::{self, Reading};
use crate::store::postgres::PgStore;

/// The reconciler of a single pass over `backend`, scaling on `depths` as
/// the daemon's would on its latest reading.
fn single_pass<B: ReconcileBackend>(
    config: &Config,
    backend: B,
    depths: Reading,
) -> Result<Reconciler<PgStore, B>> {
    let store = PgStore::connect(config.database_url.expose())?;
    // The pass only borrows the value: the sender may go at once.
    let (_, depths) = watch::channel(depths);
    let settings = PassSettings::from_config(config);
    Ok(Reconciler::new(Arc::new(store), backend, settings, Arc::default()).reading_depths(depths))
}

/// The container backend of a single pass.
async fn containers(config: &Config) -> Result<Containers<DockerRuntime>> {
    let mut runtime = DockerRuntime::connect(&config.instance).await?;
    runtime.join_compose_project().await;
    Ok(Containers::new(
        Arc::new(runtime),
        Arc::new(ReadyReports::new(Arc::default())),
        Arc::default(),
    ))
}

/// The Swarm backend of a single pass.
async fn services(config: &Config) -> Result<Services<SwarmRuntime>> {
    let swarm = SwarmRuntime::connect(&config.instance, config.swarm_options()).await?;
    Ok(Services::new(Arc::new(swarm)))
}

/// One read of the queue depths (one management request), as the daemon's
/// poller makes it.
async fn depths(config: &Config) -> Reading {
    let (management, amqp) = (&config.scale.management_url, &config.amqp.url);
    depths::read_once(management.expose(), amqp.expose()).await
}

/// `workerctl plan`: what one pass would do and why; changes nothing.
pub async fn plan(config: &Config) -> Result<()> {
    let depths = depths(config).await;
    match config.runtime.backend {
        Backend::Docker => {
            let backend = containers(config).await?;
            let p = single_pass(config, backend, depths.clone())?
                .dry_run()
                .await?;
            print_plan("container", &p, &depths);
        }
        Backend::Swarm => {
            let backend = services(config).await?;
            let p = single_pass(config, backend, depths.clone())?
                .dry_run()
                .await?;
            print_plan("service", &p, &depths);
        }
    }
    Ok(())
}

/// What a pass would do, on either backend: its actions, the replica counts
/// it would change, and the workers it cannot act on.
fn print_plan(what: &str, plan: &PassPlan<impl std::fmt::Display>, depths: &Reading) {
    if plan.actions.is_empty() {
        println!("no {what} changes: every {what} is in line with the store");
    }
    for action in &plan.actions {
        println!("{action}");
    }
    print_replicas(&plan.observed, depths);
    for verdict in plan.verdicts.iter().filter(|v| v.status == Status::Error) {
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

/// `workerctl reconcile --once`: one pass, under the instance's lock.
pub async fn reconcile_once(config: &Config) -> Result<ExitCode> {
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
    let depths = depths(config).await;
    let pass = async {
        match config.runtime.backend {
            Backend::Docker => {
                let backend = containers(config).await?;
                one_pass(single_pass(config, backend, depths)?).await
            }
            Backend::Swarm => {
                let backend = services(config).await?;
                one_pass(single_pass(config, backend, depths)?).await
            }
        }
    };
    let result: Result<ExitCode> = pass.await;
    lock.release().await;
    result
}

/// One pass, its actions run to their end however long a stop takes;
/// prints how they went.
async fn one_pass(mut reconciler: Reconciler<PgStore, impl ReconcileBackend>) -> Result<ExitCode> {
    let report = reconciler.pass().await?;
    let all = Duration::from_secs(24 * 3600);
    Ok(report_pass(report.started, &reconciler.drain(all).await))
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
