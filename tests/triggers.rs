//! Triggers end to end: the HTTP invoke API (plain JSON and CloudEvents),
//! dead letters collected from `errors` and replayed, and cron schedules
//! firing through a real daemon, real dockerworker containers and RabbitMQ.
//! Each test has a fresh database, its own instance and its own exchange.
//!
//! Without Postgres, Docker, RabbitMQ or the images (`scripts/build-images`)
//! these tests fail; they never skip.

mod common;
#[path = "common/harness.rs"]
mod harness;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::PgPool;

use harness::{Cli, Daemon, pipeline, s};

const TOKEN: &str = "test-token-0123456789";
const SETTER_PY: &str =
    "def process(msg):\n    msg.metadata = {'seen_by': 'setter', 'n': 42}\n    return msg\n";
const RAISER_PY: &str =
    "def process(msg):\n    raise ValueError('no good: ' + str(msg.tracing_id))\n";
const DEADLINE: Duration = Duration::from_secs(90);

/// A daemon with the write API on (`api.token`).
async fn with_api(pool: PgPool) -> (Cli, Daemon) {
    let mut cli = Cli::new(pool).await;
    cli.set("WORKERCTL_API__TOKEN", TOKEN);
    let exchange = format!(
        "pipeline.messages.trig-test-{}",
        uuid::Uuid::new_v4().simple()
    );
    cli.set("WORKERCTL_AMQP__EXCHANGE", &exchange);
    let mut daemon = Daemon::start(&mut cli, common::worker_image()).await;
    daemon.exchange = Some(exchange);
    wait_http(&daemon).await;
    (cli, daemon)
}

async fn wait_http(daemon: &Daemon) {
    let start = Instant::now();
    let url = format!("http://127.0.0.1:{}/healthz", daemon.port);
    while reqwest::get(&url).await.is_err() {
        assert!(
            start.elapsed() < DEADLINE,
            "daemon HTTP never came up: {}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn invoke_url(daemon: &Daemon, worker: &str, query: &str) -> String {
    format!(
        "http://127.0.0.1:{}/api/workers/{worker}/invoke{query}",
        daemon.port
    )
}

async fn post(
    url: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut request = reqwest::Client::new().post(url).body(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = request.send().await.expect("the daemon answers");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.expect("a body");
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, headers, body)
}

// ------------------------------------------------------------ HTTP invoke --

#[sqlx::test(migrations = false)]
async fn http_invoke_answers_with_the_output_for_json_and_both_cloudevent_modes(pool: PgPool) {
    let (cli, mut daemon) = with_api(pool).await;
    let id = cli.create("setter", SETTER_PY, &["--wait"]).await;
    daemon.remember(id);
    let url = invoke_url(&daemon, "setter", "?timeout=60s");
    let message = br#"{"payload": "aGVsbG8=", "tracing_id": "http-1"}"#.to_vec();

    let (status, headers, body) = post(
        &url,
        Some(TOKEN),
        &[("content-type", "application/json")],
        message.clone(),
    )
    .await;
    assert_eq!(status, 200, "{body}\ndaemon:\n{}", daemon.log());
    assert_eq!(body["metadata"]["seen_by"], "setter");
    assert_eq!(body["tracing_id"], "http-1");
    assert_eq!(body["step_index"], 1);
    assert_eq!(headers["x-workerctl-tracing-id"], "http-1");

    let binary = [
        ("ce-specversion", "1.0"),
        ("ce-id", "evt-1"),
        ("ce-source", "/tests"),
        ("ce-type", "sensorbucket.uplink"),
        ("content-type", "application/json"),
    ];
    let (status, headers, body) = post(&url, Some(TOKEN), &binary, message.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["metadata"]["n"], 42);
    assert_eq!(headers["ce-type"], "workerctl.worker.output");
    assert_eq!(headers["ce-specversion"], "1.0");

    let event = json!({
        "specversion": "1.0", "id": "evt-2", "source": "/tests", "type": "sensorbucket.uplink",
        "datacontenttype": "application/json", "data": {"payload": "aGk=", "tracing_id": "http-2"}
    });
    let structured = [("content-type", "application/cloudevents+json")];
    let (status, _, body) = post(
        &url,
        Some(TOKEN),
        &structured,
        serde_json::to_vec(&event).expect("json"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["tracing_id"], "http-2");
    assert_eq!(body["metadata"]["seen_by"], "setter");

    // By id as well as by name; a wrong token is refused before anything is sent.
    let by_id = invoke_url(&daemon, &id.to_string(), "");
    let (status, headers, _) = post(&by_id, Some("wrong-token-xx"), &[], message.clone()).await;
    assert_eq!(status, 401);
    assert!(headers.contains_key("www-authenticate"));
    let (status, _, body) = post(&by_id, Some(TOKEN), &[], b"not json".to_vec()).await;
    assert_eq!(status, 400, "{body}");
    let (status, _, body) = post(
        &invoke_url(&daemon, "nobody", ""),
        Some(TOKEN),
        &[],
        message,
    )
    .await;
    assert_eq!(status, 404, "{body}");
}

#[sqlx::test(migrations = false)]
async fn http_invoke_of_a_failing_worker_is_422_with_the_errors_body_and_a_silent_one_504(
    pool: PgPool,
) {
    let (cli, mut daemon) = with_api(pool).await;
    let id = cli.create("raiser", RAISER_PY, &["--wait"]).await;
    daemon.remember(id);
    let sleeper = cli
        .create("sleeper", harness::ECHO_PY, &["--disabled"])
        .await;
    daemon.remember(sleeper);
    let message = br#"{"payload": "aGk=", "tracing_id": "trace-422"}"#.to_vec();

    let (status, _, body) = post(
        &invoke_url(&daemon, "raiser", "?timeout=60s"),
        Some(TOKEN),
        &[],
        message.clone(),
    )
    .await;
    assert_eq!(status, 422, "{body}\ndaemon:\n{}", daemon.log());
    assert_eq!(body["worker"], id.to_string());
    assert_eq!(body["received_by_worker"]["tracing_id"], "trace-422");
    let error = body["error"].as_str().expect("the traceback");
    assert!(error.contains("ValueError: no good: trace-422"), "{error}");

    let start = Instant::now();
    let (status, _, body) = post(
        &invoke_url(&daemon, "sleeper", "?timeout=2s"),
        Some(TOKEN),
        &[],
        message,
    )
    .await;
    assert_eq!(status, 504, "{body}");
    assert!(start.elapsed() < Duration::from_secs(10));
    let text = body["message"].as_str().expect("a message");
    assert!(text.contains("within 2s"), "{text}");
}

#[sqlx::test(migrations = false)]
async fn http_invoke_without_a_configured_token_is_403_and_says_how_to_set_one(pool: PgPool) {
    let (_cli, daemon) = pipeline(pool).await;
    wait_http(&daemon).await;
    let (status, _, body) = post(
        &invoke_url(&daemon, "any", ""),
        Some(TOKEN),
        &[],
        b"{}".to_vec(),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    let text = body["message"].as_str().expect("a message");
    assert!(text.contains("WORKERCTL_API__TOKEN"), "{text}");
    let _ = s;
}
