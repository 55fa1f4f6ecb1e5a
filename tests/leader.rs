//! Leader election against a real Postgres: two daemons' worth of
//! [`Leadership`] on one fresh database (`#[sqlx::test]`), one wins, the
//! other stands by; the winner's session is ended by the server
//! (`pg_terminate_backend`, what a dead or cut-off daemon amounts to) and
//! the other takes over, while the old winner knows it no longer leads.
//! And a leader cut off from the server (a relay in front of Postgres that
//! goes silent, `tests/common/relay.rs`): it stops leading within its lease,
//! before the server lets the standby take the lock.
//!
//! Needs `DATABASE_URL` (scripts/test exports it); without a reachable
//! server every test fails, none is skipped.

mod common;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgAdvisoryLockKey;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use workerctl::leader::{LeaderTiming, Leadership, LockSession, Role, lock_of};

use common::relay::{Front, Relay, Upstream};

/// Only catches a hang: what must happen happens long before.
const MUST_HAPPEN: Duration = Duration::from_secs(30);

const TIMING: LeaderTiming = LeaderTiming {
    heartbeat: Duration::from_millis(200),
    lease: Duration::from_secs(4),
};

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(MUST_HAPPEN, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: not within {MUST_HAPPEN:?}"))
}

/// Waits until `check` holds, polling; panics naming `what` after [`MUST_HAPPEN`].
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    within(what, async {
        while !check().await {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

struct Daemon {
    leadership: Leadership,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Daemon {
    fn start(url: &str, instance: &str) -> Daemon {
        let leadership = Leadership::new(url, instance, TIMING);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let (l, s) = (leadership.clone(), shutdown.clone());
            async move { l.run(s).await }
        });
        Daemon {
            leadership,
            shutdown,
            task,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        within("the campaign ends on shutdown", self.task)
            .await
            .expect("the campaign does not panic");
    }
}

/// The backend pids holding an advisory lock in this database.
async fn lock_holders(pool: &PgPool) -> Vec<i32> {
    sqlx::query_scalar(
        "SELECT pid FROM pg_locks
          WHERE locktype = 'advisory' AND granted
            AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_all(pool)
    .await
    .expect("pg_locks reads")
}

/// Ends the session holding the lock, as the server does to a dead or
/// cut-off client, and waits until it is gone.
async fn terminate_holder(pool: &PgPool) {
    let holders = lock_holders(pool).await;
    assert_eq!(holders.len(), 1, "exactly one session holds the lock");
    let pid = holders[0];
    let done: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(pool)
        .await
        .expect("pg_terminate_backend runs");
    assert!(done, "the holder's backend was signalled");
    eventually("the terminated backend is gone", async || {
        let alive: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)")
                .bind(pid)
                .fetch_one(pool)
                .await
                .expect("pg_stat_activity reads");
        !alive
    })
    .await;
}

/// Starts A, waits until it leads, then starts B and waits until B has
/// tried and stands by.
async fn leader_and_standby(url: &str) -> (Daemon, Daemon) {
    let a = Daemon::start(url, "pair");
    within("A leads", a.leadership.until_leader()).await;
    let b = Daemon::start(url, "pair");
    eventually(
        "B stands by behind A",
        async || matches!(b.leadership.role(), Role::Standby { why } if why.contains("is led by")),
    )
    .await;
    (a, b)
}

#[sqlx::test]
async fn of_two_contenders_one_leads_and_the_other_stands_by(pool: PgPool) {
    let url = common::database_url(&pool);
    let (a, b) = leader_and_standby(&url).await;
    assert!(a.leadership.is_held());
    a.leadership
        .verify()
        .await
        .expect("the leader's lock is confirmed");
    assert!(!b.leadership.is_held());
    assert!(
        b.leadership.verify().await.is_err(),
        "the standby cannot confirm a lock"
    );
    let why = b.leadership.role().to_string();
    assert!(why.contains("workerctl-leader"), "says who leads: {why}");
    assert_eq!(lock_holders(&pool).await.len(), 1);
    a.stop().await;
    b.stop().await;
}

#[sqlx::test]
async fn when_the_leaders_session_is_killed_the_standby_takes_over(pool: PgPool) {
    let url = common::database_url(&pool);
    let (a, b) = leader_and_standby(&url).await;
    terminate_holder(&pool).await;
    within("B takes over", b.leadership.until_leader()).await;
    b.leadership.verify().await.expect("B's lock is confirmed");
    within("A knows it lost", a.leadership.until_lost()).await;
    assert!(!a.leadership.is_held());
    assert!(a.leadership.verify().await.is_err());
    eventually(
        "A stands by behind B",
        async || matches!(a.leadership.role(), Role::Standby { why } if why.contains("is led by")),
    )
    .await;
    assert!(!a.leadership.is_held(), "A does not take the lock back");
    a.stop().await;
    b.stop().await;
}

#[sqlx::test]
async fn a_leader_whose_session_was_killed_fails_its_next_check_at_once(pool: PgPool) {
    let url = common::database_url(&pool);
    let a = Daemon::start(&url, "alone");
    within("A leads", a.leadership.until_leader()).await;
    terminate_holder(&pool).await;
    // No heartbeat needed: the check before an action asks the server.
    let err = a.leadership.verify().await.expect_err("the lock is gone");
    assert!(!a.leadership.is_held(), "after {err}");
    assert!(!a.leadership.role().is_leader());
    a.stop().await;
}

#[sqlx::test]
async fn a_leader_that_shuts_down_hands_over_without_waiting(pool: PgPool) {
    let url = common::database_url(&pool);
    let (a, b) = leader_and_standby(&url).await;
    a.stop().await;
    within("B takes over", b.leadership.until_leader()).await;
    assert_eq!(lock_holders(&pool).await.len(), 1);
    b.stop().await;
    assert!(lock_holders(&pool).await.is_empty(), "B released it too");
}

#[sqlx::test]
async fn instances_have_locks_of_their_own(pool: PgPool) {
    let url = common::database_url(&pool);
    let a = Daemon::start(&url, "one");
    let b = Daemon::start(&url, "two");
    within("one leads", a.leadership.until_leader()).await;
    within("two leads", b.leadership.until_leader()).await;
    a.stop().await;
    b.stop().await;
}

#[sqlx::test]
async fn a_session_confirms_its_lock_whatever_the_sign_of_the_key(pool: PgPool) {
    let url = common::database_url(&pool);
    let mut signs = (false, false);
    for n in 0..16 {
        let instance = format!("i{n}");
        let PgAdvisoryLockKey::BigInt(key) = lock_of(&instance).key().clone() else {
            panic!("a string key is a bigint key");
        };
        if key < 0 {
            signs.0 = true;
        } else {
            signs.1 = true;
        }
        let mut first = LockSession::connect(&url, &instance, TIMING)
            .await
            .expect("connects");
        let mut second = LockSession::connect(&url, &instance, TIMING)
            .await
            .expect("connects");
        assert!(!first.verify().await.expect("asks"), "not held before");
        assert!(
            first.try_acquire().await.expect("tries"),
            "{instance}: free"
        );
        assert!(first.verify().await.expect("asks"), "{instance}: held");
        assert!(
            !second.try_acquire().await.expect("tries"),
            "{instance}: taken"
        );
        assert!(!second.verify().await.expect("asks"));
        first.release().await;
        assert!(
            second.try_acquire().await.expect("tries"),
            "{instance}: freed"
        );
        second.release().await;
    }
    assert_eq!(signs, (true, true), "keys of both signs were tried");
}

#[sqlx::test]
async fn a_waiting_acquire_gets_the_lock_once_its_holder_releases_it(pool: PgPool) {
    let url = common::database_url(&pool);
    let mut holder = LockSession::connect(&url, "wait", TIMING)
        .await
        .expect("connects");
    assert!(holder.try_acquire().await.expect("tries"));
    let mut waiter = LockSession::connect(&url, "wait", TIMING)
        .await
        .expect("connects");
    let waiting = tokio::spawn(async move {
        waiter.acquire().await.expect("waits, then takes it");
        waiter
    });
    eventually("the waiter waits in the server", async || {
        let waits: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted)",
        )
        .fetch_one(&pool)
        .await
        .expect("pg_locks reads");
        waits
    })
    .await;
    assert!(!waiting.is_finished(), "the lock is still held");
    holder.release().await;
    let mut waiter = within("the waiter gets the lock", waiting)
        .await
        .expect("the waiter does not panic");
    assert!(waiter.verify().await.expect("asks"));
    waiter.release().await;
}

/// A relay in front of the test's Postgres, and the database URL through it.
async fn relayed(url: &str) -> (Relay, String) {
    let mut url = reqwest::Url::parse(url).expect("a URL");
    let postgres = SocketAddr::from(([127, 0, 0, 1], url.port().unwrap_or(5432)));
    let any_port = Front::Tcp(SocketAddr::from(([127, 0, 0, 1], 0)));
    let relay = Relay::start(any_port, Upstream::Tcp(postgres)).await;
    let Front::Tcp(front) = relay.front().clone() else {
        unreachable!("a TCP relay")
    };
    url.set_port(Some(front.port())).expect("a port");
    (relay, url.to_string())
}

#[sqlx::test]
async fn a_leader_cut_off_from_the_database_stops_leading_before_the_standby_takes_over(
    pool: PgPool,
) {
    let url = common::database_url(&pool);
    let (relay, through_relay) = relayed(&url).await;
    let a = Daemon::start(&through_relay, "cut");
    within("A leads", a.leadership.until_leader()).await;
    let b = Daemon::start(&url, "cut");
    eventually(
        "B stands by behind A",
        async || matches!(b.leadership.role(), Role::Standby { why } if why.contains("is led by")),
    )
    .await;

    // The order of the two events is the point: number them as they happen.
    let order = Arc::new(AtomicUsize::new(0));
    let a_lost = tokio::spawn({
        let (l, order) = (a.leadership.clone(), order.clone());
        async move {
            l.until_lost().await;
            order.fetch_add(1, Ordering::SeqCst) + 1
        }
    });
    let b_leads = tokio::spawn({
        let (l, order) = (b.leadership.clone(), order.clone());
        async move {
            l.until_leader().await;
            order.fetch_add(1, Ordering::SeqCst) + 1
        }
    });
    // Silence, not a close: the server keeps A's session (and the lock)
    // until its idle_session_timeout (2 × lease) ends it.
    relay.stall();
    let a_lost = within("A stops leading", a_lost).await.expect("no panic");
    let b_leads = within("B takes over", b_leads).await.expect("no panic");
    assert_eq!(
        (a_lost, b_leads),
        (1, 2),
        "A stopped leading before B could lead"
    );
    assert!(!a.leadership.is_held(), "A may not act");
    assert!(
        a.leadership.verify().await.is_err(),
        "A cannot confirm a lock"
    );
    b.leadership.verify().await.expect("B's lock is confirmed");
    assert_eq!(lock_holders(&pool).await.len(), 1, "one lock, B's");
    b.stop().await;
    relay.cut();
    a.stop().await;
}
