//! What the swarm's nodes mean for one worker's service: PURE. Two
//! findings, both read from the manager's task list, since the daemon sees
//! only the manager's engine and a node's images are not in the Swarm API:
//!
//! - **Tasks on a node that is not ready.** A node that went down keeps its
//!   tasks in Swarm's books as `running` (the manager cannot hear them
//!   stop), and the service's running count includes them until the node
//!   comes back. Those tasks do not serve: they are subtracted, and Swarm
//!   starts their replacements on the remaining nodes.
//! - **An image a node does not have.** A task of an image the node lacks
//!   is rejected there ("No such image") and placed again, on another node.
//!   The service may still reach its replica count on the nodes that have
//!   it, but every restart and rollout goes through the rejections again,
//!   and losing those nodes leaves nowhere to run. A node lacks the image
//!   if the newest task the service placed there with that image was
//!   rejected for it.

use std::collections::{BTreeMap, BTreeSet};

use crate::model::{ManagedService, SwarmNode, SwarmTask};

/// What Swarm says when a node does not have a task's image.
const NO_SUCH_IMAGE: &str = "No such image";

/// How `service` stands on the swarm's nodes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct OnNodes {
    /// Its tasks Swarm counts as running on nodes that are not ready, by
    /// node name.
    pub(crate) lost: BTreeMap<String, u64>,
    /// The nodes that lack the image it runs, by name.
    pub(crate) without_image: BTreeSet<String>,
}

impl OnNodes {
    /// The tasks counted as running that are on nodes that are not ready.
    pub(crate) fn lost_tasks(&self) -> u64 {
        self.lost.values().sum()
    }
}

/// Reads `tasks` (of any services; those of `service` count) for where
/// `service`, running `image`, stands on `nodes`.
pub(crate) fn on_nodes(
    service: &ManagedService,
    image: &str,
    tasks: &[SwarmTask],
    nodes: &[SwarmNode],
) -> OnNodes {
    let name = |id: &str| {
        nodes
            .iter()
            .find(|n| n.id == id)
            .map_or_else(|| id.to_string(), |n| n.hostname.clone())
    };
    let not_ready: BTreeSet<&str> = nodes
        .iter()
        .filter(|n| !n.is_ready())
        .map(|n| n.id.as_str())
        .collect();
    let mut found = OnNodes::default();
    // The newest task of the service's image on each node.
    let mut newest: BTreeMap<&str, &SwarmTask> = BTreeMap::new();
    for task in tasks.iter().filter(|t| t.service_id == service.id) {
        let Some(node) = task.node_id.as_deref() else {
            continue;
        };
        if task.state == "running" && not_ready.contains(node) {
            *found.lost.entry(name(node)).or_default() += 1;
        }
        if task.image == image && newest.get(node).is_none_or(|t| t.version < task.version) {
            newest.insert(node, task);
        }
    }
    found.without_image = newest
        .into_iter()
        .filter(|(_, t)| {
            t.state == "rejected"
                && t.error
                    .as_deref()
                    .is_some_and(|e| e.contains(NO_SUCH_IMAGE))
        })
        .map(|(node, _)| name(node))
        .collect();
    found
}

/// The status text for an image that `nodes` lack: which image, which
/// nodes, and what to do.
pub(crate) fn image_not_on_nodes(image: &str, image_id: &str, nodes: &BTreeSet<String>) -> String {
    let names = nodes.iter().cloned().collect::<Vec<_>>().join(", ");
    let short = image_id.get(..19).unwrap_or(image_id);
    let name = image.rsplit('/').next().unwrap_or(image);
    format!(
        "the image {image} ({short}) is not on node(s) {names}: Swarm rejects the tasks it \
         places there (\"No such image\") and runs them on the other nodes only. Push the \
         image to a registry every node reaches (docker tag {image} REGISTRY/{name} && \
         docker push REGISTRY/{name}) and set docker.image = \"REGISTRY/{name}\": workerctl \
         pins the digest the registry serves, which every node pulls; or load it into those \
         nodes (docker save {image} | docker -H NODE load)"
    )
}

