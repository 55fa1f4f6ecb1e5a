//! How many replicas a worker should run, from the depth of its queue:
//! KEDA's RabbitMQ scaler in `QueueLength` mode. Demand is
//! `ceil(ready messages / per_replica)`, clamped to the worker's
//! `[min, max]`; more replicas are wanted at once, fewer only after the
//! demand has stayed lower for a whole cooldown.
//!
//! Pure: the caller brings the depth, the bounds, the state this function
//! returned last time and the time; no I/O, no clock.

use std::fmt;

use crate::model::{Demand, ScaleBounds};

/// What the scaler remembers of a worker between passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScaleState {
    /// The replica count decided last.
    pub desired: u32,
    /// While demand is below `desired`: since when (Unix ms), and the
    /// highest demand seen since then (what a scale-down may go to).
    pub lower: Option<Lower>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lower {
    pub since_ms: i64,
    pub peak: u32,
}

impl ScaleState {
    /// The state of a worker seen for the first time (or after a restart of
    /// the daemon): whatever runs is what was decided, so a restarted
    /// daemon scales nothing down before a cooldown has passed.
    pub(crate) fn adopt(running: u32) -> ScaleState {
        ScaleState {
            desired: running,
            lower: None,
        }
    }
}

/// Why the replica count is what it is, for the status line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ScaleReason {
    /// `min == max`: nothing to decide.
    Fixed,
    /// Demand, within bounds.
    Demand { ready: u64 },
    /// Demand was below `min` or above `max`.
    Clamped { ready: u64 },
    /// Demand is lower, but not yet for a whole cooldown.
    CoolingDown { ready: u64, until_ms: i64 },
    /// The queue depth could not be read: the count is held.
    DepthUnknown,
    /// The queue does not exist yet: one replica runs to declare it.
    NoQueue,
}

impl fmt::Display for ScaleReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScaleReason::Fixed => f.write_str("fixed replica count"),
            ScaleReason::Demand { ready } => write!(f, "{ready} messages ready"),
            ScaleReason::Clamped { ready } => {
                write!(f, "{ready} messages ready, held within min and max")
            }
            ScaleReason::CoolingDown { ready, until_ms } => write!(
                f,
                "{ready} messages ready; scaling down once demand stays lower until {}",
                fmt_ms(*until_ms)
            ),
            ScaleReason::DepthUnknown => {
                f.write_str("queue depth unknown: replica count held, autoscaling paused")
            }
            ScaleReason::NoQueue => f.write_str("no queue yet: one replica runs to declare it"),
        }
    }
}

fn fmt_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%H:%M:%S UTC").to_string())
        .unwrap_or_else(|| ms.to_string())
}

/// One decision of [`desired_replicas`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ScaleDecision {
    pub desired: u32,
    /// What to pass back next time.
    pub state: ScaleState,
    /// When to decide again although nothing else happened: the end of a
    /// cooldown, when a scale-down falls due.
    pub wake_at_ms: Option<i64>,
    pub reason: ScaleReason,
}

/// The replica count for a worker, from what is known of its queue, given
/// what was decided last time.
///
/// - demand = `ceil(ready / per_replica)`, clamped to `[min, max]`;
/// - above the last count: that many, at once;
/// - below it: the count holds until demand has stayed lower for
///   `cooldown_ms`, then drops to the highest demand seen meanwhile (no
///   replica goes that was needed at any time in the cooldown);
/// - min = 0 scales to zero, and one ready message brings a replica back;
/// - bounds changed by hand apply at once;
/// - depth unknown: the last count holds (clamped), and never less than
///   one replica — without a depth, a worker at zero could never be woken;
/// - no queue yet: at least one replica, so that the queue gets declared.
pub(crate) fn desired_replicas(
    demand: Demand,
    bounds: ScaleBounds,
    previous: ScaleState,
    cooldown_ms: i64,
    now_ms: i64,
) -> ScaleDecision {
    let current = bounds.clamp(previous.desired);
    if bounds.is_fixed() {
        return settled(current, ScaleReason::Fixed);
    }
    let ready = match demand {
        Demand::Ready(ready) => ready,
        Demand::Unknown => return settled(current.max(1), ScaleReason::DepthUnknown),
        Demand::NoQueue => return settled(current.max(1), ScaleReason::NoQueue),
    };
    let demand = ready.div_ceil(u64::from(bounds.per_replica()));
    let target = bounds.clamp(u32::try_from(demand).unwrap_or(u32::MAX));
    let reason = if u64::from(target) == demand {
        ScaleReason::Demand { ready }
    } else {
        ScaleReason::Clamped { ready }
    };
    if target >= current {
        return settled(target, reason);
    }
    let lower = match previous.lower {
        Some(l) => Lower {
            since_ms: l.since_ms,
            peak: l.peak.max(target),
        },
        None => Lower {
            since_ms: now_ms,
            peak: target,
        },
    };
    let due = lower.since_ms.saturating_add(cooldown_ms);
    if now_ms >= due {
        let next = Lower {
            since_ms: now_ms,
            peak: target,
        };
        return scale_down_to(lower.peak, next, cooldown_ms, reason);
    }
    ScaleDecision {
        desired: current,
        state: ScaleState {
            desired: current,
            lower: Some(lower),
        },
        wake_at_ms: Some(due),
        reason: ScaleReason::CoolingDown {
            ready,
            until_ms: due,
        },
    }
}

