//! Hand-built inputs shared by the planners' tests: a template, a policy,
//! rows, and the time they are decided at.

use std::time::Duration;

use uuid::Uuid;

use super::{Policy, SpecTemplate};
use crate::model::{Hardening, Limits, Revision, WorkerId, WorkerRow};

pub(crate) const NOW: i64 = 1_000_000;
pub(crate) const IMAGE_ID: &str = "sha256:image";

pub(crate) fn id(n: u128) -> WorkerId {
    WorkerId(Uuid::from_u128(n))
}

pub(crate) fn template() -> SpecTemplate {
    SpecTemplate {
        instance: "default".into(),
        image: "workerctl/dockerworker:latest".into(),
        network: "host".into(),
        amqp_url: "amqp://mq".into(),
        amqp_exchange: "pipeline.messages".into(),
        code_base_url: "http://ctl:3000/".into(),
        endpoint_devices: "http://core/devices".into(),
        limits: Limits {
            memory_bytes: 1 << 28,
            nano_cpus: 1_000_000_000,
            pids: 128,
        },
        hardening: Hardening {
            read_only_rootfs: true,
            no_new_privileges: true,
            cap_drop: vec!["ALL".into()],
            tmpfs: vec!["/tmp".into(), "/usercode".into()],
        },
        stop_signal: None,
        record_keep: None,
    }
}

pub(crate) const READY_TIMEOUT_MS: i64 = 30_000;
pub(crate) const ASSUME_READY_MS: i64 = 3_000;
pub(crate) const COOLDOWN_MS: i64 = 60_000;

pub(crate) fn policy() -> Policy {
    Policy {
        backoff_initial: Duration::from_secs(1),
        backoff_max: Duration::from_secs(60),
        backoff_reset: Duration::from_secs(30),
        ready_timeout: Duration::from_millis(READY_TIMEOUT_MS as u64),
        assume_ready_after: Duration::from_millis(ASSUME_READY_MS as u64),
        scale_cooldown: Duration::from_millis(COOLDOWN_MS as u64),
        depth_poll: Duration::from_secs(5),
        takeover: true,
    }
}

pub(crate) fn row(n: u128, revision: i32) -> WorkerRow {
    WorkerRow {
        id: id(n),
        name: format!("w{n}"),
        state: "enabled".into(),
        language: "python".into(),
        revision: Revision(revision),
        entrypoint: "main.main".into(),
        status: "unknown".into(),
        status_info: String::new(),
        source_len: Some(100),
        source_is_zip: true,
        source_sha256: Some("abc".into()),
        code_token: format!("token{n}"),
        scale: Default::default(),
        debug: false,
    }
}

pub(crate) fn disabled(n: u128) -> WorkerRow {
    WorkerRow {
        state: "disabled".into(),
        ..row(n, 1)
    }
}
