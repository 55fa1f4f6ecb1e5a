"""The AMQP side: declare, consume, publish with confirms, acknowledge, reconnect.

Owns: everything that talks to RabbitMQ, and the rule that makes the runtime
lossless: **an input is acknowledged only after the broker confirmed the
publish of its result** (next step, `errors`, or the retry queue). If the
connection dies first, the input stays unacknowledged and the broker
redelivers it: delivery is at-least-once.

Throughput comes from pipelining, not from parallel user code: `process`
runs for one message at a time, in arrival order, on one thread; results are
published at once and the next message is taken without waiting for the
confirm. At most `prefetch` messages are in hand, which bounds both memory
and the number of unconfirmed publishes. Acknowledgements go out in delivery
order, one `multiple` ack for each run of confirmed messages.

aio-pika opens the connection and declares the topology; the per-message
path (consume, publish, ack) uses its underlying aiormq channel directly,
which skips aio-pika's per-message wrapper objects and its wait for the
socket to drain after every publish: that halves the CPU cost per message.

Topology (all idempotent): the durable topic exchange AMQP_XCHG; the durable
quorum queue `worker_<id>` bound with routing key `<id>`; and the durable
queue `worker_<id>.retry`, where a message that failed in a way that may pass
waits `retry_delay_ms` (per-message TTL) before the broker dead-letters it back
to the exchange with routing key `<id>`.

Must not do: decide what happens to a message (that is `processing`).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque
from typing import Any

import aio_pika
import aiormq
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from . import logs, processing
from .codeload import UserCode
from .config import ERRORS_ROUTING_KEY, Config
from .health import Readiness
from .processing import Outcome
from .userthread import UserThread

UNROUTABLE = "unroutable"
REQUEUED = "requeued"
_FIRST_RECONNECT_DELAY_S = 0.5
_MAX_RECONNECT_DELAY_S = 30.0
_CONNECT_TIMEOUT_S = 10.0
# How long one hand-over to the user thread may keep processing before the
# results so far are published.
_MAX_BATCH_S = 0.05
_PERSISTENT = 2
# Headers that describe this hop's delivery, not the message: not passed on.
_HOP_HEADERS = ("x-delivery-count", "x-death", "x-first-death-", "x-last-death-", "x-workerctl-")
# Errors that mean "the broker or the connection to it is gone": reconnect.
BROKER_ERRORS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
)


class TopologyError(Exception):
    """The broker refused our declarations (exit code 5): e.g. `worker_<id>` exists with other arguments."""


async def run(config: Config, code: UserCode, readiness: Readiness, shutdown: asyncio.Event) -> None:
    """Consume until `shutdown` is set, reconnecting with backoff whenever the broker goes away."""
    user_thread = UserThread()
    delay = _FIRST_RECONNECT_DELAY_S
    while not shutdown.is_set():
        session = Session(config, code, readiness, user_thread)
        try:
            await session.run(shutdown)
        except TopologyError:
            raise
        except BROKER_ERRORS as exc:
            logs.event("broker_unavailable", level=30, error=f"{type(exc).__name__}: {exc}", retry_in_s=round(delay, 2))
        if session.attached:
            delay = _FIRST_RECONNECT_DELAY_S  # it worked for a while: start the backoff again
        if shutdown.is_set():
            break
        await _sleep_unless(shutdown, delay)
        delay = min(delay * 2, _MAX_RECONNECT_DELAY_S)


class _Signal:
    """Sentinels put in the inbox to wake the pump."""

    STOP = object()
    LOST = object()


class Session:
    """One connection's life: declare, consume, pump, and a clean close."""

    def __init__(self, config: Config, code: UserCode, readiness: Readiness, user_thread: UserThread) -> None:
        self.config = config
        self.code = code
        self.readiness = readiness
        self.user_thread = user_thread
        self.attached = False
        self.context = processing.Context(
            worker_id=config.worker_id,
            queue=config.queue,
            max_attempts=config.max_attempts,
            max_redeliveries=config.max_redeliveries,
            devices_endpoint=config.devices_endpoint,
        )
        self._inbox: asyncio.Queue[Any] = asyncio.Queue()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._lost = False
        self._closing = False  # our own close: not worth a warning
        self._drain_deadline: float | None = None
        self._stop_requested = threading.Event()
        self._channel: aiormq.abc.AbstractChannel | None = None
        self._acker: _Acker | None = None

    async def run(self, shutdown: asyncio.Event) -> None:
        connection = await aio_pika.connect(
            self.config.amqp_url,
            timeout=_CONNECT_TIMEOUT_S,
            client_properties={"connection_name": f"dockerworker {self.config.worker_id}"},
        )
        try:
            await self._consume(connection, shutdown)
        finally:
            self.readiness.set(consumer_attached=False)
            self._closing = True
            await _close_quietly(connection)

    async def _consume(self, connection: aio_pika.abc.AbstractConnection, shutdown: asyncio.Event) -> None:
        connection.close_callbacks.add(self._on_lost)
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await channel.set_qos(prefetch_count=self.config.prefetch)
        await self._declare(channel)
        raw = self._channel = await channel.get_underlay_channel()
        self._acker = _Acker(raw)
        raw.on_consumer_cancel_callbacks.add(self._on_cancelled)
        consume_ok = await raw.basic_consume(self.config.queue, self._inbox.put_nowait)
        self.attached = True
        self.readiness.set(consumer_attached=True)
        logs.event("consuming", queue=self.config.queue, exchange=self.config.exchange, prefetch=self.config.prefetch)
        watcher = asyncio.create_task(self._stop_on(shutdown, consume_ok.consumer_tag))
        try:
            await self._pump()
        finally:
            watcher.cancel()
            await self._wait_in_flight(shutdown)

    async def _declare(self, channel: aio_pika.abc.AbstractChannel) -> None:
        config = self.config
        try:
            exchange = await channel.declare_exchange(config.exchange, aio_pika.ExchangeType.TOPIC, durable=True)
            queue = await channel.declare_queue(config.queue, durable=True, arguments={"x-queue-type": "quorum"})
            await queue.bind(exchange, routing_key=config.routing_key)
            await channel.declare_queue(
                config.retry_queue,
                durable=True,
                arguments={"x-dead-letter-exchange": config.exchange, "x-dead-letter-routing-key": config.routing_key},
            )
        except (aiormq.exceptions.ChannelPreconditionFailed, aiormq.exceptions.ChannelAccessRefused) as exc:
            raise TopologyError(f"the broker refused the worker's exchange or queues: {exc}") from exc

    # -- the pump: deliveries in, outcomes out ---------------------------------

    async def _pump(self) -> None:
        """Process messages in arrival order until stopped or disconnected.

        Messages that are already waiting go to the user thread together, so
        the cost of the hand-over is paid once per batch, not per message.
        """
        pending: deque[DeliveredMessage] = deque()
        stopping = False
        while not self._lost:
            if not pending and not stopping:
                stopping = self._take(await self._inbox.get(), pending)
            while not stopping and not self._inbox.empty():
                stopping = self._take(self._inbox.get_nowait(), pending)
            if self._lost or not pending or self._past_drain_deadline():
                return  # what is still in hand goes back to the queue on close
            await self._process(pending)

    def _take(self, item: Any, pending: deque[DeliveredMessage]) -> bool:
        """Queue a delivery for processing; True when a stop signal arrived instead."""
        if item is _Signal.STOP or item is _Signal.LOST:
            return True
        pending.append(item)
        return False

    def _past_drain_deadline(self) -> bool:
        return self._drain_deadline is not None and asyncio.get_running_loop().time() > self._drain_deadline

    async def _process(self, pending: deque[DeliveredMessage]) -> None:
        """Run user code on a prefix of `pending` and start publishing the outcomes."""
        batch = [(item.body, _headers(item)) for item in pending]
        results = await self.user_thread.call(self._handle_batch, batch)
        for outcome, started in results:
            item = pending.popleft()
            self._acker_().track(_tag(item))
            # Published now, confirmed later: the next message does not wait.
            task = asyncio.create_task(self._settle(item, outcome, started))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    def _handle_batch(self, batch: list[tuple[bytes, dict[str, Any]]]) -> list[tuple[Outcome, float]]:
        """On the user thread: process messages in order until the batch is done or its time is up."""
        results: list[tuple[Outcome, float]] = []
        batch_started = time.perf_counter()
        for body, headers in batch:
            started = time.perf_counter()
            results.append((processing.handle(body, headers, self.code.function, self.context), started))
            # Slow code must not hold every result back until the whole
            # batch is done, nor delay a shutdown by more than one message.
            if self._stop_requested.is_set() or time.perf_counter() - batch_started > _MAX_BATCH_S:
                break
        return results

    # -- settling one message: publish, wait for the confirm, ack --------------

    async def _settle(self, item: DeliveredMessage, outcome: Outcome, started: float) -> None:
        """Publish the outcome, then acknowledge the input; log one line."""
        try:
            verdict = await self._publish_outcome(item, outcome)
            acked = True
        except BROKER_ERRORS as exc:
            # Not acknowledged: the broker gives the message to us (or the
            # next consumer) again. Nothing is lost; it may be processed twice.
            verdict, acked = REQUEUED, False
            outcome = _with_error(outcome, f"{type(exc).__name__}: {exc}")
        if not self._lost:
            await self._acker_().settle(_tag(item), acked)
        self._log(item, outcome, verdict, started)

    async def _publish_outcome(self, item: DeliveredMessage, outcome: Outcome) -> str:
        """Publish where the outcome says and wait for the confirm; return the final verdict."""
        if outcome.verdict == processing.RETRY:
            return await self._publish_retry(item, outcome)
        try:
            await self._publish(self.config.exchange, outcome.routing_key or "", outcome.body, item, mandatory=True)
            return outcome.verdict
        except aiormq.exceptions.PublishError:
            return await self._publish_to_errors(item, outcome)
        except aiormq.exceptions.DeliveryError:
            # The broker refused the publish (basic.nack): treat it like any
            # failure that may pass.
            return await self._publish_retry(item, _with_error(outcome, "publish refused by the broker"))

    async def _publish_retry(self, item: DeliveredMessage, outcome: Outcome) -> str:
        if outcome.attempt >= self.config.max_attempts:
            return await self._publish_to_errors(item, outcome, reason=outcome.error)
        headers = _passed_on(_headers(item))
        headers[processing.ATTEMPT_HEADER] = outcome.attempt + 1
        headers[processing.LAST_ERROR_HEADER] = (outcome.error or "")[:500]
        properties = Basic.Properties(
            message_id=_properties(item).message_id,
            content_type=_properties(item).content_type,
            headers=headers,
            delivery_mode=_PERSISTENT,
            expiration=str(self.config.retry_delay_ms),
        )
        # Through the default exchange straight into the retry queue.
        await self._raw().basic_publish(
            item.body, exchange="", routing_key=self.config.retry_queue, properties=properties, mandatory=True,
            wait=False,
        )
        return processing.RETRY

    async def _publish_to_errors(self, item: DeliveredMessage, outcome: Outcome, reason: str | None = None) -> str:
        """Send the input and its context to `errors` when its result cannot go where it should."""
        reason = reason or (
            f"no queue is bound to routing key {outcome.routing_key!r} on exchange {self.config.exchange!r}: "
            "the next pipeline step does not exist or is not running"
        )
        attempted = _json_or_text(outcome.body) if outcome.body else None
        document = processing.error_document(_json_or_text(item.body), attempted, reason, outcome.attempt, self.context)
        # Not mandatory: if nobody listens on `errors` there is nowhere left
        # to send it; the log line still carries the reason.
        await self._publish(self.config.exchange, ERRORS_ROUTING_KEY, document, item, mandatory=False)
        return processing.DEAD_LETTERED if outcome.verdict == processing.RETRY else UNROUTABLE

    async def _publish(self, exchange: str, routing_key: str, body: bytes, item: DeliveredMessage, *, mandatory: bool) -> None:
        """Publish a result of `item` and wait for the broker's confirm."""
        headers = _passed_on(_headers(item))
        headers["timestamp"] = int(time.time() * 1000)
        properties = Basic.Properties(
            message_id=_properties(item).message_id,
            content_type="application/json",
            headers=headers,
            delivery_mode=_PERSISTENT,
        )
        # wait=False: do not wait for the socket to drain; the confirm is what counts.
        await self._raw().basic_publish(
            body, exchange=exchange, routing_key=routing_key, properties=properties, mandatory=mandatory, wait=False
        )

    # -- lifecycle -------------------------------------------------------------

    async def _stop_on(self, shutdown: asyncio.Event, consumer_tag: str) -> None:
        """On shutdown: stop deliveries, then let the pump finish what it holds."""
        await shutdown.wait()
        self.readiness.set(consumer_attached=False)
        self._stop_requested.set()
        self._drain_deadline = asyncio.get_running_loop().time() + self.config.shutdown_grace_s / 2
        try:
            await asyncio.wait_for(self._raw().basic_cancel(consumer_tag), timeout=1.0)
        except BROKER_ERRORS:
            pass  # the close that follows stops deliveries as well
        self._inbox.put_nowait(_Signal.STOP)

    async def _wait_in_flight(self, shutdown: asyncio.Event) -> None:
        if self._in_flight:
            timeout = self.config.shutdown_grace_s / 2 if shutdown.is_set() else 1.0
            await asyncio.wait(set(self._in_flight), timeout=timeout)
            for task in self._in_flight:
                task.cancel()
        if self._acker is not None and not self._lost:
            await self._acker.flush()

    def _on_lost(self, *args: Any) -> None:
        if self._lost:
            return
        if not self._closing:
            reason = next((arg for arg in args if isinstance(arg, BaseException)), None)
            logs.event("broker_connection_lost", level=30, error=f"{type(reason).__name__}: {reason}" if reason else "closed")
        self._lost = True
        self.readiness.set(consumer_attached=False)
        self._inbox.put_nowait(_Signal.LOST)

    def _on_cancelled(self, *_: Any) -> None:
        # The broker cancelled our consumer (the queue was deleted): end the
        # session so the next one declares the queue again.
        logs.event("consumer_cancelled_by_broker", level=30, queue=self.config.queue)
        self._on_lost()

    def _raw(self) -> aiormq.abc.AbstractChannel:
        assert self._channel is not None, "opened before consuming"
        return self._channel

    def _acker_(self) -> "_Acker":
        assert self._acker is not None, "opened before consuming"
        return self._acker

    def _log(self, item: DeliveredMessage, outcome: Outcome, verdict: str, started: float) -> None:
        fields: dict[str, Any] = {
            "outcome": verdict,
            "duration_ms": round((time.perf_counter() - started) * 1000, 3),
            "tracing_id": outcome.tracing_id,
            "worker_id": self.config.worker_id,
            "revision": self.config.revision,
            "routing_key": outcome.routing_key,
            "message_id": _properties(item).message_id,
            "attempt": outcome.attempt,
        }
        if outcome.error:
            fields["error"] = outcome.error
        if outcome.output:
            fields["output"] = logs.clip(outcome.output)
        logs.event("message", level=20 if verdict == processing.FORWARDED else 30, **fields)


