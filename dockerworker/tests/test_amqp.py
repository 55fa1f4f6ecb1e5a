"""The pika bridge against a real RabbitMQ: topology, confirms, returns, losses, and one send per loop turn."""

from __future__ import annotations

import asyncio
import collections
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable
from urllib.parse import urlsplit

import pytest
from pika.adapters.utils import io_services_utils

from dockerworker.amqp import Bridge, BrokerLost, Delivery, TopologyError, coalesce_writes
from dockerworker.config import Config

from .support import AMQP_URL, Broker, TcpProxy, pipeline_message


@dataclass
class Recorder:
    """A `Listener` that writes down what the bridge reports."""

    deliveries: list[Delivery] = field(default_factory=list)
    confirms: list[tuple[int, bool, bool]] = field(default_factory=list)
    returns: list[tuple[str, bytes]] = field(default_factory=list)
    losses: list[tuple[Exception, bool]] = field(default_factory=list)

    def on_delivery(self, delivery: Delivery) -> None:
        self.deliveries.append(delivery)

    def on_confirm(self, seq: int, multiple: bool, acked: bool) -> None:
        self.confirms.append((seq, multiple, acked))

    def on_return(self, routing_key: str, body: bytes) -> None:
        self.returns.append((routing_key, body))

    def on_lost(self, error: Exception, *, expected: bool) -> None:
        self.losses.append((error, expected))

    def confirmed(self, seq: int) -> bool:
        """Whether publish `seq` has been answered (by its own or a multiple confirm)."""
        return any(number >= seq if multiple else number == seq for number, multiple, _ in self.confirms)


def config_for(broker: Broker, amqp_url: str = AMQP_URL, **overrides: Any) -> Config:
    worker_id = str(uuid.uuid4())
    broker.forget(f"worker_{worker_id}")
    broker.forget(f"worker_{worker_id}.retry")
    settings: dict[str, Any] = dict(
        worker_id=worker_id, amqp_url=amqp_url, exchange=broker.exchange_name, code_url=None, prefetch=8
    )
    settings.update(overrides)
    return Config(**settings)


async def until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def with_bridge(config: Config, test: Callable[[Bridge, Recorder], Awaitable[None]]) -> Recorder:
    recorder = Recorder()

    async def main() -> None:
        bridge = Bridge(config, recorder)
        try:
            await bridge.open()
            await test(bridge, recorder)
        finally:
            await bridge.close()

    asyncio.run(main())
    return recorder


def test_deliveries_reach_the_listener_with_their_id_and_headers(broker: Broker):
    config = config_for(broker)

    async def test(bridge: Bridge, recorder: Recorder) -> None:
        await bridge.consume()
        await asyncio.to_thread(
            broker.publish, config.routing_key, pipeline_message(), message_id="d-1", headers={"x-custom": "yes"}
        )
        await until(lambda: len(recorder.deliveries) == 1, "the delivery")
        [delivery] = recorder.deliveries
        assert (delivery.message_id, delivery.headers["x-custom"]) == ("d-1", "yes")
        bridge.ack(delivery.tag, multiple=False)

    with_bridge(config, test)
    assert broker.message_count(config.queue) == 0  # acknowledged


def test_each_publish_is_numbered_and_confirmed_and_a_mandatory_one_without_a_queue_is_returned(broker: Broker):
    sink = broker.sink("next")
    config = config_for(broker)
    body = json.dumps(pipeline_message()).encode()

    async def test(bridge: Bridge, recorder: Recorder) -> None:
        options: dict[str, Any] = dict(message_id="p", headers={"timestamp": 1}, mandatory=True)
        first = bridge.publish(config.exchange, "next", body, **options)
        second = bridge.publish(config.exchange, "nobody-home", body, **options)
        assert (first, second) == (1, 2)
        await until(lambda: recorder.confirmed(2), "both confirms")
        assert all(acked for _, _, acked in recorder.confirms)
        assert recorder.returns == [("nobody-home", body)]

    with_bridge(config, test)
    [arrived] = broker.take(sink, 1)
    assert (arrived.message_id, arrived.headers, arrived.body) == ("p", {"timestamp": 1}, body)


