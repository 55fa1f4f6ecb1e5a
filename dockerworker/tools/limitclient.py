"""The limit client: the least a worker can do per message, for the benchmark.

Owns: nothing the runtime uses. It runs the same loop as the dockerworker,
consume → publish the result → wait for the broker's confirm → ack the
input (one `multiple` ack per run of confirmed inputs, once per turn of its
I/O loop), with the same prefetch, and so the same bound on unconfirmed publishes, but nothing else:
no user code, no `Message`, no log line, no user thread, no retry or error
paths. The body is parsed, `step_index` advanced and the result serialised
(what routing to the next step needs), with orjson, as the dockerworker
parses and serialises. It writes
to the socket as the dockerworker does (`coalesce_writes` below: the frames
of one loop turn in one `send()`), so that the difference between the two
is what the dockerworker does per message, not how pika writes.

Its rate on a given broker and machine is what the dockerworker's is
measured against (`python -m dockerworker.tools.bench` prints both, in one run).

    python -m dockerworker.tools.limitclient   # env: AMQP_HOST, AMQP_XCHG, WORKER_ID, WORKER_PREFETCH

It declares the worker's queue as the dockerworker does and writes one line,
`consuming`, when its consumer is attached. Stop it with SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections import deque
from typing import Any

import orjson
import pika
from pika.adapters.select_connection import SelectConnection
from pika.adapters.utils import io_services_utils
from pika.channel import Channel
from pika.frame import Method
from pika.spec import Basic, BasicProperties

# One send() carries at most this much of what is waiting.
_MAX_COALESCED_BYTES = 256 * 1024


def coalesce_writes() -> None:
    """Make pika's plaintext transport join its waiting frames into one `send()`.

    pika queues every frame as its own buffer and sends them one by one: a
    publish is three system calls, an ack one more. Joined, all that one
    turn of the event loop wrote goes out in one, which measurably lowers
    the CPU per message (see docs/benchmarks.md). The SSL transport is left
    alone: an SSL write that must be retried has to be given the same buffer.
    """
    transport = io_services_utils._AsyncPlaintextTransport
    if getattr(transport, "_dockerworker_coalesces", False):
        return
    produce = io_services_utils._AsyncTransportBase._produce

    def coalescing_produce(self: Any) -> None:
        buffers = self._tx_buffers
        if len(buffers) > 1:
            joined: list[bytes] = []
            size = 0
            while buffers and size < _MAX_COALESCED_BYTES:
                chunk = buffers.popleft()
                joined.append(chunk)
                size += len(chunk)
            buffers.appendleft(b"".join(joined))
        produce(self)

    transport._produce = coalescing_produce
    transport._dockerworker_coalesces = True



class LimitClient:
    """consume → publish → confirm → ack, and nothing else."""

    def __init__(self, amqp_url: str, exchange: str, worker_id: str, prefetch: int) -> None:
        self.exchange = exchange
        self.queue = f"worker_{worker_id}"
        self.worker_id = worker_id
        self.prefetch = prefetch
        self.channel: Channel | None = None
        self.publish_seq = 0
        # Inputs in delivery order: [delivery tag, confirmed?]; publish
        # numbers map to entries of this deque.
        self.in_hand: deque[list[Any]] = deque()
        self.by_seq: dict[int, list[Any]] = {}
        self.flush_scheduled = False
        parameters = pika.URLParameters(amqp_url)
        self.connection = SelectConnection(parameters, on_open_callback=self._on_open)

    def run(self) -> None:
        self.connection.ioloop.start()

    def stop(self) -> None:
        self.connection.ioloop.add_callback_threadsafe(self._close)

    def _close(self) -> None:
        if not (self.connection.is_closing or self.connection.is_closed):
            self.connection.close()
        self.connection.ioloop.stop()

    def _on_open(self, connection: SelectConnection) -> None:
        connection.channel(on_open_callback=self._on_channel)

    def _on_channel(self, channel: Channel) -> None:
        self.channel = channel
        channel.confirm_delivery(self._on_confirm, callback=lambda _: self._declare(channel))

    def _declare(self, channel: Channel) -> None:
        def bound(_: Method) -> None:
            channel.basic_qos(prefetch_count=self.prefetch, callback=lambda _: self._consume(channel))

        def declared(_: Method) -> None:
            channel.queue_bind(self.queue, self.exchange, self.worker_id, callback=bound)

        def exchange(_: Method) -> None:
            channel.queue_declare(self.queue, durable=True, arguments={"x-queue-type": "quorum"}, callback=declared)

        channel.exchange_declare(self.exchange, exchange_type="topic", durable=True, callback=exchange)

    def _consume(self, channel: Channel) -> None:
        channel.basic_consume(self.queue, self._on_message)
        print(json.dumps({"event": "consuming", "queue": self.queue}), flush=True)

    def _on_message(self, channel: Channel, method: Basic.Deliver, properties: BasicProperties, body: bytes) -> None:
        data = orjson.loads(body)
        data["step_index"] += 1
        headers = dict(properties.headers or {})
        headers["timestamp"] = int(time.time() * 1000)
        forwarded = BasicProperties(
            message_id=properties.message_id, content_type="application/json", headers=headers, delivery_mode=2
        )
        routing_key = data["pipeline_steps"][data["step_index"]]
        channel.basic_publish(self.exchange, routing_key, orjson.dumps(data), forwarded)
        self.publish_seq += 1
        entry = [method.delivery_tag, False]
        self.in_hand.append(entry)
        self.by_seq[self.publish_seq] = entry

    def _on_confirm(self, frame: Method) -> None:
        method = frame.method
        if method.multiple:
            for seq in [seq for seq in self.by_seq if seq <= method.delivery_tag]:
                self.by_seq.pop(seq)[1] = True
        else:
            self.by_seq.pop(method.delivery_tag)[1] = True
        if not self.flush_scheduled:
            # Once per loop turn, after every confirm that turn read, as the
            # dockerworker does: fewer ack frames for the broker to handle.
            self.flush_scheduled = True
            self.connection.ioloop.call_later(0, self._flush)

    def _flush(self) -> None:
        self.flush_scheduled = False
        highest = None
        while self.in_hand and self.in_hand[0][1]:
            highest = self.in_hand.popleft()[0]
        if highest is not None and self.channel is not None:
            self.channel.basic_ack(highest, multiple=True)


def main() -> int:
    coalesce_writes()
    env = os.environ
    client = LimitClient(
        env["AMQP_HOST"], env.get("AMQP_XCHG", "pipeline.messages"), env["WORKER_ID"], int(env.get("WORKER_PREFETCH", "64"))
    )
    signal.signal(signal.SIGTERM, lambda *_: client.stop())
    signal.signal(signal.SIGINT, lambda *_: client.stop())
    client.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
