//! The decisions about one worker that is not busy: which single action it
//! needs now, if any, and the status it shows meanwhile (see the rules in
//! `plan/containers.rs`). Pure, like the rest of the planner.

use std::time::Duration;

use super::{
    Action, Backoff, ConsumerCount, FailedRollout, Plan, Policy, Slot, Snapshot, SpecTemplate,
    Step, Takeover, Verdict,
};
use crate::exit;
use crate::model::{
    ContainerSpec, DesiredWorker, Health, Intent, ManagedContainer, Owner, Revision, RunState,
    Status, WorkerRow, intent_of,
};
use crate::model::{ImageState, NetworkState};
use crate::plan::ms;

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

/// The containers of a replica, sorted by what they are to the desired spec.
struct Sorted<'a> {
    /// The container of the current spec to keep, if any.
    current: Option<&'a ManagedContainer>,
    /// More containers of the current spec.
    duplicates: Vec<&'a ManagedContainer>,
    /// Containers of another revision or spec (SensorBucket's controller's
    /// among them), but for those already being removed.
    outdated: Vec<&'a ManagedContainer>,
    /// The outdated container that serves the queue until the current one is
    /// ready: the newest that runs and was ready.
    serving: Option<&'a ManagedContainer>,
    /// The outdated container kept until the current one is ready: the
    /// serving one, else the oldest that runs, which may serve without the
    /// daemon knowing yet (a save a moment after a start: its ready report,
    /// or the broker's count of its consumer, is still on its way). Every
    /// other outdated container serves nobody and goes at once.
    kept: Option<&'a ManagedContainer>,
    /// Containers being removed by an action in flight.
    going: Vec<&'a ManagedContainer>,
}

