"""The AMQP side: declare, consume, publish with confirms, acknowledge, reconnect.

Owns: everything that talks to RabbitMQ (through aio-pika), and the rule
that makes the runtime lossless: **an input is acknowledged only after the
broker confirmed the publish of its result** (next step, `errors`, or the
retry queue). If the connection dies first, the input stays unacknowledged
and the broker redelivers it: delivery is at-least-once.

Throughput comes from pipelining, not from parallel user code: `process`
runs for one message at a time, in arrival order, on one thread; its result
is published at once and the next message is taken without waiting for the
confirm. Up to `prefetch` messages are in hand at once, which bounds both
memory and the number of unconfirmed publishes.

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
import queue as thread_queue
import threading
import time
from typing import Any, Callable

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage, AbstractRobustQueue

from . import logs, processing
from .codeload import UserCode
from .config import ERRORS_ROUTING_KEY, Config
from .health import Readiness
from .processing import Outcome

UNROUTABLE = "unroutable"
_FIRST_RECONNECT_DELAY_S = 0.5
_MAX_RECONNECT_DELAY_S = 30.0
_CONNECT_TIMEOUT_S = 10.0
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


class UserThread:
    """One daemon thread that runs user code, so the event loop keeps serving
    confirms, heartbeats and signals while `process` works. A daemon thread
    (not an executor) so a `process` that never returns cannot block exit."""

    def __init__(self) -> None:
        self._jobs: thread_queue.SimpleQueue[Any] = thread_queue.SimpleQueue()
        threading.Thread(target=self._serve, name="user-code", daemon=True).start()

    async def call(self, function: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._jobs.put((function, args, loop, future))
        return await future

    def _serve(self) -> None:
        while True:
            function, args, loop, future = self._jobs.get()
            try:
                result = function(*args)
            except BaseException as exc:  # handed to the awaiting side, which decides
                loop.call_soon_threadsafe(_settle_future, future, None, exc)
            else:
                loop.call_soon_threadsafe(_settle_future, future, result, None)


def _settle_future(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


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
        self._drain_deadline: float | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None

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
            await _close_quietly(connection)

    async def _consume(self, connection: aio_pika.abc.AbstractConnection, shutdown: asyncio.Event) -> None:
        connection.close_callbacks.add(self._on_lost)
        channel = self._channel = await connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=self.config.prefetch)
        self._exchange, queue = await self._declare(channel)
        (await channel.get_underlay_channel()).on_consumer_cancel_callbacks.add(self._on_cancelled)
        consumer_tag = await queue.consume(self._inbox.put)
        self.attached = True
        self.readiness.set(consumer_attached=True)
        logs.event("consuming", queue=self.config.queue, exchange=self.config.exchange, prefetch=self.config.prefetch)
        watcher = asyncio.create_task(self._stop_on(shutdown, queue, consumer_tag))
        try:
            await self._pump()
        finally:
            watcher.cancel()
            await self._wait_in_flight(shutdown)

    async def _declare(self, channel: AbstractChannel) -> tuple[AbstractExchange, Any]:
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
        return exchange, queue

    async def _pump(self) -> None:
        """Process messages one at a time, in order, until stopped or disconnected."""
        loop = asyncio.get_running_loop()
        while True:
            item = await self._inbox.get()
            if item is _Signal.STOP or item is _Signal.LOST or self._lost:
                return
            if self._drain_deadline is not None and loop.time() > self._drain_deadline:
                return  # out of time: the rest goes back to the queue on close
            await self._process(item)

    async def _process(self, item: AbstractIncomingMessage) -> None:
        started = time.perf_counter()
        outcome = await self.user_thread.call(
            processing.handle, item.body, dict(item.headers or {}), self.code.function, self.context
        )
        # Published now, confirmed later: the next message does not wait.
        task = asyncio.create_task(self._settle(item, outcome, started))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _settle(self, item: AbstractIncomingMessage, outcome: Outcome, started: float) -> None:
        """Publish the outcome, then acknowledge the input; log one line."""
        verdict = outcome.verdict
        try:
            verdict = await self._publish_outcome(item, outcome)
            await item.ack()
        except BROKER_ERRORS as exc:
            # Not acknowledged: the broker gives the message to us (or the
            # next consumer) again. Nothing is lost, it may be processed twice.
            verdict = "requeued"
            outcome = _with_error(outcome, f"{type(exc).__name__}: {exc}")
            await self._requeue(item)
        self._log(item, outcome, verdict, started)

    async def _requeue(self, item: AbstractIncomingMessage) -> None:
        # On a dead channel the broker requeues by itself; on a live one the
        # message would sit unacknowledged until the connection ends, so hand
        # it back now. Quorum queues count this in x-delivery-count, which
        # bounds the loop (WORKER_MAX_REDELIVERIES).
        if self._lost or self._channel is None or self._channel.is_closed:
            return
        try:
            await item.nack(requeue=True)
        except BROKER_ERRORS:
            pass

    async def _publish_outcome(self, item: AbstractIncomingMessage, outcome: Outcome) -> str:
        """Publish where the outcome says and wait for the confirm; return the final verdict."""
        if outcome.verdict == processing.RETRY:
            return await self._publish_retry(item, outcome)
        try:
            await self._pipeline.publish(self._forward(item, outcome.body), outcome.routing_key or "", mandatory=True)
            return outcome.verdict
        except aiormq.exceptions.PublishError:
            return await self._publish_to_errors(item, outcome)
        except aiormq.exceptions.DeliveryError:
            # The broker refused the publish (basic.nack): treat it like any
            # failure that may pass.
            return await self._publish_retry(item, _with_error(outcome, "publish refused by the broker"))

    async def _publish_retry(self, item: AbstractIncomingMessage, outcome: Outcome) -> str:
        if outcome.attempt >= self.config.max_attempts:
            return await self._publish_to_errors(item, outcome, reason=outcome.error)
        headers = _passed_on_headers(item.headers)
        headers[processing.ATTEMPT_HEADER] = outcome.attempt + 1
        headers[processing.LAST_ERROR_HEADER] = (outcome.error or "")[:500]
        message = aio_pika.Message(
            body=item.body,
            headers=headers,
            message_id=item.message_id,
            content_type=item.content_type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            expiration=self.config.retry_delay_ms / 1000,
        )
        assert self._channel is not None
        await self._channel.default_exchange.publish(message, self.config.retry_queue, mandatory=True)
        return processing.RETRY

    async def _publish_to_errors(self, item: AbstractIncomingMessage, outcome: Outcome, reason: str | None = None) -> str:
        """Send the input and its context to `errors` when its result cannot go where it should."""
        reason = reason or (
            f"no queue is bound to routing key {outcome.routing_key!r} on exchange {self.config.exchange!r}: "
            "the next pipeline step does not exist or is not running"
        )
        document = processing.error_document(
            _json_or_text(item.body), _json_or_text(outcome.body) if outcome.body else None, reason, outcome.attempt,
            self.context,
        )
        # Not mandatory: if nobody listens on `errors` there is nowhere left
        # to send it; the log line still carries the reason.
        await self._pipeline.publish(self._forward(item, document), ERRORS_ROUTING_KEY, mandatory=False)
        return UNROUTABLE if outcome.verdict != processing.RETRY else processing.DEAD_LETTERED

    @property
    def _pipeline(self) -> AbstractExchange:
        assert self._exchange is not None, "declared before consuming"
        return self._exchange

    def _forward(self, item: AbstractIncomingMessage, body: bytes) -> aio_pika.Message:
        headers = _passed_on_headers(item.headers)
        headers["timestamp"] = int(time.time() * 1000)
        return aio_pika.Message(
            body=body,
            headers=headers,
            message_id=item.message_id,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )

    async def _stop_on(self, shutdown: asyncio.Event, queue: AbstractRobustQueue, consumer_tag: str) -> None:
        """On shutdown: stop deliveries, then let the pump finish what it holds."""
        await shutdown.wait()
        self.readiness.set(consumer_attached=False)
        self._drain_deadline = asyncio.get_running_loop().time() + self.config.shutdown_grace_s / 2
        try:
            await asyncio.wait_for(queue.cancel(consumer_tag), timeout=1.0)
        except BROKER_ERRORS:
            pass  # the close that follows stops deliveries as well
        self._inbox.put_nowait(_Signal.STOP)

    async def _wait_in_flight(self, shutdown: asyncio.Event) -> None:
        if not self._in_flight:
            return
        timeout = self.config.shutdown_grace_s / 2 if shutdown.is_set() else 1.0
        await asyncio.wait(set(self._in_flight), timeout=timeout)
        for task in self._in_flight:
            task.cancel()

    def _on_lost(self, *_: Any) -> None:
        self._lost = True
        self.readiness.set(consumer_attached=False)
        self._inbox.put_nowait(_Signal.LOST)

    def _on_cancelled(self, *_: Any) -> None:
        # The broker cancelled our consumer (the queue was deleted): end the
        # session so the next one declares the queue again.
        logs.event("consumer_cancelled_by_broker", level=30, queue=self.config.queue)
        self._on_lost()

    def _log(self, item: AbstractIncomingMessage, outcome: Outcome, verdict: str, started: float) -> None:
        fields: dict[str, Any] = {
            "outcome": verdict,
            "duration_ms": round((time.perf_counter() - started) * 1000, 3),
            "tracing_id": outcome.tracing_id,
            "worker_id": self.config.worker_id,
            "revision": self.config.revision,
            "routing_key": outcome.routing_key,
            "message_id": item.message_id,
            "attempt": outcome.attempt,
        }
        if outcome.error:
            fields["error"] = outcome.error
        if outcome.output:
            fields["output"] = logs.clip(outcome.output)
        logs.event("message", level=20 if verdict == processing.FORWARDED else 30, **fields)


def _passed_on_headers(headers: dict[str, Any] | None) -> dict[str, Any]:
    return {key: value for key, value in (headers or {}).items() if not key.startswith(_HOP_HEADERS)}


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
