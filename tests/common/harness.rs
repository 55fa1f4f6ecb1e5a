//! The harness of the trigger tests: the real binary as a child process
//! against a fresh database per test, and `workerctl run` as a daemon on a
//! free port. Shared by `tests/cli.rs` and `tests/triggers.rs`.
#![allow(dead_code)]

use std::io::{Cursor, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command as StdCommand, Stdio};

use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::process::{Child, Command};
use uuid::Uuid;

use crate::common::{amqp_url, database_url, free_port, worker_image};

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_workerctl");
pub(crate) const ECHO_PY: &str = "def process(msg):\n    return msg\n";

// ---------------------------------------------------------------- harness --

/// What a command did.
#[derive(Debug)]
pub(crate) struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub(crate) fn ok(self) -> Out {
        assert_eq!(self.code, 0, "command failed: {self:#?}");
        self
    }

    /// Asserts the failure: this exit code, and one line on stderr naming `needle`.
    pub(crate) fn fails(&self, code: i32, needle: &str) -> &str {
        let line = self.stderr.trim_end();
        assert!(!line.contains('\n'), "one line on stderr: {self:#?}");
        self.fails_last(code, needle)
    }

    /// Like [`fails`](Self::fails), for commands that show progress first:
    /// the error is the last line.
    pub(crate) fn fails_last(&self, code: i32, needle: &str) -> &str {
        assert_eq!(self.code, code, "exit code: {self:#?}");
        let line = self.stderr.lines().last().unwrap_or_default();
        assert!(line.starts_with("workerctl: "), "{line}");
        assert!(line.contains(needle), "{needle:?} missing from: {line}");
        let errors = self.stderr.lines().filter(|l| l.starts_with("workerctl: "));
        assert_eq!(errors.count(), 1, "one error line: {self:#?}");
        line
    }
}

/// The binary configured for one test: its database, instance and broker.
pub(crate) struct Cli {
    pub pool: PgPool,
    pub env: Vec<(String, String)>,
    pub instance: String,
    pub dir: tempfile::TempDir,
}

impl Cli {
    pub(crate) async fn new(pool: PgPool) -> Cli {
        let instance = format!("cli{}", &Uuid::new_v4().simple().to_string()[..10]);
        let url = database_url(&pool);
        let cli = Cli {
            pool,
            env: vec![
                ("WORKERCTL_DATABASE_URL".into(), url),
                ("WORKERCTL_INSTANCE".into(), instance.clone()),
                ("WORKERCTL_AMQP__URL".into(), amqp_url()),
            ],
            instance,
            dir: tempfile::tempdir().expect("temp dir"),
        };
        cli.run(&["migrate"]).await.ok();
        cli
    }

    pub(crate) fn set(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.into(), value.into()));
    }

    pub(crate) fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        // Only this test's settings: nothing from the caller's environment.
        for (key, _) in std::env::vars() {
            if key.starts_with("WORKERCTL_") || key == "RUST_LOG" {
                cmd.env_remove(key);
            }
        }
        cmd.args(args)
            .envs(self.env.iter().cloned())
            .kill_on_drop(true);
        cmd
    }

    pub(crate) async fn run(&self, args: &[&str]) -> Out {
        let out = self
            .command(args)
            .stdin(Stdio::null())
            .output()
            .await
            .expect("workerctl runs");
        Out {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    pub(crate) fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, bytes).expect("write test file");
        path
    }

    /// `worker create` from Python code; returns the id it printed.
    pub(crate) async fn create(&self, name: &str, code: &str, more: &[&str]) -> Uuid {
        let path = self.file(&format!("{name}.py"), code.as_bytes());
        let mut args = vec!["worker", "create", "--name", name, "--code", s(&path)];
        args.extend_from_slice(more);
        let out = self.run(&args).await.ok();
        Uuid::parse_str(out.stdout.trim()).expect("create prints the id on stdout")
    }

    pub(crate) async fn row(&self, id: Uuid) -> Row {
        sqlx::query_as(
            "SELECT name, description, state, language, revision, status, status_info, entrypoint, source
               FROM user_workers WHERE id = $1",
        )
        .bind(id)
        .fetch_one(&self.pool)
        .await
        .expect("worker row")
    }

    /// Every row, to show that a failed command changed nothing.
    pub(crate) async fn snapshot(&self) -> Vec<Row> {
        sqlx::query_as(
            "SELECT name, description, state, language, revision, status, status_info, entrypoint, source
               FROM user_workers ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await
        .expect("rows")
    }

    /// A worker as the dashboard (or a hand edit) would insert it.
    pub(crate) async fn insert(&self, name: &str) -> Uuid {
        let id = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO user_workers (id, name, state, language, revision, status, source)
             VALUES ($1, $2, 'disabled', 'python', 1, 'unknown', $3)",
        )
        .bind(id)
        .bind(name)
        .bind(workerctl::archive::sensorbucket_archive(ECHO_PY).expect("archive"))
        .execute(&self.pool)
        .await
        .expect("insert");
        id
    }
}

