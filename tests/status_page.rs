//! The status page and the operations endpoints, served by the real router
//! on 127.0.0.1 against a fresh Postgres database per test (`#[sqlx::test]`,
//! which reads DATABASE_URL): the JSON view the page polls, the page as
//! headless Chromium renders it (its DOM after the script ran, and a
//! screenshot kept at `target/screenshots/status-page.png`), `/metrics`
//! after a real pass on the real Docker engine, the recent errors it shows,
//! and `/readyz` pinging the real database and engine. An engine that does
//! not answer is the real one behind a relay that stalls
//! (`tests/common/relay.rs`), as in the daemon's outage tests.
//!
//! Needs Postgres, the Docker engine, `workerctl/busybox:latest`
//! (`scripts/build-images`) and the Debian package `chromium`. Without them
//! these tests fail; they never skip. The one test that creates a container
//! removes it at the end, passed or not.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use workerctl::reconcile::containers::Containers;

use serde_json::Value;
use sqlx::PgPool;
use tokio::task::JoinHandle;
use uuid::Uuid;
use workerctl::archive::{DEFAULT_USERCODE, sensorbucket_archive};
use workerctl::config::Config;
use workerctl::http::{self, AppState, Probe};
use workerctl::metrics::Metrics;
use workerctl::model::labels;
use workerctl::readiness::ReadyReports;
use workerctl::reconcile::{PassSettings, Reconciler};
use workerctl::runtime::docker::DockerRuntime;
use workerctl::status_page::Backend;
use workerctl::store::dead_letters::{self, NewDeadLetter};
use workerctl::store::postgres::PgStore;

use common::relay::docker_relay;

const INSTANCE: &str = "status-test";
/// The Debian package and command that renders the page.
const CHROMIUM: &str = "chromium";
const CHROMIUM_DEADLINE: Duration = Duration::from_secs(90);
/// Only catches a hang: what must happen happens long before.
const MUST_HAPPEN: Duration = Duration::from_secs(120);

/// The router, served until the test drops it.
struct Server {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    async fn start(pool: PgPool, metrics: Arc<Metrics>, probes: Vec<Probe>) -> Server {
        Self::start_on(pool, metrics, probes, Backend::docker()).await
    }

    async fn start_on(
        pool: PgPool,
        metrics: Arc<Metrics>,
        probes: Vec<Probe>,
        backend: Backend,
    ) -> Server {
        let state = AppState {
            store: Arc::new(PgStore::from_pool(pool.clone())),
            metrics,
            instance: INSTANCE.into(),
            pool,
            probes: probes.into(),
            reports: Arc::new(ReadyReports::new(Arc::default())),
            leadership: None,
            backend: Arc::new(backend),
            read_taps: None,
        };
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("bind a free port");
        let addr = listener.local_addr().expect("local address");
        let task = tokio::spawn(async move {
            axum::serve(listener, http::router(state))
                .await
                .expect("the server runs");
        });
        Server { addr, task }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        reqwest::get(self.url(path)).await.expect("request")
    }

    async fn json(&self, path: &str) -> Value {
        let response = self.get(path).await;
        assert_eq!(response.status(), 200, "GET {path}");
        response.json().await.expect("a JSON body")
    }
}

async fn migrated(pool: &PgPool) {
    PgStore::from_pool(pool.clone())
        .migrate()
        .await
        .expect("migrations apply");
}

async fn insert_worker(
    pool: &PgPool,
    name: &str,
    state: &str,
    revision: i32,
    status: &str,
    info: &str,
) -> Uuid {
    let id = Uuid::now_v7();
    let code = sensorbucket_archive(DEFAULT_USERCODE).expect("archive builds");
    sqlx::query(
        "INSERT INTO user_workers (id, name, description, state, language, tenant_id, revision, status, status_info, source, entrypoint)
         VALUES ($1, $2, '', $3, 'python', 1, $4, $5, $6, $7, 'main.main')",
    )
    .bind(id)
    .bind(name)
    .bind(state)
    .bind(revision)
    .bind(status)
    .bind(info)
    .bind(code)
    .execute(pool)
    .await
    .expect("insert worker");
    id
}

