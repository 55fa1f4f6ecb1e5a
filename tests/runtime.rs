//! `DockerRuntime` against the real Docker engine: no mocks. Each test owns a
//! unique instance (`test-<uuid>`) and removes that instance's containers at
//! the end, whether it passed or not.
//!
//! Needs a running engine and the `workerctl/busybox:latest` image
//! (`scripts/build-images`); without either, the tests fail — they never skip.
//! Nothing is pulled: the one derived image is built locally from busybox.

mod common;

use std::collections::BTreeMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use workerctl::model::ImageState;

use bollard::Docker;
use bollard::models::{ContainerInspectResponse, RestartPolicyNameEnum};
use bollard::query_parameters::{ListContainersOptionsBuilder, RemoveContainerOptionsBuilder};
use futures::FutureExt;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use workerctl::model::{
    ContainerSpec, Hardening, Limits, ManagedContainer, Revision, RunState, WorkerId,
    container_name, labels,
};
use workerctl::runtime::docker::DockerRuntime;
use workerctl::runtime::{ContainerRuntime, RuntimeError};

use common::relay::docker_relay;

const BUSYBOX: &str = "workerctl/busybox:latest";
/// Busybox whose command is the shell script in `$SCRIPT`, so one image
/// serves every behaviour a test needs.
const SCRIPTED: &str = "workerctl-test/scripted:latest";
const MEMORY: i64 = 64 << 20;
const PIDS: i64 = 64;

/// Builds [`SCRIPTED`] once per test process.
fn scripted_image() -> &'static str {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let inspect = Command::new("docker")
            .args(["image", "inspect", BUSYBOX])
            .output();
        let present = inspect
            .expect("the docker CLI must be installed")
            .status
            .success();
        assert!(
            present,
            "{BUSYBOX} is missing: run scripts/build-images first"
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let dockerfile =
            format!("FROM {BUSYBOX}\nCMD [\"/bin/sh\", \"-c\", \"eval \\\"$SCRIPT\\\"\"]\n");
        std::fs::write(dir.path().join("Dockerfile"), dockerfile).expect("write Dockerfile");
        let out = Command::new("docker")
            .args(["build", "-q", "-t", SCRIPTED])
            .arg(dir.path())
            .output()
            .expect("docker build runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "building {SCRIPTED} failed: {stderr}");
    });
    SCRIPTED
}

struct Harness {
    rt: DockerRuntime,
    /// Another instance on the same engine, whose containers `rt` must ignore.
    other: DockerRuntime,
    docker: Docker,
}

impl Harness {
    async fn new() -> Harness {
        let instance = format!("test-{}", Uuid::new_v4());
        Harness {
            rt: connect(&instance).await,
            other: connect(&format!("{instance}-other")).await,
            docker: Docker::connect_with_local_defaults()
                .expect("Docker client")
                .negotiate_version()
                .await
                .expect("Docker engine reachable"),
        }
    }

    /// A worker container of `rt` running `script`.
    fn spec(&self, script: &str) -> ContainerSpec {
        spec_for(self.rt.instance(), script)
    }

    async fn inspect(&self, id: &str) -> ContainerInspectResponse {
        self.docker
            .inspect_container(id, None)
            .await
            .expect("inspect container")
    }

    async fn create_started(&self, spec: &ContainerSpec) -> String {
        let id = self.rt.create(spec).await.expect("create");
        self.rt.start(&id).await.expect("start");
        id
    }

