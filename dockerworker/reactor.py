"""The event loop of the runtime's main thread, on the standard library's `selectors`.

Owns: waiting for the broker's socket, timers, and calls handed over from
other threads (the user thread's results, a signal), and running the
callbacks they lead to, one at a time, on the thread that runs it.

Why not asyncio: importing it (with the ssl, concurrent.futures, subprocess,
inspect and logging machinery its package brings) cost a worker's start
about 90 ms of CPU over the interpreter's own start, almost all of the
budget the start is held to (docs/benchmarks.md, "The start path"). The
runtime needs four things of a loop: a readable or writable socket, timers,
a thread-safe call, and running until something is true; `selectors` and
a heap give exactly these.

Architecture Invariant: callbacks run only on the thread inside `run_until`,
in the order they were scheduled (timers in the order they fall due); only
`call_soon_threadsafe` and `wake` may be called from another thread. A
signal's callback (`add_signal_handler`) runs on the loop thread too: the
handler itself only notes the signal and wakes the loop, so it cannot
deadlock on a lock the interrupted code holds (a log line's, say), and the
interpreter writes to the loop's wake-up socket whichever thread the signal
reached. A callback's exception ends `run_until` and reaches its
caller: nothing is swallowed.

The sequence of a connection's life stays plain code: `run_until(condition,
timeout)` runs the loop until `condition()` holds (checked after every turn)
or the timeout passes.
"""

from __future__ import annotations

import heapq
import selectors
import signal
import socket
import threading
import time
from collections import deque
from typing import Any, Callable

Callback = Callable[[], None]


