//! Scale-out's I/O: the queue depths read from RabbitMQ's management API
//! ([`depths`]), and the replica and depth figures on `/metrics`
//! ([`metrics`]). The rule that turns a depth into a replica count is pure
//! and lives with the planner (`plan/replicas.rs`); a worker's bounds are
//! part of its row (`model::ScaleBounds`, kept by `store/scale.rs`).

pub mod depths;
pub mod metrics;
