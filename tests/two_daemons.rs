//! Two daemons, one database: two `workerctl run` processes (the real
//! binary) with the same `instance` on a fresh database (`#[sqlx::test]`).
//! One leads and acts, the other stands by and says so on `/readyz`. The
//! leader is killed with SIGKILL in the middle of a rollout; the standby
//! takes over and finishes it, and at no point do two containers of the
//! same revision of the worker run.
//!
//! Needs Postgres (`DATABASE_URL`), Docker and `workerctl/busybox:latest`
//! (`scripts/build-images`); without them the test fails, it never skips.
//! Its containers are removed at the end, whether it passed or not.

mod common;

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use bollard::Docker;
use bollard::query_parameters::ListContainersOptionsBuilder;
use sqlx::PgPool;
use tokio::process::{Child, Command};
use uuid::Uuid;
use workerctl::archive::{DEFAULT_USERCODE, sensorbucket_archive};
use workerctl::model::labels;
use workerctl::store::postgres::PgStore;

const BIN: &str = env!("CARGO_BIN_EXE_workerctl");
/// The stand-in worker with a HEALTHCHECK: a daemon that takes over sees
/// readiness in the engine, while the ready report went to the dead leader
/// (reports live in the memory of the daemon that received them). A
/// `silent.*` entrypoint is healthy only once the test creates `/tmp/go`
/// in it, so the test decides when a rollout to it can finish.
const IMAGE: &str = "workerctl-test/gated-worker:latest";

fn image() -> &'static str {
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| {
        let base = common::stand_in_image();
        let dir = tempfile::tempdir().expect("temp dir");
        let dockerfile =
            format!("FROM {base}\nHEALTHCHECK --interval=1s --timeout=1s --retries=3 CMD [ \"$CODE_ENTRYPOINT\" != silent.main ] || [ -e /tmp/go ]\n");
        std::fs::write(dir.path().join("Dockerfile"), dockerfile).expect("write Dockerfile");
        let out = std::process::Command::new("docker")
            .args(["build", "-q", "-t", IMAGE])
            .arg(dir.path())
            .output()
            .expect("the docker CLI runs");
        assert!(
            out.status.success(),
            "building {IMAGE} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
    IMAGE
}

/// Removes the instance's containers when dropped, passed or not.
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let filter = format!("label={}={}", labels::INSTANCE, self.0);
        let listed = std::process::Command::new("docker")
            .args(["ps", "-aq", "--filter", &filter])
            .output();
        let ids = listed
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        for id in ids.split_whitespace() {
            let _ = std::process::Command::new("docker")
                .args(["rm", "-f", id])
                .output();
        }
    }
}
/// Only catches a hang.
const MUST_HAPPEN: Duration = Duration::from_secs(120);

struct Daemon {
    child: Child,
    port: u16,
}

impl Daemon {
    /// A daemon listening on a port of its own. Both hand containers the
    /// same `public_url`, as daemons of one instance must (it is part of
    /// every container's spec: with different ones, a daemon taking over
    /// would replace every container); here it is the first daemon's.
    fn start(url: &str, instance: &str, public_port: Option<u16>) -> Daemon {
        let port = common::free_port();
        let public_port = public_port.unwrap_or(port);
        let env = [
            ("WORKERCTL_DATABASE_URL", url.to_string()),
            ("WORKERCTL_INSTANCE", instance.to_string()),
            ("WORKERCTL_DOCKER__IMAGE", image().to_string()),
            ("WORKERCTL_DOCKER__NETWORK", "host".into()),
            ("WORKERCTL_DOCKER__STOP_TIMEOUT", "2s".into()),
            ("WORKERCTL_RECONCILE__INTERVAL", "1s".into()),
            ("WORKERCTL_LEADER__HEARTBEAT", "250ms".into()),
            ("WORKERCTL_LEADER__LEASE", "3s".into()),
            ("WORKERCTL_CODE_SERVER__LISTEN", format!("127.0.0.1:{port}")),
            (
                "WORKERCTL_CODE_SERVER__PUBLIC_URL",
                format!("http://127.0.0.1:{public_port}"),
            ),
        ];
        let mut command = Command::new(BIN);
        command
            .arg("run")
            .env_remove("WORKERCTL_CONFIG")
            .envs(env)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        let child = command.spawn().expect("workerctl run starts");
        Daemon { child, port }
    }

