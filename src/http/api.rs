//! The daemon's write API: `POST /api/workers/{id-or-name}/invoke`, the
//! HTTP door to the same invocation `workerctl worker invoke` makes
//! ([`crate::triggers::invoke`]). It accepts a pipeline message as JSON, or a
//! CloudEvent whose data is one (binary mode with `ce-*` headers, or
//! structured mode as `application/cloudevents+json`), and answers 200 with
//! the worker's output, 422 with the `errors` body when `process` failed and
//! 504 when nothing came within `?timeout=` (default 30 s).
//!
//! It puts messages into the pipeline, so it needs the bearer token of
//! `api.token`; with none configured it answers 403 and says how to set one.
//! `POST /api/workers/{id-or-name}/try` is the HTTP door to `workerctl
//! worker try` ([`crate::trial`]), behind the same token.
//!
//! This file owns the HTTP shape only: parsing, auth and status codes.

use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::Utc;
use cloudevents::{AttributesReader, Data};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tracing::{debug, warn};
use uuid::Uuid;

use crate::backoff::error_chain;
use crate::config::{AmqpConfig, Secret};
use crate::store::Failure;
use crate::store::admin::{Db, DbError};
use crate::triggers::invoke::{self, Answer, Outcome};

/// The timeout of an invocation that names none, as `worker invoke` has.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest `?timeout=` accepted: a request is not a background job.
pub(crate) const MAX_TIMEOUT: Duration = Duration::from_secs(300);

const CLOUDEVENTS_JSON: &str = "application/cloudevents+json";

/// What the API handlers need.
#[derive(Clone)]
pub(crate) struct ApiState {
    pub db: Db,
    pub amqp: AmqpConfig,
    /// `api.token`; `None` turns the write API off (403).
    pub token: Option<Secret>,
    /// What a try container is (`POST /api/workers/{id}/try`).
    pub trial: crate::trial::Settings,
}

/// The API's routes, to merge into the daemon's router.
pub(crate) fn routes(state: ApiState) -> Router {
    Router::new()
        .route("/api/workers/{worker}/invoke", post(invoke_handler))
        .route("/api/workers/{worker}/try", post(try_handler))
        .route("/api/workers/{worker}/messages/{id}", get(message_handler))
        .with_state(state)
}

#[derive(Debug, serde::Deserialize)]
struct InvokeQuery {
    timeout: Option<String>,
}

async fn invoke_handler(
    State(state): State<ApiState>,
    Path(worker): Path<String>,
    Query(query): Query<InvokeQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(refusal) = authorize(state.token.as_ref(), &headers) {
        return refusal.into_response();
    }
    let timeout = match parse_timeout(query.timeout.as_deref()) {
        Ok(t) => t,
        Err(problem) => return message(StatusCode::BAD_REQUEST, &problem),
    };
    let request = match parse_request(&headers, body.to_vec()) {
        Ok(r) => r,
        Err(problem) => return message(StatusCode::BAD_REQUEST, &problem),
    };
    let target = match state.db.resolve(&worker).await {
        Ok(t) => t,
        Err(e) => return db_failure(&e),
    };
    let now_ms = Utc::now().timestamp_millis();
    let prepared = match invoke::prepare(request.message, target.id, now_ms, Uuid::new_v4) {
        Ok(p) => p,
        Err(problem) => return message(StatusCode::BAD_REQUEST, &problem),
    };
    let waiting = |id: Uuid| debug!(worker = %id, "no queue takes the worker's key yet");
    let outcome = invoke::invoke(&state.amqp, target.id, &prepared, timeout, &waiting).await;
    let reply = match outcome {
        Ok(Outcome::Answer {
            routing_key,
            body,
            elapsed,
        }) => answered(&routing_key, &body, elapsed),
        Ok(Outcome::TimedOut { routed }) => timed_out(&target.name, timeout, routed),
        Err(e) => {
            warn!(worker = %target.id, "invoke: {}", error_chain(&e));
            message(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("cannot invoke: {}", error_chain(&e)),
            )
        }
    };
    with_trace(reply, &prepared.tracing_id, request.cloudevent, target.id)
}

