//! Trying code before saving it: the candidate code and the worker's current
//! revision run on the same inputs (its recorded messages, one message, or
//! its dead letters) in one throwaway container of the worker's image
//! (`runtime/trial.rs`), and each message's two outputs are compared. The
//! one implementation behind `workerctl worker try` and
//! `POST /api/workers/{id}/try`.
//!
//! Nothing here touches the pipeline: the inputs come from the database,
//! the container has no broker URL, and its outputs come back here only.
//!
//! [`compare`] (two outcomes → unchanged / changed / now raises / fixed,
//! with a readable diff) and [`diff_messages`] are pure and tested here.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tracing::warn;
use uuid::Uuid;

use crate::backoff::error_chain;
use crate::config::Config;
use crate::model::{ContainerSpec, Hardening, Limits, Revision, WorkerId};
use crate::runtime::docker::DockerRuntime;
use crate::runtime::trial::{self as container, TrialRunError};
use crate::store::StoreError;
use crate::store::admin::{Db, DbError, Target};
use crate::store::{dead_letters, recorded};
use crate::triggers::invoke::{self, ERRORS_KEY};

/// How long one message may take in `process` before it counts as raising.
pub(crate) const DEFAULT_MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// The most inputs one try runs.
pub(crate) const MAX_INPUTS: i64 = 10_000;
/// Container start, two code loads and the write-back, beyond the messages.
const CONTAINER_SLACK: Duration = Duration::from_secs(60);

/// Which inputs to run.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Inputs {
    /// The worker's newest N recorded messages, oldest first.
    Last(i64),
    /// One message (missing fields filled in as `worker invoke` does).
    Message(Value),
    /// The messages of the worker's newest N dead letters, as received.
    DeadLetters(i64),
}

/// One input, with where it came from.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct Input {
    /// "recorded 1042", "dead letter 7", "message".
    pub source: String,
    pub tracing_id: Option<String>,
    #[serde(skip)]
    pub body: Vec<u8>,
}

/// What the daemon's configuration says a try container is.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    pub instance: String,
    pub image: String,
    pub network: String,
    pub limits: Limits,
    pub hardening: Hardening,
    pub endpoint_devices: String,
    /// Reads the worker's tap before `--last` takes its newest recordings;
    /// `None` when recording is off (the table is read as it is).
    pub recorder: Option<crate::recorder::Reader>,
}

impl Settings {
    pub(crate) fn from_config(config: &Config) -> Self {
        Settings {
            instance: config.instance.clone(),
            image: config.docker.image.clone(),
            network: config.docker.network.clone(),
            limits: config.limits(),
            hardening: config.hardening(),
            endpoint_devices: config.endpoint_devices.clone(),
            recorder: crate::recorder::Reader::from_config(config),
        }
    }
}

