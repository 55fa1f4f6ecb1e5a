//! The daemon end to end on real services: a fresh Postgres database per test
//! (`#[sqlx::test]`, which reads DATABASE_URL), the real Docker engine, and a
//! stand-in worker image built from busybox in the test setup (never pulled).
//! Each test runs the real control loop under its own `instance`, so tests
//! never see each other's containers, and removes its containers at the end.
//!
//! Without Postgres, Docker or `workerctl/busybox:latest`
//! (`scripts/build-images`) these tests fail; they never skip.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use workerctl::reconcile::containers::Containers;

use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;
use workerctl::archive::{DEFAULT_USERCODE, sensorbucket_archive};
use workerctl::config::Config;
use workerctl::http;
use workerctl::metrics::Metrics;
use workerctl::model::{ManagedContainer, Revision, RunState, WorkerId};
use workerctl::readiness::ReadyReports;
use workerctl::reconcile::{PassSettings, Reconciler};
use workerctl::runtime::ContainerRuntime;
use workerctl::runtime::docker::DockerRuntime;
use workerctl::store::WorkerStore;
use workerctl::store::postgres::PgStore;

use common::relay::{Front, Relay, Upstream};
use common::stand_in_image;

const DEADLINE: Duration = Duration::from_secs(60);

/// One daemon, assembled as `workerctl run` assembles it, on a fresh
/// database, serving HTTP on a free port of 127.0.0.1 (the stand-in workers
/// on the host network report ready there).
struct Daemon {
    pool: PgPool,
    store: Arc<PgStore>,
    runtime: Arc<DockerRuntime>,
    config: Config,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl Daemon {
    async fn start(pool: PgPool) -> Daemon {
        Self::start_with(pool, |_| {}).await
    }

    async fn start_with(pool: PgPool, tweak: impl FnOnce(&mut Config)) -> Daemon {
        let (daemon, listener) = Self::prepare(pool, tweak).await;
        let (store, runtime) = (daemon.store.clone(), daemon.runtime.clone());
        daemon.spawn(store, runtime, daemon.database_url(), listener);
        daemon
    }

    /// A daemon whose own connections are given (e.g. through relays), while
    /// the test keeps direct ones to look at the database and the engine.
    async fn start_through(
        pool: PgPool,
        tweak: impl FnOnce(&mut Config),
        store: Arc<PgStore>,
        runtime: Arc<DockerRuntime>,
        listen_url: String,
    ) -> Daemon {
        let (daemon, listener) = Self::prepare(pool, tweak).await;
        daemon.spawn(store, runtime, listen_url, listener);
        daemon
    }

    async fn prepare(pool: PgPool, tweak: impl FnOnce(&mut Config)) -> (Daemon, TcpListener) {
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("bind a free port");
        let mut config = Config {
            instance: format!("t{}", &Uuid::new_v4().simple().to_string()[..12]),
            ..Config::default()
        };
        config.docker.image = stand_in_image().into();
        config.docker.stop_timeout = Duration::from_secs(5);
        config.reconcile.backoff_initial = Duration::from_millis(200);
        config.reconcile.backoff_max = Duration::from_secs(2);
        // Far beyond any deadline: changes must arrive by notification or
        // Docker event, never by the resync.
        config.reconcile.interval = Duration::from_secs(3600);
        config.code_server.public_url =
            format!("http://{}", listener.local_addr().expect("local address"));
        tweak(&mut config);
        let store = Arc::new(PgStore::from_pool(pool.clone()));
        store.migrate().await.expect("migrations apply");
        let runtime = Arc::new(
            DockerRuntime::connect(&config.instance)
                .await
                .expect("Docker answers"),
        );
        let daemon = Daemon {
            pool,
            store,
            runtime,
            config,
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
        };
        (daemon, listener)
    }

    fn database_url(&self) -> String {
        common::database_url(&self.pool)
    }

    fn reconciler(&self) -> Reconciler<PgStore, Containers<DockerRuntime>> {
        let settings = PassSettings::from_config(&self.config);
        let metrics = Arc::new(Metrics::new());
        let reports = Arc::new(ReadyReports::new(Arc::default()));
        let containers = Containers::new(self.runtime.clone(), reports, metrics.clone());
        Reconciler::new(self.store.clone(), containers, settings, metrics)
    }

    fn spawn(
        &self,
        store: Arc<PgStore>,
        runtime: Arc<DockerRuntime>,
        listen_url: String,
        listener: TcpListener,
    ) {
        let mut daemon = workerctl::daemon::Daemon::new(self.config.clone(), store, runtime);
        daemon.listen_url = listen_url;
        daemon
            .spawn(listener, &self.tracker, &self.shutdown)
            .expect("the daemon starts");
    }

    async fn stop(&mut self) {
        self.shutdown.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }

    async fn insert(&self, name: &str, state: &str, entrypoint: &str, source: &[u8]) -> WorkerId {
        let id = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO user_workers (id, name, description, state, language, tenant_id, revision, status, status_info, source, entrypoint)
             VALUES ($1, $2, '', $3, 'python', 1, 1, 'unknown', '', $4, $5)",
        )
        .bind(id)
        .bind(name)
        .bind(state)
        .bind(source)
        .bind(entrypoint)
        .execute(&self.pool)
        .await
        .expect("insert worker");
        WorkerId(id)
    }

