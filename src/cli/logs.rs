//! A worker's container logs, through the Docker API: `worker logs` (with
//! `--follow` across restarts and redeploys) and the last lines `worker show`
//! prints. The container is found by its labels under the configured
//! instance, as the daemon labels it.

use std::io::Write;
use std::time::Duration;

use bollard::container::LogOutput;
use bollard::query_parameters::LogsOptionsBuilder;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use uuid::Uuid;

use super::error::{CliError, docker_error, no_answer};
use crate::model::{ManagedContainer, RunState, WorkerId};
use crate::runtime::ContainerRuntime;
use crate::runtime::docker::{DockerRuntime, is_gone};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How often `--follow` looks for the worker's next container.
const REATTACH_POLL: Duration = Duration::from_millis(500);

/// What `worker logs` prints.
#[derive(Clone, Debug, Default)]
pub(crate) struct LogRequest {
    pub follow: bool,
    pub since: Option<DateTime<Utc>>,
    pub tail: Option<u64>,
    pub timestamps: bool,
}

/// Connects to the Docker engine for `instance`'s containers.
pub(crate) async fn docker(instance: &str) -> Result<DockerRuntime, CliError> {
    match tokio::time::timeout(CONNECT_TIMEOUT, DockerRuntime::connect(instance)).await {
        Ok(Ok(runtime)) => Ok(runtime),
        Ok(Err(e)) => Err(CliError::Docker(Box::new(e))),
        Err(_) => Err(CliError::Docker(no_answer(CONNECT_TIMEOUT))),
    }
}

/// The worker's container: a running one if any, else the newest.
pub(crate) async fn container_of(
    docker: &DockerRuntime,
    id: Uuid,
) -> Result<Option<ManagedContainer>, CliError> {
    let all = docker
        .list()
        .await
        .map_err(|e| CliError::Docker(Box::new(e)))?;
    Ok(all
        .into_iter()
        .filter(|c| c.worker_id == Some(WorkerId(id)))
        .max_by_key(|c| (c.state == RunState::Running, c.created)))
}

/// How a container's log stream ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ended {
    /// All of it was printed (without `--follow`), or the container stopped.
    Stopped,
    /// The container was removed, or was being removed, before its logs
    /// could be read (Docker says 404 or 409): a redeploy or a disable raced
    /// the request.
    Gone,
}

/// Prints the logs of `container` (stdout to stdout, stderr to stderr); with
/// `follow`, keeps printing, and when the container stops or goes, waits for
/// the worker's next one (a restart or a new revision) and goes on with it.
pub(crate) async fn print(
    docker: &DockerRuntime,
    id: Uuid,
    mut container: ManagedContainer,
    request: &LogRequest,
) -> Result<Ended, CliError> {
    let mut seen = Seen::default();
    let mut since = request.since;
    let mut tail = request.tail;
    loop {
        let ended = stream(docker, &container.id, request, since, tail, &mut seen).await?;
        if !request.follow {
            return Ok(ended);
        }
        eprintln!(
            "workerctl: container {} stopped; waiting for the worker's next container (Ctrl-C to stop)",
            container.name
        );
        container = next_running(docker, id).await?;
        eprintln!(
            "workerctl: following container {} (revision {})",
            container.name,
            container
                .revision
                .map_or_else(|| "?".into(), |r| r.to_string())
        );
        // Go on from the last line printed; `seen` drops the repeats.
        since = seen.last.or(since);
        tail = None;
    }
}

async fn next_running(docker: &DockerRuntime, id: Uuid) -> Result<ManagedContainer, CliError> {
    loop {
        tokio::time::sleep(REATTACH_POLL).await;
        if let Some(c) = container_of(docker, id).await?
            && c.state == RunState::Running
        {
            return Ok(c);
        }
    }
}

/// The last line printed, so that reattaching to a container never prints
/// a line twice.
#[derive(Default)]
struct Seen {
    last: Option<DateTime<Utc>>,
}

impl Seen {
    /// Splits Docker's timestamp off `line`; `None` if printed already.
    fn admit<'a>(&mut self, line: &'a [u8]) -> Option<(&'a [u8], &'a [u8])> {
        let space = line.iter().position(|b| *b == b' ')?;
        let (stamp, rest) = (&line[..space], &line[space + 1..]);
        let at = std::str::from_utf8(stamp)
            .ok()
            .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
            .map(|t| t.with_timezone(&Utc));
        match (at, self.last) {
            (Some(at), Some(last)) if at <= last => None,
            (Some(at), _) => {
                self.last = Some(at);
                Some((&line[..=space], rest))
            }
            (None, _) => Some((&[], line)),
        }
    }
}

