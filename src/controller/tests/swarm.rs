//! The same loop driving the Swarm reconciler, on an in-memory swarm
//! ([`FakeSwarm`]) with paused time: a slow worker holds up no other, a
//! failed update is retried with backoff, a rolled-back save is not asked
//! again, and an idle pass costs the same few calls whatever it finds.

use crate::reconcile::swarm::Services;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::sleep;
use tokio_util::sync::CancellationToken;

use super::super::{LoopSettings, run};
use crate::config::Config;
use crate::fakes::{FakeStore, FakeSwarm, row};
use crate::metrics::Metrics;
use crate::reconcile::{PassSettings, Reconciler};

struct Loop {
    wake: Arc<Notify>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Loop {
    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.expect("the loop ends");
    }

    async fn wake(&self) {
        self.wake.notify_one();
        settle().await;
    }
}

fn start(store: &Arc<FakeStore>, swarm: &Arc<FakeSwarm>) -> Loop {
    let wake = Arc::new(Notify::new());
    let reconciler = Reconciler::new(
        store.clone(),
        Services::new(swarm.clone()),
        PassSettings::from_config(&Config::default()),
        Arc::new(Metrics::new()),
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

async fn settle() {
    sleep(Duration::from_millis(10)).await;
}

#[tokio::test(start_paused = true)]
async fn each_worker_gets_a_service_and_a_slow_one_holds_up_no_other() {
    let store = FakeStore::with(vec![row(1, 1)]);
    let swarm = FakeSwarm::new();
    swarm.slow_create(1, Duration::from_secs(60));
    let l = start(&store, &swarm);
    settle().await;
    assert_eq!(swarm.service(1), None, "worker 1's create is in flight");

    store.rows.lock().expect("rows").push(row(2, 1));
    l.wake().await;
    assert_eq!(swarm.service(2), Some((1, 1)), "worker 2 did not wait");
    l.wake().await;
    assert_eq!(store.status_of(2).0, "ready");

    sleep(Duration::from_secs(61)).await;
    assert_eq!(swarm.service(1), Some((1, 1)));
    assert_eq!(swarm.calls("create"), 2, "one create each");
    l.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_new_revision_is_one_update_and_an_idle_pass_costs_three_calls() {
    let store = FakeStore::with(vec![row(1, 1), row(2, 1)]);
    let swarm = FakeSwarm::new();
    let l = start(&store, &swarm);
    settle().await;
    store.update(1, |r| r.revision.0 = 2);
    l.wake().await;
    l.wake().await;
    assert_eq!(swarm.service(1), Some((2, 1)));
    assert_eq!(swarm.calls("update"), 1);
    assert!(store.status_of(1).1.contains("running revision 2"));

    let calls = |what| swarm.calls(what);
    let (lists, images, networks) = (calls("list"), calls("image"), calls("network"));
    l.wake().await;
    assert_eq!(calls("list"), lists + 1, "one list for all services");
    assert_eq!(
        (calls("image"), calls("network")),
        (images + 1, networks + 1)
    );
    assert_eq!(
        calls("tasks"),
        0,
        "no task listing while every service is whole"
    );
    assert_eq!(calls("update") + calls("create"), 3, "nothing to do");
    l.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_failed_update_is_retried_with_backoff_not_on_every_wake_up() {
    let store = FakeStore::with(vec![row(1, 1)]);
    let swarm = FakeSwarm::new();
    let l = start(&store, &swarm);
    settle().await;
    swarm.fail_updates(2);
    store.update(1, |r| r.revision.0 = 2);
    for _ in 0..20 {
        l.wake().await;
    }
    assert_eq!(swarm.calls("update"), 1, "woken 20 times, tried once");
    let (status, info) = store.status_of(1);
    assert_eq!(status, "error");
    assert!(info.contains("retrying in"), "{info}");

    sleep(Duration::from_secs(4)).await;
    assert_eq!(swarm.calls("update"), 3);
    assert_eq!(swarm.service(1), Some((2, 1)));
    l.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_save_that_swarm_rolled_back_is_not_asked_again_until_the_next_save() {
    let store = FakeStore::with(vec![row(1, 1)]);
    let swarm = FakeSwarm::new();
    let l = start(&store, &swarm);
    settle().await;
    store.update(1, |r| {
        r.revision.0 = 2;
        r.entrypoint = "broken.main".into();
    });
    for _ in 0..10 {
        l.wake().await;
    }
    sleep(Duration::from_secs(30)).await;
    assert_eq!(swarm.calls("update"), 1, "asked once");
    assert_eq!(swarm.service(1), Some((1, 1)), "revision 1 serves");
    let (status, info) = store.status_of(1);
    assert_eq!(status, "error");
    assert!(
        info.contains("revision 2 does not start: Swarm rolled it back"),
        "{info}"
    );

    store.update(1, |r| {
        r.revision.0 = 3;
        r.entrypoint = "main.main".into();
    });
    l.wake().await;
    assert_eq!(swarm.service(1), Some((3, 1)));
    l.stop().await;
}
