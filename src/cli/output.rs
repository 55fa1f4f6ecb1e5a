//! What every command prints with: the `--output` choice, pretty JSON, and
//! a message read from a file (or `-`, standard input).

use std::io::Read;
use std::path::Path;

use clap::ValueEnum;
use serde_json::Value;

use super::error::CliError;

/// How a command prints its result: a table for people, JSON for scripts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// A JSON message from `path` (`-`: standard input).
pub(crate) fn read_message(path: &Path) -> Result<Value, CliError> {
    let text = if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|source| CliError::ReadFile {
                path: path.to_path_buf(),
                source,
            })?;
        text
    } else {
        std::fs::read_to_string(path).map_err(|source| CliError::ReadFile {
            path: path.to_path_buf(),
            source,
        })?
    };
    serde_json::from_str(&text).map_err(|e| CliError::BadMessage {
        path: path.to_path_buf(),
        problem: format!("not JSON ({e})"),
    })
}

/// `value` as indented JSON.
pub(crate) fn pretty(value: &impl serde::Serialize) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}
