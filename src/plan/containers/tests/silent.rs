//! An image that says nothing of its readiness (no ready report, no health check): the broker's consumer count decides.

use super::*;

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
        s.consumers.insert(id(1), ConsumerCount::Fresh(n));
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
fn a_count_read_before_the_containers_were_listed_proves_nothing() {
    // Two consumers, read a moment ago: one may be a superseded container's
    // that has closed and gone since, and the new one has not connected.
    let mut s = silent_rollout(Some(2));
    s.consumers.insert(id(1), ConsumerCount::Stale);
    let p = run(&s);
    assert!(
        p.actions.is_empty(),
        "the old one serves on: {:?}",
        p.actions
    );
    assert_eq!(status_of(&p, 1).status, Status::Unknown);
    assert_eq!(p.watch_consumers, BTreeSet::from([id(1)]));
    s.now_ms += ASSUME_READY_MS;
    assert!(
        run(&s).actions.is_empty(),
        "the broker can count: the guess does not stand either"
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