/// The cooldown is over: down to the peak demand of the cooldown; if the
/// demand now (`next.peak`) is lower still, the next cooldown starts now.
fn scale_down_to(peak: u32, next: Lower, cooldown_ms: i64, reason: ScaleReason) -> ScaleDecision {
    let lower = (next.peak < peak).then_some(next);
    ScaleDecision {
        desired: peak,
        state: ScaleState {
            desired: peak,
            lower,
        },
        wake_at_ms: lower.map(|l| l.since_ms.saturating_add(cooldown_ms)),
        reason,
    }
}

fn settled(desired: u32, reason: ScaleReason) -> ScaleDecision {
    ScaleDecision {
        desired,
        state: ScaleState {
            desired,
            lower: None,
        },
        wake_at_ms: None,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::Demand::{NoQueue, Ready, Unknown};
    use super::*;

    const COOLDOWN: i64 = 60_000;
    const T0: i64 = 1_000_000;

    fn bounds(min: u32, max: u32) -> ScaleBounds {
        ScaleBounds::new(min, max, 20).expect("valid bounds")
    }

    fn state(desired: u32) -> ScaleState {
        ScaleState::adopt(desired)
    }

    fn cooling(desired: u32, since_ms: i64, peak: u32) -> ScaleState {
        ScaleState {
            desired,
            lower: Some(Lower { since_ms, peak }),
        }
    }

    struct Case {
        name: &'static str,
        demand: Demand,
        bounds: ScaleBounds,
        previous: ScaleState,
        now: i64,
        desired: u32,
        wake_at: Option<i64>,
    }

    #[test]
    fn replica_counts_follow_the_queue_like_keda_queue_length() {
        let cases = [
            Case {
                name: "an empty queue at min 1 keeps one replica",
                demand: Ready(0),
                bounds: bounds(1, 4),
                previous: state(1),
                now: T0,
                desired: 1,
                wake_at: None,
            },
            Case {
                name: "demand is ready messages over per_replica, rounded up",
                demand: Ready(41),
                bounds: bounds(1, 10),
                previous: state(1),
                now: T0,
                desired: 3,
                wake_at: None,
            },
            Case {
                name: "exactly one replica's worth is one replica",
                demand: Ready(20),
                bounds: bounds(0, 10),
                previous: state(0),
                now: T0,
                desired: 1,
                wake_at: None,
            },
            Case {
                name: "demand above max is clamped to max",
                demand: Ready(20_000),
                bounds: bounds(1, 4),
                previous: state(1),
                now: T0,
                desired: 4,
                wake_at: None,
            },
            Case {
                name: "a scale-up happens at once, even while cooling down",
                demand: Ready(100),
                bounds: bounds(1, 10),
                previous: cooling(3, T0 - 1_000, 1),
                now: T0,
                desired: 5,
                wake_at: None,
            },
            Case {
                name: "lower demand starts a cooldown and holds the count",
                demand: Ready(0),
                bounds: bounds(1, 4),
                previous: state(4),
                now: T0,
                desired: 4,
                wake_at: Some(T0 + COOLDOWN),
            },
            Case {
                name: "a cooldown not yet over still holds",
                demand: Ready(0),
                bounds: bounds(1, 4),
                previous: cooling(4, T0, 1),
                now: T0 + COOLDOWN - 1,
                desired: 4,
                wake_at: Some(T0 + COOLDOWN),
            },
            Case {
                name: "after the cooldown the count drops to the peak demand seen in it",
                demand: Ready(0),
                bounds: bounds(1, 4),
                previous: cooling(4, T0, 2),
                now: T0 + COOLDOWN,
                desired: 2,
                wake_at: Some(T0 + 2 * COOLDOWN),
            },
            Case {
                name: "min 0 scales an idle worker to zero after the cooldown",
                demand: Ready(0),
                bounds: bounds(0, 4),
                previous: cooling(1, T0, 0),
                now: T0 + COOLDOWN,
                desired: 0,
                wake_at: None,
            },
            Case {
                name: "one message brings a worker at zero back at once",
                demand: Ready(1),
                bounds: bounds(0, 4),
                previous: state(0),
                now: T0,
                desired: 1,
                wake_at: None,
            },
            Case {
                name: "never below min, whatever the queue",
                demand: Ready(0),
                bounds: bounds(2, 4),
                previous: cooling(4, T0, 0),
                now: T0 + 10 * COOLDOWN,
                desired: 2,
                wake_at: None,
            },
            Case {
                name: "an unknown depth holds the count",
                demand: Unknown,
                bounds: bounds(1, 4),
                previous: cooling(3, T0, 1),
                now: T0 + 10 * COOLDOWN,
                desired: 3,
                wake_at: None,
            },
            Case {
                name: "an unknown depth never leaves a worker at zero",
                demand: Unknown,
                bounds: bounds(0, 4),
                previous: state(0),
                now: T0,
                desired: 1,
                wake_at: None,
            },
            Case {
                name: "a worker without a queue yet runs one replica, even at min 0",
                demand: NoQueue,
                bounds: bounds(0, 4),
                previous: state(0),
                now: T0,
                desired: 1,
                wake_at: None,
            },
            Case {
                name: "a worker without a queue keeps the replicas it has",
                demand: NoQueue,
                bounds: bounds(0, 4),
                previous: state(3),
                now: T0,
                desired: 3,
                wake_at: None,
            },
            Case {
                name: "a max lowered by hand applies at once",
                demand: Ready(20_000),
                bounds: bounds(1, 2),
                previous: state(4),
                now: T0,
                desired: 2,
                wake_at: None,
            },
            Case {
                name: "a min raised by hand applies at once",
                demand: Ready(0),
                bounds: bounds(3, 4),
                previous: state(1),
                now: T0,
                desired: 3,
                wake_at: None,
            },
            Case {
                name: "fixed bounds need no depth",
                demand: Unknown,
                bounds: ScaleBounds::default(),
                previous: state(0),
                now: T0,
                desired: 1,
                wake_at: None,
            },
        ];
        for c in cases {
            let d = desired_replicas(c.demand, c.bounds, c.previous, COOLDOWN, c.now);
            assert_eq!(d.desired, c.desired, "{}", c.name);
            assert_eq!(d.wake_at_ms, c.wake_at, "{}", c.name);
            assert_eq!(d.state.desired, d.desired, "{}", c.name);
        }
    }

    #[test]
    fn a_cooldown_remembers_its_start_and_the_highest_demand_in_it() {
        let b = bounds(1, 4);
        let first = desired_replicas(Ready(0), b, state(4), COOLDOWN, T0);
        let second = desired_replicas(Ready(45), b, first.state, COOLDOWN, T0 + 10_000);
        let third = desired_replicas(Ready(0), b, second.state, COOLDOWN, T0 + 20_000);
        assert_eq!(
            third.state.lower,
            Some(Lower {
                since_ms: T0,
                peak: 3
            })
        );
        let due = desired_replicas(Ready(0), b, third.state, COOLDOWN, T0 + COOLDOWN);
        assert_eq!(due.desired, 3);
    }

    #[test]
    fn demand_back_at_the_count_ends_the_cooldown() {
        let b = bounds(1, 4);
        let cooling = desired_replicas(Ready(0), b, state(2), COOLDOWN, T0);
        let back = desired_replicas(Ready(40), b, cooling.state, COOLDOWN, T0 + 1_000);
        assert_eq!(back.state, state(2));
        let again = desired_replicas(Ready(0), b, back.state, COOLDOWN, T0 + COOLDOWN);
        assert_eq!(again.desired, 2, "a new cooldown starts from here");
        assert_eq!(again.wake_at_ms, Some(T0 + 2 * COOLDOWN));
    }

    #[test]
    fn a_scale_down_to_the_peak_starts_the_next_cooldown_when_demand_is_lower_still() {
        let d = desired_replicas(
            Ready(0),
            bounds(0, 4),
            cooling(4, T0, 2),
            COOLDOWN,
            T0 + COOLDOWN,
        );
        assert_eq!(d.desired, 2);
        let next = Lower {
            since_ms: T0 + COOLDOWN,
            peak: 0,
        };
        assert_eq!(d.state.lower, Some(next));
    }

    #[test]
    fn reasons_say_what_the_status_line_shows() {
        let cool = desired_replicas(Ready(0), bounds(1, 4), state(4), COOLDOWN, 0);
        assert!(
            cool.reason.to_string().contains("scaling down"),
            "{}",
            cool.reason
        );
        let unknown = desired_replicas(Unknown, bounds(1, 4), state(2), COOLDOWN, 0);
        assert!(unknown.reason.to_string().contains("autoscaling paused"));
        let clamped = desired_replicas(Ready(9_999), bounds(1, 4), state(1), COOLDOWN, 0);
        assert_eq!(clamped.reason, ScaleReason::Clamped { ready: 9_999 });
    }
}