/// `GET /api/workers/{id-or-name}/messages/{n}`: one recorded message
/// whole, as received, with its output (what the status page opens). It
/// only reads, as `/api/workers` does.
async fn message_handler(
    State(state): State<ApiState>,
    Path((worker, id)): Path<(String, i64)>,
) -> Response {
    let target = match state.db.resolve(&worker).await {
        Ok(t) => t,
        Err(e) => return db_failure(&e),
    };
    match crate::store::recorded::get(state.db.pool(), target.id, id).await {
        Ok(Some(r)) => {
            (StatusCode::OK, axum::Json(crate::trial::recording_json(&r))).into_response()
        }
        Ok(None) => message(
            StatusCode::NOT_FOUND,
            &format!("worker {} has no recorded message {id}", target.name),
        ),
        Err(e) => message(StatusCode::SERVICE_UNAVAILABLE, &error_chain(&e)),
    }
}

/// The body of `POST /api/workers/{id}/try`: the candidate code (`code`,
/// a usercode.py, or `archive`, a base64 zip) and the inputs (`message`, or
/// `dead_letters: true`, else the recorded messages; `last` of them).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TryBody {
    code: Option<String>,
    archive: Option<String>,
    #[serde(default = "default_last")]
    last: i64,
    message: Option<Value>,
    #[serde(default)]
    dead_letters: bool,
    timeout: Option<String>,
}

fn default_last() -> i64 {
    20
}

/// The same try as `workerctl worker try` ([`crate::trial`]): 200 with the
/// report (its `summary` says whether anything changed), 400 for a bad
/// request or no inputs, 404 for an unknown worker, 422 when the candidate
/// does not load, 503 when a service is away. Needs the bearer token: it
/// runs code in a container.
async fn try_handler(
    State(state): State<ApiState>,
    Path(worker): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(refusal) = authorize(state.token.as_ref(), &headers) {
        return refusal.into_response();
    }
    let (candidate, inputs, timeout) = match read_try(&body) {
        Ok(parts) => parts,
        Err(problem) => return message(StatusCode::BAD_REQUEST, &problem),
    };
    let target = match state.db.resolve(&worker).await {
        Ok(t) => t,
        Err(e) => return db_failure(&e),
    };
    let request = crate::trial::Request {
        worker: target,
        candidate,
        inputs,
        message_timeout: timeout,
    };
    match crate::trial::run(&state.db, &state.trial, request).await {
        Ok(report) => (StatusCode::OK, axum::Json(report)).into_response(),
        Err(crate::trial::TrialError::Db(e)) => db_failure(&e),
        Err(e @ crate::trial::TrialError::CandidateInvalid(_)) => {
            message(StatusCode::UNPROCESSABLE_ENTITY, &error_chain(&e))
        }
        Err(e) if e.is_bad_input() => message(StatusCode::BAD_REQUEST, &error_chain(&e)),
        Err(e) => {
            warn!("try: {}", error_chain(&e));
            message(StatusCode::SERVICE_UNAVAILABLE, &error_chain(&e))
        }
    }
}

type TryParts = (Vec<u8>, crate::trial::Inputs, Duration);

fn read_try(body: &[u8]) -> Result<TryParts, String> {
    use base64::Engine as _;
    let t: TryBody = serde_json::from_slice(body).map_err(|e| {
        format!("the body must be JSON: {{\"code\": \"<usercode.py>\"}} or {{\"archive\": \"<base64 zip>\"}}, with \"last\", \"message\" or \"dead_letters\": {e}")
    })?;
    let candidate = match (t.code, t.archive) {
        (Some(code), None) => crate::archive::sensorbucket_archive(&code)
            .map_err(|e| format!("cannot build the code archive: {e}"))?,
        (None, Some(zip)) => base64::engine::general_purpose::STANDARD
            .decode(zip.trim())
            .map_err(|e| format!("archive is not base64: {e}"))?,
        _ => return Err("give the candidate code: either \"code\" or \"archive\"".into()),
    };
    let inputs = match (t.message, t.dead_letters) {
        (Some(_), true) => return Err("give \"message\" or \"dead_letters\", not both".into()),
        (Some(m), false) => crate::trial::Inputs::Message(m),
        (None, true) => crate::trial::Inputs::DeadLetters(t.last),
        (None, false) => crate::trial::Inputs::Last(t.last),
    };
    let timeout = match t.timeout.as_deref() {
        None => crate::trial::DEFAULT_MESSAGE_TIMEOUT,
        Some(text) => humantime::parse_duration(text)
            .map_err(|e| format!("timeout {text:?} is not a duration (e.g. 10s): {e}"))?,
    };
    Ok((candidate, inputs, timeout))
}

/// The request's pipeline message, and whether it came as a CloudEvent.
#[derive(Debug, PartialEq)]
struct Request {
    message: Value,
    cloudevent: bool,
}

