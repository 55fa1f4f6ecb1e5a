//! Breakpoints, end to end: `workerctl worker dev --debug` against a real
//! daemon, a real dockerworker container with debugpy, and RabbitMQ. A small
//! DAP client (Content-Length framed JSON over TCP, here) attaches to the
//! CLI's port on 127.0.0.1, sets a breakpoint in `process`, and a message
//! published to the worker stops there; the client reads a local variable
//! and continues, and the output arrives on the next step. A save moves the
//! session to the new revision's container and the breakpoint holds without
//! attaching again. A worker not started with --debug has no debug adapter
//! and no published port.
//!
//! Without Postgres, Docker, RabbitMQ or the images (`scripts/build-images`)
//! this test fails; it never skips.

mod common;
#[path = "common/harness.rs"]
mod harness;

use std::path::Path;
use std::process::{Command as StdCommand, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use uuid::Uuid;

use harness::s;

const DEADLINE: Duration = Duration::from_secs(90);

/// Line 3 is where the breakpoint goes: `doubled` is set by then.
const CODE_V1: &str = "\
def process(msg):
    doubled = int(msg.payload.decode()) * 2
    msg.create_measurement(doubled, 'count', '1').add()
    return msg
";
/// The save: the same line, another factor.
const CODE_V2: &str = "\
def process(msg):
    doubled = int(msg.payload.decode()) * 3
    msg.create_measurement(doubled, 'count', '1').add()
    return msg
";
const BREAK_LINE: i64 = 3;
const REMOTE_PATH: &str = "/tmp/usercode/debug/usercode.py";

/// A DAP client over TCP.
struct Dap {
    stream: TcpStream,
    buf: Vec<u8>,
    seq: i64,
}

impl Dap {
    async fn connect(port: u16) -> Dap {
        let start = Instant::now();
        loop {
            if let Ok(stream) = TcpStream::connect(("127.0.0.1", port)).await {
                return Dap {
                    stream,
                    buf: Vec::new(),
                    seq: 0,
                };
            }
            assert!(start.elapsed() < DEADLINE, "nothing listens on {port}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn request(&mut self, command: &str, arguments: Value) -> i64 {
        self.seq += 1;
        let body =
            json!({"seq": self.seq, "type": "request", "command": command, "arguments": arguments})
                .to_string();
        let framed = format!("Content-Length: {}\r\n\r\n{body}", body.len());
        self.stream
            .write_all(framed.as_bytes())
            .await
            .expect("send a request");
        self.seq
    }

    async fn next(&mut self) -> Value {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let header = String::from_utf8_lossy(&self.buf[..end]).to_string();
                let length: usize = header
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length:"))
                    .expect("a Content-Length header")
                    .trim()
                    .parse()
                    .expect("a length");
                if self.buf.len() >= end + 4 + length {
                    let body: Vec<u8> = self.buf.drain(..end + 4 + length).skip(end + 4).collect();
                    return serde_json::from_slice(&body).expect("a JSON message");
                }
            }
            let mut chunk = [0u8; 8192];
            let n = self.stream.read(&mut chunk).await.expect("read");
            assert!(n > 0, "the debug port closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads until `wanted`; returns it and what came before.
    async fn until(&mut self, what: &str, wanted: impl Fn(&Value) -> bool) -> (Value, Vec<Value>) {
        let mut before = Vec::new();
        let read = async {
            loop {
                let message = self.next().await;
                if wanted(&message) {
                    return message;
                }
                before.push(message);
            }
        };
        let found = tokio::time::timeout(DEADLINE, read)
            .await
            .unwrap_or_else(|_| panic!("no {what} within the deadline"));
        (found, before)
    }

    async fn call(&mut self, command: &str, arguments: Value) -> Value {
        let seq = self.request(command, arguments).await;
        let (answer, _) = self
            .until(command, |m| {
                m["type"] == "response" && m["request_seq"] == seq
            })
            .await;
        assert_eq!(answer["success"], true, "{command}: {answer}");
        answer
    }

    /// initialize, attach with the path mapping, one breakpoint, done.
    async fn attach(&mut self, local: &Path) {
        self.call(
            "initialize",
            json!({"clientID": "workerctl-test", "adapterID": "debugpy",
                   "pathFormat": "path", "linesStartAt1": true, "columnsStartAt1": true}),
        )
        .await;
        let attach = self
            .request(
                "attach",
                json!({"justMyCode": true,
                       "pathMappings": [{"localRoot": s(local), "remoteRoot": REMOTE_PATH}]}),
            )
            .await;
        self.until("initialized", |m| m["event"] == "initialized")
            .await;
        let set = self
            .call(
                "setBreakpoints",
                json!({"source": {"path": s(local)}, "breakpoints": [{"line": BREAK_LINE}]}),
            )
            .await;
        assert_eq!(set["body"]["breakpoints"][0]["verified"], true, "{set}");
        self.request("configurationDone", json!({})).await;
        self.until("attach's answer", |m| {
            m["type"] == "response" && m["request_seq"] == attach
        })
        .await;
    }

    /// Waits for a breakpoint stop; returns the thread, the top frame and
    /// its local variables by name.
    async fn stopped(&mut self) -> (i64, Value, Vec<(String, String)>) {
        let (stop, _) = self.until("a stop", |m| m["event"] == "stopped").await;
        assert_eq!(stop["body"]["reason"], "breakpoint", "{stop}");
        let thread = stop["body"]["threadId"].as_i64().expect("a thread");
        let trace = self
            .call("stackTrace", json!({"threadId": thread, "levels": 1}))
            .await;
        let frame = trace["body"]["stackFrames"][0].clone();
        let scopes = self.call("scopes", json!({"frameId": frame["id"]})).await;
        let locals = scopes["body"]["scopes"][0]["variablesReference"].clone();
        let vars = self
            .call("variables", json!({"variablesReference": locals}))
            .await;
        let vars = vars["body"]["variables"]
            .as_array()
            .expect("variables")
            .iter()
            .map(|v| {
                let text = |k: &str| v[k].as_str().unwrap_or_default().to_string();
                (text("name"), text("value"))
            })
            .collect();
        (thread, frame, vars)
    }
}

fn message(worker: Uuid, next: &str, payload: &str) -> Vec<u8> {
    use base64::Engine as _;
    let body = json!({
        "tracing_id": Uuid::new_v4().to_string(), "tenant_id": 1, "access_token": "",
        "received_at": 1, "pipeline_id": "p", "step_index": 0,
        "pipeline_steps": [worker.to_string(), next], "timestamp": 1_700_000_000_000_i64,
        "payload": base64::engine::general_purpose::STANDARD.encode(payload),
    });
    serde_json::to_vec(&body).expect("json")
}

/// A channel on the test's exchange, and a consumer of what reaches `next`.
async fn broker(
    exchange: &str,
    next: &str,
) -> (lapin::Connection, lapin::Channel, lapin::Consumer) {
    common::amqp::listen(&common::amqp_url(), exchange, &[next]).await
}

async fn publish(channel: &lapin::Channel, exchange: &str, key: Uuid, body: &[u8]) {
    channel
        .basic_publish(
            exchange.into(),
            key.to_string().as_str().into(),
            Default::default(),
            body,
            Default::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("sent");
}

/// The value of the first measurement of the next message on `next`.
async fn output_value(consumer: &mut lapin::Consumer) -> Value {
    let delivery = tokio::time::timeout(DEADLINE, consumer.next())
        .await
        .expect("an output within the deadline")
        .expect("stream open")
        .expect("delivery");
    let body: Value = serde_json::from_slice(&delivery.data).expect("json");
    body["measurements"][0]["value"].clone()
}

fn docker(args: &[&str]) -> (bool, String, String) {
    let out = StdCommand::new("docker")
        .args(args)
        .output()
        .expect("docker runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

/// The worker's running containers that are not parked beside a successor.
fn containers_of(worker: Uuid) -> Vec<String> {
    let filter = format!("label=workerctl.worker-id={worker}");
    let (_, out, _) = docker(&[
        "ps",
        "-q",
        "--filter",
        &filter,
        "--format",
        "{{.ID}} {{.Names}}",
    ]);
    out.lines()
        .filter(|l| !l.contains("-old-"))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

fn env_of(container: &str) -> String {
    docker(&["inspect", "-f", "{{json .Config.Env}}", container]).1
}

fn published_ports(container: &str) -> String {
    docker(&[
        "inspect",
        "-f",
        "{{json .HostConfig.PortBindings}} {{json .NetworkSettings.Ports}}",
        container,
    ])
    .1
}

/// How many memory mappings of the container's processes are debugpy's
/// (its compiled tracer, loaded once it runs).
fn debugpy_mapped(container: &str) -> String {
    let count = "cat /proc/[0-9]*/maps 2>/dev/null | grep -c debugpy || true";
    docker(&["exec", container, "sh", "-c", count]).1
}

/// Waits until the worker's one running container satisfies `ok`.
async fn container_where(worker: Uuid, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let start = Instant::now();
    loop {
        if let [only] = containers_of(worker).as_slice()
            && ok(only)
        {
            return only.clone();
        }
        assert!(
            start.elapsed() < DEADLINE,
            "no container of {worker} {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[sqlx::test(migrations = false)]
async fn a_breakpoint_in_process_stops_a_message_and_survives_a_save(pool: PgPool) {
    let (cli, mut daemon) = harness::pipeline(pool).await;
    let exchange = daemon.exchange.clone().expect("exchange");
    let next = format!("next-{}", Uuid::new_v4().simple());
    let code = cli.file("decoder.py", CODE_V1.as_bytes());
    let id = cli.create("decoder", CODE_V1, &["--wait"]).await;
    daemon.remember(id);
    let plain = cli.create("plain", CODE_V1, &["--wait"]).await;
    daemon.remember(plain);
    let (connection, channel, mut outputs) = broker(&exchange, &next).await;

    let port = common::free_port();
    let port_arg = port.to_string();
    let log = cli.dir.path().join("dev.log");
    let mut dev = cli
        .command(&[
            "worker",
            "dev",
            "decoder",
            "--code",
            s(&code),
            "--debug",
            "--debug-port",
            &port_arg,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("worker dev starts");
    let dev_log = || std::fs::read_to_string(&log).unwrap_or_default();

    let mut dap = Dap::connect(port).await;
    dap.attach(&code).await;
    let debugged = container_where(id, "runs with WORKER_DEBUG=1", |c| {
        env_of(c).contains("WORKER_DEBUG=1")
    })
    .await;
    assert!(
        !published_ports(&debugged).contains("HostPort"),
        "the debug port is never published (the CLI reaches it through the engine): {}",
        published_ports(&debugged)
    );
    assert_ne!(
        debugpy_mapped(&debugged),
        "0",
        "debugpy runs in the --debug worker"
    );

    // A message stops at the breakpoint; the local is there; continue.
    publish(&channel, &exchange, id, &message(id, &next, "21")).await;
    let (thread, frame, vars) = dap.stopped().await;
    assert_eq!(frame["name"], "process", "{frame}");
    assert_eq!(frame["line"], BREAK_LINE, "{frame}");
    assert_eq!(
        frame["source"]["path"],
        s(&code),
        "mapped back to the local file: {frame}"
    );
    assert!(
        vars.contains(&("doubled".into(), "42".into())),
        "{vars:?}\n{}",
        dev_log()
    );
    dap.call("continue", json!({"threadId": thread})).await;
    assert_eq!(output_value(&mut outputs).await, json!(42));

    // A save: the session moves to revision 2's container by itself.
    let tmp = code.with_extension("py.tmp");
    std::fs::write(&tmp, CODE_V2).expect("write");
    std::fs::rename(&tmp, &code).expect("save");
    dap.until("the move to the new container", |m| {
        m["event"] == "output"
            && m["body"]["output"]
                .as_str()
                .is_some_and(|o| o.contains("now debugging container"))
    })
    .await;
    container_where(id, "at revision 2 alone", |c| {
        env_of(c).contains("WORKER_REVISION=2")
    })
    .await;
    publish(&channel, &exchange, id, &message(id, &next, "21")).await;
    let (thread, _, vars) = dap.stopped().await;
    assert!(
        vars.contains(&("doubled".into(), "63".into())),
        "the new code, stopped: {vars:?}"
    );
    dap.call("continue", json!({"threadId": thread})).await;
    assert_eq!(output_value(&mut outputs).await, json!(63));
    dap.call("disconnect", json!({"terminateDebuggee": false}))
        .await;

    // A worker never started with --debug has no adapter and no port.
    let [plain_container] = containers_of(plain)
        .try_into()
        .expect("one container of plain");
    assert!(!env_of(&plain_container).contains("WORKER_DEBUG"));
    assert!(!published_ports(&plain_container).contains("HostPort"));
    let (ok, _, said) = docker(&[
        "exec",
        &plain_container,
        "python",
        "-m",
        "dockerworker",
        "debug-relay",
    ]);
    assert!(!ok && said.contains("not started with --debug"), "{said}");
    assert_eq!(
        debugpy_mapped(&plain_container),
        "0",
        "no debugpy in a worker without --debug"
    );

    // Ctrl-C ends debugging: the daemon replaces the container with one
    // without the adapter.
    let pid = dev.id().expect("dev runs").to_string();
    assert!(
        StdCommand::new("kill")
            .args(["-INT", &pid])
            .status()
            .expect("kill")
            .success()
    );
    let status = tokio::time::timeout(DEADLINE, dev.wait())
        .await
        .expect("dev exits")
        .expect("status");
    assert!(status.success(), "{}", dev_log());
    assert!(
        dev_log().contains("workerctl: debug session moved"),
        "{}",
        dev_log()
    );
    container_where(id, "without WORKER_DEBUG", |c| {
        !env_of(c).contains("WORKER_DEBUG")
    })
    .await;
    let _ = connection.close(200, "done".into()).await;
}
