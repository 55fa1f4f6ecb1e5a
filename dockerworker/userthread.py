"""The thread user code runs on.

Owns: handing work from the event loop to one dedicated thread and the
result back. User code blocks (HTTP calls in `match_device`, slow loops);
on its own thread it cannot stall the reactor, which must keep answering
heartbeats, publisher confirms, signals and the health endpoint.

A daemon thread rather than an executor: a `process` that never returns must
not keep the interpreter from exiting at shutdown.
"""

from __future__ import annotations

import queue
import sys
import threading
import traceback
from typing import Any, Callable

from .reactor import Reactor

Done = Callable[[Any, "BaseException | None"], None]


class UserThread:
    """Runs one call at a time, in submission order, on a single daemon thread."""

    def __init__(self, name: str = "user-code") -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], Done, Reactor]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, function: Callable[..., Any], *args: Any, done: Done, reactor: Reactor) -> None:
        """Queue `function(*args)` for the thread; `done(result, error)` is
        then called on the reactor's thread with what it returned or raised."""
        self._jobs.put((function, args, done, reactor))

    def where(self, frames: int = 6) -> list[traceback.FrameSummary]:
        """The innermost `frames` frames the thread is running now, outermost first."""
        frame = sys._current_frames().get(self._thread.ident or -1)
        return list(traceback.extract_stack(frame, limit=frames)) if frame is not None else []

    @property
    def ident(self) -> int | None:
        return self._thread.ident

    def _serve(self) -> None:
        while True:
            function, args, done, reactor = self._jobs.get()
            try:
                result, error = function(*args), None
            except BaseException as exc:  # handed to the reactor's side, which decides
                result, error = None, exc
            reactor.call_soon_threadsafe(done, result, error)
