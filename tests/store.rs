//! Integration tests of the Postgres worker store against a real Postgres:
//! migrations (empty and legacy databases), the row mapping, conditional
//! status writes, observed-state upserts, code loading and the LISTEN wake-up.
//!
//! Each `#[sqlx::test]` gets a fresh database created through the server named
//! by `DATABASE_URL`, which the test harness exports (scripts/services starts
//! Postgres and prints the value). Without it, or without a reachable server,
//! every test here fails: none is skipped.

mod common;

use std::sync::Arc;
use std::time::Duration;
use workerctl::model::Observed;

use sha2::{Digest, Sha256};
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use workerctl::model::{Revision, Status, WorkerId, WorkerRow};
use workerctl::store::postgres::{CHANNEL, PgStore, listen};
use workerctl::store::{StatusUpdate, StoreError, WorkerStore};

/// Long enough for a wake-up that must come, even on a loaded machine.
const MUST_ARRIVE: Duration = Duration::from_secs(10);
/// Only catches a hang: a call that takes longer has failed.
const MUST_HAPPEN: Duration = Duration::from_secs(120);

/// Starts with the zip local-file-header signature, as the dashboard's archives do.
const ZIP: &[u8] = b"PK\x03\x04 rest of an archive";

// ---------------------------------------------------------------- helpers

async fn migrated(pool: &PgPool) -> PgStore {
    let store = PgStore::from_pool(pool.clone());
    store.migrate().await.expect("migrations apply");
    store
}

/// SensorBucket's table as its own migrations leave it: no defaults on most
/// columns, everything NOT NULL, tenant_id renamed from organisation; plus
/// golang-migrate's bookkeeping table, which must be left alone.
async fn create_sensorbucket_table(pool: &PgPool) {
    exec(
        pool,
        "CREATE TABLE user_workers (
            id UUID PRIMARY KEY NOT NULL,
            name VARCHAR NOT NULL,
            description VARCHAR NOT NULL DEFAULT(''),
            state VARCHAR NOT NULL DEFAULT('disabled'),
            language VARCHAR NOT NULL,
            organisation BIGINT NOT NULL,
            revision INT NOT NULL,
            status VARCHAR NOT NULL,
            status_info TEXT NOT NULL DEFAULT(''),
            source BYTEA NOT NULL,
            entrypoint VARCHAR NOT NULL)",
    )
    .await;
    exec(
        pool,
        "ALTER TABLE user_workers RENAME COLUMN organisation TO tenant_id",
    )
    .await;
    exec(
        pool,
        "CREATE TABLE schema_migrations (version BIGINT PRIMARY KEY, dirty BOOLEAN NOT NULL)",
    )
    .await;
    exec(
        pool,
        "INSERT INTO schema_migrations VALUES (20240609194905, false)",
    )
    .await;
}

async fn insert_sensorbucket_row(pool: &PgPool, id: Uuid, state: &str, revision: i32) {
    sqlx::query(
        "INSERT INTO user_workers (id, name, description, state, language, tenant_id,
                                   revision, status, status_info, source, entrypoint)
         VALUES ($1, 'legacy', 'kept', $2, 'python', 7, $3, 'unknown', '', $4, 'main.main')",
    )
    .bind(id)
    .bind(state)
    .bind(revision)
    .bind(ZIP)
    .execute(pool)
    .await
    .expect("legacy row inserts");
}

async fn insert_worker(pool: &PgPool, state: &str, revision: i32, source: Option<&[u8]>) -> Uuid {
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO user_workers (id, name, state, revision, source) VALUES ($1, 'w', $2, $3, $4)",
    )
    .bind(id)
    .bind(state)
    .bind(revision)
    .bind(source)
    .execute(pool)
    .await
    .expect("worker row inserts");
    id
}

