//! How workers look on a terminal: the `list` table and the `show` page.
//! Pure formatting of [`WorkerOverview`] values; no I/O.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::store::admin::CodeSummary;
use crate::store::overview::WorkerOverview;

const LIST_HEADER: [&str; 9] = [
    "NAME",
    "ID",
    "STATE",
    "REVISION",
    "STATUS",
    "CONTAINER",
    "REPLICAS",
    "RESTARTS",
    "AGE",
];

/// The `list` table: one line per worker, columns aligned.
pub(super) fn list(workers: &[WorkerOverview], now: DateTime<Utc>) -> String {
    let mut rows = vec![LIST_HEADER.map(String::from).to_vec()];
    rows.extend(workers.iter().map(|w| {
        vec![
            w.name.clone(),
            w.id.to_string(),
            w.state.to_string(),
            revision(w),
            w.status.to_string(),
            w.container_state.clone().unwrap_or_else(|| "-".into()),
            format!("{}/{}", w.running_replicas, w.desired_replicas),
            w.restarts.to_string(),
            created(w.id).map_or_else(|| "-".into(), |t| age(now - t)),
        ]
    }));
    columns(&rows)
}

/// Aligns `rows` in columns two spaces apart, with no trailing blanks.
pub(super) fn columns(rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = Vec::new();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            let width = cell.chars().count();
            match widths.get_mut(i) {
                Some(w) => *w = (*w).max(width),
                None => widths.push(width),
            }
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (cell, width) in row.iter().zip(&widths) {
            let _ = write!(line, "{cell:<width$}  ");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The wanted revision, and the running one when it differs.
fn revision(w: &WorkerOverview) -> String {
    match w.running_revision {
        Some(running) if running != w.revision => format!("{} (running {running})", w.revision),
        _ => w.revision.to_string(),
    }
}

/// When the worker was created, read from its UUIDv7 id (the dashboard and
/// `create` make v7 ids); `None` for other ids.
pub(super) fn created(id: Uuid) -> Option<DateTime<Utc>> {
    let (secs, nanos) = id.get_timestamp()?.to_unix();
    DateTime::from_timestamp(i64::try_from(secs).ok()?, nanos)
}

/// A short age, as `kubectl` shows it: 42s, 5m, 3h, 12d.
pub(super) fn age(d: chrono::TimeDelta) -> String {
    let s = d.num_seconds().max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..172_800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// The `show` page: every field, the reason of the status, the code's digest.
/// The replica bounds in words.
fn replicas(w: &WorkerOverview) -> String {
    let bounds = if w.min_replicas == w.max_replicas {
        format!("{} (fixed)", w.min_replicas)
    } else {
        format!(
            "{} to {}, one per {} ready messages",
            w.min_replicas, w.max_replicas, w.per_replica
        )
    };
    format!(
        "{} running of {} wanted; {bounds}",
        w.running_replicas, w.desired_replicas
    )
}

pub(super) fn show(w: &WorkerOverview, code: Option<&CodeSummary>, now: DateTime<Utc>) -> String {
    let ago = |t: DateTime<Utc>| format!("{} ago ({})", age(now - t), t.format("%F %T UTC"));
    let mut fields: Vec<(&str, String)> = vec![
        ("name", w.name.clone()),
        ("id", w.id.to_string()),
        ("description", w.description.clone()),
        ("state", w.state.to_string()),
        ("language", w.language.clone()),
        ("entrypoint", w.entrypoint.clone()),
        ("revision", revision(w)),
        ("status", w.status.to_string()),
        ("reason", w.status_info.clone()),
        ("container", container(w)),
        ("restarts", w.restarts.to_string()),
        ("replicas", replicas(w)),
    ];
    if let Some(code) = w.last_exit_code {
        fields.push(("last exit code", code.to_string()));
    }
    if let Some(t) = w.observed_at {
        fields.push(("observed", ago(t)));
    }
    if let Some(t) = created(w.id) {
        fields.push(("created", ago(t)));
    }
    fields.push(("code", code.map_or_else(|| "none".into(), code_line)));
    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    let mut out = String::new();
    for (key, value) in fields {
        let value = if value.is_empty() { "-".into() } else { value };
        let _ = writeln!(out, "{:<width$} {value}", format!("{key}:"));
    }
    out
}

fn container(w: &WorkerOverview) -> String {
    match (&w.container, &w.container_state) {
        (Some(name), Some(state)) => format!("{name} ({state})"),
        (None, Some(state)) => state.clone(),
        (Some(name), None) => name.clone(),
        (None, None) => "not observed yet (is the daemon running?)".into(),
    }
}

fn code_line(code: &CodeSummary) -> String {
    match (code.bytes, &code.sha256) {
        (Some(bytes), Some(sha)) => format!("{bytes} bytes, sha256 {}", &sha[..sha.len().min(16)]),
        _ => "none".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeDelta;

    fn worker(name: &str, id: Uuid) -> WorkerOverview {
        WorkerOverview {
            id,
            name: name.into(),
            description: String::new(),
            state: crate::model::WorkerState::Enabled,
            language: "python".into(),
            revision: 2,
            status: crate::model::Status::Ready,
            status_info: "running revision 2".into(),
            entrypoint: "main.main".into(),
            running_revision: Some(1),
            container: Some("worker-x".into()),
            container_state: Some("running".into()),
            restarts: 0,
            last_exit_code: None,
            observed_at: None,
            min_replicas: 1,
            max_replicas: 1,
            per_replica: 20,
            desired_replicas: 1,
            running_replicas: 1,
        }
    }

    #[test]
    fn columns_are_aligned_without_trailing_blanks() {
        let rows = vec![
            vec!["A".to_string(), "BB".to_string()],
            vec!["ccc".to_string(), "d".to_string()],
        ];
        assert_eq!(columns(&rows), "A    BB\nccc  d\n");
    }

    #[test]
    fn the_list_shows_a_lagging_revision_and_the_age_from_the_v7_id() {
        let now = Utc::now();
        let id = Uuid::now_v7();
        let text = list(&[worker("ingest", id)], now + TimeDelta::seconds(90));
        let line = text.lines().nth(1).expect("one worker line");
        assert!(line.starts_with("ingest"), "{text}");
        assert!(line.contains("2 (running 1)"), "{text}");
        assert!(line.trim_end().ends_with("1m"), "{text}");
    }

    #[test]
    fn ages_are_short() {
        assert_eq!(age(TimeDelta::seconds(42)), "42s");
        assert_eq!(age(TimeDelta::seconds(300)), "5m");
        assert_eq!(age(TimeDelta::hours(3)), "3h");
        assert_eq!(age(TimeDelta::days(12)), "12d");
        assert_eq!(age(TimeDelta::seconds(-5)), "0s");
    }

    #[test]
    fn ids_other_than_v7_have_no_creation_time() {
        assert!(created(Uuid::new_v4()).is_none());
    }

    #[test]
    fn show_gives_the_reason_and_dashes_for_empty_fields() {
        let text = show(&worker("w", Uuid::now_v7()), None, Utc::now());
        assert!(text.contains("reason:"), "{text}");
        assert!(text.contains("running revision 2"), "{text}");
        assert!(text.contains("description:"), "{text}");
        assert!(text.contains("code:"), "{text}");
        assert!(text.contains("1 (fixed)"), "{text}");
    }
}