/// A CloudEvent (structured by content type, binary by `ce-specversion`)
/// through the CloudEvents SDK, else the body as a JSON pipeline message.
fn parse_request(headers: &HeaderMap, body: Vec<u8>) -> Result<Request, String> {
    let structured = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with(CLOUDEVENTS_JSON));
    let binary = headers.contains_key("ce-specversion");
    if !structured && !binary {
        let message = serde_json::from_slice(&body)
            .map_err(|e| format!("the body is not a JSON pipeline message: {e}"))?;
        return Ok(Request {
            message,
            cloudevent: false,
        });
    }
    let event = cloudevents::binding::http::to_event(headers, body)
        .map_err(|e| format!("not a valid CloudEvent: {e}"))?;
    debug!(id = event.id(), ty = event.ty(), "invoke by CloudEvent");
    let message = match event.data() {
        Some(Data::Json(v)) => v.clone(),
        Some(Data::String(s)) => serde_json::from_str(s)
            .map_err(|e| format!("the CloudEvent's data is not a JSON pipeline message: {e}"))?,
        Some(Data::Binary(b)) => serde_json::from_slice(b)
            .map_err(|e| format!("the CloudEvent's data is not a JSON pipeline message: {e}"))?,
        None => {
            return Err("the CloudEvent has no data: send the pipeline message as its data".into());
        }
    };
    Ok(Request {
        message,
        cloudevent: true,
    })
}

fn parse_timeout(given: Option<&str>) -> Result<Duration, String> {
    let Some(text) = given else {
        return Ok(DEFAULT_TIMEOUT);
    };
    let timeout = humantime::parse_duration(text)
        .map_err(|e| format!("timeout {text:?} is not a duration like 30s: {e}"))?;
    if timeout.is_zero() || timeout > MAX_TIMEOUT {
        return Err(format!(
            "timeout must be more than 0s and at most {}",
            humantime::format_duration(MAX_TIMEOUT)
        ));
    }
    Ok(timeout)
}

/// Why a request is not let in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    /// No `api.token` is configured: the write API is off (403).
    Off,
    /// A missing or wrong token (401).
    Unauthorized,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::Off => message(
                StatusCode::FORBIDDEN,
                "the invoke API is off: no api.token is configured. Set one in the config file \
                 ([api] token = \"...\") or as WORKERCTL_API__TOKEN, restart the daemon, and send \
                 Authorization: Bearer <token>",
            ),
            Refusal::Unauthorized => {
                let mut refusal = message(
                    StatusCode::UNAUTHORIZED,
                    "missing or wrong bearer token: send Authorization: Bearer <api.token>",
                );
                refusal.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"workerctl\""),
                );
                refusal
            }
        }
    }
}

/// Lets in the holder of the configured token. Tokens are compared by
/// digest, so the time taken does not tell how much of a guess was right.
fn authorize(token: Option<&Secret>, headers: &HeaderMap) -> Result<(), Refusal> {
    let token = token.ok_or(Refusal::Off)?;
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .unwrap_or("")
        .trim();
    if !given.is_empty() && Sha256::digest(given) == Sha256::digest(token.expose()) {
        Ok(())
    } else {
        Err(Refusal::Unauthorized)
    }
}

fn answered(routing_key: &str, body: &[u8], elapsed: Duration) -> Response {
    let (status, value) = match invoke::verdict(routing_key, body) {
        Answer::Output(v) => (StatusCode::OK, v),
        Answer::Failed { body, .. } => (StatusCode::UNPROCESSABLE_ENTITY, body),
    };
    let mut response = (status, axum::Json(value)).into_response();
    let headers = response.headers_mut();
    insert(headers, "x-workerctl-routing-key", routing_key);
    insert(
        headers,
        "x-workerctl-elapsed-ms",
        &elapsed.as_millis().to_string(),
    );
    response
}

fn timed_out(name: &str, timeout: Duration, routed: bool) -> Response {
    let why = if routed {
        format!("see `workerctl worker logs {name}`")
    } else {
        format!(
            "no queue takes its messages: is it enabled and running? see `workerctl worker show {name}`"
        )
    };
    message(
        StatusCode::GATEWAY_TIMEOUT,
        &format!(
            "no answer from worker {name} within {}: {why}",
            humantime::format_duration(timeout)
        ),
    )
}

