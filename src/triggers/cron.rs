//! Cron schedules, decided in pure code: parsing an expression in a time
//! zone, the fire times it gives, which fire time is due given the last
//! recorded fire and "now", and the message a fire publishes.
//!
//! Nothing here reads the clock or does I/O; the firing loop
//! (`firing.rs`) passes "now" in. Cron matching, including the changes of
//! daylight-saving time in the zone, is the `croner` crate's; zones are
//! `chrono-tz`'s (the IANA database).

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds};
use serde_json::{Map, Value, json};
use uuid::Uuid;

/// Why an expression or zone is refused, as one line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScheduleError {
    #[error(
        "invalid cron expression {expr:?}: {reason} (5 fields `min hour day month weekday`, or 6 with seconds first)"
    )]
    Cron { expr: String, reason: String },
    #[error("unknown time zone {0:?}: use an IANA name such as UTC or Europe/Amsterdam")]
    Zone(String),
    #[error("cron expression {0:?} never fires")]
    Never(String),
}

/// A parsed schedule: a cron expression read in a time zone.
#[derive(Clone, Debug)]
pub struct Schedule {
    cron: Cron,
    zone: Tz,
}

/// Parses a 5-field (minutes) or 6-field (seconds first) expression in
/// `zone`, and checks that it ever fires.
pub fn parse(expr: &str, zone: &str) -> Result<Schedule, ScheduleError> {
    let zone: Tz = zone
        .parse()
        .map_err(|_| ScheduleError::Zone(zone.to_string()))?;
    let fields = expr.split_whitespace().count();
    if !(5..=6).contains(&fields) && !expr.trim_start().starts_with('@') {
        return Err(ScheduleError::Cron {
            expr: expr.to_string(),
            reason: format!("{fields} fields"),
        });
    }
    let cron = CronParser::builder()
        .seconds(Seconds::Optional)
        .build()
        .parse(expr)
        .map_err(|e| ScheduleError::Cron {
            expr: expr.to_string(),
            reason: e.to_string(),
        })?;
    let schedule = Schedule { cron, zone };
    let epoch = DateTime::<Utc>::UNIX_EPOCH;
    if schedule.next_after(epoch).is_none() {
        return Err(ScheduleError::Never(expr.to_string()));
    }
    Ok(schedule)
}

impl Schedule {
    pub fn zone(&self) -> Tz {
        self.zone
    }

    /// The first fire time strictly after `t`.
    pub(crate) fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = t.with_timezone(&self.zone);
        self.cron
            .find_next_occurrence(&local, false)
            .ok()
            .map(|d| d.with_timezone(&Utc))
    }

    /// The last fire time at or before `t`.
    pub(crate) fn last_at_or_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = t.with_timezone(&self.zone);
        self.cron
            .find_previous_occurrence(&local, true)
            .ok()
            .map(|d| d.with_timezone(&Utc))
    }

    /// The next `count` fire times after `t`, in the schedule's zone.
    pub(crate) fn upcoming(&self, t: DateTime<Utc>, count: usize) -> Vec<DateTime<Tz>> {
        let mut times = Vec::with_capacity(count);
        let mut at = t;
        while times.len() < count {
            let Some(next) = self.next_after(at) else {
                break;
            };
            times.push(next.with_timezone(&self.zone));
            at = next;
        }
        times
    }
}

/// What the firing loop should do for one schedule now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Due {
    /// The fire time to publish now, if one is due.
    pub fire: Option<DateTime<Utc>>,
    /// When the next fire time after now comes (when to wake for it).
    pub wake: Option<DateTime<Utc>>,
}