impl Context<'_> {
    /// The replica's decision (its action goes into `plan`), its status,
    /// and whether it runs the current spec and is ready.
    pub(super) fn decide(&self, plan: &mut Plan) -> (Verdict, bool) {
        let (decision, settled) = match intent_of(self.row) {
            Intent::Stop => (self.stop(plan), false),
            // Containers are left as they are: they run the last good code.
            Intent::Invalid(reason) => (Decision::status(Status::Error, reason), false),
            Intent::Run(worker) => (self.run(&worker, plan), self.settled(&worker)),
        };
        (self.conclude(decision, plan), settled)
    }

    /// A replica beyond the count wanted: its containers go, all at once.
    pub(super) fn scale_down(&self, desired: u32, plan: &mut Plan) {
        for c in self.containers.iter().copied().filter(|c| !self.going(c)) {
            self.remove_now(c, format!("scale down to {desired} replica(s)"), plan);
        }
    }

    /// Whether a container of the current spec runs and is ready.
    fn settled(&self, worker: &DesiredWorker) -> bool {
        let ImageState::Present { id } = &self.snapshot.image else {
            return false;
        };
        let spec = self.template.spec(worker, id, self.replica);
        self.ready_current(&self.sort(&spec)).is_some()
    }

    /// The current container, if it runs and is ready.
    fn ready_current<'s>(&self, sorted: &Sorted<'s>) -> Option<&'s ManagedContainer> {
        sorted.current.filter(|c| {
            c.state == RunState::Running
                && matches!(self.readiness(c, Role::current(sorted)), Readiness::Ready)
        })
    }

    fn stop(&self, plan: &mut Plan) -> Decision {
        let mut removing = None;
        for c in self.containers.iter().copied().filter(|c| !self.going(c)) {
            self.remove_now(c, "the worker is disabled".into(), plan);
            removing.get_or_insert(c);
        }
        match removing.or(self.containers.first().copied()) {
            Some(c) => Decision::status(
                Status::Unknown,
                format!("disabled: stopping container {}", c.name),
            ),
            None => Decision::status(Status::Unknown, "disabled: no container runs"),
        }
    }

    /// Whether `c` is being removed by an action in flight.
    fn going(&self, c: &ManagedContainer) -> bool {
        self.snapshot.busy.contains(&Slot::Container(c.id.clone()))
    }

    /// Removes `c` now, as an action of its own (its slot is the container),
    /// so that retiring containers never waits for one another, nor holds up
    /// the replica's next step. Waits out the retry backoff of a removal
    /// that failed.
    fn remove_now(&self, c: &ManagedContainer, reason: String, plan: &mut Plan) {
        let slot = Slot::Container(c.id.clone());
        let failure = self.snapshot.failures.get(&slot);
        let now = self.snapshot.now_ms;
        if let Some((at, _)) = super::retry_at(failure, "remove", &c.name, self.policy, now)
            && now < at
        {
            plan.wake_at(at);
            return;
        }
        if c.owner == Owner::SensorBucket {
            plan.books.takeovers.insert(
                self.row.id,
                Takeover {
                    removed_at_ms: now,
                    container_id: c.id.clone(),
                    container: c.name.clone(),
                    revision: c.revision,
                    recreated: None,
                },
            );
        }
        plan.actions.push(Action {
            slot,
            worker: Some(self.row.id),
            step: Step::Remove {
                container: c.clone(),
            },
            reason,
        });
    }

    /// Every container of this replica that serves nobody goes at once: the
    /// outdated ones but the one kept (all of them once the current
    /// container is `ready`), and duplicates. `spare` is the name holder a
    /// start-beside of this pass moves out of the way: it goes in a later
    /// pass, once renamed.
    fn sweep(
        &self,
        sorted: &Sorted,
        ready: Option<&ManagedContainer>,
        spare: Option<&str>,
        plan: &mut Plan,
    ) {
        let kept = sorted.kept.map(|c| c.id.as_str());
        for c in &sorted.outdated {
            let id = Some(c.id.as_str());
            if spare == id || (ready.is_none() && kept == id) {
                continue;
            }
            let reason = match ready {
                Some(current) => self.retire_reason(c, current),
                None => self.superseded_reason(c, sorted.serving),
            };
            self.remove_now(c, reason, plan);
        }
        for d in &sorted.duplicates {
            self.remove_now(d, "duplicate container".into(), plan);
        }
    }

    /// Why an outdated container goes once the current one is ready.
    fn retire_reason(&self, old: &ManagedContainer, current: &ManagedContainer) -> String {
        let revision = self.row.revision;
        match (old.owner, old.revision) {
            _ if old.state != RunState::Running => "outdated container".into(),
            (Owner::SensorBucket, _) => format!(
                "revision {revision} is ready in {}: taking over from SensorBucket's controller",
                current.name
            ),
            (_, Some(r)) if r != revision => {
                format!("revision {revision} is ready in {}", current.name)
            }
            _ => format!("its replacement {} is ready", current.name),
        }
    }

    /// Why an outdated container goes before the current one is ready.
    fn superseded_reason(
        &self,
        old: &ManagedContainer,
        serving: Option<&ManagedContainer>,
    ) -> String {
        let revision = self.row.revision;
        match (&old.state, serving) {
            (RunState::Running, Some(s)) if s.created > old.created => format!(
                "an older container; {} serves until revision {revision} is ready",
                s.name
            ),
            (RunState::Running, _) => {
                format!("superseded by revision {revision} before it was ready")
            }
            _ => "outdated container".into(),
        }
    }

    fn run(&self, worker: &DesiredWorker, plan: &mut Plan) -> Decision {
        let image_id = match &self.snapshot.image {
            ImageState::Present { id } => id,
            ImageState::Missing => {
                return Decision::status(Status::Error, super::image_missing(&self.template.image));
            }
        };
        if self.snapshot.network == NetworkState::Missing {
            return Decision::status(
                Status::Error,
                super::network_missing(&self.template.network),
            );
        }
        let spec = self.template.spec(worker, image_id, self.replica);
        let sorted = self.sort(&spec);
        let decision = match sorted.current {
            None => self.roll_out(spec, &sorted, plan),
            Some(current) => self.keep(current, &sorted, plan),
        };
        let spare = match &decision.step {
            Some((Step::StartBeside { old, .. }, _)) => Some(old.id.as_str()),
            _ => None,
        };
        self.sweep(&sorted, self.ready_current(&sorted), spare, plan);
        decision
    }

    fn sort(&self, spec: &ContainerSpec) -> Sorted<'_> {
        let hash = spec.hash();
        let is_current = |c: &ManagedContainer| {
            c.revision == Some(spec.revision) && c.spec_hash.as_deref() == Some(hash.as_str())
        };
        let (going, listed): (Vec<&ManagedContainer>, Vec<&ManagedContainer>) =
            self.containers.iter().copied().partition(|c| self.going(c));
        let (current, outdated): (Vec<&ManagedContainer>, Vec<&ManagedContainer>) =
            listed.into_iter().partition(|c| is_current(c));
        let keep = current
            .iter()
            .copied()
            .max_by_key(|c| (c.state == RunState::Running, c.created, c.id.clone()));
        let duplicates = current
            .into_iter()
            .filter(|c| Some(c.id.as_str()) != keep.map(|k| k.id.as_str()))
            .collect();
        let serving = outdated
            .iter()
            .copied()
            .filter(|c| {
                c.state == RunState::Running
                    && matches!(self.readiness(c, Role::Outdated), Readiness::Ready)
            })
            .max_by_key(|c| (c.created, c.id.clone()));
        let kept = serving.or_else(|| {
            outdated
                .iter()
                .copied()
                .filter(|c| c.state == RunState::Running)
                .min_by_key(|c| (c.created, c.id.clone()))
        });
        Sorted {
            current: keep,
            duplicates,
            outdated,
            serving,
            kept,
            going,
        }
    }

    /// No container of the current spec: start one (beside the old one, if
    /// any), unless this very spec already failed while the old one serves.
    fn roll_out(&self, spec: ContainerSpec, sorted: &Sorted, plan: &mut Plan) -> Decision {
        let serving = sorted.serving;
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
            return Decision::status(Status::Error, rollout_failed(failed, old));
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
            );
        }
        let info = starting_info(revision, serving);
        if let Some(going) = sorted.going.iter().find(|c| c.name == spec.name) {
            // Its removal is in flight; the name is free once it ends.
            return Decision::status(
                Status::Unknown,
                format!("{info}; waiting for {} to be removed", going.name),
            );
        }
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
                starting_info(self.row.revision, sorted.serving),
            )
            .with(
                Step::Start {
                    container: current.clone(),
                },
                "created but never started",
            ),
            RunState::Exited(code) => {
                let words = self.snapshot.last_words.get(&current.id).cloned();
                match sorted.serving {
                    Some(old) => self.give_up(current, old, exit_why(current, *code, words), plan),
                    None => self.crashed(current, *code, words, plan),
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
        let serving = sorted.serving;
        match self.readiness(current, Role::current(sorted)) {
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
                Decision::status(Status::Ready, info)
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
                    ),
                    _ => {
                        plan.wake_at(deadline);
                        if current.health == Health::None {
                            plan.wake_at(started_ms + ms(self.policy.assume_ready_after));
                        }
                        if says_nothing(current) {
                            plan.watch_consumers.insert(self.row.id);
                        }
                        Decision::status(Status::Unknown, waiting_info(current, serving))
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

    fn readiness(&self, c: &ManagedContainer, role: Role) -> Readiness {
        let s = self.snapshot;
        let reported = s
            .reports
            .iter()
            .any(|r| r.worker == self.row.id && r.token == self.row.code_token && r.is_of(c));
        let started_here = s.started_ms.get(&c.id).copied();
        // After a restart of the daemon: the container it finds was ready
        // if the status it wrote for this revision says so.
        let adopted = role == Role::Current { alone: true }
            && started_here.is_none()
            && self.row.status == Status::Ready.as_str()
            && c.revision == Some(self.row.revision);
        let started_ms = started_here.unwrap_or(c.created * 1000);
        // The guess (`assume_ready_after`) stands for a container that says
        // nothing, except for a new one that would replace a serving one
        // while the broker can count consumers: stopping the old one on a
        // guess leaves the queue without a consumer until the new one has
        // connected (seconds, for an image that starts slowly under load).
        let counted_instead = role == Role::Current { alone: false }
            && says_nothing(c)
            && s.consumers.contains_key(&self.row.id);
        let assumed = c.health == Health::None
            && !counted_instead
            && s.now_ms >= started_ms + ms(self.policy.assume_ready_after);
        if reported || adopted || assumed || c.health == Health::Healthy || self.counted(c) {
            Readiness::Ready
        } else {
            Readiness::Waiting { started_ms }
        }
    }

    /// Whether the broker counts more consumers on the worker's queue than
    /// the worker's other running containers could hold (one each): then
    /// `c`, which cannot say so itself, consumes too.
    fn counted(&self, c: &ManagedContainer) -> bool {
        if !says_nothing(c) {
            return false;
        }
        let Some(&ConsumerCount::Fresh(consumers)) = self.snapshot.consumers.get(&self.row.id)
        else {
            return false;
        };
        let others = self
            .snapshot
            .containers
            .iter()
            .filter(|o| o.worker_id == Some(self.row.id) && o.id != c.id)
            .filter(|o| o.state == RunState::Running)
            .count();
        usize::try_from(consumers).is_ok_and(|n| n > others)
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

/// Which container readiness is asked of: the one of the current spec
/// (`alone` when no older one is left), or an older one that may serve.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Current { alone: bool },
    Outdated,
}

impl Role {
    fn current(sorted: &Sorted) -> Role {
        Role::Current {
            alone: sorted.outdated.is_empty(),
        }
    }
}

/// Whether a container can tell nothing of its readiness itself: no health
/// check, and not the dockerworker (which reports ready).
fn says_nothing(c: &ManagedContainer) -> bool {
    c.health == Health::None && !c.dockerworker
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
    if let Some(c) = serving.filter(|c| c.owner == Owner::SensorBucket) {
        let theirs = c.revision.map_or("?".into(), |r| r.to_string());
        return format!(
            "; SensorBucket's controller's container {} (revision {theirs}) keeps serving until \
             then",
            c.name
        );
    }
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
    if old.owner == Owner::SensorBucket {
        let theirs = old.revision.map_or("?".into(), |r| r.to_string());
        return format!(
            "taking over from SensorBucket's controller: its container runs revision {theirs} \
             → {revision}"
        );
    }
    match old.revision {
        Some(r) if r != revision => format!("revision {r} → {revision}"),
        None => format!("unreadable revision → {revision}"),
        Some(_) if old.spec_hash.as_deref() != Some(hash) => {
            "container spec changed (image, environment, limits or hardening)".into()
        }
        Some(_) => "container replaced".into(),
    }
}
