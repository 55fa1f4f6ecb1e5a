//! `workerctl worker dev --debug`: the debug port on the host's loopback,
//! and the debug session through it, which outlives the worker's containers.
//!
//! A client (VS Code, any DAP client) connects to `127.0.0.1:<port>`; each
//! connection is relayed to the debug adapter (debugpy) of the worker's
//! current container through `runtime/debug.rs` (an exec in the container:
//! nothing is published). The messages are read as they pass: the client's
//! `initialize`, `attach` and breakpoint requests are kept. When a save (or
//! a restart) replaces the container, the session moves to the new one: it
//! connects to its adapter, replays what it kept (its own sequence numbers,
//! answers swallowed), tells the old adapter to let go, and goes on
//! relaying. The client stays connected and its breakpoints stay set.
//!
//! One session at a time (debugpy's adapter takes one client); the next
//! connection is accepted when it ends.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::net::tcp::OwnedWriteHalf;
use uuid::Uuid;

use crate::model::{ManagedContainer, RunState, WorkerId};
use crate::runtime::ContainerRuntime;
use crate::runtime::debug::{self as link, AdapterLink, FromRelay};
use crate::runtime::docker::DockerRuntime;
use futures::StreamExt;

/// How often the session looks for a new container of the worker.
const LOOK_EVERY: Duration = Duration::from_millis(250);
/// How long a move to a new container may take before it is tried again.
const MOVE_TIMEOUT: Duration = Duration::from_secs(15);
/// Sequence numbers of the requests the session itself sends start here,
/// far above any a client reaches, so their answers can be told apart.
const OWN_SEQ: i64 = 1 << 40;
/// Where the dockerworker unpacks the code while debugging (dockerworker/debug.py).
pub(super) const REMOTE_PATH: &str = "/tmp/usercode/debug/usercode.py";

/// Content-Length framing of DAP messages, over a byte stream.
#[derive(Default)]
pub(super) struct Framer {
    buf: Vec<u8>,
}

impl Framer {
    pub(super) fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole message, if one has arrived. An unreadable one is an
    /// error: the stream cannot be resynchronised.
    pub(super) fn next(&mut self) -> Result<Option<Value>, String> {
        let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            return Ok(None);
        };
        let header = String::from_utf8_lossy(&self.buf[..end]).to_string();
        let length = header
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.trim()
                    .eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse::<usize>().ok())?
            })
            .ok_or_else(|| format!("a DAP header without Content-Length: {header:?}"))?;
        let start = end + 4;
        if self.buf.len() < start + length {
            return Ok(None);
        }
        let body: Vec<u8> = self.buf.drain(..start + length).skip(start).collect();
        serde_json::from_slice(&body)
            .map(Some)
            .map_err(|e| format!("a DAP message that is not JSON: {e}"))
    }
}

/// One message, framed.
pub(super) fn frame(message: &Value) -> Vec<u8> {
    let body = message.to_string();
    let mut out = format!("Content-Length: {}\r\n\r\n", body.len()).into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

/// What a session replays on a new container: the client's `initialize`
/// and `attach`, and the latest of each breakpoint request (per source for
/// `setBreakpoints`), in the order first seen.
#[derive(Default, Debug)]
pub(super) struct Replay {
    initialize: Option<Value>,
    attach: Option<Value>,
    config: Vec<(String, Value)>,
}

impl Replay {
    /// Keeps `message` if it is a request worth replaying.
    pub(super) fn record(&mut self, message: &Value) {
        if message["type"] != "request" {
            return;
        }
        let command = message["command"].as_str().unwrap_or_default();
        let arguments = message.get("arguments").cloned().unwrap_or(json!({}));
        let key = match command {
            "initialize" => return self.initialize = Some(arguments),
            "attach" => return self.attach = Some(arguments),
            "setBreakpoints" => {
                let source = &arguments["source"];
                let path = source["path"].as_str().or(source["name"].as_str());
                format!("setBreakpoints {}", path.unwrap_or_default())
            }
            "setExceptionBreakpoints" | "setFunctionBreakpoints" | "setDataBreakpoints" => {
                command.to_string()
            }
            _ => return,
        };
        let request = json!({"command": command, "arguments": arguments});
        match self.config.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = request,
            None => self.config.push((key, request)),
        }
    }

    /// Whether the client has attached (there is something to replay).
    pub(super) fn attached(&self) -> bool {
        self.initialize.is_some() && self.attach.is_some()
    }
}

