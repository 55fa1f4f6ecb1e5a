//! The daemon's HTTP server (axum): serves each worker's code to its
//! container (`GET /<uuid>/source`), health and readiness probes, and
//! Prometheus metrics. Handlers only read; nothing here changes containers.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::backoff::error_chain;
use crate::metrics::Metrics;
use crate::model::WorkerId;
use crate::store::WorkerStore;

pub struct AppState<S> {
    pub store: Arc<S>,
    pub metrics: Arc<Metrics>,
}

impl<S> Clone for AppState<S> {
    fn clone(&self) -> Self {
        AppState {
            store: self.store.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

/// The routes, for the server and for tests.
pub fn router<S: WorkerStore>(state: AppState<S>) -> Router {
    Router::new()
        .route("/{id}/source", get(source::<S>))
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
    info!("HTTP server listening on {}", listener.local_addr()?);
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

/// `{"data": "<base64 zip>"}` for an enabled worker; 400 for a malformed id,
/// 404 for an unknown or disabled worker.
async fn source<S: WorkerStore>(
    State(state): State<AppState<S>>,
    Path(id): Path<String>,
) -> Response {
    let Ok(id) = id.parse::<WorkerId>() else {
        return error(
            StatusCode::BAD_REQUEST,
            "malformed worker id: expected a UUID",
        );
    };
    match state.store.load_code(id).await {
        Ok(Some(code)) => {
            let data = base64::engine::general_purpose::STANDARD.encode(&code.source);
            let body = json!({"message": "Fetched worker source", "data": data, "revision": code.revision});
            (StatusCode::OK, axum::Json(body)).into_response()
        }
        Ok(None) => error(StatusCode::NOT_FOUND, "no enabled worker with this id"),
        Err(e) => {
            warn!(worker = %id, "{}", error_chain(&e));
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the worker store is unavailable; retry",
            )
        }
    }
}

/// Ready when the last pass reached both the database and Docker.
async fn readyz<S: WorkerStore>(State(state): State<AppState<S>>) -> Response {
    match state.metrics.not_ready_reason() {
        None => (StatusCode::OK, "ready\n").into_response(),
        Some(reason) => error(StatusCode::SERVICE_UNAVAILABLE, &reason),
    }
}

async fn metrics<S: WorkerStore>(State(state): State<AppState<S>>) -> Response {
    let content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    (
        [(axum::http::header::CONTENT_TYPE, content_type)],
        state.metrics.render(),
    )
        .into_response()
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(json!({ "message": message }))).into_response()
}
