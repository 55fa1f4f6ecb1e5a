//! In-memory fakes of the boundaries, [`WorkerStore`], [`ContainerRuntime`]
//! and [`ServiceRuntime`], for unit tests of the loop and the reconciler with
//! paused tokio time. They can script failures (the next N creates fail) and
//! delays (a stop that waits out a grace period), and they count calls.
//! Test-only: the real boundaries are tested on the real services.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use uuid::Uuid;

use crate::model::{
    ContainerSpec, Health, ManagedContainer, ManagedService, Owner, Revision, Rollout, RunState,
    WorkerId, WorkerRow, WorkerService,
};
use crate::model::{ImageState, NetworkState, Observed, SwarmNode, TaskReport};
use crate::runtime::SwarmError;
use crate::runtime::{ContainerRuntime, RuntimeError, ServiceRuntime};
use crate::store::{Code, StatusUpdate, StoreError, WorkerStore};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// An enabled python worker `n` at `revision`, as the store would read it.
pub(crate) fn row(n: u128, revision: i32) -> WorkerRow {
    WorkerRow {
        id: WorkerId(Uuid::from_u128(n)),
        name: format!("w{n}"),
        state: "enabled".into(),
        language: "python".into(),
        revision: Revision(revision),
        entrypoint: "main.main".into(),
        status: "unknown".into(),
        status_info: String::new(),
        source_len: Some(10),
        source_is_zip: true,
        source_sha256: Some("ab".into()),
        code_token: format!("token{n}"),
        scale: Default::default(),
        debug: false,
    }
}

/// Rows in memory; status writes land on them.
#[derive(Default)]
pub(crate) struct FakeStore {
    pub rows: Mutex<Vec<WorkerRow>>,
    pub loads: Mutex<u32>,
}

impl FakeStore {
    pub(crate) fn with(rows: Vec<WorkerRow>) -> Arc<Self> {
        Arc::new(FakeStore {
            rows: Mutex::new(rows),
            ..Default::default()
        })
    }

    pub(crate) fn loads(&self) -> u32 {
        *lock(&self.loads)
    }

    pub(crate) fn status_of(&self, n: u128) -> (String, String) {
        let rows = lock(&self.rows);
        let row = rows.iter().find(|r| r.id.0.as_u128() == n);
        row.map(|r| (r.status.clone(), r.status_info.clone()))
            .unwrap_or_default()
    }

    pub(crate) fn update(&self, n: u128, f: impl FnOnce(&mut WorkerRow)) {
        let mut rows = lock(&self.rows);
        if let Some(row) = rows.iter_mut().find(|r| r.id.0.as_u128() == n) {
            f(row);
        }
    }
}

impl WorkerStore for FakeStore {
    async fn load_workers(&self) -> Result<Vec<WorkerRow>, StoreError> {
        *lock(&self.loads) += 1;
        Ok(lock(&self.rows).clone())
    }

    async fn write_statuses(&self, updates: &[StatusUpdate]) -> Result<u64, StoreError> {
        let mut rows = lock(&self.rows);
        let mut n = 0;
        for u in updates {
            if let Some(row) = rows
                .iter_mut()
                .find(|r| r.id == u.id && r.revision == u.revision)
            {
                row.status = u.status.as_str().into();
                row.status_info = u.info.clone();
                n += 1;
            }
        }
        Ok(n)
    }

    async fn write_observed(&self, _: &[Observed]) -> Result<(), StoreError> {
        Ok(())
    }

    async fn load_code(&self, _: WorkerId, _: &str) -> Result<Option<Code>, StoreError> {
        Ok(None)
    }
}

/// Containers in memory. Started containers pass their health check at
/// once; stops take `stop_delay`; the next `failing_creates` creates fail.
#[derive(Default)]
pub(crate) struct FakeRuntime {
    state: Mutex<RuntimeState>,
}

#[derive(Default)]
struct RuntimeState {
    containers: Vec<ManagedContainer>,
    next_id: u32,
    failing_creates: u32,
    stop_delays: HashMap<WorkerId, Duration>,
    creates: u32,
}

