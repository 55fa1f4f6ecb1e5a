//! The loop on in-memory fakes of the store and the runtime, with paused
//! tokio time: what wakes it, what it leaves alone, what it retries, how
//! it stops.

use crate::reconcile::containers::Containers;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::sleep;
use tokio_util::sync::CancellationToken;

use super::{LoopSettings, run};
use crate::config::Config;
use crate::fakes::{FakeRuntime, FakeStore, row};
use crate::metrics::Metrics;
use crate::model::{QueueDepth, QueueDepths};
use crate::readiness::ReadyReports;
use crate::reconcile::{PassSettings, Reconciler};

struct Loop {
    wake: Arc<Notify>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

fn start(store: &Arc<FakeStore>, runtime: &Arc<FakeRuntime>) -> Loop {
    let config = Config::default();
    let wake = Arc::new(Notify::new());
    let metrics = Arc::new(Metrics::new());
    let reports = Arc::new(ReadyReports::new(wake.clone()));
    let reconciler = Reconciler::new(
        store.clone(),
        Containers::new(runtime.clone(), reports, metrics.clone()),
        PassSettings::from_config(&config),
        metrics,
    );
    let settings = LoopSettings {
        resync: Duration::from_secs(3600),
        drain: Duration::from_secs(15),
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run(reconciler, wake.clone(), settings, shutdown.clone()));
    Loop {
        wake,
        shutdown,
        task,
    }
}

/// Lets the loop and its actions run until they wait on time again.
async fn settle() {
    sleep(Duration::from_millis(10)).await;
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_wake_ups_is_at_most_two_passes() {
    let store = FakeStore::with(vec![]);
    let l = start(&store, &FakeRuntime::new());
    settle().await;
    let before = store.loads();
    for _ in 0..100 {
        l.wake.notify_one();
    }
    settle().await;
    let passes = store.loads() - before;
    assert!((1..=2).contains(&passes), "{passes} passes for one burst");
    l.shutdown.cancel();
    l.task.await.expect("the loop ends");
}

#[tokio::test(start_paused = true)]
async fn a_worker_in_its_grace_period_holds_up_no_other() {
    let store = FakeStore::with(vec![row(1, 1)]);
    let runtime = FakeRuntime::new();
    runtime.slow_stop(1, Duration::from_secs(60));
    let l = start(&store, &runtime);
    settle().await;
    assert_eq!(runtime.running(1), [1]);

    store.update(1, |r| r.revision.0 = 2);
    l.wake.notify_one();
    settle().await;
    assert_eq!(runtime.running(1), [1, 2], "revision 1 is being stopped");

    store.rows.lock().expect("rows").push(row(2, 1));
    l.wake.notify_one();
    settle().await;
    assert_eq!(runtime.running(2), [1], "worker 2 did not wait");
    assert_eq!(runtime.running(1), [1, 2], "still in its grace period");

    sleep(Duration::from_secs(61)).await;
    assert_eq!(
        runtime.running(1),
        [2],
        "the stop ends and the loop goes on"
    );
    l.shutdown.cancel();
    l.task.await.expect("the loop ends");
}

#[tokio::test(start_paused = true)]
async fn a_failed_create_is_retried_with_backoff_not_on_every_wake_up() {
    let store = FakeStore::with(vec![row(1, 1)]);
    let runtime = FakeRuntime::new();
    runtime.fail_creates(2);
    let l = start(&store, &runtime);
    for _ in 0..20 {
        l.wake.notify_one();
        sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(runtime.creates(), 1, "woken 20 times, tried once");
    let (status, info) = store.status_of(1);
    assert_eq!(status, "error");
    assert!(info.contains("retrying in"), "{info}");

    // 1 s after the first failure, then 2 s after the second.
    sleep(Duration::from_secs(4)).await;
    assert_eq!(runtime.creates(), 3);
    assert_eq!(runtime.running(1), [1]);
    l.shutdown.cancel();
    l.task.await.expect("the loop ends");
}

#[tokio::test(start_paused = true)]
async fn shutdown_waits_for_the_actions_in_flight() {
    let store = FakeStore::with(vec![row(1, 1)]);
    let runtime = FakeRuntime::new();
    runtime.slow_stop(1, Duration::from_secs(3));
    let l = start(&store, &runtime);
    settle().await;
    store.update(1, |r| r.state = "disabled".into());
    l.wake.notify_one();
    settle().await;
    assert_eq!(runtime.running(1), [1], "the stop is in flight");

    l.shutdown.cancel();
    l.task.await.expect("the loop ends");
    assert!(
        runtime.running(1).is_empty(),
        "the loop ended only once the stop in flight completed"
    );
}

#[tokio::test(start_paused = true)]
async fn replicas_follow_the_queue_up_at_once_and_down_after_the_cooldown() {
    use crate::model::ScaleBounds;
    use crate::scale::depths::Reading;
    let mut worker = row(1, 1);
    worker.scale = ScaleBounds::new(1, 3, 20).expect("valid bounds");
    let store = FakeStore::with(vec![worker]);
    let runtime = FakeRuntime::new();
    let config = Config::default();
    let wake = Arc::new(Notify::new());
    let reading = |ready| {
        let q = QueueDepth {
            ready: Some(ready),
            consumers: 1,
        };
        Reading::Depths(QueueDepths {
            by_worker: [(row(1, 1).id, q)].into(),
        })
    };
    let (depths, readings) = tokio::sync::watch::channel(reading(50));
    let metrics = Arc::new(Metrics::new());
    let reports = Arc::new(ReadyReports::new(wake.clone()));
    let reconciler = Reconciler::new(
        store.clone(),
        Containers::new(runtime.clone(), reports, metrics.clone()),
        PassSettings::from_config(&config),
        metrics,
    )
    .reading_depths(readings);
    let settings = LoopSettings {
        resync: Duration::from_secs(3600),
        drain: Duration::from_secs(15),
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run(reconciler, wake.clone(), settings, shutdown.clone()));
    settle().await;
    assert_eq!(runtime.running(1), [1, 1, 1], "50 ready / 20 per replica");

    depths.send_replace(reading(0));
    wake.notify_one();
    settle().await;
    assert_eq!(runtime.running(1).len(), 3, "held during the cooldown");
    sleep(config.scale.cooldown + Duration::from_secs(1)).await;
    settle().await;
    assert_eq!(runtime.running(1), [1], "down to min after the cooldown");
    shutdown.cancel();
    task.await.expect("the loop ends");
}

mod swarm;
