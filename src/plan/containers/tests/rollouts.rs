//! Rollouts, readiness, exits and retries, and taking over from SensorBucket's controller: tables of decisions.

use super::*;

struct Case {
    name: &'static str,
    snapshot: fn() -> Snapshot,
    kinds: &'static [&'static str],
    /// The worker's status, and a part of its text; `None`: no verdict.
    status: Option<(Status, &'static str)>,
}

const CASES: &[Case] = &[
    Case {
        name: "a new revision starts beside the one that serves",
        snapshot: || {
            let r = row(1, 2);
            let mut s = snapshot(vec![r], vec![]);
            let old = ready_for(&row(1, 1), &mut s);
            s.containers.push(old);
            s
        },
        kinds: &["start-beside"],
        status: Some((
            Status::Unknown,
            "starting revision 2; revision 1 keeps serving",
        )),
    },
    Case {
        name: "the old revision serves while the new one is not ready",
        snapshot: || rollout(|r, s| drop(new_container(r, s, RunState::Running, 1000))),
        kinds: &[],
        status: Some((
            Status::Unknown,
            "waiting for it to consume its queue; revision 1 keeps serving",
        )),
    },
    Case {
        name: "a new revision that reports ready retires the old one",
        snapshot: || {
            rollout(|r, s| {
                let c = new_container(r, s, RunState::Running, 1000);
                s.reports.insert(report_of(r, &c));
            })
        },
        kinds: &["remove"],
        status: Some((Status::Ready, "running revision 2")),
    },
    Case {
        name: "a new revision whose health check passes retires the old one",
        snapshot: || {
            rollout(|r, s| {
                new_container(r, s, RunState::Running, 1000);
                s.containers[1].health = Health::Healthy;
            })
        },
        kinds: &["remove"],
        status: Some((Status::Ready, "running revision 2")),
    },
    Case {
        name: "a report with another worker's token is not believed",
        snapshot: || {
            rollout(|r, s| {
                let c = new_container(r, s, RunState::Running, 1000);
                let mut forged = report_of(r, &c);
                forged.token = "token2".into();
                s.reports.insert(forged);
            })
        },
        kinds: &[],
        status: Some((Status::Unknown, "waiting for it to consume its queue")),
    },
    Case {
        name: "a new revision that exits goes, the old one keeps serving",
        snapshot: || {
            rollout(|r, s| {
                let c = new_container(r, s, RunState::Exited(Some(4)), 1000);
                s.last_words.insert(
                    c.id,
                    "code_invalid: syntax error in usercode.py line 3: expected ':'".into(),
                );
            })
        },
        kinds: &["remove"],
        status: Some((
            Status::Error,
            "revision 2 does not start: code_invalid: syntax error in usercode.py line 3: \
             expected ':'; revision 1 keeps serving",
        )),
    },
    Case {
        name: "a new revision not ready in time goes, the old one keeps serving",
        snapshot: || rollout(|r, s| drop(new_container(r, s, RunState::Running, READY_TIMEOUT_MS))),
        kinds: &["remove"],
        status: Some((
            Status::Error,
            "revision 2 does not start: not consuming its queue 30s after it started; \
             revision 1 keeps serving",
        )),
    },
    Case {
        name: "a failed revision is not tried again while the old one serves",
        snapshot: || {
            let mut s = rollout(|_, _| {});
            s.books
                .failed_rollouts
                .insert(id(1), failed_rollout_of(&row(1, 2)));
            s
        },
        kinds: &[],
        status: Some((
            Status::Error,
            "revision 2 does not start: boom; revision 1 keeps serving",
        )),
    },
    Case {
        name: "a new save after a failed revision tries again",
        snapshot: || {
            let mut s = rollout(|_, _| {});
            s.rows = vec![row(1, 3)];
            s.books
                .failed_rollouts
                .insert(id(1), failed_rollout_of(&row(1, 2)));
            s
        },
        kinds: &["create"],
        status: Some((
            Status::Unknown,
            "starting revision 3; revision 1 keeps serving",
        )),
    },
    Case {
        name: "an image without a health check is taken as ready after a while",
        snapshot: || {
            rollout(|r, s| {
                new_container(r, s, RunState::Running, ASSUME_READY_MS);
                s.containers[1].health = Health::None;
            })
        },
        kinds: &["remove"],
        status: Some((Status::Ready, "running revision 2")),
    },
    Case {
        name: "a restarted daemon adopts a lone container whose status says ready",
        snapshot: || {
            let mut r = row(1, 1);
            r.status = "ready".into();
            snapshot(vec![r.clone()], vec![container_for(&r, RunState::Running)])
        },
        kinds: &[],
        status: Some((Status::Ready, "running revision 1")),
    },
    Case {
        name: "a lone container that never consumes is an error, left running",
        snapshot: || {
            let r = row(1, 1);
            let mut s = snapshot(vec![r.clone()], vec![]);
            new_container(&r, &mut s, RunState::Running, READY_TIMEOUT_MS);
            s
        },
        kinds: &[],
        status: Some((
            Status::Error,
            "does not consume its queue 30s after it started",
        )),
    },
    Case {
        name: "invalid code with no older revision waits for a fix",
        snapshot: || {
            let r = row(1, 1);
            let c = container_for(&r, RunState::Exited(Some(4)));
            let mut s = snapshot(vec![r], vec![c.clone()]);
            s.last_words.insert(c.id, "code_invalid: bad".into());
            s
        },
        kinds: &[],
        status: Some((
            Status::Error,
            "exited with code 4 (code invalid): code_invalid: bad; waiting for a fix",
        )),
    },
    Case {
        name: "another image's exit code 4 is restarted with backoff",
        snapshot: || {
            let r = row(1, 1);
            let mut c = container_for(&r, RunState::Exited(Some(4)));
            c.dockerworker = false;
            snapshot(vec![r], vec![c])
        },
        kinds: &[],
        status: Some((
            Status::Error,
            "exited with code 4 (0 restart(s) so far); next restart in 1s",
        )),
    },
    Case {
        name: "a busy worker is left alone, status included",
        snapshot: || {
            let mut s = snapshot(
                vec![row(1, 2)],
                vec![container_for(&row(1, 1), RunState::Running)],
            );
            s.busy.insert(Slot::Replica(id(1), 0));
            s
        },
        kinds: &[],
        status: None,
    },
    Case {
        name: "a failed action waits for its retry backoff",
        snapshot: || {
            let mut s = snapshot(vec![row(1, 1)], vec![]);
            s.failures
                .insert(Slot::Replica(id(1), 0), failure("create", 2, NOW - 500));
            s
        },
        kinds: &[],
        status: Some((Status::Error, "create of worker-")),
    },
    Case {
        name: "a failed action is retried once its backoff elapsed",
        snapshot: || {
            let mut s = snapshot(vec![row(1, 1)], vec![]);
            s.failures
                .insert(Slot::Replica(id(1), 0), failure("create", 2, NOW - 2000));
            s
        },
        kinds: &["create"],
        status: Some((Status::Unknown, "starting revision 1")),
    },
    Case {
        name: "another action goes ahead despite a failure",
        snapshot: || {
            let mut s = snapshot(
                vec![disabled(1)],
                vec![container_for(&row(1, 1), RunState::Running)],
            );
            s.failures
                .insert(Slot::Replica(id(1), 0), failure("create", 5, NOW));
            s
        },
        kinds: &["remove"],
        status: Some((Status::Unknown, "disabled: stopping container")),
    },
];

