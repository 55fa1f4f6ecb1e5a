//! Leader election: of all the daemons sharing one database under one
//! `instance`, exactly one acts (plans and changes containers); the others
//! stand by, serve HTTP, and take over when the leader goes.
//!
//! The leader holds a Postgres *session* advisory lock whose key is derived
//! from the instance name, on a connection of its own (never a pool's: a
//! session lock lives and dies with its connection). A daemon killed with
//! `kill -9`, or whose session the server ends, loses the lock at once and
//! the next contender's `pg_try_advisory_lock` wins.
//!
//! A leader that can no longer reach the server cannot know whether it still
//! holds the lock, so leadership is also a *lease*: [`Leadership::is_held`]
//! is true only while the lock was confirmed within `lease`, and the server
//! is told (`idle_session_timeout`, twice the lease) to end a session that
//! goes silent — so a cut-off leader stops believing it leads before the
//! server can hand the lock to anyone else.
//!
//! This module decides nothing about workers; it only answers "may this
//! daemon act now?".

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sqlx::postgres::{PgAdvisoryLock, PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, Connection, Either};
use tokio::sync::{Mutex, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::backoff::error_chain;

/// Shown in `pg_stat_activity`, and to a standby daemon as who leads.
const APPLICATION_NAME: &str = "workerctl-leader";

/// How often, and how long, leadership is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaderTiming {
    /// How often the leader confirms its lock, and a standby tries to take it.
    pub heartbeat: Duration,
    /// How long a confirmation stays good. Longer than `heartbeat`; the
    /// server ends a session silent for twice this.
    pub lease: Duration,
}

impl Default for LeaderTiming {
    fn default() -> Self {
        LeaderTiming {
            heartbeat: Duration::from_secs(1),
            lease: Duration::from_secs(5),
        }
    }
}

impl LeaderTiming {
    /// The longest a statement on the lock connection may take: an answer
    /// later than this could not renew the lease anyway.
    fn query_timeout(&self) -> Duration {
        self.lease / 2
    }

    /// The server's `idle_session_timeout` for the lock session.
    fn session_timeout(&self) -> Duration {
        self.lease * 2
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("invalid database_url")]
    Url(#[source] sqlx::Error),
    #[error("cannot open the leader-lock connection for instance {instance}")]
    Connect {
        instance: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("the leader-lock connection of instance {instance} failed ({what})")]
    Query {
        instance: String,
        what: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("the database did not answer within {timeout:?} ({what})")]
    Timeout {
        what: &'static str,
        timeout: Duration,
    },
    #[error("this daemon does not lead instance {instance}")]
    NotLeader { instance: String },
}

/// The advisory lock of an instance: the same key in every daemon.
pub fn lock_of(instance: &str) -> PgAdvisoryLock {
    PgAdvisoryLock::new(format!("workerctl leader of instance {instance}"))
}

/// The bigint key of [`lock_of`], as `pg_locks` reassembles it.
fn key_of(lock: &PgAdvisoryLock) -> i64 {
    // `PgAdvisoryLock::new` always makes a bigint key.
    lock.key().as_bigint().unwrap_or_default()
}

/// `pg_locks` splits a bigint key into classid (high half) and objid (low
/// half), with objsubid 1; shifting in int8 puts the halves back together.
const IS_HELD: &str = "
SELECT EXISTS (
    SELECT 1 FROM pg_locks
     WHERE locktype = 'advisory' AND granted AND objsubid = 1
       AND pid = pg_backend_pid()
       AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
       AND ((classid::int8 << 32) | objid::int8) = $1)";

const HOLDER: &str = "
SELECT COALESCE(a.application_name, '') || ' (pid ' || a.pid || ')'
  FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
 WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
   AND ((l.classid::int8 << 32) | l.objid::int8) = $1
 LIMIT 1";

/// One dedicated connection contending for, or holding, an instance's lock.
/// Any failed or timed-out statement leaves it unusable: drop it (which
/// closes the connection, and with it the lock) and open another.
pub struct LockSession {
    conn: PgConnection,
    lock: PgAdvisoryLock,
    instance: String,
    timing: LeaderTiming,
}

impl fmt::Debug for LockSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockSession")
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

impl LockSession {
    /// Opens the connection and tells the server to end it after
    /// `2 × lease` of silence (Postgres 14 and later; older servers end it
    /// only when TCP notices, which the README mentions).
    pub async fn connect(
        url: &str,
        instance: &str,
        timing: LeaderTiming,
    ) -> Result<LockSession, LeaderError> {
        let name = format!("{APPLICATION_NAME} {}", std::process::id());
        let options = PgConnectOptions::from_str(url)
            .map_err(LeaderError::Url)?
            .application_name(&name)
            .disable_statement_logging();
        let connect = within(timing.query_timeout(), "connect", options.connect()).await?;
        let conn = connect.map_err(|source| LeaderError::Connect {
            instance: instance.to_string(),
            source,
        })?;
        let mut session = LockSession {
            conn,
            lock: lock_of(instance),
            instance: instance.to_string(),
            timing,
        };
        session.set_session_timeout().await?;
        Ok(session)
    }

