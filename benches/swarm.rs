//! The Swarm backend benchmark: time from a revision bump to every replica
//! of a worker's service running (and healthy) at the new revision, through
//! `SwarmRuntime::update`, beside `docker service update` of the same
//! service by the CLI. Both go through Swarm's own rolling update with the
//! same spec (one task at a time, start-first, health-gated), so the
//! difference is what each client adds; both are timed by the same poll of
//! the service's running task containers (every 100 ms).
//!
//! Like tests/swarm.rs it makes a single-node swarm (`docker swarm init
//! --advertise-addr 127.0.0.1`) and leaves it at the end, refuses an engine
//! already in a swarm it did not make, and takes turns with the swarm tests
//! (`/tmp/workerctl-swarm-tests.lock`). Figures are printed, never asserted.
//! Settings (environment): BENCH_SWARM_REPLICAS (4), BENCH_SWARM_BUMPS (3).
//!
//! `cargo bench --bench swarm`; docs/benchmarks.md records the figures.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::query_parameters::ListContainersOptionsBuilder;
use uuid::Uuid;
use workerctl::config::Config;
use workerctl::model::{ContainerSpec, Limits, Revision, WorkerId, container_name, labels};
use workerctl::swarm::{ManagedService, SwarmOptions, SwarmRuntime, WorkerService};

const BUSYBOX: &str = "workerctl/busybox:latest";
/// Healthy one second after start; `wait` wakes on SIGTERM at once.
const IMAGE: &str = "workerctl-bench/swarm-worker:latest";
const SCRIPT: &str = "trap 'exit 0' TERM; touch /tmp/ready; sleep 86400 & wait";
const MARKER: &str = "workerctl.test-swarm";
const LOCK_FILE: &str = "/tmp/workerctl-swarm-tests.lock";
const CONVERGE_MAX: Duration = Duration::from_secs(300);
const OPTIONS: SwarmOptions = SwarmOptions {
    update_monitor: Duration::from_secs(1),
    stop_timeout: Duration::from_secs(2),
    readiness: None,
};

