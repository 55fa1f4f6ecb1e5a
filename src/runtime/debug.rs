//! The way into a debugged worker's debug adapter (`workerctl worker dev
//! --debug`): `python -m dockerworker debug-relay` run in the worker's
//! container (an attached exec), whose stdin and stdout are a connection to
//! the adapter on the container's own loopback.
//!
//! Nothing is published: the adapter is reachable only through the engine's
//! API, by whoever may already `docker exec` into the container, and the
//! CLI offers it on the host's loopback only. This file only opens the link;
//! what travels over it is `cli/worker/debug.rs`'s business.

use std::pin::Pin;

use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use futures::{Stream, StreamExt};
use tokio::io::AsyncWrite;

use super::docker::DockerRuntime;

/// The command run in the container.
const RELAY: [&str; 4] = ["python", "-m", "dockerworker", "debug-relay"];
/// What the relay says on stderr once connected (dockerworker/debug.py).
const CONNECTED: &str = "debug-relay: connected";

#[derive(Debug, thiserror::Error)]
pub enum DebugLinkError {
    #[error("cannot run the debug relay in container {container}")]
    Exec {
        container: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("the engine did not attach to the debug relay in container {container}")]
    Detached { container: String },
    /// The relay ran, and could not reach an adapter: it said why.
    #[error("{said}")]
    NoAdapter { said: String },
}

/// What the relay writes: the adapter's bytes (stdout), or why it could not
/// reach it (stderr).
#[derive(Debug)]
pub enum FromRelay {
    Adapter(Vec<u8>),
    Said(String),
}

/// One connection to a container's debug adapter.
pub struct AdapterLink {
    /// Ends when the relay exits (the adapter closed the connection, or the
    /// container stopped).
    pub output: Pin<Box<dyn Stream<Item = FromRelay> + Send>>,
    pub input: Pin<Box<dyn AsyncWrite + Send>>,
}

/// Runs the relay in `container` and attaches to it; returns once the
/// relay is connected to the adapter.
pub async fn connect(
    runtime: &DockerRuntime,
    container: &str,
) -> Result<AdapterLink, DebugLinkError> {
    let failed = |source| DebugLinkError::Exec {
        container: container.to_string(),
        source,
    };
    let options = CreateExecOptions {
        attach_stdin: Some(true),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        tty: Some(false),
        cmd: Some(RELAY.to_vec()),
        ..Default::default()
    };
    let exec = runtime
        .client()
        .create_exec(container, options)
        .await
        .map_err(failed)?;
    let started = runtime
        .client()
        .start_exec(&exec.id, Some(StartExecOptions::default()))
        .await
        .map_err(failed)?;
    let StartExecResults::Attached { output, input } = started else {
        return Err(DebugLinkError::Detached {
            container: container.to_string(),
        });
    };
    let output = output
        .take_while(|chunk| std::future::ready(chunk.is_ok()))
        .filter_map(|chunk| {
            std::future::ready(match chunk {
                Ok(LogOutput::StdOut { message }) => Some(FromRelay::Adapter(message.to_vec())),
                Ok(LogOutput::StdErr { message }) => Some(FromRelay::Said(
                    String::from_utf8_lossy(&message).trim().to_string(),
                )),
                _ => None,
            })
        });
    let mut output: Pin<Box<dyn Stream<Item = FromRelay> + Send>> = Box::pin(output);
    let mut said = Vec::new();
    while let Some(first) = output.next().await {
        match first {
            FromRelay::Said(line) if line.contains(CONNECTED) => {
                return Ok(AdapterLink { output, input });
            }
            FromRelay::Said(line) => said.push(line),
            // The adapter speaks only after the client did.
            FromRelay::Adapter(_) => {}
        }
    }
    Err(DebugLinkError::NoAdapter {
        said: if said.is_empty() {
            "the debug relay ended without a word".into()
        } else {
            said.join("; ")
        },
    })
}
