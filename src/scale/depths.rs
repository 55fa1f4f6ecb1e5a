//! The queue-depth boundary: how many messages wait in each worker's queue,
//! read from RabbitMQ's management HTTP API with **one** request for all
//! queues, whatever the number of workers:
//! `GET /api/queues/<vhost>?disable_stats=true&enable_queue_totals=true&columns=name,messages_ready`.
//!
//! Only queues named `worker_<uuid>` count; everything else on the vhost is
//! ignored.
//!
//! **Why queue totals, not the statistics database.** A worker scaled to
//! zero comes back when a reading shows a message in its queue, so a reading
//! must be fresh to within about `scale.poll_interval` (5 s). Asked plainly,
//! the API answers from the management statistics database, which the
//! management agent refreshes only every 5 s (the finest interval of its
//! `sample_retention_policies`; `collect_statistics_interval` does not
//! govern it), after the queue itself has published its counts: a message
//! showed 1–10 s late (benches/depth.rs, docs/benchmarks.md), and lowering
//! `collect_statistics_interval` to 1 s changed nothing. With
//! `disable_stats=true&enable_queue_totals=true` the API skips that database
//! and lists each queue's own counters, as `rabbitmqctl list_queues` does,
//! still in one request: a classic queue's are live, a quorum queue's (every
//! worker queue, docs/compatibility.md §4) as old as the queue leader's last
//! tick, `quorum_tick_interval` (5 s by default; the brokers of
//! scripts/services and docker-compose.yaml tick every second, and README
//! says how to set it on an existing broker). Measured: a message shows
//! within 0–1 s on a 1 s tick, 0–5 s on the default one. That listing
//! carries no consumer count, which is why [`QueueDepth::consumers`] is 0.
//! Nor does it need the statistics database, which a broker may switch off
//! (`management.disable_stats`; RabbitMQ deprecates it as
//! `management_metrics_collection`). A broker that does not know the
//! parameters would ignore them, as it does any unknown query parameter,
//! and answer from its statistics: later, but still right. One that knows
//! `disable_stats` but not `enable_queue_totals` would list queues without
//! any count: after [`TOTALS_MISSING_READS`] such reads in a row the monitor
//! says so in the log and reads the statistics database from then on
//! ([`QUEUES_QUERY_STATS`]). RabbitMQ 3.8.9 (the 3.8 series is what
//! SensorBucket's stack runs, and what scripts/test-rabbitmq-3.8 tests
//! against) knows both.
//!
//! Not done: confirming the depth of workers at zero replicas with an AMQP
//! passive `queue.declare`, whose message count is exact. It costs a round
//! trip per such worker and poll — on a stack of a few hundred mostly idle
//! workers, hundreds every 5 s, and a read no longer constant in the number
//! of workers — to gain under a second once the tick is 1 s.
//!
//! Without the management API (plugin disabled, wrong URL or credentials)
//! every read fails with a [`BrokerError`] that says what to do, and the
//! scaler holds each worker's replica count (see `plan/replicas.rs`): no
//! autoscaling, workers keep running. This module decides nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use reqwest::{StatusCode, Url};
use serde::Deserialize;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::backoff::error_chain;

use crate::config::Secret;
use crate::model::WorkerId;
use crate::model::{Demand, QueueDepth, QueueDepths};

/// A management API that has not answered by then is treated as absent for
/// this read: the next poll tries again.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The queue name prefix of a worker (docs/compatibility.md §4).
const QUEUE_PREFIX: &str = "worker_";
/// Each queue's own counters instead of the statistics database, and only
/// the columns read (module docs).
const QUEUES_QUERY: &str =
    "disable_stats=true&enable_queue_totals=true&columns=name,messages_ready";
