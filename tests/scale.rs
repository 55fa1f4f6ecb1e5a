//! Scale settings: the `workerctl_worker_scale` table (migrations/0020) on a
//! fresh database per test, through `workerctl::store::scale` and through
//! the real binary's `workerctl worker scale`. What a dashboard does to
//! `user_workers` (code saves, deletes) keeps working with settings beside it.
//! `workerctl plan` scales on the queue depths of the real broker.
//!
//! Needs `DATABASE_URL` (scripts/test exports it), and for `plan` RabbitMQ
//! (`AMQP_URL`, its management API at 127.0.0.1:15672 or
//! `RABBITMQ_MANAGEMENT_URL`) and Docker; without them every test that uses
//! them fails, none is skipped.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};

use sqlx::PgPool;
use uuid::Uuid;
use workerctl::model::ScaleBounds;
use workerctl::model::WorkerId;
use workerctl::store::postgres::PgStore;
use workerctl::store::scale;

const BIN: &str = env!("CARGO_BIN_EXE_workerctl");

async fn migrated(pool: &PgPool) {
    PgStore::from_pool(pool.clone())
        .migrate()
        .await
        .expect("migrations apply");
}

async fn insert_worker(pool: &PgPool, name: &str) -> WorkerId {
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO user_workers (id, name, state, language, revision, status, source)
         VALUES ($1, $2, 'enabled', 'python', 1, 'unknown', 'PK\\003\\004')",
    )
    .bind(id)
    .bind(name)
    .execute(pool)
    .await
    .expect("a worker row inserts");
    WorkerId(id)
}

fn bounds(min: u32, max: u32, per: u32) -> ScaleBounds {
    ScaleBounds::new(min, max, per).expect("valid bounds")
}