/// Worker 1's container as SensorBucket's own controller left it: named
/// `worker-<id>`, revision `revision`, no spec hash, no health check,
/// running for a long time.
fn sensorbucket_container(revision: i32) -> ManagedContainer {
    ManagedContainer {
        id: format!("sb{revision}"),
        name: format!("worker-{}", id(1)),
        worker_id: Some(id(1)),
        revision: Some(Revision(revision)),
        spec_hash: None,
        replica: 0,
        image_id: "sha256:sensorbucket".into(),
        state: RunState::Running,
        health: Health::None,
        dockerworker: false,
        created: 1,
        owner: Owner::SensorBucket,
    }
}

/// Rapid saves: revision 1 serves (parked, ready), revision 2 was started
/// and never became ready, and the row is at revision 3. `parked_2`: the
/// start-beside of revision 3 already moved revision 2 out of the name.
fn superseded(parked_2: bool) -> Snapshot {
    let mut s = rollout(|r, s| drop(new_container(r, s, RunState::Running, 100)));
    if parked_2 {
        s.containers[1] = parked(s.containers[1].clone());
    }
    s.rows = vec![row(1, 3)];
    s
}

const RAPID_SAVES: &[Case] = &[
    Case {
        name: "a save while the last one starts moves that one aside, not the one that serves",
        snapshot: || superseded(false),
        kinds: &["start-beside"],
        status: Some((
            Status::Unknown,
            "starting revision 3; revision 1 keeps serving",
        )),
    },
    Case {
        name: "a revision superseded before it was ready goes at once",
        snapshot: || {
            let mut s = superseded(true);
            new_container(&row(1, 3), &mut s, RunState::Running, 10);
            s
        },
        kinds: &["remove"],
        status: Some((
            Status::Unknown,
            "waiting for it to consume its queue; revision 1 keeps serving",
        )),
    },
    Case {
        name: "once the newest is ready every older container goes together",
        snapshot: || {
            let mut s = superseded(true);
            let c = new_container(&row(1, 3), &mut s, RunState::Running, 10);
            s.reports.insert(report_of(&row(1, 3), &c));
            s
        },
        kinds: &["remove", "remove"],
        status: Some((Status::Ready, "running revision 3")),
    },
    Case {
        name: "a container already being removed is not removed twice, nor waited for",
        snapshot: || {
            let mut s = superseded(true);
            s.busy.insert(Slot::Container(s.containers[1].id.clone()));
            new_container(&row(1, 3), &mut s, RunState::Running, 10);
            s
        },
        kinds: &[],
        status: Some((Status::Unknown, "revision 1 keeps serving")),
    },
    Case {
        name: "the name holder being removed is waited for",
        snapshot: || {
            let mut s = superseded(false);
            s.busy.insert(Slot::Container(s.containers[1].id.clone()));
            s
        },
        kinds: &[],
        status: Some((Status::Unknown, "waiting for")),
    },
    Case {
        name: "SensorBucket's controller's container is replaced start-first",
        snapshot: || snapshot(vec![row(1, 2)], vec![sensorbucket_container(1)]),
        kinds: &["start-beside"],
        status: Some((Status::Unknown, "SensorBucket's controller's container")),
    },
    Case {
        name: "SensorBucket's controller's container serves until workerctl's is ready",
        snapshot: || {
            let r = row(1, 2);
            let mut s = snapshot(vec![r.clone()], vec![parked(sensorbucket_container(1))]);
            new_container(&r, &mut s, RunState::Running, 10);
            s
        },
        kinds: &[],
        status: Some((Status::Unknown, "keeps serving until then")),
    },
    Case {
        name: "SensorBucket's controller's container goes once workerctl's is ready",
        snapshot: || {
            let r = row(1, 2);
            let mut s = snapshot(vec![r.clone()], vec![parked(sensorbucket_container(1))]);
            let c = new_container(&r, &mut s, RunState::Running, 10);
            s.reports.insert(report_of(&r, &c));
            s
        },
        kinds: &["remove"],
        status: Some((Status::Ready, "running revision 2")),
    },
    Case {
        name: "SensorBucket's controller's container of a worker not in the store is never touched",
        snapshot: || snapshot(vec![], vec![sensorbucket_container(1)]),
        kinds: &[],
        status: None,
    },
    Case {
        name: "a disabled worker's containers all go at once, SensorBucket's too",
        snapshot: || {
            let mut c = container_for(&row(1, 1), RunState::Running);
            c.id = "ours".into();
            c.name = "worker-x-old".into();
            snapshot(vec![disabled(1)], vec![c, sensorbucket_container(1)])
        },
        kinds: &["remove", "remove"],
        status: Some((Status::Unknown, "disabled: stopping container")),
    },
];