/// A try to run.
#[derive(Clone, Debug)]
pub(crate) struct Request {
    pub worker: Target,
    /// The candidate code: a SensorBucket code archive.
    pub candidate: Vec<u8>,
    pub inputs: Inputs,
    pub message_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum TrialError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("cannot read the worker's inputs")]
    Store(#[source] StoreError),
    #[error("{0}")]
    NoInputs(String),
    #[error("{0}")]
    BadInput(String),
    #[error("cannot reach the Docker engine")]
    Docker(#[source] crate::runtime::RuntimeError),
    #[error("the try container failed")]
    Container(#[source] TrialRunError),
    #[error("the try container gave no report ({0})")]
    NoReport(String),
    #[error("the candidate code does not load in the worker's image: {0}")]
    CandidateInvalid(String),
}

impl TrialError {
    /// Whether the caller's input is at fault (400), rather than a service (503).
    pub(crate) fn is_bad_input(&self) -> bool {
        match self {
            TrialError::NoInputs(_) | TrialError::BadInput(_) | TrialError::CandidateInvalid(_) => {
                true
            }
            TrialError::Db(e) => matches!(
                e,
                DbError::UnknownId(_) | DbError::UnknownName(_) | DbError::AmbiguousName { .. }
            ),
            _ => false,
        }
    }
}

/// What one version of the code did with one message (the try mode's answer).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub(crate) struct Outcome {
    pub outcome: String,
    pub routing_key: Option<String>,
    pub body: Value,
    /// The traceback, when it went to `errors`.
    pub error: Option<String>,
    #[serde(default)]
    pub printed: String,
}

impl Outcome {
    pub(crate) fn raised(&self) -> bool {
        self.routing_key.as_deref() == Some(ERRORS_KEY)
    }

    /// The last line of the traceback: what was raised.
    pub(crate) fn reason(&self) -> String {
        last_line(self.error.as_deref().unwrap_or(""))
    }

    fn not_loaded(why: &str) -> Self {
        Outcome {
            outcome: "code_invalid".into(),
            routing_key: Some(ERRORS_KEY.into()),
            body: Value::Null,
            error: Some(why.to_string()),
            printed: String::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
struct Run {
    loaded: bool,
    error: Option<String>,
    results: Vec<Outcome>,
}

#[derive(Debug, Deserialize)]
struct Runs {
    current: Run,
    candidate: Run,
}

/// The try mode's stdout.
#[derive(Debug, Deserialize)]
struct Answer {
    runs: Runs,
}

/// How one message fared under the candidate, beside the current revision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Change {
    Unchanged,
    Changed,
    NowRaises,
    Fixed,
}

/// One message of the report.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Entry {
    pub input: Input,
    pub change: Change,
    /// What changed, one line each (`~ measurement …`, `+ metadata.x = 1`).
    pub diff: Vec<String>,
    /// The candidate's traceback when it now raises.
    pub traceback: Option<String>,
    pub current: Outcome,
    pub candidate: Outcome,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub(crate) struct Summary {
    pub messages: usize,
    pub unchanged: usize,
    pub changed: usize,
    pub now_raises: usize,
    pub fixed: usize,
}

impl Summary {
    pub(crate) fn of(entries: &[Entry]) -> Self {
        let count = |c: Change| entries.iter().filter(|e| e.change == c).count();
        Summary {
            messages: entries.len(),
            unchanged: count(Change::Unchanged),
            changed: count(Change::Changed),
            now_raises: count(Change::NowRaises),
            fixed: count(Change::Fixed),
        }
    }

    /// `20 messages: 17 unchanged, 2 changed, 1 now raises`.
    pub(crate) fn line(&self) -> String {
        let plural = |n: usize, one: &str, many: &str| {
            if n == 1 {
                one.to_string()
            } else {
                many.to_string()
            }
        };
        let mut parts = vec![format!("{} unchanged", self.unchanged)];
        if self.changed > 0 {
            parts.push(format!("{} changed", self.changed));
        }
        if self.now_raises > 0 {
            let verb = plural(self.now_raises, "raises", "raise");
            parts.push(format!("{} now {verb}", self.now_raises));
        }
        if self.fixed > 0 {
            parts.push(format!("{} fixed", self.fixed));
        }
        let noun = plural(self.messages, "message", "messages");
        format!("{} {noun}: {}", self.messages, parts.join(", "))
    }

    pub(crate) fn anything_changed(&self) -> bool {
        self.unchanged != self.messages
    }
}

/// The whole answer of a try.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Report {
    pub worker_id: Uuid,
    pub worker_name: String,
    /// The revision the candidate was compared with.
    pub revision: i32,
    /// Why the current revision's code does not load, if it does not (every
    /// message then counts as raising before).
    pub current_invalid: Option<String>,
    pub summary: Summary,
    pub summary_line: String,
    pub messages: Vec<Entry>,
    pub seconds: f64,
}

/// Runs a try: reads the inputs and the current code, runs both versions
/// in one throwaway container, compares.
pub(crate) async fn run(
    db: &Db,
    settings: &Settings,
    request: Request,
) -> Result<Report, TrialError> {
    let started = tokio::time::Instant::now();
    let current = db
        .current(request.worker.id)
        .await?
        .ok_or(DbError::UnknownId(request.worker.id))?;
    let inputs = read_inputs(db, settings, request.worker.id, &request.inputs).await?;
    let entrypoint = if current.entrypoint.is_empty() {
        "main.main".to_string()
    } else {
        current.entrypoint.clone()
    };
    let payload = json!({
        "entrypoint": entrypoint,
        "worker_id": request.worker.id.to_string(),
        "timeout_s": request.message_timeout.as_secs_f64(),
        "devices_endpoint": settings.endpoint_devices,
        "codes": {
            "current": current.source.as_deref().map(|s| B64.encode(s)),
            "candidate": B64.encode(&request.candidate),
        },
        "inputs": inputs.iter().map(|i| B64.encode(&i.body)).collect::<Vec<_>>(),
    });
    let runs = run_container(
        settings,
        request.worker.id,
        &payload,
        &request,
        inputs.len(),
    )
    .await?;
    if !runs.candidate.loaded {
        let why = runs.candidate.error.unwrap_or_default();
        return Err(TrialError::CandidateInvalid(why));
    }
    let current_invalid = (!runs.current.loaded).then(|| runs.current.error.unwrap_or_default());
    let messages = entries(
        inputs,
        runs.current.results,
        runs.candidate.results,
        current_invalid.as_deref(),
    )?;
    let summary = Summary::of(&messages);
    Ok(Report {
        worker_id: request.worker.id,
        worker_name: request.worker.name.clone(),
        revision: current.revision,
        current_invalid,
        summary,
        summary_line: summary.line(),
        messages,
        seconds: started.elapsed().as_secs_f64(),
    })
}

async fn run_container(
    settings: &Settings,
    worker: Uuid,
    payload: &Value,
    request: &Request,
    inputs: usize,
) -> Result<Runs, TrialError> {
    let docker = DockerRuntime::connect(&settings.instance)
        .await
        .map_err(TrialError::Docker)?;
    let spec = ContainerSpec {
        worker_id: WorkerId(worker),
        revision: Revision(0),
        replica: 0,
        name: String::new(),
        image: settings.image.clone(),
        image_id: String::new(),
        env: BTreeMap::new(),
        network: settings.network.clone(),
        limits: settings.limits.clone(),
        hardening: settings.hardening.clone(),
        stop_signal: None,
        ready_url: None,
    };
    // No AMQP_HOST, no CODE_URL: the try mode needs neither.
    let env = vec![
        format!("WORKER_ID={worker}"),
        format!("ENDPOINT_DEVICES={}", settings.endpoint_devices),
    ];
    let per_input = request.message_timeout * 2;
    let timeout = CONTAINER_SLACK + per_input * u32::try_from(inputs).unwrap_or(u32::MAX);
    let body = serde_json::to_vec(payload).unwrap_or_default();
    let output = container::run(docker.client(), &spec, env, &body, timeout)
        .await
        .map_err(TrialError::Container)?;
    let answer = serde_json::from_slice::<Answer>(&output.stdout).map_err(|e| {
        let said = output.stderr_tail.join(" | ");
        TrialError::NoReport(format!(
            "{e}; is {} a dockerworker image with a try mode? it said: {said}",
            settings.image
        ))
    })?;
    Ok(answer.runs)
}

async fn read_inputs(
    db: &Db,
    settings: &Settings,
    worker: Uuid,
    choice: &Inputs,
) -> Result<Vec<Input>, TrialError> {
    let pool = db.pool();
    let inputs = match choice {
        Inputs::Last(n) => {
            if let Some(reader) = &settings.recorder
                && let Err(e) = reader.read(pool, &[worker]).await
            {
                // The table still holds what the last read stored.
                warn!(%worker, "cannot read the worker's recording tap: {}", error_chain(&e));
            }
            let mut recent = recorded::list(pool, worker, (*n).clamp(1, MAX_INPUTS))
                .await
                .map_err(TrialError::Store)?;
            recent.reverse();
            recent
                .into_iter()
                .map(|r| Input {
                    source: format!("recorded {}", r.id),
                    tracing_id: r.tracing_id,
                    body: r.body,
                })
                .collect()
        }
        Inputs::DeadLetters(n) => {
            let filter = dead_letters::Filter {
                worker: Some(worker),
                since: None,
                limit: Some((*n).clamp(1, MAX_INPUTS)),
            };
            let mut letters = dead_letters::list(pool, &filter)
                .await
                .map_err(TrialError::Store)?;
            letters.reverse();
            letters
                .iter()
                .filter_map(|d| dead_letter_input(d.id, d.received()?))
                .collect()
        }
        Inputs::Message(message) => {
            let now_ms = chrono::Utc::now().timestamp_millis();
            let prepared = invoke::prepare(message.clone(), worker, now_ms, Uuid::new_v4)
                .map_err(TrialError::BadInput)?;
            vec![Input {
                source: "message".into(),
                tracing_id: Some(prepared.tracing_id),
                body: serde_json::to_vec(&prepared.body).unwrap_or_default(),
            }]
        }
    };
    if inputs.is_empty() {
        return Err(TrialError::NoInputs(no_inputs(choice)));
    }
    Ok(inputs)
}

fn dead_letter_input(id: i64, received: &Value) -> Option<Input> {
    let body = match received {
        Value::Null => return None,
        // An unparsable input is kept in the error body as its text.
        Value::String(s) => s.clone().into_bytes(),
        other => serde_json::to_vec(other).unwrap_or_default(),
    };
    Some(Input {
        source: format!("dead letter {id}"),
        tracing_id: received.get("tracing_id").map(text_of),
        body,
    })
}

fn no_inputs(choice: &Inputs) -> String {
    match choice {
        Inputs::DeadLetters(_) => "the worker has no dead letters to try".into(),
        _ => "no messages recorded for this worker yet: the daemon records an enabled worker's \
              messages (record.enabled) once its queue exists; or give --message FILE"
            .into(),
    }
}

/// Pairs each input with its two outcomes and compares them.
fn entries(
    inputs: Vec<Input>,
    current: Vec<Outcome>,
    candidate: Vec<Outcome>,
    current_invalid: Option<&str>,
) -> Result<Vec<Entry>, TrialError> {
    if candidate.len() != inputs.len()
        || (current_invalid.is_none() && current.len() != inputs.len())
    {
        return Err(TrialError::NoReport(format!(
            "{} inputs, but {} and {} results",
            inputs.len(),
            current.len(),
            candidate.len()
        )));
    }
    let mut current = current.into_iter();
    Ok(inputs
        .into_iter()
        .zip(candidate)
        .map(|(input, candidate)| {
            let before = match current_invalid {
                Some(why) => Outcome::not_loaded(why),
                None => current
                    .next()
                    .unwrap_or_else(|| Outcome::not_loaded("no result")),
            };
            let (change, diff) = compare(&before, &candidate);
            let traceback =
                (change == Change::NowRaises).then(|| candidate.error.clone().unwrap_or_default());
            Entry {
                input,
                change,
                diff,
                traceback,
                current: before,
                candidate,
            }
        })
        .collect())
}

/// How the candidate's outcome differs from the current one's, and what
/// changed in words. Raising twice with the same last line is unchanged;
/// with another, changed.
pub(crate) fn compare(current: &Outcome, candidate: &Outcome) -> (Change, Vec<String>) {
    match (current.raised(), candidate.raised()) {
        (false, true) => (
            Change::NowRaises,
            vec![format!("now raises: {}", candidate.reason())],
        ),
        (true, false) => (
            Change::Fixed,
            vec![format!("raised before: {}", current.reason())],
        ),
        (true, true) if current.reason() == candidate.reason() => (Change::Unchanged, vec![]),
        (true, true) => (
            Change::Changed,
            vec![format!(
                "error: {} → {}",
                current.reason(),
                candidate.reason()
            )],
        ),
        (false, false) => {
            let mut diff = Vec::new();
            if current.routing_key != candidate.routing_key {
                diff.push(format!(
                    "~ routing key: {} → {}",
                    current.routing_key.as_deref().unwrap_or("-"),
                    candidate.routing_key.as_deref().unwrap_or("-")
                ));
            }
            diff.extend(diff_messages(&current.body, &candidate.body));
            let change = if diff.is_empty() {
                Change::Unchanged
            } else {
                Change::Changed
            };
            (change, diff)
        }
    }
}

/// The difference between two output messages, one line each:
/// measurements added (`+`), removed (`-`) or changed (`~`), keyed by
/// sensor, observed property and time; metadata keys; any other field.
pub(crate) fn diff_messages(before: &Value, after: &Value) -> Vec<String> {
    let empty = Map::new();
    let (a, b) = (before.as_object(), after.as_object());
    if a.is_none() || b.is_none() {
        return if before == after {
            vec![]
        } else {
            vec![format!("~ output: {} → {}", short(before), short(after))]
        };
    }
    let (a, b) = (a.unwrap_or(&empty), b.unwrap_or(&empty));
    let mut lines = diff_measurements(a.get("measurements"), b.get("measurements"));
    lines.extend(diff_maps(
        "metadata.",
        field_map(a, "metadata"),
        field_map(b, "metadata"),
    ));
    let rest = |m: &Map<String, Value>| -> Map<String, Value> {
        m.iter()
            .filter(|(k, _)| *k != "measurements" && *k != "metadata")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    lines.extend(diff_maps("", &rest(a), &rest(b)));
    lines
}

fn field_map<'a>(m: &'a Map<String, Value>, key: &str) -> &'a Map<String, Value> {
    static EMPTY: std::sync::OnceLock<Map<String, Value>> = std::sync::OnceLock::new();
    m.get(key)
        .and_then(Value::as_object)
        .unwrap_or_else(|| EMPTY.get_or_init(Map::new))
}

fn diff_maps(prefix: &str, a: &Map<String, Value>, b: &Map<String, Value>) -> Vec<String> {
    let mut lines = Vec::new();
    for (k, va) in a {
        match b.get(k) {
            None => lines.push(format!("- {prefix}{k} (was {})", short(va))),
            Some(vb) if vb != va => {
                lines.push(format!("~ {prefix}{k}: {} → {}", short(va), short(vb)))
            }
            Some(_) => {}
        }
    }
    for (k, vb) in b {
        if !a.contains_key(k) {
            lines.push(format!("+ {prefix}{k} = {}", short(vb)));
        }
    }
    lines
}

/// A measurement's identity: what it measures, where and when; the n-th of
/// identical identities is told apart by its place.
fn keyed(list: Option<&Value>) -> Vec<Keyed<'_>> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    list.and_then(Value::as_array)
        .map(|l| l.as_slice())
        .unwrap_or(&[])
        .iter()
        .filter_map(Value::as_object)
        .map(|m| {
            let field = |k: &str| m.get(k).map(text_of).unwrap_or_default();
            let id = format!(
                "{} (sensor {}, at {})",
                field("observed_property"),
                field("sensor_external_id"),
                field("timestamp")
            );
            let n = seen.entry(id.clone()).or_default();
            *n += 1;
            ((id, *n), m)
        })
        .collect()
}