#[derive(Debug, PartialEq, Eq, sqlx::FromRow)]
pub(crate) struct Row {
    pub name: String,
    pub description: String,
    pub state: String,
    pub language: String,
    pub revision: i32,
    pub status: String,
    pub status_info: String,
    pub entrypoint: String,
    pub source: Option<Vec<u8>>,
}

pub(crate) fn s(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

pub(crate) fn zip_of(files: &[(&str, &str)]) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    for (name, body) in files {
        zip.start_file(*name, zip::write::SimpleFileOptions::default())
            .expect("start file");
        zip.write_all(body.as_bytes()).expect("write");
    }
    zip.finish().expect("finish").into_inner()
}

pub(crate) fn members(source: &[u8]) -> Vec<String> {
    let zip = zip::ZipArchive::new(Cursor::new(source)).expect("stored code is a zip");
    let mut names: Vec<String> = zip
        .file_names()
        .map(|n| n.expect("utf-8 name").into_owned())
        .collect();
    names.sort();
    names
}

pub(crate) fn member(source: &[u8], name: &str) -> String {
    let mut zip = zip::ZipArchive::new(Cursor::new(source)).expect("stored code is a zip");
    let mut text = String::new();
    zip.by_name(name)
        .expect("member")
        .read_to_string(&mut text)
        .expect("utf-8");
    text
}

// ------------------------------------------------------------------ daemon --

/// `workerctl run` as a child, configured like the CLI of the test.
pub(crate) struct Daemon {
    pub child: Child,
    pub instance: String,
    pub exchange: Option<String>,
    /// Queues the dockerworker declared for this test's workers.
    pub queues: Vec<String>,
    pub log: PathBuf,
    /// Where its HTTP server listens (127.0.0.1).
    pub port: u16,
}

impl Daemon {
    pub(crate) async fn start(cli: &mut Cli, image: &str) -> Daemon {
        let port = free_port();
        for (key, value) in [
            ("WORKERCTL_DOCKER__IMAGE", image.to_string()),
            ("WORKERCTL_DOCKER__NETWORK", "host".into()),
            ("WORKERCTL_DOCKER__STOP_TIMEOUT", "2s".into()),
            // A quick resync: a container that dies before the daemon's
            // Docker event stream is connected is noticed within a second.
            ("WORKERCTL_RECONCILE__INTERVAL", "1s".into()),
            ("WORKERCTL_RECONCILE__BACKOFF_INITIAL", "200ms".into()),
            ("WORKERCTL_RECONCILE__BACKOFF_MAX", "2s".into()),
            ("WORKERCTL_CODE_SERVER__LISTEN", format!("127.0.0.1:{port}")),
            (
                "WORKERCTL_CODE_SERVER__PUBLIC_URL",
                format!("http://127.0.0.1:{port}"),
            ),
        ] {
            cli.set(key, &value);
        }
        let log = cli.dir.path().join("daemon.log");
        let file = std::fs::File::create(&log).expect("daemon log file");
        let child = cli
            .command(&["run"])
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("workerctl run starts");
        Daemon {
            child,
            instance: cli.instance.clone(),
            exchange: None,
            queues: Vec::new(),
            log,
            port,
        }
    }

    /// Removes the worker's queues at the end of the test.
    pub(crate) fn remember(&mut self, id: Uuid) {
        self.queues.push(format!("worker_{id}"));
        self.queues.push(format!("worker_{id}.retry"));
    }