#[test]
fn rapid_saves_and_takeover_decisions() {
    check(RAPID_SAVES);
}

#[test]
fn when_none_is_known_to_serve_the_oldest_running_stays_until_the_newest_is_ready() {
    // Revision 1 consumes, but a save came before its ready report did.
    let mut s = superseded(true);
    s.reports.clear();
    let newest = new_container(&row(1, 3), &mut s, RunState::Running, 10);
    let p = run(&s);
    assert_eq!(kinds(&p), ["remove"]);
    let Step::Remove { container } = &p.actions[0].step else {
        panic!("a remove")
    };
    assert_eq!(container.revision, Some(Revision(2)), "revision 1 stays");
    s.reports.insert(report_of(&row(1, 3), &newest));
    assert_eq!(kinds(&run(&s)), ["remove", "remove"], "then both go");
}

#[test]
fn superseded_containers_are_removed_in_slots_of_their_own() {
    let mut s = superseded(true);
    let c = new_container(&row(1, 3), &mut s, RunState::Running, 10);
    s.reports.insert(report_of(&row(1, 3), &c));
    let p = run(&s);
    let slots: Vec<&Slot> = p.actions.iter().map(|a| &a.slot).collect();
    assert_eq!(
        slots,
        [
            &Slot::Container(s.containers[0].id.clone()),
            &Slot::Container(s.containers[1].id.clone())
        ]
    );
}