async fn exec(pool: &PgPool, sql: &str) {
    sqlx::query(sql)
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

async fn scalar<T>(pool: &PgPool, sql: &str) -> T
where
    T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
{
    sqlx::query_scalar(sql)
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

async fn columns(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT column_name::text FROM information_schema.columns
          WHERE table_schema = current_schema() AND table_name = 'user_workers'
          ORDER BY column_name",
    )
    .fetch_all(pool)
    .await
    .expect("columns list")
}

async fn row_of(store: &PgStore, id: Uuid) -> WorkerRow {
    let rows = store.load_workers().await.expect("workers load");
    rows.into_iter()
        .find(|r| r.id == WorkerId(id))
        .expect("row is loaded")
}

async fn status_of(pool: &PgPool, id: Uuid) -> (String, String) {
    sqlx::query_as("SELECT status::text, status_info FROM user_workers WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .expect("status reads")
}

fn status(id: Uuid, revision: i32, status: Status, info: &str) -> StatusUpdate {
    StatusUpdate {
        id: WorkerId(id),
        revision: Revision(revision),
        status,
        info: info.into(),
    }
}

fn observed(id: Uuid, state: &str) -> Observed {
    Observed {
        id: WorkerId(id),
        running_revision: Some(Revision(3)),
        container: Some("c0ffee".into()),
        container_state: state.into(),
        restarts: 2,
        last_exit_code: Some(137),
        desired_replicas: 1,
        running_replicas: 1,
    }
}

/// The store's listener running as a task, with the handles a test needs.
struct Listening {
    wake: Arc<Notify>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Listening {
    /// Starts the listener and waits for its first wake-up, which it sends
    /// once it is subscribed.
    async fn start(pool: &PgPool) -> Self {
        let wake = Arc::new(Notify::new());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(listen(
            common::database_url(pool),
            wake.clone(),
            shutdown.clone(),
        ));
        let this = Listening {
            wake,
            shutdown,
            task,
        };
        assert!(
            this.woken_within(MUST_ARRIVE).await,
            "the listener wakes once connected"
        );
        this
    }

    async fn woken_within(&self, limit: Duration) -> bool {
        tokio::time::timeout(limit, self.wake.notified())
            .await
            .is_ok()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(MUST_ARRIVE, self.task)
            .await
            .expect("the listener exits on shutdown")
            .expect("the listener task does not panic");
    }
}

async fn subscribed(pool: &PgPool) -> PgListener {
    let mut listener = PgListener::connect_with(pool)
        .await
        .expect("listener connects");
    listener.listen(CHANNEL).await.expect("LISTEN succeeds");
    listener
}

/// The notifications received before a fence: a NOTIFY of a payload of its
/// own, sent now. Postgres delivers notifications in commit order, so
/// whatever an earlier commit sent arrives before the fence, however slowly.
async fn notifications(pool: &PgPool, listener: &mut PgListener) -> usize {
    let fence = Uuid::new_v4().to_string();
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANNEL)
        .bind(&fence)
        .execute(pool)
        .await
        .expect("the fence is sent");
    let mut count = 0;
    loop {
        let received = tokio::time::timeout(MUST_ARRIVE, listener.recv())
            .await
            .expect("the fence arrives")
            .expect("notification is received");
        if received.payload() == fence {
            return count;
        }
        count += 1;
    }
}

// ---------------------------------------------------------------- migrations

#[sqlx::test(migrations = false)]
async fn migrations_create_the_worker_table_on_an_empty_database(pool: PgPool) {
    migrated(&pool).await;
    let expected = [
        "description",
        "entrypoint",
        "id",
        "language",
        "name",
        "revision",
        "source",
        "state",
        "status",
        "status_info",
        "tenant_id",
    ];
    assert_eq!(columns(&pool).await, expected);

    let id = Uuid::now_v7();
    sqlx::query("INSERT INTO user_workers (id, name) VALUES ($1, 'defaults')")
        .bind(id)
        .execute(&pool)
        .await
        .expect("a row with only id and name inserts");
    let defaults: (String, String, String, i32, String, String, String) = sqlx::query_as(
        "SELECT description, state, language, revision, status, status_info, entrypoint
           FROM user_workers WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .expect("row reads");
    assert_eq!(
        defaults,
        (
            "".into(),
            "disabled".into(),
            "python".into(),
            1,
            "unknown".into(),
            "".into(),
            "main.main".into()
        )
    );
    let observed: i64 = scalar(&pool, "SELECT count(*) FROM workerctl_observed").await;
    assert_eq!(observed, 0);
}

#[sqlx::test(migrations = false)]
async fn migrations_keep_every_row_of_an_existing_sensorbucket_table(pool: PgPool) {
    create_sensorbucket_table(&pool).await;
    let (enabled, disabled) = (Uuid::now_v7(), Uuid::now_v7());
    insert_sensorbucket_row(&pool, enabled, "enabled", 4).await;
    insert_sensorbucket_row(&pool, disabled, "disabled", 1).await;
    let columns_before = columns(&pool).await;

    let store = migrated(&pool).await;

    assert_eq!(
        columns(&pool).await,
        columns_before,
        "no column added, renamed or dropped"
    );
    assert_eq!(
        scalar::<i64>(&pool, "SELECT count(*) FROM user_workers").await,
        2
    );
    assert_eq!(
        scalar::<i64>(&pool, "SELECT sum(tenant_id)::int8 FROM user_workers").await,
        14
    );
    assert_eq!(
        scalar::<i64>(&pool, "SELECT count(*) FROM schema_migrations").await,
        1
    );
    let row = row_of(&store, enabled).await;
    assert_eq!((row.state.as_str(), row.revision), ("enabled", Revision(4)));
    assert!(row.source_is_zip);
    assert_eq!(row_of(&store, disabled).await.state, "disabled");
}

#[sqlx::test(migrations = false)]
async fn migrations_add_only_missing_columns_to_a_table_still_calling_tenant_id_organisation(
    pool: PgPool,
) {
    exec(
        &pool,
        "CREATE TABLE user_workers (id UUID PRIMARY KEY, name VARCHAR NOT NULL,
            state VARCHAR NOT NULL, language VARCHAR NOT NULL, organisation BIGINT NOT NULL,
            revision INT NOT NULL, status VARCHAR NOT NULL, source BYTEA NOT NULL,
            entrypoint VARCHAR NOT NULL)",
    )
    .await;
    exec(
        &pool,
        "INSERT INTO user_workers VALUES
            ('00000000-0000-0000-0000-000000000001', 'old', 'enabled', 'python', 3, 2,
             'unknown', '\\x504b0304', 'main.main')",
    )
    .await;

    let store = migrated(&pool).await;

    let cols = columns(&pool).await;
    assert!(cols.contains(&"organisation".to_string()), "{cols:?}");
    assert!(
        cols.contains(&"status_info".to_string()),
        "the missing column is added: {cols:?}"
    );
    assert!(
        !cols.contains(&"tenant_id".to_string()),
        "no second owner column: {cols:?}"
    );
    let row = row_of(&store, Uuid::from_u128(1)).await;
    assert_eq!((row.name.as_str(), row.status_info.as_str()), ("old", ""));
}

#[sqlx::test(migrations = false)]
async fn migrating_twice_is_a_no_op(pool: PgPool) {
    let store = migrated(&pool).await;
    let id = insert_worker(&pool, "enabled", 5, Some(ZIP)).await;
    let applied: i64 = scalar(&pool, "SELECT count(*) FROM _sqlx_migrations").await;

    store.migrate().await.expect("a second run succeeds");
    assert_eq!(
        scalar::<i64>(&pool, "SELECT count(*) FROM _sqlx_migrations").await,
        applied
    );

    // Even with sqlx's bookkeeping gone, every file re-runs without harm.
    exec(&pool, "DROP TABLE _sqlx_migrations").await;
    store
        .migrate()
        .await
        .expect("re-running every migration succeeds");
    assert_eq!(row_of(&store, id).await.revision, Revision(5));
    let triggers: Vec<(String,)> = sqlx::query_as(
        "SELECT tgname::text FROM pg_trigger WHERE tgrelid = 'user_workers'::regclass AND NOT tgisinternal ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .expect("list triggers");
    let names: Vec<&str> = triggers.iter().map(|(n,)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "workerctl_forget_debug",
            "workerctl_forget_debug_all",
            "workerctl_forget_observed",
            "workerctl_forget_recorded",
            "workerctl_forget_scale",
            "workerctl_forget_scale_all",
            "workerctl_forget_schedules",
            "workerctl_forget_schedules_all",
            "workerctl_notify",
        ],
        "each trigger once"
    );
}

// ---------------------------------------------------------------- load_workers

#[sqlx::test(migrations = false)]
async fn load_workers_reports_digest_zipness_and_size_without_fetching_code(pool: PgPool) {
    let store = migrated(&pool).await;
    let zip = insert_worker(&pool, "enabled", 1, Some(ZIP)).await;
    let text = insert_worker(&pool, "enabled", 1, Some(b"def process(m): return m")).await;
    let empty = insert_worker(&pool, "enabled", 1, Some(b"")).await;
    let none = insert_worker(&pool, "enabled", 1, None).await;

    let row = row_of(&store, zip).await;
    assert_eq!(row.source_len, Some(ZIP.len() as i64));
    assert!(row.source_is_zip);
    assert_eq!(row.source_sha256, Some(hex::encode(Sha256::digest(ZIP))));

    assert!(!row_of(&store, text).await.source_is_zip);
    let row = row_of(&store, empty).await;
    assert_eq!((row.source_len, row.source_is_zip), (Some(0), false));
    assert_eq!(row.source_sha256, Some(hex::encode(Sha256::digest(b""))));
    let row = row_of(&store, none).await;
    assert_eq!(
        (row.source_len, row.source_is_zip, row.source_sha256),
        (None, false, None)
    );
}

#[sqlx::test(migrations = false)]
async fn load_workers_loads_rows_with_nulls_and_garbage(pool: PgPool) {
    // A hand-made table where every column may be NULL; migrations keep it.
    exec(
        &pool,
        "CREATE TABLE user_workers (id UUID PRIMARY KEY, name VARCHAR, state VARCHAR,
            language VARCHAR, revision INT, status VARCHAR, status_info TEXT, source BYTEA,
            entrypoint VARCHAR)",
    )
    .await;
    let store = migrated(&pool).await;
    exec(
        &pool,
        "INSERT INTO user_workers (id) VALUES ('00000000-0000-0000-0000-000000000001')",
    )
    .await;
    exec(
        &pool,
        "INSERT INTO user_workers VALUES ('00000000-0000-0000-0000-000000000002', '', 'paused',
            'go', -2147483648, 'weird', NULL, '\\x00', '')",
    )
    .await;

    let nulls = row_of(&store, Uuid::from_u128(1)).await;
    assert_eq!(
        (
            nulls.name.as_str(),
            nulls.state.as_str(),
            nulls.language.as_str()
        ),
        ("", "", "")
    );
    assert_eq!(
        (nulls.revision, nulls.status.as_str()),
        (Revision(0), "unknown")
    );
    assert_eq!((nulls.entrypoint.as_str(), nulls.source_len), ("", None));
    let garbage = row_of(&store, Uuid::from_u128(2)).await;
    assert_eq!(
        (garbage.state.as_str(), garbage.revision),
        ("paused", Revision(i32::MIN))
    );
    assert_eq!(
        (garbage.status.as_str(), garbage.source_len),
        ("weird", Some(1))
    );
}

