//! The daemon, assembled once, on either backend (plain containers, or one
//! Swarm service per worker): the HTTP server (worker code, ready reports,
//! status page, probes, metrics, the invoke API), the wake-up sources
//! (Postgres LISTEN, Docker events, ready reports), the triggers (cron
//! schedules, the dead-letter collector) and the control loop, all under one
//! cancellation token. `main.rs`, the integration tests and the benchmark
//! all start the daemon through [`Daemon::spawn`], so what they test is
//! what runs.

use crate::reconcile::containers::Containers;
use crate::reconcile::swarm::Services;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;
use tracing::{error, warn};

use crate::backoff::error_chain;
use crate::consumers::ConsumerCounts;
use crate::scale::depths::{self, QueueMonitor, Reading};

use crate::config::Config;
use crate::controller::{self, LoopSettings};
use crate::http;
use crate::leader::Leadership;
use crate::metrics::Metrics;
use crate::readiness::ReadyReports;
use crate::reconcile::{Backend, PassSettings, Reconciler};
use crate::runtime::ContainerRuntime;
use crate::runtime::docker::DockerRuntime;
use crate::runtime::swarm::SwarmRuntime;
use crate::status_page;
use crate::store::WorkerStore;
use crate::store::postgres::{self, PgStore};

/// Called when the store announces a change (a benchmark times from it).
type OnChange = Arc<dyn Fn() + Send + Sync>;

/// What a daemon is made of, before it runs. The control loop reads and acts
/// through `S` and `R`: the Postgres store and the Docker runtime, or
/// wrappers of them (the benchmark counts calls through its own).
pub struct Daemon<S = PgStore, R = DockerRuntime> {
    pub config: Config,
    pub store: Arc<PgStore>,
    pub runtime: Arc<DockerRuntime>,
    loop_store: Arc<S>,
    loop_runtime: Arc<R>,
    /// The database the LISTEN connection uses; `database_url` unless set
    /// (tests point it through a relay they can cut).
    pub listen_url: String,
    pub metrics: Arc<Metrics>,
    on_change: Option<OnChange>,
    /// Set: the Swarm backend (`runtime.backend = "swarm"`), one service per
    /// worker through this manager; unset: plain containers.
    swarm: Option<Arc<SwarmRuntime>>,
}

/// A daemon that runs: what its parts share, for those who watch it.
pub struct Running {
    pub wake: Arc<Notify>,
    pub reports: Arc<ReadyReports>,
    pub metrics: Arc<Metrics>,
    /// Where the HTTP server listens.
    pub http: SocketAddr,
    /// Whether this daemon leads its instance (and acts) or stands by.
    pub leadership: Leadership,
}

impl Daemon {
    /// A daemon on `store` and `runtime`, configured by `config`.
    pub fn new(config: Config, store: Arc<PgStore>, runtime: Arc<DockerRuntime>) -> Self {
        Daemon {
            listen_url: config.database_url.expose().to_string(),
            config,
            loop_store: store.clone(),
            loop_runtime: runtime.clone(),
            store,
            runtime,
            metrics: Arc::new(Metrics::new()),
            on_change: None,
            swarm: None,
        }
    }
}

/// What the control loop is given besides its backend.
struct Looping {
    leadership: Leadership,
    depths: watch::Receiver<Reading>,
    wake: Arc<Notify>,
    /// Dropped once the loop has drained: releases the lock.
    release: DropGuard,
}

impl<S: WorkerStore, R: ContainerRuntime> Daemon<S, R> {
    /// The same daemon, whose control loop goes through `store` and `runtime`.
    pub fn looping_through<S2, R2>(self, store: Arc<S2>, runtime: Arc<R2>) -> Daemon<S2, R2> {
        Daemon {
            config: self.config,
            store: self.store,
            runtime: self.runtime,
            loop_store: store,
            loop_runtime: runtime,
            listen_url: self.listen_url,
            metrics: self.metrics,
            on_change: self.on_change,
            swarm: self.swarm,
        }
    }

    /// The same daemon on the Swarm backend: its loop plans services and
    /// acts through `swarm` (a manager); Docker events of the manager's
    /// own task containers still wake it.
    pub fn on_swarm(mut self, swarm: Arc<SwarmRuntime>) -> Self {
        self.swarm = Some(swarm);
        self
    }

    /// Calls `f` whenever the store announces a change.
    pub fn on_change(mut self, f: impl Fn() + Send + Sync + 'static) -> Self {
        self.on_change = Some(Arc::new(f));
        self
    }

