//! What the integration test crates share: the images they run, and where
//! the services are. Each test crate uses only part of it.
#![allow(dead_code)]

pub(crate) mod amqp;
pub(crate) mod nodes;
pub(crate) mod swarm;

use std::process::Command;
use std::sync::OnceLock;

use sqlx::PgPool;

/// The real runtime, built by scripts/build-images.
pub(crate) const WORKER_IMAGE: &str = "workerctl/dockerworker:latest";

/// A stand-in worker built from busybox: it says hello (on stdout, then on
/// stderr), reports ready to `WORKER_READY_URL` as the dockerworker does
/// once it consumes, and runs until SIGTERM. By its entrypoint:
/// `crash.*` says only "crashing" and exits with code 3 at once (one line:
/// the order of lines across stdout and stderr is not sure); `silent.*`
/// never reports ready; `stubborn.*` ignores SIGTERM and SIGINT (it waits
/// out the whole grace period of a stop). The signal handlers are in place
/// before the ready report: a shell left to its defaults as PID 1 dies of a
/// SIGINT or not depending on whether it is waiting for a child just then.
pub(crate) const STAND_IN_IMAGE: &str = "workerctl-test/worker:latest";
const STAND_IN_SCRIPT: &str = r#"case "$CODE_ENTRYPOINT" in crash.*) echo crashing; exit 3;; esac; echo "hello from revision $WORKER_REVISION"; echo "warming up" >&2; case "$CODE_ENTRYPOINT" in stubborn.*) trap '' INT TERM;; *) trap 'exit 0' INT TERM;; esac; case "$CODE_ENTRYPOINT" in silent.*) ;; *) wget -q -O /dev/null --post-data '' "$WORKER_READY_URL" || echo "cannot report ready";; esac; while :; do sleep 0.1; done"#;

const DEFAULT_AMQP_URL: &str = "amqp://workerctl:workerctl@127.0.0.1:5672/%2f";

/// Builds [`STAND_IN_IMAGE`] once per test process; never pulls.
pub(crate) fn stand_in_image() -> &'static str {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let cmd = serde_json::to_string(&["/bin/sh", "-c", STAND_IN_SCRIPT]).expect("json");
        let dockerfile = format!("FROM workerctl/busybox:latest\nCMD {cmd}\n");
        std::fs::write(dir.path().join("Dockerfile"), dockerfile).expect("write Dockerfile");
        let out = Command::new("docker")
            .args(["build", "-q", "-t", STAND_IN_IMAGE])
            .arg(dir.path())
            .output()
            .expect("the docker CLI runs");
        assert!(
            out.status.success(),
            "building {STAND_IN_IMAGE} failed (is workerctl/busybox:latest built? run scripts/build-images): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
    STAND_IN_IMAGE
}

/// [`WORKER_IMAGE`], or the image `TEST_WORKER_IMAGE` names (a
/// runtime built from a working tree under a tag of its own, so as not to
/// change the shared one), failing loudly if it has not been built.
pub(crate) fn worker_image() -> &'static str {
    static IMAGE: OnceLock<String> = OnceLock::new();
    let image = IMAGE
        .get_or_init(|| std::env::var("TEST_WORKER_IMAGE").unwrap_or_else(|_| WORKER_IMAGE.into()));
    let out = Command::new("docker")
        .args(["image", "inspect", "--format", "{{.Id}}", image])
        .output()
        .expect("the docker CLI runs");
    assert!(
        out.status.success(),
        "the worker image {image} is missing: build it with scripts/build-images ({})",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    image
}

/// An image like SensorBucket's own dockerworker, that knows only the
/// contract's environment (scripts/build-images builds it).
pub(crate) const CONTRACT_WORKER_IMAGE: &str = "workerctl/contract-worker:latest";

/// [`CONTRACT_WORKER_IMAGE`], failing loudly if it has not been built.
pub(crate) fn contract_worker_image() -> &'static str {
    let out = Command::new("docker")
        .args([
            "image",
            "inspect",
            "--format",
            "{{.Id}}",
            CONTRACT_WORKER_IMAGE,
        ])
        .output()
        .expect("the docker CLI runs");
    assert!(
        out.status.success(),
        "the image {CONTRACT_WORKER_IMAGE} is missing: build it with scripts/build-images ({})",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    CONTRACT_WORKER_IMAGE
}

/// The broker: `AMQP_URL`, or the one scripts/services starts.
pub(crate) fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| DEFAULT_AMQP_URL.into())
}

/// The broker's management API: `RABBITMQ_MANAGEMENT_URL`, or the one
/// scripts/services enables.
pub(crate) fn management_url() -> String {
    std::env::var("RABBITMQ_MANAGEMENT_URL").unwrap_or_else(|_| "http://127.0.0.1:15672".into())
}

/// The URL of the fresh database `#[sqlx::test]` made for this test.
pub(crate) fn database_url(pool: &PgPool) -> String {
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL is set by the test harness");
    let db = pool
        .connect_options()
        .get_database()
        .expect("test database")
        .to_string();
    let mut url = reqwest::Url::parse(&base).expect("DATABASE_URL is a URL");
    url.set_path(&db);
    url.to_string()
}

/// A TCP port free at the time of asking.
pub(crate) fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
    listener.local_addr().expect("addr").port()
}
pub(crate) mod relay;
