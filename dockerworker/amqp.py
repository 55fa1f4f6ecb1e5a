"""The pika bridge: one AMQP connection and one confirm-mode channel, as plain calls.

Owns: everything that touches pika (its asyncio adapter): connecting,
declaring the worker's topology, consuming, publishing, acknowledging,
cancelling and closing, and turning pika's callbacks into calls on a
`Listener`. It keeps no message bookkeeping: what a publish was for, and
when an input may be acknowledged, is `ledger` and `pump`'s business.

Architecture Invariant: every method and every listener call runs on the
event-loop thread. A publish returns its confirm number (1, 2, 3, ... on the
channel), the number `Listener.on_confirm` later speaks of; once
`Listener.on_lost` has been called, nothing more is delivered or confirmed,
and `publish` raises `BrokerLost`.

Also here: pika's plaintext transport sends each frame with its own
`send()` (three per publish, one per ack); `coalesce_writes` makes it send
what was written in one loop turn with one system call.

Topology (all idempotent): the durable topic exchange AMQP_XCHG; the durable
quorum queue `worker_<id>` bound with routing key `<id>`; and the durable
queue `worker_<id>.retry`, whose messages the broker dead-letters back to the
exchange with routing key `<id>` when their per-message TTL runs out.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import pika
import pika.exceptions
from pika.adapters.asyncio_connection import AsyncioConnection
from pika.adapters.utils import io_services_utils
from pika.channel import Channel
from pika.spec import Basic, BasicProperties

from .config import Config

CONNECT_TIMEOUT_S = 10.0
RPC_TIMEOUT_S = 10.0
_PERSISTENT = 2
# Reply codes that mean our declarations clash with what exists: retrying
# cannot help (ACCESS_REFUSED, RESOURCE_LOCKED, PRECONDITION_FAILED).
_TOPOLOGY_REPLY_CODES = frozenset({403, 405, 406})
# One send() carries at most this much of what is waiting.
_MAX_COALESCED_BYTES = 256 * 1024


class TopologyError(Exception):
    """The broker refused our declarations (exit code 5): e.g. `worker_<id>` exists with other arguments."""


class BrokerLost(Exception):
    """The connection or channel is gone (or never came): reconnect."""


BROKER_ERRORS: tuple[type[BaseException], ...] = (
    BrokerLost,
    pika.exceptions.AMQPError,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
)


@dataclass(frozen=True)
class Delivery:
    """One message as the broker delivered it."""

    tag: int
    body: bytes
    message_id: str | None
    content_type: str | None
    headers: dict[str, Any]
    # The key it was published with (the worker's id, for a pipeline message).
    routing_key: str = ""


class Listener(Protocol):
    """What the bridge reports, on the event-loop thread."""

    def on_delivery(self, delivery: Delivery) -> None: ...

    def on_confirm(self, seq: int, multiple: bool, acked: bool) -> None:
        """The broker confirmed (or refused, `acked=False`) publish `seq`, and
        with `multiple` every publish up to it."""

    def on_return(self, routing_key: str, body: bytes) -> None:
        """A mandatory publish no queue was bound for; its confirm follows."""

    def on_lost(self, error: Exception, *, expected: bool) -> None:
        """The connection or channel is gone; `error` says why (`TopologyError`
        when the broker refused a declaration); `expected` when the worker
        closed it itself. Called once."""


class Bridge:
    """One connection and one channel in confirm mode, for one `Listener`."""

    def __init__(self, config: Config, listener: Listener) -> None:
        self.config = config
        self.listener = listener
        self.lost = False
        self._connection: AsyncioConnection | None = None
        self._channel: Channel | None = None
        self._consuming = False
        self._reported = False
        # Set by `close`: the loss that follows is our own doing.
        self.closing = False
        self._consumer_tag: str | None = None
        self._publish_seq = 0
        self._waiters: set[asyncio.Future[Any]] = set()
        self._closed: asyncio.Future[Any] | None = None

    # -- opening ------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, open the channel in confirm mode with the prefetch, declare the topology."""
        self._connection = await self._connect()
        connection = self._connection
        (channel,) = await self._rpc(lambda done: connection.channel(on_open_callback=done))
        self._channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        await self._rpc(lambda done: channel.confirm_delivery(self._on_confirm, callback=done))
        await self._rpc(lambda done: channel.basic_qos(prefetch_count=self.config.prefetch, callback=done))
        await self._declare(channel)
        channel.add_on_return_callback(self._on_return)
        channel.add_on_cancel_callback(self._on_cancelled)

    async def _connect(self) -> AsyncioConnection:
        opened = self._waiter()
        parameters = pika.URLParameters(self.config.amqp_url)
        parameters.client_properties = {"connection_name": f"dockerworker {self.config.worker_id}"}
        parameters.connection_attempts = 1  # retries are ours, with backoff
        parameters.socket_timeout = CONNECT_TIMEOUT_S
        AsyncioConnection(
            parameters,
            on_open_callback=lambda connection: _resolve(opened, connection),
            on_open_error_callback=lambda _, error: _fail(opened, BrokerLost(f"cannot connect: {error!r}")),
            on_close_callback=self._on_connection_closed,
            custom_ioloop=asyncio.get_running_loop(),
        )
        connection: AsyncioConnection = await asyncio.wait_for(opened, timeout=CONNECT_TIMEOUT_S)
        return connection

    async def _declare(self, channel: Channel) -> None:
        config = self.config
        await self._rpc(
            lambda done: channel.exchange_declare(config.exchange, exchange_type="topic", durable=True, callback=done)
        )
        await self._rpc(
            lambda done: channel.queue_declare(
                config.queue, durable=True, arguments={"x-queue-type": "quorum"}, callback=done
            )
        )
        await self._rpc(lambda done: channel.queue_bind(config.queue, config.exchange, config.routing_key, callback=done))
        retry_arguments = {"x-dead-letter-exchange": config.exchange, "x-dead-letter-routing-key": config.routing_key}
        await self._rpc(
            lambda done: channel.queue_declare(config.retry_queue, durable=True, arguments=retry_arguments, callback=done)
        )

    async def consume(self) -> None:
        """Attach the consumer; deliveries go to `Listener.on_delivery` from now on."""
        channel = self._channel_()

        def start(done: Callable[..., None]) -> None:
            self._consumer_tag = channel.basic_consume(self.config.queue, self._on_message, callback=done)

        await self._rpc(start)
        self._consuming = True

    # -- the per-message calls ------------------------------------------------------

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        message_id: str | None,
        headers: dict[str, Any],
        mandatory: bool,
        content_type: str | None = "application/json",
        expiration: str | None = None,
    ) -> int:
        """Publish a persistent message; return its confirm number."""
        properties = BasicProperties(
            message_id=message_id,
            content_type=content_type,
            headers=headers,
            delivery_mode=_PERSISTENT,
            expiration=expiration,
        )
        try:
            self._channel_().basic_publish(exchange, routing_key, body, properties, mandatory=mandatory)
        except (pika.exceptions.AMQPError, AssertionError) as exc:
            raise BrokerLost(f"publish failed: {exc!r}") from exc
        self._publish_seq += 1
        return self._publish_seq

    def ack(self, tag: int, *, multiple: bool) -> None:
        self._send(lambda channel: channel.basic_ack(tag, multiple=multiple))

    def nack(self, tag: int) -> None:
        """Hand the input back to the queue."""
        self._send(lambda channel: channel.basic_nack(tag, requeue=True))

    def _send(self, frame: Callable[[Channel], None]) -> None:
        try:
            frame(self._channel_())
        except (BrokerLost, pika.exceptions.AMQPError):
            pass  # the channel is gone: the broker requeues whatever was not acked

    # -- closing -----------------------------------------------------------------

    async def cancel(self, timeout: float = 1.0) -> None:
        """Stop deliveries (what is in hand stays in hand)."""
        try:
            channel = self._channel_()
            await asyncio.wait_for(
                self._rpc(lambda done: channel.basic_cancel(self._consumer_tag, callback=done)), timeout=timeout
            )
        except BROKER_ERRORS:
            pass  # the close that follows stops deliveries as well

    async def close(self) -> None:
        """Close the connection (unacknowledged inputs go back to the queue) and wait for it."""
        self.closing = True
        connection = self._connection
        if connection is None or connection.is_closed:
            return
        closed = self._waiter()
        self._closed = closed
        if not connection.is_closing:
            connection.close()
        try:
            await asyncio.wait_for(closed, timeout=2.0)
        except BROKER_ERRORS:
            pass
        except asyncio.CancelledError:
            pass

    # -- pika's callbacks ------------------------------------------------------------

    def _on_message(self, _channel: Channel, method: Basic.Deliver, properties: BasicProperties, body: bytes) -> None:
        if self.lost:
            return
        headers = properties.headers
        delivery = Delivery(
            method.delivery_tag,
            body,
            properties.message_id,
            properties.content_type,
            dict(headers) if headers else {},
            method.routing_key,
        )
        self.listener.on_delivery(delivery)

    def _on_confirm(self, frame: Any) -> None:
        if self.lost:
            return
        method = frame.method
        self.listener.on_confirm(method.delivery_tag, bool(method.multiple), isinstance(method, Basic.Ack))

    def _on_return(self, _channel: Channel, method: Basic.Return, _properties: BasicProperties, body: bytes) -> None:
        self.listener.on_return(method.routing_key, body)

    def _on_connection_closed(self, _connection: AsyncioConnection, reason: BaseException) -> None:
        if self._closed is not None:
            _resolve(self._closed, None)
        self._lose(BrokerLost(f"connection closed: {reason!r}"))

    def _on_channel_closed(self, _channel: Channel, reason: BaseException) -> None:
        code = getattr(reason, "reply_code", None)
        if not self._consuming and code in _TOPOLOGY_REPLY_CODES:
            error: Exception = TopologyError(f"the broker refused the worker's exchange or queues: {reason!r}")
        else:
            error = BrokerLost(f"channel closed: {reason!r}")
        self._lose(error)
        self._close_connection()  # a fresh connection gets a fresh channel

    def _on_cancelled(self, *_: Any) -> None:
        # The broker cancelled our consumer (the queue was deleted): end the
        # session so that the next one declares the queue again.
        self._lose(BrokerLost("consumer cancelled by the broker"))
        self._close_connection()

    def _lose(self, error: Exception) -> None:
        for waiter in list(self._waiters):
            _fail(waiter, error)
        if self._reported:
            return
        self._reported = self.lost = True
        # Before the consumer is attached the caller sees the error itself.
        self.listener.on_lost(error, expected=self.closing or not self._consuming)

    def _close_connection(self) -> None:
        connection = self._connection
        if connection is not None and not (connection.is_closed or connection.is_closing):
            connection.close()

    # -- small helpers -----------------------------------------------------------------

    def _waiter(self) -> asyncio.Future[Any]:
        """A future that fails if the connection or channel goes away first."""
        future = asyncio.get_running_loop().create_future()
        self._waiters.add(future)
        future.add_done_callback(self._waiters.discard)
        return future

    async def _rpc(self, start: Callable[[Callable[..., None]], Any]) -> tuple[Any, ...]:
        """Start a callback-style pika call and wait for its callback's arguments."""
        if self.lost:
            raise BrokerLost("connection closed")
        future = self._waiter()
        start(lambda *args: _resolve(future, args))
        result: tuple[Any, ...] = await asyncio.wait_for(future, timeout=RPC_TIMEOUT_S)
        return result

    def _channel_(self) -> Channel:
        if self._channel is None or self.lost or self.closing:
            raise BrokerLost("no channel")
        return self._channel


def _resolve(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


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


coalesce_writes()