    /// Starts every part on `tracker`, serving HTTP on `listener`, until
    /// `shutdown` is cancelled; the loop then waits for the actions in
    /// flight (at most the stop grace period, and a little more).
    pub fn spawn(
        self,
        listener: TcpListener,
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
    ) -> std::io::Result<Running> {
        let wake = Arc::new(Notify::new());
        let reports = Arc::new(ReadyReports::new(wake.clone()));
        let addr = listener.local_addr()?;
        // The lock is held until the loop has drained its actions: an action
        // in flight at shutdown confirms the lock before its first Docker
        // call, and must still find it held.
        let drained = CancellationToken::new();
        let leadership = self.spawn_campaign(&wake, tracker, shutdown, &drained);
        self.spawn_http(listener, &reports, &leadership, tracker, shutdown);
        self.spawn_wake_sources(&wake, tracker, shutdown);
        self.spawn_triggers(tracker, shutdown);
        let depths = self.spawn_depth_poller(&wake, tracker, shutdown);
        let pass_settings = PassSettings::from_config(&self.config);
        let looping = Looping {
            leadership: leadership.clone(),
            depths,
            wake: wake.clone(),
            release: drained.drop_guard(),
        };
        match &self.swarm {
            None => {
                let containers = Containers::new(
                    self.loop_runtime.clone(),
                    reports.clone(),
                    self.metrics.clone(),
                )
                .counting_consumers(ConsumerCounts::spawn(
                    self.config.amqp.url.expose().to_string(),
                    wake.clone(),
                    tracker,
                    shutdown,
                ));
                self.spawn_loop(containers, pass_settings, looping, tracker, shutdown);
            }
            Some(swarm) => {
                let services = Services::new(swarm.clone());
                self.spawn_loop(services, pass_settings, looping, tracker, shutdown);
            }
        }
        Ok(Running {
            wake,
            reports,
            metrics: self.metrics,
            http: addr,
            leadership,
        })
    }

    /// Runs the control loop over `backend` until shutdown; the lock is
    /// released once it has drained its actions.
    fn spawn_loop(
        &self,
        backend: impl Backend,
        pass_settings: PassSettings,
        looping: Looping,
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
    ) {
        let config = &self.config;
        let settings = LoopSettings {
            resync: config.reconcile.interval,
            drain: config.docker.stop_timeout + std::time::Duration::from_secs(5),
        };
        let reconciler = Reconciler::new(
            self.loop_store.clone(),
            backend,
            pass_settings,
            self.metrics.clone(),
        )
        .led_by(looping.leadership)
        .reading_depths(looping.depths);
        let stop = shutdown.clone();
        tracker.spawn(async move {
            controller::run(reconciler, looping.wake, settings, stop).await;
            drop(looping.release);
        });
    }

    /// Campaigns for the leadership of the instance (Postgres advisory lock
    /// on a connection of its own), and wakes the loop whenever the role
    /// changes: a daemon that starts leading passes at once. The lock is
    /// released once `drained` is cancelled (the loop has ended, after
    /// shutdown), so a standby takes over without waiting.
    fn spawn_campaign(
        &self,
        wake: &Arc<Notify>,
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
        drained: &CancellationToken,
    ) -> Leadership {
        let config = &self.config;
        let leadership = Leadership::new(
            config.database_url.expose(),
            &config.instance,
            config.leader_timing(),
        );
        let (l, s) = (leadership.clone(), drained.clone());
        tracker.spawn(async move { l.run(s).await });
        let (mut roles, w, s) = (leadership.subscribe(), wake.clone(), shutdown.clone());
        let metrics = self.metrics.clone();
        tracker.spawn(async move {
            loop {
                tokio::select! {
                    // Cancel-safe: `changed` loses no change when dropped.
                    () = s.cancelled() => return,
                    changed = roles.changed() => match changed {
                        Ok(()) => {
                            metrics.scale.set_leader(roles.borrow().is_leader());
                            w.notify_one();
                        }
                        Err(_) => return,
                    },
                }
            }
        });
        leadership
    }