def test_a_publish_the_queue_refuses_is_confirmed_as_refused(broker: Broker):
    broker.sink("full", arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
    config = config_for(broker)

    async def test(bridge: Bridge, recorder: Recorder) -> None:
        bridge.publish(config.exchange, "full", b"{}", message_id=None, headers={}, mandatory=True)
        await until(lambda: recorder.confirmed(1), "the confirm")
        assert [(seq, acked) for seq, _, acked in recorder.confirms] == [(1, False)]

    with_bridge(config, test)


def test_a_nacked_input_goes_back_to_the_queue(broker: Broker):
    config = config_for(broker)

    async def test(bridge: Bridge, recorder: Recorder) -> None:
        await bridge.consume()
        await asyncio.to_thread(broker.publish, config.routing_key, pipeline_message(), message_id="back")
        await until(lambda: len(recorder.deliveries) == 1, "the delivery")
        bridge.nack(recorder.deliveries[0].tag)
        await until(lambda: len(recorder.deliveries) == 2, "the redelivery")
        assert recorder.deliveries[1].message_id == "back"
        assert recorder.deliveries[1].headers.get("x-delivery-count") == 1

    with_bridge(config, test)


def test_the_topology_is_a_quorum_queue_bound_to_the_worker_id_and_a_dead_lettering_retry_queue(broker: Broker):
    config = config_for(broker, retry_delay_ms=50)

    async def test(bridge: Bridge, recorder: Recorder) -> None:
        await bridge.consume()
        # A message in the retry queue comes back to the worker's queue when its TTL runs out.
        bridge.publish("", config.retry_queue, b"{}", message_id="r", headers={}, mandatory=True, expiration="50")
        await until(lambda: len(recorder.deliveries) == 1, "the dead-lettered message")
        assert recorder.deliveries[0].message_id == "r"

    with_bridge(config, test)
    assert broker.is_durable_quorum_queue(config.queue)


def test_a_queue_declared_otherwise_is_a_topology_error(broker: Broker):
    config = config_for(broker)
    broker.declare_queue(config.queue, durable=False)
    recorder = Recorder()

    async def main() -> None:
        bridge = Bridge(config, recorder)
        with pytest.raises(TopologyError, match="PRECONDITION_FAILED"):
            await bridge.open()
        await bridge.close()

    asyncio.run(main())
    assert [expected for _, expected in recorder.losses] == [True]  # before consuming: the caller sees it


def test_a_dropped_connection_is_reported_once_and_publishing_then_fails(broker: Broker):
    parts = urlsplit(AMQP_URL)
    proxy = TcpProxy((parts.hostname or "127.0.0.1", parts.port or 5672))
    via_proxy = parts._replace(netloc=f"{parts.username}:{parts.password}@127.0.0.1:{proxy.port}").geturl()
    config = config_for(broker, amqp_url=via_proxy)

    async def test(bridge: Bridge, recorder: Recorder) -> None:
        await bridge.consume()
        proxy.cut()
        await until(lambda: recorder.losses != [], "the loss")
        with pytest.raises(BrokerLost):
            bridge.publish(config.exchange, "next", b"{}", message_id=None, headers={}, mandatory=True)

    try:
        recorder = with_bridge(config, test)
    finally:
        proxy.close()
    [(error, expected)] = recorder.losses
    assert isinstance(error, BrokerLost) and not expected


def test_frames_written_in_one_loop_turn_leave_in_one_send():
    coalesce_writes()
    transport = io_services_utils._AsyncPlaintextTransport.__new__(io_services_utils._AsyncPlaintextTransport)
    sent: list[bytes] = []

    class Socket:
        def send(self, data: bytes) -> int:
            sent.append(bytes(data))
            return len(data)

    transport._sock = Socket()
    transport._tx_buffers = collections.deque([b"method", b"header", b"body"])
    transport._tx_buffered_byte_count = len(b"methodheaderbody")
    transport._state = transport._STATE_ACTIVE

    transport._produce()

    assert sent == [b"methodheaderbody"]
    assert transport._tx_buffered_byte_count == 0


def test_a_partial_send_keeps_the_rest_for_the_next_one():
    coalesce_writes()
    transport = io_services_utils._AsyncPlaintextTransport.__new__(io_services_utils._AsyncPlaintextTransport)
    sent: list[bytes] = []

    class Socket:
        def send(self, data: bytes) -> int:
            if not sent:
                sent.append(bytes(data[:4]))
                return 4
            raise BlockingIOError()  # the socket is full: pika waits for writable

    transport._sock = Socket()
    transport._tx_buffers = collections.deque([b"abcdef", b"gh"])
    transport._tx_buffered_byte_count = 8
    transport._state = transport._STATE_ACTIVE

    with pytest.raises(BlockingIOError):
        transport._produce()

    assert sent == [b"abcd"]
    assert list(transport._tx_buffers) == [b"efgh"]
    assert transport._tx_buffered_byte_count == 4
