//! Replicas: how many, and one replica at a time in a rollout.

use super::*;

/// Worker 1 at `revision`, between `min` and `max` replicas.
fn scaled(revision: i32, min: u32, max: u32) -> WorkerRow {
    WorkerRow {
        scale: crate::model::ScaleBounds::new(min, max, 20).expect("valid bounds"),
        ..row(1, revision)
    }
}

/// `ready` messages wait in worker 1's queue.
fn depth(s: &mut Snapshot, ready: u64) {
    let q = crate::model::QueueDepth {
        ready: Some(ready),
        consumers: 1,
    };
    s.depths = Some(QueueDepths {
        by_worker: HashMap::from([(id(1), q)]),
    });
}

/// A running replica of worker 1 (as `r` made it) that reported ready.
fn ready_replica(r: &WorkerRow, replica: u32, s: &mut Snapshot) {
    let c = replica_for(r, replica, RunState::Running);
    s.reports.insert(report_of(r, &c));
    s.containers.push(c);
}

/// Worker 1 at revision 2, two replicas, both running revision 1 and ready.
fn two_replicas_at_revision_1() -> Snapshot {
    let mut s = snapshot(vec![scaled(2, 2, 2)], vec![]);
    for k in 0..2 {
        ready_replica(&scaled(1, 2, 2), k, &mut s);
    }
    s
}

/// Replica 0's revision-2 container, beside its parked revision-1 one.
fn replica_0_rolled(s: &mut Snapshot, state: RunState, reported: bool) {
    let old = s.containers.remove(0);
    s.containers.push(parked(old));
    let new = replica_for(&scaled(2, 2, 2), 0, state);
    s.started_ms.insert(new.id.clone(), NOW - 1000);
    if reported {
        s.reports.insert(report_of(&scaled(2, 2, 2), &new));
    }
    s.containers.push(new);
}

struct ReplicaCase {
    name: &'static str,
    snapshot: fn() -> Snapshot,
    kinds: &'static [&'static str],
    /// The replica each action is for, in order.
    replicas: &'static [u32],
    status: Option<(Status, &'static str)>,
}

const REPLICA_CASES: &[ReplicaCase] = &[
    ReplicaCase {
        name: "defaults make exactly today's one container",
        snapshot: || snapshot(vec![row(1, 1)], vec![]),
        kinds: &["create"],
        replicas: &[0],
        status: Some((Status::Unknown, "starting revision 1")),
    },
    ReplicaCase {
        name: "defaults keep today's status text",
        snapshot: || {
            let mut s = snapshot(vec![row(1, 1)], vec![]);
            ready_replica(&row(1, 1), 0, &mut s);
            s
        },
        kinds: &[],
        replicas: &[],
        status: Some((Status::Ready, "running revision 1 in container worker-")),
    },
    ReplicaCase {
        name: "50 ready messages at 20 per replica make 3 replicas, created at once",
        snapshot: || {
            let mut s = snapshot(vec![scaled(1, 1, 3)], vec![]);
            depth(&mut s, 50);
            s
        },
        kinds: &["create", "create", "create"],
        replicas: &[0, 1, 2],
        status: Some((Status::Unknown, "starting revision 1")),
    },
    ReplicaCase {
        name: "all replicas ready: one status for them",
        snapshot: || {
            let mut s = snapshot(vec![scaled(1, 1, 3)], vec![]);
            for k in 0..3 {
                ready_replica(&scaled(1, 1, 3), k, &mut s);
            }
            depth(&mut s, 50);
            s
        },
        kinds: &[],
        replicas: &[],
        status: Some((Status::Ready, "running revision 1 in 3 replicas")),
    },
    ReplicaCase {
        name: "lower demand holds the replicas during the cooldown",
        snapshot: || {
            let mut s = snapshot(vec![scaled(1, 1, 3)], vec![]);
            for k in 0..3 {
                ready_replica(&scaled(1, 1, 3), k, &mut s);
            }
            depth(&mut s, 0);
            s.books.scale.insert(
                id(1),
                ScaleState {
                    desired: 3,
                    lower: Some(crate::plan::replicas::Lower {
                        since_ms: NOW - 1000,
                        peak: 1,
                    }),
                },
            );
            s
        },
        kinds: &[],
        replicas: &[],
        status: Some((Status::Ready, "running revision 1 in 3 replicas")),
    },
    ReplicaCase {
        name: "after the cooldown the extra replicas go, in parallel",
        snapshot: || {
            let mut s = snapshot(vec![scaled(1, 1, 3)], vec![]);
            for k in 0..3 {
                ready_replica(&scaled(1, 1, 3), k, &mut s);
            }
            depth(&mut s, 0);
            s.books.scale.insert(
                id(1),
                ScaleState {
                    desired: 3,
                    lower: Some(crate::plan::replicas::Lower {
                        since_ms: NOW - COOLDOWN_MS,
                        peak: 1,
                    }),
                },
            );
            s
        },
        kinds: &["remove", "remove"],
        replicas: &[1, 2],
        status: Some((Status::Ready, "running revision 1 in container worker-")),
    },
    ReplicaCase {
        name: "min 0 and an empty queue: no container, scaled to zero",
        snapshot: || {
            let mut s = snapshot(vec![scaled(1, 0, 3)], vec![]);
            depth(&mut s, 0);
            s
        },
        kinds: &[],
        replicas: &[],
        status: Some((Status::Ready, "scaled to zero: no messages wait")),
    },
    ReplicaCase {
        name: "depth unknown: the count is held, and the status says so",
        snapshot: || {
            let mut s = snapshot(vec![scaled(1, 1, 3)], vec![]);
            for k in 0..2 {
                ready_replica(&scaled(1, 1, 3), k, &mut s);
            }
            s
        },
        kinds: &[],
        replicas: &[],
        status: Some((Status::Ready, "queue depth unknown")),
    },
    ReplicaCase {
        name: "a new revision starts on replica 0 only",
        snapshot: two_replicas_at_revision_1,
        kinds: &["start-beside"],
        replicas: &[0],
        status: Some((Status::Unknown, "starting revision 2")),
    },
    ReplicaCase {
        name: "replica 1 waits while replica 0's new container is not ready",
        snapshot: || {
            let mut s = two_replicas_at_revision_1();
            replica_0_rolled(&mut s, RunState::Running, false);
            s
        },
        kinds: &[],
        replicas: &[],
        status: Some((Status::Unknown, "waiting for it to consume its queue")),
    },
    ReplicaCase {
        name: "replica 0 ready: its old container goes and replica 1 rolls",
        snapshot: || {
            let mut s = two_replicas_at_revision_1();
            replica_0_rolled(&mut s, RunState::Running, true);
            s
        },
        kinds: &["remove", "start-beside"],
        replicas: &[0, 1],
        status: Some((Status::Unknown, "starting revision 2")),
    },
    ReplicaCase {
        name: "a broken revision is given up on replica 0; replica 1 is never touched",
        snapshot: || {
            let mut s = two_replicas_at_revision_1();
            replica_0_rolled(&mut s, RunState::Exited(Some(1)), false);
            s
        },
        kinds: &["remove"],
        replicas: &[0],
        status: Some((Status::Error, "revision 2 does not start")),
    },
    ReplicaCase {
        name: "a revision given up stays given up for every replica",
        snapshot: || {
            let mut s = two_replicas_at_revision_1();
            s.books
                .failed_rollouts
                .insert(id(1), failed_rollout_of(&scaled(2, 2, 2)));
            s
        },
        kinds: &[],
        replicas: &[],
        status: Some((Status::Error, "revision 2 does not start")),
    },
    ReplicaCase {
        name: "a busy replica 1 does not block replica 0 (no status meanwhile)",
        snapshot: || {
            let mut s = snapshot(vec![scaled(1, 2, 2)], vec![]);
            s.busy.insert(Slot::Replica(id(1), 1));
            s
        },
        kinds: &["create"],
        replicas: &[0],
        status: None,
    },
];

