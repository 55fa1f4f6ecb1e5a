//! The container runtime boundary: everything workerctl asks of Docker goes
//! through [`ContainerRuntime`]. Callers see [`ManagedContainer`] and
//! [`ContainerSpec`] values, never Docker API types; `docker.rs` (bollard) is
//! the one real implementation. The Swarm backend's boundary is
//! [`ServiceRuntime`], implemented by `swarm.rs`.

pub mod compose;
pub mod debug;
pub mod docker;
pub mod swarm;
pub mod trial;

use std::future::Future;
use std::time::Duration;

use crate::model::{ContainerSpec, ManagedContainer, ManagedService, WorkerService};
use crate::model::{ImageState, NetworkState, SwarmNode, TaskReport};

use bollard::errors::Error as DockerError;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot reach the Docker engine")]
    Connect(#[source] bollard::errors::Error),
    #[error("cannot list containers")]
    List(#[source] bollard::errors::Error),
    #[error("cannot inspect image {image}")]
    InspectImage {
        image: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("cannot inspect network {network}")]
    InspectNetwork {
        network: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error(
        "the container name {name} is taken by a container this workerctl instance does not own; \
         remove it (docker rm -f {name}) or give this daemon another `instance`"
    )]
    NameTaken { name: String },
    #[error("cannot create container {name}")]
    Create {
        name: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("cannot start container {container}")]
    Start {
        container: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("cannot stop container {container}")]
    Stop {
        container: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("cannot remove container {container}")]
    Remove {
        container: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("cannot read the logs of container {container}")]
    Logs {
        container: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("cannot rename container {container} to {name}")]
    Rename {
        container: String,
        name: String,
        #[source]
        source: bollard::errors::Error,
    },
}

/// Why a call to the swarm failed.
#[derive(Debug, thiserror::Error)]
pub enum SwarmError {
    #[error("cannot reach the Docker engine")]
    Connect(#[source] DockerError),
    #[error(
        "the Docker engine is not a swarm manager (swarm state: {state}); \
         run `docker swarm init` there, or point DOCKER_HOST at a manager, or set runtime.backend = \"docker\""
    )]
    NotManager { state: String },
    #[error("cannot list services")]
    List(#[source] DockerError),
    #[error("cannot list the tasks of services")]
    Tasks(#[source] DockerError),
    #[error("cannot list the swarm's nodes")]
    Nodes(#[source] DockerError),
    #[error("cannot inspect image {image}")]
    InspectImage {
        image: String,
        #[source]
        source: DockerError,
    },
    #[error("cannot inspect network {network}")]
    InspectNetwork {
        network: String,
        #[source]
        source: DockerError,
    },
    #[error("cannot inspect service {service}")]
    Inspect {
        service: String,
        #[source]
        source: DockerError,
    },
    #[error(
        "the service name {name} is taken by a service this workerctl instance does not own; \
         remove it (docker service rm {name}) or give this daemon another `instance`"
    )]
    NameTaken { name: String },
    #[error("cannot create service {name}")]
    Create {
        name: String,
        #[source]
        source: DockerError,
    },
    #[error("cannot update service {service}")]
    Update {
        service: String,
        #[source]
        source: DockerError,
    },
    #[error("cannot remove service {service}")]
    Remove {
        service: String,
        #[source]
        source: DockerError,
    },
}

/// The reconciler's view of the container engine. `list` is one API call for
/// all managed containers; nothing here is called once per worker per idle pass.
pub trait ContainerRuntime: Send + Sync + 'static {
    /// Every container carrying this instance's label, running or not, and
    /// every container of SensorBucket's own controller
    /// ([`crate::model::Owner::SensorBucket`]).
    fn list(&self) -> impl Future<Output = Result<Vec<ManagedContainer>, RuntimeError>> + Send;

    /// Resolves an image tag to its id.
    fn image(&self, image: &str) -> impl Future<Output = Result<ImageState, RuntimeError>> + Send;

    /// Whether a network of that exact name exists.
    fn network_exists(
        &self,
        network: &str,
    ) -> impl Future<Output = Result<bool, RuntimeError>> + Send;

    /// Creates (does not start) a container; returns its id.
    /// A name held by a container of someone else is [`RuntimeError::NameTaken`].
    fn create(
        &self,
        spec: &ContainerSpec,
    ) -> impl Future<Output = Result<String, RuntimeError>> + Send;

    fn start(&self, id: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;

    /// SIGTERM, then SIGKILL after `timeout`. Stopping a stopped container is fine.
    fn stop(
        &self,
        id: &str,
        timeout: Duration,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;

    /// Sends `signal`, waits up to `timeout` for the container to exit,
    /// then kills it: a stop with a signal other than the container's own
    /// (a container workerctl did not create). A stopped or vanished
    /// container is fine.
    fn interrupt(
        &self,
        id: &str,
        signal: &str,
        timeout: Duration,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;

    /// Removes a stopped container. Removing a vanished container is fine.
    fn remove(&self, id: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;

    fn rename(&self, id: &str, name: &str)
    -> impl Future<Output = Result<(), RuntimeError>> + Send;

    /// The last `lines` lines a container wrote (stdout and stderr
    /// interleaved); none if it is gone. Called for exited containers only,
    /// to say why they exited.
    fn last_lines(
        &self,
        id: &str,
        lines: usize,
    ) -> impl Future<Output = Result<Vec<String>, RuntimeError>> + Send;
}

/// The reconciler's view of a service orchestrator (Docker Swarm, through a
/// manager): one replicated service per worker, rolled out by the
/// orchestrator itself. `list` is one API call for all managed services;
/// `tasks` one for all services that run fewer tasks than they want (and one
/// more while a node is not ready); `nodes` one.
/// `swarm.rs` (bollard) is the one real implementation.
pub trait ServiceRuntime: Send + Sync + 'static {
    /// Every service carrying this instance's label, with its task counts
    /// and where its last update stands.
    fn list(&self) -> impl Future<Output = Result<Vec<ManagedService>, SwarmError>> + Send;

    /// The swarm's nodes and their states: one API call.
    fn nodes(&self) -> impl Future<Output = Result<Vec<SwarmNode>, SwarmError>> + Send;

    /// The tasks of these services, and every task on these nodes (ids), with why the services' tasks fail: one API call for
    /// each list that is not empty.
    fn tasks(
        &self,
        services: &[&ManagedService],
        nodes: &[&str],
    ) -> impl Future<Output = Result<TaskReport, SwarmError>> + Send;

    /// Resolves an image tag (on the manager) to its id.
    fn image(&self, image: &str) -> impl Future<Output = Result<ImageState, SwarmError>> + Send;

    /// Whether services can join that network.
    fn network(
        &self,
        network: &str,
    ) -> impl Future<Output = Result<NetworkState, SwarmError>> + Send;

    /// Creates a worker's service; returns its id.
    fn create(
        &self,
        service: &WorkerService,
    ) -> impl Future<Output = Result<String, SwarmError>> + Send;

    /// Replaces the service's spec: the orchestrator's rolling update.
    fn update(
        &self,
        current: &ManagedService,
        service: &WorkerService,
    ) -> impl Future<Output = Result<(), SwarmError>> + Send;

    /// Changes the replica count alone.
    fn scale(
        &self,
        current: &ManagedService,
        replicas: u32,
    ) -> impl Future<Output = Result<(), SwarmError>> + Send;

    /// Removes a service (its tasks stop gracefully). Removing a vanished
    /// one is fine.
    fn remove(&self, id: &str) -> impl Future<Output = Result<(), SwarmError>> + Send;
}
