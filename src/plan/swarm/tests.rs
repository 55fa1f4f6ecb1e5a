//! The Swarm planner's decisions, as a table: one hand-built snapshot per
//! case, the actions it must yield and the status it must show.

use super::*;
use crate::model::ScaleBounds;
use crate::model::{QueueDepth, SwarmNode, SwarmTask};
use crate::plan::fixtures::{COOLDOWN_MS, IMAGE_ID, NOW, disabled, id, policy, row, template};
use crate::plan::replicas::Lower;

/// A service exactly as the planner would create it for `row`.
fn service_for(row: &WorkerRow, replicas: u32, running: u64) -> ManagedService {
    let Intent::Run(w) = intent_of(row) else {
        panic!("row must be runnable")
    };
    let spec = service_spec(&template(), &w, IMAGE_ID);
    ManagedService {
        id: format!("svc{}", row.id.0.as_u128()),
        name: spec.name.clone(),
        version: 7,
        worker_id: Some(row.id),
        revision: Some(row.revision),
        spec_hash: Some(spec.hash()),
        replicas,
        running,
        desired_tasks: u64::from(replicas),
        rollout: Rollout::Settled,
    }
}

/// The service of `row` after Swarm rolled a later update back.
fn rolled_back(row: &WorkerRow) -> ManagedService {
    ManagedService {
        rollout: Rollout::RolledBack {
            message: "rollback completed".into(),
        },
        ..service_for(row, 1, 1)
    }
}

/// `s`, in which this daemon last asked Swarm to roll out `row`'s spec.
fn asked(row: &WorkerRow, mut s: ServiceSnapshot) -> ServiceSnapshot {
    let hash = service_for(row, 1, 1).spec_hash.expect("a hash");
    s.asked.insert(row.id, hash);
    s
}

fn snapshot(rows: Vec<WorkerRow>, services: Vec<ManagedService>) -> ServiceSnapshot {
    ServiceSnapshot {
        rows,
        services,
        image: ImageState::Present {
            id: IMAGE_ID.into(),
        },
        network: NetworkState::Present,
        scale: BTreeMap::new(),
        failures: BTreeMap::new(),
        busy: BTreeSet::new(),
        asked: BTreeMap::new(),
        task_errors: HashMap::new(),
        nodes: vec![],
        tasks: vec![],
        watched: BTreeSet::new(),
        depths: None,
        depths_unknown: "not read yet".into(),
        now_ms: NOW,
    }
}

fn swarm_node(n: u32, state: &str) -> SwarmNode {
    SwarmNode {
        id: format!("id{n}"),
        hostname: format!("node-{n}"),
        state: state.into(),
    }
}

/// A task of service `service` on node `n`, of the planner's image.
fn task_of(service: &str, n: u32, state: &str, error: &str, version: u64) -> SwarmTask {
    SwarmTask {
        service_id: service.into(),
        node_id: Some(format!("id{n}")),
        image: IMAGE_ID.into(),
        state: state.into(),
        error: (!error.is_empty()).then(|| error.to_string()),
        version,
    }
}

fn depths(n: u128, ready: u64) -> Option<QueueDepths> {
    Some(QueueDepths {
        by_worker: HashMap::from([(
            id(n),
            QueueDepth {
                ready: Some(ready),
                consumers: 1,
            },
        )]),
    })
}

fn scaled(r: WorkerRow, min: u32, max: u32) -> WorkerRow {
    WorkerRow {
        scale: ScaleBounds::new(min, max, 20).expect("valid bounds"),
        ..r
    }
}