#[test]
fn replica_decisions() {
    for case in REPLICA_CASES {
        let p = run(&(case.snapshot)());
        assert_eq!(kinds(&p), case.kinds, "{}: actions", case.name);
        let replicas: Vec<u32> = p
            .actions
            .iter()
            // A removal is an action of its own container: its replica
            // is the container's.
            .map(|a| match (&a.slot, &a.step) {
                (Slot::Replica(_, k), _) => *k,
                (Slot::Container(_), Step::Remove { container }) => container.replica,
                _ => u32::MAX,
            })
            .collect();
        assert_eq!(replicas, case.replicas, "{}: replicas", case.name);
        for a in &p.actions {
            if let Step::Create { spec } | Step::StartBeside { spec, .. } = &a.step {
                let Slot::Replica(_, k) = a.slot else {
                    unreachable!()
                };
                assert_eq!(spec.replica, k, "{}: spec of its replica", case.name);
                let base = format!("worker-{}", id(1));
                assert_eq!(spec.name, crate::model::replica_name(&base, k));
            }
        }
        let verdict = p.verdicts.iter().find(|v| v.id == id(1));
        match (case.status, verdict) {
            (None, None) => {}
            (Some((status, info)), Some(v)) => {
                assert_eq!(v.status, status, "{}: {}", case.name, v.info);
                assert!(
                    v.info.contains(info),
                    "{}: {:?} lacks {info:?}",
                    case.name,
                    v.info
                );
            }
            (want, got) => panic!("{}: status {want:?}, got {got:?}", case.name),
        }
    }
}

#[test]
fn replicas_share_one_spec_hash_and_replica_0_keeps_its_name() {
    let r = scaled(1, 1, 3);
    let (r0, r2) = (
        replica_for(&r, 0, RunState::Running),
        replica_for(&r, 2, RunState::Running),
    );
    assert_eq!(r0.spec_hash, r2.spec_hash);
    assert_eq!(r0.name, format!("worker-{}", id(1)));
    assert_eq!(r2.name, format!("worker-{}-r2", id(1)));
}

#[test]
fn a_disabled_worker_wants_no_replica_and_an_invalid_one_keeps_what_it_has() {
    let mut bad = row(2, 1);
    bad.language = "lua".into();
    let p = run(&snapshot(
        vec![disabled(1), bad, row(3, 1)],
        vec![container_for(&row(2, 1), RunState::Running)],
    ));
    let wanted: Vec<i32> = p.observed.iter().map(|o| o.desired_replicas).collect();
    assert_eq!(wanted, [0, 1, 1]);
}
