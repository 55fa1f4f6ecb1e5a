//! The decisions about one worker that is not busy: which single action it
//! needs now, if any, and the status it shows meanwhile (see the rules in
//! `plan.rs`). Pure, like the rest of the planner.

use std::time::Duration;

use super::{
    Action, Backoff, FailedRollout, Plan, Policy, Slot, Snapshot, SpecTemplate, Step, Verdict,
};
use crate::exit;
use crate::model::{
    ContainerSpec, DesiredWorker, Health, Intent, ManagedContainer, Revision, RunState, Status,
    WorkerRow, intent_of,
};
use crate::runtime::ImageState;

/// One worker's part of the snapshot, and the settings.
pub(super) struct Context<'a> {
    pub row: &'a WorkerRow,
    pub containers: &'a [&'a ManagedContainer],
    pub snapshot: &'a Snapshot,
    pub template: &'a SpecTemplate,
    pub policy: &'a Policy,
    /// Which replica of the worker these containers are.
    pub replica: u32,
    /// Whether the replicas before this one run the current spec and are
    /// ready: only then does this one replace a serving container.
    pub may_roll: bool,
}

type Decision = super::Decision<Step>;

/// Whether a running container of the current spec consumes its queue.
enum Readiness {
    Ready,
    Waiting { started_ms: i64 },
}

/// The containers of a worker, sorted by what they are to the desired spec.
struct Sorted<'a> {
    /// The container of the current spec to keep, if any.
    current: Option<&'a ManagedContainer>,
    /// More containers of the current spec.
    duplicates: Vec<&'a ManagedContainer>,
    /// Containers of another revision or spec.
    outdated: Vec<&'a ManagedContainer>,
}

impl Sorted<'_> {
    /// The outdated container that still serves the worker's queue.
    fn serving(&self) -> Option<&ManagedContainer> {
        self.outdated
            .iter()
            .copied()
            .filter(|c| c.state == RunState::Running)
            .max_by_key(|c| (c.created, c.id.clone()))
    }

    /// An outdated container that serves nobody: safe to remove at any time.
    fn idle(&self) -> Option<(Step, String)> {
        let c = self
            .outdated
            .iter()
            .find(|c| c.state != RunState::Running)?;
        Some((
            Step::Remove {
                container: (*c).clone(),
            },
            "outdated container".into(),
        ))
    }
}

