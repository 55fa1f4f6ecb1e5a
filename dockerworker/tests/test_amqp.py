"""The pika bridge against a real RabbitMQ: topology, confirms, returns, losses, and one send per loop turn."""

from __future__ import annotations

import json
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urlsplit

import pytest
from dockerworker.amqp import Bridge, BrokerLost, Delivery, Endpoint, TopologyError, Unpublishable
from dockerworker.config import Config
from dockerworker.reactor import Reactor

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


def until(bridge: Bridge, condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    if not bridge.reactor.run_until(condition, timeout):
        raise AssertionError(f"timed out waiting for {what}")


def with_bridge(config: Config, test: Callable[[Bridge, Recorder], None]) -> Recorder:
    recorder = Recorder()
    reactor = Reactor()
    bridge = Bridge(config, recorder, reactor)
    try:
        bridge.open()
        test(bridge, recorder)
    finally:
        bridge.close()
        reactor.close()
    return recorder


def test_deliveries_reach_the_listener_with_their_id_and_headers(broker: Broker):
    config = config_for(broker)

    def test(bridge: Bridge, recorder: Recorder) -> None:
        bridge.consume()
        broker.publish(config.routing_key, pipeline_message(), message_id="d-1", headers={"x-custom": "yes"})
        until(bridge, lambda: len(recorder.deliveries) == 1, "the delivery")
        [delivery] = recorder.deliveries
        assert (delivery.message_id, delivery.headers["x-custom"]) == ("d-1", "yes")
        bridge.ack(delivery.tag, multiple=False)

    with_bridge(config, test)
    assert broker.message_count(config.queue) == 0  # acknowledged


def test_each_publish_is_numbered_and_confirmed_and_a_mandatory_one_without_a_queue_is_returned(broker: Broker):
    sink = broker.sink("next")
    config = config_for(broker)
    body = json.dumps(pipeline_message()).encode()

    def test(bridge: Bridge, recorder: Recorder) -> None:
        options: dict[str, Any] = dict(message_id="p", headers={"timestamp": 1}, mandatory=True)
        first = bridge.publish(config.exchange, "next", body, **options)
        second = bridge.publish(config.exchange, "nobody-home", body, **options)
        assert (first, second) == (1, 2)
        until(bridge, lambda: recorder.confirmed(2), "both confirms")
        assert all(acked for _, _, acked in recorder.confirms)
        assert recorder.returns == [("nobody-home", body)]

    with_bridge(config, test)
    [arrived] = broker.take(sink, 1)
    assert (arrived.message_id, arrived.headers, arrived.body) == ("p", {"timestamp": 1}, body)


def test_a_publish_the_queue_refuses_is_confirmed_as_refused(broker: Broker):
    broker.sink("full", arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
    config = config_for(broker)

    def test(bridge: Bridge, recorder: Recorder) -> None:
        bridge.publish(config.exchange, "full", b"{}", message_id=None, headers={}, mandatory=True)
        until(bridge, lambda: recorder.confirmed(1), "the confirm")
        assert [(seq, acked) for seq, _, acked in recorder.confirms] == [(1, False)]

    with_bridge(config, test)


def test_a_nacked_input_goes_back_to_the_queue(broker: Broker):
    config = config_for(broker)

    def test(bridge: Bridge, recorder: Recorder) -> None:
        bridge.consume()
        broker.publish(config.routing_key, pipeline_message(), message_id="back")
        until(bridge, lambda: len(recorder.deliveries) == 1, "the delivery")
        bridge.nack(recorder.deliveries[0].tag)
        until(bridge, lambda: len(recorder.deliveries) == 2, "the redelivery")
        assert recorder.deliveries[1].message_id == "back"
        assert recorder.deliveries[1].headers.get("x-delivery-count") == 1

    with_bridge(config, test)


def test_the_topology_is_a_quorum_queue_bound_to_the_worker_id_and_a_dead_lettering_retry_queue(broker: Broker):
    config = config_for(broker, retry_delay_ms=50)

    def test(bridge: Bridge, recorder: Recorder) -> None:
        bridge.consume()
        # A message in the retry queue comes back to the worker's queue when its TTL runs out.
        bridge.publish("", config.retry_queue, b"{}", message_id="r", headers={}, mandatory=True, expiration="50")
        until(bridge, lambda: len(recorder.deliveries) == 1, "the dead-lettered message")
        assert recorder.deliveries[0].message_id == "r"

    with_bridge(config, test)
    assert broker.is_durable_quorum_queue(config.queue)


def test_a_queue_declared_otherwise_is_a_topology_error(broker: Broker):
    config = config_for(broker)
    broker.declare_queue(config.queue, durable=False)
    recorder = Recorder()

    bridge = Bridge(config, recorder, Reactor())
    with pytest.raises(TopologyError, match="PRECONDITION_FAILED"):
        bridge.open()
    bridge.close()
    assert [expected for _, expected in recorder.losses] == [True]  # before consuming: the caller sees it


def test_a_dropped_connection_is_reported_once_and_publishing_then_fails(broker: Broker):
    parts = urlsplit(AMQP_URL)
    proxy = TcpProxy((parts.hostname or "127.0.0.1", parts.port or 5672))
    via_proxy = parts._replace(netloc=f"{parts.username}:{parts.password}@127.0.0.1:{proxy.port}").geturl()
    config = config_for(broker, amqp_url=via_proxy)

    def test(bridge: Bridge, recorder: Recorder) -> None:
        bridge.consume()
        proxy.cut()
        until(bridge, lambda: recorder.losses != [], "the loss")
        with pytest.raises(BrokerLost):
            bridge.publish(config.exchange, "next", b"{}", message_id=None, headers={}, mandatory=True)

    try:
        recorder = with_bridge(config, test)
    finally:
        proxy.close()
    [(error, expected)] = recorder.losses
    assert isinstance(error, BrokerLost) and not expected


def test_a_body_larger_than_a_frame_goes_out_in_frames_and_comes_back_whole(broker: Broker):
    config = config_for(broker)
    body = json.dumps(pipeline_message(payload="x" * 400_000)).encode()  # three frames of 128 KiB and more

    def test(bridge: Bridge, recorder: Recorder) -> None:
        bridge.consume()
        bridge.publish(config.exchange, config.routing_key, body, message_id="big", headers={}, mandatory=True)
        until(bridge, lambda: len(recorder.deliveries) == 1 and recorder.confirmed(1), "the delivery and the confirm")
        assert recorder.deliveries[0].body == body
        assert recorder.confirms == [(1, False, True)]

    with_bridge(config, test)


def test_headers_keep_their_double_floats_and_bytes_through_the_broker(broker: Broker):
    config = config_for(broker)
    headers = {"precise": 0.1, "not-utf8": b"\xff\xfe", "nested": {"half": 1.5}, "list": [2.25]}

    def test(bridge: Bridge, recorder: Recorder) -> None:
        bridge.consume()
        bridge.publish(config.exchange, config.routing_key, b"{}", message_id="h", headers=headers, mandatory=True)
        until(bridge, lambda: len(recorder.deliveries) == 1, "the delivery")
        got = recorder.deliveries[0].headers
        assert got["precise"] == 0.1  # a 64-bit double, not a 32-bit float
        assert bytes(got["not-utf8"]) == b"\xff\xfe"
        assert (got["nested"], got["list"]) == ({"half": 1.5}, [2.25])
        # and what was received can be published again as it is
        bridge.publish(config.exchange, "nowhere", b"{}", message_id="h2", headers=got, mandatory=False)

    with_bridge(config, test)


def test_a_routing_key_amqp_cannot_carry_is_unpublishable_and_the_channel_stays(broker: Broker):
    config = config_for(broker)

    def test(bridge: Bridge, recorder: Recorder) -> None:
        with pytest.raises(Unpublishable, match="routing key"):
            bridge.publish(config.exchange, "k" * 300, b"{}", message_id=None, headers={}, mandatory=True)
        assert bridge.publish(config.exchange, "next", b"{}", message_id=None, headers={}, mandatory=False) == 1
        until(bridge, lambda: recorder.confirmed(1), "the confirm of the next publish")

    with_bridge(config, test)


def test_wrong_credentials_are_a_lost_broker_with_the_reason(broker: Broker):
    parts = urlsplit(AMQP_URL)
    wrong = parts._replace(netloc=f"{parts.username}:not-the-password@{parts.hostname}:{parts.port or 5672}").geturl()
    bridge = Bridge(config_for(broker, amqp_url=wrong), Recorder(), Reactor())
    with pytest.raises(BrokerLost, match="ACCESS_REFUSED"):
        bridge.open()
    bridge.close()


@pytest.mark.parametrize(
    "url, expected",
    [
        ("amqp://guest:guest@mq:5672/", ("mq", 5672, False, "guest", "guest", "/", None)),
        ("amqp://mq", ("mq", 5672, False, "guest", "guest", "/", None)),
        ("amqp://u:p%40ss@mq:5673/%2f", ("mq", 5673, False, "u", "p@ss", "/", None)),
        ("amqp://u:p@mq/sensorbucket?heartbeat=10", ("mq", 5672, False, "u", "p", "sensorbucket", 10)),
        ("amqps://u:p@mq", ("mq", 5671, True, "u", "p", "/", None)),
        ("amqp://u:p@mq/?heartbeat=5&ssl_options=x", ("mq", 5672, False, "u", "p", "/", 5)),
    ],
)
def test_an_amqp_url_names_the_endpoint_as_pika_read_it(url: str, expected: tuple[Any, ...]) -> None:
    endpoint = Endpoint.parse(url)
    assert (
        endpoint.host, endpoint.port, endpoint.tls, endpoint.username, endpoint.password, endpoint.vhost,
        endpoint.heartbeat_s,
    ) == expected
    assert endpoint.ignored == ({"ssl_options"} if "ssl_options" in url else set())


class CountingSocket:
    """Stands in for the bridge's socket: counts `send` calls, takes `accept` bytes of the first."""

    def __init__(self, accept: int | None = None) -> None:
        self.sends: list[bytes] = []
        self.accept = accept
        self._real, self._peer = socket.socketpair()

    def fileno(self) -> int:
        return self._real.fileno()

    def send(self, data: bytes) -> int:
        taken = data if self.accept is None or self.sends else data[: self.accept]
        self.sends.append(bytes(taken))
        return len(taken)

    def close(self) -> None:
        self._real.close()
        self._peer.close()


def bridge_on(sock: CountingSocket) -> Bridge:
    """A bridge past its handshake, on `sock` (its writes only)."""
    config = Config(worker_id=str(uuid.uuid4()), amqp_url="amqp://unused", exchange="x", code_url=None)
    bridge = Bridge(config, Recorder(), Reactor())
    bridge._socket = sock  # type: ignore[assignment]  # noqa: SLF001 (the writes are the point)
    return bridge


def test_frames_written_in_one_reactor_turn_leave_in_one_send():
    sock = CountingSocket()
    bridge = bridge_on(sock)
    bridge.publish("x", "next", b"{}", message_id="a", headers={}, mandatory=True)
    bridge.publish("x", "next", b"{}", message_id="b", headers={}, mandatory=True)
    bridge.ack(7, multiple=True)
    bridge.reactor.run_until(lambda: bool(sock.sends), 1.0)

    assert len(sock.sends) == 1  # two publishes of three frames each, and an ack
    assert sock.sends[0].count(b"\xce") >= 7  # every frame ends with 0xCE
    sock.close()


def test_a_partial_send_keeps_the_rest_until_the_socket_is_writable():
    sock = CountingSocket(accept=4)
    bridge = bridge_on(sock)
    bridge.ack(1, multiple=False)
    bridge.ack(2, multiple=False)
    bridge.reactor.run_until(lambda: len(sock.sends) == 2, 1.0)  # the socketpair is writable at once

    first, rest = sock.sends
    assert len(first) == 4
    assert first + rest == bridge_frames_of_two_acks()
    assert not bridge._writer_waiting  # noqa: SLF001 (nothing left: no longer waiting to write)
    sock.close()


def bridge_frames_of_two_acks() -> bytes:
    from pamqp import commands, frame

    return frame.marshal(commands.Basic.Ack(1, False), 1) + frame.marshal(commands.Basic.Ack(2, False), 1)