impl FakeRuntime {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(FakeRuntime::default())
    }

    /// Stopping worker `n`'s containers takes `delay` (a grace period).
    pub(crate) fn slow_stop(&self, n: u128, delay: Duration) {
        lock(&self.state)
            .stop_delays
            .insert(WorkerId(Uuid::from_u128(n)), delay);
    }

    /// The next `n` creates fail.
    pub(crate) fn fail_creates(&self, n: u32) {
        lock(&self.state).failing_creates = n;
    }

    /// Creates attempted so far, failed ones included.
    pub(crate) fn creates(&self) -> u32 {
        lock(&self.state).creates
    }

    /// Worker `n`'s containers that run, by revision.
    pub(crate) fn running(&self, n: u128) -> Vec<i32> {
        let state = lock(&self.state);
        let mut revisions: Vec<i32> = state
            .containers
            .iter()
            .filter(|c| c.worker_id == Some(WorkerId(Uuid::from_u128(n))))
            .filter(|c| c.state == RunState::Running)
            .filter_map(|c| c.revision.map(|r| r.0))
            .collect();
        revisions.sort();
        revisions
    }

    fn set_state(&self, id: &str, state: RunState) {
        let mut s = lock(&self.state);
        if let Some(c) = s.containers.iter_mut().find(|c| c.id == id) {
            c.health = if state == RunState::Running {
                Health::Healthy
            } else {
                Health::None
            };
            c.state = state;
        }
    }
}

fn refused(container: &str) -> RuntimeError {
    RuntimeError::Create {
        name: container.to_string(),
        source: bollard::errors::Error::DockerResponseServerError {
            status_code: 500,
            message: "scripted failure".into(),
        },
    }
}

impl ContainerRuntime for FakeRuntime {
    async fn list(&self) -> Result<Vec<ManagedContainer>, RuntimeError> {
        Ok(lock(&self.state).containers.clone())
    }

    async fn image(&self, _: &str) -> Result<ImageState, RuntimeError> {
        Ok(ImageState::Present {
            id: "sha256:fake".into(),
        })
    }

    async fn network_exists(&self, _: &str) -> Result<bool, RuntimeError> {
        Ok(true)
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        let mut s = lock(&self.state);
        s.creates += 1;
        if s.failing_creates > 0 {
            s.failing_creates -= 1;
            return Err(refused(&spec.name));
        }
        s.next_id += 1;
        let id = format!("fake{:08}", s.next_id);
        s.containers.push(ManagedContainer {
            id: id.clone(),
            name: spec.name.clone(),
            worker_id: Some(spec.worker_id),
            revision: Some(spec.revision),
            spec_hash: Some(spec.hash()),
            replica: spec.replica,
            image_id: spec.image_id.clone(),
            state: RunState::Created,
            health: Health::None,
            dockerworker: true,
            created: 0,
            owner: Owner::Workerctl,
        });
        Ok(id)
    }

    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        self.set_state(id, RunState::Running);
        Ok(())
    }

    async fn stop(&self, id: &str, _: Duration) -> Result<(), RuntimeError> {
        let delay = {
            let s = lock(&self.state);
            let worker = s
                .containers
                .iter()
                .find(|c| c.id == id)
                .and_then(|c| c.worker_id);
            worker.and_then(|w| s.stop_delays.get(&w).copied())
        };
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        self.set_state(id, RunState::Exited(Some(0)));
        Ok(())
    }

    async fn interrupt(&self, id: &str, _: &str, timeout: Duration) -> Result<(), RuntimeError> {
        self.stop(id, timeout).await
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        lock(&self.state).containers.retain(|c| c.id != id);
        Ok(())
    }

    async fn rename(&self, id: &str, name: &str) -> Result<(), RuntimeError> {
        let mut s = lock(&self.state);
        if let Some(c) = s.containers.iter_mut().find(|c| c.id == id) {
            c.name = name.to_string();
        }
        Ok(())
    }

    async fn last_lines(&self, _: &str, _: usize) -> Result<Vec<String>, RuntimeError> {
        Ok(vec![])
    }
}

/// Services in memory, as a swarm manager would keep them: a create or an
/// update settles at once (every task runs) unless the spec's entrypoint
/// starts with `broken`, which Swarm rolls back. Creates can be made slow
/// (per worker) or fail; every call is counted.
#[derive(Default)]
pub(crate) struct FakeSwarm {
    pub services: Mutex<Vec<ManagedService>>,
    slow_creates: Mutex<HashMap<WorkerId, Duration>>,
    failing_updates: Mutex<u32>,
    pub calls: Mutex<HashMap<&'static str, u32>>,
}