#[test]
fn with_takeover_off_sensorbucket_containers_are_left_alone_and_named() {
    let s = snapshot(vec![row(1, 2)], vec![sensorbucket_container(1)]);
    let p = plan(
        &s,
        &template(),
        &Policy {
            takeover: false,
            ..policy()
        },
    );
    assert_eq!(kinds(&p), ["create"], "never touches theirs");
    let v = status_of(&p, 1);
    assert_eq!(v.status, Status::Error);
    assert!(
        v.info.contains(&format!("docker rm -f worker-{}", id(1)))
            && v.info.contains("docker.takeover = true"),
        "{}",
        v.info
    );
}

#[test]
fn a_controller_that_makes_its_container_again_is_reported_not_fought() {
    let r = row(1, 2);
    let mut again = sensorbucket_container(1);
    again.id = "sb-again".into();
    again.created = NOW / 1000 + 1;
    let mut s = snapshot(vec![r.clone()], vec![again]);
    ready_for(&r, &mut s);
    let ours = container_for(&r, RunState::Running);
    s.reports.insert(report_of(&r, &ours));
    s.containers.push(ours);
    s.books.takeovers.insert(
        id(1),
        Takeover {
            removed_at_ms: NOW - 5_000,
            container_id: "sb1".into(),
            container: format!("worker-{}-old-sb1", id(1)),
            revision: Some(Revision(1)),
            recreated: None,
        },
    );
    let p = run(&s);
    assert!(kinds(&p).is_empty(), "{:?}", p.actions);
    let v = status_of(&p, 1);
    assert_eq!(v.status, Status::Error);
    assert!(
        v.info.contains("SensorBucket's controller still runs"),
        "{}",
        v.info
    );
    assert!(p.books.takeovers[&id(1)].recreated.is_some());
}

#[test]
fn a_worker_taken_over_says_so_once_ready() {
    let r = row(1, 2);
    let mut s = snapshot(vec![r.clone()], vec![]);
    let c = ready_for(&r, &mut s);
    s.containers.push(c);
    s.books.takeovers.insert(
        id(1),
        Takeover {
            removed_at_ms: NOW - 5_000,
            container_id: "sb1".into(),
            container: "worker-x-old-sb1".into(),
            revision: Some(Revision(1)),
            recreated: None,
        },
    );
    let v = run(&s).verdicts.remove(0);
    assert_eq!(v.status, Status::Ready);
    assert!(
        v.info
            .contains("took over from SensorBucket's controller (its container worker-x-old-sb1 ran revision 1)"),
        "{}",
        v.info
    );
}

