//! workerctl's configuration: one typed value, loaded once at start from
//! built-in defaults, then an optional TOML file, then `WORKERCTL_…`
//! environment variables (`__` separates nesting: `WORKERCTL_DOCKER__IMAGE`).
//!
//! Loading fails with a message naming the offending key; nothing else in the
//! program reads the environment for settings.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::model::{Hardening, Limits};

pub(crate) use crate::model::DEFAULT_INSTANCE;

/// A value that must never be printed (connection strings carry passwords).
#[derive(Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Postgres connection string of the database holding `user_workers`.
    pub database_url: Secret,
    /// Scopes every container this daemon owns; instances never touch each
    /// other's containers.
    pub instance: String,
    /// Devices endpoint of the core service, handed to workers.
    pub endpoint_devices: String,
    pub docker: DockerConfig,
    pub reconcile: ReconcileConfig,
    pub code_server: CodeServerConfig,
    pub amqp: AmqpConfig,
    pub log: LogConfig,
    pub api: ApiConfig,
    pub dead_letters: DeadLettersConfig,
    pub record: RecordConfig,
    pub schedules: SchedulesConfig,
    pub leader: LeaderConfig,
    pub scale: ScaleConfig,
    pub runtime: RuntimeConfig,
    pub swarm: SwarmConfig,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Bearer token of the write API (`POST /api/workers/{id}/invoke`);
    /// none turns that API off (403).
    pub token: Option<Secret>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLettersConfig {
    /// Keep messages routed to `errors` (queue + table); false: leave `errors` alone.
    pub enabled: bool,
    /// The durable quorum queue bound to `errors`.
    pub queue: String,
    /// `x-max-length` of that queue: what waits there while no daemon
    /// collects it; the oldest are dropped beyond it.
    pub queue_max_length: i64,
    /// How many dead letters the table keeps; the oldest go first.
    pub keep: i64,
}

