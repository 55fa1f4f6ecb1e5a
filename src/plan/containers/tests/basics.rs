//! Workers and their containers: create, replace, remove, crash, back off, and the errors a pass reports.

use super::*;

#[test]
fn debugging_puts_the_adapter_in_the_spec_and_turning_it_off_replaces_the_container() {
    let debugged = WorkerRow {
        debug: true,
        ..row(1, 1)
    };
    let Intent::Run(plain_worker) = intent_of(&row(1, 1)) else {
        unreachable!()
    };
    let Intent::Run(debug_worker) = intent_of(&debugged) else {
        unreachable!()
    };
    let plain = template().spec(&plain_worker, IMAGE_ID, 0);
    let debug = template().spec(&debug_worker, IMAGE_ID, 0);
    assert!(
        !plain.env.contains_key("WORKER_DEBUG"),
        "never without --debug"
    );
    assert_eq!(debug.env["WORKER_DEBUG"], "1");
    assert_ne!(plain.hash(), debug.hash());
    // A running debug container of the same revision is replaced once
    // debugging is off, as for any change of spec.
    let running = container_for(&debugged, RunState::Running);
    let p = run(&snapshot(vec![row(1, 1)], vec![running]));
    assert_eq!(kinds(&p), ["start-beside"], "{:?}", p.actions);
}

#[test]
fn enabled_worker_without_container_is_created() {
    let p = run(&snapshot(vec![row(1, 1)], vec![]));
    assert_eq!(kinds(&p), ["create"]);
    let Step::Create { spec } = &p.actions[0].step else {
        unreachable!()
    };
    assert_eq!(spec.name, format!("worker-{}", id(1)));
    assert_eq!(
        spec.env["CODE_URL"],
        format!("http://ctl:3000/{}/source?token=token1", id(1))
    );
    assert_eq!(spec.env["WORKER_REVISION"], "1");
    assert_eq!(
        spec.ready_url.as_deref(),
        Some(
            format!(
                "http://ctl:3000/{}/ready?token=token1&container=worker-{}&spec={}",
                id(1),
                id(1),
                spec.hash()
            )
            .as_str()
        )
    );
    let v = status_of(&p, 1);
    assert_eq!(
        (v.status, v.info.as_str()),
        (Status::Unknown, "starting revision 1")
    );
}

#[test]
fn container_gets_the_contract_environment() {
    let p = run(&snapshot(vec![row(1, 1)], vec![]));
    let Step::Create { spec } = &p.actions[0].step else {
        unreachable!()
    };
    for key in [
        "WORKER_ID",
        "AMQP_HOST",
        "AMQP_XCHG",
        "CODE_URL",
        "CODE_ENTRYPOINT",
        "ENDPOINT_DEVICES",
        "CODE_SHA256",
    ] {
        assert!(spec.env.contains_key(key), "{key} missing");
    }
    assert_eq!(spec.env["AMQP_XCHG"], "pipeline.messages");
}

#[test]
fn workers_on_the_host_network_get_a_free_health_port() {
    let p = run(&snapshot(vec![row(1, 1)], vec![]));
    let Step::Create { spec } = &p.actions[0].step else {
        unreachable!()
    };
    assert_eq!(spec.env["WORKER_HEALTH_PORT"], "0");
}

#[test]
fn converged_worker_needs_nothing_and_is_ready() {
    let r = row(1, 1);
    let mut s = snapshot(vec![r.clone()], vec![]);
    let c = ready_for(&r, &mut s);
    s.containers.push(c);
    let p = run(&s);
    assert!(p.actions.is_empty());
    assert_eq!(status_of(&p, 1).status, Status::Ready);
}

#[test]
fn revision_bump_replaces_the_container() {
    let old = container_for(&row(1, 1), RunState::Running);
    let p = run(&snapshot(vec![row(1, 2)], vec![old]));
    assert_eq!(kinds(&p), ["start-beside"]);
    assert_eq!(p.actions[0].reason, "revision 1 → 2");
}