fn check(cases: &[Case]) {
    for case in cases {
        let p = run(&(case.snapshot)());
        assert_eq!(kinds(&p), case.kinds, "{}: actions", case.name);
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
fn rollout_readiness_exit_and_retry_decisions() {
    check(CASES);
}

#[test]
fn a_rollout_that_fails_is_booked_with_its_reason() {
    let s = rollout(|r, s| {
        let c = new_container(r, s, RunState::Exited(Some(1)), 10);
        s.last_words.insert(c.id, "internal_error: boom".into());
    });
    let p = run(&s);
    let booked = &p.books.failed_rollouts[&id(1)];
    assert_eq!(
        (booked.revision, booked.why.as_str()),
        (Revision(2), "internal_error: boom")
    );
    let Step::Remove { container } = &p.actions[0].step else {
        panic!("the failed container goes")
    };
    assert_eq!(
        container.revision,
        Some(Revision(2)),
        "never the one that serves"
    );
}

#[test]
fn waiting_for_readiness_wakes_at_the_deadline_or_the_assumption() {
    let checking = rollout(|r, s| drop(new_container(r, s, RunState::Running, 1000)));
    assert_eq!(
        run(&checking).wake_at_ms,
        Some(NOW - 1000 + READY_TIMEOUT_MS)
    );
    let unchecked = rollout(|r, s| {
        new_container(r, s, RunState::Running, 1000);
        s.containers[1].health = Health::None;
    });
    assert_eq!(
        run(&unchecked).wake_at_ms,
        Some(NOW - 1000 + ASSUME_READY_MS)
    );
}

#[test]
fn a_failed_action_wakes_the_loop_when_it_may_be_retried() {
    let mut s = snapshot(vec![row(1, 1)], vec![]);
    s.failures
        .insert(Slot::Replica(id(1), 0), failure("create", 2, NOW - 500));
    let p = run(&s);
    assert_eq!(
        p.wake_at_ms,
        Some(NOW + 1500),
        "1s · 2^(2-1) after the failure"
    );
    assert!(
        status_of(&p, 1).info.contains("retrying in 1s (attempt 3)"),
        "{}",
        status_of(&p, 1).info
    );
}

#[test]
fn a_busy_worker_keeps_its_books() {
    let mut s = snapshot(vec![row(1, 1)], vec![]);
    s.busy.insert(Slot::Replica(id(1), 0));
    s.books
        .failed_rollouts
        .insert(id(1), failed_rollout_of(&row(1, 2)));
    s.books.scale.insert(id(1), ScaleState::adopt(1));
    assert_eq!(run(&s).books, s.books);
}

#[test]
fn a_busy_orphan_is_not_removed_twice() {
    let mut c = container_for(&row(1, 1), RunState::Exited(None));
    c.worker_id = None;
    let mut s = snapshot(vec![], vec![c.clone()]);
    s.busy.insert(Slot::Container(c.id));
    assert!(run(&s).actions.is_empty());
}

#[test]
fn a_deleted_workers_containers_go_all_at_once() {
    let a = container_for(&row(1, 1), RunState::Running);
    let mut b = a.clone();
    b.id = "other".into();
    let p = run(&snapshot(vec![], vec![a, b]));
    assert_eq!(kinds(&p), ["remove", "remove"]);
    let slots: BTreeSet<&Slot> = p.actions.iter().map(|a| &a.slot).collect();
    assert_eq!(slots.len(), 2, "each removal is an action of its own");
}

#[test]
fn every_worker_is_observed() {
    let r = row(1, 1);
    let p = run(&snapshot(
        vec![r.clone(), row(2, 1)],
        vec![container_for(&r, RunState::Exited(Some(3)))],
    ));
    let states: Vec<&str> = p
        .observed
        .iter()
        .map(|o| o.container_state.as_str())
        .collect();
    assert_eq!(states, ["exited (3)", "absent"]);
}

#[test]
fn a_container_made_again_within_the_same_second_still_counts() {
    let r = row(1, 2);
    let mut again = sensorbucket_container(1);
    again.id = "sb-again".into();
    // Removed at 999.9 s; made again at 999.95 s, which the engine lists as 999.
    again.created = 999;
    let mut s = snapshot(vec![r], vec![again]);
    s.books.takeovers.insert(
        id(1),
        Takeover {
            removed_at_ms: 999_900,
            container_id: "sb1".into(),
            container: "worker-x-old-sb1".into(),
            revision: Some(Revision(1)),
            recreated: None,
        },
    );
    let p = run(&s);
    assert_eq!(
        p.books.takeovers[&id(1)].recreated.as_deref(),
        Some(format!("worker-{}", id(1)).as_str())
    );
}
