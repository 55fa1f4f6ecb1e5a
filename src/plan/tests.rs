//! The planner's decisions, one test each, on hand-built snapshots.

use super::*;
use crate::model::{Health, Intent, intent_of};
use uuid::Uuid;

pub(super) const NOW: i64 = 1_000_000;
pub(super) const IMAGE_ID: &str = "sha256:image";

pub(super) fn id(n: u128) -> WorkerId {
    WorkerId(Uuid::from_u128(n))
}

pub(super) fn template() -> SpecTemplate {
    SpecTemplate {
        instance: "default".into(),
        image: "workerctl/dockerworker:latest".into(),
        network: "host".into(),
        amqp_url: "amqp://mq".into(),
        amqp_exchange: "pipeline.messages".into(),
        code_base_url: "http://ctl:3000/".into(),
        endpoint_devices: "http://core/devices".into(),
        limits: Limits {
            memory_bytes: 1 << 28,
            nano_cpus: 1_000_000_000,
            pids: 128,
        },
        hardening: Hardening {
            read_only_rootfs: true,
            no_new_privileges: true,
            cap_drop: vec!["ALL".into()],
            tmpfs: vec!["/tmp".into(), "/usercode".into()],
        },
        stop_signal: None,
    }
}

const READY_TIMEOUT_MS: i64 = 30_000;
const ASSUME_READY_MS: i64 = 3_000;
pub(super) const COOLDOWN_MS: i64 = 60_000;

pub(super) fn policy() -> Policy {
    Policy {
        backoff_initial: Duration::from_secs(1),
        backoff_max: Duration::from_secs(60),
        backoff_reset: Duration::from_secs(30),
        ready_timeout: Duration::from_millis(READY_TIMEOUT_MS as u64),
        assume_ready_after: Duration::from_millis(ASSUME_READY_MS as u64),
        scale_cooldown: Duration::from_millis(COOLDOWN_MS as u64),
        depth_poll: Duration::from_secs(5),
        takeover: true,
    }
}

pub(super) fn row(n: u128, revision: i32) -> WorkerRow {
    WorkerRow {
        id: id(n),
        name: format!("w{n}"),
        state: "enabled".into(),
        language: "python".into(),
        revision: Revision(revision),
        entrypoint: "main.main".into(),
        status: "unknown".into(),
        status_info: String::new(),
        source_len: Some(100),
        source_is_zip: true,
        source_sha256: Some("abc".into()),
        code_token: format!("token{n}"),
        scale: Default::default(),
        debug: false,
    }
}

pub(super) fn disabled(n: u128) -> WorkerRow {
    WorkerRow {
        state: "disabled".into(),
        ..row(n, 1)
    }
}

/// A container exactly as the planner would create it for `row`.
fn container_for(row: &WorkerRow, state: RunState) -> ManagedContainer {
    replica_for(row, 0, state)
}

/// Replica `replica` of `row`, exactly as the planner would create it.
fn replica_for(row: &WorkerRow, replica: u32, state: RunState) -> ManagedContainer {
    let Intent::Run(w) = intent_of(row) else {
        panic!("row must be runnable")
    };
    let spec = template().spec(&w, IMAGE_ID, replica);
    let suffix = if replica == 0 {
        String::new()
    } else {
        format!("-r{replica}")
    };
    ManagedContainer {
        id: format!("c{}-{}{suffix}", row.id.0.as_u128(), row.revision),
        name: spec.name.clone(),
        worker_id: Some(row.id),
        revision: Some(row.revision),
        spec_hash: Some(spec.hash()),
        replica,
        image_id: IMAGE_ID.into(),
        state,
        health: Health::Starting,
        dockerworker: true,
        created: 100,
        owner: Default::default(),
    }
}

/// A running container of `row` that reported it consumes its queue.
fn ready_for(row: &WorkerRow, s: &mut Snapshot) -> ManagedContainer {
    let c = container_for(row, RunState::Running);
    s.reports.insert(report_of(row, &c));
    c
}

fn report_of(row: &WorkerRow, c: &ManagedContainer) -> ReadyReport {
    ReadyReport {
        worker: row.id,
        token: row.code_token.clone(),
        container: c.name.clone(),
        spec_hash: c.spec_hash.clone().expect("labelled"),
    }
}

/// The same container under the name a start-beside parks it at.
fn parked(mut c: ManagedContainer) -> ManagedContainer {
    c.name = format!("{}-old-{}", c.name, c.short_id());
    c
}

fn snapshot(rows: Vec<WorkerRow>, containers: Vec<ManagedContainer>) -> Snapshot {
    Snapshot {
        rows,
        containers,
        image: ImageState::Present {
            id: IMAGE_ID.into(),
        },
        network: NetworkState::Present,
        books: Books::default(),
        failures: BTreeMap::new(),
        busy: BTreeSet::new(),
        reports: BTreeSet::new(),
        started_ms: HashMap::new(),
        last_words: HashMap::new(),
        depths: None,
        depths_unknown: "not read yet".into(),
        consumers: BTreeMap::new(),
        now_ms: NOW,
    }
}

