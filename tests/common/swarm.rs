//! A single-node swarm that a test makes on the machine's engine and
//! leaves again, and the turns swarm tests take (a lock file), for the test
//! crates and the Swarm benchmark.
//!
//! It never touches a swarm it did not make: the node it makes carries the
//! label `workerctl.test-swarm`, and if the engine is already in a swarm
//! without that label, [`TestSwarm::take_turn`] fails and says so.
#![allow(dead_code)]

use std::fs::File;
use std::process::Command;

/// The label of a node this test made a swarm on.
pub const MARKER: &str = "workerctl.test-swarm";
/// Held while a process runs swarm tests on this machine.
pub const LOCK_FILE: &str = "/tmp/workerctl-swarm-tests.lock";
/// Runs the docker CLI: whether it succeeded, and its stdout (or stderr).
pub fn docker_cli(args: &[&str]) -> (bool, String) {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("the docker CLI must be installed");
    let text = if out.status.success() {
        String::from_utf8_lossy(&out.stdout)
    } else {
        String::from_utf8_lossy(&out.stderr)
    };
    (out.status.success(), text.trim().to_string())
}

/// This test's turn on the engine, and the swarm it makes; leaves the
/// swarm when dropped (also on panic).
pub struct TestSwarm {
    _turn: File,
    made: bool,
}

impl TestSwarm {
    /// Takes this machine's turn and makes sure the engine is in no swarm —
    /// unless it is in one this test did not make, which it refuses.
    pub fn take_turn() -> TestSwarm {
        let turn = File::create(LOCK_FILE).expect("the lock file opens");
        turn.lock().expect("waits for the other swarm tests");
        let (_, state) = docker_cli(&["info", "--format", "{{.Swarm.LocalNodeState}}"]);
        if state != "inactive" {
            let format = format!("{{{{index .Spec.Labels \"{MARKER}\"}}}}");
            let (_, marker) = docker_cli(&["node", "inspect", "self", "--format", &format]);
            assert!(
                marker == "yes",
                "this Docker engine is in a swarm (state {state:?}) that the swarm tests did not make; \
                 they refuse to touch it. Run them on an engine outside any swarm."
            );
            // A swarm an interrupted earlier run left behind.
            leave();
        }
        TestSwarm {
            _turn: turn,
            made: false,
        }
    }

    /// A single-node swarm, its node labelled as made here.
    pub fn init(&mut self) {
        let (made, text) = docker_cli(&["swarm", "init", "--advertise-addr", "127.0.0.1"]);
        assert!(made, "docker swarm init failed: {text}");
        self.made = true;
        let label = format!("{MARKER}=yes");
        let (_, node) = docker_cli(&["info", "--format", "{{.Swarm.NodeID}}"]);
        let (labelled, text) = docker_cli(&["node", "update", "--label-add", &label, &node]);
        assert!(labelled, "cannot label the test swarm's node: {text}");
    }
}

impl Drop for TestSwarm {
    fn drop(&mut self) {
        if self.made {
            leave();
        }
    }
}

pub fn leave() {
    let (left, text) = docker_cli(&["swarm", "leave", "--force"]);
    if !left {
        eprintln!("docker swarm leave --force failed: {text}");
    }
}
