//! workerctl keeps one Docker container per enabled user worker, at the
//! worker's current revision, in line with the `user_workers` table.
//! See ARCHITECTURE.md for the map of this crate.

pub mod archive;
pub mod backoff;
pub mod cli;
pub mod config;
pub mod controller;
pub mod dead_letters;
pub mod execute;
pub mod exit;
pub mod http;
pub mod invoke;
pub mod metrics;
pub mod model;
pub mod plan;
pub mod reconciler;
pub mod runtime;
pub mod schedule;
pub mod scheduler;
pub mod status_page;
pub mod store;
pub mod trigger_cli;
pub mod worker_cli;