impl FakeSwarm {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(FakeSwarm::default())
    }

    /// Creating worker `n`'s service takes `delay`.
    pub(crate) fn slow_create(&self, n: u128, delay: Duration) {
        lock(&self.slow_creates).insert(WorkerId(Uuid::from_u128(n)), delay);
    }

    /// The next `n` updates fail.
    pub(crate) fn fail_updates(&self, n: u32) {
        *lock(&self.failing_updates) = n;
    }

    pub(crate) fn calls(&self, what: &str) -> u32 {
        lock(&self.calls).get(what).copied().unwrap_or(0)
    }

    /// Worker `n`'s service: (revision, replicas), if it has one.
    pub(crate) fn service(&self, n: u128) -> Option<(i32, u32)> {
        let id = WorkerId(Uuid::from_u128(n));
        lock(&self.services)
            .iter()
            .find(|s| s.worker_id == Some(id))
            .map(|s| (s.revision.map_or(0, |r| r.0), s.replicas))
    }

    fn count(&self, what: &'static str) {
        *lock(&self.calls).entry(what).or_default() += 1;
    }
}

fn fake_service(id: String, service: &WorkerService) -> ManagedService {
    ManagedService {
        id,
        name: service.spec.name.clone(),
        version: 1,
        worker_id: Some(service.spec.worker_id),
        revision: Some(service.spec.revision),
        spec_hash: Some(service.spec.hash()),
        replicas: service.replicas,
        running: u64::from(service.replicas),
        desired_tasks: u64::from(service.replicas),
        rollout: Rollout::Settled,
    }
}

fn broken(service: &WorkerService) -> bool {
    service
        .spec
        .env
        .get("CODE_ENTRYPOINT")
        .is_some_and(|e| e.starts_with("broken"))
}

impl ServiceRuntime for FakeSwarm {
    async fn list(&self) -> Result<Vec<ManagedService>, SwarmError> {
        self.count("list");
        Ok(lock(&self.services).clone())
    }

    async fn nodes(&self) -> Result<Vec<SwarmNode>, SwarmError> {
        self.count("nodes");
        Ok(vec![SwarmNode {
            id: "node1".into(),
            hostname: "node-1".into(),
            state: "ready".into(),
        }])
    }

    async fn tasks(
        &self,
        services: &[&ManagedService],
        nodes: &[&str],
    ) -> Result<TaskReport, SwarmError> {
        if !services.is_empty() {
            self.count("tasks");
        }
        if !nodes.is_empty() {
            self.count("tasks");
        }
        Ok(TaskReport::default())
    }

    async fn image(&self, _image: &str) -> Result<ImageState, SwarmError> {
        self.count("image");
        Ok(ImageState::Present {
            id: "sha256:fake".into(),
        })
    }

    async fn network(&self, _network: &str) -> Result<NetworkState, SwarmError> {
        self.count("network");
        Ok(NetworkState::Present)
    }

    async fn create(&self, service: &WorkerService) -> Result<String, SwarmError> {
        self.count("create");
        let delay = lock(&self.slow_creates)
            .get(&service.spec.worker_id)
            .copied();
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        let id = format!("svc-{}", service.spec.worker_id);
        lock(&self.services).push(fake_service(id.clone(), service));
        Ok(id)
    }

    async fn update(
        &self,
        current: &ManagedService,
        service: &WorkerService,
    ) -> Result<(), SwarmError> {
        self.count("update");
        {
            let mut failing = lock(&self.failing_updates);
            if *failing > 0 {
                *failing -= 1;
                return Err(SwarmError::NameTaken {
                    name: "scripted update failure".into(),
                });
            }
        }
        let mut services = lock(&self.services);
        let Some(s) = services.iter_mut().find(|s| s.id == current.id) else {
            return Ok(());
        };
        if broken(service) {
            s.rollout = Rollout::RolledBack {
                message: "update rolled back due to failure".into(),
            };
        } else {
            *s = fake_service(s.id.clone(), service);
        }
        Ok(())
    }

    async fn scale(&self, current: &ManagedService, replicas: u32) -> Result<(), SwarmError> {
        self.count("scale");
        let mut services = lock(&self.services);
        if let Some(s) = services.iter_mut().find(|s| s.id == current.id) {
            s.replicas = replicas;
            s.running = u64::from(replicas);
        }
        Ok(())
    }

    async fn remove(&self, id: &str) -> Result<(), SwarmError> {
        self.count("remove");
        lock(&self.services).retain(|s| s.id != id);
        Ok(())
    }
}