class Timer:
    """A call that falls due at `when` (time.monotonic()); `cancel` keeps it from running."""

    __slots__ = ("when", "callback", "cancelled")

    def __init__(self, when: float, callback: Callback) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Reactor:
    """One selector, a timer heap and a queue of calls; see the module's invariant."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._ready: deque[Callback] = deque()
        self._timers: list[tuple[float, int, Timer]] = []
        self._timer_seq = 0
        self._lock = threading.Lock()
        self._from_threads: list[Callback] = []
        self._woken = False
        self._wake_in, self._wake_out = socket.socketpair()
        self._wake_in.setblocking(False)
        self._wake_out.setblocking(False)
        self._handlers: dict[int, list[Callback | None]] = {}
        self._signals: deque[int] = deque()
        self._signal_callbacks: dict[int, Callable[[int], None]] = {}
        self.add_reader(self._wake_in, self._drain_wake)

    # -- scheduling ------------------------------------------------------------------------

    def call_soon(self, callback: Callable[..., None], *args: Any) -> None:
        """Run `callback(*args)` at the next turn (loop thread only)."""
        self._ready.append(_bind(callback, args))

    def call_later(self, delay_s: float, callback: Callable[..., None], *args: Any) -> Timer:
        """Run `callback(*args)` after `delay_s` seconds (loop thread only)."""
        timer = Timer(time.monotonic() + max(0.0, delay_s), _bind(callback, args))
        self._timer_seq += 1
        heapq.heappush(self._timers, (timer.when, self._timer_seq, timer))
        return timer

    def call_soon_threadsafe(self, callback: Callable[..., None], *args: Any) -> None:
        """Run `callback(*args)` on the loop thread at its next turn; from any thread."""
        with self._lock:
            self._from_threads.append(_bind(callback, args))
        self.wake()

    def wake(self) -> None:
        """Make a loop waiting in `select` take a turn; from any thread or a signal handler."""
        if self._woken:
            return
        self._woken = True
        try:
            self._wake_out.send(b"\0")
        except OSError:
            pass  # the buffer is full (a wake-up is pending anyway) or the reactor is closed

    def add_signal_handler(self, signum: int, callback: Callable[[int], None]) -> None:
        """Run `callback(signum)` on the loop thread when `signum` arrives (main thread only)."""
        self._signal_callbacks[signum] = callback
        signal.set_wakeup_fd(self._wake_out.fileno(), warn_on_full_buffer=False)
        signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._signals.append(signum)  # a deque's append takes no lock
        self.wake()

    # -- sockets ---------------------------------------------------------------------------

    def add_reader(self, fileobj: Any, callback: Callback) -> None:
        self._watch(fileobj, 0, callback)

    def add_writer(self, fileobj: Any, callback: Callback) -> None:
        self._watch(fileobj, 1, callback)

    def remove_reader(self, fileobj: Any) -> None:
        self._unwatch(fileobj, 0)

    def remove_writer(self, fileobj: Any) -> None:
        self._unwatch(fileobj, 1)

    def _watch(self, fileobj: Any, which: int, callback: Callback) -> None:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        handlers = self._handlers.get(fd)
        if handlers is None:
            handlers = self._handlers[fd] = [None, None]
            handlers[which] = callback
            self._selector.register(fd, _events(handlers), handlers)
        else:
            handlers[which] = callback
            self._selector.modify(fd, _events(handlers), handlers)

    def _unwatch(self, fileobj: Any, which: int) -> None:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        handlers = self._handlers.get(fd)
        if handlers is None or handlers[which] is None:
            return
        handlers[which] = None
        if handlers[0] is None and handlers[1] is None:
            del self._handlers[fd]
            self._selector.unregister(fd)
        else:
            self._selector.modify(fd, _events(handlers), handlers)

    def timers(self) -> int:
        """How many timers are pending: what will wake an otherwise idle loop."""
        return sum(1 for _, _, timer in self._timers if not timer.cancelled)

    # -- running ---------------------------------------------------------------------------

    def run_until(self, condition: Callable[[], bool], timeout_s: float | None = None) -> bool:
        """Run the loop until `condition()` holds (True) or `timeout_s` passes (False)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not condition():
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return False
            self._turn(now, deadline)
        return True

    def _turn(self, now: float, deadline: float | None) -> None:
        if self._ready:
            wait: float | None = 0.0
        else:
            wait = None if deadline is None else deadline - now
            while self._timers and self._timers[0][2].cancelled:
                heapq.heappop(self._timers)
            if self._timers:
                until_timer = max(0.0, self._timers[0][0] - now)
                wait = until_timer if wait is None else min(wait, until_timer)
        for key, mask in self._selector.select(wait):
            handlers = key.data
            if mask & selectors.EVENT_READ and handlers[0] is not None:
                self._ready.append(handlers[0])
            if mask & selectors.EVENT_WRITE and handlers[1] is not None:
                self._ready.append(handlers[1])
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            timer = heapq.heappop(self._timers)[2]
            if not timer.cancelled:
                self._ready.append(timer.callback)
        # Only what is due now: what these callbacks schedule runs next turn.
        for _ in range(len(self._ready)):
            self._ready.popleft()()

    def _drain_wake(self) -> None:
        try:
            while self._wake_in.recv(4096):
                pass
        except BlockingIOError:
            pass
        with self._lock:
            self._woken = False
            calls, self._from_threads = self._from_threads, []
        self._ready.extend(calls)
        while self._signals:
            signum = self._signals.popleft()
            callback = self._signal_callbacks.get(signum)
            if callback is not None:
                self._ready.append(_bind(callback, (signum,)))

    def close(self) -> None:
        if self._signal_callbacks:
            signal.set_wakeup_fd(-1)
        self._selector.close()
        self._wake_in.close()
        self._wake_out.close()


def _bind(callback: Callable[..., None], args: tuple[Any, ...]) -> Callback:
    if not args:
        return callback
    return lambda: callback(*args)


def _events(handlers: list[Callback | None]) -> int:
    return (selectors.EVENT_READ if handlers[0] is not None else 0) | (
        selectors.EVENT_WRITE if handlers[1] is not None else 0
    )
