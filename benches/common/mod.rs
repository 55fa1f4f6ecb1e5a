//! What every benchmark needs besides its own measurements: settings from
//! the environment, progress lines, the machine's load, the database, and
//! the statistics a figure is printed with. Each benchmark is a crate of
//! its own (`mod common;`) and uses a part of it.
#![allow(dead_code)]

use std::borrow::Borrow;
use std::str::FromStr;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

/// `key` from the environment, or `default`.
pub fn env_or(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.into())
}

/// `key` from the environment parsed, or `default` (also when it does not
/// parse).
pub fn setting<T: FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A count from the environment: at least 1.
pub fn count(key: &str, default: usize) -> usize {
    setting(key, default).max(1)
}

/// One line on stderr, so that a long run shows where it is.
pub fn progress(what: std::fmt::Arguments<'_>) {
    eprintln!("bench: {what}");
}

/// The 1, 5 and 15-minute load averages, as the figures are printed beside.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// A lock whose holder panicked is still good for a benchmark's records.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Milliseconds, fractional.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One connection to the database, for the benchmark's own rows.
pub async fn admin_pool(url: &str) -> PgPool {
    let pool = PgPoolOptions::new().max_connections(1).connect(url).await;
    pool.expect("Postgres answers at DATABASE_URL (run scripts/services)")
}

/// The finite values, in order.
pub fn sorted(values: impl IntoIterator<Item = impl Borrow<f64>>) -> Vec<f64> {
    let mut v: Vec<f64> = values
        .into_iter()
        .map(|x| *x.borrow())
        .filter(|x| x.is_finite())
        .collect();
    v.sort_by(f64::total_cmp);
    v
}

/// The median of the finite values (NaN for none).
pub fn median(values: impl IntoIterator<Item = impl Borrow<f64>>) -> f64 {
    let v = sorted(values);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The nearest-rank percentile `p` (0 < p ≤ 1) of the finite values (NaN
/// for none).
pub fn percentile(values: impl IntoIterator<Item = impl Borrow<f64>>, p: f64) -> f64 {
    let v = sorted(values);
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// A benchmark's `main`: runs `run` on a multi-threaded runtime with warnings
/// logged to stderr — only under `cargo bench` (which passes `--bench`);
/// built by `cargo test --all-targets`, it says how to run it and succeeds.
pub fn bench_main<F>(name: &str, run: impl FnOnce() -> F) -> std::process::ExitCode
where
    F: std::future::Future<Output = std::process::ExitCode>,
{
    if !std::env::args().skip(1).any(|a| a == "--bench") {
        eprintln!("the {name} benchmark runs with `cargo bench --bench {name}` (scripts/bench)");
        return std::process::ExitCode::SUCCESS;
    }
    // sqlx calls a DROP DATABASE … WITH (FORCE) over 1 s "slow": not news;
    // lapin logs each channel the broker closes (a passive declare of a
    // queue not there yet): the daemon's own default filter leaves it out.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("warn,sqlx::query=error,lapin::channel=off")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(run())
}

/// `DATABASE_URL`, or the project's local server.
pub fn database_url() -> String {
    env_or(
        "DATABASE_URL",
        "postgres://workerctl:workerctl@127.0.0.1:5432/workerctl",
    )
}

/// `AMQP_URL`, or the project's local broker.
pub fn amqp_url() -> String {
    env_or("AMQP_URL", "amqp://workerctl:workerctl@127.0.0.1:5672/%2f")
}

/// A throwaway database on the server of `DATABASE_URL`, migrated; dropped
/// by [`Database::drop`].
pub struct Database {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
}

impl Database {
    /// `<prefix>_<random>`, created and migrated.
    pub async fn create(prefix: &str) -> Database {
        use sqlx::{ConnectOptions, Connection, Executor};
        let base = database_url();
        let name = format!(
            "{prefix}_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let mut admin = <sqlx::postgres::PgConnectOptions as std::str::FromStr>::from_str(&base)
            .expect("DATABASE_URL")
            .connect()
            .await
            .expect("Postgres answers");
        admin
            .execute(format!("CREATE DATABASE \"{name}\"").as_str())
            .await
            .expect("CREATE DATABASE (the DATABASE_URL role must be allowed to)");
        let _ = admin.close().await;
        let mut url = reqwest::Url::parse(&base).expect("DATABASE_URL is a URL");
        url.set_path(&name);
        let url = url.to_string();
        let store = workerctl::store::postgres::PgStore::connect(&url).expect("url");
        store.migrate().await.expect("migrations");
        Database {
            name,
            url,
            pool: store.pool().clone(),
        }
    }

    /// Closes the pool and drops the database.
    pub async fn drop(&self) {
        use sqlx::{ConnectOptions, Executor};
        self.pool.close().await;
        if let Ok(mut admin) =
            <sqlx::postgres::PgConnectOptions as std::str::FromStr>::from_str(&database_url())
                .expect("url")
                .connect()
                .await
        {
            let _ = admin
                .execute(format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name).as_str())
                .await;
        }
    }
}