/// What workerctl last observed of the worker, `age` ago.
struct Seen<'a> {
    running_revision: Option<i32>,
    container_state: &'a str,
    restarts: i32,
    last_exit_code: Option<i64>,
    age: Duration,
}

async fn insert_observed(pool: &PgPool, id: Uuid, seen: Seen<'_>) {
    sqlx::query(
        "INSERT INTO workerctl_observed (worker_id, running_revision, container, container_state, restarts, last_exit_code, updated_at, running_replicas)
         VALUES ($1, $2, $3, $4, $5, $6, now() - make_interval(secs => $7), CASE WHEN $4 = 'running' THEN 1 ELSE 0 END)",
    )
    .bind(id)
    .bind(seen.running_revision)
    .bind(format!("{INSTANCE}-worker-{id}"))
    .bind(seen.container_state)
    .bind(seen.restarts)
    .bind(seen.last_exit_code)
    .bind(seen.age.as_secs_f64())
    .execute(pool)
    .await
    .expect("insert observation");
}

/// Four workers, one of each kind the page must tell apart.
struct Fleet {
    steady: Uuid,
    crashing: Uuid,
}

async fn fleet(pool: &PgPool) -> Fleet {
    migrated(pool).await;
    let steady = insert_worker(
        pool,
        "ingest-temperature",
        "enabled",
        3,
        "ready",
        "running revision 3",
    )
    .await;
    let seen = Seen {
        running_revision: Some(3),
        container_state: "running",
        restarts: 0,
        last_exit_code: None,
        age: Duration::from_secs(3723),
    };
    insert_observed(pool, steady, seen).await;
    let crashing = insert_worker(
        pool,
        "parse-humidity",
        "enabled",
        2,
        "error",
        "exited with code 3; restart 5 in 16s",
    )
    .await;
    let seen = Seen {
        running_revision: None,
        container_state: "exited (3)",
        restarts: 4,
        last_exit_code: Some(3),
        age: Duration::from_secs(42),
    };
    insert_observed(pool, crashing, seen).await;
    let bumped = insert_worker(pool, "forward-alerts", "enabled", 5, "unknown", "").await;
    let seen = Seen {
        running_revision: Some(4),
        container_state: "running",
        restarts: 0,
        last_exit_code: None,
        age: Duration::from_secs(600),
    };
    insert_observed(pool, bumped, seen).await;
    insert_worker(pool, "archive-old", "disabled", 1, "unknown", "disabled").await;
    Fleet { steady, crashing }
}

fn worker(view: &Value, id: Uuid) -> &Value {
    let workers = view["workers"].as_array().expect("workers is a list");
    workers
        .iter()
        .find(|w| w["id"] == id.to_string())
        .unwrap_or_else(|| panic!("worker {id} missing from {view}"))
}