/// Serves the debug port until the task is aborted: one session at a time.
pub(super) async fn serve(listener: TcpListener, runtime: Arc<DockerRuntime>, worker: Uuid) {
    loop {
        let Ok((client, from)) = listener.accept().await else {
            continue;
        };
        eprintln!("workerctl: debug client connected from {from}");
        match session(client, &runtime, worker).await {
            Ok(()) => eprintln!("workerctl: debug client disconnected"),
            Err(e) => eprintln!("workerctl: debug session ended: {e}"),
        }
    }
}

/// The worker's current container: replica 0, running, not an old one
/// parked beside its successor, the newest.
async fn current(runtime: &DockerRuntime, worker: Uuid) -> Option<ManagedContainer> {
    let all = runtime.list().await.ok()?;
    all.into_iter()
        .filter(|c| {
            c.worker_id == Some(WorkerId(worker))
                && c.replica == 0
                && c.state == RunState::Running
                && !c.name.contains("-old-")
        })
        .max_by_key(|c| c.created)
}

/// The first container whose adapter answers (the old one may still run
/// without one while debugging is being turned on).
async fn first_link(runtime: &DockerRuntime, worker: Uuid) -> (AdapterLink, String) {
    let mut said = String::new();
    loop {
        if let Some(c) = current(runtime, worker).await {
            match link::connect(runtime, &c.id).await {
                Ok(l) => return (l, c.id),
                Err(e) if e.to_string() != said => {
                    said = e.to_string();
                    eprintln!("workerctl: waiting for the debug adapter: {said}");
                }
                Err(_) => {}
            }
        }
        tokio::time::sleep(LOOK_EVERY).await;
    }
}

async fn session(
    client: tokio::net::TcpStream,
    runtime: &DockerRuntime,
    worker: Uuid,
) -> Result<(), String> {
    let (mut client_in, mut client_out) = client.into_split();
    let (mut adapter, mut attached_to) = first_link(runtime, worker).await;
    let mut from_client = Framer::default();
    let mut from_adapter = Framer::default();
    let mut replay = Replay::default();
    let mut look = tokio::time::interval(LOOK_EVERY);
    let mut buf = vec![0u8; 64 * 1024];
    let mut ending = false;
    loop {
        tokio::select! {
            // Cancel-safe: a read that has not completed consumed nothing.
            read = client_in.read(&mut buf) => {
                let n = read.map_err(|e| format!("the client's connection failed: {e}"))?;
                if n == 0 {
                    let _ = send(&mut adapter.input, &disconnect()).await;
                    return Ok(());
                }
                from_client.push(&buf[..n]);
                while let Some(message) = from_client.next()? {
                    replay.record(&message);
                    ending |= message["command"] == "disconnect";
                    send(&mut adapter.input, &message).await?;
                }
            }
            // Cancel-safe: `next` on a stream loses no item when dropped.
            chunk = adapter.output.next() => match chunk {
                Some(FromRelay::Adapter(bytes)) => {
                    from_adapter.push(&bytes);
                    while let Some(message) = from_adapter.next()? {
                        if is_own(&message) {
                            continue;
                        }
                        let done = ending && message["command"] == "disconnect";
                        send(&mut client_out, &message).await?;
                        if done {
                            return Ok(());
                        }
                    }
                }
                Some(FromRelay::Said(line)) => eprintln!("workerctl: debug relay: {line}"),
                // The container stopped; the next look finds its successor.
                None => {
                    if ending {
                        return Ok(());
                    }
                    (adapter, attached_to) = first_link(runtime, worker).await;
                    from_adapter = Framer::default();
                    if replay.attached() {
                        let (new, framer) = replay_on(adapter, &replay).await?;
                        (adapter, from_adapter) = (new, framer);
                        moved(&mut client_out, &attached_to).await?;
                    }
                }
            },
            // Cancel-safe: a tick not taken is taken by the next select.
            _ = look.tick(), if replay.attached() && !ending => {
                let Some(newer) = current(runtime, worker).await else { continue };
                if newer.id == attached_to {
                    continue;
                }
                let Ok(fresh) = link::connect(runtime, &newer.id).await else { continue };
                let Ok((fresh, framer)) = replay_on(fresh, &replay).await else { continue };
                let mut old = std::mem::replace(&mut adapter, fresh);
                // Lets any thread the old adapter holds at a breakpoint go on,
                // so the old container stops in its own time.
                let _ = send(&mut old.input, &disconnect()).await;
                from_adapter = framer;
                attached_to = newer.id;
                moved(&mut client_out, &newer.name).await?;
            }
        }
    }
}

