"""Consuming the worker's queue for as long as the worker runs: sessions and reconnects.

Owns: the loop of connection lives (one `Session` each), the backoff between
them, readiness (`consumer_attached`), the shutdown sequence, and the
periodic `messages` summary line. One session wires an `amqp.Bridge` (the
pika side) to a `pump.Pump` (the message path and its acknowledgements).

Architecture Invariant: the rule that makes the runtime lossless, **an input
is acknowledged only after the broker confirmed the publish of its result**,
is kept by `pump` and `ledger`; this module only opens, closes and
reconnects, and a close never acknowledges anything that was not confirmed
(unacknowledged inputs go back to the queue with the connection).

Must not do: call pika (that is `amqp`), touch a message (that is `pump`).
"""

from __future__ import annotations

import asyncio
import time

from . import logs
from .amqp import BROKER_ERRORS, Bridge, BrokerLost, TopologyError
from .codeload import UserCode
from .config import Config
from .health import Readiness
from .pump import ProcessStuck, Pump, Stats
from .recording import Recorder
from .userthread import UserThread

__all__ = ["BROKER_ERRORS", "BrokerLost", "ProcessStuck", "Session", "TopologyError", "run"]

_FIRST_RECONNECT_DELAY_S = 0.5
_MAX_RECONNECT_DELAY_S = 30.0
# Without a shutdown, what a lost session waits for its confirms.
_LOST_CONFIRM_WAIT_S = 1.0


async def run(config: Config, code: UserCode, readiness: Readiness, shutdown: asyncio.Event) -> None:
    """Consume until `shutdown` is set, reconnecting with backoff whenever the broker goes away."""
    user_thread = UserThread()
    stats = Stats()
    # One for the process: what a lost connection's pump had not sent yet, the next one sends.
    recorder = Recorder(config.worker_id, config.record_keep) if config.record_keep > 0 else None
    reporter = asyncio.ensure_future(_report(stats, config.stats_interval_s)) if config.stats_interval_s > 0 else None
    delay = _FIRST_RECONNECT_DELAY_S
    try:
        while not shutdown.is_set():
            session = Session(config, code, readiness, user_thread, stats, recorder)
            try:
                await session.run(shutdown)
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
            await _sleep_unless(shutdown, delay)
            delay = min(delay * 2, _MAX_RECONNECT_DELAY_S)
    finally:
        if reporter is not None:
            reporter.cancel()
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
        recorder: Recorder | None = None,
    ) -> None:
        self.config = config
        self.readiness = readiness
        self.attached = False
        self.pump = Pump(config, code, user_thread, stats, recorder)
        self.bridge = Bridge(config, self.pump)

    async def run(self, shutdown: asyncio.Event) -> None:
        try:
            await self.bridge.open()
            await self.bridge.consume()
            self.attached = True
            self.readiness.set(consumer_attached=True)
            logs.event("consuming", queue=self.config.queue, exchange=self.config.exchange, prefetch=self.config.prefetch)
            watcher = asyncio.ensure_future(self._stop_on(shutdown))
            try:
                await self.pump.run(self.bridge)
            finally:
                watcher.cancel()
                self.readiness.set(consumer_attached=False)
                grace = self.config.shutdown_grace_s / 2 if shutdown.is_set() else _LOST_CONFIRM_WAIT_S
                await self.pump.wait_confirms(grace)
        finally:
            self.readiness.set(consumer_attached=False)
            await self.bridge.close()

    async def _stop_on(self, shutdown: asyncio.Event) -> None:
        """On shutdown: stop deliveries, then let the pump finish what it holds."""
        await shutdown.wait()
        self.readiness.set(consumer_attached=False)
        await self.bridge.cancel()
        self.pump.stop(grace_s=self.config.shutdown_grace_s / 2)


async def _report(stats: Stats, interval_s: float) -> None:
    """One `messages` line with the count per outcome, `interval_s` after the
    first message counted since the last line. An idle worker's reporter
    sleeps until a message comes, rather than waking every `interval_s` to
    find nothing to say."""
    while True:
        await stats.counted()
        started = time.monotonic()
        await asyncio.sleep(interval_s)
        _log_stats(stats, time.monotonic() - started)


def _log_stats(stats: Stats, interval_s: float | None) -> None:
    counts = stats.take()
    total = sum(counts.values())
    if not total:
        return
    fields: dict[str, float] = {verdict.value: count for verdict, count in sorted(counts.items())}
    if interval_s:
        fields.update(per_s=round(total / interval_s, 1), interval_s=round(interval_s, 1))
    logs.event("messages", logs.INFO, total=total, **fields)


async def _sleep_unless(event: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(event.wait(), timeout=seconds)
    except asyncio.TimeoutError:
        pass
