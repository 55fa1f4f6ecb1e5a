"""The pump: deliveries in, user code on its thread, results out, acks after confirms.

Owns: the path of every message through one connection's life: taking
deliveries in arrival order, handing them to the user thread in batches,
publishing each outcome (next step, `errors`, or the retry queue), acting on
each confirm (a refused or unroutable result becomes a retry or an error),
the acknowledgements (through `ledger`), the per-message log line, the
process timeout, and the drain at shutdown. It talks to the broker only
through an `Outlet` (the `amqp.Bridge`, or a scripted one in tests) and is
its `Listener`.

Architecture Invariant: **an input is acknowledged only after the broker
confirmed the publish of its result**. If the connection dies first, the
input stays unacknowledged and the broker redelivers it: delivery is
at-least-once. At most `prefetch` inputs are in hand (the broker's bound),
so at most `prefetch` publishes await a confirm.

Throughput comes from pipelining, not from parallel user code: `process`
runs for one message at a time, in arrival order, on one thread; results are
published as soon as their batch is done, and the next batch starts without
waiting for confirms. Every method runs on the event-loop thread except
`_handle_batch`, which runs on the user thread and shares only the batch, its
results list and `_current` with the loop.

A `process` that has not returned after `process_timeout_s` cannot be
stopped (Python cannot kill a thread): its message goes to `errors` with
where the thread was, the messages before it are settled as usual, and the
pump ends with `ProcessStuck` so that the worker exits and is restarted; the
messages after it go back to the queue unacknowledged.

Must not do: call pika (that is `amqp`), decide what user code's result
means (that is `processing`).
"""

from __future__ import annotations

import asyncio
import enum
import json
import os
import threading
import time
import traceback
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from . import logs, processing
from .amqp import BrokerLost, Delivery
from .codeload import UserCode
from .config import ERRORS_ROUTING_KEY, Config
from .ledger import Ledger
from .processing import Outcome, Verdict
from .userthread import UserThread

# How long one hand-over to the user thread may keep processing before the
# results so far are published.
MAX_BATCH_S = 0.05
# How often the user thread is checked against the process timeout.
WATCH_INTERVAL_S = 0.5
# Headers that describe this hop's delivery, not the message: not passed on.
_HOP_HEADERS = ("x-delivery-count", "x-death", "x-first-death-", "x-last-death-", "x-workerctl-")


class ProcessStuck(Exception):
    """`process` did not return within `process_timeout_s` (exit code 6): its
    message went to `errors`, and the worker must restart to get its thread back."""


class PublishKind(enum.Enum):
    """What a publish was for, which decides what its confirm leads to."""

    RESULT = "result"  # to the next step (or `errors` for a failure processing decided)
    ERRORS = "errors"  # to `errors`, decided after a confirm (unroutable, out of attempts)
    RETRY = "retry"  # to the retry queue


class Outlet(Protocol):
    """What the pump needs of the broker side (`amqp.Bridge`)."""

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
    ) -> int: ...

    def ack(self, tag: int, *, multiple: bool) -> None: ...

    def nack(self, tag: int) -> None: ...


@dataclass
class _Publish:
    """A publish waiting for its confirm, and the input it settles."""

    delivery: Delivery
    outcome: Outcome
    started: float
    kind: PublishKind
    verdict: Verdict
    routing_key: str
    body: bytes
    mandatory: bool
    returned: bool = False


class Stats:
    """Messages settled per verdict since the last report (read by `messaging`)."""

    def __init__(self) -> None:
        self.counts: Counter[Verdict] = Counter()

    def take(self) -> Counter[Verdict]:
        counts, self.counts = self.counts, Counter()
        return counts


