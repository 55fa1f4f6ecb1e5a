//! Taking over from SensorBucket's own Docker controller: which of its
//! containers (`controlled-by=sensorbucket`, [`Owner::SensorBucket`]) the
//! planner may replace, and what a worker's status says about them. Pure,
//! like the rest of the planner.
//!
//! Its containers of a worker in this store are replaced like an old
//! revision: start-first, retired once workerctl's container is ready
//! (`docker.takeover`, on by default). Off, they are left alone and the
//! status says which to remove. If that controller still runs, it makes a
//! removed container again: then workerctl leaves its containers of that
//! worker alone and says so, rather than fight it.

use super::{Plan, Policy, Snapshot, Takeover};
use crate::model::{ManagedContainer, Owner, RunState, Status, WorkerId, WorkerRow};

/// A worker's containers as the planner is to see them, and what its
/// status must add.
pub(super) struct Taken<'a> {
    /// workerctl's containers, and SensorBucket's controller's when they are
    /// to be replaced.
    pub containers: Vec<&'a ManagedContainer>,
    note: Option<Note>,
}

enum Note {
    /// Its containers are left alone: the worker is in error, saying why.
    LeftAlone(String),
    /// One was replaced: said beside a ready status.
    TookOver(String),
}

/// Sorts a worker's containers by who started them, and records in the
/// books whether SensorBucket's controller made one again after workerctl
/// replaced it.
pub(super) fn sort<'a>(
    row: &WorkerRow,
    all: &[&'a ManagedContainer],
    snapshot: &Snapshot,
    policy: &Policy,
    plan: &mut Plan,
) -> Taken<'a> {
    let (theirs, mut ours): (Vec<&ManagedContainer>, Vec<&ManagedContainer>) = all
        .iter()
        .copied()
        .partition(|c| c.owner == Owner::SensorBucket);
    let book = snapshot.books.takeovers.get(&row.id).map(|b| Takeover {
        recreated: b.recreated.clone().or_else(|| made_again(b, &theirs)),
        ..b.clone()
    });
    if let Some(b) = &book {
        plan.books.takeovers.insert(row.id, b.clone());
    }
    let serving = theirs.iter().find(|c| c.state == RunState::Running);
    let note = match (&book, serving) {
        (Some(b), Some(c)) if b.recreated.is_some() => Some(Note::LeftAlone(fighting(b, c))),
        (_, Some(c)) if !policy.takeover => Some(Note::LeftAlone(left_alone(c))),
        (Some(b), None) if theirs.is_empty() => Some(Note::TookOver(took_over(b))),
        _ => None,
    };
    if !matches!(note, Some(Note::LeftAlone(_))) && policy.takeover {
        ours.extend(theirs);
    }
    Taken {
        containers: ours,
        note,
    }
}

impl Taken<'_> {
    /// Adds the note to the status the planner gave the worker, if any.
    pub(super) fn annotate(&self, id: WorkerId, plan: &mut Plan) {
        let Some(verdict) = plan.verdicts.iter_mut().rev().find(|v| v.id == id) else {
            return;
        };
        match &self.note {
            Some(Note::LeftAlone(why)) => {
                verdict.status = Status::Error;
                verdict.info = format!("{why}; {}", verdict.info);
            }
            Some(Note::TookOver(what)) if verdict.status == Status::Ready => {
                verdict.info = format!("{}; {what}", verdict.info);
            }
            _ => {}
        }
    }
}

/// Another container of that controller, created no earlier than the
/// second in which workerctl decided to remove one (the engine counts whole
/// seconds): the controller made it again.
fn made_again(book: &Takeover, theirs: &[&ManagedContainer]) -> Option<String> {
    let removed_s = book.removed_at_ms.div_euclid(1000);
    theirs
        .iter()
        .find(|c| c.id != book.container_id && c.created >= removed_s)
        .map(|c| c.name.clone())
}

fn revision_of(c: &ManagedContainer) -> String {
    c.revision.map_or("?".into(), |r| r.to_string())
}

fn left_alone(c: &ManagedContainer) -> String {
    format!(
        "container {} of SensorBucket's controller still consumes this worker's queue with \
         revision {}: remove it (docker rm -f {}), or set docker.takeover = true to have \
         workerctl replace it",
        c.name,
        revision_of(c),
        c.name
    )
}

fn fighting(book: &Takeover, c: &ManagedContainer) -> String {
    format!(
        "SensorBucket's controller still runs: it made container {} (revision {}) again after \
         workerctl replaced {}; left alone rather than fought. Switch that controller off (its \
         userworkers service with CTRL_TYPE other than docker or k8s; see docs/sensorbucket.md), \
         then remove it (docker rm -f {})",
        c.name,
        revision_of(c),
        book.container,
        c.name
    )
}

fn took_over(book: &Takeover) -> String {
    let revision = book.revision.map_or("?".into(), |r| r.to_string());
    format!(
        "took over from SensorBucket's controller (its container {} ran revision {revision})",
        book.container
    )
}