#[sqlx::test(migrations = false)]
async fn api_workers_lists_every_worker_with_what_was_observed(pool: PgPool) {
    let fleet = fleet(&pool).await;
    let server = Server::start(pool, Arc::default(), vec![]).await;
    let response = server.get("/api/workers").await;
    assert_eq!(response.status(), 200);
    let cache = response.headers().get("cache-control").cloned();
    assert_eq!(
        cache.as_ref().and_then(|v| v.to_str().ok()),
        Some("no-store")
    );
    let view: Value = response.json().await.expect("json");

    assert_eq!(view["instance"], INSTANCE);
    assert!(view["generated_at"].is_string(), "{view}");
    assert!(view["last_pass"].is_null(), "no pass has run: {view}");
    let names: Vec<&str> = view["workers"]
        .as_array()
        .expect("workers is a list")
        .iter()
        .filter_map(|w| w["name"].as_str())
        .collect();
    let by_name = [
        "archive-old",
        "forward-alerts",
        "ingest-temperature",
        "parse-humidity",
    ];
    assert_eq!(names, by_name);

    let crashing = worker(&view, fleet.crashing);
    assert_eq!(crashing["state"], "enabled");
    assert_eq!(crashing["revision"], 2);
    assert_eq!(crashing["running_revision"], Value::Null);
    assert_eq!(crashing["status"], "error");
    assert_eq!(
        crashing["status_info"],
        "exited with code 3; restart 5 in 16s"
    );
    assert_eq!(
        crashing["container"],
        format!("{INSTANCE}-worker-{}", fleet.crashing)
    );
    assert_eq!(crashing["container_state"], "exited (3)");
    assert_eq!(crashing["restarts"], 4);
    assert_eq!(crashing["last_exit_code"], 3);
    assert!(crashing["observed_at"].is_string(), "{crashing}");
    let steady = worker(&view, fleet.steady);
    assert_eq!(steady["running_revision"], 3);
    assert_eq!(steady["status"], "ready");
}

#[sqlx::test(migrations = false)]
async fn the_page_is_one_html_file_whose_script_loads_the_workers(pool: PgPool) {
    fleet(&pool).await;
    let server = Server::start(pool, Arc::default(), vec![]).await;
    let response = server.get("/").await;
    assert_eq!(response.status(), 200);
    let content_type = response.headers().get("content-type").cloned();
    let content_type = content_type.as_ref().and_then(|v| v.to_str().ok());
    assert!(
        content_type.is_some_and(|t| t.starts_with("text/html")),
        "{content_type:?}"
    );
    let html = response.text().await.expect("body");
    assert!(html.starts_with("<!doctype html>"), "{html}");
    assert!(html.contains("<script>") && html.contains("api/workers"));
    assert!(
        !html.contains("ingest-temperature"),
        "the served HTML holds no data: the script draws the workers"
    );
}

