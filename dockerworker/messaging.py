"""Consuming the worker's queue for as long as the worker runs: sessions and reconnects.

Owns: the loop of connection lives (one `Session` each), run as plain code
that drives the `reactor` until what it waits for happens; the backoff between
them, readiness (`consumer_attached`), the shutdown sequence, and the
periodic `messages` summary line. One session wires an `amqp.Bridge` (the
broker side) to a `pump.Pump` (the message path and its acknowledgements).

Architecture Invariant: the rule that makes the runtime lossless, **an input
is acknowledged only after the broker confirmed the publish of its result**,
is kept by `pump` and `ledger`; this module only opens, closes and
reconnects, and a close never acknowledges anything that was not confirmed
(unacknowledged inputs go back to the queue with the connection).

Must not do: speak AMQP (that is `amqp`), touch a message (that is `pump`).
"""

from __future__ import annotations

import threading
import time

from . import logs
from .amqp import BROKER_ERRORS, CLOSE_TIMEOUT_S, Bridge, BrokerLost, Stopped, TopologyError
from .codeload import UserCode
from .config import Config
from .health import Readiness
from .pump import ProcessStuck, Pump, Stats
from .reactor import Reactor
from .recording import Recorder
from .userthread import UserThread

__all__ = ["BROKER_ERRORS", "BrokerLost", "ProcessStuck", "Session", "TopologyError", "run"]

_FIRST_RECONNECT_DELAY_S = 0.5
_MAX_RECONNECT_DELAY_S = 30.0
# Without a shutdown, what a lost session waits for its confirms.
_LOST_CONFIRM_WAIT_S = 1.0
# A shutdown's steps all end within WORKER_SHUTDOWN_GRACE_S of the signal:
# stopping deliveries takes at most a quarter of it (and 1 s), closing the
# connection the last `_CLOSE_S`, and the confirms of what was finished at
# least the `_CONFIRMS_S` before that; `process` has the rest, and the inputs
# it did not finish go back to the queue with the close.
_CLOSE_S = 0.5
_CONFIRMS_S = 0.5


def run(config: Config, code: UserCode, readiness: Readiness, reactor: Reactor, shutdown: threading.Event) -> None:
    """Consume until `shutdown` is set, reconnecting with backoff whenever the broker goes away.

    Whoever sets `shutdown` wakes the reactor (`Reactor.wake`)."""
    user_thread = UserThread()
    stats = Stats()
    # One for the process: what a lost connection's pump had not sent yet, the next one sends.
    recorder = Recorder(config.worker_id, config.record_keep) if config.record_keep > 0 else None
    if config.stats_interval_s > 0:
        _report(reactor, stats, config.stats_interval_s)
    delay = _FIRST_RECONNECT_DELAY_S
    try:
        while not shutdown.is_set():
            session = Session(config, code, readiness, user_thread, stats, reactor, recorder)
            try:
                session.run(shutdown)
            except Stopped:
                break
            except TopologyError:
                raise
            except BROKER_ERRORS as exc:
                logs.event(
                    "broker_unavailable", level=logs.WARNING, error=f"{type(exc).__name__}: {exc}",
                    retry_in_s=round(delay, 2),
                )
            if session.attached:
                delay = _FIRST_RECONNECT_DELAY_S  # it worked for a while: start the backoff again
            if shutdown.is_set():
                break
            reactor.run_until(shutdown.is_set, delay)
            delay = min(delay * 2, _MAX_RECONNECT_DELAY_S)
    finally:
        _log_stats(stats, None)


class Session:
    """One connection's life: open, consume, pump, and a clean close."""

    def __init__(
        self,
        config: Config,
        code: UserCode,
        readiness: Readiness,
        user_thread: UserThread,
        stats: Stats,
        reactor: Reactor,
        recorder: Recorder | None = None,
    ) -> None:
        self.config = config
        self.readiness = readiness
        self.reactor = reactor
        self.attached = False
        self.pump = Pump(config, code, user_thread, stats, reactor, recorder)
        # Set by a shutdown: when everything must be done.
        self.deadline: float | None = None

    def run(self, shutdown: threading.Event) -> None:
        pump, reactor = self.pump, self.reactor
        bridge = Bridge(self.config, pump, reactor, abort=shutdown.is_set)
        try:
            bridge.open()
            bridge.consume()
            self.attached = True
            # Logged first: what reads the log after the ready report finds it there.
            logs.event("consuming", queue=self.config.queue, exchange=self.config.exchange, prefetch=self.config.prefetch)
            self.readiness.set(consumer_attached=True)
            pump.start(bridge)
            try:
                reactor.run_until(lambda: pump.finished or shutdown.is_set())
                if shutdown.is_set() and not pump.finished:
                    self._stop(bridge)
                pump.finish()  # raises ProcessStuck once its message is published to `errors`
            finally:
                self.readiness.set(consumer_attached=False)
                pump.wait_confirms(self._left(_CLOSE_S) if self.deadline is not None else _LOST_CONFIRM_WAIT_S)
        finally:
            self.readiness.set(consumer_attached=False)
            bridge.close(timeout_s=_CLOSE_S if self.deadline is not None else CLOSE_TIMEOUT_S)

    def _stop(self, bridge: Bridge) -> None:
        """On shutdown: stop deliveries, then let the pump finish what it holds, all within the grace period."""
        grace_s = self.config.shutdown_grace_s
        self.deadline = time.monotonic() + grace_s
        self.readiness.set(consumer_attached=False)
        bridge.cancel(timeout_s=min(1.0, grace_s / 4))
        self.pump.stop(grace_s=self._left(_CLOSE_S + _CONFIRMS_S))
        if not self.reactor.run_until(lambda: self.pump.finished, self._left(_CLOSE_S + _CONFIRMS_S)):
            # A `process` that never returns must not hold the exit: its
            # input, and what came after it, go back to the queue with the close.
            logs.event("shutdown_timeout", level=logs.WARNING, grace_s=grace_s)
            self.pump.handover.abandon()

    def _left(self, keep_s: float) -> float:
        """The seconds until the shutdown's deadline, less `keep_s` for the steps after this one."""
        assert self.deadline is not None, "set by _stop"
        return max(0.0, self.deadline - keep_s - time.monotonic())


def _report(reactor: Reactor, stats: Stats, interval_s: float) -> None:
    """One `messages` line with the count per outcome, `interval_s` after the
    first message counted since the last line. An idle worker's reporter
    has no timer: it waits until a message comes, rather than waking every
    `interval_s` to find nothing to say."""

    def counted() -> None:
        started = time.monotonic()
        reactor.call_later(interval_s, lambda: report(started))

    def report(started: float) -> None:
        _log_stats(stats, time.monotonic() - started)
        stats.when_counted(counted)

    stats.when_counted(counted)


def _log_stats(stats: Stats, interval_s: float | None) -> None:
    counts = stats.take()
    total = sum(counts.values())
    if not total:
        return
    fields: dict[str, float] = {verdict.value: count for verdict, count in sorted(counts.items())}
    if interval_s:
        fields.update(per_s=round(total / interval_s, 1), interval_s=round(interval_s, 1))
    logs.event("messages", logs.INFO, total=total, **fields)