    /// Polls `list` until the container is in a state `done` accepts.
    async fn wait_for(&self, id: &str, done: impl Fn(&RunState) -> bool) -> ManagedContainer {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let listed = self.rt.list().await.expect("list");
            let found = listed
                .into_iter()
                .find(|c| c.id == id)
                .expect("container listed");
            if done(&found.state) || Instant::now() > deadline {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Polls the container's log until it has written `line`, failing the
    /// test after a deadline that only catches a hang.
    async fn wait_for_line(&self, id: &str, line: &str) {
        let wait = async {
            while !self
                .rt
                .last_lines(id, 20)
                .await
                .expect("logs")
                .iter()
                .any(|l| l == line)
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        within(wait, &format!("the line {line:?}")).await;
    }

    async fn cleanup(&self) {
        for instance in [self.rt.instance(), self.other.instance()] {
            let filters = [("label", vec![format!("{}={instance}", labels::INSTANCE)])].into();
            let options = ListContainersOptionsBuilder::default()
                .all(true)
                .filters(&filters);
            let listed = self.docker.list_containers(Some(options.build())).await;
            for id in listed.unwrap_or_default().into_iter().filter_map(|c| c.id) {
                let options = RemoveContainerOptionsBuilder::default()
                    .force(true)
                    .v(true)
                    .build();
                if let Err(e) = self.docker.remove_container(&id, Some(options)).await {
                    eprintln!("cleanup: cannot remove {id}: {e}");
                }
            }
        }
    }
}

async fn connect(instance: &str) -> DockerRuntime {
    match DockerRuntime::connect(instance).await {
        Ok(rt) => rt,
        Err(e) => panic!(
            "these tests need a reachable Docker engine: {:#}",
            anyhow::Error::new(e)
        ),
    }
}

fn spec_for(instance: &str, script: &str) -> ContainerSpec {
    let worker_id = WorkerId(Uuid::now_v7());
    ContainerSpec {
        worker_id,
        revision: Revision(1),
        replica: 0,
        name: container_name(instance, worker_id),
        image: scripted_image().to_string(),
        image_id: String::new(),
        env: BTreeMap::from([("SCRIPT".to_string(), script.to_string())]),
        network: "none".into(),
        limits: Limits {
            memory_bytes: MEMORY,
            nano_cpus: 500_000_000,
            pids: PIDS,
        },
        hardening: Hardening {
            read_only_rootfs: true,
            no_new_privileges: true,
            cap_drop: vec!["ALL".into()],
            tmpfs: vec!["/tmp".into()],
        },
        // These tests are about SIGTERM; by default this image (no
        // STOPSIGNAL, not the dockerworker) would get SIGINT.
        stop_signal: Some("SIGTERM".into()),
        ready_url: None,
    }
}

/// Runs `body` with a fresh harness, then removes the test's containers even
/// when `body` panicked.
async fn with_harness<F, Fut>(body: F)
where
    F: FnOnce(Arc<Harness>) -> Fut,
    Fut: Future<Output = ()>,
{
    let harness = Arc::new(Harness::new().await);
    let outcome = AssertUnwindSafe(body(harness.clone())).catch_unwind().await;
    harness.cleanup().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// Only catches a hang: a test that waits longer has failed.
const MUST_HAPPEN: Duration = Duration::from_secs(120);

/// `f`'s output, failing the test if it takes longer than [`MUST_HAPPEN`].
async fn within<F: Future>(f: F, what: &str) -> F::Output {
    tokio::time::timeout(MUST_HAPPEN, f)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

fn is_exited(state: &RunState) -> bool {
    matches!(state, RunState::Exited(_))
}

#[tokio::test]
async fn list_finds_only_this_instances_containers_with_their_labels() {
    with_harness(|h| async move {
        let ImageState::Present { id: image_id } = h.rt.image(SCRIPTED).await.expect("image")
        else {
            panic!("{SCRIPTED} was just built");
        };
        let spec = ContainerSpec {
            image_id: image_id.clone(),
            ..h.spec("sleep 30")
        };
        let ours = h.rt.create(&spec).await.expect("create ours");
        let other_spec = spec_for(h.other.instance(), "sleep 30");
        let theirs = h.other.create(&other_spec).await.expect("create theirs");

        let listed = h.rt.list().await.expect("list");
        assert_eq!(listed.len(), 1, "{listed:?}");
        let c = &listed[0];
        assert_eq!(
            (c.id.as_str(), c.name.as_str()),
            (ours.as_str(), spec.name.as_str())
        );
        assert_eq!(c.worker_id, Some(spec.worker_id));
        assert_eq!(c.revision, Some(spec.revision));
        assert_eq!(c.spec_hash, Some(spec.hash()));
        assert_eq!(c.image_id, image_id, "the pinned image id is used");
        assert_eq!(c.state, RunState::Created);
        assert!(c.created > 0);
        let their_list = h.other.list().await.expect("list theirs");
        assert_eq!(
            their_list.iter().map(|c| &c.id).collect::<Vec<_>>(),
            [&theirs]
        );
    })
    .await;
}

#[tokio::test]
async fn listing_is_two_api_calls_however_many_containers_exist() {
    with_harness(|h| async move {
        for _ in 0..3 {
            h.rt.create(&h.spec("sleep 30")).await.expect("create");
        }
        let before = h.rt.api_calls();
        let listed = h.rt.list().await.expect("list");
        assert_eq!(listed.len(), 3);
        // This instance's containers, and SensorBucket's controller's.
        assert_eq!(h.rt.api_calls(), before + 2);
    })
    .await;
}

#[tokio::test]
async fn started_container_runs_with_labels_env_limits_and_hardening() {
    with_harness(|h| async move {
        let mut spec = h.spec("sleep 30");
        spec.env
            .insert("WORKER_ID".into(), spec.worker_id.to_string());
        let id = h.create_started(&spec).await;
        h.rt.start(&id)
            .await
            .expect("starting a running container is fine");
        let listed = h.wait_for(&id, |s| *s == RunState::Running).await;
        assert_eq!(listed.state, RunState::Running);

        let inspected = h.inspect(&id).await;
        let config = inspected.config.expect("config");
        let labels: BTreeMap<_, _> = config.labels.expect("labels").into_iter().collect();
        assert_eq!(labels, spec.labels(h.rt.instance()));
        let env = config.env.expect("env");
        assert!(
            env.contains(&format!("WORKER_ID={}", spec.worker_id)),
            "{env:?}"
        );
        assert!(env.contains(&"SCRIPT=sleep 30".to_string()), "{env:?}");

        let host = inspected.host_config.expect("host config");
        assert_eq!(host.network_mode.as_deref(), Some("none"));
        assert_eq!(
            (host.memory, host.memory_swap),
            (Some(MEMORY), Some(MEMORY))
        );
        assert_eq!(host.nano_cpus, Some(500_000_000));
        assert_eq!(host.pids_limit, Some(PIDS));
        assert_eq!(host.readonly_rootfs, Some(true));
        assert_eq!(host.cap_drop, Some(vec!["ALL".to_string()]));
        assert_eq!(
            host.security_opt,
            Some(vec!["no-new-privileges:true".to_string()])
        );
        let tmp = host.tmpfs.and_then(|t| t.get("/tmp").cloned());
        assert_eq!(tmp.as_deref(), Some("rw,exec,nosuid,nodev,size=64m"));
        let policy = host.restart_policy.and_then(|p| p.name);
        assert_eq!(policy, Some(RestartPolicyNameEnum::NO));
        let log = host.log_config.expect("log config");
        assert_eq!(log.typ.as_deref(), Some("json-file"));
        let log_opts = log.config.expect("log options");
        assert_eq!(log_opts.get("max-size").map(String::as_str), Some("10m"));
        assert_eq!(log_opts.get("max-file").map(String::as_str), Some("3"));
    })
    .await;
}

/// Each check exits with its own code, so a failure says which one.
const INSIDE_CHECKS: &str = r#"
touch /probe 2>/dev/null && exit 10
cp /bin/busybox /tmp/sh || exit 11
/tmp/sh -c true || exit 12
grep -q '^NoNewPrivs:.*1' /proc/self/status || exit 13
grep -q '^CapEff:.*0000000000000000' /proc/self/status || exit 14
pids=$(cat /sys/fs/cgroup/pids/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids.max)
test "$pids" = 64 || exit 15
mem=$(cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max)
test "$mem" = 67108864 || exit 16
exit 0
"#;

#[tokio::test]
async fn inside_a_worker_only_tmp_is_writable_and_no_privileges_remain() {
    with_harness(|h| async move {
        let id = h.create_started(&h.spec(INSIDE_CHECKS)).await;
        let c = h.wait_for(&id, is_exited).await;
        // 10 root writable, 11 /tmp not writable, 12 /tmp noexec, 13 new
        // privileges allowed, 14 capabilities left, 15 pids / 16 memory limit not applied.
        assert_eq!(c.state, RunState::Exited(Some(0)));
    })
    .await;
}

#[tokio::test]
async fn a_container_exiting_with_3_lists_as_exited_3() {
    with_harness(|h| async move {
        let id = h.create_started(&h.spec("exit 3")).await;
        let c = h.wait_for(&id, is_exited).await;
        assert_eq!(c.state, RunState::Exited(Some(3)));
    })
    .await;
}

#[tokio::test]
async fn last_lines_are_what_an_exited_container_wrote_last_and_none_once_it_is_gone() {
    with_harness(|h| async move {
        let script = "echo oops >&2; echo one; echo two; echo three; exit 4";
        let id = h.create_started(&h.spec(script)).await;
        h.wait_for(&id, is_exited).await;
        let all = h.rt.last_lines(&id, 20).await.expect("logs");
        // stdout and stderr are separate pipes: their lines interleave in
        // either order, each stream's in its own order.
        let stdout: Vec<&str> = all
            .iter()
            .map(String::as_str)
            .filter(|l| *l != "oops")
            .collect();
        assert_eq!(stdout, ["one", "two", "three"], "{all:?}");
        assert_eq!(all.len(), 4, "stderr is read too: {all:?}");
        let last = h.rt.last_lines(&id, 1).await.expect("logs");
        assert_eq!(last.len(), 1, "{last:?}");
        h.rt.remove(&id).await.expect("remove");
        let gone = h.rt.last_lines(&id, 2).await.expect("a removed container");
        assert!(gone.is_empty(), "{gone:?}");
    })
    .await;
}

#[tokio::test]
async fn stop_lets_a_worker_that_handles_term_exit_cleanly_before_the_timeout() {
    with_harness(|h| async move {
        let script = r#"trap "exit 0" TERM; echo trapped; while true; do sleep 0.1; done"#;
        let id = h.create_started(&h.spec(script)).await;
        h.wait_for_line(&id, "trapped").await;
        // Exit code 0 is the trap's: a stop that waited out the timeout
        // would have killed it (137).
        within(h.rt.stop(&id, Duration::from_secs(10)), "the stop returns")
            .await
            .expect("stop");
        assert_eq!(
            h.wait_for(&id, is_exited).await.state,
            RunState::Exited(Some(0))
        );
        h.rt.stop(&id, Duration::from_secs(1))
            .await
            .expect("stopping a stopped container is fine");
    })
    .await;
}

#[tokio::test]
async fn stop_kills_a_worker_that_ignores_term_after_the_timeout() {
    with_harness(|h| async move {
        // It notes SIGTERM and carries on, so its log says it was asked first.
        let script = r#"trap "echo got TERM" TERM; echo trapped; while true; do sleep 0.1; done"#;
        let id = h.create_started(&h.spec(script)).await;
        h.wait_for_line(&id, "trapped").await;
        within(h.rt.stop(&id, Duration::from_secs(3)), "the stop returns")
            .await
            .expect("stop");
        assert_eq!(
            h.wait_for(&id, is_exited).await.state,
            RunState::Exited(Some(137)),
            "killed"
        );
        let said = h.rt.last_lines(&id, 10).await.expect("logs");
        assert!(
            said.iter().any(|l| l == "got TERM"),
            "SIGTERM came before the kill: {said:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn an_image_without_a_stop_signal_of_its_own_is_stopped_with_sigint() {
    with_harness(|h| async move {
        let spec = ContainerSpec {
            stop_signal: None,
            ..h.spec("sleep 30")
        };
        let id = h.rt.create(&spec).await.expect("create");
        let config = h.inspect(&id).await.config.expect("config");
        assert_eq!(config.stop_signal.as_deref(), Some("SIGINT"));
    })
    .await;
}

#[tokio::test]
async fn interrupt_sends_its_signal_and_kills_only_what_ignores_it() {
    with_harness(|h| async move {
        let polite = r#"trap "exit 0" INT; while true; do sleep 0.1; done"#;
        let deaf = r#"trap "" INT; while true; do sleep 0.1; done"#;
        let polite = h.create_started(&h.spec(polite)).await;
        let deaf = h.create_started(&h.spec(deaf)).await;
        for id in [&polite, &deaf] {
            h.wait_for(id, |s| *s == RunState::Running).await;
        }
        // The shells install their traps right after starting.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (a, b) = tokio::join!(
            h.rt.interrupt(&polite, "SIGINT", Duration::from_secs(60)),
            h.rt.interrupt(&deaf, "SIGINT", Duration::from_secs(1)),
        );
        a.expect("interrupt");
        b.expect("interrupt");
        assert_eq!(
            h.wait_for(&polite, is_exited).await.state,
            RunState::Exited(Some(0)),
            "it exited on SIGINT, within the 60 s it had"
        );
        assert_eq!(
            h.wait_for(&deaf, is_exited).await.state,
            RunState::Exited(Some(137)),
            "killed once its second was up"
        );
        h.rt.interrupt(&deaf, "SIGINT", Duration::from_secs(1))
            .await
            .expect("interrupting a stopped container is fine");
    })
    .await;
}

#[tokio::test]
async fn a_stop_signal_missed_is_sent_again_within_the_grace_period() {
    // Each ignores its first signal and exits on the next, as an interpreter
    // running as PID 1 that was signalled before it set its handler. Their
    // grace periods outlast `within`: waited out, the test fails.
    with_harness(|h| async move {
        let late = |signal: &str| {
            format!(
                r#"trap "trap 'exit 0' {signal}" {signal}; echo trapped; while true; do sleep 0.1; done"#
            )
        };
        let stopped = h.create_started(&h.spec(&late("TERM"))).await;
        let interrupted = h.create_started(&h.spec(&late("INT"))).await;
        for id in [&stopped, &interrupted] {
            h.wait_for_line(id, "trapped").await;
        }
        let grace = Duration::from_secs(300);
        let (a, b) = within(
            async {
                tokio::join!(
                    h.rt.stop(&stopped, grace),
                    h.rt.interrupt(&interrupted, "SIGINT", grace)
                )
            },
            "the stops return",
        )
        .await;
        a.expect("stop");
        b.expect("interrupt");
        for id in [&stopped, &interrupted] {
            assert_eq!(
                h.wait_for(id, is_exited).await.state,
                RunState::Exited(Some(0)),
                "it exited on the second signal, not killed"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn removing_or_stopping_a_vanished_container_is_fine() {
    with_harness(|h| async move {
        let id = h.rt.create(&h.spec("exit 0")).await.expect("create");
        h.rt.remove(&id).await.expect("remove");
        assert!(h.rt.list().await.expect("list").is_empty());
        h.rt.remove(&id).await.expect("removing again is fine");
        h.rt.stop(&id, Duration::from_secs(1))
            .await
            .expect("stopping a vanished one is fine");
        let unknown = format!("never-existed-{}", Uuid::new_v4());
        h.rt.remove(&unknown)
            .await
            .expect("removing an unknown container is fine");
    })
    .await;
}

#[tokio::test]
async fn remove_does_not_force_a_running_container() {
    with_harness(|h| async move {
        let id = h.create_started(&h.spec("sleep 30")).await;
        let err =
            h.rt.remove(&id)
                .await
                .expect_err("a running container is not removed");
        assert!(matches!(err, RuntimeError::Remove { .. }), "{err:?}");
    })
    .await;
}

#[tokio::test]
async fn rename_changes_the_listed_name() {
    with_harness(|h| async move {
        let id = h.rt.create(&h.spec("exit 0")).await.expect("create");
        let new_name = format!("{}-renamed", h.rt.instance());
        h.rt.rename(&id, &new_name).await.expect("rename");
        let listed = h.rt.list().await.expect("list");
        assert_eq!(
            listed.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
            [new_name]
        );
    })
    .await;
}

#[tokio::test]
async fn a_name_held_by_another_instance_is_name_taken() {
    with_harness(|h| async move {
        let theirs = spec_for(h.other.instance(), "sleep 30");
        h.other.create(&theirs).await.expect("create theirs");
        let ours = ContainerSpec {
            name: theirs.name.clone(),
            ..h.spec("sleep 30")
        };
        let err = h.rt.create(&ours).await.expect_err("the name is taken");
        assert!(
            matches!(&err, RuntimeError::NameTaken { name } if *name == theirs.name),
            "{err:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn a_name_held_by_our_own_container_is_a_create_error_not_name_taken() {
    with_harness(|h| async move {
        let spec = h.spec("sleep 30");
        h.rt.create(&spec).await.expect("first create");
        let err = h.rt.create(&spec).await.expect_err("the name is in use");
        assert!(matches!(err, RuntimeError::Create { .. }), "{err:?}");
    })
    .await;
}

#[tokio::test]
async fn image_resolves_a_present_tag_and_reports_a_missing_one() {
    with_harness(|h| async move {
        let ImageState::Present { id } = h.rt.image(BUSYBOX).await.expect("image") else {
            panic!("{BUSYBOX} is present");
        };
        let expected = h.docker.inspect_image(BUSYBOX).await.expect("inspect").id;
        assert_eq!(Some(id), expected);
        let missing = format!("workerctl-test/missing-{}:latest", Uuid::new_v4());
        assert_eq!(
            h.rt.image(&missing).await.expect("image"),
            ImageState::Missing
        );
    })
    .await;
}

#[tokio::test]
async fn network_exists_matches_exact_names_only() {
    with_harness(|h| async move {
        assert!(h.rt.network_exists("host").await.expect("host"));
        assert!(!h.rt.network_exists("hos").await.expect("hos"));
        let random = format!("no-such-network-{}", Uuid::new_v4());
        assert!(!h.rt.network_exists(&random).await.expect("random"));
    })
    .await;
}

#[tokio::test]
async fn events_wake_for_our_dying_containers_only_and_stop_on_shutdown() {
    with_harness(|h| async move {
        // What the event stream logs (one line per event it receives) is
        // how this test knows which events reached it, and in which order.
        let log = Captured::default();
        let _log = tracing::subscriber::set_default(
            tracing_subscriber::fmt()
                .with_writer(log.clone())
                .with_max_level(tracing::Level::DEBUG)
                .with_ansi(false)
                .finish(),
        );
        let wake = Arc::new(Notify::new());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let (h, wake, shutdown) = (h.clone(), wake.clone(), shutdown.clone());
            async move { h.rt.events(wake, shutdown).await }
        });

        let first = h.spec("sleep 1; exit 0");
        let ours = h.create_started(&first).await;
        within(wake.notified(), "our container's death to wake us").await;
        // The pass that wakes must see the exit: the list, read right away,
        // already says so (the engine sends `die` before its list knows).
        let listed = h.rt.list().await.expect("list");
        let state = listed.iter().find(|c| c.id == ours).map(|c| &c.state);
        assert_eq!(state, Some(&RunState::Exited(Some(0))));

        // The stream is live (it just woke us). Another instance's container
        // dies, then one of ours: the stream receives events in order, so
        // once it has received ours it would have received theirs.
        let theirs = spec_for(h.other.instance(), "exit 0");
        let their_id = h.other.create(&theirs).await.expect("create theirs");
        h.other.start(&their_id).await.expect("start theirs");
        within(
            async {
                while !other_exited(&h, &their_id).await {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            "their container to exit",
        )
        .await;
        let second = h.spec("exit 0");
        h.create_started(&second).await;
        within(
            async {
                while !log.text().contains(&second.name) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            "the stream to receive our second container's death",
        )
        .await;
        let seen = log.text();
        assert!(seen.contains(&first.name), "{seen}");
        assert!(
            !seen.contains(&theirs.name),
            "another instance's container must not reach us, so never wakes us:\n{seen}"
        );

        shutdown.cancel();
        within(task, "the events task to end on shutdown")
            .await
            .expect("it does not panic");
    })
    .await;
}

async fn other_exited(h: &Harness, id: &str) -> bool {
    let listed = h.other.list().await.expect("list theirs");
    listed
        .iter()
        .any(|c| c.id == id && matches!(c.state, RunState::Exited(_)))
}

/// Log output kept in memory for a test to read.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl Captured {
    fn text(&self) -> String {
        let bytes = self.0.lock().expect("log lock");
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

#[tokio::test]
async fn events_reconnect_after_the_engine_connection_drops_and_wake_the_loop() {
    with_harness(|h| async move {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("docker.sock");
        let relay = docker_relay(&socket).await;
        let path = socket.to_str().expect("utf-8 path");
        let client = Docker::connect_with_unix(path, 10, bollard::API_DEFAULT_VERSION)
            .expect("client for the relay");
        let relayed = Arc::new(
            DockerRuntime::with_client(client, h.rt.instance())
                .await
                .expect("connect through relay"),
        );
        let wake = Arc::new(Notify::new());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let (rt, wake, shutdown) = (relayed.clone(), wake.clone(), shutdown.clone());
            async move { rt.events(wake, shutdown).await }
        });
        tokio::time::sleep(Duration::from_millis(500)).await;

        // Down long enough that at least one reconnect attempt fails.
        relay.cut();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let _relay = docker_relay(&socket).await;
        let woken = tokio::time::timeout(Duration::from_secs(15), wake.notified()).await;
        assert!(woken.is_ok(), "a reconnect must wake the loop");

        tokio::time::sleep(Duration::from_millis(500)).await;
        h.create_started(&h.spec("sleep 1; exit 0")).await;
        let woken = tokio::time::timeout(Duration::from_secs(15), wake.notified()).await;
        assert!(woken.is_ok(), "events flow again after the reconnect");

        shutdown.cancel();
        let ended = tokio::time::timeout(Duration::from_secs(5), task).await;
        ended
            .expect("the events task ends on shutdown")
            .expect("it does not panic");
    })
    .await;
}
