//! What worker containers said about themselves: the ready reports they
//! POST to `WORKER_READY_URL` once they consume their queue. The HTTP
//! handler records a report and wakes the loop; each pass hands the set to
//! the planner, which believes a report only if its token is the worker's
//! and it names a listed container of that spec.
//!
//! Held in memory, bounded: a restarted daemon learns readiness again from
//! the statuses it wrote and from health checks (see the planner). A report
//! whose token is not its worker's is dropped at the next pass and counted
//! (`workerctl_ready_reports_rejected_total`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::model::{ManagedContainer, RunState, WorkerId, WorkerRow};
use crate::plan::containers::ReadyReport;

/// The most reports kept; past that the oldest go (a flood of reports with
/// made-up names cannot grow the daemon without bound).
const CAPACITY: usize = 4096;

/// How long a report naming no listed container is kept: its container may
/// be being created right now.
const UNMATCHED_TTL: std::time::Duration = std::time::Duration::from_secs(120);

/// The ready reports received, shared by the HTTP server and the loop.
#[derive(Debug)]
pub struct ReadyReports {
    reports: Mutex<BTreeMap<ReadyReport, Instant>>,
    wake: Arc<Notify>,
}

impl ReadyReports {
    /// Reports that wake `wake` when one arrives.
    pub fn new(wake: Arc<Notify>) -> Self {
        ReadyReports {
            reports: Mutex::new(BTreeMap::new()),
            wake,
        }
    }

    /// Records a report and wakes the loop, unless the report was known
    /// already: the dockerworker repeats its report during its first minute
    /// (for a daemon that restarts or takes over meanwhile), and a repeat
    /// tells the planner nothing new, so it only refreshes the report's time.
    pub fn report(&self, report: ReadyReport) {
        let known = {
            let mut reports = self.lock();
            let known = reports.insert(report, Instant::now()).is_some();
            while reports.len() > CAPACITY {
                let oldest = reports
                    .iter()
                    .min_by_key(|(_, at)| **at)
                    .map(|(r, _)| r.clone());
                match oldest {
                    Some(r) => reports.remove(&r),
                    None => break,
                };
            }
            known
        };
        if !known {
            self.wake.notify_one();
        }
    }

    /// The reports that still mean something, given the containers listed
    /// at `listed_at`: a report of a container that list saw stopped is
    /// dropped (a restarted container must report again) unless it came in
    /// after the list was taken; a container just created, not yet started,
    /// keeps its report (it may report before the engine says it runs); and
    /// a report that has named no listed container for a while is dropped.
    pub fn current(
        &self,
        containers: &[ManagedContainer],
        listed_at: Instant,
    ) -> BTreeSet<ReadyReport> {
        let mut reports = self.lock();
        reports.retain(|report, at| {
            let listed = containers.iter().find(|c| report.is_of(c));
            match listed {
                Some(c) => !stopped(&c.state) || *at > listed_at,
                None => at.elapsed() < UNMATCHED_TTL,
            }
        });
        reports.keys().cloned().collect()
    }

