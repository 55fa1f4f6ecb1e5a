//! `workerctl worker …` end to end: the real binary, run as a child process
//! against a fresh Postgres database per test (`#[sqlx::test]`, which reads
//! DATABASE_URL; migrations applied with `workerctl migrate`), each under its
//! own `instance`.
//!
//! The commands that follow a running worker (`--wait`, `logs`, `invoke`)
//! get a daemon: the binary's `workerctl run` as a child, on a free port,
//! with `docker.network = host`. `--wait` and `logs` use a busybox stand-in
//! worker image built here from `workerctl/busybox:latest`; `invoke` uses the
//! real `workerctl/dockerworker:latest` and RabbitMQ, on an exchange of its
//! own. Containers, queues and exchanges are removed at the end, whether the
//! test passed or not.
//!
//! Without Postgres, Docker, RabbitMQ (AMQP_URL, default the one
//! `scripts/services` provides) or the images (`scripts/build-images`) these
//! tests fail; they never skip.

mod common;
#[path = "common/harness.rs"]
mod harness;

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use sqlx::PgPool;
use tokio::io::{AsyncBufReadExt, BufReader};
use uuid::Uuid;

use common::stand_in_image;
use harness::*;

/// How long a test waits for what it expects.
const DEADLINE: Duration = Duration::from_secs(90);

const SETTER_PY: &str =
    "def process(msg):\n    msg.metadata = {'seen_by': 'setter', 'n': 42}\n    return msg\n";
const RAISER_PY: &str =
    "def process(msg):\n    raise ValueError('no good: ' + str(msg.tracing_id))\n";

// ------------------------------------------------------- create and update --

#[sqlx::test(migrations = false)]
async fn create_from_a_py_file_stores_the_sensorbucket_archive_at_revision_1(pool: PgPool) {
    let cli = Cli::new(pool).await;
    let path = cli.file("ingest.py", SETTER_PY.as_bytes());
    let out = cli
        .run(&["worker", "create", "--name", "ingest", "--code", s(&path)])
        .await
        .ok();
    let id = Uuid::parse_str(out.stdout.trim()).expect("only the id on stdout");
    assert_eq!(id.get_version_num(), 7, "ids are UUIDv7");
    assert!(out.stderr.contains("created worker ingest"), "{out:#?}");

    let row = cli.row(id).await;
    assert_eq!(
        (row.name.as_str(), row.state.as_str(), row.language.as_str()),
        ("ingest", "enabled", "python")
    );
    assert_eq!((row.revision, row.status.as_str()), (1, "unknown"));
    assert_eq!(row.entrypoint, "main.main");
    let source = row.source.expect("code stored");
    assert_eq!(
        members(&source),
        ["build.sh", "main.py", "requirements.txt", "usercode.py"]
    );
    assert_eq!(member(&source, "usercode.py"), SETTER_PY);
}

#[sqlx::test(migrations = false)]
async fn create_from_a_zip_stores_it_as_is_with_the_given_fields(pool: PgPool) {
    let cli = Cli::new(pool).await;
    let zip = zip_of(&[("usercode.py", ECHO_PY), ("helpers.py", "X = 1\n")]);
    let path = cli.file("code.zip", &zip);
    let out = cli
        .run(&[
            "worker",
            "create",
            "--name",
            "zipped",
            "--code",
            s(&path),
            "--disabled",
            "--description",
            "from a zip",
        ])
        .await
        .ok();
    let id = Uuid::parse_str(out.stdout.trim()).expect("the id");
    let row = cli.row(id).await;
    assert_eq!(row.source.as_deref(), Some(zip.as_slice()), "stored as is");
    assert_eq!((row.state.as_str(), row.revision), ("disabled", 1));
    assert_eq!(row.description, "from a zip");

    let module = zip_of(&[("handler.py", "def run(m):\n    return m\n")]);
    let path = cli.file("module.zip", &module);
    let args = [
        "worker",
        "create",
        "--name",
        "module",
        "--code",
        s(&path),
        "--entrypoint",
        "handler.run",
    ];
    let id = Uuid::parse_str(cli.run(&args).await.ok().stdout.trim()).expect("the id");
    assert_eq!(cli.row(id).await.entrypoint, "handler.run");
}

