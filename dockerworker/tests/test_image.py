"""The worker image (DOCKERWORKER_IMAGE, default workerctl/dockerworker:latest, built by scripts/build-images).

Needs the Docker engine; fails, never skips, without it.
"""

from __future__ import annotations

import os
import subprocess

from dockerworker.startbench import bytecode_check

IMAGE = os.environ.get("DOCKERWORKER_IMAGE", "workerctl/dockerworker:latest")


def test_the_start_path_compiles_nothing_in_a_read_only_container() -> None:
    from_bytecode, from_source = bytecode_check(IMAGE)

    assert from_source == 0, f"{IMAGE} compiles {from_source} modules at every start: its .pyc are missing or stale"
    assert from_bytecode > 100


def test_the_image_health_check_asks_readyz() -> None:
    healthcheck = subprocess.run(
        ["docker", "image", "inspect", "--format", "{{json .Config.Healthcheck.Test}}", IMAGE],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip

    assert "/readyz" in healthcheck