#[sqlx::test(migrations = false)]
async fn chromium_renders_every_worker_with_its_status_and_revisions(pool: PgPool) {
    fleet(&pool).await;
    let server = Server::start(pool, Arc::default(), vec![]).await;
    let url = server.url("/");

    let dom = String::from_utf8(chromium(&["--dump-dom"], &url).await.stdout).expect("UTF-8");
    for name in [
        "ingest-temperature",
        "parse-humidity",
        "forward-alerts",
        "archive-old",
    ] {
        assert!(
            dom.contains(name),
            "{name} missing from the rendered page:\n{dom}"
        );
    }
    for expected in [
        INSTANCE,
        r#"<span class="pill ready">ready</span>"#,
        r#"<span class="pill error">error</span>"#,
        r#"<span class="pill unknown">unknown</span>"#,
        "exited with code 3; restart 5 in 16s",
        "exited (3)",
        "running 4",
        "1h 2m",
        "1 ready",
        "1 error",
        "2 unknown",
        "updated ",
    ] {
        assert!(
            dom.contains(expected),
            "{expected:?} missing from the rendered page:\n{dom}"
        );
    }
    assert!(
        dom.contains(r#"<div class="banner hidden" id="banner"></div>"#),
        "the page shows an error banner:\n{dom}"
    );
    assert!(
        dom.contains(r#"<div class="notes hidden" id="notes"></div>"#),
        "plain containers have no limitation to show:\n{dom}"
    );

    let shot = screenshot_path();
    let arg = format!("--screenshot={}", shot.display());
    chromium(&[&arg], &url).await;
    let png = std::fs::read(&shot).expect("chromium wrote the screenshot");
    assert!(
        png.starts_with(b"\x89PNG"),
        "{} is not a PNG",
        shot.display()
    );
    println!("status page screenshot: {}", shot.display());
}

#[sqlx::test(migrations = false)]
async fn on_swarm_the_page_names_the_backend_and_what_it_cannot_enforce(pool: PgPool) {
    fleet(&pool).await;
    let backend = Backend {
        name: "swarm".into(),
        limitations: vec![
            "no-new-privileges is not set: Swarm services support it from Docker API 1.44 (Engine 25)".into(),
        ],
    };
    let server = Server::start_on(pool, Arc::default(), vec![], backend).await;
    let view = server.json("/api/workers").await;
    assert_eq!(view["backend"]["name"], "swarm");
    let dom =
        String::from_utf8(chromium(&["--dump-dom"], &server.url("/")).await.stdout).expect("UTF-8");
    for expected in [
        format!("{INSTANCE} · swarm"),
        r#"<div class="notes" id="notes"><div class="warn">swarm: no-new-privileges is not set"#
            .to_string(),
    ] {
        assert!(
            dom.contains(&expected),
            "{expected:?} missing from the rendered page:\n{dom}"
        );
    }
}

/// A dead letter of `worker` whose traceback ends in `reason`.
async fn dead_letter(pool: &PgPool, worker: Option<Uuid>, reason: &str) {
    let letter = NewDeadLetter {
        worker_id: worker,
        queue: worker.map_or("worker_unknown".into(), |w| format!("worker_{w}")),
        error: format!("Traceback (most recent call last):\n  File \"usercode.py\"\n{reason}\n"),
        attempt: Some(1),
        failed_at: chrono::Utc::now() - chrono::Duration::minutes(3),
        message_id: None,
        body: serde_json::json!({"received_by_worker": {"tracing_id": reason}}),
        digest: Uuid::new_v4().to_string(),
    };
    let new = dead_letters::insert(pool, &letter, 1000)
        .await
        .expect("the dead letter is stored");
    assert!(new, "a fresh digest is a new dead letter");
}

#[sqlx::test(migrations = false)]
async fn recent_errors_are_each_workers_last_five_newest_first_and_the_page_shows_them(
    pool: PgPool,
) {
    let fleet = fleet(&pool).await;
    for n in 1..=7 {
        dead_letter(
            &pool,
            Some(fleet.crashing),
            &format!("ValueError: bad reading {n}"),
        )
        .await;
    }
    dead_letter(&pool, Some(fleet.steady), "KeyError: 'unit'").await;
    dead_letter(&pool, None, "RuntimeError: from no known worker").await;
    let server = Server::start(pool, Arc::default(), vec![]).await;

    let view = server.json("/api/workers").await;
    let errors = view["recent_errors"].as_array().expect("a list");
    let of = |id: Uuid| -> Vec<&Value> {
        errors
            .iter()
            .filter(|e| e["worker_id"] == id.to_string())
            .collect()
    };
    let crashing = of(fleet.crashing);
    let reasons: Vec<String> = crashing
        .iter()
        .map(|e| {
            e["error"]
                .as_str()
                .expect("a traceback")
                .lines()
                .last()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert_eq!(
        reasons,
        (3..=7)
            .rev()
            .map(|n| format!("ValueError: bad reading {n}"))
            .collect::<Vec<_>>(),
        "the last five, newest first"
    );
    assert_eq!(crashing[0]["worker_name"], "parse-humidity");
    let steady = of(fleet.steady);
    assert_eq!(steady.len(), 1, "{errors:?}");
    assert_eq!(steady[0]["worker_name"], "ingest-temperature");
    assert!(
        errors.iter().any(|e| e["worker_id"].is_null()),
        "a dead letter of no known worker is listed too: {errors:?}"
    );

    let newest = crashing[0]["id"].as_i64().expect("an id");
    let dom =
        String::from_utf8(chromium(&["--dump-dom"], &server.url("/")).await.stdout).expect("UTF-8");
    for expected in [
        "5+ · ValueError: bad reading 7".to_string(),
        format!("3m ago · errors show {newest}"),
        "1 · KeyError: 'unit'".to_string(),
    ] {
        assert!(
            dom.contains(&expected),
            "{expected:?} missing from the rendered page:\n{dom}"
        );
    }
}

/// `target/screenshots/status-page.png` of this crate, its directory created.
fn screenshot_path() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/screenshots");
    std::fs::create_dir_all(&dir).expect("create target/screenshots");
    let path = dir.join("status-page.png");
    let _ = std::fs::remove_file(&path);
    path
}

/// Runs headless Chromium on `url` with `args`, in a throwaway profile, and
/// lets the page run its script for five seconds of virtual time.
async fn chromium(args: &[&str], url: &str) -> std::process::Output {
    let profile = tempfile::tempdir().expect("temp dir");
    let run = tokio::process::Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--window-size=1200,800",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(CHROMIUM_DEADLINE, run)
        .await
        .unwrap_or_else(|_| panic!("{CHROMIUM} did not finish within {CHROMIUM_DEADLINE:?}"))
        .unwrap_or_else(|e| {
            panic!("cannot run `{CHROMIUM}` (install the Debian package `chromium`): {e}")
        });
    assert!(
        out.status.success(),
        "{CHROMIUM} {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Removes an instance's containers when dropped, passed or not.
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let filter = format!("label={}={}", labels::INSTANCE, self.0);
        let listed = std::process::Command::new("docker")
            .args(["ps", "-aq", "--filter", &filter])
            .output();
        let ids = listed
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        for id in ids.split_whitespace() {
            let _ = std::process::Command::new("docker")
                .args(["rm", "-f", id])
                .output();
        }
    }
}

#[sqlx::test(migrations = false)]
async fn metrics_after_a_pass_count_passes_actions_statuses_and_change_to_running(pool: PgPool) {
    migrated(&pool).await;
    let id = insert_worker(&pool, "fresh", "enabled", 1, "unknown", "").await;
    let metrics = Arc::new(Metrics::new());
    let server = Server::start(pool.clone(), metrics.clone(), vec![]).await;
    let mut config = Config {
        instance: format!("status{}", &Uuid::new_v4().simple().to_string()[..10]),
        ..Config::default()
    };
    let _cleanup = Cleanup(config.instance.clone());
    config.docker.image = common::stand_in_image().into();
    // The stand-in reports ready here, to a server that is not the
    // reconciler's: the worker stays "starting" for this test.
    config.code_server.public_url = server.url("");
    let runtime = DockerRuntime::connect(&config.instance)
        .await
        .expect("the Docker engine answers");
    let store = Arc::new(PgStore::from_pool(pool.clone()));
    let settings = PassSettings::from_config(&config);
    let reports = Arc::new(ReadyReports::new(Arc::default()));
    let mut reconciler = Reconciler::new(
        store,
        Containers::new(Arc::new(runtime), reports, metrics.clone()),
        settings,
        metrics.clone(),
    );
    metrics.change_announced(); // as the listener does on a NOTIFY
    let report = reconciler.pass().await.expect("the pass runs");
    assert_eq!(report.started, 1, "{report:?}");
    let done = reconciler.drain(MUST_HAPPEN).await;
    assert_eq!(done.len(), 1, "the create finished: {done:?}");
    assert!(done.iter().all(|d| d.result.is_ok()), "{done:?}");

    let response = server.get("/metrics").await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.expect("body");
    for line in [
        "workerctl_reconcile_passes_total 1",
        "workerctl_reconcile_pass_errors_total 0",
        "workerctl_reconcile_pass_duration_seconds_count 1",
        r#"workerctl_actions_total{kind="create",outcome="ok"} 1"#,
        // Started, not yet consuming its queue: not ready yet.
        r#"workerctl_workers{status="unknown"} 1"#,
        r#"workerctl_workers{status="error"} 0"#,
        "workerctl_worker_restarts_total 0",
        "workerctl_change_to_running_seconds_count 1",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line:?} missing from /metrics:\n{text}"
        );
    }

    let view = server.json("/api/workers").await;
    assert!(view["last_pass"]["error"].is_null(), "{view}");
    let fresh = worker(&view, id);
    assert_eq!(fresh["status"], "unknown", "{fresh}");
    assert_eq!(fresh["status_info"], "starting revision 1", "{fresh}");
}

#[sqlx::test(migrations = false)]
async fn readyz_is_ready_when_the_database_and_docker_answer(pool: PgPool) {
    migrated(&pool).await;
    let docker = DockerRuntime::connect(INSTANCE)
        .await
        .expect("the Docker engine answers");
    let probes = vec![
        Probe::database(Arc::new(PgStore::from_pool(pool.clone()))),
        Probe::docker(Arc::new(docker)),
    ];
    let server = Server::start(pool, Arc::default(), probes).await;
    let response = server.get("/readyz").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.expect("body"), "ready\n");
    assert_eq!(server.get("/healthz").await.status(), 200);
}