    /// The HTTP server; if it cannot serve, the daemon shuts down.
    fn spawn_http(
        &self,
        listener: TcpListener,
        reports: &Arc<ReadyReports>,
        leadership: &Leadership,
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
    ) {
        let state = http::AppState {
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            instance: self.config.instance.as_str().into(),
            pool: self.store.pool().clone(),
            probes: Arc::new([
                http::Probe::database(self.store.clone()),
                http::Probe::docker(self.runtime.clone()),
            ]),
            reports: reports.clone(),
            leadership: Some(leadership.clone()),
            backend: Arc::new(match &self.swarm {
                None => status_page::Backend::docker(),
                Some(swarm) => status_page::Backend {
                    name: "swarm".into(),
                    limitations: swarm.limitations().into_iter().map(String::from).collect(),
                },
            }),
            read_taps: crate::recorder::Reader::from_config(&self.config).map(|reader| {
                let reads = crate::recorder::status_reads(reader, self.store.pool().clone());
                Arc::new(reads) as Arc<dyn Fn() + Send + Sync>
            }),
        };
        let api = http::api::routes(http::api::ApiState {
            db: crate::store::admin::Db::from_pool(self.store.pool().clone()),
            amqp: self.config.amqp.clone(),
            token: self.config.api.token.clone(),
            trial: crate::trial::Settings::from_config(&self.config),
        });
        let server = http::serve_with(listener, state, api, shutdown.clone());
        let stop = shutdown.clone();
        tracker.spawn(async move {
            if let Err(e) = server.await {
                error!("HTTP server failed: {e}; shutting down");
                stop.cancel();
            }
        });
    }

    /// Reads every worker queue's depth each `scale.poll_interval` (one
    /// management request) and wakes the loop when the reading changes. No
    /// `scale.management_url`: no poller, depths stay unknown and every
    /// worker holds its replica count (min replicas, 1 by default).
    fn spawn_depth_poller(
        &self,
        wake: &Arc<Notify>,
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
    ) -> watch::Receiver<Reading> {
        let config = &self.config;
        let (tx, rx) = watch::channel(Reading::NotYet);
        let url = config.scale.management_url.expose();
        if url.is_empty() {
            tx.send_replace(Reading::Unavailable(depths::NO_MANAGEMENT_URL.into()));
            return rx;
        }
        match QueueMonitor::new(url, config.amqp.url.expose()) {
            Ok(monitor) => {
                let metrics = self.metrics.clone();
                tracker.spawn(depths::poll(
                    Arc::new(monitor),
                    config.scale.poll_interval,
                    tx,
                    wake.clone(),
                    shutdown.clone(),
                    move |ok| metrics.scale.depth_read(ok),
                ));
            }
            Err(e) => {
                warn!("no autoscaling: {}", error_chain(&e));
                tx.send_replace(Reading::Unavailable(error_chain(&e)));
            }
        }
        rx
    }

    /// The triggers beside the loop: the cron schedules' firing loop, the
    /// dead-letter collector and the traffic recorder (each can be turned
    /// off in the config).
    fn spawn_triggers(&self, tracker: &TaskTracker, shutdown: &CancellationToken) {
        use crate::recorder;
        use crate::triggers::{dead_letters, firing};
        let config = &self.config;
        if config.schedules.enabled {
            tracker.spawn(firing::run(
                firing::PgSchedules(self.store.pool().clone()),
                firing::AmqpPublisher::new(config.amqp.clone()),
                firing::SystemClock,
                config.schedules.poll,
                shutdown.clone(),
            ));
        }
        if config.dead_letters.enabled {
            tracker.spawn(dead_letters::run(
                config.amqp.clone(),
                self.store.pool().clone(),
                config.dead_letters.clone(),
                shutdown.clone(),
            ));
        }
        if config.record.enabled {
            let (runtime, image) = (self.runtime.clone(), config.docker.image.clone());
            let records_itself: recorder::RecordsItself = Arc::new(move || {
                let (runtime, image) = (runtime.clone(), image.clone());
                Box::pin(async move { runtime.records_itself(&image).await })
            });
            tracker.spawn(recorder::run(
                config.amqp.clone(),
                self.store.pool().clone(),
                config.record.clone(),
                config.instance.clone(),
                records_itself,
                shutdown.clone(),
            ));
        }
    }

    /// What wakes the loop besides its tick and the ready reports: Postgres
    /// notifications from the `user_workers` trigger, Docker events of
    /// managed containers, and on the Swarm backend the swarm's node events.
    fn spawn_wake_sources(
        &self,
        wake: &Arc<Notify>,
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
    ) {
        let (w, m, hook) = (wake.clone(), self.metrics.clone(), self.on_change.clone());
        let url = self.listen_url.clone();
        tracker.spawn(postgres::listen_with(url, shutdown.clone(), move |why| {
            if why == postgres::Wake::Changed {
                m.change_announced();
                if let Some(hook) = &hook {
                    hook();
                }
            }
            w.notify_one();
        }));
        let (rt, w, s) = (self.runtime.clone(), wake.clone(), shutdown.clone());
        tracker.spawn(async move { rt.events(w, s).await });
        if let Some(swarm) = &self.swarm {
            let (swarm, w, s) = (swarm.clone(), wake.clone(), shutdown.clone());
            tracker.spawn(async move { swarm.node_events(w, s).await });
        }
    }
}
