//! workerctl keeps one Docker container per enabled user worker, at the
//! worker's current revision, in line with the `user_workers` table.
//! See ARCHITECTURE.md for the map of this crate.

pub mod config;
pub mod model;
pub mod plan;
pub mod runtime;
pub mod store;
