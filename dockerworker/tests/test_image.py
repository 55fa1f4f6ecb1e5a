"""The worker image (DOCKERWORKER_IMAGE, default workerctl/dockerworker:latest, built by scripts/build-images).

Needs the Docker engine; fails, never skips, without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid

from dockerworker.tools.startbench import bytecode_check

IMAGE = os.environ.get("DOCKERWORKER_IMAGE", "workerctl/dockerworker:latest")


def test_the_start_path_compiles_nothing_in_a_read_only_container() -> None:
    from_bytecode, from_source = bytecode_check(IMAGE)

    assert from_source == 0, f"{IMAGE} compiles {from_source} modules at every start: its .pyc are missing or stale"
    # The runtime's modules, pamqp's and the standard library's they import
    # (98 when this was written): enough to show the check saw the start path.
    assert from_bytecode > 50


def test_the_image_ships_the_runtime_without_its_benchmarks_or_tests() -> None:
    listing = subprocess.run(
        ["docker", "run", "--rm", "--entrypoint", "ls", IMAGE, "/opt/dockerworker/dockerworker"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip

    assert "app.py" in listing and "__main__.py" in listing
    for left_out in ("tools", "tests", "bench.py", "startbench.py", "limitclient.py", "idlebench.py", "restbench.py"):
        assert left_out not in listing, f"{IMAGE} ships {left_out}"


def _healthcheck() -> list[str]:
    inspected = subprocess.run(
        ["docker", "image", "inspect", "--format", "{{json .Config.Healthcheck}}", IMAGE],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    test: list[str] = json.loads(inspected)["Test"]
    assert test[0] == "CMD", f"an exec form, no shell: {test}"
    return test[1:]


def test_the_image_health_check_starts_no_python_and_makes_no_request() -> None:
    command = _healthcheck()

    assert not any("python" in part for part in command), command
    assert "/tmp/dockerworker.ready" in command


def test_the_image_health_check_passes_only_while_the_ready_file_is_fresh() -> None:
    command = _healthcheck()
    name = f"test-image-{uuid.uuid4().hex[:12]}"
    run = ["docker", "run", "-d", "--rm", "--name", name, "--read-only", "--tmpfs", "/tmp", "--user", "10001:10001"]
    subprocess.run([*run, "--entrypoint", "sleep", IMAGE, "120"], capture_output=True, check=True)
    try:

        def check(*prepare: str) -> int:
            if prepare:
                subprocess.run(["docker", "exec", name, *prepare], capture_output=True, check=True)
            return subprocess.run(["docker", "exec", name, *command], capture_output=True, check=False).returncode

        assert check() != 0, "no ready file: not ready"
        assert check("touch", "/tmp/dockerworker.ready") == 0, "a fresh ready file: healthy"
        assert check("touch", "-d", "5 minutes ago", "/tmp/dockerworker.ready") != 0, "a stale one: the loop stopped"
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)


def test_a_worker_container_passes_its_health_check_once_it_consumes() -> None:
    from dockerworker.tools.startbench import (
        DEFAULT_API,
        TRIVIAL_CODE,
        StartBench,
        _code_answer,
        _docker_run,
        _free_port,
        _HttpServer,
        _sensorbucket_zip,
    )

    from .support import AMQP_URL

    bench = StartBench(AMQP_URL, DEFAULT_API, "report")
    code = _HttpServer(_code_answer(_sensorbucket_zip(TRIVIAL_CODE)))
    worker_id, token = str(uuid.uuid4()), uuid.uuid4().hex
    env = {
        "WORKER_ID": worker_id,
        "AMQP_HOST": AMQP_URL,
        "AMQP_XCHG": bench.exchange,
        "CODE_URL": f"{code.url}/{worker_id}/source",
        "WORKER_HEALTH_PORT": str(_free_port()),
        "WORKER_READY_URL": f"{bench.ready.url}/ready?token={token}",
    }
    container = _docker_run(f"test-image-{token[:12]}", IMAGE, env)
    try:
        bench.ready.wait(token, lambda: False, timeout=120.0)
        checked = subprocess.run(["docker", "exec", container, *_healthcheck()], capture_output=True, text=True)
        assert checked.returncode == 0, f"ready, but the health check fails: {checked.stderr}"
    finally:
        subprocess.run(["docker", "rm", "-f", container], capture_output=True, check=False)
        bench.forget_queue(worker_id)
        code.close()
        bench.close()