/// Runs `workerctl worker scale …` on the test's database.
fn cli(pool: &PgPool, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(["worker", "scale"])
        .args(args)
        .env("WORKERCTL_DATABASE_URL", common::database_url(pool))
        .env_remove("WORKERCTL_CONFIG")
        .output()
        .expect("the binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[sqlx::test]
async fn a_worker_never_scaled_runs_one_replica(pool: PgPool) {
    migrated(&pool).await;
    let id = insert_worker(&pool, "w").await;
    assert!(scale::load_all(&pool).await.expect("loads").is_empty());
    assert_eq!(
        scale::load(&pool, id).await.expect("loads"),
        ScaleBounds::default()
    );
}

#[sqlx::test]
async fn settings_are_set_and_read_back_for_all_workers_at_once(pool: PgPool) {
    migrated(&pool).await;
    let (a, b) = (
        insert_worker(&pool, "a").await,
        insert_worker(&pool, "b").await,
    );
    assert!(scale::set(&pool, a, bounds(0, 4, 20)).await.expect("sets"));
    assert!(scale::set(&pool, b, bounds(2, 2, 5)).await.expect("sets"));
    assert!(
        scale::set(&pool, a, bounds(1, 8, 50))
            .await
            .expect("sets again")
    );
    let all = scale::load_all(&pool).await.expect("loads");
    assert_eq!(all.len(), 2);
    assert_eq!(all[&a], bounds(1, 8, 50));
    assert_eq!(all[&b], bounds(2, 2, 5));
}

#[sqlx::test]
async fn settings_of_an_unknown_worker_are_not_stored(pool: PgPool) {
    migrated(&pool).await;
    let ghost = WorkerId(Uuid::now_v7());
    assert!(
        !scale::set(&pool, ghost, bounds(1, 2, 20))
            .await
            .expect("runs")
    );
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM workerctl_worker_scale")
        .fetch_one(&pool)
        .await
        .expect("counts");
    assert_eq!(rows, 0);
}

#[sqlx::test]
async fn settings_go_with_a_row_deleted_or_truncated_by_hand(pool: PgPool) {
    migrated(&pool).await;
    let (a, b) = (
        insert_worker(&pool, "a").await,
        insert_worker(&pool, "b").await,
    );
    for id in [a, b] {
        scale::set(&pool, id, bounds(1, 3, 20)).await.expect("sets");
    }
    sqlx::query("DELETE FROM user_workers WHERE id = $1")
        .bind(a.0)
        .execute(&pool)
        .await
        .expect("the dashboard's table takes a hand delete");
    let count = async || -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM workerctl_worker_scale")
            .fetch_one(&pool)
            .await
            .expect("counts")
    };
    assert_eq!(count().await, 1);
    sqlx::query("TRUNCATE user_workers")
        .execute(&pool)
        .await
        .expect("no constraint stands in the way of a truncate");
    assert_eq!(count().await, 0);
}

#[sqlx::test]
async fn a_code_save_by_the_dashboard_is_unaffected_by_settings(pool: PgPool) {
    migrated(&pool).await;
    let id = insert_worker(&pool, "w").await;
    scale::set(&pool, id, bounds(0, 4, 20)).await.expect("sets");
    let revision: i32 = sqlx::query_scalar(
        "UPDATE user_workers SET source = 'PK\\003\\004 v2', revision = revision + 1
          WHERE id = $1 RETURNING revision",
    )
    .bind(id.0)
    .fetch_one(&pool)
    .await
    .expect("the dashboard's update runs");
    assert_eq!(revision, 2);
    assert_eq!(
        scale::load(&pool, id).await.expect("loads"),
        bounds(0, 4, 20)
    );
}

#[sqlx::test]
async fn the_database_refuses_a_min_above_max_written_by_hand(pool: PgPool) {
    migrated(&pool).await;
    let id = insert_worker(&pool, "w").await;
    let err = sqlx::query(
        "INSERT INTO workerctl_worker_scale (worker_id, min_replicas, max_replicas) VALUES ($1, 3, 2)",
    )
    .bind(id.0)
    .execute(&pool)
    .await
    .expect_err("the check constraint refuses it");
    let code = err.as_database_error().and_then(|e| e.code());
    assert_eq!(code.as_deref(), Some("23514"), "{err}");
}

#[sqlx::test]
async fn the_scale_command_sets_by_name_and_keeps_what_it_is_not_given(pool: PgPool) {
    migrated(&pool).await;
    let id = insert_worker(&pool, "busy").await;
    let (code, stdout, stderr) = cli(&pool, &["busy", "--min", "0", "--max", "4"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        stdout.trim(),
        "worker busy: 0 to 4 replicas, one per 20 ready messages (was 1 replica(s))"
    );
    let (code, _, stderr) = cli(&pool, &[&id.to_string(), "--per-replica", "50"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        scale::load(&pool, id).await.expect("loads"),
        bounds(0, 4, 50)
    );
}

#[sqlx::test]
async fn the_scale_command_refuses_bad_values_on_one_line_and_writes_nothing(pool: PgPool) {
    migrated(&pool).await;
    let id = insert_worker(&pool, "w").await;
    for (args, needle) in [
        (
            vec!["w", "--min", "5", "--max", "4"],
            "--min 5 is more than --max 4",
        ),
        (vec!["w", "--max", "1000"], "more than 64"),
        (vec!["w", "--max", "0"], "disable the worker"),
        (
            vec!["w", "--per-replica", "0"],
            "--per-replica must be at least 1",
        ),
        (vec!["w"], "nothing to set"),
        (vec!["nobody", "--max", "2"], "no worker named \"nobody\""),
    ] {
        let (code, stdout, stderr) = cli(&pool, &args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stdout.is_empty(), "{args:?}: {stdout}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    assert!(scale::load_all(&pool).await.expect("loads").is_empty());
    assert_eq!(
        scale::load(&pool, id).await.expect("loads"),
        ScaleBounds::default()
    );
}

/// `workerctl plan` reads the queue depths once, as the daemon's poller
/// does, so a worker at zero replicas with messages waiting is planned back
/// up: 45 messages at 20 per replica want 3.
#[sqlx::test]
async fn plan_scales_a_worker_at_zero_on_the_messages_in_its_queue(pool: PgPool) {
    migrated(&pool).await;
    let id = insert_worker(&pool, "from-zero").await;
    scale::set(&pool, id, bounds(0, 4, 20)).await.expect("sets");
    let conn = Connection::connect(&common::amqp_url(), ConnectionProperties::default())
        .await
        .expect("RabbitMQ answers at AMQP_URL (scripts/services starts it)");
    let channel = conn.create_channel().await.expect("a channel opens");
    let queue = format!("worker_{id}");
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let declared = channel.queue_declare(queue.as_str().into(), durable, args);
    declared.await.expect("the queue is declared");
    for _ in 0..45 {
        let options = BasicPublishOptions::default();
        let publish = channel.basic_publish(
            "".into(),
            queue.as_str().into(),
            options,
            b"{}",
            BasicProperties::default(),
        );
        publish
            .await
            .expect("publishes")
            .await
            .expect("the broker takes it");
    }
    let management = std::env::var("RABBITMQ_MANAGEMENT_URL")
        .unwrap_or_else(|_| "http://127.0.0.1:15672".into());
    let instance = format!("plan{}", &Uuid::new_v4().simple().to_string()[..10]);
    let want = format!("worker {id}: 3 wanted, 0 running (45 message(s) ready)");
    let started = Instant::now();
    // The queue counts its messages at its next tick: until then the plan
    // holds the worker at zero.
    let printed = loop {
        let out = Command::new(BIN)
            .arg("plan")
            .env_remove("WORKERCTL_CONFIG")
            .env("WORKERCTL_DATABASE_URL", common::database_url(&pool))
            .env("WORKERCTL_INSTANCE", &instance)
            .env("WORKERCTL_AMQP__URL", common::amqp_url())
            .env("WORKERCTL_SCALE__MANAGEMENT_URL", &management)
            .output()
            .expect("the binary runs");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        if stdout.contains(&want) || started.elapsed() > Duration::from_secs(60) {
            break stdout;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let _ = channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = conn.close(200, "done".into()).await;
    assert!(printed.contains(&want), "{want:?} not in:\n{printed}");
}