/// The same listing from the statistics database, for a broker that lists
/// no queue totals.
const QUEUES_QUERY_STATS: &str = "columns=name,messages_ready";
/// Reads in a row that list queues without any count before the monitor
/// takes the broker for one that ignores `enable_queue_totals`: a new quorum
/// queue has no count until its first tick (at most 5 s), so one such read
/// proves nothing, three polls apart do.
const TOTALS_MISSING_READS: u32 = 3;
/// Why a one-shot command reads no depths (the daemon says the same).
pub(crate) const NO_MANAGEMENT_URL: &str = "scale.management_url is empty: no autoscaling";

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("invalid scale.management_url: {problem}")]
    Url { problem: String },
    #[error(
        "the RabbitMQ management API at {at} does not answer; enable it \
         (rabbitmq-plugins enable rabbitmq_management) or set scale.management_url"
    )]
    Unreachable {
        at: String,
        #[source]
        source: reqwest::Error,
    },
    #[error(
        "the RabbitMQ management API at {at} refused the credentials (HTTP {status}); \
         put a user with the monitoring tag in scale.management_url"
    )]
    Unauthorized { at: String, status: u16 },
    #[error(
        "{at} has no queues of vhost {vhost:?} (HTTP 404): is it RabbitMQ's management API, \
         and does the vhost of amqp.url exist?"
    )]
    NotFound { at: String, vhost: String },
    #[error("the RabbitMQ management API at {at} answered HTTP {status}")]
    Status { at: String, status: u16 },
    #[error("cannot read the queue list from the management API at {at}")]
    Decode {
        at: String,
        #[source]
        source: reqwest::Error,
    },
}

/// One queue as the management API lists it (only the requested columns).
#[derive(Debug, Deserialize)]
struct QueueRow {
    name: String,
    messages_ready: Option<u64>,
}

/// A client of the management API for one vhost. Counts its requests, so a
/// benchmark can show one per read.
#[derive(Debug)]
pub struct QueueMonitor {
    http: reqwest::Client,
    queues_url: Url,
    user: String,
    password: Secret,
    /// host:port, for messages (never the URL: it may carry a password).
    at: String,
    vhost: String,
    calls: AtomicU64,
    /// Reads in a row that listed queues but no count ([`TOTALS_MISSING_READS`]).
    countless_reads: AtomicU32,
    /// The broker ignores `enable_queue_totals`: read the statistics database.
    from_statistics: AtomicBool,
}

impl QueueMonitor {
    /// A monitor of `vhost` through the API at `management_url`. Credentials
    /// are the URL's (`http://user:password@host:15672`); without any, those
    /// of `amqp_url` (the same broker user, usually). `vhost` is the one of
    /// `amqp_url` (`/%2f` or none: `/`).
    pub fn new(management_url: &str, amqp_url: &str) -> Result<QueueMonitor, BrokerError> {
        let bad = |problem: String| BrokerError::Url { problem };
        let base = Url::parse(management_url).map_err(|e| bad(e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(bad(format!("{management_url:?} is not an http:// URL")));
        }
        let amqp = Url::parse(amqp_url).ok();
        let (user, password) = credentials(&base, amqp.as_ref());
        let vhost = amqp.as_ref().map_or_else(|| "/".to_string(), vhost_of);
        let queues_url = queues_url(&base, &vhost).ok_or_else(|| bad("cannot be a base".into()))?;
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| bad(e.to_string()))?;
        Ok(QueueMonitor {
            http,
            at: format!(
                "{}:{}",
                base.host_str().unwrap_or("?"),
                base.port_or_known_default().unwrap_or(15672)
            ),
            queues_url,
            user,
            password: Secret::new(password),
            vhost,
            calls: AtomicU64::new(0),
            countless_reads: AtomicU32::new(0),
            from_statistics: AtomicBool::new(false),
        })
    }

    /// How many requests this monitor has made.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Whether depths come from the statistics database because the broker
    /// lists no queue totals (module docs).
    pub(crate) fn reads_statistics(&self) -> bool {
        self.from_statistics.load(Ordering::Relaxed)
    }

    /// The depth of every worker queue, in one request.
    pub async fn depths(&self) -> Result<QueueDepths, BrokerError> {
        let rows = self.rows().await?;
        if !self.reads_statistics() && self.lists_no_totals(&rows) {
            self.from_statistics.store(true, Ordering::Relaxed);
            warn!(
                at = %self.at,
                "this RabbitMQ lists queues without counts when asked for queue totals \
                 (enable_queue_totals; RabbitMQ 3.8.9 has them): queue depths \
                 come from its statistics database from now on, up to 5 s later than \
                 the queues' own counts; upgrade RabbitMQ for fresher depths"
            );
            return Ok(depths_of(self.rows().await?));
        }
        Ok(depths_of(rows))
    }