// ---------------------------------------------------------------- statuses

#[sqlx::test(migrations = false)]
async fn a_status_write_for_an_older_revision_is_ignored(pool: PgPool) {
    let store = migrated(&pool).await;
    let id = insert_worker(&pool, "enabled", 2, Some(ZIP)).await;

    let stale = store
        .write_statuses(&[status(id, 1, Status::Error, "old code crashed")])
        .await;
    assert_eq!(stale.expect("stale write succeeds"), 0);
    assert_eq!(
        status_of(&pool, id).await,
        ("unknown".into(), String::new())
    );

    let current = store
        .write_statuses(&[status(id, 2, Status::Ready, "running")])
        .await;
    assert_eq!(current.expect("current write succeeds"), 1);
    assert_eq!(
        status_of(&pool, id).await,
        ("ready".into(), "running".into())
    );
}

#[sqlx::test(migrations = false)]
async fn an_identical_status_write_changes_nothing(pool: PgPool) {
    let store = migrated(&pool).await;
    let id = insert_worker(&pool, "enabled", 1, Some(ZIP)).await;
    let update = [status(id, 1, Status::Error, "exit code 3")];

    assert_eq!(store.write_statuses(&update).await.expect("first write"), 1);
    let xmin: String = scalar(&pool, "SELECT xmin::text FROM user_workers").await;
    assert_eq!(
        store.write_statuses(&update).await.expect("second write"),
        0
    );
    assert_eq!(
        scalar::<String>(&pool, "SELECT xmin::text FROM user_workers").await,
        xmin
    );
}

