//! `workerctl worker messages ID|NAME`: the messages the worker received
//! lately, with what each produced: the worker's tap is read first (src/recorder.rs),
//! then the table it was read into; `--show N` prints one whole.

use chrono::{DateTime, Utc};
use clap::Args;
use serde_json::Value;

use super::{CliError, Output, pretty, table};
use crate::cli::store_failed;
use crate::config::Config;
use crate::store::admin;
use crate::store::recorded::{self, Recording};
use crate::trial::{body_value, recording_json as as_json};

#[derive(Debug, Args)]
pub struct MessagesArgs {
    /// The worker's id, or its exact name.
    #[arg(value_name = "ID|NAME")]
    pub worker: String,
    /// How many of the newest messages to list.
    #[arg(long, default_value_t = 20)]
    pub last: i64,
    /// Print message N (the ID column) whole: the message as received and its output.
    #[arg(long, value_name = "N")]
    pub show: Option<i64>,
    #[arg(long, short, value_enum, default_value = "table")]
    pub output: Output,
}

pub(super) async fn run(config: &Config, a: MessagesArgs) -> Result<(), CliError> {
    let db = admin::connect(config.database_url.expose()).await?;
    let target = db.resolve(&a.worker).await?;
    if let Some(id) = a.show {
        let recording = recorded::get(db.pool(), target.id, id)
            .await
            .map_err(|e| store_failed(&db, e))?
            .ok_or_else(|| {
                CliError::BadArgument(format!(
                    "worker {} has no recorded message {id} (see `workerctl worker messages {}`)",
                    target.name, target.name
                ))
            })?;
        match a.output {
            Output::Json => println!("{}", pretty(&as_json(&recording))),
            Output::Table => print!("{}", show(&recording)),
        }
        return Ok(());
    }
    if let Some(reader) = crate::recorder::Reader::from_config(config)
        && let Err(e) = reader.read(db.pool(), &[target.id]).await
    {
        eprintln!(
            "cannot read worker {}'s recording tap ({}); showing what was read before",
            target.name,
            crate::backoff::error_chain(&e)
        );
    }
    let recordings = recorded::list(db.pool(), target.id, a.last.max(0))
        .await
        .map_err(|e| store_failed(&db, e))?;
    match a.output {
        Output::Json => {
            let all: Vec<Value> = recordings.iter().map(as_json).collect();
            println!("{}", pretty(&all));
        }
        Output::Table => {
            print!("{}", list(&recordings, Utc::now()));
            if recordings.is_empty() {
                eprintln!(
                    "no messages recorded for worker {} yet (record.enabled, and the worker must be \
                     enabled and have consumed once)",
                    target.name
                );
            }
        }
    }
    Ok(())
}

/// The list: newest first, one line each.
fn list(recordings: &[Recording], now: DateTime<Utc>) -> String {
    let mut rows = vec![
        ["ID", "RECEIVED", "TRACING ID", "BYTES", "OUTPUT"]
            .map(String::from)
            .to_vec(),
    ];
    for r in recordings {
        rows.push(vec![
            r.id.to_string(),
            format!("{} ago", table::age(now - r.received_at)),
            r.tracing_id.clone().unwrap_or_else(|| "-".into()),
            r.body.len().to_string(),
            output_summary(r),
        ]);
    }
    table::columns(&rows)
}

fn output_summary(r: &Recording) -> String {
    let Some(key) = &r.output_key else {
        return "-".into();
    };
    if key != crate::triggers::invoke::ERRORS_KEY {
        return format!("→ {key}");
    }
    let error = r
        .output_body
        .as_deref()
        .map(body_value)
        .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_default();
    let last = error
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    format!("errors: {}", last.trim())
}

/// One recording whole, for a person.
fn show(r: &Recording) -> String {
    let mut out = format!(
        "message {} of worker {}\nreceived:    {}\nrouting key: {}\nmessage id:  {}\ntracing id:  {}\n\n",
        r.id,
        r.worker_id,
        r.received_at.to_rfc3339(),
        r.routing_key,
        r.message_id.as_deref().unwrap_or("-"),
        r.tracing_id.as_deref().unwrap_or("-"),
    );
    out.push_str(&pretty(&body_value(&r.body)));
    out.push('\n');
    match (&r.output_key, &r.output_body) {
        (Some(key), Some(body)) => {
            out.push_str(&format!("\noutput on {key}:\n"));
            out.push_str(&pretty(&body_value(body)));
            out.push('\n');
        }
        _ => out.push_str("\noutput: not seen (not produced yet, or not matched by tracing id)\n"),
    }
    out
}