type Keyed<'a> = ((String, usize), &'a Map<String, Value>);

fn find<'a>(list: &[Keyed<'a>], key: &(String, usize)) -> Option<&'a Map<String, Value>> {
    list.iter().find(|(k, _)| k == key).map(|(_, m)| *m)
}

fn diff_measurements(a: Option<&Value>, b: Option<&Value>) -> Vec<String> {
    let (a, b) = (keyed(a), keyed(b));
    let name = |(id, n): &(String, usize)| {
        if *n > 1 {
            format!("{id} #{n}")
        } else {
            id.clone()
        }
    };
    let value = |m: &Map<String, Value>| {
        let unit = m
            .get("unit_of_measurement")
            .map(text_of)
            .unwrap_or_default();
        format!("{} {unit}", m.get("value").map(short).unwrap_or_default())
            .trim()
            .to_string()
    };
    let mut lines = Vec::new();
    for (key, ma) in &a {
        match find(&b, key) {
            None => lines.push(format!("- measurement {}: {}", name(key), value(ma))),
            Some(mb) if mb != *ma => {
                let changed: Vec<String> = diff_maps("", ma, mb)
                    .into_iter()
                    .map(|l| l.trim_start_matches(['~', '+', '-', ' ']).to_string())
                    .collect();
                lines.push(format!(
                    "~ measurement {}: {}",
                    name(key),
                    changed.join(", ")
                ));
            }
            Some(_) => {}
        }
    }
    for (key, mb) in &b {
        if find(&a, key).is_none() {
            lines.push(format!("+ measurement {}: {}", name(key), value(mb)));
        }
    }
    lines
}

/// A value on one line, at most 120 characters.
fn short(v: &Value) -> String {
    let text = v.to_string();
    if text.chars().count() <= 120 {
        return text;
    }
    let cut: String = text.chars().take(117).collect();
    format!("{cut}...")
}

/// A body as JSON when it is, else as text.
pub(crate) fn body_value(body: &[u8]) -> Value {
    serde_json::from_slice(body).unwrap_or_else(|_| json!(String::from_utf8_lossy(body)))
}

/// A recording with its bodies read (`worker messages --output json`, the HTTP API).
pub(crate) fn recording_json(r: &recorded::Recording) -> Value {
    let mut v = json!(r);
    v["message"] = body_value(&r.body);
    v["output"] = r.output_body.as_deref().map_or(Value::Null, body_value);
    v
}

fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn last_line(text: &str) -> String {
    text.lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("")
        .to_string()
}

#[cfg(test)]
mod tests;