#[sqlx::test(migrations = false)]
async fn new_code_bumps_the_revision_and_identical_code_does_not(pool: PgPool) {
    let cli = Cli::new(pool).await;
    let id = cli.create("counter", ECHO_PY, &[]).await;
    let same = cli.file("same.py", ECHO_PY.as_bytes());
    let out = cli
        .run(&["worker", "update", "counter", "--code", s(&same)])
        .await
        .ok();
    assert!(out.stdout.contains("identical to revision 1"), "{out:#?}");
    assert_eq!(cli.row(id).await.revision, 1);

    let before = cli.row(id).await;
    let newer = cli.file("newer.py", SETTER_PY.as_bytes());
    let out = cli
        .run(&["worker", "update", &id.to_string(), "--code", s(&newer)])
        .await
        .ok();
    assert!(out.stdout.contains("code: revision 1 → 2"), "{out:#?}");
    let after = cli.row(id).await;
    assert_eq!(after.revision, 2);
    assert_eq!(
        member(after.source.as_deref().expect("code"), "usercode.py"),
        SETTER_PY
    );
    assert_eq!(
        after.status, "unknown",
        "the old status spoke of revision 1"
    );
    assert_ne!(before.source, after.source);

    // A zip: the same bytes are no new revision, other bytes are.
    let zip = zip_of(&[("usercode.py", RAISER_PY)]);
    let path = cli.file("c.zip", &zip);
    let update = ["worker", "update", "counter", "--code", s(&path)];
    cli.run(&update).await.ok();
    assert_eq!(cli.row(id).await.revision, 3);
    let out = cli.run(&update).await.ok();
    assert!(out.stdout.contains("identical to revision 3"), "{out:#?}");
    assert_eq!(cli.row(id).await.revision, 3);
}

#[sqlx::test(migrations = false)]
async fn update_renames_and_says_what_changed(pool: PgPool) {
    let cli = Cli::new(pool).await;
    let id = cli.create("old-name", ECHO_PY, &[]).await;
    let out = cli
        .run(&[
            "worker",
            "update",
            "old-name",
            "--name",
            "new-name",
            "--description",
            "renamed",
        ])
        .await
        .ok();
    assert!(out.stdout.contains("name: old-name → new-name"), "{out:#?}");
    assert!(out.stdout.contains("description: changed"), "{out:#?}");
    let row = cli.row(id).await;
    assert_eq!((row.name.as_str(), row.revision), ("new-name", 1));
    assert_eq!(row.description, "renamed");
    cli.run(&["worker", "show", "new-name"]).await.ok();
    cli.run(&["worker", "show", "old-name"])
        .await
        .fails(2, "no worker named \"old-name\"");
}

#[sqlx::test(migrations = false)]
async fn enable_disable_and_delete(pool: PgPool) {
    let cli = Cli::new(pool).await;
    let id = cli.create("toggled", ECHO_PY, &["--disabled"]).await;
    let out = cli.run(&["worker", "enable", "toggled"]).await.ok();
    assert!(out.stdout.contains("enabled"), "{out:#?}");
    assert_eq!(cli.row(id).await.state, "enabled");
    let out = cli.run(&["worker", "enable", "toggled"]).await.ok();
    assert!(out.stdout.contains("already enabled"), "{out:#?}");
    cli.run(&["worker", "disable", &id.to_string()]).await.ok();
    assert_eq!(cli.row(id).await.state, "disabled");
    let out = cli.run(&["worker", "delete", "toggled"]).await.ok();
    assert!(out.stdout.contains("deleted worker toggled"), "{out:#?}");
    assert!(cli.snapshot().await.is_empty());
}

