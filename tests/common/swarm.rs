//! A single-node swarm that a test makes on the machine's engine and
//! leaves again, and the turns swarm tests take (a lock file), for the test
//! crates and the Swarm benchmark (`benches/swarm.rs` includes this file).
//!
//! It never touches a swarm it did not make: the node it makes carries the
//! label `workerctl.test-swarm`, and if the engine is already in a swarm
//! without that label, [`TestSwarm::take_turn`] fails and says so.
//!
//! Tests call the panicking forms (`take_turn`, `init`, `docker_cli`); the
//! benchmark, which reports a failure instead of panicking, the `try_` forms
//! they are built on.
#![allow(dead_code)]

use std::fs::File;
use std::process::Command;

/// The label of a node this test made a swarm on.
pub(crate) const MARKER: &str = "workerctl.test-swarm";
/// Held while a process runs swarm tests on this machine.
pub(crate) const LOCK_FILE: &str = "/tmp/workerctl-swarm-tests.lock";

/// Runs the docker CLI: whether it succeeded, and its stdout (or stderr).
pub(crate) fn docker_cli(args: &[&str]) -> (bool, String) {
    run_cli(args).expect("the docker CLI must be installed")
}

/// Runs the docker CLI: its stdout, or why it failed (its stderr).
pub(crate) fn try_docker_cli(args: &[&str]) -> Result<String, String> {
    match run_cli(args) {
        Ok((true, out)) => Ok(out),
        Ok((false, err)) => Err(format!("docker {}: {err}", args.join(" "))),
        Err(e) => Err(format!("the docker CLI does not run: {e}")),
    }
}

fn run_cli(args: &[&str]) -> std::io::Result<(bool, String)> {
    let out = Command::new("docker").args(args).output()?;
    let text = if out.status.success() {
        String::from_utf8_lossy(&out.stdout)
    } else {
        String::from_utf8_lossy(&out.stderr)
    };
    Ok((out.status.success(), text.trim().to_string()))
}

/// This test's turn on the engine, and the swarm it makes; leaves the
/// swarm when dropped (also on panic).
pub(crate) struct TestSwarm {
    _turn: File,
    made: bool,
}

impl TestSwarm {
    /// Takes this machine's turn and makes sure the engine is in no swarm —
    /// unless it is in one this test did not make, which it refuses.
    pub(crate) fn take_turn() -> TestSwarm {
        Self::try_take_turn().unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`take_turn`](Self::take_turn), failing with a message instead.
    /// Waits as long as another process holds the turn.
    pub(crate) fn try_take_turn() -> Result<TestSwarm, String> {
        let turn = File::create(LOCK_FILE).map_err(|e| format!("{LOCK_FILE}: {e}"))?;
        turn.lock()
            .map_err(|e| format!("waiting for the other swarm tests ({LOCK_FILE}): {e}"))?;
        let state = try_docker_cli(&["info", "--format", "{{.Swarm.LocalNodeState}}"])?;
        if state != "inactive" {
            let format = format!("{{{{index .Spec.Labels \"{MARKER}\"}}}}");
            let marker = try_docker_cli(&["node", "inspect", "self", "--format", &format]);
            if marker.as_deref() != Ok("yes") {
                return Err(format!(
                    "this Docker engine is in a swarm (state {state:?}) that the swarm tests did not make; \
                     they refuse to touch it. Run them on an engine outside any swarm."
                ));
            }
            // A swarm an interrupted earlier run left behind.
            leave();
        }
        Ok(TestSwarm {
            _turn: turn,
            made: false,
        })
    }

    /// A single-node swarm, its node labelled as made here.
    pub(crate) fn init(&mut self) {
        self.try_init().unwrap_or_else(|e| panic!("{e}"));
    }

    /// [`init`](Self::init), failing with a message instead. Once the swarm
    /// is made it is left on drop, even if labelling its node failed.
    pub(crate) fn try_init(&mut self) -> Result<(), String> {
        try_docker_cli(&["swarm", "init", "--advertise-addr", "127.0.0.1"])
            .map_err(|e| format!("docker swarm init failed: {e}"))?;
        self.made = true;
        let label = format!("{MARKER}=yes");
        let node = try_docker_cli(&["info", "--format", "{{.Swarm.NodeID}}"])?;
        try_docker_cli(&["node", "update", "--label-add", &label, &node])
            .map_err(|e| format!("cannot label the test swarm's node: {e}"))?;
        Ok(())
    }
}

impl Drop for TestSwarm {
    fn drop(&mut self) {
        if self.made {
            leave();
        }
    }
}

pub(crate) fn leave() {
    if let Err(e) = try_docker_cli(&["swarm", "leave", "--force"]) {
        eprintln!("docker swarm leave --force failed: {e}");
    }
}