#[test]
fn lower_revision_than_running_also_replaces() {
    let newer = container_for(&row(1, 5), RunState::Running);
    let p = run(&snapshot(vec![row(1, 3)], vec![newer]));
    assert_eq!(kinds(&p), ["start-beside"]);
    assert_eq!(p.actions[0].reason, "revision 5 → 3");
}

#[test]
fn spec_change_replaces_the_container() {
    let r = row(1, 1);
    let mut c = container_for(&r, RunState::Running);
    c.spec_hash = Some("stale".into());
    let p = run(&snapshot(vec![r], vec![c]));
    assert_eq!(kinds(&p), ["start-beside"]);
    assert!(p.actions[0].reason.contains("spec changed"));
}

#[test]
fn rebuilt_image_replaces_the_container() {
    let r = row(1, 1);
    let c = container_for(&r, RunState::Running);
    let mut s = snapshot(vec![r], vec![c]);
    s.image = ImageState::Present {
        id: "sha256:rebuilt".into(),
    };
    assert_eq!(kinds(&run(&s)), ["start-beside"]);
}

#[test]
fn stopped_worker_with_new_revision_is_replaced() {
    let old = container_for(&row(1, 1), RunState::Exited(Some(0)));
    assert_eq!(
        kinds(&run(&snapshot(vec![row(1, 2)], vec![old]))),
        ["start-beside"]
    );
}

#[test]
fn disabled_worker_container_is_removed() {
    let c = container_for(&row(1, 1), RunState::Running);
    let p = run(&snapshot(vec![disabled(1)], vec![c]));
    assert_eq!(kinds(&p), ["remove"]);
    assert_eq!(p.actions[0].reason, "the worker is disabled");
    assert_eq!(status_of(&p, 1).status, Status::Unknown);
}

#[test]
fn exited_container_of_disabled_worker_is_removed() {
    let c = container_for(&row(1, 1), RunState::Exited(Some(1)));
    assert_eq!(
        kinds(&run(&snapshot(vec![disabled(1)], vec![c]))),
        ["remove"]
    );
}

#[test]
fn container_of_deleted_worker_is_removed() {
    let c = container_for(&row(1, 1), RunState::Running);
    let p = run(&snapshot(vec![], vec![c]));
    assert_eq!(kinds(&p), ["remove"]);
    assert_eq!(p.actions[0].reason, "its worker no longer exists");
}

#[test]
fn orphan_with_unreadable_label_is_removed() {
    let mut c = container_for(&row(1, 1), RunState::Exited(None));
    c.worker_id = None;
    let p = run(&snapshot(vec![], vec![c]));
    assert_eq!(kinds(&p), ["remove"]);
    assert!(p.actions[0].reason.starts_with("orphan"));
}

#[test]
fn duplicates_are_removed_keeping_the_running_one() {
    let r = row(1, 1);
    let mut s = snapshot(vec![r.clone()], vec![]);
    let running = ready_for(&r, &mut s);
    let dup = ManagedContainer {
        id: "dup".into(),
        name: "worker-dup".into(),
        created: 999,
        state: RunState::Exited(Some(0)),
        ..running.clone()
    };
    s.containers = vec![dup, running];
    let p = run(&s);
    assert_eq!(kinds(&p), ["remove"]);
    assert_eq!(p.actions[0].target(), "worker-dup");
    assert_eq!(p.actions[0].reason, "duplicate container");
}

#[test]
fn outdated_leftover_beside_a_ready_current_container_is_removed() {
    let mut s = snapshot(vec![row(1, 2)], vec![]);
    let current = ready_for(&row(1, 2), &mut s);
    let mut old = container_for(&row(1, 1), RunState::Exited(Some(0)));
    old.name = "worker-old".into();
    s.containers = vec![current, old];
    let p = run(&s);
    assert_eq!(kinds(&p), ["remove"]);
    assert_eq!(p.actions[0].reason, "outdated container");
}

