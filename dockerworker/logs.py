"""Structured logging and the capture of what user code prints.

Owns: the one JSON-object-per-line format of everything the runtime writes to
stdout, and the redirection of `print` (stdout and stderr) inside user code
into a buffer attributed to the message being processed.

Capture is per thread: user code runs on its own thread, and only writes made
on a thread that has an open capture are diverted, so the runtime's own log
lines (written to the real stream) are never swallowed.
"""

from __future__ import annotations

import io
import json
import logging
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator, TextIO

# What one message's captured output may add to its log line; the rest is cut
# so a chatty `process` cannot turn each log line into megabytes.
MAX_CAPTURED_CHARS = 4096

_local = threading.local()
_write_lock = threading.Lock()
_real_stdout: TextIO = sys.stdout


class _CaptureRouter(io.TextIOBase):
    """A stand-in for sys.stdout/sys.stderr that diverts writes made under `capture()`."""

    def __init__(self, real: TextIO) -> None:
        self._real = real

    def write(self, text: str) -> int:
        buffer = getattr(_local, "buffer", None)
        if buffer is not None:
            return buffer.write(text)
        return self._real.write(text)

    def flush(self) -> None:
        if getattr(_local, "buffer", None) is None:
            self._real.flush()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._real, "encoding", "utf-8")


def setup(level: int = logging.INFO, stream: TextIO | None = None) -> None:
    """Route stdlib logging to JSON lines on stdout and install the print capture."""
    global _real_stdout
    _real_stdout = stream or sys.__stdout__ or sys.stdout
    _install_routers()
    handler = logging.StreamHandler(_LineWriter())
    handler.setFormatter(_JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pika logs every step of a failed (re)connection, up to ERROR; the
    # runtime logs the outcome itself, once, with the reason.
    logging.getLogger("pika").setLevel(logging.CRITICAL)


def _install_routers() -> None:
    if not isinstance(sys.stdout, _CaptureRouter):
        sys.stdout = _CaptureRouter(sys.stdout)
    if not isinstance(sys.stderr, _CaptureRouter):
        sys.stderr = _CaptureRouter(sys.stderr)


@contextmanager
def capture() -> Iterator[io.StringIO]:
    """Collect everything printed on this thread while the block runs."""
    _install_routers()
    buffer = io.StringIO()
    previous = getattr(_local, "buffer", None)
    _local.buffer = buffer
    try:
        yield buffer
    finally:
        _local.buffer = previous


def clip(text: str, limit: int = MAX_CAPTURED_CHARS) -> str:
    """Shorten captured output to `limit` characters, saying that it was cut."""
    if len(text) <= limit:
        return text
    return text[:limit] + f"... [{len(text) - limit} more characters cut]"


def event(name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Write one structured log line: `event` plus the given fields.

    Written directly rather than through `logging`: this runs once per
    message, and a LogRecord plus handler chain costs several times the
    JSON encoding itself.
    """
    if level < logging.getLogger().getEffectiveLevel():
        return
    line = {"ts": _iso_ms(time.time()), "level": _LEVEL_NAMES.get(level, str(level)), "event": name}
    line.update(fields)
    _write_line(json.dumps(line, default=str, ensure_ascii=False) + "\n")


_LEVEL_NAMES = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning", logging.ERROR: "error"}


def _write_line(text: str) -> None:
    with _write_lock:
        _real_stdout.write(text)
        _real_stdout.flush()


class _LineWriter:
    """Where stdlib logging writes: the real stdout, bypassing the capture."""

    def write(self, text: str) -> None:
        _write_line(text)

    def flush(self) -> None:
        pass  # every line is flushed as it is written


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _iso_ms(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def _iso_ms(created: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created * 1000) % 1000:03d}Z"
