//! The vocabulary shared by every part of workerctl: worker ids and revisions,
//! the desired state read from the store, the actual state observed in the
//! container runtime, and the labels that tie the two together.
//!
//! Nothing here does I/O; these are plain values with parsing at the edges
//! ("parse, don't validate").

mod ids;
mod observed;
mod scale;

pub use ids::{Revision, WorkerId};
pub use observed::{ImageState, NetworkState, Observed};

pub(crate) use observed::{Demand, QueueDepth, QueueDepths};
pub(crate) use scale::MAX_REPLICAS;
pub use scale::ScaleBounds;

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The instance name used when none is configured. It lives here, not in
/// `config.rs`, so that the vocabulary depends on nothing (config uses model).
pub(crate) const DEFAULT_INSTANCE: &str = "default";

/// Label keys written on every managed container.
pub mod labels {
    /// The workerctl instance that owns the container.
    pub const INSTANCE: &str = "workerctl.instance";
    /// The worker the container runs.
    pub const WORKER_ID: &str = "workerctl.worker-id";
    /// The worker revision the container was created for.
    pub const REVISION: &str = "workerctl.revision";
    /// Hash of the container spec, to detect image, env or limit changes.
    pub(crate) const SPEC_HASH: &str = "workerctl.spec-hash";
    /// Which replica of its worker the container is (0, 1, …); a container
    /// without it is replica 0, as every container was before replicas.
    pub(crate) const REPLICA: &str = "workerctl.replica";
    /// Set by the dockerworker image (a `LABEL`, which containers inherit):
    /// its exit codes mean what [`crate::exit`] says they mean.
    pub(crate) const RUNTIME: &str = "workerctl.runtime";
    /// The value of [`RUNTIME`] on the dockerworker image.
    pub(crate) const RUNTIME_DOCKERWORKER: &str = "dockerworker";
    /// Set by an image whose runtime records its own traffic, given
    /// `WORKER_RECORD_KEEP` (the dockerworker since it does): the recorder
    /// then copies nothing of its workers' messages (`crate::recorder`).
    pub(crate) const RECORDS: &str = "workerctl.records";
    /// The value of [`RECORDS`]: it sends its records in batches.
    pub(crate) const RECORDS_BATCHES: &str = "batches";

    /// Whether `labels` (an image's or a container's, as the engine gives
    /// them) set `key` to `value`.
    pub(crate) fn is(
        labels: Option<&std::collections::HashMap<String, String>>,
        key: &str,
        value: &str,
    ) -> bool {
        labels.and_then(|l| l.get(key)).is_some_and(|v| v == value)
    }

    /// The labels SensorBucket's own Docker controller puts on its worker
    /// containers (docs/compatibility.md §6): workerctl takes those over.
    pub mod sensorbucket {
        pub(crate) const CONTROLLED_BY: &str = "controlled-by";
        /// The value of [`CONTROLLED_BY`].
        pub(crate) const CONTROLLER: &str = "sensorbucket";
        pub const WORKER_ID: &str = "worker-id";
        pub const REVISION: &str = "worker-revision";
    }
}

/// Who started a container the planner sees.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Owner {
    /// This workerctl instance (it carries `workerctl.*` labels).
    #[default]
    Workerctl,
    /// SensorBucket's own Docker controller (`controlled-by=sensorbucket`).
    /// workerctl never creates such a container; it replaces one whose
    /// worker is in its store, like an old revision (`docker.takeover`),
    /// and never touches the others.
    SensorBucket,
}

/// What the workerctl labels of a container or a service say: whose it is,
/// at which revision and spec, which replica. An unreadable worker id,
/// revision or hash is `None` (an orphan); a missing replica is replica 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Labelled {
    pub worker_id: Option<WorkerId>,
    pub revision: Option<Revision>,
    pub spec_hash: Option<String>,
    pub replica: u32,
}