#[test]
fn created_but_not_started_container_is_started() {
    let r = row(1, 1);
    let p = run(&snapshot(
        vec![r.clone()],
        vec![container_for(&r, RunState::Created)],
    ));
    assert_eq!(kinds(&p), ["start"]);
}

#[test]
fn first_crash_waits_the_initial_backoff_and_says_why() {
    let r = row(1, 1);
    let p = run(&snapshot(
        vec![r.clone()],
        vec![container_for(&r, RunState::Exited(Some(3)))],
    ));
    assert!(p.actions.is_empty());
    let v = status_of(&p, 1);
    assert_eq!(v.status, Status::Error);
    assert!(v.info.contains("exited with code 3"), "{}", v.info);
    assert_eq!(p.wake_at_ms, Some(NOW + 1000));
    assert_eq!(p.books.backoff[&(id(1), 0)].restarts, 0);
}

#[test]
fn a_crash_status_carries_what_the_container_said_last() {
    let r = row(1, 1);
    let crashed = container_for(&r, RunState::Exited(Some(1)));
    let mut s = snapshot(vec![r.clone()], vec![crashed.clone()]);
    s.last_words.insert(
        crashed.id.clone(),
        "internal_error: RuntimeError: boom".into(),
    );
    let p = run(&s);
    let info = &status_of(&p, 1).info;
    assert!(
        info.contains("exited with code 1 (internal error): internal_error: RuntimeError: boom"),
        "{info}"
    );

    // Restarted and running again, the status still says what happened.
    let mut s = snapshot(vec![r.clone()], vec![]);
    let c = ready_for(&r, &mut s);
    s.containers.push(c);
    s.books.backoff = p.books.backoff.clone();
    let p = run(&s);
    let info = &status_of(&p, 1).info;
    assert!(
        info.contains("after exit code 1 (internal error): internal_error"),
        "{info}"
    );
}

#[test]
fn crashed_container_is_restarted_once_backoff_elapsed() {
    let r = row(1, 1);
    let mut s = snapshot(
        vec![r.clone()],
        vec![container_for(&r, RunState::Exited(Some(3)))],
    );
    s.books.backoff.insert(
        (id(1), 0),
        Backoff {
            revision: Revision(1),
            restarts: 2,
            not_before_ms: NOW,
            since_ms: 0,
            last_exit_code: Some(3),
            last_words: None,
        },
    );
    let p = run(&s);
    assert_eq!(kinds(&p), ["start"]);
    let b = &p.books.backoff[&(id(1), 0)];
    assert_eq!(b.restarts, 3);
    assert_eq!(b.not_before_ms, NOW + 8000, "delay doubles: 1s · 2^3");
}

#[test]
fn crashed_container_waits_while_backoff_runs() {
    let r = row(1, 1);
    let mut s = snapshot(
        vec![r.clone()],
        vec![container_for(&r, RunState::Exited(Some(3)))],
    );
    s.books.backoff.insert(
        (id(1), 0),
        Backoff {
            revision: Revision(1),
            restarts: 4,
            not_before_ms: NOW + 5000,
            since_ms: NOW - 10,
            last_exit_code: Some(3),
            last_words: None,
        },
    );
    let p = run(&s);
    assert!(p.actions.is_empty());
    assert_eq!(p.wake_at_ms, Some(NOW + 5000));
    assert!(
        status_of(&p, 1).info.contains("next restart in 5s"),
        "{}",
        status_of(&p, 1).info
    );
}

#[test]
fn backoff_delay_is_capped() {
    assert_eq!(policy().delay(20), Duration::from_secs(60));
    assert_eq!(policy().delay(u32::MAX), Duration::from_secs(60));
}