// --------------------------------------------------------------- list, show --

#[sqlx::test(migrations = false)]
async fn list_prints_a_table_and_json(pool: PgPool) {
    let cli = Cli::new(pool).await;
    let a = cli.create("alpha", ECHO_PY, &[]).await;
    let b = cli.create("beta", ECHO_PY, &["--disabled"]).await;
    let out = cli.run(&["worker", "list"]).await.ok();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", out.stdout);
    for column in [
        "NAME",
        "ID",
        "STATE",
        "REVISION",
        "STATUS",
        "CONTAINER",
        "RESTARTS",
        "AGE",
    ] {
        assert!(lines[0].contains(column), "{column} in {}", lines[0]);
    }
    assert!(lines[1].starts_with("alpha") && lines[1].contains(&a.to_string()));
    assert!(lines[2].starts_with("beta") && lines[2].contains("disabled"));

    let out = cli.run(&["worker", "list", "--output", "json"]).await.ok();
    let json: Value = serde_json::from_str(&out.stdout).expect("json on stdout");
    let workers = json.as_array().expect("an array");
    assert_eq!(workers.len(), 2);
    assert_eq!(workers[1]["id"], b.to_string());
    assert_eq!(workers[1]["state"], "disabled");
    assert_eq!(workers[0]["revision"], 1);
}

#[sqlx::test(migrations = false)]
async fn show_prints_every_field_with_the_reason_of_the_status(pool: PgPool) {
    let cli = Cli::new(pool).await;
    let id = cli
        .create("shown", ECHO_PY, &["--description", "shows all"])
        .await;
    sqlx::query("UPDATE user_workers SET status = 'error', status_info = 'the code is broken: fix line 3' WHERE id = $1")
        .bind(id)
        .execute(&cli.pool)
        .await
        .expect("status");
    let out = cli.run(&["worker", "show", "shown"]).await.ok();
    for needle in [
        "name:",
        &id.to_string(),
        "shows all",
        "status:",
        "error",
        "reason:",
        "the code is broken: fix line 3",
        "entrypoint:",
        "main.main",
        "code:",
        "sha256",
        "logs:",
    ] {
        assert!(out.stdout.contains(needle), "{needle:?} in {}", out.stdout);
    }
    let out = cli
        .run(&["worker", "show", "shown", "-o", "json"])
        .await
        .ok();
    let json: Value = serde_json::from_str(&out.stdout).expect("json");
    assert_eq!(json["status_info"], "the code is broken: fix line 3");
    let out = cli.run(&["worker", "show", "shown", "--code"]).await.ok();
    assert_eq!(out.stdout, ECHO_PY);
}

// ------------------------------------------------------------- error paths --

#[sqlx::test(migrations = false)]
async fn an_unknown_name_is_one_line_and_changes_nothing(pool: PgPool) {
    let cli = Cli::new(pool).await;
    cli.create("known", ECHO_PY, &[]).await;
    let before = cli.snapshot().await;
    let code = cli.file("x.py", ECHO_PY.as_bytes());
    for args in [
        vec!["worker", "show", "ghost"],
        vec!["worker", "enable", "ghost"],
        vec!["worker", "disable", "ghost"],
        vec!["worker", "delete", "ghost"],
        vec!["worker", "update", "ghost", "--code", s(&code)],
        vec!["worker", "logs", "ghost"],
    ] {
        let out = cli.run(&args).await;
        out.fails(2, "no worker named \"ghost\" (see `workerctl worker list`)");
    }
    let unknown_id = Uuid::now_v7().to_string();
    cli.run(&["worker", "delete", &unknown_id])
        .await
        .fails(2, &format!("no worker has the id {unknown_id}"));
    assert_eq!(cli.snapshot().await, before);
}