    /// Counts a read that listed queues but no count at all; true once
    /// [`TOTALS_MISSING_READS`] came in a row.
    fn lists_no_totals(&self, rows: &[QueueRow]) -> bool {
        if !countless(rows) {
            self.countless_reads.store(0, Ordering::Relaxed);
            return false;
        }
        self.countless_reads.fetch_add(1, Ordering::Relaxed) + 1 >= TOTALS_MISSING_READS
    }

    /// One listing of the vhost's queues.
    async fn rows(&self) -> Result<Vec<QueueRow>, BrokerError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let mut url = self.queues_url.clone();
        if self.reads_statistics() {
            url.set_query(Some(QUEUES_QUERY_STATS));
        }
        let response = self
            .http
            .get(url)
            .basic_auth(&self.user, Some(self.password.expose()))
            .send()
            .await
            .map_err(|source| BrokerError::Unreachable {
                at: self.at.clone(),
                source,
            })?;
        self.check(response.status())?;
        response.json().await.map_err(|source| BrokerError::Decode {
            at: self.at.clone(),
            source,
        })
    }

    fn check(&self, status: StatusCode) -> Result<(), BrokerError> {
        let at = self.at.clone();
        match status.as_u16() {
            200..=299 => Ok(()),
            401 | 403 => Err(BrokerError::Unauthorized {
                at,
                status: status.as_u16(),
            }),
            404 => Err(BrokerError::NotFound {
                at,
                vhost: self.vhost.clone(),
            }),
            other => Err(BrokerError::Status { at, status: other }),
        }
    }
}

/// The latest queue-depth read, as the pass and the status page see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reading {
    /// Nothing read yet.
    NotYet,
    Depths(QueueDepths),
    /// The last read failed: the reason, on one line (the scaler holds
    /// every replica count meanwhile).
    Unavailable(String),
}

impl Reading {
    /// What the scaler knows of a worker's queue from this reading.
    pub(crate) fn demand(&self, id: WorkerId) -> Demand {
        self.depths().map_or(Demand::Unknown, |d| d.demand(id))
    }

    /// The depths, if the last read succeeded.
    pub fn depths(&self) -> Option<&QueueDepths> {
        match self {
            Reading::Depths(d) => Some(d),
            Reading::NotYet | Reading::Unavailable(_) => None,
        }
    }
}

/// One read of every worker queue's depth, or why there is none (on one line).
pub async fn read(monitor: &QueueMonitor) -> Reading {
    match monitor.depths().await {
        Ok(depths) => Reading::Depths(depths),
        Err(e) => Reading::Unavailable(error_chain(&e)),
    }
}

/// The reading of a command that makes a single pass (`workerctl plan`,
/// `reconcile --once`): one read as the daemon's poller makes it, so that
/// the pass scales as the daemon's would. No `management_url`: no read.
pub async fn read_once(management_url: &str, amqp_url: &str) -> Reading {
    if management_url.is_empty() {
        return Reading::Unavailable(NO_MANAGEMENT_URL.into());
    }
    match QueueMonitor::new(management_url, amqp_url) {
        Ok(monitor) => read(&monitor).await,
        Err(e) => Reading::Unavailable(error_chain(&e)),
    }
}