    /// The daemon's log, for failure messages.
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    /// Runs on success and on panic: the daemon, then its containers, then
    /// the broker objects the test's workers declared.
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let filter = format!("label=workerctl.instance={}", self.instance);
        if let Ok(out) = StdCommand::new("docker")
            .args(["ps", "-aq", "--filter", &filter])
            .output()
        {
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = StdCommand::new("docker").args(["rm", "-f", id]).output();
            }
        }
        if let Some(exchange) = self.exchange.take() {
            let queues = std::mem::take(&mut self.queues);
            let _ = std::thread::spawn(move || remove_broker_objects(exchange, queues)).join();
        }
    }
}

/// Deletes a test exchange and the worker queues bound to it.
pub(crate) fn remove_broker_objects(exchange: String, queues: Vec<String>) {
    use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
    let Ok(runtime) = tokio::runtime::Runtime::new() else {
        return;
    };
    runtime.block_on(async move {
        let props = lapin::ConnectionProperties::default();
        let Ok(conn) = lapin::Connection::connect(&amqp_url(), props).await else {
            return;
        };
        let Ok(channel) = conn.create_channel().await else {
            return;
        };
        for queue in queues {
            let _ = channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = channel
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await;
        let _ = conn.close(200, "done".into()).await;
    });
}

/// A CLI and a daemon running the real dockerworker on an exchange of the
/// test's own.
pub(crate) async fn pipeline(pool: PgPool) -> (Cli, Daemon) {
    let mut cli = Cli::new(pool).await;
    let exchange = format!("pipeline.messages.cli-test-{}", Uuid::new_v4().simple());
    cli.set("WORKERCTL_AMQP__EXCHANGE", &exchange);
    let mut daemon = Daemon::start(&mut cli, worker_image()).await;
    daemon.exchange = Some(exchange);
    (cli, daemon)
}

/// Only catches a hang: a terminal shows what it waits for within seconds.
const SCREEN_DEADLINE: Duration = Duration::from_secs(90);

/// A terminal: `workerctl worker dev` under tmux, on a server of its own.
pub(crate) struct Terminal {
    socket: String,
}

impl Terminal {
    pub(crate) fn start(cli: &Cli, args: &[&str]) -> Terminal {
        let socket = format!("wd{}", &Uuid::new_v4().simple().to_string()[..10]);
        let conf = cli.file("tmux.conf", b"set -g history-limit 50000\n");
        let mut line = String::from("env");
        for (k, v) in &cli.env {
            line.push_str(&format!(" {k}='{v}'"));
        }
        line.push_str(&format!(" {}", BIN));
        for a in args {
            line.push_str(&format!(" '{a}'"));
        }
        line.push_str("; echo EXITED; sleep 600");
        let status = StdCommand::new("tmux")
            .args([
                "-L",
                &socket,
                "-f",
                s(&conf),
                "new-session",
                "-d",
                "-x",
                "200",
                "-y",
                "50",
                &line,
            ])
            .status()
            .expect("tmux runs (apt-get install tmux)");
        assert!(status.success());
        Terminal { socket }
    }

    pub(crate) fn screen(&self) -> String {
        let out = StdCommand::new("tmux")
            .args([
                "-L",
                &self.socket,
                "capture-pane",
                "-p",
                "-J",
                "-S",
                "-50000",
            ])
            .output()
            .expect("capture-pane");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until the screen shows `needle` `n` times.
    pub(crate) async fn wait_for(&self, needle: &str, n: usize) -> String {
        let start = Instant::now();
        loop {
            let screen = self.screen();
            if screen.matches(needle).count() >= n {
                return screen;
            }
            assert!(
                start.elapsed() < SCREEN_DEADLINE,
                "{needle:?} x{n} never showed:\n{screen}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub(crate) fn keys(&self, keys: &str) {
        let _ = StdCommand::new("tmux")
            .args(["-L", &self.socket, "send-keys", keys])
            .status();
    }
}

/// Saves as editors do: a new file renamed over the old one, so that no
/// half-written file is ever seen.
pub(crate) fn save(path: &Path, code: &[u8]) {
    let tmp = path.with_extension("py.tmp");
    std::fs::write(&tmp, code).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = StdCommand::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .status();
    }
}