    /// Drops every report naming a worker of `rows` with a token that is
    /// not that worker's, and returns them: such a report is never believed
    /// (the planner checks the token too), so it is not kept either. A
    /// report of a worker not in `rows` is left for [`current`](Self::current).
    pub(crate) fn drop_forged(&self, rows: &[WorkerRow]) -> Vec<ReadyReport> {
        let tokens: BTreeMap<WorkerId, &str> =
            rows.iter().map(|r| (r.id, r.code_token.as_str())).collect();
        let mut forged = Vec::new();
        self.lock().retain(|report, _| {
            let wrong = tokens
                .get(&report.worker)
                .is_some_and(|token| *token != report.token);
            if wrong {
                forged.push(report.clone());
            }
            !wrong
        });
        forged
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<ReadyReport, Instant>> {
        // A panic while holding this lock leaves a map that is still whole.
        self.reports
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Whether a container in `state` has stopped since it last ran.
fn stopped(state: &RunState) -> bool {
    matches!(state, RunState::Exited(_) | RunState::Other(_))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Health, WorkerId};
    use uuid::Uuid;

    fn report(name: &str) -> ReadyReport {
        ReadyReport {
            worker: WorkerId(Uuid::nil()),
            token: "t".into(),
            container: name.into(),
            spec_hash: "h".into(),
        }
    }

    fn container(name: &str, state: RunState) -> ManagedContainer {
        ManagedContainer {
            id: format!("id-{name}"),
            name: name.into(),
            worker_id: Some(WorkerId(Uuid::nil())),
            revision: None,
            spec_hash: Some("h".into()),
            replica: 0,
            image_id: String::new(),
            state,
            health: Health::None,
            dockerworker: true,
            created: 0,
            owner: Default::default(),
        }
    }

    #[tokio::test]
    async fn a_report_wakes_the_loop_and_is_kept_while_its_container_runs() {
        let wake = Arc::new(Notify::new());
        let reports = ReadyReports::new(wake.clone());
        reports.report(report("a"));
        wake.notified().await;
        let running = [container("a", RunState::Running)];
        assert_eq!(reports.current(&running, Instant::now()).len(), 1);
        let again = reports.current(&running, Instant::now());
        assert_eq!(again.len(), 1, "still there");
    }

    #[tokio::test(start_paused = true)]
    async fn a_repeated_report_does_not_wake_the_loop_again() {
        let wake = Arc::new(Notify::new());
        let reports = ReadyReports::new(wake.clone());
        reports.report(report("a"));
        wake.notified().await;
        reports.report(report("a"));
        let woken = tokio::time::timeout(std::time::Duration::from_secs(1), wake.notified());
        assert!(woken.await.is_err(), "a repeat is no news");
        reports.report(report("b"));
        wake.notified().await;
    }

    #[tokio::test]
    async fn a_report_of_a_stopped_container_is_forgotten() {
        let reports = ReadyReports::new(Arc::default());
        reports.report(report("a"));
        let exited = [container("a", RunState::Exited(Some(1)))];
        assert!(reports.current(&exited, Instant::now()).is_empty());
        let running = [container("a", RunState::Running)];
        assert!(
            reports.current(&running, Instant::now()).is_empty(),
            "a restarted container must report again"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_report_that_beats_the_list_or_the_start_is_kept() {
        let reports = ReadyReports::new(Arc::default());
        let listed_at = Instant::now();
        tokio::time::advance(std::time::Duration::from_millis(5)).await;
        reports.report(report("a"));
        let exited = [container("a", RunState::Exited(Some(1)))];
        assert_eq!(
            reports.current(&exited, listed_at).len(),
            1,
            "it came after the list that saw the container stopped"
        );
        let created = [container("a", RunState::Created)];
        assert_eq!(
            reports.current(&created, Instant::now()).len(),
            1,
            "the engine did not say yet that it runs"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_report_naming_no_container_is_kept_a_while_then_dropped() {
        let reports = ReadyReports::new(Arc::default());
        reports.report(report("soon"));
        assert_eq!(reports.current(&[], Instant::now()).len(), 1);
        tokio::time::advance(UNMATCHED_TTL).await;
        assert!(reports.current(&[], Instant::now()).is_empty());
    }

    #[test]
    fn a_report_with_another_token_than_its_workers_is_dropped_and_returned() {
        let reports = ReadyReports::new(Arc::default());
        let known = WorkerRow {
            code_token: "t".into(),
            ..crate::fakes::row(0, 1)
        };
        let (good, forged) = (
            report("good"),
            ReadyReport {
                token: "forged".into(),
                ..report("forged")
            },
        );
        let elsewhere = ReadyReport {
            worker: WorkerId(Uuid::from_u128(7)),
            token: "any".into(),
            ..report("elsewhere")
        };
        for r in [&good, &forged, &elsewhere] {
            reports.report(r.clone());
        }
        assert_eq!(reports.drop_forged(std::slice::from_ref(&known)), [forged]);
        assert!(reports.drop_forged(&[known]).is_empty(), "dropped once");
        let kept = reports.current(&[], Instant::now());
        assert_eq!(
            kept,
            [elsewhere, good].into_iter().collect(),
            "unknown workers wait"
        );
    }

    #[tokio::test]
    async fn the_book_is_bounded() {
        let reports = ReadyReports::new(Arc::default());
        for n in 0..CAPACITY + 10 {
            reports.report(report(&format!("c{n}")));
        }
        assert_eq!(reports.current(&[], Instant::now()).len(), CAPACITY);
    }
}
