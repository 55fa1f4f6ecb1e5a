//! The status page and the operations endpoints, served by the real router
//! on 127.0.0.1 against a fresh Postgres database per test (`#[sqlx::test]`,
//! which reads DATABASE_URL): the JSON view the page polls, the page as
//! headless Chromium renders it (its DOM after the script ran, and a
//! screenshot kept at `target/screenshots/status-page.png`), `/metrics`
//! after a real pass, and `/readyz`.
//!
//! Needs Postgres, the Docker engine (the readiness ping) and the Debian
//! package `chromium`. Without them these tests fail; they never skip.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use sqlx::PgPool;
use tokio::task::JoinHandle;
use uuid::Uuid;
use workerctl::archive::{DEFAULT_USERCODE, sensorbucket_archive};
use workerctl::config::Config;
use workerctl::http::{self, AppState, Probe};
use workerctl::metrics::Metrics;
use workerctl::model::{ContainerSpec, ManagedContainer};
use workerctl::readiness::ReadyReports;
use workerctl::reconciler::{PassSettings, Reconciler};
use workerctl::runtime::docker::DockerRuntime;
use workerctl::runtime::{ContainerRuntime, ImageState, RuntimeError};
use workerctl::status_page::Backend;
use workerctl::store::postgres::PgStore;

const INSTANCE: &str = "status-test";
/// The Debian package and command that renders the page.
const CHROMIUM: &str = "chromium";
const CHROMIUM_DEADLINE: Duration = Duration::from_secs(90);

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

/// A Docker engine that does whatever it is asked and holds no containers.
struct AgreeableRuntime;

impl ContainerRuntime for AgreeableRuntime {
    async fn list(&self) -> Result<Vec<ManagedContainer>, RuntimeError> {
        Ok(vec![])
    }
    async fn image(&self, _: &str) -> Result<ImageState, RuntimeError> {
        Ok(ImageState::Present {
            id: "sha256:agreeable".into(),
        })
    }
    async fn network_exists(&self, _: &str) -> Result<bool, RuntimeError> {
        Ok(true)
    }
    async fn create(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        Ok(format!("id-{}", spec.name))
    }
    async fn start(&self, _: &str) -> Result<(), RuntimeError> {
        Ok(())
    }
    async fn stop(&self, _: &str, _: Duration) -> Result<(), RuntimeError> {
        Ok(())
    }
    async fn interrupt(&self, _: &str, _: &str, _: Duration) -> Result<(), RuntimeError> {
        Ok(())
    }
    async fn remove(&self, _: &str) -> Result<(), RuntimeError> {
        Ok(())
    }
    async fn rename(&self, _: &str, _: &str) -> Result<(), RuntimeError> {
        Ok(())
    }
    async fn last_lines(&self, _: &str, _: usize) -> Result<Vec<String>, RuntimeError> {
        Ok(vec![])
    }
}

#[sqlx::test(migrations = false)]
async fn metrics_after_a_pass_count_passes_actions_statuses_and_change_to_running(pool: PgPool) {
    migrated(&pool).await;
    let id = insert_worker(&pool, "fresh", "enabled", 1, "unknown", "").await;
    let metrics = Arc::new(Metrics::new());
    let store = Arc::new(PgStore::from_pool(pool.clone()));
    let settings = PassSettings::from_config(&Config::default());
    let reports = Arc::new(ReadyReports::new(Arc::default()));
    let mut reconciler = Reconciler::new(
        store,
        Arc::new(AgreeableRuntime),
        settings,
        metrics.clone(),
        reports,
    );
    metrics.change_announced(); // as the listener does on a NOTIFY
    let report = reconciler.pass().await.expect("the pass runs");
    assert_eq!(report.started, 1, "{report:?}");
    let done = reconciler.drain(Duration::from_secs(10)).await;
    assert!(done.iter().all(|d| d.result.is_ok()), "{done:?}");

    let server = Server::start(pool, metrics, vec![]).await;
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
    let docker_ok = Probe::new("docker", || async { Ok(()) });
    let probes = vec![
        Probe::database(Arc::new(PgStore::from_pool(down.clone()))),
        docker_ok,
    ];
    let server = Server::start(down, Arc::default(), probes).await;

    let started = Instant::now();
    let response = server.get("/readyz").await;
    assert_eq!(response.status(), 503);
    let message = message_of(response).await;
    assert!(message.contains("database: "), "{message}");
    assert!(!message.contains("docker"), "docker answered: {message}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

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
    let hung = Probe::new("docker", || async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        Ok(())
    });
    let probes = vec![
        Probe::database(Arc::new(PgStore::from_pool(pool.clone()))),
        hung,
    ];
    let server = Server::start(pool, Arc::default(), probes).await;
    let started = Instant::now();
    let response = server.get("/readyz").await;
    assert_eq!(response.status(), 503);
    let message = message_of(response).await;
    assert_eq!(message, "not ready: docker: no answer within 1s");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

async fn message_of(response: reqwest::Response) -> String {
    let body: Value = response.json().await.expect("a JSON error");
    body["message"].as_str().expect("a message").to_string()
}