#[tokio::test]
async fn an_unreachable_database_makes_readyz_and_the_view_503_and_says_so() {
    // Port 9 (discard) has no Postgres behind it.
    let down = PgStore::connect("postgres://x:y@127.0.0.1:9/none").expect("lazy pool");
    let down = down.pool().clone();
    let docker = DockerRuntime::connect(INSTANCE)
        .await
        .expect("the Docker engine answers");
    let probes = vec![
        Probe::database(Arc::new(PgStore::from_pool(down.clone()))),
        Probe::docker(Arc::new(docker)),
    ];
    let server = Server::start(down, Arc::default(), probes).await;

    let response = within(server.get("/readyz"), "/readyz answers").await;
    assert_eq!(response.status(), 503);
    let message = message_of(response).await;
    assert!(message.contains("database: "), "{message}");
    assert!(!message.contains("docker"), "docker answered: {message}");

    let response = server.get("/api/workers").await;
    assert_eq!(response.status(), 503);
    let message = message_of(response).await;
    assert!(message.contains("list workers"), "{message}");
    assert_eq!(
        server.get("/healthz").await.status(),
        200,
        "alive all the same"
    );
}

#[sqlx::test(migrations = false)]
async fn readyz_names_a_dependency_that_does_not_answer_in_time(pool: PgPool) {
    // The real engine behind a relay that goes silent: the ping is sent and
    // never answered, as with a hung engine.
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("docker.sock");
    let relay = docker_relay(&socket).await;
    let client = bollard::Docker::connect_with_unix(
        socket.to_str().expect("utf-8 path"),
        120,
        bollard::API_DEFAULT_VERSION,
    )
    .expect("a client for the relay");
    let docker = DockerRuntime::with_client(client, INSTANCE)
        .await
        .expect("the engine answers through the relay");
    let probes = vec![
        Probe::database(Arc::new(PgStore::from_pool(pool.clone()))),
        Probe::docker(Arc::new(docker)),
    ];
    let server = Server::start(pool, Arc::default(), probes).await;
    let response = within(server.get("/readyz"), "/readyz answers").await;
    assert_eq!(response.status(), 200, "both answer before the stall");

    relay.stall();
    let response = within(server.get("/readyz"), "/readyz answers").await;
    assert_eq!(response.status(), 503);
    let message = message_of(response).await;
    assert_eq!(message, "not ready: docker: no answer within 1s");
    relay.cut();
}

/// `f`'s output, failing the test if it takes longer than [`MUST_HAPPEN`].
async fn within<F: std::future::Future>(f: F, what: &str) -> F::Output {
    tokio::time::timeout(MUST_HAPPEN, f)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

async fn message_of(response: reqwest::Response) -> String {
    let body: Value = response.json().await.expect("a JSON error");
    body["message"].as_str().expect("a message").to_string()
}
