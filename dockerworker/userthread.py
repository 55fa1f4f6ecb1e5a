"""The thread user code runs on.

Owns: handing work from the event loop to one dedicated thread and the
result back. User code blocks (HTTP calls in `match_device`, slow loops);
on its own thread it cannot stall the event loop, which must keep answering
heartbeats, publisher confirms, signals and the health endpoint.

A daemon thread rather than an executor: a `process` that never returns must
not keep the interpreter from exiting at shutdown.
"""

from __future__ import annotations

import asyncio
import queue
import sys
import threading
import traceback
from typing import Any, Callable


class UserThread:
    """Runs one call at a time, in submission order, on a single daemon thread."""

    def __init__(self, name: str = "user-code") -> None:
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, function: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """Queue `function(*args)` for the thread; the future (of the running
        loop) gets what it returned or raised. Resolving the future first
        (a caller that gave up) is allowed: the thread's answer is then dropped."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._jobs.put((function, args, loop, future))
        return future

    async def call(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run `function(*args)` on the thread and return (or raise) what it did."""
        return await self.submit(function, *args)

    def where(self, frames: int = 6) -> list[traceback.FrameSummary]:
        """The innermost `frames` frames the thread is running now, outermost first."""
        frame = sys._current_frames().get(self._thread.ident or -1)
        return list(traceback.extract_stack(frame, limit=frames)) if frame is not None else []

    @property
    def ident(self) -> int | None:
        return self._thread.ident

    def _serve(self) -> None:
        while True:
            function, args, loop, future = self._jobs.get()
            try:
                result, error = function(*args), None
            except BaseException as exc:  # handed to the awaiting side, which decides
                result, error = None, exc
            try:
                loop.call_soon_threadsafe(_resolve, future, result, error)
            except RuntimeError:
                pass  # the loop is closed: nobody waits for this any more


def _resolve(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.done():  # the caller gave up (cancelled at shutdown)
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