/// A `disconnect` of the session's own that leaves the worker running.
fn disconnect() -> Value {
    json!({"seq": OWN_SEQ - 1, "type": "request", "command": "disconnect",
           "arguments": {"terminateDebuggee": false}})
}

/// An answer to a request the session itself sent.
fn is_own(message: &Value) -> bool {
    message["type"] == "response" && message["request_seq"].as_i64() >= Some(OWN_SEQ - 1)
}

async fn send(to: &mut (impl AsyncWrite + Unpin), message: &Value) -> Result<(), String> {
    to.write_all(&frame(message))
        .await
        .map_err(|e| format!("cannot relay a debug message: {e}"))?;
    to.flush()
        .await
        .map_err(|e| format!("cannot relay a debug message: {e}"))
}

/// Tells the client that the session moved: the threads it knew are gone
/// (none is stopped any more), and a line for its console.
async fn moved(client: &mut OwnedWriteHalf, container: &str) -> Result<(), String> {
    eprintln!("workerctl: debug session moved to container {container}");
    send(
        client,
        &json!({"seq": 0, "type": "event", "event": "continued",
                "body": {"threadId": 0, "allThreadsContinued": true}}),
    )
    .await?;
    send(
        client,
        &json!({"seq": 0, "type": "event", "event": "output",
                "body": {"category": "console",
                         "output": format!("workerctl: now debugging container {container}; breakpoints set again\n")}}),
    )
    .await
}