    async fn set_session_timeout(&mut self) -> Result<(), LeaderError> {
        let ms = self.timing.session_timeout().as_millis();
        let sql = format!("SET idle_session_timeout = {ms}");
        let timeout = self.timing.query_timeout();
        let done = within(timeout, "set idle_session_timeout", async {
            sqlx::query(&sql).execute(&mut self.conn).await
        })
        .await?;
        match done {
            Ok(_) => Ok(()),
            // 42704: unrecognized configuration parameter (before Postgres 14).
            Err(e) if sql_state(&e).as_deref() == Some("42704") => {
                warn!(
                    "this Postgres has no idle_session_timeout: a leader cut off from it keeps the lock until TCP notices"
                );
                Ok(())
            }
            Err(source) => Err(self.failed("set idle_session_timeout", source)),
        }
    }

    /// Takes the lock if it is free (`pg_try_advisory_lock`); never waits.
    /// Call it only while not holding the lock (it is re-entrant).
    pub async fn try_acquire(&mut self) -> Result<bool, LeaderError> {
        let timeout = self.timing.query_timeout();
        let attempt = within(timeout, "try to take the lock", async {
            match self.lock.try_acquire(&mut self.conn).await {
                Ok(Either::Left(guard)) => {
                    // Keep it for as long as the connection lives.
                    guard.leak();
                    Ok(true)
                }
                Ok(Either::Right(_)) => Ok(false),
                Err(e) => Err(e),
            }
        })
        .await?;
        attempt.map_err(|source| self.failed("try to take the lock", source))
    }

    /// Waits until the lock is free and takes it (`pg_advisory_lock`). The
    /// wait happens in the server, without a timeout; dropping the future
    /// leaves the connection unusable.
    pub async fn acquire(&mut self) -> Result<(), LeaderError> {
        let taken = match self.lock.acquire(&mut self.conn).await {
            Ok(guard) => {
                // Keep it for as long as the connection lives.
                guard.leak();
                Ok(())
            }
            Err(source) => Err(source),
        };
        taken.map_err(|source| self.failed("wait for the lock", source))
    }

    /// Whether this session holds the lock, asked of the server: a round
    /// trip that also proves the connection alive.
    pub async fn verify(&mut self) -> Result<bool, LeaderError> {
        let key = key_of(&self.lock);
        let timeout = self.timing.query_timeout();
        let answer = within(timeout, "confirm the lock", async {
            sqlx::query_scalar::<_, bool>(IS_HELD)
                .bind(key)
                .fetch_one(&mut self.conn)
                .await
        })
        .await?;
        answer.map_err(|source| self.failed("confirm the lock", source))
    }

    /// Who holds the lock, as `pg_stat_activity` names the session.
    pub async fn holder(&mut self) -> Result<Option<String>, LeaderError> {
        let key = key_of(&self.lock);
        let timeout = self.timing.query_timeout();
        let answer = within(timeout, "look up the leader", async {
            sqlx::query_scalar::<_, String>(HOLDER)
                .bind(key)
                .fetch_optional(&mut self.conn)
                .await
        })
        .await?;
        answer.map_err(|source| self.failed("look up the leader", source))
    }

    /// Gives the lock up now: unlocks it (so that it is free once this
    /// returns), then closes the connection. If unlocking fails, the closed
    /// connection ends the session, and the lock with it, moments later.
    pub async fn release(mut self) {
        let timeout = self.timing.query_timeout();
        let unlock = self.lock.force_release(&mut self.conn);
        if let Ok(Err(e)) = tokio::time::timeout(timeout, unlock).await {
            warn!(error = %error_chain(&e), "cannot unlock the leader lock; closing its connection instead");
        }
        let _ = tokio::time::timeout(timeout, self.conn.close()).await;
    }

