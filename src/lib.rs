//! workerctl keeps one Docker container per enabled user worker, at the
//! worker's current revision, in line with the `user_workers` table.
//! See ARCHITECTURE.md for the map of this crate.
//!
//! Only what the binary, the integration tests and the benchmarks use is
//! public; the rest is `pub(crate)`, and the lint below keeps it so.

#![warn(unreachable_pub)]

pub mod archive;
pub mod backoff;
pub mod cli;
pub mod config;
pub(crate) mod consumers;
pub(crate) mod controller;
pub mod daemon;
pub(crate) mod exit;
#[cfg(test)]
pub(crate) mod fakes;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod model;
pub(crate) mod plan;
pub mod readiness;
pub mod reconcile;
pub(crate) mod recorder;
pub mod runtime;
pub mod scale;
pub mod status_page;
pub mod store;
pub(crate) mod trial;
pub mod triggers;