/// Replays the session on a new adapter: initialize, attach, the kept
/// breakpoint requests, configurationDone; waits for the answers that say
/// it is attached. What the adapter says meanwhile is not the client's.
async fn replay_on(
    mut adapter: AdapterLink,
    replay: &Replay,
) -> Result<(AdapterLink, Framer), String> {
    let mut framer = Framer::default();
    let run = async {
        let mut seq = OWN_SEQ;
        let mut request = |command: &str, arguments: &Value| {
            seq += 1;
            json!({"seq": seq, "type": "request", "command": command, "arguments": arguments})
        };
        let initialize = request(
            "initialize",
            replay.initialize.as_ref().unwrap_or(&json!({})),
        );
        send(&mut adapter.input, &initialize).await?;
        wait_for(&mut adapter, &mut framer, |m| answers(m, &initialize)).await?;
        let attach = request("attach", replay.attach.as_ref().unwrap_or(&json!({})));
        send(&mut adapter.input, &attach).await?;
        wait_for(&mut adapter, &mut framer, |m| m["event"] == "initialized").await?;
        for (_, kept) in &replay.config {
            let command = kept["command"].as_str().unwrap_or_default();
            send(&mut adapter.input, &request(command, &kept["arguments"])).await?;
        }
        let done = request("configurationDone", &json!({}));
        send(&mut adapter.input, &done).await?;
        wait_for(&mut adapter, &mut framer, |m| answers(m, &attach)).await?;
        Ok::<(), String>(())
    };
    match tokio::time::timeout(MOVE_TIMEOUT, run).await {
        Ok(Ok(())) => Ok((adapter, framer)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err("the new container's debug adapter did not answer in time".into()),
    }
}

/// Whether `message` is the answer to `request`.
fn answers(message: &Value, request: &Value) -> bool {
    message["type"] == "response" && message["request_seq"] == request["seq"]
}

/// Reads the adapter until a message `wanted` arrives; drops the others.
async fn wait_for(
    adapter: &mut AdapterLink,
    framer: &mut Framer,
    wanted: impl Fn(&Value) -> bool,
) -> Result<Value, String> {
    loop {
        while let Some(message) = framer.next()? {
            if message["type"] == "response" && message["success"] == false {
                return Err(format!(
                    "the debug adapter refused {}: {}",
                    message["command"], message["message"]
                ));
            }
            if wanted(&message) {
                return Ok(message);
            }
        }
        match adapter.output.next().await {
            Some(FromRelay::Adapter(bytes)) => framer.push(&bytes),
            Some(FromRelay::Said(line)) => eprintln!("workerctl: debug relay: {line}"),
            None => return Err("the new container's debug relay ended".into()),
        }
    }
}

/// The launch configuration of VS Code for this worker and file.
pub(super) fn launch_configuration(name: &str, port: u16, local: &str) -> String {
    let config = json!({
        "name": format!("workerctl: {name}"),
        "type": "debugpy",
        "request": "attach",
        "connect": {"host": "127.0.0.1", "port": port},
        "pathMappings": [{"localRoot": local, "remoteRoot": REMOTE_PATH}],
        "justMyCode": true
    });
    serde_json::to_string_pretty(&config).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framer_reads_messages_split_anywhere() {
        let mut bytes = frame(&json!({"seq": 1, "type": "event", "event": "a"}));
        bytes.extend(frame(&json!({"seq": 2, "type": "event", "event": "b"})));
        let mut framer = Framer::default();
        let mut seen = Vec::new();
        for byte in bytes.chunks(3) {
            framer.push(byte);
            while let Some(m) = framer.next().expect("valid frames") {
                seen.push(m["event"].as_str().expect("an event").to_string());
            }
        }
        assert_eq!(seen, ["a", "b"]);
    }

    #[test]
    fn framer_refuses_a_header_without_length() {
        let mut framer = Framer::default();
        framer.push(b"X-Other: 1\r\n\r\n{}");
        assert!(framer.next().is_err());
    }

    #[test]
    fn replay_keeps_the_latest_breakpoints_per_source() {
        let mut replay = Replay::default();
        let set = |path: &str, line: i64| {
            json!({"seq": 3, "type": "request", "command": "setBreakpoints",
                   "arguments": {"source": {"path": path}, "breakpoints": [{"line": line}]}})
        };
        replay.record(&json!({"seq": 1, "type": "request", "command": "initialize", "arguments": {"adapterID": "x"}}));
        assert!(!replay.attached());
        replay.record(&json!({"seq": 2, "type": "request", "command": "attach", "arguments": {}}));
        replay.record(&set("/a.py", 1));
        replay.record(&set("/b.py", 2));
        replay.record(&set("/a.py", 5));
        replay
            .record(&json!({"seq": 9, "type": "request", "command": "evaluate", "arguments": {}}));
        assert!(replay.attached());
        let lines: Vec<i64> = replay
            .config
            .iter()
            .map(|(_, r)| {
                r["arguments"]["breakpoints"][0]["line"]
                    .as_i64()
                    .expect("a line")
            })
            .collect();
        assert_eq!(
            lines,
            [5, 2],
            "a.py's latest, then b.py's; evaluate not kept"
        );
    }

    #[test]
    fn answers_to_the_sessions_own_requests_are_not_the_clients() {
        assert!(is_own(
            &json!({"type": "response", "request_seq": OWN_SEQ + 3})
        ));
        assert!(is_own(
            &json!({"type": "response", "request_seq": OWN_SEQ - 1})
        ));
        assert!(!is_own(&json!({"type": "response", "request_seq": 12})));
        assert!(!is_own(&json!({"type": "event", "event": "stopped"})));
    }
}