fn run(s: &Snapshot) -> Plan {
    plan(s, &template(), &policy())
}

fn kinds(p: &Plan) -> Vec<&'static str> {
    p.actions.iter().map(Action::kind).collect()
}

fn status_of(p: &Plan, n: u128) -> &Verdict {
    p.verdicts
        .iter()
        .find(|v| v.id == id(n))
        .expect("a verdict for the worker")
}

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

// ---- Rollouts, readiness, exits and retries: one table of decisions. ----

/// Worker 1 at revision 2, with its revision-1 container parked and
/// serving (it reported ready long ago), plus whatever `new` adds.
fn rollout(new: impl FnOnce(&WorkerRow, &mut Snapshot)) -> Snapshot {
    let r = row(1, 2);
    let mut s = snapshot(vec![r.clone()], vec![]);
    let old = parked(ready_for(&row(1, 1), &mut s));
    s.reports.clear();
    s.reports.insert(report_of(&row(1, 1), &old));
    s.containers.push(old);
    new(&r, &mut s);
    s
}

/// A revision-2 container of worker 1 in `state`, started `ago_ms` ago by
/// this daemon.
fn new_container(
    r: &WorkerRow,
    s: &mut Snapshot,
    state: RunState,
    ago_ms: i64,
) -> ManagedContainer {
    let c = container_for(r, state);
    s.started_ms.insert(c.id.clone(), NOW - ago_ms);
    s.containers.push(c.clone());
    c
}

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

fn failed_rollout_of(r: &WorkerRow) -> FailedRollout {
    let c = container_for(r, RunState::Exited(Some(1)));
    FailedRollout {
        spec_hash: c.spec_hash.expect("labelled"),
        revision: r.revision,
        why: "boom".into(),
    }
}

fn failure(kind: &'static str, attempts: u32, at_ms: i64) -> ActionFailure {
    ActionFailure {
        kind,
        target: format!("worker-{}", id(1)),
        attempts,
        at_ms,
        error: "cannot create container: boom".into(),
    }
}

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

// ---- Replicas: how many, and one replica at a time in a rollout. ----

/// Worker 1 at `revision`, between `min` and `max` replicas.
fn scaled(revision: i32, min: u32, max: u32) -> WorkerRow {
    WorkerRow {
        scale: crate::scale::ScaleBounds::new(min, max, 20).expect("valid bounds"),
        ..row(1, revision)
    }
}

/// `ready` messages wait in worker 1's queue.
fn depth(s: &mut Snapshot, ready: u64) {
    let q = crate::broker::QueueDepth {
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
                    lower: Some(scale::Lower {
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
                    lower: Some(scale::Lower {
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

/// A rollout on an image that says nothing of its readiness (no ready
/// report, no health check): the old container serves (taken as ready long
/// ago), the new one started 100 ms ago; the broker counts `consumers`.
fn silent_rollout(consumers: Option<u32>) -> Snapshot {
    let mut s = rollout(|r, s| drop(new_container(r, s, RunState::Running, 100)));
    s.reports.clear();
    for c in &mut s.containers {
        (c.health, c.dockerworker) = (Health::None, false);
    }
    s.containers[0].created = 1;
    if let Some(n) = consumers {
        s.consumers.insert(id(1), n);
    }
    s
}

#[test]
fn a_container_that_says_nothing_is_watched_on_the_broker_while_it_starts() {
    let p = run(&silent_rollout(None));
    assert!(p.actions.is_empty(), "{:?}", p.actions);
    assert_eq!(p.watch_consumers, BTreeSet::from([id(1)]));
    let one = run(&silent_rollout(Some(1)));
    assert!(
        one.actions.is_empty(),
        "one consumer is the old container's"
    );
}

#[test]
fn a_container_that_says_nothing_is_ready_once_the_broker_counts_its_consumer() {
    let p = run(&silent_rollout(Some(2)));
    assert_eq!(kinds(&p), ["remove"], "the old one goes");
    assert_eq!(status_of(&p, 1).status, Status::Ready);
    assert!(p.watch_consumers.is_empty());
}

#[test]
fn beside_a_serving_container_the_broker_count_overrules_the_guess() {
    let past_the_guess = |consumers| {
        let mut s = silent_rollout(consumers);
        s.now_ms += ASSUME_READY_MS;
        run(&s)
    };
    let counted = past_the_guess(Some(1));
    assert!(
        counted.actions.is_empty(),
        "the one consumer is the old container's: it keeps serving, {:?}",
        counted.actions
    );
    assert_eq!(status_of(&counted, 1).status, Status::Unknown);
    assert_eq!(
        kinds(&past_the_guess(None)),
        ["remove"],
        "no count: the guess stands"
    );
}

#[test]
fn the_dockerworker_is_never_counted_on_the_broker() {
    let mut s = silent_rollout(Some(2));
    s.containers[1].dockerworker = true;
    let p = run(&s);
    assert!(p.actions.is_empty(), "it reports ready itself");
    assert!(p.watch_consumers.is_empty());
}