class Pump:
    """The message path of one connection; see the module's invariant."""

    def __init__(self, config: Config, code: UserCode, user_thread: UserThread, stats: Stats) -> None:
        self.config = config
        self.code = code
        self.user_thread = user_thread
        self.stats = stats
        self.context = processing.Context(
            worker_id=config.worker_id,
            queue=config.queue,
            max_attempts=config.max_attempts,
            max_redeliveries=config.max_redeliveries,
            devices_endpoint=config.devices_endpoint,
        )
        self.outlet: Outlet | None = None
        self.ledger: Ledger[_Publish] = Ledger()
        self.lost: Exception | None = None
        self._pending: deque[Delivery] = deque()
        self._wakeup: asyncio.Future[None] | None = None
        self._stopping = False
        self._drain_deadline: float | None = None
        self._flush_scheduled = False
        # The batch the user thread is on: resolved with None when it is
        # done, or by the watchdog with the index of the message that hangs.
        self._batch: asyncio.Future[int | None] | None = None
        # Set by the user thread: which message of the batch it is on, and
        # since when (time.monotonic()); None between batches.
        self._current: tuple[int, float] | None = None
        self._stop_requested = threading.Event()

    # -- the Listener side (called by the bridge) -------------------------------------

    def on_delivery(self, delivery: Delivery) -> None:
        self._pending.append(delivery)
        self._wake()

    def on_confirm(self, seq: int, multiple: bool, acked: bool) -> None:
        for record in self.ledger.confirmed(seq, multiple):
            self._confirmed(record, acked)

    def on_return(self, routing_key: str, body: bytes) -> None:
        # Returns carry no publish number; the routing key and body identify it.
        record = self.ledger.find_unconfirmed(
            lambda r: r.mandatory and not r.returned and r.routing_key == routing_key and r.body == body
        )
        if record is not None:
            record.returned = True

    def on_lost(self, error: Exception, *, expected: bool) -> None:
        if self.lost is not None:
            return
        self.lost = error
        if not expected:
            logs.event("broker_connection_lost", level=logs.WARNING, error=str(error))
        for record in self.ledger.abandon():
            self._log(record.delivery, record.outcome.with_error(str(error)), Verdict.REQUEUED, record.started)
        self._wake()

    # -- the loop ------------------------------------------------------------------

    async def run(self, outlet: Outlet) -> None:
        """Process messages in arrival order until stopped or disconnected.

        Messages that are already waiting go to the user thread together, so
        the cost of the hand-over is paid once per batch, not per message.
        """
        self.outlet = outlet
        watchdog = asyncio.ensure_future(self._watchdog()) if self.config.process_timeout_s > 0 else None
        try:
            while self.lost is None:
                if not self._pending:
                    if self._stopping:
                        return
                    await self._wait()
                    continue
                if self._past_drain_deadline():
                    return  # what is still in hand goes back to the queue on close
                await self._process()
        finally:
            if watchdog is not None:
                watchdog.cancel()

    def stop(self, grace_s: float) -> None:
        """Finish what is in hand within `grace_s`, then return from `run`."""
        self._stopping = True
        self._stop_requested.set()
        self._drain_deadline = time.monotonic() + grace_s
        self._wake()

    async def wait_confirms(self, timeout_s: float) -> None:
        """Give unconfirmed publishes time to be confirmed, then send the last ack."""
        deadline = time.monotonic() + timeout_s
        while self.ledger.awaiting_confirm and self.lost is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self.lost is None:
            self._flush()

    async def _wait(self) -> None:
        self._wakeup = asyncio.get_running_loop().create_future()
        await self._wakeup
        self._wakeup = None

    def _wake(self) -> None:
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    def _past_drain_deadline(self) -> bool:
        return self._drain_deadline is not None and time.monotonic() > self._drain_deadline

    async def _process(self) -> None:
        """Run user code on a prefix of what is pending and publish the outcomes."""
        batch = list(self._pending)
        results: list[tuple[Outcome, float]] = []
        loop = asyncio.get_running_loop()
        self._batch = batch_done = loop.create_future()
        call = self.user_thread.submit(self._handle_batch, batch, results)
        call.add_done_callback(lambda done: _resolve_batch(batch_done, done))
        stuck_at = await batch_done
        self._batch = None
        for outcome, started in results[:stuck_at]:
            delivery = self._pending.popleft()
            if self.lost is not None:
                return  # the broker requeues it; nothing to publish on
            self.ledger.received(delivery.tag)
            # Published now, confirmed later: the next message does not wait.
            self._publish_outcome(delivery, outcome, started)
        if stuck_at is not None and self.lost is None:
            self._give_up_on(self._pending.popleft())

    def _handle_batch(self, batch: list[Delivery], results: list[tuple[Outcome, float]]) -> None:
        """On the user thread: process messages in order until the batch is done
        or its time is up, appending to `results` as each one is done."""
        batch_started = time.perf_counter()
        function, context = self.code.function, self.context
        for index, delivery in enumerate(batch):
            started = time.perf_counter()
            self._current = (index, time.monotonic())
            results.append((processing.handle(delivery.body, delivery.headers, function, context), started))
            # Slow code must not hold every result back until the whole
            # batch is done, nor delay a shutdown by more than one message.
            if self._stop_requested.is_set() or time.perf_counter() - batch_started > MAX_BATCH_S:
                break
        self._current = None

    # -- the process timeout ----------------------------------------------------------

    async def _watchdog(self) -> None:
        limit = self.config.process_timeout_s
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            current, batch = self._current, self._batch
            if current is not None and batch is not None and time.monotonic() - current[1] > limit:
                # The thread may finish this message any moment now; it is
                # given up on regardless, and stops after it.
                self._stop_requested.set()
                if not batch.done():
                    batch.set_result(current[0])

    def _give_up_on(self, delivery: Delivery) -> None:
        """Send the message `process` hangs on to `errors`, then end the pump."""
        limit = self.config.process_timeout_s
        frames = self._user_frames(self.user_thread.where(frames=12))
        place = f" at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""
        reason = f"process() did not return within {limit:g}s for message {delivery.message_id}{place}"
        where = "It was running:\n" + "".join(traceback.format_list(frames)) if frames else ""
        outcome = processing.timed_out(delivery.body, delivery.headers, reason, where, self.context)
        self.ledger.received(delivery.tag)
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

    # -- publishing, and what each confirm leads to -----------------------------------

    def _publish_outcome(self, delivery: Delivery, outcome: Outcome, started: float) -> None:
        if outcome.verdict is Verdict.RETRY:
            self._publish_retry(delivery, outcome, started)
        else:
            record = _Publish(
                delivery, outcome, started, PublishKind.RESULT, outcome.verdict, outcome.routing_key or "",
                outcome.body, True,
            )
            self._publish(record, self.config.exchange, _passed_on(delivery.headers, timestamp=True))

    def _publish_retry(self, delivery: Delivery, outcome: Outcome, started: float) -> None:
        if outcome.attempt >= self.config.max_attempts:
            self._publish_to_errors(delivery, outcome, started, Verdict.DEAD_LETTERED, outcome.error or "")
            return
        headers = _passed_on(delivery.headers, timestamp=False)
        headers[processing.ATTEMPT_HEADER] = outcome.attempt + 1
        headers[processing.LAST_ERROR_HEADER] = (outcome.error or "")[:500]
        record = _Publish(
            delivery, outcome, started, PublishKind.RETRY, Verdict.RETRY, self.config.retry_queue, delivery.body, True
        )
        # Through the default exchange, straight into the retry queue.
        self._publish(
            record, "", headers, content_type=delivery.content_type, expiration=str(self.config.retry_delay_ms)
        )

    def _publish_to_errors(self, delivery: Delivery, outcome: Outcome, started: float, verdict: Verdict, reason: str) -> None:
        attempted = _json_or_text(outcome.body) if outcome.body else None
        document = processing.error_document(
            _json_or_text(delivery.body), attempted, reason, outcome.attempt, self.context
        )
        # Not mandatory: if nobody listens on `errors` there is nowhere left
        # to send it; the log line still carries the reason.
        record = _Publish(delivery, outcome, started, PublishKind.ERRORS, verdict, ERRORS_ROUTING_KEY, document, False)
        self._publish(record, self.config.exchange, _passed_on(delivery.headers, timestamp=True))

    def _publish(
        self,
        record: _Publish,
        exchange: str,
        headers: dict[str, Any],
        content_type: str | None = "application/json",
        expiration: str | None = None,
    ) -> None:
        assert self.outlet is not None, "run() sets the outlet"
        try:
            seq = self.outlet.publish(
                exchange,
                record.routing_key,
                record.body,
                message_id=record.delivery.message_id,
                headers=headers,
                mandatory=record.mandatory,
                content_type=content_type,
                expiration=expiration,
            )
        except BrokerLost as exc:
            # The channel is already gone: the broker redelivers the input.
            self._log(record.delivery, record.outcome.with_error(str(exc)), Verdict.REQUEUED, record.started)
            return
        self.ledger.published(seq, record)

    def _confirmed(self, record: _Publish, acked: bool) -> None:
        delivery, outcome, started = record.delivery, record.outcome, record.started
        if record.kind is PublishKind.RESULT and not acked:
            # The broker refused the publish: a failure that may pass.
            self._publish_retry(delivery, outcome.with_error("publish refused by the broker"), started)
        elif record.kind is PublishKind.RESULT and record.returned:
            reason = (
                f"no queue is bound to routing key {record.routing_key!r} on exchange {self.config.exchange!r}: "
                "the next pipeline step does not exist or is not running"
            )
            self._publish_to_errors(delivery, outcome, started, Verdict.UNROUTABLE, reason)
        elif acked and not record.returned:
            self._settle(delivery, outcome, record.verdict, started, ack=True)
        else:
            # The retry queue or `errors` refused it: hand the input back.
            refused = outcome.with_error(f"{record.kind.value} publish refused")
            self._settle(delivery, refused, Verdict.REQUEUED, started, ack=False)

    def _settle(self, delivery: Delivery, outcome: Outcome, verdict: Verdict, started: float, *, ack: bool) -> None:
        if not ack and self.outlet is not None:
            self.outlet.nack(delivery.tag)  # before any `multiple` ack that could cover its tag
        self.ledger.settle(delivery.tag, acked=ack)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            # Runs after the other settles of the same confirm batch.
            asyncio.get_running_loop().call_soon(self._flush)
        self._log(delivery, outcome, verdict, started)

    def _flush(self) -> None:
        self._flush_scheduled = False
        tag = self.ledger.take_ack()
        if tag is not None and self.outlet is not None and self.lost is None:
            self.outlet.ack(tag, multiple=True)

    # -- the log line ----------------------------------------------------------------

    def _log(self, delivery: Delivery, outcome: Outcome, verdict: Verdict, started: float) -> None:
        self.stats.counts[verdict] += 1
        level = message_level(verdict, outcome)
        if not logs.enabled(level):
            return
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
        logs.event("message", level=level, **fields)


def message_level(verdict: Verdict, outcome: Outcome) -> int:
    """The level of a message's log line: a forwarded message is `debug`
    unless user code printed something (`info`, so that the print is seen);
    every other outcome is a `warning`."""
    if verdict is Verdict.FORWARDED:
        return logs.INFO if outcome.output else logs.DEBUG
    return logs.WARNING


def _resolve_batch(batch_done: asyncio.Future[int | None], call: asyncio.Future[Any]) -> None:
    if batch_done.done():
        return  # the watchdog gave up on it first
    if call.cancelled():
        batch_done.cancel()
    elif call.exception() is not None:
        batch_done.set_exception(call.exception())  # type: ignore[arg-type]
    else:
        batch_done.set_result(None)


def _passed_on(headers: dict[str, Any], *, timestamp: bool) -> dict[str, Any]:
    passed = {key: value for key, value in headers.items() if not key.startswith(_HOP_HEADERS)} if headers else {}
    if timestamp:
        passed["timestamp"] = int(time.time() * 1000)
    return passed


def _json_or_text(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        try:
            return json.loads(body)  # NaN and the like
        except (ValueError, UnicodeDecodeError):
            return body.decode("utf-8", errors="replace")
