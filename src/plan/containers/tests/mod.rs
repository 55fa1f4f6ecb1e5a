//! The container planner's decisions on hand-built snapshots, by topic:
//! workers and their containers ([`basics`]), rollouts, readiness, exits
//! and takeovers ([`rollouts`], one table each), replicas ([`scaling`]),
//! and images that say nothing of their readiness ([`silent`]).

use super::*;
use crate::model::{Health, Intent, intent_of};
use crate::plan::fixtures::*;
use std::time::Duration;

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

mod basics;
mod rollouts;
mod scaling;
mod silent;
