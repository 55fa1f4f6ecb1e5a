//! The throwaway container of `workerctl worker try`: the worker's image,
//! hardened as every worker container is (the same host config: limits,
//! read-only root, capabilities dropped, no-new-privileges, tmpfs), running
//! the dockerworker's try mode (`python -m dockerworker.trial`) on one
//! request written to its stdin; its stdout is the answer.
//!
//! It is given no broker URL and no code URL, and the try mode never imports
//! the AMQP client: it consumes no queue and publishes nothing. It carries
//! no `workerctl.instance` label (no reconciler ever sees it as its own or
//! as an orphan), only `workerctl.try = <worker id>`; Docker removes it when
//! it exits (`AutoRemove`), and this code removes it on every other way out
//! (timeout, error, a dropped future via [`Removal`]).

use std::collections::HashMap;
use std::time::Duration;

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::errors::Error as DockerError;
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, CreateContainerOptionsBuilder, RemoveContainerOptionsBuilder,
    WaitContainerOptionsBuilder,
};
use futures::StreamExt;
use tokio::io::AsyncWriteExt;

use super::docker::{host_config, is_gone};
use crate::model::ContainerSpec;

/// The label every try container carries: the worker it tries code for.
pub(crate) const TRY_LABEL: &str = "workerctl.try";
/// The try mode's command inside the dockerworker image.
const ENTRYPOINT: [&str; 5] = ["tini", "--", "python", "-m", "dockerworker.trial"];
/// The most stdout a try container may write (the report of 200 messages
/// run twice is a few hundred KiB).
const MAX_STDOUT: usize = 64 * 1024 * 1024;
/// The last stderr lines kept, to say why a run failed.
const STDERR_LINES: usize = 20;
/// How long a removal the engine has begun (AutoRemove) is waited for.
const REMOVAL_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TrialRunError {
    #[error("Docker refused to {what}")]
    Docker {
        what: &'static str,
        #[source]
        source: DockerError,
    },
    #[error("the try container did not finish within {}", humantime::format_duration(*.0))]
    TimedOut(Duration),
    #[error("the try container wrote more than {MAX_STDOUT} bytes")]
    TooLarge,
}

/// What the container wrote.
#[derive(Debug, Default)]
pub struct TrialOutput {
    pub stdout: Vec<u8>,
    /// Its last lines of stderr (logs, what user code printed on import).
    pub stderr_tail: Vec<String>,
}

/// Runs one try container of `spec` (its image, network, limits and
/// hardening; its environment is replaced by `env`), writes `request` to
/// its stdin and returns what it wrote, within `timeout`. The container is
/// gone when this returns.
pub async fn run(
    docker: &Docker,
    spec: &ContainerSpec,
    env: Vec<String>,
    request: &[u8],
    timeout: Duration,
) -> Result<TrialOutput, TrialRunError> {
    let body = create_body(spec, env);
    let name = format!("workerctl-try-{}", uuid::Uuid::new_v4());
    let options = CreateContainerOptionsBuilder::default().name(&name).build();
    let created = docker
        .create_container(Some(options), body)
        .await
        .map_err(docker_failed("create the try container"))?;
    let removal = Removal {
        docker: docker.clone(),
        id: Some(created.id.clone()),
    };
    let ran = tokio::time::timeout(timeout, attach_and_run(docker, &created.id, request)).await;
    removal.now().await;
    match ran {
        Ok(result) => result,
        Err(_) => Err(TrialRunError::TimedOut(timeout)),
    }
}

async fn attach_and_run(
    docker: &Docker,
    id: &str,
    request: &[u8],
) -> Result<TrialOutput, TrialRunError> {
    let options = AttachContainerOptionsBuilder::default()
        .stdin(true)
        .stdout(true)
        .stderr(true)
        .stream(true)
        .build();
    let mut attached = docker
        .attach_container(id, Some(options))
        .await
        .map_err(docker_failed("attach to the try container"))?;
    docker
        .start_container(id, None)
        .await
        .map_err(docker_failed("start the try container"))?;
    let write = async {
        // A failed write shows as a missing answer, with the container's
        // own last words; closing stdin is what tells the container to begin.
        let _ = attached.input.write_all(request).await;
        let _ = attached.input.shutdown().await;
    };
    let (_, read) = tokio::join!(write, read_all(&mut attached.output));
    read
}

