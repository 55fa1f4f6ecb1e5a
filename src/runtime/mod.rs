//! The container runtime boundary: everything workerctl asks of Docker goes
//! through [`ContainerRuntime`]. Callers see [`ManagedContainer`] and
//! [`ContainerSpec`] values, never Docker API types; `docker.rs` (bollard) is
//! the one real implementation.

pub mod docker;

use std::future::Future;
use std::time::Duration;

use crate::model::{ContainerSpec, ManagedContainer};

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

/// The state of the worker image, as one pass sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageState {
    Present { id: String },
    Missing,
}

/// The reconciler's view of the container engine. `list` is one API call for
/// all managed containers; nothing here is called once per worker per idle pass.
pub trait ContainerRuntime: Send + Sync + 'static {
    /// Every container carrying this instance's label, running or not.
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