#[sqlx::test(migrations = false)]
async fn a_status_batch_is_one_statement_and_an_empty_one_is_none(pool: PgPool) {
    let store = migrated(&pool).await;
    let mut updates = Vec::new();
    for _ in 0..50 {
        let id = insert_worker(&pool, "enabled", 1, Some(ZIP)).await;
        updates.push(status(id, 1, Status::Ready, ""));
    }
    let before = store.statements();
    assert_eq!(
        store.write_statuses(&updates).await.expect("batch writes"),
        50
    );
    assert_eq!(store.write_statuses(&[]).await.expect("empty batch"), 0);
    assert_eq!(store.statements() - before, 1);
}

// ---------------------------------------------------------------- observed

#[sqlx::test(migrations = false)]
async fn observed_state_is_upserted_and_an_unchanged_observation_is_not_rewritten(pool: PgPool) {
    let store = migrated(&pool).await;
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    store
        .write_observed(&[observed(a, "running"), observed(b, "absent")])
        .await
        .expect("insert");
    let stamp = "SELECT updated_at::text FROM workerctl_observed ORDER BY worker_id LIMIT 1";
    let first: String = scalar(&pool, stamp).await;

    store
        .write_observed(&[observed(a, "running")])
        .await
        .expect("same again");
    assert_eq!(scalar::<String>(&pool, stamp).await, first);

    let mut changed = observed(a, "exited (3)");
    changed.running_revision = None;
    changed.last_exit_code = None;
    // The last observation of a worker in a batch wins.
    store
        .write_observed(&[observed(a, "stale"), changed])
        .await
        .expect("update");
    let row: (Option<i32>, String, Option<i64>) = sqlx::query_as(
        "SELECT running_revision, container_state, last_exit_code FROM workerctl_observed
          WHERE worker_id = $1",
    )
    .bind(a)
    .fetch_one(&pool)
    .await
    .expect("observed row reads");
    assert_eq!(row, (None, "exited (3)".into(), None));
    assert_eq!(
        scalar::<i64>(&pool, "SELECT count(*) FROM workerctl_observed").await,
        2
    );
}

