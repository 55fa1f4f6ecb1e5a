"""The pump: deliveries in, user code on its thread, results out, acks after confirms.

Owns: the path of every message through one connection's life: taking
deliveries in arrival order, handing them to the user thread (through
`handover`), publishing each outcome (next step, `errors`, or the retry
queue), acting on each confirm (a refused or unroutable result becomes a
retry or an error), the acknowledgements (through `ledger`), the per-message log line, the
process timeout, and the drain at shutdown. It talks to the broker only
through an `Outlet` (the `amqp.Bridge`, or a scripted one in tests) and is
its `Listener`.

Architecture Invariant: **an input is acknowledged only after the broker
confirmed the publish of its result**. If the connection dies first, the
input stays unacknowledged and the broker redelivers it: delivery is
at-least-once. At most `prefetch` inputs are in hand (the broker's bound),
so at most `prefetch` publishes await a confirm.

Throughput comes from pipelining, not from parallel user code: `process`
runs for one message at a time, in arrival order, on one thread; each result
is published the next time the loop runs, and the next message is taken
without waiting for confirms. Every method runs on the reactor's thread;
what the user thread shares with it is all in `handover`.

A `process` that has not returned after `process_timeout_s` cannot be
stopped (Python cannot kill a thread): its message goes to `errors` with
where the thread was, the messages before it are settled as usual, and the
pump ends with `ProcessStuck` so that the worker exits and is restarted; the
messages after it go back to the queue unacknowledged.

Must not do: speak AMQP (that is `amqp`), decide what user code's result
means (that is `processing`).
"""

from __future__ import annotations

import enum
import json
import os
import time
import traceback
from collections import Counter
from typing import Any, Callable, Protocol

import orjson

from . import logs, processing
from .amqp import BrokerLost, Delivery, Unpublishable
from .codeload import UserCode
from .config import ERRORS_ROUTING_KEY, Config
from .handover import Handover
from .ledger import Ledger
from .processing import Outcome, Verdict
from .reactor import Reactor, Timer
from .recording import BATCH_HEADER, FLUSH_S, Recorder, queue_of
from .userthread import UserThread

# How often the user thread is checked against the process timeout, while
# it has messages in hand (an idle worker's watchdog sleeps until one comes).
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


class _Publish:
    """A publish waiting for its confirm, and the input it settles."""

    __slots__ = (
        "delivery", "outcome", "started", "kind", "verdict", "routing_key", "body", "mandatory", "returned",
        "headers_passed_on",
    )

    def __init__(
        self,
        delivery: Delivery,
        outcome: Outcome,
        started: float,
        kind: PublishKind,
        verdict: Verdict,
        routing_key: str,
        body: bytes,
        mandatory: bool,
    ) -> None:
        self.delivery = delivery
        self.outcome = outcome
        self.started = started
        self.kind = kind
        self.verdict = verdict
        self.routing_key = routing_key
        self.body = body
        self.mandatory = mandatory
        self.returned = False  # a return came for it (unroutable)
        self.headers_passed_on = True  # False: an `errors` publish without the input's headers


class Stats:
    """Messages settled per verdict since the last report (read by `messaging`)."""

    def __init__(self) -> None:
        self.counts: Counter[Verdict] = Counter()
        self._waiter: Callable[[], None] | None = None

    def add(self, verdict: Verdict) -> None:
        self.counts[verdict] += 1
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter()

    def take(self) -> Counter[Verdict]:
        counts, self.counts = self.counts, Counter()
        return counts

    def when_counted(self, callback: Callable[[], None]) -> None:
        """Call `callback` once a message has been counted since the last
        `take` (at once if one has): an idle worker's reporter waits here,
        with no timer."""
        if self.counts:
            callback()
        else:
            self._waiter = callback