impl Labelled {
    /// Reads the labels through `get` (a map lookup of whatever map the
    /// runtime hands back).
    pub(crate) fn read<'a>(get: impl Fn(&str) -> Option<&'a String>) -> Labelled {
        Labelled {
            worker_id: get(labels::WORKER_ID).and_then(|v| v.parse().ok()),
            revision: get(labels::REVISION)
                .and_then(|v| v.parse().ok())
                .map(Revision),
            spec_hash: get(labels::SPEC_HASH).filter(|v| !v.is_empty()).cloned(),
            replica: get(labels::REPLICA)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        }
    }
}

/// The value of the `status` column.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Unknown,
    Ready,
    Error,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Unknown => "unknown",
            Status::Ready => "ready",
            Status::Error => "error",
        }
    }

    /// The column's value as read: anything but 'ready' or 'error' (a NULL,
    /// a hand edit) is 'unknown', which is what the daemon would write for it.
    pub(crate) fn from_column(value: &str) -> Status {
        match value {
            "ready" => Status::Ready,
            "error" => Status::Error,
            _ => Status::Unknown,
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<String> for Status {
    fn from(value: String) -> Self {
        Status::from_column(&value)
    }
}

/// The value of the `state` column. Only 'enabled' and 'disabled' exist
/// (docs/compatibility.md §1); anything else is kept, so that it can be shown and
/// reported as an error rather than guessed at.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum WorkerState {
    Enabled,
    Disabled,
    /// Neither: the raw value.
    Other(String),
}

impl WorkerState {
    pub fn as_str(&self) -> &str {
        match self {
            WorkerState::Enabled => "enabled",
            WorkerState::Disabled => "disabled",
            WorkerState::Other(raw) => raw,
        }
    }

    pub(crate) fn is_enabled(&self) -> bool {
        *self == WorkerState::Enabled
    }
}

impl From<String> for WorkerState {
    fn from(value: String) -> Self {
        match value.as_str() {
            "enabled" => WorkerState::Enabled,
            "disabled" => WorkerState::Disabled,
            _ => WorkerState::Other(value),
        }
    }
}

impl fmt::Display for WorkerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Serialised as the column's text, so JSON output keeps its shape.
impl Serialize for WorkerState {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// One row of `user_workers` as the store reads it for a pass: everything but
/// the code itself, whose digest and shape are computed by the database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerRow {
    pub id: WorkerId,
    pub name: String,
    pub state: String,
    pub language: String,
    pub revision: Revision,
    pub entrypoint: String,
    pub status: String,
    pub status_info: String,
    /// Size of `source` in bytes; `None` when the column is NULL.
    pub source_len: Option<i64>,
    /// Whether `source` starts with the zip signature.
    pub source_is_zip: bool,
    /// Hex sha256 of `source`, if any.
    pub source_sha256: Option<String>,
    /// The token the worker's container presents to download its code.
    pub code_token: String,
    /// How many replicas it runs (`workerctl_worker_scale`; one without a row).
    pub scale: ScaleBounds,
    /// Whether its containers run a debug adapter (`workerctl_worker_debug`:
    /// a row while `workerctl worker dev --debug` runs for it).
    pub debug: bool,
}

/// An enabled, well-formed worker: what should be running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredWorker {
    pub id: WorkerId,
    pub name: String,
    pub revision: Revision,
    pub entrypoint: String,
    pub code_sha256: String,
    pub code_token: String,
    /// Its containers run a debug adapter (`WORKER_DEBUG=1`).
    pub debug: bool,
}

/// How a row was understood: what the planner should do with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Intent {
    /// Enabled and valid: keep a container running at this revision.
    Run(DesiredWorker),
    /// Disabled: no container.
    Stop,
    /// The row cannot be acted on; containers are left as they are and the
    /// status says why.
    Invalid(String),
}