    /// The body of `/readyz`, if it answers.
    async fn readyz(&self) -> Option<String> {
        let url = format!("http://127.0.0.1:{}/readyz", self.port);
        let response = reqwest::get(url).await.ok()?;
        response.text().await.ok()
    }

    /// The `workerctl_leader` gauge on `/metrics`.
    async fn leader_gauge(&self) -> Option<String> {
        let url = format!("http://127.0.0.1:{}/metrics", self.port);
        let text = reqwest::get(url).await.ok()?.text().await.ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("workerctl_leader "))
            .map(str::to_string)
    }

    async fn leads(&self) -> bool {
        self.readyz().await.as_deref() == Some("ready\n")
    }

    async fn stands_by(&self) -> bool {
        self.readyz()
            .await
            .is_some_and(|body| body.starts_with("ready, standby: "))
    }
}

/// Running containers of the instance: their revision labels.
async fn running(docker: &Docker, instance: &str) -> Vec<String> {
    let filters = HashMap::from([
        ("label", vec![format!("{}={instance}", labels::INSTANCE)]),
        ("status", vec!["running".to_string()]),
    ]);
    let options = ListContainersOptionsBuilder::default()
        .filters(&filters)
        .build();
    let listed = docker.list_containers(Some(options)).await.expect("lists");
    listed
        .into_iter()
        .map(|c| {
            let labels = c.labels.unwrap_or_default();
            labels.get(labels::REVISION).cloned().unwrap_or_default()
        })
        .collect()
}

/// The id of the instance's container of `revision`.
async fn container_of(docker: &Docker, instance: &str, revision: &str) -> String {
    let filters = HashMap::from([(
        "label",
        vec![
            format!("{}={instance}", labels::INSTANCE),
            format!("{}={revision}", labels::REVISION),
        ],
    )]);
    let options = ListContainersOptionsBuilder::default()
        .all(true)
        .filters(&filters)
        .build();
    let listed = docker.list_containers(Some(options)).await.expect("lists");
    let [c] = listed.as_slice() else {
        panic!("one container of revision {revision}: {listed:?}");
    };
    c.id.clone().expect("an id")
}

/// Fails if two running containers share a revision (one replica each).
fn no_twins(revisions: &[String]) {
    let mut seen = std::collections::HashSet::new();
    for r in revisions {
        assert!(
            seen.insert(r),
            "two containers of revision {r} run: {revisions:?}"
        );
    }
}