#[sqlx::test(migrations = false)]
async fn deleting_a_worker_row_forgets_its_observed_state(pool: PgPool) {
    let store = migrated(&pool).await;
    let (gone, kept) = (
        insert_worker(&pool, "enabled", 1, Some(ZIP)).await,
        insert_worker(&pool, "enabled", 1, Some(ZIP)).await,
    );
    store
        .write_observed(&[observed(gone, "running"), observed(kept, "running")])
        .await
        .expect("insert");
    exec(
        &pool,
        &format!("DELETE FROM user_workers WHERE id = '{gone}'"),
    )
    .await;
    let left: Vec<(Uuid,)> = sqlx::query_as("SELECT worker_id FROM workerctl_observed")
        .fetch_all(&pool)
        .await
        .expect("observed rows");
    assert_eq!(left, [(kept,)]);
}

#[sqlx::test(migrations = false)]
async fn an_idle_pass_issues_the_same_statements_whatever_the_worker_count(pool: PgPool) {
    let store = migrated(&pool).await;
    let mut per_pass = Vec::new();
    for count in [1, 40] {
        exec(&pool, "DELETE FROM user_workers").await;
        let mut ids = Vec::new();
        for _ in 0..count {
            ids.push(insert_worker(&pool, "enabled", 1, Some(ZIP)).await);
        }
        let statuses: Vec<_> = ids
            .iter()
            .map(|&id| status(id, 1, Status::Ready, ""))
            .collect();
        let seen: Vec<_> = ids.iter().map(|&id| observed(id, "running")).collect();
        let before = store.statements();
        store.load_workers().await.expect("load");
        store.write_statuses(&statuses).await.expect("statuses");
        store.write_observed(&seen).await.expect("observed");
        per_pass.push(store.statements() - before);
    }
    assert_eq!(per_pass, [3, 3]);
}