/// Interprets a row. Pure; every rejection reason is a sentence a person can act on.
pub(crate) fn intent_of(row: &WorkerRow) -> Intent {
    match row.state.as_str() {
        "disabled" => return Intent::Stop,
        "enabled" => {}
        other => {
            return Intent::Invalid(format!(
                "unknown state {other:?}: set state to 'enabled' or 'disabled'"
            ));
        }
    }
    if row.language != "python" {
        return Intent::Invalid(format!(
            "language {:?} is not supported: only 'python' workers can run",
            row.language
        ));
    }
    let Some(sha) = row
        .source_sha256
        .clone()
        .filter(|_| row.source_len > Some(0))
    else {
        return Intent::Invalid("the worker has no code: save its code in the dashboard".into());
    };
    if !row.source_is_zip {
        return Intent::Invalid(
            "the code is not a zip archive: save the code again from the dashboard".into(),
        );
    }
    Intent::Run(DesiredWorker {
        id: row.id,
        name: row.name.clone(),
        revision: row.revision,
        entrypoint: if row.entrypoint.is_empty() {
            "main.main".into()
        } else {
            row.entrypoint.clone()
        },
        code_sha256: sha,
        code_token: row.code_token.clone(),
        debug: row.debug,
    })
}

/// Everything that defines a worker's container. Two containers with equal
/// specs are interchangeable; any difference calls for a recreate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ContainerSpec {
    pub worker_id: WorkerId,
    pub revision: Revision,
    /// Which replica of the worker this is. Left out of the hash (with the
    /// name, which follows from it), so all replicas of one revision share
    /// one spec hash.
    #[serde(skip)]
    pub replica: u32,
    pub name: String,
    pub image: String,
    /// The image id the tag resolved to, so a rebuilt image rolls out.
    pub image_id: String,
    pub env: BTreeMap<String, String>,
    pub network: String,
    pub limits: Limits,
    pub hardening: Hardening,
    /// The signal that stops it (`docker.stop_signal`); `None` lets the
    /// runtime choose by the image. Not hashed: it changes how a container
    /// is stopped, not what it runs.
    #[serde(skip)]
    pub stop_signal: Option<String>,
    /// Where the container reports that it consumes its queue
    /// (`WORKER_READY_URL`). Derived from the rest of the spec, hash
    /// included, so it is left out of the hash.
    #[serde(skip)]
    pub ready_url: Option<String>,
}

/// How a worker container is locked down. Every knob is configurable
/// (`docker.*`), so that an image that only knows the contract still runs:
/// it gets the writable places it needs as tmpfs mounts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hardening {
    pub read_only_rootfs: bool,
    pub no_new_privileges: bool,
    /// Capabilities dropped (`ALL` by default).
    pub cap_drop: Vec<String>,
    /// Paths mounted as tmpfs: the only writable places under a read-only root.
    pub tmpfs: Vec<String>,
}

/// Resource limits applied to every worker container.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub memory_bytes: i64,
    pub nano_cpus: i64,
    pub pids: i64,
}

impl ContainerSpec {
    /// A short, stable digest of the spec, stored as a label.
    pub fn hash(&self) -> String {
        // The name hashed is replica 0's, so that replica 0 keeps the hash
        // it had before replicas (no rollout on upgrade) and every replica
        // shares it.
        let mut keyed = self.clone();
        keyed.name = replica_family(&self.name, self.replica).to_string();
        // Serialising a struct of BTreeMaps and scalars is deterministic.
        let json = serde_json::to_vec(&keyed).unwrap_or_default();
        hex::encode(&Sha256::digest(&json)[..8])
    }

    /// The image a Swarm service of this spec runs: pinned, like a plain
    /// container's, to what the tag resolved to (so that a rebuilt tag
    /// rolls out): the image id, which Swarm never pulls (every node must
    /// have the image); for a tag in a registry ([`registry_of`]) the
    /// `repo@sha256:…` digest its registry serves, which every node pulls;
    /// a configured digest as it is.
    pub fn service_image(&self) -> &str {
        if self.image.contains('@') || self.image_id.is_empty() {
            &self.image
        } else {
            &self.image_id
        }
    }