/// The status text for tasks lost with nodes that are not ready.
pub(crate) fn nodes_lost(lost: &BTreeMap<String, u64>) -> String {
    let names = lost.keys().cloned().collect::<Vec<_>>().join(", ");
    let count: u64 = lost.values().sum();
    format!("node(s) {names} not ready, with {count} of its task(s)")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Rollout;

    const IMAGE: &str = "sha256:1111";

    fn service() -> ManagedService {
        ManagedService {
            id: "svc".into(),
            name: "worker-x".into(),
            version: 1,
            worker_id: None,
            revision: None,
            spec_hash: None,
            replicas: 3,
            running: 3,
            desired_tasks: 3,
            rollout: Rollout::Settled,
        }
    }

    fn node(n: u32, state: &str) -> SwarmNode {
        SwarmNode {
            id: format!("id{n}"),
            hostname: format!("node-{n}"),
            state: state.into(),
        }
    }

    /// A task of `service` (or another) on node `n`: (state, error), at
    /// `version`, of `image`.
    fn task(
        service: &str,
        n: u32,
        state: &str,
        error: &str,
        version: u64,
        image: &str,
    ) -> SwarmTask {
        SwarmTask {
            service_id: service.into(),
            node_id: Some(format!("id{n}")),
            image: image.into(),
            state: state.into(),
            error: (!error.is_empty()).then(|| error.to_string()),
            version,
        }
    }

    const REJECTED: &str = "No such image: sha256:1111";

    #[test]
    fn lost_tasks_and_missing_images_are_read_from_the_tasks_as_the_table_says() {
        let ready = vec![node(1, "ready"), node(2, "ready"), node(3, "ready")];
        let three_down = vec![node(1, "ready"), node(2, "ready"), node(3, "down")];
        let lost = |pairs: &[(&str, u64)]| -> BTreeMap<String, u64> {
            pairs.iter().map(|(n, c)| (n.to_string(), *c)).collect()
        };
        let names =
            |ns: &[&str]| -> BTreeSet<String> { ns.iter().map(|n| n.to_string()).collect() };
        #[allow(clippy::type_complexity)]
        let cases: Vec<(
            &str,
            Vec<SwarmTask>,
            &Vec<SwarmNode>,
            BTreeMap<String, u64>,
            BTreeSet<String>,
        )> = vec![
            (
                "all nodes ready, every task running: nothing",
                vec![
                    task("svc", 1, "running", "", 5, IMAGE),
                    task("svc", 2, "running", "", 6, IMAGE),
                ],
                &ready,
                lost(&[]),
                names(&[]),
            ),
            (
                "a running task on a node that is down is lost",
                vec![
                    task("svc", 1, "running", "", 5, IMAGE),
                    task("svc", 3, "running", "", 6, IMAGE),
                ],
                &three_down,
                lost(&[("node-3", 1)]),
                names(&[]),
            ),
            (
                "a task on a down node that had stopped is not",
                vec![
                    task("svc", 3, "shutdown", "", 6, IMAGE),
                    task("svc", 3, "running", "", 7, IMAGE),
                ],
                &three_down,
                lost(&[("node-3", 1)]),
                names(&[]),
            ),
            (
                "another service's task on a down node is not this one's",
                vec![task("other", 3, "running", "", 6, IMAGE)],
                &three_down,
                lost(&[]),
                names(&[]),
            ),
            (
                "rejected for its image on two nodes: those lack it",
                vec![
                    task("svc", 1, "running", "", 9, IMAGE),
                    task("svc", 2, "rejected", REJECTED, 5, IMAGE),
                    task("svc", 3, "rejected", REJECTED, 6, IMAGE),
                ],
                &ready,
                lost(&[]),
                names(&["node-2", "node-3"]),
            ),
            (
                "a later task of the image ran there: it has it now",
                vec![
                    task("svc", 2, "rejected", REJECTED, 5, IMAGE),
                    task("svc", 2, "running", "", 8, IMAGE),
                ],
                &ready,
                lost(&[]),
                names(&[]),
            ),
            (
                "a rejection of an earlier image does not count",
                vec![task(
                    "svc",
                    2,
                    "rejected",
                    "No such image: sha256:0000",
                    5,
                    "sha256:0000",
                )],
                &ready,
                lost(&[]),
                names(&[]),
            ),
            (
                "a rejection for another reason is not a missing image",
                vec![task("svc", 2, "rejected", "no suitable node", 5, IMAGE)],
                &ready,
                lost(&[]),
                names(&[]),
            ),
            (
                "a node the manager no longer lists is named by its id",
                vec![task("svc", 4, "rejected", REJECTED, 5, IMAGE)],
                &ready,
                lost(&[]),
                names(&["id4"]),
            ),
        ];
        for (name, tasks, nodes, want_lost, want_missing) in cases {
            let found = on_nodes(&service(), IMAGE, &tasks, nodes);
            assert_eq!(found.lost, want_lost, "{name}");
            assert_eq!(found.without_image, want_missing, "{name}");
        }
    }

    #[test]
    fn the_missing_image_text_says_which_image_which_nodes_and_what_to_do() {
        let text = image_not_on_nodes(
            "workerctl/dockerworker:latest",
            "sha256:41db7ba8095d67162b42",
            &BTreeSet::from(["node-2".to_string(), "node-3".to_string()]),
        );
        for part in [
            "workerctl/dockerworker:latest (sha256:41db7ba8095d)",
            "node(s) node-2, node-3",
            "docker push REGISTRY/dockerworker:latest",
            "docker.image = \"REGISTRY/dockerworker:latest\": workerctl pins the digest",
            "docker save workerctl/dockerworker:latest | docker -H NODE load",
        ] {
            assert!(text.contains(part), "{part:?} not in {text}");
        }
    }
}