class _Acker:
    """Acknowledges in delivery order, one `multiple` ack per run of settled messages.

    Confirms arrive in batches; acking each input separately would send a
    frame (and a syscall) per message. Settled tags are collected and, once
    per event-loop turn, everything settled from the oldest outstanding tag
    on is acknowledged with one frame. A message handed back (nack) is sent
    at once, before any `multiple` ack that could cover its tag.
    """

    def __init__(self, channel: aiormq.abc.AbstractChannel) -> None:
        self._channel = channel
        self._outstanding: deque[int] = deque()
        self._settled: set[int] = set()
        self._flush_scheduled = False

    def track(self, tag: int) -> None:
        self._outstanding.append(tag)

    async def settle(self, tag: int, ack: bool) -> None:
        if not ack:
            await self._channel.basic_nack(tag, requeue=True, wait=False)
        self._settled.add(tag)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            # Runs after the other settles woken by the same confirm batch.
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self.flush()))

    async def flush(self) -> None:
        self._flush_scheduled = False
        highest = None
        while self._outstanding and self._outstanding[0] in self._settled:
            highest = self._outstanding.popleft()
            self._settled.discard(highest)
        if highest is None:
            return
        try:
            await self._channel.basic_ack(highest, multiple=True, wait=False)
        except BROKER_ERRORS:
            pass  # the channel is gone: the broker requeues whatever was not acked


def _properties(item: DeliveredMessage) -> Basic.Properties:
    return item.header.properties


def _headers(item: DeliveredMessage) -> dict[str, Any]:
    return dict(_properties(item).headers or {})


def _tag(item: DeliveredMessage) -> int:
    return int(item.delivery.delivery_tag)  # type: ignore[union-attr]


def _passed_on(headers: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in headers.items() if not key.startswith(_HOP_HEADERS)}


def _with_error(outcome: Outcome, error: str) -> Outcome:
    return Outcome(
        outcome.verdict, outcome.routing_key, outcome.body, outcome.attempt, outcome.tracing_id, error, outcome.output
    )


def _json_or_text(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return body.decode("utf-8", errors="replace")


async def _sleep_unless(event: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(event.wait(), timeout=seconds)
    except asyncio.TimeoutError:
        pass


async def _close_quietly(connection: aio_pika.abc.AbstractConnection) -> None:
    try:
        await asyncio.wait_for(connection.close(), timeout=2.0)
    except (*BROKER_ERRORS, RuntimeError):
        pass