impl Context<'_> {
    /// The replica's decision (its action goes into `plan`), its status,
    /// and whether it runs the current spec and is ready.
    pub fn decide(&self, plan: &mut Plan) -> (Verdict, bool) {
        let (decision, settled) = match intent_of(self.row) {
            Intent::Stop => (self.stop(), false),
            // Containers are left as they are: they run the last good code.
            Intent::Invalid(reason) => (Decision::status(Status::Error, reason), false),
            Intent::Run(worker) => (self.run(&worker, plan), self.settled(&worker)),
        };
        (self.conclude(decision, plan), settled)
    }

    /// A replica beyond the count wanted: its containers go, one per pass.
    pub fn scale_down(&self, desired: u32, plan: &mut Plan) {
        let Some(c) = self.containers.first() else {
            return;
        };
        let decision = Decision::status(Status::Unknown, "").with(
            Step::Remove {
                container: (*c).clone(),
            },
            format!("scale down to {desired} replica(s)"),
        );
        self.conclude(decision, plan);
    }

    /// Whether a container of the current spec runs and is ready.
    fn settled(&self, worker: &DesiredWorker) -> bool {
        let ImageState::Present { id } = &self.snapshot.image else {
            return false;
        };
        let spec = self.template.spec(worker, id, self.replica);
        let sorted = self.sort(&spec);
        sorted.current.is_some_and(|c| {
            c.state == RunState::Running
                && matches!(
                    self.readiness(c, sorted.outdated.is_empty()),
                    Readiness::Ready
                )
        })
    }

    fn stop(&self) -> Decision {
        match self.containers.first() {
            Some(c) => Decision::status(
                Status::Unknown,
                format!("disabled: stopping container {}", c.name),
            )
            .with(
                Step::Remove {
                    container: (*c).clone(),
                },
                "the worker is disabled",
            ),
            None => Decision::status(Status::Unknown, "disabled: no container runs"),
        }
    }

    fn run(&self, worker: &DesiredWorker, plan: &mut Plan) -> Decision {
        let image_id = match &self.snapshot.image {
            ImageState::Present { id } => id,
            ImageState::Missing => {
                return Decision::status(Status::Error, super::image_missing(&self.template.image));
            }
        };
        if self.snapshot.network == super::NetworkState::Missing {
            return Decision::status(
                Status::Error,
                super::network_missing(&self.template.network),
            );
        }
        let spec = self.template.spec(worker, image_id, self.replica);
        let sorted = self.sort(&spec);
        match sorted.current {
            None => self.roll_out(spec, &sorted, plan),
            Some(current) => self.keep(current, &sorted, plan),
        }
    }

    fn sort(&self, spec: &ContainerSpec) -> Sorted<'_> {
        let hash = spec.hash();
        let is_current = |c: &ManagedContainer| {
            c.revision == Some(spec.revision) && c.spec_hash.as_deref() == Some(hash.as_str())
        };
        let (current, outdated): (Vec<&ManagedContainer>, Vec<&ManagedContainer>) =
            self.containers.iter().copied().partition(|c| is_current(c));
        let keep = current
            .iter()
            .copied()
            .max_by_key(|c| (c.state == RunState::Running, c.created, c.id.clone()));
        let duplicates = current
            .into_iter()
            .filter(|c| Some(c.id.as_str()) != keep.map(|k| k.id.as_str()))
            .collect();
        Sorted {
            current: keep,
            duplicates,
            outdated,
        }
    }

    /// No container of the current spec: start one (beside the old one, if
    /// any), unless this very spec already failed while the old one serves.
    fn roll_out(&self, spec: ContainerSpec, sorted: &Sorted, plan: &mut Plan) -> Decision {
        let serving = sorted.serving();
        let hash = spec.hash();
        let failed = self
            .snapshot
            .books
            .failed_rollouts
            .get(&self.row.id)
            .filter(|f| f.spec_hash == hash);
        if let (Some(failed), Some(old)) = (failed, serving) {
            plan.books
                .failed_rollouts
                .insert(self.row.id, failed.clone());
            return Decision::status(Status::Error, rollout_failed(failed, old))
                .or_with(sorted.idle());
        }
        let revision = spec.revision;
        if let (false, Some(_)) = (self.may_roll, serving) {
            return Decision::status(
                Status::Unknown,
                format!(
                    "replica {} waits for the replicas before it to run revision {revision}{}",
                    self.replica,
                    keeps_serving(serving)
                ),
            )
            .or_with(sorted.idle());
        }
        let info = starting_info(revision, serving);
        let holder = sorted.outdated.iter().find(|c| c.name == spec.name);
        match holder {
            Some(old) => Decision::status(Status::Unknown, info).with(
                Step::StartBeside {
                    old: (*old).clone(),
                    spec,
                },
                replace_reason(old, revision, &hash),
            ),
            None => Decision::status(Status::Unknown, info).with(
                Step::Create { spec },
                format!("no container runs revision {revision}"),
            ),
        }
    }

    /// A container of the current spec exists: look after it.
    fn keep(&self, current: &ManagedContainer, sorted: &Sorted, plan: &mut Plan) -> Decision {
        match &current.state {
            RunState::Running => self.running(current, sorted, plan),
            RunState::Created => Decision::status(
                Status::Unknown,
                starting_info(self.row.revision, sorted.serving()),
            )
            .with(
                Step::Start {
                    container: current.clone(),
                },
                "created but never started",
            ),
            RunState::Exited(code) => {
                let words = self.snapshot.last_words.get(&current.id).cloned();
                match sorted.serving() {
                    Some(old) => self.give_up(current, old, exit_why(current, *code, words), plan),
                    None => self
                        .crashed(current, *code, words, plan)
                        .or_with(sorted.idle()),
                }
            }
            RunState::Other(state) => Decision::status(
                Status::Unknown,
                format!(
                    "container {} is {state}; waiting for it to settle",
                    current.name
                ),
            ),
        }
    }

    fn running(&self, current: &ManagedContainer, sorted: &Sorted, plan: &mut Plan) -> Decision {
        let recovering = self.recovering(plan);
        let serving = sorted.serving();
        match self.readiness(current, sorted.outdated.is_empty()) {
            Readiness::Ready => {
                let info = match recovering {
                    Some(b) => format!(
                        "{}; restarted {} time(s) after exit code {}",
                        running_info(self.row.revision, &current.name),
                        b.restarts,
                        exit_story(b.last_exit_code, b.last_words.as_deref(), current)
                    ),
                    None => running_info(self.row.revision, &current.name),
                };
                Decision::status(Status::Ready, info).or_with(self.retire(current, sorted))
            }
            Readiness::Waiting { started_ms } => {
                let deadline = started_ms + ms(self.policy.ready_timeout);
                let now = self.snapshot.now_ms;
                let timeout = humantime::format_duration(self.policy.ready_timeout);
                match serving {
                    Some(old) if now >= deadline => {
                        let why = format!("not consuming its queue {timeout} after it started");
                        self.give_up(current, old, why, plan)
                    }
                    None if now >= deadline => Decision::status(
                        Status::Error,
                        format!(
                            "container {} runs revision {} but does not consume its queue \
                             {timeout} after it started: see `workerctl worker logs {}`",
                            current.name, self.row.revision, self.row.name
                        ),
                    )
                    .or_with(sorted.idle()),
                    _ => {
                        plan.wake_at(deadline);
                        if current.health == Health::None {
                            plan.wake_at(started_ms + ms(self.policy.assume_ready_after));
                        }
                        Decision::status(Status::Unknown, waiting_info(current, serving))
                            .or_with(sorted.idle())
                    }
                }
            }
        }
    }

    /// The crash book of a container that runs again, kept while it is young.
    fn recovering(&self, plan: &mut Plan) -> Option<Backoff> {
        let book = self.book()?;
        let healthy_at = book.since_ms + ms(self.policy.backoff_reset);
        (self.snapshot.now_ms < healthy_at).then(|| {
            plan.books.backoff.insert(self.key(), book.clone());
            book.clone()
        })
    }

    /// Once the current container is ready: the old ones go, one at a time,
    /// the one that still serves first; then duplicates.
    fn retire(&self, current: &ManagedContainer, sorted: &Sorted) -> Option<(Step, String)> {
        if let Some(old) = sorted.serving() {
            let reason = match old.revision {
                Some(r) if r != self.row.revision => {
                    format!(
                        "revision {} is ready in {}",
                        self.row.revision, current.name
                    )
                }
                _ => format!("its replacement {} is ready", current.name),
            };
            return Some((
                Step::Remove {
                    container: old.clone(),
                },
                reason,
            ));
        }
        sorted.idle().or_else(|| {
            sorted.duplicates.first().map(|d| {
                (
                    Step::Remove {
                        container: (*d).clone(),
                    },
                    "duplicate container".into(),
                )
            })
        })
    }

    fn readiness(&self, c: &ManagedContainer, alone: bool) -> Readiness {
        let s = self.snapshot;
        let reported = s.reports.iter().any(|r| {
            r.worker == self.row.id
                && r.token == self.row.code_token
                && r.container == c.name
                && Some(&r.spec_hash) == c.spec_hash.as_ref()
        });
        let started_here = s.started_ms.get(&c.id).copied();
        // After a restart of the daemon: the container it finds was ready
        // if the status it wrote for this revision says so.
        let adopted = alone
            && started_here.is_none()
            && self.row.status == Status::Ready.as_str()
            && c.revision == Some(self.row.revision);
        let started_ms = started_here.unwrap_or(c.created * 1000);
        let assumed =
            c.health == Health::None && s.now_ms >= started_ms + ms(self.policy.assume_ready_after);
        if reported || adopted || assumed || c.health == Health::Healthy {
            Readiness::Ready
        } else {
            Readiness::Waiting { started_ms }
        }
    }

    /// The new container failed while the old one serves: it goes, the old
    /// one stays, and this spec is not tried again until the worker changes.
    fn give_up(
        &self,
        current: &ManagedContainer,
        old: &ManagedContainer,
        why: String,
        plan: &mut Plan,
    ) -> Decision {
        let failed = FailedRollout {
            spec_hash: current.spec_hash.clone().unwrap_or_default(),
            revision: self.row.revision,
            why,
        };
        let info = rollout_failed(&failed, old);
        plan.books.failed_rollouts.insert(self.row.id, failed);
        Decision::status(Status::Error, info).with(
            Step::Remove {
                container: current.clone(),
            },
            format!(
                "revision {} failed; {} keeps serving",
                self.row.revision, old.name
            ),
        )
    }

    /// The crash book of the current revision, if any.
    fn book(&self) -> Option<&Backoff> {
        self.snapshot
            .books
            .backoff
            .get(&self.key())
            .filter(|b| b.revision == self.row.revision)
    }

    /// The current container exited and nothing else serves: restart it with
    /// backoff, or wait for a fix when its code cannot load.
    fn crashed(
        &self,
        c: &ManagedContainer,
        code: Option<i64>,
        words: Option<String>,
        plan: &mut Plan,
    ) -> Decision {
        let now = self.snapshot.now_ms;
        if exit::waits_for_fix(code, c.dockerworker) {
            return Decision::status(
                Status::Error,
                format!(
                    "container {} exited with code {}; waiting for a fix: save new code \
                     (see `workerctl worker logs {}`)",
                    c.name,
                    exit_story(code, words.as_deref(), c),
                    self.row.name
                ),
            );
        }
        let book = match self.book() {
            Some(b) => Backoff {
                last_exit_code: code.or(b.last_exit_code),
                last_words: words.or_else(|| b.last_words.clone()),
                ..b.clone()
            },
            // First crash seen: wait the initial delay before the first restart.
            None => Backoff {
                revision: self.row.revision,
                restarts: 0,
                not_before_ms: now + ms(self.policy.delay(0)),
                since_ms: now,
                last_exit_code: code,
                last_words: words,
            },
        };
        if now < book.not_before_ms {
            return self.wait_for_restart(c, book, plan);
        }
        let restarts = book.restarts + 1;
        let next = Backoff {
            restarts,
            since_ms: now,
            not_before_ms: now + ms(self.policy.delay(restarts)),
            ..book
        };
        let story = exit_story(next.last_exit_code, next.last_words.as_deref(), c);
        let info = format!(
            "container exited with code {story}; restarted (restart {restarts}); see `workerctl \
             worker logs {}`",
            self.row.name
        );
        let reason = format!(
            "exited with code {}; restart {restarts}",
            exit::code_text(next.last_exit_code, c.dockerworker)
        );
        plan.books.backoff.insert(self.key(), next);
        Decision::status(Status::Error, info).with(
            Step::Start {
                container: c.clone(),
            },
            reason,
        )
    }

    fn wait_for_restart(&self, c: &ManagedContainer, book: Backoff, plan: &mut Plan) -> Decision {
        let wait = Duration::from_millis((book.not_before_ms - self.snapshot.now_ms).max(0) as u64);
        let info = format!(
            "container {} exited with code {} ({} restart(s) so far); next restart in {}; \
             see `workerctl worker logs {}`",
            c.name,
            exit_story(book.last_exit_code, book.last_words.as_deref(), c),
            book.restarts,
            humantime::format_duration(Duration::from_secs(wait.as_secs().max(1))),
            self.row.name
        );
        plan.wake_at(book.not_before_ms);
        plan.books.backoff.insert(self.key(), book);
        Decision::status(Status::Error, info)
    }

    /// Records the decision: its action, unless that same action failed
    /// lately and its retry backoff still runs; and the worker's status.
    fn conclude(&self, decision: Decision, plan: &mut Plan) -> Verdict {
        let id = self.row.id;
        let mut verdict = self.verdict(decision.status, decision.info);
        if let Some((step, reason)) = decision.step {
            let action = Action {
                slot: self.slot(),
                worker: Some(id),
                step,
                reason,
            };
            match self.retry_at(&action) {
                Some((at, info)) if self.snapshot.now_ms < at => {
                    verdict = self.verdict(Status::Error, info);
                    plan.wake_at(at);
                }
                _ => plan.actions.push(action),
            }
        }
        verdict
    }

    fn slot(&self) -> Slot {
        Slot::Replica(self.row.id, self.replica)
    }

    /// The key of this replica's books.
    fn key(&self) -> (crate::model::WorkerId, u32) {
        (self.row.id, self.replica)
    }

    /// When `action` may be tried again, if it is the one that failed last,
    /// and the status meanwhile.
    fn retry_at(&self, action: &Action) -> Option<(i64, String)> {
        super::retry_at(
            self.snapshot.failures.get(&self.slot()),
            action.kind(),
            action.target(),
            self.policy,
            self.snapshot.now_ms,
        )
    }

    fn verdict(&self, status: Status, info: impl Into<String>) -> Verdict {
        Verdict {
            id: self.row.id,
            revision: self.row.revision,
            status,
            info: info.into(),
        }
    }
}

