"""Deliveries to the user thread and results back, with no task, future or wake-up per message.

Owns: everything the reactor's thread and the user thread share. One job
on the user thread (`serve`) takes deliveries from a `queue.SimpleQueue`
and leaves each result in a deque; the loop takes the results whenever it
runs (the pump does so on every confirm and delivery), and the thread wakes
the loop only when it is about to wait, or when results pile up.

Architecture Invariant: the state shared between the two threads is this
class's and nothing else: `_inbox` (loop → thread), `_done` (thread → loop),
and the flags `_signalled`, `_abandoned`, `current` and `progress_at`. Every other method
runs on the reactor's thread; `serve` and what it calls (user code) on the
user thread. Results come out in delivery order.

Must not do: publish, acknowledge or decide (that is `pump`).
"""

from __future__ import annotations

import queue
import time
from collections import deque
from typing import Any, Callable, Iterator

from . import processing
from .amqp import Delivery
from .processing import Context, Outcome
from .reactor import Reactor

# Results the user thread leaves before it wakes the loop (if no confirm or
# delivery has had the loop take them first).
_WAKE_AFTER = 16


class Handover:
    """The inbox of one pump's user-thread job, and the results it leaves."""

    def __init__(
        self, function: Callable[[Any], Any], context: Context, reactor: Reactor, on_results: Callable[[], None]
    ) -> None:
        self.function = function
        self.context = context
        self.reactor = reactor
        self.on_results = on_results  # the loop's side of a wake-up
        self._inbox: queue.SimpleQueue[Delivery | None] = queue.SimpleQueue()
        self._arrived: list[Delivery] = []
        self._hand_over_scheduled = False
        self._done: deque[tuple[Delivery, Outcome, float]] = deque()
        self._signalled = False
        self._abandoned = False
        # Loop side: deliveries given whose results have not been taken yet,
        # and who waits for the next delivery (the pump's watchdog, idle).
        self.in_hand = 0
        self._given: Callable[[], None] | None = None
        # Set by the user thread: the message it is on, and since when
        # (time.monotonic()); None between messages.
        self.current: tuple[Delivery, float] | None = None
        # When a message was last taken or finished by the thread, or given
        # to an idle handover (time.monotonic()): how long the thread has
        # made no progress on what it was given.
        self.progress_at = time.monotonic()
        # After it the thread takes no further message.
        self.deadline: float | None = None

    # -- the loop's side ---------------------------------------------------------------

    def give(self, delivery: Delivery) -> None:
        """Queue a delivery for the user thread.

        Handed over once per loop turn, after every delivery that turn read:
        the thread then wakes once, and does not contend for the GIL while
        the loop is still parsing frames.
        """
        self._arrived.append(delivery)
        if not self.in_hand:
            self.progress_at = time.monotonic()
        self.in_hand += 1
        if not self._hand_over_scheduled:
            self._hand_over_scheduled = True
            self.reactor.call_soon(self._hand_over)
        given, self._given = self._given, None
        if given is not None:
            given()

    def end(self, deadline: float) -> None:
        """Process what was given so far until `deadline`, then end the job."""
        self.deadline = deadline
        self._hand_over()
        self._inbox.put(None)  # later deliveries go back to the queue

    def abandon(self) -> None:
        """Take no further message (the current one's result is dropped)."""
        self._abandoned = True
        self._inbox.put(None)

    @property
    def has_results(self) -> bool:
        return bool(self._done)

    def results(self) -> Iterator[tuple[Delivery, Outcome, float]]:
        """Take the results left so far, in delivery order: (delivery, outcome, perf_counter at start)."""
        done = self._done
        while done:
            self.in_hand -= 1
            yield done.popleft()

    def when_given(self, callback: Callable[[], None]) -> None:
        """Call `callback` at the next delivery given (the loop's side)."""
        self._given = callback

    def _hand_over(self) -> None:
        self._hand_over_scheduled = False
        arrived, self._arrived = self._arrived, []
        for delivery in arrived:
            self._inbox.put(delivery)

    def _on_signal(self) -> None:
        self._signalled = False  # before taking: a result added meanwhile signals again
        self.on_results()

    # -- the user thread's side ---------------------------------------------------------

    def serve(self) -> None:
        """On the user thread: process deliveries in order until ended or abandoned."""
        inbox, done, function, context = self._inbox, self._done, self.function, self.context
        while not self._given_up():
            delivery = inbox.get()
            deadline = self.deadline
            if delivery is None or self._given_up() or (deadline is not None and time.monotonic() > deadline):
                return  # what is still in the inbox goes back to the queue on close
            started = time.perf_counter()
            self.current = (delivery, time.monotonic())
            self.progress_at = self.current[1]
            outcome = processing.handle(delivery.body, delivery.headers, function, context)
            self.current = None
            self.progress_at = time.monotonic()
            if self._given_up():
                return  # the session is over, or the watchdog gave up on this one
            done.append((delivery, outcome, started))
            # Wake the loop when the thread is about to wait, or when results
            # pile up; otherwise the loop's next confirm or delivery takes them.
            if not self._signalled and (inbox.empty() or len(done) >= _WAKE_AFTER):
                self._signalled = True
                try:
                    self.reactor.call_soon_threadsafe(self._on_signal)
                except OSError:
                    return  # the reactor is closed

    def _given_up(self) -> bool:
        # A method, not the attribute: the loop sets it while `serve` runs.
        return self._abandoned