async fn read_all(
    output: &mut (impl futures::Stream<Item = Result<LogOutput, DockerError>> + Unpin),
) -> Result<TrialOutput, TrialRunError> {
    let mut out = TrialOutput::default();
    let mut stderr = Vec::new();
    while let Some(chunk) = output.next().await {
        match chunk {
            Ok(LogOutput::StdOut { message }) => {
                out.stdout.extend_from_slice(&message);
                if out.stdout.len() > MAX_STDOUT {
                    return Err(TrialRunError::TooLarge);
                }
            }
            Ok(LogOutput::StdErr { message }) => {
                stderr.extend_from_slice(&message);
                let excess = stderr.len().saturating_sub(64 * 1024);
                stderr.drain(..excess);
            }
            Ok(_) => {}
            Err(e) if is_gone(&e) => break,
            Err(e) => return Err(docker_failed("read the try container's output")(e)),
        }
    }
    let text = String::from_utf8_lossy(&stderr);
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(STDERR_LINES);
    out.stderr_tail = lines[from..].iter().map(|l| l.to_string()).collect();
    Ok(out)
}

/// The worker's container, hardened the same way, with the try mode as
/// command, stdin open once, and nothing of a worker's wiring.
fn create_body(spec: &ContainerSpec, env: Vec<String>) -> ContainerCreateBody {
    let image = if spec.image_id.is_empty() {
        &spec.image
    } else {
        &spec.image_id
    };
    let host = HostConfig {
        auto_remove: Some(true),
        ..host_config(spec)
    };
    ContainerCreateBody {
        image: Some(image.clone()),
        entrypoint: Some(ENTRYPOINT.iter().map(|s| s.to_string()).collect()),
        cmd: Some(vec![]),
        env: Some(env),
        labels: Some(HashMap::from([(
            TRY_LABEL.to_string(),
            spec.worker_id.to_string(),
        )])),
        open_stdin: Some(true),
        stdin_once: Some(true),
        attach_stdin: Some(true),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        tty: Some(false),
        host_config: Some(host),
        ..Default::default()
    }
}

fn docker_failed(what: &'static str) -> impl FnOnce(DockerError) -> TrialRunError {
    move |source| TrialRunError::Docker { what, source }
}

/// Removes the try container: at once when asked, or when dropped (the
/// request was cancelled, e.g. the HTTP client went away).
struct Removal {
    docker: Docker,
    id: Option<String>,
}

impl Removal {
    async fn now(mut self) {
        if let Some(id) = self.id.take() {
            remove(&self.docker, &id).await;
        }
    }
}

impl Drop for Removal {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            let docker = self.docker.clone();
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move { remove(&docker, &id).await });
            }
        }
    }
}

async fn remove(docker: &Docker, id: &str) {
    let force = RemoveContainerOptionsBuilder::default().force(true).build();
    if docker.remove_container(id, Some(force)).await.is_err() {
        // Gone already, or being removed by the engine (AutoRemove: 409,
        // "removal already in progress"): wait until it is gone, so that
        // no try container is left when a try has answered.
        let removed = WaitContainerOptionsBuilder::default()
            .condition("removed")
            .build();
        let mut gone = docker.wait_container(id, Some(removed));
        let _ = tokio::time::timeout(REMOVAL_WAIT, gone.next()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Hardening, Limits, WorkerId};
    use std::collections::BTreeMap;

    fn spec() -> ContainerSpec {
        ContainerSpec {
            worker_id: WorkerId(uuid::Uuid::from_u128(9)),
            revision: crate::model::Revision(1),
            replica: 0,
            name: "worker-9".into(),
            image: "img:latest".into(),
            image_id: "sha256:abc".into(),
            env: BTreeMap::from([("AMQP_HOST".to_string(), "amqp://secret".to_string())]),
            network: "workerctl".into(),
            limits: Limits {
                memory_bytes: 256 << 20,
                nano_cpus: 1_000_000_000,
                pids: 128,
            },
            hardening: Hardening {
                read_only_rootfs: true,
                no_new_privileges: true,
                cap_drop: vec!["ALL".into()],
                tmpfs: vec!["/tmp".into()],
            },
            stop_signal: None,
            ready_url: Some("http://x/ready".into()),
        }
    }

    #[test]
    fn a_try_container_is_hardened_like_a_worker_and_knows_no_broker() {
        let body = create_body(&spec(), vec!["WORKER_ID=9".into()]);
        let host = body.host_config.expect("host config");
        let worker = host_config(&spec());
        assert_eq!(host.readonly_rootfs, worker.readonly_rootfs);
        assert_eq!(host.cap_drop, worker.cap_drop);
        assert_eq!(host.security_opt, worker.security_opt);
        assert_eq!(host.memory, worker.memory);
        assert_eq!(host.pids_limit, worker.pids_limit);
        assert_eq!(host.tmpfs, worker.tmpfs);
        assert_eq!(host.auto_remove, Some(true));
        assert_eq!(body.env, Some(vec!["WORKER_ID=9".to_string()]));
        assert_eq!(body.image.as_deref(), Some("sha256:abc"));
        let labels = body.labels.expect("labels");
        assert!(!labels.contains_key(crate::model::labels::INSTANCE));
        assert!(labels.contains_key(TRY_LABEL));
    }
}