// ---------------------------------------------------------------- load_code

#[sqlx::test(migrations = false)]
async fn load_code_serves_only_enabled_python_workers_with_code(pool: PgPool) {
    let store = migrated(&pool).await;
    let enabled = insert_worker(&pool, "enabled", 3, Some(ZIP)).await;
    let disabled = insert_worker(&pool, "disabled", 1, Some(ZIP)).await;
    let odd_state = insert_worker(&pool, "Enabled", 1, Some(ZIP)).await;
    let no_code = insert_worker(&pool, "enabled", 1, None).await;
    let go = insert_worker(&pool, "enabled", 1, Some(ZIP)).await;
    exec(
        &pool,
        &format!("UPDATE user_workers SET language = 'go' WHERE id = '{go}'"),
    )
    .await;

    let token = row_of(&store, enabled).await.code_token;
    let code = store
        .load_code(WorkerId(enabled), &token)
        .await
        .expect("load")
        .expect("enabled has code");
    assert_eq!((code.revision, code.source.as_slice()), (Revision(3), ZIP));
    for id in [disabled, odd_state, no_code, go, Uuid::now_v7()] {
        let token = match id {
            id if id == no_code || id == go || id == disabled || id == odd_state => {
                row_of(&store, id).await.code_token
            }
            _ => token.clone(),
        };
        assert_eq!(
            store.load_code(WorkerId(id), &token).await.expect("load"),
            None,
            "{id}"
        );
    }
}

#[sqlx::test(migrations = false)]
async fn code_is_served_only_for_the_workers_own_token(pool: PgPool) {
    let store = migrated(&pool).await;
    let a = insert_worker(&pool, "enabled", 1, Some(ZIP)).await;
    let b = insert_worker(&pool, "enabled", 1, Some(ZIP)).await;
    let (token_a, token_b) = (
        row_of(&store, a).await.code_token,
        row_of(&store, b).await.code_token,
    );
    assert_eq!(token_a.len(), 32);
    assert_ne!(token_a, token_b, "each worker has its own token");
    for wrong in ["", "0123456789abcdef0123456789abcdef", token_b.as_str()] {
        assert_eq!(
            store.load_code(WorkerId(a), wrong).await.expect("load"),
            None,
            "{wrong:?}"
        );
    }
    assert!(
        store
            .load_code(WorkerId(a), &token_a)
            .await
            .expect("load")
            .is_some()
    );
    // The key is made once: migrating again keeps every token.
    store.migrate().await.expect("migrate again");
    assert_eq!(row_of(&store, a).await.code_token, token_a);
}

#[tokio::test]
async fn an_unreachable_database_fails_fast_and_says_so() {
    let store = PgStore::connect("postgres://workerctl:workerctl@127.0.0.1:1/workerctl")
        .expect("a well-formed URL is accepted");
    // It comes back with the error rather than retrying: the deadline only
    // catches a hang.
    let err = tokio::time::timeout(MUST_HAPPEN, store.load_workers())
        .await
        .expect("load_workers returns instead of retrying")
        .expect_err("nothing listens on port 1");
    assert!(matches!(err, StoreError::LoadWorkers(_)), "{err:?}");
    assert!(PgStore::connect("not a url").is_err());
}

// ---------------------------------------------------------------- notifications