#[sqlx::test(migrations = false)]
async fn an_ambiguous_name_lists_the_ids_and_changes_nothing(pool: PgPool) {
    let cli = Cli::new(pool).await;
    let mut ids = [cli.insert("twin").await, cli.insert("twin").await];
    ids.sort();
    let before = cli.snapshot().await;
    let expected = format!(
        "2 workers are named \"twin\": {}, {}; use the id",
        ids[0], ids[1]
    );
    for args in [
        vec!["worker", "show", "twin"],
        vec!["worker", "enable", "twin"],
        vec!["worker", "delete", "twin"],
    ] {
        cli.run(&args).await.fails(2, &expected);
    }
    assert_eq!(cli.snapshot().await, before);
    // By id, each twin is reachable.
    cli.run(&["worker", "enable", &ids[0].to_string()])
        .await
        .ok();
    assert_eq!(cli.row(ids[0]).await.state, "enabled");
    assert_eq!(cli.row(ids[1]).await.state, "disabled");
    // And the command line makes no new twins.
    let code = cli.file("t.py", ECHO_PY.as_bytes());
    cli.run(&["worker", "create", "--name", "twin", "--code", s(&code)])
        .await
        .fails(2, "a worker named \"twin\" already exists");
}

#[sqlx::test(migrations = false)]
async fn a_missing_file_is_one_line_and_writes_nothing(pool: PgPool) {
    let cli = Cli::new(pool).await;
    cli.create("present", ECHO_PY, &[]).await;
    let before = cli.snapshot().await;
    let missing = cli.dir.path().join("nowhere.py");
    cli.run(&["worker", "create", "--name", "new", "--code", s(&missing)])
        .await
        .fails(2, &format!("cannot read {}", s(&missing)));
    cli.run(&["worker", "update", "present", "--code", s(&missing)])
        .await
        .fails(2, "No such file");
    let message = cli.dir.path().join("nowhere.json");
    cli.run(&["worker", "invoke", "present", "--message", s(&message)])
        .await
        .fails(2, "cannot read");
    assert_eq!(cli.snapshot().await, before);
}

#[sqlx::test(migrations = false)]
async fn a_bad_zip_or_a_zip_without_code_is_refused(pool: PgPool) {
    let cli = Cli::new(pool).await;
    cli.create("present", ECHO_PY, &[]).await;
    let before = cli.snapshot().await;
    let garbage = cli.file("garbage.zip", b"PK\x03\x04 this is not a zip at all");
    cli.run(&["worker", "create", "--name", "g", "--code", s(&garbage)])
        .await
        .fails(2, "garbage.zip: is not a zip archive");
    cli.run(&["worker", "update", "present", "--code", s(&garbage)])
        .await
        .fails(2, "is not a zip archive");
    let text = cli.file("notes.zip", b"just some text");
    cli.run(&["worker", "create", "--name", "t", "--code", s(&text)])
        .await
        .fails(2, "is not a zip archive");
    let codeless = cli.file("codeless.zip", &zip_of(&[("README.md", "hi")]));
    cli.run(&["worker", "create", "--name", "c", "--code", s(&codeless)])
        .await
        .fails(2, "holds neither usercode.py nor main.py");
    let other = cli.file("code.txt", ECHO_PY.as_bytes());
    cli.run(&["worker", "create", "--name", "o", "--code", s(&other)])
        .await
        .fails(2, "give a .py file");
    let bad_json = cli.file("m.json", b"{not json");
    cli.run(&["worker", "invoke", "present", "--message", s(&bad_json)])
        .await
        .fails(2, "m.json: not JSON");
    assert_eq!(cli.snapshot().await, before);
}