/// Recorded traffic: the last messages each enabled worker received,
/// tapped by a bounded queue per worker that is read only when asked
/// (src/recorder.rs).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RecordConfig {
    /// Tap each enabled worker's input messages (and their outputs); the
    /// CLI and the status page read the taps only when this is on.
    pub enabled: bool,
    /// How many messages are kept per worker, in the table and at most in
    /// its tap queue; the oldest go first.
    pub keep: i64,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulesConfig {
    /// Fire cron schedules from this daemon.
    pub enabled: bool,
    /// How often the schedule table is re-read (new, changed, removed schedules).
    #[serde(with = "humantime_serde")]
    pub poll: Duration,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LeaderConfig {
    /// How often the leader confirms its lock and a standby tries to take it.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// How long a confirmation of the lock stays good; the leader stops
    /// acting when it is older. The server ends a silent session after twice this.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ScaleConfig {
    /// RabbitMQ's management API, read for queue depths (credentials in the
    /// URL, else those of `amqp.url`); empty: no autoscaling.
    pub management_url: Secret,
    /// How often queue depths are read.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// How long demand must stay lower before replicas are removed.
    #[serde(with = "humantime_serde")]
    pub cooldown: Duration,
}

/// Which engine runs the workers.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Plain containers on one Docker engine.
    Docker,
    /// One Docker Swarm service per worker, through a swarm manager.
    Swarm,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    pub backend: Backend,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SwarmConfig {
    /// How long Swarm watches each updated task before the next; a task
    /// that fails (or turns unhealthy) within it rolls the update back.
    #[serde(with = "humantime_serde")]
    pub update_monitor: Duration,
    /// How long after a task exits, or is lost with its node, Swarm starts
    /// it again. Shorter: faster failover when a node is lost, and a
    /// crashing worker restarted as often.
    #[serde(with = "humantime_serde")]
    pub restart_delay: Duration,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DockerConfig {
    /// The worker image (the dockerworker runtime).
    pub image: String,
    /// A Docker network name, or `host`.
    pub network: String,
    /// Grace period between the stop signal and SIGKILL.
    #[serde(with = "humantime_serde")]
    pub stop_timeout: Duration,
    /// The signal that asks a worker to stop (`SIGTERM`, `SIGINT`, …).
    /// Unset: the image's own `STOPSIGNAL` if it declares one, SIGTERM for
    /// the dockerworker, and SIGINT for any other image — a Python runtime
    /// running as PID 1 without a handler (SensorBucket's image) ignores
    /// SIGTERM but stops on SIGINT (KeyboardInterrupt).
    pub stop_signal: Option<String>,
    /// Replace the containers SensorBucket's own Docker controller left
    /// running (`controlled-by=sensorbucket`) for workers of this store,
    /// start-first like an old revision. Off: they are left alone and the
    /// worker's status says which to remove.
    pub takeover: bool,
    /// Memory limit, e.g. "256MiB"-style byte count.
    pub memory_bytes: i64,
    /// CPU limit in CPUs (0.5 = half a core).
    pub cpus: f64,
    /// Maximum number of processes in a worker container.
    pub pids_limit: i64,
    /// Mount the image's root filesystem read-only.
    pub read_only_rootfs: bool,
    /// Forbid gaining privileges (setuid binaries) inside the container.
    pub no_new_privileges: bool,
    /// Linux capabilities to drop (`ALL`, or names such as `NET_RAW`).
    pub cap_drop: Vec<String>,
    /// Writable tmpfs mounts: under a read-only root, the only places a
    /// worker can write. `/usercode` is where SensorBucket's own image
    /// unpacks the code.
    pub tmpfs: Vec<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReconcileConfig {
    /// Periodic resync, catching anything a notification missed.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// How many container actions run at once.
    pub concurrency: usize,
    /// First delay before restarting a crashed worker; doubles each time.
    #[serde(with = "humantime_serde")]
    pub backoff_initial: Duration,
    /// The longest delay between restarts of a crashing worker.
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// A container that ran this long is considered healthy again.
    #[serde(with = "humantime_serde")]
    pub backoff_reset: Duration,
    /// How long a new revision's container may take to consume its queue
    /// before the rollout is given up and the old revision keeps serving.
    #[serde(with = "humantime_serde")]
    pub ready_timeout: Duration,
    /// An image that can tell nothing of its readiness (no ready report, no
    /// HEALTHCHECK) is taken as ready once its container has run this long.
    #[serde(with = "humantime_serde")]
    pub assume_ready_after: Duration,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CodeServerConfig {
    /// Address the HTTP server binds.
    pub listen: SocketAddr,
    /// Base URL containers use to reach it: CODE_URL is `<public_url>/<id>/source`.
    pub public_url: String,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpConfig {
    /// Broker URL handed to workers (and used by `worker invoke`).
    pub url: Secret,
    /// The pipeline exchange.
    pub exchange: String,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter, e.g. "info" or "workerctl=debug".
    pub filter: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            database_url: Secret::new("postgres://workerctl:workerctl@127.0.0.1:5432/workerctl"),
            instance: DEFAULT_INSTANCE.into(),
            endpoint_devices: "http://core/devices".into(),
            docker: DockerConfig {
                image: "workerctl/dockerworker:latest".into(),
                network: "host".into(),
                stop_timeout: Duration::from_secs(10),
                stop_signal: None,
                takeover: true,
                memory_bytes: 256 * 1024 * 1024,
                cpus: 1.0,
                pids_limit: 128,
                read_only_rootfs: true,
                no_new_privileges: true,
                cap_drop: vec!["ALL".into()],
                tmpfs: vec!["/tmp".into(), "/usercode".into()],
            },
            reconcile: ReconcileConfig {
                interval: Duration::from_secs(10),
                concurrency: 8,
                backoff_initial: Duration::from_secs(1),
                backoff_max: Duration::from_secs(300),
                backoff_reset: Duration::from_secs(60),
                ready_timeout: Duration::from_secs(30),
                assume_ready_after: Duration::from_secs(3),
            },
            code_server: CodeServerConfig {
                listen: SocketAddr::from(([0, 0, 0, 0], 3000)),
                public_url: "http://127.0.0.1:3000".into(),
            },
            amqp: AmqpConfig {
                url: Secret::new("amqp://workerctl:workerctl@127.0.0.1:5672/%2f"),
                exchange: "pipeline.messages".into(),
            },
            log: LogConfig {
                format: LogFormat::Text,
                // lapin logs every channel the broker closes at ERROR, also
                // the expected ones (a passive declare of a worker queue
                // that does not exist yet, while a worker starts); the
                // daemon reports what it cannot do itself, with context.
                filter: "info,lapin::channel=off".into(),
            },
            api: ApiConfig::default(),
            dead_letters: DeadLettersConfig {
                enabled: true,
                queue: "workerctl.errors".into(),
                queue_max_length: 10_000,
                keep: 1_000,
            },
            record: RecordConfig {
                enabled: true,
                keep: 200,
            },
            schedules: SchedulesConfig {
                enabled: true,
                poll: Duration::from_secs(1),
            },
            leader: LeaderConfig {
                heartbeat: Duration::from_secs(1),
                lease: Duration::from_secs(5),
            },
            scale: ScaleConfig {
                management_url: Secret::new("http://127.0.0.1:15672"),
                poll_interval: Duration::from_secs(5),
                cooldown: Duration::from_secs(60),
            },
            runtime: RuntimeConfig {
                backend: Backend::Docker,
            },
            swarm: SwarmConfig {
                update_monitor: Duration::from_secs(10),
                restart_delay: Duration::from_secs(5),
            },
        }
    }
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration")]
    Parse(#[source] Box<figment::Error>),
    #[error("invalid configuration: `{key}` {problem}")]
    Invalid { key: &'static str, problem: String },
}

impl Config {
    /// Loads defaults → `file` (if given) → `WORKERCTL_` environment, then validates.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            figment = figment.merge(Toml::file_exact(path));
        }
        // WORKERCTL_CONFIG names the file itself (see cli.rs); it is not a setting.
        figment = figment.merge(Env::prefixed("WORKERCTL_").ignore(&["config"]).split("__"));
        let config: Config = figment
            .extract()
            .map_err(|e| ConfigError::Parse(Box::new(e)))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, problem: &str| {
            Err(ConfigError::Invalid {
                key,
                problem: problem.into(),
            })
        };
        if self.instance.is_empty()
            || !self
                .instance
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return invalid("instance", "must be non-empty letters, digits, '-' or '_'");
        }
        if self.reconcile.concurrency == 0 {
            return invalid("reconcile.concurrency", "must be at least 1");
        }
        if self.reconcile.interval.is_zero() {
            return invalid("reconcile.interval", "must be longer than 0s");
        }
        if self.reconcile.backoff_initial > self.reconcile.backoff_max {
            return invalid(
                "reconcile.backoff_initial",
                "must not exceed reconcile.backoff_max",
            );
        }
        if self.docker.image.is_empty() {
            return invalid("docker.image", "must name an image");
        }
        if let Some(signal) = &self.docker.stop_signal
            && !is_signal_name(signal)
        {
            return invalid(
                "docker.stop_signal",
                "must be a signal name such as SIGTERM or SIGINT, or left out",
            );
        }
        if self.docker.network.is_empty() {
            return invalid("docker.network", "must name a network, or be 'host'");
        }
        if self.docker.memory_bytes < 6 * 1024 * 1024 {
            return invalid(
                "docker.memory_bytes",
                "must be at least 6 MiB (Docker's minimum)",
            );
        }
        if self.docker.cpus.is_nan() || self.docker.cpus <= 0.0 {
            return invalid("docker.cpus", "must be greater than 0");
        }
        if self.docker.pids_limit < 1 {
            return invalid("docker.pids_limit", "must be at least 1");
        }
        if self
            .api
            .token
            .as_ref()
            .is_some_and(|t| t.expose().trim().len() < 8)
        {
            return invalid("api.token", "must be at least 8 characters (or unset)");
        }
        if self.dead_letters.queue.is_empty() {
            return invalid("dead_letters.queue", "must name a queue");
        }
        if self.dead_letters.queue_max_length < 1 || self.dead_letters.keep < 1 {
            return invalid(
                "dead_letters.keep",
                "and dead_letters.queue_max_length must be at least 1",
            );
        }
        if !(1..=100_000).contains(&self.record.keep) {
            return invalid("record.keep", "must be between 1 and 100000");
        }
        if self.schedules.poll.is_zero() {
            return invalid("schedules.poll", "must be longer than 0s");
        }
        if let Some(bad) = self.docker.tmpfs.iter().find(|p| !p.starts_with('/')) {
            return invalid(
                "docker.tmpfs",
                &format!("must list absolute paths; {bad:?} is not one"),
            );
        }
        if self.reconcile.ready_timeout.is_zero() {
            return invalid("reconcile.ready_timeout", "must be longer than 0s");
        }
        if reqwest::Url::parse(&self.code_server.public_url).is_err() {
            return invalid(
                "code_server.public_url",
                "must be an absolute URL like http://host:3000",
            );
        }
        self.validate_scale_out()
    }

    /// The keys of leader election, autoscaling and Swarm.
    fn validate_scale_out(&self) -> Result<(), ConfigError> {
        let invalid = |key, problem: &str| {
            Err(ConfigError::Invalid {
                key,
                problem: problem.into(),
            })
        };
        if self.leader.heartbeat.is_zero() || self.leader.heartbeat >= self.leader.lease {
            return invalid(
                "leader.heartbeat",
                "must be longer than 0s and shorter than leader.lease",
            );
        }
        if self.leader.lease < Duration::from_millis(100) {
            return invalid("leader.lease", "must be at least 100ms");
        }
        if self.scale.poll_interval.is_zero() {
            return invalid("scale.poll_interval", "must be longer than 0s");
        }
        let url = self.scale.management_url.expose();
        if !url.is_empty() && reqwest::Url::parse(url).is_err() {
            return invalid(
                "scale.management_url",
                "must be empty (no autoscaling) or a URL like http://user:password@host:15672",
            );
        }
        Ok(())
    }

    /// How worker containers are locked down, from the Docker settings.
    pub fn hardening(&self) -> Hardening {
        Hardening {
            read_only_rootfs: self.docker.read_only_rootfs,
            no_new_privileges: self.docker.no_new_privileges,
            cap_drop: self.docker.cap_drop.clone(),
            tmpfs: self.docker.tmpfs.clone(),
        }
    }

    /// How Swarm services roll out: the update monitor, the stop grace
    /// period, and the dockerworker's readiness as the health check that
    /// gates each task.
    pub fn swarm_options(&self) -> crate::runtime::swarm::SwarmOptions {
        crate::runtime::swarm::SwarmOptions {
            update_monitor: self.swarm.update_monitor,
            restart_delay: self.swarm.restart_delay,
            stop_timeout: self.docker.stop_timeout,
            readiness: Some(crate::runtime::swarm::Probe::dockerworker_ready()),
        }
    }

    /// How the leader lock is kept.
    pub(crate) fn leader_timing(&self) -> crate::leader::LeaderTiming {
        crate::leader::LeaderTiming {
            heartbeat: self.leader.heartbeat,
            lease: self.leader.lease,
        }
    }

    /// The container limits derived from the Docker settings.
    pub fn limits(&self) -> Limits {
        Limits {
            memory_bytes: self.docker.memory_bytes,
            nano_cpus: (self.docker.cpus * 1e9) as i64,
            pids: self.docker.pids_limit,
        }
    }
}

/// `SIGTERM`, `SIGINT`, `SIGRTMIN+3`…: what Docker accepts as a stop signal
/// by name (a number would be taken too, but says less in a config file).
fn is_signal_name(signal: &str) -> bool {
    signal.len() > 3
        && signal.starts_with("SIG")
        && signal[3..]
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '+')
}

#[cfg(test)]
// figment's Jail closures return its (large) error type; not ours to shrink.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().expect("defaults validate");
    }

    #[test]
    fn example_config_in_the_repo_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("workerctl.example.toml");
        Jail::expect_with(|_| {
            let config = Config::load(Some(&path)).expect("example config loads");
            assert_eq!(config.amqp.exchange, "pipeline.messages");
            assert_eq!(config.dead_letters.queue, "workerctl.errors");
            assert!(
                config.api.token.is_none(),
                "the example turns no write API on"
            );
            Ok(())
        });
    }

    #[test]
    fn environment_overrides_file_with_double_underscore_nesting() {
        Jail::expect_with(|jail| {
            jail.create_file("c.toml", "[docker]\nimage = \"from-file\"\n")?;
            jail.set_env("WORKERCTL_DOCKER__IMAGE", "from-env");
            jail.set_env("WORKERCTL_RECONCILE__INTERVAL", "250ms");
            let config = Config::load(Some(Path::new("c.toml"))).expect("loads");
            assert_eq!(config.docker.image, "from-env");
            assert_eq!(config.reconcile.interval, Duration::from_millis(250));
            Ok(())
        });
    }

    #[test]
    fn a_bad_duration_names_its_key() {
        Jail::expect_with(|jail| {
            jail.set_env("WORKERCTL_DOCKER__STOP_TIMEOUT", "soon");
            let err = Config::load(None).expect_err("must fail");
            let text = format!("{:#}", anyhow::Error::from(err));
            assert!(
                text.to_lowercase().contains("docker.stop_timeout"),
                "{text}"
            );
            Ok(())
        });
    }

    #[test]
    fn an_unknown_key_is_rejected() {
        Jail::expect_with(|jail| {
            jail.create_file("c.toml", "[docker]\nimgae = \"typo\"\n")?;
            let err = Config::load(Some(Path::new("c.toml"))).expect_err("must fail");
            let text = format!("{:#}", anyhow::Error::from(err));
            assert!(text.contains("imgae"), "{text}");
            Ok(())
        });
    }

    #[test]
    fn zero_concurrency_is_rejected_by_name() {
        Jail::expect_with(|jail| {
            jail.set_env("WORKERCTL_RECONCILE__CONCURRENCY", "0");
            let err = Config::load(None).expect_err("must fail");
            assert!(err.to_string().contains("reconcile.concurrency"));
            Ok(())
        });
    }

    #[test]
    fn a_relative_tmpfs_path_is_rejected_by_name() {
        Jail::expect_with(|jail| {
            jail.create_file("c.toml", "[docker]\ntmpfs = [\"/tmp\", \"usercode\"]\n")?;
            let err = Config::load(Some(Path::new("c.toml"))).expect_err("must fail");
            assert!(err.to_string().contains("docker.tmpfs"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn scale_out_keys_have_defaults_that_change_nothing() {
        let config = Config::default();
        assert_eq!(config.runtime.backend, Backend::Docker);
        assert_eq!(config.scale.cooldown, Duration::from_secs(60));
        assert_eq!(config.scale.poll_interval, Duration::from_secs(5));
    }

    #[test]
    fn the_swarm_backend_is_chosen_by_name() {
        Jail::expect_with(|jail| {
            jail.set_env("WORKERCTL_RUNTIME__BACKEND", "swarm");
            let config = Config::load(None).expect("loads");
            assert_eq!(config.runtime.backend, Backend::Swarm);
            Ok(())
        });
    }

    #[test]
    fn a_heartbeat_not_shorter_than_the_lease_is_rejected_by_name() {
        Jail::expect_with(|jail| {
            jail.set_env("WORKERCTL_LEADER__HEARTBEAT", "5s");
            let err = Config::load(None).expect_err("must fail");
            assert!(err.to_string().contains("leader.heartbeat"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn a_short_api_token_is_rejected_by_name() {
        Jail::expect_with(|jail| {
            jail.set_env("WORKERCTL_API__TOKEN", "short");
            let err = Config::load(None).expect_err("must fail");
            assert!(err.to_string().contains("api.token"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn secrets_do_not_print() {
        let config = Config::default();
        assert!(!format!("{config:?}").contains("workerctl:workerctl@"));
    }
}