    async fn enabled_worker(&self, name: &str) -> WorkerId {
        self.insert(name, "enabled", "main.main", &code()).await
    }

    async fn sql(&self, statement: &str, id: WorkerId) {
        sqlx::query(statement)
            .bind(id.0)
            .execute(&self.pool)
            .await
            .expect("statement runs");
    }

    async fn containers(&self) -> Vec<ManagedContainer> {
        self.runtime.list().await.expect("list containers")
    }

    async fn containers_of(&self, id: WorkerId) -> Vec<ManagedContainer> {
        self.containers()
            .await
            .into_iter()
            .filter(|c| c.worker_id == Some(id))
            .collect()
    }

    /// Polls until `check` holds, failing the test after a generous deadline.
    async fn wait_for<T>(&self, what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
        let start = Instant::now();
        loop {
            if let Some(value) = check().await {
                return value;
            }
            assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the worker has exactly one container, running at `revision`.
    async fn running_at(&self, id: WorkerId, revision: i32) -> ManagedContainer {
        self.wait_for(
            &format!("worker {id} running revision {revision}"),
            async || {
                let cs = self.containers_of(id).await;
                match cs.as_slice() {
                    [c] if c.state == RunState::Running
                        && c.revision == Some(Revision(revision)) =>
                    {
                        Some(c.clone())
                    }
                    _ => None,
                }
            },
        )
        .await
    }

    async fn status(&self, id: WorkerId) -> (String, String) {
        sqlx::query_as("SELECT status, status_info FROM user_workers WHERE id = $1")
            .bind(id.0)
            .fetch_one(&self.pool)
            .await
            .expect("status")
    }

    async fn status_matching(&self, id: WorkerId, status: &str, needle: &str) -> String {
        let start = Instant::now();
        let mut seen = Vec::new();
        loop {
            let (s, info) = self.status(id).await;
            if s == status && info.contains(needle) {
                return info;
            }
            if seen.last() != Some(&(s.clone(), info.clone())) {
                seen.push((s, info));
            }
            assert!(
                start.elapsed() < DEADLINE,
                "timed out waiting for status {status} containing {needle:?}; saw, in order: {seen:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn cleanup(mut self) {
        self.stop().await;
        for c in self.containers().await {
            let _ = Command::new("docker").args(["rm", "-f", &c.id]).output();
        }
    }
}

fn code() -> Vec<u8> {
    sensorbucket_archive(DEFAULT_USERCODE).expect("archive builds")
}

#[sqlx::test(migrations = false)]
async fn enabled_worker_gets_a_hardened_container_and_is_ready(pool: PgPool) {
    let d = Daemon::start(pool).await;
    let id = d.enabled_worker("first").await;
    let c = d.running_at(id, 1).await;
    assert_eq!(c.name, format!("{}-worker-{id}", d.config.instance));
    d.status_matching(id, "ready", "running revision 1").await;
    let inspect = Command::new("docker")
        .args(["inspect", "--format", "{{.HostConfig.ReadonlyRootfs}} {{.HostConfig.CapDrop}} {{.HostConfig.RestartPolicy.Name}} {{json .Config.Env}}", &c.id])
        .output()
        .expect("docker inspect");
    let text = String::from_utf8_lossy(&inspect.stdout);
    assert!(text.starts_with("true [ALL] no "), "{text}");
    for var in [
        "WORKER_ID=",
        "AMQP_HOST=",
        "AMQP_XCHG=pipeline.messages",
        "/source?token=",
        "CODE_ENTRYPOINT=main.main",
        "ENDPOINT_DEVICES=",
        "WORKER_REVISION=1",
        "CODE_SHA256=",
    ] {
        assert!(text.contains(var), "{var} missing from {text}");
    }
    d.cleanup().await;
}

#[sqlx::test(migrations = false)]
async fn revision_bump_recreates_the_container(pool: PgPool) {
    let d = Daemon::start(pool).await;
    let id = d.enabled_worker("bumped").await;
    let before = d.running_at(id, 1).await;
    d.sql(
        "UPDATE user_workers SET revision = revision + 1, source = source WHERE id = $1",
        id,
    )
    .await;
    let after = d.running_at(id, 2).await;
    assert_ne!(before.id, after.id);
    assert_eq!(
        before.name, after.name,
        "the new container takes the worker's name"
    );
    d.status_matching(id, "ready", "running revision 2").await;
    d.cleanup().await;
}

#[sqlx::test(migrations = false)]
async fn disabling_a_worker_removes_its_container(pool: PgPool) {
    let d = Daemon::start(pool).await;
    let id = d.enabled_worker("disabled-later").await;
    d.running_at(id, 1).await;
    d.sql(
        "UPDATE user_workers SET state = 'disabled' WHERE id = $1",
        id,
    )
    .await;
    d.wait_for("the container to go", async || {
        d.containers_of(id).await.is_empty().then_some(())
    })
    .await;
    d.cleanup().await;
}

#[sqlx::test(migrations = false)]
async fn deleting_the_row_by_hand_removes_the_container(pool: PgPool) {
    let d = Daemon::start(pool).await;
    let id = d.enabled_worker("deleted").await;
    d.running_at(id, 1).await;
    d.sql("DELETE FROM user_workers WHERE id = $1", id).await;
    d.wait_for("the container to go", async || {
        d.containers_of(id).await.is_empty().then_some(())
    })
    .await;
    d.cleanup().await;
}

#[sqlx::test(migrations = false)]
async fn a_container_removed_out_of_band_is_recreated(pool: PgPool) {
    let d = Daemon::start(pool).await;
    let id = d.enabled_worker("healed").await;
    let first = d.running_at(id, 1).await;
    let rm = Command::new("docker")
        .args(["rm", "-f", &first.id])
        .output()
        .expect("docker rm -f");
    assert!(rm.status.success());
    let healed = d
        .wait_for("a new container", async || {
            let cs = d.containers_of(id).await;
            cs.into_iter()
                .find(|c| c.id != first.id && c.state == RunState::Running)
        })
        .await;
    assert_eq!(healed.revision, Some(Revision(1)));
    d.cleanup().await;
}

#[sqlx::test(migrations = false)]
async fn restarting_against_converged_state_changes_nothing(pool: PgPool) {
    let mut d = Daemon::start(pool).await;
    let ids = [
        d.enabled_worker("a").await,
        d.enabled_worker("b").await,
        d.enabled_worker("c").await,
    ];
    let mut before = Vec::new();
    for id in ids {
        before.push(d.running_at(id, 1).await.id);
        d.status_matching(id, "ready", "running revision 1").await;
    }
    d.stop().await;
    // The containers outlive the daemon.
    assert_eq!(
        d.containers()
            .await
            .iter()
            .filter(|c| c.state == RunState::Running)
            .count(),
        3
    );
    let report = d.reconciler().pass().await.expect("pass");
    assert_eq!(report.started, 0, "a fresh daemon adopts what it finds");
    for id in ids {
        let (status, _) = d.status(id).await;
        assert_eq!(status, "ready", "and keeps the statuses it finds");
    }
    let mut after: Vec<String> = d.containers().await.into_iter().map(|c| c.id).collect();
    before.sort();
    after.sort();
    assert_eq!(before, after);
    d.cleanup().await;
}

#[sqlx::test(migrations = false)]
async fn a_crashing_worker_is_restarted_with_backoff_and_says_why(pool: PgPool) {
    let d = Daemon::start(pool).await;
    let bad = d.insert("crashy", "enabled", "crash.main", &code()).await;
    let good = d.enabled_worker("steady").await;
    d.running_at(good, 1).await;
    // The status quotes what the container said last, as well as its code.
    let info = d
        .status_matching(bad, "error", "exited with code 3: crashing")
        .await;
    assert!(info.contains("restart"), "{info}");
    let restarts: i32 = d
        .wait_for("two restarts", async || {
            let r: Option<(i32,)> =
                sqlx::query_as("SELECT restarts FROM workerctl_observed WHERE worker_id = $1")
                    .bind(bad.0)
                    .fetch_optional(&d.pool)
                    .await
                    .expect("observed");
            r.map(|(n,)| n).filter(|n| *n >= 2)
        })
        .await;
    assert!(restarts >= 2);
    assert_eq!(
        d.containers_of(bad).await.len(),
        1,
        "the crashing container is restarted, not multiplied"
    );
    d.status_matching(good, "ready", "running").await;
    d.cleanup().await;
}

#[sqlx::test(migrations = false)]
async fn bad_rows_get_an_error_status_and_do_not_stall_the_others(pool: PgPool) {
    let d = Daemon::start(pool).await;
    let empty = d.insert("empty", "enabled", "main.main", b"").await;
    let not_zip = d
        .insert("not-zip", "enabled", "main.main", b"print('hello')")
        .await;
    let odd_state = d.insert("odd", "paused", "main.main", &code()).await;
    let lua = d.insert("lua", "disabled", "main.main", &code()).await;
    d.sql(
        "UPDATE user_workers SET language = 'lua', state = 'enabled' WHERE id = $1",
        lua,
    )
    .await;
    let good = d.enabled_worker("good").await;
    d.running_at(good, 1).await;
    d.status_matching(empty, "error", "no code").await;
    d.status_matching(not_zip, "error", "not a zip").await;
    d.status_matching(odd_state, "error", "unknown state \"paused\"")
        .await;
    d.status_matching(lua, "error", "\"lua\" is not supported")
        .await;
    for id in [empty, not_zip, odd_state, lua] {
        assert!(d.containers_of(id).await.is_empty());
    }
    d.cleanup().await;
}

#[sqlx::test(migrations = false)]
async fn a_missing_image_is_an_error_status_naming_it(pool: PgPool) {
    let d = Daemon::start_with(pool, |c| {
        c.docker.image = "workerctl-test/absent:nope".into()
    })
    .await;
    let id = d.enabled_worker("imageless").await;
    let info = d
        .status_matching(id, "error", "workerctl-test/absent:nope")
        .await;
    assert!(info.contains("scripts/build-images"), "{info}");
    d.cleanup().await;
}

#[sqlx::test(migrations = false)]
async fn a_missing_network_is_an_error_status_not_a_guess(pool: PgPool) {
    let d = Daemon::start_with(pool, |c| {
        c.docker.network = "workerctl-test-no-such-net".into()
    })
    .await;
    let id = d.enabled_worker("netless").await;
    d.status_matching(
        id,
        "error",
        "network workerctl-test-no-such-net does not exist",
    )
    .await;
    assert!(d.containers_of(id).await.is_empty());
    d.cleanup().await;
}

#[sqlx::test(migrations = false)]
async fn an_unreachable_database_fails_the_pass_and_leaves_containers_alone(pool: PgPool) {
    let d = Daemon::start(pool).await;
    let id = d.enabled_worker("survivor").await;
    let running = d.running_at(id, 1).await;
    // Port 9 (discard) has no Postgres behind it.
    let down = Arc::new(PgStore::connect("postgres://x:y@127.0.0.1:9/none").expect("lazy pool"));
    let settings = PassSettings::from_config(&d.config);
    let reports = Arc::new(ReadyReports::new(Arc::default()));
    let mut blind = Reconciler::new(
        down,
        Containers::new(d.runtime.clone(), reports, Arc::new(Metrics::new())),
        settings,
        Arc::new(Metrics::new()),
    );
    let err = blind
        .pass()
        .await
        .expect_err("the pass cannot read the store");
    assert!(format!("{err}").contains("worker store"), "{err}");
    assert_eq!(d.running_at(id, 1).await.id, running.id);
    d.cleanup().await;
}

#[sqlx::test(migrations = false)]
async fn code_endpoint_serves_enabled_workers_to_their_token_only(pool: PgPool) {
    let d = Daemon::start(pool).await;
    let enabled = d.enabled_worker("served").await;
    let disabled = d.insert("hidden", "disabled", "main.main", &code()).await;
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let state = http::AppState {
        store: d.store.clone(),
        metrics: Arc::new(Metrics::new()),
        instance: d.config.instance.as_str().into(),
        pool: d.pool.clone(),
        probes: Arc::new([]),
        reports: Arc::new(ReadyReports::new(Arc::default())),
        leadership: None,
        backend: Arc::new(workerctl::status_page::Backend::docker()),
        read_taps: None,
    };
    let server = tokio::spawn(async move { axum::serve(listener, http::router(state)).await });
    let get = |path: String| async move {
        reqwest::get(format!("http://{addr}{path}"))
            .await
            .expect("request")
    };

    let rows = d.store.load_workers().await.expect("rows");
    let token_of = |id: WorkerId| {
        rows.iter()
            .find(|r| r.id == id)
            .expect("row")
            .code_token
            .clone()
    };
    let (token, hidden_token) = (token_of(enabled), token_of(disabled));
    let ok = get(format!("/{enabled}/source?token={token}")).await;
    assert_eq!(ok.status(), 200);
    let body: serde_json::Value = ok.json().await.expect("json");
    let data = body["data"].as_str().expect("data is a string");
    use base64::Engine;
    let zip = base64::engine::general_purpose::STANDARD
        .decode(data)
        .expect("base64");
    assert_eq!(zip, code());
    assert_eq!(get("/not-a-uuid/source".into()).await.status(), 400);
    assert_eq!(
        get(format!("/{enabled}/source")).await.status(),
        404,
        "no token"
    );
    let wrong = format!("/{enabled}/source?token={hidden_token}");
    assert_eq!(get(wrong).await.status(), 404, "another worker's token");
    let hidden = format!("/{disabled}/source?token={hidden_token}");
    assert_eq!(get(hidden).await.status(), 404, "disabled");
    assert_eq!(
        get(format!("/{}/source", Uuid::now_v7())).await.status(),
        404
    );
    assert_eq!(get("/healthz".into()).await.status(), 200);
    server.abort();
    d.cleanup().await;
}

#[sqlx::test(migrations = false)]
async fn the_daemon_exits_zero_on_sigterm_and_leaves_workers_running(pool: PgPool) {
    let d = Daemon::start(pool).await;
    let mut d = d;
    d.stop().await; // the binary under test does the work from here
    let id = d.enabled_worker("outlives").await;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
        l.local_addr().expect("addr").port()
    };
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_workerctl"))
        .arg("run")
        .env("WORKERCTL_DATABASE_URL", d.database_url())
        .env("WORKERCTL_INSTANCE", &d.config.instance)
        .env("WORKERCTL_DOCKER__IMAGE", stand_in_image())
        .env("WORKERCTL_CODE_SERVER__LISTEN", format!("127.0.0.1:{port}"))
        .env(
            "WORKERCTL_CODE_SERVER__PUBLIC_URL",
            format!("http://127.0.0.1:{port}"),
        )
        .kill_on_drop(true)
        .spawn()
        .expect("workerctl starts");
    let c = d.running_at(id, 1).await;
    let pid = child.id().expect("pid");
    let kill = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(kill.success());
    let status = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .expect("exits in time")
        .expect("wait");
    assert!(status.success(), "exit status {status}");
    assert_eq!(
        d.running_at(id, 1).await.id,
        c.id,
        "the worker keeps running"
    );
    d.cleanup().await;
}

#[sqlx::test(migrations = false)]
async fn the_daemon_rides_out_postgres_and_docker_outages_and_recovers(pool: PgPool) {
    let db_url = reqwest::Url::parse(&common::database_url(&pool)).expect("URL");
    let postgres = SocketAddr::from(([127, 0, 0, 1], db_url.port().unwrap_or(5432)));
    let any_port = Front::Tcp(SocketAddr::from(([127, 0, 0, 1], 0)));
    let pg_relay = Relay::start(any_port, Upstream::Tcp(postgres)).await;
    let Front::Tcp(pg_front) = pg_relay.front().clone() else {
        unreachable!()
    };
    let mut relayed_url = db_url.clone();
    relayed_url.set_port(Some(pg_front.port())).expect("port");
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("docker.sock");
    let docker_relay = common::relay::docker_relay(&socket).await;
    let client = bollard::Docker::connect_with_unix(
        socket.to_str().expect("utf-8"),
        10,
        bollard::API_DEFAULT_VERSION,
    )
    .expect("client");
    let instance = format!("t{}", &Uuid::new_v4().simple().to_string()[..12]);
    let runtime = Arc::new(
        DockerRuntime::with_client(client, &instance)
            .await
            .expect("relayed Docker"),
    );
    let store = Arc::new(PgStore::connect(relayed_url.as_str()).expect("relayed store"));
    let tweak = |c: &mut Config| {
        c.instance = instance.clone();
        c.reconcile.interval = Duration::from_secs(1);
    };
    let d = Daemon::start_through(pool, tweak, store, runtime, relayed_url.to_string()).await;
    let id = d.enabled_worker("weathered").await;
    let before = d.running_at(id, 1).await;

    // Both services go away; a change is made meanwhile.
    let pg_front = pg_relay.cut();
    let docker_front = docker_relay.cut();
    d.sql(
        "UPDATE user_workers SET revision = revision + 1 WHERE id = $1",
        id,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cs = d.containers_of(id).await;
    assert_eq!(cs.len(), 1, "nothing is touched while the daemon is blind");
    assert_eq!(
        (cs[0].id.as_str(), &cs[0].state),
        (before.id.as_str(), &RunState::Running)
    );

    // They come back: the daemon catches up by itself.
    let _pg = Relay::start(pg_front, Upstream::Tcp(postgres)).await;
    let _docker = Relay::start(docker_front, Upstream::Unix(common::relay::engine_socket())).await;
    d.running_at(id, 2).await;
    d.status_matching(id, "ready", "running revision 2").await;
    d.cleanup().await;
}

/// The `WORKER_READY_URL` a container was given.
fn ready_url_of(container: &ManagedContainer) -> String {
    let out = Command::new("docker")
        .args(["inspect", "--format", "{{json .Config.Env}}", &container.id])
        .output()
        .expect("docker inspect");
    let env: Vec<String> = serde_json::from_slice(&out.stdout).expect("env is JSON");
    env.iter()
        .find_map(|v| v.strip_prefix("WORKER_READY_URL="))
        .expect("WORKER_READY_URL is set")
        .to_string()
}

#[sqlx::test(migrations = false)]
async fn a_worker_stuck_in_its_grace_period_does_not_hold_up_another(pool: PgPool) {
    // The stubborn stand-in ignores the stop signal, whichever it is (by
    // default SIGINT, as an image that declares none).
    let d = Daemon::start_with(pool, |c| {
        c.docker.stop_timeout = Duration::from_secs(10);
        c.docker.stop_signal = Some("SIGTERM".into());
    })
    .await;
    let stuck = d.insert("stuck", "enabled", "stubborn.main", &code()).await;
    let old = d.running_at(stuck, 1).await;
    d.status_matching(stuck, "ready", "running revision 1")
        .await;
    d.sql("UPDATE user_workers SET revision = 2 WHERE id = $1", stuck)
        .await;
    // Revision 2 is ready, so revision 1 is being stopped: it ignores SIGTERM
    // and holds its stop for the whole 10 s grace period.
    d.status_matching(stuck, "ready", "running revision 2")
        .await;
    let other = d.enabled_worker("other").await;
    d.running_at(other, 1).await;
    d.status_matching(other, "ready", "running revision 1")
        .await;
    let still_stopping = d.containers_of(stuck).await;
    assert!(
        still_stopping.iter().any(|c| c.id == old.id),
        "the other worker ran while the stuck one was still in its grace period: {still_stopping:?}"
    );
    d.cleanup().await;
}

#[sqlx::test(migrations = false)]
async fn a_broken_save_keeps_the_old_revision_serving_until_a_good_one(pool: PgPool) {
    let d = Daemon::start(pool).await;
    let id = d.enabled_worker("careful").await;
    let serving = d.running_at(id, 1).await;
    d.status_matching(id, "ready", "running revision 1").await;
    d.sql(
        "UPDATE user_workers SET revision = 2, entrypoint = 'crash.main' WHERE id = $1",
        id,
    )
    .await;
    let info = d
        .status_matching(id, "error", "revision 2 does not start")
        .await;
    assert!(
        info.ends_with("crashing; revision 1 keeps serving"),
        "{info}"
    );
    let left = d
        .wait_for("the failed container to go", async || {
            let cs = d.containers_of(id).await;
            (cs.len() == 1).then_some(cs)
        })
        .await;
    assert_eq!(left[0].id, serving.id, "revision 1 still serves");
    assert_eq!(left[0].state, RunState::Running);

    d.sql(
        "UPDATE user_workers SET revision = 3, entrypoint = 'main.main' WHERE id = $1",
        id,
    )
    .await;
    let fixed = d.running_at(id, 3).await;
    assert_ne!(fixed.id, serving.id);
    d.status_matching(id, "ready", "running revision 3").await;
    d.cleanup().await;
}

#[sqlx::test(migrations = false)]
async fn ready_is_written_only_once_the_container_reports_it(pool: PgPool) {
    let d = Daemon::start_with(pool, |c| {
        c.reconcile.assume_ready_after = Duration::from_secs(3600)
    })
    .await;
    let id = d.insert("quiet", "enabled", "silent.main", &code()).await;
    let c = d.running_at(id, 1).await;
    d.status_matching(id, "unknown", "waiting for it to consume its queue")
        .await;
    // Say for the container what it would say once it consumes.
    let url = ready_url_of(&c);
    let mut forged = reqwest::Url::parse(&url).expect("a URL");
    let pairs: Vec<(String, String)> = forged
        .query_pairs()
        .map(|(k, v)| {
            let v = if k == "token" {
                "0".repeat(32)
            } else {
                v.into_owned()
            };
            (k.into_owned(), v)
        })
        .collect();
    forged.query_pairs_mut().clear().extend_pairs(pairs);
    let client = reqwest::Client::new();
    let answer = client.post(forged).send().await.expect("report");
    assert_eq!(answer.status(), 202);
    // The report reached the daemon and the pass it woke rejected it.
    let metrics = format!("{}/metrics", d.config.code_server.public_url);
    d.wait_for("the forged report to be rejected", async || {
        let text = reqwest::get(&metrics).await.ok()?.text().await.ok()?;
        text.lines()
            .any(|l| l == "workerctl_ready_reports_rejected_total 1")
            .then_some(())
    })
    .await;
    assert_eq!(
        d.status(id).await.0,
        "unknown",
        "a wrong token is not believed"
    );
    let answer = client.post(&url).send().await.expect("report");
    assert_eq!(answer.status(), 202);
    d.status_matching(id, "ready", "running revision 1").await;
    d.cleanup().await;
}

#[sqlx::test(migrations = false)]
async fn sigterm_waits_for_a_graceful_stop_in_flight(pool: PgPool) {
    let mut d = Daemon::start_with(pool, |c| c.docker.stop_timeout = Duration::from_secs(3)).await;
    let id = d
        .insert("slow-to-stop", "enabled", "stubborn.main", &code())
        .await;
    d.running_at(id, 1).await;
    d.sql(
        "UPDATE user_workers SET state = 'disabled' WHERE id = $1",
        id,
    )
    .await;
    d.status_matching(id, "unknown", "disabled: stopping container")
        .await;
    // The stop is in flight (it takes the whole grace period): shut down now.
    let started = Instant::now();
    d.stop().await;
    assert!(
        d.containers_of(id).await.is_empty(),
        "the stop in flight completed before the daemon exited ({:?})",
        started.elapsed()
    );
    d.cleanup().await;
}

#[sqlx::test(migrations = false)]
async fn a_failing_create_is_retried_with_backoff_and_says_why(pool: PgPool) {
    let d = Daemon::start(pool).await;
    let id = d.enabled_worker("blocked").await;
    // Someone else's container holds the worker's name.
    let name = workerctl::model::container_name(&d.config.instance, id);
    let squat = Command::new("docker")
        .args(["create", "--name", &name, stand_in_image()])
        .output()
        .expect("docker create");
    assert!(squat.status.success());
    let info = d.status_matching(id, "error", "retrying in").await;
    assert!(info.contains("is taken by a container"), "{info}");
    let rm = Command::new("docker").args(["rm", "-f", &name]).output();
    assert!(rm.expect("docker rm").status.success());
    d.running_at(id, 1).await;
    d.status_matching(id, "ready", "running revision 1").await;
    d.cleanup().await;
}

#[sqlx::test(migrations = false)]
async fn replica_bounds_add_and_remove_replicas(pool: PgPool) {
    let d = Daemon::start(pool).await;
    let id = d.enabled_worker("replicated").await;
    let first = d.running_at(id, 1).await;
    let base = format!("{}-worker-{id}", d.config.instance);
    assert_eq!(first.name, base, "one replica by default, named as ever");
    d.sql(
        "INSERT INTO workerctl_worker_scale (worker_id, min_replicas, max_replicas, per_replica)
         VALUES ($1, 2, 2, 20)",
        id,
    )
    .await;
    let names = d
        .wait_for("two replicas running", async || {
            let cs = d.containers_of(id).await;
            let mut names: Vec<String> = cs
                .iter()
                .filter(|c| c.state == RunState::Running)
                .map(|c| c.name.clone())
                .collect();
            names.sort();
            (names.len() == 2 && cs.len() == 2).then_some(names)
        })
        .await;
    assert_eq!(names, [base.clone(), format!("{base}-r1")]);
    let replicas = d.containers_of(id).await;
    assert_eq!(
        replicas[0].spec_hash, replicas[1].spec_hash,
        "replicas of one revision share a spec"
    );
    assert!(
        replicas.iter().any(|c| c.id == first.id),
        "replica 0 is left as it was"
    );
    d.status_matching(id, "ready", "running revision 1 in 2 replicas")
        .await;
    d.sql(
        "UPDATE workerctl_worker_scale SET min_replicas = 1, max_replicas = 1 WHERE worker_id = $1",
        id,
    )
    .await;
    let left = d.running_at(id, 1).await;
    assert_eq!(left.id, first.id, "replica 1 goes, replica 0 stays");
    d.status_matching(id, "ready", "running revision 1 in container")
        .await;
    d.cleanup().await;
}
