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

use harness::{Cli, Daemon, Terminal, pipeline, s, save};

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
    let queue = format!("workerctl.errors.test-{}", uuid::Uuid::new_v4().simple());
    cli.set("WORKERCTL_DEAD_LETTERS__QUEUE", &queue);
    cli.set("WORKERCTL_DEAD_LETTERS__QUEUE_MAX_LENGTH", "50");
    let mut daemon = Daemon::start(&mut cli, common::worker_image()).await;
    daemon.exchange = Some(exchange);
    daemon.queues.push(queue);
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

    // The answer is 504 naming the 2 s asked for; the deadline only catches
    // a request that never gives up.
    let url = invoke_url(&daemon, "sleeper", "?timeout=2s");
    let waited = post(&url, Some(TOKEN), &[], message);
    let (status, _, body) = tokio::time::timeout(DEADLINE, waited)
        .await
        .expect("the invoke gives up after its timeout");
    assert_eq!(status, 504, "{body}");
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

// ---------------------------------------------------------------- helpers --

/// A private queue bound to `key` on `exchange`, as a test's listener.
struct Listener {
    _connection: lapin::Connection,
    consumer: lapin::Consumer,
}

async fn listen(exchange: &str, key: &str) -> Listener {
    let (connection, _, consumer) =
        common::amqp::listen(&common::amqp_url(), exchange, &[key]).await;
    Listener {
        _connection: connection,
        consumer,
    }
}

impl Listener {
    /// Every message that arrives within `within`: (body, fire-time header).
    /// What arrives until at least `n` messages have, failing the test after
    /// [`DEADLINE`].
    async fn at_least(&mut self, n: usize) -> Vec<(Value, Option<i64>, Instant)> {
        let mut got = Vec::new();
        let start = Instant::now();
        while got.len() < n {
            assert!(start.elapsed() < DEADLINE, "{n} messages: only {got:?}");
            got.extend(self.collect(Duration::from_secs(1)).await);
        }
        got
    }

    async fn collect(&mut self, within: Duration) -> Vec<(Value, Option<i64>, Instant)> {
        use futures::StreamExt;
        let deadline = tokio::time::Instant::now() + within;
        let mut got = Vec::new();
        while let Ok(Some(Ok(d))) = tokio::time::timeout_at(deadline, self.consumer.next()).await {
            let fire = d
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get("x-workerctl-fire-time").cloned())
                .and_then(|v| match v {
                    lapin::types::AMQPValue::LongLongInt(n) => Some(n),
                    _ => None,
                });
            let body = serde_json::from_slice(&d.data).unwrap_or(Value::Null);
            got.push((body, fire, Instant::now()));
        }
        got
    }

    async fn first(&mut self, within: Duration) -> Option<Value> {
        use futures::StreamExt;
        match tokio::time::timeout(within, self.consumer.next()).await {
            Ok(Some(Ok(d))) => serde_json::from_slice(&d.data).ok(),
            _ => None,
        }
    }
}

fn exchange_of(daemon: &Daemon) -> String {
    daemon.exchange.clone().expect("the test's exchange")
}