#[sqlx::test(migrations = false)]
async fn a_committed_revision_update_wakes_the_listener_and_a_status_write_does_not(pool: PgPool) {
    let store = migrated(&pool).await;
    let id = insert_worker(&pool, "enabled", 1, Some(ZIP)).await;
    let mut listener = subscribed(&pool).await;

    store
        .write_statuses(&[status(id, 1, Status::Ready, "")])
        .await
        .expect("status write");
    assert_eq!(
        notifications(&pool, &mut listener).await,
        0,
        "a status write must not notify"
    );

    let mut tx = pool.begin().await.expect("begin");
    sqlx::query("UPDATE user_workers SET revision = revision + 1, source = $1")
        .bind(ZIP)
        .execute(&mut *tx)
        .await
        .expect("code save");
    assert_eq!(
        notifications(&pool, &mut listener).await,
        0,
        "nothing before the commit"
    );
    // The daemon's wake-up source, subscribed now: only the commit can wake it.
    let listening = Listening::start(&pool).await;
    tx.commit().await.expect("commit");
    assert!(
        listening.woken_within(MUST_ARRIVE).await,
        "a committed code save wakes"
    );
    assert_eq!(notifications(&pool, &mut listener).await, 1, "the commit");
    listening.stop().await;
}

#[sqlx::test(migrations = false)]
async fn enabling_100_workers_in_one_transaction_gives_one_notification(pool: PgPool) {
    migrated(&pool).await;
    exec(
        &pool,
        "INSERT INTO user_workers (id, name) SELECT gen_random_uuid(), 'w' FROM generate_series(1, 100)",
    )
    .await;
    let mut listener = subscribed(&pool).await;

    let mut tx = pool.begin().await.expect("begin");
    sqlx::query("UPDATE user_workers SET state = 'enabled'")
        .execute(&mut *tx)
        .await
        .expect("enable all");
    tx.commit().await.expect("commit");

    assert_eq!(notifications(&pool, &mut listener).await, 1);
    // Postgres folds identical notifications of a transaction anyway; the
    // trigger must also fire once per statement, not once per row.
    let per_row: bool = scalar(
        &pool,
        "SELECT bool_or(tgtype & 1 = 1) FROM pg_trigger
          WHERE tgrelid = 'user_workers'::regclass AND tgname = 'workerctl_notify'",
    )
    .await;
    assert!(!per_row);
}

#[sqlx::test(migrations = false)]
async fn inserts_deletes_and_code_changes_notify_and_status_writes_do_not(pool: PgPool) {
    migrated(&pool).await;
    let mut listener = subscribed(&pool).await;
    let id = insert_worker(&pool, "disabled", 1, None).await;
    assert_eq!(notifications(&pool, &mut listener).await, 1, "insert");
    for set in [
        "state = 'enabled'",
        "revision = 2",
        "source = '\\x00'",
        "entrypoint = 'a.b'",
    ] {
        exec(&pool, &format!("UPDATE user_workers SET {set}")).await;
        assert_eq!(notifications(&pool, &mut listener).await, 1, "{set}");
    }
    exec(
        &pool,
        "UPDATE user_workers SET status = 'error', status_info = 'x', name = 'n'",
    )
    .await;
    assert_eq!(
        notifications(&pool, &mut listener).await,
        0,
        "status and name"
    );
    exec(
        &pool,
        &format!("DELETE FROM user_workers WHERE id = '{id}'"),
    )
    .await;
    assert_eq!(notifications(&pool, &mut listener).await, 1, "delete");
}

#[sqlx::test(migrations = false)]
async fn the_listener_reconnects_after_its_backend_is_killed_and_wakes_again(pool: PgPool) {
    let store = migrated(&pool).await;
    let id = insert_worker(&pool, "enabled", 1, Some(ZIP)).await;
    let listening = Listening::start(&pool).await;

    let killed: i64 = scalar(
        &pool,
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
          WHERE application_name = 'workerctl-listener' AND datname = current_database()) k",
    )
    .await;
    assert_eq!(killed, 1, "exactly the listener's backend is killed");
    assert!(
        listening.woken_within(MUST_ARRIVE).await,
        "reconnecting wakes: changes may be missed"
    );

    exec(
        &pool,
        &format!("UPDATE user_workers SET state = 'disabled' WHERE id = '{id}'"),
    )
    .await;
    assert!(
        listening.woken_within(MUST_ARRIVE).await,
        "notifications flow again"
    );
    let token = row_of(&store, id).await.code_token;
    assert_eq!(
        store.load_code(WorkerId(id), &token).await.expect("load"),
        None
    );
    listening.stop().await;
}