#[sqlx::test(migrations = false)]
async fn a_database_that_does_not_answer_fails_fast_in_one_line_without_the_password(pool: PgPool) {
    let mut cli = Cli::new(pool).await;
    let code = cli.file("w.py", ECHO_PY.as_bytes());
    cli.set(
        "WORKERCTL_DATABASE_URL",
        "postgres://workerctl:hunter2-secret@127.0.0.1:9/workerctl",
    );
    for args in [
        vec!["worker", "list"],
        vec!["worker", "show", "x"],
        vec!["worker", "create", "--name", "x", "--code", s(&code)],
        vec!["worker", "enable", "x"],
    ] {
        // The command gives up with the error; the deadline only catches a hang.
        let out = tokio::time::timeout(DEADLINE, cli.run(&args))
            .await
            .expect("the command gives up instead of retrying");
        let line = out.fails(4, "cannot reach the database at 127.0.0.1:9: ");
        assert!(
            line.ends_with("— is Postgres running? (scripts/services)"),
            "{line}"
        );
        assert!(
            !line.contains("hunter2"),
            "the password is never printed: {line}"
        );
    }
    assert!(cli.snapshot().await.is_empty(), "nothing was written");
}

#[sqlx::test(migrations = false)]
async fn a_broker_that_does_not_answer_fails_invoke_in_one_line(pool: PgPool) {
    let mut cli = Cli::new(pool).await;
    cli.create("lonely", ECHO_PY, &["--disabled"]).await;
    cli.set(
        "WORKERCTL_AMQP__URL",
        "amqp://workerctl:hunter2-secret@127.0.0.1:9/%2f",
    );
    let message = cli.file("m.json", br#"{"payload": "aGk="}"#);
    let out = cli
        .run(&["worker", "invoke", "lonely", "--message", s(&message)])
        .await;
    let line = out.fails_last(4, "cannot reach RabbitMQ at 127.0.0.1:9");
    assert!(!line.contains("hunter2"), "{line}");
}

#[sqlx::test(migrations = false)]
async fn help_documents_the_exit_codes(pool: PgPool) {
    let cli = Cli::new(pool).await;
    let out = cli.run(&["worker", "invoke", "--help"]).await.ok();
    for needle in ["Exit codes:", "1  the worker failed", "3  timed out"] {
        assert!(out.stdout.contains(needle), "{needle:?} in {}", out.stdout);
    }
}

// --------------------------------------------------------- --wait and logs --

#[sqlx::test(migrations = false)]
async fn wait_follows_create_and_update_until_the_revision_is_ready(pool: PgPool) {
    let mut cli = Cli::new(pool).await;
    let daemon = Daemon::start(&mut cli, stand_in_image()).await;
    let path = cli.file("w.py", ECHO_PY.as_bytes());
    let out = cli
        .run(&[
            "worker",
            "create",
            "--name",
            "waited",
            "--code",
            s(&path),
            "--wait",
        ])
        .await;
    assert_eq!(out.code, 0, "{out:#?}\ndaemon:\n{}", daemon.log());
    let id = Uuid::parse_str(out.stdout.trim()).expect("the id");
    assert!(
        out.stderr.contains("runs revision 1 and is ready"),
        "{out:#?}"
    );
    assert!(
        out.stderr.contains("revision 1 ready"),
        "progress lines: {out:#?}"
    );

    let newer = cli.file("newer.py", SETTER_PY.as_bytes());
    let out = cli
        .run(&["worker", "update", "waited", "--code", s(&newer), "--wait"])
        .await;
    assert_eq!(out.code, 0, "{out:#?}\ndaemon:\n{}", daemon.log());
    assert!(
        out.stderr.contains("runs revision 2 and is ready"),
        "{out:#?}"
    );
    let json: Value = serde_json::from_str(
        &cli.run(&["worker", "show", "waited", "-o", "json"])
            .await
            .ok()
            .stdout,
    )
    .expect("json");
    assert_eq!(json["id"], id.to_string());
    assert_eq!(
        (json["running_revision"].clone(), json["status"].clone()),
        (2.into(), "ready".into())
    );

    cli.run(&["worker", "disable", "waited"]).await.ok();
    let out = cli.run(&["worker", "enable", "waited", "--wait"]).await;
    assert_eq!(out.code, 0, "{out:#?}\ndaemon:\n{}", daemon.log());
}

#[sqlx::test(migrations = false)]
async fn wait_fails_with_the_reason_when_the_worker_crashes(pool: PgPool) {
    let mut cli = Cli::new(pool).await;
    let daemon = Daemon::start(&mut cli, stand_in_image()).await;
    let zip = cli.file(
        "crash.zip",
        &zip_of(&[("crash.py", "def main(m):\n    return m\n")]),
    );
    let out = cli
        .run(&[
            "worker",
            "create",
            "--name",
            "crashy",
            "--code",
            s(&zip),
            "--entrypoint",
            "crash.main",
            "--wait",
        ])
        .await;
    assert_eq!(out.code, 1, "{out:#?}\ndaemon:\n{}", daemon.log());
    let line = out.fails_last(1, "worker crashy failed at revision 1: ");
    assert!(line.contains("exited with code 3: crashing"), "{line}");
}

#[sqlx::test(migrations = false)]
async fn wait_times_out_without_a_daemon(pool: PgPool) {
    let cli = Cli::new(pool).await;
    let path = cli.file("w.py", ECHO_PY.as_bytes());
    let out = cli
        .run(&[
            "worker",
            "create",
            "--name",
            "unattended",
            "--code",
            s(&path),
            "--wait",
            "--wait-timeout",
            "1s",
        ])
        .await;
    assert_eq!(out.code, 3, "{out:#?}");
    let last = out.stderr.lines().last().expect("a line");
    assert!(last.contains("was not ready within 1s"), "{last}");
    assert!(last.contains("is the daemon running"), "{last}");
}

#[sqlx::test(migrations = false)]
async fn logs_prints_the_container_output_and_follows_a_redeploy(pool: PgPool) {
    let mut cli = Cli::new(pool).await;
    let daemon = Daemon::start(&mut cli, stand_in_image()).await;
    let path = cli.file("w.py", ECHO_PY.as_bytes());
    let out = cli
        .run(&[
            "worker",
            "create",
            "--name",
            "chatty",
            "--code",
            s(&path),
            "--wait",
        ])
        .await;
    assert_eq!(out.code, 0, "{out:#?}\ndaemon:\n{}", daemon.log());

    let start = Instant::now();
    let out = loop {
        let out = cli.run(&["worker", "logs", "chatty"]).await.ok();
        if out.stdout.contains("hello from revision 1") || start.elapsed() > DEADLINE {
            break out;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        out.stdout.contains("hello from revision 1"),
        "stdout: {out:#?}"
    );
    assert!(
        out.stderr.contains("warming up"),
        "stderr to stderr: {out:#?}"
    );
    let tail = cli
        .run(&["worker", "logs", "chatty", "--tail", "1"])
        .await
        .ok();
    assert_eq!(
        tail.stdout.lines().count() + tail.stderr.lines().count(),
        1,
        "{tail:#?}"
    );
    let shown = cli.run(&["worker", "show", "chatty"]).await.ok();
    assert!(shown.stdout.contains("hello from revision 1"), "{shown:#?}");

    // --follow goes on with the next container.
    let mut follow = cli
        .command(&["worker", "logs", "chatty", "--follow"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("logs --follow");
    let mut lines = BufReader::new(follow.stdout.take().expect("stdout")).lines();
    let newer = cli.file("newer.py", SETTER_PY.as_bytes());
    cli.run(&["worker", "update", "chatty", "--code", s(&newer)])
        .await
        .ok();
    let seen = tokio::time::timeout(DEADLINE, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("hello from revision 2") {
                return true;
            }
        }
        false
    })
    .await;
    let _ = follow.start_kill();
    assert_eq!(seen, Ok(true), "daemon:\n{}", daemon.log());

    cli.run(&["worker", "disable", "chatty"]).await.ok();
    let start = Instant::now();
    loop {
        let out = cli.run(&["worker", "logs", "chatty"]).await;
        if out.code != 0 {
            out.fails(2, "worker chatty has no container under instance");
            break;
        }
        assert!(start.elapsed() < DEADLINE, "the container never went");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ------------------------------------------------------------------ invoke --

#[sqlx::test(migrations = false)]
async fn invoke_prints_the_transformed_message(pool: PgPool) {
    let (cli, mut daemon) = pipeline(pool).await;
    let id = cli.create("setter", SETTER_PY, &[]).await;
    daemon.remember(id);
    let message = cli.file("m.json", br#"{"payload": "aGVsbG8="}"#);
    let out = cli
        .run(&[
            "worker",
            "invoke",
            "setter",
            "--message",
            s(&message),
            "--timeout",
            "60s",
        ])
        .await;
    assert_eq!(out.code, 0, "{out:#?}\ndaemon:\n{}", daemon.log());
    let result: Value = serde_json::from_str(&out.stdout).expect("the result is JSON on stdout");
    assert_eq!(result["metadata"]["seen_by"], "setter");
    assert_eq!(result["metadata"]["n"], 42);
    assert_eq!(result["payload"], "aGVsbG8=");
    assert_eq!(result["step_index"], 1);
    assert_eq!(result["pipeline_steps"][0], id.to_string());
    let next = result["pipeline_steps"][1].as_str().expect("a next step");
    assert!(
        out.stderr
            .contains(&format!("came out on routing key {next}")),
        "{out:#?}"
    );
}

#[sqlx::test(migrations = false)]
async fn invoke_of_a_raising_worker_prints_the_error_body_and_fails(pool: PgPool) {
    let (cli, mut daemon) = pipeline(pool).await;
    let id = cli.create("raiser", RAISER_PY, &["--wait"]).await;
    daemon.remember(id);
    let message = cli.file(
        "m.json",
        br#"{"payload": "aGk=", "tracing_id": "trace-me"}"#,
    );
    let out = cli
        .run(&[
            "worker",
            "invoke",
            &id.to_string(),
            "--message",
            s(&message),
            "--timeout",
            "60s",
        ])
        .await;
    assert_eq!(out.code, 1, "{out:#?}\ndaemon:\n{}", daemon.log());
    let body: Value = serde_json::from_str(&out.stdout).expect("the error body on stdout");
    assert_eq!(body["worker"], id.to_string());
    assert_eq!(body["received_by_worker"]["tracing_id"], "trace-me");
    let error = body["error"].as_str().expect("error text");
    assert!(error.contains("ValueError: no good: trace-me"), "{error}");
    assert!(
        out.stderr.contains("came out on routing key errors"),
        "{out:#?}"
    );
    let last = out.stderr.lines().last().expect("a line");
    assert!(
        last.starts_with("workerctl: worker raiser failed: ValueError: no good: trace-me"),
        "{last}"
    );
}

#[sqlx::test(migrations = false)]
async fn invoke_of_a_disabled_worker_times_out_and_says_why(pool: PgPool) {
    let (cli, mut daemon) = pipeline(pool).await;
    let id = cli.create("sleeper", ECHO_PY, &["--disabled"]).await;
    daemon.remember(id);
    let message = cli.file("m.json", br#"{"payload": "aGk="}"#);
    // The answer is the timeout's error, naming the 2 s asked for; the
    // deadline only catches a command that never gives up.
    let args = [
        "worker",
        "invoke",
        "sleeper",
        "--message",
        s(&message),
        "--timeout",
        "2s",
    ];
    let out = tokio::time::timeout(DEADLINE, cli.run(&args))
        .await
        .expect("invoke gives up after its timeout");
    assert_eq!(out.code, 3, "{out:#?}");
    let last = out.stderr.lines().last().expect("a line");
    assert!(
        last.contains("no answer from worker sleeper within 2s: the worker is disabled"),
        "{last}"
    );
    assert!(last.contains("workerctl worker enable sleeper"), "{last}");
    assert!(out.stdout.is_empty(), "{out:#?}");
}