async fn stream(
    docker: &DockerRuntime,
    container: &str,
    request: &LogRequest,
    since: Option<DateTime<Utc>>,
    tail: Option<u64>,
    seen: &mut Seen,
) -> Result<Ended, CliError> {
    let options = LogsOptionsBuilder::default()
        .stdout(true)
        .stderr(true)
        .follow(request.follow)
        .timestamps(true)
        .since(since.map_or(0, unix_seconds))
        .tail(&tail.map_or_else(|| "all".into(), |n| n.to_string()))
        .build();
    let mut logs = docker.client().logs(container, Some(options));
    while let Some(chunk) = logs.next().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(e) if is_gone(&e) => return Ok(Ended::Gone),
            Err(e) => return Err(docker_error("read the container's logs", e)),
        };
        let (to_stderr, message) = match &chunk {
            LogOutput::StdErr { message } => (true, message),
            LogOutput::StdOut { message }
            | LogOutput::Console { message }
            | LogOutput::StdIn { message } => (false, message),
        };
        let Some((stamp, line)) = seen.admit(message) else {
            continue;
        };
        let stamp = if request.timestamps { stamp } else { &[] };
        // A closed stdout (`| head`) ends the command quietly.
        if write_out(to_stderr, stamp, line).is_err() {
            return Ok(Ended::Stopped);
        }
    }
    Ok(Ended::Stopped)
}

fn write_out(to_stderr: bool, stamp: &[u8], line: &[u8]) -> std::io::Result<()> {
    if to_stderr {
        let mut err = std::io::stderr().lock();
        err.write_all(stamp)?;
        err.write_all(line)?;
        err.flush()
    } else {
        let mut out = std::io::stdout().lock();
        out.write_all(stamp)?;
        out.write_all(line)?;
        out.flush()
    }
}

/// `--since`: a duration back from now (10m, 2h) or an RFC 3339 time.
pub(crate) fn parse_since(text: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, CliError> {
    if let Ok(back) = humantime::parse_duration(text) {
        let back = chrono::TimeDelta::from_std(back)
            .map_err(|_| CliError::BadArgument(format!("--since {text}: too far back")))?;
        return Ok(now - back);
    }
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| {
            CliError::BadArgument(format!(
                "--since {text:?}: give a duration (10m, 2h) or a time (2024-05-01T12:00:00Z)"
            ))
        })
}

fn unix_seconds(t: DateTime<Utc>) -> i32 {
    i32::try_from(t.timestamp()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_printed_once_even_when_a_reattach_repeats_it() {
        let mut seen = Seen::default();
        let first = b"2024-05-01T12:00:00.100000000Z hello\n";
        let again = b"2024-05-01T12:00:00.100000000Z hello\n";
        let later = b"2024-05-01T12:00:00.200000000Z world\n";
        let (stamp, line) = seen.admit(first).expect("new line");
        assert_eq!(
            (stamp, line),
            (&b"2024-05-01T12:00:00.100000000Z "[..], &b"hello\n"[..])
        );
        assert!(seen.admit(again).is_none());
        assert_eq!(seen.admit(later).map(|(_, l)| l), Some(&b"world\n"[..]));
    }

    #[test]
    fn a_container_removed_or_being_removed_is_gone_not_an_error() {
        let said = |status_code| bollard::errors::Error::DockerResponseServerError {
            status_code,
            message: "can not get logs from container which is dead or marked for removal".into(),
        };
        assert!(is_gone(&said(404)));
        assert!(is_gone(&said(409)));
        assert!(!is_gone(&said(500)));
    }

    #[test]
    fn since_takes_a_duration_or_a_time() {
        let now = Utc::now();
        assert_eq!(
            parse_since("10m", now).expect("duration"),
            now - chrono::TimeDelta::minutes(10)
        );
        let t = parse_since("2024-05-01T12:00:00Z", now).expect("time");
        assert_eq!(t.to_rfc3339(), "2024-05-01T12:00:00+00:00");
        assert!(parse_since("yesterday", now).is_err());
    }
}
