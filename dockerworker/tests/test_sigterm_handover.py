"""A rollout's hand-over: on SIGTERM the old container cancels its consumer first.

From the cancel on, the broker sends the queue's messages to the other
consumer (the new revision's container) while the old one is still finishing
what it holds; then it waits for the confirms and exits 0.

How the test tells: a message the broker had still pushed to the old
consumer would wait in its hands, unprocessed, until it exits and the close
hands it back; so every message arriving on the next step while the old
worker is still alive went through the new one. (The queue's consumer count
does not show the cancel: a quorum queue keeps counting a cancelled consumer
until its messages are settled.)
"""

from __future__ import annotations

import json
import signal
import time
import uuid
from pathlib import Path
from typing import Callable

from .support import Broker, Worker, pipeline_message, wait_until


def tagging_code(tag: str, marker: Path) -> str:
    """Code that marks each message with `tag`; a message with metadata `slow` takes 3 s."""
    return (
        "import time\n\n"
        "def process(msg):\n"
        "    if msg.metadata.get('slow'):\n"
        f"        open({str(marker)!r}, 'w').close()\n"
        "        time.sleep(3)\n"
        f"    msg.metadata['by'] = {tag!r}\n"
        "    return msg\n"
    )


def test_after_sigterm_new_messages_go_to_the_other_consumer_while_the_old_one_finishes(
    broker: Broker, make_worker: Callable[..., Worker], tmp_path: Path
) -> None:
    worker_id = str(uuid.uuid4())
    sink = broker.sink("next")
    marker = tmp_path / "old-is-busy"
    old = make_worker(broker, tagging_code("old", marker), worker_id=worker_id, WORKER_SHUTDOWN_GRACE_S="10")
    old.start().wait_ready()
    broker.publish(worker_id, pipeline_message(metadata={"slow": True}), message_id="in-hand")
    wait_until(marker.exists, 20, "the old worker to be busy with its message")

    new = make_worker(broker, tagging_code("new", tmp_path / "unused"), worker_id=worker_id).start().wait_ready()
    assert broker.consumer_count(old.queue) == 2
    assert old.process is not None
    old.process.send_signal(signal.SIGTERM)
    wait_until(lambda: bool(old.events("shutdown_requested")), 5, "the old worker to take the signal")
    time.sleep(0.3)  # the basic.cancel round trip

    ids = {f"after-{i}" for i in range(20)}
    broker.publish_many(worker_id, [(message_id, json.dumps(pipeline_message()).encode()) for message_id in ids])
    arrived = broker.take_ids(sink, ids, timeout=10)
    assert old.process.poll() is None, "the old worker must still be finishing its message"

    assert {json.loads(message.body)["metadata"]["by"] for message in arrived} == {"new"}
    [finished] = broker.take(sink, 1, timeout=10)
    assert (finished.message_id, json.loads(finished.body)["metadata"]["by"]) == ("in-hand", "old")
    assert old.wait(10) == 0
    assert [line["message_id"] for line in old.events("message")] == ["in-hand"]
    assert new.stop() == 0