/// Polls `errors list --output json` until it holds `n` dead letters.
async fn dead_letters(cli: &Cli, daemon: &Daemon, n: usize) -> Vec<Value> {
    let start = Instant::now();
    loop {
        let out = cli.run(&["errors", "list", "--output", "json"]).await.ok();
        let list: Vec<Value> = serde_json::from_str(&out.stdout).expect("a JSON list");
        if list.len() >= n {
            return list;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{} dead letters never came: {list:?}\n{}",
            n,
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ----------------------------------------------------------- dead letters --

#[sqlx::test(migrations = false)]
async fn a_failure_is_kept_shown_replayed_after_the_fix_and_purged(pool: PgPool) {
    let (mut cli, mut daemon) = with_api(pool).await;
    let _ = &mut cli;
    let id = cli.create("raiser", RAISER_PY, &["--wait"]).await;
    daemon.remember(id);
    let exchange = exchange_of(&daemon);
    let out_key = format!("out-{}", uuid::Uuid::new_v4().simple());
    let mut output = listen(&exchange, &out_key).await;
    let message = json!({"payload": "aGk=", "tracing_id": "trace-dl", "pipeline_steps": [id.to_string(), out_key]});
    let path = cli.file("m.json", message.to_string().as_bytes());
    let out = cli
        .run(&[
            "worker",
            "invoke",
            "raiser",
            "--message",
            s(&path),
            "--timeout",
            "60s",
        ])
        .await;
    assert_eq!(out.code, 1, "{out:#?}");

    let list = dead_letters(&cli, &daemon, 1).await;
    assert_eq!(list.len(), 1, "{list:?}");
    let letter = &list[0];
    assert_eq!(letter["worker_name"], "raiser");
    assert_eq!(letter["worker_id"], id.to_string());
    assert!(
        letter["error"]
            .as_str()
            .expect("error")
            .contains("ValueError: no good: trace-dl")
    );
    let dl = letter["id"].as_i64().expect("id").to_string();

    let table = cli
        .run(&["errors", "list", "--worker", "raiser", "--since", "1h"])
        .await
        .ok();
    assert!(
        table.stdout.contains("ValueError: no good: trace-dl"),
        "{table:#?}"
    );
    let show = cli.run(&["errors", "show", &dl]).await.ok();
    assert!(show.stdout.contains("traceback:"), "{show:#?}");
    assert!(
        show.stdout.contains("\"tracing_id\": \"trace-dl\""),
        "{show:#?}"
    );

    // Fix the code, then replay: the message goes through, to the next step.
    let fixed = cli.file("fixed.py", SETTER_PY.as_bytes());
    cli.run(&["worker", "update", "raiser", "--code", s(&fixed), "--wait"])
        .await
        .ok();
    let replay = cli.run(&["errors", "replay", &dl]).await.ok();
    assert!(replay.stdout.contains("replayed to worker"), "{replay:#?}");
    let result = output
        .first(Duration::from_secs(60))
        .await
        .expect("the replayed message comes out");
    assert_eq!(result["tracing_id"], "trace-dl");
    assert_eq!(result["metadata"]["seen_by"], "setter");
    let again = cli.run(&["errors", "list", "--output", "json"]).await.ok();
    let again: Vec<Value> = serde_json::from_str(&again.stdout).expect("json");
    assert_eq!(again[0]["replays"], 1);

    let purge = cli
        .run(&["errors", "purge", "--worker", "raiser"])
        .await
        .ok();
    assert_eq!(purge.stdout.trim(), "1 dead letter(s) purged");
    let none = cli.run(&["errors", "show", &dl]).await;
    none.fails(2, "no dead letter has the id");
}

#[sqlx::test(migrations = false)]
async fn the_dead_letter_queue_is_a_bounded_durable_quorum_queue_beside_other_listeners(
    pool: PgPool,
) {
    let (cli, daemon) = with_api(pool).await;
    let queue = daemon
        .queues
        .iter()
        .find(|q| q.starts_with("workerctl.errors"))
        .cloned()
        .expect("queue name");
    let url = format!("{}/api/queues/%2f/{queue}", common::management_url());
    let start = Instant::now();
    let info: Value = loop {
        let response = reqwest::Client::new()
            .get(&url)
            .basic_auth("workerctl", Some("workerctl"))
            .send()
            .await
            .expect("management API");
        if response.status().is_success() {
            break response.json().await.expect("json");
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the queue never appeared: {}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(info["durable"], true);
    assert_eq!(info["arguments"]["x-queue-type"], "quorum");
    assert_eq!(info["arguments"]["x-max-length"], 50);

    // Another listener on `errors` still gets its copy.
    let exchange = exchange_of(&daemon);
    let mut tracing = listen(&exchange, "errors").await;
    publish(
        &exchange,
        "errors",
        br#"{"worker": "nobody", "error": "E: by hand", "received_by_worker": {}}"#,
    )
    .await;
    assert!(
        tracing.first(Duration::from_secs(10)).await.is_some(),
        "the other listener got it"
    );
    let list = dead_letters(&cli, &daemon, 1).await;
    assert_eq!(list[0]["error"], "E: by hand");
}

async fn publish(exchange: &str, key: &str, body: &[u8]) {
    let connection =
        lapin::Connection::connect(&common::amqp_url(), lapin::ConnectionProperties::default())
            .await
            .expect("broker");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .basic_publish(
            exchange.into(),
            key.into(),
            Default::default(),
            body,
            lapin::BasicProperties::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("sent");
    let _ = connection.close(200, "done".into()).await;
}

// -------------------------------------------------------------- schedules --

#[sqlx::test(migrations = false)]
async fn a_schedule_fires_its_message_through_the_worker_every_second(pool: PgPool) {
    let (cli, mut daemon) = with_api(pool).await;
    let id = cli.create("setter", SETTER_PY, &["--wait"]).await;
    daemon.remember(id);
    let out_key = format!("out-{}", uuid::Uuid::new_v4().simple());
    let mut output = listen(&exchange_of(&daemon), &out_key).await;
    let template = json!({"payload": "aGk=", "tenant_id": 5, "pipeline_steps": [out_key]});
    let path = cli.file("t.json", template.to_string().as_bytes());

    let bad = cli
        .run(&["schedule", "add", "setter", "--cron", "61 * * * *"])
        .await;
    bad.fails(2, "invalid cron expression");
    let zone = cli
        .run(&[
            "schedule",
            "add",
            "setter",
            "--cron",
            "* * * * *",
            "--timezone",
            "Mars/Base",
        ])
        .await;
    zone.fails(2, "unknown time zone");

    let add = cli
        .run(&[
            "schedule",
            "add",
            "setter",
            "--cron",
            "* * * * * *",
            "--message",
            s(&path),
        ])
        .await
        .ok();
    let schedule: i64 = add.stdout.trim().parse().expect("the id on stdout");
    let got = output.collect(Duration::from_secs(6)).await;
    assert!(got.len() >= 3, "{got:?}\n{}", daemon.log());
    let mut tracing_ids: Vec<_> = got
        .iter()
        .map(|(b, _, _)| b["tracing_id"].clone())
        .collect();
    tracing_ids.dedup();
    assert_eq!(tracing_ids.len(), got.len(), "a fresh tracing_id per fire");
    // What comes out is the worker's output (its own headers, not ours).
    for (body, _, _) in &got {
        assert_eq!(body["metadata"]["seen_by"], "setter");
        assert_eq!(body["tenant_id"], 5);
        assert_eq!(body["pipeline_steps"][0], id.to_string());
        assert_eq!(body["step_index"], 1);
    }

    let next = cli
        .run(&["schedule", "next", &schedule.to_string(), "--count", "3"])
        .await
        .ok();
    assert_eq!(next.stdout.lines().count(), 3, "{next:#?}");
    let list = cli
        .run(&["schedule", "list", "--output", "json"])
        .await
        .ok();
    let rows: Vec<Value> = serde_json::from_str(&list.stdout).expect("json");
    assert!(rows[0]["fires"].as_i64().expect("fires") >= 3, "{rows:?}");
    assert_eq!(rows[0]["last_error"], "");
    cli.run(&["schedule", "rm", &schedule.to_string()])
        .await
        .ok();
    // What was fired before the removal may still be on its way; after
    // that, nothing more comes.
    output.collect(Duration::from_millis(2500)).await;
    let quiet = output.collect(Duration::from_millis(2500)).await;
    assert!(quiet.is_empty(), "removed schedules stop firing: {quiet:?}");
}

#[sqlx::test(migrations = false)]
async fn two_daemons_publish_each_fire_time_once(pool: PgPool) {
    let (mut cli, mut first) = with_api(pool).await;
    let image = common::stand_in_image();
    cli.set("WORKERCTL_DOCKER__IMAGE", image);
    let id = cli.create("ticker", harness::ECHO_PY, &[]).await;
    first.remember(id);
    // The stand-in consumes nothing: every fire stays on our queue.
    let mut fires = listen(&exchange_of(&first), &id.to_string()).await;
    let other = format!("{}b", cli.instance);
    cli.instance = other.clone();
    cli.set("WORKERCTL_INSTANCE", &other);
    let second = Daemon::start(&mut cli, image).await;
    wait_http(&second).await;
    cli.run(&["schedule", "add", "ticker", "--cron", "* * * * * *"])
        .await
        .ok();
    let mut got = fires.at_least(4).await;
    // The second daemon can fire: a fire time after the first one's death
    // can only be the second's.
    first.child.start_kill().expect("SIGKILL");
    first.child.wait().await.expect("the first daemon is dead");
    let dead_at = chrono::Utc::now().timestamp_millis();
    let start = Instant::now();
    while !got.iter().any(|(_, f, _)| f.is_some_and(|f| f > dead_at)) {
        assert!(
            start.elapsed() < DEADLINE,
            "the second daemon never fired: {got:?}\n{}",
            second.log()
        );
        got.extend(fires.collect(Duration::from_secs(1)).await);
    }
    let mut times: Vec<i64> = got.iter().map(|(_, f, _)| f.expect("fire time")).collect();
    assert!(
        times.iter().all(|t| t % 1000 == 0),
        "on the second: {times:?}"
    );
    let all = times.len();
    times.sort_unstable();
    times.dedup();
    assert_eq!(times.len(), all, "each fire time once: {times:?}");
}

// ------------------------------------------------------------- watch mode --

#[sqlx::test(migrations = false)]
async fn dev_mode_deploys_each_save_shows_a_broken_one_at_once_and_leaves_the_worker(pool: PgPool) {
    let (cli, mut daemon) = pipeline(pool).await;
    let code = cli.file(
        "dev.py",
        b"def process(msg):\n    msg.metadata = {'v': 'one'}\n    return msg\n",
    );
    let message = cli.file("m.json", br#"{"payload": "aGk="}"#);
    let term = Terminal::start(
        &cli,
        &[
            "worker",
            "dev",
            "devw",
            "--code",
            s(&code),
            "--message",
            s(&message),
        ],
    );
    let screen = term.wait_for("\"v\": \"one\"", 1).await;
    assert!(screen.contains("created worker devw"), "{screen}");
    let id = sqlx::query_scalar::<_, uuid::Uuid>("SELECT id FROM user_workers WHERE name = 'devw'")
        .fetch_one(&cli.pool)
        .await
        .expect("created");
    daemon.remember(id);
    term.wait_for("workerctl: logs of container", 1).await;

    save(
        &code,
        b"def process(msg):\n    msg.metadata = {'v': 'two'}\n    return msg\n",
    );
    let screen = term.wait_for("\"v\": \"two\"", 1).await;
    assert!(screen.contains("revision 2 ready"), "{screen}");

    save(&code, b"def process(msg)\n    return msg\n");
    let screen = term.wait_for("SyntaxError", 1).await;
    assert!(
        screen.contains("the running revision keeps serving"),
        "{screen}"
    );
    assert_eq!(cli.row(id).await.revision, 2, "a broken save is not stored");

    save(&code, b"def process(msg):\n    raise KeyError('gone')\n");
    let screen = term.wait_for("process failed: KeyError: 'gone'", 1).await;
    assert!(screen.contains("Traceback"), "{screen}");

    term.keys("C-c");
    term.wait_for("worker devw left as it is", 1).await;
    let row = cli.row(id).await;
    assert_eq!((row.state.as_str(), row.revision), ("enabled", 3));
}

#[sqlx::test(migrations = false)]
async fn dev_mode_with_rm_deletes_the_worker_on_ctrl_c(pool: PgPool) {
    let (cli, mut daemon) = pipeline(pool).await;
    let code = cli.file("rm.py", harness::ECHO_PY.as_bytes());
    let term = Terminal::start(&cli, &["worker", "dev", "gone", "--code", s(&code), "--rm"]);
    term.wait_for("revision 1 ready", 1).await;
    let id = sqlx::query_scalar::<_, uuid::Uuid>("SELECT id FROM user_workers WHERE name = 'gone'")
        .fetch_one(&cli.pool)
        .await
        .expect("created");
    daemon.remember(id);
    term.keys("C-c");
    term.wait_for("worker gone deleted", 1).await;
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM user_workers WHERE id = $1")
        .bind(id)
        .fetch_one(&cli.pool)
        .await
        .expect("count");
    assert_eq!(left, 0);
}

// ------------------------------------------------------- the tables, alone --

#[sqlx::test(migrations = false)]
async fn a_fire_time_is_won_by_one_compare_and_set_only(pool: PgPool) {
    use workerctl::store::schedules;
    let cli = Cli::new(pool).await;
    let worker = cli.insert("cas").await;
    let new = schedules::NewSchedule {
        worker_id: worker,
        cron: "* * * * * *".into(),
        timezone: "UTC".into(),
        message: json!({}),
    };
    let id = schedules::add(&cli.pool, &new).await.expect("added");
    let at = chrono::Utc::now();
    let (a, b) = tokio::join!(
        schedules::record_fire(&cli.pool, id, at),
        schedules::record_fire(&cli.pool, id, at)
    );
    let won = [a.expect("a"), b.expect("b")];
    assert_eq!(won.iter().filter(|w| **w).count(), 1, "{won:?}");
    let earlier = at - chrono::Duration::seconds(1);
    assert!(
        !schedules::record_fire(&cli.pool, id, earlier)
            .await
            .expect("older"),
        "never backwards"
    );
    let row = schedules::get(&cli.pool, id)
        .await
        .expect("get")
        .expect("row");
    assert_eq!(row.fires, 1);
    sqlx::query("DELETE FROM user_workers WHERE id = $1")
        .bind(worker)
        .execute(&cli.pool)
        .await
        .expect("delete");
    assert!(
        schedules::get(&cli.pool, id).await.expect("get").is_none(),
        "schedules go with their worker"
    );
}

#[sqlx::test(migrations = false)]
async fn the_dead_letter_table_keeps_the_newest_and_stores_a_redelivery_once(pool: PgPool) {
    use workerctl::store::dead_letters;
    use workerctl::triggers::dead_letters::read_letter;
    let cli = Cli::new(pool).await;
    for n in 0..5 {
        let body = json!({"error": format!("E{n}"), "received_by_worker": {}}).to_string();
        let letter = read_letter(
            body.as_bytes(),
            Some(&format!("m{n}")),
            None,
            chrono::Utc::now(),
        );
        assert!(
            dead_letters::insert(&cli.pool, &letter, 3)
                .await
                .expect("insert")
        );
        if n == 4 {
            assert!(
                !dead_letters::insert(&cli.pool, &letter, 3)
                    .await
                    .expect("again"),
                "a redelivery is one row"
            );
        }
    }
    let all = dead_letters::list(&cli.pool, &dead_letters::Filter::default())
        .await
        .expect("list");
    let errors: Vec<_> = all.iter().map(|d| d.error.as_str()).collect();
    assert_eq!(errors, ["E4", "E3", "E2"]);
}