    /// The labels the container carries.
    pub fn labels(&self, instance: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            (labels::INSTANCE.to_string(), instance.to_string()),
            (labels::WORKER_ID.to_string(), self.worker_id.to_string()),
            (labels::REVISION.to_string(), self.revision.to_string()),
            (labels::SPEC_HASH.to_string(), self.hash()),
            (labels::REPLICA.to_string(), self.replica.to_string()),
        ])
    }
}

/// The registry an image reference names, if it names one: by Docker's
/// rule, its first path component when that contains a `.` or a `:`, or is
/// `localhost` (`registry:5000/team/worker:1` → `registry:5000`;
/// `workerctl/dockerworker:latest` and `python:3.11` name none: they are
/// Docker Hub's, or only local).
pub fn registry_of(image: &str) -> Option<&str> {
    let (first, _) = image.split_once('/')?;
    (first.contains('.') || first.contains(':') || first == "localhost").then_some(first)
}

/// An image reference without its tag or digest: the repository
/// (`registry:5000/team/worker:1` → `registry:5000/team/worker`).
pub fn repository_of(image: &str) -> &str {
    let name = image.split_once('@').map_or(image, |(name, _)| name);
    match name.rsplit_once(':') {
        // A colon after the last slash is a tag's; before it, a port's.
        Some((repo, tag)) if !tag.contains('/') => repo,
        _ => name,
    }
}

/// The name of replica `replica` of the worker whose container (replica 0)
/// is named `base`: `base` itself, or `<base>-r<k>`.
pub(crate) fn replica_name(base: &str, replica: u32) -> String {
    match replica {
        0 => base.to_string(),
        k => format!("{base}-r{k}"),
    }
}

/// The name an old container is given while its replacement starts under
/// its name (start-first): `<name>-old-<short id>`.
pub(crate) fn parked_name(name: &str, short_id: &str) -> String {
    format!("{name}-old-{short_id}")
}

/// Whether `listed` is the container first named `name`: that name itself,
/// or the name it was parked under.
pub(crate) fn was_named(listed: &str, name: &str) -> bool {
    listed == name
        || listed
            .strip_prefix(name)
            .is_some_and(|rest| rest.starts_with("-old-"))
}

/// Replica 0's name, from the name of replica `replica`.
fn replica_family(name: &str, replica: u32) -> &str {
    match replica {
        0 => name,
        k => name.strip_suffix(&format!("-r{k}")).unwrap_or(name),
    }
}

/// The container name of a worker, scoped by instance so that two instances
/// holding the same worker id never fight over a name.
pub fn container_name(instance: &str, id: WorkerId) -> String {
    if instance == DEFAULT_INSTANCE {
        format!("worker-{id}")
    } else {
        format!("{instance}-worker-{id}")
    }
}

/// What the runtime says about a container it runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunState {
    Running,
    /// Created but never started.
    Created,
    /// Exited with the given code (when known).
    Exited(Option<i64>),
    /// Paused, restarting, removing, dead: anything else.
    Other(String),
}

/// What the image's HEALTHCHECK says, as the container list shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// The image has no health check.
    None,
    Starting,
    Healthy,
    Unhealthy,
}

/// A container carrying this instance's labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManagedContainer {
    pub id: String,
    pub name: String,
    /// `None` when the label is missing or unreadable: an orphan.
    pub worker_id: Option<WorkerId>,
    pub revision: Option<Revision>,
    pub spec_hash: Option<String>,
    /// Which replica of its worker it is (label `workerctl.replica`; 0 without it).
    pub replica: u32,
    pub image_id: String,
    pub state: RunState,
    pub health: Health,
    /// Whether it runs the dockerworker, whose exit codes are known.
    pub dockerworker: bool,
    /// Unix seconds of creation.
    pub created: i64,
    pub owner: Owner,
}

impl ManagedContainer {
    /// A short form for logs and status lines.
    pub(crate) fn short_id(&self) -> &str {
        self.id.get(..12).unwrap_or(&self.id)
    }
}

/// What one worker's service should be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerService {
    pub spec: ContainerSpec,
    pub replicas: u32,
}