#[test]
fn backoff_is_forgotten_once_the_container_stays_up() {
    let r = row(1, 1);
    let mut s = snapshot(vec![r.clone()], vec![]);
    let c = ready_for(&r, &mut s);
    s.containers.push(c);
    s.books.backoff.insert(
        (id(1), 0),
        Backoff {
            revision: Revision(1),
            restarts: 2,
            not_before_ms: 0,
            since_ms: NOW - 31_000,
            last_exit_code: Some(1),
            last_words: None,
        },
    );
    assert!(run(&s).books.backoff.is_empty());
}

#[test]
fn backoff_is_kept_while_a_restarted_container_is_young() {
    let r = row(1, 1);
    let mut s = snapshot(vec![r.clone()], vec![]);
    let c = ready_for(&r, &mut s);
    s.containers.push(c);
    s.books.backoff.insert(
        (id(1), 0),
        Backoff {
            revision: Revision(1),
            restarts: 2,
            not_before_ms: 0,
            since_ms: NOW - 1000,
            last_exit_code: Some(1),
            last_words: None,
        },
    );
    let p = run(&s);
    assert_eq!(p.books.backoff[&(id(1), 0)].restarts, 2);
    assert!(status_of(&p, 1).info.contains("restarted 2 time(s)"));
}

#[test]
fn backoff_of_an_older_revision_does_not_delay_a_new_one() {
    let r = row(1, 2);
    let mut s = snapshot(
        vec![r.clone()],
        vec![container_for(&r, RunState::Exited(Some(1)))],
    );
    s.books.backoff.insert(
        (id(1), 0),
        Backoff {
            revision: Revision(1),
            restarts: 9,
            not_before_ms: NOW + 60_000,
            since_ms: NOW,
            last_exit_code: Some(1),
            last_words: None,
        },
    );
    let p = run(&s);
    assert_eq!(p.books.backoff[&(id(1), 0)].revision, Revision(2));
    assert_eq!(p.books.backoff[&(id(1), 0)].restarts, 0);
}

#[test]
fn missing_image_creates_nothing_and_says_how_to_build_it() {
    let mut s = snapshot(vec![row(1, 1)], vec![]);
    s.image = ImageState::Missing;
    let p = run(&s);
    assert!(p.actions.is_empty());
    let v = status_of(&p, 1);
    assert_eq!(v.status, Status::Error);
    assert!(
        v.info.contains("workerctl/dockerworker:latest") && v.info.contains("scripts/build-images")
    );
}

#[test]
fn missing_network_creates_nothing_and_names_it() {
    let mut s = snapshot(vec![row(1, 1)], vec![]);
    s.network = NetworkState::Missing;
    let p = run(&s);
    assert!(p.actions.is_empty());
    assert!(
        status_of(&p, 1)
            .info
            .contains("network host does not exist")
    );
}

#[test]
fn invalid_row_leaves_its_container_alone_and_says_why() {
    let mut r = row(1, 2);
    let c = container_for(&row(1, 1), RunState::Running);
    r.source_is_zip = false;
    let p = run(&snapshot(vec![r], vec![c]));
    assert!(p.actions.is_empty());
    assert_eq!(status_of(&p, 1).status, Status::Error);
    assert!(status_of(&p, 1).info.contains("not a zip"));
}

#[test]
fn one_bad_worker_does_not_stop_the_others() {
    let mut bad = row(1, 1);
    bad.language = "lua".into();
    let p = run(&snapshot(vec![bad, row(2, 1)], vec![]));
    assert_eq!(kinds(&p), ["create"]);
    assert_eq!(p.actions[0].worker, Some(id(2)));
}

#[test]
fn containers_are_named_by_instance_outside_the_default_one() {
    let mut t = template();
    t.instance = "ci-7".into();
    let p = plan(&snapshot(vec![row(1, 1)], vec![]), &t, &policy());
    assert_eq!(p.actions[0].target(), format!("ci-7-worker-{}", id(1)));
}

#[test]
fn same_snapshot_gives_same_plan() {
    let s = snapshot(
        vec![row(1, 1), row(2, 3), disabled(3)],
        vec![container_for(&row(2, 2), RunState::Running)],
    );
    assert_eq!(run(&s), run(&s));
}