/// Given the last recorded fire (or, before the first, when the schedule
/// was created) and `now`: the fire time due, if any, and the next one.
///
/// Only the latest fire time since the last recorded one is due: fire times
/// missed while no daemon ran are not replayed in a burst — the schedule
/// fires at most once on return, then keeps its rhythm.
pub(crate) fn decide(
    schedule: &Schedule,
    last_fire: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Due {
    let since = last_fire.unwrap_or(created_at);
    let fire = schedule
        .last_at_or_before(now)
        .filter(|latest| *latest > since);
    Due {
        fire,
        wake: schedule.next_after(now),
    }
}

/// The message a fire publishes: the template's fields, with a fresh
/// `tracing_id`, `timestamp` and `received_at` (`now_ms`), `step_index` 0
/// and `pipeline_steps` starting with the worker (the template's steps
/// follow it). Missing pipeline fields are filled in as `worker invoke`
/// does. A template that is not an object is refused at `schedule add`;
/// here it is treated as empty.
pub(crate) fn fire_message(
    template: &Value,
    worker: Uuid,
    now_ms: i64,
    mut fresh: impl FnMut() -> Uuid,
) -> Value {
    let mut m = match template {
        Value::Object(m) => m.clone(),
        _ => Map::new(),
    };
    let me = worker.to_string();
    let mut steps: Vec<Value> = m
        .get("pipeline_steps")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if steps.first().and_then(Value::as_str) != Some(me.as_str()) {
        steps.insert(0, json!(me));
    }
    m.insert("tracing_id".into(), json!(fresh().to_string()));
    m.insert("timestamp".into(), json!(now_ms));
    m.insert("received_at".into(), json!(now_ms));
    m.insert("step_index".into(), json!(0));
    m.insert("pipeline_steps".into(), Value::Array(steps));
    let mut fill = |key: &str, value: Value| {
        if m.get(key).is_none_or(Value::is_null) {
            m.insert(key.into(), value);
        }
    };
    fill("pipeline_id", json!(fresh().to_string()));
    fill("tenant_id", json!(0));
    fill("access_token", json!(""));
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("rfc3339")
            .with_timezone(&Utc)
    }

    #[test]
    fn five_and_six_field_expressions_parse_and_bad_ones_are_one_line() {
        assert!(parse("*/5 * * * *", "UTC").is_ok());
        assert!(parse("*/10 * * * * *", "Europe/Amsterdam").is_ok());
        for bad in ["* * *", "61 * * * *", "nonsense", "* * * * * * * *"] {
            let err = parse(bad, "UTC").expect_err(bad).to_string();
            assert!(err.starts_with("invalid cron expression"), "{err}");
            assert!(!err.contains('\n'), "{err}");
        }
        let err = parse("* * * * *", "Mars/Olympus").expect_err("zone");
        assert_eq!(err, ScheduleError::Zone("Mars/Olympus".into()));
        assert!(matches!(
            parse("0 0 30 2 *", "UTC"),
            Err(ScheduleError::Never(_))
        ));
    }

    #[test]
    fn six_fields_fire_every_second_and_five_every_minute() {
        let s = parse("* * * * * *", "UTC").expect("parsed");
        let t = utc("2026-01-01T00:00:00.300Z");
        assert_eq!(s.next_after(t), Some(utc("2026-01-01T00:00:01Z")));
        let m = parse("* * * * *", "UTC").expect("parsed");
        assert_eq!(m.next_after(t), Some(utc("2026-01-01T00:01:00Z")));
    }

    /// A table: (last fire, created, now) → (due, wake).
    #[test]
    fn the_due_fire_time_is_the_latest_since_the_last_recorded_fire() {
        let s = parse("0 * * * *", "UTC").expect("hourly");
        let created = utc("2026-01-01T09:30:00Z");
        let cases = [
            // Created mid-hour, before the first fire time: nothing due.
            (None, "2026-01-01T09:59:59Z", None, "2026-01-01T10:00:00Z"),
            // At the fire time: due.
            (
                None,
                "2026-01-01T10:00:00Z",
                Some("2026-01-01T10:00:00Z"),
                "2026-01-01T11:00:00Z",
            ),
            // Already recorded: not again.
            (
                Some("2026-01-01T10:00:00Z"),
                "2026-01-01T10:00:00.500Z",
                None,
                "2026-01-01T11:00:00Z",
            ),
            // Down for three fire times: only the latest, once.
            (
                Some("2026-01-01T10:00:00Z"),
                "2026-01-01T13:20:00Z",
                Some("2026-01-01T13:00:00Z"),
                "2026-01-01T14:00:00Z",
            ),
            // Late by a little: still due.
            (
                Some("2026-01-01T10:00:00Z"),
                "2026-01-01T11:00:02Z",
                Some("2026-01-01T11:00:00Z"),
                "2026-01-01T12:00:00Z",
            ),
        ];
        for (last, now, due, wake) in cases {
            let d = decide(&s, last.map(utc), created, utc(now));
            assert_eq!(d.fire, due.map(utc), "last {last:?}, now {now}");
            assert_eq!(d.wake, Some(utc(wake)), "last {last:?}, now {now}");
        }
    }

    #[test]
    fn a_daily_time_in_a_zone_keeps_its_wall_clock_across_daylight_saving() {
        // 09:00 in Amsterdam: 08:00 UTC in winter, 07:00 UTC in summer
        // (clocks went forward on 2026-03-29).
        let s = parse("0 9 * * *", "Europe/Amsterdam").expect("parsed");
        let times = s.upcoming(utc("2026-03-27T12:00:00Z"), 3);
        let utc_times: Vec<_> = times.iter().map(|t| t.with_timezone(&Utc)).collect();
        assert_eq!(
            utc_times,
            [
                utc("2026-03-28T08:00:00Z"),
                utc("2026-03-29T07:00:00Z"),
                utc("2026-03-30T07:00:00Z")
            ]
        );
        assert!(
            times
                .iter()
                .all(|t| t.format("%H:%M").to_string() == "09:00")
        );
    }

    #[test]
    fn a_time_skipped_by_spring_forward_fires_once_and_a_repeated_hour_fires_once() {
        // 02:30 does not exist in Amsterdam on 2026-03-29; 02:30 happens twice on 2026-10-25.
        let s = parse("30 2 * * *", "Europe/Amsterdam").expect("parsed");
        let spring = s.upcoming(utc("2026-03-28T12:00:00Z"), 2);
        assert_eq!(spring.len(), 2);
        assert!(spring[0].with_timezone(&Utc) < utc("2026-03-29T02:00:00Z"));
        let autumn = s.upcoming(utc("2026-10-24T12:00:00Z"), 2);
        let gap = autumn[1].with_timezone(&Utc) - autumn[0].with_timezone(&Utc);
        assert!(gap >= chrono::Duration::hours(23), "{autumn:?}");
    }

    #[test]
    fn a_fire_message_keeps_the_template_and_starts_with_the_worker() {
        let worker = Uuid::from_u128(9);
        let mut n = 0u128;
        let fresh = || {
            n += 1;
            Uuid::from_u128(n)
        };
        let template = json!({"payload": "aGk=", "tracing_id": "old", "pipeline_steps": ["storage"], "tenant_id": 4});
        let m = fire_message(&template, worker, 1234, fresh);
        assert_eq!(m["payload"], "aGk=");
        assert_eq!(m["tenant_id"], 4);
        assert_eq!(m["tracing_id"], Uuid::from_u128(1).to_string());
        assert_eq!(m["timestamp"], 1234);
        assert_eq!(m["received_at"], 1234);
        assert_eq!(m["step_index"], 0);
        assert_eq!(m["pipeline_steps"], json!([worker.to_string(), "storage"]));
        let bare = fire_message(&json!({}), worker, 1, || Uuid::from_u128(5));
        assert_eq!(bare["pipeline_steps"], json!([worker.to_string()]));
        let _ = Utc.timestamp_millis_opt(0);
    }
}
