//! workerctl keeps one Docker container per enabled user worker, at the
//! worker's current revision, in line with the `user_workers` table.
//! See ARCHITECTURE.md for the map of this crate.

pub mod archive;
pub mod backoff;
pub mod broker;
pub mod cli;
pub mod config;
pub(crate) mod consumers;
pub mod controller;
pub mod daemon;
pub mod dead_letters;
pub mod execute;
pub mod exit;
#[cfg(test)]
pub(crate) mod fakes;
pub mod http;
pub mod invoke;
pub mod leader;
pub mod metrics;
pub mod model;
pub mod plan;
pub mod readiness;
pub mod reconciler;
pub mod recorder;
pub mod runtime;
pub mod scale;
pub mod scale_metrics;
pub mod schedule;
pub mod scheduler;
pub mod status_page;
pub mod store;
/// The Swarm runtime lives beside `runtime/docker.rs`; it joins the
/// `runtime` module when the runtime trait grows a second implementation.
#[path = "runtime/swarm.rs"]
pub mod swarm;
pub mod trial;
pub mod trigger_cli;
pub mod worker_cli;