class Pump:
    """The message path of one connection; see the module's invariant."""

    def __init__(
        self,
        config: Config,
        code: UserCode,
        user_thread: UserThread,
        stats: Stats,
        reactor: Reactor,
        recorder: Recorder | None = None,
    ) -> None:
        self.config = config
        self.reactor = reactor
        self.code = code
        self.user_thread = user_thread
        self.stats = stats
        self.recorder = recorder
        self._records_scheduled = False
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
        self._flush_scheduled = False
        # All that the user thread shares with the loop is in there.
        self.handover = Handover(code.function, self.context, reactor, on_results=self._take_done)
        self._stuck: Delivery | None = None
        # The thread never took this pump's messages: it is still in a
        # `process` of an earlier connection's (see `_watch`).
        self._stuck_before = False
        # Set when the pump must end: the job ended, the broker went away, or
        # the watchdog gave up on a message; `failure` when the job raised.
        self.finished = False
        self.failure: BaseException | None = None
        self._watchdog: Timer | None = None

    # -- the Listener side (called by the bridge) -------------------------------------

    def on_delivery(self, delivery: Delivery) -> None:
        self.handover.give(delivery)
        if self.handover.has_results:
            self._take_done()

    def on_confirm(self, seq: int, multiple: bool, acked: bool) -> None:
        for record in self.ledger.confirmed(seq, multiple):
            self._confirmed(record, acked)
        if self.handover.has_results:
            self._take_done()

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
        self.handover.abandon()
        self._finish()

    # -- the loop ------------------------------------------------------------------

    def start(self, outlet: Outlet) -> None:
        """Process messages in arrival order until stopped or disconnected
        (`finished`; then `finish`).

        One job on the user thread (`Handover.serve`) takes deliveries as
        they come and leaves their results; the loop publishes them whenever
        it runs (a confirm, a delivery, or the user thread's wake-up).
        """
        self.outlet = outlet
        self.user_thread.submit(self.handover.serve, done=self._on_job_done, reactor=self.reactor)
        if self.config.process_timeout_s > 0:
            self._watch()

    def finish(self) -> None:
        """After `finished`: publish what is left; raise what ended the pump
        (an internal error, or `ProcessStuck` after sending its message to `errors`)."""
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._take_done()
        if self.failure is not None:
            raise self.failure
        if self._stuck is not None and self.lost is None:
            self._give_up_on(self._stuck)
        if self._stuck_before:
            raise ProcessStuck(
                f"process() has not returned for more than {self.config.process_timeout_s:g}s, on a message of a "
                "connection that is gone (the broker requeued it); restarting to get the worker's thread back"
            )

    def stop(self, grace_s: float) -> None:
        """Finish what is in hand within `grace_s`, then become `finished`."""
        self.handover.end(deadline=time.monotonic() + grace_s)

    def wait_confirms(self, timeout_s: float) -> None:
        """Give unconfirmed publishes time to be confirmed, then send the last
        ack, and what the recording has not sent yet."""
        self.reactor.run_until(lambda: not self.ledger.awaiting_confirm or self.lost is not None, timeout_s)
        if self.lost is None:
            self._flush()
            self._send_records()

    def _finish(self) -> None:
        self.finished = True

    def _on_job_done(self, _result: Any, error: BaseException | None) -> None:
        if self.finished:
            return
        self.failure = error  # an internal error
        self.finished = True

    def _take_done(self) -> None:
        """Publish the results the user thread has left, in delivery order."""
        for delivery, outcome, started in self.handover.results():
            if self.lost is not None or delivery is self._stuck:
                continue  # the broker requeues it; or it is given up on
            self.ledger.received(delivery.tag)
            # Published now, confirmed later: the next message does not wait.
            self._publish_outcome(delivery, outcome, started)

    # -- the process timeout ----------------------------------------------------------

    def _watch(self) -> None:
        """Check the user thread against the process timeout every
        `WATCH_INTERVAL_S` while it has messages in hand; while idle, no
        timer: the next delivery starts the watch again."""
        self._watchdog = None
        if self.finished:
            return
        if not self.handover.in_hand:
            self.handover.when_given(self._watch)
            return
        current, now, limit = self.handover.current, time.monotonic(), self.config.process_timeout_s
        if current is not None and now - current[1] > limit:
            # The thread may finish this message any moment now; it is
            # given up on regardless, and takes no other.
            self._stuck = current[0]
            self.handover.abandon()
            self._finish()
            return
        stopping = self.handover.deadline is not None  # what the thread did not take by then stays untaken
        if current is None and not stopping and now - self.handover.progress_at > limit + WATCH_INTERVAL_S:
            # Messages in hand, and the thread has taken none of them: it is
            # still in the `process` of a connection that is gone (whose
            # message the broker has requeued), and must be got back.
            self._stuck_before = True
            self.handover.abandon()
            self._finish()
            return
        self._watchdog = self.reactor.call_later(WATCH_INTERVAL_S, self._watch)

    def _give_up_on(self, delivery: Delivery) -> None:
        """Send the message `process` hangs on to `errors`, then end the pump."""
        limit = self.config.process_timeout_s
        frames = self._user_frames(self.user_thread.where(frames=12))
        place = f" at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""
        reason = f"process() did not return within {limit:g}s for message {delivery.message_id}{place}"
        where = "It was running:\n" + "".join(traceback.format_list(frames)) if frames else ""
        outcome = processing.timed_out(delivery.body, delivery.headers, reason, where, self.context)
        self._stuck = None
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
            headers = _passed_on(delivery.headers, timestamp=True)
            if outcome.routing_key == ERRORS_ROUTING_KEY:
                headers[processing.ATTEMPT_HEADER] = outcome.attempt
            self._publish(record, self.config.exchange, headers)

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
        document = processing.error_document(_json_or_text(delivery.body), attempted, reason, self.context)
        # Not mandatory: if nobody listens on `errors` there is nowhere left
        # to send it; the log line still carries the reason.
        record = _Publish(delivery, outcome, started, PublishKind.ERRORS, verdict, ERRORS_ROUTING_KEY, document, False)
        headers = _passed_on(delivery.headers, timestamp=True)
        headers[processing.ATTEMPT_HEADER] = outcome.attempt
        self._publish(record, self.config.exchange, headers)

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
        except Unpublishable as exc:
            self._unpublishable(record, exc)
            return
        self.ledger.published(seq, record)

    def _unpublishable(self, record: _Publish, error: Unpublishable) -> None:
        """A publish AMQP cannot carry (a routing key over 255 bytes, say):
        sending it again would fail again, so the message goes to `errors`
        with the reason; failing that, with none of its headers; and if even
        that cannot be sent, it is acknowledged and logged, not redelivered
        for ever."""
        delivery, outcome, started = record.delivery, record.outcome, record.started
        if record.kind is not PublishKind.ERRORS:
            self._publish_to_errors(delivery, outcome, started, Verdict.UNROUTABLE, str(error))
        elif record.headers_passed_on:
            bare = _Publish(delivery, outcome, started, PublishKind.ERRORS, record.verdict, ERRORS_ROUTING_KEY,
                            record.body, False)
            bare.headers_passed_on = False
            self._publish(bare, self.config.exchange, {processing.ATTEMPT_HEADER: outcome.attempt})
        else:
            logs.event(
                "message_dropped", level=logs.ERROR, error=str(error), message_id=delivery.message_id,
                body=logs.clip(delivery.body.decode("utf-8", errors="replace")),
            )
            self._settle(delivery, outcome.with_error(str(error)), Verdict.DEAD_LETTERED, started, ack=True)

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
            self._record(record)
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
            self.reactor.call_soon(self._flush)
        self._log(delivery, outcome, verdict, started)

    def _flush(self) -> None:
        self._flush_scheduled = False
        tag = self.ledger.take_ack()
        if tag is not None and self.outlet is not None and self.lost is None:
            self.outlet.ack(tag, multiple=True)

    # -- the recording (see `recording`) ----------------------------------------------

    def _record(self, record: _Publish) -> None:
        """A settled input and what it produced: kept, and sent within `FLUSH_S`."""
        if self.recorder is None:
            return
        delivery = record.delivery
        # A retry produced nothing yet: the input comes back, and is recorded again.
        output = None if record.kind is PublishKind.RETRY else (record.routing_key, record.body)
        self.recorder.add(delivery.routing_key, delivery.message_id, delivery.body, delivery.headers, output)
        if not self._records_scheduled:
            self._records_scheduled = True
            self.reactor.call_later(FLUSH_S, self._send_records)

    def _send_records(self) -> None:
        self._records_scheduled = False
        if self.recorder is None or self.outlet is None or self.lost is not None:
            return
        batch = self.recorder.batch()
        if batch is None:
            return
        try:
            # Not in the ledger: its confirm settles nothing. Through the
            # default exchange; if workerctl is not recording, no queue takes it.
            self.outlet.publish(
                "",
                queue_of(self.config.worker_id),
                batch,
                message_id=None,
                headers={BATCH_HEADER: 1},
                mandatory=False,
            )
        except BrokerLost:
            pass  # best-effort: the messages themselves are safe

    # -- the log line ----------------------------------------------------------------

    def _log(self, delivery: Delivery, outcome: Outcome, verdict: Verdict, started: float) -> None:
        self.stats.add(verdict)
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