/// Where a service's rolling update stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rollout {
    /// No update, or the last one completed.
    Settled,
    Updating,
    /// Swarm paused the update (a rollback that failed too).
    Paused {
        message: String,
    },
    RollingBack {
        message: String,
    },
    /// The last update failed and the previous spec is back in place.
    RolledBack {
        message: String,
    },
}

/// A Swarm service carrying this instance's label (`runtime/swarm.rs`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManagedService {
    pub id: String,
    pub name: String,
    /// Swarm's version of the spec: an update must name the one it changes.
    pub version: u64,
    /// `None` when the label is missing or unreadable: an orphan.
    pub worker_id: Option<WorkerId>,
    pub revision: Option<Revision>,
    pub spec_hash: Option<String>,
    /// The replica count the spec asks for.
    pub replicas: u32,
    /// Tasks running (and, with a HEALTHCHECK, healthy).
    pub running: u64,
    /// Tasks Swarm is trying to keep.
    pub desired_tasks: u64,
    pub rollout: Rollout,
}

/// A node of the swarm, as the manager sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SwarmNode {
    pub id: String,
    pub hostname: String,
    /// Swarm's word for its state: `ready`, `down`, `unknown`,
    /// `disconnected`.
    pub state: String,
}

impl SwarmNode {
    pub fn is_ready(&self) -> bool {
        self.state == "ready"
    }
}

/// One task of a managed service, as the manager last heard of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SwarmTask {
    pub service_id: String,
    /// The node it was placed on (a node id); none before it is placed.
    pub node_id: Option<String>,
    /// The image its container runs, as the service names it.
    pub image: String,
    /// Its state in Swarm's words: `running`, `rejected`, `failed`,
    /// `shutdown`, ….
    pub state: String,
    /// What Swarm says went wrong, if anything.
    pub error: Option<String>,
    /// Swarm's version of the task: a later one is newer.
    pub version: u64,
}