fn docker_cli(args: &[&str]) -> Result<String, String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .map_err(|e| format!("the docker CLI does not run: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

fn setting(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The bench's turn on the engine and the swarm it made; left on drop.
struct BenchSwarm {
    _turn: File,
}

impl BenchSwarm {
    fn make() -> Result<BenchSwarm, String> {
        let turn = File::create(LOCK_FILE).map_err(|e| format!("{LOCK_FILE}: {e}"))?;
        turn.lock().map_err(|e| format!("{LOCK_FILE}: {e}"))?;
        let state = docker_cli(&["info", "--format", "{{.Swarm.LocalNodeState}}"])?;
        if state != "inactive" {
            let format = format!("{{{{index .Spec.Labels \"{MARKER}\"}}}}");
            let marker = docker_cli(&["node", "inspect", "self", "--format", &format]);
            if marker.as_deref() != Ok("yes") {
                return Err(format!(
                    "this Docker engine is in a swarm (state {state:?}) the benchmark did not make; refusing to touch it"
                ));
            }
            docker_cli(&["swarm", "leave", "--force"])?;
        }
        docker_cli(&["swarm", "init", "--advertise-addr", "127.0.0.1"])?;
        let swarm = BenchSwarm { _turn: turn };
        let node = docker_cli(&["info", "--format", "{{.Swarm.NodeID}}"])?;
        docker_cli(&[
            "node",
            "update",
            "--label-add",
            &format!("{MARKER}=yes"),
            &node,
        ])?;
        Ok(swarm)
    }
}

impl Drop for BenchSwarm {
    fn drop(&mut self) {
        if let Err(e) = docker_cli(&["swarm", "leave", "--force"]) {
            eprintln!("bench: docker swarm leave --force failed: {e}");
        }
    }
}

fn build_image() -> Result<String, String> {
    docker_cli(&["image", "inspect", BUSYBOX])
        .map_err(|_| format!("{BUSYBOX} is missing: run scripts/build-images first"))?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let cmd = serde_json::to_string(&["/bin/sh", "-c", SCRIPT]).map_err(|e| e.to_string())?;
    let dockerfile = format!(
        "FROM {BUSYBOX}\nHEALTHCHECK --interval=1s --timeout=1s --retries=2 CMD test -f /tmp/ready\nCMD {cmd}\n"
    );
    std::fs::write(dir.path().join("Dockerfile"), dockerfile).map_err(|e| e.to_string())?;
    let path = dir.path().to_str().ok_or("temp dir is not UTF-8")?;
    docker_cli(&["build", "-q", "-t", IMAGE, path])?;
    docker_cli(&["image", "inspect", "--format", "{{.Id}}", IMAGE])
}

fn worker(instance: &str, image_id: &str, revision: i32, replicas: u32) -> WorkerService {
    let id = WorkerId(Uuid::from_u128(0xbe));
    WorkerService {
        spec: ContainerSpec {
            worker_id: id,
            revision: Revision(revision),
            replica: 0,
            name: container_name(instance, id),
            image: IMAGE.into(),
            image_id: image_id.into(),
            env: BTreeMap::from([("WORKER_REVISION".into(), revision.to_string())]),
            network: "host".into(),
            limits: Limits {
                memory_bytes: 32 << 20,
                nano_cpus: 100_000_000,
                pids: 16,
            },
            hardening: Config::default().hardening(),
            ready_url: None,
        },
        replicas,
    }
}

/// Waits until `n` task containers of `service` run healthy at `revision`
/// and no other runs; the time it took.
async fn all_updated(
    docker: &Docker,
    service: &str,
    revision: i32,
    n: usize,
    since: Instant,
) -> Result<Duration, String> {
    let filters = HashMap::from([
        (
            "label",
            vec![format!("com.docker.swarm.service.name={service}")],
        ),
        ("status", vec!["running".to_string()]),
    ]);
    let wanted = revision.to_string();
    loop {
        let options = ListContainersOptionsBuilder::default()
            .filters(&filters)
            .build();
        let listed = docker
            .list_containers(Some(options))
            .await
            .map_err(|e| e.to_string())?;
        let healthy_new = listed
            .iter()
            .filter(|c| {
                let labels = c.labels.clone().unwrap_or_default();
                let status = c.status.as_deref().unwrap_or("");
                labels.get(labels::REVISION) == Some(&wanted) && status.contains("(healthy)")
            })
            .count();
        if healthy_new == n && listed.len() == n {
            return Ok(since.elapsed());
        }
        if since.elapsed() > CONVERGE_MAX {
            return Err(format!(
                "{service}: revision {revision} not rolled out in {CONVERGE_MAX:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn the_service(rt: &SwarmRuntime) -> Result<ManagedService, String> {
    let mut listed = rt.list().await.map_err(|e| e.to_string())?;
    listed
        .pop()
        .ok_or_else(|| "the service is gone".to_string())
}

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs.get(xs.len() / 2).copied().unwrap_or_default()
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

async fn run() -> Result<(), String> {
    let replicas = setting("BENCH_SWARM_REPLICAS", 4);
    let bumps = setting("BENCH_SWARM_BUMPS", 3).max(1);
    let image_id = build_image()?;
    let _swarm = BenchSwarm::make()?;
    let docker = Docker::connect_with_local_defaults().map_err(|e| e.to_string())?;
    let instance = format!("bench{}", &Uuid::new_v4().simple().to_string()[..8]);
    let rt = SwarmRuntime::with_client(docker.clone(), &instance, OPTIONS)
        .await
        .map_err(|e| e.to_string())?;
    let n = u32::try_from(replicas).map_err(|e| e.to_string())?;
    let mut revision = 1;
    rt.create(&worker(&instance, &image_id, revision, n))
        .await
        .map_err(|e| e.to_string())?;
    let name = container_name(&instance, WorkerId(Uuid::from_u128(0xbe)));
    all_updated(&docker, &name, revision, replicas, Instant::now()).await?;

    let (mut ours, mut cli, mut calls) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..bumps {
        revision += 1;
        let before = rt.api_calls();
        let start = Instant::now();
        let current = the_service(&rt).await?;
        rt.update(&current, &worker(&instance, &image_id, revision, n))
            .await
            .map_err(|e| e.to_string())?;
        calls.push(rt.api_calls() - before);
        ours.push(all_updated(&docker, &name, revision, replicas, start).await?);

        revision += 1;
        let r = revision.to_string();
        let start = Instant::now();
        docker_cli(&[
            "service",
            "update",
            "--detach",
            "--quiet",
            "--env-add",
            &format!("WORKER_REVISION={r}"),
            "--label-add",
            &format!("{}={r}", labels::REVISION),
            "--container-label-add",
            &format!("{}={r}", labels::REVISION),
            &name,
        ])?;
        cli.push(all_updated(&docker, &name, revision, replicas, start).await?);
    }
    let service = the_service(&rt).await?;
    rt.remove(&service.id).await.map_err(|e| e.to_string())?;

    println!();
    println!("Swarm: revision bump → all {replicas} replicas running and healthy at it");
    println!(
        "(Swarm's rolling update: one task at a time, start-first, health-gated; {bumps} bumps each)"
    );
    println!();
    println!("| client                         | median  | fastest | slowest | API calls        |");
    println!("|--------------------------------|---------|---------|---------|------------------|");
    for (who, xs, api) in [
        (
            "workerctl (SwarmRuntime)",
            &ours,
            calls.first().map(u64::to_string),
        ),
        (
            "docker service update (CLI)",
            &cli,
            Some("inspect + update".to_string()),
        ),
    ] {
        let fastest = xs.iter().min().copied().unwrap_or_default();
        let slowest = xs.iter().max().copied().unwrap_or_default();
        println!(
            "| {who:<30} | {:>7} | {:>7} | {:>7} | {:<16} |",
            secs(median(xs.clone())),
            secs(fastest),
            secs(slowest),
            api.unwrap_or_default()
        );
    }
    println!();
    println!(
        "load average at the end: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    Ok(())
}

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bench: cannot start tokio: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e}");
            ExitCode::FAILURE
        }
    }
}