/// What a case expects: each action as "kind target-suffix: reason
/// fragment", and the worker's status with a fragment of its text.
struct Case {
    name: &'static str,
    snapshot: ServiceSnapshot,
    actions: &'static [(&'static str, &'static str)],
    status: Option<(Status, &'static str)>,
    /// The replica count a create, update or scale asks for.
    replicas: Option<u32>,
}

fn replicas_asked(action: &ServiceAction) -> Option<u32> {
    match &action.step {
        ServiceStep::Create { service } | ServiceStep::Update { service, .. } => {
            Some(service.replicas)
        }
        ServiceStep::Scale { replicas, .. } => Some(*replicas),
        ServiceStep::Remove { .. } => None,
    }
}

fn cases() -> Vec<Case> {
    let r1 = row(1, 1);
    let r2 = row(1, 2);
    let mut cases = vec![
        Case {
            name: "a new worker gets a service with one replica",
            snapshot: snapshot(vec![r1.clone()], vec![]),
            actions: &[("create", "no service runs revision 1")],
            status: Some((Status::Unknown, "starting revision 1 in 1 replica(s)")),
            replicas: Some(1),
        },
        Case {
            name: "a settled service with all tasks running is ready",
            snapshot: snapshot(vec![r1.clone()], vec![service_for(&r1, 1, 1)]),
            actions: &[],
            status: Some((Status::Ready, "running revision 1 in 1 replica(s)")),
            replicas: None,
        },
        Case {
            name: "a new revision is a rolling update of the same service",
            snapshot: snapshot(vec![r2.clone()], vec![service_for(&r1, 1, 1)]),
            actions: &[("update", "revision 1 → 2")],
            status: Some((Status::Unknown, "revision 1 keeps serving")),
            replicas: Some(1),
        },
        Case {
            name: "nothing is changed while Swarm rolls out",
            snapshot: snapshot(
                vec![r2.clone()],
                vec![ManagedService {
                    rollout: Rollout::Updating,
                    ..service_for(&r2, 2, 1)
                }],
            ),
            actions: &[],
            status: Some((Status::Unknown, "(1 of 2 running)")),
            replicas: None,
        },
        Case {
            name: "a rolled-back revision is not tried again and says why",
            snapshot: asked(&r2, snapshot(vec![r2.clone()], vec![rolled_back(&r1)])),
            actions: &[],
            status: Some((
                Status::Error,
                "revision 2 does not start: Swarm rolled it back (rollback completed); revision 1 keeps serving",
            )),
            replicas: None,
        },
        Case {
            name: "a rollback of an older spec does not stop a new save",
            snapshot: asked(&r2, snapshot(vec![row(1, 3)], vec![rolled_back(&r1)])),
            actions: &[("update", "revision 1 → 3")],
            status: Some((Status::Unknown, "rolling out revision 3")),
            replicas: Some(1),
        },
        Case {
            name: "while Swarm rolls a failed spec back, it is not asked again",
            snapshot: asked(
                &r2,
                snapshot(
                    vec![r2.clone()],
                    vec![ManagedService {
                        rollout: Rollout::RollingBack {
                            message: "update rolled back due to failure".into(),
                        },
                        ..service_for(&r1, 1, 1)
                    }],
                ),
            ),
            actions: &[],
            status: Some((Status::Unknown, "Swarm rolls it back")),
            replicas: None,
        },
        Case {
            name: "a rollback that Swarm paused is an error, and no retry",
            snapshot: asked(
                &r2,
                snapshot(
                    vec![r2.clone()],
                    vec![ManagedService {
                        rollout: Rollout::Paused {
                            message: "rollback paused".into(),
                        },
                        ..service_for(&r1, 1, 0)
                    }],
                ),
            ),
            actions: &[],
            status: Some((Status::Error, "Swarm paused its rollback")),
            replicas: None,
        },
        Case {
            name: "a new save while Swarm rolls back an older one goes ahead",
            snapshot: asked(
                &r2,
                snapshot(
                    vec![row(1, 3)],
                    vec![ManagedService {
                        rollout: Rollout::RollingBack {
                            message: "update rolled back due to failure".into(),
                        },
                        ..service_for(&r1, 1, 1)
                    }],
                ),
            ),
            actions: &[("update", "revision 1 → 3")],
            status: Some((Status::Unknown, "rolling out revision 3")),
            replicas: Some(1),
        },
        Case {
            name: "a daemon that did not ask for the rolled-back spec tries it once more",
            snapshot: snapshot(vec![r2.clone()], vec![rolled_back(&r1)]),
            actions: &[("update", "revision 1 → 2")],
            status: Some((Status::Unknown, "rolling out revision 2")),
            replicas: Some(1),
        },
        Case {
            name: "a paused rollout is an error that names the way out",
            snapshot: snapshot(
                vec![r2.clone()],
                vec![ManagedService {
                    rollout: Rollout::Paused {
                        message: "update paused due to failure".into(),
                    },
                    ..service_for(&r2, 1, 0)
                }],
            ),
            actions: &[],
            status: Some((Status::Error, "save the worker again to retry")),
            replicas: None,
        },
        Case {
            name: "a task that keeps failing is an error in Swarm's words",
            snapshot: {
                let mut s = snapshot(vec![scaled(r1.clone(), 2, 2)], vec![service_for(&r1, 2, 1)]);
                s.task_errors
                    .insert("svc1".into(), "task: non-zero exit (4)".into());
                s
            },
            actions: &[],
            status: Some((Status::Error, "a task failed: task: non-zero exit (4)")),
            replicas: None,
        },
        Case {
            name: "tasks still starting are not an error",
            snapshot: snapshot(vec![scaled(r1.clone(), 2, 2)], vec![service_for(&r1, 2, 1)]),
            actions: &[],
            status: Some((Status::Unknown, "1 of 2 replica(s) running")),
            replicas: None,
        },
        Case {
            name: "a disabled worker's service is removed",
            snapshot: snapshot(vec![disabled(1)], vec![service_for(&r1, 1, 1)]),
            actions: &[("remove", "the worker is disabled")],
            status: Some((Status::Unknown, "disabled: removing service")),
            replicas: None,
        },
        Case {
            name: "a deleted worker's service is removed",
            snapshot: snapshot(vec![], vec![service_for(&r1, 1, 1)]),
            actions: &[("remove", "its worker no longer exists")],
            status: None,
            replicas: None,
        },
        Case {
            name: "an unlabelled service of the instance is an orphan",
            snapshot: snapshot(
                vec![],
                vec![ManagedService {
                    worker_id: None,
                    ..service_for(&r1, 1, 1)
                }],
            ),
            actions: &[("remove", "orphan")],
            status: None,
            replicas: None,
        },
        Case {
            name: "an invalid row keeps its service and says why",
            snapshot: snapshot(
                vec![WorkerRow {
                    language: "ruby".into(),
                    ..r1.clone()
                }],
                vec![service_for(&r1, 1, 1)],
            ),
            actions: &[],
            status: Some((Status::Error, "only 'python' workers can run")),
            replicas: None,
        },
        Case {
            name: "a busy worker is left alone, status too",
            snapshot: {
                let mut s = snapshot(vec![r2.clone()], vec![service_for(&r1, 1, 1)]);
                s.busy.insert(Slot::Worker(id(1)));
                s
            },
            actions: &[],
            status: None,
            replicas: None,
        },
        Case {
            name: "no image: an error, the service is left as it is",
            snapshot: ServiceSnapshot {
                image: ImageState::Missing,
                ..snapshot(vec![r2.clone()], vec![service_for(&r1, 1, 1)])
            },
            actions: &[],
            status: Some((Status::Error, "build it with scripts/build-images")),
            replicas: None,
        },
        Case {
            name: "a bridge network cannot carry services: say what to make",
            snapshot: ServiceSnapshot {
                network: NetworkState::LocalOnly {
                    driver: "bridge".into(),
                },
                ..snapshot(vec![r1.clone()], vec![])
            },
            actions: &[],
            status: Some((
                Status::Error,
                "docker network create -d overlay --attachable",
            )),
            replicas: None,
        },
        Case {
            name: "a backlog scales up at once (KEDA's ceil(ready / per-replica))",
            snapshot: ServiceSnapshot {
                depths: depths(1, 61),
                ..snapshot(
                    vec![scaled(r1.clone(), 1, 10)],
                    vec![service_for(&r1, 1, 1)],
                )
            },
            actions: &[("scale", "scale 1 → 4 replica(s)")],
            status: Some((Status::Ready, "running revision 1")),
            replicas: Some(4),
        },
        Case {
            name: "a backlog is clamped to max",
            snapshot: ServiceSnapshot {
                depths: depths(1, 20_000),
                ..snapshot(vec![scaled(r1.clone(), 1, 4)], vec![service_for(&r1, 1, 1)])
            },
            actions: &[("scale", "scale 1 → 4 replica(s)")],
            status: Some((Status::Ready, "running revision 1")),
            replicas: Some(4),
        },
        Case {
            name: "lower demand waits out the cooldown",
            snapshot: ServiceSnapshot {
                depths: depths(1, 0),
                scale: BTreeMap::from([(
                    id(1),
                    ScaleState {
                        desired: 4,
                        lower: Some(Lower {
                            since_ms: NOW - 1_000,
                            peak: 0,
                        }),
                    },
                )]),
                ..snapshot(vec![scaled(r1.clone(), 0, 4)], vec![service_for(&r1, 4, 4)])
            },
            actions: &[],
            status: Some((Status::Ready, "running revision 1 in 4 replica(s)")),
            replicas: None,
        },
        Case {
            name: "after the cooldown, min 0 scales to zero",
            snapshot: ServiceSnapshot {
                depths: depths(1, 0),
                scale: BTreeMap::from([(
                    id(1),
                    ScaleState {
                        desired: 4,
                        lower: Some(Lower {
                            since_ms: NOW - COOLDOWN_MS,
                            peak: 0,
                        }),
                    },
                )]),
                ..snapshot(vec![scaled(r1.clone(), 0, 4)], vec![service_for(&r1, 4, 4)])
            },
            actions: &[("scale", "scale 4 → 0 replica(s)")],
            status: Some((Status::Ready, "running revision 1 in 4 replica(s)")),
            replicas: Some(0),
        },
        Case {
            name: "a service at zero is ready and says how it wakes",
            snapshot: ServiceSnapshot {
                depths: depths(1, 0),
                scale: BTreeMap::from([(
                    id(1),
                    ScaleState {
                        desired: 0,
                        lower: None,
                    },
                )]),
                ..snapshot(vec![scaled(r1.clone(), 0, 4)], vec![service_for(&r1, 0, 0)])
            },
            actions: &[],
            status: Some((Status::Ready, "scaled to zero")),
            replicas: None,
        },
        Case {
            name: "one message brings a service at zero back",
            snapshot: ServiceSnapshot {
                depths: depths(1, 1),
                scale: BTreeMap::from([(
                    id(1),
                    ScaleState {
                        desired: 0,
                        lower: None,
                    },
                )]),
                ..snapshot(vec![scaled(r1.clone(), 0, 4)], vec![service_for(&r1, 0, 0)])
            },
            actions: &[("scale", "scale 0 → 1 replica(s)")],
            status: Some((Status::Ready, "scaled to zero")),
            replicas: Some(1),
        },
        Case {
            name: "without depths the count is held and the status says why",
            snapshot: snapshot(vec![scaled(r1.clone(), 1, 4)], vec![service_for(&r1, 3, 3)]),
            actions: &[],
            status: Some((
                Status::Ready,
                "queue depth unknown: not read yet; holding 3 replica(s)",
            )),
            replicas: None,
        },
        Case {
            name: "a rolled-back worker still scales with demand",
            snapshot: asked(
                &r2,
                ServiceSnapshot {
                    depths: depths(1, 45),
                    ..snapshot(vec![scaled(r2.clone(), 1, 4)], vec![rolled_back(&r1)])
                },
            ),
            actions: &[("scale", "scale 1 → 3 replica(s)")],
            status: Some((Status::Error, "Swarm rolled it back")),
            replicas: Some(3),
        },
    ];
    // The swarm's nodes: node-3 down, holding `r1`'s one task; or nodes
    // that lack the image.
    let on_nodes = |running: u64, down: bool, tasks: Vec<SwarmTask>| ServiceSnapshot {
        nodes: vec![
            swarm_node(1, "ready"),
            swarm_node(2, "ready"),
            swarm_node(3, if down { "down" } else { "ready" }),
        ],
        tasks,
        ..snapshot(vec![r1.clone()], vec![service_for(&r1, 1, running)])
    };
    let svc = service_for(&r1, 1, 1).id;
    let lost = || task_of(&svc, 3, "running", "", 5);
    let rejected = |n| task_of(&svc, n, "rejected", "No such image: sha256:image", 6);
    cases.extend([
        Case {
            name: "a node went down with the only task: say so while Swarm starts it again",
            snapshot: on_nodes(1, true, vec![lost()]),
            actions: &[],
            status: Some((
                Status::Unknown,
                "node(s) node-3 not ready, with 1 of its task(s): Swarm starts them again on \
                 the remaining nodes (0 of 1 replica(s) of revision 1 running)",
            )),
            replicas: None,
        },
        Case {
            name: "its task runs on another node again: ready, and the lost node named",
            snapshot: on_nodes(2, true, vec![lost(), task_of(&svc, 2, "running", "", 8)]),
            actions: &[],
            status: Some((Status::Ready, "they run on the other nodes now")),
            replicas: None,
        },
        Case {
            name: "the node is back: its old task no longer counts as lost",
            snapshot: on_nodes(1, false, vec![lost()]),
            actions: &[],
            status: Some((
                Status::Ready,
                "running revision 1 in 1 replica(s) of service",
            )),
            replicas: None,
        },
        Case {
            name: "the image is missing on two nodes and nothing runs: an error saying what to do",
            snapshot: on_nodes(0, false, vec![rejected(2), rejected(3)]),
            actions: &[],
            status: Some((
                Status::Error,
                "0 of 1 replica(s) of revision 1 running: the image \
                 workerctl/dockerworker:latest (sha256:image) is not on node(s) node-2, node-3",
            )),
            replicas: None,
        },
        Case {
            name: "the image is missing on two nodes, the task runs on the third: ready, but said",
            snapshot: on_nodes(
                1,
                false,
                vec![rejected(2), rejected(3), task_of(&svc, 1, "running", "", 9)],
            ),
            actions: &[],
            status: Some((
                Status::Ready,
                "; but the image workerctl/dockerworker:latest",
            )),
            replicas: None,
        },
    ]);
    // A failed update waits out its backoff, then is tried again.
    let failed = |at_ms: i64| {
        let mut s = snapshot(vec![r2.clone()], vec![service_for(&r1, 1, 1)]);
        s.failures.insert(
            Slot::Worker(id(1)),
            ActionFailure {
                kind: "update",
                target: s.services[0].name.clone(),
                attempts: 1,
                at_ms,
                error: "cannot update service: version out of sequence".into(),
            },
        );
        s
    };
    cases.push(Case {
        name: "a failed update waits out its backoff",
        snapshot: failed(NOW - 10),
        actions: &[],
        status: Some((Status::Error, "update of worker-")),
        replicas: None,
    });
    cases.push(Case {
        name: "after its backoff a failed update is tried again",
        snapshot: failed(NOW - 5_000),
        actions: &[("update", "revision 1 → 2")],
        status: Some((Status::Unknown, "rolling out revision 2")),
        replicas: Some(1),
    });
    cases
}

#[test]
fn the_swarm_planner_decides_per_worker_as_the_table_says() {
    for case in cases() {
        let plan = plan_services(&case.snapshot, &template(), &policy());
        let got: Vec<(&str, &str)> = plan
            .actions
            .iter()
            .map(|a| (a.kind(), a.reason.as_str()))
            .collect();
        assert_eq!(
            got.len(),
            case.actions.len(),
            "{}: actions {got:?}",
            case.name
        );
        for ((kind, reason), (want_kind, want_reason)) in got.iter().zip(case.actions) {
            assert_eq!(kind, want_kind, "{}: {got:?}", case.name);
            assert!(
                reason.contains(want_reason),
                "{}: reason {reason:?} lacks {want_reason:?}",
                case.name
            );
        }
        assert_eq!(
            plan.actions.first().and_then(replicas_asked),
            case.replicas,
            "{}: replicas asked",
            case.name
        );
        let verdict = plan.verdicts.iter().find(|v| v.id == id(1));
        match (case.status, verdict) {
            (None, None) => {}
            (Some((status, fragment)), Some(v)) => {
                assert_eq!(v.status, status, "{}: {}", case.name, v.info);
                assert!(
                    v.info.contains(fragment),
                    "{}: status {:?} lacks {fragment:?}",
                    case.name,
                    v.info
                );
            }
            (want, got) => panic!("{}: status {want:?}, got {got:?}", case.name),
        }
    }
}

#[test]
fn a_service_some_nodes_lack_the_image_of_is_watched_until_they_have_it() {
    let r1 = row(1, 1);
    let svc = service_for(&r1, 1, 1);
    let mut s = snapshot(vec![r1.clone()], vec![svc.clone()]);
    s.nodes = vec![swarm_node(1, "ready"), swarm_node(2, "ready")];
    s.tasks = vec![
        task_of(&svc.id, 2, "rejected", "No such image: sha256:image", 5),
        task_of(&svc.id, 1, "running", "", 6),
    ];
    let plan = plan_services(&s, &template(), &policy());
    assert_eq!(plan.watch, BTreeSet::from([svc.id.clone()]));
    // So it does while Swarm rolls it out.
    s.services[0].rollout = Rollout::Updating;
    assert_eq!(plan_services(&s, &template(), &policy()).watch, plan.watch);
    s.services[0].rollout = Rollout::Settled;
    // A busy worker's service stays watched.
    s.busy.insert(Slot::Worker(id(1)));
    s.watched = plan.watch.clone();
    assert_eq!(plan_services(&s, &template(), &policy()).watch, s.watched);
    // A task of the image ran on node-2 since.
    s.busy.clear();
    s.tasks.push(task_of(&svc.id, 2, "running", "", 7));
    let plan = plan_services(&s, &template(), &policy());
    assert!(plan.watch.is_empty(), "{:?}", plan.watch);
    assert!(
        !plan.verdicts[0].info.contains("image"),
        "{}",
        plan.verdicts[0].info
    );
}

#[test]
fn the_service_spec_is_replica_zeros_without_a_ready_url_and_hashes_alike() {
    let r = row(1, 1);
    let Intent::Run(w) = intent_of(&r) else {
        panic!("runnable")
    };
    let spec = service_spec(&template(), &w, IMAGE_ID);
    let container = template().spec(&w, IMAGE_ID, 0);
    assert_eq!(spec.ready_url, None);
    assert_eq!(spec.name, container.name);
    assert_eq!(
        spec.hash(),
        container.hash(),
        "switching backends needs no new revision to compare specs"
    );
}

#[test]
fn a_converging_service_is_looked_at_again_soon() {
    let r1 = row(1, 1);
    let plan = plan_services(
        &snapshot(vec![scaled(r1.clone(), 2, 2)], vec![service_for(&r1, 2, 1)]),
        &template(),
        &policy(),
    );
    assert_eq!(plan.wake_at_ms, Some(NOW + CONVERGE_POLL_MS));
    let settled = plan_services(
        &snapshot(vec![r1.clone()], vec![service_for(&r1, 1, 1)]),
        &template(),
        &policy(),
    );
    assert_eq!(settled.wake_at_ms, None, "an idle pass asks for no pass");
}

#[test]
fn a_task_on_its_way_out_is_not_counted_as_a_replica_and_is_looked_at_again() {
    let r1 = row(1, 1);
    let plan = plan_services(
        &snapshot(vec![r1.clone()], vec![service_for(&r1, 1, 2)]),
        &template(),
        &policy(),
    );
    let v = plan.verdicts.first().expect("a verdict");
    assert_eq!(v.status, Status::Ready);
    assert!(v.info.contains("in 1 replica(s)"), "{}", v.info);
    assert_eq!(plan.wake_at_ms, Some(NOW + CONVERGE_POLL_MS));
}

#[test]
fn observed_replicas_are_what_the_scaler_wants_and_what_runs() {
    let r1 = scaled(row(1, 1), 1, 4);
    let plan = plan_services(
        &ServiceSnapshot {
            depths: depths(1, 70),
            ..snapshot(vec![r1.clone()], vec![service_for(&r1, 2, 2)])
        },
        &template(),
        &policy(),
    );
    let o = plan.observed.first().expect("observed");
    assert_eq!((o.desired_replicas, o.running_replicas), (4, 2));
    assert_eq!(o.container_state, "service: 2/2 running");
    assert_eq!(o.running_revision, Some(Revision(1)));
    assert_eq!(plan.scale.get(&id(1)).map(|s| s.desired), Some(4));
}