/// Reads the depths every `every` until `shutdown`, publishing each reading
/// that differs from the last on `readings` and waking the controller
/// (`wake`) for it: an unchanged queue wakes nothing, so an idle system
/// costs one request per poll and no pass. A failure is logged when it
/// starts and when it ends, not at every poll. `counted` is told of every
/// read, whether it gave depths (the daemon's `/metrics`).
pub async fn poll(
    monitor: Arc<QueueMonitor>,
    every: Duration,
    readings: watch::Sender<Reading>,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
    counted: impl Fn(bool) + Send + 'static,
) {
    loop {
        let reading = tokio::select! {
            // Cancel-safe: a request dropped midway changes nothing.
            () = shutdown.cancelled() => return,
            reading = read(&monitor) => reading,
        };
        counted(matches!(reading, Reading::Depths(_)));
        log_transition(&readings.borrow(), &reading);
        let changed = readings.send_if_modified(|current| {
            let changed = *current != reading;
            *current = reading;
            changed
        });
        if changed {
            wake.notify_one();
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}

fn log_transition(before: &Reading, after: &Reading) {
    match (before, after) {
        (Reading::Unavailable(_), Reading::Depths(_)) => {
            info!("queue depths readable again: autoscaling resumes");
        }
        (Reading::Unavailable(old), Reading::Unavailable(new)) if old == new => {}
        (_, Reading::Unavailable(why)) => {
            warn!(reason = %why, "cannot read queue depths: replica counts held, autoscaling paused");
        }
        _ => {}
    }
}

/// A listing of queues none of which carries a count: what a broker that
/// ignores `enable_queue_totals` answers (an empty one says nothing).
fn countless(rows: &[QueueRow]) -> bool {
    !rows.is_empty() && rows.iter().all(|row| row.messages_ready.is_none())
}

/// The worker queues among `rows`.
fn depths_of(rows: Vec<QueueRow>) -> QueueDepths {
    let by_worker = rows
        .into_iter()
        .filter_map(|row| {
            let id = row.name.strip_prefix(QUEUE_PREFIX)?.parse().ok()?;
            let depth = QueueDepth {
                ready: row.messages_ready,
                consumers: 0,
            };
            Some((id, depth))
        })
        .collect();
    QueueDepths { by_worker }
}

/// `<base>/api/queues/<vhost>?…` asking for queue totals (module docs), the
/// vhost as one path segment (so `/` is sent as `%2F`).
fn queues_url(base: &Url, vhost: &str) -> Option<Url> {
    let mut url = base.clone();
    url.set_username("").ok()?;
    url.set_password(None).ok()?;
    url.path_segments_mut()
        .ok()?
        .pop_if_empty()
        .extend(["api", "queues", vhost]);
    url.set_query(Some(QUEUES_QUERY));
    Some(url)
}

/// The user and password of the management URL, else of the AMQP URL,
/// else RabbitMQ's default.
fn credentials(management: &Url, amqp: Option<&Url>) -> (String, String) {
    let of = |u: &Url| {
        (!u.username().is_empty()).then(|| {
            (
                decode(u.username()),
                u.password().map(decode).unwrap_or_default(),
            )
        })
    };
    of(management)
        .or_else(|| amqp.and_then(of))
        .unwrap_or_else(|| ("guest".into(), "guest".into()))
}

/// The vhost an AMQP URL names: its path without the leading `/`,
/// percent-decoded; none means `/`.
fn vhost_of(amqp: &Url) -> String {
    let path = amqp.path().strip_prefix('/').unwrap_or(amqp.path());
    if path.is_empty() {
        "/".into()
    } else {
        decode(path)
    }
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn url(s: &str) -> Url {
        Url::parse(s).expect("valid URL")
    }

    #[test]
    fn the_default_vhost_is_sent_as_one_encoded_segment_asking_for_queue_totals() {
        let u = queues_url(&url("http://u:p@127.0.0.1:15672"), "/").expect("base");
        assert_eq!(
            u.as_str(),
            "http://127.0.0.1:15672/api/queues/%2F?disable_stats=true&enable_queue_totals=true&columns=name,messages_ready"
        );
    }

    fn row(name: &str, ready: Option<u64>) -> QueueRow {
        QueueRow {
            name: name.into(),
            messages_ready: ready,
        }
    }

    #[test]
    fn a_listing_without_any_count_is_countless_and_an_empty_one_is_not() {
        let w = "worker_00000000-0000-0000-0000-000000000001";
        let cases: [(Vec<QueueRow>, bool); 5] = [
            (vec![], false),
            (vec![row(w, None)], true),
            (vec![row(w, None), row("other", None)], true),
            (vec![row(w, None), row("other", Some(0))], false),
            (vec![row(w, Some(3))], false),
        ];
        for (rows, want) in cases {
            assert_eq!(countless(&rows), want, "{rows:?}");
        }
    }

    #[test]
    fn only_countless_reads_in_a_row_switch_to_the_statistics_database() {
        let monitor = QueueMonitor::new("http://mq:15672", "amqp://u:p@mq/%2f").expect("valid");
        let none = [row("worker_x", None)];
        let some = [row("worker_x", Some(1))];
        let reads: [(&[QueueRow], bool); 6] = [
            (&none, false),
            (&none, false),
            // A count in between: a new queue had not ticked yet.
            (&some, false),
            (&none, false),
            (&none, false),
            (&none, true),
        ];
        for (i, (rows, switch)) in reads.into_iter().enumerate() {
            assert_eq!(monitor.lists_no_totals(rows), switch, "read {i}");
        }
        assert!(!monitor.reads_statistics(), "lists_no_totals only counts");
    }

    #[test]
    fn a_path_prefix_of_the_management_url_is_kept() {
        let u = queues_url(&url("http://mq/rabbit/"), "prod").expect("base");
        assert_eq!(u.path(), "/rabbit/api/queues/prod");
    }

    #[test]
    fn the_vhost_comes_from_the_amqp_url() {
        assert_eq!(vhost_of(&url("amqp://u:p@h:5672/%2f")), "/");
        assert_eq!(vhost_of(&url("amqp://u:p@h:5672")), "/");
        assert_eq!(
            vhost_of(&url("amqp://u:p@h:5672/sensor%20bucket")),
            "sensor bucket"
        );
    }

    #[test]
    fn credentials_of_the_management_url_win_then_those_of_the_amqp_url() {
        let amqp = url("amqp://mq-user:mq%40pw@h/%2f");
        assert_eq!(
            credentials(&url("http://admin:s3cr%3At@h:15672"), Some(&amqp)),
            ("admin".into(), "s3cr:t".into())
        );
        assert_eq!(
            credentials(&url("http://h:15672"), Some(&amqp)),
            ("mq-user".into(), "mq@pw".into())
        );
        assert_eq!(
            credentials(&url("http://h:15672"), None),
            ("guest".into(), "guest".into())
        );
    }

    #[test]
    fn only_worker_queues_count_and_missing_stats_are_unknown() {
        let id = Uuid::now_v7();
        let rows = vec![
            QueueRow {
                name: format!("worker_{id}"),
                messages_ready: Some(12),
            },
            QueueRow {
                name: "storage".into(),
                messages_ready: Some(99),
            },
            QueueRow {
                name: "worker_not-a-uuid".into(),
                messages_ready: Some(1),
            },
        ];
        let depths = depths_of(rows);
        assert_eq!(depths.by_worker.len(), 1);
        let depth = depths.get(WorkerId(id)).expect("the worker's queue");
        assert_eq!(
            depth,
            QueueDepth {
                ready: Some(12),
                consumers: 0
            }
        );
        let fresh = depths_of(vec![QueueRow {
            name: format!("worker_{id}"),
            messages_ready: None,
        }]);
        assert_eq!(fresh.get(WorkerId(id)).and_then(|d| d.ready), None);
    }

    #[test]
    fn a_reading_tells_the_scaler_what_is_known_of_each_queue() {
        let (known, fresh, absent) = (
            WorkerId(Uuid::now_v7()),
            WorkerId(Uuid::now_v7()),
            WorkerId(Uuid::now_v7()),
        );
        let reading = Reading::Depths(depths_of(vec![
            QueueRow {
                name: format!("worker_{known}"),
                messages_ready: Some(7),
            },
            QueueRow {
                name: format!("worker_{fresh}"),
                messages_ready: None,
            },
        ]));
        assert_eq!(reading.demand(known), Demand::Ready(7));
        assert_eq!(reading.demand(fresh), Demand::Unknown);
        assert_eq!(reading.demand(absent), Demand::NoQueue);
        let down = Reading::Unavailable("no answer".into());
        assert_eq!(down.demand(known), Demand::Unknown);
        assert_eq!(Reading::NotYet.demand(known), Demand::Unknown);
    }

    #[test]
    fn a_management_url_that_is_not_http_is_refused_by_name() {
        let err = QueueMonitor::new("amqp://h:5672", "amqp://h/%2f").expect_err("refused");
        assert!(err.to_string().contains("scale.management_url"), "{err}");
    }

    #[test]
    fn messages_never_carry_the_password() {
        let m = QueueMonitor::new("http://u:hunter2@h:15672", "amqp://h/%2f").expect("valid");
        assert_eq!(m.at, "h:15672");
        assert!(!m.queues_url.as_str().contains("hunter2"));
        assert!(!format!("{m:?}").contains("hunter2"));
    }
}
