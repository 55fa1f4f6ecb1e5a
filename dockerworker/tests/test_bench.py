"""The benchmark's yardstick and arithmetic: the limit client on the real broker, the busy window."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

from dockerworker.tools.bench import busy_rate

from .support import AMQP_URL, PACKAGE_ROOT, Broker, pipeline_message, wait_until


def test_the_rate_counts_only_the_window_in_which_every_lane_was_busy():
    samples = [
        (0.0, [0, 0]),
        (1.0, [100, 0]),  # lane 2 not started yet
        (2.0, [300, 50]),  # both busy from here
        (3.0, [500, 250]),
        (4.0, [600, 450]),  # lane 1 done: the window ends
        (5.0, [600, 600]),
    ]

    rate, window = busy_rate(samples, per_worker=600)

    assert window == 2.0
    assert rate == ((600 + 450) - (300 + 50)) / 2.0


def test_no_common_window_gives_no_rate():
    samples = [(0.0, [0, 0]), (1.0, [600, 0]), (2.0, [600, 600])]

    assert busy_rate(samples, per_worker=600) == (None, 0.0)


def test_the_limit_client_forwards_each_message_to_its_next_step_and_acks_it(broker: Broker):
    worker_id = str(uuid.uuid4())
    broker.forget(f"worker_{worker_id}")
    sink = broker.sink("next")
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(PACKAGE_ROOT),
        "AMQP_HOST": AMQP_URL,
        "AMQP_XCHG": broker.exchange_name,
        "WORKER_ID": worker_id,
        "WORKER_PREFETCH": "4",
    }
    client = subprocess.Popen(
        [sys.executable, "-m", "dockerworker.tools.limitclient"], env=env, cwd=PACKAGE_ROOT, stdout=subprocess.PIPE
    )
    try:
        assert client.stdout is not None
        assert json.loads(client.stdout.readline())["event"] == "consuming"
        broker.publish_many(worker_id, [(f"l-{i}", json.dumps(pipeline_message()).encode()) for i in range(20)])

        arrived = broker.take(sink, 20)

        assert {message.message_id for message in arrived} == {f"l-{i}" for i in range(20)}
        assert all(json.loads(message.body)["step_index"] == 1 for message in arrived)
        assert all(isinstance(message.headers["timestamp"], int) for message in arrived)
        wait_until(lambda: broker.message_count(f"worker_{worker_id}") == 0, 5, "every input acked")
    finally:
        client.terminate()
        client.wait(timeout=10)