    fn failed(&self, what: &'static str, source: sqlx::Error) -> LeaderError {
        LeaderError::Query {
            instance: self.instance.clone(),
            what,
            source,
        }
    }
}

/// `future`, or [`LeaderError::Timeout`] after `timeout`.
async fn within<T>(
    timeout: Duration,
    what: &'static str,
    future: impl Future<Output = T>,
) -> Result<T, LeaderError> {
    tokio::time::timeout(timeout, future)
        .await
        .map_err(|_| LeaderError::Timeout { what, timeout })
}

fn sql_state(e: &sqlx::Error) -> Option<String> {
    e.as_database_error()
        .and_then(|d| d.code())
        .map(|c| c.into_owned())
}

/// What this daemon is, for `/readyz`, the status page and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// Not (yet) leading. `why` says what stands in the way: who leads, or
    /// why the lock cannot be tried.
    Standby { why: String },
    /// Leads the instance (as long as the lease holds: see
    /// [`Leadership::is_held`]).
    Leader,
}

impl Role {
    pub fn is_leader(&self) -> bool {
        matches!(self, Role::Leader)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Role::Leader => f.write_str("leader"),
            Role::Standby { why } => write!(f, "standby: {why}"),
        }
    }
}

/// This daemon's leadership of one instance: a campaign ([`Leadership::run`],
/// spawned once) that takes the lock when it can and keeps confirming it,
/// and cheap questions for everyone else. Clones share one campaign.
#[derive(Clone)]
pub struct Leadership {
    inner: Arc<Inner>,
}

struct Inner {
    url: String,
    instance: String,
    timing: LeaderTiming,
    role: watch::Sender<Role>,
    /// The session holding the lock, while leading.
    held: Mutex<Option<LockSession>>,
    /// When the lock was last confirmed by the server.
    confirmed: std::sync::Mutex<Option<Instant>>,
    /// Confirmations asked of the server ([`Leadership::verify`]).
    confirmations: AtomicU64,
}

impl fmt::Debug for Leadership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Leadership")
            .field("instance", &self.inner.instance)
            .field("role", &*self.inner.role.borrow())
            .finish_non_exhaustive()
    }
}

impl Leadership {
    /// A leadership that has not campaigned yet: standby until
    /// [`run`](Self::run) takes the lock.
    pub fn new(url: &str, instance: &str, timing: LeaderTiming) -> Leadership {
        let (role, _) = watch::channel(Role::Standby {
            why: "not tried the leader lock yet".into(),
        });
        Leadership {
            inner: Arc::new(Inner {
                url: url.to_string(),
                instance: instance.to_string(),
                timing,
                role,
                held: Mutex::new(None),
                confirmed: std::sync::Mutex::new(None),
                confirmations: AtomicU64::new(0),
            }),
        }
    }

    /// Whether this daemon may act now: it leads, and the server confirmed
    /// the lock within the lease. No I/O; before a change that must not be
    /// made twice, ask [`verify`](Self::verify) instead.
    pub fn is_held(&self) -> bool {
        self.inner.role.borrow().is_leader() && self.lease_fresh()
    }

    fn lease_fresh(&self) -> bool {
        let confirmed = *self
            .inner
            .confirmed
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        confirmed.is_some_and(|at| at.elapsed() < self.inner.timing.lease)
    }

    /// Asks the server whether this daemon still holds the lock (one round
    /// trip on the lock connection), renewing the lease if so. A failure
    /// ends the leadership at once: the campaign starts over.
    pub async fn verify(&self) -> Result<(), LeaderError> {
        let not_leader = || LeaderError::NotLeader {
            instance: self.inner.instance.clone(),
        };
        let mut held = self.inner.held.lock().await;
        let session = held.as_mut().ok_or_else(not_leader)?;
        self.inner.confirmations.fetch_add(1, Ordering::Relaxed);
        let outcome = session.verify().await;
        match outcome {
            Ok(true) => {
                self.confirm();
                Ok(())
            }
            Ok(false) => {
                self.step_down(&mut held, "the server says the lock is not held".into());
                Err(not_leader())
            }
            Err(e) => {
                self.step_down(&mut held, error_chain(&e));
                Err(e)
            }
        }
    }

    /// How many times [`verify`](Self::verify) has asked the server (one
    /// round trip each, on the lock connection): before each pass and each
    /// action, and every heartbeat while leading.
    pub fn confirmations(&self) -> u64 {
        self.inner.confirmations.load(Ordering::Relaxed)
    }

    /// The current role.
    pub fn role(&self) -> Role {
        self.inner.role.borrow().clone()
    }

    /// Follows role changes (for the status page, or to cancel work in
    /// flight the moment leadership is lost).
    pub(crate) fn subscribe(&self) -> watch::Receiver<Role> {
        self.inner.role.subscribe()
    }

    /// Resolves once this daemon leads. Cancel-safe.
    pub async fn until_leader(&self) {
        let mut role = self.subscribe();
        // The sender lives in `self`, so the channel cannot close here.
        let _ = role.wait_for(Role::is_leader).await;
    }

