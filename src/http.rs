//! The daemon's HTTP server (axum): serves each worker's code to its
//! container (`GET /<uuid>/source`), takes its word that it consumes its
//! queue (`POST /<uuid>/ready`), the status page (`/`, polling
//! `/api/workers`), liveness and readiness probes, and Prometheus metrics.
//! Handlers only read or record; nothing here changes containers. The write
//! API (invoke) is in `http/api.rs`, merged in by [`serve_with`].

pub mod api;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use futures::future::{BoxFuture, join_all};
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::backoff::error_chain;
use crate::leader::Leadership;
use crate::metrics::Metrics;
use crate::model::WorkerId;
use crate::plan::containers::ReadyReport;
use crate::readiness::ReadyReports;
use crate::runtime::docker::DockerRuntime;
use crate::status_page;
use crate::store::WorkerStore;
use crate::store::postgres::PgStore;

/// How long `/readyz` waits for each dependency: a probe must answer fast,
/// and a dependency that takes longer is not fit to serve.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// What the handlers read. The code endpoint goes through the store
/// boundary; the status page reads the overview read model from `pool`.
pub struct AppState<S> {
    pub store: Arc<S>,
    pub metrics: Arc<Metrics>,
    /// The daemon's `instance`, named on the status page.
    pub instance: Arc<str>,
    pub pool: PgPool,
    /// What `/readyz` pings.
    pub probes: Arc<[Probe]>,
    /// Where ready reports go.
    pub reports: Arc<ReadyReports>,
    /// This daemon's leadership of its instance, if it campaigns: a standby
    /// serves everything and `/readyz` says it stands by.
    pub leadership: Option<Leadership>,
    /// Which runtime backend acts, and what it cannot enforce: shown on the
    /// status page.
    pub backend: Arc<status_page::Backend>,
    /// Called when the status page's view is read: asks for the workers'
    /// recording taps to be read into the table (in the background, at
    /// most every few seconds). `None` when recording is off.
    pub read_taps: Option<Arc<dyn Fn() + Send + Sync>>,
}

impl<S> Clone for AppState<S> {
    fn clone(&self) -> Self {
        AppState {
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            instance: self.instance.clone(),
            pool: self.pool.clone(),
            probes: self.probes.clone(),
            reports: self.reports.clone(),
            leadership: self.leadership.clone(),
            backend: self.backend.clone(),
            read_taps: self.read_taps.clone(),
        }
    }
}

type Check = dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync;

/// A dependency the daemon needs to do its job, and how to ping it.
#[derive(Clone)]
pub struct Probe {
    name: &'static str,
    check: Arc<Check>,
}

impl Probe {
    /// A probe named `name` (as `/readyz` reports it) running `check`.
    pub fn new<F, Fut>(name: &'static str, check: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        let check = move || -> BoxFuture<'static, _> { Box::pin(check()) };
        Probe {
            name,
            check: Arc::new(check),
        }
    }

    /// A ping of the database.
    pub fn database(store: Arc<PgStore>) -> Self {
        Probe::new("database", move || {
            let store = store.clone();
            async move { store.ping().await.map_err(|e| error_chain(&e)) }
        })
    }

    /// A ping of the Docker engine.
    pub fn docker(runtime: Arc<DockerRuntime>) -> Self {
        Probe::new("docker", move || {
            let runtime = runtime.clone();
            async move { runtime.ping().await.map_err(|e| error_chain(&e)) }
        })
    }

    /// `None` if the dependency answered in time, else "name: why".
    async fn failure(&self) -> Option<String> {
        match tokio::time::timeout(PROBE_TIMEOUT, (self.check)()).await {
            Ok(Ok(())) => None,
            Ok(Err(why)) => Some(format!("{}: {why}", self.name)),
            Err(_) => Some(format!("{}: no answer within {PROBE_TIMEOUT:?}", self.name)),
        }
    }
}

/// The routes, for the server and for tests.
pub fn router<S: WorkerStore>(state: AppState<S>) -> Router {
    Router::new()
        .route("/", get(|| async { Html(status_page::PAGE) }))
        .route("/api/workers", get(workers::<S>))
        .route("/{id}/source", get(source::<S>))
        .route("/{id}/ready", post(ready::<S>))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz::<S>))
        .route("/metrics", get(metrics::<S>))
        .with_state(state)
}

/// Binds `listen` and serves until `shutdown` is cancelled.
pub async fn serve<S: WorkerStore>(
    listen: SocketAddr,
    state: AppState<S>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    serve_with(listener, state, Router::new(), shutdown).await
}

