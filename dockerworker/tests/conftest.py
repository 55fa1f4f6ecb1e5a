"""Fixtures for the dockerworker tests (helpers live in `support`).

The messaging tests run against a REAL RabbitMQ (AMQP_URL, default the local
`workerctl` user that scripts/services creates); they fail, never skip, when
it is not reachable.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from .support import (
    AMQP_URL,
    PACKAGE_ROOT,
    TRIVIAL_CODE,
    Broker,
    HttpStub,
    Scripted,
    Worker,
    code_answer,
    free_port,
    sensorbucket_zip,
)


@pytest.fixture
def http_stub() -> Iterator[Callable[..., HttpStub]]:
    stubs: list[HttpStub] = []

    def start(*answers: tuple[int, Any]) -> HttpStub:
        stub = HttpStub(Scripted(list(answers)))
        stubs.append(stub)
        return stub

    yield start
    for stub in stubs:
        stub.close()


@pytest.fixture
def broker() -> Iterator[Broker]:
    try:
        client = Broker(AMQP_URL)
    except Exception as exc:  # any failure to connect: say so, loudly
        pytest.fail(
            f"RabbitMQ is not reachable at {AMQP_URL} ({type(exc).__name__}: {exc}). "
            "Start it with scripts/services, or set AMQP_URL.",
            pytrace=False,
        )
    yield client
    client.close()


@pytest.fixture
def make_worker(tmp_path: Path, http_stub: Callable[..., HttpStub]) -> Iterator[Callable[..., Worker]]:
    """Build a worker for the test broker; code is served by a local code endpoint."""
    workers: list[Worker] = []

    def make(
        broker: Broker | None,
        code: str | bytes = TRIVIAL_CODE,
        worker_id: str | None = None,
        code_url: str | None = None,
        **extra_env: str,
    ) -> Worker:
        archive = code if isinstance(code, bytes) else sensorbucket_zip(code)
        if code_url is None:
            code_url = http_stub(code_answer(archive)).url + "/source"
        worker_id = worker_id or str(uuid.uuid4())
        env = {
            "PATH": os.environ.get("PATH", ""),
            "PYTHONPATH": str(PACKAGE_ROOT),
            "PYTHONDONTWRITEBYTECODE": "1",
            "WORKER_ID": worker_id,
            "AMQP_HOST": AMQP_URL,
            "AMQP_XCHG": broker.exchange_name if broker else "test.unused",
            "CODE_URL": code_url,
            "ENDPOINT_DEVICES": "http://127.0.0.1:9/devices",
            "WORKER_HEALTH_PORT": str(free_port()),
            "WORKER_CODE_DIR": str(tmp_path / f"code-{worker_id}"),
            "WORKER_SHUTDOWN_GRACE_S": "4",
            # The tests follow each message through its log line; the
            # default level (info) leaves out forwarded ones.
            "WORKER_LOG_LEVEL": "debug",
        }
        env.update(extra_env)
        if broker is not None:
            broker.forget(f"worker_{worker_id}")
            broker.forget(f"worker_{worker_id}.retry")
        worker = Worker(env, tmp_path / f"worker-{worker_id}-{len(workers)}.log")
        workers.append(worker)
        return worker

    yield make
    for worker in workers:
        if worker.process is not None and worker.process.poll() is None:
            worker.process.kill()
            worker.process.wait()