/// What the tasks of some services say, from one listing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TaskReport {
    pub tasks: Vec<SwarmTask>,
    /// Why the tasks of a service fail, by service id: its newest failed or
    /// rejected task, in Swarm's words (and its container's, if readable).
    pub errors: HashMap<String, String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_reference_names_its_registry_and_its_repository() {
        let cases = [
            // reference, registry, repository
            (
                "workerctl/dockerworker:latest",
                None,
                "workerctl/dockerworker",
            ),
            ("python:3.11", None, "python"),
            ("python", None, "python"),
            (
                "registry:5000/team/worker:1",
                Some("registry:5000"),
                "registry:5000/team/worker",
            ),
            (
                "registry:5000/worker",
                Some("registry:5000"),
                "registry:5000/worker",
            ),
            (
                "ghcr.io/team/worker@sha256:ab",
                Some("ghcr.io"),
                "ghcr.io/team/worker",
            ),
            ("localhost/worker:2", Some("localhost"), "localhost/worker"),
        ];
        for (image, registry, repository) in cases {
            assert_eq!(registry_of(image), registry, "{image}");
            assert_eq!(repository_of(image), repository, "{image}");
        }
    }
    use uuid::Uuid;

    fn row() -> WorkerRow {
        WorkerRow {
            id: WorkerId(Uuid::nil()),
            name: "w".into(),
            state: "enabled".into(),
            language: "python".into(),
            revision: Revision(1),
            entrypoint: "main.main".into(),
            status: "unknown".into(),
            status_info: String::new(),
            source_len: Some(10),
            source_is_zip: true,
            source_sha256: Some("ab".into()),
            code_token: "t0k".into(),
            scale: Default::default(),
            debug: false,
        }
    }

    #[test]
    fn column_values_read_as_typed_states_and_statuses() {
        assert_eq!(
            WorkerState::from("enabled".to_string()),
            WorkerState::Enabled
        );
        assert_eq!(
            WorkerState::from("disabled".to_string()),
            WorkerState::Disabled
        );
        let odd = WorkerState::from("paused".to_string());
        assert_eq!(odd, WorkerState::Other("paused".into()));
        assert_eq!(odd.to_string(), "paused");
        assert_eq!(serde_json::to_value(&odd).expect("json"), "paused");
        assert_eq!(Status::from_column("ready"), Status::Ready);
        assert_eq!(Status::from_column("error"), Status::Error);
        assert_eq!(Status::from_column("???"), Status::Unknown);
    }

    #[test]
    fn enabled_python_zip_runs() {
        assert!(matches!(intent_of(&row()), Intent::Run(_)));
    }

    #[test]
    fn disabled_worker_stops() {
        let r = WorkerRow {
            state: "disabled".into(),
            ..row()
        };
        assert_eq!(intent_of(&r), Intent::Stop);
    }

    #[test]
    fn unknown_state_is_invalid_and_says_which() {
        let r = WorkerRow {
            state: "paused".into(),
            ..row()
        };
        assert!(matches!(intent_of(&r), Intent::Invalid(m) if m.contains("\"paused\"")));
    }

    #[test]
    fn other_language_is_invalid() {
        let r = WorkerRow {
            language: "go".into(),
            ..row()
        };
        assert!(matches!(intent_of(&r), Intent::Invalid(m) if m.contains("\"go\"")));
    }

    #[test]
    fn empty_or_missing_source_is_invalid() {
        let empty = WorkerRow {
            source_len: Some(0),
            ..row()
        };
        let null = WorkerRow {
            source_len: None,
            source_sha256: None,
            ..row()
        };
        assert!(matches!(intent_of(&empty), Intent::Invalid(m) if m.contains("no code")));
        assert!(matches!(intent_of(&null), Intent::Invalid(m) if m.contains("no code")));
    }

    #[test]
    fn non_zip_source_is_invalid() {
        let r = WorkerRow {
            source_is_zip: false,
            ..row()
        };
        assert!(matches!(intent_of(&r), Intent::Invalid(m) if m.contains("not a zip")));
    }

    #[test]
    fn empty_entrypoint_defaults_to_main_main() {
        let r = WorkerRow {
            entrypoint: String::new(),
            ..row()
        };
        let Intent::Run(w) = intent_of(&r) else {
            panic!("should run")
        };
        assert_eq!(w.entrypoint, "main.main");
    }

    #[test]
    fn spec_hash_changes_with_env() {
        let mut spec = spec();
        let before = spec.hash();
        spec.env.insert("A".into(), "b".into());
        assert_ne!(before, spec.hash());
        let before = spec.hash();
        spec.hardening.tmpfs.push("/usercode".into());
        assert_ne!(before, spec.hash(), "hardening is part of the spec");
    }

    #[test]
    fn the_ready_url_is_not_part_of_the_hash() {
        let with_url = ContainerSpec {
            ready_url: Some("http://ctl/x/ready".into()),
            ..spec()
        };
        assert_eq!(spec().hash(), with_url.hash());
    }

    #[test]
    fn replicas_of_one_spec_share_its_hash() {
        let r2 = ContainerSpec {
            replica: 2,
            name: replica_name("worker-x", 2),
            ..spec()
        };
        assert_eq!(r2.name, "worker-x-r2");
        assert_eq!(spec().hash(), r2.hash());
        assert_eq!(r2.labels("default")[labels::REPLICA], "2");
    }

    fn spec() -> ContainerSpec {
        ContainerSpec {
            worker_id: WorkerId(Uuid::nil()),
            revision: Revision(1),
            replica: 0,
            name: "worker-x".into(),
            image: "img".into(),
            image_id: "sha256:1".into(),
            env: BTreeMap::new(),
            network: "host".into(),
            limits: Limits {
                memory_bytes: 1,
                nano_cpus: 1,
                pids: 1,
            },
            hardening: Hardening {
                read_only_rootfs: true,
                no_new_privileges: true,
                cap_drop: vec!["ALL".into()],
                tmpfs: vec!["/tmp".into()],
            },
            stop_signal: None,
            ready_url: None,
        }
    }
}