/// Serves on a bound `listener` until `shutdown` is cancelled, with more
/// routes (the write API of `http/api.rs`).
pub(crate) async fn serve_with<S: WorkerStore>(
    listener: tokio::net::TcpListener,
    state: AppState<S>,
    extra: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    info!("HTTP server listening on {}", listener.local_addr()?);
    axum::serve(listener, router(state).merge(extra))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

/// `{"data": "<base64 zip>"}` for an enabled worker; 400 for a malformed id,
/// 404 for an unknown or disabled worker.
/// The query of a code download: the token from the worker's CODE_URL.
#[derive(Debug, serde::Deserialize)]
struct SourceQuery {
    #[serde(default)]
    token: String,
}

async fn source<S: WorkerStore>(
    State(state): State<AppState<S>>,
    Path(id): Path<String>,
    Query(query): Query<SourceQuery>,
) -> Response {
    let Ok(id) = id.parse::<WorkerId>() else {
        return error(
            StatusCode::BAD_REQUEST,
            "malformed worker id: expected a UUID",
        );
    };
    // A wrong or missing token looks like an unknown worker: the answer
    // does not tell which workers exist.
    match state.store.load_code(id, &query.token).await {
        Ok(Some(code)) => {
            let data = base64::engine::general_purpose::STANDARD.encode(&code.source);
            let body = json!({"message": "Fetched worker source", "data": data, "revision": code.revision});
            (StatusCode::OK, axum::Json(body)).into_response()
        }
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "no enabled worker with this id and token (use the CODE_URL workerctl gave the container)",
        ),
        Err(e) => {
            warn!(worker = %id, "{}", error_chain(&e));
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the worker store is unavailable; retry",
            )
        }
    }
}

/// The query of a ready report: what the container's `WORKER_READY_URL` carries.
#[derive(Debug, serde::Deserialize)]
struct ReadyQuery {
    token: String,
    container: String,
    spec: String,
}

/// A container says it consumes its queue: recorded, and the loop woken.
/// 202 whatever the token: the next pass believes the report only if the
/// token is the worker's and it names a container of that spec, and a
/// wrong one changes nothing. 400 for a malformed id or missing fields.
async fn ready<S: WorkerStore>(
    State(state): State<AppState<S>>,
    Path(id): Path<String>,
    query: Result<Query<ReadyQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(worker) = id.parse::<WorkerId>() else {
        return error(
            StatusCode::BAD_REQUEST,
            "malformed worker id: expected a UUID",
        );
    };
    let Ok(Query(q)) = query else {
        return error(
            StatusCode::BAD_REQUEST,
            "a ready report needs token, container and spec: use the WORKER_READY_URL workerctl gave the container",
        );
    };
    debug!(worker = %worker, container = %q.container, "ready report");
    state.reports.report(ReadyReport {
        worker,
        token: q.token,
        container: q.container,
        spec_hash: q.spec,
    });
    (
        StatusCode::ACCEPTED,
        axum::Json(json!({"message": "noted"})),
    )
        .into_response()
}

/// The status page's view: every worker, as JSON; 503 if the database
/// cannot be read.
async fn workers<S: WorkerStore>(State(state): State<AppState<S>>) -> Response {
    if let Some(read_taps) = &state.read_taps {
        read_taps();
    }
    match status_page::view(&state.pool, &state.instance, &state.metrics, &state.backend).await {
        Ok(view) => ([(header::CACHE_CONTROL, "no-store")], axum::Json(view)).into_response(),
        Err(e) => {
            debug!("status page: {}", error_chain(&e));
            error(StatusCode::SERVICE_UNAVAILABLE, &error_chain(&e))
        }
    }
}

/// Ready when every dependency answers a ping now; otherwise 503 naming
/// each one that did not, and why.
async fn readyz<S: WorkerStore>(State(state): State<AppState<S>>) -> Response {
    let failures: Vec<String> = join_all(state.probes.iter().map(Probe::failure))
        .await
        .into_iter()
        .flatten()
        .collect();
    let standby = state
        .leadership
        .as_ref()
        .map(Leadership::role)
        .filter(|role| !role.is_leader());
    if let (true, Some(role)) = (failures.is_empty(), standby) {
        // Ready to serve; another daemon acts.
        (StatusCode::OK, format!("ready, {role}\n")).into_response()
    } else if failures.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("not ready: {}", failures.join("; ")),
        )
    }
}

async fn metrics<S: WorkerStore>(State(state): State<AppState<S>>) -> Response {
    let content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    (
        [(header::CONTENT_TYPE, content_type)],
        state.metrics.render(),
    )
        .into_response()
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(json!({ "message": message }))).into_response()
}
