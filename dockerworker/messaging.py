"""The AMQP side: declare, consume, publish with confirms, acknowledge, reconnect.

Owns: everything that talks to RabbitMQ (through pika's asyncio adapter), and
the rule that makes the runtime lossless: **an input is acknowledged only
after the broker confirmed the publish of its result** (next step, `errors`,
or the retry queue). If the connection dies first, the input stays
unacknowledged and the broker redelivers it: delivery is at-least-once.

Throughput comes from pipelining, not from parallel user code: `process`
runs for one message at a time, in arrival order, on one thread; results are
published at once and the next message is taken without waiting for the
confirm. At most `prefetch` messages are in hand, which bounds both memory
and the number of unconfirmed publishes. The per-message path is plain
callbacks (no task or future per message): publish, remember what the publish
was for, and act when its confirm arrives. Acknowledgements go out in
delivery order, one `multiple` ack for each run of confirmed messages.

A `process` that has not returned after `process_timeout_s` cannot be
stopped (Python cannot kill a thread): its message goes to `errors` with
where the thread was, the messages before it are settled as usual, and the
session ends with `ProcessStuck` so that the worker exits and is restarted;
the messages after it go back to the queue unacknowledged.

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
import os
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import pika
import pika.exceptions
from pika.adapters.asyncio_connection import AsyncioConnection
from pika.channel import Channel
from pika.spec import Basic, BasicProperties

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
_RPC_TIMEOUT_S = 10.0
# How long one hand-over to the user thread may keep processing before the
# results so far are published.
_MAX_BATCH_S = 0.05
# How often a batch on the user thread is checked against the process timeout.
_WATCH_INTERVAL_S = 0.5
_PERSISTENT = 2
# Reply codes that mean our declarations clash with what exists: retrying
# cannot help (ACCESS_REFUSED, RESOURCE_LOCKED, PRECONDITION_FAILED).
_TOPOLOGY_REPLY_CODES = frozenset({403, 405, 406})
# Headers that describe this hop's delivery, not the message: not passed on.
_HOP_HEADERS = ("x-delivery-count", "x-death", "x-first-death-", "x-last-death-", "x-workerctl-")

# What a publish was for, which decides what its confirm leads to.
_RESULT, _ERRORS, _RETRY = "result", "errors", "retry"


class TopologyError(Exception):
    """The broker refused our declarations (exit code 5): e.g. `worker_<id>` exists with other arguments."""


class ProcessStuck(Exception):
    """`process` did not return within `process_timeout_s` (exit code 6): its
    message went to `errors`, and the worker must restart to get its thread back."""


class BrokerLost(Exception):
    """The connection or channel is gone (or never came): reconnect."""


BROKER_ERRORS: tuple[type[BaseException], ...] = (
    BrokerLost,
    pika.exceptions.AMQPError,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
)


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


@dataclass(frozen=True)
class Delivery:
    """One message as the broker delivered it."""

    tag: int
    properties: BasicProperties
    body: bytes

    @property
    def headers(self) -> dict[str, Any]:
        return dict(self.properties.headers or {})

    @property
    def message_id(self) -> str | None:
        return self.properties.message_id


@dataclass
class _Publish:
    """A publish waiting for its confirm, and the input it settles."""

    delivery: Delivery
    outcome: Outcome
    started: float
    stage: str
    verdict: str
    routing_key: str
    body: bytes
    mandatory: bool
    returned: bool = False


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
        self._unconfirmed: dict[int, _Publish] = {}
        self._publish_seq = 0
        self._waiters: set[asyncio.Future[Any]] = set()
        self._lost = False
        self._closing = False  # our own close: not worth a warning
        self._consuming = False
        self._drain_deadline: float | None = None
        self._stop_requested = threading.Event()
        # Set by the user thread: which message of the batch it is on, and
        # since when (time.monotonic()); None between batches.
        self._current: tuple[int, float] | None = None
        self._connection: AsyncioConnection | None = None
        self._channel: Channel | None = None
        self._acker: _Acker | None = None
        self._consumer_tag: str | None = None
        self._closed_waiter: asyncio.Future[Any] | None = None

    async def run(self, shutdown: asyncio.Event) -> None:
        self._connection = await self._connect()
        try:
            await self._setup(self._connection)
            await self._consume(shutdown)
        finally:
            self.readiness.set(consumer_attached=False)
            await self._close()

    # -- connection, channel, topology -------------------------------------------

    async def _connect(self) -> AsyncioConnection:
        loop = asyncio.get_running_loop()
        opened = self._waiter()
        parameters = pika.URLParameters(self.config.amqp_url)
        parameters.client_properties = {"connection_name": f"dockerworker {self.config.worker_id}"}
        parameters.connection_attempts = 1  # retries are ours, with backoff
        parameters.socket_timeout = _CONNECT_TIMEOUT_S
        AsyncioConnection(
            parameters,
            on_open_callback=lambda connection: _resolve(opened, connection),
            on_open_error_callback=lambda _, error: _fail(opened, BrokerLost(f"cannot connect: {error!r}")),
            on_close_callback=self._on_connection_closed,
            custom_ioloop=loop,
        )
        return await asyncio.wait_for(opened, timeout=_CONNECT_TIMEOUT_S)

    async def _setup(self, connection: AsyncioConnection) -> None:
        (channel,) = await self._rpc(lambda done: connection.channel(on_open_callback=done))
        self._channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        await self._rpc(lambda done: channel.confirm_delivery(self._on_confirm, callback=done))
        await self._rpc(lambda done: channel.basic_qos(prefetch_count=self.config.prefetch, callback=done))
        await self._declare(channel)
        channel.add_on_return_callback(self._on_return)
        channel.add_on_cancel_callback(self._on_cancelled)
        self._acker = _Acker(channel)

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

    async def _consume(self, shutdown: asyncio.Event) -> None:
        channel = self._channel_()
        await self._rpc(lambda done: self._start_consuming(channel, done))
        self._consuming = self.attached = True
        self.readiness.set(consumer_attached=True)
        logs.event("consuming", queue=self.config.queue, exchange=self.config.exchange, prefetch=self.config.prefetch)
        watcher = asyncio.create_task(self._stop_on(shutdown))
        try:
            await self._pump()
        finally:
            watcher.cancel()
            await self._wait_in_flight(shutdown)

    def _start_consuming(self, channel: Channel, done: Callable[..., None]) -> None:
        self._consumer_tag = channel.basic_consume(self.config.queue, self._on_message, callback=done)

    # -- the pump: deliveries in, outcomes out ---------------------------------

    def _on_message(self, _channel: Channel, method: Basic.Deliver, properties: BasicProperties, body: bytes) -> None:
        self._inbox.put_nowait(Delivery(method.delivery_tag, properties, body))

    async def _pump(self) -> None:
        """Process messages in arrival order until stopped or disconnected.

        Messages that are already waiting go to the user thread together, so
        the cost of the hand-over is paid once per batch, not per message.
        """
        pending: deque[Delivery] = deque()
        stopping = False
        while not self._lost:
            if not pending and not stopping:
                stopping = self._take(await self._inbox.get(), pending)
            while not stopping and not self._inbox.empty():
                stopping = self._take(self._inbox.get_nowait(), pending)
            if self._lost or not pending or self._past_drain_deadline():
                return  # what is still in hand goes back to the queue on close
            await self._process(pending)

    def _take(self, item: Any, pending: deque[Delivery]) -> bool:
        """Queue a delivery for processing; True when a stop signal arrived instead."""
        if item is _Signal.STOP or item is _Signal.LOST:
            return True
        pending.append(item)
        return False

    def _past_drain_deadline(self) -> bool:
        return self._drain_deadline is not None and asyncio.get_running_loop().time() > self._drain_deadline

    async def _process(self, pending: deque[Delivery]) -> None:
        """Run user code on a prefix of `pending` and publish the outcomes."""
        batch = [(delivery.body, delivery.headers) for delivery in pending]
        results: list[tuple[Outcome, float]] = []
        call = asyncio.ensure_future(self.user_thread.call(self._handle_batch, batch, results))
        stuck_at = await self._watch(call)
        for outcome, started in results[:stuck_at]:
            delivery = pending.popleft()
            if self._lost:
                return  # the broker requeues it; nothing to publish on
            self._acker_().track(delivery.tag)
            # Published now, confirmed later: the next message does not wait.
            self._publish_outcome(delivery, outcome, started)
        if stuck_at is not None and not self._lost:
            self._give_up_on(pending.popleft())

    async def _watch(self, call: asyncio.Future[Any]) -> int | None:
        """Wait for the batch; the index of its message whose `process` ran
        out of time, or None when the batch finished."""
        limit = self.config.process_timeout_s
        if limit <= 0:
            await call
            return None
        while True:
            done, _ = await asyncio.wait({call}, timeout=_WATCH_INTERVAL_S)
            if done:
                call.result()  # an internal error of the batch surfaces here
                return None
            current = self._current
            if current is not None and time.monotonic() - current[1] > limit:
                # The thread may finish this message any moment now; it is
                # given up on regardless, and stops after it.
                self._stop_requested.set()
                return current[0]

    def _give_up_on(self, delivery: Delivery) -> None:
        """Send the message `process` hangs on to `errors`, then end the session."""
        limit = self.config.process_timeout_s
        frames = self._user_frames(self.user_thread.where(frames=12))
        place = f" at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""
        reason = f"process() did not return within {limit:g}s for message {delivery.message_id}{place}"
        where = "It was running:\n" + "".join(traceback.format_list(frames)) if frames else ""
        outcome = processing.timed_out(delivery.body, delivery.headers, reason, where, self.context)
        self._acker_().track(delivery.tag)
        self._publish_outcome(delivery, outcome, time.perf_counter() - limit)
        raise ProcessStuck(f"{reason}; restarting to get the worker's thread back")

    def _user_frames(self, frames: list[traceback.FrameSummary]) -> list[traceback.FrameSummary]:
        """From the first frame of the user's code inward, with the user's
        files named as in the archive; all of `frames` if none is the user's."""
        first = None
        for index, frame in enumerate(frames):
            if frame.filename.startswith(f"{self.code.root}{os.sep}"):
                frame.filename = os.path.relpath(frame.filename, self.code.root)
                first = index if first is None else first
        return frames[first:] if first is not None else frames

    def _handle_batch(
        self, batch: list[tuple[bytes, dict[str, Any]]], results: list[tuple[Outcome, float]]
    ) -> list[tuple[Outcome, float]]:
        """On the user thread: process messages in order until the batch is done
        or its time is up, appending to `results` as each one is done."""
        batch_started = time.perf_counter()
        for index, (body, headers) in enumerate(batch):
            started = time.perf_counter()
            self._current = (index, time.monotonic())
            results.append((processing.handle(body, headers, self.code.function, self.context), started))
            # Slow code must not hold every result back until the whole
            # batch is done, nor delay a shutdown by more than one message.
            if self._stop_requested.is_set() or time.perf_counter() - batch_started > _MAX_BATCH_S:
                break
        self._current = None
        return results

    # -- publishing and what each confirm leads to ------------------------------

    def _publish_outcome(self, delivery: Delivery, outcome: Outcome, started: float) -> None:
        if outcome.verdict == processing.RETRY:
            self._publish_retry(delivery, outcome, started)
        else:
            routing_key = outcome.routing_key or ""
            self._publish(_Publish(delivery, outcome, started, _RESULT, outcome.verdict, routing_key, outcome.body, True))

    def _publish_retry(self, delivery: Delivery, outcome: Outcome, started: float) -> None:
        if outcome.attempt >= self.config.max_attempts:
            self._publish_to_errors(delivery, outcome, started, processing.DEAD_LETTERED, outcome.error or "")
            return
        headers = _passed_on(delivery.headers)
        headers[processing.ATTEMPT_HEADER] = outcome.attempt + 1
        headers[processing.LAST_ERROR_HEADER] = (outcome.error or "")[:500]
        properties = BasicProperties(
            message_id=delivery.message_id,
            content_type=delivery.properties.content_type,
            headers=headers,
            delivery_mode=_PERSISTENT,
            expiration=str(self.config.retry_delay_ms),
        )
        # Through the default exchange, straight into the retry queue.
        record = _Publish(delivery, outcome, started, _RETRY, processing.RETRY, self.config.retry_queue, delivery.body, True)
        self._publish(record, exchange="", properties=properties)

    def _publish_to_errors(self, delivery: Delivery, outcome: Outcome, started: float, verdict: str, reason: str) -> None:
        attempted = _json_or_text(outcome.body) if outcome.body else None
        document = processing.error_document(
            _json_or_text(delivery.body), attempted, reason, outcome.attempt, self.context
        )
        # Not mandatory: if nobody listens on `errors` there is nowhere left
        # to send it; the log line still carries the reason.
        self._publish(_Publish(delivery, outcome, started, _ERRORS, verdict, ERRORS_ROUTING_KEY, document, False))

    def _publish(self, record: _Publish, exchange: str | None = None, properties: BasicProperties | None = None) -> None:
        properties = properties or self._forwarded_properties(record.delivery)
        try:
            self._channel_().basic_publish(
                self.config.exchange if exchange is None else exchange,
                record.routing_key,
                record.body,
                properties,
                mandatory=record.mandatory,
            )
        except (pika.exceptions.AMQPError, AssertionError) as exc:
            # The channel is already gone: the broker redelivers the input.
            self._log(record.delivery, _with_error(record.outcome, repr(exc)), REQUEUED, record.started)
            return
        # Confirms number every publish on the channel from 1, in order.
        self._publish_seq += 1
        self._unconfirmed[self._publish_seq] = record

    def _forwarded_properties(self, delivery: Delivery) -> BasicProperties:
        headers = _passed_on(delivery.headers)
        headers["timestamp"] = int(time.time() * 1000)
        return BasicProperties(
            message_id=delivery.message_id,
            content_type="application/json",
            headers=headers,
            delivery_mode=_PERSISTENT,
        )

    def _on_confirm(self, frame: Any) -> None:
        """Basic.Ack / Basic.Nack from the broker, for one publish or (multiple) all up to a tag."""
        method = frame.method
        acked = isinstance(method, Basic.Ack)
        if method.multiple:
            settled = []
            for seq in self._unconfirmed:  # in publish order
                if seq > method.delivery_tag:
                    break
                settled.append(seq)
        else:
            settled = [method.delivery_tag]
        for seq in settled:
            record = self._unconfirmed.pop(seq, None)
            if record is not None:
                self._confirmed(record, acked)

    def _on_return(self, _channel: Channel, method: Basic.Return, _properties: BasicProperties, body: bytes) -> None:
        """A mandatory publish no queue was bound for; its confirm follows this."""
        # Returns carry no publish number; the routing key and body identify it.
        for record in self._unconfirmed.values():
            if record.mandatory and not record.returned and record.routing_key == method.routing_key and record.body == body:
                record.returned = True
                return

    def _confirmed(self, record: _Publish, acked: bool) -> None:
        delivery, outcome, started = record.delivery, record.outcome, record.started
        if record.stage == _RESULT and not acked:
            # The broker refused the publish: a failure that may pass.
            self._publish_retry(delivery, _with_error(outcome, "publish refused by the broker"), started)
        elif record.stage == _RESULT and record.returned:
            reason = (
                f"no queue is bound to routing key {record.routing_key!r} on exchange {self.config.exchange!r}: "
                "the next pipeline step does not exist or is not running"
            )
            self._publish_to_errors(delivery, outcome, started, UNROUTABLE, reason)
        elif acked and not record.returned:
            self._settle(delivery, outcome, record.verdict, started, ack=True)
        else:
            # The retry queue or `errors` refused it: hand the input back.
            self._settle(delivery, _with_error(outcome, f"{record.stage} publish refused"), REQUEUED, started, ack=False)

    def _settle(self, delivery: Delivery, outcome: Outcome, verdict: str, started: float, *, ack: bool) -> None:
        self._acker_().settle(delivery.tag, ack)
        self._log(delivery, outcome, verdict, started)

    # -- lifecycle -------------------------------------------------------------

    async def _stop_on(self, shutdown: asyncio.Event) -> None:
        """On shutdown: stop deliveries, then let the pump finish what it holds."""
        await shutdown.wait()
        self.readiness.set(consumer_attached=False)
        self._stop_requested.set()
        self._drain_deadline = asyncio.get_running_loop().time() + self.config.shutdown_grace_s / 2
        try:
            channel = self._channel_()
            await asyncio.wait_for(
                self._rpc(lambda done: channel.basic_cancel(self._consumer_tag, callback=done)), timeout=1.0
            )
        except BROKER_ERRORS:
            pass  # the close that follows stops deliveries as well
        self._inbox.put_nowait(_Signal.STOP)

    async def _wait_in_flight(self, shutdown: asyncio.Event) -> None:
        """Give unconfirmed publishes time to be confirmed, then send the last acks."""
        deadline = time.monotonic() + (self.config.shutdown_grace_s / 2 if shutdown.is_set() else 1.0)
        while self._unconfirmed and not self._lost and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._acker is not None and not self._lost:
            self._acker.flush()

    async def _close(self) -> None:
        self._closing = True
        connection = self._connection
        if connection is None or connection.is_closed:
            return
        closed = self._waiter()
        self._closed_waiter = closed
        if not connection.is_closing:
            connection.close()
        try:
            await asyncio.wait_for(closed, timeout=2.0)
        except (*BROKER_ERRORS, asyncio.CancelledError):
            pass

    def _on_connection_closed(self, _connection: AsyncioConnection, reason: BaseException) -> None:
        if self._closed_waiter is not None:
            _resolve(self._closed_waiter, None)
        self._lost_with(BrokerLost(f"connection closed: {reason!r}"))

    def _on_channel_closed(self, _channel: Channel, reason: BaseException) -> None:
        code = getattr(reason, "reply_code", None)
        if not self._consuming and code in _TOPOLOGY_REPLY_CODES:
            error: Exception = TopologyError(f"the broker refused the worker's exchange or queues: {reason!r}")
        else:
            error = BrokerLost(f"channel closed: {reason!r}")
        self._lost_with(error)
        connection = self._connection
        if connection is not None and not (connection.is_closed or connection.is_closing):
            connection.close()  # a fresh connection gets a fresh channel

    def _on_cancelled(self, *_: Any) -> None:
        # The broker cancelled our consumer (the queue was deleted): end the
        # session so the next one declares the queue again.
        logs.event("consumer_cancelled_by_broker", level=30, queue=self.config.queue)
        self._lost_with(BrokerLost("consumer cancelled by the broker"))
        connection = self._connection
        if connection is not None and not (connection.is_closed or connection.is_closing):
            connection.close()

    def _lost_with(self, error: Exception) -> None:
        for waiter in list(self._waiters):
            _fail(waiter, error)
        if self._lost:
            return
        if not self._closing and self._consuming:
            logs.event("broker_connection_lost", level=30, error=str(error))
        self._lost = True
        self.readiness.set(consumer_attached=False)
        for record in self._unconfirmed.values():
            self._log(record.delivery, _with_error(record.outcome, str(error)), REQUEUED, record.started)
        self._unconfirmed.clear()
        self._inbox.put_nowait(_Signal.LOST)

    # -- small helpers -----------------------------------------------------------

    def _waiter(self) -> asyncio.Future[Any]:
        """A future that fails if the connection or channel goes away first."""
        future = asyncio.get_running_loop().create_future()
        self._waiters.add(future)
        future.add_done_callback(self._waiters.discard)
        return future

    async def _rpc(self, start: Callable[[Callable[..., None]], Any]) -> tuple[Any, ...]:
        """Start a callback-style pika call and wait for its callback's arguments."""
        if self._lost:
            raise BrokerLost("connection closed")
        future = self._waiter()
        start(lambda *args: _resolve(future, args))
        return await asyncio.wait_for(future, timeout=_RPC_TIMEOUT_S)

    def _channel_(self) -> Channel:
        if self._channel is None:
            raise BrokerLost("no channel")
        return self._channel

    def _acker_(self) -> "_Acker":
        assert self._acker is not None, "opened before consuming"
        return self._acker

    def _log(self, delivery: Delivery, outcome: Outcome, verdict: str, started: float) -> None:
        fields: dict[str, Any] = {
            "outcome": verdict,
            "duration_ms": round((time.perf_counter() - started) * 1000, 3),
            "tracing_id": outcome.tracing_id,
            "worker_id": self.config.worker_id,
            "revision": self.config.revision,
            "routing_key": outcome.routing_key,
            "message_id": delivery.message_id,
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
    frame per message. Settled tags are collected and, once per event-loop
    turn, everything settled from the oldest outstanding tag on is
    acknowledged with one frame. A message handed back (nack) is sent at once,
    before any `multiple` ack that could cover its tag.
    """

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._outstanding: deque[int] = deque()
        self._settled: set[int] = set()
        self._flush_scheduled = False

    def track(self, tag: int) -> None:
        self._outstanding.append(tag)

    def settle(self, tag: int, ack: bool) -> None:
        if not ack:
            self._send(lambda: self._channel.basic_nack(tag, requeue=True))
        self._settled.add(tag)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            # Runs after the other settles of the same confirm batch.
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        highest = None
        while self._outstanding and self._outstanding[0] in self._settled:
            highest = self._outstanding.popleft()
            self._settled.discard(highest)
        if highest is not None:
            tag = highest
            self._send(lambda: self._channel.basic_ack(tag, multiple=True))

    @staticmethod
    def _send(frame: Callable[[], None]) -> None:
        try:
            frame()
        except pika.exceptions.AMQPError:
            pass  # the channel is gone: the broker requeues whatever was not acked


def _resolve(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


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