/// Every answer names the tracing id; the answer to a CloudEvent is a
/// binary-mode CloudEvent itself.
fn with_trace(
    mut response: Response,
    tracing_id: &str,
    cloudevent: bool,
    worker: Uuid,
) -> Response {
    let status = response.status();
    let headers = response.headers_mut();
    insert(headers, "x-workerctl-tracing-id", tracing_id);
    if cloudevent && (status.is_success() || status == StatusCode::UNPROCESSABLE_ENTITY) {
        let ty = if status.is_success() {
            "workerctl.worker.output"
        } else {
            "workerctl.worker.error"
        };
        insert(headers, "ce-specversion", "1.0");
        insert(headers, "ce-id", &Uuid::new_v4().to_string());
        insert(
            headers,
            "ce-source",
            &format!("/workerctl/workers/{worker}"),
        );
        insert(headers, "ce-type", ty);
    }
    response
}

fn insert(headers: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(HeaderName::from_static(name), value);
    }
}

fn db_failure(e: &DbError) -> Response {
    let status = match e {
        DbError::UnknownId(_) | DbError::UnknownName(_) => StatusCode::NOT_FOUND,
        DbError::AmbiguousName { .. } => StatusCode::CONFLICT,
        DbError::Query { source, .. } if crate::store::classify(source) == Failure::Query => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    message(status, &error_chain(e))
}

fn message(status: StatusCode, text: &str) -> Response {
    (status, axum::Json(json!({ "message": text }))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).expect("header"));
        }
        h
    }

    #[test]
    fn a_plain_json_body_is_the_pipeline_message() {
        let r =
            parse_request(&HeaderMap::new(), br#"{"payload": "aGk="}"#.to_vec()).expect("parsed");
        assert_eq!(r.message, json!({"payload": "aGk="}));
        assert!(!r.cloudevent);
        assert!(parse_request(&HeaderMap::new(), b"nope".to_vec()).is_err());
    }

    #[test]
    fn a_binary_mode_cloudevent_gives_its_data() {
        let h = headers(&[
            ("ce-specversion", "1.0"),
            ("ce-id", "1"),
            ("ce-source", "/test"),
            ("ce-type", "sensorbucket.uplink"),
            ("content-type", "application/json"),
        ]);
        let r = parse_request(&h, br#"{"payload": "aGk="}"#.to_vec()).expect("parsed");
        assert_eq!(r.message, json!({"payload": "aGk="}));
        assert!(r.cloudevent);
    }

    #[test]
    fn a_structured_mode_cloudevent_gives_its_data() {
        let h = headers(&[("content-type", "application/cloudevents+json")]);
        let event = json!({
            "specversion": "1.0", "id": "1", "source": "/test", "type": "t",
            "datacontenttype": "application/json", "data": {"payload": "aGk="}
        });
        let r = parse_request(&h, serde_json::to_vec(&event).expect("json")).expect("parsed");
        assert_eq!(r.message, json!({"payload": "aGk="}));
    }

    #[test]
    fn a_cloudevent_without_its_required_attributes_is_refused() {
        let h = headers(&[("ce-specversion", "1.0")]);
        let err = parse_request(&h, b"{}".to_vec()).expect_err("refused");
        assert!(err.contains("CloudEvent"), "{err}");
    }

    #[test]
    fn without_a_configured_token_the_api_is_forbidden_and_says_how_to_set_one() {
        let refusal = authorize(None, &HeaderMap::new()).expect_err("refused");
        let response = refusal.into_response();
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
    }

    #[test]
    fn a_wrong_or_missing_token_is_unauthorized_and_the_right_one_passes() {
        let token = Secret::new("s3cret");
        let none = authorize(Some(&token), &HeaderMap::new()).expect_err("refused");
        let response = none.into_response();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert!(response.headers().contains_key(header::WWW_AUTHENTICATE));
        let wrong = headers(&[("authorization", "Bearer nope")]);
        assert!(authorize(Some(&token), &wrong).is_err());
        let right = headers(&[("authorization", "Bearer s3cret")]);
        assert!(authorize(Some(&token), &right).is_ok());
    }

    #[test]
    fn timeouts_default_to_30s_and_are_bounded() {
        assert_eq!(parse_timeout(None), Ok(DEFAULT_TIMEOUT));
        assert_eq!(parse_timeout(Some("2s")), Ok(Duration::from_secs(2)));
        assert!(parse_timeout(Some("0s")).is_err());
        assert!(parse_timeout(Some("1h")).is_err());
        assert!(parse_timeout(Some("soon")).is_err());
    }
}