pub(super) fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn running_info(revision: Revision, container: &str) -> String {
    format!("running revision {revision} in container {container}")
}

fn starting_info(revision: Revision, serving: Option<&ManagedContainer>) -> String {
    format!("starting revision {revision}{}", keeps_serving(serving))
}

fn waiting_info(c: &ManagedContainer, serving: Option<&ManagedContainer>) -> String {
    let revision = c.revision.map_or("?".into(), |r| r.to_string());
    format!(
        "revision {revision} started in container {}; waiting for it to consume its queue{}",
        c.name,
        keeps_serving(serving)
    )
}

fn keeps_serving(serving: Option<&ManagedContainer>) -> String {
    match serving.and_then(|c| c.revision) {
        Some(r) => format!("; revision {r} keeps serving"),
        None if serving.is_some() => "; the old container keeps serving".into(),
        None => String::new(),
    }
}

fn rollout_failed(failed: &FailedRollout, old: &ManagedContainer) -> String {
    format!(
        "revision {} does not start: {}{}",
        failed.revision,
        failed.why,
        keeps_serving(Some(old))
    )
}

/// Why a container exited, for a rollout that failed: its last words, or
/// its exit code when it said nothing useful.
fn exit_why(c: &ManagedContainer, code: Option<i64>, words: Option<String>) -> String {
    words.unwrap_or_else(|| format!("exited with code {}", exit::code_text(code, c.dockerworker)))
}

/// "4 (code invalid): code_invalid: …": the exit code, its meaning, and the
/// container's last words when it had any.
fn exit_story(code: Option<i64>, words: Option<&str>, c: &ManagedContainer) -> String {
    let code = exit::code_text(code, c.dockerworker);
    match words {
        Some(words) => format!("{code}: {words}"),
        None => code,
    }
}

fn replace_reason(old: &ManagedContainer, revision: Revision, hash: &str) -> String {
    match old.revision {
        Some(r) if r != revision => format!("revision {r} → {revision}"),
        None => format!("unreadable revision → {revision}"),
        Some(_) if old.spec_hash.as_deref() != Some(hash) => {
            "container spec changed (image, environment, limits or hardening)".into()
        }
        Some(_) => "container replaced".into(),
    }
}