    /// Resolves once this daemon stops leading (at once if it does not
    /// lead). Cancel-safe.
    pub async fn until_lost(&self) {
        let mut role = self.subscribe();
        let _ = role.wait_for(|r| !r.is_leader()).await;
    }

    /// The campaign, until `shutdown`: as standby, try the lock every
    /// heartbeat; as leader, confirm it every heartbeat; on any failure,
    /// stand by, let the other daemons try for a lease, and start over. On shutdown the lock is released, so a
    /// standby takes over without waiting for anything to time out.
    pub async fn run(&self, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            let Some(session) = self.campaign(&shutdown).await else {
                break;
            };
            self.lead(session, &shutdown).await;
            // A daemon that just lost the lock lets the standbys have it
            // first: leadership does not flap back to a flaky connection.
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = tokio::time::sleep(self.timing().lease) => {}
            }
        }
        let session = self.inner.held.lock().await.take();
        self.publish(Role::Standby {
            why: "shutting down".into(),
        });
        if let Some(session) = session {
            session.release().await;
            info!(instance = %self.inner.instance, "released the leader lock");
        }
    }

    /// Stands by until the lock is taken (`Some`) or `shutdown` (`None`).
    async fn campaign(&self, shutdown: &CancellationToken) -> Option<LockSession> {
        let mut session: Option<LockSession> = None;
        loop {
            let current = session.take();
            let attempt = async move {
                let mut s = match current {
                    Some(s) => s,
                    None => {
                        LockSession::connect(&self.inner.url, &self.inner.instance, self.timing())
                            .await?
                    }
                };
                let won = s.try_acquire().await?;
                let why = if won { None } else { Some(s.holder().await?) };
                Ok::<_, LeaderError>((s, why))
            };
            tokio::select! {
                // Cancel-safe: an attempt dropped midway drops its connection.
                () = shutdown.cancelled() => return None,
                outcome = attempt => match outcome {
                    Ok((s, None)) => return Some(s),
                    Ok((s, Some(holder))) => {
                        session = Some(s);
                        let who = holder.unwrap_or_else(|| "another daemon".into());
                        self.publish(Role::Standby { why: format!("instance {} is led by {who}", self.inner.instance) });
                    }
                    Err(e) => {
                        warn!(instance = %self.inner.instance, error = %error_chain(&e), "cannot try the leader lock");
                        self.publish(Role::Standby { why: error_chain(&e) });
                    }
                },
            }
            tokio::select! {
                () = shutdown.cancelled() => return None,
                () = tokio::time::sleep(self.timing().heartbeat) => {}
            }
        }
    }

    /// Leads until the lock cannot be confirmed or `shutdown`.
    async fn lead(&self, session: LockSession, shutdown: &CancellationToken) {
        *self.inner.held.lock().await = Some(session);
        self.confirm();
        self.publish(Role::Leader);
        info!(instance = %self.inner.instance, "leading: took the leader lock");
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(self.timing().heartbeat) => {}
                // Someone's verify() failed and stepped down already.
                () = self.until_lost() => return,
            }
            if self.verify().await.is_err() {
                return;
            }
        }
    }

    fn step_down(&self, held: &mut Option<LockSession>, why: String) {
        // Dropping the session closes its connection: whatever the server
        // thinks, this daemon no longer uses that lock.
        held.take();
        *self
            .inner
            .confirmed
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
        warn!(instance = %self.inner.instance, %why, "lost the leader lock; standing by");
        self.publish(Role::Standby {
            why: format!("lost the leader lock: {why}"),
        });
    }

    fn confirm(&self) {
        *self
            .inner
            .confirmed
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    fn publish(&self, role: Role) {
        self.inner.role.send_if_modified(|current| {
            let changed = *current != role;
            *current = role;
            changed
        });
    }

    fn timing(&self) -> LeaderTiming {
        self.inner.timing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_daemon_of_an_instance_derives_the_same_key() {
        assert_eq!(key_of(&lock_of("default")), key_of(&lock_of("default")));
        assert_ne!(key_of(&lock_of("default")), key_of(&lock_of("staging")));
    }

    #[test]
    fn the_server_forgets_a_silent_leader_only_after_it_stopped_believing() {
        let t = LeaderTiming::default();
        assert!(t.heartbeat < t.lease);
        assert!(t.query_timeout() < t.lease);
        assert!(t.session_timeout() > t.lease);
    }

    #[test]
    fn a_new_leadership_is_standby_and_not_held() {
        let l = Leadership::new("postgres://x@127.0.0.1:9/x", "i", LeaderTiming::default());
        assert!(!l.is_held());
        assert!(!l.role().is_leader());
        assert!(l.role().to_string().starts_with("standby: "));
    }
}