/// Polls until `done`, checking [`no_twins`] at every look.
async fn watch(
    docker: &Docker,
    instance: &str,
    what: &str,
    mut done: impl AsyncFnMut(&[String]) -> bool,
) {
    let wait = async {
        loop {
            let revisions = running(docker, instance).await;
            no_twins(&revisions);
            if done(&revisions).await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(MUST_HAPPEN, wait)
        .await
        .unwrap_or_else(|_| panic!("{what}: not within {MUST_HAPPEN:?}"));
}

#[sqlx::test]
async fn the_standby_finishes_a_rollout_whose_leader_was_killed(pool: PgPool) {
    PgStore::from_pool(pool.clone())
        .migrate()
        .await
        .expect("migrations apply");
    let url = common::database_url(&pool);
    let instance = format!("t{}", &Uuid::new_v4().simple().to_string()[..12]);
    let docker = Docker::connect_with_local_defaults().expect("a Docker client");
    let _cleanup = Cleanup(instance.clone());
    image();
    let mut a = Daemon::start(&url, &instance, None);
    let mut b = Daemon::start(&url, &instance, Some(a.port));

    let id = Uuid::now_v7();
    let code = sensorbucket_archive(DEFAULT_USERCODE).expect("an archive");
    sqlx::query(
        "INSERT INTO user_workers (id, name, state, language, revision, status, source)
         VALUES ($1, 'pair', 'enabled', 'python', 1, 'unknown', $2)",
    )
    .bind(id)
    .bind(&code)
    .execute(&pool)
    .await
    .expect("a worker row");

    watch(&docker, &instance, "revision 1 runs", async |r| r == ["1"]).await;
    let leader_is_a = tokio::time::timeout(MUST_HAPPEN, async {
        loop {
            match (
                a.leads().await,
                b.stands_by().await,
                b.leads().await,
                a.stands_by().await,
            ) {
                (true, true, _, _) => return true,
                (_, _, true, true) => return false,
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
    .await
    .expect("one daemon leads, the other stands by");
    let (leader, standby) = if leader_is_a {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    assert_eq!(leader.leader_gauge().await.as_deref(), Some("1"));
    assert_eq!(standby.leader_gauge().await.as_deref(), Some("0"));

    // A new revision, which says it is ready only through its health check,
    // and that only once the test lets it: the leader starts it beside the
    // old one ...
    let new_code =
        sensorbucket_archive("def process(msg):\n    return msg  # v2\n").expect("an archive");
    sqlx::query(
        "UPDATE user_workers SET source = $2, revision = revision + 1, entrypoint = 'silent.main'
          WHERE id = $1",
    )
    .bind(id)
    .bind(&new_code)
    .execute(&pool)
    .await
    .expect("a code save");
    watch(
        &docker,
        &instance,
        "revision 2 starts beside 1",
        async |r| r.len() == 2,
    )
    .await;
    // ... and dies in the middle of the rollout.
    leader.child.start_kill().expect("SIGKILL");
    leader.child.wait().await.expect("the leader is dead");
    // Still in the middle: revision 1 serves, revision 2 is not healthy
    // yet, so nothing could have finished the rollout.
    let revisions = running(&docker, &instance).await;
    assert_eq!(revisions.len(), 2, "both revisions run: {revisions:?}");
    let new = container_of(&docker, &instance, "2").await;
    let health = docker
        .inspect_container(&new, None)
        .await
        .expect("inspect revision 2")
        .state
        .and_then(|s| s.health)
        .and_then(|h| h.status);
    assert_ne!(
        health,
        Some(bollard::models::HealthStatusEnum::HEALTHY),
        "revision 2 is not ready yet"
    );
    let go = std::process::Command::new("docker")
        .args(["exec", &new, "touch", "/tmp/go"])
        .output()
        .expect("docker exec");
    assert!(go.status.success(), "{go:?}");

    watch(
        &docker,
        &instance,
        "the standby finishes the rollout",
        async |r| r == ["2"],
    )
    .await;
    assert!(standby.leads().await, "the standby leads now");

    let _ = standby.child.start_kill();
}

#[sqlx::test]
async fn a_one_off_pass_refuses_to_run_beside_a_leading_daemon(pool: PgPool) {
    PgStore::from_pool(pool.clone())
        .migrate()
        .await
        .expect("migrations apply");
    let url = common::database_url(&pool);
    let instance = format!("t{}", &Uuid::new_v4().simple().to_string()[..12]);
    let _cleanup = Cleanup(instance.clone());
    let once = async || {
        Command::new(BIN)
            .args(["reconcile", "--once"])
            .env_remove("WORKERCTL_CONFIG")
            .env("WORKERCTL_DATABASE_URL", &url)
            .env("WORKERCTL_INSTANCE", &instance)
            .env("WORKERCTL_DOCKER__IMAGE", image())
            .output()
            .await
            .expect("the binary runs")
    };
    let alone = once().await;
    let said = String::from_utf8_lossy(&alone.stderr);
    assert!(alone.status.success(), "with no daemon a pass runs: {said}");
    let mut daemon = Daemon::start(&url, &instance, None);
    tokio::time::timeout(MUST_HAPPEN, async {
        while !daemon.leads().await {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the daemon leads");
    let out = once().await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("is led by workerctl-leader"), "{stderr}");
    let _ = daemon.child.start_kill();
}
