//! Where scripts/swarm-nodes puts the three-node swarm (its default
//! SWARM_NODES_SUBNET), for tests/multinode.rs and benches/nodes.rs.

// Each includer uses its own part of it.
#![allow(dead_code)]

/// The host, as the nodes reach it: the gateway of the nodes' bridge.
pub(crate) const GATEWAY: [u8; 4] = [172, 30, 213, 1];
/// The registry the nodes trust (plain HTTP), at .10.
pub(crate) const REGISTRY: &str = "172.30.213.10:5000";
/// Held while a process uses the nodes (their names and subnet are fixed).
pub(crate) const LOCK_FILE: &str = "/tmp/workerctl-swarm-nodes.lock";

/// Node `n`'s engine (node 1 is the manager).
pub(crate) fn node_engine(n: u32) -> String {
    format!("tcp://172.30.213.{}:2375", 10 + n)
}
