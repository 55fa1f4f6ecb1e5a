//! The Compose snippet of docs/sensorbucket.md is valid Compose, checked by
//! the real compose command (`docker-compose config`, or `docker compose
//! config`: no image is pulled, nothing starts) against a stack of the shape
//! of SensorBucket's own: Postgres with the `userworkers` database, RabbitMQ
//! 3.8 with its management plugin, the `userworkers` service with its Docker
//! controller on, all on the network `sensorbucket_network`.

use std::path::Path;
use std::process::Command;

/// SensorBucket's stack, reduced to what the snippet refers to.
const SENSORBUCKET_STACK: &str = r#"
services:
  db:
    image: postgres:15
    environment:
      POSTGRES_PASSWORD: postgres
      POSTGRES_DB: userworkers
    networks: [sensorbucket_network]
  mq:
    image: rabbitmq:3.8-management
    networks: [sensorbucket_network]
  userworkers:
    image: sensorbucket/userworkers:latest
    environment:
      CTRL_TYPE: docker
      DB_DSN: postgres://postgres:postgres@db:5432/userworkers
      AMQP_HOST: amqp://guest:guest@mq:5672
    depends_on: [db, mq]
    networks: [sensorbucket_network]
networks:
  sensorbucket_network: {}
"#;

const MARKER: &str = "<!-- sensorbucket-override";

/// The first ```yaml block after the marker in docs/sensorbucket.md.
fn documented_override() -> String {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/sensorbucket.md"))
            .expect("docs/sensorbucket.md");
    let after = doc
        .split_once(MARKER)
        .expect("the marker in docs/sensorbucket.md")
        .1;
    let block = after
        .split_once("```yaml\n")
        .expect("a yaml block after the marker")
        .1;
    block
        .split_once("```")
        .expect("the block ends")
        .0
        .to_string()
}

/// The compose command, as scripts/compose-check picks it.
fn compose() -> Vec<String> {
    if let Ok(command) = std::env::var("DOCKER_COMPOSE") {
        return command.split_whitespace().map(str::to_string).collect();
    }
    let v2 = Command::new("docker")
        .args(["compose", "version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if v2 {
        vec!["docker".into(), "compose".into()]
    } else {
        vec!["docker-compose".into()]
    }
}

/// The lines of service `name` in `config`'s normalised output, indented
/// under it.
fn service_block<'a>(config: &'a str, name: &str) -> Vec<&'a str> {
    let header = format!("  {name}:");
    config
        .lines()
        .skip_while(|line| *line != header)
        .skip(1)
        .take_while(|line| line.starts_with("    ") || line.is_empty())
        .collect()
}

fn has_line(block: &[&str], want: &str) -> bool {
    block.iter().any(|line| line.trim() == want)
}

#[test]
fn the_documented_override_is_valid_compose_on_a_stack_of_sensorbuckets_shape() {
    let dir = tempfile::tempdir().expect("temp dir");
    let stack = dir.path().join("docker-compose.yaml");
    let overlay = dir.path().join("docker-compose.workerctl.yaml");
    std::fs::write(&stack, SENSORBUCKET_STACK).expect("write the stack");
    std::fs::write(&overlay, documented_override()).expect("write the override");

    let command = compose();
    let out = Command::new(&command[0])
        .args(&command[1..])
        .args(["--project-name", "sensorbucket", "--project-directory"])
        .arg(dir.path())
        .arg("-f")
        .arg(&stack)
        .arg("-f")
        .arg(&overlay)
        .arg("config")
        .env_remove("WORKERCTL_DATABASE_URL")
        .env_remove("WORKERCTL_AMQP__URL")
        .env_remove("SENSORBUCKET_NETWORK")
        .output()
        .unwrap_or_else(|e| panic!("{command:?} runs (Compose v1 or v2 must be installed): {e}"));
    let config = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{command:?} config refused the override: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The controller is off, and the rest of its service untouched.
    let userworkers = service_block(&config, "userworkers");
    assert!(has_line(&userworkers, "CTRL_TYPE: none"), "{config}");
    assert!(
        userworkers.iter().any(|l| l.contains("DB_DSN:")),
        "{config}"
    );

    // workerctl on the stack's network (by its key, and by the name Compose
    // gives it in project `sensorbucket`, which workerctl is told), its
    // database, broker and management API, with the Docker socket.
    let workerctl = service_block(&config, "workerctl");
    assert!(!workerctl.is_empty(), "no workerctl service: {config}");
    for want in [
        "WORKERCTL_DATABASE_URL: postgres://postgres:postgres@db:5432/userworkers",
        "WORKERCTL_AMQP__URL: amqp://guest:guest@mq:5672/%2f",
        "WORKERCTL_SCALE__MANAGEMENT_URL: http://mq:15672",
        "WORKERCTL_DOCKER__NETWORK: sensorbucket_sensorbucket_network",
    ] {
        assert!(
            has_line(&workerctl, want),
            "{want:?} missing from workerctl: {config}"
        );
    }
    assert!(
        has_line(&workerctl, "sensorbucket_network: {}")
            || has_line(&workerctl, "sensorbucket_network: null"),
        "workerctl is not on sensorbucket_network: {config}"
    );
    assert!(
        workerctl
            .iter()
            .any(|l| l.contains("/var/run/docker.sock:/var/run/docker.sock")),
        "{config}"
    );
}
